//! One attention head on AMX tiles: S = q kᵀ, P = softmax(S · scale), P v, with q, k and v read
//! from the fused qkv projection and packed once for the head's two products.
//!
//! Through the general product a head of ViT-S/16 (197 tokens, width 64) cost 48 µs in its two
//! products (210-290 GFLOP/s a core, against 1000-1300 for the layers: kᵀ packed column by
//! column, buffers for seven row tasks, the scale through a staged epilogue on every tile) and
//! 22 µs in its softmax. Here, about 57 µs in all (one core, Sapphire Rapids):
//! - q, k and v are converted once: q into A rows, k into rows transposed into kᵀ's panels, v
//!   into B panels;
//! - queries go 32 at a time: their rows of S from the tiles, stored in place (rows padded to
//!   whole tiles, on cache lines), their softmax, then their rows of P v, so S and P stay in L1;
//! - the softmax reads S and applies the scale itself, and writes P in f32 (the caller's, for
//!   the backward) and as bf16 A rows, in three passes.
//!
//! The tiles add in the order of the general product (the same tile rows, k-pairs and steps),
//! and the scale, softmax and roundings are the same operations, so the result has its bits
//! (tested).

use std::cell::RefCell;
use std::mem::MaybeUninit;

use super::amx::{self, PAIRS, ROWS};
use super::convert::{interleave_rows, pairs_of};
use super::gemm::Aligned;
use super::microkernel::{NR, Out};
use crate::cpu::simd::{exp, max};

/// A head's sizes and softmax scale.
pub(crate) struct Head {
    /// Tokens (rows of q, k, v and S).
    pub tokens: usize,
    /// Values per token in the head (columns of q, k, v).
    pub dim: usize,
    /// The softmax scale.
    pub scale: f32,
}

const _: () = assert!(ROWS == NR, "a row tile of k is one panel of kᵀ");

/// Per-thread buffers: q and P as A rows, kᵀ and v as B panels, S.
#[derive(Default)]
struct Buffers {
    q: Aligned,
    k: Aligned,
    v: Aligned,
    p: Aligned,
    s: Aligned,
    rows: Vec<u32>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}

