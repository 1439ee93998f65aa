//! `stu check-ops` on burn's own kernels (`wgpu`, `cuda`, `ndarray`): values and gradients on
//! the device against flex's on the CPU, for the convolutions burn-cubecl got wrong
//! (`stu_engine::ops::conv3d` works around them), GELU and a Swin window's row lookups (whose
//! gradients burn gets wrong, `stu_engine::ops::gelu` and `lookup_rows`), and one
//! training step's gradients of every registered model. `tests/e2e/parity.rs` runs the same
//! cases on `wgpu` (lavapipe will do).

use stu_engine::backend::{Backend, OpsCheck};
use stu_engine::burn::tensor::Int;
use stu_engine::loss::{DiceConfig, deep_supervision};
use stu_engine::model::{NetSpec, registry};
use stu_engine::ops::{Layout, conv3d};
use stu_engine::{Tensor, TensorData};

/// One comparison: what, its error relative to the reference's largest value, the tolerance.
#[derive(Debug, Clone)]
pub struct Compared {
    /// What was compared.
    pub what: String,
    /// max |device − flex| / max |flex|.
    pub err: f64,
    /// Allowed.
    pub tol: f64,
}

impl Compared {
    /// Within tolerance.
    pub fn ok(&self) -> bool {
        self.err.is_finite() && self.err <= self.tol
    }
    fn line(&self) -> String {
        format!("{}: {:.2e} (tolerance {:.0e})", self.what, self.err, self.tol)
    }
}

/// max |a − b| / max(max |a|, floor); infinite when the lengths differ.
fn rel_err(a: &[f64], b: &[f64], floor: f64) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = a.iter().fold(floor, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (p, q)| m.max((p - q).abs())) / scale
}

/// A loss value and each parameter's gradient by path.
type StepGrads = (f64, Vec<(String, Vec<f64>)>);

fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().convert::<f64>().try_to_vec::<f64>().expect("f64 values")
}

/// The convolutions of the two burn-cubecl bugs: strided ones with a 1-wide kernel (odd sizes
/// too) and outputs of 32³ voxels per sample and more, 3³ and `[1, 3, 3]` kernels among them;
/// output, input gradient and weight gradient of each, to `tol`.
pub fn convolutions(backend: Backend, tol: f64) -> anyhow::Result<Vec<Compared>> {
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
    let mut out = Vec::new();
    for (shape, k, stride) in cases {
        let x: Vec<f32> = rng.fill_f32(shape.iter().product(), -1.0, 1.0);
        let w: Vec<f32> = rng.fill_f32(4 * shape[1] * k.iter().product::<usize>(), -1.0, 1.0);
        let run = |b: Backend| -> anyhow::Result<[Vec<f64>; 3]> {
            let d = b.device()?.autodiff();
            let xt = Tensor::<5>::from_data(TensorData::new(x.clone(), shape), &d).require_grad();
            let wt = Tensor::<5>::from_data(TensorData::new(w.clone(), [4, shape[1], k[0], k[1], k[2]]), &d).require_grad();
            let y = conv3d(xt.clone(), wt.clone(), Tensor::zeros([4], &d), stride, Layout::Ncdhw);
            let g = (y.clone() * y.clone()).sum().backward();
            Ok([values(y), values(xt.grad(&g).expect("input gradient")), values(wt.grad(&g).expect("weight gradient"))])
        };
        let (a, b) = (run(Backend::Flex)?, run(backend)?);
        for (what, (a, b)) in ["output", "input gradient", "weight gradient"].iter().zip(a.iter().zip(&b)) {
            out.push(Compared { what: format!("conv {shape:?} kernel {k:?} stride {stride:?}: {what}"), err: rel_err(a, b, 0.0), tol });
        }
    }
    Ok(out)
}

