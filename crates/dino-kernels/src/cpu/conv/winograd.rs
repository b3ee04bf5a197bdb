//! Winograd F(2x2, 3x3) (Lavin & Gray, 2016) for 3x3 stride-1 convolutions: each 2x2 block of
//! outputs ("tile") comes from a 4x4 window of the input, and in the transformed domain the
//! convolution is 16 independent products `M[ξ] = U[ξ] · V[ξ]` of the transformed weights
//! `[O, C]` by the transformed windows `[C, tiles]`. 16 multiplications per tile and channel pair
//! instead of 36: 2.25x fewer than the direct (oneDNN's) or the im2col form. The input and output
//! transforms only add and subtract, and the weight transform halves, so the result stays
//! within a few f32 roundings of the direct sum (the unit tests hold it to the im2col tolerance).
//!
//! Images go in chunks; each chunk's windows are transformed into `V` (tiles contiguous, 16
//! lanes at a time), multiplied, and transformed back in its thread's scratch buffers (its
//! products split over the threads only when chunks are fewer than threads). `conv.rs` sends
//! here the forward of 3x3 stride-1 convs, the input gradient of every stride-1 conv (a forward
//! conv), and the weight gradient from 128 channels on.

use std::mem::MaybeUninit;

use super::{Dims, parallelism, summed_over_chunks, with_scratch};
use crate::cpu::buffer::par_filled;
use crate::cpu::matmul::gemm;

/// Tiles transformed together: one 512-bit vector of f32.
const LANES: usize = 16;
/// `V` and `M` of one chunk together at most (4 MiB of f32): they are written, multiplied and
/// read back while they are in cache.
const MAX_CHUNK_FLOATS: usize = 1 << 20;
/// The same for the weight gradient, whose products sum over a chunk's tiles into `dU`: long
/// sums pay for reading and writing `dU` (`16·C·O`) once per chunk.
const MAX_WEIGHT_CHUNK_FLOATS: usize = 1 << 22;

/// Whether `d` is a convolution this module computes: 3x3, stride 1, any zero padding.
pub fn applies(d: Dims) -> bool {
    d.kernel == [3, 3] && d.stride == [1, 1]
}

/// Whether the weight gradient of `d` is faster here than as im2col products: with fewer than
/// 128 channels on either side the products are too thin to pay for packing their long
/// transformed operands. Measured on resnet18_cifar's layers at batch 64, 2 threads: 64
/// channels at 32 px 49 ms here against 35; 128 at 16 px level (31); 256 at 8 px 22 against
/// 29; 512 at 4 px 23 against 30.
pub fn applies_to_weight_gradient(d: Dims) -> bool {
    applies(d) && d.in_channels.min(d.out_channels) >= 128
}

/// Where each tile of a chunk of images reads and writes.
#[derive(Clone, Copy)]
pub(super) struct Tiling {
    d: Dims,
    /// Tiles per output row and per image.
    across: usize,
    per_image: usize,
    /// Rows and columns of a padded input plane ([`pad_input`]).
    hp: usize,
    wp: usize,
}

impl Tiling {
    fn new(d: Dims) -> Self {
        let (down, across) = (d.out_height().div_ceil(2), d.out_width().div_ceil(2));
        Self { d, across, per_image: down * across, hp: 2 * down + 2, wp: 2 * across + 2 }
    }

    /// Images per chunk: those whose `V` and transformed outputs fit `max_floats` (at least one),
    /// and no more than an even share of the batch over the threads.
    fn images_per_chunk(&self, max_floats: usize) -> usize {
        let share = self.d.batch.div_ceil(rayon::current_num_threads()).max(1);
        let per_image = 16 * (self.d.in_channels + self.d.out_channels) * self.per_image;
        (max_floats / per_image).clamp(1, share)
    }

    /// (image, tile row, tile column) of tile t.
    fn at(&self, t: usize) -> (usize, usize, usize) {
        (t / self.per_image, t % self.per_image / self.across, t % self.across)
    }

