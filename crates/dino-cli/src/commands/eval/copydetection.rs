//! `dino eval copydetection`: the Copydays protocol of the official `eval_copy_detection.py`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::tensor::{Device, Tensor, TensorData};
use clap::Args;
use dino_data::{
    BadImage, Filter, IMAGENET_MEAN, IMAGENET_STD, ImagePolicy, list_images, load_rgb, resize_exact, to_chw,
};
use dino_eval::copydetection::{CopyBlocks, TOP_K, Whitening, cls_gem_features, l2_normalize, score_blocks};
use dino_eval::retrieval::rank_rows;
use dino_model::VisionTransformer;
use rayon::prelude::*;

use crate::device::ComputeArgs;
use crate::images::{ImageArgs, bar, warn_skipped};
use crate::load::WeightArgs;

#[derive(Debug, Args)]
pub struct CopyDetectionArgs {
    #[command(flatten)]
    weights: WeightArgs,
    /// Copydays as distributed: original/ (the database) and folders of edited copies (strong/,
    /// jpegqual/N/, crops/N/); every folder, original/ included, is a block of queries.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Images added to the database as distractors (the paper: 10k from YFCC100M).
    #[arg(long, value_name = "DIR")]
    distractors: Option<PathBuf>,
    /// Images to learn the PCA whitening on (the paper: 20k from YFCC100M); none: no whitening.
    #[arg(long, value_name = "DIR")]
    whitening: Option<PathBuf>,
    /// Every image is resized to N x N px (bicubic). Official 320.
    #[arg(long, default_value_t = 320, value_name = "N")]
    imsize: u32,
    /// Images per forward pass (official 16 per GPU).
    #[arg(long, default_value_t = 16, value_name = "N")]
    batch_size: usize,
    /// Also write each block's mAP as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    #[command(flatten)]
    images: ImageArgs,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// CLS + GeM features of the images of `paths` that can be used, one row each, in order, and
/// those that cannot.
fn features(
    vit: &VisionTransformer,
    paths: &[PathBuf],
    args: &CopyDetectionArgs,
    policy: &ImagePolicy,
    what: &str,
    device: &Device,
) -> anyhow::Result<(Vec<f32>, Vec<BadImage>)> {
    let size = args.imsize as usize;
    let progress = bar(paths.len(), what);
    let (mut rows, mut skipped) = (Vec::new(), Vec::new());
    for chunk in paths.chunks(args.batch_size.max(1)) {
        let loaded: Vec<_> = chunk
            .par_iter()
            .map(|p| {
                load_rgb(p, policy).map(|img| {
                    to_chw(&resize_exact(&img, args.imsize, args.imsize, Filter::Bicubic), IMAGENET_MEAN, IMAGENET_STD)
                })
            })
            .collect();
        let mut pixels = Vec::new();
        for image in loaded {
            match image {
                Ok(chw) => pixels.extend(chw),
                Err(bad) => skipped.push(bad),
            }
        }
        let n = pixels.len() / (3 * size * size);
        if n > 0 {
            let batch = Tensor::<4>::from_data(TensorData::new(pixels, [n, 3, size, size]), device);
            rows.extend(cls_gem_features(vit, batch).into_data().iter::<f32>());
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    Ok((rows, skipped))
}

/// The features of the protocol's own images, every one of which must be usable.
fn every_feature(
    vit: &VisionTransformer,
    paths: &[PathBuf],
    args: &CopyDetectionArgs,
    policy: &ImagePolicy,
    what: &str,
    device: &Device,
) -> anyhow::Result<Vec<f32>> {
    let (rows, skipped) = features(vit, paths, args, policy, what, device)?;
    if let Some(bad) = skipped.first() {
        bail!("{bad}; copy detection needs every image of {what}");
    }
    Ok(rows)
}

/// The features of the usable images under `dir` (distractors, whitening set); the others are
/// skipped with a warning.
fn usable_features(
    vit: &VisionTransformer,
    dir: &Path,
    args: &CopyDetectionArgs,
    policy: &ImagePolicy,
    what: &str,
    device: &Device,
) -> anyhow::Result<Vec<f32>> {
    let listing = list_images(dir)?;
    let total = listing.paths.len() + listing.skipped.len();
    let (rows, skipped) = features(vit, &listing.paths, args, policy, what, device)?;
    let skipped: Vec<BadImage> = listing.skipped.into_iter().chain(skipped).collect();
    warn_skipped(what, &skipped, total);
    Ok(rows)
}

pub fn run(args: CopyDetectionArgs) -> anyhow::Result<()> {
    let blocks = CopyBlocks::list(&args.data)
        .with_context(|| format!("cannot list --data {}", args.data.display()))?
        .with_context(|| {
        format!(
            "{}: no original/ folder of images; copy detection reads the Copydays layout (original/, strong/, \
                 jpegqual/N/, crops/N/)",
            args.data.display()
        )
    })?;
    if blocks.blocks.len() < 2 {
        bail!(
            "{}: only original/ holds images; add folders of edited copies (strong/, crops/N/…)",
            args.data.display()
        );
    }
    if args.imsize == 0 {
        bail!("--imsize must be at least one patch");
    }
    let policy = args.images.policy()?;
    let (device, _packed) = args.compute.inference_device()?;
    let (config, backbone) = args.weights.load(&device)?;
    let Some(vit) = backbone.as_vit() else {
        bail!(
            "{} holds {}: copy detection pools a ViT's patch tokens (GeM); use a ViT",
            args.weights.weights.display(),
            config.arch_name()
        );
    };
    let patch = config.vit().expect("a ViT").patch_size;
    if (args.imsize as usize) < patch {
        bail!("--imsize {} is smaller than one {patch} px patch", args.imsize);
    }

    for (name, files) in &blocks.blocks {
        if files.iter().all(|q| blocks.positives(name, q).is_empty()) {
            eprintln!(
                "warning: {}/{name}: no image here has an original to find (matched by name, or in strong/ by \
                 its first four characters), so the block scores 0; distractor or whitening images belong \
                 outside --data",
                args.data.display()
            );
        }
    }
    let query_paths: Vec<PathBuf> = blocks.blocks.iter().flat_map(|(_, files)| files.clone()).collect();
    let mut queries = every_feature(vit, &query_paths, &args, &policy, "queries", &device)?;
    let mut database = every_feature(vit, &blocks.originals, &args, &policy, "original", &device)?;
    let dim = database.len() / blocks.originals.len();
    if let Some(dir) = &args.distractors {
        database.extend(usable_features(vit, dir, &args, &policy, "distractors", &device)?);
    }
    if let Some(dir) = &args.whitening {
        let rows = usable_features(vit, dir, &args, &policy, "whitening set", &device)?;
        if rows.len() / dim < 2 {
            bail!("{}: the whitening needs at least 2 usable images", dir.display());
        }
        let whitening = Whitening::learn(&rows, dim);
        database = whitening.apply(&database);
        queries = whitening.apply(&queries);
    }
    l2_normalize(&mut database, dim);
    l2_normalize(&mut queries, dim);
    let retrieved = rank_rows(&database, &queries, dim, TOP_K);
    let scores = score_blocks(&blocks, &retrieved);
    println!(
        "{} originals, {} distractors, {} queries in {} blocks; features {dim}-d{}",
        blocks.originals.len(),
        database.len() / dim - blocks.originals.len(),
        query_paths.len(),
        scores.len(),
        if args.whitening.is_some() { ", whitened" } else { "" }
    );
    for score in &scores {
        println!("eval on {} mAP={:.3}", score.name, score.map);
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "weights": args.weights.weights,
            "imsize": args.imsize,
            "whitened": args.whitening.is_some(),
            "distractors": database.len() / dim - blocks.originals.len(),
            "blocks": scores.iter().map(|s| serde_json::json!({"name": s.name, "queries": s.queries, "map": s.map})).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
