//! Forward parity with PyTorch on the shared fixture, through every checkpoint container, and on
//! the repository's own fixtures (anisotropic strides, several blocks, batch 2, 2 channels).

use std::path::Path;
use std::process::Command;

use stu_harness::forward::{ForwardOptions, ModelSource, StrideSource, forward};
use tests::{own_fixtures, parity_dir, read_tensor, rel_max_err, stu_bin};

const TOL: f64 = 1e-4;

fn check_outputs(out: &Path, reference: &Path, n: usize) {
    for i in 0..n {
        let key = format!("output.{i}");
        let (s_ours, ours) = read_tensor(out, &key);
        let (s_ref, want) = read_tensor(reference, &key);
        assert_eq!(s_ours, s_ref, "{key} shape");
        let err = rel_max_err(&ours, &want);
        assert!(err <= TOL, "{key}: max|out − ref| / max|ref| = {err:e} > {TOL:e}");
    }
}

#[test]
fn tiny_iso_matches_pytorch_in_all_three_containers() {
    tiny_iso_matches_pytorch_on(stu_engine::backend::Backend::Flex);
}

/// burn's wgpu backend (CubeCL on Vulkan), where a Vulkan device is present: on a machine
/// without a GPU, Mesa's lavapipe (`apt-get install mesa-vulkan-drivers`). Only with
/// `--features wgpu` (`cargo test -p tests --features wgpu -- on_wgpu`); not in CI.
/// The wgpu tests one at a time: run side by side in one process on lavapipe, a gradient came
/// out wrong that is right when each runs alone.
#[cfg(feature = "wgpu")]
static WGPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(feature = "wgpu")]
#[test]
fn tiny_iso_matches_pytorch_on_wgpu() {
    let _one = WGPU.lock().unwrap_or_else(|e| e.into_inner());
    tiny_iso_matches_pytorch_on(stu_engine::backend::Backend::Wgpu);
}

fn tiny_iso_matches_pytorch_on(backend: stu_engine::backend::Backend) {
    let dir = tempfile::tempdir().unwrap();
    let reference = parity_dir().join("tiny_iso.safetensors");
    for file in ["tiny_iso.safetensors", "tiny_iso_nnunetv1.model", "tiny_iso_nnunetv2.pth"] {
        let out = dir.path().join(format!("{file}.out.safetensors"));
        let outs = forward(&ForwardOptions {
            model: ModelSource {
                checkpoint: parity_dir().join(file),
                model: None,
                strides: StrideSource::Default,
                backend,
            },
            input: reference.clone(),
            input_key: "input".into(),
            output: out.clone(),
            precision: Default::default(),
        })
        .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        assert_eq!(outs.len(), 5);
        check_outputs(&out, &reference, 5);
    }
}

#[test]
fn the_binary_checks_parity_with_explicit_strides() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let reference = parity_dir().join("tiny_iso.safetensors");
    let status = Command::new(stu_bin!())
        .args(["forward", "--checkpoint"])
        .arg(parity_dir().join("tiny_iso_nnunetv1.model"))
        .args(["--strides", "2,2,2:2,2,2:2,2,2:2,2,2:2,2,2", "--input"])
        .arg(&reference)
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    check_outputs(&out, &reference, 5);
}

