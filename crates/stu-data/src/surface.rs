//! Surface distances as DeepMind's `surface-distance` computes them (the algorithm of the
//! FLARE challenges' `SurfaceDice.py`, `shared/docs/nnunet-pipeline.md` §7): surfels from the
//! 2×2×2 neighbour code of each voxel corner, areas from the marching-cube normal table
//! ([`crate::surfels`]) scaled by the spacing, and exact Euclidean distance transforms with
//! anisotropic sampling. From them: Normalized Surface Dice at a tolerance and the robust
//! (95th-percentile, area-weighted) Hausdorff distance.

use crate::surfels::NORMALS;

/// Border surfels of both masks with their areas and their distances to the other surface.
#[derive(Debug, Clone, Default)]
pub struct SurfaceDistances {
    /// Distance of each reference surfel to the prediction's surface (mm), ascending.
    pub gt_to_pred: Vec<(f64, f64)>,
    /// Distance of each predicted surfel to the reference's surface (mm), ascending; pairs are
    /// (distance, area).
    pub pred_to_gt: Vec<(f64, f64)>,
}

fn area_table(spacing: [f64; 3]) -> [f64; 256] {
    let mut t = [0.0; 256];
    for (code, normals) in NORMALS.iter().enumerate() {
        t[code] = normals
            .iter()
            .map(|n| {
                let v = [n[0] * spacing[1] * spacing[2], n[1] * spacing[0] * spacing[2], n[2] * spacing[0] * spacing[1]];
                (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt()
            })
            .sum();
    }
    t
}

/// Surface distances of two masks of `shape` with voxel `spacing` (mm, array order).
pub fn surface_distances(gt: &[bool], pred: &[bool], shape: [usize; 3], spacing: [f64; 3]) -> SurfaceDistances {
    // Bounding box of the union.
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    let mut any = false;
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                let i = (z * shape[1] + y) * shape[2] + x;
                if gt[i] || pred[i] {
                    any = true;
                    for (a, v) in [z, y, x].into_iter().enumerate() {
                        lo[a] = lo[a].min(v);
                        hi[a] = hi[a].max(v);
                    }
                }
            }
        }
    }
    if !any {
        return SurfaceDistances::default();
    }
    // Crop, padded by one voxel at the high end: corners 0..=extent.
    let ext: [usize; 3] = std::array::from_fn(|a| hi[a] - lo[a] + 2);
    let n: usize = ext.iter().product();
    let crop = |m: &[bool]| -> Vec<bool> {
        let mut c = vec![false; n];
        for z in lo[0]..=hi[0] {
            for y in lo[1]..=hi[1] {
                for x in lo[2]..=hi[2] {
                    c[((z - lo[0]) * ext[1] + y - lo[1]) * ext[2] + x - lo[2]] = m[(z * shape[1] + y) * shape[2] + x];
                }
            }
        }
        c
    };
    let (cg, cp) = (crop(gt), crop(pred));
    // scipy.ndimage.correlate with the 2×2×2 kernel [[[128,64],[32,16]],[[8,4],[2,1]]]:
    // code[i] = Σ K[a][b][c]·m[i + (a,b,c) − 1], zero outside.
    let code = |m: &[bool]| -> Vec<u8> {
        let mut out = vec![0u8; n];
        for z in 0..ext[0] {
            for y in 0..ext[1] {
                for x in 0..ext[2] {
                    let mut c = 0u8;
                    for a in 0..2 {
                        for b in 0..2 {
                            for d in 0..2 {
                                let (zz, yy, xx) = (z as i64 + a - 1, y as i64 + b - 1, x as i64 + d - 1);
                                if zz >= 0 && yy >= 0 && xx >= 0 && m[(zz as usize * ext[1] + yy as usize) * ext[2] + xx as usize] {
                                    c |= 1 << (7 - (a * 4 + b * 2 + d));
                                }
                            }
                        }
                    }
                    out[(z * ext[1] + y) * ext[2] + x] = c;
                }
            }
        }
        out
    };
    let (code_g, code_p) = (code(&cg), code(&cp));
    let border = |c: &[u8]| -> Vec<bool> { c.iter().map(|&v| v != 0 && v != 255).collect() };
    let (bg, bp) = (border(&code_g), border(&code_p));
    let dist_to = |b: &[bool]| -> Option<Vec<f64>> { b.iter().any(|&v| v).then(|| edt(b, ext, spacing)) };
    let (dg, dp) = (dist_to(&bg), dist_to(&bp));
    let areas = area_table(spacing);
    let collect = |border: &[bool], codes: &[u8], other: &Option<Vec<f64>>| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = border
            .iter()
            .enumerate()
            .filter(|(_, b)| **b)
            .map(|(i, _)| (other.as_ref().map_or(f64::INFINITY, |d| d[i]), areas[codes[i] as usize]))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    SurfaceDistances { gt_to_pred: collect(&bg, &code_g, &dp), pred_to_gt: collect(&bp, &code_p, &dg) }
}

