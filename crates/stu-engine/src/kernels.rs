//! Channels-last 3-D convolution kernels on the CPU: forward, input gradient, weight gradient.
//!
//! Tensors are `[B, D, H, W, C]` row-major (one voxel's channels contiguous), weights arrive in
//! PyTorch's `[Cout, Cin, k, k, k]` and are rearranged to `[k, k, k, Cin, Cout]` ("Wg") so every
//! conv is a row-major GEMM with M = voxels, N = Cout: the shape the `gemm` crate runs fastest
//! (~130 GFLOP/s per core here, against ~60 for the NCDHW orientation M = Cout).
//!
//! - **Stride 1, 3³, pad 1** (most of STU-Net): implicit GEMM on the padded grid. With the input
//!   zero-padded to `[Dp, Hp, Wp]`, output voxel `(z, y, x)` sits at padded flat index
//!   `q = z·Hp·Wp + y·Wp + x` and reads input rows `q + dz·Hp·Wp + dy·Wp + dx`. For fixed
//!   `(dz, dy)` the three `dx` taps are three consecutive rows, so one GEMM with K = 3·Cin over a
//!   view whose rows overlap (row stride Cin) covers them: 9 GEMMs per row tile, no im2col copy.
//!   Rows that fall on padding are computed and dropped (≈6 % at 64³).
//! - **Other strides and 1×1**: im2col row tiles (a gather), then one GEMM with K = k³·Cin.
//! - **Input gradient**: stride 1 is a forward conv of the output gradient with the flipped,
//!   transposed kernel; other strides use col2im, planes in phases so no two tasks write the same
//!   voxel.
//! - **Weight gradient**: the same views transposed (K = voxels), accumulated per task, summed.
//!
//! All loops run on rayon's pool; each GEMM call is single-threaded.

// `let p = p;` inside a parallel closure is not redundant: it makes the closure capture the
// whole `Send` pointer wrapper, where edition 2021+ would capture its raw-pointer field alone.
#![allow(clippy::redundant_locals)]
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Shape of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geom {
    /// Batch.
    pub b: usize,
    /// Input spatial extent.
    pub inp: [usize; 3],
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel size per axis (odd: 1 or 3; cubic, or nnU-Net's `[1, 3, 3]` of anisotropic and
    /// 2-D plans); padding is `k / 2` per axis.
    pub k: [usize; 3],
    /// Stride per axis.
    pub stride: [usize; 3],
}

impl Geom {
    /// Zero padding on both sides of each axis.
    pub fn pad(&self) -> [usize; 3] {
        self.k.map(|k| k / 2)
    }
    /// Output spatial extent.
    pub fn out(&self) -> [usize; 3] {
        let p = self.pad();
        [0, 1, 2].map(|a| (self.inp[a] + 2 * p[a] - self.k[a]) / self.stride[a] + 1)
    }
    fn taps(&self) -> usize {
        self.k.iter().product()
    }
    fn is_1x1(&self) -> bool {
        self.k == [1; 3] && self.stride == [1, 1, 1]
    }
    /// Stride 1 and a kernel wider than one voxel: the shifted-GEMM path ([`conv_s1`]).
    fn is_stride1_wide(&self) -> bool {
        self.k != [1; 3] && self.stride == [1, 1, 1]
    }
}

/// Row-major single-threaded GEMM: `C (m×n, row stride ldc) = [C +] A·B`, with arbitrary
/// element strides on A and B.
///
/// # Safety
/// Every index the strides reach must lie inside the pointed-to buffers, and `c` must not alias
/// `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
) {
    // SAFETY: forwarded from the caller's contract; C is row-major with row stride ldc.
    unsafe { gemm_strided(m, n, k, c, ldc, 1, accumulate, a, a_rs, a_cs, b, b_rs, b_cs) }
}

/// GEMM with arbitrary strides on every operand (`C[i, j]` at `c + i·c_rs + j·c_cs`).
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: usize,
    c_cs: usize,
    accumulate: bool,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: forwarded from the caller's contract. gemm computes dst = α·dst + β·lhs·rhs.
    unsafe {
        gemm::gemm(m, n, k, c, c_cs as isize, c_rs as isize, accumulate, a, a_cs as isize, a_rs as isize, b, b_cs as isize, b_rs as isize, 1.0, 1.0, false, false, false, gemm::Parallelism::None);
    }
}

