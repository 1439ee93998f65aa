//! `stu predict` and `stu evaluate` end to end on the shared real data, and the metrics against
//! DeepMind's surface-distance and nnU-Net's rules on real label maps.

use std::path::Path;
use std::process::{Command, Output};

use tests::{shared, stu_bin};

fn stu(args: &[&str]) -> Output {
    Command::new(stu_bin!()).args(args).output().expect("runs")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stu failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn plan_preprocess_train_predict_evaluate_on_a_real_mr_case() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let raw = shared().join("data/Dataset802_TotalSegExampleMR");
    let raw_s = raw.to_str().unwrap();
    ok(&stu(&["plan", raw_s, "--out", &t("plans/plans.json")]));
    ok(&stu(&["preprocess", raw_s, "--plans", &t("plans/plans.json"), "--out", &t("pre")]));
    ok(&stu(&[
        "train", &t("pre"), "--out", &t("run"), "--fold", "all", "--model-options", r#"{"depth":[1,1,1],"dims":[4,8,8]}"#, "--epochs", "1", "--iterations", "2", "--val-iterations", "0", "--patch-size", "16,32,32",
    ]));
    let ck = t("run/checkpoint_final.safetensors");
    // The checkpoint finds its plan through the run record; --disable-tta keeps it quick.
    let images = raw.join("imagesTr");
    let log = ok(&stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t("pred"), "--checkpoint", &ck, "--disable-tta"]));
    assert!(log.contains("ts_mr_sm"), "{log}");
    let input = stu_data::nifti_io::read_geometry(&images.join("ts_mr_sm_0000.nii.gz")).unwrap();
    let out = stu_data::nifti_io::read_label(&tmp.path().join("pred/ts_mr_sm.nii.gz")).unwrap();
    assert_eq!(out.geom.shape, input.shape);
    assert_eq!(out.geom.affine, input.affine);
    let classes = 1 + stu_data::dataset::DatasetJson::read(&raw.join("dataset.json")).unwrap().labels.len() as u16 - 1;
    assert!(out.data.iter().all(|&v| v < classes));
    // Two folds' checkpoints (here: a second seed) predict as an ensemble; a member with other
    // classes is refused, naming it.
    ok(&stu(&[
        "train", &t("pre"), "--out", &t("run1"), "--fold", "all", "--model-options", r#"{"depth":[1,1,1],"dims":[4,8,8]}"#, "--epochs", "1", "--iterations", "2", "--val-iterations", "0", "--patch-size", "16,32,32", "--seed", "1",
    ]));
    // (A run folder stands for its final checkpoint.)
    ok(&stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t("pred-ens"), "--checkpoint", &ck, &t("run1"), "--disable-tta"]));
    let unfinished = stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t("pred-ens-x"), "--checkpoint", &t("pre")]);
    assert!(!unfinished.status.success() && String::from_utf8_lossy(&unfinished.stderr).contains("without checkpoint_final"));
    assert_eq!(stu_data::nifti_io::read_label(&tmp.path().join("pred-ens/ts_mr_sm.nii.gz")).unwrap().geom.shape, input.shape);
    // What was asked is recorded beside the predictions.
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("pred-ens/predict.json")).unwrap()).unwrap();
    assert_eq!(record["options"]["checkpoints"].as_array().unwrap().len(), 2);
    assert_eq!((&record["options"]["disable_tta"], &record["options"]["backend"]), (&serde_json::json!(true), &serde_json::json!("flex")));
    // The same two models ensembled after the fact from their probabilities (nnUNetv2_ensemble):
    // the label is the argmax of the members' mean probability.
    for (dir, run) in [("prob0", ck.clone()), ("prob1", t("run1"))] {
        ok(&stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t(dir), "--checkpoint", &run, "--disable-tta", "--save-probabilities"]));
    }
    ok(&stu(&["ensemble", "--pred", &t("prob0"), &t("prob1"), "-o", &t("ens"), "--save-probabilities"]));
    let probs = |dir: &str| {
        let d = stu_engine::checkpoint::StateDict::open(tmp.path().join(dir).join("ts_mr_sm.probabilities.safetensors")).unwrap();
        let shape = d.shape("probabilities").unwrap().to_vec();
        (d.read("probabilities", &shape).unwrap(), shape)
    };
    let ((p0, shape), (p1, _), (pe, _)) = (probs("prob0"), probs("prob1"), probs("ens"));
    let (classes, n) = (shape[0], shape[1..].iter().product::<usize>());
    let ens = stu_data::nifti_io::read_label(&tmp.path().join("ens/ts_mr_sm.nii.gz")).unwrap();
    assert_eq!(ens.geom.affine, input.affine);
    for v in 0..n {
        let mean: Vec<f32> = (0..classes).map(|k| (0.0 + p0[k * n + v] + p1[k * n + v]) / 2.0).collect();
        let arg = mean.iter().enumerate().fold(0, |a, (k, &m)| if m > mean[a] { k } else { a });
        assert_eq!(ens.data[v] as usize, arg, "voxel {v}");
        assert!((0..classes).all(|k| (pe[k * n + v] - mean[k]).abs() <= 1e-3), "voxel {v}: averaged probabilities");
    }
    // A truncated member and a missing one are named.
    let member = tmp.path().join("prob1/ts_mr_sm.probabilities.safetensors");
    let bytes = std::fs::read(&member).unwrap();
    std::fs::write(&member, &bytes[..bytes.len() / 2]).unwrap();
    let cut = stu(&["ensemble", "--pred", &t("prob0"), &t("prob1"), "-o", &t("ens2")]);
    let err = String::from_utf8_lossy(&cut.stderr);
    assert!(!cut.status.success() && err.contains("prob1/ts_mr_sm.probabilities.safetensors") && err.contains("truncated"), "{err}");
    std::fs::remove_file(&member).unwrap();
    let missing = stu(&["ensemble", "--pred", &t("prob0"), &t("prob1"), "-o", &t("ens2")]);
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && err.contains("prob1") && err.contains("ts_mr_sm"), "{err}");
    let other = shared().join("fixtures/stunet-parity/tiny_iso.safetensors");
    let bad = stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t("pred-ens-bad"), "--checkpoint", &ck, other.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("tiny_iso.safetensors") && err.contains("classes"), "{err}");
    // Fast export: on the plan's own grid (this case's spacing) the argmax is the full
    // export's; on a coarser plan (4.5 mm) the label map alone is resampled back, in the input's
    // geometry, mostly agreeing with the full export (0.60 of the voxels for this model trained
    // for two iterations, whose maps are speckled; the quickstart's trained models agree on
    // 0.988–0.991).
    ok(&stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t("pred-fast"), "--checkpoint", &ck, "--disable-tta", "--fast-export"]));
    let fast = stu_data::nifti_io::read_label(&tmp.path().join("pred-fast/ts_mr_sm.nii.gz")).unwrap();
    assert!(fast.data == out.data && fast.geom.affine == out.geom.affine);
    let mut coarse: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(t("plans/plans.json")).unwrap()).unwrap();
    for s in coarse["configurations"]["3d_fullres"]["spacing"].as_array_mut().unwrap() {
        *s = (s.as_f64().unwrap() * 1.5).into();
    }
    std::fs::write(t("plans45.json"), coarse.to_string()).unwrap();
    let mut maps = Vec::new();
    let plans45 = t("plans45.json");
    for (dir, extra) in [("pred45", None), ("pred45-fast", Some("--fast-export"))] {
        let out_dir = t(dir);
        let mut args = vec!["predict", "-i", images.to_str().unwrap(), "-o", &out_dir, "--checkpoint", &ck, "--plans", &plans45, "--disable-tta"];
        args.extend(extra);
        ok(&stu(&args));
        let m = stu_data::nifti_io::read_label(&tmp.path().join(dir).join("ts_mr_sm.nii.gz")).unwrap();
        assert_eq!((m.geom.shape, m.geom.affine), (input.shape, input.affine));
        maps.push(m.data);
    }
    let agree = maps[0].iter().zip(&maps[1]).filter(|(a, b)| a == b).count() as f64 / maps[0].len() as f64;
    assert!(agree > 0.5 && agree < 1.0, "fast and full export agree on {agree}");
    let both = stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t("pred-x"), "--checkpoint", &ck, "--fast-export", "--save-probabilities"]);
    assert!(!both.status.success() && String::from_utf8_lossy(&both.stderr).contains("--save-probabilities"));
    // With TTA too, through a single file input.
    ok(&stu(&["predict", "-i", images.join("ts_mr_sm_0000.nii.gz").to_str().unwrap(), "-o", &t("pred-tta"), "--checkpoint", &ck, "--save-probabilities"]));
    // The export runs slab by slab, beside the network on its thread or on the writer stage's,
    // with or without probabilities; from the whole logits (`STU_EXPORT=whole`): the same bytes.
    let whole = Command::new(stu_bin!())
        .env("STU_EXPORT", "whole")
        .args(["predict", "-i", images.join("ts_mr_sm_0000.nii.gz").to_str().unwrap(), "-o", &t("pred-tta-whole"), "--checkpoint", &ck, "--save-probabilities"])
        .output()
        .unwrap();
    ok(&whole);
    let probabilities = |dir: &str| std::fs::read(t(&format!("{dir}/ts_mr_sm.probabilities.safetensors"))).unwrap();
    assert!(probabilities("pred-tta") == probabilities("pred-tta-whole"), "probabilities streamed and from the whole logits");
    for (dir, overlap, probs) in [("pred-tta-rows", "off", false), ("pred-tta-rows-overlap", "on", false), ("pred-tta-overlap", "on", true)] {
        let mut args: Vec<String> = vec!["predict".into(), "-i".into(), images.join("ts_mr_sm_0000.nii.gz").to_str().unwrap().into(), "-o".into(), t(dir), "--checkpoint".into(), ck.clone(), "--overlap".into(), overlap.into()];
        if probs {
            args.push("--save-probabilities".into());
        }
        ok(&stu(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        for reference in ["pred-tta", "pred-tta-whole"] {
            assert!(std::fs::read(t(&format!("{dir}/ts_mr_sm.nii.gz"))).unwrap() == std::fs::read(t(&format!("{reference}/ts_mr_sm.nii.gz"))).unwrap(), "{dir} vs {reference}");
        }
        if probs {
            assert!(probabilities(dir) == probabilities("pred-tta"), "{dir}: probabilities");
        }
    }
    // Probabilities: [classes, Z, Y, X] in the input's array order, summing to 1, argmax = labels.
    let probs = tmp.path().join("pred-tta/ts_mr_sm.probabilities.safetensors");
    let dict = stu_engine::checkpoint::StateDict::open(&probs).unwrap();
    let shape = dict.shape("probabilities").unwrap().to_vec();
    assert_eq!(&shape[1..], &input.shape);
    let p = dict.read("probabilities", &shape).unwrap();
    let labels = stu_data::nifti_io::read_label(&tmp.path().join("pred-tta/ts_mr_sm.nii.gz")).unwrap().data;
    let n = labels.len();
    let mut disagree = 0;
    for v in 0..n {
        let col: Vec<f32> = (0..shape[0]).map(|k| p[k * n + v]).collect();
        let sum: f32 = col.iter().sum();
        assert!((sum - 1.0).abs() < 0.02, "voxel {v}: probabilities sum to {sum}");
        let max = col.iter().copied().fold(f32::MIN, f32::max);
        // The label's probability is the largest, up to float16 rounding (this barely trained
        // model's probabilities are near-uniform, so near-ties are common).
        let p_label = col[labels[v] as usize];
        assert!(max - p_label <= 1e-3 * max.max(1e-3) + 1e-5, "voxel {v}: label {} has p {p_label}, max {max}", labels[v]);
        disagree += usize::from(p_label < max);
    }
    assert!(disagree * 100 <= n, "{disagree} of {n} voxels tie-break differently");
    // Tiles summed on the device (the GPU path) give what the host sums give.
    let dev = Command::new(stu_bin!())
        .env("STU_ACCUMULATE", "device")
        .args(["predict", "-i", images.join("ts_mr_sm_0000.nii.gz").to_str().unwrap(), "-o", &t("pred-dev"), "--checkpoint", &ck, "--save-probabilities"])
        .output()
        .unwrap();
    ok(&dev);
    let pd = stu_engine::checkpoint::StateDict::open(tmp.path().join("pred-dev/ts_mr_sm.probabilities.safetensors")).unwrap().read("probabilities", &shape).unwrap();
    let worst = p.iter().zip(&pd).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 1e-3, "host and device accumulation differ by {worst} in probability");
    let ld = stu_data::nifti_io::read_label(&tmp.path().join("pred-dev/ts_mr_sm.nii.gz")).unwrap().data;
    let differ = labels.iter().zip(&ld).filter(|(a, b)| a != b).count();
    assert!(differ * 1000 <= n, "{differ} of {n} labels differ between host and device accumulation");
    let bad = Command::new(stu_bin!()).env("STU_ACCUMULATE", "gpu").args(["predict", "-i", images.to_str().unwrap(), "-o", &t("pred-bad"), "--checkpoint", &ck]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("STU_ACCUMULATE"));
    ok(&stu(&["predict", "-i", images.join("ts_mr_sm_0000.nii.gz").to_str().unwrap(), "-o", &t("pred-kl"), "--checkpoint", &ck, "--keep-largest", "--disable-tta"]));
    assert!(tmp.path().join("pred-kl/ts_mr_sm.nii.gz").exists());
    // A post-processing decision applied while predicting equals applying it afterwards.
    std::fs::write(t("pp.json"), r#"{"largest_foreground": true, "largest_per_label": [1, 2], "dice_before": 0.5, "dice_after": 0.6}"#).unwrap();
    ok(&stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t("pred-pp"), "--checkpoint", &ck, "--disable-tta", "--postprocessing", &t("pp.json")]));
    ok(&stu(&["postprocess", "apply", "--pp", &t("pp.json"), "-i", &t("pred"), "-o", &t("pred-pp-after")]));
    assert!(std::fs::read(t("pred-pp/ts_mr_sm.nii.gz")).unwrap() == std::fs::read(t("pred-pp-after/ts_mr_sm.nii.gz")).unwrap());
    std::fs::write(t("pp-bad.json"), r#"{"largest_foreground": "yes"}"#).unwrap();
    let bad = stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t("pred-pp-bad"), "--checkpoint", &ck, "--postprocessing", &t("pp-bad.json")]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("pp-bad.json"));
    let s = ok(&stu(&["evaluate", "--ref", raw.join("labelsTr").to_str().unwrap(), "--pred", &t("pred"), "--labels", raw.join("dataset.json").to_str().unwrap(), "--nsd-tolerance", "2", "--hd95"]));
    assert!(s.contains("foreground mean Dice"), "{s}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("pred/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["metric_per_case"].as_array().unwrap().len(), 1);
    assert!(summary["mean"]["1"]["NSD"].is_number());

    // Bad input fails before any work, naming the problem.
    let bad = stu(&["predict", "-i", &t("nowhere"), "-o", &t("p2"), "--checkpoint", &ck]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no such file"));
    let two = tmp.path().join("two");
    std::fs::create_dir_all(&two).unwrap();
    for c in ["0000", "0001"] {
        std::fs::copy(images.join("ts_mr_sm_0000.nii.gz"), two.join(format!("ts_mr_sm_{c}.nii.gz"))).unwrap();
    }
    let bad = stu(&["predict", "-i", two.to_str().unwrap(), "-o", &t("p3"), "--checkpoint", &ck]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("channel"), "{}", String::from_utf8_lossy(&bad.stderr));
    // An image with a NaN is refused by name and place, not run into non-finite logits.
    let nan = tmp.path().join("nan");
    std::fs::create_dir_all(&nan).unwrap();
    let mut v = stu_data::nifti_io::read_image(&images.join("ts_mr_sm_0000.nii.gz")).unwrap();
    let [_, ny, nx] = v.geom.shape;
    v.data[(3 * ny + 4) * nx + 5] = f32::NAN;
    stu_data::nifti_io::write_image(&nan.join("n_0000.nii.gz"), &v.data, &v.geom).unwrap();
    let bad = stu(&["predict", "-i", nan.to_str().unwrap(), "-o", &t("p-nan"), "--checkpoint", &ck, "--disable-tta"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("n_0000.nii.gz: 1 NaN or infinite voxel(s), the first at [3, 4, 5]"), "{err}");
    // One unreadable case in a folder does not lose the others.
    let mixed = tmp.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(images.join("ts_mr_sm_0000.nii.gz"), mixed.join("good_0000.nii.gz")).unwrap();
    std::fs::write(mixed.join("broken_0000.nii.gz"), b"\x1f\x8b not really gzip").unwrap();
    std::fs::copy(shared().join("data/Dataset801_TotalSegExampleCT/imagesTr/ts_ct_sm_0000.nii.gz"), mixed.join("other_0000.nii.gz")).unwrap();
    // One case at a time (the CPU default: the export runs slab by slab as the sliding window
    // finishes slices) and overlapped (read, network and export of three cases at once, the
    // GPU default: the export stage gets each case's whole logits): the same files, and the
    // same lone failure.
    for (dir, overlap) in [("p4", "off"), ("p5", "on")] {
        let r = stu(&["predict", "-i", mixed.to_str().unwrap(), "-o", &t(dir), "--checkpoint", &ck, "--disable-tta", "--overlap", overlap]);
        assert!(!r.status.success(), "a failed case gives a non-zero exit");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains("broken") && err.contains("1 of 3"), "{err}");
        for case in ["good", "other"] {
            let got = std::fs::read(tmp.path().join(dir).join(format!("{case}.nii.gz"))).unwrap();
            assert!(got == std::fs::read(tmp.path().join("p4").join(format!("{case}.nii.gz"))).unwrap(), "{dir}/{case}");
        }
    }
    // Continued, the predicted cases are left as they are and only the failed one is tried.
    let before = std::fs::metadata(tmp.path().join("p4/good.nii.gz")).unwrap().modified().unwrap();
    let r = stu(&["predict", "-i", mixed.to_str().unwrap(), "-o", &t("p4"), "--checkpoint", &ck, "--disable-tta", "--continue-prediction"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("2 case(s) already predicted") && err.contains("broken: FAILED") && !err.contains("good:"), "{err}");
    assert_eq!(std::fs::metadata(tmp.path().join("p4/good.nii.gz")).unwrap().modified().unwrap(), before);
    // Two parts share a folder: cases 0, 2 (broken, other) and case 1 (good) of the sorted list.
    let r = stu(&["predict", "-i", mixed.to_str().unwrap(), "-o", &t("p6"), "--checkpoint", &ck, "--disable-tta", "--num-parts", "2", "--part-id", "0"]);
    assert!(!r.status.success() && tmp.path().join("p6/other.nii.gz").exists() && !tmp.path().join("p6/good.nii.gz").exists());
    ok(&stu(&["predict", "-i", mixed.to_str().unwrap(), "-o", &t("p6"), "--checkpoint", &ck, "--disable-tta", "--num-parts", "2", "--part-id", "1"]));
    assert!(std::fs::read(t("p6/good.nii.gz")).unwrap() == std::fs::read(t("p4/good.nii.gz")).unwrap());
    assert!(tmp.path().join("p6/predict.part1of2.json").exists());
    let r = stu(&["predict", "-i", mixed.to_str().unwrap(), "-o", &t("p7"), "--checkpoint", &ck, "--num-parts", "2", "--part-id", "2"]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("--part-id 2"));
    // The run folder carries its plan: with the preprocessed data moved away, its checkpoint
    // still predicts the same map.
    assert!(tmp.path().join("run/plans.json").exists() && tmp.path().join("run/dataset.json").exists());
    std::fs::rename(tmp.path().join("pre"), tmp.path().join("pre-moved")).unwrap();
    ok(&stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t("pred-moved"), "--checkpoint", &ck, "--disable-tta"]));
    assert!(std::fs::read(t("pred-moved/ts_mr_sm.nii.gz")).unwrap() == std::fs::read(t("pred/ts_mr_sm.nii.gz")).unwrap());
}

