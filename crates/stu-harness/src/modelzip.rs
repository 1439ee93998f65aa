//! Trained models as one zip file, to share and install (nnU-Net's
//! `nnUNetv2_export_model_to_zip` / `nnUNetv2_install_pretrained_model_from_zip`).
//!
//! `stu export-model RUN… --out M.zip` packs the `stu train` run folders of one model (its
//! folds: the same plan and labels) as
//! ```text
//! stu-model.json                   format, folds, which checkpoint
//! plans.json, dataset.json         shared by the folds
//! fold_K/checkpoint_final.safetensors (or _best), train.json, log.jsonl,
//!        validation/summary.json, transfer.json   (those that exist)
//! ```
//! `stu install-model M.zip --out DIR` unpacks it so that every `DIR/fold_K` is a run folder
//! again (with its own copies of the plan and labels): `stu predict --checkpoint DIR/fold_0 …`
//! predicts with it on another machine. Only the files above are read back (no path leaves
//! `DIR`), and `DIR` appears whole or not at all.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

const MANIFEST: &str = "stu-model.json";
const FORMAT: &str = "stu-model 1";
const SHARED: [&str; 2] = ["plans.json", "dataset.json"];
const PER_FOLD: [&str; 4] = ["train.json", "log.jsonl", "validation/summary.json", "transfer.json"];

fn read_json(p: &Path) -> Result<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?).with_context(|| format!("{}: not valid JSON", p.display()))
}

/// Packs `runs` (one model's folds) with their `checkpoint` (`final` or `best`) into `out`.
/// Returns the fold names.
pub fn export(runs: &[PathBuf], checkpoint: &str, out: &Path) -> Result<Vec<String>> {
    ensure!(!runs.is_empty(), "no run folder given");
    ensure!(checkpoint == "final" || checkpoint == "best", "--checkpoint `{checkpoint}`: expected `final` or `best`");
    let ck = format!("checkpoint_{checkpoint}.safetensors");
    let mut folds: Vec<String> = Vec::new();
    for run in runs {
        let cfg = read_json(&run.join("train.json")).with_context(|| format!("{}: not a `stu train` run folder", run.display()))?;
        let fold = cfg["fold"].as_str().with_context(|| format!("{}: no `fold`", run.join("train.json").display()))?.to_string();
        ensure!(!folds.contains(&fold), "{}: fold `{fold}` given twice; a model's folds are distinct", run.display());
        ensure!(run.join(&ck).exists(), "{}: no {ck} (is its training finished?)", run.display());
        for name in SHARED {
            let here = read_json(&run.join(name)).with_context(|| format!("{}: run folders carry their {name} since 2026-11-27; train it again or copy it in", run.display()))?;
            if let Some(first) = runs.first().filter(|f| *f != run) {
                ensure!(here == read_json(&first.join(name))?, "{}: its {name} differs from {}'s; a model's folds share one plan and one label set", run.display(), first.display());
            }
        }
        folds.push(fold);
    }
    let manifest = serde_json::json!({"format": FORMAT, "folds": folds, "checkpoint": ck, "stu": env!("CARGO_PKG_VERSION")});
    stu_core::fs::atomic_with(out, |tmp| {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(tmp)?);
        // Checkpoints are float data that deflate barely shrinks: stored, the rest deflated.
        let deflated = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated).large_file(true);
        let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).large_file(true);
        let mut add = |name: &str, from: &Path, opts| -> std::io::Result<()> {
            zip.start_file(name, opts)?;
            std::io::copy(&mut std::fs::File::open(from)?, &mut zip)?;
            Ok(())
        };
        for name in SHARED {
            add(name, &runs[0].join(name), deflated)?;
        }
        for (run, fold) in runs.iter().zip(&folds) {
            add(&format!("fold_{fold}/{ck}"), &run.join(&ck), stored)?;
            for name in PER_FOLD.iter().filter(|n| run.join(n).exists()) {
                add(&format!("fold_{fold}/{name}"), &run.join(name), deflated)?;
            }
        }
        zip.start_file(MANIFEST, deflated)?;
        zip.write_all((serde_json::to_string_pretty(&manifest).expect("serialisable") + "\n").as_bytes())?;
        zip.finish()?.sync_all()
    })
    .with_context(|| format!("{}: cannot write", out.display()))?;
    Ok(folds)
}

