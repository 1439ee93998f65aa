//! Training and validation batches on worker threads (nnU-Net's `nnUNetDataLoader3D` plus the
//! augmentation pipeline, `shared/docs/nnunet-pipeline.md` §5.2–5.3).
//!
//! Batch `i` of a stream is a pure function of `(seed, stream, i)`: its cases, patch corners
//! and augmentation draws come from one [`SplitMix64`] seeded from those three numbers. Worker
//! `w` of `W` builds batches `w, w+W, …` into its own bounded channel and the consumer reads
//! the channels round-robin, so batches arrive in order, at most `W · prefetch` are held, and
//! the result does not depend on the number of workers or on timing.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stu_core::rng::SplitMix64;

use crate::augment::{AugConfig, Sample, augment, center_crop, nearest_resize};
use crate::dataset::DatasetError;
use crate::preprocess::{Preprocessed, load};
use crate::sampler::{Oversampling, choose_corner, crop_pad, forced_at};

/// Preprocessed cases of one split, read from disk once and kept in memory while the total
/// stays under a budget (beyond it, each sample reads its case again: the page cache helps).
pub struct CaseStore {
    dir: PathBuf,
    ids: Vec<String>,
    cache: Vec<Mutex<Option<Arc<Preprocessed>>>>,
    keep: bool,
    /// A cascade's second stage: where the first stage's segmentations are and the labels
    /// they may hold, and those read.
    previous: Option<(Vec<PathBuf>, Vec<i16>)>,
    previous_cache: Vec<Mutex<Option<Arc<Vec<i16>>>>>,
}

impl CaseStore {
    /// Cases `ids` in the preprocessed folder `dir`; `budget` bytes may stay in memory.
    pub fn new(dir: &Path, ids: Vec<String>, budget: u64) -> Result<Self, DatasetError> {
        let mut total = 0u64;
        for id in &ids {
            let f = dir.join(format!("{id}_data.f32"));
            let meta = std::fs::metadata(&f).map_err(|e| DatasetError::File { path: f.clone(), reason: format!("preprocessed case `{id}` is missing: {e}") })?;
            total += meta.len();
        }
        let cache = ids.iter().map(|_| Mutex::new(None)).collect();
        let previous_cache = ids.iter().map(|_| Mutex::new(None)).collect();
        Ok(Self { dir: dir.to_path_buf(), ids, cache, keep: total <= budget, previous: None, previous_cache })
    }

    /// For a cascade's second stage: every case's first-stage segmentation is in one of `dirs`
    /// (`crate::cascade`); fails naming the cases that have none.
    pub fn with_previous_stage(mut self, dirs: Vec<PathBuf>, labels: Vec<i16>) -> Result<Self, DatasetError> {
        let missing: Vec<&str> = self.ids.iter().filter(|id| crate::cascade::holding(&dirs, id).is_none()).map(String::as_str).collect();
        if !missing.is_empty() {
            let list = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
            return Err(DatasetError::File {
                path: dirs.first().cloned().unwrap_or_default(),
                reason: format!("no segmentation from the previous stage for {} case(s) ({}) in {list}: train the first stage on every fold (or on fold `all`), whose final validations write them", missing.len(), missing.join(", ")),
            });
        }
        self.previous = Some((dirs, labels));
        Ok(self)
    }

    /// Case `i`'s segmentation from the previous stage (a cascade's), on its preprocessed grid.
    pub fn previous(&self, i: usize) -> Result<Arc<Vec<i16>>, DatasetError> {
        let mut slot = self.previous_cache[i].lock().expect("case cache poisoned");
        if let Some(c) = slot.as_ref() {
            return Ok(Arc::clone(c));
        }
        let [_, z, y, x] = self.get(i)?.props.shape;
        let (dirs, labels) = self.previous.as_ref().expect("a store with a previous stage (`with_previous_stage`)");
        let seg = Arc::new(crate::cascade::load_previous_stage(dirs, &self.ids[i], [z, y, x], labels)?);
        if self.keep {
            *slot = Some(Arc::clone(&seg));
        }
        Ok(seg)
    }

