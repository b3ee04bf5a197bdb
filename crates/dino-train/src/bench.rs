//! `dino bench`'s presets and the speed of the training step, measured exactly as
//! `shared/bench/torch_reference.py` measures PyTorch, so the two print comparable numbers: the
//! same presets, random crops, two warm-up steps, then the median (`dino_eval::bench` times
//! inference, `dino_data::bench` the augmentation).

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use dino_data::MultiCropConfig;
use dino_eval::bench::median_seconds;
use dino_model::DinoModel;

use crate::config::TrainConfig;
use crate::loss::DinoLoss;
use crate::optim::{Optimizer, StepParams};
use crate::precision::{LossScaler, Precision};
use crate::step::{IterationParams, TrainState, train_step_in};

/// A benchmark setting: backbone, head, crops and batch, as `PRESETS` of the reference script
/// (and printed with its field names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BenchPreset {
    pub preset: &'static str,
    #[serde(flatten)]
    pub net: BenchNet,
    pub global_px: usize,
    pub local_px: usize,
    pub n_local: usize,
    pub out_dim: usize,
    pub batch: usize,
}

/// The backbone of a benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum BenchNet {
    /// `vit_tiny`'s layout with these widths.
    Vit { dim: usize, depth: usize, heads: usize, patch: usize },
    /// A ResNet preset (an `--arch` name) and its feature width.
    ResNet { arch: &'static str, dim: usize },
}

/// The reference script's presets, field for field.
pub const BENCH_PRESETS: [BenchPreset; 4] = [
    BenchPreset {
        preset: "small28",
        net: BenchNet::Vit { dim: 192, depth: 6, heads: 3, patch: 4 },
        global_px: 28,
        local_px: 12,
        n_local: 4,
        out_dim: 4096,
        batch: 64,
    },
    BenchPreset {
        preset: "tiny32",
        net: BenchNet::Vit { dim: 192, depth: 12, heads: 3, patch: 4 },
        global_px: 32,
        local_px: 16,
        n_local: 6,
        out_dim: 8192,
        batch: 32,
    },
    BenchPreset {
        preset: "official_s16",
        net: BenchNet::Vit { dim: 384, depth: 12, heads: 6, patch: 16 },
        global_px: 224,
        local_px: 96,
        n_local: 8,
        out_dim: 65536,
        batch: 4,
    },
    // torchvision resnet18 with the CIFAR stem; BatchNorm in train mode in both networks.
    BenchPreset {
        preset: "resnet18_32",
        net: BenchNet::ResNet { arch: "resnet18_cifar", dim: 512 },
        global_px: 32,
        local_px: 16,
        n_local: 4,
        out_dim: 4096,
        batch: 64,
    },
];

impl BenchPreset {
    pub fn find(name: &str) -> Option<Self> {
        BENCH_PRESETS.iter().copied().find(|p| p.preset == name)
    }

    /// The training config with this network and these crops (the reference has no drop path;
    /// its head is the official one: hidden 2048, bottleneck 256, frozen weight norm).
    pub fn train_config(&self) -> TrainConfig {
        let config = TrainConfig {
            img_size: self.global_px,
            out_dim: self.out_dim,
            drop_path_rate: 0.0,
            batch_size: self.batch,
            crops: MultiCropConfig {
                global_size: self.global_px as u32,
                local_size: self.local_px as u32,
                local_crops: self.n_local,
                ..MultiCropConfig::default()
            },
            ..TrainConfig::default()
        };
        match self.net {
            BenchNet::Vit { dim, depth, heads, patch } => TrainConfig {
                arch: "vit_tiny".into(),
                embed_dim: dim,
                depth,
                num_heads: heads,
                patch_size: patch,
                ..config
            },
            BenchNet::ResNet { arch, .. } => TrainConfig { arch: arch.into(), ..config },
        }
    }
}

/// The training-step measurement (`bench_train` of the reference).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct TrainTiming {
    pub step_ms_median: f64,
    pub train_img_per_s: f64,
    pub steps: usize,
}

/// Runs `steps + 2` full training steps of `config` (its network, head, crops, batch and
/// optimizer) in `precision` on fixed random crops (teacher on the globals, student on all crops
/// grouped by resolution, loss, backward, clipping, the update, EMA, center) and times the last
/// `steps`. `config`'s sizes must be resolved (a preset's, or a run's `config.toml`).
pub fn bench_train(config: &TrainConfig, steps: usize, precision: Precision, device: &Device) -> TrainTiming {
    let model = config.model_config().expect("bench configs are valid");
    let train_device = device.clone().autodiff();
    dino_model::init::seed(0);
    let student = DinoModel::new(&model, &train_device);
    let state = TrainState {
        teacher: student.valid(),
        student,
        loss: DinoLoss::new(config.out_dim, config.crops.num_crops(), device),
        optimizer: Optimizer::new(config.optimizer),
    }
    .train_mode();
    let batch = config.batch_size;
    let crop = |s: u32| Tensor::<4>::random([batch, 3, s as usize, s as usize], Distribution::Normal(0.0, 1.0), device);
    let crops: Vec<Tensor<4>> = (0..2)
        .map(|_| crop(config.crops.global_size))
        .chain((0..config.crops.local_crops).map(|_| crop(config.crops.local_size)))
        .collect();
    let params = IterationParams {
        step: StepParams { lr: 1e-4, weight_decay: 0.04, clip_grad: 3.0, freeze_last_layer: false },
        momentum: 0.996,
        teacher_temp: 0.04,
    };
    let mut state = Some(state);
    let mut scaler = LossScaler::default();
    let med = median_seconds(steps, || {
        // Random inputs give a finite loss; the step reads it back, which waits for the work.
        let (next, _) = train_step_in(precision, state.take().expect("a state"), &crops, &params, &mut scaler)
            .expect("finite loss on random crops");
        state = Some(next);
    });
    TrainTiming { step_ms_median: med * 1e3, train_img_per_s: batch as f64 / med, steps }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_build_valid_configs() {
        for preset in BENCH_PRESETS {
            let config = preset.train_config();
            config.validate().unwrap();
            let model = config.model_config().unwrap();
            match (preset.net, model.backbone.vit()) {
                (BenchNet::Vit { dim, depth, heads, patch }, Some(vit)) => {
                    assert_eq!((vit.embed_dim, vit.depth, vit.num_heads, vit.patch_size), (dim, depth, heads, patch));
                }
                (BenchNet::ResNet { arch, dim }, None) => {
                    assert_eq!((model.backbone.arch_name(), model.backbone.embed_dim()), (arch.to_string(), dim));
                }
                (net, _) => panic!("{net:?} built {:?}", model.backbone),
            }
            assert_eq!(config.crops.num_crops(), 2 + preset.n_local);
        }
        assert_eq!(BenchPreset::find("tiny32").unwrap().batch, 32);
        assert!(BenchPreset::find("huge").is_none());
    }
}
