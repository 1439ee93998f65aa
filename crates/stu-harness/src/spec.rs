//! Experiment specs: a study as a TOML file (loaded with figment: the file, then `STU_SPEC_`
//! environment variables with `__` as the key separator, then `--set key=value`), validated
//! with errors that name the key, and expanded into sweep points.
//!
//! A point's identity is the hash of its resolved spec with every default left out, so a rerun
//! finds finished points, an edited spec only reruns what changed, and a field added to the spec
//! format later (with a default) leaves existing points finished.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// A study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Study name (the run folder under `runs/`).
    pub name: String,
    /// One line on what it shows.
    #[serde(default)]
    pub description: String,
    /// Paper figure or table it reproduces (`Fig. 1`, `Table 4`).
    #[serde(default)]
    pub reproduces: Option<String>,
    /// Compute backend (`flex`, `ndarray`, `wgpu`, `cuda`, `tch`).
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Arithmetic of training and prediction: `f32` (default), `bf16` (over f32 master
    /// weights), or `f16` (training with dynamic loss scaling, as nnU-Net's autocast +
    /// `GradScaler`); half precision needs a backend with half kernels (`tch`, `tch-cuda`).
    #[serde(default, skip_serializing_if = "crate::train::is_f32")]
    pub precision: stu_engine::precision::Precision,
    /// Base seed.
    #[serde(default)]
    pub seed: u64,
    /// Data.
    pub dataset: DatasetSpec,
    /// Plan.
    #[serde(default)]
    pub plan: PlanSpec,
    /// Model.
    pub model: ModelSpec,
    /// Optional pre-training stage (fine-tuning studies): the model is first trained on this
    /// dataset, then `train` starts from that checkpoint.
    #[serde(default)]
    pub pretrain: Option<PretrainSpec>,
    /// Training.
    #[serde(default)]
    pub train: TrainSpec,
    /// Prediction on the held-out cases.
    #[serde(default)]
    pub predict: PredictSpec,
    /// Evaluation.
    #[serde(default)]
    pub evaluate: EvaluateSpec,
    /// Sweep axes: dotted key → values; the points are their Cartesian product.
    #[serde(default)]
    pub sweep: BTreeMap<String, Vec<serde_json::Value>>,
    /// One-factor-at-a-time variants (`[[variants]]`, each a name and its dotted-key
    /// overrides): each is a point of its own, crossed with the sweep when there is one. An
    /// ablation lists the baseline (no overrides) and one variant per change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<Variant>,
    /// The paper-scale variant: overrides (dotted key → value) and its compute estimate.
    #[serde(default)]
    pub paper_scale: Option<PaperScale>,
}

fn default_backend() -> String {
    "flex".into()
}

/// A named set of overrides ([`Spec::variants`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Its name in reports and run-folder names (`"CE loss"`).
    pub name: String,
    /// Dotted key → value (`{ "train.loss" = "ce" }`); empty: the spec as written.
    #[serde(default)]
    pub set: BTreeMap<String, serde_json::Value>,
}

/// Where the data comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Dataset plugin (`phantom`, `nnunet-raw`, `totalsegmentator`).
    pub plugin: String,
    /// The plugin's options.
    #[serde(default)]
    pub options: serde_json::Value,
    /// Fraction of the training cases used (data-fraction study), in (0, 1].
    #[serde(default = "one")]
    pub fraction: f64,
}

fn one() -> f64 {
    1.0
}

/// Planning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// `nnunet` or `stunet`.
    #[serde(default = "nnunet")]
    pub preset: String,
    /// Configuration.
    #[serde(default = "fullres")]
    pub configuration: String,
}

fn nnunet() -> String {
    "nnunet".into()
}
fn fullres() -> String {
    "3d_fullres".into()
}

impl Default for PlanSpec {
    fn default() -> Self {
        Self { preset: nnunet(), configuration: fullres() }
    }
}

/// The model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Registry name.
    pub name: String,
    /// Size options (`preset`, or `blocks` + `base_width`, or `depth` + `dims`).
    #[serde(default)]
    pub options: serde_json::Value,
    /// An existing checkpoint to predict with instead of training (direct inference).
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
}

/// A pre-training stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainSpec {
    /// Off: train from scratch (the sweep's baseline).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Pre-training data.
    pub dataset: DatasetSpec,
    /// Epochs.
    #[serde(default = "epochs")]
    pub epochs: usize,
    /// Iterations per epoch.
    #[serde(default = "iterations")]
    pub iterations: usize,
}

