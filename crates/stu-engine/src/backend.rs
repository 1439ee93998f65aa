//! Backends are cargo features at the edge; this module turns a backend name into a burn
//! `Device` and says how to rebuild when a backend was not compiled in.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// A compute backend, named as in specs and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// burn's pure-Rust CPU backend (im2col + gemm, rayon). The default.
    Flex,
    /// burn-ndarray: CPU, deprecated upstream and 10–200× slower on conv3d.
    Ndarray,
    /// CubeCL CUDA (needs the `cuda` feature; does not build on machines without the LLVM bundle).
    Cuda,
    /// libtorch on the CPU through burn-tch (needs `tch` and `LIBTORCH`).
    Tch,
    /// libtorch on CUDA device 0 through burn-tch.
    TchCuda,
    /// CubeCL wgpu (Vulkan/Metal/WebGPU).
    Wgpu,
}

/// Every backend name, for messages.
pub const ALL: [Backend; 6] = [
    Backend::Flex,
    Backend::Ndarray,
    Backend::Cuda,
    Backend::Tch,
    Backend::TchCuda,
    Backend::Wgpu,
];

/// Device `index` of libtorch's CUDA backend, with cuDNN's autotuner on (as nnU-Net runs).
///
/// The binary must be built against a libtorch folder with its CUDA library (`LIBTORCH=…/gpu`
/// from `cargo xtask libtorch`); at run time libtorch's CUDA dependencies come from the PyTorch
/// on `LD_LIBRARY_PATH` (`xtask/tch-env.sh`).
#[cfg(feature = "tch")]
#[allow(deprecated)] // burn-tch is deprecated upstream; it is the cuDNN path here
fn libtorch_cuda(index: usize) -> Result<Device, String> {
    if !cfg!(tch_cuda_linked) {
        return Err("this binary was built against a libtorch without its CUDA library; rebuild with LIBTORCH=<dir>/gpu (README: GPU backends)".into());
    }
    if !tch::Cuda::is_available() {
        return Err(format!("libtorch {TORCH_VERSION} sees no CUDA device (driver, CUDA_VISIBLE_DEVICES, or the PyTorch on LD_LIBRARY_PATH)"));
    }
    tch::Cuda::cudnn_set_benchmark(cudnn_benchmark()?);
    Ok(Device::libtorch_cuda(index % tch::Cuda::device_count().max(1) as usize))
}

/// Whether cuDNN times every algorithm of each new convolution shape and keeps the fastest (its
/// benchmark mode, as nnU-Net's trainer runs), or takes its heuristics' pick: on by default;
/// `STU_CUDNN_BENCHMARK=0` turns it off, for a single case's prediction, where the timing of
/// each shape's first call may cost more than the faster kernels save (the GPU suite's CT
/// prediction runs both; `stu predict` prints the time to its first tile).
#[cfg(feature = "tch")]
fn cudnn_benchmark() -> Result<bool, String> {
    match std::env::var("STU_CUDNN_BENCHMARK").as_deref() {
        Err(_) | Ok("1") => Ok(true),
        Ok("0") => Ok(false),
        Ok(other) => Err(format!("STU_CUDNN_BENCHMARK=`{other}`: expected 1 or 0")),
    }
}

/// burn's CUDA device `index` (modulo the GPUs visible), or why there is none. cubecl-cuda loads
/// the driver and NVRTC when the device is first used, and panics on its device thread when
/// either is missing; this checks both first, as cubecl would find them (`LD_LIBRARY_PATH`).
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn cubecl_cuda(index: usize) -> Result<Device, String> {
    use cudarc::driver::result as driver;
    // SAFETY: both only try to dlopen the library under its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the NVIDIA driver's libcuda.so cannot be loaded (no GPU driver on this machine, or not on LD_LIBRARY_PATH)".into());
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("NVRTC (libnvrtc.so, CUDA's run-time compiler) cannot be loaded: put the CUDA toolkit's lib folder, or the PyPI wheel nvidia-cuda-nvrtc's, on LD_LIBRARY_PATH".into());
    }
    // cubecl compiles its kernels with NVRTC at run time against CUDA's headers, under the
    // folder its `install::cuda_path` finds (and panics without).
    match &cubecl_cuda::install::cuda_path() {
        Some(r) if r.join("include/cuda_fp16.h").exists() => {}
        Some(r) => return Err(format!("{} has no include/cuda_fp16.h: cubecl compiles its kernels at run time against CUDA's headers; point CUDA_PATH at a CUDA toolkit (or at the nvidia/cu13 folder of the PyPI wheel nvidia-cuda-runtime)", r.display())),
        None => return Err("no CUDA headers: cubecl compiles its kernels at run time against them; set CUDA_PATH to a CUDA toolkit (or to the nvidia/cu13 folder of the PyPI wheel nvidia-cuda-runtime)".into()),
    }
    let count = driver::init().and_then(|()| driver::device::get_count()).map_err(|e| format!("the CUDA driver sees no device: {e:?}"))?;
    if count < 1 {
        return Err("the CUDA driver sees no device (CUDA_VISIBLE_DEVICES?)".into());
    }
    Ok(Device::cuda(index % count as usize))
}

