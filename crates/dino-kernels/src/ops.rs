//! What a backend implements to run the fused kernels: `FusedOps`, the forwards (a burn
//! backend extension, so `Dispatch` tensors reach them), and `FusedBackward`, the forwards that
//! keep what their backward reads, and the backwards. `autodiff.rs` builds the one `Autodiff<B>`
//! implementation from these for every backend `B`; a new target (GPU, bf16) implements both
//! traits for its backend and adds it to the extension's list.
//!
//! Shapes are checked by `shapes` (each op documents its operands); a backend's kernels may
//! assume them.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, backend_extension};

use crate::shapes::{AttentionDims, ConvDims, LinearDims, LossDims, PatchDims};

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
    /// A pre-norm transformer MLP added onto its input, x + fc2(GELU(fc1(LN(x)))): x `[..., K]`,
    /// the LayerNorm's gamma and beta `[K]`, weights `[K, H]` and `[H, K]`, biases `[H]` and
    /// `[K]`. Tracked by autodiff as `fused_layer_norm`, `fused_linear_gelu` and
    /// `fused_linear_add`; fused only when nothing needs a gradient.
    #[allow(clippy::too_many_arguments)]
    fn fused_norm_mlp_add(
        x: FloatTensor<Self>,
        norm_gamma: FloatTensor<Self>,
        norm_beta: FloatTensor<Self>,
        fc1_weight: FloatTensor<Self>,
        fc1_bias: FloatTensor<Self>,
        fc2_weight: FloatTensor<Self>,
        fc2_bias: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    /// Pre-norm multi-head self-attention added onto its input, x + proj(attention(qkv(LN(x)))):
    /// x `[B, N, K]`, the LayerNorm's gamma and beta `[K]`, weights `[K, 3D]` and `[D, K]`,
    /// biases `[3D]` and `[K]`. Tracked by autodiff as `fused_layer_norm`, `fused_linear`,
    /// `fused_self_attention` and `fused_linear_add`; fused only when nothing needs a gradient.
    #[allow(clippy::too_many_arguments)]
    fn fused_norm_attention_add(
        x: FloatTensor<Self>,
        norm_gamma: FloatTensor<Self>,
        norm_beta: FloatTensor<Self>,
        qkv_weight: FloatTensor<Self>,
        qkv_bias: FloatTensor<Self>,
        proj_weight: FloatTensor<Self>,
        proj_bias: FloatTensor<Self>,
        eps: f64,
        heads: usize,
    ) -> FloatTensor<Self>;
    /// A bias-free fully connected layer in PyTorch's layout (`F.linear(x, w)`): x `[..., C]`,
    /// weight `[K, C]` -> x Wᵀ `[..., K]`.
    fn fused_linear_transposed(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Weight normalisation of rows: v `[K, C]`, g `[K, 1]` -> g · v / ‖v‖ (norm per row).
    fn fused_weight_norm(v: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self>;
    /// ViT patch embedding (Conv2d, kernel = stride = p): images `[B, C, H, W]`, weight
    /// `[D, C, p, p]`, bias `[D]` -> `[B, (H/p)·(W/p), D]`, patches in row-major grid order.
    fn fused_patch_embed(
        images: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// A bias-free Conv2d (groups 1, dilation 1, zero padding `padding` on each side): x
    /// `[B, C, H, W]`, weight `[O, C, kh, kw]` -> `[B, O, H', W']`.
    fn fused_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;
    /// Per-channel (mean, biased variance) of x `[B, C, ...]` over every dimension but 1, as
    /// `[2, C]`: the means, then the variances. Not tracked by autodiff.
    fn fused_channel_stats(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Train-mode BatchNorm, then ReLU when `relu`: x `[B, C, ...]` normalised per channel by
    /// `stats` `[2, C]`, which must be `fused_channel_stats(x)` (a constant operand: the backward
    /// differentiates through the statistics as functions of x), scaled by gamma and shifted by
    /// beta `[C]` -> `[B, C, ...]`.
    fn fused_batch_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        eps: f64,
        relu: bool,
    ) -> FloatTensor<Self>;
    /// x · scale_c + shift_c per channel (eval-mode BatchNorm), then ReLU when `relu`: x
    /// `[B, C, ...]`, scale and shift `[C]`.
    fn fused_channel_affine(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        relu: bool,
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

/// The backward half of the fused ops, called only by the generic `Autodiff<B>` implementation
/// (so not dispatched). Each `*_saving` forward returns the output first, then the state its
/// backward reads; gradients come back in the shapes of the operands they belong to.
pub trait FusedBackward: FusedOps {
    /// dx `[..., K]` of a linear layer from weight `[K, N]` and dy `[..., N]`.
    fn linear_backward_input(weight: FloatTensor<Self>, dy: FloatTensor<Self>, d: LinearDims) -> FloatTensor<Self>;
    /// (dweight `[K, N]`, dbias `[N]`) from x `[..., K]` and dy `[..., N]`.
    fn linear_backward_params(
        x: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        d: LinearDims,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// dbias `[N]` alone (the weight is frozen) from dy `[..., N]`.
    fn linear_backward_bias(dy: FloatTensor<Self>, d: LinearDims) -> FloatTensor<Self>;
    /// dx `[..., C]` of `fused_linear_transposed` from weight `[K, C]` and dy `[..., K]`.
    fn linear_transposed_backward_input(
        weight: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        d: LinearDims,
    ) -> FloatTensor<Self>;
    /// dweight `[K, C]` of `fused_linear_transposed` from x `[..., C]` and dy `[..., K]`.
    fn linear_transposed_backward_weight(
        x: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        d: LinearDims,
    ) -> FloatTensor<Self>;
    /// (GELU(x W + b), x W + b), both `[..., N]`.
    fn linear_gelu_saving(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// dx of GELU from its input x and dy (same shapes).
    fn fused_gelu_backward(x: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self>;
    /// (W `[K, C]`, 1/‖v_k‖ `[K]`).
    fn weight_norm_saving(v: FloatTensor<Self>, g: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// (dv `[K, C]`, dg `[K, 1]`) from v, g, the inverse norms and dW `[K, C]`.
    fn weight_norm_backward(
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        inv_norms: FloatTensor<Self>,
        dw: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// (the embedding `[B, h·w, D]`, the gathered patches `[B·h·w, C·p·p]`).
    fn patch_embed_saving(
        images: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// dimages `[B, C, H, W]` (zero past the last whole patch) from weight and dy `[B, h·w, D]`.
    fn patch_embed_backward_images(weight: FloatTensor<Self>, dy: FloatTensor<Self>, d: PatchDims)
    -> FloatTensor<Self>;
    /// (dweight `[D, C, p, p]`, dbias `[D]`) from the gathered patches and dy.
    fn patch_embed_backward_params(
        patches: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        d: PatchDims,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// dx `[B, C, H, W]` of a Conv2d from its weight and dy `[B, O, H', W']`.
    fn conv2d_backward_input(weight: FloatTensor<Self>, dy: FloatTensor<Self>, d: ConvDims) -> FloatTensor<Self>;
    /// dweight `[O, C, kh, kw]` of a Conv2d from its input x and dy.
    fn conv2d_backward_weight(x: FloatTensor<Self>, dy: FloatTensor<Self>, d: ConvDims) -> FloatTensor<Self>;
    /// (y `[..., C]`, per-row (mean, 1/σ) `[rows, 2]`).
    fn layer_norm_saving(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// (dx, dgamma `[C]`, dbeta `[C]`) from x, gamma, the row statistics and dy.
    fn layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// (dx, dgamma `[C]`, dbeta `[C]`) of `fused_batch_norm` from its operands and dy.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        eps: f64,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// (dx, dscale `[C]`, dshift `[C]`) of `fused_channel_affine` from its operands and dy.
    fn channel_affine_backward(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// (`[B, N, D]`, the softmax attention `[B, heads, N, N]`).
    fn self_attention_saving(qkv: FloatTensor<Self>, d: AttentionDims) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// dqkv `[B, N, 3D]` from qkv, the attention and dy `[B, N, D]`.
    fn self_attention_backward(
        qkv: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        d: AttentionDims,
    ) -> FloatTensor<Self>;
    /// (the loss `[1]`, the log-sum-exp of every student row `[V·B]`).
    fn dino_loss_saving(
        student: FloatTensor<Self>,
        teacher_probs: FloatTensor<Self>,
        student_temp: f64,
        d: LossDims,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// dstudent `[V·B, K]` for the loss's upstream gradient `dloss` `[1]`.
    fn dino_loss_backward(
        student: FloatTensor<Self>,
        teacher_probs: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dloss: FloatTensor<Self>,
        student_temp: f64,
        d: LossDims,
    ) -> FloatTensor<Self>;
}
