//! nnU-Net's cascade (`3d_lowres` → `3d_cascade_fullres`): what the second stage reads from
//! the first, and how it augments it.
//!
//! The low-resolution stage's final validation writes each validation case's segmentation,
//! resampled to the full-resolution stage's preprocessed grid, into
//! `RUN/predicted_next_stage/3d_cascade_fullres/` (nnU-Net's `resample_and_save`). There a case
//! is `{id}_seg.i16` (`[Z, Y, X]` little-endian i16) and `{id}.json` (its shape), the JSON
//! written last, so a case is complete iff its JSON exists.
//!
//! The full-resolution stage takes that segmentation as extra input channels, one-hot over
//! the dataset's foreground labels (`MoveSegAsOneHotToDataTransform`). In training it is
//! cropped, rotated, scaled and mirrored with the label map (as a second segmentation), then
//! perturbed so that the network learns not to trust it blindly: with p 0.4 a random binary
//! operator per label (`ApplyRandomBinaryOperatorTransform`: dilation, erosion, opening or
//! closing with a ball of radius U(1, 8), p 0.5 per label, labels in random order; what one
//! label gains, the others lose), and with p 0.2 the removal of one random connected component
//! per label (`RemoveRandomConnectedComponentFromOneHotEncodingTransform`: p 0.5 per label,
//! only components under 15 % of the patch).

use std::path::{Path, PathBuf};

use stu_core::rng::SplitMix64;

use crate::dataset::DatasetError;
use crate::morphology::{ball, close, components, dilate, erode, open};

/// The folder of a low-resolution run where its final validation leaves the segmentations for
/// `next_stage` (nnU-Net's layout).
pub fn next_stage_dir(run: &Path, next_stage: &str) -> PathBuf {
    run.join("predicted_next_stage").join(next_stage)
}

/// The run a [`next_stage_dir`] belongs to (`None` for a folder not laid out so).
pub fn run_of(dir: &Path) -> Option<&Path> {
    dir.parent().filter(|p| p.file_name().is_some_and(|n| n == "predicted_next_stage")).and_then(Path::parent)
}

/// A case's two files in such a folder: its record (`{id}.json`, written last: the case is
/// complete iff it exists) and its segmentation (`{id}_seg.i16`).
pub fn case_files(dir: &Path, id: &str) -> [PathBuf; 2] {
    [dir.join(format!("{id}.json")), dir.join(format!("{id}_seg.i16"))]
}

/// The first of `dirs` holding a complete segmentation of case `id`.
pub fn holding<'a>(dirs: &'a [PathBuf], id: &str) -> Option<&'a PathBuf> {
    dirs.iter().find(|d| case_files(d, id)[0].exists())
}

/// Writes one case's segmentation for the next stage (atomically; the JSON last).
pub fn save_next_stage(dir: &Path, id: &str, seg: &[i16], shape: [usize; 3]) -> Result<(), DatasetError> {
    assert_eq!(seg.len(), shape.iter().product::<usize>(), "segmentation and shape disagree");
    let [record, data] = case_files(dir, id);
    std::fs::create_dir_all(dir).map_err(|e| DatasetError::File { path: dir.to_path_buf(), reason: format!("cannot create: {e}") })?;
    let bytes: Vec<u8> = seg.iter().flat_map(|v| v.to_le_bytes()).collect();
    let write = |path: PathBuf, bytes: &[u8]| stu_core::fs::write_atomic(&path, bytes).map_err(|e| DatasetError::File { path, reason: format!("cannot write: {e}") });
    write(data, &bytes)?;
    write(record, (serde_json::json!({"id": id, "shape": shape}).to_string() + "\n").as_bytes())
}

/// Reads the previous stage's segmentation of case `id` from any of `dirs` (the five folds'
/// folders each hold their validation cases), checking it against the case's `shape` and the
/// model's `labels` ([`check_labels`]).
pub fn load_previous_stage(dirs: &[PathBuf], id: &str, shape: [usize; 3], labels: &[i16]) -> Result<Vec<i16>, DatasetError> {
    let Some(dir) = holding(dirs, id) else {
        let list = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
        return Err(DatasetError::File {
            path: case_files(&dirs.first().cloned().unwrap_or_default(), id)[0].clone(),
            reason: format!("no segmentation of case `{id}` from the previous stage in {list}: train the 3d_lowres stage on every fold (or on fold `all`), whose final validation writes them"),
        });
    };
    let [meta, path] = case_files(dir, id);
    let json: serde_json::Value = std::fs::read(&meta)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| DatasetError::File { path: meta.clone(), reason: "not a previous-stage segmentation record".into() })?;
    let theirs: [usize; 3] = serde_json::from_value(json["shape"].clone()).map_err(|_| DatasetError::Json { path: meta.clone(), key: "shape".into(), reason: "not three sizes".into() })?;
    if theirs != shape {
        return Err(DatasetError::File {
            path: meta,
            reason: format!("the previous stage's segmentation of `{id}` is {theirs:?}, the preprocessed case {shape:?}: made for another plan or configuration"),
        });
    }
    let bytes = std::fs::read(&path).map_err(|e| DatasetError::File { path: path.clone(), reason: format!("cannot read: {e}") })?;
    if bytes.len() != 2 * shape.iter().product::<usize>() {
        return Err(DatasetError::File { path, reason: format!("{} bytes, not the 2 per voxel of {shape:?}", bytes.len()) });
    }
    let seg: Vec<i16> = bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
    check_labels(&seg, labels, id, &path)?;
    Ok(seg)
}

