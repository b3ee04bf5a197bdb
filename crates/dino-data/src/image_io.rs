//! Decoding and listing image files, and what happens to the files that cannot be used.
//!
//! Folders of images nobody has checked hold empty files, truncated downloads, text files with
//! an image extension, decompression bombs and broken links. None of them stops a run: each is
//! either decoded correctly or skipped with a [`BadImage`] that says why ([`SkipReason`]), and
//! the commands count and report the skips. [`ImagePolicy::strict`] turns skips into errors.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

use crate::DataError;

/// File extensions treated as images (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "bmp", "webp", "gif", "tif", "tiff"];

/// How image files are decoded, and whether a file that cannot be used is skipped or an error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagePolicy {
    /// Most pixels (width x height) an image may declare; larger ones are skipped before any
    /// pixel is decoded. Default 178 956 970: where Pillow raises `DecompressionBombError`
    /// (twice its `Image.MAX_IMAGE_PIXELS`).
    pub max_pixels: u64,
    /// Largest image file, in bytes. Default 256 MiB.
    pub max_file_bytes: u64,
    /// Stop at the first file that cannot be used instead of skipping it.
    pub strict: bool,
}

impl Default for ImagePolicy {
    fn default() -> Self {
        Self { max_pixels: 178_956_970, max_file_bytes: 256 << 20, strict: false }
    }
}

/// Why an image file is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    /// It cannot be opened or read: permissions, a broken or looping link, an I/O error.
    Unreadable,
    /// Zero bytes.
    Empty,
    /// Its content is no image format we decode (whatever the extension says).
    NotAnImage,
    /// A known format in a variant the decoder does not support.
    Unsupported,
    /// The decoder failed: truncated or corrupt data.
    Corrupt,
    /// Over [`ImagePolicy::max_pixels`] or [`ImagePolicy::max_file_bytes`].
    TooLarge,
    /// A directory that links back to one above it (skipped while listing).
    FilesystemLoop,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unreadable => "unreadable",
            Self::Empty => "empty",
            Self::NotAnImage => "not an image",
            Self::Unsupported => "unsupported",
            Self::Corrupt => "corrupt or truncated",
            Self::TooLarge => "over the decoding limits",
            Self::FilesystemLoop => "filesystem loop",
        })
    }
}

/// A file that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {reason} ({detail})", path.display())]
pub struct BadImage {
    pub path: PathBuf,
    pub reason: SkipReason,
    /// What the file system or the decoder said.
    pub detail: String,
}

impl BadImage {
    /// A bad image whose `detail` (a decoder's message, which may span lines) is put on one line.
    pub fn new(path: &Path, reason: SkipReason, detail: impl AsRef<str>) -> Self {
        let detail = detail.as_ref().split_whitespace().collect::<Vec<_>>().join(" ");
        Self { path: path.into(), reason, detail }
    }
}

/// Skips counted by reason, in report order.
pub fn count_skips<'a>(skipped: impl IntoIterator<Item = &'a BadImage>) -> BTreeMap<SkipReason, usize> {
    let mut counts = BTreeMap::new();
    for bad in skipped {
        *counts.entry(bad.reason).or_insert(0) += 1;
    }
    counts
}

/// Skips counted by reason, in report order: `3 corrupt or truncated, 1 empty`.
pub fn describe_skips<'a>(skipped: impl IntoIterator<Item = &'a BadImage>) -> String {
    count_skips(skipped).iter().map(|(reason, n)| format!("{n} {reason}")).collect::<Vec<_>>().join(", ")
}

/// Whether `path` has an image extension.
pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Opens `path` for decoding under `policy`'s limits, having read only its header: the checks
/// of [`probe`] and the first steps of [`load_rgb`].
fn open_decoder(path: &Path, policy: &ImagePolicy) -> Result<impl ImageDecoder, BadImage> {
    let bad = |reason, detail: String| BadImage::new(path, reason, detail);
    let unreadable = |e: std::io::Error| bad(SkipReason::Unreadable, e.to_string());
    let size = std::fs::metadata(path).map_err(unreadable)?.len();
    if size == 0 {
        return Err(bad(SkipReason::Empty, "0 bytes".into()));
    }
    if size > policy.max_file_bytes {
        return Err(bad(
            SkipReason::TooLarge,
            format!("{size} bytes, over max_file_bytes = {}", policy.max_file_bytes),
        ));
    }
    let mut reader = ImageReader::new(BufReader::new(File::open(path).map_err(unreadable)?))
        .with_guessed_format()
        .map_err(unreadable)?;
    if reader.format().is_none() {
        return Err(bad(SkipReason::NotAnImage, "no known image format in its first bytes".into()));
    }
    let mut limits = image::Limits::default();
    // Room for the decoded image at 16 bits per channel with alpha, so the limit that binds is
    // max_pixels, checked below with a clear message; the decoders stop at this one on their own.
    limits.max_alloc = Some(policy.max_pixels.saturating_mul(8).max(64 << 20));
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| decode_error(path, e))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        // A GIF may declare a 0-wide screen, and its decoder then returns an image of no pixels.
        return Err(bad(SkipReason::Corrupt, format!("declares {width}x{height} px")));
    }
    if u64::from(width) * u64::from(height) > policy.max_pixels {
        return Err(bad(SkipReason::TooLarge, format!("{width}x{height} px, over max_pixels = {}", policy.max_pixels)));
    }
    Ok(decoder)
}

