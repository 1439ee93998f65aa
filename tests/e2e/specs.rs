//! Study specs: every shipped spec validates; mistakes are rejected naming the key; a tiny
//! study runs end to end, resumes by skipping finished points, and keeps going past a failure.

use std::process::{Command, Output};

use tests::stu_bin;

fn stu(args: &[&str]) -> Output {
    Command::new(stu_bin!()).args(args).output().expect("runs")
}

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn shipped_specs_validate_and_mistakes_name_the_key() {
    for e in std::fs::read_dir(root().join("experiments")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let out = stu(&["spec", "check", p.to_str().unwrap()]);
            assert!(out.status.success(), "{}: {}", p.display(), String::from_utf8_lossy(&out.stderr));
            // The paper-scale overrides resolve too.
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(text.contains("[paper_scale]"), "{}: no paper-scale variant", p.display());
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("name = \"x\"\n[dataset]\nplugin = \"phantom\"\n[model]\nname = \"stunet\"\n[train]\nepohcs = 3\n", "epohcs"),
        ("name = \"x\"\n[dataset]\nplugin = \"phantom\"\n[model]\nname = \"stunet\"\n[train]\nepochs = \"many\"\n", "train.epochs"),
        ("name = \"x\"\n[dataset]\nplugin = \"phantomm\"\n[model]\nname = \"stunet\"\n", "dataset.plugin"),
        ("name = \"x\"\nbackend = \"gpu\"\n[dataset]\nplugin = \"phantom\"\n[model]\nname = \"stunet\"\n", "backend"),
        ("name = \"x\"\n[dataset]\nplugin = \"phantom\"\nfraction = 2.0\n[model]\nname = \"stunet\"\n", "dataset.fraction"),
        ("name = \"x\"\n[dataset]\nplugin = \"phantom\"\n[model]\nname = \"stunet\"\n[sweep]\n\"train.epohcs\" = [1, 2]\n", "epohcs"),
        ("name = \"x\"\n[dataset]\nplugin = \"phantom\"\n[model]\nname = \"stunet\"\n[predict]\nlabel_map = \"nowhere\"\n", "predict.label_map"),
        // One bad value of a sweep fails before anything runs, as does a network without a size.
        ("name = \"x\"\n[dataset]\nplugin = \"phantom\"\n[model]\nname = \"stunet\"\noptions = { preset = \"stunet-s\" }\n[sweep]\n\"model.name\" = [\"stunet\", \"stunett\"]\n", "`model.name`: unknown model `stunett`"),
        ("name = \"x\"\n[dataset]\nplugin = \"phantom\"\n[model]\nname = \"stunet\"\n", "`model.options`"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let p = tmp.path().join(format!("bad{i}.toml"));
        std::fs::write(&p, text).unwrap();
        let out = stu(&["spec", "check", p.to_str().unwrap()]);
        assert!(!out.status.success(), "case {i} passed");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key) && err.contains(&format!("bad{i}.toml")), "case {i}: {err}");
    }
    // --set overrides are validated the same way.
    let out = stu(&["spec", "check", root().join("experiments/quickstart.toml").to_str().unwrap(), "--set", "train.epochs=0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("train.epochs"));
}

#[test]
fn a_tiny_study_runs_resumes_and_survives_a_failed_point() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("tiny.toml");
    std::fs::write(
        &spec,
        r#"name = "tiny"
[dataset]
plugin = "phantom"
options = { cases = 5, test_cases = 1, seed = 3 }
[model]
name = "stunet"
options = { depth = [1, 1, 1], dims = [4, 8, 8] }
[train]
epochs = 1
iterations = 2
val_iterations = 1
patch_size = [16, 32, 32]
[predict]
tta = false
[evaluate]
nsd_tolerance = 4.0
[sweep]
seed = [0, 1]
"train.patch_size" = [[16, 32, 32], [15, 32, 32]]
[paper_scale]
set = { "train.epochs" = 10 }
compute = "none"
"#,
    )
    .unwrap();
    let out_dir = tmp.path().join("runs");
    let run = stu(&["run", spec.to_str().unwrap(), "--out", out_dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&run.stderr).to_string();
    // The 15-voxel patch does not fit the network's strides: those two points fail, the
    // others finish, and the exit code says so.
    assert!(!run.status.success(), "{err}");
    assert!(err.contains("2 done") && err.contains("2 failed"), "{err}");
    let mut records = Vec::new();
    for e in std::fs::read_dir(&out_dir).unwrap() {
        let d = e.unwrap().path();
        if d.join("record.json").exists() {
            records.push(serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(d.join("record.json")).unwrap()).unwrap());
        } else if d.join("error.txt").exists() {
            assert!(std::fs::read_to_string(d.join("error.txt")).unwrap().contains("divisible"));
        }
    }
    assert_eq!(records.len(), 2);
    for r in &records {
        assert!(r["metrics"]["foreground_mean"]["Dice"].is_number() || r["metrics"]["foreground_mean"]["Dice"].is_null());
        assert!(r["git"]["revision"].is_string() || r["git"]["revision"].is_null());
        assert_eq!(r["backend"], "flex");
        assert!(r["timings"]["train_s"].as_f64().unwrap() > 0.0);
        assert_eq!(r["metrics"]["per_case"].as_array().unwrap().len(), 1);
    }
    // A rerun skips the finished points and retries the failed ones.
    let again = stu(&["run", spec.to_str().unwrap(), "--out", out_dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("2 skipped") && err.contains("2 failed"), "{err}");
    // Removing the bad axis leaves points identical to the finished ones: all skipped.
    let text = std::fs::read_to_string(&spec).unwrap().replace("\"train.patch_size\" = [[16, 32, 32], [15, 32, 32]]\n", "");
    std::fs::write(&spec, text).unwrap();
    let fixed = stu(&["run", spec.to_str().unwrap(), "--out", out_dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&fixed.stderr);
    assert!(fixed.status.success(), "{err}");
    assert!(err.contains("2 skipped, 0 failed"), "{err}");

    // Job arrays (`cargo xtask run --emit slurm`): count, prepare the data once, one point per task.
    let sp = spec.to_str().unwrap();
    let count = stu(&["run", sp, "--count"]);
    assert_eq!(String::from_utf8_lossy(&count.stdout).trim(), "2");
    let bad = stu(&["run", sp, "--point", "2"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--point 2: the study has 2 point(s)"));
    let array_dir = tmp.path().join("array");
    let a = array_dir.to_str().unwrap();
    let data = stu(&["run", sp, "--out", a, "--data-only"]);
    assert!(data.status.success(), "{}", String::from_utf8_lossy(&data.stderr));
    assert!(array_dir.join("data").read_dir().unwrap().count() == 1, "one dataset for both seeds");
    let records = |dir: &std::path::Path| std::fs::read_dir(dir).unwrap().filter(|e| e.as_ref().unwrap().path().join("record.json").exists()).count();
    assert_eq!(records(&array_dir), 0);
    let one = stu(&["run", sp, "--out", a, "--point", "1"]);
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
    assert_eq!(records(&array_dir), 1);
}

fn tiny_overrides() -> Vec<String> {
    [
        "model.options={depth=[1,1,1],dims=[4,8,8]}",
        "train.epochs=1",
        "train.iterations=2",
        "train.val_iterations=1",
        "train.patch_size=[16,32,32]",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_tiny(spec: &str, extra: &[&str], out: &std::path::Path) -> Vec<serde_json::Value> {
    let mut args = vec!["run".to_string(), root().join("experiments").join(spec).to_str().unwrap().to_string(), "--out".into(), out.to_str().unwrap().to_string()];
    for o in tiny_overrides().iter().map(String::as_str).chain(extra.iter().copied()) {
        args.push("--set".into());
        args.push(o.into());
    }
    let r = Command::new(stu_bin!()).args(&args).current_dir(root()).output().unwrap();
    assert!(r.status.success(), "{spec}: {}", String::from_utf8_lossy(&r.stderr));
    let mut recs: Vec<serde_json::Value> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path().join("record.json")).ok())
        .map(|t| serde_json::from_str(&t).unwrap())
        .collect();
    recs.sort_by_key(|r| r["id"].as_str().unwrap().to_string());
    recs
}

#[test]
fn direct_inference_and_finetune_studies_run_at_tiny_scale() {
    let tmp = tempfile::tempdir().unwrap();
    // Direct inference: a 105-output model trained on the phantom in STU-Net ids, applied to an
    // organs-only phantom through a label map.
    let recs = run_tiny("direct_inference.toml", &[], &tmp.path().join("di"));
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r["model"]["num_classes"], 105);
    assert_eq!(r["metrics"]["per_case"].as_array().unwrap().len(), 4);
    let names: Vec<&str> = r["metrics"]["label_names"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(names, ["liver", "spleen", "lung_lower_lobe_left"]);
    // Fine-tuning vs scratch: the pre-trained point transfers all but the heads.
    let recs = run_tiny("finetune.toml", &["pretrain.epochs=1", "pretrain.iterations=2"], &tmp.path().join("ft"));
    assert_eq!(recs.len(), 2);
    let transfers: Vec<&serde_json::Value> = recs.iter().map(|r| &r["training"]["transfer"]).collect();
    assert_eq!(transfers.iter().filter(|t| t.is_null()).count(), 1, "one point from scratch");
    let ft = transfers.iter().find(|t| !t.is_null()).unwrap();
    assert_eq!(ft["reinitialised"].as_array().unwrap().len(), 4, "2 heads × (weight, bias) of the 3-stage model");
    assert!(ft["transferred"].as_u64().unwrap() > 20);
}

#[test]
fn the_recipe_ablation_runs_its_variants_at_tiny_scale() {
    // `[[variants]]`: one point per variant, each folder named after it, each training with its
    // overrides, each record naming its variant.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("abl");
    let recs = run_tiny("recipe_ablation.toml", &[], &out);
    assert_eq!(recs.len(), 7);
    let by_variant = |name: &str| recs.iter().find(|r| r["variant"].as_str().is_some_and(|v| v.starts_with(name))).unwrap_or_else(|| panic!("{name}"));
    let baseline = by_variant("nnU-Net");
    assert_eq!(baseline["point"], serde_json::json!({}));
    assert_eq!(by_variant("CE")["point"], serde_json::json!({"train.loss": "ce"}));
    assert_eq!(by_variant("AdamW")["spec"]["train"]["optimizer"], "adamw");
    assert_eq!(by_variant("no deep")["spec"]["train"]["deep_supervision"], false);
    for r in &recs {
        assert_eq!(r["swept"], serde_json::json!({}), "no sweep axis");
    }
    let dirs: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n != "data").collect();
    assert!(dirs.iter().any(|d| d.starts_with("CE-nnUNetTrainerCELoss-")), "{dirs:?}");
    // Each point trained with its variant: the run's train.json records it.
    let ce = dirs.iter().find(|d| d.starts_with("CE-")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join(ce).join("train/train.json")).unwrap()).unwrap();
    assert_eq!(cfg["loss"], "ce");
}
