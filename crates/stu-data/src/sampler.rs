//! nnU-Net's patch sampling (`shared/docs/nnunet-pipeline.md` §5.2): foreground oversampling,
//! bounds that allow the patch to stick out of the image, crop and pad (data 0, seg −1).

use stu_core::rng::SplitMix64;

use crate::preprocess::Preprocessed;

/// nnU-Net's `oversample_foreground_percent`.
pub const OVERSAMPLE_FOREGROUND: f64 = 0.33;

/// nnU-Net's "dummy 2-D" augmentation for anisotropic patches: `max(patch) / patch[0] > 3`.
pub fn dummy_2d(patch: [usize; 3]) -> bool {
    *patch.iter().max().expect("3 axes") as f64 / patch[0] as f64 > crate::plan::ANISO_THRESHOLD
}

/// A 2-D configuration's patch, read as 3-D (one slice deep, `plan::configuration`): its
/// augmentation is nnU-Net's 2-D one, which the dummy-2-D path computes exactly on one slice.
pub fn planar(patch: [usize; 3]) -> bool {
    patch[0] == 1
}

/// Mirroring axes in this crate's depth-first numbering of a patch, from nnU-Net's numbering of
/// the configuration's spatial axes (`None`: all of them): a 2-D configuration's one-slice
/// patches (`planar`) have their two in-plane axes at 1 and 2.
pub fn mirror_axes(planar: bool, axes: Option<&[usize]>) -> Vec<usize> {
    let lift = usize::from(planar);
    match axes {
        Some(axes) => axes.iter().map(|a| a + lift).collect(),
        None => (lift..3).collect(),
    }
}

/// Whether `axes` names spatial axes below `dims` (3, or 2 for a 2-D configuration), each once:
/// what [`mirror_axes`] takes in nnU-Net's numbering.
pub fn valid_axes(axes: &[usize], dims: usize) -> bool {
    axes.iter().enumerate().all(|(i, a)| *a < dims && !axes[..i].contains(a))
}

/// The rotation range (radians, about axis 0) of dummy-2-D and 2-D augmentation: ±180°, but
/// ±15° for a 2-D patch whose in-plane aspect exceeds 1.5 (`configure_rotation_dummyDA_mirroring_and_inital_patch_size`).
pub fn in_plane_rotation(patch: [usize; 3]) -> f64 {
    let (lo, hi) = (patch[1].min(patch[2]) as f64, patch[1].max(patch[2]) as f64);
    if planar(patch) && hi / lo > 1.5 { 15f64.to_radians() } else { std::f64::consts::PI }
}

/// The enlarged patch loaded before spatial augmentation (nnU-Net's `get_patch_size` as the v2
/// trainer calls it): the extent of the final patch rotated by up to 30° about each axis (or up
/// to 180° about axis 0 only, in dummy-2-D mode, keeping axis 0; a 2-D patch's own range, see
/// [`in_plane_rotation`]), divided by the smallest scale 0.85, truncated. `two_d`: whether
/// augmentation runs in dummy-2-D mode ([`dummy_2d`] unless a trainer turns it off).
pub fn initial_patch_size(patch: [usize; 3], two_d: bool) -> [usize; 3] {
    let quarter = std::f64::consts::FRAC_PI_2;
    let (rx, ry, rz) = if two_d { (in_plane_rotation(patch).min(quarter), 0.0, 0.0) } else { (30f64.to_radians(), 30f64.to_radians(), 30f64.to_radians()) };
    let c = patch.map(|v| v as f64);
    // batchgenerators' rotate_coords_3d: coords · R, with R = Rx·Ry·Rz (each applied alone here).
    let rot = |m: [[f64; 3]; 3]| [0, 1, 2].map(|j| (0..3).map(|i| c[i] * m[i][j]).sum::<f64>().abs());
    let (sx, cx) = rx.sin_cos();
    let (sy, cy) = ry.sin_cos();
    let (sz, cz) = rz.sin_cos();
    let mats = [
        [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]],
        [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]],
        [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]],
    ];
    let mut shape = c;
    for m in mats {
        let r = rot(m);
        for a in 0..3 {
            shape[a] = shape[a].max(r[a]);
        }
    }
    let mut out = shape.map(|v| (v / 0.85) as usize);
    if two_d {
        out[0] = patch[0];
    }
    out
}

