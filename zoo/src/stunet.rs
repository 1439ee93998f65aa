//! STU-Net: scalable and transferable residual 3-D U-Nets (Huang et al., arXiv 2304.06716).
//!
//! Reference code: uni-medical/STU-Net, `nnUNet-1.7.1/nnunet/network_architecture/STUNet.py`
//! and `nnUNet-2.2/nnunetv2/training/nnUNetTrainer/STUNetTrainer.py` (identical layer graph and
//! state-dict keys). Six stages of residual blocks, 3³ kernels, strided-conv downsampling,
//! nearest upsampling + 1×1 conv, concat (upsampled, skip), five segmentation heads.
//!
//! Deviations (numerically equivalent): the upsampling 1×1 conv runs *before* the nearest
//! replication, at the low resolution. A pointwise conv commutes with voxel replication, so the
//! values are identical and the conv costs 1/(stride product) of the reference's MACs. The
//! counts reported by [`StuNetArch::macs`] follow the reference's order, so they match the
//! published numbers.
//!
//! Family size presets (S/B/L/H) are [`ScalingEntry`] registrations below; any other blocks ×
//! width, channel count, class count and stride list is accepted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use stu_core::ScalingEntry;
use stu_core::scaling::ScalingRule;
use stu_core::strides::{self, Stride};
use stu_engine::burn;
use stu_engine::burn::module::{Module, Param};
use stu_engine::burn::nn::conv::{Conv3d, Conv3dConfig};
use stu_engine::burn::nn::{Initializer, PaddingConfig3d};
use stu_engine::checkpoint::{CheckpointError, NamedTensor, StateDict};
use stu_engine::model::{InputRule, LoadOptions, ModelEntry, NetSpec, PresetSummary, SegNet};
use stu_engine::ops::{self, Layout};
use stu_engine::{Device, Tensor};

use stu_engine::train::InitRules;
use crate::parts::{Builder, check_keys, named};

/// Registry name of the family.
pub const NAME: &str = "stunet";

/// Strides of the TotalSegmentator pre-training plan (`plan_files/*.model.pkl`, stage 0).
pub const TOTALSEG_STRIDES: [Stride; 5] = [[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 2]];

/// Default strides: five isotropic halvings.
pub const ISO_STRIDES: [Stride; 5] = [[2, 2, 2]; 5];

/// Classes of the released TotalSegmentator models: 104 structures + background.
pub const TOTALSEG_CLASSES: usize = 105;

/// Everything that fixes an STU-Net's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StuNetArch {
    /// Input channels (modalities).
    pub in_channels: usize,
    /// Output classes, background included.
    pub num_classes: usize,
    /// Residual blocks per stage (encoder stage k and decoder level k alike).
    pub depth: Vec<usize>,
    /// Channel width per stage.
    pub dims: Vec<usize>,
    /// One stride per downsampling (stages − 1 of them), nnU-Net array axis order.
    pub strides: Vec<Stride>,
}

/// Multiply-accumulates of one forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Macs {
    /// Output voxels × Cout × Cin × k³ over every conv.
    pub weights: u64,
    /// Plus output voxels × Cout per conv (torchinfo's "mult-adds").
    pub with_bias: u64,
}

/// One conv of the reference graph, for counting.
struct ConvShape {
    cin: usize,
    cout: usize,
    k: usize,
    out_voxels: u64,
}

impl StuNetArch {
    /// A preset's architecture for a given task.
    pub fn from_rule(rule: ScalingRule, in_channels: usize, num_classes: usize, strides: Vec<Stride>) -> Self {
        Self {
            in_channels,
            num_classes,
            depth: rule.depth().to_vec(),
            dims: rule.widths().to_vec(),
            strides,
        }
    }

