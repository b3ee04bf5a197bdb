//! Mixed precision. On the CPU, `--precision bf16` makes the kernels' matrix products bf16 with
//! f32 sums ([`use_precision`]). On the GPU path (`--precision f16|bf16`): forward and backward passes in a
//! half type on copies of the f32 weights, everything that accumulates (weights, optimizer state,
//! EMA teacher, center, loss) in f32, as `torch.autocast` with f32 master weights does; and for
//! f16 the dynamic loss scaling of `torch.cuda.amp.GradScaler`, which `main_dino.py` uses by
//! default (`--use_fp16 true`).

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// The arithmetic of the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// IEEE half: 10-bit mantissa, range ±65504, so the loss is scaled ([`LossScaler`]).
    F16,
    /// bfloat16: f32's range with an 8-bit mantissa; no loss scaling.
    Bf16,
}

impl Precision {
    /// The name in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    /// The half dtype of a mixed-precision step, `None` for f32.
    pub fn half(self) -> Option<DType> {
        match self {
            Self::F32 => None,
            Self::F16 => Some(DType::F16),
            Self::Bf16 => Some(DType::BF16),
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [Self::F32, Self::F16, Self::Bf16]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown precision '{s}'; choose f32, f16 or bf16"))
    }
}

/// Sets `precision` up on `device` and returns the precision the training step casts to:
/// - on the CPU (flex) the step stays f32 and bf16 is the arithmetic of the kernels' matrix
///   products (`dino_kernels::set_matmul_precision`, for the whole process), as PyTorch's CPU
///   autocast runs its products; f16, which these CPUs have no fast products for, is refused;
/// - on a GPU the step casts to the half type ([`train_step_mixed`](crate::train_step_mixed))
///   where the device computes in it.
pub fn use_precision(precision: Precision, device: &burn::tensor::Device) -> Result<Precision, String> {
    if *device != burn::tensor::Device::flex() {
        check_support(precision, device)?;
        return Ok(precision);
    }
    let matmul = match precision {
        Precision::F32 => dino_kernels::MatmulPrecision::F32,
        Precision::Bf16 => dino_kernels::MatmulPrecision::Bf16,
        Precision::F16 => {
            return Err(
                "precision = f16 runs on the GPU path (--device wgpu|vulkan|cuda); on the CPU use bf16 or f32".into()
            );
        }
    };
    dino_kernels::set_matmul_precision(matmul);
    Ok(Precision::F32)
}

/// A line for the user when `precision` on `device` runs on a bf16 kernel that may be slower
/// than f32 on this machine ([`dino_kernels::cpu_bf16::Path::slow_warning`]).
pub fn slow_precision_warning(precision: Precision, device: &burn::tensor::Device) -> Option<String> {
    let cpu_bf16 = precision == Precision::Bf16 && *device == burn::tensor::Device::flex();
    cpu_bf16.then(dino_kernels::cpu_bf16::Path::slow_warning).flatten()
}

/// Refuses a half type `device` cannot compute in (WGSL has no bf16), naming what it offers.
pub fn check_support(precision: Precision, device: &burn::tensor::Device) -> Result<(), String> {
    match precision.half() {
        Some(dtype) if !device.supports_dtype(dtype) => {
            let other = [Precision::F16, Precision::Bf16]
                .into_iter()
                .find(|p| p.half().is_some_and(|d| device.supports_dtype(d)));
            let hint = other.map_or("f32".to_string(), |p| p.name().to_string());
            Err(format!("precision = {}: this device cannot compute in {0}; use {hint}", precision.name()))
        }
        _ => Ok(()),
    }
}

/// `module` with every float parameter cast to `dtype`. The casts are differentiable, so a loss
/// computed with the copy sends its gradients to the f32 parameters of `module`. BatchNorm's
/// running statistics stay f32 (a running variance underflows f16), and are shared with
/// `module`, so the copy's forward passes update them.
pub fn cast_params<M: Module>(module: &M, dtype: DType) -> M {
    struct Cast(DType);
    impl ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            param.map(|t| t.cast(self.0))
        }
    }
    dino_model::batch_norm::map_parameters(module.clone(), &mut Cast(dtype))
}

/// Dynamic loss scaling with `GradScaler`'s defaults: start at 2^16; halve and skip the step when
/// a gradient overflows; double after 2000 steps in a row without one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Steps since the last overflow or growth.
    pub good_steps: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self { scale: 65536.0, good_steps: 0 }
    }
}

impl LossScaler {
    const GROWTH_INTERVAL: u32 = 2000;

    /// After a step whose gradients were finite.
    pub fn step_taken(&mut self) {
        self.good_steps += 1;
        if self.good_steps == Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
    }

    /// After a step skipped for an overflow.
    pub fn overflowed(&mut self) {
        self.scale *= 0.5;
        self.good_steps = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_halves_on_overflow_and_doubles_after_2000_good_steps() {
        let mut s = LossScaler::default();
        s.overflowed();
        assert_eq!(s.scale, 32768.0);
        for _ in 0..1999 {
            s.step_taken();
        }
        assert_eq!(s.scale, 32768.0);
        s.step_taken();
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
    }

    #[test]
    fn cast_params_keeps_ids_and_changes_dtypes() {
        let device = burn::tensor::Device::flex();
        let layer = burn::nn::LinearConfig::new(3, 2).init(&device);
        let half = cast_params(&layer, DType::F16);
        assert_eq!(half.weight.id, layer.weight.id);
        assert_eq!(half.weight.val().dtype(), DType::F16);
        assert_eq!(layer.weight.val().dtype(), DType::F32);
    }
}
