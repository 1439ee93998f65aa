//! `stu ensemble`: nnU-Net's `nnUNetv2_ensemble`: the softmax probabilities that several
//! `stu predict --save-probabilities` runs wrote (`{case}.probabilities.safetensors`, e.g. of
//! two model sizes or configurations) averaged per case in f32, then the argmax, written with
//! the geometry of the first folder's label map. The averaged probabilities are thresholded
//! directly (nnU-Net v2.2 re-applies the softmax to them: harmless for the argmax, §8). One
//! class of every member is in memory at a time. A region-based model's sigmoid probabilities
//! (their metadata name the label each output writes) are averaged likewise and thresholded
//! at 0.5, later regions over earlier ones.
//!
//! A member may also be a folder that nnU-Net itself predicted with `--save_probabilities`
//! (`{case}.npz` beside `{case}.nii.gz`): its `probabilities.npy` is inflated class by class as
//! the average needs it (no pickle is read: the geometry is the label map's, and a region-based
//! model's order comes from the `dataset.json` nnU-Net writes into its output folder, or the
//! model folder above a `fold_K/validation`).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

/// A case's probabilities file, `{case}.probabilities.safetensors` or nnU-Net's `{case}.npz`,
/// read one class at a time.
struct Probabilities {
    path: PathBuf,
    source: Source,
    /// `[classes, z, y, x]`.
    shape: [usize; 4],
    /// A region-based model's label per output (sigmoid probabilities), from the metadata.
    regions: Option<Vec<u16>>,
}

enum Source {
    /// Ours: float16 from byte `start` on, any class at any time.
    Safetensors { file: std::fs::File, start: u64 },
    /// nnU-Net's: `probabilities.npy` in a zip archive, inflated in class order; `next` is the
    /// class the stream is at; the entry's CRC-32 is checked after the last.
    Npz { stream: Crc<Box<dyn Read + Send>>, dtype: NpyFloat, next: usize, crc: u32 },
}

/// A reader that keeps the CRC-32 of what it read.
struct Crc<R> {
    inner: R,
    hasher: crc32fast::Hasher,
}

impl<R: Read> Read for Crc<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The float types of a probabilities file (little-endian; a `.npy`'s in C order; ours F16).
#[derive(Debug, Clone, Copy, PartialEq)]
enum NpyFloat {
    F16,
    F32,
    F64,
}

impl NpyFloat {
    fn size(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
            Self::F64 => 8,
        }
    }
}

/// The probabilities of case `id` in prediction folder `dir`: ours, else nnU-Net's `.npz`.
pub fn find_probabilities(dir: &Path, id: &str) -> Option<PathBuf> {
    [crate::predict::probabilities_path(dir, id), dir.join(format!("{id}{NPZ}"))].into_iter().find(|p| p.exists())
}

/// nnU-Net's probabilities file ending.
const NPZ: &str = ".npz";

