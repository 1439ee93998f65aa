//! `stu predict`: nnU-Net's inference (`shared/docs/nnunet-pipeline.md` §6) for any registered
//! model: preprocess as in training, Gaussian-weighted sliding window (step 0.5) with mirroring
//! TTA and, given several checkpoints (the folds of a cross-validation), their logits averaged
//! (nnU-Net's fold ensemble), logits accumulated in f32 (not the upstream f16), resampled back
//! channel by channel (order 1, running argmax: no full-resolution map per class is ever held;
//! or, fast, the argmax first and the label map resampled), un-cropped, transposed back, and
//! written with the input's geometry. The tiles run in rows along the first axis, and the
//! export takes the slices no later row reaches as they are finished, so only one patch depth
//! of logits is held (the probabilities too are written as the slices come), except where the
//! whole logits are needed (probabilities of a plan that transposes the first axis away). A
//! folder's cases pass through three stages (read, network, export) that overlap on a GPU.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use stu_data::preprocess::{PreprocessPlan, preprocess_case, transpose};
use stu_data::resample::{resample_linear, separate_axis};
use stu_engine::backend::Backend;
use stu_engine::precision::Precision;
use stu_engine::model::{LoadOptions, SegNet};
use stu_engine::{Device, Tensor, TensorData};

mod slabs;
use slabs::{LabelRule, NetworkTimes, Ring, RowExport, RowProbabilities, Slab, SlabData, SlabMsg, Streamed, paint_region, running_argmax, sigmoid, softmax};

/// The released STU-Net models' plan (1.5 mm isotropic, 128³ patch, z-score), used when no plan
/// is given.
pub fn released_plan() -> serde_json::Value {
    serde_json::json!({
        "plans_name": "STU-Net released (TotalSegmentator)",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "spacing": [1.5, 1.5, 1.5], "patch_size": [128, 128, 128], "batch_size": 2, "batch_dice": false,
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [false],
            "pool_op_kernel_sizes": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
        }},
        "foreground_intensity_properties_per_channel": {}
    })
}

/// Options of `stu predict` (written to the output folder as `predict.json`, as nnU-Net writes
/// `predict_from_raw_data_args.json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PredictOptions {
    /// A NIfTI file or a folder of `{case}_{XXXX}.nii.gz` files.
    pub input: PathBuf,
    /// Output folder.
    pub output: PathBuf,
    /// Checkpoints (ours, nnU-Net v1/v2, safetensors), at least one; with several (the folds of
    /// one training), every tile's logits are averaged over them, as nnU-Net's fold ensemble.
    /// They must agree on channels, classes and plan.
    pub checkpoints: Vec<PathBuf>,
    /// Whether a run folder among `checkpoints` stands for its best checkpoint instead of its
    /// final one (nnU-Net's `-chk checkpoint_best.pth`).
    #[serde(default)]
    pub best: bool,
    /// Model name (default: recognised from the keys).
    pub model: Option<String>,
    /// plans.json (default: the run's, for our checkpoints; else the released STU-Net plan). A
    /// checkpoint of ours predicts with the patch it was trained on.
    pub plans: Option<PathBuf>,
    /// Plans configuration (default: the one the checkpoints were trained with, else
    /// `3d_fullres`).
    pub configuration: Option<String>,
    /// Mirroring TTA off.
    pub disable_tta: bool,
    /// Tile step as a fraction of the patch.
    pub step: f64,
    /// Keep only the largest 26-connected component of each label.
    pub keep_largest: bool,
    /// A `postprocessing.json` (`stu postprocess determine`) applied to every label map.
    pub postprocessing: Option<PathBuf>,
    /// Direct-inference label map (built-in name or TOML file).
    pub label_map: Option<String>,
    /// Also write `{case}.probabilities.safetensors` (softmax, float16, input geometry).
    pub save_probabilities: bool,
    /// The probabilities as nnU-Net writes them instead (`{case}.npz`, float32, and
    /// `{case}.pkl`), for Python nnU-Net's ensembling.
    #[serde(default)]
    pub npz: bool,
    /// Whether the next case is read and the previous one exported while a case runs through
    /// the network (holding two cases' logits), or one case at a time. `None`: overlapped on a
    /// GPU, whose host cores are otherwise idle, one at a time on the CPU, whose cores the
    /// network already fills (3 CTs on 2 cores: the same time, 1.2× the memory overlapped).
    pub overlap: Option<bool>,
    /// Fast export (nnU-Net v1's `--mode fast`, STU-Net's recommended inference): the argmax on
    /// the network's grid, then only the label map resampled to the input's (order 1 per label,
    /// as preprocessing resamples segmentations), instead of every class's logits.
    pub fast_export: bool,
    /// Backend.
    pub backend: Backend,
    /// Arithmetic of the network (bf16/f16 on backends with half-precision kernels); logits
    /// are accumulated in f32 whatever this is.
    pub precision: Precision,
    /// Skip the cases whose label map (and, when asked for, probabilities) is already in the
    /// output folder (nnU-Net's `--continue_prediction`; files are written atomically, so one
    /// that exists is whole).
    #[serde(default)]
    pub continue_prediction: bool,
    /// `(part, parts)`: predict only cases `part, part + parts, …` of the sorted list, so that
    /// `parts` processes (GPUs, machines, job-array tasks) share a folder (nnU-Net's
    /// `-part_id` / `-num_parts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<(usize, usize)>,
    /// The first stage's segmentations, for a configuration that is the second stage of a
    /// cascade (`3d_cascade_fullres`, whose plan names a `previous_stage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_stage: Option<Previous>,
}

/// Where a cascade's second stage finds the first stage's segmentation of a case.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum Previous {
    /// A folder of label maps in the inputs' geometry, `{case}.nii.gz` (or the input's format),
    /// as `stu predict` with the first stage's model writes them (nnU-Net's
    /// `-prev_stage_predictions`); they are preprocessed as segmentations with the image.
    Files(PathBuf),
    /// The first stage's final validations (`RUN/predicted_next_stage/<configuration>`), on the
    /// preprocessed grid already (`stu_data::cascade`).
    NextStage(Vec<PathBuf>),
}

/// A cascade's second stage: the labels one-hot encoded as extra input channels, and where the
/// first stage's segmentations are.
#[derive(Debug, Clone)]
struct Cascade {
    labels: Vec<i16>,
    previous: Previous,
}

/// A loaded predictor.
pub struct Predictor {
    /// One network per checkpoint (the ensemble's members).
    nets: Vec<Box<dyn SegNet>>,
    plan: PreprocessPlan,
    patch: [usize; 3],
    mirror_axes: Vec<usize>,
    step: f64,
    device: Device,
    precision: Precision,
    on_device: Accumulate,
    /// Whether every case's whole logits are summed before the export (`STU_EXPORT=whole`,
    /// for comparison), instead of exporting the slices as they come.
    whole_export: bool,
    fast_export: bool,
    /// A region-based model's label per output (`regions_class_order`): sigmoid outputs, each
    /// written where its probability exceeds 0.5, later ones over earlier ones.
    regions: Option<Vec<u16>>,
    cascade: Option<Cascade>,
    /// The plans configuration predicted with.
    configuration: String,
}

/// Seconds per phase of one case, in order (`stu predict` reports them).
pub type Phases = Vec<(&'static str, f64)>;

/// Where the sliding window sums its tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accumulate {
    /// In host memory.
    Host,
    /// On the device, whatever it costs there (`STU_ACCUMULATE=device`).
    Device,
    /// On the device when the case's logits take at most half the memory still free there
    /// (the tiles' forward needs the rest), else in host memory: a GPU's tiles never leave it
    /// and only the final logits are copied back, but 105 classes of a large CT do not fit a
    /// small card (nnU-Net's users meet that as an out-of-memory error, nnU-Net#2151, #2963).
    DeviceIfItFits,
}

/// In host memory on the CPU backends (flex), on the device where it fits elsewhere;
/// `STU_ACCUMULATE=host|device` overrides the choice.
fn accumulate_on_device(device: &Device) -> Result<Accumulate> {
    match std::env::var("STU_ACCUMULATE").as_deref() {
        Ok("host") => Ok(Accumulate::Host),
        Ok("device") => Ok(Accumulate::Device),
        Ok(other) => bail!("STU_ACCUMULATE=`{other}`: expected `host` or `device`"),
        Err(_) if stu_engine::ops::Layout::for_device(device) == stu_engine::ops::Layout::Ndhwc => Ok(Accumulate::Host),
        Err(_) => Ok(Accumulate::DeviceIfItFits),
    }
}

impl Accumulate {
    /// Whether `bytes` of logits are summed on the device, given what is free there (`None`:
    /// not known, as on a device that does not say).
    fn on_device(self, bytes: u64, free: Option<u64>) -> bool {
        match self {
            Self::Host => false,
            Self::Device => true,
            Self::DeviceIfItFits => free.is_none_or(|f| bytes <= f / 2),
        }
    }
}

/// What one of our training checkpoints records of its run (`stu_checkpoint` metadata): its
/// plans (the copy in its run folder, else its preprocessed folder's) and the patch it was
/// trained on. Foreign checkpoints (nnU-Net's, safetensors exports) record neither.
struct TrainedWith {
    plans: Option<PathBuf>,
    /// The plans configuration it was trained with.
    configuration: Option<String>,
    patch: Option<[usize; 3]>,
    /// Its dataset's labels (the run folder's `dataset.json`, else the preprocessed folder's).
    dataset: Option<PathBuf>,
    /// The axes its test-time augmentation may mirror (`inference_allowed_mirroring_axes`, in
    /// the depth-first axes of this crate: a 2-D network's in-plane `(0, 1)` are `[1, 2]`;
    /// empty: none), when it records them.
    mirror_axes: Option<Vec<usize>>,
}

fn trained_with(checkpoint: &Path) -> Result<TrainedWith> {
    let dict = stu_engine::checkpoint::StateDict::open(checkpoint)?;
    let Some(meta) = dict.metadata().get("stu_checkpoint") else { return Ok(nnunet_model_folder(checkpoint)) };
    let v: serde_json::Value = serde_json::from_str(meta).with_context(|| format!("{}: corrupt `stu_checkpoint` metadata", checkpoint.display()))?;
    let beside = checkpoint.parent().map(|d| d.join("plans.json")).filter(|p| p.exists() && p.parent().is_some_and(|d| d.join("train.json").exists()));
    let plans = match v.pointer("/config/preprocessed").and_then(|d| d.as_str()) {
        _ if beside.is_some() => beside,
        Some(dir) => {
            let p = Path::new(dir).join("plans.json");
            ensure!(p.exists(), "{}: the plans of its training run ({}) are gone; pass --plans", checkpoint.display(), p.display());
            Some(p)
        }
        None => None,
    };
    let dataset = plans.as_ref().and_then(|p| p.parent()).map(|d| d.join("dataset.json")).filter(|p| p.exists());
    let configuration = v.pointer("/config/configuration").and_then(|c| c.as_str()).map(str::to_string);
    let mirror_axes = v.get("inference_allowed_mirroring_axes").and_then(|a| serde_json::from_value(a.clone()).ok());
    Ok(TrainedWith { plans, configuration, patch: v.pointer("/config/patch_size").and_then(|p| serde_json::from_value(p.clone()).ok()), dataset, mirror_axes })
}

/// A checkpoint of nnU-Net's own training, `MODEL/fold_K/*.pth`: its model folder's
/// `plans.json` and `dataset.json`, and the configuration its name ends with
/// (`{TRAINER}__{PLANS}__{CONFIG}`), as nnU-Net's predictor reads them; nothing for other files.
fn nnunet_model_folder(checkpoint: &Path) -> TrainedWith {
    let pth = checkpoint.extension().is_some_and(|e| e == "pth");
    let model = checkpoint.parent().filter(|f| pth && f.file_name().is_some_and(|n| n.to_string_lossy().starts_with("fold_"))).and_then(Path::parent);
    let plans = model.map(|m| m.join("plans.json")).filter(|p| p.is_file());
    let Some(model) = model.filter(|_| plans.is_some()) else { return TrainedWith { plans: None, configuration: None, patch: None, dataset: None, mirror_axes: None } };
    let name = model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let configuration = name.splitn(3, "__").nth(2).map(str::to_string);
    // The checkpoint's `inference_allowed_mirroring_axes` (a tuple, or None for
    // nnUNetTrainerNoMirroring), spatial axes of the network: a 2-D network's are in-plane.
    let planar = configuration.as_deref().zip(plans.as_deref()).and_then(|(c, p)| read_plans(p).ok().and_then(|j| stu_data::plan::configuration(&j, c).ok())).is_some_and(|c| stu_data::plan::is_2d(&c));
    let mirror_axes = match stu_engine::checkpoint::torch_entry(checkpoint, "inference_allowed_mirroring_axes") {
        Ok(stu_engine::checkpoint::PickleValue::None) => Some(Vec::new()),
        Ok(stu_engine::checkpoint::PickleValue::List(v)) => v
            .iter()
            .map(|a| match a {
                stu_engine::checkpoint::PickleValue::Int(a @ 0..=2) => Some(*a as usize),
                _ => None,
            })
            .collect::<Option<Vec<usize>>>()
            .map(|axes| stu_data::sampler::mirror_axes(planar, Some(&axes))),
        _ => None,
    };
    TrainedWith { plans, configuration, patch: None, dataset: Some(model.join("dataset.json")).filter(|p| p.is_file()), mirror_axes }
}

