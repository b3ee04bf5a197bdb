//! The bf16 CPU target: matrix products that read bf16 operands and accumulate in f32, the
//! arithmetic of PyTorch's bf16 autocast on CPU (issue 19).
//!
//! - [`round`]: f32 to bf16, round to nearest even, as `vcvtneps2bf16` does.
//! - [`gemm_bf16`]: `dst = scale · lhs · rhs (+ dst)` on strided f32 matrices whose values are
//!   rounded to bf16 while they are packed, then multiplied in pairs along k with f32 sums;
//!   [`PackedRhs`] and [`gemm_bf16_packed`] round and pack a weight once for many products.
//! - The microkernel is chosen once per process ([`Path::detect`]): AMX tiles (`tdpbf16ps`)
//!   where the CPU has AMX-BF16 and the OS grants the tile state, else `vdpbf16ps` (AVX-512
//!   BF16) where the CPU has it, else a portable one that gives `vdpbf16ps`'s bits on any CPU.
//! - `attention`: an attention head on AMX tiles (q kᵀ, softmax, P v with S and P in L1), which
//!   `cpu::attention` runs in place of two general products when the products are AMX ones.
//! - [`CacheLineAligned`]: the allocator the `dino` binary installs, so that the outputs the
//!   AMX kernel stores into start on cache lines.
//!
//! No crate does this: `gemm` 0.19 has f16 kernels (`gemm-f16`) but none for bf16, and a
//! BLAS with `sbgemm` (oneDNN, OpenBLAS) is a C dependency.

mod alloc;
#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
pub(crate) mod attention;
mod convert;
mod gemm;
mod microkernel;

use std::sync::atomic::{AtomicBool, Ordering};

pub use alloc::CacheLineAligned;
pub use gemm::{Operand, PackedRhs, gemm_bf16, gemm_bf16_packed};
pub use microkernel::Path;

/// The arithmetic of the CPU kernels' matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulPrecision {
    /// f32 operands and sums (the `gemm` crate).
    #[default]
    F32,
    /// Operands rounded to bf16, sums in f32 ([`gemm_bf16`]).
    Bf16,
}

static BF16: AtomicBool = AtomicBool::new(false);

/// Sets the arithmetic of every matrix product the CPU kernels compute from now on, in the whole
/// process, as PyTorch's `torch.set_float32_matmul_precision` does. Everything else (LayerNorm,
/// softmax, GELU, the loss, the optimizer, the EMA) stays f32 either way. A process runs one
/// precision: set it before the first product (tests that change it need their own binary).
pub fn set_matmul_precision(precision: MatmulPrecision) {
    BF16.store(precision == MatmulPrecision::Bf16, Ordering::Relaxed);
}

/// Whether the products run in bf16 on AMX tiles (the precision set to bf16, and the CPU's
/// fastest kernel AMX, or the one `DINO_BF16_KERNEL` chose).
pub(crate) fn amx_products() -> bool {
    matmul_precision() == MatmulPrecision::Bf16 && Path::detect() == Path::Amx
}

/// The arithmetic [`set_matmul_precision`] chose (f32 unless set).
pub fn matmul_precision() -> MatmulPrecision {
    if BF16.load(Ordering::Relaxed) { MatmulPrecision::Bf16 } else { MatmulPrecision::F32 }
}

/// The bf16 nearest to `x` (ties to even), as its 16 bits. NaN stays a (quiet) NaN, and
/// subnormal values become zero of the same sign, as `vdpbf16ps` reads them (DAZ).
#[inline(always)]
pub fn round(x: f32) -> u16 {
    // Branch-free (selects), so that packing loops vectorise.
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
    let subnormal = bits & 0x7f80_0000 == 0;
    let special = if nan { ((bits >> 16) | 0x40) as u16 } else { ((bits >> 16) & 0x8000) as u16 };
    if nan || subnormal { special } else { rounded }
}

/// The f32 value of bf16 bits.
#[inline(always)]
pub fn widen(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even 1.
        assert_eq!(widen(round(1.0 + 2f32.powi(-8))), 1.0);
        // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: the even one is 1 + 2^-6.
        assert_eq!(widen(round(1.0 + 3.0 * 2f32.powi(-8))), 1.0 + 2f32.powi(-6));
        assert_eq!(widen(round(1.0 + 2f32.powi(-8) + 2f32.powi(-20))), 1.0 + 2f32.powi(-7));
        assert_eq!(widen(round(-2.5)), -2.5);
        assert_eq!(widen(round(f32::MAX)), f32::INFINITY);
        assert_eq!(widen(round(f32::INFINITY)), f32::INFINITY);
        assert!(widen(round(f32::NAN)).is_nan());
        assert_eq!(round(-1e-40), 0x8000);
        assert_eq!(round(1e-40), 0);
        for i in 0..10_000 {
            let x = (i as f32 * 0.7371).sin() * 10f32.powi(i % 9 - 4);
            let (r, e) = (widen(round(x)), (widen(round(x)) - x).abs());
            assert!(e <= x.abs() * 2f32.powi(-8), "{x} -> {r}");
        }
    }
}
