//! The training loop (`train_dino` + `train_one_epoch` of `main_dino.py`): epochs of iterations,
//! per-iteration schedules, logs, checkpoints, k-NN monitoring and resume.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use dino_data::loader::{epoch_batches, iterations_per_epoch};
use dino_data::{DataError, Dataset, EvalTransform};
use dino_eval::{ExtractOptions, FeatureSpec, dataset_features, knn_classify};
use dino_model::DinoModel;
use dino_model::weights::save_backbone;
use serde::Serialize;

use crate::TrainConfig;
use crate::checkpoint::{CheckpointError, load_checkpoint, load_official_checkpoint, save_checkpoint};
use crate::loss::DinoLoss;
use crate::optim::{Optimizer, StepParams};
use crate::schedule::{cosine_schedule, teacher_temp_schedule};
use crate::step::{IterationParams, NonFiniteLoss, TrainState, train_step};
use dino_eval::figures::plot_history;

/// Why a run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Eval(#[from] dino_eval::EvalError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Weights(#[from] dino_model::weights::WeightsError),
    #[error("epoch {epoch}, iteration {iteration}: {source}")]
    NonFinite { epoch: usize, iteration: usize, source: NonFiniteLoss },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// What one iteration reports to the observer.
#[derive(Debug, Clone)]
pub struct IterationLog {
    pub epoch: usize,
    /// Iteration within the epoch.
    pub iteration: usize,
    pub iterations: usize,
    pub loss: f64,
    pub lr: f64,
    pub wd: f64,
    pub images_per_sec: f64,
}

/// One line of `log.txt`: the official fields, then ours.
#[derive(Debug, Clone, Serialize)]
pub struct EpochLog {
    pub train_loss: f64,
    pub train_lr: f64,
    pub train_wd: f64,
    pub epoch: usize,
    /// Teacher k-NN top-1 (%) on the validation set after this epoch, when measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_top1: Option<f64>,
    /// Teacher k-NN top-1 (%) before training, on the first epoch's line of a fresh run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_top1_initial: Option<f64>,
    pub minutes: f64,
    pub images_per_sec: f64,
}

/// Receives progress; the CLI draws it.
pub trait Observer {
    fn epoch_start(&mut self, _epoch: usize, _iterations: usize) {}
    fn iteration(&mut self, _log: &IterationLog) {}
    fn epoch_end(&mut self, _log: &EpochLog) {}
    fn note(&mut self, _message: &str) {}
    /// Asked after each epoch's checkpoint is written; `false` ends the run there (it can be
    /// resumed later).
    fn keep_going(&mut self) -> bool {
        true
    }
}

/// Labeled data for k-NN monitoring: the bank (usually the training set) and the queries.
pub struct KnnData {
    pub bank: Arc<Dataset>,
    pub queries: Arc<Dataset>,
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub first_loss: Option<f64>,
    pub last_epoch: Option<EpochLog>,
    /// Teacher k-NN top-1 before training (the randomly initialised network).
    pub knn_before: Option<f64>,
    pub minutes: f64,
}

/// Files of a run directory.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn checkpoint(&self) -> PathBuf {
        self.0.join("checkpoint.safetensors")
    }
    fn kept_checkpoint(&self, epoch: usize) -> PathBuf {
        self.0.join(format!("checkpoint{epoch:04}.safetensors"))
    }
    pub fn teacher_backbone(&self) -> PathBuf {
        self.0.join("teacher_backbone.safetensors")
    }
    pub fn log(&self) -> PathBuf {
        self.0.join("log.txt")
    }
    pub fn config(&self) -> PathBuf {
        self.0.join("config.toml")
    }
    pub fn plot(&self) -> PathBuf {
        self.0.join("training.png")
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.into(), source }
}

