//! Project automation, rust-analyzer style: `cargo xtask <command>`.
//!
//! - `bench [--python PY] [--no-torch] [--out DIR] [CASES…]`: builds `stu` in release, times
//!   STU-Net forward and forward+backward (`stu bench`), then runs PyTorch's
//!   `../shared/bench/cpu_anchor.py` on the same machine right after, and writes both with their
//!   ratios to `reports/bench/` (JSON and Markdown, with machine, date and git revision).
//!
//! - `bench-preprocess [--python PY]`: writes the two-CT benchmark dataset once
//!   (`stu bench-data`, as `shared/bench/make_synthetic_ct.py`), then plans and preprocesses it
//!   with `stu` and, when PY has `nnunetv2`, with nnU-Net (`-np 1`) on the same files, measuring
//!   wall time and peak RSS with `/usr/bin/time`; writes `reports/bench/preprocess.{json,md}`.
//!
//! - `bench-train [--python PY] [S B | 2d]`: one nnU-Net training step (batch 2, 128³, 105 classes,
//!   deep supervision, SGD) for STU-Net-S and -B with `stu bench train_…`, then the same step in
//!   PyTorch (`xtask/bench/torch_train.py`) right after; writes `reports/bench/train.{json,md}`.
//!   `2d`: nnU-Net's 2-D PlainConvUNet step (batch 12, 256²) against dynamic_network_architectures'
//!   own; writes `reports/bench/train-2d.{json,md}`.
//!
//! - `bench-allreduce [--python PY]`: the data-parallel gradient exchange, one all-reduce of
//!   STU-Net-S/B/L's parameter count between two local ranks (`stu bench allreduce`), then
//!   PyTorch's Gloo on the same buffers right after (`xtask/bench/torch_allreduce.py`); writes
//!   `reports/bench/allreduce.{json,md}`.
//!
//! - `bench-predict [--preset stunet-s|b|l|h]`: whole-volume inference of a whole-body-length
//!   CT (`stu bench-data --long`: 512×512×807 at 0.8×0.8×1.0 mm, 538×273×273 at 1.5 mm, 128
//!   tiles) with a freshly initialised 105-class STU-Net (`stu init`) on the released plan, no
//!   TTA: the full and the fast export, each slab by slab (the default) and from the whole
//!   volume's logits (`STU_EXPORT=whole`, as every version before 2026-11-28 did); wall time
//!   and peak RSS each, the label maps of each pair checked equal; writes
//!   `reports/bench/predict.{json,md}`. With `--probabilities [--classes 15]`: the full export
//!   with `--save-probabilities` (105 classes' probabilities of this CT would be 44 GB of
//!   float16, so a smaller model, 15 classes as AMOS's), slab by slab and from the whole
//!   logits, label maps and probability files checked byte-equal; writes
//!   `reports/bench/predict-probabilities.{json,md}`.
//!
//! - `bench --backend tch-cuda [--python PY]`: on a CUDA machine, builds `stu` with `tch`
//!   (README: "GPU backends") and runs `xtask/bench/gpu_suite.py`: parity on the shared fixture,
//!   `stu check-ops` (the fused ATen paths against burn's composed operators), sliding-window
//!   prediction, and the training step / 128³ inference of S/B/L/H next to
//!   PyTorch (`xtask/bench/torch_gpu.py`) on the same card; writes `reports/bench/gpu.{json,md}`.
//!
//! - `run SPEC [--set k=v]… [--paper-scale]`: builds `stu` in release with the spec's backend
//!   feature and runs every sweep point (`stu run`).
//! - `run SPEC [--set k=v]… --emit slurm [--partition P] [--time HH:MM:SS] [--parallel N]`:
//!   writes a Slurm job array instead (one task per sweep point, after one data job, then the
//!   report) under `slurm/<spec>/`, and prints how to submit it.
//! - `libtorch [DIR]`: assembles the libtorch folders the `tch` feature builds against from
//!   PyPI wheels (`xtask/libtorch.py`; README: "GPU backends").
//! - `llvm [DIR]`: puts Debian's LLVM 23.1 where burn's `cuda` feature looks for one, so that
//!   `--features cuda` builds without its download (`xtask/llvm.py`; README: "GPU backends").
//! - `report [--check]`: run records → tables and figures (`stu-report`, with polars);
//!   `--check` fails when the committed reports are stale.
//!
//! This crate stays thin: it invokes cargo and the built binaries, nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

