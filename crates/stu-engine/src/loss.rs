//! nnU-Net's training loss (`shared/docs/nnunet-pipeline.md` §5.4): cross-entropy plus soft
//! Dice (`MemoryEfficientSoftDiceLoss`: softmax probabilities, background excluded, smooth 1e-5,
//! per sample or over the batch), summed 1:1, and the deep-supervision sum with weights
//! `1/2^i`, the lowest output 0, normalised. Region-based datasets train with nnU-Net's
//! `DC_and_BCE_loss` instead: binary cross-entropy on the logits plus the soft Dice of their
//! sigmoids, every region included ([`Regions`]). nnU-Net's loss trainer variants swap the
//! terms ([`LossKind`]): cross-entropy alone, Dice alone, the TopK-10 % cross-entropy alone or
//! with Dice.

use burn::tensor::activation::{log_softmax, sigmoid, softmax};
use burn::tensor::{Int, Tensor, TensorData};

/// Soft-Dice settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiceConfig {
    /// Sum intersections over the batch before dividing (nnU-Net's `batch_dice`).
    pub batch_dice: bool,
    /// nnU-Net's ignore label (sparse annotation): target voxels with this value count in
    /// neither term: the cross-entropy is the mean over the other voxels (0 when there are
    /// none), the Dice sums are masked.
    pub ignore_label: Option<i64>,
    /// Region-based training: output k's target is the union of region k's labels, and the
    /// loss is `DC_and_BCE_loss` (sigmoid, background-free regions, all of them in the Dice).
    pub regions: Option<Regions>,
    /// Which terms ([`LossKind`]; nnU-Net's default `DiceCe`), and so the Dice's smoothing
    /// ([`LossKind::dice_smooth`]).
    pub loss: LossKind,
}

impl Default for DiceConfig {
    fn default() -> Self {
        Self { batch_dice: false, ignore_label: None, regions: None, loss: LossKind::DiceCe }
    }
}

/// nnU-Net's training loss and the trainer variants that replace it
/// (`nnunetv2/training/nnUNetTrainer/variants/loss`), each with its deep-supervision weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Cross-entropy + soft Dice, 1:1 (`nnUNetTrainer`'s `DC_and_CE_loss`; `DC_and_BCE_loss`
    /// for regions).
    #[default]
    DiceCe,
    /// Cross-entropy alone (`nnUNetTrainerCELoss`).
    Ce,
    /// Soft Dice alone (`nnUNetTrainerDiceLoss`: background excluded, or every region).
    Dice,
    /// The mean cross-entropy of the 10 % of voxels where it is largest (`nnUNetTrainerTopk10Loss`,
    /// `TopKLoss(k=10)`; ignored voxels count as 0 but stay in the voxel count, as there).
    Topk10,
    /// Soft Dice + TopK 10 % cross-entropy, 1:1 (`nnUNetTrainerDiceTopK10Loss`).
    DiceTopk10,
    /// Cross-entropy + soft Dice without the Dice's smoothing (`nnUNetTrainerDiceCELoss_noSmooth`).
    DiceCeNosmooth,
    /// TopK 10 % of the cross-entropy with label smoothing 0.1 (`nnUNetTrainerTopk10LossLS01`).
    Topk10Ls01,
}

