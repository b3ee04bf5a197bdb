//! The bf16 microkernels: an `MR x NR` tile of f32 sums over packed k-pairs of bf16 values.
//!
//! Packed operands hold k in pairs, two bf16 in one `u32` (the even k in the low half):
//! an A panel is `[pairs][MR]`, a B panel `[pairs][NR]`. Each pair is added to the sum as
//! `vdpbf16ps` does it (Intel SDM): the odd k's product first, then the even k's, each an f32
//! addition rounded to nearest even, a result below f32's normal range flushed to zero. A product
//! of two bf16 values is exact in f32, so the portable kernel gets the same bits (save for
//! products that themselves fall below the normal range, which no trained network produces).

/// Rows of a tile.
pub(crate) const MR: usize = 12;
/// Columns of a tile: two 16-lane vectors.
pub(crate) const NR: usize = 32;

/// A tile of sums, row-major.
pub(crate) type Tile = [[f32; NR]; MR];

/// Which microkernel runs the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// `vdpbf16ps` on 512-bit vectors (AVX-512 BF16: Intel Cooper Lake, Sapphire Rapids and
    /// later; AMD Zen 4 and later).
    Avx512Bf16,
    /// Plain Rust that the compiler vectorises, on any CPU; the same bits as `Avx512Bf16`.
    Portable,
}

impl Path {
    /// The fastest kernel this CPU runs (checked once).
    pub fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512bf16") {
                return Path::Avx512Bf16;
            }
            Path::Portable
        })
    }

    /// Every kernel this CPU can run, the portable one included.
    pub fn available() -> Vec<Self> {
        let mut paths = vec![Path::Portable];
        if Self::detect() == Path::Avx512Bf16 {
            paths.push(Path::Avx512Bf16);
        }
        paths
    }

    /// `tile = Σ_p a[p] ⊗ b[p]` over `pairs` packed k-pairs (`a`: `[pairs][MR]`, `b`:
    /// `[pairs][NR]`).
    pub(crate) fn run(self, pairs: usize, a: &[u32], b: &[u32], tile: &mut Tile) {
        assert!(a.len() >= pairs * MR && b.len() >= pairs * NR, "packed panels hold every pair");
        match self {
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Bf16 => {
                assert_eq!(Self::detect(), Path::Avx512Bf16, "this CPU has no AVX-512 BF16");
                // SAFETY: the CPU has the instructions, and the asserts bound every read.
                unsafe { avx512::tile(pairs, a.as_ptr(), b.as_ptr(), tile) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Path::Avx512Bf16 => unreachable!("detect() offers AVX-512 BF16 on x86-64 only"),
            Path::Portable => portable(pairs, a, b, tile),
        }
    }
}

/// `x`, or a zero of its sign where it is below f32's normal range (FTZ).
#[inline(always)]
fn flush(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE { f32::from_bits(x.to_bits() & 0x8000_0000) } else { x }
}

crate::cpu::simd::multiversion! {
    /// Compiled for AVX-512, AVX2 and the baseline (none fuses the multiply into the addition,
    /// so all give the same bits).
    fn portable(pairs: usize, a: &[u32], b: &[u32], tile: &mut Tile) {
        *tile = [[0.0; NR]; MR];
        for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(pairs) {
            let b_lo: [f32; NR] = std::array::from_fn(|j| super::widen(bp[j] as u16));
            let b_hi: [f32; NR] = std::array::from_fn(|j| super::widen((bp[j] >> 16) as u16));
            for (row, &pair) in tile.iter_mut().zip(ap) {
                let (a_lo, a_hi) = (super::widen(pair as u16), super::widen((pair >> 16) as u16));
                for j in 0..NR {
                    row[j] = flush(flush(row[j] + a_hi * b_hi[j]) + a_lo * b_lo[j]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{MR, NR, Tile};

    /// # Safety
    /// The CPU must have AVX-512 F and BF16; `a` and `b` must hold `pairs` packed pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(pairs: usize, a: *const u32, b: *const u32, tile: &mut Tile) {
        // 24 accumulators, 2 B vectors and a broadcast A pair: 27 of the 32 vector registers.
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..pairs {
            unsafe {
                let bp = b.add(p * NR) as *const __m512i;
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(1)));
                let ap = a.add(p * MR);
                for (i, row) in acc.iter_mut().enumerate() {
                    let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
                    row[0] = _mm512_dpbf16_ps(row[0], pair, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], pair, b1);
                }
            }
        }
        for (out, row) in tile.iter_mut().zip(acc) {
            unsafe {
                _mm512_storeu_ps(out.as_mut_ptr(), row[0]);
                _mm512_storeu_ps(out.as_mut_ptr().add(16), row[1]);
            }
        }
    }
}