fn main() -> Result<()> {
    if std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
        println!("{}", help());
        return Ok(());
    }
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("bench") => bench(args.collect()),
        Some("bench-preprocess") => bench_preprocess(args.collect()),
        Some("bench-train") => bench_train(args.collect()),
        Some("bench-allreduce") => bench_allreduce(args.collect()),
        Some("bench-predict") => bench_predict(args.collect()),
        Some("run") => run_spec(args.collect()),
        Some("report") => report(args.collect()),
        Some(script @ ("libtorch" | "llvm")) => {
            let python = std::env::var("STU_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
            run(Command::new(python).arg(root().join(format!("xtask/{script}.py"))).args(args))
        }
        Some(other) => bail!("unknown xtask `{other}`; available: bench, bench-preprocess, bench-train, bench-allreduce, bench-predict, run, report, libtorch, llvm"),
        None => bail!("usage: cargo xtask <command> …; `cargo xtask --help` lists the commands"),
    }
}

/// This file's module documentation, which `cargo xtask --help` (or `-h` after any command)
/// prints.
fn help() -> String {
    include_str!("main.rs")
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .map(|l| l.trim_start_matches("//!").strip_prefix(' ').unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The Python for the reference side: `--python PY` taken out of `args` (the last one wins),
/// else `STU_BENCH_PYTHON`, else `python3`.
fn take_python(args: &mut Vec<String>) -> Result<String> {
    let mut python = std::env::var("STU_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    while let Some(i) = args.iter().position(|a| a == "--python") {
        if i + 1 == args.len() {
            bail!("--python needs a value");
        }
        python = args.remove(i + 1);
        args.remove(i);
    }
    Ok(python)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// The cargo target folder: `CARGO_TARGET_DIR`, else the workspace's `target/`.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"))
}

/// Builds `stu` in release (with `features_args`, e.g. `["--features", "tch"]`) and returns the
/// binary's path.
fn build_stu(root: &Path, features_args: &[&str]) -> Result<PathBuf> {
    run(Command::new(env!("CARGO")).args(["build", "--release", "-p", "stu-harness", "--bin", "stu"]).args(features_args).current_dir(root))?;
    Ok(target_dir(root).join("release/stu"))
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

/// `AMD EPYC · 2 cores · 23 GiB · <date> · git <rev> (dirty)`: the machine line of each report.
fn host_line(host: &Value) -> String {
    format!(
        "{} · {} cores · {} GiB · {} · git {}{}",
        host["cpu"].as_str().unwrap_or(""),
        host["cores"],
        host["mem_gib"],
        host["date"].as_str().unwrap_or(""),
        host["git"].as_str().unwrap_or(""),
        if host["dirty"].as_bool() == Some(true) { " (dirty)" } else { "" },
    )
}

fn bench(mut args: Vec<String>) -> Result<()> {
    if let Some(i) = args.iter().position(|a| a == "--backend") {
        let backend = args.get(i + 1).context("--backend needs a value")?.clone();
        let rest: Vec<String> = args.iter().enumerate().filter(|(j, _)| *j != i && *j != i + 1).map(|(_, a)| a.clone()).collect();
        return match backend.as_str() {
            "flex" => bench(rest),
            "tch-cuda" => bench_gpu(rest),
            other => bail!("`cargo xtask bench --backend {other}`: the suites are `flex` (CPU) and `tch-cuda` (GPU)"),
        };
    }
    let python = take_python(&mut args)?;
    let mut torch = true;
    let mut out_dir = root().join("reports/bench");
    let mut cases = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--no-torch" => torch = false,
            "--out" => out_dir = PathBuf::from(it.next().context("--out needs a value")?),
            _ => cases.push(a),
        }
    }
    let root = root();
    let stu = build_stu(&root, &[])?;
    std::fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let ours_path = out_dir.join("stu-cpu.json");
    run(Command::new(stu).arg("bench").arg("--json").arg(&ours_path).args(&cases))?;
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
                // The baselines (nnU-Net's PlainConvUNet), when its reference is installed.
                if (wanted("plainconv_128") || wanted("unetr_128") || wanted("swinunetr_128") || wanted("nnformer_128")) && Command::new(&python).args(["-c", "import dynamic_network_architectures"]).status().is_ok_and(|s| s.success()) {
                    let base_path = out_dir.join("torch-baselines.json");
                    let families = ["plainconv", "unetr", "swinunetr", "nnformer"].into_iter().filter(|f| wanted(&format!("{f}_128")));
                    run(Command::new(&python).arg(root.join("xtask/bench/torch_baselines.py")).arg(&base_path).args(families))?;
                    let base: Value = serde_json::from_str(&std::fs::read_to_string(&base_path)?)?;
                    for (k, v) in base.as_object().into_iter().flatten().filter(|(k, _)| k.starts_with("plainconv") || k.starts_with("unetr") || k.starts_with("swinunetr") || k.starts_with("nnformer")) {
                        for (kk, vv) in v.as_object().into_iter().flatten() {
                            theirs[k][kk] = vv.clone();
                        }
                    }
                    let _ = std::fs::remove_file(&base_path);
                }
            }
            _ => eprintln!("note: `{python}` has no torch; PyTorch side skipped (use --python or STU_BENCH_PYTHON)"),
        }
    }
    let host = host();
    let mut rows = Vec::new();
    let mut md = format!(
        "# CPU benchmark: STU-Net in Rust (burn {}) vs PyTorch {}\n\n{}\n\nMedians in seconds; ratio = ours / PyTorch (lower is better; ≤ 1.0 is the goal).\n\n| case | ours fwd | torch fwd | ratio | ours fwd+bwd | torch fwd+bwd | ratio |\n|---|---|---|---|---|---|---|\n",
        "0.22.1",
        theirs["torch"].as_str().unwrap_or("(not run)"),
        host_line(&host),
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

/// The GPU suite (see the module docs); needs a CUDA GPU, PyTorch with CUDA in PY, and the
/// `LIBTORCH*` variables of the README for the `tch` build.
fn bench_gpu(mut args: Vec<String>) -> Result<()> {
    let python = take_python(&mut args)?;
    let extra = args;
    let root = root();
    let stu = build_stu(&root, &["--features", "tch"])?;
    let shared = root.join("../shared");
    let out = std::env::temp_dir().join(format!("stu-gpu-suite-{}", std::process::id()));
    run(Command::new(&python)
        .arg(root.join("xtask/bench/gpu_suite.py"))
        .arg("--stu")
        .arg(stu)
        .arg("--bench-dir")
        .arg(shared.join("bench"))
        .arg("--fixture")
        .arg(shared.join("fixtures/stunet-parity/tiny_iso.safetensors"))
        .arg("--mr")
        .arg(shared.join("data/Dataset802_TotalSegExampleMR/imagesTr"))
        .arg("--ct")
        .arg(shared.join("data/Dataset801_TotalSegExampleCT/imagesTr"))
        .arg("--out")
        .arg(&out)
        .args(&extra))?;
    let dir = root.join("reports/bench");
    std::fs::copy(out.join("suite.json"), dir.join("gpu.json"))?;
    std::fs::copy(out.join("suite.md"), dir.join("gpu.md"))?;
    eprintln!("wrote {}", dir.join("gpu.md").display());
    Ok(())
}

/// Runs `cmd` under `/usr/bin/time`, returning (wall seconds, peak RSS in GiB).
fn timed(cmd: &mut Command) -> Result<(f64, Option<f64>)> {
    let stats = std::env::temp_dir().join(format!("stu-time-{}", std::process::id()));
    let (prog, args): (String, Vec<String>) = (cmd.get_program().to_string_lossy().into(), cmd.get_args().map(|a| a.to_string_lossy().into()).collect());
    let have_time = Path::new("/usr/bin/time").exists();
    let start = std::time::Instant::now();
    let status = if have_time {
        let mut t = Command::new("/usr/bin/time");
        t.args(["-f", "%e %M", "-o"]).arg(&stats).arg(&prog).args(&args);
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => t.env(k, v),
                None => t.env_remove(k),
            };
        }
        eprintln!("$ {prog} {}", args.join(" "));
        t.stdout(std::process::Stdio::null()).status()?
    } else {
        cmd.stdout(std::process::Stdio::null()).status()?
    };
    let wall = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{prog} failed: {status}");
    }
    let rss = std::fs::read_to_string(&stats).ok().and_then(|s| s.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok())).map(|kb| kb / 1024.0 / 1024.0);
    let _ = std::fs::remove_file(&stats);
    Ok((wall, rss))
}

