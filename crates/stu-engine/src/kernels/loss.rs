//! nnU-Net's Dice + CE loss (`crate::loss::dc_ce`; or one of the two, or Dice + TopK, as its
//! trainer variants, [`Terms`]) fused into two passes over the logits (three with TopK), with
//! its gradient written directly, so neither softmax, log-softmax nor a one-hot target is ever
//! materialised. With 105 classes at 2×128³ each of those is 1.8 GB, and burn's autodiff keeps
//! several for the backward: the composed loss alone needed over 10 GB.
//!
//! Layout: logits `[B, C, N]` (NCDHW flattened), targets `[B, N]` (class indices as f32).
//! Statistics accumulate in f64.

#![allow(unsafe_code)]

use rayon::prelude::*;

/// Voxels per work item.
const BLOCK: usize = 512;

/// Per (batch, class) sums over voxels: intersection Σp·y, Σp, Σy, and the batch's Σ −log p_t.
struct Stats {
    inter: Vec<f64>,
    sum_p: Vec<f64>,
    sum_y: Vec<f64>,
    ce: f64,
}

/// Softmax of voxels `v0..v0+len` of sample `bi` into `p` (`[len, c]`), and each voxel's
/// log-sum-exp of the logits into `lse`.
#[allow(clippy::too_many_arguments)]
fn softmax_block(logits: &[f32], bi: usize, c: usize, n: usize, v0: usize, len: usize, p: &mut [f32], lse: &mut [f64]) {
    let base = bi * c * n;
    for v in 0..len {
        let mut m = f32::NEG_INFINITY;
        for k in 0..c {
            m = m.max(logits[base + k * n + v0 + v]);
        }
        let mut s = 0f32;
        for k in 0..c {
            let e = (logits[base + k * n + v0 + v] - m).exp();
            p[v * c + k] = e;
            s += e;
        }
        let inv = 1.0 / s;
        for k in 0..c {
            p[v * c + k] *= inv;
        }
        lse[v] = m as f64 + (s as f64).ln();
    }
}

fn stats(logits: &[f32], target: &[f32], b: usize, c: usize, n: usize) -> Stats {
    let blocks: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..n).step_by(BLOCK).map(move |v0| (bi, v0))).collect();
    // Blocks folded in a fixed number of groups, combined in group order: the same bits on any
    // number of threads (`kernels::fold_groups`).
    let parts = crate::kernels::fold_groups(
        &blocks,
        || (vec![0f64; b * c], vec![0f64; b * c], vec![0f64; b * c], 0f64, (vec![0f32; BLOCK * c], vec![0f64; BLOCK])),
        |(mut inter, mut sum_p, mut sum_y, mut ce, (mut p, mut lse)), &(bi, v0)| {
            let len = BLOCK.min(n - v0);
            softmax_block(logits, bi, c, n, v0, len, &mut p, &mut lse);
            let mut sp = vec![0f64; c];
            for v in 0..len {
                let t = target[bi * n + v0 + v] as usize;
                let row = &p[v * c..(v + 1) * c];
                for (k, &pk) in row.iter().enumerate() {
                    sp[k] += pk as f64;
                }
                inter[bi * c + t] += row[t] as f64;
                sum_y[bi * c + t] += 1.0;
                // −log p_t = logsumexp − z_t.
                ce += lse[v] - logits[bi * c * n + t * n + v0 + v] as f64;
            }
            for k in 0..c {
                sum_p[bi * c + k] += sp[k];
            }
            (inter, sum_p, sum_y, ce, (p, lse))
        },
    );
    let (mut inter, mut sum_p, mut sum_y, mut ce) = (vec![0f64; b * c], vec![0f64; b * c], vec![0f64; b * c], 0f64);
    for (i, p, y, e, _) in parts {
        for k in 0..inter.len() {
            inter[k] += i[k];
            sum_p[k] += p[k];
            sum_y[k] += y[k];
        }
        ce += e;
    }
    Stats { inter, sum_p, sum_y, ce }
}