/// Whether sample `j` of a batch of `b` is forced to contain foreground:
/// `j ≥ round(b · (1 − 0.33))`, rounding half to even.
pub fn forced_foreground(j: usize, b: usize) -> bool {
    forced_at(j, b, OVERSAMPLE_FOREGROUND)
}

/// [`forced_foreground`] with the fraction `p` (nnU-Net's `oversample_foreground_percent`).
pub fn forced_at(j: usize, b: usize, p: f64) -> bool {
    j as f64 >= (b as f64 * (1.0 - p)).round_ties_even()
}

/// How a batch's samples are chosen to contain foreground (nnU-Net's
/// `oversample_foreground_percent` and `probabilistic_oversampling`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Oversampling {
    /// The last samples of the (global) batch, a fraction `p` of it by [`forced_at`]'s
    /// rounding (nnU-Net's default, `p` 0.33: at least one sample per batch of two).
    BatchPosition(f64),
    /// Each sample on its own with probability `p` (`nnUNetTrainer_probabilisticOversampling`).
    Probabilistic(f64),
}

impl Default for Oversampling {
    fn default() -> Self {
        Self::BatchPosition(OVERSAMPLE_FOREGROUND)
    }
}

impl Oversampling {
    /// nnU-Net's fraction for probabilistic sampling when a trainer leaves it to the batch
    /// size (`nnUNetTrainer_probabilisticOversampling`): the share of a batch of `b` the
    /// default rule forces (½ for a batch of 2), so that both sample as much foreground.
    pub fn effective_fraction(b: usize) -> f64 {
        (0..b).filter(|&j| forced_foreground(j, b)).count() as f64 / b as f64
    }
}

/// Per-axis `(lb, ub)` for the patch's lower corner. `patch` is the loaded (enlarged) patch P,
/// `final_patch` the network's F; `need = P − F`, raised to `P − shape` where the image is
/// too small.
pub fn bounds(shape: [usize; 3], patch: [usize; 3], final_patch: [usize; 3]) -> [(i64, i64); 3] {
    [0, 1, 2].map(|a| {
        let (s, p, f) = (shape[a] as i64, patch[a] as i64, final_patch[a] as i64);
        let mut need = p - f;
        if s + need < p {
            need = p - s;
        }
        let half_up = need / 2 + need % 2;
        (-half_up, s + half_up - p)
    })
}

/// Lower corner of the patch for one sample.
///
/// A forced sample is centred on a voxel of a class drawn uniformly among those present; for a
/// region-based dataset (`regions` not empty) among its regions present, a region being the
/// union of its labels (nnU-Net keys its class locations by region then).
pub fn choose_corner(rng: &mut SplitMix64, case: &Preprocessed, force: bool, patch: [usize; 3], final_patch: [usize; 3], regions: &[crate::dataset::Region]) -> [i64; 3] {
    let shape = [case.props.shape[1], case.props.shape[2], case.props.shape[3]];
    let b = bounds(shape, patch, final_patch);
    let random = |rng: &mut SplitMix64| b.map(|(lo, hi)| lo + rng.below((hi - lo + 1).max(1) as u64) as i64);
    // With an ignore label the annotated voxels have locations of their own: a sample that is
    // not forced is centred on one of them, and a forced one only falls back to them when no
    // class has any voxel (nnU-Net's `get_bbox`).
    let annotated = case.locations.iter().find(|(l, _)| *l == crate::preprocess::ANNOTATED).map(|(_, c)| c);
    let class = if !force {
        match annotated {
            Some(c) if !c.is_empty() => c,
            _ => return random(rng),
        }
    } else {
        let label = |l: i16| case.locations.iter().find(|(k, _)| *k == l).map(|(_, c)| c);
        let mut eligible: Vec<&Vec<[u32; 3]>> = if regions.is_empty() {
            case.locations.iter().filter(|(l, _)| *l != crate::preprocess::ANNOTATED).map(|(_, c)| c).collect()
        } else {
            regions
                .iter()
                .filter_map(|r| match r.has_own_locations() {
                    true => case.region_locations.iter().find(|(k, _)| *k == r.key).map(|(_, c)| c),
                    false => label(r.labels[0] as i16),
                })
                .collect()
        };
        eligible.retain(|c| !c.is_empty());
        if eligible.is_empty() {
            match annotated {
                Some(c) if !c.is_empty() => eligible.push(c),
                _ => return random(rng),
            }
        }
        eligible[rng.below(eligible.len() as u64) as usize]
    };
    let voxel = class[rng.below(class.len() as u64) as usize];
    [0, 1, 2].map(|a| (voxel[a] as i64 - (patch[a] / 2) as i64).max(b[a].0))
}