impl LossKind {
    /// Every kind with its name in specs and on the command line.
    pub const ALL: [(&'static str, LossKind); 7] = [
        ("dice_ce", Self::DiceCe),
        ("ce", Self::Ce),
        ("dice", Self::Dice),
        ("topk10", Self::Topk10),
        ("dice_topk10", Self::DiceTopk10),
        ("dice_ce_nosmooth", Self::DiceCeNosmooth),
        ("topk10_ls01", Self::Topk10Ls01),
    ];

    /// Its name (`dice_ce`, `ce`, `dice`, `topk10`, `dice_topk10`).
    pub fn name(self) -> &'static str {
        stu_core::registry::choice_name(&Self::ALL, &self)
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Result<Self, String> {
        stu_core::registry::choice(&Self::ALL, "loss", name)
    }

    /// Weights of the (cross-entropy, Dice) terms: 1 or 0 each.
    pub fn weights(self) -> [f64; 2] {
        match self {
            Self::DiceCe | Self::DiceTopk10 | Self::DiceCeNosmooth => [1.0, 1.0],
            Self::Ce | Self::Topk10 | Self::Topk10Ls01 => [1.0, 0.0],
            Self::Dice => [0.0, 1.0],
        }
    }

    /// The share of voxels (percent) whose cross-entropy the TopK term averages, `None` for the
    /// plain cross-entropy over every voxel.
    pub fn topk_percent(self) -> Option<f64> {
        matches!(self, Self::Topk10 | Self::DiceTopk10 | Self::Topk10Ls01).then_some(10.0)
    }

    /// The cross-entropy's label smoothing (0.1 for `topk10_ls01`, else 0).
    pub fn label_smoothing(self) -> f64 {
        if self == Self::Topk10Ls01 { 0.1 } else { 0.0 }
    }

    /// The soft Dice's smoothing, added to its numerator and denominator (nnU-Net's 1e-5; 0
    /// for `dice_ce_nosmooth`).
    pub fn dice_smooth(self) -> f64 {
        if self == Self::DiceCeNosmooth { 0.0 } else { 1e-5 }
    }

    /// Whether this loss trains a dataset with an ignore label and/or regions; refused as
    /// nnU-Net's variants refuse them (the CE and TopK trainers assert that there are no
    /// regions; the Dice trainer has no ignore-label handling).
    pub fn check(self, ignore_label: bool, regions: bool) -> Result<(), String> {
        match self {
            Self::Ce | Self::Topk10 | Self::DiceTopk10 | Self::Topk10Ls01 if regions => Err(format!("loss `{}` does not train region-based datasets (nnU-Net's trainer asserts it); use `dice_ce` or `dice`", self.name())),
            Self::Dice if ignore_label => Err("loss `dice` does not train datasets with an ignore label (nnU-Net's nnUNetTrainerDiceLoss has no mask for it); use `dice_ce`".to_string()),
            _ => Ok(()),
        }
    }
}

/// The labels of each region of a region-based dataset, as bit sets (up to
/// [`Regions::MAX_REGIONS`] regions over the labels 1…[`Regions::MAX_LABEL`]; a plain `Copy`
/// value, so that it travels in [`DiceConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regions {
    sets: [u128; Self::MAX_REGIONS],
    n: usize,
}

impl Regions {
    /// Most regions.
    pub const MAX_REGIONS: usize = 32;
    /// Largest label a region may hold.
    pub const MAX_LABEL: u16 = 127;

    /// The regions' label lists, in output order.
    pub fn new(regions: &[Vec<u16>]) -> Result<Self, String> {
        if regions.is_empty() || regions.len() > Self::MAX_REGIONS {
            return Err(format!("{} regions; region-based training takes 1…{}", regions.len(), Self::MAX_REGIONS));
        }
        let mut sets = [0u128; Self::MAX_REGIONS];
        for (set, labels) in sets.iter_mut().zip(regions) {
            for &l in labels {
                if l == 0 || l > Self::MAX_LABEL {
                    return Err(format!("region {labels:?}: label {l} is outside 1…{}", Self::MAX_LABEL));
                }
                *set |= 1 << l;
            }
        }
        Ok(Self { sets, n: regions.len() })
    }

    /// Number of regions (network outputs).
    pub fn len(&self) -> usize {
        self.n
    }

    /// Never true (at least one region).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Whether label `v` belongs to region `k`.
    pub fn contains(&self, k: usize, v: i64) -> bool {
        (0..=Self::MAX_LABEL as i64).contains(&v) && self.sets[k] >> v & 1 == 1
    }

    /// Region `k`'s labels, ascending.
    pub fn labels(&self, k: usize) -> Vec<i64> {
        (1..=Self::MAX_LABEL as i64).filter(|&v| self.contains(k, v)).collect()
    }

