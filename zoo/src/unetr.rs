//! UNETR (Hatamizadeh et al. 2022) as MONAI 1.6 defines it (`monai.networks.nets.UNETR`):
//! a ViT encoder over 16³ patches (12 blocks, hidden 768, MLP 3072, 12 heads, no qkv bias,
//! learnable position embeddings), whose hidden states after blocks 3, 6 and 9 and its normed
//! output feed a convolutional decoder of transposed convolutions and residual blocks
//! (`UnetResBlock`: InstanceNorm without affine, LeakyReLU 0.01, convolutions without bias), and
//! a 1×1 head. Defaults are MONAI's; one output (no deep supervision: `forward_ds` returns the
//! full-resolution logits alone, so training weights it 1).
//!
//! MONAI registers a `norm_cross_attn` LayerNorm in every block even without cross-attention;
//! it is a parameter (counted, loaded, exported) that the forward does not use.

use burn::module::{Module, Param};
use serde::{Deserialize, Serialize};
use stu_core::strides::Stride;
use stu_engine::burn;
use stu_engine::checkpoint::{CheckpointError, NamedTensor, StateDict};
use stu_engine::model::{InputRule, LoadOptions, ModelEntry, NetSpec, PresetSummary, SegNet};
use stu_engine::ops::{self, Layout};
use stu_engine::{Device, Tensor};

use stu_engine::train::InitRules;
use crate::parts::{Builder, Export, LayerNorm, Linear, ResBlock, UpBlock, check_keys, options, up};
use crate::stunet::TOTALSEG_CLASSES;

/// Registry name.
pub const NAME: &str = "unetr";

/// Everything that fixes a UNETR's shape (MONAI's constructor arguments).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnetrArch {
    /// Input channels.
    pub in_channels: usize,
    /// Output classes.
    pub num_classes: usize,
    /// Input extent (cubic), a multiple of 16.
    pub img_size: usize,
    /// Decoder base width (`feature_size`).
    pub feature_size: usize,
    /// Transformer width.
    pub hidden_size: usize,
    /// MLP width.
    pub mlp_dim: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Transformer blocks (MONAI fixes 12; skips come from blocks 3, 6, 9).
    pub num_layers: usize,
}

/// ViT patch size (MONAI's UNETR fixes 16).
pub const PATCH: usize = 16;

impl UnetrArch {
    /// MONAI's defaults for a task.
    pub fn monai_default(in_channels: usize, num_classes: usize, img_size: usize) -> Self {
        Self { in_channels, num_classes, img_size, feature_size: 16, hidden_size: 768, mlp_dim: 3072, num_heads: 12, num_layers: 12 }
    }

    fn tokens(&self) -> usize {
        (self.img_size / PATCH).pow(3)
    }

    /// Multiply-accumulates of one forward at batch 1 without biases (what torch's
    /// FlopCounterMode counts, ×2): patch embedding, linears, the two attention products,
    /// convolutions and transposed convolutions.
    pub fn macs(&self) -> u64 {
        self.macs_at(self.img_size)
    }

    /// [`macs`](Self::macs) of the same layers on a `side`³ input (as many tokens as that has
    /// patches), so that models built for different input sizes compare at 128³.
    pub fn macs_at(&self, side: usize) -> u64 {
        let g = (side / PATCH) as u64;
        let (n, h, f) = (g * g * g, self.hidden_size as u64, self.feature_size as u64);
        let mut m = n * h * (self.in_channels * PATCH.pow(3)) as u64;
        m += self.num_layers as u64 * (n * h * 3 * h + n * h * h + 2 * n * h * self.mlp_dim as u64 + 2 * n * n * h);
        let vox = |side: u64| side * side * side;
        let res = |m: &mut u64, cin: u64, c: u64, side: u64| {
            *m += vox(side) * c * cin * 27 + vox(side) * c * c * 27;
            if cin != c {
                *m += vox(side) * c * cin;
            }
        };
        let s = side as u64;
        res(&mut m, self.in_channels as u64, f, s);
        // encoder2/3/4: transp_conv_init h→out at 2g, then (transposed conv + res block) per layer.
        for (out, layers) in [(2 * f, 2u32), (4 * f, 1), (8 * f, 0)] {
            m += vox(2 * g) * out * h;
            let mut side = 2 * g;
            for _ in 0..layers {
                side *= 2;
                m += vox(side) * out * out;
                res(&mut m, out, out, side);
            }
        }
        for (cin, out, side) in [(h, 8 * f, 2 * g), (8 * f, 4 * f, 4 * g), (4 * f, 2 * f, 8 * g), (2 * f, f, 16 * g)] {
            m += vox(side) * out * cin;
            res(&mut m, 2 * out, out, side);
        }
        m + vox(s) * self.num_classes as u64 * f
    }

