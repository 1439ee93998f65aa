//! `stu train`: resume after SIGKILL gives the same losses, bad checkpoints fail loudly, and
//! fine-tuning from the official containers transfers what it should.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tests::{logged_losses, parity_dir, read_tensor, stu_bin, synthetic_preprocessed};

fn stu(args: &[&str]) -> Output {
    Command::new(stu_bin!()).args(args).output().expect("runs")
}

fn ok(out: &Output) {
    assert!(out.status.success(), "stu failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

const TINY: &str = r#"{"depth":[1,1,1],"dims":[4,8,8]}"#;

fn train_args<'a>(pre: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["train", pre, "--out", out, "--model-options", TINY, "--epochs", "6", "--iterations", "3", "--val-iterations", "1", "--save-every", "1", "--seed", "5"];
    v.extend_from_slice(extra);
    v
}

/// Trains `a` to the end, and `b` the same way but killed with SIGKILL once two epochs are
/// logged, then resumed; checks that `b` repeats `a`'s losses and final weights. Returns the
/// losses.
fn kill_and_resume(pre_s: &str, a: &Path, b: &Path, extra: &[&str]) -> Vec<Vec<f64>> {
    ok(&stu(&train_args(pre_s, a.to_str().unwrap(), extra)));
    let full = logged_losses(a);
    assert_eq!(full.len(), 6);
    assert!(a.join("checkpoint_final.safetensors").exists() && a.join("checkpoint_best.safetensors").exists());
    assert!(!a.join("checkpoint_latest.safetensors").exists(), "latest is removed at the end");
    assert!(a.join("progress.png").exists());

    // Same run, killed once two epochs are logged.
    let mut child = Command::new(stu_bin!()).args(train_args(pre_s, b.to_str().unwrap(), extra)).stderr(std::process::Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    let mut killed_at = None;
    while t.elapsed() < Duration::from_secs(120) {
        let lines = std::fs::read_to_string(b.join("log.jsonl")).map(|s| s.lines().count()).unwrap_or(0);
        if lines >= 2 {
            child.kill().unwrap(); // SIGKILL
            killed_at = Some(lines);
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait().unwrap();
    let killed_at = killed_at.expect("the run was still going after two epochs");
    assert!(killed_at < 6, "killed before the end");
    assert!(!b.join("checkpoint_final.safetensors").exists());
    let resumed = stu(&train_args(pre_s, b.to_str().unwrap(), &[extra, &["--resume"]].concat()));
    ok(&resumed);
    assert_eq!(logged_losses(b), full, "resumed losses differ from the uninterrupted run");
    let (_, wa) = read_tensor(&a.join("checkpoint_final.safetensors"), "network_weights.seg_outputs.0.weight");
    let (_, wb) = read_tensor(&b.join("checkpoint_final.safetensors"), "network_weights.seg_outputs.0.weight");
    assert_eq!(wa, wb, "final weights differ");
    full
}

#[test]
fn a_run_killed_with_sigkill_and_resumed_repeats_the_uninterrupted_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = tmp.path().join("pre");
    synthetic_preprocessed(&pre, 5, 1, 2, [20, 20, 20], [16, 16, 16], &[[2, 2, 2], [2, 2, 2]]);
    let (pre_s, a, b) = (pre.to_str().unwrap(), tmp.path().join("a"), tmp.path().join("b"));
    let full = kill_and_resume(pre_s, &a, &b, &[]);
    // A finished run resumes to nothing.
    let again = stu(&train_args(pre_s, b.to_str().unwrap(), &["--resume"]));
    ok(&again);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already complete"));
    assert_eq!(logged_losses(&b), full);

    // Mismatched configuration: refused, naming the key.
    let bad = stu(&train_args(pre_s, b.to_str().unwrap(), &["--resume", "--lr", "0.5"]));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("initial_lr"), "{}", String::from_utf8_lossy(&bad.stderr));
    // A fresh run into an existing folder is refused rather than overwriting it.
    let bad = stu(&train_args(pre_s, b.to_str().unwrap(), &[]));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--resume"));
    // A truncated checkpoint: a clear error naming the file, never a silent restart.
    let ck = b.join("checkpoint_final.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(&ck, &bytes[..bytes.len() / 2]).unwrap();
    let bad = stu(&train_args(pre_s, b.to_str().unwrap(), &["--resume"]));
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("checkpoint_final.safetensors"), "{err}");
    assert_eq!(logged_losses(&b), full, "the log is untouched");
    // A checkpoint without training state (plain weights) is not taken for one.
    std::fs::copy(parity_dir().join("tiny_iso.safetensors"), &ck).unwrap();
    let bad = stu(&train_args(pre_s, b.to_str().unwrap(), &["--resume"]));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a `stu train` checkpoint"));
}

/// One run on one thread and on three: the same losses and final checkpoint to the last bit.
/// The kernels' parallel sums are grouped by the shapes alone (`kernels::fold_groups`); with
/// rayon's stealing-driven `fold` the 32³ patches' convolution weight gradients (several
/// chunks per sample) were summed in another order on each thread count.
#[test]
fn a_run_gives_the_same_bits_on_one_thread_as_on_three() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = tmp.path().join("pre");
    synthetic_preprocessed(&pre, 5, 1, 2, [36, 36, 36], [32, 32, 32], &[[2, 2, 2], [2, 2, 2]]);
    let run = |name: &str, threads: &str| {
        let out = tmp.path().join(name);
        let args = ["train", pre.to_str().unwrap(), "--out", out.to_str().unwrap(), "--model-options", TINY, "--epochs", "2", "--iterations", "3", "--val-iterations", "1", "--seed", "5"];
        ok(&Command::new(stu_bin!()).args(args).env("RAYON_NUM_THREADS", threads).output().unwrap());
        (logged_losses(&out), std::fs::read(out.join("checkpoint_final.safetensors")).unwrap())
    };
    let (one, three) = (run("one", "1"), run("three", "3"));
    assert_eq!(one.0, three.0, "the losses differ");
    assert!(one.1 == three.1, "the final checkpoints differ");
}

#[test]
fn an_adamw_run_with_a_warmup_and_topk_loss_resumes_to_the_same_losses() {
    // nnU-Net's trainer variants keep their state in the checkpoint too: AdamW's moments,
    // AMSGrad maxima and step counts; the warm-up schedule follows the epoch.
    let tmp = tempfile::tempdir().unwrap();
    let pre = tmp.path().join("pre");
    synthetic_preprocessed(&pre, 5, 1, 2, [20, 20, 20], [16, 16, 16], &[[2, 2, 2], [2, 2, 2]]);
    let (pre_s, a, b) = (pre.to_str().unwrap(), tmp.path().join("a"), tmp.path().join("b"));
    let extra = ["--optimizer", "adamw", "--lr-schedule", "warmup", "--loss", "dice_topk10", "--no-deep-supervision"];
    kill_and_resume(pre_s, &a, &b, &extra);
    let names = stu_engine::checkpoint::StateDict::open(b.join("checkpoint_final.safetensors")).unwrap().keys().map(str::to_string).collect::<Vec<_>>();
    // STU-Net's heads are ordered as nnU-Net v1's, the full-resolution one last (here `.1`).
    for k in ["optimizer_state.seg_outputs.1.weight.exp_avg", "optimizer_state.seg_outputs.1.weight.max_exp_avg_sq", "optimizer_state.seg_outputs.1.weight.step"] {
        assert!(names.iter().any(|n| n == k), "{k} in {names:?}");
    }
    // Without deep supervision the lower head gets no gradient, so no optimiser state.
    assert!(!names.iter().any(|n| n.starts_with("optimizer_state.seg_outputs.0.")), "{names:?}");
}

fn fine_tune(pre: &Path, out: &Path, source: &Path, lr: &str, epochs: &str) -> Output {
    stu(&[
        "train", pre.to_str().unwrap(), "--out", out.to_str().unwrap(), "--init-from", source.to_str().unwrap(), "--epochs", epochs, "--iterations", "4", "--val-iterations", "1", "--lr", lr, "--no-augmentation",
    ])
}

#[test]
fn fine_tuning_from_the_official_containers_transfers_all_but_the_heads_and_tiles_the_stem() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = tmp.path().join("pre");
    // tiny_iso: 1 channel, 3 classes, six stages of 2,2,2 → a 2-channel, 5-class task.
    synthetic_preprocessed(&pre, 5, 2, 4, [36, 36, 36], [32, 32, 32], &[[2, 2, 2]; 5]);
    let src = parity_dir().join("tiny_iso.safetensors");
    for (i, source) in ["tiny_iso_nnunetv1.model", "tiny_iso_nnunetv2.pth", "tiny_iso.safetensors"].iter().enumerate() {
        // lr 0: the written weights are exactly the initial ones.
        let out = tmp.path().join(format!("ft{i}"));
        ok(&fine_tune(&pre, &out, &parity_dir().join(source), "0", "1"));
        let ck = out.join("checkpoint_final.safetensors");
        let dict = stu_engine::checkpoint::StateDict::open(&src).unwrap().select_model("conv_blocks_context.0.0.conv1.weight").unwrap();
        let mut compared = 0;
        for key in dict.keys() {
            let (shape, want) = read_tensor(&src, &format!("weights.{key}"));
            let (got_shape, got) = read_tensor(&ck, &format!("network_weights.{key}"));
            if key.starts_with("seg_outputs") {
                assert_eq!(got_shape[0], 5, "{key}: heads rebuilt for 5 classes");
            } else if key == "conv_blocks_context.0.0.conv1.weight" || key == "conv_blocks_context.0.0.conv3.weight" {
                assert_eq!(got_shape[1], 2, "{key}");
                let inner: usize = shape[2..].iter().product();
                for o in 0..shape[0] {
                    for c in 0..2 {
                        assert_eq!(&got[(o * 2 + c) * inner..(o * 2 + c + 1) * inner], &want[o * inner..(o + 1) * inner], "{key}: stem tiled across channels");
                    }
                }
            } else {
                assert_eq!(got_shape, shape, "{key}");
                assert_eq!(got, want, "{key}: transferred exactly");
                compared += 1;
            }
        }
        assert!(compared > 50);
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("transfer.json")).unwrap()).unwrap();
        assert_eq!(report["reinitialised"].as_array().unwrap().len(), 10, "5 heads × (weight, bias)");
    }
    // With the fine-tuning preset (lr 1e-3 by default), the loss falls.
    let out = tmp.path().join("ft-learn");
    let run = stu(&["train", pre.to_str().unwrap(), "--out", out.to_str().unwrap(), "--init-from", src.to_str().unwrap(), "--epochs", "3", "--iterations", "6", "--val-iterations", "1", "--no-augmentation"]);
    ok(&run);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("train.json")).unwrap()).unwrap();
    assert_eq!(cfg["initial_lr"], 1e-3);
    let losses = logged_losses(&out);
    let first = losses[0][..2].iter().sum::<f64>() / 2.0;
    let last = losses[2][4..].iter().sum::<f64>() / 2.0;
    assert!(last < first - 0.05, "loss did not fall: {losses:?}");
    // A checkpoint whose body does not fit (another width) is refused, naming the key.
    let other = tmp.path().join("other.safetensors");
    let mut tensors = Vec::new();
    for key in dict_keys(&src) {
        let (mut shape, mut data) = read_tensor(&src, &format!("weights.{key}"));
        if key == "conv_blocks_context.1.0.conv2.bias" {
            shape[0] += 1;
            data.push(0.0);
        }
        tensors.push(stu_engine::checkpoint::NamedTensor { name: key, shape, data });
    }
    stu_engine::checkpoint::write_safetensors(&other, &tensors, None).unwrap();
    let bad = fine_tune(&pre, &tmp.path().join("ft-bad"), &other, "0", "1");
    assert!(!bad.status.success());
}