#[test]
fn own_fixtures_match_pytorch() {
    // Made by tests/fixtures/make_fixtures.py with ../shared/bench/torch_ref.py; see its README.
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(own_fixtures().join("fixtures.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (name, spec) in index.as_object().unwrap() {
        let file = own_fixtures().join(format!("{name}.safetensors"));
        let strides: Vec<[usize; 3]> = serde_json::from_value(spec["strides"].clone()).unwrap();
        let out = dir.path().join(format!("{name}.out.safetensors"));
        forward(&ForwardOptions {
            model: ModelSource {
                checkpoint: file.clone(),
                model: None,
                strides: StrideSource::Explicit(strides),
                backend: stu_engine::backend::Backend::Flex,
            },
            input: file.clone(),
            input_key: "input".into(),
            output: out.clone(),
            precision: Default::default(),
        })
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        check_outputs(&out, &file, spec["outputs"].as_array().unwrap().len());
        checked += 1;
    }
    assert!(checked >= 2, "expected the repository's fixtures, found {checked}");
}

/// The loss fixture `{name}.safetensors` / `{name}.json` (logits `logits.{i}` of three outputs,
/// per case the targets `{case}.target.{i}` and nnU-Net's values `{case}.loss0.batch_dice_…`
/// of the first output and `{case}.loss.batch_dice_…` of the deep-supervision sum) against
/// ours, each case with its ignore label, per-sample and batch Dice, to 1e-5.
fn loss_matches_fixture(name: &str, cases: &[(&str, Option<i64>)], regions: Option<stu_engine::loss::Regions>) {
    use stu_engine::loss::{DiceConfig, dc_ce, deep_supervision};
    use stu_engine::{Tensor, TensorData};
    let file = own_fixtures().join(format!("{name}.safetensors"));
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(own_fixtures().join(format!("{name}.json"))).unwrap()).unwrap();
    let device = stu_engine::backend::Backend::Flex.device().unwrap();
    let outputs: Vec<Tensor<5>> = (0..3)
        .map(|i| {
            let (s, l) = read_tensor(&file, &format!("logits.{i}"));
            Tensor::<5>::from_data(TensorData::new(l, [s[0], s[1], s[2], s[3], s[4]]), &device)
        })
        .collect();
    let weights: Vec<f64> = serde_json::from_value(want["weights"].clone()).unwrap();
    for &(case, ignore) in cases {
        let targets: Vec<Tensor<4, stu_engine::burn::tensor::Int>> = (0..3)
            .map(|i| {
                let (s, t) = read_tensor(&file, &format!("{case}.target.{i}"));
                Tensor::from_data(TensorData::new(t.into_iter().map(|v| v as i64).collect::<Vec<_>>(), [s[0], s[2], s[3], s[4]]), &device)
            })
            .collect();
        for batch_dice in [false, true] {
            let cfg = DiceConfig { batch_dice, ignore_label: ignore, regions, ..Default::default() };
            let scalar = |t: Tensor<1>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()[0] as f64;
            let key = |k: &str| want[format!("{case}.{k}.batch_dice_{}", if batch_dice { "True" } else { "False" })].as_f64().unwrap();
            let l0 = scalar(dc_ce(outputs[0].clone(), targets[0].clone(), cfg));
            let l = scalar(deep_supervision(&outputs, &targets, &weights, cfg));
            assert!((l0 - key("loss0")).abs() < 1e-5, "{name} {case}, batch_dice {batch_dice}: {l0} vs {}", key("loss0"));
            assert!((l - key("loss")).abs() < 1e-5, "{name} {case}, batch_dice {batch_dice}: {l} vs {}", key("loss"));
        }
    }
}

#[test]
fn the_loss_with_an_ignore_label_matches_nnunet() {
    // tests/fixtures/make_loss_ignore_fixture.py: nnU-Net 2.8.1's DC_and_CE_loss(ignore_label=4)
    // in DeepSupervisionWrapper; a quarter of the voxels ignored, and sample 0 wholly ignored.
    loss_matches_fixture("loss_ignore", &[("mixed", Some(4)), ("sample0_ignored", Some(4))], None);
}

#[test]
fn the_region_loss_matches_nnunet() {
    // tests/fixtures/make_loss_regions_fixture.py: nnU-Net 2.8.1's DC_and_BCE_loss (sigmoid
    // Dice over all regions, BCE with logits) in DeepSupervisionWrapper, regions [1,2,3],
    // [2,3], [3], with and without an ignore label (4).
    let regions = stu_engine::loss::Regions::new(&[vec![1, 2, 3], vec![2, 3], vec![3]]).unwrap();
    loss_matches_fixture("loss_regions", &[("plain", None), ("ignore", Some(4))], Some(regions));
}

