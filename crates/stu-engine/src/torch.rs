#![allow(deprecated)] // burn-tch is marked deprecated upstream; it is the libtorch (cuDNN) path here.
//! libtorch fast paths (feature `tch`): cuDNN convolution gradients, instance norm fused with
//! its LeakyReLU (and the residual add at a block's end), nearest upsampling and nnU-Net's loss,
//! as a burn backend extension over [`LibTorch`](burn::backend::LibTorch); and libtorch's
//! profiler for `stu bench --profile`.
//!
//! burn's generic conv3d weight gradient is itself a convolution whose kernel is the whole
//! output gradient (128³ at full resolution); cuDNN runs it far off its fast paths, and burn's
//! instance norm is six elementwise kernels. Here the forward calls ATen directly. When burn
//! records the op for a backward pass, the forward runs under libtorch's autograd on detached
//! leaves and the libtorch graph is kept in burn's node state; the backward hands burn's output
//! gradient to that graph (`csrc/grad.cpp`: `torch::autograd::grad` with the gradient given,
//! which tch does not expose) and gets cuDNN's backward-data and backward-filter and ATen's
//! batch-norm backward, without re-running the forward. Autodiff stays burn's: these ops are
//! nodes of its graph like any other.
//!
//! Memory: instance norm runs as ATen's batch norm on the `[1, B·C, …]` view (what
//! `instance_norm` does inside), so the residual add and the LeakyReLU can work in place on its
//! output (batch norm's backward reads its input and statistics, not its output, and the
//! LeakyReLU's backward reads its result). Each norm then keeps two activations alive for the
//! backward (its input and its output) where PyTorch's eager STU-Net keeps three or four (the
//! norm's output before the activation, and the sum before the last one). In half precision the
//! affine parameters enter the norm in f32, as under PyTorch's autocast (cuDNN's batch norm
//! takes f16 data only with f32 parameters).
//!
//! The loss (Dice + CE) and nearest upsampling do not keep a libtorch graph: the loss's gradient
//! is written by hand in ATen ops, as `kernels/loss.rs` does on flex (the backward keeps only
//! the softmax probabilities; no one-hot target is ever formed), and upsampling's is ATen's
//! `upsample_nearest3d_backward`.
//!
//! Layout: convolutions run channels-last (NDHWC strides under NCDHW shapes, PyTorch's
//! `channels_last_3d`), on the CPU and on CUDA, where each measured fastest
//! ([`channels_last_on`]; `STU_TCH_CHANNELS_LAST=1`/`0` forces it). Channels-last activations
//! are never converted: 1×1×1 convolutions are a matrix product over the `[voxels, C]` view,
//! instance norm goes one sample at a time through ATen's channels-last batch-norm kernels (the
//! `[1, B·C, …]` view needs NCDHW strides), and the loss reads the logits as `[B, N, C]`.
//!
//! Also here: clipping and SGD as multi-tensor kernels (`foreach`), convolutions whose output
//! goes straight into a norm leave their bias out (`add_bias`; the norm removes it), the
//! split-row instance norm ([`norm_split_on`]), and [`check`], which compares all of these
//! with burn's composed operators on a device.
//!
//! Only libtorch devices reach this trait ([`crate::ops`] routes by device); shapes are NCDHW,
//! as PyTorch's.

