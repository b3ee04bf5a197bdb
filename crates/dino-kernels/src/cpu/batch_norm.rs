//! BatchNorm over dimension 1 of `[B, C, S]` (`torch.nn.BatchNorm1d/2d`; S = H·W, or 1 for
//! `[B, C]`), optionally followed by ReLU, with closed-form backward passes: with batch
//! statistics (train mode) and as a per-channel affine map (eval mode, running statistics).
//!
//! burn's composed `batch_norm_train` records about a dozen nodes, each a full pass over the
//! activation with a fresh tensor, and ReLU two more. Here the statistics are one read of x, the
//! output one read and one write, and the backward one read of x and dy for the two channel
//! sums and one pass for dx. ReLU's mask is recomputed in the backward from x with the
//! forward's own f32 arithmetic, so no extra activation is kept.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::buffer::par_filled;
use super::rows_per_task;
use super::simd::{multiversion, sum};
use crate::shapes::ChannelDims;

/// The `spatial` elements of plane (b, c), for b in 0..B.
fn planes<'a>(x: &'a [f32], d: ChannelDims, c: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
    (0..d.batch).map(move |b| &x[(b * d.channels + c) * d.spatial..][..d.spatial])
}

multiversion! {
    fn squared_deviations(x: &[f32], mean: f32) -> f32 {
        let mut lanes = [0.0f32; 16];
        for block in x.chunks_exact(16) {
            for i in 0..16 {
                let v = block[i] - mean;
                lanes[i] += v * v;
            }
        }
        let tail = x.chunks_exact(16).remainder().iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>();
        lanes.iter().sum::<f32>() + tail
    }
}

/// Per channel (mean, biased variance) as `[2, C]`: the C means, then the C variances. Two
/// passes per channel (the mean, then squared deviations from it), summed over planes in f64.
pub fn channel_stats(x: &[f32], d: ChannelDims) -> Vec<f32> {
    let n = d.per_channel() as f64;
    let stats: Vec<(f32, f32)> = (0..d.channels)
        .into_par_iter()
        .map(|c| {
            let mean = (planes(x, d, c).map(|p| sum(p) as f64).sum::<f64>() / n) as f32;
            let var = planes(x, d, c).map(|p| squared_deviations(p, mean) as f64).sum::<f64>() / n;
            (mean, var as f32)
        })
        .collect();
    stats.iter().map(|s| s.0).chain(stats.iter().map(|s| s.1)).collect()
}

/// Per channel (scale γ/σ, shift β − mean·γ/σ, 1/σ) of a normalisation by `stats`.
fn scale_shift(gamma: &[f32], beta: &[f32], stats: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mean, var) = stats.split_at(gamma.len());
    let rstd: Vec<f32> = var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect();
    let scale: Vec<f32> = gamma.iter().zip(&rstd).map(|(g, r)| g * r).collect();
    let shift = beta.iter().zip(&scale).zip(mean).map(|((b, s), m)| b - m * s).collect();
    (scale, shift, rstd)
}

multiversion! {
    fn affine_plane(x: &[f32], scale: f32, shift: f32, relu: bool, y: &mut [MaybeUninit<f32>]) {
        for (y, &x) in y.iter_mut().zip(x) {
            let v = x * scale + shift;
            // `v <= 0` is false for NaN: a non-finite activation stays visible, as torch.relu's.
            y.write(if relu && v <= 0.0 { 0.0 } else { v });
        }
    }
}

/// x · scale_c + shift_c on every plane (then ReLU), tasks of whole planes.
fn affine(x: &[f32], scale: &[f32], shift: &[f32], relu: bool, d: ChannelDims) -> Vec<f32> {
    let planes_per_task = rows_per_task(d.spatial);
    // SAFETY: each task writes every element of its chunk (whole planes, the last one shorter).
    unsafe {
        par_filled(x.len(), planes_per_task * d.spatial, |i, y| {
            for (k, y) in y.chunks_mut(d.spatial).enumerate() {
                let plane = i * planes_per_task + k;
                let c = plane % d.channels;
                affine_plane(&x[plane * d.spatial..][..d.spatial], scale[c], shift[c], relu, y);
            }
        })
    }
}

/// Train mode: x normalised by its own channel statistics `stats` (`channel_stats(x)`), then
/// γ, β (and ReLU).
pub fn forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &[f32],
    eps: f32,
    relu: bool,
    d: ChannelDims,
) -> Vec<f32> {
    let (scale, shift, _) = scale_shift(gamma, beta, stats, eps);
    affine(x, &scale, &shift, relu, d)
}

/// Eval mode: x · scale_c + shift_c (then ReLU).
pub fn forward_affine(x: &[f32], scale: &[f32], shift: &[f32], relu: bool, d: ChannelDims) -> Vec<f32> {
    affine(x, scale, shift, relu, d)
}

