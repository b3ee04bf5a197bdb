//! The public functions: each runs its fused kernel when every operand is f32 on flex, and
//! burn's composed ops (`composed`) otherwise.

use burn::backend::Dispatch;
use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::ops::FusedOps;
use crate::{AdamwScalars, composed, cpu, shapes};

fn is_flex_f32<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32 && x.device() == Device::flex()
}

/// Whether an op's fused CPU kernel may run: every operand is f32 on flex. One operand of
/// another dtype or device sends the whole op down burn's composed ops.
macro_rules! runs_fused {
    ($($t:expr),+) => { $(is_flex_f32(&$t))&&+ };
}

/// A burn `Linear` layer (weight `[K, N]`) on every row: `[..., K]` -> `[..., N]`, as one
/// `[rows, K] x [K, N]` product whatever the leading dimensions.
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let (weight, bias) = (layer.weight.val(), layer.bias.as_ref().map(|b| b.val()));
    match bias {
        Some(bias) if runs_fused!(x, weight, bias) => Tensor::from_dispatch(<Dispatch as FusedOps>::fused_linear(
            x.into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
        )),
        _ => composed::linear(weight, bias, x),
    }
}

/// A bias-free linear layer with its weight in PyTorch's layout (`F.linear(x, w)`): x
/// `[..., K]`, weight `[N, K]` -> x Wᵀ `[..., N]`. The head's weight-normalised last layer.
pub fn linear_transposed<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    if !runs_fused!(x, weight) {
        return composed::linear_transposed(x, weight);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_linear_transposed(x.into_dispatch(), weight.into_dispatch()))
}

/// GELU of a `Linear` layer, `[..., K]` -> `[..., N]`: on flex, the GELU runs on each tile of the
/// product while it is in cache, and the backward is one node.
pub fn linear_gelu<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let (weight, bias) = (layer.weight.val(), layer.bias.as_ref().map(|b| b.val()));
    match bias {
        Some(bias) if runs_fused!(x, weight, bias) => Tensor::from_dispatch(<Dispatch as FusedOps>::fused_linear_gelu(
            x.into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
        )),
        _ => composed::gelu(composed::linear(weight, bias, x)),
    }
}

/// `residual + layer(x)`: `[..., K]` and `[..., N]` -> `[..., N]`. On flex the product
/// accumulates straight onto the residual stream (no separate addition pass).
pub fn linear_add<const D: usize>(layer: &Linear, x: Tensor<D>, residual: Tensor<D>) -> Tensor<D> {
    let (weight, bias) = (layer.weight.val(), layer.bias.as_ref().map(|b| b.val()));
    match bias {
        Some(bias) if runs_fused!(x, weight, bias, residual) => {
            Tensor::from_dispatch(<Dispatch as FusedOps>::fused_linear_add(
                x.into_dispatch(),
                weight.into_dispatch(),
                bias.into_dispatch(),
                residual.into_dispatch(),
            ))
        }
        _ => residual + composed::linear(weight, bias, x),
    }
}

/// A LayerNorm's parameters: gamma and beta `[K]`, epsilon.
pub type Norm = (Tensor<1>, Tensor<1>, f64);

/// A pre-norm transformer MLP added onto its input, `x + fc2(GELU(fc1(LN(x))))`: x `[..., K]`
/// -> `[..., K]`. Without gradients (inference, the teacher) on flex, each tile of rows runs the
/// LayerNorm and both layers while its rows and hidden layer are in cache; with gradients it is
/// `linear_add(fc2, linear_gelu(fc1, layer_norm(x)), x)`, three nodes.
pub fn norm_mlp_add<const D: usize>((gamma, beta, eps): Norm, fc1: &Linear, fc2: &Linear, x: Tensor<D>) -> Tensor<D> {
    let (w1, w2) = (fc1.weight.val(), fc2.weight.val());
    match (fc1.bias.as_ref().map(|b| b.val()), fc2.bias.as_ref().map(|b| b.val())) {
        (Some(b1), Some(b2)) if runs_fused!(x, gamma, beta, w1, b1, w2, b2) => {
            Tensor::from_dispatch(<Dispatch as FusedOps>::fused_norm_mlp_add(
                x.into_dispatch(),
                gamma.into_dispatch(),
                beta.into_dispatch(),
                w1.into_dispatch(),
                b1.into_dispatch(),
                w2.into_dispatch(),
                b2.into_dispatch(),
                eps,
            ))
        }
        _ => linear_add(fc2, linear_gelu(fc1, layer_norm(x.clone(), gamma, beta, eps)), x),
    }
}

