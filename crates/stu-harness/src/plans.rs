//! Strides from nnU-Net plans files.
//!
//! nnU-Net v2 `plans.json` keeps `pool_op_kernel_sizes` per configuration, starting with a
//! `[1,1,1]` entry for stage 0 (newer releases nest it as `architecture.arch_kwargs.strides`).
//! STU-Net drops that first entry, then keeps 5 and pads with `[1,1,1]` (stunet.md §1.6); the
//! padding to the model's stage count happens when the model is loaded.

use std::path::Path;

use anyhow::{Context, Result, bail};
use stu_core::strides::Stride;

/// Downsampling strides of `configuration` in a v2 `plans.json`, without the stage-0 entry.
pub fn strides_from_plans(path: &Path, configuration: &str) -> Result<Vec<Stride>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read plans", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    strides_of(&json, path, configuration)
}

/// [`strides_from_plans`] of plans already parsed; `path` names them in errors.
pub fn strides_of(json: &serde_json::Value, path: &Path, configuration: &str) -> Result<Vec<Stride>> {
    let conf = stu_data::plan::configuration(json, configuration).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let (key, list) = if let Some(l) = conf.get("pool_op_kernel_sizes") {
        ("pool_op_kernel_sizes", l)
    } else if let Some(l) = conf.pointer("/architecture/arch_kwargs/strides") {
        ("architecture.arch_kwargs.strides", l)
    } else {
        bail!(
            "{}: `configurations.{configuration}` has neither `pool_op_kernel_sizes` nor `architecture.arch_kwargs.strides`",
            path.display()
        );
    };
    let strides: Vec<Stride> = serde_json::from_value(list.clone()).with_context(|| {
        format!("{}: `configurations.{configuration}.{key}` is not a list of 3-int strides", path.display())
    })?;
    if strides.is_empty() {
        bail!("{}: `configurations.{configuration}.{key}` is empty", path.display());
    }
    Ok(strides[1..].to_vec())
}