multiversion! {
    /// (Σ g, Σ g·(x − center)) over one plane, g = dy where the affine output x·scale + shift
    /// passed the ReLU (everywhere without one).
    fn plane_sums(x: &[f32], dy: &[f32], scale: f32, shift: f32, center: f32, relu: bool) -> (f32, f32) {
        let (mut g_lanes, mut gx_lanes) = ([0.0f32; 16], [0.0f32; 16]);
        let (xs, ds) = (x.chunks_exact(16), dy.chunks_exact(16));
        let (x_tail, d_tail) = (xs.remainder(), ds.remainder());
        let gate = |x: f32, d: f32| if relu && x * scale + shift <= 0.0 { 0.0 } else { d };
        for (x, d) in xs.zip(ds) {
            for i in 0..16 {
                let g = gate(x[i], d[i]);
                g_lanes[i] += g;
                gx_lanes[i] += g * (x[i] - center);
            }
        }
        let (mut g_sum, mut gx_sum) = (g_lanes.iter().sum::<f32>(), gx_lanes.iter().sum::<f32>());
        for (&x, &d) in x_tail.iter().zip(d_tail) {
            let g = gate(x, d);
            g_sum += g;
            gx_sum += g * (x - center);
        }
        (g_sum, gx_sum)
    }
}

/// Per channel (Σ g, Σ g·(x − center_c)), summed over planes in f64.
fn channel_sums(
    x: &[f32],
    dy: &[f32],
    scale: &[f32],
    shift: &[f32],
    center: &[f32],
    relu: bool,
    d: ChannelDims,
) -> (Vec<f32>, Vec<f32>) {
    (0..d.channels)
        .into_par_iter()
        .map(|c| {
            let (mut g, mut gx) = (0.0f64, 0.0f64);
            for (x, dy) in planes(x, d, c).zip(planes(dy, d, c)) {
                let (pg, pgx) = plane_sums(x, dy, scale[c], shift[c], center[c], relu);
                g += pg as f64;
                gx += pgx as f64;
            }
            (g as f32, gx as f32)
        })
        .unzip()
}

multiversion! {
    /// dx = a·g + (x − center)·b + k on one plane, g gated as in `plane_sums`.
    #[allow(clippy::too_many_arguments)]
    fn dx_plane(
        x: &[f32],
        dy: &[f32],
        scale: f32,
        shift: f32,
        relu: bool,
        coefficients: [f32; 4],
        dx: &mut [MaybeUninit<f32>],
    ) {
        let [a, b, k, center] = coefficients;
        for ((dx, &x), &d) in dx.iter_mut().zip(x).zip(dy) {
            let g = if relu && x * scale + shift <= 0.0 { 0.0 } else { d };
            dx.write(a * g + (x - center) * b + k);
        }
    }
}

/// dx from per-channel coefficients `[a, b, k, center]` (see `dx_plane`), tasks of whole planes.
fn dx_pass(
    x: &[f32],
    dy: &[f32],
    scale: &[f32],
    shift: &[f32],
    relu: bool,
    coefficients: &[[f32; 4]],
    d: ChannelDims,
) -> Vec<f32> {
    let planes_per_task = rows_per_task(d.spatial);
    // SAFETY: each task writes every element of its chunk (whole planes, the last one shorter).
    unsafe {
        par_filled(x.len(), planes_per_task * d.spatial, |i, dx| {
            for (k, dx) in dx.chunks_mut(d.spatial).enumerate() {
                let plane = i * planes_per_task + k;
                let (c, at) = (plane % d.channels, plane * d.spatial);
                let (x, dy) = (&x[at..][..d.spatial], &dy[at..][..d.spatial]);
                dx_plane(x, dy, scale[c], shift[c], relu, coefficients[c], dx);
            }
        })
    }
}

/// Gradients of train-mode BatchNorm (statistics of x itself, so they carry gradient too):
/// (dx, dγ, dβ). With g the gated dy, x̂ = (x − mean)/σ and N = B·S per channel:
/// dβ = Σ g, dγ = Σ g·x̂, dx = γ/σ · (g − Σ g / N − x̂ · Σ g·x̂ / N).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &[f32],
    dy: &[f32],
    eps: f32,
    relu: bool,
    d: ChannelDims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), dy.len(), "batch norm backward: input and gradient lengths differ");
    let (scale, shift, rstd) = scale_shift(gamma, beta, stats, eps);
    let mean = &stats[..d.channels];
    let (dbeta, g_centered) = channel_sums(x, dy, &scale, &shift, mean, relu, d);
    let dgamma: Vec<f32> = g_centered.iter().zip(&rstd).map(|(s, r)| s * r).collect();
    let n = d.per_channel() as f32;
    let coefficients: Vec<[f32; 4]> = (0..d.channels)
        .map(|c| {
            let a = scale[c];
            [a, -a * rstd[c] * dgamma[c] / n, -a * dbeta[c] / n, mean[c]]
        })
        .collect();
    (dx_pass(x, dy, &scale, &shift, relu, &coefficients, d), dgamma, dbeta)
}