fn bench_preprocess(mut args: Vec<String>) -> Result<()> {
    let python = take_python(&mut args)?;
    if let Some(other) = args.first() {
        bail!("unknown option `{other}`");
    }
    let root = root();
    let stu = build_stu(&root, &[])?;
    let work = target_dir(&root).join("bench-preprocess");
    let data_root = work.join("raw");
    run(Command::new(&stu).arg("bench-data").arg("--out").arg(&data_root))?;
    let dataset = data_root.join("Dataset990_SyntheticCT");
    let ours_out = work.join("ours");
    let _ = std::fs::remove_dir_all(&ours_out);
    let (plan_s, plan_rss) = timed(Command::new(&stu).arg("plan").arg(&dataset).arg("--out").arg(ours_out.join("plans.json")))?;
    let (pre_s, pre_rss) = timed(Command::new(&stu).arg("preprocess").arg(&dataset).arg("--plans").arg(ours_out.join("plans.json")).arg("--out").arg(ours_out.join("pre")))?;
    let plans: Value = serde_json::from_str(&std::fs::read_to_string(ours_out.join("plans.json"))?)?;
    let conf = &plans["configurations"]["3d_fullres"];

    let mut theirs = Value::Null;
    let has_nnunet = Command::new(&python).args(["-c", "import nnunetv2"]).status().is_ok_and(|s| s.success());
    if has_nnunet {
        let bin = |name: &str| Path::new(&python).parent().map(|p| p.join(name)).filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from(name));
        let nn = work.join("nnunet");
        let _ = std::fs::remove_dir_all(&nn);
        for d in ["raw", "pre", "res"] {
            std::fs::create_dir_all(nn.join(d))?;
        }
        #[cfg(unix)]
        std::os::unix::fs::symlink(&dataset, nn.join("raw/Dataset990_SyntheticCT"))?;
        let env = |c: &mut Command| {
            c.env("nnUNet_raw", nn.join("raw")).env("nnUNet_preprocessed", nn.join("pre")).env("nnUNet_results", nn.join("res"));
        };
        let mut fp = Command::new(bin("nnUNetv2_extract_fingerprint"));
        fp.args(["-d", "990", "-np", "1"]);
        env(&mut fp);
        let (fp_s, fp_rss) = timed(&mut fp)?;
        let mut pl = Command::new(bin("nnUNetv2_plan_experiment"));
        pl.args(["-d", "990"]);
        env(&mut pl);
        let (pl_s, _) = timed(&mut pl)?;
        let mut pp = Command::new(bin("nnUNetv2_preprocess"));
        pp.args(["-d", "990", "-c", "3d_fullres", "-np", "1"]);
        env(&mut pp);
        let (pp_s, pp_rss) = timed(&mut pp)?;
        let nplans: Value = serde_json::from_str(&std::fs::read_to_string(nn.join("pre/Dataset990_SyntheticCT/nnUNetPlans.json"))?)?;
        let nconf = &nplans["configurations"]["3d_fullres"];
        theirs = json!({
            "fingerprint_s": fp_s, "fingerprint_rss_gib": fp_rss, "plan_s": pl_s,
            "preprocess_s": pp_s, "preprocess_rss_gib": pp_rss,
            "spacing": nconf["spacing"], "patch_size": nconf["patch_size"],
        });
    } else {
        eprintln!("note: `{python}` has no nnunetv2; nnU-Net side skipped (use --python or STU_BENCH_PYTHON)");
    }
    let host = host();
    let ratio = |a: f64, b: &Value| b.as_f64().map(|b| format!("{:.2}×", a / b)).unwrap_or_else(|| "–".into());
    let gib = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into());
    let mut md = format!(
        "# Preprocessing benchmark: Dataset990_SyntheticCT (512×512×300 @ 0.8×0.8×1.0 mm, 512×512×150 @ 0.7×0.7×2.0 mm)\n\n{}\n\nplan: spacing {} patch {} (nnU-Net: {} {})\n\n| step | ours (s) | ours peak RSS (GiB) | nnU-Net (s) | nnU-Net peak RSS (GiB) | time ratio | RSS ratio |\n|---|---|---|---|---|---|---|\n",
        host_line(&host),
        conf["spacing"],
        conf["patch_size"],
        theirs["spacing"],
        theirs["patch_size"],
    );
    let steps = [
        ("fingerprint + plan", plan_s, plan_rss, "fingerprint_s", "fingerprint_rss_gib"),
        ("preprocess (crop, normalise, resample, class locations, save)", pre_s, pre_rss, "preprocess_s", "preprocess_rss_gib"),
    ];
    for (step, secs, rss, their_s, their_rss) in steps {
        md.push_str(&format!(
            "| {step} | {secs:.2} | {} | {} | {} | {} | {} |\n",
            gib(rss),
            theirs[their_s].as_f64().map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into()),
            gib(theirs[their_rss].as_f64()),
            ratio(secs, &theirs[their_s]),
            rss.map(|r| ratio(r, &theirs[their_rss])).unwrap_or_else(|| "–".into()),
        ));
    }
    md.push_str("\nOurs: one case at a time (`--jobs 1`), voxel loops on every core; nnU-Net: `-np 1`, as in `shared/docs/anchors.md`. Goal: ≤ 0.25× time and ≤ 0.5× peak RSS.\n");
    let doc = json!({
        "host": host,
        "ours": {"plan_s": plan_s, "plan_rss_gib": plan_rss, "preprocess_s": pre_s, "preprocess_rss_gib": pre_rss, "spacing": conf["spacing"], "patch_size": conf["patch_size"]},
        "nnunet": theirs,
    });
    let out_dir = root.join("reports/bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("preprocess.json"), serde_json::to_string_pretty(&doc)? + "\n")?;
    std::fs::write(out_dir.join("preprocess.md"), &md)?;
    print!("{md}");
    Ok(())
}

