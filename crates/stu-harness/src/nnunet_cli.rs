//! nnU-Net's own commands, names and flag spellings (`stu nnUNetv2_train 801 3d_fullres 0 -tr
//! STUNetTrainer_base`), over nnU-Net's folders (`nnUNet_raw`, `nnUNet_preprocessed`,
//! `nnUNet_results`): each is translated into the `stu` commands that do the work, which are
//! printed (`→ stu …`) and run in turn. Arguments after `--` go to the last of them unchanged
//! (e.g. `-- --iterations 50`).
//!
//! Layout, as nnU-Net's: `nnUNet_preprocessed/DatasetXXX_Name/{PLANS}.json` (with
//! `dataset_fingerprint.json` and `dataset.json` beside it) and one folder per configuration's
//! `data_identifier`; `nnUNet_results/DatasetXXX_Name/{TRAINER}__{PLANS}__{CONFIG}/fold_K`.
//! Trainers: `nnUNetTrainer` (nnU-Net's network for the plan: PlainConvUNet, or
//! ResidualEncoderUNet for the ResEnc planners' plans), its `_{N}epochs` variants, its loss,
//! optimiser, schedule, deep-supervision and mirroring variants ([`VARIANTS`]), and STU-Net's
//! `STUNetTrainer[_small|_base|_large|_huge][_ft]` (`_ft`: fine-tuning from
//! `-pretrained_weights` at lr 1e-3, STU-Net's recipe).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

/// The commands, with what each takes.
const COMMANDS: &[(&str, &str)] = &[
    ("nnUNetv2_plan_and_preprocess", "-d ID [ID …] [-c 2d 3d_fullres 3d_lowres] [-pl ExperimentPlanner|nnUNetPlannerResEnc{M,L,XL}] [-overwrite_plans_name NAME] [-gpu_memory_target GB] [--verify_dataset_integrity] [--no_pp] [-np N] [-npfp N]"),
    ("nnUNetv2_extract_fingerprint", "-d ID [ID …] [--verify_dataset_integrity] [--clean]  (into $nnUNet_preprocessed/DatasetXXX_Name/dataset_fingerprint.json)"),
    ("nnUNetv2_move_plans_between_datasets", "-s SOURCE -t TARGET -sp SOURCE_PLANS [-tp TARGET_PLANS]  (the source's plans, intensity statistics included, for the target: pre-training and fine-tuning)"),
    ("nnUNetv2_plan_experiment", "-d ID [ID …] [-pl …] [-overwrite_plans_name NAME] [-gpu_memory_target GB]  (the fingerprint is extracted with it)"),
    ("nnUNetv2_preprocess", "-d ID [ID …] [-plans_name nnUNetPlans] [-c 2d 3d_fullres 3d_lowres]"),
    ("nnUNetv2_convert_MSD_dataset", "-i TaskXX_Name [-overwrite_id N]  (into $nnUNet_raw)"),
    ("nnUNetv2_convert_old_nnUNet_dataset", "TASK_FOLDER DatasetXXX_Name  (into $nnUNet_raw)"),
    ("nnUNetv2_plot_overlay_pngs", "-d DATASET -o OUT"),
    ("nnUNetv2_accumulate_crossval_results", "-d DATASET -c CONFIG [-tr nnUNetTrainer] [-p nnUNetPlans] [-f 0 1 2 3 4] [-o OUT]"),
    ("nnUNetv2_train", "DATASET CONFIG FOLD [-tr nnUNetTrainer|nnUNetTrainerCELoss|nnUNetTrainerAdam|…|STUNetTrainer_base|…] [-p nnUNetPlans] [-pretrained_weights F] [--npz] [--c] [--val] [--val_best] [-num_gpus N] [-device cpu|cuda]"),
    ("nnUNetv2_predict", "-i IN -o OUT -d DATASET -c CONFIG [-p nnUNetPlans] [-tr nnUNetTrainer] [-f 0 1 2 3 4] [-step_size 0.5] [--disable_tta] [--save_probabilities (.npz + .pkl)] [--continue_prediction] [-chk checkpoint_final.pth|checkpoint_best.pth] [-prev_stage_predictions DIR] [-num_parts N -part_id K] [-device cpu|cuda]"),
    ("nnUNetv2_predict_from_modelfolder", "-i IN -o OUT -m MODEL_FOLDER [-f 0 1 2 3 4] and nnUNetv2_predict's other options"),
    ("nnUNetv2_evaluate_folder", "GT_FOLDER PRED_FOLDER -djfile dataset.json [-pfile plans.json] [-o PRED_FOLDER/summary.json]"),
    ("nnUNetv2_evaluate_simple", "GT_FOLDER PRED_FOLDER -l LABEL [LABEL …] [-il IGNORE] [-o PRED_FOLDER/summary.json]"),
    ("nnUNetv2_ensemble", "-i FOLDER FOLDER [FOLDER …] -o OUT [--save_npz]"),
    ("nnUNetv2_find_best_configuration", "DATASET [-p nnUNetPlans …] [-c 2d 3d_fullres 3d_lowres 3d_cascade_fullres] [-tr nnUNetTrainer …] [-f 0 1 2 3 4] [--disable_ensembling]"),
    ("nnUNetv2_determine_postprocessing", "-i PRED_FOLDER -ref GT_FOLDER [-dataset_json PRED_FOLDER/dataset.json] [-plans_json F]  (writes PRED_FOLDER/postprocessing.json)"),
    ("nnUNetv2_apply_postprocessing", "-i IN -o OUT -pp_pkl_file postprocessing.json (ours; nnU-Net's pickle is not read)"),
    ("nnUNetv2_export_model_to_zip", "-d DATASET -o M.zip [-c 3d_fullres] [-tr nnUNetTrainer] [-p nnUNetPlans] [-f 0 1 2 3 4] [-chk checkpoint_final.pth]"),
    ("nnUNetv2_install_pretrained_model_from_zip", "M.zip  (a `stu export-model` zip, into $nnUNet_results)"),
];

/// How many values a flag takes.
#[derive(Clone, Copy, PartialEq)]
enum Arity {
    Switch,
    One,
    Many,
}
use Arity::{Many, One, Switch};

/// Flags nnU-Net has that change nothing here (process counts, logging, file handles).
const IGNORED: &[&str] = &["-np", "-npfp", "-npp", "-nps", "--verbose", "--use_compressed", "--clean", "--no_overwrite"];

/// One command's arguments: positionals, flag values, and what came after `--`.
#[derive(Debug, Default)]
struct Parsed {
    positional: Vec<String>,
    flags: BTreeMap<String, Vec<String>>,
    rest: Vec<String>,
}

impl Parsed {
    fn one(&self, flag: &str) -> Option<&str> {
        self.flags.get(flag).and_then(|v| v.first()).map(String::as_str)
    }

    fn many(&self, flag: &str) -> Option<&[String]> {
        self.flags.get(flag).map(Vec::as_slice)
    }

    fn has(&self, flag: &str) -> bool {
        self.flags.contains_key(flag)
    }

    fn required(&self, cmd: &str, flag: &str) -> Result<&str> {
        self.one(flag).with_context(|| format!("{cmd}: {flag} is required ({})", usage(cmd)))
    }
}

