//! nnU-Net's cascade on the phantom: a plan with `3d_lowres` and `3d_cascade_fullres`, the first
//! stage's final validation writing its segmentations for the second, the second stage trained
//! and predicted with them as one-hot input channels, and the errors on the way.

use std::path::Path;
use std::process::{Command, Output};

use tests::stu_bin;

fn stu(args: &[&str]) -> Output {
    Command::new(stu_bin!()).args(args).output().expect("runs")
}

fn ok(args: &[&str]) -> Output {
    let out = stu(args);
    assert!(out.status.success(), "stu {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn fails(args: &[&str], needles: &[&str]) {
    let out = stu(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stu {args:?} should fail");
    for n in needles {
        assert!(err.contains(n), "stu {args:?}: `{n}` not in:\n{err}");
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

const TINY: &str = r#"{"depth":[1,1,1,1],"dims":[4,8,8,8]}"#;

#[test]
fn the_lowres_stage_feeds_the_cascade_stage_in_training_and_prediction() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    ok(&["phantom", "--cases", "5", "--test-cases", "1", "--out", &t("raw")]);
    // A small GPU memory target shrinks the patch until nnU-Net's planner adds a 3d_lowres.
    ok(&["plan", &t("raw"), "--out", &t("plans.json"), "--gpu-memory-gb", "0.1"]);
    let plans = json(&tmp.path().join("plans.json"));
    let confs = plans["configurations"].as_object().unwrap();
    assert!(confs.contains_key("3d_lowres") && confs.contains_key("3d_fullres"), "{:?}", confs.keys());
    assert_eq!(plans["configurations"]["3d_cascade_fullres"], serde_json::json!({"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}));
    assert_eq!(plans["configurations"]["3d_lowres"]["next_stage"], "3d_cascade_fullres");
    assert_eq!(plans["configurations"]["3d_fullres"]["batch_dice"], true);
    ok(&["preprocess", &t("raw"), "--plans", &t("plans.json"), "--configuration", "3d_lowres", "--out", &t("pre_lo")]);
    ok(&["preprocess", &t("raw"), "--plans", &t("plans.json"), "--out", &t("pre_full")]);
    // A folder keeps the configuration it was made for.
    fails(&["preprocess", &t("raw"), "--plans", &t("plans.json"), "--out", &t("pre_lo")], &["pre_lo", "`3d_lowres`", "not `3d_fullres`"]);
    fails(&["train", &t("pre_lo"), "--out", &t("wrong"), "--model-options", TINY], &["pre_lo", "--configuration 3d_lowres"]);

    // A start that fails leaves no run folder a retry would have to --resume.
    let (pre_lo, bad_out) = (t("pre_lo"), t("bad"));
    for bad in [&["--fold", "7"][..], &["--fold", "all", "--patch-size", "7,7,7"][..]] {
        let mut v = vec!["train", &pre_lo, "--configuration", "3d_lowres", "--out", &bad_out, "--model-options", TINY];
        v.extend_from_slice(bad);
        fails(&v, &[]);
        assert!(!tmp.path().join("bad").exists(), "{bad:?}");
    }

    // Stage 1 on fold `all`: its final validation writes every case for stage 2.
    let train_fold = |pre: &str, conf: &str, fold: &str, out: &str, extra: &[&str]| {
        let mut v = vec!["train", pre, "--configuration", conf, "--fold", fold, "--out", out, "--model-options", TINY, "--epochs", "1", "--iterations", "2", "--val-iterations", "0", "--seed", "3"];
        v.extend_from_slice(extra);
        ok(&v)
    };
    let train = |pre: &str, conf: &str, out: &str, extra: &[&str]| train_fold(pre, conf, "all", out, extra);
    train(&t("pre_lo"), "3d_lowres", &t("lo"), &[]);
    let next = tmp.path().join("lo/predicted_next_stage/3d_cascade_fullres");
    for id in ["phantom_000", "phantom_001", "phantom_002", "phantom_003", "phantom_004"] {
        let shape = &json(&tmp.path().join(format!("pre_full/{id}.json")))["shape"];
        assert_eq!(json(&next.join(format!("{id}.json")))["shape"], serde_json::json!(shape.as_array().unwrap()[1..]), "{id}: on the full-resolution grid");
        let seg = std::fs::read(next.join(format!("{id}_seg.i16"))).unwrap();
        let voxels: u64 = shape.as_array().unwrap()[1..].iter().map(|v| v.as_u64().unwrap()).product();
        assert_eq!(seg.len() as u64, 2 * voxels);
        assert!(seg.chunks_exact(2).all(|b| (0..=15).contains(&i16::from_le_bytes([b[0], b[1]]))));
    }

    // Stage 2 needs stage 1.
    fails(&["train", &t("pre_full"), "--configuration", "3d_cascade_fullres", "--fold", "all", "--out", &t("c0"), "--model-options", TINY], &["--previous-stage", "3d_lowres"]);
    fails(&["train", &t("pre_full"), "--fold", "all", "--out", &t("c1"), "--model-options", TINY, "--previous-stage", &t("lo")], &["no cascade stage"]);
    train(&t("pre_full"), "3d_cascade_fullres", &t("casc"), &["--previous-stage", &t("lo")]);
    let info: serde_json::Value = serde_json::from_slice(&ok(&["inspect", "--checkpoint", &t("casc/checkpoint_final.safetensors")]).stdout).unwrap();
    assert_eq!(info["in_channels"], 16, "the image and the 15 phantom labels one-hot");

    // On a fold, stage 1 validates its validation case and writes it for stage 2 from the same
    // logits; stage 2's final validation reads stage 1's segmentation on its grid.
    let splits = json(&tmp.path().join("pre_lo/splits_final.json"));
    let val = splits[0]["val"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect::<Vec<_>>();
    train_fold(&t("pre_lo"), "3d_lowres", "0", &t("lo0"), &[]);
    let written: Vec<String> = std::fs::read_dir(tmp.path().join("lo0/predicted_next_stage/3d_cascade_fullres")).unwrap().filter_map(|e| e.unwrap().file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(str::to_string)).filter(|n| n != "checkpoint" && n != "plans").collect();
    assert_eq!(written, val, "the validation cases only");
    assert!(tmp.path().join(format!("lo0/validation/{}.nii.gz", val[0])).exists());
    assert!(json(&tmp.path().join("lo0/validation/summary.json"))["foreground_mean"]["Dice"].is_number());
    train_fold(&t("pre_full"), "3d_cascade_fullres", "0", &t("casc0"), &["--previous-stage", &t("lo")]);
    assert!(json(&tmp.path().join("casc0/validation/summary.json"))["foreground_mean"]["Dice"].is_number());
    // The best configuration's instructions predict a cascade through its first stage.
    ok(&["find-best-config", "--ref", &t("raw/labelsTr"), "--labels", &t("raw/dataset.json"), "--model", &format!("casc={}", t("casc0")), "--out", &t("best")]);
    let how = std::fs::read_to_string(tmp.path().join("best/inference_instructions.txt")).unwrap();
    let lo = tmp.path().join("lo").canonicalize().unwrap();
    assert!(how.contains(&format!("--checkpoint {}\n", lo.display())) && how.contains("--previous-stage OUTPUT_FOLDER_first_stage"), "{how}");

    // Prediction: stage 1's label maps, then stage 2 with them.
    ok(&["predict", "-i", &t("raw/imagesTs"), "-o", &t("pred_lo"), "--checkpoint", &t("lo"), "--disable-tta"]);
    assert_eq!(json(&tmp.path().join("pred_lo/predict.json"))["options"]["configuration"], "3d_lowres", "the checkpoint's configuration");
    fails(&["predict", "-i", &t("raw/imagesTs"), "-o", &t("p0"), "--checkpoint", &t("casc")], &["--previous-stage", "3d_lowres"]);
    fails(&["predict", "-i", &t("raw/imagesTs"), "-o", &t("p1"), "--checkpoint", &t("casc"), "--configuration", "3d_fullres", "--previous-stage", &t("pred_lo")], &["3d_cascade_fullres", "not `3d_fullres`"]);
    fails(&["predict", "-i", &t("raw/imagesTs"), "-o", &t("p2"), "--checkpoint", &t("casc"), "--previous-stage", &t("raw/labelsTr")], &["phantom_005", "previous stage"]);
    ok(&["predict", "-i", &t("raw/imagesTs"), "-o", &t("pred"), "--checkpoint", &t("casc"), "--disable-tta", "--previous-stage", &t("pred_lo")]);
    let input = stu_data::nifti_io::read_geometry(&tmp.path().join("raw/imagesTs/phantom_005_0000.nii.gz")).unwrap();
    let out = stu_data::nifti_io::read_label(&tmp.path().join("pred/phantom_005.nii.gz")).unwrap();
    assert_eq!(out.geom.shape, input.shape);
}
