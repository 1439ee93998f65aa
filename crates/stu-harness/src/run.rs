//! `stu run SPEC`: every sweep point of a study: prepare the data (dataset plugin), plan,
//! preprocess, train, predict the held-out cases, evaluate, and write `record.json`.
//!
//! Layout under `runs/<study>/`: `data/<dataset-hash>/` (raw dataset, plans, preprocessed cases;
//! shared by every point with the same data), and one folder per point, `<label>-<id>/`, with
//! the resolved `spec.json`, `train/` (the `stu train` run folder), `pred/` (label maps and
//! `summary.json`) and `record.json` (written last). A point with a `record.json` is done and
//! skipped; an interrupted point resumes its training; a failed point writes `error.txt` and the
//! others still run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;
use stu_engine::backend::Backend;

use crate::spec::{DatasetSpec, PlanSpec, Point, Spec};

/// What happened to one point.
#[derive(Debug, serde::Serialize)]
pub struct PointOutcome {
    /// Folder.
    pub dir: PathBuf,
    /// `done`, `skipped` (already done) or `failed: …`.
    pub status: String,
}


fn git(args: &[&str]) -> Option<String> {
    std::process::Command::new("git").args(args).output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn host() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string()));
    json!({
        "hostname": std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_default(),
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "os": std::env::consts::OS,
    })
}

/// Data for a point: raw dataset root, preprocessed folder (cached across points).
fn data(dataset: &DatasetSpec, plan: &PlanSpec, root: &Path, log: &dyn Fn(&str)) -> Result<(PathBuf, PathBuf)> {
    let entry = stu_data::plugins::registry().get(&dataset.plugin)?;
    // The folder is keyed by the data's options and the plan without its defaults; a folder
    // made under the former key (the whole plan) is used where it exists.
    let key = |plan: serde_json::Value| {
        let mut key = json!({"plugin": dataset.plugin, "options": dataset.options, "plan": plan});
        if entry.revision != 0 {
            key["revision"] = entry.revision.into();
        }
        root.join("data").join(crate::spec::hash_hex(&key.to_string()))
    };
    let (dir, former) = (key(crate::spec::plan_identity(plan)), key(json!(plan)));
    let dir = if !dir.exists() && former.exists() { former } else { dir };
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    log(&format!("data: {} → {}", dataset.plugin, dir.display()));
    let raw = (entry.prepare)(&dataset.options, &dir.join("raw")).with_context(|| format!("dataset `{}`", dataset.plugin))?;
    let plans = dir.join("plans.json");
    if !plans.exists() {
        let json = stu_data::dataset::DatasetJson::read(&raw.join("dataset.json"))?;
        let fp = stu_data::fingerprint::fingerprint(&raw, &json)?;
        let preset = stu_data::plan::Preset::parse(&plan.preset).with_context(|| format!("plan.preset `{}`", plan.preset))?;
        let name = raw.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let p = stu_data::plan::plans_json(&name, &json, &fp, preset, None);
        stu_core::fs::write_atomic(&plans, (serde_json::to_string_pretty(&p)? + "\n").as_bytes())?;
    }
    let pre = dir.join("preprocessed");
    stu_data::preprocess::preprocess_dataset(&raw, &plans, &plan.configuration, &pre, 1, &|_| {})?;
    Ok((raw, pre))
}

fn train_request(s: &Spec, pre: &Path, out: &Path, backend: Backend) -> crate::train::TrainRequest {
    crate::train::TrainRequest {
        preprocessed: pre.to_path_buf(),
        configuration: s.plan.configuration.clone(),
        fold: s.train.fold.clone(),
        out: out.to_path_buf(),
        model: s.model.name.clone(),
        model_options: s.model.options.clone(),
        epochs: s.train.epochs,
        iterations: s.train.iterations,
        val_iterations: s.train.val_iterations,
        save_every: s.train.save_every,
        batch_size: s.train.batch_size,
        patch_size: s.train.patch_size,
        precision: s.precision,
        lr: s.train.lr,
        seed: s.seed,
        init_from: s.train.init_from.clone(),
        augmentation: s.train.augmentation,
        resume: out.join("train.json").exists(),
        workers: s.train.workers,
        backend,
        fraction: s.dataset.fraction,
        previous_stage: Vec::new(),
        recipe: s.train.recipe(),
    }
}