    /// The top-left of each tile's 4x4 window in channel 0 of the padded input of `nb` images.
    fn windows(&self, nb: usize) -> Vec<usize> {
        let c = self.d.in_channels;
        (0..nb * self.per_image)
            .map(|t| {
                let (i, y, x) = self.at(t);
                (i * c * self.hp + 2 * y) * self.wp + 2 * x
            })
            .collect()
    }

    /// Each tile's top-left output in channel 0 of `[nb, O, H', W']`, and whether its second
    /// row and second column lie inside (odd sizes end in half tiles).
    fn outputs(&self, nb: usize) -> Vec<Corner> {
        let (o, oh, ow) = (self.d.out_channels, self.d.out_height(), self.d.out_width());
        (0..nb * self.per_image)
            .map(|t| {
                let (i, y, x) = self.at(t);
                ((i * o * oh + 2 * y) * ow + 2 * x, 2 * y + 1 < oh, 2 * x + 1 < ow)
            })
            .collect()
    }
}

/// A tile's top-left output offset, and whether its lower row and its right column exist.
type Corner = (usize, bool, bool);

/// `U[ξ] = (G g Gᵀ)[ξ]` for every (o, c): `[16][O][C]`. (Row-major: the `gemm` crate packs it,
/// 1.3x faster on resnet18's 512-channel layer than reading it column-major unpacked.)
fn transform_weight(weight: &[f32], d: Dims) -> Vec<f32> {
    let (o_n, c_n) = (d.out_channels, d.in_channels);
    let mut u = vec![0.0; 16 * c_n * o_n];
    // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    let g = |a: [f32; 3]| [a[0], 0.5 * (a[0] + a[1] + a[2]), 0.5 * (a[0] - a[1] + a[2]), a[2]];
    for o in 0..o_n {
        for c in 0..c_n {
            let w = &weight[(o * c_n + c) * 9..][..9];
            let rows = [g([w[0], w[1], w[2]]), g([w[3], w[4], w[5]]), g([w[6], w[7], w[8]])];
            for j in 0..4 {
                let col = g([rows[0][j], rows[1][j], rows[2][j]]);
                for (i, v) in col.into_iter().enumerate() {
                    u[((i * 4 + j) * o_n + o) * c_n + c] = v;
                }
            }
        }
    }
    u
}

/// The input planes of `nb` images zero-padded so that every tile's 4x4 window lies inside:
/// `[nb·C][2·tiles_y + 2][2·tiles_x + 2]`, row r holding input row r − padding.
fn pad_input(x: &[f32], nb: usize, tiling: Tiling, padded: &mut [f32]) {
    let (d, hp, wp) = (tiling.d, tiling.hp, tiling.wp);
    let [py, px] = d.padding;
    let w = d.width;
    for (plane, src) in padded.chunks_exact_mut(hp * wp).zip(x.chunks_exact(d.height * w)).take(nb * d.in_channels) {
        for (r, row) in plane.chunks_exact_mut(wp).enumerate() {
            // wp = 2·tiles_x + 2 >= W' + 2 = W + 2·padding: the row fits.
            match r.checked_sub(py).filter(|&y| y < d.height) {
                Some(y) => {
                    row[..px].fill(0.0);
                    row[px..px + w].copy_from_slice(&src[y * w..][..w]);
                    row[px + w..].fill(0.0);
                }
                None => row.fill(0.0),
            }
        }
    }
}

