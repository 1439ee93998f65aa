//! nnU-Net preprocessing (`shared/docs/nnunet-pipeline.md` §4): transpose, crop to nonzero,
//! normalise, resample, class locations, and a storage format training reads directly.
//!
//! Storage per case, in the output folder:
//! - `{id}_data.f32`: `[C, Z, Y, X]` little-endian f32 (raw, so it can be memory-mapped);
//! - `{id}_seg.i16`: `[Z, Y, X]` little-endian i16 (−1 outside the nonzero mask);
//! - `{id}_locs.u32`: sampled foreground coordinates, `[z, y, x]` triples per class;
//! - `{id}.json`: properties (shapes, spacings, bbox, class-location index). It is written last,
//!   after the binary files are complete, so a case is complete iff its JSON exists, and a
//!   rerun redoes only the missing ones.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::{DatasetError, DatasetJson, discover};
use crate::fingerprint::nonzero_mask;
use crate::nifti_io::{read_image, read_label};
use crate::plan::compute_new_shape;
use crate::resample::{resample_data, resample_seg, separate_axis};

/// What preprocessing needs from a plan (nnU-Net's or ours; v2.2 or later schema).
#[derive(Debug, Clone)]
pub struct PreprocessPlan {
    /// Target spacing, transposed order. For a 2-D configuration (`slice_spacing_kept`) entry 0
    /// is NaN: each case keeps its own.
    pub spacing: [f64; 3],
    /// A 2-D configuration (nnU-Net's `2d`): its spacing has the two in-plane entries only, and
    /// each case keeps the spacing of its first (transposed) axis, as nnU-Net's preprocessor does.
    pub slice_spacing_kept: bool,
    /// Axis permutation applied to every array.
    pub transpose_forward: [usize; 3],
    /// Per channel.
    pub normalization_schemes: Vec<String>,
    /// Per channel.
    pub use_mask_for_norm: Vec<bool>,
    /// Per channel (for CTNormalization).
    pub intensity: Vec<Option<CtStats>>,
}

/// The fingerprint numbers CT normalisation uses.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct CtStats {
    /// Mean of foreground intensities.
    pub mean: f64,
    /// Their std.
    pub std: f64,
    /// 0.5th percentile.
    pub percentile_00_5: f64,
    /// 99.5th percentile.
    pub percentile_99_5: f64,
}

fn plan_err(path: &Path, key: &str, reason: impl Into<String>) -> DatasetError {
    DatasetError::Json { path: path.to_path_buf(), key: key.to_string(), reason: reason.into() }
}

