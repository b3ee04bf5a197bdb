//! The sizes of each fused op, read from its operands' shapes and checked once, for every
//! backend: a mismatch panics with the shapes, never a silent wrong answer. The kernels of a
//! target (`cpu/…`) take these sizes and check only their buffers' lengths against them.

use burn::tensor::Shape;

/// `rows` inputs of width `k` to outputs of width `n`: x `[..., K]`, weight `[K, N]` (burn's
/// layout), output `[..., N]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearDims {
    pub rows: usize,
    pub k: usize,
    pub n: usize,
}

pub fn linear(x: &Shape, weight: &Shape) -> LinearDims {
    let k = x[x.num_dims() - 1];
    assert!(weight.num_dims() == 2 && weight[0] == k, "linear: input {x} does not match weight {weight}");
    LinearDims { rows: x.num_elements() / k.max(1), k, n: weight[1] }
}

/// A bias-free linear layer with its weight `[N, K]` in PyTorch's layout (x `[..., K]`).
pub fn linear_transposed(x: &Shape, weight: &Shape) -> LinearDims {
    let k = x[x.num_dims() - 1];
    assert!(weight.num_dims() == 2 && weight[1] == k, "linear: input {x} does not match weight {weight} ([out, in])");
    LinearDims { rows: x.num_elements() / k.max(1), k, n: weight[0] }
}

/// A linear layer whose output is added onto `residual` (which must have the output's shape).
pub fn linear_add(x: &Shape, weight: &Shape, residual: &Shape) -> LinearDims {
    let d = linear(x, weight);
    let out = with_last(x, d.n);
    assert!(residual == &out, "linear add: residual {residual} is not the layer's output {out}");
    d
}

/// A pre-norm transformer MLP added onto its input: x `[..., K]`, the LayerNorm's gamma and beta
/// `[K]`, fc1's weight `[K, H]`, fc2's `[H, K]` -> (fc1's sizes, fc2's).
pub fn norm_mlp_add(x: &Shape, gamma: &Shape, beta: &Shape, fc1: &Shape, fc2: &Shape) -> (LinearDims, LinearDims) {
    layer_norm(x, gamma, beta);
    let d1 = linear(x, fc1);
    (d1, linear_add(&with_last(x, d1.n), fc2, x))
}

/// Pre-norm self-attention added onto its input: x `[B, N, K]`, the LayerNorm's gamma and beta
/// `[K]`, the qkv projection's weight `[K, 3D]`, the output projection's `[D, K]` -> (qkv's
/// sizes, the attention's, proj's).
pub fn norm_attention_add(
    x: &Shape,
    gamma: &Shape,
    beta: &Shape,
    qkv: &Shape,
    proj: &Shape,
    heads: usize,
) -> (LinearDims, AttentionDims, LinearDims) {
    layer_norm(x, gamma, beta);
    let dq = linear(x, qkv);
    let d = attention(&with_last(x, dq.n), heads);
    (dq, d, linear_add(&d.output(), proj, x))
}

/// `shape` with its last dimension replaced by `last`: a linear layer's output or input shape.
pub fn with_last(shape: &Shape, last: usize) -> Shape {
    let mut dims = shape.to_vec();
    *dims.last_mut().expect("a tensor with at least one dimension") = last;
    Shape::from(dims)
}

/// LayerNorm of x `[..., C]` with gamma and beta `[C]`: returns C.
pub fn layer_norm(x: &Shape, gamma: &Shape, beta: &Shape) -> usize {
    let width = x[x.num_dims() - 1];
    assert!(
        gamma.num_elements() == width && beta.num_elements() == width,
        "layer_norm: input {x} with gamma {gamma} and beta {beta}"
    );
    width
}

/// Weight normalisation of v `[K, C]` with g `[K, 1]`: returns K.
pub fn weight_norm(v: &Shape, g: &Shape) -> usize {
    assert!(v.num_dims() == 2 && g.num_elements() == v[0], "weight norm: v {v} and g {g} are not [K, C] and [K, 1]");
    v[0]
}

