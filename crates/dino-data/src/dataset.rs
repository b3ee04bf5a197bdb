//! Datasets, named by one string (SPEC) everywhere in the CLI.
//!
//! SPEC is `synthetic` (the built-in generated dataset) or a path, auto-detected:
//! - a directory holding MNIST/Fashion-MNIST IDX files (`train-images-idx3-ubyte[.gz]`, ...),
//! - a directory holding CIFAR-10 (`data_batch_N.bin`, `test_batch.bin`) or CIFAR-100
//!   (`train.bin`, `test.bin`) binary batches, directly or in `cifar-10-batches-bin/`,
//! - an image folder: class subfolders give labels (as torchvision's `ImageFolder`), a flat folder
//!   is unlabeled; with `train/` and `val/` (or `test/`) subfolders those are the splits.
//!
//! `#train` or `#test` after the SPEC picks a split (default `train`), and a range of image
//! indices in brackets after that keeps part of it: `fashion-mnist#train[..50000]` (the first
//! 50 000), `fashion-mnist#train[50000..]` (the rest), `synthetic[100..200]`. Carving a
//! validation split out of the training set this way keeps the test split for the end.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use rayon::prelude::*;

use crate::{BadImage, DataError, ImagePolicy, Listing, describe_skips, is_image_file, list_images, load_rgb, probe};

/// A split of a dataset that has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// Where the pixels live.
#[derive(Debug, Clone)]
enum Source {
    /// Image files, decoded on demand.
    Files(Vec<PathBuf>),
    /// Decoded 8-bit images of one size, `channels` = 1 (gray) or 3 (RGB, planar as CIFAR stores
    /// it when `planar`), back to back.
    Memory { width: u32, height: u32, channels: usize, planar: bool, pixels: Vec<u8> },
    /// The built-in generated dataset: item `i` is image `start + i`, drawn from `seed` and
    /// that index.
    Synthetic { start: usize, len: usize, seed: u64 },
}

/// A dataset: images, and labels when it has them.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// What the SPEC named, for messages and logs.
    pub name: String,
    source: Source,
    labels: Option<Vec<u32>>,
    /// Class names, in label order (empty when unlabeled).
    pub classes: Vec<String>,
    /// How image files are decoded and what happens to those that cannot be.
    policy: ImagePolicy,
    /// Image files left out when the dataset was opened, and why.
    skipped: Vec<BadImage>,
}

/// An image the loader can use in place of image `i`: `i` itself, or when it cannot be
/// decoded, the next one that can.
#[derive(Debug)]
pub struct Substitute {
    /// The index of the image returned.
    pub index: usize,
    pub image: RgbImage,
    /// The images tried before it that could not be decoded.
    pub skipped: Vec<BadImage>,
}

/// The number of images of the built-in synthetic dataset per split.
pub const SYNTHETIC_TRAIN: usize = 2000;
/// Test images of the built-in synthetic dataset.
pub const SYNTHETIC_TEST: usize = 500;
/// Side of the synthetic images.
pub const SYNTHETIC_SIZE: u32 = 32;
const SYNTHETIC_CLASSES: [&str; 8] =
    ["disc", "square", "ring", "cross", "horizontal stripes", "vertical stripes", "checkerboard", "triangle"];

impl Dataset {
    /// Opens the dataset named by `spec` (see the module documentation). Image files are
    /// probed (header only) as `policy` says: those that cannot be used are left out and listed
    /// in [`Dataset::skipped`], or with `policy.strict` are an error.
    pub fn open(spec: &str, policy: &ImagePolicy) -> Result<Self, DataError> {
        let (spec_split, range) = split_range(spec)?;
        let mut dataset = Self::open_split(spec_split, spec, policy)?;
        if let Some((start, end)) = range {
            let end = end.unwrap_or(dataset.len());
            if start >= end || end > dataset.len() {
                return Err(DataError::Spec {
                    spec: spec.into(),
                    problem: format!("range [{start}..{end}] is not within its {} images", dataset.len()),
                });
            }
            dataset.select(start, end);
        }
        dataset.name = spec.to_string();
        Ok(dataset)
    }