/// `probs` = softmax(q kᵀ · scale) (`[tokens, tokens]`, row-major, every value written) and
/// `out` = probs · v (rows `out_rs` apart), q, k and v being `[tokens, dim]` with rows `qkv_rs`
/// apart.
///
/// # Safety
/// [`amx::usable`] must have returned true; `q`, `k` and `v` must address their matrices under
/// `qkv_rs`, and `out` `tokens` rows of `dim` writable values `out_rs` apart.
pub(crate) unsafe fn head_forward(
    head: &Head,
    (q, k, v, qkv_rs): (*const f32, *const f32, *const f32, usize),
    probs: &mut [MaybeUninit<f32>],
    (out, out_rs): (*mut f32, usize),
) {
    let Head { tokens: n, dim, scale } = *head;
    assert_eq!(probs.len(), n * n, "attention: probabilities are not [tokens, tokens]");
    if n == 0 || dim == 0 {
        return;
    }
    // Rows and columns of S in whole tiles; pairs of the head's width and of the tokens in
    // whole tile rows (zeros past the values).
    let padded_n = n.next_multiple_of(ROWS);
    let dim_pairs = dim.div_ceil(2).next_multiple_of(PAIRS);
    let token_pairs = n.div_ceil(2).next_multiple_of(PAIRS);
    let panels = dim.div_ceil(NR);
    BUFFERS.with(|buffers| {
        let Buffers { q: qa, k: kb, v: vb, p: pa, s, rows } = &mut *buffers.borrow_mut();
        qa.grow(padded_n * dim_pairs);
        kb.grow(padded_n * dim_pairs);
        s.grow(ROWS * padded_n);
        pa.grow(ROWS * token_pairs);
        vb.grow(panels * token_pairs * NR);
        // SAFETY (the reads): the caller's contract bounds q, k and v's rows.
        let row_of = |m: *const f32, i: usize| unsafe { std::slice::from_raw_parts(m.add(i * qkv_rs), dim) };
        // q as A rows, k as rows to be transposed into kᵀ's panels.
        rows.resize(ROWS * dim_pairs, 0);
        for i in 0..padded_n {
            let qa = &mut qa[i * dim_pairs..][..dim_pairs];
            if i < n {
                pairs_row(row_of(q, i), qa);
            } else {
                qa.fill(0);
            }
            let r = &mut rows[(i % ROWS) * dim_pairs..][..dim_pairs];
            if i < n {
                pairs_row(row_of(k, i), r);
            } else {
                r.fill(0);
            }
            if i % ROWS == ROWS - 1 {
                transpose_panel(rows, dim_pairs, &mut kb[(i / ROWS) * dim_pairs * NR..][..dim_pairs * NR]);
            }
        }
        // v as B panels: pairs of tokens by NR of the head's columns.
        for (c, panel) in vb[..panels * token_pairs * NR].chunks_exact_mut(token_pairs * NR).enumerate() {
            let (c0, cols) = (c * NR, NR.min(dim - c * NR));
            let (values, padding) = panel.split_at_mut(n.div_ceil(2) * NR);
            // SAFETY: rows 0..n of v hold columns c0..c0 + cols.
            let v_rows = unsafe { std::slice::from_raw_parts(v.add(c0), (n - 1) * qkv_rs + cols) };
            if cols < NR {
                values.fill(0);
            }
            interleave_rows::<NR>(v_rows, qkv_rs, n, cols, values);
            padding.fill(0);
        }
        // Row tile by row tile of 32 queries: their S (32 x padded_n), their P, then their
        // rows of P v, so that S and P stay in L1 from the tiles to the softmax and back.
        let s_ptr = s.as_mut_ptr() as *mut f32;
        for t in 0..padded_n / ROWS {
            let r0 = t * ROWS;
            // S's rows, each tile stored in place (S's rows are whole tiles on cache lines).
            for j in 0..padded_n / NR {
                // SAFETY: the tile lies inside S; q's rows and kᵀ's panel hold `dim_pairs`.
                let ptr = unsafe { s_ptr.add(j * NR) };
                let tile =
                    Out { ptr, rs: padded_n, rows: ROWS, cols: NR, add: false, scale: 1.0, bias: std::ptr::null() };
                let (a, b) = (qa[r0 * dim_pairs..].as_ptr(), kb[j * dim_pairs * NR..].as_ptr());
                // SAFETY: the caller's contract (AMX granted); the pointers bound every access.
                unsafe { amx::tile(dim_pairs / PAIRS, a, dim_pairs, b, tile) };
            }
            // P = softmax(S · scale), as f32 (the caller's) and as bf16 A rows.
            for i in 0..ROWS {
                let pa = &mut pa[i * token_pairs..][..token_pairs];
                if r0 + i >= n {
                    pa.fill(0);
                    continue;
                }
                // SAFETY: row i of S holds n written sums (of the padded_n).
                let s_row = unsafe { std::slice::from_raw_parts(s_ptr.add(i * padded_n), n) };
                softmax_row(s_row, scale, &mut probs[(r0 + i) * n..][..n], pa);
            }
            // Their rows of out = P v.
            for c in 0..panels {
                let c0 = c * NR;
                // SAFETY: rows r0.. (at most ROWS, fewer at the end) of out hold columns c0..
                let ptr = unsafe { out.add(r0 * out_rs + c0) };
                let (rows, cols) = (ROWS.min(n - r0), NR.min(dim - c0));
                let tile = Out { ptr, rs: out_rs, rows, cols, add: false, scale: 1.0, bias: std::ptr::null() };
                let b = vb[c * token_pairs * NR..].as_ptr();
                // SAFETY: as above.
                unsafe { amx::tile(token_pairs / PAIRS, pa.as_ptr(), token_pairs, b, tile) };
            }
        }
    });
}

