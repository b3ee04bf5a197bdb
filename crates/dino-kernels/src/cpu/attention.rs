//! Multi-head self-attention straight from the fused qkv projection.
//!
//! `qkv` `[B, N, 3D]` holds, per token, q, k and v, each `[heads, D/heads]` (the layout of
//! `qkv.reshape(B, N, 3, heads, D/heads)` in `vision_transformer.py`). Each head reads its q, k, v
//! in place with strides and writes its columns of the `[B, N, D]` output, so the permute, split
//! and head-merge copies of the composed version disappear; the backward is closed-form:
//! dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − rowsum(dP ∘ P)) · scale, dQ = dS K, dK = dSᵀ Q.

use std::mem::MaybeUninit;

use gemm::Parallelism;
use rayon::prelude::*;

use super::buffer::{Shared, assume_init};
use super::matmul::gemm;
use super::simd::{dot, exp, max, multiversion, sum};
use crate::shapes::AttentionDims as Dims;

multiversion! {
    fn softmax_rows(s: &mut [f32], n: usize) {
        for row in s.chunks_exact_mut(n) {
            let max = max(row);
            for v in row.iter_mut() {
                *v = exp(*v - max);
            }
            let inv = 1.0 / sum(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// dP (in `ds`) -> dS = P ∘ (dP − rowsum(dP ∘ P)) · scale.
    fn softmax_backward_rows(p: &[f32], ds: &mut [f32], n: usize, scale: f32) {
        for (p, ds) in p.chunks_exact(n).zip(ds.chunks_exact_mut(n)) {
            let d = dot(p, ds);
            for (g, &p) in ds.iter_mut().zip(p) {
                *g = p * (*g - d) * scale;
            }
        }
    }
}

/// One head of one sample: P = softmax(q kᵀ · scale) into `probs` `[N, N]`, P v into `out`
/// (every element of both written). With bf16 products on AMX, `cpu_bf16::attention` runs it
/// (the same bits, a fifth of the time less).
fn head_forward(qkv: &[f32], d: Dims, index: usize, probs: &mut [MaybeUninit<f32>], out: Shared<'_>) {
    let (b, h) = (index / d.heads, index % d.heads);
    let (n, dh, width) = (d.tokens, d.head_dim, d.width());
    let row = 3 * width;
    let base = b * n * row + h * dh;
    assert!(qkv.len() >= base + (n - 1) * row + 2 * width + dh && probs.len() == n * n);
    // SAFETY: the asserts above bound every strided read; `out` has B·N·D elements and this task
    // writes only rows of sample b, columns of head h.
    unsafe {
        let q = qkv.as_ptr().add(base);
        let (k, v) = (q.add(width), q.add(2 * width));
        #[cfg(target_arch = "x86_64")]
        if crate::cpu_bf16::amx_products() {
            let head = crate::cpu_bf16::attention::Head { tokens: n, dim: dh, scale: d.scale() };
            let o = out.at(b * n * width + h * dh);
            return crate::cpu_bf16::attention::head_forward(&head, (q, k, v, row), probs, (o, width));
        }
        let p = probs.as_mut_ptr().cast::<f32>();
        gemm([n, n, dh], (p, n), false, (q, [row, 1]), (k, [1, row]), d.scale(), Parallelism::None);
        // The product above wrote all N·N probabilities.
        let probs = assume_init(probs);
        softmax_rows(probs, n);
        let o = out.at(b * n * width + h * dh);
        gemm([n, dh, n], (o, width), false, (probs.as_ptr(), [n, 1]), (v, [row, 1]), 1.0, Parallelism::None);
    }
}

fn check_input(qkv: &[f32], d: Dims) {
    assert_eq!(qkv.len(), d.batch * d.tokens * 3 * d.width(), "attention: qkv is not [B, N, 3D] for {d:?}");
}

/// `qkv` `[B, N, 3D]` -> (`[B, N, D]`, softmax attention `[B, heads, N, N]` for the backward).
pub fn forward_with_probs(qkv: &[f32], d: Dims) -> (Vec<f32>, Vec<f32>) {
    check_input(qkv, d);
    let n = d.tokens;
    let (out_len, probs_len) = (d.batch * n * d.width(), d.batch * d.heads * n * n);
    let (mut out, mut probs) = (Vec::with_capacity(out_len), Vec::with_capacity(probs_len));
    let shared = Shared::capacity_of(&mut out);
    probs.spare_capacity_mut()[..probs_len]
        .par_chunks_mut(n * n)
        .enumerate()
        .for_each(|(i, p)| head_forward(qkv, d, i, p, shared));
    // SAFETY: each (sample, head) task wrote its N·N probabilities and its head's columns of
    // the sample's output rows; together they cover both buffers.
    unsafe {
        out.set_len(out_len);
        probs.set_len(probs_len);
    }
    (out, probs)
}

/// `qkv` `[B, N, 3D]` -> `[B, N, D]`, keeping no attention matrices (inference).
pub fn forward(qkv: &[f32], d: Dims) -> Vec<f32> {
    check_input(qkv, d);
    let n = d.tokens;
    let out_len = d.batch * n * d.width();
    let mut out = Vec::with_capacity(out_len);
    let shared = Shared::capacity_of(&mut out);
    (0..d.batch * d.heads)
        .into_par_iter()
        .for_each_init(|| vec![MaybeUninit::uninit(); n * n], |p, i| head_forward(qkv, d, i, p, shared));
    // SAFETY: the (sample, head) tasks wrote every column of every output row.
    unsafe { out.set_len(out_len) };
    out
}

/// [`forward`] on the calling thread, into `out` (refilled: `[B, N, D]`), with `probs` as the
/// scratch of each head's attention: for callers that run a task per few samples.
pub fn forward_serial(qkv: &[f32], d: Dims, out: &mut Vec<f32>, probs: &mut Vec<MaybeUninit<f32>>) {
    check_input(qkv, d);
    let (n, out_len) = (d.tokens, d.batch * d.tokens * d.width());
    out.clear();
    out.reserve(out_len);
    probs.resize(n * n, MaybeUninit::uninit());
    let shared = Shared::capacity_of(out);
    for index in 0..d.batch * d.heads {
        head_forward(qkv, d, index, probs, shared);
    }
    // SAFETY: the (sample, head) calls wrote every column of every output row.
    unsafe { out.set_len(out_len) };
}

/// Gradient of [`forward_with_probs`]: `dout` `[B, N, D]` -> dqkv `[B, N, 3D]`.
pub fn backward(qkv: &[f32], probs: &[f32], dout: &[f32], d: Dims) -> Vec<f32> {
    check_input(qkv, d);
    let (n, dh, width) = (d.tokens, d.head_dim, d.width());
    assert_eq!(probs.len(), d.batch * d.heads * n * n, "attention backward: probabilities are not [B, heads, N, N]");
    assert_eq!(dout.len(), d.batch * n * width, "attention backward: gradient is not [B, N, D]");
    let row = 3 * width;
    let mut dqkv = Vec::with_capacity(qkv.len());
    let shared = Shared::capacity_of(&mut dqkv);
    probs.par_chunks(n * n).enumerate().for_each_init(
        // dS's scratch, made on the general path only (rayon calls this once per split).
        Vec::new,
        |ds, (index, p)| {
            let (b, h) = (index / d.heads, index % d.heads);
            let base = b * n * row + h * dh;
            // SAFETY: sizes were checked above; this task writes only the q, k and v columns of
            // head h in sample b of dqkv.
            unsafe {
                let q = qkv.as_ptr().add(base);
                let (k, v) = (q.add(width), q.add(2 * width));
                let go = dout.as_ptr().add(b * n * width + h * dh);
                let dq = shared.at(base);
                let (dk, dv) = (dq.add(width), dq.add(2 * width));
                // With bf16 products on AMX, `cpu_bf16::attention` runs the head (the same bits).
                #[cfg(target_arch = "x86_64")]
                if crate::cpu_bf16::amx_products() {
                    let head = crate::cpu_bf16::attention::Head { tokens: n, dim: dh, scale: d.scale() };
                    let grads = (dq, dk, dv, row);
                    return crate::cpu_bf16::attention::head_backward(&head, (q, k, v, row), p, (go, width), grads);
                }
                ds.resize(n * n, 0.0);
                gemm([n, dh, n], (dv, row), false, (p.as_ptr(), [1, n]), (go, [width, 1]), 1.0, Parallelism::None);
                gemm([n, n, dh], (ds.as_mut_ptr(), n), false, (go, [width, 1]), (v, [1, row]), 1.0, Parallelism::None);
                softmax_backward_rows(p, ds, n, d.scale());
                gemm([n, dh, n], (dq, row), false, (ds.as_ptr(), [n, 1]), (k, [row, 1]), 1.0, Parallelism::None);
                gemm([n, dh, n], (dk, row), false, (ds.as_ptr(), [1, n]), (q, [row, 1]), 1.0, Parallelism::None);
            }
        },
    );
    // SAFETY: each (sample, head) task wrote its q, k and v columns of the sample's rows (gemm
    // without accumulation); together they cover every element.
    unsafe { dqkv.set_len(qkv.len()) };
    dqkv
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain f64 attention: qkv [B, N, 3D] -> [B, N, D].
    fn reference(qkv: &[f64], d: Dims) -> Vec<f64> {
        let (n, dh, w) = (d.tokens, d.head_dim, d.width());
        let at = |b: usize, t: usize, part: usize, h: usize, c: usize| qkv[(b * n + t) * 3 * w + part * w + h * dh + c];
        let mut out = vec![0.0; d.batch * n * w];
        for b in 0..d.batch {
            for h in 0..d.heads {
                for i in 0..n {
                    let s: Vec<f64> = (0..n)
                        .map(|j| {
                            (0..dh).map(|c| at(b, i, 0, h, c) * at(b, j, 1, h, c)).sum::<f64>() / (dh as f64).sqrt()
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..dh {
                        out[(b * n + i) * w + h * dh + c] = (0..n).map(|j| e[j] / z * at(b, j, 2, h, c)).sum();
                    }
                }
            }
        }
        out
    }

    fn data(len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i as u32).wrapping_mul(2654435761) % 2000) as f32 / 1000.0 - 1.0).collect()
    }

    const D: Dims = Dims { batch: 2, tokens: 5, heads: 3, head_dim: 4 };

    #[test]
    fn forward_matches_the_definition() {
        let qkv = data(D.batch * D.tokens * 3 * D.width());
        let expected = reference(&qkv.iter().map(|&v| v as f64).collect::<Vec<_>>(), D);
        let (out, probs) = forward_with_probs(&qkv, D);
        assert_eq!(forward(&qkv, D), out);
        for (a, e) in out.iter().zip(&expected) {
            assert!((*a as f64 - e).abs() < 1e-6, "{a} vs {e}");
        }
        for row in probs.chunks(D.tokens) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let qkv = data(D.batch * D.tokens * 3 * D.width());
        let dout = data(D.batch * D.tokens * D.width()).iter().map(|v| v * 0.7 + 0.1).collect::<Vec<_>>();
        let (_, probs) = forward_with_probs(&qkv, D);
        let grad = backward(&qkv, &probs, &dout, D);
        let x64: Vec<f64> = qkv.iter().map(|&v| v as f64).collect();
        let loss = |x: &[f64]| -> f64 { reference(x, D).iter().zip(&dout).map(|(o, g)| o * *g as f64).sum() };
        let h = 1e-6;
        for (i, &g) in grad.iter().enumerate() {
            let (mut p, mut m) = (x64.clone(), x64.clone());
            p[i] += h;
            m[i] -= h;
            let num = (loss(&p) - loss(&m)) / (2.0 * h);
            assert!((g as f64 - num).abs() < 1e-5 * (1.0 + num.abs()), "dqkv[{i}] = {g}, numeric {num}");
        }
    }
}