    /// An unlabeled dataset of the image files `listing` found, probed as [`Dataset::open`]
    /// probes them; what listing skipped counts among [`Dataset::skipped`].
    pub fn from_files(name: &str, listing: Listing, policy: &ImagePolicy) -> Result<Self, DataError> {
        Self::usable_files(name, listing.paths, None, Vec::new(), listing.skipped, policy)
    }

    /// The files of `paths` (with their `labels`) that pass the probe; `skipped` holds what
    /// listing them skipped already.
    fn usable_files(
        name: &str,
        paths: Vec<PathBuf>,
        labels: Option<Vec<u32>>,
        classes: Vec<String>,
        mut skipped: Vec<BadImage>,
        policy: &ImagePolicy,
    ) -> Result<Self, DataError> {
        let probes: Vec<Result<(), BadImage>> = paths.par_iter().map(|p| probe(p, policy)).collect();
        let count = paths.len() + skipped.len();
        let (mut kept, mut kept_labels) = (Vec::new(), labels.as_ref().map(|_| Vec::new()));
        for (i, (path, probe)) in paths.into_iter().zip(probes).enumerate() {
            match probe {
                Ok(()) => {
                    kept.push(path);
                    if let (Some(kept), Some(labels)) = (&mut kept_labels, &labels) {
                        kept.push(labels[i]);
                    }
                }
                Err(bad) => skipped.push(bad),
            }
        }
        skipped.sort_by(|a, b| a.path.cmp(&b.path));
        if let Some(first) = skipped.first() {
            let (summary, first) = (describe_skips(&skipped), Box::new(first.clone()));
            if kept.is_empty() {
                return Err(DataError::NoUsableImages { name: name.into(), count, summary, first });
            }
            if policy.strict {
                return Err(DataError::Strict { count: skipped.len(), summary, first });
            }
        }
        Ok(Dataset {
            name: name.into(),
            source: Source::Files(kept),
            labels: kept_labels,
            classes,
            policy: *policy,
            skipped,
        })
    }

    fn open_split(spec_split: &str, spec: &str, policy: &ImagePolicy) -> Result<Self, DataError> {
        let (path, split) = match spec_split.rsplit_once('#') {
            Some((p, "train")) => (p, Split::Train),
            Some((p, "test")) => (p, Split::Test),
            Some((_, other)) => {
                return Err(DataError::Spec {
                    spec: spec.into(),
                    problem: format!("unknown split '#{other}' (use #train or #test)"),
                });
            }
            None => (spec_split, Split::Train),
        };
        if path == "synthetic" {
            return Ok(Self::synthetic(split));
        }
        let dir = Path::new(path);
        if !dir.exists() {
            return Err(DataError::Spec { spec: spec.into(), problem: "no such file or directory".into() });
        }
        if !dir.is_dir() {
            return Err(DataError::Spec {
                spec: spec.into(),
                problem: "a dataset is a directory (image folder, IDX or CIFAR files) or `synthetic`".into(),
            });
        }
        if let Some(idx) = find_idx(dir, split) {
            read_idx(&idx.0, &idx.1)
        } else if let Some(files) = find_cifar(dir, split) {
            read_cifar(&files)
        } else {
            image_folder(dir, split, policy)
        }
    }