fn read_plans(p: &Path) -> Result<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?).with_context(|| format!("{}: not valid JSON", p.display()))
}

/// A case read from its NIfTI files and preprocessed for the network.
pub struct Case {
    /// Case id.
    pub id: String,
    geom: stu_data::nifti_io::Geometry,
    pre: stu_data::preprocess::Preprocessed,
    /// A cascade's first-stage segmentation on the preprocessed grid (−1 or 0: no label). The
    /// sliding window one-hot encodes it tile by tile, so the volume is never held as
    /// `labels` float channels (104 labels of a whole-body CT: 16.7 GB).
    previous: Option<Vec<i16>>,
}

/// Reads and preprocesses cases as the predictor's plan says ([`Predictor::reader`]).
#[derive(Clone)]
pub struct Reader {
    plan: PreprocessPlan,
    channels: usize,
    cascade: Option<Cascade>,
}

impl Reader {
    /// Reads a case's channel files (the first gives the output's geometry) and preprocesses
    /// them.
    pub fn read(&self, id: &str, images: &[PathBuf]) -> Result<Case> {
        ensure!(images.len() == self.channels, "case `{id}`: {} channel file(s), the model takes {}", images.len(), self.channels);
        let geom = stu_data::nifti_io::read_geometry(&images[0])?;
        let Some(cascade) = &self.cascade else {
            let pre = preprocess_case(id, images, None, &self.plan)?;
            return Ok(Case { id: id.to_string(), geom, pre, previous: None });
        };
        let (pre, previous) = match &cascade.previous {
            Previous::Files(dir) => {
                // Preprocessed as a segmentation of the image (cropped, resampled per label).
                // (in the input's format first, as `stu predict` writes them)
                let file = std::iter::once(output_ending(&images[0]))
                    .chain(stu_data::dataset::DATASET_ENDINGS)
                    .map(|e| dir.join(format!("{id}{e}")))
                    .find(|f| f.exists())
                    .with_context(|| format!("{}: no segmentation of case `{id}` from the previous stage (`{id}.nii.gz`; predict the case with the first stage's model first)", dir.display()))?;
                let mut pre = preprocess_case(id, images, Some(&file), &self.plan).with_context(|| format!("case `{id}` with the previous stage's {}", file.display()))?;
                let seg = std::mem::take(&mut pre.seg);
                stu_data::cascade::check_labels(&seg, &cascade.labels, id, &file)?;
                (pre, seg)
            }
            Previous::NextStage(dirs) => {
                let pre = preprocess_case(id, images, None, &self.plan)?;
                let [_, z, y, x] = pre.props.shape;
                let seg = stu_data::cascade::load_previous_stage(dirs, id, [z, y, x], &cascade.labels)?;
                (pre, seg)
            }
        };
        Ok(Case { id: id.to_string(), geom, pre, previous: Some(previous) })
    }
}

/// Turns what the network stage gave a case into its label map in the input's geometry
/// ([`Predictor::exporter`]): whole logits have every class resampled back with a running argmax
/// (and the softmax written when asked), or, fast, the argmax first and the label map
/// resampled; labels made as the slices came are resampled (fast) or only placed.
#[derive(Clone)]
pub struct Exporter {
    plan: PreprocessPlan,
    classes: usize,
    fast: bool,
    regions: Option<Vec<u16>>,
}

impl Exporter {
    /// The label map (input array order) and geometry of `case` from what the network gave;
    /// with `probabilities`, also writes the softmax there ([`write_probabilities`]).
    /// probabilities at an `.npz` path are nnU-Net's, with its `.pkl` of the case's properties.
    pub fn export(&self, case: Case, out: NetOut, probabilities: Option<&Path>) -> Result<(Vec<u16>, stu_data::nifti_io::Geometry)> {
        let props = &case.pre.props;
        let pkl = probabilities.filter(|p| is_npz(p)).map(|p| {
            let properties = crate::npz::CaseProperties {
                affine: props.affine,
                spacing: props.original_spacing,
                shape_before_cropping: props.shape_before_cropping,
                bbox_used_for_cropping: props.bbox_used_for_cropping,
                shape_after_cropping_and_before_resampling: props.shape_after_cropping_and_before_resampling,
            };
            (p.with_extension("pkl"), properties)
        });
        let done = self.export_with(&Back::of(&self.plan, &case), &case.id, case.geom, out, probabilities)?;
        if let Some((path, properties)) = pkl {
            crate::npz::write_pkl(&path, &properties)?;
        }
        Ok(done)
    }

    /// [`Exporter::export`] of case `id` with the way `back` to its input's geometry `geom`.
    fn export_with(&self, back: &Back, id: &str, geom: stu_data::nifti_io::Geometry, out: NetOut, probabilities: Option<&Path>) -> Result<(Vec<u16>, stu_data::nifti_io::Geometry)> {
        let logits = match out {
            NetOut::Labels(seg) => {
                ensure!(probabilities.is_none(), "case `{}`: a label map has no probabilities to write", id);
                ensure!(seg.len() == back.grid.iter().product::<usize>(), "case `{}`: {} labels for a {:?} grid", id, seg.len(), back.grid);
                return back.place_labels(id, geom, &back.resample_seg(&seg));
            }
            NetOut::Cropped(seg, wrote) => {
                ensure!(probabilities == wrote.as_deref(), "case `{}`: the probabilities were to be written as the slices came", id);
                ensure!(seg.len() == back.target.iter().product::<usize>(), "case `{}`: {} labels for a {:?} crop", id, seg.len(), back.target);
                return back.place_labels(id, geom, &seg);
            }
            NetOut::Logits(l) => l,
        };
        if self.fast {
            // The labels on the network's grid, then the label map alone resampled.
            let rule = LabelRule::new(self.classes, self.regions.as_deref())?;
            let plane = back.grid[1] * back.grid[2];
            let mut seg = vec![0i16; back.grid[0] * plane];
            ensure!(logits.len() == self.classes * seg.len(), "case `{}`: {} logits for {} classes of a {:?} grid", id, logits.len(), self.classes, back.grid);
            rule.apply(&Slab { z0: 0, k: back.grid[0], plane, window: back.grid[0], data: SlabData::Copied(logits) }, &mut seg);
            return back.place_labels(id, geom, &back.resample_seg(&seg));
        }
        if let Some(writes) = &self.regions {
            return self.export_regions(writes, back, id, geom, logits, probabilities);
        }
        let (n, nt) = (back.grid.iter().product::<usize>(), back.target.iter().product::<usize>());
        let classes = self.classes;
        // Back to the cropped shape, channel by channel, keeping a running argmax.
        let mut best = vec![f32::NEG_INFINITY; nt];
        let mut arg = vec![0u16; nt];
        // Running sum of exp(logit − max) for the probabilities (online log-sum-exp).
        let mut sumexp = probabilities.map(|_| vec![0f32; nt]);
        for k in 0..classes {
            running_argmax(&mut best, &mut arg, &back.resample(&logits[k * n..(k + 1) * n]), k, sumexp.as_deref_mut());
        }
        if let (Some(path), Some(sumexp)) = (probabilities, sumexp) {
            // Second pass: softmax of the resampled logits, one class at a time, un-cropped
            // (outside the crop: background 1, others 0, as nnU-Net) and transposed back.
            write_probabilities(path, classes, geom.shape, None, |k| {
                back.place(&softmax(&back.resample(&logits[k * n..(k + 1) * n]), &best, &sumexp), if k == 0 { 1.0 } else { 0.0 })
            })
            .with_context(|| path.display().to_string())?;
        }
        drop(logits);
        back.place_labels(id, geom, &arg)
    }

    /// [`Exporter::export`] of a region-based model's logits (nnU-Net's
    /// `convert_probabilities_to_segmentation` for regions): each output's logits resampled,
    /// then its sigmoid above 0.5 writes its label, in output order, so a later region
    /// overwrites an earlier one. The probabilities are the sigmoids (0 outside the crop).
    fn export_regions(&self, writes: &[u16], back: &Back, id: &str, geom: stu_data::nifti_io::Geometry, logits: Vec<f32>, probabilities: Option<&Path>) -> Result<(Vec<u16>, stu_data::nifti_io::Geometry)> {
        let n: usize = back.grid.iter().product();
        ensure!(logits.len() == writes.len() * n, "case `{}`: {} outputs for {} regions", id, logits.len() / n.max(1), writes.len());
        let mut seg = vec![0u16; back.target.iter().product()];
        for (k, &w) in writes.iter().enumerate() {
            paint_region(&mut seg, &back.resample(&logits[k * n..(k + 1) * n]), w);
        }
        if let Some(path) = probabilities {
            write_probabilities(path, writes.len(), geom.shape, Some(writes), |k| {
                let p: Vec<f32> = back.resample(&logits[k * n..(k + 1) * n]).into_iter().map(sigmoid).collect();
                back.place(&p, 0.0)
            })
            .with_context(|| path.display().to_string())?;
        }
        drop(logits);
        back.place_labels(id, geom, &seg)
    }
}

/// The way from a case's preprocessed grid back to its input's: resampling to the cropped
/// shape, un-cropping and transposing back (the inverse of preprocessing's geometry).
struct Back {
    /// The preprocessed grid.
    grid: [usize; 3],
    /// The cropped shape before resampling.
    target: [usize; 3],
    separate: Option<usize>,
    full: [usize; 3],
    bbox: [[usize; 2]; 3],
    backward: [usize; 3],
}

impl Back {
    fn of(plan: &PreprocessPlan, case: &Case) -> Self {
        let props = &case.pre.props;
        let perm = plan.transpose_forward;
        let mut backward = [0usize; 3];
        for (i, &p) in perm.iter().enumerate() {
            backward[p] = i;
        }
        Self {
            grid: [props.shape[1], props.shape[2], props.shape[3]],
            target: props.shape_after_cropping_and_before_resampling,
            separate: separate_axis(props.spacing, perm.map(|a| props.original_spacing[a])),
            full: props.shape_before_cropping,
            bbox: props.bbox_used_for_cropping,
            backward,
        }
    }

    /// One channel on the preprocessed grid, resampled linearly to the cropped shape.
    fn resample(&self, v: &[f32]) -> Vec<f32> {
        resample_linear(v, self.grid, self.target, self.separate)
    }

    /// A label map on the preprocessed grid, resampled per label to the cropped shape.
    fn resample_seg(&self, seg: &[i16]) -> Vec<u16> {
        stu_data::resample::resample_seg(seg, self.grid, self.target, self.separate).into_iter().map(|v| v as u16).collect()
    }

    /// Values on the cropped grid placed into the input's array order (`fill` outside the crop).
    fn place<T: Copy + Default + Send + Sync>(&self, v: &[T], fill: T) -> Vec<T> {
        transpose(uncrop(v, self.target, self.full, self.bbox, fill), self.full, self.backward).0
    }

    /// Case `id`'s label map in its input's geometry `geom` from the cropped-grid labels `seg`.
    fn place_labels(&self, id: &str, geom: stu_data::nifti_io::Geometry, seg: &[u16]) -> Result<(Vec<u16>, stu_data::nifti_io::Geometry)> {
        let (seg, shape) = transpose(uncrop(seg, self.target, self.full, self.bbox, 0), self.full, self.backward);
        ensure!(shape == geom.shape, "case `{id}`: internal shape mismatch {shape:?} vs {:?}", geom.shape);
        Ok((seg, geom))
    }
}