    /// Checks the numbers fit together.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.dims.len();
        if n < 2 {
            return Err(format!("an STU-Net needs at least 2 stages, got {n}"));
        }
        if self.depth.len() != n {
            return Err(format!("{} depths for {n} stages", self.depth.len()));
        }
        if self.strides.len() != n - 1 {
            return Err(format!(
                "{} strides given for {n} stages (need {}: one per downsampling)",
                self.strides.len(),
                n - 1
            ));
        }
        if self.in_channels == 0 || self.num_classes == 0 {
            return Err("input channels and classes must be positive".into());
        }
        if self.depth.contains(&0) || self.dims.contains(&0) {
            return Err("every stage needs at least one block and one channel".into());
        }
        if self.strides.iter().flatten().any(|&s| s == 0) {
            return Err("strides must be positive".into());
        }
        Ok(())
    }

    fn stages(&self) -> usize {
        self.dims.len()
    }

    /// Every state-dict key with its shape, in the reference's registration order.
    pub fn keys(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let n = self.stages();
        let block = |out: &mut Vec<(String, Vec<usize>)>, p: String, cin: usize, c: usize, first: bool| {
            out.push((format!("{p}.conv1.weight"), vec![c, cin, 3, 3, 3]));
            out.push((format!("{p}.conv1.bias"), vec![c]));
            out.push((format!("{p}.norm1.weight"), vec![c]));
            out.push((format!("{p}.norm1.bias"), vec![c]));
            out.push((format!("{p}.conv2.weight"), vec![c, c, 3, 3, 3]));
            out.push((format!("{p}.conv2.bias"), vec![c]));
            out.push((format!("{p}.norm2.weight"), vec![c]));
            out.push((format!("{p}.norm2.bias"), vec![c]));
            if first {
                out.push((format!("{p}.conv3.weight"), vec![c, cin, 1, 1, 1]));
                out.push((format!("{p}.conv3.bias"), vec![c]));
            }
        };
        for s in 0..n {
            let cin = if s == 0 { self.in_channels } else { self.dims[s - 1] };
            for b in 0..self.depth[s] {
                let cin = if b == 0 { cin } else { self.dims[s] };
                block(&mut out, format!("conv_blocks_context.{s}.{b}"), cin, self.dims[s], b == 0);
            }
        }
        for u in 0..n - 1 {
            let (cin, cout) = (self.dims[n - 1 - u], self.dims[n - 2 - u]);
            out.push((format!("upsample_layers.{u}.conv.weight"), vec![cout, cin, 1, 1, 1]));
            out.push((format!("upsample_layers.{u}.conv.bias"), vec![cout]));
        }
        for u in 0..n - 1 {
            let c = self.dims[n - 2 - u];
            for b in 0..self.depth[n - 2 - u] {
                let cin = if b == 0 { 2 * c } else { c };
                block(&mut out, format!("conv_blocks_localization.{u}.{b}"), cin, c, b == 0);
            }
        }
        for u in 0..n - 1 {
            let c = self.dims[n - 2 - u];
            out.push((format!("seg_outputs.{u}.weight"), vec![self.num_classes, c, 1, 1, 1]));
            out.push((format!("seg_outputs.{u}.bias"), vec![self.num_classes]));
        }
        out
    }

    /// Spatial extent at each stage for an input extent.
    fn resolutions(&self, input: [usize; 3]) -> Vec<[usize; 3]> {
        let mut res = vec![input];
        for s in &self.strides {
            let r = *res.last().expect("non-empty");
            res.push([0, 1, 2].map(|a| strides::conv_out(r[a], 3, s[a], 1)));
        }
        res
    }

    /// Every conv of the reference forward graph (including the five heads and the 1×1
    /// upsampling convs at their high-resolution output), with its output size.
    fn convs(&self, input: [usize; 3]) -> Vec<ConvShape> {
        let n = self.stages();
        let res = self.resolutions(input);
        let vox = |r: [usize; 3]| r.iter().map(|&v| v as u64).product::<u64>();
        let mut out = Vec::new();
        let block = |out: &mut Vec<ConvShape>, cin: usize, c: usize, v: u64, first: bool| {
            out.push(ConvShape { cin, cout: c, k: 3, out_voxels: v });
            out.push(ConvShape { cin: c, cout: c, k: 3, out_voxels: v });
            if first {
                out.push(ConvShape { cin, cout: c, k: 1, out_voxels: v });
            }
        };
        for (s, &r) in res.iter().enumerate().take(n) {
            let cin = if s == 0 { self.in_channels } else { self.dims[s - 1] };
            for b in 0..self.depth[s] {
                let cin = if b == 0 { cin } else { self.dims[s] };
                block(&mut out, cin, self.dims[s], vox(r), b == 0);
            }
        }
        for u in 0..n - 1 {
            let level = n - 2 - u;
            let (c, v) = (self.dims[level], vox(res[level]));
            out.push(ConvShape { cin: self.dims[level + 1], cout: c, k: 1, out_voxels: v });
            for b in 0..self.depth[level] {
                block(&mut out, if b == 0 { 2 * c } else { c }, c, v, b == 0);
            }
            out.push(ConvShape { cin: c, cout: self.num_classes, k: 1, out_voxels: v });
        }
        out
    }

    /// Multiply-accumulates of one deep-supervision forward at batch 1.
    pub fn macs(&self, input: [usize; 3]) -> Macs {
        let convs = self.convs(input);
        let weights = convs
            .iter()
            .map(|c| c.out_voxels * (c.cout * c.cin * c.k.pow(3)) as u64)
            .sum();
        let bias: u64 = convs.iter().map(|c| c.out_voxels * c.cout as u64).sum();
        Macs { weights, with_bias: weights + bias }
    }

    /// Per-axis divisor of valid input extents.
    pub fn input_divisor(&self) -> Stride {
        strides::divisor(&self.strides)
    }
}

