//! `stu find-best-config`: nnU-Net's `nnUNetv2_find_best_configuration` for trained models.
//! Each candidate is a model trained on the folds of one dataset (its run folders, or a folder
//! holding them as `fold_K`); its cross-validation is the union of the runs' `validation/`
//! predictions. Every candidate, and every pair of candidates whose validations carry their
//! probabilities (`stu train --validation-probabilities`, `stu validate RUN --probabilities`),
//! ensembled as `stu ensemble` does, is scored against the raw labels; the best foreground
//! mean Dice wins (ties go to the first: single models in the order given, then pairs); the
//! post-processing is determined on the winner's predictions; and the commands to predict new
//! cases the same way are written out.
//!
//! `OUT/{name}/summary.json` (each candidate's cross-validation), `OUT/ensembles/{a}+{b}/`
//! (the pair's label maps and summary), `OUT/postprocessing/` (`stu postprocess determine` on
//! the winner), `OUT/best_config.json` (all scores, what was skipped and why, the winner) and
//! `OUT/inference_instructions.txt`. A rerun recomputes everything.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

/// A trained model: a name (for folders and the report) and its runs, one per fold.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Letters, digits, `.`, `_` and `-`.
    pub name: String,
    /// Run folders (`stu train --out`), or folders holding them as `fold_K`.
    pub runs: Vec<PathBuf>,
}

/// What to compare.
#[derive(Debug, Clone)]
pub struct Request {
    /// The raw labels (`labelsTr`).
    pub reference: PathBuf,
    /// The raw dataset.json (labels or regions, ignore label).
    pub dataset_json: PathBuf,
    /// At least one.
    pub candidates: Vec<Candidate>,
    /// Output folder.
    pub out: PathBuf,
    /// Also score the pairs' ensembles (nnU-Net's default; `--disable-ensembling` off).
    pub ensembling: bool,
}

/// One scored entry: a candidate or a pair.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// The candidate's name, or `a+b`.
    pub name: String,
    /// The candidates it is made of (one, or two).
    pub members: Vec<String>,
    /// Cross-validation foreground mean Dice (`null` when undefined).
    pub dice: Option<f64>,
    /// Its `summary.json`.
    pub summary: PathBuf,
}

/// The outcome, as `best_config.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Every candidate, in the order given.
    pub candidates: Vec<Entry>,
    /// Every pair that could be ensembled.
    pub ensembles: Vec<Entry>,
    /// Pairs not ensembled, and why.
    pub skipped: Vec<String>,
    /// The winner's name.
    pub best: String,
    /// The post-processing determined on it.
    pub postprocessing: crate::postprocess::Postprocessing,
    /// Cases in the cross-validation.
    pub cases: usize,
}

/// A candidate's validation folders and what they hold.
struct Validations {
    folders: Vec<PathBuf>,
    runs: Vec<PathBuf>,
    /// `--chk best` when its validations come from the best checkpoints.
    best_checkpoint: bool,
}

fn validations(c: &Candidate) -> Result<Validations> {
    ensure!(!c.name.is_empty() && c.name.chars().all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch)), "candidate name `{}`: letters, digits, `.`, `_` and `-` only", c.name);
    ensure!(!c.runs.is_empty(), "candidate `{}`: no runs", c.name);
    let runs = crate::modelzip::expand_model_folders(c.runs.clone())?;
    let (mut folders, mut checkpoints) = (Vec::new(), BTreeSet::new());
    for run in &runs {
        let dir = run.join("validation");
        ensure!(dir.is_dir(), "{}: no validation predictions (`stu train` ends with them on a fold that has validation cases; `stu validate {}` makes them)", run.display(), run.display());
        let maps = std::fs::read_dir(&dir).with_context(|| format!("{}: cannot list", dir.display()))?.filter_map(|e| e.ok()).filter(|e| stu_data::nifti_io::case_of(&e.path()).is_some()).count();
        ensure!(maps > 0, "{}: no predicted label maps (an installed model keeps its validation summary, not its predictions): compare the training runs, or `stu validate` them", dir.display());
        checkpoints.insert(crate::validation::recorded_checkpoint(&dir)?);
        folders.push(dir);
    }
    ensure!(checkpoints.len() == 1, "candidate `{}`: its validations come from different checkpoints ({}); `stu validate` its runs with one", c.name, checkpoints.into_iter().collect::<Vec<_>>().join(", "));
    let best_checkpoint = checkpoints.contains("checkpoint_best.safetensors");
    Ok(Validations { folders, runs, best_checkpoint })
}

