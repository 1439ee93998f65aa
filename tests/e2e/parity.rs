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

/// One training step's loss and gradients on wgpu against flex's for the same network, input
/// and targets (nnU-Net's deep-supervision loss): each parameter's gradient to 1e-3 of its
/// largest value. Only with `--features wgpu` and a Vulkan device.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_gradients_equal_flexs() {
    let _one = WGPU.lock().unwrap_or_else(|e| e.into_inner());
    use stu_engine::burn::module::{Module, ModuleVisitor, Param};
    use stu_engine::burn::tensor::Int;
    use stu_engine::backend::Backend;
    use stu_engine::loss::{DiceConfig, deep_supervision};
    use stu_engine::model::SegNet;
    use stu_engine::{Tensor, TensorData};
    use zoo::stunet::{StuNet, StuNetArch};

    struct Grads<'a>(&'a stu_engine::burn::tensor::Gradients, Vec<(String, Vec<f64>)>, Vec<String>);
    impl ModuleVisitor for Grads<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.2.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.2.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let g = param.grad(self.0).map(|g| g.into_data().convert::<f64>().try_to_vec::<f64>().unwrap()).unwrap_or_default();
            self.1.push((self.2.join("."), g));
        }
    }
    let stages = 4;
    let arch = StuNetArch { in_channels: 1, num_classes: 3, depth: vec![1; stages], dims: vec![4, 8, 8, 16], strides: vec![[2, 2, 2]; stages - 1] };
    let shape = [2usize, 1, 16, 32, 32];
    let mut rng = stu_core::rng::SplitMix64::new(11);
    let x = rng.fill_f32(shape.iter().product(), -1.0, 1.0);
    // Four stages: three outputs (the deepest stage has none).
    let targets: Vec<(Vec<i64>, [usize; 4])> = (0..stages - 1)
        .map(|i| {
            let s = [2, 16 >> i, 32 >> i, 32 >> i];
            ((0..s.iter().product::<usize>()).map(|_| (rng.next_u64() % 3) as i64).collect(), s)
        })
        .collect();
    let flex = Backend::Flex.device().unwrap().autodiff();
    let net = StuNet::new(&arch, &flex).unwrap();
    let run = |net: &StuNet, device: &stu_engine::Device| {
        let outs = net.forward_ds(Tensor::<5>::from_data(TensorData::new(x.clone(), shape), device));
        let t: Vec<Tensor<4, Int>> = targets.iter().map(|(v, s)| Tensor::from_data(TensorData::new(v.clone(), *s), device)).collect();
        let loss = deep_supervision(&outs, &t, &stu_engine::schedule::ds_weights(stages - 1), DiceConfig::default());
        let value = loss.clone().into_scalar::<f32>() as f64;
        let grads = loss.backward();
        let mut v = Grads(&grads, Vec::new(), Vec::new());
        net.visit(&mut v);
        (value, v.1)
    };
    let wgpu = Backend::Wgpu.device().unwrap().autodiff();
    let (l_flex, g_flex) = run(&net, &flex);
    let (l_wgpu, g_wgpu) = run(&net.clone().fork(&wgpu), &wgpu);
    assert!((l_flex - l_wgpu).abs() < 1e-5 * l_flex.abs().max(1.0), "loss {l_flex} vs {l_wgpu}");
    // A conv bias just before an instance norm has a gradient of 0 up to rounding: such
    // gradients are compared against a floor of 1e-2 of the largest gradient anywhere.
    let largest = g_flex.iter().flat_map(|(_, g)| g.iter()).fold(0f64, |m, v| m.max(v.abs()));
    let mut worst = (0.0, String::new());
    for ((name, a), (_, b)) in g_flex.iter().zip(&g_wgpu) {
        assert_eq!(a.len(), b.len(), "{name}");
        let scale = a.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-2 * largest);
        let err = a.iter().zip(b).fold(0f64, |m, (p, q)| m.max((p - q).abs())) / scale;
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    assert!(worst.0 < 1e-3, "gradient of {} off flex's by {:.2e} of its largest value", worst.1, worst.0);
}

