//! SwinUNETR (Hatamizadeh et al. 2022) as MONAI 1.6 defines it (`monai.networks.nets.SwinUNETR`,
//! v1: `use_v2=False`, `downsample="merging"`, `normalize=True`): a Swin transformer over 2³
//! patches (four stages of shifted-window attention with relative position bias, window 7,
//! patch merging between stages), whose layer-normed stage outputs feed UNETR's convolutional
//! decoder. Defaults are MONAI's (feature size 24, depths 2-2-2-2, heads 3-6-12-24). One output.
//!
//! MONAI's quirks are kept: windows shrink to the feature map when it is no larger than the
//! window (and then do not shift), but the relative-position index is the full window's, cut to
//! the first n×n entries; `PatchMerging` concatenates the eight sub-grids in its own order; the
//! `relative_position_index` buffers are in the state dict (read back as computed, written out).

use burn::module::{Module, Param};
use burn::tensor::Int;
use serde::{Deserialize, Serialize};
use stu_core::strides::Stride;
use stu_engine::burn;
use stu_engine::checkpoint::{CheckpointError, NamedTensor, StateDict};
use stu_engine::model::{InputRule, LoadOptions, ModelEntry, NetSpec, PresetSummary, SegNet};
use stu_engine::ops::{self, Layout};
use stu_engine::{Device, Tensor, TensorData};

use crate::stunet::TOTALSEG_CLASSES;
use stu_engine::train::InitRules;
use crate::parts::{Builder, Export, LayerNorm, Linear, ResBlock, UpBlock, check_keys, options, pad_end, partition, patches, reverse, roll, shift_mask, up};

/// What every input extent must be a multiple of: five 2× downsamplings (the patch embedding's
/// and four patch mergings).
pub const DIVISOR: Stride = [32; 3];

/// Registry name.
pub const NAME: &str = "swinunetr";

/// Window size (MONAI's default, cubic).
pub const WINDOW: usize = 7;

/// Everything that fixes a SwinUNETR's shape (MONAI's constructor arguments).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwinArch {
    /// Input channels.
    pub in_channels: usize,
    /// Output classes.
    pub num_classes: usize,
    /// Width of stage 0 (a multiple of 12 in MONAI).
    pub feature_size: usize,
    /// Blocks per stage (4 stages).
    pub depths: Vec<usize>,
    /// Heads per stage.
    pub num_heads: Vec<usize>,
}

impl SwinArch {
    /// MONAI's defaults.
    pub fn monai_default(in_channels: usize, num_classes: usize) -> Self {
        Self { in_channels, num_classes, feature_size: 24, depths: vec![2; 4], num_heads: vec![3, 6, 12, 24] }
    }

