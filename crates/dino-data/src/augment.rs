//! DINO's multi-crop augmentation, as the official `DataAugmentationDINO` (torchvision on PIL
//! images): global crop 1 = RandomResizedCrop → flip → colour jitter (p 0.8) → grayscale (p 0.2)
//! → Gaussian blur (p 1.0); global crop 2 the same with blur p 0.1 and solarization p 0.2; local
//! crops at their own size and scale with blur p 0.5. Then ImageNet normalisation.
//!
//! Colour operations run on `f32` RGB in [0, 1] (the torchvision tensor formulas); the crop and
//! resize run on 8-bit pixels with Pillow's bicubic resampling.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::transform::{IMAGENET_MEAN, IMAGENET_STD};
use crate::{DataError, Dataset};

/// Multi-crop settings. Defaults are the official ones for 224 px ImageNet training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultiCropConfig {
    /// Side of the two global crops (official 224, hard-coded there).
    pub global_size: u32,
    /// Side of the local crops (official 96).
    pub local_size: u32,
    /// Area range of the global crops (official `--global_crops_scale 0.4 1`).
    pub global_scale: (f64, f64),
    /// Area range of the local crops (official `--local_crops_scale 0.05 0.4`).
    pub local_scale: (f64, f64),
    /// Number of local crops (official `--local_crops_number 8`).
    pub local_crops: usize,
    /// Range of the Gaussian blur radius (official 0.1 to 2.0 px at 224 px).
    pub blur_radius: (f64, f64),
    /// Probability of the blur on global crop 1, global crop 2 and each local crop (official
    /// 1.0, 0.1, 0.5).
    pub blur_prob: (f64, f64, f64),
    /// Probability of solarization on global crop 2 (official 0.2; never on the others).
    pub solarize_prob: f64,
    /// Probability of the horizontal flip (official 0.5).
    pub flip_prob: f64,
    /// Probability of the colour jitter (official 0.8).
    pub jitter_prob: f64,
    /// Colour jitter strengths: brightness, contrast, saturation (factors drawn from
    /// [1 - s, 1 + s]) and hue (shift drawn from [-s, s] of a turn, at most 0.5); official
    /// `ColorJitter(0.4, 0.4, 0.2, 0.1)`.
    pub jitter: (f64, f64, f64, f64),
    /// Probability of the grayscale conversion (official 0.2).
    pub grayscale_prob: f64,
    /// Normalisation mean per channel (ImageNet).
    pub mean: [f32; 3],
    /// Normalisation standard deviation per channel (ImageNet).
    pub std: [f32; 3],
}