impl Probabilities {
    fn open(path: &Path) -> Result<Self> {
        if path.extension().is_some_and(|e| e == "npz") {
            return Self::open_npz(path);
        }
        let mut file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let mut n = [0u8; 8];
        file.read_exact(&mut n).with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let n = u64::from_le_bytes(n);
        ensure!(n < 1 << 20, "{}: not a safetensors file (header of {n} bytes)", path.display());
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).with_context(|| format!("{}: truncated header", path.display()))?;
        let header: serde_json::Value = serde_json::from_slice(&header).with_context(|| format!("{}: corrupt header", path.display()))?;
        let t = &header["probabilities"];
        ensure!(t["dtype"] == "F16", "{}: `probabilities` is not float16 (written by `stu predict --save-probabilities`?)", path.display());
        let shape: [usize; 4] = serde_json::from_value(t["shape"].clone()).with_context(|| format!("{}: `probabilities` is not [classes, z, y, x]", path.display()))?;
        let [a, b]: [u64; 2] = serde_json::from_value(t["data_offsets"].clone()).with_context(|| format!("{}: no data offsets", path.display()))?;
        ensure!(b - a == 2 * shape.iter().product::<usize>() as u64, "{}: data size does not match the shape {shape:?}", path.display());
        let len = file.metadata()?.len();
        ensure!(8 + n + b <= len, "{}: truncated ({len} bytes, the header promises {})", path.display(), 8 + n + b);
        let regions = match header.pointer("/__metadata__/regions_class_order").and_then(|v| v.as_str()) {
            Some(r) => Some(serde_json::from_str::<Vec<u16>>(r).with_context(|| format!("{}: corrupt `regions_class_order` metadata", path.display()))?),
            None => None,
        };
        if let Some(r) = &regions {
            ensure!(r.len() == shape[0], "{}: {} regions in the metadata for {} outputs", path.display(), r.len(), shape[0]);
        }
        Ok(Self { path: path.to_path_buf(), source: Source::Safetensors { file, start: 8 + n + a }, shape, regions })
    }

    /// nnU-Net's `{case}.npz` (`np.savez_compressed(probabilities=…)`): the archive's
    /// `probabilities.npy` entry, stored or deflated, its `.npy` header read, the stream left at
    /// the first class.
    fn open_npz(path: &Path) -> Result<Self> {
        let name = "probabilities.npy";
        let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let mut archive = zip::ZipArchive::new(file).with_context(|| format!("{}: not a zip archive (an .npz?)", path.display()))?;
        let (method, start, packed, size, crc) = {
            let entry = archive.by_name(name).with_context(|| format!("{}: no `{name}` (written by nnU-Net's --save_probabilities?)", path.display()))?;
            let start = entry.data_start().with_context(|| format!("{}: `{name}` has no data offset", path.display()))?;
            (entry.compression(), start, entry.compressed_size(), entry.size(), entry.crc32())
        };
        let mut raw = archive.into_inner();
        raw.seek(SeekFrom::Start(start))?;
        let raw = std::io::BufReader::with_capacity(1 << 20, raw.take(packed));
        let inner: Box<dyn Read + Send> = match method {
            zip::CompressionMethod::Stored => Box::new(raw),
            zip::CompressionMethod::Deflated => Box::new(flate2::bufread::DeflateDecoder::new(raw)),
            other => bail!("{}: `{name}` is compressed with {other:?}; nnU-Net writes deflate", path.display()),
        };
        let mut stream = Crc { inner, hasher: crc32fast::Hasher::new() };
        let (dtype, shape, header) = read_npy_header(&mut stream).with_context(|| format!("{}: `{name}`", path.display()))?;
        let shape: [usize; 4] = shape.try_into().map_err(|s: Vec<usize>| anyhow::anyhow!("{}: `{name}` has shape {s:?}, not [classes, z, y, x]", path.display()))?;
        let want = header as u64 + (shape.iter().product::<usize>() * dtype.size()) as u64;
        ensure!(size == want, "{}: `{name}` holds {size} bytes; its header promises {want}", path.display());
        let regions = npz_regions(path)?;
        if let Some(r) = &regions {
            ensure!(r.len() == shape[0], "{}: {} regions in the folder's dataset.json for {} outputs", path.display(), r.len(), shape[0]);
        }
        Ok(Self { path: path.to_path_buf(), source: Source::Npz { stream, dtype, next: 0, crc }, shape, regions })
    }

    /// Class `k`'s probabilities, added to `sum` (an `.npz` in class order only).
    fn add_class(&mut self, k: usize, sum: &mut [f32]) -> Result<()> {
        let n: usize = self.shape[1..].iter().product();
        let path = &self.path;
        let (dtype, bytes) = match &mut self.source {
            Source::Safetensors { file, start } => {
                let mut bytes = vec![0u8; 2 * n];
                file.seek(SeekFrom::Start(*start + (2 * n * k) as u64))?;
                file.read_exact(&mut bytes).with_context(|| format!("{}: cannot read class {k}", path.display()))?;
                (NpyFloat::F16, bytes)
            }
            Source::Npz { stream, dtype, next, crc } => {
                ensure!(k == *next, "{}: class {k} asked after class {}; an .npz is read in class order", path.display(), *next as isize - 1);
                let mut bytes = vec![0u8; dtype.size() * n];
                stream.read_exact(&mut bytes).with_context(|| format!("{}: cannot read class {k} (truncated or corrupt)", path.display()))?;
                *next += 1;
                if *next == self.shape[0] {
                    // The whole entry is read: nothing may follow, and its checksum must hold.
                    let mut rest = Vec::new();
                    stream.read_to_end(&mut rest).with_context(|| format!("{}: corrupt after the last class", path.display()))?;
                    let got = stream.hasher.clone().finalize();
                    ensure!(rest.is_empty() && got == *crc, "{}: `probabilities.npy` is corrupt (CRC-32 {got:08x}, the archive says {crc:08x})", path.display());
                }
                (*dtype, bytes)
            }
        };
        match dtype {
            NpyFloat::F16 => sum.iter_mut().zip(bytes.chunks_exact(2)).for_each(|(s, b)| *s += half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            NpyFloat::F32 => sum.iter_mut().zip(bytes.chunks_exact(4)).for_each(|(s, b)| *s += f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            // (nnU-Net's average_probabilities also works in float32.)
            NpyFloat::F64 => sum.iter_mut().zip(bytes.chunks_exact(8)).for_each(|(s, b)| *s += f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32),
        }
        Ok(())
    }
}

/// A `.npy` stream's header: its float type, shape and length in bytes (the data follow).
/// Only little-endian floats in C order are taken.
fn read_npy_header(r: &mut dyn Read) -> Result<(NpyFloat, Vec<usize>, usize)> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).context("truncated before its header")?;
    ensure!(&magic[..6] == b"\x93NUMPY", "not a .npy array");
    let (len, prefix) = match magic[6] {
        1 => {
            let mut l = [0u8; 2];
            r.read_exact(&mut l)?;
            (u16::from_le_bytes(l) as usize, 10)
        }
        2 | 3 => {
            let mut l = [0u8; 4];
            r.read_exact(&mut l)?;
            (u32::from_le_bytes(l) as usize, 12)
        }
        v => bail!(".npy format version {v} is unknown"),
    };
    ensure!(len < 1 << 16, ".npy header of {len} bytes");
    let mut text = vec![0u8; len];
    r.read_exact(&mut text).context("truncated header")?;
    let text = String::from_utf8_lossy(&text);
    // The header is a Python dict literal: {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4, 5), }
    let value = |key: &str| -> Result<&str> {
        let at = text.find(&format!("'{key}':")).with_context(|| format!("no `{key}` in the .npy header {text:?}"))?;
        Ok(text[at + key.len() + 3..].trim_start())
    };
    let descr = value("descr")?;
    let dtype = match descr.split('\'').nth(1) {
        Some("<f2") => NpyFloat::F16,
        Some("<f4") => NpyFloat::F32,
        Some("<f8") => NpyFloat::F64,
        other => bail!("dtype {other:?}: probabilities are little-endian float16, float32 or float64"),
    };
    ensure!(value("fortran_order")?.starts_with("False"), "a Fortran-order array; nnU-Net writes C order");
    let shape = value("shape")?;
    let inner = shape.strip_prefix('(').and_then(|s| s.split(')').next()).with_context(|| format!("shape {shape:?} is not a tuple"))?;
    let shape = inner.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse::<usize>().with_context(|| format!("shape entry {s:?}"))).collect::<Result<Vec<_>>>()?;
    Ok((dtype, shape, prefix + len))
}

