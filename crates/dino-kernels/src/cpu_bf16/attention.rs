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
//!   the backward) and as bf16 A rows, in three passes on AVX-512 (its maximum in four chains,
//!   `exp`'s last step one `vscalefps`, the normalisation in the conversion's pass): 46 µs a
//!   head against 53 with the compiler's vectors of the scalar code.
//!
//! The tiles add in the order of the general product (the same tile rows, k-pairs and steps),
//! and the scale, softmax and roundings are the same operations, so the result has its bits
//! (tested).

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

use super::amx::{self, PAIRS, ROWS};
use super::convert::{interleave_rows, pairs_of, scaled_pairs_of};
use super::gemm::Aligned;
use super::microkernel::{NR, Out, lanes};
use crate::cpu::simd::{EXP_LN2, EXP_POLYNOMIAL, EXP_RANGE};

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

/// Per-thread buffers of the forward: q and P as A rows, kᵀ and v as B panels, S.
#[derive(Default)]
struct Buffers {
    q: Aligned,
    k: Aligned,
    v: Aligned,
    p: Aligned,
    s: Aligned,
    rows: Vec<u32>,
}

/// Per-thread buffers of the backward: A rows (Pᵀ, dO, dS, dSᵀ), B panels (dO, vᵀ, k, q), dS,
/// and rows to transpose.
#[derive(Default)]
struct BackwardBuffers {
    a: [Aligned; 4],
    b: [Aligned; 4],
    ds: Aligned,
    rows: Vec<u32>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
    static BACKWARD: RefCell<BackwardBuffers> = RefCell::new(BackwardBuffers::default());
}

/// A head's sizes in whole tiles: tokens padded to tile rows, and the pairs of the head's width
/// and of the tokens padded to whole tile rows (zeros past the values).
#[derive(Clone, Copy)]
struct Padded {
    n: usize,
    dim_pairs: usize,
    token_pairs: usize,
    panels: usize,
}

impl Padded {
    fn of(&Head { tokens, dim, .. }: &Head) -> Self {
        Padded {
            n: tokens.next_multiple_of(ROWS),
            dim_pairs: dim.div_ceil(2).next_multiple_of(PAIRS),
            token_pairs: tokens.div_ceil(2).next_multiple_of(PAIRS),
            panels: dim.div_ceil(NR),
        }
    }
}

/// A matrix the head reads: its first value and row stride (unit column stride).
type Rows = (*const f32, usize);

/// Rows `r0..r0 + out.len() / pairs` of `m` (`[n, len]`) as A rows of `pairs` (zeros past `len`
/// values and past row n).
///
/// # Safety
/// `m` must address `n` rows of `len` values.
unsafe fn a_rows((m, rs): Rows, r0: usize, [n, len]: [usize; 2], pairs: usize, out: &mut [u32]) {
    for (i, out) in out.chunks_exact_mut(pairs).enumerate() {
        if r0 + i < n {
            // SAFETY: the caller's contract.
            pairs_row(unsafe { std::slice::from_raw_parts(m.add((r0 + i) * rs), len) }, out);
        } else {
            out.fill(0);
        }
    }
}

/// `m` (`[n, len]`) transposed into B panels: panel t holds rows `32t..` as `[pairs][NR]`, pair
/// p of row j at `[p][j]` (what `mᵀ`'s columns pack into), through `rows`.
///
/// # Safety
/// As [`a_rows`].
unsafe fn transposed_panels(m: Rows, [n, len]: [usize; 2], pairs: usize, rows: &mut Vec<u32>, out: &mut [u32]) {
    rows.resize(ROWS * pairs, 0);
    for (t, panel) in out.chunks_exact_mut(pairs * NR).take(n.div_ceil(ROWS)).enumerate() {
        // SAFETY: the caller's contract.
        unsafe { a_rows(m, t * ROWS, [n, len], pairs, rows) };
        // SAFETY: AMX implies AVX-512 F (the caller's contract).
        unsafe { transpose(rows, pairs, panel) };
    }
}