    /// The built-in synthetic dataset: 32 px images of eight shape classes, each image three
    /// copies of its class's shape at random positions and sizes, in random tints, with noise.
    /// Nothing to download; the test split uses other seeds.
    pub fn synthetic(split: Split) -> Self {
        let (len, seed) = match split {
            Split::Train => (SYNTHETIC_TRAIN, 0x5eed),
            Split::Test => (SYNTHETIC_TEST, 0x7e57),
        };
        let labels = (0..len).map(|i| (i % SYNTHETIC_CLASSES.len()) as u32).collect();
        Self {
            name: format!("synthetic#{}", if split == Split::Train { "train" } else { "test" }),
            source: Source::Synthetic { start: 0, len, seed },
            labels: Some(labels),
            classes: SYNTHETIC_CLASSES.iter().map(|c| c.to_string()).collect(),
            policy: ImagePolicy::default(),
            skipped: Vec::new(),
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        match &self.source {
            Source::Files(paths) => paths.len(),
            Source::Memory { width, height, channels, pixels, .. } => {
                pixels.len() / (*width as usize * *height as usize * channels)
            }
            Source::Synthetic { len, .. } => *len,
        }
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Label of image `i`, if the dataset has labels.
    pub fn label(&self, i: usize) -> Option<u32> {
        self.labels.as_ref().map(|l| l[i])
    }

    /// All labels, if the dataset has them.
    pub fn labels(&self) -> Option<&[u32]> {
        self.labels.as_deref()
    }

    /// Keeps the first `n` images (for quick runs and tests).
    pub fn truncate(&mut self, n: usize) {
        self.select(0, n.min(self.len()));
    }

    /// Keeps images `start..end` (indices then count from `start`).
    fn select(&mut self, start: usize, end: usize) {
        assert!(start <= end && end <= self.len(), "range within the dataset");
        match &mut self.source {
            Source::Files(paths) => {
                paths.truncate(end);
                paths.drain(..start);
            }
            Source::Memory { width, height, channels, pixels, .. } => {
                let image = *width as usize * *height as usize * *channels;
                pixels.truncate(end * image);
                pixels.drain(..start * image);
            }
            Source::Synthetic { start: first, len, .. } => {
                *first += start;
                *len = end - start;
            }
        }
        if let Some(labels) = &mut self.labels {
            labels.truncate(end);
            labels.drain(..start);
        }
    }

    /// Image `i` as 8-bit RGB.
    pub fn image(&self, i: usize) -> Result<RgbImage, DataError> {
        match &self.source {
            Source::Files(paths) => Ok(load_rgb(&paths[i], &self.policy)?),
            Source::Memory { width, height, channels, planar, pixels } => {
                let n = (*width * *height) as usize;
                let px = &pixels[i * n * channels..(i + 1) * n * channels];
                Ok(RgbImage::from_fn(*width, *height, |x, y| {
                    let j = (y * *width + x) as usize;
                    match (channels, planar) {
                        (1, _) => Rgb([px[j]; 3]),
                        (_, true) => Rgb([px[j], px[n + j], px[2 * n + j]]),
                        _ => Rgb([px[3 * j], px[3 * j + 1], px[3 * j + 2]]),
                    }
                }))
            }
            Source::Synthetic { start, seed, .. } => {
                let class = self.label(i).expect("synthetic images are labeled") as usize;
                let index = (start + i) as u64;
                Ok(synthetic_image(class, &mut StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15))))
            }
        }
    }

    /// Image `i`, or `Ok(Err(bad))` when it cannot be decoded (a file that passed the probe but
    /// is truncated or corrupt) and the policy skips such files; with a strict policy the bad
    /// file is an error.
    pub fn image_or_skip(&self, i: usize) -> Result<Result<RgbImage, BadImage>, DataError> {
        match self.image(i) {
            Ok(image) => Ok(Ok(image)),
            Err(DataError::BadImage(bad)) if !self.policy.strict => Ok(Err(bad)),
            Err(e) => Err(e),
        }
    }

