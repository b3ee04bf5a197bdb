//! The DINO cross-entropy (`DINOLoss.forward` in `main_dino.py`) between fixed teacher
//! probabilities and the student's softmax, with its closed-form gradient.
//!
//! Student row r = v·B + n (view v of sample n) pairs with the teacher rows of the other global
//! views: c_r = Σ_{iq ∈ {0, 1}, iq ≠ v} q_{iq·B + n}. With lse_r = logsumexp(s_r / τ),
//! L = −1/(B·T) Σ_r (⟨c_r, s_r/τ⟩ − Σc_r · lse_r), T = 2V − 2 pairs, and
//! dL/ds_r = −(c_r − Σc_r · softmax(s_r/τ)) / (τ·B·T). Composed from burn ops this is a dozen
//! single-threaded passes over `[V·B, K]` each way; here it is one parallel pass each way.

use rayon::prelude::*;

use super::buffer::{Shared, zeroed};
use super::simd::{exp, max, multiversion};
use crate::shapes::LossDims as Dims;

multiversion! {
    /// Σ exp(x·inv_temp − shift).
    fn sum_exp(x: &[f32], inv_temp: f32, shift: f32) -> f32 {
        let mut lanes = [0.0f32; 16];
        let chunks = x.chunks_exact(16);
        let tail: f32 = chunks.remainder().iter().map(|&v| exp(v * inv_temp - shift)).sum();
        for c in chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l += exp(v * inv_temp - shift);
            }
        }
        lanes.iter().sum::<f32>() + tail
    }
}

/// The per-row scalars of the gradient.
#[derive(Clone, Copy)]
pub struct RowScalars {
    inv_temp: f32,
    lse: f32,
    /// −upstream / (τ·B·T).
    scale: f32,
    /// Σ of c's elements (the teacher probabilities' sums).
    c_sum: f32,
}

multiversion! {
    /// g = scale · (c − c_sum · exp(s·inv_temp − lse)) with c = qa + qb.
    fn row_gradient(s: &[f32], qa: &[f32], qb: &[f32], r: RowScalars, g: &mut [f32]) {
        for (((g, &s), &qa), &qb) in g.iter_mut().zip(s).zip(qa).zip(qb) {
            *g = r.scale * ((qa + qb) - r.c_sum * exp(s * r.inv_temp - r.lse));
        }
    }
}

fn check(s: &[f32], q: &[f32], d: Dims) {
    assert!(d.views >= 2, "DINO loss: fewer than two student views");
    assert_eq!(s.len(), d.views * d.batch * d.classes, "DINO loss: student output is not [views·B, K] for {d:?}");
    assert_eq!(q.len(), 2 * d.batch * d.classes, "DINO loss: teacher probabilities are not [2·B, K] for {d:?}");
}

/// Student outputs `s` `[V·B, K]`, teacher probabilities `q` `[2·B, K]`, student temperature
/// -> (the loss, lse of every student row `[V·B]` for the backward). Rows are summed in f64, in
/// row order.
pub fn forward(s: &[f32], q: &[f32], temp: f32, d: Dims) -> (f64, Vec<f32>) {
    check(s, q, d);
    let (k, inv_temp) = (d.classes, 1.0 / temp);
    let per_row: Vec<(f64, f32)> = s
        .par_chunks(k)
        .enumerate()
        .map(|(r, row)| {
            let shift = max(row) * inv_temp;
            let lse = shift + sum_exp(row, inv_temp, shift).ln();
            let mut cross = 0.0f64;
            for t in d.teacher_rows(r) {
                let q = &q[t * k..][..k];
                let (dot, q_sum) = q.iter().zip(row).fold((0.0f64, 0.0f64), |(dot, sum), (&q, &s)| {
                    (dot + q as f64 * (s * inv_temp) as f64, sum + q as f64)
                });
                cross += dot - q_sum * lse as f64;
            }
            (cross, lse)
        })
        .collect();
    let cross: f64 = per_row.iter().map(|(c, _)| c).sum();
    (-cross / (d.batch * d.pairs()) as f64, per_row.into_iter().map(|(_, lse)| lse).collect())
}

