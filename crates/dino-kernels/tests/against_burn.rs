//! The fused kernels against burn's composed ops on the flex backend, forward and backward,
//! through the public `Tensor` API (so the backend-extension glue is exercised too).

use burn::module::{Param, ParamId};
use burn::nn::Linear;
use burn::tensor::activation;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Distribution, Tensor};
use dino_kernels::{
    batch_norm_eval, batch_norm_eval_relu, batch_norm_train, batch_norm_train_relu, conv2d, gelu, layer_norm, linear,
    linear_add, linear_gelu, linear_transposed, merge_heads, norm_attention_add, norm_mlp_add, self_attention,
    split_heads,
};

fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

/// Runs `f` on leaves `xs` and returns the output and the gradients of Σ out · w.
fn run<const D: usize, const O: usize>(
    xs: &[Tensor<D>],
    weights: &Tensor<O>,
    f: impl Fn(Vec<Tensor<D>>) -> Tensor<O>,
) -> (Tensor<O>, Vec<Tensor<D>>) {
    let leaves: Vec<Tensor<D>> = xs.iter().map(|x| x.clone().require_grad()).collect();
    let out = f(leaves.clone());
    let grads = (out.clone() * weights.clone()).sum().backward();
    let g = leaves.iter().map(|l| l.grad(&grads).expect("a gradient for every input")).collect();
    (out.inner(), g)
}

#[test]
fn gelu_matches_burn() {
    let device = Device::flex().autodiff();
    let x = random([4, 33, 70], &device) * 3.0;
    let w = random([4, 33, 70], &device);
    let (ours, g1) = run(std::slice::from_ref(&x), &w, |v| gelu(v[0].clone()));
    let (burn, g2) = run(&[x], &w, |v| activation::gelu(v[0].clone()));
    assert!(max_diff(ours, burn) < 1e-5);
    assert!(max_diff(g1[0].clone(), g2[0].clone()) < 1e-5);
}

#[test]
fn layer_norm_matches_burn() {
    let device = Device::flex().autodiff();
    let x = random([3, 17, 48], &device) * 2.0 + 0.5;
    let (gamma, beta) = (random([48], &device), random([48], &device));
    let w = random([3, 17, 48], &device);
    let ours =
        |v: Vec<Tensor<3>>| layer_norm(v[0].clone(), v[1].clone().reshape([48]), v[2].clone().reshape([48]), 1e-6);
    let burn = |v: Vec<Tensor<3>>| {
        burn::tensor::module::layer_norm(
            v[0].clone(),
            v[1].clone().reshape([48]),
            Some(v[2].clone().reshape([48])),
            1e-6,
        )
    };
    let inputs = [x, gamma.reshape([1, 1, 48]), beta.reshape([1, 1, 48])];
    let (a, ga) = run(&inputs, &w, ours);
    let (b, gb) = run(&inputs, &w, burn);
    assert!(max_diff(a, b) < 1e-5);
    for (name, (x, y)) in ["x", "gamma", "beta"].iter().zip(ga.into_iter().zip(gb)) {
        let d = max_diff(x, y);
        assert!(d < 1e-4, "d{name} differs by {d}");
    }
}

#[test]
fn self_attention_matches_burn() {
    let device = Device::flex().autodiff();
    let (heads, dim) = (3, 24);
    let qkv = random([5, 11, 3 * dim], &device);
    let w = random([5, 11, dim], &device);
    let composed = |v: Vec<Tensor<3>>| {
        let [q, k, v] = split_heads(v[0].clone(), heads);
        merge_heads(attention(q, k, v, None, None, AttentionModuleOptions::default()))
    };
    let (ours, g1) = run(std::slice::from_ref(&qkv), &w, |v| self_attention(v[0].clone(), heads));
    let (burn, g2) = run(std::slice::from_ref(&qkv), &w, composed);
    assert!(max_diff(ours.clone(), burn) < 1e-5);
    assert!(max_diff(g1[0].clone(), g2[0].clone()) < 1e-5);
    // Without autodiff the same kernel runs, keeping no attention matrices.
    let plain = self_attention(qkv.inner(), heads);
    assert!(max_diff(plain, ours) == 0.0);
}