/// A region-based model's label per output for nnU-Net's probabilities at `npz`, from the
/// `dataset.json` nnU-Net's predictor writes into its output folder (or a model folder above a
/// `fold_K/validation` folder); `None` for plain labels (or no dataset.json: softmax assumed).
fn npz_regions(npz: &Path) -> Result<Option<Vec<u16>>> {
    let Some(json) = npz.ancestors().skip(1).take(3).map(|d| d.join("dataset.json")).find(|p| p.exists()) else {
        return Ok(None);
    };
    let dataset = stu_data::dataset::DatasetJson::read(&json).with_context(|| format!("{}: the dataset.json of {}", json.display(), npz.display()))?;
    Ok(dataset.regions.map(|r| r.iter().map(|r| r.writes).collect()))
}

/// Ensembles the probabilities of `folders` case by case into label maps (and, with
/// `save_probabilities`, the averaged probabilities) in `output`. Cases are those of the
/// first folder; each must be in every folder with the same shape. Returns the case ids.
pub fn ensemble(folders: &[PathBuf], output: &Path, save_probabilities: bool) -> Result<Vec<String>> {
    ensure!(folders.len() >= 2, "an ensemble needs two prediction folders or more");
    let members: Vec<Vec<PathBuf>> = folders.iter().map(|f| vec![f.clone()]).collect();
    ensemble_members(&members, output, save_probabilities)
}

