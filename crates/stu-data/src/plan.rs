//! nnU-Net v2.2 experiment planning for `3d_fullres` (`shared/docs/nnunet-pipeline.md` §3),
//! nnU-Net's ResEnc M/L/XL planners (the same rules with ResidualEncoderUNet's VRAM proxy,
//! their reference values and no 5 % batch cap), and STU-Net's released-model preset (§3.11).
//!
//! Everything is in nnU-Net's array axis order; rounding is half-to-even like Python's.

/// `ANISO_THRESHOLD`.
pub const ANISO_THRESHOLD: f64 = 3.0;
/// `UNet_base_num_features`.
pub const BASE_FEATURES: u64 = 32;
/// `UNet_max_features_3d`.
pub const MAX_FEATURES_3D: u64 = 320;
/// `UNet_reference_val_3d`.
pub const REFERENCE_VAL_3D: f64 = 560_000_000.0;
/// `UNet_reference_val_2d`.
pub const REFERENCE_VAL_2D: f64 = 85_000_000.0;
/// `UNet_max_features_2d`.
pub const MAX_FEATURES_2D: u64 = 512;
/// `UNet_reference_val_corresp_bs_2d`.
pub const REFERENCE_BS_2D: f64 = 12.0;
/// `UNet_reference_val_corresp_GB`.
pub const REFERENCE_GB: f64 = 8.0;
/// `UNet_reference_val_corresp_bs_3d`.
pub const REFERENCE_BS_3D: f64 = 2.0;
/// `UNet_featuremap_min_edge_length`.
pub const MIN_FMAP: f64 = 4.0;
/// `UNet_min_batch_size`.
pub const MIN_BATCH: u64 = 2;
/// Batch cap as a fraction of the dataset's voxels.
pub const MAX_DATASET_COVERED: f64 = 0.05;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// numpy's linear percentile.
pub fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let idx = q / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (idx.floor() as usize, idx.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (idx - lo as f64)
}

/// `determine_fullres_target_spacing`: per-axis median, with the anisotropy rule.
pub fn target_spacing(spacings: &[[f64; 3]], shapes: &[[usize; 3]]) -> [f64; 3] {
    let mut target = [0, 1, 2].map(|a| median(spacings.iter().map(|s| s[a]).collect()));
    let size = [0, 1, 2].map(|a| median(shapes.iter().map(|s| s[a] as f64).collect()));
    let w = (0..3).fold(0, |best, a| if target[a] > target[best] { a } else { best });
    let others: Vec<usize> = (0..3).filter(|&a| a != w).collect();
    let max_other = others.iter().map(|&a| target[a]).fold(f64::MIN, f64::max);
    let min_other_size = others.iter().map(|&a| size[a]).fold(f64::MAX, f64::min);
    if target[w] > ANISO_THRESHOLD * max_other && size[w] * ANISO_THRESHOLD < min_other_size {
        let mut t = percentile(spacings.iter().map(|s| s[w]).collect(), 10.0);
        if t < max_other {
            t = max_other.max(t) + 1e-5;
        }
        target[w] = t;
    }
    target
}

/// `determine_transpose`: (forward, backward).
pub fn transpose(target: [f64; 3]) -> ([usize; 3], [usize; 3]) {
    let w = (0..3).fold(0, |best, a| if target[a] > target[best] { a } else { best });
    let rest: Vec<usize> = (0..3).filter(|&a| a != w).collect();
    let forward = [w, rest[0], rest[1]];
    let mut backward = [0; 3];
    for (i, &f) in forward.iter().enumerate() {
        backward[f] = i;
    }
    (forward, backward)
}

/// `compute_new_shape`: round(old_spacing / new_spacing · old_shape), half to even.
pub fn compute_new_shape(shape: [usize; 3], spacing: [f64; 3], new_spacing: [f64; 3]) -> [usize; 3] {
    [0, 1, 2].map(|a| (spacing[a] / new_spacing[a] * shape[a] as f64).round_ties_even() as usize)
}

/// Network topology for a patch (`get_pool_and_conv_props`), for `N` = 3 or 2 axes.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology<const N: usize = 3> {
    /// Pools per axis.
    pub num_pool_per_axis: [u32; N],
    /// Strides, stage 0's `[1; N]` first.
    pub pool_op_kernel_sizes: Vec<[usize; N]>,
    /// Conv kernels per stage.
    pub conv_kernel_sizes: Vec<[usize; N]>,
    /// The patch, padded up to the divisor.
    pub patch_size: [usize; N],
    /// 2^pools per axis.
    pub must_be_divisible_by: [usize; N],
}

