//! The image-file flags every command that reads a dataset shares, and how skipped files are
//! reported.

use burn::tensor::Device;
use clap::Args;
use dino_data::{BadImage, Dataset, ImagePolicy, describe_skips};
use dino_eval::{DatasetFeatures, ExtractOptions, dataset_features};
use dino_model::Backbone;
use indicatif::{ProgressBar, ProgressStyle};

/// Decoding limits and strictness (`ImagePolicy`); the defaults are `ImagePolicy`'s.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Stop at the first image file that cannot be used (empty, truncated, not an image, over
    /// the limits, unreadable) instead of skipping it with a warning.
    #[arg(long)]
    pub strict: bool,
    /// Skip images that declare more pixels than N (decompression bombs) [default: 178956970,
    /// Pillow's limit].
    #[arg(long, value_name = "N")]
    pub max_pixels: Option<u64>,
    /// Skip image files larger than N bytes [default: 268435456].
    #[arg(long, value_name = "N")]
    pub max_file_bytes: Option<u64>,
}

impl ImageArgs {
    /// The policy these flags give.
    pub fn policy(&self) -> anyhow::Result<ImagePolicy> {
        let default = ImagePolicy::default();
        let policy = ImagePolicy {
            max_pixels: self.max_pixels.unwrap_or(default.max_pixels),
            max_file_bytes: self.max_file_bytes.unwrap_or(default.max_file_bytes),
            strict: self.strict,
        };
        if policy.max_pixels == 0 || policy.max_file_bytes == 0 {
            anyhow::bail!("--max-pixels and --max-file-bytes must be at least 1");
        }
        Ok(policy)
    }

    /// The flags as `images.KEY=VALUE` settings of `dino train`.
    pub fn overrides(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.strict {
            out.push("images.strict=true".into());
        }
        out.extend(self.max_pixels.map(|n| format!("images.max_pixels={n}")));
        out.extend(self.max_file_bytes.map(|n| format!("images.max_file_bytes={n}")));
        out
    }
}

/// Opens `spec` under `policy`, warning about the files left out.
pub fn open(spec: &str, policy: &ImagePolicy) -> anyhow::Result<Dataset> {
    let data = Dataset::open(spec, policy)?;
    warn_skipped(&data.name, data.skipped(), data.len() + data.skipped().len());
    Ok(data)
}

/// How many skipped files a warning lists by name.
const LISTED: usize = 20;

/// A warning on stderr: how many of `total` image files of `what` were skipped, by reason, and
/// which (the first 20).
pub fn warn_skipped(what: &str, skipped: &[BadImage], total: usize) {
    if skipped.is_empty() {
        return;
    }
    eprintln!(
        "warning: {what}: skipped {} of {total} image files ({}); --strict makes this an error:",
        skipped.len(),
        describe_skips(skipped)
    );
    for bad in skipped.iter().take(LISTED) {
        eprintln!("  {bad}");
    }
    if skipped.len() > LISTED {
        eprintln!("  ... and {} more", skipped.len() - LISTED);
    }
}

/// Backbone features of the first `count` images of `data`, with a progress bar named `what`.
pub fn backbone_features(
    backbone: &Backbone,
    data: &Dataset,
    count: usize,
    options: &ExtractOptions,
    device: &Device,
    what: &str,
) -> anyhow::Result<DatasetFeatures> {
    let count = count.min(data.len());
    let bar = bar(count, what);
    let features = dataset_features(backbone, data, count, options, device, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    Ok(features)
}

/// A progress bar over `len` images, named `prefix`.
pub fn bar(len: usize, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} images, {per_sec}, eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}