    /// Checks the arguments; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.depths.len() != 4 || self.num_heads.len() != 4 {
            return Err("`depths` and `num_heads` have four entries (four stages)".into());
        }
        for (s, &h) in self.num_heads.iter().enumerate() {
            let dim = self.feature_size << s;
            if h == 0 || !dim.is_multiple_of(h) {
                return Err(format!("stage {s}: width {dim} is not divisible by `num_heads` {h}"));
            }
        }
        if self.in_channels == 0 || self.num_classes == 0 || self.feature_size == 0 || self.depths.contains(&0) {
            return Err("counts must be positive".into());
        }
        Ok(())
    }

    /// Multiply-accumulates of one forward at batch 1 for a cubic input (a multiple of 32),
    /// without biases (what torch's FlopCounterMode counts, ×2): patch embedding, the linears
    /// and both attention products over the padded windows, patch merging, convolutions and
    /// transposed convolutions.
    pub fn macs(&self, input: usize) -> u64 {
        let (f, c) = (self.feature_size as u64, self.in_channels as u64);
        let v = |side: u64| side * side * side;
        let s0 = (input / 2) as u64;
        let mut m = v(s0) * f * c * 8;
        for st in 0..4 {
            let (d, dim) = (s0 >> st, f << st);
            for _ in 0..self.depths[st] {
                let w = if d as usize > WINDOW { WINDOW as u64 } else { d };
                let p = d.div_ceil(w) * w;
                let n = w * w * w;
                m += v(p) * dim * 3 * dim + 2 * v(p) * n * dim + v(p) * dim * dim;
                m += v(d) * dim * 4 * dim * 2;
            }
            m += v(d / 2) * 8 * dim * 2 * dim;
        }
        let res = |m: &mut u64, cin: u64, co: u64, side: u64| {
            *m += v(side) * co * (cin * 27 + co * 27);
            if cin != co {
                *m += v(side) * co * cin;
            }
        };
        let full = input as u64;
        res(&mut m, c, f, full);
        res(&mut m, f, f, s0);
        res(&mut m, 2 * f, 2 * f, s0 / 2);
        res(&mut m, 4 * f, 4 * f, s0 / 4);
        res(&mut m, 16 * f, 16 * f, s0 / 16);
        for (cin, co, side) in [(16 * f, 8 * f, s0 / 8), (8 * f, 4 * f, s0 / 4), (4 * f, 2 * f, s0 / 2), (2 * f, f, s0), (f, f, full)] {
            m += v(side) * co * cin;
            res(&mut m, 2 * co, co, side);
        }
        m + v(full) * self.num_classes as u64 * f
    }

    /// Every state-dict key with its shape, in MONAI's order (buffers included).
    pub fn keys(&self) -> Vec<(String, Vec<usize>)> {
        let f = self.feature_size;
        let t = (2 * WINDOW - 1).pow(3);
        let n = WINDOW.pow(3);
        let mut k: Vec<(String, Vec<usize>)> = vec![("swinViT.patch_embed.proj.weight".into(), vec![f, self.in_channels, 2, 2, 2]), ("swinViT.patch_embed.proj.bias".into(), vec![f])];
        for s in 0..4 {
            let dim = f << s;
            for b in 0..self.depths[s] {
                let p = format!("swinViT.layers{}.0.blocks.{b}", s + 1);
                k.push((format!("{p}.norm1.weight"), vec![dim]));
                k.push((format!("{p}.norm1.bias"), vec![dim]));
                k.push((format!("{p}.attn.relative_position_bias_table"), vec![t, self.num_heads[s]]));
                k.push((format!("{p}.attn.relative_position_index"), vec![n, n]));
                k.push((format!("{p}.attn.qkv.weight"), vec![3 * dim, dim]));
                k.push((format!("{p}.attn.qkv.bias"), vec![3 * dim]));
                k.push((format!("{p}.attn.proj.weight"), vec![dim, dim]));
                k.push((format!("{p}.attn.proj.bias"), vec![dim]));
                k.push((format!("{p}.norm2.weight"), vec![dim]));
                k.push((format!("{p}.norm2.bias"), vec![dim]));
                k.push((format!("{p}.mlp.linear1.weight"), vec![4 * dim, dim]));
                k.push((format!("{p}.mlp.linear1.bias"), vec![4 * dim]));
                k.push((format!("{p}.mlp.linear2.weight"), vec![dim, 4 * dim]));
                k.push((format!("{p}.mlp.linear2.bias"), vec![dim]));
            }
            let p = format!("swinViT.layers{}.0.downsample", s + 1);
            k.push((format!("{p}.reduction.weight"), vec![2 * dim, 8 * dim]));
            k.push((format!("{p}.norm.weight"), vec![8 * dim]));
            k.push((format!("{p}.norm.bias"), vec![8 * dim]));
        }
        for (name, cin, c) in [("encoder1", self.in_channels, f), ("encoder2", f, f), ("encoder3", 2 * f, 2 * f), ("encoder4", 4 * f, 4 * f), ("encoder10", 16 * f, 16 * f)] {
            res_keys(&mut k, &format!("{name}.layer"), cin, c);
        }
        for (name, cin, c) in [("decoder5", 16 * f, 8 * f), ("decoder4", 8 * f, 4 * f), ("decoder3", 4 * f, 2 * f), ("decoder2", 2 * f, f), ("decoder1", f, f)] {
            k.push((format!("{name}.transp_conv.conv.weight"), vec![cin, c, 2, 2, 2]));
            res_keys(&mut k, &format!("{name}.conv_block"), 2 * c, c);
        }
        k.push(("out.conv.conv.weight".into(), vec![self.num_classes, f, 1, 1, 1]));
        k.push(("out.conv.conv.bias".into(), vec![self.num_classes]));
        k
    }
}

