//! nnU-Net's post-processing (`shared/docs/nnunet-pipeline.md` §8, `determine_postprocessing`):
//! on cross-validation predictions, decide whether keeping only the largest connected component
//! (26-connected; ties keep all) of the whole foreground, then of each label, raises Dice, and
//! replay the decision on other predictions.
//!
//! 1. "Keep largest" on the union of all foreground labels is accepted iff the foreground mean
//!    Dice improves and no label's mean Dice decreases.
//! 2. Then, on top of that, "keep largest" of each label in declaration order is accepted iff
//!    that label's mean Dice improves.
//!
//! Means are nnU-Net's: per label over the cases where Dice is defined, then over labels.
//!
//! A region-based dataset is scored per region, and step 2 runs per region: the union of its
//! labels in the label map is the mask whose largest component is kept (nnU-Net's
//! `labels_or_regions`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};
use stu_data::metrics::Scored;

/// The decision, as `postprocessing.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Postprocessing {
    /// Keep only the largest component of the union of all foreground labels.
    pub largest_foreground: bool,
    /// Then keep only the largest component of each of these labels, in this order.
    pub largest_per_label: Vec<u16>,
    /// For a region-based dataset, then of each of these regions (the union of its labels).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub largest_per_region: Vec<Vec<u16>>,
    /// Foreground mean Dice of the predictions it was determined on, before (NaN, written as
    /// `null`, where a label is in neither references nor predictions, as nnU-Net's mean).
    #[serde(deserialize_with = "f64_or_null")]
    pub dice_before: f64,
    /// And after.
    #[serde(deserialize_with = "f64_or_null")]
    pub dice_after: f64,
}

/// A number, or `null` for the NaN that serde_json writes as `null`.
fn f64_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Postprocessing {
    /// Applies it to a label map of shape `shape`.
    pub fn apply(&self, seg: &mut [u16], shape: [usize; 3]) {
        if self.largest_foreground {
            keep_largest_of(seg, shape, &|v| v > 0);
        }
        for &l in &self.largest_per_label {
            keep_largest_of(seg, shape, &|v| v == l);
        }
        for r in &self.largest_per_region {
            keep_largest_of(seg, shape, &|v| r.contains(&v));
        }
    }

    /// Reads `postprocessing.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a post-processing decision", path.display()))
    }
}

pub use stu_data::morphology::components;

/// Zeroes every voxel in `member` outside the largest 26-connected component(s) of the
/// `member` voxels taken as one mask (all components of the largest size are kept).
pub fn keep_largest_of(seg: &mut [u16], shape: [usize; 3], member: &(dyn Fn(u16) -> bool + Sync)) {
    let (comp, sizes) = components(seg, shape, member, &|_, _| true);
    let Some(largest) = sizes.iter().map(|s| s.1).max() else { return };
    for (v, c) in seg.iter_mut().zip(&comp) {
        if *c != u32::MAX && sizes[*c as usize].1 < largest {
            *v = 0;
        }
    }
}

/// One case in memory: reference, prediction (with its geometry and file), ignored voxels.
struct Pair {
    reference: Vec<u16>,
    prediction: Vec<u16>,
    geom: stu_data::nifti_io::Geometry,
    ignored: Option<Vec<bool>>,
    file: PathBuf,
}

/// Mean Dice per entry of `scored` over the cases where it is defined (NaN where it never is).
fn mean_dice(pairs: &[Pair], preds: &[Vec<u16>], scored: &[Scored]) -> Vec<f64> {
    let mut sums = vec![(0.0, 0usize); scored.len()];
    for (p, pred) in pairs.iter().zip(preds) {
        for (e, c) in sums.iter_mut().zip(stu_data::metrics::confusion_scored(&p.reference, pred, scored, p.ignored.as_deref())) {
            let d = 2 * c.tp + c.fp + c.fn_;
            if d > 0 {
                e.0 += 2.0 * c.tp as f64 / d as f64;
                e.1 += 1;
            }
        }
    }
    sums.into_iter().map(|(s, n)| if n == 0 { f64::NAN } else { s / n as f64 }).collect()
}

fn foreground_mean(m: &[f64]) -> f64 {
    m.iter().sum::<f64>() / m.len() as f64
}

