//! `stu train`: nnU-Net's training recipe (`shared/docs/nnunet-pipeline.md` §5) for any
//! registered model on a preprocessed dataset and fold, resumable, with fine-tuning.
//!
//! A run folder holds `train.json` (the resolved configuration), `log.jsonl` (one line per
//! epoch), `progress.png`, and `checkpoint_{best,latest,final}.safetensors`: weights under
//! `network_weights.` (so `stu forward`/`stu predict` read them like any checkpoint), the
//! optimiser's state under `optimizer_state.` (SGD's momentum, or Adam's moments and steps), and
//! the header metadata `stu_checkpoint` (JSON: next epoch, EMA and best EMA, seed and the
//! batch-stream positions, model description, configuration, the mirroring axes its predictions
//! may use).
//!
//! The recipe is nnU-Net's `nnUNetTrainer`; [`Recipe`] holds what its trainer variants change.
//!
//! Determinism: initial weights come from the seed, batch `i` of epoch `e` from
//! `(seed, stream, e·iters + i)` (see `stu_data::loader`), and the CPU kernels sum in an order
//! fixed by the shapes alone (`stu_engine::kernels::fold_groups`), so a resumed run repeats the
//! uninterrupted one's losses exactly, and so does the same run on any number of threads.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use stu_data::augment::{AugConfig, SegInterpolation};
use stu_data::loader::{BatchConfig, CaseStore, Loader};
use stu_engine::backend::Backend;
use stu_engine::precision::Precision;
use stu_engine::checkpoint::{NamedTensor, StateDict, write_safetensors};
use stu_engine::loss::{DiceConfig, LossKind};
use stu_engine::model::{LoadOptions, NetSpec, SegNet};
use stu_engine::schedule::{LrSchedule, ds_weights};
use stu_engine::dist::{Group, Launch};
use stu_engine::train::{DeviceBatch, Optimizer, OptimizerKind, StepConfig, dice_per_class, seeded_init, nanmean, train_step_in, validation_step, weights_checksum};

/// Checkpoint format tag in the safetensors metadata.
pub const CHECKPOINT_FORMAT: &str = "stu-train-checkpoint/1";

/// Everything that determines a run's results (written to `train.json`; `--resume` checks it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Preprocessed folder (cases, `dataset.json`, `plans.json`, `splits_final.json`).
    pub preprocessed: PathBuf,
    /// Plans configuration.
    pub configuration: String,
    /// Fold of `splits_final.json`, or `all` (train on every case; its in-training validation
    /// runs on them too, as nnU-Net's).
    pub fold: String,
    /// Model registry name.
    pub model: String,
    /// Model size options (`NetSpec::options`).
    pub model_options: serde_json::Value,
    /// Epochs.
    pub epochs: usize,
    /// Training iterations per epoch.
    pub iterations: usize,
    /// Validation iterations per epoch.
    pub val_iterations: usize,
    /// Write `checkpoint_latest` every this many epochs.
    pub save_every: usize,
    /// Batch size (plan's by default).
    pub batch_size: usize,
    /// Patch size (plan's by default).
    pub patch_size: [usize; 3],
    /// Initial learning rate (1e-2; 1e-3 when fine-tuning).
    pub initial_lr: f64,
    /// Seed of weights and batches.
    pub seed: u64,
    /// Pre-trained checkpoint to start from.
    pub init_from: Option<PathBuf>,
    /// Augmentation on (nnU-Net's pipeline) or off.
    pub augmentation: bool,
    /// Compute backend.
    pub backend: String,
    /// Fraction of the fold's training cases used (a fixed subset per fraction).
    #[serde(default = "one")]
    pub fraction: f64,
    /// Arithmetic of the forward and backward (bf16 over f32 master weights, or f32).
    #[serde(default, skip_serializing_if = "is_f32")]
    pub precision: Precision,
    /// Data-parallel processes sharing each batch (1: a single process). Batches depend on it,
    /// so a run resumes only with the same number.
    #[serde(default = "one_process", skip_serializing_if = "is_one_process")]
    pub world_size: usize,
    /// A cascade's second stage: the folders of the first stage's segmentations of the
    /// training cases (`RUN/predicted_next_stage/<configuration>` of its folds).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_stage: Vec<PathBuf>,
    /// See [`Recipe::loss`] (left out at nnU-Net's default, as the four below, so that runs
    /// recorded before these existed resume).
    #[serde(default, skip_serializing_if = "is_default")]
    pub loss: LossKind,
    /// See [`Recipe::deep_supervision`].
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub deep_supervision: bool,
    /// See [`Recipe::optimizer`].
    #[serde(default, skip_serializing_if = "is_default")]
    pub optimizer: OptimizerKind,
    /// See [`Recipe::lr_schedule`].
    #[serde(default, skip_serializing_if = "is_default")]
    pub lr_schedule: LrSchedule,
    /// See [`Recipe::mirror_axes`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_axes: Option<Vec<usize>>,
    /// See [`Recipe::oversample_foreground`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oversample_foreground: Option<f64>,
    /// See [`Recipe::probabilistic_oversampling`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub probabilistic_oversampling: bool,
    /// See [`Recipe::seg_interpolation`].
    #[serde(default, skip_serializing_if = "is_default")]
    pub seg_interpolation: SegInterpolation,
    /// See [`Recipe::dummy_2d_augmentation`].
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub dummy_2d_augmentation: bool,
}

/// The [`Recipe`] of a value that holds its fields flat under the same names (`TrainConfig`, the
/// spec's `TrainSpec`: both are read with `deny_unknown_fields`, which serde's `flatten` does
/// not support, so they repeat the fields instead of nesting a `Recipe`).
macro_rules! recipe_of {
    ($s:expr) => {
        $crate::train::Recipe {
            loss: $s.loss,
            deep_supervision: $s.deep_supervision,
            optimizer: $s.optimizer,
            lr_schedule: $s.lr_schedule,
            mirror_axes: $s.mirror_axes.clone(),
            oversample_foreground: $s.oversample_foreground,
            probabilistic_oversampling: $s.probabilistic_oversampling,
            seg_interpolation: $s.seg_interpolation,
            dummy_2d_augmentation: $s.dummy_2d_augmentation,
        }
    };
}
pub(crate) use recipe_of;

impl TrainConfig {
    /// The recipe's variant settings.
    pub fn recipe(&self) -> Recipe {
        recipe_of!(self)
    }

    /// Training's augmentation: nnU-Net's for the patch, with the recipe's mirroring axes, label
    /// interpolation and dummy-2-D rule.
    pub fn aug_config(&self) -> AugConfig {
        AugConfig { mirror_axes: self.mirror_axes_here(), seg_interpolation: self.seg_interpolation, ..AugConfig::nnunet_with(self.patch_size, self.dummy_2d_augmentation) }
    }

    /// The mirrored axes ([`Recipe::mirror_axes`]) in this crate's numbering of a patch's
    /// three axes: a 2-D configuration's patches are one slice deep, its in-plane axes 1 and 2.
    pub fn mirror_axes_here(&self) -> Vec<usize> {
        stu_data::sampler::mirror_axes(stu_data::sampler::planar(self.patch_size), self.mirror_axes.as_deref())
    }

    /// Which training samples are forced to contain foreground.
    pub fn oversampling(&self) -> stu_data::sampler::Oversampling {
        use stu_data::sampler::{OVERSAMPLE_FOREGROUND, Oversampling};
        match (self.probabilistic_oversampling, self.oversample_foreground) {
            (false, p) => Oversampling::BatchPosition(p.unwrap_or(OVERSAMPLE_FOREGROUND)),
            (true, Some(p)) => Oversampling::Probabilistic(p),
            (true, None) => Oversampling::Probabilistic(Oversampling::effective_fraction(self.batch_size)),
        }
    }
}