fn res_keys(k: &mut Vec<(String, Vec<usize>)>, p: &str, cin: usize, c: usize) {
    k.push((format!("{p}.conv1.conv.weight"), vec![c, cin, 3, 3, 3]));
    k.push((format!("{p}.conv2.conv.weight"), vec![c, c, 3, 3, 3]));
    if cin != c {
        k.push((format!("{p}.conv3.conv.weight"), vec![c, cin, 1, 1, 1]));
    }
}

/// The relative-position index of a `WINDOW`³ window (`[n·n]`, row-major `[n, n]`).
fn relative_position_index() -> Vec<i64> {
    let w = WINDOW as i64;
    let coords: Vec<[i64; 3]> = (0..w).flat_map(|d| (0..w).flat_map(move |h| (0..w).map(move |x| [d, h, x]))).collect();
    let mut out = Vec::with_capacity(coords.len() * coords.len());
    for a in &coords {
        for b in &coords {
            let r = [a[0] - b[0] + w - 1, a[1] - b[1] + w - 1, a[2] - b[2] + w - 1];
            out.push(r[0] * (2 * w - 1) * (2 * w - 1) + r[1] * (2 * w - 1) + r[2]);
        }
    }
    out
}

/// One Swin block (window attention with relative position bias, then MLP; pre-norm).
#[derive(Module, Debug)]
pub struct SwinBlock {
    /// Norm before attention.
    pub norm1: LayerNorm,
    /// `[(2·7−1)³, heads]`.
    pub bias_table: Param<Tensor<2>>,
    /// qkv (with bias).
    pub qkv: Linear,
    /// Output projection.
    pub proj: Linear,
    /// Norm before the MLP.
    pub norm2: LayerNorm,
    /// MLP in.
    pub linear1: Linear,
    /// MLP out.
    pub linear2: Linear,
    /// Heads.
    #[module(skip)]
    pub heads: usize,
    /// Shifted windows (odd blocks).
    #[module(skip)]
    pub shifted: bool,
}

/// Patch merging: eight sub-grids concatenated (MONAI's v1 order), norm, linear 8C → 2C.
#[derive(Module, Debug)]
pub struct Merge {
    /// Norm over 8C.
    pub norm: LayerNorm,
    /// `[2C, 8C]`, no bias.
    pub reduction: Linear,
}

/// A stage: blocks, then merging.
#[derive(Module, Debug)]
pub struct Stage {
    /// Blocks.
    pub blocks: Vec<SwinBlock>,
    /// Downsampling.
    pub downsample: Merge,
}

/// The network.
#[derive(Module, Debug)]
pub struct SwinUnetr {
    /// Patch embedding conv weight `[f, C, 2, 2, 2]`.
    pub patch_weight: Param<Tensor<5>>,
    /// Patch embedding bias.
    pub patch_bias: Param<Tensor<1>>,
    /// Four stages.
    pub stages: Vec<Stage>,
    /// encoder1, encoder2, encoder3, encoder4, encoder10.
    pub encoders: Vec<ResBlock>,
    /// decoder5 … decoder1.
    pub decoders: Vec<UpBlock>,
    /// Head weight.
    pub out_weight: Param<Tensor<5>>,
    /// Head bias.
    pub out_bias: Param<Tensor<1>>,
    /// The architecture.
    #[module(skip)]
    pub arch: SwinArch,
    /// How each parameter was declared to be drawn (fresh networks; `seeded_init`).
    #[module(skip)]
    pub init: InitRules,
}

/// MONAI's `get_window_size`: windows shrink to small maps, which then do not shift.
fn window_for(dims: [usize; 3], shift: usize) -> ([usize; 3], [usize; 3]) {
    let mut w = [WINDOW; 3];
    let mut s = [shift; 3];
    for a in 0..3 {
        if dims[a] <= WINDOW {
            w[a] = dims[a];
            s[a] = 0;
        }
    }
    (w, s)
}

fn layer_norm_plain(x: Tensor<5>) -> Tensor<5> {
    let (var, mean) = x.clone().var_mean_bias(4);
    (x - mean) / (var + 1e-5).sqrt()
}