/// `get_pool_and_conv_props(spacing, patch, 4, 999999)`. `patch` may be fractional (a median).
pub fn topology<const N: usize>(spacing: [f64; N], patch: [f64; N]) -> Topology<N> {
    let mut cur_spacing = spacing;
    let mut cur_size = patch;
    let mut pools = vec![[1usize; N]];
    let mut convs = Vec::new();
    let mut num_pool = [0u32; N];
    let mut kernel = [1usize; N];
    loop {
        let valid: Vec<usize> = (0..N).filter(|&a| cur_size[a] >= 2.0 * MIN_FMAP).collect();
        if valid.is_empty() {
            break;
        }
        let min_valid = valid.iter().map(|&a| cur_spacing[a]).fold(f64::MAX, f64::min);
        let valid: Vec<usize> = valid.into_iter().filter(|&a| cur_spacing[a] / min_valid < 2.0).collect();
        if valid.len() == 1 && cur_size[valid[0]] < 3.0 * MIN_FMAP {
            break;
        }
        if valid.is_empty() {
            break;
        }
        let min_all = cur_spacing.iter().copied().fold(f64::MAX, f64::min);
        for d in 0..N {
            if kernel[d] != 3 && cur_spacing[d] / min_all < 2.0 {
                kernel[d] = 3;
            }
        }
        let mut pool = [1usize; N];
        for &v in &valid {
            pool[v] = 2;
            num_pool[v] += 1;
            cur_spacing[v] *= 2.0;
            cur_size[v] = (cur_size[v] / 2.0).ceil();
        }
        pools.push(pool);
        convs.push(kernel);
    }
    let div = num_pool.map(|n| 1usize << n);
    let patch_size = std::array::from_fn(|a| {
        let (s, d) = (patch[a], div[a] as f64);
        let padded = s + d - s % d;
        (if s % d == 0.0 { padded - d } else { padded }) as usize
    });
    convs.push([3; N]);
    Topology { num_pool_per_axis: num_pool, pool_op_kernel_sizes: pools, conv_kernel_sizes: convs, patch_size, must_be_divisible_by: div }
}

/// The network a planner sizes its patch for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// PlainConvUNet: 2 convs per stage, encoder and decoder.
    PlainConv,
    /// ResidualEncoderUNet: a stem, residual blocks 1, 3, 4, 6, 6, … per encoder stage, one
    /// conv per decoder stage.
    ResEnc,
}

/// The constants that tell nnU-Net's planners apart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Planner {
    /// The network of the VRAM proxy.
    pub network: Network,
    /// `UNet_reference_val_3d`.
    pub reference_val_3d: f64,
    /// `UNet_reference_val_2d`.
    pub reference_val_2d: f64,
    /// `UNet_reference_val_corresp_GB`.
    pub reference_gb: f64,
    /// `max_dataset_covered`: the batch's share of the dataset's voxels.
    pub max_dataset_covered: f64,
    /// `gpu_memory_target_in_gb` when none is given.
    pub default_gpu_gb: f64,
    /// The default planner shrinks the patch while `estimate / ref_bs · 2 > reference` (so a 2-D
    /// plan is held to batch 2 of the reference's 12); the ResEnc planners while
    /// `estimate > reference`. The same for 3-D, where `ref_bs` is 2.
    pub shrink_per_two: bool,
}

impl Planner {
    /// nnU-Net's default `ExperimentPlanner`.
    pub const DEFAULT: Self = Self { network: Network::PlainConv, reference_val_3d: REFERENCE_VAL_3D, reference_val_2d: REFERENCE_VAL_2D, reference_gb: REFERENCE_GB, max_dataset_covered: MAX_DATASET_COVERED, default_gpu_gb: 8.0, shrink_per_two: true };
    /// `nnUNetPlannerResEncM` (~9–11 GB).
    pub const RESENC_M: Self = Self { network: Network::ResEnc, reference_val_3d: 680_000_000.0, reference_val_2d: 135_000_000.0, reference_gb: 8.0, max_dataset_covered: 1.0, default_gpu_gb: 8.0, shrink_per_two: false };
    /// `nnUNetPlannerResEncL` (~24 GB).
    pub const RESENC_L: Self = Self { network: Network::ResEnc, reference_val_3d: 2_100_000_000.0, reference_val_2d: 380_000_000.0, reference_gb: 24.0, max_dataset_covered: 1.0, default_gpu_gb: 24.0, shrink_per_two: false };
    /// `nnUNetPlannerResEncXL` (~40 GB).
    pub const RESENC_XL: Self = Self { network: Network::ResEnc, reference_val_3d: 3_600_000_000.0, reference_val_2d: 560_000_000.0, reference_gb: 40.0, max_dataset_covered: 1.0, default_gpu_gb: 40.0, shrink_per_two: false };

    fn estimate<const N: usize>(&self, patch: [usize; N], pools: &[[usize; N]], num_label_keys: usize) -> u64 {
        match self.network {
            Network::PlainConv => estimate_vram(patch, pools, num_label_keys),
            Network::ResEnc => estimate_vram_resenc(patch, pools, num_label_keys),
        }
    }
}

/// `UNet_max_features_3d` / `_2d`.
pub const fn max_features(dims: usize) -> u64 {
    if dims == 2 { MAX_FEATURES_2D } else { MAX_FEATURES_3D }
}

/// ResidualEncoderUNet's `compute_conv_feature_map_size` (dynamic_network_architectures 0.4,
/// without deep supervision, as nnU-Net's planner builds it): the stem, two convs per residual
/// block plus the skip's projection in each stage's first block (stage 0's has none), and per
/// decoder stage one conv, the transposed conv and, at full resolution, the head.
pub fn estimate_vram_resenc<const N: usize>(patch: [usize; N], pools: &[[usize; N]], num_label_keys: usize) -> u64 {
    let sizes = stage_voxels(patch, pools);
    let feats = |s: usize| (BASE_FEATURES << s).min(max_features(N));
    let stem = feats(0) * sizes[0];
    let encoder: u64 = sizes.iter().enumerate().map(|(s, &n)| (2 * stu_core::scaling::resenc_blocks(s) as u64 + u64::from(s > 0)) * feats(s) * n).sum();
    let decoder: u64 = (0..pools.len() - 1).map(|s| 2 * feats(s) * sizes[s]).sum();
    stem + encoder + decoder + num_label_keys as u64 * sizes[0]
}