/// [`ensemble`] of members that each spread their cases over several folders (a model's
/// cross-validation: one `validation/` folder per fold): a case of the first member is looked
/// up in each member's folders in turn and must be in one of them.
pub fn ensemble_members(members_folders: &[Vec<PathBuf>], output: &Path, save_probabilities: bool) -> Result<Vec<String>> {
    ensure!(members_folders.len() >= 2 && members_folders.iter().all(|m| !m.is_empty()), "an ensemble needs two members or more, each with a prediction folder");
    use crate::predict::{PROBABILITIES_SUFFIX as SUFFIX, probabilities_path};
    let mut ids: Vec<String> = Vec::new();
    for f in &members_folders[0] {
        let mut here: Vec<String> = std::fs::read_dir(f)
            .with_context(|| format!("{}: cannot list", f.display()))?
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(SUFFIX).or_else(|| name.strip_suffix(NPZ)).map(str::to_string)
            })
            .collect();
        // (A case with both files is one case.)
        here.sort();
        here.dedup();
        ids.extend(here);
    }
    ids.sort();
    let first = members_folders[0].iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
    ensure!(!ids.is_empty(), "{first}: no {{case}}{SUFFIX} files (predict with --save-probabilities) nor nnU-Net's {{case}}{NPZ}");
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        bail!("{first}: case `{}` is predicted in two of these folders", w[0]);
    }
    std::fs::create_dir_all(output).with_context(|| format!("{}: cannot create", output.display()))?;
    for id in &ids {
        let mut members = Vec::with_capacity(members_folders.len());
        let mut first_folder = None;
        for folders in members_folders {
            let Some((f, file)) = folders.iter().find_map(|f| find_probabilities(f, id).map(|p| (f, p))) else {
                let names = folders.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
                bail!("{names}: case `{id}` has no probabilities here (every member of an ensemble predicts every case)");
            };
            first_folder.get_or_insert_with(|| f.clone());
            members.push(Probabilities::open(&file)?);
        }
        let first_folder = first_folder.expect("two members or more");
        let shape = members[0].shape;
        if let Some(m) = members.iter().find(|m| m.shape != shape) {
            bail!("{}: shape {:?}, {} has {shape:?}", m.path.display(), m.shape, members[0].path.display());
        }
        let regions = members[0].regions.clone();
        if let Some(m) = members.iter().find(|m| m.regions != regions) {
            bail!("{}: {}, {} {}; an ensemble's members predict the same classes or regions", m.path.display(), describe(&m.regions), members[0].path.display(), describe(&regions));
        }
        let label_map = stu_data::nifti_io::find_case(&first_folder, id).unwrap_or_else(|| first_folder.join(format!("{id}.nii.gz")));
        let ending = stu_data::nifti_io::case_of(&label_map).map_or(".nii.gz", |(_, e)| e);
        let geom = stu_data::nifti_io::read_geometry(&label_map).with_context(|| format!("{}: the label map giving the ensemble's geometry", label_map.display()))?;
        ensure!(geom.shape == [shape[1], shape[2], shape[3]], "{}: shape {:?}, its probabilities {shape:?}", label_map.display(), geom.shape);
        let (classes, n) = (shape[0], shape[1] * shape[2] * shape[3]);
        let mut best = vec![f32::NEG_INFINITY; n];
        let mut arg = vec![0u16; n];
        let count = members.len() as f32;
        let first_npz = matches!(members[0].source, Source::Npz { .. });
        let pkl = members[0].path.with_extension("pkl");
        let mut failure = None;
        let mut mean_of = |k: usize| -> Vec<f32> {
            let mut sum = vec![0f32; n];
            for m in members.iter_mut() {
                if let Err(e) = m.add_class(k, &mut sum) {
                    failure.get_or_insert(e);
                }
            }
            sum.iter_mut().for_each(|s| *s /= count);
            match &regions {
                // Regions: the mean sigmoid above 0.5 writes the region's label, later over earlier.
                Some(w) => arg.iter_mut().zip(&sum).for_each(|(a, &v)| if v > 0.5 { *a = w[k] }),
                None => {
                    for ((b, a), &v) in best.iter_mut().zip(arg.iter_mut()).zip(&sum) {
                        if v > *b {
                            *b = v;
                            *a = k as u16;
                        }
                    }
                }
            }
            sum
        };
        // In the first member's format: ours, or nnU-Net's `.npz` with a copy of its `.pkl`
        // (as nnU-Net's `merge_files` pickles the first file's properties).
        let probabilities = if first_npz { crate::predict::npz_path(output, id) } else { probabilities_path(output, id) };
        if save_probabilities {
            crate::predict::write_probabilities(&probabilities, classes, geom.shape, regions.as_deref(), &mut mean_of)?;
            if first_npz && pkl.is_file() && failure.is_none() {
                let bytes = std::fs::read(&pkl).with_context(|| format!("{}: cannot read", pkl.display()))?;
                stu_core::fs::write_atomic(&probabilities.with_extension("pkl"), &bytes).with_context(|| format!("{}: cannot write", output.display()))?;
            }
        } else {
            (0..classes).for_each(|k| drop(mean_of(k)));
        }
        if let Some(e) = failure {
            // What was written from an unreadable member is not kept.
            let _ = std::fs::remove_file(&probabilities);
            return Err(e);
        }
        // In the members' format.
        let out = output.join(format!("{id}{ending}"));
        let max = regions.as_ref().map_or(classes.saturating_sub(1), |w| w.iter().copied().max().unwrap_or(0) as usize);
        stu_data::nifti_io::write_label_as(&out, &arg, &geom, max > 255)?;
    }
    Ok(ids)
}

