//! nnU-Net's `PlainConvUNet` (dynamic_network_architectures 0.4, as nnU-Net v2 builds it from
//! a plan): per stage `n_conv` × (conv → InstanceNorm → LeakyReLU), the first conv of a stage
//! carrying its stride; a decoder of transposed convolutions (kernel = stride), concatenation
//! with the skip, `n_conv_dec` × the same block, and a 1×1 head per decoder stage (deep
//! supervision, full resolution first). Convolutions have biases (`conv_bias=True` in nnU-Net's
//! plans); norms are `InstanceNorm3d(eps=1e-5, affine=True)`.
//!
//! State-dict keys are the reference's, duplicates included: each block is registered twice
//! (`convs.{c}.conv` and `convs.{c}.all_modules.0`), and the decoder holds the encoder
//! (`decoder.encoder.…`); loading accepts the duplicates and exporting writes them, so a
//! PyTorch `load_state_dict(strict=True)` takes our files.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use stu_core::strides::Stride;
use stu_engine::burn;
use stu_engine::burn::module::{Module, Param};
use stu_engine::burn::nn::Initializer;
use stu_engine::checkpoint::{CheckpointError, NamedTensor, StateDict};
use stu_engine::model::{InputRule, LoadOptions, ModelEntry, NetSpec, PresetSummary, SegNet};
use stu_engine::ops::{self, Layout};
use stu_engine::{Device, Tensor};

use stu_engine::train::InitRules;
use crate::parts::{Builder, check_keys, named, options};
use crate::stunet::{InstanceNorm3d, Macs, TOTALSEG_CLASSES};

/// Registry name.
pub const NAME: &str = "nnunet-plainconv";

/// nnU-Net's feature cap for 3-D networks.
pub const MAX_FEATURES: usize = 320;

/// Everything that fixes a PlainConvUNet's shape (nnU-Net's `arch_kwargs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlainArch {
    /// Input channels.
    pub in_channels: usize,
    /// Output classes, background included.
    pub num_classes: usize,
    /// Features per stage.
    pub features: Vec<usize>,
    /// Kernel size per stage (odd).
    pub kernels: Vec<Stride>,
    /// Stride per stage; stage 0's is `[1, 1, 1]`.
    pub strides: Vec<Stride>,
    /// Convolutions per encoder stage.
    pub n_conv: Vec<usize>,
    /// Convolutions per decoder stage, deepest first (stages − 1 entries).
    pub n_conv_dec: Vec<usize>,
}

impl PlainArch {
    /// nnU-Net's defaults for a plan's downsampling strides: `min(32·2^s, 320)` features, 3³
    /// kernels, two convolutions per stage in encoder and decoder.
    pub fn nnunet_default(in_channels: usize, num_classes: usize, downsampling: &[Stride]) -> Self {
        let n = downsampling.len() + 1;
        Self {
            in_channels,
            num_classes,
            features: widths(n, 32, MAX_FEATURES),
            kernels: vec![[3; 3]; n],
            strides: std::iter::once([1; 3]).chain(downsampling.iter().copied()).collect(),
            n_conv: vec![2; n],
            n_conv_dec: vec![2; n - 1],
        }
    }

    fn stages(&self) -> usize {
        self.features.len()
    }

