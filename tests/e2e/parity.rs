//! Forward parity with PyTorch on the shared fixture, through every checkpoint container, and on
//! the repository's own fixtures (anisotropic strides, several blocks, batch 2, 2 channels).

use std::path::Path;
use std::process::Command;

use stu_harness::forward::{ForwardOptions, ModelSource, StrideSource, forward};
use tests::{own_fixtures, parity_dir, read_tensor, rel_max_err, stu_bin};

const TOL: f64 = 1e-4;

fn check_outputs(out: &Path, reference: &Path, n: usize) {
    for i in 0..n {
        let key = format!("output.{i}");
        let (s_ours, ours) = read_tensor(out, &key);
        let (s_ref, want) = read_tensor(reference, &key);
        assert_eq!(s_ours, s_ref, "{key} shape");
        let err = rel_max_err(&ours, &want);
        assert!(err <= TOL, "{key}: max|out − ref| / max|ref| = {err:e} > {TOL:e}");
    }
}

#[test]
fn tiny_iso_matches_pytorch_in_all_three_containers() {
    let dir = tempfile::tempdir().unwrap();
    let reference = parity_dir().join("tiny_iso.safetensors");
    for file in ["tiny_iso.safetensors", "tiny_iso_nnunetv1.model", "tiny_iso_nnunetv2.pth"] {
        let out = dir.path().join(format!("{file}.out.safetensors"));
        let outs = forward(&ForwardOptions {
            model: ModelSource {
                checkpoint: parity_dir().join(file),
                model: None,
                strides: StrideSource::Default,
                backend: stu_engine::backend::Backend::Flex,
            },
            input: reference.clone(),
            input_key: "input".into(),
            output: out.clone(),
        })
        .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        assert_eq!(outs.len(), 5);
        check_outputs(&out, &reference, 5);
    }
}

#[test]
fn the_binary_checks_parity_with_explicit_strides() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let reference = parity_dir().join("tiny_iso.safetensors");
    let status = Command::new(stu_bin!())
        .args(["forward", "--checkpoint"])
        .arg(parity_dir().join("tiny_iso_nnunetv1.model"))
        .args(["--strides", "2,2,2:2,2,2:2,2,2:2,2,2:2,2,2", "--input"])
        .arg(&reference)
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    check_outputs(&out, &reference, 5);
}

#[test]
fn own_fixtures_match_pytorch() {
    // Made by tests/fixtures/make_fixtures.py with ../shared/bench/torch_ref.py; see its README.
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(own_fixtures().join("fixtures.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (name, spec) in index.as_object().unwrap() {
        let file = own_fixtures().join(format!("{name}.safetensors"));
        let strides: Vec<[usize; 3]> = serde_json::from_value(spec["strides"].clone()).unwrap();
        let out = dir.path().join(format!("{name}.out.safetensors"));
        forward(&ForwardOptions {
            model: ModelSource {
                checkpoint: file.clone(),
                model: None,
                strides: StrideSource::Explicit(strides),
                backend: stu_engine::backend::Backend::Flex,
            },
            input: file.clone(),
            input_key: "input".into(),
            output: out.clone(),
        })
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        check_outputs(&out, &file, spec["outputs"].as_array().unwrap().len());
        checked += 1;
    }
    assert!(checked >= 2, "expected the repository's fixtures, found {checked}");
}
