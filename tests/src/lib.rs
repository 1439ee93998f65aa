//! Helpers for the end-to-end tests: where the shared fixtures are, and how to compare outputs.

use std::path::{Path, PathBuf};

use stu_engine::checkpoint::StateDict;

/// `../shared` beside the repository (CI has it there too).
pub fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// The parity fixtures folder.
pub fn parity_dir() -> PathBuf {
    shared().join("fixtures/stunet-parity")
}

/// This repository's own test fixtures (`tests/fixtures`).
pub fn own_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The `stu` command line as built for this test run (`src/bin/stu-under-test.rs`).
#[macro_export]
macro_rules! stu_bin {
    () => {
        env!("CARGO_BIN_EXE_stu-under-test")
    };
}

/// max|a − b| / max|b| over two equally long slices.
pub fn rel_max_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let err = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    err / scale.max(f64::MIN_POSITIVE)
}

/// Reads tensor `key` of a safetensors file with its shape.
pub fn read_tensor(path: &Path, key: &str) -> (Vec<usize>, Vec<f32>) {
    let dict = StateDict::open(path).unwrap_or_else(|e| panic!("{e}"));
    let shape = dict.shape(key).unwrap_or_else(|e| panic!("{e}")).to_vec();
    let data = dict.read(key, &shape).unwrap_or_else(|e| panic!("{e}"));
    (shape, data)
}
