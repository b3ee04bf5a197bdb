//! Conv2d without bias (groups 1, dilation 1, zero padding) on NCHW buffers. 3x3 stride-1
//! convolutions, and the input gradient of every stride-1 conv, run as Winograd F(2x2, 3x3)
//! ([`winograd`]); the rest as im2col products over chunks of whole images: the columns of a
//! chunk, `[C·kh·kw, nb·h'·w']`, form one product with the weight `[O, C·kh·kw]`, so the late
//! stages of a ResNet (a 4x4 or 2x2 grid per image) still give the matrix kernel hundreds of
//! columns and pack the weight once per chunk. burn-flex runs one product per image tile there,
//! with a handful of rows, and its weight gradient on one thread. Chunks run in parallel; each
//! product runs on its chunk's thread.

mod winograd;

use rayon::prelude::*;

use super::matmul::gemm;
use crate::shapes::ConvDims as Dims;

/// Columns of one chunk at most in the forward and input-gradient products, `[C·kh·kw, n]`
/// within 4 MiB of f32: the columns are written, packed and read again, and chunks this small
/// stay in the caches between (1.3x on resnet18's 64-channel layer against 16 MiB).
const MAX_CHUNK_FLOATS: usize = 1 << 20;
/// The same for the weight gradient, whose products sum over a chunk's pixels into `dw`: long
/// sums pay for reading and writing `dw` once per chunk (4 MiB chunks were 1.4x slower on a
/// 512-channel layer at 4x4 pixels).
const MAX_WEIGHT_CHUNK_FLOATS: usize = 1 << 22;

/// Images per chunk: as many as fit `max_floats` (at least one), and no more than an even share
/// of the batch over twice the threads, so every thread gets work.
fn images_per_chunk(d: Dims, max_floats: usize) -> usize {
    let per_image = d.col_len() * d.out_pixels();
    let fit = (max_floats / per_image.max(1)).max(1);
    let share = d.batch.div_ceil(2 * rayon::current_num_threads()).max(1);
    fit.min(share)
}

/// The product's own parallelism: none when the chunks already spread over the threads.
fn parallelism(d: Dims, nb: usize) -> gemm::Parallelism {
    if d.batch.div_ceil(nb) >= rayon::current_num_threads() {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(0)
    }
}

/// The output columns `ox` whose input column `ox·stride + k − pad` lies in `0..width`.
fn valid_columns(out_width: usize, width: usize, k: usize, stride: usize, pad: usize) -> std::ops::Range<usize> {
    let lo = pad.saturating_sub(k).div_ceil(stride);
    let hi = (width + pad).saturating_sub(k).div_ceil(stride).min(out_width);
    lo..hi.max(lo)
}

/// Scratch buffers of `sizes` elements, kept per thread between calls (their contents are
/// stale: callers overwrite what they read). A call nested in another on the same thread (rayon
/// runs a waiting thread's tasks) gets fresh ones.
fn with_scratch<const N: usize, R>(sizes: [usize; N], f: impl FnOnce([&mut [f32]; N]) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = Default::default();
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffers) => {
            if buffers.len() < N {
                buffers.resize_with(N, Vec::new);
            }
            for (v, &n) in buffers.iter_mut().zip(&sizes) {
                if v.len() < n {
                    v.resize(n, 0.0);
                }
            }
            let mut buffers = buffers.iter_mut();
            f(sizes.map(|n| &mut buffers.next().expect("N buffers")[..n]))
        }
        Err(_) => {
            let mut fresh: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
            let mut fresh = fresh.iter_mut();
            f(sizes.map(|n| &mut fresh.next().expect("N buffers")[..n]))
        }
    })
}

/// `Σ_chunks f(acc, x chunk, dy chunk)` into `len` zeros: each thread adds its chunks' products
/// into its own accumulator, then the accumulators are added (the weight gradients).
fn summed_over_chunks(
    (x, x_chunk): (&[f32], usize),
    (dy, dy_chunk): (&[f32], usize),
    len: usize,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync + Send,
) -> Vec<f32> {
    x.par_chunks(x_chunk)
        .zip(dy.par_chunks(dy_chunk))
        .fold(
            || vec![0.0; len],
            |mut acc, (x, dy)| {
                f(&mut acc, x, dy);
                acc
            },
        )
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        })
        .unwrap_or_else(|| vec![0.0; len])
}

