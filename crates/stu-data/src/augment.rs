//! nnU-Net's training augmentation (`shared/docs/nnunet-pipeline.md` §5.3, batchgenerators as
//! nnU-Net v2.2 configures it), per sample, in the spec's order: spatial (rotation p 0.2, scale
//! p 0.2, cubic B-spline data / per-label linear seg), Gaussian noise, Gaussian blur,
//! multiplicative brightness, contrast, simulated low resolution, inverted gamma, gamma,
//! mirroring. Probabilities and ranges are the spec's; draws come from one [`SplitMix64`]
//! stream, so a sample is a pure function of its seed.
//!
//! Interpolation follows `scipy.ndimage.map_coordinates` with `mode='constant'`: order 3 with
//! the spline prefilter (mirror boundary for the coefficients), points outside `[0, n−1]` on any
//! axis take the constant (0 for data). Segmentations are interpolated per label with order 1;
//! a voxel takes the label whose indicator reaches 0.5 (outside the input every indicator is
//! −1, so such voxels end as 0, as in batchgenerators).

use rayon::prelude::*;
use stu_core::rng::SplitMix64;

use crate::resample::resample_data;

/// Augmentation settings; [`AugConfig::nnunet`] gives nnU-Net's for a patch.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugConfig {
    /// Rotation range per axis in radians (± this value).
    pub rotation: [f64; 3],
    /// Fold axis 0 into channels: rotate about axis 0 only, scale axes 1 and 2 only.
    pub dummy_2d: bool,
    /// Probability of a rotation per sample.
    pub p_rotation: f64,
    /// Probability of a scaling per sample.
    pub p_scale: f64,
    /// Scale range `(lo, hi)`: half the draws below 1, half above.
    pub scale: (f64, f64),
    /// Gaussian noise probability per sample.
    pub p_noise: f64,
    /// Gaussian blur probability per sample.
    pub p_blur: f64,
    /// Brightness probability per sample.
    pub p_brightness: f64,
    /// Contrast probability per sample.
    pub p_contrast: f64,
    /// Low-resolution probability per sample.
    pub p_lowres: f64,
    /// Inverted-gamma probability per sample.
    pub p_gamma_inverted: f64,
    /// Gamma probability per sample.
    pub p_gamma: f64,
    /// Axes that may be mirrored (each with p 0.5).
    pub mirror_axes: Vec<usize>,
    /// How rotation and scaling resample the label maps.
    #[serde(default)]
    pub seg_interpolation: SegInterpolation,
}

/// How spatial augmentation resamples label maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SegInterpolation {
    /// Per label, linearly: the label whose indicator reaches 0.5 (nnU-Net's `order_seg=1`).
    #[default]
    Linear,
    /// The nearest voxel's label (`nnUNetTrainer_DASegOrd0`: `mode_seg='nearest'`;
    /// `scipy.ndimage.map_coordinates` with `order=0` rounds half up).
    Nearest,
}

impl SegInterpolation {
    /// Every mode with its name in specs and on the command line.
    pub const ALL: [(&'static str, SegInterpolation); 2] = [("linear", Self::Linear), ("nearest", Self::Nearest)];

    /// Its name (`linear`, `nearest`).
    pub fn name(self) -> &'static str {
        stu_core::registry::choice_name(&Self::ALL, &self)
    }

    /// The mode named `name`.
    pub fn parse(name: &str) -> Result<Self, String> {
        stu_core::registry::choice(&Self::ALL, "seg_interpolation", name)
    }
}

impl AugConfig {
    /// nnU-Net v2.2's configuration for the final patch `patch` (3-D; a 2-D configuration's
    /// patch one slice deep gets nnU-Net's 2-D augmentation: in-plane rotation of its range,
    /// in-plane mirroring).
    pub fn nnunet(patch: [usize; 3]) -> Self {
        Self::nnunet_with(patch, true)
    }

    /// [`AugConfig::nnunet`], with `dummy_2d` false augmenting an anisotropic 3-D patch in 3-D
    /// all the same (`nnUNetTrainer_noDummy2DDA`: rotation ±30° about every axis, isotropic
    /// scaling, low resolution on every axis). A 2-D configuration's patch is augmented in
    /// plane either way, as nnU-Net's 2-D trainer is.
    pub fn nnunet_with(patch: [usize; 3], dummy_2d: bool) -> Self {
        let dummy_2d = crate::sampler::planar(patch) || (dummy_2d && crate::sampler::dummy_2d(patch));
        let rotation = if dummy_2d { [crate::sampler::in_plane_rotation(patch), 0.0, 0.0] } else { [30f64.to_radians(); 3] };
        Self {
            rotation,
            dummy_2d,
            p_rotation: 0.2,
            p_scale: 0.2,
            scale: (0.7, 1.4),
            p_noise: 0.1,
            p_blur: 0.2,
            p_brightness: 0.15,
            p_contrast: 0.15,
            p_lowres: 0.25,
            p_gamma_inverted: 0.1,
            p_gamma: 0.3,
            mirror_axes: crate::sampler::mirror_axes(crate::sampler::planar(patch), None),
            seg_interpolation: SegInterpolation::Linear,
        }
    }

