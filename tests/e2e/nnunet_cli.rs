//! nnU-Net's own commands (`stu nnUNetv2_*`) over `nnUNet_raw`, `nnUNet_preprocessed` and
//! `nnUNet_results`, end to end on the shared MR dataset: plan and preprocess, train, predict,
//! evaluate, ensemble, in nnU-Net's folder layout.

use std::path::Path;
use std::process::{Command, Output};

use tests::{shared, stu_bin};

/// `stu ARGS` with exactly nnU-Net's folder variables `env` set.
pub(crate) fn nnunet(env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut c = Command::new(stu_bin!());
    c.env_remove("nnUNet_raw").env_remove("nnUNet_preprocessed").env_remove("nnUNet_results");
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args).output().expect("runs")
}

pub(crate) fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stu failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

pub(crate) fn fails(out: &Output, says: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && says.iter().all(|s| err.contains(s)), "expected a failure saying {says:?}:\n{err}");
}

#[test]
fn nnunets_commands_plan_train_predict_evaluate_and_ensemble_in_its_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let (raw, pre, res) = (shared().join("data"), tmp.path().join("pre"), tmp.path().join("res"));
    let env = [("nnUNet_raw", raw.as_path()), ("nnUNet_preprocessed", pre.as_path()), ("nnUNet_results", res.as_path())];
    let name = "Dataset802_TotalSegExampleMR";
    // Without the folders' variables: named.
    fails(&nnunet(&[], &["nnUNetv2_plan_and_preprocess", "-d", "802"]), &["nnUNet_raw is not set"]);
    fails(&nnunet(&env, &["nnUNetv2_plan_and_preprocess", "-d", "899"]), &["Dataset899_"]);
    let log = ok(&nnunet(&env, &["nnUNetv2_plan_and_preprocess", "-d", "802", "-c", "3d_fullres", "3d_lowres", "--verify_dataset_integrity", "-np", "4"]));
    assert!(log.contains("→ stu plan") && log.contains("→ stu preprocess"), "{log}");
    let dpre = pre.join(name);
    for f in ["nnUNetPlans.json", "dataset.json", "dataset_fingerprint.json"] {
        assert!(dpre.join(f).is_file(), "{f}");
    }
    // The preprocessed cases sit in the configuration's data_identifier folder.
    let plans: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dpre.join("nnUNetPlans.json")).unwrap()).unwrap();
    let id = plans["configurations"]["3d_fullres"]["data_identifier"].as_str().unwrap();
    assert!(dpre.join(id).join("source.json").is_file(), "{id}");
    // (This small MR gets no 3d_lowres from the planner: skipped, as nnU-Net does.)
    assert!(plans["configurations"].get("3d_lowres").is_none() && log.contains("configuration 3d_lowres not in"), "{log}");

    // The two halves on their own, under another plans name (its data folder follows it).
    ok(&nnunet(&env, &["nnUNetv2_plan_experiment", "-d", name, "-overwrite_plans_name", "SplitPlans"]));
    ok(&nnunet(&env, &["nnUNetv2_preprocess", "-d", "802", "-plans_name", "SplitPlans", "-c", "3d_fullres"]));
    let split: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dpre.join("SplitPlans.json")).unwrap()).unwrap();
    assert_eq!((split["plans_name"].as_str(), split["configurations"]["3d_fullres"]["data_identifier"].as_str()), (Some("SplitPlans"), Some("SplitPlans_3d_fullres")));
    assert!(dpre.join("SplitPlans_3d_fullres/source.json").is_file());
    fails(&nnunet(&env, &["nnUNetv2_preprocess", "-d", "802", "-plans_name", "Missing"]), &["Missing.json"]);
    let png = tmp.path().join("png");
    ok(&nnunet(&env, &["nnUNetv2_plot_overlay_pngs", "-d", "802", "-o", png.to_str().unwrap()]));
    assert!(png.join("ts_mr_sm.png").is_file());

    // Train: a tiny STU-Net through STU-Net's trainer name, our options after `--`.
    fails(&nnunet(&env, &["nnUNetv2_train", "802", "3d_fullres", "all", "-tr", "STUNetTrainer_tiny"]), &["STUNetTrainer_small|base|large|huge"]);
    fails(&nnunet(&env, &["nnUNetv2_train", "802", "3d_fullres", "all", "-tr", "STUNetTrainer_base_ft"]), &["-pretrained_weights"]);
    fails(&nnunet(&env, &["nnUNetv2_train", "802", "3d_fullres", "all", "--trainer", "X"]), &["unknown option `--trainer`"]);
    let tiny = ["--", "--model-options", r#"{"depth":[1,1,1],"dims":[4,8,8]}"#, "--iterations", "2", "--val-iterations", "0", "--patch-size", "16,32,32"];
    let mut train = vec!["nnUNetv2_train", "802", "3d_fullres", "all", "-tr", "STUNetTrainer_small_ep2k"];
    train.extend(tiny);
    train.extend(["--epochs", "1"]);
    let log = ok(&nnunet(&env, &train));
    assert!(log.contains("→ stu train") && log.contains("--epochs 2000") && log.contains("--model stunet"), "{log}");
    assert!(log.contains("fold `all` has no validation cases") && log.contains("scores its training cases"), "{log}");
    let model = res.join(name).join("STUNetTrainer_small_ep2k__nnUNetPlans__3d_fullres");
    assert!(model.join("fold_all/checkpoint_final.safetensors").is_file());
    for f in ["plans.json", "dataset.json", "dataset_fingerprint.json"] {
        assert!(model.join(f).is_file(), "{f}");
    }
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("fold_all/train.json")).unwrap()).unwrap();
    assert_eq!(record["epochs"], 1, "the options after -- come last and win");

    // Predict (fold all), evaluate and ensemble.
    let images = raw.join(name).join("imagesTr");
    let pred = tmp.path().join("pred");
    let (images_s, pred_s) = (images.to_str().unwrap(), pred.to_str().unwrap());
    fails(&nnunet(&env, &["nnUNetv2_predict", "-i", images_s, "-o", pred_s, "-d", "802", "-c", "3d_fullres", "-tr", "nnUNetTrainer"]), &["nnUNetTrainer__nnUNetPlans__3d_fullres", "no such model folder"]);
    let log = ok(&nnunet(&env, &["nnUNetv2_predict", "-i", images_s, "-o", pred_s, "-d", "802", "-c", "3d_fullres", "-tr", "STUNetTrainer_small_ep2k", "-f", "all", "--disable_tta", "--save_probabilities", "-npp", "2"]));
    assert!(log.contains("→ stu predict") && pred.join("ts_mr_sm.nii.gz").is_file() && pred.join("ts_mr_sm.npz").is_file() && pred.join("ts_mr_sm.pkl").is_file(), "{log}");
    let folder = ok(&nnunet(&env, &["nnUNetv2_predict_from_modelfolder", "-i", images_s, "-o", tmp.path().join("pred-m").to_str().unwrap(), "-m", model.to_str().unwrap(), "-f", "all", "--disable_tta"]));
    assert!(folder.contains("→ stu predict"), "{folder}");
    assert!(std::fs::read(pred.join("ts_mr_sm.nii.gz")).unwrap() == std::fs::read(tmp.path().join("pred-m/ts_mr_sm.nii.gz")).unwrap());
    let labels = raw.join(name).join("labelsTr");
    let dj = raw.join(name).join("dataset.json");
    fails(&nnunet(&env, &["nnUNetv2_evaluate_folder", labels.to_str().unwrap(), pred_s, "-djfile", dj.to_str().unwrap(), "-o", tmp.path().join("x.json").to_str().unwrap()]), &["summary.json"]);
    ok(&nnunet(&env, &["nnUNetv2_evaluate_folder", labels.to_str().unwrap(), pred_s, "-djfile", dj.to_str().unwrap(), "-pfile", dpre.join("nnUNetPlans.json").to_str().unwrap()]));
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(pred.join("summary.json")).unwrap()).unwrap();
    assert!(summary["metric_per_case"].as_array().unwrap().len() == 1 && summary["mean"]["1"]["Dice"].is_number(), "{summary}");
    ok(&nnunet(&env, &["nnUNetv2_evaluate_simple", labels.to_str().unwrap(), pred_s, "-l", "1", "2", "-o", tmp.path().join("simple/summary.json").to_str().unwrap()]));
    assert!(tmp.path().join("simple/summary.json").is_file());
    let ens = tmp.path().join("ens");
    ok(&nnunet(&env, &["nnUNetv2_ensemble", "-i", pred_s, pred_s, "-o", ens.to_str().unwrap(), "--save_npz"]));
    // One model twice: its own labels.
    let a = stu_data::nifti_io::read_label(&pred.join("ts_mr_sm.nii.gz")).unwrap().data;
    let b = stu_data::nifti_io::read_label(&ens.join("ts_mr_sm.nii.gz")).unwrap().data;
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(same * 100 >= a.len() * 99, "{same} of {}", a.len());
    // (--save_probabilities wrote nnU-Net's .npz and .pkl; the ensemble keeps that format.)
    assert!(ens.join("ts_mr_sm.npz").is_file() && ens.join("ts_mr_sm.pkl").is_file());
    // Post-processing decided on the predictions and applied (JSON; nnU-Net's pickle is not read).
    // (stu predict leaves the model's dataset.json beside its predictions, as nnU-Net's
    // predictor: the default -dataset_json.)
    assert!(std::fs::read(pred.join("dataset.json")).unwrap() == std::fs::read(&dj).unwrap());
    ok(&nnunet(&env, &["nnUNetv2_determine_postprocessing", "-i", pred_s, "-ref", labels.to_str().unwrap()]));
    assert!(pred.join("postprocessing.json").is_file());
    let bare = tmp.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(pred.join("ts_mr_sm.nii.gz"), bare.join("ts_mr_sm.nii.gz")).unwrap();
    fails(&nnunet(&env, &["nnUNetv2_determine_postprocessing", "-i", bare.to_str().unwrap(), "-ref", labels.to_str().unwrap()]), &["-dataset_json"]);
    ok(&nnunet(&env, &["nnUNetv2_determine_postprocessing", "-i", bare.to_str().unwrap(), "-ref", labels.to_str().unwrap(), "-dataset_json", dj.to_str().unwrap()]));
    let pp_out = tmp.path().join("pp");
    ok(&nnunet(&env, &["nnUNetv2_apply_postprocessing", "-i", pred_s, "-o", pp_out.to_str().unwrap(), "-pp_pkl_file", pred.join("postprocessing.pkl").to_str().unwrap()]));
    assert!(pp_out.join("ts_mr_sm.nii.gz").is_file());
    fails(&nnunet(&env, &["nnUNetv2_apply_postprocessing", "-i", pred_s, "-o", pp_out.to_str().unwrap(), "-pp_pkl_file", tmp.path().join("x.pkl").to_str().unwrap()]), &["pickles are not read"]);
    // The model as a zip, installed again, predicts the same.
    let zip = tmp.path().join("stu_small_802.zip");
    ok(&nnunet(&env, &["nnUNetv2_export_model_to_zip", "-d", "802", "-o", zip.to_str().unwrap(), "-tr", "STUNetTrainer_small_ep2k", "-f", "all"]));
    let log = ok(&nnunet(&env, &["nnUNetv2_install_pretrained_model_from_zip", zip.to_str().unwrap()]));
    let installed = res.join("installed/stu_small_802");
    assert!(installed.join("fold_all").is_dir(), "{log}");
    ok(&nnunet(&env, &["nnUNetv2_predict_from_modelfolder", "-i", images_s, "-o", tmp.path().join("pred-z").to_str().unwrap(), "-m", installed.to_str().unwrap(), "-f", "all", "--disable_tta"]));
    assert!(std::fs::read(pred.join("ts_mr_sm.nii.gz")).unwrap() == std::fs::read(tmp.path().join("pred-z/ts_mr_sm.nii.gz")).unwrap());
    // The folds' validations as one set (here fold all's, its predictions copied in).
    let val = model.join("fold_all/validation");
    std::fs::create_dir_all(&val).unwrap();
    std::fs::copy(pred.join("ts_mr_sm.nii.gz"), val.join("ts_mr_sm.nii.gz")).unwrap();
    ok(&nnunet(&env, &["nnUNetv2_accumulate_crossval_results", "-d", "802", "-c", "3d_fullres", "-tr", "STUNetTrainer_small_ep2k", "-f", "all"]));
    let cv: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("crossval_results_folds_all/summary.json")).unwrap()).unwrap();
    assert_eq!(cv["mean"]["1"], summary["mean"]["1"]);
    std::fs::remove_dir_all(&val).unwrap();
    // A model folder nnU-Net itself trained (fold_K/checkpoint_final.pth beside nothing of
    // ours; plans.json and dataset.json in the model folder) predicts as nnU-Net's predictor
    // would: its plans, the configuration its name ends with. Here: the parity fixture's
    // STU-Net as an nnU-Net v2 checkpoint.
    let theirs = res.join(name).join("STUNetTrainer_base__nnUNetPlans__3d_fullres");
    std::fs::create_dir_all(theirs.join("fold_0")).unwrap();
    std::fs::copy(shared().join("fixtures/stunet-parity/tiny_iso_nnunetv2.pth"), theirs.join("fold_0/checkpoint_final.pth")).unwrap();
    std::fs::copy(dpre.join("nnUNetPlans.json"), theirs.join("plans.json")).unwrap();
    std::fs::write(theirs.join("dataset.json"), r#"{"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 1, "file_ending": ".nii.gz"}"#).unwrap();
    let via = tmp.path().join("pred-theirs");
    ok(&nnunet(&env, &["nnUNetv2_predict", "-i", images_s, "-o", via.to_str().unwrap(), "-d", "802", "-c", "3d_fullres", "-tr", "STUNetTrainer_base", "-f", "0", "--disable_tta"]));
    let direct = tmp.path().join("pred-direct");
    let plans_s = theirs.join("plans.json");
    ok(&Command::new(stu_bin!()).args(["predict", "-i", images_s, "-o", direct.to_str().unwrap(), "--checkpoint", theirs.join("fold_0/checkpoint_final.pth").to_str().unwrap(), "--plans", plans_s.to_str().unwrap(), "--disable-tta"]).output().unwrap());
    assert!(std::fs::read(via.join("ts_mr_sm.nii.gz")).unwrap() == std::fs::read(direct.join("ts_mr_sm.nii.gz")).unwrap());
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(via.join("predict.json")).unwrap()).unwrap();
    assert_eq!(record["options"]["configuration"], "3d_fullres");
    fails(&nnunet(&env, &["nnUNetv2_predict", "-i", images_s, "-o", via.to_str().unwrap(), "-d", "802", "-c", "3d_fullres", "-tr", "STUNetTrainer_base", "-f", "0", "-chk", "checkpoint_best.pth"]), &["checkpoint_best.safetensors (or nnU-Net's checkpoint_best.pth)"]);
    std::fs::remove_dir_all(&theirs).unwrap();
    // find_best_configuration takes the trained trainer × plans × configuration folders.
    fails(&nnunet(&env, &["nnUNetv2_find_best_configuration", "802"]), &["nnUNetTrainer", "none of the asked"]);
    let best = nnunet(&env, &["nnUNetv2_find_best_configuration", "802", "-tr", "STUNetTrainer_small_ep2k", "-c", "3d_fullres", "-f", "all"]);
    let said = String::from_utf8_lossy(&best.stderr);
    assert!(said.contains("--model STUNetTrainer_small_ep2k__nnUNetPlans__3d_fullres=") && said.contains("fold_all"), "{said}");
    // --val: the final validation, asked for; fold all is scored on its training cases, as
    // nnU-Net does (after training it was skipped, and said how to ask).
    let val = ok(&nnunet(&env, &["nnUNetv2_train", "802", "3d_fullres", "all", "-tr", "STUNetTrainer_small_ep2k", "--val"]));
    assert!(val.contains("→ stu validate") && model.join("fold_all/validation/summary.json").is_file(), "{val}");
    assert!(model.join("fold_all/validation/ts_mr_sm.nii.gz").is_file());
}

