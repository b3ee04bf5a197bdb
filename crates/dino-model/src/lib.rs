//! The DINO network: a Vision Transformer or ResNet backbone and the DINO projection head, exact
//! to the official PyTorch and torchvision modules, and their weights in the official checkpoint
//! formats.
//!
//! This crate is the network only: no data, no training loop.

pub mod backbone;
pub mod batch_norm;
pub mod classifier;
pub mod config;
pub mod dino;
pub mod head;
pub mod init;
pub mod pos_embed;
pub mod resnet;
pub mod vit;
pub mod weights;

pub use backbone::Backbone;
pub use classifier::Classifier;
pub use config::{BackboneConfig, BlockKind, DinoHeadConfig, ModelConfig, ResNetConfig, Stem, VitConfig};
pub use dino::DinoModel;
pub use head::DinoHead;
pub use resnet::ResNet;
pub use vit::VisionTransformer;
