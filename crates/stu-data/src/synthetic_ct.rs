//! The preprocessing/inference benchmark dataset of `shared/bench/make_synthetic_ct.py`, ported:
//! two CTs, 512×512×300 at 0.8×0.8×1.0 mm and 512×512×150 at 0.7×0.7×2.0 mm (HU, body ellipse,
//! three labelled blobs), as `Dataset990_SyntheticCT`. Same geometry and structures; the noise
//! comes from another generator, so values are not bit-identical to the Python script's.
//! [`write_long`] adds a whole-body-length CT for whole-volume inference: 512×512×807 at
//! 0.8×0.8×1.0 mm (538×273×273 at 1.5 mm, `shared/docs/anchors.md`'s longer sliding-window case).

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::nifti_io::{Geometry, NiftiIoError, write_image, write_label};

fn case(shape: [usize; 3], spacing: [f64; 3], seed: u64) -> (Vec<f32>, Vec<u16>, Geometry) {
    let [nx, ny, nz] = shape;
    let lin = |n: usize, i: usize| -1.0 + 2.0 * i as f32 / (n - 1) as f32;
    let blobs: [(u16, [f32; 3], [f32; 3], f32); 3] =
        [(1, [0.3, 0.1, 0.2], [0.25, 0.2, 0.3], 60.0), (2, [-0.35, 0.05, -0.1], [0.12, 0.12, 0.2], 30.0), (3, [0.0, -0.35, 0.0], [0.08, 0.08, 0.9], 400.0)];
    let mut img = vec![0f32; nx * ny * nz];
    let mut lab = vec![0u16; nx * ny * nz];
    img.par_chunks_mut(nx * ny).zip(lab.par_chunks_mut(nx * ny)).enumerate().for_each(|(k, (im, lb))| {
        let z = lin(nz, k);
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (k as u64 + 1).wrapping_mul(0xd134_2543_de82_ef95);
        let mut normal = move || {
            let mut u = || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
            };
            let (a, b) = (u(), u());
            ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
        };
        for j in 0..ny {
            let y = lin(ny, j);
            for i in 0..nx {
                let x = lin(nx, i);
                let body = (x / 0.85).powi(2) + (y / 0.6).powi(2) < 1.0;
                let mut hu = if body { 40.0 } else { -1000.0 };
                let mut l = 0;
                for (lbl, c, r, v) in blobs {
                    if ((x - c[0]) / r[0]).powi(2) + ((y - c[1]) / r[1]).powi(2) + ((z - c[2]) / r[2]).powi(2) < 1.0 {
                        hu = v;
                        l = lbl;
                    }
                }
                if body {
                    hu += normal() * 15.0;
                }
                im[j * nx + i] = hu.clamp(-1024.0, 3071.0).round();
                lb[j * nx + i] = l;
            }
        }
    });
    let header = nifti::NiftiHeader {
        dim: [3, nx as u16, ny as u16, nz as u16, 1, 1, 1, 1],
        pixdim: [1.0, spacing[0] as f32, spacing[1] as f32, spacing[2] as f32, 1.0, 1.0, 1.0, 1.0],
        sform_code: 2,
        srow_x: [spacing[0] as f32, 0.0, 0.0, 0.0],
        srow_y: [0.0, spacing[1] as f32, 0.0, 0.0],
        srow_z: [0.0, 0.0, spacing[2] as f32, 0.0],
        ..nifti::NiftiHeader::default()
    };
    let affine = crate::nifti_io::best_affine(&header);
    (img, lab, Geometry { shape: [nz, ny, nx], spacing: [spacing[2], spacing[1], spacing[0]], affine, header })
}

/// Writes `Dataset990_SyntheticCT` under `out` unless it is already complete; returns its root.
pub fn write(out: &Path) -> Result<PathBuf, NiftiIoError> {
    let d = out.join("Dataset990_SyntheticCT");
    let io = |p: &Path, e: std::io::Error| NiftiIoError::Io { path: p.to_path_buf(), source: e };
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(d.join(sub)).map_err(|e| io(&d.join(sub), e))?;
    }
    for (i, (shape, sp)) in [([512, 512, 300], [0.8, 0.8, 1.0]), ([512, 512, 150], [0.7, 0.7, 2.0])].into_iter().enumerate() {
        let (img, lab) = (d.join(format!("imagesTr/ct{i}_0000.nii.gz")), d.join(format!("labelsTr/ct{i}.nii.gz")));
        if img.exists() && lab.exists() {
            continue;
        }
        let (im, lb, g) = case(shape, sp, i as u64);
        write_label(&lab, &lb, &g)?;
        write_image(&img, &im, &g)?;
    }
    let json = r#"{"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ_a": 1, "organ_b": 2, "vessel": 3}, "numTraining": 2, "file_ending": ".nii.gz"}"#;
    std::fs::write(d.join("dataset.json"), json).map_err(|e| io(&d.join("dataset.json"), e))?;
    Ok(d)
}

/// Writes `Dataset990_SyntheticCT/imagesTs/long_0000.nii.gz` under `out` (512×512×807 at
/// 0.8×0.8×1.0 mm) unless it exists; returns its path.
pub fn write_long(out: &Path) -> Result<PathBuf, NiftiIoError> {
    let dir = out.join("Dataset990_SyntheticCT/imagesTs");
    std::fs::create_dir_all(&dir).map_err(|e| NiftiIoError::Io { path: dir.clone(), source: e })?;
    let img = dir.join("long_0000.nii.gz");
    if !img.exists() {
        let (im, _, g) = case([512, 512, 807], [0.8, 0.8, 1.0], 2);
        write_image(&img, &im, &g)?;
    }
    Ok(img)
}