/// Training (nnU-Net's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Epochs.
    #[serde(default = "epochs")]
    pub epochs: usize,
    /// Iterations per epoch.
    #[serde(default = "iterations")]
    pub iterations: usize,
    /// Validation iterations per epoch.
    #[serde(default = "val_iterations")]
    pub val_iterations: usize,
    /// Checkpoint interval.
    #[serde(default = "save_every")]
    pub save_every: usize,
    /// Patch (plan's when absent).
    #[serde(default)]
    pub patch_size: Option<[usize; 3]>,
    /// Batch (plan's when absent).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Initial learning rate (1e-2; 1e-3 with `init_from`).
    #[serde(default)]
    pub lr: Option<f64>,
    /// Fold or `all`.
    #[serde(default = "fold")]
    pub fold: String,
    /// Pre-trained checkpoint.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Augmentation.
    #[serde(default = "yes")]
    pub augmentation: bool,
    /// Loader threads.
    #[serde(default = "workers")]
    pub workers: usize,
    /// Loss: `dice_ce` (nnU-Net's), `ce`, `dice`, `topk10`, `dice_topk10`, `dice_ce_nosmooth`,
    /// `topk10_ls01` (its trainer variants; `crate::train::Recipe`).
    #[serde(default)]
    pub loss: stu_engine::loss::LossKind,
    /// Deep supervision (off: nnUNetTrainerNoDeepSupervision).
    #[serde(default = "yes")]
    pub deep_supervision: bool,
    /// Optimiser: `sgd` (nnU-Net's), `adamw`, `adam`.
    #[serde(default)]
    pub optimizer: stu_engine::train::OptimizerKind,
    /// Learning-rate schedule: `poly` (nnU-Net's), `cosine`, `warmup`.
    #[serde(default)]
    pub lr_schedule: stu_engine::schedule::LrSchedule,
    /// Axes mirrored in augmentation and test-time augmentation, nnU-Net's numbering (all by
    /// default; `[]`: nnUNetTrainerNoMirroring; `[0, 1]`: nnUNetTrainer_onlyMirror01).
    #[serde(default)]
    pub mirror_axes: Option<Vec<usize>>,
    /// Fraction of samples forced to contain foreground (0.33; nnU-Net's
    /// `oversample_foreground_percent`).
    #[serde(default)]
    pub oversample_foreground: Option<f64>,
    /// Foreground forced per sample at random (nnUNetTrainer_probabilisticOversampling).
    #[serde(default)]
    pub probabilistic_oversampling: bool,
    /// Label maps resampled by augmentation's rotation and scaling: `linear` per label
    /// (nnU-Net's) or `nearest` (nnUNetTrainer_DASegOrd0).
    #[serde(default)]
    pub seg_interpolation: stu_data::augment::SegInterpolation,
    /// nnU-Net's dummy-2-D augmentation of anisotropic patches (off: nnUNetTrainer_noDummy2DDA).
    #[serde(default = "yes")]
    pub dummy_2d_augmentation: bool,
}

impl TrainSpec {
    /// The recipe's variant settings.
    pub fn recipe(&self) -> crate::train::Recipe {
        crate::train::recipe_of!(self)
    }
}

fn epochs() -> usize {
    1000
}
fn iterations() -> usize {
    250
}
fn val_iterations() -> usize {
    50
}
fn save_every() -> usize {
    50
}
fn fold() -> String {
    "0".into()
}
fn yes() -> bool {
    true
}
fn workers() -> usize {
    1
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self { epochs: epochs(), iterations: iterations(), val_iterations: val_iterations(), save_every: save_every(), patch_size: None, batch_size: None, lr: None, fold: fold(), init_from: None, augmentation: true, workers: workers(), loss: Default::default(), deep_supervision: true, optimizer: Default::default(), lr_schedule: Default::default(), mirror_axes: None, oversample_foreground: None, probabilistic_oversampling: false, seg_interpolation: Default::default(), dummy_2d_augmentation: true }
    }
}

/// Inference on the held-out cases (`imagesTs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictSpec {
    /// Mirroring TTA.
    #[serde(default = "yes")]
    pub tta: bool,
    /// Tile step.
    #[serde(default = "half")]
    pub step: f64,
    /// Keep the largest component per label.
    #[serde(default)]
    pub keep_largest: bool,
    /// Fast export: argmax on the network's grid, then the label map resampled (`stu predict
    /// --fast-export`).
    // Left out when off so that `Point::former_id` (the whole serialised spec) stays what it was
    // before the field existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fast_export: bool,
    /// Direct-inference label map (built-in name or file).
    #[serde(default)]
    pub label_map: Option<String>,
    /// Data whose held-out cases are predicted and scored (default: the training data).
    #[serde(default)]
    pub dataset: Option<DatasetSpec>,
    /// Plan for `model.checkpoint` (default: the released STU-Net plan).
    #[serde(default)]
    pub plans: Option<PathBuf>,
}

fn half() -> f64 {
    0.5
}

impl Default for PredictSpec {
    fn default() -> Self {
        Self { tta: true, step: 0.5, keep_largest: false, fast_export: false, label_map: None, dataset: None, plans: None }
    }
}

/// Metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EvaluateSpec {
    /// NSD tolerance in mm for every label (none: no NSD).
    #[serde(default)]
    pub nsd_tolerance: Option<f64>,
    /// HD95.
    #[serde(default)]
    pub hd95: bool,
    /// ASSD (average symmetric surface distance). Serialised only when on, so that
    /// `Point::former_id` stays what it was before the field existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub assd: bool,
}

/// The paper-scale variant of a study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaperScale {
    /// Dotted key → value, applied with `--paper-scale`.
    pub set: BTreeMap<String, serde_json::Value>,
    /// What it costs (GPU hours, memory), in words.
    pub compute: String,
    /// Sweep axes replacing the phantom-scale ones (e.g. the S/B/L/H presets).
    #[serde(default)]
    pub sweep: Option<BTreeMap<String, Vec<serde_json::Value>>>,
}

/// The paper-scale variant of `spec`: its overrides applied, its sweep (if any) in place.
pub fn paper_scale(spec: &Spec) -> Result<Spec> {
    let ps = spec.paper_scale.clone().context("no [paper_scale] section")?;
    let mut paper = apply(spec, &ps.set).context("[paper_scale]")?;
    paper.sweep = ps.sweep.clone().unwrap_or_else(|| spec.sweep.clone());
    validate(&paper).context("[paper_scale]")?;
    Ok(paper)
}

