//! `cargo xtask report [--check]`: run records → tables and the paper's figures.
//!
//! For each study under `runs/` with finished points, the records are copied to
//! `reports/<study>/records/` (committed, so reports can be rebuilt anywhere), then
//! `reports/<study>/table.{csv,md,parquet}` and the study's figure (PNG + SVG) are written from
//! them, with the paper's numbers (`reports/paper/*.csv`) in the right-hand panel. `--check`
//! rebuilds everything from the committed records into a scratch folder and fails when a
//! committed output differs or is missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use polars::prelude::*;
use serde_json::Value;
use stu_report::figures::{Bubble, Series, bars, bars_alone, bubbles, curves};
use stu_report::tables::{markdown, model_blocks, model_width, paper, read_records, records_frame, write_table};

/// The paper's studies, each with its own figure; any other study (a spec of the user's own)
/// gets a table and a bar chart of its points.
const STUDIES: [&str; 6] = ["quickstart", "scaling", "data_fraction", "expert_vs_universal", "direct_inference", "finetune"];

/// The studies to report: the paper's, then (sorted) every other folder of `runs/` with a
/// finished point (`*/record.json`) or of `reports/` with committed `records/`.
fn studies(runs: &Path, reports: &Path) -> Vec<String> {
    let mut out: Vec<String> = STUDIES.iter().map(|s| s.to_string()).collect();
    let mut others = std::collections::BTreeSet::new();
    let dirs = |d: &Path| std::fs::read_dir(d).into_iter().flatten().filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect::<Vec<_>>();
    for d in dirs(runs) {
        if dirs(&d).iter().any(|p| p.join("record.json").is_file()) {
            others.insert(d.file_name().expect("a folder").to_string_lossy().into_owned());
        }
    }
    for d in dirs(reports) {
        if d.join("records").is_dir() {
            others.insert(d.file_name().expect("a folder").to_string_lossy().into_owned());
        }
    }
    out.extend(others.into_iter().filter(|s| !STUDIES.contains(&s.as_str()) && s != "paper"));
    out
}
const GROUPS: [&str; 5] = ["organs", "vertebrae", "cardiac", "muscles", "ribs"];

fn col_f64(df: &DataFrame, name: &str) -> Result<Vec<Option<f64>>> {
    Ok(df.column(name)?.cast(&DataType::Float64)?.f64()?.into_iter().collect())
}

fn col_str(df: &DataFrame, name: &str) -> Result<Vec<String>> {
    Ok(df.column(name)?.cast(&DataType::String)?.str()?.into_iter().map(|s| s.unwrap_or("").to_string()).collect())
}

fn paper_bubbles(reports: &Path) -> Result<Vec<Bubble>> {
    let p = paper(&reports.join("paper/fig1_totalsegmentator.csv"))?;
    let (m, s, macs, dsc) = (col_str(&p, "model")?, col_str(&p, "size")?, col_f64(&p, "macs_t")?, col_f64(&p, "mean_dsc")?);
    Ok((0..p.height()).filter_map(|i| Some(Bubble { label: format!("{}-{}", m[i], s[i]), x: macs[i]?, y: dsc[i]?, area: macs[i]? })).collect())
}

fn paper_curves(reports: &Path) -> Result<Vec<Series>> {
    let p = paper(&reports.join("paper/fig4_data_fraction.csv"))?;
    let (s, pc, d) = (col_str(&p, "size")?, col_f64(&p, "percent")?, col_f64(&p, "mean_dsc")?);
    let mut by: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for i in 0..p.height() {
        if let (Some(x), Some(y)) = (pc[i], d[i]) {
            by.entry(format!("STU-Net-{}", s[i])).or_default().push((x, y));
        }
    }
    Ok(by.into_iter().map(|(name, points)| Series { name, points }).collect())
}

/// Group names, and one series of values per group for each setting.
type Bars = (Vec<String>, Vec<(String, Vec<f64>)>);

fn paper_bars(reports: &Path) -> Result<Bars> {
    let p = paper(&reports.join("paper/fig5_expert_vs_universal.csv"))?;
    let (size, setting, group, d) = (col_str(&p, "size")?, col_str(&p, "setting")?, col_str(&p, "group")?, col_f64(&p, "mean_dsc")?);
    let groups: Vec<String> = GROUPS.iter().map(|g| g.to_string()).collect();
    let series = ["experts", "universal"]
        .iter()
        .map(|set| {
            let v = groups.iter().map(|g| (0..p.height()).find(|&i| size[i] == "B" && setting[i] == *set && group[i] == *g).and_then(|i| d[i]).unwrap_or(f64::NAN)).collect();
            (format!("B, {set}"), v)
        })
        .collect();
    Ok((groups, series))
}

