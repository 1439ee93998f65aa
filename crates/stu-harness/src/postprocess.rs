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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

/// The decision, as `postprocessing.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Postprocessing {
    /// Keep only the largest component of the union of all foreground labels.
    pub largest_foreground: bool,
    /// Then keep only the largest component of each of these labels, in this order.
    pub largest_per_label: Vec<u16>,
    /// Foreground mean Dice of the predictions it was determined on, before.
    pub dice_before: f64,
    /// And after.
    pub dice_after: f64,
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
    }

    /// Reads `postprocessing.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a post-processing decision", path.display()))
    }
}

/// The 26-connected components of the voxels whose value is `member`, neighbours joining when
/// `joined(a, b)` holds for their values: each voxel's component id (`u32::MAX` outside), and
/// each component's first value and size.
pub fn components(seg: &[u16], shape: [usize; 3], member: &(dyn Fn(u16) -> bool + Sync), joined: &dyn Fn(u16, u16) -> bool) -> (Vec<u32>, Vec<(u16, usize)>) {
    let n = seg.len();
    let mut comp = vec![u32::MAX; n];
    let mut sizes: Vec<(u16, usize)> = Vec::new();
    let mut stack = Vec::new();
    for start in 0..n {
        if !member(seg[start]) || comp[start] != u32::MAX {
            continue;
        }
        let id = sizes.len() as u32;
        comp[start] = id;
        stack.push(start);
        let mut size = 0;
        while let Some(v) = stack.pop() {
            size += 1;
            let (z, y, x) = ((v / (shape[1] * shape[2])) as i64, (v / shape[2] % shape[1]) as i64, (v % shape[2]) as i64);
            for dz in -1..=1i64 {
                for dy in -1..=1i64 {
                    for dx in -1..=1i64 {
                        let (nz, ny, nx) = (z + dz, y + dy, x + dx);
                        if nz < 0 || ny < 0 || nx < 0 || nz >= shape[0] as i64 || ny >= shape[1] as i64 || nx >= shape[2] as i64 {
                            continue;
                        }
                        let w = (nz as usize * shape[1] + ny as usize) * shape[2] + nx as usize;
                        if member(seg[w]) && comp[w] == u32::MAX && joined(seg[v], seg[w]) {
                            comp[w] = id;
                            stack.push(w);
                        }
                    }
                }
            }
        }
        sizes.push((seg[start], size));
    }
    (comp, sizes)
}

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

/// Mean Dice per label over the cases where it is defined (NaN where it never is).
fn mean_dice(pairs: &[Pair], preds: &[Vec<u16>], labels: &[u16]) -> BTreeMap<u16, f64> {
    let mut sums: BTreeMap<u16, (f64, usize)> = labels.iter().map(|&l| (l, (0.0, 0))).collect();
    for (p, pred) in pairs.iter().zip(preds) {
        for (l, c) in stu_data::metrics::confusion(&p.reference, pred, labels, p.ignored.as_deref()) {
            let d = 2 * c.tp + c.fp + c.fn_;
            if d > 0 {
                let e = sums.get_mut(&l).expect("every label");
                e.0 += 2.0 * c.tp as f64 / d as f64;
                e.1 += 1;
            }
        }
    }
    sums.into_iter().map(|(l, (s, n))| (l, if n == 0 { f64::NAN } else { s / n as f64 })).collect()
}

fn foreground_mean(m: &BTreeMap<u16, f64>) -> f64 {
    m.values().sum::<f64>() / m.len() as f64
}

