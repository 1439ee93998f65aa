//! The official TotalSegmentator release → an nnU-Net raw dataset in STU-Net's label order.
//!
//! Release layout: `<root>/<case>/ct.nii.gz`, `<root>/<case>/segmentations/<class>.nii.gz` (one
//! binary mask per class) and `<root>/meta.csv` (`;`-separated, with `image_id` and `split`).
//! Cases whose split is `test` go to `imagesTs`/`labelsTs`, the others to `imagesTr`/`labelsTr`.
//! Labels follow STU-Net's alphabetical order (1..104), or, restricted to one expert group,
//! that group's classes renumbered 1..K in the same order. Where masks overlap, the later class
//! in that order wins (the release's ground truth overlaps in places; STU-Net issue #10).

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use stu_core::taxonomy::{CLASSES, ExpertGroup};

use crate::dataset::DatasetError;
use crate::nifti_io::{read_geometry, read_label, write_label};

fn file_err(path: &Path, reason: impl Into<String>) -> DatasetError {
    DatasetError::File { path: path.to_path_buf(), reason: reason.into() }
}

/// Case ids in the test split, from `meta.csv` (empty when there is no meta file).
fn test_split(root: &Path) -> Result<Vec<String>, DatasetError> {
    let meta = root.join("meta.csv");
    let Ok(text) = std::fs::read_to_string(&meta) else { return Ok(vec![]) };
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(';').map(str::trim).collect();
    let col = |name: &str| header.iter().position(|h| *h == name).ok_or_else(|| file_err(&meta, format!("no `{name}` column (columns: {header:?})")));
    let (id, split) = (col("image_id")?, col("split")?);
    Ok(lines
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split(';').map(str::trim).collect();
            (f.get(split) == Some(&"test")).then(|| f.get(id).map(|s| s.to_string())).flatten()
        })
        .collect())
}

/// Converts the release at `root` into `out`; returns the number of cases written.
pub fn convert(root: &Path, out: &Path, group: Option<ExpertGroup>) -> Result<usize, DatasetError> {
    let classes: Vec<(u16, &str)> = CLASSES
        .iter()
        .filter(|c| group.is_none_or(|g| c.2 == g))
        .enumerate()
        .map(|(i, c)| (i as u16 + 1, c.0))
        .collect();
    let test = test_split(root)?;
    let mut cases: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| file_err(root, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("ct.nii.gz").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    cases.sort();
    if cases.is_empty() {
        return Err(file_err(root, "no case folders with ct.nii.gz (expected <case>/ct.nii.gz and <case>/segmentations/)"));
    }
    for sub in ["imagesTr", "labelsTr", "imagesTs", "labelsTs"] {
        std::fs::create_dir_all(out.join(sub)).map_err(|e| file_err(&out.join(sub), e.to_string()))?;
    }
    cases.par_iter().try_for_each(|case| -> Result<(), DatasetError> {
        let dir = root.join(case);
        let ct = dir.join("ct.nii.gz");
        let geom = read_geometry(&ct)?;
        let mut label = vec![0u16; geom.voxels()];
        for &(id, name) in &classes {
            let p = dir.join("segmentations").join(format!("{name}.nii.gz"));
            if !p.exists() {
                return Err(file_err(&p, format!("missing mask of class `{name}`")));
            }
            let mask = read_label(&p)?;
            if mask.geom.shape != geom.shape || mask.geom.affine_mismatch(&geom) > crate::check::AFFINE_TOLERANCE {
                return Err(file_err(&p, format!("geometry differs from {}", ct.display())));
            }
            for (l, &m) in label.iter_mut().zip(&mask.data) {
                if m > 0 {
                    *l = id;
                }
            }
        }
        let part = if test.contains(case) { "Ts" } else { "Tr" };
        let img_out = out.join(format!("images{part}/{case}_0000.nii.gz"));
        std::fs::copy(&ct, &img_out).map_err(|e| file_err(&img_out, e.to_string()))?;
        let lab_out = out.join(format!("labels{part}/{case}.nii.gz"));
        write_label(&lab_out, &label, &geom).map_err(|e| file_err(&lab_out, e.to_string()))
    })?;
    let labels: serde_json::Map<String, serde_json::Value> =
        std::iter::once(("background".to_string(), 0.into())).chain(classes.iter().map(|&(id, n)| (n.to_string(), id.into()))).collect();
    let n_train = cases.iter().filter(|c| !test.contains(c)).count();
    let json = serde_json::json!({
        "name": format!("TotalSegmentator{}", group.map(|g| format!(" ({})", g.name())).unwrap_or_default()),
        "description": "Converted by stu from the TotalSegmentator release: STU-Net label order (stunet.md §6).",
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "expert_group": group.map(|g| g.name()),
    });
    let p = out.join("dataset.json");
    std::fs::write(&p, serde_json::to_string_pretty(&json).expect("serialisable") + "\n").map_err(|e| file_err(&p, e.to_string()))?;
    Ok(cases.len())
}

/// Where `convert` reads a case's class mask (for tools that build releases).
pub fn mask_path(root: &Path, case: &str, class: &str) -> PathBuf {
    root.join(case).join("segmentations").join(format!("{class}.nii.gz"))
}