/// Determines the post-processing on the predictions in `predictions` (folders; a case once)
/// against `reference`, scoring `scored` (labels, or a region-based dataset's regions, in
/// declaration order) and leaving out `ignore`'s voxels.
/// Writes `out/postprocessing.json` and the post-processed label maps with their
/// `summary.json` to `out/postprocessed/`.
pub fn determine(reference: &Path, predictions: &[PathBuf], scored: &[Scored], regions: bool, ignore: Option<u16>, out: &Path) -> Result<Postprocessing> {
    ensure!(!scored.is_empty(), "no foreground labels to score");
    let eval = stu_data::metrics::EvalOptions { ignore_label: ignore, ..Default::default() };
    // The cases and their files as the evaluation pairs and checks them (a case predicted
    // twice, a shape or affine off the reference's: errors), each read once.
    let mut pairs = Vec::new();
    for (r, p) in stu_data::metrics::pair_predictions(reference, predictions)? {
        let read = stu_data::metrics::read_pair(&r, &p, &eval)?;
        pairs.push(Pair { reference: read.reference.data, prediction: read.prediction.data, geom: read.prediction.geom, ignored: read.ignored, file: p });
    }
    let mut current: Vec<Vec<u16>> = pairs.iter().map(|p| p.prediction.clone()).collect();
    let before = mean_dice(&pairs, &current, scored);
    let mut best = before.clone();
    let mut pp = Postprocessing { largest_foreground: false, largest_per_label: Vec::new(), largest_per_region: Vec::new(), dice_before: foreground_mean(&before), dice_after: f64::NAN };
    let trial = |preds: &[Vec<u16>], f: &(dyn Fn(&mut Vec<u16>, [usize; 3]) + Sync)| -> Vec<Vec<u16>> {
        use rayon::prelude::*;
        preds.par_iter().zip(&pairs).map(|(s, p)| { let mut s = s.clone(); f(&mut s, p.geom.shape); s }).collect()
    };
    let improves = |a: f64, b: f64| a > b || (b.is_nan() && !a.is_nan());
    let all = trial(&current, &|s, shape| keep_largest_of(s, shape, &|v| v > 0));
    let m = mean_dice(&pairs, &all, scored);
    // "No label falls": a label undefined (NaN) before or after does not count as falling.
    let falls = |a: f64, b: f64| a < b;
    if improves(foreground_mean(&m), foreground_mean(&best)) && !m.iter().zip(&best).any(|(&a, &b)| falls(a, b)) {
        pp.largest_foreground = true;
        (current, best) = (all, m);
    }
    if scored.len() > 1 {
        for (k, s) in scored.iter().enumerate() {
            let one = trial(&current, &|seg, shape| keep_largest_of(seg, shape, &|v| s.labels.contains(&v)));
            let m = mean_dice(&pairs, &one, scored);
            if improves(m[k], best[k]) {
                match (regions, s.label()) {
                    (false, Some(l)) => pp.largest_per_label.push(l),
                    _ => pp.largest_per_region.push(s.labels.clone()),
                }
                (current, best) = (one, m);
            }
        }
    }
    pp.dice_after = foreground_mean(&best);
    // The post-processed maps, with the references' geometry, and their summary.
    let dir = out.join("postprocessed");
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let wide = scored.iter().flat_map(|s| &s.labels).any(|&l| l > 255);
    for (p, seg) in pairs.iter().zip(&current) {
        let name = p.file.file_name().context("a file name")?;
        stu_data::nifti_io::write_label_as(&dir.join(name), seg, &p.geom, wide).with_context(|| dir.join(name).display().to_string())?;
    }
    let summary = stu_data::metrics::evaluate_scored(reference, std::slice::from_ref(&dir), scored, &eval)?;
    stu_core::fs::write_atomic(&dir.join("summary.json"), (serde_json::to_string_pretty(&serde_json::to_value(&summary)?)? + "\n").as_bytes())?;
    stu_core::fs::write_atomic(&out.join("postprocessing.json"), (serde_json::to_string_pretty(&pp)? + "\n").as_bytes())?;
    Ok(pp)
}

