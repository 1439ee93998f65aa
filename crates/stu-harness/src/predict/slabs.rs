//! The sliding window's slabs and what consumes them as they come: the `Ring` of one patch
//! depth that sums the tiles, the `Slab`s of finished slices it hands on, and their exports:
//! labels at once (`LabelRule`, the fast export), each class's rows resampled back with a
//! running argmax (`RowExport`, the full export), on the network's thread or, overlapped, on the
//! export stage's (`Streamed`).

use anyhow::{Context, Result, ensure};
use stu_data::resample::LinearRows;
use stu_engine::{Tensor, TensorData};

use super::{Back, Exporter, ProbabilityFile, all_finite, uncrop};

/// A case whose full export the writer stage does while the network stage still runs it
/// (overlapped prediction): the way back to its input's grid, its geometry, and its slabs.
pub(super) struct Streamed {
    pub(super) back: Back,
    pub(super) geom: stu_data::nifti_io::Geometry,
    pub(super) id: String,
    pub(super) slabs: std::sync::mpsc::Receiver<SlabMsg>,
    /// Where its probabilities go, when asked.
    pub(super) probabilities: Option<std::path::PathBuf>,
}

pub(super) enum SlabMsg {
    /// Slices `z0..z0 + k`: `[classes, k, Y, X]` normalised logits.
    Slab(usize, usize, Vec<f32>),
    /// The sliding window ended: its times, or why it stopped.
    Done(Result<NetworkTimes, String>),
}

/// Where a streamed case's network stage spent its time.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct NetworkTimes {
    /// The whole sliding window.
    pub(super) seconds: f64,
    /// Until the first tile was summed: on a GPU the warm-up (cuDNN's autotuning of each
    /// convolution shape, a CUDA graph's capture) as well as one tile.
    pub(super) first_tile: Option<f64>,
    /// Blocked handing slabs to the export stage, which was still busy with earlier ones.
    pub(super) export_wait: f64,
}

impl NetworkTimes {
    /// As phases of the case's timing line.
    pub(super) fn phases(&self) -> super::Phases {
        let mut p = vec![("network", self.seconds)];
        if let Some(f) = self.first_tile {
            p.push(("of which to the first tile", f));
        }
        p.push(("of which waiting for the export", self.export_wait));
        p
    }
}

impl Streamed {
    /// Exports the slabs as they arrive; the label map in the input's geometry, with the
    /// network stage's times.
    pub(super) fn export(self, exporter: &Exporter) -> Result<(Vec<u16>, stu_data::nifti_io::Geometry, NetworkTimes)> {
        let mut rows = RowExport::new(&self.back, exporter.classes, exporter.regions.clone(), self.probabilities.as_deref(), self.geom.shape)?;
        let plane = self.back.grid[1] * self.back.grid[2];
        let mut network = None;
        for msg in &self.slabs {
            match msg {
                SlabMsg::Slab(z0, k, v) => rows.take(&Slab { z0, k, plane, window: k, data: SlabData::Copied(v) })?,
                SlabMsg::Done(r) => {
                    network = Some(r.map_err(anyhow::Error::msg)?);
                    break;
                }
            }
        }
        let seconds = network.context("the network stage stopped")?;
        let labels = rows.finish()?;
        let (seg, geom) = self.back.place_labels(&self.id, self.geom, &labels)?;
        Ok((seg, geom, seconds))
    }
}

/// The full export done as the sliding window's slices are finished: each class's output rows
/// resampled back to the cropped shape ([`LinearRows`]) as soon as the slices they read are in,
/// and reduced to labels at once (a running argmax over the classes, or a region-based model's
/// sigmoids painted in order), so neither the whole volume's logits nor a whole resampled class
/// is ever held. The labels are [`Exporter::export`]'s from the whole logits, bit for bit, and
/// so are the probabilities when asked ([`RowProbabilities`]).
pub(super) struct RowExport {
    pub(super) rows: LinearRows,
    pub(super) classes: usize,
    pub(super) regions: Option<Vec<u16>>,
    pub(super) grid: [usize; 3],
    pub(super) target: [usize; 3],
    /// Input rows `kept_from..` of earlier slabs that rows to come still read, `[classes, rows,
    /// Y, X]` (a row or two).
    pub(super) kept: Vec<f32>,
    pub(super) kept_from: usize,
    /// The next output row.
    pub(super) next: usize,
    /// The labels on the cropped grid.
    pub(super) labels: Vec<u16>,
    pub(super) probabilities: Option<RowProbabilities>,
}