    /// Checks lengths and values; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        self.decoder_shape().validate(self.in_channels, ("n_conv", &self.n_conv))
    }

    /// Per-axis divisor of valid inputs.
    pub fn input_divisor(&self) -> Stride {
        stu_core::strides::divisor(&self.strides)
    }

    /// Every state-dict key with its shape, in the reference's order, duplicates included.
    pub fn keys(&self) -> Vec<(String, Vec<usize>)> {
        let mut enc = Vec::new();
        for s in 0..self.stages() {
            let cin = if s == 0 { self.in_channels } else { self.features[s - 1] };
            for c in 0..self.n_conv[s] {
                block_keys(&mut enc, &format!("encoder.stages.{s}.0.convs.{c}"), if c == 0 { cin } else { self.features[s] }, self.features[s], self.kernels[s]);
            }
        }
        let mut out = enc.clone();
        out.extend(enc.into_iter().map(|(k, v)| (format!("decoder.{k}"), v)));
        decoder_keys(&mut out, &self.decoder_shape());
        out
    }

    fn decoder_shape(&self) -> DecoderShape<'_> {
        DecoderShape { features: &self.features, kernels: &self.kernels, strides: &self.strides, n_conv_dec: &self.n_conv_dec, num_classes: self.num_classes }
    }

    /// Multiply-accumulates of one deep-supervision forward at batch 1: convolution weights
    /// (what torch's FlopCounterMode counts, ×2), and with one add per output value for the
    /// bias (the rule `macs_128` uses for STU-Net).
    pub fn macs(&self, input: [usize; 3]) -> Macs {
        let n = self.stages();
        let res = stage_extents(input, &self.strides);
        let vox = |r: [usize; 3]| r.iter().map(|&v| v as u64).product::<u64>();
        let kv = |k: Stride| (k[0] * k[1] * k[2]) as u64;
        // (output values, multiply-adds per output value)
        let mut layers: Vec<(u64, u64)> = Vec::new();
        for (s, &r) in res.iter().enumerate().take(n) {
            let cin = if s == 0 { self.in_channels } else { self.features[s - 1] };
            for c in 0..self.n_conv[s] {
                let ci = if c == 0 { cin } else { self.features[s] } as u64;
                layers.push((vox(r) * self.features[s] as u64, ci * kv(self.kernels[s])));
            }
        }
        decoder_layers(&mut layers, &self.decoder_shape(), &res);
        let weights = layers.iter().map(|(o, m)| o * m).sum();
        let bias: u64 = layers.iter().map(|(o, _)| o).sum();
        Macs { weights, with_bias: weights + bias }
    }
}

/// What fixes the shape of nnU-Net's `UNetDecoder` (shared by PlainConvUNet and
/// ResidualEncoderUNet): the encoder's features, kernels and strides per stage.
pub(crate) struct DecoderShape<'a> {
    pub(crate) features: &'a [usize],
    pub(crate) kernels: &'a [Stride],
    pub(crate) strides: &'a [Stride],
    pub(crate) n_conv_dec: &'a [usize],
    pub(crate) num_classes: usize,
}

impl DecoderShape<'_> {
    /// Checks what both nnU-Net U-Nets share (and `per_stage`, the encoder's count per stage,
    /// by its field name); the message names the field.
    pub(crate) fn validate(&self, in_channels: usize, (field, per_stage): (&str, &[usize])) -> Result<(), String> {
        let n = self.features.len();
        if n < 2 {
            return Err("`features`: at least two stages".into());
        }
        for (name, len) in [("kernels", self.kernels.len()), ("strides", self.strides.len()), (field, per_stage.len())] {
            if len != n {
                return Err(format!("`{name}` has {len} entries, `features` {n}"));
            }
        }
        if self.n_conv_dec.len() != n - 1 {
            return Err(format!("`n_conv_dec` has {} entries; expected stages − 1 = {}", self.n_conv_dec.len(), n - 1));
        }
        if self.kernels.iter().flatten().any(|&k| k % 2 == 0) {
            return Err(format!("`kernels` must be odd, got {:?}", self.kernels));
        }
        if self.strides[0] != [1; 3] || self.strides.iter().flatten().any(|&s| s == 0) {
            return Err(format!("`strides`: stage 0 must be [1, 1, 1] and none 0, got {:?}", self.strides));
        }
        if per_stage.iter().chain(self.n_conv_dec).any(|&c| c == 0) || self.features.contains(&0) || in_channels == 0 || self.num_classes == 0 {
            return Err("counts must be positive".into());
        }
        Ok(())
    }
}

/// Each stage's extent for an `input` extent (ceil division by the cumulative strides).
pub(crate) fn stage_extents(input: [usize; 3], strides: &[Stride]) -> Vec<[usize; 3]> {
    let mut r = input;
    strides
        .iter()
        .map(|s| {
            r = [0, 1, 2].map(|a| r[a].div_ceil(s[a]));
            r
        })
        .collect()
}

/// `--strides` against a checkpoint's (its transposed convolutions'), unless they come from a
/// plan (which fits them to the stage count).
pub(crate) fn check_strides(dict: &StateDict, options: &LoadOptions, strides: &[Stride]) -> Result<(), CheckpointError> {
    match &options.strides {
        Some(s) if !options.from_plan && *s != strides[1..] => Err(CheckpointError::Architecture {
            path: dict.path().to_path_buf(),
            reason: format!("--strides {s:?} disagree with the checkpoint's transposed convolutions {:?}", &strides[1..]),
        }),
        _ => Ok(()),
    }
}

