//! nnFormer (Zhou et al. 2021) as its authors define it (github.com/282857341/nnFormer,
//! `nnformer/network_architecture/nnFormer_synapse.py`): a convolutional patch embedding
//! (two `project` blocks, 2×4×4), four stages of local-window self-attention with relative
//! position bias (windows 4-4-8-4, every other block shifted), convolutional patch merging, a
//! decoder whose first block per stage is skip attention (keys and values from the encoder's
//! skip, queries from the upsampled features), and transposed-convolution heads. Defaults are
//! the authors' Synapse configuration (embedding 192, heads 6-12-24-48, crop 64×128×128, deep
//! supervision with three outputs).
//!
//! Kept from the reference: the network is built for one crop size and runs only on it (its
//! blocks check the token count against the crop); windows no smaller than a stage's token grid
//! shrink to the grid's smallest side and stop shifting; the relative-position index uses the
//! authors' multipliers (`3w−1`, `2w−1`, 1, so some offsets share a bias entry); patch merging
//! applies GELU and LayerNorm before its stride-2 convolution; the skip-attention block takes
//! its queries without a projection. The `relative_position_index` buffers are in the state
//! dict (recomputed when read, written out). Not reproduced in training: the reference's
//! stochastic depth (drop-path up to 0.2), which changes no weight and no inference output.

use burn::module::{Module, Param};
use burn::tensor::Int;
use serde::{Deserialize, Serialize};
use stu_core::strides::Stride;
use stu_engine::burn;
use stu_engine::checkpoint::{CheckpointError, NamedTensor, StateDict};
use stu_engine::model::{InputRule, LoadOptions, ModelEntry, NetSpec, PresetSummary, SegNet};
use stu_engine::ops::{self, Layout, gelu};
use stu_engine::{Device, Tensor, TensorData};

use stu_engine::train::InitRules;
use crate::parts::{Builder, Export, LayerNorm, Linear, check_keys, options, pad_end, partition, reverse, roll, shift_mask};
use crate::stunet::TOTALSEG_CLASSES;

/// Registry name.
pub const NAME: &str = "nnformer";

/// Stages (the reference's `out_indices` fix four).
pub const STAGES: usize = 4;

/// Everything that fixes an nnFormer's shape (the reference's constructor arguments).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NnFormerArch {
    /// Input channels.
    pub in_channels: usize,
    /// Output classes.
    pub num_classes: usize,
    /// The input extent the network is built for (and the only one it takes).
    pub crop_size: [usize; 3],
    /// Width of stage 0.
    pub embedding_dim: usize,
    /// Blocks per stage (the decoder uses the first three, mirrored).
    pub depths: Vec<usize>,
    /// Heads per stage.
    pub num_heads: Vec<usize>,
    /// Patch embedding extent (its two strided convolutions must multiply to it: 2×4×4).
    pub patch_size: [usize; 3],
    /// Attention window per stage (cubic).
    pub window_size: Vec<usize>,
    /// Three outputs (full, ½, ¼ resolution) instead of one.
    pub deep_supervision: bool,
}

impl NnFormerArch {
    /// The authors' Synapse configuration for a crop.
    pub fn synapse(in_channels: usize, num_classes: usize, crop_size: [usize; 3]) -> Self {
        Self {
            in_channels,
            num_classes,
            crop_size,
            embedding_dim: 192,
            depths: vec![2; STAGES],
            num_heads: vec![6, 12, 24, 48],
            patch_size: [2, 4, 4],
            window_size: vec![4, 4, 8, 4],
            deep_supervision: true,
        }
    }

    /// Width of stage `s`.
    pub fn dim(&self, s: usize) -> usize {
        self.embedding_dim << s
    }

    /// Token grid of stage `s` at the crop size.
    pub fn res(&self, s: usize) -> [usize; 3] {
        [0, 1, 2].map(|a| (self.crop_size[a] / self.patch_size[a]) >> s)
    }

    /// Window and shift of a block of stage `s` (`shifted`: an odd encoder block or a decoder
    /// block after the first): the reference shrinks windows to small grids, which then do not
    /// shift.
    pub fn window(&self, s: usize, shifted: bool) -> (usize, usize) {
        let w = self.window_size[s];
        let m = *self.res(s).iter().min().expect("three axes");
        if m <= w { (m, 0) } else { (w, if shifted { w / 2 } else { 0 }) }
    }

    /// Strides of the two embedding convolutions (the reference's `PatchEmbed`).
    pub fn embed_strides(&self) -> [[usize; 3]; 2] {
        let p = self.patch_size;
        [[p[0], p[1] / 2, p[2] / 2], [p[0] / 2, p[1] / 2, p[2] / 2]]
    }

    /// Output classes' heads: three with deep supervision, else one.
    pub fn heads(&self) -> usize {
        if self.deep_supervision { STAGES - 1 } else { 1 }
    }