/// Loads and validates a spec: the file, then `STU_SPEC_*` environment variables
/// (`STU_SPEC_TRAIN__EPOCHS=5`),
/// then `overrides` (`key=value`, the value parsed as TOML, else taken as a string).
pub fn load(path: &Path, overrides: &[String]) -> Result<Spec> {
    ensure!(path.exists(), "{}: no such spec", path.display());
    from_figment(Figment::new().merge(Toml::file(path)), path, overrides)
}

/// [`load`] for a spec held in memory (`origin` names it in errors).
pub fn load_str(text: &str, origin: &Path, overrides: &[String]) -> Result<Spec> {
    from_figment(Figment::new().merge(Toml::string(text)), origin, overrides)
}

fn from_figment(fig: Figment, path: &Path, overrides: &[String]) -> Result<Spec> {
    let fig = fig.merge(Env::prefixed("STU_SPEC_").split("__"));
    let mut spec: Spec = fig.extract().map_err(|e| anyhow::anyhow!("{}: {}", path.display(), describe(e)))?;
    // `--set` replaces the value at its key (a table replaces the whole table, unlike a merge).
    if !overrides.is_empty() {
        let mut v = serde_json::to_value(&spec)?;
        for o in overrides {
            let (k, val) = o.split_once('=').with_context(|| format!("--set `{o}`: expected key=value"))?;
            let val = serde_json::to_value(parse_value(val.trim()))?;
            set_dotted(&mut v, k.trim(), val).with_context(|| format!("--set `{o}`"))?;
        }
        // Round-trip through figment so the error names the key.
        spec = Figment::from(Serialized::defaults(v)).extract().map_err(|e| anyhow::anyhow!("{} (with --set {}): {}", path.display(), overrides.join(" "), describe(e)))?;
    }
    validate(&spec).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), crate::error_line(&e)))?;
    Ok(spec)
}

