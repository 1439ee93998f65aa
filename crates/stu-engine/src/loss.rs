//! nnU-Net's training loss (`shared/docs/nnunet-pipeline.md` §5.4): cross-entropy plus soft
//! Dice (`MemoryEfficientSoftDiceLoss`: softmax probabilities, background excluded, smooth 1e-5,
//! per sample or over the batch), summed 1:1, and the deep-supervision sum with weights
//! `1/2^i`, the lowest output 0, normalised.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Int, Tensor};

/// Soft-Dice settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiceConfig {
    /// Sum intersections over the batch before dividing (nnU-Net's `batch_dice`).
    pub batch_dice: bool,
    /// Added to numerator and denominator.
    pub smooth: f64,
}

impl Default for DiceConfig {
    fn default() -> Self {
        Self { batch_dice: false, smooth: 1e-5 }
    }
}

/// `CE + soft Dice` of NCDHW logits `[B, C, D, H, W]` against class indices `[B, D, H, W]`.
pub fn dc_ce(logits: Tensor<5>, target: Tensor<4, Int>, cfg: DiceConfig) -> Tensor<1> {
    let [b, c, d, h, w] = logits.dims();
    let onehot: Tensor<5> = target.one_hot_fill::<5>(c, 1.0, 0.0, 1).float();
    let logp = log_softmax(logits.clone(), 1);
    let voxels = (b * d * h * w) as f64;
    let ce = (logp * onehot.clone()).sum().neg() / voxels;
    let probs = softmax(logits, 1);
    let n = d * h * w;
    let fg = |t: Tensor<5>| t.reshape([b, c, n]).narrow(1, 1, c - 1);
    let (p, y) = (fg(probs), fg(onehot));
    let mut intersect = (p.clone() * y.clone()).sum_dim(2);
    let mut sum_pred = p.sum_dim(2);
    let mut sum_gt = y.sum_dim(2);
    if cfg.batch_dice {
        intersect = intersect.sum_dim(0);
        sum_pred = sum_pred.sum_dim(0);
        sum_gt = sum_gt.sum_dim(0);
    }
    let dc = (intersect * 2.0 + cfg.smooth) / (sum_gt + sum_pred + cfg.smooth).clamp_min(1e-8);
    ce + dc.mean().neg()
}

/// The deep-supervision sum `Σ wᵢ · dc_ce(outputᵢ, targetᵢ)`, skipping zero weights.
pub fn deep_supervision(outputs: &[Tensor<5>], targets: &[Tensor<4, Int>], weights: &[f64], cfg: DiceConfig) -> Tensor<1> {
    assert_eq!(outputs.len(), targets.len(), "one target per output");
    let mut total: Option<Tensor<1>> = None;
    for ((o, t), &w) in outputs.iter().zip(targets).zip(weights) {
        if w == 0.0 {
            continue;
        }
        let term = dc_ce(o.clone(), t.clone(), cfg) * w;
        total = Some(match total {
            Some(acc) => acc + term,
            None => term,
        });
    }
    total.expect("at least one output with a non-zero weight")
}