impl Predictor {
    /// Loads the network and the plan; fails before any case is read.
    pub fn new(opts: &PredictOptions) -> Result<Self> {
        zoo::link();
        ensure!(opts.step > 0.0 && opts.step <= 1.0, "--step must be in (0, 1], got {}", opts.step);
        opts.precision.check(opts.backend).map_err(|e| anyhow::anyhow!("--precision: {e}"))?;
        ensure!(!opts.checkpoints.is_empty(), "no checkpoint given");
        ensure!(!(opts.fast_export && opts.save_probabilities), "--fast-export resamples only the label map; --save-probabilities needs every class resampled (the full export)");
        // An installed model's folder (`stu install-model`) stands for all its fold run folders,
        // as nnU-Net predicts with every fold of a model folder; a `stu train` run folder for
        // its final (or best) checkpoint.
        let checkpoints: Vec<PathBuf> = crate::modelzip::expand_model_folders(opts.checkpoints.clone())?
            .into_iter()
            .map(|c| {
                if !c.is_dir() {
                    return Ok(c);
                }
                let (name, other, fix) = if opts.best { ("checkpoint_best", "checkpoint_final", "leave out `--chk best`") } else { ("checkpoint_final", "checkpoint_best", "`--chk best`") };
                let f = c.join(format!("{name}.safetensors"));
                // A fold folder of a model nnU-Net itself trained (`fold_K/checkpoint_final.pth`).
                let pth = c.join(format!("{name}.pth"));
                if !f.exists() && pth.exists() {
                    return Ok(pth);
                }
                let hint = if c.join(format!("{other}.safetensors")).exists() || c.join(format!("{other}.pth")).exists() { format!(" (it has {other}: {fix})") } else { " (is its training finished?)".to_string() };
                ensure!(f.exists(), "{}: a folder without {name}.safetensors (or nnU-Net's {name}.pth){hint}", c.display());
                Ok(f)
            })
            .collect::<Result<_>>()?;
        let opts = &PredictOptions { checkpoints, ..opts.clone() };
        let trained: Vec<TrainedWith> = opts.checkpoints.iter().map(|c| trained_with(c)).collect::<Result<_>>()?;
        // The plan: --plans, else the first checkpoint's run's (the others' must be the same
        // plan: an ensemble's members see the same preprocessed input), else the released one.
        let plans = opts.plans.clone().or_else(|| trained.iter().find_map(|t| t.plans.clone()));
        let (plan_json, plan_path) = match &plans {
            Some(p) => (read_plans(p)?, p.clone()),
            None => (released_plan(), PathBuf::from("<released STU-Net plan>")),
        };
        if opts.plans.is_none() {
            for (c, t) in opts.checkpoints.iter().zip(&trained) {
                if let Some(p) = t.plans.as_ref().filter(|p| Some(*p) != plans.as_ref()) {
                    ensure!(read_plans(p)? == plan_json, "{}: trained with the plans {}, which differ from {}; an ensemble's checkpoints share one plan (pass --plans to choose)", c.display(), p.display(), plan_path.display());
                }
            }
        }
        // The configuration: the one asked for, else the one the checkpoints were trained with
        // (a 3d_lowres model predicted on the 3d_fullres grid would see another spacing).
        let recorded = trained.iter().zip(&opts.checkpoints).find_map(|(t, c)| t.configuration.clone().map(|n| (n, c)));
        let configuration = opts.configuration.clone().or_else(|| recorded.as_ref().map(|r| r.0.clone())).unwrap_or_else(|| "3d_fullres".to_string());
        for (t, c) in trained.iter().zip(&opts.checkpoints) {
            if let Some(n) = t.configuration.as_ref().filter(|n| **n != configuration) {
                bail!("{}: trained with configuration `{n}`, not `{configuration}`{}", c.display(), if opts.configuration.is_some() { " (leave out --configuration)" } else { "; an ensemble's checkpoints share one configuration" });
            }
        }
        let opts = &PredictOptions { configuration: Some(configuration.clone()), ..opts.clone() };
        let plan = PreprocessPlan::from_plans(&plan_json, &plan_path, &configuration)?;
        let strides = crate::plans::strides_of(&plan_json, &plan_path, &configuration)?;
        // The plan used is written beside the predictions (as nnU-Net does), once it is known
        // to be usable.
        std::fs::create_dir_all(&opts.output).with_context(|| format!("{}: cannot create the output folder", opts.output.display()))?;
        let used = opts.output.join("plans.json");
        stu_core::fs::write_atomic(&used, (serde_json::to_string_pretty(&plan_json)? + "\n").as_bytes()).with_context(|| format!("{}: cannot write", used.display()))?;
        let patch: Vec<usize> = serde_json::from_value(stu_data::plan::configuration(&plan_json, &configuration).map_err(|e| anyhow::anyhow!("{}: {e}", plan_path.display()))?["patch_size"].clone()).with_context(|| format!("{}: `patch_size` missing", plan_path.display()))?;
        ensure!(patch.len() == 3, "{}: `patch_size` {patch:?} has neither 2 nor 3 axes", plan_path.display());
        // A run trained with `--patch-size` predicts with the patch it was trained on.
        let first = trained.iter().zip(&opts.checkpoints).find_map(|(t, c)| t.patch.map(|p| (p, c)));
        if let Some((p, c)) = first {
            for (t, d) in trained.iter().zip(&opts.checkpoints) {
                ensure!(t.patch.is_none_or(|q| q == p), "{}: trained on {:?} patches, {} on {p:?}; an ensemble's checkpoints share one patch size", d.display(), t.patch.expect("some"), c.display());
            }
        }
        let patch = first.map_or([patch[0], patch[1], patch[2]], |(p, _)| p);
        let device = opts.backend.device()?;
        let mut nets: Vec<Box<dyn SegNet>> = Vec::with_capacity(opts.checkpoints.len());
        for c in &opts.checkpoints {
            let net = stu_engine::model::load_checkpoint(c, opts.model.as_deref(), &LoadOptions { strides: Some(strides.clone()), from_plan: true }, &device)?;
            if let Some(n) = nets.first().map(|n| n.num_classes()) {
                ensure!(net.num_classes() == n, "{}: {} output classes, {} has {n}; an ensemble's checkpoints predict the same classes", c.display(), net.num_classes(), opts.checkpoints[0].display());
            }
            stu_engine::model::check_patch(&*net, patch, "patch").map_err(|e| anyhow::anyhow!("{}: {e}", c.display()))?;
            nets.push(stu_engine::graph::wrap(opts.precision.inference_net(&*net)));
        }
        let on_device = accumulate_on_device(&device)?;
        let whole_export = match std::env::var("STU_EXPORT").as_deref() {
            Ok("whole") => true,
            Ok("slabs") | Err(_) => false,
            Ok(other) => bail!("STU_EXPORT=`{other}`: expected `whole` or `slabs`"),
        };
        // A region-based training's outputs are sigmoids, one per region of its dataset: the
        // `dataset.json` its run recorded, else the one beside the plans (an nnU-Net model
        // folder holds both beside its folds).
        let beside_plans = plans.as_ref().and_then(|p| p.parent()).map(|d| d.join("dataset.json")).filter(|p| p.exists());
        let datasets: Vec<Option<PathBuf>> = trained.iter().map(|t| t.dataset.clone().or_else(|| beside_plans.clone())).collect();
        // Its labels beside the predictions too, as nnU-Net's predictor writes them (what
        // post-processing and evaluation of the folder read); not when a label map translates
        // the model's classes into another dataset's.
        if let Some(d) = datasets.iter().flatten().next().filter(|_| opts.label_map.is_none()) {
            let to = opts.output.join("dataset.json");
            stu_core::fs::write_atomic(&to, &std::fs::read(d).with_context(|| format!("{}: cannot read", d.display()))?).with_context(|| format!("{}: cannot write", to.display()))?;
        }
        let mut regions: Option<(Vec<u16>, &Path)> = None;
        for (d, c) in datasets.iter().zip(&opts.checkpoints) {
            let Some(d) = d else { continue };
            let json = stu_data::dataset::DatasetJson::read(d)?;
            let writes: Option<Vec<u16>> = json.regions.map(|r| r.iter().map(|r| r.writes).collect());
            match (&regions, writes) {
                (None, Some(w)) => {
                    ensure!(w.len() == nets[0].num_classes(), "{}: {} outputs, its dataset {} has {} regions", c.display(), nets[0].num_classes(), d.display(), w.len());
                    regions = Some((w, c));
                }
                (Some((w0, c0)), w) => ensure!(w.as_ref() == Some(w0), "{}: its dataset's regions differ from those of {}; an ensemble's checkpoints predict the same regions", c.display(), c0.display()),
                (None, None) => {}
            }
        }
        if let Some((_, c)) = &regions {
            let region_based = datasets.iter().filter(|d| d.is_some()).count();
            ensure!(region_based == opts.checkpoints.len(), "{}: region-based, but not every checkpoint of the ensemble records its dataset", c.display());
        }
        let regions = regions.map(|(w, _)| w);
        // A cascade's second stage takes the first stage's segmentation, one-hot over the
        // foreground labels (nnU-Net's `MoveSegAsOneHotToDataTransform`), after the images.
        let max_label = max_label(regions.as_deref(), nets[0].num_classes());
        let previous_stage = stu_data::plan::configuration(&plan_json, &configuration).ok().and_then(|c| c.get("previous_stage").and_then(|p| p.as_str()).map(str::to_string));
        let cascade = match (previous_stage, &opts.previous_stage) {
            (Some(_), Some(p)) => Some(Cascade { labels: (1..=max_label as i16).collect(), previous: p.clone() }),
            (Some(first), None) => bail!("configuration `{}` of {} is the second stage of a cascade after `{first}`: pass --previous-stage with the `{first}` model's predictions of these cases", configuration, plan_path.display()),
            (None, Some(_)) => bail!("--previous-stage: configuration `{}` of {} is no cascade stage (it names no `previous_stage`)", configuration, plan_path.display()),
            (None, None) => None,
        };
        let extra = cascade.as_ref().map_or(0, |c| c.labels.len());
        for (net, c) in nets.iter().zip(&opts.checkpoints) {
            let want = plan.normalization_schemes.len() + extra;
            let why = if extra > 0 { format!(" and the cascade's {extra} one-hot label channel(s)") } else { String::new() };
            ensure!(net.in_channels() == want, "{}: the model takes {} channel(s), the plan normalises {}{why}", c.display(), net.in_channels(), plan.normalization_schemes.len());
        }
        // Test-time mirroring: the axes every checkpoint allows (nnU-Net's
        // `inference_allowed_mirroring_axes`; none for a run trained without mirroring).
        let mut mirror = mirror_axes(patch, opts.disable_tta);
        for t in &trained {
            if let Some(allowed) = &t.mirror_axes {
                mirror.retain(|a| allowed.contains(a));
            }
        }
        Ok(Self { nets, plan, patch, mirror_axes: mirror, step: opts.step, device, precision: opts.precision, on_device, whole_export, fast_export: opts.fast_export, regions, cascade, configuration })
    }

    /// The largest label value the predictions may hold.
    pub fn max_label(&self) -> usize {
        max_label(self.regions.as_deref(), self.classes())
    }

    /// Whether the model is region-based (sigmoid outputs).
    pub fn region_based(&self) -> bool {
        self.regions.is_some()
    }

    /// The plans configuration it predicts with (asked for, or the checkpoints').
    pub fn configuration(&self) -> &str {
        &self.configuration
    }

    /// Image channels a case has (the model's input channels, less a cascade's one-hot ones).
    pub fn channels(&self) -> usize {
        self.nets[0].in_channels() - self.cascade.as_ref().map_or(0, |c| c.labels.len())
    }

    /// Output classes, background included.
    pub fn classes(&self) -> usize {
        self.nets[0].num_classes()
    }

    /// Predicts one case (its channel files) and returns the label map in the input's array
    /// order with its geometry.
    pub fn predict_case(&self, id: &str, images: &[PathBuf], progress: &dyn Fn(usize, usize)) -> Result<(Vec<u16>, stu_data::nifti_io::Geometry)> {
        self.predict_case_with(id, images, None, progress, &mut Phases::new())
    }

    /// [`Predictor::predict_case`], also writing the softmax probabilities to `probabilities`
    /// when given (see [`write_probabilities`]), and appending the seconds of each phase
    /// (read + preprocess, network, export) to `phases`.
    pub fn predict_case_with(&self, id: &str, images: &[PathBuf], probabilities: Option<&Path>, progress: &dyn Fn(usize, usize), phases: &mut Phases) -> Result<(Vec<u16>, stu_data::nifti_io::Geometry)> {
        let t = std::time::Instant::now();
        let case = self.reader().read(id, images)?;
        phases.push(("read + preprocess", t.elapsed().as_secs_f64()));
        let t = std::time::Instant::now();
        let out = self.network(&case, true, probabilities, progress)?;
        let (network, export) = out.phases();
        phases.push((network, t.elapsed().as_secs_f64()));
        let t = std::time::Instant::now();
        let out = self.exporter().export(case, out, probabilities)?;
        phases.push((export, t.elapsed().as_secs_f64()));
        Ok(out)
    }

    /// nnU-Net's `resample_and_save` for a cascade's next stage: `logits` (`[classes, …grid]`,
    /// this configuration's preprocessed grid) resampled class by class, linearly, to `target`
    /// (the next configuration's preprocessed grid; the separate-axis rule sees this
    /// configuration's spacing only, which nnU-Net passes as both spacings), then labelled: the
    /// first maximum, or a region-based model's sigmoids above 0.5 painted in order.
    pub fn next_stage_labels(&self, logits: &[f32], grid: [usize; 3], target: [usize; 3]) -> Vec<i16> {
        let n: usize = grid.iter().product();
        let separate = separate_axis(self.plan.spacing, self.plan.spacing);
        let mut seg = vec![0u16; target.iter().product()];
        let mut best = vec![f32::NEG_INFINITY; seg.len()];
        for (k, channel) in logits.chunks_exact(n).enumerate() {
            let r = resample_linear(channel, grid, target, separate);
            match &self.regions {
                Some(writes) => paint_region(&mut seg, &r, writes[k]),
                None => running_argmax(&mut best, &mut seg, &r, k, None),
            }
        }
        seg.into_iter().map(|v| v as i16).collect()
    }

    /// For a cascade's first stage: predicts one case, writes its segmentation for the next
    /// stage (on the grid `next_spacing` gives its crop: the next configuration's preprocessed
    /// grid) into `next_dir`, and, with `export`, returns its label map in the input's geometry
    /// from the same logits (the final validation's).
    pub fn predict_case_and_next_stage(&self, id: &str, images: &[PathBuf], next_spacing: [f64; 3], next_dir: &Path, export: bool, progress: &dyn Fn(usize, usize)) -> Result<Option<(Vec<u16>, stu_data::nifti_io::Geometry)>> {
        let case = self.reader().read(id, images)?;
        let [c, z, y, x] = case.pre.props.shape;
        let logits = self.sliding_window_with(&case.pre.data, c, [z, y, x], case.previous.as_deref(), progress)?;
        let props = &case.pre.props;
        let spacing_t = self.plan.transpose_forward.map(|a| props.original_spacing[a]);
        let target = stu_data::plan::compute_new_shape(props.shape_after_cropping_and_before_resampling, spacing_t, next_spacing);
        let seg = self.next_stage_labels(&logits, [z, y, x], target);
        stu_data::cascade::save_next_stage(next_dir, id, &seg, target)?;
        if !export {
            return Ok(None);
        }
        self.exporter().export(case, NetOut::Logits(logits), None).map(Some)
    }