/// The features k-NN compares: the teacher backbone's final-normed CLS on whole images, resized
/// to the global crop size, L2-normalised.
fn knn_top1(model: &DinoModel, config: &TrainConfig, data: &KnnData, device: &Device) -> Result<f64, TrainError> {
    let size = config.crops.global_size;
    let options = ExtractOptions {
        transform: EvalTransform { resize: Some(size), crop: Some(size) },
        features: FeatureSpec::default(),
        l2_norm: true,
        batch_size: 256,
    };
    let limit = |n: usize| if n == 0 { usize::MAX } else { n };
    let bank = dataset_features(&model.backbone, &data.bank, limit(config.knn_train_images), &options, device, |_| ())?;
    let queries =
        dataset_features(&model.backbone, &data.queries, limit(config.knn_test_images), &options, device, |_| ())?;
    let labels = |d: &Dataset, n: usize| d.labels().map(|l| l[..n].to_vec());
    let (Some(bank_labels), Some(query_labels)) = (labels(&data.bank, bank.rows), labels(&data.queries, queries.rows))
    else {
        return Err(TrainError::Config(
            "k-NN monitoring needs labeled data (class subfolders, IDX, CIFAR or synthetic)".into(),
        ));
    };
    let result = knn_classify(
        &bank.values,
        &bank_labels,
        &queries.values,
        &query_labels,
        bank.dim,
        &[config.knn_k],
        config.knn_temperature,
        device,
    );
    Ok(result[0].top1)
}