crate::cpu::simd::multiversion! {
    /// `V[ξ][c][t] = (Bᵀ d B)[ξ]` for the 4x4 window d of every tile t, 16 tiles at a time:
    /// `windows[t]` is where t's window starts in channel 0 of the padded input, `v` is
    /// `[16][C][stride]` (stride a multiple of 16). Where rows of tiles are whole groups of 16
    /// (32 px and wider) a group reads four runs of 34 values; otherwise each tile's window is
    /// gathered.
    fn transform_input(padded: &[f32], windows: &[usize], tiling: Tiling, stride: usize, v: &mut [f32]) {
        let (channels, wp) = (tiling.d.in_channels, tiling.wp);
        let plane = tiling.hp * wp;
        let runs = tiling.across.is_multiple_of(LANES);
        for c in 0..channels {
            for (g, group) in windows.chunks(LANES).enumerate() {
                let mut d = [[[0.0f32; LANES]; 4]; 4];
                for (r, dr) in d.iter_mut().enumerate() {
                    if runs {
                        let from = c * plane + group[0] + r * wp;
                        let run = &padded[from..from + 2 * LANES + 2];
                        for l in 0..LANES {
                            for j in 0..4 {
                                dr[j][l] = run[2 * l + j];
                            }
                        }
                    } else {
                        for (l, &w) in group.iter().enumerate() {
                            let window = &padded[c * plane + w + r * wp..][..4];
                            for j in 0..4 {
                                dr[j][l] = window[j];
                            }
                        }
                    }
                }
                // Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], on rows then
                // columns.
                let mut e = [[[0.0f32; LANES]; 4]; 4];
                for j in 0..4 {
                    for l in 0..LANES {
                        e[0][j][l] = d[0][j][l] - d[2][j][l];
                        e[1][j][l] = d[1][j][l] + d[2][j][l];
                        e[2][j][l] = d[2][j][l] - d[1][j][l];
                        e[3][j][l] = d[1][j][l] - d[3][j][l];
                    }
                }
                // Whole groups of lanes: past the last tile they land in the padding of `stride`.
                let first = c * stride + g * LANES;
                for (a, row) in e.iter().enumerate() {
                    let at = |b: usize| (a * 4 + b) * channels * stride + first;
                    for l in 0..LANES {
                        v[at(0) + l] = row[0][l] - row[2][l];
                        v[at(1) + l] = row[1][l] + row[2][l];
                        v[at(2) + l] = row[2][l] - row[1][l];
                        v[at(3) + l] = row[1][l] - row[3][l];
                    }
                }
            }
        }
    }
}

crate::cpu::simd::multiversion! {
    /// `out = Aᵀ M A` per tile: `m` is `[16][O][stride]`, `outputs[t]` the offset of tile t's
    /// top-left output in plane 0 of `out` (`[nb][O][H'][W']`, planes `plane` apart); outputs
    /// past the bottom or right edge (odd sizes) are dropped. The tiles cover every output, so
    /// `out` needs no zeroing first.
    #[allow(clippy::too_many_arguments)]
    fn transform_output(m: &[f32], outputs: &[Corner], plane: usize, ow: usize, channels: usize, stride: usize, out: &mut [MaybeUninit<f32>]) {
        for o in 0..channels {
            for (g, group) in outputs.chunks(LANES).enumerate() {
                let at = |k: usize| (k * channels + o) * stride + g * LANES;
                // Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]], on rows then columns.
                let mut s = [[[0.0f32; LANES]; 4]; 2];
                for j in 0..4 {
                    let (m0, m1, m2, m3) = (&m[at(j)..][..LANES], &m[at(4 + j)..][..LANES], &m[at(8 + j)..][..LANES], &m[at(12 + j)..][..LANES]);
                    for l in 0..LANES {
                        s[0][j][l] = m0[l] + m1[l] + m2[l];
                        s[1][j][l] = m1[l] - m2[l] - m3[l];
                    }
                }
                for (l, &(first, down, right)) in group.iter().enumerate() {
                    let first = first + o * plane;
                    for (a, row) in s.iter().enumerate() {
                        if a == 1 && !down {
                            break;
                        }
                        out[first + a * ow] = MaybeUninit::new(row[0][l] + row[1][l] + row[2][l]);
                        if right {
                            out[first + a * ow + 1] = MaybeUninit::new(row[1][l] - row[2][l] - row[3][l]);
                        }
                    }
                }
            }
        }
    }
}

