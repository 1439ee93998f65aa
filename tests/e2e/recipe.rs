//! nnU-Net's trainer variants against nnU-Net itself (`tests/fixtures/make_recipe_fixture.py`:
//! the variants' own `_build_loss`, PyTorch's Adam/AdamW, nnU-Net's schedulers), and a short
//! training with every variant through `stu train`.

use std::process::Command;

use stu_engine::burn::tensor::Int;
use stu_engine::loss::{DiceConfig, LossKind, deep_supervision};
use stu_engine::schedule::{LrSchedule, ds_weights};
use stu_engine::train::{Optimizer, OptimizerKind};
use stu_engine::{Tensor, TensorData};
use tests::{own_fixtures, read_tensor, rel_max_err, stu_bin};

fn fixture() -> (std::path::PathBuf, serde_json::Value) {
    let want = serde_json::from_str(&std::fs::read_to_string(own_fixtures().join("recipe.json")).unwrap()).unwrap();
    (own_fixtures().join("recipe.safetensors"), want)
}

#[test]
fn the_loss_variants_and_their_gradients_match_nnunet() {
    let (file, want) = fixture();
    let device = stu_engine::backend::Backend::Flex.device().unwrap();
    let ad = device.clone().autodiff();
    let logits: Vec<(Vec<usize>, Vec<f32>)> = (0..3).map(|i| read_tensor(&file, &format!("logits.{i}"))).collect();
    let ignore = want["ignore_label"].as_i64();
    let mut checked = 0;
    for (key, value) in want["losses"].as_object().unwrap() {
        let mut parts = key.split('.');
        let (name, case, bd) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        let batch_dice = bd == "batch_dice_True";
        let (loss, weights) = match name {
            "no_ds" => (LossKind::DiceCe, vec![1.0, 0.0, 0.0]),
            other => (LossKind::parse(other).unwrap(), ds_weights(3)),
        };
        let cfg = DiceConfig { batch_dice, ignore_label: (case == "ignore").then_some(ignore.unwrap()), loss, ..Default::default() };
        loss.check(cfg.ignore_label.is_some(), false).unwrap();
        let xs: Vec<Tensor<5>> = logits.iter().map(|(s, l)| Tensor::<5>::from_data(TensorData::new(l.clone(), [s[0], s[1], s[2], s[3], s[4]]), &ad).require_grad()).collect();
        let targets: Vec<Tensor<4, Int>> = (0..3)
            .map(|i| {
                let (s, t) = read_tensor(&file, &format!("{case}.target.{i}"));
                Tensor::from_data(TensorData::new(t.into_iter().map(|v| v as i64).collect::<Vec<_>>(), [s[0], s[2], s[3], s[4]]), &ad)
            })
            .collect();
        // The fused loss where the backend has it (CE, Dice and their sum on flex), composed
        // otherwise: both must give nnU-Net's value and gradient.
        let l = deep_supervision(&xs, &targets, &weights, cfg);
        let got = l.clone().into_scalar::<f32>() as f64;
        let want_v = value.as_f64().unwrap();
        assert!((got - want_v).abs() < 1e-5, "{key}: {got} vs nnU-Net's {want_v}");
        let grads = l.backward();
        for (i, x) in xs.iter().enumerate() {
            let g = x.grad(&grads).map(|g| g.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()).unwrap_or_else(|| vec![0.0; logits[i].1.len()]);
            let (_, w) = read_tensor(&file, &format!("{key}.grad.{i}"));
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = if scale == 0.0 { g.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 } else { rel_max_err(&g, &w) };
            assert!(err < 1e-4, "{key}, output {i}: gradient error {err:e} (largest {scale:e})");
        }
        checked += 1;
    }
    assert_eq!(checked, 26, "every variant of the fixture");
    // nnU-Net refuses these combinations; so does the loss.
    assert!(LossKind::Dice.check(true, false).is_err());
    assert!(LossKind::Ce.check(false, true).is_err());
    assert!(LossKind::Topk10.check(false, true).is_err());
    assert!(LossKind::Dice.check(false, true).is_ok());
}

