//! nnU-Net's `ResidualEncoderUNet` (dynamic_network_architectures 0.4, the network of nnU-Net's
//! ResEnc M/L/XL presets, nnU-Net ≥ 2.4): a stem (conv → InstanceNorm → LeakyReLU), then per
//! stage `n_blocks` ResNet-D basic blocks (conv–norm–lrelu, conv–norm, plus a skip that is
//! average-pooled by the block's stride and projected by a bias-free 1×1×1 conv + norm when the
//! width changes, then LeakyReLU), the first block of a stage carrying its stride; the decoder is
//! PlainConvUNet's (`plainconv::decode`: transposed convolutions, concatenation, `n_conv_dec`
//! conv blocks, a 1×1 head per stage).
//!
//! State-dict keys are the reference's, duplicates included (`all_modules.*`, the decoder's
//! copy of the encoder under `decoder.encoder.`), as for PlainConvUNet.

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
use crate::plainconv::{self, ConvNormAct, DecoderShape, MAX_FEATURES, PlainBuild, TranspConv, block_keys, block_tensors};
use crate::stunet::{InstanceNorm3d, Macs, TOTALSEG_CLASSES};

/// Registry name.
pub const NAME: &str = "nnunet-resenc";

/// Everything that fixes a ResidualEncoderUNet's shape (nnU-Net's `arch_kwargs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResEncArch {
    /// Input channels.
    pub in_channels: usize,
    /// Output classes, background included.
    pub num_classes: usize,
    /// Features per stage (the stem's are stage 0's).
    pub features: Vec<usize>,
    /// Kernel size per stage (odd).
    pub kernels: Vec<Stride>,
    /// Stride per stage; stage 0's is `[1, 1, 1]`.
    pub strides: Vec<Stride>,
    /// Residual blocks per encoder stage.
    pub n_blocks: Vec<usize>,
    /// Convolutions per decoder stage, deepest first (stages − 1 entries).
    pub n_conv_dec: Vec<usize>,
}

impl ResEncArch {
    /// nnU-Net's ResEnc presets for a plan's downsampling strides: `min(32·2^s, 320)` features,
    /// 3³ kernels, blocks 1, 3, 4, 6, 6, 6, … per encoder stage, one conv per decoder stage.
    pub fn nnunet(in_channels: usize, num_classes: usize, downsampling: &[Stride]) -> Self {
        let n = downsampling.len() + 1;
        Self {
            in_channels,
            num_classes,
            features: plainconv::widths(n, 32, MAX_FEATURES),
            kernels: vec![[3; 3]; n],
            strides: std::iter::once([1; 3]).chain(downsampling.iter().copied()).collect(),
            n_blocks: (0..n).map(stu_core::scaling::resenc_blocks).collect(),
            n_conv_dec: vec![1; n - 1],
        }
    }

    fn stages(&self) -> usize {
        self.features.len()
    }

