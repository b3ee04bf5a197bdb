//! Fused CPU kernels for the DINO training step, with closed-form backward passes: linear layers
//! (with GELU or residual epilogues), convolutions, BatchNorm (with ReLU), exact GELU, LayerNorm, multi-head self-attention read
//! straight from the qkv projection, the weight-normalised last layer and the DINO loss; a
//! pre-norm transformer block's two halves as one op each without gradients (inference, the
//! teacher); and the parameter updates (AdamW, gradient norm, teacher EMA).
//!
//! burn's flex backend runs these as chains of single-threaded elementwise ops, each with a
//! fresh tensor, and their autodiff graphs as a dozen nodes; here each is one parallel,
//! vectorised pass forward and one backward (see BENCHMARKS.md for what that buys).
//!
//! The functions take and return ordinary `Tensor`s. On a flex device (with or without autodiff)
//! with f32 data they run the kernels through a burn backend extension; on any other device they
//! fall back to burn's composed ops, so GPU backends keep working unchanged.

//!
//! Layout: `api` (these functions, which choose per op between the kernels and `composed`),
//! `ops` (the traits a backend implements), `shapes` (the op sizes, checked for every backend),
//! `autodiff` (one `Autodiff<B>` implementation from any backend's forwards and backwards),
//! `cpu` (the kernels for flex), `cpu_bf16` (the bf16 matrix products with f32 sums that `cpu`'s
//! products run on when `set_matmul_precision(Bf16)` chose them).

mod api;
mod autodiff;
pub mod composed;
mod cpu;
pub mod cpu_bf16;
mod ops;
mod shapes;

pub use api::*;
pub use composed::{merge_heads, split_heads};
/// `a·b` in 16 vectorised lanes, for callers outside the kernels (nearest-neighbour search).
pub use cpu::simd::dot;
pub use cpu::{AdamwScalars, KeepPackedWeights, keep_packed_weights};
pub use cpu_bf16::{MatmulPrecision, matmul_precision, set_matmul_precision};
pub use ops::{FusedBackward, FusedOps};
pub use shapes::{AttentionDims, ChannelDims, ConvDims, LinearDims, LossDims, PatchDims};