fn describe(regions: &Option<Vec<u16>>) -> String {
    match regions {
        Some(w) => format!("sigmoid regions writing {w:?}"),
        None => "softmax classes".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/npz")
    }

    fn reference() -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap()).unwrap()
    }

    /// A copy of fixture member `m` in `dir` (its label map, dataset.json and `.npz`).
    fn copy_member(m: &str, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for f in ["case.nii.gz", "case.npz", "dataset.json"] {
            std::fs::copy(fixture().join(m).join(f), dir.join(f)).unwrap();
        }
    }

    #[test]
    fn nnunets_npz_probabilities_ensemble_as_nnunetv2_ensemble_does() {
        // Two folders written by nnU-Net 2.8.1's own export (`tests/fixtures/make_npz_fixture.py`),
        // ensembled: the label map of nnU-Net's `merge_files`, voxel for voxel.
        let want = reference();
        let tmp = tempfile::tempdir().unwrap();
        let ids = ensemble(&[fixture().join("a"), fixture().join("b")], &tmp.path().join("ens"), false).unwrap();
        assert_eq!(ids, ["case"]);
        let got = stu_data::nifti_io::read_label(&tmp.path().join("ens/case.nii.gz")).unwrap();
        let shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
        assert_eq!(got.geom.shape.to_vec(), shape);
        let labels: Vec<u16> = serde_json::from_value(want["labels"].clone()).unwrap();
        assert_eq!(got.data.iter().filter(|&&v| v > 0).count(), labels.iter().filter(|&&v| v > 0).count());
        assert!(got.data == labels, "{} of {} labels differ from nnU-Net's ensemble", got.data.iter().zip(&labels).filter(|(a, b)| a != b).count(), labels.len());
        // The stream's first values are numpy's.
        let mut p = Probabilities::open(&fixture().join("a/case.npz")).unwrap();
        assert_eq!(p.shape.to_vec(), serde_json::from_value::<Vec<usize>>(want["probabilities_shape"].clone()).unwrap());
        let n: usize = p.shape[1..].iter().product();
        let mut class0 = vec![0f32; n];
        p.add_class(0, &mut class0).unwrap();
        let first: Vec<f32> = serde_json::from_value(want["a_first_values"].clone()).unwrap();
        assert_eq!(&class0[..first.len()], &first[..]);
        let err = p.add_class(2, &mut class0).unwrap_err().to_string();
        assert!(err.contains("class order"), "{err}");
    }

    #[test]
    fn an_npz_member_mixes_with_ours_and_bad_ones_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        // Member b rewritten in our format (float16) mixes with nnU-Net's a.
        let ours = tmp.path().join("ours");
        std::fs::create_dir_all(&ours).unwrap();
        std::fs::copy(fixture().join("b/case.nii.gz"), ours.join("case.nii.gz")).unwrap();
        let mut b = Probabilities::open(&fixture().join("b/case.npz")).unwrap();
        let [c, z, y, x] = b.shape;
        crate::predict::write_probabilities(&crate::predict::probabilities_path(&ours, "case"), c, [z, y, x], None, |k| {
            let mut v = vec![0f32; z * y * x];
            b.add_class(k, &mut v).unwrap();
            v
        })
        .unwrap();
        ensemble(&[fixture().join("a"), ours.clone()], &tmp.path().join("mixed"), true).unwrap();
        let labels: Vec<u16> = serde_json::from_value(reference()["labels"].clone()).unwrap();
        let got = stu_data::nifti_io::read_label(&tmp.path().join("mixed/case.nii.gz")).unwrap().data;
        let same = got.iter().zip(&labels).filter(|(a, b)| a == b).count();
        assert!(same * 100 >= labels.len() * 99, "{same} of {} (float16 rounding only)", labels.len());
        // The first member is nnU-Net's: the mean is written as its `.npz` (no `.pkl` beside
        // the fixture's member, so none is copied), and read back as one.
        let mean = crate::predict::npz_path(&tmp.path().join("mixed"), "case");
        assert!(mean.exists() && !mean.with_extension("pkl").exists());
        assert_eq!(Probabilities::open(&mean).unwrap().shape, [c, z, y, x]);
        ensemble(&[ours.clone(), fixture().join("a")], &tmp.path().join("ours-first"), true).unwrap();
        assert!(crate::predict::probabilities_path(&tmp.path().join("ours-first"), "case").exists());
        // A truncated .npz is named, and nothing is written for its case.
        let cut = tmp.path().join("cut");
        copy_member("a", &cut);
        let bytes = std::fs::read(cut.join("case.npz")).unwrap();
        std::fs::write(cut.join("case.npz"), &bytes[..bytes.len() / 2]).unwrap();
        let err = format!("{:#}", ensemble(&[fixture().join("b"), cut.clone()], &tmp.path().join("cut-ens"), false).unwrap_err());
        assert!(err.contains("cut/case.npz"), "{err}");
        assert!(!tmp.path().join("cut-ens/case.nii.gz").exists());
        // Corrupt deflate data: the class that cannot be read is named.
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        bad[mid..mid + 64].iter_mut().for_each(|b| *b ^= 0x5a);
        std::fs::write(cut.join("case.npz"), &bad).unwrap();
        let err = format!("{:#}", ensemble(&[fixture().join("b"), cut.clone()], &tmp.path().join("cut-ens"), false).unwrap_err());
        assert!(err.contains("cut/case.npz"), "{err}");
        // An uncompressed .npz (numpy's `savez`) reads the same; a flipped byte in it, which
        // only the archive's CRC-32 catches, is named.
        let mut npy = Vec::new();
        zip::ZipArchive::new(std::fs::File::open(fixture().join("a/case.npz")).unwrap()).unwrap().by_name("probabilities.npy").unwrap().read_to_end(&mut npy).unwrap();
        let stored = |npy: &[u8]| {
            use std::io::Write;
            let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
            w.start_file("probabilities.npy", zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored)).unwrap();
            w.write_all(npy).unwrap();
            let bytes = w.finish().unwrap().into_inner();
            std::fs::write(cut.join("case.npz"), bytes).unwrap();
        };
        stored(&npy);
        ensemble(&[fixture().join("b"), cut.clone()], &tmp.path().join("stored-ens"), false).unwrap();
        let got = stu_data::nifti_io::read_label(&tmp.path().join("stored-ens/case.nii.gz")).unwrap().data;
        assert!(got == labels, "stored and deflated read alike");
        // (In the archive's bytes, after the writer computed the checksum.)
        let mut archive = std::fs::read(cut.join("case.npz")).unwrap();
        let at = archive.windows(6).position(|w| w == b"\x93NUMPY").unwrap() + npy.len() - 1;
        archive[at] ^= 1;
        std::fs::write(cut.join("case.npz"), archive).unwrap();
        let err = format!("{:#}", ensemble(&[fixture().join("b"), cut.clone()], &tmp.path().join("flip-ens"), false).unwrap_err());
        assert!(err.contains("cut/case.npz") && err.contains("CRC-32"), "{err}");
        assert!(!tmp.path().join("flip-ens/case.nii.gz").exists());
        // A region-based nnU-Net folder (its dataset.json) does not mix with softmax classes.
        let regions = tmp.path().join("regions");
        copy_member("a", &regions);
        std::fs::write(
            regions.join("dataset.json"),
            r#"{"channel_names": {"0": "MR"}, "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}, "regions_class_order": [1, 2, 3], "numTraining": 1, "file_ending": ".nii.gz"}"#,
        )
        .unwrap();
        let err = format!("{:#}", ensemble(&[fixture().join("b"), regions.clone()], &tmp.path().join("reg-ens"), false).unwrap_err());
        assert!(err.contains("sigmoid regions writing [1, 2, 3]") && err.contains("softmax classes"), "{err}");
        // Not an .npz at all.
        std::fs::write(regions.join("case.npz"), b"not a zip").unwrap();
        let err = format!("{:#}", ensemble(&[fixture().join("b"), regions], &tmp.path().join("reg-ens"), false).unwrap_err());
        assert!(err.contains("regions/case.npz") && err.contains("not a zip"), "{err}");
    }
}