/// Case ids of a summary's cases.
fn cases_of(s: &stu_data::metrics::Summary) -> BTreeSet<String> {
    s.metric_per_case.iter().filter_map(|c| stu_data::nifti_io::case_of(&c.prediction_file).map(|(id, _)| id)).collect()
}

/// Whether every case has its probabilities (ours, or nnU-Net's `.npz` of a model it trained
/// with `--npz`) in one of `folders`.
fn has_probabilities(folders: &[PathBuf], cases: &BTreeSet<String>) -> Option<String> {
    cases.iter().find(|id| !folders.iter().any(|f| crate::ensemble::find_probabilities(f, id).is_some())).cloned()
}

fn write_summary(dir: &Path, s: &stu_data::metrics::Summary) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let path = dir.join("summary.json");
    stu_core::fs::write_atomic(&path, crate::cli::nan_safe_json(&serde_json::to_value(s)?)?.as_bytes())?;
    Ok(path)
}

/// A score as the report prints it: four decimals, or `undefined`.
pub fn dice_text(d: Option<f64>) -> String {
    d.map_or("undefined".to_string(), |d| format!("{d:.4}"))
}

fn dice(s: &stu_data::metrics::Summary) -> Option<f64> {
    s.foreground_mean.get("Dice").copied().filter(|d| d.is_finite())
}

/// Runs the comparison (see the module notes).
pub fn find_best(req: &Request) -> Result<Outcome> {
    ensure!(!req.candidates.is_empty(), "no candidates");
    let mut names = BTreeSet::new();
    for c in &req.candidates {
        ensure!(names.insert(&c.name), "candidate `{}` is named twice", c.name);
        ensure!(c.name != "ensembles" && c.name != "postprocessing", "candidate name `{}` is one of the output's own folders", c.name);
    }
    let json = stu_data::dataset::DatasetJson::read(&req.dataset_json)?;
    let scored = stu_data::metrics::Scored::of_dataset(&json);
    let ignore = json.ignore_label.map(|v| v as u16);
    let eval = stu_data::metrics::EvalOptions { ignore_label: ignore, ..Default::default() };
    let vals: Vec<Validations> = req.candidates.iter().map(validations).collect::<Result<_>>()?;

    // Each candidate's cross-validation, on the same cases.
    let mut entries = Vec::new();
    let mut cases: Option<(String, BTreeSet<String>)> = None;
    for (c, v) in req.candidates.iter().zip(&vals) {
        let s = stu_data::metrics::evaluate_scored(&req.reference, &v.folders, &scored, &eval).with_context(|| format!("candidate `{}`", c.name))?;
        let these = cases_of(&s);
        match &cases {
            None => cases = Some((c.name.clone(), these)),
            Some((first, want)) if *want != these => {
                let diff = want.symmetric_difference(&these).next().cloned().unwrap_or_default();
                bail!("candidates `{first}` and `{}` validate different cases (`{diff}` is in one only): compare models trained on the same folds", c.name);
            }
            Some(_) => {}
        }
        let summary = write_summary(&req.out.join(&c.name), &s)?;
        entries.push(Entry { name: c.name.clone(), members: vec![c.name.clone()], dice: dice(&s), summary });
    }
    let (_, cases) = cases.expect("one candidate or more");

    // Every pair with probabilities, ensembled.
    let (mut ensembles, mut skipped) = (Vec::new(), Vec::new());
    if req.ensembling {
        for i in 0..vals.len() {
            for j in i + 1..vals.len() {
                let (a, b) = (&req.candidates[i].name, &req.candidates[j].name);
                let name = format!("{a}+{b}");
                let lacking = [(a, &vals[i]), (b, &vals[j])].into_iter().find_map(|(n, v)| has_probabilities(&v.folders, &cases).map(|id| (n, id)));
                if let Some((n, id)) = lacking {
                    skipped.push(format!("{name}: `{n}` has no probabilities for case `{id}` (train with --validation-probabilities, or `stu validate RUN --probabilities`)"));
                    continue;
                }
                let dir = req.out.join("ensembles").join(&name);
                crate::ensemble::ensemble_members(&[vals[i].folders.clone(), vals[j].folders.clone()], &dir, false).with_context(|| format!("ensemble {name}"))?;
                let s = stu_data::metrics::evaluate_scored(&req.reference, std::slice::from_ref(&dir), &scored, &eval).with_context(|| format!("ensemble {name}"))?;
                let summary = write_summary(&dir, &s)?;
                ensembles.push(Entry { name, members: vec![a.clone(), b.clone()], dice: dice(&s), summary });
            }
        }
    } else if vals.len() > 1 {
        skipped.push("all pairs: ensembling disabled".into());
    }

    // The best (the first of equals), its post-processing, and how to predict with it.
    let mut best = &entries[0];
    for e in entries.iter().chain(&ensembles) {
        if e.dice.unwrap_or(f64::NEG_INFINITY) > best.dice.unwrap_or(f64::NEG_INFINITY) {
            best = e;
        }
    }
    let folders: Vec<PathBuf> = match best.members.as_slice() {
        [_one] => vals[req.candidates.iter().position(|c| c.name == best.name).expect("a candidate")].folders.clone(),
        _ => vec![req.out.join("ensembles").join(&best.name)],
    };
    let best = best.name.clone();
    let pp_dir = req.out.join("postprocessing");
    let pp = crate::postprocess::determine(&req.reference, &folders, &scored, json.regions.is_some(), ignore, &pp_dir)?;
    let outcome = Outcome { candidates: entries, ensembles, skipped, best, postprocessing: pp, cases: cases.len() };
    stu_core::fs::write_atomic(&req.out.join("best_config.json"), crate::cli::nan_safe_json(&serde_json::to_value(&outcome)?)?.as_bytes())?;
    stu_core::fs::write_atomic(&req.out.join("inference_instructions.txt"), instructions(req, &vals, &outcome).as_bytes())?;
    Ok(outcome)
}