    /// Checks lengths and values; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        self.decoder_shape().validate(self.in_channels, ("n_blocks", &self.n_blocks))
    }

    /// Per-axis divisor of valid inputs.
    pub fn input_divisor(&self) -> Stride {
        stu_core::strides::divisor(&self.strides)
    }

    fn decoder_shape(&self) -> DecoderShape<'_> {
        DecoderShape { features: &self.features, kernels: &self.kernels, strides: &self.strides, n_conv_dec: &self.n_conv_dec, num_classes: self.num_classes }
    }

    /// Stage `s` block `b`: input channels, stride, and the skip's key index (`Some(0)` a
    /// projection, `Some(1)` pooled then projected, `None` no projection).
    fn block_io(&self, s: usize, b: usize) -> (usize, Stride, Option<usize>) {
        let (cin, stride) = if b > 0 { (self.features[s], [1; 3]) } else { (self.features[s.saturating_sub(1)], self.strides[s]) };
        let proj = (cin != self.features[s]).then_some(usize::from(stride != [1; 3]));
        (cin, stride, proj)
    }

    /// Every state-dict key with its shape, in the reference's order, duplicates included.
    pub fn keys(&self) -> Vec<(String, Vec<usize>)> {
        let mut enc = Vec::new();
        block_keys(&mut enc, "encoder.stem.convs.0", self.in_channels, self.features[0], self.kernels[0]);
        for s in 0..self.stages() {
            let c = self.features[s];
            for b in 0..self.n_blocks[s] {
                let (cin, _, proj) = self.block_io(s, b);
                let key = format!("encoder.stages.{s}.blocks.{b}");
                block_keys(&mut enc, &format!("{key}.conv1"), cin, c, self.kernels[s]);
                block_keys(&mut enc, &format!("{key}.conv2"), c, c, self.kernels[s]);
                if let Some(i) = proj {
                    let k = format!("{key}.skip.{i}");
                    enc.push((format!("{k}.conv.weight"), vec![c, cin, 1, 1, 1]));
                    enc.push((format!("{k}.norm.weight"), vec![c]));
                    enc.push((format!("{k}.norm.bias"), vec![c]));
                    enc.push((format!("{k}.all_modules.0.weight"), vec![c, cin, 1, 1, 1]));
                    enc.push((format!("{k}.all_modules.1.weight"), vec![c]));
                    enc.push((format!("{k}.all_modules.1.bias"), vec![c]));
                }
            }
        }
        let mut out = enc.clone();
        out.extend(enc.into_iter().map(|(k, v)| (format!("decoder.{k}"), v)));
        plainconv::decoder_keys(&mut out, &self.decoder_shape());
        out
    }

    /// Multiply-accumulates of one deep-supervision forward at batch 1: convolution weights
    /// (what torch's FlopCounterMode counts, ×2), and with one add per output value for each
    /// convolution with a bias (the skips' projections have none).
    pub fn macs(&self, input: [usize; 3]) -> Macs {
        let n = self.stages();
        let res = plainconv::stage_extents(input, &self.strides);
        let vox = |r: [usize; 3]| r.iter().map(|&v| v as u64).product::<u64>();
        let kv = |k: Stride| (k[0] * k[1] * k[2]) as u64;
        // (output values, multiply-adds per output value), convolutions with a bias.
        let mut layers: Vec<(u64, u64)> = vec![(vox(res[0]) * self.features[0] as u64, self.in_channels as u64 * kv(self.kernels[0]))];
        let mut projections = 0u64;
        for (s, &r) in res.iter().enumerate().take(n) {
            let (c, v) = (self.features[s] as u64, vox(r));
            for b in 0..self.n_blocks[s] {
                let (cin, _, proj) = self.block_io(s, b);
                layers.push((v * c, cin as u64 * kv(self.kernels[s])));
                layers.push((v * c, c * kv(self.kernels[s])));
                if proj.is_some() {
                    projections += v * c * cin as u64;
                }
            }
        }
        plainconv::decoder_layers(&mut layers, &self.decoder_shape(), &res);
        let weights = layers.iter().map(|(o, m)| o * m).sum::<u64>() + projections;
        let bias: u64 = layers.iter().map(|(o, _)| o).sum();
        Macs { weights, with_bias: weights + bias }
    }
}

/// The skip's projection: a bias-free 1×1×1 convolution and its norm.
#[derive(Module, Debug)]
pub struct Projection {
    /// `[Cout, Cin, 1, 1, 1]`.
    pub weight: Param<Tensor<5>>,
    /// The norm.
    pub norm: InstanceNorm3d,
}

/// `BasicBlockD`: conv–norm–lrelu, conv–norm, plus the (pooled, projected) input, then lrelu.
#[derive(Module, Debug)]
pub struct BasicBlockD {
    /// First conv (carries the stride).
    pub conv1: ConvNormAct,
    /// Second conv (its norm ends the block with the skip and the activation).
    pub conv2: ConvNormAct,
    /// Projection of the skip when the width changes.
    pub skip: Option<Projection>,
    /// Average pooling of the skip (kernel = stride).
    #[module(skip)]
    pub pool: Stride,
}

/// Average pooling with kernel = stride = `s` (floor mode), one axis at a time, in layout `l`.
fn avg_pool(mut x: Tensor<5>, s: Stride, l: Layout) -> Tensor<5> {
    for (a, &k) in s.iter().enumerate() {
        if k == 1 {
            continue;
        }
        let axis = l.spatial_axis(a);
        let d = x.dims();
        let n = d[axis] / k;
        if n * k != d[axis] {
            x = x.narrow(axis, 0, n * k);
        }
        let mut six = [0usize; 6];
        for i in 0..5 {
            six[i + usize::from(i > axis)] = d[i];
        }
        six[axis] = n;
        six[axis + 1] = k;
        let mut five = d;
        five[axis] = n;
        x = x.reshape(six).mean_dim(axis + 1).reshape(five);
    }
    x
}