fn describe(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| {
            let key = if e.path.is_empty() { String::new() } else { format!("`{}`: ", e.path.join(".")) };
            format!("{key}{}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn parse_value(v: &str) -> toml::Value {
    toml::from_str::<BTreeMap<String, toml::Value>>(&format!("v = {v}")).ok().and_then(|mut m| m.remove("v")).unwrap_or_else(|| toml::Value::String(v.to_string()))
}

/// Checks values the types cannot.
pub fn validate(s: &Spec) -> Result<()> {
    let allowed = |key: &str, v: &str, ok: &[&str]| -> Result<()> {
        ensure!(ok.contains(&v), "`{key}` = `{v}`: allowed values are {}", ok.join(", "));
        Ok(())
    };
    allowed("backend", &s.backend, &["flex", "ndarray", "wgpu", "cuda", "tch", "tch-cuda"])?;
    if let Ok(b) = s.backend.parse::<stu_engine::backend::Backend>() {
        s.precision.check(b).map_err(|e| anyhow::anyhow!("`precision`: {e}"))?;
    }
    allowed("plan.preset", &s.plan.preset, &stu_data::plan::Preset::NAMES)?;
    let datasets: Vec<&str> = stu_data::plugins::registry().names().collect();
    allowed("dataset.plugin", &s.dataset.plugin, &datasets)?;
    if let Some(d) = &s.predict.dataset {
        allowed("predict.dataset.plugin", &d.plugin, &datasets)?;
    }
    if let Some(p) = &s.pretrain {
        allowed("pretrain.dataset.plugin", &p.dataset.plugin, &datasets)?;
        ensure!(p.epochs >= 1 && p.iterations >= 1, "`pretrain.epochs` and `pretrain.iterations` must be at least 1");
        ensure!(!(p.enabled && s.train.init_from.is_some()), "`pretrain` and `train.init_from` both give the starting weights; keep one");
    }
    ensure!(!(s.model.checkpoint.is_some() && s.pretrain.as_ref().is_some_and(|p| p.enabled)), "`model.checkpoint` skips training; `pretrain` has nothing to feed");
    zoo::link();
    let models: Vec<&str> = stu_engine::model::registry().names().collect();
    allowed("model.name", &s.model.name, &models)?;
    ensure!(s.dataset.fraction > 0.0 && s.dataset.fraction <= 1.0, "`dataset.fraction` = {}: must be in (0, 1]", s.dataset.fraction);
    if let Some(axes) = &s.train.mirror_axes {
        ensure!(stu_data::sampler::valid_axes(axes, 3), "`train.mirror_axes` = {axes:?}: spatial axes 0, 1, 2, each named once");
    }
    if let Some(p) = s.train.oversample_foreground {
        ensure!((0.0..=1.0).contains(&p), "`train.oversample_foreground` = {p}: must be in [0, 1]");
    }
    ensure!(s.train.epochs >= 1 && s.train.iterations >= 1 && s.train.save_every >= 1, "`train.epochs`, `train.iterations` and `train.save_every` must be at least 1");
    if let Some(lr) = s.train.lr {
        ensure!(lr.is_finite() && lr >= 0.0, "`train.lr` = {lr}: must be a finite number ≥ 0");
    }
    if let Some(mm) = s.evaluate.nsd_tolerance {
        ensure!(mm.is_finite() && mm >= 0.0, "`evaluate.nsd_tolerance` = {mm}: must be a finite number of mm ≥ 0");
    }
    ensure!(s.predict.step > 0.0 && s.predict.step <= 1.0, "`predict.step` = {}: must be in (0, 1]", s.predict.step);
    if let Some(m) = &s.predict.label_map {
        crate::labelmap::LabelMap::load(m).context("`predict.label_map`")?;
    }
    for (k, v) in &s.sweep {
        ensure!(!v.is_empty(), "`sweep.\"{k}\"` has no values");
    }
    for (i, v) in s.variants.iter().enumerate() {
        ensure!(v.name.chars().any(|c| c.is_ascii_alphanumeric()), "`variants[{i}].name` = `{}`: a name needs a letter or digit (it names the run folder)", v.name);
        ensure!(!s.variants[..i].iter().any(|w| w.name == v.name), "`variants[{i}].name` = `{}`: two variants have this name", v.name);
    }
    // Every point must resolve: unknown sweep keys and bad values fail here, naming the key;
    // and each point's model and datasets must exist and its model options make a network (a
    // typo in one sweep value would otherwise surface only when that point runs).
    let pts = points(s)?;
    for p in &pts {
        if p.set.is_empty() && p.variant.is_none() {
            check_point(&p.spec)?;
        } else {
            check_point(&p.spec).with_context(|| format!("sweep point {}", p.label()))?;
        }
    }
    // Two points resolving to one spec would share a run folder.
    for (i, p) in pts.iter().enumerate() {
        if let Some(q) = pts[..i].iter().find(|q| q.id == p.id) {
            bail!("points {} and {} resolve to the same spec; one of them repeats the other", q.label(), p.label());
        }
    }
    Ok(())
}

/// What [`validate`] checks of each resolved sweep point: its model and dataset plugins, and
/// its model options through the model's own check (placeholder channels, classes and strides:
/// the data decide those later).
fn check_point(s: &Spec) -> Result<()> {
    let entry = stu_engine::model::registry().get(&s.model.name).map_err(|e| anyhow::anyhow!("`model.name`: {e}"))?;
    for (key, d) in [("dataset.plugin", Some(&s.dataset)), ("predict.dataset.plugin", s.predict.dataset.as_ref()), ("pretrain.dataset.plugin", s.pretrain.as_ref().map(|p| &p.dataset))] {
        if let Some(d) = d {
            let entry = stu_data::plugins::registry().get(&d.plugin).map_err(|e| anyhow::anyhow!("`{key}`: {e}"))?;
            let section = key.trim_end_matches(".plugin");
            (entry.check)(&d.options).map_err(|e| anyhow::anyhow!("`{section}.options`: {e}"))?;
        }
    }
    if s.model.checkpoint.is_none() {
        let net = stu_engine::model::NetSpec { in_channels: 1, num_classes: 2, strides: Vec::new(), options: s.model.options.clone() };
        let rule = (entry.check)(&net).map_err(|e| anyhow::anyhow!("`model.options`: {e}"))?;
        if let (Some(f), Some(p)) = (rule.fixed, s.train.patch_size) {
            ensure!(p == f, "`train.patch_size` = {p:?}: `{}` with these `model.options` takes {f:?} inputs only", s.model.name);
        }
        // (Where the plan's strides decide the divisor, the plan judges the patch.)
        if let (Some(d), Some(p)) = (rule.divisor, s.train.patch_size) {
            ensure!((0..3).all(|a| p[a] % d[a] == 0), "`train.patch_size` = {p:?}: `{}` takes extents that are multiples of {d:?}", s.model.name);
        }
    }
    Ok(())
}

/// One sweep point: the values it sets and the resolved spec.
#[derive(Debug, Clone)]
pub struct Point {
    /// Dotted key → value of this point (its sweep values and its variant's overrides).
    pub set: BTreeMap<String, serde_json::Value>,
    /// The name of its variant ([`Spec::variants`]), if the spec has variants.
    pub variant: Option<String>,
    /// Its sweep values alone (without the variant's overrides).
    pub swept: BTreeMap<String, serde_json::Value>,
    /// The spec with them applied (and the sweep removed).
    pub spec: Spec,
    /// Hash of the resolved spec without its defaults ([`identity`]; the run folder name's
    /// suffix).
    pub id: String,
    /// The id under the rule before 2026-11-27 (the whole resolved spec, defaults included):
    /// finished folders named by it still count. Fields added since are serialised only when
    /// off their default, which keeps it.
    pub former_id: String,
}

fn set_dotted(v: &mut serde_json::Value, key: &str, value: serde_json::Value) -> Result<()> {
    let mut cur = v;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        let obj = cur.as_object_mut().with_context(|| format!("sweep key `{key}`: `{}` is not a table", parts[..i].join(".")))?;
        if i + 1 == parts.len() {
            obj.insert(p.to_string(), value);
            return Ok(());
        }
        cur = obj.entry(p.to_string()).or_insert_with(|| serde_json::json!({}));
    }
    Ok(())
}

/// Applies dotted-key overrides to a spec, re-validating the result with the key named.
pub fn apply(spec: &Spec, set: &BTreeMap<String, serde_json::Value>) -> Result<Spec> {
    let mut v = serde_json::to_value(spec)?;
    v["sweep"] = serde_json::json!({});
    v["paper_scale"] = serde_json::Value::Null;
    if let Some(m) = v.as_object_mut() {
        m.remove("variants");
    }
    for (k, val) in set {
        set_dotted(&mut v, k, val.clone())?;
    }
    serde_json::from_value(v).map_err(|e| anyhow::anyhow!("sweep {set:?}: {e}"))
}

/// The Cartesian product of the sweep axes (one point without a sweep), each crossed with
/// every variant when the spec has some.
pub fn points(spec: &Spec) -> Result<Vec<Point>> {
    let mut combos: Vec<BTreeMap<String, serde_json::Value>> = vec![BTreeMap::new()];
    for (k, values) in &spec.sweep {
        combos = combos.into_iter().flat_map(|c| values.iter().map(move |v| { let mut c = c.clone(); c.insert(k.clone(), v.clone()); c })).collect();
    }
    let variants: Vec<Option<&Variant>> = if spec.variants.is_empty() { vec![None] } else { spec.variants.iter().map(Some).collect() };
    let mut named = Vec::new();
    for swept in combos {
        for v in &variants {
            let mut set = swept.clone();
            if let Some(v) = v {
                for (k, val) in &v.set {
                    ensure!(!set.contains_key(k), "variant `{}` sets `{k}`, which the sweep sweeps; sweep it or set it in the variants", v.name);
                    set.insert(k.clone(), val.clone());
                }
            }
            named.push((v.map(|v| v.name.clone()), swept.clone(), set));
        }
    }
    named
        .into_iter()
        .map(|(variant, swept, set)| {
            let resolved = apply(spec, &set).with_context(|| variant.as_ref().map_or(String::new(), |n| format!("variant `{n}`")))?;
            // Generated data (the phantom) carry their generator's revision: a point made with
            // another revision is another point.
            let datasets = std::iter::once(&resolved.dataset).chain(resolved.pretrain.as_ref().map(|p| &p.dataset)).chain(resolved.predict.dataset.as_ref());
            let revisions: String = datasets
                .filter_map(|d| {
                    let revision = stu_data::plugins::registry().get(&d.plugin).map(|e| e.revision).unwrap_or(0);
                    (revision != 0).then(|| format!("#{}-revision-{revision}", d.plugin))
                })
                .collect();
            // So does the training code's revision, and the model's: a point trained before a fix
            // that changes what training makes of the same spec is another point.
            let model_revision = match model_revision(&resolved.model.name) {
                0 => String::new(),
                r => format!("#{}-revision-{r}", resolved.model.name),
            };
            let revisions = revisions + &training_revision_suffix() + &model_revision;
            let id = hash_hex(&(identity(&resolved)? + &revisions));
            let former_id = hash_hex(&(serde_json::to_string(&resolved)? + &revisions));
            Ok(Point { set, variant, swept, spec: resolved, id, former_id })
        })
        .collect()
}

/// Bumped when a fix changes what training makes of the same spec, so that points finished
/// before it run again (revision 1 adds nothing to the ids, which kept them as they were).
/// 2 (2026-11-28): fresh networks' norm scales start at 1, as PyTorch's; they started at 0,
/// which slowed every from-scratch training and left many short phantom runs at Dice 0.
pub const TRAINING_REVISION: u32 = 2;

/// The registered model `name`'s `ModelEntry::revision` (0 for a name not registered, which
/// validation refuses before any point runs).
pub fn model_revision(name: &str) -> u32 {
    stu_engine::model::registry().get(name).map(|e| e.revision).unwrap_or(0)
}

fn training_revision_suffix() -> String {
    if TRAINING_REVISION > 1 { format!("#training-revision-{TRAINING_REVISION}") } else { String::new() }
}

/// What identifies a resolved spec: its JSON with every value equal to the spec format's
/// default left out (recursively; a table left empty goes too) and the prose (`description`,
/// `reproduces`) dropped, written with sorted keys. Two specs that differ only in defaults
/// written out or left implicit are one point, and so are a spec read before and after a field
/// with a default joined the format.
pub fn identity(spec: &Spec) -> Result<String> {
    let mut v = serde_json::to_value(spec)?;
    if let Some(m) = v.as_object_mut() {
        m.remove("description");
        m.remove("reproduces");
    }
    prune_defaults(&mut v, &defaults());
    Ok(sorted_json(&v))
}

/// [`prune_defaults`] of a plan (the data folder's key).
pub(crate) fn plan_identity(plan: &PlanSpec) -> serde_json::Value {
    let mut v = serde_json::to_value(plan).expect("a plan serialises");
    prune_defaults(&mut v, &serde_json::to_value(PlanSpec::default()).expect("a plan serialises"));
    v
}

/// The spec format's defaults as JSON, with the optional sections (`pretrain`,
/// `predict.dataset`) filled with theirs so that their fields are pruned too.
fn defaults() -> serde_json::Value {
    let dataset = serde_json::json!({"plugin": ""});
    let spec: Spec = serde_json::from_value(serde_json::json!({"name": "", "dataset": dataset, "model": {"name": ""}})).expect("the minimal spec deserialises");
    let pretrain: PretrainSpec = serde_json::from_value(serde_json::json!({"dataset": dataset})).expect("the minimal pretrain section deserialises");
    let mut d = serde_json::to_value(spec).expect("a spec serialises");
    d["pretrain"] = serde_json::to_value(pretrain).expect("a spec serialises");
    d["predict"]["dataset"] = d["dataset"].clone();
    d
}

/// Removes from `v` every key whose value equals `d`'s at the same path; tables present in both
/// are pruned in turn and dropped when nothing is left.
fn prune_defaults(v: &mut serde_json::Value, d: &serde_json::Value) {
    let (Some(m), Some(dm)) = (v.as_object_mut(), d.as_object()) else { return };
    m.retain(|k, x| match dm.get(k) {
        // An absent optional section is null where the defaults hold its table.
        Some(dx) if x == dx || (x.is_null() && dx.is_object()) => false,
        Some(dx) if x.is_object() && dx.is_object() => {
            prune_defaults(x, dx);
            x.as_object().is_some_and(|o| !o.is_empty())
        }
        _ => true,
    });
}

/// Compact JSON with every object's keys sorted (whatever serde_json's map type).
fn sorted_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let items: Vec<String> = keys.into_iter().map(|k| format!("{}:{}", serde_json::Value::from(k.as_str()), sorted_json(&m[k]))).collect();
            format!("{{{}}}", items.join(","))
        }
        serde_json::Value::Array(a) => format!("[{}]", a.iter().map(sorted_json).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// FNV-1a of `text` as 16 hex digits: the identity of a resolved point or of a data setup.
pub(crate) fn hash_hex(text: &str) -> String {
    format!("{:016x}", text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ x as u64).wrapping_mul(0x0100_0000_01b3)))
}

