//! f32 to bf16 as the packing needs it: two values of k in one `u32` (the even k in the low
//! half), from a contiguous run along k ([`pairs_of`]) or from two rows ([`interleave_rows`]).
//!
//! With AMX the conversion costs more than the products (perf: 26 % of a small28 training step
//! against 31 % for the tiles), so where the CPU has AVX-512 BF16 it runs on `vcvtne2ps2bf16`
//! (32 values an instruction), else on [`round`], which the compiler vectorises. Both round to
//! nearest even, keep NaN quiet and flush subnormals: the same bits (tested).

use super::microkernel::{MR, NR};
use super::round;

/// Two bf16 values in one `u32`, the even k in the low half.
#[inline(always)]
pub(super) fn pair(lo: f32, hi: f32) -> u32 {
    round(lo) as u32 | (round(hi) as u32) << 16
}

/// Whether the conversions run on `vcvtne2ps2bf16`.
#[inline]
fn vectorised() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16") && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out[i] = pair(run[2i], run[2i + 1])` (0 past the run's end) for the first
/// `min(out.len(), ceil(run.len() / 2))` values of `out`: one contiguous run along k.
pub(super) fn pairs_of(run: &[f32], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if vectorised() {
        // SAFETY: the CPU has the instructions.
        return unsafe { avx512::pairs_of(run, out) };
    }
    portable_pairs_of(run, out)
}

/// `values[i] *= by`, then [`pairs_of`] them into `out` (`ceil(values.len() / 2)` values): a
/// softmax row's normalisation and its conversion in one pass.
pub(super) fn scaled_pairs_of(values: &mut [f32], by: f32, out: &mut [u32]) {
    assert_eq!(out.len(), values.len().div_ceil(2), "pairs of a run");
    #[cfg(target_arch = "x86_64")]
    if vectorised() {
        // SAFETY: the CPU has the instructions; the assert bounds the stores to `out`.
        return unsafe { avx512::scaled_pairs_of(values, by, out) };
    }
    values.iter_mut().for_each(|v| *v *= by);
    portable_pairs_of(values, out)
}

/// `out[p][j] = pair(rows[2p][j], rows[2p + 1][j])` for `j < cols` (an odd last row pairs with
/// 0): `kc` contiguous rows `rs` apart (of B, or of Aᵀ) interleaved into `[pairs][W]`, one
/// panel a call. `out` must be zero past `cols` in each row (the vector path writes zeros
/// there, the portable one leaves them).
pub(super) fn interleave_rows<const W: usize>(rows: &[f32], rs: usize, kc: usize, cols: usize, out: &mut [u32]) {
    assert!(cols <= W && out.len().is_multiple_of(W) && out.len() / W <= kc.div_ceil(2), "a panel of {W} columns");
    #[cfg(target_arch = "x86_64")]
    if vectorised() {
        // SAFETY: the CPU has the instructions; the assert and `rows`' length bound the reads.
        return unsafe { avx512::interleave_rows::<W>(rows, rs, kc, cols, out) };
    }
    match W {
        NR => interleave_rows_b(rows, rs, kc, cols, out),
        MR => interleave_rows_a(rows, rs, kc, cols, out),
        16 => interleave_rows_16(rows, rs, kc, cols, out),
        _ => unreachable!("panels are NR, MR or 16 wide"),
    }
}

/// The portable [`interleave_rows`]: a whole panel per call, so that the loops compile for the
/// CPU's vectors together, with fixed-width rows when the panel is full.
#[inline(always)]
fn portable_interleave<const W: usize>(rows: &[f32], rs: usize, kc: usize, cols: usize, out: &mut [u32]) {
    for (p, out) in out.chunks_exact_mut(W).enumerate() {
        let lo = &rows[2 * p * rs..][..cols];
        if 2 * p + 1 == kc {
            out.iter_mut().zip(lo).for_each(|(o, &l)| *o = pair(l, 0.0));
            continue;
        }
        let hi = &rows[(2 * p + 1) * rs..][..cols];
        match (<&[f32; W]>::try_from(lo), <&[f32; W]>::try_from(hi), <&mut [u32; W]>::try_from(out)) {
            (Ok(lo), Ok(hi), Ok(out)) => (0..W).for_each(|j| out[j] = pair(lo[j], hi[j])),
            (_, _, Err(_)) => unreachable!("chunks of W"),
            (_, _, Ok(out)) => out.iter_mut().zip(lo).zip(hi).for_each(|((o, &l), &h)| *o = pair(l, h)),
        }
    }
}