/// How many `{prefix}.{i}.` indices a state dict has, from 0.
pub(crate) fn count_indices(dict: &StateDict, prefix: &str) -> usize {
    let mut i = 0;
    while dict.keys().any(|k| k.starts_with(&format!("{prefix}.{i}."))) {
        i += 1;
    }
    i
}

/// The decoder's part of an architecture from a state dict of `n` stages: convs per decoder
/// stage, strides (stage 0's `[1, 1, 1]` first, read from the transposed convolutions) and
/// classes.
pub(crate) fn infer_decoder(dict: &StateDict, n: usize) -> Result<(Vec<usize>, Vec<Stride>, usize), CheckpointError> {
    let mut n_conv_dec = Vec::new();
    let mut strides = vec![[1; 3]];
    for u in 0..n - 1 {
        n_conv_dec.push(count_indices(dict, &format!("decoder.stages.{u}.convs")));
        let t = dict.shape(&format!("decoder.transpconvs.{u}.weight"))?;
        if t.len() != 5 {
            return Err(CheckpointError::Architecture { path: dict.path().to_path_buf(), reason: format!("`decoder.transpconvs.{u}.weight` has shape {t:?}") });
        }
        strides.insert(1, [t[2], t[3], t[4]]); // deepest first in the decoder
    }
    Ok((n_conv_dec, strides, dict.shape("decoder.seg_layers.0.weight")?[0]))
}

/// nnU-Net's widths: `base·2^s`, capped at `max`.
pub(crate) fn widths(n: usize, base: usize, max: usize) -> Vec<usize> {
    (0..n).map(|s| (base << s).min(max)).collect()
}

/// The summary `stu zoo` lists for a network of either nnU-Net family.
pub(crate) fn summary(name: &'static str, preset: &'static str, blocks: Vec<usize>, widths: Vec<usize>, params: usize, tensors: usize, macs: Macs) -> PresetSummary {
    PresetSummary {
        name: name.to_string(),
        model: name,
        preset,
        blocks,
        widths,
        params: params as u64,
        state_dict_tensors: tensors,
        macs_128: macs.with_bias,
        macs_128_variants: BTreeMap::from([("weights_only", macs.weights)]),
    }
}

/// The decoder's state-dict keys (stages, transposed convolutions, heads), in the reference's
/// order.
pub(crate) fn decoder_keys(out: &mut Vec<(String, Vec<usize>)>, d: &DecoderShape<'_>) {
    let n = d.features.len();
    for u in 0..n - 1 {
        let level = n - 2 - u;
        let c = d.features[level];
        for i in 0..d.n_conv_dec[u] {
            block_keys(out, &format!("decoder.stages.{u}.convs.{i}"), if i == 0 { 2 * c } else { c }, c, d.kernels[level]);
        }
    }
    for u in 0..n - 1 {
        let (below, c, s) = (d.features[n - 1 - u], d.features[n - 2 - u], d.strides[n - 1 - u]);
        out.push((format!("decoder.transpconvs.{u}.weight"), vec![below, c, s[0], s[1], s[2]]));
        out.push((format!("decoder.transpconvs.{u}.bias"), vec![c]));
    }
    for u in 0..n - 1 {
        out.push((format!("decoder.seg_layers.{u}.weight"), vec![d.num_classes, d.features[n - 2 - u], 1, 1, 1]));
        out.push((format!("decoder.seg_layers.{u}.bias"), vec![d.num_classes]));
    }
}

/// The decoder's layers as (output values, multiply-adds per output value), `res` the encoder
/// stages' extents.
pub(crate) fn decoder_layers(layers: &mut Vec<(u64, u64)>, d: &DecoderShape<'_>, res: &[[usize; 3]]) {
    let n = d.features.len();
    let vox = |r: [usize; 3]| r.iter().map(|&v| v as u64).product::<u64>();
    let kv = |k: Stride| (k[0] * k[1] * k[2]) as u64;
    for u in 0..n - 1 {
        let level = n - 2 - u;
        let (c, v) = (d.features[level] as u64, vox(res[level]));
        // Transposed conv with kernel = stride: each output value sums Cin inputs.
        layers.push((v * c, d.features[level + 1] as u64));
        for i in 0..d.n_conv_dec[u] {
            let ci = if i == 0 { 2 * c } else { c };
            layers.push((v * c, ci * kv(d.kernels[level])));
        }
        layers.push((v * d.num_classes as u64, c));
    }
}