/// Two operands of one elementwise op (the EMA's teacher and student).
pub fn same(op: &str, a: &Shape, b: &Shape) {
    assert!(a == b, "{op}: operand shapes {a} and {b} differ");
}

/// Multi-head self-attention on qkv `[B, N, 3D]`, D = heads · head_dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionDims {
    /// D, the width of the output.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
    /// The official scale, head_dim^-0.5.
    pub fn scale(&self) -> f32 {
        (self.head_dim as f32).powf(-0.5)
    }
    /// `[B, N, D]`.
    pub fn output(&self) -> Shape {
        Shape::new([self.batch, self.tokens, self.width()])
    }
    /// The softmax attention the backward reads, `[B, heads, N, N]`.
    pub fn probs(&self) -> Shape {
        Shape::new([self.batch, self.heads, self.tokens, self.tokens])
    }
}

pub fn attention(qkv: &Shape, heads: usize) -> AttentionDims {
    assert!(
        heads > 0 && qkv.num_dims() == 3 && qkv[2].is_multiple_of(3 * heads),
        "attention: qkv {qkv} is not [B, N, 3 * {heads} heads * head_dim]"
    );
    AttentionDims { batch: qkv[0], tokens: qkv[1], heads, head_dim: qkv[2] / 3 / heads }
}

/// A ViT patch embedding: images `[B, C, H, W]`, weight `[D, C, p, p]`, output `[B, h·w, D]`
/// with h = H/p, w = W/p (pixels past the last whole patch are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchDims {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub patch: usize,
    pub dim: usize,
}

impl PatchDims {
    /// (h, w), the patch grid.
    pub fn grid(&self) -> (usize, usize) {
        (self.height / self.patch, self.width / self.patch)
    }
    /// C·p·p, the length of one flattened patch.
    pub fn patch_len(&self) -> usize {
        self.channels * self.patch * self.patch
    }
    /// B·h·w, one row per patch.
    pub fn rows(&self) -> usize {
        let (h, w) = self.grid();
        self.batch * h * w
    }
    /// The embedding as a linear layer on flattened patches.
    pub fn linear(&self) -> LinearDims {
        LinearDims { rows: self.rows(), k: self.patch_len(), n: self.dim }
    }
    /// `[B, h·w, D]`.
    pub fn output(&self) -> Shape {
        let (h, w) = self.grid();
        Shape::new([self.batch, h * w, self.dim])
    }
    /// The gathered patches the weight's gradient reads, `[B·h·w, C·p·p]`.
    pub fn patches(&self) -> Shape {
        Shape::new([self.rows(), self.patch_len()])
    }
    pub fn images(&self) -> Shape {
        Shape::new([self.batch, self.channels, self.height, self.width])
    }
    pub fn weight(&self) -> Shape {
        Shape::new([self.dim, self.channels, self.patch, self.patch])
    }
}

pub fn patch_embed(images: &Shape, weight: &Shape) -> PatchDims {
    let (i, w) = (images, weight);
    assert!(
        i.num_dims() == 4 && w.num_dims() == 4 && i[1] == w[1] && w[2] == w[3] && i[2] >= w[2] && i[3] >= w[3],
        "patch embed: images {i} do not match weight {w}"
    );
    PatchDims { batch: i[0], channels: i[1], height: i[2], width: i[3], patch: w[2], dim: w[0] }
}

/// The DINO loss: student outputs `[V·B, K]` (V views, crop-major), teacher probabilities
/// `[2·B, K]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossDims {
    /// Student views V (the first two are the global crops the teacher saw).
    pub views: usize,
    pub batch: usize,
    pub classes: usize,
}

impl LossDims {
    /// (teacher view, other student view) pairs per sample.
    pub fn pairs(&self) -> usize {
        2 * self.views - 2
    }

    /// The teacher rows paired with student row r.
    pub fn teacher_rows(&self, r: usize) -> impl Iterator<Item = usize> {
        let (v, n, b) = (r / self.batch, r % self.batch, self.batch);
        (0..2).filter(move |&iq| iq != v).map(move |iq| iq * b + n)
    }
}