impl Default for MultiCropConfig {
    fn default() -> Self {
        Self {
            global_size: 224,
            local_size: 96,
            global_scale: (0.4, 1.0),
            local_scale: (0.05, 0.4),
            local_crops: 8,
            blur_radius: (0.1, 2.0),
            blur_prob: (1.0, 0.1, 0.5),
            solarize_prob: 0.2,
            flip_prob: 0.5,
            jitter_prob: 0.8,
            jitter: (0.4, 0.4, 0.2, 0.1),
            grayscale_prob: 0.2,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

impl MultiCropConfig {
    /// Checks the settings, with a message that names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        let scale_ok = |(a, b): (f64, f64)| 0.0 < a && a <= b && b <= 1.0;
        for (name, size) in [("global_size", self.global_size), ("local_size", self.local_size)] {
            if size == 0 {
                return Err(format!("{name} = 0 is out of range: it must be at least 1"));
            }
        }
        for (name, (min, max)) in [("global_scale", self.global_scale), ("local_scale", self.local_scale)] {
            if !scale_ok((min, max)) {
                return Err(format!("{name} = [{min}, {max}] is out of range: it must satisfy 0 < min <= max <= 1"));
            }
        }
        let (min, max) = self.blur_radius;
        if !(min > 0.0 && min <= max && max.is_finite()) {
            return Err(format!("blur_radius = [{min}, {max}] is out of range: it must satisfy 0 < min <= max"));
        }
        let (b1, b2, b3) = self.blur_prob;
        let probabilities = [
            ("blur_prob", b1),
            ("blur_prob", b2),
            ("blur_prob", b3),
            ("solarize_prob", self.solarize_prob),
            ("flip_prob", self.flip_prob),
            ("jitter_prob", self.jitter_prob),
            ("grayscale_prob", self.grayscale_prob),
        ];
        if let Some((name, p)) = probabilities.iter().find(|(_, p)| !(0.0..=1.0).contains(p)) {
            return Err(format!("{name} = {p} is not a probability in [0, 1]"));
        }
        let (b, c, sat, hue) = self.jitter;
        if [b, c, sat].iter().any(|s| !(0.0..=1.0).contains(s)) || !(0.0..=0.5).contains(&hue) {
            return Err(format!(
                "jitter = [{b}, {c}, {sat}, {hue}] is out of range: brightness, contrast and saturation must be \
                 in [0, 1], hue in [0, 0.5]"
            ));
        }
        if let Some(m) = self.mean.iter().find(|m| !m.is_finite()) {
            return Err(format!("mean = {m} is out of range: it must be finite"));
        }
        if let Some(s) = self.std.iter().find(|&&s| !(s > 0.0 && s.is_finite())) {
            return Err(format!("std = {s} is out of range: it must be positive"));
        }
        Ok(())
    }

    /// Crops per image: 2 global + the locals.
    pub fn num_crops(&self) -> usize {
        2 + self.local_crops
    }

    /// Side of crop `i` (0 and 1 are the globals).
    pub fn crop_size(&self, i: usize) -> u32 {
        if i < 2 { self.global_size } else { self.local_size }
    }

    /// All crops of one image, ordered [global 1, global 2, local 1, ...], each a normalised
    /// `[3, s, s]` buffer. Every random choice comes from `rng`.
    pub fn apply(&self, img: &RgbImage, rng: &mut impl Rng) -> Vec<Vec<f32>> {
        let mut crops = Vec::with_capacity(self.num_crops());
        // (size, scale, blur p, solarize p) per crop.
        let (blur_1, blur_2, blur_local) = self.blur_prob;
        let plans = [
            (self.global_size, self.global_scale, blur_1, 0.0),
            (self.global_size, self.global_scale, blur_2, self.solarize_prob),
        ]
        .into_iter()
        .chain((0..self.local_crops).map(|_| (self.local_size, self.local_scale, blur_local, 0.0)));
        for (size, scale, blur_p, solarize_p) in plans {
            let mut px = random_resized_crop(img, size, scale, FilterType::CatmullRom, rng);
            if rng.random::<f64>() < self.flip_prob {
                flip_horizontal(&mut px, size as usize);
            }
            if rng.random::<f64>() < self.jitter_prob {
                color_jitter(&mut px, self.jitter, rng);
            }
            if rng.random::<f64>() < self.grayscale_prob {
                grayscale(&mut px);
            }
            // utils.GaussianBlur applies when random() <= p; Solarization when random() < p.
            if rng.random::<f64>() <= blur_p {
                let radius = rng.random_range(self.blur_radius.0..=self.blur_radius.1);
                gaussian_blur(&mut px, size as usize, radius);
            }
            if rng.random::<f64>() < solarize_p {
                solarize(&mut px);
            }
            crops.push(normalize_chw(&px, size as usize, self.mean, self.std));
        }
        crops
    }
}

/// The training transform of the official `eval_linear.py`: `RandomResizedCrop(size)` (area
/// 0.08-1, torchvision's default bilinear resampling), horizontal flip with p 0.5, ImageNet
/// normalisation. `dino finetune` uses it too, with a crop area of its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearTrainTransform {
    /// Side of the crop (official 224: the backbone's training resolution).
    pub size: u32,
    /// Range of the crop's share of the image area (torchvision's default 0.08-1).
    pub scale: (f64, f64),
}

impl LinearTrainTransform {
    /// `eval_linear.py`'s transform: crops of 8-100 % of the area.
    pub fn official(size: u32) -> Self {
        Self { size, scale: (0.08, 1.0) }
    }

    /// One augmented view of `img`: a normalised `[3, size, size]` buffer.
    pub fn apply(&self, img: &RgbImage, rng: &mut impl Rng) -> Vec<f32> {
        let mut px = random_resized_crop(img, self.size, self.scale, FilterType::Bilinear, rng);
        if rng.random::<f64>() < 0.5 {
            flip_horizontal(&mut px, self.size as usize);
        }
        normalize_chw(&px, self.size as usize, IMAGENET_MEAN, IMAGENET_STD)
    }