pub(crate) fn block_keys(out: &mut Vec<(String, Vec<usize>)>, key: &str, cin: usize, c: usize, k: Stride) {
    let w = vec![c, cin, k[0], k[1], k[2]];
    out.push((format!("{key}.conv.weight"), w.clone()));
    out.push((format!("{key}.conv.bias"), vec![c]));
    out.push((format!("{key}.norm.weight"), vec![c]));
    out.push((format!("{key}.norm.bias"), vec![c]));
    out.push((format!("{key}.all_modules.0.weight"), w));
    out.push((format!("{key}.all_modules.0.bias"), vec![c]));
    out.push((format!("{key}.all_modules.1.weight"), vec![c]));
    out.push((format!("{key}.all_modules.1.bias"), vec![c]));
}

/// A convolution with bias (any odd kernel).
#[derive(Module, Debug)]
pub struct Conv {
    /// `[Cout, Cin, kd, kh, kw]`.
    pub weight: Param<Tensor<5>>,
    /// `[Cout]`.
    pub bias: Param<Tensor<1>>,
    /// Stride.
    #[module(skip)]
    pub stride: Stride,
}

/// `ConvDropoutNormReLU` without dropout: conv → InstanceNorm → LeakyReLU(0.01).
#[derive(Module, Debug)]
pub struct ConvNormAct {
    /// The convolution.
    pub conv: Conv,
    /// The norm.
    pub norm: InstanceNorm3d,
}

impl ConvNormAct {
    pub(crate) fn forward(&self, x: Tensor<5>, l: Layout) -> Tensor<5> {
        let y = ops::conv3d_normed(x, self.conv.weight.val(), self.conv.bias.val(), self.conv.stride, l);
        ops::norm_act(y, self.norm.weight.val(), self.norm.bias.val(), true, l)
    }
}

/// Transposed convolution, kernel = stride.
#[derive(Module, Debug)]
pub struct TranspConv {
    /// `[Cin, Cout, s0, s1, s2]`.
    pub weight: Param<Tensor<5>>,
    /// `[Cout]`.
    pub bias: Param<Tensor<1>>,
}

/// The network.
#[derive(Module, Debug)]
pub struct PlainConvUNet {
    /// Encoder stages (blocks).
    pub encoder: Vec<Vec<ConvNormAct>>,
    /// Decoder stages, deepest first.
    pub decoder: Vec<Vec<ConvNormAct>>,
    /// Upsampling, deepest first.
    pub transpconvs: Vec<TranspConv>,
    /// Heads, deepest first.
    pub seg_layers: Vec<Conv>,
    /// The architecture.
    #[module(skip)]
    pub arch: PlainArch,
    /// How each parameter was declared to be drawn (fresh networks; `seeded_init`).
    #[module(skip)]
    pub init: InitRules,
}

/// The decoder's parts: stages, transposed convolutions and heads, deepest first.
pub(crate) type DecoderParts = (Vec<Vec<ConvNormAct>>, Vec<TranspConv>, Vec<Conv>);

/// PlainConvUNet's layers, made by the shared [`Builder`].
pub(crate) trait PlainBuild {
    fn conv(&self, key: &str, cin: usize, cout: usize, k: Stride, stride: Stride) -> Result<Conv, CheckpointError>;
    fn block(&self, key: &str, cin: usize, c: usize, k: Stride, stride: Stride) -> Result<ConvNormAct, CheckpointError>;
    fn decoder(&self, d: &DecoderShape<'_>) -> Result<DecoderParts, CheckpointError>;
    fn build(&self, a: &PlainArch) -> Result<PlainConvUNet, CheckpointError>;
}

impl PlainBuild for Builder<'_> {
    fn conv(&self, key: &str, cin: usize, cout: usize, k: Stride, stride: Stride) -> Result<Conv, CheckpointError> {
        Ok(Conv {
            weight: self.tensor(&format!("{key}.weight"), [cout, cin, k[0], k[1], k[2]], Self::he())?,
            bias: self.tensor(&format!("{key}.bias"), [cout], Initializer::Zeros)?,
            stride,
        })
    }