    /// Checks the arguments; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.depths.len() != STAGES || self.num_heads.len() != STAGES || self.window_size.len() != STAGES {
            return Err("`depths`, `num_heads` and `window_size` have four entries (four stages)".into());
        }
        if self.in_channels == 0 || self.num_classes == 0 || self.depths.contains(&0) || self.window_size.contains(&0) {
            return Err("counts must be positive".into());
        }
        if self.embedding_dim < 2 || !self.embedding_dim.is_multiple_of(2) {
            return Err(format!("`embedding_dim` must be even (the first embedding block has half of it), got {}", self.embedding_dim));
        }
        for (s, &h) in self.num_heads.iter().enumerate() {
            if h == 0 || !self.dim(s).is_multiple_of(h) {
                return Err(format!("stage {s}: width {} is not divisible by `num_heads` {h}", self.dim(s)));
            }
        }
        let [s1, s2] = self.embed_strides();
        let total = [0, 1, 2].map(|a| s1[a] * s2[a]);
        if total != self.patch_size {
            return Err(format!(
                "`patch_size` {:?}: the reference embeds with strides {s1:?} then {s2:?}, which downsample by {total:?}, not by the patch size (2×4×4 is consistent)",
                self.patch_size
            ));
        }
        for a in 0..3 {
            let unit = self.patch_size[a] << (STAGES - 1);
            if self.crop_size[a] == 0 || !self.crop_size[a].is_multiple_of(unit) {
                return Err(format!("`crop_size` {:?}: each side must be a multiple of patch × 8 = {unit} on axis {a}", self.crop_size));
            }
        }
        Ok(())
    }

    /// Multiply-accumulates of one forward at batch 1 and the crop size, without biases (what
    /// torch's FlopCounterMode counts, ×2): convolutions, transposed convolutions (counted over
    /// their input), the linears over the padded windows, both attention products, the MLPs.
    pub fn macs(&self) -> u64 {
        let v = |r: [usize; 3]| r.iter().product::<usize>() as u64;
        let [s1, _] = self.embed_strides();
        let e = self.embedding_dim as u64;
        let g1 = [0, 1, 2].map(|a| self.crop_size[a] / s1[a]);
        let mut m = v(g1) * (e / 2) * 27 * (self.in_channels as u64 + e / 2);
        m += v(self.res(0)) * e * 27 * (e / 2 + e);
        let block = |s: usize, shifted: bool, kv: bool| -> u64 {
            let (w, _) = self.window(s, shifted);
            let r = self.res(s);
            let padded = v(r.map(|x| x.div_ceil(w) * w));
            let (d, n) = (self.dim(s) as u64, (w * w * w) as u64);
            let input = if kv { 2 * d * d } else { 3 * d * d };
            padded * (input + 2 * n * d + d * d) + v(r) * 8 * d * d
        };
        for s in 0..STAGES {
            m += (0..self.depths[s]).map(|b| block(s, b % 2 == 1, false)).sum::<u64>();
            if s + 1 < STAGES {
                let d = self.dim(s) as u64;
                m += v(self.res(s + 1)) * 2 * d * d * 27;
            }
        }
        for s in 0..STAGES - 1 {
            let d = self.dim(s) as u64;
            m += v(self.res(s + 1)) * 2 * d * d * 8;
            m += block(s, false, true) + (1..self.depths[s]).map(|_| block(s, true, false)).sum::<u64>();
        }
        let p = v(self.patch_size);
        m + (0..self.heads()).map(|i| v(self.res(i)) * self.dim(i) as u64 * self.num_classes as u64 * p).sum::<u64>()
    }

    /// Every state-dict key with its shape, in the reference's order (buffers included).
    pub fn keys(&self) -> Vec<(String, Vec<usize>)> {
        let e = self.embedding_dim;
        let mut k: Vec<(String, Vec<usize>)> = Vec::new();
        let conv = |k: &mut Vec<(String, Vec<usize>)>, p: &str, cin: usize, c: usize| {
            k.push((format!("{p}.weight"), vec![c, cin, 3, 3, 3]));
            k.push((format!("{p}.bias"), vec![c]));
        };
        let ln = |k: &mut Vec<(String, Vec<usize>)>, p: &str, c: usize| {
            k.push((format!("{p}.weight"), vec![c]));
            k.push((format!("{p}.bias"), vec![c]));
        };
        let pe = "model_down.patch_embed";
        conv(&mut k, &format!("{pe}.proj1.conv1"), self.in_channels, e / 2);
        conv(&mut k, &format!("{pe}.proj1.conv2"), e / 2, e / 2);
        ln(&mut k, &format!("{pe}.proj1.norm1"), e / 2);
        ln(&mut k, &format!("{pe}.proj1.norm2"), e / 2);
        conv(&mut k, &format!("{pe}.proj2.conv1"), e / 2, e);
        conv(&mut k, &format!("{pe}.proj2.conv2"), e, e);
        ln(&mut k, &format!("{pe}.proj2.norm1"), e);
        ln(&mut k, &format!("{pe}.norm"), e);
        let block = |k: &mut Vec<(String, Vec<usize>)>, p: &str, s: usize, shifted: bool, kv: bool| {
            let (w, _) = self.window(s, shifted);
            let (d, n) = (self.dim(s), w * w * w);
            ln(k, &format!("{p}.norm1"), d);
            k.push((format!("{p}.attn.relative_position_bias_table"), vec![(2 * w - 1).pow(3), self.num_heads[s]]));
            k.push((format!("{p}.attn.relative_position_index"), vec![n, n]));
            let (name, m) = if kv { ("kv", 2) } else { ("qkv", 3) };
            k.push((format!("{p}.attn.{name}.weight"), vec![m * d, d]));
            k.push((format!("{p}.attn.{name}.bias"), vec![m * d]));
            k.push((format!("{p}.attn.proj.weight"), vec![d, d]));
            k.push((format!("{p}.attn.proj.bias"), vec![d]));
            ln(k, &format!("{p}.norm2"), d);
            k.push((format!("{p}.mlp.fc1.weight"), vec![4 * d, d]));
            k.push((format!("{p}.mlp.fc1.bias"), vec![4 * d]));
            k.push((format!("{p}.mlp.fc2.weight"), vec![d, 4 * d]));
            k.push((format!("{p}.mlp.fc2.bias"), vec![d]));
        };
        for s in 0..STAGES {
            for b in 0..self.depths[s] {
                block(&mut k, &format!("model_down.layers.{s}.blocks.{b}"), s, b % 2 == 1, false);
            }
            if s + 1 < STAGES {
                let p = format!("model_down.layers.{s}.downsample");
                k.push((format!("{p}.reduction.weight"), vec![2 * self.dim(s), self.dim(s), 3, 3, 3]));
                k.push((format!("{p}.reduction.bias"), vec![2 * self.dim(s)]));
                ln(&mut k, &format!("{p}.norm"), self.dim(s));
            }
        }
        for s in 0..STAGES {
            ln(&mut k, &format!("model_down.norm{s}"), self.dim(s));
        }
        for s in 0..STAGES - 1 {
            for b in 0..self.depths[s] {
                block(&mut k, &format!("decoder.layers.{s}.blocks.{b}"), s, b > 0, b == 0);
            }
            let d = self.dim(s);
            ln(&mut k, &format!("decoder.layers.{s}.Upsample.norm"), 2 * d);
            k.push((format!("decoder.layers.{s}.Upsample.up.weight"), vec![2 * d, d, 2, 2, 2]));
            k.push((format!("decoder.layers.{s}.Upsample.up.bias"), vec![d]));
        }
        let p = self.patch_size;
        for i in 0..self.heads() {
            k.push((format!("final.{i}.up.weight"), vec![self.dim(i), self.num_classes, p[0], p[1], p[2]]));
            k.push((format!("final.{i}.up.bias"), vec![self.num_classes]));
        }
        k
    }
}

