//! nnU-Net v2 raw datasets: `dataset.json`, `imagesTr`/`labelsTr`, case discovery
//! (`shared/docs/nnunet-pipeline.md` §1).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Problems with a dataset's description or layout; each names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file or folder is missing or unreadable.
    #[error("{path}: {reason}")]
    File {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `dataset.json` is malformed.
    #[error("{path}: `{key}`: {reason}")]
    Json {
        /// The `dataset.json`.
        path: PathBuf,
        /// The offending key.
        key: String,
        /// Why.
        reason: String,
    },
    /// An image or label file cannot be read (its message names the file).
    #[error(transparent)]
    Volume(#[from] crate::nifti_io::NiftiIoError),
}

/// One entry of `labels`: a class id, or a region (a list of ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelValue {
    /// A plain label.
    Class(u32),
    /// A region: the union of these labels.
    Region(Vec<u32>),
}

/// One output of a region-based dataset (nnU-Net's region training, e.g. BraTS's whole tumour
/// `[1, 2, 3]`, tumour core `[2, 3]`, enhancing tumour `[3]`): the union of its labels, trained
/// with a sigmoid, written as `regions_class_order[i]` where its probability exceeds 0.5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// Its name in `labels`.
    pub name: String,
    /// The labels it unites, as declared.
    pub labels: Vec<u16>,
    /// nnU-Net's key for it in `summary.json` and class locations: `str()` of the Python value,
    /// `"2"` for an integer, `"(1, 2, 3)"` or `"(3,)"` for a list.
    pub key: String,
    /// The label written where it is predicted (`regions_class_order`, same position).
    pub writes: u16,
}

impl Region {
    /// Whether label value `v` belongs to the region.
    pub fn contains(&self, v: u16) -> bool {
        self.labels.contains(&v)
    }

    /// Whether preprocessing samples locations of its own for it (under its key): a region
    /// written as a list; one written as a plain label uses that label's locations.
    pub fn has_own_locations(&self) -> bool {
        self.key.starts_with('(')
    }
}

