//! A backbone with a linear classification head: the network `dino finetune` trains.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor};

use crate::backbone::Backbone;

/// timm's `VisionTransformer(num_classes=C)` layout: the backbone's own keys, then
/// `head.weight` `[C, D]` and `head.bias` `[C]` on its feature (a ViT's final-normed CLS token,
/// a ResNet's pooled map, where torchvision calls the layer `fc`).
#[derive(Module, Debug)]
pub struct Classifier {
    pub backbone: Backbone,
    pub head: Linear,
}

impl Classifier {
    /// `backbone` with a new head for `classes` classes, initialised as timm's (trunc_normal
    /// 0.02 weight, zero bias).
    pub fn new(backbone: Backbone, classes: usize, device: &Device) -> Self {
        let head = crate::init::linear(backbone.embed_dim(), classes, true, device);
        Self { backbone, head }
    }

    /// Images `[B, 3, H, W]` -> logits `[B, classes]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.head.forward(self.backbone.forward(images))
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.head.weight.dims()[1]
    }
}