    /// One view of each image of `batch`, decoded and augmented in parallel: the pixels
    /// `[batch, 3, size, size]` and the images they are of. An image that cannot be decoded is
    /// replaced by the next usable one (`Dataset::image_or_next`), whose label then goes with the
    /// view. The view of image `i` in epoch `epoch` depends only on (seed, epoch, i).
    pub fn views(
        &self,
        data: &Dataset,
        batch: &[usize],
        seed: u64,
        epoch: usize,
    ) -> Result<(Vec<f32>, Vec<usize>), DataError> {
        let views = batch
            .par_iter()
            .map(|&i| {
                let seed = seed ^ ((epoch as u64) << 40) ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                let found = data.image_or_next(i)?;
                Ok((self.apply(&found.image, &mut StdRng::seed_from_u64(seed)), found.index))
            })
            .collect::<Result<Vec<(Vec<f32>, usize)>, DataError>>()?;
        let (pixels, used): (Vec<Vec<f32>>, Vec<usize>) = views.into_iter().unzip();
        Ok((pixels.concat(), used))
    }
}

/// torchvision `RandomResizedCrop.get_params` then a resize to `size x size` with `filter`
/// (CatmullRom = Pillow's bicubic). Returns interleaved RGB in [0, 1].
fn random_resized_crop(
    img: &RgbImage,
    size: u32,
    scale: (f64, f64),
    filter: FilterType,
    rng: &mut impl Rng,
) -> Vec<f32> {
    let (width, height) = (img.width() as f64, img.height() as f64);
    let area = width * height;
    let log_ratio = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    let mut boxed = None;
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(log_ratio.0..=log_ratio.1).exp();
        let w = (target * aspect).sqrt().round();
        let h = (target / aspect).sqrt().round();
        if 0.0 < w && w <= width && 0.0 < h && h <= height {
            let top = rng.random_range(0..=(height - h) as u32);
            let left = rng.random_range(0..=(width - w) as u32);
            boxed = Some((left as f64, top as f64, w, h));
            break;
        }
    }
    // Fallback: the largest central crop within the ratio range.
    let (left, top, w, h) = boxed.unwrap_or_else(|| {
        let ratio = width / height;
        let (w, h) = if ratio < 3.0 / 4.0 {
            (width, (width / (3.0 / 4.0)).round())
        } else if ratio > 4.0 / 3.0 {
            ((height * (4.0 / 3.0)).round(), height)
        } else {
            (width, height)
        };
        (((width - w) / 2.0).floor(), ((height - h) / 2.0).floor(), w, h)
    });
    let src = ImageRef::new(img.width(), img.height(), img.as_raw(), PixelType::U8x3)
        .expect("an RgbImage buffer holds width * height * 3 bytes");
    let mut dst = Image::new(size, size, PixelType::U8x3);
    let options = ResizeOptions::new().crop(left, top, w, h).resize_alg(ResizeAlg::Convolution(filter));
    Resizer::new().resize(&src, &mut dst, &options).expect("U8x3 to U8x3");
    dst.buffer().iter().map(|&v| v as f32 / 255.0).collect()
}

fn flip_horizontal(px: &mut [f32], size: usize) {
    for row in px.chunks_mut(3 * size) {
        for x in 0..size / 2 {
            for c in 0..3 {
                row.swap(3 * x + c, 3 * (size - 1 - x) + c);
            }
        }
    }
}

/// ITU-R 601-2 luma, as PIL's `convert("L")` and torchvision's `rgb_to_grayscale`.
fn luma(p: &[f32]) -> f32 {
    0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]
}

/// `ColorJitter(brightness, contrast, saturation, hue)`: the four factors, applied in a random
/// order.
fn color_jitter(px: &mut [f32], (b, c, s, h): (f64, f64, f64, f64), rng: &mut impl Rng) {
    let factor = |rng: &mut dyn rand::RngCore, s: f64| rng.random_range((1.0 - s) as f32..=(1.0 + s) as f32);
    let brightness = factor(rng, b);
    let contrast = factor(rng, c);
    let saturation = factor(rng, s);
    let hue = rng.random_range(-h as f32..=h as f32);
    let mut order = [0, 1, 2, 3];
    for i in (1..4).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let blend = |px: &mut [f32], other: &dyn Fn(&[f32]) -> [f32; 3], factor: f32| {
        for p in px.chunks_mut(3) {
            let o = other(p);
            for c in 0..3 {
                p[c] = (factor * p[c] + (1.0 - factor) * o[c]).clamp(0.0, 1.0);
            }
        }
    };
    for op in order {
        match op {
            0 => blend(px, &|_| [0.0; 3], brightness),
            1 => {
                let mean = px.chunks(3).map(luma).sum::<f32>() / (px.len() / 3) as f32;
                blend(px, &|_| [mean; 3], contrast)
            }
            2 => blend(px, &|p| [luma(p); 3], saturation),
            _ => shift_hue(px, hue),
        }
    }
}

