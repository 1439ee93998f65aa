//! nnU-Net's optimiser: SGD with Nesterov momentum 0.99 (dampening 0, as PyTorch; burn's
//! default is 0.1), weight decay 3e-5, and clipping of the **global** gradient norm (burn clips
//! each tensor on its own).

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::Tensor;

/// nnU-Net's gradient-norm bound.
pub const GRAD_CLIP: f64 = 12.0;

/// `torch.optim.SGD(lr, momentum=0.99, nesterov=True, weight_decay=3e-5)`; the learning rate is
/// passed to each `step`.
pub fn nnunet_sgd() -> burn::optim::ModuleOptimizer {
    SgdConfig::new()
        .with_momentum(Some(MomentumConfig { momentum: 0.99, dampening: 0.0, nesterov: true }))
        .with_weight_decay(Some(WeightDecayConfig::new(3e-5)))
        .init()
}

struct Ids(Vec<(ParamId, usize)>);

impl ModuleVisitor for Ids {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push((param.id, D));
    }
}

fn scale_grad<const D: usize>(grads: &mut GradientsParams, id: ParamId, factor: f64) {
    if let Some(g) = grads.remove::<D>(id) {
        grads.register(id, g * factor);
    }
}

fn sq_norm<const D: usize>(grads: &GradientsParams, id: ParamId) -> f64 {
    grads.get::<D>(id).map_or(0.0, |g| g.clone().mul(g).sum().into_scalar::<f32>() as f64)
}

/// Scales every gradient so that their joint L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_global_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let mut ids = Ids(Vec::new());
    module.visit(&mut ids);
    let total: f64 = ids
        .0
        .iter()
        .map(|&(id, d)| match d {
            1 => sq_norm::<1>(grads, id),
            2 => sq_norm::<2>(grads, id),
            3 => sq_norm::<3>(grads, id),
            4 => sq_norm::<4>(grads, id),
            5 => sq_norm::<5>(grads, id),
            other => panic!("parameters of rank {other} are not expected"),
        })
        .sum::<f64>()
        .sqrt();
    // torch: clip_coef = max_norm / (total + 1e-6), applied when < 1.
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for &(id, d) in &ids.0 {
            match d {
                1 => scale_grad::<1>(grads, id, coef),
                2 => scale_grad::<2>(grads, id, coef),
                3 => scale_grad::<3>(grads, id, coef),
                4 => scale_grad::<4>(grads, id, coef),
                _ => scale_grad::<5>(grads, id, coef),
            }
        }
    }
    total
}
