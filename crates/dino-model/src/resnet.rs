//! torchvision's ResNet (v1.5: the stride on the 3x3 convolution of a bottleneck), without `fc`,
//! one struct per layer. Field names are torchvision's state_dict keys (`conv1`, `bn1`,
//! `layer1.0.conv1`, `layer2.0.downsample.0`, ...), so torchvision and official DINO weights
//! load by name, and ours load back into torchvision with `fc = nn.Identity()`.

use burn::module::{Module, Param};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::activation::relu;
use burn::tensor::module::max_pool2d;
use burn::tensor::ops::MaxPoolOptions;
use burn::tensor::{Device, Distribution, Tensor};

use crate::batch_norm::BatchNorm;
use crate::config::{BlockKind, ResNetConfig, Stem};

/// A bias-free `k x k` convolution with torchvision's init, kaiming_normal(fan_out, relu).
fn conv(c_in: usize, c_out: usize, k: usize, stride: usize, device: &Device) -> Conv2d {
    let pad = k / 2;
    let mut conv = Conv2dConfig::new([c_in, c_out], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(false)
        .init(device);
    let std = (2.0 / (c_out * k * k) as f64).sqrt();
    conv.weight = Param::from_tensor(crate::init::random([c_out, c_in, k, k], Distribution::Normal(0.0, std), device));
    conv
}

/// One entry of the shortcut's `nn.Sequential(conv1x1, BatchNorm2d)`, keeping its indices
/// (`downsample.0.weight`, `downsample.1.running_mean`).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum DownsampleLayer {
    Conv(Conv2d),
    BatchNorm(BatchNorm),
}

/// A residual block: torchvision's `BasicBlock` (two 3x3 convolutions) or `Bottleneck`
/// (1x1, 3x3, 1x1 with 4x expansion; `conv3`/`bn3` present).
#[derive(Module, Debug)]
pub struct Block {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub conv2: Conv2d,
    pub bn2: BatchNorm,
    pub conv3: Option<Conv2d>,
    pub bn3: Option<BatchNorm>,
    /// The projection shortcut where the block changes resolution or width.
    pub downsample: Vec<DownsampleLayer>,
}

impl Block {
    fn new(kind: BlockKind, c_in: usize, planes: usize, stride: usize, device: &Device) -> Self {
        let c_out = planes * kind.expansion();
        let downsample = if stride != 1 || c_in != c_out {
            vec![
                DownsampleLayer::Conv(conv(c_in, c_out, 1, stride, device)),
                DownsampleLayer::BatchNorm(BatchNorm::new(c_out, device)),
            ]
        } else {
            Vec::new()
        };
        match kind {
            BlockKind::Basic => Self {
                conv1: conv(c_in, planes, 3, stride, device),
                bn1: BatchNorm::new(planes, device),
                conv2: conv(planes, planes, 3, 1, device),
                bn2: BatchNorm::new(planes, device),
                conv3: None,
                bn3: None,
                downsample,
            },
            BlockKind::Bottleneck => Self {
                conv1: conv(c_in, planes, 1, 1, device),
                bn1: BatchNorm::new(planes, device),
                conv2: conv(planes, planes, 3, stride, device),
                bn2: BatchNorm::new(planes, device),
                conv3: Some(conv(planes, c_out, 1, 1, device)),
                bn3: Some(BatchNorm::new(c_out, device)),
                downsample,
            },
        }
    }

    /// `[B, C_in, H, W]` -> `[B, C_out, H / stride, W / stride]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = self.downsample.iter().fold(x.clone(), |y, layer| match layer {
            DownsampleLayer::Conv(c) => dino_kernels::conv2d(c, y),
            DownsampleLayer::BatchNorm(bn) => bn.forward(y),
        });
        let first = self.bn1.forward_relu(dino_kernels::conv2d(&self.conv1, x));
        let second = dino_kernels::conv2d(&self.conv2, first);
        let out = match (&self.conv3, &self.bn3) {
            (Some(conv3), Some(bn3)) => bn3.forward(dino_kernels::conv2d(conv3, self.bn2.forward_relu(second))),
            _ => self.bn2.forward(second),
        };
        relu(out + identity)
    }
}

/// The ResNet backbone: stem, four stages, global average pooling (`fc` is `nn.Identity()`).
#[derive(Module, Debug)]
pub struct ResNet {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub layer1: Vec<Block>,
    pub layer2: Vec<Block>,
    pub layer3: Vec<Block>,
    pub layer4: Vec<Block>,
    /// Whether the stem max-pools (the ImageNet stem; the CIFAR one does not).
    max_pool: bool,
}

impl ResNet {
    /// A randomly initialised ResNet with torchvision's init (BatchNorm weight 1, bias 0; no
    /// zero-init of the last BatchNorm of each block), in train mode.
    pub fn new(config: &ResNetConfig, device: &Device) -> Self {
        let w = config.width;
        let (conv1, max_pool) = match config.stem {
            Stem::ImageNet => (conv(3, w, 7, 2, device), true),
            Stem::Cifar => (conv(3, w, 3, 1, device), false),
        };
        let mut c_in = w;
        let mut stage = |i: usize| {
            let planes = w << i;
            (0..config.layers[i])
                .map(|b| {
                    let stride = if i > 0 && b == 0 { 2 } else { 1 };
                    let block = Block::new(config.block, c_in, planes, stride, device);
                    c_in = planes * config.block.expansion();
                    block
                })
                .collect()
        };
        let (layer1, layer2, layer3, layer4) = (stage(0), stage(1), stage(2), stage(3));
        Self { conv1, bn1: BatchNorm::new(w, device), layer1, layer2, layer3, layer4, max_pool }
    }

    /// Width of the pooled feature (512 for resnet18/34, 2048 for resnet50).
    pub fn embed_dim(&self) -> usize {
        self.layer4.last().map_or(0, |b| b.bn3.as_ref().unwrap_or(&b.bn2).gamma.dims()[0])
    }

    /// Images `[B, 3, H, W]` -> the last stage's feature map `[B, D, H / 32, W / 32]` (the CIFAR
    /// stem: `H / 8`).
    pub fn forward_features(&self, images: Tensor<4>) -> Tensor<4> {
        let mut x = self.bn1.forward_relu(dino_kernels::conv2d(&self.conv1, images));
        if self.max_pool {
            x = max_pool2d(x, MaxPoolOptions::new([3, 3]).with_stride([2, 2]).with_padding([1, 1]));
        }
        [&self.layer1, &self.layer2, &self.layer3, &self.layer4]
            .into_iter()
            .flatten()
            .fold(x, |x, block| block.forward(x))
    }

    /// Images `[B, 3, H, W]` -> the globally average-pooled feature `[B, D]` (the DINO feature).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self.forward_features(images);
        let [b, d, h, w] = x.dims();
        x.reshape([b, d, h * w]).mean_dim(2).reshape([b, d])
    }
}