/// Unpacks a model zip into `out` (which must not exist): every `out/fold_K` a run folder.
/// Returns the fold folders.
pub fn install(zip_path: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    ensure!(!out.exists(), "{}: exists; installing never writes over a folder", out.display());
    let file = std::fs::File::open(zip_path).with_context(|| format!("{}: cannot open", zip_path.display()))?;
    let mut zip = zip::ZipArchive::new(file).with_context(|| format!("{}: not a zip file", zip_path.display()))?;
    let mut read = |name: &str| -> Result<Vec<u8>> {
        let mut entry = zip.by_name(name).with_context(|| format!("{}: no `{name}` (not a model exported by `stu export-model`)", zip_path.display()))?;
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes).with_context(|| format!("{}: `{name}` is corrupt", zip_path.display()))?;
        Ok(bytes)
    };
    let manifest: serde_json::Value = serde_json::from_slice(&read(MANIFEST)?).with_context(|| format!("{}: corrupt {MANIFEST}", zip_path.display()))?;
    ensure!(manifest["format"] == FORMAT, "{}: format {}, this version reads `{FORMAT}`", zip_path.display(), manifest["format"]);
    let folds: Vec<String> = serde_json::from_value(manifest["folds"].clone()).with_context(|| format!("{}: no fold list", zip_path.display()))?;
    let ck = manifest["checkpoint"].as_str().filter(|c| *c == "checkpoint_final.safetensors" || *c == "checkpoint_best.safetensors").with_context(|| format!("{}: bad checkpoint name", zip_path.display()))?.to_string();
    for f in &folds {
        ensure!(!f.is_empty() && f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'), "{}: fold name `{f}` is not a plain name", zip_path.display());
    }
    let shared: Vec<(&str, Vec<u8>)> = SHARED.iter().map(|n| Ok((*n, read(n)?))).collect::<Result<_>>()?;
    stu_core::fs::atomic_dir(
        out,
        |tmp| -> Result<Vec<PathBuf>> {
            let mut dirs = Vec::new();
            for f in &folds {
                let dir = tmp.join(format!("fold_{f}"));
                std::fs::create_dir_all(dir.join("validation")).with_context(|| format!("{}: cannot create", dir.display()))?;
                for name in std::iter::once(ck.as_str()).chain(PER_FOLD) {
                    let entry = format!("fold_{f}/{name}");
                    match read(&entry) {
                        Ok(bytes) => std::fs::write(dir.join(name), bytes).with_context(|| format!("{}: cannot write", dir.join(name).display()))?,
                        Err(e) if name == ck || name == "train.json" => return Err(e),
                        Err(_) => {}
                    }
                }
                // Each fold folder is a run folder: its plan and labels beside its checkpoint.
                for (n, bytes) in &shared {
                    std::fs::write(dir.join(n), bytes).with_context(|| format!("{}: cannot write", dir.join(n).display()))?;
                }
                dirs.push(out.join(format!("fold_{f}")));
            }
            for (n, bytes) in &shared {
                std::fs::write(tmp.join(n), bytes).with_context(|| format!("{}: cannot write", tmp.join(n).display()))?;
            }
            Ok(dirs)
        },
        |e| anyhow::Error::new(e).context(format!("{}: cannot move the installed model into place", out.display())),
    )
}

/// `paths` with every installed model folder (one holding `fold_*` run folders and no
/// `train.json` of its own) replaced by its fold folders, in fold order; other paths as they are.
pub fn expand_model_folders(paths: Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if !p.is_dir() || p.join("train.json").exists() {
            out.push(p);
            continue;
        }
        let mut folds: Vec<PathBuf> = std::fs::read_dir(&p)
            .with_context(|| format!("{}: cannot list", p.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.is_dir() && f.file_name().is_some_and(|n| n.to_string_lossy().starts_with("fold_")) && f.join("train.json").exists())
            .collect();
        if folds.is_empty() {
            out.push(p);
            continue;
        }
        folds.sort();
        out.extend(folds);
    }
    Ok(out)
}