    /// What reading and preprocessing a case needs (owned, for a reader thread).
    pub fn reader(&self) -> Reader {
        Reader { plan: self.plan.clone(), channels: self.channels(), cascade: self.cascade.clone() }
    }

    /// What exporting a case's logits needs (owned, for a writer thread).
    pub fn exporter(&self) -> Exporter {
        Exporter { plan: self.plan.clone(), classes: self.classes(), fast: self.fast_export, regions: self.regions.clone() }
    }

    /// What the sliding window hands a read case's export: with the fast export, its label map
    /// on the preprocessed grid ([`Predictor::sliding_labels`]); else, where the export may run
    /// here as the slices come (`export_here`: no export stage of its own; and
    /// [`Predictor::streams_export`]), its label map on the cropped input grid ([`RowExport`]),
    /// with `probabilities` written on the way; else every class's logits `[classes, Z, Y, X]`
    /// on the preprocessed grid. The first two sum only a window of one patch depth, never the
    /// whole volume's logits. `STU_EXPORT=whole` always sums the whole logits, as every version
    /// before 2026-11-28 did (to compare the two).
    pub fn network(&self, case: &Case, export_here: bool, probabilities: Option<&Path>, progress: &dyn Fn(usize, usize)) -> Result<NetOut> {
        let [c, z, y, x] = case.pre.props.shape;
        let previous = case.previous.as_deref();
        if self.fast_export && !self.whole_export {
            return self.sliding_labels_with(&case.pre.data, c, [z, y, x], previous, progress).map(NetOut::Labels);
        }
        if !export_here || !self.streams_export(probabilities.is_some()) {
            return self.sliding_window_with(&case.pre.data, c, [z, y, x], previous, progress).map(NetOut::Logits);
        }
        let mut rows = RowExport::new(&Back::of(&self.plan, case), self.classes(), self.regions.clone(), probabilities, case.geom.shape)?;
        self.slide(&case.pre.data, c, [z, y, x], previous, Window::PatchDepth, progress, &mut |slab| rows.take(&slab))?;
        Ok(NetOut::Cropped(rows.finish()?, probabilities.map(Path::to_path_buf)))
    }

    /// Sliding-window logits `[classes, Z, Y, X]` of a preprocessed volume `[C, Z, Y, X]`.
    ///
    /// A volume smaller than the patch along an axis is padded (centred, zeros) for the network,
    /// as nnU-Net does, but only the voxels of the volume itself are accumulated: the sums are
    /// the ones nnU-Net crops out of its padded accumulator, without holding the padding's
    /// logits (a 27-slice CT at a 128-slice patch: 4.7× less memory).
    pub fn sliding_window(&self, data: &[f32], c: usize, shape: [usize; 3], progress: &dyn Fn(usize, usize)) -> Result<Vec<f32>> {
        self.sliding_window_with(data, c, shape, None, progress)
    }

    /// [`Predictor::sliding_window`] with a cascade's first-stage segmentation (see
    /// [`Predictor::slide`]).
    fn sliding_window_with(&self, data: &[f32], c: usize, shape: [usize; 3], previous: Option<&[i16]>, progress: &dyn Fn(usize, usize)) -> Result<Vec<f32>> {
        let mut whole = None;
        self.slide(data, c, shape, previous, Window::Volume, progress, &mut |slab| {
            whole = Some(slab.into_whole());
            Ok(())
        })?;
        Ok(whole.expect("a volume has slices"))
    }

    /// The label map `[Z, Y, X]` that [`Predictor::sliding_window`]'s logits give (the first
    /// maximum, as numpy's argmax; a region-based model's sigmoids above 0.5, in
    /// `regions_class_order`), the same labels, but in bounded memory: the tiles run row by row
    /// along the first axis, and the slices no later row reaches are labelled and dropped, so
    /// only one patch depth of logits is ever summed (a 538-slice CT at a 128-slice patch: 4.2×
    /// less memory than the whole volume's).
    pub fn sliding_labels(&self, data: &[f32], c: usize, shape: [usize; 3], progress: &dyn Fn(usize, usize)) -> Result<Vec<i16>> {
        self.sliding_labels_with(data, c, shape, None, progress)
    }

    fn sliding_labels_with(&self, data: &[f32], c: usize, shape: [usize; 3], previous: Option<&[i16]>, progress: &dyn Fn(usize, usize)) -> Result<Vec<i16>> {
        let rule = LabelRule::new(self.classes(), self.regions.as_deref())?;
        let plane = shape[1] * shape[2];
        let mut seg = vec![0i16; shape[0] * plane];
        self.slide(data, c, shape, previous, Window::PatchDepth, progress, &mut |slab| {
            rule.apply(&slab, &mut seg[slab.z0 * plane..(slab.z0 + slab.k) * plane]);
            Ok(())
        })?;
        Ok(seg)
    }

    /// The sliding window: tiles in rows along the first axis, each tile's logits (averaged
    /// over the ensemble and the mirrorings) weighted by the Gaussian and summed into a ring of
    /// slices (`window`: the whole volume, handed on at the end, or one patch depth); the
    /// slices no later row of tiles reaches are normalised and handed to `emit`, in order, then
    /// reused. `data` has `c` channels; a cascade's first-stage segmentation `previous` (same
    /// grid) adds its labels one-hot after them, built tile by tile.
    #[allow(clippy::too_many_arguments)]
    fn slide(&self, data: &[f32], c: usize, shape: [usize; 3], previous: Option<&[i16]>, window: Window, progress: &dyn Fn(usize, usize), emit: &mut dyn FnMut(Slab<'_>) -> Result<()>) -> Result<()> {
        use rayon::prelude::*;
        let p = self.patch;
        let padded: [usize; 3] = std::array::from_fn(|a| shape[a].max(p[a]));
        let lo: [usize; 3] = std::array::from_fn(|a| (padded[a] - shape[a]) / 2);
        let np: usize = padded.iter().product();
        let n: usize = shape.iter().product();
        let window = match window {
            Window::Volume => shape[0],
            Window::PatchDepth => shape[0].min(p[0]),
        };
        let vol = pad_centred(data, shape, padded, 0f32);
        // The padding has no label, as nnU-Net's zero-padded one-hot channels.
        let labels: &[i16] = match (previous, &self.cascade) {
            (Some(_), Some(cascade)) => &cascade.labels,
            (Some(_), None) => bail!("a first-stage segmentation given to a model that is no cascade stage"),
            (None, _) => &[],
        };
        let prev_vol = match previous {
            Some(seg) => {
                ensure!(seg.len() == n, "the first-stage segmentation has {} voxels, the volume {n}", seg.len());
                pad_centred(seg, shape, padded, -1i16)
            }
            None => Vec::new(),
        };
        let channels = c + labels.len();
        let steps: Vec<Vec<usize>> = (0..3).map(|a| sliding_steps(padded[a], p[a], self.step)).collect();
        let g = gaussian_importance(p);
        let classes = self.classes();
        let plane = shape[1] * shape[2];
        let bytes = (4 * classes * window * plane) as u64;
        let free = if self.on_device == Accumulate::DeviceIfItFits { stu_engine::backend::cuda_memory(&self.device).map(|(f, _)| f) } else { None };
        let on_device = self.on_device.on_device(bytes, free);
        if let (false, Some(f)) = (on_device, free) {
            use stu_engine::backend::gib;
            eprintln!("the logits ({:.1} GiB) would take more than half the {:.1} GiB free on the device: summing the tiles in host memory", gib(bytes), gib(f));
        }
        let mut ring = Ring {
            window,
            depth: shape[0],
            plane,
            host: if on_device { Vec::new() } else { vec![0f32; classes * window * plane] },
            dev: on_device.then(|| Tensor::<4>::zeros([classes, window, shape[1], shape[2]], &self.device)),
            weight: vec![0f32; window * plane],
        };
        let g_dev = on_device.then(|| Tensor::<4>::from_data(TensorData::new(g.clone(), [1, p[0], p[1], p[2]]), &self.device));
        let pn: usize = p.iter().product();
        let total = steps[0].len() * steps[1].len() * steps[2].len();
        let mut done = 0;
        // Volume slices below `finished` have been handed on.
        let mut finished = 0;
        let subsets: Vec<Vec<usize>> = (0..1usize << self.mirror_axes.len()).map(|m| self.mirror_axes.iter().enumerate().filter(|(i, _)| m >> i & 1 == 1).map(|(_, &a)| a + 2).collect()).collect();
        for &sz in &steps[0] {
            // No tile of this row or a later one reaches below `sz` (in the volume: `sz − lo`).
            // (A window of the whole volume is handed on whole, at the end.)
            if window < shape[0] {
                let below = sz.saturating_sub(lo[0]).min(shape[0]);
                ring.finish(finished..below, emit)?;
                finished = finished.max(below);
            }
            for &sy in &steps[1] {
                for &sx in &steps[2] {
                    let start = [sz, sy, sx];
                    let mut tile = Vec::with_capacity(channels * pn);
                    for ch in 0..c {
                        for z in 0..p[0] {
                            for y in 0..p[1] {
                                let src = ch * np + ((sz + z) * padded[1] + sy + y) * padded[2] + sx;
                                tile.extend_from_slice(&vol[src..src + p[2]]);
                            }
                        }
                    }
                    for &label in labels {
                        for z in 0..p[0] {
                            for y in 0..p[1] {
                                let src = ((sz + z) * padded[1] + sy + y) * padded[2] + sx;
                                tile.extend(prev_vol[src..src + p[2]].iter().map(|&v| if v == label { 1f32 } else { 0f32 }));
                            }
                        }
                    }
                    let x = self.precision.input(Tensor::<5>::from_data(TensorData::new(tile, [1, channels, p[0], p[1], p[2]]), &self.device));
                    // The mean over every member of the ensemble and every mirroring.
                    let mut sum: Option<Tensor<5>> = None;
                    for net in &self.nets {
                        for axes in &subsets {
                            let out = self.precision.output(if axes.is_empty() {
                                net.forward(x.clone())
                            } else {
                                flip(net.forward(flip(x.clone(), axes)), axes)
                            });
                            sum = Some(match sum {
                                Some(s) => s + out,
                                None => out,
                            });
                        }
                    }
                    let mean = sum.expect("at least one pass") / (subsets.len() * self.nets.len()) as f64;
                    // The part of the tile inside the volume: `t` in tile coordinates, `v` in
                    // the volume's (the padding is `lo` wide below).
                    let t: [std::ops::Range<usize>; 3] = std::array::from_fn(|a| lo[a].saturating_sub(start[a])..(lo[a] + shape[a] - start[a]).min(p[a]));
                    let v: [usize; 3] = std::array::from_fn(|a| start[a] + t[a].start - lo[a]);
                    let len = t[2].len();
                    // Row offsets (tile, ring) of the overlap.
                    let rows: Vec<(usize, usize)> = t[0].clone().flat_map(|z| t[1].clone().map(move |y| (z, y))).map(|(z, y)| ((z * p[1] + y) * p[2] + t[2].start, (((z - t[0].start + v[0]) % window) * shape[1] + y - t[1].start + v[1]) * shape[2] + v[2])).collect();
                    if let (Some(mut a), Some(gd)) = (ring.dev.take(), &g_dev) {
                        // On the device: the tile is weighted and summed there, in place (`a` is
                        // the only handle on its storage once the slice is summed).
                        let inside = mean.reshape([classes, p[0], p[1], p[2]]) * gd.clone();
                        let inside = inside.slice([0..classes, t[0].clone(), t[1].clone(), t[2].clone()]);
                        let runs = ring.runs(v[0], t[0].len());
                        for &(off, slot, depth) in &runs {
                            let part = if runs.len() == 1 { inside.clone() } else { inside.clone().slice([0..classes, off..off + depth, 0..t[1].len(), 0..len]) };
                            let ranges = [0..classes, slot..slot + depth, v[1]..v[1] + t[1].len(), v[2]..v[2] + len];
                            let summed = a.clone().slice(ranges.clone()) + part;
                            a = a.slice_assign(ranges, summed);
                        }
                        ring.dev = Some(a);
                    } else {
                        // On the host: its logits come back, and each class is summed on its own
                        // core.
                        let logits = mean.into_data().try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
                        ensure!(all_finite(&logits), "the network produced non-finite logits");
                        ring.host.par_chunks_mut(window * plane).zip(logits.par_chunks(pn)).for_each(|(acc, l)| {
                            for &(ti, vi) in &rows {
                                for ((a, l), w) in acc[vi..vi + len].iter_mut().zip(&l[ti..ti + len]).zip(&g[ti..ti + len]) {
                                    *a += l * w;
                                }
                            }
                        });
                    }
                    for &(ti, vi) in &rows {
                        for (w, gv) in ring.weight[vi..vi + len].iter_mut().zip(&g[ti..ti + len]) {
                            *w += gv;
                        }
                    }
                    done += 1;
                    progress(done, total);
                }
            }
        }
        drop(vol);
        ring.finish(finished..shape[0], emit)
    }
}

impl Predictor {
    /// A predictor of one network over volumes already on its grid (no plan, no preprocessing
    /// or export): for timing the sliding window alone (`stu bench window_*`). Tiles of `patch`
    /// at step 0.5, summed where `stu predict` sums them on `device`, mirroring on all three axes
    /// with `tta`.
    pub fn for_network(net: Box<dyn SegNet>, patch: [usize; 3], tta: bool, device: Device, precision: Precision) -> Result<Self> {
        let on_device = accumulate_on_device(&device)?;
        let plan = PreprocessPlan::from_plans(&released_plan(), Path::new("<released STU-Net plan>"), "3d_fullres")?;
        Ok(Self { nets: vec![net], plan, patch, mirror_axes: mirror_axes(patch, !tta), step: 0.5, device, precision, on_device, whole_export: false, fast_export: false, regions: None, cascade: None, configuration: "3d_fullres".into() })
    }
}

impl Predictor {
    /// Whether the full export of a case can run as its slices come: not the fast export (which
    /// labels the slices itself), and, with probabilities to write, a plan whose transposition
    /// keeps the first axis (the rows of the crop are then slices of the input's array, written
    /// as they are done: [`RowProbabilities`]; else they need the whole logits).
    pub fn streams_export(&self, probabilities: bool) -> bool {
        !self.fast_export && !self.whole_export && (!probabilities || RowProbabilities::streams(self.plan.transpose_forward))
    }

