//! STU-Net's own tensor operations as a burn backend extension.
//!
//! `#[backend_extension]` routes each call to the backend of its input: [`Flex`] runs the
//! channels-last kernels of [`crate::kernels`], and `Autodiff<B, C>` records the op and supplies
//! its backward (written here, as burn's own conv backward is written). Any other backend never
//! reaches this trait: [`crate::ops`] falls back to burn's conv3d there.
// Without flex (the `ndarray`/`cuda`/`wgpu`-only builds) the macro's dispatch has no backend arm
// to pass the arguments to, and the kernels' shape helpers have no caller.
#![cfg_attr(not(feature = "flex"), allow(unused_variables, dead_code))]

use burn::backend::{Backend, TensorMetadata, backend_extension, tensor::FloatTensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::{Autodiff, NodeId};

/// In a `Backward::<B, N>::backward`: hands each of the `N` gradients to its parent node, if
/// that parent is tracked (`parents` is `ops.parents`). Serves this file's and
/// [`crate::torch`]'s backward steps.
macro_rules! register_grads {
    ($b:ty, $grads:expr, $parents:expr, $values:expr) => {
        for (parent, value) in $parents.into_iter().zip($values) {
            if let Some(node) = parent {
                $grads.register::<$b>(node.id, value);
            }
        }
    };
}
#[cfg_attr(not(feature = "tch"), allow(unused_imports))] // used by crate::torch
pub(crate) use register_grads;

/// Channels-last convolution with forward and backward kernels of our own.
#[backend_extension(Flex: cfg(feature = "flex"), Autodiff)]
pub trait StuOps: Backend {
    /// `x`: `[B, D, H, W, Cin]`, `weight`: `[Cout, Cin, k, k, k]` (k ∈ {1, 3}, padding k/2),
    /// `bias`: `[Cout]` → `[B, Do, Ho, Wo, Cout]`.
    fn conv3d_cl(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, stride: [usize; 3]) -> FloatTensor<Self>;
    /// Gradient of [`conv3d_cl`](StuOps::conv3d_cl) with respect to `x` (which gives the shape).
    fn conv3d_cl_x_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: [usize; 3]) -> FloatTensor<Self>;
    /// Gradient with respect to `weight`, in its layout.
    fn conv3d_cl_w_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: [usize; 3]) -> FloatTensor<Self>;
    /// Gradient with respect to `bias`: the sum of `grad` over every voxel.
    fn conv3d_cl_b_backward(grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Instance norm of channels-last `x` with affine `gamma`, `beta` (`[C]`), then LeakyReLU(0.01)
    /// when `act`.
    fn norm_act_cl(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, act: bool) -> FloatTensor<Self>;
    /// `leaky_relu(instance_norm(x) + skip)`: the end of a residual block.
    fn norm_add_act_cl(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, skip: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Gradients of [`norm_act_cl`](StuOps::norm_act_cl): (x, gamma, beta).
    fn norm_act_cl_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        act: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// 1×1 conv from channels-last `x` `[B, D, H, W, Cin]` to channels-first `[B, Cout, D, H, W]`
    /// (the segmentation heads); `weight` `[Cout, Cin, 1, 1, 1]`, `bias` `[Cout]`.
    fn head_cl(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Gradients of [`head_cl`](StuOps::head_cl): (x, weight, bias).
    fn head_cl_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// nnU-Net's Dice + CE (`crate::loss::dc_ce`) of NCDHW `logits` against class indices
    /// `target` `[B, D, H, W]` stored as floats, or the trainer variant `terms` describes
    /// ([`Terms`](crate::kernels::loss::Terms): term weights, TopK, smoothing); a 1-element
    /// tensor. Fused: no softmax, log-softmax or one-hot tensor is materialised.
    fn dc_ce_loss(logits: FloatTensor<Self>, target: FloatTensor<Self>, terms: crate::kernels::loss::Terms) -> FloatTensor<Self>;
    /// Gradient of [`dc_ce_loss`](StuOps::dc_ce_loss) with respect to the logits, scaled by the
    /// 1-element `grad`.
    fn dc_ce_loss_backward(logits: FloatTensor<Self>, target: FloatTensor<Self>, grad: FloatTensor<Self>, terms: crate::kernels::loss::Terms) -> FloatTensor<Self>;
    /// Gradients of [`norm_add_act_cl`](StuOps::norm_add_act_cl): (x, gamma, beta, skip).
    fn norm_add_act_cl_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        skip: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// `[B, …, C]` → (B, voxels, C).
pub(crate) fn bnc(shape: &[usize]) -> (usize, usize, usize) {
    let c = *shape.last().expect("rank ≥ 2");
    let b = shape[0];
    (b, shape.iter().product::<usize>() / (b * c), c)
}

/// Shape of a conv call, from the tensors.
pub(crate) fn geom(x_shape: &[usize], w_shape: &[usize], stride: [usize; 3]) -> crate::kernels::Geom {
    assert_eq!(x_shape.len(), 5, "conv3d_cl: input must be [B, D, H, W, C]");
    assert_eq!(w_shape.len(), 5, "conv3d_cl: weight must be [Cout, Cin, k0, k1, k2]");
    assert_eq!(x_shape[4], w_shape[1], "conv3d_cl: input has {} channels, weight expects {}", x_shape[4], w_shape[1]);
    let k = [w_shape[2], w_shape[3], w_shape[4]];
    assert!(k.iter().all(|&k| k == 1 || k == 3), "conv3d_cl: kernel sizes must be 1 or 3 per axis, got {w_shape:?}");
    crate::kernels::Geom { b: x_shape[0], inp: [x_shape[1], x_shape[2], x_shape[3]], cin: x_shape[4], cout: w_shape[0], k, stride }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::{Flex, TensorMetadata, tensor::FloatTensor};
    use burn::tensor::{DType, TensorData};
    use burn_flex::FlexTensor;

    use super::{StuOps, geom};
    use crate::kernels;

    fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
        assert_eq!(t.dtype(), DType::F32, "STU-Net's CPU kernels run in f32");
        match t.as_slice::<f32>() {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("contiguous").to_vec()),
        }
    }

    fn tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(data, shape))
    }

    fn dims(t: &FlexTensor) -> Vec<usize> {
        t.shape().to_vec()
    }

    fn bcn(shape: &[usize]) -> (usize, usize, usize) {
        (shape[0], shape[1], shape[2..].iter().product())
    }

    impl StuOps for Flex {
        fn dc_ce_loss(logits: FloatTensor<Flex>, target: FloatTensor<Flex>, terms: crate::kernels::loss::Terms) -> FloatTensor<Flex> {
            let (b, c, n) = bcn(&dims(&logits));
            assert_eq!(dims(&target).iter().product::<usize>(), b * n, "dc_ce_loss: target shape");
            let l = kernels::loss::forward(&values(&logits), &values(&target), b, c, n, terms);
            tensor(vec![l as f32], vec![1])
        }
        fn dc_ce_loss_backward(logits: FloatTensor<Flex>, target: FloatTensor<Flex>, grad: FloatTensor<Flex>, terms: crate::kernels::loss::Terms) -> FloatTensor<Flex> {
            let (b, c, n) = bcn(&dims(&logits));
            let g = values(&grad)[0] as f64;
            tensor(kernels::loss::backward(&values(&logits), &values(&target), b, c, n, terms, g), dims(&logits))
        }
        fn conv3d_cl(x: FloatTensor<Flex>, weight: FloatTensor<Flex>, bias: FloatTensor<Flex>, stride: [usize; 3]) -> FloatTensor<Flex> {
            let g = geom(&dims(&x), &dims(&weight), stride);
            let y = kernels::conv_forward(&values(&x), &values(&weight), Some(&values(&bias)), &g);
            let o = g.out();
            tensor(y, vec![g.b, o[0], o[1], o[2], g.cout])
        }
        fn conv3d_cl_x_backward(x: FloatTensor<Flex>, weight: FloatTensor<Flex>, grad: FloatTensor<Flex>, stride: [usize; 3]) -> FloatTensor<Flex> {
            let g = geom(&dims(&x), &dims(&weight), stride);
            tensor(kernels::conv_backward_data(&values(&grad), &values(&weight), &g), dims(&x))
        }
        fn conv3d_cl_w_backward(x: FloatTensor<Flex>, weight: FloatTensor<Flex>, grad: FloatTensor<Flex>, stride: [usize; 3]) -> FloatTensor<Flex> {
            let g = geom(&dims(&x), &dims(&weight), stride);
            tensor(kernels::conv_backward_weight(&values(&x), &values(&grad), &g), dims(&weight))
        }
        fn conv3d_cl_b_backward(grad: FloatTensor<Flex>) -> FloatTensor<Flex> {
            let c = *dims(&grad).last().expect("rank 5");
            tensor(kernels::conv_backward_bias(&values(&grad), c), vec![c])
        }
        fn norm_act_cl(x: FloatTensor<Flex>, gamma: FloatTensor<Flex>, beta: FloatTensor<Flex>, act: bool) -> FloatTensor<Flex> {
            let (b, n, c) = super::bnc(&dims(&x));
            let y = kernels::norm::forward(&values(&x), &values(&gamma), &values(&beta), None, act, b, n, c);
            tensor(y, dims(&x))
        }
        fn norm_add_act_cl(x: FloatTensor<Flex>, gamma: FloatTensor<Flex>, beta: FloatTensor<Flex>, skip: FloatTensor<Flex>) -> FloatTensor<Flex> {
            let (b, n, c) = super::bnc(&dims(&x));
            assert_eq!(dims(&x), dims(&skip), "norm_add_act_cl: skip shape");
            let y = kernels::norm::forward(&values(&x), &values(&gamma), &values(&beta), Some(&values(&skip)), true, b, n, c);
            tensor(y, dims(&x))
        }
        fn head_cl(x: FloatTensor<Flex>, weight: FloatTensor<Flex>, bias: FloatTensor<Flex>) -> FloatTensor<Flex> {
            let xs = dims(&x);
            let (b, n, cin) = super::bnc(&xs);
            let cout = dims(&weight)[0];
            assert_eq!(dims(&weight)[1], cin, "head_cl: channel mismatch");
            let y = kernels::head_forward(&values(&x), &values(&weight), &values(&bias), b, n, cin, cout);
            tensor(y, vec![b, cout, xs[1], xs[2], xs[3]])
        }
        fn head_cl_backward(x: FloatTensor<Flex>, weight: FloatTensor<Flex>, grad: FloatTensor<Flex>) -> (FloatTensor<Flex>, FloatTensor<Flex>, FloatTensor<Flex>) {
            let xs = dims(&x);
            let (b, n, cin) = super::bnc(&xs);
            let cout = dims(&weight)[0];
            let (xv, wv, gv) = (values(&x), values(&weight), values(&grad));
            (
                tensor(kernels::head_backward_data(&gv, &wv, b, n, cin, cout), xs),
                tensor(kernels::head_backward_weight(&xv, &gv, b, n, cin, cout), dims(&weight)),
                tensor(kernels::head_backward_bias(&gv, b, n, cout), vec![cout]),
            )
        }
        fn norm_act_cl_backward(
            x: FloatTensor<Flex>,
            gamma: FloatTensor<Flex>,
            beta: FloatTensor<Flex>,
            grad: FloatTensor<Flex>,
            act: bool,
        ) -> (FloatTensor<Flex>, FloatTensor<Flex>, FloatTensor<Flex>) {
            let (b, n, c) = super::bnc(&dims(&x));
            let g = kernels::norm::backward(&values(&x), &values(&gamma), &values(&beta), None, act, &values(&grad), b, n, c);
            (tensor(g.dx, dims(&x)), tensor(g.dgamma, vec![c]), tensor(g.dbeta, vec![c]))
        }
        fn norm_add_act_cl_backward(
            x: FloatTensor<Flex>,
            gamma: FloatTensor<Flex>,
            beta: FloatTensor<Flex>,
            skip: FloatTensor<Flex>,
            grad: FloatTensor<Flex>,
        ) -> (FloatTensor<Flex>, FloatTensor<Flex>, FloatTensor<Flex>, FloatTensor<Flex>) {
            let (b, n, c) = super::bnc(&dims(&x));
            let g = kernels::norm::backward(&values(&x), &values(&gamma), &values(&beta), Some(&values(&skip)), true, &values(&grad), b, n, c);
            let dskip = g.dskip.expect("skip given");
            (tensor(g.dx, dims(&x)), tensor(g.dgamma, vec![c]), tensor(g.dbeta, vec![c]), tensor(dskip, dims(&x)))
        }
    }
}