/// Pre-norm multi-head self-attention added onto its input, `x + proj(attention(qkv(LN(x))))`
/// with the qkv layout of [`self_attention`]: x `[B, N, K]` -> `[B, N, K]`. Without gradients on
/// flex, each tile of whole samples runs the LayerNorm, both projections and the attention while
/// its rows and qkv are in cache; with gradients it is four nodes.
pub fn norm_attention_add(
    (gamma, beta, eps): Norm,
    qkv: &Linear,
    proj: &Linear,
    x: Tensor<3>,
    heads: usize,
) -> Tensor<3> {
    let (wq, wp) = (qkv.weight.val(), proj.weight.val());
    match (qkv.bias.as_ref().map(|b| b.val()), proj.bias.as_ref().map(|b| b.val())) {
        (Some(bq), Some(bp)) if runs_fused!(x, gamma, beta, wq, bq, wp, bp) => {
            Tensor::from_dispatch(<Dispatch as FusedOps>::fused_norm_attention_add(
                x.into_dispatch(),
                gamma.into_dispatch(),
                beta.into_dispatch(),
                wq.into_dispatch(),
                bq.into_dispatch(),
                wp.into_dispatch(),
                bp.into_dispatch(),
                eps,
                heads,
            ))
        }
        _ => {
            let normed = layer_norm(x.clone(), gamma, beta, eps);
            linear_add(proj, self_attention(linear(qkv, normed), heads), x)
        }
    }
}

/// ViT patch embedding by a Conv2d with kernel = stride = p (bias required):
/// images `[B, C, H, W]` -> (`[B, h·w, D]` with patches in row-major grid order, h = H/p,
/// w = W/p). Pixels past the last whole patch are ignored, as with PyTorch's strided conv.
pub fn patch_embed(conv: &Conv2d, images: Tensor<4>) -> (Tensor<3>, usize, usize) {
    let weight = conv.weight.val();
    let [_, _, p, _] = weight.dims();
    let [b, _, height, width] = images.dims();
    let (h, w) = (height / p, width / p);
    match conv.bias.as_ref().map(|b| b.val()) {
        // The fused kernel is a plain patch conv: square kernel = stride, no padding, dilation
        // or groups. Any other conv runs as burn's.
        Some(bias) if runs_fused!(images, weight, bias) && is_patch_conv(conv) => {
            let out = <Dispatch as FusedOps>::fused_patch_embed(
                images.into_dispatch(),
                weight.into_dispatch(),
                bias.into_dispatch(),
            );
            (Tensor::from_dispatch(out), h, w)
        }
        _ => {
            let x = conv.forward(images); // [B, D, h, w], h and w as this conv's settings give them
            let [_, d, h, w] = x.dims();
            (x.reshape([b, d, h * w]).swap_dims(1, 2), h, w)
        }
    }
}

fn is_patch_conv(conv: &Conv2d) -> bool {
    let [kh, kw] = conv.kernel_size;
    kh == kw
        && conv.stride == conv.kernel_size
        && conv.dilation == [1, 1]
        && conv.groups == 1
        && matches!(conv.padding, PaddingConfig2d::Valid | PaddingConfig2d::Explicit(0, 0, 0, 0))
}

/// A Conv2d: x `[B, C, H, W]` -> `[B, O, H', W']`. On flex a bias-free conv with groups 1,
/// dilation 1 and the same padding on both sides of each axis (every ResNet conv) runs as
/// chunked im2col products with closed-form backward passes; any other runs as burn's.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let weight = conv.weight.val();
    match symmetric_padding(conv) {
        Some(padding)
            if conv.bias.is_none() && conv.dilation == [1, 1] && conv.groups == 1 && runs_fused!(x, weight) =>
        {
            Tensor::from_dispatch(<Dispatch as FusedOps>::fused_conv2d(
                x.into_dispatch(),
                weight.into_dispatch(),
                conv.stride,
                padding,
            ))
        }
        _ => conv.forward(x),
    }
}

