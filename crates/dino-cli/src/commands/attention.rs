//! `dino attention`: per-head self-attention maps of the last block, like the official
//! `visualize_attention.py`.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use dino_data::load_rgb;
use dino_eval::attention::{cls_attention, prepare_image, render};

use crate::device::DeviceArg;
use crate::load::WeightArgs;

#[derive(Debug, Args)]
pub struct AttentionArgs {
    #[command(flatten)]
    weights: WeightArgs,
    /// The image to look at.
    #[arg(long, value_name = "FILE")]
    image: PathBuf,
    /// Output directory (created if needed).
    #[arg(long, short, value_name = "DIR")]
    output: PathBuf,
    /// Resize to H x W px first (bilinear); the image is then cropped to whole patches.
    #[arg(long, num_args = 2, value_names = ["H", "W"], default_values_t = [480, 480])]
    image_size: Vec<u32>,
    /// Also draw masks keeping this fraction of each head's attention mass (e.g. 0.6).
    #[arg(long, value_name = "FRACTION")]
    threshold: Option<f32>,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

pub fn run(args: AttentionArgs) -> anyhow::Result<()> {
    if let Some(t) = args.threshold
        && !(t > 0.0 && t <= 1.0)
    {
        bail!("--threshold must be in (0, 1], got {t}");
    }
    let (height, width) = (args.image_size[0], args.image_size[1]);
    let device = args.device.device()?;
    let (config, backbone) = args.weights.load(&device)?;
    let (Some(config), Some(vit)) = (config.vit(), backbone.as_vit()) else {
        bail!(
            "{} holds {}: attention maps need a ViT (its CLS token's self-attention); a ResNet has none",
            args.weights.weights.display(),
            config.arch_name()
        );
    };
    let p = config.patch_size as u32;
    if height < p || width < p {
        bail!("--image-size {height} {width} is smaller than one {p} px patch");
    }
    let img = prepare_image(&load_rgb(&args.image, &Default::default())?, width, height, config.patch_size);
    let maps = cls_attention(vit, &img, &device);
    let rendered = render(&img, &maps, config.patch_size, args.threshold, &args.output)?;
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