fn group_of(name: &str) -> Option<&'static str> {
    stu_core::taxonomy::label_of(name).map(|l| stu_core::taxonomy::CLASSES[l as usize - 1].2.name())
}

/// Writes one study's table and figure into `out` from `records`.
fn study(reports: &Path, name: &str, records: &[Value], out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    let mut df = records_frame(records)?;
    let mut files = write_table(&mut df, &out.join("table"))?;
    let fig = out.join("figure.png");
    match name {
        "quickstart" | "scaling" => {
            let ours: Vec<Bubble> = records
                .iter()
                .filter_map(|r| {
                    let family = match r.pointer("/model/model").and_then(Value::as_str) {
                        Some("nnunet-plainconv") => "nnU-Net ",
                        Some("nnunet-resenc") => "ResEnc ",
                        Some("unetr") => "UNETR ",
                        Some("swinunetr") => "SwinUNETR ",
                        Some("nnformer") => "nnFormer ",
                        _ => "",
                    };
                    Some(Bubble {
                        label: match model_blocks(r) {
                            Some(b) => format!("{family}b{b} w{}", model_width(r)?),
                            None => format!("{family}w{}", model_width(r)?),
                        },
                        x: r.pointer("/model/params")?.as_f64()? / 1e6,
                        y: r.pointer("/metrics/foreground_mean/Dice")?.as_f64()?,
                        area: r.pointer("/model/macs_128")?.as_f64()?,
                    })
                })
                .collect();
            bubbles(&fig, &ours, "parameters (M)", &paper_bubbles(reports)?, "MACs at 128³ (T)")?;
        }
        "data_fraction" => {
            let mut by: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            for r in records {
                if let (Some(f), Some(d)) = (r.pointer("/spec/dataset/fraction").and_then(Value::as_f64), r.pointer("/metrics/foreground_mean/Dice").and_then(Value::as_f64)) {
                    let key = format!("b{} w{}", r.pointer("/model/depth/0").cloned().unwrap_or_default(), r.pointer("/model/dims/0").cloned().unwrap_or_default());
                    by.entry(key).or_default().push((f * 100.0, d));
                }
            }
            let ours: Vec<Series> = by.into_iter().map(|(name, mut points)| { points.sort_by(|a, b| a.0.total_cmp(&b.0)); Series { name, points } }).collect();
            curves(&fig, &ours, &paper_curves(reports)?, "% of training cases")?;
        }
        "expert_vs_universal" => {
            let groups: Vec<String> = GROUPS.iter().map(|g| g.to_string()).collect();
            let mut experts = vec![f64::NAN; GROUPS.len()];
            let mut universal = vec![f64::NAN; GROUPS.len()];
            for r in records {
                let g = r.pointer("/spec/dataset/options/group").and_then(Value::as_str).unwrap_or("all");
                if let Some(i) = GROUPS.iter().position(|x| *x == g) {
                    experts[i] = r.pointer("/metrics/foreground_mean/Dice").and_then(Value::as_f64).unwrap_or(f64::NAN);
                } else {
                    // The universal model's per-class Dice, averaged within each group.
                    let names = r.pointer("/metrics/label_names").and_then(Value::as_object).cloned().unwrap_or_default();
                    let mean = r.pointer("/metrics/mean").and_then(Value::as_object).cloned().unwrap_or_default();
                    for (gi, gname) in GROUPS.iter().enumerate() {
                        let v: Vec<f64> = mean.iter().filter(|(l, _)| names.get(*l).and_then(Value::as_str).and_then(group_of) == Some(gname)).filter_map(|(_, m)| m["Dice"].as_f64()).collect();
                        if !v.is_empty() {
                            universal[gi] = v.iter().sum::<f64>() / v.len() as f64;
                        }
                    }
                }
            }
            let (pg, ps) = paper_bars(reports)?;
            bars(&fig, &groups, &[("experts".into(), experts), ("universal".into(), universal)], &pg, &ps)?;
        }
        // Tables 4 and 5: ours in `table.*`, the paper's beside it.
        "direct_inference" => {
            files.push(paper_table(&reports.join("paper/table4_direct_inference.csv"), "dataset", "model", &out.join("paper_table4.md"))?);
            return Ok(files);
        }
        "finetune" => {
            files.push(paper_table(&reports.join("paper/table5_finetune.csv"), "method", "dataset", &out.join("paper_table5.md"))?);
            return Ok(files);
        }
        // A study of the user's own (an ablation): the held-out foreground Dice and NSD of
        // each variant (or sweep point), its seeds averaged: bars of the mean, whiskers of the
        // standard deviation, and `summary.*` with both; no paper numbers to compare with.
        _ => {
            let groups = seed_summary(records);
            let col = |f: &dyn Fn(&Group) -> f64| groups.iter().map(f).collect::<Vec<f64>>();
            let labels: Vec<String> = groups.iter().map(|g| g.label.clone()).collect();
            let (means, sds) = ([col(&|g| g.mean[0]), col(&|g| g.mean[1])], [col(&|g| g.sd[0]), col(&|g| g.sd[1])]);
            let mut summary = DataFrame::new(vec![
                Column::new("group".into(), labels.clone()),
                Column::new("seeds".into(), groups.iter().map(|g| g.n as u32).collect::<Vec<_>>()),
                Column::new("dice_mean".into(), means[0].clone()),
                Column::new("dice_sd".into(), sds[0].clone()),
                Column::new("nsd_mean".into(), means[1].clone()),
                Column::new("nsd_sd".into(), sds[1].clone()),
            ])?;
            files.extend(write_table(&mut summary, &out.join("summary"))?);
            let seeds = if groups.iter().any(|g| g.n > 1) { ", mean ± SD over seeds" } else { "" };
            bars_alone(&fig, &format!("{name}: held-out foreground mean{seeds}"), "score", &labels, &[("Dice".into(), means[0].clone()), ("NSD".into(), means[1].clone())], &sds)?;        }
    }
    files.push(fig.clone());
    files.push(fig.with_extension("svg"));
    Ok(files)
}