/// A raw dataset under `dir/raw` of the real MR case twice, `a` for training and `b` for
/// validation (its `splits_final.json`), each with the label map `labels` makes of the
/// original, and the original dataset.json changed by `edit`.
fn mr_case_twice(dir: &Path, edit: impl FnOnce(&mut serde_json::Value), labels: impl Fn(&stu_data::nifti_io::Volume<u16>) -> Vec<u16>) -> std::path::PathBuf {
    let src = shared().join("data/Dataset802_TotalSegExampleMR");
    let raw = dir.join("raw");
    for d in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(raw.join(d)).unwrap();
    }
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("dataset.json")).unwrap()).unwrap();
    json["numTraining"] = 2.into();
    edit(&mut json);
    std::fs::write(raw.join("dataset.json"), json.to_string()).unwrap();
    let original = stu_data::nifti_io::read_label(&src.join("labelsTr/ts_mr_sm.nii.gz")).unwrap();
    let label = labels(&original);
    for id in ["a", "b"] {
        std::fs::copy(src.join("imagesTr/ts_mr_sm_0000.nii.gz"), raw.join(format!("imagesTr/{id}_0000.nii.gz"))).unwrap();
        stu_data::nifti_io::write_label_as(&raw.join(format!("labelsTr/{id}.nii.gz")), &label, &original.geom, false).unwrap();
    }
    std::fs::write(raw.join("splits_final.json"), r#"[{"train": ["a"], "val": ["b"]}]"#).unwrap();
    raw
}

