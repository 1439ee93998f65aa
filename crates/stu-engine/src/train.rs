//! One training step of the nnU-Net recipe on an erased [`SegNet`]: deep-supervision loss,
//! backward, global-norm clipping, SGD with PyTorch's Nesterov semantics, plus the pieces a
//! resumable run needs (optimiser state by parameter path, seeded initialisation) and the
//! validation counts behind nnU-Net's pseudo Dice.
//!
//! The optimiser is ours rather than burn's `ModuleOptimizer`: burn keys its state by
//! `ParamId`, which a model rebuilt from a checkpoint does not keep, so a resumed run could not
//! find its momentum. Here the state is keyed by the parameter's module path and saved next to
//! the weights.

use std::collections::{BTreeMap, HashMap};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use stu_core::rng::SplitMix64;

use crate::checkpoint::NamedTensor;
use crate::dist::{DistError, Group};
use crate::loss::{DiceConfig, deep_supervision, deep_supervision_in};
use crate::model::SegNet;

/// A float parameter of a module.
#[derive(Debug, Clone)]
pub struct ParamInfo {
    /// burn module path (`conv_blocks_context.0.0.norm1.gamma`).
    pub path: String,
    /// burn id (valid for this module instance only).
    pub id: ParamId,
    /// Extents.
    pub dims: Vec<usize>,
}

/// `f(path, value, grad) → new value`, on flattened tensors without autodiff.
pub type UpdateFn<'a> = dyn FnMut(&str, Tensor<1>, Option<Tensor<1>>) -> Tensor<1> + 'a;

struct Infos {
    path: Vec<String>,
    out: Vec<ParamInfo>,
}

impl ModuleVisitor for Infos {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.push(ParamInfo { path: self.path.join("."), id: param.id, dims: param.val().dims().to_vec() });
    }
}

/// Every float parameter of `module` with its path, in visit order.
pub fn param_infos<M: Module>(module: &M) -> Vec<ParamInfo> {
    let mut v = Infos { path: Vec::new(), out: Vec::new() };
    module.visit(&mut v);
    v.out
}

struct Mapper<'a, 'f> {
    path: Vec<String>,
    grads: &'a mut GradientsParams,
    f: &'a mut UpdateFn<'f>,
}

impl ModuleMapper for Mapper<'_, '_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let dims = tensor.dims();
        let n: usize = dims.iter().product();
        let grad = self.grads.remove::<D>(id).map(|g| g.reshape([n]));
        let new = (self.f)(&self.path.join("."), tensor.inner().reshape([n]), grad).reshape(dims);
        let mut new = Tensor::from_inner(new);
        if require_grad {
            new = new.require_grad();
        }
        Param::from_mapped_value(id, new, mapper)
    }
}

struct Caster {
    dtype: burn::tensor::DType,
    keep_vectors: bool,
}

impl ModuleMapper for Caster {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let keep = D == 1 && self.keep_vectors && {
            let device = tensor.device();
            crate::ops::is_libtorch(&device, crate::ops::TorchPath::Conv) && crate::ops::is_libtorch(&device, crate::ops::TorchPath::Norm)
        };
        let cast = if keep {
            tensor
        } else if D == 5 {
            // (Convolution weights: channels-last from the cast where the convolutions run so.)
            let w = crate::ops::cast_conv_weight(Tensor::<5>::from_dispatch(tensor.into_dispatch()), self.dtype);
            Tensor::<D>::from_dispatch(w.into_dispatch())
        } else {
            tensor.cast(self.dtype)
        };
        Param::from_mapped_value(id, cast, mapper)
    }
}

/// `module` with its float parameters cast to `dtype`, keeping the autodiff graph (the casts
/// are differentiable), for mixed-precision forwards over f32 master weights. With
/// `keep_vectors`, on a device where libtorch runs both the convolutions and the norms
/// (`crate::torch`), rank-1 parameters (biases, norm affine) stay f32: those operators take them
/// so (the norm wants f32 affine parameters under half precision anyway, as autocast gives them;
/// a bias is cast where it is added). Two small casts per vector per step less (one forward, one
/// backward), about 270 ATen calls for STU-Net-B, which a GPU waits for at the start of the
/// forward and the end of the backward.
pub fn cast_params<M: Module>(module: M, dtype: burn::tensor::DType, keep_vectors: bool) -> M {
    module.map(&mut Caster { dtype, keep_vectors })
}

/// Applies `f` to every float parameter of `module` (see [`UpdateFn`]).
pub fn map_params<M: Module>(module: M, grads: &mut GradientsParams, f: &mut UpdateFn<'_>) -> M {
    module.map(&mut Mapper { path: Vec::new(), grads, f })
}

/// How [`seeded_init`] draws one parameter of a fresh network: what its model's builder
/// declared, as a distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Draw {
    /// N(0, sd²): nnU-Net's `InitWeights_He(1e-2)` (sd = gain/√fan_in), and
    /// `trunc_normal_(std=0.02)` (truncated at ±2, which N(0, 0.02²) never reaches).
    Normal(f64),
    /// U(−bound, bound): PyTorch's own `reset_parameters` of `Linear`, `Conv3d` and
    /// `ConvTranspose3d` (bound 1/√fan_in, for the weight and its bias alike).
    Uniform(f64),
    /// Kept as built: a constant (norm scales 1, shifts and nnU-Net's biases 0).
    Keep,
}

impl Draw {
    /// The draw burn's `init` makes for a tensor of `fan_in` (PyTorch's: `shape[1]·kernel`).
    ///
    /// # Panics
    /// On an initializer the zoo does not declare (Xavier, orthogonal, a shifted normal or an
    /// asymmetric uniform): a builder's mistake, not the user's.
    pub fn of(init: &burn::nn::Initializer, fan_in: usize) -> Draw {
        use burn::nn::Initializer as I;
        let fan_in = fan_in.max(1) as f64;
        match *init {
            I::Constant { .. } | I::Ones | I::Zeros => Draw::Keep,
            I::Normal { mean: 0.0, std } => Draw::Normal(std),
            I::Uniform { min, max } if min == -max => Draw::Uniform(max),
            I::KaimingNormal { gain, fan_out_only: false } => Draw::Normal(gain / fan_in.sqrt()),
            I::KaimingUniform { gain, fan_out_only: false } => Draw::Uniform(gain * (3.0 / fan_in).sqrt()),
            ref other => panic!("seeded initialisation cannot draw {other:?}"),
        }
    }
}

