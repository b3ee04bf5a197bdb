//! The fused ops on `Autodiff<B>`, for every backend `B` that implements `FusedBackward`: each
//! op is one graph node whose backward is the backend's closed-form kernel (one node instead of
//! the dozen that burn's composed ops record).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, TensorMetadata};

use crate::ops::{FusedBackward, FusedOps};
use crate::shapes::{self, AttentionDims, ConvDims, LinearDims, LossDims, PatchDims};

/// One op recorded on the graph: when some operand needs a gradient, `tracked` runs the forward
/// that also returns the state `op`'s backward reads; otherwise `untracked` runs the plain one.
fn record<B, C, O, I, const N: usize>(
    op: O,
    nodes: [NodeGuard; N],
    inputs: I,
    tracked: impl FnOnce(I) -> (FloatTensor<B>, O::State),
    untracked: impl FnOnce(I) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>>
where
    B: Backend,
    C: CheckpointStrategy,
    O: Backward<B, N>,
{
    match op.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (output, state) = tracked(inputs);
            prep.finish(state, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(untracked(inputs)),
    }
}

/// Registers `grad` for the parent in `slot` when it is tracked.
fn register<B: Backend, const N: usize, S>(ops: &Ops<S, N>, grads: &mut Gradients, slot: usize, grad: FloatTensor<B>) {
    if let Some(parent) = &ops.parents[slot] {
        grads.register::<B>(parent.id, grad);
    }
}

fn tracked<S, const N: usize>(ops: &Ops<S, N>, slot: usize) -> bool {
    ops.parents[slot].is_some()
}

/// The gradients of a linear layer's input, weight and bias (parents 0, 1, 2), those tracked.
fn linear_grads<B: FusedBackward, const N: usize, S>(
    ops: &Ops<S, N>,
    grads: &mut Gradients,
    x: &FloatTensor<B>,
    weight: &FloatTensor<B>,
    dy: FloatTensor<B>,
    d: LinearDims,
) {
    if tracked(ops, 0) {
        register::<B, N, S>(ops, grads, 0, B::linear_backward_input(weight.clone(), dy.clone(), d));
    }
    if tracked(ops, 1) {
        let (dw, db) = B::linear_backward_params(x.clone(), dy, d);
        register::<B, N, S>(ops, grads, 1, dw);
        register::<B, N, S>(ops, grads, 2, db);
    } else if tracked(ops, 2) {
        register::<B, N, S>(ops, grads, 2, B::linear_backward_bias(dy, d));
    }
}

#[derive(Debug)]
struct LinearBackward;

impl<B: FusedBackward> Backward<B, 3> for LinearBackward {
    /// The input x and the weight.
    type State = (FloatTensor<B>, FloatTensor<B>, LinearDims);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (x, weight, d) = &ops.state;
        linear_grads::<B, 3, _>(&ops, grads, x, weight, dy, *d);
    }
}

#[derive(Debug)]
struct LinearGeluBackward;

impl<B: FusedBackward> Backward<B, 3> for LinearGeluBackward {
    /// The input x, the weight and the pre-activation x W + b.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, LinearDims);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (x, weight, pre, d) = &ops.state;
        let dpre = B::fused_gelu_backward(pre.clone(), dy);
        linear_grads::<B, 3, _>(&ops, grads, x, weight, dpre, *d);
    }
}

#[derive(Debug)]
struct LinearAddBackward;

impl<B: FusedBackward> Backward<B, 4> for LinearAddBackward {
    /// The input x and the weight; the residual's gradient is the output's.
    type State = (FloatTensor<B>, FloatTensor<B>, LinearDims);

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (x, weight, d) = &ops.state;
        linear_grads::<B, 4, _>(&ops, grads, x, weight, dy.clone(), *d);
        register::<B, _, _>(&ops, grads, 3, dy);
    }
}

#[derive(Debug)]
struct LinearTransposedBackward;

impl<B: FusedBackward> Backward<B, 2> for LinearTransposedBackward {
    /// The input x and the weight `[N, K]`.
    type State = (FloatTensor<B>, FloatTensor<B>, LinearDims);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (x, weight, d) = &ops.state;
        if tracked(&ops, 0) {
            let dx = B::linear_transposed_backward_input(weight.clone(), dy.clone(), *d);
            register::<B, _, _>(&ops, grads, 0, dx);
        }
        if tracked(&ops, 1) {
            register::<B, _, _>(&ops, grads, 1, B::linear_transposed_backward_weight(x.clone(), dy, *d));
        }
    }
}

#[derive(Debug)]
struct WeightNormBackward;