    /// Runs a case's sliding window over a window of one patch depth, handing each finished
    /// slab (`z0`, slices, `[classes, slices, Y, X]` logits) to `emit`, for an export stage on
    /// another thread ([`RowExport`] there).
    fn stream_slabs(&self, case: &Case, progress: &dyn Fn(usize, usize), emit: &mut dyn FnMut(usize, usize, Vec<f32>) -> Result<()>) -> Result<()> {
        let [c, z, y, x] = case.pre.props.shape;
        self.slide(&case.pre.data, c, [z, y, x], case.previous.as_deref(), Window::PatchDepth, progress, &mut |slab| {
            let (z0, k) = (slab.z0, slab.k);
            emit(z0, k, slab.into_copied(self.classes()))
        })
    }
}

/// How many slices [`Predictor::slide`] sums at once.
#[derive(Debug, Clone, Copy)]
enum Window {
    /// The whole volume (the whole logits, handed on at the end).
    Volume,
    /// One patch depth: every slice is handed on once no later row of tiles reaches it.
    PatchDepth,
}

/// What [`Predictor::network`] gives the export.
pub enum NetOut {
    /// Every class's logits `[classes, Z, Y, X]` on the preprocessed grid.
    Logits(Vec<f32>),
    /// The label map `[Z, Y, X]` on the preprocessed grid (the fast export).
    Labels(Vec<i16>),
    /// The label map on the cropped input grid (the full export, done as the slices came), and
    /// where the probabilities were written meanwhile, when asked.
    Cropped(Vec<u16>, Option<PathBuf>),
}

impl NetOut {
    /// The names of the network's phase and the export's in the timings.
    pub fn phases(&self) -> (&'static str, &'static str) {
        match self {
            Self::Logits(_) => ("network", "resample + argmax"),
            Self::Labels(_) => ("network + argmax", "resample labels"),
            Self::Cropped(..) => ("network + resample + argmax", "place labels"),
        }
    }
}

/// Whether every value is finite, checked on all cores (a whole volume's logits are billions).
/// The largest label a model writes: a region-based one's largest `regions_class_order`
/// value, else its classes less background.
fn max_label(regions: Option<&[u16]>, classes: usize) -> usize {
    match regions {
        Some(w) => w.iter().copied().max().unwrap_or(0) as usize,
        None => classes - 1,
    }
}

fn all_finite(v: &[f32]) -> bool {
    use rayon::prelude::*;
    v.par_chunks(1 << 16).all(|c| c.iter().all(|x| x.is_finite()))
}

/// Places a cropped volume of shape `cropped` at `bbox` inside a volume of shape `full` filled
/// with `fill` (the inverse of preprocessing's crop).
/// Every channel of `v` (`[…, Z, Y, X]` of `shape`) centred in `padded` (each axis at least as
/// long), `fill` around it, as nnU-Net pads a volume smaller than the patch.
fn pad_centred<T: Copy>(v: &[T], shape: [usize; 3], padded: [usize; 3], fill: T) -> Vec<T> {
    let n: usize = shape.iter().product();
    let np: usize = padded.iter().product();
    let lo: [usize; 3] = std::array::from_fn(|a| (padded[a] - shape[a]) / 2);
    let mut out = vec![fill; v.len() / n * np];
    for (from, into) in v.chunks_exact(n).zip(out.chunks_exact_mut(np)) {
        for z in 0..shape[0] {
            for y in 0..shape[1] {
                let src = (z * shape[1] + y) * shape[2];
                let dst = ((z + lo[0]) * padded[1] + y + lo[1]) * padded[2] + lo[2];
                into[dst..dst + shape[2]].copy_from_slice(&from[src..src + shape[2]]);
            }
        }
    }
    out
}

fn uncrop<T: Copy>(v: &[T], cropped: [usize; 3], full: [usize; 3], bbox: [[usize; 2]; 3], fill: T) -> Vec<T> {
    let mut out = vec![fill; full.iter().product()];
    for z in 0..cropped[0] {
        for y in 0..cropped[1] {
            let src = (z * cropped[1] + y) * cropped[2];
            let dst = ((z + bbox[0][0]) * full[1] + y + bbox[1][0]) * full[2] + bbox[2][0];
            out[dst..dst + cropped[2]].copy_from_slice(&v[src..src + cropped[2]]);
        }
    }
    out
}

fn flip(x: Tensor<5>, axes: &[usize]) -> Tensor<5> {
    match axes {
        [a] => x.flip([*a]),
        [a, b] => x.flip([*a, *b]),
        [a, b, c] => x.flip([*a, *b, *c]),
        _ => x,
    }
}

/// The name ending of a case's probabilities file (`{case}.probabilities.safetensors`).
pub const PROBABILITIES_SUFFIX: &str = ".probabilities.safetensors";

/// Where the probabilities of case `id` go in a prediction folder `dir`.
pub fn probabilities_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}{PROBABILITIES_SUFFIX}"))
}

/// Where nnU-Net's probabilities of case `id` go (`{case}.npz`, with `{case}.pkl` beside it).
pub fn npz_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.npz"))
}

/// Whether a probabilities path is nnU-Net's `.npz` (float32, with a `.pkl`), not ours.
fn is_npz(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "npz")
}

/// Streams `[classes, Z, Y, X]` probabilities (`channel(k)` gives class k in the input's array
/// order) to a safetensors file, tensor `probabilities`, float16, atomically. One class is in
/// memory at a time; the file is the size nnU-Net's `.npz` would be uncompressed, halved.
///
/// With `regions` (a region-based model's label per output) they are sigmoids, and the
/// metadata's `regions_class_order` says so, for `stu ensemble`.
pub fn write_probabilities(path: &Path, classes: usize, shape: [usize; 3], regions: Option<&[u16]>, mut channel: impl FnMut(usize) -> Vec<f32>) -> Result<()> {
    let file = ProbabilityFile::create(path, classes, shape, regions)?;
    for k in 0..classes {
        let ch = channel(k);
        ensure!(ch.len() == shape.iter().product::<usize>(), "{}: class {k} has {} values for a {shape:?} volume", path.display(), ch.len());
        file.write(k, 0, &ch)?;
    }
    file.commit()
}

/// A `{case}.probabilities.safetensors` file being written ([`write_probabilities`]'s format),
/// in pieces of whole slices in any order: at its temporary sibling until
/// [`ProbabilityFile::commit`], removed if dropped before. At an `.npz` path it is nnU-Net's
/// file instead: float32 staged raw beside it, deflated into the archive on commit
/// ([`crate::npz::write_npz`]).
pub struct ProbabilityFile {
    file: stu_core::fs::AtomicFile,
    path: PathBuf,
    /// Where the data start.
    start: u64,
    classes: usize,
    /// `[z, y, x]`, the input's array order.
    shape: [usize; 3],
    /// nnU-Net's `.npz`: the raw float32 staging file's path (else float16 safetensors).
    staging: Option<PathBuf>,
}

impl ProbabilityFile {
    /// Creates the file (its header) for `classes` classes of a `shape` volume.
    pub fn create(path: &Path, classes: usize, shape: [usize; 3], regions: Option<&[u16]>) -> Result<Self> {
        if is_npz(path) {
            let bytes = classes * shape.iter().product::<usize>() * 4;
            if let Some(free) = path.parent().and_then(free_bytes) {
                // The raw staging file and the archive (at most about as large).
                ensure!(free >= 2 * bytes as u64, "{}: needs up to {:.1} GB, the disk has {:.1} GB free", path.display(), 2.0 * bytes as f64 / 1e9, free as f64 / 1e9);
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let staging = path.with_file_name(format!(".{name}.f32"));
            let file = stu_core::fs::AtomicFile::create(&staging).with_context(|| format!("{}: cannot create", staging.display()))?;
            return Ok(Self { file, path: path.to_path_buf(), start: 0, classes, shape, staging: Some(staging) });
        }
        let bytes = classes * shape.iter().product::<usize>() * 2;
        let meta = match regions {
            None => serde_json::json!({"format": "softmax probabilities in the input's array order [class, z, y, x] (nnU-Net --save_probabilities, float16)"}),
            Some(w) => serde_json::json!({
                "format": "sigmoid probabilities of a region-based model in the input's array order [region, z, y, x] (nnU-Net --save_probabilities, float16)",
                "regions_class_order": serde_json::to_string(w)?,
            }),
        };
        let header = serde_json::json!({
            "probabilities": {"dtype": "F16", "shape": [classes, shape[0], shape[1], shape[2]], "data_offsets": [0, bytes]},
            "__metadata__": meta,
        });
        let mut h = serde_json::to_string(&header)?.into_bytes();
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        if let Some(free) = path.parent().and_then(free_bytes) {
            // Before the network runs, not after an hour of it (105 classes of a whole-body CT
            // are 44 GB).
            ensure!(free >= bytes as u64, "{}: needs {:.1} GB, the disk has {:.1} GB free", path.display(), bytes as f64 / 1e9, free as f64 / 1e9);
        }
        let file = stu_core::fs::AtomicFile::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut head = (h.len() as u64).to_le_bytes().to_vec();
        head.extend_from_slice(&h);
        file.write_at(&head, 0).with_context(|| path.display().to_string())?;
        Ok(Self { file, path: path.to_path_buf(), start: head.len() as u64, classes, shape, staging: None })
    }

    /// Class `k`'s values on slices `z0..` (whole slices, the input's array order).
    pub fn write(&self, k: usize, z0: usize, values: &[f32]) -> Result<()> {
        use rayon::prelude::*;
        let plane = self.shape[1] * self.shape[2];
        let n = plane * self.shape[0];
        assert!(k < self.classes && values.len().is_multiple_of(plane.max(1)) && z0 * plane + values.len() <= n, "whole slices inside the volume");
        let size = if self.staging.is_some() { 4 } else { 2 };
        let mut buf = vec![0u8; values.len() * size];
        buf.par_chunks_mut(size << 15).zip(values.par_chunks(1 << 15)).for_each(|(b, v)| {
            for (b, &v) in b.chunks_exact_mut(size).zip(v) {
                if size == 4 {
                    b.copy_from_slice(&v.to_le_bytes());
                } else {
                    b.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                }
            }
        });
        let at = self.start + (size * (k * n + z0 * plane)) as u64;
        self.file.write_at(&buf, at).with_context(|| format!("{}: cannot write class {k}", self.path.display()))
    }

    /// Flushes the file and moves it into place (an `.npz`: deflates the staged values into it).
    pub fn commit(self) -> Result<()> {
        let path = self.path;
        let Some(staging) = self.staging else {
            return self.file.commit().with_context(|| path.display().to_string());
        };
        self.file.commit().with_context(|| staging.display().to_string())?;
        let shape = [self.classes, self.shape[0], self.shape[1], self.shape[2]];
        let written = std::fs::File::open(&staging).with_context(|| format!("{}: cannot open", staging.display())).and_then(|f| crate::npz::write_npz(&path, shape, &mut std::io::BufReader::with_capacity(1 << 20, f)));
        std::fs::remove_file(&staging).ok();
        written
    }
}

/// The bytes free to this user on the file system holding `dir` (`None` where unknown).
fn free_bytes(dir: &Path) -> Option<u64> {
    fs4::available_space(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }).ok()
}

/// The axes test-time augmentation mirrors (`inference_allowed_mirroring_axes`): all three, or
/// a 2-D configuration's two in-plane axes (its patches are one slice deep).
fn mirror_axes(patch: [usize; 3], disable_tta: bool) -> Vec<usize> {
    if disable_tta { Vec::new() } else { stu_data::sampler::mirror_axes(stu_data::sampler::planar(patch), None) }
}

/// Tile positions along one axis (`compute_steps_for_sliding_window`). A one-voxel tile (the
/// slice axis of a 2-D configuration) visits every position once, as nnU-Net's 2-D sliding
/// window runs slice by slice.
pub fn sliding_steps(size: usize, tile: usize, step: f64) -> Vec<usize> {
    assert!(size >= tile, "pad to the tile first");
    if tile == 1 {
        return (0..size).collect();
    }
    let n = ((size - tile) as f64 / (tile as f64 * step)).ceil() as usize + 1;
    if n == 1 {
        return vec![0];
    }
    (0..n).map(|i| (i as f64 * (size - tile) as f64 / (n - 1) as f64).round() as usize).collect()
}