/// GELU (`stu_engine::ops::gelu`) on 20 001 points of [−5, 5]: values and gradient. burn's
/// generic gradient is the tanh approximation's, off by 8.7e-4 near x = 2.
pub fn gelu(backend: Backend, tol: f64) -> anyhow::Result<Vec<Compared>> {
    let x: Vec<f32> = (0..20_001).map(|i| (i as f32 - 10_000.0) / 2_000.0).collect();
    let run = |b: Backend| -> anyhow::Result<[Vec<f64>; 2]> {
        let d = b.device()?.autodiff();
        let xt = Tensor::<1>::from_data(TensorData::new(x.clone(), [x.len()]), &d).require_grad();
        let y = stu_engine::ops::gelu(xt.clone());
        let g = y.clone().sum().backward();
        Ok([values(y), values(xt.grad(&g).expect("input gradient"))])
    };
    let (a, b) = (run(Backend::Flex)?, run(backend)?);
    Ok(["value", "gradient"].iter().zip(a.iter().zip(&b)).map(|(what, (a, b))| Compared { what: format!("GELU on [-5, 5]: {what}"), err: rel_err(a, b, 0.0), tol }).collect())
}

/// Row lookups with repeats, as a Swin window's relative-position bias reads its table
/// (`stu_engine::ops::lookup_rows`: a 7³ window looks up 343² = 117 649 times into 13³ = 2 197
/// rows): the table's gradient adds every lookup's into its row. burn-cubecl's `select` loses
/// every lookup after the 65 535th there, on lavapipe.
pub fn gather(backend: Backend, tol: f64) -> anyhow::Result<Compared> {
    let mut rng = stu_core::rng::SplitMix64::new(9);
    let (rows, cols, n) = (2197usize, 3usize, 117_649usize);
    let table = rng.fill_f32(rows * cols, -1.0, 1.0);
    let index: Vec<i64> = (0..n).map(|_| (rng.next_u64() % rows as u64) as i64).collect();
    let w = rng.fill_f32(n * cols, -1.0, 1.0);
    let run = |b: Backend| -> anyhow::Result<Vec<f64>> {
        let d = b.device()?.autodiff();
        let t = Tensor::<2>::from_data(TensorData::new(table.clone(), [rows, cols]), &d).require_grad();
        let i = Tensor::<1, Int>::from_data(TensorData::new(index.clone(), [n]), &d);
        let picked = stu_engine::ops::lookup_rows(t.clone(), i);
        let g = (picked * Tensor::<2>::from_data(TensorData::new(w.clone(), [n, cols]), &d)).sum().backward();
        Ok(values(t.grad(&g).expect("table gradient")))
    };
    let (a, b) = (run(Backend::Flex)?, run(backend)?);
    Ok(Compared { what: format!("{n} lookups into {rows} rows: table gradient"), err: rel_err(&a, &b, 0.0), tol })
}

