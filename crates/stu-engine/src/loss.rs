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

/// [`dc_ce`] as one fused operation with a hand-written gradient (`crate::kernels::loss`), on
/// backends that run this project's kernels (flex); the composed form elsewhere. Same values.
pub fn dc_ce_fused(logits: Tensor<5>, target: Tensor<4, Int>, cfg: DiceConfig) -> Tensor<1> {
    if crate::ops::Layout::for_device(&logits.device()) != crate::ops::Layout::Ndhwc {
        return dc_ce(logits, target, cfg);
    }
    use crate::ext::StuOps;
    let target = target.float();
    Tensor::from_dispatch(<burn::backend::Dispatch as StuOps>::dc_ce_loss(logits.into_dispatch(), target.into_dispatch(), cfg.batch_dice, cfg.smooth))
}

/// The deep-supervision sum `Σ wᵢ · dc_ce(outputᵢ, targetᵢ)`, skipping zero weights (fused
/// per output where the backend allows, [`dc_ce_fused`]).
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

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn the_fused_loss_and_its_gradient_equal_the_composed_ones() {
        let ad = Device::flex().autodiff();
        let (b, c, d, h, w) = (2, 6, 5, 4, 7);
        let mut rng = stu_core::rng::SplitMix64::new(11);
        let logits = rng.fill_f32(b * c * d * h * w, -3.0, 3.0);
        // Class 5 never appears in the target, class 4 only in sample 1.
        let target: Vec<i64> = (0..b * d * h * w).map(|i| { let v = rng.below(5) as i64; if v == 4 && i < d * h * w { 3 } else { v } }).collect();
        for batch_dice in [false, true] {
            let cfg = DiceConfig { batch_dice, smooth: 1e-5 };
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
            assert!((v0 - v1).abs() < 1e-5, "batch_dice {batch_dice}: loss {v0} vs {v1}");
            let scale = g0.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = g0.iter().zip(&g1).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-5 * scale.max(1e-3) + 1e-7, "batch_dice {batch_dice}: gradient error {err} (scale {scale})");
        }
    }
}