impl SwinBlock {
    fn forward(&self, x: Tensor<5>, rel_index: &[i64]) -> Tensor<5> {
        let [b, d, h, w, c] = x.dims();
        let shortcut = x.clone();
        let x = self.norm1.forward(x.reshape([b, d * h * w, c])).reshape([b, d, h, w, c]);
        let (ws, ss) = window_for([d, h, w], if self.shifted { WINDOW / 2 } else { 0 });
        let padded = [d.div_ceil(ws[0]) * ws[0], h.div_ceil(ws[1]) * ws[1], w.div_ceil(ws[2]) * ws[2]];
        let x = pad_end(x, padded);
        let shifted = ss.iter().any(|&v| v > 0);
        let x = if shifted { roll(x, ss, false) } else { x };
        let win = partition(x, ws);
        let [bw, n, _] = win.dims();
        let (heads, hd) = (self.heads, c / self.heads);
        let qkv = self.qkv.forward(win).reshape([bw, n, 3, heads, hd]);
        let part = |i: usize| qkv.clone().narrow(2, i, 1).reshape([bw, n, heads, hd]).swap_dims(1, 2);
        let (q, k, v) = (part(0) * (hd as f64).powf(-0.5), part(1), part(2));
        let mut attn = q.matmul(k.swap_dims(2, 3));
        let device = attn.device();
        // The full window's index, cut to the first n × n entries (MONAI's behaviour for shrunk windows).
        let full = WINDOW.pow(3);
        let idx: Vec<i64> = (0..n).flat_map(|i| rel_index[i * full..i * full + n].iter().copied()).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [n * n]), &device);
        let bias = stu_engine::ops::lookup_rows(self.bias_table.val(), idx).reshape([n, n, heads]).permute([2, 0, 1]);
        attn = attn + bias.unsqueeze::<4>();
        if shifted {
            let m = shift_mask(padded, ws, ss);
            let nw = m.len() / (n * n);
            let mask = Tensor::<3>::from_data(TensorData::new(m, [nw, n, n]), &device);
            attn = (attn.reshape([bw / nw, nw, heads, n, n]) + mask.reshape([1, nw, 1, n, n])).reshape([bw, heads, n, n]);
        }
        let attn = burn::tensor::activation::softmax(attn, 3);
        let y = attn.matmul(v).swap_dims(1, 2).reshape([bw, n, c]);
        let y = self.proj.forward(y);
        let y = reverse(y, ws, [b, padded[0], padded[1], padded[2]]);
        let y = if shifted { roll(y, ss, true) } else { y };
        let y = y.slice([0..b, 0..d, 0..h, 0..w, 0..c]);
        let x = shortcut + y;
        let flat = x.clone().reshape([b, d * h * w, c]);
        let m = self.linear2.forward(stu_engine::ops::gelu(self.linear1.forward(self.norm2.forward(flat))));
        x + m.reshape([b, d, h, w, c])
    }
}

impl Merge {
    fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        let [b, d, h, w, c] = x.dims();
        let x = pad_end(x, [d + d % 2, h + h % 2, w + w % 2]);
        let [_, d, h, w, _] = x.dims();
        // Each 2³ block's voxels as a window, taken in MONAI's sub-grid order: (0,0,0), (1,0,0),
        // (0,1,0), (0,0,1), (1,1,0), (1,0,1), (0,1,1), (1,1,1) as (d, h, w) offsets.
        let win = partition(x, [2; 3]);
        let order = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 4, 2, 1, 6, 5, 3, 7], [8]), &win.device());
        let n = (d / 2) * (h / 2) * (w / 2);
        let y = self.reduction.forward(self.norm.forward(win.select(1, order).reshape([b, n, 8 * c])));
        y.reshape([b, d / 2, h / 2, w / 2, 2 * c])
    }
}

/// SwinUNETR's layers, made by the shared [`Builder`].
trait SwinBuild {
    fn build(&self, a: &SwinArch) -> Result<SwinUnetr, CheckpointError>;
}

