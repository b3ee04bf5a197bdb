//! Supervised fine-tuning of a pretrained backbone with a linear head (`dino finetune`): DeiT's
//! recipe (Touvron et al. 2021, the paper's Table 6 transfer runs), simplified for small data and
//! CPUs. Kept from DeiT: AdamW (lr 5e-4 per 512 images, weight decay 0.05 on weights only), a
//! cosine schedule per iteration with linear warm-up, label smoothing 0.1, stochastic depth 0.1,
//! random-resized crops and flips. Left out: RandAugment, mixup / cutmix, random erasing,
//! repeated augmentation and the EMA of the model (tuned for 300 ImageNet epochs). Added:
//! BEiT's optional layer-wise lr decay (each block's lr is `decay^(depth + 1 − layer)` of the
//! head's), which helps pretrained ViTs keep their early layers.

use std::collections::HashMap;
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use dino_data::{Dataset, EvalTransform, LinearTrainTransform};
use dino_eval::{ExtractOptions, FeatureSpec, dataset_features};
use dino_model::Classifier;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::optim::{Optimizer, OptimizerKind, StepParams};
use crate::schedule::cosine_schedule;
use crate::trainer::TrainError;

/// The recipe; defaults are DeiT's where it has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate for a batch of 512 (DeiT 5e-4); the rate used is lr x batch / 512.
    pub lr: f64,
    /// Where the cosine ends (DeiT 1e-5; ours the DINO default 1e-6).
    pub min_lr: f64,
    /// Linear warm-up from 0, in epochs (DeiT 5 of 300; ours 1).
    pub warmup_epochs: usize,
    /// AdamW's decoupled weight decay, on weights only (DeiT 0.05).
    pub weight_decay: f64,
    /// Label smoothing of the cross-entropy (DeiT 0.1).
    pub label_smoothing: f64,
    /// Stochastic depth of the backbone's last block, linear from 0 (DeiT 0.1; ViTs only).
    pub drop_path: f64,
    /// Layer-wise lr decay (BEiT, MAE: 0.65-0.75); `None` gives every layer the same lr.
    pub layer_decay: Option<f64>,
    /// Share of the image area a training crop covers (torchvision's 0.08-1).
    pub crop_scale: (f64, f64),
    /// Side of the training crops and test images.
    pub size: u32,
    /// Per-parameter gradient clipping, 0 = none (DeiT none).
    pub clip_grad: f64,
    /// Seed of the head, the order, the augmentation and the stochastic depth.
    pub seed: u64,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 64,
            lr: 5e-4,
            min_lr: 1e-6,
            warmup_epochs: 1,
            weight_decay: 0.05,
            label_smoothing: 0.1,
            drop_path: 0.1,
            layer_decay: None,
            crop_scale: (0.08, 1.0),
            size: 224,
            clip_grad: 0.0,
            seed: 0,
        }
    }
}

impl FinetuneConfig {
    /// The problem with the settings, if any, in one line.
    pub fn validate(&self) -> Result<(), String> {
        let (lo, hi) = self.crop_scale;
        let problem = if self.epochs == 0 || self.batch_size == 0 || self.size == 0 {
            "epochs, batch size and size must be at least 1".to_string()
        } else if !(self.lr > 0.0 && self.lr.is_finite()) || self.min_lr < 0.0 {
            format!("lr must be positive and min_lr not negative (lr {}, min_lr {})", self.lr, self.min_lr)
        } else if !(0.0..1.0).contains(&self.label_smoothing) {
            format!("label smoothing {} is outside [0, 1)", self.label_smoothing)
        } else if !(0.0..1.0).contains(&self.drop_path) {
            format!("drop path {} is outside [0, 1)", self.drop_path)
        } else if self.layer_decay.is_some_and(|d| !(d > 0.0 && d <= 1.0)) {
            format!("layer decay {} is outside (0, 1]", self.layer_decay.unwrap_or_default())
        } else if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            format!("crop scale {lo} {hi} is not a range within (0, 1]")
        } else if self.warmup_epochs > self.epochs {
            format!("{} warm-up epochs in a run of {}", self.warmup_epochs, self.epochs)
        } else {
            return Ok(());
        };
        Err(problem)
    }

    /// The learning rate used at the peak: lr x batch / 512 (DeiT's linear scaling).
    pub fn scaled_lr(&self) -> f64 {
        self.lr * self.batch_size as f64 / 512.0
    }
}

/// What an epoch reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FinetuneEpoch {
    pub epoch: usize,
    /// The learning rate of the epoch's last iteration.
    pub lr: f64,
    pub train_loss: f64,
    pub test_top1: f64,
    /// Best test top-1 so far; the checkpoint of that epoch is the one kept.
    pub best_top1: f64,
    /// Wall time since the start, test included.
    pub minutes: f64,
}

/// Progress of a fine-tuning run.
#[derive(Debug, Clone, Copy)]
pub enum FinetuneProgress {
    /// `done` of `total` training images of an epoch.
    Batch { epoch: usize, done: usize, total: usize, loss: f64 },
    /// An epoch ended (after its test).
    Epoch(FinetuneEpoch),
}