fn usage(cmd: &str) -> String {
    COMMANDS.iter().find(|(c, _)| *c == cmd).map_or_else(String::new, |(c, u)| format!("usage: stu {c} {u}"))
}

/// Parses `args` against `spec` (nnU-Net's argparse flags, single dash for most).
fn parse(cmd: &str, args: &[String], spec: &[(&str, Arity)]) -> Result<Parsed> {
    let mut p = Parsed::default();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        if a == "--" {
            p.rest = it.cloned().collect();
            break;
        }
        if !a.starts_with('-') || a.parse::<f64>().is_ok() {
            p.positional.push(a.clone());
            continue;
        }
        let arity = match spec.iter().find(|(f, _)| f == a) {
            Some(&(_, arity)) => arity,
            None if IGNORED.contains(&a.as_str()) => {
                // Its value, if any, goes with it.
                while it.peek().is_some_and(|v| !v.starts_with('-')) {
                    it.next();
                }
                continue;
            }
            None => {
                let known: Vec<&str> = spec.iter().map(|(f, _)| *f).collect();
                bail!("{cmd}: unknown option `{a}`; known: {} ({})", known.join(" "), usage(cmd));
            }
        };
        let values = p.flags.entry(a.clone()).or_default();
        match arity {
            Switch => {}
            One => values.push(it.next().filter(|v| !v.starts_with("--")).with_context(|| format!("{cmd}: {a} needs a value"))?.clone()),
            Many => {
                while let Some(v) = it.next_if(|v| !v.starts_with('-') || v.parse::<f64>().is_ok()) {
                    values.push(v.clone());
                }
                ensure!(!values.is_empty(), "{cmd}: {a} needs one value or more");
            }
        }
    }
    Ok(p)
}

/// Whether `args` (without the program name) name one of nnU-Net's commands; runs it.
pub fn dispatch(args: &[String]) -> Option<Result<()>> {
    let cmd = args.first()?;
    if !cmd.starts_with("nnUNetv2_") && cmd != "nnUNetv2" {
        return None;
    }
    let rest = &args[1..];
    if rest.iter().any(|a| a == "-h" || a == "--help") || cmd == "nnUNetv2" {
        let list: Vec<String> = COMMANDS.iter().filter(|(c, _)| cmd == "nnUNetv2" || c == cmd).map(|(c, u)| format!("stu {c} {u}")).collect();
        println!("nnU-Net's commands over $nnUNet_raw, $nnUNet_preprocessed and $nnUNet_results (arguments after `--` go to the stu command doing the work):\n{}", list.join("\n"));
        return Some(Ok(()));
    }
    Some(match cmd.as_str() {
        "nnUNetv2_plan_and_preprocess" | "nnUNetv2_plan_experiment" | "nnUNetv2_preprocess" => plan_and_preprocess(cmd, rest),
        "nnUNetv2_extract_fingerprint" => extract_fingerprint(cmd, rest),
        "nnUNetv2_move_plans_between_datasets" => move_plans(cmd, rest),
        "nnUNetv2_download_pretrained_model_by_url" => Err(anyhow::anyhow!("{cmd}: nothing is downloaded at run time here; fetch the zip where there is a network, then `stu nnUNetv2_install_pretrained_model_from_zip FILE.zip`")),
        "nnUNetv2_convert_MSD_dataset" | "nnUNetv2_convert_old_nnUNet_dataset" => convert(cmd, rest),
        "nnUNetv2_plot_overlay_pngs" => overlay(cmd, rest),
        "nnUNetv2_accumulate_crossval_results" => accumulate(cmd, rest),
        "nnUNetv2_train" => train(cmd, rest),
        "nnUNetv2_predict" | "nnUNetv2_predict_from_modelfolder" => predict(cmd, rest),
        "nnUNetv2_evaluate_folder" | "nnUNetv2_evaluate_simple" => evaluate(cmd, rest),
        "nnUNetv2_ensemble" => ensemble(cmd, rest),
        "nnUNetv2_find_best_configuration" => find_best(cmd, rest),
        "nnUNetv2_determine_postprocessing" => determine_postprocessing(cmd, rest),
        "nnUNetv2_apply_postprocessing" => apply_postprocessing(cmd, rest),
        "nnUNetv2_export_model_to_zip" => export_zip(cmd, rest),
        "nnUNetv2_install_pretrained_model_from_zip" => install_zip(cmd, rest),
        other => {
            let names: Vec<&str> = COMMANDS.iter().map(|(c, _)| *c).collect();
            Err(anyhow::anyhow!("`{other}` is not one of the nnU-Net commands stu takes: {}", names.join(", ")))
        }
    })
}

/// Runs one translated `stu` command, printing it first.
fn stu(args: Vec<String>) -> Result<()> {
    eprintln!("→ stu {}", args.iter().map(|a| if a.contains(' ') || a.is_empty() { format!("'{a}'") } else { a.clone() }).collect::<Vec<_>>().join(" "));
    crate::cli::run_args(args)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// One of nnU-Net's folder variables.
fn env_dir(name: &str) -> Result<PathBuf> {
    match std::env::var_os(name) {
        Some(v) if !v.is_empty() => Ok(PathBuf::from(v)),
        _ => bail!("{name} is not set: nnU-Net's commands find their data through nnUNet_raw, nnUNet_preprocessed and nnUNet_results"),
    }
}

/// nnU-Net's `maybe_convert_to_dataset_name`: `801` or `Dataset801_Name` → `Dataset801_Name`,
/// looked up in the folders of those variables that are set.
fn dataset_name(id: &str) -> Result<String> {
    if id.starts_with("Dataset") {
        return Ok(id.to_string());
    }
    let n: u32 = id.parse().with_context(|| format!("dataset `{id}`: a number (801) or a name (Dataset801_Name)"))?;
    let prefix = format!("Dataset{n:03}_");
    let mut found = std::collections::BTreeSet::new();
    for var in ["nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"] {
        let Ok(dir) = env_dir(var) else { continue };
        if let Ok(entries) = std::fs::read_dir(&dir) {
            found.extend(entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with(&prefix)));
        }
    }
    match found.len() {
        1 => Ok(found.pop_first().expect("one")),
        0 => bail!("dataset {id}: no {prefix}* folder in nnUNet_raw, nnUNet_preprocessed or nnUNet_results"),
        _ => bail!("dataset {id}: several folders: {}", found.into_iter().collect::<Vec<_>>().join(", ")),
    }
}

