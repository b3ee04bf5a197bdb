//! Every public kernel function down its composed fallback, against its fused path. The
//! fallback is what every tensor that is not f32 on flex takes (every GPU backend); here it runs
//! on flex with f64 tensors, where `runs_fused` is false, on the same values as the fused f32
//! call. Forward values and the gradients of every input are compared.

use burn::module::{Param, ParamId};
use burn::nn::Linear;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::activation;
use burn::tensor::{DType, Device, Distribution, Tensor};
use dino_kernels::{
    AdamwScalars, adamw_step, gelu, layer_norm, linear, linear_add, linear_gelu, norm_attention_add, norm_mlp_add,
    self_attention,
};

fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

fn f32_of<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.cast(DType::F32)
}

/// Largest |a - b| relative to the largest |b| (at least 1).
fn rel_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    let (a, b) = (f32_of(a), f32_of(b));
    let scale: f32 = b.clone().abs().max().into_scalar();
    let d: f32 = (a - b).abs().max().into_scalar();
    d / scale.max(1.0)
}

/// `f` on f32 leaves (fused) and on the same values as f64 leaves (composed): the outputs and
/// the gradients of Σ out · w with respect to every leaf must agree to `tol`.
fn fused_matches_fallback<const D: usize, const O: usize>(
    name: &str,
    xs: &[Tensor<D>],
    w: &Tensor<O>,
    tol: f32,
    f: impl Fn(Vec<Tensor<D>>) -> Tensor<O>,
) {
    let run = |xs: Vec<Tensor<D>>, w: Tensor<O>| {
        let leaves: Vec<Tensor<D>> = xs.into_iter().map(|x| x.require_grad()).collect();
        let out = f(leaves.clone());
        let grads = (out.clone() * w).sum().backward();
        let g: Vec<Tensor<D>> = leaves.iter().map(|l| l.grad(&grads).expect("a gradient for every input")).collect();
        (out.inner(), g)
    };
    let (fused, g_fused) = run(xs.to_vec(), w.clone());
    let (composed, g_composed) =
        run(xs.iter().map(|x| x.clone().cast(DType::F64)).collect(), w.clone().cast(DType::F64));
    assert_eq!(composed.dtype(), DType::F64, "{name}: the fallback ran in f64");
    let d = rel_diff(fused, composed);
    assert!(d < tol, "{name}: outputs differ by {d}");
    for (i, (a, b)) in g_fused.into_iter().zip(g_composed).enumerate() {
        let d = rel_diff(a, b);
        assert!(d < tol, "{name}: gradients of input {i} differ by {d}");
    }
}

fn layer(v: &[Tensor<3>], k: usize, n: usize) -> Linear {
    Linear {
        weight: Param::initialized(ParamId::new(), v[1].clone().reshape([k, n])),
        bias: Some(Param::initialized(ParamId::new(), v[2].clone().reshape([n]))),
    }
}

#[test]
fn elementwise_norm_and_attention_fallbacks_match() {
    let device = Device::flex().autodiff();
    let x = random([3, 9, 24], &device) * 2.0;
    let w = random([3, 9, 24], &device);
    fused_matches_fallback("gelu", std::slice::from_ref(&x), &w, 1e-5, |v| gelu(v[0].clone()));
    let ln = [x.clone(), random([1, 1, 24], &device), random([1, 1, 24], &device)];
    fused_matches_fallback("layer_norm", &ln, &w, 1e-4, |v| {
        layer_norm(v[0].clone(), v[1].clone().reshape([24]), v[2].clone().reshape([24]), 1e-6)
    });
    let qkv = random([2, 7, 72], &device);
    let w_attn = random([2, 7, 24], &device);
    fused_matches_fallback("self_attention", &[qkv], &w_attn, 1e-5, |v| self_attention(v[0].clone(), 3));
    // x [2, 7, 24] -> qkv [.., 72] -> 3 heads [.., 24] -> proj back to 24, onto a residual.
    let block = [
        x.clone().narrow(0, 0, 2).narrow(1, 0, 7),
        random([1, 24, 72], &device) * 0.3,
        random([1, 1, 72], &device),
        random([1, 24, 24], &device) * 0.3,
        random([1, 1, 24], &device),
        random([1, 1, 24], &device) + 1.0,
        random([1, 1, 24], &device),
    ];
    fused_matches_fallback("norm_attention_add", &block, &w_attn, 1e-5, |v| {
        let layer = |i: usize| layer(&[v[0].clone(), v[i].clone(), v[i + 1].clone()], 24, v[i].dims()[2]);
        let norm = (v[5].clone().reshape([24]), v[6].clone().reshape([24]), 1e-6);
        norm_attention_add(norm, &layer(1), &layer(3), v[0].clone(), 3)
    });
}

