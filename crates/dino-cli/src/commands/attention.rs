//! `dino attention`: per-head self-attention maps of the last block, like the official
//! `visualize_attention.py`, for one image or, like `video_generation.py`, for every frame of a
//! clip.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use dino_data::{ImagePolicy, describe_skips, load_rgb, open_frames};
use dino_eval::attention::{ClipWriter, cls_attention, prepare_image, render};
use dino_model::{VisionTransformer, VitConfig};

use crate::device::ComputeArgs;
use crate::images::bar;
use crate::load::WeightArgs;

/// The official `video_generation.py --threshold` default.
const CLIP_THRESHOLD: f32 = 0.6;

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["image", "frames"])))]
pub struct AttentionArgs {
    #[command(flatten)]
    weights: WeightArgs,
    /// The image to look at.
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// A clip: a folder of frame images (in name order) or an animated GIF, WebP or PNG. Writes
    /// each frame's maps and attention.gif.
    #[arg(long, value_name = "DIR|FILE")]
    frames: Option<PathBuf>,
    /// Output directory (created if needed).
    #[arg(long, short, value_name = "DIR")]
    output: PathBuf,
    /// Resize to H x W px first (bilinear), then crop to whole patches. Default: 480 x 480 for
    /// --image (the official default), each frame's own size for --frames (as
    /// video_generation.py without --resize).
    #[arg(long, num_args = 2, value_names = ["H", "W"])]
    image_size: Option<Vec<u32>>,
    /// Masks keep this fraction of each head's attention mass. With --image they are drawn
    /// only when given; with --frames the default is 0.6 (video_generation.py).
    #[arg(long, value_name = "FRACTION")]
    threshold: Option<f32>,
    /// Frames per second of attention.gif, for a folder of frames or to override an
    /// animation's own pace. Default: the animation's pace, or 30 (video_generation.py).
    #[arg(long)]
    fps: Option<f32>,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(args: AttentionArgs) -> anyhow::Result<()> {
    if let Some(t) = args.threshold
        && !(t > 0.0 && t <= 1.0)
    {
        bail!("--threshold must be in (0, 1], got {t}");
    }
    if let Some(fps) = args.fps
        && !(fps > 0.0 && fps <= 100.0)
    {
        bail!("--fps must be in (0, 100] (a GIF counts time in 10 ms steps), got {fps}");
    }
    let (device, _packed) = args.compute.inference_device()?;
    let (config, backbone) = args.weights.load(&device)?;
    let (Some(config), Some(vit)) = (config.vit(), backbone.as_vit()) else {
        bail!(
            "{} holds {}: attention maps need a ViT (its CLS token's self-attention); a ResNet has none",
            args.weights.weights.display(),
            config.arch_name()
        );
    };
    match (&args.image, &args.frames) {
        (Some(image), _) => one_image(&args, image, config, vit, &device),
        (None, Some(frames)) => clip(&args, frames, config, vit, &device),
        (None, None) => unreachable!("clap requires --image or --frames"),
    }
}

/// The size to resize to, checked against the patch size; `None` keeps the image's own.
fn image_size(args: &AttentionArgs, patch: usize, default: Option<(u32, u32)>) -> anyhow::Result<Option<(u32, u32)>> {
    let size = args.image_size.as_ref().map(|s| (s[0], s[1])).or(default);
    if let Some((height, width)) = size
        && (height < patch as u32 || width < patch as u32)
    {
        bail!("--image-size {height} {width} is smaller than one {patch} px patch");
    }
    Ok(size)
}

fn one_image(
    args: &AttentionArgs,
    path: &std::path::Path,
    config: &VitConfig,
    vit: &VisionTransformer,
    device: &burn::tensor::Device,
) -> anyhow::Result<()> {
    let patch = config.patch_size;
    let (height, width) = image_size(args, patch, Some((480, 480)))?.expect("a default size");
    let img = prepare_image(&load_rgb(path, &Default::default())?, width, height, patch);
    let maps = cls_attention(vit, &img, device);
    let rendered = render(&img, &maps, patch, args.threshold, &args.output)?;
    println!(
        "{} heads on a {}x{} patch grid: wrote {} files to {} (overview: {})",
        maps.heads,
        maps.grid_h,
        maps.grid_w,
        rendered.files.len(),
        args.output.display(),
        args.output.join("attention.png").display()
    );
    Ok(())
}

fn clip(
    args: &AttentionArgs,
    path: &std::path::Path,
    config: &VitConfig,
    vit: &VisionTransformer,
    device: &burn::tensor::Device,
) -> anyhow::Result<()> {
    let patch = config.patch_size;
    let size = image_size(args, patch, None)?;
    let frames = open_frames(path, &ImagePolicy::default())?;
    if !frames.skipped.is_empty() {
        eprintln!("skipped while listing {}: {}", path.display(), describe_skips(&frames.skipped));
    }
    let progress = match frames.len {
        Some(len) => bar(len, "frames"),
        None => indicatif::ProgressBar::new_spinner().with_message("frames"),
    };
    let threshold = args.threshold.unwrap_or(CLIP_THRESHOLD);
    let mut writer = ClipWriter::create(&args.output, patch, threshold)?;
    let mut skipped = Vec::new();
    // Every frame takes the first one's size unless --image-size says otherwise: one GIF canvas.
    let mut first_size = size;
    for frame in frames {
        let frame = match frame {
            Ok(frame) => frame,
            Err(bad) => {
                progress.println(format!("skipped: {bad}"));
                skipped.push(bad);
                continue;
            }
        };
        let (height, width) = *first_size.get_or_insert((frame.image.height(), frame.image.width()));
        if height < patch as u32 || width < patch as u32 {
            bail!("{}: frames of {width}x{height} px are smaller than one {patch} px patch", path.display());
        }
        let img = prepare_image(&frame.image, width, height, patch);
        let maps = cls_attention(vit, &img, device);
        let delay_ms = args.fps.map_or(frame.delay_ms, |fps| (1000.0 / fps).round() as u32);
        writer.add(&frame.name, &img, &maps, delay_ms)?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    let (count, files) = writer.finish()?;
    if count == 0 {
        bail!("{}: no frame could be decoded ({})", path.display(), describe_skips(&skipped));
    }
    let (height, width) = first_size.context("at least one frame")?;
    println!(
        "{count} frames of {}x{} px{}: wrote {} files to {} (animation: {})",
        width - width % patch as u32,
        height - height % patch as u32,
        if skipped.is_empty() { String::new() } else { format!(", {} skipped", skipped.len()) },
        files.len(),
        args.output.display(),
        args.output.join("attention.gif").display()
    );
    Ok(())
}
