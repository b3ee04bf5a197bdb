//! `bench_train` and `dino_eval::bench::bench_infer` on a tiny preset (own test binary: the
//! backend RNG is global).

use burn::tensor::Device;
use dino_eval::bench::bench_infer;
use dino_train::bench::{BenchNet, BenchPreset, bench_train};

#[test]
fn a_small_measurement_reports_positive_rates() {
    let preset = BenchPreset {
        preset: "test",
        net: BenchNet::Vit { dim: 32, depth: 1, heads: 2, patch: 4 },
        global_px: 8,
        local_px: 4,
        n_local: 1,
        out_dim: 16,
        batch: 2,
    };
    let device = Device::flex();
    let train = bench_train(&preset.train_config(), 2, dino_train::Precision::F32, &device);
    assert!(train.step_ms_median > 0.0 && train.train_img_per_s > 0.0 && train.steps == 2);
    let model = preset.train_config().model_config().unwrap();
    let infer = bench_infer(&model, preset.batch, preset.global_px, 2, &device);
    assert_eq!(infer.infer_batch, 16);
    assert!(infer.infer_img_per_s > 0.0);
}