#[test]
fn batch_norm_fallbacks_match() {
    let device = Device::flex().autodiff();
    let x = random([3, 5, 4, 4], &device) * 2.0 + 0.5;
    let w = random([3, 5, 4, 4], &device);
    let per_channel = |v: &Tensor<4>| v.clone().reshape([5]);
    let inputs = [x, random([1, 5, 1, 1], &device) + 1.0, random([1, 5, 1, 1], &device)];
    fused_matches_fallback("batch_norm_train", &inputs, &w, 1e-4, |v| {
        dino_kernels::batch_norm_train(v[0].clone(), per_channel(&v[1]), per_channel(&v[2]), 1e-5).0
    });
    fused_matches_fallback("batch_norm_train_relu", &inputs, &w, 1e-4, |v| {
        let (y, stats) =
            dino_kernels::batch_norm_train_relu(v[0].clone(), per_channel(&v[1]), per_channel(&v[2]), 1e-5);
        assert_eq!(stats.dims(), [2, 5]);
        y
    });
    let (mean, var) = (random([5], &device) * 0.3, random([5], &device).abs() + 0.5);
    fused_matches_fallback("batch_norm_eval_relu", &inputs, &w, 1e-4, |v| {
        let (m, var) = (mean.clone().cast(v[0].dtype()), var.clone().cast(v[0].dtype()));
        dino_kernels::batch_norm_eval_relu(v[0].clone(), per_channel(&v[1]), per_channel(&v[2]), m, var, 1e-5)
    });
}

#[test]
fn linear_fallbacks_match() {
    let device = Device::flex().autodiff();
    for tokens in [5, 700] {
        let inputs = [
            random([2, tokens, 16], &device),
            random([1, 16, 24], &device) * 0.3,
            random([1, 1, 24], &device),
            random([2, tokens, 24], &device),
        ];
        let w = random([2, tokens, 24], &device);
        fused_matches_fallback("linear", &inputs[..3], &w, 1e-5, |v| linear(&layer(&v, 16, 24), v[0].clone()));
        fused_matches_fallback("linear_gelu", &inputs[..3], &w, 1e-5, |v| {
            linear_gelu(&layer(&v, 16, 24), v[0].clone())
        });
        fused_matches_fallback("linear_add", &inputs, &w, 1e-5, |v| {
            linear_add(&layer(&v, 16, 24), v[0].clone(), v[3].clone())
        });
        // fc2 `[24, 16]` back to the input's width, after a LayerNorm of the input.
        let fc2 = [random([1, 24, 16], &device) * 0.3, random([1, 1, 16], &device)];
        let ln = [random([1, 1, 16], &device) + 1.0, random([1, 1, 16], &device)];
        let mlp_inputs = [&inputs[..3], &fc2, &ln].concat();
        fused_matches_fallback("norm_mlp_add", &mlp_inputs, &random([2, tokens, 16], &device), 1e-5, |v| {
            let fc2 = layer(&[v[0].clone(), v[3].clone(), v[4].clone()], 24, 16);
            let norm = (v[5].clone().reshape([16]), v[6].clone().reshape([16]), 1e-6);
            norm_mlp_add(norm, &layer(&v, 16, 24), &fc2, v[0].clone())
        });
    }
}

