//! What the zoo's models share: where parameters come from (fresh or a checkpoint), the
//! initialisers, state-dict export, and MONAI's building blocks (UNETR and SwinUNETR use them).

use std::cell::RefCell;
use std::collections::HashMap;

use burn::module::{Module, Param};
use burn::nn::Initializer;
use stu_engine::burn;
use stu_engine::checkpoint::{CheckpointError, NamedTensor, StateDict};
use stu_engine::ops::{self, Layout};
use stu_engine::train::{Draw, InitRules};
use stu_engine::{Device, Tensor, TensorData};

/// Where a model's parameters come from when it is built.
pub enum Source<'a> {
    /// Fresh initialisation (lazy: nothing is allocated until a forward pass or a read).
    Init,
    /// A checkpoint's tensors.
    Dict(&'a StateDict),
}

/// Makes parameters from a [`Source`]; models add their own layers on top.
pub struct Builder<'a> {
    /// Where the values come from.
    pub src: Source<'a>,
    /// Where they live.
    pub device: &'a Device,
    /// How each fresh parameter is drawn, as declared ([`Builder::into_rules`]).
    rules: RefCell<InitRules>,
}

impl<'a> Builder<'a> {
    /// A builder of fresh parameters.
    pub fn fresh(device: &'a Device) -> Self {
        Builder { src: Source::Init, device, rules: RefCell::default() }
    }

    /// A builder reading `dict`'s tensors.
    pub fn reading(dict: &'a StateDict, device: &'a Device) -> Self {
        Builder { src: Source::Dict(dict), device, rules: RefCell::default() }
    }

    /// What every fresh parameter's initializer declared, for `seeded_init` (empty when
    /// reading a checkpoint).
    pub fn into_rules(self) -> InitRules {
        self.rules.into_inner()
    }
}

impl Builder<'_> {
    /// The parameter `key` of `shape`: read from the checkpoint, or initialised by `init` with
    /// PyTorch's fans (fan_in = shape[1]·kernel, fan_out = shape[0]·kernel), which is recorded
    /// for `seeded_init`.
    pub fn tensor<const D: usize>(&self, key: &str, shape: [usize; D], init: Initializer) -> Result<Param<Tensor<D>>, CheckpointError> {
        match &self.src {
            Source::Init => {
                let fan_in = shape.iter().skip(1).product::<usize>().max(1);
                let fan_out = shape[0] * shape.iter().skip(2).product::<usize>();
                let param = init.init_with(shape, Some(fan_in), Some(fan_out), self.device);
                self.rules.borrow_mut().0.insert(param.id, Draw::of(&init, fan_in));
                Ok(param)
            }
            Source::Dict(dict) => Ok(Param::from_tensor(Tensor::from_data(TensorData::new(dict.read(key, &shape)?, shape), self.device))),
        }
    }

    /// nnU-Net's `InitWeights_He(1e-2)`: kaiming normal with the LeakyReLU slope.
    pub fn he() -> Initializer {
        Initializer::KaimingNormal { gain: (2.0 / (1.0 + 0.01f64 * 0.01)).sqrt(), fan_out_only: false }
    }

    /// The transformers' `trunc_normal_(std=0.02)` (untruncated here: ±2 is 100 sd away).
    pub fn trunc_normal() -> Initializer {
        Initializer::Normal { mean: 0.0, std: stu_engine::train::TRANSFORMER_STD }
    }

    /// PyTorch's own initialisation of a `Linear`, `Conv3d` or `ConvTranspose3d` weight,
    /// `kaiming_uniform_(a=√5)`: U(±1/√fan_in). MONAI's networks and nnFormer keep it.
    pub fn torch_weight() -> Initializer {
        Initializer::KaimingUniform { gain: (1.0f64 / 3.0).sqrt(), fan_out_only: false }
    }

    /// A layer's weight `{key}.weight` of `shape` and its bias `{key}.bias` (`bias_len` values:
    /// `shape[0]`, or `shape[1]` for a transposed convolution), as PyTorch initialises them:
    /// U(±1/√fan_in) for both, with the weight's fan_in (`shape[1]·kernel`).
    pub fn torch_layer<const D: usize>(&self, key: &str, shape: [usize; D], bias_len: usize) -> Result<(Param<Tensor<D>>, Param<Tensor<1>>), CheckpointError> {
        let bound = 1.0 / (shape.iter().skip(1).product::<usize>().max(1) as f64).sqrt();
        let weight = self.tensor(&format!("{key}.weight"), shape, Self::torch_weight())?;
        Ok((weight, self.tensor(&format!("{key}.bias"), [bias_len], Initializer::Uniform { min: -bound, max: bound })?))
    }

    /// `nn.LayerNorm(c)` under `key`.
    pub fn ln(&self, key: &str, c: usize) -> Result<LayerNorm, CheckpointError> {
        Ok(LayerNorm { weight: self.tensor(&format!("{key}.weight"), [c], Initializer::Ones)?, bias: self.tensor(&format!("{key}.bias"), [c], Initializer::Zeros)? })
    }

    /// `nn.Linear(cin, out, bias)` under `key`, initialised as PyTorch does (MONAI's
    /// transformer blocks and nnFormer's keep it).
    pub fn linear(&self, key: &str, cin: usize, out: usize, bias: bool) -> Result<Linear, CheckpointError> {
        if bias {
            let (weight, bias) = self.torch_layer(key, [out, cin], out)?;
            Ok(Linear { weight, bias: Some(bias) })
        } else {
            Ok(Linear { weight: self.tensor(&format!("{key}.weight"), [out, cin], Self::torch_weight())?, bias: None })
        }
    }

    /// MONAI's `UnetResBlock(cin → c)` under `key`.
    pub fn res(&self, key: &str, cin: usize, c: usize) -> Result<ResBlock, CheckpointError> {
        Ok(ResBlock {
            conv1: self.tensor(&format!("{key}.conv1.conv.weight"), [c, cin, 3, 3, 3], Self::torch_weight())?,
            conv2: self.tensor(&format!("{key}.conv2.conv.weight"), [c, c, 3, 3, 3], Self::torch_weight())?,
            conv3: if cin != c { Some(self.tensor(&format!("{key}.conv3.conv.weight"), [c, cin, 1, 1, 1], Self::torch_weight())?) } else { None },
        })
    }
}

