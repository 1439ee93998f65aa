//! `stu dataset check`: nnU-Net's `verify_dataset_integrity`, with messages that name the file.
//!
//! Checks: `dataset.json` is valid; `imagesTr` and `labelsTr` exist; the number of cases equals
//! `numTraining`; every case has every channel and a label, and nothing extra; every file reads
//! as a 3-D NIfTI volume; within a case all channels and the label share shape and affine; label
//! values are among those `dataset.json` declares; images hold no NaN or infinity.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::dataset::{DatasetJson, discover};
use crate::nifti_io::{Geometry, read_image, read_label};

/// Largest tolerated affine difference within a case (relative, see `Geometry::affine_mismatch`).
pub const AFFINE_TOLERANCE: f64 = 1e-4;

/// One problem found, with the file it is about.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    /// The file (or folder) at fault.
    pub file: PathBuf,
    /// What is wrong.
    pub message: String,
}

/// The outcome of a check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The dataset folder.
    pub dataset: PathBuf,
    /// Cases found.
    pub cases: usize,
    /// Channels per case.
    pub channels: usize,
    /// Label values present over all cases.
    pub label_values_present: Vec<u32>,
    /// Everything wrong; empty when the dataset is usable.
    pub problems: Vec<Problem>,
}

impl Report {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Human-readable text.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{}: {} cases, {} channel(s), label values present: {:?}\n",
            self.dataset.display(),
            self.cases,
            self.channels,
            self.label_values_present
        );
        if self.ok() {
            s.push_str("OK: no problems found\n");
        } else {
            s.push_str(&format!("{} problem(s):\n", self.problems.len()));
            for p in &self.problems {
                s.push_str(&format!("  {}: {}\n", p.file.display(), p.message));
            }
        }
        s
    }
}

fn problem(file: &Path, message: impl Into<String>) -> Problem {
    Problem { file: file.to_path_buf(), message: message.into() }
}

/// Checks a dataset in nnU-Net raw layout.
pub fn check(root: &Path) -> Report {
    let mut report = Report { dataset: root.to_path_buf(), cases: 0, channels: 0, label_values_present: vec![], problems: vec![] };
    let json_path = root.join("dataset.json");
    let json = match DatasetJson::read(&json_path) {
        Ok(j) => j,
        Err(e) => {
            report.problems.push(problem(&json_path, e.to_string().trim_start_matches(&format!("{}: ", json_path.display())).to_string()));
            return report;
        }
    };
    report.channels = json.channel_names.len();
    for dir in ["imagesTr", "labelsTr"] {
        if !root.join(dir).is_dir() {
            report.problems.push(problem(&root.join(dir), "folder is missing"));
        }
    }
    if !report.ok() {
        return report;
    }
    let (cases, stray) = match discover(root, &json) {
        Ok(x) => x,
        Err(e) => {
            report.problems.push(problem(root, e.to_string()));
            return report;
        }
    };
    report.cases = cases.len();
    for s in stray {
        report.problems.push(problem(&s, "does not belong to any case (images are CASE_XXXX<ending>, labels CASE<ending> with a matching image)"));
    }
    if cases.len() != json.num_training {
        report.problems.push(problem(&json_path, format!("numTraining is {} but {} cases were found in imagesTr", json.num_training, cases.len())));
    }
    let allowed = json.allowed_label_values();
    let results: Vec<(Vec<Problem>, Vec<u32>)> = cases
        .par_iter()
        .map(|case| {
            let mut probs = Vec::new();
            for (ch, img) in case.images.iter().enumerate() {
                if img.is_none() {
                    let expected = root.join("imagesTr").join(format!("{}_{:04}{}", case.id, ch, json.file_ending));
                    probs.push(problem(&expected, format!("missing: case `{}` has no channel {ch} ({})", case.id, json.channel_names[ch])));
                }
            }
            for extra in &case.extra_images {
                probs.push(problem(extra, format!("unexpected channel: dataset.json declares {} channel(s)", json.channel_names.len())));
            }
            let mut present = Vec::new();
            let mut reference: Option<(PathBuf, Geometry)> = None;
            match &case.label {
                None => probs.push(problem(&root.join("labelsTr").join(format!("{}{}", case.id, json.file_ending)), format!("missing: case `{}` has no label", case.id))),
                Some(path) => match read_label(path) {
                    Err(e) => probs.push(problem(path, strip(&e.to_string(), path))),
                    Ok(label) => {
                        let mut seen = vec![false; 65536];
                        for &v in &label.data {
                            seen[v as usize] = true;
                        }
                        present = (0..65536u32).filter(|&v| seen[v as usize]).collect();
                        let bad: Vec<u32> = present.iter().copied().filter(|v| !allowed.contains(v)).collect();
                        if !bad.is_empty() {
                            probs.push(problem(path, format!("label values {bad:?} are not declared in dataset.json (allowed: {allowed:?})")));
                        }
                        reference = Some((path.clone(), label.geom));
                    }
                },
            }
            for img in case.images.iter().flatten() {
                match read_image(img) {
                    Err(e) => probs.push(problem(img, strip(&e.to_string(), img))),
                    Ok(vol) => {
                        let nan = vol.data.iter().filter(|v| v.is_nan()).count();
                        let inf = vol.data.iter().filter(|v| v.is_infinite()).count();
                        if nan + inf > 0 {
                            probs.push(problem(img, format!("{nan} NaN and {inf} infinite voxel(s)")));
                        }
                        match &reference {
                            None => reference = Some((img.clone(), vol.geom)),
                            Some((rp, rg)) => {
                                if rg.shape != vol.geom.shape {
                                    probs.push(problem(img, format!("shape {:?} differs from {} {:?} (array order z, y, x)", vol.geom.shape, rp.display(), rg.shape)));
                                } else if rg.affine_mismatch(&vol.geom) > AFFINE_TOLERANCE {
                                    probs.push(problem(img, format!("affine differs from {} (spacing {:?} vs {:?}; origin {:?} vs {:?})", rp.display(), vol.geom.spacing, rg.spacing, [vol.geom.affine[0][3], vol.geom.affine[1][3], vol.geom.affine[2][3]], [rg.affine[0][3], rg.affine[1][3], rg.affine[2][3]])));
                                }
                            }
                        }
                    }
                }
            }
            (probs, present)
        })
        .collect();
    let mut all_present = Vec::new();
    for (probs, present) in results {
        report.problems.extend(probs);
        all_present.extend(present);
    }
    all_present.sort_unstable();
    all_present.dedup();
    report.label_values_present = all_present;
    report
}

fn strip(message: &str, path: &Path) -> String {
    message.trim_start_matches(&format!("{}: ", path.display())).to_string()
}