/// nnFormer's relative-position index of a `w`³ window (`[n·n]`, row-major `[n, n]`), with the
/// authors' multipliers.
pub fn relative_position_index(w: usize) -> Vec<i64> {
    let w = w as i64;
    let coords: Vec<[i64; 3]> = (0..w).flat_map(|d| (0..w).flat_map(move |h| (0..w).map(move |x| [d, h, x]))).collect();
    let mut out = Vec::with_capacity(coords.len() * coords.len());
    for a in &coords {
        for b in &coords {
            let r = [a[0] - b[0] + w - 1, a[1] - b[1] + w - 1, a[2] - b[2] + w - 1];
            out.push(r[0] * (3 * w - 1) + r[1] * (2 * w - 1) + r[2]);
        }
    }
    out
}

/// A 3³ convolution with bias (`nn.Conv3d(k=3, padding=1)`).
#[derive(Module, Debug)]
pub struct Conv {
    /// `[Cout, Cin, 3, 3, 3]`.
    pub weight: Param<Tensor<5>>,
    /// `[Cout]`.
    pub bias: Param<Tensor<1>>,
}

/// The reference's `project`: conv, GELU, LayerNorm, conv, then (unless last) GELU, LayerNorm.
#[derive(Module, Debug)]
pub struct Project {
    /// Strided conv.
    pub conv1: Conv,
    /// Stride-1 conv.
    pub conv2: Conv,
    /// After conv1.
    pub norm1: LayerNorm,
    /// After conv2 (not in the last block).
    pub norm2: Option<LayerNorm>,
    /// conv1's stride.
    #[module(skip)]
    pub stride: [usize; 3],
}

/// One transformer block: (skip) window attention with relative position bias, then MLP.
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before attention (of the input, or of skip and upsampled features alike).
    pub norm1: LayerNorm,
    /// `[(2w−1)³, heads]`.
    pub bias_table: Param<Tensor<2>>,
    /// `qkv` (3C), or `kv` (2C) in a skip-attention block.
    pub qkv: Linear,
    /// Output projection.
    pub proj: Linear,
    /// Norm before the MLP.
    pub norm2: LayerNorm,
    /// MLP in.
    pub fc1: Linear,
    /// MLP out.
    pub fc2: Linear,
    /// Heads.
    #[module(skip)]
    pub heads: usize,
    /// Window side.
    #[module(skip)]
    pub window: usize,
    /// Cyclic shift (0: none).
    #[module(skip)]
    pub shift: usize,
}

/// Patch merging (`PatchMerging`): GELU, LayerNorm, stride-2 conv C → 2C.
#[derive(Module, Debug)]
pub struct Merging {
    /// Norm over C.
    pub norm: LayerNorm,
    /// `[2C, C, 3, 3, 3]` conv.
    pub reduction: Conv,
}

/// An encoder stage: blocks, then (but for the last) patch merging.
#[derive(Module, Debug)]
pub struct Stage {
    /// Blocks.
    pub blocks: Vec<Block>,
    /// Downsampling (none in the last stage).
    pub downsample: Option<Merging>,
}

/// A decoder stage: LayerNorm and 2³ transposed conv (2C → C), skip attention, blocks.
#[derive(Module, Debug)]
pub struct UpStage {
    /// Upsampling norm (2C).
    pub up_norm: LayerNorm,
    /// `[2C, C, 2, 2, 2]`.
    pub up_weight: Param<Tensor<5>>,
    /// `[C]`.
    pub up_bias: Param<Tensor<1>>,
    /// Skip attention first, then shifted blocks.
    pub blocks: Vec<Block>,
}