/// Fails when the previous stage's segmentation of `id` holds a value that is neither
/// background (0, or −1 outside the image) nor one of `labels`: a first stage of another
/// dataset. `source` names the file or folder it came from.
pub fn check_labels(seg: &[i16], labels: &[i16], id: &str, source: &Path) -> Result<(), DatasetError> {
    if let Some(&bad) = seg.iter().find(|&&v| v > 0 && !labels.contains(&v)) {
        let (lo, hi) = (labels.first().copied().unwrap_or(0), labels.last().copied().unwrap_or(0));
        return Err(DatasetError::File {
            path: source.to_path_buf(),
            reason: format!("the previous stage's segmentation of `{id}` holds label {bad}, not one of this model's labels {lo}..={hi}: a first stage of another dataset?"),
        });
    }
    Ok(())
}

/// `[labels.len(), …]` channels: 1 where `seg` equals that label, else 0.
pub fn one_hot(seg: &[i16], labels: &[i16]) -> Vec<f32> {
    let mut out = vec![0f32; labels.len() * seg.len()];
    for (c, &l) in labels.iter().enumerate() {
        for (o, &s) in out[c * seg.len()..(c + 1) * seg.len()].iter_mut().zip(seg) {
            if s == l {
                *o = 1.0;
            }
        }
    }
    out
}

fn shuffled(rng: &mut SplitMix64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order
}

/// `ApplyRandomBinaryOperatorTransform(strel_size=(1, 8), p_per_label=0.5)` on the `channels`
/// one-hot maps in `maps` (each of `shape`).
pub fn random_binary_operator(rng: &mut SplitMix64, maps: &mut [f32], channels: usize, shape: [usize; 3]) {
    let n: usize = shape.iter().product();
    for a in shuffled(rng, channels) {
        if rng.uniform(0.0, 1.0) >= 0.5 {
            continue;
        }
        let op = rng.below(4);
        let radius = rng.uniform(1.0, 8.0);
        let before: Vec<bool> = maps[a * n..(a + 1) * n].iter().map(|&v| v != 0.0).collect();
        if !before.iter().any(|&v| v) {
            continue; // every operator leaves an empty mask empty
        }
        let k = ball(radius);
        let after = match op {
            0 => dilate(&before, shape, &k),
            1 => erode(&before, shape, &k),
            2 => close(&before, shape, &k),
            _ => open(&before, shape, &k),
        };
        for other in (0..channels).filter(|&o| o != a) {
            for (i, v) in maps[other * n..(other + 1) * n].iter_mut().enumerate() {
                if after[i] && !before[i] {
                    *v = 0.0;
                }
            }
        }
        for (v, &s) in maps[a * n..(a + 1) * n].iter_mut().zip(&after) {
            *v = f32::from(u8::from(s));
        }
    }
}

/// `RemoveRandomConnectedComponentFromOneHotEncodingTransform(fill_with_other_class_p=0,
/// dont_do_if_covers_more_than_x_percent=0.15, p_per_label=0.5)`: per chosen label, one of its
/// 26-connected components under 15 % of the patch, drawn uniformly, is cleared.
pub fn remove_random_component(rng: &mut SplitMix64, maps: &mut [f32], channels: usize, shape: [usize; 3]) {
    let n: usize = shape.iter().product();
    for a in shuffled(rng, channels) {
        if rng.uniform(0.0, 1.0) >= 0.5 {
            continue;
        }
        let map = &mut maps[a * n..(a + 1) * n];
        if !map.iter().any(|&v| v != 0.0) {
            continue;
        }
        let mask: Vec<u16> = map.iter().map(|&v| u16::from(v != 0.0)).collect();
        let (ids, comps) = components(&mask, shape, &|v| v == 1, &|_, _| true);
        let small: Vec<u32> = comps.iter().enumerate().filter(|(_, c)| (c.1 as f64) < n as f64 * 0.15).map(|(i, _)| i as u32).collect();
        if small.is_empty() {
            continue;
        }
        let pick = small[rng.below(small.len() as u64) as usize];
        for (v, &id) in map.iter_mut().zip(&ids) {
            if id == pick {
                *v = 0.0;
            }
        }
    }
}