/// `InstanceNorm3d(C, affine=True)`, with PyTorch's parameter names.
#[derive(Module, Debug)]
pub struct InstanceNorm3d {
    /// Per-channel scale (`γ`).
    pub weight: Param<Tensor<1>>,
    /// Per-channel shift (`β`).
    pub bias: Param<Tensor<1>>,
}

impl InstanceNorm3d {
    /// Norm, then LeakyReLU when `act`.
    fn forward(&self, x: Tensor<5>, act: bool, l: Layout) -> Tensor<5> {
        ops::norm_act(x, self.weight.val(), self.bias.val(), act, l)
    }

    /// `leaky_relu(norm(x) + skip)`.
    fn forward_add_act(&self, x: Tensor<5>, skip: Tensor<5>, l: Layout) -> Tensor<5> {
        ops::norm_add_act(x, self.weight.val(), self.bias.val(), skip, l)
    }
}

fn conv(c: &Conv3d, x: Tensor<5>, l: Layout) -> Tensor<5> {
    let bias = c.bias.as_ref().expect("STU-Net convs have a bias").val();
    ops::conv3d(x, c.weight.val(), bias, c.stride, l)
}

/// [`conv`] into an instance norm (the bias, which the norm removes, may be skipped:
/// [`ops::conv3d_normed`]).
fn conv_normed(c: &Conv3d, x: Tensor<5>, l: Layout) -> Tensor<5> {
    let bias = c.bias.as_ref().expect("STU-Net convs have a bias").val();
    ops::conv3d_normed(x, c.weight.val(), bias, c.stride, l)
}

/// `BasicResBlock`: conv–norm–lrelu–conv–norm, plus a shortcut, then lrelu.
#[derive(Module, Debug)]
pub struct ResBlock {
    /// 3³ conv carrying the block's stride.
    pub conv1: Conv3d,
    /// Norm after `conv1`.
    pub norm1: InstanceNorm3d,
    /// 3³ conv, stride 1.
    pub conv2: Conv3d,
    /// Norm after `conv2`.
    pub norm2: InstanceNorm3d,
    /// 1×1 projection shortcut (first block of a stage only), same stride as `conv1`.
    pub conv3: Option<Conv3d>,
}

impl ResBlock {
    /// A freshly initialised block (for benchmarks and tests).
    pub fn new(cin: usize, c: usize, stride: Stride, project: bool, device: &Device) -> Self {
        Builder::fresh(device)
            .block("block", cin, c, stride, project)
            .expect("fresh initialisation cannot fail")
    }