impl SwinBuild for Builder<'_> {
    fn build(&self, a: &SwinArch) -> Result<SwinUnetr, CheckpointError> {
        let f = a.feature_size;
        let stages = (0..4)
            .map(|s| {
                let dim = f << s;
                let blocks = (0..a.depths[s])
                    .map(|b| {
                        let p = format!("swinViT.layers{}.0.blocks.{b}", s + 1);
                        Ok(SwinBlock {
                            norm1: self.ln(&format!("{p}.norm1"), dim)?,
                            bias_table: self.tensor(&format!("{p}.attn.relative_position_bias_table"), [(2 * WINDOW - 1).pow(3), a.num_heads[s]], Self::trunc_normal())?,
                            qkv: self.linear(&format!("{p}.attn.qkv"), dim, 3 * dim, true)?,
                            proj: self.linear(&format!("{p}.attn.proj"), dim, dim, true)?,
                            norm2: self.ln(&format!("{p}.norm2"), dim)?,
                            linear1: self.linear(&format!("{p}.mlp.linear1"), dim, 4 * dim, true)?,
                            linear2: self.linear(&format!("{p}.mlp.linear2"), 4 * dim, dim, true)?,
                            heads: a.num_heads[s],
                            shifted: b % 2 == 1,
                        })
                    })
                    .collect::<Result<_, CheckpointError>>()?;
                let p = format!("swinViT.layers{}.0.downsample", s + 1);
                Ok(Stage { blocks, downsample: Merge { norm: self.ln(&format!("{p}.norm"), 8 * dim)?, reduction: self.linear(&format!("{p}.reduction"), 8 * dim, 2 * dim, false)? } })
            })
            .collect::<Result<_, CheckpointError>>()?;
        let encoders = [("encoder1", a.in_channels, f), ("encoder2", f, f), ("encoder3", 2 * f, 2 * f), ("encoder4", 4 * f, 4 * f), ("encoder10", 16 * f, 16 * f)]
            .into_iter()
            .map(|(name, cin, c)| self.res(&format!("{name}.layer"), cin, c))
            .collect::<Result<_, _>>()?;
        let decoders = [("decoder5", 16 * f, 8 * f), ("decoder4", 8 * f, 4 * f), ("decoder3", 4 * f, 2 * f), ("decoder2", 2 * f, f), ("decoder1", f, f)]
            .into_iter()
            .map(|(name, cin, c)| {
                Ok(UpBlock { transp_conv: self.tensor(&format!("{name}.transp_conv.conv.weight"), [cin, c, 2, 2, 2], Self::torch_weight())?, conv_block: self.res(&format!("{name}.conv_block"), 2 * c, c)? })
            })
            .collect::<Result<_, CheckpointError>>()?;
        let (patch_weight, patch_bias) = self.torch_layer("swinViT.patch_embed.proj", [f, a.in_channels, 2, 2, 2], f)?;
        let (out_weight, out_bias) = self.torch_layer("out.conv.conv", [a.num_classes, f, 1, 1, 1], a.num_classes)?;
        Ok(SwinUnetr {
            patch_weight,
            patch_bias,
            out_weight,
            out_bias,
            stages,
            encoders,
            decoders,
            arch: a.clone(), init: InitRules::default(),
        })
    }
}

impl SwinUnetr {
    /// A freshly initialised network.
    pub fn new(arch: &SwinArch, device: &Device) -> Result<Self, String> {
        arch.validate()?;
        let b = Builder::fresh(device);
        let net = b.build(arch).map_err(|e| e.to_string())?;
        Ok(Self { init: b.into_rules(), ..net })
    }

    /// From MONAI's state dict (any container); the architecture comes from the shapes.
    pub fn from_state_dict(dict: &StateDict, device: &Device) -> Result<Self, CheckpointError> {
        let arch = infer_arch(dict)?;
        // The relative-position buffers are recomputed, so they may be absent.
        check_keys(dict, &arch.keys(), NAME, |k| k.ends_with("relative_position_index"))?;
        Builder::reading(dict, device).build(&arch)
    }

    fn run(&self, x: Tensor<5>) -> Tensor<5> {
        let [b, c, d, h, w] = x.dims();
        assert!([d, h, w].iter().all(|v| v % DIVISOR[0] == 0), "SwinUNETR needs input extents divisible by 32, got {d}×{h}×{w}");
        let f = self.arch.feature_size;
        // 2³ patch embedding as a matrix product; channels-last tokens.
        let pw = self.patch_weight.val().reshape([f, c * 8]);
        let t = patches(x.clone(), [2; 3]).matmul(pw.transpose()) + self.patch_bias.val().reshape([1, f]);
        let mut t = t.reshape([b, d / 2, h / 2, w / 2, f]);
        let rel = relative_position_index();
        let l = Layout::for_device(&x.device());
        let to_l = |t: Tensor<5>| l.from_ncdhw(t.permute([0, 4, 1, 2, 3]));
        let mut hidden = vec![to_l(layer_norm_plain(t.clone()))];
        for st in &self.stages {
            for blk in &st.blocks {
                t = blk.forward(t, &rel);
            }
            t = st.downsample.forward(t);
            hidden.push(to_l(layer_norm_plain(t.clone())));
        }
        let x = l.from_ncdhw(x);
        let e = &self.encoders;
        let enc0 = e[0].forward(x, l);
        let enc1 = e[1].forward(hidden[0].clone(), l);
        let enc2 = e[2].forward(hidden[1].clone(), l);
        let enc3 = e[3].forward(hidden[2].clone(), l);
        let mut y = e[4].forward(hidden[4].clone(), l);
        for (blk, skip) in self.decoders.iter().zip([hidden[3].clone(), enc3, enc2, enc1, enc0]) {
            let u = up(y, blk.transp_conv.val(), l);
            y = blk.conv_block.forward(Tensor::cat(vec![u, skip], l.channel_axis()), l);
        }
        ops::head_to_ncdhw(y, self.out_weight.val(), self.out_bias.val(), l)
    }
}