    /// The `[B, R, D, H, W]` 0/1 targets of labels `[B, D, H, W]`.
    pub fn targets(&self, target: &Tensor<4, Int>) -> Tensor<5> {
        let channels: Vec<Tensor<5>> = (0..self.n)
            .map(|k| {
                let mut hit: Option<Tensor<4, burn::tensor::Bool>> = None;
                for l in self.labels(k) {
                    let e = target.clone().equal_elem(l);
                    hit = Some(match hit {
                        Some(h) => h.bool_or(e),
                        None => e,
                    });
                }
                hit.expect("a region has a label").float().unsqueeze_dim(1)
            })
            .collect();
        Tensor::cat(channels, 1)
    }
}

/// Cross-entropy (mean over voxels) and the soft-Dice sums of the foreground classes per
/// sample, `[B, C−1]` each: intersection `Σ p·y`, prediction `Σ p`, ground truth `Σ y`. With an
/// ignore label, its voxels are left out of all of them (nnU-Net's `ignore_index` and
/// `loss_mask`).
fn ce_and_dice_sums(logits: Tensor<5>, target: Tensor<4, Int>, ignore: Option<i64>) -> (Tensor<1>, [Tensor<2>; 3]) {
    let [b, c, d, h, w] = logits.dims();
    let (target, mask) = match ignore {
        Some(ig) => {
            let ignored = target.clone().equal_elem(ig);
            let mask: Tensor<5> = ignored.clone().bool_not().float().unsqueeze_dim(1);
            (target.mask_fill(ignored, 0), Some(mask))
        }
        None => (target, None),
    };
    let onehot: Tensor<5> = target.one_hot_fill::<5>(c, 1.0, 0.0, 1).float();
    let logp = log_softmax(logits.clone(), 1);
    let mut probs = softmax(logits, 1);
    let (onehot, ce) = match mask {
        Some(m) => {
            let onehot = onehot * m.clone();
            // The mean over annotated voxels; none: 0 (the sum is 0 and the count held at 1).
            let ce = (logp * onehot.clone()).sum().neg() / m.clone().sum().clamp_min(1.0);
            probs = probs * m;
            (onehot, ce)
        }
        None => {
            let ce = (logp * onehot.clone()).sum().neg() / (b * d * h * w) as f64;
            (onehot, ce)
        }
    };
    let n = d * h * w;
    let fg = |t: Tensor<5>| t.reshape([b, c, n]).narrow(1, 1, c - 1);
    let (p, y) = (fg(probs), fg(onehot));
    let sums = [(p.clone() * y.clone()).sum_dim(2), p.sum_dim(2), y.sum_dim(2)].map(|t| t.reshape([b, c - 1]));
    (ce, sums)
}

/// nnU-Net's `DC_and_BCE_loss` terms for region outputs `[B, R, …]`: the binary
/// cross-entropy with logits (the mean over every output voxel; with an ignore label the sum
/// over annotated voxels and all regions divided by the number of annotated voxels, as nnU-Net
/// computes it) and the soft-Dice sums of the sigmoids per sample and region, `[B, R]` each,
/// masked by the annotation.
fn bce_and_dice_sums(logits: Tensor<5>, target: Tensor<4, Int>, regions: &Regions, ignore: Option<i64>) -> (Tensor<1>, [Tensor<2>; 3]) {
    let [b, r, d, h, w] = logits.dims();
    assert_eq!(r, regions.len(), "one output per region");
    let mut y = regions.targets(&target);
    let mask: Option<Tensor<5>> = ignore.map(|ig| target.equal_elem(ig).bool_not().float().unsqueeze_dim(1));
    // max(x, 0) − x·y + log(1 + e^−|x|), PyTorch's stable form.
    let elem = logits.clone().clamp_min(0.0) - logits.clone() * y.clone() + logits.clone().abs().neg().exp().log1p();
    let mut p = sigmoid(logits);
    let bce = match &mask {
        Some(m) => {
            p = p * m.clone();
            y = y * m.clone();
            (elem * m.clone()).sum() / m.clone().sum().clamp_min(1e-8)
        }
        None => elem.mean(),
    };
    let n = d * h * w;
    let (p, y) = (p.reshape([b, r, n]), y.reshape([b, r, n]));
    let sums = [(p.clone() * y.clone()).sum_dim(2), p.sum_dim(2), y.sum_dim(2)].map(|t| t.reshape([b, r]));
    (bce, sums)
}