#[test]
fn linear_matches_burn() {
    let device = Device::flex().autodiff();
    let x = random([3, 7, 24], &device);
    let w = random([3, 7, 40], &device);
    // Weight and bias go in as leaves too, to compare their gradients.
    let apply = |v: Vec<Tensor<3>>, fused: bool| {
        let layer = Linear {
            weight: Param::initialized(ParamId::new(), v[1].clone().reshape([24, 40])),
            bias: Some(Param::initialized(ParamId::new(), v[2].clone().reshape([40]))),
        };
        if fused { linear(&layer, v[0].clone()) } else { layer.forward(v[0].clone()) }
    };
    let inputs = [x, random([1, 24, 40], &device), random([1, 1, 40], &device)];
    let (a, ga) = run(&inputs, &w, |v| apply(v, true));
    let (b, gb) = run(&inputs, &w, |v| apply(v, false));
    assert!(max_diff(a, b) < 1e-5);
    for (name, (x, y)) in ["x", "weight", "bias"].iter().zip(ga.into_iter().zip(gb)) {
        let d = max_diff(x, y);
        assert!(d < 1e-4, "d{name} differs by {d}");
    }
}

/// The head's last layer, x Wᵀ with W `[N, K]`, against burn's matmul: a 3-d input (rows
/// flattened) and both gradients.
#[test]
fn linear_transposed_matches_burn() {
    let device = Device::flex().autodiff();
    let inputs = [random([2, 9, 24], &device), random([1, 70, 24], &device)];
    let w = random([2, 9, 70], &device);
    let (a, ga) = run(&inputs, &w, |v| linear_transposed(v[0].clone(), v[1].clone().reshape([70, 24])));
    let (b, gb) = run(&inputs, &w, |v| v[0].clone().matmul(v[1].clone().swap_dims(1, 2)));
    assert!(max_diff(a, b) < 1e-5);
    for (name, (x, y)) in ["x", "weight"].iter().zip(ga.into_iter().zip(gb)) {
        let d = max_diff(x, y);
        assert!(d < 1e-4, "d{name} differs by {d}");
    }
}

/// Gradients `a` against `b`, relative to the largest entry of each. The bias gradients sum
/// thousands of rows in another order than burn's (≈ √rows · ε apart, on unseeded inputs): 300
/// runs of these tests gave at most 2.8e-6, so 1e-5 leaves room without hiding a wrong term.
fn assert_gradients_close<const D: usize>(case: &str, names: &[&str], a: Vec<Tensor<D>>, b: Vec<Tensor<D>>) {
    for (name, (x, y)) in names.iter().zip(a.into_iter().zip(b)) {
        let scale: f32 = y.clone().abs().max().into_scalar();
        let d = max_diff(x, y);
        assert!(d < 1e-5 * scale.max(1.0), "{case}: d{name} differs by {d} (scale {scale})");
    }
}

/// `linear_gelu` and `linear_add` against burn's linear + GELU and residual + linear, on few
/// rows (one parallel gemm) and on many (row tiles), forward and backward, and without autodiff.
#[test]
fn fused_linear_epilogues_match_burn() {
    let device = Device::flex().autodiff();
    let layer = |v: &[Tensor<3>]| Linear {
        weight: Param::initialized(ParamId::new(), v[1].clone().reshape([24, 40])),
        bias: Some(Param::initialized(ParamId::new(), v[2].clone().reshape([40]))),
    };
    let gelu_fused = |v: Vec<Tensor<3>>| linear_gelu(&layer(&v), v[0].clone());
    let gelu_burn = |v: Vec<Tensor<3>>| activation::gelu(layer(&v).forward(v[0].clone()));
    let add_fused = |v: Vec<Tensor<3>>| linear_add(&layer(&v), v[0].clone(), v[3].clone());
    let add_burn = |v: Vec<Tensor<3>>| v[3].clone() + layer(&v).forward(v[0].clone());
    for tokens in [7, 700] {
        let inputs = [
            random([3, tokens, 24], &device),
            random([1, 24, 40], &device) * 0.3,
            random([1, 1, 40], &device),
            random([3, tokens, 40], &device),
        ];
        let w = random([3, tokens, 40], &device);
        type Apply<'a> = &'a dyn Fn(Vec<Tensor<3>>) -> Tensor<3>;
        let cases: [(&str, usize, Apply, Apply); 2] =
            [("gelu", 3, &gelu_fused, &gelu_burn), ("add", 4, &add_fused, &add_burn)];
        for (case, leaves, fused, composed) in cases {
            let inputs = &inputs[..leaves];
            let (a, ga) = run(inputs, &w, fused);
            let (b, gb) = run(inputs, &w, composed);
            assert!(max_diff(a.clone(), b) < 1e-5, "{case}, {tokens} tokens");
            let names = ["x", "weight", "bias", "residual"];
            assert_gradients_close(&format!("{case}, {tokens} tokens"), &names, ga, gb);
            let plain: Vec<Tensor<3>> = inputs.iter().map(|t| t.clone().inner()).collect();
            assert!(max_diff(fused(plain), a) < 1e-6, "{case} without autodiff");
        }
    }
}

