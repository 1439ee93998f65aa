//! Run records (`record.json` of `stu run`) → polars tables (CSV, Markdown, Parquet) and the
//! paper's figures with its reported numbers beside ours.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use polars::prelude::*;
use serde_json::Value;

/// One row per finished point.
pub fn records_frame(records: &[Value]) -> Result<DataFrame> {
    let s = |r: &Value, p: &str| r.pointer(p).and_then(Value::as_str).unwrap_or("").to_string();
    let f = |r: &Value, p: &str| r.pointer(p).and_then(Value::as_f64);
    // A variant's name stands for its overrides (`train.loss="ce"`).
    let point: Vec<String> = records.iter().map(|r| match r.get("variant").and_then(Value::as_str) {
        Some(v) => v.to_string(),
        None => r["point"].as_object().map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")).unwrap_or_default(),
    }).collect();
    let blocks: Vec<Option<f64>> = records.iter().map(model_blocks).collect();
    let width: Vec<Option<f64>> = records.iter().map(model_width).collect();
    let df = DataFrame::new(vec![
        Column::new("study".into(), records.iter().map(|r| s(r, "/study")).collect::<Vec<_>>()),
        Column::new("point".into(), point),
        Column::new("id".into(), records.iter().map(|r| s(r, "/id")).collect::<Vec<_>>()),
        Column::new("model".into(), records.iter().map(|r| s(r, "/model/model")).collect::<Vec<_>>()),
        Column::new("blocks".into(), blocks),
        Column::new("base_width".into(), width),
        Column::new("params".into(), records.iter().map(|r| f(r, "/model/params")).collect::<Vec<_>>()),
        Column::new("macs_128".into(), records.iter().map(|r| f(r, "/model/macs_128")).collect::<Vec<_>>()),
        Column::new("fraction".into(), records.iter().map(|r| f(r, "/spec/dataset/fraction")).collect::<Vec<_>>()),
        Column::new("group".into(), records.iter().map(|r| r.pointer("/spec/dataset/options/group").and_then(Value::as_str).unwrap_or("all").to_string()).collect::<Vec<_>>()),
        Column::new("seed".into(), records.iter().map(|r| f(r, "/seed")).collect::<Vec<_>>()),
        Column::new("dice".into(), records.iter().map(|r| f(r, "/metrics/foreground_mean/Dice")).collect::<Vec<_>>()),
        Column::new("nsd".into(), records.iter().map(|r| f(r, "/metrics/foreground_mean/NSD")).collect::<Vec<_>>()),
        Column::new("hd95".into(), records.iter().map(|r| f(r, "/metrics/foreground_mean/HD95")).collect::<Vec<_>>()),
        Column::new("pseudo_dice_ema".into(), records.iter().map(|r| f(r, "/training/best_ema_pseudo_dice")).collect::<Vec<_>>()),
        Column::new("train_s".into(), records.iter().map(|r| f(r, "/timings/train_s")).collect::<Vec<_>>()),
    ])?;
    Ok(df.sort(["study", "point"], Default::default())?)
}

/// Blocks (STU-Net, SwinUNETR, nnFormer), convolutions (PlainConvUNet) per stage at stage 0, or
/// transformer layers (UNETR) of a record's model.
pub fn model_blocks(r: &Value) -> Option<f64> {
    ["/model/depth/0", "/model/n_conv/0", "/model/n_blocks/0", "/model/depths/0", "/model/num_layers"].iter().find_map(|p| r.pointer(p)).and_then(Value::as_f64)
}

/// Width of stage 0 of a record's model.
pub fn model_width(r: &Value) -> Option<f64> {
    ["/model/dims/0", "/model/features/0", "/model/feature_size", "/model/embedding_dim"].iter().find_map(|p| r.pointer(p)).and_then(Value::as_f64)
}

/// Reads every `record.json` under `dir` (recursively), sorted by path.
pub fn read_records(dir: &Path) -> Result<Vec<Value>> {
    let mut paths = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("{}: cannot list", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "record.json" || n.to_string_lossy().ends_with(".record.json")) {
                paths.push(p);
            }
        }
    }
    paths.sort();
    paths.iter().map(|p| serde_json::from_str(&std::fs::read_to_string(p)?).with_context(|| format!("{}: not JSON", p.display()))).collect()
}

/// A frame as a GitHub Markdown table (numbers with 4 significant decimals).
pub fn markdown(df: &DataFrame) -> String {
    let cols = df.get_columns();
    let mut out = format!("| {} |\n|{}|\n", cols.iter().map(|c| c.name().to_string()).collect::<Vec<_>>().join(" | "), cols.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
    for i in 0..df.height() {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| match c.get(i) {
                Ok(AnyValue::Null) | Err(_) => "–".into(),
                Ok(AnyValue::Float64(v)) if v.fract() != 0.0 => format!("{v:.4}"),
                Ok(AnyValue::Float64(v)) => format!("{v:.0}"),
                Ok(AnyValue::String(s)) => s.to_string(),
                Ok(v) => v.to_string(),
            })
            .collect();
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    out
}

/// Writes `stem.csv`, `stem.md` and `stem.parquet`.
pub fn write_table(df: &mut DataFrame, stem: &Path) -> Result<Vec<PathBuf>> {
    let csv = stem.with_extension("csv");
    CsvWriter::new(std::fs::File::create(&csv)?).finish(df)?;
    let md = stem.with_extension("md");
    std::fs::write(&md, markdown(df))?;
    let pq = stem.with_extension("parquet");
    ParquetWriter::new(std::fs::File::create(&pq)?).finish(df)?;
    Ok(vec![csv, md, pq])
}

/// Reads one of the paper's CSV files.
pub fn paper(path: &Path) -> Result<DataFrame> {
    Ok(CsvReadOptions::default().with_has_header(true).try_into_reader_with_file_path(Some(path.to_path_buf()))?.finish()?)
}
