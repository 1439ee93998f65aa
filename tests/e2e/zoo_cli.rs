//! `stu zoo --json` prints the exact counts of stunet.md §2.1 and §2.3.

use std::process::Command;

use tests::stu_bin;

#[test]
fn zoo_json_has_the_exact_counts() {
    let out = Command::new(stu_bin!()).args(["zoo", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let plain = rows.iter().find(|r| r["name"] == "nnunet-plainconv").expect("nnU-Net's PlainConvUNet is listed");
    assert_eq!(plain["params"].as_u64(), Some(31_278_509)); // tests/fixtures/plainconv.json
    let unetr = rows.iter().find(|r| r["name"] == "unetr").expect("UNETR is listed");
    assert_eq!(unetr["params"].as_u64(), Some(93_031_353)); // tests/fixtures/unetr.json
    assert_eq!(unetr["macs_128"].as_u64(), Some(358_831_095_808 / 2));
    let swin = rows.iter().find(|r| r["name"] == "swinunetr").expect("SwinUNETR is listed");
    assert_eq!(swin["params"].as_u64(), Some(15_705_579)); // tests/fixtures/swinunetr.json
    assert_eq!(swin["macs_128"].as_u64(), Some(409_381_659_264 / 2));
    let nnformer = rows.iter().find(|r| r["name"] == "nnformer").expect("nnFormer is listed");
    assert_eq!(nnformer["params"].as_u64(), Some(153_968_211)); // tests/fixtures/nnformer.json
    assert_eq!(nnformer["macs_128"].as_u64(), Some(947_040_288_768 / 2));
    let got: Vec<(String, u64, u64)> = rows
        .iter()
        .filter(|r| r["name"].as_str().unwrap().starts_with("stunet"))
        .map(|r| (r["name"].as_str().unwrap().to_string(), r["params"].as_u64().unwrap(), r["macs_128"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            ("stunet-s".to_string(), 14_596_941, 129_941_676_544),
            ("stunet-b".to_string(), 58_262_669, 507_120_804_352),
            ("stunet-l".to_string(), 440_302_605, 3_805_729_317_376),
            ("stunet-h".to_string(), 1_457_326_221, 12_597_678_727_680),
        ]
    );
    let text = Command::new(stu_bin!()).arg("zoo").output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("1,457,326,221"));
}

/// `stu init` writes a freshly initialised model that the other commands read as any
/// checkpoint: STU-Net-S with 105 classes has S's exact parameter count, its architecture is
/// recognised from the keys, seeds differ, and bad options are named.
#[test]
fn init_writes_a_model_the_other_commands_read() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    let init = |seed: &str, out: &str| Command::new(stu_bin!()).args(["init", "--classes", "105", "--options", r#"{"preset": "stunet-s"}"#, "--seed", seed, "--out", &path(out)]).output().unwrap();
    for (seed, out) in [("0", "a.safetensors"), ("1", "b.safetensors")] {
        let r = init(seed, out);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(String::from_utf8_lossy(&r.stderr).contains("14596941 parameters"));
    }
    let inspect = Command::new(stu_bin!()).args(["inspect", "--checkpoint", &path("a.safetensors")]).output().unwrap();
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!((v["dims"][0].as_u64(), v["num_classes"].as_u64()), (Some(16), Some(105)), "{v}");
    assert_ne!(std::fs::read(path("a.safetensors")).unwrap(), std::fs::read(path("b.safetensors")).unwrap(), "another seed, other weights");
    let bad = Command::new(stu_bin!()).args(["init", "--classes", "3", "--options", r#"{"preset": "stunet-x"}"#, "--out", &path("c.safetensors")]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("stunet-x") && !tmp.path().join("c.safetensors").exists());
    let garbled = Command::new(stu_bin!()).args(["init", "--classes", "3", "--options", "{preset", "--out", &path("c.safetensors")]).output().unwrap();
    assert!(!garbled.status.success() && String::from_utf8_lossy(&garbled.stderr).contains("--options: not JSON") && !tmp.path().join("c.safetensors").exists());
    // The model predicts; an unknown export mode is named before any case is read.
    let images = tests::shared().join("data/Dataset802_TotalSegExampleMR/imagesTr");
    let r = Command::new(stu_bin!()).args(["predict", "-i", images.to_str().unwrap(), "-o", &path("pred"), "--checkpoint", &path("a.safetensors")]).env("STU_EXPORT", "bogus").output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("STU_EXPORT=`bogus`: expected `whole` or `slabs`") && !tmp.path().join("pred/ts_mr_sm.nii.gz").exists(), "{err}");
}
