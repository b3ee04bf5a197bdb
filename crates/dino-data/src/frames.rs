//! The frames of a clip, one at a time: a folder of frame images (sorted by path), or an animated
//! GIF, WebP or PNG (APNG) decoded with the `image` crate. Container video (MP4, MKV, AVI…) needs
//! a codec library this project does not link; [`open_frames`] says how to extract frames first.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use image::codecs::gif::GifDecoder;
use image::codecs::png::PngDecoder;
use image::codecs::webp::WebPDecoder;
use image::{AnimationDecoder, DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::DataError;
use crate::image_io::{BadImage, ImagePolicy, SkipReason, list_images, load_rgb};

/// Frame delay when the source says none: 30 frames per second, the official
/// `video_generation.py --fps` default.
pub const DEFAULT_DELAY_MS: u32 = 33;

/// Extensions of container video formats, refused with advice rather than a decoding error.
const VIDEO_EXTENSIONS: [&str; 8] = ["mp4", "m4v", "mov", "mkv", "avi", "webm", "mpg", "mpeg"];

/// One decoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// A short name for its output files: the file stem of a frame image, `frame00042` in an
    /// animation.
    pub name: String,
    pub image: RgbImage,
    /// How long it is shown, in milliseconds (the animation's own delay, or [`DEFAULT_DELAY_MS`]).
    pub delay_ms: u32,
}

/// The frames of a folder or an animated file, decoded lazily in order.
pub struct Frames {
    /// How many frames there are, when known before decoding (a folder).
    pub len: Option<usize>,
    /// Frame images of a folder that were skipped while listing.
    pub skipped: Vec<BadImage>,
    iter: Box<dyn Iterator<Item = Result<Frame, BadImage>>>,
}

impl Iterator for Frames {
    type Item = Result<Frame, BadImage>;
    fn next(&mut self) -> Option<Self::Item> {
        self.iter.next()
    }
}

/// Opens `path` as a clip: a directory of frame images, or an animated (or still) GIF, WebP or
/// PNG. Each item is a frame or the reason one could not be decoded (a folder's bad frame
/// image, or a corrupt animation from that frame on).
pub fn open_frames(path: &Path, policy: &ImagePolicy) -> Result<Frames, DataError> {
    if path.is_dir() {
        let listing = list_images(path)?;
        let len = listing.paths.len();
        let policy = *policy;
        let iter = listing.paths.into_iter().map(move |p| {
            let image = load_rgb(&p, &policy)?;
            Ok(Frame { name: stem(&p), image, delay_ms: DEFAULT_DELAY_MS })
        });
        return Ok(Frames { len: Some(len), skipped: listing.skipped, iter: Box::new(iter) });
    }
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if VIDEO_EXTENSIONS.contains(&extension.as_str()) {
        return Err(DataError::Spec {
            spec: path.display().to_string(),
            problem: format!(
                ".{extension} video needs a codec library this tool does not link; extract its frames first \
                 (ffmpeg -i {} frames/%05d.png) and pass the folder, or pass an animated GIF",
                path.display()
            ),
        });
    }
    let bad = |reason, detail: String| DataError::BadImage(BadImage::new(path, reason, detail));
    let open = || File::open(path).map(BufReader::new).map_err(|e| bad(SkipReason::Unreadable, e.to_string()));
    let format = ImageReader::new(open()?)
        .with_guessed_format()
        .map_err(|e| bad(SkipReason::Unreadable, e.to_string()))?
        .format();
    let decoded = |e: image::ImageError| bad(SkipReason::Corrupt, e.to_string());
    let frames: image::Frames<'static> = match format {
        Some(ImageFormat::Gif) => {
            let mut decoder = GifDecoder::new(open()?).map_err(decoded)?;
            check_size(path, decoder.dimensions(), policy)?;
            decoder.set_limits(limits(policy)).map_err(decoded)?;
            decoder.into_frames()
        }
        Some(ImageFormat::WebP) => {
            let decoder = WebPDecoder::new(open()?).map_err(decoded)?;
            check_size(path, decoder.dimensions(), policy)?;
            if !decoder.has_animation() {
                return still(path, policy);
            }
            decoder.into_frames()
        }
        Some(ImageFormat::Png) => {
            let decoder = PngDecoder::new(open()?).map_err(decoded)?;
            check_size(path, decoder.dimensions(), policy)?;
            if !decoder.is_apng().map_err(decoded)? {
                return still(path, policy);
            }
            decoder.apng().map_err(decoded)?.into_frames()
        }
        _ => return still(path, policy),
    };
    let owned = path.to_path_buf();
    let iter = frames.enumerate().map(move |(i, frame)| {
        let frame = frame.map_err(|e| BadImage::new(&owned, SkipReason::Corrupt, format!("frame {i}: {e}")))?;
        let (numer, denom) = frame.delay().numer_denom_ms();
        let delay_ms = if numer == 0 { DEFAULT_DELAY_MS } else { (numer / denom.max(1)).max(1) };
        let image = DynamicImage::ImageRgba8(frame.into_buffer()).to_rgb8();
        Ok(Frame { name: format!("frame{i:05}"), image, delay_ms })
    });
    Ok(Frames { len: None, skipped: Vec::new(), iter: Box::new(iter) })
}

