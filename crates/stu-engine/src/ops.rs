//! Building blocks that burn 0.22 lacks or implements slowly for 5-D volumes.

use burn::tensor::{Device, Tensor};
use burn::tensor::activation;

/// LeakyReLU with PyTorch's default slope, which STU-Net uses everywhere.
pub const LEAKY_SLOPE: f64 = 0.01;

/// Instance-norm epsilon (PyTorch's default).
pub const NORM_EPS: f64 = 1e-5;

/// `leaky_relu(x, 0.01)`.
pub fn leaky_relu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activation::leaky_relu(x, LEAKY_SLOPE)
}

/// Where the channel axis of a 5-D activation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[B, C, D, H, W]`, PyTorch's layout; used on backends without our kernels.
    Ncdhw,
    /// `[B, D, H, W, C]`, channels-last; used on flex, where our conv kernels run.
    Ndhwc,
}

impl Layout {
    /// The layout the fast path of a device uses.
    pub fn for_device(device: &Device) -> Self {
        if is_flex(device) { Layout::Ndhwc } else { Layout::Ncdhw }
    }

    /// Index of the channel axis.
    pub fn channel_axis(self) -> usize {
        match self {
            Layout::Ncdhw => 1,
            Layout::Ndhwc => 4,
        }
    }

    /// Index of spatial axis `a` (0, 1, 2).
    pub fn spatial_axis(self, a: usize) -> usize {
        match self {
            Layout::Ncdhw => 2 + a,
            Layout::Ndhwc => 1 + a,
        }
    }

    /// An NCDHW tensor in this layout (a view; no copy).
    pub fn from_ncdhw(self, x: Tensor<5>) -> Tensor<5> {
        match self {
            Layout::Ncdhw => x,
            Layout::Ndhwc => x.permute([0, 2, 3, 4, 1]),
        }
    }

    /// A tensor of this layout as NCDHW (a view; no copy).
    pub fn to_ncdhw(self, x: Tensor<5>) -> Tensor<5> {
        match self {
            Layout::Ncdhw => x,
            Layout::Ndhwc => x.permute([0, 4, 1, 2, 3]),
        }
    }
}