/// Each stage's voxel count for a patch (floor division by each stage's pooling, as
/// `compute_conv_feature_map_size` does).
fn stage_voxels<const N: usize>(patch: [usize; N], pools: &[[usize; N]]) -> Vec<u64> {
    let mut size = patch.map(|v| v as u64);
    pools
        .iter()
        .map(|p| {
            size = std::array::from_fn(|a| size[a] / p[a] as u64);
            size.iter().product::<u64>()
        })
        .collect()
}

/// PlainConvUNet's `compute_conv_feature_map_size` as nnU-Net v2.2 uses it for its VRAM proxy:
/// features min(32·2^s, 320) (512 in 2-D), 2 convs per stage, `num_label_keys` = every key of
/// `labels`.
pub fn estimate_vram<const N: usize>(patch: [usize; N], pools: &[[usize; N]], num_label_keys: usize) -> u64 {
    let sizes = stage_voxels(patch, pools);
    let feats = |s: usize| (BASE_FEATURES << s).min(max_features(N));
    let encoder: u64 = sizes.iter().enumerate().map(|(s, &n)| 2 * feats(s) * n).sum();
    let decoder: u64 = (0..pools.len() - 1).map(|s| 3 * feats(s) * sizes[s]).sum();
    encoder + decoder + num_label_keys as u64 * sizes[0]
}

/// A planned configuration (`3d_fullres`, `3d_lowres`: `N` = 3; `2d`: `N` = 2).
#[derive(Debug, Clone, PartialEq)]
pub struct Configuration<const N: usize = 3> {
    /// Target spacing (transposed order).
    pub spacing: [f64; N],
    /// Patch.
    pub patch_size: [usize; N],
    /// Batch.
    pub batch_size: u64,
    /// Median shape after resampling (transposed order).
    pub median_image_size_in_voxels: [f64; N],
    /// Topology.
    pub topology: Topology<N>,
    /// The VRAM proxy of the final patch.
    pub vram_estimate: u64,
}

/// Inputs of configuration planning.
#[derive(Debug, Clone)]
pub struct PlanInput<const N: usize = 3> {
    /// Target spacing, transposed.
    pub spacing: [f64; N],
    /// Median shape after resampling, transposed.
    pub median_shape: [f64; N],
    /// Keys of `labels` in dataset.json (background and ignore included).
    pub num_label_keys: usize,
    /// nnU-Net's `approximate_n_voxels_dataset`: median voxels × training cases (for
    /// `3d_lowres`, the unrounded median's voxels), which caps the batch at 5 % of the dataset.
    pub dataset_voxels: f64,
    /// `gpu_memory_target_in_gb`.
    pub gpu_memory_gb: f64,
}