/// The plans and preprocessed folder of configuration `config` under `pre` (the dataset's
/// preprocessed folder), as nnU-Net's `data_identifier` names it.
fn plans_and_data(pre: &Path, plans_name: &str, config: &str) -> Result<(PathBuf, serde_json::Value, PathBuf)> {
    let path = pre.join(format!("{plans_name}.json"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read (run nnUNetv2_plan_and_preprocess first)", path.display()))?;
    let plans: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let c = stu_data::plan::configuration(&plans, config).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let id = c["data_identifier"].as_str().with_context(|| format!("{}: configuration {config} has no data_identifier", path.display()))?;
    Ok((path, plans, pre.join(id)))
}

/// `-pl` → our planner preset and nnU-Net's plans name.
fn planner(name: &str) -> Result<(&'static str, &'static str)> {
    Ok(match name {
        "ExperimentPlanner" => ("nnunet", "nnUNetPlans"),
        "nnUNetPlannerResEncM" => ("resenc-m", "nnUNetResEncUNetMPlans"),
        "nnUNetPlannerResEncL" => ("resenc-l", "nnUNetResEncUNetLPlans"),
        "nnUNetPlannerResEncXL" => ("resenc-xl", "nnUNetResEncUNetXLPlans"),
        other => bail!("-pl {other}: the planners are ExperimentPlanner, nnUNetPlannerResEncM, nnUNetPlannerResEncL and nnUNetPlannerResEncXL"),
    })
}

/// `nnUNetv2_plan_and_preprocess`, or one of its halves (`_plan_experiment`, `_preprocess`).
fn plan_and_preprocess(cmd: &str, args: &[String]) -> Result<()> {
    let (plan_step, pp_step) = match cmd {
        "nnUNetv2_plan_experiment" => (true, false),
        "nnUNetv2_preprocess" => (false, true),
        _ => (true, true),
    };
    let mut spec = vec![("-d", Many), ("-fpe", One), ("-preprocessor_name", One), ("--verify_dataset_integrity", Switch)];
    if plan_step {
        spec.extend([("-pl", One), ("-overwrite_plans_name", One), ("-gpu_memory_target", One)]);
    }
    if pp_step {
        spec.push(("-c", Many));
    }
    if plan_step && pp_step {
        spec.push(("--no_pp", Switch));
    }
    if !plan_step {
        spec.push(("-plans_name", One));
    }
    let p = parse(cmd, args, &spec)?;
    ensure!(p.positional.is_empty(), "{cmd}: unexpected `{}` ({})", p.positional.join(" "), usage(cmd));
    ensure!(p.rest.is_empty(), "{cmd}: nothing goes after `--` here");
    let ids = p.many("-d").with_context(|| format!("{cmd}: -d is required ({})", usage(cmd)))?;
    if let Some(f) = p.one("-fpe").filter(|f| *f != "DatasetFingerprintExtractor") {
        bail!("-fpe {f}: only DatasetFingerprintExtractor");
    }
    if let Some(f) = p.one("-preprocessor_name").filter(|f| *f != "DefaultPreprocessor") {
        bail!("-preprocessor_name {f}: only DefaultPreprocessor");
    }
    let (preset, default_name) = planner(p.one("-pl").unwrap_or("ExperimentPlanner"))?;
    let plans_name = p.one("-overwrite_plans_name").or(p.one("-plans_name")).unwrap_or(default_name);
    // nnU-Net's default configurations.
    let configs: Vec<String> = p.many("-c").map_or_else(|| vec!["2d".into(), "3d_fullres".into(), "3d_lowres".into()], <[String]>::to_vec);
    let (raw_root, pre_root) = (env_dir("nnUNet_raw")?, env_dir("nnUNet_preprocessed")?);
    for id in ids {
        let name = dataset_name(id)?;
        let (raw, pre) = (raw_root.join(&name), pre_root.join(&name));
        ensure!(raw.join("dataset.json").is_file(), "{}: no dataset.json (nnUNet_raw/{name})", raw.display());
        if p.has("--verify_dataset_integrity") {
            stu(vec!["dataset".into(), "check".into(), s(&raw)])?;
        }
        let plans = pre.join(format!("{plans_name}.json"));
        if plan_step {
            let mut plan = vec!["plan".into(), s(&raw), "--out".into(), s(&plans), "--preset".into(), preset.into()];
            if let Some(g) = p.one("-gpu_memory_target") {
                plan.extend(["--gpu-memory-gb".into(), g.into()]);
            }
            stu(plan)?;
            if plans_name != default_name {
                rename_plans(&plans, default_name, plans_name)?;
            }
            stu_core::fs::write_atomic(&pre.join("dataset.json"), &std::fs::read(raw.join("dataset.json"))?)?;
        }
        if !pp_step || p.has("--no_pp") {
            continue;
        }
        ensure!(plans.is_file(), "{}: no plans (run nnUNetv2_plan_experiment first)", plans.display());
        let planned: serde_json::Value = serde_json::from_slice(&std::fs::read(&plans)?).with_context(|| format!("{}: not JSON", plans.display()))?;
        for c in &configs {
            if planned["configurations"].get(c.as_str()).is_none() {
                // As nnU-Net, which skips a configuration its planner did not make (3d_lowres).
                eprintln!("{name}: configuration {c} not in {} (the planner made none); skipped", plans.display());
                continue;
            }
            let (plans, _, data) = plans_and_data(&pre, plans_name, c)?;
            stu(vec!["preprocess".into(), s(&raw), "--plans".into(), s(&plans), "--configuration".into(), c.clone(), "--out".into(), s(&data)])?;
        }
    }
    Ok(())
}

/// `-overwrite_plans_name`: the plans' name, and the data identifiers derived from it (nnU-Net's
/// `{plans}_{configuration}`; a ResEnc planner's 3d_fullres keeps `nnUNetPlans_3d_fullres`,
/// which it shares with the default plans, as in nnU-Net).
fn rename_plans(path: &Path, from: &str, to: &str) -> Result<()> {
    let mut plans: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?).with_context(|| format!("{}: not JSON", path.display()))?;
    plans["plans_name"] = to.into();
    if let Some(configs) = plans["configurations"].as_object_mut() {
        for c in configs.values_mut() {
            if let Some(id) = c["data_identifier"].as_str().and_then(|id| id.strip_prefix(&format!("{from}_"))) {
                c["data_identifier"] = format!("{to}_{id}").into();
            }
        }
    }
    stu_core::fs::write_atomic(path, (serde_json::to_string_pretty(&plans)? + "\n").as_bytes())?;
    Ok(())
}

/// `nnUNetv2_extract_fingerprint`: `stu fingerprint` of each dataset into its preprocessed
/// folder; an existing fingerprint is kept unless `--clean`, as nnU-Net does.
fn extract_fingerprint(cmd: &str, args: &[String]) -> Result<()> {
    let p = parse(cmd, args, &[("-d", Many), ("-fpe", One), ("--verify_dataset_integrity", Switch), ("--clean", Switch)])?;
    ensure!(p.positional.is_empty() && p.rest.is_empty(), "{cmd}: unexpected arguments ({})", usage(cmd));
    if let Some(f) = p.one("-fpe").filter(|f| *f != "DatasetFingerprintExtractor") {
        bail!("-fpe {f}: only DatasetFingerprintExtractor");
    }
    let ids = p.many("-d").with_context(|| format!("{cmd}: -d is required ({})", usage(cmd)))?;
    let (raw_root, pre_root) = (env_dir("nnUNet_raw")?, env_dir("nnUNet_preprocessed")?);
    for id in ids {
        let name = dataset_name(id)?;
        let raw = raw_root.join(&name);
        ensure!(raw.join("dataset.json").is_file(), "{}: no dataset.json (nnUNet_raw/{name})", raw.display());
        if p.has("--verify_dataset_integrity") {
            stu(vec!["dataset".into(), "check".into(), s(&raw)])?;
        }
        let out = pre_root.join(&name).join("dataset_fingerprint.json");
        if out.is_file() && !p.has("--clean") {
            eprintln!("{name}: {} exists; kept (--clean recomputes it)", out.display());
            continue;
        }
        stu(vec!["fingerprint".into(), s(&raw), "--out".into(), s(&out)])?;
    }
    Ok(())
}

/// `nnUNetv2_move_plans_between_datasets`: the source dataset's plans file, written for the
/// target (nnU-Net's pre-training recipe: the target is then preprocessed and trained with the
/// source's spacing, patch, network and CT intensity statistics, so that a source model's
/// weights fit). As nnU-Net: `dataset_name` becomes the target's, and under another plans name
/// `plans_name` and every `data_identifier` take it (`SRC_3d_fullres` → `TGT_3d_fullres`,
/// anything else prefixed).
fn move_plans(cmd: &str, args: &[String]) -> Result<()> {
    let p = parse(cmd, args, &[("-s", One), ("-t", One), ("-sp", One), ("-tp", One)])?;
    ensure!(p.positional.is_empty() && p.rest.is_empty(), "{cmd}: unexpected arguments ({})", usage(cmd));
    let (source, target) = (dataset_name(p.required(cmd, "-s")?)?, dataset_name(p.required(cmd, "-t")?)?);
    let source_plans = p.required(cmd, "-sp")?;
    let target_plans = p.one("-tp").unwrap_or(source_plans);
    let pre_root = env_dir("nnUNet_preprocessed")?;
    let from = pre_root.join(&source).join(format!("{source_plans}.json"));
    let text = std::fs::read_to_string(&from).with_context(|| format!("{}: cannot read the source plans", from.display()))?;
    let mut plans: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", from.display()))?;
    ensure!(plans.get("configurations").is_some_and(|c| c.is_object()), "{}: no `configurations`", from.display());
    let raw = env_dir("nnUNet_raw")?.join(&target);
    ensure!(raw.join("dataset.json").is_file(), "{}: no dataset.json (the target's raw dataset, nnUNet_raw/{target})", raw.display());
    plans["dataset_name"] = target.clone().into();
    if target_plans != source_plans {
        for c in plans["configurations"].as_object_mut().expect("checked").values_mut() {
            if let Some(id) = c.get("data_identifier").and_then(|v| v.as_str()) {
                let renamed = match id.strip_prefix(source_plans) {
                    Some(rest) => format!("{target_plans}{rest}"),
                    None => format!("{target_plans}_{id}"),
                };
                c["data_identifier"] = renamed.into();
            }
        }
    }
    plans["plans_name"] = target_plans.into();
    // (Our readers take every file ending SimpleITK does.)
    plans["image_reader_writer"] = "SimpleITKIO".into();
    let to = pre_root.join(&target).join(format!("{target_plans}.json"));
    std::fs::create_dir_all(to.parent().expect("a folder")).with_context(|| format!("{}: cannot create", to.display()))?;
    stu_core::fs::write_atomic(&to, (serde_json::to_string_pretty(&plans)? + "\n").as_bytes()).with_context(|| format!("{}: cannot write", to.display()))?;
    eprintln!("{source}/{source_plans}.json → {}", to.display());
    Ok(())
}

/// What `-tr` means here: the model arguments of `stu train`, and whether it fine-tunes.
#[derive(Debug, PartialEq)]
struct Trainer {
    /// `--model`, `--preset` (STU-Net's sizes).
    model: Option<&'static str>,
    preset: Option<&'static str>,
    epochs: Option<usize>,
    /// `_ft`: fine-tuning (needs -pretrained_weights; lr 1e-3).
    finetune: bool,
    /// What a trainer variant changes (`stu train` flags: `--loss ce`, `--optimizer adamw`, …).
    variant: Vec<&'static str>,
    /// The variant's initial learning rate (`nnUNetTrainerAdam1en3`: 1e-3).
    lr: Option<&'static str>,
}

/// nnU-Net's trainer variants (`nnunetv2/training/nnUNetTrainer/variants`) that `stu train`
/// runs: name, flags, initial learning rate.
const VARIANTS: [(&str, &[&str], Option<&str>); 25] = [
    ("nnUNetTrainerCELoss", &["--loss", "ce"], None),
    ("nnUNetTrainerDiceLoss", &["--loss", "dice"], None),
    ("nnUNetTrainerTopk10Loss", &["--loss", "topk10"], None),
    ("nnUNetTrainerDiceTopK10Loss", &["--loss", "dice_topk10"], None),
    ("nnUNetTrainerDiceCELoss_noSmooth", &["--loss", "dice_ce_nosmooth"], None),
    ("nnUNetTrainerTopk10LossLS01", &["--loss", "topk10_ls01"], None),
    ("nnUNetTrainerNoDeepSupervision", &["--no-deep-supervision"], None),
    ("nnUNetTrainerAdam", &["--optimizer", "adamw"], None),
    ("nnUNetTrainerAdam1en3", &["--optimizer", "adamw"], Some("1e-3")),
    ("nnUNetTrainerAdam3en4", &["--optimizer", "adamw"], Some("3e-4")),
    ("nnUNetTrainerVanillaAdam", &["--optimizer", "adam"], None),
    ("nnUNetTrainerVanillaAdam1en3", &["--optimizer", "adam"], Some("1e-3")),
    ("nnUNetTrainerVanillaAdam3en4", &["--optimizer", "adam"], Some("3e-4")),
    ("nnUNetTrainerCosAnneal", &["--lr-schedule", "cosine"], None),
    ("nnUNetTrainer_warmup", &["--lr-schedule", "warmup"], None),
    ("nnUNetTrainerNoMirroring", &["--no-mirroring"], None),
    ("nnUNetTrainer_onlyMirror01", &["--mirror-axes", "0,1"], None),
    // No augmentation, and so no mirroring at inference either.
    ("nnUNetTrainerNoDA", &["--no-augmentation", "--no-mirroring"], None),
    ("nnUNetTrainer_DASegOrd0", &["--seg-interpolation", "nearest"], None),
    ("nnUNetTrainer_DASegOrd0_NoMirroring", &["--seg-interpolation", "nearest", "--no-mirroring"], None),
    ("nnUNetTrainer_noDummy2DDA", &["--no-dummy-2d"], None),
    ("nnUNetTrainer_probabilisticOversampling", &["--probabilistic-oversampling"], None),
    ("nnUNetTrainer_probabilisticOversampling_033", &["--probabilistic-oversampling", "--oversample-foreground", "0.33"], None),
    ("nnUNetTrainer_probabilisticOversampling_010", &["--probabilistic-oversampling", "--oversample-foreground", "0.1"], None),
    ("nnUNetTrainer", &[], None),
];

/// The trainer named `name` for a plan of nnU-Net's ResEnc planners (`resenc_plan`) or not, and
/// of a 2-D configuration (`two_d`) or a 3-D one.
fn trainer(name: &str, resenc_plan: bool, two_d: bool) -> Result<Trainer> {
    let nnunet = if resenc_plan { "nnunet-resenc" } else { "nnunet-plainconv" };
    let plain = |variant: &[&'static str], lr, epochs| Trainer { model: Some(nnunet), preset: None, epochs, finetune: false, variant: variant.to_vec(), lr };
    if name == "nnUNetTrainer_onlyMirror01" && two_d {
        // In 2-D, nnU-Net's onlyMirror01 mirrors the first in-plane axis only.
        return Ok(plain(&["--mirror-axes", "0"], None, None));
    }
    if let Some((_, v, lr)) = VARIANTS.iter().find(|(n, ..)| *n == name) {
        return Ok(plain(v, *lr, None));
    }
    // `nnUNetTrainer_<N>epochs`, `nnUNetTrainer_<N>epochs_NoMirroring`, `nnUNetTrainerCELoss_5epochs`.
    let (rest, no_mirroring) = name.strip_suffix("_NoMirroring").map_or((name, false), |r| (r, true));
    if let Some((base, e)) = rest.rsplit_once('_').and_then(|(b, r)| Some((b, r.strip_suffix("epochs").or_else(|| r.strip_suffix("epoch"))?))) {
        let known = if no_mirroring { base == "nnUNetTrainer" } else { base == "nnUNetTrainer" || base == "nnUNetTrainerCELoss" };
        if known {
            let epochs: usize = e.parse().with_context(|| format!("-tr {name}: {base}_<N>epochs"))?;
            ensure!(epochs > 0, "-tr {name}: at least one epoch");
            let (_, v, lr) = VARIANTS.iter().find(|(n, ..)| *n == base).expect("listed");
            let v: Vec<&'static str> = if no_mirroring { vec!["--no-mirroring"] } else { v.to_vec() };
            return Ok(plain(&v, *lr, Some(epochs)));
        }
    }
    if let Some(rest) = name.strip_prefix("STUNetTrainer") {
        let (rest, finetune) = rest.strip_suffix("_ft").map_or((rest, false), |r| (r, true));
        let (size, epochs) = match rest.rsplit_once("_ep") {
            Some((size, "2k")) => (size, Some(2000)),
            Some((size, "4k")) => (size, Some(4000)),
            _ => (rest, None),
        };
        let preset = match size {
            "" | "_base" => "stunet-b",
            "_small" => "stunet-s",
            "_large" => "stunet-l",
            "_huge" => "stunet-h",
            _ => bail!("-tr {name}: STU-Net's trainers are STUNetTrainer_small|base|large|huge, with _ft for fine-tuning"),
        };
        return Ok(Trainer { model: Some("stunet"), preset: Some(preset), epochs, finetune, variant: Vec::new(), lr: None });
    }
    bail!(
        "-tr {name}: the trainers are nnUNetTrainer (and nnUNetTrainer_<N>epochs[_NoMirroring]), its variants {}, and STUNetTrainer_small|base|large|huge[_ft]",
        VARIANTS[..VARIANTS.len() - 1].iter().map(|(n, ..)| *n).collect::<Vec<_>>().join(", ")
    )
}

/// `-device` → `--backend`.
fn backend(device: Option<&str>) -> Result<Option<&'static str>> {
    Ok(match device {
        None | Some("cpu") => None,
        Some("cuda") => Some("tch-cuda"),
        Some(other) => bail!("-device {other}: cpu or cuda (a `--features tch` build with CUDA's libtorch, README)"),
    })
}

fn train(cmd: &str, args: &[String]) -> Result<()> {
    let p = parse(cmd, args, &[("-tr", One), ("-p", One), ("-pretrained_weights", One), ("-num_gpus", One), ("--npz", Switch), ("--c", Switch), ("--val", Switch), ("--val_best", Switch), ("--disable_checkpointing", Switch), ("-device", One)])?;
    let [dataset, config, fold] = <[String; 3]>::try_from(p.positional.clone()).map_err(|_| anyhow::anyhow!("{cmd}: DATASET CONFIG FOLD ({})", usage(cmd)))?;
    ensure!(!p.has("--disable_checkpointing"), "--disable_checkpointing: checkpoints are always written here (they make runs resumable)");
    ensure!(fold == "all" || fold.parse::<usize>().is_ok(), "{cmd}: fold `{fold}`: a number or `all`");
    let name = dataset_name(&dataset)?;
    let (pre, results) = (env_dir("nnUNet_preprocessed")?.join(&name), env_dir("nnUNet_results")?.join(&name));
    let (tr, plans_name) = (p.one("-tr").unwrap_or("nnUNetTrainer"), p.one("-p").unwrap_or("nnUNetPlans"));
    let (_, plans, data) = plans_and_data(&pre, plans_name, &config)?;
    let model_dir = results.join(format!("{tr}__{plans_name}__{config}"));
    let run = model_dir.join(format!("fold_{fold}"));
    let backend = backend(p.one("-device"))?;
    if p.has("--val") {
        let mut v = vec!["validate".into(), s(&run)];
        if p.has("--val_best") {
            v.extend(["--checkpoint".into(), "best".into()]);
        }
        if p.has("--npz") {
            v.push("--npz".into());
        }
        if let Some(b) = backend {
            v.extend(["--backend".into(), b.into()]);
        }
        v.extend(p.rest.iter().cloned());
        return stu(v);
    }
    let resenc = crate::train::plan_network(&data, &config).is_some_and(|n| n.ends_with("ResidualEncoderUNet"));
    let t = trainer(tr, resenc, crate::train::plan_is_2d(&data, &config))?;
    let mut a = vec!["train".into(), s(&data), "--out".into(), s(&run), "--fold".into(), fold, "--configuration".into(), config.clone()];
    // Model size from the passed-through options, if any, instead of the preset.
    let sized = p.rest.iter().any(|r| ["--model-options", "--blocks", "--base-width", "--preset"].contains(&r.as_str()));
    if let Some(m) = t.model.filter(|_| !p.rest.iter().any(|r| r == "--model")) {
        a.extend(["--model".into(), m.into()]);
    }
    if let Some(preset) = t.preset.filter(|_| !sized) {
        a.extend(["--preset".into(), preset.into()]);
    }
    if let Some(e) = t.epochs {
        a.extend(["--epochs".into(), e.to_string()]);
    }
    a.extend(t.variant.iter().map(|v| v.to_string()));
    match (p.one("-pretrained_weights"), t.finetune) {
        (Some(w), ft) => {
            // nnU-Net keeps its trainer's lr (1e-2) with -pretrained_weights; STU-Net's _ft trainers use 1e-3.
            a.extend(["--init-from".into(), w.into(), "--lr".into(), if ft { "1e-3" } else { t.lr.unwrap_or("1e-2") }.into()]);
        }
        (None, true) => bail!("-tr {tr}: a fine-tuning trainer needs -pretrained_weights (a released STU-Net checkpoint)"),
        (None, false) => a.extend(t.lr.iter().flat_map(|lr| ["--lr".to_string(), lr.to_string()])),
    }
    if let Some(prev) = plans["configurations"][config.as_str()]["previous_stage"].as_str() {
        // The cascade's second stage: the first stage's folds (their predicted_next_stage).
        let first = results.join(format!("{tr}__{plans_name}__{prev}"));
        let mut folds: Vec<PathBuf> = std::fs::read_dir(&first).map(|e| e.filter_map(|e| Some(e.ok()?.path())).filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("fold_"))).collect()).unwrap_or_default();
        ensure!(!folds.is_empty(), "{config}: train its previous stage first ({}: no fold_K)", first.display());
        folds.sort();
        a.push("--previous-stage".into());
        a.extend(folds.iter().map(|f| s(f)));
    }
    if p.has("--c") {
        a.push("--resume".into());
    }
    if p.has("--npz") {
        a.push("--npz".into());
    }
    if let Some(n) = p.one("-num_gpus") {
        a.extend(["--nproc".into(), n.into()]);
    }
    if let Some(b) = backend {
        a.extend(["--backend".into(), b.into()]);
    }
    a.extend(p.rest.iter().cloned());
    std::fs::create_dir_all(&model_dir).with_context(|| format!("{}: cannot create", model_dir.display()))?;
    // As nnU-Net's model folder: its plans, dataset.json and fingerprint beside the folds.
    for (from, to) in [(format!("{plans_name}.json"), "plans.json"), ("dataset.json".into(), "dataset.json"), ("dataset_fingerprint.json".into(), "dataset_fingerprint.json")] {
        if let Ok(bytes) = std::fs::read(pre.join(&from)) {
            stu_core::fs::write_atomic(&model_dir.join(to), &bytes)?;
        }
    }
    stu(a)
}