fn decode_error(path: &Path, e: ImageError) -> BadImage {
    let reason = match &e {
        ImageError::Limits(_) => SkipReason::TooLarge,
        ImageError::Unsupported(_) => SkipReason::Unsupported,
        ImageError::IoError(io) if io.kind() != std::io::ErrorKind::UnexpectedEof => SkipReason::Unreadable,
        _ => SkipReason::Corrupt,
    };
    BadImage::new(path, reason, e.to_string())
}

/// Checks what can be checked of `path` without decoding its pixels: that it can be read, is
/// not empty, is an image format we decode, and is within `policy`'s limits.
pub fn probe(path: &Path, policy: &ImagePolicy) -> Result<(), BadImage> {
    catching_decoder_panics(path, || open_decoder(path, policy).map(drop))
}

/// Runs a decoder on `path`, turning a panic inside it into a skip: decoders are third-party
/// code, and one bad file must not end a run. (png 0.18.1 panics on a PLTE chunk whose length
/// is not a multiple of 3, image-rs/image-png#694; the fuzz tests found it.)
fn catching_decoder_panics<T>(path: &Path, decode: impl FnOnce() -> Result<T, BadImage>) -> Result<T, BadImage> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Err(BadImage::new(path, SkipReason::Corrupt, format!("the decoder panicked on it: {message}")))
    })
}

/// Decodes any supported image to 8-bit RGB, as PIL's `convert("RGB")` does: grayscale is
/// replicated, palettes expanded, alpha dropped, 16-bit scaled to 8-bit, CMYK converted. The
/// format is read from the content, not the extension, and an EXIF orientation is applied (as
/// `ImageOps.exif_transpose`), so a photo taken sideways is upright.
pub fn load_rgb(path: &Path, policy: &ImagePolicy) -> Result<RgbImage, BadImage> {
    catching_decoder_panics(path, || {
        let mut decoder = open_decoder(path, policy)?;
        let orientation = decoder.orientation().map_err(|e| decode_error(path, e))?;
        let mut image = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(path, e))?;
        image.apply_orientation(orientation);
        Ok(image.to_rgb8())
    })
}

/// The image files under a directory, and what was skipped while listing it.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Image files, in sorted path order.
    pub paths: Vec<PathBuf>,
    /// Entries that could not be listed: unreadable directories, links that loop.
    pub skipped: Vec<BadImage>,
}

/// Every image file under `dir`, recursively (following links), in sorted path order.
/// Unreadable entries and link loops are skipped; a directory with no image file at all is an
/// error.
pub fn list_images(dir: &Path) -> Result<Listing, DataError> {
    let mut listing = Listing::default();
    for entry in walkdir::WalkDir::new(dir).follow_links(true) {
        match entry {
            Ok(entry) => {
                if entry.file_type().is_file() && is_image_file(entry.path()) {
                    listing.paths.push(entry.into_path());
                }
            }
            Err(e) if e.depth() == 0 => {
                let source = e.into_io_error().unwrap_or_else(|| std::io::Error::other("cannot list"));
                return Err(DataError::Io { path: dir.into(), source });
            }
            Err(e) => {
                let path = e.path().unwrap_or(dir).to_path_buf();
                let bad = match (e.loop_ancestor(), e.io_error()) {
                    (Some(ancestor), _) => {
                        let detail = format!("links back to {}", ancestor.display());
                        BadImage::new(&path, SkipReason::FilesystemLoop, detail)
                    }
                    (None, Some(io)) => BadImage::new(&path, SkipReason::Unreadable, io.to_string()),
                    (None, None) => BadImage::new(&path, SkipReason::Unreadable, e.to_string()),
                };
                listing.skipped.push(bad);
            }
        }
    }
    listing.paths.sort();
    listing.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    if listing.paths.is_empty() {
        return Err(DataError::NoImages { path: dir.into() });
    }
    Ok(listing)
}