/// The conv's padding as (rows, columns) when each is the same on both sides.
fn symmetric_padding(conv: &Conv2d) -> Option<[usize; 2]> {
    match conv.padding {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => Some([top, left]),
        _ => None,
    }
}

/// Train-mode BatchNorm (`torch.nn.BatchNorm*d` in `train()`): x `[B, C, ...]` normalised by
/// its own per-channel statistics over every dimension but 1, then gamma, beta `[C]` ->
/// (y `[B, C, ...]`, the batch statistics `[2, C]`: means, then biased variances, without
/// gradient, for the running statistics). On flex: one pass for the statistics, one for y, and
/// a closed-form backward.
pub fn batch_norm_train<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> (Tensor<D>, Tensor<2>) {
    batch_norm_train_then(x, gamma, beta, eps, false)
}

/// ReLU of [`batch_norm_train`]'s output, in the same pass on flex.
pub fn batch_norm_train_relu<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> (Tensor<D>, Tensor<2>) {
    batch_norm_train_then(x, gamma, beta, eps, true)
}

fn batch_norm_train_then<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
    relu: bool,
) -> (Tensor<D>, Tensor<2>) {
    shapes::channels(&x.shape(), &[&gamma.shape(), &beta.shape()]);
    if !runs_fused!(x, gamma, beta) {
        let (y, stats) = composed::batch_norm_train(x, gamma, beta, eps);
        return (if relu { composed::relu(y) } else { y }, stats);
    }
    let stats = Tensor::<2>::from_dispatch(<Dispatch as FusedOps>::fused_channel_stats(x.clone().into_dispatch()));
    let y = Tensor::from_dispatch(<Dispatch as FusedOps>::fused_batch_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        stats.clone().into_dispatch(),
        eps,
        relu,
    ));
    (y, stats.without_autodiff())
}

/// Eval-mode BatchNorm (`eval()`): x `[B, C, ...]` normalised by the running `mean` and `var`
/// `[C]`, then gamma, beta `[C]` -> `[B, C, ...]`. On flex one pass of x · scale + shift per
/// channel, with a backward for x, gamma and beta.
pub fn batch_norm_eval<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    mean: Tensor<1>,
    var: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    batch_norm_eval_then(x, gamma, beta, mean, var, eps, false)
}

/// ReLU of [`batch_norm_eval`]'s output, in the same pass on flex.
pub fn batch_norm_eval_relu<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    mean: Tensor<1>,
    var: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    batch_norm_eval_then(x, gamma, beta, mean, var, eps, true)
}

fn batch_norm_eval_then<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    mean: Tensor<1>,
    var: Tensor<1>,
    eps: f64,
    relu: bool,
) -> Tensor<D> {
    shapes::channels(&x.shape(), &[&gamma.shape(), &beta.shape(), &mean.shape(), &var.shape()]);
    if !runs_fused!(x, gamma, beta, mean, var) {
        let y = burn::tensor::module::batch_norm(x, gamma, beta, mean, var, eps);
        return if relu { composed::relu(y) } else { y };
    }
    // [C]-sized composed ops, so that gamma and beta get their gradients through scale and shift.
    let scale = gamma / (var + eps).sqrt();
    let shift = beta - mean * scale.clone();
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_channel_affine(
        x.into_dispatch(),
        scale.into_dispatch(),
        shift.into_dispatch(),
        relu,
    ))
}

/// Exact (erf) GELU, elementwise: `[...]` -> `[...]`.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !runs_fused!(x) {
        return composed::gelu(x);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_gelu(x.into_dispatch()))
}

/// LayerNorm over the last dimension (biased variance, as `torch.nn.LayerNorm`):
/// x `[..., C]`, gamma and beta `[C]` -> `[..., C]`.
pub fn layer_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, beta: Tensor<1>, eps: f64) -> Tensor<D> {
    shapes::layer_norm(&x.shape(), &gamma.shape(), &beta.shape());
    if !runs_fused!(x, gamma, beta) {
        return composed::layer_norm(x, gamma, beta, eps);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_layer_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    ))
}