/// The cross-entropy term and the soft-Dice sums of either loss ([`DiceConfig::regions`]).
fn loss_and_sums(logits: Tensor<5>, target: Tensor<4, Int>, cfg: &DiceConfig) -> (Tensor<1>, [Tensor<2>; 3]) {
    match &cfg.regions {
        Some(r) => bce_and_dice_sums(logits, target, r, cfg.ignore_label),
        None => ce_and_dice_sums(logits, target, cfg.ignore_label),
    }
}

fn soft_dice(i: Tensor<2>, p: Tensor<2>, g: Tensor<2>, smooth: f64) -> Tensor<2> {
    (i * 2.0 + smooth) / (g + p + smooth).clamp_min(1e-8)
}

/// `CE + soft Dice` of NCDHW logits `[B, C, D, H, W]` against class indices `[B, D, H, W]`
/// (with [`DiceConfig::regions`]: `BCE + soft Dice` of the region outputs), or the terms
/// [`DiceConfig::loss`] names.
pub fn dc_ce(logits: Tensor<5>, target: Tensor<4, Int>, cfg: DiceConfig) -> Tensor<1> {
    let [w_ce, w_dice] = cfg.loss.weights();
    let topk = cfg.loss.topk_percent().map(|pct| topk_ce(logits.clone(), target.clone(), cfg.ignore_label, pct, cfg.loss.label_smoothing()));
    if w_dice == 0.0 && let Some(t) = topk {
        return t;
    }
    let (ce, [mut i, mut p, mut g]) = loss_and_sums(logits, target, &cfg);
    if cfg.batch_dice {
        i = i.sum_dim(0);
        p = p.sum_dim(0);
        g = g.sum_dim(0);
    }
    let dice = soft_dice(i, p, g, cfg.loss.dice_smooth()).mean().neg();
    match topk {
        Some(t) => t + dice,
        None if w_ce == 0.0 => dice,
        None if w_dice == 0.0 => ce,
        None => ce + dice,
    }
}

/// nnU-Net's `TopKLoss`: the voxels' cross-entropy (0 where the target is `ignore`; with label
/// smoothing ε against `(1 − ε)·onehot + ε/C`, as PyTorch's), the `⌊N·percent/100⌋` largest
/// of all `N` voxels of the batch (at least one), averaged. The voxels are chosen on the host,
/// as the fused kernel chooses them (`kernels::loss::topk_voxels`); the gradient flows through
/// the chosen ones only, as through `torch.topk`.
pub fn topk_ce(logits: Tensor<5>, target: Tensor<4, Int>, ignore: Option<i64>, percent: f64, smoothing: f64) -> Tensor<1> {
    let [b, c, d, h, w] = logits.dims();
    let n = b * d * h * w;
    let (target, mask) = match ignore {
        Some(ig) => {
            let ignored = target.clone().equal_elem(ig);
            let mask: Tensor<4> = ignored.clone().bool_not().float();
            (target.mask_fill(ignored, 0), Some(mask))
        }
        None => (target, None),
    };
    let mut onehot: Tensor<5> = target.one_hot_fill::<5>(c, 1.0, 0.0, 1).float();
    if smoothing != 0.0 {
        onehot = onehot * (1.0 - smoothing) + smoothing / c as f64;
    }
    let mut per_voxel: Tensor<4> = (log_softmax(logits, 1) * onehot).sum_dim(1).neg().reshape([b, d, h, w]);
    if let Some(m) = mask {
        per_voxel = per_voxel * m;
    }
    let flat = per_voxel.reshape([n]);
    let values = flat.clone().detach().into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data");
    let (chosen, k) = crate::kernels::loss::topk_voxels(&values, percent);
    let chosen = Tensor::<1>::from_data(TensorData::new(chosen.into_iter().map(f32::from).collect::<Vec<f32>>(), [n]), &flat.device());
    (flat * chosen).sum() / k as f64
}