/// `bytes` in GiB, as device memory is reported.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Bytes a new tensor can still get on `device` (the driver's free memory plus what libtorch's
/// caching allocator holds unused) and the device's total, for a libtorch CUDA device; `None`
/// for any other device, or when the query fails (`csrc/memory.cpp`).
#[allow(unsafe_code, deprecated)] // burn-tch is deprecated upstream; it is the cuDNN path here
pub fn cuda_memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(all(feature = "tch", tch_cuda_linked))]
    {
        unsafe extern "C" {
            fn stu_cuda_memory(device: std::ffi::c_int, free: *mut u64, total: *mut u64) -> *mut std::ffi::c_char;
        }
        let Some(burn::backend::libtorch::LibTorchDevice::Cuda(index)) = crate::ops::libtorch_device(device) else { return None };
        let (mut free, mut total) = (0u64, 0u64);
        // SAFETY: both pointers are live for the call; the function writes them on success.
        let done = crate::torch::c_result(|| unsafe { stu_cuda_memory(index as std::ffi::c_int, &mut free, &mut total) });
        return done.ok().map(|()| (free, total));
    }
    #[allow(unreachable_code)]
    {
        let _ = device;
        None
    }
}

/// The PyTorch release the `tch` build is made against (README: "GPU backends").
pub const TORCH_VERSION: &str = "2.11.0";

/// A compiled-in backend that cannot start on this machine.
#[derive(Debug, thiserror::Error)]
#[error("backend `{name}` cannot start: {why}")]
pub struct BackendUnavailable {
    /// The backend asked for.
    pub name: &'static str,
    /// Why.
    pub why: String,
}

/// Why a backend gives no device.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Not compiled in.
    #[error(transparent)]
    NotCompiled(#[from] BackendNotCompiled),
    /// Compiled in but unavailable here.
    #[error(transparent)]
    Unavailable(#[from] BackendUnavailable),
}

/// A backend that this binary was built without.
#[derive(Debug, thiserror::Error)]
#[error(
    "backend `{name}` is not compiled into this binary; rebuild with `--features {feature}` (compiled in: {compiled})"
)]
pub struct BackendNotCompiled {
    /// The backend asked for.
    pub name: &'static str,
    /// The cargo feature that enables it.
    pub feature: &'static str,
    /// What this binary has.
    pub compiled: String,
}

impl Backend {
    /// Name as written in specs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Ndarray => "ndarray",
            Self::Cuda => "cuda",
            Self::Tch => "tch",
            Self::TchCuda => "tch-cuda",
            Self::Wgpu => "wgpu",
        }
    }

    /// The cargo feature of `stu-harness` that compiles it in.
    pub fn feature(self) -> &'static str {
        match self {
            Self::Tch | Self::TchCuda => "tch",
            other => other.name(),
        }
    }

    /// Whether it computes on a GPU (the host's cores are free meanwhile).
    pub fn is_gpu(self) -> bool {
        matches!(self, Self::Cuda | Self::TchCuda | Self::Wgpu)
    }

    /// Whether this binary has the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            Self::Flex => cfg!(feature = "flex"),
            Self::Ndarray => cfg!(feature = "ndarray"),
            Self::Cuda => cfg!(feature = "cuda"),
            Self::Tch | Self::TchCuda => cfg!(feature = "tch"),
            Self::Wgpu => cfg!(feature = "wgpu"),
        }
    }

    /// Backends compiled into this binary.
    pub fn compiled() -> Vec<Backend> {
        ALL.into_iter().filter(|b| b.is_compiled()).collect()
    }

    /// The first compiled backend in order of preference (flex, then the others).
    pub fn default_compiled() -> Option<Backend> {
        Self::compiled().into_iter().next()
    }

    /// The device for this backend, or a rebuild hint.
    pub fn device(self) -> Result<Device, BackendError> {
        self.device_at(0)
    }

    /// Like [`Backend::device`], on GPU `index` (modulo the GPUs visible) for the GPU backends,
    /// so that data-parallel rank `LOCAL_RANK` takes its own card whether it sees all of them
    /// or, under Slurm's `--gpus-per-task=1`, only one. CPU backends ignore `index`.
    #[allow(deprecated, unreachable_code, unused_variables)]
    pub fn device_at(self, index: usize) -> Result<Device, BackendError> {
        let missing = || BackendNotCompiled {
            name: self.name(),
            feature: self.feature(),
            compiled: Self::compiled()
                .iter()
                .map(|b| b.name())
                .collect::<Vec<_>>()
                .join(", "),
        };
        match self {
            Self::Flex => {
                #[cfg(feature = "flex")]
                return Ok(Device::flex());
            }
            Self::Ndarray => {
                #[cfg(feature = "ndarray")]
                return Ok(Device::ndarray());
            }
            Self::Cuda => {
                #[cfg(feature = "cuda")]
                return cubecl_cuda(index).map_err(|e| BackendUnavailable { name: self.name(), why: e }.into());
            }
            Self::Tch => {
                #[cfg(feature = "tch")]
                return Ok(Device::libtorch());
            }
            Self::TchCuda => {
                #[cfg(feature = "tch")]
                return libtorch_cuda(index).map_err(|e| BackendUnavailable { name: self.name(), why: e }.into());
            }
            Self::Wgpu => {
                #[cfg(feature = "wgpu")]
                return Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice));
            }
        }
        Err(missing().into())
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ALL.into_iter().find(|b| b.name() == s).ok_or_else(|| {
            format!(
                "unknown backend `{s}`; expected one of: {}",
                ALL.map(Backend::name).join(", ")
            )
        })
    }
}