/// `-f` (default 0…4) as fold folders of `model`.
fn folds(p: &Parsed, model: &Path) -> Vec<PathBuf> {
    let five: Vec<String> = (0..5).map(|f| f.to_string()).collect();
    p.many("-f").unwrap_or(&five).iter().map(|f| model.join(format!("fold_{f}"))).collect()
}

fn predict(cmd: &str, args: &[String]) -> Result<()> {
    let mut spec = vec![("-i", One), ("-o", One), ("-f", Many), ("-step_size", One), ("--disable_tta", Switch), ("--save_probabilities", Switch), ("--continue_prediction", Switch), ("-chk", One), ("-prev_stage_predictions", One), ("-num_parts", One), ("-part_id", One), ("-device", One)];
    let from_folder = cmd == "nnUNetv2_predict_from_modelfolder";
    if from_folder {
        spec.push(("-m", One));
    } else {
        spec.extend([("-d", One), ("-c", One), ("-p", One), ("-tr", One)]);
    }
    let p = parse(cmd, args, &spec)?;
    ensure!(p.positional.is_empty(), "{cmd}: unexpected `{}` ({})", p.positional.join(" "), usage(cmd));
    let (input, output) = (p.required(cmd, "-i")?, p.required(cmd, "-o")?);
    let (model, config) = if from_folder {
        (PathBuf::from(p.required(cmd, "-m")?), None)
    } else {
        let name = dataset_name(p.required(cmd, "-d")?)?;
        let config = p.required(cmd, "-c")?;
        let dir = env_dir("nnUNet_results")?.join(name).join(format!("{}__{}__{config}", p.one("-tr").unwrap_or("nnUNetTrainer"), p.one("-p").unwrap_or("nnUNetPlans")));
        (dir, Some(config.to_string()))
    };
    ensure!(model.is_dir(), "{}: no such model folder (train it with nnUNetv2_train first)", model.display());
    let mut a = vec!["predict".into(), "-i".into(), input.into(), "-o".into(), output.into(), "--checkpoint".into()];
    a.extend(folds(&p, &model).iter().map(|f| s(f)));
    if let Some(c) = config {
        a.extend(["--configuration".into(), c]);
    }
    match p.one("-chk") {
        None | Some("checkpoint_final.pth") => {}
        Some("checkpoint_best.pth") => a.extend(["--chk".into(), "best".into()]),
        Some(other) => bail!("-chk {other}: checkpoint_final.pth or checkpoint_best.pth"),
    }
    for (flag, ours) in [("-step_size", "--step"), ("-prev_stage_predictions", "--previous-stage"), ("-num_parts", "--num-parts"), ("-part_id", "--part-id")] {
        if let Some(v) = p.one(flag) {
            a.extend([ours.into(), v.into()]);
        }
    }
    for (flag, ours) in [("--disable_tta", "--disable-tta"), ("--save_probabilities", "--npz"), ("--continue_prediction", "--continue-prediction")] {
        if p.has(flag) {
            a.push(ours.into());
        }
    }
    if let Some(b) = backend(p.one("-device"))? {
        a.extend(["--backend".into(), b.into()]);
    }
    a.extend(p.rest.iter().cloned());
    stu(a)
}

