//! With the `tch` feature built against a CUDA libtorch (README: "GPU backends"), the `stu`
//! binary links `libtorch_cuda.so`, whose own dependencies (cuDNN, cuBLAS, NCCL, …) need not be
//! present where it is built: they are resolved at run time from the PyTorch installation on
//! the library path. Without CUDA in `LIBTORCH` this flag changes nothing.
fn main() {
    if std::env::var_os("CARGO_FEATURE_TCH").is_some() {
        println!("cargo:rustc-link-arg-bins=-Wl,--allow-shlib-undefined");
    }
}
