//! Segmentation metrics (`shared/docs/nnunet-pipeline.md` §7) as plugins, and nnU-Net's
//! folder evaluation (`compute_metrics_on_folder`): per case and foreground label the
//! confusion counts, Dice and IoU (NaN when reference and prediction are both empty), per-label
//! `nanmean` over cases, and the plain mean over labels.
//!
//! A metric is a [`MetricEntry`] registered with `inventory::submit!`: a name and a function
//! of the confusion counts. The surface metrics ([`crate::surface`]: Normalized Surface Dice at
//! per-label tolerances, FLARE conventions; HD95, DeepMind's area-weighted definition, NaN when
//! a surface is missing) need masks and spacing and are computed on request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use stu_core::{Registry, RegistryEntry};

use crate::dataset::DatasetError;

/// Voxel counts of one label in one case.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Confusion {
    /// Reference and prediction.
    pub tp: u64,
    /// Prediction only.
    pub fp: u64,
    /// Reference only.
    pub fn_: u64,
    /// Neither.
    pub tn: u64,
}

/// A registered metric of the confusion counts.
pub struct MetricEntry {
    /// Registry id.
    pub name: &'static str,
    /// Key in `summary.json` (nnU-Net's spelling).
    pub key: &'static str,
    /// One line for listings.
    pub summary: &'static str,
    /// The value; NaN where undefined.
    pub compute: fn(&Confusion) -> f64,
    /// Where it was registered.
    pub module_path: &'static str,
}

inventory::collect!(MetricEntry);

impl RegistryEntry for MetricEntry {
    const KIND: &'static str = "metric";
    fn name(&self) -> &'static str {
        self.name
    }
    fn module_path(&self) -> &'static str {
        self.module_path
    }
}

/// Every registered metric.
pub fn registry() -> &'static Registry<MetricEntry> {
    static REG: std::sync::OnceLock<Registry<MetricEntry>> = std::sync::OnceLock::new();
    REG.get_or_init(|| Registry::from_registrations(inventory::iter::<MetricEntry>()))
}

fn dice(c: &Confusion) -> f64 {
    let d = 2 * c.tp + c.fp + c.fn_;
    if d == 0 { f64::NAN } else { 2.0 * c.tp as f64 / d as f64 }
}

fn iou(c: &Confusion) -> f64 {
    let d = c.tp + c.fp + c.fn_;
    if d == 0 { f64::NAN } else { c.tp as f64 / d as f64 }
}

inventory::submit! { MetricEntry { name: "dice", key: "Dice", summary: "2TP/(2TP+FP+FN); NaN when both masks are empty (nnU-Net)", compute: dice, module_path: module_path!() } }
inventory::submit! { MetricEntry { name: "iou", key: "IoU", summary: "TP/(TP+FP+FN); NaN when both masks are empty (nnU-Net)", compute: iou, module_path: module_path!() } }

/// Confusion counts of each label in `labels` for one case.
///
/// Voxels where `ignored` is true (nnU-Net's ignore label in the reference) count nowhere.
pub fn confusion(reference: &[u16], prediction: &[u16], labels: &[u16], ignored: Option<&[bool]>) -> BTreeMap<u16, Confusion> {
    let max = labels.iter().copied().max().unwrap_or(0) as usize;
    // counts[r][p] would be 65536²; count per (label present in ref, label present in pred).
    let mut tp = vec![0u64; max + 1];
    let mut nref = vec![0u64; max + 1];
    let mut npred = vec![0u64; max + 1];
    let mut n = 0u64;
    for (i, (&r, &p)) in reference.iter().zip(prediction).enumerate() {
        if ignored.is_some_and(|m| m[i]) {
            continue;
        }
        n += 1;
        let (r, p) = (r as usize, p as usize);
        if r <= max {
            nref[r] += 1;
        }
        if p <= max {
            npred[p] += 1;
        }
        if r == p && r <= max {
            tp[r] += 1;
        }
    }
    labels
        .iter()
        .map(|&l| {
            let l_ = l as usize;
            let (tp, fp, fn_) = (tp[l_], npred[l_] - tp[l_], nref[l_] - tp[l_]);
            (l, Confusion { tp, fp, fn_, tn: n - tp - fp - fn_ })
        })
        .collect()
}

/// What one entry of a summary scores: a label, or a region of a region-based dataset (the
/// union of its labels in reference and prediction alike, nnU-Net's `compute_metrics` with
/// `regions_or_labels`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scored {
    /// The entry's key in `summary.json`: `"3"` for a label, nnU-Net's `"(1, 2, 3)"` for a
    /// region.
    pub key: String,
    /// Its labels.
    pub labels: Vec<u16>,
}

