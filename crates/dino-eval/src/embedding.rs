//! A 2-D view of a feature space: projection on the first two principal components.

use crate::Features;

/// Each row of `features` projected on the two leading principal components (of the rows,
/// centered), as `[pc1, pc2]`. Power iteration on the covariance, deflated after the first
/// component; features are small (a few hundred dimensions), so this runs in plain f64.
pub fn pca_2d(features: &Features) -> Vec<[f32; 2]> {
    let (n, d) = (features.rows, features.dim);
    if n == 0 || d == 0 {
        return Vec::new();
    }
    let rows = || features.values.chunks_exact(d);
    let mut mean = vec![0.0f64; d];
    for row in rows() {
        mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64 / n as f64);
    }
    let mut cov = vec![0.0f64; d * d];
    let mut centered = vec![0.0f64; d];
    for row in rows() {
        centered.iter_mut().zip(row).zip(&mean).for_each(|((c, &v), m)| *c = v as f64 - m);
        for (i, &ci) in centered.iter().enumerate() {
            cov[i * d..(i + 1) * d].iter_mut().zip(&centered).for_each(|(c, &cj)| *c += ci * cj);
        }
    }
    let first = leading_eigenvector(&cov, d);
    let lambda = rayleigh(&cov, &first, d);
    // Deflate: remove the first component so the iteration finds the second.
    for i in 0..d {
        for j in 0..d {
            cov[i * d + j] -= lambda * first[i] * first[j];
        }
    }
    let second = leading_eigenvector(&cov, d);
    rows()
        .map(|row| {
            let project = |v: &[f64]| row.iter().zip(&mean).zip(v).map(|((&x, m), e)| (x as f64 - m) * e).sum::<f64>();
            [project(&first) as f32, project(&second) as f32]
        })
        .collect()
}

fn mat_vec(m: &[f64], v: &[f64], d: usize) -> Vec<f64> {
    m.chunks_exact(d).map(|row| row.iter().zip(v).map(|(a, b)| a * b).sum()).collect()
}

fn rayleigh(m: &[f64], v: &[f64], d: usize) -> f64 {
    mat_vec(m, v, d).iter().zip(v).map(|(a, b)| a * b).sum()
}

fn leading_eigenvector(m: &[f64], d: usize) -> Vec<f64> {
    // A start vector with a component along every axis, deterministic.
    let mut v: Vec<f64> = (0..d).map(|i| 1.0 + (i as f64 * 0.618).fract()).collect();
    for _ in 0..500 {
        let next = mat_vec(m, &v, d);
        let norm = next.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            break;
        }
        let next: Vec<f64> = next.iter().map(|x| x / norm).collect();
        let change: f64 = next.iter().zip(&v).map(|(a, b)| (a - b).abs()).sum();
        v = next;
        if change < 1e-10 {
            break;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points spread along (1, 1, 0) a lot and along (0, 0, 1) a little: PC 1 recovers the
    /// first direction, PC 2 the second.
    #[test]
    fn finds_the_directions_of_largest_variance() {
        let mut values = Vec::new();
        for i in 0..200 {
            let a = (i as f32 - 100.0) / 10.0; // large spread
            let b = ((i * 37) % 11) as f32 / 10.0 - 0.5; // small spread
            values.extend([a + 3.0, a - 1.0, b + 2.0]);
        }
        let points = pca_2d(&Features { rows: 200, dim: 3, values });
        let var = |k: usize| points.iter().map(|p| p[k] * p[k]).sum::<f32>() / 200.0;
        // Projections on unit vectors: variance of a along (1,1,0)/sqrt(2) is 2 var(a).
        let var_a = (0..200).map(|i| ((i as f32 - 100.0) / 10.0).powi(2)).sum::<f32>() / 200.0 - 0.05f32.powi(2);
        assert!((var(0) / (2.0 * var_a) - 1.0).abs() < 0.01, "{} vs {}", var(0), 2.0 * var_a);
        assert!(var(1) < 0.2 && var(1) > 0.01, "{}", var(1));
        let mean: f32 = points.iter().map(|p| p[0]).sum::<f32>() / 200.0;
        assert!(mean.abs() < 1e-3, "centered");
    }
}