/// What nnU-Net's trainer variants (`nnunetv2/training/nnUNetTrainer/variants`) change in its
/// recipe, the axes of a training ablation. The default is `nnUNetTrainer`'s.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// The loss (`nnUNetTrainerCELoss`, `…DiceLoss`, `…Topk10Loss`, `…DiceTopK10Loss`,
    /// `…DiceCELoss_noSmooth`, `…Topk10LossLS01`).
    pub loss: LossKind,
    /// Deep supervision; off, only the full-resolution output is trained
    /// (`nnUNetTrainerNoDeepSupervision`).
    pub deep_supervision: bool,
    /// The optimiser (`nnUNetTrainerAdam`: AdamW with AMSGrad; `nnUNetTrainerVanillaAdam`).
    pub optimizer: OptimizerKind,
    /// The learning-rate schedule (`nnUNetTrainerCosAnneal`, `nnUNetTrainer_warmup`).
    pub lr_schedule: LrSchedule,
    /// The axes mirrored, in training's augmentation and as test-time augmentation of the
    /// run's checkpoints, in nnU-Net's numbering of the configuration's spatial axes (3-D:
    /// 0, 1, 2; 2-D: 0, 1); `None`: all of them (nnU-Net's default), empty: none
    /// (`nnUNetTrainerNoMirroring`), `[0, 1]` (`nnUNetTrainer_onlyMirror01`; `[0]` in 2-D).
    pub mirror_axes: Option<Vec<usize>>,
    /// The fraction of samples forced to contain foreground (nnU-Net's
    /// `oversample_foreground_percent`; `None`: 0.33, or with probabilistic sampling the share
    /// the default rule gives the batch size, as `nnUNetTrainer_probabilisticOversampling`).
    pub oversample_foreground: Option<f64>,
    /// Each sample forced with that probability instead of the last ones of the batch
    /// (`nnUNetTrainer_probabilisticOversampling[_033|_010]`).
    pub probabilistic_oversampling: bool,
    /// How rotation and scaling resample the label maps: per label, linearly (nnU-Net's), or
    /// the nearest voxel's (`nnUNetTrainer_DASegOrd0`).
    pub seg_interpolation: SegInterpolation,
    /// nnU-Net's dummy-2-D augmentation of anisotropic 3-D patches (in plane, about axis 0);
    /// off, they are augmented in 3-D (`nnUNetTrainer_noDummy2DDA`).
    pub dummy_2d_augmentation: bool,
}

impl Recipe {
    /// What differs from nnU-Net's recipe, in words (`loss ce, optimizer adamw`); empty for
    /// nnU-Net's own.
    pub fn describe(&self) -> String {
        let d = Self::default();
        let mut out = Vec::new();
        if self.loss != d.loss {
            out.push(format!("loss {}", self.loss.name()));
        }
        if !self.deep_supervision {
            out.push("no deep supervision".into());
        }
        if self.optimizer != d.optimizer {
            out.push(format!("optimizer {}", self.optimizer.name()));
        }
        if self.lr_schedule != d.lr_schedule {
            out.push(format!("lr schedule {}", self.lr_schedule.name()));
        }
        if let Some(a) = &self.mirror_axes {
            out.push(format!("mirror axes {a:?}"));
        }
        if let Some(p) = self.oversample_foreground {
            out.push(format!("foreground oversampling {p}"));
        }
        if self.probabilistic_oversampling {
            out.push("probabilistic oversampling".into());
        }
        if self.seg_interpolation != d.seg_interpolation {
            out.push(format!("label maps augmented by {} interpolation", self.seg_interpolation.name()));
        }
        if !self.dummy_2d_augmentation {
            out.push("no dummy-2-D augmentation".into());
        }
        out.join(", ")
    }
}

