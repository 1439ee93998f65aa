//! UNETR against MONAI 1.6.1 (`tests/fixtures/make_unetr_fixture.py`): forward parity, the
//! state-dict key order, and the exact parameter and FLOP counts of MONAI's default network.

use stu_engine::model::{LoadOptions, SegNet};
use stu_harness::forward::{ForwardOptions, ModelSource, StrideSource, forward};
use tests::{own_fixtures, read_tensor, rel_max_err};

fn fixture() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(own_fixtures().join("unetr.json")).unwrap()).unwrap()
}

#[test]
fn unetr_matches_monai() {
    let file = own_fixtures().join("unetr_tiny.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    forward(&ForwardOptions {
        model: ModelSource { checkpoint: file.clone(), model: None, strides: StrideSource::Default, backend: stu_engine::backend::Backend::Flex },
        input: file.clone(),
        input_key: "input".into(),
        output: out.clone(),
        precision: Default::default(),
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let (s, ours) = read_tensor(&out, "output.0");
    let (s_ref, want) = read_tensor(&file, "output.0");
    assert_eq!(s, s_ref);
    let err = rel_max_err(&ours, &want);
    assert!(err <= 1e-4, "max|out − ref| / max|ref| = {err:e}");
}

#[test]
fn unetr_keys_and_counts_equal_monai() {
    zoo::link();
    let doc = fixture();
    let device = stu_engine::backend::Backend::Flex.device().unwrap();
    let net = stu_engine::model::load_checkpoint(&own_fixtures().join("unetr_tiny.safetensors"), None, &LoadOptions::default(), &device).unwrap();
    assert_eq!(net.family(), "unetr");
    let ours: Vec<String> = net.state_dict().into_iter().map(|t| t.name).collect();
    let want: Vec<String> = serde_json::from_value(doc["tiny_keys"].clone()).unwrap();
    assert_eq!(ours, want);
    // MONAI's default UNETR for 1 channel, 105 classes, 128³.
    let arch = zoo::unetr::default_arch();
    let d = &doc["default"];
    let fresh = zoo::unetr::Unetr::new(&arch, &device).unwrap();
    assert_eq!(SegNet::num_params(&fresh) as u64, d["params"].as_u64().unwrap());
    assert_eq!(d["params"].as_u64().unwrap(), 93_031_353);
    assert_eq!(arch.keys().len() as u64, d["state_dict_tensors"].as_u64().unwrap());
    assert_eq!(2 * arch.macs(), d["flops_128"].as_u64().unwrap());
}

#[test]
fn unetr_trains_through_stu_train() {
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
    // A small UNETR (MONAI's 12 heads) whose input size is the training patch.
    run(&[
        "train", &t("pre"), "--out", &t("run"), "--fold", "all", "--model", "unetr",
        "--model-options", r#"{"img_size": 32, "feature_size": 4, "hidden_size": 24, "mlp_dim": 32}"#,
        "--epochs", "2", "--iterations", "2", "--val-iterations", "0", "--patch-size", "32,32,32",
    ]);
    let losses: Vec<f64> = tests::logged_losses(&tmp.path().join("run")).into_iter().flatten().collect();
    assert_eq!(losses.len(), 4);
    assert!(losses.iter().all(|l| l.is_finite()));
    let info = run(&["inspect", "--checkpoint", &t("run/checkpoint_final.safetensors")]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!((v["model"].as_str(), v["img_size"].as_u64()), (Some("unetr"), Some(32)));
}
