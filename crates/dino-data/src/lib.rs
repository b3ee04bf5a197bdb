//! Images to model inputs, as the official scripts prepare them: decoding to RGB, listing image
//! files, torchvision-style resize and crop, and ImageNet normalisation to CHW `f32` buffers.
//!
//! No tensors here: the output is plain `Vec<f32>` that the model crates wrap.

mod augment;
pub mod bench;
mod dataset;
mod frames;
mod image_io;
pub mod loader;
mod transform;

pub use augment::{LinearTrainTransform, MultiCropConfig};
pub use dataset::{Dataset, Split};
pub use frames::{DEFAULT_DELAY_MS, Frame, Frames, open_frames};

pub use image_io::{
    BadImage, IMAGE_EXTENSIONS, ImagePolicy, Listing, SkipReason, count_skips, describe_skips, is_image_file,
    list_images, load_rgb, probe, read_image_list,
};
pub use transform::{
    EvalTransform, Filter, IMAGENET_MEAN, IMAGENET_STD, center_crop, resize_exact, resize_shorter_side, to_chw,
};

use std::path::PathBuf;

/// Why an image or a list of images could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file or directory could not be read.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A dataset file (IDX, CIFAR) that is not what its name says.
    #[error("{path}: cannot decode image ({reason})")]
    Decode { path: PathBuf, reason: String },
    /// An image file that cannot be used (the commands skip these unless strict).
    #[error("{0}")]
    BadImage(#[from] BadImage),
    /// Every image file of a dataset was skipped.
    #[error(
        "{name}: none of its {count} image files can be used ({summary}); the first: {first}; fix or remove them, \
         or raise images.max_pixels / images.max_file_bytes if they are only large"
    )]
    NoUsableImages { name: String, count: usize, summary: String, first: Box<BadImage> },
    /// Strict mode met image files that cannot be used.
    #[error(
        "{count} image files cannot be used ({summary}); the first: {first}; fix or remove them, or leave strict \
         mode (--strict) off to skip them"
    )]
    Strict { count: usize, summary: String, first: Box<BadImage> },
    /// A directory or list holds no image.
    #[error("{path}: no images found (looked for {})", IMAGE_EXTENSIONS.join(", "))]
    NoImages { path: PathBuf },
    /// A dataset SPEC that names nothing we can read.
    #[error("dataset '{spec}': {problem}")]
    Spec { spec: String, problem: String },
    /// The loader's thread pool could not be started.
    #[error("cannot start {threads} image loader threads ({reason}); lower num_workers")]
    Threads { threads: usize, reason: String },
    /// The image is too small for the requested processing.
    #[error("{path}: image is {width}x{height} px, {problem}")]
    TooSmall { path: PathBuf, width: u32, height: u32, problem: String },
}
