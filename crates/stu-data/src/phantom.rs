//! A synthetic CT phantom dataset in nnU-Net raw layout: the harness's embedded default.
//!
//! Each case is a CT-like volume in Hounsfield units (fat −100, unlabelled soft tissue 30; 4 mm
//! fat planes around every structure) with Gaussian noise, and a label map of 15 structures
//! named as STU-Net names them, three from each of TotalSegmentator's five expert groups (organs,
//! vertebrae, cardiac, muscles, ribs; `shared/docs/stunet.md` §6), so that a
//! five-experts-vs-one-model study has something to separate.
//!
//! Version 4 (this one) is a test object for the pipeline, not a model of anatomy's
//! intensities: each class is coded by its intensity, so that a small network learns it in
//! minutes on a laptop *after* nnU-Net's CT normalisation (a clip to the 0.5–99.5 percentiles
//! of labelled voxels, then a z-score) and the network's instance norms (which rescale every
//! patch by its own spread, so what survives is a class's contrast to the tissue around it
//! *relative* to the other contrasts in the patch). The contrasts to the tissue form a ratio
//! scale: ten classes brighter (60 to 2250 HU above it, each 1.5× the last), four darker than
//! the fat (200 to 630 HU below the tissue), and a lung lobe at −850 HU that holds the lower
//! percentile far below everything else, as lungs do in real CT; the body is wider than the
//! field of view, so almost no air shares the lung's clipped value (a corner of a rotated,
//! shifted case can still hold a few air voxels). Noise is 4–8 HU. Every structure but
//! the myocardium (a 20 mm shell) is at least 26 mm across (ribs 26 mm tubes, vertebral bodies
//! 32 mm tall with 8 mm discs), and there are no left/right pairs, so nnU-Net's default
//! mirroring augmentation (STU-Net keeps it) does not make classes ambiguous. A test checks the
//! separation after the clip. Version 3 had realistic soft-tissue values (muscles 90–105 HU
//! next to a 100 HU liver, a −30 HU bladder that the lower clip merged with the fat around it)
//! and version 2 left/right pairs and 10 mm ribs; a base-8 STU-Net did not learn either in 15
//! minutes (`reports/train/README.md`).
//!
//! The anatomy is defined in world millimetres (x left→right, y posterior→anterior, z
//! inferior→superior) and jittered per case (size ±12 %, position ±8 mm, rotation about z
//! ±8°). Voxel grids vary per case in spacing (2.5–4 mm in-plane, 3–5 mm axially), extent and
//! orientation (x and y axes randomly flipped: RAS, LAS, RPS or LPS affines), as real data do.
//! Everything is deterministic for a seed.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::nifti_io::{Geometry, write_image, write_label};

/// One structure: STU-Net class name and mean HU; its expert group comes from
/// [`stu_core::taxonomy`].
pub const CLASSES: [(&str, f32); 15] = [
    ("liver", 230.0),
    ("spleen", 120.0),
    ("lung_lower_lobe_left", -850.0),
    ("vertebrae_L1", 2280.0),
    ("vertebrae_L2", 705.0),
    ("vertebrae_L3", 330.0),
    ("heart_myocardium", 165.0),
    ("heart_ventricle_left", -420.0),
    ("urinary_bladder", -170.0),
    ("autochthon_left", 90.0),
    ("gluteus_maximus_left", -600.0),
    ("iliopsoas_left", -270.0),
    ("rib_left_1", 1530.0),
    ("rib_left_2", 480.0),
    ("rib_left_3", 1030.0),
];

/// The phantom's version, written into `dataset.json` (`phantom_version`).
pub const VERSION: u32 = 4;

/// Unlabelled soft tissue inside the fat layer (HU).
const TISSUE_HU: f32 = 30.0;

/// The expert group of a phantom class (all are STU-Net class names).
pub fn group_of(name: &str) -> stu_core::taxonomy::ExpertGroup {
    let label = stu_core::taxonomy::label_of(name).expect("phantom classes are STU-Net class names");
    stu_core::taxonomy::CLASSES[label as usize - 1].2
}

use stu_core::rng::SplitMix64 as Rng;