/// The network.
#[derive(Module, Debug)]
pub struct NnFormer {
    /// Patch embedding, first block.
    pub proj1: Project,
    /// Patch embedding, second block.
    pub proj2: Project,
    /// Embedding norm.
    pub embed_norm: LayerNorm,
    /// Encoder stages.
    pub stages: Vec<Stage>,
    /// Norms of the encoder outputs (`norm0` … `norm3`).
    pub out_norms: Vec<LayerNorm>,
    /// Decoder stages, indexed by the stage they produce (0 = finest).
    pub up: Vec<UpStage>,
    /// Heads: `[C_i, classes, patch]` transposed convs.
    pub final_weight: Vec<Param<Tensor<5>>>,
    /// Head biases.
    pub final_bias: Vec<Param<Tensor<1>>>,
    /// The architecture.
    #[module(skip)]
    pub arch: NnFormerArch,
    /// How each parameter was declared to be drawn (fresh networks; `seeded_init`).
    #[module(skip)]
    pub init: InitRules,
}

/// LayerNorm over the channels of a channels-last map.
fn ln5(norm: &LayerNorm, x: Tensor<5>) -> Tensor<5> {
    let [b, d, h, w, c] = x.dims();
    norm.forward(x.reshape([b, d * h * w, c])).reshape([b, d, h, w, c])
}

/// A convolution on a channels-last map, whatever the device's layout.
fn conv(x: Tensor<5>, c: &Conv, stride: [usize; 3], l: Layout) -> Tensor<5> {
    match l {
        Layout::Ndhwc => ops::conv3d(x, c.weight.val(), c.bias.val(), stride, l),
        Layout::Ncdhw => ops::conv3d(x.permute([0, 4, 1, 2, 3]), c.weight.val(), c.bias.val(), stride, l).permute([0, 2, 3, 4, 1]),
    }
}

/// `ConvTranspose3d(k = s, stride = s)` on a channels-last map.
fn conv_t(x: Tensor<5>, w: Tensor<5>, b: Tensor<1>, l: Layout) -> Tensor<5> {
    match l {
        Layout::Ndhwc => ops::conv_transpose_ks(x, w, b, l),
        Layout::Ncdhw => ops::conv_transpose_ks(x.permute([0, 4, 1, 2, 3]), w, b, l).permute([0, 2, 3, 4, 1]),
    }
}

impl Project {
    fn forward(&self, x: Tensor<5>, l: Layout) -> Tensor<5> {
        let x = ln5(&self.norm1, gelu(conv(x, &self.conv1, self.stride, l)));
        let x = conv(x, &self.conv2, [1; 3], l);
        match &self.norm2 {
            Some(n) => ln5(n, gelu(x)),
            None => x,
        }
    }
}

impl Block {
    /// Attention of windowed queries `q` `[bw, heads, n, hd]` (scaled) over keys and values.
    fn attend(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, padded: [usize; 3]) -> Tensor<3> {
        let [bw, heads, n, hd] = q.dims();
        let device = q.device();
        let mut attn = q.matmul(k.swap_dims(2, 3));
        let idx = Tensor::<1, Int>::from_data(TensorData::new(relative_position_index(self.window), [n * n]), &device);
        let bias = stu_engine::ops::lookup_rows(self.bias_table.val(), idx).reshape([n, n, heads]).permute([2, 0, 1]);
        attn = attn + bias.unsqueeze::<4>();
        if self.shift > 0 {
            let m = shift_mask(padded, [self.window; 3], [self.shift; 3]);
            let nw = m.len() / (n * n);
            let mask = Tensor::<3>::from_data(TensorData::new(m, [nw, n, n]), &device);
            attn = (attn.reshape([bw / nw, nw, heads, n, n]) + mask.reshape([1, nw, 1, n, n])).reshape([bw, heads, n, n]);
        }
        let attn = burn::tensor::activation::softmax(attn, 3);
        attn.matmul(v).swap_dims(1, 2).reshape([bw, n, heads * hd])
    }

    /// Windows of a normed map (padded, shifted): `[bw, n, C]` and the padded extent.
    fn windows(&self, x: Tensor<5>) -> (Tensor<3>, [usize; 3]) {
        let [_, d, h, w, _] = x.dims();
        let ws = self.window;
        let padded = [d.div_ceil(ws) * ws, h.div_ceil(ws) * ws, w.div_ceil(ws) * ws];
        let x = pad_end(x, padded);
        let x = if self.shift > 0 { roll(x, [self.shift; 3], false) } else { x };
        (partition(x, [ws; 3]), padded)
    }

    /// Back from windows, residual, MLP.
    fn finish(&self, y: Tensor<3>, shortcut: Tensor<5>, padded: [usize; 3]) -> Tensor<5> {
        let [b, d, h, w, c] = shortcut.dims();
        let y = reverse(self.proj.forward(y), [self.window; 3], [b, padded[0], padded[1], padded[2]]);
        let y = if self.shift > 0 { roll(y, [self.shift; 3], true) } else { y };
        let x = shortcut + y.slice([0..b, 0..d, 0..h, 0..w, 0..c]);
        let flat = x.clone().reshape([b, d * h * w, c]);
        let m = self.fc2.forward(gelu(self.fc1.forward(self.norm2.forward(flat))));
        x + m.reshape([b, d, h, w, c])
    }