fn dict_keys(path: &Path) -> Vec<String> {
    stu_engine::checkpoint::StateDict::open(path).unwrap().select_model("conv_blocks_context.0.0.conv1.weight").unwrap().keys().map(str::to_string).collect()
}

/// Steps of `net` on `batch` (rank `rank` of `world` joined through `port`, or alone when
/// `world` is 1); returns the reported losses and the final weights.
fn dp_steps(rank: usize, world: usize, port: u16, x: &[f32], targets: &[(Vec<i64>, [usize; 4])], dice: stu_engine::loss::DiceConfig) -> (Vec<f64>, Vec<stu_engine::checkpoint::NamedTensor>) {
    let (stats, weights, _) = scaled_steps(rank, world, port, x, targets, dice, 12.0, None);
    (stats.iter().map(|s| s.loss).collect(), weights)
}

/// [`dp_steps`] with gradient clip `clip` and the loss scaler set to `scaler`; returns every
/// step's report, the final weights and the optimiser.
#[allow(clippy::too_many_arguments)]
fn scaled_steps(rank: usize, world: usize, port: u16, x: &[f32], targets: &[(Vec<i64>, [usize; 4])], dice: stu_engine::loss::DiceConfig, clip: f64, scaler: Option<stu_engine::train::GradScaler>) -> (Vec<stu_engine::train::StepStats>, Vec<stu_engine::checkpoint::NamedTensor>, stu_engine::train::Optimizer) {
    use stu_engine::dist::{Group, Launch};
    use stu_engine::train::{DeviceBatch, Optimizer, StepConfig, train_step_in};
    let mut net = tiny_net();
    let ad = stu_engine::backend::Backend::Flex.device().unwrap().autodiff();
    let mut group = if world == 1 {
        Group::single()
    } else {
        Group::join(&Launch { rank, world, local_rank: rank, master: format!("127.0.0.1:{port}"), timeout: Duration::from_secs(60) }, 7).unwrap()
    };
    // This rank's share of the global batch of 2.
    let (b, first) = (2 / world, rank * (2 / world));
    let n = x.len() / 2;
    let xs = stu_engine::Tensor::<5>::from_data(stu_engine::TensorData::new(x[first * n..(first + b) * n].to_vec(), [b, 1, 16, 16, 16]), &ad);
    let ts = targets
        .iter()
        .map(|(t, s)| {
            let m = t.len() / 2;
            stu_engine::Tensor::<4, stu_engine::burn::tensor::Int>::from_data(stu_engine::TensorData::new(t[first * m..(first + b) * m].to_vec(), [b, s[1], s[2], s[3]]), &ad)
        })
        .collect();
    let batch = DeviceBatch { x: xs, targets: ts };
    let weights = stu_engine::schedule::ds_weights(targets.len());
    let mut sgd = Optimizer::nnunet();
    sgd.scaler = scaler;
    let mut all = Vec::new();
    for _ in 0..3 {
        let step = StepConfig { weights: &weights, dice, lr: 1e-2, clip, precision: Default::default() };
        let (next, stats) = train_step_in(net, &mut sgd, &batch, &step, &mut group).unwrap();
        net = next;
        all.push(stats);
    }
    (all, net.state_dict(), sgd)
}