/// nnU-Net's Gaussian importance map for a tile: σ = tile/8 per axis, centred at tile//2,
/// truncated at 4σ (zeros beyond, then replaced by the smallest non-zero value), max 1000.
pub fn gaussian_importance(tile: [usize; 3]) -> Vec<f32> {
    let g1: Vec<Vec<f64>> = tile
        .iter()
        .map(|&t| {
            let sigma = t as f64 / 8.0;
            let radius = (4.0 * sigma + 0.5) as i64;
            let c = (t / 2) as i64;
            (0..t as i64).map(|i| if (i - c).abs() <= radius { (-0.5 * ((i - c) as f64 / sigma).powi(2)).exp() } else { 0.0 }).collect()
        })
        .collect();
    let mut g: Vec<f64> = Vec::with_capacity(tile.iter().product());
    for a in &g1[0] {
        for b in &g1[1] {
            for c in &g1[2] {
                g.push(a * b * c);
            }
        }
    }
    let max = g.iter().copied().fold(0.0, f64::max);
    let mut g: Vec<f32> = g.iter().map(|v| (v / max * 1000.0) as f32).collect();
    let min_nz = g.iter().copied().filter(|&v| v > 0.0).fold(f32::MAX, f32::min);
    g.iter_mut().filter(|v| **v == 0.0).for_each(|v| *v = min_nz);
    g
}

/// Keeps the largest 26-connected component of each label (ties keep all of that size).
pub fn keep_largest_per_label(seg: &mut [u16], shape: [usize; 3]) {
    let (comp, sizes) = crate::postprocess::components(seg, shape, &|v| v > 0, &|a, b| a == b);
    let mut largest = std::collections::HashMap::new();
    for &(l, s) in &sizes {
        let e = largest.entry(l).or_insert(0);
        *e = (*e).max(s);
    }
    for (v, c) in seg.iter_mut().zip(&comp) {
        if *v != 0 && sizes[*c as usize].1 < largest[v] {
            *v = 0;
        }
    }
}

/// Groups the image files (NIfTI, MetaImage) of a folder (or one file) into cases by nnU-Net
/// naming (`{case}_{XXXX}.nii.gz`); a file without the suffix is a single-channel case.
pub fn discover_inputs(input: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let files: Vec<PathBuf> = if input.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(input).with_context(|| format!("{}: cannot list", input.display()))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| stu_data::nifti_io::case_of(p).is_some()).collect();
        v.sort();
        v
    } else if input.exists() {
        vec![input.to_path_buf()]
    } else {
        bail!("{}: no such file or folder", input.display());
    };
    ensure!(!files.is_empty(), "{}: no image files (.nii.gz, .nii, .mha, .mhd, .nrrd, .nhdr)", input.display());
    let mut cases: std::collections::BTreeMap<String, Vec<(usize, PathBuf)>> = Default::default();
    for f in files {
        let stem = stu_data::nifti_io::case_of(&f).map_or_else(|| f.file_name().expect("file").to_string_lossy().to_string(), |(stem, _)| stem);
        let (id, ch) = match stem.rsplit_once('_') {
            Some((id, ch)) if ch.len() == 4 && ch.bytes().all(|b| b.is_ascii_digit()) => (id.to_string(), ch.parse().expect("digits")),
            _ => (stem.clone(), 0),
        };
        cases.entry(id).or_default().push((ch, f));
    }
    cases
        .into_iter()
        .map(|(id, mut chans)| {
            chans.sort();
            for (i, (ch, f)) in chans.iter().enumerate() {
                ensure!(*ch == i, "{}: case `{id}` skips channel {i}", f.display());
            }
            Ok((id, chans.into_iter().map(|(_, f)| f).collect()))
        })
        .collect()
}

/// Per-case result.
#[derive(Debug, serde::Serialize)]
pub struct CaseResult {
    /// Case id.
    pub id: String,
    /// Output file, or the error.
    pub output: Result<PathBuf, String>,
    /// Seconds.
    pub seconds: f64,
    /// Seconds per phase (reading and preprocessing, the network's sliding window, resampling
    /// the logits back and the argmax, writing).
    pub phases: Phases,
    /// Already predicted (`--continue-prediction`): left as it was.
    pub skipped: bool,
}

/// The file ending of a label map predicted from `image` ([`stu_data::nifti_io::label_ending`]).
pub fn output_ending(image: &Path) -> &'static str {
    stu_data::nifti_io::label_ending(stu_data::nifti_io::case_of(image).map_or("", |(_, e)| e))
}

