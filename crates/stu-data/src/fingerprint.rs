//! Dataset fingerprint (`shared/docs/nnunet-pipeline.md` §2) and `crop_to_nonzero` (§4.1).

use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use crate::dataset::{DatasetError, DatasetJson, discover};
use crate::nifti_io::{read_image, read_label};

/// Foreground values drawn per channel over the whole dataset. nnU-Net uses 1e8
/// (`num_foreground_voxels_for_intensitystats`, 400 MB per channel); 1e7 gives the same
/// statistics to well under 0.1 % at a tenth of the memory.
pub const FOREGROUND_SAMPLES: usize = 10_000_000;

/// Half-open bounding box `[start, end)` per axis.
pub type BBox = [[usize; 2]; 3];

/// Nonzero mask over channels, holes filled (6-connectivity, as `binary_fill_holes`), and its
/// tight bounding box (the full image when the mask is empty).
pub fn nonzero_mask(channels: &[&[f32]], shape: [usize; 3]) -> (Vec<bool>, BBox) {
    let n: usize = shape.iter().product();
    let [d, h, w] = shape;
    // 0: background not (yet) reached from the border, 1: nonzero, 2: background reached.
    const BG: u8 = 0;
    const FG: u8 = 1;
    const OUT: u8 = 2;
    let mut state: Vec<u8> = (0..n).into_par_iter().map(|i| if channels.iter().any(|c| c[i] != 0.0) { FG } else { BG }).collect();
    // Breadth-first from every border background voxel; the queue is the visit order itself.
    let mut queue: Vec<u32> = Vec::new();
    let idx = |z: usize, y: usize, x: usize| (z * h + y) * w + x;
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                let border = z == 0 || y == 0 || x == 0 || z == d - 1 || y == h - 1 || x == w - 1;
                let i = idx(z, y, x);
                if border && state[i] == BG {
                    state[i] = OUT;
                    queue.push(i as u32);
                }
            }
        }
    }
    let mut head = 0;
    while head < queue.len() {
        let i = queue[head] as usize;
        head += 1;
        let (z, y, x) = (i / (h * w), i / w % h, i % w);
        let mut visit = |j: usize| {
            if state[j] == BG {
                state[j] = OUT;
                queue.push(j as u32);
            }
        };
        if z > 0 { visit(i - h * w) }
        if z + 1 < d { visit(i + h * w) }
        if y > 0 { visit(i - w) }
        if y + 1 < h { visit(i + w) }
        if x > 0 { visit(i - 1) }
        if x + 1 < w { visit(i + 1) }
    }
    drop(queue);
    let mask: Vec<bool> = state.into_par_iter().map(|s| s != OUT).collect();
    let mut bb = [[usize::MAX, 0]; 3];
    let mut any = false;
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                if mask[idx(z, y, x)] {
                    any = true;
                    for (a, v) in [z, y, x].into_iter().enumerate() {
                        bb[a][0] = bb[a][0].min(v);
                        bb[a][1] = bb[a][1].max(v + 1);
                    }
                }
            }
        }
    }
    if !any {
        bb = [[0, d], [0, h], [0, w]];
    }
    (mask, bb)
}

/// Foreground intensity statistics of one channel (nnU-Net's field names).
#[derive(Debug, Clone, Serialize)]
pub struct IntensityProperties {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub median: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// 99.5th percentile (numpy linear).
    pub percentile_99_5: f64,
    /// 0.5th percentile.
    pub percentile_00_5: f64,
}

/// `dataset_fingerprint.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Fingerprint {
    /// Per case, array order, sorted by case id.
    pub spacings: Vec<[f64; 3]>,
    /// Per case after cropping to nonzero.
    pub shapes_after_crop: Vec<[usize; 3]>,
    /// Per channel.
    pub foreground_intensity_properties_per_channel: std::collections::BTreeMap<String, IntensityProperties>,
    /// Median over cases of voxels after / before cropping.
    pub median_relative_size_after_cropping: f64,
}

fn properties(mut v: Vec<f32>) -> IntensityProperties {
    if v.is_empty() {
        return IntensityProperties { mean: f64::NAN, median: f64::NAN, std: f64::NAN, min: f64::NAN, max: f64::NAN, percentile_99_5: f64::NAN, percentile_00_5: f64::NAN };
    }
    v.par_sort_unstable_by(f32::total_cmp);
    let n = v.len();
    let mean = ordered_sum(&v, |_| true, |x| x as f64).1 / n as f64;
    let var = ordered_sum(&v, |_| true, |x| (x as f64 - mean).powi(2)).1 / n as f64;
    let pct = |q: f64| {
        let idx = q / 100.0 * (n - 1) as f64;
        let (lo, hi) = (idx.floor() as usize, idx.ceil() as usize);
        v[lo] as f64 + (v[hi] as f64 - v[lo] as f64) * (idx - lo as f64)
    };
    IntensityProperties { mean, median: pct(50.0), std: var.sqrt(), min: v[0] as f64, max: v[n - 1] as f64, percentile_99_5: pct(99.5), percentile_00_5: pct(0.5) }
}