    fn block(&self, key: &str, cin: usize, c: usize, k: Stride, stride: Stride) -> Result<ConvNormAct, CheckpointError> {
        Ok(ConvNormAct {
            conv: self.conv(&format!("{key}.conv"), cin, c, k, stride)?,
            norm: InstanceNorm3d {
                weight: self.tensor(&format!("{key}.norm.weight"), [c], Initializer::Ones)?,
                bias: self.tensor(&format!("{key}.norm.bias"), [c], Initializer::Zeros)?,
            },
        })
    }

    fn decoder(&self, d: &DecoderShape<'_>) -> Result<DecoderParts, CheckpointError> {
        let (n, f) = (d.features.len(), d.features);
        let decoder = (0..n - 1)
            .map(|u| {
                let level = n - 2 - u;
                let c = f[level];
                (0..d.n_conv_dec[u])
                    .map(|i| self.block(&format!("decoder.stages.{u}.convs.{i}"), if i == 0 { 2 * c } else { c }, c, d.kernels[level], [1; 3]))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<_, _>>()?;
        let transpconvs = (0..n - 1)
            .map(|u| {
                let (below, c, s) = (f[n - 1 - u], f[n - 2 - u], d.strides[n - 1 - u]);
                Ok(TranspConv {
                    weight: self.tensor(&format!("decoder.transpconvs.{u}.weight"), [below, c, s[0], s[1], s[2]], Self::he())?,
                    bias: self.tensor(&format!("decoder.transpconvs.{u}.bias"), [c], Initializer::Zeros)?,
                })
            })
            .collect::<Result<_, CheckpointError>>()?;
        let seg_layers = (0..n - 1)
            .map(|u| self.conv(&format!("decoder.seg_layers.{u}"), f[n - 2 - u], d.num_classes, [1; 3], [1; 3]))
            .collect::<Result<_, _>>()?;
        Ok((decoder, transpconvs, seg_layers))
    }

    fn build(&self, a: &PlainArch) -> Result<PlainConvUNet, CheckpointError> {
        let n = a.stages();
        let f = &a.features;
        let encoder = (0..n)
            .map(|s| {
                let cin = if s == 0 { a.in_channels } else { f[s - 1] };
                (0..a.n_conv[s])
                    .map(|c| {
                        let (ci, st) = if c == 0 { (cin, a.strides[s]) } else { (f[s], [1; 3]) };
                        self.block(&format!("encoder.stages.{s}.0.convs.{c}"), ci, f[s], a.kernels[s], st)
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<_, _>>()?;
        let (decoder, transpconvs, seg_layers) = self.decoder(&a.decoder_shape())?;
        Ok(PlainConvUNet { encoder, decoder, transpconvs, seg_layers, arch: a.clone(), init: InitRules::default() })
    }
}

impl PlainConvUNet {
    /// A freshly initialised network.
    pub fn new(arch: &PlainArch, device: &Device) -> Result<Self, String> {
        arch.validate()?;
        let b = Builder::fresh(device);
        let net = b.build(arch).map_err(|e| e.to_string())?;
        Ok(Self { init: b.into_rules(), ..net })
    }

    /// From an nnU-Net v2 state dict (any container): the architecture comes from the tensor
    /// shapes (kernels from the conv weights, strides from the transposed convolutions), every
    /// key is checked, and unknown keys are refused.
    pub fn from_state_dict(dict: &StateDict, options: &LoadOptions, device: &Device) -> Result<Self, CheckpointError> {
        // nnU-Net's `2d` networks load as the 3-D network of depth-1 kernels they equal.
        let lifted = dict.lifted_2d();
        let dict = lifted.as_ref().unwrap_or(dict);
        let arch = infer_arch(dict)?;
        check_strides(dict, options, &arch.strides)?;
        // The duplicate registrations are optional on load (files written without them load
        // too); the canonical ones are required.
        check_keys(dict, &arch.keys(), NAME, |k| k.contains(".all_modules.") || k.starts_with("decoder.encoder."))?;
        Builder::reading(dict, device).build(&arch)
    }

    fn run(&self, x: Tensor<5>, deep_supervision: bool) -> Vec<Tensor<5>> {
        let l = Layout::for_device(&x.device());
        let mut x = l.from_ncdhw(x);
        let mut skips = Vec::new();
        for stage in &self.encoder {
            for b in stage {
                x = b.forward(x, l);
            }
            skips.push(x.clone());
        }
        decode(&self.decoder, &self.transpconvs, &self.seg_layers, skips, deep_supervision, l)
    }
}

/// nnU-Net's `UNetDecoder` forward over the encoder stages' outputs `skips` (shallowest first):
/// upsample, concatenate, the stage's blocks, a head per stage (deep supervision: all, full
/// resolution first; else the last).
pub(crate) fn decode(decoder: &[Vec<ConvNormAct>], transpconvs: &[TranspConv], seg_layers: &[Conv], mut skips: Vec<Tensor<5>>, deep_supervision: bool, l: Layout) -> Vec<Tensor<5>> {
    let mut lres = skips.pop().expect("stages ≥ 2");
    let mut outs = Vec::new();
    let n = decoder.len();
    for (u, stage) in decoder.iter().enumerate() {
        let t = &transpconvs[u];
        let up = ops::conv_transpose_ks(lres, t.weight.val(), t.bias.val(), l);
        let skip = skips.pop().expect("one skip per decoder stage");
        let mut y = Tensor::cat(vec![up, skip], l.channel_axis());
        for b in stage {
            y = b.forward(y, l);
        }
        if deep_supervision || u == n - 1 {
            let h = &seg_layers[u];
            outs.push(ops::head_to_ncdhw(y.clone(), h.weight.val(), h.bias.val(), l));
        }
        lres = y;
    }
    outs.reverse();
    outs
}


pub(crate) fn block_tensors(out: &mut Vec<NamedTensor>, key: &str, b: &ConvNormAct) {
    let (w, bias, g, beta) = (b.conv.weight.val(), b.conv.bias.val(), b.norm.weight.val(), b.norm.bias.val());
    out.push(named(format!("{key}.conv.weight"), w.clone()));
    out.push(named(format!("{key}.conv.bias"), bias.clone()));
    out.push(named(format!("{key}.norm.weight"), g.clone()));
    out.push(named(format!("{key}.norm.bias"), beta.clone()));
    out.push(named(format!("{key}.all_modules.0.weight"), w));
    out.push(named(format!("{key}.all_modules.0.bias"), bias));
    out.push(named(format!("{key}.all_modules.1.weight"), g));
    out.push(named(format!("{key}.all_modules.1.bias"), beta));
}

impl SegNet for PlainConvUNet {
    fn init_rules(&self) -> Option<&InitRules> {
        Some(&self.init)
    }
    fn family(&self) -> &'static str {
        NAME
    }
    fn in_channels(&self) -> usize {
        self.arch.in_channels
    }
    fn num_classes(&self) -> usize {
        self.arch.num_classes
    }
    fn input_divisor(&self) -> Stride {
        self.arch.input_divisor()
    }
    fn forward_ds(&self, x: Tensor<5>) -> Vec<Tensor<5>> {
        self.run(x, true)
    }
    fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        self.run(x, false).pop().expect("one output")
    }
    fn state_dict(&self) -> Vec<NamedTensor> {
        let mut enc = Vec::new();
        for (s, stage) in self.encoder.iter().enumerate() {
            for (c, b) in stage.iter().enumerate() {
                block_tensors(&mut enc, &format!("encoder.stages.{s}.0.convs.{c}"), b);
            }
        }
        let mut out = enc.clone();
        out.extend(enc.into_iter().map(|t| NamedTensor { name: format!("decoder.{}", t.name), ..t }));
        decoder_tensors(&mut out, &self.decoder, &self.transpconvs, &self.seg_layers);
        out
    }
    fn num_params(&self) -> usize {
        Module::num_params(self)
    }
    stu_engine::segnet_training_hooks!();
    fn vectors_stay_f32(&self) -> bool {
        true // conv biases and instance-norm affine parameters only
    }

    fn describe(&self) -> serde_json::Value {
        let a = &self.arch;
        serde_json::json!({
            "model": NAME,
            "in_channels": a.in_channels,
            "num_classes": a.num_classes,
            "features": a.features,
            "kernels": a.kernels,
            "strides": a.strides,
            "n_conv": a.n_conv,
            "n_conv_dec": a.n_conv_dec,
            "params": Module::num_params(self),
            "macs_128": a.macs([128; 3]).with_bias,
            "options": {"features": a.features, "kernels": a.kernels, "n_conv": a.n_conv, "n_conv_dec": a.n_conv_dec},
        })
    }
}

/// The decoder's tensors under the reference's keys.
pub(crate) fn decoder_tensors(out: &mut Vec<NamedTensor>, decoder: &[Vec<ConvNormAct>], transpconvs: &[TranspConv], seg_layers: &[Conv]) {
    for (u, stage) in decoder.iter().enumerate() {
        for (i, b) in stage.iter().enumerate() {
            block_tensors(out, &format!("decoder.stages.{u}.convs.{i}"), b);
        }
    }
    for (u, t) in transpconvs.iter().enumerate() {
        out.push(named(format!("decoder.transpconvs.{u}.weight"), t.weight.val()));
        out.push(named(format!("decoder.transpconvs.{u}.bias"), t.bias.val()));
    }
    for (u, h) in seg_layers.iter().enumerate() {
        out.push(named(format!("decoder.seg_layers.{u}.weight"), h.weight.val()));
        out.push(named(format!("decoder.seg_layers.{u}.bias"), h.bias.val()));
    }
}

/// The architecture from an nnU-Net v2 state dict's shapes.
pub fn infer_arch(dict: &StateDict) -> Result<PlainArch, CheckpointError> {
    let err = |reason: String| CheckpointError::Architecture { path: dict.path().to_path_buf(), reason };
    let n = count_indices(dict, "encoder.stages");
    if n < 2 {
        return Err(err(format!("{n} encoder stage(s) under `encoder.stages`; a U-Net needs two or more")));
    }
    let (n_conv_dec, strides, num_classes) = infer_decoder(dict, n)?;
    let mut arch = PlainArch { in_channels: 0, num_classes, features: vec![], kernels: vec![], strides, n_conv: vec![], n_conv_dec };
    for s in 0..n {
        let c = count_indices(dict, &format!("encoder.stages.{s}.0.convs"));
        let w = dict.shape(&format!("encoder.stages.{s}.0.convs.0.conv.weight"))?;
        if w.len() != 5 {
            return Err(err(format!("`encoder.stages.{s}.0.convs.0.conv.weight` has shape {w:?}; a 3-D conv weight has 5 axes")));
        }
        if s == 0 {
            arch.in_channels = w[1];
        }
        arch.features.push(w[0]);
        arch.kernels.push([w[2], w[3], w[4]]);
        arch.n_conv.push(c);
    }
    arch.validate().map_err(err)?;
    Ok(arch)
}

/// Size options of `NetSpec::options`: all optional; missing ones take nnU-Net's defaults. The
/// scaling rule: `base_width` (32) doubles per stage up to `max_width` (320); `blocks` sets
/// every stage's convolutions (2), encoder and decoder alike.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlainOptions {
    /// Width of stage 0.
    pub base_width: Option<usize>,
    /// Width cap.
    pub max_width: Option<usize>,
    /// Convolutions per stage, everywhere.
    pub blocks: Option<usize>,
    /// Features per stage.
    pub features: Option<Vec<usize>>,
    /// Kernel size per stage.
    pub kernels: Option<Vec<Stride>>,
    /// Convolutions per encoder stage.
    pub n_conv: Option<Vec<usize>>,
    /// Convolutions per decoder stage, deepest first.
    pub n_conv_dec: Option<Vec<usize>>,
}

impl PlainOptions {
    fn sizes(&self) -> SizeOptions<'_> {
        SizeOptions { base_width: self.base_width, max_width: self.max_width, blocks: self.blocks, blocks_in_decoder: true, features: &self.features, kernels: &self.kernels, encoder: &self.n_conv, n_conv_dec: &self.n_conv_dec }
    }
}

/// The size options PlainConvUNet and ResEnc share, borrowed from either's own struct (their
/// per-stage encoder list is `n_conv` in one, `n_blocks` in the other).
pub(crate) struct SizeOptions<'a> {
    pub base_width: Option<usize>,
    pub max_width: Option<usize>,
    pub blocks: Option<usize>,
    /// Whether `blocks` sets the decoder's convolutions too (PlainConvUNet's).
    pub blocks_in_decoder: bool,
    pub features: &'a Option<Vec<usize>>,
    pub kernels: &'a Option<Vec<Stride>>,
    pub encoder: &'a Option<Vec<usize>>,
    pub n_conv_dec: &'a Option<Vec<usize>>,
}

impl SizeOptions<'_> {
    /// Overrides a network's defaults: the scaling rule first, then any explicit lists.
    pub fn apply(&self, features: &mut Vec<usize>, kernels: &mut Vec<Stride>, encoder: &mut Vec<usize>, n_conv_dec: &mut Vec<usize>) {
        let n = features.len();
        if self.base_width.is_some() || self.max_width.is_some() {
            *features = widths(n, self.base_width.unwrap_or(32), self.max_width.unwrap_or(MAX_FEATURES));
        }
        if let Some(b) = self.blocks {
            *encoder = vec![b; n];
            if self.blocks_in_decoder {
                *n_conv_dec = vec![b; n - 1];
            }
        }
        for (list, given) in [(features, self.features), (encoder, self.encoder), (n_conv_dec, self.n_conv_dec)] {
            if let Some(v) = given {
                list.clone_from(v);
            }
        }
        if let Some(k) = self.kernels {
            kernels.clone_from(k);
        }
    }

