//! Older dataset layouts → nnU-Net v2's raw layout (`stu dataset convert`): a Medical
//! Segmentation Decathlon task (4-D multi-modal images without channel suffixes, as
//! `nnUNetv2_convert_MSD_dataset` takes) or an nnU-Net v1 task (channel files already split, as
//! `nnUNetv2_convert_old_nnUNet_dataset` takes; STU-Net's fine-tuning datasets are v1 tasks).
//! Both describe themselves with v1's `dataset.json` (`modality`, labels as id → name,
//! `training`/`test` lists), rewritten as v2's: `channel_names`, labels as name → id,
//! `file_ending`, the lists dropped, every other key kept in its place.
//!
//! A 4-D image is split into one file per modality with the file's spatial geometry (checked
//! against nnU-Net's own SimpleITK split, `tests/fixtures/make_msd_fixture.py`); integer-valued
//! channels are written as int16, others as float32 (SimpleITK keeps the source type). 3-D
//! images and label maps are copied byte for byte. The result is built in a temporary sibling
//! folder and renamed into place (`stu_core::fs::atomic_dir`), so a failed conversion leaves nothing behind.

use std::path::Path;

use rayon::prelude::*;
use serde_json::Value;

use crate::dataset::{DatasetError, DatasetJson, Ordered};

/// Which layout the source had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Medical Segmentation Decathlon: `{case}.nii.gz` images, 4-D when multi-modal.
    Msd,
    /// nnU-Net v1: `{case}_{XXXX}.nii.gz` channel files.
    NnunetV1,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Msd => "Medical Segmentation Decathlon task (4-D images split per modality)",
            Self::NnunetV1 => "nnU-Net v1 task (channel files copied)",
        })
    }
}

/// What a conversion did.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The source's layout.
    pub layout: Layout,
    /// Training cases (label files).
    pub training: usize,
    /// Test images (`imagesTs` cases).
    pub test: usize,
}

fn file_err(path: &Path, reason: impl Into<String>) -> DatasetError {
    DatasetError::File { path: path.to_path_buf(), reason: reason.into() }
}

/// The `.nii.gz` files of `dir` (none when it does not exist), skipping hidden and `_` files
/// (macOS resource forks in the Decathlon archives), sorted.
fn nifti_files(dir: &Path) -> Result<Vec<String>, DatasetError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| file_err(dir, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".nii.gz") && !n.starts_with('.') && !n.starts_with('_'))
        .collect();
    names.sort();
    Ok(names)
}

/// `{case}_{XXXX}.nii.gz` → the channel index.
fn channel_suffix(name: &str) -> Option<usize> {
    let stem = name.strip_suffix(".nii.gz")?;
    let (_, ch) = stem.rsplit_once('_')?;
    (ch.len() == 4 && ch.bytes().all(|b| b.is_ascii_digit())).then(|| ch.parse().ok()).flatten()
}

