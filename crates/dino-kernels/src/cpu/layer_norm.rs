//! LayerNorm over the last dimension (`torch.nn.LayerNorm`, biased variance) with a closed-form
//! backward, on rows of a row-major `[rows, width]` buffer.
//!
//! The composed version costs about ten full passes with a fresh tensor each, forward and
//! backward; here the forward is one read and one write per element and keeps per-row
//! `(mean, 1/σ)` for the backward.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::buffer::{Shared, filled};
use super::rows_per_task;
use super::simd::{dot, multiversion, sum};

multiversion! {
    fn forward_rows(
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        y: &mut [MaybeUninit<f32>],
        stats: &mut [f32],
    ) {
        let width = gamma.len();
        for ((x, y), stats) in x.chunks_exact(width).zip(y.chunks_exact_mut(width)).zip(stats.chunks_exact_mut(2)) {
            let mean = sum(x) / width as f32;
            let y = filled(y, x.iter().map(|&x| x - mean));
            let rstd = 1.0 / (dot(y, y) / width as f32 + eps).sqrt();
            for ((y, &g), &b) in y.iter_mut().zip(gamma).zip(beta) {
                *y = *y * rstd * g + b;
            }
            stats[0] = mean;
            stats[1] = rstd;
        }
    }
}

multiversion! {
    fn backward_rows(
        x: &[f32],
        gamma: &[f32],
        stats: &[f32],
        dy: &[f32],
        dx: &mut [MaybeUninit<f32>],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        let width = gamma.len();
        let rows = x.chunks_exact(width).zip(dy.chunks_exact(width)).zip(dx.chunks_exact_mut(width));
        for (((x, dy), dx), stats) in rows.zip(stats.chunks_exact(2)) {
            let (mean, rstd) = (stats[0], stats[1]);
            // dx holds x̂ first, then the gradient.
            let dx = filled(dx, x.iter().map(|&x| (x - mean) * rstd));
            for (((dg, db), &h), &d) in dgamma.iter_mut().zip(dbeta.iter_mut()).zip(dx.iter()).zip(dy) {
                *dg += d * h;
                *db += d;
            }
            // g = dy·γ; dx = (g − mean(g) − x̂ · mean(g x̂)) / σ. Both sums in 16 lanes, so
            // that they vectorise.
            let (mut g_lanes, mut gh_lanes) = ([0.0f32; 16], [0.0f32; 16]);
            let blocks = dy.chunks_exact(16).zip(gamma.chunks_exact(16)).zip(dx.chunks_exact(16));
            for ((d, gm), h) in blocks {
                for i in 0..16 {
                    let g = d[i] * gm[i];
                    g_lanes[i] += g;
                    gh_lanes[i] += g * h[i];
                }
            }
            let tail = width - width % 16;
            let (mut g_sum, mut gh_sum) = (g_lanes.iter().sum::<f32>(), gh_lanes.iter().sum::<f32>());
            for ((&d, &gm), &h) in dy[tail..].iter().zip(&gamma[tail..]).zip(&dx[tail..]) {
                g_sum += d * gm;
                gh_sum += d * gm * h;
            }
            let (g_mean, gh_mean) = (g_sum / width as f32, gh_sum / width as f32);
            for ((dx, &d), &gm) in dx.iter_mut().zip(dy).zip(gamma) {
                *dx = (d * gm - g_mean - *dx * gh_mean) * rstd;
            }
        }
    }
}

/// `x` `[rows, width]` -> (`y` `[rows, width]`, per-row `(mean, 1/σ)` `[rows, 2]`).
pub fn forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    assert_eq!(beta.len(), width, "LayerNorm: gamma and beta lengths differ");
    assert_eq!(x.len() % width, 0, "LayerNorm: input is not a whole number of rows of {width}");
    let rows = rows_per_task(width);
    let mut y = Vec::with_capacity(x.len());
    let mut stats = vec![0.0; 2 * (x.len() / width)];
    let y_out = Shared::capacity_of(&mut y);
    stats.par_chunks_mut(2 * rows).zip(x.par_chunks(rows * width)).enumerate().for_each(|(i, (stats, x))| {
        // SAFETY: task i alone writes its rows of y, inside the capacity.
        let y = unsafe { y_out.uninit_slice(i * rows * width, x.len()) };
        forward_rows(x, gamma, beta, eps, y, stats)
    });
    // SAFETY: the tasks' rows cover all of x, so every element of y was written.
    unsafe { y.set_len(x.len()) };
    (y, stats)
}