/// Applies `pp` to every label map of `input` (`.nii.gz`, `.nii`, `.mha`, `.nrrd`), writing them to
/// `output` under the same names. Returns how many.
pub fn apply_folder(pp: &Postprocessing, input: &Path, output: &Path) -> Result<usize> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(input).with_context(|| format!("{}: cannot list", input.display()))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| matches!(stu_data::nifti_io::case_of(p), Some((_, ".nii.gz" | ".nii" | ".mha" | ".nrrd")))).collect();
    files.sort();
    ensure!(!files.is_empty(), "{}: no label maps (.nii.gz, .nii, .mha, .nrrd)", input.display());
    std::fs::create_dir_all(output).with_context(|| format!("{}: cannot create", output.display()))?;
    for f in &files {
        let mut v = stu_data::nifti_io::read_label(f)?;
        pp.apply(&mut v.data, v.geom.shape);
        let wide = v.data.iter().any(|&l| l > 255);
        let to = output.join(f.file_name().context("a file name")?);
        stu_data::nifti_io::write_label_as(&to, &v.data, &v.geom, wide)?;
    }
    Ok(files.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_with_an_undefined_dice_reads_back() {
        // A label in neither references nor predictions makes the mean NaN, written as null.
        let pp = Postprocessing { largest_foreground: false, largest_per_label: vec![1], largest_per_region: Vec::new(), dice_before: f64::NAN, dice_after: 0.5 };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("postprocessing.json");
        std::fs::write(&path, serde_json::to_string(&pp).unwrap()).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("\"dice_before\":null"));
        let back = Postprocessing::read(&path).unwrap();
        assert!(back.dice_before.is_nan() && back.dice_after == 0.5 && back.largest_per_label == [1]);
        std::fs::write(&path, r#"{"largest_foreground": false, "largest_per_label": [], "largest_per_region": [], "dice_before": 0.5}"#).unwrap();
        assert!(format!("{:#}", Postprocessing::read(&path).unwrap_err()).contains("dice_after"));
    }

    #[test]
    fn keep_largest_of_a_set_treats_its_labels_as_one_mask() {
        // Labels 1 and 2 touch: as one foreground mask they form the largest component, and
        // the lone 1 elsewhere goes; per label, 2's single voxel is its largest.
        let shape = [1, 2, 6];
        let mut seg = vec![1, 2, 0, 0, 1, 0, /**/ 1, 0, 0, 0, 0, 0];
        keep_largest_of(&mut seg, shape, &|v| v > 0);
        assert_eq!(seg, vec![1, 2, 0, 0, 0, 0, /**/ 1, 0, 0, 0, 0, 0]);
        let mut seg = vec![1, 2, 0, 0, 1, 0, /**/ 1, 0, 0, 0, 0, 0];
        keep_largest_of(&mut seg, shape, &|v| v == 2);
        assert_eq!(seg, vec![1, 2, 0, 0, 1, 0, /**/ 1, 0, 0, 0, 0, 0]);
        keep_largest_of(&mut seg, shape, &|v| v == 1);
        assert_eq!(seg, vec![1, 2, 0, 0, 0, 0, /**/ 1, 0, 0, 0, 0, 0]);
        // Components of the largest size are all kept.
        let mut seg = vec![1, 1, 0, 0, 2, 2, 0, 0, /**/ 0, 0, 0, 0, 0, 0, 0, 1];
        keep_largest_of(&mut seg, [1, 2, 8], &|v| v > 0);
        assert_eq!(seg, vec![1, 1, 0, 0, 2, 2, 0, 0, /**/ 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn regions_are_post_processed_as_the_union_of_their_labels() {
        // Region (1, 2) is object A (labels 1 and 2, 6 voxels) plus a stray 2 far away in the
        // prediction; region (3,) is one voxel elsewhere. Keeping the largest foreground
        // component would drop region (3,)'s voxel, so it is refused; keeping (1, 2)'s largest
        // removes the stray only, and is taken.
        #[rustfmt::skip]
        let reference: Vec<u16> = vec![
            1, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            1, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0,
        ];
        let mut prediction = reference.clone();
        prediction[10] = 2;
        prediction[11] = 2;
        let dir = tempfile::tempdir().unwrap();
        let header = stu_data::nifti_io::NiftiHeader { pixdim: [1.0; 8], ..Default::default() };
        let affine = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]];
        let geom = stu_data::nifti_io::Geometry { shape: [1, 4, 12], spacing: [1.0; 3], affine, header };
        for (sub, v) in [("ref", &reference), ("pred", &prediction)] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
            stu_data::nifti_io::write_label(&dir.path().join(sub).join("c.nii.gz"), v, &geom).unwrap();
        }
        let scored = [Scored { key: "(1, 2)".into(), labels: vec![1, 2] }, Scored { key: "(3,)".into(), labels: vec![3] }];
        let pp = determine(&dir.path().join("ref"), &[dir.path().join("pred")], &scored, true, None, &dir.path().join("out")).unwrap();
        assert!(!pp.largest_foreground);
        assert!(pp.largest_per_label.is_empty());
        assert_eq!(pp.largest_per_region, vec![vec![1, 2]]);
        assert!((pp.dice_before - (12.0 / 14.0 + 1.0) / 2.0).abs() < 1e-12 && pp.dice_after == 1.0, "{pp:?}");
        let mut replay = prediction.clone();
        pp.apply(&mut replay, [1, 4, 12]);
        assert_eq!(replay, reference);
        let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/postprocessed/summary.json")).unwrap()).unwrap();
        assert_eq!(summary["mean"]["(1, 2)"]["Dice"], 1.0);
        // The decision's file keeps its former shape for labels, the regions beside them.
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/postprocessing.json")).unwrap()).unwrap();
        assert_eq!(json["largest_per_region"], serde_json::json!([[1, 2]]));
        assert_eq!(Postprocessing::read(&dir.path().join("out/postprocessing.json")).unwrap(), pp);
    }
}
