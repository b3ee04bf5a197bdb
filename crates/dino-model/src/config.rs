//! Model configurations, with the official presets.
//!
//! Defaults follow `vision_transformer.py` (facebookresearch/dino, commit 7c446df): ViT presets
//! use `qkv_bias=True`, `mlp_ratio=4`, LayerNorm `eps=1e-6` and 12 blocks; `DINOHead` defaults to
//! 3 layers, hidden 2048, bottleneck 256, no BatchNorm, `norm_last_layer=True`. ResNet presets
//! are torchvision's (`resnet18`, `resnet34`, `resnet50`), and the `_cifar` variants have the
//! small-image stem of lightly and solo-learn (3x3 `conv1`, stride 1, no max-pool).

use burn::config::Config;
use serde::{Deserialize, Serialize};

/// A Vision Transformer backbone: the architecture, not the weights.
#[derive(Config, Debug, PartialEq)]
pub struct VitConfig {
    /// Token width D (192 tiny, 384 small, 768 base).
    pub embed_dim: usize,
    /// Number of transformer blocks (12 for every official preset).
    pub depth: usize,
    /// Attention heads; `embed_dim` must be divisible by it.
    pub num_heads: usize,
    /// Side of the square patches (16, 8, 5, ...), also the patch-embedding stride.
    #[config(default = 16)]
    pub patch_size: usize,
    /// Training resolution: the position embedding holds (img_size / patch_size)^2 patch slots.
    /// Official default 224.
    #[config(default = 224)]
    pub img_size: usize,
    /// Hidden width of each MLP as a multiple of `embed_dim` (official 4).
    #[config(default = 4.0)]
    pub mlp_ratio: f64,
    /// Bias in the fused qkv projection (official presets: true).
    #[config(default = true)]
    pub qkv_bias: bool,
    /// Stochastic depth at the last block, linear from 0 at the first (student only; official 0.1
    /// in `main_dino.py`, 0 in the model constructor).
    #[config(default = 0.0)]
    pub drop_path_rate: f64,
    /// LayerNorm epsilon (official presets: 1e-6).
    #[config(default = 1e-6)]
    pub layer_norm_eps: f64,
}

/// The named ViT presets of the paper.
pub const VIT_ARCHS: [&str; 3] = ["vit_tiny", "vit_small", "vit_base"];

impl VitConfig {
    /// The official preset `name` (`vit_tiny`, `vit_small`, `vit_base`, or the `deit_*` aliases)
    /// with the given patch size, or `None` for an unknown name.
    pub fn preset(name: &str, patch_size: usize) -> Option<Self> {
        let (dim, heads) = match name.replace("deit", "vit").as_str() {
            "vit_tiny" => (192, 3),
            "vit_small" => (384, 6),
            "vit_base" => (768, 12),
            _ => return None,
        };
        Some(Self::new(dim, 12, heads).with_patch_size(patch_size))
    }

    /// The preset name whose widths match this config, if any (for messages and file metadata).
    pub fn arch_name(&self) -> Option<&'static str> {
        VIT_ARCHS.into_iter().find(|name| {
            Self::preset(name, self.patch_size).is_some_and(|p| {
                p.embed_dim == self.embed_dim && p.depth == self.depth && p.num_heads == self.num_heads
            })
        })
    }

    /// Side of the patch grid the position embedding was trained for.
    pub fn grid_size(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Width of each MLP's hidden layer.
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Checks the invariants the network relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.embed_dim == 0 || self.depth == 0 || self.num_heads == 0 || self.patch_size == 0 {
            return Err("embed_dim, depth, num_heads and patch_size must all be positive".into());
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            return Err(format!("embed_dim {} is not divisible by num_heads {}", self.embed_dim, self.num_heads));
        }
        if self.img_size < self.patch_size {
            return Err(format!("img_size {} is smaller than one patch ({} px)", self.img_size, self.patch_size));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return Err(format!("drop_path_rate {} is outside [0, 1)", self.drop_path_rate));
        }
        Ok(())
    }
}

/// The DINO projection head.
#[derive(Config, Debug, PartialEq)]
pub struct DinoHeadConfig {
    /// Input width: the backbone's embed dim.
    pub in_dim: usize,
    /// K, the number of prototypes (official `--out_dim` 65536).
    pub out_dim: usize,
    /// BatchNorm after each hidden Linear (official `--use_bn_in_head` false).
    #[config(default = false)]
    pub use_bn: bool,
    /// Fix the weight-norm magnitude `g` at 1 (official `--norm_last_layer` true).
    #[config(default = true)]
    pub norm_last_layer: bool,
    /// Linear layers in the MLP, counting the bottleneck one (official 3).
    #[config(default = 3)]
    pub nlayers: usize,
    /// Width of the hidden layers (official 2048).
    #[config(default = 2048)]
    pub hidden_dim: usize,
    /// Width of the bottleneck before L2 normalisation (official 256).
    #[config(default = 256)]
    pub bottleneck_dim: usize,
}

