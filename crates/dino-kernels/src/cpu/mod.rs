//! The f32 CPU target: `FusedOps` and `FusedBackward` for burn's flex backend, each op one
//! parallel, vectorised pass over dense row-major buffers (one module per op family).

pub(crate) mod attention;
mod batch_norm;
mod block;
pub(crate) mod buffer;
mod conv;
mod dino_loss;
mod gelu;
mod kept_weights;
mod layer_norm;
mod linear;
mod matmul;
mod optim;
mod patch_embed;
pub(crate) mod simd;
mod weight_norm;

pub use kept_weights::{KeepPackedWeights, keep_packed_weights};
pub use optim::AdamwScalars;
pub(crate) use optim::adamw;

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{Shape, TensorData};

use crate::ops::{FusedBackward, FusedOps};
use crate::shapes::{self, AttentionDims, ConvDims, LinearDims, LossDims, PatchDims};

/// Elements per parallel task of the memory-bound passes: 64 KiB of f32 amortises a rayon task
/// and still gives every thread many tasks.
const CHUNK: usize = 1 << 14;

/// Whole rows of `width` elements per parallel task, about `CHUNK` elements (at least one row).
fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
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

/// A layer's weight: [`dense`], and registered for `kept_weights` (inference keeps its packed
/// bf16 copy across forwards).
fn weight(t: FlexTensor) -> FlexTensor {
    let t = dense(t);
    kept_weights::register(&t);
    t
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

fn scalar(value: f64) -> FlexTensor {
    tensor(vec![value as f32], Shape::new([1]))
}

impl FusedOps for Flex {
    fn fused_linear(x: FlexTensor, w: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let (x, w, b) = (dense(x), weight(w), dense(bias));
        let d = shapes::linear(&shape(&x), &shape(&w));
        tensor(linear::forward(values(&x), values(&w), values(&b), d), shapes::with_last(&shape(&x), d.n))
    }

    fn fused_linear_gelu(x: FlexTensor, w: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let (x, w, b) = (dense(x), weight(w), dense(bias));
        let d = shapes::linear(&shape(&x), &shape(&w));
        tensor(linear::forward_gelu(values(&x), values(&w), values(&b), d), shapes::with_last(&shape(&x), d.n))
    }

    fn fused_linear_add(x: FlexTensor, w: FlexTensor, bias: FlexTensor, residual: FlexTensor) -> FlexTensor {
        let (x, w, b, r) = (dense(x), weight(w), dense(bias), dense(residual));
        let d = shapes::linear_add(&shape(&x), &shape(&w), &shape(&r));
        tensor(linear::forward_add(values(&x), values(&w), values(&b), values(&r), d), shape(&r))
    }

    fn fused_norm_mlp_add(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        w1: FlexTensor,
        b1: FlexTensor,
        w2: FlexTensor,
        b2: FlexTensor,
        eps: f64,
    ) -> FlexTensor {
        // The sums go into x's buffer (a copy only when x is shared or a view).
        let mut x = owned(x);
        let (w1, w2) = (weight(w1), weight(w2));
        let [g, b, b1, b2] = [gamma, beta, b1, b2].map(dense);
        let (d1, d2) = shapes::norm_mlp_add(&shape(&x), &shape(&g), &shape(&b), &shape(&w1), &shape(&w2));
        let [g, b, w1, b1, w2, b2] = [&g, &b, &w1, &b1, &w2, &b2].map(values);
        block::norm_mlp_add(x.storage_mut(), (g, b, eps as f32), (w1, b1, d1), (w2, b2, d2));
        x
    }

    fn fused_norm_attention_add(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        qkv_weight: FlexTensor,
        qkv_bias: FlexTensor,
        proj_weight: FlexTensor,
        proj_bias: FlexTensor,
        eps: f64,
        heads: usize,
    ) -> FlexTensor {
        let mut x = owned(x);
        let (wq, wp) = (weight(qkv_weight), weight(proj_weight));
        let [g, b, bq, bp] = [gamma, beta, qkv_bias, proj_bias].map(dense);
        let (dq, d, dp) =
            shapes::norm_attention_add(&shape(&x), &shape(&g), &shape(&b), &shape(&wq), &shape(&wp), heads);
        let [g, b, wq, bq, wp, bp] = [&g, &b, &wq, &bq, &wp, &bp].map(values);
        block::norm_attention_add(x.storage_mut(), (g, b, eps as f32), (wq, bq, dq), d, (wp, bp, dp));
        x
    }

    fn fused_linear_transposed(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let (x, w) = (dense(x), weight(w));
        let d = shapes::linear_transposed(&shape(&x), &shape(&w));
        tensor(linear::forward_transposed(values(&x), values(&w), d), shapes::with_last(&shape(&x), d.n))
    }

    fn fused_weight_norm(v: FlexTensor, g: FlexTensor) -> FlexTensor {
        Self::weight_norm_saving(v, g).0
    }

    fn fused_patch_embed(images: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        Self::patch_embed_saving(images, weight, bias).0
    }

    fn fused_conv2d(x: FlexTensor, weight: FlexTensor, stride: [usize; 2], padding: [usize; 2]) -> FlexTensor {
        let (x, w) = (dense(x), dense(weight));
        let d = shapes::conv2d(&shape(&x), &shape(&w), stride, padding);
        tensor(conv::forward(values(&x), values(&w), d), d.output())
    }

    fn fused_channel_stats(x: FlexTensor) -> FlexTensor {
        let x = dense(x);
        let d = shapes::channels(&shape(&x), &[]);
        tensor(batch_norm::channel_stats(values(&x), d), Shape::new([2, d.channels]))
    }

    fn fused_batch_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        stats: FlexTensor,
        eps: f64,
        relu: bool,
    ) -> FlexTensor {
        let (x, g, b, stats) = (dense(x), dense(gamma), dense(beta), dense(stats));
        let d = shapes::channels(&shape(&x), &[&shape(&g), &shape(&b)]);
        shapes::channel_stats(&shape(&x), &shape(&stats));
        let y = batch_norm::forward(values(&x), values(&g), values(&b), values(&stats), eps as f32, relu, d);
        tensor(y, shape(&x))
    }

    fn fused_channel_affine(x: FlexTensor, scale: FlexTensor, shift: FlexTensor, relu: bool) -> FlexTensor {
        let (x, a, b) = (dense(x), dense(scale), dense(shift));
        let d = shapes::channels(&shape(&x), &[&shape(&a), &shape(&b)]);
        tensor(batch_norm::forward_affine(values(&x), values(&a), values(&b), relu, d), shape(&x))
    }

    fn fused_gelu(x: FlexTensor) -> FlexTensor {
        let x = dense(x);
        tensor(gelu::forward(values(&x)), shape(&x))
    }

    fn fused_layer_norm(x: FlexTensor, gamma: FlexTensor, beta: FlexTensor, eps: f64) -> FlexTensor {
        Self::layer_norm_saving(x, gamma, beta, eps).0
    }

    fn fused_self_attention(qkv: FlexTensor, heads: usize) -> FlexTensor {
        let qkv = dense(qkv);
        let d = shapes::attention(&shape(&qkv), heads);
        tensor(attention::forward(values(&qkv), d), d.output())
    }

    fn fused_dino_loss(student: FlexTensor, teacher_probs: FlexTensor, views: usize, student_temp: f64) -> FlexTensor {
        let (s, q) = (dense(student), dense(teacher_probs));
        let d = shapes::dino_loss(&shape(&s), &shape(&q), views);
        scalar(dino_loss::forward(values(&s), values(&q), student_temp as f32, d).0)
    }

    fn fused_squared_norm(x: FlexTensor) -> FlexTensor {
        let sum = optim::squared_norm(values(&dense(x)));
        FlexTensor::from_data(TensorData::new(vec![sum], [1]))
    }

    fn fused_ema(teacher: FlexTensor, student: FlexTensor, momentum: f64) -> FlexTensor {
        let (mut teacher, student) = (owned(teacher), dense(student));
        shapes::same("EMA", &shape(&teacher), &shape(&student));
        optim::ema(teacher.storage_mut::<f32>(), values(&student), momentum as f32);
        teacher
    }
}