crate::cpu::simd::multiversion! {
    /// `dM[ξ][o][t] = (A dy Aᵀ)[ξ]` for the 2x2 output gradient of tile t (zero past the edges):
    /// `dy` is `[nb][O][H'][W']`, `dm` `[16][O][stride]`.
    fn transform_gradient(dy: &[f32], outputs: &[Corner], plane: usize, ow: usize, channels: usize, stride: usize, dm: &mut [f32]) {
        for o in 0..channels {
            for (g, group) in outputs.chunks(LANES).enumerate() {
                let mut y = [[[0.0f32; LANES]; 2]; 2];
                for (l, &(first, down, right)) in group.iter().enumerate() {
                    let first = first + o * plane;
                    y[0][0][l] = dy[first];
                    y[0][1][l] = if right { dy[first + 1] } else { 0.0 };
                    y[1][0][l] = if down { dy[first + ow] } else { 0.0 };
                    y[1][1][l] = if down && right { dy[first + ow + 1] } else { 0.0 };
                }
                // A = [[1, 0], [1, 1], [1, -1], [0, -1]], on rows then columns.
                let mut r = [[[0.0f32; LANES]; 2]; 4];
                for j in 0..2 {
                    for l in 0..LANES {
                        r[0][j][l] = y[0][j][l];
                        r[1][j][l] = y[0][j][l] + y[1][j][l];
                        r[2][j][l] = y[0][j][l] - y[1][j][l];
                        r[3][j][l] = -y[1][j][l];
                    }
                }
                for (i, row) in r.iter().enumerate() {
                    let at = |k: usize| ((i * 4 + k) * channels + o) * stride + g * LANES;
                    for l in 0..LANES {
                        dm[at(0) + l] = row[0][l];
                        dm[at(1) + l] = row[0][l] + row[1][l];
                        dm[at(2) + l] = row[0][l] - row[1][l];
                        dm[at(3) + l] = -row[1][l];
                    }
                }
            }
        }
    }
}

/// `f(stride, V, scratch)` for a chunk `x` of `nb` images: `V` its transformed windows
/// `[16][C][stride]` (stride: the tiles rounded up to whole groups of lanes), `scratch` room for
/// `[16][O][stride]`; all three buffers this thread's.
fn with_transformed_input<R>(
    x: &[f32],
    nb: usize,
    tiling: Tiling,
    f: impl FnOnce(usize, &[f32], &mut [f32]) -> R,
) -> R {
    let (c_n, o_n) = (tiling.d.in_channels, tiling.d.out_channels);
    let stride = (nb * tiling.per_image).next_multiple_of(LANES);
    let padded_len = nb * c_n * tiling.hp * tiling.wp;
    with_scratch([padded_len, 16 * c_n * stride, 16 * o_n * stride], |[padded, v, scratch]| {
        pad_input(x, nb, tiling, padded);
        transform_input(padded, &tiling.windows(nb), tiling, stride, v);
        f(stride, v, scratch)
    })
}

/// x `[B, C, H, W]`, weight `[O, C, 3, 3]` -> `[B, O, H', W']` for a 3x3 stride-1 conv.
pub fn forward(x: &[f32], weight: &[f32], d: Dims) -> Vec<f32> {
    assert!(applies(d), "winograd: not a 3x3 stride-1 conv: {d:?}");
    let tiling = Tiling::new(d);
    let (o_n, c_n, plane) = (d.out_channels, d.in_channels, d.out_pixels());
    let nb = tiling.images_per_chunk(MAX_CHUNK_FLOATS);
    let par = parallelism(d, nb);
    let u = transform_weight(weight, d);
    let x_chunks: Vec<&[f32]> = x.chunks(nb * d.in_pixels()).collect();
    let fill = |i: usize, out: &mut [MaybeUninit<f32>]| {
        let nb = out.len() / (o_n * plane);
        let t_n = nb * tiling.per_image;
        with_transformed_input(x_chunks[i], nb, tiling, |stride, v, m| {
            for xi in 0..16 {
                // SAFETY: U[ξ] [O, C], V[ξ] [C, t_n] and M[ξ] [O, t_n] are row-major, the last
                // two with row stride `stride` >= t_n.
                unsafe {
                    gemm(
                        [o_n, t_n, c_n],
                        (m[xi * o_n * stride..].as_mut_ptr(), stride),
                        false,
                        (u[xi * o_n * c_n..].as_ptr(), [c_n, 1]),
                        (v[xi * c_n * stride..].as_ptr(), [stride, 1]),
                        1.0,
                        par,
                    )
                };
            }
            transform_output(m, &tiling.outputs(nb), plane, d.out_width(), o_n, stride, out);
        });
    };
    // SAFETY: `transform_output` writes every output of the chunk (each lies in one tile).
    unsafe { par_filled(d.batch * o_n * plane, nb * o_n * plane, fill) }
}

