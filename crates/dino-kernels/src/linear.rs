//! A fully connected layer on row-major buffers, y = x W + b with W `[in, out]` (burn's layout),
//! and its gradients, as direct gemm calls.
//!
//! burn's flex matmul allocates each output zeroed and then copies it once more to realign it,
//! on one thread, and adds the bias in a separate pass; here the output starts as the broadcast
//! bias (plus the residual stream, for [`forward_add`]) and gemm accumulates into it. When the
//! layer has many rows and a small weight, the output is made in tiles of rows, one gemm each on
//! one thread, and what follows the product (GELU) runs on each tile while it is in cache.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::buffer::{Shared, assume_init};
use crate::gelu;
use crate::matmul::{Operand, gemm};

/// Below this many multiply-adds a product runs on one thread (flex's threshold).
const PARALLEL_MIN_OPS: usize = 192 * 192 * 192;
/// Blocks of rows of the weight gradient's reduction, once there are at least
/// `WEIGHT_GRAD_MIN_ROWS` rows.
const WEIGHT_GRAD_BLOCKS: usize = 8;
const WEIGHT_GRAD_MIN_ROWS: usize = 2048;
/// Elements per parallel task for the bias passes.
const CHUNK: usize = 1 << 14;
/// Rows per tile of the tiled forward pass, about: enough that packing the weight once per tile
/// (inside gemm) stays cheap against the product, few enough that the tiles share out over
/// the threads.
const TILE_ROWS: usize = 256;

/// Sizes of one layer call: `rows` inputs of width `k` to outputs of width `n`.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub rows: usize,
    pub k: usize,
    pub n: usize,
}

impl Dims {
    /// Whether the forward runs as independent tiles of rows (each one single-threaded gemm,
    /// then its epilogue while in cache) rather than one gemm parallelised inside: worth it with
    /// enough tiles to share out and a weight small enough that packing it per tile is cheap.
    /// Depends on the sizes only, so results do not depend on the thread count.
    fn tiled(&self) -> bool {
        self.rows >= 4 * TILE_ROWS && self.k * self.n <= 1 << 20
    }

    /// Rows per tile (also the chunk of the bias and epilogue passes when not tiled): the rows
    /// split into an even number of tiles of at most about `TILE_ROWS` (so that two threads get
    /// equal shares), rounded up to a multiple of 16.
    fn tile_rows(&self) -> usize {
        let tiles = 2 * self.rows.div_ceil(2 * TILE_ROWS);
        self.rows.div_ceil(tiles).next_multiple_of(16).max(16)
    }
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

/// Writes b, plus the residual rows from `row0` on when given, into every row of `tile`.
fn init_tile<'a>(tile: &'a mut [MaybeUninit<f32>], b: &[f32], residual: Option<&[f32]>, row0: usize) -> &'a mut [f32] {
    let n = b.len();
    match residual {
        Some(r) => {
            for (row, r) in tile.chunks_exact_mut(n).zip(r[row0 * n..].chunks_exact(n)) {
                row.iter_mut().zip(r).zip(b).for_each(|((o, &r), &b)| {
                    o.write(r + b);
                });
            }
        }
        None => {
            for row in tile.chunks_exact_mut(n) {
                row.iter_mut().zip(b).for_each(|(o, &b)| {
                    o.write(b);
                });
            }
        }
    }
    // SAFETY: the tile holds whole rows (a multiple of n elements), all written above.
    unsafe { assume_init(tile) }
}