impl<B: FusedBackward> Backward<B, 2> for WeightNormBackward {
    /// v, g and the inverse row norms.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dw = grads.consume::<B>(&ops.node);
        let (v, g, inv) = ops.state.clone();
        let (dv, dg) = B::weight_norm_backward(v, g, inv, dw);
        register::<B, _, _>(&ops, grads, 0, dv);
        register::<B, _, _>(&ops, grads, 1, dg);
    }
}

#[derive(Debug)]
struct PatchEmbedBackward;

impl<B: FusedBackward> Backward<B, 3> for PatchEmbedBackward {
    /// The weight, the gathered patches and the sizes.
    type State = (FloatTensor<B>, FloatTensor<B>, PatchDims);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (weight, patches, d) = &ops.state;
        if tracked(&ops, 0) {
            register::<B, _, _>(&ops, grads, 0, B::patch_embed_backward_images(weight.clone(), dy.clone(), *d));
        }
        if tracked(&ops, 1) || tracked(&ops, 2) {
            let (dw, db) = B::patch_embed_backward_params(patches.clone(), dy, *d);
            register::<B, _, _>(&ops, grads, 1, dw);
            register::<B, _, _>(&ops, grads, 2, db);
        }
    }
}

#[derive(Debug)]
struct Conv2dBackward;

impl<B: FusedBackward> Backward<B, 2> for Conv2dBackward {
    /// The input x, the weight and the sizes.
    type State = (FloatTensor<B>, FloatTensor<B>, ConvDims);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (x, weight, d) = &ops.state;
        if tracked(&ops, 0) {
            register::<B, _, _>(&ops, grads, 0, B::conv2d_backward_input(weight.clone(), dy.clone(), *d));
        }
        if tracked(&ops, 1) {
            register::<B, _, _>(&ops, grads, 1, B::conv2d_backward_weight(x.clone(), dy, *d));
        }
    }
}

#[derive(Debug)]
struct BatchNormBackward;

impl<B: FusedBackward> Backward<B, 3> for BatchNormBackward {
    /// x, gamma, beta, the channel statistics of x, eps and whether a ReLU follows.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, f64, bool);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (x, gamma, beta, stats, eps, relu) = ops.state.clone();
        let (dx, dgamma, dbeta) = B::batch_norm_backward(x, gamma, beta, stats, dy, eps, relu);
        register::<B, _, _>(&ops, grads, 0, dx);
        register::<B, _, _>(&ops, grads, 1, dgamma);
        register::<B, _, _>(&ops, grads, 2, dbeta);
    }
}

#[derive(Debug)]
struct ChannelAffineBackward;

impl<B: FusedBackward> Backward<B, 3> for ChannelAffineBackward {
    /// x, scale, shift and whether a ReLU follows.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, bool);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (x, scale, shift, relu) = ops.state.clone();
        let (dx, dscale, dshift) = B::channel_affine_backward(x, scale, shift, dy, relu);
        register::<B, _, _>(&ops, grads, 0, dx);
        register::<B, _, _>(&ops, grads, 1, dscale);
        register::<B, _, _>(&ops, grads, 2, dshift);
    }
}

#[derive(Debug)]
struct GeluBackward;

impl<B: FusedBackward> Backward<B, 1> for GeluBackward {
    /// The input x.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        register::<B, _, _>(&ops, grads, 0, B::fused_gelu_backward(ops.state.clone(), dy));
    }
}

#[derive(Debug)]
struct LayerNormBackward;

impl<B: FusedBackward> Backward<B, 3> for LayerNormBackward {
    /// The input x, gamma, and the per-row (mean, 1/σ).
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (x, gamma, stats) = ops.state.clone();
        let (dx, dgamma, dbeta) = B::layer_norm_backward(x, gamma, stats, dy);
        register::<B, _, _>(&ops, grads, 0, dx);
        register::<B, _, _>(&ops, grads, 1, dgamma);
        register::<B, _, _>(&ops, grads, 2, dbeta);
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: FusedBackward> Backward<B, 1> for AttentionBackward {
    /// qkv, the softmax attention `[B, heads, N, N]`, and the sizes.
    type State = (FloatTensor<B>, FloatTensor<B>, AttentionDims);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (qkv, probs, d) = ops.state.clone();
        register::<B, _, _>(&ops, grads, 0, B::self_attention_backward(qkv, probs, dy, d));
    }
}

#[derive(Debug)]
struct DinoLossBackward;

impl<B: FusedBackward> Backward<B, 1> for DinoLossBackward {
    /// The student outputs, the teacher probabilities, each student row's lse, the student
    /// temperature and the sizes.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, f64, LossDims);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dloss = grads.consume::<B>(&ops.node);
        let (s, q, lse, temp, d) = ops.state.clone();
        register::<B, _, _>(&ops, grads, 0, B::dino_loss_backward(s, q, lse, dloss, temp, d));
    }
}