impl DinoHeadConfig {
    /// Checks the invariants the head relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.nlayers == 0 {
            return Err("the head needs at least one layer (nlayers >= 1)".into());
        }
        if self.in_dim == 0 || self.out_dim == 0 || self.hidden_dim == 0 || self.bottleneck_dim == 0 {
            return Err("head widths must all be positive".into());
        }
        Ok(())
    }
}

/// torchvision's residual block types.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convolutions (resnet18, resnet34).
    Basic,
    /// 1x1, 3x3, 1x1 with 4x wider output (resnet50 and up).
    Bottleneck,
}

impl BlockKind {
    /// Output width over the block's `planes`.
    pub fn expansion(self) -> usize {
        match self {
            Self::Basic => 1,
            Self::Bottleneck => 4,
        }
    }
}

/// The layers before the first stage.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stem {
    /// torchvision's: 7x7 stride-2 `conv1`, then a 3x3 stride-2 max-pool (224 px images).
    ImageNet,
    /// For 32 px images: 3x3 stride-1 `conv1`, no max-pool.
    Cifar,
}

/// A ResNet backbone: the architecture, not the weights.
#[derive(Config, Debug, PartialEq)]
pub struct ResNetConfig {
    /// Blocks in each of the four stages ([2, 2, 2, 2] resnet18, [3, 4, 6, 3] resnet34/50).
    pub layers: [usize; 4],
    pub block: BlockKind,
    #[config(default = "Stem::ImageNet")]
    pub stem: Stem,
    /// Channels of the stem and of the first stage's blocks, doubled at each stage (torchvision
    /// 64; smaller only for tests).
    #[config(default = 64)]
    pub width: usize,
}

/// The named ResNet presets.
pub const RESNET_ARCHS: [&str; 6] =
    ["resnet18", "resnet34", "resnet50", "resnet18_cifar", "resnet34_cifar", "resnet50_cifar"];

impl ResNetConfig {
    /// torchvision's `name` (`resnet18`, `resnet34`, `resnet50`), or its `_cifar` variant, or
    /// `None` for an unknown name.
    pub fn preset(name: &str) -> Option<Self> {
        let (base, stem) = match name.strip_suffix("_cifar") {
            Some(base) => (base, Stem::Cifar),
            None => (name, Stem::ImageNet),
        };
        let config = match base {
            "resnet18" => Self::new([2, 2, 2, 2], BlockKind::Basic),
            "resnet34" => Self::new([3, 4, 6, 3], BlockKind::Basic),
            "resnet50" => Self::new([3, 4, 6, 3], BlockKind::Bottleneck),
            _ => return None,
        };
        Some(config.with_stem(stem))
    }

    /// The preset name this config is, if any.
    pub fn arch_name(&self) -> Option<&'static str> {
        RESNET_ARCHS.into_iter().find(|name| Self::preset(name).as_ref() == Some(self))
    }

    /// Width of the pooled feature.
    pub fn embed_dim(&self) -> usize {
        self.width * 8 * self.block.expansion()
    }

    /// Checks the invariants the network relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.width == 0 || self.layers.contains(&0) {
            return Err(format!("a ResNet needs a positive width and a block in every stage, not {self:?}"));
        }
        Ok(())
    }
}

/// The backbone of a DINO network.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum BackboneConfig {
    Vit(VitConfig),
    ResNet(ResNetConfig),
}

impl BackboneConfig {
    /// The backbone for an `--arch` name: a ViT preset with `patch_size`, or a ResNet preset.
    pub fn preset(arch: &str, patch_size: usize) -> Option<Self> {
        VitConfig::preset(arch, patch_size).map(Self::Vit).or_else(|| ResNetConfig::preset(arch).map(Self::ResNet))
    }

    /// Width of the feature the head reads.
    pub fn embed_dim(&self) -> usize {
        match self {
            Self::Vit(c) => c.embed_dim,
            Self::ResNet(c) => c.embed_dim(),
        }
    }