    /// `[B, cin, D, H, W]` → `[B, c, D/s, H/s, W/s]` (or the channels-last equivalent).
    pub fn forward(&self, x: Tensor<5>, l: Layout) -> Tensor<5> {
        let y = self.norm1.forward(conv_normed(&self.conv1, x.clone(), l), true, l);
        let y = conv_normed(&self.conv2, y, l);
        let skip = match &self.conv3 {
            Some(c) => conv(c, x, l),
            None => x,
        };
        self.norm2.forward_add_act(y, skip, l)
    }
}

/// `Upsample_Layer_nearest`: nearest replication by the stride, and a 1×1 conv.
#[derive(Module, Debug)]
pub struct Upsample {
    /// The 1×1 conv.
    pub conv: Conv3d,
    /// Replication factor per axis.
    pub scale: [usize; 3],
}

impl Upsample {
    fn forward(&self, x: Tensor<5>, l: Layout) -> Tensor<5> {
        // conv then replicate == replicate then conv for a 1×1 conv; 1/∏scale of the work.
        ops::upsample_nearest(conv(&self.conv, x, l), self.scale, l)
    }
}

/// The network, with fields named like the reference's attributes.
#[derive(Module, Debug)]
pub struct StuNet {
    /// Encoder stages.
    pub conv_blocks_context: Vec<Vec<ResBlock>>,
    /// Decoder upsampling, deepest first.
    pub upsample_layers: Vec<Upsample>,
    /// Decoder stages, deepest first.
    pub conv_blocks_localization: Vec<Vec<ResBlock>>,
    /// Segmentation heads, deepest first.
    pub seg_outputs: Vec<Conv3d>,
    /// The architecture it was built from.
    #[module(skip)]
    pub arch: StuNetArch,
    /// How each parameter was declared to be drawn (fresh networks; `seeded_init`).
    #[module(skip)]
    pub init: InitRules,
}

/// STU-Net's layers, made by the shared [`Builder`].
trait StuBuild {
    fn conv(&self, key: &str, cin: usize, cout: usize, k: usize, stride: Stride) -> Result<Conv3d, CheckpointError>;
    fn norm(&self, key: &str, c: usize) -> Result<InstanceNorm3d, CheckpointError>;
    fn block(&self, key: &str, cin: usize, c: usize, stride: Stride, project: bool) -> Result<ResBlock, CheckpointError>;
    fn stage(&self, key: &str, cin: usize, c: usize, depth: usize, stride: Stride) -> Result<Vec<ResBlock>, CheckpointError>;
    fn build(&self, arch: &StuNetArch) -> Result<StuNet, CheckpointError>;
}