/// `n` floats for a kernel that writes every one before anything reads it: no zero-fill, which
/// for `vec![0.0; n]` is a whole extra pass over buffers of up to hundreds of MB (allocator
/// memory reused from an earlier layer is not known to be zero, so `calloc` must clear it).
fn uninit(n: usize) -> Box<[MaybeUninit<f32>]> {
    Box::new_uninit_slice(n)
}

/// [`uninit`]'s buffer once written.
///
/// # Safety
/// Every element has been written.
unsafe fn assume_init(v: Box<[MaybeUninit<f32>]>) -> Vec<f32> {
    // SAFETY: the caller's contract.
    unsafe { v.assume_init() }.into_vec()
}

/// A 1×1 conv from channels-last `x` (`[B, N, Cin]`) to channels-first `y` (`[B, Cout, N]`):
/// STU-Net's segmentation heads, whose outputs (many classes at full resolution) are wanted in
/// NCDHW. Writing through strides avoids a separate transpose of the largest tensor.
pub fn head_forward(x: &[f32], w: &[f32], bias: &[f32], b: usize, n: usize, cin: usize, cout: usize) -> Vec<f32> {
    let mut y = uninit(b * cout * n);
    let t = 2048;
    let tiles: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..n).step_by(t).map(move |r| (bi, r))).collect();
    let yp = SharedMut(y.as_mut_ptr().cast::<f32>());
    tiles.par_iter().for_each(|&(bi, r0)| {
        let yp = yp;
        let m = t.min(n - r0);
        // SAFETY: rows r0…r0+m of every class plane of batch bi belong to this task; W is read as
        // [Cin × Cout] with strides (1, Cin).
        unsafe {
            gemm_strided(m, cout, cin, yp.0.add(bi * cout * n + r0), 1, n, false, x.as_ptr().add((bi * n + r0) * cin), cin, 1, w.as_ptr(), 1, cin);
        }
    });
    // SAFETY: the tiles cover rows 0…n of every batch, and each GEMM (not accumulating) wrote
    // all `cout` class planes of its rows.
    let mut y = unsafe { assume_init(y) };
    y.par_chunks_mut(n).enumerate().for_each(|(i, plane)| {
        let bv = bias[i % cout];
        plane.iter_mut().for_each(|v| *v += bv);
    });
    y
}

/// Input gradient of [`head_forward`]: `dy` `[B, Cout, N]` → `[B, N, Cin]`.
pub fn head_backward_data(dy: &[f32], w: &[f32], b: usize, n: usize, cin: usize, cout: usize) -> Vec<f32> {
    let mut dx = vec![0f32; b * n * cin];
    let t = 2048;
    let tiles: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..n).step_by(t).map(move |r| (bi, r))).collect();
    let dxp = SharedMut(dx.as_mut_ptr());
    tiles.par_iter().for_each(|&(bi, r0)| {
        let dxp = dxp;
        let m = t.min(n - r0);
        // SAFETY: dx rows r0…r0+m of batch bi are this task's; dy read as [N × Cout] (strides 1, N).
        unsafe {
            gemm_strided(m, cin, cout, dxp.0.add((bi * n + r0) * cin), cin, 1, false, dy.as_ptr().add(bi * cout * n + r0), 1, n, w.as_ptr(), cin, 1);
        }
    });
    dx
}

/// Groups a parallel sum is cut into: a constant, not the thread count, so that the order in
/// which partial sums are added — and so every gradient, to the last bit — depends on the shapes
/// alone, not on rayon's work stealing or on the machine's cores. (With rayon's `fold` the
/// grouping followed the stealing, and two runs of one training differed from the third step.)
pub(crate) const SUM_GROUPS: usize = 32;

/// `items` folded in at most [`SUM_GROUPS`] contiguous groups, one task per group, each group in
/// item order; the groups' results in order.
pub(crate) fn fold_groups<T: Sync, A: Send>(items: &[T], init: impl Fn() -> A + Sync, f: impl Fn(A, &T) -> A + Sync) -> Vec<A> {
    let per = items.len().div_ceil(SUM_GROUPS).max(1);
    items.par_chunks(per).map(|group| group.iter().fold(init(), &f)).collect()
}