fn shift_hue(px: &mut [f32], shift: f32) {
    for p in px.chunks_mut(3) {
        let (r, g, b) = (p[0], p[1], p[2]);
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let delta = max - min;
        if delta <= 0.0 {
            continue; // grey: hue is undefined and unchanged
        }
        let h = if max == r {
            ((g - b) / delta).rem_euclid(6.0)
        } else if max == g {
            (b - r) / delta + 2.0
        } else {
            (r - g) / delta + 4.0
        } / 6.0;
        let h = (h + shift).rem_euclid(1.0) * 6.0;
        let s = delta / max;
        let (v, i) = (max, h.floor());
        let f = h - i;
        let (pp, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
        let rgb = match i as i32 % 6 {
            0 => [v, t, pp],
            1 => [q, v, pp],
            2 => [pp, v, t],
            3 => [pp, q, v],
            4 => [t, pp, v],
            _ => [v, pp, q],
        };
        p.copy_from_slice(&rgb);
    }
}

fn grayscale(px: &mut [f32]) {
    for p in px.chunks_mut(3) {
        let l = luma(p);
        p.fill(l);
    }
}

/// PIL's `GaussianBlur(radius)` blurs with standard deviation `radius`; we convolve with the
/// sampled Gaussian (truncated at 3 sigma), edges extended.
fn gaussian_blur(px: &mut [f32], size: usize, sigma: f64) {
    let half = (3.0 * sigma).ceil() as usize;
    let weights: Vec<f32> =
        (-(half as isize)..=half as isize).map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32).collect();
    let total: f32 = weights.iter().sum();
    let weights: Vec<f32> = weights.iter().map(|w| w / total).collect();
    // Separable, edges replicated. Each pass accumulates one tap at a time over a whole row
    // (a contiguous multiply-add the compiler vectorises): this was 40 % of the augmentation time
    // as a per-pixel gather.
    let row = 3 * size;
    let mut padded = vec![0.0f32; 3 * (size + 2 * half)];
    let mut tmp = vec![0.0f32; px.len()];
    for (src, dst) in px.chunks_exact(row).zip(tmp.chunks_exact_mut(row)) {
        for (j, p) in padded.chunks_exact_mut(3).enumerate() {
            let x = j.saturating_sub(half).min(size - 1);
            p.copy_from_slice(&src[3 * x..3 * x + 3]);
        }
        for (k, &w) in weights.iter().enumerate() {
            dst.iter_mut().zip(&padded[3 * k..3 * k + row]).for_each(|(d, s)| *d += w * s);
        }
    }
    px.fill(0.0);
    for (y, dst) in px.chunks_exact_mut(row).enumerate() {
        for (k, &w) in weights.iter().enumerate() {
            let source = (y + k).saturating_sub(half).min(size - 1);
            dst.iter_mut().zip(&tmp[source * row..(source + 1) * row]).for_each(|(d, s)| *d += w * s);
        }
    }
}

/// PIL's `ImageOps.solarize(threshold=128)`: values at or above 128/255 are inverted.
fn solarize(px: &mut [f32]) {
    for v in px.iter_mut() {
        if *v >= 128.0 / 255.0 {
            *v = 1.0 - *v;
        }
    }
}