impl Scored {
    /// Each label on its own.
    pub fn of_labels(labels: &[u16]) -> Vec<Self> {
        labels.iter().map(|&l| Self { key: l.to_string(), labels: vec![l] }).collect()
    }

    /// What a dataset's summary scores: its regions when it is region-based, else its
    /// foreground classes.
    pub fn of_dataset(json: &crate::dataset::DatasetJson) -> Vec<Self> {
        match &json.regions {
            Some(r) => r.iter().map(|r| Self { key: r.key.clone(), labels: r.labels.clone() }).collect(),
            None => Self::of_labels(&json.foreground_classes().iter().map(|c| c.0 as u16).collect::<Vec<_>>()),
        }
    }

    /// A lone label's value (`None` for a region of several).
    pub fn label(&self) -> Option<u16> {
        match self.labels.as_slice() {
            [l] => Some(*l),
            _ => None,
        }
    }

    /// Membership of every label value up to the largest given.
    fn table(&self) -> Vec<bool> {
        let max = self.labels.iter().copied().max().unwrap_or(0) as usize;
        let mut t = vec![false; max + 1];
        self.labels.iter().for_each(|&l| t[l as usize] = true);
        t
    }

    /// Whether label value `v` belongs to it.
    pub fn mask(&self, v: &[u16]) -> Vec<bool> {
        let t = self.table();
        v.iter().map(|&v| t.get(v as usize).copied().unwrap_or(false)).collect()
    }
}

/// Confusion counts of each entry of `scored` for one case ([`confusion`] for regions too).
pub fn confusion_scored(reference: &[u16], prediction: &[u16], scored: &[Scored], ignored: Option<&[bool]>) -> Vec<Confusion> {
    if let Some(labels) = scored.iter().map(Scored::label).collect::<Option<Vec<u16>>>() {
        let c = confusion(reference, prediction, &labels, ignored);
        return labels.iter().map(|l| c[l]).collect();
    }
    scored
        .iter()
        .map(|s| {
            let t = s.table();
            let inside = |v: u16| t.get(v as usize).copied().unwrap_or(false);
            let mut c = Confusion::default();
            for (i, (&r, &p)) in reference.iter().zip(prediction).enumerate() {
                if ignored.is_some_and(|m| m[i]) {
                    continue;
                }
                match (inside(r), inside(p)) {
                    (true, true) => c.tp += 1,
                    (false, true) => c.fp += 1,
                    (true, false) => c.fn_ += 1,
                    (false, false) => c.tn += 1,
                }
            }
            c
        })
        .collect()
}

/// One case's metrics by label.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseMetrics {
    /// Reference file.
    pub reference_file: PathBuf,
    /// Prediction file.
    pub prediction_file: PathBuf,
    /// Label → metric name → value (NaN = undefined).
    pub metrics: BTreeMap<String, BTreeMap<String, f64>>,
}

/// `summary.json`'s content.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Label → metric → nanmean over cases.
    pub mean: BTreeMap<String, BTreeMap<String, f64>>,
    /// Metric → mean over labels of `mean`.
    pub foreground_mean: BTreeMap<String, f64>,
    /// Per case.
    pub metric_per_case: Vec<CaseMetrics>,
}

fn case_metrics(c: &Confusion) -> BTreeMap<String, f64> {
    let mut m: BTreeMap<String, f64> = registry().iter().map(|e| (e.key.to_string(), (e.compute)(c))).collect();
    m.insert("TP".into(), c.tp as f64);
    m.insert("FP".into(), c.fp as f64);
    m.insert("FN".into(), c.fn_ as f64);
    m.insert("TN".into(), c.tn as f64);
    m.insert("n_pred".into(), (c.tp + c.fp) as f64);
    m.insert("n_ref".into(), (c.tp + c.fn_) as f64);
    m
}

/// What to compute beyond the counts, Dice and IoU.
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    /// NSD tolerance in mm per label (labels missing here use `nsd_default`).
    pub nsd_tolerance: BTreeMap<u16, f64>,
    /// NSD tolerance for other labels; no NSD when `None` and the label has no entry.
    pub nsd_default: Option<f64>,
    /// Add HD95.
    pub hd95: bool,
    /// Add ASSD (average symmetric surface distance, area-weighted).
    pub assd: bool,
    /// Reference value → evaluated label (direct inference); values not listed become 0.
    pub reference_map: Option<BTreeMap<u16, u16>>,
    /// nnU-Net's ignore label: reference voxels with this value (before `reference_map`) are
    /// left out of every count, and of the prediction's surfaces.
    pub ignore_label: Option<u16>,
}

