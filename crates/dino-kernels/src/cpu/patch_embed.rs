//! ViT patch embedding, a Conv2d with kernel = stride = p, as a patch gather and one product:
//! images `[B, C, H, W]` -> patches `[B·h·w, C·p·p]` (h = H/p, w = W/p; pixels past the last whole
//! patch are ignored, as with the strided conv) -> `patches · Wᵀ + b`, W `[D, C·p·p]`.
//! burn-flex's direct convolution and its weight gradient run on one thread.

use rayon::prelude::*;

use super::linear;
use crate::shapes::PatchDims as Dims;

/// Calls `f(patch_row, pixel_offset)` for every element of patch row `row`, in patch order
/// (channel, then row, then column within the patch).
fn for_each_pixel(d: Dims, row: usize, mut f: impl FnMut(usize, usize)) {
    let (gh, gw) = d.grid();
    let (b, cell) = (row / (gh * gw), row % (gh * gw));
    let (gy, gx) = (cell / gw, cell % gw);
    let mut i = 0;
    for c in 0..d.channels {
        for ky in 0..d.patch {
            let start = ((b * d.channels + c) * d.height + gy * d.patch + ky) * d.width + gx * d.patch;
            for kx in 0..d.patch {
                f(i, start + kx);
                i += 1;
            }
        }
    }
}

/// images `[B, C, H, W]`, weight `[D, C, p, p]`, bias `[D]` -> (`[B, h·w, D]`, the patches
/// `[B·h·w, C·p·p]` for the backward).
pub fn forward(images: &[f32], weight: &[f32], bias: &[f32], d: Dims) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(images.len(), d.batch * d.channels * d.height * d.width, "patch embed: images are not {d:?}");
    assert_eq!(weight.len(), d.dim * d.patch_len(), "patch embed: weight is not [D, C, p, p]");
    let k = d.patch_len();
    let mut patches = vec![0.0; d.rows() * k];
    patches.par_chunks_mut(k).enumerate().for_each(|(row, out)| for_each_pixel(d, row, |i, at| out[i] = images[at]));
    let out = linear::forward(&patches, &linear::transpose(weight, d.dim, k), bias, d.linear());
    (out, patches)
}

/// Gradients of the weight `[D, C, p, p]` and the bias `[D]`.
pub fn backward_params(patches: &[f32], dy: &[f32], d: Dims) -> (Vec<f32>, Vec<f32>) {
    let (dw, db) = linear::backward_params(patches, dy, d.linear()); // [K, D], [D]
    (linear::transpose(&dw, d.patch_len(), d.dim), db)
}

/// Gradient of the images `[B, C, H, W]` (zero on pixels past the last whole patch).
pub fn backward_images(weight: &[f32], dy: &[f32], d: Dims) -> Vec<f32> {
    let k = d.patch_len();
    let dpatches = linear::backward_input(&linear::transpose(weight, d.dim, k), dy, d.linear());
    let mut dx = vec![0.0; d.batch * d.channels * d.height * d.width];
    for (row, p) in dpatches.chunks_exact(k).enumerate() {
        for_each_pixel(d, row, |i, at| dx[at] = p[i]);
    }
    dx
}
