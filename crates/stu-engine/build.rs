//! With the `tch` feature: compiles `csrc/grad.cpp` against `LIBTORCH` (the libtorch the binary
//! links, see `xtask/libtorch.py`; headers in its `include/`), and notes whether that libtorch
//! has its CUDA library, so that `tch-cuda` on a CPU-only build is a clear error rather than
//! burn-tch's panic. With the `cuda` feature: compiles `csrc/c23.c`, three glibc 2.38 entry
//! points that an LLVM from Debian unstable (`xtask/llvm.py`) calls, for Debian 12 hosts.
fn main() {
    println!("cargo:rustc-check-cfg=cfg(tch_cuda_linked)");
    #[cfg(feature = "tch")]
    tch();
    #[cfg(feature = "cuda")]
    {
        println!("cargo:rerun-if-changed=csrc/c23.c");
        cc::Build::new().file("csrc/c23.c").std("c11").compile("stu_c23");
    }
}

#[cfg(feature = "tch")]
fn tch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=csrc/grad.cpp");
    let Some(dir) = std::env::var_os("LIBTORCH").map(std::path::PathBuf::from) else {
        panic!("the `tch` feature needs LIBTORCH: a libtorch folder (`cargo xtask libtorch`, README: GPU backends)");
    };
    println!("cargo:rerun-if-changed=csrc/graph.cpp");
    println!("cargo:rerun-if-changed=csrc/memory.cpp");
    println!("cargo:rerun-if-changed=csrc/error.h");
    // The ABI flag torch-sys compiles its own C++ with (its default, "1", matches the PyPI wheels).
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    let build = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .include(dir.join("include"))
            .include(dir.join("include/torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
            .flag("-DGLOG_USE_GLOG_EXPORT")
            .warnings(false);
        b
    };
    build().file("csrc/grad.cpp").compile("stu_torch_grad");
    if dir.join("lib/libtorch_cuda.so").exists() {
        println!("cargo:rustc-cfg=tch_cuda_linked");
        // CUDA graphs (`csrc/graph.cpp`) need the CUDA runtime headers, which
        // `xtask/libtorch.py` links as `cuda-include` beside the libtorch.
        let cuda = dir.join("cuda-include");
        if !cuda.join("crt/host_config.h").exists() {
            panic!("{} lacks the CUDA runtime headers: rerun `python3 xtask/libtorch.py` (README: GPU backends)", cuda.display());
        }
        build().file("csrc/graph.cpp").file("csrc/memory.cpp").include(&cuda).compile("stu_torch_graph");
        println!("cargo:rustc-link-search=native={}", dir.join("lib").display());
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-link-lib=dylib:+verbatim=libcudart.so.13");
    }
}