#[test]
fn nnunets_dataset_conversions_write_into_nnunet_raw() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    let env = [("nnUNet_raw", raw.as_path())];
    let task = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/Task09_Tiny");
    let log = ok(&nnunet(&env, &["nnUNetv2_convert_MSD_dataset", "-i", task.to_str().unwrap(), "-overwrite_id", "909", "-np", "2"]));
    assert!(log.contains("→ stu dataset convert") && raw.join("Dataset909_Tiny/dataset.json").is_file(), "{log}");
    ok(&nnunet(&env, &["nnUNetv2_convert_MSD_dataset", "-i", task.to_str().unwrap()]));
    assert!(raw.join("Dataset009_Tiny/dataset.json").is_file());
    fails(&nnunet(&env, &["nnUNetv2_convert_old_nnUNet_dataset", task.to_str().unwrap(), "Tiny"]), &["DatasetXXX_Name"]);
}

#[test]
fn find_best_config_ensembles_the_validations_of_models_nnunet_trained() {
    // Two models trained by nnU-Net itself, their fold's validation with --npz (the members of
    // `tests/fixtures/make_npz_fixture.py`, exported by nnU-Net 2.8.1), scored against nnU-Net's
    // own ensemble of the two: the pair's ensemble wins with Dice 1 exactly.
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/npz");
    for m in ["a", "b"] {
        let val = tmp.path().join(format!("nnUNetTrainer_{m}/fold_0/validation"));
        std::fs::create_dir_all(&val).unwrap();
        for f in ["case.nii.gz", "case.npz"] {
            std::fs::copy(fixture.join(m).join(f), val.join(f)).unwrap();
        }
    }
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("reference.json")).unwrap()).unwrap();
    let labels: Vec<u16> = serde_json::from_value(reference["labels"].clone()).unwrap();
    let geom = stu_data::nifti_io::read_label(&fixture.join("a/case.nii.gz")).unwrap().geom;
    std::fs::create_dir_all(tmp.path().join("ref")).unwrap();
    stu_data::nifti_io::write_label_as(&tmp.path().join("ref/case.nii.gz"), &labels, &geom, false).unwrap();
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    ok(&Command::new(stu_bin!())
        .args(["find-best-config", "--ref", &t("ref"), "--labels", fixture.join("a/dataset.json").to_str().unwrap(), "--model", &format!("a={}", t("nnUNetTrainer_a/fold_0")), "--model", &format!("b={}", t("nnUNetTrainer_b/fold_0")), "--out", &t("best")])
        .output()
        .unwrap());
    let best: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("best/best_config.json")).unwrap()).unwrap();
    assert_eq!(best["best"], "a+b", "{best}");
    assert_eq!(best["ensembles"][0]["dice"], 1.0, "{best}");
    assert!(best["candidates"].as_array().unwrap().iter().all(|c| c["dice"].as_f64().unwrap() < 1.0), "{best}");
}