/// A target's labels and `[B, D, H, W]` shape.
type Target = (Vec<i64>, [usize; 4]);

/// The batch of [`data_parallel_steps_equal_one_process_on_the_whole_batch`]: 2 × 16³ inputs
/// and targets at three scales.
fn tiny_batch() -> (Vec<f32>, Vec<Target>) {
    let mut rng = stu_core::rng::SplitMix64::new(21);
    let x = rng.fill_f32(2 * 16 * 16 * 16, -1.0, 1.0);
    let full: Vec<i64> = (0..2 * 16 * 16 * 16).map(|i| { let (z, v) = (i / 256 % 16, x[i]); if v > 0.3 { 1 + i64::from(z > 8) } else { 0 } }).collect();
    let targets: Vec<Target> = [1usize, 2, 4]
        .iter()
        .map(|&f| {
            let s = 16 / f;
            let t = (0..2 * s * s * s).map(|i| { let (b, r) = (i / (s * s * s), i % (s * s * s)); full[b * 4096 + (r / (s * s)) * f * 256 + (r / s % s) * f * 16 + (r % s) * f] }).collect();
            (t, [2, s, s, s])
        })
        .collect();
    (x, targets)
}

#[test]
fn loss_scaled_steps_equal_plain_ones_and_an_overflow_skips_the_step() {
    use stu_engine::train::GradScaler;
    let (x, targets) = tiny_batch();
    let (plain, w_plain, _) = scaled_steps(0, 1, 0, &x, &targets, Default::default(), 0.2, None);
    // f16 training's scaler (2¹⁶, a power of two: exact in f32) changes nothing but its state.
    let (scaled, w_scaled, sgd) = scaled_steps(0, 1, 0, &x, &targets, Default::default(), 0.2, Some(GradScaler::default()));
    for (k, (a, b)) in plain.iter().zip(&scaled).enumerate() {
        assert!(!b.skipped, "step {k} skipped");
        assert!((a.loss - b.loss).abs() <= 1e-6 * a.loss.abs(), "step {k}: loss {} vs {} scaled", a.loss, b.loss);
        assert!((a.grad_norm - b.grad_norm).abs() <= 1e-5 * a.grad_norm, "step {k}: grad norm {} vs {} scaled", a.grad_norm, b.grad_norm);
    }
    assert!(plain.iter().all(|s| s.grad_norm > 0.2), "the clip is exercised (norms {plain:?})");
    let scale = |w: &[stu_engine::checkpoint::NamedTensor]| w.iter().flat_map(|t| t.data.iter()).fold(0f32, |m, v| m.max(v.abs()));
    let diff = w_plain.iter().zip(&w_scaled).flat_map(|(a, b)| a.data.iter().zip(&b.data)).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-6 * scale(&w_plain), "weights differ by {diff}");
    assert_eq!(sgd.scaler, Some(GradScaler { scale: 65536.0, growth_tracker: 3 }));
    // Its state travels with the momentum buffers (checkpoints) and comes back.
    let state = sgd.state();
    assert!(state.iter().any(|t| t.name == "grad_scaler.scale" && t.data == [65536.0]));
    let net = tiny_net();
    let mut back = stu_engine::train::Optimizer::nnunet();
    let dev = stu_engine::backend::Backend::Flex.device().unwrap();
    back.load_state(&*net, state.clone(), &dev).unwrap();
    assert_eq!(back.scaler, sgd.scaler);
    let mut bad = state;
    bad.iter_mut().find(|t| t.name == "grad_scaler.scale").unwrap().data = vec![f32::NAN];
    assert!(back.load_state(&*net, bad, &dev).unwrap_err().contains("grad_scaler.scale"));
    // A scale that overflows f32 gradients: every step is skipped (weights as initialised), the
    // scale halves each time, and the reported loss is still the forward's.
    let (over, w_over, sgd) = scaled_steps(0, 1, 0, &x, &targets, Default::default(), 0.2, Some(GradScaler { scale: 2f64.powi(126), growth_tracker: 5 }));
    assert!(over.iter().all(|s| s.skipped && !s.grad_norm.is_finite()));
    assert_eq!(over[0].loss, plain[0].loss);
    assert_eq!(sgd.scaler, Some(GradScaler { scale: 2f64.powi(123), growth_tracker: 0 }));
    assert_eq!(w_over, tiny_net().state_dict(), "a skipped step leaves the weights as they were");
}

