//! A network and crops small enough for whole training runs in a test.

use dino_data::MultiCropConfig;
use dino_train::TrainConfig;

/// vit_tiny widths, one block, 16 px global and 8 px local crops, K = 32.
pub fn tiny_config(epochs: usize) -> TrainConfig {
    TrainConfig {
        arch: "vit_tiny".into(),
        patch_size: 8,
        depth: 1,
        img_size: 16,
        out_dim: 32,
        head_hidden_dim: 32,
        head_bottleneck_dim: 16,
        batch_size: 8,
        epochs,
        warmup_epochs: 1,
        max_images: 24,
        knn_every: 1,
        knn_train_images: 24,
        knn_test_images: 16,
        crops: MultiCropConfig { global_size: 16, local_size: 8, local_crops: 1, ..MultiCropConfig::default() },
        ..TrainConfig::default()
    }
}