/// A solid in phantom coordinates (mm).
#[derive(Clone, Copy)]
enum Shape {
    /// Ellipsoid: centre, radii.
    Ellipsoid([f64; 3], [f64; 3]),
    /// Ellipsoidal shell: centre, outer radii, thickness.
    Shell([f64; 3], [f64; 3], f64),
    /// Elliptic cylinder along z: centre (x, y), radii (x, y), z range.
    Column([f64; 2], [f64; 2], [f64; 2]),
    /// Rib: circular arc in the axial plane at height z around (x, y): radius, tube radius,
    /// angle range (radians, 0 = +x, π/2 = +y).
    Arc([f64; 2], f64, f64, f64, [f64; 2]),
}

impl Shape {
    /// The shape grown by `d` mm (radii, tube and extents; approximate for ellipsoids).
    fn grown(&self, d: f64) -> Shape {
        match *self {
            Shape::Ellipsoid(c, r) => Shape::Ellipsoid(c, r.map(|v| v + d)),
            Shape::Shell(c, r, t) => Shape::Ellipsoid(c, r.map(|v| v + d)).shell_of(t + d),
            Shape::Column(c, r, z) => Shape::Column(c, r.map(|v| v + d), [z[0] - d, z[1] + d]),
            Shape::Arc(c, z, radius, tube, ang) => Shape::Arc(c, z, radius, tube + d, ang),
        }
    }

    fn shell_of(self, t: f64) -> Shape {
        match self {
            Shape::Ellipsoid(c, r) => Shape::Shell(c, r, t),
            other => other,
        }
    }

    fn contains(&self, p: [f64; 3]) -> bool {
        match *self {
            Shape::Ellipsoid(c, r) => (0..3).map(|a| ((p[a] - c[a]) / r[a]).powi(2)).sum::<f64>() <= 1.0,
            Shape::Shell(c, r, t) => {
                let outer = (0..3).map(|a| ((p[a] - c[a]) / r[a]).powi(2)).sum::<f64>() <= 1.0;
                let inner = (0..3).map(|a| ((p[a] - c[a]) / (r[a] - t).max(1.0)).powi(2)).sum::<f64>() <= 1.0;
                outer && !inner
            }
            Shape::Column(c, r, z) => p[2] >= z[0] && p[2] <= z[1] && ((p[0] - c[0]) / r[0]).powi(2) + ((p[1] - c[1]) / r[1]).powi(2) <= 1.0,
            Shape::Arc(c, z, radius, tube, ang) => {
                let (dx, dy) = (p[0] - c[0], p[1] - c[1]);
                let theta = dy.atan2(dx);
                if theta < ang[0] || theta > ang[1] {
                    return false;
                }
                let rho = (dx * dx + dy * dy).sqrt();
                (rho - radius).powi(2) + (p[2] - z).powi(2) <= tube * tube
            }
        }
    }
}

/// The anatomy of one case: body outline, fat layer, and the 15 labelled structures.
struct Anatomy {
    body: Shape,
    fat: Shape,
    structures: Vec<(u16, Shape)>,
    /// The structures grown by the fat-plane width.
    rims: Vec<Shape>,
    angle: f64,
    shift: [f64; 3],
}