/// v1's `dataset.json` text → v2's, and the number of channels.
fn convert_json(path: &Path, text: &str, training: usize) -> Result<(String, usize), DatasetError> {
    let err = |key: &str, reason: String| DatasetError::Json { path: path.to_path_buf(), key: key.into(), reason };
    let top: Ordered = serde_json::from_str(text).map_err(|e| err("(file)", format!("not a JSON object: {e}")))?;
    let get = |k: &str| top.0.iter().find(|(n, _)| n == k).map(|(_, v)| v);
    let labels = get("labels").and_then(Value::as_object).ok_or_else(|| err("labels", "missing or not an object".into()))?;
    if labels.values().all(|v| v.is_u64() || v.is_array()) && get("channel_names").is_some() {
        return Err(err("labels", "already nnU-Net v2's layout (name → id, `channel_names`); use the folder as it is".into()));
    }
    let mut ids: Vec<(u64, String)> = Vec::new();
    for (k, v) in labels {
        let id: u64 = k.parse().map_err(|_| err(&format!("labels.{k}"), "v1 keys are label ids \"0\", \"1\", …".into()))?;
        let name = v.as_str().ok_or_else(|| err(&format!("labels.{k}"), "v1 values are label names".into()))?;
        if let Some((other, _)) = ids.iter().find(|(_, n)| n == name) {
            return Err(err(&format!("labels.{k}"), format!("the name `{name}` is also label {other}'s; v2 keys labels by name")));
        }
        ids.push((id, name.to_string()));
    }
    ids.sort();
    let modality = get("modality").or_else(|| get("channel_names")).and_then(Value::as_object).ok_or_else(|| err("modality", "missing or not an object like {\"0\": \"CT\"}".into()))?;
    let json_str = |s: &str| serde_json::to_string(s).expect("a string serialises");
    let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("a value serialises").replace('\n', "\n  ");
    let mut parts: Vec<String> = Vec::new();
    let mut seen_training = false;
    for (k, v) in &top.0 {
        match k.as_str() {
            "tensorImageSize" | "numTest" | "training" | "test" | "file_ending" | "channel_names" => {}
            "modality" => parts.push(format!("  \"channel_names\": {}", pretty(&Value::Object(modality.clone())))),
            "labels" => {
                let body: Vec<String> = ids.iter().map(|(id, n)| format!("    {}: {id}", json_str(n))).collect();
                parts.push(format!("  \"labels\": {{\n{}\n  }}", body.join(",\n")));
            }
            "numTraining" => {
                seen_training = true;
                parts.push(format!("  \"numTraining\": {training}"));
            }
            _ => parts.push(format!("  {}: {}", json_str(k), pretty(v))),
        }
    }
    if !top.0.iter().any(|(k, _)| k == "modality") {
        parts.insert(0, format!("  \"channel_names\": {}", pretty(&Value::Object(modality.clone()))));
    }
    if !seen_training {
        parts.push(format!("  \"numTraining\": {training}"));
    }
    parts.push("  \"file_ending\": \".nii.gz\"".into());
    Ok((format!("{{\n{}\n}}\n", parts.join(",\n")), modality.len()))
}

/// Converts the task folder `src` into the nnU-Net v2 raw dataset `out` (which must not exist
/// yet, or be empty).
pub fn convert(src: &Path, out: &Path) -> Result<Converted, DatasetError> {
    let json_path = src.join("dataset.json");
    let text = std::fs::read_to_string(&json_path).map_err(|e| file_err(&json_path, format!("cannot read: {e}")))?;
    if out.exists() && std::fs::read_dir(out).map_err(|e| file_err(out, format!("cannot list: {e}")))?.next().is_some() {
        return Err(file_err(out, "exists and is not empty; converting never writes over a dataset"));
    }
    let images_tr = src.join("imagesTr");
    let labels_tr = src.join("labelsTr");
    let images = nifti_files(&images_tr)?;
    let labels = nifti_files(&labels_tr)?;
    if images.is_empty() {
        return Err(file_err(&images_tr, "no .nii.gz images"));
    }
    let (json, channels) = convert_json(&json_path, &text, labels.len())?;
    let layout = if images.iter().all(|n| channel_suffix(n).is_some()) { Layout::NnunetV1 } else { Layout::Msd };
    let test = stu_core::fs::atomic_dir(out, |tmp| write_v2(src, tmp, layout, channels, &labels, &json), |e| file_err(out, format!("cannot move the converted dataset into place: {e}")))?;
    Ok(Converted { layout, training: labels.len(), test })
}