/// `get_plans_for_configuration` of `planner`, 3-D or (`N` = 2, nnU-Net's `2d`: the in-plane
/// axes of the full-resolution spacing and median shape) 2-D.
pub fn plan_configuration<const N: usize>(input: &PlanInput<N>, planner: &Planner) -> Configuration<N> {
    assert!(N == 2 || N == 3, "nnU-Net plans 2-D and 3-D configurations");
    let PlanInput { spacing, median_shape, num_label_keys, dataset_voxels, gpu_memory_gb } = *input;
    let tmp = spacing.map(|s| 1.0 / s);
    // A box of 256³ (2-D: 2048²) voxels, isotropic in mm.
    let scale = if N == 3 { (256f64.powi(3) / tmp.iter().product::<f64>()).cbrt() } else { (2048f64.powi(2) / tmp.iter().product::<f64>()).powf(0.5) };
    let initial: [f64; N] = std::array::from_fn(|a| (tmp[a] * scale).round_ties_even().min(median_shape[a]));
    let mut topo = topology(spacing, initial);
    let mut estimate = planner.estimate(topo.patch_size, &topo.pool_op_kernel_sizes, num_label_keys);
    let (reference_val, ref_bs) = if N == 3 { (planner.reference_val_3d, REFERENCE_BS_3D) } else { (planner.reference_val_2d, REFERENCE_BS_2D) };
    let reference = reference_val * (gpu_memory_gb / planner.reference_gb);
    let too_large = |estimate: u64| if planner.shrink_per_two { estimate as f64 / ref_bs * 2.0 > reference } else { estimate as f64 > reference };
    while too_large(estimate) {
        let ratio: [f64; N] = std::array::from_fn(|a| topo.patch_size[a] as f64 / median_shape[a]);
        // Stable argsort, last element: the highest axis among the largest ratios.
        let axis = (0..N).fold(0, |best, a| if ratio[a] >= ratio[best] { a } else { best });
        let mut trial = topo.patch_size.map(|v| v as f64);
        trial[axis] -= topo.must_be_divisible_by[axis] as f64;
        let div = topology(spacing, trial).must_be_divisible_by;
        let mut patch = topo.patch_size.map(|v| v as f64);
        patch[axis] -= div[axis] as f64;
        topo = topology(spacing, patch);
        estimate = planner.estimate(topo.patch_size, &topo.pool_op_kernel_sizes, num_label_keys);
    }
    let bs = (reference / estimate as f64 * ref_bs).round_ties_even() as u64;
    let bs5 = (dataset_voxels * planner.max_dataset_covered / topo.patch_size.iter().map(|&v| v as f64).product::<f64>()).round_ties_even() as u64;
    Configuration {
        spacing,
        patch_size: topo.patch_size,
        batch_size: bs.min(bs5).max(MIN_BATCH),
        median_image_size_in_voxels: median_shape,
        topology: topo,
        vram_estimate: estimate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nnU-Net 2.8.1's whole `plan_experiment` (`tests/fixtures/make_lowres_planner_fixture.py`):
    /// which configurations it writes, and every planned number of `2d`, `3d_fullres` and
    /// `3d_lowres` (created, created and then dropped, or never tried), for the default, the
    /// ResEnc M and the ResEnc L planner.
    #[test]
    fn lowres_and_cascade_configurations_equal_nnunets() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lowres_planner.json");
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut created, mut twod) = (0, 0);
        for (i, row) in doc["rows"].as_array().unwrap().iter().enumerate() {
            let json_path = dir.path().join(format!("{i}.json"));
            std::fs::write(&json_path, row["dataset"].to_string()).unwrap();
            let json = crate::dataset::DatasetJson::read(&json_path).unwrap();
            let f = &row["fingerprint"];
            let props: crate::fingerprint::IntensityProperties = {
                let p = &f["foreground_intensity_properties_per_channel"]["0"];
                let g = |k: &str| p[k].as_f64().unwrap();
                crate::fingerprint::IntensityProperties { mean: g("mean"), median: g("median"), std: g("std"), min: g("min"), max: g("max"), percentile_99_5: g("percentile_99_5"), percentile_00_5: g("percentile_00_5") }
            };
            let fp = crate::fingerprint::Fingerprint {
                spacings: serde_json::from_value(f["spacings"].clone()).unwrap(),
                shapes_after_crop: serde_json::from_value(f["shapes_after_crop"].clone()).unwrap(),
                foreground_intensity_properties_per_channel: [("0".to_string(), props)].into(),
                median_relative_size_after_cropping: 1.0,
            };
            let preset = Preset::parse(row["preset"].as_str().unwrap()).unwrap();
            let ours = plans_json("Dataset_x", &json, &fp, preset, None);
            let theirs = row["configurations"].as_object().unwrap();
            let at = format!("row {i} ({})", row["preset"]);
            let names = |m: &serde_json::Map<String, serde_json::Value>| m.keys().cloned().collect::<std::collections::BTreeSet<_>>();
            assert_eq!(names(ours["configurations"].as_object().unwrap()), names(theirs), "{at}");
            for (name, t) in theirs {
                let o = &ours["configurations"][name];
                if name == "3d_cascade_fullres" {
                    assert_eq!(o, t, "{at}");
                    continue;
                }
                created += usize::from(name == "3d_lowres");
                for key in ["data_identifier", "batch_size", "patch_size", "median_image_size_in_voxels", "batch_dice", "next_stage"] {
                    let t = t.get(key).cloned().unwrap_or(serde_json::Value::Null);
                    let o = o.get(key).cloned().unwrap_or(serde_json::Value::Null);
                    let num = |v: &serde_json::Value| v.as_array().map(|a| a.iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>());
                    match (num(&o), num(&t)) {
                        (Some(a), Some(b)) => assert_eq!(a, b, "{at} {name}.{key}"),
                        _ => assert_eq!(o, t, "{at} {name}.{key}"),
                    }
                }
                let spacing = |v: &serde_json::Value| serde_json::from_value::<Vec<f64>>(v["spacing"].clone()).unwrap();
                assert_eq!(spacing(o).len(), spacing(t).len(), "{at} {name}.spacing");
                for (a, b) in spacing(o).iter().zip(spacing(t)) {
                    assert!((a - b).abs() < 1e-12, "{at} {name}.spacing {a} {b}");
                }
                assert_eq!(o["pool_op_kernel_sizes"], t["strides"], "{at} {name}");
                assert_eq!(o["conv_kernel_sizes"], t["kernel_sizes"], "{at} {name}");
                let max = o["unet_max_num_features"].as_u64().unwrap();
                let features: Vec<u64> = (0..o["pool_op_kernel_sizes"].as_array().unwrap().len()).map(|s| (BASE_FEATURES << s).min(max)).collect();
                assert_eq!(serde_json::json!(features), t["features_per_stage"], "{at} {name}");
                twod += usize::from(name == "2d");
            }
        }
        assert_eq!(created, 8, "3d_lowres: three datasets under the default planner, four under ResEnc M, one under ResEnc L (its larger patch covers the others)");
        assert_eq!(twod, 21, "a 2d configuration for every dataset and planner");
    }

    #[test]
    fn configuration_inheritance_is_resolved_as_nnunets() {
        let plans = serde_json::json!({"configurations": {
            "3d_fullres": {"patch_size": [128, 128, 128], "batch_size": 2, "data_identifier": "P_3d_fullres"},
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres", "batch_size": 3},
            "a": {"inherits_from": "b"}, "b": {"inherits_from": "a"}, "c": {"inherits_from": "gone"},
        }});
        let c = configuration(&plans, "3d_cascade_fullres").unwrap();
        assert_eq!(c["patch_size"], serde_json::json!([128, 128, 128]));
        assert_eq!(c["batch_size"], 3);
        assert_eq!(c["previous_stage"], "3d_lowres");
        assert_eq!(c["data_identifier"], "P_3d_fullres");
        assert_eq!(configuration(&plans, "3d_fullres").unwrap()["batch_size"], 2);
        assert!(configuration(&plans, "a").unwrap_err().contains("cycle"));
        assert!(configuration(&plans, "c").unwrap_err().contains("`gone`"));
        assert!(configuration(&plans, "2d").unwrap_err().contains("configurations.2d"));
    }

    #[test]
    fn planner_test_vectors() {
        // nnunet-pipeline.md §3.10: (spacing, median, label keys, cases) → (patch, bs, pools, convs, estimate)
        type Row = ([f64; 3], [f64; 3], usize, usize, [usize; 3], u64, Vec<[usize; 3]>, Vec<[usize; 3]>, u64);
        let rows: Vec<Row> = vec![
            ([1.0; 3], [36.0, 50.0, 35.0], 3, 260, [40, 56, 40], 9, [vec![[1, 1, 1]], vec![[2, 2, 2]; 3]].concat(), vec![[3, 3, 3]; 4], 19_174_400),
            ([1.0; 3], [138.0, 169.0, 138.0], 4, 484, [128, 128, 128], 2, [vec![[1, 1, 1]], vec![[2, 2, 2]; 5]].concat(), vec![[3, 3, 3]; 6], 454_893_568),
            ([1.5; 3], [228.0, 228.0, 240.0], 105, 1204, [112, 112, 128], 2, [vec![[1, 1, 1]], vec![[2, 2, 2]; 4]].concat(), vec![[3, 3, 3]; 5], 510_039_040),
            (
                [3.0, 0.78, 0.78],
                [100.0, 512.0, 512.0],
                3,
                100,
                [40, 224, 224],
                2,
                vec![[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                [vec![[1, 3, 3]], vec![[3, 3, 3]; 5]].concat(),
                539_611_520,
            ),
        ];
        for (spacing, median_shape, keys, n, patch, bs, pools, convs, est) in rows {
            let c = plan_configuration(&PlanInput { spacing, median_shape, num_label_keys: keys, dataset_voxels: median_shape.iter().product::<f64>() * n as f64, gpu_memory_gb: 8.0 }, &Planner::DEFAULT);
            assert_eq!(c.patch_size, patch, "{spacing:?}");
            assert_eq!(c.batch_size, bs, "{spacing:?}");
            assert_eq!(c.topology.pool_op_kernel_sizes, pools, "{spacing:?}");
            assert_eq!(c.topology.conv_kernel_sizes, convs, "{spacing:?}");
            assert_eq!(c.vram_estimate, est, "{spacing:?}");
        }
    }

    /// nnU-Net 2.8.1's ResEnc M/L/XL planners on the same rows
    /// (`tests/fixtures/make_resenc_planner_fixture.py`): patch, batch, topology, VRAM proxy.
    #[test]
    fn resenc_planner_test_vectors() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/resenc_planner.json");
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let v = |x: &serde_json::Value| -> Vec<[usize; 3]> { serde_json::from_value(x.clone()).unwrap() };
        for (name, planner) in [("M", Planner::RESENC_M), ("L", Planner::RESENC_L), ("XL", Planner::RESENC_XL)] {
            for row in doc["presets"][name].as_array().unwrap() {
                let f = |k: &str| -> [f64; 3] { serde_json::from_value(row[k].clone()).unwrap() };
                let input = PlanInput {
                    spacing: f("spacing"),
                    median_shape: f("median_shape"),
                    num_label_keys: row["num_label_keys"].as_u64().unwrap() as usize,
                    dataset_voxels: f("median_shape").iter().product::<f64>() * row["num_training"].as_f64().unwrap(),
                    gpu_memory_gb: planner.default_gpu_gb,
                };
                let c = plan_configuration(&input, &planner);
                let at = format!("ResEnc {name} {:?}", input.spacing);
                assert_eq!(c.patch_size, serde_json::from_value::<[usize; 3]>(row["patch_size"].clone()).unwrap(), "{at}");
                assert_eq!(c.batch_size, row["batch_size"].as_u64().unwrap(), "{at}");
                assert_eq!(c.topology.pool_op_kernel_sizes, v(&row["strides"]), "{at}");
                assert_eq!(c.topology.conv_kernel_sizes, v(&row["kernel_sizes"]), "{at}");
                assert_eq!(c.vram_estimate, row["vram_estimate"].as_u64().unwrap(), "{at}");
                let n = c.topology.pool_op_kernel_sizes.len();
                assert_eq!(stu_core::scaling::RESENC_BLOCKS[..n].to_vec(), serde_json::from_value::<Vec<usize>>(row["n_blocks_per_stage"].clone()).unwrap(), "{at}");
            }
        }
    }

    #[test]
    fn target_spacing_transpose_and_new_shape_vectors() {
        let sp = |z: f64| [z, 0.7, 0.7];
        let mut spacings = vec![sp(5.0); 6];
        spacings.extend(vec![sp(2.5); 4]);
        let shapes = vec![[40, 512, 512]; 10];
        assert_eq!(target_spacing(&spacings, &shapes), [2.5, 0.7, 0.7]);
        let mut spacings = vec![sp(5.0); 9];
        spacings.push(sp(0.5));
        let t = target_spacing(&spacings, &shapes);
        assert!((t[0] - 4.55).abs() < 1e-9, "{t:?}");
        assert_eq!(target_spacing(&vec![sp(5.0); 10], &vec![[200, 512, 512]; 10]), [5.0, 0.7, 0.7]);
        assert_eq!(transpose([0.7, 0.7, 2.5]), ([2, 0, 1], [1, 2, 0]));
        assert_eq!(transpose([1.0, 1.0, 1.0]), ([0, 1, 2], [0, 1, 2]));
        assert_eq!(compute_new_shape([951, 512, 512], [0.8000490, 0.7430, 0.7430], [0.8, 0.6830, 0.6830]), [951, 557, 557]);
    }
}