fn anatomy(rng: &mut Rng) -> Anatomy {
    let mut s = || rng.uniform(0.88, 1.12);
    let scale: [f64; 20] = std::array::from_fn(|_| s());
    let mut j = |v: f64| v + rng.uniform(-8.0, 8.0);
    let jit: [f64; 30] = std::array::from_fn(|i| j(0.0) * if i % 3 == 2 { 0.5 } else { 1.0 });
    // The body is wider than the fields of view (below): air only in a rare corner of a rotated,
    // shifted case.
    let body = Shape::Ellipsoid([0.0, 0.0, 0.0], [260.0 * scale[0].max(1.0), 200.0 * scale[1].max(1.0), 400.0]);
    let fat = Shape::Ellipsoid([0.0, 0.0, 0.0], [248.0 * scale[0].max(1.0), 188.0 * scale[1].max(1.0), 400.0]);
    let e = |c: [f64; 3], r: [f64; 3], k: usize| Shape::Ellipsoid([c[0] + jit[k], c[1] + jit[k + 1], c[2] + jit[k + 2]], r.map(|v| v * scale[k % 20]));
    // 32 mm bodies with 8 mm discs between them.
    let vertebra = |z: f64, k: usize| Shape::Column([jit[k] * 0.3, -55.0], [20.0 * scale[k % 20], 18.0 * scale[(k + 1) % 20]], [z - 16.0, z + 16.0]);
    let structures = vec![
        (1, e([-55.0, 15.0, 35.0], [55.0, 45.0, 40.0], 0)),                // liver (patient right = −x)
        (2, e([65.0, -10.0, 45.0], [28.0, 22.0, 30.0], 3)),                // spleen
        (3, e([50.0, -45.0, 90.0], [22.0, 20.0, 24.0], 6)),                // lung_lower_lobe_left (above the spleen)
        (4, vertebra(50.0, 9)),                                             // vertebrae_L1
        (5, vertebra(10.0, 10)),                                            // vertebrae_L2
        (6, vertebra(-30.0, 11)),                                           // vertebrae_L3
        (7, Shape::Shell([5.0 + jit[12], 30.0 + jit[13], 80.0 + jit[14] * 0.5], [48.0 * scale[12], 44.0 * scale[13], 40.0], 20.0)), // heart_myocardium
        (8, e([5.0, 30.0, 80.0], [24.0, 21.0, 18.0], 12)),                  // heart_ventricle_left (inside the shell)
        (9, e([0.0, 35.0, -70.0], [30.0, 24.0, 20.0], 15)),                 // urinary_bladder
        (10, Shape::Column([36.0 + jit[18] * 0.3, -68.0], [15.0 * scale[18], 16.0], [-60.0, 60.0])), // autochthon_left
        (11, e([72.0, -58.0, -70.0], [24.0, 20.0, 22.0], 19)),              // gluteus_maximus_left
        (12, Shape::Column([30.0 + jit[21] * 0.3, -30.0], [16.0 * scale[1], 16.0 * scale[2]], [-90.0, -45.0])), // iliopsoas_left
        (13, Shape::Arc([0.0, -20.0], 80.0 + jit[24] * 0.5, 90.0 * scale[3], 13.0, [-1.5, 1.3])),  // rib_left_1 (+x side)
        (14, Shape::Arc([0.0, -20.0], 50.0 + jit[25] * 0.5, 94.0 * scale[4], 13.0, [-1.5, 1.3])),  // rib_left_2
        (15, Shape::Arc([0.0, -20.0], 20.0 + jit[26] * 0.5, 98.0 * scale[5], 13.0, [-1.5, 1.0])),  // rib_left_3
    ];
    let rims = structures.iter().map(|(_, s)| s.grown(4.0)).collect();
    Anatomy { body, fat, structures, rims, angle: rng.uniform(-8.0, 8.0).to_radians(), shift: [rng.uniform(-10.0, 10.0), rng.uniform(-10.0, 10.0), rng.uniform(-10.0, 10.0)] }
}

/// One generated case: image (HU), labels and geometry.
pub struct PhantomCase {
    /// HU values, array order `[z, y, x]`.
    pub image: Vec<f32>,
    /// Label values, same layout.
    pub label: Vec<u16>,
    /// Where it sits.
    pub geom: Geometry,
}

