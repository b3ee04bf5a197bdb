//! The kernels as a burn backend extension: forward on `Flex`, and on `Autodiff<Flex>` a graph
//! node whose backward is the closed-form kernel (one node instead of a dozen composed ones).

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Flex, backend_extension};
use burn::tensor::{Shape, TensorData};

use crate::{attention, dino_loss, gelu, layer_norm, linear, optim, patch_embed, weight_norm};

#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// Fully connected layer: x `[..., K]`, weight `[K, N]` (burn's layout), bias `[N]` -> `[..., N]`.
    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self>;
    /// GELU of a fully connected layer: x `[..., K]`, weight `[K, N]`, bias `[N]` ->
    /// GELU(x W + b) `[..., N]`.
    fn fused_linear_gelu(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>)
    -> FloatTensor<Self>;
    /// A fully connected layer added onto a residual stream: residual `[..., N]` + x W + b.
    fn fused_linear_add(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        residual: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// Weight normalisation of rows: v `[K, C]`, g `[K, 1]` -> g · v / ‖v‖ (norm per row).
    fn fused_weight_norm(v: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self>;
    /// ViT patch embedding (Conv2d, kernel = stride = p): images `[B, C, H, W]`, weight
    /// `[D, C, p, p]`, bias `[D]` -> `[B, (H/p)·(W/p), D]`, patches in row-major grid order.
    fn fused_patch_embed(
        images: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// Exact GELU, elementwise.
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// LayerNorm over the last dimension: x `[..., C]`, gamma and beta `[C]`.
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    /// Multi-head self-attention: qkv `[B, N, 3D]` -> `[B, N, D]`.
    fn fused_self_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self>;
    /// The DINO cross-entropy: student outputs `[V·B, K]` (views crop-major), teacher
    /// probabilities `[2·B, K]` (a constant: no gradient) -> the loss `[1]`.
    fn fused_dino_loss(
        student: FloatTensor<Self>,
        teacher_probs: FloatTensor<Self>,
        views: usize,
        student_temp: f64,
    ) -> FloatTensor<Self>;
    /// Σ x² over all elements, as a one-element f64 tensor. Not tracked by autodiff.
    fn fused_squared_norm(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The teacher's EMA update, momentum · teacher + (1 − momentum) · student, written into the
    /// teacher's buffer when nothing else holds it. Not tracked by autodiff.
    fn fused_ema(teacher: FloatTensor<Self>, student: FloatTensor<Self>, momentum: f64) -> FloatTensor<Self>;
}

/// The tensor with its elements contiguous from offset 0 (a copy only when they are not).
fn dense(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() { t } else { t.to_contiguous() }
}

/// The tensor as the sole owner of a buffer holding exactly its elements, contiguous from offset 0
/// (a copy only when it is a view or shared), for in-place updates.
fn owned(t: FlexTensor) -> FlexTensor {
    let exact = t.as_slice::<f32>().is_some_and(|s| s.len() == t.storage::<f32>().len());
    if exact && t.is_unique() { t } else { t.to_contiguous() }
}

fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("fused kernels run on dense f32 tensors")
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn shape(t: &FlexTensor) -> Shape {
    t.layout().shape().clone()
}

fn attention_dims(qkv: &FlexTensor, heads: usize) -> attention::Dims {
    let s = shape(qkv);
    assert!(
        s.num_dims() == 3 && s[2].is_multiple_of(3 * heads),
        "attention: qkv {s:?} is not [B, N, 3 * heads * head_dim]"
    );
    attention::Dims { batch: s[0], tokens: s[1], heads, head_dim: s[2] / 3 / heads }
}

fn layer_norm_forward(x: &FlexTensor, gamma: &FlexTensor, beta: &FlexTensor, eps: f64) -> (FlexTensor, FlexTensor) {
    let (y, stats) = layer_norm::forward(values(x), values(gamma), values(beta), eps as f32);
    let rows = stats.len() / 2;
    (tensor(y, shape(x)), tensor(stats, Shape::new([rows, 2])))
}

fn linear_dims(x: &FlexTensor, weight: &FlexTensor) -> linear::Dims {
    let (xs, ws) = (shape(x), shape(weight));
    let k = xs[xs.num_dims() - 1];
    assert!(ws.num_dims() == 2 && ws[0] == k, "linear: input {xs:?} does not match weight {ws:?}");
    linear::Dims { rows: xs.num_elements() / k.max(1), k, n: ws[1] }
}

/// `shape` with its last dimension replaced by `last`.
fn with_last(shape: Shape, last: usize) -> Shape {
    let mut dims = shape.to_vec();
    *dims.last_mut().expect("a tensor with at least one dimension") = last;
    Shape::from(dims)
}

fn linear_forward(x: &FlexTensor, weight: &FlexTensor, bias: &FlexTensor) -> FlexTensor {
    let d = linear_dims(x, weight);
    tensor(linear::forward(values(x), values(weight), values(bias), d), with_last(shape(x), d.n))
}

fn linear_gelu_forward(x: &FlexTensor, weight: &FlexTensor, bias: &FlexTensor) -> FlexTensor {
    let d = linear_dims(x, weight);
    tensor(linear::forward_gelu(values(x), values(weight), values(bias), d), with_last(shape(x), d.n))
}

/// (pre-activation, GELU of it).
fn linear_gelu_forward_keep(x: &FlexTensor, weight: &FlexTensor, bias: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let d = linear_dims(x, weight);
    let (h, a) = linear::forward_gelu_keep(values(x), values(weight), values(bias), d);
    let out_shape = with_last(shape(x), d.n);
    (tensor(h, out_shape.clone()), tensor(a, out_shape))
}

fn linear_add_forward(x: &FlexTensor, weight: &FlexTensor, bias: &FlexTensor, residual: &FlexTensor) -> FlexTensor {
    let d = linear_dims(x, weight);
    let out_shape = with_last(shape(x), d.n);
    assert_eq!(shape(residual), out_shape, "linear add: the residual does not have the layer's output shape");
    tensor(linear::forward_add(values(x), values(weight), values(bias), values(residual), d), out_shape)
}

fn dino_loss_dims(student: &FlexTensor, teacher_probs: &FlexTensor, views: usize) -> dino_loss::Dims {
    let (s, q) = (shape(student), shape(teacher_probs));
    assert!(
        s.num_dims() == 2 && q.num_dims() == 2 && s[1] == q[1] && q[0] % 2 == 0 && s[0] == views * (q[0] / 2),
        "DINO loss: student {s:?} and teacher {q:?} are not [views·B, K] and [2·B, K] for {views} views"
    );
    dino_loss::Dims { views, batch: q[0] / 2, classes: s[1] }
}

fn scalar(value: f64) -> FlexTensor {
    tensor(vec![value as f32], Shape::new([1]))
}

fn weight_norm_forward(v: &FlexTensor, g: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let (w, inv) = weight_norm::forward(values(v), values(g));
    let rows = inv.len();
    (tensor(w, shape(v)), tensor(inv, Shape::new([rows])))
}

fn patch_dims(images: &FlexTensor, weight: &FlexTensor) -> patch_embed::Dims {
    let (i, w) = (shape(images), shape(weight));
    assert!(
        i.num_dims() == 4 && w.num_dims() == 4 && i[1] == w[1] && w[2] == w[3] && i[2] >= w[2] && i[3] >= w[3],
        "patch embed: images {i:?} do not match weight {w:?}"
    );
    patch_embed::Dims { batch: i[0], channels: i[1], height: i[2], width: i[3], patch: w[2], dim: w[0] }
}

fn patch_embed_forward(images: &FlexTensor, weight: &FlexTensor, bias: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let d = patch_dims(images, weight);
    let (out, patches) = patch_embed::forward(values(images), values(weight), values(bias), d);
    let (h, w) = d.grid();
    let rows = d.batch * h * w;
    (
        tensor(out, Shape::new([d.batch, h * w, d.dim])),
        tensor(patches, Shape::new([rows, d.channels * d.patch * d.patch])),
    )
}

impl FusedOps for Flex {
    fn fused_patch_embed(images: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        patch_embed_forward(&dense(images), &dense(weight), &dense(bias)).0
    }

    fn fused_weight_norm(v: FlexTensor, g: FlexTensor) -> FlexTensor {
        weight_norm_forward(&dense(v), &dense(g)).0
    }

    fn fused_linear(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        linear_forward(&dense(x), &dense(weight), &dense(bias))
    }

    fn fused_linear_gelu(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        linear_gelu_forward(&dense(x), &dense(weight), &dense(bias))
    }

    fn fused_linear_add(x: FlexTensor, weight: FlexTensor, bias: FlexTensor, residual: FlexTensor) -> FlexTensor {
        linear_add_forward(&dense(x), &dense(weight), &dense(bias), &dense(residual))
    }

    fn fused_gelu(x: FlexTensor) -> FlexTensor {
        let x = dense(x);
        tensor(gelu::forward(values(&x)), shape(&x))
    }

    fn fused_layer_norm(x: FlexTensor, gamma: FlexTensor, beta: FlexTensor, eps: f64) -> FlexTensor {
        layer_norm_forward(&dense(x), &dense(gamma), &dense(beta), eps).0
    }

    fn fused_dino_loss(student: FlexTensor, teacher_probs: FlexTensor, views: usize, student_temp: f64) -> FlexTensor {
        let (s, q) = (dense(student), dense(teacher_probs));
        let d = dino_loss_dims(&s, &q, views);
        scalar(dino_loss::forward(values(&s), values(&q), student_temp as f32, d).0)
    }

    fn fused_squared_norm(x: FlexTensor) -> FlexTensor {
        let sum = optim::squared_norm(values(&dense(x)));
        FlexTensor::from_data(TensorData::new(vec![sum], [1]))
    }

    fn fused_ema(teacher: FlexTensor, student: FlexTensor, momentum: f64) -> FlexTensor {
        let (mut teacher, student) = (owned(teacher), dense(student));
        assert_eq!(shape(&teacher), shape(&student), "EMA: teacher and student shapes differ");
        optim::ema(teacher.storage_mut::<f32>(), values(&student), momentum as f32);
        teacher
    }

    fn fused_self_attention(qkv: FlexTensor, heads: usize) -> FlexTensor {
        let qkv = dense(qkv);
        let d = attention_dims(&qkv, heads);
        tensor(attention::forward(values(&qkv), d), Shape::new([d.batch, d.tokens, d.heads * d.head_dim]))
    }
}

/// Registers the gradients of a linear layer's input, weight and bias (those that are tracked)
/// for the output gradient `dy`.
fn register_linear_grads(
    grads: &mut Gradients,
    [px, pw, pb]: [Option<NodeId>; 3],
    x: &FlexTensor,
    weight: &FlexTensor,
    dy: &FlexTensor,
) {
    let d = linear_dims(x, weight);
    if let Some(id) = px {
        grads.register::<Flex>(id, tensor(linear::backward_input(values(weight), values(dy), d), shape(x)));
    }
    match (pw, pb) {
        (Some(pw), pb) => {
            let (dw, db) = linear::backward_params(values(x), values(dy), d);
            grads.register::<Flex>(pw, tensor(dw, shape(weight)));
            if let Some(pb) = pb {
                grads.register::<Flex>(pb, tensor(db, Shape::new([d.n])));
            }
        }
        (None, Some(pb)) => {
            grads.register::<Flex>(pb, tensor(linear::backward_bias(values(dy), d.n), Shape::new([d.n])))
        }
        (None, None) => {}
    }
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 3> for LinearBackward {
    /// The input x and the weight.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = dense(grads.consume::<Flex>(&ops.node));
        let (x, weight) = &ops.state;
        register_linear_grads(grads, ops.parents.map(|p| p.map(|p| p.id)), x, weight, &grad);
    }
}

#[derive(Debug)]
struct LinearGeluBackward;

impl Backward<Flex, 3> for LinearGeluBackward {
    /// The input x, the weight and the pre-activation x W + b.
    type State = (FlexTensor, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = dense(grads.consume::<Flex>(&ops.node));
        let (x, weight, pre) = &ops.state;
        let dpre = tensor(gelu::backward(values(pre), values(&grad)), shape(pre));
        register_linear_grads(grads, ops.parents.map(|p| p.map(|p| p.id)), x, weight, &dpre);
    }
}

#[derive(Debug)]
struct LinearAddBackward;

impl Backward<Flex, 4> for LinearAddBackward {
    /// The input x and the weight.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = dense(grads.consume::<Flex>(&ops.node));
        let (x, weight) = &ops.state;
        let [px, pw, pb, presidual] = ops.parents.map(|p| p.map(|p| p.id));
        register_linear_grads(grads, [px, pw, pb], x, weight, &grad);
        if let Some(id) = presidual {
            grads.register::<Flex>(id, grad);
        }
    }
}

#[derive(Debug)]
struct WeightNormBackward;

impl Backward<Flex, 2> for WeightNormBackward {
    /// v, g and the inverse row norms.
    type State = (FlexTensor, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = dense(grads.consume::<Flex>(&ops.node));
        let (v, g, inv) = &ops.state;
        let (dv, dg) = weight_norm::backward(values(v), values(g), values(inv), values(&grad));
        let [pv, pg] = ops.parents;
        if let Some(p) = pv {
            grads.register::<Flex>(p.id, tensor(dv, shape(v)));
        }
        if let Some(p) = pg {
            grads.register::<Flex>(p.id, tensor(dg, shape(g)));
        }
    }
}

#[derive(Debug)]
struct PatchEmbedBackward;

impl Backward<Flex, 3> for PatchEmbedBackward {
    /// The images, the weight and the gathered patches.
    type State = (FlexTensor, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = dense(grads.consume::<Flex>(&ops.node));
        let (images, weight, patches) = &ops.state;
        let d = patch_dims(images, weight);
        let [pi, pw, pb] = ops.parents;
        if let Some(p) = pi {
            grads.register::<Flex>(
                p.id,
                tensor(patch_embed::backward_images(values(weight), values(&grad), d), shape(images)),
            );
        }
        if pw.is_some() || pb.is_some() {
            let (dw, db) = patch_embed::backward_params(values(patches), values(&grad), d);
            for (parent, g, s) in [(pw, dw, shape(weight)), (pb, db, Shape::new([d.dim]))] {
                if let Some(p) = parent {
                    grads.register::<Flex>(p.id, tensor(g, s));
                }
            }
        }
    }
}

#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    /// The input x.
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = dense(grads.consume::<Flex>(&ops.node));
        if let [Some(x)] = ops.parents {
            let dx = gelu::backward(values(&ops.state), values(&grad));
            grads.register::<Flex>(x.id, tensor(dx, shape(&grad)));
        }
    }
}

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    /// The input x, gamma, and the per-row (mean, 1/σ).
    type State = (FlexTensor, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = dense(grads.consume::<Flex>(&ops.node));
        let (x, gamma, stats) = &ops.state;
        let (dx, dgamma, dbeta) = layer_norm::backward(values(x), values(gamma), values(stats), values(&grad));
        let [px, pgamma, pbeta] = ops.parents;
        for (parent, g, s) in [(px, dx, shape(x)), (pgamma, dgamma, shape(gamma)), (pbeta, dbeta, shape(gamma))] {
            if let Some(parent) = parent {
                grads.register::<Flex>(parent.id, tensor(g, s));
            }
        }
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 1> for AttentionBackward {
    /// qkv, the softmax attention `[B, heads, N, N]`, and the sizes.
    type State = (FlexTensor, FlexTensor, attention::Dims);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = dense(grads.consume::<Flex>(&ops.node));
        if let [Some(parent)] = ops.parents {
            let (qkv, probs, d) = &ops.state;
            let dqkv = attention::backward(values(qkv), values(probs), values(&grad), *d);
            grads.register::<Flex>(parent.id, tensor(dqkv, shape(qkv)));
        }
    }
}