/// A file that is one picture: a clip of one frame.
fn still(path: &Path, policy: &ImagePolicy) -> Result<Frames, DataError> {
    let frame = load_rgb(path, policy).map(|image| Frame { name: stem(path), image, delay_ms: DEFAULT_DELAY_MS })?;
    Ok(Frames { len: Some(1), skipped: Vec::new(), iter: Box::new(std::iter::once(Ok(frame))) })
}

fn check_size(path: &Path, (width, height): (u32, u32), policy: &ImagePolicy) -> Result<(), DataError> {
    if width == 0 || height == 0 || u64::from(width) * u64::from(height) > policy.max_pixels {
        return Err(DataError::BadImage(BadImage::new(
            path,
            SkipReason::TooLarge,
            format!("{width}x{height} px per frame (max_pixels = {})", policy.max_pixels),
        )));
    }
    Ok(())
}

/// The decoder's allocation limit: one RGBA canvas of `max_pixels` and its working copy.
fn limits(policy: &ImagePolicy) -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(policy.max_pixels.saturating_mul(8).max(64 << 20));
    limits
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "frame".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::gif::{GifEncoder, Repeat};
    use image::{Delay, Rgba, RgbaImage};

    fn animated_gif(path: &Path, frames: u32) {
        let mut encoder = GifEncoder::new(File::create(path).unwrap());
        encoder.set_repeat(Repeat::Infinite).unwrap();
        for i in 0..frames {
            let img = RgbaImage::from_pixel(12, 8, Rgba([(i * 60) as u8, 10, 200, 255]));
            encoder.encode_frame(image::Frame::from_parts(img, 0, 0, Delay::from_numer_denom_ms(50, 1))).unwrap();
        }
    }

    #[test]
    fn an_animated_gif_gives_every_frame_with_its_delay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clip.gif");
        animated_gif(&path, 3);
        let frames: Vec<Frame> = open_frames(&path, &ImagePolicy::default()).unwrap().map(Result::unwrap).collect();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[2].name, "frame00002");
        assert_eq!(frames[1].delay_ms, 50);
        assert_eq!(frames[0].image.dimensions(), (12, 8));
        // The palette keeps these flat colours exactly.
        assert_eq!(frames[2].image.get_pixel(3, 3).0, [120, 10, 200]);
    }

    #[test]
    fn a_folder_gives_its_images_in_order_and_reports_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        for (name, v) in [("b.png", 20u8), ("a.png", 10)] {
            RgbImage::from_pixel(5, 4, image::Rgb([v, v, v])).save(dir.path().join(name)).unwrap();
        }
        std::fs::write(dir.path().join("c.png"), b"not a png").unwrap();
        let frames = open_frames(dir.path(), &ImagePolicy::default()).unwrap();
        assert_eq!(frames.len, Some(3));
        let got: Vec<_> = frames.collect();
        assert_eq!(got[0].as_ref().unwrap().name, "a");
        assert_eq!(got[1].as_ref().unwrap().image.get_pixel(0, 0).0, [20, 20, 20]);
        assert_eq!(got[2].as_ref().unwrap_err().reason, SkipReason::NotAnImage);
    }

    #[test]
    fn container_video_is_refused_with_advice() {
        let err = open_frames(Path::new("clip.mp4"), &ImagePolicy::default()).err().unwrap().to_string();
        assert!(err.contains("ffmpeg -i clip.mp4 frames/%05d.png"), "{err}");
    }
}
