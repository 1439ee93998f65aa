//! Fused channels-last instance norm: `y = act(γ·(x − μ)/σ + β [+ skip])`, forward and backward.
//!
//! `x` is `[B, N, C]` (N voxels, channels contiguous). Statistics are per (sample, channel),
//! biased variance, eps 1e-5 (PyTorch's `InstanceNorm3d`), accumulated in f64 so that a channel
//! of 2 M voxels (128³) keeps full f32 accuracy. `act` is LeakyReLU(0.01) after the optional
//! residual add, which is how STU-Net's blocks end.

use rayon::prelude::*;

const EPS: f64 = 1e-5;
const SLOPE: f32 = 0.01;
/// Voxels per parallel chunk.
const CHUNK: usize = 4096;

/// Per-channel sums of `f(row value, channel)` over `[N, C]` rows: f32 partial sums over
/// ≤ `CHUNK` rows in parallel, combined in f64 in chunk order (the same bits on any number of
/// threads).
fn channel_sums(xs: &[f32], c: usize, f: impl Fn(f32, usize) -> f32 + Sync) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = xs
        .par_chunks(CHUNK * c)
        .map(|chunk| {
            let mut p = vec![0f32; c];
            for row in chunk.chunks_exact(c) {
                for (ch, (a, v)) in p.iter_mut().zip(row).enumerate() {
                    *a += f(*v, ch);
                }
            }
            p.into_iter().map(f64::from).collect()
        })
        .collect();
    crate::kernels::sum_in_order(parts, c)
}

/// Per (sample, channel) mean and 1/σ, `[B·C]` each. Two passes (mean, then centred squares),
/// so a large mean does not cancel the variance away.
fn stats(x: &[f32], b: usize, n: usize, c: usize) -> (Vec<f32>, Vec<f32>) {
    let mut mean = vec![0f32; b * c];
    let mut rstd = vec![0f32; b * c];
    for bi in 0..b {
        let xs = &x[bi * n * c..(bi + 1) * n * c];
        let m: Vec<f64> = channel_sums(xs, c, |v, _| v).into_iter().map(|s| s / n as f64).collect();
        let mf: Vec<f32> = m.iter().map(|v| *v as f32).collect();
        let ss = channel_sums(xs, c, |v, ch| (v - mf[ch]) * (v - mf[ch]));
        for ch in 0..c {
            // Correct for mf being m rounded to f32: Σ(x − mf)² = Σ(x − m)² + n·(m − mf)².
            let shift = m[ch] - mf[ch] as f64;
            let var = (ss[ch] / n as f64 - shift * shift).max(0.0);
            mean[bi * c + ch] = mf[ch];
            rstd[bi * c + ch] = (1.0 / (var + EPS).sqrt()) as f32;
        }
    }
    (mean, rstd)
}

/// Per-channel scale for sample `bi`: `y = (x − μ)·a + β`. Subtracting the mean first keeps
/// full precision when |μ| ≫ σ (folding it into the shift would cancel).
fn scale(bi: usize, c: usize, rstd: &[f32], gamma: &[f32]) -> Vec<f32> {
    (0..c).map(|ch| gamma[ch] * rstd[bi * c + ch]).collect()
}

/// Forward. `skip` (same shape as `x`) is added before the activation.
#[allow(clippy::too_many_arguments)]
pub fn forward(x: &[f32], gamma: &[f32], beta: &[f32], skip: Option<&[f32]>, act: bool, b: usize, n: usize, c: usize) -> Vec<f32> {
    let (mean, rstd) = stats(x, b, n, c);
    let mut y = vec![0f32; x.len()];
    for bi in 0..b {
        let a = scale(bi, c, &rstd, gamma);
        let m = &mean[bi * c..(bi + 1) * c];
        let range = bi * n * c..(bi + 1) * n * c;
        let xs = &x[range.clone()];
        let sk = skip.map(|s| &s[range.clone()]);
        y[range].par_chunks_mut(CHUNK * c).enumerate().for_each(|(i, out)| {
            let off = i * CHUNK * c;
            for (r, row) in out.chunks_exact_mut(c).enumerate() {
                let base = off + r * c;
                for ch in 0..c {
                    let mut v = (xs[base + ch] - m[ch]) * a[ch] + beta[ch];
                    if let Some(s) = sk {
                        v += s[base + ch];
                    }
                    if act && v < 0.0 {
                        v *= SLOPE;
                    }
                    row[ch] = v;
                }
            }
        });
    }
    y
}

