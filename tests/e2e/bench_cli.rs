//! `stu bench`: the training-step and patch-inference cases at another patch size (named by
//! either id), and the errors for options this build or backend cannot honour or filters that
//! name no case; `stu check-ops` off libtorch.

use std::process::Command;

use tests::stu_bin;

#[test]
fn bench_runs_the_step_cases_at_a_smaller_patch_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(stu_bin!()).args(["bench", "--patch", "32", "train_S_32_b2", "infer_S", "--json"]).arg(&json).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let results = doc["results"].as_array().unwrap();
    let ids: Vec<&str> = results.iter().map(|r| r["case"].as_str().unwrap()).collect();
    assert_eq!(ids, ["train_S_32_b2", "infer_S_32"]);
    assert!(results[0]["train_s"].as_f64().unwrap() > 0.0 && results[1]["fwd_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_refuses_a_patch_it_cannot_downsample_and_a_profile_off_libtorch() {
    let out = Command::new(stu_bin!()).args(["bench", "--patch", "48", "infer_S"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--patch 48") && err.contains("multiple of 32"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(stu_bin!()).args(["bench", "infer_S", "--profile"]).arg(dir.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--profile") && err.contains("tch"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");
    // A filter that names no case is an error that lists them (at the patch asked for).
    let out = Command::new(stu_bin!()).args(["bench", "--patch", "64", "train_Q"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no bench case matches train_Q") && err.contains("train_S_64_b2"), "{err}");
}

/// `stu check-ops` checks a device against a reference: on flex, or on a backend not built in,
/// it says what it needs and fails (the comparisons themselves run in `stu-engine`'s tch tests,
/// the `--features wgpu` tests and on a GPU).
#[test]
fn check_ops_names_the_backend_it_needs() {
    let out = Command::new(stu_bin!()).args(["check-ops", "--backend", "flex"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("check-ops") && err.contains("`--backend tch` or `tch-cuda`") && err.contains("flex"), "{err}");
    let out = Command::new(stu_bin!()).args(["check-ops"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("backend `tch`") && err.contains("--features tch"), "{err}");
    let out = Command::new(stu_bin!()).args(["check-ops", "--backend", "wgpu"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--features wgpu"), "{err}");
}