/// Evaluates every prediction that has a reference (`{id}.nii.gz` in both folders).
/// Shapes and affines must agree; `labels` are the foreground labels to score.
pub fn evaluate_folder(reference: &Path, prediction: &Path, labels: &[u16], surface: &EvalOptions) -> Result<Summary, DatasetError> {
    evaluate_folders(reference, &[prediction.to_path_buf()], labels, surface)
}

/// The `{id}.nii.gz` (or `.nii`, `.mha`) predictions of `predictions` (folders, in order) that
/// have a reference of the same case id in `reference` (in any of those formats), as (reference, prediction) pairs. A case predicted in two of
/// the folders is an error, and so is finding no pair.
pub fn pair_predictions(reference: &Path, predictions: &[PathBuf]) -> Result<Vec<(PathBuf, PathBuf)>, DatasetError> {
    let file_err = |p: &Path, r: String| DatasetError::File { path: p.to_path_buf(), reason: r };
    let mut preds: Vec<PathBuf> = Vec::new();
    for prediction in predictions {
        let mut found: Vec<PathBuf> = std::fs::read_dir(prediction)
            .map_err(|e| file_err(prediction, format!("cannot list: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| crate::nifti_io::case_of(p).is_some())
            .collect();
        found.sort();
        let id = |p: &Path| crate::nifti_io::case_of(p).map(|(id, _)| id);
        for p in found {
            if let Some(other) = preds.iter().find(|q| id(q) == id(&p)) {
                return Err(file_err(&p, format!("predicted in {} too; each case is scored once", other.display())));
            }
            preds.push(p);
        }
    }
    let pairs: Vec<(PathBuf, PathBuf)> = preds
        .into_iter()
        .filter_map(|p| {
            let r = crate::nifti_io::find_case(reference, &crate::nifti_io::case_of(&p)?.0)?;
            Some((r, p))
        })
        .collect();
    if pairs.is_empty() {
        let shown = predictions.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        return Err(file_err(&predictions[0], format!("no prediction (in {shown}) has a reference of the same name in {}", reference.display())));
    }
    Ok(pairs)
}

/// A reference and a prediction read for scoring.
pub struct Pair {
    /// The reference, remapped by `reference_map` when given.
    pub reference: crate::nifti_io::Volume<u16>,
    /// The prediction.
    pub prediction: crate::nifti_io::Volume<u16>,
    /// The reference's voxels under the ignore label, when one is given.
    pub ignored: Option<Vec<bool>>,
}

/// Reads a (reference, prediction) pair as `surface` says (ignore label, reference map);
/// shapes and affines must agree.
pub fn read_pair(r: &Path, p: &Path, surface: &EvalOptions) -> Result<Pair, DatasetError> {
    let file_err = |p: &Path, r: String| DatasetError::File { path: p.to_path_buf(), reason: r };
    let mut rv = crate::nifti_io::read_label(r)?;
    let ignored: Option<Vec<bool>> = surface.ignore_label.map(|ig| rv.data.iter().map(|&v| v == ig).collect());
    if let Some(map) = &surface.reference_map {
        rv.data.iter_mut().for_each(|v| *v = map.get(v).copied().unwrap_or(0));
    }
    let pv = crate::nifti_io::read_label(p)?;
    if rv.geom.shape != pv.geom.shape {
        return Err(file_err(p, format!("shape {:?} differs from the reference's {:?}", pv.geom.shape, rv.geom.shape)));
    }
    let close = rv.geom.affine.iter().flatten().zip(pv.geom.affine.iter().flatten()).all(|(a, b)| (a - b).abs() <= 1e-3 * (1.0 + a.abs()));
    if !close {
        return Err(file_err(p, "affine differs from the reference's".into()));
    }
    Ok(Pair { reference: rv, prediction: pv, ignored })
}

/// [`evaluate_folder`] over the predictions of several folders together (the five folds'
/// `validation/` folders of a cross-validation: nnU-Net's `crossval_results` summary). A case
/// predicted in two of them is an error.
pub fn evaluate_folders(reference: &Path, predictions: &[PathBuf], labels: &[u16], surface: &EvalOptions) -> Result<Summary, DatasetError> {
    evaluate_scored(reference, predictions, &Scored::of_labels(labels), surface)
}

/// [`evaluate_folders`] of labels or regions ([`Scored`]); a region takes the NSD tolerance
/// `nsd_default`.
pub fn evaluate_scored(reference: &Path, predictions: &[PathBuf], scored: &[Scored], surface: &EvalOptions) -> Result<Summary, DatasetError> {
    let mut per_case = Vec::new();
    for (r, p) in pair_predictions(reference, predictions)? {
        let Pair { reference: rv, prediction: pv, ignored } = read_pair(&r, &p, surface)?;
        let conf = confusion_scored(&rv.data, &pv.data, scored, ignored.as_deref());
        let mut metrics: BTreeMap<String, BTreeMap<String, f64>> = scored.iter().zip(&conf).map(|(s, c)| (s.key.clone(), case_metrics(c))).collect();
        for s in scored {
            let tol = s.label().and_then(|l| surface.nsd_tolerance.get(&l).copied()).or(surface.nsd_default);
            if tol.is_none() && !surface.hd95 && !surface.assd {
                continue;
            }
            let g = s.mask(&rv.data);
            let mut q = s.mask(&pv.data);
            if let Some(m) = &ignored {
                q.iter_mut().zip(m).for_each(|(q, &m)| *q &= !m);
            }
            let d = crate::surface::surface_distances(&g, &q, rv.geom.shape, rv.geom.spacing);
            let m = metrics.get_mut(&s.key).expect("every entry has counts");
            if let Some(t) = tol {
                m.insert("NSD".into(), crate::surface::nsd(&d, t));
            }
            if surface.hd95 {
                let h = crate::surface::robust_hausdorff(&d, 95.0);
                m.insert("HD95".into(), if h.is_finite() { h } else { f64::NAN });
            }
            if surface.assd {
                let a = crate::surface::assd(&d);
                m.insert("ASSD".into(), if a.is_finite() { a } else { f64::NAN });
            }
        }
        per_case.push(CaseMetrics { reference_file: r, prediction_file: p, metrics });
    }
    let mut mean = BTreeMap::new();
    for s in scored {
        let key = s.key.clone();
        let names: std::collections::BTreeSet<String> = per_case.iter().flat_map(|c| c.metrics[&key].keys().cloned()).collect();
        let m: BTreeMap<String, f64> = names
            .into_iter()
            .map(|name| {
                let vals: Vec<f64> = per_case.iter().filter_map(|c| c.metrics[&key].get(&name).copied()).filter(|v| !v.is_nan()).collect();
                let v = if vals.is_empty() { f64::NAN } else { vals.iter().sum::<f64>() / vals.len() as f64 };
                (name, v)
            })
            .collect();
        mean.insert(key, m);
    }
    let names: std::collections::BTreeSet<String> = mean.values().flat_map(|m| m.keys().cloned()).collect();
    let foreground_mean = names.into_iter().map(|n| { let v = mean.values().map(|m| m.get(&n).copied().unwrap_or(f64::NAN)).sum::<f64>() / mean.len() as f64; (n, v) }).collect();
    Ok(Summary { mean, foreground_mean, metric_per_case: per_case })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_nnunet_empty_convention() {
        let r = [0, 1, 1, 2, 2, 0];
        let p = [0, 1, 2, 2, 0, 0];
        let c = confusion(&r, &p, &[1, 2, 3], None);
        assert_eq!(c[&1], Confusion { tp: 1, fp: 0, fn_: 1, tn: 4 });
        assert_eq!(c[&2], Confusion { tp: 1, fp: 1, fn_: 1, tn: 3 });
        assert!((dice(&c[&2]) - 0.5).abs() < 1e-12);
        assert!((iou(&c[&2]) - 1.0 / 3.0).abs() < 1e-12);
        assert!(dice(&c[&3]).is_nan(), "both empty → NaN");
        assert_eq!(dice(&Confusion { tp: 0, fp: 3, fn_: 0, tn: 1 }), 0.0, "empty reference, non-empty prediction → 0");
        // Voxels under the ignore label count nowhere (nnU-Net's I mask).
        let ignored = [false, false, true, false, false, true];
        let c = confusion(&r, &p, &[1, 2], Some(&ignored));
        assert_eq!(c[&1], Confusion { tp: 1, fp: 0, fn_: 0, tn: 3 });
        assert_eq!(c[&2], Confusion { tp: 1, fp: 0, fn_: 1, tn: 2 });
        // Regions: the union of their labels on both sides.
        let regions = [Scored { key: "(1, 2)".into(), labels: vec![1, 2] }, Scored { key: "2".into(), labels: vec![2] }];
        let c = confusion_scored(&r, &p, &regions, None);
        assert_eq!(c[0], Confusion { tp: 3, fp: 0, fn_: 1, tn: 2 });
        assert_eq!(c[1], Confusion { tp: 1, fp: 1, fn_: 1, tn: 3 });
        assert_eq!(confusion_scored(&r, &p, &regions, Some(&ignored))[0], Confusion { tp: 2, fp: 0, fn_: 1, tn: 1 });
        let names: Vec<_> = registry().names().collect();
        assert!(names.contains(&"dice") && names.contains(&"iou"));
    }
}