#[test]
fn training_ends_with_nnunets_final_validation_of_the_fold() {
    // The real MR case twice (`a` trains, `b` validates).
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let raw = mr_case_twice(tmp.path(), |_| {}, |l| l.data.clone());
    let raw_s = raw.to_str().unwrap();
    ok(&stu(&["plan", raw_s, "--out", &t("plans/plans.json")]));
    ok(&stu(&["preprocess", raw_s, "--plans", &t("plans/plans.json"), "--out", &t("pre")]));
    let train = |extra: &[&str]| {
        let mut args = vec!["train", &*t("pre"), "--out", &*t("run"), "--model-options", r#"{"depth":[1,1,1],"dims":[4,8,8]}"#, "--epochs", "1", "--iterations", "2", "--val-iterations", "1", "--patch-size", "16,32,32"].into_iter().map(String::from).collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        ok(&Command::new(stu_bin!()).args(&args).output().unwrap())
    };
    let log = train(&[]);
    assert!(log.contains("final validation: 1 case(s) (1 predicted now)"), "{log}");
    // The validation case's prediction has its raw label's geometry and is scored against it.
    let val = tmp.path().join("run/validation");
    let pred = stu_data::nifti_io::read_label(&val.join("b.nii.gz")).unwrap();
    let label = stu_data::nifti_io::read_label(&raw.join("labelsTr/b.nii.gz")).unwrap();
    assert_eq!((pred.geom.shape, pred.geom.affine), (label.geom.shape, label.geom.affine));
    assert!(!val.join("a.nii.gz").exists(), "only the fold's validation cases");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(val.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["metric_per_case"].as_array().unwrap().len(), 1);
    // It is the same prediction `stu predict` makes with TTA.
    ok(&stu(&["predict", "-i", raw.join("imagesTr/b_0000.nii.gz").to_str().unwrap(), "-o", &t("pred"), "--checkpoint", &t("run/checkpoint_final.safetensors")]));
    assert!(stu_data::nifti_io::read_label(&tmp.path().join("pred/b.nii.gz")).unwrap().data == pred.data);
    // Packed into one zip and installed elsewhere (the preprocessed data out of reach), the
    // model predicts the same map from its fold folder.
    ok(&stu(&["export-model", &t("run"), "--out", &t("model.zip")]));
    std::fs::rename(tmp.path().join("pre"), tmp.path().join("pre-away")).unwrap();
    ok(&stu(&["install-model", &t("model.zip"), "--out", &t("installed")]));
    assert!(tmp.path().join("installed/fold_0/validation/summary.json").exists());
    ok(&stu(&["predict", "-i", raw.join("imagesTr/b_0000.nii.gz").to_str().unwrap(), "-o", &t("pred-installed"), "--checkpoint", &t("installed/fold_0")]));
    assert!(stu_data::nifti_io::read_label(&tmp.path().join("pred-installed/b.nii.gz")).unwrap().data == pred.data);
    // The installed model's folder stands for all its folds (here one).
    ok(&stu(&["predict", "-i", raw.join("imagesTr/b_0000.nii.gz").to_str().unwrap(), "-o", &t("pred-model"), "--checkpoint", &t("installed")]));
    assert!(stu_data::nifti_io::read_label(&tmp.path().join("pred-model/b.nii.gz")).unwrap().data == pred.data);
    std::fs::rename(tmp.path().join("pre-away"), tmp.path().join("pre")).unwrap();
    // A truncated zip, or a folder already there, is refused and nothing is left behind.
    let bytes = std::fs::read(t("model.zip")).unwrap();
    std::fs::write(t("cut.zip"), &bytes[..bytes.len() / 2]).unwrap();
    let r = stu(&["install-model", &t("cut.zip"), "--out", &t("cut")]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("cut.zip") && !tmp.path().join("cut").exists());
    let r = stu(&["install-model", &t("model.zip"), "--out", &t("installed")]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("exists"));
    // An interrupted validation is finished by --resume; a finished one is only re-scored.
    std::fs::remove_file(val.join("b.nii.gz")).unwrap();
    std::fs::remove_file(val.join("summary.json")).unwrap();
    let log = train(&["--resume"]);
    assert!(log.contains("already complete") && log.contains("(1 predicted now)"), "{log}");
    assert!(val.join("summary.json").exists());
    let log = train(&["--resume"]);
    assert!(log.contains("(0 predicted now)"), "{log}");
    // Asked for the probabilities too (nnU-Net's --npz), the case is predicted again with them,
    // the same labels, ready for `stu ensemble` of two trainings' validations.
    let log = train(&["--resume", "--validation-probabilities"]);
    assert!(log.contains("(1 predicted now)") && val.join("b.probabilities.safetensors").exists(), "{log}");
    assert!(stu_data::nifti_io::read_label(&val.join("b.nii.gz")).unwrap().data == pred.data);
    ok(&stu(&["ensemble", "--pred", val.to_str().unwrap(), val.to_str().unwrap(), "-o", &t("val-ens")]));
    assert!(stu_data::nifti_io::read_label(&tmp.path().join("val-ens/b.nii.gz")).unwrap().geom.shape == label.geom.shape);
    // As nnU-Net writes them (`--npz`: `.npz` and `.pkl`), for Python nnU-Net's ensembling.
    let log = train(&["--resume", "--npz"]);
    assert!(log.contains("(1 predicted now)") && val.join("b.npz").exists() && val.join("b.pkl").exists(), "{log}");
    assert!(stu_data::nifti_io::read_label(&val.join("b.nii.gz")).unwrap().data == pred.data);
    // `stu validate` (nnU-Net's --val, --val_best): with a best checkpoint that differs from
    // the final one (another seed's), the final checkpoint's predictions are replaced and the
    // record names the checkpoint; the map is the one `stu predict` makes with it. Run again,
    // nothing is predicted; back to the final checkpoint, the training's map returns.
    let (pre, run1) = (t("pre"), t("run-seed1"));
    ok(&stu(&["train", &pre, "--out", &run1, "--model-options", r#"{"depth":[1,1,1],"dims":[4,8,8]}"#, "--epochs", "1", "--iterations", "2", "--val-iterations", "1", "--patch-size", "16,32,32", "--seed", "1", "--no-final-validation"]));
    std::fs::copy(t("run-seed1/checkpoint_final.safetensors"), t("run/checkpoint_best.safetensors")).unwrap();
    let log = ok(&stu(&["validate", &t("run"), "--checkpoint", "best"]));
    assert!(log.contains("(1 predicted now, 1 of another checkpoint replaced) with checkpoint_best.safetensors"), "{log}");
    assert!(!val.join("b.probabilities.safetensors").exists(), "the final checkpoint's probabilities are gone too");
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(val.join("checkpoint.json")).unwrap()).unwrap();
    assert_eq!(record["checkpoint"], "checkpoint_best.safetensors");
    ok(&stu(&["predict", "-i", raw.join("imagesTr/b_0000.nii.gz").to_str().unwrap(), "-o", &t("pred-best"), "--checkpoint", &t("run/checkpoint_best.safetensors")]));
    let best = stu_data::nifti_io::read_label(&val.join("b.nii.gz")).unwrap().data;
    assert!(stu_data::nifti_io::read_label(&tmp.path().join("pred-best/b.nii.gz")).unwrap().data == best);
    // `--chk best` takes a run folder's best checkpoint (nnU-Net's -chk); a model exported with
    // its best checkpoints needs it, and says so without it.
    let b_image = raw.join("imagesTr/b_0000.nii.gz");
    ok(&stu(&["predict", "-i", b_image.to_str().unwrap(), "-o", &t("pred-chk"), "--checkpoint", &t("run"), "--chk", "best"]));
    assert!(stu_data::nifti_io::read_label(&tmp.path().join("pred-chk/b.nii.gz")).unwrap().data == best);
    ok(&stu(&["export-model", &t("run"), "--out", &t("best.zip"), "--checkpoint", "best"]));
    ok(&stu(&["install-model", &t("best.zip"), "--out", &t("installed-best")]));
    let r = stu(&["predict", "-i", b_image.to_str().unwrap(), "-o", &t("pred-x"), "--checkpoint", &t("installed-best/fold_0")]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("`--chk best`"), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(val.join("summary.json").exists());
    let log = ok(&stu(&["validate", &t("run"), "--checkpoint", "best", "--backend", "flex"]));
    assert!(log.contains("(0 predicted now) with checkpoint_best"), "{log}");
    let log = ok(&stu(&["validate", &t("run")]));
    assert!(log.contains("(1 predicted now, 1 of another checkpoint replaced) with checkpoint_final.safetensors"), "{log}");
    assert!(stu_data::nifti_io::read_label(&val.join("b.nii.gz")).unwrap().data == pred.data);
    // Not a run folder, or no such checkpoint: an error naming the file.
    let r = stu(&["validate", &t("pre")]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("train.json"), "{}", String::from_utf8_lossy(&r.stderr));
    std::fs::remove_file(t("run-seed1/checkpoint_best.safetensors")).unwrap();
    let r = stu(&["validate", &t("run-seed1"), "--checkpoint", "best"]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("checkpoint_best.safetensors: not found"), "{}", String::from_utf8_lossy(&r.stderr));
    // Preprocessed data that does not record its raw folder skip it, saying why.
    std::fs::remove_file(tmp.path().join("pre/source.json")).unwrap();
    let log = train(&["--resume"]);
    assert!(log.contains("final validation skipped") && log.contains("does not record its raw dataset"), "{log}");
}

/// `stu dataset check`, `plan` and `preprocess` of `raw` into `dir/pre`; returns a tiny
/// training (2 epochs of 2 iterations) into `dir/<out>` and case `a`'s preprocessed properties.
fn check_plan_preprocess<'a>(dir: &'a Path, raw: &Path) -> (impl Fn(&str) -> Output + 'a, serde_json::Value) {
    let t = move |p: &str| dir.join(p).to_str().unwrap().to_string();
    let raw_s = raw.to_str().unwrap();
    ok(&stu(&["dataset", "check", raw_s]));
    ok(&stu(&["plan", raw_s, "--out", &t("plans/plans.json")]));
    ok(&stu(&["preprocess", raw_s, "--plans", &t("plans/plans.json"), "--out", &t("pre")]));
    let props: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("pre/a.json")).unwrap()).unwrap();
    let train = move |out: &str| {
        Command::new(stu_bin!())
            .args(["train", &t("pre"), "--out", &t(out), "--model-options", r#"{"depth":[1,1,1],"dims":[4,8,8]}"#, "--epochs", "2", "--iterations", "2", "--val-iterations", "1", "--patch-size", "16,32,32"])
            .output()
            .unwrap()
    };
    (train, props)
}

/// Removes the class locations under `key` from case `a`'s preprocessed properties in
/// `dir/pre` (data preprocessed before such locations were recorded).
fn drop_locations(dir: &Path, key: &str) {
    let path = dir.join("pre/a.json");
    let mut props: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(props["class_locations"].as_object_mut().unwrap().remove(key).is_some(), "{key} is recorded");
    std::fs::write(&path, props.to_string()).unwrap();
}

#[test]
fn a_dataset_with_an_ignore_label_preprocesses_trains_and_validates() {
    // Its labels' first 6 slices marked `ignore` (sparse annotation).
    let tmp = tempfile::tempdir().unwrap();
    let src = shared().join("data/Dataset802_TotalSegExampleMR");
    let full = stu_data::nifti_io::read_label(&src.join("labelsTr/ts_mr_sm.nii.gz")).unwrap();
    let [_, ny, nx] = full.geom.shape;
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("dataset.json")).unwrap()).unwrap();
    let ignore = json["labels"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).max().unwrap() + 1;
    let raw = mr_case_twice(tmp.path(), |j| j["labels"]["ignore"] = ignore.into(), |l| l.data.iter().enumerate().map(|(i, &v)| if i / (ny * nx) < 6 { ignore as u16 } else { v }).collect());
    let (train, props) = check_plan_preprocess(tmp.path(), &raw);
    // The ignored voxels are no class; the annotated ones have locations of their own.
    let locs = props["class_locations"].as_object().unwrap();
    assert!(locs.contains_key("annotated") && !locs.contains_key(&ignore.to_string()), "{:?}", locs.keys().collect::<Vec<_>>());
    let log = ok(&train("run"));
    let losses: Vec<f64> = tests::logged_losses(&tmp.path().join("run")).into_iter().flatten().collect();
    assert!(losses.len() == 4 && losses.iter().all(|l| l.is_finite()), "{losses:?}");
    // The final validation scores b without its ignored slices.
    assert!(log.contains("final validation: 1 case(s)"), "{log}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("run/validation/summary.json")).unwrap()).unwrap();
    let m = &summary["metric_per_case"][0]["metrics"]["1"];
    let counted = ["TP", "FP", "FN", "TN"].iter().map(|k| m[*k].as_f64().unwrap()).sum::<f64>() as usize;
    assert_eq!(counted, full.data.len() - 6 * ny * nx);
    // Data preprocessed without the annotated locations is refused, naming the case.
    drop_locations(tmp.path(), "annotated");
    let old = train("run-old");
    let err = String::from_utf8_lossy(&old.stderr);
    assert!(!old.status.success() && err.contains("a.json") && err.contains("preprocess the dataset again"), "{err}");
}

#[test]
fn a_region_based_dataset_trains_with_sigmoids_and_predicts_its_class_order() {
    // nnU-Net's region-based training on the real MR case: regions "kidneys" [2, 3],
    // "kidney_left" [3] and "liver" 5, declared out of alphabetical order, writing 2, 3 and 5.
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let raw = mr_case_twice(tmp.path(), |_| {}, |l| l.data.iter().map(|&v| if [2, 3, 5].contains(&v) { v } else { 0 }).collect());
    std::fs::write(
        raw.join("dataset.json"),
        r#"{"channel_names": {"0": "MRI"}, "labels": {"background": 0, "kidneys": [2, 3], "kidney_left": [3], "liver": 5},
            "regions_class_order": [2, 3, 5], "numTraining": 2, "file_ending": ".nii.gz"}"#,
    )
    .unwrap();
    let (train, props) = check_plan_preprocess(tmp.path(), &raw);
    // The regions that are not one plain label get locations of their own (nnU-Net's keys).
    let locs = props["class_locations"].as_object().unwrap();
    assert!(locs.contains_key("(2, 3)") && locs.contains_key("(3,)") && locs.contains_key("5"), "{:?}", locs.keys().collect::<Vec<_>>());
    assert!(locs["(2, 3)"][1].as_u64().unwrap() >= locs["(3,)"][1].as_u64().unwrap());
    let log = ok(&train("run"));
    let losses: Vec<f64> = tests::logged_losses(&tmp.path().join("run")).into_iter().flatten().collect();
    assert!(losses.len() == 4 && losses.iter().all(|l| l.is_finite() && *l > -1.0), "{losses:?}");
    // One pseudo-Dice per region, and the final validation scores the regions.
    let last: serde_json::Value = serde_json::from_str(std::fs::read_to_string(tmp.path().join("run/log.jsonl")).unwrap().lines().last().unwrap()).unwrap();
    assert_eq!(last["pseudo_dice"].as_array().unwrap().len(), 3, "{last}");
    assert!(log.contains("final validation: 1 case(s)"), "{log}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("run/validation/summary.json")).unwrap()).unwrap();
    let keys: Vec<&String> = summary["mean"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["(2, 3)", "(3,)", "5"]);
    // The label map is the thresholded sigmoids in region order, later over earlier: checked
    // against the saved probabilities where float16 rounding cannot decide (≥ 0.5 in float16
    // wherever the float32 sigmoid was above it; below 0.5 in float16 means below in float32).
    let images = raw.join("imagesTr/b_0000.nii.gz");
    let ck = t("run/checkpoint_final.safetensors");
    ok(&stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t("pred"), "--checkpoint", &ck, "--disable-tta", "--save-probabilities"]));
    let seg = stu_data::nifti_io::read_label(&tmp.path().join("pred/b.nii.gz")).unwrap();
    let (probs, header) = read_probabilities(&tmp.path().join("pred/b.probabilities.safetensors"));
    assert_eq!(header["__metadata__"]["regions_class_order"], "[2,3,5]");
    let n = seg.data.len();
    assert_eq!(probs.len(), 3 * n);
    let writes = [2u16, 3, 5];
    for (i, &v) in seg.data.iter().enumerate() {
        let p = |k: usize| probs[k * n + i];
        let last = (0..3).rev().find(|&k| p(k) > 0.5);
        match v {
            0 => assert!((0..3).all(|k| p(k) <= 0.5), "voxel {i}: background with {:?}", (p(0), p(1), p(2))),
            w => {
                let k = writes.iter().position(|&x| x == w).unwrap_or_else(|| panic!("voxel {i}: label {w} is no region's"));
                assert!(p(k) >= 0.5 && last.is_none_or(|l| l <= k), "voxel {i}: {w} with {:?}", (p(0), p(1), p(2)));
            }
        }
    }
    // The ensemble thresholds the mean probabilities in the same order (two folders, one model).
    std::fs::create_dir_all(tmp.path().join("pred2")).unwrap();
    for f in ["b.nii.gz", "b.probabilities.safetensors"] {
        std::fs::copy(tmp.path().join("pred").join(f), tmp.path().join("pred2").join(f)).unwrap();
    }
    ok(&stu(&["ensemble", "--pred", &t("pred"), &t("pred2"), "-o", &t("ens")]));
    let ens = stu_data::nifti_io::read_label(&tmp.path().join("ens/b.nii.gz")).unwrap();
    let want: Vec<u16> = (0..n).map(|i| (0..3).rfind(|&k| probs[k * n + i] > 0.5).map_or(0, |k| writes[k])).collect();
    assert!(ens.data == want);
    // Fast export: thresholded on the network's grid; the same labels only.
    ok(&stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t("fast"), "--checkpoint", &ck, "--disable-tta", "--fast-export"]));
    let fast = stu_data::nifti_io::read_label(&tmp.path().join("fast/b.nii.gz")).unwrap();
    assert!(fast.data.iter().all(|v| [0, 2, 3, 5].contains(v)) && fast.geom.shape == seg.geom.shape);
    // `stu evaluate` with the dataset's labels scores the regions as nnU-Net keys them.
    ok(&stu(&["evaluate", "--ref", raw.join("labelsTr").to_str().unwrap(), "--pred", &t("pred"), "--labels", raw.join("dataset.json").to_str().unwrap(), "--out", &t("eval")]));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("eval/summary.json")).unwrap()).unwrap();
    let m = &s["metric_per_case"][0]["metrics"];
    let reference = stu_data::nifti_io::read_label(&raw.join("labelsTr/b.nii.gz")).unwrap();
    let both = |inside: &dyn Fn(u16) -> bool| reference.data.iter().zip(&seg.data).filter(|(r, p)| inside(**r) && inside(**p)).count() as f64;
    assert_eq!(m["(2, 3)"]["TP"].as_f64().unwrap(), both(&|v| v == 2 || v == 3));
    assert_eq!(m["(3,)"]["TP"].as_f64().unwrap(), both(&|v| v == 3));
    // Post-processing is determined per region and replayed by `stu predict`.
    ok(&stu(&["postprocess", "determine", "--ref", raw.join("labelsTr").to_str().unwrap(), "--pred", &t("pred"), "--labels", raw.join("dataset.json").to_str().unwrap(), "--out", &t("pp")]));
    let pp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("pp/postprocessing.json")).unwrap()).unwrap();
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("pp/postprocessed/summary.json")).unwrap()).unwrap();
    assert_eq!(s["mean"].as_object().unwrap().keys().collect::<Vec<_>>(), ["(2, 3)", "(3,)", "5"], "{pp}");
    assert!(pp["largest_per_label"].as_array().unwrap().is_empty(), "{pp}");
    ok(&stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t("pred-pp"), "--checkpoint", &ck, "--disable-tta", "--postprocessing", &t("pp/postprocessing.json")]));
    let replayed = stu_data::nifti_io::read_label(&tmp.path().join("pred-pp/b.nii.gz")).unwrap();
    assert!(replayed.data == stu_data::nifti_io::read_label(&tmp.path().join("pp/postprocessed/b.nii.gz")).unwrap().data);
    // The weights alone (a foreign checkpoint, as an nnU-Net model folder holds): the
    // dataset.json beside --plans says the model is region-based; without it, softmax labels.
    std::fs::create_dir_all(tmp.path().join("folder/fold_0")).unwrap();
    ok(&stu(&["export", "--checkpoint", &ck, "--plans", &t("run/plans.json"), "--output", &t("folder/fold_0/weights.safetensors")]));
    for f in ["plans.json", "dataset.json"] {
        std::fs::copy(tmp.path().join("run").join(f), tmp.path().join("folder").join(f)).unwrap();
    }
    let foreign = |plans: &str, out: &str| {
        ok(&stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t(out), "--checkpoint", &t("folder/fold_0/weights.safetensors"), "--plans", plans, "--disable-tta"]));
        let v = stu_data::nifti_io::read_label(&tmp.path().join(out).join("b.nii.gz")).unwrap().data;
        [0u16, 1, 2, 3, 5].map(|w| v.contains(&w))
    };
    let r = foreign(&t("folder/plans.json"), "pred-foreign");
    assert!(!r[1] && (r[3] || r[4]), "labels 0, 1, 2, 3, 5 present: {r:?}");
    std::fs::copy(tmp.path().join("run/plans.json"), tmp.path().join("plans-alone.json")).unwrap();
    assert!(!foreign(&t("plans-alone.json"), "pred-softmax")[3]);
    // Options that work on plain labels are refused for regions, not misapplied.
    let out = stu(&["predict", "-i", images.to_str().unwrap(), "-o", &t("kl"), "--checkpoint", &ck, "--keep-largest"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("region-based"), "{err}");
    // Data preprocessed without a region's locations is refused, naming the case.
    drop_locations(tmp.path(), "(2, 3)");
    let old = train("run-old");
    let err = String::from_utf8_lossy(&old.stderr);
    assert!(!old.status.success() && err.contains("a.json") && err.contains("(2, 3)"), "{err}");
}