fn bench_train(mut args: Vec<String>) -> Result<()> {
    let python = take_python(&mut args)?;
    let mut sizes = Vec::new();
    for a in args {
        match a.as_str() {
            "S" | "B" | "2d" => sizes.push(a),
            other => bail!("bench-train: unknown argument `{other}` (sizes: S, B; or 2d, nnU-Net's 2-D network, reported apart)"),
        }
    }
    if sizes.is_empty() {
        sizes = vec!["S".into(), "B".into()];
    }
    // nnU-Net's 2-D network gets its own report (`train-2d.md`), the STU-Net sizes theirs.
    let two_d = sizes.iter().any(|s| s == "2d");
    ensure!(!two_d || sizes.len() == 1, "bench-train: run `2d` on its own (it writes train-2d.md)");
    let stem = if two_d { "train-2d" } else { "train" };
    let root = root();
    let stu = build_stu(&root, &[])?;
    let out_dir = root.join("reports/bench");
    std::fs::create_dir_all(&out_dir)?;
    let ours_path = out_dir.join("stu-train.json");
    let cases: Vec<String> = sizes.iter().map(|s| if s == "2d" { "train_plain2d_256_b12".to_string() } else { format!("train_{s}_128_b2") }).collect();
    run(Command::new(stu).arg("bench").arg("--json").arg(&ours_path).args(&cases))?;
    let ours: Value = serde_json::from_str(&std::fs::read_to_string(&ours_path)?)?;
    let torch_path = out_dir.join("torch-train.json");
    run(Command::new(&python).arg(root.join("xtask/bench/torch_train.py")).arg(root.join("../shared/bench")).arg(&torch_path).args(&sizes))?;
    let theirs: Value = serde_json::from_str(&std::fs::read_to_string(&torch_path)?)?;
    let host = host();
    let (what, step) = if two_d {
        ("nnU-Net's 2-D PlainConvUNet", "One nnU-Net `2d` step: batch 12, 1 channel, 256², 105 classes, 7 stages (32 … 512 features; ours: `[1, 3, 3]` kernels on one-slice patches, theirs: `Conv2d`), 6 deep-supervision outputs")
    } else {
        ("STU-Net", "One nnU-Net step: batch 2, 1 channel, 128³, 105 classes, deep supervision")
    };
    let mut md = format!(
        "# CPU training step: {what} in Rust (burn 0.22.1) vs PyTorch {}\n\n{}\n\n{step}, Dice + CE, clip 12, Nesterov SGD. Median of 2 after a warm-up, seconds; ratio = ours / PyTorch.\n\n| case | ours (s) | PyTorch (s) | ratio | ours it/s | PyTorch it/s |\n|---|---|---|---|---|---|\n",
        theirs["torch"].as_str().unwrap_or("?"),
        host_line(&host),
    );
    let mut rows = Vec::new();
    for r in ours["results"].as_array().into_iter().flatten() {
        let case = r["case"].as_str().unwrap_or("");
        let (a, b) = (r["train_s"].as_f64().unwrap_or(f64::NAN), theirs[case]["train_s"].as_f64().unwrap_or(f64::NAN));
        md.push_str(&format!("| {case} | {a:.2} | {b:.2} | {:.2}× | {:.3} | {:.3} |\n", a / b, 1.0 / a, 1.0 / b));
        rows.push(json!({ "case": case, "ours": r, "torch": theirs[case] }));
    }
    std::fs::write(out_dir.join(format!("{stem}.json")), serde_json::to_string_pretty(&json!({ "host": host, "torch": theirs["torch"], "rows": rows }))? + "\n")?;
    std::fs::write(out_dir.join(format!("{stem}.md")), &md)?;
    let _ = std::fs::remove_file(&ours_path);
    let _ = std::fs::remove_file(&torch_path);
    print!("{md}");
    Ok(())
}