/// nnU-Net's (≥ 2.4) `3d_lowres` configuration, if it creates one (which also turns
/// `batch_dice` on for `3d_fullres`): grow the spacing by 1.03 (anisotropic axes first) until the
/// lowres patch covers ≥ 25 % of the lowres median image, then drop it when the full-resolution
/// median has fewer than 2× its voxels; each lowres configuration is `planner`'s, planned for
/// the rounded median shape and the unrounded median's voxels × cases.
pub fn plan_lowres(spacing: [f64; 3], median_shape: [f64; 3], patch: [usize; 3], num_label_keys: usize, num_training: usize, gpu_memory_gb: f64, planner: &Planner) -> Option<Configuration> {
    const THRESHOLD: f64 = 0.25;
    const FACTOR: f64 = 1.03;
    let full_voxels: f64 = median_shape.iter().product();
    let mut median_voxels = full_voxels;
    let mut patch_voxels = patch.iter().map(|&v| v as f64).product::<f64>();
    let mut lowres = spacing;
    let mut planned = None;
    while patch_voxels / median_voxels < THRESHOLD {
        let max = lowres.iter().copied().fold(f64::MIN, f64::max);
        if lowres.iter().any(|&s| max / s > 2.0) {
            for s in lowres.iter_mut() {
                if max / *s > 2.0 {
                    *s *= FACTOR;
                }
            }
        } else {
            lowres = lowres.map(|s| s * FACTOR);
        }
        let shape = [0, 1, 2].map(|a| spacing[a] / lowres[a] * median_shape[a]);
        median_voxels = shape.iter().product();
        let cfg = plan_configuration(
            &PlanInput { spacing: lowres, median_shape: shape.map(f64::round_ties_even), num_label_keys, dataset_voxels: median_voxels * num_training as f64, gpu_memory_gb },
            planner,
        );
        patch_voxels = cfg.patch_size.iter().map(|&v| v as f64).product();
        planned = Some(cfg);
    }
    planned.filter(|_| full_voxels / median_voxels >= 2.0)
}

