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

use super::buffer::{Shared, assume_init, par_filled};
use super::gelu;
use super::matmul::{Operand, Rhs, gemm};
use super::{CHUNK, rows_per_task};
use crate::shapes::LinearDims as Dims;

/// Below this many multiply-adds a product runs on one thread (flex's threshold).
const PARALLEL_MIN_OPS: usize = 192 * 192 * 192;
/// Blocks of rows of the weight gradient's reduction, once there are at least
/// `WEIGHT_GRAD_MIN_ROWS` rows.
const WEIGHT_GRAD_BLOCKS: usize = 8;
const WEIGHT_GRAD_MIN_ROWS: usize = 2048;
/// Most rows per tile of the tiled forward pass: a tile of outputs stays in L2 for its epilogue,
/// and packing the weight once per tile (inside the f32 gemm) stays cheap against the product.
pub(super) const TILE_ROWS: usize = 512;

impl Dims {
    /// Whether the forward runs as independent tiles of rows (each one single-threaded gemm,
    /// then its epilogue while in cache) rather than one gemm parallelised inside: worth it with
    /// enough rows to share out and a weight small enough that packing it per tile is cheap.
    fn tiled(&self) -> bool {
        self.rows >= 2 * TILE_ROWS && self.k * self.n <= 1 << 20
    }

    /// Rows per tile (also the chunk of the bias and epilogue passes when not tiled): tiles of
    /// at most `TILE_ROWS` rows, see [`even_tile_rows`]. The split changes no result: gemm's
    /// reduction order depends on k only (tested).
    fn tile_rows(&self) -> usize {
        even_tile_rows(self.rows, TILE_ROWS, Rhs::row_step(), rayon::current_num_threads().max(1))
    }
}

/// Rows per tile for `rows` rows on `threads` threads: the fewest tiles of at most `most` rows
/// (at least one step), each a multiple of `step`, in a number the threads share evenly. An odd
/// tile out idles every other thread for a tile's time (3 % of ViT-S/16's inference in 33
/// tiles), and rounding up to the step can leave fewer tiles, so the count is checked after it.
pub(super) fn even_tile_rows(rows: usize, most: usize, step: usize, threads: usize) -> usize {
    let most = (most / step).max(1) * step;
    let mut tiles = threads * rows.div_ceil(threads * most).max(1);
    loop {
        let tile_rows = rows.div_ceil(tiles).next_multiple_of(step).max(step);
        if rows.div_ceil(tile_rows).is_multiple_of(threads) || tile_rows == step {
            return tile_rows;
        }
        tiles += threads;
    }
}

pub(super) fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN_OPS {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

/// A matrix read from a slice: its elements and its (row, column) strides.
type View<'a> = (&'a [f32], [usize; 2]);

