//! nnFormer against the authors' code (`tests/fixtures/make_nnformer_fixture.py`): forward
//! parity of all three deep-supervision outputs through shifted, masked and shrunk windows and
//! skip attention, the state-dict key order, and the exact parameter and FLOP counts of the
//! authors' Synapse network.

use stu_engine::model::SegNet;
use stu_engine::{Tensor, TensorData};
use tests::{fixture_weights, own_fixtures, pattern, read_tensor, rel_max_err};

fn fixture() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(own_fixtures().join("nnformer.json")).unwrap()).unwrap()
}

fn tiny() -> zoo::nnformer::NnFormerArch {
    zoo::nnformer::NnFormerArch {
        in_channels: 1,
        num_classes: 2,
        crop_size: [32, 64, 64],
        embedding_dim: 12,
        depths: vec![2; 4],
        num_heads: vec![1, 2, 4, 8],
        patch_size: [2, 4, 4],
        window_size: vec![4, 4, 8, 4],
        deep_supervision: true,
    }
}

#[test]
fn nnformer_matches_the_authors_code() {
    zoo::link();
    let doc = fixture();
    let file = own_fixtures().join("nnformer_tiny.safetensors");
    let arch = tiny();
    let generated: Vec<String> = serde_json::from_value(doc["generated"].clone()).unwrap();
    let dict = fixture_weights(&file, &arch.keys().into_iter().collect(), &generated);
    // The reference's weights do not hold the crop size: our checkpoints record it, as here.
    let meta = serde_json::json!({"model": {"options": {"crop_size": [32, 64, 64], "window_size": [4, 4, 8, 4]}}});
    let dict = dict.with_metadata("stu_checkpoint", meta.to_string());
    let device = stu_engine::backend::Backend::Flex.device().unwrap();
    let net = zoo::nnformer::NnFormer::from_state_dict(&dict, &device).unwrap();
    assert_eq!(net.arch, arch);
    let x = Tensor::<5>::from_data(TensorData::new(pattern(32 * 64 * 64, 0.5, 0.37), [1, 1, 32, 64, 64]), &device);
    let outs = net.forward_ds(x.clone());
    assert_eq!(outs.len(), 3);
    for (i, out) in outs.into_iter().enumerate() {
        let (shape, want) = read_tensor(&file, &format!("output.{i}"));
        assert_eq!(out.dims().to_vec(), shape, "output {i}");
        let err = rel_max_err(&stu_engine::ops::to_vec(out), &want);
        assert!(err <= 1e-4, "output {i}: max|out − ref| / max|ref| = {err:e}");
    }
    let (_, want) = read_tensor(&file, "output.0");
    assert!(rel_max_err(&stu_engine::ops::to_vec(net.forward(x)), &want) <= 1e-4);
    // The export writes the reference's keys in its order, buffers included.
    let keys: Vec<String> = net.state_dict().into_iter().map(|t| t.name).collect();
    let want: Vec<String> = serde_json::from_value(doc["tiny_keys"].clone()).unwrap();
    assert_eq!(keys, want);
}

#[test]
fn nnformer_counts_equal_the_authors_code() {
    let doc = fixture();
    let d = &doc["synapse"];
    let arch = zoo::nnformer::default_arch();
    let device = stu_engine::backend::Backend::Flex.device().unwrap();
    let fresh = zoo::nnformer::NnFormer::new(&arch, &device).unwrap();
    // Synapse configuration (embedding 192, depths 2-2-2-2, heads 6-12-24-48, patch 2×4×4,
    // windows 4-4-8-4, deep supervision), 1 channel, 105 classes, crop 128³.
    assert_eq!(SegNet::num_params(&fresh) as u64, d["params"].as_u64().unwrap());
    assert_eq!(d["params"].as_u64().unwrap(), 153_968_211);
    assert_eq!(arch.keys().len() as u64, d["state_dict_tensors"].as_u64().unwrap());
    assert_eq!(2 * arch.macs(), d["flops_128"].as_u64().unwrap());
}

#[test]
fn nnformer_rejects_what_the_reference_cannot_build() {
    let mut a = tiny();
    a.patch_size = [4, 4, 4];
    assert!(a.validate().unwrap_err().contains("patch_size"));
    let mut a = tiny();
    a.crop_size = [24, 64, 64];
    assert!(a.validate().unwrap_err().contains("crop_size"));
}

#[test]
fn nnformer_trains_and_predicts_through_the_same_commands() {
    let options = r#"{"crop_size": [32, 32, 32], "embedding_dim": 12, "num_heads": [1, 2, 4, 8]}"#;
    let (tmp, info) = tests::train_on_shared_mr(tests::stu_bin!(), "nnformer", options, "32,32,32", true);
    assert_eq!(info["embedding_dim"], 12);
    assert_eq!(info["crop_size"], serde_json::json!([32, 32, 32]));
    // Exported under the reference's keys, the network still knows its crop (file metadata).
    let (ck, out) = (tmp.path().join("run/checkpoint_final.safetensors"), tmp.path().join("export.safetensors"));
    let run = |args: &[&std::ffi::OsStr]| std::process::Command::new(tests::stu_bin!()).args(args).output().unwrap();
    assert!(run(&["export".as_ref(), "--checkpoint".as_ref(), ck.as_os_str(), "--output".as_ref(), out.as_os_str()]).status.success());
    let o = run(&["inspect".as_ref(), "--checkpoint".as_ref(), out.as_os_str()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let exported: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(exported["crop_size"], serde_json::json!([32, 32, 32]));
}
