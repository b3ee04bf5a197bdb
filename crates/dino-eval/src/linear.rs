//! Linear probe on frozen features, the official `eval_linear.py` protocol: a linear layer
//! (weights N(0, 0.01), bias 0) trained with SGD (momentum 0.9, no weight decay, lr scaled by
//! batch / 256, cosine-annealed per epoch to 0) and cross-entropy on the features of
//! random-resized-crop + flip views; evaluated each epoch on resize / center-crop features.
//!
//! The backbone is frozen, so the layer's gradient is written out in closed form instead of
//! going through autodiff: for logits `z = x Wᵀ + b` and `g = (softmax(z) - onehot(y)) / B`,
//! `dW = gᵀ x` and `db = Σ_rows g`.

use std::path::Path;

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use dino_data::{Dataset, LinearTrainTransform};
use dino_model::{Backbone, init};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::EvalError;
use crate::features::FeatureSpec;

/// Settings of a linear evaluation. Defaults are `eval_linear.py`'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearConfig {
    /// `--epochs` (official 100).
    pub epochs: usize,
    /// `--lr` for a batch of 256 (official 0.001); the rate used is lr x batch / 256.
    pub lr: f64,
    /// `--batch_size_per_gpu` (official 128).
    pub batch_size: usize,
    /// SGD momentum (official 0.9).
    pub momentum: f64,
    /// Which tokens make the feature (official `--n_last_blocks 4`, no average pooling).
    pub features: FeatureSpec,
    /// Seed of the initialisation, the order and the augmentation.
    pub seed: u64,
}

impl Default for LinearConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            lr: 0.001,
            batch_size: 128,
            momentum: 0.9,
            features: FeatureSpec { n_last_blocks: 4, avgpool: false },
            seed: 0,
        }
    }
}

impl LinearConfig {
    /// The learning rate of epoch `epoch` (0-based): `CosineAnnealingLR(epochs, eta_min=0)`
    /// stepped once per epoch, from lr x batch / 256.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        let base = self.lr * self.batch_size as f64 / 256.0;
        0.5 * base * (1.0 + (std::f64::consts::PI * epoch as f64 / self.epochs as f64).cos())
    }
}

/// `LinearClassifier` of `eval_linear.py`, with its parameter names `linear.weight` / `linear.bias`.
#[derive(Debug, Clone)]
pub struct LinearClassifier {
    /// `[classes, dim]`.
    pub weight: Tensor<2>,
    /// `[classes]`.
    pub bias: Tensor<1>,
}

/// Momentum buffers of SGD, one per parameter (PyTorch's first step sets them to the gradient,
/// which zero buffers reproduce).
struct Momentum {
    weight: Tensor<2>,
    bias: Tensor<1>,
}

impl LinearClassifier {
    /// Weights N(0, 0.01), bias 0, from the host generator seeded with `seed`
    /// (`dino_model::init`: the same classifier on every device).
    pub fn new(dim: usize, classes: usize, seed: u64, device: &Device) -> Self {
        init::seed(seed);
        Self {
            weight: init::random([classes, dim], Distribution::Normal(0.0, 0.01), device),
            bias: Tensor::zeros([classes], device),
        }
    }