/// Every output row of a chunk's columns `[C·kh·kw, nb·h'·w']`: `f(col, pixel, valid)` with
/// `col` the offset of its `w'` columns, `valid` those that read inside the image, and `pixel`
/// the input offset the first valid one reads (`None` when the kernel row lies in the padding).
/// Valid column j reads pixel + (j − valid.start)·stride.
fn for_each_output_row(nb: usize, d: Dims, mut f: impl FnMut(usize, Option<usize>, std::ops::Range<usize>)) {
    let (oh, ow) = (d.out_height(), d.out_width());
    for c in 0..d.in_channels {
        for ky in 0..d.kernel[0] {
            for kx in 0..d.kernel[1] {
                let r = (c * d.kernel[0] + ky) * d.kernel[1] + kx;
                let valid = valid_columns(ow, d.width, kx, d.stride[1], d.padding[1]);
                for i in 0..nb {
                    for oy in 0..oh {
                        let col = (r * nb + i) * oh * ow + oy * ow;
                        let iy = (oy * d.stride[0] + ky).checked_sub(d.padding[0]).filter(|&y| y < d.height);
                        let pixel = iy.filter(|_| !valid.is_empty()).map(|iy| {
                            ((i * d.in_channels + c) * d.height + iy) * d.width + valid.start * d.stride[1] + kx
                                - d.padding[1]
                        });
                        f(col, pixel, valid.clone());
                    }
                }
            }
        }
    }
}

/// im2col of `nb` whole images `x` (NCHW): `cols[r, i·h'w' + q]` for patch row r = (c, ky, kx)
/// and output pixel q of image i; zero where the kernel overhangs the padding.
fn im2col(x: &[f32], nb: usize, d: Dims, cols: &mut [f32]) {
    let (ow, stride) = (d.out_width(), d.stride[1]);
    for_each_output_row(nb, d, |col, pixel, valid| {
        let out = &mut cols[col..col + ow];
        let Some(pixel) = pixel else {
            out.fill(0.0);
            return;
        };
        out[..valid.start].fill(0.0);
        out[valid.end..].fill(0.0);
        if stride == 1 {
            out[valid.clone()].copy_from_slice(&x[pixel..pixel + valid.len()]);
        } else {
            for (o, v) in out[valid].iter_mut().zip(x[pixel..].iter().step_by(stride)) {
                *o = *v;
            }
        }
    });
}

/// The adjoint of [`im2col`]: adds `cols` back onto the pixels they were read from.
fn col2im(cols: &[f32], nb: usize, d: Dims, x: &mut [f32]) {
    let (ow, stride) = (d.out_width(), d.stride[1]);
    for_each_output_row(nb, d, |col, pixel, valid| {
        if let Some(pixel) = pixel {
            for (x, v) in x[pixel..].iter_mut().step_by(stride).zip(&cols[col..col + ow][valid]) {
                *x += v;
            }
        }
    });
}

/// NCHW `[nb, O, q]` <-> channel-major `[O, nb·q]`, `q` pixels per image.
fn to_channel_major(src: &[f32], nb: usize, channels: usize, q: usize, dst: &mut [f32]) {
    for i in 0..nb {
        for o in 0..channels {
            dst[(o * nb + i) * q..][..q].copy_from_slice(&src[(i * channels + o) * q..][..q]);
        }
    }
}

fn from_channel_major(src: &[f32], nb: usize, channels: usize, q: usize, dst: &mut [f32]) {
    for i in 0..nb {
        for o in 0..channels {
            dst[(i * channels + o) * q..][..q].copy_from_slice(&src[(o * nb + i) * q..][..q]);
        }
    }
}

/// x `[B, C, H, W]`, weight `[O, C, kh, kw]` -> `[B, O, H', W']`: 3x3 stride-1 convs by
/// Winograd's F(2x2, 3x3), any other as im2col products.
pub fn forward(x: &[f32], weight: &[f32], d: Dims) -> Vec<f32> {
    assert_eq!(x.len(), d.batch * d.in_channels * d.height * d.width, "conv2d: input is not {d:?}");
    assert_eq!(weight.len(), d.out_channels * d.col_len(), "conv2d: weight is not {d:?}");
    if winograd::applies(d) {
        return winograd::forward(x, weight, d);
    }
    let (q, k, o) = (d.out_pixels(), d.col_len(), d.out_channels);
    let nb = images_per_chunk(d, MAX_CHUNK_FLOATS);
    let par = parallelism(d, nb);
    let mut out = vec![0.0; d.batch * o * q];
    out.par_chunks_mut(nb * o * q).zip(x.par_chunks(nb * d.in_pixels())).for_each(|(out, x)| {
        let nb = out.len() / (o * q);
        let n = nb * q;
        with_scratch([k * n, o * n], |[cols, y]| {
            im2col(x, nb, d, cols);
            // SAFETY: weight [O, K], cols [K, n] and y [O, n] are dense with the strides given.
            unsafe {
                gemm(
                    [o, n, k],
                    (y.as_mut_ptr(), n),
                    false,
                    (weight.as_ptr(), [k, 1]),
                    (cols.as_ptr(), [n, 1]),
                    1.0,
                    par,
                )
            };
            from_channel_major(y, nb, o, q, out);
        });
    });
    out
}