crate::cpu::simd::multiversion! {
    /// `probs` = softmax(`scale` · `s`) for one row, and the probabilities as bf16 pairs into
    /// `pairs` (zeros past them), with the arithmetic of the f32 softmax on the scaled row
    /// (`cpu::attention::softmax_rows`: the same maximum, 16-lane sum and normalisation) in
    /// fewer passes. The maximum is taken before scaling: rounding `scale · s` (scale > 0) never
    /// reverses an order, so the largest scaled value is the scaled largest one.
    fn softmax_row(s: &[f32], scale: f32, probs: &mut [MaybeUninit<f32>], pairs: &mut [u32]) {
        assert!(scale > 0.0 && s.len() == probs.len(), "softmax: a positive scale, rows of one length");
        let max = scale * max(s);
        let mut lanes = [0.0f32; 16];
        let (whole, rest) = probs.as_chunks_mut::<16>();
        let (s_whole, s_rest) = s.as_chunks::<16>();
        for (chunk, s) in whole.iter_mut().zip(s_whole) {
            for ((l, p), &s) in lanes.iter_mut().zip(chunk).zip(s) {
                let e = exp(scale * s - max);
                p.write(e);
                *l += e;
            }
        }
        rest.iter_mut().zip(s_rest).for_each(|(p, &s)| _ = p.write(exp(scale * s - max)));
        // SAFETY: every value was written just above.
        let probs = unsafe { crate::cpu::buffer::assume_init(probs) };
        let tail: f32 = probs[whole_len(s.len())..].iter().sum();
        let inv = 1.0 / (lanes.iter().sum::<f32>() + tail);
        probs.iter_mut().for_each(|v| *v *= inv);
        pairs_row(probs, pairs);
    }
}

/// The values of a row in whole chunks of 16.
#[inline(always)]
fn whole_len(len: usize) -> usize {
    len - len % 16
}

/// A row of values as bf16 pairs, zeros past them.
fn pairs_row(values: &[f32], out: &mut [u32]) {
    let (pairs, padding) = out.split_at_mut(values.len().div_ceil(2));
    pairs_of(values, pairs);
    padding.fill(0);
}

crate::cpu::simd::multiversion! {
    /// `panel[p][j] = rows[j][p]`: `ROWS` rows of `pairs` into a `[pairs][NR]` B panel.
    fn transpose_panel(rows: &[u32], pairs: usize, panel: &mut [u32]) {
        for (p, out) in panel.chunks_exact_mut(NR).enumerate() {
            out.iter_mut().enumerate().for_each(|(j, o)| *o = rows[j * pairs + p]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Path, gemm_bf16};
    use super::*;

    /// The head gives the bits of the general product on AMX (two products and the softmax
    /// between), for token counts and head widths on and off the tiles' edges.
    #[test]
    fn a_head_gives_the_bits_of_the_general_product() {
        if !Path::available().contains(&Path::Amx) {
            return println!("no AMX here: nothing to compare");
        }
        for (n, dim) in [(197, 64), (50, 64), (32, 32), (5, 48), (70, 96), (1, 8)] {
            let (width, heads) = (2 * dim, 2);
            let row = 3 * width;
            let qkv = crate::cpu::test_data(n * row, n as u32, 2.0);
            let scale = (dim as f32).powf(-0.5);
            for h in 0..heads {
                let q = qkv[h * dim..].as_ptr();
                let (k, v) = (q.wrapping_add(width), q.wrapping_add(2 * width));
                let mut probs = vec![MaybeUninit::uninit(); n * n];
                let mut out = vec![0.0; n * width];
                let head = Head { tokens: n, dim, scale };
                unsafe { head_forward(&head, (q, k, v, row), &mut probs, (out[h * dim..].as_mut_ptr(), width)) };
                let probs: Vec<f32> = probs.iter().map(|p| unsafe { p.assume_init() }).collect();

                let (mut expected_p, mut expected) = (vec![0.0; n * n], vec![0.0; n * width]);
                unsafe {
                    gemm_bf16(
                        Path::Amx,
                        [n, n, dim],
                        (expected_p.as_mut_ptr(), n),
                        false,
                        (q, [row, 1]),
                        (k, [1, row]),
                        scale,
                        1,
                    );
                    crate::cpu::attention::softmax_rows(&mut expected_p, n);
                    let o = expected[h * dim..].as_mut_ptr();
                    gemm_bf16(
                        Path::Amx,
                        [n, dim, n],
                        (o, width),
                        false,
                        (expected_p.as_ptr(), [n, 1]),
                        (v, [row, 1]),
                        1.0,
                        1,
                    );
                }
                let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same(&probs, &expected_p), "probabilities of {n} tokens, width {dim}, head {h}");
                assert!(same(&out, &expected), "output of {n} tokens, width {dim}, head {h}");
            }
        }
    }
}