#[test]
fn adam_and_adamw_match_pytorch() {
    let (file, want) = fixture();
    let device = stu_engine::backend::Backend::Flex.device().unwrap();
    let lrs: Vec<f64> = serde_json::from_value(want["optim"]["lrs"].clone()).unwrap();
    for (name, kind) in [("adamw", OptimizerKind::Adamw), ("adam", OptimizerKind::Adam)] {
        let mut opt = Optimizer::new(kind);
        let mut params: Vec<Tensor<1>> = (0..3)
            .map(|i| {
                let (_, p) = read_tensor(&file, &format!("opt.param.{i}"));
                let n = p.len();
                Tensor::from_data(TensorData::new(p, [n]), &device)
            })
            .collect();
        for (s, &lr) in lrs.iter().enumerate() {
            for (i, p) in params.iter_mut().enumerate() {
                let (_, g) = read_tensor(&file, &format!("opt.grad.{s}.{i}"));
                let n = g.len();
                *p = opt.update_param(&format!("p{i}"), p.clone(), Tensor::from_data(TensorData::new(g, [n]), &device), lr);
            }
        }
        for (i, p) in params.into_iter().enumerate() {
            let got = p.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            let (_, w) = read_tensor(&file, &format!("opt.{name}.{i}"));
            let err = rel_max_err(&got, &w);
            assert!(err < 1e-6, "{name}, parameter {i}: {err:e}");
        }
        // The state round-trips through a checkpoint's named tensors (a resumed run's).
        let state = opt.state();
        let names: Vec<&str> = state.iter().map(|t| t.name.as_str()).collect();
        assert!(names.contains(&"p0.exp_avg") && names.contains(&"p0.step") && names.contains(&"p0.max_exp_avg_sq") == (kind == OptimizerKind::Adamw), "{names:?}");
        assert_eq!(state.iter().find(|t| t.name == "p2.step").unwrap().data, [5.0]);
    }
}

#[test]
fn the_lr_schedules_match_nnunet() {
    let (_, want) = fixture();
    let s = &want["schedules"];
    let (epochs, lr0) = (s["epochs"].as_u64().unwrap() as usize, s["initial_lr"].as_f64().unwrap());
    for (name, kind) in [("poly", LrSchedule::Poly), ("cosine", LrSchedule::Cosine), ("warmup", LrSchedule::Warmup)] {
        let lrs: Vec<f64> = serde_json::from_value(s[name].clone()).unwrap();
        assert_eq!(lrs.len(), epochs);
        for (e, w) in lrs.iter().enumerate() {
            let got = kind.lr(lr0, e, epochs);
            assert!((got - w).abs() <= 1e-12 * lr0, "{name}, epoch {e}: {got} vs nnU-Net's {w}");
        }
    }
}