impl Default for Recipe {
    fn default() -> Self {
        Self {
            loss: LossKind::DiceCe,
            deep_supervision: true,
            optimizer: OptimizerKind::Sgd,
            lr_schedule: LrSchedule::Poly,
            mirror_axes: None,
            oversample_foreground: None,
            probabilistic_oversampling: false,
            seg_interpolation: SegInterpolation::Linear,
            dummy_2d_augmentation: true,
        }
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn yes() -> bool {
    true
}

fn is_yes(v: &bool) -> bool {
    *v
}

fn one_process() -> usize {
    1
}

fn is_one_process(w: &usize) -> bool {
    *w == 1
}

pub(crate) fn is_f32(p: &Precision) -> bool {
    *p == Precision::F32
}

fn one() -> f64 {
    1.0
}

/// What `stu train` is asked to do (CLI level; defaults resolved by [`resolve`]).
#[derive(Debug, Clone)]
pub struct TrainRequest {
    /// See [`TrainConfig::preprocessed`].
    pub preprocessed: PathBuf,
    /// See [`TrainConfig::configuration`].
    pub configuration: String,
    /// See [`TrainConfig::fold`].
    pub fold: String,
    /// Run folder.
    pub out: PathBuf,
    /// See [`TrainConfig::model`].
    pub model: String,
    /// See [`TrainConfig::model_options`].
    pub model_options: serde_json::Value,
    /// Epochs (1000).
    pub epochs: usize,
    /// Iterations per epoch (250).
    pub iterations: usize,
    /// Validation iterations (50).
    pub val_iterations: usize,
    /// Checkpoint interval (50).
    pub save_every: usize,
    /// Override of the plan's batch size.
    pub batch_size: Option<usize>,
    /// Override of the plan's patch size.
    pub patch_size: Option<[usize; 3]>,
    /// Override of the initial learning rate.
    pub lr: Option<f64>,
    /// Seed.
    pub seed: u64,
    /// Fine-tuning source.
    pub init_from: Option<PathBuf>,
    /// Augmentation.
    pub augmentation: bool,
    /// Continue the run in `out`.
    pub resume: bool,
    /// Loader threads.
    pub workers: usize,
    /// Backend.
    pub backend: Backend,
    /// Fraction of the training cases (1.0: all).
    pub fraction: f64,
    /// See [`TrainConfig::precision`].
    pub precision: Precision,
    /// For a cascade's second stage: the first stage's run folders (or their
    /// `predicted_next_stage/<configuration>` folders).
    pub previous_stage: Vec<PathBuf>,
    /// Loss, deep supervision, optimiser, schedule, mirroring.
    pub recipe: Recipe,
}

/// The plan values training needs.
struct Plan {
    patch: [usize; 3],
    batch: usize,
    batch_dice: bool,
    strides: Vec<[usize; 3]>,
    /// The configuration a cascade stage follows (`previous_stage`).
    previous_stage: Option<String>,
    /// The plan's convolution kernels per stage (`conv_kernel_sizes`, or
    /// `architecture.arch_kwargs.kernel_sizes`; a 2-D plan's lifted to `[1, k, k]`).
    kernels: Option<Vec<[usize; 3]>>,
    /// The plan's features per stage (`architecture.arch_kwargs.features_per_stage`), or its
    /// cap (`unet_max_num_features`: 320, or 512 for a 2-D plan).
    features: Option<Vec<usize>>,
    max_features: Option<usize>,
}

/// The plan's network shape as model options for nnU-Net's own networks (`nnunet-plainconv`,
/// `nnunet-resenc`), where the given options leave it open: the plan's kernels (`[1, 3, 3]`
/// stages of anisotropic and 2-D plans) and its features or their cap (512 for 2-D). Left out
/// where they equal the model's defaults (3³, the 320 cap), so such options stay as given.
fn plan_model_options(model: &str, options: &serde_json::Value, plan: &Plan) -> serde_json::Value {
    if !matches!(model, "nnunet-plainconv" | "nnunet-resenc") {
        return options.clone();
    }
    let mut o = match options {
        serde_json::Value::Object(m) => m.clone(),
        serde_json::Value::Null => serde_json::Map::new(),
        _ => return options.clone(),
    };
    if let Some(k) = plan.kernels.as_ref().filter(|k| k.iter().any(|k| *k != [3; 3])) {
        o.entry("kernels").or_insert_with(|| serde_json::json!(k));
    }
    let sized = ["features", "base_width", "max_width"].iter().any(|k| o.contains_key(*k));
    if !sized {
        let capped = |f: &Vec<usize>| plan.strides.len() + 1 == f.len() && *f == (0..f.len()).map(|s| (32usize << s).min(320)).collect::<Vec<_>>();
        match (&plan.features, plan.max_features) {
            (Some(f), _) if !capped(f) => {
                o.insert("features".into(), serde_json::json!(f));
            }
            (None, Some(m)) if m != 320 => {
                o.insert("max_width".into(), m.into());
            }
            _ => {}
        }
    }
    if o.is_empty() && options.is_null() { serde_json::Value::Null } else { serde_json::Value::Object(o) }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// The network a preprocessed folder's plan was made for (`UNet_class_name`, or nnU-Net ≥ 2.3's
/// `architecture.network_class_name`), if it says.
pub(crate) fn plan_network(dir: &Path, configuration: &str) -> Option<String> {
    let json = read_json(&dir.join("plans.json")).ok()?;
    let c = stu_data::plan::configuration(&json, configuration).ok()?;
    c.get("UNet_class_name").or_else(|| c.pointer("/architecture/network_class_name")).and_then(|v| v.as_str()).map(str::to_string)
}

/// Whether a preprocessed folder's configuration is a 2-D plan (nnU-Net's `2d`).
pub(crate) fn plan_is_2d(dir: &Path, configuration: &str) -> bool {
    read_json(&dir.join("plans.json")).ok().and_then(|json| stu_data::plan::configuration(&json, configuration).ok()).is_some_and(|c| stu_data::plan::is_2d(&c))
}

fn read_plan(dir: &Path, configuration: &str) -> Result<Plan> {
    let path = dir.join("plans.json");
    let json = read_json(&path)?;
    let c = stu_data::plan::configuration(&json, configuration).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let get = |k: &str| c.get(k).with_context(|| format!("{}: `configurations.{configuration}.{k}` is missing", path.display()));
    let patch: Vec<usize> = serde_json::from_value(get("patch_size")?.clone()).with_context(|| format!("{}: `patch_size` is not a list of integers", path.display()))?;
    ensure!(patch.len() == 3, "{}: `patch_size` has {} axes; only 3-D configurations train here", path.display(), patch.len());
    Ok(Plan {
        patch: [patch[0], patch[1], patch[2]],
        batch: get("batch_size")?.as_u64().with_context(|| format!("{}: `batch_size` is not an integer", path.display()))? as usize,
        batch_dice: get("batch_dice")?.as_bool().unwrap_or(false),
        strides: crate::plans::strides_from_plans(&path, configuration)?,
        previous_stage: c.get("previous_stage").and_then(|p| p.as_str()).map(str::to_string),
        kernels: c.get("conv_kernel_sizes").or_else(|| c.pointer("/architecture/arch_kwargs/kernel_sizes")).and_then(|k| serde_json::from_value(k.clone()).ok()),
        features: c.pointer("/architecture/arch_kwargs/features_per_stage").and_then(|k| serde_json::from_value(k.clone()).ok()),
        max_features: c.get("unet_max_num_features").and_then(|m| m.as_u64()).map(|m| m as usize),
    })
}

/// Resolves defaults (plan values, lr preset) into the configuration of a new run.
pub fn resolve(req: &TrainRequest) -> Result<TrainConfig> {
    let plan = read_plan(&req.preprocessed, &req.configuration)?;
    ensure!(
        plan.patch[0] != 1 || matches!(req.model.as_str(), "nnunet-plainconv" | "nnunet-resenc"),
        "configuration `{}` is a 2-D plan (one-slice patches {:?}): it trains nnU-Net's networks (--model nnunet-plainconv or nnunet-resenc); `{}` is a 3-D network",
        req.configuration,
        plan.patch,
        req.model
    );
    stu_data::preprocess::check_made_for(&req.preprocessed, &read_json(&req.preprocessed.join("plans.json"))?, &req.configuration)?;
    let t = task(&req.preprocessed)?;
    req.recipe.loss.check(t.ignore.is_some(), t.loss_regions.is_some()).map_err(|e| anyhow::anyhow!("{}: {e}", req.preprocessed.join("dataset.json").display()))?;
    let previous_stage = match (&plan.previous_stage, req.previous_stage.is_empty()) {
        (Some(first), true) => bail!("configuration `{}` is the second stage of a cascade after `{first}`: pass --previous-stage with the `{first}` runs (every fold, or fold `all`) whose final validations wrote their segmentations", req.configuration),
        (None, false) => bail!("--previous-stage: configuration `{}` is no cascade stage (its plan names no `previous_stage`)", req.configuration),
        (None, true) => Vec::new(),
        (Some(_), false) => req
            .previous_stage
            .iter()
            .map(|d| {
                // A first-stage run folder stands for its segmentations for this stage.
                let inner = stu_data::cascade::next_stage_dir(d, &req.configuration);
                let d = if inner.is_dir() { inner } else { d.clone() };
                d.canonicalize().with_context(|| format!("--previous-stage {}: cannot open", d.display()))
            })
            .collect::<Result<_>>()?,
    };
    let preprocessed = req.preprocessed.canonicalize().with_context(|| format!("{}: cannot open the preprocessed folder", req.preprocessed.display()))?;
    let init_from = match &req.init_from {
        Some(p) => Some(p.canonicalize().with_context(|| format!("{}: cannot open the checkpoint", p.display()))?),
        None => None,
    };
    ensure!(req.epochs >= 1, "--epochs must be at least 1");
    ensure!(req.iterations >= 1, "--iterations must be at least 1");
    ensure!(req.save_every >= 1, "--save-every must be at least 1");
    if let Some(lr) = req.lr {
        ensure!(lr.is_finite() && lr >= 0.0, "--lr must be a finite number ≥ 0, got {lr}");
    }
    ensure!(req.fraction > 0.0 && req.fraction <= 1.0, "--fraction must be in (0, 1], got {}", req.fraction);
    if let Some(axes) = &req.recipe.mirror_axes {
        let dims = if plan.patch[0] == 1 { 2 } else { 3 };
        ensure!(stu_data::sampler::valid_axes(axes, dims), "--mirror-axes {axes:?}: configuration `{}` has {dims} spatial axes (0…{}), each named once", req.configuration, dims - 1);
    }
    if let Some(p) = req.recipe.oversample_foreground {
        ensure!((0.0..=1.0).contains(&p), "--oversample-foreground must be in [0, 1], got {p}");
    }
    req.precision.check(req.backend).map_err(|e| anyhow::anyhow!("--precision: {e}"))?;
    Ok(TrainConfig {
        preprocessed,
        configuration: req.configuration.clone(),
        fold: req.fold.clone(),
        model: req.model.clone(),
        model_options: plan_model_options(&req.model, &req.model_options, &plan),
        epochs: req.epochs,
        iterations: req.iterations,
        val_iterations: req.val_iterations,
        save_every: req.save_every,
        batch_size: req.batch_size.unwrap_or(plan.batch),
        patch_size: req.patch_size.unwrap_or(plan.patch),
        initial_lr: req.lr.unwrap_or(if init_from.is_some() { 1e-3 } else { 1e-2 }),
        seed: req.seed,
        init_from,
        augmentation: req.augmentation,
        backend: req.backend.name().to_string(),
        fraction: req.fraction,
        precision: req.precision,
        world_size: 1,
        previous_stage,
        loss: req.recipe.loss,
        deep_supervision: req.recipe.deep_supervision,
        optimizer: req.recipe.optimizer,
        lr_schedule: req.recipe.lr_schedule,
        mirror_axes: req.recipe.mirror_axes.clone(),
        oversample_foreground: req.recipe.oversample_foreground,
        probabilistic_oversampling: req.recipe.probabilistic_oversampling,
        seg_interpolation: req.recipe.seg_interpolation,
        dummy_2d_augmentation: req.recipe.dummy_2d_augmentation,
    })
}

/// The training and validation case ids of a fold.
pub(crate) fn fold_cases(dir: &Path, fold: &str) -> Result<(Vec<String>, Vec<String>)> {
    if fold == "all" {
        let mut ids: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot list", dir.display()))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix("_data.f32")).map(str::to_string))
            .filter(|id| dir.join(format!("{id}.json")).exists())
            .collect();
        ids.sort();
        return Ok((ids, Vec::new()));
    }
    let k: usize = fold.parse().with_context(|| format!("--fold `{fold}` is neither a fold number nor `all`"))?;
    let path = dir.join("splits_final.json");
    let splits: Vec<stu_data::splits::Fold> = serde_json::from_value(read_json(&path)?).with_context(|| format!("{}: not a list of {{train, val}} folds", path.display()))?;
    let f = splits.get(k).with_context(|| format!("{}: fold {k} requested, the file has {} folds", path.display(), splits.len()))?;
    ensure!(!f.train.is_empty(), "{}: fold {k} has no training cases", path.display());
    Ok((f.train.clone(), f.val.clone()))
}

/// What a preprocessed dataset asks of the network and the loss (its `dataset.json`).
struct Task {
    /// Input channels.
    channels: usize,
    /// Network outputs: the classes with background (softmax), or the regions (sigmoid).
    outputs: usize,
    ignore: Option<u32>,
    /// A region-based dataset's regions (empty otherwise), and as the loss takes them.
    regions: Vec<stu_data::dataset::Region>,
    loss_regions: Option<stu_engine::loss::Regions>,
    /// The largest foreground label (ignore label aside): a cascade one-hot encodes 1..=it.
    fg_max: u32,
}

fn task(dir: &Path) -> Result<Task> {
    let path = dir.join("dataset.json");
    let json = stu_data::dataset::DatasetJson::read(&path)?;
    let fg_max = json.allowed_label_values().into_iter().filter(|&v| Some(v) != json.ignore_label).max().unwrap_or(0);
    if let Some(r) = json.regions {
        let loss = stu_engine::loss::Regions::new(&r.iter().map(|r| r.labels.clone()).collect::<Vec<_>>()).map_err(|e| anyhow::anyhow!("{}: `labels`: {e}", path.display()))?;
        return Ok(Task { channels: json.channel_names.len(), outputs: r.len(), ignore: json.ignore_label, regions: r, loss_regions: Some(loss), fg_max });
    }
    let max = json.foreground_classes().last().map_or(0, |c| c.0);
    Ok(Task { channels: json.channel_names.len(), outputs: max as usize + 1, ignore: json.ignore_label, regions: Vec::new(), loss_regions: None, fg_max })
}

/// One line of `log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    /// Epoch (0-based).
    pub epoch: usize,
    /// Learning rate of the epoch.
    pub lr: f64,
    /// Training loss of every iteration.
    pub train_losses: Vec<f64>,
    /// Mean training loss.
    pub train_loss: f64,
    /// Mean validation loss (null without validation cases).
    pub val_loss: Option<f64>,
    /// Pseudo Dice per foreground class (null = class absent).
    pub pseudo_dice: Vec<Option<f64>>,
    /// Mean over present classes.
    pub mean_fg_dice: Option<f64>,
    /// Its EMA (0.9 · previous + 0.1 · current).
    pub ema_fg_dice: Option<f64>,
    /// Wall time of the epoch.
    pub epoch_seconds: f64,
    /// Training iterations per second.
    pub iterations_per_second: f64,
    /// Time the training loop waited for batches.
    pub data_wait_seconds: f64,
    /// f16 steps skipped because a gradient overflowed (the loss scale was halved); their
    /// losses are in `train_losses` when finite.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_steps: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// State kept in the checkpoint metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointMeta {
    format: String,
    /// The next epoch to run.
    current_epoch: usize,
    ema: Option<f64>,
    best_ema: Option<f64>,
    seed: u64,
    rng: serde_json::Value,
    model: serde_json::Value,
    config: TrainConfig,
    inference_allowed_mirroring_axes: Vec<usize>,
}

fn load_options(cfg_strides: &[[usize; 3]]) -> LoadOptions {
    LoadOptions { strides: Some(cfg_strides.to_vec()), from_plan: true }
}

/// Builds the starting network: fresh (`seeded_init`) or transferred from `init_from`.
fn initial_net(cfg: &TrainConfig, spec: &NetSpec, device: &stu_engine::Device, report: &mut serde_json::Value) -> Result<Box<dyn SegNet>> {
    let entry = stu_engine::model::registry().get(&cfg.model)?;
    let Some(src_path) = &cfg.init_from else {
        let net = (entry.build)(spec, device).map_err(|e| anyhow::anyhow!("model `{}`: {e}", cfg.model))?;
        return Ok(seeded_init(net, cfg.seed));
    };
    // Fine-tuning (STU-Net's run_finetuning_stunet.py): the source's size, the target's task.
    let src = StateDict::open(src_path)?.select_model(entry.anchor_key)?;
    let cpu = Backend::default_compiled().and_then(|b| b.device().ok()).unwrap_or_default();
    let src_net = (entry.load)(&src, &LoadOptions::default(), &cpu).with_context(|| format!("{}: cannot build the pre-trained model", src_path.display()))?;
    let options = src_net.describe().get("options").cloned().with_context(|| format!("model `{}` does not describe its size options", cfg.model))?;
    drop(src_net);
    let spec = NetSpec { options, ..spec.clone() };
    let fresh = seeded_init((entry.build)(&spec, device).map_err(|e| anyhow::anyhow!("model `{}`: {e}", cfg.model))?, cfg.seed);
    let mut transferred = Vec::new();
    let mut tiled = Vec::new();
    let mut reinit = Vec::new();
    let mut tensors = Vec::new();
    for t in fresh.state_dict() {
        let Some(e) = src.get(&t.name) else {
            bail!("{}: key `{}` of the target model is missing", src_path.display(), t.name);
        };
        let s = e.shape().to_vec();
        if s == t.shape {
            tensors.push(NamedTensor { data: src.read(&t.name, &s)?, ..t });
            transferred.push(tensors.last().expect("pushed").name.clone());
        } else if s.len() >= 2 && t.shape.len() == s.len() && s[0] == t.shape[0] && s[2..] == t.shape[2..] && t.shape[1] % s[1] == 0 && !t.name.contains("seg_outputs") {
            // Input-channel axis repeated (no rescale), as upstream does for multi-modal input.
            let v = src.read(&t.name, &s)?;
            let inner: usize = s[2..].iter().product();
            let reps = t.shape[1] / s[1];
            let mut data = Vec::with_capacity(t.data.len());
            for o in 0..s[0] {
                let row = &v[o * s[1] * inner..(o + 1) * s[1] * inner];
                for _ in 0..reps {
                    data.extend_from_slice(row);
                }
            }
            tiled.push(t.name.clone());
            tensors.push(NamedTensor { data, ..t });
        } else if t.name.contains("seg_outputs") {
            reinit.push(t.name.clone());
            tensors.push(t);
        } else {
            bail!("{}: key `{}` has shape {s:?}, the target model needs {:?} (only heads may differ, and the stem's input channels)", src_path.display(), t.name, t.shape);
        }
    }
    *report = serde_json::json!({"from": src_path, "format": src.format().to_string(), "transferred": transferred.len(), "tiled": tiled, "reinitialised": reinit});
    let dict = StateDict::from_tensors(src_path, tensors);
    Ok((entry.load)(&dict, &load_options(&spec.strides), device)?)
}

fn checkpoint_path(out: &Path, which: &str) -> PathBuf {
    out.join(format!("checkpoint_{which}.safetensors"))
}

fn save_checkpoint(path: &Path, net: &dyn SegNet, sgd: &Optimizer, meta: &CheckpointMeta) -> Result<()> {
    let mut tensors: Vec<NamedTensor> = net.state_dict().into_iter().map(|t| NamedTensor { name: format!("network_weights.{}", t.name), ..t }).collect();
    tensors.extend(sgd.state().into_iter().map(|t| NamedTensor { name: format!("optimizer_state.{}", t.name), ..t }));
    let md = std::collections::HashMap::from([("stu_checkpoint".to_string(), serde_json::to_string(meta)?)]);
    write_safetensors(path, &tensors, Some(md)).with_context(|| format!("{}: cannot write checkpoint", path.display()))
}

fn load_checkpoint(path: &Path, cfg: &TrainConfig, strides: &[[usize; 3]], device: &stu_engine::Device) -> Result<(Box<dyn SegNet>, Optimizer, CheckpointMeta)> {
    let dict = StateDict::open(path)?;
    let meta: CheckpointMeta = dict
        .metadata()
        .get("stu_checkpoint")
        .with_context(|| format!("{}: not a `stu train` checkpoint (no `stu_checkpoint` metadata); use --init-from for pre-trained weights", path.display()))
        .and_then(|s| serde_json::from_str(s).with_context(|| format!("{}: corrupt `stu_checkpoint` metadata", path.display())))?;
    ensure!(meta.format == CHECKPOINT_FORMAT, "{}: checkpoint format `{}`, this build reads `{CHECKPOINT_FORMAT}`", path.display(), meta.format);
    ensure!(meta.config == *cfg, "{}: the checkpoint belongs to another configuration:\n{}", path.display(), config_diff(&meta.config, cfg));
    let state: Vec<NamedTensor> = dict
        .keys()
        .filter_map(|k| k.strip_prefix("optimizer_state.").map(|s| (k.to_string(), s.to_string())))
        .map(|(k, name)| {
            let shape = dict.shape(&k)?.to_vec();
            Ok(NamedTensor { data: dict.read(&k, &shape)?, shape, name })
        })
        .collect::<Result<_, stu_engine::checkpoint::CheckpointError>>()?;
    let entry = stu_engine::model::registry().get(&cfg.model)?;
    let net = (entry.load)(&dict.select_model(entry.anchor_key)?, &load_options(strides), device)?;
    ensure!(net.describe() == meta.model, "{}: the weights do not match the model recorded in the checkpoint", path.display());
    let mut sgd = Optimizer::new(cfg.optimizer);
    sgd.load_state(&*net, state, device).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((net, sgd, meta))
}

fn config_diff(a: &TrainConfig, b: &TrainConfig) -> String {
    let (a, b) = (serde_json::to_value(a).expect("serialisable"), serde_json::to_value(b).expect("serialisable"));
    let (a, b) = (a.as_object().expect("object"), b.as_object().expect("object"));
    // Keys left out at their defaults (`precision`, `world_size`) may be on one side only.
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let show = |v: Option<&serde_json::Value>| v.map_or("(default)".to_string(), |v| v.to_string());
    keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).map(|k| format!("  {k}: recorded {}, requested {}", show(a.get(k)), show(b.get(k)))).collect::<Vec<_>>().join("\n")
}

/// What a finished (or resumed-and-finished) run reports.
#[derive(Debug, Serialize)]
pub struct TrainSummary {
    /// Run folder.
    pub out: PathBuf,
    /// Epochs run now (0 when the run was already complete).
    pub epochs_run: usize,
    /// Last logged epoch.
    pub last: Option<EpochLog>,
    /// Best EMA pseudo Dice.
    pub best_ema: Option<f64>,
    /// Fine-tuning transfer report.
    pub transfer: serde_json::Value,
}

/// Callbacks for progress display.
pub trait Progress {
    /// Start of an epoch with `iterations` steps.
    fn epoch_start(&self, epoch: usize, epochs: usize, iterations: usize);
    /// After a step.
    fn step(&self, loss: f64);
    /// End of an epoch.
    fn epoch_end(&self, log: &EpochLog);
}

/// No display.
pub struct Quiet;
impl Progress for Quiet {
    fn epoch_start(&self, _: usize, _: usize, _: usize) {}
    fn step(&self, _: f64) {}
    fn epoch_end(&self, _: &EpochLog) {}
}

/// Runs (or resumes) training.
pub fn train(req: &TrainRequest, progress: &dyn Progress) -> Result<TrainSummary> {
    zoo::link();
    let mut cfg = resolve(req)?;
    // Data parallelism: one process per rank (`stu train --nproc N`, torchrun or srun); rank 0
    // writes the run folder, every rank trains on its share of each batch.
    let launch = Launch::from_env()?;
    let (rank, world) = launch.as_ref().map_or((0, 1), |l| (l.rank, l.world));
    cfg.world_size = world;
    ensure!(cfg.batch_size % world == 0, "batch size {} (the global batch) does not split evenly over {world} data-parallel processes", cfg.batch_size);
    let mut group = match &launch {
        Some(l) => Group::join(l, job_hash(&cfg, req.resume))?,
        None => Group::single(),
    };
    // What can fail on the data does so before the run folder is made.
    let plan = read_plan(&cfg.preprocessed, &cfg.configuration)?;
    let task = task(&cfg.preprocessed)?;
    let (mut train_ids, val_ids) = fold_cases(&cfg.preprocessed, &cfg.fold)?;
    let lead = rank == 0;
    let progress: &dyn Progress = if lead { progress } else { &Quiet };
    let out = &req.out;
    let cfg_path = out.join("train.json");
    if req.resume {
        let recorded: TrainConfig = serde_json::from_value(read_json(&cfg_path).with_context(|| format!("{}: nothing to resume", out.display()))?).with_context(|| format!("{}: not a training configuration", cfg_path.display()))?;
        ensure!(recorded == cfg, "{}: --resume with a different configuration:\n{}", cfg_path.display(), config_diff(&recorded, &cfg));
    } else if lead {
        ensure!(!cfg_path.exists(), "{}: a run exists here; pass --resume to continue it or choose another --out", out.display());
    }
    // A cascade's second stage takes the first stage's segmentation one-hot after the images.
    let cascade: Vec<i16> = if cfg.previous_stage.is_empty() { Vec::new() } else { (1..=task.fg_max as i16).collect() };
    let (in_channels, num_classes, ignore) = (task.channels + cascade.len(), task.outputs, task.ignore);
    // Sampling needs the annotated voxels' locations, which preprocessing records for a dataset
    // with an ignore label since 2026-11-27, and the regions' own, since 2026-11-28.
    let region_keys: Vec<&str> = task.regions.iter().filter(|r| r.has_own_locations()).map(|r| r.key.as_str()).collect();
    if ignore.is_some() || !region_keys.is_empty() {
        for id in &train_ids {
            let path = cfg.preprocessed.join(format!("{id}.json"));
            let props = read_json(&path)?;
            if ignore.is_some() {
                ensure!(props["class_locations"].get(stu_data::preprocess::ANNOTATED_KEY).is_some(), "{}: preprocessed without the annotated voxels' locations that training with an ignore label samples from; preprocess the dataset again into a new folder", path.display());
            }
            if let Some(k) = region_keys.iter().find(|k| props["class_locations"].get(**k).is_none()) {
                bail!("{}: preprocessed without the locations of region {k} that region-based training samples from; preprocess the dataset again into a new folder", path.display());
            }
        }
    }
    if cfg.fraction < 1.0 {
        // A fixed subset per fraction (independent of the run seed, so seeds vary only the
        // training): shuffle with seed 0, keep the first ⌈f·n⌉; smaller fractions are subsets
        // of larger ones.
        let mut rng = stu_core::rng::SplitMix64::new(0x5eed_f4ac);
        for i in (1..train_ids.len()).rev() {
            train_ids.swap(i, rng.below(i as u64 + 1) as usize);
        }
        train_ids.truncate(((train_ids.len() as f64 * cfg.fraction).ceil() as usize).max(1));
        train_ids.sort();
    }
    // Fold `all` validates on its training cases, as nnU-Net's `do_split` makes them the
    // validation set too: the pseudo Dice (and so `checkpoint_best`) is a training-set score.
    let val_ids = if cfg.fold == "all" { train_ids.clone() } else { val_ids };
    let device = req.backend.device_at(launch.as_ref().map_or(0, |l| l.local_rank))?;
    let ad = device.clone().autodiff();
    let spec = NetSpec { in_channels, num_classes, strides: plan.strides.clone(), options: cfg.model_options.clone() };

    // Start or resume.
    let mut transfer = serde_json::Value::Null;
    let (mut net, mut sgd, mut start, mut ema, mut best_ema) = if req.resume {
        let found = ["final", "latest", "best"].into_iter().map(|w| checkpoint_path(out, w)).find(|p| p.exists());
        let Some(path) = found else {
            bail!("{}: --resume found no checkpoint_final/latest/best.safetensors", out.display());
        };
        let (net, sgd, meta) = load_checkpoint(&path, &cfg, &plan.strides, &ad)?;
        (net, sgd, meta.current_epoch, meta.ema, meta.best_ema)
    } else {
        (initial_net(&cfg, &spec, &ad, &mut transfer)?, Optimizer::new(cfg.optimizer), 0, None, None)
    };
    ensure!(net.in_channels() == in_channels, "model expects {} input channels, the dataset has {in_channels}", net.in_channels());
    ensure!(net.num_classes() == num_classes, "model has {} classes, the dataset {num_classes}", net.num_classes());
    if world > 1 {
        group.check_equal("the initial weights", weights_checksum(&*net))?;
    }
    stu_engine::model::check_patch(&*net, cfg.patch_size, "patch").map_err(anyhow::Error::msg)?;
    if let Some((free, total)) = stu_engine::backend::cuda_memory(&device) {
        state_fits(net.num_params() as u64, cfg.precision, free, total)?;
    }
    let div = net.input_divisor();
    if lead {
        // The run folder is made once the network is built and takes the patch, so that a start
        // that fails leaves nothing a retry would have to --resume.
        std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create the run folder", out.display()))?;
        if !req.resume {
            stu_core::fs::write_atomic(&cfg_path, (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes())?;
        }
        // The run folder carries its plan and labels, as nnU-Net's trained-model folder does, so
        // its checkpoints predict without the preprocessed data (moved, deleted, another machine).
        for name in ["plans.json", "dataset.json"] {
            let to = out.join(name);
            if !to.exists() {
                let bytes = std::fs::read(cfg.preprocessed.join(name)).with_context(|| format!("{}: cannot read", cfg.preprocessed.join(name).display()))?;
                stu_core::fs::write_atomic(&to, &bytes)?;
            }
        }
    }

    // The log keeps the epochs the checkpoint has seen.
    let log_path = out.join("log.jsonl");
    let mut logs: Vec<EpochLog> = if log_path.exists() {
        std::fs::read_to_string(&log_path)?.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<Vec<EpochLog>, _>>().with_context(|| format!("{}: corrupt log", log_path.display()))?
    } else {
        Vec::new()
    };
    logs.retain(|l| l.epoch < start);
    if lead {
        write_log(&log_path, &logs)?;
    }

    // Each output's scale comes from the network itself (a probe at the input divisor): for
    // nnU-Net-style networks it equals the plan's pooling products, for others (nnFormer's ½
    // and ¼ heads) it is whatever the network produces.
    let probe = net.valid().forward_ds(stu_engine::Tensor::zeros([1, in_channels, div[0], div[1], div[2]], &device));
    // Without deep supervision only the full-resolution output is trained, with weight 1 (the
    // lower heads get no gradient, so the optimiser leaves them as they are, as nnU-Net's).
    let weights = if cfg.deep_supervision { ds_weights(probe.len()) } else { (0..probe.len()).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect() };
    let scales: Vec<[f64; 3]> = probe.iter().map(|o| [0, 1, 2].map(|a| o.dims()[2 + a] as f64 / div[a] as f64)).collect();
    drop(probe);
    let regions = task.loss_regions;
    let dice = DiceConfig { batch_dice: plan.batch_dice, ignore_label: ignore.map(i64::from), regions, loss: cfg.loss };
    let budget = 4 << 30;
    let store = |ids: Vec<String>| -> Result<Arc<CaseStore>> {
        let s = CaseStore::new(&cfg.preprocessed, ids, budget)?;
        Ok(Arc::new(if cascade.is_empty() { s } else { s.with_previous_stage(cfg.previous_stage.clone(), cascade.clone())? }))
    };
    let train_store = store(train_ids)?;
    let val_store = if val_ids.is_empty() { None } else { Some(store(val_ids)?) };
    // Rank r draws its share of each training batch from its own stream (2r; a single process
    // is rank 0 of 1), oversampling by the sample's place in the global batch. Validation
    // batches are whole and split between the ranks by index, so all ranks together see
    // exactly the single-process validation.
    let share = cfg.batch_size / world;
    let train_batches = BatchConfig {
        batch_size: share,
        patch: cfg.patch_size,
        augment: cfg.augmentation.then(|| cfg.aug_config()),
        ds_scales: scales.clone(),
        regions: task.regions.clone(),
        shard: (world > 1).then_some((rank * share, cfg.batch_size)),
        cascade: cascade.clone(),
        oversampling: cfg.oversampling(),
    };
    let val_batches = BatchConfig { augment: None, batch_size: cfg.batch_size, shard: None, ..train_batches.clone() };
    let meta_of = |epoch: usize, ema: Option<f64>, best: Option<f64>, net: &dyn SegNet| CheckpointMeta {
        format: CHECKPOINT_FORMAT.into(),
        current_epoch: epoch,
        ema,
        best_ema: best,
        seed: cfg.seed,
        rng: serde_json::json!({"kind": "splitmix64, counter-based: batch i of a stream is seeded by (seed, stream, i)", "train_stream": {"id": 0, "next_batch": epoch * cfg.iterations}, "val_stream": {"id": 1, "next_batch": epoch * cfg.val_iterations}}),
        model: net.describe(),
        config: cfg.clone(),
        // Without mirroring, none (nnU-Net's `None`): its predictions run no mirrored passes.
        inference_allowed_mirroring_axes: cfg.mirror_axes_here(),
    };
    let epochs_before = start;
    while start < cfg.epochs {
        let epoch = start;
        let t0 = Instant::now();
        let lr = cfg.lr_schedule.lr(cfg.initial_lr, epoch, cfg.epochs);
        progress.epoch_start(epoch, cfg.epochs, cfg.iterations);
        let first = (epoch * cfg.iterations) as u64;
        let mut loader = Loader::spawn(Arc::clone(&train_store), train_batches.clone(), cfg.seed, 2 * rank as u64, first, first + cfg.iterations as u64, req.workers, 2);
        let mut losses = Vec::with_capacity(cfg.iterations);
        let mut skipped = 0;
        let step = StepConfig { weights: &weights, dice, lr, clip: stu_engine::optim::GRAD_CLIP, precision: cfg.precision };
        let t_train = Instant::now();
        while let Some(b) = loader.next_batch() {
            let b = b?;
            let batch = DeviceBatch::upload(b.data, b.shape, &b.targets, &ad);
            let (n, stats) = train_step_in(net, &mut sgd, &batch, &step, &mut group)?;
            net = n;
            skipped += usize::from(stats.skipped);
            // With loss scaling, an overflow in f16 is expected now and then: the step was
            // skipped and the scale halved. Otherwise a non-finite loss means divergence.
            if stats.skipped && !stats.loss.is_finite() {
                continue;
            }
            ensure!(stats.loss.is_finite(), "epoch {epoch}: the loss is {} (diverged); the last good state is the latest checkpoint", stats.loss);
            losses.push(stats.loss);
            progress.step(stats.loss);
        }
        ensure!(!losses.is_empty(), "epoch {epoch}: every step overflowed in f16 (the loss itself was not finite); train in bf16 or f32");
        let train_seconds = t_train.elapsed().as_secs_f64();
        let waited = loader.waited().as_secs_f64();
        drop(loader);
        // Validation: the same loss, argmax of the full-resolution output, TP/FP/FN summed.
        let (val_loss, pseudo) = match &val_store {
            Some(store) if cfg.val_iterations > 0 => {
                let valid = net.valid();
                let first = (epoch * cfg.val_iterations) as u64;
                let part = |r: usize| first + (r * cfg.val_iterations / world) as u64;
                let mut vl = Loader::spawn(Arc::clone(store), val_batches.clone(), cfg.seed, 1, part(rank), part(rank + 1), req.workers, 2);
                // One count per foreground class, or per region.
                let mut counts = vec![[0u64; 3]; if regions.is_some() { num_classes } else { num_classes - 1 }];
                let mut total = 0.0;
                while let Some(b) = vl.next_batch() {
                    let b = b?;
                    let batch = DeviceBatch::upload(b.data, b.shape, &b.targets, &device);
                    let (l, c) = validation_step(&*valid, &batch, &weights, dice);
                    total += l;
                    for (acc, v) in counts.iter_mut().zip(c) {
                        for k in 0..3 {
                            acc[k] += v[k];
                        }
                    }
                }
                if world > 1 {
                    // Counts stay exact in f64 up to 2⁵³ voxels.
                    let mut all: Vec<f64> = std::iter::once(total).chain(counts.iter().flat_map(|c| c.map(|v| v as f64))).collect();
                    group.all_reduce_sum(&mut all)?;
                    total = all[0];
                    counts.iter_mut().zip(all[1..].chunks_exact(3)).for_each(|(c, v)| *c = [v[0] as u64, v[1] as u64, v[2] as u64]);
                }
                (Some(total / cfg.val_iterations as f64), dice_per_class(&counts))
            }
            _ => (None, Vec::new()),
        };
        let mean = nanmean(&pseudo);
        let mean = (!mean.is_nan()).then_some(mean);
        ema = match (ema, mean) {
            (Some(e), Some(m)) => Some(0.9 * e + 0.1 * m),
            (None, m) => m,
            (e, None) => e,
        };
        let log = EpochLog {
            epoch,
            lr,
            train_loss: losses.iter().sum::<f64>() / losses.len() as f64,
            train_losses: losses,
            val_loss,
            pseudo_dice: pseudo.iter().map(|d| (!d.is_nan()).then_some(*d)).collect(),
            mean_fg_dice: mean,
            ema_fg_dice: ema,
            epoch_seconds: t0.elapsed().as_secs_f64(),
            iterations_per_second: cfg.iterations as f64 / train_seconds,
            data_wait_seconds: waited,
            skipped_steps: skipped,
        };
        progress.epoch_end(&log);
        logs.push(log);
        if world > 1 {
            group.check_equal(&format!("the weights after epoch {epoch} (the replicas drifted apart)"), weights_checksum(&*net))?;
        }
        if lead {
            append_log(&log_path, logs.last().expect("pushed"))?;
        }
        start = epoch + 1;
        // nnU-Net: best when the EMA improves strictly (the first epoch always writes it).
        let improved = match (ema, best_ema) {
            (Some(e), Some(b)) => e > b,
            (Some(_), None) => true,
            (None, _) => epoch == 0,
        };
        if improved {
            best_ema = ema.or(best_ema);
        }
        if improved && lead {
            save_checkpoint(&checkpoint_path(out, "best"), &*net, &sgd, &meta_of(start, ema, best_ema, &*net))?;
        }
        if start % cfg.save_every == 0 && start != cfg.epochs && lead {
            save_checkpoint(&checkpoint_path(out, "latest"), &*net, &sgd, &meta_of(start, ema, best_ema, &*net))?;
        }
    }
    if lead && (epochs_before < cfg.epochs || !checkpoint_path(out, "final").exists()) {
        save_checkpoint(&checkpoint_path(out, "final"), &*net, &sgd, &meta_of(cfg.epochs, ema, best_ema, &*net))?;
        let latest = checkpoint_path(out, "latest");
        if latest.exists() {
            std::fs::remove_file(&latest).with_context(|| format!("{}: cannot remove", latest.display()))?;
        }
        if !transfer.is_null() {
            stu_core::fs::write_atomic(&out.join("transfer.json"), (serde_json::to_string_pretty(&transfer)? + "\n").as_bytes())?;
        }
        write_curves(out, &logs)?;
    }
    // Nobody leaves before rank 0 has written the final checkpoint (a failure there fails all).
    group.barrier()?;
    Ok(TrainSummary { out: out.clone(), epochs_run: cfg.epochs - epochs_before, last: logs.last().cloned(), best_ema, transfer })
}

/// `stu train --nproc N`: runs this command line again as `N` data-parallel ranks on this
/// machine (torchrun's variables, rendezvous on a free local port; `OMP_NUM_THREADS` and
/// `RAYON_NUM_THREADS`, unless set, share the cores), rank 0's output as is and the others'
/// errors prefixed with their rank. When one rank fails the others are stopped, and
/// the error names it.
pub fn launch_local(nproc: usize) -> Result<()> {
    use std::process::{Command, Stdio};
    ensure!(std::env::var_os("WORLD_SIZE").is_none(), "--nproc inside a launch that already sets WORLD_SIZE (torchrun or a parent `stu train --nproc`)");
    let exe = std::env::current_exe().context("cannot find this program to start the ranks")?;
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut skip = false;
    for a in std::env::args_os().skip(1) {
        if std::mem::take(&mut skip) {
            continue;
        }
        match a.to_str() {
            Some("--nproc") => skip = true,
            Some(s) if s.starts_with("--nproc=") => {}
            _ => args.push(a),
        }
    }
    let port = stu_engine::dist::free_port().context("no free local port for the rendezvous")?;
    // As torchrun does: share the cores between the ranks unless told otherwise. OpenMP's
    // spinning threads (libtorch on the CPU) slow two oversubscribed ranks tenfold.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / nproc).max(1).to_string();
    let unset: Vec<&str> = ["OMP_NUM_THREADS", "RAYON_NUM_THREADS"].into_iter().filter(|v| std::env::var_os(v).is_none()).collect();
    let mut children = Vec::with_capacity(nproc);
    let mut relays = Vec::new();
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        for v in &unset {
            cmd.env(v, &threads);
        }
        if rank > 0 {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        let mut child = cmd.spawn().with_context(|| format!("cannot start rank {rank}"))?;
        if let Some(err) = child.stderr.take() {
            relays.push(std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("[rank {rank}] {line}");
                }
            }));
        }
        children.push(child);
    }
    let mut failed: Option<(usize, std::process::ExitStatus)> = None;
    let mut running: Vec<usize> = (0..nproc).collect();
    while !running.is_empty() {
        let mut still = Vec::new();
        for &r in &running {
            match children[r].try_wait().with_context(|| format!("cannot wait for rank {r}"))? {
                Some(st) if !st.success() => {
                    failed.get_or_insert((r, st));
                }
                Some(_) => {}
                None => still.push(r),
            }
        }
        running = still;
        if failed.is_some() && !running.is_empty() {
            // The others notice a lost peer by themselves; give them a moment, then stop them.
            std::thread::sleep(std::time::Duration::from_secs(3));
            for &r in &running {
                let _ = children[r].kill();
                let _ = children[r].wait();
            }
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for h in relays {
        let _ = h.join();
    }
    match failed {
        Some((r, st)) => bail!("data-parallel rank {r} of {nproc} failed ({st}); the others were stopped"),
        None => Ok(()),
    }
}

/// What every rank of a data-parallel run must agree on: the resolved configuration and
/// whether it resumes (FNV-1a of its JSON, stable across builds and machines).
fn job_hash(cfg: &TrainConfig, resume: bool) -> u64 {
    let text = serde_json::to_string(cfg).expect("serialisable") + if resume { "+resume" } else { "" };
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn write_log(path: &Path, logs: &[EpochLog]) -> Result<()> {
    let mut text = String::new();
    for l in logs {
        text.push_str(&serde_json::to_string(l)?);
        text.push('\n');
    }
    stu_core::fs::write_atomic(path, text.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))
}

fn append_log(path: &Path, log: &EpochLog) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(log)?).with_context(|| format!("{}: cannot append", path.display()))?;
    f.sync_data().ok();
    Ok(())
}

