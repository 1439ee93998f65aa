//! nnU-Net's ResidualEncoderUNet (the ResEnc presets) against its reference implementation
//! (dynamic_network_architectures 0.4.4): forward parity through two containers, the state-dict
//! key order, the exact parameter and FLOP counts of the ResEnc M network for a 128³ patch
//! (`tests/fixtures/make_resenc_fixture.py`), and that checkpoints of either nnU-Net network
//! are told apart.

use stu_engine::model::{LoadOptions, SegNet};
use tests::own_fixtures;

fn fixture() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(own_fixtures().join("resenc.json")).unwrap()).unwrap()
}

#[test]
fn resenc_matches_the_reference_in_both_containers() {
    let n = tests::forward_parity(&["resenc_tiny.safetensors", "resenc_tiny_nnunetv2.pth"], "resenc_tiny.safetensors", 1e-4);
    assert_eq!(n, fixture()["tiny"]["outputs"].as_array().unwrap().len());
    assert_eq!(n, 3);
}

#[test]
fn resenc_keys_and_counts_equal_the_reference() {
    zoo::link();
    let doc = fixture();
    let device = stu_engine::backend::Backend::Flex.device().unwrap();
    // Recognised from its keys (which include every key PlainConvUNet's anchor names), and a
    // PlainConvUNet checkpoint still as PlainConvUNet.
    let net = stu_engine::model::load_checkpoint(&own_fixtures().join("resenc_tiny_nnunetv2.pth"), None, &LoadOptions::default(), &device).unwrap();
    assert_eq!(net.family(), "nnunet-resenc");
    let plain = stu_engine::model::load_checkpoint(&own_fixtures().join("plainconv_tiny_nnunetv2.pth"), None, &LoadOptions::default(), &device).unwrap();
    assert_eq!(plain.family(), "nnunet-plainconv");
    // The export writes the reference's keys in its order, duplicate registrations included.
    let ours: Vec<String> = net.state_dict().into_iter().map(|t| t.name).collect();
    let want: Vec<String> = serde_json::from_value(doc["tiny_keys"].clone()).unwrap();
    assert_eq!(ours, want);
    // ResEnc M for 1 channel, 105 classes, 128³ (configuration in the JSON).
    let arch = zoo::resenc::default_arch();
    let d = &doc["resenc_m"];
    assert_eq!(arch.features, serde_json::from_value::<Vec<usize>>(d["features_per_stage"].clone()).unwrap());
    assert_eq!(arch.n_blocks, serde_json::from_value::<Vec<usize>>(d["n_blocks_per_stage"].clone()).unwrap());
    let fresh = zoo::resenc::ResEncUNet::new(&arch, &device).unwrap();
    assert_eq!(SegNet::num_params(&fresh) as u64, d["params"].as_u64().unwrap());
    assert_eq!(d["params"].as_u64().unwrap(), 102_432_685);
    assert_eq!(arch.keys().len() as u64, d["state_dict_tensors"].as_u64().unwrap());
    assert_eq!(2 * arch.macs([128; 3]).weights, d["flops_128_deep_supervision"].as_u64().unwrap());
    // Loaded as PlainConvUNet, a ResEnc checkpoint is refused with a key named.
    let err = stu_engine::model::load_checkpoint(&own_fixtures().join("resenc_tiny.safetensors"), Some("nnunet-plainconv"), &LoadOptions::default(), &device).err().unwrap().to_string();
    assert!(err.contains("encoder.stages"), "{err}");
}

#[test]
fn resenc_trains_and_predicts_through_the_same_commands() {
    let (tmp, info) = tests::train_on_shared_mr(tests::stu_bin!(), "nnunet-resenc", r#"{"base_width": 4, "max_width": 8, "blocks": 2}"#, "16,32,32", true);
    assert_eq!(info["features"][0], 4);
    let bad = std::process::Command::new(tests::stu_bin!())
        .args(["train", tmp.path().join("pre").to_str().unwrap(), "--out", tmp.path().join("bad").to_str().unwrap(), "--fold", "all", "--model", "nnunet-resenc", "--model-options", r#"{"n_block": [1]}"#])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("n_block"), "{}", String::from_utf8_lossy(&bad.stderr));
}

#[test]
fn resenc_planner_presets_write_nnunets_resenc_plans() {
    // `stu plan --preset resenc-m|l|xl` (nnUNetPlannerResEncM/L/XL; their rules are checked
    // against nnU-Net 2.8.1 in `stu_data::plan`'s test vectors) on the real MR case.
    let tmp = tempfile::tempdir().unwrap();
    let raw = tests::shared().join("data/Dataset802_TotalSegExampleMR");
    let mut patches = Vec::new();
    for (preset, name) in [("resenc-m", "nnUNetResEncUNetMPlans"), ("resenc-l", "nnUNetResEncUNetLPlans"), ("resenc-xl", "nnUNetResEncUNetXLPlans")] {
        let out = tmp.path().join(format!("{preset}/plans.json"));
        let o = std::process::Command::new(tests::stu_bin!()).args(["plan", raw.to_str().unwrap(), "--preset", preset, "--out", out.to_str().unwrap()]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let plans: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let c = &plans["configurations"]["3d_fullres"];
        assert_eq!(plans["plans_name"], name);
        assert_eq!(c["UNet_class_name"], "ResidualEncoderUNet");
        assert_eq!(c["data_identifier"], "nnUNetPlans_3d_fullres");
        let n = c["pool_op_kernel_sizes"].as_array().unwrap().len();
        assert_eq!(c["n_conv_per_stage_encoder"], serde_json::json!(stu_core::scaling::RESENC_BLOCKS[..n]));
        assert!(c["batch_size"].as_u64().unwrap() >= 2);
        patches.push(c["patch_size"].clone());
    }
    let o = std::process::Command::new(tests::stu_bin!()).args(["plan", raw.to_str().unwrap(), "--preset", "resenc-xxl", "--out", tmp.path().join("x.json").to_str().unwrap()]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("resenc-xl"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!patches.is_empty());
    // Preprocessed with a ResEnc plan, `stu train` without --model trains nnunet-resenc.
    let (plans, pre, run) = (tmp.path().join("resenc-m/plans.json"), tmp.path().join("pre"), tmp.path().join("run"));
    let stu = |args: &[&str]| {
        let o = std::process::Command::new(tests::stu_bin!()).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    stu(&["preprocess", raw.to_str().unwrap(), "--plans", plans.to_str().unwrap(), "--out", pre.to_str().unwrap()]);
    stu(&["train", pre.to_str().unwrap(), "--out", run.to_str().unwrap(), "--fold", "all", "--model-options", r#"{"base_width": 4, "max_width": 8}"#, "--epochs", "1", "--iterations", "1", "--val-iterations", "0", "--patch-size", "16,32,32"]);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("train.json")).unwrap()).unwrap();
    assert_eq!(cfg["model"], "nnunet-resenc");
}