use burn::backend::{Backend, DType, FloatDType, TensorMetadata, backend_extension, tensor::FloatTensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::Autodiff;

use crate::ext::register_grads;

/// ATen-backed operations on NCDHW tensors. The `*_graph` methods run an op under libtorch's
/// autograd and return (output, the output with its graph, the leaves); `*_graph_backward`
/// returns the leaves' gradients for the output gradient `grad`.
#[backend_extension(LibTorch: cfg(feature = "tch"), Autodiff)]
pub trait TorchOps: Backend {
    /// `conv3d(x, weight, bias)` with padding k/2 per axis (odd kernels), `stride`; without
    /// `add_bias` the bias is left out of the forward (for an output that goes straight into an
    /// instance norm, whose mean subtraction removes it exactly) and still gets its gradient.
    fn conv3d_nc(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, stride: [usize; 3], add_bias: bool) -> FloatTensor<Self>;
    /// [`conv3d_nc`](TorchOps::conv3d_nc) with its graph: (y, y_graph, x leaf, weight leaf, and
    /// which leaves are copies that share no storage with `x` or `weight`).
    fn conv3d_nc_graph(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 3],
        add_bias: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, LeafCopies);
    /// Gradients (x, weight, bias) through a graph from [`conv3d_nc_graph`](TorchOps::conv3d_nc_graph);
    /// without `need_x` (x is the network's input) cuDNN's backward-data is skipped and the x
    /// gradient is `None`. A gradient of a copied leaf comes back in the layout of the tensor
    /// that was given: the weight's contiguous (a channels-last copy of an NCDHW weight), x's
    /// channels-last (an NCDHW copy for a convolution of [`conv_ncdhw_for`]); else each in its
    /// leaf's own. Without `sum_bias` the bias gradient is zeros, not the output gradient's sum
    /// ([`bias_grad_zero_on`]).
    #[allow(clippy::too_many_arguments)]
    fn conv3d_nc_graph_backward(
        y_graph: FloatTensor<Self>,
        x_leaf: FloatTensor<Self>,
        w_leaf: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        need_x: bool,
        copies: LeafCopies,
        sum_bias: bool,
    ) -> (Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>);
    /// A 3-D convolution weight cast to `dtype` with channels-last strides, in one copy: the
    /// cast (a half-precision step's of an f32 master weight, or an inference network's) and the
    /// channels-last copy that the convolution would otherwise make of it at every call.
    fn cast_weight_cl(w: FloatTensor<Self>, dtype: FloatDType) -> FloatTensor<Self>;
    /// The gradient of [`cast_weight_cl`](TorchOps::cast_weight_cl): `grad` cast to `dtype`
    /// (the master weight's), contiguous, in one copy.
    fn cast_weight_cl_backward(grad: FloatTensor<Self>, dtype: FloatDType) -> FloatTensor<Self>;
    /// `InstanceNorm3d(affine)` (eps 1e-5) then LeakyReLU(0.01) when `act`.
    fn norm_act_nc(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, act: bool) -> FloatTensor<Self>;
    /// `leaky_relu(InstanceNorm3d(x) + skip)`, the end of a residual block.
    fn norm_add_act_nc(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, skip: FloatTensor<Self>) -> FloatTensor<Self>;
    /// [`norm_act_nc`](TorchOps::norm_act_nc) with its graph: (y, y_graph, x, gamma and beta leaves).
    #[allow(clippy::type_complexity)]
    fn norm_act_nc_graph(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        act: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// Gradients (x, gamma, beta) through a graph from [`norm_act_nc_graph`](TorchOps::norm_act_nc_graph).
    fn norm_act_nc_graph_backward(
        y_graph: FloatTensor<Self>,
        x_leaf: FloatTensor<Self>,
        g_leaf: FloatTensor<Self>,
        b_leaf: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// [`norm_add_act_nc`](TorchOps::norm_add_act_nc) with its graph: (y, y_graph, x, gamma,
    /// beta and skip leaves).
    #[allow(clippy::type_complexity)]
    fn norm_add_act_nc_graph(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        skip: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// Gradients (x, gamma, beta, skip) through a graph from [`norm_add_act_nc_graph`](TorchOps::norm_add_act_nc_graph).
    fn norm_add_act_nc_graph_backward(
        y_graph: FloatTensor<Self>,
        x_leaf: FloatTensor<Self>,
        g_leaf: FloatTensor<Self>,
        b_leaf: FloatTensor<Self>,
        s_leaf: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// Nearest-neighbour upsampling by integer factors (`F.interpolate(mode="nearest")`): one
    /// ATen kernel, where burn's reshape + expand copies once per axis.
    fn upsample_nc(x: FloatTensor<Self>, scale: [usize; 3]) -> FloatTensor<Self>;
    /// The gradient of [`upsample_nc`](TorchOps::upsample_nc): each input voxel's sum over the
    /// block it was copied to (ATen's `upsample_nearest3d_backward`).
    fn upsample_nc_backward(grad: FloatTensor<Self>, scale: [usize; 3]) -> FloatTensor<Self>;
    /// nnU-Net's Dice + CE (`crate::loss::dc_ce`) of NCDHW `logits` against class indices
    /// `target` `[B, D, H, W]` stored as floats; a 1-element tensor.
    fn dc_ce_nc(logits: FloatTensor<Self>, target: FloatTensor<Self>, batch_dice: bool, smooth: f64) -> FloatTensor<Self>;
    /// [`dc_ce_nc`](TorchOps::dc_ce_nc) and what its hand-written backward needs: (loss, the
    /// softmax probabilities in f32 with the logits' shape, the Dice coefficients `[2, B, C]`).
    fn dc_ce_nc_fwd(logits: FloatTensor<Self>, target: FloatTensor<Self>, batch_dice: bool, smooth: f64) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// The logits' gradient (f32) from [`dc_ce_nc_fwd`](TorchOps::dc_ce_nc_fwd)'s probabilities
    /// and coefficients, times the 1-element `grad`.
    fn dc_ce_nc_bwd(probs: FloatTensor<Self>, target: FloatTensor<Self>, coeffs: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Which leaves of a tracked convolution ([`TorchOps::conv3d_nc_graph`]) are copies in another
/// layout, sharing no storage with the tensors given: their gradients go back to the given
/// tensors' layouts, and the node need not keep the given tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeafCopies {
    /// x's leaf is an NCDHW copy of channels-last activations ([`conv_ncdhw_for`]).
    pub x: bool,
    /// The weight's leaf is a copy in the layout its convolution reads.
    pub w: bool,
}

/// (For `graph.rs`'s calls into `csrc/graph.cpp`.)
#[cfg(feature = "tch")]
pub(crate) use libtorch::c_result;

#[cfg(feature = "tch")]
mod libtorch {
    use burn::backend::LibTorch;
    use burn::backend::libtorch::TchTensor;
    use burn::backend::FloatDType;
    use burn::backend::tensor::FloatTensor;
    use tch::{Kind, Tensor};

    use super::{LeafCopies, TorchOps};

    #[allow(unsafe_code)]
    unsafe extern "C" {
        // csrc/grad.cpp; the pointers are tch's `C_tensor` (an `at::Tensor*`).
        fn stu_vjp(y: *const std::ffi::c_void, grad: *const std::ffi::c_void, inputs: *const *const std::ffi::c_void, n_inputs: std::ffi::c_int, outputs: *mut *mut std::ffi::c_void) -> *mut std::ffi::c_char;
        fn stu_split_norm(x: *const std::ffi::c_void, w: *const std::ffi::c_void, b: *const std::ffi::c_void, eps: f64, chunk: i64, out: *mut *mut std::ffi::c_void) -> *mut std::ffi::c_char;
        fn stu_sample_norm(x: *const std::ffi::c_void, w: *const std::ffi::c_void, b: *const std::ffi::c_void, eps: f64, out: *mut *mut std::ffi::c_void) -> *mut std::ffi::c_char;
    }

    /// Voxels per chunk of the split norm: rows of at least two chunks are split; shorter ones
    /// (the deeper stages) keep ATen's batch norm, which has enough rows there to fill the GPU.
    const SPLIT_CHUNK: i64 = 8192;

    /// Instance norm of the NCDHW `x` with each (sample, channel) row split into chunks for
    /// ATen's batch-norm kernels (`csrc/grad.cpp`, `SplitNorm`, a libtorch autograd function
    /// when grad mode is on); see [`super::norm_split_on`].
    #[allow(unsafe_code)]
    fn split_norm(x: &Tensor, g: &Tensor, b: &Tensor) -> Tensor {
        // SAFETY: the three pointers are live `at::Tensor*` owned by tch tensors borrowed for
        // the call.
        new_tensor("split instance norm", |out| unsafe { stu_split_norm(x.as_ptr().cast(), g.as_ptr().cast(), b.as_ptr().cast(), crate::ops::NORM_EPS, SPLIT_CHUNK, out) })
    }

    /// The tensor a `csrc/grad.cpp` call writes to its `out` argument (a new `at::Tensor*`,
    /// owned by the returned `Tensor`), or a panic naming `what` with the call's message.
    #[allow(unsafe_code)]
    fn new_tensor(what: &str, call: impl FnOnce(*mut *mut std::ffi::c_void) -> *mut std::ffi::c_char) -> Tensor {
        let mut out = std::ptr::null_mut();
        if let Err(msg) = c_result(|| call(&mut out)) {
            panic!("libtorch {what} failed: {msg}");
        }
        // SAFETY: on success the call wrote a new `at::Tensor*`, owned by exactly this `Tensor`.
        unsafe { Tensor::from_ptr(out.cast()) }
    }

    /// Instance norm of the channels-last `x`, one sample at a time through ATen's batch norm,
    /// each sample's output written into its slice of one tensor (`csrc/grad.cpp`,
    /// `SampleNorm`, a libtorch autograd function when grad mode is on); see
    /// [`super::norm_slices_on`].
    #[allow(unsafe_code)]
    fn sample_norm(x: &Tensor, g: &Tensor, b: &Tensor) -> Tensor {
        // SAFETY: as in `split_norm`.
        new_tensor("per-sample instance norm", |out| unsafe { stu_sample_norm(x.as_ptr().cast(), g.as_ptr().cast(), b.as_ptr().cast(), crate::ops::NORM_EPS, out) })
    }

    /// Gradients of `sum(y · grad)` with respect to `leaves`, through `y`'s libtorch graph
    /// (which is released).
    #[allow(unsafe_code)]
    pub(super) fn vjp(y: &Tensor, grad: &Tensor, leaves: &[&Tensor]) -> Vec<Tensor> {
        let inputs: Vec<*const std::ffi::c_void> = leaves.iter().map(|t| t.as_ptr().cast()).collect();
        let mut outputs = vec![std::ptr::null_mut(); leaves.len()];
        let grad = if grad.kind() == y.kind() { grad.shallow_clone() } else { grad.to_kind(y.kind()) };
        // SAFETY: every pointer is a live `at::Tensor*` owned by a tch `Tensor` borrowed for the
        // call; on success the function has written `leaves.len()` new `at::Tensor*`, each owned
        // by one tch `Tensor` below.
        let done = c_result(|| unsafe { stu_vjp(y.as_ptr().cast(), grad.as_ptr().cast(), inputs.as_ptr(), leaves.len() as std::ffi::c_int, outputs.as_mut_ptr()) });
        if let Err(msg) = done {
            panic!("libtorch backward failed: {msg}");
        }
        // SAFETY: each pointer was written by `stu_vjp` and is owned by exactly one `Tensor`.
        unsafe { outputs.into_iter().map(|p| Tensor::from_ptr(p.cast())).collect() }
    }

    #[allow(unsafe_code)]
    unsafe extern "C" {
        #[link_name = "free"]
        fn libc_free(p: *mut std::ffi::c_void);
    }

    /// Runs a `csrc/grad.cpp` call that returns null or a malloc'd message.
    #[allow(unsafe_code)]
    pub(crate) fn c_result(call: impl FnOnce() -> *mut std::ffi::c_char) -> Result<(), String> {
        let err = call();
        if err.is_null() {
            return Ok(());
        }
        // SAFETY: a non-null result is a NUL-terminated string from `strdup`, freed once here.
        unsafe {
            let msg = std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned();
            libc_free(err.cast());
            Err(msg)
        }
    }

    /// NDHWC strides: channels are adjacent in memory.
    pub(super) fn is_channels_last(t: &Tensor) -> bool {
        let (size, stride) = (t.size(), t.stride());
        size.len() == 5 && size[1] > 1 && stride[1] == 1 && stride[4] == size[1]
    }

    /// The NDHWC strides of a tensor of `size` (PyTorch's `channels_last_3d`).
    fn channels_last_strides(size: &[i64]) -> [i64; 5] {
        let c = size[1];
        [size[2] * size[3] * size[4] * c, 1, size[3] * size[4] * c, size[4] * c, c]
    }

    /// `t` with NDHWC strides (a copy unless it already has them). A contiguous one-channel
    /// tensor (the network's input) already is channels-last in memory: it gets those strides
    /// as a view, so that oneDNN takes it (with NCDHW strides ATen sends a one-channel input to
    /// its slow reference convolution: 121 of 2018 ms in a 128³ STU-Net-S patch on the CPU).
    fn to_channels_last(t: &Tensor) -> Tensor {
        let size = t.size();
        if is_channels_last(t) {
            t.shallow_clone()
        } else if size.len() == 5 && size[1] == 1 && t.is_contiguous() {
            t.as_strided(size.as_slice(), channels_last_strides(&size).as_slice(), None)
        } else {
            t.permute([0, 2, 3, 4, 1]).contiguous().permute([0, 4, 1, 2, 3])
        }
    }

    /// `t` cast to `kind` with NDHWC strides: one copy kernel for both.
    pub(super) fn cast_channels_last(t: &Tensor, kind: Kind) -> Tensor {
        let size = t.size();
        tch::no_grad(|| {
            let mut out = Tensor::empty_strided(size.as_slice(), channels_last_strides(&size).as_slice(), (kind, t.device()));
            out.copy_(t);
            out
        })
    }

    /// `t` cast to `kind`, contiguous: one copy kernel for both.
    pub(super) fn cast_contiguous(t: &Tensor, kind: Kind) -> Tensor {
        tch::no_grad(|| {
            let mut out = Tensor::empty(t.size().as_slice(), (kind, t.device()));
            out.copy_(t);
            out
        })
    }

    fn kind_of(dtype: FloatDType) -> Kind {
        match dtype {
            FloatDType::F64 => Kind::Double,
            FloatDType::F32 | FloatDType::Flex32 => Kind::Float,
            FloatDType::F16 => Kind::Half,
            FloatDType::BF16 => Kind::BFloat16,
        }
    }

    fn conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: [usize; 3]) -> Tensor {
        // A bias kept in f32 under half precision (`train::cast_params`) joins in x's type.
        let cast;
        let b = match b {
            Some(b) if b.kind() != x.kind() => {
                cast = b.to_kind(x.kind());
                Some(&cast)
            }
            b => b,
        };
        let k = w.size();
        let (stride, pad) = (stride.map(|s| s as i64), [k[2] / 2, k[3] / 2, k[4] / 2]);
        match conv_path(x, &k, stride) {
            ConvPath::Ncdhw => x.conv3d(w, b, stride, pad, [1i64; 3], 1),
            // (No copy where x or w is already the NCDHW leaf of a tracked convolution.)
            ConvPath::ViaNcdhw => to_channels_last(&x.contiguous().conv3d(&w.contiguous(), b, stride, pad, [1i64; 3], 1)),
            ConvPath::DepthSplit => conv_depth_split(x, w, b, [stride[1], stride[2]]),
            ConvPath::MatMul1x1 => conv1x1_channels_last(x, w, b, stride),
            ConvPath::ChannelsLast { onednn } => {
                // ATen keeps the input's memory format for the output.
                let (x, w) = (to_channels_last(x), to_channels_last(w));
                if onednn {
                    return x.mkldnn_convolution(&w, b, pad, stride, [1i64; 3], 1);
                }
                x.conv3d(&w, b, stride, pad, [1i64; 3], 1)
            }
        }
    }

    /// How [`conv`] runs a convolution with kernel dims `k` (`[O, I, kd, kh, kw]`).
    enum ConvPath {
        /// ATen's convolution on NCDHW tensors (channels-last off).
        Ncdhw,
        /// ATen's convolution of NCDHW copies of channels-last input and weight, its output
        /// converted back to channels-last ([`super::conv_ncdhw_for`]).
        ViaNcdhw,
        /// [`conv_depth_split`] (`STU_TCH_CONV=d2`, 3³ kernels of depth stride 1).
        DepthSplit,
        /// [`conv1x1_channels_last`], a matrix product over the `[voxels, C]` view.
        MatMul1x1,
        /// ATen's (or, on the CPU in f32, oneDNN's) 3-D convolution on channels-last input and
        /// weight, converted by `to_channels_last` where they are not.
        ChannelsLast { onednn: bool },
    }

    fn conv_path(x: &Tensor, k: &[i64], stride: [i64; 3]) -> ConvPath {
        if !super::channels_last_on(x.device()) {
            return ConvPath::Ncdhw;
        }
        // (By shape alone: a tracked convolution's x leaf may already be the NCDHW copy.)
        if k[2..] != [1, 1, 1] && super::conv_ncdhw_for(k[1], k[0], x.size()[2..].iter().copied().max().unwrap_or(0)) {
            return ConvPath::ViaNcdhw;
        }
        // On the CPU, f32 goes to oneDNN directly: ATen's 2-D heuristic sends one-sample
        // convolutions whose N·C·D·H ≤ 20 480 (the network's one-channel input at 128³, the 8³
        // stages) to its slow reference kernel, and 1×1×1 ones to its NCDHW path; oneDNN also
        // adds the bias inside the kernel. A 128³ STU-Net-S patch: 2.07 → 1.50 s with the
        // one-sample batch stride (`norm_act`), B 5.05 → 3.72 s.
        if k[2] > 1 && stride[0] == 1 && super::conv_d2_on(x.device()) {
            return ConvPath::DepthSplit;
        }
        let onednn = x.device() == tch::Device::Cpu && x.kind() == Kind::Float;
        if k[2..] == [1, 1, 1] && !onednn {
            return ConvPath::MatMul1x1;
        }
        ConvPath::ChannelsLast { onednn }
    }

    /// The leaves of a tracked convolution (x, weight), and which are copies, made outside the
    /// graph in the layout [`conv`] would otherwise convert them to, so that libtorch's graph
    /// saves the copy alone and the caller need not keep the tensor it was given:
    /// - the weight, where the convolution runs channels-last, its channels-last copy (under
    ///   half precision a cast made for this step: keeping both held every weight twice through
    ///   the backward, 2.9 GB for STU-Net-H in f16), or through NCDHW ([`super::conv_ncdhw_for`]),
    ///   its contiguous copy;
    /// - x, where the convolution runs through NCDHW, the NCDHW copy of channels-last activations.
    ///
    /// Else each tensor is its own leaf.
    pub(super) fn leaves(x: &Tensor, w: &Tensor, stride: [usize; 3]) -> (Tensor, Tensor, LeafCopies) {
        let path = conv_path(x, &w.size(), stride.map(|s| s as i64));
        let copy = |t: &Tensor, to: fn(&Tensor) -> Tensor| leaf(&tch::no_grad(|| to(t)));
        let (wl, w_copied) = match path {
            ConvPath::ChannelsLast { .. } if !is_channels_last(w) => (copy(w, to_channels_last), true),
            ConvPath::ViaNcdhw if !w.is_contiguous() => (copy(w, Tensor::contiguous), true),
            _ => (leaf(w), false),
        };
        let (xl, x_copied) = match path {
            ConvPath::ViaNcdhw if !x.is_contiguous() => (copy(x, Tensor::contiguous), true),
            _ => (leaf(x), false),
        };
        (xl, wl, LeafCopies { x: x_copied, w: w_copied })
    }

    /// A 3-D convolution (odd kernel, padding k/2, depth stride 1) of channels-last activations
    /// as one 2-D convolution over the `[B·D, H, W, C]` view ([`super::conv_d2_on`]): the
    /// kernel's depth slices are stacked as `kd·C_out` output channels, and output depth d is the
    /// sum over slices j of slice j's output at input depth d + j − kd/2 (zero outside). No
    /// input is copied (the view is the channels-last memory as it is); the stacked output is
    /// `kd×` the result and lives until the sum. Under autograd libtorch differentiates the
    /// composition (2-D convolution gradients, and slices of the output gradient).
    fn conv_depth_split(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: [i64; 2]) -> Tensor {
        let x = to_channels_last(x);
        let [n, c, d, h, wd] = x.size()[..] else { unreachable!("5-D input") };
        let [co, ci, kd, kh, kw] = w.size()[..] else { unreachable!("5-D kernel") };
        debug_assert_eq!(c, ci);
        // [B, D, H, W, C] memory, contiguous: [B·D, H, W, C] is a view; NCHW shape, NHWC strides.
        let x2 = x.permute([0, 2, 3, 4, 1]).reshape([n * d, h, wd, c]).permute([0, 3, 1, 2]);
        // [kd·C_out, C_in, kh, kw] with NHWC strides (cuDNN and oneDNN then keep NHWC).
        let w2 = w.permute([2, 0, 3, 4, 1]).contiguous().reshape([kd * co, kh, kw, ci]).permute([0, 3, 1, 2]);
        let y = x2.conv2d(&w2, None::<&Tensor>, stride, [kh / 2, kw / 2], [1i64, 1], 1);
        let (h2, w2) = (y.size()[2], y.size()[3]);
        // [B, D, H', W', kd, C_out] (a view when the convolution kept NHWC, as it does).
        let y = y.permute([0, 2, 3, 1]).contiguous().reshape([n, d, h2, w2, kd, co]);
        let mid = kd / 2;
        let mut out = y.select(4, mid).contiguous();
        for j in (0..kd).filter(|&j| j != mid) {
            // Output depth t takes slice j at input depth t + j − mid.
            let off = j - mid;
            let (t0, len) = (off.min(0).abs(), d - off.abs());
            if len > 0 {
                let _ = out.narrow(1, t0, len).g_add_(&y.narrow(1, t0 + off, len).select(4, j));
            }
        }
        if let Some(b) = b {
            let _ = out.g_add_(b);
        }
        out.permute([0, 4, 1, 2, 3])
    }

    /// A 1×1×1 convolution (padding 0) of channels-last activations as one matrix product over
    /// their `[voxels, C]` view, channels-last out (half precision on the CPU, and CUDA when
    /// channels-last is forced): ATen's `conv3d` sends 1×1×1 kernels to its NCDHW path on the
    /// CPU (a conversion in and out around each). Stride s keeps every s-th voxel, taken as one
    /// strided view of x: its gradient is then one zero-filled tensor with x's own (channels-last)
    /// strides and one copy into it, where a slice per axis gave three zero fills, three copies
    /// and an NCDHW gradient, which the add of the block's other gradient of x (channels-last)
    /// then read as a strided kernel.
    pub(super) fn conv1x1_channels_last(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: [i64; 3]) -> Tensor {
        let mut x = to_channels_last(x);
        if stride.iter().any(|&s| s > 1) {
            let (mut size, mut step) = (x.size(), x.stride());
            for (axis, s) in stride.into_iter().enumerate() {
                size[2 + axis] = (size[2 + axis] + s - 1) / s;
                step[2 + axis] *= s;
            }
            x = x.as_strided(size.as_slice(), step.as_slice(), None);
        }
        let k = w.size();
        // [B, D, H, W, C] (contiguous unless strided) · Wᵀ → [B, D, H, W, C_out], viewed back as
        // NCDHW shape with NDHWC strides.
        x.permute([0, 2, 3, 4, 1]).linear(&w.reshape([k[0], k[1]]), b).permute([0, 4, 1, 2, 3])
    }

    /// Instance norm (+ skip) (+ LeakyReLU) as ATen's batch norm over the `[1, B·C, …]` view
    /// (per sample for channels-last activations), the add and the activation in place on its
    /// output (see the module notes). In half precision the affine parameters are taken in f32.
    fn norm_act(x: &Tensor, g: &Tensor, b: &Tensor, skip: Option<&Tensor>, act: bool) -> Tensor {
        let dims = x.size();
        let n = dims[0];
        let half = matches!(x.kind(), Kind::Half | Kind::BFloat16);
        let (g, b) = if half && g.kind() != Kind::Float { (g.to_kind(Kind::Float), b.to_kind(Kind::Float)) } else { (g.shallow_clone(), b.shallow_clone()) };
        let bn = |t: &Tensor, g: &Tensor, b: &Tensor| t.batch_norm(Some(g), Some(b), None::<&Tensor>, None::<&Tensor>, true, 0.0, crate::ops::NORM_EPS, true);
        // A channels-last sample goes to ATen's own batch norm, whose channels-last kernels read
        // it as it is (`batch_norm` would pick cuDNN on a GPU, which wants NCDHW strides: a
        // conversion in and out).
        let bn_cl = |t: &Tensor, g: &Tensor, b: &Tensor| t.native_batch_norm(Some(g), Some(b), None::<&Tensor>, None::<&Tensor>, true, 0.0, crate::ops::NORM_EPS).0;
        // The output and the skip in one shape, for the in-place add and activation.
        let (mut y, skip) = if is_channels_last(x) {
            // The `[1, B·C, …]` view needs NCDHW strides: channels-last activations are
            // normalised one sample at a time (batch norm over a 1-sample batch is instance
            // norm), into the slices of one output or (`STU_TCH_NORM_CL=cat`) concatenated.
            let y = if n == 1 {
                bn_cl(x, &g, &b)
            } else if super::norm_slices_on() {
                sample_norm(x, &g, &b)
            } else {
                Tensor::cat(&x.split(1, 0).iter().map(|xs| bn_cl(xs, &g, &b)).collect::<Vec<_>>(), 0)
            };
            (y, skip.map(Tensor::shallow_clone))
        } else if super::norm_split_on(x.device()) && dims[2..].iter().product::<i64>() >= 2 * SPLIT_CHUNK {
            (split_norm(x, &g, &b), skip.map(Tensor::shallow_clone))
        } else {
            let mut flat = dims.clone();
            flat[0] = 1;
            flat[1] = n * dims[1];
            let (g, b) = if n > 1 { (g.repeat([n]), b.repeat([n])) } else { (g, b) };
            (bn(&x.reshape(&flat), &g, &b), skip.map(|s| s.reshape(&flat)))
        };
        if let Some(s) = skip {
            let _ = y.g_add_(&s);
        }
        if act {
            let _ = y.leaky_relu_();
        }
        // Back from the `[1, B·C, …]` view; an output already in shape is returned as it is (a
        // `view` would give a one-sample channels-last tensor the batch stride C, which ATen's
        // memory-format test reads as NCDHW: the decoder's concatenation then came out NCDHW
        // and was converted back for each convolution that reads it).
        if y.size() == dims { y } else { y.view(dims.as_slice()) }
    }

    /// nnU-Net's `DC_and_CE_loss` (`RobustCrossEntropyLoss` + `MemoryEfficientSoftDiceLoss`,
    /// background excluded) in ATen, with the gradient written by hand ([`dc_ce_grad`]) as
    /// `kernels/loss.rs` does on flex, so that autograd keeps nothing of it: the backward needs
    /// only the softmax probabilities, the target and `[2, B, C]` coefficients. The one-hot
    /// target is never formed: the Dice intersection `Σ p·y` is the target class's probability
    /// summed per (sample, class) by `scatter_add`, and `Σ y` the class counts. Returns (loss
    /// `[1]`, probabilities (f32, the logits' shape), coefficients `a`, `c` of
    /// `∂(−mean Dice)/∂p_kv = a_k·y_kv + c_k`, zero for the background).
    pub(super) fn dc_ce_parts(logits: &Tensor, target: &Tensor, batch_dice: bool, smooth: f64) -> (Tensor, Tensor, Tensor) {
        let dims = logits.size();
        let (b, c) = (dims[0], dims[1]);
        let n: i64 = dims[2..].iter().product();
        let t = target.reshape([b, n]).to_kind(Kind::Int64);
        // The logits as [B, C, N] (NCDHW) or, channels-last, as the [B, N, C] they are in memory:
        // no conversion either way; `ca` is the class axis.
        let (l3, ca) = as_bcn(logits);
        // log p in f32 (from half logits too), then p in place: one tensor of the logits' size.
        let mut p = l3.log_softmax(ca, Kind::Float);
        let logp_target = p.gather(ca, &t.unsqueeze(ca), false).view([b, n]);
        let _ = p.exp_();
        let ce = -logp_target.mean(Kind::Float);
        let p_target = logp_target.exp();
        let per_class = |src: &Tensor| Tensor::zeros([b, c], (Kind::Float, p.device())).scatter_add(1, &t, src);
        let inter = per_class(&p_target);
        let count = per_class(&p_target.ones_like());
        let sum_p = p.sum_dim_intlist([3 - ca].as_slice(), false, Kind::Float);
        let fg = |x: &Tensor| {
            let x = x.narrow(1, 1, c - 1);
            if batch_dice { x.sum_dim_intlist([0i64].as_slice(), true, Kind::Float) } else { x }
        };
        let (i, den) = (fg(&inter), fg(&count) + fg(&sum_p) + smooth);
        let num = &i * 2.0 + smooth;
        let dc = &num / den.clamp_min(1e-8);
        let terms = dc.numel() as f64;
        let loss = (ce - dc.mean(Kind::Float)).reshape([1]);
        let a = den.reciprocal() * (-2.0 / terms);
        let cst = num / (&den * &den) / terms;
        // Background column, then the per-batch rows when the Dice runs over the batch.
        let full = |x: Tensor| x.constant_pad_nd([1i64, 0]).expand([b, c], false);
        let coeffs = Tensor::stack(&[full(a), full(cst)], 0).contiguous();
        (loss, from_bcn(p, ca, &dims), coeffs)
    }

    /// A `[B, C, D, H, W]` tensor as `[B, C, N]` (class axis 1) when NCDHW, or as the
    /// `[B, N, C]` it is in memory (class axis 2) when channels-last; a copy only for other strides.
    fn as_bcn(x: &Tensor) -> (Tensor, i64) {
        let d = x.size();
        let n: i64 = d[2..].iter().product();
        if is_channels_last(x) { (x.permute([0, 2, 3, 4, 1]).view([d[0], n, d[1]]), 2) } else { (x.contiguous().view([d[0], d[1], n]), 1) }
    }

    /// The inverse of [`as_bcn`]: back to `dims` (NCDHW shape, the strides of the form it is in).
    fn from_bcn(x: Tensor, ca: i64, dims: &[i64]) -> Tensor {
        if ca == 2 { x.view([dims[0], dims[2], dims[3], dims[4], dims[1]]).permute([0, 4, 1, 2, 3]) } else { x.view(dims) }
    }

    /// `∂loss/∂logits · grad` for [`dc_ce_parts`] (f32, the logits' shape and layout), `p`
    /// left as it is ([`dc_ce_grad_in_place`] on a copy).
    #[cfg(test)]
    pub(super) fn dc_ce_grad(p: &Tensor, target: &Tensor, coeffs: &Tensor, grad: &Tensor) -> Tensor {
        dc_ce_grad_in_place(p.copy(), target, coeffs, grad)
    }

    /// `∂loss/∂logits · grad` for [`dc_ce_parts`] (f32, the logits' shape and layout), written
    /// over the probabilities `p`, which the backward needs no more: with `g_k = a_k·y_k + c_k`
    /// the Dice's gradient in the probabilities, through the softmax,
    /// `∂/∂z_k = p_k·(g_k − Σ_j p_j g_j) + (p_k − y_k)/N`, i.e.
    /// `p_k·(c_k + 1/N − q) + [k = t]·(a_t p_t − 1/N)` with `q = Σ_j p_j c_j + a_t p_t` per
    /// voxel: a batched matrix product for `Σ_j p_j c_j`, `p` multiplied in place by
    /// `c_k + 1/N − q` one chunk of voxels at a time (the factor is formed per chunk), and a
    /// scatter at the target class. No second tensor of the logits' size (1.76 GB at 105
    /// classes, 128³, batch 2) is alive beside `p` at the start of the backward.
    pub(super) fn dc_ce_grad_in_place(p: Tensor, target: &Tensor, coeffs: &Tensor, grad: &Tensor) -> Tensor {
        let dims = p.size();
        let (b, n) = (dims[0], dims[2..].iter().product::<i64>());
        let inv_n = 1.0 / (b * n) as f64;
        let g = grad.to_kind(Kind::Float).reshape([1, 1, 1]);
        // A view of `p` (or, for other strides, a copy: then that is written and returned).
        let (p3, ca) = as_bcn(&p);
        drop(p);
        let t = target.reshape([b, n]).to_kind(Kind::Int64).unsqueeze(ca);
        let (a, cst) = (coeffs.get(0), coeffs.get(1));
        // [B, 1, N] for NCDHW, [B, N, 1] channels-last.
        let a_t = a.gather(1, &t.view([b, n]), false).unsqueeze(ca);
        let at_pt = a_t * p3.gather(ca, &t, false);
        let q = (if ca == 1 { cst.unsqueeze(1).bmm(&p3) } else { p3.bmm(&cst.unsqueeze(2)) } + &at_pt) * &g;
        let per_class = (cst + inv_n).unsqueeze(3 - ca) * &g;
        // The voxel axis of the [B, C, N] / [B, N, C] view.
        let axis = 3 - ca;
        // (Unit tests' volumes are small: several chunks there too.)
        const CHUNK: i64 = if cfg!(test) { 7 } else { 1 << 17 };
        for start in (0..n).step_by(CHUNK as usize) {
            let len = CHUNK.min(n - start);
            let _ = p3.narrow(axis, start, len).g_mul_(&(&per_class - q.narrow(axis, start, len)));
        }
        let mut dz = p3;
        let _ = dz.scatter_add_(ca, &t, &((at_pt - inv_n) * &g));
        from_bcn(dz, ca, &dims)
    }

    /// Nearest upsampling by the integer factors `s`, in `x`'s own layout: one broadcast copy
    /// (`x` read once, the output written once), the input viewed with a unit axis after each
    /// spatial one and expanded along it. ATen's `upsample_nearest3d` takes NCDHW only on CUDA:
    /// a channels-last input was converted in and its output converted back, and its gradient
    /// came out NCDHW, so that adding it to the skip branch's channels-last gradient ran as a
    /// strided kernel (on the H200 of 2026-11-28 these took ~7 of B's 65 ms of training-step
    /// kernels). ATen's kernels where [`super::upsample_aten_on`] (the CPU, whose kernels keep
    /// channels-last, and NCDHW tensors).
    pub(super) fn upsample(x: &Tensor, s: [usize; 3]) -> Tensor {
        let d = x.size();
        let s = s.map(|v| v as i64);
        let out = [d[2] * s[0], d[3] * s[1], d[4] * s[2]];
        if super::upsample_aten_on(x.device(), is_channels_last(x)) {
            return x.upsample_nearest3d(out, None, None, None);
        }
        let (n, c) = (d[0], d[1]);
        if is_channels_last(x) {
            // [N, D, H, W, C] as it is in memory.
            x.permute([0, 2, 3, 4, 1])
                .reshape([n, d[2], 1, d[3], 1, d[4], 1, c])
                .expand([n, d[2], s[0], d[3], s[1], d[4], s[2], c], false)
                .reshape([n, out[0], out[1], out[2], c])
                .permute([0, 4, 1, 2, 3])
        } else {
            x.reshape([n, c, d[2], 1, d[3], 1, d[4], 1]).expand([n, c, d[2], s[0], d[3], s[1], d[4], s[2]], false).reshape([n, c, out[0], out[1], out[2]])
        }
    }

    /// The gradient of [`upsample`]: `grad` summed over each `s`-block, in `grad`'s own layout
    /// (one reduction, accumulated in f32 for half types as ATen's reductions do).
    pub(super) fn upsample_backward(grad: &Tensor, s: [usize; 3]) -> Tensor {
        let d = grad.size();
        let s = s.map(|v| v as i64);
        let i = [d[2] / s[0], d[3] / s[1], d[4] / s[2]];
        if super::upsample_aten_on(grad.device(), is_channels_last(grad)) {
            return Tensor::upsample_nearest3d_backward(grad, &d[2..], [d[0], d[1], i[0], i[1], i[2]], None, None, None);
        }
        let (n, c) = (d[0], d[1]);
        if is_channels_last(grad) {
            grad.permute([0, 2, 3, 4, 1])
                .reshape([n, i[0], s[0], i[1], s[1], i[2], s[2], c])
                .sum_dim_intlist([2i64, 4, 6].as_slice(), false, grad.kind())
                .permute([0, 4, 1, 2, 3])
        } else {
            grad.reshape([n, c, i[0], s[0], i[1], s[1], i[2], s[2]]).sum_dim_intlist([3i64, 5, 7].as_slice(), false, grad.kind())
        }
    }

    fn leaf(t: &Tensor) -> Tensor {
        t.detach().set_requires_grad(true)
    }

    /// An op's output for burn and the same tensor with its libtorch graph, for the node state.
    /// They share burn-tch's storage count, so that burn never writes the output in place while
    /// the graph may still read it (the in-place LeakyReLU saves its result).
    fn output(y: Tensor) -> (TchTensor, TchTensor) {
        let out = TchTensor::new(y.detach());
        let graph = TchTensor { tensor: y, storage: out.storage.clone() };
        (out, graph)
    }

    fn wrap<const N: usize>(ts: Vec<Tensor>) -> [TchTensor; N] {
        let n = ts.len();
        ts.into_iter().map(TchTensor::new).collect::<Vec<_>>().try_into().unwrap_or_else(|_| panic!("{N} gradients expected, got {n}"))
    }

    impl TorchOps for LibTorch {
        fn conv3d_nc(x: FloatTensor<LibTorch>, weight: FloatTensor<LibTorch>, bias: FloatTensor<LibTorch>, stride: [usize; 3], add_bias: bool) -> FloatTensor<LibTorch> {
            TchTensor::new(tch::no_grad(|| conv(&x.tensor, &weight.tensor, add_bias.then_some(&bias.tensor), stride)))
        }

        fn conv3d_nc_graph(
            x: FloatTensor<LibTorch>,
            weight: FloatTensor<LibTorch>,
            bias: FloatTensor<LibTorch>,
            stride: [usize; 3],
            add_bias: bool,
        ) -> (FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>, LeafCopies) {
            let (xl, wl, copies) = leaves(&x.tensor, &weight.tensor, stride);
            let y = tch::with_grad(|| conv(&xl, &wl, add_bias.then_some(&bias.tensor), stride));
            let (y, y_graph) = output(y);
            (y, y_graph, TchTensor::new(xl), TchTensor::new(wl), copies)
        }

        fn conv3d_nc_graph_backward(
            y_graph: FloatTensor<LibTorch>,
            x_leaf: FloatTensor<LibTorch>,
            w_leaf: FloatTensor<LibTorch>,
            grad: FloatTensor<LibTorch>,
            need_x: bool,
            copies: LeafCopies,
            sum_bias: bool,
        ) -> (Option<FloatTensor<LibTorch>>, FloatTensor<LibTorch>, FloatTensor<LibTorch>) {
            let db = TchTensor::new(tch::no_grad(|| {
                if sum_bias {
                    grad.tensor.sum_dim_intlist([0i64, 2, 3, 4].as_slice(), false, None::<Kind>)
                } else {
                    Tensor::zeros([grad.tensor.size()[1]], (grad.tensor.kind(), grad.tensor.device()))
                }
            }));
            // The weight gradient of a channels-last convolution comes out channels-last. For a
            // leaf copied from an NCDHW weight it is made contiguous here, in the compute type:
            // the optimiser reads gradients flat in NCDHW order, and that took an f32 copy after
            // the cast to f32, twice as large (STU-Net-H, f16: 5.8 GB). A weight that came
            // channels-last (`cast_weight_cl`) gets it as it is; that cast's gradient makes it
            // f32 and contiguous in one copy. (The weight is the last leaf.)
            let grads = |leaves: &[&Tensor]| {
                let mut gs = vjp(&y_graph.tensor, &grad.tensor, leaves);
                let dw = gs.pop().expect("one gradient per leaf");
                gs.push(if dw.is_contiguous() || !copies.w { dw } else { tch::no_grad(|| dw.contiguous()) });
                gs
            };
            if need_x {
                let mut gs = grads(&[&x_leaf.tensor, &w_leaf.tensor]);
                // x's gradient in x's layout, channels-last, as the block's other gradients of
                // x (an add across layouts runs as a strided kernel).
                if copies.x {
                    gs[0] = tch::no_grad(|| to_channels_last(&gs[0]));
                }
                let [dx, dw] = wrap(gs);
                (Some(dx), dw, db)
            } else {
                let [dw] = wrap(grads(&[&w_leaf.tensor]));
                (None, dw, db)
            }
        }

        fn norm_act_nc(x: FloatTensor<LibTorch>, gamma: FloatTensor<LibTorch>, beta: FloatTensor<LibTorch>, act: bool) -> FloatTensor<LibTorch> {
            TchTensor::new(tch::no_grad(|| norm_act(&x.tensor, &gamma.tensor, &beta.tensor, None, act)))
        }

        fn norm_add_act_nc(x: FloatTensor<LibTorch>, gamma: FloatTensor<LibTorch>, beta: FloatTensor<LibTorch>, skip: FloatTensor<LibTorch>) -> FloatTensor<LibTorch> {
            TchTensor::new(tch::no_grad(|| norm_act(&x.tensor, &gamma.tensor, &beta.tensor, Some(&skip.tensor), true)))
        }

        fn norm_act_nc_graph(
            x: FloatTensor<LibTorch>,
            gamma: FloatTensor<LibTorch>,
            beta: FloatTensor<LibTorch>,
            act: bool,
        ) -> (FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>) {
            let (xl, gl, bl) = (leaf(&x.tensor), leaf(&gamma.tensor), leaf(&beta.tensor));
            let y = tch::with_grad(|| norm_act(&xl, &gl, &bl, None, act));
            let (y, y_graph) = output(y);
            (y, y_graph, TchTensor::new(xl), TchTensor::new(gl), TchTensor::new(bl))
        }

        fn norm_act_nc_graph_backward(
            y_graph: FloatTensor<LibTorch>,
            x_leaf: FloatTensor<LibTorch>,
            g_leaf: FloatTensor<LibTorch>,
            b_leaf: FloatTensor<LibTorch>,
            grad: FloatTensor<LibTorch>,
        ) -> (FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>) {
            let [dx, dg, db] = wrap(vjp(&y_graph.tensor, &grad.tensor, &[&x_leaf.tensor, &g_leaf.tensor, &b_leaf.tensor]));
            (dx, dg, db)
        }

        fn norm_add_act_nc_graph(
            x: FloatTensor<LibTorch>,
            gamma: FloatTensor<LibTorch>,
            beta: FloatTensor<LibTorch>,
            skip: FloatTensor<LibTorch>,
        ) -> (FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>) {
            let (xl, gl, bl, sl) = (leaf(&x.tensor), leaf(&gamma.tensor), leaf(&beta.tensor), leaf(&skip.tensor));
            let y = tch::with_grad(|| norm_act(&xl, &gl, &bl, Some(&sl), true));
            let (y, y_graph) = output(y);
            (y, y_graph, TchTensor::new(xl), TchTensor::new(gl), TchTensor::new(bl), TchTensor::new(sl))
        }

        fn norm_add_act_nc_graph_backward(
            y_graph: FloatTensor<LibTorch>,
            x_leaf: FloatTensor<LibTorch>,
            g_leaf: FloatTensor<LibTorch>,
            b_leaf: FloatTensor<LibTorch>,
            s_leaf: FloatTensor<LibTorch>,
            grad: FloatTensor<LibTorch>,
        ) -> (FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>) {
            let [dx, dg, db, ds] = wrap(vjp(&y_graph.tensor, &grad.tensor, &[&x_leaf.tensor, &g_leaf.tensor, &b_leaf.tensor, &s_leaf.tensor]));
            (dx, dg, db, ds)
        }

        fn upsample_nc(x: FloatTensor<LibTorch>, scale: [usize; 3]) -> FloatTensor<LibTorch> {
            TchTensor::new(tch::no_grad(|| upsample(&x.tensor, scale)))
        }

        fn upsample_nc_backward(grad: FloatTensor<LibTorch>, scale: [usize; 3]) -> FloatTensor<LibTorch> {
            TchTensor::new(tch::no_grad(|| upsample_backward(&grad.tensor, scale)))
        }

        fn cast_weight_cl(w: FloatTensor<LibTorch>, dtype: FloatDType) -> FloatTensor<LibTorch> {
            TchTensor::new(cast_channels_last(&w.tensor, kind_of(dtype)))
        }

        fn cast_weight_cl_backward(grad: FloatTensor<LibTorch>, dtype: FloatDType) -> FloatTensor<LibTorch> {
            TchTensor::new(cast_contiguous(&grad.tensor, kind_of(dtype)))
        }

        fn dc_ce_nc(logits: FloatTensor<LibTorch>, target: FloatTensor<LibTorch>, batch_dice: bool, smooth: f64) -> FloatTensor<LibTorch> {
            TchTensor::new(tch::no_grad(|| dc_ce_parts(&logits.tensor, &target.tensor, batch_dice, smooth).0))
        }

        fn dc_ce_nc_fwd(logits: FloatTensor<LibTorch>, target: FloatTensor<LibTorch>, batch_dice: bool, smooth: f64) -> (FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>) {
            let (loss, p, coeffs) = tch::no_grad(|| dc_ce_parts(&logits.tensor, &target.tensor, batch_dice, smooth));
            (TchTensor::new(loss), TchTensor::new(p), TchTensor::new(coeffs))
        }

        fn dc_ce_nc_bwd(probs: FloatTensor<LibTorch>, target: FloatTensor<LibTorch>, coeffs: FloatTensor<LibTorch>, grad: FloatTensor<LibTorch>) -> FloatTensor<LibTorch> {
            // The probabilities are this node's own (the backward consumes its state): written
            // over unless something else shares them.
            let p = if probs.can_mut() { probs.tensor } else { probs.tensor.copy() };
            TchTensor::new(tch::no_grad(|| dc_ce_grad_in_place(p, &target.tensor, &coeffs.tensor, &grad.tensor)))
        }
    }
}

// Every node state below also holds the burn-side inputs (not only the libtorch leaves, which
// share their storage), so that burn never writes them in place while libtorch's graph still
// reads them.
impl<B: Backend + TorchOps, C: CheckpointStrategy> TorchOps for Autodiff<B, C> {
    fn conv3d_nc(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, stride: [usize; 3], add_bias: bool) -> FloatTensor<Self> {
        /// Carries the bias's type (a bias kept in f32 under half precision gets an f32
        /// gradient), and whether its gradient is summed ([`bias_grad_zero_on`]).
        #[derive(Debug)]
        struct ConvNc(DType, bool);

        impl<B: Backend + TorchOps> Backward<B, 3> for ConvNc {
            // (The inputs, the graph, the leaves; which leaves are copies.)
            type State = ([B::FloatTensorPrimitive; 5], LeafCopies);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                let ([_x, _w, y_graph, x_leaf, w_leaf], copies) = ops.state;
                let [node_x, node_w, node_b] = ops.parents;
                let (dx, dw, db) = B::conv3d_nc_graph_backward(y_graph, x_leaf, w_leaf, grad, node_x.is_some(), copies, self.1);
                let db = if db.dtype() == self.0 { db } else { B::float_cast(db, FloatDType::from(self.0)) };
                register_grads!(B, grads, [node_w, node_b], [dw, db]);
                if let (Some(node), Some(dx)) = (node_x, dx) {
                    grads.register::<B>(node.id, dx);
                }
            }
        }

        // A bias left out of the forward (a norm follows, which removes it) has a gradient of
        // exactly zero; summed, rounding's.
        let sum_bias = add_bias || !bias_grad_zero_on();
        match ConvNc(bias.dtype(), sum_bias).prepare::<C>([x.node(), weight.node(), bias.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (xp, wp) = (x.primitive().clone(), weight.primitive().clone());
                let (y, y_graph, xl, wl, copies) = B::conv3d_nc_graph(x.into_primitive(), weight.into_primitive(), bias.into_primitive(), stride, add_bias);
                // A leaf that is a copy shares no storage with burn's tensor: that one need not
                // be kept (see the note above this impl).
                let wp = if copies.w { wl.clone() } else { wp };
                let xp = if copies.x { xl.clone() } else { xp };
                prep.finish(([xp, wp, y_graph, xl, wl], copies), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::conv3d_nc(x.into_primitive(), weight.into_primitive(), bias.into_primitive(), stride, add_bias)),
        }
    }

    fn conv3d_nc_graph(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _bias: FloatTensor<Self>,
        _stride: [usize; 3],
        _add_bias: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, LeafCopies) {
        unreachable!("conv3d_nc_graph is called on the inner backend only")
    }

    fn conv3d_nc_graph_backward(
        _y_graph: FloatTensor<Self>,
        _x_leaf: FloatTensor<Self>,
        _w_leaf: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _need_x: bool,
        _copies: LeafCopies,
        _sum_bias: bool,
    ) -> (Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("second-order gradients of conv3d_nc are not supported")
    }

    fn cast_weight_cl(w: FloatTensor<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CastWeightCl;

        impl<B: Backend + TorchOps> Backward<B, 1> for CastWeightCl {
            // The input's type, the gradient's.
            type State = FloatDType;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                register_grads!(B, grads, ops.parents, [B::cast_weight_cl_backward(grad, ops.state)]);
            }
        }

        match CastWeightCl.prepare::<C>([w.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let from = FloatDType::from(w.primitive().dtype());
                prep.finish(from, B::cast_weight_cl(w.into_primitive(), dtype))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::cast_weight_cl(w.into_primitive(), dtype)),
        }
    }

    fn cast_weight_cl_backward(_grad: FloatTensor<Self>, _dtype: FloatDType) -> FloatTensor<Self> {
        unreachable!("second-order gradients of cast_weight_cl are not supported")
    }

    fn norm_act_nc(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, act: bool) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct NormActNc;

        impl<B: Backend + TorchOps> Backward<B, 3> for NormActNc {
            type State = [B::FloatTensorPrimitive; 5];

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                let [_x, y_graph, x_leaf, g_leaf, b_leaf] = ops.state;
                let (dx, dg, db) = B::norm_act_nc_graph_backward(y_graph, x_leaf, g_leaf, b_leaf, grad);
                register_grads!(B, grads, ops.parents, [dx, dg, db]);
            }
        }

        match NormActNc.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let xp = x.primitive().clone();
                let (y, y_graph, xl, gl, bl) = B::norm_act_nc_graph(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), act);
                prep.finish([xp, y_graph, xl, gl, bl], y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::norm_act_nc(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), act)),
        }
    }

    fn norm_add_act_nc(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, skip: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct NormAddActNc;

        impl<B: Backend + TorchOps> Backward<B, 4> for NormAddActNc {
            type State = [B::FloatTensorPrimitive; 7];

            fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                let [_x, _s, y_graph, x_leaf, g_leaf, b_leaf, s_leaf] = ops.state;
                let (dx, dg, db, ds) = B::norm_add_act_nc_graph_backward(y_graph, x_leaf, g_leaf, b_leaf, s_leaf, grad);
                register_grads!(B, grads, ops.parents, [dx, dg, db, ds]);
            }
        }

        match NormAddActNc.prepare::<C>([x.node(), gamma.node(), beta.node(), skip.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (xp, sp) = (x.primitive().clone(), skip.primitive().clone());
                let (y, y_graph, xl, gl, bl, sl) = B::norm_add_act_nc_graph(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), skip.into_primitive());
                prep.finish([xp, sp, y_graph, xl, gl, bl, sl], y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::norm_add_act_nc(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), skip.into_primitive())),
        }
    }

    fn upsample_nc(x: FloatTensor<Self>, scale: [usize; 3]) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct UpsampleNc;

        impl<B: Backend + TorchOps> Backward<B, 1> for UpsampleNc {
            type State = [usize; 3];

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                register_grads!(B, grads, ops.parents, [B::upsample_nc_backward(grad, ops.state)]);
            }
        }

        match UpsampleNc.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(scale, B::upsample_nc(x.into_primitive(), scale)),
            OpsKind::UnTracked(prep) => prep.finish(B::upsample_nc(x.into_primitive(), scale)),
        }
    }

    fn upsample_nc_backward(_grad: FloatTensor<Self>, _scale: [usize; 3]) -> FloatTensor<Self> {
        unreachable!("second-order gradients of upsample_nc are not supported")
    }

    fn norm_act_nc_graph(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _beta: FloatTensor<Self>,
        _act: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("norm_act_nc_graph is called on the inner backend only")
    }

    fn norm_act_nc_graph_backward(
        _y_graph: FloatTensor<Self>,
        _x_leaf: FloatTensor<Self>,
        _g_leaf: FloatTensor<Self>,
        _b_leaf: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("second-order gradients of norm_act_nc are not supported")
    }

    fn norm_add_act_nc_graph(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _beta: FloatTensor<Self>,
        _skip: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("norm_add_act_nc_graph is called on the inner backend only")
    }

    fn norm_add_act_nc_graph_backward(
        _y_graph: FloatTensor<Self>,
        _x_leaf: FloatTensor<Self>,
        _g_leaf: FloatTensor<Self>,
        _b_leaf: FloatTensor<Self>,
        _s_leaf: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("second-order gradients of norm_add_act_nc are not supported")
    }

    fn dc_ce_nc(logits: FloatTensor<Self>, target: FloatTensor<Self>, batch_dice: bool, smooth: f64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct DcCeNc;

        impl<B: Backend + TorchOps> Backward<B, 2> for DcCeNc {
            // Probabilities, target, coefficients, and the logits' dtype for their gradient.
            type State = ([B::FloatTensorPrimitive; 3], DType);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_l, _target] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let ([p, t, coeffs], dtype) = ops.state;
                if let Some(node) = node_l {
                    let dz = B::dc_ce_nc_bwd(p, t, coeffs, grad);
                    let dz = if dtype == DType::F32 { dz } else { B::float_cast(dz, FloatDType::from(dtype)) };
                    grads.register::<B>(node.id, dz);
                }
            }
        }

        match DcCeNc.prepare::<C>([logits.node(), target.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let dtype = logits.primitive().dtype();
                let tp = target.primitive().clone();
                let (y, p, coeffs) = B::dc_ce_nc_fwd(logits.into_primitive(), target.into_primitive(), batch_dice, smooth);
                prep.finish(([p, tp, coeffs], dtype), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::dc_ce_nc(logits.into_primitive(), target.into_primitive(), batch_dice, smooth)),
        }
    }

    fn dc_ce_nc_fwd(
        _logits: FloatTensor<Self>,
        _target: FloatTensor<Self>,
        _batch_dice: bool,
        _smooth: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("dc_ce_nc_fwd is called on the inner backend only")
    }

    fn dc_ce_nc_bwd(_probs: FloatTensor<Self>, _target: FloatTensor<Self>, _coeffs: FloatTensor<Self>, _grad: FloatTensor<Self>) -> FloatTensor<Self> {
        unreachable!("second-order gradients of dc_ce_nc are not supported")
    }
}

