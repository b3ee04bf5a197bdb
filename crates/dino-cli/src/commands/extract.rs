//! `dino extract`: one feature vector per image.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use dino_data::{Dataset, EvalTransform, Listing, list_images, read_image_list};
use dino_eval::{ExtractOptions, FeatureSpec, write_features};

use crate::device::ComputeArgs;
use crate::images::{self, ImageArgs, warn_skipped};
use crate::load::WeightArgs;

#[derive(Debug, Args)]
pub struct ExtractArgs {
    #[command(flatten)]
    weights: WeightArgs,
    /// An image file (repeatable).
    #[arg(long, value_name = "FILE")]
    image: Vec<PathBuf>,
    /// A directory of images, searched recursively (repeatable).
    #[arg(long, value_name = "DIR")]
    data: Vec<PathBuf>,
    /// A text file with one image path per line, relative to the file (repeatable).
    #[arg(long, value_name = "FILE")]
    list: Vec<PathBuf>,
    /// Output: FILE.safetensors (tensor `features`) or FILE.npy; image paths go to FILE.txt.
    #[arg(long, short, value_name = "FILE")]
    output: PathBuf,
    /// Resize the shorter side to N px (bicubic) first; 0 keeps the size.
    #[arg(long, default_value_t = 256, value_name = "N")]
    resize: u32,
    /// Then center-crop N x N px; 0 keeps the whole image.
    #[arg(long, default_value_t = 224, value_name = "N")]
    crop: u32,
    /// L2-normalise each feature vector.
    #[arg(long)]
    l2_norm: bool,
    /// Concatenate the CLS tokens of the last N blocks (eval_linear.py's --n_last_blocks).
    #[arg(long, default_value_t = 1, value_name = "N")]
    n_last_blocks: usize,
    /// Also append the average of the last block's patch tokens.
    #[arg(long)]
    avgpool: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32, value_name = "N")]
    batch_size: usize,
    #[command(flatten)]
    images: ImageArgs,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(args: ExtractArgs) -> anyhow::Result<()> {
    let mut inputs = Listing { paths: args.image.clone(), skipped: Vec::new() };
    for dir in &args.data {
        let listing = list_images(dir)?;
        inputs.paths.extend(listing.paths);
        inputs.skipped.extend(listing.skipped);
    }
    for list in &args.list {
        inputs.paths.extend(read_image_list(list)?);
    }
    if inputs.paths.is_empty() {
        bail!("no input images: give --image FILE, --data DIR or --list FILE");
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let policy = args.images.policy()?;
    let (device, _packed) = args.compute.inference_device()?;
    let (config, backbone) = args.weights.load(&device)?;
    let total = inputs.paths.len() + inputs.skipped.len();
    let data = Dataset::from_files("the input images", inputs, &policy)?;
    let mut skipped = data.skipped().to_vec();
    let features = FeatureSpec::new(args.n_last_blocks, args.avgpool, &config)
        .map_err(|e| anyhow::anyhow!("--n-last-blocks: {e}"))?;
    let options = ExtractOptions {
        transform: EvalTransform {
            resize: (args.resize > 0).then_some(args.resize),
            crop: (args.crop > 0).then_some(args.crop),
        },
        features,
        l2_norm: args.l2_norm,
        batch_size: args.batch_size,
    };
    let extracted = images::backbone_features(&backbone, &data, data.len(), &options, &device, "extracting")?;
    skipped.extend(extracted.skipped.iter().cloned());
    warn_skipped("extract", &skipped, total);
    let (features, paths) = (&extracted.features, extracted.paths(&data));
    if let Some(parent) = args.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let list = write_features(features, &paths, &args.output)?;
    let skipped_list = args.output.with_extension("skipped.txt");
    if !skipped.is_empty() {
        let text: String = skipped.iter().map(|b| format!("{b}\n")).collect();
        std::fs::write(&skipped_list, text).with_context(|| format!("cannot write {}", skipped_list.display()))?;
        println!("{} skipped image files (no rows) are listed in {}", skipped.len(), skipped_list.display());
    } else if skipped_list.is_file() {
        // From an earlier run into the same FILE: it would describe other rows.
        std::fs::remove_file(&skipped_list).with_context(|| format!("cannot remove {}", skipped_list.display()))?;
    }
    println!(
        "wrote features [{}, {}] ({}, width {}) to {} and the image paths to {}",
        features.rows,
        features.dim,
        config.arch_name(),
        config.embed_dim(),
        args.output.display(),
        list.display()
    );
    Ok(())
}