impl RowExport {
    /// The export of a case that `back` leads back to its input's grid (of `shape`, the input's
    /// array order), writing its probabilities to `probabilities` when given.
    pub(super) fn new(back: &Back, classes: usize, regions: Option<Vec<u16>>, probabilities: Option<&std::path::Path>, shape: [usize; 3]) -> Result<Self> {
        let rows = LinearRows::new(back.grid, back.target, back.separate);
        let probabilities = probabilities.map(|p| RowProbabilities::create(p, back, classes, regions.as_deref(), shape)).transpose()?;
        Ok(Self { rows, classes, regions, grid: back.grid, target: back.target, kept: Vec::new(), kept_from: 0, next: 0, labels: vec![0; back.target.iter().product()], probabilities })
    }

    /// Takes the next slab: labels every output row whose input rows are all in.
    pub(super) fn take(&mut self, slab: &Slab<'_>) -> Result<()> {
        let plane = self.grid[1] * self.grid[2];
        let tplane = self.target[1] * self.target[2];
        let (z0, end_in) = (slab.z0, slab.z0 + slab.k);
        let kept_rows = self.kept.len() / (self.classes * plane).max(1);
        ensure!(self.kept_from + kept_rows == z0 || kept_rows == 0, "slices {z0}.. arrive after {}..", self.kept_from + kept_rows);
        // Class `c`'s input rows `lo..=hi`, from what was kept and this slab.
        let input = |c: usize, lo: usize, hi: usize| -> std::borrow::Cow<'_, [f32]> {
            if lo >= z0 {
                return slab.rows(c, lo - z0..hi + 1 - z0);
            }
            let mut v = self.kept[(c * kept_rows + lo - self.kept_from) * plane..(c + 1) * kept_rows * plane].to_vec();
            v.extend_from_slice(&slab.rows(c, 0..hi + 1 - z0));
            std::borrow::Cow::Owned(v)
        };
        let mut end = self.next;
        while end < self.target[0] && self.rows.reads(end).1 < end_in {
            end += 1;
        }
        if end > self.next {
            let (lo, hi) = (self.rows.reads(self.next).0, self.rows.reads(end - 1).1);
            let out = &mut self.labels[self.next * tplane..end * tplane];
            let (next, probabilities) = (self.next, self.probabilities.as_ref());
            match &self.regions {
                None => {
                    let mut best = vec![f32::NEG_INFINITY; out.len()];
                    // Running sum of exp(logit − max) for the probabilities (online log-sum-exp).
                    let mut sumexp = probabilities.map(|_| vec![0f32; out.len()]);
                    for c in 0..self.classes {
                        running_argmax(&mut best, out, &self.rows.rows(&input(c, lo, hi), lo, next..end), c, sumexp.as_deref_mut());
                    }
                    if let (Some(file), Some(sumexp)) = (probabilities, sumexp) {
                        // Second pass: each class's rows resampled again, their softmax written.
                        for c in 0..self.classes {
                            file.write(c, next, &softmax(&self.rows.rows(&input(c, lo, hi), lo, next..end), &best, &sumexp))?;
                        }
                    }
                }
                Some(writes) => {
                    for (c, &w) in writes.iter().enumerate() {
                        let r = self.rows.rows(&input(c, lo, hi), lo, next..end);
                        paint_region(out, &r, w);
                        if let Some(file) = probabilities {
                            use rayon::prelude::*;
                            file.write(c, next, &r.into_par_iter().map(sigmoid).collect::<Vec<_>>())?;
                        }
                    }
                }
            }
            self.next = end;
        }
        // Keep the input rows that the rows to come read (none once all are done).
        let from = if end < self.target[0] { self.rows.reads(end).0.min(end_in) } else { end_in };
        let keep = end_in - from;
        let mut kept = Vec::with_capacity(self.classes * keep * plane);
        if keep > 0 {
            for c in 0..self.classes {
                kept.extend_from_slice(&input(c, from, end_in - 1));
            }
        }
        (self.kept, self.kept_from) = (kept, from);
        Ok(())
    }

    /// The labels, once every row is done (and the probabilities file, complete, in place).
    pub(super) fn finish(self) -> Result<Vec<u16>> {
        ensure!(self.next == self.target[0], "the export stopped at row {} of {}", self.next, self.target[0]);
        if let Some(p) = self.probabilities {
            p.finish()?;
        }
        Ok(self.labels)
    }
}

