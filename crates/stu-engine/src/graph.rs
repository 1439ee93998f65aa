//! CUDA graphs for inference: a network's forward at one input shape is captured once (libtorch's
//! `at::cuda::CUDAGraph`, `csrc/graph.cpp`) and replayed for every later call of that shape, so
//! the host launches one graph per patch instead of every ATen call of the forward (≈ 1,200 for
//! STU-Net-B; on an H200 the GPU idled 27 % of a B patch waiting for them, `reports/bench/gpu.md`).
//!
//! Only on libtorch CUDA devices (`--backend tch-cuda`) and only where turned on: `STU_TCH_GRAPH=1`
//! (read once; `0` off, the default until a GPU has timed it). The first call of a shape runs
//! eagerly (cuDNN's autotuner picks its algorithms then), the second captures and replays; each
//! call copies its input into the graph's input and returns a copy of the graph's output, so
//! results never alias one another. A forward that cannot be captured (a host copy or a
//! synchronisation inside it) turns graphs off for the process with one warning and runs
//! eagerly, as does every other device.

use burn::tensor::Tensor;

use crate::model::SegNet;

/// Whether CUDA graphs are on (`STU_TCH_GRAPH`; [`set_enabled`] overrides it).
pub fn enabled() -> bool {
    #[cfg(feature = "tch")]
    {
        imp::SWITCH.get().unwrap_or(false)
    }
    #[cfg(not(feature = "tch"))]
    {
        false
    }
}

/// Turns CUDA graphs on or off for this process, overriding `STU_TCH_GRAPH` (`None`: the
/// default, off).
pub fn set_enabled(on: Option<bool>) {
    #[cfg(feature = "tch")]
    imp::SWITCH.set(on);
    #[cfg(not(feature = "tch"))]
    let _ = on;
}

/// Captured forwards, one per input shape and type; [`Graphs::run`] replays them.
#[derive(Default)]
pub struct Graphs {
    #[cfg(feature = "tch")]
    inner: std::sync::Mutex<Vec<imp::Entry>>,
}

impl std::fmt::Debug for Graphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graphs")
    }
}

impl Graphs {
    /// `forward(x)`, through a CUDA graph where graphs are on and `x` is an untracked libtorch
    /// CUDA tensor; `forward` must be the same function at every call.
    pub fn run(&self, x: Tensor<5>, forward: &dyn Fn(Tensor<5>) -> Tensor<5>) -> Tensor<5> {
        #[cfg(feature = "tch")]
        {
            if enabled() {
                return imp::run(&self.inner, x, forward);
            }
        }
        forward(x)
    }
}

/// `net` with its inference forward through CUDA graphs where they are on ([`Graphs`]); the
/// other methods are `net`'s. Without graphs `net` itself is returned.
pub fn wrap(net: Box<dyn SegNet>) -> Box<dyn SegNet> {
    if enabled() { Box::new(Graphed { net, graphs: Graphs::default() }) } else { net }
}

struct Graphed {
    net: Box<dyn SegNet>,
    graphs: Graphs,
}

impl SegNet for Graphed {
    fn family(&self) -> &'static str {
        self.net.family()
    }
    fn in_channels(&self) -> usize {
        self.net.in_channels()
    }
    fn num_classes(&self) -> usize {
        self.net.num_classes()
    }
    fn input_divisor(&self) -> stu_core::strides::Stride {
        self.net.input_divisor()
    }
    fn fixed_input(&self) -> Option<stu_core::strides::Stride> {
        self.net.fixed_input()
    }
    fn forward_ds(&self, x: Tensor<5>) -> Vec<Tensor<5>> {
        self.net.forward_ds(x)
    }
    fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        self.graphs.run(x, &|x| self.net.forward(x))
    }
    fn state_dict(&self) -> Vec<crate::checkpoint::NamedTensor> {
        self.net.state_dict()
    }
    fn num_params(&self) -> usize {
        self.net.num_params()
    }
    fn describe(&self) -> serde_json::Value {
        self.net.describe()
    }
    fn gradients(&self, loss: Tensor<1>) -> burn::optim::GradientsParams {
        self.net.gradients(loss)
    }
    fn params(&self) -> Vec<crate::train::ParamInfo> {
        self.net.params()
    }
    fn update(self: Box<Self>, grads: &mut burn::optim::GradientsParams, f: &mut crate::train::UpdateFn<'_>) -> Box<dyn SegNet> {
        // New weights: the captured graphs read the old ones.
        wrap(self.net.update(grads, f))
    }
    fn valid(&self) -> Box<dyn SegNet> {
        wrap(self.net.valid())
    }
    fn cast(&self, dtype: burn::tensor::DType) -> Box<dyn SegNet> {
        wrap(self.net.cast(dtype))
    }
    fn vectors_stay_f32(&self) -> bool {
        self.net.vectors_stay_f32()
    }
}

