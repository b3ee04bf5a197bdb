//! `--device`: which burn backend runs the model, chosen at run time.

use anyhow::bail;
use burn::tensor::Device;
use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The pure-Rust CPU backend (flex), multi-threaded; always available.
    Cpu,
    /// A GPU through wgpu (Vulkan, Metal or DX12); needs the `wgpu` build feature.
    Wgpu,
    /// A GPU through Vulkan; needs the `vulkan` build feature.
    Vulkan,
    /// An NVIDIA GPU through CUDA; needs the `cuda` build feature.
    Cuda,
}

fn not_built(feature: &str) -> anyhow::Result<Device> {
    bail!(
        "this dino was built without GPU support for --device {feature}; rebuild with `cargo build --release --features {feature}`"
    )
}

impl DeviceArg {
    pub fn device(self) -> anyhow::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Self::Wgpu => Ok(Device::wgpu(Default::default())),
            #[cfg(not(feature = "wgpu"))]
            Self::Wgpu => not_built("wgpu"),
            #[cfg(feature = "vulkan")]
            Self::Vulkan => Ok(Device::vulkan(Default::default())),
            #[cfg(not(feature = "vulkan"))]
            Self::Vulkan => not_built("vulkan"),
            #[cfg(feature = "cuda")]
            Self::Cuda => Ok(Device::cuda(0)),
            #[cfg(not(feature = "cuda"))]
            Self::Cuda => not_built("cuda"),
        }
    }
}
