//! Helpers for the end-to-end tests: where the shared fixtures are, and how to compare outputs.

use std::path::{Path, PathBuf};

use stu_engine::checkpoint::StateDict;

/// `../shared` beside the repository (CI has it there too).
pub fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// The parity fixtures folder.
pub fn parity_dir() -> PathBuf {
    shared().join("fixtures/stunet-parity")
}

/// This repository's own test fixtures (`tests/fixtures`).
pub fn own_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The `stu` command line as built for this test run (`src/bin/stu-under-test.rs`).
#[macro_export]
macro_rules! stu_bin {
    () => {
        env!("CARGO_BIN_EXE_stu-under-test")
    };
}

/// max|a − b| / max|b| over two equally long slices.
pub fn rel_max_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let err = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    err / scale.max(f64::MIN_POSITIVE)
}

/// Reads tensor `key` of a safetensors file with its shape.
pub fn read_tensor(path: &Path, key: &str) -> (Vec<usize>, Vec<f32>) {
    let dict = StateDict::open(path).unwrap_or_else(|e| panic!("{e}"));
    let shape = dict.shape(key).unwrap_or_else(|e| panic!("{e}")).to_vec();
    let data = dict.read(key, &shape).unwrap_or_else(|e| panic!("{e}"));
    (shape, data)
}

/// `stu forward` of each of `files` (own fixtures: the same weights in different containers,
/// the model recognised from the keys) on the `input` of `reference`: every `output.{i}` there
/// equals the reference's to `tol` relative, with the same shape. Returns how many outputs.
pub fn forward_parity(files: &[&str], reference: &str, tol: f64) -> usize {
    use stu_harness::forward::{ForwardOptions, ModelSource, StrideSource, forward};
    let reference = own_fixtures().join(reference);
    let bytes = std::fs::read(&reference).unwrap();
    let names = safetensors::SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(String::from).collect::<Vec<_>>();
    let n = (0..).take_while(|i| names.contains(&format!("output.{i}"))).count();
    let dir = tempfile::tempdir().unwrap();
    for file in files {
        let out = dir.path().join(format!("{file}.out.safetensors"));
        forward(&ForwardOptions {
            model: ModelSource { checkpoint: own_fixtures().join(file), model: None, strides: StrideSource::Default, backend: stu_engine::backend::Backend::Flex },
            input: reference.clone(),
            input_key: "input".into(),
            output: out.clone(),
            precision: Default::default(),
        })
        .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        for i in 0..n {
            let key = format!("output.{i}");
            let ((s, ours), (s_ref, want)) = (read_tensor(&out, &key), read_tensor(&reference, &key));
            assert_eq!(s, s_ref, "{file} {key}");
            let err = rel_max_err(&ours, &want);
            assert!(err <= tol, "{file} {key}: {err:e}");
        }
    }
    n
}

/// `scale · sin(freq · i)` over the flat index, in f64, stored as f32: how the fixture scripts
/// generate their input and their large tensors instead of storing them.
pub fn pattern(n: usize, scale: f64, freq: f64) -> Vec<f32> {
    (0..n).map(|i| (scale * (freq * i as f64).sin()) as f32).collect()
}

/// A reference network's state dict from a fixture file: its stored `weights.<key>` tensors plus
/// the `generated` ones (`0.02·sin(0.7·i)`, shaped by `shapes`).
pub fn fixture_weights(file: &Path, shapes: &std::collections::HashMap<String, Vec<usize>>, generated: &[String]) -> StateDict {
    let stored = StateDict::open(file).unwrap();
    let mut tensors = Vec::new();
    for key in stored.keys().filter_map(|k| k.strip_prefix("weights.")) {
        let shape = stored.shape(&format!("weights.{key}")).unwrap().to_vec();
        tensors.push(stu_engine::checkpoint::NamedTensor { name: key.to_string(), data: stored.read(&format!("weights.{key}"), &shape).unwrap(), shape });
    }
    for key in generated {
        let shape = shapes[key].clone();
        tensors.push(stu_engine::checkpoint::NamedTensor { name: key.clone(), data: pattern(shape.iter().product(), 0.02, 0.7), shape });
    }
    StateDict::from_tensors(file, tensors)
}