impl StuBuild for Builder<'_> {
    fn conv(&self, key: &str, cin: usize, cout: usize, k: usize, stride: Stride) -> Result<Conv3d, CheckpointError> {
        // nnU-Net v1 InitWeights_He(1e-2): kaiming_normal_(a=0.01) on weights, zero biases.
        let he = Builder::he();
        let pad = k / 2;
        let mut conv = Conv3dConfig::new([cin, cout], [k; 3])
            .with_stride(stride)
            .with_padding(PaddingConfig3d::Explicit(pad, pad, pad))
            .with_initializer(he.clone())
            .init(self.device);
        conv.weight = self.tensor(&format!("{key}.weight"), [cout, cin, k, k, k], he)?;
        conv.bias = Some(self.tensor(&format!("{key}.bias"), [cout], Initializer::Zeros)?);
        Ok(conv)
    }

    fn norm(&self, key: &str, c: usize) -> Result<InstanceNorm3d, CheckpointError> {
        Ok(InstanceNorm3d {
            weight: self.tensor(&format!("{key}.weight"), [c], Initializer::Ones)?,
            bias: self.tensor(&format!("{key}.bias"), [c], Initializer::Zeros)?,
        })
    }

    fn block(&self, key: &str, cin: usize, c: usize, stride: Stride, project: bool) -> Result<ResBlock, CheckpointError> {
        Ok(ResBlock {
            conv1: self.conv(&format!("{key}.conv1"), cin, c, 3, stride)?,
            norm1: self.norm(&format!("{key}.norm1"), c)?,
            conv2: self.conv(&format!("{key}.conv2"), c, c, 3, [1; 3])?,
            norm2: self.norm(&format!("{key}.norm2"), c)?,
            conv3: if project {
                Some(self.conv(&format!("{key}.conv3"), cin, c, 1, stride)?)
            } else {
                None
            },
        })
    }

    fn stage(&self, key: &str, cin: usize, c: usize, depth: usize, stride: Stride) -> Result<Vec<ResBlock>, CheckpointError> {
        (0..depth)
            .map(|b| {
                if b == 0 {
                    self.block(&format!("{key}.0"), cin, c, stride, true)
                } else {
                    self.block(&format!("{key}.{b}"), c, c, [1; 3], false)
                }
            })
            .collect()
    }

    fn build(&self, arch: &StuNetArch) -> Result<StuNet, CheckpointError> {
        let n = arch.stages();
        let d = &arch.dims;
        let conv_blocks_context = (0..n)
            .map(|s| {
                let (cin, stride) = if s == 0 {
                    (arch.in_channels, [1; 3])
                } else {
                    (d[s - 1], arch.strides[s - 1])
                };
                self.stage(&format!("conv_blocks_context.{s}"), cin, d[s], arch.depth[s], stride)
            })
            .collect::<Result<_, _>>()?;
        let upsample_layers = (0..n - 1)
            .map(|u| {
                Ok(Upsample {
                    conv: self.conv(&format!("upsample_layers.{u}.conv"), d[n - 1 - u], d[n - 2 - u], 1, [1; 3])?,
                    scale: arch.strides[n - 2 - u],
                })
            })
            .collect::<Result<_, CheckpointError>>()?;
        let conv_blocks_localization = (0..n - 1)
            .map(|u| {
                let c = d[n - 2 - u];
                self.stage(&format!("conv_blocks_localization.{u}"), 2 * c, c, arch.depth[n - 2 - u], [1; 3])
            })
            .collect::<Result<_, _>>()?;
        let seg_outputs = (0..n - 1)
            .map(|u| self.conv(&format!("seg_outputs.{u}"), d[n - 2 - u], arch.num_classes, 1, [1; 3]))
            .collect::<Result<_, _>>()?;
        Ok(StuNet {
            conv_blocks_context,
            upsample_layers,
            conv_blocks_localization,
            seg_outputs,
            arch: arch.clone(), init: InitRules::default(),
        })
    }
}

impl StuNet {
    /// A freshly initialised network (He init as nnU-Net v1). Parameters are lazy: nothing is
    /// allocated until a forward pass or a read touches them, so counting even H is free.
    pub fn new(arch: &StuNetArch, device: &Device) -> Result<Self, String> {
        arch.validate()?;
        let b = Builder::fresh(device);
        let net = b.build(arch).map_err(|e| e.to_string())?;
        Ok(Self { init: b.into_rules(), ..net })
    }

    /// Builds the network from a checkpoint, inferring the architecture from tensor shapes.
    /// Every tensor is checked against the inferred shapes, and unknown keys are rejected.
    pub fn from_state_dict(dict: &StateDict, options: &LoadOptions, device: &Device) -> Result<Self, CheckpointError> {
        let arch = infer_arch(dict, options)?;
        check_keys(dict, &arch.keys(), NAME, |_| false)?;
        Builder::reading(dict, device).build(&arch)
    }

    /// Forward on an NCDHW input; outputs NCDHW (views of channels-last results on flex).
    fn run(&self, x: Tensor<5>, deep_supervision: bool) -> Vec<Tensor<5>> {
        let l = Layout::for_device(&x.device());
        self.run_in(x, deep_supervision, l)
    }