#[cfg(feature = "tch")]
#[allow(deprecated)] // burn-tch is deprecated upstream; it is the cuDNN path here
mod imp {
    use burn::backend::libtorch::TchTensor;
    use burn::backend::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind};
    use burn::tensor::Tensor;

    /// `STU_TCH_GRAPH` (`1` on, `0` off; off by default).
    pub(super) static SWITCH: crate::torch::Switch = crate::torch::Switch::new("STU_TCH_GRAPH", "1", "0");

    /// One input shape: how often it was seen, and its graph once captured.
    pub(super) struct Entry {
        key: (Vec<i64>, tch::Kind, tch::Device),
        seen: usize,
        graph: Option<Captured>,
    }

    struct Captured {
        handle: Handle,
        input: tch::Tensor,
        output: tch::Tensor,
    }

    /// A `csrc/graph.cpp` graph.
    struct Handle(*mut std::ffi::c_void);

    // SAFETY: the graph is only used under the `Graphs` mutex, one thread at a time; libtorch's
    // graph object is not tied to the thread that captured it.
    #[allow(unsafe_code)]
    unsafe impl Send for Handle {}

    impl Drop for Handle {
        fn drop(&mut self) {
            ffi::free(self.0);
        }
    }

    /// The libtorch tensor under an untracked burn float tensor (shared storage).
    fn aten(t: &Tensor<5>) -> Option<tch::Tensor> {
        match t.clone().into_dispatch().kind {
            DispatchTensorKind::LibTorch(BackendTensor::Float(x)) => Some(x.tensor),
            _ => None,
        }
    }

    fn burn(t: tch::Tensor) -> Tensor<5> {
        Tensor::from_dispatch(DispatchTensor { kind: DispatchTensorKind::LibTorch(BackendTensor::Float(TchTensor::new(t))), autodiff: DispatchAutodiffContext::Disabled })
    }

    pub(super) fn run(entries: &std::sync::Mutex<Vec<Entry>>, x: Tensor<5>, forward: &dyn Fn(Tensor<5>) -> Tensor<5>) -> Tensor<5> {
        let Some(t) = aten(&x).filter(|t| t.device().is_cuda() && !t.requires_grad()) else {
            return forward(x);
        };
        let key = (t.size(), t.kind(), t.device());
        let mut entries = entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = match entries.iter().position(|e| e.key == key) {
            Some(i) => i,
            None => {
                entries.push(Entry { key, seen: 0, graph: None });
                entries.len() - 1
            }
        };
        let e = &mut entries[at];
        e.seen += 1;
        if e.graph.is_none() {
            if e.seen < 2 {
                // Eager first: cuDNN's autotuner times its algorithms outside the capture.
                return forward(x);
            }
            match capture(&t, forward) {
                Ok(c) => e.graph = Some(c),
                Err(why) => {
                    eprintln!("warning: CUDA graph capture failed ({why}); the forward runs eagerly from here on");
                    SWITCH.set(Some(false));
                    return forward(x);
                }
            }
        }
        let g = e.graph.as_mut().expect("captured above");
        tch::no_grad(|| {
            g.input.copy_(&t);
            if let Err(why) = ffi::replay(g.handle.0) {
                panic!("CUDA graph replay failed: {why}");
            }
            // (`empty_like` keeps the output's strides; tch's `copy` would zero-fill first.)
            let mut out = g.output.empty_like();
            out.copy_(&g.output);
            burn(out)
        })
    }

    /// Captures `forward` of a static copy of `t`.
    fn capture(t: &tch::Tensor, forward: &dyn Fn(Tensor<5>) -> Tensor<5>) -> Result<Captured, String> {
        let input = tch::no_grad(|| {
            let mut s = t.empty_like();
            s.copy_(t);
            s
        });
        let tch::Device::Cuda(index) = t.device() else { unreachable!("checked by the caller") };
        let handle = Handle(ffi::begin(index)?);
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| forward(burn(input.shallow_clone()))));
        // The capture ends whatever happened, so that the stream is usable again.
        let ended = ffi::end(handle.0);
        let handle = match ended {
            Ok(()) => handle,
            Err(why) => {
                // `end` freed the graph.
                std::mem::forget(handle);
                return Err(why);
            }
        };
        let out = out.map_err(|p| p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "the forward panicked".into()))?;
        let output = aten(&out).ok_or_else(|| match out.into_dispatch().kind {
            DispatchTensorKind::Autodiff(_) => "the forward's output is tracked by autodiff: its network's parameters require gradients (use the network's `valid()` copy)",
            _ => "the forward returned a tensor that is not libtorch's",
        })?;
        Ok(Captured { handle, input, output })
    }

    #[allow(unsafe_code)]
    mod ffi {
        #[cfg(tch_cuda_linked)]
        use std::ffi::c_int;
        use std::ffi::{c_char, c_void};

        #[cfg(tch_cuda_linked)]
        unsafe extern "C" {
            // csrc/graph.cpp; each returns null or a malloc'd message.
            fn stu_graph_begin(device: c_int, out: *mut *mut c_void) -> *mut c_char;
            fn stu_graph_end(g: *mut c_void) -> *mut c_char;
            fn stu_graph_replay(g: *mut c_void) -> *mut c_char;
            fn stu_graph_free(g: *mut c_void);
        }

        fn result(err: *mut c_char) -> Result<(), String> {
            crate::torch::c_result(|| err)
        }

        pub(super) fn begin(device: usize) -> Result<*mut c_void, String> {
            #[cfg(tch_cuda_linked)]
            {
                let mut g = std::ptr::null_mut();
                // SAFETY: `g` is written with a new graph on success.
                result(unsafe { stu_graph_begin(device as c_int, &mut g) })?;
                Ok(g)
            }
            #[cfg(not(tch_cuda_linked))]
            {
                let _ = (device, result as fn(*mut c_char) -> Result<(), String>);
                Err("this binary was built against a libtorch without its CUDA library".into())
            }
        }

        /// Ends the capture; on an error the graph is freed.
        pub(super) fn end(g: *mut c_void) -> Result<(), String> {
            #[cfg(tch_cuda_linked)]
            {
                // SAFETY: `g` is a live graph from `begin`.
                result(unsafe { stu_graph_end(g) })
            }
            #[cfg(not(tch_cuda_linked))]
            {
                let _ = g;
                unreachable!("no graph without CUDA")
            }
        }

        pub(super) fn replay(g: *mut c_void) -> Result<(), String> {
            #[cfg(tch_cuda_linked)]
            {
                // SAFETY: `g` is a live, captured graph.
                result(unsafe { stu_graph_replay(g) })
            }
            #[cfg(not(tch_cuda_linked))]
            {
                let _ = g;
                unreachable!("no graph without CUDA")
            }
        }

        pub(super) fn free(g: *mut c_void) {
            #[cfg(tch_cuda_linked)]
            // SAFETY: `g` is a live graph, freed once (by its handle's drop).
            unsafe {
                stu_graph_free(g)
            }
            #[cfg(not(tch_cuda_linked))]
            let _ = g;
        }
    }
}