/// A `{case}.probabilities.safetensors` file's values (f32) and header.
fn read_probabilities(path: &Path) -> (Vec<f32>, serde_json::Value) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = bytes[8 + n..].chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
    (data, header)
}

#[test]
fn postprocessing_is_determined_on_cross_validation_and_replayed() {
    // Two cases: label 1 and label 2 as separate blocks, the prediction adding a stray speck of
    // label 1 far away. Keeping the largest foreground component would drop label 2 (rejected:
    // its Dice falls); keeping label 1's largest removes the speck (accepted); label 2 has one
    // component (nothing gained, not accepted).
    let tmp = tempfile::tempdir().unwrap();
    let geom = stu_data::nifti_io::read_label(&shared().join("data/Dataset802_TotalSegExampleMR/labelsTr/ts_mr_sm.nii.gz")).unwrap().geom;
    let [nz, ny, nx] = geom.shape;
    let block = |z: std::ops::Range<usize>, y: std::ops::Range<usize>, x: std::ops::Range<usize>, l: u16, v: &mut Vec<u16>| {
        for k in z {
            for j in y.clone() {
                for i in x.clone() {
                    v[(k * ny + j) * nx + i] = l;
                }
            }
        }
    };
    let mut reference = vec![0u16; nz * ny * nx];
    block(2..8, 10..30, 10..30, 1, &mut reference);
    block(10..16, 50..60, 60..70, 2, &mut reference);
    let mut pred = reference.clone();
    block(15..17, 5..7, 100..102, 1, &mut pred);
    let (r, p, out) = (tmp.path().join("ref"), tmp.path().join("pred"), tmp.path().join("pp"));
    for d in [&r, &p] {
        std::fs::create_dir_all(d).unwrap();
    }
    for case in ["c1", "c2"] {
        stu_data::nifti_io::write_label_as(&r.join(format!("{case}.nii.gz")), &reference, &geom, false).unwrap();
        stu_data::nifti_io::write_label_as(&p.join(format!("{case}.nii.gz")), &pred, &geom, false).unwrap();
    }
    let json = tmp.path().join("dataset.json");
    std::fs::write(&json, r#"{"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2, "file_ending": ".nii.gz"}"#).unwrap();
    let log = ok(&stu(&["postprocess", "determine", "--ref", r.to_str().unwrap(), "--pred", p.to_str().unwrap(), "--labels", json.to_str().unwrap(), "--out", out.to_str().unwrap()]));
    assert!(log.contains("keep the largest foreground component: no; per label or region: 1;"), "{log}");
    let pp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("postprocessing.json")).unwrap()).unwrap();
    assert_eq!(pp["largest_per_label"], serde_json::json!([1]));
    assert!(pp["dice_after"].as_f64().unwrap() == 1.0 && pp["dice_before"].as_f64().unwrap() < 1.0, "{pp}");
    let fixed = stu_data::nifti_io::read_label(&out.join("postprocessed/c1.nii.gz")).unwrap();
    assert!(fixed.data == reference && fixed.geom.affine == geom.affine);
    // Replayed on the predictions, it gives the same maps.
    let again = tmp.path().join("again");
    ok(&stu(&["postprocess", "apply", "--pp", out.join("postprocessing.json").to_str().unwrap(), "-i", p.to_str().unwrap(), "-o", again.to_str().unwrap()]));
    assert!(stu_data::nifti_io::read_label(&again.join("c2.nii.gz")).unwrap().data == reference);
}