fn run_point(spec: &Spec, point: &Point, root: &Path, dir: &Path, log: &dyn Fn(&str)) -> Result<serde_json::Value> {
    let mut timings = serde_json::Map::new();
    let s = &point.spec;
    let backend: Backend = s.backend.parse().map_err(|e: String| anyhow::anyhow!("`backend`: {e}"))?;
    let mut training = serde_json::Value::Null;
    let checkpoint = match &s.model.checkpoint {
        // Direct inference: an existing checkpoint, no training.
        Some(c) => c.clone(),
        None => {
            let mut start = s.train.init_from.clone();
            if let Some(p) = s.pretrain.as_ref().filter(|p| p.enabled) {
                let t = Instant::now();
                let (_, pre) = data(&p.dataset, &s.plan, root, log)?;
                let mut req = train_request(s, &pre, &dir.join("pretrain"), backend);
                req.epochs = p.epochs;
                req.iterations = p.iterations;
                req.fraction = p.dataset.fraction;
                req.init_from = None;
                log(&format!("pretrain: {}", req.out.display()));
                crate::train::train(&req, &crate::train::Quiet)?;
                timings.insert("pretrain_s".into(), t.elapsed().as_secs_f64().into());
                start = Some(req.out.join("checkpoint_final.safetensors"));
            }
            let t = Instant::now();
            let (_, pre) = data(&s.dataset, &s.plan, root, log)?;
            timings.insert("data_s".into(), t.elapsed().as_secs_f64().into());
            let train_dir = dir.join("train");
            let mut req = train_request(s, &pre, &train_dir, backend);
            req.init_from = start;
            let t = Instant::now();
            log(&format!("train: {}", train_dir.display()));
            let summary = crate::train::train(&req, &crate::train::Quiet)?;
            timings.insert("train_s".into(), t.elapsed().as_secs_f64().into());
            training = json!({"best_ema_pseudo_dice": summary.best_ema, "last_epoch": summary.last, "transfer": summary.transfer});
            train_dir.join("checkpoint_final.safetensors")
        }
    };
    // Held-out cases of the target data (the training data unless `predict.dataset` names other).
    let target = s.predict.dataset.clone().unwrap_or_else(|| s.dataset.clone());
    let (raw, _) = data(&target, &s.plan, root, log)?;
    let images = raw.join("imagesTs");
    let labels = raw.join("labelsTs");
    let mut metrics = serde_json::Value::Null;
    if images.is_dir() && labels.is_dir() {
        let t = Instant::now();
        let pred = dir.join("pred");
        let opts = crate::predict::PredictOptions {
            input: images,
            output: pred.clone(),
            checkpoints: vec![checkpoint.clone()],
            best: false,
            model: Some(s.model.name.clone()),
            plans: s.predict.plans.clone(),
            configuration: Some(s.plan.configuration.clone()),
            disable_tta: !s.predict.tta,
            step: s.predict.step,
            keep_largest: s.predict.keep_largest,
            postprocessing: None,
            label_map: s.predict.label_map.clone(),
            save_probabilities: false,
            npz: false,
            fast_export: s.predict.fast_export,
            overlap: None,
            backend,
            precision: s.precision,
            continue_prediction: false,
            part: None,
            previous_stage: None,
        };
        log("predict: held-out cases");
        let results = crate::predict::predict(&opts, &|_, _, _| {})?;
        if let Some(bad) = results.iter().find(|r| r.output.is_err()) {
            anyhow::bail!("prediction of `{}` failed: {}", bad.id, bad.output.as_ref().expect_err("error"));
        }
        timings.insert("predict_s".into(), t.elapsed().as_secs_f64().into());
        let t = Instant::now();
        let json = stu_data::dataset::DatasetJson::read(&raw.join("dataset.json"))?;
        let mut eval = stu_data::metrics::EvalOptions { nsd_default: s.evaluate.nsd_tolerance, hd95: s.evaluate.hd95, assd: s.evaluate.assd, ignore_label: json.ignore_label.map(|v| v as u16), ..Default::default() };
        use stu_data::metrics::Scored;
        let (scored, names): (Vec<Scored>, serde_json::Map<String, serde_json::Value>) = match (&s.predict.label_map, &json.regions) {
            (Some(m), _) => {
                let m = crate::labelmap::LabelMap::load(m)?;
                eval.reference_map = Some(m.reference_table());
                (Scored::of_labels(&m.labels.iter().map(|l| l.value).collect::<Vec<_>>()), m.labels.iter().map(|l| (l.value.to_string(), l.name.clone().into())).collect())
            }
            // A region-based dataset is scored per region, under nnU-Net's keys.
            (None, Some(r)) => (Scored::of_dataset(&json), r.iter().map(|r| (r.key.clone(), r.name.clone().into())).collect()),
            (None, None) => {
                let (v, n): (Vec<u16>, _) = json.foreground_classes().into_iter().map(|(c, n)| (c as u16, (c.to_string(), serde_json::Value::from(n)))).unzip();
                (Scored::of_labels(&v), n)
            }
        };
        let summary = stu_data::metrics::evaluate_scored(&labels, std::slice::from_ref(&pred), &scored, &eval)?;
        let value = serde_json::to_value(&summary)?;
        stu_core::fs::write_atomic(&pred.join("summary.json"), (serde_json::to_string_pretty(&value)? + "\n").as_bytes())?;
        timings.insert("evaluate_s".into(), t.elapsed().as_secs_f64().into());
        metrics = json!({"foreground_mean": value["foreground_mean"], "mean": value["mean"], "per_case": value["metric_per_case"], "label_names": names});
    }
    let ckpt = stu_engine::checkpoint::StateDict::open(&checkpoint)?;
    let meta: serde_json::Value = ckpt.metadata().get("stu_checkpoint").and_then(|m| serde_json::from_str(m).ok()).unwrap_or_default();
    let model = if meta["model"].is_null() {
        crate::forward::inspect(&crate::forward::ModelSource { checkpoint: checkpoint.clone(), model: Some(s.model.name.clone()), strides: crate::forward::StrideSource::Default, backend })
            .map(|mut v| {
                if let Some(o) = v.as_object_mut() {
                    o.remove("checkpoint");
                }
                v
            })
            .unwrap_or_default()
    } else {
        meta["model"].clone()
    };
    let mut record = json!({
        "format": "stu-record/1",
        "study": spec.name,
        "point": point.set,
        "id": point.id,
        "spec": point.spec,
        "git": {"revision": git(&["rev-parse", "HEAD"]), "dirty": git(&["status", "--porcelain"]).map(|s| !s.is_empty())},
        "training_revision": crate::spec::TRAINING_REVISION,
        "model_revision": crate::spec::model_revision(&point.spec.model.name),
        "host": host(),
        "seed": s.seed,
        "backend": s.backend,
        "model": model,
        "checkpoint": checkpoint,
        "training": training,
        "timings": timings,
        "metrics": metrics,
        "finished": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    });
    if let Some(v) = &point.variant {
        // The variant's name, and which of `point`'s values the sweep set (the rest are the
        // variant's overrides).
        record["variant"] = json!(v);
        record["swept"] = json!(point.swept);
    }
    Ok(record)
}