    /// Checks the arguments; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.img_size == 0 || !self.img_size.is_multiple_of(PATCH) {
            return Err(format!("`img_size` must be a positive multiple of {PATCH}, got {}", self.img_size));
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(format!("`hidden_size` {} must be divisible by `num_heads` {}", self.hidden_size, self.num_heads));
        }
        if self.num_layers != 12 {
            return Err(format!("`num_layers` must be 12 (UNETR takes skips after blocks 3, 6 and 9), got {}", self.num_layers));
        }
        if self.in_channels == 0 || self.num_classes == 0 || self.feature_size == 0 || self.mlp_dim == 0 {
            return Err("counts must be positive".into());
        }
        Ok(())
    }

    /// Every state-dict key with its shape, in MONAI's order.
    pub fn keys(&self) -> Vec<(String, Vec<usize>)> {
        let (h, f, c) = (self.hidden_size, self.feature_size, self.in_channels);
        let mut k: Vec<(String, Vec<usize>)> = vec![
            ("vit.patch_embedding.position_embeddings".into(), vec![1, self.tokens(), h]),
            ("vit.patch_embedding.patch_embeddings.weight".into(), vec![h, c, PATCH, PATCH, PATCH]),
            ("vit.patch_embedding.patch_embeddings.bias".into(), vec![h]),
        ];
        for b in 0..self.num_layers {
            let p = format!("vit.blocks.{b}");
            k.push((format!("{p}.mlp.linear1.weight"), vec![self.mlp_dim, h]));
            k.push((format!("{p}.mlp.linear1.bias"), vec![self.mlp_dim]));
            k.push((format!("{p}.mlp.linear2.weight"), vec![h, self.mlp_dim]));
            k.push((format!("{p}.mlp.linear2.bias"), vec![h]));
            k.push((format!("{p}.norm1.weight"), vec![h]));
            k.push((format!("{p}.norm1.bias"), vec![h]));
            k.push((format!("{p}.attn.out_proj.weight"), vec![h, h]));
            k.push((format!("{p}.attn.out_proj.bias"), vec![h]));
            k.push((format!("{p}.attn.qkv.weight"), vec![3 * h, h]));
            k.push((format!("{p}.norm2.weight"), vec![h]));
            k.push((format!("{p}.norm2.bias"), vec![h]));
            k.push((format!("{p}.norm_cross_attn.weight"), vec![h]));
            k.push((format!("{p}.norm_cross_attn.bias"), vec![h]));
        }
        k.push(("vit.norm.weight".into(), vec![h]));
        k.push(("vit.norm.bias".into(), vec![h]));
        res_keys(&mut k, "encoder1.layer", c, f);
        for (name, out, layers) in [("encoder2", 2 * f, 2), ("encoder3", 4 * f, 1), ("encoder4", 8 * f, 0)] {
            k.push((format!("{name}.transp_conv_init.conv.weight"), vec![h, out, 2, 2, 2]));
            for i in 0..layers {
                k.push((format!("{name}.blocks.{i}.0.conv.weight"), vec![out, out, 2, 2, 2]));
                res_keys(&mut k, &format!("{name}.blocks.{i}.1"), out, out);
            }
        }
        for (name, cin, out) in [("decoder5", h, 8 * f), ("decoder4", 8 * f, 4 * f), ("decoder3", 4 * f, 2 * f), ("decoder2", 2 * f, f)] {
            k.push((format!("{name}.transp_conv.conv.weight"), vec![cin, out, 2, 2, 2]));
            res_keys(&mut k, &format!("{name}.conv_block"), 2 * out, out);
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

/// MONAI's `TransformerBlock` (self-attention and MLP, pre-norm).
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before attention.
    pub norm1: LayerNorm,
    /// `qkv` (no bias) of `SABlock`.
    pub qkv: Linear,
    /// `out_proj` of `SABlock`.
    pub out_proj: Linear,
    /// Norm before the MLP.
    pub norm2: LayerNorm,
    /// MLP in.
    pub linear1: Linear,
    /// MLP out.
    pub linear2: Linear,
    /// Registered by MONAI, unused without cross-attention.
    pub norm_cross_attn: LayerNorm,
    /// Heads.
    #[module(skip)]
    pub heads: usize,
}

impl Block {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let (h, d) = (self.heads, c / self.heads);
        // "b n (qkv l d) -> qkv b l n d"
        let qkv = self.qkv.forward(self.norm1.forward(x.clone())).reshape([b * n, 3, h, d]);
        let part = |i: usize| qkv.clone().slice([0..b * n, i..i + 1, 0..h, 0..d]).reshape([b, n, h, d]).swap_dims(1, 2);
        let (q, k, v) = (part(0), part(1), part(2));
        let att = burn::tensor::activation::softmax(q.matmul(k.swap_dims(2, 3)) * (d as f64).powf(-0.5), 3);
        let y = att.matmul(v).swap_dims(1, 2).reshape([b, n, c]);
        let x = x + self.out_proj.forward(y);
        let m = self.linear2.forward(stu_engine::ops::gelu(self.linear1.forward(self.norm2.forward(x.clone()))));
        x + m
    }
}