/// `fused` against burn's `composed` on `inputs` (leaves named by `names`): outputs and
/// gradients agree; without gradients the fused op runs as one pass (in row tiles when there are
/// rows enough), which must give the tracked output's bits, on autodiff and on plain flex.
fn fused_half_matches_burn(
    case: &str,
    inputs: &[Tensor<3>],
    w: &Tensor<3>,
    names: &[&str],
    fused: impl Fn(Vec<Tensor<3>>) -> Tensor<3>,
    composed: impl Fn(Vec<Tensor<3>>) -> Tensor<3>,
) {
    let (a, ga) = run(inputs, w, &fused);
    let (b, gb) = run(inputs, w, composed);
    // Relative, as the gradients: 150 runs gave at most 1.6e-6 of the largest output.
    let (d, scale): (f32, f32) = (max_diff(a.clone(), b.clone()), b.abs().max().into_scalar());
    assert!(d < 1e-5 * scale.max(1.0), "{case}: outputs differ by {d} (scale {scale})");
    assert_gradients_close(case, names, ga, gb);
    let untracked = fused(inputs.to_vec()).inner();
    assert_eq!(max_diff(untracked, a.clone()), 0.0, "{case}, without gradients");
    let plain = fused(inputs.iter().map(|t| t.clone().inner()).collect());
    assert_eq!(max_diff(plain, a), 0.0, "{case}, without autodiff");
}

fn layer_of(w: &Tensor<3>, b: &Tensor<3>) -> Linear {
    let [_, k, n] = w.dims();
    Linear {
        weight: Param::initialized(ParamId::new(), w.clone().reshape([k, n])),
        bias: Some(Param::initialized(ParamId::new(), b.clone().reshape([n]))),
    }
}

/// burn's LayerNorm of `x` with gamma and beta given as `[1, 1, K]` leaves.
fn burn_layer_norm(x: Tensor<3>, gamma: &Tensor<3>, beta: &Tensor<3>) -> Tensor<3> {
    let k = x.dims()[2];
    burn::tensor::module::layer_norm(x, gamma.clone().reshape([k]), Some(beta.clone().reshape([k])), 1e-6)
}