impl PreprocessPlan {
    /// Reads `configurations.<configuration>` of a plans file.
    pub fn read(path: &Path, configuration: &str) -> Result<Self, DatasetError> {
        let text = std::fs::read_to_string(path).map_err(|e| DatasetError::File { path: path.to_path_buf(), reason: format!("cannot read: {e}") })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| plan_err(path, "(file)", format!("not valid JSON: {e}")))?;
        Self::from_plans(&v, path, configuration)
    }

    /// [`PreprocessPlan::read`] of plans already parsed; `path` names them in errors.
    pub fn from_plans(v: &serde_json::Value, path: &Path, configuration: &str) -> Result<Self, DatasetError> {
        let conf_key = format!("configurations.{configuration}");
        let conf = crate::plan::configuration(v, configuration).map_err(|e| plan_err(path, &conf_key, e))?;
        let get = |key: &str| conf.get(key).cloned().ok_or_else(|| plan_err(path, &format!("{conf_key}.{key}"), "missing"));
        let listed: Vec<f64> = serde_json::from_value(get("spacing")?).map_err(|e| plan_err(path, &format!("{conf_key}.spacing"), e.to_string()))?;
        let two_d = crate::plan::is_2d(&conf);
        let spacing = match (listed.as_slice(), two_d) {
            (&[a, b, c], false) => [a, b, c],
            (&[b, c], true) => [f64::NAN, b, c],
            _ => return Err(plan_err(path, &format!("{conf_key}.spacing"), format!("{} entries for a {}-D configuration", listed.len(), if two_d { 2 } else { 3 }))),
        };
        if spacing.iter().skip(usize::from(two_d)).any(|&s| !(s > 0.0 && s.is_finite())) {
            return Err(plan_err(path, &format!("{conf_key}.spacing"), format!("{listed:?}: spacings must be positive")));
        }
        let normalization_schemes: Vec<String> = serde_json::from_value(get("normalization_schemes")?).map_err(|e| plan_err(path, &format!("{conf_key}.normalization_schemes"), e.to_string()))?;
        let use_mask_for_norm: Vec<bool> = serde_json::from_value(get("use_mask_for_norm")?).map_err(|e| plan_err(path, &format!("{conf_key}.use_mask_for_norm"), e.to_string()))?;
        let transpose_forward: [usize; 3] = v
            .get("transpose_forward")
            .map(|t| serde_json::from_value(t.clone()))
            .transpose()
            .map_err(|e| plan_err(path, "transpose_forward", e.to_string()))?
            .unwrap_or([0, 1, 2]);
        let props = v.get("foreground_intensity_properties_per_channel");
        let intensity = (0..normalization_schemes.len())
            .map(|c| props.and_then(|p| p.get(c.to_string())).and_then(|s| serde_json::from_value::<CtStats>(s.clone()).ok()))
            .collect::<Vec<_>>();
        for (c, scheme) in normalization_schemes.iter().enumerate() {
            if scheme == "CTNormalization" && intensity[c].is_none() {
                return Err(plan_err(path, &format!("foreground_intensity_properties_per_channel.{c}"), "CTNormalization needs mean, std, percentile_00_5 and percentile_99_5"));
            }
            if !["CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization", "RGBTo01Normalization"].contains(&scheme.as_str()) {
                return Err(plan_err(path, &format!("{conf_key}.normalization_schemes"), format!("unknown scheme `{scheme}`")));
            }
        }
        Ok(Self { spacing, slice_spacing_kept: two_d, transpose_forward, normalization_schemes, use_mask_for_norm, intensity })
    }

    /// The spacing a case of (transposed) spacing `case` is resampled to.
    pub fn target_spacing(&self, case: [f64; 3]) -> [f64; 3] {
        if self.slice_spacing_kept { [case[0], self.spacing[1], self.spacing[2]] } else { self.spacing }
    }
}

/// Properties of a preprocessed case (nnU-Net's names where they exist).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseProperties {
    /// Case id.
    pub id: String,
    /// `[C, Z, Y, X]` of the stored data.
    pub shape: [usize; 4],
    /// Spacing of the stored data (transposed order).
    pub spacing: [f64; 3],
    /// Original spacing, untransposed array order.
    pub original_spacing: [f64; 3],
    /// Original shape, transposed order.
    pub shape_before_cropping: [usize; 3],
    /// Half-open crop box in transposed order.
    pub bbox_used_for_cropping: [[usize; 2]; 3],
    /// Shape after cropping.
    pub shape_after_cropping_and_before_resampling: [usize; 3],
    /// The source image's voxel-to-world affine (to export predictions).
    pub affine: [[f64; 4]; 4],
    /// Label → (offset, count) of its `[z, y, x]` triples in `{id}_locs.u32`.
    pub class_locations: std::collections::BTreeMap<String, [usize; 2]>,
}

/// A preprocessed case in memory.
pub struct Preprocessed {
    /// `[C, Z, Y, X]`.
    pub data: Vec<f32>,
    /// `[Z, Y, X]`.
    pub seg: Vec<i16>,
    /// Properties.
    pub props: CaseProperties,
    /// Sampled coordinates per label.
    pub locations: Vec<(i16, Vec<[u32; 3]>)>,
    /// Sampled coordinates per region of a region-based dataset whose key is not a plain label
    /// (`"(1, 2, 3)"`, `"(3,)"`), sampled from the region's union as nnU-Net does; regions
    /// written as one integer use that label's locations.
    pub region_locations: Vec<(String, Vec<[u32; 3]>)>,
}