    /// Self-attention block (`SwinTransformerBlock`).
    fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        let c = x.dims()[4];
        let (win, padded) = self.windows(ln5(&self.norm1, x.clone()));
        let [bw, n, _] = win.dims();
        let (heads, hd) = (self.heads, c / self.heads);
        let qkv = self.qkv.forward(win).reshape([bw, n, 3, heads, hd]);
        let part = |i: usize| qkv.clone().narrow(2, i, 1).reshape([bw, n, heads, hd]).swap_dims(1, 2);
        let y = self.attend(part(0) * (hd as f64).powf(-0.5), part(1), part(2), padded);
        self.finish(y, x, padded)
    }

    /// Skip attention (`SwinTransformerBlock_kv`): keys and values from the normed skip, queries
    /// are the normed upsampled features themselves; the residual is their sum `x`.
    fn forward_kv(&self, x: Tensor<5>, skip: Tensor<5>, x_up: Tensor<5>) -> Tensor<5> {
        let c = x.dims()[4];
        let (skip, padded) = self.windows(ln5(&self.norm1, skip));
        let (q, _) = self.windows(ln5(&self.norm1, x_up));
        let [bw, n, _] = skip.dims();
        let (heads, hd) = (self.heads, c / self.heads);
        let kv = self.qkv.forward(skip).reshape([bw, n, 2, heads, hd]);
        let part = |i: usize| kv.clone().narrow(2, i, 1).reshape([bw, n, heads, hd]).swap_dims(1, 2);
        let q = q.reshape([bw, n, heads, hd]).swap_dims(1, 2) * (hd as f64).powf(-0.5);
        let y = self.attend(q, part(0), part(1), padded);
        self.finish(y, x, padded)
    }
}

/// nnFormer's layers, made by the shared [`Builder`].
trait NnFormerBuild {
    fn build(&self, a: &NnFormerArch) -> Result<NnFormer, CheckpointError>;
    fn conv(&self, key: &str, cin: usize, c: usize) -> Result<Conv, CheckpointError>;
    fn block(&self, key: &str, a: &NnFormerArch, s: usize, shifted: bool, kv: bool) -> Result<Block, CheckpointError>;
}

impl NnFormerBuild for Builder<'_> {
    fn conv(&self, key: &str, cin: usize, c: usize) -> Result<Conv, CheckpointError> {
        let (weight, bias) = self.torch_layer(key, [c, cin, 3, 3, 3], c)?;
        Ok(Conv { weight, bias })
    }

    fn block(&self, p: &str, a: &NnFormerArch, s: usize, shifted: bool, kv: bool) -> Result<Block, CheckpointError> {
        let (window, shift) = a.window(s, shifted);
        let d = a.dim(s);
        Ok(Block {
            norm1: self.ln(&format!("{p}.norm1"), d)?,
            bias_table: self.tensor(&format!("{p}.attn.relative_position_bias_table"), [(2 * window - 1).pow(3), a.num_heads[s]], Self::trunc_normal())?,
            qkv: if kv { self.linear(&format!("{p}.attn.kv"), d, 2 * d, true)? } else { self.linear(&format!("{p}.attn.qkv"), d, 3 * d, true)? },
            proj: self.linear(&format!("{p}.attn.proj"), d, d, true)?,
            norm2: self.ln(&format!("{p}.norm2"), d)?,
            fc1: self.linear(&format!("{p}.mlp.fc1"), d, 4 * d, true)?,
            fc2: self.linear(&format!("{p}.mlp.fc2"), 4 * d, d, true)?,
            heads: a.num_heads[s],
            window,
            shift: if kv { 0 } else { shift },
        })
    }

    fn build(&self, a: &NnFormerArch) -> Result<NnFormer, CheckpointError> {
        let e = a.embedding_dim;
        let pe = "model_down.patch_embed";
        let [s1, s2] = a.embed_strides();
        let proj1 = Project {
            conv1: self.conv(&format!("{pe}.proj1.conv1"), a.in_channels, e / 2)?,
            conv2: self.conv(&format!("{pe}.proj1.conv2"), e / 2, e / 2)?,
            norm1: self.ln(&format!("{pe}.proj1.norm1"), e / 2)?,
            norm2: Some(self.ln(&format!("{pe}.proj1.norm2"), e / 2)?),
            stride: s1,
        };
        let proj2 = Project {
            conv1: self.conv(&format!("{pe}.proj2.conv1"), e / 2, e)?,
            conv2: self.conv(&format!("{pe}.proj2.conv2"), e, e)?,
            norm1: self.ln(&format!("{pe}.proj2.norm1"), e)?,
            norm2: None,
            stride: s2,
        };
        let stages = (0..STAGES)
            .map(|s| {
                let blocks = (0..a.depths[s]).map(|b| self.block(&format!("model_down.layers.{s}.blocks.{b}"), a, s, b % 2 == 1, false)).collect::<Result<_, _>>()?;
                let p = format!("model_down.layers.{s}.downsample");
                let last = s + 1 == STAGES;
                Ok(Stage {
                    blocks,
                    downsample: if last { None } else { Some(Merging { norm: self.ln(&format!("{p}.norm"), a.dim(s))?, reduction: self.conv(&format!("{p}.reduction"), a.dim(s), 2 * a.dim(s))? }) },
                })
            })
            .collect::<Result<_, CheckpointError>>()?;
        let out_norms = (0..STAGES).map(|s| self.ln(&format!("model_down.norm{s}"), a.dim(s))).collect::<Result<_, _>>()?;
        let up = (0..STAGES - 1)
            .map(|s| {
                let p = format!("decoder.layers.{s}");
                let d = a.dim(s);
                let up_norm = self.ln(&format!("{p}.Upsample.norm"), 2 * d)?;
                let (up_weight, up_bias) = self.torch_layer(&format!("{p}.Upsample.up"), [2 * d, d, 2, 2, 2], d)?;
                Ok(UpStage {
                    up_norm,
                    up_weight,
                    up_bias,
                    blocks: (0..a.depths[s]).map(|b| self.block(&format!("{p}.blocks.{b}"), a, s, b > 0, b == 0)).collect::<Result<_, _>>()?,
                })
            })
            .collect::<Result<_, CheckpointError>>()?;
        let p = a.patch_size;
        let heads: Vec<_> = (0..a.heads()).map(|i| self.torch_layer(&format!("final.{i}.up"), [a.dim(i), a.num_classes, p[0], p[1], p[2]], a.num_classes)).collect::<Result<_, _>>()?;
        let (final_weight, final_bias) = heads.into_iter().unzip();
        Ok(NnFormer { proj1, proj2, embed_norm: self.ln(&format!("{pe}.norm"), e)?, stages, out_norms, up, final_weight, final_bias, arch: a.clone(), init: InitRules::default() })
    }
}