/// Gradients of [`forward`].
pub struct NormGrads {
    /// ∂L/∂x.
    pub dx: Vec<f32>,
    /// ∂L/∂γ.
    pub dgamma: Vec<f32>,
    /// ∂L/∂β.
    pub dbeta: Vec<f32>,
    /// ∂L/∂skip (present when `skip` was).
    pub dskip: Option<Vec<f32>>,
}

/// Backward of [`forward`] from `dy`; recomputes the statistics from `x`.
#[allow(clippy::too_many_arguments)]
pub fn backward(x: &[f32], gamma: &[f32], beta: &[f32], skip: Option<&[f32]>, act: bool, dy: &[f32], b: usize, n: usize, c: usize) -> NormGrads {
    let (mean, rstd) = stats(x, b, n, c);
    // dz: gradient before the activation (= ∂L/∂skip when there is a skip).
    let mut dz = vec![0f32; x.len()];
    let mut dgamma = vec![0f64; c];
    let mut dbeta = vec![0f64; c];
    let mut sums = vec![(vec![0f64; c], vec![0f64; c]); b]; // (Σdz, Σdz·x̂) per sample
    for bi in 0..b {
        let a = scale(bi, c, &rstd, gamma);
        let range = bi * n * c..(bi + 1) * n * c;
        let (xs, dys) = (&x[range.clone()], &dy[range.clone()]);
        let sk = skip.map(|s| &s[range.clone()]);
        let (m, rs) = (&mean[bi * c..(bi + 1) * c], &rstd[bi * c..(bi + 1) * c]);
        // Per chunk (Σdz, Σdz·x̂) in f32, combined in f64 in chunk order.
        let parts: Vec<(Vec<f64>, Vec<f64>)> = dz[range]
            .par_chunks_mut(CHUNK * c)
            .enumerate()
            .map(|(i, out)| {
                let off = i * CHUNK * c;
                let mut p1 = vec![0f32; c];
                let mut p2 = vec![0f32; c];
                for (r, row) in out.chunks_exact_mut(c).enumerate() {
                    let base = off + r * c;
                    for ch in 0..c {
                        let xv = xs[base + ch];
                        let mut g = dys[base + ch];
                        if act {
                            let mut z = (xv - m[ch]) * a[ch] + beta[ch];
                            if let Some(s) = sk {
                                z += s[base + ch];
                            }
                            if z < 0.0 {
                                g *= SLOPE;
                            }
                        }
                        row[ch] = g;
                        p1[ch] += g;
                        p2[ch] += g * (xv - m[ch]) * rs[ch];
                    }
                }
                (p1.into_iter().map(f64::from).collect(), p2.into_iter().map(f64::from).collect())
            })
            .collect();
        let (p1, p2): (Vec<Vec<f64>>, Vec<Vec<f64>>) = parts.into_iter().unzip();
        let (s1, s2) = (crate::kernels::sum_in_order(p1, c), crate::kernels::sum_in_order(p2, c));
        for ch in 0..c {
            dbeta[ch] += s1[ch];
            dgamma[ch] += s2[ch];
        }
        sums[bi] = (s1, s2);
    }
    // dx = γ·σ⁻¹/N · (N·dz − Σdz − x̂·Σ(dz·x̂))
    let mut dx = vec![0f32; x.len()];
    for bi in 0..b {
        let range = bi * n * c..(bi + 1) * n * c;
        let (xs, dzs) = (&x[range.clone()], &dz[range.clone()]);
        let (m, rs) = (&mean[bi * c..(bi + 1) * c], &rstd[bi * c..(bi + 1) * c]);
        let nf = n as f32;
        let k: Vec<f32> = (0..c).map(|ch| gamma[ch] * rs[ch] / nf).collect();
        let s1: Vec<f32> = sums[bi].0.iter().map(|v| *v as f32).collect();
        let s2: Vec<f32> = sums[bi].1.iter().map(|v| *v as f32).collect();
        dx[range].par_chunks_mut(CHUNK * c).enumerate().for_each(|(i, out)| {
            let off = i * CHUNK * c;
            for (r, row) in out.chunks_exact_mut(c).enumerate() {
                let base = off + r * c;
                for ch in 0..c {
                    let xh = (xs[base + ch] - m[ch]) * rs[ch];
                    row[ch] = k[ch] * (nf * dzs[base + ch] - s1[ch] - xh * s2[ch]);
                }
            }
        });
    }
    NormGrads {
        dx,
        dgamma: dgamma.into_iter().map(|v| v as f32).collect(),
        dbeta: dbeta.into_iter().map(|v| v as f32).collect(),
        dskip: skip.map(|_| dz),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64, offset: f32) -> Vec<f32> {
        stu_core::rng::SplitMix64::new(seed).fill_f32(n, offset - 0.5, offset + 0.5)
    }

    /// f64 reference of the forward, for one configuration.
    #[allow(clippy::too_many_arguments)]
    fn reference(x: &[f32], g: &[f32], bt: &[f32], skip: Option<&[f32]>, act: bool, b: usize, n: usize, c: usize) -> Vec<f64> {
        let mut y = vec![0f64; x.len()];
        for bi in 0..b {
            for ch in 0..c {
                let v: Vec<f64> = (0..n).map(|i| x[(bi * n + i) * c + ch] as f64).collect();
                let m = v.iter().sum::<f64>() / n as f64;
                let var = v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / n as f64;
                for (i, vi) in v.iter().enumerate() {
                    let idx = (bi * n + i) * c + ch;
                    let mut z = (vi - m) / (var + 1e-5).sqrt() * g[ch] as f64 + bt[ch] as f64;
                    if let Some(s) = skip {
                        z += s[idx] as f64;
                    }
                    y[idx] = if act && z < 0.0 { z * 0.01 } else { z };
                }
            }
        }
        y
    }

    #[test]
    fn forward_is_accurate_on_large_offset_channels() {
        // 2 M voxels with mean 50: naive f32 sums would lose ~1e-3 relative.
        let (b, n, c) = (1, 1 << 21, 2);
        let x = rand(b * n * c, 3, 50.0);
        let (g, bt) = (vec![1.3, 0.7], vec![0.1, -0.2]);
        let y = forward(&x, &g, &bt, None, false, b, n, c);
        let want = reference(&x, &g, &bt, None, false, b, n, c);
        let err = y.iter().zip(&want).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
        assert!(err < 2e-5, "max abs error {err}");
    }

    #[test]
    fn backward_matches_finite_differences() {
        for (skip, act) in [(false, false), (false, true), (true, true)] {
            let (b, n, c) = (2, 37, 3);
            let x = rand(b * n * c, 5, 0.3);
            let g = vec![1.2f32, -0.8, 0.5];
            let bt = vec![0.05f32, -0.1, 0.2];
            let sk = rand(b * n * c, 9, 0.0);
            let dy = rand(b * n * c, 7, 0.0);
            let s = skip.then_some(sk.as_slice());
            let grads = backward(&x, &g, &bt, s, act, &dy, b, n, c);
            let loss = |x: &[f32], g: &[f32], bt: &[f32], s: Option<&[f32]>| -> f64 {
                reference(x, g, bt, s, act, b, n, c).iter().zip(&dy).map(|(a, d)| a * *d as f64).sum()
            };
            let h = 1e-4f32;
            let check = |analytic: f32, plus: f64, minus: f64, what: &str| {
                let numeric = (plus - minus) / (2.0 * h as f64);
                assert!((analytic as f64 - numeric).abs() < 5e-3 * (1.0 + numeric.abs()), "{what}: {analytic} vs {numeric} (skip {skip}, act {act})");
            };
            for i in [0, 5, 40, 111, 200] {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[i] += h;
                xm[i] -= h;
                check(grads.dx[i], loss(&xp, &g, &bt, s), loss(&xm, &g, &bt, s), "dx");
                if skip {
                    let (mut sp, mut sm) = (sk.clone(), sk.clone());
                    sp[i] += h;
                    sm[i] -= h;
                    check(grads.dskip.as_ref().unwrap()[i], loss(&x, &g, &bt, Some(&sp)), loss(&x, &g, &bt, Some(&sm)), "dskip");
                }
            }
            for ch in 0..c {
                let (mut gp, mut gm) = (g.clone(), g.clone());
                gp[ch] += h;
                gm[ch] -= h;
                check(grads.dgamma[ch], loss(&x, &gp, &bt, s), loss(&x, &gm, &bt, s), "dgamma");
                let (mut bp, mut bm) = (bt.clone(), bt.clone());
                bp[ch] += h;
                bm[ch] -= h;
                check(grads.dbeta[ch], loss(&x, &g, &bp, s), loss(&x, &g, &bm, s), "dbeta");
            }
        }
    }
}
