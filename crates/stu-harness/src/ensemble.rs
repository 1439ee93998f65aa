//! `stu ensemble`: nnU-Net's `nnUNetv2_ensemble`: the softmax probabilities that several
//! `stu predict --save-probabilities` runs wrote (`{case}.probabilities.safetensors`, e.g. of
//! two model sizes or configurations) averaged per case in f32, then the argmax, written with
//! the geometry of the first folder's label map. The averaged probabilities are thresholded
//! directly (nnU-Net v2.2 re-applies the softmax to them: harmless for the argmax, §8). One
//! class of every member is in memory at a time. A region-based model's sigmoid probabilities
//! (their metadata name the label each output writes) are averaged likewise and thresholded
//! at 0.5, later regions over earlier ones.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

/// A `{case}.probabilities.safetensors` file, read one class at a time.
struct Probabilities {
    path: PathBuf,
    file: std::fs::File,
    /// `[classes, z, y, x]`.
    shape: [usize; 4],
    /// Where the float16 data start.
    start: u64,
    /// A region-based model's label per output (sigmoid probabilities), from the metadata.
    regions: Option<Vec<u16>>,
}

impl Probabilities {
    fn open(path: &Path) -> Result<Self> {
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
        Ok(Self { path: path.to_path_buf(), file, shape, start: 8 + n + a, regions })
    }

    /// Class `k`'s probabilities, added to `sum`.
    fn add_class(&mut self, k: usize, sum: &mut [f32]) -> Result<()> {
        let n: usize = self.shape[1..].iter().product();
        let mut bytes = vec![0u8; 2 * n];
        self.file.seek(SeekFrom::Start(self.start + (2 * n * k) as u64))?;
        self.file.read_exact(&mut bytes).with_context(|| format!("{}: cannot read class {k}", self.path.display()))?;
        for (s, b) in sum.iter_mut().zip(bytes.chunks_exact(2)) {
            *s += half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        }
        Ok(())
    }
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
        ids.extend(
            std::fs::read_dir(f)
                .with_context(|| format!("{}: cannot list", f.display()))?
                .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(SUFFIX).map(str::to_string)),
        );
    }
    ids.sort();
    let first = members_folders[0].iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
    ensure!(!ids.is_empty(), "{first}: no {{case}}{SUFFIX} files (predict with --save-probabilities)");
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        bail!("{first}: case `{}` is predicted in two of these folders", w[0]);
    }
    std::fs::create_dir_all(output).with_context(|| format!("{}: cannot create", output.display()))?;
    for id in &ids {
        let mut members = Vec::with_capacity(members_folders.len());
        let mut first_folder = None;
        for folders in members_folders {
            let Some(f) = folders.iter().find(|f| probabilities_path(f, id).exists()) else {
                let names = folders.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
                bail!("{names}: case `{id}` has no probabilities here (every member of an ensemble predicts every case)");
            };
            first_folder.get_or_insert_with(|| f.clone());
            members.push(Probabilities::open(&probabilities_path(f, id))?);
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
        let probabilities = probabilities_path(output, id);
        if save_probabilities {
            crate::predict::write_probabilities(&probabilities, classes, geom.shape, regions.as_deref(), &mut mean_of)?;
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
        stu_data::nifti_io::write_label_as(&out, &arg, &geom, max > 255).with_context(|| out.display().to_string())?;
    }
    Ok(ids)
}

fn describe(regions: &Option<Vec<u16>>) -> String {
    match regions {
        Some(w) => format!("sigmoid regions writing {w:?}"),
        None => "softmax classes".into(),
    }
}