impl NnFormer {
    /// A freshly initialised network.
    pub fn new(arch: &NnFormerArch, device: &Device) -> Result<Self, String> {
        arch.validate()?;
        let b = Builder::fresh(device);
        let net = b.build(arch).map_err(|e| e.to_string())?;
        Ok(Self { init: b.into_rules(), ..net })
    }

    /// From the reference's state dict (any container); see [`infer_arch`] for the crop size.
    pub fn from_state_dict(dict: &StateDict, device: &Device) -> Result<Self, CheckpointError> {
        let arch = infer_arch(dict)?;
        check_keys(dict, &arch.keys(), NAME, |k| k.ends_with("relative_position_index"))?;
        Builder::reading(dict, device).build(&arch)
    }

    /// The outputs, full resolution first (NCDHW).
    fn run(&self, x: Tensor<5>, all: bool) -> Vec<Tensor<5>> {
        let [_, _, d, h, w] = x.dims();
        let a = &self.arch;
        assert!([d, h, w] == a.crop_size, "nnFormer is built for a {:?} input (its crop size), got {d}×{h}×{w}", a.crop_size);
        let l = Layout::for_device(&x.device());
        let t = x.permute([0, 2, 3, 4, 1]);
        let t = self.proj2.forward(self.proj1.forward(t, l), l);
        let mut t = ln5(&self.embed_norm, t);
        let mut skips = Vec::with_capacity(STAGES);
        for (s, st) in self.stages.iter().enumerate() {
            for blk in &st.blocks {
                t = blk.forward(t);
            }
            skips.push(ln5(&self.out_norms[s], t.clone()));
            if let Some(m) = &st.downsample {
                t = conv(ln5(&m.norm, gelu(t)), &m.reduction, [2; 3], l);
            }
        }
        let mut x = skips[STAGES - 1].clone();
        let mut outs = vec![None; STAGES - 1];
        for s in (0..STAGES - 1).rev() {
            let u = &self.up[s];
            let x_up = conv_t(ln5(&u.up_norm, x), u.up_weight.val(), u.up_bias.val(), l);
            let skip = skips[s].clone();
            x = u.blocks[0].forward_kv(x_up.clone() + skip.clone(), skip, x_up);
            for blk in &u.blocks[1..] {
                x = blk.forward(x);
            }
            if s < self.final_weight.len() && (all || s == 0) {
                outs[s] = Some(conv_t(x.clone(), self.final_weight[s].val(), self.final_bias[s].val(), l).permute([0, 4, 1, 2, 3]));
            }
        }
        outs.into_iter().flatten().collect()
    }
}