    /// Image `i`, or when it is skipped ([`Dataset::image_or_skip`]) the next one after it that
    /// can be decoded, wrapping around: the loaders use this so that a bad file costs one
    /// sample, not the run.
    pub fn image_or_next(&self, i: usize) -> Result<Substitute, DataError> {
        let mut skipped = Vec::new();
        for index in (i..self.len()).chain(0..i) {
            match self.image_or_skip(index)? {
                Ok(image) => return Ok(Substitute { index, image, skipped }),
                Err(bad) => skipped.push(bad),
            }
        }
        let first = Box::new(skipped[0].clone());
        Err(DataError::NoUsableImages {
            name: self.name.clone(),
            count: skipped.len(),
            summary: describe_skips(&skipped),
            first,
        })
    }

    /// The image files left out when the dataset was opened (they cannot be used), and why.
    pub fn skipped(&self) -> &[BadImage] {
        &self.skipped
    }

    /// The typical shorter side of the images: the median over up to 32 evenly spaced images
    /// (all of one size for IDX, CIFAR and synthetic data). For choosing crop sizes.
    pub fn typical_side(&self) -> Result<u32, DataError> {
        match &self.source {
            Source::Memory { width, height, .. } => Ok(*width.min(height)),
            Source::Synthetic { .. } => Ok(SYNTHETIC_SIZE),
            Source::Files(paths) => {
                if paths.is_empty() {
                    return Err(DataError::Spec { spec: self.name.clone(), problem: "no images".into() });
                }
                let step = paths.len().div_ceil(32);
                let mut sides: Vec<u32> = (0..paths.len())
                    .step_by(step)
                    .map(|i| self.image_or_next(i).map(|s| s.image.width().min(s.image.height())))
                    .collect::<Result<_, _>>()?;
                sides.sort_unstable();
                Ok(sides[sides.len() / 2])
            }
        }
    }

    /// The image file of item `i`, for datasets of files.
    pub fn path(&self, i: usize) -> Option<&Path> {
        match &self.source {
            Source::Files(paths) => Some(&paths[i]),
            _ => None,
        }
    }
}

/// `SPEC[a..b]` -> (`SPEC`, Some((a, b))), with `a` 0 and `b` None (the end) when left out.
#[allow(clippy::type_complexity)]
fn split_range(spec: &str) -> Result<(&str, Option<(usize, Option<usize>)>), DataError> {
    let Some(inner) = spec.strip_suffix(']') else { return Ok((spec, None)) };
    let Some((head, range)) = inner.rsplit_once('[') else { return Ok((spec, None)) };
    let bad = || DataError::Spec {
        spec: spec.into(),
        problem: format!("'[{range}]' is not a range of image indices such as [..50000] or [50000..]"),
    };
    let (a, b) = range.split_once("..").ok_or_else(bad)?;
    let start = if a.is_empty() { 0 } else { a.trim().parse().map_err(|_| bad())? };
    let end = if b.is_empty() { None } else { Some(b.trim().parse().map_err(|_| bad())?) };
    Ok((head, Some((start, end))))
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io { path: path.into(), source };
    let raw = fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(io)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn first_existing(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().flat_map(|n| [dir.join(n), dir.join(format!("{n}.gz"))]).find(|p| p.is_file())
}

fn find_idx(dir: &Path, split: Split) -> Option<(PathBuf, PathBuf)> {
    let prefix = if split == Split::Train { "train" } else { "t10k" };
    let images =
        first_existing(dir, &[&format!("{prefix}-images-idx3-ubyte"), &format!("{prefix}-images.idx3-ubyte")])?;
    let labels =
        first_existing(dir, &[&format!("{prefix}-labels-idx1-ubyte"), &format!("{prefix}-labels.idx1-ubyte")])?;
    Some((images, labels))
}

/// MNIST-style IDX files: big-endian magic 0x0803 (images) / 0x0801 (labels), then the sizes.
fn read_idx(images: &Path, labels: &Path) -> Result<Dataset, DataError> {
    let bad = |path: &Path, reason: &str| DataError::Decode { path: path.into(), reason: reason.into() };
    let be = |b: &[u8], i: usize| u32::from_be_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]) as usize;
    let img = read_maybe_gz(images)?;
    if img.len() < 16 || be(&img, 0) != 0x0803 {
        return Err(bad(images, "not an IDX image file (magic 0x00000803)"));
    }
    let (n, h, w) = (be(&img, 1), be(&img, 2), be(&img, 3));
    if n == 0 || h == 0 || w == 0 {
        return Err(bad(images, &format!("IDX header declares {n} images of {h}x{w} px: nothing to read")));
    }
    if n.checked_mul(h).and_then(|p| p.checked_mul(w)).and_then(|p| p.checked_add(16)) != Some(img.len()) {
        return Err(bad(images, "truncated IDX image file"));
    }
    let lab = read_maybe_gz(labels)?;
    if lab.len() < 8 || be(&lab, 0) != 0x0801 || be(&lab, 1) != n || lab.len() != 8 + n {
        return Err(bad(labels, "not an IDX label file matching the images"));
    }
    let labels: Vec<u32> = lab[8..].iter().map(|&l| l as u32).collect();
    let classes = (0..=labels.iter().copied().max().unwrap_or(0)).map(|c| c.to_string()).collect();
    Ok(Dataset {
        name: String::new(),
        source: Source::Memory {
            width: w as u32,
            height: h as u32,
            channels: 1,
            planar: false,
            pixels: img[16..].to_vec(),
        },
        labels: Some(labels),
        classes,
        policy: ImagePolicy::default(),
        skipped: Vec::new(),
    })
}