/// Permutes the axes of a volume: output axis `d` is input axis `perm[d]`.
pub fn transpose<T: Copy + Default + Send + Sync>(v: Vec<T>, shape: [usize; 3], perm: [usize; 3]) -> (Vec<T>, [usize; 3]) {
    if perm == [0, 1, 2] {
        return (v, shape);
    }
    let new = perm.map(|a| shape[a]);
    let st = [shape[1] * shape[2], shape[2], 1];
    let mut out = vec![T::default(); v.len()];
    out.par_chunks_mut(new[1] * new[2]).enumerate().for_each(|(i, plane)| {
        for j in 0..new[1] {
            for k in 0..new[2] {
                let idx = [i, j, k];
                let mut src = 0;
                for (d, &a) in perm.iter().enumerate() {
                    src += idx[d] * st[a];
                }
                plane[j * new[2] + k] = v[src];
            }
        }
    });
    (out, new)
}

fn crop<T: Copy + Send + Sync>(v: Vec<T>, shape: [usize; 3], bb: [[usize; 2]; 3]) -> Vec<T> {
    if bb == [[0, shape[0]], [0, shape[1]], [0, shape[2]]] {
        return v;
    }
    let mut out = Vec::with_capacity((bb[0][1] - bb[0][0]) * (bb[1][1] - bb[1][0]) * (bb[2][1] - bb[2][0]));
    for z in bb[0][0]..bb[0][1] {
        for y in bb[1][0]..bb[1][1] {
            let row = (z * shape[1] + y) * shape[2];
            out.extend_from_slice(&v[row + bb[2][0]..row + bb[2][1]]);
        }
    }
    out
}

/// Normalises one channel in place (§4.2). `mask` is `seg ≥ 0`.
pub fn normalize(v: &mut [f32], scheme: &str, use_mask: bool, mask: &[bool], ct: Option<CtStats>) {
    match scheme {
        "CTNormalization" => {
            let s = ct.expect("checked when the plan was read");
            let (lo, hi, mean, std) = (s.percentile_00_5, s.percentile_99_5, s.mean, s.std.max(1e-8));
            v.par_iter_mut().for_each(|x| *x = (((*x as f64).clamp(lo, hi) - mean) / std) as f32);
        }
        "ZScoreNormalization" => {
            let sel = |i: usize| !use_mask || mask[i];
            let (n, sum) = crate::fingerprint::ordered_sum(v, sel, |x| x as f64);
            let mean = sum / n.max(1) as f64;
            let var = crate::fingerprint::ordered_sum(v, sel, |x| (x as f64 - mean).powi(2)).1 / n.max(1) as f64;
            let std = var.sqrt().max(1e-8);
            v.par_iter_mut().enumerate().for_each(|(i, x)| {
                if sel(i) {
                    *x = ((*x as f64 - mean) / std) as f32;
                }
            });
        }
        "RescaleTo01Normalization" => {
            let (lo, hi) = v.iter().fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
            let range = ((hi - lo) as f64).max(1e-8);
            v.par_iter_mut().for_each(|x| *x = ((*x - lo) as f64 / range) as f32);
        }
        "RGBTo01Normalization" => v.par_iter_mut().for_each(|x| *x /= 255.0),
        _ => {}
    }
}

/// The key of the annotated voxels' locations in a dataset with an ignore label (nnU-Net's
/// `annotated_classes_key`: every voxel not under the ignore label), stored as `"annotated"`.
pub const ANNOTATED: i16 = i16::MIN;

/// [`ANNOTATED`]'s key in a case's `class_locations`.
pub const ANNOTATED_KEY: &str = "annotated";