#[test]
fn evaluation_leaves_out_the_ignore_label() {
    // A reference with a slab marked `ignore` (sparse annotation) against the full label map:
    // with the ignore label declared every Dice is 1; without it, the slab's labels are FP.
    let tmp = tempfile::tempdir().unwrap();
    let src = shared().join("data/Dataset802_TotalSegExampleMR");
    let full = stu_data::nifti_io::read_label(&src.join("labelsTr/ts_mr_sm.nii.gz")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("dataset.json")).unwrap()).unwrap();
    let ignore = json["labels"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).max().unwrap() + 1;
    json["labels"]["ignore"] = ignore.into();
    let (r, p) = (tmp.path().join("ref"), tmp.path().join("pred"));
    std::fs::create_dir_all(&r).unwrap();
    std::fs::create_dir_all(&p).unwrap();
    let [_, ny, nx] = full.geom.shape;
    let sparse: Vec<u16> = full.data.iter().enumerate().map(|(i, &v)| if i / (ny * nx) < 8 { ignore as u16 } else { v }).collect();
    stu_data::nifti_io::write_label_as(&r.join("c.nii.gz"), &sparse, &full.geom, false).unwrap();
    stu_data::nifti_io::write_label_as(&p.join("c.nii.gz"), &full.data, &full.geom, false).unwrap();
    let with = tmp.path().join("with.json");
    std::fs::write(&with, json.to_string()).unwrap();
    let score = |labels: &Path| {
        ok(&stu(&["evaluate", "--ref", r.to_str().unwrap(), "--pred", p.to_str().unwrap(), "--labels", labels.to_str().unwrap()]));
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p.join("summary.json")).unwrap()).unwrap();
        let dice: Vec<f64> = s["mean"].as_object().unwrap().values().filter_map(|m| m["Dice"].as_f64()).collect();
        (dice.iter().copied().fold(1.0, f64::min), s["metric_per_case"][0]["metrics"]["1"]["TN"].as_f64().unwrap())
    };
    let (worst, tn) = score(&with);
    assert_eq!(worst, 1.0, "with the ignore label declared");
    let (worst_plain, tn_plain) = score(&src.join("dataset.json"));
    assert!(worst_plain < 1.0, "the slab counts without it");
    assert!(tn < tn_plain, "ignored voxels are not true negatives either");
    // Without a dataset.json (nnUNetv2_evaluate_simple's -l and -il): the same counts.
    let summary = |dir: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap() };
    let ig = ignore.to_string();
    let simple = tmp.path().join("simple");
    ok(&stu(&["evaluate", "--ref", r.to_str().unwrap(), "--pred", p.to_str().unwrap(), "--label-list", "1,2,5", "--ignore-label", &ig, "--out", simple.to_str().unwrap()]));
    score(&with);
    let (a, b) = (summary(&simple), summary(&p));
    for l in ["1", "2", "5"] {
        assert_eq!(a["metric_per_case"][0]["metrics"][l], b["metric_per_case"][0]["metrics"][l], "label {l}");
    }
    assert_eq!(a["mean"].as_object().unwrap().len(), 3);
    // Found in the references, the ignore value is no label either.
    ok(&stu(&["evaluate", "--ref", r.to_str().unwrap(), "--pred", p.to_str().unwrap(), "--ignore-label", &ig, "--out", simple.to_str().unwrap()]));
    assert!(summary(&simple)["mean"].get(&ig).is_none());

    // Several prediction folders (a cross-validation's folds) are scored as one set of cases.
    let p2 = tmp.path().join("pred2");
    std::fs::create_dir_all(&p2).unwrap();
    std::fs::copy(r.join("c.nii.gz"), r.join("d.nii.gz")).unwrap();
    stu_data::nifti_io::write_label_as(&p2.join("d.nii.gz"), &sparse, &full.geom, false).unwrap();
    let both = tmp.path().join("both");
    ok(&stu(&["evaluate", "--ref", r.to_str().unwrap(), "--pred", p.to_str().unwrap(), p2.to_str().unwrap(), "--labels", with.to_str().unwrap(), "--out", both.to_str().unwrap()]));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(both.join("summary.json")).unwrap()).unwrap();
    let cases: Vec<&str> = s["metric_per_case"].as_array().unwrap().iter().map(|c| c["prediction_file"].as_str().unwrap()).collect();
    assert!(cases.len() == 2 && cases[0].ends_with("pred/c.nii.gz") && cases[1].ends_with("pred2/d.nii.gz"), "{cases:?}");
    let no_out = stu(&["evaluate", "--ref", r.to_str().unwrap(), "--pred", p.to_str().unwrap(), p2.to_str().unwrap()]);
    assert!(!no_out.status.success() && String::from_utf8_lossy(&no_out.stderr).contains("--out"));
    std::fs::copy(p.join("c.nii.gz"), p2.join("c.nii.gz")).unwrap();
    let twice = stu(&["evaluate", "--ref", r.to_str().unwrap(), "--pred", p.to_str().unwrap(), p2.to_str().unwrap(), "--out", both.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&twice.stderr);
    assert!(!twice.status.success() && err.contains("c.nii.gz") && err.contains("scored once"), "{err}");
    // A tolerance that is no distance is refused, not scored as NSD -0.
    for t in ["nan", "-2", "1:inf"] {
        let out = stu(&["evaluate", "--ref", r.to_str().unwrap(), "--pred", p.to_str().unwrap(), &format!("--nsd-tolerance={t}")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("--nsd-tolerance") && err.contains("not a tolerance"), "{t}: {err}");
    }
    // A truncated prediction: an error that names the file, once.
    let bytes = std::fs::read(p2.join("d.nii.gz")).unwrap();
    std::fs::write(p2.join("d.nii.gz"), &bytes[..bytes.len() / 2]).unwrap();
    let cut = stu(&["evaluate", "--ref", r.to_str().unwrap(), "--pred", p2.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&cut.stderr);
    assert!(!cut.status.success() && err.matches("d.nii.gz").count() == 1 && err.contains("truncated"), "{err}");
}

#[test]
fn metrics_match_deepmind_surface_distance_and_nnunet_on_real_label_maps() {
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tests::own_fixtures().join("metrics.json")).unwrap()).unwrap();
    let tol = fixture["tolerance_mm"].as_f64().unwrap();
    for (case, want) in fixture["cases"].as_object().unwrap() {
        let tmp = tempfile::tempdir().unwrap();
        let (r, p) = (tmp.path().join("ref"), tmp.path().join("pred"));
        std::fs::create_dir_all(&r).unwrap();
        std::fs::create_dir_all(&p).unwrap();
        let src = shared().join("data").join(case);
        let name = Path::new(case).file_name().unwrap();
        std::fs::copy(&src, r.join(name)).unwrap();
        // Same perturbation as the generator: shift by one along nibabel's last axis (our axis
        // 0), drop labels l % 5 == 3.
        let v = stu_data::nifti_io::read_label(&src).unwrap();
        let [_, ny, nx] = v.geom.shape;
        let plane = ny * nx;
        let mut pred = vec![0u16; v.data.len()];
        pred[plane..].copy_from_slice(&v.data[..v.data.len() - plane]);
        pred.iter_mut().filter(|l| **l % 5 == 3).for_each(|l| *l = 0);
        stu_data::nifti_io::write_label(&p.join(name), &pred, &v.geom).unwrap();
        ok(&stu(&["evaluate", "--ref", r.to_str().unwrap(), "--pred", p.to_str().unwrap(), "--nsd-tolerance", &tol.to_string(), "--hd95", "--assd"]));
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p.join("summary.json")).unwrap()).unwrap();
        let got = &s["metric_per_case"][0]["metrics"];
        let mut checked = 0;
        for (label, m) in want.as_object().unwrap() {
            for key in ["Dice", "IoU", "NSD", "HD95", "ASSD"] {
                let (w, g) = (&m[key], &got[label][key]);
                match (w.as_f64(), g.as_f64()) {
                    (Some(w), Some(g)) => assert!((w - g).abs() <= 1e-6 * (1.0 + w.abs()), "{case} label {label} {key}: want {w}, got {g}"),
                    (None, None) => {}
                    _ => panic!("{case} label {label} {key}: want {w}, got {g}"),
                }
                checked += 1;
            }
        }
        assert!(checked > 50, "{case}: {checked}");
    }
}