#[test]
fn nnunets_cascade_runs_through_its_commands() {
    // The phantom in nnUNet_raw with a small GPU memory target: nnU-Net's planner adds
    // 3d_lowres; its fold's final validation writes the next stage's segmentations, which
    // `nnUNetv2_train … 3d_cascade_fullres` finds by the same trainer and plans.
    let tmp = tempfile::tempdir().unwrap();
    let (raw, pre, res) = (tmp.path().join("raw"), tmp.path().join("pre"), tmp.path().join("res"));
    let env = [("nnUNet_raw", raw.as_path()), ("nnUNet_preprocessed", pre.as_path()), ("nnUNet_results", res.as_path())];
    let name = "Dataset950_Phantom";
    ok(&nnunet(&env, &["phantom", "--cases", "5", "--test-cases", "1", "--out", raw.join(name).to_str().unwrap()]));
    ok(&nnunet(&env, &["nnUNetv2_plan_and_preprocess", "-d", "950", "-gpu_memory_target", "0.1"]));
    let plans: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(pre.join(name).join("nnUNetPlans.json")).unwrap()).unwrap();
    for c in ["3d_fullres", "3d_lowres"] {
        let id = plans["configurations"][c]["data_identifier"].as_str().unwrap();
        assert!(pre.join(name).join(id).join("source.json").is_file(), "{c}");
    }
    let tiny = ["-tr", "STUNetTrainer_small", "--", "--model-options", r#"{"depth":[1,1,1,1],"dims":[4,8,8,8]}"#, "--epochs", "1", "--iterations", "2", "--val-iterations", "0"];
    fails(&nnunet(&env, &[&["nnUNetv2_train", "950", "3d_cascade_fullres", "all"][..], &tiny].concat()), &["train its previous stage first", "STUNetTrainer_small__nnUNetPlans__3d_lowres"]);
    ok(&nnunet(&env, &[&["nnUNetv2_train", "950", "3d_lowres", "all"][..], &tiny].concat()));
    let lowres = res.join(name).join("STUNetTrainer_small__nnUNetPlans__3d_lowres");
    assert!(lowres.join("fold_all/predicted_next_stage/3d_cascade_fullres").is_dir());
    let log = ok(&nnunet(&env, &[&["nnUNetv2_train", "950", "3d_cascade_fullres", "all"][..], &tiny].concat()));
    assert!(log.contains("--previous-stage") && log.contains("3d_lowres/fold_all"), "{log}");
    let images = raw.join(name).join("imagesTs");
    let (lo, casc) = (tmp.path().join("pred_lo"), tmp.path().join("pred"));
    let args = |c: &str, out: &Path| -> Vec<String> {
        ["nnUNetv2_predict", "-i", images.to_str().unwrap(), "-o", out.to_str().unwrap(), "-d", "950", "-c", c, "-tr", "STUNetTrainer_small", "-f", "all", "--disable_tta"].map(String::from).to_vec()
    };
    let run = |a: Vec<String>| nnunet(&env, &a.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&run(args("3d_lowres", &lo)));
    fails(&run(args("3d_cascade_fullres", &casc)), &["--previous-stage"]);
    let mut a = args("3d_cascade_fullres", &casc);
    a.extend(["-prev_stage_predictions".to_string(), lo.to_str().unwrap().to_string()]);
    ok(&run(a));
    let ids: Vec<String> = std::fs::read_dir(&lo).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.ends_with(".nii.gz")).collect();
    assert!(!ids.is_empty() && ids.iter().all(|n| casc.join(n).is_file()), "{ids:?}");
}