/// Generates case `index` of a phantom with `seed`.
pub fn case(seed: u64, index: usize) -> PhantomCase {
    let mut rng = Rng::new(seed ^ (index as u64).wrapping_mul(0xd134_2543_de82_ef95).wrapping_add(0x5851_f42d_4c95_7f2d));
    let a = anatomy(&mut rng);
    let spacing_xyz = [rng.uniform(2.5, 4.0), 0.0, rng.uniform(3.0, 5.0)];
    let sp = [spacing_xyz[0], spacing_xyz[0], spacing_xyz[2]];
    let fov = [rng.uniform(300.0, 340.0), rng.uniform(230.0, 260.0), rng.uniform(200.0, 260.0)];
    let n = [0, 1, 2].map(|ax| (fov[ax] / sp[ax]).round() as usize);
    let flip = [rng.uniform(0.0, 1.0) < 0.5, rng.uniform(0.0, 1.0) < 0.5, false];
    let noise_sd = rng.uniform(4.0, 8.0);
    // voxel (i, j, k) → world: x = ±sx·i + ox, centred on the field of view.
    let dir = flip.map(|f| if f { -1.0 } else { 1.0 });
    let origin = [0, 1, 2].map(|ax| -dir[ax] * sp[ax] * (n[ax] as f64 - 1.0) / 2.0);
    let (nz, ny, nx) = (n[2], n[1], n[0]);
    let (cos, sin) = (a.angle.cos(), a.angle.sin());
    let mut image = vec![0f32; nx * ny * nz];
    let mut label = vec![0u16; nx * ny * nz];
    image.par_chunks_mut(nx * ny).zip(label.par_chunks_mut(nx * ny)).enumerate().for_each(|(k, (img, lab))| {
        let mut r = Rng::new(seed ^ 0xa076_1d64_78bd_642f ^ ((index * 4096 + k) as u64).wrapping_mul(0xe703_7ed1_a0b4_28db));
        for j in 0..ny {
            for i in 0..nx {
                let w = [dir[0] * sp[0] * i as f64 + origin[0], dir[1] * sp[1] * j as f64 + origin[1], dir[2] * sp[2] * k as f64 + origin[2]];
                let (x, y) = (w[0] - a.shift[0], w[1] - a.shift[1]);
                let p = [cos * x + sin * y, -sin * x + cos * y, w[2] - a.shift[2]];
                let mut hu = -1000.0f32;
                let mut l = 0u16;
                if a.body.contains(p) {
                    let inner = a.fat.contains(p);
                    hu = if inner { TISSUE_HU } else { -100.0 };
                    for &(id, shape) in &a.structures {
                        if shape.contains(p) {
                            l = id;
                            hu = CLASSES[id as usize - 1].1;
                        }
                    }
                    // Fat planes: soft tissue within 4 mm of an organ is fat, as around real
                    // kidneys, bladder, muscles and the heart.
                    if l == 0 && inner && a.rims.iter().any(|r| r.contains(p)) {
                        hu = -90.0;
                    }
                }
                let v = j * nx + i;
                img[v] = hu + (r.normal() * noise_sd) as f32;
                lab[v] = l;
            }
        }
    });
    let header = nifti::NiftiHeader {
        dim: [3, nx as u16, ny as u16, nz as u16, 1, 1, 1, 1],
        pixdim: [1.0, sp[0] as f32, sp[1] as f32, sp[2] as f32, 1.0, 1.0, 1.0, 1.0],
        sform_code: 1,
        qform_code: 0,
        xyzt_units: 2 | 8, // mm, s
        srow_x: [(dir[0] * sp[0]) as f32, 0.0, 0.0, origin[0] as f32],
        srow_y: [0.0, (dir[1] * sp[1]) as f32, 0.0, origin[1] as f32],
        srow_z: [0.0, 0.0, (dir[2] * sp[2]) as f32, origin[2] as f32],
        ..nifti::NiftiHeader::default()
    };
    let affine = crate::nifti_io::best_affine(&header);
    let geom = Geometry { shape: [nz, ny, nx], spacing: [sp[2], sp[1], sp[0]], affine, header };
    PhantomCase { image, label, geom }
}

/// Options of `stu phantom`.
#[derive(Debug, Clone)]
pub struct PhantomOptions {
    /// Output folder (the dataset root).
    pub out: PathBuf,
    /// Training cases (`imagesTr`/`labelsTr`).
    pub cases: usize,
    /// Held-out cases (`imagesTs`/`labelsTs`).
    pub test_cases: usize,
    /// Seed.
    pub seed: u64,
    /// Keep only one expert group's classes, renumbered 1..=3 in phantom order (the
    /// expert-vs-universal study); the images are the same.
    pub group: Option<stu_core::taxonomy::ExpertGroup>,
    /// Write labels as STU-Net's class ids (1..=104) and declare all 104 classes, so a model
    /// trained on it has the released models' 105 outputs (direct-inference studies).
    pub stunet_ids: bool,
}

