//! Position-embedding interpolation, exactly as the official `interpolate_pos_encoding`.
//!
//! PyTorch resizes the `sqrt(N) x sqrt(N)` grid with `F.interpolate(mode="bicubic",
//! scale_factor=((h0 + 0.1) / sqrt(N), (w0 + 0.1) / sqrt(N)))`. Because a scale factor is given,
//! source coordinates are `(dst + 0.5) / scale - 0.5`, not `(dst + 0.5) * in / out - 0.5`; the
//! +0.1 (official issue #8) therefore shifts every sample slightly, even when the output size
//! equals the input size. We build the same separable weights as a matrix, so the resize is one
//! matmul: differentiable on every backend (burn's bicubic backward exists only on flex).

/// Cubic convolution coefficient A used by PyTorch's bicubic mode.
const CUBIC_A: f64 = -0.75;

fn cubic_near(x: f64) -> f64 {
    ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1.0
}

fn cubic_far(x: f64) -> f64 {
    ((CUBIC_A * x - 5.0 * CUBIC_A) * x + 8.0 * CUBIC_A) * x - 4.0 * CUBIC_A
}

/// `[output, input]` weights of PyTorch's 1-D bicubic resize (align_corners=False) with an explicit
/// `scale` (output / input), taps clamped at the borders as `upsample_get_value_bounded` does.
pub fn bicubic_matrix(input: usize, output: usize, scale: f64) -> Vec<f64> {
    let mut weights = vec![0.0; output * input];
    let inv_scale = 1.0 / scale;
    for dst in 0..output {
        let src = inv_scale * (dst as f64 + 0.5) - 0.5;
        let base = src.floor();
        let t = src - base;
        let coeffs = [cubic_far(t + 1.0), cubic_near(t), cubic_near(1.0 - t), cubic_far(2.0 - t)];
        for (k, c) in coeffs.into_iter().enumerate() {
            let idx = (base as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
            weights[dst * input + idx] += c;
        }
    }
    weights
}

/// The patch-grid size the official code produces for an input of `h x w` patches when the
/// embedding was trained on a `grid x grid` one: `floor(grid * (n + 0.1) / grid)`.
fn official_output_size(grid: usize, patches: usize) -> (usize, f64) {
    let scale = (patches as f64 + 0.1) / grid as f64;
    ((grid as f64 * scale).floor() as usize, scale)
}

/// The `[h*w, grid*grid]` matrix that maps the trained patch position embeddings (row-major
/// grid) to an `h x w` patch grid, or `None` when the official code keeps them unchanged
/// (same number of patches and a square input).
pub fn interpolation_matrix(grid: usize, h: usize, w: usize) -> Option<Vec<f32>> {
    if h * w == grid * grid && h == w {
        return None;
    }
    let (out_h, scale_h) = official_output_size(grid, h);
    let (out_w, scale_w) = official_output_size(grid, w);
    debug_assert_eq!((out_h, out_w), (h, w), "the +0.1 offset keeps the official output size");
    let rows = bicubic_matrix(grid, out_h, scale_h);
    let cols = bicubic_matrix(grid, out_w, scale_w);
    // Kronecker product: out[(i, j)] = sum_{a, b} rows[i, a] * cols[j, b] * in[(a, b)].
    let mut m = vec![0.0f32; out_h * out_w * grid * grid];
    for i in 0..out_h {
        for j in 0..out_w {
            let r = (i * out_w + j) * grid * grid;
            for a in 0..grid {
                let ra = rows[i * grid + a];
                if ra == 0.0 {
                    continue;
                }
                for b in 0..grid {
                    m[r + a * grid + b] = (ra * cols[j * grid + b]) as f32;
                }
            }
        }
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_sum_to_one() {
        for (input, output) in [(14, 6), (8, 8), (8, 30), (2, 1)] {
            let scale = (output as f64 + 0.1) / input as f64;
            let m = bicubic_matrix(input, output, scale);
            for row in m.chunks(input) {
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn same_square_grid_is_left_alone_but_same_count_non_square_is_not() {
        assert!(interpolation_matrix(8, 8, 8).is_none());
        assert!(interpolation_matrix(4, 2, 8).is_some());
        assert_eq!(interpolation_matrix(8, 4, 4).unwrap().len(), 16 * 64);
    }

    #[test]
    fn the_offset_makes_an_equal_size_resize_a_slight_blur() {
        // scale (8 + 0.1) / 8 != 1, so even 8 -> 8 is not the identity (as in PyTorch).
        let m = bicubic_matrix(8, 8, 8.1 / 8.0);
        assert!((m[0] - 1.0).abs() > 1e-4);
    }
}
