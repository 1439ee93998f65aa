//! `stu bench`: CPU timings of STU-Net forward and forward+backward, the same cases as
//! `shared/bench/cpu_anchor.py` so the two can run side by side and be compared as ratios.
//!
//! Forward runs without autodiff; forward+backward runs on an autodiff device and back-propagates
//! `mean(output.0)` through the deep-supervision forward, as the anchor script does.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use stu_engine::backend::Backend;
use stu_engine::precision::Precision;
use stu_engine::model::SegNet;
use stu_engine::{Device, Tensor, TensorData};
use zoo::stunet::{ISO_STRIDES, ResBlock, StuNet, StuNetArch, TOTALSEG_CLASSES};

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Case id, as in `cpu_anchor.py`.
    pub case: String,
    /// Median forward time (no grad), seconds.
    pub fwd_s: Option<f64>,
    /// Median forward+backward time, seconds.
    pub fwd_bwd_s: Option<f64>,
    /// Every forward sample.
    pub fwd_samples: Vec<f64>,
    /// Every forward+backward sample.
    pub fwd_bwd_samples: Vec<f64>,
    /// Median full training step (forward, loss, backward, clip, SGD), seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_s: Option<f64>,
    /// Every training-step sample.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub train_samples: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn time(n: usize, f: impl FnMut()) -> Vec<f64> {
    time_warm(1, n, f)
}

