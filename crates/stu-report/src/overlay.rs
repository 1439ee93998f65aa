//! Label overlays for visual checks (nnU-Net's `nnUNetv2_plot_overlay_pngs`,
//! `utilities/overlay_plots.py`): one axial slice per case, the image rescaled to 0…255 in
//! grey, each label's colour added at intensity 0.6, the sum rescaled to 0…255, as PNG.
//!
//! The arithmetic is nnU-Net's `generate_overlay` on a float32 image (equal to it pixel for
//! pixel, `tests/fixtures/make_overlay_fixture.py`). The slice is the one where the labels
//! present cover the largest mean fraction of their voxels, which is what nnU-Net's
//! `select_slice_to_plot2` sets out to compute; its code divides each label's counts by the
//! running total of the whole table instead, which weights the first label most.

use std::path::Path;

use anyhow::{Context, Result, ensure};

/// nnU-Net's colour cycle (index 0, black, is the background's).
pub const COLOURS: [[u8; 3]; 15] = [
    [0x00, 0x00, 0x00],
    [0x43, 0x63, 0xd8],
    [0xf5, 0x82, 0x31],
    [0x3c, 0xb4, 0x4b],
    [0xe6, 0x19, 0x4b],
    [0x91, 0x1e, 0xb4],
    [0xff, 0xe1, 0x19],
    [0xbf, 0xef, 0x45],
    [0x42, 0xd4, 0xf4],
    [0xf0, 0x32, 0xe6],
    [0x00, 0x00, 0x75],
    [0x9a, 0x63, 0x24],
    [0x80, 0x80, 0x00],
    [0x80, 0x00, 0x00],
    [0x46, 0x99, 0x90],
];

/// The colour of the `k`-th label present (sorted, background first). nnU-Net stops at 15;
/// beyond, the 14 colours cycle (never black).
pub fn colour(k: usize) -> [u8; 3] {
    COLOURS[if k < COLOURS.len() { k } else { 1 + (k - 1) % (COLOURS.len() - 1) }]
}

/// The axial slice (index along the first axis of `[z, y, x]`) where the labels present cover
/// the largest mean fraction of their voxels; 0 when there is no label.
pub fn select_slice(seg: &[u16], shape: [usize; 3]) -> usize {
    let n = shape[1] * shape[2];
    // Sorted and unique, as a set gives them.
    let labels: Vec<u16> = seg.iter().copied().filter(|&v| v > 0).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    if labels.is_empty() || n == 0 {
        return 0;
    }
    let index = |v: u16| labels.binary_search(&v).ok();
    let mut counts = vec![vec![0u64; labels.len()]; shape[0]];
    for (z, slice) in seg.chunks_exact(n).enumerate() {
        for &v in slice {
            if let Some(i) = index(v) {
                counts[z][i] += 1;
            }
        }
    }
    let totals: Vec<u64> = (0..labels.len()).map(|i| counts.iter().map(|c| c[i]).sum()).collect();
    let score = |c: &Vec<u64>| c.iter().zip(&totals).map(|(&a, &t)| a as f64 / t as f64).sum::<f64>() / labels.len() as f64;
    let scores: Vec<f64> = counts.iter().map(score).collect();
    // The first maximum, as numpy's argmax.
    (1..scores.len()).fold(0, |best, z| if scores[z] > scores[best] { z } else { best })
}

/// nnU-Net's `generate_overlay` of one slice (`image` and `seg` row-major `[h, w]`): RGB bytes.
pub fn generate(image: &[f32], seg: &[u16]) -> Vec<u8> {
    assert_eq!(image.len(), seg.len(), "image and labels of one slice");
    let min = image.iter().copied().fold(f32::INFINITY, f32::min);
    let mut grey: Vec<f32> = image.iter().map(|&v| v - min).collect();
    let max = grey.iter().copied().fold(0f32, f32::max);
    if max > 0.0 {
        grey.iter_mut().for_each(|v| *v = *v / max * 255.0);
    }
    let mut rgb: Vec<f32> = grey.iter().flat_map(|&v| [v; 3]).collect();
    // The k-th label present (sorted, background first) takes colour k.
    let present: Vec<u16> = seg.iter().copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    for (px, s) in rgb.chunks_exact_mut(3).zip(seg) {
        let c = colour(present.binary_search(s).expect("every value is present"));
        // numpy adds the float64 colour and rounds back into the float32 image.
        for (v, &c) in px.iter_mut().zip(&c) {
            *v = (*v as f64 + 0.6 * c as f64) as f32;
        }
    }
    let max = rgb.iter().copied().fold(0f32, f32::max);
    rgb.iter().map(|&v| if max > 0.0 { (v / max * 255.0) as u8 } else { 0 }).collect()
}

/// Writes RGB bytes `[h, w, 3]` as an 8-bit PNG, atomically.
pub fn write_png(path: &Path, rgb: &[u8], width: usize, height: usize) -> Result<()> {
    ensure!(rgb.len() == width * height * 3, "{}: {} bytes for {width}×{height} RGB", path.display(), rgb.len());
    stu_core::fs::atomic_with(path, |tmp| {
        let file = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        let mut enc = png::Encoder::new(file, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(std::io::Error::other)?;
        w.write_image_data(rgb).map_err(std::io::Error::other)?;
        w.finish().map_err(std::io::Error::other)
    })
    .with_context(|| format!("{}: cannot write", path.display()))
}

/// The overlay of a volume `[z, y, x]` (image and labels of one shape) on its selected slice:
/// `(slice, RGB bytes, width, height)`.
pub fn overlay_volume(image: &[f32], seg: &[u16], shape: [usize; 3]) -> (usize, Vec<u8>, usize, usize) {
    let z = select_slice(seg, shape);
    let n = shape[1] * shape[2];
    (z, generate(&image[z * n..(z + 1) * n], &seg[z * n..(z + 1) * n]), shape[2], shape[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slice_covers_the_most_of_every_label_and_colours_cycle_without_black() {
        // Label 1 lies wholly in slice 2; label 2 half in slice 0, half in slice 2 → slice 2.
        let shape = [3, 1, 4];
        let seg = [2, 0, 0, 0, /**/ 0, 0, 0, 0, /**/ 1, 1, 2, 0];
        assert_eq!(select_slice(&seg, shape), 2);
        assert_eq!(select_slice(&[0; 12], shape), 0);
        assert_eq!(colour(15), COLOURS[1]);
        assert!((1..200).all(|k| colour(k) != [0, 0, 0]));
        // A flat image with one label: grey 0 everywhere, the label's colour at full scale.
        let rgb = generate(&[5.0, 5.0], &[0, 1]);
        assert_eq!(rgb, [0, 0, 0, 0x43, 0x63, 0xd8].map(|c| ((0.6 * c as f64) as f32 / (0.6 * 216.0) as f32 * 255.0) as u8));
    }
}