/// Element-wise sum of equal-length vectors, in order (`len` zeros for none).
pub(crate) fn sum_in_order<V: Copy + std::ops::AddAssign + Default>(parts: Vec<Vec<V>>, len: usize) -> Vec<V> {
    parts.into_iter().reduce(|mut a, b| {
        a.iter_mut().zip(&b).for_each(|(x, y)| *x += *y);
        a
    }).unwrap_or_else(|| vec![V::default(); len])
}

/// Weight gradient of [`head_forward`], `[Cout, Cin]` (= PyTorch's `[Cout, Cin, 1, 1, 1]`).
pub fn head_backward_weight(x: &[f32], dy: &[f32], b: usize, n: usize, cin: usize, cout: usize) -> Vec<f32> {
    let t = 16_384;
    let chunks: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..n).step_by(t).map(move |r| (bi, r))).collect();
    let parts = fold_groups(&chunks, || vec![0f32; cout * cin], |mut acc, &(bi, r0)| {
        let k = t.min(n - r0);
        // SAFETY: dy rows (classes) are contiguous along N; x is [N × Cin]; acc is local.
        unsafe { gemm(cout, cin, k, acc.as_mut_ptr(), cin, true, dy.as_ptr().add(bi * cout * n + r0), n, 1, x.as_ptr().add((bi * n + r0) * cin), cin, 1) };
        acc
    });
    sum_in_order(parts, cout * cin)
}

/// Bias gradient of [`head_forward`]: per class, the sum over batch and voxels.
pub fn head_backward_bias(dy: &[f32], b: usize, n: usize, cout: usize) -> Vec<f32> {
    let sums: Vec<f64> = dy.par_chunks(n).map(|plane| plane.iter().map(|&v| v as f64).sum()).collect();
    (0..cout).map(|c| (0..b).map(|bi| sums[bi * cout + c]).sum::<f64>() as f32).collect()
}

/// A read-only raw pointer that rayon tasks may share (into a buffer only partly initialised,
/// read where it was written).
#[derive(Clone, Copy)]
struct SharedConst(*const f32);
// SAFETY: only read, from buffers that outlive the tasks and are not written meanwhile.
unsafe impl Send for SharedConst {}
unsafe impl Sync for SharedConst {}

/// A raw pointer that rayon tasks may share; each task writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(*mut f32);
// SAFETY: used only where the tasks' write sets are disjoint (documented at each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Shares `v` with tasks that write disjoint elements.
    pub(crate) fn new(v: &mut [f32]) -> Self {
        Self(v.as_mut_ptr())
    }

    /// Writes element `i`.
    ///
    /// # Safety
    /// `i` is in bounds of the slice given to [`SharedMut::new`], which outlives every task, and
    /// no other task reads or writes element `i`.
    pub(crate) unsafe fn write(&self, i: usize, v: f32) {
        // SAFETY: the caller's contract.
        unsafe { *self.0.add(i) = v };
    }
}

/// Output channels per block of the weight transposes below: one 64-byte cache line of f32,
/// so every write (or read) across the channel axis touches whole lines, not one float per line.
const TRANSPOSE_BLOCK: usize = 16;

/// `[Cout, Cin, k0, k1, k2]` → `[k0, k1, k2, Cin, Cout]` (`t` = k0·k1·k2 taps).
/// Parallel over `Cin`; per block of 16 output channels each task reads 16 whole `[t]` runs
/// and writes `t` runs of 16 contiguous values.
fn rearrange_weight(w: &[f32], cout: usize, cin: usize, t: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    let outp = SharedMut(out.as_mut_ptr());
    (0..cin).into_par_iter().for_each(|ci| {
        let outp = outp;
        for c0 in (0..cout).step_by(TRANSPOSE_BLOCK) {
            let c1 = (c0 + TRANSPOSE_BLOCK).min(cout);
            for tap in 0..t {
                for co in c0..c1 {
                    // SAFETY: index (tap·cin + ci)·cout + co < w.len() is written by the task of
                    // `ci` only.
                    unsafe { *outp.0.add((tap * cin + ci) * cout + co) = w[(co * cin + ci) * t + tap] };
                }
            }
        }
    });
    out
}