/// Dice terms (`(2I + s)/(S_y + S_p + s)` per foreground (batch, class), or per class over the
/// batch) with their sums.
fn dice_terms(st: &Stats, b: usize, c: usize, batch_dice: bool, smooth: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    // Returns (I, S, dc) per term, indexed [group][k−1]: group = batch index or 0.
    let groups = if batch_dice { 1 } else { b };
    let mut i_ = vec![0f64; groups * (c - 1)];
    let mut s_ = vec![0f64; groups * (c - 1)];
    for bi in 0..b {
        let g = if batch_dice { 0 } else { bi };
        for k in 1..c {
            i_[g * (c - 1) + k - 1] += st.inter[bi * c + k];
            s_[g * (c - 1) + k - 1] += st.sum_p[bi * c + k] + st.sum_y[bi * c + k];
        }
    }
    let dc = i_.iter().zip(&s_).map(|(i, s)| (2.0 * i + smooth) / (s + smooth).max(1e-8)).collect();
    (i_, s_, dc)
}

/// The loss's terms: `w_ce·CE + w_dice·(−mean Dice)` (as [`crate::loss::dc_ce`]: `[1, 1]`
/// nnU-Net's default, `[1, 0]` and `[0, 1]` its CE-only and Dice-only trainer variants), the
/// cross-entropy over every voxel or, with `topk`, over the `⌊N·topk/100⌋` voxels where it is
/// largest (nnU-Net's `TopKLoss`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Terms {
    /// Dice sums over the batch (nnU-Net's `batch_dice`).
    pub batch_dice: bool,
    /// The Dice's smoothing.
    pub smooth: f64,
    /// Weight of the cross-entropy term.
    pub ce: f64,
    /// Weight of the Dice term.
    pub dice: f64,
    /// The percentage of voxels the cross-entropy averages (`None`: all).
    pub topk: Option<f64>,
    /// The cross-entropy's label smoothing ε: its target is `(1 − ε)·onehot + ε/C`.
    pub smoothing: f64,
}

/// Each voxel's cross-entropy `−log p_t` (with label smoothing ε:
/// `(1 − ε)·(−log p_t) + ε·mean_k(−log p_k)`), `[B, N]`.
fn voxel_ce(logits: &[f32], target: &[f32], b: usize, c: usize, n: usize, eps: f64) -> Vec<f32> {
    let mut out = vec![0f32; b * n];
    for (bi, row) in out.chunks_mut(n).enumerate() {
        row.par_chunks_mut(BLOCK).enumerate().for_each_init(
            || (vec![0f32; BLOCK * c], vec![0f64; BLOCK]),
            |(p, lse), (j, dst)| {
                let v0 = j * BLOCK;
                softmax_block(logits, bi, c, n, v0, dst.len(), p, lse);
                for (v, d) in dst.iter_mut().enumerate() {
                    let t = target[bi * n + v0 + v] as usize;
                    let nll = lse[v] - logits[bi * c * n + t * n + v0 + v] as f64;
                    *d = if eps == 0.0 {
                        nll as f32
                    } else {
                        let mean_z = (0..c).map(|k| logits[bi * c * n + k * n + v0 + v] as f64).sum::<f64>() / c as f64;
                        ((1.0 - eps) * nll + eps * (lse[v] - mean_z)) as f32
                    };
                }
            },
        );
    }
    out
}

/// The voxels TopK averages: the `k = ⌊len·percent/100⌋` (at least one) largest of `ce`, ties
/// broken by position (also for `crate::loss::topk_ce`); and `k`.
pub(crate) fn topk_voxels(ce: &[f32], percent: f64) -> (Vec<bool>, usize) {
    let n = ce.len();
    let k = ((n as f64 * percent / 100.0) as usize).clamp(1, n);
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.select_nth_unstable_by(k - 1, |&a, &b| ce[b as usize].total_cmp(&ce[a as usize]).then(a.cmp(&b)));
    let mut chosen = vec![false; n];
    order[..k].iter().for_each(|&i| chosen[i as usize] = true);
    (chosen, k)
}

