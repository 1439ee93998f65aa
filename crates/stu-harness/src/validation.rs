//! nnU-Net's final validation (`perform_actual_validation`): after training, the fold's
//! validation cases are predicted from their raw images with the final checkpoint (sliding
//! window, mirroring TTA, the full export) into `RUN/validation/{case}.nii.gz`, and scored
//! against their raw labels into `RUN/validation/summary.json`, the cross-validation numbers
//! nnU-Net users report. The raw dataset is found through `source.json`, which `stu preprocess`
//! writes into the preprocessed folder. Rerunning predicts only the cases not written yet.
//!
//! `stu validate RUN [--checkpoint best]` runs it again on a finished run (nnU-Net's
//! `--val [--val_best] [--npz]`), also on another backend. `validation/checkpoint.json` names the
//! checkpoint the predictions come from, with its size and CRC-32: predictions of another
//! checkpoint (or of an earlier state of the same file) are removed before any case is
//! predicted, so the folder never mixes two checkpoints, and an interrupted run resumes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use crate::predict::{PredictOptions, Predictor};
use crate::train::TrainConfig;

/// What the final validation did.
#[derive(Debug, Clone, Serialize)]
pub struct Validation {
    /// `RUN/validation`.
    pub dir: PathBuf,
    /// Cases predicted now (the others were there already).
    pub predicted: usize,
    /// Validation cases in all.
    pub cases: usize,
    /// Mean Dice over the foreground labels (nnU-Net's `foreground_mean`).
    pub foreground_dice: Option<f64>,
    /// The checkpoint file the predictions come from.
    pub checkpoint: String,
    /// Predictions of another checkpoint that were removed first.
    pub removed: usize,
}

/// What a validation is asked to do beyond the run's own settings.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// `best` for `checkpoint_best`, else `checkpoint_final`.
    pub best: bool,
    /// Also write each case's probabilities (nnU-Net's `--npz`).
    pub probabilities: bool,
    /// Those as nnU-Net writes them (`{case}.npz` and `{case}.pkl`), not ours.
    pub npz: bool,
    /// Validate fold `all` on its training cases, as nnU-Net does (its `do_split` makes them the
    /// validation set too: a training-set score). Asked for (`stu validate`, nnU-Net's `--val`)
    /// only: after training it would predict the whole training set, hours for a large one.
    pub all_on_training: bool,
    /// Another backend than the training's.
    pub backend: Option<stu_engine::backend::Backend>,
    /// Another precision than the training's.
    pub precision: Option<stu_engine::precision::Precision>,
}

/// The checkpoint a validation folder's predictions come from (`validation/checkpoint.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
struct Source {
    checkpoint: String,
    bytes: u64,
    crc32: u32,
}

/// The checkpoint file name the predictions in a validation folder `dir` come from: its
/// `checkpoint.json`'s, or the final checkpoint for a folder written before such records.
pub(crate) fn recorded_checkpoint(dir: &Path) -> Result<String> {
    Ok(read_record(&dir.join("checkpoint.json"))?.map_or_else(|| "checkpoint_final.safetensors".into(), |s| s.checkpoint))
}

/// A validation folder's `checkpoint.json` (`None`: the folder has none).
fn read_record(record: &Path) -> Result<Option<Source>> {
    match std::fs::read_to_string(record) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: not a validation record", record.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", record.display())),
    }
}