impl<B: FusedBackward, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        let ((x, xn), (w, wn), (b, bn)) = (x.into_parts(), weight.into_parts(), bias.into_parts());
        let d = shapes::linear(&x.shape(), &w.shape());
        record::<B, C, _, _, 3>(
            LinearBackward,
            [xn, wn, bn],
            (x, w, b),
            |(x, w, b)| (B::fused_linear(x.clone(), w.clone(), b), (x, w, d)),
            |(x, w, b)| B::fused_linear(x, w, b),
        )
    }

    fn fused_linear_gelu(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let ((x, xn), (w, wn), (b, bn)) = (x.into_parts(), weight.into_parts(), bias.into_parts());
        let d = shapes::linear(&x.shape(), &w.shape());
        record::<B, C, _, _, 3>(
            LinearGeluBackward,
            [xn, wn, bn],
            (x, w, b),
            |(x, w, b)| {
                let (y, pre) = B::linear_gelu_saving(x.clone(), w.clone(), b);
                (y, (x, w, pre, d))
            },
            |(x, w, b)| B::fused_linear_gelu(x, w, b),
        )
    }

    fn fused_linear_add(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        residual: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let ((x, xn), (w, wn), (b, bn), (r, rn)) =
            (x.into_parts(), weight.into_parts(), bias.into_parts(), residual.into_parts());
        let d = shapes::linear_add(&x.shape(), &w.shape(), &r.shape());
        record::<B, C, _, _, 4>(
            LinearAddBackward,
            [xn, wn, bn, rn],
            (x, w, b, r),
            |(x, w, b, r)| (B::fused_linear_add(x.clone(), w.clone(), b, r), (x, w, d)),
            |(x, w, b, r)| B::fused_linear_add(x, w, b, r),
        )
    }

    fn fused_norm_mlp_add(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        if [&x, &gamma, &beta, &w1, &b1, &w2, &b2].iter().any(|t| t.is_tracked()) {
            // Three nodes: the backward needs the normed input and the hidden layer, which the
            // fused op never keeps.
            let normed = Self::fused_layer_norm(x.clone(), gamma, beta, eps);
            return Self::fused_linear_add(Self::fused_linear_gelu(normed, w1, b1), w2, b2, x);
        }
        let [x, g, b, w1, b1, w2, b2] = [x, gamma, beta, w1, b1, w2, b2].map(Self::inner);
        Self::from_inner(B::fused_norm_mlp_add(x, g, b, w1, b1, w2, b2, eps))
    }

    fn fused_norm_attention_add(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        wq: FloatTensor<Self>,
        bq: FloatTensor<Self>,
        wp: FloatTensor<Self>,
        bp: FloatTensor<Self>,
        eps: f64,
        heads: usize,
    ) -> FloatTensor<Self> {
        if [&x, &gamma, &beta, &wq, &bq, &wp, &bp].iter().any(|t| t.is_tracked()) {
            // Four nodes: the backward needs the normed input, qkv and the attention, which the
            // fused op never keeps.
            let normed = Self::fused_layer_norm(x.clone(), gamma, beta, eps);
            let heads = Self::fused_self_attention(Self::fused_linear(normed, wq, bq), heads);
            return Self::fused_linear_add(heads, wp, bp, x);
        }
        let [x, g, b, wq, bq, wp, bp] = [x, gamma, beta, wq, bq, wp, bp].map(Self::inner);
        Self::from_inner(B::fused_norm_attention_add(x, g, b, wq, bq, wp, bp, eps, heads))
    }

    fn fused_linear_transposed(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        let ((x, xn), (w, wn)) = (x.into_parts(), weight.into_parts());
        let d = shapes::linear_transposed(&x.shape(), &w.shape());
        record::<B, C, _, _, 2>(
            LinearTransposedBackward,
            [xn, wn],
            (x, w),
            |(x, w)| (B::fused_linear_transposed(x.clone(), w.clone()), (x, w, d)),
            |(x, w)| B::fused_linear_transposed(x, w),
        )
    }

    fn fused_weight_norm(v: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self> {
        let ((v, vn), (g, gn)) = (v.into_parts(), g.into_parts());
        record::<B, C, _, _, 2>(
            WeightNormBackward,
            [vn, gn],
            (v, g),
            |(v, g)| {
                let (w, inv) = B::weight_norm_saving(v.clone(), g.clone());
                (w, (v, g, inv))
            },
            |(v, g)| B::fused_weight_norm(v, g),
        )
    }

    fn fused_patch_embed(
        images: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let ((i, inode), (w, wn), (b, bn)) = (images.into_parts(), weight.into_parts(), bias.into_parts());
        let d = shapes::patch_embed(&i.shape(), &w.shape());
        record::<B, C, _, _, 3>(
            PatchEmbedBackward,
            [inode, wn, bn],
            (i, w, b),
            |(i, w, b)| {
                let (y, patches) = B::patch_embed_saving(i, w.clone(), b);
                (y, (w, patches, d))
            },
            |(i, w, b)| B::fused_patch_embed(i, w, b),
        )
    }

    fn fused_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        let ((x, xn), (w, wn)) = (x.into_parts(), weight.into_parts());
        let d = shapes::conv2d(&x.shape(), &w.shape(), stride, padding);
        record::<B, C, _, _, 2>(
            Conv2dBackward,
            [xn, wn],
            (x, w),
            |(x, w)| (B::fused_conv2d(x.clone(), w.clone(), stride, padding), (x, w, d)),
            |(x, w)| B::fused_conv2d(x, w, stride, padding),
        )
    }

    fn fused_channel_stats(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::fused_channel_stats(Self::inner(x)))
    }

    fn fused_batch_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        eps: f64,
        relu: bool,
    ) -> FloatTensor<Self> {
        let ((x, xn), (g, gn), (b, bn)) = (x.into_parts(), gamma.into_parts(), beta.into_parts());
        // The statistics are functions of x, which the backward differentiates in closed form.
        let stats = Self::inner(stats);
        record::<B, C, _, _, 3>(
            BatchNormBackward,
            [xn, gn, bn],
            (x, g, b, stats),
            |(x, g, b, s)| {
                let y = B::fused_batch_norm(x.clone(), g.clone(), b.clone(), s.clone(), eps, relu);
                (y, (x, g, b, s, eps, relu))
            },
            |(x, g, b, s)| B::fused_batch_norm(x, g, b, s, eps, relu),
        )
    }

    fn fused_channel_affine(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        relu: bool,
    ) -> FloatTensor<Self> {
        let ((x, xn), (a, an), (b, bn)) = (x.into_parts(), scale.into_parts(), shift.into_parts());
        record::<B, C, _, _, 3>(
            ChannelAffineBackward,
            [xn, an, bn],
            (x, a, b),
            |(x, a, b)| (B::fused_channel_affine(x.clone(), a.clone(), b.clone(), relu), (x, a, b, relu)),
            |(x, a, b)| B::fused_channel_affine(x, a, b, relu),
        )
    }

    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, xn) = x.into_parts();
        record::<B, C, _, _, 1>(GeluBackward, [xn], x, |x| (B::fused_gelu(x.clone()), x), B::fused_gelu)
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        let ((x, xn), (g, gn), (b, bn)) = (x.into_parts(), gamma.into_parts(), beta.into_parts());
        record::<B, C, _, _, 3>(
            LayerNormBackward,
            [xn, gn, bn],
            (x, g, b),
            |(x, g, b)| {
                let (y, stats) = B::layer_norm_saving(x.clone(), g.clone(), b, eps);
                (y, (x, g, stats))
            },
            |(x, g, b)| B::fused_layer_norm(x, g, b, eps),
        )
    }

    fn fused_self_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        let (qkv, node) = qkv.into_parts();
        let d = shapes::attention(&qkv.shape(), heads);
        record::<B, C, _, _, 1>(
            AttentionBackward,
            [node],
            qkv,
            |qkv| {
                let (out, probs) = B::self_attention_saving(qkv.clone(), d);
                (out, (qkv, probs, d))
            },
            |qkv| B::fused_self_attention(qkv, heads),
        )
    }

    fn fused_dino_loss(
        student: FloatTensor<Self>,
        teacher_probs: FloatTensor<Self>,
        views: usize,
        student_temp: f64,
    ) -> FloatTensor<Self> {
        let (s, node) = student.into_parts();
        // The teacher side is a constant: its node is dropped, so no gradient reaches it.
        let q = Self::inner(teacher_probs);
        let d = shapes::dino_loss(&s.shape(), &q.shape(), views);
        record::<B, C, _, _, 1>(
            DinoLossBackward,
            [node],
            (s, q),
            |(s, q)| {
                let (loss, lse) = B::dino_loss_saving(s.clone(), q.clone(), student_temp, d);
                (loss, (s, q, lse, student_temp, d))
            },
            |(s, q)| B::fused_dino_loss(s, q, views, student_temp),
        )
    }

    fn fused_squared_norm(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::fused_squared_norm(Self::inner(x)))
    }

    fn fused_ema(teacher: FloatTensor<Self>, student: FloatTensor<Self>, momentum: f64) -> FloatTensor<Self> {
        Self::from_inner(B::fused_ema(Self::inner(teacher), Self::inner(student), momentum))
    }
}