impl FusedBackward for Flex {
    fn linear_backward_input(weight: FlexTensor, dy: FlexTensor, d: LinearDims) -> FlexTensor {
        let (w, dy) = (dense(weight), dense(dy));
        tensor(linear::backward_input(values(&w), values(&dy), d), shapes::with_last(&shape(&dy), d.k))
    }

    fn linear_backward_params(x: FlexTensor, dy: FlexTensor, d: LinearDims) -> (FlexTensor, FlexTensor) {
        let (x, dy) = (dense(x), dense(dy));
        let (dw, db) = linear::backward_params(values(&x), values(&dy), d);
        (tensor(dw, Shape::new([d.k, d.n])), tensor(db, Shape::new([d.n])))
    }

    fn linear_transposed_backward_input(weight: FlexTensor, dy: FlexTensor, d: LinearDims) -> FlexTensor {
        let (w, dy) = (dense(weight), dense(dy));
        tensor(linear::backward_input_transposed(values(&w), values(&dy), d), shapes::with_last(&shape(&dy), d.k))
    }

    fn linear_transposed_backward_weight(x: FlexTensor, dy: FlexTensor, d: LinearDims) -> FlexTensor {
        let (x, dy) = (dense(x), dense(dy));
        tensor(linear::backward_weight_transposed(values(&x), values(&dy), d), Shape::new([d.n, d.k]))
    }