fn find_cifar(dir: &Path, split: Split) -> Option<Vec<PathBuf>> {
    let dir =
        if dir.join("cifar-10-batches-bin").is_dir() { dir.join("cifar-10-batches-bin") } else { dir.to_path_buf() };
    let cifar10: Vec<PathBuf> = match split {
        Split::Train => (1..=5).map(|i| dir.join(format!("data_batch_{i}.bin"))).collect(),
        Split::Test => vec![dir.join("test_batch.bin")],
    };
    if cifar10.iter().all(|p| p.is_file()) {
        return Some(cifar10);
    }
    let dir100 = if dir.join("cifar-100-binary").is_dir() { dir.join("cifar-100-binary") } else { dir };
    let cifar100 = dir100.join(if split == Split::Train { "train.bin" } else { "test.bin" });
    cifar100.is_file().then(|| vec![cifar100])
}

/// CIFAR binary batches: per record, the label byte(s) then 3072 bytes of planar 32x32 RGB.
/// CIFAR-100 records carry a coarse and a fine label; the fine one is used.
fn read_cifar(files: &[PathBuf]) -> Result<Dataset, DataError> {
    let is_100 = files[0].file_name().is_some_and(|n| n == "train.bin" || n == "test.bin");
    let label_bytes = if is_100 { 2 } else { 1 };
    let record = label_bytes + 3072;
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for file in files {
        let bytes = fs::read(file).map_err(|source| DataError::Io { path: file.clone(), source })?;
        if bytes.is_empty() || bytes.len() % record != 0 {
            return Err(DataError::Decode {
                path: file.clone(),
                reason: format!("not a CIFAR batch ({record}-byte records)"),
            });
        }
        for r in bytes.chunks(record) {
            labels.push(r[label_bytes - 1] as u32);
            pixels.extend_from_slice(&r[label_bytes..]);
        }
    }
    let classes = (0..=labels.iter().copied().max().unwrap_or(0)).map(|c| c.to_string()).collect();
    Ok(Dataset {
        name: String::new(),
        source: Source::Memory { width: 32, height: 32, channels: 3, planar: true, pixels },
        labels: Some(labels),
        classes,
        policy: ImagePolicy::default(),
        skipped: Vec::new(),
    })
}