/// [`dc_ce`] as one fused operation: with a hand-written gradient (`crate::kernels::loss`, every
/// [`LossKind`]) on backends that run this project's kernels (flex), as PyTorch runs it (ATen's
/// `cross_entropy`, autograd kept from the forward; nnU-Net's default loss only) on libtorch
/// devices, composed of burn operators elsewhere and with an ignore label or regions. Same
/// values.
///
/// The loss computes in f32 from logits of any float type. Half logits go as they are to the
/// libtorch loss, whose log-softmax reads them and writes f32 (and whose gradient comes back in
/// their type): no f32 copy of the logits, which at 105 classes, 128³ and batch 2 is 1.76 GB
/// more alive while the loss runs, at the end of the forward, when every saved activation is
/// held. The other paths cast them to f32 first. The values are those of the f32 cast (bit for
/// bit on the CPU; CUDA's half-reading softmax may sum in another order, within f32 rounding).
pub fn dc_ce_fused(logits: Tensor<5>, target: Tensor<4, Int>, cfg: DiceConfig) -> Tensor<1> {
    #[cfg(feature = "tch")]
    if cfg.ignore_label.is_none() && cfg.regions.is_none() && cfg.loss == LossKind::DiceCe && crate::ops::is_libtorch(&logits.device(), crate::ops::TorchPath::Loss) {
        use crate::torch::TorchOps;
        let target = target.float();
        return Tensor::from_dispatch(<burn::backend::Dispatch as TorchOps>::dc_ce_nc(logits.into_dispatch(), target.into_dispatch(), cfg.batch_dice, cfg.loss.dice_smooth()));
    }
    // (burn's `cast` is a no-op on f32 logits.)
    let logits = logits.cast(burn::tensor::DType::F32);
    if cfg.ignore_label.is_some() || cfg.regions.is_some() || crate::ops::is_libtorch(&logits.device(), crate::ops::TorchPath::Loss) {
        return dc_ce(logits, target, cfg);
    }
    if crate::ops::Layout::for_device(&logits.device()) != crate::ops::Layout::Ndhwc {
        return dc_ce(logits, target, cfg);
    }
    use crate::ext::StuOps;
    let target = target.float();
    let [ce, dice] = cfg.loss.weights();
    let terms = crate::kernels::loss::Terms { batch_dice: cfg.batch_dice, smooth: cfg.loss.dice_smooth(), ce, dice, topk: cfg.loss.topk_percent(), smoothing: cfg.loss.label_smoothing() };
    Tensor::from_dispatch(<burn::backend::Dispatch as StuOps>::dc_ce_loss(logits.into_dispatch(), target.into_dispatch(), terms))
}

/// The deep-supervision sum `Σ wᵢ · dc_ce(outputᵢ, targetᵢ)`, skipping zero weights (fused
/// per output where the backend allows, [`dc_ce_fused`]); outputs of any float type, the loss
/// in f32.
pub fn deep_supervision(outputs: &[Tensor<5>], targets: &[Tensor<4, Int>], weights: &[f64], cfg: DiceConfig) -> Tensor<1> {
    assert_eq!(outputs.len(), targets.len(), "one target per output");
    let mut total: Option<Tensor<1>> = None;
    for ((o, t), &w) in outputs.iter().zip(targets).zip(weights) {
        if w == 0.0 {
            continue;
        }
        let term = dc_ce_fused(o.clone(), t.clone(), cfg) * w;
        total = Some(match total {
            Some(acc) => acc + term,
            None => term,
        });
    }
    total.expect("at least one output with a non-zero weight")
}

