//! `stu quickstart`: the README's main job on the embedded default dataset (the phantom).
//!
//! Today it runs the data half of the pipeline end to end: generate the phantom, check it, plan
//! it with nnU-Net's rules and STU-Net's preset, and preprocess it. Training, prediction and the
//! scaling study attach here as they land (see the issue tracker).

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

/// Runs the quickstart into `out`; finished steps are reused on a rerun.
pub fn run(out: &Path, cases: usize, seed: u64, progress: &(dyn Fn(&str) + Sync)) -> Result<Summary> {
    let mut seconds = std::collections::BTreeMap::new();
    let dataset = out.join("Dataset900_Phantom");
    let t = std::time::Instant::now();
    stu_data::phantom::write_dataset(&stu_data::phantom::PhantomOptions { out: dataset.clone(), cases, test_cases: 4, seed, group: None })?;
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
    let plan = stu_data::plan::plans_json("Dataset900_Phantom", &json, &fp, stu_data::plan::Preset::Nnunet, 8.0);
    stu_engine::checkpoint::write_atomic(&plans, (serde_json::to_string_pretty(&plan)? + "\n").as_bytes())?;
    let stunet = stu_data::plan::plans_json("Dataset900_Phantom", &json, &fp, stu_data::plan::Preset::Stunet, 8.0);
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