/// The commands that predict new cases as the winner did, post-processing included.
fn instructions(req: &Request, vals: &[Validations], o: &Outcome) -> String {
    let pp = req.out.join("postprocessing").join("postprocessing.json");
    let predict = |name: &str, output: &str, probabilities: bool| {
        let v = &vals[req.candidates.iter().position(|c| c.name == name).expect("a candidate")];
        let runs = v.runs.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(" ");
        let chk = if v.best_checkpoint { " --chk best" } else { "" };
        let probs = if probabilities { " --save-probabilities" } else { "" };
        match first_stage(&v.runs) {
            // A cascade's second stage predicts after its first stage's runs.
            Some(first) => {
                let first_out = format!("{output}_first_stage");
                let first = first.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(" ");
                format!("stu predict -i INPUT_FOLDER -o {first_out} --checkpoint {first}\n  stu predict -i INPUT_FOLDER -o {output} --checkpoint {runs}{chk}{probs} --previous-stage {first_out}")
            }
            None => format!("stu predict -i INPUT_FOLDER -o {output} --checkpoint {runs}{chk}{probs}"),
        }
    };
    let entry = o.candidates.iter().chain(&o.ensembles).find(|e| e.name == o.best).expect("the winner is an entry");
    let mut text = format!(
        "Best: {} (cross-validation foreground mean Dice {} over {} case(s); after post-processing {}).\n\nPredict new cases with:\n",
        o.best,
        dice_text(entry.dice),
        o.cases,
        dice_text(Some(o.postprocessing.dice_after).filter(|d| d.is_finite()))
    );
    match entry.members.as_slice() {
        [one] => text += &format!("  {} --postprocessing {}\n", predict(one, "OUTPUT_FOLDER", false), pp.display()),
        members => {
            let outs: Vec<String> = members.iter().map(|m| format!("OUTPUT_FOLDER_{m}")).collect();
            for (m, out) in members.iter().zip(&outs) {
                text += &format!("  {}\n", predict(m, out, true));
            }
            text += &format!("  stu ensemble --pred {} -o OUTPUT_FOLDER_ENSEMBLE\n", outs.join(" "));
            text += &format!("  stu postprocess apply --pp {} -i OUTPUT_FOLDER_ENSEMBLE -o OUTPUT_FOLDER\n", pp.display());
        }
    }
    text
}

/// The first stage's run folders of a cascade's second-stage `runs` (their `train.json`'s
/// `previous_stage`: `RUN/predicted_next_stage/<configuration>` folders, or run folders), in
/// order without repeats; `None` for runs of no cascade.
fn first_stage(runs: &[PathBuf]) -> Option<Vec<PathBuf>> {
    let mut firsts: Vec<PathBuf> = Vec::new();
    for run in runs {
        let cfg: serde_json::Value = std::fs::read(run.join("train.json")).ok().and_then(|b| serde_json::from_slice(&b).ok())?;
        for d in cfg["previous_stage"].as_array()?.iter().filter_map(|d| d.as_str()).map(PathBuf::from) {
            let run = stu_data::cascade::run_of(&d).map_or_else(|| d.clone(), Path::to_path_buf);
            if !firsts.contains(&run) {
                firsts.push(run);
            }
        }
    }
    (!firsts.is_empty()).then_some(firsts)
}
