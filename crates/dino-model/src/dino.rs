//! Backbone + head, run on multi-crop batches (the official `MultiCropWrapper`).

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use crate::backbone::Backbone;
use crate::config::ModelConfig;
use crate::head::DinoHead;

/// The network trained by DINO: a backbone followed by the projection head.
/// Checkpoint keys are `backbone.*` and `head.*`, as in the official wrapper.
#[derive(Module, Debug)]
pub struct DinoModel {
    pub backbone: Backbone,
    pub head: DinoHead,
}

impl DinoModel {
    /// A randomly initialised model. Panics if `config.head` is `None`.
    pub fn new(config: &ModelConfig, device: &Device) -> Self {
        let head = config.head.as_ref().expect("a DinoModel needs a head config");
        Self { backbone: Backbone::new(&config.backbone, device), head: DinoHead::new(head, device) }
    }

    /// Crops in order (e.g. 2 globals then the locals), each `[B, 3, H_i, W_i]` ->
    /// head outputs `[sum of B, K]` in the same order. The backbone runs once per run of
    /// consecutive crops of equal resolution, the head once on everything.
    pub fn forward_crops(&self, crops: &[Tensor<4>]) -> Tensor<2> {
        let mut features = Vec::new();
        let mut start = 0;
        while start < crops.len() {
            let size = &crops[start].dims()[2..];
            let end = start + crops[start..].iter().take_while(|c| &c.dims()[2..] == size).count();
            features.push(self.backbone.forward(Tensor::cat(crops[start..end].to_vec(), 0)));
            start = end;
        }
        self.head.forward(Tensor::cat(features, 0))
    }
}