/// `stu train` of a width-4 STU-Net for 2 epochs × 2 iterations on the synthetic preprocessed
/// dataset `dir/pre` into `dir/name`, with `flags`.
fn tiny_train(dir: &std::path::Path, name: &str, flags: &[&str]) -> std::process::Output {
    let (pre, out) = (dir.join("pre"), dir.join(name));
    Command::new(stu_bin!())
        .args(["train", pre.to_str().unwrap(), "--out", out.to_str().unwrap(), "--model-options", r#"{"depth":[1,1,1,1],"dims":[4,8,16,16]}"#, "--epochs", "2", "--iterations", "2", "--val-iterations", "1", "--patch-size", "16,16,16", "--batch-size", "2", "--no-final-validation"])
        .args(flags)
        .output()
        .unwrap()
}

/// [`tiny_train`], which must succeed; the run folder's `train.json` and logs.
fn train_with(dir: &std::path::Path, name: &str, flags: &[&str]) -> (serde_json::Value, Vec<serde_json::Value>) {
    let o = tiny_train(dir, name, flags);
    assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
    let out = dir.join(name);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("train.json")).unwrap()).unwrap();
    let logs = std::fs::read_to_string(out.join("log.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (cfg, logs)
}

#[test]
fn stu_train_runs_every_trainer_variant() {
    let dir = tempfile::tempdir().unwrap();
    tests::synthetic_preprocessed(&dir.path().join("pre"), 5, 1, 3, [20, 20, 20], [16, 16, 16], &[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]);
    let (base, base_logs) = train_with(dir.path(), "default", &[]);
    for key in ["loss", "deep_supervision", "optimizer", "lr_schedule", "mirror_axes", "oversample_foreground", "probabilistic_oversampling", "seg_interpolation", "dummy_2d_augmentation"] {
        assert!(base.get(key).is_none(), "nnU-Net's defaults are left out of train.json ({key}), so older runs resume");
    }
    let first_loss = |logs: &[serde_json::Value]| logs[0]["train_losses"][0].as_f64().unwrap();
    let second_epoch = |logs: &[serde_json::Value]| logs[1]["train_losses"][0].as_f64().unwrap();
    for (name, flags, key, value) in [
        ("ce", &["--loss", "ce"][..], "loss", serde_json::json!("ce")),
        ("dice", &["--loss", "dice"], "loss", serde_json::json!("dice")),
        ("topk10", &["--loss", "topk10"], "loss", serde_json::json!("topk10")),
        ("dice_topk10", &["--loss", "dice_topk10"], "loss", serde_json::json!("dice_topk10")),
        ("no_ds", &["--no-deep-supervision"], "deep_supervision", serde_json::json!(false)),
        ("adamw", &["--optimizer", "adamw"], "optimizer", serde_json::json!("adamw")),
        ("cosine", &["--lr-schedule", "cosine"], "lr_schedule", serde_json::json!("cosine")),
        ("warmup", &["--lr-schedule", "warmup"], "lr_schedule", serde_json::json!("warmup")),
        ("no_mirroring", &["--no-mirroring"], "mirror_axes", serde_json::json!([])),
        ("only01", &["--mirror-axes", "0,1"], "mirror_axes", serde_json::json!([0, 1])),
        ("probabilistic", &["--probabilistic-oversampling", "--oversample-foreground", "0.1"], "probabilistic_oversampling", serde_json::json!(true)),
        ("seg_nearest", &["--seg-interpolation", "nearest"], "seg_interpolation", serde_json::json!("nearest")),
        ("no_dummy_2d", &["--no-dummy-2d"], "dummy_2d_augmentation", serde_json::json!(false)),
    ] {
        let (cfg, logs) = train_with(dir.path(), name, flags);
        assert_eq!(cfg[key], value, "{name}: train.json records the variant");
        assert!(logs.iter().all(|l| l["train_losses"].as_array().unwrap().iter().all(|v| v.as_f64().unwrap().is_finite())), "{name}: finite losses");
        match name {
            // The same first batch and weights: the losses differ by the loss alone.
            "ce" | "dice" | "topk10" | "dice_topk10" | "no_ds" => assert_ne!(first_loss(&logs), first_loss(&base_logs), "{name}: another loss"),
            // Other samples forced to foreground: other batches.
            "probabilistic" => {
                assert_eq!(cfg["oversample_foreground"], 0.1);
                assert_ne!(first_loss(&logs), first_loss(&base_logs), "{name}: other batches");
            }
            // The same first step, then another update.
            "adamw" => {
                assert_eq!(first_loss(&logs), first_loss(&base_logs), "{name}: the same first forward");
                assert_ne!(second_epoch(&logs), second_epoch(&base_logs), "{name}: another update");
            }
            _ => {}
        }
        if name == "dice" {
            assert!(logs.iter().all(|l| l["train_loss"].as_f64().unwrap() < 0.0), "the Dice-only loss is −Dice");
        }
        // The checkpoint records the axes its predictions may mirror.
        let meta: serde_json::Value = serde_json::from_str(&stu_engine::checkpoint::StateDict::open(dir.path().join(name).join("checkpoint_final.safetensors")).unwrap().metadata()["stu_checkpoint"]).unwrap();
        let axes = match name {
            "no_mirroring" => serde_json::json!([]),
            "only01" => serde_json::json!([0, 1]),
            _ => serde_json::json!([0, 1, 2]),
        };
        assert_eq!(meta["inference_allowed_mirroring_axes"], axes, "{name}");
        let lrs: Vec<f64> = logs.iter().map(|l| l["lr"].as_f64().unwrap()).collect();
        match name {
            "cosine" => assert_eq!(lrs, [1e-2, 1e-2 * (1.0 + (std::f64::consts::PI / 2.0).cos()) / 2.0]),
            "warmup" => assert_eq!(lrs, [1e-2 / 50.0, 1e-2 / 50.0 * 2.0]),
            _ => assert_eq!(lrs, [1e-2, stu_engine::schedule::poly_lr(1e-2, 1, 2)]),
        }
    }
    // Fold `all` validates on its training cases, as nnU-Net's `do_split`: a pseudo Dice each epoch.
    let (_, logs) = train_with(dir.path(), "all", &["--fold", "all"]);
    assert!(logs.iter().all(|l| l["val_loss"].as_f64().is_some_and(f64::is_finite) && l["mean_fg_dice"].is_number()), "{logs:?}");
    // A variant is part of the run's configuration: resuming with another is refused, naming it.
    let o = tiny_train(dir.path(), "ce", &["--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("loss: recorded \"ce\""), "resuming a CE run without --loss ce: {err}");
    // Bad values are refused before the run folder is made, naming the flag's values.
    for (flags, says) in [(&["--loss", "focal"][..], "dice_topk10"), (&["--mirror-axes", "0,3"][..], "--mirror-axes [0, 3]")] {
        let o = tiny_train(dir.path(), "bad", flags);
        assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains(says), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(!dir.path().join("bad").exists());
}

#[test]
fn a_run_without_mirroring_predicts_without_mirrored_passes() {
    // nnUNetTrainerNoMirroring: its checkpoints allow no test-time mirroring, so prediction
    // with TTA on gives exactly the un-mirrored probabilities; a default run's do not.
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let o = Command::new(stu_bin!()).args(args).output().unwrap();
        assert!(o.status.success(), "stu {args:?}:\n{}", String::from_utf8_lossy(&o.stderr));
    };
    let raw = tests::shared().join("data/Dataset802_TotalSegExampleMR");
    run(&["plan", raw.to_str().unwrap(), "--out", &t("plans/plans.json")]);
    run(&["preprocess", raw.to_str().unwrap(), "--plans", &t("plans/plans.json"), "--out", &t("pre")]);
    let images = raw.join("imagesTr");
    let probabilities = |name: &str, tta: bool| {
        let out = t(&format!("{name}-{tta}"));
        let ck = t(&format!("{name}/checkpoint_final.safetensors"));
        let mut args = vec!["predict", "-i", images.to_str().unwrap(), "-o", &out, "--checkpoint", &ck, "--save-probabilities"];
        if !tta {
            args.push("--disable-tta");
        }
        run(&args);
        std::fs::read(tmp.path().join(format!("{name}-{tta}/ts_mr_sm.probabilities.safetensors"))).unwrap()
    };
    for (name, flags) in [("plain", &[][..]), ("no_mirroring", &["--no-mirroring"][..])] {
        let (pre, out) = (t("pre"), t(name));
        let mut args = vec!["train", &pre, "--out", &out, "--fold", "all", "--model-options", r#"{"depth":[1,1,1,1],"dims":[4,8,16,16]}"#, "--epochs", "1", "--iterations", "1", "--val-iterations", "0", "--patch-size", "32,32,32"];
        args.extend_from_slice(flags);
        run(&args);
        let (with, without) = (probabilities(name, true), probabilities(name, false));
        if name == "no_mirroring" {
            assert_eq!(with, without, "no mirrored passes");
        } else {
            assert_ne!(with, without, "a default run's TTA mirrors");
        }
    }
}