/// Determines the post-processing on the predictions in `predictions` (folders; a case once)
/// against `reference`, scoring `labels` (declaration order) and leaving out `ignore`'s voxels.
/// Writes `out/postprocessing.json` and the post-processed label maps with their
/// `summary.json` to `out/postprocessed/`.
pub fn determine(reference: &Path, predictions: &[PathBuf], labels: &[u16], ignore: Option<u16>, out: &Path) -> Result<Postprocessing> {
    ensure!(!labels.is_empty(), "no foreground labels to score");
    let eval = stu_data::metrics::EvalOptions { ignore_label: ignore, ..Default::default() };
    // The cases and their files as the evaluation pairs and checks them (a case predicted
    // twice, a shape or affine off the reference's: errors), each read once.
    let mut pairs = Vec::new();
    for (r, p) in stu_data::metrics::pair_predictions(reference, predictions)? {
        let read = stu_data::metrics::read_pair(&r, &p, &eval)?;
        pairs.push(Pair { reference: read.reference.data, prediction: read.prediction.data, geom: read.prediction.geom, ignored: read.ignored, file: p });
    }
    let mut current: Vec<Vec<u16>> = pairs.iter().map(|p| p.prediction.clone()).collect();
    let before = mean_dice(&pairs, &current, labels);
    let mut best = before.clone();
    let mut pp = Postprocessing { largest_foreground: false, largest_per_label: Vec::new(), dice_before: foreground_mean(&before), dice_after: f64::NAN };
    let trial = |preds: &[Vec<u16>], f: &(dyn Fn(&mut Vec<u16>, [usize; 3]) + Sync)| -> Vec<Vec<u16>> {
        use rayon::prelude::*;
        preds.par_iter().zip(&pairs).map(|(s, p)| { let mut s = s.clone(); f(&mut s, p.geom.shape); s }).collect()
    };
    let improves = |a: f64, b: f64| a > b || (b.is_nan() && !a.is_nan());
    let all = trial(&current, &|s, shape| keep_largest_of(s, shape, &|v| v > 0));
    let m = mean_dice(&pairs, &all, labels);
    // "No label falls": a label undefined (NaN) before or after does not count as falling.
    let falls = |a: f64, b: f64| a < b;
    if improves(foreground_mean(&m), foreground_mean(&best)) && !labels.iter().any(|l| falls(m[l], best[l])) {
        pp.largest_foreground = true;
        (current, best) = (all, m);
    }
    if labels.len() > 1 {
        for &l in labels {
            let one = trial(&current, &|s, shape| keep_largest_of(s, shape, &|v| v == l));
            let m = mean_dice(&pairs, &one, labels);
            if improves(m[&l], best[&l]) {
                pp.largest_per_label.push(l);
                (current, best) = (one, m);
            }
        }
    }
    pp.dice_after = foreground_mean(&best);
    // The post-processed maps, with the references' geometry, and their summary.
    let dir = out.join("postprocessed");
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let wide = labels.iter().any(|&l| l > 255);
    for (p, seg) in pairs.iter().zip(&current) {
        let name = p.file.file_name().context("a file name")?;
        stu_data::nifti_io::write_label_as(&dir.join(name), seg, &p.geom, wide).with_context(|| dir.join(name).display().to_string())?;
    }
    let summary = stu_data::metrics::evaluate_folder(reference, &dir, labels, &eval)?;
    stu_core::fs::write_atomic(&dir.join("summary.json"), (serde_json::to_string_pretty(&serde_json::to_value(&summary)?)? + "\n").as_bytes())?;
    stu_core::fs::write_atomic(&out.join("postprocessing.json"), (serde_json::to_string_pretty(&pp)? + "\n").as_bytes())?;
    Ok(pp)
}

/// Applies `pp` to every `.nii.gz` label map of `input`, writing them to `output`. Returns how
/// many.
pub fn apply_folder(pp: &Postprocessing, input: &Path, output: &Path) -> Result<usize> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(input).with_context(|| format!("{}: cannot list", input.display()))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.to_string_lossy().ends_with(".nii.gz")).collect();
    files.sort();
    ensure!(!files.is_empty(), "{}: no .nii.gz label maps", input.display());
    std::fs::create_dir_all(output).with_context(|| format!("{}: cannot create", output.display()))?;
    for f in &files {
        let mut v = stu_data::nifti_io::read_label(f).with_context(|| f.display().to_string())?;
        pp.apply(&mut v.data, v.geom.shape);
        let wide = v.data.iter().any(|&l| l > 255);
        let to = output.join(f.file_name().context("a file name")?);
        stu_data::nifti_io::write_label_as(&to, &v.data, &v.geom, wide).with_context(|| to.display().to_string())?;
    }
    Ok(files.len())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
