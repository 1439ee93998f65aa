//! With the `tch` feature: notes whether `LIBTORCH` (the libtorch the binary links, see
//! `xtask/libtorch.py`) has its CUDA library, so that `tch-cuda` on a CPU-only build is a clear
//! error rather than burn-tch's panic.
fn main() {
    println!("cargo:rustc-check-cfg=cfg(tch_cuda_linked)");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TCH").is_none() {
        return;
    }
    if let Some(dir) = std::env::var_os("LIBTORCH") {
        if std::path::Path::new(&dir).join("lib/libtorch_cuda.so").exists() {
            println!("cargo:rustc-cfg=tch_cuda_linked");
        }
    }
}