impl SegNet for SwinUnetr {
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
        DIVISOR
    }
    fn forward_ds(&self, x: Tensor<5>) -> Vec<Tensor<5>> {
        vec![self.run(x)]
    }
    fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        self.run(x)
    }
    fn state_dict(&self) -> Vec<NamedTensor> {
        let mut e = Export::default();
        let n = WINDOW.pow(3);
        let index: Vec<f32> = relative_position_index().into_iter().map(|v| v as f32).collect();
        e.put("swinViT.patch_embed.proj.weight".into(), self.patch_weight.val());
        e.put("swinViT.patch_embed.proj.bias".into(), self.patch_bias.val());
        for (s, st) in self.stages.iter().enumerate() {
            for (i, blk) in st.blocks.iter().enumerate() {
                let p = format!("swinViT.layers{}.0.blocks.{i}", s + 1);
                e.put(format!("{p}.norm1.weight"), blk.norm1.weight.val());
                e.put(format!("{p}.norm1.bias"), blk.norm1.bias.val());
                e.put(format!("{p}.attn.relative_position_bias_table"), blk.bias_table.val());
                e.put_host(NamedTensor { name: format!("{p}.attn.relative_position_index"), shape: vec![n, n], data: index.clone() });
                for (name, lin) in [("attn.qkv", &blk.qkv), ("attn.proj", &blk.proj), ("mlp.linear1", &blk.linear1), ("mlp.linear2", &blk.linear2)] {
                    e.put(format!("{p}.{name}.weight"), lin.weight.val());
                    if let Some(bias) = &lin.bias {
                        e.put(format!("{p}.{name}.bias"), bias.val());
                    }
                }
                e.put(format!("{p}.norm2.weight"), blk.norm2.weight.val());
                e.put(format!("{p}.norm2.bias"), blk.norm2.bias.val());
            }
            let p = format!("swinViT.layers{}.0.downsample", s + 1);
            e.put(format!("{p}.reduction.weight"), st.downsample.reduction.weight.val());
            e.put(format!("{p}.norm.weight"), st.downsample.norm.weight.val());
            e.put(format!("{p}.norm.bias"), st.downsample.norm.bias.val());
        }
        for (name, r) in ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10"].into_iter().zip(&self.encoders) {
            e.res(&format!("{name}.layer"), r);
        }
        for (name, d) in ["decoder5", "decoder4", "decoder3", "decoder2", "decoder1"].into_iter().zip(&self.decoders) {
            e.put(format!("{name}.transp_conv.conv.weight"), d.transp_conv.val());
            e.res(&format!("{name}.conv_block"), &d.conv_block);
        }
        e.put("out.conv.conv.weight".into(), self.out_weight.val());
        e.put("out.conv.conv.bias".into(), self.out_bias.val());
        e.finish(self.arch.keys().into_iter().map(|(k, _)| k))
    }
    fn num_params(&self) -> usize {
        Module::num_params(self)
    }
    stu_engine::segnet_training_hooks!();

    fn describe(&self) -> serde_json::Value {
        let a = &self.arch;
        serde_json::json!({
            "model": NAME,
            "in_channels": a.in_channels,
            "num_classes": a.num_classes,
            "feature_size": a.feature_size,
            "depths": a.depths,
            "num_heads": a.num_heads,
            "params": Module::num_params(self),
            "macs_128": a.macs(128),
            "options": {"feature_size": a.feature_size, "depths": a.depths, "num_heads": a.num_heads},
        })
    }
}