/// The folder of `-o` (nnU-Net names the summary file; it is always `summary.json` here).
fn summary_folder(o: &str) -> Result<String> {
    let path = Path::new(o);
    ensure!(path.file_name().is_some_and(|n| n == "summary.json"), "-o {o}: the summary is written as summary.json (and summary.csv) in a folder: give -o DIR/summary.json");
    Ok(s(path.parent().unwrap_or(Path::new("."))))
}

fn evaluate(cmd: &str, args: &[String]) -> Result<()> {
    let simple = cmd == "nnUNetv2_evaluate_simple";
    let spec: &[(&str, Arity)] = if simple { &[("-l", Many), ("-il", One), ("-o", One)] } else { &[("-djfile", One), ("-pfile", One), ("-o", One), ("--chill", Switch)] };
    let p = parse(cmd, args, spec)?;
    let [gt, pred] = <[String; 2]>::try_from(p.positional.clone()).map_err(|_| anyhow::anyhow!("{cmd}: GT_FOLDER PRED_FOLDER ({})", usage(cmd)))?;
    ensure!(!p.has("--chill"), "--chill: every reference must have its prediction here");
    let mut a = vec!["evaluate".into(), "--ref".into(), gt, "--pred".into(), pred];
    if simple {
        let labels = p.many("-l").with_context(|| format!("{cmd}: -l is required ({})", usage(cmd)))?;
        a.extend(["--label-list".into(), labels.join(",")]);
        if let Some(il) = p.one("-il") {
            a.extend(["--ignore-label".into(), il.into()]);
        }
    } else {
        a.extend(["--labels".into(), p.required(cmd, "-djfile")?.into()]);
    }
    if let Some(o) = p.one("-o") {
        a.extend(["--out".into(), summary_folder(o)?]);
    }
    a.extend(p.rest.iter().cloned());
    stu(a)
}