/// The operand of a `rows x cols` matrix `view`, checked to lie inside its slice.
fn operand((values, [rs, cs]): View<'_>, rows: usize, cols: usize) -> Operand {
    let last = (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs;
    assert!(rows == 0 || cols == 0 || last < values.len(), "matmul: a {rows}x{cols} operand past its buffer");
    (values.as_ptr(), [rs, cs])
}

/// `lhs [m, k] · rhs [k, n]`, written by gemm into fresh memory (no zeroing pass).
fn product([m, n, k]: [usize; 3], lhs: View<'_>, rhs: View<'_>, parallelism: gemm::Parallelism) -> Vec<f32> {
    let (lhs, rhs) = (operand(lhs, m, k), operand(rhs, k, n));
    let mut out = Vec::<f32>::with_capacity(m * n);
    // SAFETY: both operands were checked to lie in their slices; gemm writes all m·n elements
    // of the fresh capacity without reading them (accumulate = false).
    unsafe {
        gemm([m, n, k], (out.as_mut_ptr(), n), false, lhs, rhs, 1.0, parallelism);
        out.set_len(m * n);
    }
    out
}

pub(super) fn check(x: &[f32], w: &[f32], d: Dims) {
    assert_eq!(x.len(), d.rows * d.k, "linear: input is not [rows, {}]", d.k);
    assert_eq!(w.len(), d.k * d.n, "linear: weight is not [{}, {}]", d.k, d.n);
}

/// Writes residual + b, the residual's rows from `row0` on, into every row of `tile`.
pub(super) fn init_tile<'a>(
    tile: &'a mut [MaybeUninit<f32>],
    b: &[f32],
    residual: &[f32],
    row0: usize,
) -> &'a mut [f32] {
    let n = b.len();
    for (row, r) in tile.chunks_exact_mut(n).zip(residual[row0 * n..].chunks_exact(n)) {
        row.iter_mut().zip(r).zip(b).for_each(|((o, &r), &b)| {
            o.write(r + b);
        });
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
    // The weight once for every tile (in bf16, rounded and packed once).
    // SAFETY: `check` found w to hold [k, n]; it outlives `rhs`.
    let rhs = unsafe { Rhs::new((w.as_ptr(), [d.n, 1]), [d.k, d.n], parallelism(d.k, d.n, d.rows)) };
    // Rows `row0..` of the output, product and bias, onto the residual's rows when given.
    // SAFETY: the tile holds whole rows from row0 and sizes were checked, so the product reads
    // and writes inside the buffers; every element of the tile is written.
    let produce = |tile: &mut [MaybeUninit<f32>], row0: usize, parallelism| unsafe {
        let (lhs, rows) = ((x.as_ptr().add(row0 * d.k), [d.k, 1]), tile.len() / d.n);
        match residual {
            Some(r) => {
                let tile = init_tile(tile, b, r, row0);
                rhs.product(rows, (tile.as_mut_ptr(), d.n), true, lhs, 1.0, parallelism);
            }
            None => rhs.product_plus_bias(rows, (tile.as_mut_ptr().cast(), d.n), lhs, b, parallelism),
        }
    };
    let mut y = Vec::<f32>::with_capacity(d.rows * d.n);
    // Sliced to rows·n: the allocator may give more capacity, which must not become a tile.
    let out = &mut y.spare_capacity_mut()[..d.rows * d.n];
    if d.tiled() {
        out.par_chunks_mut(tile_len.max(1)).enumerate().for_each(|(t, tile)| {
            produce(tile, t * tile_rows, gemm::Parallelism::None);
            // SAFETY: `produce` wrote the whole tile.
            finish(t * tile_rows, unsafe { assume_init(tile) });
        });
    } else {
        produce(out, 0, parallelism(d.rows, d.n, d.k));
    }
    // SAFETY: the product wrote all rows·n elements.
    unsafe { y.set_len(d.rows * d.n) };
    if !d.tiled() {
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
    let out = Shared::capacity_of(&mut a);
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
    product([d.rows, d.k, d.n], (dy, [d.n, 1]), (w, [1, d.n]), parallelism(d.rows, d.k, d.n))
}

/// x `[rows, k]` Wᵀ for W `[n, k]` (PyTorch's layout, no bias) -> `[rows, n]`.
pub fn forward_transposed(x: &[f32], w: &[f32], d: Dims) -> Vec<f32> {
    assert_eq!(x.len(), d.rows * d.k, "linear: input is not [rows, {}]", d.k);
    // Wᵀ[i, o] = W[o, i]: row stride 1, column stride k.
    product([d.rows, d.n, d.k], (x, [d.k, 1]), (w, [1, d.k]), parallelism(d.rows, d.n, d.k))
}

/// dL/dx = dy W `[rows, k]` for the layer of [`forward_transposed`].
pub fn backward_input_transposed(w: &[f32], dy: &[f32], d: Dims) -> Vec<f32> {
    assert_eq!(dy.len(), d.rows * d.n, "linear backward: gradient is not [rows, {}]", d.n);
    product([d.rows, d.k, d.n], (dy, [d.n, 1]), (w, [d.k, 1]), parallelism(d.rows, d.k, d.n))
}

/// dL/dW = dyᵀ x `[n, k]` for the layer of [`forward_transposed`]: one product, whose sums
/// run in an order fixed by the sizes, whatever the thread count.
pub fn backward_weight_transposed(x: &[f32], dy: &[f32], d: Dims) -> Vec<f32> {
    assert_eq!(x.len(), d.rows * d.k, "linear backward: input is not [rows, {}]", d.k);
    assert_eq!(dy.len(), d.rows * d.n, "linear backward: gradient is not [rows, {}]", d.n);
    // dyᵀ[o, r] = dy[r, o]: row stride 1, column stride n.
    product([d.n, d.k, d.rows], (dy, [1, d.n]), (x, [d.k, 1]), parallelism(d.n, d.k, d.rows))
}

/// Column sums of `dy` `[rows, n]` in row order.
fn column_sums(dy: &[f32], n: usize) -> Vec<f32> {
    let mut acc = vec![0.0; n];
    for row in dy.chunks_exact(n) {
        acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
    }
    acc
}

/// (dL/dW = xᵀ dy `[k, n]`, dL/db = column sums of dy `[n]`).
///
/// The weight gradient reduces over all rows into a small matrix, which gemm parallelises poorly
/// (~170-220 GFLOP/s on 2 cores against ~220-290 for this split): a fixed number of blocks of
/// rows run as separate single-threaded products, each also summing its rows of dy for the bias
/// while they are in cache; the blocks are added in block order (in parallel over the
/// elements), so the result does not depend on the thread count. gemm is faster with an output
/// no taller than wide, so when k > n each block makes dWᵀ and the sum is transposed.
pub fn backward_params(x: &[f32], dy: &[f32], d: Dims) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), d.rows * d.k, "linear backward: input is not [rows, {}]", d.k);
    assert_eq!(dy.len(), d.rows * d.n, "linear backward: gradient is not [rows, {}]", d.n);
    if d.rows < WEIGHT_GRAD_MIN_ROWS {
        // xᵀ[i, r] = x[r, i]: row stride 1, column stride k.
        let dw = product([d.k, d.n, d.rows], (x, [1, d.k]), (dy, [d.n, 1]), parallelism(d.k, d.n, d.rows));
        return (dw, backward_bias(dy, d.n));
    }
    let transposed = d.k > d.n;
    let rows = d.rows.div_ceil(WEIGHT_GRAD_BLOCKS);
    let mut partials: Vec<(Vec<f32>, Vec<f32>)> = x
        .par_chunks(rows * d.k)
        .zip(dy.par_chunks(rows * d.n))
        .map(|(x, dy)| {
            let rows = dy.len() / d.n;
            let (xt, dyt) = ((x, [1, d.k]), (dy, [1, d.n]));
            let none = gemm::Parallelism::None;
            let dw = if transposed {
                product([d.n, d.k, rows], dyt, (x, [d.k, 1]), none)
            } else {
                product([d.k, d.n, rows], xt, (dy, [d.n, 1]), none)
            };
            (dw, column_sums(dy, d.n))
        })
        .collect();
    let (mut sum, mut db) = partials.remove(0);
    sum.par_chunks_mut(CHUNK).enumerate().for_each(|(i, out)| {
        for (p, _) in &partials {
            out.iter_mut().zip(&p[i * CHUNK..]).for_each(|(a, v)| *a += v);
        }
    });
    for (_, p) in &partials {
        db.iter_mut().zip(p).for_each(|(a, v)| *a += v);
    }
    if !transposed {
        return (sum, db);
    }
    // sum is dWᵀ `[n, k]`.
    (transpose(&sum, d.n, d.k), db)
}