    /// Features `[B, dim]` -> logits `[B, classes]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        x.matmul(self.weight.clone().transpose()) + self.bias.clone().unsqueeze()
    }

    /// One SGD step on a batch of features `[B, dim]` with labels; returns the mean
    /// cross-entropy before the step.
    fn sgd_step(&mut self, x: Tensor<2>, labels: &[u32], lr: f64, momentum: f64, buffers: &mut Momentum) -> f64 {
        let [b, _] = x.dims();
        let classes = self.bias.dims()[0];
        let logits = self.forward(x.clone());
        let device = logits.device();
        let onehot = one_hot(labels, classes, &device);
        let loss = -(log_softmax(logits.clone(), 1) * onehot.clone()).sum().into_scalar::<f32>() as f64 / b as f64;
        let g = (softmax(logits, 1) - onehot) / b as f64;
        let grad_weight = g.clone().transpose().matmul(x);
        let grad_bias = g.sum_dim(0).reshape([classes]);
        buffers.weight = buffers.weight.clone() * momentum + grad_weight;
        buffers.bias = buffers.bias.clone() * momentum + grad_bias;
        self.weight = self.weight.clone() - buffers.weight.clone() * lr;
        self.bias = self.bias.clone() - buffers.bias.clone() * lr;
        loss
    }

    /// Top-1 and top-5 (over min(5, classes)) accuracy in percent of `features` `[N, dim]`.
    pub fn accuracy(&self, features: &Tensor<2>, labels: &[u32]) -> (f64, f64) {
        let logits = self.forward(features.clone());
        let [n, classes] = logits.dims();
        let top = classes.min(5);
        let ranked = logits.argsort_descending(1).narrow(1, 0, top).into_data();
        let ranked: Vec<i64> = ranked.iter::<i64>().collect();
        let (mut top1, mut top5) = (0usize, 0usize);
        for (row, &label) in ranked.chunks(top).zip(labels) {
            top1 += (row[0] == label as i64) as usize;
            top5 += row.contains(&(label as i64)) as usize;
        }
        let pct = |hits: usize| 100.0 * hits as f64 / n.max(1) as f64;
        (pct(top1), pct(top5))
    }

    /// Writes `linear.weight` and `linear.bias` (the official key names) as safetensors, with
    /// the feature settings in the metadata.
    pub fn save(&self, path: &Path, features: &FeatureSpec) -> Result<(), EvalError> {
        let io = |e: String| EvalError::Io { path: path.into(), source: std::io::Error::other(e) };
        let bytes = |t: TensorData| -> Vec<u8> { t.iter::<f32>().flat_map(|v| v.to_le_bytes()).collect() };
        let (w, b) = (bytes(self.weight.to_data()), bytes(self.bias.to_data()));
        let view = |data, shape: Vec<usize>| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, data).map_err(|e| io(e.to_string()))
        };
        let metadata = [
            ("n_last_blocks".to_string(), features.n_last_blocks.to_string()),
            ("avgpool_patchtokens".to_string(), features.avgpool.to_string()),
        ];
        safetensors::serialize_to_file(
            [
                ("linear.weight", view(&w, self.weight.dims().to_vec())?),
                ("linear.bias", view(&b, self.bias.dims().to_vec())?),
            ],
            Some(metadata.into_iter().collect()),
            path,
        )
        .map_err(|e| io(e.to_string()))
    }
}

fn one_hot(labels: &[u32], classes: usize, device: &Device) -> Tensor<2> {
    let labels = Tensor::<1, Int>::from_data(
        TensorData::new(labels.iter().map(|&l| l as i64).collect(), [labels.len()]),
        device,
    );
    labels.one_hot::<2>(classes).float()
}

/// What the probe reports after each epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearEpoch {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub test_top1: f64,
    pub test_top5: f64,
    /// Best test top-1 so far (`Max accuracy so far`).
    pub best_top1: f64,
}

impl LinearEpoch {
    /// The epoch's `log.txt` line, one JSON object with the keys of the official
    /// `eval_linear.py` log (`train_*` and `test_*` stats and `epoch`), plus `best_acc`.
    pub fn log_line(&self) -> String {
        serde_json::json!({
            "epoch": self.epoch, "train_lr": self.lr, "train_loss": self.train_loss,
            "test_acc1": self.test_top1, "test_acc5": self.test_top5, "best_acc": self.best_top1,
        })
        .to_string()
    }
}

/// Progress of a linear evaluation.
#[derive(Debug, Clone, Copy)]
pub enum LinearProgress {
    /// `done` of `total` training images of an epoch.
    Batch { epoch: usize, done: usize, total: usize },
    /// An epoch ended.
    Epoch(LinearEpoch),
}

/// Where the training features come from.
pub enum TrainFeatures<'a> {
    /// The official protocol: a new random-resized-crop + flip view of every image each epoch,
    /// through the frozen backbone.
    Augmented { backbone: &'a Backbone, data: &'a Dataset, count: usize, transform: LinearTrainTransform },
    /// Features computed once (faster, not the official protocol), `[N, dim]` with labels.
    Fixed { features: &'a Tensor<2>, labels: &'a [u32] },
}