/// Gradients of LayerNorm: (dx `[rows, width]`, dγ `[width]`, dβ `[width]`). Per-task partial
/// sums of dγ and dβ are added in task order, so the result does not depend on the thread count.
pub fn backward(x: &[f32], gamma: &[f32], stats: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    assert_eq!(x.len(), dy.len(), "LayerNorm backward: input and gradient lengths differ");
    assert_eq!(x.len() % width, 0, "LayerNorm backward: input is not a whole number of rows of {width}");
    // The tasks zip x, dy and stats: a short stats would silently leave rows unwritten.
    assert_eq!(stats.len(), 2 * (x.len() / width), "LayerNorm backward: not one (mean, 1/σ) per row");
    let rows = rows_per_task(width);
    let mut dx = Vec::with_capacity(x.len());
    let dx_out = Shared::capacity_of(&mut dx);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = x
        .par_chunks(rows * width)
        .zip(dy.par_chunks(rows * width))
        .zip(stats.par_chunks(rows * 2))
        .enumerate()
        .map(|(i, ((x, dy), stats))| {
            // SAFETY: task i alone writes its rows of dx, inside the capacity.
            let dx = unsafe { dx_out.uninit_slice(i * rows * width, x.len()) };
            let (mut dgamma, mut dbeta) = (vec![0.0; width], vec![0.0; width]);
            backward_rows(x, gamma, stats, dy, dx, &mut dgamma, &mut dbeta);
            (dgamma, dbeta)
        })
        .collect();
    // SAFETY: the tasks' rows cover all of x, so every element of dx was written.
    unsafe { dx.set_len(x.len()) };
    let (mut dgamma, mut dbeta) = (vec![0.0; width], vec![0.0; width]);
    for (pg, pb) in &partials {
        dgamma.iter_mut().zip(pg).for_each(|(a, b)| *a += b);
        dbeta.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    (dx, dgamma, dbeta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
        let w = gamma.len();
        x.chunks(w)
            .flat_map(|r| {
                let mean = r.iter().sum::<f64>() / w as f64;
                let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / w as f64;
                r.iter().zip(gamma).zip(beta).map(move |((v, g), b)| (v - mean) / (var + eps).sqrt() * g + b)
            })
            .collect()
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 2.0).collect()
    }

    #[test]
    fn forward_matches_the_definition() {
        let (w, rows) = (37, 5);
        let (x, g, b) = (data(w * rows, 1), data(w, 2), data(w, 3));
        let (y, _) = forward(&x, &g, &b, 1e-6);
        let f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let expected = reference(&f(&x), &f(&g), &f(&b), 1e-6);
        for (a, e) in y.iter().zip(expected) {
            assert!((*a as f64 - e).abs() < 1e-5, "{a} vs {e}");
        }
    }

    /// Central differences of L = Σ y·w in f64 against the closed-form gradients.
    #[test]
    fn backward_matches_finite_differences() {
        let (w, rows) = (19, 3);
        let (x, g, b, dy) = (data(w * rows, 4), data(w, 5), data(w, 6), data(w * rows, 7));
        let (_, stats) = forward(&x, &g, &b, 1e-6);
        let (dx, dg, db) = backward(&x, &g, &stats, &dy);
        let f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
            reference(x, g, b, 1e-6).iter().zip(&dy).map(|(y, d)| y * *d as f64).sum()
        };
        let (x64, g64, b64) = (f(&x), f(&g), f(&b));
        let h = 1e-6;
        let check = |name: &str, grad: &[f32], which: usize| {
            for (i, &gi) in grad.iter().enumerate() {
                let (mut p, mut m) = ([x64.clone(), g64.clone(), b64.clone()], [x64.clone(), g64.clone(), b64.clone()]);
                p[which][i] += h;
                m[which][i] -= h;
                let num = (loss(&p[0], &p[1], &p[2]) - loss(&m[0], &m[1], &m[2])) / (2.0 * h);
                assert!((gi as f64 - num).abs() < 1e-3 * (1.0 + num.abs()), "{name}[{i}] = {gi}, numeric {num}");
            }
        };
        check("dx", &dx, 0);
        check("dgamma", &dg, 1);
        check("dbeta", &db, 2);
    }
}