    /// [`SegNet::forward_ds`] with the internal activation layout forced (for tests comparing our
    /// channels-last kernels with burn's own convolution).
    pub fn forward_ds_in(&self, x: Tensor<5>, layout: Layout) -> Vec<Tensor<5>> {
        self.run_in(x, true, layout)
    }

    fn run_in(&self, x: Tensor<5>, deep_supervision: bool, l: Layout) -> Vec<Tensor<5>> {
        let n = self.arch.stages();
        let mut skips = Vec::with_capacity(n - 1);
        let mut x = l.from_ncdhw(x);
        for (s, stage) in self.conv_blocks_context.iter().enumerate() {
            x = stage.iter().fold(x, |x, b| b.forward(x, l));
            if s + 1 < n {
                skips.push(x.clone());
            }
        }
        let mut outs = Vec::new();
        for u in 0..n - 1 {
            let up = self.upsample_layers[u].forward(x, l);
            let skip = skips.pop().expect("one skip per decoder level");
            x = Tensor::cat(vec![up, skip], l.channel_axis());
            x = self.conv_blocks_localization[u].iter().fold(x, |x, b| b.forward(x, l));
            if deep_supervision || u == n - 2 {
                let head = &self.seg_outputs[u];
                let bias = head.bias.as_ref().expect("STU-Net heads have a bias").val();
                outs.push(ops::head_to_ncdhw(x.clone(), head.weight.val(), bias, l));
            }
        }
        outs.reverse();
        outs
    }
}

fn conv_tensors(out: &mut Vec<NamedTensor>, key: &str, conv: &Conv3d) {
    out.push(named(format!("{key}.weight"), conv.weight.val()));
    if let Some(b) = &conv.bias {
        out.push(named(format!("{key}.bias"), b.val()));
    }
}


fn block_tensors(out: &mut Vec<NamedTensor>, key: &str, b: &ResBlock) {
    conv_tensors(out, &format!("{key}.conv1"), &b.conv1);
    out.push(named(format!("{key}.norm1.weight"), b.norm1.weight.val()));
    out.push(named(format!("{key}.norm1.bias"), b.norm1.bias.val()));
    conv_tensors(out, &format!("{key}.conv2"), &b.conv2);
    out.push(named(format!("{key}.norm2.weight"), b.norm2.weight.val()));
    out.push(named(format!("{key}.norm2.bias"), b.norm2.bias.val()));
    if let Some(c) = &b.conv3 {
        conv_tensors(out, &format!("{key}.conv3"), c);
    }
}

impl SegNet for StuNet {
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
        let mut out = Vec::new();
        for (s, stage) in self.conv_blocks_context.iter().enumerate() {
            for (b, block) in stage.iter().enumerate() {
                block_tensors(&mut out, &format!("conv_blocks_context.{s}.{b}"), block);
            }
        }
        for (u, up) in self.upsample_layers.iter().enumerate() {
            conv_tensors(&mut out, &format!("upsample_layers.{u}.conv"), &up.conv);
        }
        for (u, stage) in self.conv_blocks_localization.iter().enumerate() {
            for (b, block) in stage.iter().enumerate() {
                block_tensors(&mut out, &format!("conv_blocks_localization.{u}.{b}"), block);
            }
        }
        for (u, head) in self.seg_outputs.iter().enumerate() {
            conv_tensors(&mut out, &format!("seg_outputs.{u}"), head);
        }
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
        serde_json::json!({
            "model": NAME,
            "in_channels": self.arch.in_channels,
            "num_classes": self.arch.num_classes,
            "depth": self.arch.depth,
            "dims": self.arch.dims,
            "strides": self.arch.strides,
            "params": Module::num_params(self),
            // The reference's counting rule at a 1×C×128³ input with these strides.
            "macs_128": self.arch.macs([128; 3]).with_bias,
            // `NetSpec::options` that rebuild this size (used by fine-tuning).
            "options": {"depth": self.arch.depth, "dims": self.arch.dims},
        })
    }
}