/// Columns `c0..c0 + cols` (at most NR) of `m` (`[n, ..]`) as one B panel `[pairs][NR]`: pairs
/// of rows by columns (zeros past them).
///
/// # Safety
/// `m` must address `n` rows holding columns `c0..c0 + cols`.
unsafe fn panel((m, rs): Rows, n: usize, (c0, cols): (usize, usize), out: &mut [u32]) {
    let (values, padding) = out.split_at_mut(n.div_ceil(2) * NR);
    // SAFETY: the caller's contract.
    let rows = unsafe { std::slice::from_raw_parts(m.add(c0), (n - 1) * rs + cols) };
    if cols < NR {
        values.fill(0);
    }
    interleave_rows::<NR>(rows, rs, n, cols, values);
    padding.fill(0);
}

/// `m` (`[n, width]`) as B panels of `pairs` pairs of rows by NR columns.
///
/// # Safety
/// `m` must address `n` rows of `width` values.
unsafe fn b_panels(m: Rows, [n, width]: [usize; 2], pairs: usize, out: &mut [u32]) {
    for (c, out) in out.chunks_exact_mut(pairs * NR).take(width.div_ceil(NR)).enumerate() {
        // SAFETY: the caller's contract.
        unsafe { panel(m, n, (c * NR, NR.min(width - c * NR)), out) };
    }
}

/// `mᵀ` for `m` `[n, width]` as A rows of `pairs` pairs (of m's rows), `width` padded to whole
/// tiles: m's columns packed as B panels are, each panel transposed, through `rows`.
///
/// # Safety
/// As [`b_panels`].
unsafe fn transposed_rows(m: Rows, [n, width]: [usize; 2], pairs: usize, rows: &mut Vec<u32>, out: &mut [u32]) {
    rows.resize(pairs * NR, 0);
    for (c, out) in out.chunks_exact_mut(ROWS * pairs).take(width.div_ceil(NR)).enumerate() {
        // SAFETY: the caller's contract.
        unsafe { panel(m, n, (c * NR, NR.min(width - c * NR)), rows) };
        // SAFETY: as above.
        unsafe { transpose(rows, NR, out) };
    }
}

/// `out` = a tile of A rows (`[ROWS][pairs]`) times every B panel (`[pairs][NR]`, `cols`
/// columns in all): `rows` rows of `cols` values, `out_rs` apart.
///
/// # Safety
/// [`amx::usable`] must have returned true; `out` must address the rows and columns.
unsafe fn row_tile(a: &[u32], pairs: usize, b: &[u32], (rows, cols): (usize, usize), (out, out_rs): (*mut f32, usize)) {
    assert!(a.len() >= ROWS * pairs && b.len() >= cols.div_ceil(NR) * pairs * NR, "whole tiles of packed pairs");
    for c in 0..cols.div_ceil(NR) {
        // SAFETY: the caller's contract.
        let ptr = unsafe { out.add(c * NR) };
        let tile =
            Out { ptr, rs: out_rs, rows, cols: NR.min(cols - c * NR), add: false, scale: 1.0, bias: std::ptr::null() };
        // SAFETY: the caller's contract and the assert bound every access.
        unsafe { amx::tile(pairs / PAIRS, a.as_ptr(), pairs, b[c * pairs * NR..].as_ptr(), tile) };
    }
}