/// The cascade's training perturbations of the one-hot previous stage: the binary operators
/// with p 0.4, then the component removal with p 0.2.
pub fn perturb(rng: &mut SplitMix64, maps: &mut [f32], channels: usize, shape: [usize; 3]) {
    if rng.uniform(0.0, 1.0) < 0.4 {
        random_binary_operator(rng, maps, channels, shape);
    }
    if rng.uniform(0.0, 1.0) < 0.2 {
        remove_random_component(rng, maps, channels, shape);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stage_segmentations_round_trip_and_mismatches_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("fold_0"), dir.path().join("fold_1"));
        let seg: Vec<i16> = (0..24).map(|i| (i % 3) as i16).collect();
        save_next_stage(&b, "case_7", &seg, [2, 3, 4]).unwrap();
        let dirs = [a.clone(), b.clone()];
        assert_eq!(load_previous_stage(&dirs, "case_7", [2, 3, 4], &[1, 2]).unwrap(), seg);
        let e = load_previous_stage(&dirs, "case_7", [2, 3, 4], &[1]).unwrap_err().to_string();
        assert!(e.contains("case_7_seg.i16") && e.contains("holds label 2"), "{e}");
        assert_eq!(run_of(&next_stage_dir(Path::new("runs/lo0"), "3d_cascade_fullres")), Some(Path::new("runs/lo0")));
        assert_eq!(run_of(Path::new("runs/lo0")), None);
        let e = load_previous_stage(&dirs, "case_7", [2, 4, 3], &[1, 2]).unwrap_err().to_string();
        assert!(e.contains("[2, 3, 4]") && e.contains("[2, 4, 3]") && e.contains("case_7.json"), "{e}");
        let e = load_previous_stage(&dirs, "case_8", [2, 3, 4], &[1, 2]).unwrap_err().to_string();
        assert!(e.contains("case_8") && e.contains("3d_lowres"), "{e}");
        std::fs::write(b.join("case_7_seg.i16"), [0u8; 10]).unwrap();
        let e = load_previous_stage(&dirs, "case_7", [2, 3, 4], &[1, 2]).unwrap_err().to_string();
        assert!(e.contains("case_7_seg.i16") && e.contains("10 bytes"), "{e}");
    }

    #[test]
    fn labels_outside_the_models_are_named() {
        assert!(check_labels(&[-1, 0, 1, 2], &[1, 2], "a", Path::new("f")).is_ok());
        let e = check_labels(&[0, 7], &[1, 2], "a", Path::new("f.nii.gz")).unwrap_err().to_string();
        assert!(e.contains("label 7") && e.contains("1..=2") && e.contains("f.nii.gz") && e.contains("`a`"), "{e}");
    }

    #[test]
    fn one_hot_marks_each_foreground_label() {
        let seg = [0i16, 1, 2, 2, 5];
        assert_eq!(one_hot(&seg, &[1, 2]), vec![0., 1., 0., 0., 0., 0., 0., 1., 1., 0.]);
    }

    /// Two labels side by side in a 12³ patch.
    fn two_labels() -> (Vec<f32>, [usize; 3]) {
        let shape = [12, 12, 12];
        let seg: Vec<i16> = (0..1728).map(|i| {
            let (z, y, x) = (i / 144, i / 12 % 12, i % 12);
            if (3..9).contains(&z) && (3..9).contains(&y) { if x < 6 { 1 } else { 2 } } else { 0 }
        }).collect();
        (one_hot(&seg, &[1, 2]), shape)
    }

    #[test]
    fn binary_operators_keep_the_maps_binary_and_exclusive() {
        let (orig, shape) = two_labels();
        let mut changed = 0;
        for seed in 0..40 {
            let mut maps = orig.clone();
            random_binary_operator(&mut SplitMix64::new(seed), &mut maps, 2, shape);
            assert!(maps.iter().all(|&v| v == 0.0 || v == 1.0));
            // What one label gains, the other loses: no voxel ends up in both, unless it was.
            for i in 0..1728 {
                assert!(maps[i] + maps[1728 + i] <= 1.0, "seed {seed}: voxel {i} in both labels");
            }
            changed += usize::from(maps != orig);
        }
        assert!(changed > 20, "labels were changed in only {changed} of 40 draws");
    }

    #[test]
    fn component_removal_clears_one_small_component() {
        let shape = [10, 10, 10];
        let mut maps = vec![0f32; 1000];
        maps[0] = 1.0; // a one-voxel component
        for i in [555, 556, 565, 566] {
            maps[i] = 1.0; // a four-voxel one
        }
        let mut cleared = [0; 2];
        for seed in 0..200 {
            let mut m = maps.clone();
            remove_random_component(&mut SplitMix64::new(seed), &mut m, 1, shape);
            let left = m.iter().filter(|&&v| v == 1.0).count();
            match left {
                5 => {}
                4 => cleared[0] += 1,
                1 => cleared[1] += 1,
                _ => panic!("seed {seed}: {left} voxels left"),
            }
        }
        // p 0.5 per label, then either component with p 1/2.
        assert!(cleared.iter().all(|&c| c > 25), "{cleared:?}");
        // A component of 15 % of the patch or more is never removed.
        let mut big = vec![1f32; 1000];
        big[999] = 0.0;
        for seed in 0..20 {
            let mut m = big.clone();
            remove_random_component(&mut SplitMix64::new(seed), &mut m, 1, shape);
            assert_eq!(m, big);
        }
    }
}