/// `[Cout, Cin, k0, k1, k2]` → `[k0, k1, k2, Cin, Cout]`, `taps` = k0·k1·k2.
pub fn weight_to_wg(w: &[f32], cout: usize, cin: usize, taps: usize) -> Vec<f32> {
    rearrange_weight(w, cout, cin, taps)
}

/// `[k0, k1, k2, Cin, Cout]` → `[Cout, Cin, k0, k1, k2]`, `taps` = k0·k1·k2.
pub fn wg_to_weight(wg: &[f32], cout: usize, cin: usize, taps: usize) -> Vec<f32> {
    let t = taps;
    let mut out = vec![0.0f32; wg.len()];
    // Blocks of 16 output channels: each `wg` read covers 16 contiguous values.
    out.par_chunks_mut(TRANSPOSE_BLOCK * cin * t).enumerate().for_each(|(blk, dst)| {
        let c0 = blk * TRANSPOSE_BLOCK;
        let n = dst.len() / (cin * t);
        for ci in 0..cin {
            for tap in 0..t {
                let src = &wg[(tap * cin + ci) * cout + c0..][..n];
                for (j, v) in src.iter().enumerate() {
                    dst[j * cin * t + ci * t + tap] = *v;
                }
            }
        }
    });
    out
}

/// Zero-pads `[B, D, H, W, C]` by `p[a]` on both sides of each spatial axis `a`.
fn pad_input(x: &[f32], b: usize, s: [usize; 3], c: usize, p: [usize; 3]) -> (Vec<f32>, [usize; 3]) {
    if p == [0; 3] {
        return (x.to_vec(), s);
    }
    let sp = [0, 1, 2].map(|a| s[a] + 2 * p[a]);
    let mut out = uninit(b * sp[0] * sp[1] * sp[2] * c);
    let row = s[2] * c;
    // Every element written once: border planes, rows and row ends zeroed, the interior copied.
    out.par_chunks_mut(sp[1] * sp[2] * c)
        .enumerate()
        .for_each(|(plane, dst)| {
            let (bi, zp) = (plane / sp[0], plane % sp[0]);
            if zp < p[0] || zp >= s[0] + p[0] {
                dst.fill(MaybeUninit::new(0.0));
                return;
            }
            let z = zp - p[0];
            let prow = sp[2] * c;
            dst[..p[1] * prow].fill(MaybeUninit::new(0.0));
            dst[(s[1] + p[1]) * prow..].fill(MaybeUninit::new(0.0));
            let px = p[2] * c;
            for y in 0..s[1] {
                let src = ((bi * s[0] + z) * s[1] + y) * row;
                let d = (y + p[1]) * prow;
                dst[d..d + px].fill(MaybeUninit::new(0.0));
                dst[d + px..d + px + row].write_copy_of_slice(&x[src..src + row]);
                dst[d + px + row..d + prow].fill(MaybeUninit::new(0.0));
            }
        });
    // SAFETY: every plane was either zero-filled or had its border rows, row ends and interior
    // written above.
    (unsafe { assume_init(out) }, sp)
}

/// Rows per GEMM tile for a given row width: keeps a tile of C near 256 KiB.
fn tile_rows(width: usize) -> usize {
    (65_536 / width.max(1)).clamp(64, 4096)
}