#[test]
fn head_and_patch_fallbacks_match() {
    let device = Device::flex().autodiff();
    let v = random([37, 16], &device);
    let g = random([37, 1], &device) + 2.0;
    fused_matches_fallback("weight_norm", &[v, g], &random([37, 16], &device), 1e-5, |x| {
        dino_kernels::weight_norm(x[0].clone(), x[1].clone())
    });
    let (x, w) = (random([12, 16], &device), random([37, 16], &device));
    fused_matches_fallback("linear_transposed", &[x, w], &random([12, 37], &device), 1e-5, |x| {
        dino_kernels::linear_transposed(x[0].clone(), x[1].clone())
    });

    let (views, b, k) = (4, 3, 50);
    let student = random([views * b, k], &device) * 2.0;
    let q = activation::softmax(random([2 * b, k], &Device::flex()) * 3.0, 1);
    fused_matches_fallback("dino_cross_entropy", &[student], &Tensor::ones([1], &device), 1e-5, |s| {
        let q = q.clone().cast(s[0].dtype());
        dino_kernels::dino_cross_entropy(s[0].clone(), q, views, 0.1)
    });

    let images = random([2, 3, 12, 8], &device);
    let conv = |v: &[Tensor<4>]| {
        let mut c: Conv2d = Conv2dConfig::new([3, 8], [4, 4]).with_stride([4, 4]).init(&device);
        c.weight = Param::initialized(ParamId::new(), v[1].clone().reshape([8, 3, 4, 4]));
        c.bias = Some(Param::initialized(ParamId::new(), v[2].clone().reshape([8])));
        c
    };
    let inputs = [images, random([8, 3, 4, 4], &device), random([1, 1, 1, 8], &device)];
    fused_matches_fallback("patch_embed", &inputs, &random([2, 1, 6, 8], &device), 1e-5, |v| {
        dino_kernels::patch_embed(&conv(&v), v[0].clone()).0.reshape([2, 1, 6, 8])
    });
}

/// The optimizer step and the EMA, which take no gradients: same values down both paths. The
/// AdamW step runs with a clipping coefficient: the fallback once ignored it, so on every GPU
/// backend `clip_grad` did nothing.
#[test]
fn optimizer_and_ema_fallbacks_match() {
    let device = Device::flex();
    let [p, g, m] = [random([40, 9], &device), random([40, 9], &device), random([40, 9], &device)];
    let v = random([40, 9], &device).abs();
    let s = AdamwScalars::new(5e-4, 0.04, (0.9, 0.999), 1e-8, 3).with_grad_scale(0.3);
    let fused = adamw_step(p.clone(), g.clone(), m.clone(), v.clone(), s);
    let [p64, g64, m64, v64] = [p, g, m, v].map(|t| t.cast(DType::F64));
    let composed = adamw_step(p64, g64, m64, v64, s);
    for (name, (a, b)) in ["p", "m", "v"].iter().zip(fused.into_iter().zip(composed)) {
        let d = rel_diff(a, b);
        assert!(d < 1e-6, "adamw_step {name} differs by {d}");
    }

    let (teacher, student) = (random([300, 7], &device), random([300, 7], &device));
    let fused = dino_kernels::ema(teacher.clone(), student.clone(), 0.99);
    let composed = dino_kernels::ema(teacher.cast(DType::F64), student.clone().cast(DType::F64), 0.99);
    assert!(rel_diff(fused, composed) < 1e-6);
    let (a, b) = (dino_kernels::squared_norm(student.clone()), dino_kernels::squared_norm(student.cast(DType::F64)));
    assert!((a - b).abs() < 1e-5 * b, "squared_norm {a} vs {b}");
}

/// The fused paths take only what they implement: a conv that is not a plain patch conv runs
/// as burn's (here with a stride of half the kernel, overlapping patches), and a LayerNorm whose
/// gamma does not match the input's last dimension is refused by name.
#[test]
fn fused_paths_check_what_they_replace() {
    let device = Device::flex();
    let images = random([1, 3, 12, 8], &device);
    let conv: Conv2d = Conv2dConfig::new([3, 5], [4, 4]).with_stride([2, 2]).init(&device);
    let (tokens, h, w) = dino_kernels::patch_embed(&conv, images.clone());
    let expected = conv.forward(images); // [1, 5, 5, 3]
    assert_eq!((h, w), (5, 3));
    let expected = expected.reshape([1, 5, 15]).swap_dims(1, 2);
    assert!(rel_diff(tokens, expected) < 1e-6);

    let x = random([2, 6], &device);
    let panic = std::panic::catch_unwind(|| {
        dino_kernels::layer_norm(x, Tensor::ones([5], &device), Tensor::zeros([5], &device), 1e-6)
    })
    .expect_err("a gamma of the wrong length must not run");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("layer_norm: input [2, 6] with gamma [5] and beta [5]"), "{message}");
}