/// A process-wide on/off choice of the libtorch paths: forced by [`Switch::set`] (tests), else
/// by an environment variable (read once; another value is reported and ignored), else the
/// caller's default.
pub(crate) struct Switch {
    /// 0: not read yet, 1: on, 2: off, 3: the default.
    state: std::sync::atomic::AtomicU8,
    var: &'static str,
    on: &'static str,
    off: &'static str,
}

impl Switch {
    pub(crate) const fn new(var: &'static str, on: &'static str, off: &'static str) -> Self {
        Self { state: std::sync::atomic::AtomicU8::new(0), var, on, off }
    }

    pub(crate) fn set(&self, on: Option<bool>) {
        self.state.store(
            match on {
                Some(true) => 1,
                Some(false) => 2,
                None => 3,
            },
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// `Some` when forced on or off, `None` for the default.
    pub(crate) fn get(&self) -> Option<bool> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut v = self.state.load(Relaxed);
        if v == 0 {
            v = match std::env::var(self.var) {
                Ok(x) if x == self.on => 1,
                Ok(x) if x == self.off => 2,
                Ok(x) => {
                    eprintln!("warning: {}={x} is neither `{}` nor `{}`; using the default", self.var, self.on, self.off);
                    3
                }
                Err(_) => 3,
            };
            self.state.store(v, Relaxed);
        }
        match v {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }
}

static CHANNELS_LAST: Switch = Switch::new("STU_TCH_CHANNELS_LAST", "1", "0");
static NORM_SPLIT: Switch = Switch::new("STU_TCH_NORM", "split", "plane");
static CONV_D2: Switch = Switch::new("STU_TCH_CONV", "d2", "3d");
static UPSAMPLE_ATEN: Switch = Switch::new("STU_TCH_UPSAMPLE", "aten", "copy");
static NORM_SLICES: Switch = Switch::new("STU_TCH_NORM_CL", "slices", "cat");
static WEIGHT_CL: Switch = Switch::new("STU_TCH_WEIGHT_CL", "1", "0");
static BIAS_GRAD_ZERO: Switch = Switch::new("STU_TCH_BIAS_GRAD", "zero", "sum");

/// Forces the zero bias gradient of [`bias_grad_zero_on`] on (`Some(true)`) or off
/// (`Some(false)`), or leaves it to the default (`None`, off); overrides `STU_TCH_BIAS_GRAD`
/// (tests, `check-ops`).
pub fn set_bias_grad_zero(on: Option<bool>) {
    BIAS_GRAD_ZERO.set(on);
}

/// Whether a tracked convolution whose bias is left out of the forward (its output goes
/// straight into an instance norm, whose mean subtraction removes the bias exactly: `add_bias`)
/// gives that bias a gradient of zeros instead of the sum of its output gradient, which is zero
/// but for rounding (the norm's input gradient sums to zero over each sample's channel). The sum
/// reads the whole output gradient once per convolution: for STU-Net-H about 12 GB per training
/// step, a few ms on an H200 (B's profile of 2026-11-28: 2.9 ms of `sum` kernels in its 65 ms,
/// these among them). PyTorch computes the sum. Off by default until the GPU suite times it
/// (`stu-zero-bias-grad` rows); `STU_TCH_BIAS_GRAD=zero` / `sum` forces it on / off (read once).
pub fn bias_grad_zero_on() -> bool {
    BIAS_GRAD_ZERO.get().unwrap_or(false)
}

/// Whether the cast of a 3³ convolution weight (a half-precision step's, or an inference
/// network's in any precision) writes it channels-last where the convolutions run so
/// (`ops::cast_conv_weight`; else each convolution converts the NCDHW cast, as before). On by
/// default; not timed on a GPU yet. `STU_TCH_WEIGHT_CL=1` / `0`
/// forces it on / off (read once). Values and gradients are the same either way.
pub fn weight_cl_on() -> bool {
    WEIGHT_CL.get().unwrap_or(true)
}

/// Forces the channels-last instance norm of a batch to write each sample's output into its
/// slice of one tensor (`Some(true)`) or to concatenate per-sample outputs (`Some(false)`), or
/// leaves it to the default (`None`, the slices); overrides `STU_TCH_NORM_CL` (tests).
pub fn set_norm_slices(on: Option<bool>) {
    NORM_SLICES.set(on);
}

/// Whether the channels-last instance norm of a batch of several samples writes each sample's
/// batch-norm output into its slice of one tensor (`csrc/grad.cpp`, `SampleNorm`) rather than
/// concatenating the per-sample outputs after (a copy of the activation in the forward, and
/// the concatenation's backward). On by default; its speed on a GPU is not measured yet (B's
/// concatenations took 1.4 of its 65 ms of training-step kernels on the H200, 2026-11-28).
/// `STU_TCH_NORM_CL=slices` / `cat` forces it on / off (read once). Values and gradients are
/// the same either way.
pub fn norm_slices_on() -> bool {
    NORM_SLICES.get().unwrap_or(true)
}

/// Forces the nearest upsampling onto ATen's `upsample_nearest3d` kernels (`Some(true)`), onto
/// the broadcast copy (`Some(false)`), or leaves it to the device and layout (`None`);
/// overrides `STU_TCH_UPSAMPLE` (tests).
pub fn set_upsample_aten(on: Option<bool>) {
    UPSAMPLE_ATEN.set(on);
}

/// Whether nearest upsampling (and its gradient) of a tensor on `device`, channels-last or not,
/// runs through ATen's `upsample_nearest3d` kernels rather than as a broadcast copy (and a block
/// sum) in the tensor's own layout (`libtorch::upsample`). By default the copy for
/// channels-last tensors on CUDA, whose ATen kernels take NCDHW only, which cost them two layout
/// conversions and an NCDHW gradient; ATen's kernels for NCDHW tensors (their own layout) and on
/// the CPU, whose kernels read and write channels-last as it is (a 32-channel 64³ → 128³ step,
/// f32, 2 cores: forward 0.27–0.40 s against the copy's 0.31–0.53 s, gradient 0.26–0.33 s
/// against the block sum's 1.24–1.33 s). The copy's speed on a GPU is not measured yet;
/// `STU_TCH_UPSAMPLE=aten` / `copy` forces one or the other everywhere (read once). Values and
/// gradients are the same either way.
pub fn upsample_aten_on(device: tch::Device, channels_last: bool) -> bool {
    UPSAMPLE_ATEN.get().unwrap_or(!(device.is_cuda() && channels_last))
}

/// Forces the layout of the libtorch convolutions: channels-last (`Some(true)`), NCDHW
/// (`Some(false)`), or by device (`None`, the default); overrides `STU_TCH_CHANNELS_LAST` (tests).
pub fn set_channels_last(on: Option<bool>) {
    CHANNELS_LAST.set(on);
}

/// Whether the libtorch convolutions on `device` run channels-last (NDHWC strides under NCDHW
/// shapes, as PyTorch's `channels_last_3d`). By default yes, on every device: on the CPU oneDNN
/// gains from it (0.88× the S training step, 0.59× the S patch inference), and on an H200
/// (2026-11-28, f16, `reports/bench/gpu.md`) it was faster than NCDHW in every case timed both
/// ways: STU-Net-B's training step 71.9 vs 86.4 ms (10.4 vs 10.6 GiB), B's patch inference 11.1
/// vs 15.7 ms, H's 89.9 vs 99.0, L's 35.5 vs 40.6 (NCDHW had been the CUDA default while the
/// channels-last path still converted layouts around instance norm, 1×1×1 convolutions and
/// the loss). `STU_TCH_CHANNELS_LAST=1` / `0` forces it on / off everywhere (read once). Values
/// and gradients are the same either way.
pub fn channels_last_on(_device: tch::Device) -> bool {
    CHANNELS_LAST.get().unwrap_or(true)
}

/// Forces the NCDHW instance norm's kernel (`Some(true)`: rows split into chunks; `Some(false)`:
/// ATen's batch norm over the `[1, B·C, …]` view, cuDNN's on a GPU), or leaves it to the default
/// (`None`); overrides `STU_TCH_NORM` (tests).
pub fn set_norm_split(on: Option<bool>) {
    NORM_SPLIT.set(on);
}

/// Whether instance norm of NCDHW activations on `device` runs with each (sample, channel) row
/// split into chunks of about 8192 voxels (`csrc/grad.cpp`, `SplitNorm`): ATen's batch-norm
/// kernels give each plane of the `[1, B·C, …]` view one thread block, so at 128³ a few dozen
/// blocks read 2 M voxels each. The statistics are combined exactly (Welford per chunk in f32,
/// then the chunks' means and variances), so values match the unsplit norm to rounding.
/// By default on CUDA devices, where it was faster in every case an H200 timed (2026-11-28, f16,
/// NCDHW): B's training step 76.2 vs 86.4 ms, H's 559.8 vs 570.0, L's 203.8 vs 219.2, patch
/// inference B 14.3 vs 15.7, H 93.3 vs 99.0, L 34.9 vs 40.6; not on the CPU, where ATen's
/// batch-norm kernels are already parallel and splitting measured slower. `STU_TCH_NORM=split` /
/// `plane` forces it on / off (read once). It only matters where convolutions run NCDHW
/// (`STU_TCH_CHANNELS_LAST=0`): channels-last activations keep their per-sample kernels.
pub fn norm_split_on(device: tch::Device) -> bool {
    NORM_SPLIT.get().unwrap_or(device.is_cuda())
}

/// Forces the depth-split convolution on (`Some(true)`) or off (`Some(false)`), or leaves it to
/// the default (`None`, off); overrides `STU_TCH_CONV` (tests).
pub fn set_conv_d2(on: Option<bool>) {
    CONV_D2.set(on);
}

/// Whether the channels-last 3-D convolutions with depth stride 1 on `device` run as 2-D
/// convolutions over the `[B·D, H, W, C]` view, the kernel's depth slices stacked as output
/// channels and summed along depth after (`conv_depth_split`): the same MACs as a 3-D
/// convolution, through cuDNN's 2-D kernels, which are tuned far more than its 3-D ones, at
/// the price of a `kd×` wider transient output and two adds. Only where the activations are
/// channels-last ([`channels_last_on`]); depth-strided convolutions stay 3-D. On the CPU it
/// loses to oneDNN's 3-D kernels (a 32→32 3³ convolution of a 64³ volume, f32: 3.8× slower in
/// PyTorch 2.15 on 2 cores); on a GPU it is not measured yet: off by default,
/// `STU_TCH_CONV=d2` turns it on, `STU_TCH_CONV=3d` off (read once).
pub fn conv_d2_on(_device: tch::Device) -> bool {
    CONV_D2.get().unwrap_or(false)
}

/// Which 3-D convolutions of channels-last activations run through ATen's NCDHW convolution
/// instead ([`conv_ncdhw_for`]): a list of `IxO@E` patterns, each matching input channels I,
/// output channels O and the input's largest spatial extent E, any of them `*`; `all` is `*x*@*`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NcdhwRule(Vec<[Option<i64>; 3]>);

impl NcdhwRule {
    /// Every 3-D convolution with a kernel wider than 1×1×1.
    pub fn all() -> Self {
        Self(vec![[None; 3]])
    }

    /// `all`, or comma-separated `IxO@E` patterns (`192x96@128,96x192@128`, `*x*@128`).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim() == "all" {
            return Ok(Self::all());
        }
        let part = |p: &str| -> Result<Option<i64>, String> {
            match p.trim() {
                "*" => Ok(None),
                n => n.parse::<i64>().ok().filter(|&v| v > 0).map(Some).ok_or_else(|| format!("`{n}` is neither a positive number nor `*`")),
            }
        };
        let mut rules = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = |why: String| format!("`{entry}`: {why} (want IxO@E, e.g. 192x96@128)");
            let (io, e) = entry.split_once('@').ok_or_else(|| bad("no `@`".into()))?;
            let (i, o) = io.split_once('x').ok_or_else(|| bad("no `x` between the channel counts".into()))?;
            rules.push([part(i).map_err(bad)?, part(o).map_err(bad)?, part(e).map_err(bad)?]);
        }
        if rules.is_empty() {
            return Err("no pattern (want `all` or IxO@E, …)".into());
        }
        Ok(Self(rules))
    }

    /// Whether a convolution of `c_in` → `c_out` channels on an input of largest extent
    /// `extent` matches a pattern.
    pub fn matches(&self, c_in: i64, c_out: i64, extent: i64) -> bool {
        self.0.iter().any(|r| r.iter().zip([c_in, c_out, extent]).all(|(want, got)| want.is_none_or(|w| w == got)))
    }
}