impl BasicBlockD {
    fn forward(&self, x: Tensor<5>, l: Layout) -> Tensor<5> {
        let y = self.conv1.forward(x.clone(), l);
        let c2 = &self.conv2;
        let y = ops::conv3d_normed(y, c2.conv.weight.val(), c2.conv.bias.val(), [1; 3], l);
        let mut skip = if self.pool != [1; 3] { avg_pool(x, self.pool, l) } else { x };
        if let Some(p) = &self.skip {
            let w = p.weight.val();
            let zero = Tensor::<1>::zeros([w.dims()[0]], &w.device());
            skip = ops::norm_act(ops::conv3d_normed(skip, w, zero, [1; 3], l), p.norm.weight.val(), p.norm.bias.val(), false, l);
        }
        ops::norm_add_act(y, c2.norm.weight.val(), c2.norm.bias.val(), skip, l)
    }
}

/// The network.
#[derive(Module, Debug)]
pub struct ResEncUNet {
    /// The stem.
    pub stem: ConvNormAct,
    /// Encoder stages (residual blocks).
    pub stages: Vec<Vec<BasicBlockD>>,
    /// Decoder stages, deepest first.
    pub decoder: Vec<Vec<ConvNormAct>>,
    /// Upsampling, deepest first.
    pub transpconvs: Vec<TranspConv>,
    /// Heads, deepest first.
    pub seg_layers: Vec<plainconv::Conv>,
    /// The architecture.
    #[module(skip)]
    pub arch: ResEncArch,
    /// How each parameter was declared to be drawn (fresh networks; `seeded_init`).
    #[module(skip)]
    pub init: InitRules,
}

fn build(b: &Builder<'_>, a: &ResEncArch) -> Result<ResEncUNet, CheckpointError> {
    let stem = b.block("encoder.stem.convs.0", a.in_channels, a.features[0], a.kernels[0], [1; 3])?;
    let stages = (0..a.stages())
        .map(|s| {
            (0..a.n_blocks[s])
                .map(|i| {
                    let (cin, stride, proj) = a.block_io(s, i);
                    let (c, key) = (a.features[s], format!("encoder.stages.{s}.blocks.{i}"));
                    let skip = match proj {
                        Some(j) => Some(Projection {
                            weight: b.tensor(&format!("{key}.skip.{j}.conv.weight"), [c, cin, 1, 1, 1], Builder::he())?,
                            norm: InstanceNorm3d {
                                weight: b.tensor(&format!("{key}.skip.{j}.norm.weight"), [c], Initializer::Ones)?,
                                bias: b.tensor(&format!("{key}.skip.{j}.norm.bias"), [c], Initializer::Zeros)?,
                            },
                        }),
                        None => None,
                    };
                    Ok(BasicBlockD {
                        conv1: b.block(&format!("{key}.conv1"), cin, c, a.kernels[s], stride)?,
                        conv2: b.block(&format!("{key}.conv2"), c, c, a.kernels[s], [1; 3])?,
                        skip,
                        pool: stride,
                    })
                })
                .collect::<Result<Vec<_>, CheckpointError>>()
        })
        .collect::<Result<_, _>>()?;
    let (decoder, transpconvs, seg_layers) = b.decoder(&a.decoder_shape())?;
    Ok(ResEncUNet { stem, stages, decoder, transpconvs, seg_layers, arch: a.clone(), init: InitRules::default() })
}

impl ResEncUNet {
    /// A freshly initialised network.
    pub fn new(arch: &ResEncArch, device: &Device) -> Result<Self, String> {
        arch.validate()?;
        let b = Builder::fresh(device);
        let net = build(&b, arch).map_err(|e| e.to_string())?;
        Ok(Self { init: b.into_rules(), ..net })
    }