#[test]
fn deep_supervision_loss_matches_nnunet() {
    // tests/fixtures/make_loss_fixture.py: nnU-Net 2.8.1's DC_and_CE_loss in DeepSupervisionWrapper.
    use stu_engine::loss::{DiceConfig, dc_ce, deep_supervision};
    use stu_engine::{Tensor, TensorData};
    let file = own_fixtures().join("loss.safetensors");
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(own_fixtures().join("loss.json")).unwrap()).unwrap();
    let device = stu_engine::backend::Backend::Flex.device().unwrap();
    let mut outputs = Vec::new();
    let mut targets = Vec::new();
    for i in 0..3 {
        let (s, l) = read_tensor(&file, &format!("logits.{i}"));
        outputs.push(Tensor::<5>::from_data(TensorData::new(l, [s[0], s[1], s[2], s[3], s[4]]), &device));
        let (s, t) = read_tensor(&file, &format!("target.{i}"));
        let t: Vec<i64> = t.into_iter().map(|v| v as i64).collect();
        targets.push(Tensor::<4, stu_engine::burn::tensor::Int>::from_data(TensorData::new(t, [s[0], s[2], s[3], s[4]]), &device));
    }
    let weights: Vec<f64> = serde_json::from_value(want["weights"].clone()).unwrap();
    assert_eq!(weights, stu_engine::schedule::ds_weights(3));
    for batch_dice in [false, true] {
        let cfg = DiceConfig { batch_dice, ..Default::default() };
        let scalar = |t: Tensor<1>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()[0] as f64;
        let l0 = scalar(dc_ce(outputs[0].clone(), targets[0].clone(), cfg));
        let l = scalar(deep_supervision(&outputs, &targets, &weights, cfg));
        let (w0, w) = (want[format!("loss0.batch_dice_{}", if batch_dice { "True" } else { "False" })].as_f64().unwrap(), want[format!("loss.batch_dice_{}", if batch_dice { "True" } else { "False" })].as_f64().unwrap());
        assert!((l0 - w0).abs() < 1e-5, "batch_dice {batch_dice}: {l0} vs {w0}");
        assert!((l - w).abs() < 1e-5, "batch_dice {batch_dice}: {l} vs {w}");
    }
}

/// Convolutions on wgpu against flex (`stu_harness::checkops`, as `stu check-ops --backend
/// wgpu` runs them): strided ones with a 1-wide kernel, whose input gradient burn-cubecl 0.22.1
/// returns as zeros, and outputs of 32³ voxels and more, whose weight gradient it gets wrong on
/// lavapipe (`stu_engine::ops::conv3d` works around both). Only with `--features wgpu` and a
/// Vulkan device (Mesa's lavapipe will do); one wgpu test at a time.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_convolution_gradients_equal_flexs() {
    let _one = WGPU.lock().unwrap_or_else(|e| e.into_inner());
    let bad: Vec<String> = stu_harness::checkops::convolutions(stu_engine::backend::Backend::Wgpu, 1e-5).unwrap().into_iter().filter(|c| !c.ok()).map(|c| format!("{c:?}")).collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

/// Every registered model's gradients on wgpu against flex's at 32³
/// (`stu_harness::checkops::model_gradients`: within 1e-2, or three times flex's own change
/// when its input is nudged by a few ulps, for a model whose gradients rounding moves that far).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_gradients_equal_flexs_for_every_model() {
    let _one = WGPU.lock().unwrap_or_else(|e| e.into_inner());
    let models = zoo::small_options();
    assert_eq!(stu_engine::model::registry().names().count(), models.len(), "a registered model without a case");
    let mut bad = Vec::new();
    for (name, options) in models {
        let c = stu_harness::checkops::model_gradients(stu_engine::backend::Backend::Wgpu, name, &options, 1e-2).unwrap();
        eprintln!("{c:?}");
        if !c.ok() {
            bad.push(c);
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// GELU and a Swin window's 117 649 relative-position lookups on wgpu, whose gradients burn
/// 0.22.1 gets wrong there: GELU's is the tanh approximation's, and `select` drops every
/// lookup after the 65 535th (`stu_engine::ops::gelu` and `lookup_rows` work around both).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_gelu_and_lookup_gradients_equal_flexs() {
    let _one = WGPU.lock().unwrap_or_else(|e| e.into_inner());
    let mut all = stu_harness::checkops::gelu(stu_engine::backend::Backend::Wgpu, 1e-5).unwrap();
    all.push(stu_harness::checkops::gather(stu_engine::backend::Backend::Wgpu, 1e-5).unwrap());
    let bad: Vec<_> = all.into_iter().filter(|c| !c.ok()).collect();
    assert!(bad.is_empty(), "{bad:#?}");
}