/// Euclidean distance (mm) of every point of the grid to the nearest `true` one
/// (Felzenszwalb–Huttenlocher, one axis at a time, with spacing).
pub fn edt(feature: &[bool], shape: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let mut d: Vec<f64> = feature.iter().map(|&f| if f { 0.0 } else { f64::INFINITY }).collect();
    let strides = [shape[1] * shape[2], shape[2], 1];
    for axis in 0..3 {
        let len = shape[axis];
        let (o0, o1) = match axis {
            0 => (1, 2),
            1 => (0, 2),
            _ => (0, 1),
        };
        let s2 = spacing[axis] * spacing[axis];
        let mut f = vec![0f64; len];
        let mut out = vec![0f64; len];
        let mut v = vec![0usize; len];
        let mut zb = vec![0f64; len + 1];
        for i in 0..shape[o0] {
            for j in 0..shape[o1] {
                let base = i * strides[o0] + j * strides[o1];
                for (q, fq) in f.iter_mut().enumerate() {
                    *fq = d[base + q * strides[axis]];
                }
                lower_envelope(&f, s2, &mut out, &mut v, &mut zb);
                for (q, o) in out.iter().enumerate() {
                    d[base + q * strides[axis]] = *o;
                }
            }
        }
    }
    d.iter_mut().for_each(|v| *v = v.sqrt());
    d
}

/// 1-D squared distance transform of `f` with squared spacing `s2`.
fn lower_envelope(f: &[f64], s2: f64, out: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    let finite: Vec<usize> = (0..n).filter(|&q| f[q].is_finite()).collect();
    if finite.is_empty() {
        out.iter_mut().for_each(|o| *o = f64::INFINITY);
        return;
    }
    let mut k = 0usize;
    v[0] = finite[0];
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    let inter = |q: usize, p: usize| ((f[q] + s2 * (q * q) as f64) - (f[p] + s2 * (p * p) as f64)) / (2.0 * s2 * (q as f64 - p as f64));
    for &q in &finite[1..] {
        let mut s = inter(q, v[k]);
        while s <= z[k] {
            k -= 1;
            s = inter(q, v[k]);
        }
        k += 1;
        v[k] = q;
        z[k] = s;
        z[k + 1] = f64::INFINITY;
    }
    k = 0;
    for (q, o) in out.iter_mut().enumerate() {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let d = q as f64 - v[k] as f64;
        *o = s2 * d * d + f[v[k]];
    }
}

/// Normalized Surface Dice at `tolerance` mm (FLARE conventions: both masks empty → 1, exactly
/// one empty → 0).
pub fn nsd(d: &SurfaceDistances, tolerance: f64) -> f64 {
    let total: f64 = d.gt_to_pred.iter().chain(&d.pred_to_gt).map(|p| p.1).sum();
    if d.gt_to_pred.is_empty() && d.pred_to_gt.is_empty() {
        return 1.0;
    }
    if d.gt_to_pred.is_empty() || d.pred_to_gt.is_empty() {
        return 0.0;
    }
    let within: f64 = d.gt_to_pred.iter().chain(&d.pred_to_gt).filter(|p| p.0 <= tolerance).map(|p| p.1).sum();
    within / total
}

/// Average symmetric surface distance: every surfel's distance to the other surface, both
/// directions, weighted by surfel area (DeepMind's two directed averages pooled). Infinite when
/// one surface is empty, NaN when both are.
pub fn assd(d: &SurfaceDistances) -> f64 {
    if d.gt_to_pred.is_empty() && d.pred_to_gt.is_empty() {
        return f64::NAN;
    }
    if d.gt_to_pred.is_empty() || d.pred_to_gt.is_empty() {
        return f64::INFINITY;
    }
    let (sum, area) = d.gt_to_pred.iter().chain(&d.pred_to_gt).fold((0.0, 0.0), |(s, a), p| (s + p.0 * p.1, a + p.1));
    sum / area
}