/// [`deep_supervision`] on one replica of a data-parallel group whose ranks hold equal shares
/// of the global batch. Returns the loss to differentiate here and this rank's share of the
/// reported loss (the global loss is the mean of the shares over ranks); `None` when the share
/// is the loss's own value (one rank, or per-sample Dice), left on the device to be read when
/// convenient.
///
/// Per-sample Dice and the voxel-mean cross-entropy are means over samples, so the global loss
/// is the mean of the ranks' losses and averaging gradients is exact. Batch Dice is not: its
/// sums run over the global batch. As nnU-Net does under DDP (`AllGatherGrad`), the sums are
/// exchanged before the Dice is formed: each rank uses `local + (global − local)` with the
/// second term constant, so its gradient is the global Dice's through its own samples; the Dice
/// term is weighted by the world size to survive the gradient averaging.
pub fn deep_supervision_in(outputs: &[Tensor<5>], targets: &[Tensor<4, Int>], weights: &[f64], cfg: DiceConfig, group: &mut crate::dist::Group) -> Result<(Tensor<1>, Option<f64>), crate::dist::DistError> {
    if group.world() == 1 || !cfg.batch_dice {
        return Ok((deep_supervision(outputs, targets, weights, cfg), None));
    }
    let [w_ce, w_dice] = cfg.loss.weights();
    let terms: Vec<(f64, Tensor<1>, [Tensor<2>; 3])> = outputs
        .iter()
        .zip(targets)
        .zip(weights)
        .filter(|(_, w)| **w != 0.0)
        .map(|((o, t), &w)| {
            let o = o.clone().cast(burn::tensor::DType::F32);
            let (ce, sums) = loss_and_sums(o.clone(), t.clone(), &cfg);
            // TopK over this rank's voxels, as under nnU-Net's DDP.
            let ce = match cfg.loss.topk_percent() {
                Some(pct) => topk_ce(o.clone(), t.clone(), cfg.ignore_label, pct, cfg.loss.label_smoothing()),
                None => ce,
            };
            (w, ce * w_ce, sums.map(|s| s.sum_dim(0)))
        })
        .collect();
    assert!(!terms.is_empty(), "at least one output with a non-zero weight");
    let host = |t: &Tensor<2>| t.clone().into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data");
    let local: Vec<Vec<f32>> = terms.iter().flat_map(|(_, _, s)| s.iter().map(host)).collect();
    let mut global: Vec<f32> = local.concat();
    group.all_reduce_sum(&mut global)?;
    let world = group.world() as f64;
    let (mut loss, mut share, mut at, mut k) = (None::<Tensor<1>>, 0.0, 0, 0);
    for (w, ce, sums) in terms {
        let c1 = sums[0].dims()[1];
        let [i, p, g] = sums.map(|s| {
            let delta: Vec<f32> = global[at..at + c1].iter().zip(&local[k]).map(|(g, l)| g - l).collect();
            let device = s.device();
            at += c1;
            k += 1;
            s + Tensor::<2>::from_data(TensorData::new(delta, [1, c1]), &device)
        });
        // Its value is the global batch's Dice, the same on every rank.
        let dc = soft_dice(i, p, g, cfg.loss.dice_smooth()).mean() * w_dice;
        share += w * (ce.clone() - dc.clone()).into_scalar::<f32>() as f64;
        let term = (ce - dc * world) * w;
        loss = Some(match loss {
            Some(acc) => acc + term,
            None => term,
        });
    }
    Ok((loss.expect("non-empty"), Some(share)))
}