#[cfg(test)]
mod rule_tests {
    use super::NcdhwRule;

    /// `STU_TCH_CONV_NCDHW`'s patterns match by input channels, output channels and largest
    /// extent, `*` for any; a malformed value is an error naming the entry.
    #[test]
    fn ncdhw_rules_match_the_shapes_they_name() {
        let r = NcdhwRule::parse("192x96@128, 96x192@128").unwrap();
        assert!(r.matches(192, 96, 128) && r.matches(96, 192, 128));
        assert!(!r.matches(192, 96, 64) && !r.matches(96, 96, 128) && !r.matches(384, 192, 64));
        let any = NcdhwRule::parse("*x*@128").unwrap();
        assert!(any.matches(1, 32, 128) && any.matches(96, 96, 128) && !any.matches(96, 96, 127));
        assert_eq!(NcdhwRule::parse("all").unwrap(), NcdhwRule::all());
        assert!(NcdhwRule::all().matches(3, 5, 7));
        for (bad, says) in [("192x96", "no `@`"), ("192-96@128", "no `x`"), ("0x96@128", "`0`"), ("ax96@128", "`a`"), ("", "no pattern"), (" , ", "no pattern")] {
            let err = NcdhwRule::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}

/// The rule of [`conv_ncdhw_for`]: unread (`None`), or read / set (`Some`, `Some(None)`: no
/// convolution).
static CONV_NCDHW: std::sync::RwLock<Option<Option<NcdhwRule>>> = std::sync::RwLock::new(None);

/// Sends the channels-last convolutions that `rule` matches through NCDHW (`Some`), or none
/// (`None`); overrides `STU_TCH_CONV_NCDHW` (tests, `check-ops`).
pub fn set_conv_ncdhw(rule: Option<NcdhwRule>) {
    *CONV_NCDHW.write().unwrap_or_else(|e| e.into_inner()) = Some(rule);
}

/// Whether a 3-D convolution (kernel wider than 1×1×1) of `c_in` → `c_out` channels on
/// channels-last activations whose largest spatial extent is `extent` runs as ATen's NCDHW
/// convolution of NCDHW copies, its output copied back to channels-last (in training the copy
/// of x is the leaf libtorch saves, and x's gradient comes back channels-last). For shapes where
/// cuDNN's NCDHW kernels beat its channels-last ones by more than the copies cost: on an H200
/// (2026-11-28, `conv_algos.py`, f16, one shape at a time) STU-Net-H's 192→96 convolution at
/// 128³ took 4.7 ms NCDHW against 10.2 channels-last for a patch, a gap its input's copy (about
/// 0.4 GB) cannot explain, though those channels-last times included that copy; not yet timed
/// in the network. None by default; `STU_TCH_CONV_NCDHW=192x96@128,96x192@128` (or `all`,
/// [`NcdhwRule::parse`]) picks them (read once; a malformed value is reported and ignored).
/// Values and gradients are the same either way, up to the kernels' rounding.
pub fn conv_ncdhw_for(c_in: i64, c_out: i64, extent: i64) -> bool {
    if let Some(rule) = &*CONV_NCDHW.read().unwrap_or_else(|e| e.into_inner()) {
        return rule.as_ref().is_some_and(|r| r.matches(c_in, c_out, extent));
    }
    let rule = match std::env::var("STU_TCH_CONV_NCDHW") {
        Ok(v) => NcdhwRule::parse(&v).map_err(|e| eprintln!("warning: STU_TCH_CONV_NCDHW={v}: {e}; no convolution goes through NCDHW")).ok(),
        Err(_) => None,
    };
    let on = rule.as_ref().is_some_and(|r| r.matches(c_in, c_out, extent));
    CONV_NCDHW.write().unwrap_or_else(|e| e.into_inner()).get_or_insert(rule);
    on
}

/// The libtorch fast paths checked against burn's composed operators on one device: a
/// residual block (convolutions, instance norm + LeakyReLU, the residual end, 1×1×1 convolutions
/// at stride 1 and 2), its value and every gradient, tracked and untracked, batch 2, in each
/// layout and norm kernel (NCDHW with one row per plane, channels-last with the per-sample
/// norms written into slices or concatenated, NCDHW with split rows, channels-last with the
/// depth-split convolutions, with every 3³ convolution through NCDHW, or with zero bias
/// gradients before a norm); the ATen loss and nearest
/// upsampling with their gradients; and the split norm against the unsplit one and the
/// per-sample norm into slices against the concatenated one directly (f32, and in half
/// precision where `half`). The unit tests run it on the CPU; `stu check-ops --backend tch-cuda` on a GPU, whose
/// kernels (cuDNN, ATen's CUDA batch norm) the CPU cannot run. It sets the process-wide layout
/// and norm switches while it runs and leaves both to the device afterwards.
pub mod check {
    use burn::tensor::{DType, Device, Tensor, TensorData};

    use crate::ops::{self, Layout};

    struct Report {
        device: Device,
        /// Relative tolerance of the block comparisons (TF32 convolutions on a GPU differ from
        /// f32 ones at ~1e-3).
        tol: f32,
        mode: String,
        lines: Vec<String>,
        failures: Vec<String>,
    }

    impl Report {
        /// Max |a − b| ≤ tol · max(max |b|, `floor`).
        fn close(&mut self, what: &str, a: Tensor<5>, b: Tensor<5>, floor: f32) {
            let tol = self.tol;
            self.close_at(what, a, b, floor, tol);
        }

        fn close_at(&mut self, what: &str, a: Tensor<5>, b: Tensor<5>, floor: f32, tol: f32) {
            let (a, b) = (ops::to_vec(a), ops::to_vec(b));
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| if (x - y).is_nan() { f32::INFINITY } else { m.max((x - y).abs()) });
            let line = format!("{}: {what}: max |diff| {err:.3e} (scale {scale:.3e}, allowed {:.3e})", self.mode, tol * scale.max(floor));
            // (Written so that a NaN bound fails too.)
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            if !(err <= tol * scale.max(floor)) {
                self.failures.push(line.clone());
            }
            self.lines.push(line);
        }

        fn block(&mut self, [b, c, d, h, w]: [usize; 5]) {
            let ad = self.device.clone().autodiff();
            let mut rng = stu_core::rng::SplitMix64::new(7);
            let t5 = |n: [usize; 5], lo: f32, hi: f32, rng: &mut stu_core::rng::SplitMix64| Tensor::<5>::from_data(TensorData::new(rng.fill_f32(n.iter().product(), lo, hi), n), &ad).require_grad();
            let t1 = |n: usize, lo: f32, hi: f32, rng: &mut stu_core::rng::SplitMix64| Tensor::<1>::from_data(TensorData::new(rng.fill_f32(n, lo, hi), [n]), &ad).require_grad();
            let x = t5([b, c, d, h, w], -2.0, 3.0, &mut rng);
            let (w1, w2) = (t5([c, c, 3, 3, 3], -0.3, 0.3, &mut rng), t5([c, c, 3, 3, 3], -0.3, 0.3, &mut rng));
            let (b1, b2) = (t1(c, -0.5, 0.5, &mut rng), t1(c, -0.5, 0.5, &mut rng));
            let (g1, g2) = (t1(c, 0.5, 1.5, &mut rng), t1(c, 0.5, 1.5, &mut rng));
            let (e1, e2) = (t1(c, -0.5, 0.5, &mut rng), t1(c, -0.5, 0.5, &mut rng));
            let lay = Layout::Ncdhw;
            let block = |aten: bool| {
                let conv = |x: Tensor<5>, w: &Tensor<5>, b: &Tensor<1>| {
                    if aten {
                        // Both convolutions go into a norm: the ATen path leaves their bias out.
                        ops::conv3d_normed(x, w.clone(), b.clone(), [1; 3], lay)
                    } else {
                        burn::tensor::module::conv3d(x, w.clone(), Some(b.clone()), burn::tensor::ops::ConvOptions::new([1; 3], [1; 3], [1; 3], 1))
                    }
                };
                let y = conv(x.clone(), &w1, &b1);
                let y = if aten { ops::norm_act(y, g1.clone(), e1.clone(), true, lay) } else { ops::leaky_relu(ops::instance_norm(y, g1.clone(), e1.clone(), lay)) };
                let y = conv(y, &w2, &b2);
                if aten { ops::norm_add_act(y, g2.clone(), e2.clone(), x.clone(), lay) } else { ops::leaky_relu(ops::instance_norm(y, g2.clone(), e2.clone(), lay) + x.clone()) }
            };
            let (ya, yc) = (block(true), block(false));
            self.close("forward", ya.clone(), yc.clone(), 1e-3);
            // A loss that weights every output differently.
            let weights = Tensor::<5>::from_data(TensorData::new(rng.fill_f32(b * c * d * h * w, -1.0, 1.0), [b, c, d, h, w]), &ad);
            let (ga, gc) = ((ya * weights.clone()).sum().backward(), (yc * weights.clone()).sum().backward());
            self.close("dx", x.grad(&ga).unwrap().unsqueeze(), x.grad(&gc).unwrap().unsqueeze(), 1e-3);
            for (name, p) in [("w1", &w1), ("w2", &w2)] {
                self.close(name, p.grad(&ga).unwrap().unsqueeze(), p.grad(&gc).unwrap().unsqueeze(), 1e-3);
            }
            for (name, p) in [("g1", &g1), ("g2", &g2), ("e1", &e1), ("e2", &e2)] {
                self.close(name, p.grad(&ga).unwrap().unsqueeze::<5>(), p.grad(&gc).unwrap().unsqueeze(), 1e-3);
            }
            // A bias before an instance norm has a zero gradient (the norm removes it): compare at
            // the scale of the other gradients (the weights', which grow with the voxel count).
            let w_scale = ops::to_vec(w1.grad(&gc).unwrap()).iter().fold(1f32, |m, v| m.max(v.abs()));
            for (name, p) in [("b1", &b1), ("b2", &b2)] {
                self.close(name, p.grad(&ga).unwrap().unsqueeze::<5>(), p.grad(&gc).unwrap().unsqueeze(), w_scale);
            }
            // An input without a gradient (the network's input): only the weight and bias gradients.
            let x0 = x.clone().detach();
            let conv0 = |aten: bool| {
                let y = if aten { ops::conv3d(x0.clone(), w1.clone(), b1.clone(), [1; 3], lay) } else { burn::tensor::module::conv3d(x0.clone(), w1.clone(), Some(b1.clone()), burn::tensor::ops::ConvOptions::new([1; 3], [1; 3], [1; 3], 1)) };
                (y * weights.clone()).sum().backward()
            };
            let (ga, gc) = (conv0(true), conv0(false));
            self.close("w1 (input without gradient)", w1.grad(&ga).unwrap(), w1.grad(&gc).unwrap(), 1e-3);
            self.close("b1 (input without gradient)", b1.grad(&ga).unwrap().unsqueeze(), b1.grad(&gc).unwrap().unsqueeze(), 1e-3);
            // One sample of one channel (the network's input in inference), 3³ and 1×1×1 kernels,
            // then a norm, whose output feeds a channel concatenation and a convolution.
            let x1 = t5([1, 1, d, h, w], -2.0, 3.0, &mut rng).detach();
            let (w31, w11) = (t5([c, 1, 3, 3, 3], -0.3, 0.3, &mut rng), t5([c, 1, 1, 1, 1], -0.3, 0.3, &mut rng));
            let one = |aten: bool| {
                let cv = |x: Tensor<5>, w: &Tensor<5>, b: &Tensor<1>| {
                    let k = w.dims()[2];
                    if aten { ops::conv3d(x, w.clone(), b.clone(), [1; 3], lay) } else { burn::tensor::module::conv3d(x, w.clone(), Some(b.clone()), burn::tensor::ops::ConvOptions::new([1; 3], [k / 2; 3], [1; 3], 1)) }
                };
                let y = cv(x1.clone(), &w31, &b1) + cv(x1.clone(), &w11, &b2);
                let y = if aten { ops::norm_act(y, g1.clone(), e1.clone(), true, lay) } else { ops::leaky_relu(ops::instance_norm(y, g1.clone(), e1.clone(), lay)) };
                let y = Tensor::cat(vec![y.clone(), y], 1);
                let w2x = Tensor::cat(vec![w2.clone(), w2.clone()], 1);
                cv(y, &w2x, &b2)
            };
            let (ya, yc) = (one(true), one(false));
            self.close("one sample, one channel", ya.clone(), yc.clone(), 1e-3);
            let wts1 = Tensor::<5>::from_data(TensorData::new(rng.fill_f32(ya.dims().iter().product(), -1.0, 1.0), ya.dims()), &ad);
            let (ga, gc) = ((ya * wts1.clone()).sum().backward(), (yc * wts1).sum().backward());
            for (name, p) in [("one sample: w 3³", &w31), ("one sample: w 1×1×1", &w11), ("one sample: w2", &w2)] {
                self.close(name, p.grad(&ga).unwrap(), p.grad(&gc).unwrap(), 1e-3);
            }
            // Untracked (inference) forward.
            let inner = x.clone().inner();
            let y = ops::norm_add_act(ops::norm_act(inner.clone(), g1.clone().inner(), e1.clone().inner(), true, lay), g2.clone().inner(), e2.clone().inner(), inner.clone(), lay);
            let want = ops::leaky_relu(ops::instance_norm(ops::leaky_relu(ops::instance_norm(inner.clone(), g1.inner(), e1.inner(), lay)), g2.inner(), e2.inner(), lay) + inner);
            self.close("untracked", y, want, 1e-3);
            // 3³ convolutions strided in-plane only (an anisotropic plan's downsampling) and on
            // every axis; 1×1×1 ones (STU-Net's upsampling and projection shortcuts) at stride 1
            // and 2; odd extents, to another channel count: value and every gradient.
            for (k, s) in [(3, [1, 2, 2]), (3, [2, 2, 2]), (1, [1, 1, 1]), (1, [2, 2, 1])] {
                let (wk, bk) = (t5([4, c, k, k, k], -0.3, 0.3, &mut rng), t1(4, -0.5, 0.5, &mut rng));
                let (ya, yc) = (ops::conv3d(x.clone(), wk.clone(), bk.clone(), s, lay), burn::tensor::module::conv3d(x.clone(), wk.clone(), Some(bk.clone()), burn::tensor::ops::ConvOptions::new(s, [k / 2; 3], [1; 3], 1)));
                let what = format!("{k}×{k}×{k} conv, stride {s:?}");
                self.close(&what, ya.clone(), yc.clone(), 1e-3);
                let wts = Tensor::<5>::from_data(TensorData::new(rng.fill_f32(ya.dims().iter().product(), -1.0, 1.0), ya.dims()), &ad);
                let (ga, gc) = ((ya * wts.clone()).sum().backward(), (yc * wts).sum().backward());
                self.close(&format!("{what}: dx"), x.grad(&ga).unwrap(), x.grad(&gc).unwrap(), 1e-3);
                self.close(&format!("{what}: dw"), wk.grad(&ga).unwrap(), wk.grad(&gc).unwrap(), 1e-3);
                self.close(&format!("{what}: db"), bk.grad(&ga).unwrap().unsqueeze(), bk.grad(&gc).unwrap().unsqueeze(), 1e-3);
            }
        }

        /// A residual block's inference forward (3³ convolutions into norms, a strided 1×1×1
        /// shortcut, the residual end) through a CUDA graph ([`crate::graph::Graphs`]): the
        /// eager first call, the capture, then replays with new inputs, each equal to the
        /// eager forward of its input; in f32 and f16. Fails when the capture fell back to
        /// eager. CUDA only.
        fn graph(&mut self) {
            let mut rng = stu_core::rng::SplitMix64::new(13);
            let dev = self.device.clone();
            let t = |n: Vec<usize>, lo: f32, hi: f32, rng: &mut stu_core::rng::SplitMix64| Tensor::<5>::from_data(TensorData::new(rng.fill_f32(n.iter().product(), lo, hi), n.clone()), &dev);
            let v = |n: usize, lo: f32, hi: f32, rng: &mut stu_core::rng::SplitMix64| Tensor::<1>::from_data(TensorData::new(rng.fill_f32(n, lo, hi), [n]), &dev);
            let (c, o) = (3, 4);
            let (w1, w2, w3) = (t(vec![o, c, 3, 3, 3], -0.3, 0.3, &mut rng), t(vec![o, o, 3, 3, 3], -0.3, 0.3, &mut rng), t(vec![o, c, 1, 1, 1], -0.5, 0.5, &mut rng));
            let (b1, b2, b3) = (v(o, -0.5, 0.5, &mut rng), v(o, -0.5, 0.5, &mut rng), v(o, -0.5, 0.5, &mut rng));
            let (g1, g2, e1, e2) = (v(o, 0.5, 1.5, &mut rng), v(o, 0.5, 1.5, &mut rng), v(o, -0.5, 0.5, &mut rng), v(o, -0.5, 0.5, &mut rng));
            let lay = Layout::Ncdhw;
            for dtype in [DType::F32, DType::F16] {
                let cast = |w: &Tensor<5>| w.clone().cast(dtype);
                let (w1, w2, w3) = (cast(&w1), cast(&w2), cast(&w3));
                let block = |x: Tensor<5>| {
                    let y = ops::norm_act(ops::conv3d_normed(x.clone(), w1.clone(), b1.clone(), [2, 2, 2], lay), g1.clone(), e1.clone(), true, lay);
                    let y = ops::conv3d_normed(y, w2.clone(), b2.clone(), [1; 3], lay);
                    ops::norm_add_act(y, g2.clone(), e2.clone(), ops::conv3d(x, w3.clone(), b3.clone(), [2, 2, 2], lay), lay)
                };
                let graphs = crate::graph::Graphs::default();
                crate::graph::set_enabled(Some(true));
                for call in 0..4 {
                    let x = t(vec![1, c, 12, 16, 20], -2.0, 3.0, &mut rng).cast(dtype);
                    let got = graphs.run(x.clone(), &block);
                    let want = block(x);
                    let what = format!("CUDA graph {dtype:?}, call {} ({})", call + 1, if call == 0 { "eager" } else if call == 1 { "capture" } else { "replay" });
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-3 };
                    self.close_at(&what, got.cast(DType::F32), want.cast(DType::F32), 1.0, tol);
                }
                if !crate::graph::enabled() {
                    let line = format!("{}: CUDA graph {dtype:?}: the capture failed (warning above) and the forward ran eagerly", self.mode);
                    self.failures.push(line.clone());
                    self.lines.push(line);
                }
                crate::graph::set_enabled(None);
            }
        }

        /// The split norm against the unsplit one on the same NCDHW inputs (`channels_last`
        /// false), or the channels-last per-sample norm into slices against the concatenated
        /// one (true), in `dtype`: norm + act, norm alone, and the residual end, value and
        /// gradients (x, gamma, beta, skip).
        fn norm_pair(&mut self, dims: [usize; 5], dtype: DType, tol: f32, channels_last: bool) {
            let ad = self.device.clone().autodiff();
            let mut rng = stu_core::rng::SplitMix64::new(11);
            let c = dims[1];
            let t5 = |lo: f32, hi: f32, rng: &mut stu_core::rng::SplitMix64| Tensor::<5>::from_data(TensorData::new(rng.fill_f32(dims.iter().product(), lo, hi), dims), &ad);
            let t1 = |lo: f32, hi: f32, rng: &mut stu_core::rng::SplitMix64| Tensor::<1>::from_data(TensorData::new(rng.fill_f32(c, lo, hi), [c]), &ad).require_grad();
            // An offset mean (3 ± 2): the statistics must not lose it to cancellation.
            let x = t5(1.0, 5.0, &mut rng).cast(dtype).require_grad();
            let skip = t5(-1.0, 1.0, &mut rng).cast(dtype).require_grad();
            let (g, e) = (t1(0.5, 1.5, &mut rng), t1(-0.5, 0.5, &mut rng));
            let wts = t5(-1.0, 1.0, &mut rng);
            super::set_channels_last(Some(channels_last));
            // Channels-last inputs through a 1×1×1 identity convolution (the same values).
            let eye = Tensor::<2>::eye(c, &ad).reshape([c, c, 1, 1, 1]).cast(dtype);
            let zero = Tensor::<1>::zeros([c], &ad);
            let laid = |t: &Tensor<5>| if channels_last { ops::conv3d(t.clone(), eye.clone(), zero.clone(), [1; 3], Layout::Ncdhw) } else { t.clone() };
            let (kind, set): (&str, fn(Option<bool>)) = if channels_last { ("per-sample norm into slices", super::set_norm_slices) } else { ("split norm", super::set_norm_split) };
            for case in ["norm + act", "norm", "norm + skip + act"] {
                let run = |on: bool| {
                    set(Some(on));
                    let y = match case {
                        "norm + act" => ops::norm_act(laid(&x), g.clone(), e.clone(), true, Layout::Ncdhw),
                        "norm" => ops::norm_act(laid(&x), g.clone(), e.clone(), false, Layout::Ncdhw),
                        _ => ops::norm_add_act(laid(&x), g.clone(), e.clone(), laid(&skip), Layout::Ncdhw),
                    };
                    let y = y.cast(DType::F32);
                    let gr = (y.clone() * wts.clone()).sum().backward();
                    let grad5 = |t: &Tensor<5>| t.grad(&gr).map(|t| t.cast(DType::F32));
                    let grad1 = |t: &Tensor<1>| t.grad(&gr).map(|t| t.cast(DType::F32).unsqueeze::<5>());
                    (y, grad5(&x), grad1(&g), grad1(&e), grad5(&skip))
                };
                let (s, p) = (run(true), run(false));
                set(None);
                let what = |w: &str| format!("{kind}, {dtype:?}, {case}: {w}");
                self.close_at(&what("forward"), s.0, p.0, 1.0, tol);
                for (name, a, b) in [("dx", s.1, p.1), ("dgamma", s.2, p.2), ("dbeta", s.3, p.3), ("dskip", s.4, p.4)] {
                    match (a, b) {
                        (Some(a), Some(b)) => self.close_at(&what(name), a, b, 1.0, tol),
                        (None, None) => {}
                        _ => self.failures.push(what(&format!("{name}: a gradient on one side only"))),
                    }
                }
            }
            super::set_channels_last(Some(false));
        }
        /// The ATen loss (Dice + CE, its hand-written gradient) against the composed one
        /// ([`crate::loss::fused_against_composed`]); the libtorch nearest upsampling (the
        /// broadcast copy and ATen's kernels, from NCDHW and channels-last activations) with its
        /// gradient against burn's reshape + expand, unequal factors per axis, tracked and
        /// untracked.
        fn loss_and_upsampling(&mut self) {
            for (line, ok) in crate::loss::fused_against_composed(&self.device, 12) {
                let line = format!("{}: {line}", self.mode);
                if !ok {
                    self.failures.push(line.clone());
                }
                self.lines.push(line);
            }
            let ad = self.device.clone().autodiff();
            let mut rng = stu_core::rng::SplitMix64::new(9);
            let dims = [2, 3, 2, 3, 4];
            let x = Tensor::<5>::from_data(TensorData::new(rng.fill_f32(dims.iter().product(), -1.0, 1.0), dims), &ad).require_grad();
            let scale = [1, 2, 3];
            let wts = Tensor::<5>::from_data(TensorData::new(rng.fill_f32(dims.iter().product::<usize>() * 6, -1.0, 1.0), [2, 3, 2, 6, 12]), &ad);
            // A 1×1×1 identity convolution first: channels-last activations when the layout
            // is (the same values, exactly).
            let eye = Tensor::<2>::eye(3, &ad).reshape([3, 3, 1, 1, 1]);
            let zero = Tensor::<1>::zeros([3], &ad);
            for (channels_last, aten) in [(false, false), (true, false), (false, true), (true, true)] {
                super::set_channels_last(Some(channels_last));
                super::set_upsample_aten(Some(aten));
                let what = |w: &str| format!("upsampling ({}, {}){w}", if channels_last { "channels-last" } else { "NCDHW" }, if aten { "ATen's kernels" } else { "broadcast copy" });
                let xi = ops::conv3d(x.clone(), eye.clone(), zero.clone(), [1; 3], Layout::Ncdhw);
                let (ya, yc) = (ops::upsample_nearest(xi.clone(), scale, Layout::Ncdhw), ops::upsample_composed(x.clone(), scale, Layout::Ncdhw));
                if ya.dims() != [2, 3, 2, 6, 12] {
                    self.failures.push(format!("{}: shape {:?}, expected [2, 3, 2, 6, 12]", what(""), ya.dims()));
                }
                self.close_at(&what(""), ya.clone(), yc.clone(), 1.0, 1e-6);
                let (ga, gc) = ((ya * wts.clone()).sum().backward(), (yc * wts.clone()).sum().backward());
                self.close_at(&what(": gradient"), x.grad(&ga).unwrap(), x.grad(&gc).unwrap(), 1.0, 1e-6);
                let inner = xi.inner();
                self.close_at(&what(", untracked"), ops::upsample_nearest(inner.clone(), scale, Layout::Ncdhw), ops::upsample_composed(inner, scale, Layout::Ncdhw), 1.0, 1e-6);
            }
            super::set_upsample_aten(None);
            super::set_channels_last(Some(false));
        }
    }