    /// From an nnU-Net v2 state dict (any container): the architecture comes from the tensor
    /// shapes, every key is checked, unknown keys are refused.
    pub fn from_state_dict(dict: &StateDict, options: &LoadOptions, device: &Device) -> Result<Self, CheckpointError> {
        // nnU-Net's `2d` networks load as the 3-D network of depth-1 kernels they equal.
        let lifted = dict.lifted_2d();
        let dict = lifted.as_ref().unwrap_or(dict);
        let arch = infer_arch(dict)?;
        plainconv::check_strides(dict, options, &arch.strides)?;
        check_keys(dict, &arch.keys(), NAME, |k| k.contains(".all_modules.") || k.starts_with("decoder.encoder."))?;
        build(&Builder::reading(dict, device), &arch)
    }

    fn run(&self, x: Tensor<5>, deep_supervision: bool) -> Vec<Tensor<5>> {
        let l = Layout::for_device(&x.device());
        let mut x = self.stem.forward(l.from_ncdhw(x), l);
        let mut skips = Vec::new();
        for stage in &self.stages {
            for b in stage {
                x = b.forward(x, l);
            }
            skips.push(x.clone());
        }
        plainconv::decode(&self.decoder, &self.transpconvs, &self.seg_layers, skips, deep_supervision, l)
    }
}

impl SegNet for ResEncUNet {
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
        block_tensors(&mut enc, "encoder.stem.convs.0", &self.stem);
        for (s, stage) in self.stages.iter().enumerate() {
            for (i, b) in stage.iter().enumerate() {
                let key = format!("encoder.stages.{s}.blocks.{i}");
                block_tensors(&mut enc, &format!("{key}.conv1"), &b.conv1);
                block_tensors(&mut enc, &format!("{key}.conv2"), &b.conv2);
                if let Some(p) = &b.skip {
                    let k = format!("{key}.skip.{}", usize::from(b.pool != [1; 3]));
                    let (w, g, beta) = (p.weight.val(), p.norm.weight.val(), p.norm.bias.val());
                    enc.push(named(format!("{k}.conv.weight"), w.clone()));
                    enc.push(named(format!("{k}.norm.weight"), g.clone()));
                    enc.push(named(format!("{k}.norm.bias"), beta.clone()));
                    enc.push(named(format!("{k}.all_modules.0.weight"), w));
                    enc.push(named(format!("{k}.all_modules.1.weight"), g));
                    enc.push(named(format!("{k}.all_modules.1.bias"), beta));
                }
            }
        }
        let mut out = enc.clone();
        out.extend(enc.into_iter().map(|t| NamedTensor { name: format!("decoder.{}", t.name), ..t }));
        plainconv::decoder_tensors(&mut out, &self.decoder, &self.transpconvs, &self.seg_layers);
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
            "n_blocks": a.n_blocks,
            "n_conv_dec": a.n_conv_dec,
            "params": Module::num_params(self),
            "macs_128": a.macs([128; 3]).with_bias,
            "options": {"features": a.features, "kernels": a.kernels, "n_blocks": a.n_blocks, "n_conv_dec": a.n_conv_dec},
        })
    }
}

/// The architecture from an nnU-Net v2 state dict's shapes.
pub fn infer_arch(dict: &StateDict) -> Result<ResEncArch, CheckpointError> {
    let err = |reason: String| CheckpointError::Architecture { path: dict.path().to_path_buf(), reason };
    let n = plainconv::count_indices(dict, "encoder.stages");
    if n < 2 {
        return Err(err(format!("{n} encoder stage(s) under `encoder.stages`; a U-Net needs two or more")));
    }
    let stem = dict.shape("encoder.stem.convs.0.conv.weight")?;
    if stem.len() != 5 {
        return Err(err(format!("`encoder.stem.convs.0.conv.weight` has shape {stem:?}; a 3-D conv weight has 5 axes")));
    }
    let (n_conv_dec, strides, num_classes) = plainconv::infer_decoder(dict, n)?;
    let mut arch = ResEncArch { in_channels: stem[1], num_classes, features: vec![], kernels: vec![], strides, n_blocks: vec![], n_conv_dec };
    for s in 0..n {
        let w = dict.shape(&format!("encoder.stages.{s}.blocks.0.conv1.conv.weight"))?;
        if w.len() != 5 {
            return Err(err(format!("`encoder.stages.{s}.blocks.0.conv1.conv.weight` has shape {w:?}; a 3-D conv weight has 5 axes")));
        }
        arch.features.push(w[0]);
        arch.kernels.push([w[2], w[3], w[4]]);
        arch.n_blocks.push(plainconv::count_indices(dict, &format!("encoder.stages.{s}.blocks")));
    }
    arch.validate().map_err(err)?;
    Ok(arch)
}

