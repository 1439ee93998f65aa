//! nnU-Net's PlainConvUNet against its reference implementation (dynamic_network_architectures
//! 0.4.4): forward parity through two containers, the state-dict key order, the exact parameter
//! and FLOP counts of nnU-Net's default 3d_fullres network (`tests/fixtures/make_plainconv_fixture.py`).

use stu_engine::model::{LoadOptions, SegNet};
use tests::own_fixtures;

fn fixture() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(own_fixtures().join("plainconv.json")).unwrap()).unwrap()
}

#[test]
fn plainconv_matches_the_reference_in_both_containers() {
    let n = tests::forward_parity(&["plainconv_tiny.safetensors", "plainconv_tiny_nnunetv2.pth"], "plainconv_tiny.safetensors", 1e-4);
    assert_eq!(n, fixture()["tiny"]["outputs"].as_array().unwrap().len());
    assert_eq!(n, 3);
}

/// nnU-Net's `2d` network (Conv2d, InstanceNorm2d, ConvTranspose2d; `make_plainconv2d_fixture.py`)
/// loads as the 3-D network of depth-1 kernels and gives the reference's outputs on each slice.
#[test]
fn plainconv_2d_matches_the_reference_as_depth_one_3d() {
    let n = tests::forward_parity(&["plainconv2d_tiny.safetensors", "plainconv2d_tiny_nnunetv2.pth"], "plainconv2d_tiny.safetensors", 1e-4);
    assert_eq!(n, 3);
    zoo::link();
    let device = stu_engine::backend::Backend::Flex.device().unwrap();
    let net = stu_engine::model::load_checkpoint(&own_fixtures().join("plainconv2d_tiny_nnunetv2.pth"), None, &LoadOptions::default(), &device).unwrap();
    let d = net.describe();
    assert_eq!(d["kernels"], serde_json::json!([[1, 3, 3], [1, 3, 3], [1, 1, 3], [1, 3, 3]]));
    assert_eq!(d["strides"], serde_json::json!([[1, 1, 1], [1, 2, 2], [1, 2, 1], [1, 2, 2]]));
}

#[test]
fn plainconv_keys_and_counts_equal_the_reference() {
    zoo::link();
    let doc = fixture();
    let device = stu_engine::backend::Backend::Flex.device().unwrap();
    let net = stu_engine::model::load_checkpoint(&own_fixtures().join("plainconv_tiny_nnunetv2.pth"), None, &LoadOptions::default(), &device).unwrap();
    assert_eq!(net.family(), "nnunet-plainconv");
    // The export writes the reference's keys in its order, duplicate registrations included.
    let ours: Vec<String> = net.state_dict().into_iter().map(|t| t.name).collect();
    let want: Vec<String> = serde_json::from_value(doc["tiny_keys"].clone()).unwrap();
    assert_eq!(ours, want);
    // nnU-Net's default network for 1 channel, 105 classes, 128³ (configuration in the JSON).
    let arch = zoo::plainconv::default_arch();
    let d = &doc["default"];
    assert_eq!(arch.features, serde_json::from_value::<Vec<usize>>(d["features_per_stage"].clone()).unwrap());
    let fresh = zoo::plainconv::PlainConvUNet::new(&arch, &device).unwrap();
    assert_eq!(SegNet::num_params(&fresh) as u64, d["params"].as_u64().unwrap());
    assert_eq!(d["params"].as_u64().unwrap(), 31_278_509);
    assert_eq!(arch.keys().len() as u64, d["state_dict_tensors"].as_u64().unwrap());
    assert_eq!(2 * arch.macs([128; 3]).weights, d["flops_128_deep_supervision"].as_u64().unwrap());
    // A wrong shape is refused with the key named.
    let bad = own_fixtures().join("plainconv_tiny.safetensors");
    let err = stu_engine::model::load_checkpoint(&bad, Some("stunet"), &LoadOptions::default(), &device).err().unwrap().to_string();
    assert!(err.contains("conv_blocks_context"), "{err}");
}

#[test]
fn plainconv_trains_and_predicts_through_the_same_commands() {
    let (tmp, info) = tests::train_on_shared_mr(tests::stu_bin!(), "nnunet-plainconv", r#"{"base_width": 4, "max_width": 8}"#, "16,32,32", true);
    assert_eq!(info["features"][0], 4);
    // A misspelt size option names itself.
    let bad = std::process::Command::new(tests::stu_bin!())
        .args(["train", tmp.path().join("pre").to_str().unwrap(), "--out", tmp.path().join("bad").to_str().unwrap(), "--fold", "all", "--model", "nnunet-plainconv", "--model-options", r#"{"widht": 4}"#])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("widht"), "{}", String::from_utf8_lossy(&bad.stderr));
}