/// `out` (`[rows, cols]`, rows `out_rs` apart) = A rows (`[padded rows][pairs]`) times B panels.
///
/// # Safety
/// As [`row_tile`].
unsafe fn product(a: &[u32], pairs: usize, b: &[u32], (rows, cols): (usize, usize), (out, out_rs): (*mut f32, usize)) {
    for r0 in (0..rows).step_by(ROWS) {
        // SAFETY: the caller's contract.
        unsafe {
            let at = out.add(r0 * out_rs);
            row_tile(&a[r0 * pairs..], pairs, b, (ROWS.min(rows - r0), cols), (at, out_rs))
        };
    }
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
    let &Head { tokens: n, dim, scale } = head;
    assert_eq!(probs.len(), n * n, "attention: probabilities are not [tokens, tokens]");
    if n == 0 || dim == 0 {
        return;
    }
    let Padded { n: padded_n, dim_pairs, token_pairs, panels } = Padded::of(head);
    BUFFERS.with(|buffers| {
        let Buffers { q: qa, k: kb, v: vb, p: pa, s, rows } = &mut *buffers.borrow_mut();
        qa.grow(padded_n * dim_pairs);
        kb.grow(padded_n * dim_pairs);
        s.grow(ROWS * padded_n);
        pa.grow(ROWS * token_pairs);
        vb.grow(panels * token_pairs * NR);
        // SAFETY: the caller's contract bounds q, k and v's rows.
        unsafe {
            a_rows((q, qkv_rs), 0, [n, dim], dim_pairs, &mut qa[..padded_n * dim_pairs]);
            transposed_panels((k, qkv_rs), [n, dim], dim_pairs, rows, kb);
            b_panels((v, qkv_rs), [n, dim], token_pairs, vb);
        }
        // Row tile by row tile of 32 queries: their S (32 x padded_n), their P, then their
        // rows of P v, so that S and P stay in L1 from the tiles to the softmax and back.
        let s_ptr = s.as_mut_ptr() as *mut f32;
        for r0 in (0..padded_n).step_by(ROWS) {
            // S's rows, each tile stored in place (S's rows are whole tiles on cache lines).
            // SAFETY: the caller's contract (AMX granted); S holds ROWS rows of padded_n.
            unsafe { row_tile(&qa[r0 * dim_pairs..], dim_pairs, kb, (ROWS, padded_n), (s_ptr, padded_n)) };
            // P = softmax(S · scale), as f32 (the caller's) and as bf16 A rows, 4 rows at a time.
            // Rows of P past the tokens keep what they held: they make rows of P v that are not
            // stored, so zeroing them was work for nothing.
            let (tile_pa, valid, mut i) = (&mut pa[..ROWS * token_pairs], ROWS.min(n - r0), 0);
            while i < valid {
                let rows = if i + SOFTMAX_ROWS <= valid { SOFTMAX_ROWS } else { 1 };
                let pa = &mut tile_pa[i * token_pairs..][..rows * token_pairs];
                let probs = &mut probs[(r0 + i) * n..][..rows * n];
                // SAFETY: rows i.. of S hold n written sums each (of the padded_n); AMX implies
                // AVX-512 F (`amx::usable`).
                unsafe {
                    let s = std::slice::from_raw_parts(s_ptr.add(i * padded_n), (rows - 1) * padded_n + n);
                    match rows {
                        SOFTMAX_ROWS => softmax_rows::<SOFTMAX_ROWS>((s, padded_n), scale, probs, pa),
                        _ => softmax_rows::<1>((s, padded_n), scale, probs, pa),
                    }
                }
                i += rows;
            }
            // Their rows of out = P v.
            // SAFETY: rows r0.. (at most ROWS, fewer at the end) of out hold `dim` values.
            unsafe { row_tile(pa, token_pairs, vb, (ROWS.min(n - r0), dim), (out.add(r0 * out_rs), out_rs)) };
        }
    });
}