/// Computes the fingerprint of a dataset in nnU-Net raw layout.
///
/// Foreground = label > 0 inside the crop, **excluding** the ignore label (nnU-Net v2.2 includes
/// it; `nnunet-pipeline.md` §12 item 5). Like nnU-Net, every case with foreground contributes
/// the same number of values, [`FOREGROUND_SAMPLES`] / N, so cases weigh equally whatever their
/// size; nnU-Net draws them at random with replacement, we take evenly spaced positions (with
/// repetition when a case has fewer), so statistics agree to sampling error, not bit for bit.
pub fn fingerprint(root: &Path, json: &DatasetJson) -> Result<Fingerprint, DatasetError> {
    let (cases, _) = discover(root, json)?;
    let per_case = (FOREGROUND_SAMPLES / cases.len().max(1)).max(1);
    let c = json.channel_names.len();
    // Per case: spacing, shape, the fraction kept by cropping, foreground samples per channel.
    type CaseStats = ([f64; 3], [usize; 3], f64, Vec<Vec<f32>>);
    let results: Vec<Result<CaseStats, DatasetError>> = cases
        .par_iter()
        .map(|case| {
            let file_err = |p: &Path, e: String| DatasetError::File { path: p.to_path_buf(), reason: e };
            let mut images = Vec::with_capacity(c);
            for (ch, img) in case.images.iter().enumerate() {
                let p = img.as_ref().ok_or_else(|| file_err(root, format!("case `{}` has no channel {ch}", case.id)))?;
                images.push(read_image(p)?);
            }
            let lp = case.label.as_ref().ok_or_else(|| file_err(root, format!("case `{}` has no label", case.id)))?;
            let label = read_label(lp)?;
            let geom = &images[0].geom;
            let chans: Vec<&[f32]> = images.iter().map(|v| v.data.as_slice()).collect();
            let (_, bb) = nonzero_mask(&chans, geom.shape);
            let shape = [0, 1, 2].map(|a| bb[a][1] - bb[a][0]);
            let rel = shape.iter().product::<usize>() as f64 / geom.voxels() as f64;
            let [_, h, w] = geom.shape;
            let mut fg_idx = Vec::new();
            for z in bb[0][0]..bb[0][1] {
                for y in bb[1][0]..bb[1][1] {
                    for x in bb[2][0]..bb[2][1] {
                        let i = (z * h + y) * w + x;
                        let l = label.data[i] as u32;
                        if l > 0 && Some(l) != json.ignore_label {
                            fg_idx.push(i);
                        }
                    }
                }
            }
            let samples = images
                .iter()
                .map(|img| {
                    if fg_idx.is_empty() {
                        return Vec::new();
                    }
                    (0..per_case).map(|k| img.data[fg_idx[k * fg_idx.len() / per_case]]).collect()
                })
                .collect();
            Ok((geom.spacing, shape, rel, samples))
        })
        .collect();
    let mut fp = Fingerprint { spacings: vec![], shapes_after_crop: vec![], foreground_intensity_properties_per_channel: Default::default(), median_relative_size_after_cropping: 0.0 };
    let mut pooled: Vec<Vec<f32>> = vec![Vec::new(); c];
    let mut rels = Vec::new();
    for r in results {
        let (sp, shape, rel, samples) = r?;
        fp.spacings.push(sp);
        fp.shapes_after_crop.push(shape);
        rels.push(rel);
        for (p, s) in pooled.iter_mut().zip(samples) {
            p.extend(s);
        }
    }
    fp.median_relative_size_after_cropping = if rels.is_empty() { 1.0 } else { crate::plan::percentile(rels, 50.0) };
    for (ch, values) in pooled.into_iter().enumerate() {
        fp.foreground_intensity_properties_per_channel.insert(ch.to_string(), properties(values));
    }
    Ok(fp)
}

/// The count of the values of `v` whose index `sel` takes, and the sum of `f` over them,
/// summed over fixed blocks added in order: the same bits on every run, whatever the threads did
/// (rayon's own float reductions split where work is stolen, so their last digits vary).
pub(crate) fn ordered_sum(v: &[f32], sel: impl Fn(usize) -> bool + Sync, f: impl Fn(f32) -> f64 + Sync) -> (usize, f64) {
    const BLOCK: usize = 1 << 16;
    let parts: Vec<(usize, f64)> = v
        .par_chunks(BLOCK)
        .enumerate()
        .map(|(b, c)| c.iter().enumerate().filter(|(i, _)| sel(b * BLOCK + i)).fold((0, 0.0), |(n, s), (_, &x)| (n + 1, s + f(x))))
        .collect();
    parts.into_iter().fold((0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_filled_and_the_bbox_is_half_open() {
        // A hollow 3³ cube at (1..4)³ in a 5×5×6 volume: the centre is a hole.
        let shape = [5, 5, 6];
        let mut v = vec![0f32; 150];
        for z in 1..4 {
            for y in 1..4 {
                for x in 1..4 {
                    if (z, y, x) != (2, 2, 2) {
                        v[(z * 5 + y) * 6 + x] = 1.0;
                    }
                }
            }
        }
        let (mask, bb) = nonzero_mask(&[&v], shape);
        assert!(mask[(2 * 5 + 2) * 6 + 2], "the enclosed voxel is filled");
        assert_eq!(mask.iter().filter(|m| **m).count(), 27);
        assert_eq!(bb, [[1, 4], [1, 4], [1, 4]]);
        let (_, bb) = nonzero_mask(&[&[0.0; 8]], [2, 2, 2]);
        assert_eq!(bb, [[0, 2], [0, 2], [0, 2]], "an empty mask keeps the whole image");
    }

    #[test]
    fn percentiles_and_std_follow_numpy() {
        let p = properties((0..11).map(|v| v as f32).collect());
        assert_eq!((p.median, p.min, p.max), (5.0, 0.0, 10.0));
        assert!((p.percentile_99_5 - 9.95).abs() < 1e-9 && (p.percentile_00_5 - 0.05).abs() < 1e-9);
        assert!((p.std - 10f64.sqrt()).abs() < 1e-12);
    }
}
