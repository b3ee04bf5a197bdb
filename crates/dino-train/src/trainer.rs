//! The training loop (`train_dino` + `train_one_epoch` of `main_dino.py`): epochs of iterations,
//! per-iteration schedules, logs, checkpoints, k-NN monitoring and resume.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use dino_data::loader::{epoch_batches, iterations_per_epoch};
use dino_data::{BadImage, DataError, Dataset, EvalTransform, count_skips, describe_skips};
use dino_eval::{DatasetFeatures, ExtractOptions, FeatureSpec, dataset_features, knn_classify, pixel_features};
use dino_model::DinoModel;
use dino_model::batch_norm::eval_mode;
use dino_model::weights::{describe_ignored, save_backbone, write_durably};
use serde::{Deserialize, Serialize};

use crate::TrainConfig;
use crate::checkpoint::{CheckpointError, Restored, load_checkpoint, load_official_checkpoint, save_checkpoint};
use crate::health::{Health, Warning, parameter_vector, relative_change};
use crate::optim::{Optimizer, StepParams};
use crate::precision::{LossScaler, Precision};
use crate::schedule::{cosine_schedule, teacher_temp_schedule};
use crate::step::{IterationParams, NonFinite, StepReport, TrainState, train_step_in};
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
    #[error(
        "epoch {}, iteration {} (lr {lr:.3e}, teacher_temp {teacher_temp}): {source}; likely causes: an lr too \
         high for the batch (lower lr, or clip_grad), a teacher_temp too low, or broken input; the last epoch's \
         checkpoint, if any, is untouched and --resume continues from it",
        .epoch + 1,
        .iteration + 1
    )]
    NonFinite { epoch: usize, iteration: usize, lr: f64, teacher_temp: f64, source: NonFinite },
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
    /// k-NN top-1 (%) of the raw pixels (the baseline), on the first epoch's line of a fresh run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_top1_pixels: Option<f64>,
    pub minutes: f64,
    pub images_per_sec: f64,
    /// Teacher entropy, KL, center norm and teacher drift (`health`).
    #[serde(flatten)]
    pub health: Health,
    /// What the health numbers warn of, with what to change (empty when healthy).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Image files skipped this epoch, by reason: those left out when the dataset was opened
    /// and those that failed to decode (the next usable image took their place); the files are
    /// listed in `skipped.txt`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped_images: BTreeMap<String, usize>,
}

/// Receives progress; the CLI draws it.
pub trait Observer {
    fn epoch_start(&mut self, _epoch: usize, _iterations: usize) {}
    fn iteration(&mut self, _log: &IterationLog) {}
    fn epoch_end(&mut self, _log: &EpochLog) {}
    fn note(&mut self, _message: &str) {}
    /// A problem the run can continue with, but the user should act on.
    fn warning(&mut self, _message: &str) {}
    /// Asked after every iteration; `true` ends the run there: the checkpoint is written (with
    /// the position within the epoch) and `train` returns, to be resumed later. For Ctrl-C.
    fn stop_requested(&mut self) -> bool {
        false
    }
}

/// Where a run stands: `epoch` whole epochs done, then `iteration` iterations of the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    pub epoch: usize,
    pub iteration: usize,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.iteration {
            0 => write!(f, "epoch {}", self.epoch),
            i => write!(f, "epoch {}, iteration {i} of epoch {}", self.epoch, self.epoch + 1),
        }
    }
}

/// Labeled data for k-NN monitoring: the bank (usually the training set) and the queries.
pub struct KnnData {
    pub bank: Arc<Dataset>,
    pub queries: Arc<Dataset>,
}

/// The outcome of a run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub first_loss: Option<f64>,
    pub last_epoch: Option<EpochLog>,
    /// Teacher k-NN top-1 before training (the randomly initialised network).
    pub knn_before: Option<f64>,
    /// The same k-NN on raw pixels: the baseline the features must beat.
    pub knn_pixels: Option<f64>,
    pub minutes: f64,
    /// Where the run stopped when the observer asked it to (`None`: it ran to the end).
    pub stopped_at: Option<Position>,
}

/// Files of a run directory.
pub struct RunDir(pub PathBuf);

