//! The one call into the `gemm` crate, for strided f32 matrices.

/// A matrix operand: its first element and its (row, column) strides in elements.
pub type Operand = (*const f32, [usize; 2]);

/// `dst[m, n] = scale · lhs[m, k] · rhs[k, n]`, plus the previous `dst` when `accumulate`;
/// `dst` is (first element, row stride) of a matrix with unit column stride.
///
/// # Safety
/// Every pointer must address its whole matrix under the given strides, and `dst` must be
/// initialised when `accumulate` is true.
pub unsafe fn gemm(
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