/// One further stage of a `UnetrPrUpBlock`.
#[derive(Module, Debug)]
pub struct PrUpStage {
    /// Transposed conv.
    pub transp: Param<Tensor<5>>,
    /// Residual block.
    pub res: ResBlock,
}

/// `UnetrPrUpBlock`: a transposed conv, then `layers` × (transposed conv, residual block).
#[derive(Module, Debug)]
pub struct PrUp {
    /// First upsampling.
    pub transp_conv_init: Param<Tensor<5>>,
    /// The further stages.
    pub blocks: Vec<PrUpStage>,
}

/// The network.
#[derive(Module, Debug)]
pub struct Unetr {
    /// `[1, tokens, hidden]`.
    pub position_embeddings: Param<Tensor<3>>,
    /// `[hidden, C, 16, 16, 16]`.
    pub patch_weight: Param<Tensor<5>>,
    /// `[hidden]`.
    pub patch_bias: Param<Tensor<1>>,
    /// Transformer blocks.
    pub blocks: Vec<Block>,
    /// Final norm.
    pub norm: LayerNorm,
    /// Full-resolution residual block on the input.
    pub encoder1: ResBlock,
    /// Skips from the transformer (2×, 4×, 8× upsampled).
    pub encoder2: PrUp,
    /// See `encoder2`.
    pub encoder3: PrUp,
    /// See `encoder2`.
    pub encoder4: PrUp,
    /// Decoder, deepest first.
    pub decoder: Vec<UpBlock>,
    /// 1×1 head weight.
    pub out_weight: Param<Tensor<5>>,
    /// 1×1 head bias.
    pub out_bias: Param<Tensor<1>>,
    /// The architecture.
    #[module(skip)]
    pub arch: UnetrArch,
    /// How each parameter was declared to be drawn (fresh networks; `seeded_init`).
    #[module(skip)]
    pub init: InitRules,
}

/// UNETR's layers, made by the shared [`Builder`].
trait UnetrBuild {
    fn build(&self, a: &UnetrArch) -> Result<Unetr, CheckpointError>;
}