/// Gradient of the weight `[O, C, 3, 3]` of a 3x3 stride-1 conv from x `[B, C, H, W]` and dy
/// `[B, O, H', W']`. The forward is `y = Aᵀ[(G g Gᵀ) ⊙ V]A` per tile, so by its adjoint
/// `dg = Gᵀ [Σ_tiles (A dy Aᵀ) ⊙ V] G`: the sum is 16 products `dU[ξ] = Σ_t dM[ξ][·, t] V[ξ][·, t]ᵀ`,
/// made as their transposes `[C, O]` (the orientation the `gemm` crate runs fastest here, as
/// in the im2col weight gradient).
pub fn backward_weight(x: &[f32], dy: &[f32], d: Dims) -> Vec<f32> {
    assert!(applies(d), "winograd: not a 3x3 stride-1 conv: {d:?}");
    let tiling = Tiling::new(d);
    let (o_n, c_n, plane) = (d.out_channels, d.in_channels, d.out_pixels());
    let nb = tiling.images_per_chunk(MAX_WEIGHT_CHUNK_FLOATS);
    let par = parallelism(d, nb);
    let du_t = summed_over_chunks((x, nb * d.in_pixels()), (dy, nb * o_n * plane), 16 * c_n * o_n, |du_t, x, dy| {
        let nb = dy.len() / (o_n * plane);
        let t_n = nb * tiling.per_image;
        with_transformed_input(x, nb, tiling, |stride, v, dm| {
            transform_gradient(dy, &tiling.outputs(nb), plane, d.out_width(), o_n, stride, dm);
            for xi in 0..16 {
                // SAFETY: V[ξ] [C, t_n] row-major with row stride `stride`; dM[ξ]ᵀ is dM[ξ]
                // [O, t_n] read with strides (1, stride); dU[ξ]ᵀ [C, O] dense.
                unsafe {
                    gemm(
                        [c_n, o_n, t_n],
                        (du_t[xi * c_n * o_n..].as_mut_ptr(), o_n),
                        true,
                        (v[xi * c_n * stride..].as_ptr(), [stride, 1]),
                        (dm[xi * o_n * stride..].as_ptr(), [1, stride]),
                        1.0,
                        par,
                    )
                };
            }
        });
    });
    // dg = Gᵀ dU G, Gᵀ = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2, 0], [0, 1/2, 1/2, 1]].
    let gt = |u: [f32; 4]| [u[0] + 0.5 * (u[1] + u[2]), 0.5 * (u[1] - u[2]), 0.5 * (u[1] + u[2]) + u[3]];
    let mut dw = vec![0.0; o_n * c_n * 9];
    // c outer: dU[ξ]ᵀ's rows are read in order (o inner is contiguous in all 16).
    for c in 0..c_n {
        for o in 0..o_n {
            let du = |i: usize, j: usize| du_t[((i * 4 + j) * c_n + c) * o_n + o];
            let rows: [[f32; 3]; 4] = std::array::from_fn(|i| gt([du(i, 0), du(i, 1), du(i, 2), du(i, 3)]));
            let out = &mut dw[(o * c_n + c) * 9..][..9];
            for b in 0..3 {
                let col = gt([rows[0][b], rows[1][b], rows[2][b], rows[3][b]]);
                for a in 0..3 {
                    out[a * 3 + b] = col[a];
                }
            }
        }
    }
    dw
}