    /// The image side the network is made for: a ViT's position-embedding resolution, 224 px for
    /// a ResNet with the ImageNet stem, 32 px with the CIFAR one.
    pub fn img_size(&self) -> usize {
        match self {
            Self::Vit(c) => c.img_size,
            Self::ResNet(c) if c.stem == Stem::Cifar => 32,
            Self::ResNet(_) => 224,
        }
    }

    /// `vit_small/16`, `resnet50`, or a description of a custom network.
    pub fn arch_name(&self) -> String {
        match self {
            Self::Vit(c) => {
                c.arch_name().map_or(format!("a custom ViT/{}", c.patch_size), |a| format!("{a}/{}", c.patch_size))
            }
            Self::ResNet(c) => c.arch_name().map_or_else(|| format!("a custom ResNet {c:?}"), String::from),
        }
    }

    /// The ViT's config, for the tools that need patch tokens or attention.
    pub fn vit(&self) -> Option<&VitConfig> {
        match self {
            Self::Vit(c) => Some(c),
            Self::ResNet(_) => None,
        }
    }

    /// Checks the invariants the network relies on.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Vit(c) => c.validate(),
            Self::ResNet(c) => c.validate(),
        }
    }
}

/// Every `--arch` name.
pub fn arch_names() -> String {
    VIT_ARCHS.iter().chain(&RESNET_ARCHS).copied().collect::<Vec<_>>().join(", ")
}

/// What a weights file of ours says about the network it holds (stored as JSON metadata).
#[derive(Config, Debug, PartialEq)]
pub struct ModelConfig {
    /// The backbone.
    pub backbone: BackboneConfig,
    /// The projection head, when the file holds one.
    pub head: Option<DinoHeadConfig>,
}

impl ModelConfig {
    /// Reads the JSON of a file's header, also in the layout written before ResNets
    /// (`{"vit": {...}, "head": ...}`).
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct ViTOnly {
            vit: VitConfig,
            head: Option<DinoHeadConfig>,
        }
        serde_json::from_str(json).or_else(|e| {
            serde_json::from_str::<ViTOnly>(json)
                .map(|old| Self::new(BackboneConfig::Vit(old.vit)).with_head(old.head))
                .map_err(|_| e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_paper() {
        let s = VitConfig::preset("vit_small", 8).unwrap();
        assert_eq!((s.embed_dim, s.depth, s.num_heads, s.patch_size), (384, 12, 6, 8));
        assert_eq!(VitConfig::preset("deit_tiny", 16).unwrap().embed_dim, 192);
        assert_eq!(VitConfig::preset("vit_base", 16).unwrap().num_heads, 12);
        assert!(VitConfig::preset("vit_huge", 16).is_none());
        assert_eq!(s.arch_name(), Some("vit_small"));
        assert_eq!(s.grid_size(), 28);
    }

    #[test]
    fn resnet_presets_are_torchvision_s() {
        let r50 = ResNetConfig::preset("resnet50").unwrap();
        assert_eq!(
            (r50.layers, r50.block, r50.stem, r50.embed_dim()),
            ([3, 4, 6, 3], BlockKind::Bottleneck, Stem::ImageNet, 2048)
        );
        let r18 = ResNetConfig::preset("resnet18_cifar").unwrap();
        assert_eq!((r18.stem, r18.embed_dim(), r18.arch_name()), (Stem::Cifar, 512, Some("resnet18_cifar")));
        assert_eq!(BackboneConfig::preset("resnet34", 16).unwrap().arch_name(), "resnet34");
        assert_eq!(BackboneConfig::preset("vit_tiny", 8).unwrap().arch_name(), "vit_tiny/8");
        assert!(ResNetConfig::preset("resnet101").is_none());
    }

    #[test]
    fn configs_written_before_resnets_still_read() {
        let vit = VitConfig::preset("vit_tiny", 16).unwrap();
        let old = format!(r#"{{"vit":{},"head":null}}"#, serde_json::to_string(&vit).unwrap());
        assert_eq!(ModelConfig::from_json(&old).unwrap(), ModelConfig::new(BackboneConfig::Vit(vit.clone())));
        let new = ModelConfig::new(BackboneConfig::ResNet(ResNetConfig::preset("resnet18").unwrap()));
        assert_eq!(ModelConfig::from_json(&serde_json::to_string(&new).unwrap()).unwrap(), new);
    }

    #[test]
    fn validation_names_the_problem() {
        let bad = VitConfig::new(100, 2, 3);
        assert!(bad.validate().unwrap_err().contains("divisible"));
        assert!(DinoHeadConfig::new(8, 8).with_nlayers(0).validate().is_err());
    }
}