/// `configurations.<name>` of a plans file with nnU-Net's inheritance resolved
/// (`PlansManager.get_configuration`): a configuration with `inherits_from` (as
/// `3d_cascade_fullres` from `3d_fullres`) is its parent's keys overridden by its own. The error
/// names the missing configuration or the cycle.
pub fn configuration(plans: &serde_json::Value, name: &str) -> Result<serde_json::Value, String> {
    let mut chain = vec![name.to_string()];
    let mut merged = serde_json::Map::new();
    let mut layers = Vec::new();
    let mut at = name.to_string();
    loop {
        let c = plans
            .get("configurations")
            .and_then(|c| c.get(&at))
            .ok_or_else(|| match chain.len() {
                1 => format!("no configuration `configurations.{at}`"),
                _ => format!("`configurations.{}.inherits_from` names `{at}`, which does not exist", chain[chain.len() - 2]),
            })?
            .as_object()
            .ok_or_else(|| format!("`configurations.{at}` is not an object"))?;
        layers.push(c);
        match c.get("inherits_from").and_then(|p| p.as_str()) {
            None => break,
            Some(parent) => {
                if chain.iter().any(|c| c == parent) {
                    return Err(format!("`configurations.{at}.inherits_from` makes a cycle: {} → {parent}", chain.join(" → ")));
                }
                chain.push(parent.to_string());
                at = parent.to_string();
            }
        }
    }
    for layer in layers.into_iter().rev() {
        merged.extend(layer.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    lift_2d(&mut merged);
    Ok(serde_json::Value::Object(merged))
}

/// Whether a configuration as [`configuration`] returns it was planned in 2-D (nnU-Net's `2d`).
pub fn is_2d(conf: &serde_json::Value) -> bool {
    conf.get(SPATIAL_DIMS).and_then(|v| v.as_u64()) == Some(2)
}

/// The key [`configuration`] adds to a 2-D configuration it lifts.
pub const SPATIAL_DIMS: &str = "spatial_dims";

/// A 2-D configuration (nnU-Net's `2d`: 2-D patch, kernels and strides) is read as 3-D of depth 1:
/// its patch, kernels and strides get a leading 1, so a 3-D network with `[1, k, k]` kernels
/// and `[1, s, s]` strides is exactly nnU-Net's 2-D one on each slice, and patches are single
/// slices. Its `spacing` keeps its two in-plane entries (each case keeps its own slice
/// spacing, [`crate::preprocess::PreprocessPlan`]), and `spatial_dims` says 2.
fn lift_2d(conf: &mut serde_json::Map<String, serde_json::Value>) {
    let two = |v: &serde_json::Value| v.as_array().is_some_and(|a| a.len() == 2);
    if !conf.get("patch_size").is_some_and(two) {
        return;
    }
    let lift = |v: &mut serde_json::Value| {
        if let Some(a) = v.as_array_mut().filter(|a| a.len() == 2) {
            a.insert(0, 1.into());
        }
    };
    let lift_all = |v: Option<&mut serde_json::Value>| {
        if let Some(list) = v.and_then(|v| v.as_array_mut()) {
            list.iter_mut().for_each(lift);
        }
    };
    conf.get_mut("patch_size").map(lift);
    lift_all(conf.get_mut("pool_op_kernel_sizes"));
    lift_all(conf.get_mut("conv_kernel_sizes"));
    if let Some(arch) = conf.get_mut("architecture").and_then(|a| a.get_mut("arch_kwargs")) {
        lift_all(arch.get_mut("strides"));
        lift_all(arch.get_mut("kernel_sizes"));
    }
    conf.insert(SPATIAL_DIMS.into(), 2.into());
}

/// Planning presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// nnU-Net v2.2's default planner.
    Nnunet,
    /// nnU-Net's ResEnc planners (`nnUNetPlannerResEncM`, `L`, `XL`): ResidualEncoderUNet.
    ResEncM,
    /// See [`Preset::ResEncM`].
    ResEncL,
    /// See [`Preset::ResEncM`].
    ResEncXL,
    /// The released STU-Net models' plan: 1.5 mm isotropic, 128³, batch 2, per-image z-score,
    /// strides `[2,2,2]×4, [1,1,2]` (stunet.md §1.6, nnunet-pipeline.md §3.11).
    Stunet,
}

impl Preset {
    /// By name: `nnunet`, `resenc-m`, `resenc-l`, `resenc-xl`, `stunet`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "nnunet" => Self::Nnunet,
            "resenc-m" => Self::ResEncM,
            "resenc-l" => Self::ResEncL,
            "resenc-xl" => Self::ResEncXL,
            "stunet" => Self::Stunet,
            _ => return None,
        })
    }

    /// The names [`Preset::parse`] takes.
    pub const NAMES: [&'static str; 5] = ["nnunet", "resenc-m", "resenc-l", "resenc-xl", "stunet"];

    /// The nnU-Net planner behind a preset (`None` for STU-Net's fixed plan).
    pub fn planner(self) -> Option<Planner> {
        match self {
            Self::Nnunet => Some(Planner::DEFAULT),
            Self::ResEncM => Some(Planner::RESENC_M),
            Self::ResEncL => Some(Planner::RESENC_L),
            Self::ResEncXL => Some(Planner::RESENC_XL),
            Self::Stunet => None,
        }
    }
}

