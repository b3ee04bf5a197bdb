//! Inference fusions of a pre-norm transformer block's two halves, each added onto the residual
//! stream in place: `x += proj(attention(qkv(y)))` and `x += fc2(GELU(fc1(y)))`, y the
//! LayerNorm of x.
//!
//! Each tile of rows runs its half on one thread: the LayerNorm of its rows of x, the two
//! products and what lies between them, then the sum onto the same rows of x. The wide tensor in
//! the middle (qkv, three times the stream's width; the MLP's hidden layer, four times) and the
//! normed rows stay in L2: neither is written to memory whole and read back, which cost more
//! than the GELU or the attention softmax themselves, and x is read from memory once. The sums
//! go back into x's rows (a tile reads only its own), not into a fresh buffer: writing a new
//! stream of ViT-S/16's 16 x 197 x 384 values cost 6-11 % of each half in a harness (1-3 % of
//! inference in the bench) in cache misses.
//! The backward needs the middle tensors, so these run only without gradients (inference, the
//! teacher). They give the bits of the layers run one after the other (tested), which is what
//! runs when there are too few rows to keep every thread on several tiles.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::buffer::assume_init;
use super::linear::{self, check, parallelism};
use super::matmul::Rhs;
use super::simd::multiversion;
use super::{attention, gelu, layer_norm};
use crate::shapes::{AttentionDims, LinearDims as Dims};

/// Most bytes of a tile's middle tensor (an attention tile's qkv, an MLP tile's hidden layer):
/// made, transformed and read back while in L2 (1-2 MiB per core on current x86-64).
const MIDDLE_BYTES: usize = 320 << 10;
/// Most bytes of an MLP tile's hidden layer when the two weights do not fit in half of L2
/// (taken as 2 MiB): every tile then reads them from L3, and fewer, larger tiles read them
/// fewer times. ViT-S/16's (2.4 MiB in bf16) inference on Sapphire Rapids ran at 121 img/s in
/// tiles of 96 rows (590 KiB each, 33 tiles) and 125 in tiles of 320 (10 tiles); small28's
/// (0.6 MiB) ran faster in tiles of 96 rows (3266 img/s against 3153), within `MIDDLE_BYTES`.
const LARGE_MIDDLE_BYTES: usize = 2 << 20;
/// The weights' bytes above which an MLP's tiles take `LARGE_MIDDLE_BYTES`.
const WEIGHTS_IN_L2: usize = 1 << 20;
/// A layer: weight `[k, n]`, bias `[n]`, and its sizes.
pub type Layer<'a> = (&'a [f32], &'a [f32], Dims);
/// A LayerNorm: gamma and beta `[k]`, epsilon.
pub type Norm<'a> = (&'a [f32], &'a [f32], f32);

/// The LayerNorm of x `[rows, k]`, as its own layer.
fn normed(x: &[f32], (gamma, beta, eps): Norm<'_>) -> Vec<f32> {
    layer_norm::forward(x, gamma, beta, eps).0
}

/// Whether `rows` in tiles of `tile_rows` give every thread two tiles or more.
fn enough_tiles(rows: usize, tile_rows: usize) -> bool {
    rows >= 2 * rayon::current_num_threads() * tile_rows
}

/// Rows per tile of [`norm_mlp_add`] for `rows` rows, a hidden width `h` and weights of
/// `weight_bytes` in all: the fewest tiles whose hidden layer fits `MIDDLE_BYTES` (or
/// `LARGE_MIDDLE_BYTES`), shared evenly by the threads, in whole calls of the product's kernel
/// (`step` rows: at 48 rows every other AMX tile of 32 was half empty).
fn mlp_tile_rows(rows: usize, h: usize, weight_bytes: usize, step: usize, threads: usize) -> usize {
    let middle = if weight_bytes > WEIGHTS_IN_L2 { LARGE_MIDDLE_BYTES } else { MIDDLE_BYTES };
    linear::even_tile_rows(rows, middle / (4 * h.max(1)), step, threads)
}

/// Whole samples per tile of [`attention_add`]: as many qkv rows as fit `MIDDLE_BYTES`, at
/// least one sample.
fn attention_tile_samples(d: AttentionDims) -> usize {
    (MIDDLE_BYTES / (4 * 3 * d.width() * d.tokens).max(1)).max(1)
}

/// x += fc2(GELU(fc1(LN(x)))) for x `[rows, k]`, fc1 `[k, h]`, fc2 `[h, k]`.
pub fn norm_mlp_add(x: &mut [f32], norm: Norm<'_>, fc1: Layer<'_>, fc2: Layer<'_>) {
    let ((w1, b1, d1), (w2, b2, d2)) = (fc1, fc2);
    let weight_bytes = (w1.len() + w2.len()) * Rhs::value_bytes();
    let threads = rayon::current_num_threads().max(1);
    let tile_rows = mlp_tile_rows(d1.rows, d1.n, weight_bytes, Rhs::row_step(), threads);
    if !enough_tiles(d1.rows, tile_rows) {
        let y = linear::forward_add(&linear::forward_gelu(&normed(x, norm), w1, b1, d1), w2, b2, x, d2);
        return x.copy_from_slice(&y);
    }
    two_layers(x, norm, fc1, fc2, tile_rows, gelu_step)
}