    /// The enlarged patch loaded for the final patch `patch` before spatial augmentation
    /// ([`crate::sampler::initial_patch_size`] for this configuration's dummy-2-D mode).
    pub fn initial_patch(&self, patch: [usize; 3]) -> [usize; 3] {
        crate::sampler::initial_patch_size(patch, self.dummy_2d)
    }

    /// Nothing fires: the sample is the centre crop.
    pub fn none() -> Self {
        Self {
            rotation: [0.0; 3],
            dummy_2d: false,
            p_rotation: 0.0,
            p_scale: 0.0,
            scale: (1.0, 1.0),
            p_noise: 0.0,
            p_blur: 0.0,
            p_brightness: 0.0,
            p_contrast: 0.0,
            p_lowres: 0.0,
            p_gamma_inverted: 0.0,
            p_gamma: 0.0,
            mirror_axes: Vec::new(),
            seg_interpolation: SegInterpolation::Linear,
        }
    }
}

/// A sample: `channels` volumes of `shape` and a label map (−1 = outside the image).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// `[C, Z, Y, X]` row-major.
    pub data: Vec<f32>,
    /// `[S, Z, Y, X]`: the label map, then (a cascade's) the previous stage's segmentation;
    /// every spatial step treats each of the `S` maps alike.
    pub seg: Vec<i16>,
    /// Channels.
    pub channels: usize,
    /// Spatial extent.
    pub shape: [usize; 3],
}

/// `batchgenerators`' `get_range_val`-style draw for ranges split at 1: half the time
/// `U(lo, 1)`, else `U(max(lo, 1), hi)`.
fn split_at_one(rng: &mut SplitMix64, lo: f64, hi: f64) -> f64 {
    if rng.uniform(0.0, 1.0) < 0.5 && lo < 1.0 { rng.uniform(lo, 1.0) } else { rng.uniform(lo.max(1.0), hi) }
}

/// Augments one sample loaded with the enlarged patch into the final patch `out`.
pub fn augment(rng: &mut SplitMix64, cfg: &AugConfig, input: &Sample, out: [usize; 3]) -> Sample {
    let mut s = spatial(rng, cfg, input, out);
    let n: usize = out.iter().product();
    if rng.uniform(0.0, 1.0) < cfg.p_noise {
        let sd = rng.uniform(0.0, 0.1);
        for v in &mut s.data {
            *v += (rng.normal() * sd) as f32;
        }
    }
    if rng.uniform(0.0, 1.0) < cfg.p_blur {
        for c in s.data.chunks_mut(n) {
            if rng.uniform(0.0, 1.0) < 0.5 {
                let sigma = rng.uniform(0.5, 1.0);
                gaussian_blur(c, out, sigma);
            }
        }
    }
    if rng.uniform(0.0, 1.0) < cfg.p_brightness {
        for c in s.data.chunks_mut(n) {
            let m = rng.uniform(0.75, 1.25) as f32;
            c.iter_mut().for_each(|v| *v *= m);
        }
    }
    if rng.uniform(0.0, 1.0) < cfg.p_contrast {
        for c in s.data.chunks_mut(n) {
            let f = split_at_one(rng, 0.75, 1.25);
            contrast(c, f);
        }
    }
    if rng.uniform(0.0, 1.0) < cfg.p_lowres {
        for c in s.data.chunks_mut(n) {
            if rng.uniform(0.0, 1.0) < 0.5 {
                let zoom = rng.uniform(0.5, 1.0);
                low_resolution(c, out, zoom, cfg.dummy_2d);
            }
        }
    }
    for (p, invert) in [(cfg.p_gamma_inverted, true), (cfg.p_gamma, false)] {
        if rng.uniform(0.0, 1.0) < p {
            for c in s.data.chunks_mut(n) {
                let g = split_at_one(rng, 0.7, 1.5);
                gamma(c, g, invert);
            }
        }
    }
    for &axis in &cfg.mirror_axes {
        if rng.uniform(0.0, 1.0) < 0.5 {
            for c in s.data.chunks_mut(n) {
                flip(c, out, axis);
            }
            for c in s.seg.chunks_mut(n) {
                flip(c, out, axis);
            }
        }
    }
    s
}

