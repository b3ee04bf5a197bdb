//! Parameter updates on flat f32 buffers, one parallel pass each: the AdamW step and the EMA
//! of the teacher. Composed from tensor ops they take about ten single-threaded passes with a
//! fresh buffer each (burn's flex runs elementwise ops on one thread).

use rayon::prelude::*;

use super::CHUNK;
use super::simd::{dot, multiversion};

/// The scalars of one AdamW step (`torch.optim.AdamW`), already reduced to f32 factors.
#[derive(Debug, Clone, Copy)]
pub struct AdamwScalars {
    /// 1 − lr·wd: decoupled weight decay, applied before the update as torch does.
    pub decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// 1 / √(1 − β₂ᵗ).
    pub inv_sqrt_bias2: f32,
    pub eps: f32,
    /// lr / (1 − β₁ᵗ).
    pub step_size: f32,
    /// Factor on the gradient first: the clipping coefficient, or 1.
    pub grad_scale: f32,
}

impl AdamwScalars {
    /// The factors of step `step` (counted from 1) for learning rate `lr`, weight decay `wd`,
    /// `betas` and `eps`, computed in f64.
    pub fn new(lr: f64, wd: f64, (beta1, beta2): (f64, f64), eps: f64, step: i32) -> Self {
        Self {
            decay: (1.0 - lr * wd) as f32,
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            inv_sqrt_bias2: (1.0 - beta2.powi(step)).sqrt().recip() as f32,
            eps: eps as f32,
            step_size: (lr / (1.0 - beta1.powi(step))) as f32,
            grad_scale: 1.0,
        }
    }

    /// The same step on the gradient times `scale` (gradient clipping folded into the update).
    pub fn with_grad_scale(self, scale: f64) -> Self {
        Self { grad_scale: scale as f32, ..self }
    }
}

multiversion! {
    fn adamw_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: AdamwScalars) {
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = g * s.grad_scale;
            *m = *m * s.beta1 + g * (1.0 - s.beta1);
            *v = *v * s.beta2 + g * g * (1.0 - s.beta2);
            let denom = v.sqrt() * s.inv_sqrt_bias2 + s.eps;
            *p = *p * s.decay - *m / denom * s.step_size;
        }
    }
}

multiversion! {
    fn squares_chunk(x: &[f32]) -> f64 {
        dot(x, x) as f64
    }
}

multiversion! {
    fn ema_chunk(teacher: &mut [f32], student: &[f32], momentum: f32) {
        for (t, &s) in teacher.iter_mut().zip(student) {
            *t = *t * momentum + s * (1.0 - momentum);
        }
    }
}

/// One AdamW step in place on parameter `p`, first moment `m` and second moment `v`.
pub fn adamw(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: AdamwScalars) {
    assert!(p.len() == m.len() && p.len() == v.len() && p.len() == g.len(), "AdamW: buffer lengths differ");
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| adamw_chunk(p, m, v, g, s));
}

/// Σ x², in parallel chunks added in order (f64 across chunks), so thread-count independent.
pub fn squared_norm(x: &[f32]) -> f64 {
    let partials: Vec<f64> = x.par_chunks(CHUNK).map(squares_chunk).collect();
    partials.iter().sum()
}

/// teacher ← momentum · teacher + (1 − momentum) · student, in place.
pub fn ema(teacher: &mut [f32], student: &[f32], momentum: f32) {
    assert_eq!(teacher.len(), student.len(), "EMA: teacher and student sizes differ");
    teacher.par_chunks_mut(CHUNK).zip(student.par_chunks(CHUNK)).for_each(|(t, s)| ema_chunk(t, s, momentum));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_the_torch_formula() {
        let n = 40_000; // several parallel chunks
        let g: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let (mut p, mut m, mut v) = (vec![0.5f32; n], vec![0.01f32; n], vec![0.02f32; n]);
        let (lr, wd, b1, b2, eps, step): (f64, f64, f64, f64, f64, i32) = (1e-3, 0.04, 0.9, 0.999, 1e-8, 3);
        let s = AdamwScalars::new(lr, wd, (b1, b2), eps, step);
        adamw(&mut p, &mut m, &mut v, &g, s);
        for i in (0..n).step_by(997) {
            let gi = g[i] as f64;
            let (mi, vi) = (0.01 * b1 + gi * (1.0 - b1), 0.02 * b2 + gi * gi * (1.0 - b2));
            let denom = vi.sqrt() / (1.0 - b2.powi(step)).sqrt() + eps;
            let pi = 0.5 * (1.0 - lr * wd) - lr / (1.0 - b1.powi(step)) * mi / denom;
            assert!(
                (p[i] as f64 - pi).abs() < 1e-6 && (m[i] as f64 - mi).abs() < 1e-6 && (v[i] as f64 - vi).abs() < 1e-6
            );
        }
    }

    #[test]
    fn ema_moves_the_teacher_towards_the_student() {
        let mut t = vec![1.0f32; 50_000];
        ema(&mut t, &vec![3.0; 50_000], 0.75);
        assert!(t.iter().all(|&x| x == 1.5));
    }
}