    /// Runs the checks on `device` (a libtorch device) with relative tolerance `tol` for the
    /// block comparisons.
    pub fn fused_ops(device: &Device, tol: f32, half: bool) -> crate::backend::OpsCheck {
        let mut r = Report { device: device.clone(), tol, mode: String::new(), lines: Vec::new(), failures: Vec::new() };
        // Rows of 36 864 voxels go in 4 chunks of 9 216 when split.
        // (mode, channels-last, split norm, depth-split convolutions, per-sample norm into
        // slices, 3³ convolutions through NCDHW, zero bias gradients before a norm, extent)
        for (mode, channels_last, split, d2, slices, via_ncdhw, zero_db, dims) in [
            ("NCDHW", false, false, false, true, false, false, [2, 3, 5, 6, 4]),
            ("channels-last", true, false, false, true, false, false, [2, 3, 5, 6, 4]),
            ("channels-last, concatenated norm", true, false, false, false, false, false, [2, 3, 5, 6, 4]),
            ("NCDHW, split norm", false, true, false, true, false, false, [2, 3, 24, 32, 48]),
            ("channels-last, depth-split convolutions", true, false, true, true, false, false, [2, 3, 5, 6, 4]),
            ("channels-last, 3³ convolutions through NCDHW", true, false, false, true, true, false, [2, 3, 5, 6, 4]),
            ("channels-last, zero bias gradients before a norm", true, false, false, true, false, true, [2, 3, 5, 6, 4]),
        ] {
            super::set_channels_last(Some(channels_last));
            super::set_norm_split(Some(split));
            super::set_conv_d2(Some(d2));
            super::set_norm_slices(Some(slices));
            super::set_conv_ncdhw(via_ncdhw.then(super::NcdhwRule::all));
            super::set_bias_grad_zero(Some(zero_db));
            r.mode = format!("{mode} {dims:?}");
            r.block(dims);
        }
        super::set_bias_grad_zero(None);
        super::set_conv_ncdhw(None);
        super::set_conv_d2(None);
        super::set_norm_slices(None);
        super::set_channels_last(Some(false));
        r.mode = "NCDHW".into();
        r.loss_and_upsampling();
        for channels_last in [false, true] {
            r.norm_pair([2, 3, 24, 32, 48], DType::F32, 2e-5, channels_last);
            if half {
                // Both sides round to the half type; bf16 keeps 8 bits of mantissa, f16 11.
                r.norm_pair([2, 3, 24, 32, 48], DType::BF16, 3e-2, channels_last);
                r.norm_pair([2, 3, 24, 32, 48], DType::F16, 4e-3, channels_last);
            }
        }
        if half {
            // (`half` is CUDA: graphs are CUDA's.)
            r.graph();
        }
        super::set_channels_last(None);
        super::set_norm_split(None);
        crate::backend::OpsCheck { lines: r.lines, failures: r.failures }
    }
}