fn bench_allreduce(mut args: Vec<String>) -> Result<()> {
    let python = take_python(&mut args)?;
    if let Some(other) = args.first() {
        bail!("bench-allreduce: unknown argument `{other}`");
    }
    let root = root();
    let stu = build_stu(&root, &[])?;
    let out_dir = root.join("reports/bench");
    std::fs::create_dir_all(&out_dir)?;
    let ours_path = out_dir.join("stu-allreduce.json");
    run(Command::new(stu).args(["bench", "allreduce", "--json"]).arg(&ours_path))?;
    let ours: Value = serde_json::from_str(&std::fs::read_to_string(&ours_path)?)?;
    let out = Command::new(&python).arg(root.join("xtask/bench/torch_allreduce.py")).output().with_context(|| format!("cannot run `{python}`"))?;
    ensure!(out.status.success(), "torch_allreduce.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let theirs: Value = serde_json::from_slice(&out.stdout).context("torch_allreduce.py printed no JSON")?;
    let host = host();
    let mut md = format!(
        "# Data-parallel gradient all-reduce: ours (TCP ring, `stu_engine::dist`) vs PyTorch {} Gloo\n\n{}\n\nOne sum all-reduce of a float32 buffer of the model's parameter count between two ranks on this machine over loopback TCP; median of 5 after a warm-up, seconds; ratio = ours / Gloo.\n\n| case | values | ours (s) | Gloo (s) | ratio | ours GB/s sent per rank |\n|---|---|---|---|---|---|\n",
        theirs["torch"].as_str().unwrap_or("?"),
        host_line(&host),
    );
    let mut rows = Vec::new();
    for r in ours["results"].as_array().into_iter().flatten() {
        let label = r["case"].as_str().unwrap_or("");
        let (case, values) = label.split_once(" (").unwrap_or((label, ""));
        let n: f64 = values.trim_end_matches(" values)").parse().unwrap_or(f64::NAN);
        let (a, b) = (r["train_s"].as_f64().unwrap_or(f64::NAN), theirs["results"][case].as_f64().unwrap_or(f64::NAN));
        // A ring of two sends half the buffer in each of its two phases: n values per rank.
        md.push_str(&format!("| {case} | {n} | {a:.3} | {b:.3} | {:.2}× | {:.2} |\n", a / b, n * 4.0 / a / 1e9));
        rows.push(json!({ "case": case, "values": n, "ours": r, "gloo_s": b }));
    }
    std::fs::write(out_dir.join("allreduce.json"), serde_json::to_string_pretty(&json!({ "host": host, "torch": theirs["torch"], "rows": rows }))? + "\n")?;
    std::fs::write(out_dir.join("allreduce.md"), &md)?;
    let _ = std::fs::remove_file(&ours_path);
    print!("{md}");
    Ok(())
}

fn bench_predict(args: Vec<String>) -> Result<()> {
    const USAGE: &str = "usage: cargo xtask bench-predict [--preset stunet-s|stunet-b|stunet-l|stunet-h] [--probabilities [--classes 15]]";
    let (mut preset, mut probabilities, mut classes) = ("stunet-s".to_string(), false, None);
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--preset" => preset = it.next().context(USAGE)?,
            "--probabilities" => probabilities = true,
            "--classes" => classes = Some(it.next().context(USAGE)?.parse::<usize>().context(USAGE)?),
            _ => bail!(USAGE),
        }
    }
    ensure!(classes.is_none() || probabilities, "--classes goes with --probabilities ({USAGE})");
    let classes = classes.unwrap_or(if probabilities { 15 } else { 105 });
    ensure!(classes >= 2, "--classes {classes}: at least background and one label");
    let root = root();
    let stu = build_stu(&root, &[])?;
    let work = target_dir(&root).join("bench-predict");
    run(Command::new(&stu).arg("bench-data").arg("--out").arg(work.join("raw")).arg("--long"))?;
    let input = work.join("input");
    let _ = std::fs::remove_dir_all(&input);
    std::fs::create_dir_all(&input)?;
    #[cfg(unix)]
    std::os::unix::fs::symlink(work.join("raw/Dataset990_SyntheticCT/imagesTs/long_0000.nii.gz"), input.join("long_0000.nii.gz"))?;
    let model = work.join(format!("{preset}-{classes}.safetensors"));
    run(Command::new(&stu).args(["init", "--classes", &classes.to_string(), "--options"]).arg(json!({ "preset": preset }).to_string()).arg("--out").arg(&model))?;
    // (id, what, extra arguments, the whole volume's logits summed first: `STU_EXPORT=whole`)
    let variants: Vec<(&str, &str, &[&str], bool)> = if probabilities {
        vec![
            ("probs", "full export with `--save-probabilities`, slab by slab as the window finishes slices (default since 2026-11-28)", &["--save-probabilities"], false),
            ("probs-whole", "full export with `--save-probabilities` from the whole volume's logits (`STU_EXPORT=whole`; every version before 2026-11-28)", &["--save-probabilities"], true),
        ]
    } else {
        vec![
            ("full", "full export, slab by slab as the window finishes slices (default)", &[], false),
            ("full-whole", "full export from the whole volume's logits (`STU_EXPORT=whole`; every version before 2026-11-28)", &[], true),
            ("fast", "fast export (`--fast-export`), slab by slab (default)", &["--fast-export"], false),
            ("fast-whole", "fast export from the whole volume's logits (`STU_EXPORT=whole`; before 2026-11-28)", &["--fast-export"], true),
        ]
    };
    let host = host();
    let logits_gb = classes as f64 * 538.0 * 273.0 * 273.0 * 4.0 / 1e9;
    let probs_note = if probabilities { format!(" Each writes the probabilities, {classes} × 211 M voxels × 2 B = {:.1} GB of float16.", classes as f64 * 512.0 * 512.0 * 807.0 * 2.0 / 1e9) } else { String::new() };
    let mut md = format!(
        "# Whole-volume inference: one whole-body-length CT, `stu predict`{}\n\n{}\n\n512×512×807 CT at 0.8×0.8×1.0 mm (`stu bench-data --long`) → 538×273×273 at 1.5 mm (the released plan), 128 tiles of 128³, no TTA; `{preset}` with {classes} classes, freshly initialised (`stu init`); flex backend. Wall time and peak RSS of the whole process (`/usr/bin/time`). The logits of the whole volume alone are {classes} × 39.6 M × 4 B = {logits_gb:.1} GB.{probs_note}\n\n| variant | wall (s) | peak RSS (GiB) |\n|---|---|---|\n",
        if probabilities { " --save-probabilities" } else { "" },
        host_line(&host)
    );
    let mut rows = Vec::new();
    for (id, what, extra, whole) in variants {
        let out = work.join(format!("out-{id}"));
        let _ = std::fs::remove_dir_all(&out);
        let mut cmd = Command::new(&stu);
        cmd.arg("predict").arg("-i").arg(&input).arg("-o").arg(&out).arg("--checkpoint").arg(&model).arg("--disable-tta").args(extra);
        cmd.env("STU_EXPORT", if whole { "whole" } else { "slabs" });
        // The whole volume's logits may not fit this machine: that is a result, not an error.
        match timed(&mut cmd) {
            Ok((wall, rss)) => {
                md.push_str(&format!("| {what} | {wall:.1} | {} |\n", rss.map_or("–".into(), |r| format!("{r:.2}"))));
                rows.push(json!({ "variant": id, "what": what, "wall_s": wall, "peak_rss_gib": rss }));
            }
            Err(e) => {
                md.push_str(&format!("| {what} | did not finish: {e} | |\n"));
                rows.push(json!({ "variant": id, "what": what, "error": e.to_string() }));
            }
        }
    }
    let map = |id: &str| std::fs::read(work.join(format!("out-{id}/long.nii.gz"))).ok();
    let exports: &[&str] = if probabilities { &["probs"] } else { &["full", "fast"] };
    for &export in exports {
        if let (Some(a), Some(b)) = (map(export), map(&format!("{export}-whole"))) {
            ensure!(a == b, "the {export} export's label maps differ between slab by slab and whole");
            md.push_str(&format!("\nThe two {export} exports wrote byte-identical label maps.\n"));
        }
    }
    if probabilities {
        let file = |id: &str| work.join(format!("out-{id}/long.probabilities.safetensors"));
        if file("probs").exists() && file("probs-whole").exists() {
            ensure!(same_bytes(&file("probs"), &file("probs-whole"))?, "the probabilities differ between slab by slab and whole");
            md.push_str("They wrote byte-identical probability files.\n");
        }
        // (Gigabytes each; the measurement is done.)
        for id in ["probs", "probs-whole"] {
            let _ = std::fs::remove_file(file(id));
        }
    }
    let out_dir = root.join("reports/bench");
    std::fs::create_dir_all(&out_dir)?;
    let name = if probabilities { "predict-probabilities" } else { "predict" };
    std::fs::write(out_dir.join(format!("{name}.json")), serde_json::to_string_pretty(&json!({ "host": host, "preset": preset, "classes": classes, "rows": rows }))? + "\n")?;
    std::fs::write(out_dir.join(format!("{name}.md")), &md)?;
    print!("{md}");
    Ok(())
}