    /// Case ids.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Case `i`.
    pub fn get(&self, i: usize) -> Result<Arc<Preprocessed>, DatasetError> {
        let mut slot = self.cache[i].lock().expect("case cache poisoned");
        if let Some(c) = slot.as_ref() {
            return Ok(Arc::clone(c));
        }
        let c = Arc::new(load(&self.dir, &self.ids[i])?);
        if self.keep {
            *slot = Some(Arc::clone(&c));
        }
        Ok(c)
    }
}

/// How batches are made.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// The network's patch F.
    pub patch: [usize; 3],
    /// Augmentation; `None` for validation (final patch loaded directly, no transforms).
    pub augment: Option<AugConfig>,
    /// Per output, the factor of the target's extent (full resolution first).
    pub ds_scales: Vec<[f64; 3]>,
    /// A region-based dataset's regions (foreground oversampling draws among them); empty
    /// otherwise.
    pub regions: Vec<crate::dataset::Region>,
    /// This batch's place in a global batch split over data-parallel ranks:
    /// `(index of its first sample, global batch size)`; `None` when it is the whole batch.
    /// Foreground oversampling follows the global index, so the last third of the *global*
    /// batch is forced to foreground however it is split (nnU-Net's DDP rule).
    pub shard: Option<(usize, usize)>,
    /// A cascade's second stage: the labels of the previous stage's segmentation, one-hot
    /// encoded after the image channels (empty: no cascade).
    pub cascade: Vec<i16>,
    /// Which samples are forced to contain foreground.
    pub oversampling: Oversampling,
}

/// One batch on the CPU.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[B, C, D, H, W]` row-major.
    pub data: Vec<f32>,
    /// Its shape.
    pub shape: [usize; 5],
    /// Targets per supervised output: labels (−1 already mapped to 0) and `[B, d, h, w]`.
    pub targets: Vec<(Vec<i16>, [usize; 4])>,
    /// Case ids, one per sample.
    pub keys: Vec<String>,
}