/// [`crate::backend::profile_start`].
pub(crate) fn profile_start(cuda: bool) -> Result<(), String> {
    libtorch::c_result(|| unsafe_ffi::start(cuda))
}

/// [`crate::backend::profile_stop`].
pub(crate) fn profile_stop(path: &std::path::Path) -> Result<(), String> {
    let c = std::ffi::CString::new(path.to_string_lossy().as_bytes()).map_err(|_| format!("{}: a NUL byte in the path", path.display()))?;
    libtorch::c_result(|| unsafe_ffi::stop(&c)).map_err(|e| format!("{}: {e}", path.display()))
}

/// nnU-Net's clip + SGD step as PyTorch runs it with `foreach=True`: a handful of multi-tensor
/// kernels for all parameters together, where burn's per-parameter tensor ops issue about ten
/// ATen calls (GPU launches) per parameter (`csrc/grad.cpp`). Tensors are flattened parameters,
/// gradients and momentum buffers on one libtorch device, without autodiff.
pub(crate) mod foreach {
    use burn::backend::libtorch::TchTensor;
    use burn::backend::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind};
    use burn::tensor::Tensor;
    use std::ffi::{c_char, c_int, c_void};

    #[allow(unsafe_code)]
    unsafe extern "C" {
        // csrc/grad.cpp; the pointers are tch's `C_tensor` (an `at::Tensor*`).
        fn stu_foreach_norm(ts: *const *const c_void, n: c_int, out: *mut *mut c_void) -> *mut c_char;
        fn stu_foreach_sgd(
            params: *const *const c_void,
            grads: *const *const c_void,
            bufs: *const *const c_void,
            n: c_int,
            coef: *const c_void,
            mul: f64,
            lr: f64,
            mu: f64,
            wd: f64,
            out_params: *mut *mut c_void,
            out_bufs: *mut *mut c_void,
        ) -> *mut c_char;
    }

    /// The libtorch tensor under a burn tensor (shared storage).
    fn aten(t: &Tensor<1>) -> tch::Tensor {
        match t.clone().into_dispatch().kind {
            DispatchTensorKind::LibTorch(BackendTensor::Float(x)) => x.tensor,
            _ => panic!("the fused SGD needs libtorch float tensors without autodiff"),
        }
    }

    fn burn(t: tch::Tensor) -> Tensor<1> {
        Tensor::from_dispatch(DispatchTensor { kind: DispatchTensorKind::LibTorch(BackendTensor::Float(TchTensor::new(t))), autodiff: DispatchAutodiffContext::Disabled })
    }

    /// Takes ownership of `at::Tensor*`s written by a `csrc/grad.cpp` call.
    #[allow(unsafe_code)]
    fn adopt(ptrs: Vec<*mut c_void>) -> Vec<Tensor<1>> {
        // SAFETY: each pointer was written by the C++ call as a new `at::Tensor*` and is owned by
        // exactly one tch `Tensor` here.
        ptrs.into_iter().map(|p| burn(unsafe { tch::Tensor::from_ptr(p.cast()) })).collect()
    }

    fn ptrs(ts: &[tch::Tensor]) -> Vec<*const c_void> {
        ts.iter().map(|t| t.as_ptr().cast()).collect()
    }

    /// `sqrt(Σ ‖tᵢ‖²)` on the tensors' device, as a 1-element tensor (`clip_grad_norm_`'s
    /// total norm); `None` for no tensors.
    #[allow(unsafe_code)]
    pub(crate) fn norm(ts: &[Tensor<1>]) -> Option<Tensor<1>> {
        if ts.is_empty() {
            return None;
        }
        let held: Vec<tch::Tensor> = ts.iter().map(aten).collect();
        let mut out = std::ptr::null_mut();
        // SAFETY: the pointers are live `at::Tensor*`s held by `held` for the call; on success
        // `out` is a new `at::Tensor*`.
        super::libtorch::c_result(|| unsafe { stu_foreach_norm(ptrs(&held).as_ptr(), held.len() as c_int, &mut out) }).unwrap_or_else(|e| panic!("libtorch foreach norm failed: {e}"));
        adopt(vec![out]).pop()
    }

    /// One step of SGD (Nesterov momentum `mu`, dampening 0, coupled weight decay `wd`, learning
    /// rate `lr`) on gradients scaled by `coef` (a 1-element tensor on the device, if any) and
    /// `mul`. `bufs[i]` is parameter i's momentum buffer (`None` before its first step); existing
    /// buffers are updated in place. Returns the new parameters and the buffers.
    #[allow(unsafe_code, clippy::too_many_arguments)]
    pub(crate) fn sgd(params: &[Tensor<1>], grads: &[Tensor<1>], bufs: &[Option<Tensor<1>>], coef: Option<&Tensor<1>>, mul: f64, lr: f64, mu: f64, wd: f64) -> (Vec<Tensor<1>>, Vec<Tensor<1>>) {
        let n = params.len();
        assert!(grads.len() == n && bufs.len() == n, "one gradient and one buffer slot per parameter");
        let (p, g): (Vec<tch::Tensor>, Vec<tch::Tensor>) = (params.iter().map(aten).collect(), grads.iter().map(aten).collect());
        let b: Vec<Option<tch::Tensor>> = bufs.iter().map(|b| b.as_ref().map(aten)).collect();
        let bp: Vec<*const c_void> = b.iter().map(|t| t.as_ref().map_or(std::ptr::null(), |t| t.as_ptr().cast())).collect();
        let c = coef.map(aten);
        let cp = c.as_ref().map_or(std::ptr::null(), |t| t.as_ptr().cast());
        let (mut out_p, mut out_b) = (vec![std::ptr::null_mut(); n], vec![std::ptr::null_mut(); n]);
        // SAFETY: every input pointer is a live `at::Tensor*` (or null where allowed) held above
        // for the call; on success the function has written n new `at::Tensor*` into each output.
        super::libtorch::c_result(|| unsafe {
            stu_foreach_sgd(ptrs(&p).as_ptr(), ptrs(&g).as_ptr(), bp.as_ptr(), n as c_int, cp, mul, lr, mu, wd, out_p.as_mut_ptr(), out_b.as_mut_ptr())
        })
        .unwrap_or_else(|e| panic!("libtorch foreach SGD failed: {e}"));
        (adopt(out_p), adopt(out_b))
    }
}