/// Stride-1 conv on the padded grid, no bias: per `(dz, dy)` tap row one GEMM over the `k2·Cin`
/// values that are contiguous in the channels-last padded input (3³, or nnU-Net's `[1, 3, 3]`:
/// 9 GEMMs, not 27). `xp` is padded `[B, Dp, Hp, Wp, Cin]`; `wg` is `[k0,k1,k2,Cin,Cout]`.
/// Returns `[B, D, H, W, Cout]`.
#[allow(clippy::too_many_arguments)]
fn conv_s1(xp: &[f32], sp: [usize; 3], b: usize, out: [usize; 3], k: [usize; 3], cin: usize, cout: usize, wg: &[f32]) -> Vec<f32> {
    let (sy, sz) = (sp[2], sp[1] * sp[2]);
    let plane = sp[0] * sz;
    // Last valid output voxel's padded index + 1.
    let rows = (out[0] - 1) * sz + (out[1] - 1) * sy + out[2];
    let t = tile_rows(cout);
    // Rows 0…rows of each batch's padded plane are written by the first (not accumulating) GEMM
    // of their tile; the rows after them are never read.
    let mut yp = uninit(b * plane * cout);
    let ypp = SharedMut(yp.as_mut_ptr().cast::<f32>());
    let tiles: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..rows).step_by(t).map(move |q| (bi, q))).collect();
    tiles.par_iter().for_each(|&(bi, q0)| {
        let m = t.min(rows - q0);
        let ypp = ypp;
        for dz in 0..k[0] {
            for dy in 0..k[1] {
                let g = dz * k[1] + dy;
                let a_off = (bi * plane + q0 + dz * sz + dy * sy) * cin;
                // SAFETY: rows q0..q0+m of batch bi are this task's alone in yp; the A view's last
                // element is (bi·plane + q0 + m − 1 + (k0−1)sz + (k1−1)sy + k2 − 1)·cin + cin − 1,
                // inside xp because q0 + m ≤ rows; B is the g-th [k2·Cin, Cout] block of wg.
                unsafe {
                    gemm(
                        m,
                        cout,
                        k[2] * cin,
                        ypp.0.add((bi * plane + q0) * cout),
                        cout,
                        g > 0,
                        xp.as_ptr().add(a_off),
                        cin,
                        1,
                        wg.as_ptr().add(g * k[2] * cin * cout),
                        cout,
                        1,
                    );
                }
            }
        }
    });
    // Keep the valid rows.
    let mut y = uninit(b * out[0] * out[1] * out[2] * cout);
    let row = out[2] * cout;
    let ypr = SharedConst(yp.as_ptr().cast::<f32>());
    y.par_chunks_mut(out[1] * row).enumerate().for_each(|(pl, dst)| {
        let ypr = ypr;
        let (bi, z) = (pl / out[0], pl % out[0]);
        for yy in 0..out[1] {
            let src = (bi * plane + z * sz + yy * sy) * cout;
            // SAFETY: padded row index z·sz + yy·sy + out[2] ≤ rows, so these `row` values of
            // `yp` were written by the GEMMs above; `yp` outlives the loop.
            let valid = unsafe { std::slice::from_raw_parts(ypr.0.add(src), row) };
            dst[yy * row..(yy + 1) * row].write_copy_of_slice(valid);
        }
    });
    drop(yp);
    // SAFETY: every plane's `out[1]` rows were copied above.
    unsafe { assume_init(y) }
}

/// Gathers im2col rows `[r0, r0 + m)` (output flat index within batch `bi`) into `a`
/// (`m × k³·Cin`). `xp` is padded input with extent `sp`.
#[allow(clippy::too_many_arguments)]
fn im2col(a: &mut [f32], xp: &[f32], sp: [usize; 3], g: &Geom, out: [usize; 3], bi: usize, r0: usize, m: usize) {
    let (k, cin) = (g.k, g.cin);
    let width = g.taps() * cin;
    for r in 0..m {
        let o = r0 + r;
        let (z, rem) = (o / (out[1] * out[2]), o % (out[1] * out[2]));
        let (y, x) = (rem / out[2], rem % out[2]);
        let base = ((bi * sp[0] + z * g.stride[0]) * sp[1] + y * g.stride[1]) * sp[2] + x * g.stride[2];
        let dst = &mut a[r * width..(r + 1) * width];
        for dz in 0..k[0] {
            for dy in 0..k[1] {
                let src = (base + dz * sp[1] * sp[2] + dy * sp[2]) * cin;
                let d = (dz * k[1] + dy) * k[2] * cin;
                dst[d..d + k[2] * cin].copy_from_slice(&xp[src..src + k[2] * cin]);
            }
        }
    }
}

/// Forward convolution, channels-last. `x`: `[B, D, H, W, Cin]`, `w`: `[Cout, Cin, k0, k1, k2]`.
pub fn conv_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &Geom) -> Vec<f32> {
    let wg = weight_to_wg(w, g.cout, g.cin, g.taps());
    let mut y = conv_forward_wg(x, &wg, g);
    if let Some(bias) = bias {
        y.par_chunks_mut(g.cout * 256).for_each(|c| {
            for row in c.chunks_exact_mut(g.cout) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        });
    }
    y
}