/// Checks the libtorch fast paths on `backend`'s device against burn's composed operators
/// (`torch::check`); `Err` says why no check could run. On CUDA the block comparisons allow
/// 5e-3 relative (cuDNN's f32 convolutions may use TF32) and the split norm is also checked in
/// bf16 and f16.
pub fn check_fused_ops(backend: Backend) -> Result<OpsCheck, String> {
    if !matches!(backend, Backend::Tch | Backend::TchCuda) {
        return Err(format!("the fused ops are libtorch's: use `--backend tch` or `tch-cuda` (got `{}`)", backend.name()));
    }
    let device = backend.device().map_err(|e| e.to_string())?;
    #[cfg(feature = "tch")]
    {
        let cuda = backend == Backend::TchCuda;
        let mut check = crate::torch::check::fused_ops(&device, if cuda { 5e-3 } else { 2e-5 }, cuda);
        // The device memory `stu predict` sizes its sum of tiles by: known on CUDA, and sane.
        match (cuda, cuda_memory(&device)) {
            (true, Some((free, total))) if free > 0 && free <= total => check.lines.push(format!("device memory: {:.1} of {:.1} GiB free", gib(free), gib(total))),
            (true, got) => check.failures.push(format!("device memory: {got:?} (free, total) from csrc/memory.cpp")),
            (false, None) => {}
            (false, Some(m)) => check.failures.push(format!("device memory {m:?} reported for a CPU device")),
        }
        Ok(check)
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = device;
        unreachable!("a libtorch backend's device exists only with the `tch` feature")
    }
}

/// What [`check_fused_ops`] found: one line per comparison, and the lines of those out of
/// tolerance.
#[derive(Debug, Default)]
pub struct OpsCheck {
    /// One line per comparison.
    pub lines: Vec<String>,
    /// The lines of the comparisons out of tolerance.
    pub failures: Vec<String>,
}

/// Starts libtorch's profiler (Kineto, as `torch.profiler` in Python) on this thread: every ATen
/// op from here on, with input shapes, and with `cuda` every CUDA kernel and memory copy, until
/// [`profile_stop`]. Only the libtorch backends' work is seen (the others do not go through ATen).
pub fn profile_start(cuda: bool) -> Result<(), String> {
    #[cfg(feature = "tch")]
    {
        crate::torch::profile_start(cuda)
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = cuda;
        Err("profiling needs the libtorch backends: rebuild with `--features tch`".into())
    }
}

/// Stops the profiler started by [`profile_start`] and writes its Chrome trace (the format of
/// `torch.profiler`'s `export_chrome_trace`, readable by Perfetto) to `path`.
pub fn profile_stop(path: &std::path::Path) -> Result<(), String> {
    #[cfg(feature = "tch")]
    {
        crate::torch::profile_stop(path)
    }
    #[cfg(not(feature = "tch"))]
    {
        Err(format!("{}: profiling needs the libtorch backends: rebuild with `--features tch`", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_default_is_flex() {
        for b in ALL {
            assert_eq!(b.name().parse::<Backend>().unwrap(), b);
        }
        assert!("cudaa".parse::<Backend>().unwrap_err().contains("flex, ndarray"));
        assert_eq!(Backend::default_compiled(), Some(Backend::Flex));
        let err = Backend::Cuda.device().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