#[allow(unsafe_code)]
mod unsafe_ffi {
    unsafe extern "C" {
        // csrc/grad.cpp; each returns null or a malloc'd message.
        fn stu_profile_start(cuda: std::ffi::c_int) -> *mut std::ffi::c_char;
        fn stu_profile_stop(path: *const std::ffi::c_char) -> *mut std::ffi::c_char;
    }
    pub(super) fn start(cuda: bool) -> *mut std::ffi::c_char {
        // SAFETY: no arguments beyond an int; the result is null or a malloc'd C string.
        unsafe { stu_profile_start(cuda.into()) }
    }
    pub(super) fn stop(path: &std::ffi::CStr) -> *mut std::ffi::c_char {
        // SAFETY: `path` is a live NUL-terminated string for the call.
        unsafe { stu_profile_stop(path.as_ptr()) }
    }
}

/// The libtorch tensor under a burn float tensor (autodiff's inner one), for the tests here and
/// in `train`.
#[cfg(all(test, feature = "tch"))]
pub(crate) fn aten_of<const D: usize>(t: burn::tensor::Tensor<D>) -> tch::Tensor {
    use burn::backend::{BackendTensor, DispatchTensorKind};
    match t.inner().into_dispatch().kind {
        DispatchTensorKind::LibTorch(BackendTensor::Float(x)) => x.tensor,
        _ => panic!("not a libtorch float tensor"),
    }
}

#[cfg(all(test, feature = "tch"))]
mod tests {
    use burn::tensor::{Device, Tensor, TensorData};

    use super::aten_of as aten;

    use crate::ops::{self, Layout};

    /// Held by the tests that switch the convolution layout (a process-wide setting).
    static LAYOUT: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// `t` (NCDHW) copied to channels-last strides under the same shape.
    fn cl(t: &tch::Tensor) -> tch::Tensor {
        t.permute([0, 2, 3, 4, 1]).contiguous().permute([0, 4, 1, 2, 3])
    }


    /// A residual block through the ATen paths (conv, norm + LeakyReLU, norm + skip + LeakyReLU,
    /// each keeping its libtorch graph, the in-place activations, the gradient handed over by
    /// `csrc/grad.cpp`) equals burn's composed operators on the same libtorch device, in value
    /// and in every gradient, batch 2 (the affine parameters repeated per sample), tracked and not.
    #[test]
    #[allow(deprecated)] // burn-tch is deprecated upstream; it is the cuDNN path here
    fn the_aten_block_and_its_gradients_equal_burns_composed_operators() {
        let _layout = LAYOUT.lock().unwrap_or_else(|e| e.into_inner());
        let check = super::check::fused_ops(&Device::libtorch(), 2e-5, false);
        assert!(check.failures.is_empty(), "{}", check.failures.join("\n"));
        assert!(check.lines.len() > 40, "{:#?}", check.lines);
        // By default, as measured: channels-last everywhere; NCDHW norm rows split on CUDA only.
        assert!(super::channels_last_on(tch::Device::Cpu));
        assert!(super::channels_last_on(tch::Device::Cuda(0)));
        assert!(super::norm_split_on(tch::Device::Cuda(0)));
        assert!(!super::norm_split_on(tch::Device::Cpu));
    }

    /// Under half precision a bias may stay f32 (`train::cast_params`): the convolution
    /// casts it where it is added and its gradient comes back f32, equal to the f32 path's to
    /// bf16 rounding, in both layouts.
    #[test]
    #[allow(deprecated)] // burn-tch is deprecated upstream; it is the cuDNN path here
    fn an_f32_bias_joins_a_half_precision_convolution_and_gets_an_f32_gradient() {
        use burn::tensor::DType;
        let ad = Device::libtorch().autodiff();
        let mut rng = stu_core::rng::SplitMix64::new(17);
        let x = Tensor::<5>::from_data(TensorData::new(rng.fill_f32(2 * 3 * 4 * 5 * 3, -1.0, 1.0), [2, 3, 4, 5, 3]), &ad);
        let w = Tensor::<5>::from_data(TensorData::new(rng.fill_f32(4 * 3 * 27, -0.3, 0.3), [4, 3, 3, 3, 3]), &ad).require_grad();
        let b = Tensor::<1>::from_data(TensorData::new(rng.fill_f32(4, -0.5, 0.5), [4]), &ad).require_grad();
        let wts = Tensor::<5>::from_data(TensorData::new(rng.fill_f32(2 * 4 * 4 * 5 * 3, -1.0, 1.0), [2, 4, 4, 5, 3]), &ad);
        let _layout = LAYOUT.lock().unwrap_or_else(|e| e.into_inner());
        for channels_last in [false, true] {
            super::set_channels_last(Some(channels_last));
            for k in [3, 1] {
                let run = |dtype: DType| {
                    let wk = if k == 3 { w.clone() } else { w.clone().narrow(2, 1, 1).narrow(3, 1, 1).narrow(4, 1, 1) };
                    let y = ops::conv3d(x.clone().cast(dtype), wk.cast(dtype), b.clone(), [1; 3], Layout::Ncdhw).cast(DType::F32);
                    let g = (y.clone() * wts.clone()).sum().backward();
                    (y, b.grad(&g).unwrap())
                };
                let ((y32, db32), (y16, db16)) = (run(DType::F32), run(DType::BF16));
                assert_eq!(db16.dtype(), DType::F32, "the bias's gradient keeps its type");
                // Within bf16 rounding (8 bits of mantissa) of the f32 results.
                let near = |what: &str, a: Vec<f32>, e: Vec<f32>| {
                    let scale = e.iter().fold(1f32, |m, v| m.max(v.abs()));
                    let err = a.iter().zip(&e).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                    assert!(err <= 2e-2 * scale, "k {k}, channels-last {channels_last}: {what} differs by {err} (scale {scale})");
                };
                near("output", ops::to_vec(y16), ops::to_vec(y32));
                near("bias gradient", ops::to_vec(db16.unsqueeze::<5>()), ops::to_vec(db32.unsqueeze::<5>()));
            }
        }
        super::set_channels_last(None);
    }

    /// A tracked channels-last convolution's weight leaf is its channels-last copy, made
    /// outside the graph (so burn's weight need not be kept); a weight already channels-last,
    /// or any weight in NCDHW, is its own leaf, sharing its storage.
    #[test]
    fn a_channels_last_convolution_saves_only_the_weights_converted_copy() {
        use tch::{Kind, Tensor};
        let _layout = LAYOUT.lock().unwrap_or_else(|e| e.into_inner());
        let x = Tensor::ones([2, 4, 3, 3, 3], (Kind::Float, tch::Device::Cpu));
        let w = Tensor::ones([5, 4, 3, 3, 3], (Kind::Float, tch::Device::Cpu));
        super::set_channels_last(Some(true));
        let (_, wl, copies) = super::libtorch::leaves(&cl(&x), &w, [1; 3]);
        assert!(copies.w && super::libtorch::is_channels_last(&wl) && wl.requires_grad() && wl.data_ptr() != w.data_ptr());
        let wc = cl(&w);
        let (_, wl, copies) = super::libtorch::leaves(&cl(&x), &wc, [1; 3]);
        assert!(!copies.w && wl.data_ptr() == wc.data_ptr());
        super::set_channels_last(Some(false));
        let (_, wl, copies) = super::libtorch::leaves(&x, &w, [1; 3]);
        assert!(!copies.w && wl.data_ptr() == w.data_ptr());
        super::set_channels_last(None);
    }