/// `norm_mlp_add` and `norm_attention_add`, a pre-norm transformer block's halves added onto
/// their input, against burn's ops, on few rows (the layers one after the other) and on many
/// (row tiles on up to four threads).
#[test]
fn fused_block_halves_match_burn() {
    let device = Device::flex().autodiff();
    let norm = |v: &[Tensor<3>]| (v[1].clone().reshape([24]), v[2].clone().reshape([24]), 1e-6);
    let mlp =
        |v: Vec<Tensor<3>>| norm_mlp_add(norm(&v), &layer_of(&v[3], &v[4]), &layer_of(&v[5], &v[6]), v[0].clone());
    let mlp_burn = |v: Vec<Tensor<3>>| {
        let normed = burn_layer_norm(v[0].clone(), &v[1], &v[2]);
        let hidden = activation::gelu(layer_of(&v[3], &v[4]).forward(normed));
        v[0].clone() + layer_of(&v[5], &v[6]).forward(hidden)
    };
    let names = ["x", "norm.gamma", "norm.beta", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];
    for tokens in [7, 1400] {
        let inputs = [
            random([3, tokens, 24], &device),
            random([1, 1, 24], &device) + 1.0,
            random([1, 1, 24], &device),
            random([1, 24, 40], &device) * 0.3,
            random([1, 1, 40], &device),
            random([1, 40, 24], &device) * 0.3,
            random([1, 1, 24], &device),
        ];
        let w = random([3, tokens, 24], &device);
        fused_half_matches_burn(&format!("mlp, {tokens} tokens"), &inputs, &w, &names, mlp, mlp_burn);
    }
    // 4 heads of 32: four samples of 50 tokens per tile.
    let heads = 4;
    let attn = |v: Vec<Tensor<3>>| {
        norm_attention_add(norm(&v), &layer_of(&v[3], &v[4]), &layer_of(&v[5], &v[6]), v[0].clone(), heads)
    };
    let attn_burn = |v: Vec<Tensor<3>>| {
        let normed = burn_layer_norm(v[0].clone(), &v[1], &v[2]);
        let [q, k, values] = split_heads(layer_of(&v[3], &v[4]).forward(normed), heads);
        let heads = merge_heads(attention(q, k, values, None, None, AttentionModuleOptions::default()));
        v[0].clone() + layer_of(&v[5], &v[6]).forward(heads)
    };
    let names = ["x", "norm.gamma", "norm.beta", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias"];
    for samples in [2, 32] {
        let inputs = [
            random([samples, 50, 24], &device),
            random([1, 1, 24], &device) + 1.0,
            random([1, 1, 24], &device),
            random([1, 24, 384], &device) * 0.3,
            random([1, 1, 384], &device),
            random([1, 128, 24], &device) * 0.1,
            random([1, 1, 24], &device),
        ];
        let w = random([samples, 50, 24], &device);
        fused_half_matches_burn(&format!("attention, {samples} samples"), &inputs, &w, &names, attn, attn_burn);
    }
}

#[test]
fn weight_norm_matches_burn() {
    let device = Device::flex().autodiff();
    let v = random([37, 16], &device);
    let g = random([37, 1], &device) + 2.0;
    let w = random([37, 16], &device);
    let composed = |x: Vec<Tensor<2>>| {
        let norm = x[0].clone().square().sum_dim(1).sqrt();
        x[0].clone() * (x[1].clone() / norm)
    };
    let (a, ga) = run(&[v.clone(), g.clone()], &w, |x| dino_kernels::weight_norm(x[0].clone(), x[1].clone()));
    let (b, gb) = run(&[v, g], &w, composed);
    assert!(max_diff(a, b) < 1e-5);
    for (name, (x, y)) in ["v", "g"].iter().zip(ga.into_iter().zip(gb)) {
        let d = max_diff(x, y);
        assert!(d < 1e-4, "d{name} differs by {d}");
    }
}

#[test]
fn patch_embed_matches_burn_conv() {
    use burn::nn::conv::{Conv2d, Conv2dConfig};
    let device = Device::flex().autodiff();
    // 18 x 13 pixels with patch 4: the last rows/columns are not a whole patch and are ignored.
    let images = random([2, 3, 18, 13], &device);
    let weight = random([8, 3, 4, 4], &device);
    let bias = random([1, 1, 1, 8], &device);
    let w = random([2, 4, 3, 8], &device);
    let conv = |v: &[Tensor<4>]| {
        let mut c: Conv2d = Conv2dConfig::new([3, 8], [4, 4]).with_stride([4, 4]).init(&device);
        c.weight = Param::initialized(ParamId::new(), v[1].clone().reshape([8, 3, 4, 4]));
        c.bias = Some(Param::initialized(ParamId::new(), v[2].clone().reshape([8])));
        c
    };
    let ours = |v: Vec<Tensor<4>>| dino_kernels::patch_embed(&conv(&v), v[0].clone()).0.reshape([2, 4, 3, 8]);
    let burn =
        |v: Vec<Tensor<4>>| conv(&v).forward(v[0].clone()).reshape([2, 8, 12]).swap_dims(1, 2).reshape([2, 4, 3, 8]);
    let (a, ga) = run(&[images.clone(), weight.clone(), bias.clone()], &w, ours);
    let (b, gb) = run(&[images, weight, bias], &w, burn);
    assert!(max_diff(a, b) < 1e-5);
    for (name, (x, y)) in ["images", "weight", "bias"].iter().zip(ga.into_iter().zip(gb)) {
        let d = max_diff(x, y);
        assert!(d < 1e-4, "d{name} differs by {d}");
    }
}

/// The in-place EMA and the squared norm against composed ops; a teacher buffer that another
/// tensor shares is copied, not overwritten.
#[test]
fn ema_and_squared_norm_match_burn() {
    let device = Device::flex();
    let (teacher, student) = (random([300, 70], &device), random([300, 70], &device));
    let expected = teacher.clone() * 0.9 + student.clone() * 0.1;
    let before = teacher.clone().into_data();
    let kept = teacher.clone();
    let updated = dino_kernels::ema(teacher, student.clone(), 0.9);
    assert!(max_diff(updated, expected) < 1e-6);
    assert_eq!(kept.into_data(), before, "the EMA wrote into a buffer another tensor holds");

    let norm = dino_kernels::squared_norm(student.clone());
    let composed = student.square().sum().into_scalar::<f64>();
    assert!((norm - composed).abs() < 1e-5 * composed, "{norm} vs {composed}");
}

/// The DINO cross-entropy against the official formula in burn ops, value and student gradient.
#[test]
fn dino_cross_entropy_matches_burn() {
    let device = Device::flex().autodiff();
    let (views, b, k) = (5, 3, 300);
    let student = random([views * b, k], &device) * 2.0;
    let q = activation::softmax(random([2 * b, k], &Device::flex()) * 3.0, 1);
    let w = Tensor::<1>::ones([1], &device) * 1.7;
    let composed = |s: Vec<Tensor<2>>| {
        let log_p = activation::log_softmax(s[0].clone() / 0.1, 1);
        let mut total = Tensor::<1>::zeros([1], &device);
        for iq in 0..2 {
            let q = q.clone().narrow(0, iq * b, b).autodiff();
            for v in (0..views).filter(|&v| v != iq) {
                total = total + (q.clone() * log_p.clone().narrow(0, v * b, b)).sum().neg() / b as f64;
            }
        }
        total / (2 * views - 2) as f64
    };
    let fused = |s: Vec<Tensor<2>>| dino_kernels::dino_cross_entropy(s[0].clone(), q.clone(), views, 0.1);
    let (a, ga) = run(std::slice::from_ref(&student), &w, fused);
    let (e, ge) = run(&[student], &w, composed);
    assert!(max_diff(a, e) < 1e-5);
    let d = max_diff(ga[0].clone(), ge[0].clone());
    let scale: f32 = ge[0].clone().abs().max().into_scalar();
    assert!(d < 1e-5 * scale, "gradients differ by {d} (largest {scale})");
}

/// ResNet's convolutions (3x3 stride 1 and 2, 1x1 stride 2, the 7x7 stem) through the autodiff
/// glue: output and the gradients of input and weight equal burn's conv.
#[test]
fn conv2d_matches_burn() {
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    let device = Device::flex().autodiff();
    for (k, stride, pad, side) in [(3, 1, 1, 9), (3, 2, 1, 8), (1, 2, 0, 8), (7, 2, 3, 13)] {
        let x = random([3, 5, side, side + 2], &device);
        let weight = random([6, 5, k, k], &device) * 0.2;
        let out_h = (side + 2 * pad - k) / stride + 1;
        let out_w = (side + 2 + 2 * pad - k) / stride + 1;
        let w = random([3, 6, out_h, out_w], &device);
        let layer = |weight: Tensor<4>| {
            let mut conv = Conv2dConfig::new([5, 6], [k, k])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_bias(false)
                .init(&device);
            conv.weight = Param::from_tensor(weight);
            conv
        };
        let (ours, g1) = run(&[x.clone(), weight.clone()], &w, |v| conv2d(&layer(v[1].clone()), v[0].clone()));
        let (burn, g2) = run(&[x, weight], &w, |v| layer(v[1].clone()).forward(v[0].clone()));
        assert!(max_diff(ours, burn) < 1e-4, "kernel {k} stride {stride}: output");
        for (name, (a, b)) in ["x", "weight"].iter().zip(g1.into_iter().zip(g2)) {
            let d = max_diff(a, b);
            assert!(d < 1e-4, "kernel {k} stride {stride}: d{name} differs by {d}");
        }
    }
}

type Affine<const D: usize> = dyn Fn(Tensor<D>, Tensor<1>, Tensor<1>) -> Tensor<D>;

/// The output and the gradients of x, gamma and beta of Σ f(x, gamma, beta) · w.
fn bn_grads<const D: usize>(
    f: &Affine<D>,
    x: &Tensor<D>,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    w: &Tensor<D>,
) -> (Tensor<D>, Tensor<D>, Tensor<1>, Tensor<1>) {
    let (x, gamma, beta) = (x.clone().require_grad(), gamma.clone().require_grad(), beta.clone().require_grad());
    let out = f(x.clone(), gamma.clone(), beta.clone());
    let grads = (out.clone() * w.clone()).sum().backward();
    (out.inner(), x.grad(&grads).unwrap(), gamma.grad(&grads).unwrap(), beta.grad(&grads).unwrap())
}

/// Train mode (batch statistics, through which the gradient flows too) and eval mode (running
/// statistics), each with and without ReLU, on `[B, C, H, W]` and `[B, C]`: the outputs, the
/// statistics and the gradients of x, gamma and beta equal burn's batch_norm_train and
/// batch_norm followed by relu.
#[test]
fn batch_norm_matches_burn() {
    fn check<const D: usize>(shape: [usize; D]) {
        let device = Device::flex().autodiff();
        let c = shape[1];
        // An offset mean, as activations have, and non-trivial gamma, beta and running statistics.
        let x = random(shape, &device) * 2.0 + 0.5;
        let (gamma, beta) = (random([c], &device) + 1.0, random([c], &device));
        let (mean, var) = (random([c], &device) * 0.3, random([c], &device).abs() + 0.5);
        let w = random(shape, &device);
        let relu = |y: Tensor<D>, on: bool| if on { activation::relu(y) } else { y };
        for on in [false, true] {
            let ours: Box<Affine<D>> =
                Box::new(
                    move |x, g, b| {
                        if on { batch_norm_train_relu(x, g, b, 1e-5).0 } else { batch_norm_train(x, g, b, 1e-5).0 }
                    },
                );
            let theirs: Box<Affine<D>> =
                Box::new(move |x, g, b| relu(burn::tensor::module::batch_norm_train(x, g, b, 1e-5).output, on));
            let (m, v) = (mean.clone(), var.clone());
            let ours_eval: Box<Affine<D>> = Box::new(move |x, g, b| {
                let (m, v) = (m.clone(), v.clone());
                if on { batch_norm_eval_relu(x, g, b, m, v, 1e-5) } else { batch_norm_eval(x, g, b, m, v, 1e-5) }
            });
            let (m, v) = (mean.clone(), var.clone());
            let theirs_eval: Box<Affine<D>> = Box::new(move |x, g, b| {
                relu(burn::tensor::module::batch_norm(x, g, b, m.clone(), v.clone(), 1e-5), on)
            });
            for (mode, a, b) in [("train", &ours, &theirs), ("eval", &ours_eval, &theirs_eval)] {
                let (ya, dxa, dga, dba) = bn_grads(a.as_ref(), &x, &gamma, &beta, &w);
                let (yb, dxb, dgb, dbb) = bn_grads(b.as_ref(), &x, &gamma, &beta, &w);
                let at = format!("{mode} {shape:?} relu {on}");
                assert!(max_diff(ya, yb) < 1e-4, "{at}: output");
                assert!(max_diff(dxa, dxb) < 1e-4, "{at}: dx");
                assert!(max_diff(dga, dgb) < 1e-3 && max_diff(dba, dbb) < 1e-3, "{at}: dgamma, dbeta");
            }
        }
        let (_, stats) = batch_norm_train(x.clone(), gamma.clone(), beta.clone(), 1e-5);
        let burn = burn::tensor::module::batch_norm_train(x, gamma, beta, 1e-5);
        let expected = Tensor::stack::<2>(vec![burn.mean, burn.variance], 0).inner();
        assert!(max_diff(stats.inner(), expected) < 1e-5, "{shape:?}: statistics");
    }
    check([4, 6, 5, 7]);
    check([9, 20]);
}