pub fn dino_loss(student: &Shape, teacher_probs: &Shape, views: usize) -> LossDims {
    let (s, q) = (student, teacher_probs);
    assert!(
        views >= 2
            && s.num_dims() == 2
            && q.num_dims() == 2
            && s[1] == q[1]
            && q[0] % 2 == 0
            && s[0] == views * (q[0] / 2),
        "DINO loss: student {s} and teacher {q} are not [views·B, K] and [2·B, K] for {views} views"
    );
    LossDims { views, batch: q[0] / 2, classes: s[1] }
}

/// A Conv2d without bias, groups 1, dilation 1 and zero padding on each side: x `[B, C, H, W]`,
/// weight `[O, C, kh, kw]`, output `[B, O, H', W']`, H' = (H + 2·pad − kh) / stride + 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvDims {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
}

impl ConvDims {
    pub fn out_height(&self) -> usize {
        (self.height + 2 * self.padding[0] - self.kernel[0]) / self.stride[0] + 1
    }
    pub fn out_width(&self) -> usize {
        (self.width + 2 * self.padding[1] - self.kernel[1]) / self.stride[1] + 1
    }
    /// C·H·W, one input image.
    pub fn in_pixels(&self) -> usize {
        self.in_channels * self.height * self.width
    }
    /// H'·W', the pixels of one output plane.
    pub fn out_pixels(&self) -> usize {
        self.out_height() * self.out_width()
    }
    /// C·kh·kw, the length of one im2col column (a row of the weight).
    pub fn col_len(&self) -> usize {
        self.in_channels * self.kernel[0] * self.kernel[1]
    }
    pub fn input(&self) -> Shape {
        Shape::new([self.batch, self.in_channels, self.height, self.width])
    }
    pub fn weight(&self) -> Shape {
        Shape::new([self.out_channels, self.in_channels, self.kernel[0], self.kernel[1]])
    }
    pub fn output(&self) -> Shape {
        Shape::new([self.batch, self.out_channels, self.out_height(), self.out_width()])
    }
}

pub fn conv2d(x: &Shape, weight: &Shape, stride: [usize; 2], padding: [usize; 2]) -> ConvDims {
    let (i, w) = (x, weight);
    assert!(
        i.num_dims() == 4
            && w.num_dims() == 4
            && i[1] == w[1]
            && stride.iter().all(|&s| s > 0)
            && i[2] + 2 * padding[0] >= w[2]
            && i[3] + 2 * padding[1] >= w[3],
        "conv2d: input {i} does not match weight {w} with stride {stride:?} and padding {padding:?}"
    );
    ConvDims {
        batch: i[0],
        in_channels: i[1],
        height: i[2],
        width: i[3],
        out_channels: w[0],
        kernel: [w[2], w[3]],
        stride,
        padding,
    }
}

/// Per-channel normalisation of x `[B, C, ...]` over every dimension but 1 (BatchNorm): the
/// input seen as B · C planes of `spatial` contiguous elements (H·W, or 1 for `[B, C]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelDims {
    pub batch: usize,
    pub channels: usize,
    pub spatial: usize,
}

impl ChannelDims {
    /// B · spatial, the elements of one channel.
    pub fn per_channel(&self) -> usize {
        self.batch * self.spatial
    }
}

/// x `[B, C, ...]` with per-channel vectors (each `[C]`).
pub fn channels(x: &Shape, per_channel: &[&Shape]) -> ChannelDims {
    assert!(x.num_dims() >= 2, "batch norm: input {x} has no channel dimension");
    let channels = x[1];
    assert!(
        per_channel.iter().all(|v| v.num_elements() == channels),
        "batch norm: input {x} with per-channel operands {per_channel:?}"
    );
    ChannelDims { batch: x[0], channels, spatial: x.num_elements() / (x[0] * channels).max(1) }
}

/// Channel statistics `[2, C]` (means, then variances) for x `[B, C, ...]`.
pub fn channel_stats(x: &Shape, stats: &Shape) -> ChannelDims {
    let d = channels(x, &[]);
    assert!(
        stats.num_dims() == 2 && stats[0] == 2 && stats[1] == d.channels,
        "batch norm: statistics {stats} for input {x}"
    );
    d
}