#[derive(Debug)]
struct DinoLossBackward;

impl Backward<Flex, 1> for DinoLossBackward {
    /// The student outputs, the teacher probabilities, each student row's lse, the sizes and the
    /// student temperature.
    type State = (FlexTensor, FlexTensor, Vec<f32>, dino_loss::Dims, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = dense(grads.consume::<Flex>(&ops.node));
        if let [Some(parent)] = ops.parents {
            let (s, q, lse, d, temp) = &ops.state;
            let ds = dino_loss::backward(values(s), values(q), lse, *temp, values(&grad)[0], *d);
            grads.register::<Flex>(parent.id, tensor(ds, shape(s)));
        }
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        let (xs, ws, bs) =
            (dense(x.primitive().clone()), dense(weight.primitive().clone()), dense(bias.primitive().clone()));
        match LinearBackward.prepare::<C>([x.node(), weight.node(), bias.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = linear_forward(&xs, &ws, &bs);
                prep.finish((xs, ws), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(linear_forward(&xs, &ws, &bs)),
        }
    }

    fn fused_linear_gelu(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (xs, ws, bs) =
            (dense(x.primitive().clone()), dense(weight.primitive().clone()), dense(bias.primitive().clone()));
        match LinearGeluBackward.prepare::<C>([x.node(), weight.node(), bias.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (pre, y) = linear_gelu_forward_keep(&xs, &ws, &bs);
                prep.finish((xs, ws, pre), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(linear_gelu_forward(&xs, &ws, &bs)),
        }
    }

    fn fused_linear_add(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        residual: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (xs, ws, bs, rs) = (
            dense(x.primitive().clone()),
            dense(weight.primitive().clone()),
            dense(bias.primitive().clone()),
            dense(residual.primitive().clone()),
        );
        let nodes = [x.node(), weight.node(), bias.node(), residual.node()];
        match LinearAddBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = linear_add_forward(&xs, &ws, &bs, &rs);
                prep.finish((xs, ws), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(linear_add_forward(&xs, &ws, &bs, &rs)),
        }
    }

    fn fused_weight_norm(v: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self> {
        let (vs, gs) = (dense(v.primitive().clone()), dense(g.primitive().clone()));
        match WeightNormBackward.prepare::<C>([v.node(), g.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (w, inv) = weight_norm_forward(&vs, &gs);
                prep.finish((vs, gs, inv), w)
            }
            OpsKind::UnTracked(prep) => prep.finish(weight_norm_forward(&vs, &gs).0),
        }
    }

    fn fused_patch_embed(
        images: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (is, ws, bs) =
            (dense(images.primitive().clone()), dense(weight.primitive().clone()), dense(bias.primitive().clone()));
        match PatchEmbedBackward.prepare::<C>([images.node(), weight.node(), bias.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, patches) = patch_embed_forward(&is, &ws, &bs);
                prep.finish((is, ws, patches), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(patch_embed_forward(&is, &ws, &bs).0),
        }
    }

    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let input = dense(x.primitive().clone());
        match GeluBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = Flex::fused_gelu(input.clone());
                prep.finish(input, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::fused_gelu(input)),
        }
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        let (xs, gs, bs) =
            (dense(x.primitive().clone()), dense(gamma.primitive().clone()), dense(beta.primitive().clone()));
        match LayerNormBackward.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, stats) = layer_norm_forward(&xs, &gs, &bs, eps);
                prep.finish((xs, gs, stats), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(layer_norm_forward(&xs, &gs, &bs, eps).0),
        }
    }

    fn fused_self_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        let input = dense(qkv.primitive().clone());
        let d = attention_dims(&input, heads);
        match AttentionBackward.prepare::<C>([qkv.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, probs) = attention::forward_with_probs(values(&input), d);
                let probs = tensor(probs, Shape::new([d.batch, d.heads, d.tokens, d.tokens]));
                let out = tensor(out, Shape::new([d.batch, d.tokens, d.heads * d.head_dim]));
                prep.finish((input, probs, d), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::fused_self_attention(input, heads)),
        }
    }

    fn fused_squared_norm(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(Flex::fused_squared_norm(Self::inner(x)))
    }

    fn fused_ema(teacher: FloatTensor<Self>, student: FloatTensor<Self>, momentum: f64) -> FloatTensor<Self> {
        Self::from_inner(Flex::fused_ema(Self::inner(teacher), Self::inner(student), momentum))
    }

    fn fused_dino_loss(
        student: FloatTensor<Self>,
        teacher_probs: FloatTensor<Self>,
        views: usize,
        student_temp: f64,
    ) -> FloatTensor<Self> {
        let s = dense(student.primitive().clone());
        let q = dense(Self::inner(teacher_probs));
        let d = dino_loss_dims(&s, &q, views);
        let temp = student_temp as f32;
        match DinoLossBackward.prepare::<C>([student.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (loss, lse) = dino_loss::forward(values(&s), values(&q), temp, d);
                prep.finish((s, q, lse, d, temp), scalar(loss))
            }
            OpsKind::UnTracked(prep) => prep.finish(scalar(dino_loss::forward(values(&s), values(&q), temp, d).0)),
        }
    }
}