/// Writes a small preprocessed dataset (what `stu preprocess` produces) with `channels` image
/// channels and `labels` foreground labels: `cases` volumes of `shape`, nested spheres per
/// label, intensities that depend on the label and the channel, plus noise. Also writes
/// `dataset.json`, a `plans.json` (patch `patch`, batch 2, `strides` + stage 0) and nnU-Net's
/// 5-fold `splits_final.json`.
pub fn synthetic_preprocessed(dir: &Path, cases: usize, channels: usize, labels: usize, shape: [usize; 3], patch: [usize; 3], strides: &[[usize; 3]]) {
    use stu_data::preprocess::{CaseProperties, Preprocessed, save};
    std::fs::create_dir_all(dir).unwrap();
    let n: usize = shape.iter().product();
    let mut ids = Vec::new();
    for k in 0..cases {
        let mut rng = stu_core::rng::SplitMix64::new(100 + k as u64);
        let c = [shape[0] as f64 / 2.0 + rng.uniform(-2.0, 2.0), shape[1] as f64 / 2.0 + rng.uniform(-2.0, 2.0), shape[2] as f64 / 2.0 + rng.uniform(-2.0, 2.0)];
        let r0 = shape.iter().min().copied().unwrap() as f64 * 0.4;
        let seg: Vec<i16> = (0..n)
            .map(|i| {
                let p = [(i / (shape[1] * shape[2])) as f64, (i / shape[2] % shape[1]) as f64, (i % shape[2]) as f64];
                let d = ((p[0] - c[0]).powi(2) + (p[1] - c[1]).powi(2) + (p[2] - c[2]).powi(2)).sqrt();
                // Label l fills the shell between radii r0·(1 − l/(L+1)) and r0·(1 − (l−1)/(L+1)).
                let l = ((1.0 - d / r0) * (labels as f64 + 1.0)).ceil();
                l.clamp(0.0, labels as f64) as i16
            })
            .collect();
        let mut data = Vec::with_capacity(channels * n);
        for ch in 0..channels {
            for &l in &seg {
                data.push(l as f32 * (1.0 + ch as f32 * 0.5) / labels as f32 + rng.normal() as f32 * 0.1);
            }
        }
        let mut locations = Vec::new();
        let mut class_locations = std::collections::BTreeMap::new();
        let mut offset = 0;
        for l in 1..=labels as i16 {
            let locs: Vec<[u32; 3]> = (0..n).filter(|&i| seg[i] == l).map(|i| [(i / (shape[1] * shape[2])) as u32, (i / shape[2] % shape[1]) as u32, (i % shape[2]) as u32]).collect();
            class_locations.insert(l.to_string(), [offset, locs.len()]);
            offset += locs.len();
            locations.push((l, locs));
        }
        let id = format!("syn_{k:03}");
        let props = CaseProperties {
            id: id.clone(),
            shape: [channels, shape[0], shape[1], shape[2]],
            spacing: [1.0; 3],
            original_spacing: [1.0; 3],
            shape_before_cropping: shape,
            bbox_used_for_cropping: [[0, shape[0]], [0, shape[1]], [0, shape[2]]],
            shape_after_cropping_and_before_resampling: shape,
            affine: [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
            class_locations,
        };
        save(dir, &Preprocessed { data, seg, props, locations, region_locations: Vec::new() }).unwrap();
        ids.push(id);
    }
    let mut label_map = serde_json::Map::new();
    label_map.insert("background".into(), 0.into());
    for l in 1..=labels {
        label_map.insert(format!("shell_{l}"), l.into());
    }
    let channel_names: serde_json::Map<String, serde_json::Value> = (0..channels).map(|c| (c.to_string(), format!("mod{c}").into())).collect();
    let dataset = serde_json::json!({"channel_names": channel_names, "labels": label_map, "numTraining": cases, "file_ending": ".nii.gz"});
    std::fs::write(dir.join("dataset.json"), serde_json::to_string_pretty(&dataset).unwrap()).unwrap();
    let mut pools = vec![[1usize, 1, 1]];
    pools.extend_from_slice(strides);
    let plans = serde_json::json!({"configurations": {"3d_fullres": {"patch_size": patch, "batch_size": 2, "batch_dice": false, "pool_op_kernel_sizes": pools, "spacing": [1.0, 1.0, 1.0]}}});
    std::fs::write(dir.join("plans.json"), serde_json::to_string_pretty(&plans).unwrap()).unwrap();
    let folds = stu_data::splits::five_fold(&ids).unwrap();
    std::fs::write(dir.join("splits_final.json"), serde_json::to_string_pretty(&folds).unwrap()).unwrap();
}

/// The `train_losses` of every epoch in a run's `log.jsonl`.
pub fn logged_losses(run: &Path) -> Vec<Vec<f64>> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train_losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect())
        .collect()
}

/// With the `stu` binary `stu` (`stu_bin!()`), plans and preprocesses the shared MR case, trains `model` with `options` on it for 2×2
/// iterations at `patch`, checks the losses are finite, and (when `predict`) predicts the case
/// and checks the output's shape. Returns the run's folder (kept alive by the `TempDir`) and
/// `stu inspect` of the final checkpoint.
pub fn train_on_shared_mr(stu: &str, model: &str, options: &str, patch: &str, predict: bool) -> (tempfile::TempDir, serde_json::Value) {
    use std::process::Command;
    let run = |args: &[&str]| {
        let o = Command::new(stu).args(args).output().unwrap();
        assert!(o.status.success(), "stu {args:?}:\n{}", String::from_utf8_lossy(&o.stderr));
        o
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let raw = shared().join("data/Dataset802_TotalSegExampleMR");
    let raw_s = raw.to_str().unwrap();
    run(&["plan", raw_s, "--out", &t("plans/plans.json")]);
    run(&["preprocess", raw_s, "--plans", &t("plans/plans.json"), "--out", &t("pre")]);
    run(&[
        "train", &t("pre"), "--out", &t("run"), "--fold", "all", "--model", model, "--model-options", options,
        "--epochs", "2", "--iterations", "2", "--val-iterations", "0", "--patch-size", patch,
    ]);
    let losses: Vec<f64> = logged_losses(&tmp.path().join("run")).into_iter().flatten().collect();
    assert_eq!(losses.len(), 4);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let ck = t("run/checkpoint_final.safetensors");
    let info: serde_json::Value = serde_json::from_slice(&run(&["inspect", "--checkpoint", &ck]).stdout).unwrap();
    assert_eq!(info["model"], model);
    if predict {
        let images = raw.join("imagesTr");
        run(&["predict", "-i", images.to_str().unwrap(), "-o", &t("pred"), "--checkpoint", &ck, "--disable-tta"]);
        let input = stu_data::nifti_io::read_geometry(&images.join("ts_mr_sm_0000.nii.gz")).unwrap();
        let out = stu_data::nifti_io::read_label(&tmp.path().join("pred/ts_mr_sm.nii.gz")).unwrap();
        assert_eq!(out.geom.shape, input.shape);
    }
    (tmp, info)
}