/// The MLP's middle step: GELU of the hidden layer, in place.
fn gelu_step<'a>(hidden: &'a mut [f32], _: &'a mut Scratch) -> &'a [f32] {
    gelu::forward_in_place(hidden);
    hidden
}

/// x += proj(attention(qkv(LN(x)))) for x `[B·N, K]`, qkv `[K, 3D]`, proj `[D, K]`, in tiles of
/// whole samples.
pub fn norm_attention_add(x: &mut [f32], norm: Norm<'_>, qkv: Layer<'_>, d: AttentionDims, proj: Layer<'_>) {
    let ((wq, bq, dq), (wp, bp, dp)) = (qkv, proj);
    let samples = attention_tile_samples(d);
    if !enough_tiles(dq.rows, samples * d.tokens) {
        let heads = attention::forward(&linear::forward(&normed(x, norm), wq, bq, dq), d);
        let y = linear::forward_add(&heads, wp, bp, x, dp);
        return x.copy_from_slice(&y);
    }
    two_layers(x, norm, qkv, proj, samples * d.tokens, attention_step(d))
}

/// The attention's middle step: the heads of a tile's samples (of `d`'s sizes) from their qkv.
fn attention_step(d: AttentionDims) -> impl for<'a> Fn(&'a mut [f32], &'a mut Scratch) -> &'a [f32] + Sync {
    move |qkv, (out, probs)| {
        let tile = AttentionDims { batch: qkv.len() / (3 * d.width() * d.tokens), ..d };
        attention::forward_serial(qkv, tile, out, probs);
        out
    }
}

/// Per-thread buffers of a tile's middle step: an output, and scratch of the attention.
type Scratch = (Vec<f32>, Vec<MaybeUninit<f32>>);

/// x += second(middle(first(LN(x)))), tile by tile of `tile_rows` rows, each on one thread.
/// `middle` gets a tile's first product (`[rows, first.n]`, bias added) and scratch buffers,
/// and returns the second product's input (`[rows, second.k]`).
fn two_layers(
    x: &mut [f32],
    (gamma, beta, eps): Norm<'_>,
    (w1, b1, d1): Layer<'_>,
    (w2, b2, d2): Layer<'_>,
    tile_rows: usize,
    middle: impl for<'a> Fn(&'a mut [f32], &'a mut Scratch) -> &'a [f32] + Sync,
) {
    check(x, w1, d1);
    assert!(d2.rows == d1.rows && d2.n == d1.k, "two layers: {d2:?} does not follow {d1:?} back to its width");
    assert_eq!(w2.len(), d2.k * d2.n, "two layers: the second weight is not [{}, {}]", d2.k, d2.n);
    assert!(b1.len() == d1.n && b2.len() == d2.n, "two layers: a bias does not match its layer");
    assert!(gamma.len() == d1.k && beta.len() == d1.k, "two layers: the LayerNorm is not of width {}", d1.k);
    let none = gemm::Parallelism::None;
    // The weights once for every tile (in bf16, rounded and packed once).
    // SAFETY: the weights were checked to hold [k1, n1] and [k2, n2]; they outlive the products.
    let (first, second) = unsafe {
        let threads = parallelism(d1.rows, d1.n, d1.k);
        (
            Rhs::new((w1.as_ptr(), [d1.n, 1]), [d1.k, d1.n], threads),
            Rhs::new((w2.as_ptr(), [d2.n, 1]), [d2.k, d2.n], threads),
        )
    };
    let buffers = || {
        let normed = (vec![MaybeUninit::uninit(); tile_rows * d1.k], vec![0.0; 2 * tile_rows]);
        (normed, Vec::<f32>::with_capacity(tile_rows * d1.n), (Vec::new(), Vec::new()))
    };
    x.par_chunks_mut(tile_rows * d2.n).for_each_init(buffers, |((normed, stats), made, scratch), tile| {
        let rows = tile.len() / d2.n;
        let normed = &mut normed[..rows * d1.k];
        layer_norm::forward_rows(tile, gamma, beta, eps, normed, stats);
        // SAFETY: the LayerNorm wrote every value of its rows.
        let normed = unsafe { assume_init(normed) };
        // SAFETY: `normed` holds rows·k1 values; `made`'s capacity holds rows·n1 values,
        // all written by the product before `set_len`.
        unsafe {
            let lhs = (normed.as_ptr(), [d1.k, 1]);
            made.clear();
            first.product_plus_bias(rows, (made.as_mut_ptr(), d1.n), lhs, b1, none);
            made.set_len(rows * d1.n);
        }
        let input = middle(made, scratch);
        assert_eq!(input.len(), rows * d2.k, "two layers: the middle step gave {} values", input.len());
        // The residual plus the bias (the order of `linear::forward_add`), then the sums.
        add_to_rows(tile, b2);
        // SAFETY: the tile holds rows·n2 values, the input rows·k2 (checked).
        unsafe { second.product(rows, (tile.as_mut_ptr(), d2.n), true, (input.as_ptr(), [d2.k, 1]), 1.0, none) };
    });
}

