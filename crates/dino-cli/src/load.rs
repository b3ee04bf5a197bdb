//! Reading a backbone for inference commands: `--weights` and the flags that describe files
//! which carry no config.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::tensor::Device;
use clap::{Args, ValueEnum};
use dino_model::weights::{CheckpointKey, Weights, describe_ignored};
use dino_model::{Backbone, BackboneConfig, VitConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyArg {
    Teacher,
    Student,
}

/// Where the backbone comes from.
#[derive(Debug, Args)]
pub struct WeightArgs {
    /// Weights: a released backbone .pth, an official checkpoint.pth, or a .safetensors file.
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    #[command(flatten)]
    pub file: WeightFileArgs,
}

impl WeightArgs {
    /// The backbone and its config, checked strictly against the file.
    pub fn load(&self, device: &Device) -> anyhow::Result<(BackboneConfig, Backbone)> {
        self.file.load(&self.weights, device)
    }
}

/// How to read a weights file: for commands where `--weights` itself is optional.
#[derive(Debug, Args)]
pub struct WeightFileArgs {
    /// Which network of a full training checkpoint to use (released weights are teachers).
    #[arg(long, value_enum, default_value = "teacher")]
    pub checkpoint_key: KeyArg,
    /// Architecture (vit_tiny, vit_small, vit_base, resnet18, resnet34, resnet50, or a
    /// resnet*_cifar) for files that carry no config; by default it is inferred from the shapes.
    #[arg(long, value_name = "NAME")]
    pub arch: Option<String>,
    /// Patch size for files that carry no config (default: read off the weights).
    #[arg(long, value_name = "N")]
    pub patch_size: Option<usize>,
    /// Attention heads, for non-standard widths that match no preset.
    #[arg(long, value_name = "N")]
    pub num_heads: Option<usize>,
}

impl WeightFileArgs {
    /// The backbone in `path` and its config, checked strictly against the file.
    pub fn load(&self, path: &Path, device: &Device) -> anyhow::Result<(BackboneConfig, Backbone)> {
        let key = match self.checkpoint_key {
            KeyArg::Teacher => CheckpointKey::Teacher,
            KeyArg::Student => CheckpointKey::Student,
        };
        let weights = Weights::read(path, key)?;
        if !weights.ignored.is_empty() {
            eprintln!("warning: {}: {}", path.display(), describe_ignored(&weights.ignored));
        }
        let preset = match &self.arch {
            Some(arch) => Some(BackboneConfig::preset(arch, 16).with_context(|| {
                format!("unknown --arch '{arch}'; choose one of {}", dino_model::config::arch_names())
            })?),
            None => None,
        };
        let heads = match (&preset, self.num_heads) {
            (Some(BackboneConfig::Vit(preset)), None) => Some(preset.num_heads),
            (_, heads) => heads,
        };
        let config = match weights.backbone_config(heads)? {
            BackboneConfig::Vit(vit) => BackboneConfig::Vit(self.checked_vit(path, vit, weights.config.is_none())?),
            BackboneConfig::ResNet(resnet) => {
                if let Some(preset) = preset.filter(|p| *p != BackboneConfig::ResNet(resnet.clone()))
                    && weights.config.is_none()
                {
                    let found = BackboneConfig::ResNet(resnet).arch_name();
                    bail!("{}: --arch {}, but the weights hold {found}", path.display(), preset.arch_name());
                }
                BackboneConfig::ResNet(resnet)
            }
        };
        if let Err(problem) = config.validate() {
            bail!("{}: {problem}", path.display());
        }
        let backbone = weights.backbone(&config, device)?;
        Ok((config, backbone))
    }

    /// A ViT's config read off a file, checked against `--arch` and `--patch-size` when the file
    /// carries no config of its own; inference runs without drop path.
    fn checked_vit(&self, path: &Path, mut config: VitConfig, inferred: bool) -> anyhow::Result<VitConfig> {
        if inferred {
            if let Some(arch) = &self.arch {
                let Some(preset) = VitConfig::preset(arch, config.patch_size) else {
                    bail!("{}: --arch {arch}, but the weights hold a ViT", path.display());
                };
                if (preset.embed_dim, preset.depth) != (config.embed_dim, config.depth) {
                    bail!(
                        "{}: --arch {arch} has embed dim {} and {} blocks, but the weights have embed dim {} and {} blocks",
                        path.display(),
                        preset.embed_dim,
                        preset.depth,
                        config.embed_dim,
                        config.depth
                    );
                }
            }
            if let Some(p) = self.patch_size
                && p != config.patch_size
            {
                bail!("{}: --patch-size {p}, but the weights have {} px patches", path.display(), config.patch_size);
            }
        }
        config.drop_path_rate = 0.0;
        Ok(config)
    }
}