/// Reads the architecture from tensor shapes: stages from `conv_blocks_context.{s}`, blocks per
/// stage from `.{b}`, widths and input channels from `conv1` weights, classes from the heads.
pub fn infer_arch(dict: &StateDict, options: &LoadOptions) -> Result<StuNetArch, CheckpointError> {
    let arch_err = |reason: String| CheckpointError::Architecture {
        path: dict.path().to_path_buf(),
        reason,
    };
    let conv1 = |s: usize, b: usize| format!("conv_blocks_context.{s}.{b}.conv1.weight");
    let n = (0..).take_while(|&s| dict.get(&conv1(s, 0)).is_some()).count();
    if n < 2 {
        return Err(dict.shape(&conv1(n, 0)).err().unwrap_or_else(|| arch_err("fewer than 2 encoder stages".into())));
    }
    let mut dims = Vec::with_capacity(n);
    let mut depth = Vec::with_capacity(n);
    let mut in_channels = 0;
    for s in 0..n {
        let key = conv1(s, 0);
        let shape = dict.shape(&key)?;
        if shape.len() != 5 || shape[2..] != [3, 3, 3] {
            return Err(arch_err(format!("key `{key}` has shape {shape:?}, expected [C, Cin, 3, 3, 3]")));
        }
        if s == 0 {
            in_channels = shape[1];
        }
        dims.push(shape[0]);
        depth.push((0..).take_while(|&b| dict.get(&conv1(s, b)).is_some()).count());
    }
    let head = "seg_outputs.0.weight";
    let num_classes = *dict
        .shape(head)?
        .first()
        .ok_or_else(|| arch_err(format!("key `{head}` is a scalar")))?;
    let strides = match &options.strides {
        Some(s) if options.from_plan => strides::fit(s, n - 1),
        Some(s) if s.len() != n - 1 => {
            return Err(arch_err(format!(
                "{} strides given, but the checkpoint has {n} stages ({} downsamplings)",
                s.len(),
                n - 1
            )));
        }
        Some(s) => s.clone(),
        None => vec![[2, 2, 2]; n - 1],
    };
    let arch = StuNetArch { in_channels, num_classes, depth, dims, strides };
    arch.validate().map_err(arch_err)?;
    Ok(arch)
}

/// Size options of a fresh STU-Net (`NetSpec::options`): a preset, a scaling rule, or explicit
/// per-stage lists; stride lists are cut or padded to the stage count (STU-Net's plan rule).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeOptions {
    /// A registered preset (`stunet-s`, `stunet-b`, …).
    pub preset: Option<String>,
    /// Blocks per stage (scaling rule; with `base_width`).
    pub blocks: Option<usize>,
    /// Stage-0 width; widths are base·[1,2,4,8,16,16].
    pub base_width: Option<usize>,
    /// Explicit blocks per stage.
    pub depth: Option<Vec<usize>>,
    /// Explicit widths per stage.
    pub dims: Option<Vec<usize>>,
}

/// The architecture a [`NetSpec`] asks for.
pub fn arch_of(spec: &NetSpec) -> Result<StuNetArch, String> {
    let o: SizeOptions = if spec.options.is_null() {
        SizeOptions::default()
    } else {
        serde_json::from_value(spec.options.clone()).map_err(|e| format!("model options: {e} (allowed: preset, blocks, base_width, depth, dims)"))?
    };
    let (depth, dims) = match (&o.preset, o.blocks, o.base_width, &o.depth, &o.dims) {
        (Some(p), None, None, None, None) => {
            let e = stu_core::scaling::registry().get(p).map_err(|e| format!("model options: preset: {e}"))?;
            if e.family != NAME {
                return Err(format!("model options: preset `{p}` belongs to `{}`, not `{NAME}`", e.family));
            }
            (e.rule.depth().to_vec(), e.rule.widths().to_vec())
        }
        (None, blocks, base, None, None) if blocks.is_some() || base.is_some() => {
            let rule = ScalingRule { blocks: blocks.unwrap_or(1), base_width: base.unwrap_or(32) };
            (rule.depth().to_vec(), rule.widths().to_vec())
        }
        (None, None, None, Some(d), Some(w)) => (d.clone(), w.clone()),
        (None, None, None, None, None) => return Err("model options: give `preset`, `blocks`/`base_width`, or `depth` and `dims`".into()),
        _ => return Err("model options: `preset`, `blocks`/`base_width` and `depth`/`dims` exclude each other".into()),
    };
    let n = dims.len();
    let arch = StuNetArch { in_channels: spec.in_channels, num_classes: spec.num_classes, depth, dims, strides: strides::fit(&spec.strides, n.saturating_sub(1)) };
    arch.validate()?;
    Ok(arch)
}

