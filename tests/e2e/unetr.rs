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
    // An input twice as large (a multiple of its size) is refused, not a panic in the forward.
    let (shape, _) = read_tensor(&file, "input");
    let big: Vec<usize> = shape.iter().enumerate().map(|(i, &n)| if i >= 2 { 2 * n } else { n }).collect();
    let bytes = vec![0u8; 4 * big.iter().product::<usize>()];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, big.clone(), &bytes).unwrap();
    let input = dir.path().join("big.safetensors");
    std::fs::write(&input, safetensors::serialize([("input", view)], None).unwrap()).unwrap();
    let err = forward(&ForwardOptions {
        model: ModelSource { checkpoint: file.clone(), model: None, strides: StrideSource::Default, backend: stu_engine::backend::Backend::Flex },
        input: input.clone(),
        input_key: "input".into(),
        output: dir.path().join("big.out.safetensors"),
        precision: Default::default(),
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("was built for") && format!("{err:#}").contains("big.safetensors"), "{err:#}");
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
fn unetr_trains_and_predicts_through_the_same_commands() {
    // A small UNETR (MONAI's 12 heads) whose input size is the training patch.
    let options = r#"{"img_size": 32, "feature_size": 4, "hidden_size": 24, "mlp_dim": 32}"#;
    let (tmp, info) = tests::train_on_shared_mr(tests::stu_bin!(), "unetr", options, "32,32,32", true);
    assert_eq!(info["img_size"], 32);
    // Another patch (a multiple of its 32³) is refused before training, not by a panic in the
    // first forward.
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let out = std::process::Command::new(tests::stu_bin!())
        .args(["train", &t("pre"), "--out", &t("run64"), "--fold", "all", "--model", "unetr", "--model-options", options, "--epochs", "1", "--iterations", "1", "--val-iterations", "0", "--patch-size", "64,64,64"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("patch [64, 64, 64]: `unetr` was built for [32, 32, 32] inputs only") && !err.contains("panicked"), "{err}");
}