/// Gradient of the input `[B, C, H, W]` from weight `[O, C, kh, kw]` and dy `[B, O, H', W']`.
/// With stride 1 it is itself a convolution of dy, by the weight flipped in space with its
/// channel axes swapped, padded by k − 1 − padding: [`forward`] computes it (Winograd for
/// 3x3), with no `[C·kh·kw, pixels]` columns to write and fold back.
pub fn backward_input(weight: &[f32], dy: &[f32], d: Dims) -> Vec<f32> {
    let (q, k, o) = (d.out_pixels(), d.col_len(), d.out_channels);
    assert_eq!(dy.len(), d.batch * o * q, "conv2d backward: dy is not {d:?}");
    if d.stride == [1, 1] && d.padding[0] < d.kernel[0] && d.padding[1] < d.kernel[1] {
        let [kh, kw] = d.kernel;
        let c_n = d.in_channels;
        let mut flipped = vec![0.0; weight.len()];
        for (i, w) in weight.chunks_exact(kh * kw).enumerate() {
            let (oc, c) = (i / c_n, i % c_n);
            let dst = &mut flipped[(c * o + oc) * kh * kw..][..kh * kw];
            dst.iter_mut().zip(w.iter().rev()).for_each(|(d, w)| *d = *w);
        }
        let transposed = Dims {
            batch: d.batch,
            in_channels: o,
            height: d.out_height(),
            width: d.out_width(),
            out_channels: c_n,
            kernel: d.kernel,
            stride: [1, 1],
            padding: [kh - 1 - d.padding[0], kw - 1 - d.padding[1]],
        };
        return forward(dy, &flipped, transposed);
    }
    let nb = images_per_chunk(d, MAX_CHUNK_FLOATS);
    let par = parallelism(d, nb);
    let mut dx = vec![0.0; d.batch * d.in_pixels()];
    dx.par_chunks_mut(nb * d.in_pixels()).zip(dy.par_chunks(nb * o * q)).for_each(|(dx, dy)| {
        let nb = dy.len() / (o * q);
        let n = nb * q;
        with_scratch([k * n, o * n], |[dcols, g]| {
            to_channel_major(dy, nb, o, q, g);
            // SAFETY: Wᵀ is weight [O, K] read with strides (1, K); g [O, n], dcols [K, n] dense.
            unsafe {
                gemm(
                    [k, n, o],
                    (dcols.as_mut_ptr(), n),
                    false,
                    (weight.as_ptr(), [1, k]),
                    (g.as_ptr(), [n, 1]),
                    1.0,
                    par,
                )
            };
            col2im(dcols, nb, d, dx);
        });
    });
    dx
}