/// nnU-Net v2.2's channel-name → normalisation rule.
pub fn normalization_scheme(channel_name: &str) -> &'static str {
    match channel_name {
        "CT" => "CTNormalization",
        "noNorm" => "NoNormalization",
        "zscore" => "ZScoreNormalization",
        "rescale_to_0_1" => "RescaleTo01Normalization",
        "rgb_to_0_1" => "RGBTo01Normalization",
        _ => "ZScoreNormalization",
    }
}

/// A configuration's numbers as plain lists (2-D or 3-D alike) for `plans.json`.
struct Parts {
    batch_size: u64,
    patch_size: Vec<usize>,
    median_image_size_in_voxels: Vec<f64>,
    spacing: Vec<f64>,
    num_pool_per_axis: Vec<u32>,
    pool_op_kernel_sizes: Vec<Vec<usize>>,
    conv_kernel_sizes: Vec<Vec<usize>>,
}

impl Parts {
    fn of<const N: usize>(c: &Configuration<N>) -> Self {
        let lists = |v: &[[usize; N]]| v.iter().map(|a| a.to_vec()).collect();
        Self {
            batch_size: c.batch_size,
            patch_size: c.patch_size.to_vec(),
            median_image_size_in_voxels: c.median_image_size_in_voxels.to_vec(),
            spacing: c.spacing.to_vec(),
            num_pool_per_axis: c.topology.num_pool_per_axis.to_vec(),
            pool_op_kernel_sizes: lists(&c.topology.pool_op_kernel_sizes),
            conv_kernel_sizes: lists(&c.topology.conv_kernel_sizes),
        }
    }
}