/// `torch.nn.utils.weight_norm` with norms per row: v `[K, C]`, g `[K, 1]` -> `[K, C]`,
/// row k being g_k · v_k / ‖v_k‖.
pub fn weight_norm(v: Tensor<2>, g: Tensor<2>) -> Tensor<2> {
    if !runs_fused!(v, g) {
        return composed::weight_norm(v, g);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_weight_norm(v.into_dispatch(), g.into_dispatch()))
}

/// Multi-head self-attention, softmax(q kᵀ / √(D/heads)) v per head, from the fused qkv
/// projection `[B, N, 3D]` (q, k, v each `[heads, D/heads]` per token) -> `[B, N, D]`, heads
/// concatenated as in `vision_transformer.py`.
pub fn self_attention(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
    if !runs_fused!(qkv) {
        return composed::self_attention(qkv, heads);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_self_attention(qkv.into_dispatch(), heads))
}

/// The values of a plain (non-autodiff) flex tensor, moved out when it owns them.
fn host_values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().expect("f32 data on a flex device")
}

fn from_host<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// One `torch.optim.AdamW` step of a parameter `p` with gradient `g` and moments `m`, `v`
/// (same shapes, plain device): returns the new `[p, m, v]`. Decay is applied before the
/// update, as torch does.
pub fn adamw_step<const D: usize>(
    p: Tensor<D>,
    g: Tensor<D>,
    m: Tensor<D>,
    v: Tensor<D>,
    s: AdamwScalars,
) -> [Tensor<D>; 3] {
    if !runs_fused!(p, g, m, v) {
        return composed::adamw_step(p, g, m, v, s);
    }
    let (device, shape) = (p.device(), p.dims());
    let (mut pv, mut mv, mut vv) = (host_values(p), host_values(m), host_values(v));
    cpu::adamw(&mut pv, &mut mv, &mut vv, &host_values(g), s);
    [from_host(pv, shape, &device), from_host(mv, shape, &device), from_host(vv, shape, &device)]
}

/// The teacher's EMA update of one parameter (plain device):
/// `momentum · teacher + (1 − momentum) · student`, in the teacher's buffer on flex.
pub fn ema<const D: usize>(teacher: Tensor<D>, student: Tensor<D>, momentum: f64) -> Tensor<D> {
    if !runs_fused!(teacher, student) {
        return composed::ema(teacher, student, momentum);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_ema(teacher.into_dispatch(), student.into_dispatch(), momentum))
}

/// The DINO cross-entropy (`DINOLoss` of `main_dino.py`): raw student outputs `[V·B, K]` (V views,
/// crop-major), teacher probabilities `[2·B, K]` (its two global views) -> the loss `[1]`,
/// −⟨q_iq, log_softmax(s_v / student_temp)⟩ averaged over samples and over the 2V − 2
/// (teacher view iq, student view v ≠ iq) pairs. No gradient flows to the teacher side.
pub fn dino_cross_entropy(student: Tensor<2>, teacher_probs: Tensor<2>, views: usize, student_temp: f64) -> Tensor<1> {
    let teacher_probs = teacher_probs.without_autodiff();
    if !runs_fused!(student, teacher_probs) {
        return composed::dino_cross_entropy(student, teacher_probs, views, student_temp);
    }
    // The teacher side joins the student's graph as an untracked constant.
    let teacher_probs = if student.device().is_autodiff() { teacher_probs.autodiff() } else { teacher_probs };
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_dino_loss(
        student.into_dispatch(),
        teacher_probs.into_dispatch(),
        views,
        student_temp,
    ))
}

/// Σ x² over every element, accumulated in f64 across parallel chunks on flex.
pub fn squared_norm<const D: usize>(x: Tensor<D>) -> f64 {
    if !runs_fused!(x) {
        return composed::squared_norm(x);
    }
    Tensor::<1>::from_dispatch(<Dispatch as FusedOps>::fused_squared_norm(x.into_dispatch())).into_scalar::<f64>()
}