/// The loss of [`Terms`] (as [`crate::loss::dc_ce`]).
pub fn forward(logits: &[f32], target: &[f32], b: usize, c: usize, n: usize, t: Terms) -> f64 {
    assert!(c >= 2, "the loss needs background and at least one class");
    let st = stats(logits, target, b, c, n);
    let (_, _, dc) = dice_terms(&st, b, c, t.batch_dice, t.smooth);
    let ce = match (t.topk, t.smoothing) {
        (None, 0.0) => st.ce / (b * n) as f64,
        (None, eps) => voxel_ce(logits, target, b, c, n, eps).iter().map(|&x| x as f64).sum::<f64>() / (b * n) as f64,
        (Some(pct), eps) => {
            let v = voxel_ce(logits, target, b, c, n, eps);
            let (chosen, k) = topk_voxels(&v, pct);
            v.iter().zip(&chosen).filter(|(_, c)| **c).map(|(x, _)| *x as f64).sum::<f64>() / k as f64
        }
    };
    t.ce * ce - t.dice * dc.iter().sum::<f64>() / dc.len() as f64
}

/// `∂loss/∂logits · grad`, `[B, C, N]` ([`forward`]'s loss).
pub fn backward(logits: &[f32], target: &[f32], b: usize, c: usize, n: usize, t: Terms, grad: f64) -> Vec<f32> {
    let Terms { batch_dice, smooth, smoothing: eps, .. } = t;
    let st = stats(logits, target, b, c, n);
    let (i_, s_, _) = dice_terms(&st, b, c, batch_dice, smooth);
    // ∂(−w·mean dc)/∂p_kv = −(w/T)·(2·y_kv/(S+s) − (2I+s)/(S+s)²) = a_k·y_kv + c_k.
    let scale = t.dice / i_.len() as f64;
    let a: Vec<f64> = s_.iter().map(|s| -2.0 * scale / (s + smooth)).collect();
    let cst: Vec<f64> = i_.iter().zip(&s_).map(|(i, s)| scale * (2.0 * i + smooth) / (s + smooth).powi(2)).collect();
    // The cross-entropy's weight per voxel: w/N for all, or w/k for TopK's chosen voxels.
    let (chosen, ce_w) = match t.topk {
        None => (None, t.ce / (b * n) as f64),
        Some(pct) => {
            let (chosen, k) = topk_voxels(&voxel_ce(logits, target, b, c, n, t.smoothing), pct);
            (Some(chosen), t.ce / k as f64)
        }
    };
    let mut out = vec![0f32; b * c * n];
    // Parallel over (batch, block): each writes its own voxels of every class plane.
    let chunks: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..n).step_by(BLOCK).map(move |v0| (bi, v0))).collect();
    let outp = super::SharedMut::new(&mut out);
    chunks.par_iter().for_each_init(
        || (vec![0f32; BLOCK * c], vec![0f64; c], vec![0f64; BLOCK]),
        |(p, g, lse), &(bi, v0)| {
            let len = BLOCK.min(n - v0);
            softmax_block(logits, bi, c, n, v0, len, p, lse);
            let grp = if batch_dice { 0 } else { bi };
            for v in 0..len {
                let t = target[bi * n + v0 + v] as usize;
                let w = match &chosen {
                    Some(ch) if !ch[bi * n + v0 + v] => 0.0,
                    _ => ce_w,
                };
                let row = &p[v * c..(v + 1) * c];
                g[0] = 0.0;
                let mut pg = 0f64;
                for k in 1..c {
                    let j = grp * (c - 1) + k - 1;
                    g[k] = cst[j] + if k == t { a[j] } else { 0.0 };
                    pg += row[k] as f64 * g[k];
                }
                for k in 0..c {
                    let pk = row[k] as f64;
                    let y = (1.0 - eps) * f64::from(u8::from(k == t)) + eps / c as f64;
                    let dz = pk * (g[k] - pg) + (pk - y) * w;
                    let idx = bi * c * n + k * n + v0 + v;
                    assert!(idx < b * c * n);
                    // SAFETY: in bounds (checked); element (bi, k, v0 + v) belongs to this work
                    // item's (bi, block) only; `out` outlives the parallel loop.
                    unsafe { outp.write(idx, (dz * grad) as f32) };
                }
            }
        },
    );
    out
}
