//! torchvision's evaluation transforms on PIL images, reproduced on `RgbImage`s.
//!
//! Resizing uses `fast_image_resize`, whose convolution filters follow Pillow's (support scaled
//! with the reduction factor, i.e. antialiased): `CatmullRom` is PIL's BICUBIC (a = -0.5),
//! `Bilinear` its BILINEAR and `Lanczos3` its LANCZOS (once ANTIALIAS).

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

/// ImageNet channel means used by every official script.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations used by every official script.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Resampling filter (PIL's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Bilinear,
    Bicubic,
    Lanczos,
}

/// Resizes to exactly `width x height` (a no-op at the same size).
pub fn resize_exact(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    let src = ImageRef::new(img.width(), img.height(), img.as_raw(), PixelType::U8x3)
        .expect("an RgbImage buffer holds width * height * 3 bytes");
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let filter = match filter {
        Filter::Bilinear => FilterType::Bilinear,
        Filter::Bicubic => FilterType::CatmullRom,
        Filter::Lanczos => FilterType::Lanczos3,
    };
    Resizer::new()
        .resize(&src, &mut dst, &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter)))
        .expect("source and destination are both U8x3");
    RgbImage::from_raw(width, height, dst.into_vec()).expect("U8x3 output has width * height * 3 bytes")
}

/// `transforms.Resize(size)`: the shorter side becomes `size`, the longer one
/// `int(size * long / short)`, keeping the aspect ratio.
pub fn resize_shorter_side(img: &RgbImage, size: u32, filter: Filter) -> RgbImage {
    let (w, h) = img.dimensions();
    let (short, long) = (w.min(h) as u64, w.max(h) as u64);
    let new_long = (size as u64 * long / short) as u32;
    let (nw, nh) = if w <= h { (size, new_long) } else { (new_long, size) };
    resize_exact(img, nw, nh, filter)
}

/// `transforms.CenterCrop(size)`: offsets `round((dim - size) / 2)` with Python's rounding
/// (half to even). `None` if the image is smaller than the crop.
pub fn center_crop(img: &RgbImage, size: u32) -> Option<RgbImage> {
    let (w, h) = img.dimensions();
    if w < size || h < size {
        return None;
    }
    let top = ((h - size) as f64 / 2.0).round_ties_even() as u32;
    let left = ((w - size) as f64 / 2.0).round_ties_even() as u32;
    Some(image::imageops::crop_imm(img, left, top, size, size).to_image())
}

/// `ToTensor` + `Normalize(mean, std)`: `[3, H, W]` floats, row-major, channel first.
pub fn to_chw(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (px.0[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

/// The official evaluation preprocessing: `Resize(resize, BICUBIC)` then `CenterCrop(crop)`.
/// `None` skips a step (the CLI's `0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalTransform {
    /// Shorter side after resizing (official 256).
    pub resize: Option<u32>,
    /// Side of the square center crop (official 224).
    pub crop: Option<u32>,
}

impl Default for EvalTransform {
    fn default() -> Self {
        Self { resize: Some(256), crop: Some(224) }
    }
}

impl EvalTransform {
    /// Resize then crop; `Err` describes why the image is too small for the crop.
    pub fn apply(&self, img: &RgbImage) -> Result<RgbImage, String> {
        let resized = match self.resize {
            Some(size) => resize_shorter_side(img, size, Filter::Bicubic),
            None => img.clone(),
        };
        match self.crop {
            Some(size) => center_crop(&resized, size).ok_or_else(|| {
                let (w, h) = resized.dimensions();
                format!("{w}x{h} after resizing, smaller than the {size} px center crop (use a larger --resize, or --crop 0)")
            }),
            None => Ok(resized),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn shorter_side_resize_keeps_the_aspect_ratio_like_torchvision() {
        let img = RgbImage::from_pixel(300, 200, Rgb([10, 20, 30]));
        let r = resize_shorter_side(&img, 256, Filter::Bicubic);
        assert_eq!(r.dimensions(), (384, 256));
        // A flat image stays flat through any filter.
        assert!(r.pixels().all(|p| p.0 == [10, 20, 30]));
        let tall = RgbImage::new(100, 333);
        assert_eq!(resize_shorter_side(&tall, 256, Filter::Bilinear).dimensions(), (256, 852));
    }

    #[test]
    fn center_crop_rounds_half_to_even() {
        let mut img = RgbImage::new(5, 4);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = Rgb([x as u8, y as u8, 0]);
        }
        // (5 - 2) / 2 = 1.5 -> 2 ; (4 - 2) / 2 = 1
        let c = center_crop(&img, 2).unwrap();
        assert_eq!(c.get_pixel(0, 0).0, [2, 1, 0]);
        assert!(center_crop(&img, 6).is_none());
    }

    #[test]
    fn normalisation_is_channel_first() {
        let img = RgbImage::from_pixel(2, 1, Rgb([255, 0, 51]));
        let v = to_chw(&img, [0.0; 3], [1.0; 3]);
        assert_eq!(v, vec![1.0, 1.0, 0.0, 0.0, 0.2, 0.2]);
        let n = to_chw(&img, IMAGENET_MEAN, IMAGENET_STD);
        assert!((n[0] - (1.0 - 0.485) / 0.229).abs() < 1e-6);
    }

    #[test]
    fn eval_transform_explains_a_too_small_crop() {
        let img = RgbImage::new(50, 40);
        let t = EvalTransform { resize: None, crop: Some(224) };
        assert!(t.apply(&img).unwrap_err().contains("224"));
        assert_eq!(EvalTransform::default().apply(&img).unwrap().dimensions(), (224, 224));
    }
}
