//! nnU-Net's resampling (`shared/docs/nnunet-pipeline.md` §4.3), separable and exact.
//!
//! - Data: `skimage.transform.resize(order=3, mode='edge', anti_aliasing=False)`, i.e. scipy's
//!   `zoom(grid_mode=True, mode='nearest')`: output `i` samples input `(i + 0.5)·n/m − 0.5`; the
//!   input is edge-padded by 12 and prefiltered into cubic B-spline coefficients; the result is
//!   clipped to the input's range. The tensor-product spline is separable, so one axis at a time
//!   gives the same values (in f64).
//! - Segmentations: order 1 per label in ascending order (−1 included), writing the label where
//!   its linearly resampled indicator is ≥ 0.5 (batchgenerators' classic `resize_segmentation`,
//!   which nnU-Net v2.2 and so STU-Net use, as `nnunet-pipeline.md` §4.3 specifies; the
//!   batchgenerators 0.25.5 installed with nnU-Net 2.8.1 takes the argmax of the indicators
//!   instead, which differs where several labels meet). A label is resampled only over its
//!   bounding box plus a margin, which gives identical results.
//! - Separate z (anisotropic data): in-plane as above, then nearest neighbour along the
//!   anisotropic axis (`map_coordinates(order=0, mode='nearest')`).

// `let p = p;` inside a parallel closure is not redundant: it makes the closure capture the
// whole `Send` pointer wrapper, where edition 2021+ would capture its raw-pointer field alone.
#![allow(clippy::redundant_locals)]

use rayon::prelude::*;

/// scipy's pad for splines with mode 'nearest'.
const NPAD: usize = 12;
/// Cubic B-spline pole.
fn pole() -> f64 {
    3f64.sqrt() - 2.0
}

/// In-place cubic B-spline prefilter of one line with mirror boundary (Unser's recursion).
fn prefilter(c: &mut [f64]) {
    let n = c.len();
    if n < 2 {
        return;
    }
    let z = pole();
    let lambda = (1.0 - z) * (1.0 - 1.0 / z);
    for v in c.iter_mut() {
        *v *= lambda;
    }
    // Causal init, mirror boundary: Σ z^k c[k] (truncated where z^k is negligible).
    let horizon = n.min(40);
    let mut zk = z;
    let mut sum = c[0];
    for &v in &c[1..horizon] {
        sum += zk * v;
        zk *= z;
    }
    c[0] = sum;
    for k in 1..n {
        c[k] += z * c[k - 1];
    }
    c[n - 1] = z / (z * z - 1.0) * (c[n - 1] + z * c[n - 2]);
    for k in (0..n - 1).rev() {
        c[k] = z * (c[k + 1] - c[k]);
    }
}