/// Each parameter's [`Draw`] by burn id, recorded by the builder of a fresh network (empty for
/// one read from a checkpoint).
#[derive(Debug, Clone, Default)]
pub struct InitRules(pub HashMap<ParamId, Draw>);

/// A fresh network's weights drawn from a seed, each parameter as its model's builder declared
/// it ([`SegNet::init_rules`]): nnU-Net's `InitWeights_He(1e-2)` for STU-Net, PlainConvUNet
/// and ResEnc (convolution weights N(0, gain²/fan_in) with gain √(2/(1+0.01²)), biases 0);
/// PyTorch's defaults for MONAI's UNETR and SwinUNETR and for nnFormer, as their code leaves
/// them (weights and biases U(±1/√fan_in)), except what they draw themselves
/// (`trunc_normal_(std=0.02)`: relative-position bias tables, UNETR's position embeddings);
/// norm scales 1 and shifts 0 everywhere (`stunet.md` §1.7: "the InstanceNorm affine keeps
/// weight 1 and bias 0"). Parameters are drawn in visit order from one stream and constants
/// draw nothing, so two runs with one seed start equal, on any backend.
///
/// # Panics
/// If `net` was not built fresh (a network read from a checkpoint records no draws).
pub fn seeded_init(net: Box<dyn SegNet>, seed: u64) -> Box<dyn SegNet> {
    let rules = net.init_rules().filter(|r| !r.0.is_empty()).cloned().unwrap_or_else(|| panic!("seeded_init: this {} network was not built fresh, so it has no declared draws", net.family()));
    let mut rng = SplitMix64::new(seed ^ 0x6a09_e667_f3bc_c909);
    let ids: HashMap<String, (ParamId, usize)> = net.params().into_iter().map(|p| (p.path, (p.id, p.dims.iter().product()))).collect();
    let mut none = GradientsParams::new();
    net.update(&mut none, &mut |path, value, _| {
        let (id, n) = ids[path];
        let draw = *rules.0.get(&id).unwrap_or_else(|| panic!("seeded_init: no declared draw for `{path}`"));
        let values = match draw {
            Draw::Keep => return value,
            Draw::Normal(sd) => rng.normals_par(n, sd),
            Draw::Uniform(bound) => rng.uniforms_par(n, bound),
        };
        Tensor::from_data(TensorData::new(values, [n]), &value.device())
    })
}

/// `trunc_normal_(std=0.02)`'s spread, which the transformers draw their relative-position
/// bias tables and position embeddings with.
pub const TRANSFORMER_STD: f64 = 0.02;

/// A network after an optimizer step, its gradient norm before clipping, and whether the step
/// was skipped ([`Optimizer::clip_step_fused`]).
pub type Stepped = (Box<dyn SegNet>, f64, bool);

/// nnU-Net's optimiser, or one of its trainer variants' ([`OptimizerKind`]), with its state by
/// parameter path: `torch.optim.SGD(momentum, nesterov=True, dampening=0, weight_decay)`,
/// `AdamW(amsgrad=True)` or `Adam`.
#[derive(Debug, Clone)]
pub struct Optimizer {
    /// The update rule.
    pub kind: OptimizerKind,
    /// SGD's momentum (0.99).
    pub momentum: f64,
    /// Weight decay (3e-5) on every parameter: coupled (added to the gradient) for SGD and
    /// Adam, decoupled for AdamW.
    pub weight_decay: f64,
    /// Dynamic loss scaling, on for f16 training (see [`GradScaler`]); saved with the buffers.
    pub scaler: Option<GradScaler>,
    /// State tensors by their name in PyTorch's optimiser state: `{path}.momentum_buffer`
    /// (SGD), `{path}.exp_avg`, `{path}.exp_avg_sq`, `{path}.max_exp_avg_sq` (Adam, AMSGrad).
    buffers: BTreeMap<String, Tensor<1>>,
    /// Adam's step count per parameter path.
    steps: BTreeMap<String, u64>,
}

/// The update rules of nnU-Net's trainers (`nnUNetTrainer`, and the variants of
/// `nnunetv2/training/nnUNetTrainer/variants/optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// SGD with Nesterov momentum 0.99 (`nnUNetTrainer`).
    #[default]
    Sgd,
    /// AdamW with AMSGrad, betas (0.9, 0.999), eps 1e-8 (`nnUNetTrainerAdam`).
    Adamw,
    /// Adam, weight decay added to the gradient (`nnUNetTrainerVanillaAdam`).
    Adam,
}

impl OptimizerKind {
    /// Every kind with its name in specs and on the command line.
    pub const ALL: [(&'static str, OptimizerKind); 3] = [("sgd", Self::Sgd), ("adamw", Self::Adamw), ("adam", Self::Adam)];

    /// Its name (`sgd`, `adamw`, `adam`).
    pub fn name(self) -> &'static str {
        stu_core::registry::choice_name(&Self::ALL, &self)
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Result<Self, String> {
        stu_core::registry::choice(&Self::ALL, "optimizer", name)
    }
}

/// Adam's `β₁`, `β₂` and `ε` (PyTorch's defaults, which nnU-Net keeps).
const ADAM_BETAS: (f64, f64) = (0.9, 0.999);
const ADAM_EPS: f64 = 1e-8;

/// PyTorch's `torch.amp.GradScaler` with its defaults, as nnU-Net trains in f16: the loss is
/// multiplied by `scale` before the backward so that small f16 gradients do not flush to zero;
/// the gradients are divided by it before clipping; a step whose gradients are not finite is
/// skipped and halves the scale, and 2000 finite steps in a row double it. The scale is a power
/// of two, so scaling and unscaling are exact.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradScaler {
    /// The current loss scale (initially 2¹⁶).
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub growth_tracker: u32,
}

impl Default for GradScaler {
    fn default() -> Self {
        Self { scale: 65536.0, growth_tracker: 0 }
    }
}

impl GradScaler {
    /// Finite steps after which the scale doubles.
    pub const GROWTH_INTERVAL: u32 = 2000;

    /// The scale after a step whose gradients were finite (`true`) or not.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.growth_tracker += 1;
            if self.growth_tracker == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.growth_tracker = 0;
            }
        } else {
            self.scale *= 0.5;
            self.growth_tracker = 0;
        }
    }
}

