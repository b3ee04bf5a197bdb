//! Per-head self-attention maps of the last block, as the official `visualize_attention.py`
//! computes them, and pictures a person can look at.

use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;

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

/// A heatmap of `values`, min to max, in `colours` (`plt.imsave` scales the same way; its
/// default colour map is viridis, and `video_generation.py` asks for inferno).
fn heatmap(values: &[f32], width: u32, height: u32, colours: colorous::Gradient) -> RgbImage {
    let (lo, hi) = values.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    RgbImage::from_fn(width, height, |x, y| {
        let c = colours.eval_continuous(((values[(y * width + x) as usize] - lo) / span) as f64);
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
        let map = heatmap(&upsample(maps.head(head), maps.grid_w, patch, w, h), w, h, colorous::VIRIDIS);
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
    out.files.push(save_attentions(&maps.values, vec![maps.heads, maps.grid_h, maps.grid_w], dir)?);
    Ok(out)
}

/// `attention.safetensors` in `dir`, holding `attentions` of the given shape.
fn save_attentions(values: &[f32], shape: Vec<usize>, dir: &Path) -> Result<PathBuf, EvalError> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)
        .expect("the shape is the number of values");
    let path = dir.join("attention.safetensors");
    safetensors::serialize_to_file([("attentions", view)], None, &path)
        .map_err(|e| EvalError::Io { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
    Ok(path)
}

/// The attention of a clip, frame by frame, as the official `video_generation.py` draws it, and
/// more: per frame `attn-{name}.png`, the mean of the heads' maps (inferno, as the official
/// frames), and `mask-{name}.png`, the frame tinted where any head's thresholded mask is; then
/// `attention.gif`, the two side by side at the clip's pace, and `attention.safetensors` with
/// `attentions` `[frames, heads, H/p, W/p]`. Frames are written as they come, so a long clip
/// never sits in memory.
pub struct ClipWriter {
    dir: PathBuf,
    patch: usize,
    threshold: f32,
    gif: image::codecs::gif::GifEncoder<SharedFile>,
    gif_file: SharedFile,
    /// `[heads, grid_h, grid_w]` of the first frame; every frame must have it.
    grid: Option<[usize; 3]>,
    values: Vec<f32>,
    frames: usize,
    pub files: Vec<PathBuf>,
}

impl ClipWriter {
    /// Starts `dir/attention.gif`; `threshold` is the share of each head's mass its mask keeps.
    pub fn create(dir: &Path, patch: usize, threshold: f32) -> Result<Self, EvalError> {
        let io = |source| EvalError::Io { path: dir.into(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join("attention.gif");
        let file = std::fs::File::create(&path).map_err(|source| EvalError::Io { path: path.clone(), source })?;
        let gif_file = SharedFile(Rc::new(RefCell::new(std::io::BufWriter::new(file))));
        let mut gif = image::codecs::gif::GifEncoder::new(gif_file.clone());
        gif.set_repeat(image::codecs::gif::Repeat::Infinite).map_err(|e| image_error(&path, e))?;
        let (values, files) = (Vec::new(), Vec::new());
        Ok(Self { dir: dir.into(), patch, threshold, gif, gif_file, grid: None, values, frames: 0, files })
    }

    /// Draws one prepared frame and its maps (from [`cls_attention`]) and appends it to the GIF,
    /// shown for `delay_ms`.
    pub fn add(&mut self, name: &str, img: &RgbImage, maps: &AttentionMaps, delay_ms: u32) -> Result<(), EvalError> {
        let grid = [maps.heads, maps.grid_h, maps.grid_w];
        if *self.grid.get_or_insert(grid) != grid {
            return Err(EvalError::Image {
                path: self.dir.join(name),
                problem: format!(
                    "frame {name} gives a {}x{} patch grid, the first frame {}x{}; give every frame one size \
                     (--image-size H W)",
                    grid[1],
                    grid[2],
                    self.grid.unwrap()[1],
                    self.grid.unwrap()[2]
                ),
            });
        }
        let (w, h) = img.dimensions();
        let cells = maps.grid_h * maps.grid_w;
        let mean: Vec<f32> = (0..cells)
            .map(|i| (0..maps.heads).map(|head| maps.head(head)[i]).sum::<f32>() / maps.heads as f32)
            .collect();
        let map = heatmap(&upsample(&mean, maps.grid_w, self.patch, w, h), w, h, colorous::INFERNO);
        let masks = threshold_masks(maps, self.threshold);
        let any: Vec<f32> = (0..cells).map(|i| masks.iter().any(|m| m[i]) as u8 as f32).collect();
        let full: Vec<bool> = upsample(&any, maps.grid_w, self.patch, w, h).iter().map(|&v| v > 0.5).collect();
        let overlay = mask_overlay(img, &full, MASK_COLOURS[0]);
        for (prefix, picture) in [("attn", &map), ("mask", &overlay)] {
            let path = self.dir.join(format!("{prefix}-{name}.png"));
            picture.save(&path).map_err(|e| image_error(&path, e))?;
            self.files.push(path);
        }
        let pair = composite(&[overlay, map], 2);
        let frame = image::Frame::from_parts(
            image::DynamicImage::ImageRgb8(pair).to_rgba8(),
            0,
            0,
            image::Delay::from_numer_denom_ms(delay_ms, 1),
        );
        self.gif.encode_frame(frame).map_err(|e| image_error(&self.dir.join("attention.gif"), e))?;
        self.values.extend_from_slice(&maps.values);
        self.frames += 1;
        Ok(())
    }

    /// Finishes the GIF and writes `attention.safetensors`; returns the number of frames.
    pub fn finish(mut self) -> Result<(usize, Vec<PathBuf>), EvalError> {
        // Dropping the encoder writes the GIF trailer; the flush then reports what the drop cannot.
        drop(self.gif);
        let path = self.dir.join("attention.gif");
        self.gif_file.0.borrow_mut().flush().map_err(|source| EvalError::Io { path: path.clone(), source })?;
        self.files.push(path);
        let [heads, gh, gw] = self.grid.unwrap_or([0, 0, 0]);
        self.files.push(save_attentions(&self.values, vec![self.frames, heads, gh, gw], &self.dir)?);
        Ok((self.frames, self.files))
    }
}

/// The GIF's file, shared with its encoder so that [`ClipWriter::finish`] can flush it and see
/// the error (the encoder has no way to hand its writer back).
#[derive(Clone)]
struct SharedFile(Rc<RefCell<std::io::BufWriter<std::fs::File>>>);

impl Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

fn image_error(path: &Path, e: image::ImageError) -> EvalError {
    EvalError::Io { path: path.into(), source: std::io::Error::other(e) }
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
    fn a_clip_becomes_frames_an_animation_and_one_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let maps = |peak: usize| {
            let mut values = vec![0.01; 2 * 6];
            values[peak] = 0.9;
            values[6 + peak] = 0.5;
            AttentionMaps { heads: 2, grid_h: 2, grid_w: 3, values }
        };
        let img = RgbImage::from_pixel(12, 8, Rgb([90, 120, 150]));
        let mut clip = ClipWriter::create(dir.path(), 4, 0.6).unwrap();
        clip.add("a", &img, &maps(0), 40).unwrap();
        clip.add("b", &img, &maps(5), 40).unwrap();
        let other = AttentionMaps { heads: 2, grid_h: 3, grid_w: 3, values: vec![0.1; 18] };
        let err = clip.add("c", &RgbImage::new(12, 12), &other, 40).unwrap_err().to_string();
        assert!(err.contains("3x3 patch grid, the first frame 2x3"), "{err}");
        let (frames, files) = clip.finish().unwrap();
        assert_eq!(frames, 2);
        assert_eq!(files.len(), 6);

        // Frame b's mask covers its peak patch, the bottom-right 4x4 px, and nothing else.
        let mask = image::open(dir.path().join("mask-b.png")).unwrap().to_rgb8();
        assert_ne!(mask.get_pixel(10, 6), img.get_pixel(10, 6));
        assert_eq!(mask.get_pixel(1, 1).0, [31, 42, 52]);

        use image::AnimationDecoder;
        let gif = std::io::BufReader::new(std::fs::File::open(dir.path().join("attention.gif")).unwrap());
        let decoded = image::codecs::gif::GifDecoder::new(gif).unwrap().into_frames().collect_frames().unwrap();
        assert_eq!(decoded.len(), 2);
        // Mask and heatmap side by side, 8 px apart and around.
        assert_eq!(decoded[0].buffer().dimensions(), (8 + 2 * (12 + 8), 8 + 8 + 8));
        assert_eq!(decoded[1].delay().numer_denom_ms(), (40, 1));

        let bytes = std::fs::read(dir.path().join("attention.safetensors")).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(tensors.tensor("attentions").unwrap().shape(), [2, 2, 2, 3]);
    }

    #[test]
    fn preparation_crops_to_whole_patches() {
        let img = RgbImage::new(50, 30);
        assert_eq!(prepare_image(&img, 50, 30, 8).dimensions(), (48, 24));
        assert_eq!(prepare_image(&img, 64, 64, 16).dimensions(), (64, 64));
    }
}