impl Point {
    /// A short label for folder names and listings: the variant's name, then the sweep's
    /// values ([`label`]): `CE-loss`, `CE-loss_seed=1`, `base_width=8_seed=1`.
    pub fn label(&self) -> String {
        let Some(v) = &self.variant else { return label(&self.set) };
        // Other characters become `-`, one for a run of them: `nnU-Net (Dice+CE)` → `nnU-Net-Dice-CE`.
        let mut name = String::new();
        for c in v.chars().map(|c| if c.is_ascii_alphanumeric() || "._".contains(c) { c } else { '-' }) {
            if !(c == '-' && (name.is_empty() || name.ends_with('-'))) {
                name.push(c);
            }
        }
        let name = name.trim_end_matches('-').to_string();
        if self.swept.is_empty() { name } else { format!("{name}_{}", label(&self.swept)) }
    }
}

/// A short label of a point for folder names (`model.options.base_width=8_seed=1`).
pub fn label(set: &BTreeMap<String, serde_json::Value>) -> String {
    if set.is_empty() {
        return "single".into();
    }
    let scalar = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    set.iter()
        .map(|(k, v)| match v {
            serde_json::Value::Object(m) => m.iter().map(|(k, v)| format!("{k}={}", scalar(v))).collect::<Vec<_>>().join("_"),
            v => format!("{}={}", k.rsplit('.').next().unwrap_or(k), scalar(v)),
        })
        .collect::<Vec<_>>()
        .join("_")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "=._-".contains(c) { c } else { '-' })
        .collect()
}