/// A [`RowExport`]'s probabilities, written as its rows are done: each class's block of rows on
/// the cropped grid placed into whole slices of the input (outside the crop: background 1, the
/// other classes 0, as nnU-Net; a region's sigmoid 0) and written to its place in the file.
/// Rows of the crop are slices of the input when the preprocessing's transposition keeps the
/// first axis ([`RowProbabilities::streams`]); the file is [`super::write_probabilities`]'s
/// from the whole logits, byte for byte.
pub(super) struct RowProbabilities {
    file: ProbabilityFile,
    classes: usize,
    softmax: bool,
    /// The uncropped volume, preprocessing's (transposed) array order.
    full: [usize; 3],
    target: [usize; 3],
    bbox: [[usize; 2]; 3],
    /// Back to the input's array order (axis 0 stays).
    backward: [usize; 3],
}

impl RowProbabilities {
    /// Whether the probabilities of a plan with transposition `transpose_forward` stream.
    pub(super) fn streams(transpose_forward: [usize; 3]) -> bool {
        transpose_forward[0] == 0
    }

    fn create(path: &std::path::Path, back: &Back, classes: usize, regions: Option<&[u16]>, shape: [usize; 3]) -> Result<Self> {
        ensure!(back.backward[0] == 0, "probabilities stream only when the first axis is not transposed");
        ensure!(back.backward.map(|a| back.full[a]) == shape, "{}: a {shape:?} input for a {:?} grid", path.display(), back.full);
        let file = ProbabilityFile::create(path, classes, shape, regions)?;
        Ok(Self { file, classes, softmax: regions.is_none(), full: back.full, target: back.target, bbox: back.bbox, backward: back.backward })
    }

    fn fill(&self, class: usize) -> f32 {
        if self.softmax && class == 0 { 1.0 } else { 0.0 }
    }

    /// Class `class`'s values on the crop's rows `next..` (`[rows, Y, X]` of the crop).
    fn write(&self, class: usize, next: usize, values: &[f32]) -> Result<()> {
        let ([_, ty, tx], [_, fy, fx]) = (self.target, self.full);
        let rows = values.len() / (ty * tx).max(1);
        let placed = uncrop(values, [rows, ty, tx], [rows, fy, fx], [[0, rows], self.bbox[1], self.bbox[2]], self.fill(class));
        let (placed, _) = stu_data::preprocess::transpose(placed, [rows, fy, fx], self.backward);
        self.file.write(class, next + self.bbox[0][0], &placed)
    }

    /// The slices outside the crop, then the file moved into place.
    fn finish(self) -> Result<()> {
        let plane = self.full[1] * self.full[2];
        let (lo, hi) = (self.bbox[0][0], self.bbox[0][0] + self.target[0]);
        for class in 0..self.classes {
            for (z0, z1) in [(0, lo), (hi, self.full[0])] {
                if z1 > z0 {
                    self.file.write(class, z0, &vec![self.fill(class); (z1 - z0) * plane])?;
                }
            }
        }
        self.file.commit()
    }
}

/// One class's values `r` into a running argmax (`best`, `arg`: a later class wins only where
/// it is strictly larger, numpy's first maximum), on all cores; with `sumexp`, also the running
/// sum of exp(value − maximum) for the softmax (online log-sum-exp), updated before the maximum.
pub(super) fn running_argmax(best: &mut [f32], arg: &mut [u16], r: &[f32], class: usize, sumexp: Option<&mut [f32]>) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 15;
    let update = |best: &mut [f32], arg: &mut [u16], r: &[f32], mut s: Option<&mut [f32]>| {
        for (i, &v) in r.iter().enumerate() {
            if let Some(s) = s.as_deref_mut() {
                s[i] = if v > best[i] { s[i] * (best[i] - v).exp() + 1.0 } else { s[i] + (v - best[i]).exp() };
            }
            if v > best[i] {
                best[i] = v;
                arg[i] = class as u16;
            }
        }
    };
    let chunks = best.par_chunks_mut(CHUNK).zip(arg.par_chunks_mut(CHUNK)).zip(r.par_chunks(CHUNK));
    match sumexp {
        Some(s) => chunks.zip(s.par_chunks_mut(CHUNK)).for_each(|(((b, a), r), s)| update(b, a, r, Some(s))),
        None => chunks.for_each(|((b, a), r)| update(b, a, r, None)),
    }
}

/// One class's softmax from its values `r` and every class's running maximum `best` and sum of
/// exp(value − maximum) `sumexp` ([`running_argmax`]'s), on all cores.
pub(super) fn softmax(r: &[f32], best: &[f32], sumexp: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    r.par_iter().zip(best).zip(sumexp).map(|((v, m), s)| (v - m).exp() / s).collect()
}