impl UnetrBuild for Builder<'_> {
    fn build(&self, a: &UnetrArch) -> Result<Unetr, CheckpointError> {
        let (h, f) = (a.hidden_size, a.feature_size);
        let blocks = (0..a.num_layers)
            .map(|b| {
                let p = format!("vit.blocks.{b}");
                Ok(Block {
                    norm1: self.ln(&format!("{p}.norm1"), h)?,
                    qkv: self.linear(&format!("{p}.attn.qkv"), h, 3 * h, false)?,
                    out_proj: self.linear(&format!("{p}.attn.out_proj"), h, h, true)?,
                    norm2: self.ln(&format!("{p}.norm2"), h)?,
                    linear1: self.linear(&format!("{p}.mlp.linear1"), h, a.mlp_dim, true)?,
                    linear2: self.linear(&format!("{p}.mlp.linear2"), a.mlp_dim, h, true)?,
                    norm_cross_attn: self.ln(&format!("{p}.norm_cross_attn"), h)?,
                    heads: a.num_heads,
                })
            })
            .collect::<Result<_, CheckpointError>>()?;
        let prup = |name: &str, out: usize, layers: usize| -> Result<PrUp, CheckpointError> {
            Ok(PrUp {
                transp_conv_init: self.tensor(&format!("{name}.transp_conv_init.conv.weight"), [h, out, 2, 2, 2], Self::torch_weight())?,
                blocks: (0..layers)
                    .map(|i| Ok(PrUpStage { transp: self.tensor(&format!("{name}.blocks.{i}.0.conv.weight"), [out, out, 2, 2, 2], Self::torch_weight())?, res: self.res(&format!("{name}.blocks.{i}.1"), out, out)? }))
                    .collect::<Result<_, CheckpointError>>()?,
            })
        };
        let decoder = [("decoder5", h, 8 * f), ("decoder4", 8 * f, 4 * f), ("decoder3", 4 * f, 2 * f), ("decoder2", 2 * f, f)]
            .into_iter()
            .map(|(name, cin, out)| {
                Ok(UpBlock {
                    transp_conv: self.tensor(&format!("{name}.transp_conv.conv.weight"), [cin, out, 2, 2, 2], Self::torch_weight())?,
                    conv_block: self.res(&format!("{name}.conv_block"), 2 * out, out)?,
                })
            })
            .collect::<Result<_, CheckpointError>>()?;
        let (patch_weight, patch_bias) = self.torch_layer("vit.patch_embedding.patch_embeddings", [h, a.in_channels, PATCH, PATCH, PATCH], h)?;
        let (out_weight, out_bias) = self.torch_layer("out.conv.conv", [a.num_classes, f, 1, 1, 1], a.num_classes)?;
        Ok(Unetr {
            patch_weight,
            patch_bias,
            out_weight,
            out_bias,
            position_embeddings: self.tensor("vit.patch_embedding.position_embeddings", [1, a.tokens(), h], Self::trunc_normal())?,
            blocks,
            norm: self.ln("vit.norm", h)?,
            encoder1: self.res("encoder1.layer", a.in_channels, f)?,
            encoder2: prup("encoder2", 2 * f, 2)?,
            encoder3: prup("encoder3", 4 * f, 1)?,
            encoder4: prup("encoder4", 8 * f, 0)?,
            decoder,
            arch: a.clone(), init: InitRules::default(),
        })
    }
}

impl Unetr {
    /// A freshly initialised network.
    pub fn new(arch: &UnetrArch, device: &Device) -> Result<Self, String> {
        arch.validate()?;
        let b = Builder::fresh(device);
        let net = b.build(arch).map_err(|e| e.to_string())?;
        Ok(Self { init: b.into_rules(), ..net })
    }

    /// From MONAI's state dict (any container); the architecture comes from the shapes.
    pub fn from_state_dict(dict: &StateDict, device: &Device) -> Result<Self, CheckpointError> {
        let arch = infer_arch(dict)?;
        check_keys(dict, &arch.keys(), NAME, |_| false)?;
        Builder::reading(dict, device).build(&arch)
    }

    fn run(&self, x: Tensor<5>) -> Tensor<5> {
        let a = &self.arch;
        let [b, c, d, hh, w] = x.dims();
        assert!(
            [d, hh, w] == [a.img_size; 3],
            "UNETR was built for {0}³ inputs (its position embeddings), got {d}×{hh}×{w}; predict with a {0}³ patch",
            a.img_size
        );
        let g = a.img_size / PATCH;
        let hid = a.hidden_size;
        // Non-overlapping 16³ patches: a matrix product, tokens in (d, h, w) order.
        let pw = self.patch_weight.val().reshape([hid, c * PATCH * PATCH * PATCH]);
        let tokens = crate::parts::patches(x.clone(), [PATCH; 3]).matmul(pw.transpose()) + self.patch_bias.val().reshape([1, hid]);
        let mut t = tokens.reshape([b, g * g * g, hid]) + self.position_embeddings.val();
        let mut hidden = Vec::new();
        for blk in &self.blocks {
            t = blk.forward(t);
            hidden.push(t.clone());
        }
        let t = self.norm.forward(t);
        let l = Layout::for_device(&x.device());
        // Tokens [B, g³, hidden] are channels-last voxels already.
        let feat = |t: Tensor<3>| l.from_ncdhw(t.reshape([b, g, g, g, hid]).permute([0, 4, 1, 2, 3]));
        let x = l.from_ncdhw(x);
        let enc1 = self.encoder1.forward(x, l);
        let prup = |p: &PrUp, t: Tensor<3>| {
            let mut y = up(feat(t), p.transp_conv_init.val(), l);
            for st in &p.blocks {
                y = st.res.forward(up(y, st.transp.val(), l), l);
            }
            y
        };
        let enc2 = prup(&self.encoder2, hidden[3].clone());
        let enc3 = prup(&self.encoder3, hidden[6].clone());
        let enc4 = prup(&self.encoder4, hidden[9].clone());
        let mut y = feat(t);
        for (blk, skip) in self.decoder.iter().zip([enc4, enc3, enc2, enc1]) {
            let u = up(y, blk.transp_conv.val(), l);
            y = blk.conv_block.forward(Tensor::cat(vec![u, skip], l.channel_axis()), l);
        }
        ops::head_to_ncdhw(y, self.out_weight.val(), self.out_bias.val(), l)
    }
}

