//! `torch.nn.utils.weight_norm` on rows: W_k = g_k · v_k / ‖v_k‖ for v `[K, C]`, g `[K]`,
//! and its closed-form backward. DINO's last layer has K = 65536 rows; composed, the norm and
//! its gradient are about eight single-threaded passes over all K·C weights per step.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::buffer::filled;
use super::rows_per_task;
use super::simd::{dot, multiversion};

multiversion! {
    fn forward_rows(v: &[f32], g: &[f32], w: &mut [MaybeUninit<f32>], inv_norms: &mut [f32]) {
        let cols = v.len() / g.len();
        for (((v, w), &g), inv) in v.chunks_exact(cols).zip(w.chunks_exact_mut(cols)).zip(g).zip(inv_norms.iter_mut()) {
            *inv = 1.0 / dot(v, v).sqrt();
            let scale = g * *inv;
            filled(w, v.iter().map(|&v| v * scale));
        }
    }
}

multiversion! {
    /// dW (in `dv`) -> dv = g/‖v‖ · (dW − (v̂·dW) v̂), and dg = v̂·dW.
    fn backward_rows(v: &[f32], g: &[f32], inv_norms: &[f32], dv: &mut [f32], dg: &mut [f32]) {
        let cols = v.len() / g.len();
        for ((((v, dv), &g), &inv), dg) in v.chunks_exact(cols).zip(dv.chunks_exact_mut(cols)).zip(g).zip(inv_norms).zip(dg.iter_mut()) {
            let r = dot(v, dv) * inv;
            *dg = r;
            let scale = g * inv;
            for (d, &v) in dv.iter_mut().zip(v) {
                *d = scale * (*d - r * v * inv);
            }
        }
    }
}

/// v `[K, C]`, g `[K]` -> (W `[K, C]`, 1/‖v_k‖ `[K]`).
pub fn forward(v: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let rows = g.len();
    assert!(rows > 0 && v.len().is_multiple_of(rows), "weight norm: v is not [{rows}, C]");
    let cols = v.len() / rows;
    let r = rows_per_task(cols);
    // Every element written by its row (no zeroing pass: 64 MiB for DINO's head).
    let (mut w, mut inv) = (Vec::with_capacity(v.len()), vec![0.0; rows]);
    w.spare_capacity_mut()[..v.len()]
        .par_chunks_mut(r * cols)
        .zip(inv.par_chunks_mut(r))
        .zip(v.par_chunks(r * cols).zip(g.par_chunks(r)))
        .for_each(|((w, inv), (v, g))| forward_rows(v, g, w, inv));
    // SAFETY: the chunks cover v.len() elements, each written by `forward_rows`.
    unsafe { w.set_len(v.len()) };
    (w, inv)
}

/// Gradients (dv `[K, C]`, dg `[K]`) from dW `[K, C]`.
pub fn backward(v: &[f32], g: &[f32], inv_norms: &[f32], dw: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(v.len(), dw.len(), "weight norm backward: gradient and weight sizes differ");
    let cols = v.len() / g.len();
    let r = rows_per_task(cols);
    let (mut dv, mut dg) = (dw.to_vec(), vec![0.0; g.len()]);
    dv.par_chunks_mut(r * cols)
        .zip(dg.par_chunks_mut(r))
        .zip(v.par_chunks(r * cols).zip(g.par_chunks(r).zip(inv_norms.par_chunks(r))))
        .for_each(|((dv, dg), (v, (g, inv)))| backward_rows(v, g, inv, dv, dg));
    (dv, dg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(v: &[f64], g: &[f64]) -> Vec<f64> {
        let cols = v.len() / g.len();
        v.chunks(cols)
            .zip(g)
            .flat_map(|(r, g)| {
                let n = r.iter().map(|x| x * x).sum::<f64>().sqrt();
                r.iter().map(move |x| g * x / n)
            })
            .collect()
    }

    #[test]
    fn forward_and_backward_match_the_definition() {
        let (k, c) = (6, 5);
        let v: Vec<f32> = (0..k * c).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0 + 0.1).collect();
        let g: Vec<f32> = (0..k).map(|i| 0.5 + i as f32 / 4.0).collect();
        let dw: Vec<f32> = (0..k * c).map(|i| ((i * 5 % 13) as f32 - 6.0) / 5.0).collect();
        let (w, inv) = forward(&v, &g);
        let f = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<_>>();
        for (a, e) in w.iter().zip(reference(&f(&v), &f(&g))) {
            assert!((*a as f64 - e).abs() < 1e-6);
        }
        let (dv, dg) = backward(&v, &g, &inv, &dw);
        let loss = |v: &[f64], g: &[f64]| reference(v, g).iter().zip(&dw).map(|(w, d)| w * *d as f64).sum::<f64>();
        let (v64, g64, h) = (f(&v), f(&g), 1e-6);
        for i in 0..k * c {
            let (mut p, mut m) = (v64.clone(), v64.clone());
            p[i] += h;
            m[i] -= h;
            let num = (loss(&p, &g64) - loss(&m, &g64)) / (2.0 * h);
            assert!((dv[i] as f64 - num).abs() < 1e-4, "dv[{i}] {} vs {num}", dv[i]);
        }
        for i in 0..k {
            let (mut p, mut m) = (g64.clone(), g64.clone());
            p[i] += h;
            m[i] -= h;
            let num = (loss(&v64, &p) - loss(&v64, &m)) / (2.0 * h);
            assert!((dg[i] as f64 - num).abs() < 1e-4, "dg[{i}] {} vs {num}", dg[i]);
        }
    }
}