impl SegNet for NnFormer {
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
        self.arch.crop_size
    }
    fn fixed_input(&self) -> Option<Stride> {
        Some(self.arch.crop_size)
    }
    fn forward_ds(&self, x: Tensor<5>) -> Vec<Tensor<5>> {
        self.run(x, true)
    }
    fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        self.run(x, false).remove(0)
    }
    fn state_dict(&self) -> Vec<NamedTensor> {
        let a = &self.arch;
        let mut e = Export::default();
        let conv = |e: &mut Export, p: &str, c: &Conv| {
            e.put(format!("{p}.weight"), c.weight.val());
            e.put(format!("{p}.bias"), c.bias.val());
        };
        let ln = |e: &mut Export, p: &str, n: &LayerNorm| {
            e.put(format!("{p}.weight"), n.weight.val());
            e.put(format!("{p}.bias"), n.bias.val());
        };
        let lin = |e: &mut Export, p: &str, n: &Linear| {
            e.put(format!("{p}.weight"), n.weight.val());
            if let Some(b) = &n.bias {
                e.put(format!("{p}.bias"), b.val());
            }
        };
        let block = |e: &mut Export, p: &str, b: &Block, kv: bool| {
            let n = b.window.pow(3);
            ln(e, &format!("{p}.norm1"), &b.norm1);
            e.put(format!("{p}.attn.relative_position_bias_table"), b.bias_table.val());
            let index = relative_position_index(b.window).into_iter().map(|v| v as f32).collect();
            e.put_host(NamedTensor { name: format!("{p}.attn.relative_position_index"), shape: vec![n, n], data: index });
            lin(e, &format!("{p}.attn.{}", if kv { "kv" } else { "qkv" }), &b.qkv);
            lin(e, &format!("{p}.attn.proj"), &b.proj);
            ln(e, &format!("{p}.norm2"), &b.norm2);
            lin(e, &format!("{p}.mlp.fc1"), &b.fc1);
            lin(e, &format!("{p}.mlp.fc2"), &b.fc2);
        };
        let pe = "model_down.patch_embed";
        for (name, pr) in [("proj1", &self.proj1), ("proj2", &self.proj2)] {
            conv(&mut e, &format!("{pe}.{name}.conv1"), &pr.conv1);
            conv(&mut e, &format!("{pe}.{name}.conv2"), &pr.conv2);
            ln(&mut e, &format!("{pe}.{name}.norm1"), &pr.norm1);
            if let Some(n) = &pr.norm2 {
                ln(&mut e, &format!("{pe}.{name}.norm2"), n);
            }
        }
        ln(&mut e, &format!("{pe}.norm"), &self.embed_norm);
        for (s, st) in self.stages.iter().enumerate() {
            for (i, b) in st.blocks.iter().enumerate() {
                block(&mut e, &format!("model_down.layers.{s}.blocks.{i}"), b, false);
            }
            if let Some(m) = &st.downsample {
                conv(&mut e, &format!("model_down.layers.{s}.downsample.reduction"), &m.reduction);
                ln(&mut e, &format!("model_down.layers.{s}.downsample.norm"), &m.norm);
            }
        }
        for (s, n) in self.out_norms.iter().enumerate() {
            ln(&mut e, &format!("model_down.norm{s}"), n);
        }
        for (s, u) in self.up.iter().enumerate() {
            for (i, b) in u.blocks.iter().enumerate() {
                block(&mut e, &format!("decoder.layers.{s}.blocks.{i}"), b, i == 0);
            }
            ln(&mut e, &format!("decoder.layers.{s}.Upsample.norm"), &u.up_norm);
            e.put(format!("decoder.layers.{s}.Upsample.up.weight"), u.up_weight.val());
            e.put(format!("decoder.layers.{s}.Upsample.up.bias"), u.up_bias.val());
        }
        for (i, (w, b)) in self.final_weight.iter().zip(&self.final_bias).enumerate() {
            e.put(format!("final.{i}.up.weight"), w.val());
            e.put(format!("final.{i}.up.bias"), b.val());
        }
        e.finish(a.keys().into_iter().map(|(k, _)| k))
    }
    fn num_params(&self) -> usize {
        Module::num_params(self)
    }
    stu_engine::segnet_training_hooks!();

    fn describe(&self) -> serde_json::Value {
        let a = &self.arch;
        let options = serde_json::json!({
            "crop_size": a.crop_size,
            "embedding_dim": a.embedding_dim,
            "depths": a.depths,
            "num_heads": a.num_heads,
            "patch_size": a.patch_size,
            "window_size": a.window_size,
            "deep_supervision": a.deep_supervision,
        });
        serde_json::json!({
            "model": NAME,
            "in_channels": a.in_channels,
            "num_classes": a.num_classes,
            "crop_size": a.crop_size,
            "embedding_dim": a.embedding_dim,
            "depths": a.depths,
            "num_heads": a.num_heads,
            "params": Module::num_params(self),
            "macs_128": a.with_crop([128; 3]).macs(),
            "options": options,
        })
    }
}

impl NnFormerArch {
    /// The same network built for another crop (windows shrink by the same rule).
    pub fn with_crop(&self, crop_size: [usize; 3]) -> Self {
        Self { crop_size, ..self.clone() }
    }
}

/// The architecture from the reference's tensor shapes. The crop size is not in the weights:
/// it comes from the metadata our files carry (`stu_checkpoint` of training checkpoints, `model`
/// of `stu export`), else it is the Synapse crop 64×128×128; the window of each stage is read
/// from its bias tables and must agree with that crop.
pub fn infer_arch(dict: &StateDict) -> Result<NnFormerArch, CheckpointError> {
    let err = |reason: String| CheckpointError::Architecture { path: dict.path().to_path_buf(), reason };
    let c1 = dict.shape("model_down.patch_embed.proj1.conv1.weight")?;
    let e = dict.shape("model_down.patch_embed.proj2.conv2.weight")?[0];
    let f0 = dict.shape("final.0.up.weight")?;
    if f0.len() != 5 || c1.len() != 5 {
        return Err(err(format!("final.0.up.weight {f0:?} / patch embedding {c1:?} are not nnFormer's")));
    }
    let count = |prefix: &str| (0..).take_while(|b| dict.keys().any(|k| k.starts_with(&format!("{prefix}.blocks.{b}.")))).count();
    let depths: Vec<usize> = (0..STAGES).map(|s| count(&format!("model_down.layers.{s}"))).collect();
    let mut heads = Vec::new();
    let mut windows = Vec::new();
    for s in 0..STAGES {
        let t = dict.shape(&format!("model_down.layers.{s}.blocks.0.attn.relative_position_bias_table"))?;
        heads.push(t[1]);
        let side = (t[0] as f64).cbrt().round() as usize;
        if side * side * side != t[0] || side.is_multiple_of(2) {
            return Err(err(format!("stage {s}: a bias table of {} rows is not (2w−1)³", t[0])));
        }
        windows.push(side.div_ceil(2));
    }
    let parse = |key: &str| dict.metadata().get(key).and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok());
    let model = parse("stu_checkpoint").map(|m| m["model"].clone()).or_else(|| parse("model"));
    let opts = model.as_ref().map(|m| &m["options"]);
    let crop: [usize; 3] = opts.and_then(|o| serde_json::from_value(o["crop_size"].clone()).ok()).unwrap_or([64, 128, 128]);
    let stored_windows: Option<Vec<usize>> = opts.and_then(|o| serde_json::from_value(o["window_size"].clone()).ok());
    let arch = NnFormerArch {
        in_channels: c1[1],
        num_classes: f0[1],
        crop_size: crop,
        embedding_dim: e,
        depths,
        num_heads: heads,
        patch_size: [f0[2], f0[3], f0[4]],
        window_size: stored_windows.unwrap_or(windows.clone()),
        deep_supervision: dict.keys().any(|k| k.starts_with("final.1.")),
    };
    arch.validate().map_err(err)?;
    for (s, &w) in windows.iter().enumerate() {
        if arch.window(s, false).0 != w {
            return Err(err(format!(
                "stage {s}: the bias tables are for {w}³ windows, which a {:?} crop does not give (the crop size is not stored in the reference's weights; ours record it)",
                arch.crop_size
            )));
        }
    }
    Ok(arch)
}