fn batch_seed(seed: u64, stream: u64, index: u64) -> u64 {
    let mut r = SplitMix64::new(seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let a = r.next_u64();
    SplitMix64::new(a ^ index.wrapping_mul(0xbf58_476d_1ce4_e5b9)).next_u64()
}

/// Builds batch `index` of stream `stream` (deterministic).
pub fn make_batch(store: &CaseStore, cfg: &BatchConfig, seed: u64, stream: u64, index: u64) -> Result<Batch, DatasetError> {
    let mut rng = SplitMix64::new(batch_seed(seed, stream, index));
    let b = cfg.batch_size;
    let f = cfg.patch;
    let loaded = cfg.augment.as_ref().map_or(f, |a| a.initial_patch(f));
    let n: usize = f.iter().product();
    let mut data = Vec::new();
    let mut segs: Vec<Vec<i16>> = Vec::with_capacity(b);
    let mut keys = Vec::with_capacity(b);
    let mut channels = 0;
    for j in 0..b {
        let i = rng.below(store.ids().len() as u64) as usize;
        let case = store.get(i)?;
        let [c, z, y, x] = case.props.shape;
        channels = c;
        let (first, global) = cfg.shard.unwrap_or((0, b));
        let forced = match cfg.oversampling {
            Oversampling::BatchPosition(p) => forced_at(first + j, global, p),
            Oversampling::Probabilistic(p) => rng.uniform(0.0, 1.0) < p,
        };
        let corner = choose_corner(&mut rng, &case, forced, loaded, f, &cfg.regions);
        let (d, mut s) = crop_pad(&case.data, &case.seg, c, [z, y, x], corner, loaded);
        if !cfg.cascade.is_empty() {
            // The previous stage's segmentation rides along as a second label map.
            let (_, p) = crop_pad(&[], &store.previous(i)?, 0, [z, y, x], corner, loaded);
            s.extend(p);
        }
        let sample = Sample { data: d, seg: s, channels: c, shape: loaded };
        let mut out = match &cfg.augment {
            Some(aug) => augment(&mut rng, aug, &sample, f),
            None => center_crop(&sample, f),
        };
        out.seg.iter_mut().for_each(|v| *v = (*v).max(0));
        data.extend_from_slice(&out.data);
        if !cfg.cascade.is_empty() {
            channels = c + cfg.cascade.len();
            let mut hot = crate::cascade::one_hot(&out.seg[n..], &cfg.cascade);
            if cfg.augment.is_some() {
                crate::cascade::perturb(&mut rng, &mut hot, cfg.cascade.len(), f);
            }
            data.extend_from_slice(&hot);
            out.seg.truncate(n);
        }
        segs.push(out.seg);
        keys.push(case.props.id.clone());
    }
    debug_assert_eq!(data.len(), b * channels * n);
    let targets = cfg
        .ds_scales
        .iter()
        .map(|s| {
            let shape: [usize; 3] = std::array::from_fn(|a| ((f[a] as f64 * s[a]).round() as usize).max(1));
            let mut t = Vec::with_capacity(b * shape.iter().product::<usize>());
            for seg in &segs {
                t.extend(nearest_resize(seg, f, shape));
            }
            (t, [b, shape[0], shape[1], shape[2]])
        })
        .collect();
    Ok(Batch { data, shape: [b, channels, f[0], f[1], f[2]], targets, keys })
}

/// A batch stream on worker threads.
pub struct Loader {
    rx: Vec<Receiver<Result<Batch, DatasetError>>>,
    start: u64,
    next: u64,
    end: u64,
    waited: Duration,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Loader {
    /// Batches `start..end` of stream `stream`, on `workers` threads with `prefetch` batches
    /// queued per worker.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(store: Arc<CaseStore>, cfg: BatchConfig, seed: u64, stream: u64, start: u64, end: u64, workers: usize, prefetch: usize) -> Self {
        let workers = workers.max(1);
        let mut rx = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers as u64 {
            let (tx, r): (SyncSender<_>, _) = sync_channel(prefetch.max(1));
            rx.push(r);
            let (store, cfg) = (Arc::clone(&store), cfg.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("stu-loader-{w}"))
                    .spawn(move || {
                        let mut i = start + w;
                        while i < end {
                            let b = make_batch(&store, &cfg, seed, stream, i);
                            let failed = b.is_err();
                            if tx.send(b).is_err() || failed {
                                return; // consumer gone, or the error is delivered
                            }
                            i += workers as u64;
                        }
                    })
                    .expect("cannot spawn a loader thread"),
            );
        }
        Self { rx, start, next: start, end, waited: Duration::ZERO, workers: handles }
    }

    /// The next batch in order, or `None` at the end of the range.
    pub fn next_batch(&mut self) -> Option<Result<Batch, DatasetError>> {
        if self.next >= self.end {
            return None;
        }
        let t = Instant::now();
        let worker = ((self.next - self.start) % self.rx.len() as u64) as usize;
        let b = self.rx[worker].recv();
        self.waited += t.elapsed();
        self.next += 1;
        Some(b.unwrap_or_else(|_| Err(DatasetError::File { path: PathBuf::from("<loader>"), reason: "a loader thread stopped".into() })))
    }

    /// Total time the consumer spent waiting for batches.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.rx.clear(); // unblocks workers waiting on a full channel
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::{CaseProperties, save};

    fn store(dir: &Path) -> Arc<CaseStore> {
        store_with(dir, |z, _, x, k| i16::from(x > 8 && z > 4) * (1 + (k as i16 % 2)))
    }

    /// Three 12×14×16 cases labelled by `label(z, y, x, case)`.
    fn store_with(dir: &Path, label: impl Fn(usize, usize, usize, u64) -> i16) -> Arc<CaseStore> {
        let mut ids = Vec::new();
        for k in 0..3 {
            let shape = [1, 12, 14, 16];
            let n = 12 * 14 * 16;
            let mut rng = SplitMix64::new(k);
            let seg: Vec<i16> = (0..n).map(|i| label(i / 224, i / 16 % 14, i % 16, k)).collect();
            let mut locations = Vec::new();
            let mut class_locations = std::collections::BTreeMap::new();
            let mut offset = 0;
            for l in 1..3i16 {
                let locs: Vec<[u32; 3]> = (0..n).filter(|&i| seg[i] == l).map(|i| [(i / 224) as u32, (i / 16 % 14) as u32, (i % 16) as u32]).collect();
                class_locations.insert(l.to_string(), [offset, locs.len()]);
                offset += locs.len();
                locations.push((l, locs));
            }
            let id = format!("case_{k}");
            let props = CaseProperties {
                id: id.clone(),
                shape,
                spacing: [1.0; 3],
                original_spacing: [1.0; 3],
                shape_before_cropping: [12, 14, 16],
                bbox_used_for_cropping: [[0, 12], [0, 14], [0, 16]],
                shape_after_cropping_and_before_resampling: [12, 14, 16],
                affine: [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
                class_locations,
            };
            save(dir, &Preprocessed { data: rng.fill_f32(n, -1.0, 1.0), seg, props, locations, region_locations: Vec::new() }).unwrap();
            ids.push(id);
        }
        Arc::new(CaseStore::new(dir, ids, 1 << 30).unwrap())
    }

    #[test]
    fn batches_do_not_depend_on_workers_and_targets_follow_the_scales() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let cfg = BatchConfig { batch_size: 2, patch: [8, 8, 8], augment: Some(AugConfig::nnunet([8, 8, 8])), ds_scales: vec![[1.0; 3], [0.5; 3], [0.25; 3]], regions: Vec::new(), shard: None, cascade: Vec::new(), oversampling: Default::default() };
        let collect = |workers| {
            let mut l = Loader::spawn(Arc::clone(&store), cfg.clone(), 42, 3, 5, 12, workers, 2);
            let mut v = Vec::new();
            while let Some(b) = l.next_batch() {
                v.push(b.unwrap());
            }
            v
        };
        let one = collect(1);
        assert_eq!(one.len(), 7);
        assert_eq!(one, collect(3));
        let b = &one[0];
        assert_eq!(b.shape, [2, 1, 8, 8, 8]);
        assert_eq!(b.targets.iter().map(|t| t.1).collect::<Vec<_>>(), [[2, 8, 8, 8], [2, 4, 4, 4], [2, 2, 2, 2]]);
        assert!(b.targets.iter().all(|(t, _)| t.iter().all(|&v| (0..3).contains(&v))));
        assert_eq!(make_batch(&store, &cfg, 42, 3, 5).unwrap(), one[0]);
        assert_ne!(make_batch(&store, &cfg, 42, 4, 5).unwrap(), one[0], "another stream differs");
        // Sample 1 of 2 is forced to foreground: every batch has some.
        assert!(one.iter().all(|b| b.targets[0].0[512..].iter().any(|&v| v > 0)));
    }

    #[test]
    fn a_shard_oversamples_by_its_place_in_the_global_batch() {
        // Foreground: two 2³ blobs in opposite corners, rarely inside a random 4³ patch.
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path(), |z, y, x, _| if z >= 10 && y >= 12 && x >= 14 { 1 } else if z < 2 && y < 2 && x < 2 { 2 } else { 0 });
        let cfg = |shard| BatchConfig { batch_size: 1, patch: [4, 4, 4], augment: None, ds_scales: vec![[1.0; 3]], regions: Vec::new(), shard, cascade: Vec::new(), oversampling: Default::default() };
        let with_fg = |shard| (0..40).filter(|&i| make_batch(&store, &cfg(shard), 7, 0, i).unwrap().targets[0].0.iter().any(|&v| v > 0)).count();
        assert_eq!(with_fg(Some((1, 2))), 40, "the second sample of a global batch of 2 is forced to foreground");
        assert!(with_fg(Some((0, 2))) < 20, "the first is not");
        assert!(with_fg(None) < 20, "nor is a batch of one");
        // Probabilistic oversampling (nnUNetTrainer_probabilisticOversampling): each sample on
        // its own with probability p, whatever its place.
        let with_p = |p: f64| (0..200).filter(|&i| make_batch(&store, &BatchConfig { oversampling: Oversampling::Probabilistic(p), ..cfg(Some((0, 2))) }, 7, 0, i).unwrap().targets[0].0.iter().any(|&v| v > 0)).count();
        let (none, all, half) = (with_p(0.0), with_p(1.0), with_p(0.5));
        assert_eq!(all, 200);
        assert!(none < 60 && half > none + 60 && half < all - 40, "p 0: {none}, 0.5: {half}, 1: {all} of 200");
        // The position rule at another fraction: p 0.9 forces the first of two as well.
        assert_eq!((0..40).filter(|&i| make_batch(&store, &BatchConfig { oversampling: Oversampling::BatchPosition(0.9), ..cfg(Some((0, 2))) }, 7, 0, i).unwrap().targets[0].0.iter().any(|&v| v > 0)).count(), 40);
        assert_eq!([1, 2, 3, 4, 8].map(Oversampling::effective_fraction), [0.0, 0.5, 1.0 / 3.0, 0.25, 0.375]);
    }

    #[test]
    fn a_cascade_batch_carries_the_previous_stage_one_hot_after_the_images() {
        let dir = tempfile::tempdir().unwrap();
        let plain = store(dir.path());
        let ids = plain.ids().to_vec();
        // The previous stage "predicted" each case's own labels.
        let prev_dir = dir.path().join("predicted_next_stage");
        for (i, id) in ids.iter().enumerate() {
            let case = plain.get(i).unwrap();
            let [_, z, y, x] = case.props.shape;
            crate::cascade::save_next_stage(&prev_dir, id, &case.seg.iter().map(|&v| v.max(0)).collect::<Vec<_>>(), [z, y, x]).unwrap();
        }
        let cascaded = Arc::new(CaseStore::new(dir.path(), ids.clone(), 1 << 30).unwrap().with_previous_stage(vec![prev_dir.clone()], vec![1, 2]).unwrap());
        let cfg = BatchConfig { batch_size: 2, patch: [8, 8, 8], augment: None, ds_scales: vec![[1.0; 3]], regions: Vec::new(), shard: None, cascade: vec![1, 2], oversampling: Default::default() };
        let n = 512;
        for i in 0..6 {
            let b = make_batch(&cascaded, &cfg, 3, 0, i).unwrap();
            assert_eq!(b.shape, [2, 3, 8, 8, 8]);
            let without = make_batch(&plain, &BatchConfig { cascade: Vec::new(), ..cfg.clone() }, 3, 0, i).unwrap();
            for j in 0..2 {
                let sample = &b.data[j * 3 * n..(j + 1) * 3 * n];
                assert_eq!(&sample[..n], &without.data[j * n..(j + 1) * n], "the image channel is unchanged");
                let target = &b.targets[0].0[j * n..(j + 1) * n];
                assert_eq!(&sample[n..], crate::cascade::one_hot(target, &[1, 2]).as_slice(), "batch {i}, sample {j}");
            }
        }
        // With augmentation the previous stage is moved with the labels, then perturbed: still
        // one-hot, at most one label per voxel.
        // Here the previous stage equals the labels, so only the perturbation (p 0.4, then
        // p 0.2) can make the two differ.
        let aug = BatchConfig { augment: Some(AugConfig::nnunet([8, 8, 8])), ..cfg.clone() };
        let mut perturbed = 0;
        for i in 0..30 {
            let b = make_batch(&cascaded, &aug, 5, 0, i).unwrap();
            for j in 0..2 {
                let hot = &b.data[j * 3 * n + n..(j + 1) * 3 * n];
                assert!(hot.iter().all(|&v| v == 0.0 || v == 1.0));
                assert!((0..n).all(|v| hot[v] + hot[n + v] <= 1.0));
                perturbed += usize::from(hot != crate::cascade::one_hot(&b.targets[0].0[j * n..(j + 1) * n], &[1, 2]).as_slice());
            }
        }
        assert!((4..40).contains(&perturbed), "{perturbed} of 60 samples perturbed");
        // A case without a previous-stage segmentation is named before training starts.
        std::fs::remove_file(prev_dir.join(format!("{}.json", ids[1]))).unwrap();
        let e = CaseStore::new(dir.path(), ids.clone(), 1 << 30).unwrap().with_previous_stage(vec![prev_dir], vec![1, 2]).err().unwrap().to_string();
        assert!(e.contains(&ids[1]) && e.contains("1 case(s)"), "{e}");
    }
}