/// The label of a record in a study of the user's own: its variant's name, then its sweep
/// values other than the seed (`seed` groups records, it does not name them).
fn group_label(r: &Value) -> String {
    let variant = r.get("variant").and_then(Value::as_str);
    // A variant's point holds its overrides too; its record lists the swept keys under
    // `swept` (one written before that list existed counts every key as its variant's).
    let swept = |k: &str| variant.is_none() || r.get("swept").and_then(Value::as_object).is_some_and(|s| s.contains_key(k));
    let values: Vec<String> = r["point"]
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| k.as_str() != "seed" && swept(k)).map(|(k, v)| format!("{}={}", k.rsplit('.').next().unwrap_or(k), v.as_str().map_or(v.to_string(), str::to_string))).collect())
        .unwrap_or_default();
    match (variant, values.is_empty()) {
        (Some(v), true) => v.to_string(),
        (Some(v), false) => format!("{v}, {}", values.join(" ")),
        (None, true) => "single".into(),
        (None, false) => values.join(" "),
    }
}

/// One group of a study of the user's own ([`group_label`]): its records' count, and the mean
/// and sample standard deviation (0 for one record) of their foreground Dice and NSD.
struct Group {
    label: String,
    n: usize,
    mean: [f64; 2],
    sd: [f64; 2],
}