/// Size options (the reference's argument names); missing ones take the Synapse configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NnFormerOptions {
    /// Input extent the network is built for (= the training patch).
    pub crop_size: Option<[usize; 3]>,
    /// Stage-0 width.
    pub embedding_dim: Option<usize>,
    /// Blocks per stage.
    pub depths: Option<Vec<usize>>,
    /// Heads per stage.
    pub num_heads: Option<Vec<usize>>,
    /// Patch embedding extent.
    pub patch_size: Option<[usize; 3]>,
    /// Window per stage.
    pub window_size: Option<Vec<usize>>,
    /// Three outputs.
    pub deep_supervision: Option<bool>,
}

fn arch_of(spec: &NetSpec) -> Result<NnFormerArch, String> {
    let o: NnFormerOptions = options(spec, NAME)?;
    let mut a = NnFormerArch::synapse(spec.in_channels, spec.num_classes, o.crop_size.unwrap_or([64, 128, 128]));
    a.embedding_dim = o.embedding_dim.unwrap_or(a.embedding_dim);
    a.depths = o.depths.unwrap_or(a.depths);
    a.num_heads = o.num_heads.unwrap_or(a.num_heads);
    a.patch_size = o.patch_size.unwrap_or(a.patch_size);
    a.window_size = o.window_size.unwrap_or(a.window_size);
    a.deep_supervision = o.deep_supervision.unwrap_or(a.deep_supervision);
    a.validate().map_err(|e| format!("model options for `{NAME}`: {e}"))?;
    Ok(a)
}

fn build_boxed(spec: &NetSpec, device: &Device) -> Result<Box<dyn SegNet>, String> {
    Ok(Box::new(NnFormer::new(&arch_of(spec)?, device)?))
}

fn load_boxed(dict: &StateDict, options: &LoadOptions, device: &Device) -> Result<Box<dyn SegNet>, CheckpointError> {
    let _ = options;
    Ok(Box::new(NnFormer::from_state_dict(dict, device)?))
}

/// The authors' Synapse nnFormer for 1 channel, 105 classes and a 128³ crop.
pub fn default_arch() -> NnFormerArch {
    NnFormerArch::synapse(1, TOTALSEG_CLASSES, [128; 3])
}

fn preset_summaries() -> Vec<PresetSummary> {
    let device = stu_engine::backend::Backend::default_compiled().and_then(|b| b.device().ok()).unwrap_or_default();
    let arch = default_arch();
    let net = NnFormer::new(&arch, &device).expect("the default is valid");
    vec![PresetSummary {
        name: NAME.to_string(),
        model: NAME,
        preset: "synapse",
        blocks: arch.depths.clone(),
        widths: (0..STAGES).map(|s| arch.dim(s)).collect(),
        params: Module::num_params(&net) as u64,
        state_dict_tensors: arch.keys().len(),
        macs_128: arch.macs(),
        macs_128_variants: Default::default(),
    }]
}

inventory::submit! {
    ModelEntry {
        name: NAME,
        summary: "nnFormer (authors' Synapse configuration): local and skip window attention, convolutional embedding and merging",
        module_path: module_path!(),
        // 1 (2026-11-29): a fresh network draws its linear weights and relative-position bias tables with
        // sd 0.02, as its builder declares (`seeded_init` drew them by He); GELU's exact gradient
        // and every bias-table lookup's on burn's generic operators.
        // 2 (2026-11-29): linear and convolution weights and biases drawn as PyTorch's
        // `reset_parameters` does, U(±1/√fan_in), as its authors' code leaves them (only the bias tables are its own `trunc_normal_(std=.02)`); before, linear weights at sd 0.02,
        // convolutions by He, biases 0.
        revision: 2,
        anchor_key: "model_down.patch_embed.proj1.conv1.weight",
        presets: preset_summaries,
        load: load_boxed,
        build: build_boxed,
        check: |spec| arch_of(spec).map(|a| InputRule::fixed(a.crop_size)),
    }
}