/// The `labels` object's entries in file order (serde_json's `Value` sorts object keys, and
/// region order matters: it pairs with `regions_class_order`).
pub(crate) struct Ordered(pub(crate) Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = map.next_entry::<String, Value>()? {
                    v.push(e);
                }
                Ok(Ordered(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// The `file_ending`s a dataset may have: NIfTI, gzipped or not, MetaImage and NRRD (SimpleITK's
/// `.mha` and `.nrrd`, as nnU-Net reads them).
pub const DATASET_ENDINGS: [&str; 4] = [".nii.gz", ".nii", ".mha", ".nrrd"];

/// A validated `dataset.json`.
#[derive(Debug, Clone)]
pub struct DatasetJson {
    /// Channel index → name (`CT`, `T2`, …), consecutive from 0.
    pub channel_names: Vec<String>,
    /// Label name → value, in file order (for a well-formed file).
    pub labels: Vec<(String, LabelValue)>,
    /// Declared number of training cases.
    pub num_training: usize,
    /// File ending of every image and label (`.nii.gz`).
    pub file_ending: String,
    /// For region-based datasets.
    pub regions_class_order: Option<Vec<u32>>,
    /// For region-based datasets (any label a list of two or more values): the foreground
    /// regions in declaration order, one network output each (nnU-Net's `foreground_regions`).
    pub regions: Option<Vec<Region>>,
    /// The ignore label's value, if `"ignore"` is declared.
    pub ignore_label: Option<u32>,
}

impl DatasetJson {
    /// Reads and validates `path`.
    pub fn read(path: &Path) -> Result<Self, DatasetError> {
        let text = std::fs::read_to_string(path).map_err(|e| DatasetError::File { path: path.to_path_buf(), reason: format!("cannot read: {e}") })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| DatasetError::Json { path: path.to_path_buf(), key: "(file)".into(), reason: format!("not valid JSON: {e}") })?;
        // The labels again, in file order; a file whose `labels` is no object fails below.
        #[derive(serde::Deserialize)]
        struct Labels {
            labels: Option<Ordered>,
        }
        let order = serde_json::from_str::<Labels>(&text).ok().and_then(|l| l.labels).map(|o| o.0);
        Self::from_value(path, &json, order)
    }

    fn from_value(path: &Path, json: &Value, order: Option<Vec<(String, Value)>>) -> Result<Self, DatasetError> {
        let err = |key: &str, reason: String| DatasetError::Json { path: path.to_path_buf(), key: key.into(), reason };
        let obj = json.as_object().ok_or_else(|| err("(file)", "must be a JSON object".into()))?;
        let (ckey, channels) = match (obj.get("channel_names"), obj.get("modality")) {
            (Some(c), _) => ("channel_names", c),
            (None, Some(m)) => ("modality", m),
            (None, None) => return Err(err("channel_names", "missing (required; e.g. {\"0\": \"CT\"})".into())),
        };
        let channels = channels.as_object().ok_or_else(|| err(ckey, "must be an object like {\"0\": \"CT\"}".into()))?;
        let mut by_index = BTreeMap::new();
        for (k, v) in channels {
            let i: usize = k.parse().map_err(|_| err(&format!("{ckey}.{k}"), "keys must be channel indices \"0\", \"1\", …".into()))?;
            let name = v.as_str().ok_or_else(|| err(&format!("{ckey}.{k}"), "must be a string".into()))?;
            by_index.insert(i, name.to_string());
        }
        if by_index.is_empty() || by_index.keys().copied().ne(0..by_index.len()) {
            return Err(err(ckey, format!("channel indices must be 0..N without gaps, got {:?}", by_index.keys().collect::<Vec<_>>())));
        }
        let labels = obj.get("labels").and_then(Value::as_object).ok_or_else(|| err("labels", "missing or not an object like {\"background\": 0, …}".into()))?;
        let labels: Vec<(String, Value)> = order.unwrap_or_else(|| labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        let mut parsed = Vec::new();
        let mut listed = Vec::new();
        for (name, v) in &labels {
            listed.push(v.is_array());
            let key = format!("labels.{name}");
            let int = |v: &Value| v.as_u64().filter(|&x| x <= u16::MAX as u64).map(|x| x as u32);
            let value = match v {
                Value::Array(items) => {
                    let ids = items.iter().map(int).collect::<Option<Vec<_>>>().ok_or_else(|| err(&key, "region members must be integers 0…65535".into()))?;
                    if ids.len() == 1 { LabelValue::Class(ids[0]) } else { LabelValue::Region(ids) }
                }
                other => LabelValue::Class(int(other).ok_or_else(|| err(&key, format!("must be an integer 0…65535 or a list of them, got {other}")))?),
            };
            parsed.push((name.clone(), value));
        }
        match parsed.iter().find(|(n, _)| n == "background") {
            Some((_, LabelValue::Class(0))) => {}
            Some(_) => return Err(err("labels.background", "must be the integer 0".into())),
            None => return Err(err("labels.background", "missing (\"background\": 0 is required)".into())),
        }
        let ignore_label = match parsed.iter().find(|(n, _)| n == "ignore") {
            None => None,
            Some((_, LabelValue::Class(v))) => Some(*v),
            Some(_) => return Err(err("labels.ignore", "must be a single integer".into())),
        };
        let has_regions = parsed.iter().any(|(_, v)| matches!(v, LabelValue::Region(_)));
        let mut plain: Vec<u32> = parsed
            .iter()
            .filter(|(n, _)| n != "ignore")
            .flat_map(|(_, v)| match v {
                LabelValue::Class(c) => vec![*c],
                LabelValue::Region(r) => r.clone(),
            })
            .collect();
        plain.sort_unstable();
        plain.dedup();
        if let Some(ig) = ignore_label {
            let max = plain.last().copied().unwrap_or(0);
            if ig != max + 1 {
                return Err(err("labels.ignore", format!("must be max(other labels) + 1 = {}, got {ig}", max + 1)));
            }
        }
        if !has_regions {
            let mut all = plain.clone();
            all.extend(ignore_label);
            if all.iter().copied().ne(0..all.len() as u32) {
                return Err(err("labels", format!("label values must be consecutive 0..K, got {all:?}")));
            }
        }
        let regions_class_order = match obj.get("regions_class_order") {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value::<Vec<u32>>(v.clone()).map_err(|_| err("regions_class_order", "must be a list of integers".into()))?),
        };
        if has_regions && regions_class_order.is_none() {
            return Err(err("regions_class_order", "required when labels contain regions".into()));
        }
        let regions = match (&regions_class_order, has_regions) {
            (Some(order), true) => {
                let mut regions = Vec::new();
                for ((name, v), &list) in parsed.iter().zip(&listed) {
                    if name == "background" || name == "ignore" {
                        continue;
                    }
                    let labels: Vec<u16> = match v {
                        LabelValue::Class(c) => vec![*c as u16],
                        LabelValue::Region(r) => r.iter().map(|&c| c as u16).collect(),
                    };
                    if labels.contains(&0) {
                        return Err(err(&format!("labels.{name}"), "a region may not contain the background 0".into()));
                    }
                    let key = match (list, labels.as_slice()) {
                        (false, [c]) => c.to_string(),
                        (true, [c]) => format!("({c},)"),
                        _ => format!("({})", labels.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")),
                    };
                    regions.push(Region { name: name.clone(), labels, key, writes: 0 });
                }
                if order.len() != regions.len() {
                    return Err(err("regions_class_order", format!("has {} entries for {} foreground regions ({}); one label per region, in the order of `labels`", order.len(), regions.len(), regions.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", "))));
                }
                for (r, &w) in regions.iter_mut().zip(order) {
                    if w == 0 || w > u16::MAX as u32 || ignore_label == Some(w) {
                        return Err(err("regions_class_order", format!("{w}: each entry is the foreground label written for its region (1…65535, not the ignore label)")));
                    }
                    r.writes = w as u16;
                }
                Some(regions)
            }
            _ => None,
        };
        let num_training = obj
            .get("numTraining")
            .and_then(Value::as_u64)
            .ok_or_else(|| err("numTraining", "missing or not a non-negative integer".into()))? as usize;
        let file_ending = obj
            .get("file_ending")
            .and_then(Value::as_str)
            .filter(|s| s.starts_with('.'))
            .ok_or_else(|| err("file_ending", "missing or not a string like \".nii.gz\"".into()))?
            .to_string();
        if !DATASET_ENDINGS.contains(&file_ending.as_str()) {
            return Err(err("file_ending", format!("`{file_ending}`: datasets here are NIfTI (.nii.gz, .nii), MetaImage (.mha) or NRRD (.nrrd); convert other formats (tif, png, .gipl) to one of them first")));
        }
        Ok(Self {
            channel_names: by_index.into_values().collect(),
            labels: parsed,
            num_training,
            file_ending,
            regions_class_order,
            regions,
            ignore_label,
        })
    }

    /// The foreground classes (value > 0, not regions) with their names, by value.
    pub fn foreground_classes(&self) -> Vec<(u32, &str)> {
        let mut v: Vec<(u32, &str)> = self
            .labels
            .iter()
            .filter_map(|(name, l)| match l {
                LabelValue::Class(c) if *c > 0 => Some((*c, name.as_str())),
                _ => None,
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Every value a label map may contain (background, classes, region members, ignore).
    pub fn allowed_label_values(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .labels
            .iter()
            .flat_map(|(_, l)| match l {
                LabelValue::Class(c) => vec![*c],
                LabelValue::Region(r) => r.clone(),
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// One training case: its channel files in order and its label file.
#[derive(Debug, Clone)]
pub struct Case {
    /// Case id (file name minus `_XXXX` and the ending).
    pub id: String,
    /// Channel files found, by channel index (`None` where missing).
    pub images: Vec<Option<PathBuf>>,
    /// Channel files whose index is beyond `channel_names`.
    pub extra_images: Vec<PathBuf>,
    /// The label file, if present.
    pub label: Option<PathBuf>,
}

/// Lists the cases of `imagesTr` (and labels without images) following nnU-Net's naming.
pub fn discover(root: &Path, json: &DatasetJson) -> Result<(Vec<Case>, Vec<PathBuf>), DatasetError> {
    let list = |dir: &Path| -> Result<Vec<String>, DatasetError> {
        let rd = std::fs::read_dir(dir).map_err(|e| DatasetError::File { path: dir.to_path_buf(), reason: format!("cannot list: {e}") })?;
        let mut names: Vec<String> = rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(&json.file_ending) && !n.starts_with('.')).collect();
        names.sort();
        Ok(names)
    };
    let images_dir = root.join("imagesTr");
    let labels_dir = root.join("labelsTr");
    let mut cases: BTreeMap<String, Case> = BTreeMap::new();
    let c = json.channel_names.len();
    let mut stray = Vec::new();
    for name in list(&images_dir)? {
        let stem = &name[..name.len() - json.file_ending.len()];
        let parsed = stem.rsplit_once('_').and_then(|(id, ch)| (ch.len() == 4).then(|| ch.parse::<usize>().ok().map(|ch| (id, ch))).flatten());
        let Some((id, ch)) = parsed else {
            stray.push(images_dir.join(&name));
            continue;
        };
        let case = cases.entry(id.to_string()).or_insert_with(|| Case { id: id.to_string(), images: vec![None; c], extra_images: vec![], label: None });
        if ch < c {
            case.images[ch] = Some(images_dir.join(&name));
        } else {
            case.extra_images.push(images_dir.join(&name));
        }
    }
    for name in list(&labels_dir)? {
        let id = &name[..name.len() - json.file_ending.len()];
        match cases.get_mut(id) {
            Some(case) => case.label = Some(labels_dir.join(&name)),
            None => stray.push(labels_dir.join(&name)),
        }
    }
    Ok((cases.into_values().collect(), stray))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<DatasetJson, DatasetError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dataset.json");
        std::fs::write(&p, text).unwrap();
        DatasetJson::read(&p)
    }

    #[test]
    fn regions_keep_file_order_and_pair_with_their_class_order() {
        // BraTS's declaration, deliberately not in alphabetical order.
        let j = read(r#"{"channel_names": {"0": "T1"}, "numTraining": 1, "file_ending": ".nii.gz",
            "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3], "edema": 2},
            "regions_class_order": [1, 2, 3, 2]}"#)
        .unwrap();
        let r = j.regions.unwrap();
        let got: Vec<(&str, &[u16], &str, u16)> = r.iter().map(|r| (r.name.as_str(), r.labels.as_slice(), r.key.as_str(), r.writes)).collect();
        assert_eq!(got, [("whole tumor", &[1, 2, 3][..], "(1, 2, 3)", 1), ("tumor core", &[2, 3][..], "(2, 3)", 2), ("enhancing tumor", &[3][..], "(3,)", 3), ("edema", &[2][..], "2", 2)]);
        assert!(r[1].contains(3) && !r[1].contains(1));
        assert_eq!(j.labels.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["background", "whole tumor", "tumor core", "enhancing tumor", "edema"]);
        // Plain labels: no regions.
        let j = read(r#"{"channel_names": {"0": "CT"}, "numTraining": 1, "file_ending": ".nii.gz", "labels": {"background": 0, "b": 2, "a": 1}}"#).unwrap();
        assert!(j.regions.is_none());
    }

    #[test]
    fn region_errors_name_the_key() {
        let base = |labels: &str, order: &str| format!(r#"{{"channel_names": {{"0": "T1"}}, "numTraining": 1, "file_ending": ".nii.gz", "labels": {labels}{order}}}"#);
        let e = read(&base(r#"{"background": 0, "wt": [1, 2], "tc": [2]}"#, "")).unwrap_err().to_string();
        assert!(e.contains("`regions_class_order`") && e.contains("required"), "{e}");
        let e = read(&base(r#"{"background": 0, "wt": [1, 2], "tc": [2]}"#, r#", "regions_class_order": [1]"#)).unwrap_err().to_string();
        assert!(e.contains("`regions_class_order`") && e.contains("1 entries for 2"), "{e}");
        let e = read(&base(r#"{"background": 0, "wt": [0, 1], "tc": [2]}"#, r#", "regions_class_order": [1, 2]"#)).unwrap_err().to_string();
        assert!(e.contains("`labels.wt`") && e.contains("background"), "{e}");
        let e = read(&base(r#"{"background": 0, "wt": [1, 2], "tc": [2]}"#, r#", "regions_class_order": [1, 0]"#)).unwrap_err().to_string();
        assert!(e.contains("`regions_class_order`") && e.contains("0:"), "{e}");
        let e = read(r#"{"channel_names": {"0": "CT"}, "numTraining": 1, "file_ending": ".tif", "labels": {"background": 0, "a": 1}}"#).unwrap_err().to_string();
        assert!(e.contains("`file_ending`") && e.contains(".tif") && e.contains("NIfTI"), "{e}");
        assert!(read(r#"{"channel_names": {"0": "CT"}, "numTraining": 1, "file_ending": ".mha", "labels": {"background": 0, "a": 1}}"#).is_ok());
    }
}
