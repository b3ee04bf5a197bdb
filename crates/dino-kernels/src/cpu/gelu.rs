//! Exact GELU, x Φ(x) with Φ(x) = (1 + erf(x / √2)) / 2, and its derivative, over flat slices.
//! Both run in parallel chunks; `burn`'s flex GELU calls scalar libm `erff` on one thread.

use std::f32::consts::FRAC_1_SQRT_2;
use std::mem::MaybeUninit;

use super::CHUNK;
use super::buffer::par_filled;
use super::simd::{erf, exp, multiversion};

/// 1 / √(2π), the standard normal density at 0.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

multiversion! {
    /// Writes GELU(x) into every element of `y`.
    fn forward_chunk(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        for (y, &x) in y.iter_mut().zip(x) {
            y.write(gelu(x));
        }
    }
}

multiversion! {
    fn forward_in_place(x: &mut [f32]) {
        for x in x.iter_mut() {
            *x = gelu(*x);
        }
    }
}

multiversion! {
    /// Writes dL/dy · GELU'(x) into every element of `dx`.
    fn backward_chunk(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]) {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
            let pdf = FRAC_1_SQRT_2PI * exp(-0.5 * x * x);
            dx.write(dy * (cdf + x * pdf));
        }
    }
}

/// GELU(x), elementwise.
pub fn forward(x: &[f32]) -> Vec<f32> {
    // SAFETY: chunk i of the output is written in full from chunk i of x, of the same length.
    unsafe { par_filled(x.len(), CHUNK, |i, y| forward_chunk(&x[i * CHUNK..][..y.len()], y)) }
}

/// dL/dx = dL/dy · GELU'(x), elementwise.
pub fn backward(x: &[f32], dy: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), dy.len(), "GELU backward: input and gradient lengths differ");
    // SAFETY: as in `forward`.
    unsafe {
        par_filled(x.len(), CHUNK, |i, dx| {
            let at = i * CHUNK;
            backward_chunk(&x[at..][..dx.len()], &dy[at..][..dx.len()], dx)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gelu_f64(x: f64) -> f64 {
        // Φ(x) through erfc's relation to the f32 libm erf is not precise enough: use f64 libm.
        0.5 * x * (1.0 + libm_erf(x / std::f64::consts::SQRT_2))
    }

    /// erf in f64 by the Abramowitz-Stegun-free route: integrate exp(-t²) with Simpson's rule.
    fn libm_erf(x: f64) -> f64 {
        let n = 2000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x);
        for i in 1..n {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn forward_and_backward_match_the_definition() {
        let x: Vec<f32> = (-6000..6000).map(|i| i as f32 / 1000.0).collect();
        let y = forward(&x);
        let dx = backward(&x, &vec![1.0; x.len()]);
        for (i, &xi) in x.iter().enumerate().step_by(7) {
            let exact = gelu_f64(xi as f64);
            assert!((y[i] as f64 - exact).abs() < 2e-6 * (1.0 + exact.abs()), "gelu({xi}) = {}", y[i]);
            let h = 1e-4;
            let slope = (gelu_f64(xi as f64 + h) - gelu_f64(xi as f64 - h)) / (2.0 * h);
            assert!((dx[i] as f64 - slope).abs() < 2e-6, "gelu'({xi}) = {}, expected {slope}", dx[i]);
        }
    }

    #[test]
    fn backward_scales_by_the_incoming_gradient() {
        let x = [0.3f32, -1.2, 2.5];
        let unit = backward(&x, &[1.0; 3]);
        let scaled = backward(&x, &[2.0, -3.0, 0.5]);
        for (u, (s, g)) in unit.iter().zip(scaled.iter().zip([2.0, -3.0, 0.5])) {
            assert_eq!(*s, u * g);
        }
    }
}