crate::cpu::simd::multiversion! {
    /// [`portable_interleave`] for a B panel (`NR` columns).
    fn interleave_rows_b(rows: &[f32], rs: usize, kc: usize, cols: usize, out: &mut [u32]) {
        portable_interleave::<NR>(rows, rs, kc, cols, out)
    }
}

crate::cpu::simd::multiversion! {
    /// [`portable_interleave`] for an A tile stored by columns (`MR` columns of Aᵀ).
    fn interleave_rows_a(rows: &[f32], rs: usize, kc: usize, cols: usize, out: &mut [u32]) {
        portable_interleave::<MR>(rows, rs, kc, cols, out)
    }
}

crate::cpu::simd::multiversion! {
    /// [`portable_interleave`] for 16 columns of Aᵀ (an AMX tile's rows, before the transpose).
    fn interleave_rows_16(rows: &[f32], rs: usize, kc: usize, cols: usize, out: &mut [u32]) {
        portable_interleave::<16>(rows, rs, kc, cols, out)
    }
}

crate::cpu::simd::multiversion! {
    /// The portable [`pairs_of`].
    fn portable_pairs_of(run: &[f32], out: &mut [u32]) {
        let (whole, rest) = run.as_chunks::<2>();
        for (o, c) in out.iter_mut().zip(whole) {
            *o = pair(c[0], c[1]);
        }
        if let (Some(&last), Some(o)) = (rest.first(), out.get_mut(whole.len())) {
            *o = pair(last, 0.0);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::microkernel::lanes;

    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pairs_of(run: &[f32], out: &mut [u32]) {
        let outs = out.len().min(run.len().div_ceil(2));
        // Whole vectors without masks: a run is 64-256 values, and the masks' arithmetic on
        // every step was as much work as the conversion.
        let whole = (run.len() / 32).min(outs / 16) * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: 2i + 32 <= run.len() and i + 16 <= outs.
            unsafe {
                let at = run.as_ptr().add(2 * i);
                let words: __m512i =
                    std::mem::transmute(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(at.add(16)), _mm512_loadu_ps(at)));
                _mm512_storeu_si512(out.as_mut_ptr().add(i) as *mut _, words);
            }
        }
        for i in (whole..outs).step_by(16) {
            let left = run.len() - 2 * i;
            // SAFETY: masked lanes are not read or written; the others lie in `run` and `out`.
            unsafe {
                let at = run.as_ptr().add(2 * i);
                let lo = _mm512_maskz_loadu_ps(lanes(left), at);
                let hi = _mm512_maskz_loadu_ps(lanes(left.saturating_sub(16)), at.add(16));
                // Words 0-15 from `lo`, 16-31 from `hi`: k in order, two to a u32.
                let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_mask_storeu_epi32(out.as_mut_ptr().add(i) as *mut i32, lanes(outs - i), words);
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16; `out` must hold `ceil(values.len() / 2)` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn scaled_pairs_of(values: &mut [f32], by: f32, out: &mut [u32]) {
        let (n, by) = (values.len(), _mm512_set1_ps(by));
        // Whole vectors without masks, as in `pairs_of`.
        let whole = n - n % 32;
        for i in (0..whole).step_by(32) {
            // SAFETY: i + 32 <= n values, and i / 2 + 16 <= ceil(n / 2) pairs.
            unsafe {
                let at = values.as_mut_ptr().add(i);
                let lo = _mm512_mul_ps(_mm512_loadu_ps(at), by);
                let hi = _mm512_mul_ps(_mm512_loadu_ps(at.add(16)), by);
                _mm512_storeu_ps(at, lo);
                _mm512_storeu_ps(at.add(16), hi);
                let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(out.as_mut_ptr().add(i / 2) as *mut _, words);
            }
        }
        for i in (whole..n).step_by(32) {
            let (m0, m1) = (lanes(n - i), lanes((n - i).saturating_sub(16)));
            // SAFETY: masked lanes are not read or written; the others lie in `values` and `out`.
            unsafe {
                let at = values.as_mut_ptr().add(i);
                let lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(m0, at), by);
                let hi = _mm512_mul_ps(_mm512_maskz_loadu_ps(m1, at.add(16)), by);
                _mm512_mask_storeu_ps(at, m0, lo);
                _mm512_mask_storeu_ps(at.add(16), m1, hi);
                let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_mask_storeu_epi32(out.as_mut_ptr().add(i / 2) as *mut i32, lanes((n - i).div_ceil(2)), words);
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX-512 F, BW and BF16; `rows` must hold `kc` rows of `cols` values
    /// `rs` apart (the last may end there), and `out` `[pairs][W]` with `pairs <= ceil(kc / 2)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn interleave_rows<const W: usize>(
        rows: &[f32],
        rs: usize,
        kc: usize,
        cols: usize,
        out: &mut [u32],
    ) {
        // Word 2j from the low row's lane j, word 2j + 1 from the high row's.
        let order = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        );
        for (p, out) in out.chunks_exact_mut(W).enumerate() {
            for g in (0..W).step_by(16) {
                let read = lanes(cols.saturating_sub(g));
                // SAFETY: the caller's contract; masked lanes are not read or written.
                unsafe {
                    let lo = _mm512_maskz_loadu_ps(read, rows.as_ptr().add(2 * p * rs + g));
                    let hi = if 2 * p + 1 < kc {
                        _mm512_maskz_loadu_ps(read, rows.as_ptr().add((2 * p + 1) * rs + g))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                    let pairs = _mm512_permutexvar_epi16(order, words);
                    _mm512_mask_storeu_epi32(out.as_mut_ptr().add(g) as *mut i32, lanes(W - g), pairs);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of every kind: ordinary ones of many magnitudes, ties, NaN, infinities, subnormals.
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let special = [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-40, -1e-40, 0.0, -0.0, f32::MAX];
        (0..len)
            .map(|i| match (i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 11 {
                0 => special[i % special.len()],
                1 => 1.0 + (2 * (i % 7) + 1) as f32 * 2f32.powi(-8),
                _ => ((i as f32 * 0.618 + seed as f32).sin() * 3.0).powi(3) * 10f32.powi(i as i32 % 7 - 3),
            })
            .collect()
    }

    #[test]
    fn the_vector_conversions_give_the_bits_of_round() {
        if !vectorised() {
            println!("no AVX-512 BF16 here: only the portable conversion runs");
            return;
        }
        for len in [0, 1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 100] {
            let run = values(len, len as u32);
            for outs in [len.div_ceil(2), len / 2, len.div_ceil(2) + 3] {
                let (mut want, mut got) = (vec![7u32; outs], vec![7u32; outs]);
                portable_pairs_of(&run, &mut want);
                // SAFETY: checked above.
                unsafe { avx512::pairs_of(&run, &mut got) };
                assert_eq!(got, want, "pairs_of, {len} values into {outs}");
            }
            let (mut scaled, mut got) = (run.clone(), vec![7u32; len.div_ceil(2)]);
            let mut want = vec![7u32; len.div_ceil(2)];
            let by = 0.37;
            let product: Vec<f32> = run.iter().map(|v| v * by).collect();
            portable_pairs_of(&product, &mut want);
            // SAFETY: checked above.
            unsafe { avx512::scaled_pairs_of(&mut scaled, by, &mut got) };
            assert_eq!(got, want, "scaled_pairs_of, {len} values");
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&scaled), bits(&product), "scaled_pairs_of's products, {len} values");
        }
        fn panels<const W: usize>() {
            for (kc, cols, rs) in [(1, W, W), (2, W, W + 5), (7, W - 3, W + 1), (64, W, 40), (33, 1, W)] {
                let rows = values((kc - 1) * rs + cols, (kc * cols) as u32);
                let (mut want, mut got) = (vec![0u32; kc.div_ceil(2) * W], vec![0u32; kc.div_ceil(2) * W]);
                portable_interleave::<W>(&rows, rs, kc, cols, &mut want);
                // SAFETY: checked above.
                unsafe { avx512::interleave_rows::<W>(&rows, rs, kc, cols, &mut got) };
                assert_eq!(got, want, "{W} columns, kc {kc}, cols {cols}");
            }
        }
        panels::<NR>();
        panels::<MR>();
        panels::<16>();
    }
}
