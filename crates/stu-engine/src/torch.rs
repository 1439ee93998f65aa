#![allow(deprecated)] // burn-tch is marked deprecated upstream; it is the libtorch (cuDNN) path here.
//! libtorch fast paths (feature `tch`): cuDNN convolution gradients and ATen's fused instance
//! norm, as a burn backend extension over [`LibTorch`](burn::backend::LibTorch).
//!
//! burn's generic conv3d weight gradient is itself a convolution whose kernel is the whole
//! output gradient (128³ at full resolution); cuDNN runs it far off its fast paths, and burn's
//! instance norm is six elementwise kernels. Here the forward calls ATen directly. When burn
//! records the op for a backward pass, the forward runs under libtorch's autograd on detached
//! leaves and the libtorch graph is kept in burn's node state; the backward asks libtorch for the
//! gradients of `sum(y · grad)` through that graph (cuDNN's backward-data and backward-filter,
//! ATen's instance-norm backward), without re-running the forward. Autodiff stays burn's:
//! these ops are nodes of its graph like any other. The `*_backward` methods that re-run the
//! forward (`STU_TCH_GRAPH=0`) remain for comparison.
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
    /// [`conv3d_nc`](TorchOps::conv3d_nc) under libtorch's autograd: (output, the output with
    /// its graph, the x leaf, the weight leaf).
    fn conv3d_nc_graph(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 3],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// Gradients (x, weight, bias) through a graph from [`conv3d_nc_graph`](TorchOps::conv3d_nc_graph).
    fn conv3d_nc_graph_backward(
        y_graph: FloatTensor<Self>,
        x_leaf: FloatTensor<Self>,
        w_leaf: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// [`norm_act_nc`](TorchOps::norm_act_nc) under libtorch's autograd: (output, the output
    /// with its graph, the x, gamma and beta leaves).
    fn norm_act_nc_graph(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        act: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// Gradients (x, gamma, beta) through a graph from [`norm_act_nc_graph`](TorchOps::norm_act_nc_graph).
    fn norm_act_nc_graph_backward(
        y_graph: FloatTensor<Self>,
        x_leaf: FloatTensor<Self>,
        g_leaf: FloatTensor<Self>,
        b_leaf: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// Gradients of [`norm_act_nc`](TorchOps::norm_act_nc): (x, gamma, beta).
    fn norm_act_nc_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        act: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// nnU-Net's Dice + CE (`crate::loss::dc_ce`) of NCDHW `logits` against class indices
    /// `target` `[B, D, H, W]` stored as floats, as PyTorch computes it (`cross_entropy`, one
    /// softmax, the one-hot by `scatter`); a 1-element tensor.
    fn dc_ce_nc(logits: FloatTensor<Self>, target: FloatTensor<Self>, batch_dice: bool, smooth: f64) -> FloatTensor<Self>;
    /// [`dc_ce_nc`](TorchOps::dc_ce_nc) under libtorch's autograd: (loss, the loss with its
    /// graph, the logits leaf).
    fn dc_ce_nc_graph(logits: FloatTensor<Self>, target: FloatTensor<Self>, batch_dice: bool, smooth: f64) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// Gradient of the logits through a graph from [`dc_ce_nc_graph`](TorchOps::dc_ce_nc_graph),
    /// scaled by the 1-element `grad`.
    fn dc_ce_nc_graph_backward(loss_graph: FloatTensor<Self>, logits_leaf: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
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

    /// nnU-Net's `DC_and_CE_loss` (`RobustCrossEntropyLoss` + `MemoryEfficientSoftDiceLoss`,
    /// background excluded) in ATen, as its PyTorch code runs it.
    fn dc_ce(logits: &tch::Tensor, target: &tch::Tensor, batch_dice: bool, smooth: f64) -> tch::Tensor {
        let c = logits.size()[1];
        let t = target.to_kind(tch::Kind::Int64);
        let ce = logits.cross_entropy_loss::<tch::Tensor>(&t, None, tch::Reduction::Mean, -100, 0.0);
        let p = logits.softmax(1, tch::Kind::Float).narrow(1, 1, c - 1);
        let y = tch::no_grad(|| logits.zeros_like().scatter_value(1, &t.unsqueeze(1), 1.0).narrow(1, 1, c - 1));
        let axes: &[i64] = if batch_dice { &[0, 2, 3, 4] } else { &[2, 3, 4] };
        let intersect = (&p * &y).sum_dim_intlist(axes, false, tch::Kind::Float);
        let sum_pred = p.sum_dim_intlist(axes, false, tch::Kind::Float);
        let sum_gt = y.sum_dim_intlist(axes, false, tch::Kind::Float);
        let dc = (intersect * 2.0 + smooth) / (sum_gt + sum_pred + smooth).clamp_min(1e-8);
        (ce - dc.mean(tch::Kind::Float)).reshape([1])
    }

    fn leaf(t: &tch::Tensor) -> tch::Tensor {
        t.detach().set_requires_grad(true)
    }

    /// Gradients of `sum(y_graph · grad)` with respect to `leaves`.
    fn through(y_graph: &tch::Tensor, leaves: &[&tch::Tensor], grad: &tch::Tensor) -> Vec<tch::Tensor> {
        tch::with_grad(|| {
            let s = (y_graph * grad).sum(None::<tch::Kind>);
            tch::Tensor::run_backward(&[s], leaves, false, false)
        })
    }

    impl TorchOps for LibTorch {
        fn conv3d_nc_graph(
            x: FloatTensor<LibTorch>,
            weight: FloatTensor<LibTorch>,
            bias: FloatTensor<LibTorch>,
            stride: [usize; 3],
        ) -> (FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>) {
            let (xl, wl) = (leaf(&x.tensor), leaf(&weight.tensor));
            let y = tch::with_grad(|| conv(&xl, &wl, Some(&bias.tensor), stride));
            (TchTensor::new(y.detach()), TchTensor::new(y), TchTensor::new(xl), TchTensor::new(wl))
        }

        fn conv3d_nc_graph_backward(
            y_graph: FloatTensor<LibTorch>,
            x_leaf: FloatTensor<LibTorch>,
            w_leaf: FloatTensor<LibTorch>,
            grad: FloatTensor<LibTorch>,
        ) -> (FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>) {
            let mut g = through(&y_graph.tensor, &[&x_leaf.tensor, &w_leaf.tensor], &grad.tensor).into_iter();
            let (dx, dw) = (g.next().expect("dx"), g.next().expect("dw"));
            let db = tch::no_grad(|| grad.tensor.sum_dim_intlist([0i64, 2, 3, 4].as_slice(), false, None::<tch::Kind>));
            (TchTensor::new(dx), TchTensor::new(dw), TchTensor::new(db))
        }

        fn norm_act_nc_graph(
            x: FloatTensor<LibTorch>,
            gamma: FloatTensor<LibTorch>,
            beta: FloatTensor<LibTorch>,
            act: bool,
        ) -> (FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>) {
            let (xl, gl, bl) = (leaf(&x.tensor), leaf(&gamma.tensor), leaf(&beta.tensor));
            let y = tch::with_grad(|| norm_act(&xl, &gl, &bl, act));
            (TchTensor::new(y.detach()), TchTensor::new(y), TchTensor::new(xl), TchTensor::new(gl), TchTensor::new(bl))
        }

        fn norm_act_nc_graph_backward(
            y_graph: FloatTensor<LibTorch>,
            x_leaf: FloatTensor<LibTorch>,
            g_leaf: FloatTensor<LibTorch>,
            b_leaf: FloatTensor<LibTorch>,
            grad: FloatTensor<LibTorch>,
        ) -> (FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>) {
            let mut g = through(&y_graph.tensor, &[&x_leaf.tensor, &g_leaf.tensor, &b_leaf.tensor], &grad.tensor).into_iter();
            let mut next = || TchTensor::new(g.next().expect("three gradients"));
            (next(), next(), next())
        }

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

        fn dc_ce_nc(logits: FloatTensor<LibTorch>, target: FloatTensor<LibTorch>, batch_dice: bool, smooth: f64) -> FloatTensor<LibTorch> {
            TchTensor::new(tch::no_grad(|| dc_ce(&logits.tensor, &target.tensor, batch_dice, smooth)))
        }

        fn dc_ce_nc_graph(logits: FloatTensor<LibTorch>, target: FloatTensor<LibTorch>, batch_dice: bool, smooth: f64) -> (FloatTensor<LibTorch>, FloatTensor<LibTorch>, FloatTensor<LibTorch>) {
            let l = leaf(&logits.tensor);
            let y = tch::with_grad(|| dc_ce(&l, &target.tensor, batch_dice, smooth));
            (TchTensor::new(y.detach()), TchTensor::new(y), TchTensor::new(l))
        }

        fn dc_ce_nc_graph_backward(loss_graph: FloatTensor<LibTorch>, logits_leaf: FloatTensor<LibTorch>, grad: FloatTensor<LibTorch>) -> FloatTensor<LibTorch> {
            TchTensor::new(through(&loss_graph.tensor, &[&logits_leaf.tensor], &grad.tensor).pop().expect("one gradient"))
        }
    }
}

/// Whether the libtorch graph of an op is kept for its backward (`STU_TCH_GRAPH`, default on);
/// off, the backward re-runs the op.
fn keep_graph() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("STU_TCH_GRAPH").map_or(true, |v| v != "0"))
}

impl<B: Backend + TorchOps, C: CheckpointStrategy> TorchOps for Autodiff<B, C> {
    fn conv3d_nc_graph(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _bias: FloatTensor<Self>,
        _stride: [usize; 3],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("conv3d_nc_graph is called on the inner backend only")
    }

    fn conv3d_nc_graph_backward(
        _y_graph: FloatTensor<Self>,
        _x_leaf: FloatTensor<Self>,
        _w_leaf: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("second-order gradients of conv3d_nc are not supported")
    }

    fn norm_act_nc_graph(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _beta: FloatTensor<Self>,
        _act: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("norm_act_nc_graph is called on the inner backend only")
    }

    fn norm_act_nc_graph_backward(
        _y_graph: FloatTensor<Self>,
        _x_leaf: FloatTensor<Self>,
        _g_leaf: FloatTensor<Self>,
        _b_leaf: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("second-order gradients of norm_act_nc are not supported")
    }

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

        #[derive(Debug)]
        struct ConvNcGraph;

        impl<B: Backend + TorchOps> Backward<B, 3> for ConvNcGraph {
            // The burn-side inputs are held (not only the libtorch leaves) so that burn never
            // writes them in place while libtorch's graph still reads them.
            type State = (B::FloatTensorPrimitive, B::FloatTensorPrimitive, B::FloatTensorPrimitive, B::FloatTensorPrimitive, B::FloatTensorPrimitive);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_x, node_w, node_b] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (_x, _w, y_graph, x_leaf, w_leaf) = ops.state;
                let (dx, dw, db) = B::conv3d_nc_graph_backward(y_graph, x_leaf, w_leaf, grad);
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

        if keep_graph() {
            return match ConvNcGraph.prepare::<C>([x.node(), weight.node(), bias.node()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let (xp, wp) = (x.primitive().clone(), weight.primitive().clone());
                    let (y, y_graph, xl, wl) = B::conv3d_nc_graph(x.into_primitive(), weight.into_primitive(), bias.into_primitive(), stride);
                    prep.finish((xp, wp, y_graph, xl, wl), y)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::conv3d_nc(x.into_primitive(), weight.into_primitive(), bias.into_primitive(), stride)),
            };
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

        #[derive(Debug)]
        struct NormActNcGraph;

        impl<B: Backend + TorchOps> Backward<B, 3> for NormActNcGraph {
            type State = (B::FloatTensorPrimitive, B::FloatTensorPrimitive, B::FloatTensorPrimitive, B::FloatTensorPrimitive, B::FloatTensorPrimitive);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_x, node_g, node_b] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (_x, y_graph, x_leaf, g_leaf, b_leaf) = ops.state;
                let (dx, dg, db) = B::norm_act_nc_graph_backward(y_graph, x_leaf, g_leaf, b_leaf, grad);
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

        if keep_graph() {
            return match NormActNcGraph.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let xp = x.primitive().clone();
                    let (y, y_graph, xl, gl, bl) = B::norm_act_nc_graph(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), act);
                    prep.finish((xp, y_graph, xl, gl, bl), y)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::norm_act_nc(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), act)),
            };
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

    fn dc_ce_nc(logits: FloatTensor<Self>, target: FloatTensor<Self>, batch_dice: bool, smooth: f64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct DcCeNcGraph;

        impl<B: Backend + TorchOps> Backward<B, 2> for DcCeNcGraph {
            // The burn-side logits are held so burn never writes them in place while the
            // libtorch graph still reads them.
            type State = (B::FloatTensorPrimitive, B::FloatTensorPrimitive, B::FloatTensorPrimitive);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_l, _target] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (_l, loss_graph, leaf) = ops.state;
                if let Some(node) = node_l {
                    grads.register::<B>(node.id, B::dc_ce_nc_graph_backward(loss_graph, leaf, grad));
                }
            }
        }

        match DcCeNcGraph.prepare::<C>([logits.node(), target.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let lp = logits.primitive().clone();
                let (y, graph, leaf) = B::dc_ce_nc_graph(logits.into_primitive(), target.into_primitive(), batch_dice, smooth);
                prep.finish((lp, graph, leaf), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::dc_ce_nc(logits.into_primitive(), target.into_primitive(), batch_dice, smooth)),
        }
    }

    fn dc_ce_nc_graph(
        _logits: FloatTensor<Self>,
        _target: FloatTensor<Self>,
        _batch_dice: bool,
        _smooth: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("dc_ce_nc_graph is called on the inner backend only")
    }

    fn dc_ce_nc_graph_backward(_loss_graph: FloatTensor<Self>, _logits_leaf: FloatTensor<Self>, _grad: FloatTensor<Self>) -> FloatTensor<Self> {
        unreachable!("second-order gradients of dc_ce_nc are not supported")
    }
}