/// Trains on `data` as `config` says, writing the run to `dir`. With `resume`, continues from
/// `dir`'s checkpoint (with the config saved there). `device` is the plain device; the student
/// trains on its autodiff twin.
#[allow(clippy::needless_range_loop)] // the epoch indexes several schedules and the data order
pub fn train(
    config: &TrainConfig,
    data: Arc<Dataset>,
    knn: Option<KnnData>,
    dir: &Path,
    device: &Device,
    resume: bool,
    observer: &mut dyn Observer,
) -> Result<Summary, TrainError> {
    let run = RunDir(dir.to_path_buf());
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let train_device = device.clone().autodiff();
    let started = Instant::now();

    // ---- the networks, fresh or restored ----
    let official = dir.join("checkpoint.pth");
    let (mut state, start_epoch, config) = if resume && run.checkpoint().is_file() {
        let restored = load_checkpoint(&run.checkpoint(), device, &train_device)?;
        observer.note(&format!("resuming from {} after epoch {}", run.checkpoint().display(), restored.epochs_done));
        (restored.state, restored.epochs_done, restored.config)
    } else if resume && official.is_file() {
        // An official main_dino.py checkpoint: continue it with the given config.
        config.validate().map_err(TrainError::Config)?;
        let restored = load_official_checkpoint(&official, config, device, &train_device)?;
        observer.note(&format!("resuming the official {} after epoch {}", official.display(), restored.epochs_done));
        (restored.state, restored.epochs_done, restored.config)
    } else {
        if resume {
            observer.note(&format!("no checkpoint in {}: starting a new run", dir.display()));
        }
        config.validate().map_err(TrainError::Config)?;
        let model_config = config.model_config().map_err(TrainError::Config)?;
        train_device.seed(config.seed);
        let student = DinoModel::new(&model_config, &train_device);
        // Same initial weights; no autodiff, hence no drop path.
        let teacher = student.valid();
        let loss = DinoLoss::new(config.out_dim, config.crops.num_crops(), device);
        let state = TrainState { student, teacher, loss, optimizer: Optimizer::new(config.optimizer) };
        (state, 0, config.clone())
    };
    fs::write(run.config(), config.to_toml()).map_err(io_err(&run.config()))?;

    // ---- data and schedules ----
    let mut data = data;
    if config.max_images > 0 && config.max_images < data.len() {
        let mut truncated = (*data).clone();
        truncated.truncate(config.max_images);
        data = Arc::new(truncated);
    }
    let iterations = iterations_per_epoch(data.len(), config.batch_size);
    if iterations == 0 {
        return Err(TrainError::Config(format!(
            "the dataset has {} images, fewer than one batch of {}; lower batch_size",
            data.len(),
            config.batch_size
        )));
    }
    let lr = cosine_schedule(config.peak_lr(), config.min_lr, config.epochs, iterations, config.warmup_epochs, 0.0);
    let wd = cosine_schedule(config.weight_decay, config.weight_decay_end, config.epochs, iterations, 0, 0.0);
    let momentum = cosine_schedule(config.momentum_teacher, 1.0, config.epochs, iterations, 0, 0.0);
    let teacher_temp = teacher_temp_schedule(
        config.warmup_teacher_temp,
        config.teacher_temp,
        config.warmup_teacher_temp_epochs,
        config.epochs,
    );

    // ---- k-NN of the untrained teacher ----
    let mut summary = Summary { first_loss: None, last_epoch: None, knn_before: None, minutes: 0.0 };
    let monitor = knn.as_ref().filter(|_| config.knn_every > 0);
    if let Some(knn) = monitor.filter(|_| start_epoch == 0) {
        let top1 = knn_top1(&state.teacher, &config, knn, device)?;
        observer.note(&format!("k-NN top-1 of the initial teacher: {top1:.2} %"));
        summary.knn_before = Some(top1);
    }
    if start_epoch == 0 {
        // A fresh run starts a fresh log.
        fs::write(run.log(), "").map_err(io_err(&run.log()))?;
    }

    for epoch in start_epoch..config.epochs {
        observer.epoch_start(epoch, iterations);
        let epoch_started = Instant::now();
        let batches = epoch_batches(
            data.clone(),
            config.crops.clone(),
            config.batch_size,
            config.seed,
            epoch,
            0,
            config.num_workers,
        );
        let (mut loss_sum, mut lr_sum, mut wd_sum) = (0.0, 0.0, 0.0);
        for (i, batch) in batches.into_iter().enumerate() {
            let batch = batch?;
            let it = epoch * iterations + i;
            let crops: Vec<Tensor<4>> = batch
                .crops
                .into_iter()
                .map(|c| {
                    let s = c.size as usize;
                    Tensor::from_data(TensorData::new(c.data, [batch.batch_size, 3, s, s]), device)
                })
                .collect();
            let params = IterationParams {
                step: StepParams {
                    lr: lr[it],
                    weight_decay: wd[it],
                    clip_grad: config.clip_grad,
                    freeze_last_layer: epoch < config.freeze_last_layer,
                },
                momentum: momentum[it],
                teacher_temp: teacher_temp[epoch],
            };
            // Drop path draws from the backend RNG: seed it per iteration so a resumed run
            // repeats the uninterrupted one.
            train_device.seed(config.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ it as u64);
            let (next, report) = train_step(state, &crops, &params).map_err(|source| TrainError::NonFinite {
                epoch,
                iteration: i,
                source,
            })?;
            state = next;
            summary.first_loss.get_or_insert(report.loss);
            loss_sum += report.loss;
            lr_sum += lr[it];
            wd_sum += wd[it];
            let seconds = epoch_started.elapsed().as_secs_f64();
            observer.iteration(&IterationLog {
                epoch,
                iteration: i,
                iterations,
                loss: report.loss,
                lr: lr[it],
                wd: wd[it],
                images_per_sec: ((i + 1) * config.batch_size) as f64 / seconds.max(1e-9),
            });
        }

        // ---- end of epoch: k-NN, log, checkpoints, exports ----
        let epoch_seconds = epoch_started.elapsed().as_secs_f64();
        let due = monitor.filter(|_| (epoch + 1) % config.knn_every == 0 || epoch + 1 == config.epochs);
        let knn_top1 = due.map(|knn| knn_top1(&state.teacher, &config, knn, device)).transpose()?;
        let n = iterations as f64;
        let log = EpochLog {
            train_loss: loss_sum / n,
            train_lr: lr_sum / n,
            train_wd: wd_sum / n,
            epoch,
            knn_top1,
            knn_top1_initial: if epoch == 0 { summary.knn_before } else { None },
            minutes: started.elapsed().as_secs_f64() / 60.0,
            images_per_sec: (iterations * config.batch_size) as f64 / epoch_seconds,
        };
        let mut file = fs::OpenOptions::new().create(true).append(true).open(run.log()).map_err(io_err(&run.log()))?;
        writeln!(file, "{}", serde_json::to_string(&log).expect("logs serialise")).map_err(io_err(&run.log()))?;

        save_checkpoint(&run.checkpoint(), &state, epoch + 1, &config)?;
        if config.saveckp_freq > 0 && epoch % config.saveckp_freq == 0 {
            fs::copy(run.checkpoint(), run.kept_checkpoint(epoch)).map_err(io_err(&run.kept_checkpoint(epoch)))?;
        }
        let model_config = config.model_config().map_err(TrainError::Config)?;
        save_backbone(&state.teacher.backbone, &model_config.vit, &run.teacher_backbone())?;
        if let Err(e) = plot_history(&run.log(), &run.plot()) {
            observer.note(&format!("could not draw {}: {e}", run.plot().display()));
        }
        observer.epoch_end(&log);
        summary.last_epoch = Some(log);
        if !observer.keep_going() {
            break;
        }
    }
    summary.minutes = started.elapsed().as_secs_f64() / 60.0;
    Ok(summary)
}