/// The gradients of [`head_forward`]'s q, k and v from its probabilities `probs` and the
/// gradient `go` of its output (rows `go_rs` apart), into `dq`, `dk` and `dv` (`[tokens, dim]`
/// each, rows `d_rs` apart, every value written): dV = Pᵀ dO, dP = dO vᵀ, dS = P ∘ (dP −
/// rowsum(dP ∘ P)) · scale, dQ = dS k, dK = dSᵀ q, as `cpu::attention::backward`.
///
/// Each operand is converted once, as the general product converts it (the same pairs, the
/// same zeros past them), the tiles add in its order and dS is `cpu::attention`'s: the same
/// bits (tested). kᵀ, vᵀ, Pᵀ and dSᵀ go through 16 x 16 transposes in vector registers: element
/// by element they left this no faster than the general product's four calls. A head's
/// backward at ViT-S/16's sizes, 2 threads: 117 -> 90 µs (197 tokens), 16 -> 14 (37).
///
/// # Safety
/// [`amx::usable`] must have returned true; `q`, `k`, `v` and `go` must address their
/// `[tokens, dim]` matrices, and `dq`, `dk`, `dv` `tokens` rows of `dim` writable values.
pub(crate) unsafe fn head_backward(
    head: &Head,
    (q, k, v, qkv_rs): (*const f32, *const f32, *const f32, usize),
    probs: &[f32],
    go: Rows,
    (dq, dk, dv, d_rs): (*mut f32, *mut f32, *mut f32, usize),
) {
    let &Head { tokens: n, dim, scale } = head;
    assert_eq!(probs.len(), n * n, "attention backward: probabilities are not [tokens, tokens]");
    if n == 0 || dim == 0 {
        return;
    }
    let Padded { n: padded_n, dim_pairs, token_pairs, panels } = Padded::of(head);
    BACKWARD.with(|buffers| {
        let BackwardBuffers { a: [pt, go_a, ds_a, dst], b: [go_b, vt, kb, qb], ds, rows } = &mut *buffers.borrow_mut();
        for m in [&mut *pt, ds_a, dst] {
            m.grow(padded_n * token_pairs);
        }
        go_a.grow(padded_n * dim_pairs);
        vt.grow(padded_n * dim_pairs);
        for m in [&mut *go_b, kb, qb] {
            m.grow(panels * token_pairs * NR);
        }
        ds.grow(padded_n * padded_n);
        let ds = ds.as_mut_ptr() as *mut f32;
        // SAFETY (all): the caller's contract bounds q, k, v, go and the gradients' rows; the
        // buffers were grown to hold what is written into them; AMX was granted.
        unsafe {
            // dV = Pᵀ dO.
            transposed_rows((probs.as_ptr(), n), [n, n], token_pairs, rows, pt);
            b_panels(go, [n, dim], token_pairs, go_b);
            product(pt, token_pairs, go_b, (n, dim), (dv, d_rs));
            // dP = dO vᵀ, in whole tiles (S's layout in the forward), then dS in place.
            a_rows(go, 0, [n, dim], dim_pairs, &mut go_a[..padded_n * dim_pairs]);
            transposed_panels((v, qkv_rs), [n, dim], dim_pairs, rows, vt);
            product(go_a, dim_pairs, vt, (padded_n, padded_n), (ds, padded_n));
            for i in 0..n {
                let ds = std::slice::from_raw_parts_mut(ds.add(i * padded_n), n);
                crate::cpu::attention::softmax_backward_rows(&probs[i * n..][..n], ds, n, scale);
            }
            // dQ = dS k and dK = dSᵀ q.
            a_rows((ds, padded_n), 0, [n, n], token_pairs, &mut ds_a[..padded_n * token_pairs]);
            b_panels((k, qkv_rs), [n, dim], token_pairs, kb);
            product(ds_a, token_pairs, kb, (n, dim), (dq, d_rs));
            transposed_rows((ds, padded_n), [n, n], token_pairs, rows, dst);
            b_panels((q, qkv_rs), [n, dim], token_pairs, qb);
            product(dst, token_pairs, qb, (n, dim), (dk, d_rs));
        }
    });
}

/// Rows of a softmax run together: each row's passes end in a reduction (its maximum, its sum)
/// that the next pass waits for, and one row at a time left the core waiting on those chains
/// (a 197-token head, one thread, best of 7 x 5000: 45 µs a row at a time, 41.5 with 4
/// rows, 42-43 with 2 or 8).
const SOFTMAX_ROWS: usize = 4;

/// `probs` = softmax(`scale` · `s`) for `R` rows (`s`'s rows `rs` apart, `probs`' of its
/// length n), and the probabilities as bf16 pairs into `pairs` (`R` rows of equal length,
/// zeros past the pairs), with the arithmetic of the f32 softmax on each scaled row
/// (`cpu::attention::softmax_rows`: the same maximum, `exp`, 16-lane sum and normalisation) in
/// fewer passes, on AVX-512 (which AMX implies), the rows' passes interleaved. The maximum is
/// taken before scaling: rounding `scale · s` (scale > 0) never reverses an order, so the
/// largest scaled value is the scaled largest one.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn softmax_rows<const R: usize>(
    (s, rs): (&[f32], usize),
    scale: f32,
    probs: &mut [MaybeUninit<f32>],
    pairs: &mut [u32],
) {
    let n = probs.len() / R;
    assert!(scale > 0.0 && probs.len() == R * n && n > 0, "softmax: a positive scale, {R} rows of one length");
    assert!(s.len() >= (R - 1) * rs + n && rs >= n && pairs.len().is_multiple_of(R), "softmax: rows of s and pairs");
    let whole = whole_len(n);
    let (s, p) = (s.as_ptr(), probs.as_mut_ptr() as *mut f32);
    // SAFETY (all): loads and stores stay in the first `n` values of each row of `s` and
    // `probs` (the tails through masks).
    unsafe {
        let max: [f32; R] = std::array::from_fn(|r| scale * max_of(s.add(r * rs), n));
        let (scale_v, max_v) = (_mm512_set1_ps(scale), max.map(|m| _mm512_set1_ps(m)));
        let exp_at = |r: usize, i: usize, mask: __mmask16| {
            exp16(_mm512_sub_ps(_mm512_mul_ps(scale_v, _mm512_maskz_loadu_ps(mask, s.add(r * rs + i))), max_v[r]))
        };
        let mut sum = [_mm512_setzero_ps(); R];
        for i in (0..whole).step_by(16) {
            for (r, sum) in sum.iter_mut().enumerate() {
                let e = exp_at(r, i, 0xffff);
                _mm512_storeu_ps(p.add(r * n + i), e);
                *sum = _mm512_add_ps(*sum, e);
            }
        }
        let rest = lanes(n - whole);
        for (r, pairs) in pairs.chunks_exact_mut(pairs.len() / R).enumerate() {
            let e = exp_at(r, whole, rest);
            _mm512_mask_storeu_ps(p.add(r * n + whole), rest, e);
            // The sums in the f32 softmax's order: the 16 lanes one after the other, then the
            // tail (read back from a whole store: a masked one does not forward to loads).
            let (mut sums, mut tail) = ([0.0f32; 16], [0.0f32; 16]);
            _mm512_storeu_ps(sums.as_mut_ptr(), sum[r]);
            _mm512_storeu_ps(tail.as_mut_ptr(), e);
            let tail: f32 = tail[..n - whole].iter().sum();
            let inv = 1.0 / (sums.iter().sum::<f32>() + tail);
            let (pairs, padding) = pairs.split_at_mut(n.div_ceil(2));
            scaled_pairs_of(std::slice::from_raw_parts_mut(p.add(r * n), n), inv, pairs);
            padding.fill(0);
        }
    }
}

