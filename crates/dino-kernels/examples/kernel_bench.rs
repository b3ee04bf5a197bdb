//! Times each fused kernel alone on the small28 training shapes (one block, global crops):
//! `cargo run --release -p dino-kernels --example kernel_bench [threads]`.

use std::time::Instant;

use burn::module::{Param, ParamId};
use burn::nn::Linear;
use burn::tensor::{Device, Distribution, Tensor};
use dino_kernels::{gelu, layer_norm, linear, linear_add, linear_gelu, self_attention};

fn time(name: &str, elements: usize, mut f: impl FnMut()) {
    f();
    // The best of 10 rounds of 5 runs: this machine's speed drifts within seconds.
    let mut s = f64::MAX;
    for _ in 0..10 {
        let started = Instant::now();
        for _ in 0..5 {
            f();
        }
        s = s.min(started.elapsed().as_secs_f64() / 5.0);
    }
    println!("{name:<28} {:>8.3} ms  {:>7.2} ns/element", s * 1e3, s * 1e9 / elements as f64);
}

fn main() {
    let threads = std::env::args().nth(1).and_then(|t| t.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("a thread pool");
    let device = Device::flex();
    let (rows, d) = (128 * 50, 192);
    let x = Tensor::<2>::random([rows, d], Distribution::Normal(0.0, 1.0), &device);
    let h = Tensor::<2>::random([rows, 4 * d], Distribution::Normal(0.0, 1.0), &device);
    let qkv = Tensor::<3>::random([128, 50, 3 * d], Distribution::Normal(0.0, 1.0), &device);
    let layer = |i: usize, o: usize| Linear {
        weight: Param::initialized(ParamId::new(), Tensor::random([i, o], Distribution::Normal(0.0, 0.02), &device)),
        bias: Some(Param::initialized(ParamId::new(), Tensor::zeros([o], &device))),
    };
    let (fc1, fc2) = (layer(d, 4 * d), layer(4 * d, d));
    let (g, b) = (Tensor::<1>::ones([d], &device), Tensor::<1>::zeros([d], &device));
    time("gelu [6400, 768]", rows * 4 * d, || drop(gelu(h.clone())));
    time("burn gelu [6400, 768]", rows * 4 * d, || drop(burn::tensor::activation::gelu(h.clone())));
    time("layer_norm [6400, 192]", rows * d, || drop(layer_norm(x.clone(), g.clone(), b.clone(), 1e-6)));
    time("fc1 192->768 [6400]", rows * 4 * d, || drop(linear(&fc1, x.clone())));
    time("fc2 768->192 [6400]", rows * d, || drop(linear(&fc2, h.clone())));
    time("fc1 + gelu fused [6400]", rows * 4 * d, || drop(linear_gelu(&fc1, x.clone())));
    time("fc2 + residual fused [6400]", rows * d, || drop(linear_add(&fc2, h.clone(), x.clone())));
    time("burn fc1 192->768 [6400]", rows * 4 * d, || drop(fc1.forward(x.clone())));
    time("attention 128x50, 3 heads", rows * d, || drop(self_attention(qkv.clone(), 3)));
    let ad = Device::flex().autodiff();
    let ha = h.clone().autodiff().require_grad();
    let ones = Tensor::<2>::ones([rows, 4 * d], &ad);
    time("gelu fwd+bwd (autodiff)", rows * 4 * d, || {
        let g = (gelu(ha.clone()) * ones.clone()).sum().backward();
        drop(ha.grad(&g).unwrap())
    });
    let param = |t: Tensor<2>| Param::initialized(ParamId::new(), t.autodiff().require_grad());
    let fc1a = Linear {
        weight: param(fc1.weight.val()),
        bias: Some(Param::initialized(ParamId::new(), Tensor::zeros([4 * d], &ad).require_grad())),
    };
    let xa = x.clone().autodiff().require_grad();
    let onesa = Tensor::<2>::ones([rows, 4 * d], &ad);
    time("fc1 fwd+bwd (autodiff)", rows * 4 * d, || {
        let g = (linear(&fc1a, xa.clone()) * onesa.clone()).sum().backward();
        drop(fc1a.weight.val().grad(&g).unwrap())
    });
    time("mul+sum fwd+bwd (autodiff)", rows * 4 * d, || {
        let g = (ha.clone() * ones.clone()).sum().backward();
        drop(ha.grad(&g).unwrap())
    });
    time("add [6400, 768]", rows * 4 * d, || drop(h.clone() + h.clone()));
}