/// The cross-entropy of `logits` `[B, C]` against `labels` smoothed by `smoothing` (PyTorch's
/// `CrossEntropyLoss(label_smoothing=ε)`: targets `(1 − ε)·onehot + ε/C`), averaged over the
/// batch.
pub fn smoothed_cross_entropy(logits: Tensor<2>, labels: &[u32], smoothing: f64) -> Tensor<1> {
    let [b, classes] = logits.dims();
    let device = logits.device();
    let targets = Tensor::<1, Int>::from_data(
        TensorData::new(labels.iter().map(|&l| l as i64).collect(), [labels.len()]),
        &device,
    )
    .one_hot::<2>(classes)
    .float()
        * (1.0 - smoothing)
        + smoothing / classes as f64;
    -(log_softmax(logits, 1) * targets).sum() / b as f64
}

/// The lr multiplier of every parameter under layer-wise decay `decay`: a ViT's embeddings
/// (`cls_token`, `pos_embed`, `patch_embed`) are layer 0, block i is layer i + 1, the final norm
/// and the head layer depth + 1; a ResNet's stem is layer 0, `layerK` layer K, the head 5. A
/// parameter of layer l gets `decay^(top − l)`.
pub fn layer_decay_scales(model: &Classifier, decay: f64) -> HashMap<ParamId, f64> {
    struct Layers {
        path: Vec<String>,
        found: Vec<(ParamId, Vec<String>)>,
    }
    impl ModuleVisitor for Layers {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.found.push((param.id, self.path.clone()));
        }
    }
    let mut layers = Layers { path: Vec::new(), found: Vec::new() };
    model.visit(&mut layers);
    let top = match model.backbone.as_vit() {
        Some(vit) => vit.blocks.len() + 1,
        None => 5,
    };
    let layer = |path: &[String]| -> usize {
        if path.first().is_some_and(|p| p == "head") {
            return top;
        }
        for (i, part) in path.iter().enumerate() {
            if part == "blocks" {
                return path.get(i + 1).and_then(|n| n.parse::<usize>().ok()).map_or(top, |b| b + 1);
            }
            if let Some(k) = part.strip_prefix("layer").and_then(|k| k.parse::<usize>().ok()) {
                return k;
            }
            if part == "norm" {
                return top;
            }
        }
        0
    };
    layers.found.into_iter().map(|(id, path)| (id, decay.powi((top - layer(&path)) as i32))).collect()
}

