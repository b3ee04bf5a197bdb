//! A fully connected layer on row-major buffers, y = x W + b with W `[in, out]` (burn's layout),
//! and its gradients, as direct gemm calls.
//!
//! burn's flex matmul allocates each output zeroed and then copies it once more to realign it,
//! on one thread, and adds the bias in a separate pass; here the output starts as the broadcast
//! bias and gemm accumulates into it.

use rayon::prelude::*;

use crate::matmul::{Operand, gemm};

/// Below this many multiply-adds a product runs on one thread (flex's threshold).
const PARALLEL_MIN_OPS: usize = 192 * 192 * 192;
/// Rows per block of the weight gradient's reduction.
const WEIGHT_GRAD_ROWS: usize = 512;
/// Elements per parallel task for the bias passes.
const CHUNK: usize = 1 << 14;

/// Sizes of one layer call: `rows` inputs of width `k` to outputs of width `n`.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub rows: usize,
    pub k: usize,
    pub n: usize,
}

fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN_OPS {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

/// A `[m, n]` product written by gemm into fresh memory (no zeroing pass).
fn product([m, n, k]: [usize; 3], lhs: Operand, rhs: Operand, parallelism: gemm::Parallelism) -> Vec<f32> {
    let mut out = Vec::<f32>::with_capacity(m * n);
    // SAFETY: gemm writes all m·n elements without reading them (accumulate = false); the
    // callers pass operands of the stated sizes.
    unsafe {
        gemm([m, n, k], (out.as_mut_ptr(), n), false, lhs, rhs, 1.0, parallelism);
        out.set_len(m * n);
    }
    out
}

fn check(x: &[f32], w: &[f32], d: Dims) {
    assert_eq!(x.len(), d.rows * d.k, "linear: input is not [rows, {}]", d.k);
    assert_eq!(w.len(), d.k * d.n, "linear: weight is not [{}, {}]", d.k, d.n);
}

/// x `[rows, k]`, W `[k, n]`, b `[n]` -> `[rows, n]`.
pub fn forward(x: &[f32], w: &[f32], b: &[f32], d: Dims) -> Vec<f32> {
    check(x, w, d);
    assert_eq!(b.len(), d.n, "linear: bias is not [{}]", d.n);
    let rows_per_task = (CHUNK / d.n.max(1)).max(1);
    let mut y = Vec::<f32>::with_capacity(d.rows * d.n);
    y.spare_capacity_mut().par_chunks_mut(rows_per_task * d.n).for_each(|chunk| {
        for row in chunk.chunks_exact_mut(d.n) {
            row.iter_mut().zip(b).for_each(|(o, &v)| {
                o.write(v);
            });
        }
    });
    // SAFETY: the loop above wrote all rows·n elements (the capacity is exactly that, a whole
    // number of rows); sizes were checked, so gemm reads and writes inside the buffers.
    unsafe {
        y.set_len(d.rows * d.n);
        let parallelism = parallelism(d.rows, d.n, d.k);
        gemm(
            [d.rows, d.n, d.k],
            (y.as_mut_ptr(), d.n),
            true,
            (x.as_ptr(), [d.k, 1]),
            (w.as_ptr(), [d.n, 1]),
            1.0,
            parallelism,
        );
    }
    y
}

/// dL/dx = dy Wᵀ: `[rows, k]`.
pub fn backward_input(w: &[f32], dy: &[f32], d: Dims) -> Vec<f32> {
    assert_eq!(dy.len(), d.rows * d.n, "linear backward: gradient is not [rows, {}]", d.n);
    // Wᵀ[o, i] = W[i, o]: row stride 1, column stride n.
    product([d.rows, d.k, d.n], (dy.as_ptr(), [d.n, 1]), (w.as_ptr(), [1, d.n]), parallelism(d.rows, d.k, d.n))
}

/// dL/dW = xᵀ dy: `[k, n]`.
///
/// The product reduces over all rows into a small matrix, which gemm parallelises poorly
/// (~170 GFLOP/s on 2 cores against ~245 for this split): blocks of rows run as separate
/// single-threaded products, added in block order, so the result does not depend on the
/// thread count.
pub fn backward_weight(x: &[f32], dy: &[f32], d: Dims) -> Vec<f32> {
    assert_eq!(x.len(), d.rows * d.k, "linear backward: input is not [rows, {}]", d.k);
    assert_eq!(dy.len(), d.rows * d.n, "linear backward: gradient is not [rows, {}]", d.n);
    // xᵀ[i, r] = x[r, i]: row stride 1, column stride k.
    let block = |x: &[f32], dy: &[f32], parallelism| {
        let rows = dy.len() / d.n;
        product([d.k, d.n, rows], (x.as_ptr(), [1, d.k]), (dy.as_ptr(), [d.n, 1]), parallelism)
    };
    if d.rows <= WEIGHT_GRAD_ROWS {
        return block(x, dy, parallelism(d.k, d.n, d.rows));
    }
    let partials: Vec<Vec<f32>> = x
        .par_chunks(WEIGHT_GRAD_ROWS * d.k)
        .zip(dy.par_chunks(WEIGHT_GRAD_ROWS * d.n))
        .map(|(x, dy)| block(x, dy, gemm::Parallelism::None))
        .collect();
    let mut blocks = partials.into_iter();
    let mut dw = blocks.next().expect("more rows than one block");
    for p in blocks {
        dw.iter_mut().zip(&p).for_each(|(a, v)| *a += v);
    }
    dw
}

/// dL/db = column sums of dy: `[n]`, summed per task then in task order (thread-count independent).
pub fn backward_bias(dy: &[f32], n: usize) -> Vec<f32> {
    let rows_per_task = (CHUNK / n.max(1)).max(1);
    let partials: Vec<Vec<f32>> = dy
        .par_chunks(rows_per_task * n)
        .map(|chunk| {
            let mut acc = vec![0.0; n];
            for row in chunk.chunks_exact(n) {
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            acc
        })
        .collect();
    let mut db = vec![0.0; n];
    for p in &partials {
        db.iter_mut().zip(p).for_each(|(a, v)| *a += v);
    }
    db
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (((i as u32 ^ seed).wrapping_mul(2654435761)) % 2000) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn forward_and_gradients_match_loops() {
        let d = Dims { rows: 7, k: 5, n: 3 };
        let (x, w, b, dy) = (data(35, 1), data(15, 2), data(3, 3), data(21, 4));
        let y = forward(&x, &w, &b, d);
        let (dx, dw, db) = (backward_input(&w, &dy, d), backward_weight(&x, &dy, d), backward_bias(&dy, d.n));
        for r in 0..d.rows {
            for o in 0..d.n {
                let e: f32 = b[o] + (0..d.k).map(|i| x[r * d.k + i] * w[i * d.n + o]).sum::<f32>();
                assert!((y[r * d.n + o] - e).abs() < 1e-5);
            }
            for i in 0..d.k {
                let e: f32 = (0..d.n).map(|o| dy[r * d.n + o] * w[i * d.n + o]).sum();
                assert!((dx[r * d.k + i] - e).abs() < 1e-5);
            }
        }
        for i in 0..d.k {
            for o in 0..d.n {
                let e: f32 = (0..d.rows).map(|r| x[r * d.k + i] * dy[r * d.n + o]).sum();
                assert!((dw[i * d.n + o] - e).abs() < 1e-5);
            }
        }
        for o in 0..d.n {
            let e: f32 = (0..d.rows).map(|r| dy[r * d.n + o]).sum();
            assert!((db[o] - e).abs() < 1e-5);
        }
    }
}