/// Image paths from a text file, one per line; blank lines and `#` comments are skipped and
/// relative paths are taken relative to the list's directory.
pub fn read_image_list(list: &Path) -> Result<Vec<PathBuf>, DataError> {
    let text = std::fs::read_to_string(list).map_err(|source| DataError::Io { path: list.into(), source })?;
    let base = list.parent().unwrap_or(Path::new("."));
    let paths: Vec<PathBuf> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(|l| base.join(l)).collect();
    if paths.is_empty() {
        return Err(DataError::NoImages { path: list.into() });
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dino_fixtures::bad_images::{Expect, write_corpus};

    /// Every file of the corpus is decoded to the right pixels or skipped for the right reason,
    /// by the full decode and, as far as a header tells, by the probe.
    #[test]
    fn every_kind_of_bad_file_is_used_correctly_or_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let cases = write_corpus(dir.path());
        assert!(cases.len() >= 25, "{} kinds", cases.len());
        let policy = ImagePolicy::default();
        for case in cases.iter().filter(|c| c.kind != "directory link loop") {
            let loaded = load_rgb(&case.path, &policy);
            match (&case.expect, &loaded) {
                (Expect::Used { width, height, at, rgb }, Ok(img)) => {
                    assert_eq!(img.dimensions(), (*width, *height), "{}", case.kind);
                    let got = img.get_pixel(at.0, at.1).0;
                    let close = got.iter().zip(rgb).all(|(a, b)| a.abs_diff(*b) <= 40);
                    assert!(close, "{}: pixel {at:?} is {got:?}, expected about {rgb:?}", case.kind);
                    assert_eq!(probe(&case.path, &policy), Ok(()), "{}", case.kind);
                }
                (Expect::Skipped(reason), Err(bad)) => {
                    assert_eq!(bad.reason.to_string(), *reason, "{}: {bad}", case.kind);
                    assert_eq!(bad.path, case.path);
                }
                (expect, got) => panic!("{}: expected {expect:?}, got {got:?}", case.kind),
            }
        }
    }

    #[test]
    fn listing_skips_links_that_loop_or_dangle() {
        let dir = tempfile::tempdir().unwrap();
        let cases = write_corpus(dir.path());
        let listing = list_images(dir.path()).unwrap();
        let image_files = cases.iter().filter(|c| c.kind != "directory link loop").count();
        #[cfg(unix)]
        {
            let reasons: Vec<String> = listing.skipped.iter().map(|b| b.reason.to_string()).collect();
            assert_eq!(reasons.iter().filter(|r| *r == "filesystem loop").count(), 1, "{reasons:?}");
            // The dangling link and the link to itself cannot be followed.
            assert_eq!(reasons.iter().filter(|r| *r == "unreadable").count(), 2, "{reasons:?}");
            assert_eq!(listing.paths.len(), image_files - 2);
        }
        #[cfg(not(unix))]
        assert_eq!(listing.paths.len(), image_files);
        let empty = tempfile::tempdir().unwrap();
        assert!(list_images(empty.path()).unwrap_err().to_string().contains("no images"));
    }

    #[test]
    fn decoding_limits_are_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        RgbImage::new(30, 20).save(&path).unwrap();
        let few_pixels = ImagePolicy { max_pixels: 599, ..ImagePolicy::default() };
        let bad = load_rgb(&path, &few_pixels).unwrap_err();
        assert_eq!(bad.reason, SkipReason::TooLarge);
        assert!(bad.to_string().contains("30x20 px, over max_pixels = 599"), "{bad}");
        assert!(load_rgb(&path, &ImagePolicy { max_pixels: 600, ..few_pixels }).is_ok());
        let few_bytes = ImagePolicy { max_file_bytes: 10, ..ImagePolicy::default() };
        assert!(probe(&path, &few_bytes).unwrap_err().to_string().contains("over max_file_bytes = 10"));
        let skips = [bad.clone(), bad, probe(&path, &few_bytes).unwrap_err()];
        assert_eq!(describe_skips(&skips), "3 over the decoding limits");
    }

    #[test]
    fn lists_resolve_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list.txt");
        std::fs::write(&list, "# comment\na.png\n\n/abs/b.jpg\n").unwrap();
        let paths = read_image_list(&list).unwrap();
        assert_eq!(paths, vec![dir.path().join("a.png"), PathBuf::from("/abs/b.jpg")]);
    }
}
