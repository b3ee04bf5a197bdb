//! Per-head self-attention maps of the last block, as the official `visualize_attention.py`
//! computes them, and pictures a person can look at.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use dino_data::{Filter, IMAGENET_MEAN, IMAGENET_STD, resize_exact, to_chw};
use dino_model::VisionTransformer;
use image::{Rgb, RgbImage, imageops};

use crate::EvalError;

/// CLS-to-patch attention of every head of the last block, on the patch grid.
#[derive(Debug, Clone)]
pub struct AttentionMaps {
    pub heads: usize,
    /// Patch-grid height (image height / patch).
    pub grid_h: usize,
    /// Patch-grid width.
    pub grid_w: usize,
    /// `[heads, grid_h, grid_w]`, row-major.
    pub values: Vec<f32>,
}

impl AttentionMaps {
    /// Head `h`'s map, `grid_h * grid_w` values.
    pub fn head(&self, h: usize) -> &[f32] {
        let n = self.grid_h * self.grid_w;
        &self.values[h * n..(h + 1) * n]
    }
}

/// The official preprocessing: resize to exactly `width x height` (bilinear; the same size
/// leaves the image as it is), then crop to a multiple of the patch size (bottom and right).
pub fn prepare_image(img: &RgbImage, width: u32, height: u32, patch: usize) -> RgbImage {
    let resized = resize_exact(img, width, height, Filter::Bilinear);
    let p = patch as u32;
    let (w, h) = (width - width % p, height - height % p);
    imageops::crop_imm(&resized, 0, 0, w, h).to_image()
}

/// `attn[0, :, 0, 1:]` of the last block for one prepared image, reshaped to the patch grid.
pub fn cls_attention(vit: &VisionTransformer, img: &RgbImage, device: &Device) -> AttentionMaps {
    let p = vit.patch_size();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let x = Tensor::<4>::from_data(TensorData::new(to_chw(img, IMAGENET_MEAN, IMAGENET_STD), [1, 3, h, w]), device);
    let attn = vit.last_cls_attention(x); // [1, heads, 1+N]
    let [_, heads, tokens] = attn.dims();
    let cls = attn.narrow(2, 1, tokens - 1).reshape([heads, tokens - 1]);
    AttentionMaps { heads, grid_h: h / p, grid_w: w / p, values: cls.into_data().iter::<f32>().collect() }
}

/// The official thresholded masks: per head, keep the largest attention values that together
/// hold `threshold` of the head's mass. `[heads][grid_h * grid_w]`.
pub fn threshold_masks(maps: &AttentionMaps, threshold: f32) -> Vec<Vec<bool>> {
    (0..maps.heads)
        .map(|h| {
            let values = maps.head(h);
            let total: f32 = values.iter().sum();
            let mut order: Vec<usize> = (0..values.len()).collect();
            order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
            let mut mask = vec![false; values.len()];
            let mut cumulative = 0.0;
            for i in order {
                cumulative += values[i] / total;
                mask[i] = cumulative > 1.0 - threshold;
            }
            mask
        })
        .collect()
}

/// A grid map scaled up by `patch` with nearest-neighbour sampling, as the official script does.
fn upsample(values: &[f32], grid_w: usize, patch: usize, width: u32, height: u32) -> Vec<f32> {
    let mut out = Vec::with_capacity((width * height) as usize);
    for y in 0..height as usize {
        for x in 0..width as usize {
            out.push(values[(y / patch) * grid_w + x / patch]);
        }
    }
    out
}

/// A heatmap of `values` (min to max, viridis, as `plt.imsave`).
fn heatmap(values: &[f32], width: u32, height: u32) -> RgbImage {
    let (lo, hi) = values.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    RgbImage::from_fn(width, height, |x, y| {
        let c = colorous::VIRIDIS.eval_continuous(((values[(y * width + x) as usize] - lo) / span) as f64);
        Rgb([c.r, c.g, c.b])
    })
}

/// The image, darkened outside the mask and tinted inside it.
fn mask_overlay(img: &RgbImage, mask: &[bool], colour: [u8; 3]) -> RgbImage {
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let p = img.get_pixel(x, y).0;
        let inside = mask[(y * img.width() + x) as usize];
        Rgb(std::array::from_fn(|c| {
            if inside { (0.5 * p[c] as f32 + 0.5 * colour[c] as f32) as u8 } else { (0.35 * p[c] as f32) as u8 }
        }))
    })
}