/// An image folder; class subfolders (sorted by name) give labels.
fn image_folder(dir: &Path, split: Split, policy: &ImagePolicy) -> Result<Dataset, DataError> {
    let split_dir = match split {
        Split::Train => Some(dir.join("train")),
        Split::Test => ["val", "test"].iter().map(|d| dir.join(d)).find(|d| d.is_dir()),
    };
    let dir = match split_dir {
        Some(d) if d.is_dir() => d,
        _ if split == Split::Test => {
            return Err(DataError::Spec {
                spec: dir.display().to_string(),
                problem: "no test split: expected a val/ or test/ subfolder".into(),
            });
        }
        _ => dir.to_path_buf(),
    };
    let name = dir.display().to_string();
    let mut classes: Vec<String> = fs::read_dir(&dir)
        .map_err(|source| DataError::Io { path: dir.clone(), source })?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    classes.sort();
    let loose_images = fs::read_dir(&dir)
        .map_err(|source| DataError::Io { path: dir.clone(), source })?
        .filter_map(Result::ok)
        .any(|e| e.path().is_file() && is_image_file(&e.path()));
    if classes.is_empty() || loose_images {
        let listing = list_images(&dir)?;
        return Dataset::usable_files(&name, listing.paths, None, Vec::new(), listing.skipped, policy);
    }
    let (mut paths, mut labels, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for (label, class) in classes.iter().enumerate() {
        let listing = list_images(&dir.join(class)).unwrap_or_default();
        labels.extend(std::iter::repeat_n(label as u32, listing.paths.len()));
        paths.extend(listing.paths);
        skipped.extend(listing.skipped);
    }
    if paths.is_empty() {
        return Err(DataError::NoImages { path: dir });
    }
    Dataset::usable_files(&name, paths, Some(labels), classes, skipped, policy)
}

/// One synthetic image of `class`, made so that raw pixels are a poor metric and the class
/// needs the invariances DINO's augmentations teach:
/// - **position and scale**: three copies of the class's shape, each anywhere it fits at its own
///   size (radius 12-22 % of the side); no layout is shared by two images of a class, while
///   every crop of an image still shows its class (which is what DINO matches across crops);
/// - **colour**: a dark background and a bright foreground, each of a random brightness and
///   tint, within what colour jitter and grayscale cover (a colour beyond them would be a
///   shortcut two crops of one image share, which DINO learns instead of the shape;
///   BENCHMARKS.md, section 3);
/// - **noise**: pixel noise, so no two images of a class match pixel for pixel.
///
/// Texture classes (stripes, checkerboard) have a random period and phase.
fn synthetic_image(class: usize, rng: &mut StdRng) -> RgbImage {
    let s = SYNTHETIC_SIZE as f32;
    let tinted = |rng: &mut StdRng, luma: std::ops::Range<f32>| -> [f32; 3] {
        let luma = rng.random_range(luma);
        std::array::from_fn(|_| luma + rng.random_range(-12.0..12.0))
    };
    let bg = tinted(rng, 40.0..70.0);
    let fg = tinted(rng, 170.0..210.0);
    let shapes: Vec<(f32, f32, f32)> = (0..3)
        .map(|_| {
            let r = rng.random_range(0.12 * s..0.22 * s);
            (rng.random_range(r..s - r), rng.random_range(r..s - r), r)
        })
        .collect();
    let period = rng.random_range(2.5..5.0f32);
    let phase = rng.random_range(0.0..period);
    let noise = rng.random::<u64>();
    let band = |v: f32| ((v + phase) / period).floor() as i32;
    RgbImage::from_fn(SYNTHETIC_SIZE, SYNTHETIC_SIZE, |x, y| {
        let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
        let on = shapes.iter().any(|&(cx, cy, r)| {
            let (dx, dy) = (px - cx, py - cy);
            let inside_box = dx.abs() < r && dy.abs() < r;
            match class {
                0 => dx * dx + dy * dy < r * r,
                1 => inside_box,
                2 => (0.55 * r..r).contains(&(dx * dx + dy * dy).sqrt()),
                3 => (dx.abs() < 0.3 * r && dy.abs() < r) || (dy.abs() < 0.3 * r && dx.abs() < r),
                4 => inside_box && band(py) % 2 == 0,
                5 => inside_box && band(px) % 2 == 0,
                6 => inside_box && (band(px) + band(py)) % 2 == 0,
                _ => dy < r && dy > -r && dx.abs() < (dy + r) / 2.0,
            }
        });
        let hash = (noise ^ ((x as u64) << 32 | y as u64)).wrapping_mul(0x2545_f491_4f6c_dd1d);
        let jitter = ((hash >> 56) as f32 / 255.0 - 0.5) * 40.0;
        let base = if on { fg } else { bg };
        Rgb(std::array::from_fn(|c| (base[c] + jitter).clamp(0.0, 255.0) as u8))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(spec: &str) -> Result<Dataset, DataError> {
        Dataset::open(spec, &ImagePolicy::default())
    }

    fn listing(paths: Vec<PathBuf>) -> Listing {
        Listing { paths, skipped: Vec::new() }
    }

    #[test]
    fn synthetic_is_labeled_deterministic_and_split() {
        let train = open("synthetic").unwrap();
        assert_eq!(train.len(), SYNTHETIC_TRAIN);
        assert_eq!(train.classes.len(), 8);
        assert_eq!(train.image(3).unwrap(), train.image(3).unwrap());
        assert_ne!(train.image(3).unwrap(), open("synthetic#test").unwrap().image(3).unwrap());
        assert_eq!(train.label(9), Some(1));
    }

    #[test]
    fn ranges_carve_splits() {
        let all = open("synthetic").unwrap();
        let head = open("synthetic#train[..1500]").unwrap();
        let tail = open("synthetic[1500..]").unwrap();
        assert_eq!((head.len(), tail.len()), (1500, SYNTHETIC_TRAIN - 1500));
        assert_eq!(tail.image(3).unwrap(), all.image(1503).unwrap());
        assert_eq!(tail.label(3), all.label(1503));
        assert_eq!(head.image(7).unwrap(), all.image(7).unwrap());
        for bad in ["synthetic[5..3]", "synthetic[..99999]", "synthetic[a..]", "synthetic[12]"] {
            let e = open(bad).unwrap_err().to_string();
            assert!(e.contains("range") || e.contains("not a range"), "{bad}: {e}");
        }
    }

    #[test]
    fn idx_and_cifar_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
        img.extend([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        fs::write(dir.path().join("t10k-images-idx3-ubyte"), &img).unwrap();
        fs::write(dir.path().join("t10k-labels-idx1-ubyte"), [0, 0, 8, 1, 0, 0, 0, 2, 7, 3]).unwrap();
        let d = open(&format!("{}#test", dir.path().display())).unwrap();
        assert_eq!((d.len(), d.label(1)), (2, Some(3)));
        assert_eq!(d.image(1).unwrap().get_pixel(2, 1).0, [12, 12, 12]);
        let second = open(&format!("{}#test[1..]", dir.path().display())).unwrap();
        assert_eq!((second.len(), second.label(0)), (1, Some(3)));
        assert_eq!(second.image(0).unwrap(), d.image(1).unwrap());
        assert!(open(&dir.path().display().to_string()).is_err(), "no train split, no images");

        let cifar = tempfile::tempdir().unwrap();
        let mut record = vec![4u8];
        record.extend((0..3072).map(|i| (i / 1024) as u8 * 100));
        fs::write(cifar.path().join("test_batch.bin"), &record).unwrap();
        let c = open(&format!("{}#test", cifar.path().display())).unwrap();
        assert_eq!((c.len(), c.label(0)), (1, Some(4)));
        assert_eq!(c.image(0).unwrap().get_pixel(5, 5).0, [0, 100, 200]);
    }

    #[test]
    fn image_folders_take_labels_from_subfolders() {
        let dir = tempfile::tempdir().unwrap();
        for class in ["b", "a"] {
            fs::create_dir_all(dir.path().join(class)).unwrap();
            RgbImage::new(4, 4).save(dir.path().join(class).join("x.png")).unwrap();
        }
        let d = open(&dir.path().display().to_string()).unwrap();
        assert_eq!(d.classes, vec!["a", "b"]);
        assert_eq!((d.len(), d.label(1)), (2, Some(1)));
        let e = open(&format!("{}#val", dir.path().display())).unwrap_err();
        assert!(e.to_string().contains("#val"), "{e}");
    }

    /// Every file of the bad-image corpus is used, or skipped for its reason: when the dataset
    /// is opened (what the header shows) or when it is decoded (truncated and corrupt data),
    /// where the next usable image takes its place.
    #[test]
    fn a_folder_of_bad_files_keeps_the_usable_ones() {
        use dino_fixtures::bad_images::{Expect, write_corpus};
        let dir = tempfile::tempdir().unwrap();
        let cases = write_corpus(dir.path());
        let data = open(&dir.path().display().to_string()).unwrap();
        let kept: Vec<&Path> = (0..data.len()).map(|i| data.path(i).unwrap()).collect();
        for case in &cases {
            let at_open = data.skipped().iter().find(|b| b.path == case.path);
            let index = kept.iter().position(|p| *p == case.path);
            match (&case.expect, at_open, index) {
                (Expect::Used { width, height, .. }, None, Some(i)) => {
                    let s = data.image_or_next(i).unwrap();
                    assert_eq!(
                        (s.index, s.image.dimensions(), s.skipped.len()),
                        (i, (*width, *height), 0),
                        "{}",
                        case.kind
                    );
                }
                (Expect::Skipped(reason), Some(bad), None) => {
                    assert_eq!(bad.reason.to_string(), *reason, "{}", case.kind)
                }
                (Expect::Skipped(reason), None, Some(i)) => {
                    let s = data.image_or_next(i).unwrap();
                    assert_ne!(s.index, i, "{}", case.kind);
                    assert_eq!(s.skipped[0].reason.to_string(), *reason, "{}", case.kind);
                    assert_eq!(s.skipped[0].path, case.path);
                }
                other => panic!("{}: {:?} but {other:?}", case.kind, case.expect),
            }
        }
        let strict = ImagePolicy { strict: true, ..ImagePolicy::default() };
        let e = Dataset::open(&dir.path().display().to_string(), &strict).unwrap_err().to_string();
        assert!(e.contains("cannot be used") && e.contains("--strict"), "{e}");
        let e = Dataset::from_files(
            "bad",
            listing(vec![dir.path().join("empty.png"), dir.path().join("notes.jpg")]),
            &strict,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("bad: none of its 2 image files can be used (1 empty, 1 not an image)"), "{e}");
    }

    /// A file that passes the probe but fails to decode is an error under a strict policy.
    #[test]
    fn strict_datasets_stop_at_a_file_that_fails_to_decode() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("a.png");
        RgbImage::new(9, 9).save(&good).unwrap();
        let bytes = fs::read(&good).unwrap();
        fs::write(dir.path().join("b.png"), &bytes[..bytes.len() - 20]).unwrap();
        let paths = vec![dir.path().join("b.png"), good];
        let lenient = Dataset::from_files("two", listing(paths.clone()), &ImagePolicy::default()).unwrap();
        assert_eq!(lenient.image_or_next(0).unwrap().index, 1);
        let strict =
            Dataset::from_files("two", listing(paths), &ImagePolicy { strict: true, ..ImagePolicy::default() })
                .unwrap();
        assert!(matches!(strict.image_or_next(0), Err(DataError::BadImage(b)) if b.path.ends_with("b.png")));
    }
}