/// Convolutions on wgpu against flex, output, input gradient and weight gradient: strided ones
/// with a 1-wide kernel (STU-Net's strided 1×1×1 shortcut), odd sizes included, whose input
/// gradient burn-cubecl 0.22.1 returns as zeros; and outputs of 32³ and more voxels per sample,
/// whose weight gradient it gets wrong on lavapipe (`stu_engine::ops::conv3d` works around
/// both).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_convolution_gradients_equal_flexs() {
    let _one = WGPU.lock().unwrap_or_else(|e| e.into_inner());
    use stu_engine::backend::Backend;
    use stu_engine::ops::{Layout, conv3d};
    use stu_engine::{Tensor, TensorData};
    let mut rng = stu_core::rng::SplitMix64::new(5);
    let cases: [([usize; 5], [usize; 3], [usize; 3]); 7] = [
        ([2, 3, 8, 8, 8], [1, 1, 1], [2, 2, 2]),
        ([1, 3, 5, 7, 6], [1, 1, 1], [2, 2, 1]),
        ([1, 3, 7, 5, 9], [1, 1, 1], [1, 2, 2]),
        ([1, 2, 32, 32, 32], [1, 1, 1], [1, 1, 1]),
        ([2, 2, 32, 32, 32], [3, 3, 3], [1, 1, 1]),
        ([1, 2, 65, 64, 64], [3, 3, 3], [2, 2, 2]),
        ([1, 2, 1, 200, 190], [1, 3, 3], [1, 1, 1]),
    ];
    for (shape, k, stride) in cases {
        let x: Vec<f32> = rng.fill_f32(shape.iter().product(), -1.0, 1.0);
        let w: Vec<f32> = rng.fill_f32(4 * shape[1] * k.iter().product::<usize>(), -1.0, 1.0);
        let run = |b: Backend| {
            let d = b.device().unwrap().autodiff();
            let xt = Tensor::<5>::from_data(TensorData::new(x.clone(), shape), &d).require_grad();
            let wt = Tensor::<5>::from_data(TensorData::new(w.clone(), [4, shape[1], k[0], k[1], k[2]]), &d).require_grad();
            let y = conv3d(xt.clone(), wt.clone(), Tensor::zeros([4], &d), stride, Layout::Ncdhw);
            let out = y.clone().into_data().convert::<f64>().try_to_vec::<f64>().unwrap();
            let g = (y.clone() * y).sum().backward();
            let v = |t: Tensor<5>| t.into_data().convert::<f64>().try_to_vec::<f64>().unwrap();
            [out, v(xt.grad(&g).unwrap()), v(wt.grad(&g).unwrap())]
        };
        let (a, b) = (run(Backend::Flex), run(Backend::Wgpu));
        for (what, (a, b)) in ["output", "input gradient", "weight gradient"].iter().zip(a.iter().zip(&b)) {
            let scale = a.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = a.iter().zip(b).fold(0f64, |m, (p, q)| m.max((p - q).abs())) / scale;
            assert!(a.len() == b.len() && scale > 0.0 && err < 1e-5, "{shape:?} kernel {k:?} stride {stride:?}, {what}: off flex's by {err:.2e} of its largest value");
        }
    }
}