/// Step 1: rotation and scaling about the patch centre, or the plain centre crop.
pub fn spatial(rng: &mut SplitMix64, cfg: &AugConfig, input: &Sample, out: [usize; 3]) -> Sample {
    let rotate = rng.uniform(0.0, 1.0) < cfg.p_rotation;
    let angles = if rotate { cfg.rotation.map(|r| if r > 0.0 { rng.uniform(-r, r) } else { 0.0 }) } else { [0.0; 3] };
    let do_scale = rng.uniform(0.0, 1.0) < cfg.p_scale;
    let scale = if do_scale { split_at_one(rng, cfg.scale.0, cfg.scale.1) } else { 1.0 };
    if !rotate && !do_scale {
        return center_crop(input, out);
    }
    transform(cfg.dummy_2d, cfg.seg_interpolation, input, out, angles, scale)
}

/// Resamples `input` on the grid of `out` rotated by `angles` (about axes 0, 1, 2) and scaled
/// by `scale` (axes 1 and 2 only when `dummy_2d`), centred on the input's centre; label maps
/// resampled by `seg`.
pub fn transform(dummy_2d: bool, seg: SegInterpolation, input: &Sample, out: [usize; 3], angles: [f64; 3], scale: f64) -> Sample {
    // coords(row vector) · Rx·Ry·Rz · scale + centre (batchgenerators' augment_spatial).
    let (sx, cx) = angles[0].sin_cos();
    let (sy, cy) = angles[1].sin_cos();
    let (sz, cz) = angles[2].sin_cos();
    let rx = [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]];
    let ry = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]];
    let rz = [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]];
    let mul = |a: [[f64; 3]; 3], b: [[f64; 3]; 3]| -> [[f64; 3]; 3] { std::array::from_fn(|i| std::array::from_fn(|j| (0..3).map(|k| a[i][k] * b[k][j]).sum())) };
    let mut m = mul(mul(rx, ry), rz);
    let scales = if dummy_2d { [1.0, scale, scale] } else { [scale; 3] };
    for row in &mut m {
        for (j, v) in row.iter_mut().enumerate() {
            *v *= scales[j];
        }
    }
    let centre = input.shape.map(|v| v as f64 / 2.0 - 0.5);
    let half = out.map(|v| (v as f64 - 1.0) / 2.0);
    let coords = |z: usize, y: usize, x: usize| -> [f64; 3] {
        let v = [z as f64 - half[0], y as f64 - half[1], x as f64 - half[2]];
        std::array::from_fn(|j| (0..3).map(|i| v[i] * m[i][j]).sum::<f64>() + centre[j])
    };
    let n: usize = out.iter().product();
    let vin: usize = input.shape.iter().product();
    let mut data = vec![0f32; input.channels * n];
    for c in 0..input.channels {
        let coef = spline_coefficients(&input.data[c * vin..(c + 1) * vin], input.shape);
        data[c * n..(c + 1) * n].par_chunks_mut(out[1] * out[2]).enumerate().for_each(|(z, plane)| {
            for y in 0..out[1] {
                for x in 0..out[2] {
                    plane[y * out[2] + x] = cubic_at(&coef, input.shape, coords(z, y, x));
                }
            }
        });
    }
    let maps = input.seg.len() / vin;
    let at = match seg {
        SegInterpolation::Linear => label_at,
        SegInterpolation::Nearest => label_nearest,
    };
    let mut seg = vec![0i16; maps * n];
    for (m, into) in seg.chunks_mut(n).enumerate() {
        let from = &input.seg[m * vin..(m + 1) * vin];
        into.par_chunks_mut(out[1] * out[2]).enumerate().for_each(|(z, plane)| {
            for y in 0..out[1] {
                for x in 0..out[2] {
                    plane[y * out[2] + x] = at(from, input.shape, coords(z, y, x));
                }
            }
        });
    }
    Sample { data, seg, channels: input.channels, shape: out }
}

/// The centre crop `lb = (in − out) // 2`.
pub fn center_crop(input: &Sample, out: [usize; 3]) -> Sample {
    let lb: [usize; 3] = std::array::from_fn(|a| (input.shape[a] - out[a]) / 2);
    let n: usize = out.iter().product();
    let vin: usize = input.shape.iter().product();
    let mut data = vec![0f32; input.channels * n];
    let maps = input.seg.len() / vin;
    let mut seg = vec![0i16; maps * n];
    for z in 0..out[0] {
        for y in 0..out[1] {
            let src = ((z + lb[0]) * input.shape[1] + y + lb[1]) * input.shape[2] + lb[2];
            let dst = (z * out[1] + y) * out[2];
            for m in 0..maps {
                seg[m * n + dst..m * n + dst + out[2]].copy_from_slice(&input.seg[m * vin + src..m * vin + src + out[2]]);
            }
            for c in 0..input.channels {
                data[c * n + dst..c * n + dst + out[2]].copy_from_slice(&input.data[c * vin + src..c * vin + src + out[2]]);
            }
        }
    }
    Sample { data, seg, channels: input.channels, shape: out }
}