/// `x` `[rows, cols]` -> xᵀ `[cols, rows]`, in parallel chunks of output rows.
pub(crate) fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * cols, "transpose: not [{rows}, {cols}]");
    let out_rows_per_chunk = rows_per_task(rows);
    // SAFETY: each chunk of whole output rows is written in full.
    unsafe {
        par_filled(rows * cols, out_rows_per_chunk * rows, |c, out| {
            let first = c * out_rows_per_chunk;
            for (i, row) in out.chunks_exact_mut(rows).enumerate() {
                row.iter_mut().enumerate().for_each(|(j, o)| {
                    o.write(x[j * cols + first + i]);
                });
            }
        })
    }
}

/// dL/db = column sums of dy: `[n]`, summed per task then in task order (thread-count independent).
pub fn backward_bias(dy: &[f32], n: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = dy.par_chunks(rows_per_task(n) * n).map(|chunk| column_sums(chunk, n)).collect();
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
        crate::cpu::test_data(len, seed, 1.0)
    }

    /// The layer's output and gradients from f64 loops: (y, dx, dW, db).
    fn reference(x: &[f32], w: &[f32], b: &[f32], dy: &[f32], d: Dims) -> [Vec<f64>; 4] {
        let at = |v: &[f32], i: usize| v[i] as f64;
        let y = (0..d.rows * d.n)
            .map(|i| {
                at(b, i % d.n) + (0..d.k).map(|c| at(x, i / d.n * d.k + c) * at(w, c * d.n + i % d.n)).sum::<f64>()
            })
            .collect();
        let dx = (0..d.rows * d.k)
            .map(|i| (0..d.n).map(|o| at(dy, i / d.k * d.n + o) * at(w, i % d.k * d.n + o)).sum())
            .collect();
        let dw = (0..d.k * d.n)
            .map(|i| (0..d.rows).map(|r| at(x, r * d.k + i / d.n) * at(dy, r * d.n + i % d.n)).sum())
            .collect();
        let db = (0..d.n).map(|o| (0..d.rows).map(|r| at(dy, r * d.n + o)).sum()).collect();
        [y, dx, dw, db]
    }

    fn assert_close(name: &str, got: &[f32], expected: &[f64], tol: f64) {
        assert_eq!(got.len(), expected.len(), "{name}: length");
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert!((*g as f64 - e).abs() < tol * (1.0 + e.abs()), "{name}[{i}] = {g}, expected {e}");
        }
    }

    /// Few rows (one product each), and enough rows for the row tiles and the blocked weight
    /// gradient in both orientations (k < n and k > n).
    #[test]
    fn an_operand_past_its_buffer_is_refused_before_gemm_reads_it() {
        let x = [1.0f32; 6];
        assert_eq!(operand((&x, [3, 1]), 2, 3).1, [3, 1]);
        assert_eq!(operand((&x, [1, 2]), 2, 3).1, [1, 2]);
        let past = std::panic::catch_unwind(|| operand((&x, [3, 1]), 3, 3));
        assert!(past.is_err(), "3 rows of 3 in 6 elements");
        let transposed_past = std::panic::catch_unwind(|| operand((&x, [1, 3]), 3, 3));
        assert!(transposed_past.is_err());
        assert_eq!(product([2, 1, 3], (&x, [3, 1]), (&x, [1, 1]), gemm::Parallelism::None), vec![3.0, 3.0]);
    }

    #[test]
    fn forward_and_gradients_match_loops() {
        for d in [Dims { rows: 7, k: 5, n: 3 }, Dims { rows: 2100, k: 5, n: 19 }, Dims { rows: 2100, k: 19, n: 5 }] {
            let (x, w, b) = (data(d.rows * d.k, 1), data(d.k * d.n, 2), data(d.n, 3));
            let (dy, residual) = (data(d.rows * d.n, 4), data(d.rows * d.n, 5));
            let [y, dx, dw, db] = reference(&x, &w, &b, &dy, d);
            assert_close("y", &forward(&x, &w, &b, d), &y, 1e-5);
            let with_residual: Vec<f64> = y.iter().zip(&residual).map(|(y, r)| y + *r as f64).collect();
            assert_close("y + residual", &forward_add(&x, &w, &b, &residual, d), &with_residual, 1e-5);
            assert_close("dx", &backward_input(&w, &dy, d), &dx, 1e-5);
            let (got_dw, got_db) = backward_params(&x, &dy, d);
            assert_close("dW", &got_dw, &dw, 1e-4);
            assert_close("db", &got_db, &db, 1e-4);
        }
    }

    #[test]
    fn transpose_moves_every_element() {
        // 3 x 5, and 7 x 9000 (several chunks of output rows).
        for (rows, cols) in [(3, 5), (7, 9000)] {
            let x = data(rows * cols, 6);
            let t = transpose(&x, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], x[r * cols + c], "({r}, {c}) of {rows} x {cols}");
                }
            }
        }
    }

    /// The row split follows the thread count; the results must not.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let d = Dims { rows: 2100, k: 24, n: 40 };
        let (x, w, b, dy) = (data(d.rows * d.k, 1), data(d.k * d.n, 2), data(d.n, 3), data(d.rows * d.n, 4));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool");
            pool.install(|| (forward_gelu_keep(&x, &w, &b, d), backward_params(&x, &dy, d)))
        };
        let one = run(1);
        for threads in [2, 3, 8] {
            assert!(run(threads) == one, "results differ on {threads} threads");
        }
    }
}