/// Checks a checkpoint against a model's key table: no key outside it, every key present with
/// its shape; keys for which `optional` holds may be absent (buffers, duplicate registrations).
pub fn check_keys(dict: &StateDict, keys: &[(String, Vec<usize>)], model: &str, optional: impl Fn(&str) -> bool) -> Result<(), CheckpointError> {
    dict.reject_unknown(keys.iter().map(|(k, _)| k.as_str()), model)?;
    for (key, shape) in keys {
        if optional(key) && !dict.keys().any(|k| k == key) {
            continue;
        }
        let found = dict.shape(key)?;
        if found != shape.as_slice() {
            return Err(CheckpointError::Shape { path: dict.path().to_path_buf(), key: key.clone(), found: found.to_vec(), expected: shape.clone() });
        }
    }
    Ok(())
}

/// A model's size options from `NetSpec::options` (`null`: all defaults); the error names the model.
pub fn options<T: Default + serde::de::DeserializeOwned>(spec: &stu_engine::model::NetSpec, model: &str) -> Result<T, String> {
    if spec.options.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(spec.options.clone()).map_err(|e| format!("model options for `{model}`: {e}"))
}

/// A parameter as a named f32 tensor (state-dict export).
pub fn named<const D: usize>(name: String, t: Tensor<D>) -> NamedTensor {
    let shape = t.dims().to_vec();
    NamedTensor { name, shape, data: t.into_data().convert::<f32>().try_into_vec::<f32>().expect("float parameter") }
}

/// State-dict export by key, then in the order of the model's key table.
#[derive(Default)]
pub struct Export(HashMap<String, NamedTensor>);

impl Export {
    /// Adds `t` under `key`.
    pub fn put<const D: usize>(&mut self, key: String, t: Tensor<D>) {
        self.0.insert(key.clone(), named(key, t));
    }

    /// Adds a tensor already on the host.
    pub fn put_host(&mut self, t: NamedTensor) {
        self.0.insert(t.name.clone(), t);
    }

    /// Adds a MONAI `UnetResBlock` under `key`.
    pub fn res(&mut self, key: &str, r: &ResBlock) {
        self.put(format!("{key}.conv1.conv.weight"), r.conv1.val());
        self.put(format!("{key}.conv2.conv.weight"), r.conv2.val());
        if let Some(w) = &r.conv3 {
            self.put(format!("{key}.conv3.conv.weight"), w.val());
        }
    }

    /// The tensors in the order of `keys`; every key must have been written.
    pub fn finish(mut self, keys: impl IntoIterator<Item = String>) -> Vec<NamedTensor> {
        keys.into_iter().map(|k| self.0.remove(&k).unwrap_or_else(|| panic!("state-dict key `{k}` was not written"))).collect()
    }
}

