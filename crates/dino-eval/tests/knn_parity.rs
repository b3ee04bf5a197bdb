//! The weighted k-NN classifier reproduces the official `knn_classifier` on the fixture.

use burn::tensor::Device;
use dino_eval::knn_classify;
use dino_fixtures::*;

#[test]
fn knn_matches_the_official_classifier() {
    let io = read_fixture("knn_io.safetensors");
    let f32s = |k: &str| io[k].iter::<f32>().collect::<Vec<_>>();
    let labels = |k: &str| io[k].iter::<i64>().map(|l| l as u32).collect::<Vec<_>>();
    let dim = io["train_features"].shape()[1];
    let mut ks: Vec<usize> =
        io.keys().filter_map(|k| k.strip_prefix('k')?.strip_suffix(".top1")?.parse().ok()).collect();
    ks.sort();
    assert!(!ks.is_empty());
    let results = knn_classify(
        &f32s("train_features"),
        &labels("train_labels"),
        &f32s("test_features"),
        &labels("test_labels"),
        dim,
        &ks,
        0.07,
        &Device::flex(),
    );
    for r in results {
        let (top1, top5) = (to_f64(&io[&format!("k{}.top1", r.k)])[0], to_f64(&io[&format!("k{}.top5", r.k)])[0]);
        println!("k={}: top1 {} (official {top1}), top5 {} (official {top5})", r.k, r.top1, r.top5);
        assert!((r.top1 - top1).abs() < 1e-4 && (r.top5 - top5).abs() < 1e-4, "k = {}", r.k);
    }
}