/// x `[rows, k]` W `[k, n]` + b (+ residual `[rows, n]`), then `finish(first row, tile)` on each
/// tile of `d.tile_rows()` rows of the result.
fn forward_with(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    residual: Option<&[f32]>,
    d: Dims,
    finish: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    check(x, w, d);
    assert_eq!(b.len(), d.n, "linear: bias is not [{}]", d.n);
    if let Some(r) = residual {
        assert_eq!(r.len(), d.rows * d.n, "linear: residual is not [rows, {}]", d.n);
    }
    let tile_rows = d.tile_rows();
    let tile_len = tile_rows * d.n;
    // SAFETY (both calls): the tile holds whole rows from row0, sizes were checked, so gemm reads
    // and writes inside the buffers.
    let accumulate_product = |tile: &mut [f32], row0: usize, parallelism| unsafe {
        let lhs = (x.as_ptr().add(row0 * d.k), [d.k, 1]);
        gemm(
            [tile.len() / d.n, d.n, d.k],
            (tile.as_mut_ptr(), d.n),
            true,
            lhs,
            (w.as_ptr(), [d.n, 1]),
            1.0,
            parallelism,
        );
    };
    let mut y = Vec::<f32>::with_capacity(d.rows * d.n);
    let tiles = y.spare_capacity_mut().par_chunks_mut(tile_len.max(1)).enumerate();
    if d.tiled() {
        tiles.for_each(|(t, tile)| {
            let tile = init_tile(tile, b, residual, t * tile_rows);
            accumulate_product(tile, t * tile_rows, gemm::Parallelism::None);
            finish(t * tile_rows, tile);
        });
        // SAFETY: the tiles cover all rows·n elements, each initialised by `init_tile`.
        unsafe { y.set_len(d.rows * d.n) };
    } else {
        tiles.for_each(|(t, tile)| {
            init_tile(tile, b, residual, t * tile_rows);
        });
        // SAFETY: as above.
        unsafe { y.set_len(d.rows * d.n) };
        accumulate_product(&mut y, 0, parallelism(d.rows, d.n, d.k));
        y.par_chunks_mut(tile_len.max(1)).enumerate().for_each(|(t, tile)| finish(t * tile_rows, tile));
    }
    y
}

/// x `[rows, k]`, W `[k, n]`, b `[n]` -> `[rows, n]`.
pub fn forward(x: &[f32], w: &[f32], b: &[f32], d: Dims) -> Vec<f32> {
    forward_with(x, w, b, None, d, |_, _| {})
}

/// residual `[rows, n]` + x W + b: the product accumulates onto the residual stream, which saves
/// the separate addition pass of `x + layer(y)`.
pub fn forward_add(x: &[f32], w: &[f32], b: &[f32], residual: &[f32], d: Dims) -> Vec<f32> {
    forward_with(x, w, b, Some(residual), d, |_, _| {})
}

/// GELU(x W + b) `[rows, n]`, without keeping the pre-activation (inference).
pub fn forward_gelu(x: &[f32], w: &[f32], b: &[f32], d: Dims) -> Vec<f32> {
    forward_with(x, w, b, None, d, |_, tile| gelu::forward_in_place(tile))
}

/// (h = x W + b, GELU(h)), both `[rows, n]`: the pre-activation is kept for the backward.
pub fn forward_gelu_keep(x: &[f32], w: &[f32], b: &[f32], d: Dims) -> (Vec<f32>, Vec<f32>) {
    let mut a = Vec::<f32>::with_capacity(d.rows * d.n);
    let out = Shared(a.as_mut_ptr());
    let h = forward_with(x, w, b, None, d, |row0, tile| {
        // SAFETY: tiles are disjoint row ranges inside the capacity rows·n; each is written once.
        gelu::forward_chunk(tile, unsafe { out.uninit_slice(row0 * d.n, tile.len()) })
    });
    // SAFETY: the tiles covered every row, each written in full by `forward_chunk`.
    unsafe { a.set_len(d.rows * d.n) };
    (h, a)
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
/// (~170 GFLOP/s on 2 cores against ~245 for this split): a fixed number of blocks of rows run
/// as separate single-threaded products, then are added in block order (in parallel over the
/// elements), so the result does not depend on the thread count.
pub fn backward_weight(x: &[f32], dy: &[f32], d: Dims) -> Vec<f32> {
    assert_eq!(x.len(), d.rows * d.k, "linear backward: input is not [rows, {}]", d.k);
    assert_eq!(dy.len(), d.rows * d.n, "linear backward: gradient is not [rows, {}]", d.n);
    // xᵀ[i, r] = x[r, i]: row stride 1, column stride k.
    let block = |x: &[f32], dy: &[f32], parallelism| {
        let rows = dy.len() / d.n;
        product([d.k, d.n, rows], (x.as_ptr(), [1, d.k]), (dy.as_ptr(), [d.n, 1]), parallelism)
    };
    if d.rows < WEIGHT_GRAD_MIN_ROWS {
        return block(x, dy, parallelism(d.k, d.n, d.rows));
    }
    let rows = d.rows.div_ceil(WEIGHT_GRAD_BLOCKS);
    let mut partials: Vec<Vec<f32>> = x
        .par_chunks(rows * d.k)
        .zip(dy.par_chunks(rows * d.n))
        .map(|(x, dy)| block(x, dy, gemm::Parallelism::None))
        .collect();
    let mut dw = partials.remove(0);
    dw.par_chunks_mut(CHUNK).enumerate().for_each(|(i, out)| {
        for p in &partials {
            out.iter_mut().zip(&p[i * CHUNK..]).for_each(|(a, v)| *a += v);
        }
    });
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