/// Predicts every case; one failing case does not stop the others.
pub fn predict(opts: &PredictOptions, progress: &dyn Fn(&str, usize, usize)) -> Result<Vec<CaseResult>> {
    let mut cases = discover_inputs(&opts.input)?;
    if let Some((part, parts)) = opts.part {
        ensure!(parts >= 1 && part < parts, "--part-id {part} of --num-parts {parts}: the part is 0…{}", parts.saturating_sub(1));
        cases = cases.into_iter().skip(part).step_by(parts).collect();
    }
    // Label maps are written in their case's format: MetaImage or NRRD for such inputs (as
    // nnU-Net writes its dataset's file ending), else gzipped NIfTI.
    let outputs: std::collections::HashMap<String, PathBuf> = cases.iter().map(|(id, files)| (id.clone(), opts.output.join(format!("{id}{}", output_ending(&files[0]))))).collect();
    let probabilities = |id: &str| opts.save_probabilities.then(|| if opts.npz { npz_path(&opts.output, id) } else { probabilities_path(&opts.output, id) });
    let mut skipped = Vec::new();
    if opts.continue_prediction {
        let done = |id: &str| outputs[id].exists() && probabilities(id).is_none_or(|p| p.exists());
        let (old, todo): (Vec<_>, Vec<_>) = cases.into_iter().partition(|(id, _)| done(id));
        skipped = old.into_iter().map(|(id, _)| CaseResult { output: Ok(outputs[&id].clone()), id, seconds: 0.0, phases: Vec::new(), skipped: true }).collect();
        cases = todo;
        if cases.is_empty() {
            return Ok(skipped);
        }
    }
    std::fs::create_dir_all(&opts.output).with_context(|| format!("{}: cannot create the output folder", opts.output.display()))?;
    let probe = opts.output.join(format!(".stu-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("{}: output folder is not writable", opts.output.display()))?;
    std::fs::remove_file(&probe).ok();
    let map = opts.label_map.as_deref().map(crate::labelmap::LabelMap::load).transpose()?;
    let pp = opts.postprocessing.as_deref().map(crate::postprocess::Postprocessing::read).transpose()?;
    let predictor = Predictor::new(opts)?;
    let record = serde_json::json!({"stu": env!("CARGO_PKG_VERSION"), "options": PredictOptions { configuration: Some(predictor.configuration().to_string()), ..opts.clone() }});
    // Each part of a shared folder keeps its own record.
    let name = match opts.part {
        Some((k, n)) if n > 1 => format!("predict.part{k}of{n}.json"),
        _ => "predict.json".to_string(),
    };
    stu_core::fs::write_atomic(&opts.output.join(name), (serde_json::to_string_pretty(&record)? + "\n").as_bytes())?;
    if map.is_some() {
        ensure!(predictor.classes() == stu_core::taxonomy::CLASSES.len() + 1, "{}: label maps translate STU-Net's 104 TotalSegmentator classes; this model has {} outputs", opts.checkpoints[0].display(), predictor.classes());
    }
    if predictor.region_based() {
        // These translate or clean up plain labels (STU-Net's classes); a region model's
        // post-processing is `stu postprocess determine`'s, per region (`--postprocessing`).
        ensure!(map.is_none() && !opts.keep_largest, "{}: a region-based model; --label-map and --keep-largest work on plain labels and are not supported for regions (determine a post-processing per region with `stu postprocess determine` and pass --postprocessing)", opts.checkpoints[0].display());
    }
    let table = map.as_ref().map(|m| m.prediction_table());
    let wide = table.is_none() && predictor.max_label() > 255;
    // Channel counts are checked up front: a wrong one is the user's mistake for every case.
    let wrong: Vec<String> = cases.iter().filter(|(_, f)| f.len() != predictor.channels()).map(|(id, f)| format!("`{id}` ({})", f.len())).collect();
    ensure!(wrong.len() < cases.len(), "{}: the model takes {} channel(s); the cases have {}", opts.input.display(), predictor.channels(), wrong.join(", "));
    // The label map as the options want it, written; the phase's seconds appended.
    let finish = |id: &str, mut seg: Vec<u16>, geom: &stu_data::nifti_io::Geometry, phases: &mut Phases| -> Result<PathBuf> {
        let out_path = outputs[id].clone();
        if let Some(t) = &table {
            seg.iter_mut().for_each(|v| *v = t[*v as usize]);
        }
        if opts.keep_largest {
            keep_largest_per_label(&mut seg, geom.shape);
        }
        if let Some(pp) = &pp {
            pp.apply(&mut seg, geom.shape);
        }
        let w = std::time::Instant::now();
        stu_data::nifti_io::write_label_as(&out_path, &seg, geom, wide)?;
        phases.push(("write", w.elapsed().as_secs_f64()));
        Ok(out_path)
    };
    if !opts.overlap.unwrap_or(opts.backend.is_gpu()) {
        let mut results = Vec::new();
        for (id, files) in &cases {
            let t = std::time::Instant::now();
            let mut phases = Phases::new();
            let r = predictor.predict_case_with(id, files, probabilities(id).as_deref(), &|d, n| progress(id, d, n), &mut phases).and_then(|(seg, geom)| finish(id, seg, &geom, &mut phases));
            results.push(CaseResult { id: id.clone(), output: r.map_err(|e| crate::error_line(&e)), seconds: t.elapsed().as_secs_f64(), phases, skipped: false });
        }
        skipped.extend(results);
        return Ok(skipped);
    }
    // Three stages on their own threads, as nnU-Net's background pre- and export processes:
    // case i+1 is read and preprocessed while case i runs through the network and is exported
    // as its slices come (the full export, probabilities too), or while case i−1 is exported
    // and written (the fast export's labels; whole logits, where probabilities do not stream).
    // One case waits between stages at most, so at most two cases' whole logits are held, and
    // streamed cases hold a few slabs.
    let (reader, exporter) = (predictor.reader(), predictor.exporter());
    type Read = (usize, std::time::Instant, Result<Case>, Phases);
    // (One per case through a channel: no need to box the large variant.)
    #[allow(clippy::large_enum_variant)]
    enum Stage {
        Whole(Case, NetOut),
        Streamed(Streamed),
    }
    type Computed = (usize, std::time::Instant, Result<Stage>, Phases);
    let (to_network, from_reader) = std::sync::mpsc::sync_channel::<Read>(0);
    let (to_writer, from_network) = std::sync::mpsc::sync_channel::<Computed>(0);
    let results: Vec<CaseResult> = std::thread::scope(|scope| {
        let cases = &cases;
        scope.spawn(move || {
            for (i, (id, files)) in cases.iter().enumerate() {
                let t = std::time::Instant::now();
                let case = reader.read(id, files);
                if to_network.send((i, t, case, vec![("read + preprocess", t.elapsed().as_secs_f64())])).is_err() {
                    return; // the network stage stopped
                }
            }
        });
        let writer = scope.spawn(move || {
            let mut results = Vec::with_capacity(cases.len());
            for (i, t, computed, mut phases) in from_network {
                let id = &cases[i].0;
                let written = computed.and_then(|stage| match stage {
                    Stage::Whole(case, out) => {
                        let e = std::time::Instant::now();
                        let phase = out.phases().1;
                        let (seg, geom) = exporter.export(case, out, probabilities(id).as_deref())?;
                        phases.push((phase, e.elapsed().as_secs_f64()));
                        finish(id, seg, &geom, &mut phases)
                    }
                    Stage::Streamed(s) => {
                        let e = std::time::Instant::now();
                        let (seg, geom, network) = s.export(&exporter)?;
                        phases.extend(network.phases());
                        phases.push(("resample + argmax, beside the network", e.elapsed().as_secs_f64()));
                        finish(id, seg, &geom, &mut phases)
                    }
                });
                results.push(CaseResult { id: id.clone(), output: written.map_err(|e| crate::error_line(&e)), seconds: t.elapsed().as_secs_f64(), phases, skipped: false });
            }
            results
        });
        for (i, t, case, mut phases) in from_reader {
            let id = &cases[i].0;
            let case = match case {
                Ok(case) if predictor.streams_export(probabilities(id).is_some()) => case,
                other => {
                    // The writer stage exports from the whole logits (or the fast export's
                    // labels).
                    let computed = other.and_then(|case| {
                        let n = std::time::Instant::now();
                        let out = predictor.network(&case, false, None, &|d, k| progress(id, d, k))?;
                        phases.push((out.phases().0, n.elapsed().as_secs_f64()));
                        Ok(Stage::Whole(case, out))
                    });
                    to_writer.send((i, t, computed, phases)).expect("the writer stage runs until the network stage ends");
                    continue;
                }
            };
            // The writer stage exports the slabs as they come, two in flight at most.
            let (tx, slabs) = std::sync::mpsc::sync_channel(2);
            let streamed = Streamed { back: Back::of(&predictor.plan, &case), geom: case.geom.clone(), id: id.clone(), slabs, probabilities: probabilities(id) };
            to_writer.send((i, t, Ok(Stage::Streamed(streamed)), phases)).expect("the writer stage runs until the network stage ends");
            let n = std::time::Instant::now();
            let (first_tile, export_wait) = (std::cell::Cell::new(None), std::cell::Cell::new(0f64));
            let tile_done = |d: usize, k: usize| {
                if d == 1 {
                    first_tile.set(Some(n.elapsed().as_secs_f64()));
                }
                progress(id, d, k);
            };
            let r = predictor.stream_slabs(&case, &tile_done, &mut |z0, k, v| {
                let w = std::time::Instant::now();
                let sent = tx.send(SlabMsg::Slab(z0, k, v)).map_err(|_| anyhow::anyhow!("the export stage stopped"));
                export_wait.set(export_wait.get() + w.elapsed().as_secs_f64());
                sent
            });
            let times = NetworkTimes { seconds: n.elapsed().as_secs_f64(), first_tile: first_tile.get(), export_wait: export_wait.get() };
            // (The writer stage has the error when it stopped first.)
            let _ = tx.send(SlabMsg::Done(r.map(|()| times).map_err(|e| crate::error_line(&e))));
        }
        drop(to_writer);
        writer.join().expect("the writer stage does not panic")
    });
    skipped.extend(results);
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_gaussian_follow_the_spec_vectors() {
        assert_eq!(sliding_steps(110, 64, 0.5), [0, 23, 46]);
        assert_eq!(sliding_steps(150, 128, 0.5), [0, 22]);
        assert_eq!(sliding_steps(300, 128, 0.5), [0, 57, 115, 172]);
        assert_eq!(sliding_steps(40, 40, 0.5), [0]);
        assert_eq!(sliding_steps(512, 224, 0.5), [0, 96, 192, 288]);
        // A 2-D configuration's slice axis: each slice once (nnU-Net's 2-D loop over slices),
        // not the 2·(n − 1) + 1 positions of a 0.5 step of a one-voxel tile.
        assert_eq!(sliding_steps(5, 1, 0.5), [0, 1, 2, 3, 4]);
        assert_eq!(sliding_steps(1, 1, 0.5), [0]);
        assert_eq!(mirror_axes([1, 32, 32], false), [1, 2], "2-D: in-plane mirroring only (4 passes, not 8)");
        assert_eq!(mirror_axes([16, 32, 32], false), [0, 1, 2]);
        assert!(mirror_axes([1, 32, 32], true).is_empty());
        // The 2-D Gaussian of a one-slice tile: nnU-Net's 2-D map, unchanged by the unit axis.
        let (g2, g3) = (gaussian_importance([1, 32, 24]), gaussian_importance([4, 32, 24]));
        let plane = &g3[2 * 32 * 24..3 * 32 * 24];
        let ratio = plane[0] / g2[0];
        assert!(g2.iter().zip(plane).all(|(a, b)| ((b / a) / ratio - 1.0).abs() < 1e-5));
        let g = gaussian_importance([128; 3]);
        let at = |z: usize, y: usize, x: usize| g[(z * 128 + y) * 128 + x] as f64;
        let centre = at(64, 64, 64);
        assert!((at(0, 0, 0) / centre - 3.78e-11).abs() < 0.01e-11);
        assert!((at(0, 64, 64) / centre - 3.35e-4).abs() < 0.01e-4);
    }

    /// `n` deterministic, irregular intensities in [−1.5, 1.5).
    fn volume(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 3.0).collect()
    }

    /// The 53-slice volume (under a 16-slice patch) of the window tests: its shape, slice size,
    /// voxels and intensities.
    fn long_volume() -> ([usize; 3], usize, usize, Vec<f32>) {
        let shape = [53, 40, 21];
        let plane = shape[1] * shape[2];
        (shape, plane, shape[0] * plane, volume(shape[0] * plane))
    }

    /// A predictor over tiny STU-Nets with the given seeds (no plan needed: only the sliding
    /// window runs).
    fn tiny_predictor(seeds: &[u64], mirror: bool) -> Predictor {
        zoo::link();
        let device = Backend::Flex.device().unwrap();
        let entry = stu_engine::model::registry().get("stunet").unwrap();
        let spec = stu_engine::model::NetSpec { in_channels: 1, num_classes: 3, strides: vec![[2, 2, 2], [2, 2, 2]], options: serde_json::json!({"depth": [1, 1, 1], "dims": [4, 8, 8]}) };
        let nets = seeds.iter().map(|&s| stu_engine::train::seeded_init((entry.build)(&spec, &device).unwrap(), s)).collect();
        let plan = PreprocessPlan { spacing: [1.0; 3], slice_spacing_kept: false, transpose_forward: [0, 1, 2], normalization_schemes: vec!["ZScoreNormalization".into()], use_mask_for_norm: vec![false], intensity: vec![None] };
        Predictor { nets, plan, patch: [16, 32, 32], mirror_axes: if mirror { vec![0, 1, 2] } else { Vec::new() }, step: 0.5, device, precision: Precision::F32, on_device: Accumulate::Host, whole_export: false, fast_export: false, regions: None, cascade: None, configuration: "3d_fullres".into() }
    }

    /// A cascade's reader appends the first stage's segmentation one-hot after the images: from
    /// a label map in the input's geometry (preprocessed as a segmentation with the image), or
    /// from the first stage's grid (`predicted_next_stage`).
    #[test]
    fn a_cascade_reader_appends_the_previous_stage_one_hot() {
        let mr = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/Dataset802_TotalSegExampleMR");
        let images = vec![mr.join("imagesTr/ts_mr_sm_0000.nii.gz")];
        let label = mr.join("labelsTr/ts_mr_sm.nii.gz");
        let plan = PreprocessPlan { spacing: [4.0; 3], slice_spacing_kept: false, transpose_forward: [0, 1, 2], normalization_schemes: vec!["ZScoreNormalization".into()], use_mask_for_norm: vec![false], intensity: vec![None] };
        let reference = preprocess_case("ts_mr_sm", &images, Some(&label), &plan).unwrap();
        let [c, z, y, x] = reference.props.shape;
        let n = z * y * x;
        assert_eq!(c, 1);
        let max = reference.seg.iter().copied().max().unwrap();
        assert!(max > 4, "the label map has several labels");
        let labels: Vec<i16> = (1..=max).collect();
        let expected = stu_data::cascade::one_hot(&reference.seg, &labels);
        // From label maps in the input's geometry (here the reference labels stand in for the
        // first stage's prediction).
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(&label, dir.path().join("ts_mr_sm.nii.gz")).unwrap();
        let reader = |previous| Reader { plan: plan.clone(), channels: 1, cascade: Some(Cascade { labels: labels.clone(), previous }) };
        let case = reader(Previous::Files(dir.path().to_path_buf())).read("ts_mr_sm", &images).unwrap();
        assert_eq!(case.pre.props.shape, [1, z, y, x]);
        assert_eq!(case.pre.data, reference.data, "the image channel is the plain preprocessing's");
        assert_eq!(stu_data::cascade::one_hot(case.previous.as_ref().unwrap(), &labels), expected);
        // From the first stage's grid.
        let next = dir.path().join("next");
        let on_grid: Vec<i16> = reference.seg.iter().map(|&v| v.max(0)).collect();
        stu_data::cascade::save_next_stage(&next, "ts_mr_sm", &on_grid, [z, y, x]).unwrap();
        let case = reader(Previous::NextStage(vec![next])).read("ts_mr_sm", &images).unwrap();
        assert_eq!(stu_data::cascade::one_hot(case.previous.as_ref().unwrap(), &labels), expected);
        assert_eq!(case.previous.as_ref().unwrap().len(), n);
        // Labels the model does not know are a first stage of another dataset.
        let few = Reader { plan: plan.clone(), channels: 1, cascade: Some(Cascade { labels: vec![1, 2, 3, 4], previous: Previous::Files(dir.path().to_path_buf()) }) };
        let e = few.read("ts_mr_sm", &images).err().unwrap().to_string();
        assert!(e.contains("holds label") && e.contains("1..=4"), "{e}");
        // A case the first stage did not predict is named.
        let e = reader(Previous::Files(dir.path().join("next"))).read("ts_mr_sm", &images).err().unwrap().to_string();
        assert!(e.contains("ts_mr_sm") && e.contains("previous stage"), "{e}");
    }

    /// nnU-Net's `resample_and_save` (`tests/fixtures/make_next_stage_fixture.py`): the first
    /// stage's logits to the next stage's grid, linearly (a separate z axis for anisotropic
    /// spacing), then the argmax.
    #[test]
    fn next_stage_labels_equal_nnunets_resample_and_save() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/next_stage.json");
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut p = tiny_predictor(&[1], false);
        for case in doc["cases"].as_array().unwrap() {
            let get = |k: &str| case[k].clone();
            p.plan.spacing = serde_json::from_value(get("spacing")).unwrap();
            let grid: [usize; 3] = serde_json::from_value(get("grid")).unwrap();
            let target: [usize; 3] = serde_json::from_value(get("target")).unwrap();
            let logits: Vec<f32> = serde_json::from_value(get("logits")).unwrap();
            let expected: Vec<i16> = serde_json::from_value(get("labels")).unwrap();
            let ours = p.next_stage_labels(&logits, grid, target);
            let differ = ours.iter().zip(&expected).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "spacing {:?}: {differ} of {} labels differ", p.plan.spacing, expected.len());
        }
    }

    /// The one-hot channels a cascade's sliding window builds tile by tile give the same logits,
    /// bit for bit, as the channels materialised for the whole volume.
    #[test]
    fn a_cascade_window_one_hot_encodes_tile_by_tile_as_the_whole_volume() {
        zoo::link();
        let device = Backend::Flex.device().unwrap();
        let entry = stu_engine::model::registry().get("stunet").unwrap();
        let spec = stu_engine::model::NetSpec { in_channels: 3, num_classes: 3, strides: vec![[2, 2, 2], [2, 2, 2]], options: serde_json::json!({"depth": [1, 1, 1], "dims": [4, 8, 8]}) };
        let mut p = tiny_predictor(&[1], true);
        p.nets = vec![stu_engine::train::seeded_init((entry.build)(&spec, &device).unwrap(), 4)];
        p.cascade = Some(Cascade { labels: vec![1, 2], previous: Previous::NextStage(Vec::new()) });
        // Thinner than the patch along axis 0 (padded), longer along the others.
        let shape = [11, 40, 37];
        let n: usize = shape.iter().product();
        let image = volume(n);
        let mut rng = stu_core::rng::SplitMix64::new(8);
        let seg: Vec<i16> = (0..n).map(|_| rng.below(4) as i16 - 1).collect();
        let mut whole = image.clone();
        whole.extend(stu_data::cascade::one_hot(&seg, &[1, 2]));
        let lazy = p.sliding_window_with(&image, 1, shape, Some(&seg), &|_, _| {}).unwrap();
        let p_whole = Predictor { cascade: None, ..p };
        let materialised = p_whole.sliding_window(&whole, 3, shape, &|_, _| {}).unwrap();
        assert!(lazy.iter().zip(&materialised).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn an_ensemble_averages_its_members_logits() {
        // A volume larger than the patch along every axis: overlapping, Gaussian-weighted tiles.
        let shape = [21, 40, 37];
        let n: usize = shape.iter().product();
        let data = volume(n);
        for mirror in [false, true] {
            let run = |seeds: &[u64]| tiny_predictor(seeds, mirror).sliding_window(&data, 1, shape, &|_, _| {}).unwrap();
            let (a, b, ab) = (run(&[1]), run(&[2]), run(&[1, 2]));
            assert_eq!(ab.len(), 3 * n);
            let scale = a.iter().chain(&b).fold(0f32, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(&b).zip(&ab).fold(0f32, |m, ((a, b), e)| m.max((e - (a + b) / 2.0).abs()));
            assert!(worst <= 1e-5 * scale, "mirror {mirror}: ensemble off the members' mean by {worst} (scale {scale})");
            // The members differ, so the mean is not either of them.
            assert!(a.iter().zip(&b).any(|(a, b)| (a - b).abs() > 1e-2 * scale));
        }
    }

    /// The tiles are summed on the device while the logits take at most half its free memory,
    /// in host memory beyond, and where `STU_ACCUMULATE` says regardless.
    #[test]
    fn the_sum_of_tiles_moves_to_the_host_when_it_would_not_fit_the_device() {
        let gib = 1u64 << 30;
        assert!(Accumulate::DeviceIfItFits.on_device(10 * gib, Some(20 * gib)));
        assert!(!Accumulate::DeviceIfItFits.on_device(10 * gib + 1, Some(20 * gib)));
        assert!(Accumulate::DeviceIfItFits.on_device(u64::MAX, None), "a device that does not say");
        assert!(Accumulate::Device.on_device(u64::MAX, Some(0)));
        assert!(!Accumulate::Host.on_device(0, Some(u64::MAX)));
        // A CPU device has no CUDA memory to ask about.
        assert_eq!(stu_engine::backend::cuda_memory(&stu_engine::backend::Backend::default_compiled().unwrap().device().unwrap()), None);
    }

    #[test]
    fn padding_is_run_through_the_network_but_never_accumulated() {
        // A volume thinner than the patch along z and x: predicted as it is, and pre-padded by
        // hand (centred zeros, as the sliding window pads) and cropped afterwards, the logits
        // are the same bits, on the host and on the device.
        let shape = [9, 40, 21];
        let padded = [16, 40, 32];
        let lo = [3, 0, 5];
        let n: usize = shape.iter().product();
        let data = volume(n);
        let mut pre = vec![0f32; padded.iter().product()];
        for z in 0..shape[0] {
            for y in 0..shape[1] {
                let d = ((z + lo[0]) * padded[1] + y + lo[1]) * padded[2] + lo[2];
                pre[d..d + shape[2]].copy_from_slice(&data[(z * shape[1] + y) * shape[2]..][..shape[2]]);
            }
        }
        for on_device in [Accumulate::Host, Accumulate::Device] {
            let mut p = tiny_predictor(&[1], true);
            p.on_device = on_device;
            let got = p.sliding_window(&data, 1, shape, &|_, _| {}).unwrap();
            let full = p.sliding_window(&pre, 1, padded, &|_, _| {}).unwrap();
            let np: usize = padded.iter().product();
            let mut want = Vec::with_capacity(3 * n);
            for k in 0..3 {
                for z in 0..shape[0] {
                    for y in 0..shape[1] {
                        want.extend_from_slice(&full[k * np + ((z + lo[0]) * padded[1] + y + lo[1]) * padded[2] + lo[2]..][..shape[2]]);
                    }
                }
            }
            assert!(got == want, "{on_device:?}: the padded volume's logits differ");
        }
    }

    #[test]
    fn a_window_of_one_patch_depth_sums_the_same_logits_as_the_whole_volume() {
        // 53 slices under a 16-slice patch: rows of tiles at z = 0, 7, 15, …, 37, and a ring of
        // 16 slices that wraps around. The slices come out in order, each once, in several
        // slabs, and they are the whole-volume accumulator's bits, on the host and on the
        // device, with and without mirroring; so are the labels.
        let (shape, plane, n, data) = long_volume();
        for (on_device, mirror) in [(Accumulate::Host, false), (Accumulate::Host, true), (Accumulate::Device, false)] {
            let mut p = tiny_predictor(&[1], mirror);
            p.on_device = on_device;
            let whole = p.sliding_window(&data, 1, shape, &|_, _| {}).unwrap();
            let mut pieced = vec![f32::NAN; 3 * n];
            let mut slabs = Vec::new();
            p.slide(&data, 1, shape, None, Window::PatchDepth, &|_, _| {}, &mut |slab| {
                for k in 0..3 {
                    for dz in 0..slab.k {
                        pieced[k * n + (slab.z0 + dz) * plane..][..plane].copy_from_slice(slab.plane(k, dz));
                    }
                }
                slabs.push(slab.z0..slab.z0 + slab.k);
                Ok(())
            })
            .unwrap();
            assert!(slabs.len() >= 4 && slabs.windows(2).all(|w| w[0].end == w[1].start) && slabs[0].start == 0 && slabs.last().unwrap().end == shape[0], "{on_device:?}: slabs {slabs:?}");
            assert!(pieced == whole, "{on_device:?}, mirror {mirror}: the ring's logits differ from the whole volume's");
            let labels = p.sliding_labels(&data, 1, shape, &|_, _| {}).unwrap();
            let argmax: Vec<i16> = (0..n).map(|i| (1..3).fold(0, |b, k| if whole[k * n + i] > whole[b * n + i] { k } else { b }) as i16).collect();
            assert_eq!(labels, argmax, "{on_device:?}");
            assert!((0..3).all(|k| labels.contains(&k)), "every class is predicted somewhere, so the argmax is tested");
            // A region-based model's outputs: each writes its label where its sigmoid > 0.5,
            // later ones over earlier ones.
            p.regions = Some(vec![1, 2, 7]);
            let regions = p.sliding_labels(&data, 1, shape, &|_, _| {}).unwrap();
            let painted: Vec<i16> = (0..n).map(|i| [1, 2, 7].iter().enumerate().fold(0, |s, (k, &w)| if 1.0 / (1.0 + (-whole[k * n + i]).exp()) > 0.5 { w } else { s })).collect();
            assert_eq!(regions, painted, "{on_device:?}: regions");
            let distinct: std::collections::BTreeSet<i16> = regions.iter().copied().collect();
            assert!(distinct.len() >= 2, "the regions paint more than one label: {distinct:?}");
        }
        // A volume thinner than the patch is one slab, its window the volume.
        let p = tiny_predictor(&[1], false);
        let thin = [9, 40, 21];
        let mut slabs = Vec::new();
        p.slide(&data[..9 * plane], 1, thin, None, Window::PatchDepth, &|_, _| {}, &mut |slab| {
            slabs.push(slab.z0..slab.z0 + slab.k);
            Ok(())
        })
        .unwrap();
        assert_eq!(slabs, vec![0..9]);
    }

    /// The 3-class `data`'s slabs sent to `streamed`'s export on another thread (overlapped
    /// prediction), two in flight: its label map.
    fn export_beside(p: &Predictor, data: &[f32], shape: [usize; 3], streamed: Streamed, tx: std::sync::mpsc::SyncSender<SlabMsg>) -> Vec<u16> {
        let exporter = p.exporter();
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| streamed.export(&exporter).unwrap());
            let r = p.slide(data, 1, shape, None, Window::PatchDepth, &|_, _| {}, &mut |slab| {
                let (z0, k) = (slab.z0, slab.k);
                tx.send(SlabMsg::Slab(z0, k, slab.into_copied(3))).map_err(|_| anyhow::anyhow!("stopped"))
            });
            tx.send(SlabMsg::Done(r.map(|()| NetworkTimes::default()).map_err(|e| e.to_string()))).unwrap();
            writer.join().unwrap().0
        })
    }

    #[test]
    fn the_full_export_done_slab_by_slab_labels_as_the_whole_logits_do() {
        // The sliding window's slabs (a 16-slice ring over 53 slices) resampled row by row to
        // the cropped shape and reduced at once give the labels that resampling each class's
        // whole logits and taking the running argmax (or painting the regions) gives: up and
        // down along each axis, with and without a separate axis, on the host and the device.
        let (shape, _, n, data) = long_volume();
        for (target, separate, on_device) in [([80, 33, 25], None, Accumulate::Host), ([30, 47, 21], Some(0), Accumulate::Host), ([53, 20, 40], None, Accumulate::Device), ([71, 40, 13], Some(2), Accumulate::Host)] {
            let mut p = tiny_predictor(&[1], false);
            p.on_device = on_device;
            let whole = p.sliding_window(&data, 1, shape, &|_, _| {}).unwrap();
            let back = Back { grid: shape, target, separate, full: target, bbox: [[0, target[0]], [0, target[1]], [0, target[2]]], backward: [0, 1, 2] };
            let nt: usize = target.iter().product();
            let resampled = |c: usize| resample_linear(&whole[c * n..(c + 1) * n], shape, target, separate);
            for regions in [None, Some(vec![1u16, 2, 7])] {
                p.regions = regions.clone();
                let mut rows = RowExport::new(&back, 3, regions.clone(), None, target).unwrap();
                p.slide(&data, 1, shape, None, Window::PatchDepth, &|_, _| {}, &mut |slab| rows.take(&slab)).unwrap();
                let got = rows.finish().unwrap();
                let mut want = vec![0u16; nt];
                match &regions {
                    None => {
                        let mut best = vec![f32::NEG_INFINITY; nt];
                        for c in 0..3 {
                            for ((b, a), v) in best.iter_mut().zip(want.iter_mut()).zip(resampled(c)) {
                                if v > *b {
                                    (*b, *a) = (v, c as u16);
                                }
                            }
                        }
                    }
                    Some(w) => {
                        for (c, &w) in w.iter().enumerate() {
                            for (a, v) in want.iter_mut().zip(resampled(c)) {
                                if sigmoid(v) > 0.5 {
                                    *a = w;
                                }
                            }
                        }
                    }
                }
                assert!(got == want, "{target:?} {separate:?} {on_device:?} regions {regions:?}: {} labels differ", got.iter().zip(&want).filter(|(a, b)| a != b).count());
                // The same slabs sent to another thread's export (overlapped prediction), two
                // in flight, give the same labels in the input's geometry.
                let (tx, slabs) = std::sync::mpsc::sync_channel(2);
                let geom = stu_data::nifti_io::Geometry { shape: target, spacing: [1.0; 3], affine: [[0.0; 4]; 4], header: Default::default() };
                let streamed = Streamed { back: Back { ..back }, geom, id: "case".into(), slabs, probabilities: None };
                let seg = export_beside(&p, &data, shape, streamed, tx);
                assert!(seg == want, "{target:?} {separate:?} {on_device:?} regions {regions:?}: streamed to another thread");
                let distinct: std::collections::BTreeSet<u16> = got.iter().copied().collect();
                assert!(distinct.len() >= 2, "more than one label: {distinct:?}");
            }
        }
    }

    #[test]
    fn probabilities_written_as_the_slices_come_are_the_whole_exports_bytes() {
        // The softmax (a region model's sigmoids) written block of rows by block of rows into
        // whole slices of the input, un-cropped and with the in-plane axes transposed back, on
        // the network's thread or on the export stage's, is the file that the export from the
        // whole logits writes, byte for byte, beside the same labels.
        let (shape, _, _, data) = long_volume();
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        for (target, separate, backward) in [([80, 33, 25], None, [0, 1, 2]), ([30, 47, 21], Some(0), [0, 2, 1])] {
            let full = [target[0] + 7, target[1] + 3, target[2] + 4];
            let bbox = [[5, 5 + target[0]], [1, 1 + target[1]], [0, target[2]]];
            let input = backward.map(|a| full[a]);
            let geom = stu_data::nifti_io::Geometry { shape: input, spacing: [1.0; 3], affine: [[0.0; 4]; 4], header: Default::default() };
            let back = Back { grid: shape, target, separate, full, bbox, backward };
            for regions in [None, Some(vec![1u16, 2, 7])] {
                let mut p = tiny_predictor(&[1], false);
                p.regions = regions.clone();
                let whole = p.sliding_window(&data, 1, shape, &|_, _| {}).unwrap();
                let exporter = p.exporter();
                let (want, _) = exporter.export_with(&back, "case", geom.clone(), NetOut::Logits(whole), Some(&path("whole"))).unwrap();
                let mut rows = RowExport::new(&back, 3, regions.clone(), Some(&path("rows")), input).unwrap();
                p.slide(&data, 1, shape, None, Window::PatchDepth, &|_, _| {}, &mut |slab| rows.take(&slab)).unwrap();
                let out = NetOut::Cropped(rows.finish().unwrap(), Some(path("rows")));
                let (seg, _) = exporter.export_with(&back, "case", geom.clone(), out, Some(&path("rows"))).unwrap();
                let whole_bytes = std::fs::read(path("whole")).unwrap();
                assert!(seg == want, "{target:?} {backward:?} {regions:?}: labels");
                assert!(std::fs::read(path("rows")).unwrap() == whole_bytes, "{target:?} {backward:?} {regions:?}: probabilities");
                // Streamed to the export stage's thread (overlapped prediction).
                let (tx, slabs) = std::sync::mpsc::sync_channel(2);
                let streamed = Streamed { back: Back { ..back }, geom: geom.clone(), id: "case".into(), slabs, probabilities: Some(path("streamed")) };
                let seg = export_beside(&p, &data, shape, streamed, tx);
                assert!(seg == want && std::fs::read(path("streamed")).unwrap() == whole_bytes, "{target:?} {backward:?} {regions:?}: streamed");
                // A prediction that stops half-way leaves no file, nor its temporary sibling.
                let mut rows = RowExport::new(&back, 3, regions.clone(), Some(&path("stopped")), input).unwrap();
                let r = p.slide(&data, 1, shape, None, Window::PatchDepth, &|_, _| {}, &mut |slab| {
                    rows.take(&slab)?;
                    anyhow::bail!("the network failed")
                });
                assert!(r.is_err());
                drop(rows);
                let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
                assert!(!names.iter().any(|n| n.contains("stopped")), "{names:?}");
            }
        }
        // A transposition that moves the first axis does not stream (the whole logits are used).
        assert!(RowProbabilities::streams([0, 2, 1]) && !RowProbabilities::streams([2, 0, 1]));
    }

    #[test]
    fn probabilities_larger_than_the_free_disk_are_refused_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.probabilities.safetensors");
        // 105 classes of a 10⁴ × 10⁴ × 10³ volume: 21 PB.
        let err = ProbabilityFile::create(&path, 105, [10_000, 10_000, 1_000], None).err().expect("refused").to_string();
        assert!(err.contains("huge.probabilities.safetensors") && err.contains("GB free"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");
        assert!(ProbabilityFile::create(&path, 2, [4, 4, 4], None).is_ok());
    }

    #[test]
    fn all_finite_finds_a_nan_or_infinity_anywhere() {
        let mut v = vec![0.5f32; (1 << 16) * 3 + 5];
        assert!(all_finite(&v) && all_finite(&[]));
        for (i, bad) in [(v.len() - 1, f32::NAN), ((1 << 16) + 7, f32::INFINITY), (0, f32::NEG_INFINITY)] {
            v[i] = bad;
            assert!(!all_finite(&v), "{bad} at {i}");
            v[i] = 0.5;
        }
    }

    #[test]
    fn keep_largest_removes_smaller_components_per_label() {
        let shape = [1, 3, 7];
        let mut seg = vec![1, 1, 0, 0, 0, 1, 0, /**/ 0, 0, 1, 2, 0, 0, 0, /**/ 1, 0, 0, 0, 0, 0, 2];
        keep_largest_per_label(&mut seg, shape);
        // Label 1: {0, 1, 9 (diagonal to 1... no: (0,1,2) touches (0,0,1))} size 3, {5} and {14}
        // size 1 → removed. Label 2: two components of size 1, a tie → both kept.
        assert_eq!(seg, vec![1, 1, 0, 0, 0, 0, 0, /**/ 0, 0, 1, 2, 0, 0, 0, /**/ 0, 0, 0, 0, 0, 0, 2]);
    }
}