/// The width-4 STU-Net of these tests on flex with autodiff, initialised from seed 3.
fn tiny_net() -> Box<dyn stu_engine::model::SegNet> {
    zoo::link();
    let ad = stu_engine::backend::Backend::Flex.device().unwrap().autodiff();
    let spec = stu_engine::model::NetSpec { in_channels: 1, num_classes: 3, strides: vec![[2, 2, 2], [2, 2, 2]], options: serde_json::from_str(TINY).unwrap() };
    stu_engine::train::seeded_init((stu_engine::model::registry().get("stunet").unwrap().build)(&spec, &ad).unwrap(), 3)
}

#[test]
fn data_parallel_steps_equal_one_process_on_the_whole_batch() {
    // A global batch of 2 (16³, 3 classes, three supervised outputs) trained for three steps by
    // one process, and by two ranks holding one sample each; also as three regions (sigmoid
    // outputs, BCE + Dice) with batch Dice, whose sums are exchanged too.
    let (x, targets) = tiny_batch();
    use stu_engine::loss::{DiceConfig, Regions};
    let regions = Regions::new(&[vec![1, 2], vec![2], vec![1]]).unwrap();
    for dice in [DiceConfig::default(), DiceConfig { batch_dice: true, ..Default::default() }, DiceConfig { batch_dice: true, regions: Some(regions), ..Default::default() }] {
        let batch_dice = (dice.batch_dice, dice.regions.is_some());
        let (losses, single) = dp_steps(0, 1, 0, &x, &targets, dice);
        let port = stu_engine::dist::free_port().unwrap();
        let ranks: Vec<_> = std::thread::scope(|s| {
            let h: Vec<_> = (0..2).map(|r| { let (x, t) = (&x, &targets); s.spawn(move || dp_steps(r, 2, port, x, t, dice)) }).collect();
            h.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (k, (a, b)) in losses.iter().zip(&ranks[0].0).enumerate() {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "(batch_dice, regions) {batch_dice:?}, step {k}: loss {a} alone, {b} over two ranks");
        }
        assert_eq!(ranks[0].0, ranks[1].0, "both ranks report the global loss");
        let mut moved = 0.0f64;
        for ((t, r0), r1) in single.iter().zip(&ranks[0].1).zip(&ranks[1].1) {
            assert_eq!(r0.data, r1.data, "{}: the replicas are not bit-identical", t.name);
            let err = tests::rel_max_err(&r0.data, &t.data);
            // A convolution's bias ahead of an instance norm has a zero gradient in exact
            // arithmetic (the norm removes per-channel constants); what it gathers is rounding
            // noise (≈ 1e-8 here), which two summation orders need not share: compared absolutely.
            let abs = r0.data.iter().zip(&t.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= 1e-4 || abs <= 1e-7, "(batch_dice, regions) {batch_dice:?}, {}: relative error {err} (absolute {abs}) between two ranks and one process", t.name);
            moved = moved.max(t.data.iter().map(|v| v.abs() as f64).fold(0.0, f64::max));
        }
        assert!(moved > 0.0);
    }
}

fn dp_args<'a>(pre: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["train", pre, "--out", out, "--model-options", TINY, "--epochs", "8", "--iterations", "20", "--val-iterations", "3", "--save-every", "1", "--seed", "5"];
    v.extend_from_slice(extra);
    v
}

