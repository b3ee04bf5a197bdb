//! Model configurations, with the official presets.
//!
//! Defaults follow `vision_transformer.py` (facebookresearch/dino, commit 7c446df): ViT presets
//! use `qkv_bias=True`, `mlp_ratio=4`, LayerNorm `eps=1e-6` and 12 blocks; `DINOHead` defaults to
//! 3 layers, hidden 2048, bottleneck 256, no BatchNorm, `norm_last_layer=True`.

use burn::config::Config;

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

/// What a weights file of ours says about the network it holds (stored as JSON metadata).
#[derive(Config, Debug, PartialEq)]
pub struct ModelConfig {
    /// The backbone.
    pub vit: VitConfig,
    /// The projection head, when the file holds one.
    pub head: Option<DinoHeadConfig>,
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
    fn validation_names_the_problem() {
        let bad = VitConfig::new(100, 2, 3);
        assert!(bad.validate().unwrap_err().contains("divisible"));
        assert!(DinoHeadConfig::new(8, 8).with_nlayers(0).validate().is_err());
    }
}