fn build_boxed(spec: &NetSpec, device: &Device) -> Result<Box<dyn SegNet>, String> {
    Ok(Box::new(StuNet::new(&arch_of(spec)?, device)?))
}

fn load_boxed(dict: &StateDict, options: &LoadOptions, device: &Device) -> Result<Box<dyn SegNet>, CheckpointError> {
    Ok(Box::new(StuNet::from_state_dict(dict, options, device)?))
}

/// The registered STU-Net presets, smallest first.
pub fn presets() -> Vec<&'static ScalingEntry> {
    let mut p: Vec<_> = stu_core::scaling::registry().iter().filter(|e| e.family == NAME).collect();
    p.sort_by_key(|e| (e.rule.base_width, e.rule.blocks));
    p
}

fn preset_summaries() -> Vec<PresetSummary> {
    let device = stu_engine::backend::Backend::default_compiled()
        .and_then(|b| b.device().ok())
        .unwrap_or_default();
    presets()
        .into_iter()
        .map(|e| {
            let arch = StuNetArch::from_rule(e.rule, 1, TOTALSEG_CLASSES, ISO_STRIDES.to_vec());
            let net = StuNet::new(&arch, &device).expect("presets are valid");
            let iso = arch.macs([128; 3]);
            let ts = StuNetArch { strides: TOTALSEG_STRIDES.to_vec(), ..arch.clone() }.macs([128; 3]);
            PresetSummary {
                name: e.id.to_string(),
                model: NAME,
                preset: e.label,
                blocks: arch.depth.clone(),
                widths: arch.dims.clone(),
                params: Module::num_params(&net) as u64,
                state_dict_tensors: arch.keys().len(),
                macs_128: iso.with_bias,
                macs_128_variants: BTreeMap::from([
                    ("iso_weights_only", iso.weights),
                    ("iso_with_bias", iso.with_bias),
                    ("totalseg_plan_weights_only", ts.weights),
                    ("totalseg_plan_with_bias", ts.with_bias),
                ]),
            }
        })
        .collect()
}

inventory::submit! {
    ModelEntry {
        name: NAME,
        summary: "STU-Net: scalable residual 3-D U-Net (6 stages, 3³ kernels, nearest+1×1 upsampling, 5 deep-supervision heads)",
        module_path: module_path!(),
        revision: 0,
        anchor_key: "conv_blocks_context.0.0.conv1.weight",
        presets: preset_summaries,
        load: load_boxed,
        build: build_boxed,
        check: |spec| arch_of(spec).map(|_| InputRule::default()),
    }
}

macro_rules! preset {
    ($id:literal, $label:literal, $blocks:literal, $base:literal, $summary:literal) => {
        inventory::submit! {
            ScalingEntry {
                id: $id,
                family: NAME,
                label: $label,
                summary: $summary,
                rule: ScalingRule { blocks: $blocks, base_width: $base },
                module_path: module_path!(),
            }
        }
    };
}

preset!("stunet-s", "S", 1, 16, "STU-Net-S: 1 block per stage, widths 16…256");
preset!("stunet-b", "B", 1, 32, "STU-Net-B: 1 block per stage, widths 32…512");
preset!("stunet-l", "L", 2, 64, "STU-Net-L: 2 blocks per stage, widths 64…1024");
preset!("stunet-h", "H", 3, 96, "STU-Net-H: 3 blocks per stage, widths 96…1536");