fn ensemble(cmd: &str, args: &[String]) -> Result<()> {
    let p = parse(cmd, args, &[("-i", Many), ("-o", One), ("--save_npz", Switch)])?;
    ensure!(p.positional.is_empty(), "{cmd}: unexpected `{}` ({})", p.positional.join(" "), usage(cmd));
    let inputs = p.many("-i").with_context(|| format!("{cmd}: -i is required ({})", usage(cmd)))?;
    let mut a = vec!["ensemble".into(), "--pred".into()];
    a.extend(inputs.iter().cloned());
    a.extend(["-o".into(), p.required(cmd, "-o")?.into()]);
    if p.has("--save_npz") {
        // (Ours: float16 safetensors, which stu ensemble and stu find-best-config read.)
        a.push("--save-probabilities".into());
    }
    stu(a)
}

fn find_best(cmd: &str, args: &[String]) -> Result<()> {
    let p = parse(cmd, args, &[("-p", Many), ("-c", Many), ("-tr", Many), ("-f", Many), ("--disable_ensembling", Switch)])?;
    let [dataset] = <[String; 1]>::try_from(p.positional.clone()).map_err(|_| anyhow::anyhow!("{cmd}: DATASET ({})", usage(cmd)))?;
    let name = dataset_name(&dataset)?;
    let (raw, results) = (env_dir("nnUNet_raw")?.join(&name), env_dir("nnUNet_results")?.join(&name));
    let one = |flag: &str, default: &[&str]| -> Vec<String> { p.many(flag).map_or_else(|| default.iter().map(|d| d.to_string()).collect(), <[String]>::to_vec) };
    let configs = one("-c", &["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]);
    let mut a = vec!["find-best-config".into(), "--ref".into(), s(&raw.join("labelsTr")), "--labels".into(), s(&raw.join("dataset.json")), "--out".into(), s(&results.join("find_best_configuration"))];
    let (mut candidates, mut missing) = (0, Vec::new());
    for tr in one("-tr", &["nnUNetTrainer"]) {
        for plans in one("-p", &["nnUNetPlans"]) {
            for c in &configs {
                let model = results.join(format!("{tr}__{plans}__{c}"));
                if !model.is_dir() {
                    // nnU-Net too takes only the configurations that were trained.
                    missing.push(format!("{tr}__{plans}__{c}"));
                    continue;
                }
                let runs: Vec<String> = folds(&p, &model).iter().map(|f| s(f)).collect();
                a.extend(["--model".into(), format!("{tr}__{plans}__{c}={}", runs.join(","))]);
                candidates += 1;
            }
        }
    }
    ensure!(candidates > 0, "{}: none of the asked trainer × plans × configuration folders is trained ({})", results.display(), missing.join(", "));
    if p.has("--disable_ensembling") {
        a.push("--disable-ensembling".into());
    }
    a.extend(p.rest.iter().cloned());
    stu(a)
}

fn convert(cmd: &str, args: &[String]) -> Result<()> {
    let raw = env_dir("nnUNet_raw")?;
    let (src, name) = if cmd == "nnUNetv2_convert_MSD_dataset" {
        let p = parse(cmd, args, &[("-i", One), ("-overwrite_id", One), ("-np", One)])?;
        let src = PathBuf::from(p.required(cmd, "-i")?);
        // Task09_Spleen → Dataset009_Spleen (or the -overwrite_id number).
        let task = src.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let (num, rest) = task.strip_prefix("Task").and_then(|t| t.split_once('_')).with_context(|| format!("-i {}: a TaskXX_Name folder", src.display()))?;
        let id: u32 = p.one("-overwrite_id").unwrap_or(num).parse().with_context(|| format!("dataset id of {task}"))?;
        (src, format!("Dataset{id:03}_{rest}"))
    } else {
        let p = parse(cmd, args, &[])?;
        let [src, name] = <[String; 2]>::try_from(p.positional.clone()).map_err(|_| anyhow::anyhow!("{cmd}: TASK_FOLDER DatasetXXX_Name ({})", usage(cmd)))?;
        ensure!(name.starts_with("Dataset") && name.get(7..10).is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) && name.get(10..11) == Some("_"), "{name}: the new name is DatasetXXX_Name");
        (PathBuf::from(src), name)
    };
    stu(vec!["dataset".into(), "convert".into(), s(&src), "--out".into(), s(&raw.join(name))])
}

fn overlay(cmd: &str, args: &[String]) -> Result<()> {
    let p = parse(cmd, args, &[("-d", One), ("-o", One)])?;
    let name = dataset_name(p.required(cmd, "-d")?)?;
    stu(vec!["dataset".into(), "overlay".into(), s(&env_dir("nnUNet_raw")?.join(name)), "--out".into(), p.required(cmd, "-o")?.into()])
}

fn accumulate(cmd: &str, args: &[String]) -> Result<()> {
    let p = parse(cmd, args, &[("-d", One), ("-c", One), ("-tr", One), ("-p", One), ("-f", Many), ("-o", One)])?;
    let name = dataset_name(p.required(cmd, "-d")?)?;
    let raw = env_dir("nnUNet_raw")?.join(&name);
    let model = env_dir("nnUNet_results")?.join(&name).join(format!("{}__{}__{}", p.one("-tr").unwrap_or("nnUNetTrainer"), p.one("-p").unwrap_or("nnUNetPlans"), p.required(cmd, "-c")?));
    let runs = folds(&p, &model);
    let tag: Vec<String> = runs.iter().filter_map(|r| r.file_name()?.to_str()?.strip_prefix("fold_").map(str::to_string)).collect();
    // nnU-Net's folder name; the summary of every fold's validation cases as one set.
    let out = p.one("-o").map_or_else(|| model.join(format!("crossval_results_folds_{}", tag.join("_"))), PathBuf::from);
    let mut a = vec!["evaluate".into(), "--ref".into(), s(&raw.join("labelsTr")), "--labels".into(), s(&raw.join("dataset.json")), "--out".into(), s(&out), "--pred".into()];
    a.extend(runs.iter().map(|r| s(&r.join("validation"))));
    stu(a)
}

fn determine_postprocessing(cmd: &str, args: &[String]) -> Result<()> {
    let p = parse(cmd, args, &[("-i", One), ("-ref", One), ("-plans_json", One), ("-dataset_json", One), ("--remove_postprocessed", Switch)])?;
    let pred = p.required(cmd, "-i")?;
    let dataset = p.one("-dataset_json").map_or_else(|| Path::new(pred).join("dataset.json"), PathBuf::from);
    ensure!(dataset.is_file(), "{}: no dataset.json there; give -dataset_json", dataset.display());
    // (Ours writes only the decision; nothing post-processed is kept, as --remove_postprocessed.)
    stu(vec!["postprocess".into(), "determine".into(), "--ref".into(), p.required(cmd, "-ref")?.into(), "--pred".into(), pred.into(), "--labels".into(), s(&dataset), "--out".into(), pred.into()])
}

fn apply_postprocessing(cmd: &str, args: &[String]) -> Result<()> {
    let p = parse(cmd, args, &[("-i", One), ("-o", One), ("-pp_pkl_file", One), ("-plans_json", One), ("-dataset_json", One)])?;
    let pp = p.required(cmd, "-pp_pkl_file")?;
    let json = if pp.ends_with(".pkl") {
        // nnU-Net writes a postprocessing.json beside its pickle, but in its own format; ours
        // is what `determine` wrote into the same folder.
        let ours = Path::new(pp).with_extension("json");
        ensure!(ours.is_file(), "-pp_pkl_file {pp}: pickles are not read here; give the postprocessing.json that nnUNetv2_determine_postprocessing (stu's) wrote");
        s(&ours)
    } else {
        pp.to_string()
    };
    stu(vec!["postprocess".into(), "apply".into(), "--pp".into(), json, "-i".into(), p.required(cmd, "-i")?.into(), "-o".into(), p.required(cmd, "-o")?.into()])
}

fn export_zip(cmd: &str, args: &[String]) -> Result<()> {
    let p = parse(cmd, args, &[("-d", One), ("-o", One), ("-c", Many), ("-tr", One), ("-p", One), ("-f", Many), ("-chk", Many), ("--not_strict", Switch), ("--exp_cv_preds", Switch)])?;
    ensure!(!p.has("--exp_cv_preds"), "--exp_cv_preds: the zip holds each fold's validation summary, not its predictions");
    let name = dataset_name(p.required(cmd, "-d")?)?;
    let configs = p.many("-c").map_or_else(|| vec!["3d_fullres".to_string()], <[String]>::to_vec);
    ensure!(configs.len() == 1, "-c {}: one configuration per zip here (export each on its own)", configs.join(" "));
    let model = env_dir("nnUNet_results")?.join(name).join(format!("{}__{}__{}", p.one("-tr").unwrap_or("nnUNetTrainer"), p.one("-p").unwrap_or("nnUNetPlans"), configs[0]));
    let mut runs = folds(&p, &model);
    if p.has("--not_strict") {
        runs.retain(|r| r.is_dir());
    }
    let mut a = vec!["export-model".into()];
    a.extend(runs.iter().map(|r| s(r)));
    a.extend(["--out".into(), p.required(cmd, "-o")?.into()]);
    match p.many("-chk") {
        None => {}
        Some([c]) if c == "checkpoint_final.pth" => {}
        Some([c]) if c == "checkpoint_best.pth" => a.extend(["--checkpoint".into(), "best".into()]),
        Some(other) => bail!("-chk {}: one of checkpoint_final.pth, checkpoint_best.pth", other.join(" ")),
    }
    stu(a)
}

fn install_zip(cmd: &str, args: &[String]) -> Result<()> {
    let p = parse(cmd, args, &[])?;
    let [zip] = <[String; 1]>::try_from(p.positional.clone()).map_err(|_| anyhow::anyhow!("{cmd}: ZIP ({})", usage(cmd)))?;
    // The model folder's name, as nnU-Net's zips carry it: the zip's own name (an export of
    // `…/Dataset801_X/STUNetTrainer_base__nnUNetPlans__3d_fullres` is best named after it).
    let stem = Path::new(&zip).file_stem().and_then(|s| s.to_str()).with_context(|| format!("{zip}: no file name"))?;
    let out = env_dir("nnUNet_results")?.join("installed").join(stem);
    stu(vec!["install-model".into(), zip, "--out".into(), s(&out)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_parse_as_nnunets_argparse_and_unknown_ones_are_named() {
        let p = parse("t", &v("801 3d_fullres 0 -tr STUNetTrainer_base --npz -f 0 1 2 -np 8 -- --iterations 5"), &[("-tr", One), ("--npz", Switch), ("-f", Many)]).unwrap();
        assert_eq!(p.positional, v("801 3d_fullres 0"));
        assert_eq!(p.one("-tr"), Some("STUNetTrainer_base"));
        assert_eq!(p.many("-f").unwrap(), v("0 1 2"));
        assert!(p.has("--npz") && p.rest == v("--iterations 5"));
        let err = parse("nnUNetv2_train", &v("801 -trainer X"), &[("-tr", One)]).unwrap_err().to_string();
        assert!(err.contains("unknown option `-trainer`") && err.contains("-tr"), "{err}");
        assert!(parse("t", &v("-tr"), &[("-tr", One)]).is_err());
        assert!(parse("t", &v("-f"), &[("-f", Many)]).is_err());
    }

    #[test]
    fn trainers_map_to_models_presets_and_recipes() {
        assert_eq!(trainer("nnUNetTrainer", false, false).unwrap(), Trainer { model: Some("nnunet-plainconv"), preset: None, epochs: None, finetune: false, variant: vec![], lr: None });
        assert_eq!(trainer("nnUNetTrainer", true, false).unwrap().model, Some("nnunet-resenc"));
        assert_eq!(trainer("nnUNetTrainer_250epochs", false, false).unwrap().epochs, Some(250));
        assert_eq!(trainer("nnUNetTrainer_1epoch", false, false).unwrap().epochs, Some(1));
        assert_eq!(trainer("STUNetTrainer", false, false).unwrap().preset, Some("stunet-b"));
        assert_eq!(trainer("STUNetTrainer_huge_ft", false, false).unwrap(), Trainer { model: Some("stunet"), preset: Some("stunet-h"), epochs: None, finetune: true, variant: vec![], lr: None });
        // nnU-Net's trainer variants.
        assert_eq!(trainer("nnUNetTrainerCELoss", false, false).unwrap().variant, ["--loss", "ce"]);
        assert_eq!(trainer("nnUNetTrainerCELoss_5epochs", false, false).unwrap(), Trainer { model: Some("nnunet-plainconv"), preset: None, epochs: Some(5), finetune: false, variant: vec!["--loss", "ce"], lr: None });
        assert_eq!(trainer("nnUNetTrainerAdam3en4", true, false).unwrap(), Trainer { model: Some("nnunet-resenc"), preset: None, epochs: None, finetune: false, variant: vec!["--optimizer", "adamw"], lr: Some("3e-4") });
        assert_eq!(trainer("nnUNetTrainer_250epochs_NoMirroring", false, false).unwrap().variant, ["--no-mirroring"]);
        assert_eq!(trainer("nnUNetTrainer_250epochs_NoMirroring", false, false).unwrap().epochs, Some(250));
        assert_eq!(trainer("nnUNetTrainerNoDA", false, false).unwrap().variant, ["--no-augmentation", "--no-mirroring"]);
        assert_eq!(trainer("nnUNetTrainer_warmup", false, false).unwrap().variant, ["--lr-schedule", "warmup"]);
        assert_eq!(trainer("nnUNetTrainer_onlyMirror01", false, false).unwrap().variant, ["--mirror-axes", "0,1"]);
        assert_eq!(trainer("nnUNetTrainer_onlyMirror01", false, true).unwrap().variant, ["--mirror-axes", "0"]);
        assert_eq!(trainer("nnUNetTrainer_probabilisticOversampling_010", false, false).unwrap().variant, ["--probabilistic-oversampling", "--oversample-foreground", "0.1"]);
        assert_eq!(trainer("nnUNetTrainer_DASegOrd0_NoMirroring", false, false).unwrap().variant, ["--seg-interpolation", "nearest", "--no-mirroring"]);
        assert_eq!(trainer("nnUNetTrainer_noDummy2DDA", false, false).unwrap().variant, ["--no-dummy-2d"]);
        assert_eq!(trainer("STUNetTrainer_small_ep4k", false, false).unwrap().epochs, Some(4000));
        for bad in ["STUNetTrainer_tiny", "nnUNetTrainerV2", "nnUNetTrainer_xepochs", "nnUNetTrainerDA5", "nnUNetTrainerTopk10Loss_5epochs", "nnUNetTrainerAdam_0epochs"] {
            assert!(trainer(bad, false, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn summaries_go_to_a_folder() {
        assert_eq!(summary_folder("out/summary.json").unwrap(), "out");
        assert!(summary_folder("out/results.json").is_err());
    }
}
