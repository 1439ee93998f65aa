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
}