/// Every registered model's gradients on wgpu against flex's: the same He-initialised network
/// (small options, 3 classes, two downsamplings), input and targets, nnU-Net's loss over its
/// deep-supervision outputs; each parameter's gradient to 1e-2 (of its largest value, floored
/// at 1e-2 of the largest gradient anywhere). Rounding alone reaches a few 1e-3 at 32³: a
/// pre-activation within f32 rounding of the LeakyReLU kink takes the other slope on one
/// device, and that spreads; the kernel bugs this is for are off by 0.3–1. Only with
/// `--features wgpu`.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_gradients_equal_flexs_for_every_model() {
    let _one = WGPU.lock().unwrap_or_else(|e| e.into_inner());
    use serde_json::json;
    use stu_engine::backend::Backend;
    use stu_engine::burn::tensor::Int;
    use stu_engine::loss::{DiceConfig, deep_supervision};
    use stu_engine::model::{NetSpec, registry};
    use stu_engine::{Tensor, TensorData};
    zoo::link();
    // 32³ per sample: where burn-cubecl's weight gradients went wrong before the workaround.
    let cube = [32usize, 32, 32];
    let cases = [
        ("stunet", json!({"depth": [1, 1, 1], "dims": [4, 8, 8]}), cube),
        ("nnunet-plainconv", json!({"base_width": 4, "max_width": 16}), cube),
        ("nnunet-resenc", json!({"base_width": 4, "max_width": 16}), cube),
        ("unetr", json!({"img_size": 32, "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}), cube),
        ("nnformer", json!({"crop_size": cube, "embedding_dim": 12, "num_heads": [1, 2, 4, 8]}), cube),
    ];
    // Not SwinUNETR: on lavapipe the gradient of its relative-position bias table (a gather
    // whose backward adds many duplicates into one entry) loses contributions, entries that
    // are exactly 0 on wgpu and up to 3 % of the table's largest gradient on flex (2026-11-29).
    // Not worked around yet (`reports/bench/gpu.md`).
    assert_eq!(registry().names().count(), cases.len() + 1, "a registered model without a case here");
    let mut rng = stu_core::rng::SplitMix64::new(3);
    for (name, options, [z, y, x_]) in cases {
        let shape = [2usize, 1, z, y, x_];
        let x = rng.fill_f32(shape.iter().product(), -1.0, 1.0);
        let e = registry().get(name).unwrap();
        let spec = NetSpec { in_channels: 1, num_classes: 3, strides: vec![[2; 3]; 2], options };
        let mut targets: Option<Vec<(Vec<i64>, [usize; 4])>> = None;
        let mut run = |b: Backend| {
            let d = b.device().unwrap().autodiff();
            let net = stu_engine::train::he_init((e.build)(&spec, &d).unwrap(), 7);
            let outs = net.forward_ds(Tensor::<5>::from_data(TensorData::new(x.clone(), shape), &d));
            let t = targets.get_or_insert_with(|| {
                outs.iter()
                    .map(|o| {
                        let [n, _, z, y, x] = o.dims();
                        ((0..n * z * y * x).map(|_| (rng.next_u64() % 3) as i64).collect(), [n, z, y, x])
                    })
                    .collect()
            });
            let t: Vec<Tensor<4, Int>> = t.iter().map(|(v, s)| Tensor::from_data(TensorData::new(v.clone(), *s), &d)).collect();
            let loss = deep_supervision(&outs, &t, &stu_engine::schedule::ds_weights(outs.len()), DiceConfig::default());
            let value = loss.clone().into_scalar::<f32>() as f64;
            let grads = net.gradients(loss);
            let v = |g: Option<Vec<f64>>| g.unwrap_or_default();
            let g: Vec<(String, Vec<f64>)> = net
                .params()
                .into_iter()
                .map(|p| {
                    let flat = |t: Option<Tensor<1>>| t.map(|t| t.into_data().convert::<f64>().try_to_vec::<f64>().unwrap());
                    let g = match p.dims.len() {
                        1 => flat(grads.get::<1>(p.id)),
                        2 => flat(grads.get::<2>(p.id).map(|t| t.flatten(0, 1))),
                        3 => flat(grads.get::<3>(p.id).map(|t| t.flatten(0, 2))),
                        4 => flat(grads.get::<4>(p.id).map(|t| t.flatten(0, 3))),
                        _ => flat(grads.get::<5>(p.id).map(|t| t.flatten(0, 4))),
                    };
                    (p.path, v(g))
                })
                .collect();
            (value, g)
        };
        let (l_flex, g_flex) = run(Backend::Flex);
        let (l_wgpu, g_wgpu) = run(Backend::Wgpu);
        assert!((l_flex - l_wgpu).abs() < 1e-4 * l_flex.abs().max(1.0), "{name}: loss {l_flex} vs {l_wgpu}");
        let largest = g_flex.iter().flat_map(|(_, g)| g.iter()).fold(0f64, |m, v| m.max(v.abs()));
        let (mut worst, mut compared) = ((0.0, String::new()), 0);
        for ((path, a), (_, b)) in g_flex.iter().zip(&g_wgpu) {
            // (A head the loss does not reach, e.g. STU-Net's deepest, has no gradient on either.)
            assert_eq!(a.len(), b.len(), "{name}: {path}: gradient values");
            compared += usize::from(!a.is_empty());
            let scale = a.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-2 * largest);
            let err = a.iter().zip(b).fold(0f64, |m, (p, q)| m.max((p - q).abs())) / scale;
            if err > worst.0 {
                worst = (err, path.clone());
            }
        }
        eprintln!("{name}: loss {l_flex:.6} vs {l_wgpu:.6}, worst of {compared} gradients {} off by {:.2e}", worst.1, worst.0);
        assert!(2 * compared >= g_flex.len(), "{name}: {compared} of {} parameters have gradients", g_flex.len());
        assert!(worst.0 < 1e-2, "{name}: gradient of {} off flex's by {:.2e}", worst.1, worst.0);
    }
}