/// Gradient of the weight `[O, C, kh, kw]` from x `[B, C, H, W]` and dy `[B, O, H', W']`: each
/// thread sums its chunks' products, then the partial sums are added. The products make the
/// transpose `[C·kh·kw, O]`: the `gemm` crate's tiles fit its many rows and few columns (2.4x
/// faster on resnet18's 64-channel layer than `[O, C·kh·kw]`).
pub fn backward_weight(x: &[f32], dy: &[f32], d: Dims) -> Vec<f32> {
    let (q, k, o) = (d.out_pixels(), d.col_len(), d.out_channels);
    assert_eq!(dy.len(), d.batch * o * q, "conv2d backward: dy is not {d:?}");
    if winograd::applies_to_weight_gradient(d) {
        return winograd::backward_weight(x, dy, d);
    }
    let nb = images_per_chunk(d, MAX_WEIGHT_CHUNK_FLOATS);
    let par = parallelism(d, nb);
    let dw_t = summed_over_chunks((x, nb * d.in_pixels()), (dy, nb * o * q), o * k, |dw_t, x, dy| {
        let nb = dy.len() / (o * q);
        let n = nb * q;
        with_scratch([k * n, o * n], |[cols, g]| {
            im2col(x, nb, d, cols);
            to_channel_major(dy, nb, o, q, g);
            // SAFETY: cols [K, n] dense; gᵀ is g [O, n] read with strides (1, n); dwᵀ [K, O].
            unsafe {
                gemm([k, o, n], (dw_t.as_mut_ptr(), o), true, (cols.as_ptr(), [n, 1]), (g.as_ptr(), [1, n]), 1.0, par)
            };
        });
    });
    (0..o * k).map(|i| dw_t[(i % k) * o + i / k]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The convolution and, for an output gradient g, the gradients of x and w, by the
    /// definition in f64.
    fn reference(x: &[f32], w: &[f32], g: &[f32], d: Dims) -> [Vec<f64>; 3] {
        let (oh, ow) = (d.out_height(), d.out_width());
        let (mut out, mut dx, mut dw) = (vec![0.0; g.len()], vec![0.0; x.len()], vec![0.0; w.len()]);
        for b in 0..d.batch {
            for o in 0..d.out_channels {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let at = ((b * d.out_channels + o) * oh + oy) * ow + ox;
                        for c in 0..d.in_channels {
                            for ky in 0..d.kernel[0] {
                                for kx in 0..d.kernel[1] {
                                    let iy = (oy * d.stride[0] + ky) as isize - d.padding[0] as isize;
                                    let ix = (ox * d.stride[1] + kx) as isize - d.padding[1] as isize;
                                    if !(0..d.height as isize).contains(&iy) || !(0..d.width as isize).contains(&ix) {
                                        continue;
                                    }
                                    let xi = ((b * d.in_channels + c) * d.height + iy as usize) * d.width + ix as usize;
                                    let wi = ((o * d.in_channels + c) * d.kernel[0] + ky) * d.kernel[1] + kx;
                                    out[at] += x[xi] as f64 * w[wi] as f64;
                                    dx[xi] += g[at] as f64 * w[wi] as f64;
                                    dw[wi] += g[at] as f64 * x[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        [out, dx, dw]
    }

    fn noise(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 8388608.0 - 1.0).collect()
    }

    fn max_err(ours: &[f32], reference: &[f64]) -> f64 {
        assert_eq!(ours.len(), reference.len());
        ours.iter().zip(reference).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max)
    }

    /// Forward and both gradients against the definition: 3x3 (Winograd at stride 1, with
    /// padding 0, 1 and 2, odd sizes that leave half tiles, and more tiles than a group of
    /// lanes), 1x1 and 7x7 kernels, strides 1 and 2, non-square sizes, chunks of several images.
    #[test]
    fn conv_and_its_gradients_match_the_definition() {
        for (kernel, stride, padding, height, width) in [
            (3, 1, 1, 7, 5),
            (3, 1, 0, 6, 9),
            (3, 1, 2, 5, 4),
            (3, 1, 1, 17, 19),
            (3, 2, 1, 7, 6),
            (1, 2, 0, 5, 5),
            (1, 1, 0, 4, 3),
            (7, 2, 3, 9, 11),
            (7, 1, 3, 8, 7),
        ] {
            let d = Dims {
                batch: 5,
                in_channels: 3,
                height,
                width,
                out_channels: 4,
                kernel: [kernel, kernel],
                stride: [stride, stride],
                padding: [padding, padding],
            };
            let x = noise(d.batch * d.in_pixels(), 1);
            let w = noise(d.out_channels * d.col_len(), 2);
            let g = noise(d.batch * d.out_channels * d.out_pixels(), 3);
            let [out, dx, dw] = reference(&x, &w, &g, d);
            assert!(max_err(&forward(&x, &w, d), &out) < 1e-5, "{d:?}: forward");
            assert!(max_err(&backward_input(&w, &g, d), &dx) < 1e-5, "{d:?}: input gradient");
            assert!(max_err(&backward_weight(&x, &g, d), &dw) < 1e-4, "{d:?}: weight gradient");
            if winograd::applies(d) {
                // Used from 128 channels on; checked here on every shape it applies to.
                assert!(max_err(&winograd::backward_weight(&x, &g, d), &dw) < 1e-4, "{d:?}: Winograd weight gradient");
            }
        }
    }
}
