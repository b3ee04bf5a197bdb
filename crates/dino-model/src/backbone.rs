//! The backbone of a DINO network: a Vision Transformer or a ResNet.

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use crate::config::BackboneConfig;
use crate::resnet::ResNet;
use crate::vit::VisionTransformer;

/// Either backbone; its state_dict keys are the network's own (`cls_token`, `blocks.0...` or
/// `conv1.weight`, `layer1.0...`), with no variant name in between.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Backbone {
    Vit(VisionTransformer),
    ResNet(ResNet),
}

impl Backbone {
    /// A randomly initialised backbone with its official init.
    pub fn new(config: &BackboneConfig, device: &Device) -> Self {
        match config {
            BackboneConfig::Vit(c) => Self::Vit(VisionTransformer::new(c, device)),
            BackboneConfig::ResNet(c) => Self::ResNet(ResNet::new(c, device)),
        }
    }

    /// Images `[B, 3, H, W]` -> the DINO feature `[B, D]`: the final-normed CLS token of a ViT,
    /// the average-pooled last feature map of a ResNet.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Self::Vit(vit) => vit.forward(images),
            Self::ResNet(resnet) => resnet.forward(images),
        }
    }

    /// The same network with stochastic depth `rate` in a ViT's blocks (a ResNet has none, as
    /// torchvision's).
    pub fn with_drop_path(self, rate: f64) -> Self {
        match self {
            Self::Vit(vit) => Self::Vit(vit.with_drop_path(rate)),
            resnet => resnet,
        }
    }

    /// Width D of the feature.
    pub fn embed_dim(&self) -> usize {
        match self {
            Self::Vit(vit) => vit.embed_dim(),
            Self::ResNet(resnet) => resnet.embed_dim(),
        }
    }

    /// Inputs are cropped to a multiple of this side: a ViT's patch (the official transforms
    /// leave the rest to the strided convolution, which ignores it), 1 for a ResNet.
    pub fn input_multiple(&self) -> usize {
        match self {
            Self::Vit(vit) => vit.patch_size(),
            Self::ResNet(_) => 1,
        }
    }

    /// The ViT, for what only a ViT has (patch tokens, attention, intermediate CLS tokens).
    pub fn as_vit(&self) -> Option<&VisionTransformer> {
        match self {
            Self::Vit(vit) => Some(vit),
            Self::ResNet(_) => None,
        }
    }
}