/// [`dc_ce_fused`] on `device` against the composed [`dc_ce`], every [`LossKind`], per-sample and batch Dice, with a
/// class absent from the target and one present in one sample only: the value tracked and not
/// (within 1e-5) and the logits' gradient (within 1e-5 of its largest value, floor 1e-3). One line per comparison and whether it holds; the unit tests assert them on flex and
/// libtorch, `stu check-ops` on a GPU.
pub fn fused_against_composed(device: &burn::tensor::Device, seed: u64) -> Vec<(String, bool)> {
    let ad = device.clone().autodiff();
    let (b, c, d, h, w) = (2, 6, 5, 4, 7);
    let mut rng = stu_core::rng::SplitMix64::new(seed);
    let logits = rng.fill_f32(b * c * d * h * w, -3.0, 3.0);
    // Class 5 never appears in the target, class 4 only in sample 1.
    let target: Vec<i64> = (0..b * d * h * w).map(|i| { let v = rng.below(5) as i64; if v == 4 && i < d * h * w { 3 } else { v } }).collect();
    let mut out = Vec::new();
    for (batch_dice, loss) in [false, true].into_iter().flat_map(|bd| LossKind::ALL.map(|(_, k)| (bd, k))) {
        let cfg = DiceConfig { batch_dice, loss, ..Default::default() };
        let run = |fused: bool| {
            let x = Tensor::<5>::from_data(TensorData::new(logits.clone(), [b, c, d, h, w]), &ad).require_grad();
            let t = Tensor::<4, Int>::from_data(TensorData::new(target.clone(), [b, d, h, w]), &ad);
            let loss = if fused { dc_ce_fused(x.clone(), t, cfg) } else { dc_ce(x.clone(), t, cfg) } * 0.7;
            let value = loss.clone().into_scalar::<f32>();
            let g = x.grad(&loss.backward()).unwrap().into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            (value, g)
        };
        let (v0, g0) = run(false);
        let (v1, g1) = run(true);
        out.push((format!("loss {}, batch Dice {batch_dice}: {v1} vs composed {v0}", loss.name()), (v0 - v1).abs() < 1e-5));
        let scale = g0.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = g0.iter().zip(&g1).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        out.push((format!("loss {}, batch Dice {batch_dice}: gradient error {err:.3e} (scale {scale:.3e})", loss.name()), err <= 1e-5 * scale.max(1e-3)));
        let x = Tensor::<5>::from_data(TensorData::new(logits.clone(), [b, c, d, h, w]), device);
        let t = Tensor::<4, Int>::from_data(TensorData::new(target.clone(), [b, d, h, w]), device);
        let v2 = dc_ce_fused(x, t, cfg).into_scalar::<f32>() * 0.7;
        out.push((format!("loss {}, batch Dice {batch_dice}: untracked {v2} vs {v0}", loss.name()), (v0 - v2).abs() < 1e-5));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// Every comparison of [`fused_against_composed`] within its tolerance.
    #[allow(dead_code)] // used by the backend-specific tests below
    fn fused_equals_composed(device: Device, seed: u64) {
        for (line, ok) in fused_against_composed(&device, seed) {
            assert!(ok, "{line}");
        }
    }

    #[cfg(feature = "flex")]
    #[test]
    fn the_fused_loss_and_its_gradient_equal_the_composed_ones() {
        fused_equals_composed(Device::flex(), 11);
    }

    // On libtorch: `torch::check` (the block test there, and `stu check-ops` on a GPU).

    /// Half logits go to the libtorch loss as they are and give the value and gradient of the
    /// same logits cast to f32 first (the path before), bit for bit, the gradient in their type;
    /// on a path that computes in burn (an ignore label) they are cast to f32 inside.
    #[cfg(feature = "tch")]
    #[test]
    #[allow(deprecated)] // burn-tch is deprecated upstream; it is the cuDNN path here
    fn half_logits_give_the_loss_of_their_f32_cast() {
        use burn::tensor::DType;
        let ad = Device::libtorch().autodiff();
        let (b, c, d, h, w) = (2, 5, 4, 3, 6);
        let mut rng = stu_core::rng::SplitMix64::new(21);
        let x = Tensor::<5>::from_data(TensorData::new(rng.fill_f32(b * c * d * h * w, -3.0, 3.0), [b, c, d, h, w]), &ad).cast(DType::F16).detach();
        let t = Tensor::<4, Int>::from_data(TensorData::new((0..b * d * h * w).map(|_| rng.below(c as u64) as i64).collect::<Vec<_>>(), [b, d, h, w]), &ad);
        for cfg in [DiceConfig::default(), DiceConfig { batch_dice: true, ..Default::default() }, DiceConfig { ignore_label: Some(3), ..Default::default() }] {
            let run = |cast_first: bool| {
                let xh = x.clone().require_grad();
                let l = dc_ce_fused(if cast_first { xh.clone().cast(DType::F32) } else { xh.clone() }, t.clone(), cfg);
                let g = xh.grad(&l.clone().backward()).expect("a gradient");
                assert_eq!(g.dtype(), DType::F16, "{cfg:?}: the gradient in the logits' type");
                (l.into_scalar::<f32>(), crate::ops::to_vec(g))
            };
            let ((l0, g0), (l1, g1)) = (run(true), run(false));
            assert_eq!(l0.to_bits(), l1.to_bits(), "{cfg:?}: loss {l0} vs {l1}");
            assert!(g0.iter().zip(&g1).all(|(p, q)| p.to_bits() == q.to_bits()), "{cfg:?}: gradients differ");
        }
    }
}
