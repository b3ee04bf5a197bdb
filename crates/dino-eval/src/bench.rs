//! The speed of inference (the `bench_infer` of `shared/bench/torch_reference.py`), and the
//! timing rule every `dino bench` measurement uses.

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use dino_model::{DinoModel, ModelConfig};

/// The inference measurement (`bench_infer` of the reference).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct InferTiming {
    pub infer_batch: usize,
    pub infer_img_per_s: f64,
}

/// Runs `f` `steps + 2` times and returns the median seconds of the last `steps` (the first two
/// warm caches and allocators up). `f` must wait for its work (read a value back).
pub fn median_seconds(steps: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..steps + 2)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64()
        })
        .skip(2)
        .collect();
    times.sort_by(f64::total_cmp);
    let n = times.len();
    if n % 2 == 1 { times[n / 2] } else { 0.5 * (times[n / 2 - 1] + times[n / 2]) }
}

/// Backbone forward (final-normed CLS) of a freshly initialised `model` on a batch of
/// max(batch, 16) random `side`-pixel images, timed as `median_seconds`.
pub fn bench_infer(model: &ModelConfig, batch: usize, side: usize, steps: usize, device: &Device) -> InferTiming {
    dino_model::init::seed(0);
    let backbone = dino_model::batch_norm::eval_mode(DinoModel::new(model, device).backbone);
    let bs = batch.max(16);
    let x = Tensor::<4>::random([bs, 3, side, side], Distribution::Normal(0.0, 1.0), device);
    let seconds = median_seconds(steps, || {
        let _ = backbone.forward(x.clone()).sum().into_scalar::<f32>();
    });
    InferTiming { infer_batch: bs, infer_img_per_s: bs as f64 / seconds }
}