/// nnU-Net's pre-training recipe through its commands: the fingerprint alone
/// (`nnUNetv2_extract_fingerprint`, kept unless `--clean`), then the source dataset's plans moved
/// to the target (`nnUNetv2_move_plans_between_datasets`: the source's spacing, patch and CT
/// statistics under the target's name and another plans name, its data identifiers renamed), and
/// the target preprocessed with them.
#[test]
fn nnunets_pretraining_commands_fingerprint_and_move_plans() {
    let tmp = tempfile::tempdir().unwrap();
    let (raw, pre, res) = (shared().join("data"), tmp.path().join("pre"), tmp.path().join("res"));
    let env = [("nnUNet_raw", raw.as_path()), ("nnUNet_preprocessed", pre.as_path()), ("nnUNet_results", res.as_path())];
    let (source, target) = ("Dataset802_TotalSegExampleMR", "Dataset803_Colin27AAL");
    ok(&nnunet(&env, &["nnUNetv2_extract_fingerprint", "-d", "802", "-np", "2"]));
    let fp = pre.join(source).join("dataset_fingerprint.json");
    let first = std::fs::read(&fp).unwrap();
    let fingerprint: serde_json::Value = serde_json::from_slice(&first).unwrap();
    assert!(fingerprint["spacings"].as_array().is_some_and(|s| s.len() == 1) && fingerprint["foreground_intensity_properties_per_channel"]["0"]["mean"].is_number(), "{fingerprint}");
    assert!(ok(&nnunet(&env, &["nnUNetv2_extract_fingerprint", "-d", "802"])).contains("kept"));
    ok(&nnunet(&env, &["nnUNetv2_extract_fingerprint", "-d", "802", "--clean"]));
    assert_eq!(std::fs::read(&fp).unwrap(), first, "the same dataset, the same fingerprint");

    ok(&nnunet(&env, &["nnUNetv2_plan_experiment", "-d", "802"]));
    fails(&nnunet(&env, &["nnUNetv2_move_plans_between_datasets", "-s", "802", "-t", "803", "-sp", "Missing"]), &["Missing.json"]);
    ok(&nnunet(&env, &["nnUNetv2_move_plans_between_datasets", "-s", "802", "-t", "803", "-sp", "nnUNetPlans", "-tp", "Pre802Plans"]));
    let read = |p: std::path::PathBuf| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let (src, moved) = (read(pre.join(source).join("nnUNetPlans.json")), read(pre.join(target).join("Pre802Plans.json")));
    assert_eq!((moved["dataset_name"].as_str(), moved["plans_name"].as_str()), (Some(target), Some("Pre802Plans")));
    assert_eq!(moved["foreground_intensity_properties_per_channel"], src["foreground_intensity_properties_per_channel"]);
    for (name, c) in src["configurations"].as_object().unwrap() {
        let m = &moved["configurations"][name];
        assert_eq!((&m["spacing"], &m["patch_size"]), (&c["spacing"], &c["patch_size"]), "{name}");
        assert_eq!(m["data_identifier"].as_str().unwrap(), format!("Pre802Plans_{name}"), "{name}");
    }
    ok(&nnunet(&env, &["nnUNetv2_preprocess", "-d", "803", "-plans_name", "Pre802Plans", "-c", "3d_fullres"]));
    let case = read(pre.join(target).join("Pre802Plans_3d_fullres/colin27.json"));
    assert_eq!(case["spacing"], src["configurations"]["3d_fullres"]["spacing"], "the target at the source's spacing");
    fails(&nnunet(&env, &["nnUNetv2_download_pretrained_model_by_url", "https://example.org/m.zip"]), &["nothing is downloaded"]);
}