/// Builds `plans.json` (nnU-Net v2.2 field names) from a fingerprint.
pub fn plans_json(
    dataset_name: &str,
    json: &crate::dataset::DatasetJson,
    fp: &crate::fingerprint::Fingerprint,
    preset: Preset,
    gpu_memory_gb: Option<f64>,
) -> serde_json::Value {
    let planner = preset.planner();
    let gpu_memory_gb = gpu_memory_gb.unwrap_or(planner.map_or(8.0, |p| p.default_gpu_gb));
    let target = match preset {
        Preset::Stunet => [1.5; 3],
        _ => target_spacing(&fp.spacings, &fp.shapes_after_crop),
    };
    let (forward, backward) = match preset {
        Preset::Stunet => ([0, 1, 2], [0, 1, 2]),
        _ => transpose(target),
    };
    let tr = |v: [f64; 3]| forward.map(|a| v[a]);
    let new_shapes: Vec<[usize; 3]> = fp.spacings.iter().zip(&fp.shapes_after_crop).map(|(s, sh)| compute_new_shape(*sh, *s, target)).collect();
    let median_shape = tr([0, 1, 2].map(|a| median(new_shapes.iter().map(|s| s[a] as f64).collect())));
    let median_spacing = tr([0, 1, 2].map(|a| median(fp.spacings.iter().map(|s| s[a]).collect())));
    let median_orig_shape = tr([0, 1, 2].map(|a| median(fp.shapes_after_crop.iter().map(|s| s[a] as f64).collect())));
    let spacing = tr(target);
    let schemes: Vec<&str> = json.channel_names.iter().map(|c| match preset {
        Preset::Stunet => "ZScoreNormalization",
        _ => normalization_scheme(c),
    }).collect();
    let use_mask: Vec<bool> = schemes
        .iter()
        .map(|s| planner.is_some() && *s == "ZScoreNormalization" && fp.median_relative_size_after_cropping < 0.75)
        .collect();
    // (the released STU-Net plan has no VRAM estimate)
    let (fullres, estimate) = match planner {
        Some(p) => {
            let c = plan_configuration(&PlanInput { spacing, median_shape, num_label_keys: json.labels.len(), dataset_voxels: median_shape.iter().product::<f64>() * json.num_training as f64, gpu_memory_gb }, &p);
            let e = c.vram_estimate;
            (c, Some(e))
        }
        None => {
            let mut pools = vec![[1, 1, 1]];
            pools.extend([[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 2]]);
            let topology = Topology { num_pool_per_axis: [4, 4, 5], pool_op_kernel_sizes: pools, conv_kernel_sizes: vec![[3; 3]; 6], patch_size: [128; 3], must_be_divisible_by: [16, 16, 32] };
            (Configuration { spacing, patch_size: [128; 3], batch_size: 2, median_image_size_in_voxels: median_shape, topology, vram_estimate: 0 }, None)
        }
    };
    let lowres = planner.and_then(|p| plan_lowres(spacing, median_shape, fullres.patch_size, json.labels.len(), json.num_training, gpu_memory_gb, &p));
    let plans_name = match preset {
        Preset::Nnunet => "nnUNetPlans",
        Preset::ResEncM => "nnUNetResEncUNetMPlans",
        Preset::ResEncL => "nnUNetResEncUNetLPlans",
        Preset::ResEncXL => "nnUNetResEncUNetXLPlans",
        Preset::Stunet => "STUNetPlans",
    };
    let resenc = planner.is_some_and(|p| p.network == Network::ResEnc);
    let resampling = |is_seg: bool, order: u32| serde_json::json!({"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": null});
    let configuration = |data_identifier: String, c: &Parts, estimate: Option<u64>, batch_dice: bool| {
        let n_stages = c.pool_op_kernel_sizes.len();
        serde_json::json!({
            "data_identifier": data_identifier,
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": c.batch_size,
            "patch_size": c.patch_size,
            "median_image_size_in_voxels": c.median_image_size_in_voxels,
            "spacing": c.spacing,
            "normalization_schemes": schemes,
            "use_mask_for_norm": use_mask,
            "UNet_class_name": if resenc { "ResidualEncoderUNet" } else { "PlainConvUNet" },
            "UNet_base_num_features": BASE_FEATURES,
            "n_conv_per_stage_encoder": if resenc { stu_core::scaling::RESENC_BLOCKS[..n_stages].to_vec() } else { vec![2; n_stages] },
            "n_conv_per_stage_decoder": vec![if resenc { 1 } else { 2 }; n_stages - 1],
            "num_pool_per_axis": c.num_pool_per_axis,
            "pool_op_kernel_sizes": c.pool_op_kernel_sizes,
            "conv_kernel_sizes": c.conv_kernel_sizes,
            "unet_max_num_features": max_features(c.patch_size.len()),
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": resampling(false, 3),
            "resampling_fn_seg_kwargs": resampling(true, 1),
            "resampling_fn_probabilities_kwargs": resampling(false, 1),
            "batch_dice": batch_dice,
            "vram_estimate": estimate,
        })
    };
    // The ResEnc planners share the default planner's full-resolution data (their identifier);
    // a lowres configuration is their own.
    let full_identifier = if resenc { "nnUNetPlans_3d_fullres".to_string() } else { format!("{plans_name}_3d_fullres") };
    let mut configurations = serde_json::Map::new();
    if let Some(p) = planner {
        // nnU-Net's `2d`: the in-plane axes of the full-resolution spacing and median shape,
        // capped by the same dataset voxels; always batch Dice. (Not for STU-Net's preset: its
        // networks are 3-D.)
        let input = PlanInput { spacing: [spacing[1], spacing[2]], median_shape: [median_shape[1], median_shape[2]], num_label_keys: json.labels.len(), dataset_voxels: median_shape.iter().product::<f64>() * json.num_training as f64, gpu_memory_gb };
        let c = plan_configuration(&input, &p);
        let identifier = if resenc { "nnUNetPlans_2d".to_string() } else { format!("{plans_name}_2d") };
        configurations.insert("2d".into(), configuration(identifier, &Parts::of(&c), Some(c.vram_estimate), true));
    }
    if let Some(low) = &lowres {
        let mut c = configuration(format!("{plans_name}_3d_lowres"), &Parts::of(low), Some(low.vram_estimate), false);
        c["next_stage"] = "3d_cascade_fullres".into();
        configurations.insert("3d_lowres".into(), c);
    }
    configurations.insert("3d_fullres".into(), configuration(full_identifier, &Parts::of(&fullres), estimate, lowres.is_some()));
    if lowres.is_some() {
        configurations.insert("3d_cascade_fullres".into(), serde_json::json!({"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}));
    }
    serde_json::json!({
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": median_spacing,
        "original_median_shape_after_transp": median_orig_shape,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": forward,
        "transpose_backward": backward,
        "configurations": configurations,
        "experiment_planner_used": match preset {
            Preset::Nnunet => "ExperimentPlanner (stu, nnU-Net v2.2 rules)",
            Preset::ResEncM => "nnUNetPlannerResEncM (stu)",
            Preset::ResEncL => "nnUNetPlannerResEncL (stu)",
            Preset::ResEncXL => "nnUNetPlannerResEncXL (stu)",
            Preset::Stunet => "STU-Net released-model preset (stu)",
        },
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": fp.foreground_intensity_properties_per_channel,
    })
}