impl Optimizer {
    /// nnU-Net's optimiser: SGD, momentum 0.99, weight decay 3e-5.
    pub fn nnunet() -> Self {
        Self::new(OptimizerKind::Sgd)
    }

    /// nnU-Net's trainer with `kind` (weight decay 3e-5).
    pub fn new(kind: OptimizerKind) -> Self {
        Self { kind, momentum: 0.99, weight_decay: 3e-5, scaler: None, buffers: BTreeMap::new(), steps: BTreeMap::new() }
    }

    /// One step with learning rate `lr`. SGD:
    /// `g ← g + wd·p; b ← g (first step) or μ·b + g; p ← p − lr·(g + μ·b)`. Adam (PyTorch's
    /// `_single_tensor_adam`): `m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²` (AMSGrad: `v̂ ← max(v̂, v)`),
    /// `p ← p − lr/(1−β₁ᵗ) · m / (√v̂ / √(1−β₂ᵗ) + ε)`, with `g ← g + wd·p` first (Adam) or
    /// `p ← p·(1 − lr·wd)` (AdamW).
    pub fn step(&mut self, net: Box<dyn SegNet>, grads: &mut GradientsParams, lr: f64) -> Box<dyn SegNet> {
        net.update(grads, &mut |path, p, g| match g {
            Some(g) => self.update_param(path, p, g, lr),
            None => p,
        })
    }

    /// [`Optimizer::step`] for one flattened parameter `p` at `path` with gradient `g`: the
    /// new value (the state is updated).
    pub fn update_param(&mut self, path: &str, p: Tensor<1>, g: Tensor<1>, lr: f64) -> Tensor<1> {
        let (mu, wd, kind) = (self.momentum, self.weight_decay, self.kind);
        let buffers = &mut self.buffers;
        if kind == OptimizerKind::Sgd {
            let g = g + p.clone() * wd;
            let key = format!("{path}.momentum_buffer");
            let b = match buffers.remove(&key) {
                Some(b) => b * mu + g.clone(),
                None => g.clone(),
            };
            let out = p - (g + b.clone() * mu) * lr;
            buffers.insert(key, b);
            return out;
        }
        let (b1, b2) = ADAM_BETAS;
        let (p, g) = match kind {
            OptimizerKind::Adamw => (p * (1.0 - lr * wd), g),
            _ => (p.clone(), g + p * wd),
        };
        let t = self.steps.entry(path.to_string()).or_insert(0);
        *t += 1;
        let zeros = || g.zeros_like();
        let m = buffers.remove(&format!("{path}.exp_avg")).unwrap_or_else(zeros) * b1 + g.clone() * (1.0 - b1);
        let v = buffers.remove(&format!("{path}.exp_avg_sq")).unwrap_or_else(zeros) * b2 + g.clone() * g * (1.0 - b2);
        let vhat = match kind {
            OptimizerKind::Adamw => {
                let prev = buffers.remove(&format!("{path}.max_exp_avg_sq")).unwrap_or_else(|| v.zeros_like());
                let max = prev.max_pair(v.clone());
                buffers.insert(format!("{path}.max_exp_avg_sq"), max.clone());
                max
            }
            _ => v.clone(),
        };
        let bc1 = 1.0 - b1.powi(*t as i32);
        let bc2 = 1.0 - b2.powi(*t as i32);
        let denom = vhat.sqrt() / bc2.sqrt() + ADAM_EPS;
        let out = p - m.clone() / denom * (lr / bc1);
        buffers.insert(format!("{path}.exp_avg"), m);
        buffers.insert(format!("{path}.exp_avg_sq"), v);
        out
    }

    /// Clipping to `clip` (after unscaling, with loss scaling) and [`Optimizer::step`] as a few
    /// multi-tensor kernels for all parameters together, as PyTorch's `clip_grad_norm_` and
    /// `SGD` run with `foreach` (`crate::torch::foreach`), on a libtorch device where
    /// `STU_TCH_NATIVE` enables `sgd`; elsewhere `Err(net)`, untouched. Returns the network, the
    /// (unscaled) gradient norm before clipping and whether the step was skipped (loss scaling:
    /// gradients not finite; the scale is updated here).
    #[allow(unused_variables, unused_mut)]
    pub fn clip_step_fused(&mut self, net: Box<dyn SegNet>, grads: &mut GradientsParams, lr: f64, clip: f64, device: &burn::tensor::Device) -> Result<Stepped, Box<dyn SegNet>> {
        #[cfg(feature = "tch")]
        if self.kind == OptimizerKind::Sgd && crate::ops::is_libtorch(device, crate::ops::TorchPath::Sgd) {
            use crate::torch::foreach;
            // The parameters that have a gradient, in visit order; the network comes back as it was.
            let (mut paths, mut ps, mut gs) = (Vec::new(), Vec::new(), Vec::new());
            let net = net.update(grads, &mut |path, p, g| {
                if let Some(g) = g {
                    paths.push(path.to_string());
                    ps.push(p.clone());
                    gs.push(g);
                }
                p
            });
            let Some(total) = foreach::norm(&gs) else { return Ok((net, 0.0, false)) };
            let (coef, mul, norm) = match self.scaler.as_mut() {
                None => (Some(clip_coef_on_device(&total, clip)), 1.0, None),
                Some(s) => {
                    let scale = s.scale;
                    let norm = total.clone().into_scalar::<f32>() as f64 / scale;
                    s.update(norm.is_finite());
                    if !norm.is_finite() {
                        return Ok((net, norm, true));
                    }
                    (None, clip_coef(norm, clip) / scale, Some(norm))
                }
            };
            let bufs: Vec<Option<Tensor<1>>> = paths.iter().map(|p| self.buffers.remove(&format!("{p}.momentum_buffer"))).collect();
            let (new_params, new_bufs) = foreach::sgd(&ps, &gs, &bufs, coef.as_ref(), mul, lr, self.momentum, self.weight_decay);
            drop((ps, gs, bufs));
            for (path, b) in paths.iter().zip(new_bufs) {
                self.buffers.insert(format!("{path}.momentum_buffer"), b);
            }
            let mut updated = paths.into_iter().zip(new_params).peekable();
            let net = net.update(&mut GradientsParams::new(), &mut |path, p, _| match updated.next_if(|(q, _)| q == path) {
                Some((_, new)) => new,
                None => p,
            });
            // Read once the step is queued (a GPU keeps working meanwhile).
            let norm = norm.unwrap_or_else(|| total.into_scalar::<f32>() as f64);
            return Ok((net, norm, false));
        }
        Err(net)
    }