impl RunDir {
    /// Creates the directory and removes the temporary files a killed process leaves (the file
    /// each was replacing is whole).
    fn prepare(dir: &Path) -> Result<Self, TrainError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let run = Self(dir.to_path_buf());
        for file in [run.checkpoint(), run.teacher_backbone()] {
            let _ = fs::remove_file(file.with_extension("safetensors.tmp"));
        }
        let _ = fs::remove_file(log_rewrite(&run.log()));
        Ok(run)
    }

    pub fn checkpoint(&self) -> PathBuf {
        self.0.join("checkpoint.safetensors")
    }
    /// An official `main_dino.py` checkpoint that `--resume` continues.
    pub fn official_checkpoint(&self) -> PathBuf {
        self.0.join("checkpoint.pth")
    }
    /// Whether `--resume` has a checkpoint to continue: ours or an official one.
    pub fn resumable(&self) -> bool {
        self.checkpoint().is_file() || self.official_checkpoint().is_file()
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
    /// Every image file the run skipped, one `PATH: reason (detail)` per line.
    pub fn skipped(&self) -> PathBuf {
        self.0.join("skipped.txt")
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

/// The transform of the monitoring k-NN: whole images resized to the global crop size.
fn knn_transform(config: &TrainConfig) -> EvalTransform {
    let size = config.crops.global_size;
    EvalTransform { resize: Some(size), crop: Some(size) }
}

/// The images of `data` the monitoring k-NN uses: (bank count, query count).
fn knn_counts(config: &TrainConfig, data: &KnnData) -> (usize, usize) {
    let limit = |n: usize, len: usize| if n == 0 { len } else { n.min(len) };
    (limit(config.knn_train_images, data.bank.len()), limit(config.knn_test_images, data.queries.len()))
}

/// Weighted k-NN top-1 (%) of L2-normalised query features against bank features.
fn knn_accuracy(
    config: &TrainConfig,
    data: &KnnData,
    bank: DatasetFeatures,
    queries: DatasetFeatures,
    device: &Device,
) -> Result<f64, TrainError> {
    let (Some(bank_labels), Some(query_labels)) = (bank.labels(&data.bank), queries.labels(&data.queries)) else {
        return Err(TrainError::Config(
            "k-NN monitoring needs labeled data (class subfolders, IDX, CIFAR or synthetic)".into(),
        ));
    };
    let (bank, queries) = (bank.features, queries.features);
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

/// The teacher's k-NN top-1: its backbone's feature on whole images (BatchNorm in eval mode).
fn knn_top1(model: &DinoModel, config: &TrainConfig, data: &KnnData, device: &Device) -> Result<f64, TrainError> {
    let backbone = eval_mode(model.backbone.clone());
    let options = ExtractOptions {
        transform: knn_transform(config),
        features: FeatureSpec::default(),
        l2_norm: true,
        batch_size: 256,
    };
    let (n_bank, n_queries) = knn_counts(config, data);
    let bank = dataset_features(&backbone, &data.bank, n_bank, &options, device, |_| ())?;
    let queries = dataset_features(&backbone, &data.queries, n_queries, &options, device, |_| ())?;
    knn_accuracy(config, data, bank, queries, device)
}

/// The baseline the features must beat: the same k-NN on the raw pixels of the same images.
fn pixel_knn_top1(config: &TrainConfig, data: &KnnData, device: &Device) -> Result<f64, TrainError> {
    let (n_bank, n_queries) = knn_counts(config, data);
    let bank = pixel_features(&data.bank, n_bank, &knn_transform(config))?;
    let queries = pixel_features(&data.queries, n_queries, &knn_transform(config))?;
    knn_accuracy(config, data, bank, queries, device)
}

/// Trains on `data` as `config` says, writing the run to `dir`. With `resume`, continues from
/// `dir`'s checkpoint (with the config saved there). `device` is the plain device; the student
/// trains on its autodiff twin. Reads like the official `train_dino`: networks, data and
/// schedules, then per epoch `train_one_epoch` and the end-of-epoch bookkeeping.
pub fn train(
    config: &TrainConfig,
    data: Arc<Dataset>,
    knn: Option<KnnData>,
    dir: &Path,
    device: &Device,
    resume: bool,
    observer: &mut dyn Observer,
) -> Result<Summary, TrainError> {
    let step_precision = crate::precision::use_precision(config.precision, device).map_err(TrainError::Config)?;
    if let Some(warning) = crate::precision::slow_precision_warning(config.precision, device) {
        observer.warning(&warning);
    }
    let run = RunDir::prepare(dir)?;
    let started = Instant::now();
    let Restored { state, position: start, epoch_sums: mut resumed_sums, mut scaler, config, .. } =
        networks(config, &data, &run, device, resume, observer)?;
    let mut state = state.train_mode();
    let start_epoch = start.epoch;
    fs::write(run.config(), config.to_toml()).map_err(io_err(&run.config()))?;

    let data = first_images(data, config.max_images);
    let iterations = iterations_per_epoch(data.len(), config.batch_size);
    if iterations == 0 {
        return Err(TrainError::Config(format!(
            "the dataset has {} images, fewer than one batch of {}; lower batch_size",
            data.len(),
            config.batch_size
        )));
    }
    let schedules = Schedules::new(&config, iterations);

    let mut summary = Summary::default();
    let monitor = knn.as_ref().filter(|_| config.knn_every > 0);
    if let Some(knn) = monitor.filter(|_| start == Position::default()) {
        (summary.knn_pixels, summary.knn_before) = initial_knn(&state.teacher, &config, knn, device, observer)?;
    }
    keep_log_before(&run.log(), start_epoch)?;

    let mut skipped_files: BTreeMap<PathBuf, BadImage> =
        data.skipped().iter().map(|b| (b.path.clone(), b.clone())).collect();
    for epoch in start_epoch..config.epochs {
        observer.epoch_start(epoch, iterations);
        let epoch_started = Instant::now();
        let (teacher_before, student_before) = (parameter_vector(&state.teacher), parameter_vector(&state.student));
        let sums = if epoch == start_epoch { resumed_sums.take().unwrap_or_default() } else { EpochTotals::default() };
        let mut totals;
        (state, totals) = train_one_epoch(
            state,
            &data,
            &config,
            &schedules,
            epoch,
            iterations,
            sums,
            (step_precision, &mut scaler),
            device,
            observer,
        )?;
        summary.first_loss = summary.first_loss.or(totals.first_loss);
        if totals.iterations < iterations {
            // Stopped on request mid-epoch: save where it stands.
            let at = Position { epoch, iteration: totals.iterations };
            save_checkpoint(&run.checkpoint(), (&state, &scaler), at, Some(&totals), &config)?;
            summary.stopped_at = Some(at);
            break;
        }

        // End of epoch: k-NN when due, health, log line, checkpoints and exports.
        let due = monitor.filter(|_| (epoch + 1) % config.knn_every == 0 || epoch + 1 == config.epochs);
        let knn_top1 = due.map(|knn| knn_top1(&state.teacher, &config, knn, device)).transpose()?;
        let first = epoch == 0;
        let log = EpochLog {
            knn_top1,
            knn_top1_initial: summary.knn_before.filter(|_| first),
            knn_top1_pixels: summary.knn_pixels.filter(|_| first),
            minutes: started.elapsed().as_secs_f64() / 60.0,
            images_per_sec: (iterations * config.batch_size) as f64 / epoch_started.elapsed().as_secs_f64(),
            ..epoch_log(&state, &config, &totals, epoch, (&teacher_before, &student_before), data.skipped())
        };
        if totals.overflows > 0 {
            observer.warning(&format!(
                "{} of {iterations} steps skipped: f16 gradients overflowed (loss scale now {})",
                totals.overflows, scaler.scale
            ));
        }
        record_skips(&run, epoch, &mut skipped_files, &mut totals.skipped, observer)?;
        write_epoch(&run, (&state, &scaler), &config, &log, observer)?;
        observer.epoch_end(&log);
        log.warnings.iter().for_each(|w| observer.warning(w));
        summary.last_epoch = Some(log);
        if epoch + 1 < config.epochs && observer.stop_requested() {
            summary.stopped_at = Some(Position { epoch: epoch + 1, iteration: 0 });
            break;
        }
    }
    summary.minutes = started.elapsed().as_secs_f64() / 60.0;
    Ok(summary)
}

/// The raw-pixel and the initial teacher's k-NN top-1 before training, printed.
fn initial_knn(
    teacher: &DinoModel,
    config: &TrainConfig,
    knn: &KnnData,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<(Option<f64>, Option<f64>), TrainError> {
    let pixels = pixel_knn_top1(config, knn, device)?;
    let top1 = knn_top1(teacher, config, knn, device)?;
    let (bank, queries) = knn_counts(config, knn);
    observer.note(&format!(
        "k-NN top-1 ({}-NN, {bank} bank / {queries} query images): raw pixels {pixels:.2} %, initial teacher {top1:.2} %",
        config.knn_k
    ));
    Ok((Some(pixels), Some(top1)))
}

/// An epoch's `log.txt` line from its totals and the networks' state, with the health checks'
/// warnings. k-NN and timing are left empty for the caller.
fn epoch_log(
    state: &TrainState,
    config: &TrainConfig,
    totals: &EpochTotals,
    epoch: usize,
    (teacher_before, student_before): (&[f32], &[f32]),
    skipped_at_open: &[BadImage],
) -> EpochLog {
    let health = totals.health(
        config,
        state.loss.center.clone().square().sum().sqrt().into_scalar::<f64>(),
        relative_change(teacher_before, &parameter_vector(&state.teacher)),
        relative_change(student_before, &parameter_vector(&state.student)),
    );
    let n = totals.iterations as f64;
    EpochLog {
        train_loss: totals.loss / n,
        train_lr: totals.lr / n,
        train_wd: totals.wd / n,
        epoch,
        knn_top1: None,
        knn_top1_initial: None,
        knn_top1_pixels: None,
        minutes: 0.0,
        images_per_sec: 0.0,
        warnings: Warning::diagnose(&health).iter().map(|w| w.message(&health)).collect(),
        health,
        skipped_images: count_skips(skipped_at_open.iter().chain(totals.skipped.values()))
            .into_iter()
            .map(|(reason, n)| (reason.to_string(), n))
            .collect(),
    }
}

/// Warns of the images this epoch could not decode and rewrites `skipped.txt` with every
/// skipped file so far.
fn record_skips(
    run: &RunDir,
    epoch: usize,
    all: &mut BTreeMap<PathBuf, BadImage>,
    this_epoch: &mut BTreeMap<PathBuf, BadImage>,
    observer: &mut dyn Observer,
) -> Result<(), TrainError> {
    if !this_epoch.is_empty() {
        observer.warning(&format!(
            "epoch {}: {} images could not be decoded ({}) and the next usable ones took their place; see {}",
            epoch + 1,
            this_epoch.len(),
            describe_skips(this_epoch.values()),
            run.skipped().display()
        ));
    }
    all.append(this_epoch);
    if !all.is_empty() {
        let list: String = all.values().map(|b| format!("{b}\n")).collect();
        fs::write(run.skipped(), list).map_err(io_err(&run.skipped()))?;
    }
    Ok(())
}

/// The networks, center and optimizer: restored from the run directory's checkpoint (ours, or
/// an official `checkpoint.pth`) with `resume`, else fresh. Returns them with the position
/// reached and the config that runs: a resumed run's own, taking from `config` only the settings
/// that may change ([`crate::config::RESUMABLE`]; any other difference is an error).
fn networks(
    config: &TrainConfig,
    data: &Dataset,
    run: &RunDir,
    device: &Device,
    resume: bool,
    observer: &mut dyn Observer,
) -> Result<Restored, TrainError> {
    let train_device = device.clone().autodiff();
    let config =
        if config.sizes_from_images() { config.clone().fit_to_images(data.typical_side()?) } else { config.clone() };
    let official = run.official_checkpoint();
    if resume && run.checkpoint().is_file() {
        let mut restored = load_checkpoint(&run.checkpoint(), device, &train_device)?;
        observer.note(&format!("resuming from {} after {}", run.checkpoint().display(), restored.position));
        // `config` must be the run's own but for the settings that may change; those it takes.
        let changes = restored.config.resume_changes(&config).map_err(TrainError::Config)?;
        if !changes.is_empty() {
            observer.note(&format!("resuming with {}", changes.join(", ")));
        }
        restored.config = config;
        return Ok(restored);
    }
    config.validate().map_err(TrainError::Config)?;
    if resume && official.is_file() {
        // An official main_dino.py checkpoint: continue it with the given config.
        let restored = load_official_checkpoint(&official, &config, device, &train_device)?;
        observer.note(&format!("resuming the official {} after {}", official.display(), restored.position));
        if !restored.ignored.is_empty() {
            observer.warning(&format!("{}: {}", official.display(), describe_ignored(&restored.ignored)));
        }
        return Ok(restored);
    }
    if resume {
        observer.note(&format!("no checkpoint in {}: starting a new run", run.0.display()));
    }
    let model_config = config.model_config().map_err(TrainError::Config)?;
    dino_model::init::seed(config.seed);
    let student = DinoModel::new(&model_config, &train_device);
    // Same initial weights; no autodiff, hence no drop path.
    let teacher = student.valid();
    let loss = config.dino_loss(device);
    let state = TrainState { student, teacher, loss, optimizer: Optimizer::new(config.optimizer) };
    Ok(Restored {
        state,
        position: Position::default(),
        epoch_sums: None,
        scaler: LossScaler::default(),
        config,
        ignored: Vec::new(),
    })
}

/// Where [`keep_log_before`] writes the new `log.txt` before renaming it over the old one.
fn log_rewrite(log: &Path) -> PathBuf {
    log.with_extension("txt.tmp")
}

/// Keeps the lines of `log.txt` of the epochs before `epoch`: a fresh run starts an empty log,
/// and a run resumed after a kill drops the line of an epoch its checkpoint does not hold
/// (the line is written before the checkpoint), so every epoch has exactly one line.
fn keep_log_before(log: &Path, epoch: usize) -> Result<(), TrainError> {
    let text = if epoch == 0 { String::new() } else { fs::read_to_string(log).unwrap_or_default() };
    let kept: String = text
        .lines()
        .filter(|line| {
            let logged = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["epoch"].as_u64());
            logged.is_some_and(|e| (e as usize) < epoch)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    if epoch == 0 || kept != text {
        // Truncating in place lost the kept lines too when a kill landed between the truncation
        // and the write (the interrupt test caught it about once in six runs).
        write_durably(&log_rewrite(log), kept.as_bytes(), log).map_err(io_err(log))?;
    }
    Ok(())
}

/// The first `max_images` images (0: all).
fn first_images(data: Arc<Dataset>, max_images: usize) -> Arc<Dataset> {
    if max_images == 0 || max_images >= data.len() {
        return data;
    }
    let mut truncated = (*data).clone();
    truncated.truncate(max_images);
    Arc::new(truncated)
}

/// The official schedules, precomputed: lr, weight decay and teacher momentum per iteration,
/// teacher temperature per epoch.
struct Schedules {
    lr: Vec<f64>,
    wd: Vec<f64>,
    momentum: Vec<f64>,
    teacher_temp: Vec<f64>,
}

impl Schedules {
    fn new(config: &TrainConfig, iterations: usize) -> Self {
        let epochs = config.epochs;
        Self {
            lr: cosine_schedule(config.peak_lr(), config.min_lr, epochs, iterations, config.warmup_epochs, 0.0),
            wd: cosine_schedule(config.weight_decay, config.weight_decay_end, epochs, iterations, 0, 0.0),
            momentum: cosine_schedule(config.momentum_teacher, 1.0, epochs, iterations, 0, 0.0),
            teacher_temp: teacher_temp_schedule(
                config.warmup_teacher_temp,
                config.teacher_temp,
                config.warmup_teacher_temp_epochs,
                epochs,
            ),
        }
    }

    /// The values of global iteration `it` in `epoch`.
    fn at(&self, config: &TrainConfig, epoch: usize, it: usize) -> IterationParams {
        IterationParams {
            step: StepParams {
                lr: self.lr[it],
                weight_decay: self.wd[it],
                clip_grad: config.clip_grad,
                freeze_last_layer: epoch < config.freeze_last_layer,
            },
            momentum: self.momentum[it],
            teacher_temp: self.teacher_temp[epoch],
        }
    }
}

/// Sums over an epoch's iterations (saved in a checkpoint written mid-epoch, so the resumed
/// epoch's line of `log.txt` is the uninterrupted one's).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct EpochTotals {
    iterations: usize,
    first_loss: Option<f64>,
    loss: f64,
    lr: f64,
    wd: f64,
    entropy: f64,
    batch_entropy: f64,
    /// Optimizer steps skipped for an f16 overflow (mixed precision).
    #[serde(default)]
    overflows: usize,
    /// Images that failed to decode (replaced by the next usable ones), by path.
    #[serde(skip)]
    skipped: BTreeMap<PathBuf, BadImage>,
}

impl EpochTotals {
    fn add(&mut self, report: &StepReport, params: &IterationParams) {
        self.iterations += 1;
        self.first_loss.get_or_insert(report.loss);
        self.loss += report.loss;
        self.lr += params.step.lr;
        self.wd += params.step.weight_decay;
        self.entropy += report.teacher_entropy.per_image;
        self.batch_entropy += report.teacher_entropy.of_batch_mean;
        self.overflows += usize::from(report.skipped);
    }

    fn health(&self, config: &TrainConfig, center_norm: f64, teacher_drift: f64, student_drift: f64) -> Health {
        let n = self.iterations as f64;
        Health {
            teacher_entropy: self.entropy / n,
            teacher_batch_entropy: self.batch_entropy / n,
            kl_divergence: (self.loss - self.entropy) / n,
            entropy_ceiling: (config.out_dim as f64).ln(),
            center_norm,
            teacher_drift,
            student_drift,
        }
    }
}

/// One epoch of training steps (`train_one_epoch` of `main_dino.py`), from the iteration after
/// those `totals` already sums (0 but in a resumed run). Ends early, with fewer iterations in
/// the returned totals, when the observer asks to stop.
#[allow(clippy::too_many_arguments)]
fn train_one_epoch(
    mut state: TrainState,
    data: &Arc<Dataset>,
    config: &TrainConfig,
    schedules: &Schedules,
    epoch: usize,
    iterations: usize,
    mut totals: EpochTotals,
    (precision, scaler): (Precision, &mut LossScaler),
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<(TrainState, EpochTotals), TrainError> {
    let started = Instant::now();
    let first = totals.iterations;
    let (bs, seed, workers) = (config.batch_size, config.seed, config.num_workers);
    let batches = epoch_batches(data.clone(), config.crops.clone(), bs, seed, epoch, first, workers);
    for (i, batch) in (first..).zip(batches) {
        let mut batch = batch?;
        totals.skipped.extend(batch.skipped.drain(..).map(|b| (b.path.clone(), b)));
        let it = epoch * iterations + i;
        let crops: Vec<Tensor<4>> = batch
            .crops
            .into_iter()
            .map(|c| {
                let s = c.size as usize;
                Tensor::from_data(TensorData::new(c.data, [batch.batch_size, 3, s, s]), device)
            })
            .collect();
        let params = schedules.at(config, epoch, it);
        // Drop path draws from the host generator: seed it per iteration so a resumed run repeats
        // the uninterrupted one.
        dino_model::init::seed(config.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ it as u64);
        let step = train_step_in(precision, state, &crops, &params, scaler);
        let (next, report) = step.map_err(|source| TrainError::NonFinite {
            epoch,
            iteration: i,
            lr: params.step.lr,
            teacher_temp: params.teacher_temp,
            source,
        })?;
        state = next;
        totals.add(&report, &params);
        observer.iteration(&IterationLog {
            epoch,
            iteration: i,
            iterations,
            loss: report.loss,
            lr: params.step.lr,
            wd: params.step.weight_decay,
            images_per_sec: ((i + 1 - first) * config.batch_size) as f64 / started.elapsed().as_secs_f64().max(1e-9),
        });
        if i + 1 < iterations && observer.stop_requested() {
            break;
        }
    }
    Ok((state, totals))
}

/// The end-of-epoch files: a line of `log.txt`, the checkpoint (and a kept copy every
/// `saveckp_freq` epochs), the teacher backbone and `training.png`.
fn write_epoch(
    run: &RunDir,
    (state, scaler): (&TrainState, &LossScaler),
    config: &TrainConfig,
    log: &EpochLog,
    observer: &mut dyn Observer,
) -> Result<(), TrainError> {
    let mut file = fs::OpenOptions::new().create(true).append(true).open(run.log()).map_err(io_err(&run.log()))?;
    writeln!(file, "{}", serde_json::to_string(log).expect("logs serialise")).map_err(io_err(&run.log()))?;
    let epoch = log.epoch;
    save_checkpoint(&run.checkpoint(), (state, scaler), Position { epoch: epoch + 1, iteration: 0 }, None, config)?;
    if config.saveckp_freq > 0 && epoch.is_multiple_of(config.saveckp_freq) {
        fs::copy(run.checkpoint(), run.kept_checkpoint(epoch)).map_err(io_err(&run.kept_checkpoint(epoch)))?;
    }
    let model_config = config.model_config().map_err(TrainError::Config)?;
    save_backbone(&state.teacher.backbone, &model_config.backbone, &run.teacher_backbone())?;
    if let Err(e) = plot_history(&run.log(), &run.plot()) {
        observer.note(&format!("could not draw {}: {e}", run.plot().display()));
    }
    Ok(())
}
