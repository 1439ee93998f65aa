//! SwinUNETR against MONAI 1.6.1 (`tests/fixtures/make_swinunetr_fixture.py`): forward parity
//! through shifted, padded and shrunk windows, the state-dict key order, and the exact parameter
//! count of MONAI's default network.

use stu_engine::model::SegNet;
use stu_engine::{Tensor, TensorData};
use tests::{fixture_weights, own_fixtures, pattern, read_tensor, rel_max_err};

fn fixture() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(own_fixtures().join("swinunetr.json")).unwrap()).unwrap()
}

#[test]
fn swinunetr_matches_monai() {
    zoo::link();
    let doc = fixture();
    let file = own_fixtures().join("swinunetr_tiny.safetensors");
    let arch = zoo::swinunetr::SwinArch {
        in_channels: 1,
        num_classes: 1,
        feature_size: 12,
        depths: vec![2, 2, 1, 1],
        num_heads: vec![3, 6, 12, 24],
    };
    let generated: Vec<String> = serde_json::from_value(doc["generated"].clone()).unwrap();
    let dict = fixture_weights(&file, &arch.keys().into_iter().collect(), &generated);
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
fn swinunetr_trains_and_predicts_through_the_same_commands() {
    let (_tmp, info) = tests::train_on_shared_mr(tests::stu_bin!(), "swinunetr", r#"{"feature_size": 12, "depths": [2, 2, 1, 1]}"#, "32,32,32", true);
    assert_eq!(info["feature_size"], 12);
}