/// A region's values `r` painted into `seg`: its label `w` where its sigmoid exceeds 0.5.
pub(super) fn paint_region(seg: &mut [u16], r: &[f32], w: u16) {
    use rayon::prelude::*;
    seg.par_iter_mut().zip(r.par_iter()).for_each(|(s, &v)| if sigmoid(v) > 0.5 { *s = w });
}

/// The logistic function, as the region-based export applies it.
pub(super) fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// The sliding window's sums over `window` slices of the volume (a ring: volume slice `z` at
/// `z mod window`), on the host or the device, and their Gaussian weights beside them.
pub(super) struct Ring {
    pub(super) window: usize,
    /// The volume's slices.
    pub(super) depth: usize,
    /// Voxels per slice.
    pub(super) plane: usize,
    /// `[classes, window, Y, X]` in host memory (empty when on the device).
    pub(super) host: Vec<f32>,
    pub(super) dev: Option<Tensor<4>>,
    /// `[window, Y, X]`.
    pub(super) weight: Vec<f32>,
}

impl Ring {
    /// Where volume slices `z0..z0 + depth` (`depth` ≤ the window) lie: one or two runs
    /// `(offset from z0, first ring slot, slices)`.
    pub(super) fn runs(&self, z0: usize, depth: usize) -> Vec<(usize, usize, usize)> {
        let s = z0 % self.window;
        if s + depth <= self.window { vec![(0, s, depth)] } else { vec![(0, s, self.window - s), (self.window - s, 0, depth - (self.window - s))] }
    }

    /// Hands volume slices `z` on, normalised by their weights, then clears their slots for the
    /// slices that follow.
    pub(super) fn finish(&mut self, z: std::ops::Range<usize>, emit: &mut dyn FnMut(Slab<'_>) -> Result<()>) -> Result<()> {
        use rayon::prelude::*;
        let (k, plane, window) = (z.len(), self.plane, self.window);
        if k == 0 {
            return Ok(());
        }
        let runs = self.runs(z.start, k);
        let more = z.end < self.depth;
        if let Some(mut a) = self.dev.take() {
            // Normalised on the device; the slices come back.
            let device = a.device();
            let [classes, _, y, x] = a.dims();
            let mut parts = Vec::with_capacity(2);
            let mut weights = Vec::with_capacity(k * plane);
            for &(_, slot, depth) in &runs {
                parts.push(a.clone().slice([0..classes, slot..slot + depth, 0..y, 0..x]));
                weights.extend_from_slice(&self.weight[slot * plane..(slot + depth) * plane]);
            }
            let sums = if parts.len() == 1 { parts.pop().expect("one run") } else { Tensor::cat(parts, 1) };
            let w = Tensor::<4>::from_data(TensorData::new(weights, [1, k, y, x]), &device);
            // Moved out of the tensor data, not copied: the whole volume's logits (B on a CT at
            // 1.5 mm: 105 × 11 M values, 4.6 GB), when the window is the volume.
            let v = (sums / w).into_data().try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            ensure!(all_finite(&v), "the network produced non-finite logits");
            if more {
                for &(_, slot, depth) in &runs {
                    a = a.slice_assign([0..classes, slot..slot + depth, 0..y, 0..x], Tensor::<4>::zeros([classes, depth, y, x], &device));
                }
            }
            self.dev = Some(a);
            clear_slots(&mut self.weight, &runs, plane);
            return emit(Slab { z0: z.start, k, plane, window, data: SlabData::Copied(v) });
        }
        for &(_, slot, depth) in &runs {
            let w = &self.weight[slot * plane..(slot + depth) * plane];
            self.host.par_chunks_mut(window * plane).for_each(|a| a[slot * plane..(slot + depth) * plane].iter_mut().zip(w).for_each(|(a, w)| *a /= w));
        }
        emit(Slab { z0: z.start, k, plane, window, data: SlabData::Ring(&mut self.host) })?;
        if more {
            self.host.par_chunks_mut(window * plane).for_each(|a| clear_slots(a, &runs, plane));
            clear_slots(&mut self.weight, &runs, plane);
        }
        Ok(())
    }
}

/// Zeroes the ring slots of `runs` in `v` (`[window, Y, X]`, `plane` values a slot).
fn clear_slots(v: &mut [f32], runs: &[(usize, usize, usize)], plane: usize) {
    for &(_, slot, depth) in runs {
        v[slot * plane..(slot + depth) * plane].fill(0.0);
    }
}

/// Finished slices `z0..z0 + k` of the normalised logits, as [`Ring::finish`] hands them on.
pub(super) struct Slab<'a> {
    pub(super) z0: usize,
    pub(super) k: usize,
    pub(super) plane: usize,
    pub(super) window: usize,
    pub(super) data: SlabData<'a>,
}