impl SegNet for Unetr {
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
        // The input must be exactly `img_size` (its position embeddings); of the sizes that are
        // multiples of this, that is the smallest, which is what callers probe with.
        [self.arch.img_size; 3]
    }
    fn fixed_input(&self) -> Option<Stride> {
        Some([self.arch.img_size; 3])
    }
    fn forward_ds(&self, x: Tensor<5>) -> Vec<Tensor<5>> {
        vec![self.run(x)]
    }
    fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        self.run(x)
    }
    fn state_dict(&self) -> Vec<NamedTensor> {
        let mut e = Export::default();
        e.put("vit.patch_embedding.position_embeddings".into(), self.position_embeddings.val());
        e.put("vit.patch_embedding.patch_embeddings.weight".into(), self.patch_weight.val());
        e.put("vit.patch_embedding.patch_embeddings.bias".into(), self.patch_bias.val());
        for (i, b) in self.blocks.iter().enumerate() {
            let pre = format!("vit.blocks.{i}");
            for (name, ln) in [("norm1", &b.norm1), ("norm2", &b.norm2), ("norm_cross_attn", &b.norm_cross_attn)] {
                e.put(format!("{pre}.{name}.weight"), ln.weight.val());
                e.put(format!("{pre}.{name}.bias"), ln.bias.val());
            }
            for (name, lin) in [("attn.qkv", &b.qkv), ("attn.out_proj", &b.out_proj), ("mlp.linear1", &b.linear1), ("mlp.linear2", &b.linear2)] {
                e.put(format!("{pre}.{name}.weight"), lin.weight.val());
                if let Some(bias) = &lin.bias {
                    e.put(format!("{pre}.{name}.bias"), bias.val());
                }
            }
        }
        e.put("vit.norm.weight".into(), self.norm.weight.val());
        e.put("vit.norm.bias".into(), self.norm.bias.val());
        e.res("encoder1.layer", &self.encoder1);
        for (name, p) in [("encoder2", &self.encoder2), ("encoder3", &self.encoder3), ("encoder4", &self.encoder4)] {
            e.put(format!("{name}.transp_conv_init.conv.weight"), p.transp_conv_init.val());
            for (i, st) in p.blocks.iter().enumerate() {
                e.put(format!("{name}.blocks.{i}.0.conv.weight"), st.transp.val());
                e.res(&format!("{name}.blocks.{i}.1"), &st.res);
            }
        }
        for (name, d) in ["decoder5", "decoder4", "decoder3", "decoder2"].into_iter().zip(&self.decoder) {
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
            "img_size": a.img_size,
            "feature_size": a.feature_size,
            "hidden_size": a.hidden_size,
            "mlp_dim": a.mlp_dim,
            "num_heads": a.num_heads,
            "num_layers": a.num_layers,
            "params": Module::num_params(self),
            "macs_128": a.macs_at(128),
            "options": {"img_size": a.img_size, "feature_size": a.feature_size, "hidden_size": a.hidden_size, "mlp_dim": a.mlp_dim, "num_heads": a.num_heads},
        })
    }
}

