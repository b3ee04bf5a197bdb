//! The fused ops in burn's composed tensor ops: what every operand that is not f32 on flex runs
//! (every GPU backend, f64), and the oracle the fused kernels are tested against. Each function
//! has the shapes and the meaning of its namesake in the crate root.
//!
//! In f16 and bf16 (mixed precision on the GPU path) LayerNorm and the attention softmax run in
//! f32 and round their outputs back, as `torch.autocast` runs them.

use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Tensor, activation};

fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
}

use crate::AdamwScalars;

/// `x W + b` on every row: x `[..., K]`, weight `[K, N]`, bias `[N]` -> `[..., N]`.
pub fn linear<const D: usize>(weight: Tensor<2>, bias: Option<Tensor<1>>, x: Tensor<D>) -> Tensor<D> {
    let mut dims = x.dims();
    let k = dims[D - 1];
    let y = burn::tensor::module::linear(x.reshape([dims.iter().product::<usize>() / k.max(1), k]), weight, bias);
    dims[D - 1] = y.dims()[1];
    y.reshape(dims)
}

/// `x Wᵀ` on every row: x `[..., K]`, weight `[N, K]` -> `[..., N]`.
pub fn linear_transposed<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    linear(weight.transpose(), None, x)
}

/// burn's train-mode BatchNorm: (y, the statistics `[2, C]`, means then biased variances, without
/// gradient).
pub fn batch_norm_train<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> (Tensor<D>, Tensor<2>) {
    let out = burn::tensor::module::batch_norm_train(x, gamma, beta, eps);
    let stats = Tensor::stack::<2>(vec![out.mean, out.variance], 0).without_autodiff();
    (out.output, stats)
}

pub fn relu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activation::relu(x)
}

pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activation::gelu(x)
}

pub fn layer_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, beta: Tensor<1>, eps: f64) -> Tensor<D> {
    let dtype = x.dtype();
    if is_half(dtype) {
        let f32 = |t: Tensor<1>| t.cast(DType::F32);
        return burn::tensor::module::layer_norm(x.cast(DType::F32), f32(gamma), Some(f32(beta)), eps).cast(dtype);
    }
    burn::tensor::module::layer_norm(x, gamma, Some(beta), eps)
}

pub fn weight_norm(v: Tensor<2>, g: Tensor<2>) -> Tensor<2> {
    let norm = v.clone().square().sum_dim(1).sqrt();
    v * (g / norm)
}

/// The fused qkv projection `[B, N, 3D]` split into q, k, v, each `[B, heads, N, D/heads]`.
pub fn split_heads(qkv: Tensor<3>, heads: usize) -> [Tensor<4>; 3] {
    let [b, n, width] = qkv.dims();
    let d = width / 3;
    let qkv = qkv.reshape([b, n, 3, heads, d / heads]).permute([2, 0, 3, 1, 4]);
    let part = |i: usize| qkv.clone().narrow(0, i, 1).reshape([b, heads, n, d / heads]);
    [part(0), part(1), part(2)]
}

/// Heads `[B, heads, N, D/heads]` -> tokens `[B, N, D]`.
pub fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, n, dh] = x.dims();
    x.swap_dims(1, 2).reshape([b, n, h * dh])
}

pub fn self_attention(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
    let dtype = qkv.dtype();
    let [q, k, v] = split_heads(qkv, heads);
    if is_half(dtype) {
        let scores = q.matmul(k.swap_dims(2, 3)) * (v.dims()[3] as f64).powf(-0.5);
        let weights = activation::softmax(scores.cast(DType::F32), 3).cast(dtype);
        return merge_heads(weights.matmul(v));
    }
    // The op's default scale is head_dim^-0.5, the official one.
    merge_heads(burn_attention(q, k, v, None, None, AttentionModuleOptions::default()))
}

pub fn adamw_step<const D: usize>(
    p: Tensor<D>,
    g: Tensor<D>,
    m: Tensor<D>,
    v: Tensor<D>,
    s: AdamwScalars,
) -> [Tensor<D>; 3] {
    // The clipping coefficient scales the gradient first, as in the fused `optim::adamw`.
    let g = g * s.grad_scale;
    let p = p * s.decay;
    let m = m * s.beta1 + g.clone() * (1.0 - s.beta1);
    let v = v * s.beta2 + g.square() * (1.0 - s.beta2);
    let denom = v.clone().sqrt() * s.inv_sqrt_bias2 + s.eps;
    [p - m.clone() / denom * s.step_size, m, v]
}

pub fn ema<const D: usize>(teacher: Tensor<D>, student: Tensor<D>, momentum: f64) -> Tensor<D> {
    teacher * momentum + student * (1.0 - momentum)
}

pub fn dino_cross_entropy(student: Tensor<2>, teacher_probs: Tensor<2>, views: usize, student_temp: f64) -> Tensor<1> {
    let [rows, k] = student.dims();
    let b = rows / views;
    let log_p = activation::log_softmax(student / student_temp, 1).reshape([views, b, k]);
    let q = teacher_probs.reshape([2, b, k]);
    // sum over v != iq of <q_iq, log p_v> = <q_iq, sum_v log p_v> - <q_iq, log p_iq>
    let all_views = log_p.clone().sum_dim(0); // [1, B, K]
    let same_view = log_p.narrow(0, 0, 2); // [2, B, K]
    let cross = (q.clone() * all_views).sum() - (q * same_view).sum();
    -cross / (b as f64 * (2 * views - 2) as f64)
}

pub fn squared_norm<const D: usize>(x: Tensor<D>) -> f64 {
    x.square().sum().into_scalar::<f64>()
}