fn conv_forward_wg(x: &[f32], wg: &[f32], g: &Geom) -> Vec<f32> {
    let out = g.out();
    let (xp, sp) = pad_input(x, g.b, g.inp, g.cin, g.pad());
    if g.is_stride1_wide() {
        return conv_s1(&xp, sp, g.b, out, g.k, g.cin, g.cout, wg);
    }
    let n_out = out[0] * out[1] * out[2];
    let mut y = vec![0.0f32; g.b * n_out * g.cout];
    if g.is_1x1() {
        let t = tile_rows(g.cout.max(g.cin));
        y.par_chunks_mut(t * g.cout).enumerate().for_each(|(i, c)| {
            let m = c.len() / g.cout;
            // SAFETY: c is this task's chunk; A rows i·t … i·t+m of x exist.
            unsafe { gemm(m, g.cout, g.cin, c.as_mut_ptr(), g.cout, false, x.as_ptr().add(i * t * g.cin), g.cin, 1, wg.as_ptr(), g.cout, 1) };
        });
        return y;
    }
    let width = g.taps() * g.cin;
    let t = tile_rows(width).min(1024);
    let tiles: Vec<(usize, usize)> = (0..g.b).flat_map(|bi| (0..n_out).step_by(t).map(move |r| (bi, r))).collect();
    let yp = SharedMut(y.as_mut_ptr());
    tiles.par_iter().for_each_init(Vec::new, |a, &(bi, r0)| {
        let yp = yp;
        let m = t.min(n_out - r0);
        a.resize(m * width, 0.0);
        im2col(a, &xp, sp, g, out, bi, r0, m);
        // SAFETY: output rows (bi, r0 … r0+m) belong to this task only.
        unsafe { gemm(m, g.cout, width, yp.0.add((bi * n_out + r0) * g.cout), g.cout, false, a.as_ptr(), width, 1, wg.as_ptr(), g.cout, 1) };
    });
    y
}

/// `W'[t'][co][ci] = W[co][ci][T − 1 − t']` laid out `[k0,k1,k2, Cout, Cin]` (`T` taps; reversing
/// the flat tap index mirrors every axis).
fn flip_transpose(w: &[f32], cout: usize, cin: usize, t: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    let outp = SharedMut(out.as_mut_ptr());
    // Per output channel, blocks of 16 input channels: 16 whole `[27]` runs read, 27 runs of 16
    // contiguous values written.
    (0..cout).into_par_iter().for_each(|co| {
        let outp = outp;
        for c0 in (0..cin).step_by(TRANSPOSE_BLOCK) {
            let c1 = (c0 + TRANSPOSE_BLOCK).min(cin);
            for tap in 0..t {
                for ci in c0..c1 {
                    // SAFETY: index ((T − 1 − tap)·cout + co)·cin + ci < w.len() is written by
                    // the task of `co` only.
                    unsafe { *outp.0.add(((t - 1 - tap) * cout + co) * cin + ci) = w[(co * cin + ci) * t + tap] };
                }
            }
        }
    });
    out
}