/// Distinct colours for the masks of successive heads.
const MASK_COLOURS: [[u8; 3]; 6] =
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180]];

/// What `render` wrote.
#[derive(Debug, Default)]
pub struct Rendered {
    pub files: Vec<PathBuf>,
}

/// Writes the official outputs (`img.png`, `attn-head{j}.png`, and with a threshold
/// `mask_th{t}_head{j}.png`), plus `attention.png` — the image, then each head's heatmap, then
/// (with a threshold) each head's mask overlaid, in one picture — and `attention.safetensors`
/// with `attentions` `[heads, H/p, W/p]` before upsampling.
pub fn render(
    img: &RgbImage,
    maps: &AttentionMaps,
    patch: usize,
    threshold: Option<f32>,
    dir: &Path,
) -> Result<Rendered, EvalError> {
    std::fs::create_dir_all(dir).map_err(|source| EvalError::Io { path: dir.into(), source })?;
    let mut out = Rendered::default();
    let save = |name: String, picture: &RgbImage, out: &mut Rendered| -> Result<(), EvalError> {
        let path = dir.join(name);
        picture.save(&path).map_err(|e| EvalError::Io { path: path.clone(), source: std::io::Error::other(e) })?;
        out.files.push(path);
        Ok(())
    };
    let (w, h) = img.dimensions();
    save("img.png".into(), img, &mut out)?;
    let mut tiles = vec![img.clone()];
    for head in 0..maps.heads {
        let map = heatmap(&upsample(maps.head(head), maps.grid_w, patch, w, h), w, h);
        save(format!("attn-head{head}.png"), &map, &mut out)?;
        tiles.push(map);
    }
    if let Some(t) = threshold {
        for (head, mask) in threshold_masks(maps, t).iter().enumerate() {
            let as_f32: Vec<f32> = mask.iter().map(|&m| m as u8 as f32).collect();
            let full: Vec<bool> = upsample(&as_f32, maps.grid_w, patch, w, h).iter().map(|&v| v > 0.5).collect();
            let overlay = mask_overlay(img, &full, MASK_COLOURS[head % MASK_COLOURS.len()]);
            save(format!("mask_th{t}_head{head}.png"), &overlay, &mut out)?;
            tiles.push(overlay);
        }
    }
    save("attention.png".into(), &composite(&tiles, 1 + maps.heads), &mut out)?;

    let bytes: Vec<u8> = maps.values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![maps.heads, maps.grid_h, maps.grid_w],
        &bytes,
    )
    .expect("heads * grid floats");
    let path = dir.join("attention.safetensors");
    safetensors::serialize_to_file([("attentions", view)], None, &path)
        .map_err(|e| EvalError::Io { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
    out.files.push(path);
    Ok(out)
}

/// Tiles of one size in rows of `per_row`, on a white background with small gaps.
fn composite(tiles: &[RgbImage], per_row: usize) -> RgbImage {
    const GAP: u32 = 8;
    let (w, h) = tiles[0].dimensions();
    let rows = tiles.len().div_ceil(per_row) as u32;
    let cols = per_row.min(tiles.len()) as u32;
    let mut canvas = RgbImage::from_pixel(cols * (w + GAP) + GAP, rows * (h + GAP) + GAP, Rgb([255, 255, 255]));
    for (i, tile) in tiles.iter().enumerate() {
        let (r, c) = ((i / per_row) as u32, (i % per_row) as u32);
        // The mask row starts under the first heatmap, so each mask sits below its head.
        let c = if r > 0 { c + 1 } else { c };
        imageops::overlay(&mut canvas, tile, (GAP + c * (w + GAP)) as i64, (GAP + r * (h + GAP)) as i64);
    }
    canvas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_the_requested_share_of_mass() {
        let maps = AttentionMaps { heads: 1, grid_h: 1, grid_w: 4, values: vec![0.05, 0.6, 0.25, 0.1] };
        // Keeping 50 % of the mass takes the 0.6 entry alone; 70 % needs 0.25 as well.
        assert_eq!(threshold_masks(&maps, 0.5)[0], vec![false, true, false, false]);
        assert_eq!(threshold_masks(&maps, 0.7)[0], vec![false, true, true, false]);
    }

    #[test]
    fn preparation_crops_to_whole_patches() {
        let img = RgbImage::new(50, 30);
        assert_eq!(prepare_image(&img, 50, 30, 8).dimensions(), (48, 24));
        assert_eq!(prepare_image(&img, 64, 64, 16).dimensions(), (64, 64));
    }
}