/// `nn.LayerNorm(C)` (eps 1e-5).
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale.
    pub weight: Param<Tensor<1>>,
    /// Shift.
    pub bias: Param<Tensor<1>>,
}

impl LayerNorm {
    pub(crate) fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let c = x.dims()[2];
        let (var, mean) = x.clone().var_mean_bias(2);
        (x - mean) / (var + 1e-5).sqrt() * self.weight.val().reshape([1, 1, c]) + self.bias.val().reshape([1, 1, c])
    }
}

/// `nn.Linear` (PyTorch's `[out, in]` weight).
#[derive(Module, Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Param<Tensor<2>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    pub(crate) fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let out = self.weight.dims()[0];
        let y = x.reshape([b * n, c]).matmul(self.weight.val().transpose());
        let y = match &self.bias {
            Some(bias) => y + bias.val().reshape([1, out]),
            None => y,
        };
        y.reshape([b, n, out])
    }
}

/// MONAI's `UnetResBlock` (norm without affine).
#[derive(Module, Debug)]
pub struct ResBlock {
    /// 3³ conv.
    pub conv1: Param<Tensor<5>>,
    /// 3³ conv.
    pub conv2: Param<Tensor<5>>,
    /// 1×1 projection when the width changes.
    pub conv3: Option<Param<Tensor<5>>>,
}

pub(crate) fn conv_nb(x: Tensor<5>, w: Tensor<5>, l: Layout) -> Tensor<5> {
    let c = w.dims()[0];
    let zeros = Tensor::zeros([c], &w.device());
    ops::conv3d(x, w, zeros, [1; 3], l)
}

pub(crate) fn norm(x: Tensor<5>, act: bool, l: Layout) -> Tensor<5> {
    let c = x.dims()[l.channel_axis()];
    let dev = x.device();
    ops::norm_act(x, Tensor::ones([c], &dev), Tensor::zeros([c], &dev), act, l)
}

pub(crate) fn up(x: Tensor<5>, w: Tensor<5>, l: Layout) -> Tensor<5> {
    let c = w.dims()[1];
    let zeros = Tensor::zeros([c], &w.device());
    ops::conv_transpose_ks(x, w, zeros, l)
}

impl ResBlock {
    pub(crate) fn forward(&self, x: Tensor<5>, l: Layout) -> Tensor<5> {
        let y = norm(conv_nb(x.clone(), self.conv1.val(), l), true, l);
        let y = norm(conv_nb(y, self.conv2.val(), l), false, l);
        let skip = match &self.conv3 {
            Some(w) => norm(conv_nb(x, w.val(), l), false, l),
            None => x,
        };
        ops::leaky_relu(y + skip)
    }
}

/// `UnetrUpBlock`: transposed conv, concatenation with the skip, residual block.
#[derive(Module, Debug)]
pub struct UpBlock {
    /// Upsampling.
    pub transp_conv: Param<Tensor<5>>,
    /// After the concatenation.
    pub conv_block: ResBlock,
}

// Shifted-window attention over channels-last `[B, D, H, W, C]` maps (SwinUNETR, nnFormer).

/// `torch.roll` by `−shift` per spatial axis (`back`: by `+shift`).
pub fn roll(x: Tensor<5>, shift: [usize; 3], back: bool) -> Tensor<5> {
    let mut x = x;
    for (a, &s) in shift.iter().enumerate() {
        if s == 0 {
            continue;
        }
        let n = x.dims()[1 + a];
        // torch.roll(x, -s): out[i] = x[(i + s) mod n]; torch.roll(x, s): out[i] = x[(i − s) mod n].
        let cut = if back { n - s } else { s };
        let lo = x.clone().narrow(1 + a, 0, cut);
        let hi = x.narrow(1 + a, cut, n - cut);
        x = Tensor::cat(vec![hi, lo], 1 + a);
    }
    x
}

/// Zero padding at the end of each spatial axis up to `to`.
pub fn pad_end(x: Tensor<5>, to: [usize; 3]) -> Tensor<5> {
    let mut x = x;
    for a in 0..3 {
        let mut dims = x.dims();
        let n = dims[1 + a];
        if to[a] > n {
            dims[1 + a] = to[a] - n;
            let z = Tensor::zeros(dims, &x.device());
            x = Tensor::cat(vec![x, z], 1 + a);
        }
    }
    x
}

// The window and patch shuffles below move one axis at a time through tensors of rank 4, so
// that every backend runs them (ndarray stops at rank 6; one 8-D permute would do).

