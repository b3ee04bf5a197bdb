//! The Vision Transformer backbone of `vision_transformer.py`, one struct per layer.
//!
//! Field names are the official state_dict keys (`blocks.N.attn.qkv`, `patch_embed.proj`, ...),
//! so official weights load by name; `crate::weights` handles burn's `[in, out]` Linear layout
//! and its LayerNorm `gamma`/`beta` names.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use dino_kernels::{layer_norm, linear_gelu, merge_heads, self_attention, split_heads};

use crate::config::VitConfig;
use crate::init::{linear, torch_default_uniform, trunc_normal};
use crate::pos_embed::interpolation_matrix;

/// Image to patch embeddings: a Conv2d with kernel = stride = patch size.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub proj: Conv2d,
}

impl PatchEmbed {
    fn new(patch: usize, dim: usize, device: &Device) -> Self {
        // The official code keeps PyTorch's default Conv2d init for this layer.
        let fan_in = 3 * patch * patch;
        let mut proj = Conv2dConfig::new([3, dim], [patch, patch]).with_stride([patch, patch]).init(device);
        proj.weight = Param::from_tensor(torch_default_uniform([dim, 3, patch, patch], fan_in, device));
        proj.bias = Some(Param::from_tensor(torch_default_uniform([dim], fan_in, device)));
        Self { proj }
    }

    /// `[B, 3, H, W]` -> (`[B, N, D]` with N = (H/p)(W/p), grid height H/p, grid width W/p).
    /// Pixels beyond the last whole patch are ignored, as with PyTorch's strided conv.
    pub fn forward(&self, images: Tensor<4>) -> (Tensor<3>, usize, usize) {
        dino_kernels::patch_embed(&self.proj, images)
    }
}

/// Multi-head self-attention with a fused qkv projection.
#[derive(Module, Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    num_heads: usize,
}

impl Attention {
    /// `[B, N, D]` -> the heads' outputs side by side `[B, N, D]`, before the projection.
    fn heads(&self, x: Tensor<3>) -> Tensor<3> {
        self_attention(dino_kernels::linear(&self.qkv, x), self.num_heads)
    }

    /// `[B, N, D]` -> `[B, N, D]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        dino_kernels::linear(&self.proj, self.heads(x))
    }

    /// `x + forward(norm(x))`, all `[B, N, D]`: the pre-norm residual branch as one op.
    pub fn forward_add(&self, norm: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
        dino_kernels::norm_attention_add(norm.parts(), &self.qkv, &self.proj, x, self.num_heads)
    }

    /// `[B, N, D]` -> (`[B, N, D]`, softmax attention weights `[B, heads, N, N]`).
    pub fn forward_with_weights(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<4>) {
        let [q, k, v] = split_heads(dino_kernels::linear(&self.qkv, x), self.num_heads);
        let weights = attention_weights(q, k);
        (dino_kernels::linear(&self.proj, merge_heads(weights.clone().matmul(v))), weights)
    }

    /// `[B, N, D]` -> the CLS token's softmax attention over all N tokens, `[B, heads, 1, N]`:
    /// the first query row of `forward_with_weights`'s weights, in O(N) memory instead of O(N²)
    /// (a 480 px image at patch 4 has 14 401 tokens: 2.5 GB of weights per block otherwise).
    pub fn cls_weights(&self, x: Tensor<3>) -> Tensor<4> {
        let [q, k, _] = split_heads(dino_kernels::linear(&self.qkv, x), self.num_heads);
        attention_weights(q.narrow(2, 0, 1), k)
    }
}

/// softmax(q kᵀ · head_dim^-½): q `[B, heads, M, d]`, k `[B, heads, N, d]` -> `[B, heads, M, N]`.
fn attention_weights(q: Tensor<4>, k: Tensor<4>) -> Tensor<4> {
    let scale = (q.dims()[3] as f64).powf(-0.5);
    softmax(q.matmul(k.swap_dims(2, 3)) * scale, 3)
}

/// `torch.nn.LayerNorm` over the last dimension; `gamma`/`beta` are burn's names for PyTorch's
/// `weight`/`bias`.
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub gamma: Param<Tensor<1>>,
    pub beta: Param<Tensor<1>>,
    epsilon: f64,
}

impl LayerNorm {
    fn new(dim: usize, epsilon: f64, device: &Device) -> Self {
        Self {
            gamma: Param::from_tensor(Tensor::ones([dim], device)),
            beta: Param::from_tensor(Tensor::zeros([dim], device)),
            epsilon,
        }
    }

    /// `[..., D]` -> `[..., D]`.
    pub fn forward<const R: usize>(&self, x: Tensor<R>) -> Tensor<R> {
        layer_norm(x, self.gamma.val(), self.beta.val(), self.epsilon)
    }