/// True for the flex device and autodiff over it.
pub fn is_flex(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    {
        use burn::backend::DispatchDevice;
        match device.as_dispatch() {
            DispatchDevice::Flex(_) => true,
            DispatchDevice::Autodiff(inner) => matches!(&**inner, DispatchDevice::Flex(_)),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

/// Which operators take the ATen paths of [`crate::torch`] on a libtorch device:
/// `STU_TCH_NATIVE` = `1` (default: all), `0` (none: burn's generic operators, to measure what
/// the ATen paths gain), or a comma-separated list of `conv`, `norm`, `loss`, `upsample`, `sgd`
/// (only those).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchPath {
    /// Convolutions (forward and cuDNN gradients).
    Conv,
    /// Instance norm (+ LeakyReLU).
    Norm,
    /// The training loss (Dice + CE).
    Loss,
    /// Nearest-neighbour upsampling (one ATen kernel instead of a copy per axis).
    Upsample,
    /// Gradient clipping and the SGD step as multi-tensor (`foreach`) kernels.
    Sgd,
}

/// True for a libtorch device (CPU or CUDA), or autodiff over it, when `STU_TCH_NATIVE`
/// enables `path` there (see [`TorchPath`]).
pub fn is_libtorch(device: &Device, path: TorchPath) -> bool {
    #[cfg(feature = "tch")]
    {
        static NATIVE: std::sync::OnceLock<[bool; 5]> = std::sync::OnceLock::new();
        let [conv, norm, loss, upsample, sgd] = *NATIVE.get_or_init(|| match std::env::var("STU_TCH_NATIVE").as_deref() {
            Ok("0") => [false; 5],
            Ok("1") | Err(_) => [true; 5],
            Ok(list) => {
                let has = |k: &str| list.split(',').any(|t| t.trim() == k);
                [has("conv"), has("norm"), has("loss"), has("upsample"), has("sgd")]
            }
        });
        let on = match path {
            TorchPath::Conv => conv,
            TorchPath::Norm => norm,
            TorchPath::Loss => loss,
            TorchPath::Upsample => upsample,
            TorchPath::Sgd => sgd,
        };
        on && libtorch_device(device).is_some()
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = (device, path);
        false
    }
}

/// The libtorch device under `device` (itself, or the one autodiff runs over); `None` for
/// another backend's.
#[cfg(feature = "tch")]
#[allow(deprecated)] // burn-tch is deprecated upstream; it is the cuDNN path here
pub(crate) fn libtorch_device(device: &Device) -> Option<burn::backend::libtorch::LibTorchDevice> {
    use burn::backend::DispatchDevice;
    match device.as_dispatch() {
        DispatchDevice::LibTorch(d) => Some(*d),
        DispatchDevice::Autodiff(inner) => match &**inner {
            DispatchDevice::LibTorch(d) => Some(*d),
            #[allow(unreachable_patterns)]
            _ => None,
        },
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// 3-D convolution with odd kernel sizes, padding `k / 2` per axis ("same" at stride 1), bias,
/// given stride. `weight` is `[Cout, Cin, kd, kh, kw]` whatever the layout. Our channels-last
/// kernels take sizes 1 or 3 on each axis (1³, 3³, nnU-Net's `[1, 3, 3]` of anisotropic stages
/// and of 2-D plans); other shapes run burn's convolution on an NCDHW view.
pub fn conv3d(x: Tensor<5>, weight: Tensor<5>, bias: Tensor<1>, stride: [usize; 3], layout: Layout) -> Tensor<5> {
    conv3d_with(x, weight, bias, stride, layout, true)
}

/// [`conv3d`] for an output that goes straight into an instance norm (STU-Net's `conv1 → norm1`,
/// `conv2 → norm2`): the norm's mean subtraction removes a per-channel bias exactly, so the
/// libtorch path leaves it out of the forward (one pass over the output less, and one rounding
/// less in half precision); the bias still gets its gradient (the sum of the output's gradient,
/// ≈ 0 as PyTorch's), so the optimiser treats it as PyTorch does. Elsewhere the same as
/// [`conv3d`] (flex adds the bias inside its GEMM, for nothing).
pub fn conv3d_normed(x: Tensor<5>, weight: Tensor<5>, bias: Tensor<1>, stride: [usize; 3], layout: Layout) -> Tensor<5> {
    conv3d_with(x, weight, bias, stride, layout, false)
}

// (`add_bias` only matters to the libtorch path.)
#[cfg_attr(not(feature = "tch"), allow(clippy::only_used_in_recursion))]
fn conv3d_with(x: Tensor<5>, weight: Tensor<5>, bias: Tensor<1>, stride: [usize; 3], layout: Layout, add_bias: bool) -> Tensor<5> {
    let k = weight.dims();
    let ours = k[2..].iter().all(|&k| k == 1 || k == 3);
    match layout {
        Layout::Ndhwc if !ours => layout.from_ncdhw(conv3d_with(layout.to_ncdhw(x), weight, bias, stride, Layout::Ncdhw, add_bias)),
        Layout::Ndhwc => {
            use crate::ext::StuOps;
            Tensor::from_dispatch(<burn::backend::Dispatch as StuOps>::conv3d_cl(
                x.into_dispatch(),
                weight.into_dispatch(),
                bias.into_dispatch(),
                stride,
            ))
        }
        #[cfg(feature = "tch")]
        Layout::Ncdhw if is_libtorch(&x.device(), TorchPath::Conv) => {
            use crate::torch::TorchOps;
            Tensor::from_dispatch(<burn::backend::Dispatch as TorchOps>::conv3d_nc(
                x.into_dispatch(),
                weight.into_dispatch(),
                bias.into_dispatch(),
                stride,
                add_bias,
            ))
        }
        Layout::Ncdhw if (0..3).any(|a| k[a + 2] == 1 && stride[a] > 1) => {
            // A 1-wide axis with a stride (STU-Net's strided 1×1×1 shortcut) reads every
            // stride-th voxel: take those first and convolve at stride 1 there. The same sums;
            // and CubeCL's transposed convolution, which burn's input gradient runs through on
            // `wgpu` and `cuda`, returns zeros when a kernel is narrower than its stride
            // (burn-cubecl 0.22.1, `conv_transpose3d`: `kernel * dilation − stride` in unsigned
            // arithmetic), so the shortcut's gradient would never reach the encoder.
            let dims = x.dims();
            let slices: Vec<burn::tensor::Slice> = (0..5)
                .map(|d| match d {
                    2..=4 if k[d] == 1 && stride[d - 2] > 1 => burn::tensor::Slice::new(0, Some(dims[d] as isize), stride[d - 2] as isize),
                    _ => burn::tensor::Slice::new(0, Some(dims[d] as isize), 1),
                })
                .collect();
            let left: [usize; 3] = std::array::from_fn(|a| if k[a + 2] == 1 { 1 } else { stride[a] });
            conv3d_with(x.slice(slices.as_slice()), weight, bias, left, Layout::Ncdhw, add_bias)
        }
        Layout::Ncdhw => {
            let pad = [k[2] / 2, k[3] / 2, k[4] / 2];
            let [_, _, d, h, w] = x.dims();
            let out: [usize; 3] = std::array::from_fn(|a| ([d, h, w][a] + 2 * pad[a] - k[a + 2]) / stride[a] + 1);
            if is_cubecl(&x.device()) && out.iter().product::<usize>() > CUBECL_OUTPUT_VOXELS {
                return conv3d_in_pieces(x, weight, bias, stride, pad, out);
            }
            burn::tensor::module::conv3d(x, weight, Some(bias), burn::tensor::ops::ConvOptions::new(stride, pad, [1; 3], 1))
        }
    }
}

/// The most output voxels per sample one convolution gets on a CubeCL device (`wgpu`, `cuda`).
/// burn-cubecl 0.22.1 computes a convolution's weight gradient as a convolution whose kernel is
/// the output's gradient, and on Mesa's lavapipe (Vulkan on the CPU) that convolution is wrong
/// from 32 768 kernel voxels on: the weight gradients of a 32³ output were off by 36 %, of a 64³
/// one by 92 % (tests/e2e/parity.rs, `--features wgpu`). Larger outputs are computed in pieces.
pub const CUBECL_OUTPUT_VOXELS: usize = 16_384;

/// True for a CubeCL device (`wgpu`, `cuda`), or autodiff over one.
pub fn is_cubecl(device: &Device) -> bool {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        use burn::backend::DispatchDevice;
        match device.as_dispatch() {
            DispatchDevice::Cube(_) => true,
            DispatchDevice::Autodiff(inner) => matches!(&**inner, DispatchDevice::Cube(_)),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = device;
        false
    }
}

/// [`conv3d`]'s NCDHW convolution as slabs of at most [`CUBECL_OUTPUT_VOXELS`] output voxels per
/// sample (output depth ranges, and height ranges where one depth slice is larger), each from
/// its part of the zero-padded input, joined again: the same sums, and burn's gradients through
/// the slices, padding and joins.
fn conv3d_in_pieces(x: Tensor<5>, weight: Tensor<5>, bias: Tensor<1>, stride: [usize; 3], pad: [usize; 3], out: [usize; 3]) -> Tensor<5> {
    let k = weight.dims();
    // Zero padding of depth and height made explicit; width keeps the convolution's own.
    let xp = x.pad([(pad[0], pad[0]), (pad[1], pad[1]), (0, 0)], burn::tensor::ops::PadMode::Constant(0.0));
    let [n, c, _, _, w] = xp.dims();
    let plane = out[1] * out[2];
    let (rows, depths) = if plane > CUBECL_OUTPUT_VOXELS { ((CUBECL_OUTPUT_VOXELS / out[2]).max(1), 1) } else { (out[1], (CUBECL_OUTPUT_VOXELS / plane).max(1)) };
    let opts = burn::tensor::ops::ConvOptions::new(stride, [0, 0, pad[2]], [1; 3], 1);
    let mut slabs = Vec::new();
    for z0 in (0..out[0]).step_by(depths) {
        let z1 = (z0 + depths).min(out[0]);
        let mut pieces = Vec::new();
        for y0 in (0..out[1]).step_by(rows) {
            let y1 = (y0 + rows).min(out[1]);
            let part = xp.clone().slice([0..n, 0..c, z0 * stride[0]..(z1 - 1) * stride[0] + k[2], y0 * stride[1]..(y1 - 1) * stride[1] + k[3], 0..w]);
            pieces.push(burn::tensor::module::conv3d(part, weight.clone(), Some(bias.clone()), opts.clone()));
        }
        slabs.push(if pieces.len() == 1 { pieces.pop().expect("one piece") } else { Tensor::cat(pieces, 3) });
    }
    if slabs.len() == 1 { slabs.pop().expect("one slab") } else { Tensor::cat(slabs, 2) }
}

/// Transposed convolution whose kernel equals its stride (`ConvTranspose3d(k=s, stride=s)`,
/// nnU-Net's upsampling): every input voxel becomes an `s`-block of outputs, so it is one matrix
/// product followed by a depth-to-space shuffle. `weight` is PyTorch's `[Cin, Cout, s0, s1, s2]`.
pub fn conv_transpose_ks(x: Tensor<5>, weight: Tensor<5>, bias: Tensor<1>, layout: Layout) -> Tensor<5> {
    let [cin, cout, s0, s1, s2] = weight.dims();
    let xl = match layout {
        Layout::Ndhwc => x,
        // PyTorch's layout: the backend's own transposed convolution (cuDNN on libtorch).
        Layout::Ncdhw => {
            let opts = burn::tensor::ops::ConvTransposeOptions::new([s0, s1, s2], [0; 3], [0; 3], [1; 3], 1);
            return burn::tensor::module::conv_transpose3d(x, weight, Some(bias), opts);
        }
    };
    let [b, d, h, w, c] = xl.dims();
    assert_eq!(c, cin, "conv_transpose_ks: input has {c} channels, weight expects {cin}");
    let wm = weight.permute([0, 2, 3, 4, 1]).reshape([cin, s0 * s1 * s2 * cout]);
    let y = xl.reshape([b * d * h * w, cin]).matmul(wm);
    let y: Tensor<8> = y.reshape([b, d, h, w, s0, s1, s2, cout]).permute([0, 1, 4, 2, 5, 3, 6, 7]);
    y.reshape([b, d * s0, h * s1, w * s2, cout]) + bias.reshape([1, 1, 1, 1, cout])
}

/// A 1×1 conv whose output is always NCDHW, whatever the input layout: the segmentation heads.
/// On the channels-last path the kernel writes channels-first directly (no transpose of the
/// many-class full-resolution logits, forward or backward).
pub fn head_to_ncdhw(x: Tensor<5>, weight: Tensor<5>, bias: Tensor<1>, layout: Layout) -> Tensor<5> {
    match layout {
        Layout::Ndhwc => {
            use crate::ext::StuOps;
            Tensor::from_dispatch(<burn::backend::Dispatch as StuOps>::head_cl(x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch()))
        }
        Layout::Ncdhw => conv3d(x, weight, bias, [1, 1, 1], layout),
    }
}

/// Instance normalisation with a per-channel affine, as `torch.nn.InstanceNorm3d(C,
/// affine=True)`: per-sample, per-channel statistics over the spatial axes, biased variance,
/// eps 1e-5.
///
/// Computed as `(x − μ)·(γ/σ) + β`: two full-size passes after the statistics, and no
/// cancellation when |μ| ≫ σ.
pub fn instance_norm(x: Tensor<5>, weight: Tensor<1>, bias: Tensor<1>, layout: Layout) -> Tensor<5> {
    let dims = x.dims();
    let (b, c) = (dims[0], dims[layout.channel_axis()]);
    let n = dims.iter().product::<usize>() / (b * c);
    let (flat, axis, cshape) = match layout {
        Layout::Ncdhw => (x.reshape([b, c, n]), 2, [1, c, 1]),
        Layout::Ndhwc => (x.reshape([b, n, c]), 1, [1, 1, c]),
    };
    let (var, mean) = flat.clone().var_mean_bias(axis);
    let scale = weight.reshape(cshape) / (var + NORM_EPS).sqrt();
    ((flat - mean) * scale + bias.reshape(cshape)).reshape(dims)
}

/// `instance_norm` then LeakyReLU(0.01) when `act`; fused on the channels-last path.
pub fn norm_act(x: Tensor<5>, weight: Tensor<1>, bias: Tensor<1>, act: bool, layout: Layout) -> Tensor<5> {
    match layout {
        Layout::Ndhwc => {
            use crate::ext::StuOps;
            Tensor::from_dispatch(<burn::backend::Dispatch as StuOps>::norm_act_cl(
                x.into_dispatch(),
                weight.into_dispatch(),
                bias.into_dispatch(),
                act,
            ))
        }
        #[cfg(feature = "tch")]
        Layout::Ncdhw if is_libtorch(&x.device(), TorchPath::Norm) => {
            use crate::torch::TorchOps;
            Tensor::from_dispatch(<burn::backend::Dispatch as TorchOps>::norm_act_nc(x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch(), act))
        }
        Layout::Ncdhw => {
            let y = instance_norm(x, weight, bias, layout);
            if act { leaky_relu(y) } else { y }
        }
    }
}

/// `leaky_relu(instance_norm(x) + skip)`, the end of a residual block; fused on the
/// channels-last path.
pub fn norm_add_act(x: Tensor<5>, weight: Tensor<1>, bias: Tensor<1>, skip: Tensor<5>, layout: Layout) -> Tensor<5> {
    match layout {
        Layout::Ndhwc => {
            use crate::ext::StuOps;
            Tensor::from_dispatch(<burn::backend::Dispatch as StuOps>::norm_add_act_cl(
                x.into_dispatch(),
                weight.into_dispatch(),
                bias.into_dispatch(),
                skip.into_dispatch(),
            ))
        }
        #[cfg(feature = "tch")]
        Layout::Ncdhw if is_libtorch(&x.device(), TorchPath::Norm) => {
            use crate::torch::TorchOps;
            Tensor::from_dispatch(<burn::backend::Dispatch as TorchOps>::norm_add_act_nc(x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch(), skip.into_dispatch()))
        }
        Layout::Ncdhw => leaky_relu(norm_act(x, weight, bias, false, layout) + skip),
    }
}

/// A 3-D convolution weight `[Cout, Cin, kd, kh, kw]` cast to `dtype` (differentiable), as a
/// half-precision step casts its f32 master weights (and an inference network its weights,
/// `Precision::inference_net`). Where the libtorch convolutions run channels-last, a weight
/// whose kernel extents are odd and not all 1 (a convolution's, not a transposed one's or a
/// patch embedding's) comes out channels-last from the same copy (`TorchOps::cast_weight_cl`),
/// so that no convolution converts it again, and its gradient goes back to the weight's type
/// and NCDHW in one copy; elsewhere burn's cast.
pub fn cast_conv_weight(w: Tensor<5>, dtype: burn::tensor::DType) -> Tensor<5> {
    #[cfg(feature = "tch")]
    if w.dims()[2..].iter().all(|k| k % 2 == 1)
        && w.dims()[2..] != [1, 1, 1]
        && is_libtorch(&w.device(), TorchPath::Conv)
        && crate::torch::weight_cl_on()
        && libtorch_device(&w.device()).is_some_and(|d| crate::torch::channels_last_on(d.into()))
    {
        use crate::torch::TorchOps;
        return Tensor::from_dispatch(<burn::backend::Dispatch as TorchOps>::cast_weight_cl(w.into_dispatch(), dtype.into()));
    }
    w.cast(dtype)
}

/// Nearest-neighbour upsampling by integer factors per spatial axis: voxel replication, exactly
/// `F.interpolate(x, scale_factor=s, mode="nearest")` for integer `s`. Differentiable (reshape
/// and expand only); intermediates stay at rank ≤ 5 so every backend runs it.
pub fn upsample_nearest(x: Tensor<5>, scale: [usize; 3], layout: Layout) -> Tensor<5> {
    #[cfg(feature = "tch")]
    if layout == Layout::Ncdhw && is_libtorch(&x.device(), TorchPath::Upsample) {
        use crate::torch::TorchOps;
        return Tensor::from_dispatch(<burn::backend::Dispatch as TorchOps>::upsample_nc(x.into_dispatch(), scale));
    }
    upsample_composed(x, scale, layout)
}

/// [`upsample_nearest`] from reshape and expand, on every backend.
pub(crate) fn upsample_composed(x: Tensor<5>, scale: [usize; 3], layout: Layout) -> Tensor<5> {
    let mut x = x;
    for (a, &s) in scale.iter().enumerate() {
        if s == 1 {
            continue;
        }
        let mut dims = x.dims();
        let axis = layout.spatial_axis(a);
        let outer: usize = dims[..axis].iter().product();
        let inner: usize = dims[axis + 1..].iter().product();
        let n = dims[axis];
        dims[axis] = n * s;
        x = x.reshape([outer, n, 1, inner]).expand([outer, n, s, inner]).reshape(dims);
    }
    x
}

/// GELU as PyTorch's `approximate="none"`: `x·Φ(x)`, with its exact gradient on every backend.
///
/// burn 0.22.1's default `gelu_backward` (burn-cubecl's and ndarray's) is the derivative of the
/// tanh approximation, off by up to 8.7e-4 from the erf GELU its forward computes; flex and
/// libtorch differentiate the erf form. Elsewhere this composes `x/2·(1 + erf(x/√2))`, whose
/// gradient autodiff takes exactly.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    #[cfg(feature = "tch")]
    let native = is_flex(&device) || libtorch_device(&device).is_some();
    #[cfg(not(feature = "tch"))]
    let native = is_flex(&device);
    if native { activation::gelu(x) } else { gelu_composed(x) }
}

/// [`gelu`] from `erf`, on every backend.
pub(crate) fn gelu_composed<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let cdf = (x.clone() / std::f64::consts::SQRT_2).erf().add_scalar(1.0);
    x * cdf * 0.5
}

/// Rows `index` of `table` (`[rows, cols]` → `[len, cols]`), `table.select(0, index)`, with a
/// gradient that adds every lookup into its row: a Swin window's relative-position bias.
///
/// On CubeCL devices this is a `gather` with the index repeated across the columns. burn-cubecl
/// 0.22.1 takes `select`'s gradient with one thread per column walking every lookup in turn,
/// and on lavapipe that walk stops after 65 535 lookups: a 7³ window's 117 649 left the last
/// 511 of its 2 197 rows at 0 (`stu check-ops`). `gather`'s gradient is a scatter with one
/// atomic add per value on a GPU, so it is also the parallel one.
pub fn lookup_rows(table: Tensor<2>, index: Tensor<1, burn::tensor::Int>) -> Tensor<2> {
    if is_cubecl(&table.device()) { lookup_gathered(table, index) } else { table.select(0, index) }
}

/// [`lookup_rows`] as a `gather`, on every backend.
pub(crate) fn lookup_gathered(table: Tensor<2>, index: Tensor<1, burn::tensor::Int>) -> Tensor<2> {
    let [len] = index.dims();
    let cols = table.dims()[1];
    table.gather(0, index.reshape([len, 1]).expand([len, cols]))
}

/// Host copy of a float tensor as f32, row-major.
pub fn to_vec(x: Tensor<5>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("a float tensor converts to f32")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn dev() -> Device {
        crate::backend::Backend::default_compiled()
            .expect("a backend")
            .device()
            .expect("compiled")
    }

    #[test]
    fn upsample_replicates_voxels() {
        let x = Tensor::<5>::from_data(
            TensorData::new((0..8).map(|v| v as f32).collect::<Vec<_>>(), [1, 1, 2, 2, 2]),
            &dev(),
        );
        let y = upsample_nearest(x, [1, 2, 3], Layout::Ncdhw);
        assert_eq!(y.dims(), [1, 1, 2, 4, 6]);
        let v = to_vec(y);
        // y[0,0,i,j,k] = x[0,0,i,j/2,k/3]
        for i in 0..2 {
            for j in 0..4 {
                for k in 0..6 {
                    let want = (i * 4 + (j / 2) * 2 + k / 3) as f32;
                    assert_eq!(v[i * 24 + j * 6 + k], want, "at {i},{j},{k}");
                }
            }
        }
    }

    #[test]
    fn instance_norm_matches_the_definition() {
        let n = 2 * 3 * 4 * 4 * 4;
        let data: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32).sin() * 3.0 + 1.0).collect();
        let x = Tensor::<5>::from_data(TensorData::new(data.clone(), [2, 3, 4, 4, 4]), &dev());
        let w = Tensor::<1>::from_data(TensorData::new(vec![1.5f32, -0.5, 2.0], [3]), &dev());
        let b = Tensor::<1>::from_data(TensorData::new(vec![0.1f32, 0.2, -0.3], [3]), &dev());
        let y = to_vec(instance_norm(x, w, b, Layout::Ncdhw));
        let (ws, bs) = ([1.5f64, -0.5, 2.0], [0.1f64, 0.2, -0.3]);
        for s in 0..2 {
            for c in 0..3 {
                let base = (s * 3 + c) * 64;
                let v: Vec<f64> = data[base..base + 64].iter().map(|&v| v as f64).collect();
                let mean = v.iter().sum::<f64>() / 64.0;
                let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 64.0;
                for i in 0..64 {
                    let want = (v[i] - mean) / (var + 1e-5).sqrt() * ws[c] + bs[c];
                    assert!((y[base + i] as f64 - want).abs() < 1e-4, "{} vs {want}", y[base + i]);
                }
            }
        }
    }

    fn grad_of<const D: usize>(x: Vec<f32>, shape: [usize; D], f: impl Fn(Tensor<D>) -> Tensor<D>, w: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let d = dev().autodiff();
        let xt = Tensor::<D>::from_data(TensorData::new(x, shape), &d).require_grad();
        let y = f(xt.clone());
        let wt = Tensor::<D>::from_data(TensorData::new(w.to_vec(), y.dims()), &d);
        let g = (y.clone() * wt).sum().backward();
        let v = |t: Tensor<D>| t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
        (v(y), v(xt.grad(&g).expect("gradient")))
    }

    /// The composed GELU (burn's generic gradient is the tanh approximation's) against flex's
    /// erf GELU and its exact gradient.
    #[test]
    fn composed_gelu_has_the_exact_gradient() {
        let x: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) / 400.0).collect();
        let w = vec![1.0f32; x.len()];
        let (ya, ga) = grad_of(x.clone(), [x.len()], gelu_composed, &w);
        let (yb, gb) = grad_of(x.clone(), [x.len()], activation::gelu, &w);
        for i in 0..x.len() {
            assert!((ya[i] - yb[i]).abs() < 1e-6, "gelu({}): {} vs {}", x[i], ya[i], yb[i]);
            assert!((ga[i] - gb[i]).abs() < 1e-6, "gelu'({}): {} vs {}", x[i], ga[i], gb[i]);
        }
        // Near x = 2 the tanh approximation's derivative is 8.7e-4 off; the exact one, 1.0852.
        let at2 = x.iter().position(|&v| v == 2.0).expect("2 is on the grid");
        assert!((ga[at2] - 1.085_23).abs() < 1e-4, "{}", ga[at2]);
    }

    /// Row lookups as a gather (CubeCL's path) equal `select`'s, gradients (repeats added) too.
    #[test]
    fn gathered_lookups_equal_select() {
        let table: Vec<f32> = (0..7 * 3).map(|i| ((i * 13 % 17) as f32) - 8.0).collect();
        let index: Vec<i64> = (0..50).map(|i| (i * i % 7) as i64).collect();
        let w: Vec<f32> = (0..50 * 3).map(|i| ((i * 7 % 11) as f32) / 11.0).collect();
        let d = dev();
        let lookup = |f: fn(Tensor<2>, Tensor<1, burn::tensor::Int>) -> Tensor<2>| {
            let index = index.clone();
            let d = d.clone();
            move |t: Tensor<2>| f(t, Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(index.clone(), [50]), &d.clone().autodiff()))
        };
        let (ya, ga) = grad_of(table.clone(), [7, 3], lookup(lookup_gathered), &w);
        let (yb, gb) = grad_of(table.clone(), [7, 3], lookup(|t, i| t.select(0, i)), &w);
        assert_eq!(ya, yb);
        for (a, b) in ga.iter().zip(&gb) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // Row 0 is looked up at i ≡ 0 mod 7 only (i² ≡ 0): its gradient adds those lookups' weights.
        let want: f32 = (0..50).filter(|i| i * i % 7 == 0).map(|i| w[i * 3]).sum();
        assert!((ga[0] - want).abs() < 1e-5, "{} vs {want}", ga[0]);
    }
}