    /// `spec` with 2³ strides for the stage count the first given per-stage list implies (else
    /// as it is, or with five 2³ strides when it has none): what spec validation resolves, a
    /// plan's stage count being unknown before its data.
    pub fn for_check(&self, spec: &NetSpec) -> NetSpec {
        let lists = [self.features.as_ref().map(Vec::len), self.kernels.as_ref().map(Vec::len), self.encoder.as_ref().map(Vec::len), self.n_conv_dec.as_ref().map(|v| v.len() + 1)];
        let stages = match lists.into_iter().flatten().next() {
            Some(n) => n,
            None if !spec.strides.is_empty() => return spec.clone(),
            None => 6,
        };
        NetSpec { strides: vec![[2; 3]; stages.saturating_sub(1)], ..spec.clone() }
    }
}

/// The architecture a `NetSpec` asks for.
pub fn arch_of(spec: &NetSpec) -> Result<PlainArch, String> {
    arch_with(spec, &options(spec, NAME)?)
}

fn arch_with(spec: &NetSpec, o: &PlainOptions) -> Result<PlainArch, String> {
    let mut a = PlainArch::nnunet_default(spec.in_channels, spec.num_classes, &spec.strides);
    o.sizes().apply(&mut a.features, &mut a.kernels, &mut a.n_conv, &mut a.n_conv_dec);
    a.validate().map_err(|e| format!("model options for `{NAME}`: {e}"))?;
    Ok(a)
}