impl Source {
    fn of(path: &Path) -> Result<Self> {
        use std::io::Read;
        let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let (mut hasher, mut buf, mut bytes) = (crc32fast::Hasher::new(), vec![0u8; 1 << 20], 0u64);
        loop {
            let n = f.read(&mut buf).with_context(|| format!("{}: cannot read", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            bytes += n as u64;
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Self { checkpoint: name, bytes, crc32: hasher.finalize() })
    }
}

/// Why a run has no final validation, or its result.
#[derive(Debug, Clone, Serialize)]
pub enum Outcome {
    /// Done.
    Done(Validation),
    /// Nothing to validate, with the reason (`--fold all`, a preprocessed folder without
    /// `source.json`).
    Skipped(String),
}

/// Runs the final validation of the finished run in `run` (its `train.json` and
/// `checkpoint_final.safetensors`, or `checkpoint_best` when asked); with `probabilities`, each
/// case's softmax is written beside its label map (nnU-Net's `--npz`), for `stu ensemble` of two
/// trainings' validations.
pub fn final_validation(run: &Path, req: &Request, progress: &dyn Fn(&str, usize, usize)) -> Result<Outcome> {
    let cfg_path = run.join("train.json");
    let cfg: TrainConfig = serde_json::from_str(&std::fs::read_to_string(&cfg_path).with_context(|| format!("{}: cannot read (is {} a `stu train` run folder?)", cfg_path.display(), run.display()))?).with_context(|| format!("{}: not a training configuration", cfg_path.display()))?;
    let checkpoint = run.join(if req.best { "checkpoint_best.safetensors" } else { "checkpoint_final.safetensors" });
    ensure!(checkpoint.exists(), "{}: not found (is the training finished?)", checkpoint.display());
    let (train_ids, val_ids) = crate::train::fold_cases(&cfg.preprocessed, &cfg.fold)?;
    // Fold `all`, when asked, on its training cases (see `Request::all_on_training`).
    let val_ids = if cfg.fold == "all" && req.all_on_training { train_ids.clone() } else { val_ids };
    // A cascade's first stage also writes its segmentations for the next stage: of the
    // validation cases, or of every case for fold `all` (nnU-Net's `predicted_next_stage`).
    let next = next_stage(run, &cfg)?;
    let next_ids = match &next {
        Some(_) if val_ids.is_empty() => train_ids,
        Some(_) => val_ids.clone(),
        None => Vec::new(),
    };
    if val_ids.is_empty() && next.is_none() {
        let how = if cfg.fold == "all" { format!(" (`stu validate {}` scores its training cases, as nnU-Net does)", run.display()) } else { String::new() };
        return Ok(Outcome::Skipped(format!("fold `{}` has no validation cases{how}", cfg.fold)));
    }
    let raw = match stu_data::preprocess::source_of(&cfg.preprocessed) {
        Ok(Some(raw)) => raw,
        Ok(None) => return Ok(Outcome::Skipped(format!("{} does not record its raw dataset (preprocessed by an older `stu preprocess`); predict the validation cases with `stu predict`", cfg.preprocessed.display()))),
        // A raw folder moved away since is no failure of the training.
        Err(e) => return Ok(Outcome::Skipped(format!("{e}; predict the validation cases with `stu predict`"))),
    };
    let json = stu_data::dataset::DatasetJson::read(&raw.join("dataset.json"))?;
    let (cases, _) = stu_data::dataset::discover(&raw, &json)?;
    let dir = run.join("validation");
    // Predictions of another checkpoint go first (a folder without `checkpoint.json` holds the
    // final checkpoint's, from before it was written), and the old summary with them, which
    // scored them.
    let source = Source::of(&checkpoint)?;
    // Label maps in the dataset's format, as `stu predict` writes them.
    let ending = stu_data::nifti_io::label_ending(&json.file_ending);
    let removed = if val_ids.is_empty() {
        0
    } else {
        let files = |id: &str| {
            let npz = crate::predict::npz_path(&dir, id);
            vec![dir.join(format!("{id}{ending}")), crate::predict::probabilities_path(&dir, id), npz.with_extension("pkl"), npz]
        };
        let gone = fresh(&dir, &source, !req.best, &val_ids, &files, &[dir.join("summary.json")])?;
        // (label maps counted: not the probabilities, nor the summary)
        gone.iter().filter(|f| f.to_string_lossy().ends_with(ending)).count()
    };
    let backend = match req.backend {
        Some(b) => b,
        None => cfg.backend.parse().map_err(|e: String| anyhow::anyhow!("{}: `backend`: {e}", cfg_path.display()))?,
    };
    let opts = PredictOptions {
        input: raw.join("imagesTr"),
        // (the predictor writes the plan it used there: beside the segmentations for the next
        // stage when there is no validation)
        output: match &next {
            Some(n) if val_ids.is_empty() => n.dir.clone(),
            _ => dir.clone(),
        },
        checkpoints: vec![checkpoint.clone()],
        best: false,
        model: Some(cfg.model.clone()),
        plans: None,
        configuration: Some(cfg.configuration.clone()),
        disable_tta: false,
        step: 0.5,
        keep_largest: false,
        postprocessing: None,
        label_map: None,
        save_probabilities: false,
        npz: false,
        fast_export: false,
        overlap: None,
        backend,
        precision: req.precision.unwrap_or(cfg.precision),
        continue_prediction: false,
        part: None,
        previous_stage: (!cfg.previous_stage.is_empty()).then(|| crate::predict::Previous::NextStage(cfg.previous_stage.clone())),
    };
    let predictor = Predictor::new(&opts)?;
    let wide = predictor.max_label() > 255;
    let images_of = |id: &str| -> Result<Vec<PathBuf>> {
        let case = cases.iter().find(|c| c.id == id).with_context(|| format!("validation case `{id}` is not in {}", raw.join("imagesTr").display()))?;
        case.images.iter().enumerate().map(|(ch, p)| p.clone().with_context(|| format!("validation case `{id}` has no channel {ch} in {}", raw.display()))).collect()
    };
    let mut predicted = 0;
    if let Some(next) = &next {
        fresh(&next.dir, &source, false, &next_ids, &|id| stu_data::cascade::case_files(&next.dir, id).to_vec(), &[])?;
        for id in &next_ids {
            if stu_data::cascade::holding(std::slice::from_ref(&next.dir), id).is_some() {
                continue;
            }
            // The validation's label map from the same logits, when it is missing too.
            let out = dir.join(format!("{id}{ending}"));
            let export = val_ids.contains(id) && !out.exists() && !req.probabilities;
            if let Some((seg, geom)) = predictor.predict_case_and_next_stage(id, &images_of(id)?, next.spacing, &next.dir, export, &|d, n| progress(id, d, n))? {
                stu_data::nifti_io::write_label_as(&out, &seg, &geom, wide)?;
                predicted += 1;
            }
        }
    }
    for id in &val_ids {
        let out = dir.join(format!("{id}{ending}"));
        let probs = req.probabilities.then(|| if req.npz { crate::predict::npz_path(&dir, id) } else { crate::predict::probabilities_path(&dir, id) });
        if out.exists() && probs.as_ref().is_none_or(|p| p.exists()) {
            continue;
        }
        let (seg, geom) = predictor.predict_case_with(id, &images_of(id)?, probs.as_deref(), &|d, n| progress(id, d, n), &mut Vec::new())?;
        stu_data::nifti_io::write_label_as(&out, &seg, &geom, wide)?;
        predicted += 1;
    }
    if val_ids.is_empty() {
        let dir = next.as_ref().map(|n| n.dir.display().to_string()).unwrap_or_default();
        return Ok(Outcome::Skipped(format!("fold `{}` has no validation cases (the next stage's segmentations of all {} cases are in {dir})", cfg.fold, next_ids.len())));
    }
    let scored = stu_data::metrics::Scored::of_dataset(&json);
    let eval = stu_data::metrics::EvalOptions { ignore_label: json.ignore_label.map(|v| v as u16), ..Default::default() };
    let summary = stu_data::metrics::evaluate_scored(&raw.join("labelsTr"), std::slice::from_ref(&dir), &scored, &eval)?;
    let value = serde_json::to_value(&summary)?;
    stu_core::fs::write_atomic(&dir.join("summary.json"), (serde_json::to_string_pretty(&value)? + "\n").as_bytes())?;
    Ok(Outcome::Done(Validation { dir, predicted, cases: val_ids.len(), foreground_dice: value.pointer("/foreground_mean/Dice").and_then(|d| d.as_f64()), checkpoint: source.checkpoint, removed }))
}

/// The next stage of a cascade the run's configuration names (`next_stage`), its spacing and
/// where its segmentations go.
struct NextStage {
    spacing: [f64; 3],
    dir: PathBuf,
}

fn next_stage(run: &Path, cfg: &TrainConfig) -> Result<Option<NextStage>> {
    let path = run.join("plans.json");
    let plans: serde_json::Value = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    let conf = stu_data::plan::configuration(&plans, &cfg.configuration).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let Some(name) = conf.get("next_stage").and_then(|n| n.as_str()) else { return Ok(None) };
    let next = stu_data::plan::configuration(&plans, name).map_err(|e| anyhow::anyhow!("{}: `next_stage`: {e}", path.display()))?;
    let spacing: [f64; 3] = serde_json::from_value(next["spacing"].clone()).with_context(|| format!("{}: `configurations.{name}.spacing` is not three numbers", path.display()))?;
    Ok(Some(NextStage { spacing, dir: stu_data::cascade::next_stage_dir(run, name) }))
}

/// Makes `dir` hold only outputs of the checkpoint `source`, before anything is written there,
/// and returns the files it removed. Unless its `checkpoint.json` names `source`: the files of
/// `ids` go when the record names another checkpoint (or there is none and `unrecorded_is_source`
/// does not hold: a validation folder from before records held the final checkpoint's), `also`
/// goes in any case (what scored the old files), and the record is written.
fn fresh(dir: &Path, source: &Source, unrecorded_is_source: bool, ids: &[String], files: &dyn Fn(&str) -> Vec<PathBuf>, also: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let record = dir.join("checkpoint.json");
    let recorded = read_record(&record)?;
    if recorded.as_ref() == Some(source) {
        return Ok(Vec::new());
    }
    let stale = recorded.is_some() || !unrecorded_is_source;
    let doomed = ids.iter().filter(|_| stale).flat_map(|id| files(id));
    let mut removed = Vec::new();
    for f in doomed.chain(also.iter().cloned()) {
        match std::fs::remove_file(&f) {
            Ok(()) => removed.push(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("{}: cannot remove an output of another checkpoint", f.display())),
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    stu_core::fs::write_atomic(&record, (serde_json::to_string_pretty(source)? + "\n").as_bytes())?;
    Ok(removed)
}