    fn linear_backward_bias(dy: FlexTensor, d: LinearDims) -> FlexTensor {
        tensor(linear::backward_bias(values(&dense(dy)), d.n), Shape::new([d.n]))
    }

    fn linear_gelu_saving(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> (FlexTensor, FlexTensor) {
        let (x, w, b) = (dense(x), dense(weight), dense(bias));
        let d = shapes::linear(&shape(&x), &shape(&w));
        let (pre, y) = linear::forward_gelu_keep(values(&x), values(&w), values(&b), d);
        let out = shapes::with_last(&shape(&x), d.n);
        (tensor(y, out.clone()), tensor(pre, out))
    }

    fn fused_gelu_backward(x: FlexTensor, dy: FlexTensor) -> FlexTensor {
        let (x, dy) = (dense(x), dense(dy));
        tensor(gelu::backward(values(&x), values(&dy)), shape(&x))
    }

    fn weight_norm_saving(v: FlexTensor, g: FlexTensor) -> (FlexTensor, FlexTensor) {
        let (v, g) = (dense(v), dense(g));
        let rows = shapes::weight_norm(&shape(&v), &shape(&g));
        let (w, inv) = weight_norm::forward(values(&v), values(&g));
        (tensor(w, shape(&v)), tensor(inv, Shape::new([rows])))
    }

    fn weight_norm_backward(v: FlexTensor, g: FlexTensor, inv: FlexTensor, dw: FlexTensor) -> (FlexTensor, FlexTensor) {
        let (v, g, inv, dw) = (dense(v), dense(g), dense(inv), dense(dw));
        let (dv, dg) = weight_norm::backward(values(&v), values(&g), values(&inv), values(&dw));
        (tensor(dv, shape(&v)), tensor(dg, shape(&g)))
    }

    fn patch_embed_saving(images: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> (FlexTensor, FlexTensor) {
        let (i, w, b) = (dense(images), dense(weight), dense(bias));
        let d = shapes::patch_embed(&shape(&i), &shape(&w));
        let (out, patches) = patch_embed::forward(values(&i), values(&w), values(&b), d);
        (tensor(out, d.output()), tensor(patches, d.patches()))
    }

    fn patch_embed_backward_images(weight: FlexTensor, dy: FlexTensor, d: PatchDims) -> FlexTensor {
        let (w, dy) = (dense(weight), dense(dy));
        tensor(patch_embed::backward_images(values(&w), values(&dy), d), d.images())
    }

    fn patch_embed_backward_params(patches: FlexTensor, dy: FlexTensor, d: PatchDims) -> (FlexTensor, FlexTensor) {
        let (p, dy) = (dense(patches), dense(dy));
        let (dw, db) = patch_embed::backward_params(values(&p), values(&dy), d);
        (tensor(dw, d.weight()), tensor(db, Shape::new([d.dim])))
    }

    fn conv2d_backward_input(weight: FlexTensor, dy: FlexTensor, d: ConvDims) -> FlexTensor {
        let (w, dy) = (dense(weight), dense(dy));
        tensor(conv::backward_input(values(&w), values(&dy), d), d.input())
    }

    fn conv2d_backward_weight(x: FlexTensor, dy: FlexTensor, d: ConvDims) -> FlexTensor {
        let (x, dy) = (dense(x), dense(dy));
        tensor(conv::backward_weight(values(&x), values(&dy), d), d.weight())
    }

    fn layer_norm_saving(x: FlexTensor, gamma: FlexTensor, beta: FlexTensor, eps: f64) -> (FlexTensor, FlexTensor) {
        let (x, g, b) = (dense(x), dense(gamma), dense(beta));
        shapes::layer_norm(&shape(&x), &shape(&g), &shape(&b));
        let (y, stats) = layer_norm::forward(values(&x), values(&g), values(&b), eps as f32);
        let rows = stats.len() / 2;
        (tensor(y, shape(&x)), tensor(stats, Shape::new([rows, 2])))
    }

    fn layer_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        stats: FlexTensor,
        dy: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (x, g, stats, dy) = (dense(x), dense(gamma), dense(stats), dense(dy));
        let (dx, dgamma, dbeta) = layer_norm::backward(values(&x), values(&g), values(&stats), values(&dy));
        (tensor(dx, shape(&x)), tensor(dgamma, shape(&g)), tensor(dbeta, shape(&g)))
    }

    fn batch_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        stats: FlexTensor,
        dy: FlexTensor,
        eps: f64,
        relu: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (x, g, b, stats, dy) = (dense(x), dense(gamma), dense(beta), dense(stats), dense(dy));
        let d = shapes::channels(&shape(&x), &[&shape(&g), &shape(&b)]);
        let (dx, dg, db) =
            batch_norm::backward(values(&x), values(&g), values(&b), values(&stats), values(&dy), eps as f32, relu, d);
        (tensor(dx, shape(&x)), tensor(dg, shape(&g)), tensor(db, shape(&g)))
    }

