//! Direct inference: TOML label maps from STU-Net's 104 TotalSegmentator classes to a target
//! dataset's labels (`shared/docs/stunet.md` §7, the paper's Table 4).
//!
//! A map lists `[[label]]` entries in evaluation order: `name`, the dataset's own `reference`
//! values merged into it, and the STU-Net class names (`model`) whose union predicts it (default:
//! the name itself, which must then be an STU-Net class). An entry with `ignore = true` is not
//! evaluated: its reference voxels become background. Unknown class names are errors naming the
//! file and entry; upstream's dicts crash on several (`urinary_bladder`, `trachea`, …) instead.
//! Maps for the Table 4 datasets ship in `experiments/label_maps/` and are also built in by name.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;

/// Built-in maps (`experiments/label_maps/*.toml`), by name.
pub const BUILT_IN: [(&str, &str); 15] = [
    ("abdomenct_1k", include_str!("../../../experiments/label_maps/abdomenct_1k.toml")),
    ("amos_ct", include_str!("../../../experiments/label_maps/amos_ct.toml")),
    ("btcv", include_str!("../../../experiments/label_maps/btcv.toml")),
    ("btcv_cervix", include_str!("../../../experiments/label_maps/btcv_cervix.toml")),
    ("ct_org", include_str!("../../../experiments/label_maps/ct_org.toml")),
    ("flare22", include_str!("../../../experiments/label_maps/flare22.toml")),
    ("kipa22", include_str!("../../../experiments/label_maps/kipa22.toml")),
    ("kits2021", include_str!("../../../experiments/label_maps/kits2021.toml")),
    ("msd_liver", include_str!("../../../experiments/label_maps/msd_liver.toml")),
    ("msd_pancreas", include_str!("../../../experiments/label_maps/msd_pancreas.toml")),
    ("msd_spleen", include_str!("../../../experiments/label_maps/msd_spleen.toml")),
    ("phantom_organs", include_str!("../../../experiments/label_maps/phantom_organs.toml")),
    ("segthor", include_str!("../../../experiments/label_maps/segthor.toml")),
    ("verse2020", include_str!("../../../experiments/label_maps/verse2020.toml")),
    ("word", include_str!("../../../experiments/label_maps/word.toml")),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    dataset: String,
    #[serde(rename = "label")]
    labels: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    reference: Vec<u16>,
    model: Option<Vec<String>>,
    #[serde(default)]
    ignore: bool,
}

/// One evaluated target label.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedLabel {
    /// Target name.
    pub name: String,
    /// Evaluation label value (1-based position among the evaluated entries).
    pub value: u16,
    /// The dataset's own values merged into it.
    pub reference: Vec<u16>,
    /// STU-Net class ids (1..=104) whose union predicts it.
    pub model: Vec<u16>,
}

/// A validated label map.
#[derive(Debug, Clone)]
pub struct LabelMap {
    /// Dataset title.
    pub dataset: String,
    /// Evaluated labels in order.
    pub labels: Vec<MappedLabel>,
    /// Ignored names with their reference values.
    pub ignored: Vec<(String, Vec<u16>)>,
}