/// Input gradient. `dy`: `[B, Do, Ho, Wo, Cout]` → `[B, D, H, W, Cin]`.
pub fn conv_backward_data(dy: &[f32], w: &[f32], g: &Geom) -> Vec<f32> {
    let out = g.out();
    if g.is_stride1_wide() {
        // dX = conv(dY, W'), W'[t'] = W[T − 1 − t']ᵀ: flipped taps, Cin ↔ Cout (odd kernels:
        // the same padding). [k0,k1,k2, Cout, Cin] with reversed taps: the PyTorch weight read
        // as [Cin', Cout'] = [Cout, Cin].
        let wf = flip_transpose(w, g.cout, g.cin, g.taps());
        let gt = Geom { inp: out, cin: g.cout, cout: g.cin, ..*g };
        return conv_forward_wg(dy, &wf, &gt);
    }
    let wg = weight_to_wg(w, g.cout, g.cin, g.taps());
    let n_in = g.inp[0] * g.inp[1] * g.inp[2];
    if g.is_1x1() {
        let mut dx = vec![0.0f32; g.b * n_in * g.cin];
        let t = tile_rows(g.cout.max(g.cin));
        dx.par_chunks_mut(t * g.cin).enumerate().for_each(|(i, c)| {
            let m = c.len() / g.cin;
            // SAFETY: c is this task's; B = Wgᵀ read with strides (1, Cout).
            unsafe { gemm(m, g.cin, g.cout, c.as_mut_ptr(), g.cin, false, dy.as_ptr().add(i * t * g.cout), g.cout, 1, wg.as_ptr(), 1, g.cout) };
        });
        return dx;
    }
    // col2im into the padded input grid, one output plane at a time.
    let p = g.pad();
    let sp = [0, 1, 2].map(|a| g.inp[a] + 2 * p[a]);
    let mut dxp = vec![0.0f32; g.b * sp[0] * sp[1] * sp[2] * g.cin];
    let (k, cin) = (g.k, g.cin);
    let width = g.taps() * cin;
    let plane_rows = out[1] * out[2];
    let phases = k[0].div_ceil(g.stride[0]);
    let dxpp = SharedMut(dxp.as_mut_ptr());
    for phase in 0..phases {
        let planes: Vec<(usize, usize)> = (0..g.b)
            .flat_map(|bi| (phase..out[0]).step_by(phases).map(move |z| (bi, z)))
            .collect();
        planes.par_iter().for_each_init(Vec::new, |cols: &mut Vec<f32>, &(bi, z)| {
            let dxpp = dxpp;
            cols.resize(plane_rows * width, 0.0);
            // SAFETY: cols is task-local; dy rows of plane (bi, z) exist; B = Wgᵀ.
            unsafe {
                gemm(plane_rows, width, g.cout, cols.as_mut_ptr(), width, false,
                    dy.as_ptr().add((bi * out[0] + z) * plane_rows * g.cout), g.cout, 1, wg.as_ptr(), 1, g.cout)
            };
            for r in 0..plane_rows {
                let (y, x) = (r / out[2], r % out[2]);
                let base = ((bi * sp[0] + z * g.stride[0]) * sp[1] + y * g.stride[1]) * sp[2] + x * g.stride[2];
                for dz in 0..k[0] {
                    for dy_ in 0..k[1] {
                        for dx in 0..k[2] {
                            let dst = (base + (dz * sp[1] + dy_) * sp[2] + dx) * cin;
                            let src = r * width + ((dz * k[1] + dy_) * k[2] + dx) * cin;
                            // SAFETY: planes of one phase write padded planes
                            // [z·s, z·s + k0) that do not overlap (phases·s ≥ k0).
                            let dst = unsafe { std::slice::from_raw_parts_mut(dxpp.0.add(dst), cin) };
                            for (d, s) in dst.iter_mut().zip(&cols[src..src + cin]) {
                                *d += s;
                            }
                        }
                    }
                }
            }
        });
    }
    if p == [0; 3] {
        return dxp;
    }
    let mut dx = vec![0.0f32; g.b * n_in * cin];
    let row = g.inp[2] * cin;
    dx.par_chunks_mut(g.inp[1] * row).enumerate().for_each(|(pl, dst)| {
        let (bi, z) = (pl / g.inp[0], pl % g.inp[0]);
        for y in 0..g.inp[1] {
            let src = (((bi * sp[0] + z + p[0]) * sp[1] + y + p[1]) * sp[2] + p[2]) * cin;
            dst[y * row..(y + 1) * row].copy_from_slice(&dxp[src..src + row]);
        }
    });
    dx
}