#[test]
fn two_data_parallel_processes_train_resume_after_sigkill_and_refuse_mismatches() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let pre = tmp.path().join("pre");
    synthetic_preprocessed(&pre, 5, 1, 2, [20, 20, 20], [16, 16, 16], &[[2, 2, 2], [2, 2, 2]]);
    let (pre_s, a, b) = (pre.to_str().unwrap(), tmp.path().join("a"), tmp.path().join("b"));
    ok(&stu(&dp_args(pre_s, a.to_str().unwrap(), &["--nproc", "2"])));
    let full = logged_losses(&a);
    assert_eq!(full.len(), 8);
    assert!(full.iter().flatten().all(|l| l.is_finite()));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.join("train.json")).unwrap()).unwrap();
    assert_eq!(cfg["world_size"], 2);
    assert!(a.join("checkpoint_final.safetensors").exists() && a.join("progress.png").exists());
    let log: Vec<serde_json::Value> = std::fs::read_to_string(a.join("log.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(log.iter().all(|l| l["val_loss"].as_f64().is_some_and(f64::is_finite) && l["pseudo_dice"].as_array().unwrap().len() == 2), "validation is gathered from both ranks");

    // The same run with every process killed once two epochs are logged (the first epoch's
    // checkpoint is written after its log line), then resumed: the same losses (batches and
    // reductions are deterministic) and weights.
    let mut child = Command::new(stu_bin!()).args(dp_args(pre_s, b.to_str().unwrap(), &["--nproc", "2"])).stderr(std::process::Stdio::null()).process_group(0).spawn().unwrap();
    let t = Instant::now();
    let mut killed = false;
    while t.elapsed() < Duration::from_secs(120) {
        if std::fs::read_to_string(b.join("log.jsonl")).map(|s| s.lines().count()).unwrap_or(0) >= 2 {
            let st = Command::new("kill").args(["-s", "KILL", "--", &format!("-{}", child.id())]).status().unwrap();
            assert!(st.success(), "kill failed");
            killed = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait().unwrap();
    assert!(killed, "the run was still going after two epochs");
    assert!(!b.join("checkpoint_final.safetensors").exists());
    ok(&stu(&dp_args(pre_s, b.to_str().unwrap(), &["--nproc", "2", "--resume"])));
    assert_eq!(logged_losses(&b), full, "resumed losses differ from the uninterrupted run");
    let (_, wa) = read_tensor(&a.join("checkpoint_final.safetensors"), "network_weights.seg_outputs.0.weight");
    let (_, wb) = read_tensor(&b.join("checkpoint_final.safetensors"), "network_weights.seg_outputs.0.weight");
    assert_eq!(wa, wb, "final weights differ");
    let again = stu(&dp_args(pre_s, a.to_str().unwrap(), &["--nproc", "2", "--resume"]));
    ok(&again);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already complete"));

    // Another number of processes changes the batches: refused, naming the key.
    let bad = stu(&dp_args(pre_s, a.to_str().unwrap(), &["--resume"]));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("world_size"), "{}", String::from_utf8_lossy(&bad.stderr));
    // A global batch that does not split evenly.
    let bad = stu(&dp_args(pre_s, tmp.path().join("c").to_str().unwrap(), &["--nproc", "2", "--batch-size", "3"]));
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    // Both ranks refuse it; the launch names whichever exited first.
    assert!(err.contains("does not split evenly") && (err.contains("rank 0 of 2 failed") || err.contains("rank 1 of 2 failed")), "{err}");
    // A rank that fails stops the launch (here rank 0: the run folder exists).
    let bad = stu(&dp_args(pre_s, a.to_str().unwrap(), &["--nproc", "2"]));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("a run exists here"));
}