/// DeepMind's robust Hausdorff distance at `percent` (95 for HD95): per direction the distance
/// where the cumulative surfel area first reaches the percentile, then the larger of the two.
/// Infinite when one surface is empty, NaN when both are.
pub fn robust_hausdorff(d: &SurfaceDistances, percent: f64) -> f64 {
    if d.gt_to_pred.is_empty() && d.pred_to_gt.is_empty() {
        return f64::NAN;
    }
    let one = |v: &[(f64, f64)]| -> f64 {
        if v.is_empty() {
            return f64::INFINITY;
        }
        let total: f64 = v.iter().map(|p| p.1).sum();
        let mut cum = 0.0;
        for (i, p) in v.iter().enumerate() {
            cum += p.1;
            // np.searchsorted(cumsum / total, percent / 100) with side='left'.
            if cum / total >= percent / 100.0 {
                return v[i].0;
            }
        }
        v[v.len() - 1].0
    };
    one(&d.gt_to_pred).max(one(&d.pred_to_gt))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(shape: [usize; 3], f: impl Fn(usize, usize, usize) -> bool) -> Vec<bool> {
        (0..shape.iter().product()).map(|i| f(i / (shape[1] * shape[2]), i / shape[2] % shape[1], i % shape[2])).collect()
    }

    #[test]
    fn nsd_matches_the_spec_vectors() {
        // Single voxels 2 apart on axis 2, spacing (3,2,1): NSD@1 = 0.5, NSD@2 = 1.
        let s = [5, 5, 7];
        let g = mask(s, |z, y, x| (z, y, x) == (2, 2, 2));
        let p = mask(s, |z, y, x| (z, y, x) == (2, 2, 4));
        let d = surface_distances(&g, &p, s, [3.0, 2.0, 1.0]);
        assert!((nsd(&d, 1.0) - 0.5).abs() < 1e-9, "{}", nsd(&d, 1.0));
        assert!((nsd(&d, 2.0) - 1.0).abs() < 1e-9);
        // Slab [0:50) vs [0:51) on axis 0 in 100³, spacing (2,1,1).
        let s = [100, 100, 100];
        let g = mask(s, |z, _, _| z < 50);
        let p = mask(s, |z, _, _| z < 51);
        let d = surface_distances(&g, &p, s, [2.0, 1.0, 1.0]);
        assert!((nsd(&d, 1.0) - 0.836145).abs() < 1e-6, "{}", nsd(&d, 1.0));
        assert!((nsd(&d, 2.0) - 1.0).abs() < 1e-9);
        // 20³ cube vs the same shifted by one voxel, spacing 1.
        let s = [30, 30, 30];
        let g = mask(s, |z, y, x| (5..25).contains(&z) && (5..25).contains(&y) && (5..25).contains(&x));
        let p = mask(s, |z, y, x| (6..26).contains(&z) && (5..25).contains(&y) && (5..25).contains(&x));
        let d = surface_distances(&g, &p, s, [1.0; 3]);
        assert!((nsd(&d, 0.5) - 0.666543).abs() < 1e-6, "{}", nsd(&d, 0.5));
        assert!((nsd(&d, 1.0) - 1.0).abs() < 1e-9);
        // Identical → 1, empty prediction → 0, both empty → 1.
        assert_eq!(nsd(&surface_distances(&g, &g, s, [1.0; 3]), 1.0), 1.0);
        let empty = vec![false; g.len()];
        assert_eq!(nsd(&surface_distances(&g, &empty, s, [1.0; 3]), 1.0), 0.0);
        assert_eq!(nsd(&surface_distances(&empty, &empty, s, [1.0; 3]), 1.0), 1.0);
        assert_eq!(robust_hausdorff(&surface_distances(&g, &g, s, [1.0; 3]), 95.0), 0.0);
    }

    #[test]
    fn edt_is_exact_on_a_point() {
        let s = [7, 6, 5];
        let f = mask(s, |z, y, x| (z, y, x) == (3, 2, 1));
        let d = edt(&f, s, [2.0, 1.0, 0.5]);
        for (i, v) in d.iter().enumerate() {
            let (z, y, x) = ((i / 30) as f64, (i / 5 % 6) as f64, (i % 5) as f64);
            let want = (((z - 3.0) * 2.0).powi(2) + (y - 2.0).powi(2) + ((x - 1.0) * 0.5).powi(2)).sqrt();
            assert!((v - want).abs() < 1e-12);
        }
    }
}