    /// A channels-last convolution sent through NCDHW (`STU_TCH_CONV_NCDHW`) equals the
    /// channels-last one in value and gradients; tracked, its x leaf is an NCDHW copy (so burn's
    /// x need not be kept beside it) and x's gradient comes back channels-last; a rule for
    /// another shape leaves the convolution channels-last.
    #[test]
    fn a_convolution_through_ncdhw_saves_one_copy_and_gives_channels_last_gradients() {
        use burn::backend::libtorch::TchTensor;
        use burn::backend::LibTorch;
        use tch::Tensor;

        use super::{LeafCopies, NcdhwRule, TorchOps};
        let _layout = LAYOUT.lock().unwrap_or_else(|e| e.into_inner());
        let mut rng = stu_core::rng::SplitMix64::new(31);
        let t = |n: &[i64], rng: &mut stu_core::rng::SplitMix64| Tensor::from_slice(&rng.fill_f32(n.iter().product::<i64>() as usize, -1.0, 1.0)).view(n);
        let (x, w, b) = (cl(&t(&[2, 4, 5, 6, 3], &mut rng)), t(&[6, 4, 3, 3, 3], &mut rng), t(&[6], &mut rng));
        super::set_channels_last(Some(true));
        for stride in [[1usize; 3], [2, 2, 1]] {
            let out = x.conv3d(&w, Some(&b), stride.map(|s| s as i64), [1i64; 3], [1i64; 3], 1).size();
            let g = cl(&t(&out, &mut rng));
            let run = |rule: Option<&str>| {
                super::set_conv_ncdhw(rule.map(|r| NcdhwRule::parse(r).unwrap()));
                let tt = |t: &Tensor| TchTensor::new(t.shallow_clone());
                let untracked = <LibTorch as TorchOps>::conv3d_nc(tt(&x), tt(&w), tt(&b), stride, true).tensor;
                let (y, y_graph, xl, wl, copies) = <LibTorch as TorchOps>::conv3d_nc_graph(tt(&x), tt(&w), tt(&b), stride, true);
                let x_leaf = xl.tensor.shallow_clone();
                let (dx, dw, db) = <LibTorch as TorchOps>::conv3d_nc_graph_backward(y_graph, xl, wl, tt(&g), true, copies, true);
                (untracked, y.tensor, x_leaf, copies, dx.expect("x has a gradient").tensor, dw.tensor, db.tensor)
            };
            let (u0, y0, _, c0, dx0, dw0, db0) = run(None);
            let (u1, y1, xl1, c1, dx1, dw1, db1) = run(Some("4x6@6"));
            assert_eq!(c0, LeafCopies { x: false, w: true }, "stride {stride:?}");
            assert_eq!(c1, LeafCopies { x: true, w: false }, "stride {stride:?}");
            assert!(xl1.is_contiguous() && xl1.data_ptr() != x.data_ptr());
            for (what, a) in [("untracked output", &u1), ("output", &y1), ("x gradient", &dx1)] {
                assert!(super::libtorch::is_channels_last(a), "stride {stride:?}: the {what} has strides {:?}", a.stride());
            }
            let err = |a: &Tensor, e: &Tensor| (a - e).abs().max().double_value(&[]);
            for (what, a, e) in [("untracked output", &u1, &u0), ("output", &y1, &y0), ("dx", &dx1, &dx0), ("dw", &dw1, &dw0), ("db", &db1, &db0)] {
                assert!(err(a, e) <= 1e-5, "stride {stride:?}: {what} off by {}", err(a, e));
            }
            let (_, _, xl, c, ..) = run(Some("4x6@5,3x6@6"));
            assert!(c == LeafCopies { x: false, w: true } && xl.data_ptr() == x.data_ptr(), "stride {stride:?}");
        }
        super::set_conv_ncdhw(None);
        super::set_channels_last(None);
    }

    /// With `STU_TCH_BIAS_GRAD=zero` a convolution whose bias is left out (a norm follows) gives
    /// the bias a gradient of exact zeros, where the sum is zero but for rounding; the other
    /// gradients are unchanged, and a convolution that adds its bias still sums its gradient.
    #[test]
    fn a_bias_before_a_norm_can_get_a_zero_gradient() {
        let _layout = LAYOUT.lock().unwrap_or_else(|e| e.into_inner());
        let ad = Device::libtorch().autodiff();
        let mut rng = stu_core::rng::SplitMix64::new(37);
        let t5 = |n: [usize; 5], rng: &mut stu_core::rng::SplitMix64| Tensor::<5>::from_data(TensorData::new(rng.fill_f32(n.iter().product(), -1.0, 1.0), n), &ad);
        let t1 = |n: usize, rng: &mut stu_core::rng::SplitMix64| Tensor::<1>::from_data(TensorData::new(rng.fill_f32(n, -0.5, 0.5), [n]), &ad).require_grad();
        let (x, w) = (t5([2, 3, 6, 5, 4], &mut rng).require_grad(), t5([4, 3, 3, 3, 3], &mut rng).require_grad());
        let (b, g, e) = (t1(4, &mut rng), t1(4, &mut rng), t1(4, &mut rng));
        let wts = t5([2, 4, 6, 5, 4], &mut rng);
        let run = |zero: bool, normed: bool| {
            super::set_bias_grad_zero(Some(zero));
            let y = if normed { ops::conv3d_normed(x.clone(), w.clone(), b.clone(), [1; 3], Layout::Ncdhw) } else { ops::conv3d(x.clone(), w.clone(), b.clone(), [1; 3], Layout::Ncdhw) };
            let y = ops::norm_act(y, g.clone(), e.clone(), true, Layout::Ncdhw);
            let grads = (y * wts.clone()).sum().backward();
            [x.grad(&grads).unwrap(), w.grad(&grads).unwrap().flatten::<1>(0, 4).unsqueeze::<5>(), b.grad(&grads).unwrap().unsqueeze::<5>()].map(ops::to_vec)
        };
        let [dx0, dw0, db0] = run(false, true);
        let [dx1, dw1, db1] = run(true, true);
        assert_eq!((dx1, dw1), (dx0, dw0), "only the bias gradient may change");
        assert!(db1.iter().all(|&v| v == 0.0), "{db1:?}");
        let scale = db0.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale < 1e-4, "the summed gradient is rounding: {db0:?}");
        // A convolution that adds its bias sums the gradient whatever the switch.
        let [_, _, db2] = run(true, false);
        assert_eq!(db2, run(false, false)[2]);
        super::set_bias_grad_zero(None);
    }

    /// A half-precision step's cast of a 3³ convolution weight comes out channels-last from the
    /// one copy (so the convolution converts nothing), and its gradient comes back f32 and
    /// contiguous; output and gradients equal the path through burn's cast bit for bit. A
    /// 1×1×1 weight, and any weight with channels-last off, gets burn's cast.
    #[test]
    fn a_half_precision_weight_cast_is_channels_last_and_its_gradient_contiguous() {
        use burn::tensor::DType;
        let _layout = LAYOUT.lock().unwrap_or_else(|e| e.into_inner());
        let ad = Device::libtorch().autodiff();
        let mut rng = stu_core::rng::SplitMix64::new(29);
        let t = |n: [usize; 5], rng: &mut stu_core::rng::SplitMix64| Tensor::<5>::from_data(TensorData::new(rng.fill_f32(n.iter().product(), -1.0, 1.0), n), &ad);
        let x = t([2, 3, 5, 6, 4], &mut rng);
        let b = Tensor::<1>::from_data(TensorData::new(rng.fill_f32(4, -0.5, 0.5), [4]), &ad).require_grad();
        super::set_channels_last(Some(true));
        for k in [3, 1] {
            let w = t([4, 3, k, k, k], &mut rng).require_grad();
            let wts = t([2, 4, 5, 6, 4], &mut rng);
            let run = |fused: bool| {
                let wh = if fused { ops::cast_conv_weight(w.clone(), DType::F16) } else { w.clone().cast(DType::F16) };
                let y = ops::conv3d(x.clone().cast(DType::F16), wh.clone(), b.clone(), [1; 3], Layout::Ncdhw).cast(DType::F32);
                let g = (y.clone() * wts.clone()).sum().backward();
                (aten(wh), aten(y), aten(w.grad(&g).unwrap()), aten(b.grad(&g).unwrap()))
            };
            let ((wf, yf, dwf, dbf), (wp, yp, dwp, dbp)) = (run(true), run(false));
            assert_eq!(wf.kind(), tch::Kind::Half);
            assert_eq!(super::libtorch::is_channels_last(&wf), k == 3, "k {k}: strides {:?}", wf.stride());
            assert!(!super::libtorch::is_channels_last(&wp));
            assert_eq!((dwf.kind(), dwf.size()), (tch::Kind::Float, vec![4, 3, k as i64, k as i64, k as i64]));
            assert!(dwf.is_contiguous(), "k {k}: the weight's gradient has strides {:?}", dwf.stride());
            for (what, a, e) in [("weight", &wf, &wp), ("output", &yf, &yp), ("weight gradient", &dwf, &dwp), ("bias gradient", &dbf, &dbp)] {
                assert!(a.equal(e), "k {k}: the {what} differs from burn's cast path");
            }
        }
        // Channels-last off: burn's cast, NCDHW.
        super::set_channels_last(Some(false));
        let w = t([4, 3, 3, 3, 3], &mut rng);
        assert!(!super::libtorch::is_channels_last(&aten(ops::cast_conv_weight(w, DType::F16))));
        super::set_channels_last(None);
    }

    /// A strided 1×1×1 convolution of channels-last activations (STU-Net's projection
    /// shortcut) equals ATen's NCDHW convolution in value and in every gradient, at odd
    /// extents and unequal strides, and the gradient of its input comes back channels-last,
    /// the layout of the block's other gradient of that input.
    #[test]
    fn a_strided_1x1x1_convolution_gives_a_channels_last_input_gradient() {
        use tch::Tensor;
        let mut rng = stu_core::rng::SplitMix64::new(23);
        let (b, c, o, d, h, w) = (2i64, 3, 4, 5, 6, 3);
        let t = |n: &[i64], rng: &mut stu_core::rng::SplitMix64| Tensor::from_slice(&rng.fill_f32(n.iter().product::<i64>() as usize, -1.0, 1.0)).view(n);
        let (x, wk, bk) = (t(&[b, c, d, h, w], &mut rng), t(&[o, c, 1, 1, 1], &mut rng), t(&[o], &mut rng));
        for stride in [[2i64, 2, 2], [2, 3, 1], [1, 1, 1]] {
            let leaves = |x: &Tensor| (cl(x).detach().set_requires_grad(true), wk.detach().set_requires_grad(true), bk.detach().set_requires_grad(true));
            let (xa, wa, ba) = leaves(&x);
            let ya = super::libtorch::conv1x1_channels_last(&xa, &wa, Some(&ba), stride);
            let (xr, wr, br) = leaves(&x);
            let yr = xr.conv3d(&wr, Some(&br), stride, [0i64; 3], [1i64; 3], 1);
            assert_eq!(ya.size(), yr.size(), "stride {stride:?}");
            let g = t(&yr.size(), &mut rng);
            // As the tracked convolution takes them (a leaf's `grad()` would be copied to the
            // leaf's strides).
            let ga = super::libtorch::vjp(&ya, &g, &[&xa, &wa, &ba]);
            let gr = super::libtorch::vjp(&yr, &g, &[&xr, &wr, &br]);
            let err = |a: &Tensor, e: &Tensor| (a - e).abs().max().double_value(&[]);
            assert!(err(&ya, &yr) <= 1e-6, "stride {stride:?}: values off by {}", err(&ya, &yr));
            for (what, a, e) in [("x", &ga[0], &gr[0]), ("w", &ga[1], &gr[1]), ("b", &ga[2], &gr[2])] {
                assert!(err(a, e) <= 1e-5, "stride {stride:?}: the gradient of {what} is off by {}", err(a, e));
            }
            assert!(super::libtorch::is_channels_last(&ga[0]), "stride {stride:?}: the input's gradient has strides {:?}", ga[0].stride());
        }
    }

    /// Nearest upsampling as a broadcast copy and its gradient as a block sum equal ATen's
    /// `upsample_nearest3d` and its backward (unequal factors per axis, f32 and f16), and keep
    /// the layout they are given: channels-last in, channels-last out.
    #[test]
    fn upsampling_by_broadcast_equals_atens_kernels_and_keeps_the_layout() {
        use tch::{Kind, Tensor};
        let _layout = LAYOUT.lock().unwrap_or_else(|e| e.into_inner());
        let (b, c, d, h, w) = (2i64, 3, 2, 3, 4);
        let mut rng = stu_core::rng::SplitMix64::new(5);
        let x = Tensor::from_slice(&rng.fill_f32((b * c * d * h * w) as usize, -2.0, 2.0)).view([b, c, d, h, w]);
        let scale = [1usize, 2, 3];
        let g = Tensor::from_slice(&rng.fill_f32((b * c * d * h * w * 6) as usize, -1.0, 1.0)).view([b, c, d, h * 2, w * 3]);
        // (The copy, which is not the CPU's default.)
        super::set_upsample_aten(Some(false));
        for kind in [Kind::Float, Kind::Half] {
            let (x, g) = (x.to_kind(kind), g.to_kind(kind));
            let want = x.upsample_nearest3d([d, h * 2, w * 3], None, None, None);
            let want_dx = Tensor::upsample_nearest3d_backward(&g, [d, h * 2, w * 3], [b, c, d, h, w], None, None, None);
            for channels_last in [false, true] {
                let (xi, gi) = if channels_last { (cl(&x), cl(&g)) } else { (x.shallow_clone(), g.shallow_clone()) };
                let y = super::libtorch::upsample(&xi, scale);
                let dx = super::libtorch::upsample_backward(&gi, scale);
                assert_eq!(super::libtorch::is_channels_last(&y), channels_last, "{kind:?}: the output keeps the input's layout");
                assert_eq!(super::libtorch::is_channels_last(&dx), channels_last, "{kind:?}: so does the gradient");
                assert_eq!((y.size(), y.kind()), (want.size(), kind));
                assert_eq!(dx.size(), vec![b, c, d, h, w]);
                let err = |a: &Tensor, e: &Tensor| (a.to_kind(Kind::Float) - e.to_kind(Kind::Float)).abs().max().double_value(&[]);
                assert_eq!(err(&y, &want), 0.0, "{kind:?}, channels-last {channels_last}: values");
                // Six terms per sum: equal to ATen's to the half type's rounding.
                let tol = if kind == Kind::Half { 2e-3 } else { 1e-6 };
                assert!(err(&dx, &want_dx) <= tol, "{kind:?}, channels-last {channels_last}: gradient off by {}", err(&dx, &want_dx));
            }
        }
        super::set_upsample_aten(None);
    }

    /// The loss reads channels-last logits in place (as `[B, N, C]`) and gives their gradient in
    /// that layout, with the values of the NCDHW path (itself checked against the composed loss
    /// in `loss::tests`).
    #[test]
    fn the_aten_loss_takes_channels_last_logits_as_they_are() {
        use tch::{Kind, Tensor};
        let (b, c, d, h, w) = (2i64, 6, 5, 4, 3);
        let mut rng = stu_core::rng::SplitMix64::new(13);
        let logits = Tensor::from_slice(&rng.fill_f32((b * c * d * h * w) as usize, -3.0, 3.0)).view([b, c, d, h, w]);
        let target = Tensor::from_slice(&(0..b * d * h * w).map(|_| rng.below(5) as f32).collect::<Vec<f32>>()).view([b, d, h, w]);
        let cl = logits.permute([0, 2, 3, 4, 1]).contiguous().permute([0, 4, 1, 2, 3]);
        assert!(super::libtorch::is_channels_last(&cl) && !super::libtorch::is_channels_last(&logits));
        let grad = Tensor::from_slice(&[0.7f32]);
        for batch_dice in [false, true] {
            let (l0, p0, k0) = super::libtorch::dc_ce_parts(&logits, &target, batch_dice, 1e-5);
            let (l1, p1, k1) = super::libtorch::dc_ce_parts(&cl, &target, batch_dice, 1e-5);
            assert!(super::libtorch::is_channels_last(&p1), "the probabilities keep the logits' layout");
            let g0 = super::libtorch::dc_ce_grad(&p0, &target, &k0, &grad);
            let g1 = super::libtorch::dc_ce_grad(&p1, &target, &k1, &grad);
            assert!(super::libtorch::is_channels_last(&g1), "so does the gradient");
            for (what, x, y) in [("loss", &l0, &l1), ("probabilities", &p0, &p1), ("coefficients", &k0, &k1), ("gradient", &g0, &g1)] {
                let err = (x - y).abs().max().double_value(&[]);
                let scale = x.abs().max().double_value(&[]).max(1e-3);
                assert!(err <= 1e-6 * scale, "batch_dice {batch_dice}, {what}: max |diff| {err}");
            }
            assert_eq!(g1.kind(), Kind::Float);
        }
    }
}