/// The architecture from MONAI's tensor shapes (heads from the bias tables).
pub fn infer_arch(dict: &StateDict) -> Result<SwinArch, CheckpointError> {
    let err = |reason: String| CheckpointError::Architecture { path: dict.path().to_path_buf(), reason };
    let pe = dict.shape("swinViT.patch_embed.proj.weight")?;
    let out = dict.shape("out.conv.conv.weight")?;
    let mut depths = Vec::new();
    let mut heads = Vec::new();
    for s in 1..=4 {
        let mut n = 0;
        while dict.keys().any(|k| k.starts_with(&format!("swinViT.layers{s}.0.blocks.{n}."))) {
            n += 1;
        }
        depths.push(n);
        heads.push(dict.shape(&format!("swinViT.layers{s}.0.blocks.0.attn.relative_position_bias_table"))?[1]);
    }
    let arch = SwinArch { in_channels: pe[1], num_classes: out[0], feature_size: pe[0], depths, num_heads: heads };
    arch.validate().map_err(err)?;
    Ok(arch)
}

/// Size options (MONAI's argument names); missing ones take MONAI's defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwinOptions {
    /// Stage-0 width.
    pub feature_size: Option<usize>,
    /// Blocks per stage.
    pub depths: Option<Vec<usize>>,
    /// Heads per stage.
    pub num_heads: Option<Vec<usize>>,
}

fn arch_of(spec: &NetSpec) -> Result<SwinArch, String> {
    let o: SwinOptions = options(spec, NAME)?;
    let mut a = SwinArch::monai_default(spec.in_channels, spec.num_classes);
    a.feature_size = o.feature_size.unwrap_or(a.feature_size);
    a.depths = o.depths.unwrap_or(a.depths);
    a.num_heads = o.num_heads.unwrap_or(a.num_heads);
    a.validate().map_err(|e| format!("model options for `{NAME}`: {e}"))?;
    Ok(a)
}

fn build_boxed(spec: &NetSpec, device: &Device) -> Result<Box<dyn SegNet>, String> {
    Ok(Box::new(SwinUnetr::new(&arch_of(spec)?, device)?))
}

fn load_boxed(dict: &StateDict, options: &LoadOptions, device: &Device) -> Result<Box<dyn SegNet>, CheckpointError> {
    let _ = options;
    Ok(Box::new(SwinUnetr::from_state_dict(dict, device)?))
}

/// MONAI's default SwinUNETR for 1 channel and 105 classes.
pub fn default_arch() -> SwinArch {
    SwinArch::monai_default(1, TOTALSEG_CLASSES)
}

fn preset_summaries() -> Vec<PresetSummary> {
    let device = stu_engine::backend::Backend::default_compiled().and_then(|b| b.device().ok()).unwrap_or_default();
    let arch = default_arch();
    let net = SwinUnetr::new(&arch, &device).expect("the default is valid");
    vec![PresetSummary {
        name: NAME.to_string(),
        model: NAME,
        preset: "monai-default",
        blocks: arch.depths.clone(),
        widths: (0..4).map(|s| arch.feature_size << s).collect(),
        params: Module::num_params(&net) as u64,
        state_dict_tensors: arch.keys().len(),
        macs_128: arch.macs(128),
        macs_128_variants: Default::default(),
    }]
}

inventory::submit! {
    ModelEntry {
        name: NAME,
        summary: "SwinUNETR (MONAI, v1): shifted-window transformer over 2³ patches, UNETR's convolutional decoder",
        module_path: module_path!(),
        // 1 (2026-11-29): a fresh network draws its linear weights and relative-position bias tables with
        // sd 0.02, as its builder declares (`seeded_init` drew them by He); GELU's exact gradient
        // and every bias-table lookup's on burn's generic operators.
        // 2 (2026-11-29): linear and convolution weights and biases drawn as PyTorch's
        // `reset_parameters` does, U(±1/√fan_in), as MONAI 1.6.1 leaves them (only the bias tables are its own `trunc_normal_(std=0.02)`); before, linear weights at sd 0.02,
        // convolutions by He, biases 0.
        revision: 2,
        anchor_key: "swinViT.patch_embed.proj.weight",
        presets: preset_summaries,
        load: load_boxed,
        build: build_boxed,
        check: |spec| arch_of(spec).map(|_| InputRule::divisor(DIVISOR)),
    }
}