fn time_warm(warm: usize, n: usize, mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..warm {
        f();
    }
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

fn randn(shape: [usize; 5], device: &Device) -> Tensor<5> {
    // A fixed pseudo-random input; values do not affect speed.
    let data = stu_core::rng::SplitMix64::new(7).fill_f32(shape.iter().product(), -0.5, 0.5);
    Tensor::from_data(TensorData::new(data, shape), device)
}

// (A handful per run, never moved in bulk: no need to box the large variant.)
#[allow(clippy::large_enum_variant)]
enum Net {
    Block(ResBlock),
    StuNet(StuNet),
    /// A registered model at its default size (the baselines).
    Zoo(&'static str, Box<dyn SegNet>),
}

impl Net {
    fn build(&self, device: &Device) -> Net {
        match self {
            Net::Block(b) => Net::Block(ResBlock::new(
                b.conv1.weight.dims()[1],
                b.conv1.weight.dims()[0],
                b.conv1.stride,
                b.conv3.is_some(),
                device,
            )),
            Net::StuNet(n) => Net::StuNet(StuNet::new(&n.arch, device).expect("valid")),
            Net::Zoo(name, _) => zoo_net(name, device),
        }
    }
    /// The same network with untracked parameters, for the forward-only timings (see
    /// [`inference_net`]).
    fn valid(self) -> Net {
        use stu_engine::burn::module::Module;
        match self {
            Net::Block(b) => Net::Block(b.valid()),
            Net::StuNet(n) => Net::StuNet(Module::valid(&n)),
            Net::Zoo(name, n) => Net::Zoo(name, n.valid()),
        }
    }
    fn forward(&self, x: Tensor<5>, ds: bool) -> Tensor<5> {
        match self {
            Net::Block(b) => {
                let l = stu_engine::ops::Layout::for_device(&x.device());
                l.to_ncdhw(b.forward(l.from_ncdhw(x), l))
            }
            Net::StuNet(n) if ds => n.forward_ds(x).swap_remove(0),
            Net::StuNet(n) => n.forward(x),
            Net::Zoo(_, n) if ds => n.forward_ds(x).swap_remove(0),
            Net::Zoo(_, n) => n.forward(x),
        }
    }
}

/// Cases to run, with the anchor's repetition counts.
pub struct Case {
    /// Id.
    pub id: &'static str,
    /// Input shape.
    pub shape: [usize; 5],
    /// Forward repetitions.
    pub n_fwd: usize,
    /// Forward+backward repetitions (0: skip).
    pub n_bwd: usize,
}

/// The anchor's cases (`cpu_anchor.py`) plus B at 128³ forward+backward.
pub fn anchor_cases() -> Vec<Case> {
    vec![
        Case { id: "block32_64", shape: [1, 32, 64, 64, 64], n_fwd: 5, n_bwd: 5 },
        Case { id: "block1to32_128", shape: [1, 1, 128, 128, 128], n_fwd: 3, n_bwd: 3 },
        Case { id: "S_64", shape: [1, 1, 64, 64, 64], n_fwd: 5, n_bwd: 3 },
        Case { id: "B_64", shape: [1, 1, 64, 64, 64], n_fwd: 5, n_bwd: 3 },
        Case { id: "S_128_fwd", shape: [1, 1, 128, 128, 128], n_fwd: 3, n_bwd: 0 },
        Case { id: "B_128_fwd", shape: [1, 1, 128, 128, 128], n_fwd: 3, n_bwd: 0 },
        Case { id: "S_128", shape: [1, 1, 128, 128, 128], n_fwd: 1, n_bwd: 2 },
        Case { id: "B_128", shape: [1, 1, 128, 128, 128], n_fwd: 1, n_bwd: 2 },
        Case { id: "plainconv_128_fwd", shape: [1, 1, 128, 128, 128], n_fwd: 3, n_bwd: 0 },
        Case { id: "plainconv_128", shape: [1, 1, 128, 128, 128], n_fwd: 1, n_bwd: 2 },
        Case { id: "unetr_128_fwd", shape: [1, 1, 128, 128, 128], n_fwd: 3, n_bwd: 0 },
        Case { id: "unetr_128", shape: [1, 1, 128, 128, 128], n_fwd: 1, n_bwd: 2 },
        Case { id: "swinunetr_128_fwd", shape: [1, 1, 128, 128, 128], n_fwd: 3, n_bwd: 0 },
        Case { id: "swinunetr_128", shape: [1, 1, 128, 128, 128], n_fwd: 1, n_bwd: 2 },
        Case { id: "nnformer_128_fwd", shape: [1, 1, 128, 128, 128], n_fwd: 3, n_bwd: 0 },
        Case { id: "nnformer_128", shape: [1, 1, 128, 128, 128], n_fwd: 1, n_bwd: 2 },
    ]
}

fn net_for(id: &str, device: &Device) -> Net {
    let preset = |label: &str| {
        let e = zoo::stunet::presets().into_iter().find(|p| p.label == label).expect("preset");
        StuNetArch::from_rule(e.rule, 1, TOTALSEG_CLASSES, ISO_STRIDES.to_vec())
    };
    match id {
        "block32_64" => Net::Block(ResBlock::new(32, 32, [1; 3], false, device)),
        "block1to32_128" => Net::Block(ResBlock::new(1, 32, [1; 3], true, device)),
        id if id.starts_with("plainconv") => zoo_net("nnunet-plainconv", device),
        id if id.starts_with("unetr") => zoo_net("unetr", device),
        id if id.starts_with("swinunetr") => zoo_net("swinunetr", device),
        id if id.starts_with("nnformer") => zoo_net("nnformer", device),
        id if id.starts_with("S_") => Net::StuNet(StuNet::new(&preset("S"), device).expect("valid")),
        _ => Net::StuNet(StuNet::new(&preset("B"), device).expect("valid")),
    }
}

/// A registered model at its default configuration for 1 channel, 105 classes and five 2³
/// downsamplings (nnU-Net's 3d_fullres network for a 128³ patch).
fn zoo_net(name: &'static str, device: &Device) -> Net {
    let entry = stu_engine::model::registry().get(name).expect("registered");
    // Models built for one input size (nnFormer's crop) are built for the 128³ patch.
    let options = if name == "nnformer" { serde_json::json!({"crop_size": [128, 128, 128]}) } else { serde_json::Value::Null };
    let spec = stu_engine::model::NetSpec { in_channels: 1, num_classes: TOTALSEG_CLASSES, strides: ISO_STRIDES.to_vec(), options };
    Net::Zoo(name, stu_engine::train::seeded_init((entry.build)(&spec, device).expect("default size"), 0))
}

/// Training-step cases: nnU-Net's step (batch 2, 1 channel, 128³, 105 classes, deep
/// supervision, Dice + CE, clip 12, Nesterov SGD) for a preset, as `xtask/bench/torch_train.py`
/// (CPU) and `xtask/bench/torch_gpu.py` (GPU).
pub const TRAIN_CASES: [(&str, &str); 4] =
    [("train_S_128_b2", "stunet-s"), ("train_B_128_b2", "stunet-b"), ("train_L_128_b2", "stunet-l"), ("train_H_128_b2", "stunet-h")];

/// Inference cases: one 128³ patch, batch 1, full-resolution head only, no TTA (the GPU
/// anchor's inference row).
pub const INFER_CASES: [(&str, &str); 4] =
    [("infer_S_128", "stunet-s"), ("infer_B_128", "stunet-b"), ("infer_L_128", "stunet-l"), ("infer_H_128", "stunet-h")];

/// Whole-volume sliding-window cases (`shared/bench/gpu_sliding_window.py`): a random volume at
/// the size a CT has at 1.5 mm (`ct300`: 512×512×300 at 0.8×0.8×1 mm → 200×273×273, 48 tiles;
/// `ct807`: 538×273×273, 128 tiles), 128³ tiles at step 0.5, Gaussian weights, the logits summed
/// where `stu predict` sums them, labelled by argmax; no preprocessing, resampling or file I/O.
/// After one warm-up on a patch-sized volume (cuDNN's autotuning), as the anchor script. With
/// `_tta` all eight mirrorings. `xtask/bench/torch_gpu.py` times the same in PyTorch.
pub const WINDOW_CASES: [(&str, &str, [usize; 3], bool); 6] = [
    ("window_S_ct300", "stunet-s", [200, 273, 273], false),
    ("window_B_ct300", "stunet-b", [200, 273, 273], false),
    ("window_B_ct300_tta", "stunet-b", [200, 273, 273], true),
    ("window_L_ct300", "stunet-l", [200, 273, 273], false),
    ("window_H_ct300", "stunet-h", [200, 273, 273], false),
    ("window_B_ct807", "stunet-b", [538, 273, 273], false),
];

/// [`WINDOW_CASES`]'s timing: `reps` sliding windows of a random `volume` (patch `patch`) after
/// one over a patch-sized volume; the label map's voxel count is checked.
fn window_case((id, preset, volume, tta): (&str, &str, [usize; 3], bool), precision: Precision, device: &Device, patch: usize, reps: usize) -> Result<CaseResult> {
    let net = inference_net(preset, precision, device)?;
    let predictor = crate::predict::Predictor::for_network(net, [patch; 3], tta, device.clone(), precision)?;
    let mut rng = stu_core::rng::SplitMix64::new(5);
    let n: usize = volume.iter().product();
    let data = rng.normals_par(n, 1.0);
    let warm = rng.normals_par(patch * patch * patch, 1.0);
    predictor.sliding_labels(&warm, 1, [patch; 3], &|_, _| {})?;
    let mut samples = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let labels = predictor.sliding_labels(&data, 1, volume, &|_, _| {})?;
        samples.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(labels.len() == n, "{id}: {} labels for {n} voxels", labels.len());
    }
    Ok(CaseResult { case: id.to_string(), fwd_s: median(samples.clone()), fwd_bwd_s: None, fwd_samples: samples, fwd_bwd_samples: Vec::new(), train_s: None, train_samples: Vec::new() })
}

/// Timed repetitions after warm-up: (warm-up, timed). GPUs get the anchor's counts, CPUs few.
fn reps(backend: Backend, large: bool) -> (usize, usize) {
    match backend {
        Backend::Flex | Backend::Ndarray | Backend::Tch => (1, 2),
        _ if large => (2, 4),
        _ => (3, 6),
    }
}

fn preset_net(preset: &str, device: &Device) -> Result<Box<dyn SegNet>> {
    let entry = stu_engine::model::registry().get("stunet")?;
    let spec = stu_engine::model::NetSpec { in_channels: 1, num_classes: TOTALSEG_CLASSES, strides: ISO_STRIDES.to_vec(), options: serde_json::json!({ "preset": preset }) };
    Ok(stu_engine::train::seeded_init((entry.build)(&spec, device).map_err(anyhow::Error::msg)?, 0))
}

/// Runs `step` once more under libtorch's profiler and writes the trace to `dir/{id}.json`.
fn profiled(dir: Option<&Path>, id: &str, backend: Backend, step: impl FnOnce() -> Result<()>) -> Result<()> {
    let Some(dir) = dir else { return Ok(()) };
    std::fs::create_dir_all(dir).with_context(|| format!("--profile {}", dir.display()))?;
    let path = dir.join(format!("{id}.json"));
    stu_engine::backend::profile_start(backend == Backend::TchCuda).map_err(|e| anyhow::anyhow!("--profile: {e}"))?;
    let ran = step();
    stu_engine::backend::profile_stop(&path).map_err(|e| anyhow::anyhow!("--profile: {e}"))?;
    ran?;
    eprintln!("{id}: profile of one more step written to {}", path.display());
    Ok(())
}

/// The network an inference case times: `preset` freshly initialised, its parameters untracked
/// (`valid`), as a loaded checkpoint's are in `stu predict`, then cast to `precision` and
/// wrapped for CUDA graphs where they are on. A freshly built network's parameters are tracked
/// by autodiff even on a plain device, so without `valid` every operator of the timed forward
/// would record its backward (and a CUDA graph could not capture it: the H200 run of
/// 2026-11-28 fell back to eager in every graph row for that reason).
fn inference_net(preset: &str, precision: Precision, device: &Device) -> Result<Box<dyn SegNet>> {
    let net = preset_net(preset, device)?.valid();
    Ok(stu_engine::graph::wrap(precision.inference_net(&*net)))
}

fn infer_case(id: &str, preset: &str, backend: Backend, precision: Precision, device: &Device, patch: usize, profile: Option<&Path>) -> Result<CaseResult> {
    let net = inference_net(preset, precision, device)?;
    let x = precision.input(randn([1, 1, patch, patch, patch], device));
    let (warm, n) = reps(backend, false);
    let step = || {
        let y = precision.output(net.forward(x.clone()));
        drop(y);
        device.sync().expect("device sync");
    };
    let samples = time_warm(warm, n.max(3), &step);
    profiled(profile, id, backend, || {
        step();
        Ok(())
    })?;
    Ok(CaseResult { case: id.to_string(), fwd_s: median(samples.clone()), fwd_bwd_s: None, fwd_samples: samples, fwd_bwd_samples: Vec::new(), train_s: None, train_samples: Vec::new() })
}

fn train_case(id: &str, preset: &str, backend: Backend, precision: Precision, ad: &Device, patch: usize, profile: Option<&Path>) -> Result<CaseResult> {
    let net = preset_net(preset, ad)?;
    let levels: Vec<[usize; 3]> = (0..5).map(|k| [patch >> k; 3]).collect();
    let large = preset.ends_with('l') || preset.ends_with('h');
    step_case(id, net, 2, &levels, backend, precision, ad, large, profile)
}

/// nnU-Net's `2d` training step: its 2-D PlainConvUNet for a 256² patch (7 stages, features
/// 32 … 512, `[1, 3, 3]` kernels, 6 × `[1, 2, 2]` strides), batch 12, 105 classes, 6 deep-
/// supervision outputs; as `xtask/bench/torch_train.py 2d` builds it with `Conv2d`.
pub const TRAIN_2D_CASE: &str = "train_plain2d_256_b12";

fn train_2d_case(backend: Backend, precision: Precision, ad: &Device, profile: Option<&Path>) -> Result<CaseResult> {
    let entry = stu_engine::model::registry().get("nnunet-plainconv")?;
    let options = serde_json::json!({"kernels": vec![[1, 3, 3]; 7], "max_width": 512});
    let spec = stu_engine::model::NetSpec { in_channels: 1, num_classes: TOTALSEG_CLASSES, strides: vec![[1, 2, 2]; 6], options };
    let net = stu_engine::train::seeded_init((entry.build)(&spec, ad).map_err(anyhow::Error::msg)?, 0);
    let levels: Vec<[usize; 3]> = (0..6).map(|k| [1, 256 >> k, 256 >> k]).collect();
    step_case(TRAIN_2D_CASE, net, 12, &levels, backend, precision, ad, false, profile)
}

/// One nnU-Net training step of `net` at batch `b`, timed: random input of `levels[0]`, random
/// labels nearest-downsampled to every deep-supervision level.
#[allow(clippy::too_many_arguments)]
fn step_case(id: &str, mut net: Box<dyn SegNet>, b: usize, levels: &[[usize; 3]], backend: Backend, precision: Precision, ad: &Device, large: bool, profile: Option<&Path>) -> Result<CaseResult> {
    use stu_engine::train::{DeviceBatch, Optimizer, StepConfig, train_step};
    let full_shape = levels[0];
    let n: usize = full_shape.iter().product();
    let mut rng = stu_core::rng::SplitMix64::new(3);
    let x = rng.fill_f32(b * n, -1.0, 1.0);
    let full: Vec<i16> = (0..b * n).map(|_| rng.below(TOTALSEG_CLASSES as u64) as i16).collect();
    let targets: Vec<(Vec<i16>, [usize; 4])> = levels
        .iter()
        .map(|&l| {
            let t = (0..b).flat_map(|bi| stu_data::augment::nearest_resize(&full[bi * n..(bi + 1) * n], full_shape, l)).collect();
            (t, [b, l[0], l[1], l[2]])
        })
        .collect();
    let batch = DeviceBatch::upload(x, [b, 1, full_shape[0], full_shape[1], full_shape[2]], &targets, ad);
    let weights = stu_engine::schedule::ds_weights(levels.len());
    let mut sgd = Optimizer::nnunet();
    let mut samples = Vec::new();
    let (warm, reps_n) = reps(backend, large);
    let step = StepConfig { weights: &weights, dice: Default::default(), lr: 1e-2, clip: stu_engine::optim::GRAD_CLIP, precision };
    let mut one_step = |net: Box<dyn SegNet>| -> Result<Box<dyn SegNet>> {
        let (next, _) = train_step(net, &mut sgd, &batch, &step);
        ad.sync().map_err(|e| anyhow::anyhow!("device sync: {e:?}"))?;
        Ok(next)
    };
    for i in 0..warm + reps_n {
        let t = Instant::now();
        net = one_step(net)?;
        if i >= warm {
            samples.push(t.elapsed().as_secs_f64());
        }
    }
    profiled(profile, id, backend, || one_step(net).map(drop))?;
    Ok(CaseResult { case: id.to_string(), fwd_s: None, fwd_bwd_s: None, fwd_samples: Vec::new(), fwd_bwd_samples: Vec::new(), train_s: median(samples.clone()), train_samples: samples })
}

/// Data-parallel communication cases: one gradient all-reduce of the preset's parameter count
/// between two ranks on this machine (threads joined over loopback TCP, the path `stu train
/// --nproc 2` takes), only when named (`allreduce`).
pub const ALLREDUCE_CASES: [(&str, &str); 3] = [("allreduce_S_w2", "stunet-s"), ("allreduce_B_w2", "stunet-b"), ("allreduce_L_w2", "stunet-l")];

fn allreduce_case(id: &str, preset: &str, device: &Device) -> Result<CaseResult> {
    use stu_engine::dist::{Group, Launch};
    let n = preset_net(preset, device)?.num_params();
    let port = stu_engine::dist::free_port()?;
    let samples = std::thread::scope(|s| {
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                s.spawn(move || -> Result<Vec<f64>> {
                    let launch = Launch { rank, world: 2, local_rank: rank, master: format!("127.0.0.1:{port}"), timeout: std::time::Duration::from_secs(120) };
                    let mut g = Group::join(&launch, 0)?;
                    let mut grads = vec![1e-3f32 * (rank as f32 + 1.0); n];
                    Ok(time_warm(1, 5, || g.all_reduce_sum(&mut grads).expect("all-reduce")))
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().expect("rank thread")).collect::<Result<Vec<_>>>()
    })?;
    let samples = samples.into_iter().next().expect("rank 0");
    Ok(CaseResult { case: format!("{id} ({n} values)"), fwd_s: None, fwd_bwd_s: None, fwd_samples: Vec::new(), fwd_bwd_samples: Vec::new(), train_s: median(samples.clone()), train_samples: samples })
}

/// What [`run`] measures beyond the case filter.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Cubic patch edge of the training-step and patch-inference cases (default 128, the
    /// paper's; a multiple of 32). The case ids then name it (`train_S_32_b2`).
    pub patch: Option<usize>,
    /// Run each training-step and patch-inference case once more under libtorch's profiler
    /// (libtorch backends only) and write its trace to `{profile}/{case}.json`.
    pub profile: Option<std::path::PathBuf>,
}

/// Runs the cases whose id matches `filter` (all when empty).
pub fn run(backend: Backend, precision: Precision, filter: &[String], opts: &Options, mut report: impl FnMut(&CaseResult)) -> Result<Vec<CaseResult>> {
    zoo::link();
    precision.check(backend).map_err(|e| anyhow::anyhow!("--precision: {e}"))?;
    let profile = opts.profile.as_deref();
    let patch = opts.patch.unwrap_or(128);
    if patch == 0 || !patch.is_multiple_of(32) {
        anyhow::bail!("--patch {patch}: the patch edge must be a positive multiple of 32 (five 2× downsamplings)");
    }
    let named_id = |id: &str| if patch == 128 { id.to_string() } else { id.replace("_128", &format!("_{patch}")) };
    if profile.is_some() && !matches!(backend, Backend::Tch | Backend::TchCuda) {
        anyhow::bail!("--profile records libtorch's profiler: it needs `--backend tch` or `tch-cuda` (got `{}`)", backend.name());
    }
    let device = backend.device()?;
    let ad = device.clone().autodiff();
    let mut results = Vec::new();
    // Training steps and GPU patch inference only on request: on a CPU they take minutes.
    // A case is named by its id at 128³ or at `--patch` (`train_S_64_b2`).
    let named = |id: &str, prefix: &str| filter.iter().any(|f| (id.contains(f.as_str()) || named_id(id).contains(f.as_str())) && f.starts_with(prefix));
    for (id, preset) in TRAIN_CASES {
        if named(id, "train") {
            let r = train_case(&named_id(id), preset, backend, precision, &ad, patch, profile)?;
            report(&r);
            results.push(r);
        }
    }
    if named(TRAIN_2D_CASE, "train") {
        let r = train_2d_case(backend, precision, &ad, profile)?;
        report(&r);
        results.push(r);
    }
    for (id, preset) in ALLREDUCE_CASES {
        if named(id, "allreduce") {
            let r = allreduce_case(id, preset, &device)?;
            report(&r);
            results.push(r);
        }
    }
    for (id, preset) in INFER_CASES {
        if named(id, "infer") {
            let r = infer_case(&named_id(id), preset, backend, precision, &device, patch, profile)?;
            report(&r);
            results.push(r);
        }
    }
    // Whole volumes: on request only (a CPU takes many minutes per case).
    // (A case's full id names it alone, `window_B_ct300` not its `_tta`; a shorter prefix,
    // `window_B`, names every case it starts.)
    let window_named = |id: &str| filter.iter().any(|f| f == id || (f.starts_with("window") && id.starts_with(f.as_str()) && !WINDOW_CASES.iter().any(|c| c.0 == f)));
    for case in WINDOW_CASES {
        if window_named(case.0) {
            let r = window_case(case, precision, &device, patch, if backend.is_gpu() { 2 } else { 1 })?;
            report(&r);
            results.push(r);
        }
    }
    for case in anchor_cases() {
        if !filter.is_empty() && !filter.iter().any(|f| case.id.contains(f.as_str()) && !f.starts_with("train") && !f.starts_with("infer") && !f.starts_with("allreduce") && !f.starts_with("window")) {
            continue;
        }
        let ds = !case.id.ends_with("_fwd");
        let net = net_for(case.id, &device).valid();
        let x = randn(case.shape, &device);
        let fwd = time(case.n_fwd, || {
            let y = net.forward(x.clone(), ds);
            let _ = y.into_data();
        });
        let _ = precision; // the anchor cases run in f32
        let mut fwd_bwd = Vec::new();
        if case.n_bwd > 0 {
            let net = net.build(&ad);
            let x = randn(case.shape, &ad);
            fwd_bwd = time(case.n_bwd, || {
                let loss = net.forward(x.clone(), ds).mean();
                let grads = loss.backward();
                drop(grads);
                ad.sync().expect("device sync");
            });
        }
        let r = CaseResult {
            case: case.id.to_string(),
            fwd_s: median(fwd.clone()),
            fwd_bwd_s: median(fwd_bwd.clone()),
            fwd_samples: fwd,
            fwd_bwd_samples: fwd_bwd,
            train_s: None,
            train_samples: Vec::new(),
        };
        report(&r);
        results.push(r);
    }
    if !filter.is_empty() && results.is_empty() {
        let ids: Vec<String> = TRAIN_CASES.iter().chain(&INFER_CASES).map(|(id, _)| named_id(id)).chain([TRAIN_2D_CASE.to_string()]).chain(ALLREDUCE_CASES.iter().map(|(id, _)| id.to_string())).chain(WINDOW_CASES.iter().map(|c| c.0.to_string())).chain(anchor_cases().iter().map(|c| c.id.to_string())).collect();
        anyhow::bail!("no bench case matches {}; the cases: {}", filter.join(" "), ids.join(", "));
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use stu_engine::burn::backend::DispatchTensorKind;

    use super::*;

    /// A whole-volume case labels every voxel of its volume (a small one here: STU-Net-S at a
    /// 32³ patch over 40×45×36, 2×2×2 tiles, with and without mirroring); with `tch` also on
    /// libtorch in bf16, whose tiles are summed on the device (a GPU's path).
    #[test]
    fn a_window_case_labels_the_whole_volume() {
        let mut runs = vec![(Backend::default_compiled().unwrap(), Precision::F32)];
        if cfg!(feature = "tch") {
            runs.push((Backend::Tch, Precision::Bf16));
        }
        for (backend, precision) in runs {
            let device = backend.device().unwrap();
            for tta in [false, true] {
                let r = window_case(("window_S_test", "stunet-s", [40, 45, 36], tta), precision, &device, 32, 1).unwrap();
                assert_eq!((r.case.as_str(), r.fwd_samples.len()), ("window_S_test", 1));
                assert!(r.fwd_s.unwrap() > 0.0);
            }
        }
    }

    /// The inference cases time a forward that records no backward: the network's output is
    /// not an autodiff tensor, while the same preset as built, untouched, is tracked (what the
    /// cases timed before). In f32 on the default backend; with `tch` also in bf16 (the cast
    /// copy of the parameters, the GPU's path; flex runs STU-Net in f32 only).
    #[test]
    fn inference_cases_time_an_untracked_forward() {
        let mut runs = vec![(Backend::default_compiled().unwrap(), Precision::F32)];
        if cfg!(feature = "tch") {
            runs.extend([(Backend::Tch, Precision::F32), (Backend::Tch, Precision::Bf16)]);
        }
        let tracked = |y: Tensor<5>| matches!(y.into_dispatch().kind, DispatchTensorKind::Autodiff(_));
        for (backend, precision) in runs {
            let device = backend.device().unwrap();
            let x = Tensor::<5>::from_data(TensorData::new(vec![0.25f32; 32 * 32 * 32], [1, 1, 32, 32, 32]), &device);
            assert!(tracked(preset_net("stunet-s", &device).unwrap().forward(x.clone())), "a freshly built network is tracked");
            let y = inference_net("stunet-s", precision, &device).unwrap().forward(precision.input(x));
            assert!(!tracked(y), "{} {precision}: the timed forward records its backward", backend.name());
        }
    }
}
