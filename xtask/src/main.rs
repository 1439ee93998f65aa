//! Project automation, rust-analyzer style: `cargo xtask <command>`.
//!
//! - `bench [--python PY] [--no-torch] [--out DIR] [CASES…]`: builds `stu` in release, times
//!   STU-Net forward and forward+backward (`stu bench`), then runs PyTorch's
//!   `../shared/bench/cpu_anchor.py` on the same machine right after, and writes both with their
//!   ratios to `reports/bench/` (JSON and Markdown, with machine, date and git revision).
//!
//! This crate stays thin: it invokes cargo and the built binaries, nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("bench") => bench(args.collect()),
        Some(other) => bail!("unknown xtask `{other}`; available: bench"),
        None => bail!("usage: cargo xtask bench [--python PY] [--no-torch] [--out DIR] [CASES…]"),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    cmd.output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn host() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0) / 1024 / 1024))
        .unwrap_or(0);
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "mem_gib": mem,
        "date": output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])).unwrap_or_default(),
        "git": output(Command::new("git").args(["rev-parse", "--short", "HEAD"]).current_dir(root())).unwrap_or_default(),
        "dirty": output(Command::new("git").args(["status", "--porcelain"]).current_dir(root())).is_some_and(|s| !s.is_empty()),
    })
}

fn bench(args: Vec<String>) -> Result<()> {
    let mut python = std::env::var("STU_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut torch = true;
    let mut out_dir = root().join("reports/bench");
    let mut cases = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--python" => python = it.next().context("--python needs a value")?,
            "--no-torch" => torch = false,
            "--out" => out_dir = PathBuf::from(it.next().context("--out needs a value")?),
            _ => cases.push(a),
        }
    }
    let root = root();
    run(Command::new(env!("CARGO")).args(["build", "--release", "-p", "stu-harness", "--bin", "stu"]).current_dir(&root))?;
    std::fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let ours_path = out_dir.join("stu-cpu.json");
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    run(Command::new(target.join("release/stu")).arg("bench").arg("--json").arg(&ours_path).args(&cases))?;
    let ours: Value = serde_json::from_str(&std::fs::read_to_string(&ours_path)?)?;

    let anchor = root.join("../shared/bench/cpu_anchor.py");
    let torch_path = out_dir.join("torch-cpu.json");
    let mut theirs = Value::Null;
    if torch && anchor.exists() {
        match Command::new(&python).args(["-c", "import torch"]).status() {
            Ok(s) if s.success() => {
                run(Command::new(&python).arg(&anchor).arg(&torch_path))?;
                theirs = serde_json::from_str(&std::fs::read_to_string(&torch_path)?)?;
                // Cases the anchor script lacks (B at 128³ forward+backward), timed the same way.
                let wanted = |id: &str| cases.is_empty() || cases.iter().any(|c| id.contains(c.as_str()));
                if wanted("B_128") {
                    let extra_path = out_dir.join("torch-extra.json");
                    run(Command::new(&python)
                        .arg(root.join("xtask/bench/torch_extra.py"))
                        .arg(anchor.parent().expect("bench dir"))
                        .arg(&extra_path))?;
                    let extra: Value = serde_json::from_str(&std::fs::read_to_string(&extra_path)?)?;
                    for (k, v) in extra.as_object().into_iter().flatten() {
                        theirs[k] = v.clone();
                    }
                    let _ = std::fs::remove_file(&extra_path);
                }
            }
            _ => eprintln!("note: `{python}` has no torch; PyTorch side skipped (use --python or STU_BENCH_PYTHON)"),
        }
    }
    let host = host();
    let mut rows = Vec::new();
    let mut md = format!(
        "# CPU benchmark: STU-Net in Rust (burn {}) vs PyTorch {}\n\n{} · {} cores · {} GiB · {} · git {}{}\n\nMedians in seconds; ratio = ours / PyTorch (lower is better; ≤ 1.0 is the goal).\n\n| case | ours fwd | torch fwd | ratio | ours fwd+bwd | torch fwd+bwd | ratio |\n|---|---|---|---|---|---|---|\n",
        "0.22.1",
        theirs["torch"].as_str().unwrap_or("(not run)"),
        host["cpu"].as_str().unwrap_or(""),
        host["cores"],
        host["mem_gib"],
        host["date"].as_str().unwrap_or(""),
        host["git"].as_str().unwrap_or(""),
        if host["dirty"].as_bool() == Some(true) { " (dirty)" } else { "" },
    );
    let f = |v: &Value| v.as_f64().map(|v| format!("{v:.3}")).unwrap_or_else(|| "–".into());
    let ratio = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    };
    for r in ours["results"].as_array().into_iter().flatten() {
        let case = r["case"].as_str().unwrap_or("");
        let t = &theirs[case];
        md.push_str(&format!(
            "| {case} | {} | {} | {} | {} | {} | {} |\n",
            f(&r["fwd_s"]),
            f(&t["fwd_s"]),
            ratio(&r["fwd_s"], &t["fwd_s"]),
            f(&r["fwd_bwd_s"]),
            f(&t["fwd_bwd_s"]),
            ratio(&r["fwd_bwd_s"], &t["fwd_bwd_s"]),
        ));
        rows.push(json!({ "case": case, "ours": r, "torch": t }));
    }
    let doc = json!({ "host": host, "backend": ours["backend"], "torch": theirs["torch"], "rows": rows });
    std::fs::write(out_dir.join("cpu.json"), serde_json::to_string_pretty(&doc)? + "\n")?;
    std::fs::write(out_dir.join("cpu.md"), &md)?;
    let _ = std::fs::remove_file(&ours_path);
    let _ = std::fs::remove_file(&torch_path);
    print!("{md}");
    eprintln!("wrote {}", out_dir.join("cpu.md").display());
    Ok(())
}
