//! The DINO network: a Vision Transformer backbone and the DINO projection head, exact to the
//! official PyTorch modules, and their weights in the official checkpoint formats.
//!
//! This crate is the network only: no data, no training loop.

pub mod config;
pub mod dino;
pub mod head;
pub mod init;
pub mod pos_embed;
pub mod vit;
pub mod weights;

pub use config::{DinoHeadConfig, ModelConfig, VitConfig};
pub use dino::DinoModel;
pub use head::DinoHead;
pub use vit::VisionTransformer;