    /// The state as named tensors, sorted by name: SGD's momentum buffers
    /// (`{path}.momentum_buffer`), Adam's moments (`{path}.exp_avg`, `{path}.exp_avg_sq`, and
    /// `{path}.max_exp_avg_sq` for AMSGrad) and step counts (`{path}.step`, exact in f32 up to
    /// 2²⁴ steps), and the loss scaler's state when it is on (`grad_scaler.scale`,
    /// `grad_scaler.growth_tracker`; both exact in f32).
    pub fn state(&self) -> Vec<NamedTensor> {
        let mut out: Vec<NamedTensor> = self
            .buffers
            .iter()
            .map(|(name, b)| {
                let data = b.clone().into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data");
                NamedTensor { name: name.clone(), shape: vec![data.len()], data }
            })
            .collect();
        out.extend(self.steps.iter().map(|(path, &t)| NamedTensor { name: format!("{path}.step"), shape: vec![1], data: vec![t as f32] }));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(s) = self.scaler {
            out.push(NamedTensor { name: "grad_scaler.scale".into(), shape: vec![1], data: vec![s.scale as f32] });
            out.push(NamedTensor { name: "grad_scaler.growth_tracker".into(), shape: vec![1], data: vec![s.growth_tracker as f32] });
        }
        out
    }

    /// Restores the state written by [`Optimizer::state`] for this optimizer's kind; every
    /// buffer must name a parameter of `net` with as many elements.
    pub fn load_state(&mut self, net: &dyn SegNet, state: Vec<NamedTensor>, device: &burn::tensor::Device) -> Result<(), String> {
        let sizes: HashMap<String, usize> = net.params().into_iter().map(|p| (p.path, p.dims.iter().product())).collect();
        self.buffers.clear();
        self.steps.clear();
        self.scaler = None;
        let fields: &[&str] = match self.kind {
            OptimizerKind::Sgd => &["momentum_buffer"],
            OptimizerKind::Adamw => &["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"],
            OptimizerKind::Adam => &["exp_avg", "exp_avg_sq", "step"],
        };
        for t in state {
            if let Some(field) = t.name.strip_prefix("grad_scaler.") {
                let v = match t.data.as_slice() {
                    [v] if v.is_finite() && *v >= 0.0 => *v as f64,
                    _ => return Err(format!("optimizer key `{}` must hold one finite, non-negative value", t.name)),
                };
                let s = self.scaler.get_or_insert_with(GradScaler::default);
                match field {
                    "scale" if v > 0.0 => s.scale = v,
                    "growth_tracker" => s.growth_tracker = v as u32,
                    _ => return Err(format!("optimizer key `{}` is not a loss-scaler field (`scale` > 0, `growth_tracker`)", t.name)),
                }
                continue;
            }
            let Some((path, field)) = t.name.rsplit_once('.').filter(|(_, f)| fields.contains(f)) else {
                return Err(format!("optimizer key `{}` is not state of {} (`{{parameter}}.{}`)", t.name, self.kind.name(), fields.join("|")));
            };
            if field == "step" {
                match (sizes.contains_key(path), t.data.as_slice()) {
                    (true, [v]) if v.is_finite() && *v >= 1.0 && v.fract() == 0.0 => self.steps.insert(path.to_string(), *v as u64),
                    (true, _) => return Err(format!("optimizer key `{}` must hold one whole step count ≥ 1", t.name)),
                    (false, _) => return Err(format!("optimizer key `{}` names no parameter of the model", t.name)),
                };
                continue;
            }
            match sizes.get(path) {
                Some(&n) if n == t.data.len() => {}
                Some(&n) => return Err(format!("optimizer key `{}` has {} values, the parameter {n}", t.name, t.data.len())),
                None => return Err(format!("optimizer key `{}` names no parameter of the model", t.name)),
            }
            let n = t.data.len();
            self.buffers.insert(t.name, Tensor::from_data(TensorData::new(t.data, [n]), device));
        }
        Ok(())
    }
}

/// Calls `f::<D>(args…)` with `D` the rank of a parameter (1 to 5), as burn's gradient store
/// is typed by rank.
macro_rules! by_rank {
    ($rank:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $rank {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            r => panic!("parameters of rank {r} are not expected"),
        }
    };
}

/// Scales the gradients so that their joint L2 norm is at most `max_norm`
/// (`clip_grad_norm_`, coefficient `max/(norm+1e-6)` when below 1); returns the norm before.
pub fn clip_grad_norm(net: &dyn SegNet, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    clip_grad_norm_on_device(net, grads, max_norm).map_or(0.0, |t| t.into_scalar::<f32>() as f64)
}

/// [`clip_grad_norm`] without a host round trip: the norm stays on the device (`None` when no
/// parameter has a gradient).
fn clip_grad_norm_on_device(net: &dyn SegNet, grads: &mut GradientsParams, max_norm: f64) -> Option<Tensor<1>> {
    clip_by_ids(&param_ids(net), grads, max_norm)
}

fn param_ids(net: &dyn SegNet) -> Vec<(ParamId, usize)> {
    net.params().into_iter().map(|p| (p.id, p.dims.len())).collect()
}

/// Unscales gradients computed from a loss times `scale` and clips them to `max_norm`, as
/// `GradScaler.unscale_` then `clip_grad_norm_` do. Returns the unscaled norm, read to the host
/// (the skip decision needs it); non-finite when a gradient overflowed, and then the gradients
/// are left as they are.
fn unscale_and_clip(net: &dyn SegNet, grads: &mut GradientsParams, max_norm: f64, scale: f64) -> f64 {
    let ids = param_ids(net);
    let Some(total) = norm_by_ids(&ids, grads) else { return 0.0 };
    let norm = total.clone().into_scalar::<f32>() as f64 / scale;
    if norm.is_finite() {
        let coef = clip_coef(norm, max_norm) / scale;
        scale_by_ids(&ids, grads, &Tensor::<1>::from_data(TensorData::new(vec![coef as f32], [1]), &total.device()));
    }
    norm
}

