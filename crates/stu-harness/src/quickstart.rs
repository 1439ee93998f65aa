//! `stu quickstart`: the README's main job on the embedded default dataset (the phantom).
//!
//! First the data pipeline end to end (generate the phantom, check it, plan it with nnU-Net's
//! rules and STU-Net's preset, preprocess it), then the built-in study
//! `experiments/quickstart.toml`: three STU-Net widths trained, run on the held-out cases and
//! scored, with a table and a Fig. 1-style figure (`--data-only` stops after the data).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

/// What the quickstart produced.
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    /// The phantom dataset.
    pub dataset: PathBuf,
    /// Training cases.
    pub cases: usize,
    /// nnU-Net-rules plan.
    pub plans: PathBuf,
    /// Spacing, patch, batch and strides of that plan.
    pub plan: serde_json::Value,
    /// Preprocessed cases.
    pub preprocessed: PathBuf,
    /// Seconds per step.
    pub seconds: std::collections::BTreeMap<&'static str, f64>,
}

/// The quickstart study spec (`experiments/quickstart.toml`), built in.
pub const SPEC: &str = include_str!("../../../experiments/quickstart.toml");

/// Runs the built-in quickstart study into `root`, draws `root/figure.png` (Dice vs size,
/// bubble area ∝ MACs, beside the paper's Fig. 1 numbers) and returns a text table.
pub fn study(root: &Path, cases: usize, seed: u64) -> Result<String> {
    let overrides = [format!("dataset.options.cases={cases}"), format!("dataset.options.seed={seed}")];
    let spec = crate::spec::load_str(SPEC, Path::new("experiments/quickstart.toml"), &overrides)?;
    let outcomes = crate::run::run(&spec, root, &|m| eprintln!("{m}"))?;
    let mut table = format!("{:<28} {:>10} {:>16} {:>8} {:>8} {:>8} {:>9}\n", "point", "params", "MACs@128³", "Dice", "NSD", "HD95", "train s");
    let mut ours = Vec::new();
    for o in &outcomes {
        if o.status.starts_with("failed") {
            table.push_str(&format!("{:<28} {}\n", o.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), o.status));
            continue;
        }
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(o.dir.join("record.json"))?)?;
        let f = |p: &str| r.pointer(p).and_then(serde_json::Value::as_f64);
        let fmt = |v: Option<f64>, d: usize| v.map_or("–".to_string(), |v| format!("{v:.d$}"));
        let label = crate::spec::label(&r["point"].as_object().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default());
        table.push_str(&format!(
            "{:<28} {:>10} {:>16} {:>8} {:>8} {:>8} {:>9}\n",
            label,
            fmt(f("/model/params"), 0),
            fmt(f("/model/macs_128"), 0),
            fmt(f("/metrics/foreground_mean/Dice"), 4),
            fmt(f("/metrics/foreground_mean/NSD"), 4),
            fmt(f("/metrics/foreground_mean/HD95"), 1),
            fmt(f("/timings/train_s"), 0)
        ));
        if let (Some(p), Some(d), Some(m)) = (f("/model/params"), f("/metrics/foreground_mean/Dice"), f("/model/macs_128")) {
            ours.push(stu_report::figures::Bubble { label, x: p / 1e6, y: d, area: m });
        }
    }
    let paper = paper_fig1();
    stu_report::figures::bubbles(&root.join("figure.png"), &ours, "parameters (M)", &paper, "MACs at 128³ (T)")?;
    table.push_str(&format!("records in {}; figure {}\n", root.display(), root.join("figure.png").display()));
    let failed = outcomes.iter().filter(|o| o.status.starts_with("failed")).count();
    ensure!(failed == 0, "{table}{failed} point(s) failed");
    Ok(table)
}

/// The paper's Fig. 1 points (`reports/paper/fig1_totalsegmentator.csv`, built in).
fn paper_fig1() -> Vec<stu_report::figures::Bubble> {
    include_str!("../../../reports/paper/fig1_totalsegmentator.csv")
        .lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            let macs: f64 = c.get(3)?.parse().ok()?;
            Some(stu_report::figures::Bubble { label: format!("{}-{}", c[0], c[1]), x: macs, y: c.get(4)?.parse().ok()?, area: macs })
        })
        .collect()
}

/// Runs the quickstart into `out`; finished steps are reused on a rerun.
pub fn run(out: &Path, cases: usize, seed: u64, progress: &(dyn Fn(&str) + Sync)) -> Result<Summary> {
    let mut seconds = std::collections::BTreeMap::new();
    let dataset = out.join("Dataset900_Phantom");
    let t = std::time::Instant::now();
    stu_data::phantom::write_dataset(&stu_data::phantom::PhantomOptions { out: dataset.clone(), cases, test_cases: 4, seed, group: None, stunet_ids: false })?;
    seconds.insert("phantom", t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let report = stu_data::check::check(&dataset);
    ensure!(report.ok(), "the phantom failed its own check:\n{}", report.render());
    seconds.insert("check", t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let json = stu_data::dataset::DatasetJson::read(&dataset.join("dataset.json"))?;
    let fp = stu_data::fingerprint::fingerprint(&dataset, &json)?;
    let plans = out.join("plans/plans.json");
    std::fs::create_dir_all(out.join("plans")).context("cannot create the plans folder")?;
    let plan = stu_data::plan::plans_json("Dataset900_Phantom", &json, &fp, stu_data::plan::Preset::Nnunet, None);
    stu_engine::checkpoint::write_atomic(&plans, (serde_json::to_string_pretty(&plan)? + "\n").as_bytes())?;
    let stunet = stu_data::plan::plans_json("Dataset900_Phantom", &json, &fp, stu_data::plan::Preset::Stunet, None);
    stu_engine::checkpoint::write_atomic(&out.join("plans/stunet_plans.json"), (serde_json::to_string_pretty(&stunet)? + "\n").as_bytes())?;
    seconds.insert("plan", t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let preprocessed = out.join("preprocessed");
    stu_data::preprocess::preprocess_dataset(&dataset, &plans, "3d_fullres", &preprocessed, 1, progress)?;
    seconds.insert("preprocess", t.elapsed().as_secs_f64());
    let c = &plan["configurations"]["3d_fullres"];
    Ok(Summary {
        dataset,
        cases,
        plans,
        plan: serde_json::json!({"spacing": c["spacing"], "patch_size": c["patch_size"], "batch_size": c["batch_size"], "pool_op_kernel_sizes": c["pool_op_kernel_sizes"]}),
        preprocessed,
        seconds,
    })
}