/// Writes the v2 dataset of the task `src` into `tmp`: its images (split or copied), label
/// maps and `dataset.json` (checked by reading it back). Returns the number of test cases.
fn write_v2(src: &Path, tmp: &Path, layout: Layout, channels: usize, labels: &[String], json: &str) -> Result<usize, DatasetError> {
    let labels_tr = src.join("labelsTr");
    let mkdir = |d: &Path| std::fs::create_dir_all(d).map_err(|e| file_err(d, format!("cannot create: {e}")));
    let copy = |from: &Path, to: &Path| std::fs::copy(from, to).map(|_| ()).map_err(|e| file_err(to, format!("cannot copy {}: {e}", from.display())));
    let mut test = 0;
    match layout {
        Layout::NnunetV1 => {
            for d in ["imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesVal", "labelsVal"] {
                if !src.join(d).is_dir() {
                    continue;
                }
                let files = nifti_files(&src.join(d))?;
                mkdir(&tmp.join(d))?;
                files.par_iter().try_for_each(|f| copy(&src.join(d).join(f), &tmp.join(d).join(f)))?;
                if d == "imagesTs" {
                    test = files.iter().filter_map(|f| f.strip_suffix(".nii.gz").and_then(|s| s.rsplit_once('_')).map(|(c, _)| c.to_string())).collect::<std::collections::BTreeSet<_>>().len();
                }
            }
        }
        Layout::Msd => {
            for d in ["imagesTr", "imagesTs"] {
                if !src.join(d).is_dir() {
                    continue;
                }
                let files = nifti_files(&src.join(d))?;
                mkdir(&tmp.join(d))?;
                files.par_iter().try_for_each(|f| {
                    let from = src.join(d).join(f);
                    let stem = f.strip_suffix(".nii.gz").expect("listed by its ending");
                    let to = |c: usize| tmp.join(d).join(format!("{stem}_{c:04}.nii.gz"));
                    let vols = crate::nifti_io::read_channels(&from)?;
                    if vols.len() != channels {
                        return Err(file_err(&from, format!("{} volume(s), dataset.json's `modality` names {channels}", vols.len())));
                    }
                    if channels == 1 {
                        return copy(&from, &to(0));
                    }
                    for (c, v) in vols.iter().enumerate() {
                        crate::nifti_io::write_image(&to(c), &v.data, &v.geom).map_err(|e| file_err(&to(c), e.to_string()))?;
                    }
                    Ok(())
                })?;
                if d == "imagesTs" {
                    test = files.len();
                }
            }
            mkdir(&tmp.join("labelsTr"))?;
            labels.par_iter().try_for_each(|f| copy(&labels_tr.join(f), &tmp.join("labelsTr").join(f)))?;
        }
    }
    let to = tmp.join("dataset.json");
    std::fs::write(&to, json).map_err(|e| file_err(&to, format!("cannot write: {e}")))?;
    DatasetJson::read(&to)?;
    Ok(test)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_json_becomes_v2_in_place() {
        let text = r#"{"name": "Liver", "tensorImageSize": "3D", "modality": {"0": "CT"},
            "labels": {"0": "background", "2": "tumour", "1": "liver"}, "numTraining": 131, "numTest": 70,
            "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}], "test": ["./imagesTs/b.nii.gz"]}"#;
        let (json, c) = convert_json(Path::new("dataset.json"), text, 2).unwrap();
        assert_eq!(c, 1);
        assert_eq!(
            json,
            "{\n  \"name\": \"Liver\",\n  \"channel_names\": {\n    \"0\": \"CT\"\n  },\n  \"labels\": {\n    \"background\": 0,\n    \"liver\": 1,\n    \"tumour\": 2\n  },\n  \"numTraining\": 2,\n  \"file_ending\": \".nii.gz\"\n}\n"
        );
        let v2 = r#"{"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 1, "file_ending": ".nii.gz"}"#;
        let e = convert_json(Path::new("d.json"), v2, 1).unwrap_err().to_string();
        assert!(e.contains("`labels`") && e.contains("already"), "{e}");
        let dup = r#"{"modality": {"0": "CT"}, "labels": {"0": "background", "1": "x", "2": "x"}}"#;
        let e = convert_json(Path::new("d.json"), dup, 1).unwrap_err().to_string();
        assert!(e.contains("`labels.2`") && e.contains("label 1"), "{e}");
        assert_eq!(channel_suffix("la_003_0001.nii.gz"), Some(1));
        assert_eq!(channel_suffix("la_003.nii.gz"), None);
    }
}