/// `clip_grad_norm_`'s coefficient `min(max_norm / (norm + 1e-6), 1)` for a norm on the host.
fn clip_coef(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// [`clip_coef`] for a 1-element norm on the device (no host round trip).
fn clip_coef_on_device(total: &Tensor<1>, max_norm: f64) -> Tensor<1> {
    ((total.clone() + 1e-6).recip() * max_norm).clamp_max(1.0)
}

/// [`clip_grad_norm`] over parameters given as `(id, rank)`, as PyTorch computes it: on the
/// device, the coefficient clamped to 1 and applied to every gradient (a product with 1 is
/// exact), so that nothing waits for the GPU (reading one norm per parameter to the host cost a
/// synchronisation each).
pub(crate) fn clip_by_ids(ids: &[(ParamId, usize)], grads: &mut GradientsParams, max_norm: f64) -> Option<Tensor<1>> {
    let total = norm_by_ids(ids, grads)?;
    scale_by_ids(ids, grads, &clip_coef_on_device(&total, max_norm));
    Some(total)
}

/// The joint L2 norm of the gradients, on the device (`None` when there are none).
fn norm_by_ids(ids: &[(ParamId, usize)], grads: &GradientsParams) -> Option<Tensor<1>> {
    fn sq<const D: usize>(g: &GradientsParams, id: ParamId) -> Option<Tensor<1>> {
        g.get::<D>(id).map(|t| {
            let t = t.cast(burn::tensor::DType::F32);
            t.clone().mul(t).sum()
        })
    }
    let parts: Vec<Tensor<1>> = ids.iter().filter_map(|&(id, d)| by_rank!(d, sq(grads, id))).collect();
    (!parts.is_empty()).then(|| Tensor::cat(parts, 0).sum().sqrt())
}

/// Every gradient times the 1-element `coef`.
fn scale_by_ids(ids: &[(ParamId, usize)], grads: &mut GradientsParams, coef: &Tensor<1>) {
    fn scale<const D: usize>(g: &mut GradientsParams, id: ParamId, coef: &Tensor<1>) {
        if let Some(t) = g.remove::<D>(id) {
            let dtype = t.dtype();
            g.register(id, t * coef.clone().cast(dtype).reshape([1; D]));
        }
    }
    for &(id, d) in ids {
        by_rank!(d, scale(grads, id, coef));
    }
}

/// A batch on the device: input `[B, C, D, H, W]` and one target per supervised output.
pub struct DeviceBatch {
    /// Input.
    pub x: Tensor<5>,
    /// Class indices per output, full resolution first.
    pub targets: Vec<Tensor<4, Int>>,
}

impl DeviceBatch {
    /// Uploads CPU arrays (`x` row-major `[B,C,D,H,W]`, each target `[B,d,h,w]`).
    pub fn upload(x: Vec<f32>, shape: [usize; 5], targets: &[(Vec<i16>, [usize; 4])], device: &burn::tensor::Device) -> Self {
        let x = Tensor::from_data(TensorData::new(x, shape), device);
        let targets = targets
            .iter()
            .map(|(t, s)| Tensor::from_data(TensorData::new(t.iter().map(|&v| i64::from(v.max(0))).collect::<Vec<i64>>(), *s), device))
            .collect();
        Self { x, targets }
    }
}

/// What one training step reports.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Deep-supervision loss.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// With loss scaling: the gradients overflowed, so the step was skipped (the weights and
    /// the momentum are unchanged) and the scale halved.
    pub skipped: bool,
}

/// The settings of one step of nnU-Net's recipe.
#[derive(Debug, Clone, Copy)]
pub struct StepConfig<'a> {
    /// Deep-supervision weights, one per output.
    pub weights: &'a [f64],
    /// Soft-Dice settings.
    pub dice: DiceConfig,
    /// Learning rate of this step.
    pub lr: f64,
    /// Global gradient-norm bound.
    pub clip: f64,
    /// Arithmetic of the forward and backward.
    pub precision: crate::precision::Precision,
}

/// Forward (deep supervision, in `precision` over the f32 parameters), loss in f32, backward,
/// clip to `clip`, optimiser step with `lr` ([`Optimizer`]).
pub fn train_step(net: Box<dyn SegNet>, sgd: &mut Optimizer, batch: &DeviceBatch, step: &StepConfig<'_>) -> (Box<dyn SegNet>, StepStats) {
    train_step_in(net, sgd, batch, step, &mut Group::single()).expect("a single process has no peers to lose")
}

/// [`train_step`] as one replica of a data-parallel group, `batch` being this rank's share of
/// the global batch: the gradients are averaged over the ranks (one ring all-reduce, with the
/// loss riding along) before clipping and the optimiser step, which then run identically everywhere. The
/// reported loss is the global batch's.
pub fn train_step_in(net: Box<dyn SegNet>, sgd: &mut Optimizer, batch: &DeviceBatch, step: &StepConfig<'_>, group: &mut Group) -> Result<(Box<dyn SegNet>, StepStats), DistError> {
    let StepConfig { weights, dice, lr, clip, precision } = *step;
    if precision == crate::precision::Precision::F16 {
        sgd.scaler.get_or_insert_with(GradScaler::default);
    }
    let half = precision.cast_net(&*net);
    let outs = precision.forward_ds_for_loss(&*net, half.as_deref(), batch.x.clone());
    drop(half);
    let n = outs.len().min(batch.targets.len());
    let (loss, share) = deep_supervision_in(&outs[..n], &batch.targets[..n], &weights[..n], dice, group)?;
    drop(outs);
    // The loss value is read once the whole step is queued (on a GPU, reading it here would
    // stall the device before the backward).
    let kept = loss.clone().detach();
    let scale = sgd.scaler.map(|s| s.scale);
    let mut grads = net.gradients(match scale {
        Some(s) => loss * s,
        None => loss,
    });
    let value = match group.world() {
        1 => None,
        _ => {
            let mut value = [share.unwrap_or_else(|| kept.clone().into_scalar::<f32>() as f64) as f32];
            average_gradients(&*net, &mut grads, group, &mut value)?;
            Some(value[0] as f64)
        }
    };
    let (net, grad_norm, skipped) = match sgd.clip_step_fused(net, &mut grads, lr, clip, &batch.x.device()) {
        Ok(done) => done,
        Err(net) => match scale {
            None => {
                let norm = clip_grad_norm_on_device(&*net, &mut grads, clip);
                let net = sgd.step(net, &mut grads, lr);
                (net, norm.map_or(0.0, |t| t.into_scalar::<f32>() as f64), false)
            }
            Some(s) => {
                // The gradients are equal on every rank, so every rank takes the same decision.
                let norm = unscale_and_clip(&*net, &mut grads, clip, s);
                let finite = norm.is_finite();
                sgd.scaler.as_mut().expect("scaler on").update(finite);
                let net = if finite { sgd.step(net, &mut grads, lr) } else { net };
                (net, norm, !finite)
            }
        },
    };
    let loss = value.or(share).unwrap_or_else(|| kept.into_scalar::<f32>() as f64);
    Ok((net, StepStats { loss, grad_norm, skipped }))
}