/// One training step's loss and gradients of model `name` (`seeded_init`, `options`, batch 2
/// of 32³, nnU-Net's loss over its deep-supervision outputs) on `backend` against flex's: the
/// worst parameter, its error relative to its largest gradient floored at 1e-2 of the largest
/// anywhere (a conv bias before an instance norm has a gradient of 0 up to rounding).
///
/// Rounding alone moves some models' gradients far: a pre-activation within rounding of the
/// LeakyReLU kink takes the other slope, and that spreads. So flex runs the step again on the
/// input scaled by 1 + ε for each ε of [`NUDGES`] (a few f32 ulps), and the tolerance is `tol`
/// or three times the largest change, whichever is larger: the tiny SwinUNETR's gradients move
/// by 6e-3 so, STU-Net's by 4e-3 (conv biases before a norm), nnFormer's by 1e-5 (UNETR's by
/// 1e-2 before its model revision 2). The kernel bugs were off by 0.3–1.
pub fn model_gradients(backend: Backend, name: &str, options: &serde_json::Value, tol: f64) -> anyhow::Result<Compared> {
    zoo::link();
    let e = registry().get(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let spec = NetSpec { in_channels: 1, num_classes: 3, strides: vec![[2; 3]; 2], options: options.clone() };
    let shape = [2usize, 1, 32, 32, 32];
    let mut rng = stu_core::rng::SplitMix64::new(3);
    let x = rng.fill_f32(shape.iter().product(), -1.0, 1.0);
    let mut targets: Option<Vec<(Vec<i64>, [usize; 4])>> = None;
    let mut run = |b: Backend, scale: f32| -> anyhow::Result<StepGrads> {
        let d = b.device()?.autodiff();
        let net = stu_engine::train::seeded_init((e.build)(&spec, &d).map_err(|e| anyhow::anyhow!("{name}: {e}"))?, 7);
        let input: Vec<f32> = x.iter().map(|v| v * scale).collect();
        let outs = net.forward_ds(Tensor::<5>::from_data(TensorData::new(input, shape), &d));
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
        let mut grads = net.gradients(loss);
        // Each parameter's gradient by path, flattened (`SegNet::update`, as the optimiser reads them).
        let mut g = Vec::new();
        net.update(&mut grads, &mut |path, value, grad| {
            g.push((path.to_string(), grad.map(values).unwrap_or_default()));
            value
        });
        Ok((value, g))
    };
    let reference = run(Backend::Flex, 1.0)?;
    let compared = reference.1.iter().filter(|(_, g)| !g.is_empty()).count();
    if 2 * compared < reference.1.len() {
        anyhow::bail!("{name}: only {compared} of {} parameters have gradients", reference.1.len());
    }
    let mut spread = 0f64;
    for nudge in NUDGES {
        spread = spread.max(worst_gradient(&reference, &run(Backend::Flex, 1.0 + nudge)?).0);
    }
    let (err, path) = worst_gradient(&reference, &run(backend, 1.0)?);
    Ok(Compared {
        what: format!("{name}: training step, worst of {compared} gradients ({path}; flex's own change under input nudges of {NUDGES:?}: {spread:.1e})"),
        err,
        tol: tol.max(3.0 * spread),
    })
}

/// The input scalings' offsets behind [`model_gradients`]' measure of rounding's reach.
const NUDGES: [f32; 3] = [1e-6, -1e-6, 3e-6];

/// The worst difference of step `b` from step `a`: the loss's relative to its value (floored
/// at 1) and each parameter's relative to its largest gradient (floored at 1e-2 of `a`'s
/// largest anywhere); and where it is. (A head the loss does not reach, e.g. STU-Net's
/// deepest, has no gradient on either.)
fn worst_gradient((l_a, g_a): &StepGrads, (l_b, g_b): &StepGrads) -> (f64, String) {
    let largest = g_a.iter().flat_map(|(_, g)| g.iter()).fold(0f64, |m, v| m.max(v.abs()));
    let mut worst = ((l_a - l_b).abs() / l_a.abs().max(1.0), "loss".to_string());
    for ((path, a), (_, b)) in g_a.iter().zip(g_b) {
        let err = rel_err(a, b, 1e-2 * largest);
        if err > worst.0 || err.is_nan() {
            worst = (err, path.clone());
        }
    }
    worst
}

/// Every check above on `backend` (burn's own kernels), with tolerances for its arithmetic:
/// CUDA's matrix units may round f32 products to TF32.
pub fn check(backend: Backend) -> anyhow::Result<OpsCheck> {
    anyhow::ensure!(
        !matches!(backend, Backend::Flex),
        "check-ops checks a device's operators against a reference: `--backend tch` or `tch-cuda` (libtorch's fast paths), or `wgpu`, `cuda` or `ndarray` (burn's own kernels, against flex); got `flex`"
    );
    backend.device()?;
    let tol = if backend == Backend::Cuda { 5e-3 } else { 1e-5 };
    let mut all = convolutions(backend, tol)?;
    all.extend(gelu(backend, tol)?);
    all.push(gather(backend, tol)?);
    for (name, options) in zoo::small_options() {
        all.push(model_gradients(backend, name, &options, 1e-2)?);
    }
    let mut check = OpsCheck::default();
    for c in all {
        let line = c.line();
        if !c.ok() {
            check.failures.push(line.clone());
        }
        check.lines.push(line);
    }
    Ok(check)
}