/// Interleaved RGB in [0, 1] -> normalised `[3, size, size]`.
fn normalize_chw(px: &[f32], size: usize, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let plane = size * size;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, p) in px.chunks(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (p[c] - mean[c]) / std[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn photo() -> RgbImage {
        RgbImage::from_fn(64, 48, |x, y| Rgb([(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8]))
    }

    #[test]
    fn crops_have_the_configured_sizes_and_order() {
        let config = MultiCropConfig { global_size: 32, local_size: 16, local_crops: 3, ..Default::default() };
        let crops = config.apply(&photo(), &mut StdRng::seed_from_u64(0));
        let sizes: Vec<usize> = crops.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![3 * 32 * 32, 3 * 32 * 32, 3 * 16 * 16, 3 * 16 * 16, 3 * 16 * 16]);
        assert!(crops.iter().flatten().all(|v| v.is_finite()));
    }

    /// The row-wise blur equals the definition: a normalised Gaussian of radius ceil(3 sigma)
    /// over edge-replicated neighbours, horizontally then vertically.
    #[test]
    fn blur_matches_its_definition() {
        let size = 9;
        let mut px: Vec<f32> = (0..3 * size * size).map(|i| ((i * 37) % 101) as f32 / 100.0).collect();
        let original = px.clone();
        let sigma = 1.3;
        gaussian_blur(&mut px, size, sigma);
        let half = (3.0 * sigma).ceil() as isize;
        let w: Vec<f64> = (-half..=half).map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp()).collect();
        let total: f64 = w.iter().sum();
        let at = |i: isize| i.clamp(0, size as isize - 1) as usize;
        let get = |v: &[f32], x: usize, y: usize, c: usize| v[3 * (y * size + x) + c] as f64;
        let mut h = vec![0.0f32; px.len()];
        for y in 0..size {
            for x in 0..size {
                for c in 0..3 {
                    let sum: f64 =
                        (-half..=half).map(|k| w[(k + half) as usize] * get(&original, at(x as isize + k), y, c)).sum();
                    h[3 * (y * size + x) + c] = (sum / total) as f32;
                }
            }
        }
        for y in 0..size {
            for x in 0..size {
                for c in 0..3 {
                    let sum: f64 =
                        (-half..=half).map(|k| w[(k + half) as usize] * get(&h, x, at(y as isize + k), c)).sum();
                    let got = px[3 * (y * size + x) + c] as f64;
                    assert!((got - sum / total).abs() < 1e-5, "({x}, {y}, {c}): {got} vs {}", sum / total);
                }
            }
        }
    }

    #[test]
    fn linear_train_views_are_normalised_crops_of_the_requested_size() {
        let transform = LinearTrainTransform::official(20);
        let a = transform.apply(&photo(), &mut StdRng::seed_from_u64(1));
        let b = transform.apply(&photo(), &mut StdRng::seed_from_u64(2));
        assert_eq!(a.len(), 3 * 20 * 20);
        assert_ne!(a, b, "random crops differ");
        // Normalised values of [0, 1] pixels stay within the ImageNet normalisation's range.
        assert!(a.iter().all(|v| (-2.2..=2.7).contains(v)));
    }

    #[test]
    fn the_same_seed_gives_the_same_crops() {
        let config = MultiCropConfig { global_size: 24, local_size: 8, local_crops: 2, ..Default::default() };
        let a = config.apply(&photo(), &mut StdRng::seed_from_u64(7));
        let b = config.apply(&photo(), &mut StdRng::seed_from_u64(7));
        let c = config.apply(&photo(), &mut StdRng::seed_from_u64(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn colour_operations_keep_their_invariants() {
        // Hue rotation by a full turn and grey pixels are fixed points; solarize inverts highs.
        let mut px = vec![0.2, 0.5, 0.9, 0.4, 0.4, 0.4];
        let before = px.clone();
        shift_hue(&mut px, 1.0);
        assert!(px.iter().zip(&before).all(|(a, b)| (a - b).abs() < 1e-5), "{px:?}");
        shift_hue(&mut px, 0.3);
        assert_eq!(&px[3..], &[0.4, 0.4, 0.4]);
        let mut s = vec![0.1, 0.9];
        solarize(&mut s);
        assert!((s[1] - 0.1).abs() < 1e-6 && s[0] == 0.1);
        // Blurring a flat image leaves it flat.
        let mut flat = vec![0.3f32; 3 * 8 * 8];
        gaussian_blur(&mut flat, 8, 1.5);
        assert!(flat.iter().all(|v| (v - 0.3).abs() < 1e-5));
    }

    #[test]
    fn random_resized_crop_covers_the_requested_area() {
        let mut rng = StdRng::seed_from_u64(1);
        let img = RgbImage::from_fn(100, 100, |x, _| Rgb([if x < 50 { 0 } else { 255 }, 0, 0]));
        // A crop of the whole image keeps both halves; its mean red is about one half.
        let px = random_resized_crop(&img, 20, (1.0, 1.0), FilterType::CatmullRom, &mut rng);
        let red: f32 = px.chunks(3).map(|p| p[0]).sum::<f32>() / 400.0;
        assert!((red - 0.5).abs() < 0.1, "{red}");
    }
}