/// The 1-D lines of a `[Z, Y, X]` volume along `axis`: each line's first index, and the step
/// between its elements.
fn lines(shape: [usize; 3], axis: usize) -> (Vec<usize>, usize) {
    let strides = [shape[1] * shape[2], shape[2], 1];
    let (o0, o1) = match axis {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    ((0..shape[o0]).flat_map(|i| (0..shape[o1]).map(move |j| i * strides[o0] + j * strides[o1])).collect(), strides[axis])
}

/// Cubic B-spline coefficients (scipy's `spline_filter`, mirror boundary), along every axis.
pub fn spline_coefficients(v: &[f32], shape: [usize; 3]) -> Vec<f32> {
    let mut c: Vec<f32> = v.to_vec();
    for axis in 0..3 {
        let n = shape[axis];
        if n < 2 {
            continue;
        }
        let (starts, s) = lines(shape, axis);
        let mut line = vec![0f64; n];
        for &start in &starts {
            for (k, l) in line.iter_mut().enumerate() {
                *l = c[start + k * s] as f64 * 6.0; // gain (1−z)(1−1/z)
            }
            filter_line(&mut line);
            for (k, l) in line.iter().enumerate() {
                c[start + k * s] = *l as f32;
            }
        }
    }
    c
}

/// In-place cubic B-spline prefilter of one line (already multiplied by the gain 6), mirror
/// boundary (Unser; scipy's `ni_splines.c`).
fn filter_line(c: &mut [f64]) {
    let z = 3f64.sqrt() - 2.0;
    let n = c.len();
    // Causal initialisation, mirror-symmetric extension.
    let horizon = ((1e-15f64).ln() / z.abs().ln()).ceil() as usize;
    if horizon < n {
        let mut zn = z;
        let mut sum = c[0];
        for v in c.iter().take(horizon).skip(1) {
            sum += zn * v;
            zn *= z;
        }
        c[0] = sum;
    } else {
        let mut zn = z;
        let iz = 1.0 / z;
        let mut z2n = z.powi(n as i32 - 1);
        let mut sum = c[0] + z2n * c[n - 1];
        // z^(2n−3), as Thévenaz's `InitialCausalCoefficient` (`z2n *= z2n * iz` there).
        z2n = z2n * z2n * iz;
        for v in c.iter().take(n - 1).skip(1) {
            sum += (zn + z2n) * v;
            zn *= z;
            z2n *= iz;
        }
        c[0] = sum / (1.0 - zn * zn);
    }
    for k in 1..n {
        c[k] += z * c[k - 1];
    }
    c[n - 1] = (z / (z * z - 1.0)) * (z * c[n - 2] + c[n - 1]);
    for k in (0..n - 1).rev() {
        c[k] = z * (c[k + 1] - c[k]);
    }
}

fn mirror(i: i64, n: usize) -> usize {
    let n = n as i64;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let mut i = i.rem_euclid(period);
    if i >= n {
        i = period - i;
    }
    i as usize
}

fn inside(p: [f64; 3], shape: [usize; 3]) -> bool {
    (0..3).all(|a| p[a] >= -1e-9 && p[a] <= shape[a] as f64 - 1.0 + 1e-9)
}

fn cubic_weights(t: f64) -> [f64; 4] {
    let u = 1.0 - t;
    [u * u * u / 6.0, (3.0 * t * t * t - 6.0 * t * t + 4.0) / 6.0, (-3.0 * t * t * t + 3.0 * t * t + 3.0 * t + 1.0) / 6.0, t * t * t / 6.0]
}

/// Order-3 value at `p` from spline coefficients; 0 outside the input.
fn cubic_at(coef: &[f32], shape: [usize; 3], p: [f64; 3]) -> f32 {
    if !inside(p, shape) {
        return 0.0;
    }
    let mut idx = [[0usize; 4]; 3];
    let mut w = [[0f64; 4]; 3];
    for a in 0..3 {
        let f = p[a].floor();
        w[a] = cubic_weights(p[a] - f);
        for (k, slot) in idx[a].iter_mut().enumerate() {
            *slot = mirror(f as i64 - 1 + k as i64, shape[a]);
        }
    }
    let mut acc = 0f64;
    for (i, &wz) in w[0].iter().enumerate() {
        let bz = idx[0][i] * shape[1] * shape[2];
        let mut accy = 0f64;
        for (j, &wy) in w[1].iter().enumerate() {
            let by = bz + idx[1][j] * shape[2];
            let mut accx = 0f64;
            for (k, &wx) in w[2].iter().enumerate() {
                accx += wx * coef[by + idx[2][k]] as f64;
            }
            accy += wy * accx;
        }
        acc += wz * accy;
    }
    acc as f32
}

/// Nearest-neighbour interpolation as `map_coordinates(order=0, mode='constant', cval=-1)`:
/// the voxel at `floor(p + 0.5)`; −1 outside the input (nnU-Net's border label, which the
/// loader turns into 0 after augmentation, as `RemoveLabelTransform`).
fn label_nearest(seg: &[i16], shape: [usize; 3], p: [f64; 3]) -> i16 {
    if !inside(p, shape) {
        return -1;
    }
    let id: [usize; 3] = std::array::from_fn(|a| ((p[a] + 0.5).floor().max(0.0) as usize).min(shape[a] - 1));
    seg[(id[0] * shape[1] + id[1]) * shape[2] + id[2]]
}

/// Per-label linear interpolation: the label whose indicator reaches 0.5 (the larger weight
/// wins, then the larger label); 0 when none does.
fn label_at(seg: &[i16], shape: [usize; 3], p: [f64; 3]) -> i16 {
    if !inside(p, shape) {
        return 0;
    }
    let f = p.map(|v| v.floor());
    let t: [f64; 3] = std::array::from_fn(|a| p[a] - f[a]);
    let mut labels = [(0i16, 0f64); 8];
    let mut used = 0;
    for corner in 0..8 {
        let off = [(corner >> 2) & 1, (corner >> 1) & 1, corner & 1];
        let mut w = 1.0;
        let mut id = [0usize; 3];
        for a in 0..3 {
            w *= if off[a] == 1 { t[a] } else { 1.0 - t[a] };
            id[a] = (f[a] as usize + off[a]).min(shape[a] - 1);
        }
        if w == 0.0 {
            continue;
        }
        let l = seg[(id[0] * shape[1] + id[1]) * shape[2] + id[2]];
        match labels[..used].iter_mut().find(|(v, _)| *v == l) {
            Some(e) => e.1 += w,
            None => {
                labels[used] = (l, w);
                used += 1;
            }
        }
    }
    labels[..used]
        .iter()
        .filter(|(_, w)| *w >= 0.5 - 1e-12)
        .max_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
        .map_or(0, |(l, _)| *l)
}

/// `scipy.ndimage.gaussian_filter(mode='reflect', truncate=4.0)`, the same σ on every axis.
pub fn gaussian_blur(v: &mut [f32], shape: [usize; 3], sigma: f64) {
    let radius = (4.0 * sigma + 0.5) as i64;
    let mut k: Vec<f64> = (-radius..=radius).map(|i| (-0.5 * (i as f64 / sigma).powi(2)).exp()).collect();
    let s: f64 = k.iter().sum();
    k.iter_mut().for_each(|x| *x /= s);
    for axis in 0..3 {
        let n = shape[axis];
        let (starts, st) = lines(shape, axis);
        let mut line = vec![0f64; n];
        let mut out = vec![0f64; n];
        for start in starts {
            for (q, l) in line.iter_mut().enumerate() {
                *l = v[start + q * st] as f64;
            }
            for (q, o) in out.iter_mut().enumerate() {
                *o = k.iter().enumerate().map(|(t, w)| w * line[reflect(q as i64 + t as i64 - radius, n)]).sum();
            }
            for (q, o) in out.iter().enumerate() {
                v[start + q * st] = *o as f32;
            }
        }
    }
}

/// scipy's `reflect` (half-sample symmetric: d c b a | a b c d | d c b a).
fn reflect(i: i64, n: usize) -> usize {
    let n = n as i64;
    let period = 2 * n;
    let mut i = i.rem_euclid(period);
    if i >= n {
        i = period - 1 - i;
    }
    i as usize
}

/// batchgenerators' `augment_linear_downsampling_scipy` as nnU-Net calls it: down to
/// `round(shape · zoom)` by nearest neighbour, back up with cubic splines ('edge', no
/// anti-aliasing); axis 0 kept in dummy 2-D.
fn low_resolution(c: &mut [f32], shape: [usize; 3], zoom: f64, dummy_2d: bool) {
    let mut target = shape.map(|v| ((v as f64 * zoom).round() as usize).max(1));
    if dummy_2d {
        target[0] = shape[0];
    }
    let down = nearest_resize(c, shape, target);
    let up = resample_data(&down, target, shape, None);
    c.copy_from_slice(&up);
}

/// `x ← (x − mean)·f + mean`, clipped to the range before (batchgenerators'
/// `augment_contrast` with `preserve_range=True`).
fn contrast(c: &mut [f32], f: f64) {
    let mean = c.iter().map(|&v| v as f64).sum::<f64>() / c.len() as f64;
    let (lo, hi) = c.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    for v in c.iter_mut() {
        *v = (((*v as f64 - mean) * f + mean) as f32).clamp(lo, hi);
    }
}

fn mean_std(c: &[f32]) -> (f64, f64) {
    let n = c.len() as f64;
    let mean = c.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = c.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// batchgenerators' `augment_gamma` with `retain_stats=True`.
fn gamma(c: &mut [f32], g: f64, invert: bool) {
    if invert {
        c.iter_mut().for_each(|v| *v = -*v);
    }
    let (mean, sd) = mean_std(c);
    let (lo, hi) = c.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let range = (hi - lo) as f64 + 1e-7;
    for v in c.iter_mut() {
        *v = (((*v - lo) as f64 / range).powf(g) * range + lo as f64) as f32;
    }
    let (m2, s2) = mean_std(c);
    for v in c.iter_mut() {
        *v = ((*v as f64 - m2) / (s2 + 1e-8) * sd + mean) as f32;
    }
    if invert {
        c.iter_mut().for_each(|v| *v = -*v);
    }
}

/// Reverses `axis` of a `[Z, Y, X]` volume in place.
pub fn flip<T: Copy>(v: &mut [T], shape: [usize; 3], axis: usize) {
    let n = shape[axis];
    let (starts, st) = lines(shape, axis);
    for start in starts {
        for q in 0..n / 2 {
            v.swap(start + q * st, start + (n - 1 - q) * st);
        }
    }
}

/// Nearest-neighbour resize with skimage's pixel-centre mapping (`order=0`): output `o` reads
/// input `floor((o + 0.5)·in/out)`, clamped. For a halving that is `2o + 1`, as nnU-Net's
/// deep-supervision targets.
pub fn nearest_resize<T: Copy + Default + Send + Sync>(v: &[T], shape: [usize; 3], out: [usize; 3]) -> Vec<T> {
    if shape == out {
        return v.to_vec();
    }
    let map = |a: usize| -> Vec<usize> { (0..out[a]).map(|o| ((((o as f64 + 0.5) * shape[a] as f64 / out[a] as f64) - 0.5 + 0.5).floor() as usize).min(shape[a] - 1)).collect() };
    let (mz, my, mx) = (map(0), map(1), map(2));
    let mut r = vec![T::default(); out.iter().product()];
    for (z, &iz) in mz.iter().enumerate() {
        for (y, &iy) in my.iter().enumerate() {
            let src = (iz * shape[1] + iy) * shape[2];
            let dst = (z * out[1] + y) * out[2];
            for (x, &ix) in mx.iter().enumerate() {
                r[dst + x] = v[src + ix];
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(shape: [usize; 3], seed: u64) -> Sample {
        let n: usize = shape.iter().product();
        let mut rng = SplitMix64::new(seed);
        Sample { data: rng.fill_f32(n, -1.0, 1.0), seg: (0..n).map(|_| rng.below(4) as i16).collect(), channels: 1, shape }
    }

    #[test]
    fn spline_interpolates_at_the_knots() {
        let s = sample([7, 9, 11], 1);
        let coef = spline_coefficients(&s.data, s.shape);
        for (i, &v) in s.data.iter().enumerate() {
            let p = [(i / 99) as f64, (i / 11 % 9) as f64, (i % 11) as f64];
            assert!((cubic_at(&coef, s.shape, p) - v).abs() < 1e-5, "{i}");
        }
        // A linear ramp is reproduced between knots too (cubic splines are exact for degree ≤ 3,
        // away from the mirror boundary's influence).
        let shape = [1, 1, 40];
        let ramp: Vec<f32> = (0..40).map(|x| x as f32 * 0.5).collect();
        let coef = spline_coefficients(&ramp, shape);
        let v = cubic_at(&coef, shape, [0.0, 0.0, 20.3]);
        assert!((v - 10.15).abs() < 1e-4, "{v}");
        assert_eq!(cubic_at(&coef, shape, [0.0, 0.0, 39.5]), 0.0, "outside is cval");
    }

    #[test]
    fn identity_spatial_transform_is_the_centre_crop() {
        // A 360° rotation about every axis with scale 1 samples exactly at the crop's voxels.
        let s = sample([12, 14, 16], 2);
        let mut cfg = AugConfig::none();
        cfg.p_rotation = 1.0;
        cfg.rotation = [1e-12; 3];
        let a = spatial(&mut SplitMix64::new(5), &cfg, &s, [8, 10, 12]);
        let b = center_crop(&s, [8, 10, 12]);
        // Centre crop takes lb = (in − out)//2 = 2; the transform centres at in/2 − 0.5 = out
        // centre + 2 exactly when in − out is even.
        for (x, y) in a.data.iter().zip(&b.data) {
            assert!((x - y).abs() < 1e-4);
        }
        assert_eq!(a.seg, b.seg);
    }

    #[test]
    fn quarter_turn_about_axis_0_permutes_axes_1_and_2() {
        // v·Rx(π/2): (z, y, x) ↦ (z, −x, y) about the centre, i.e. out[z][y][x] = in[z][x'][y']
        // with y' = x − c + c… checked voxel by voxel against the formula.
        let s = sample([6, 10, 10], 3);
        let out = transform(false, SegInterpolation::Linear, &s, [6, 10, 10], [std::f64::consts::FRAC_PI_2, 0.0, 0.0], 1.0);
        for i in 0..600 {
            let (z, y, x) = (i / 100, i / 10 % 10, i % 10);
            let (yy, xx) = (y as f64 - 4.5, x as f64 - 4.5);
            // row vector (yy, xx) · [[c, −s], [s, c]] with c = 0, s = 1 → (xx, −yy).
            let (sy, sx) = ((xx + 4.5).round() as usize, (-yy + 4.5).round() as usize);
            assert_eq!(out.seg[i], s.seg[(z * 10 + sy) * 10 + sx], "voxel {i}");
            assert!((out.data[i] - s.data[(z * 10 + sy) * 10 + sx]).abs() < 1e-4);
        }
        // Zooming out by 2 reads every other voxel around the centre; beyond the input: 0.
        let z = transform(false, SegInterpolation::Linear, &s, [6, 10, 10], [0.0; 3], 2.0);
        assert_eq!(z.seg[0], 0);
        assert_eq!(z.data[0], 0.0);
    }

/// `tests/fixtures/augment.json` (`make_augment_fixture.py`): its input volume and shape, and
    /// the fixture.
    fn batchgenerators_fixture() -> (Sample, serde_json::Value) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/augment.json");
        let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let shape: [usize; 3] = serde_json::from_value(f["shape"].clone()).unwrap();
        (Sample { data: floats(&f["data"]), seg: ints(&f["seg"]), channels: 1, shape }, f)
    }

    fn floats(v: &serde_json::Value) -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    }

    fn ints(v: &serde_json::Value) -> Vec<i16> {
        v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i16).collect()
    }

    #[test]
    fn spatial_transform_matches_batchgenerators() {
        // Fixed angles and scales, 3-D and dummy 2-D, through scipy's map_coordinates as
        // batchgenerators' augment_spatial calls it.
        let (input, f) = batchgenerators_fixture();
        for case in f["cases"].as_array().unwrap() {
            let out: [usize; 3] = serde_json::from_value(case["out"].clone()).unwrap();
            let angles: [f64; 3] = serde_json::from_value(case["angles"].clone()).unwrap();
            let (scale, dummy_2d) = (case["scale"].as_f64().unwrap(), case["dummy_2d"].as_bool().unwrap());
            for (mode, key) in [(SegInterpolation::Linear, "seg_linear"), (SegInterpolation::Nearest, "seg_nearest")] {
                let got = transform(dummy_2d, mode, &input, out, angles, scale);
                assert_eq!(got.seg, ints(&case[key]), "{key}, {out:?} {angles:?} ×{scale}");
                let worst = got.data.iter().zip(floats(&case["data"])).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-4, "data, {out:?} {angles:?} ×{scale}: off by {worst}");
            }
        }
    }

    #[test]
    fn intensity_steps_match_batchgenerators() {
        // The same fixture: each step with its random draw fixed.
        let (input, f) = batchgenerators_fixture();
        let shape = input.shape;
        for case in f["intensity"].as_array().unwrap() {
            let (op, value) = (case["op"].as_str().unwrap(), case["value"].as_f64().unwrap());
            let mut c = input.data.clone();
            match op {
                "blur" => gaussian_blur(&mut c, shape, value),
                "lowres" => low_resolution(&mut c, shape, value, false),
                "lowres_dummy_2d" => low_resolution(&mut c, shape, value, true),
                "contrast" => contrast(&mut c, value),
                "gamma_inverted" => gamma(&mut c, value, true),
                "gamma" => gamma(&mut c, value, false),
                _ => panic!("{op}"),
            }
            let want = floats(&case["out"]);
            let worst = c.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{op} {value}: off by {worst}");
        }
    }

    #[test]
    fn nnunet_no_dummy_2d_augments_anisotropic_patches_in_3d() {
        let aniso = [20, 192, 160];
        assert!(AugConfig::nnunet(aniso).dummy_2d);
        let c = AugConfig::nnunet_with(aniso, false);
        assert!(!c.dummy_2d);
        assert_eq!(c.rotation, [30f64.to_radians(); 3]);
        // nnU-Net 2.8.1's get_patch_size with ±30° about every axis (nnUNetTrainer_noDummy2DDA).
        assert_eq!(c.initial_patch(aniso), [133, 289, 188]);
        assert_eq!(AugConfig::nnunet_with([16, 256, 224], false).initial_patch([16, 256, 224]), [166, 392, 263]);
        assert_eq!(AugConfig::nnunet([16, 256, 224]).initial_patch([16, 256, 224]), [16, 301, 301]);
        // A 2-D configuration is augmented in plane either way.
        assert_eq!(AugConfig::nnunet_with([1, 96, 320], false), AugConfig::nnunet([1, 96, 320]));
    }

    #[test]
    fn flips_and_nearest_resize() {
        let mut v: Vec<i16> = (0..24).collect();
        flip(&mut v, [2, 3, 4], 2);
        assert_eq!(&v[..4], &[3, 2, 1, 0]);
        flip(&mut v, [2, 3, 4], 2);
        flip(&mut v, [2, 3, 4], 0);
        assert_eq!(v[0], 12);
        let v: Vec<i16> = (0..64).collect();
        let r = nearest_resize(&v, [4, 4, 4], [2, 2, 2]);
        assert_eq!(r, vec![21, 23, 29, 31, 53, 55, 61, 63], "index 2i+1 on every axis");
    }

    #[test]
    fn blur_keeps_the_mean_and_constants() {
        let mut c = vec![3.0f32; 5 * 6 * 7];
        gaussian_blur(&mut c, [5, 6, 7], 0.8);
        assert!(c.iter().all(|v| (v - 3.0).abs() < 1e-5));
        let s = sample([5, 6, 7], 4);
        let mut d = s.data.clone();
        gaussian_blur(&mut d, s.shape, 0.7);
        let m0: f32 = s.data.iter().sum();
        let m1: f32 = d.iter().sum();
        assert!((m0 - m1).abs() < 1e-2, "reflect boundary preserves the sum: {m0} {m1}");
    }

    #[test]
    fn gamma_retains_mean_and_std() {
        let mut c = SplitMix64::new(3).fill_f32(1000, -2.0, 5.0);
        let (m, s) = mean_std(&c);
        gamma(&mut c, 1.4, true);
        let (m2, s2) = mean_std(&c);
        assert!((m - m2).abs() < 1e-4 && (s - s2).abs() < 1e-4);
    }

    #[test]
    fn augmentation_is_a_function_of_the_seed() {
        let s = sample([20, 24, 28], 5);
        let cfg = AugConfig::nnunet([16, 16, 16]);
        for seed in 0..20 {
            let a = augment(&mut SplitMix64::new(seed), &cfg, &s, [16, 16, 16]);
            let b = augment(&mut SplitMix64::new(seed), &cfg, &s, [16, 16, 16]);
            assert_eq!(a, b);
            assert!(a.data.iter().all(|v| v.is_finite()));
            assert!(a.seg.iter().all(|&l| (-1..4).contains(&l)));
        }
    }

    #[test]
    fn a_second_label_map_is_moved_exactly_as_the_first() {
        let s = sample([14, 15, 16], 9);
        let two = Sample { seg: [s.seg.clone(), s.seg.clone()].concat(), ..s.clone() };
        let cfg = AugConfig::nnunet([8, 9, 10]);
        for seed in 0..12 {
            let one = augment(&mut SplitMix64::new(seed), &cfg, &s, [8, 9, 10]);
            let both = augment(&mut SplitMix64::new(seed), &cfg, &two, [8, 9, 10]);
            assert_eq!(both.data, one.data, "seed {seed}");
            assert_eq!(&both.seg[..720], one.seg.as_slice(), "seed {seed}");
            assert_eq!(&both.seg[720..], one.seg.as_slice(), "seed {seed}");
        }
    }
}
