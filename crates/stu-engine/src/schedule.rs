//! The nnU-Net training schedule's small pieces (`shared/docs/nnunet-pipeline.md` §5): poly
//! learning rate, deep-supervision loss weights and target scales.

/// `lr0 · (1 − epoch / max_epochs)^0.9`, updated once per epoch (epoch 0 uses `lr0`).
pub fn poly_lr(lr0: f64, epoch: usize, max_epochs: usize) -> f64 {
    lr0 * (1.0 - epoch as f64 / max_epochs as f64).powf(0.9)
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