impl LabelMap {
    /// Parses a map; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let f: File = toml::from_str(text).with_context(|| format!("{origin}: not a label map"))?;
        let mut labels = Vec::new();
        let mut ignored = Vec::new();
        let mut seen_ref = BTreeMap::new();
        for (i, e) in f.labels.into_iter().enumerate() {
            ensure!(!e.reference.is_empty(), "{origin}: label[{i}] `{}`: `reference` is empty", e.name);
            for &r in &e.reference {
                ensure!(r > 0, "{origin}: label[{i}] `{}`: reference value 0 is background", e.name);
                if let Some(other) = seen_ref.insert(r, e.name.clone()) {
                    bail!("{origin}: reference value {r} is claimed by both `{other}` and `{}`", e.name);
                }
            }
            if e.ignore {
                ensure!(e.model.is_none(), "{origin}: label[{i}] `{}` is ignored but names model classes", e.name);
                ignored.push((e.name, e.reference));
                continue;
            }
            let names = e.model.clone().unwrap_or_else(|| vec![e.name.clone()]);
            ensure!(!names.is_empty(), "{origin}: label[{i}] `{}`: `model` is empty", e.name);
            let model = names
                .iter()
                .map(|n| {
                    stu_core::taxonomy::label_of(n).with_context(|| {
                        if e.model.is_none() {
                            format!("{origin}: label[{i}] `{}` is not an STU-Net class name; give `model = [...]` (STU-Net class names) or `ignore = true`", e.name)
                        } else {
                            format!("{origin}: label[{i}] `{}`: `{n}` is not an STU-Net class name", e.name)
                        }
                    })
                })
                .collect::<Result<Vec<u16>>>()?;
            labels.push(MappedLabel { name: e.name, value: labels.len() as u16 + 1, reference: e.reference, model });
        }
        ensure!(!labels.is_empty(), "{origin}: no label is evaluated");
        Ok(Self { dataset: f.dataset, labels, ignored })
    }

    /// A built-in map by name, or a TOML file.
    pub fn load(spec: &str) -> Result<Self> {
        if let Some((name, text)) = BUILT_IN.iter().find(|(n, _)| *n == spec) {
            return Self::parse(text, &format!("built-in label map `{name}`"));
        }
        let path = Path::new(spec);
        if !path.exists() {
            bail!("label map `{spec}`: no such file, and not a built-in map ({})", BUILT_IN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "));
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Model class id → evaluation label (0 for classes no label uses).
    pub fn prediction_table(&self) -> Vec<u16> {
        let mut t = vec![0u16; stu_core::taxonomy::CLASSES.len() + 1];
        for l in &self.labels {
            for &m in &l.model {
                t[m as usize] = l.value;
            }
        }
        t
    }

    /// Dataset reference value → evaluation label (0 for ignored and unknown values).
    pub fn reference_table(&self) -> BTreeMap<u16, u16> {
        self.labels.iter().flat_map(|l| l.reference.iter().map(move |&r| (r, l.value))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_maps_load_with_the_papers_class_counts() {
        // K per dataset, shared/docs/stunet.md §7.
        let k = [("abdomenct_1k", 4), ("amos_ct", 12), ("btcv", 13), ("btcv_cervix", 1), ("ct_org", 5), ("flare22", 13), ("kipa22", 1), ("kits2021", 1), ("msd_liver", 1), ("msd_pancreas", 1), ("msd_spleen", 1), ("segthor", 3), ("verse2020", 24), ("word", 13)];
        for (name, want) in k {
            let m = LabelMap::load(name).unwrap();
            assert_eq!(m.labels.len(), want, "{name}");
        }
        let ct = LabelMap::load("ct_org").unwrap();
        let lung = ct.labels.iter().find(|l| l.name == "lung").unwrap();
        assert_eq!(lung.model.len(), 5, "lung = the five lobes");
        let t = ct.prediction_table();
        assert_eq!(t[stu_core::taxonomy::label_of("lung_middle_lobe_right").unwrap() as usize], lung.value);
        assert_eq!(ct.reference_table().get(&5), None, "bone is ignored");
    }

    #[test]
    fn unknown_names_are_errors_unless_ignored() {
        let bad = "dataset = \"x\"\n[[label]]\nname = \"kidney\"\nreference = [1]\n";
        let e = LabelMap::parse(bad, "x.toml").unwrap_err().to_string();
        assert!(e.contains("x.toml") && e.contains("`kidney`") && e.contains("ignore"), "{e}");
        let typo = "dataset = \"x\"\n[[label]]\nname = \"k\"\nreference = [1]\nmodel = [\"kidny_left\"]\n";
        assert!(LabelMap::parse(typo, "x.toml").unwrap_err().to_string().contains("`kidny_left`"));
        let ok = "dataset = \"x\"\n[[label]]\nname = \"liver\"\nreference = [1]\n[[label]]\nname = \"tumour\"\nreference = [2]\nignore = true\n";
        let m = LabelMap::parse(ok, "x.toml").unwrap();
        assert_eq!(m.labels.len(), 1);
        let dup = "dataset = \"x\"\n[[label]]\nname = \"liver\"\nreference = [1]\n[[label]]\nname = \"spleen\"\nreference = [1]\n";
        assert!(LabelMap::parse(dup, "x.toml").unwrap_err().to_string().contains("claimed by both"));
        let unknown_key = "dataset = \"x\"\n[[label]]\nname = \"liver\"\nreference = [1]\ncolour = 3\n";
        assert!(LabelMap::parse(unknown_key, "x.toml").unwrap_err().chain().any(|c| c.to_string().contains("colour")));
    }
}
