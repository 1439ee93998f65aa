//! Dataset plugins: each turns its own configuration into a dataset in nnU-Net raw layout.
//!
//! Registered with `inventory::submit!` beside their code, like models; the registry is built
//! once, sorted, with duplicates and bad names rejected.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use stu_core::{Registry, RegistryEntry};

use crate::dataset::DatasetError;

/// A registered dataset.
pub struct DatasetEntry {
    /// Registry id.
    pub name: &'static str,
    /// One line for listings.
    pub summary: &'static str,
    /// Where it was registered.
    pub module_path: &'static str,
    /// Revision of what the plugin generates (the phantom's version; 0 for datasets read as
    /// they are): part of the cache keys of study data and points, so a changed generator is
    /// never mistaken for finished work.
    pub revision: u32,
    /// Materialises the dataset under `out` (or checks it in place) from the plugin's own
    /// configuration table, and returns the dataset root.
    pub prepare: fn(&serde_json::Value, &Path) -> Result<PathBuf, DatasetError>,
    /// Judges the configuration table without preparing or reading anything (`stu spec
    /// check`, which may run where the data are not): unknown keys, values out of range.
    pub check: fn(&serde_json::Value) -> Result<(), DatasetError>,
}

inventory::collect!(DatasetEntry);

impl RegistryEntry for DatasetEntry {
    const KIND: &'static str = "dataset";
    fn name(&self) -> &'static str {
        self.name
    }
    fn module_path(&self) -> &'static str {
        self.module_path
    }
}

/// Every registered dataset plugin.
pub fn registry() -> &'static Registry<DatasetEntry> {
    static REG: std::sync::OnceLock<Registry<DatasetEntry>> = std::sync::OnceLock::new();
    REG.get_or_init(|| Registry::from_registrations(inventory::iter::<DatasetEntry>()))
}

/// Deserialises a plugin's table, naming the plugin and the key on error; no table (null) is
/// an empty one, every option at its default.
pub fn config<T: for<'de> Deserialize<'de>>(plugin: &str, value: &serde_json::Value) -> Result<T, DatasetError> {
    let value = if value.is_null() { serde_json::json!({}) } else { value.clone() };
    serde_json::from_value(value).map_err(|e| DatasetError::Json { path: PathBuf::from(format!("dataset `{plugin}`")), key: "options".into(), reason: e.to_string() })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    path: PathBuf,
}

fn check_raw(value: &serde_json::Value) -> Result<(), DatasetError> {
    config::<RawConfig>("nnunet-raw", value).map(|_| ())
}

fn prepare_raw(value: &serde_json::Value, _out: &Path) -> Result<PathBuf, DatasetError> {
    let c: RawConfig = config("nnunet-raw", value)?;
    let report = crate::check::check(&c.path);
    if let Some(p) = report.problems.first() {
        return Err(DatasetError::File { path: p.file.clone(), reason: format!("{} ({} problem(s); run `stu dataset check`)", p.message, report.problems.len()) });
    }
    Ok(c.path)
}

inventory::submit! {
    DatasetEntry { name: "nnunet-raw", summary: "an existing dataset in nnU-Net v2 raw layout (checked before use)", module_path: module_path!(), revision: 0, prepare: prepare_raw, check: check_raw }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PhantomConfig {
    #[serde(default = "default_cases")]
    cases: usize,
    #[serde(default = "default_test_cases")]
    test_cases: usize,
    #[serde(default)]
    seed: u64,
    /// One expert group's classes only.
    #[serde(default)]
    group: Option<String>,
    /// Labels as STU-Net's 104-class ids.
    #[serde(default)]
    stunet_ids: bool,
}

/// The `group` option shared by the phantom and TotalSegmentator plugins: an expert group
/// name, or `all` / absent for every class.
fn expert_group(plugin: &str, group: Option<&str>) -> Result<Option<stu_core::taxonomy::ExpertGroup>, DatasetError> {
    group
        .filter(|g| *g != "all")
        .map(stu_core::taxonomy::ExpertGroup::parse)
        .transpose()
        .map_err(|reason| DatasetError::Json { path: PathBuf::from(format!("dataset `{plugin}`")), key: "group".into(), reason })
}

fn default_cases() -> usize {
    16
}
fn default_test_cases() -> usize {
    4
}

fn phantom_config(value: &serde_json::Value) -> Result<(PhantomConfig, Option<stu_core::taxonomy::ExpertGroup>), DatasetError> {
    let c: PhantomConfig = config("phantom", value)?;
    let group = expert_group("phantom", c.group.as_deref())?;
    if c.cases == 0 {
        return Err(DatasetError::Json { path: PathBuf::from("dataset `phantom`"), key: "cases".into(), reason: "0 training cases: at least 1".into() });
    }
    Ok((c, group))
}

fn check_phantom(value: &serde_json::Value) -> Result<(), DatasetError> {
    phantom_config(value).map(|_| ())
}

fn prepare_phantom(value: &serde_json::Value, out: &Path) -> Result<PathBuf, DatasetError> {
    let (c, group) = phantom_config(value)?;
    crate::phantom::write_dataset(&crate::phantom::PhantomOptions { out: out.to_path_buf(), cases: c.cases, test_cases: c.test_cases, seed: c.seed, group, stunet_ids: c.stunet_ids })
        .map_err(|e| DatasetError::File { path: out.to_path_buf(), reason: e.to_string() })?;
    Ok(out.to_path_buf())
}

inventory::submit! {
    DatasetEntry { name: "phantom", summary: "synthetic CT phantom, 15 STU-Net classes in the five expert groups (no download)", module_path: module_path!(), revision: crate::phantom::VERSION, prepare: prepare_phantom, check: check_phantom }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TotalSegConfig {
    path: PathBuf,
    #[serde(default)]
    group: Option<String>,
}

fn check_totalseg(value: &serde_json::Value) -> Result<(), DatasetError> {
    let c: TotalSegConfig = config("totalsegmentator", value)?;
    expert_group("totalsegmentator", c.group.as_deref()).map(|_| ())
}

fn prepare_totalseg(value: &serde_json::Value, out: &Path) -> Result<PathBuf, DatasetError> {
    let c: TotalSegConfig = config("totalsegmentator", value)?;
    let group = expert_group("totalsegmentator", c.group.as_deref())?;
    crate::totalseg::convert(&c.path, out, group)?;
    Ok(out.to_path_buf())
}

inventory::submit! {
    DatasetEntry { name: "totalsegmentator", summary: "TotalSegmentator v1 release → STU-Net's 104-class order, optionally one expert group", module_path: module_path!(), revision: 0, prepare: prepare_totalseg, check: check_totalseg }
}

#[cfg(test)]
mod tests {
    #[test]
    fn expected_dataset_plugins_are_registered() {
        assert_eq!(super::registry().names().collect::<Vec<_>>(), ["nnunet-raw", "phantom", "totalsegmentator"]);
    }
}
