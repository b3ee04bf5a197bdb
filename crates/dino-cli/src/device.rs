//! `--device`: which burn backend runs the model, chosen at run time.

use anyhow::bail;
use burn::tensor::Device;
use clap::ValueEnum;
use dino_train::Precision;

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

/// `--device` and `--precision` of the commands that run a network outside `dino train` (extract,
/// retrieve, attention, finetune, eval).
#[derive(Debug, clap::Args)]
pub struct ComputeArgs {
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Arithmetic of the matrix products on the CPU: f32, or bf16 operands with f32 sums (faster
    /// where the CPU has AVX-512 BF16; features within about 3e-3 of f32's).
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    precision: Precision,
}

impl ComputeArgs {
    /// The device, with the matrix products of this process set to `--precision`.
    pub fn device(&self) -> anyhow::Result<Device> {
        let device = self.device.device()?;
        if self.precision != Precision::F32 && device != Device::flex() {
            bail!(
                "--precision {} runs on the CPU here; on a GPU this command computes in f32 (train and bench take f16 or bf16 there)",
                self.precision.name()
            );
        }
        dino_train::precision::use_precision(self.precision, &device).map_err(anyhow::Error::msg)?;
        if let Some(warning) = dino_train::precision::slow_precision_warning(self.precision, &device) {
            eprintln!("warning: {warning}");
        }
        Ok(device)
    }

    /// [`Self::device`] for a command that only runs the network forward (its weights fixed):
    /// with bf16, each weight is rounded and packed for the products once, kept while the
    /// guard lives, rather than once per batch.
    pub fn inference_device(&self) -> anyhow::Result<(Device, dino_kernels::KeepPackedWeights)> {
        Ok((self.device()?, dino_kernels::keep_packed_weights()))
    }
}
