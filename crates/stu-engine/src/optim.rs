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

/// Scales every gradient so that their joint L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_global_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let mut ids = Ids(Vec::new());
    module.visit(&mut ids);
    crate::train::clip_by_ids(&ids.0, grads, max_norm).map_or(0.0, |t| t.into_scalar::<f32>() as f64)
}
