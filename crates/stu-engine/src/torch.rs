#![allow(deprecated)] // burn-tch is marked deprecated upstream; it is the libtorch (cuDNN) path here.
//! libtorch fast paths (feature `tch`): cuDNN convolution gradients and ATen's fused instance
//! norm, as a burn backend extension over [`LibTorch`](burn::backend::LibTorch).
//!
//! burn's generic conv3d weight gradient is itself a convolution whose kernel is the whole
//! output gradient (128³ at full resolution); cuDNN runs it far off its fast paths, and burn's
//! instance norm is six elementwise kernels. Here the forward calls ATen directly and the
//! backward asks libtorch's own autograd for the gradients of a re-run of the op (the op is
//! recomputed once in backward: one extra convolution per layer, traded for cuDNN's
//! backward-data and backward-filter kernels). Autodiff stays burn's: these ops are nodes of
//! its graph like any other.
//!
//! Only libtorch devices reach this trait ([`crate::ops`] routes by device); the layout is
//! NCDHW, as PyTorch's.

use burn::backend::{Backend, backend_extension, tensor::FloatTensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::{Autodiff, NodeId};

/// ATen-backed operations on NCDHW tensors.
#[backend_extension(LibTorch: cfg(feature = "tch"), Autodiff)]
pub trait TorchOps: Backend {
    /// `conv3d(x, weight, bias)` with padding k/2 per axis (odd kernels), `stride`.
    fn conv3d_nc(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, stride: [usize; 3]) -> FloatTensor<Self>;
    /// Gradients of [`conv3d_nc`](TorchOps::conv3d_nc): (x, weight, bias).
    fn conv3d_nc_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        stride: [usize; 3],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// `InstanceNorm3d(affine)` (eps 1e-5) then LeakyReLU(0.01) when `act`.
    fn norm_act_nc(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, act: bool) -> FloatTensor<Self>;
    /// Gradients of [`norm_act_nc`](TorchOps::norm_act_nc): (x, gamma, beta).
    fn norm_act_nc_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        act: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

#[cfg(feature = "tch")]
mod libtorch {
    use burn::backend::LibTorch;
    use burn::backend::libtorch::TchTensor;
    use burn::backend::tensor::FloatTensor;

    use super::TorchOps;

    fn conv(x: &tch::Tensor, w: &tch::Tensor, b: Option<&tch::Tensor>, stride: [usize; 3]) -> tch::Tensor {
        let k = w.size();
        x.conv3d(w, b, stride.map(|s| s as i64), [k[2] / 2, k[3] / 2, k[4] / 2], [1i64; 3], 1)
    }

    fn norm_act(x: &tch::Tensor, g: &tch::Tensor, b: &tch::Tensor, act: bool) -> tch::Tensor {
        let y = x.instance_norm(Some(g), Some(b), None::<&tch::Tensor>, None::<&tch::Tensor>, true, 0.0, crate::ops::NORM_EPS, true);
        if act { y.leaky_relu() } else { y }
    }

    /// Gradients of `sum(f(inputs) · grad)` with respect to `inputs`, by libtorch's autograd on a
    /// fresh graph over detached copies.
    fn vjp(inputs: &[&tch::Tensor], grad: &tch::Tensor, f: impl FnOnce(&[tch::Tensor]) -> tch::Tensor) -> Vec<tch::Tensor> {
        tch::with_grad(|| {
            let leaves: Vec<tch::Tensor> = inputs.iter().map(|t| t.detach().set_requires_grad(true)).collect();
            let y = f(&leaves);
            let s = (y * grad).sum(None::<tch::Kind>);
            tch::Tensor::run_backward(&[s], &leaves, false, false)
        })
    }

    impl TorchOps for LibTorch {
        fn conv3d_nc(x: FloatTensor<LibTorch>, weight: FloatTensor<LibTorch>, bias: FloatTensor<LibTorch>, stride: [usize; 3]) -> FloatTensor<LibTorch> {
            TchTensor::new(tch::no_grad(|| conv(&x.tensor, &weight.tensor, Some(&bias.tensor), stride)))
        }

        fn conv3d_nc_backward(
            x: FloatTensor<LibTorch>,
            weight: FloatTensor<LibTorch>,
            grad: FloatTensor<LibTorch>,
            stride: [usize; 3],
        ) -> (FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>) {
            let mut g = vjp(&[&x.tensor, &weight.tensor], &grad.tensor, |l| conv(&l[0], &l[1], None, stride)).into_iter();
            let (dx, dw) = (g.next().expect("dx"), g.next().expect("dw"));
            let db = tch::no_grad(|| grad.tensor.sum_dim_intlist([0i64, 2, 3, 4].as_slice(), false, None::<tch::Kind>));
            (TchTensor::new(dx), TchTensor::new(dw), TchTensor::new(db))
        }

        fn norm_act_nc(x: FloatTensor<LibTorch>, gamma: FloatTensor<LibTorch>, beta: FloatTensor<LibTorch>, act: bool) -> FloatTensor<LibTorch> {
            TchTensor::new(tch::no_grad(|| norm_act(&x.tensor, &gamma.tensor, &beta.tensor, act)))
        }

        fn norm_act_nc_backward(
            x: FloatTensor<LibTorch>,
            gamma: FloatTensor<LibTorch>,
            beta: FloatTensor<LibTorch>,
            grad: FloatTensor<LibTorch>,
            act: bool,
        ) -> (FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>) {
            let mut g = vjp(&[&x.tensor, &gamma.tensor, &beta.tensor], &grad.tensor, |l| norm_act(&l[0], &l[1], &l[2], act)).into_iter();
            let mut next = || TchTensor::new(g.next().expect("three gradients"));
            (next(), next(), next())
        }
    }
}

impl<B: Backend + TorchOps, C: CheckpointStrategy> TorchOps for Autodiff<B, C> {
    fn conv3d_nc(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, stride: [usize; 3]) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ConvNc;

        impl<B: Backend + TorchOps> Backward<B, 3> for ConvNc {
            type State = (NodeId, NodeId, [usize; 3]);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x, node_w, node_b] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (xs, ws, stride) = ops.state;
                let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(xs);
                let w = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(ws);
                let (dx, dw, db) = B::conv3d_nc_backward(x, w, grad, stride);
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, dx);
                }
                if let Some(node) = node_w {
                    grads.register::<B>(node.id, dw);
                }
                if let Some(node) = node_b {
                    grads.register::<B>(node.id, db);
                }
            }
        }

        match ConvNc.prepare::<C>([x.node(), weight.node(), bias.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight), stride);
                prep.finish(state, B::conv3d_nc(x.into_primitive(), weight.into_primitive(), bias.into_primitive(), stride))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::conv3d_nc(x.into_primitive(), weight.into_primitive(), bias.into_primitive(), stride)),
        }
    }

    fn conv3d_nc_backward(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _stride: [usize; 3],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("second-order gradients of conv3d_nc are not supported")
    }

    fn norm_act_nc(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, act: bool) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct NormActNc;

        impl<B: Backend + TorchOps> Backward<B, 3> for NormActNc {
            type State = (NodeId, NodeId, NodeId, bool);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x, node_g, node_b] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (xs, gs, bs, act) = ops.state;
                let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(xs);
                let g = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(gs);
                let b = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(bs);
                let (dx, dg, db) = B::norm_act_nc_backward(x, g, b, grad, act);
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, dx);
                }
                if let Some(node) = node_g {
                    grads.register::<B>(node.id, dg);
                }
                if let Some(node) = node_b {
                    grads.register::<B>(node.id, db);
                }
            }
        }

        match NormActNc.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&gamma), prep.checkpoint(&beta), act);
                prep.finish(state, B::norm_act_nc(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), act))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::norm_act_nc(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), act)),
        }
    }

    fn norm_act_nc_backward(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _beta: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _act: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("second-order gradients of norm_act_nc are not supported")
    }
}