/// Fine-tunes `model` (on the autodiff twin of `device`) on `train` and tests it on `test` (its
/// images and their transform) after every epoch: top-1 over the test images that decode.
/// `on_best` receives the network of each new best epoch (to save it); `progress` hears every
/// batch and epoch. Returns the last network and the epochs.
pub fn finetune(
    model: Classifier,
    config: &FinetuneConfig,
    train: &Dataset,
    (test, test_transform): (&Dataset, &EvalTransform),
    device: &Device,
    mut on_best: impl FnMut(&Classifier, &FinetuneEpoch) -> Result<(), TrainError>,
    mut progress: impl FnMut(FinetuneProgress),
) -> Result<(Classifier, Vec<FinetuneEpoch>), TrainError> {
    config.validate().map_err(TrainError::Config)?;
    let (train_labels, test_labels) = match (train.labels(), test.labels()) {
        (Some(a), Some(b)) => (a.to_vec(), b.to_vec()),
        _ => return Err(TrainError::Config("fine-tuning needs labeled training and test data".into())),
    };
    let classes = model.classes();
    if let Some(&bad) = train_labels.iter().chain(&test_labels).find(|&&l| l as usize >= classes) {
        return Err(TrainError::Config(format!("label {bad} is past the head's {classes} classes")));
    }
    let per_epoch = train.len().div_ceil(config.batch_size);
    let lrs = cosine_schedule(config.scaled_lr(), config.min_lr, config.epochs, per_epoch, config.warmup_epochs, 0.0);
    let mut optimizer = Optimizer::new(OptimizerKind::Adamw);
    if let Some(decay) = config.layer_decay {
        optimizer = optimizer.with_lr_scales(layer_decay_scales(&model, decay));
    }
    let transform = LinearTrainTransform { size: config.size, scale: config.crop_scale };
    let s = config.size as usize;
    let train_device = device.clone().autodiff();
    let mut model = model;
    let start = Instant::now();
    let mut history: Vec<FinetuneEpoch> = Vec::with_capacity(config.epochs);
    for epoch in 0..config.epochs {
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(config.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        let (mut loss_sum, mut seen, mut lr) = (0.0, 0, 0.0);
        for (i, batch) in order.chunks(config.batch_size).enumerate() {
            lr = lrs[epoch * per_epoch + i];
            let (pixels, used) = transform.views(train, batch, config.seed, epoch)?;
            let images = Tensor::<4>::from_data(TensorData::new(pixels, [batch.len(), 3, s, s]), &train_device);
            let labels: Vec<u32> = used.iter().map(|&j| train_labels[j]).collect();
            let loss = smoothed_cross_entropy(model.forward(images), &labels, config.label_smoothing);
            let value = loss.clone().into_scalar::<f64>();
            if !value.is_finite() {
                return Err(TrainError::Config(format!(
                    "the loss became {value} in epoch {} (lr {lr:.2e}); lower --lr",
                    epoch + 1
                )));
            }
            let params = StepParams {
                lr,
                weight_decay: config.weight_decay,
                clip_grad: config.clip_grad,
                freeze_last_layer: false,
            };
            model = optimizer.step(model, loss.backward(), &params).0;
            loss_sum += value * batch.len() as f64;
            seen += batch.len();
            progress(FinetuneProgress::Batch { epoch, done: seen, total: train.len(), loss: value });
        }
        let evaluated = model.valid();
        let test_top1 = top1(&evaluated, test, &test_labels, test_transform, config.batch_size, device)?;
        let best_top1 = history.iter().map(|e| e.best_top1).fold(test_top1, f64::max);
        let result = FinetuneEpoch {
            epoch,
            lr,
            train_loss: loss_sum / seen.max(1) as f64,
            test_top1,
            best_top1,
            minutes: start.elapsed().as_secs_f64() / 60.0,
        };
        if history.last().is_none_or(|e| test_top1 > e.best_top1) {
            on_best(&evaluated, &result)?;
        }
        history.push(result);
        progress(FinetuneProgress::Epoch(result));
    }
    Ok((model, history))
}

/// Top-1 accuracy (%) of `model` on the images of `data` that decode.
pub fn top1(
    model: &Classifier,
    data: &Dataset,
    labels: &[u32],
    transform: &EvalTransform,
    batch_size: usize,
    device: &Device,
) -> Result<f64, TrainError> {
    let options =
        ExtractOptions { transform: *transform, features: FeatureSpec::default(), l2_norm: false, batch_size };
    let features = dataset_features(&model.backbone, data, data.len(), &options, device, |_| {})?;
    let rows = features.index.len();
    let dim = model.backbone.embed_dim();
    let x = Tensor::<2>::from_data(TensorData::new(features.features.values, [rows, dim]), device);
    let predicted = model.head.forward(x).argmax(1).into_data().iter::<i64>().collect::<Vec<_>>();
    let correct = predicted.iter().zip(&features.index).filter(|(p, i)| **p == labels[**i] as i64).count();
    Ok(100.0 * correct as f64 / rows.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dino_model::{Backbone, BackboneConfig, VitConfig};

    #[test]
    fn smoothing_moves_mass_to_every_class() {
        let device = Device::flex();
        let logits = Tensor::<2>::from_data(TensorData::new(vec![2.0f32, 0.0, -1.0, 0.5, 0.5, 0.5], [2, 3]), &device);
        let loss = |eps: f64| smoothed_cross_entropy(logits.clone(), &[0, 2], eps).into_scalar::<f64>();
        // Row 0: log-softmax of (2, 0, -1); row 1: ln(1/3) everywhere.
        let z = (2f64.exp() + 1.0 + (-1f64).exp()).ln();
        let row0 = [2.0 - z, -z, -1.0 - z];
        let plain = (-row0[0] + 3f64.ln()) / 2.0;
        assert!((loss(0.0) - plain).abs() < 1e-6, "{} vs {plain}", loss(0.0));
        let eps = 0.1;
        let smooth0 = -(1.0 - eps) * row0[0] - eps / 3.0 * row0.iter().sum::<f64>();
        let expect = (smooth0 + 3f64.ln()) / 2.0;
        assert!((loss(eps) - expect).abs() < 1e-6, "{} vs {expect}", loss(eps));
    }

    #[test]
    fn layer_decay_scales_blocks_by_depth() {
        let device = Device::flex();
        let config = VitConfig::new(8, 2, 2).with_patch_size(4).with_img_size(8);
        let model = Classifier::new(Backbone::new(&BackboneConfig::Vit(config), &device), 3, &device);
        let scales = layer_decay_scales(&model, 0.5);
        let vit = model.backbone.as_vit().unwrap();
        // top = depth + 1 = 3.
        assert_eq!(scales[&vit.cls_token.id], 0.125);
        assert_eq!(scales[&vit.patch_embed.proj.weight.id], 0.125);
        assert_eq!(scales[&vit.blocks[0].attn.qkv.weight.id], 0.25);
        assert_eq!(scales[&vit.blocks[1].mlp.fc2.weight.id], 0.5);
        assert_eq!(scales[&vit.norm.gamma.id], 1.0);
        assert_eq!(scales[&model.head.weight.id], 1.0);
    }

    #[test]
    fn settings_are_checked() {
        assert!(FinetuneConfig::default().validate().is_ok());
        let bad = FinetuneConfig { layer_decay: Some(1.5), ..Default::default() };
        assert_eq!(bad.validate().unwrap_err(), "layer decay 1.5 is outside (0, 1]");
        let bad = FinetuneConfig { crop_scale: (0.5, 0.2), ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("crop scale 0.5 0.2"));
    }
}
