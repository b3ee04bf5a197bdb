//! Times `conv2d` forward, and forward + both gradients, on the 3x3 convolutions of
//! resnet18_cifar at 32 px, batch 64 (the `resnet18_32` bench's global crops), in GFLOP/s:
//! `cargo run --release -p dino-kernels --example conv_bench [threads]`.

use std::time::Instant;

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::tensor::{Device, Distribution, Tensor};
use dino_kernels::conv2d;

/// Best seconds of 5 rounds of 3 runs (this machine's speed drifts within seconds).
fn best(mut f: impl FnMut()) -> f64 {
    f();
    (0..5)
        .map(|_| {
            let started = Instant::now();
            (0..3).for_each(|_| f());
            started.elapsed().as_secs_f64() / 3.0
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let threads = std::env::args().nth(1).and_then(|t| t.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("a thread pool");
    let batch = 64;
    println!("{:<32} {:>9} {:>9} {:>10} {:>9}", "conv (batch 64)", "fwd ms", "GFLOP/s", "f+b ms", "GFLOP/s");
    for (c, o, px, stride) in [(64, 64, 32, 1), (64, 128, 32, 2), (128, 128, 16, 1), (256, 256, 8, 1), (512, 512, 4, 1)]
    {
        let device = Device::flex();
        let conv = Conv2dConfig::new([c, o], [3, 3])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .with_bias(false)
            .init(&device);
        let x = Tensor::<4>::random([batch, c, px, px], Distribution::Normal(0.0, 1.0), &device);
        let out = px / stride;
        let flop = 2.0 * (batch * o * out * out * c * 9) as f64;
        let forward = best(|| drop(conv2d(&conv, x.clone()).into_data()));
        let ad = Device::flex().autodiff();
        let conv_ad = Conv2dConfig::new([c, o], [3, 3])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .with_bias(false)
            .init(&ad);
        let xa = x.clone().autodiff().require_grad();
        let both = best(|| {
            let grads = conv2d(&conv_ad, xa.clone()).sum().backward();
            drop(conv_ad.weight.grad(&grads).unwrap().into_data());
            drop(xa.grad(&grads).unwrap().into_data());
        });
        println!(
            "{:<32} {:>9.2} {:>9.1} {:>10.2} {:>9.1}",
            format!("{c}->{o} 3x3 s{stride} at {px}x{px}"),
            forward * 1e3,
            flop / forward / 1e9,
            both * 1e3,
            3.0 * flop / both / 1e9
        );
    }
}