    fn channel_affine_backward(
        x: FlexTensor,
        scale: FlexTensor,
        shift: FlexTensor,
        dy: FlexTensor,
        relu: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (x, a, b, dy) = (dense(x), dense(scale), dense(shift), dense(dy));
        let d = shapes::channels(&shape(&x), &[&shape(&a), &shape(&b)]);
        let (dx, da, db) = batch_norm::backward_affine(values(&x), values(&a), values(&b), values(&dy), relu, d);
        (tensor(dx, shape(&x)), tensor(da, shape(&a)), tensor(db, shape(&a)))
    }

    fn self_attention_saving(qkv: FlexTensor, d: AttentionDims) -> (FlexTensor, FlexTensor) {
        let (out, probs) = attention::forward_with_probs(values(&dense(qkv)), d);
        (tensor(out, d.output()), tensor(probs, d.probs()))
    }

    fn self_attention_backward(qkv: FlexTensor, probs: FlexTensor, dy: FlexTensor, d: AttentionDims) -> FlexTensor {
        let (qkv, probs, dy) = (dense(qkv), dense(probs), dense(dy));
        tensor(attention::backward(values(&qkv), values(&probs), values(&dy), d), shape(&qkv))
    }

    fn dino_loss_saving(
        student: FlexTensor,
        teacher_probs: FlexTensor,
        temp: f64,
        d: LossDims,
    ) -> (FlexTensor, FlexTensor) {
        let (s, q) = (dense(student), dense(teacher_probs));
        let (loss, lse) = dino_loss::forward(values(&s), values(&q), temp as f32, d);
        (scalar(loss), tensor(lse, Shape::new([d.views * d.batch])))
    }

    fn dino_loss_backward(
        student: FlexTensor,
        teacher_probs: FlexTensor,
        lse: FlexTensor,
        dloss: FlexTensor,
        temp: f64,
        d: LossDims,
    ) -> FlexTensor {
        let (s, q, lse, dloss) = (dense(student), dense(teacher_probs), dense(lse), dense(dloss));
        let ds = dino_loss::backward(values(&s), values(&q), values(&lse), temp as f32, values(&dloss)[0], d);
        tensor(ds, shape(&s))
    }
}

/// Test data: `len` deterministic values spread over [-half_range, half_range).
#[cfg(test)]
pub(crate) fn test_data(len: usize, seed: u32, half_range: f32) -> Vec<f32> {
    (0..len)
        .map(|i| ((((i as u32 ^ seed).wrapping_mul(2654435761)) % 2000) as f32 / 1000.0 - 1.0) * half_range)
        .collect()
}
