//! SwinUNETR against MONAI 1.6.1 (`tests/fixtures/make_swinunetr_fixture.py`): forward parity
//! through shifted, padded and shrunk windows, the state-dict key order, and the exact parameter
//! count of MONAI's default network.

use stu_engine::checkpoint::{NamedTensor, StateDict};
use stu_engine::model::SegNet;
use stu_engine::{Tensor, TensorData};
use tests::{own_fixtures, read_tensor, rel_max_err};

fn fixture() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(own_fixtures().join("swinunetr.json")).unwrap()).unwrap()
}

/// `scale · sin(freq · i)` over the flat index, in f64, stored as f32 (as the fixture script).
fn pattern(n: usize, scale: f64, freq: f64) -> Vec<f32> {
    (0..n).map(|i| (scale * (freq * i as f64).sin()) as f32).collect()
}

#[test]
fn swinunetr_matches_monai() {
    zoo::link();
    let doc = fixture();
    let file = own_fixtures().join("swinunetr_tiny.safetensors");
    let stored = StateDict::open(&file).unwrap();
    let arch = zoo::swinunetr::SwinArch {
        in_channels: 1,
        num_classes: 1,
        feature_size: 12,
        depths: vec![2, 2, 1, 1],
        num_heads: vec![3, 6, 12, 24],
    };
    let shapes: std::collections::HashMap<String, Vec<usize>> = arch.keys().into_iter().collect();
    let generated: Vec<String> = serde_json::from_value(doc["generated"].clone()).unwrap();
    let mut tensors = Vec::new();
    for key in stored.keys().filter_map(|k| k.strip_prefix("weights.")) {
        let shape = stored.shape(&format!("weights.{key}")).unwrap().to_vec();
        tensors.push(NamedTensor { name: key.to_string(), data: stored.read(&format!("weights.{key}"), &shape).unwrap(), shape });
    }
    for key in &generated {
        let shape = shapes[key].clone();
        tensors.push(NamedTensor { name: key.clone(), data: pattern(shape.iter().product(), 0.02, 0.7), shape });
    }
    let dict = StateDict::from_tensors(&file, tensors);
    let device = stu_engine::backend::Backend::Flex.device().unwrap();
    let net = zoo::swinunetr::SwinUnetr::from_state_dict(&dict, &device).unwrap();
    let x = Tensor::<5>::from_data(TensorData::new(pattern(64 * 64 * 64, 0.5, 0.37), [1, 1, 64, 64, 64]), &device);
    let ours = stu_engine::ops::to_vec(net.forward(x));
    let (_, want) = read_tensor(&file, "output.0");
    let err = rel_max_err(&ours, &want);
    assert!(err <= 1e-4, "max|out − ref| / max|ref| = {err:e}");
    // The export writes MONAI's keys in its order, buffers included.
    let keys: Vec<String> = net.state_dict().into_iter().map(|t| t.name).collect();
    let want: Vec<String> = serde_json::from_value(doc["tiny_keys"].clone()).unwrap();
    assert_eq!(keys, want);
}

#[test]
fn swinunetr_counts_equal_monai() {
    let doc = fixture();
    let d = &doc["default"];
    let arch = zoo::swinunetr::default_arch();
    let device = stu_engine::backend::Backend::Flex.device().unwrap();
    let fresh = zoo::swinunetr::SwinUnetr::new(&arch, &device).unwrap();
    assert_eq!(SegNet::num_params(&fresh) as u64, d["params"].as_u64().unwrap());
    assert_eq!(d["params"].as_u64().unwrap(), 15_705_579);
    assert_eq!(arch.keys().len() as u64, d["state_dict_tensors"].as_u64().unwrap());
    assert_eq!(2 * arch.macs(128), d["flops_128"].as_u64().unwrap());
}

#[test]
fn swinunetr_trains_through_stu_train() {
    use std::process::Command;
    let run = |args: &[&str]| {
        let o = Command::new(tests::stu_bin!()).args(args).output().unwrap();
        assert!(o.status.success(), "stu {args:?}:\n{}", String::from_utf8_lossy(&o.stderr));
        o
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let raw = tests::shared().join("data/Dataset802_TotalSegExampleMR");
    let raw_s = raw.to_str().unwrap();
    run(&["plan", raw_s, "--out", &t("plans/plans.json")]);
    run(&["preprocess", raw_s, "--plans", &t("plans/plans.json"), "--out", &t("pre")]);
    run(&[
        "train", &t("pre"), "--out", &t("run"), "--fold", "all", "--model", "swinunetr",
        "--model-options", r#"{"feature_size": 12, "depths": [2, 2, 1, 1]}"#,
        "--epochs", "2", "--iterations", "2", "--val-iterations", "0", "--patch-size", "32,32,32",
    ]);
    let losses: Vec<f64> = tests::logged_losses(&tmp.path().join("run")).into_iter().flatten().collect();
    assert_eq!(losses.len(), 4);
    assert!(losses.iter().all(|l| l.is_finite()));
    let info = run(&["inspect", "--checkpoint", &t("run/checkpoint_final.safetensors")]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["model"], "swinunetr");
    // Predicts in the input's geometry with the run's plan.
    let images = raw.join("imagesTr");
    run(&["predict", "-i", images.to_str().unwrap(), "-o", &t("pred"), "--checkpoint", &t("run/checkpoint_final.safetensors"), "--disable-tta"]);
    let input = stu_data::nifti_io::read_geometry(&images.join("ts_mr_sm_0000.nii.gz")).unwrap();
    let out = stu_data::nifti_io::read_label(&tmp.path().join("pred/ts_mr_sm.nii.gz")).unwrap();
    assert_eq!(out.geom.shape, input.shape);
}
