//! The DINO projection head (`DINOHead` in `vision_transformer.py`).

use burn::module::{Module, Param};
use burn::nn::{Gelu, Linear};
use burn::tensor::{DType, Device, Tensor};

use crate::batch_norm::BatchNorm;
use crate::config::DinoHeadConfig;
use crate::init::{linear, torch_default_uniform};

/// One entry of the head's `nn.Sequential`; keeping GELU as an entry keeps the official
/// indices (`mlp.0`, `mlp.2`, `mlp.4` without BatchNorm; `mlp.0`, `mlp.1`, `mlp.3`, ... with it).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum HeadLayer {
    Linear(Linear),
    BatchNorm(BatchNorm),
    Gelu(Gelu),
}

impl HeadLayer {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Self::Linear(l) => dino_kernels::linear(l, x),
            Self::BatchNorm(bn) => bn.forward(x),
            // The fused kernel computes the same exact (erf) GELU as `burn::nn::Gelu`.
            Self::Gelu(_) => dino_kernels::gelu(x),
        }
    }
}

/// `weight_norm(Linear(bottleneck, K, bias=False))`: W = g * v / ||v||, norms taken per output
/// row. Stored as PyTorch stores it: `weight_g` `[K, 1]`, `weight_v` `[K, bottleneck]`.
#[derive(Module, Debug)]
pub struct WeightNormLinear {
    pub weight_g: Param<Tensor<2>>,
    pub weight_v: Param<Tensor<2>>,
}

impl WeightNormLinear {
    /// `[B, bottleneck]` -> `[B, K]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let w = dino_kernels::weight_norm(self.weight_v.val(), self.weight_g.val()); // [K, bottleneck]
        dino_kernels::linear_transposed(x, w)
    }
}

/// MLP -> L2 normalisation -> weight-normalised prototypes.
#[derive(Module, Debug)]
pub struct DinoHead {
    pub mlp: Vec<HeadLayer>,
    pub last_layer: WeightNormLinear,
}

impl DinoHead {
    /// A randomly initialised head with the official init.
    pub fn new(config: &DinoHeadConfig, device: &Device) -> Self {
        let mut mlp = Vec::new();
        let mut d_in = config.in_dim;
        for _ in 1..config.nlayers {
            mlp.push(HeadLayer::Linear(linear(d_in, config.hidden_dim, true, device)));
            if config.use_bn {
                mlp.push(HeadLayer::BatchNorm(BatchNorm::new(config.hidden_dim, device)));
            }
            mlp.push(HeadLayer::Gelu(Gelu::new()));
            d_in = config.hidden_dim;
        }
        mlp.push(HeadLayer::Linear(linear(d_in, config.bottleneck_dim, true, device)));

        // `weight_v` keeps PyTorch's default Linear init (the official `_init_weights` runs
        // before the last layer exists); `weight_g` starts at 1 and is frozen with
        // `norm_last_layer`.
        let (k, b) = (config.out_dim, config.bottleneck_dim);
        let weight_g = Param::from_tensor(Tensor::ones([k, 1], device));
        let last_layer = WeightNormLinear {
            weight_g: if config.norm_last_layer { weight_g.set_require_grad(false) } else { weight_g },
            weight_v: Param::from_tensor(torch_default_uniform([k, b], b, device)),
        };
        Self { mlp, last_layer }
    }

    /// `[B, in_dim]` -> `[B, K]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = self.mlp.iter().fold(x, |x, layer| layer.forward(x));
        self.last_layer.forward(l2_normalize(x))
    }
}

/// `F.normalize(x, dim=-1, p=2)`: rows divided by max(||row||, 1e-12). `[B, D]` -> `[B, D]`.
/// In f32 whatever the input's dtype: a sum of squares overflows f16 from norms of 256 up.
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    (x / norm).cast(dtype)
}