/// Replaces every gradient of `net` by its mean over the ranks of `group`, and `extra` (small
/// values that travel with them) by its mean too. The gradients are packed into one flat
/// tensor on their device, so a GPU copies them to the host and back once per step, not once
/// per parameter. Nothing moves in a group of one.
pub fn average_gradients(net: &dyn SegNet, grads: &mut GradientsParams, group: &mut Group, extra: &mut [f32]) -> Result<(), DistError> {
    if group.world() == 1 {
        return Ok(());
    }
    fn take<const D: usize>(g: &mut GradientsParams, id: ParamId) -> Option<Tensor<1>> {
        g.remove::<D>(id).map(|t| {
            let n: usize = t.dims().iter().product();
            t.reshape([n])
        })
    }
    fn put<const D: usize>(g: &mut GradientsParams, id: ParamId, flat: Tensor<1>, dims: &[usize], dtype: burn::tensor::DType) {
        let shape: [usize; D] = dims.try_into().expect("rank");
        g.register(id, flat.reshape(shape).cast(dtype));
    }
    let params = net.params();
    let mut parts = Vec::new();
    let mut held = Vec::new();
    let mut n = 0;
    for p in &params {
        let got = by_rank!(p.dims.len(), take(grads, p.id));
        // A parameter without a gradient has none on any rank (the graphs are the same).
        if let Some(g) = got {
            let len = g.dims()[0];
            held.push((p, n, len, g.dtype()));
            parts.push(g.cast(burn::tensor::DType::F32));
            n += len;
        }
    }
    let inv = 1.0 / group.world() as f32;
    let Some(device) = parts.first().map(|t| t.device()) else {
        group.all_reduce_sum(extra)?;
        extra.iter_mut().for_each(|v| *v *= inv);
        return Ok(());
    };
    let mut flat = Tensor::cat(parts, 0).into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data");
    flat.extend_from_slice(extra);
    group.all_reduce_sum(&mut flat)?;
    flat.iter_mut().for_each(|v| *v *= inv);
    extra.copy_from_slice(&flat[n..]);
    flat.truncate(n);
    let flat = Tensor::<1>::from_data(TensorData::new(flat, [n]), &device);
    for (p, at, len, dtype) in held {
        let g = flat.clone().slice(at..at + len);
        by_rank!(p.dims.len(), put(grads, p.id, g, &p.dims, dtype));
    }
    Ok(())
}

/// `Σ` of every parameter value of `net` in f64: equal on replicas that stayed in step.
pub fn weights_checksum(net: &dyn SegNet) -> f64 {
    let mut total = 0.0;
    net.state_dict().iter().for_each(|t| total += t.data.iter().map(|&v| v as f64).sum::<f64>());
    total
}

/// Validation of one batch: the loss and per-class (foreground) TP, FP, FN of the argmax of
/// the full-resolution output (nnU-Net's `validation_step`).
pub fn validation_step(net: &dyn SegNet, batch: &DeviceBatch, weights: &[f64], dice: DiceConfig) -> (f64, Vec<[u64; 3]>) {
    let outs = net.forward_ds(batch.x.clone());
    let n = outs.len().min(batch.targets.len());
    let loss = deep_supervision(&outs[..n], &batch.targets[..n], &weights[..n], dice).into_scalar::<f32>() as f64;
    let truth: Vec<i64> = batch.targets[0].clone().into_data().convert::<i64>().try_to_vec::<i64>().expect("int data");
    if let Some(regions) = &dice.regions {
        // Regions: each output's sigmoid above 0.5 is that region's prediction.
        let pred: Vec<bool> = burn::tensor::activation::sigmoid(outs[0].clone()).greater_elem(0.5).into_data().convert::<bool>().try_to_vec::<bool>().expect("bool data");
        return (loss, confusion_regions(&pred, &truth, outs[0].dims()[0], regions, dice.ignore_label));
    }
    let classes = outs[0].dims()[1];
    let pred: Vec<i64> = outs[0].clone().argmax(1).into_data().convert::<i64>().try_to_vec::<i64>().expect("int data");
    (loss, confusion(&pred, &truth, classes, dice.ignore_label))
}

/// Per region `[TP, FP, FN]` of region predictions `pred` (`[B, R, …]` row-major, true where
/// the region is predicted) against labels `truth` (`[B, …]`) of `b` samples; voxels whose
/// truth is `ignore` count nowhere.
pub fn confusion_regions(pred: &[bool], truth: &[i64], b: usize, regions: &crate::loss::Regions, ignore: Option<i64>) -> Vec<[u64; 3]> {
    let r = regions.len();
    let n = truth.len() / b;
    assert_eq!(b * r * n, pred.len(), "[B, R, …] predictions for [B, …] labels");
    let mut out = vec![[0u64; 3]; r];
    for s in 0..b {
        for (k, acc) in out.iter_mut().enumerate() {
            let p = &pred[(s * r + k) * n..(s * r + k + 1) * n];
            for (&p, &t) in p.iter().zip(&truth[s * n..(s + 1) * n]) {
                if Some(t) == ignore {
                    continue;
                }
                let t = regions.contains(k, t);
                match (p, t) {
                    (true, true) => acc[0] += 1,
                    (true, false) => acc[1] += 1,
                    (false, true) => acc[2] += 1,
                    (false, false) => {}
                }
            }
        }
    }
    out
}

/// Per foreground class `[TP, FP, FN]` of two label arrays; voxels whose truth is `ignore`
/// count nowhere.
pub fn confusion(pred: &[i64], truth: &[i64], classes: usize, ignore: Option<i64>) -> Vec<[u64; 3]> {
    let mut out = vec![[0u64; 3]; classes.saturating_sub(1)];
    for (&p, &t) in pred.iter().zip(truth) {
        if Some(t) == ignore {
            continue;
        }
        if p == t {
            if p > 0 {
                out[p as usize - 1][0] += 1;
            }
        } else {
            if p > 0 {
                out[p as usize - 1][1] += 1;
            }
            if t > 0 {
                out[t as usize - 1][2] += 1;
            }
        }
    }
    out
}