/// Which part of a study to run (job arrays run one point per task).
#[derive(Debug, Clone, Copy, Default)]
pub struct Select {
    /// Only the point with this index (0-based, in [`crate::spec::points`] order).
    pub point: Option<usize>,
    /// Only prepare the data (raw, plan, preprocessed) every point needs, then stop: run it once
    /// before the points of a job array so that they never prepare one folder concurrently.
    pub data_only: bool,
}

/// Runs every point of `spec` under `root` (`runs/<name>` by default).
pub fn run(spec: &Spec, root: &Path, log: &dyn Fn(&str)) -> Result<Vec<PointOutcome>> {
    run_selected(spec, root, Select::default(), log)
}

/// [`run`] restricted by `select`.
pub fn run_selected(spec: &Spec, root: &Path, select: Select, log: &dyn Fn(&str)) -> Result<Vec<PointOutcome>> {
    zoo::link();
    // Every rank would write the same records: a study's points are separate jobs, not ranks.
    anyhow::ensure!(
        stu_engine::dist::Launch::from_env()?.is_none(),
        "`stu run` under a data-parallel launch (WORLD_SIZE > 1): run a study's points as separate jobs (`--point K`, `--emit slurm`), or train one model over ranks with `stu train`"
    );
    let points = crate::spec::points(spec)?;
    if let Some(k) = select.point {
        anyhow::ensure!(k < points.len(), "--point {k}: the study has {} point(s) (0…{})", points.len(), points.len().saturating_sub(1));
    }
    std::fs::create_dir_all(root).with_context(|| format!("{}: cannot create", root.display()))?;
    let mut out = Vec::new();
    if select.data_only {
        for (i, p) in points.iter().enumerate().filter(|(i, _)| select.point.is_none_or(|k| k == *i)) {
            let s = &p.spec;
            if let Some(pre) = s.pretrain.as_ref().filter(|p| p.enabled) {
                data(&pre.dataset, &s.plan, root, log)?;
            }
            let (_, pre) = data(&s.dataset, &s.plan, root, log)?;
            if let Some(d) = &s.predict.dataset {
                data(d, &s.plan, root, log)?;
            }
            out.push(PointOutcome { dir: pre, status: format!("data ready for point {i}") });
        }
        return Ok(out);
    }
    for (i, p) in points.iter().enumerate() {
        if select.point.is_some_and(|k| k != i) {
            continue;
        }
        // Points are keyed by the hash of their resolved spec: a finished folder with the same
        // hash (or the former rule's) counts, whatever sweep produced it.
        let suffix = |id: &str| format!("-{}", &id[..8]);
        let finished = |id: &str| std::fs::read_dir(root).ok()?.filter_map(|e| e.ok().map(|e| e.path())).find(|d| d.file_name().is_some_and(|n| n.to_string_lossy().ends_with(&suffix(id))) && d.join("record.json").exists());
        let existing = finished(&p.id).or_else(|| finished(&p.former_id));
        let dir = existing.unwrap_or_else(|| root.join(format!("{}{}", p.label(), suffix(&p.id))));
        let record = dir.join("record.json");
        if record.exists() {
            log(&format!("[{}/{}] {} done before, skipped", i + 1, points.len(), dir.display()));
            out.push(PointOutcome { dir, status: "skipped".into() });
            continue;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        stu_core::fs::write_atomic(&dir.join("spec.json"), (serde_json::to_string_pretty(&p.spec)? + "\n").as_bytes())?;
        log(&format!("[{}/{}] {}", i + 1, points.len(), dir.display()));
        match run_point(spec, p, root, &dir, log) {
            Ok(rec) => {
                let _ = std::fs::remove_file(dir.join("error.txt"));
                stu_core::fs::write_atomic(&record, (serde_json::to_string_pretty(&rec)? + "\n").as_bytes())?;
                out.push(PointOutcome { dir, status: "done".into() });
            }
            Err(e) => {
                let msg = crate::error_line(&e);
                stu_core::fs::write_atomic(&dir.join("error.txt"), (msg.clone() + "\n").as_bytes())?;
                log(&format!("  failed: {msg}"));
                out.push(PointOutcome { dir, status: format!("failed: {msg}") });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_named_under_the_former_id_rule_still_count() {
        let tmp = tempfile::tempdir().unwrap();
        let text = "name = \"x\"\n[dataset]\nplugin = \"phantom\"\noptions = { cases = 3, test_cases = 0 }\n[model]\nname = \"stunet\"\noptions = { depth = [1, 1, 1], dims = [4, 8, 8] }\n";
        let spec = crate::spec::load_str(text, Path::new("x.toml"), &[]).unwrap();
        let p = &crate::spec::points(&spec).unwrap()[0];
        // A finished point under its former id is skipped, not run again under the new one.
        let old = tmp.path().join(format!("single-{}", &p.former_id[..8]));
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("record.json"), "{}").unwrap();
        let out = run(&spec, tmp.path(), &|_| {}).unwrap();
        assert_eq!((out[0].dir.as_path(), out[0].status.as_str()), (old.as_path(), "skipped"));
        // A data folder under the former key (the whole plan) is used where it exists.
        let former = tmp.path().join("data").join(crate::spec::hash_hex(&json!({"plugin": "phantom", "options": spec.dataset.options, "plan": spec.plan, "revision": stu_data::plugins::registry().get("phantom").unwrap().revision}).to_string()));
        std::fs::create_dir_all(&former).unwrap();
        let (raw, _) = data(&spec.dataset, &spec.plan, tmp.path(), &|_| {}).unwrap();
        assert!(raw.starts_with(&former), "{}", raw.display());
        assert_eq!(std::fs::read_dir(tmp.path().join("data")).unwrap().count(), 1);
    }
}