/// Cubic B-spline weights for fractional offset t ∈ [0, 1), for coefficients j−1 … j+2.
fn cubic_weights(t: f64) -> [f64; 4] {
    let t2 = t * t;
    let t3 = t2 * t;
    [
        (1.0 - t).powi(3) / 6.0,
        (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0,
        (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0,
        t3 / 6.0,
    ]
}

/// Source coordinate of output index `i` (grid mode).
fn source(i: usize, n_in: usize, n_out: usize) -> f64 {
    (i as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5
}

/// Interpolation taps of every output index along one axis: up to 4 (index, weight) pairs.
/// Indices are global input indices, clamped to the axis (mode 'nearest'); for order 3 they
/// index the 12-padded coefficient line.
struct Taps {
    order: u32,
    idx: Vec<[usize; 4]>,
    w: Vec<[f64; 4]>,
}

impl Taps {
    fn new(n: usize, m: usize, order: u32) -> Self {
        let mut idx = Vec::with_capacity(m);
        let mut w = Vec::with_capacity(m);
        for i in 0..m {
            let x = source(i, n, m);
            match order {
                0 => {
                    let j = ((x + 0.5).floor().max(0.0) as usize).min(n - 1);
                    idx.push([j; 4]);
                    w.push([1.0, 0.0, 0.0, 0.0]);
                }
                1 => {
                    let x = x.clamp(0.0, (n - 1) as f64);
                    let j = (x.floor() as usize).min(n - 1);
                    let t = x - j as f64;
                    idx.push([j, (j + 1).min(n - 1), j, j]);
                    w.push([1.0 - t, t, 0.0, 0.0]);
                }
                _ => {
                    let np = (n + 2 * NPAD) as isize;
                    let x = x + NPAD as f64;
                    let j = x.floor();
                    w.push(cubic_weights(x - j));
                    let j = j as isize;
                    idx.push(std::array::from_fn(|k| (j - 1 + k as isize).clamp(0, np - 1) as usize));
                }
            }
        }
        Self { order, idx, w }
    }

    fn width(&self) -> usize {
        match self.order {
            0 => 1,
            1 => 2,
            _ => 4,
        }
    }

    /// Output `i` from the input values `src(j)` (for order 3: the padded coefficients').
    #[inline(always)]
    fn sum(&self, i: usize, src: impl Fn(usize) -> f64) -> f64 {
        let (ix, w) = (&self.idx[i], &self.w[i]);
        (0..self.width()).map(|t| w[t] * src(ix[t])).sum()
    }
}

/// Resamples one line with precomputed taps (order 3: prefiltered coefficients first).
fn line(input: &[f64], out: &mut [f64], taps: &Taps, scratch: &mut Vec<f64>) {
    let n = input.len();
    let src: &[f64] = if taps.order >= 2 {
        scratch.clear();
        scratch.extend(std::iter::repeat_n(input[0], NPAD));
        scratch.extend_from_slice(input);
        scratch.extend(std::iter::repeat_n(input[n - 1], NPAD));
        prefilter(scratch);
        scratch
    } else {
        input
    };
    for (i, o) in out.iter_mut().enumerate() {
        *o = taps.sum(i, |j| src[j]);
    }
}

/// Storage of intermediate volumes: lines are always computed in f64.
trait Sample: Copy + Send + Sync + Default {
    fn get(self) -> f64;
    fn put(v: f64) -> Self;
}
impl Sample for f64 {
    fn get(self) -> f64 {
        self
    }
    fn put(v: f64) -> Self {
        v
    }
}
impl Sample for f32 {
    fn get(self) -> f64 {
        self as f64
    }
    fn put(v: f64) -> Self {
        v as f32
    }
}

/// Resamples a `[z, y, x]` volume along one axis to length `m`.
fn along<T: Sample>(v: &[T], shape: [usize; 3], axis: usize, m: usize, order: u32) -> Vec<T> {
    let n = shape[axis];
    let mut out_shape = shape;
    out_shape[axis] = m;
    if n == m {
        return v.to_vec();
    }
    let mut out = vec![T::default(); out_shape.iter().product()];
    let strides_in = [shape[1] * shape[2], shape[2], 1];
    let strides_out = [out_shape[1] * out_shape[2], out_shape[2], 1];
    // Lines are indexed by the other two axes; parallel over the outermost of them.
    let (a, b) = match axis {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let taps = Taps::new(n, m, order);
    let outp = Shared(out.as_mut_ptr() as *mut u8);
    (0..shape[a]).into_par_iter().for_each_init(
        || (vec![0f64; n], vec![0f64; m], Vec::new()),
        |(src, dst, scratch), ia| {
            let outp = outp;
            for ib in 0..shape[b] {
                let base_in = ia * strides_in[a] + ib * strides_in[b];
                for (k, s) in src.iter_mut().enumerate() {
                    *s = v[base_in + k * strides_in[axis]].get();
                }
                line(src, dst, &taps, scratch);
                let base_out = ia * strides_out[a] + ib * strides_out[b];
                for (k, d) in dst.iter().enumerate() {
                    // SAFETY: each (ia, ib) line writes its own output elements.
                    #[allow(unsafe_code)]
                    unsafe {
                        *(outp.0 as *mut T).add(base_out + k * strides_out[axis]) = T::put(*d);
                    }
                }
            }
        },
    );
    out
}

#[derive(Clone, Copy)]
struct Shared(*mut u8);
// SAFETY: used only where tasks write disjoint elements.
#[allow(unsafe_code)]
unsafe impl Send for Shared {}
#[allow(unsafe_code)]
unsafe impl Sync for Shared {}

/// The separate-z decision (`get_do_separate_z` / `get_lowres_axis`): the axis to treat
/// separately, if any.
pub fn separate_axis(current: [f64; 3], new: [f64; 3]) -> Option<usize> {
    let pick = |s: [f64; 3]| {
        let (max, min) = (s.iter().copied().fold(f64::MIN, f64::max), s.iter().copied().fold(f64::MAX, f64::min));
        if max / min > crate::plan::ANISO_THRESHOLD {
            let axes: Vec<usize> = (0..3).filter(|&a| s[a] == max).collect();
            Some(axes)
        } else {
            None
        }
    };
    match pick(current).or_else(|| pick(new)) {
        Some(axes) if axes.len() == 1 => Some(axes[0]),
        _ => None,
    }
}

/// Resamples a logit or probability volume to `new_shape` as nnU-Net's export does
/// (`resampling_fn_probabilities`: order 1, order 0 along a separate axis, no clipping).
pub fn resample_linear(v: &[f32], shape: [usize; 3], new_shape: [usize; 3], separate: Option<usize>) -> Vec<f32> {
    // The first pass reads `v` itself and axes that keep their extent are skipped: no copy of
    // the input (predict resamples a whole volume's logits, one class after another).
    let mut cur: std::borrow::Cow<'_, [f32]> = std::borrow::Cow::Borrowed(v);
    let mut cur_shape = shape;
    for axis in (0..3).filter(|&a| Some(a) != separate).chain(separate) {
        if cur_shape[axis] == new_shape[axis] {
            continue;
        }
        let order = if Some(axis) == separate { 0 } else { 1 };
        cur = std::borrow::Cow::Owned(along(&cur, cur_shape, axis, new_shape[axis], order));
        cur_shape[axis] = new_shape[axis];
    }
    cur.into_owned()
}

/// [`resample_linear`] a few output rows (slices along the first axis) at a time, from input
/// rows as they become available (a sliding window's finished slices): the same values, bit for
/// bit, without ever holding the whole input or output. Each output row reads at most two input
/// rows, [`LinearRows::reads`].
pub struct LinearRows {
    shape: [usize; 3],
    new_shape: [usize; 3],
    separate: Option<usize>,
    /// The first axis's taps, when its extent changes.
    taps0: Option<Taps>,
}

impl LinearRows {
    /// Rows of `resample_linear(_, shape, new_shape, separate)`.
    pub fn new(shape: [usize; 3], new_shape: [usize; 3], separate: Option<usize>) -> Self {
        let taps0 = (shape[0] != new_shape[0]).then(|| Taps::new(shape[0], new_shape[0], if separate == Some(0) { 0 } else { 1 }));
        Self { shape, new_shape, separate, taps0 }
    }

    /// The first and last input row that output row `r` reads.
    pub fn reads(&self, r: usize) -> (usize, usize) {
        match &self.taps0 {
            None => (r, r),
            Some(t) => {
                let ix = &t.idx[r][..t.width()];
                (ix.iter().copied().min().expect("a tap"), ix.iter().copied().max().expect("a tap"))
            }
        }
    }

    /// Output rows `rows` (`[rows.len(), Y', X']`) from `input`, the input rows `first..` (`[m,
    /// Y, X]`), which must include every row they read.
    pub fn rows(&self, input: &[f32], first: usize, rows: std::ops::Range<usize>) -> Vec<f32> {
        let plane = self.shape[1] * self.shape[2];
        if rows.is_empty() {
            return Vec::new();
        }
        let (lo, hi) = (self.reads(rows.start).0, self.reads(rows.end - 1).1);
        assert!(lo >= first && (hi + 1 - first) * plane <= input.len(), "output rows {rows:?} read input rows {lo}..={hi}, given {first}..{}", first + input.len() / plane);
        let mut cur: std::borrow::Cow<'_, [f32]> = std::borrow::Cow::Borrowed(&input[(lo - first) * plane..(hi + 1 - first) * plane]);
        let mut cur_shape = [hi + 1 - lo, self.shape[1], self.shape[2]];
        // resample_linear's passes, in its order; the first axis's only over these rows.
        for axis in (0..3).filter(|&a| Some(a) != self.separate).chain(self.separate) {
            if axis == 0 {
                let Some(taps) = &self.taps0 else { continue };
                let cp = cur_shape[1] * cur_shape[2];
                let mut out = vec![0f32; rows.len() * cp];
                let src = &cur;
                out.par_chunks_mut(cp).zip(rows.clone()).for_each(|(o, r)| {
                    for (p, o) in o.iter_mut().enumerate() {
                        *o = f32::put(taps.sum(r, |j| src[(j - lo) * cp + p].get()));
                    }
                });
                cur = std::borrow::Cow::Owned(out);
                cur_shape[0] = rows.len();
            } else if cur_shape[axis] != self.new_shape[axis] {
                let order = if Some(axis) == self.separate { 0 } else { 1 };
                cur = std::borrow::Cow::Owned(along(&cur, cur_shape, axis, self.new_shape[axis], order));
                cur_shape[axis] = self.new_shape[axis];
            }
        }
        debug_assert_eq!(cur_shape[0], rows.len());
        cur.into_owned()
    }
}

/// Resamples image data to `new_shape` (order 3, separate z when `separate` names an axis);
/// f64 inside, f32 out. Clipping follows skimage's `resize(clip=True)`: to the whole input's
/// range, or, with a separate axis, to each 2-D slice's own range (nnU-Net resizes slice by
/// slice there).
pub fn resample_data(v: &[f32], shape: [usize; 3], new_shape: [usize; 3], separate: Option<usize>) -> Vec<f32> {
    if shape == new_shape {
        return v.to_vec();
    }
    let range = |it: &mut dyn Iterator<Item = f32>| it.fold((f32::MAX, f32::MIN), |(l, h), x| (l.min(x), h.max(x)));
    // Intermediate volumes are stored as f32 (each line is computed in f64): half the memory,
    // differences ~1e-7 relative.
    let mut cur: Vec<f32> = Vec::new();
    let mut first = true;
    let mut cur_shape = shape;
    let strides = [shape[1] * shape[2], shape[2], 1];
    match separate {
        None => {
            let (lo, hi) = v.par_iter().fold(|| (f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x))).reduce(|| (f32::MAX, f32::MIN), |a, b| (a.0.min(b.0), a.1.max(b.1)));
            for axis in 0..3 {
                cur = along(if first { v } else { &cur }, cur_shape, axis, new_shape[axis], 3);
                first = false;
                cur_shape[axis] = new_shape[axis];
            }
            cur.par_iter_mut().for_each(|x| *x = x.clamp(lo, hi));
            cur
        }
        Some(sa) => {
            let others: Vec<usize> = (0..3).filter(|&a| a != sa).collect();
            let ranges: Vec<(f32, f32)> = (0..shape[sa])
                .map(|k| {
                    let mut it = (0..shape[others[0]]).flat_map(|i| (0..shape[others[1]]).map(move |j| (i, j))).map(|(i, j)| v[k * strides[sa] + i * strides[others[0]] + j * strides[others[1]]]);
                    range(&mut it)
                })
                .collect();
            for &axis in &others {
                cur = along(if first { v } else { &cur }, cur_shape, axis, new_shape[axis], 3);
                first = false;
                cur_shape[axis] = new_shape[axis];
            }
            let cs = [cur_shape[1] * cur_shape[2], cur_shape[2], 1];
            for (k, &(lo, hi)) in ranges.iter().enumerate() {
                for i in 0..cur_shape[others[0]] {
                    for j in 0..cur_shape[others[1]] {
                        let idx = k * cs[sa] + i * cs[others[0]] + j * cs[others[1]];
                        cur[idx] = cur[idx].clamp(lo, hi);
                    }
                }
            }
            along(&cur, cur_shape, sa, new_shape[sa], 0)
        }
    }
}

/// Resamples a segmentation (values ≥ −1) to `new_shape`: per label, ascending, linear
/// indicator ≥ 0.5 (nearest along a separate axis).
pub fn resample_seg(seg: &[i16], shape: [usize; 3], new_shape: [usize; 3], separate: Option<usize>) -> Vec<i16> {
    if shape == new_shape {
        return seg.to_vec();
    }
    let mut labels: Vec<i16> = {
        let mut seen = std::collections::BTreeSet::new();
        for &s in seg {
            seen.insert(s);
        }
        seen.into_iter().collect()
    };
    labels.sort_unstable();
    let mut out = vec![0i16; new_shape.iter().product()];
    let [_, h, w] = shape;
    let bbox_of = |label: i16| {
        let mut bb = [[usize::MAX, 0usize]; 3];
        for (i, &s) in seg.iter().enumerate() {
            if s == label {
                let c = [i / (h * w), i / w % h, i % w];
                for a in 0..3 {
                    bb[a][0] = bb[a][0].min(c[a]);
                    bb[a][1] = bb[a][1].max(c[a] + 1);
                }
            }
        }
        bb
    };
    let minus_one = labels.contains(&-1).then(|| bbox_of(-1));
    for &label in &labels {
        // The output starts at 0 and only −1 is written before 0, so label 0 matters only where
        // −1 was written: none at all without −1 voxels, else inside −1's window.
        let bb = match label {
            0 => match minus_one {
                None => continue,
                Some(bb) => bb,
            },
            _ => bbox_of(label),
        };
        let mut ob = [[0usize; 2]; 3];
        let mut ib = [[0usize; 2]; 3];
        for a in 0..3 {
            let (n, m) = (shape[a], new_shape[a]);
            // Output indices whose source coordinate may touch the box (linear taps ±1).
            let lo = bb[a][0].saturating_sub(2) as f64;
            let hi = (bb[a][1] + 2).min(n) as f64;
            let o0 = (((lo + 0.5) * m as f64 / n as f64) - 1.0).floor().max(0.0) as usize;
            let o1 = ((((hi + 0.5) * m as f64 / n as f64) + 1.0).ceil() as usize).min(m);
            ob[a] = [o0, o1];
            // Input window that covers every tap of those outputs (clamped coordinates).
            let s0 = source(o0, n, m).floor().max(0.0) as usize;
            let s1 = ((source(o1.saturating_sub(1), n, m).ceil() as usize) + 2).min(n);
            ib[a] = [s0.min(bb[a][0]), s1.max(bb[a][1])];
        }
        // Resample the indicator of the input window to the output window. The window's own
        // coordinate mapping differs from the full volume's, so map each output index exactly:
        // do it axis by axis with explicit source coordinates.
        let win = [0, 1, 2].map(|a| ib[a][1] - ib[a][0]);
        let mut cur: Vec<f64> = Vec::with_capacity(win.iter().product());
        for z in ib[0][0]..ib[0][1] {
            for y in ib[1][0]..ib[1][1] {
                for x in ib[2][0]..ib[2][1] {
                    cur.push(f64::from(seg[(z * h + y) * w + x] == label));
                }
            }
        }
        let mut cur_shape = win;
        for a in 0..3 {
            let order = if Some(a) == separate { 0 } else { 1 };
            cur = along_window(&cur, cur_shape, a, ib[a][0], shape[a], ob[a], new_shape[a], order);
            cur_shape[a] = ob[a][1] - ob[a][0];
        }
        let [oh, ow] = [new_shape[1], new_shape[2]];
        let mut k = 0;
        for z in ob[0][0]..ob[0][1] {
            for y in ob[1][0]..ob[1][1] {
                for x in ob[2][0]..ob[2][1] {
                    if cur[k] >= 0.5 {
                        out[(z * oh + y) * ow + x] = label;
                    }
                    k += 1;
                }
            }
        }
    }
    out
}

/// Like [`along`] for a window: input covers global indices `[in0, in0 + len)` of an axis of
/// length `n`; output covers global indices `out` of length `m`; linear or nearest, mode
/// 'nearest' at the true volume borders. Outside the input window the indicator is 0.
#[allow(clippy::too_many_arguments)]
fn along_window(v: &[f64], shape: [usize; 3], axis: usize, in0: usize, n: usize, out: [usize; 2], m: usize, order: u32) -> Vec<f64> {
    let len_out = out[1] - out[0];
    let mut out_shape = shape;
    out_shape[axis] = len_out;
    let mut res = vec![0f64; out_shape.iter().product()];
    let si = [shape[1] * shape[2], shape[2], 1];
    let so = [out_shape[1] * out_shape[2], out_shape[2], 1];
    let others: Vec<usize> = (0..3).filter(|&a| a != axis).collect();
    let (a, b) = (others[0], others[1]);
    let len_in = shape[axis];
    let all = Taps::new(n, m, order);
    let k = all.width();
    // Taps of the window's outputs, as window-relative input positions (None: outside, value 0).
    let taps: Vec<[(Option<usize>, f64); 4]> = (out[0]..out[1])
        .map(|i| std::array::from_fn(|t| {
            let g = all.idx[i][t];
            ((g >= in0 && g < in0 + len_in).then(|| g - in0), if t < k { all.w[i][t] } else { 0.0 })
        }))
        .collect();
    let resp = Shared(res.as_mut_ptr() as *mut u8);
    (0..shape[a]).into_par_iter().for_each(|ia| {
        let resp = resp;
        for ib in 0..shape[b] {
            let bi = ia * si[a] + ib * si[b];
            let bo = ia * so[a] + ib * so[b];
            for (kk, tp) in taps.iter().enumerate() {
                let val: f64 = tp[..k].iter().map(|&(p, wt)| p.map_or(0.0, |p| wt * v[bi + p * si[axis]])).sum();
                // SAFETY: each (ia, ib) line writes its own output elements.
                #[allow(unsafe_code)]
                unsafe {
                    *(resp.0 as *mut f64).add(bo + kk * so[axis]) = val;
                }
            }
        }
    });
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `resample_linear` is `along` per axis (in-plane axes first, a separate axis last with
    /// order 0), axes that keep their extent untouched.
    #[test]
    fn linear_resampling_is_the_per_axis_passes() {
        let shape = [4, 5, 6];
        let v: Vec<f32> = (0..120).map(|i| ((i * 37) % 17) as f32 - 8.0).collect();
        for (new_shape, sep) in [([4, 3, 9], None), ([7, 5, 3], Some(0)), ([2, 5, 6], Some(0)), ([4, 5, 6], None), ([4, 8, 6], Some(2))] {
            let mut want = v.clone();
            let mut cur = shape;
            for axis in (0..3).filter(|&a| Some(a) != sep).chain(sep) {
                want = along(&want, cur, axis, new_shape[axis], if Some(axis) == sep { 0 } else { 1 });
                cur[axis] = new_shape[axis];
            }
            assert_eq!(resample_linear(&v, shape, new_shape, sep), want, "{new_shape:?}, separate {sep:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any split of the output rows into runs, each computed from just the input rows it
        /// reads, gives `resample_linear`'s bits: up, down and same along each axis, with and
        /// without a separate axis.
        #[test]
        fn rows_pieced_together_are_the_whole_resampling(
            shape in proptest::array::uniform3(1usize..9),
            new_shape in proptest::array::uniform3(1usize..13),
            separate in proptest::option::of(0usize..3),
            cuts in proptest::collection::vec(0usize..13, 0..5),
            seed in 0u64..1000,
        ) {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| (((i as u64 + 1) * (seed * 2 + 7919)) % 2003) as f32 / 97.0 - 10.0).collect();
            let want = resample_linear(&v, shape, new_shape, separate);
            let rows = LinearRows::new(shape, new_shape, separate);
            let plane = shape[1] * shape[2];
            let mut bounds: Vec<usize> = cuts.into_iter().filter(|&c| c < new_shape[0]).chain([0, new_shape[0]]).collect();
            bounds.sort_unstable();
            bounds.dedup();
            let mut got = Vec::new();
            for w in bounds.windows(2) {
                let (lo, hi) = (rows.reads(w[0]).0, rows.reads(w[1] - 1).1);
                got.extend(rows.rows(&v[lo * plane..(hi + 1) * plane], lo, w[0]..w[1]));
            }
            proptest::prop_assert!(got == want, "{:?} → {:?}, separate {:?}", shape, new_shape, separate);
        }
    }

    #[test]
    fn cubic_resize_1d_vector() {
        // nnunet-pipeline.md §11: [0,0,0,10,10,10] → 12 samples (order 3, edge, clip).
        let v = [0f32, 0., 0., 10., 10., 10.];
        let out = resample_data(&v, [1, 1, 6], [1, 1, 12], None);
        let want = [0.0, 0.1436, 0.2602, 0.0, 0.0, 2.1569, 7.8431, 10.0, 10.0, 9.7398, 9.8564, 10.0];
        for (a, b) in out.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-4, "{out:?}");
        }
    }

    #[test]
    fn separate_z_data_and_decision_vectors() {
        assert_eq!(separate_axis([3.0, 0.78, 0.78], [3.0, 0.78, 0.78]), Some(0));
        assert_eq!(separate_axis([2.0, 0.78, 0.78], [2.0, 0.78, 0.78]), None);
        // (1,3,4,4) → (1,6,4,4), spacing (4,1,1) → (2,1,1): z profile at [:,0,0] of an arange.
        let v: Vec<f32> = (0..48).map(|i| i as f32).collect();
        let sep = separate_axis([4.0, 1.0, 1.0], [2.0, 1.0, 1.0]);
        assert_eq!(sep, Some(0));
        let out = resample_data(&v, [3, 4, 4], [6, 4, 4], sep);
        let z: Vec<f32> = (0..6).map(|k| out[k * 16]).collect();
        assert_eq!(z, [0.0, 0.0, 16.0, 16.0, 32.0, 32.0]);
    }

    #[test]
    fn seg_resampling_vectors() {
        // 4³ with a central 2³ block of label 1 and one voxel of label 2 at (3,3,3), ×2 →
        // {0: 449, 1: 56, 2: 7}: trilinear corners 0.75³ < 0.5 drop out.
        let mut seg = vec![0i16; 64];
        for z in 1..3 {
            for y in 1..3 {
                for x in 1..3 {
                    seg[(z * 4 + y) * 4 + x] = 1;
                }
            }
        }
        seg[63] = 2;
        let out = resample_seg(&seg, [4, 4, 4], [8, 8, 8], None);
        let count = |l: i16| out.iter().filter(|&&v| v == l).count();
        assert_eq!((count(0), count(1), count(2)), (449, 56, 7));
        // Nearest along z: 8 → 4 picks 1,3,5,7; 9 → 5 picks 0,2,4,6,8.
        let s: Vec<i16> = (0..8).collect();
        assert_eq!(resample_seg(&s, [8, 1, 1], [4, 1, 1], Some(0)), [1, 3, 5, 7]);
        let s: Vec<i16> = (0..9).collect();
        assert_eq!(resample_seg(&s, [9, 1, 1], [5, 1, 1], Some(0)), [0, 2, 4, 6, 8]);
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    /// Reference: every label over the whole volume, no windows.
    pub(super) fn resample_seg_full(seg: &[i16], shape: [usize; 3], new_shape: [usize; 3], separate: Option<usize>) -> Vec<i16> {
        let mut labels: Vec<i16> = seg.to_vec();
        labels.sort_unstable();
        labels.dedup();
        let mut out = vec![0i16; new_shape.iter().product()];
        for &l in &labels {
            let mut cur: Vec<f64> = seg.iter().map(|&s| f64::from(s == l)).collect();
            let mut cs = shape;
            for a in 0..3 {
                cur = along(&cur, cs, a, new_shape[a], if Some(a) == separate { 0 } else { 1 });
                cs[a] = new_shape[a];
            }
            for (o, v) in out.iter_mut().zip(&cur) {
                if *v >= 0.5 {
                    *o = l;
                }
            }
        }
        out
    }

    #[test]
    fn windows_change_nothing() {
        let shape = [5, 16, 14];
        let mut seg = vec![0i16; 5 * 16 * 14];
        for (i, s) in seg.iter_mut().enumerate() {
            let (z, y, x) = (i / 224, i / 14 % 16, i % 14);
            if (1..4).contains(&z) && (2..14).contains(&y) && (3..11).contains(&x) { *s = 1; }
            if z >= 2 && y < 8 { *s = 2; }
            if y == 15 && x == 13 { *s = 3; }
            if z == 0 && y == 0 && x < 2 { *s = -1; }
        }
        for (ns, sep) in [([11, 12, 10], Some(0)), ([11, 12, 10], None), ([3, 30, 7], None)] {
            let a = resample_seg(&seg, shape, ns, sep);
            let b = resample_seg_full(&seg, shape, ns, sep);
            let diff = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            assert_eq!(diff, 0, "{ns:?} {sep:?}");
        }
    }
}