/// Trains a linear classifier on frozen features and evaluates it on `test` (`[N, dim]` features
/// with labels) after each epoch. Returns the classifier and the per-epoch results.
pub fn train_linear(
    config: &LinearConfig,
    train: TrainFeatures,
    labels: &[u32],
    test: (&Tensor<2>, &[u32]),
    device: &Device,
    mut progress: impl FnMut(LinearProgress),
) -> Result<(LinearClassifier, Vec<LinearEpoch>), EvalError> {
    let classes = labels.iter().chain(test.1).copied().max().map_or(1, |m| m as usize + 1);
    let dim = test.0.dims()[1];
    let mut classifier = LinearClassifier::new(dim, classes, config.seed, device);
    let mut buffers =
        Momentum { weight: Tensor::zeros([classes, dim], device), bias: Tensor::zeros([classes], device) };
    let total = match &train {
        TrainFeatures::Augmented { count, data, .. } => (*count).min(data.len()),
        TrainFeatures::Fixed { labels, .. } => labels.len(),
    };
    let mut history: Vec<LinearEpoch> = Vec::with_capacity(config.epochs);
    for epoch in 0..config.epochs {
        let lr = config.lr_at(epoch);
        let mut order: Vec<usize> = (0..total).collect();
        order.shuffle(&mut StdRng::seed_from_u64(config.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        let (mut loss_sum, mut seen) = (0.0, 0);
        for batch in order.chunks(config.batch_size.max(1)) {
            let (x, used) = match &train {
                TrainFeatures::Augmented { backbone, data, transform, .. } => {
                    augmented_features(backbone, data, batch, *transform, config, epoch, device)?
                }
                TrainFeatures::Fixed { features, .. } => {
                    let idx: Vec<i64> = batch.iter().map(|&i| i as i64).collect();
                    let x = (*features)
                        .clone()
                        .select(0, Tensor::<1, Int>::from_data(TensorData::new(idx, [batch.len()]), device));
                    (x, batch.to_vec())
                }
            };
            let y: Vec<u32> = used.iter().map(|&i| labels[i]).collect();
            loss_sum += classifier.sgd_step(x, &y, lr, config.momentum, &mut buffers) * batch.len() as f64;
            seen += batch.len();
            progress(LinearProgress::Batch { epoch, done: seen, total });
        }
        let (test_top1, test_top5) = classifier.accuracy(test.0, test.1);
        let best_top1 = history.iter().map(|e| e.best_top1).fold(test_top1, f64::max);
        let result =
            LinearEpoch { epoch, lr, train_loss: loss_sum / seen.max(1) as f64, test_top1, test_top5, best_top1 };
        if !result.train_loss.is_finite() {
            return Err(EvalError::Diverged { epoch, lr });
        }
        history.push(result);
        progress(LinearProgress::Epoch(result));
    }
    Ok((classifier, history))
}

/// Backbone features `[batch, dim]` of one augmented view of each image in `batch`
/// ([`LinearTrainTransform::views`]), and the images they are of.
fn augmented_features(
    backbone: &Backbone,
    data: &Dataset,
    batch: &[usize],
    transform: LinearTrainTransform,
    config: &LinearConfig,
    epoch: usize,
    device: &Device,
) -> Result<(Tensor<2>, Vec<usize>), EvalError> {
    let (pixels, used) = transform.views(data, batch, config.seed, epoch)?;
    let s = transform.size as usize;
    let images = Tensor::<4>::from_data(TensorData::new(pixels, [batch.len(), 3, s, s]), device);
    Ok((config.features.forward(backbone, images), used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_use_the_official_keys() {
        let e = LinearEpoch { epoch: 2, lr: 0.5, train_loss: 1.25, test_top1: 80.0, test_top5: 99.0, best_top1: 81.0 };
        let line: serde_json::Value = serde_json::from_str(&e.log_line()).unwrap();
        let expected = serde_json::json!({
            "epoch": 2, "train_lr": 0.5, "train_loss": 1.25, "test_acc1": 80.0, "test_acc5": 99.0, "best_acc": 81.0
        });
        assert_eq!(line, expected);
    }

    #[test]
    fn cosine_lr_follows_cosine_annealing_per_epoch() {
        let config = LinearConfig { epochs: 4, lr: 0.001, batch_size: 512, ..Default::default() };
        assert!((config.lr_at(0) - 0.002).abs() < 1e-12, "lr x 512 / 256");
        assert!((config.lr_at(2) - 0.001).abs() < 1e-12);
        assert!(config.lr_at(3) < config.lr_at(2) && config.lr_at(3) > 0.0);
    }

    /// The closed-form gradient equals autodiff's gradient of the cross-entropy.
    #[test]
    fn closed_form_gradient_matches_autodiff() {
        let device = Device::flex();
        let (b, dim, classes) = (5, 4, 3);
        let x = Tensor::<2>::random([b, dim], Distribution::Normal(0.0, 1.0), &device);
        let labels = [0u32, 2, 1, 1, 0];
        let mut classifier = LinearClassifier::new(dim, classes, 3, &device);
        classifier.bias = Tensor::random([classes], Distribution::Normal(0.0, 0.1), &device);
        let before = classifier.clone();
        let mut buffers =
            Momentum { weight: Tensor::zeros([classes, dim], &device), bias: Tensor::zeros([classes], &device) };
        // lr 1, no momentum: the update is minus the gradient.
        classifier.sgd_step(x.clone(), &labels, 1.0, 0.0, &mut buffers);
        let ours = before.weight.clone() - classifier.weight;

        let ad = device.clone().autodiff();
        let w = Tensor::<2>::from_data(before.weight.to_data(), &ad).require_grad();
        let bias = Tensor::<1>::from_data(before.bias.to_data(), &ad);
        let logits = Tensor::<2>::from_data(x.to_data(), &ad).matmul(w.clone().transpose()) + bias.unsqueeze();
        let loss = -(log_softmax(logits, 1) * one_hot(&labels, classes, &ad)).sum() / b as f64;
        let grads = loss.backward();
        let reference = w.grad(&grads).expect("weight gradient");
        let diff = (Tensor::<2>::from_data(reference.to_data(), &device) - ours).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-6, "max |closed form - autodiff| = {diff}");
    }

    /// Two Gaussian blobs per class in 8 dimensions, far apart: a linear layer must separate them.
    #[test]
    fn learns_a_separable_problem() {
        let device = Device::flex();
        let (n, dim, classes) = (300, 8, 3);
        let mut rng = StdRng::seed_from_u64(0);
        let mut values = Vec::with_capacity(n * dim);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let class = (i % classes) as u32;
            labels.push(class);
            for d in 0..dim {
                let centre = if d == class as usize { 3.0 } else { 0.0 };
                values.push(centre + rand::Rng::random_range(&mut rng, -1.0f32..1.0));
            }
        }
        let features = Tensor::<2>::from_data(TensorData::new(values, [n, dim]), &device);
        let config = LinearConfig { epochs: 30, lr: 0.5, batch_size: 32, ..Default::default() };
        let (before, _) = {
            let untrained = LinearClassifier::new(dim, classes, 0, &device);
            untrained.accuracy(&features, &labels)
        };
        let mut epochs = Vec::new();
        let (classifier, history) = train_linear(
            &config,
            TrainFeatures::Fixed { features: &features, labels: &labels },
            &labels,
            (&features, &labels),
            &device,
            |p| {
                if let LinearProgress::Epoch(e) = p {
                    epochs.push(e.epoch)
                }
            },
        )
        .unwrap();
        assert_eq!(epochs, (0..30).collect::<Vec<_>>());
        let last = history.last().unwrap();
        assert!(last.test_top1 > 99.0, "separable classes: {last:?}");
        assert_eq!(last.test_top5, 100.0, "3 classes: top-5 covers them all");
        assert!(history[0].train_loss > last.train_loss, "the loss falls");
        assert!(last.best_top1 >= last.test_top1);
        assert_eq!(classifier.accuracy(&features, &labels).0, last.test_top1);
        assert!(before < 90.0, "the untrained layer is near chance: {before}");
        assert_eq!(classifier.weight.dims(), [classes, dim]);
    }
}