/// `progress.png`/`.svg`: losses and pseudo Dice per epoch.
fn write_curves(out: &Path, logs: &[EpochLog]) -> Result<()> {
    let series = stu_report::curves::TrainingCurves {
        epochs: logs.iter().map(|l| l.epoch as f64).collect(),
        train_loss: logs.iter().map(|l| l.train_loss).collect(),
        val_loss: logs.iter().map(|l| l.val_loss.unwrap_or(f64::NAN)).collect(),
        pseudo_dice: logs.iter().map(|l| l.mean_fg_dice.unwrap_or(f64::NAN)).collect(),
        ema_dice: logs.iter().map(|l| l.ema_fg_dice.unwrap_or(f64::NAN)).collect(),
    };
    stu_report::curves::draw(&series, &out.join("progress.png")).with_context(|| format!("{}: cannot draw", out.join("progress.png").display()))
}

/// Whether what training adds to the weights already on the device (their gradients and SGD
/// momentum in f32, and under half precision the half copy of each) fits the device memory
/// still free: when even that does not, the first step would run out of memory however small
/// the patch, so the run stops at once and says why (README: "Device memory").
fn state_fits(params: u64, precision: Precision, free: u64, total: u64) -> Result<()> {
    let per = 8 + if precision == Precision::F32 { 0 } else { 2 };
    let need = params * per;
    use stu_engine::backend::gib;
    ensure!(
        need <= free,
        "training needs {:.1} GiB beyond the weights for the gradients and momentum of {params} parameters ({per} bytes each), and the device has {:.1} of {:.1} GiB free: a smaller model, or a larger device (README: \"Device memory\")",
        gib(need),
        gib(free),
        gib(total)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model state that training adds must fit the free device memory, else the run stops
    /// before its first step, saying how much it needs.
    #[test]
    fn a_model_whose_training_state_cannot_fit_is_refused_at_once() {
        let gib = 1u64 << 30;
        // H: 1.46 G parameters need 10.9 GiB (f32) or 13.6 GiB (f16) beyond the weights.
        assert!(state_fits(1_457_326_221, Precision::F32, 12 * gib, 80 * gib).is_ok());
        let err = state_fits(1_457_326_221, Precision::F16, 12 * gib, 80 * gib).unwrap_err().to_string();
        assert!(err.contains("needs 13.6 GiB") && err.contains("10 bytes each") && err.contains("12.0 of 80.0 GiB free"), "{err}");
    }

    /// A `train.json` written before the recipe's keys existed reads as nnU-Net's recipe; the
    /// augmentation variants reach the loader's configuration.
    #[test]
    fn recorded_recipes_decide_the_augmentation() {
        let old = serde_json::json!({
            "preprocessed": "/p", "configuration": "3d_fullres", "fold": "0", "model": "stunet", "model_options": {},
            "epochs": 1, "iterations": 1, "val_iterations": 1, "save_every": 1, "batch_size": 2, "patch_size": [20, 192, 160],
            "initial_lr": 0.01, "seed": 0, "init_from": null, "augmentation": true, "backend": "flex", "fraction": 1.0
        });
        let cfg: TrainConfig = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(cfg.recipe(), Recipe::default());
        assert_eq!(cfg.aug_config(), AugConfig::nnunet([20, 192, 160]));
        assert!(cfg.aug_config().dummy_2d, "an anisotropic patch: nnU-Net's dummy 2-D");
        assert_eq!(serde_json::to_value(&cfg).unwrap(), old, "nnU-Net's defaults are not written");
        let mut v = old;
        v["seg_interpolation"] = "nearest".into();
        v["dummy_2d_augmentation"] = false.into();
        v["mirror_axes"] = serde_json::json!([1, 2]);
        let cfg: TrainConfig = serde_json::from_value(v).unwrap();
        let aug = cfg.aug_config();
        assert_eq!((aug.seg_interpolation, aug.dummy_2d, aug.mirror_axes), (SegInterpolation::Nearest, false, vec![1, 2]));
        assert_eq!(aug.rotation, [30f64.to_radians(); 3], "augmented in 3-D (nnUNetTrainer_noDummy2DDA)");
        assert_eq!(cfg.recipe().describe(), "mirror axes [1, 2], label maps augmented by nearest interpolation, no dummy-2-D augmentation");
    }
}