/// The largest of `n` values at `s` (-inf for none), as [`crate::cpu::simd::max`] finds it, in
/// four independent chains of comparisons rather than one.
///
/// # Safety
/// The CPU must have AVX-512 F; `s` must address `n` values.
#[target_feature(enable = "avx512f")]
unsafe fn max_of(s: *const f32, n: usize) -> f32 {
    // `_mm512_max_ps(v, m)` is `v > m ? v : m`, the comparison of `simd::max`: a NaN is never taken.
    let low = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut m = [low; 4];
    let mut i = 0;
    // SAFETY: every load lies in the `n` values (the last through a mask).
    unsafe {
        while i + 64 <= n {
            for (j, m) in m.iter_mut().enumerate() {
                *m = _mm512_max_ps(_mm512_loadu_ps(s.add(i + 16 * j)), *m);
            }
            i += 64;
        }
        while i < n {
            m[0] = _mm512_max_ps(_mm512_mask_loadu_ps(low, lanes(n - i), s.add(i)), m[0]);
            i += 16;
        }
    }
    let m = _mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3]));
    _mm512_reduce_max_ps(m)
}

/// [`crate::cpu::simd::exp`] of 16 values, its operations one for one but the last: `y · 2^n`
/// by `vscalefps`, exact where 2^n is a normal number, as it is for every n the clamp lets
/// through (-126..=127), so the same bits.
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    let c = _mm512_set1_ps;
    let [p0, p1, p2, p3, p4, p5] = EXP_POLYNOMIAL;
    // SAFETY: the caller has AVX-512 F (every caller enables it).
    unsafe {
        // f32::clamp: `x < lo ? lo : x`, then `x > hi ? hi : x` (a NaN passes).
        let x = _mm512_min_ps(c(EXP_RANGE.1), _mm512_max_ps(c(EXP_RANGE.0), x));
        let n = _mm512_fmadd_ps(x, c(std::f32::consts::LOG2_E), c(0.5));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(n);
        let r = _mm512_fmadd_ps(n, c(EXP_LN2.1), _mm512_fmadd_ps(n, c(EXP_LN2.0), x));
        let mut p = _mm512_fmadd_ps(r, c(p0), c(p1));
        p = _mm512_fmadd_ps(p, r, c(p2));
        p = _mm512_fmadd_ps(p, r, c(p3));
        p = _mm512_fmadd_ps(p, r, c(p4));
        p = _mm512_fmadd_ps(p, r, c(p5));
        let y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), c(1.0));
        _mm512_scalef_ps(y, n)
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

