//! With the `tch` feature: compiles `csrc/grad.cpp` against `LIBTORCH` (the libtorch the binary
//! links, see `xtask/libtorch.py`; headers in its `include/`), and notes whether that libtorch
//! has its CUDA library, so that `tch-cuda` on a CPU-only build is a clear error rather than
//! burn-tch's panic.
fn main() {
    println!("cargo:rustc-check-cfg=cfg(tch_cuda_linked)");
    #[cfg(feature = "tch")]
    tch();
}

#[cfg(feature = "tch")]
fn tch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=csrc/grad.cpp");
    let Some(dir) = std::env::var_os("LIBTORCH").map(std::path::PathBuf::from) else {
        panic!("the `tch` feature needs LIBTORCH: a libtorch folder (`cargo xtask libtorch`, README: GPU backends)");
    };
    if dir.join("lib/libtorch_cuda.so").exists() {
        println!("cargo:rustc-cfg=tch_cuda_linked");
    }
    // The ABI flag torch-sys compiles its own C++ with (its default, "1", matches the PyPI wheels).
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .file("csrc/grad.cpp")
        .include(dir.join("include"))
        .include(dir.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("stu_torch_grad");
}