/// Gradients of the eval-mode affine map y = x · scale_c + shift_c (then ReLU):
/// (dx = scale·g, dscale = Σ g·x, dshift = Σ g).
pub fn backward_affine(
    x: &[f32],
    scale: &[f32],
    shift: &[f32],
    dy: &[f32],
    relu: bool,
    d: ChannelDims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), dy.len(), "channel affine backward: input and gradient lengths differ");
    let zeros = vec![0.0; d.channels];
    let (dshift, dscale) = channel_sums(x, dy, scale, shift, &zeros, relu, d);
    let coefficients: Vec<[f32; 4]> = scale.iter().map(|&s| [s, 0.0, 0.0, 0.0]).collect();
    (dx_pass(x, dy, scale, shift, relu, &coefficients, d), dscale, dshift)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: ChannelDims = ChannelDims { batch: 3, channels: 2, spatial: 21 };
    const EPS: f64 = 1e-5;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 2.0).collect()
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&a| a as f64).collect()
    }

    /// The definition in f64: (x − mean) / sqrt(var + eps) · γ + β per channel, then ReLU.
    fn reference(x: &[f64], gamma: &[f64], beta: &[f64], relu: bool) -> Vec<f64> {
        let (b, c, s) = (D.batch, D.channels, D.spatial);
        let at = |bi: usize, ci: usize, si: usize| (bi * c + ci) * s + si;
        let mut y = vec![0.0; x.len()];
        for ci in 0..c {
            let idx: Vec<usize> = (0..b).flat_map(|bi| (0..s).map(move |si| at(bi, ci, si))).collect();
            let mean = idx.iter().map(|&i| x[i]).sum::<f64>() / idx.len() as f64;
            let var = idx.iter().map(|&i| (x[i] - mean).powi(2)).sum::<f64>() / idx.len() as f64;
            for &i in &idx {
                let v = (x[i] - mean) / (var + EPS).sqrt() * gamma[ci] + beta[ci];
                y[i] = if relu { v.max(0.0) } else { v };
            }
        }
        y
    }

    fn run(x: &[f32], g: &[f32], b: &[f32], relu: bool) -> Vec<f32> {
        forward(x, g, b, &channel_stats(x, D), EPS as f32, relu, D)
    }

    #[test]
    fn forward_matches_the_definition() {
        let (x, g, b) = (data(3 * 2 * 21, 1), data(2, 2), data(2, 3));
        for relu in [false, true] {
            let expected = reference(&f64s(&x), &f64s(&g), &f64s(&b), relu);
            for (a, e) in run(&x, &g, &b, relu).iter().zip(expected) {
                assert!((*a as f64 - e).abs() < 1e-5, "relu {relu}: {a} vs {e}");
            }
        }
        let stats = channel_stats(&x, D);
        assert_eq!(stats.len(), 4);
        let nan = forward(&[f32::NAN; 3 * 2 * 21], &g, &b, &stats, 1e-5, true, D);
        assert!(nan.iter().all(|v| v.is_nan()), "ReLU keeps NaN visible");
    }

    /// Central differences of L = Σ y·w in f64 against the closed-form gradients (x away from
    /// the ReLU's kink, where the derivative is defined).
    #[test]
    fn backward_matches_finite_differences() {
        let (x, g, b, w) = (data(3 * 2 * 21, 4), data(2, 5), data(2, 6), data(3 * 2 * 21, 7));
        let h = 1e-6;
        for relu in [false, true] {
            let (dx, dg, db) = backward(&x, &g, &b, &channel_stats(&x, D), &w, EPS as f32, relu, D);
            let loss = |p: &[Vec<f64>; 3]| -> f64 {
                reference(&p[0], &p[1], &p[2], relu).iter().zip(&w).map(|(y, w)| y * *w as f64).sum()
            };
            let base = [f64s(&x), f64s(&g), f64s(&b)];
            for (which, grad) in [(0, &dx), (1, &dg), (2, &db)] {
                for (i, &gi) in grad.iter().enumerate() {
                    let (mut p, mut m) = (base.clone(), base.clone());
                    p[which][i] += h;
                    m[which][i] -= h;
                    let num = (loss(&p) - loss(&m)) / (2.0 * h);
                    assert!(
                        (gi as f64 - num).abs() < 1e-3 * (1.0 + num.abs()),
                        "relu {relu}: grad {which}[{i}] = {gi}, numeric {num}"
                    );
                }
            }
        }
    }

    #[test]
    fn affine_backward_is_the_product_rule() {
        let (x, scale, shift, dy) = (data(3 * 2 * 21, 8), data(2, 9), data(2, 10), data(3 * 2 * 21, 11));
        let y = forward_affine(&x, &scale, &shift, true, D);
        let (dx, dscale, dshift) = backward_affine(&x, &scale, &shift, &dy, true, D);
        let (mut es, mut et) = (vec![0.0f64; 2], vec![0.0f64; 2]);
        for (i, ((&x, &y), &d)) in x.iter().zip(&y).zip(&dy).enumerate() {
            let c = (i / D.spatial) % D.channels;
            let g = if y > 0.0 { d } else { 0.0 };
            assert_eq!(dx[i], scale[c] * g, "dx[{i}]");
            es[c] += (g * x) as f64;
            et[c] += g as f64;
        }
        for c in 0..2 {
            assert!((dscale[c] as f64 - es[c]).abs() < 1e-4 && (dshift[c] as f64 - et[c]).abs() < 1e-4);
        }
    }
}