/// Size options of `NetSpec::options`: all optional; missing ones take nnU-Net's ResEnc
/// defaults. The scaling rule: `base_width` (32) doubles per stage up to `max_width` (320);
/// `blocks` sets every encoder stage's residual blocks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResEncOptions {
    /// Width of stage 0.
    pub base_width: Option<usize>,
    /// Width cap.
    pub max_width: Option<usize>,
    /// Residual blocks per encoder stage, everywhere.
    pub blocks: Option<usize>,
    /// Features per stage.
    pub features: Option<Vec<usize>>,
    /// Kernel size per stage.
    pub kernels: Option<Vec<Stride>>,
    /// Residual blocks per encoder stage.
    pub n_blocks: Option<Vec<usize>>,
    /// Convolutions per decoder stage, deepest first.
    pub n_conv_dec: Option<Vec<usize>>,
}

impl ResEncOptions {
    fn sizes(&self) -> plainconv::SizeOptions<'_> {
        plainconv::SizeOptions { base_width: self.base_width, max_width: self.max_width, blocks: self.blocks, blocks_in_decoder: false, features: &self.features, kernels: &self.kernels, encoder: &self.n_blocks, n_conv_dec: &self.n_conv_dec }
    }
}

/// The architecture a `NetSpec` asks for.
pub fn arch_of(spec: &NetSpec) -> Result<ResEncArch, String> {
    arch_with(spec, &options(spec, NAME)?)
}

fn arch_with(spec: &NetSpec, o: &ResEncOptions) -> Result<ResEncArch, String> {
    let mut a = ResEncArch::nnunet(spec.in_channels, spec.num_classes, &spec.strides);
    o.sizes().apply(&mut a.features, &mut a.kernels, &mut a.n_blocks, &mut a.n_conv_dec);
    a.validate().map_err(|e| format!("model options for `{NAME}`: {e}"))?;
    Ok(a)
}

fn build_boxed(spec: &NetSpec, device: &Device) -> Result<Box<dyn SegNet>, String> {
    Ok(Box::new(ResEncUNet::new(&arch_of(spec)?, device)?))
}

/// [`arch_of`] with the stage count the options' per-stage lists give (as PlainConvUNet's).
fn check_options(spec: &NetSpec) -> Result<InputRule, String> {
    let o: ResEncOptions = options(spec, NAME)?;
    arch_with(&o.sizes().for_check(spec), &o).map(|_| InputRule::default())
}

fn load_boxed(dict: &StateDict, options: &LoadOptions, device: &Device) -> Result<Box<dyn SegNet>, CheckpointError> {
    Ok(Box::new(ResEncUNet::from_state_dict(dict, options, device)?))
}

/// The ResEnc M network nnU-Net plans for a 128³ isotropic patch: 6 stages, five 2³
/// downsamplings, blocks 1, 3, 4, 6, 6, 6.
pub fn default_arch() -> ResEncArch {
    ResEncArch::nnunet(1, TOTALSEG_CLASSES, &[[2; 3]; 5])
}

fn preset_summaries() -> Vec<PresetSummary> {
    let device = stu_engine::backend::Backend::default_compiled().and_then(|b| b.device().ok()).unwrap_or_default();
    let arch = default_arch();
    let net = ResEncUNet::new(&arch, &device).expect("the default is valid");
    vec![plainconv::summary(NAME, "3d_fullres (ResEnc M)", arch.n_blocks.clone(), arch.features.clone(), Module::num_params(&net), arch.keys().len(), arch.macs([128; 3]))]
}

inventory::submit! {
    ModelEntry {
        name: NAME,
        summary: "nnU-Net's ResidualEncoderUNet (the ResEnc presets: a stem, ResNet-D blocks per encoder stage, PlainConvUNet's decoder), built from a plan",
        module_path: module_path!(),
        revision: 0,
        anchor_key: "decoder.encoder.stem.convs.0.conv.weight",
        presets: preset_summaries,
        load: load_boxed,
        build: build_boxed,
        check: check_options,
    }
}