/// `window_partition`: `[B, D, H, W, C]` → `[B·nW, w0·w1·w2, C]`, windows in (d, h, w) order.
pub fn partition(x: Tensor<5>, w: [usize; 3]) -> Tensor<3> {
    let [b, d, h, ww, c] = x.dims();
    let n = [d / w[0], h / w[1], ww / w[2]];
    // [B·n0, w0, n1, w1·W·C] → [B·n0, n1, w0, w1·W·C], that is [B, n0, n1, w0, w1, W, C].
    let t = x.reshape([b * n[0], w[0], n[1], w[1] * ww * c]).swap_dims(1, 2);
    // [B·n0·n1, w0·w1, n2, w2·C] → [B·n0·n1, n2, w0·w1, w2·C].
    let t = t.reshape([b * n[0] * n[1], w[0] * w[1], n[2], w[2] * c]).swap_dims(1, 2);
    t.reshape([b * n[0] * n[1] * n[2], w[0] * w[1] * w[2], c])
}

/// `window_reverse` back to `[B, D, H, W, C]` (`dims` = `[B, D, H, W]`): [`partition`]'s inverse.
pub fn reverse(x: Tensor<3>, w: [usize; 3], dims: [usize; 4]) -> Tensor<5> {
    let [b, d, h, ww] = dims;
    let c = x.dims()[2];
    let n = [d / w[0], h / w[1], ww / w[2]];
    let t = x.reshape([b * n[0] * n[1], n[2], w[0] * w[1], w[2] * c]).swap_dims(1, 2);
    let t = t.reshape([b * n[0], n[1], w[0], w[1] * ww * c]).swap_dims(1, 2);
    t.reshape([b, d, h, ww, c])
}

/// Non-overlapping `p`-patches of a channels-first `[B, C, D, H, W]` volume as rows:
/// `[B·n0·n1·n2, C·p0·p1·p2]`, patches in (d, h, w) order, each row in (c, pd, ph, pw) order
/// (a `Conv3d` with kernel = stride = `p` as a matrix product).
pub fn patches(x: Tensor<5>, p: [usize; 3]) -> Tensor<2> {
    let [b, c, d, h, w] = x.dims();
    let n = [d / p[0], h / p[1], w / p[2]];
    // [B, C, n0, p0·H·W] → [B, n0, C, p0·H·W].
    let t = x.reshape([b, c, n[0], p[0] * h * w]).swap_dims(1, 2);
    // [B·n0, C·p0, n1, p1·W] → [B·n0, n1, C·p0, p1·W].
    let t = t.reshape([b * n[0], c * p[0], n[1], p[1] * w]).swap_dims(1, 2);
    // [B·n0·n1, C·p0·p1, n2, p2] → [B·n0·n1, n2, C·p0·p1, p2].
    let t = t.reshape([b * n[0] * n[1], c * p[0] * p[1], n[2], p[2]]).swap_dims(1, 2);
    t.reshape([b * n[0] * n[1] * n[2], c * p[0] * p[1] * p[2]])
}

/// The shifted-window mask (MONAI's `compute_mask`, nnFormer's `BasicLayer`): `[nW, n, n]`,
/// −100 between tokens of different regions of the padded map `dims`.
pub fn shift_mask(dims: [usize; 3], w: [usize; 3], s: [usize; 3]) -> Vec<f32> {
    let region = |a: usize, i: usize| -> usize {
        let n = dims[a];
        if i < n - w[a] {
            0
        } else if i < n - s[a] {
            1
        } else {
            2
        }
    };
    let id = |z: usize, y: usize, x: usize| region(0, z) * 9 + region(1, y) * 3 + region(2, x);
    let nw = [dims[0] / w[0], dims[1] / w[1], dims[2] / w[2]];
    let n = w[0] * w[1] * w[2];
    let mut out = Vec::with_capacity(nw[0] * nw[1] * nw[2] * n * n);
    for wz in 0..nw[0] {
        for wy in 0..nw[1] {
            for wx in 0..nw[2] {
                let ids: Vec<usize> = (0..w[0]).flat_map(|z| (0..w[1]).flat_map(move |y| (0..w[2]).map(move |x| (z, y, x)))).map(|(z, y, x)| id(wz * w[0] + z, wy * w[1] + y, wx * w[2] + x)).collect();
                for a in &ids {
                    for b in &ids {
                        out.push(if a == b { 0.0 } else { -100.0 });
                    }
                }
            }
        }
    }
    out
}