/// The architecture from MONAI's tensor shapes.
pub fn infer_arch(dict: &StateDict) -> Result<UnetrArch, CheckpointError> {
    let err = |reason: String| CheckpointError::Architecture { path: dict.path().to_path_buf(), reason };
    let pe = dict.shape("vit.patch_embedding.patch_embeddings.weight")?;
    let pos = dict.shape("vit.patch_embedding.position_embeddings")?;
    let e1 = dict.shape("encoder1.layer.conv1.conv.weight")?;
    let mlp = dict.shape("vit.blocks.0.mlp.linear1.weight")?;
    let out = dict.shape("out.conv.conv.weight")?;
    if pe.len() != 5 || pos.len() != 3 || pe[2..] != [PATCH; 3] {
        return Err(err(format!("patch embedding {pe:?} / position embeddings {pos:?} are not UNETR's 16³ conv patches")));
    }
    let g = (pos[1] as f64).cbrt().round() as usize;
    if g * g * g != pos[1] {
        return Err(err(format!("{} position embeddings are not a cube of patches", pos[1])));
    }
    let mut layers = 0;
    while dict.keys().any(|k| k.starts_with(&format!("vit.blocks.{layers}."))) {
        layers += 1;
    }
    let heads = 12; // not recorded in the weights: MONAI's default
    let arch = UnetrArch { in_channels: pe[1], num_classes: out[0], img_size: g * PATCH, feature_size: e1[0], hidden_size: pe[0], mlp_dim: mlp[0], num_heads: heads, num_layers: layers };
    arch.validate().map_err(err)?;
    Ok(arch)
}

/// Size options of `NetSpec::options` (MONAI's argument names); missing ones take MONAI's
/// defaults, `img_size` the training patch (128).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnetrOptions {
    /// Input extent (cubic).
    pub img_size: Option<usize>,
    /// Decoder base width.
    pub feature_size: Option<usize>,
    /// Transformer width.
    pub hidden_size: Option<usize>,
    /// MLP width.
    pub mlp_dim: Option<usize>,
    /// Heads.
    pub num_heads: Option<usize>,
}

fn arch_of(spec: &NetSpec) -> Result<UnetrArch, String> {
    let o: UnetrOptions = options(spec, NAME)?;
    let mut a = UnetrArch::monai_default(spec.in_channels, spec.num_classes, o.img_size.unwrap_or(128));
    a.feature_size = o.feature_size.unwrap_or(a.feature_size);
    a.hidden_size = o.hidden_size.unwrap_or(a.hidden_size);
    a.mlp_dim = o.mlp_dim.unwrap_or(a.mlp_dim);
    a.num_heads = o.num_heads.unwrap_or(a.num_heads);
    a.validate().map_err(|e| format!("model options for `{NAME}`: {e}"))?;
    Ok(a)
}

fn build_boxed(spec: &NetSpec, device: &Device) -> Result<Box<dyn SegNet>, String> {
    Ok(Box::new(Unetr::new(&arch_of(spec)?, device)?))
}

fn load_boxed(dict: &StateDict, options: &LoadOptions, device: &Device) -> Result<Box<dyn SegNet>, CheckpointError> {
    let _ = options; // UNETR has no strides to choose
    Ok(Box::new(Unetr::from_state_dict(dict, device)?))
}

/// MONAI's default UNETR for 1 channel, 105 classes, 128³.
pub fn default_arch() -> UnetrArch {
    UnetrArch::monai_default(1, TOTALSEG_CLASSES, 128)
}

fn preset_summaries() -> Vec<PresetSummary> {
    let device = stu_engine::backend::Backend::default_compiled().and_then(|b| b.device().ok()).unwrap_or_default();
    let arch = default_arch();
    let net = Unetr::new(&arch, &device).expect("the default is valid");
    vec![PresetSummary {
        name: NAME.to_string(),
        model: NAME,
        preset: "monai-default",
        blocks: vec![arch.num_layers],
        widths: vec![arch.feature_size, arch.hidden_size],
        params: Module::num_params(&net) as u64,
        state_dict_tensors: arch.keys().len(),
        macs_128: arch.macs(),
        macs_128_variants: Default::default(),
    }]
}

inventory::submit! {
    ModelEntry {
        name: NAME,
        summary: "UNETR (MONAI): ViT encoder over 16³ patches, convolutional decoder from its hidden states",
        module_path: module_path!(),
        // 1 (2026-11-29): a fresh network draws its linear weights and position embeddings with
        // sd 0.02, as its builder declares (`seeded_init` drew them by He); GELU's exact gradient
        // on burn's generic operators.
        // 2 (2026-11-29): linear and convolution weights and biases drawn as PyTorch's
        // `reset_parameters` does, U(±1/√fan_in), as MONAI 1.6.1 leaves them (only the position embeddings are its own `trunc_normal_(std=0.02)`); before, linear weights at sd 0.02,
        // convolutions by He, biases 0.
        revision: 2,
        anchor_key: "vit.patch_embedding.patch_embeddings.weight",
        presets: preset_summaries,
        load: load_boxed,
        build: build_boxed,
        check: |spec| arch_of(spec).map(|a| InputRule::fixed([a.img_size; 3])),
    }
}