/// Whether two files hold the same bytes (read in pieces: they may be gigabytes).
fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 22], vec![0u8; 1 << 22]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// The `backend = "…"` line of a spec (the cargo feature to build with).
fn spec_backend(spec: &Path) -> Result<String> {
    let text = std::fs::read_to_string(spec).with_context(|| format!("{}: cannot read", spec.display()))?;
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("backend")
            && let Some(v) = rest.trim_start().strip_prefix('=')
        {
            return Ok(v.trim().trim_matches('"').to_string());
        }
        if l.starts_with('[') {
            break; // top-level keys come first
        }
    }
    Ok("flex".into())
}

fn run_spec(args: Vec<String>) -> Result<()> {
    let spec = args.first().context("usage: cargo xtask run experiments/X.toml [--set key=value]… [--paper-scale] [--emit slurm …]")?;
    if let Some(i) = args.iter().position(|a| a == "--emit") {
        let what = args.get(i + 1).context("--emit needs a value (slurm)")?;
        ensure!(what == "slurm", "--emit {what}: only `slurm` is known");
        let rest: Vec<String> = args.iter().enumerate().filter(|(j, _)| *j != i && *j != i + 1).map(|(_, a)| a.clone()).collect();
        return emit_slurm(rest);
    }
    let backend = spec_backend(Path::new(spec))?;
    let feature = match backend.as_str() {
        "tch-cuda" => "tch".to_string(),
        b => b.to_string(),
    };
    let root = root();
    let stu = build_stu(&root, &["--no-default-features", "--features", &feature])?;
    run(Command::new(stu).arg("run").args(&args).current_dir(&root))
}