/// Weight gradient in PyTorch layout `[Cout, Cin, k0, k1, k2]`.
pub fn conv_backward_weight(x: &[f32], dy: &[f32], g: &Geom) -> Vec<f32> {
    let out = g.out();
    let (cin, cout) = (g.cin, g.cout);
    let width = g.taps() * cin;
    let sum = |parts: Vec<Vec<f32>>| sum_in_order(parts, width * cout);
    let dwg = if g.is_stride1_wide() {
        let k = g.k;
        let (xp, sp) = pad_input(x, g.b, g.inp, cin, g.pad());
        let (sy, sz) = (sp[2], sp[1] * sp[2]);
        let plane = sp[0] * sz;
        let rows = (out[0] - 1) * sz + (out[1] - 1) * sy + out[2];
        // dY on the padded grid, zero on rows that are padding.
        let mut dyp = vec![0.0f32; g.b * rows * cout];
        let row = out[2] * cout;
        dyp.par_chunks_mut(rows * cout).enumerate().for_each(|(bi, dst)| {
            for z in 0..out[0] {
                for y in 0..out[1] {
                    let d = (z * sz + y * sy) * cout;
                    let s = ((bi * out[0] + z) * out[1] + y) * row;
                    dst[d..d + row].copy_from_slice(&dy[s..s + row]);
                }
            }
        });
        let t = 16_384usize;
        let chunks: Vec<(usize, usize)> = (0..g.b).flat_map(|bi| (0..rows).step_by(t).map(move |q| (bi, q))).collect();
        let parts: Vec<Vec<f32>> = fold_groups(&chunks, || vec![0.0f32; width * cout], |mut acc, &(bi, q0)| {
            let m = t.min(rows - q0);
            for dz in 0..k[0] {
                for dyy in 0..k[1] {
                    let gi = dz * k[1] + dyy;
                    let a_off = (bi * plane + q0 + dz * sz + dyy * sy) * cin;
                    // SAFETY: Aᵀ view of xp rows (strides 1, Cin) as in the forward; acc is
                    // this fold's own buffer; dyp rows q0 … q0+m of batch bi exist.
                    unsafe {
                        gemm(k[2] * cin, cout, m, acc.as_mut_ptr().add(gi * k[2] * cin * cout), cout, true,
                            xp.as_ptr().add(a_off), 1, cin, dyp.as_ptr().add((bi * rows + q0) * cout), cout, 1)
                    };
                }
            }
            acc
        });
        sum(parts)
    } else if g.is_1x1() {
        let n = g.b * g.inp[0] * g.inp[1] * g.inp[2];
        let t = 16_384usize;
        let starts: Vec<usize> = (0..n).step_by(t).collect();
        let parts: Vec<Vec<f32>> = fold_groups(&starts, || vec![0.0f32; width * cout], |mut acc, &r0| {
            let m = t.min(n - r0);
            // SAFETY: Xᵀ (strides 1, Cin) and dY rows r0 … r0+m exist; acc is local.
            unsafe { gemm(cin, cout, m, acc.as_mut_ptr(), cout, true, x.as_ptr().add(r0 * cin), 1, cin, dy.as_ptr().add(r0 * cout), cout, 1) };
            acc
        });
        sum(parts)
    } else {
        let (xp, sp) = pad_input(x, g.b, g.inp, cin, g.pad());
        let n_out = out[0] * out[1] * out[2];
        let t = tile_rows(width).min(1024);
        let tiles: Vec<(usize, usize)> = (0..g.b).flat_map(|bi| (0..n_out).step_by(t).map(move |r| (bi, r))).collect();
        let parts: Vec<Vec<f32>> = fold_groups(&tiles, || (vec![0.0f32; width * cout], Vec::new()), |(mut acc, mut a): (Vec<f32>, Vec<f32>), &(bi, r0)| {
            let m = t.min(n_out - r0);
            a.resize(m * width, 0.0);
            im2col(&mut a, &xp, sp, g, out, bi, r0, m);
            // SAFETY: Aᵀ of the local im2col tile; dY rows exist; acc is local.
            unsafe { gemm(width, cout, m, acc.as_mut_ptr(), cout, true, a.as_ptr(), 1, width, dy.as_ptr().add((bi * n_out + r0) * cout), cout, 1) };
            (acc, a)
        })
        .into_iter()
        .map(|(acc, _)| acc)
        .collect();
        sum(parts)
    };
    wg_to_weight(&dwg, cout, cin, g.taps())
}

/// Bias gradient: sum of `dy` over every voxel, `[Cout]`.
pub fn conv_backward_bias(dy: &[f32], cout: usize) -> Vec<f32> {
    // One partial per 4096 voxels, summed in order (the same bits on any number of threads).
    let parts: Vec<Vec<f32>> = dy
        .par_chunks(cout * 4096)
        .map(|c| {
            let mut acc = vec![0.0f32; cout];
            for row in c.chunks_exact(cout) {
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            acc
        })
        .collect();
    sum_in_order(parts, cout)
}

pub mod loss;
pub mod norm;

#[cfg(test)]
mod tests;