fn build_boxed(spec: &NetSpec, device: &Device) -> Result<Box<dyn SegNet>, String> {
    Ok(Box::new(PlainConvUNet::new(&arch_of(spec)?, device)?))
}

/// [`arch_of`] with as many stages as the options' per-stage lists give (a plan's stage count
/// is not known before its data), else as `spec.strides` (six when there are none).
fn check_options(spec: &NetSpec) -> Result<InputRule, String> {
    let o: PlainOptions = options(spec, NAME)?;
    arch_with(&o.sizes().for_check(spec), &o).map(|_| InputRule::default())
}

fn load_boxed(dict: &StateDict, options: &LoadOptions, device: &Device) -> Result<Box<dyn SegNet>, CheckpointError> {
    Ok(Box::new(PlainConvUNet::from_state_dict(dict, options, device)?))
}

/// nnU-Net's 3d_fullres network for a 128³ isotropic patch: 6 stages, five 2³ downsamplings.
pub fn default_arch() -> PlainArch {
    PlainArch::nnunet_default(1, TOTALSEG_CLASSES, &[[2; 3]; 5])
}

fn preset_summaries() -> Vec<PresetSummary> {
    let device = stu_engine::backend::Backend::default_compiled().and_then(|b| b.device().ok()).unwrap_or_default();
    let arch = default_arch();
    let net = PlainConvUNet::new(&arch, &device).expect("the default is valid");
    vec![summary(NAME, "3d_fullres", arch.n_conv.clone(), arch.features.clone(), Module::num_params(&net), arch.keys().len(), arch.macs([128; 3]))]
}

inventory::submit! {
    ModelEntry {
        name: NAME,
        summary: "nnU-Net's PlainConvUNet (conv–norm–lrelu ×2 per stage, transposed-conv upsampling, deep supervision), built from a plan",
        module_path: module_path!(),
        revision: 0,
        anchor_key: "decoder.seg_layers.0.weight",
        presets: preset_summaries,
        load: load_boxed,
        build: build_boxed,
        check: check_options,
    }
}