/// Writes the phantom dataset; cases already written completely are kept (atomic writes make a
/// present file a complete one), so an interrupted run resumes.
pub fn write_dataset(opts: &PhantomOptions) -> Result<(), crate::nifti_io::NiftiIoError> {
    let io = |path: &Path, source: std::io::Error| crate::nifti_io::NiftiIoError::Io { path: path.to_path_buf(), source };
    for sub in ["imagesTr", "labelsTr", "imagesTs", "labelsTs"] {
        let d = opts.out.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
    }
    // Label remap: phantom class i+1 → its value in this dataset (0 when another group's).
    let kept: Vec<&str> = CLASSES.iter().map(|(n, _)| *n).filter(|n| opts.group.is_none_or(|g| group_of(n) == g)).collect();
    let remap: Vec<u16> = std::iter::once(0)
        .chain(CLASSES.iter().map(|(n, _)| match kept.iter().position(|k| k == n) {
            Some(_) if opts.stunet_ids => stu_core::taxonomy::label_of(n).expect("phantom classes are STU-Net names"),
            Some(p) => p as u16 + 1,
            None => 0,
        }))
        .collect();
    let labels: serde_json::Map<String, serde_json::Value> = if opts.stunet_ids {
        std::iter::once(("background".to_string(), 0.into())).chain(stu_core::taxonomy::CLASSES.iter().enumerate().map(|(i, c)| (c.0.to_string(), (i + 1).into()))).collect()
    } else {
        std::iter::once(("background".to_string(), 0.into())).chain(kept.iter().enumerate().map(|(i, n)| (n.to_string(), (i + 1).into()))).collect()
    };
    let groups: serde_json::Map<String, serde_json::Value> = kept.iter().map(|n| (n.to_string(), group_of(n).name().into())).collect();
    let json = serde_json::json!({
        "name": "STU-Net synthetic CT phantom",
        "description": format!("Generated by `stu phantom --seed {}`: CT-like volumes (HU) with 15 structures from TotalSegmentator's five expert groups.", opts.seed),
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": opts.cases,
        "file_ending": ".nii.gz",
        "expert_groups": groups,
        "phantom_seed": opts.seed,
        "phantom_version": VERSION,
        "phantom_group": opts.group.map(|g| g.name()),
    });
    let json_path = opts.out.join("dataset.json");
    // Resuming into a folder that holds another phantom (version, seed, group, label set) would
    // mix its cases with ours: refuse, naming what is there.
    if let Ok(old) = std::fs::read_to_string(&json_path) {
        let old: serde_json::Value = serde_json::from_str(&old).unwrap_or_default();
        let same = |k: &str| old.get(k) == json.get(k);
        if !(same("phantom_seed") && same("phantom_version") && same("phantom_group") && same("labels")) {
            let version = old.get("phantom_version").map_or_else(|| if old.get("phantom_seed").is_some() { "2".to_string() } else { "none".to_string() }, |v| v.to_string());
            return Err(crate::nifti_io::NiftiIoError::Invalid {
                path: json_path,
                reason: format!(
                    "the folder holds another dataset (phantom version {version}, seed {}, group {}); writing phantom version {VERSION} with seed {} here would mix their cases: use another folder or remove this one",
                    old.get("phantom_seed").unwrap_or(&serde_json::Value::Null),
                    old.get("phantom_group").unwrap_or(&serde_json::Value::Null),
                    opts.seed
                ),
            });
        }
    }
    let text = serde_json::to_string_pretty(&json).expect("serialisable") + "\n";
    std::fs::write(&json_path, text).map_err(|e| io(&json_path, e))?;
    let jobs: Vec<(usize, &str)> = (0..opts.cases).map(|i| (i, "Tr")).chain((0..opts.test_cases).map(|i| (opts.cases + i, "Ts"))).collect();
    jobs.par_iter().try_for_each(|&(i, part)| {
        let id = format!("phantom_{i:03}");
        let img = opts.out.join(format!("images{part}/{id}_0000.nii.gz"));
        let lab = opts.out.join(format!("labels{part}/{id}.nii.gz"));
        if img.exists() && lab.exists() {
            return Ok(());
        }
        let c = case(opts.seed, i);
        let label: Vec<u16> = c.label.iter().map(|&l| remap[l as usize]).collect();
        write_label(&lab, &label, &c.geom)?;
        write_image(&img, &c.image, &c.geom)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_stunet_classes_per_expert_group() {
        for g in stu_core::taxonomy::ExpertGroup::ALL {
            assert_eq!(CLASSES.iter().filter(|(n, _)| group_of(n) == g).count(), 3, "{g:?}");
        }
    }

    #[test]
    fn another_phantom_in_the_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let opts = |seed| PhantomOptions { out: dir.path().to_path_buf(), cases: 1, test_cases: 0, seed, group: None, stunet_ids: false };
        write_dataset(&opts(1)).unwrap();
        write_dataset(&opts(1)).unwrap(); // resuming the same phantom is fine
        let err = write_dataset(&opts(2)).unwrap_err().to_string();
        assert!(err.contains("dataset.json") && err.contains("seed 1"), "{err}");
        // A folder written by version 2 (no `phantom_version`) is named as such.
        let path = dir.path().join("dataset.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("phantom_version");
        std::fs::write(&path, v.to_string()).unwrap();
        let err = write_dataset(&opts(1)).unwrap_err().to_string();
        assert!(err.contains("phantom version 2"), "{err}");
    }

    /// nnU-Net's CT normalisation clips to the 0.5 and 99.5 percentiles of labelled voxels, and
    /// the network's instance norms rescale each patch by its own spread. After the clip every
    /// class must stand out from every other class and from the unlabelled fat (−90) and tissue
    /// (30) by ≥ 25 HU (3 noise SDs), and classes on the same side of the tissue must differ in
    /// contrast to it by a factor ≥ 1.35. Version 3 failed this: its bladder fell on the lower
    /// clip next to clipped fat, and muscles and liver were 5–10 HU apart.
    #[test]
    fn classes_stay_apart_after_nnunet_ct_clipping() {
        let c = case(0, 0);
        let fg: Vec<f64> = c.image.iter().zip(&c.label).filter(|(_, l)| **l > 0).map(|(v, _)| *v as f64).collect();
        let (lo, hi) = (crate::plan::percentile(fg.clone(), 0.5), crate::plan::percentile(fg, 99.5));
        let clip = |v: f64| v.clamp(lo, hi);
        let mut means: Vec<(String, f64)> = CLASSES
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let v: Vec<f64> = c.image.iter().zip(&c.label).filter(|(_, l)| **l as usize == i + 1).map(|(v, _)| clip(*v as f64)).collect();
                (name.to_string(), v.iter().sum::<f64>() / v.len() as f64)
            })
            .collect();
        means.push(("fat".into(), clip(-90.0)));
        let tissue = clip(TISSUE_HU as f64);
        means.push(("tissue".into(), tissue));
        for (i, a) in means.iter().enumerate() {
            for b in &means[i + 1..] {
                let what = format!("{} ({:.0}) and {} ({:.0}) after clipping to [{lo:.0}, {hi:.0}]", a.0, a.1, b.0, b.1);
                assert!((a.1 - b.1).abs() >= 25.0, "{what}");
                let (ca, cb) = (a.1 - tissue, b.1 - tissue);
                if ca * cb > 0.0 {
                    assert!(ca.abs().max(cb.abs()) / ca.abs().min(cb.abs()) >= 1.35, "contrast ratio of {what}");
                }
            }
        }
    }

    #[test]
    fn cases_are_deterministic_and_every_class_appears() {
        let a = case(7, 3);
        let b = case(7, 3);
        assert_eq!(a.label, b.label);
        assert_eq!(a.image, b.image);
        let c = case(8, 3);
        assert_ne!(a.label, c.label, "another seed gives another case");
        for i in 0..4 {
            let p = case(7, i);
            let mut seen = [0usize; 16];
            for &l in &p.label {
                seen[l as usize] += 1;
            }
            for (cls, &count) in seen.iter().enumerate() {
                assert!(count > 10, "case {i}: class {cls} has {count} voxels");
            }
        }
    }
}