pub(super) enum SlabData<'a> {
    /// In place in the host ring (`[classes, window, Y, X]`).
    Ring(&'a mut Vec<f32>),
    /// Copied back from the device (`[classes, k, Y, X]`).
    Copied(Vec<f32>),
}

impl Slab<'_> {
    /// Its values, ring or copy.
    fn values(&self) -> &[f32] {
        match &self.data {
            SlabData::Ring(v) => v,
            SlabData::Copied(v) => v,
        }
    }

    /// Class `class`'s values on slice `z0 + dz`.
    pub(super) fn plane(&self, class: usize, dz: usize) -> &[f32] {
        let at = self.slot(class, dz);
        &self.values()[at * self.plane..(at + 1) * self.plane]
    }

    /// Class `class`'s values on slices `z0 + dz` for `dz` in `dz` (`[dz.len(), Y, X]`),
    /// borrowed where they lie together.
    pub(super) fn rows(&self, class: usize, dz: std::ops::Range<usize>) -> std::borrow::Cow<'_, [f32]> {
        let (first, last) = (self.slot(class, dz.start), self.slot(class, dz.end - 1));
        if last + 1 == first + dz.len() {
            return std::borrow::Cow::Borrowed(&self.values()[first * self.plane..(last + 1) * self.plane]);
        }
        std::borrow::Cow::Owned(dz.flat_map(|d| self.plane(class, d).iter().copied()).collect())
    }

    /// Where class `class`'s slice `z0 + dz` lies, in planes.
    pub(super) fn slot(&self, class: usize, dz: usize) -> usize {
        match &self.data {
            SlabData::Ring(_) => class * self.window + (self.z0 + dz) % self.window,
            SlabData::Copied(_) => class * self.k + dz,
        }
    }

    /// The slab as `[classes, k, Y, X]` values of its own.
    pub(super) fn into_copied(self, classes: usize) -> Vec<f32> {
        if let SlabData::Copied(v) = self.data {
            return v;
        }
        let mut v = Vec::with_capacity(classes * self.k * self.plane);
        for c in 0..classes {
            v.extend_from_slice(&self.rows(c, 0..self.k));
        }
        v
    }

    /// The logits `[classes, Z, Y, X]` of a slab that is the whole volume, moved out.
    pub(super) fn into_whole(self) -> Vec<f32> {
        debug_assert!(self.z0 == 0 && (matches!(self.data, SlabData::Copied(_)) || self.k == self.window));
        match self.data {
            SlabData::Ring(v) => std::mem::take(v),
            SlabData::Copied(v) => v,
        }
    }
}

/// How logits become labels: the first maximum over the classes (numpy's argmax), or a
/// region-based model's outputs each writing its label where its sigmoid exceeds 0.5, later
/// ones over earlier ones (nnU-Net's `convert_probabilities_to_segmentation`).
pub(super) enum LabelRule<'a> {
    Argmax(usize),
    Regions(&'a [u16]),
}

impl<'a> LabelRule<'a> {
    pub(super) fn new(classes: usize, regions: Option<&'a [u16]>) -> Result<Self> {
        // The label resampler takes i16 maps.
        match regions {
            Some(w) => {
                ensure!(w.iter().all(|&w| w <= i16::MAX as u16), "--fast-export: labels above {} do not fit the label resampler", i16::MAX);
                Ok(Self::Regions(w))
            }
            None => {
                ensure!(classes <= i16::MAX as usize + 1, "--fast-export: {classes} classes do not fit the label resampler");
                Ok(Self::Argmax(classes))
            }
        }
    }

    /// Labels `seg` (`[k, Y, X]`) from `slab`, a slice per core.
    pub(super) fn apply(&self, slab: &Slab<'_>, seg: &mut [i16]) {
        use rayon::prelude::*;
        seg.par_chunks_mut(slab.plane).enumerate().for_each(|(dz, seg)| match *self {
            Self::Argmax(classes) => {
                let mut best = slab.plane(0, dz).to_vec();
                seg.fill(0);
                for k in 1..classes {
                    for ((s, b), &v) in seg.iter_mut().zip(best.iter_mut()).zip(slab.plane(k, dz)) {
                        if v > *b {
                            *b = v;
                            *s = k as i16;
                        }
                    }
                }
            }
            Self::Regions(writes) => {
                seg.fill(0);
                for (k, &w) in writes.iter().enumerate() {
                    for (s, &v) in seg.iter_mut().zip(slab.plane(k, dz)) {
                        if sigmoid(v) > 0.5 {
                            *s = w as i16;
                        }
                    }
                }
            }
        });
    }
}