/// The groups of `records` in order of first appearance, ranked by mean Dice when the study has
/// variants.
fn seed_summary(records: &[Value]) -> Vec<Group> {
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, [Vec<f64>; 2]> = BTreeMap::new();
    for r in records {
        let g = group_label(r);
        if !values.contains_key(&g) {
            order.push(g.clone());
        }
        let v = values.entry(g).or_default();
        for (i, k) in ["Dice", "NSD"].iter().enumerate() {
            v[i].push(r.pointer(&format!("/metrics/foreground_mean/{k}")).and_then(Value::as_f64).unwrap_or(f64::NAN));
        }
    }
    let stats = |xs: &[f64]| {
        let n = xs.len() as f64;
        let m = xs.iter().sum::<f64>() / n;
        let sd = if xs.len() > 1 { (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
        (m, sd)
    };
    let mut groups: Vec<Group> = order
        .into_iter()
        .map(|label| {
            let v = &values[&label];
            let (dice, nsd) = (stats(&v[0]), stats(&v[1]));
            Group { n: v[0].len(), mean: [dice.0, nsd.0], sd: [dice.1, nsd.1], label }
        })
        .collect();
    if records.iter().any(|r| r.get("variant").is_some()) {
        groups.sort_by(|a, b| b.mean[0].total_cmp(&a.mean[0]));
    }
    groups
}

/// A long-format paper CSV (`row`, `col`, `mean_dsc`) as a Markdown table, rows in file order.
fn paper_table(csv: &Path, row: &str, col: &str, out: &Path) -> Result<PathBuf> {
    let p = paper(csv)?;
    let (r, c, v) = (col_str(&p, row)?, col_str(&p, col)?, col_f64(&p, "mean_dsc")?);
    let mut rows: Vec<String> = Vec::new();
    let mut cols: Vec<String> = Vec::new();
    for i in 0..p.height() {
        if !rows.contains(&r[i]) {
            rows.push(r[i].clone());
        }
        if !cols.contains(&c[i]) {
            cols.push(c[i].clone());
        }
    }
    let mut md = format!("Paper's numbers (`{}`), mean DSC %.\n\n| {row} | {} |\n|---|{}|\n", csv.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), cols.join(" | "), cols.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
    for rr in &rows {
        let cells: Vec<String> = cols.iter().map(|cc| (0..p.height()).find(|&i| &r[i] == rr && &c[i] == cc).and_then(|i| v[i]).map_or("–".into(), |x| format!("{x:.2}"))).collect();
        md.push_str(&format!("| {rr} | {} |\n", cells.join(" | ")));
    }
    std::fs::write(out, md)?;
    Ok(out.to_path_buf())
}

/// Paper-only figures (left panels empty): `reports/paper/fig{1,4,5}.png`.
fn paper_figures(reports: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    let f1 = out.join("fig1.png");
    bubbles(&f1, &[], "parameters (M)", &paper_bubbles(reports)?, "MACs at 128³ (T)")?;
    let f4 = out.join("fig4.png");
    curves(&f4, &[], &paper_curves(reports)?, "% of training cases")?;
    let f5 = out.join("fig5.png");
    let (pg, ps) = paper_bars(reports)?;
    bars(&f5, &[], &[], &pg, &ps)?;
    Ok([f1, f4, f5].iter().flat_map(|f| [f.clone(), f.with_extension("svg")]).collect())
}

fn main() -> Result<()> {
    let mut check = false;
    let mut runs = PathBuf::from("runs");
    let mut reports = PathBuf::from("reports");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--check" => check = true,
            "--runs" => runs = PathBuf::from(args.next().context("--runs needs a folder")?),
            "--reports" => reports = PathBuf::from(args.next().context("--reports needs a folder")?),
            other => bail!("unknown argument `{other}` (use --check, --runs DIR, --reports DIR)"),
        }
    }
    let names = studies(&runs, &reports);
    if !check {
        // Commit the inputs: copy finished records next to the reports.
        for s in &names {
            let dir = runs.join(s);
            if !dir.is_dir() {
                continue;
            }
            let dst = reports.join(s).join("records");
            for e in std::fs::read_dir(&dir)? {
                let p = e?.path();
                let rec = p.join("record.json");
                if rec.exists() {
                    std::fs::create_dir_all(&dst)?;
                    let name = format!("{}.record.json", p.file_name().expect("dir").to_string_lossy());
                    std::fs::copy(&rec, dst.join(name))?;
                }
            }
        }
    }
    let scratch = if check { std::env::temp_dir().join(format!("stu-report-check-{}", std::process::id())) } else { reports.clone() };
    let mut written = Vec::new();
    for s in &names {
        let recs_dir = reports.join(s).join("records");
        if !recs_dir.is_dir() {
            continue;
        }
        let records = read_records(&recs_dir)?;
        if records.is_empty() {
            continue;
        }
        written.extend(study(&reports, s, &records, &scratch.join(s))?);
        println!("{s}: {} record(s)\n{}", records.len(), markdown(&records_frame(&records)?));
    }
    written.extend(paper_figures(&reports, &scratch.join("paper"))?);
    if check {
        let mut stale = Vec::new();
        for f in &written {
            let rel = f.strip_prefix(&scratch).expect("under scratch");
            let committed = reports.join(rel);
            if std::fs::read(&committed).ok() != std::fs::read(f).ok() {
                stale.push(committed.display().to_string());
            }
        }
        let _ = std::fs::remove_dir_all(&scratch);
        if !stale.is_empty() {
            bail!("stale or missing reports (run `cargo xtask report`):\n  {}", stale.join("\n  "));
        }
        println!("reports are up to date ({} files)", written.len());
    } else {
        println!("wrote {} files under {}", written.len(), reports.display());
    }
    Ok(())
}