impl<B: Backend + StuOps, C: CheckpointStrategy> StuOps for Autodiff<B, C> {
    fn conv3d_cl(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, stride: [usize; 3]) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ConvCl;

        impl<B: Backend + StuOps> Backward<B, 3> for ConvCl {
            type State = (NodeId, NodeId, [usize; 3]);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x, node_w, node_b] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x_state, w_state, stride) = ops.state;
                let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
                let w = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(w_state);
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, B::conv3d_cl_x_backward(x.clone(), w.clone(), grad.clone(), stride));
                }
                if let Some(node) = node_w {
                    grads.register::<B>(node.id, B::conv3d_cl_w_backward(x, w, grad.clone(), stride));
                }
                if let Some(node) = node_b {
                    grads.register::<B>(node.id, B::conv3d_cl_b_backward(grad));
                }
            }
        }

        match ConvCl.prepare::<C>([x.node(), weight.node(), bias.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let w_state = prep.checkpoint(&weight);
                prep.finish((x_state, w_state, stride), B::conv3d_cl(x.into_primitive(), weight.into_primitive(), bias.into_primitive(), stride))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::conv3d_cl(x.into_primitive(), weight.into_primitive(), bias.into_primitive(), stride)),
        }
    }

    fn norm_act_cl(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, act: bool) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct NormAct;

        impl<B: Backend + StuOps> Backward<B, 3> for NormAct {
            type State = (NodeId, NodeId, NodeId, bool);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x, node_g, node_b] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (xs, gs, bs, act) = ops.state;
                let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(xs);
                let g = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(gs);
                let b = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(bs);
                let (dx, dg, db) = B::norm_act_cl_backward(x, g, b, grad, act);
                register_grads!(B, grads, [node_x, node_g, node_b], [dx, dg, db]);
            }
        }

        match NormAct.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&gamma), prep.checkpoint(&beta), act);
                prep.finish(state, B::norm_act_cl(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), act))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::norm_act_cl(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), act)),
        }
    }

    fn norm_add_act_cl(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, skip: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct NormAddAct;

        impl<B: Backend + StuOps> Backward<B, 4> for NormAddAct {
            type State = (NodeId, NodeId, NodeId, NodeId);

            fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x, node_g, node_b, node_s] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (xs, gs, bs, ss) = ops.state;
                let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(xs);
                let g = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(gs);
                let b = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(bs);
                let s = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(ss);
                let (dx, dg, db, ds) = B::norm_add_act_cl_backward(x, g, b, s, grad);
                register_grads!(B, grads, [node_x, node_g, node_b, node_s], [dx, dg, db, ds]);
            }
        }

        match NormAddAct.prepare::<C>([x.node(), gamma.node(), beta.node(), skip.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&gamma), prep.checkpoint(&beta), prep.checkpoint(&skip));
                prep.finish(state, B::norm_add_act_cl(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), skip.into_primitive()))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::norm_add_act_cl(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), skip.into_primitive()))
            }
        }
    }

    fn head_cl(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Head;

        impl<B: Backend + StuOps> Backward<B, 3> for Head {
            type State = (NodeId, NodeId);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x, node_w, node_b] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (xs, ws) = ops.state;
                let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(xs);
                let w = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(ws);
                let (dx, dw, db) = B::head_cl_backward(x, w, grad);
                register_grads!(B, grads, [node_x, node_w, node_b], [dx, dw, db]);
            }
        }

        match Head.prepare::<C>([x.node(), weight.node(), bias.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight));
                prep.finish(state, B::head_cl(x.into_primitive(), weight.into_primitive(), bias.into_primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::head_cl(x.into_primitive(), weight.into_primitive(), bias.into_primitive())),
        }
    }

    fn head_cl_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let _ = (x, weight, grad);
        unimplemented!("second-order gradients of head_cl are not supported")
    }

    fn dc_ce_loss(logits: FloatTensor<Self>, target: FloatTensor<Self>, terms: crate::kernels::loss::Terms) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct DcCe;

        impl<B: Backend + StuOps> Backward<B, 2> for DcCe {
            type State = (NodeId, NodeId, crate::kernels::loss::Terms);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_l, _target] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (ls, ts, terms) = ops.state;
                let l = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(ls);
                let t = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(ts);
                if let Some(node) = node_l {
                    grads.register::<B>(node.id, B::dc_ce_loss_backward(l, t, grad, terms));
                }
            }
        }

        match DcCe.prepare::<C>([logits.node(), target.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&logits), prep.checkpoint(&target), terms);
                prep.finish(state, B::dc_ce_loss(logits.into_primitive(), target.into_primitive(), terms))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::dc_ce_loss(logits.into_primitive(), target.into_primitive(), terms)),
        }
    }

    fn dc_ce_loss_backward(logits: FloatTensor<Self>, target: FloatTensor<Self>, grad: FloatTensor<Self>, terms: crate::kernels::loss::Terms) -> FloatTensor<Self> {
        let _ = (logits, target, grad, terms);
        unimplemented!("second-order gradients of dc_ce_loss are not supported")
    }

    fn norm_act_cl_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        act: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let _ = (x, gamma, beta, grad, act);
        unimplemented!("second-order gradients of norm_act_cl are not supported")
    }

    fn norm_add_act_cl_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        skip: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let _ = (x, gamma, beta, skip, grad);
        unimplemented!("second-order gradients of norm_add_act_cl are not supported")
    }

    fn conv3d_cl_x_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: [usize; 3]) -> FloatTensor<Self> {
        let _ = (x.shape(), weight, grad, stride);
        unimplemented!("second-order gradients of conv3d_cl are not supported")
    }
    fn conv3d_cl_w_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: [usize; 3]) -> FloatTensor<Self> {
        let _ = (x, weight, grad, stride);
        unimplemented!("second-order gradients of conv3d_cl are not supported")
    }
    fn conv3d_cl_b_backward(grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let _ = grad;
        unimplemented!("second-order gradients of conv3d_cl are not supported")
    }
}