/// `stu spec check`: loads, validates and lists the points.
pub fn check(path: &Path, overrides: &[String]) -> Result<String> {
    let spec = load(path, overrides)?;
    let pts = points(&spec)?;
    let mut out = format!("{}: ok — study `{}`, {} point(s)\n", path.display(), spec.name, pts.len());
    for p in &pts {
        out.push_str(&format!("  {}  {}\n", p.id, p.label()));
    }
    if let Some(ps) = &spec.paper_scale {
        // The paper-scale variant must resolve too (its overrides, then every sweep point).
        paper_scale(&spec).with_context(|| path.display().to_string())?;
        out.push_str(&format!("paper scale ({}): {}\n", ps.set.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", "), ps.compute));
    }
    if spec.sweep.keys().any(|k| k.starts_with("sweep")) {
        bail!("sweep keys may not name the sweep itself");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = "name = \"x\"\ndescription = \"words\"\n[dataset]\nplugin = \"phantom\"\noptions = { cases = 5 }\n[model]\nname = \"stunet\"\noptions = { preset = \"stunet-s\" }\n[train]\nlr = 0.02\n";

    fn one_point(text: &str) -> Point {
        let spec = load_str(text, Path::new("tiny.toml"), &[]).unwrap();
        let mut pts = points(&spec).unwrap();
        assert_eq!(pts.len(), 1);
        pts.remove(0)
    }

    #[test]
    fn identity_leaves_out_defaults_and_prose() {
        let p = one_point(TINY);
        assert_eq!(identity(&p.spec).unwrap(), r#"{"dataset":{"options":{"cases":5},"plugin":"phantom"},"model":{"name":"stunet","options":{"preset":"stunet-s"}},"name":"x","train":{"lr":0.02}}"#);
        // Defaults written out, other prose, an empty pretrain-free spec: the same point.
        let explicit = TINY.replace("[train]\n", "[train]\nepochs = 1000\nfold = \"0\"\n").replace("words", "other words") + "[plan]\npreset = \"nnunet\"\n[predict]\ntta = true\n[evaluate]\nhd95 = false\n";
        let q = one_point(&explicit);
        assert_eq!(q.id, p.id);
        // A value off its default is part of the identity, in any section.
        for (section, line) in [("[train]\n", "epochs = 999\n"), ("[plan]\n", "preset = \"stunet\"\n"), ("[predict]\n", "step = 0.25\n")] {
            let t = if TINY.contains(section) { TINY.replace(section, &format!("{section}{line}")) } else { format!("{TINY}{section}{line}") };
            assert_ne!(one_point(&t).id, p.id, "{line}");
        }
        // The optional sections' own defaults are pruned too.
        let pre = one_point(&format!("{TINY}[pretrain]\nepochs = 1000\n[pretrain.dataset]\nplugin = \"phantom\"\n"));
        assert!(identity(&pre.spec).unwrap().contains(r#""pretrain":{"dataset":{"plugin":"phantom"}}"#), "{}", identity(&pre.spec).unwrap());
    }

    #[test]
    fn variants_are_points_of_their_own_crossed_with_the_sweep() {
        let text = format!("{TINY}[[variants]]\nname = \"nnU-Net\"\n[[variants]]\nname = \"CE loss\"\nset = {{ \"train.loss\" = \"ce\" }}\n[[variants]]\nname = \"AdamW, cosine\"\nset = {{ \"train.optimizer\" = \"adamw\", \"train.lr_schedule\" = \"cosine\" }}\n");
        let spec = load_str(&text, Path::new("v.toml"), &[]).unwrap();
        let pts = points(&spec).unwrap();
        assert_eq!(pts.iter().map(|p| p.label()).collect::<Vec<_>>(), ["nnU-Net", "CE-loss", "AdamW-cosine"]);
        // The baseline is the spec as written: the same identity as without variants.
        assert_eq!(pts[0].id, one_point(TINY).id);
        assert_eq!(pts[1].spec.train.loss, stu_engine::loss::LossKind::Ce);
        assert_eq!((pts[2].spec.train.optimizer, pts[2].spec.train.lr_schedule), (stu_engine::train::OptimizerKind::Adamw, stu_engine::schedule::LrSchedule::Cosine));
        assert!(pts.iter().all(|p| p.spec.variants.is_empty()), "a resolved point carries no variants");
        // Crossed with a sweep: every variant at every seed.
        let crossed = load_str(&format!("{text}[sweep]\nseed = [0, 1]\n"), Path::new("v.toml"), &[]).unwrap();
        let labels: Vec<String> = points(&crossed).unwrap().iter().map(|p| p.label()).collect();
        assert_eq!(labels, ["nnU-Net_seed=0", "CE-loss_seed=0", "AdamW-cosine_seed=0", "nnU-Net_seed=1", "CE-loss_seed=1", "AdamW-cosine_seed=1"]);
        // Mistakes name the variant and the key.
        let bad = |extra: &str| format!("{:#}", load_str(&format!("{TINY}{extra}"), Path::new("v.toml"), &[]).unwrap_err());
        let e = bad("[[variants]]\nname = \"x\"\nset = { \"train.loss\" = \"focal\" }\n");
        assert!(e.contains("variant `x`") && e.contains("focal"), "{e}");
        let e = bad("[[variants]]\nname = \"a\"\n[[variants]]\nname = \"a\"\nset = { seed = 3 }\n");
        assert!(e.contains("two variants have this name"), "{e}");
        let e = bad("[[variants]]\nname = \"a\"\n[[variants]]\nname = \"b\"\nset = { \"train.loss\" = \"dice_ce\" }\n");
        assert!(e.contains("resolve to the same spec"), "{e}");
        let e = bad("[[variants]]\nname = \"a\"\nset = { seed = 3 }\n[sweep]\nseed = [1, 2]\n");
        assert!(e.contains("sweep sweeps"), "{e}");
        let e = bad("[[variants]]\nname = \"a\"\ncolour = 3\n");
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn non_finite_and_negative_numbers_are_refused_naming_the_key() {
        // NaN serialises to null in a point's identity, so `lr = nan` would run as the default.
        for lr in ["nan", "inf", "-0.01"] {
            let e = format!("{:#}", load_str(&TINY.replace("lr = 0.02", &format!("lr = {lr}")), Path::new("t.toml"), &[]).unwrap_err());
            assert!(e.contains("`train.lr`") && e.contains("finite number ≥ 0"), "{lr}: {e}");
        }
        // (0 freezes the weights: a check that fine-tuning loads what it should.)
        load_str(&TINY.replace("lr = 0.02", "lr = 0.0"), Path::new("t.toml"), &[]).unwrap();
        for mm in ["nan", "-inf", "-1.0"] {
            let e = format!("{:#}", load_str(&format!("{TINY}[evaluate]\nnsd_tolerance = {mm}\n"), Path::new("t.toml"), &[]).unwrap_err());
            assert!(e.contains("`evaluate.nsd_tolerance`"), "{mm}: {e}");
        }
        load_str(&format!("{TINY}[evaluate]\nnsd_tolerance = 0.0\n"), Path::new("t.toml"), &[]).unwrap();
    }

    #[test]
    fn dataset_options_are_judged_by_their_plugin() {
        let bad = |from: &str, to: &str| format!("{:#}", load_str(&TINY.replace(from, to), Path::new("t.toml"), &[]).unwrap_err());
        let e = bad("cases = 5", "casez = 5");
        assert!(e.contains("`dataset.options`") && e.contains("casez"), "{e}");
        let e = bad("cases = 5", "cases = 0");
        assert!(e.contains("`dataset.options`") && e.contains("cases"), "{e}");
        let e = bad("cases = 5", "group = \"toes\"");
        assert!(e.contains("group") && e.contains("toes"), "{e}");
        let e = bad("plugin = \"phantom\"\noptions = { cases = 5 }", "plugin = \"nnunet-raw\"\noptions = { folder = \"/data/Dataset9\" }");
        assert!(e.contains("`dataset.options`") && e.contains("folder"), "{e}");
        // Data elsewhere (a cluster's paths, checked on a laptop) are not judged here.
        load_str(&TINY.replace("plugin = \"phantom\"\noptions = { cases = 5 }", "plugin = \"nnunet-raw\"\noptions = { path = \"/nonexistent/Dataset9\" }"), Path::new("t.toml"), &[]).unwrap();
    }

    #[test]
    fn the_recipe_keys_take_nnunets_variants_and_name_the_key_otherwise() {
        let p = one_point(&TINY.replace("[train]\n", "[train]\nloss = \"topk10\"\ndeep_supervision = false\noptimizer = \"adam\"\nlr_schedule = \"warmup\"\nmirror_axes = []\nseg_interpolation = \"nearest\"\ndummy_2d_augmentation = false\n"));
        let r = p.spec.train.recipe();
        assert_eq!(r, crate::train::Recipe { loss: stu_engine::loss::LossKind::Topk10, deep_supervision: false, optimizer: stu_engine::train::OptimizerKind::Adam, lr_schedule: stu_engine::schedule::LrSchedule::Warmup, mirror_axes: Some(vec![]), oversample_foreground: None, probabilistic_oversampling: false, seg_interpolation: stu_data::augment::SegInterpolation::Nearest, dummy_2d_augmentation: false });
        assert!(identity(&p.spec).unwrap().contains(r#""loss":"topk10""#));
        assert_eq!(r.describe(), "loss topk10, no deep supervision, optimizer adam, lr schedule warmup, mirror axes [], label maps augmented by nearest interpolation, no dummy-2-D augmentation");
        assert_eq!(crate::train::Recipe::default().describe(), "");
        // Written out at nnU-Net's defaults, they leave the identity alone.
        let q = one_point(&TINY.replace("[train]\n", "[train]\nloss = \"dice_ce\"\noptimizer = \"sgd\"\nlr_schedule = \"poly\"\ndeep_supervision = true\n"));
        assert_eq!(q.id, one_point(TINY).id);
        let e = format!("{:#}", load_str(&TINY.replace("[train]\n", "[train]\noptimizer = \"lion\"\n"), Path::new("t.toml"), &[]).unwrap_err());
        assert!(e.contains("train.optimizer") && e.contains("adamw"), "{e}");
    }

    /// A mistake in one sweep value (model name, model option, dataset plugin) fails validation
    /// before anything runs, naming the point and the key; so does one in the paper-scale sweep.
    #[test]
    fn every_sweep_point_is_checked() {
        let with_sweep = |axis: &str| format!("{TINY}[sweep]\n{axis}\n");
        let cases = [
            (with_sweep("\"model.name\" = [\"stunet\", \"stunett\"]"), "name=stunett: `model.name`: unknown model `stunett`"),
            (with_sweep("\"model.options\" = [{ preset = \"stunet-s\" }, { preset = \"stunet-x\" }]"), "`model.options`: model options: preset"),
            (with_sweep("\"model\" = [{ name = \"swinunetr\", options = { feature_sise = 12 } }]"), "unknown field `feature_sise`"),
            (with_sweep("\"model\" = [{ name = \"nnunet-plainconv\", options = { features = [8, 16], n_conv = [2, 2, 2] } }]"), "`n_conv` has 3 entries, `features` 2"),
            (with_sweep("\"dataset.plugin\" = [\"phantom\", \"phantomm\"]"), "`dataset.plugin`"),
            (with_sweep("\"model\" = [{ name = \"unetr\", options = { img_size = 64 } }]\n\"train.patch_size\" = [[32, 32, 32]]"), "`train.patch_size` = [32, 32, 32]: `unetr` with these `model.options` takes [64, 64, 64] inputs only"),
            (TINY.replace("[model]\nname = \"stunet\"\noptions = { preset = \"stunet-s\" }\n", "[model]\nname = \"stunet\"\n"), "`model.options`: model options: give `preset`"),
            (with_sweep("\"model\" = [{ name = \"swinunetr\", options = { feature_size = 12 } }]\n\"train.patch_size\" = [[32, 48, 32]]"), "`train.patch_size` = [32, 48, 32]: `swinunetr` takes extents that are multiples of [32, 32, 32]"),
        ];
        for (text, want) in &cases {
            let err = format!("{:#}", load_str(text, Path::new("tiny.toml"), &[]).unwrap_err());
            assert!(err.contains(want) && err.starts_with("tiny.toml: "), "{want}: {err}");
        }
        // Options that only a plan can judge (a list's length against the strides) are left to it.
        one_point(&TINY.replace("name = \"stunet\"\noptions = { preset = \"stunet-s\" }", "name = \"nnunet-plainconv\"\noptions = { features = [8, 16, 32] }"));
        // A checkpoint to predict with needs no options.
        one_point(&TINY.replace("options = { preset = \"stunet-s\" }\n", "checkpoint = \"model.safetensors\"\n"));
        let paper = load_str(&format!("{TINY}[paper_scale]\nset = {{}}\ncompute = \"none\"\n[paper_scale.sweep]\n\"model.options\" = [{{ blocks = 0 }}]\n"), Path::new("tiny.toml"), &[]).unwrap();
        let err = format!("{:#}", paper_scale(&paper).unwrap_err());
        assert!(err.starts_with("[paper_scale]: sweep point blocks=0: `model.options`: every stage needs"), "{err}");
    }

    #[test]
    fn point_ids_are_stable() {
        // The id of this point is pinned: a change of the id rule, or a new spec field whose
        // default alters the identity, would make every finished point run again.
        // (The phantom's revision is part of it: a new generator revision changes it rightly.
        // TINY gained its model options on 2026-11-27, when validation began to require them;
        // its id was 072764d7b4ec4c4a without. Training revision 2 of 2026-11-28 made it
        // 271e897665530366 → the id below.)
        let p = one_point(TINY);
        assert_eq!(p.id, "33ba36411fdf30ca");
        assert_ne!(p.former_id, p.id);
    }

    #[test]
    fn a_models_revision_is_part_of_its_points_ids() {
        // STU-Net's revision is 0: its ids stay as they were (above). UNETR's is 2 (2026-11-29:
        // its fresh weights drawn as its builder declares, then as MONAI leaves them), so its
        // id is the hash of the identity with `#unetr-revision-2` after the others.
        let text = TINY.replace("name = \"stunet\"\noptions = { preset = \"stunet-s\" }", "name = \"unetr\"\noptions = { img_size = 32 }");
        let p = one_point(&text);
        let phantom = stu_data::plugins::registry().get("phantom").unwrap().revision;
        let without = identity(&p.spec).unwrap() + &format!("#phantom-revision-{phantom}") + &training_revision_suffix();
        assert_eq!(p.id, hash_hex(&(without.clone() + "#unetr-revision-2")));
        assert_ne!(p.id, hash_hex(&without));
    }
}