/// `out[c][r] = m[r][c]`: `m` `[rows][cols]` transposed into `out` (`rows · cols` values), in
/// blocks of 16 x 16 through vector registers (both sides whole blocks: rows of tiles, pairs in
/// whole tile rows). Element by element, the strided reads made this a tenth of a head's
/// backward.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn transpose(m: &[u32], cols: usize, out: &mut [u32]) {
    let rows = m.len() / cols;
    assert!(rows.is_multiple_of(16) && cols.is_multiple_of(16) && out.len() >= m.len(), "whole 16 x 16 blocks");
    for r0 in (0..rows).step_by(16) {
        for c0 in (0..cols).step_by(16) {
            // SAFETY: the block's 16 rows of 16 lie in `m`, its 16 columns' 16 values in `out`.
            unsafe {
                let r: [__m512i; 16] =
                    std::array::from_fn(|i| _mm512_loadu_si512(m.as_ptr().add((r0 + i) * cols + c0).cast()));
                // Per 128-bit lane: pairs of rows interleaved, then fours; `u[4k + j]`'s lane L
                // holds column 4L + j of rows 4k..4k + 4.
                let t: [__m512i; 16] = std::array::from_fn(|i| {
                    let (a, b) = (r[i & !1], r[i | 1]);
                    if i % 2 == 0 { _mm512_unpacklo_epi32(a, b) } else { _mm512_unpackhi_epi32(a, b) }
                });
                let u: [__m512i; 16] = std::array::from_fn(|i| {
                    let (k, j) = (i / 4, i % 4);
                    let (a, b) = (t[4 * k + j / 2], t[4 * k + 2 + j / 2]);
                    if j % 2 == 0 { _mm512_unpacklo_epi64(a, b) } else { _mm512_unpackhi_epi64(a, b) }
                });
                // Then the lanes: column 4L + j gathers lane L of u[j], u[4 + j], u[8 + j], u[12 + j].
                for j in 0..4 {
                    let (g0, g1, h0, h1) = (u[j], u[4 + j], u[8 + j], u[12 + j]);
                    let (v_even, v_odd) = (_mm512_shuffle_i32x4::<0x88>(g0, g1), _mm512_shuffle_i32x4::<0xdd>(g0, g1));
                    let (w_even, w_odd) = (_mm512_shuffle_i32x4::<0x88>(h0, h1), _mm512_shuffle_i32x4::<0xdd>(h0, h1));
                    let columns = [
                        (j, _mm512_shuffle_i32x4::<0x88>(v_even, w_even)),
                        (4 + j, _mm512_shuffle_i32x4::<0x88>(v_odd, w_odd)),
                        (8 + j, _mm512_shuffle_i32x4::<0xdd>(v_even, w_even)),
                        (12 + j, _mm512_shuffle_i32x4::<0xdd>(v_odd, w_odd)),
                    ];
                    for (c, column) in columns {
                        _mm512_storeu_si512(out.as_mut_ptr().add((c0 + c) * rows + r0).cast(), column);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Path, gemm_bf16};
    use super::*;

    /// The backward gives the bits of the general product on AMX (four products and the softmax
    /// backward between), for token counts and head widths on and off the tiles' edges.
    #[test]
    fn a_head_backward_gives_the_bits_of_the_general_product() {
        if !Path::available().contains(&Path::Amx) {
            return println!("no AMX here: nothing to compare");
        }
        for (n, dim) in [(197, 64), (37, 64), (50, 64), (32, 32), (5, 48), (70, 96), (1, 8), (300, 16)] {
            let (width, heads) = (2 * dim, 2);
            let row = 3 * width;
            let qkv = crate::cpu::test_data(n * row, n as u32, 2.0);
            let go = crate::cpu::test_data(n * width, 7 + n as u32, 1.5);
            let scale = (dim as f32).powf(-0.5);
            let general = |[m, cols, k]: [usize; 3], dst: (*mut f32, usize), a, b| unsafe {
                gemm_bf16(Path::Amx, [m, cols, k], dst, false, a, b, 1.0, 1)
            };
            for h in 0..heads {
                let q = qkv[h * dim..].as_ptr();
                let (k, v) = (q.wrapping_add(width), q.wrapping_add(2 * width));
                let mut probs = vec![0.0; n * n];
                general([n, n, dim], (probs.as_mut_ptr(), n), (q, [row, 1]), (k, [1, row]));
                probs.iter_mut().for_each(|p| *p *= scale);
                crate::cpu::attention::softmax_rows(&mut probs, n);
                let g = go[h * dim..].as_ptr();

                let mut got = vec![f32::NAN; n * row];
                let at = |m: &mut Vec<f32>, part: usize| m[part * width + h * dim..].as_mut_ptr();
                let (dq, dk, dv) = (at(&mut got, 0), at(&mut got, 1), at(&mut got, 2));
                let head = Head { tokens: n, dim, scale };
                unsafe { head_backward(&head, (q, k, v, row), &probs, (g, width), (dq, dk, dv, row)) };

                let mut expected = vec![f32::NAN; n * row];
                let (dq, dk, dv) = (at(&mut expected, 0), at(&mut expected, 1), at(&mut expected, 2));
                let mut ds = vec![0.0; n * n];
                general([n, dim, n], (dv, row), (probs.as_ptr(), [1, n]), (g, [width, 1]));
                general([n, n, dim], (ds.as_mut_ptr(), n), (g, [width, 1]), (v, [1, row]));
                crate::cpu::attention::softmax_backward_rows(&probs, &mut ds, n, scale);
                general([n, dim, n], (dq, row), (ds.as_ptr(), [n, 1]), (k, [row, 1]));
                general([n, dim, n], (dk, row), (ds.as_ptr(), [1, n]), (q, [row, 1]));
                let bits = |m: &[f32]| m.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&expected), "gradients of {n} tokens, width {dim}, head {h}");
            }
        }
    }

    /// The vector transpose moves every value where the plain one does.
    #[test]
    fn the_transpose_transposes() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return println!("no AVX-512 here: nothing to compare");
        }
        for (rows, cols) in [(16, 16), (32, 112), (112, 32), (48, 16), (16, 64)] {
            let m: Vec<u32> = (0..rows * cols).map(|i| i as u32 * 2654435761).collect();
            let mut out = vec![0; rows * cols];
            // SAFETY: checked above.
            unsafe { transpose(&m, cols, &mut out) };
            for (r, c) in (0..rows).flat_map(|r| (0..cols).map(move |c| (r, c))) {
                assert_eq!(out[c * rows + r], m[r * cols + c], "[{r}][{c}] of {rows} x {cols}");
            }
        }
    }

    /// The vector `exp` and maximum give the bits of the f32 softmax's (`cpu::simd`), over
    /// every value the softmax can meet: both sides of the clamp, subnormal results, signed
    /// zeros, infinities and NaN.
    #[test]
    fn the_vector_exp_and_maximum_equal_the_scalar_ones() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return println!("no AVX-512 here: nothing to compare");
        }
        let special =
            [0.0, -0.0, 1.0, -87.3, -87.31, -88.0, -100.0, 88.3, 88.4, 1e-30, f32::INFINITY, f32::NEG_INFINITY];
        let mut values: Vec<f32> = special.to_vec();
        values.extend((0..200_000).map(|i| -95.0 + 190.0 * (i as f32) / 200_000.0));
        values.extend((0..4096).map(|i| f32::from_bits(0x3000_0000 + i * 0x9_1234)));
        for chunk in values.chunks(16) {
            let mut lanes = [0.0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut got = [0.0f32; 16];
            // SAFETY: checked above.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_loadu_ps(lanes.as_ptr()))) };
            for (x, e) in lanes.iter().zip(got) {
                assert_eq!(e.to_bits(), crate::cpu::simd::exp(*x).to_bits(), "exp({x:e})");
            }
        }
        let mut nan = [0.0f32; 16];
        // SAFETY: checked above.
        unsafe { _mm512_storeu_ps(nan.as_mut_ptr(), exp16(_mm512_set1_ps(f32::NAN))) };
        assert!(nan.iter().all(|v| v.is_nan()) && crate::cpu::simd::exp(f32::NAN).is_nan(), "exp(NaN)");
        for n in [1, 5, 16, 17, 63, 64, 65, 197, 200] {
            for seed in 0..20u32 {
                let mut row: Vec<f32> = crate::cpu::test_data(n, seed, 50.0);
                if seed % 4 == 1 {
                    row[(seed as usize * 7) % n] = f32::NAN;
                }
                if seed % 4 == 2 {
                    row.iter_mut().for_each(|v| *v = -v.abs() - 1e3);
                }
                // SAFETY: checked above; the row holds n values.
                let got = unsafe { max_of(row.as_ptr(), n) };
                assert_eq!(got.to_bits(), crate::cpu::simd::max(&row).to_bits(), "maximum of {n} values, seed {seed}");
            }
        }
    }

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
