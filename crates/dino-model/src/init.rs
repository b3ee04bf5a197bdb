//! The official initialisers, which burn does not ship, and the one generator they draw from.
//!
//! Every random number of ours (weights, drop-path masks, the linear probe's init) comes from
//! the CPU backend's generator and is copied to the device. GPU backends have generators of their
//! own, so drawing on the device would make a seed mean a different network on each one; drawing
//! on the host makes `--seed` the same run on every device, as building a model on the CPU and
//! moving it to the GPU does in PyTorch.

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Device, Distribution, Shape, Tensor};

/// Seeds the host generator that [`random`] draws from.
pub fn seed(seed: u64) {
    Device::flex().seed(seed);
}

/// A tensor drawn from the host generator, on `device`.
pub fn random<const D: usize>(shape: impl Into<Shape>, distribution: Distribution, device: &Device) -> Tensor<D> {
    Tensor::from_data(Tensor::<D>::random(shape, distribution, &Device::flex()).into_data(), device)
}

/// `trunc_normal_(std)` as in the official code: N(0, std) truncated to the absolute bounds
/// [-2, 2], which for std = 0.02 never binds, so clamping the rare outlier is exact enough.
pub fn trunc_normal<const D: usize>(shape: impl Into<Shape>, std: f64, device: &Device) -> Tensor<D> {
    random(shape, Distribution::Normal(0.0, std), device).clamp(-2.0, 2.0)
}

/// PyTorch's default `nn.Linear` / `nn.Conv2d` weight init, kaiming_uniform(a=sqrt(5)):
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
pub fn torch_default_uniform<const D: usize>(shape: impl Into<Shape>, fan_in: usize, device: &Device) -> Tensor<D> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    random(shape, Distribution::Uniform(-bound, bound), device)
}

/// A Linear layer with the official `_init_weights`: trunc_normal(0.02) weight, zero bias.
/// burn stores the weight as `[d_in, d_out]`; checkpoints hold its transpose.
pub fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    Linear {
        weight: Param::from_tensor(trunc_normal([d_in, d_out], 0.02, device)),
        bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
    }
}