/// Samples class locations: per foreground label, k = max(min(10000, n), ceil(0.01·n)) voxels
/// without replacement (deterministic per `seed`). With an ignore label, its voxels are no
/// class, and the annotated voxels get locations of their own ([`ANNOTATED`]), as nnU-Net's.
fn class_locations(seg: &[i16], shape: [usize; 3], seed: u64, ignore: Option<i16>) -> Vec<(i16, Vec<[u32; 3]>)> {
    let mut by_label: std::collections::BTreeMap<i16, Vec<usize>> = Default::default();
    if ignore.is_some() {
        by_label.insert(ANNOTATED, Vec::new());
    }
    for (i, &s) in seg.iter().enumerate() {
        if Some(s) == ignore {
            continue;
        }
        if s > 0 {
            by_label.entry(s).or_default().push(i);
        }
        if ignore.is_some() {
            by_label.get_mut(&ANNOTATED).expect("inserted").push(i);
        }
    }
    let mut rng = stu_core::rng::SplitMix64::new(seed);
    by_label.into_iter().map(|(label, idx)| (label, subsample(idx, shape, &mut rng))).collect()
}

/// nnU-Net's subsample of a class's voxel indices: k = max(min(10000, n), ceil(0.01·n)) of them
/// without replacement, as `[z, y, x]`.
fn subsample(mut idx: Vec<usize>, shape: [usize; 3], rng: &mut stu_core::rng::SplitMix64) -> Vec<[u32; 3]> {
    let n = idx.len();
    let k = n.min(10_000).max(n.div_ceil(100));
    for i in 0..k {
        let j = i + rng.below((n - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx[..k].iter().map(|&i| [(i / (shape[1] * shape[2])) as u32, (i / shape[2] % shape[1]) as u32, (i % shape[2]) as u32]).collect()
}

/// Locations of the regions that are not one plain label, each sampled from its union.
fn region_locations(seg: &[i16], shape: [usize; 3], seed: u64, regions: &[crate::dataset::Region]) -> Vec<(String, Vec<[u32; 3]>)> {
    let mut rng = stu_core::rng::SplitMix64::new(seed ^ 0x07e6_10a5);
    regions
        .iter()
        .filter(|r| r.has_own_locations())
        .map(|r| {
            let idx: Vec<usize> = seg.iter().enumerate().filter(|&(_, &s)| s > 0 && r.contains(s as u16)).map(|(i, _)| i).collect();
            (r.key.clone(), subsample(idx, shape, &mut rng))
        })
        .collect()
}

/// Preprocesses one case from its channel files and optional label file.
pub fn preprocess_case(id: &str, images: &[PathBuf], label: Option<&Path>, plan: &PreprocessPlan) -> Result<Preprocessed, DatasetError> {
    preprocess_case_with(id, images, label, plan, None, &[])
}

/// [`preprocess_case`] for a dataset whose labels have an ignore label (sparse annotation):
/// its voxels get no class locations, the annotated ones do ([`ANNOTATED`]); and for a
/// region-based dataset, whose regions get locations of their own.
pub fn preprocess_case_with(id: &str, images: &[PathBuf], label: Option<&Path>, plan: &PreprocessPlan, ignore: Option<i16>, regions: &[crate::dataset::Region]) -> Result<Preprocessed, DatasetError> {
    let file_err = |p: &Path, e: String| DatasetError::File { path: p.to_path_buf(), reason: e };
    if images.len() != plan.normalization_schemes.len() {
        return Err(file_err(images.first().map(PathBuf::as_path).unwrap_or(Path::new(id)), format!("case `{id}` has {} channel(s), the plan expects {}", images.len(), plan.normalization_schemes.len())));
    }
    let perm = plan.transpose_forward;
    let mut chans = Vec::with_capacity(images.len());
    let mut geom = None;
    for p in images {
        let v = read_image(p)?;
        // A NaN or infinity would spread through normalisation and resampling into the network.
        if let Some(i) = v.data.iter().position(|x| !x.is_finite()) {
            let bad = v.data.iter().filter(|x| !x.is_finite()).count();
            let [_, ny, nx] = v.geom.shape;
            return Err(file_err(p, format!("{bad} NaN or infinite voxel(s), the first at [{}, {}, {}] (array order)", i / (ny * nx), i / nx % ny, i % nx)));
        }
        if let Some(g) = &geom {
            let g: &crate::nifti_io::Geometry = g;
            if g.shape != v.geom.shape {
                return Err(file_err(p, format!("shape {:?} differs from channel 0 {:?}", v.geom.shape, g.shape)));
            }
        }
        let shape = v.geom.shape;
        geom.get_or_insert(v.geom);
        chans.push(transpose(v.data, shape, perm).0);
    }
    let geom = geom.expect("at least one channel");
    let shape_t = perm.map(|a| geom.shape[a]);
    let spacing_t = perm.map(|a| geom.spacing[a]);
    let seg_t: Option<Vec<i16>> = match label {
        Some(p) => {
            let l = read_label(p)?;
            if l.geom.shape != geom.shape {
                return Err(file_err(p, format!("label shape {:?} differs from the image {:?}", l.geom.shape, geom.shape)));
            }
            let as_i16: Vec<i16> = l.data.into_iter().map(|v| v as i16).collect();
            Some(transpose(as_i16, geom.shape, perm).0)
        }
        None => None,
    };
    let refs: Vec<&[f32]> = chans.iter().map(Vec::as_slice).collect();
    let (mask, bb) = nonzero_mask(&refs, shape_t);
    let cropped_shape = [0, 1, 2].map(|a| bb[a][1] - bb[a][0]);
    let mask_c = crop(mask, shape_t, bb);
    let mut seg: Vec<i16> = match seg_t {
        Some(s) => crop(s, shape_t, bb),
        None => vec![0; mask_c.len()],
    };
    for (s, &m) in seg.iter_mut().zip(&mask_c) {
        if *s == 0 && !m {
            *s = -1;
        }
    }
    drop(mask_c);
    let needs_mask = plan.use_mask_for_norm.iter().any(|&m| m);
    let norm_mask: Vec<bool> = if needs_mask { seg.iter().map(|&s| s >= 0).collect() } else { Vec::new() };
    let target = plan.target_spacing(spacing_t);
    let new_shape = compute_new_shape(cropped_shape, spacing_t, target);
    let sep = separate_axis(spacing_t, target);
    let mut data = Vec::with_capacity(chans.len() * new_shape.iter().product::<usize>());
    for (c, ch) in chans.into_iter().enumerate() {
        let mut v = crop(ch, shape_t, bb);
        normalize(&mut v, &plan.normalization_schemes[c], plan.use_mask_for_norm[c], &norm_mask, plan.intensity[c]);
        data.extend(resample_data(&v, cropped_shape, new_shape, sep));
    }
    drop(norm_mask);
    let seg = resample_seg(&seg, cropped_shape, new_shape, sep);
    let seed = id.bytes().fold(1234u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let locations = class_locations(&seg, new_shape, seed, ignore);
    let region_locations = region_locations(&seg, new_shape, seed, regions);
    let mut offset = 0;
    let class_locations = locations
        .iter()
        .map(|(l, c)| (if *l == ANNOTATED { ANNOTATED_KEY.to_string() } else { l.to_string() }, c.len()))
        .chain(region_locations.iter().map(|(k, c)| (k.clone(), c.len())))
        .map(|(k, n)| {
            offset += n;
            (k, [offset - n, n])
        })
        .collect();
    let props = CaseProperties {
        id: id.to_string(),
        shape: [images.len(), new_shape[0], new_shape[1], new_shape[2]],
        spacing: target,
        original_spacing: geom.spacing,
        shape_before_cropping: shape_t,
        bbox_used_for_cropping: bb,
        shape_after_cropping_and_before_resampling: cropped_shape,
        affine: geom.affine,
        class_locations,
    };
    Ok(Preprocessed { data, seg, props, locations, region_locations })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), DatasetError> {
    // Atomic without fsync: a half-written case is never read because its JSON goes last.
    stu_core::fs::atomic_with(path, |tmp| std::fs::write(tmp, bytes)).map_err(|e| DatasetError::File { path: path.to_path_buf(), reason: format!("cannot write: {e}") })
}

/// Writes a preprocessed case; the JSON goes last.
pub fn save(dir: &Path, case: &Preprocessed) -> Result<(), DatasetError> {
    let id = &case.props.id;
    write_file(&dir.join(format!("{id}_data.f32")), &case.data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
    write_file(&dir.join(format!("{id}_seg.i16")), &case.seg.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
    let locs: Vec<u8> = case.locations.iter().map(|(_, c)| c).chain(case.region_locations.iter().map(|(_, c)| c)).flat_map(|c| c.iter().flat_map(|p| p.iter().flat_map(|v| v.to_le_bytes()))).collect();
    write_file(&dir.join(format!("{id}_locs.u32")), &locs)?;
    write_file(&dir.join(format!("{id}.json")), (serde_json::to_string_pretty(&case.props).expect("serialisable") + "\n").as_bytes())
}

/// Reads a stored case back.
pub fn load(dir: &Path, id: &str) -> Result<Preprocessed, DatasetError> {
    let read = |name: String| std::fs::read(dir.join(&name)).map_err(|e| DatasetError::File { path: dir.join(&name), reason: format!("cannot read: {e}") });
    let props: CaseProperties = serde_json::from_slice(&read(format!("{id}.json"))?).map_err(|e| plan_err(&dir.join(format!("{id}.json")), "(file)", e.to_string()))?;
    let data: Vec<f32> = read(format!("{id}_data.f32"))?.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let seg: Vec<i16> = read(format!("{id}_seg.i16"))?.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
    let raw: Vec<u32> = read(format!("{id}_locs.u32"))?.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if data.len() != props.shape.iter().product::<usize>() || seg.len() != props.shape[1..].iter().product::<usize>() {
        return Err(DatasetError::File { path: dir.join(format!("{id}_data.f32")), reason: "size does not match the shape in the properties".into() });
    }
    if props.class_locations.values().any(|&[o, n]| 3 * (o + n) > raw.len()) {
        return Err(DatasetError::File { path: dir.join(format!("{id}_locs.u32")), reason: "shorter than the class locations in the properties".into() });
    }
    let coords = |o: usize, n: usize| raw[3 * o..3 * (o + n)].chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect::<Vec<_>>();
    let locations = props.class_locations.iter().filter(|(l, _)| !l.starts_with('(')).map(|(l, &[o, n])| (if l == ANNOTATED_KEY { ANNOTATED } else { l.parse().unwrap_or(0) }, coords(o, n))).collect();
    let region_locations = props.class_locations.iter().filter(|(l, _)| l.starts_with('(')).map(|(l, &[o, n])| (l.clone(), coords(o, n))).collect();
    Ok(Preprocessed { data, seg, props, locations, region_locations })
}

/// Preprocesses every training case of a dataset into `out`, skipping complete ones; calls
/// `progress` after each case. Returns (processed now, already done).
///
/// `jobs` cases run at once (each case's voxel loops are parallel anyway; more jobs trade peak
/// memory for throughput on many small cases).
pub fn preprocess_dataset(root: &Path, plans: &Path, configuration: &str, out: &Path, jobs: usize, progress: &(dyn Fn(&str) + Sync)) -> Result<(usize, usize), DatasetError> {
    let json = DatasetJson::read(&root.join("dataset.json"))?;
    let plan = PreprocessPlan::read(plans, configuration)?;
    let (cases, _) = discover(root, &json)?;
    let ignore = json.ignore_label.map(|v| v as i16);
    let regions = json.regions.clone().unwrap_or_default();
    std::fs::create_dir_all(out).map_err(|e| DatasetError::File { path: out.to_path_buf(), reason: format!("cannot create: {e}") })?;
    // Finished cases are kept: only a folder made for this configuration's data may be resumed.
    let plans_json: serde_json::Value = std::fs::read(plans).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    check_made_for(out, &plans_json, configuration)?;
    let todo: Vec<_> = cases.iter().filter(|c| !out.join(format!("{}.json", c.id)).exists()).collect();
    let done = cases.len() - todo.len();
    let run = |case: &&crate::dataset::Case| {
        let images: Vec<PathBuf> = case
            .images
            .iter()
            .enumerate()
            .map(|(ch, p)| p.clone().ok_or_else(|| DatasetError::File { path: root.join("imagesTr"), reason: format!("case `{}` has no channel {ch}", case.id) }))
            .collect::<Result<_, _>>()?;
        let pre = preprocess_case_with(&case.id, &images, case.label.as_deref(), &plan, ignore, &regions)?;
        save(out, &pre)?;
        progress(&case.id);
        Ok::<_, DatasetError>(())
    };
    if jobs <= 1 {
        todo.iter().try_for_each(run)?;
    } else {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(jobs).build().map_err(|e| DatasetError::File { path: out.to_path_buf(), reason: e.to_string() })?;
        pool.install(|| todo.par_iter().try_for_each(run))?;
    }
    for (name, src) in [("dataset.json", root.join("dataset.json")), ("plans.json", plans.to_path_buf())] {
        std::fs::copy(&src, out.join(name)).map_err(|e| DatasetError::File { path: out.join(name), reason: e.to_string() })?;
    }
    // splits_final.json: the raw folder's if it has one (as nnU-Net ≥ 2.4 copies it), else
    // nnU-Net's default 5-fold split when there are enough cases; an existing one is kept.
    let splits = out.join("splits_final.json");
    if !splits.exists() {
        let raw = root.join("splits_final.json");
        if raw.exists() {
            std::fs::copy(&raw, &splits).map_err(|e| DatasetError::File { path: splits.clone(), reason: e.to_string() })?;
        } else if let Ok(folds) = crate::splits::five_fold(&cases.iter().map(|c| c.id.clone()).collect::<Vec<_>>()) {
            write_file(&splits, (serde_json::to_string_pretty(&folds).expect("serialisable") + "\n").as_bytes())?;
        }
    }
    // Where the raw cases are, for what needs them after training (the final validation
    // predicts the validation cases from their images and scores them against their labels).
    let source = root.canonicalize().map_err(|e| DatasetError::File { path: root.to_path_buf(), reason: format!("cannot resolve: {e}") })?;
    write_file(&out.join(SOURCE), (serde_json::to_string_pretty(&serde_json::json!({"raw": source, "configuration": configuration})).expect("serialisable") + "\n").as_bytes())?;
    Ok((todo.len(), done))
}

/// The file in a preprocessed folder naming its raw dataset.
pub const SOURCE: &str = "source.json";

/// Fails when the preprocessed folder `dir` holds cases made for another configuration than
/// `configuration` with other data (configurations sharing a `data_identifier` in `plans`, as
/// `3d_cascade_fullres` shares `3d_fullres`'s, share the folder); a folder that does not record
/// its configuration (`source.json`) passes.
pub fn check_made_for(dir: &Path, plans: &serde_json::Value, configuration: &str) -> Result<(), DatasetError> {
    let path = dir.join(SOURCE);
    let Some(made) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()).and_then(|v| v["configuration"].as_str().map(str::to_string)) else {
        return Ok(());
    };
    let id = |c: &str| crate::plan::configuration(plans, c).ok().and_then(|c| c.get("data_identifier").cloned());
    if made == configuration || (id(&made).is_some() && id(&made) == id(configuration)) {
        return Ok(());
    }
    Err(DatasetError::File {
        path,
        reason: format!("{} holds cases preprocessed for configuration `{made}`, not `{configuration}` (train it with --configuration {made}, or preprocess for `{configuration}` into another folder)", dir.display()),
    })
}

/// The raw dataset a preprocessed folder was made from (`source.json`), if it records one and
/// the folder is still there.
pub fn source_of(preprocessed: &Path) -> Result<Option<PathBuf>, DatasetError> {
    let path = preprocessed.join(SOURCE);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| DatasetError::File { path: path.clone(), reason: format!("not valid JSON: {e}") })?;
    let raw = v["raw"].as_str().map(PathBuf::from).ok_or_else(|| DatasetError::File { path: path.clone(), reason: "no `raw` path".into() })?;
    if !raw.join("dataset.json").exists() {
        return Err(DatasetError::File { path, reason: format!("its raw dataset {} is gone", raw.display()) });
    }
    Ok(Some(raw))
}
