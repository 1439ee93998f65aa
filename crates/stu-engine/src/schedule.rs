//! The nnU-Net training schedule's small pieces (`shared/docs/nnunet-pipeline.md` §5): poly
//! learning rate, deep-supervision loss weights and target scales.

/// `lr0 · (1 − epoch / max_epochs)^0.9`, updated once per epoch (epoch 0 uses `lr0`).
pub fn poly_lr(lr0: f64, epoch: usize, max_epochs: usize) -> f64 {
    lr0 * (1.0 - epoch as f64 / max_epochs as f64).powf(0.9)
}

/// The learning-rate schedules of nnU-Net's trainers, evaluated once per epoch as
/// `nnUNetTrainer.on_train_epoch_start` steps them (`lr_scheduler.step(current_epoch)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// [`poly_lr`] (`nnUNetTrainer`'s `PolyLRScheduler`).
    #[default]
    Poly,
    /// `CosineAnnealingLR(T_max = epochs)`, `η_min` 0, in its closed form:
    /// `lr0 · (1 + cos(π·epoch/epochs)) / 2` (`nnUNetTrainerCosAnneal`).
    Cosine,
    /// A linear warm-up over the first [`WARMUP_EPOCHS`] epochs, `lr0 · (epoch + 1) / 50`, then
    /// poly over the rest, `lr0 · (1 − (epoch − 50)/(epochs − 50))^0.9` (`nnUNetTrainer_warmup`:
    /// `Lin_incr_LRScheduler`, then `PolyLRScheduler_offset`, the SGD state kept across).
    Warmup,
}

/// `nnUNetTrainer_warmup`'s `warmup_duration_whole_net`.
pub const WARMUP_EPOCHS: usize = 50;

impl LrSchedule {
    /// Every schedule with its name in specs and on the command line.
    pub const ALL: [(&'static str, LrSchedule); 3] = [("poly", Self::Poly), ("cosine", Self::Cosine), ("warmup", Self::Warmup)];

    /// Its name (`poly`, `cosine`, `warmup`).
    pub fn name(self) -> &'static str {
        stu_core::registry::choice_name(&Self::ALL, &self)
    }

    /// The schedule named `name`.
    pub fn parse(name: &str) -> Result<Self, String> {
        stu_core::registry::choice(&Self::ALL, "lr_schedule", name)
    }

    /// The learning rate of `epoch` (from 0) of `epochs`, starting from `lr0`.
    pub fn lr(self, lr0: f64, epoch: usize, epochs: usize) -> f64 {
        match self {
            Self::Poly => poly_lr(lr0, epoch, epochs),
            Self::Cosine => lr0 * (1.0 + (std::f64::consts::PI * epoch as f64 / epochs as f64).cos()) / 2.0,
            Self::Warmup if epoch < WARMUP_EPOCHS => lr0 / WARMUP_EPOCHS as f64 * (epoch + 1) as f64,
            Self::Warmup => lr0 * (1.0 - (epoch - WARMUP_EPOCHS) as f64 / (epochs - WARMUP_EPOCHS) as f64).powf(0.9),
        }
    }
}

/// Deep-supervision weights for `n` outputs (full resolution first): `1/2^i`, the lowest output
/// weighted 0, normalised to sum 1.
pub fn ds_weights(n: usize) -> Vec<f64> {
    let mut w: Vec<f64> = (0..n).map(|i| 1.0 / (1u64 << i) as f64).collect();
    if n > 1 {
        w[n - 1] = 0.0;
    }
    let s: f64 = w.iter().sum();
    w.iter().map(|v| v / s).collect()
}

/// Target scales per output from the network's strides (stage 0's `[1,1,1]` first): the
/// cumulative product of 1/stride, one entry per output (full resolution first).
pub fn ds_scales(pools: &[[usize; 3]], outputs: usize) -> Vec<[f64; 3]> {
    let mut cur = [1.0f64; 3];
    let mut out = Vec::with_capacity(outputs);
    for p in pools.iter().take(outputs) {
        cur = [0, 1, 2].map(|a| cur[a] / p[a] as f64);
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nnunet_vectors() {
        // §11: poly LR, deep-supervision weights and scales.
        let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol;
        assert!(close(poly_lr(0.01, 1, 1000), 0.0099910, 1e-7));
        assert!(close(poly_lr(0.01, 500, 1000), 0.0053589, 1e-7));
        assert!(close(poly_lr(0.01, 999, 1000), 1.9953e-5, 1e-9));
        assert_eq!(poly_lr(0.01, 0, 1000), 0.01);
        let w = ds_weights(5);
        for (a, b) in w.iter().zip([0.5333, 0.2667, 0.1333, 0.0667, 0.0]) {
            assert!(close(*a, b, 1e-4), "{w:?}");
        }
        assert_eq!(ds_scales(&[[1, 1, 1], [1, 2, 2], [2, 2, 2]], 3), [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [0.5, 0.25, 0.25]]);
    }
}
