//! The one place the f32 kernels multiply matrices: the `gemm` crate in f32, or the bf16 product
//! of `cpu_bf16` when `set_matmul_precision(Bf16)` chose it.

use std::sync::Arc;

pub use crate::cpu_bf16::Operand;
use crate::cpu_bf16::{self, MatmulPrecision, PackedRhs, Path, gemm_bf16_packed};

fn threads(parallelism: gemm::Parallelism) -> usize {
    match parallelism {
        gemm::Parallelism::None => 1,
        gemm::Parallelism::Rayon(0) => rayon::current_num_threads(),
        gemm::Parallelism::Rayon(n) => n,
    }
}

/// A right operand ready for many products: as it is (f32), or rounded and packed once (bf16),
/// so that a layer's weight is converted once per call, not once per row tile.
pub enum Rhs {
    F32(Operand, [usize; 2]),
    /// Packed for these products, or kept from earlier ones (`kept_weights`).
    Bf16(Arc<PackedRhs>),
}

// SAFETY: an `F32` operand is only read, by products that the owner of its matrix waits for.
unsafe impl Send for Rhs {}
unsafe impl Sync for Rhs {}

impl Rhs {
    /// `rhs`, `[k, n]`, for the products of the current precision.
    ///
    /// # Safety
    /// `rhs` must address the whole `[k, n]` matrix under its strides, and outlive the result.
    pub unsafe fn new(rhs: Operand, [k, n]: [usize; 2], parallelism: gemm::Parallelism) -> Self {
        match cpu_bf16::matmul_precision() {
            MatmulPrecision::F32 => Self::F32(rhs, [k, n]),
            // SAFETY (both): the caller's contract.
            MatmulPrecision::Bf16 => Self::Bf16(unsafe {
                let threads = threads(parallelism);
                super::kept_weights::packed(rhs, [k, n], threads)
                    .unwrap_or_else(|| Arc::new(PackedRhs::new(rhs, [k, n], threads)))
            }),
        }
    }

    /// Bytes a weight's value takes in the products of the current precision.
    pub fn value_bytes() -> usize {
        match cpu_bf16::matmul_precision() {
            MatmulPrecision::F32 => 4,
            MatmulPrecision::Bf16 => 2,
        }
    }

    /// Rows of the left operand the current precision's kernel multiplies in one call: tiles of
    /// rows in multiples of it leave no call part empty. 16 in f32 (the rounding the f32 tiles
    /// always had); in bf16 the chosen kernel's (AMX 32, the others 12).
    pub fn row_step() -> usize {
        match cpu_bf16::matmul_precision() {
            MatmulPrecision::F32 => 16,
            MatmulPrecision::Bf16 => Path::detect().tile_rows(),
        }
    }

    /// `dst[m, n] = scale · lhs[m, k] · self`, plus the previous `dst` when `accumulate`; `dst`
    /// is (first element, row stride) of a matrix with unit column stride.
    ///
    /// # Safety
    /// `lhs` must address the whole `[m, k]` matrix and `dst` the whole `[m, n]` one, and `dst`
    /// must be initialised when `accumulate` is true.
    pub unsafe fn product(
        &self,
        m: usize,
        dst: (*mut f32, usize),
        accumulate: bool,
        lhs: Operand,
        scale: f32,
        parallelism: gemm::Parallelism,
    ) {
        match self {
            // SAFETY (both): the caller's contract and `new`'s.
            Self::F32(rhs, [k, n]) => unsafe { gemm_f32([m, *n, *k], dst, accumulate, lhs, *rhs, scale, parallelism) },
            Self::Bf16(packed) => unsafe {
                gemm_bf16_packed(Path::detect(), m, dst, accumulate, lhs, packed, scale, None, threads(parallelism))
            },
        }
    }

    /// `dst[m, n] = lhs[m, k] · self + bias` (`bias` `[n]` on every row): a layer's output,
    /// without reading `dst` first. In bf16 the bias is added to the sums as they are stored;
    /// the f32 product of the `gemm` crate accumulates onto rows set to the bias.
    ///
    /// # Safety
    /// `lhs` must address the whole `[m, k]` matrix and `dst` the whole `[m, n]` one.
    pub unsafe fn product_plus_bias(
        &self,
        m: usize,
        (dst, dst_rs): (*mut f32, usize),
        lhs: Operand,
        bias: &[f32],
        parallelism: gemm::Parallelism,
    ) {
        match self {
            Self::F32(..) => {
                for i in 0..m {
                    // SAFETY: row i of `dst` holds n = bias.len() values (the caller's contract).
                    let row = unsafe { std::slice::from_raw_parts_mut(dst.add(i * dst_rs), bias.len()) };
                    row.copy_from_slice(bias);
                }
                // SAFETY: the caller's contract; `dst` is initialised above.
                unsafe { self.product(m, (dst, dst_rs), true, lhs, 1.0, parallelism) }
            }
            // SAFETY: the caller's contract and `new`'s.
            Self::Bf16(packed) => unsafe {
                let threads = threads(parallelism);
                gemm_bf16_packed(Path::detect(), m, (dst, dst_rs), false, lhs, packed, 1.0, Some(bias), threads)
            },
        }
    }
}

/// `dst[m, n] = scale · lhs[m, k] · rhs[k, n]`, plus the previous `dst` when `accumulate`;
/// `dst` is (first element, row stride) of a matrix with unit column stride. In the current
/// matmul precision.
///
/// # Safety
/// Every pointer must address its whole matrix under the given strides, and `dst` must be
/// initialised when `accumulate` is true.
pub unsafe fn gemm(
    [m, n, k]: [usize; 3],
    dst: (*mut f32, usize),
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe { Rhs::new(rhs, [k, n], parallelism).product(m, dst, accumulate, lhs, scale, parallelism) }
}

/// The f32 product of the `gemm` crate.
unsafe fn gemm_f32(
    [m, n, k]: [usize; 3],
    (dst, dst_rs): (*mut f32, usize),
    accumulate: bool,
    (lhs, [lhs_rs, lhs_cs]): Operand,
    (rhs, [rhs_rs, rhs_cs]): Operand,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}