/// Crops `[C, shape]` data and `[shape]` seg at `corner` with size `patch`, padding data with 0
/// and seg with −1 outside the image.
pub fn crop_pad(data: &[f32], seg: &[i16], channels: usize, shape: [usize; 3], corner: [i64; 3], patch: [usize; 3]) -> (Vec<f32>, Vec<i16>) {
    let n: usize = patch.iter().product();
    let vox: usize = shape.iter().product();
    let mut d = vec![0f32; channels * n];
    let mut s = vec![-1i16; n];
    for z in 0..patch[0] {
        let iz = corner[0] + z as i64;
        if iz < 0 || iz >= shape[0] as i64 {
            continue;
        }
        for y in 0..patch[1] {
            let iy = corner[1] + y as i64;
            if iy < 0 || iy >= shape[1] as i64 {
                continue;
            }
            // The in-image run along x, copied in one go.
            let x0 = (-corner[2]).max(0) as usize;
            let x1 = ((shape[2] as i64 - corner[2]).min(patch[2] as i64)).max(0) as usize;
            if x0 >= x1 {
                continue;
            }
            let src = ((iz as usize * shape[1] + iy as usize) * shape[2]) as i64 + corner[2] + x0 as i64;
            let src = src as usize;
            let dst = (z * patch[1] + y) * patch[2] + x0;
            s[dst..dst + x1 - x0].copy_from_slice(&seg[src..src + x1 - x0]);
            for c in 0..channels {
                d[c * n + dst..c * n + dst + x1 - x0].copy_from_slice(&data[c * vox + src..c * vox + src + x1 - x0]);
            }
        }
    }
    (d, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_axes_lift_a_2d_configurations_axes() {
        assert_eq!(mirror_axes(false, None), [0, 1, 2]);
        assert_eq!(mirror_axes(true, None), [1, 2]);
        assert_eq!(mirror_axes(false, Some(&[0, 1])), [0, 1]);
        assert_eq!(mirror_axes(true, Some(&[0])), [1]);
        assert!(mirror_axes(true, Some(&[])).is_empty());
        assert!(valid_axes(&[0, 2], 3) && valid_axes(&[], 2) && valid_axes(&[1, 0], 2));
        assert!(!valid_axes(&[2], 2) && !valid_axes(&[3], 3) && !valid_axes(&[1, 1], 3));
    }

    #[test]
    fn forced_foreground_vector() {
        // §11: B=2 → sample 1; B=9 → 6–8; B=12 → 8–11.
        let forced = |b: usize| (0..b).filter(|&j| forced_foreground(j, b)).collect::<Vec<_>>();
        assert_eq!(forced(2), [1]);
        assert_eq!(forced(9), [6, 7, 8]);
        assert_eq!(forced(12), [8, 9, 10, 11]);
    }

    #[test]
    fn initial_patch_vectors() {
        // §11: [40,56,40]→[73,80,64]; 128³→[205,205,205]; [112,112,128]→[179,189,196];
        // dummy 2-D [40,224,224]→[40,263,263].
        assert_eq!(initial_patch_size([40, 56, 40], dummy_2d([40, 56, 40])), [73, 80, 64]);
        assert_eq!(initial_patch_size([128, 128, 128], dummy_2d([128, 128, 128])), [205, 205, 205]);
        assert_eq!(initial_patch_size([112, 112, 128], dummy_2d([112, 112, 128])), [179, 189, 196]);
        assert_eq!(initial_patch_size([40, 224, 224], dummy_2d([40, 224, 224])), [40, 263, 263]);
        // 2-D patches, one slice deep: nnU-Net 2.8.1's get_patch_size of the 2-D patch with
        // ±180°, or ±15° beyond an aspect of 1.5.
        for (patch, loaded) in [([512, 512], [602, 602]), ([320, 448], [527, 527]), ([256, 416], [417, 489]), ([192, 160], [225, 225]), ([96, 320], [206, 376])] {
            assert_eq!(initial_patch_size([1, patch[0], patch[1]], true), [1, loaded[0], loaded[1]], "{patch:?}");
        }
        assert_eq!(in_plane_rotation([1, 96, 320]), 15f64.to_radians());
        assert_eq!(in_plane_rotation([1, 320, 448]), std::f64::consts::PI);
        assert_eq!(in_plane_rotation([16, 96, 320]), std::f64::consts::PI, "dummy 2-D of a 3-D patch: always ±180°");
    }

    #[test]
    fn bounds_follow_nnunet() {
        // need = 20 − 16 = 4 → lb −2, ub = 40 + 2 − 20 = 22; odd need 5 → −3 and shape + 3 − P.
        assert_eq!(bounds([40, 40, 40], [20, 20, 21], [16, 16, 16]), [(-2, 22), (-2, 22), (-3, 22)]);
        // A small image: need raised to P − shape, so the whole image fits with padding.
        assert_eq!(bounds([10, 40, 40], [20, 20, 20], [16, 16, 16]), [(-5, -5), (-2, 22), (-2, 22)]);
    }

    fn one_voxel_case(shape: [usize; 3], at: [usize; 3]) -> Preprocessed {
        let n: usize = shape.iter().product();
        let mut seg = vec![0i16; n];
        seg[(at[0] * shape[1] + at[1]) * shape[2] + at[2]] = 1;
        Preprocessed {
            data: vec![0.5; n],
            seg,
            props: crate::preprocess::CaseProperties {
                id: "c".into(),
                shape: [1, shape[0], shape[1], shape[2]],
                spacing: [1.0; 3],
                original_spacing: [1.0; 3],
                shape_before_cropping: shape,
                bbox_used_for_cropping: [[0, shape[0]], [0, shape[1]], [0, shape[2]]],
                shape_after_cropping_and_before_resampling: shape,
                affine: [[0.0; 4]; 4],
                class_locations: Default::default(),
            },
            locations: vec![(1, vec![at.map(|v| v as u32)])],
            region_locations: Vec::new(),
        }
    }

    proptest::proptest! {
        #[test]
        fn forced_patches_hold_foreground_and_random_corners_stay_in_bounds(
            shape in proptest::array::uniform3(4usize..24),
            patch in proptest::array::uniform3(4usize..20),
            shrink in proptest::array::uniform3(0usize..4),
            frac in proptest::array::uniform3(0.0f64..1.0),
            seed in 0u64..1000,
        ) {
            let final_patch = [0, 1, 2].map(|a| patch[a].saturating_sub(shrink[a]).max(1));
            let at = [0, 1, 2].map(|a| ((frac[a] * shape[a] as f64) as usize).min(shape[a] - 1));
            let case = one_voxel_case(shape, at);
            let mut rng = SplitMix64::new(seed);
            let corner = choose_corner(&mut rng, &case, true, patch, final_patch, &[]);
            let (_, s) = crop_pad(&case.data, &case.seg, 1, shape, corner, patch);
            proptest::prop_assert!(s.contains(&1), "forced patch at {corner:?} misses the voxel {at:?}");
            let b = bounds(shape, patch, final_patch);
            let c = choose_corner(&mut rng, &case, false, patch, final_patch, &[]);
            for a in 0..3 {
                proptest::prop_assert!(c[a] >= b[a].0 && c[a] <= b[a].1.max(b[a].0));
            }
        }
    }

    #[test]
    fn with_an_ignore_label_samples_centre_on_annotated_voxels() {
        // Annotated voxels only in one corner: a sample that is not forced is centred on one of
        // them; a forced one takes the class when there is one, else the annotated voxels.
        let (shape, patch) = ([24, 24, 24], [8, 8, 8]);
        let mut case = one_voxel_case(shape, [20, 20, 20]);
        let annotated: Vec<[u32; 3]> = (0..3).flat_map(|z| (0..3).map(move |y| [z, y, 1])).collect();
        case.locations.push((crate::preprocess::ANNOTATED, annotated));
        // Bounds (0, 16) per axis; a patch centred on a voxel ≤ 2 starts at 0, a random one
        // anywhere in 0..=16, the class voxel's at 20 − 4.
        assert_eq!(bounds(shape, patch, patch), [(0, 16); 3]);
        let mut rng = SplitMix64::new(3);
        for _ in 0..50 {
            assert_eq!(choose_corner(&mut rng, &case, false, patch, patch, &[]), [0, 0, 0], "not forced: an annotated voxel");
            assert_eq!(choose_corner(&mut rng, &case, true, patch, patch, &[]), [16, 16, 16], "forced: the class voxel");
        }
        case.locations.retain(|(l, _)| *l == crate::preprocess::ANNOTATED);
        assert_eq!(choose_corner(&mut rng, &case, true, patch, patch, &[]), [0, 0, 0], "forced without a class: an annotated voxel");
        // Without an ignore label nothing changes: not forced is uniform over the bounds.
        let plain = one_voxel_case(shape, [20, 20, 20]);
        assert!((0..50).any(|_| choose_corner(&mut rng, &plain, false, patch, patch, &[]) != [0, 0, 0]));
    }

    #[test]
    fn region_datasets_draw_a_region_then_a_voxel_of_its_union() {
        // Label 1 at one corner; region "(1, 2)" has its own locations (the union), region "2"
        // (a plain label) has none in this case, so every forced patch centres on the union's.
        let (shape, patch) = ([32, 32, 32], [8, 8, 8]);
        let mut case = one_voxel_case(shape, [4, 4, 4]);
        case.region_locations.push(("(1, 2)".into(), vec![[20, 20, 20]]));
        let region = |labels: Vec<u16>, key: &str| crate::dataset::Region { name: key.into(), labels, key: key.into(), writes: 1 };
        let regions = [region(vec![1, 2], "(1, 2)"), region(vec![2], "2")];
        let mut rng = SplitMix64::new(5);
        for _ in 0..20 {
            assert_eq!(choose_corner(&mut rng, &case, true, patch, patch, &regions), [16, 16, 16]);
        }
        // A plain-label region uses that label's locations.
        let regions = [region(vec![1], "1")];
        assert_eq!(choose_corner(&mut rng, &case, true, patch, patch, &regions), [0, 0, 0]);
    }

    #[test]
    fn crop_pad_copies_inside_and_pads_outside() {
        let shape = [3, 4, 5];
        let data: Vec<f32> = (0..60).map(|v| v as f32 + 1.0).collect();
        let seg: Vec<i16> = (0..60).map(|v| (v % 7) as i16).collect();
        let (d, s) = crop_pad(&data, &seg, 1, shape, [-1, 2, 3], [2, 3, 4]);
        // z = −1 is outside: padding.
        assert!(d[..12].iter().all(|&v| v == 0.0) && s[..12].iter().all(|&v| v == -1));
        // z = 0, y = 2, x = 3,4 inside; x = 5,6 outside.
        let row = &d[12..16];
        assert_eq!(row, &[data[(2) * 5 + 3], data[2 * 5 + 4], 0.0, 0.0]);
        assert_eq!(&s[12..16], &[seg[13], seg[14], -1, -1]);
        // y = 4 is outside.
        assert!(d[20..24].iter().all(|&v| v == 0.0));
    }
}