#[test]
fn metaimage_and_nrrd_datasets_plan_train_validate_and_predict_as_their_nifti_twin() {
    // The real MR case twice (`a` trains, `b` validates), as NIfTI and converted to MetaImage
    // (`file_ending` ".mha", as Grand Challenge distributes and nnU-Net reads through SimpleITK)
    // and to NRRD (3D Slicer's): the same plan and bit-identical preprocessed arrays; then a
    // tiny training on the MetaImage twin writes its validation and predictions as .mha, which
    // equal the same checkpoint's predictions from the NIfTI and NRRD files (written as .nrrd)
    // and are scored against .mha labels.
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let nii = mr_case_twice(tmp.path(), |_| {}, |l| l.data.clone());
    let twin = |ending: &str| {
        let dir = tmp.path().join(format!("raw-{}", &ending[1..]));
        for d in ["imagesTr", "labelsTr"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(nii.join("dataset.json")).unwrap()).unwrap();
        json["file_ending"] = ending.into();
        std::fs::write(dir.join("dataset.json"), json.to_string()).unwrap();
        std::fs::copy(nii.join("splits_final.json"), dir.join("splits_final.json")).unwrap();
        for id in ["a", "b"] {
            let img = stu_data::nifti_io::read_image(&nii.join(format!("imagesTr/{id}_0000.nii.gz"))).unwrap();
            stu_data::nifti_io::write_image(&dir.join(format!("imagesTr/{id}_0000{ending}")), &img.data, &img.geom).unwrap();
            let lab = stu_data::nifti_io::read_label(&nii.join(format!("labelsTr/{id}.nii.gz"))).unwrap();
            stu_data::nifti_io::write_label(&dir.join(format!("labelsTr/{id}{ending}")), &lab.data, &lab.geom).unwrap();
        }
        dir
    };
    let (mha, nrrd) = (twin(".mha"), twin(".nrrd"));
    for (raw, name) in [(&nii, "nii"), (&mha, "mha"), (&nrrd, "nrrd")] {
        let raw = raw.to_str().unwrap();
        ok(&stu(&["dataset", "check", raw]));
        ok(&stu(&["plan", raw, "--out", &t(&format!("plans-{name}/plans.json"))]));
        ok(&stu(&["preprocess", raw, "--plans", &t(&format!("plans-{name}/plans.json")), "--out", &t(&format!("pre-{name}"))]));
    }
    let plans = |name: &str| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(t(&format!("plans-{name}/plans.json"))).unwrap()).unwrap() };
    for twin in ["mha", "nrrd"] {
        assert_eq!(plans("nii")["configurations"], plans(twin)["configurations"]);
        for f in ["a_data.f32", "a_seg.i16", "b_data.f32", "b_seg.i16"] {
            assert!(std::fs::read(t(&format!("pre-nii/{f}"))).unwrap() == std::fs::read(t(&format!("pre-{twin}/{f}"))).unwrap(), "{twin}: {f}");
        }
    }
    let log = ok(&stu(&["train", &t("pre-mha"), "--out", &t("run"), "--model-options", r#"{"depth":[1,1,1],"dims":[4,8,8]}"#, "--epochs", "1", "--iterations", "2", "--val-iterations", "1", "--patch-size", "16,32,32"]));
    assert!(log.contains("final validation: 1 case(s) (1 predicted now)"), "{log}");
    let val = stu_data::nifti_io::read_label(&tmp.path().join("run/validation/b.mha")).unwrap();
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(t("run/validation/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["metric_per_case"].as_array().unwrap().len(), 1);
    assert!(summary["metric_per_case"][0]["reference_file"].as_str().unwrap().ends_with("b.mha"));
    ok(&stu(&["predict", "-i", &t("raw-mha/imagesTr"), "-o", &t("pred-mha"), "--checkpoint", &t("run")]));
    ok(&stu(&["predict", "-i", &t("raw/imagesTr"), "-o", &t("pred-nii"), "--checkpoint", &t("run")]));
    ok(&stu(&["predict", "-i", &t("raw-nrrd/imagesTr"), "-o", &t("pred-nrrd"), "--checkpoint", &t("run")]));
    let from_mha = stu_data::nifti_io::read_label(&tmp.path().join("pred-mha/b.mha")).unwrap();
    let from_nii = stu_data::nifti_io::read_label(&tmp.path().join("pred-nii/b.nii.gz")).unwrap();
    let from_nrrd = stu_data::nifti_io::read_label(&tmp.path().join("pred-nrrd/b.nrrd")).unwrap();
    assert!(from_mha.data == val.data && from_nii.data == val.data && from_nrrd.data == val.data);
    for other in [&from_nii, &from_nrrd] {
        assert!(from_mha.geom.affine_mismatch(&other.geom) < 1e-6 && from_mha.geom.shape == other.geom.shape);
    }
    // Scored against the .mha labels, and against the NIfTI ones (paired by case id).
    let log = ok(&stu(&["evaluate", "--ref", &t("raw-mha/labelsTr"), "--pred", &t("pred-mha"), "--labels", &t("raw-mha/dataset.json"), "--out", &t("eval-mha")]));
    let log2 = ok(&stu(&["evaluate", "--ref", &t("raw/labelsTr"), "--pred", &t("pred-mha"), "--labels", &t("raw/dataset.json"), "--out", &t("eval-mixed")]));
    let score = |d: &str| -> serde_json::Value { serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(t(&format!("{d}/summary.json"))).unwrap()).unwrap()["foreground_mean"].clone() };
    assert_eq!(score("eval-mha"), score("eval-mixed"), "{log}{log2}");
}

/// `stu find-best-config` (nnU-Net's `nnUNetv2_find_best_configuration`): two models trained on
/// the same two folds of the real MR case, and a third candidate whose "predictions" are the
/// labels themselves, compared on their cross-validations, singly and ensembled in pairs.
#[test]
fn find_best_config_compares_cross_validations_singly_and_in_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    // One foreground label (every organ of the case), so that each Dice is defined.
    let raw = mr_case_twice(tmp.path(), |j| j["labels"] = serde_json::json!({"background": 0, "organ": 1}), |l| l.data.iter().map(|&v| u16::from(v > 0)).collect());
    std::fs::write(raw.join("splits_final.json"), r#"[{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}]"#).unwrap();
    let raw_s = raw.to_str().unwrap();
    ok(&stu(&["plan", raw_s, "--out", &t("plans/plans.json")]));
    ok(&stu(&["preprocess", raw_s, "--plans", &t("plans/plans.json"), "--out", &t("pre")]));
    for (run, fold, seed) in [("x0", "0", "0"), ("x1", "1", "0"), ("y0", "0", "1"), ("y1", "1", "1")] {
        ok(&stu(&["train", &t("pre"), "--out", &t(run), "--fold", fold, "--seed", seed, "--model-options", r#"{"depth":[1,1,1],"dims":[4,8,8]}"#, "--epochs", "1", "--iterations", "2", "--val-iterations", "1", "--patch-size", "16,32,32", "--validation-probabilities"]));
    }
    for (fold, case) in [("0", "b"), ("1", "a")] {
        let dir = tmp.path().join(format!("truth/fold{fold}/validation"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(raw.join(format!("labelsTr/{case}.nii.gz")), dir.join(format!("{case}.nii.gz"))).unwrap();
    }
    let (labels_tr, json) = (raw.join("labelsTr"), raw.join("dataset.json"));
    let find = |models: &[String], out: &str, extra: &[&str]| {
        let mut args: Vec<String> = ["find-best-config", "--ref", labels_tr.to_str().unwrap(), "--labels", json.to_str().unwrap(), "--out", &t(out)].map(String::from).to_vec();
        for m in models {
            args.extend(["--model".to_string(), m.clone()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Command::new(stu_bin!()).args(&args).output().unwrap()
    };
    let (x, y, truth) = (format!("x={},{}", t("x0"), t("x1")), format!("y={},{}", t("y0"), t("y1")), format!("truth={},{}", t("truth/fold0"), t("truth/fold1")));
    let log = ok(&find(&[x.clone(), y.clone(), truth.clone()], "best", &[]));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("best/best_config.json")).unwrap()).unwrap();
    // The labels themselves win (Dice 1), over both models and their ensemble; the pairs with
    // them are skipped for want of probabilities, and said so.
    assert_eq!(config["best"], "truth", "{log}");
    assert_eq!(config["cases"], 2);
    assert_eq!(config["candidates"][2]["dice"], 1.0);
    assert_eq!(config["ensembles"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect::<Vec<_>>(), ["x+y"]);
    let skipped = config["skipped"].as_array().unwrap();
    assert!(skipped.len() == 2 && skipped.iter().all(|s| s.as_str().unwrap().contains("`truth` has no probabilities")), "{skipped:?}");
    // Each candidate's score is `stu evaluate` of its folds' validations together.
    ok(&stu(&["evaluate", "--ref", labels_tr.to_str().unwrap(), "--pred", &t("x0/validation"), &t("x1/validation"), "--labels", json.to_str().unwrap(), "--out", &t("eval-x")]));
    let eval_x: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("eval-x/summary.json")).unwrap()).unwrap();
    assert_eq!(config["candidates"][0]["dice"], eval_x["foreground_mean"]["Dice"]);
    // The pair's maps are `stu ensemble`'s of the same fold's validations.
    ok(&stu(&["ensemble", "--pred", &t("x0/validation"), &t("y0/validation"), "-o", &t("ens-b")]));
    let read = |p: &str| stu_data::nifti_io::read_label(&tmp.path().join(p)).unwrap().data;
    assert!(read("best/ensembles/x+y/b.nii.gz") == read("ens-b/b.nii.gz"));
    assert!(tmp.path().join("best/postprocessing/postprocessing.json").exists());
    // Between the two models, the instructions predict as the winner did.
    ok(&find(&[x.clone(), y.clone()], "best2", &[]));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("best2/best_config.json")).unwrap()).unwrap();
    let dice = |e: &serde_json::Value| e["dice"].as_f64().unwrap_or(f64::NEG_INFINITY);
    let entries: Vec<&serde_json::Value> = config["candidates"].as_array().unwrap().iter().chain(config["ensembles"].as_array().unwrap()).collect();
    let top = entries.iter().fold(entries[0], |b, e| if dice(e) > dice(b) { e } else { b });
    assert_eq!(config["best"], top["name"]);
    let text = std::fs::read_to_string(tmp.path().join("best2/inference_instructions.txt")).unwrap();
    let want = match top["name"].as_str().unwrap() {
        "x" => format!("--checkpoint {} {} --postprocessing", t("x0"), t("x1")),
        "y" => format!("--checkpoint {} {} --postprocessing", t("y0"), t("y1")),
        _ => "stu ensemble --pred OUTPUT_FOLDER_x OUTPUT_FOLDER_y".to_string(),
    };
    assert!(text.contains(&want), "{want}\n{text}");
    // Without ensembling, only the candidates.
    ok(&find(&[x.clone(), y.clone()], "best3", &["--disable-ensembling"]));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("best3/best_config.json")).unwrap()).unwrap();
    assert!(config["ensembles"].as_array().unwrap().is_empty() && config["skipped"][0].as_str().unwrap().contains("disabled"));
    // Mistakes are named: different folds, a run without validation, a name twice.
    let fails = |models: &[String], want: &str| {
        let r = find(models, "bad", &[]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && err.contains(want), "{want}: {err}");
    };
    fails(&[x.clone(), format!("y={}", t("y0"))], "validate different cases (`a` is in one only)");
    fails(&[x.clone(), format!("y={}", t("pre"))], &format!("{}: no validation predictions", t("pre")));
    fails(&[x.clone(), x.clone()], "candidate `x` is named twice");
    // An installed model keeps its validation summaries, not the predictions behind them.
    ok(&stu(&["export-model", &t("y0"), &t("y1"), "--out", &t("y.zip")]));
    ok(&stu(&["install-model", &t("y.zip"), "--out", &t("y-installed")]));
    fails(&[x.clone(), format!("y={}", t("y-installed"))], "no predicted label maps");
    fails(&["x".to_string()], "expected NAME=RUN");
    // Validations of the best checkpoints: all of a candidate's alike, or refused; the
    // instructions then predict with `--chk best`.
    ok(&stu(&["validate", &t("x0"), "--checkpoint", "best", "--probabilities"]));
    fails(std::slice::from_ref(&x), "different checkpoints (checkpoint_best.safetensors, checkpoint_final.safetensors)");
    ok(&stu(&["validate", &t("x1"), "--checkpoint", "best", "--probabilities"]));
    ok(&find(std::slice::from_ref(&x), "best4", &[]));
    let text = std::fs::read_to_string(tmp.path().join("best4/inference_instructions.txt")).unwrap();
    assert!(text.contains(&format!("--checkpoint {} {} --chk best --postprocessing", t("x0"), t("x1"))), "{text}");
}