/// `2TP/(2TP+FP+FN)` per class, NaN for a class absent from both.
pub fn dice_per_class(counts: &[[u64; 3]]) -> Vec<f64> {
    counts
        .iter()
        .map(|&[tp, fp, fn_]| {
            let d = 2 * tp + fp + fn_;
            if d == 0 { f64::NAN } else { 2.0 * tp as f64 / d as f64 }
        })
        .collect()
}

/// Mean of the non-NaN values (NaN when all are).
pub fn nanmean(v: &[f64]) -> f64 {
    let ok: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if ok.is_empty() { f64::NAN } else { ok.iter().sum::<f64>() / ok.len() as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_scale_follows_pytorchs_grad_scaler() {
        let mut s = GradScaler::default();
        assert_eq!(s.scale, 65536.0);
        for _ in 0..GradScaler::GROWTH_INTERVAL - 1 {
            s.update(true);
        }
        assert_eq!(s, GradScaler { scale: 65536.0, growth_tracker: 1999 });
        s.update(true);
        assert_eq!(s, GradScaler { scale: 131072.0, growth_tracker: 0 });
        s.update(true);
        s.update(false);
        assert_eq!(s, GradScaler { scale: 65536.0, growth_tracker: 0 }, "an overflow halves and restarts the count");
    }

    #[test]
    fn confusion_and_dice_follow_nnunet() {
        let pred = [0, 1, 1, 2, 0, 2];
        let truth = [0, 1, 2, 2, 1, 0];
        let c = confusion(&pred, &truth, 4, None);
        assert_eq!(c, vec![[1, 1, 1], [1, 1, 1], [0, 0, 0]]);
        // Voxels whose truth is the ignore label (here 4, beyond the classes) count nowhere.
        assert_eq!(confusion(&[1, 1, 2, 0], &[1, 4, 4, 2], 4, Some(4)), vec![[1, 0, 0], [0, 0, 1], [0, 0, 0]]);
        let d = dice_per_class(&c);
        assert_eq!(d[0], 0.5);
        assert!(d[2].is_nan());
        assert_eq!(nanmean(&d), 0.5);
    }

    #[test]
    fn region_confusion_counts_each_region_of_each_sample() {
        // Regions [1, 2] and [2]; two samples of three voxels; label 3 is the ignore label.
        let regions = crate::loss::Regions::new(&[vec![1, 2], vec![2]]).unwrap();
        let truth = [0, 1, 2, 2, 3, 0];
        #[rustfmt::skip]
        let pred = [
            true, true, false,   false, true, false, // sample 0: region 0, region 1
            true, true, true,    true, true, false,  // sample 1
        ];
        // Region 0: s0 TP 1 (v1), FP 1 (v0), FN 1 (v2); s1 TP 1 (v3), FP 1 (v5), v4 ignored.
        // Region 1: s0 FP 1 (v1), FN 1 (v2); s1 TP 1 (v3).
        assert_eq!(confusion_regions(&pred, &truth, 2, &regions, Some(3)), vec![[2, 2, 1], [1, 1, 1]]);
        assert_eq!(confusion_regions(&pred, &truth, 2, &regions, None), vec![[2, 3, 1], [1, 2, 1]]);
    }
}

/// The fused (`foreach`) clip + SGD of the libtorch backends against the per-parameter path.
#[cfg(all(test, feature = "tch"))]
mod fused_tests {
    use burn::module::{Module, Param};
    use burn::tensor::{Device, Tensor, TensorData};

    use super::*;
    use crate::model::SegNet;

    /// Two convolutions' worth of parameters (ranks 5 and 1), enough for the optimizer.
    #[derive(Module, Debug)]
    struct Tiny {
        w: Param<Tensor<5>>,
        b: Param<Tensor<1>>,
        g: Param<Tensor<1>>,
    }

    impl SegNet for Tiny {
        fn family(&self) -> &'static str {
            "tiny"
        }
        fn in_channels(&self) -> usize {
            1
        }
        fn num_classes(&self) -> usize {
            2
        }
        fn input_divisor(&self) -> stu_core::strides::Stride {
            [1; 3]
        }
        fn forward_ds(&self, x: Tensor<5>) -> Vec<Tensor<5>> {
            vec![self.forward(x)]
        }
        fn forward(&self, x: Tensor<5>) -> Tensor<5> {
            let y = crate::ops::conv3d(x, self.w.val(), self.b.val(), [1; 3], crate::ops::Layout::Ncdhw);
            y * self.g.val().reshape([1, 2, 1, 1, 1])
        }
        fn state_dict(&self) -> Vec<NamedTensor> {
            Vec::new()
        }
        fn num_params(&self) -> usize {
            2 * 27 + 4
        }
        fn describe(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
        crate::segnet_training_hooks!();
    }

    fn values(net: Box<dyn SegNet>) -> (Box<dyn SegNet>, Vec<f32>) {
        let mut out = Vec::new();
        let net = net.update(&mut GradientsParams::new(), &mut |_, p, _| {
            out.extend(p.clone().into_data().convert::<f32>().try_to_vec::<f32>().unwrap());
            p
        });
        (net, out)
    }

    /// Equal to f32 rounding: the clip coefficient comes from two different reductions
    /// (`_foreach_norm`, burn's sum of squares), and the steps after compound their last-bit
    /// differences (on a 2-core Xeon of 2026-11-28 the second step's momentum buffer differed
    /// by 1.03e-6 of its largest value).
    fn assert_close(what: &str, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "{what}");
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 1e-5 * scale, "{what}: max |diff| {err} (scale {scale})");
    }

    /// A half-precision copy of a network casts its 3³ weight to channels-last (where the
    /// libtorch convolutions run so; `ops::cast_conv_weight`), keeps its vectors f32, and the
    /// master weight's gradient through it is f32 and contiguous.
    #[test]
    #[allow(deprecated)] // burn-tch is deprecated upstream; it is the cuDNN path here
    fn a_half_precision_copy_has_channels_last_weights_and_f32_gradients() {
        use crate::torch::aten_of as aten;
        use burn::tensor::DType;
        let dev = Device::libtorch().autodiff();
        let mut rng = stu_core::rng::SplitMix64::new(5);
        let mut param = |dims: Vec<usize>| TensorData::new(rng.fill_f32(dims.iter().product(), -0.5, 0.5), dims);
        let net = Tiny { w: Param::from_data(param(vec![2, 2, 3, 3, 3]), &dev), b: Param::from_data(param(vec![2]), &dev), g: Param::from_data(param(vec![2]), &dev) };
        let half = cast_params(net.clone(), DType::F16, true);
        let w = aten(half.w.val());
        assert_eq!(w.kind(), tch::Kind::Half);
        assert_eq!(w.stride(), vec![54, 1, 18, 6, 2], "the half weight is channels-last");
        assert_eq!((half.b.val().dtype(), half.g.val().dtype()), (DType::F32, DType::F32));
        let x = Tensor::<5>::from_data(param(vec![1, 2, 4, 5, 3]), &dev).cast(DType::F16);
        let grads = half.forward(x).cast(DType::F32).sum().backward();
        let dw = aten(net.w.val().grad(&grads).expect("the master weight has a gradient"));
        assert_eq!(dw.kind(), tch::Kind::Float);
        assert!(dw.is_contiguous(), "strides {:?}", dw.stride());
    }

    /// An f32 inference copy (`Precision::inference_net`) of a network on libtorch has its 3³
    /// weight channels-last (so no forward converts it), and its forward equals the network's
    /// bit for bit.
    #[test]
    #[allow(deprecated)] // burn-tch is deprecated upstream; it is the cuDNN path here
    fn an_f32_inference_copy_has_channels_last_weights_and_the_same_forward() {
        use crate::torch::aten_of as aten;
        use burn::tensor::DType;
        let dev = Device::libtorch();
        let mut rng = stu_core::rng::SplitMix64::new(7);
        let mut param = |dims: Vec<usize>| TensorData::new(rng.fill_f32(dims.iter().product(), -0.5, 0.5), dims);
        let net = Tiny { w: Param::from_data(param(vec![2, 2, 3, 3, 3]), &dev), b: Param::from_data(param(vec![2]), &dev), g: Param::from_data(param(vec![2]), &dev) };
        let copy = cast_params(net.clone(), DType::F32, true);
        let w = aten(copy.w.val());
        assert_eq!((w.kind(), w.stride()), (tch::Kind::Float, vec![54, 1, 18, 6, 2]), "the weight is channels-last");
        let x = Tensor::<5>::from_data(param(vec![1, 2, 4, 5, 3]), &dev);
        let want = aten(net.forward(x.clone()));
        assert!(aten(crate::precision::Precision::F32.inference_net(&net).forward(x)).equal(&want));
    }

    /// Three steps (clipping active, then not), with and without loss scaling, and an overflow:
    /// parameters, momentum buffers, norms and the scaler equal burn's per-parameter path.
    #[test]
    #[allow(deprecated)] // burn-tch is deprecated upstream; it is the cuDNN path here
    fn the_fused_clip_and_sgd_equal_the_per_parameter_ones() {
        let dev = Device::libtorch().autodiff();
        let mut rng = stu_core::rng::SplitMix64::new(3);
        let mut param = |dims: Vec<usize>, lo: f32, hi: f32| TensorData::new(rng.fill_f32(dims.iter().product(), lo, hi), dims);
        let (w, b, g) = (param(vec![2, 1, 3, 3, 3], -0.5, 0.5), param(vec![2], -0.1, 0.1), param(vec![2], 0.5, 1.5));
        let x = Tensor::<5>::from_data(param(vec![1, 1, 4, 5, 3], -1.0, 1.0), &dev);
        let target = Tensor::<5>::from_data(param(vec![1, 2, 4, 5, 3], -1.0, 1.0), &dev);
        for scaled in [false, true] {
            let make = || -> Box<dyn SegNet> {
                Box::new(Tiny {
                    w: Param::from_data(w.clone(), &dev),
                    b: Param::from_data(b.clone(), &dev),
                    g: Param::from_data(g.clone(), &dev),
                })
            };
            let (mut fused, mut plain) = (make(), make());
            let (mut sf, mut sp) = (Optimizer::nnunet(), Optimizer::nnunet());
            if scaled {
                sf.scaler = Some(GradScaler { scale: 1024.0, growth_tracker: 0 });
                sp.scaler = sf.scaler;
            }
            for (step, (lr, clip, overflow)) in [(0.1, 0.5, false), (0.05, 100.0, false), (0.02, 100.0, scaled), (0.01, 0.5, false)].into_iter().enumerate() {
                let what = format!("scaled {scaled}, step {step}");
                let loss = |net: &dyn SegNet| {
                    let d = net.forward(x.clone()) - target.clone();
                    let l = (d.clone() * d).sum();
                    let l = match sp.scaler {
                        Some(s) => l * s.scale,
                        None => l,
                    };
                    if overflow { l * f32::INFINITY } else { l }
                };
                let (mut gf, mut gp) = (fused.gradients(loss(&*fused)), plain.gradients(loss(&*plain)));
                let (net, nf, skipped) = sf.clip_step_fused(fused, &mut gf, lr, clip, &dev).unwrap_or_else(|_| panic!("{what}: the fused path must run on libtorch"));
                fused = net;
                let np = match sp.scaler {
                    None => {
                        let n = clip_grad_norm(&*plain, &mut gp, clip);
                        plain = sp.step(plain, &mut gp, lr);
                        n
                    }
                    Some(s) => {
                        let n = unscale_and_clip(&*plain, &mut gp, clip, s.scale);
                        sp.scaler.as_mut().unwrap().update(n.is_finite());
                        if n.is_finite() {
                            plain = sp.step(plain, &mut gp, lr);
                        }
                        n
                    }
                };
                assert_eq!(skipped, overflow, "{what}");
                assert_eq!(nf.is_finite(), np.is_finite(), "{what}");
                if np.is_finite() {
                    assert!((nf - np).abs() <= 1e-5 * np, "{what}: norm {nf} vs {np}");
                    assert!(step > 0 || np > clip, "{what}: the first step must clip");
                }
                assert_eq!(sf.scaler, sp.scaler, "{what}");
                let (a, va) = values(fused);
                let (p, vp) = values(plain);
                (fused, plain) = (a, p);
                assert_close(&format!("{what}: parameters"), &va, &vp);
                let (bf, bp) = (sf.state(), sp.state());
                assert_eq!(bf.len(), bp.len(), "{what}");
                for (x, y) in bf.iter().zip(&bp) {
                    assert_eq!(x.name, y.name);
                    assert_close(&format!("{what}: {}", x.name), &x.data, &y.data);
                }
            }
        }
    }
}