multiversion! {
    /// `rows[i][j] += b[j]` for rows of `b.len()` values. Compiled for AVX-512 too: in baseline
    /// SSE it was 2 % of ViT-S/16's bf16 inference (perf).
    fn add_to_rows(rows: &mut [f32], b: &[f32]) {
        for row in rows.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(x, &b)| *x += b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        crate::cpu::test_data(len, seed, 1.0)
    }

    /// The fused halves give the bits of their layers run one after the other, in tiles that
    /// split the rows evenly or leave a ragged last tile.
    #[test]
    fn the_fused_halves_equal_their_layers() {
        let (d1, d2) = (Dims { rows: 200, k: 24, n: 40 }, Dims { rows: 200, k: 40, n: 24 });
        let (x, w1, b1) = (data(d1.rows * d1.k, 1), data(d1.k * d1.n, 2), data(d1.n, 3));
        let (w2, b2) = (data(d2.k * d2.n, 4), data(d2.n, 5));
        let (gamma, beta) = (data(24, 6), data(24, 10));
        let norm = (&gamma[..], &beta[..], 1e-6);
        let (fc1, fc2) = ((&w1[..], &b1[..], d1), (&w2[..], &b2[..], d2));
        let y = normed(&x, norm);
        let layers = linear::forward_add(&linear::forward_gelu(&y, &w1, &b1, d1), &w2, &b2, &x, d2);
        let fused = |f: &dyn Fn(&mut [f32])| {
            let mut x = x.clone();
            f(&mut x);
            x
        };
        for tile_rows in [48, 100, 200] {
            let fused = fused(&|x| two_layers(x, norm, fc1, fc2, tile_rows, gelu_step));
            assert!(fused == layers, "MLP in tiles of {tile_rows}");
        }
        assert!(fused(&|x| norm_mlp_add(x, norm, fc1, fc2)) == layers);

        // 10 samples of 20 tokens, 2 heads of 4: qkv [24, 24], proj [8, 24] -> back to 24.
        let d = AttentionDims { batch: 10, tokens: 20, heads: 2, head_dim: 4 };
        let (dq, dp) = (Dims { rows: 200, k: 24, n: 24 }, Dims { rows: 200, k: 8, n: 24 });
        let (wq, bq, wp) = (data(24 * 24, 7), data(24, 8), data(8 * 24, 9));
        let (qkv, proj) = ((&wq[..], &bq[..], dq), (&wp[..], &b2[..], dp));
        let heads = attention::forward(&linear::forward(&y, &wq, &bq, dq), d);
        let layers = linear::forward_add(&heads, &wp, &b2, &x, dp);
        for samples in [1, 3, 10] {
            let fused = fused(&|x| two_layers(x, norm, qkv, proj, samples * d.tokens, attention_step(d)));
            assert!(fused == layers, "attention in tiles of {samples} samples");
        }
        assert!(fused(&|x| norm_attention_add(x, norm, qkv, d, proj)) == layers);
    }

    #[test]
    fn mlp_tiles_fit_and_split_evenly() {
        // ViT-S/16's inference on 16 images (2.4 MiB of bf16 weights), AMX: 10 tiles of 320 rows.
        assert_eq!(mlp_tile_rows(16 * 197, 1536, 2 * 384 * 1536 * 2, 32, 2), 320);
        // small28's (0.6 MiB): 34 tiles of 96 rows, each hidden layer within 320 KiB.
        assert_eq!(mlp_tile_rows(64 * 50, 768, 2 * 192 * 768 * 2, 32, 2), 96);
        for step in [12, 16, 32] {
            for threads in [1, 2, 3, 8] {
                for rows in [0, 1, 31, 32, 500, 1576, 3152, 6400, 20_000] {
                    for (h, weights) in [(40, 4 << 10), (768, 600 << 10), (1536, 2400 << 10), (1536, 4800 << 10)] {
                        let tile = mlp_tile_rows(rows, h, weights, step, threads);
                        let middle = if weights > WEIGHTS_IN_L2 { LARGE_MIDDLE_BYTES } else { MIDDLE_BYTES };
                        let at = format!("{rows} rows, h {h}, {threads} threads, steps of {step}: tiles of {tile}");
                        assert!(tile > 0 && tile.is_multiple_of(step), "{at}");
                        assert!(rows.div_ceil(tile).is_multiple_of(threads) || tile == step, "{at}");
                        assert!(4 * h * tile <= middle.max(4 * h * step), "{at}");
                    }
                }
            }
        }
    }

    #[test]
    fn attention_tiles_fit_in_l2() {
        // ViT-Ti/4 on 28 px (50 tokens, D 192): two samples; ViT-S/16 on 224 px: one.
        assert_eq!(attention_tile_samples(AttentionDims { batch: 64, tokens: 50, heads: 3, head_dim: 64 }), 2);
        assert_eq!(attention_tile_samples(AttentionDims { batch: 16, tokens: 197, heads: 6, head_dim: 64 }), 1);
    }
}