/// dL/ds `[V·B, K]` for the upstream gradient `grad` of the loss.
pub fn backward(s: &[f32], q: &[f32], lse: &[f32], temp: f32, grad: f32, d: Dims) -> Vec<f32> {
    check(s, q, d);
    assert_eq!(lse.len(), d.views * d.batch, "DINO loss backward: one lse per student row");
    let (k, inv_temp) = (d.classes, 1.0 / temp);
    let scale = -grad * inv_temp / (d.batch * d.pairs()) as f32;
    // A global view pairs with one teacher row, a local view with both: the missing one is zeros.
    let zeros = vec![0.0; k];
    let mut ds = Vec::with_capacity(s.len());
    let out = Shared::capacity_of(&mut ds);
    s.par_chunks(k).enumerate().for_each(|(r, row)| {
        let rows: Vec<&[f32]> = d.teacher_rows(r).map(|t| &q[t * k..][..k]).collect();
        let c_sum: f32 = rows.iter().map(|q| q.iter().sum::<f32>()).sum();
        let qb = rows.get(1).copied().unwrap_or(&zeros);
        // SAFETY: row r alone writes elements r·K .. (r+1)·K, inside the capacity.
        let g = zeroed(unsafe { out.uninit_slice(r * k, k) });
        row_gradient(row, rows[0], qb, RowScalars { inv_temp, lse: lse[r], scale, c_sum }, g);
    });
    // SAFETY: the rows cover every element.
    unsafe { ds.set_len(s.len()) };
    ds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        crate::cpu::test_data(len, seed, 2.0)
    }

    /// Teacher probabilities: a softmax of random logits per row.
    fn probabilities(rows: usize, k: usize) -> Vec<f32> {
        data(rows * k, 9)
            .chunks(k)
            .flat_map(|r| {
                let z: f64 = r.iter().map(|&v| (v as f64).exp()).sum();
                r.iter().map(move |&v| ((v as f64).exp() / z) as f32).collect::<Vec<_>>()
            })
            .collect()
    }

    /// The official double loop in f64.
    fn reference(s: &[f32], q: &[f32], temp: f64, d: Dims) -> f64 {
        let k = d.classes;
        let log_p = |v: usize, n: usize| -> Vec<f64> {
            let row: Vec<f64> = s[(v * d.batch + n) * k..][..k].iter().map(|&x| x as f64 / temp).collect();
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            row.iter().map(|x| x - lse).collect()
        };
        let mut total = 0.0;
        for iq in 0..2 {
            for v in (0..d.views).filter(|&v| v != iq) {
                for n in 0..d.batch {
                    let lp = log_p(v, n);
                    total +=
                        (0..k).map(|j| -(q[(iq * d.batch + n) * k + j] as f64) * lp[j]).sum::<f64>() / d.batch as f64;
                }
            }
        }
        total / d.pairs() as f64
    }

    #[test]
    fn forward_and_backward_match_the_definition() {
        let d = Dims { views: 4, batch: 3, classes: 37 };
        let (s, q) = (data(d.views * d.batch * d.classes, 1), probabilities(2 * d.batch, d.classes));
        let (loss, lse) = forward(&s, &q, 0.1, d);
        let expected = reference(&s, &q, 0.1, d);
        assert!((loss - expected).abs() < 1e-5 * expected.abs(), "{loss} vs {expected}");
        let ds = backward(&s, &q, &lse, 0.1, 1.0, d);
        let h = 1e-3;
        for i in (0..s.len()).step_by(7) {
            let (mut p, mut m) = (s.clone(), s.clone());
            p[i] += h;
            m[i] -= h;
            let slope = (reference(&p, &q, 0.1, d) - reference(&m, &q, 0.1, d)) / (2.0 * h as f64);
            assert!((ds[i] as f64 - slope).abs() < 1e-3 * (1.0 + slope.abs()), "ds[{i}] = {}, numeric {slope}", ds[i]);
        }
    }
}