    /// (gamma, beta, epsilon), for the kernels that norm inside a fused op.
    fn parts(&self) -> dino_kernels::Norm {
        (self.gamma.val(), self.beta.val(), self.epsilon)
    }
}

/// The transformer MLP: fc1, GELU (exact, erf), fc2.
#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    /// `[B, N, D]` -> `[B, N, D]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        dino_kernels::linear(&self.fc2, linear_gelu(&self.fc1, x))
    }

    /// `x + forward(norm(x))`, all `[B, N, D]`: the pre-norm residual branch as one op.
    pub fn forward_add(&self, norm: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
        dino_kernels::norm_mlp_add(norm.parts(), &self.fc1, &self.fc2, x)
    }
}

/// A pre-norm transformer block with per-sample stochastic depth.
#[derive(Module, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    drop_path: f64,
}

/// Block `i`'s drop rate: `torch.linspace(0, rate, depth)[i]`.
fn drop_path_rate(rate: f64, i: usize, depth: usize) -> f64 {
    if depth > 1 { rate * i as f64 / (depth - 1) as f64 } else { 0.0 }
}

/// Whether stochastic depth at `rate` drops anything on `device`.
fn stochastic_depth(rate: f64, device: &Device) -> bool {
    rate > 0.0 && device.is_autodiff()
}

/// Stochastic depth: drops a residual branch for whole samples with probability `rate`, and
/// rescales the kept ones. Active only on an autodiff device, i.e. while training the student.
fn drop_path(x: Tensor<3>, rate: f64) -> Tensor<3> {
    if !stochastic_depth(rate, &x.device()) {
        return x;
    }
    let keep = 1.0 - rate;
    let mask = crate::init::random::<3>([x.dims()[0], 1, 1], Distribution::Bernoulli(keep), &x.device());
    x * mask / keep
}

impl Block {
    /// `[B, N, D]` -> `[B, N, D]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        if !stochastic_depth(self.drop_path, &x.device()) {
            // Without stochastic depth the branches add straight onto the residual stream.
            let x = self.attn.forward_add(&self.norm1, x);
            return self.mlp.forward_add(&self.norm2, x);
        }
        let x = x.clone() + drop_path(self.attn.forward(self.norm1.forward(x)), self.drop_path);
        x.clone() + drop_path(self.mlp.forward(self.norm2.forward(x)), self.drop_path)
    }

    /// `[B, N, D]` -> the softmax attention weights of this block, `[B, heads, N, N]`.
    pub fn attention_weights(&self, x: Tensor<3>) -> Tensor<4> {
        self.attn.forward_with_weights(self.norm1.forward(x)).1
    }

    /// `[B, N, D]` -> the CLS token's attention weights in this block, `[B, heads, 1, N]`.
    pub fn cls_attention_weights(&self, x: Tensor<3>) -> Tensor<4> {
        self.attn.cls_weights(self.norm1.forward(x))
    }
}

/// The ViT backbone (`num_classes=0`: no classifier).
#[derive(Module, Debug)]
pub struct VisionTransformer {
    /// `[1, 1, D]`.
    pub cls_token: Param<Tensor<3>>,
    /// `[1, 1 + grid^2, D]`: CLS slot, then the patch grid in row-major order.
    pub pos_embed: Param<Tensor<3>>,
    pub patch_embed: PatchEmbed,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    grid: usize,
}

impl VisionTransformer {
    /// A randomly initialised backbone with the official init.
    pub fn new(config: &VitConfig, device: &Device) -> Self {
        let d = config.embed_dim;
        let grid = config.grid_size();
        let norm = || LayerNorm::new(d, config.layer_norm_eps, device);
        let blocks = (0..config.depth)
            .map(|i| Block {
                norm1: norm(),
                attn: Attention {
                    qkv: linear(d, 3 * d, config.qkv_bias, device),
                    proj: linear(d, d, true, device),
                    num_heads: config.num_heads,
                },
                norm2: norm(),
                mlp: Mlp {
                    fc1: linear(d, config.mlp_hidden(), true, device),
                    fc2: linear(config.mlp_hidden(), d, true, device),
                },
                drop_path: drop_path_rate(config.drop_path_rate, i, config.depth),
            })
            .collect();
        Self {
            cls_token: Param::from_tensor(trunc_normal([1, 1, d], 0.02, device)),
            pos_embed: Param::from_tensor(trunc_normal([1, 1 + grid * grid, d], 0.02, device)),
            patch_embed: PatchEmbed::new(config.patch_size, d, device),
            blocks,
            norm: norm(),
            grid,
        }
    }

    /// The same network with stochastic depth `rate` (block i drops with `rate · i / (depth −
    /// 1)`, as built from a config): what fine-tuning a loaded backbone sets.
    pub fn with_drop_path(mut self, rate: f64) -> Self {
        let depth = self.blocks.len();
        for (i, block) in self.blocks.iter_mut().enumerate() {
            block.drop_path = drop_path_rate(rate, i, depth);
        }
        self
    }