/// Options of the emitted Slurm scripts.
struct SlurmOptions {
    partition: Option<String>,
    time: String,
    parallel: Option<usize>,
}

/// Writes `slurm/<spec stem>/{data,points,report}.sbatch` and `submit.sh` for `stu run` of the
/// spec's points as a job array (see the module docs); `args` = spec, `stu run` flags
/// (`--set`, `--paper-scale`, `--out`) and the Slurm options.
fn emit_slurm(args: Vec<String>) -> Result<()> {
    let mut opts = SlurmOptions { partition: None, time: "24:00:00".into(), parallel: None };
    let mut run_args = Vec::new();
    let mut it = args.into_iter();
    let spec = PathBuf::from(it.next().context("spec missing")?);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--partition" => opts.partition = Some(it.next().context("--partition needs a value")?),
            "--time" => opts.time = it.next().context("--time needs a value")?,
            "--parallel" => opts.parallel = Some(it.next().context("--parallel needs a value")?.parse().context("--parallel: not a number")?),
            _ => run_args.push(a),
        }
    }
    let backend = spec_backend(&spec)?;
    let feature = if backend == "tch-cuda" { "tch".to_string() } else { backend.clone() };
    let root = root();
    let stu = build_stu(&root, &["--no-default-features", "--features", &feature])?;
    let count = output(Command::new(&stu).arg("run").arg(&spec).args(&run_args).arg("--count").current_dir(&root))
        .with_context(|| format!("`stu run {} --count` failed; check the spec with `stu spec check`", spec.display()))?;
    let n: usize = count.trim().parse().with_context(|| format!("`stu run --count` printed `{count}`"))?;
    ensure!(n > 0, "{}: the study has no points", spec.display());
    let stem = spec.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "study".into());
    let dir = root.join("slurm").join(&stem);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let gpu = matches!(backend.as_str(), "tch-cuda" | "cuda" | "wgpu");
    let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let stu_args = std::iter::once(spec.display().to_string()).chain(run_args.iter().cloned()).map(|a| quote(&a)).collect::<Vec<_>>().join(" ");
    let header = |name: &str, extra: &str| {
        let mut h = format!("#!/bin/bash\n# Written by `cargo xtask run {} --emit slurm`; edit the resources to your cluster.\n#SBATCH --job-name=stu-{stem}-{name}\n#SBATCH --output={}/%x-%A_%a.out\n#SBATCH --time={}\n", spec.display(), dir.display(), opts.time);
        if let Some(p) = &opts.partition {
            h.push_str(&format!("#SBATCH --partition={p}\n"));
        }
        h.push_str(extra);
        h.push_str(&format!("set -euo pipefail\ncd {}\n", quote(&root.display().to_string())));
        if backend == "tch-cuda" {
            h.push_str("# libtorch and CUDA libraries of the PyTorch the binary was built against (README: GPU backends).\n. xtask/tch-env.sh\n");
        }
        h
    };
    let point_res = if gpu { "#SBATCH --gres=gpu:1\n#SBATCH --cpus-per-task=8\n#SBATCH --mem=64G\n#SBATCH --requeue\n" } else { "#SBATCH --cpus-per-task=4\n#SBATCH --mem=24G\n#SBATCH --requeue\n" };
    let stu_q = quote(&stu.display().to_string());
    let data = header("data", "#SBATCH --cpus-per-task=4\n#SBATCH --mem=24G\n") + &format!("{stu_q} run {stu_args} --data-only\n");
    let array = match opts.parallel {
        Some(p) => format!("#SBATCH --array=0-{}%{p}\n", n - 1),
        None => format!("#SBATCH --array=0-{}\n", n - 1),
    };
    // A requeued or resubmitted task skips a finished point (its record.json exists).
    let points = header("points", &(array + point_res)) + &format!("{stu_q} run {stu_args} --point \"$SLURM_ARRAY_TASK_ID\"\n");
    let report = header("report", "#SBATCH --cpus-per-task=2\n#SBATCH --mem=8G\n") + "cargo xtask report\n";
    let submit = format!(
        "#!/bin/bash\n# Submits the study `{}` ({n} point(s)) as: data → job array → report.\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\ndata=$(sbatch --parsable data.sbatch)\npoints=$(sbatch --parsable --dependency=afterok:$data points.sbatch)\nsbatch --dependency=afterany:$points report.sbatch\necho \"submitted: data $data, points $points (array 0-{})\"\n",
        spec.display(),
        n - 1
    );
    for (name, text) in [("data.sbatch", data), ("points.sbatch", points), ("report.sbatch", report), ("submit.sh", submit)] {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    println!("{n} point(s); submit with: bash {}", dir.join("submit.sh").display());
    Ok(())
}

fn report(args: Vec<String>) -> Result<()> {
    let root = root();
    run(Command::new(env!("CARGO")).args(["run", "--release", "-p", "stu-report", "--features", "tables", "--bin", "stu-report", "--"]).args(&args).current_dir(&root))
}