    /// Token width D.
    pub fn embed_dim(&self) -> usize {
        self.cls_token.dims()[2]
    }

    /// Number of attention heads of each block.
    pub fn num_heads(&self) -> usize {
        self.blocks[0].attn.num_heads
    }

    /// Side of the patches.
    pub fn patch_size(&self) -> usize {
        self.patch_embed.proj.weight.dims()[2]
    }

    /// The position embeddings for an `h x w` patch grid, `[1, 1 + h*w, D]`.
    fn pos_embed_for(&self, h: usize, w: usize) -> Tensor<3> {
        let pos = self.pos_embed.val();
        let Some(matrix) = interpolation_matrix(self.grid, h, w) else {
            return pos;
        };
        let [_, n, d] = pos.dims();
        let cls = pos.clone().narrow(1, 0, 1);
        let patches = pos.narrow(1, 1, n - 1).reshape([n - 1, d]);
        let matrix =
            Tensor::<2>::from_data(TensorData::new(matrix, [h * w, n - 1]), &patches.device()).cast(patches.dtype());
        Tensor::cat(vec![cls, matrix.matmul(patches).reshape([1, h * w, d])], 1)
    }

    /// Images `[B, 3, H, W]` -> tokens `[B, 1 + N, D]` (CLS first) with position embeddings.
    pub fn prepare_tokens(&self, images: Tensor<4>) -> Tensor<3> {
        let (patches, h, w) = self.patch_embed.forward(images);
        let [b, _, d] = patches.dims();
        let cls = self.cls_token.val().expand([b, 1, d]);
        Tensor::cat(vec![cls, patches], 1) + self.pos_embed_for(h, w)
    }

    /// Images `[B, 3, H, W]` -> every token after the last block, before the final norm,
    /// `[B, 1 + N, D]`.
    fn through_blocks(&self, images: Tensor<4>) -> Tensor<3> {
        self.blocks.iter().fold(self.prepare_tokens(images), |x, blk| blk.forward(x))
    }

    /// Images `[B, 3, H, W]` -> every token after the final norm, `[B, 1 + N, D]`.
    pub fn forward_features(&self, images: Tensor<4>) -> Tensor<3> {
        self.norm.forward(self.through_blocks(images))
    }

    /// Images `[B, 3, H, W]` -> the final-normed CLS token `[B, D]` (the DINO feature).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self.through_blocks(images);
        let [b, _, d] = x.dims();
        // LayerNorm acts on each token alone, so norming only the CLS token gives the official
        // `norm(x)[:, 0]` without norming (and back-propagating through) every patch token.
        self.norm.forward(x.narrow(1, 0, 1).reshape([b, d]))
    }

    /// Images `[B, 3, H, W]` -> the final-normed patch tokens `[B, N, D]`.
    pub fn patch_tokens(&self, images: Tensor<4>) -> Tensor<3> {
        let x = self.forward_features(images);
        let n = x.dims()[1];
        x.narrow(1, 1, n - 1)
    }

    /// Images `[B, 3, H, W]` -> the last block's softmax self-attention `[B, heads, 1+N, 1+N]`.
    pub fn last_self_attention(&self, images: Tensor<4>) -> Tensor<4> {
        let (last, x) = self.before_last_block(images);
        last.attention_weights(x)
    }

    /// Images `[B, 3, H, W]` -> the CLS token's row of the last block's self-attention,
    /// `[B, heads, 1+N]` (what `dino attention` draws, without the O(N²) weights).
    pub fn last_cls_attention(&self, images: Tensor<4>) -> Tensor<3> {
        let (last, x) = self.before_last_block(images);
        let weights = last.cls_attention_weights(x);
        let [b, heads, _, n] = weights.dims();
        weights.reshape([b, heads, n])
    }

    /// The last block and its input tokens `[B, 1+N, D]`.
    fn before_last_block(&self, images: Tensor<4>) -> (&Block, Tensor<3>) {
        let (last, rest) = self.blocks.split_last().expect("a ViT has at least one block");
        (last, rest.iter().fold(self.prepare_tokens(images), |x, blk| blk.forward(x)))
    }

    /// Images `[B, 3, H, W]` -> the outputs of the last `n` blocks, each through the final
    /// norm, oldest first: `n` tensors `[B, 1+N, D]` (official `get_intermediate_layers`).
    pub fn intermediate_layers(&self, images: Tensor<4>, n: usize) -> Vec<Tensor<3>> {
        let first_kept = self.blocks.len().saturating_sub(n);
        let mut x = self.prepare_tokens(images);
        let mut kept = Vec::with_capacity(n);
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(x);
            if i >= first_kept {
                kept.push(self.norm.forward(x.clone()));
            }
        }
        kept
    }
}
