//! `dino train`: DINO self-supervised pretraining.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use clap::Args;
use dino_train::checkpoint::saved_config;
use dino_train::{EpochLog, IterationLog, KnnData, Observer, RunDir, TrainConfig, config::PRESETS, train};
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::DeviceArg;
use crate::images::{self, ImageArgs};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training images (SPEC: a directory of images, IDX or CIFAR files, or `synthetic`;
    /// `#train`/`#test` picks a split). Default: `synthetic`; with --resume, the run's own
    /// (recorded in its `data.toml`).
    #[arg(long, value_name = "SPEC")]
    data: Option<String>,
    /// Labeled images for k-NN monitoring of the teacher (default: `synthetic#test` when training
    /// on `synthetic`, else none; with --resume, the run's own).
    #[arg(long, value_name = "SPEC")]
    val: Option<String>,
    /// Run directory: config, log.txt, checkpoints, teacher backbone, plot.
    #[arg(long, short, default_value = "runs/dino", value_name = "DIR")]
    output: PathBuf,
    /// Starting settings: official (main_dino.py's ViT-S/16), small (28-96 px images of your
    /// own, crop and patch sizes from the data; BENCHMARKS.md), small28 (the naive scaled-down
    /// recipe of the anchors), fashion (an earlier Fashion-MNIST recipe), quick (minutes on a
    /// CPU with the synthetic data). Default: quick. Not with --resume, which continues a run
    /// with its own settings.
    #[arg(long, value_name = "NAME")]
    preset: Option<String>,
    /// A TOML file of settings, applied over the preset.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Any setting, e.g. --set crops.local_crops=4 (repeatable; applied last).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue from the run directory's checkpoint.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    images: ImageArgs,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,

    // main_dino.py's common arguments, under their names.
    /// Epochs to train (official 100); a resumed run may be given more.
    #[arg(long)]
    epochs: Option<usize>,
    /// Network: vit_tiny, vit_small, vit_base, resnet18_cifar, resnet50, ... (official vit_small).
    #[arg(long)]
    arch: Option<String>,
    /// ViT patch size in pixels (official 16); 0 derives it from the images.
    #[arg(long)]
    patch_size: Option<usize>,
    /// K, the head's output dimension (official 65536).
    #[arg(long)]
    out_dim: Option<usize>,
    /// Images per step (official --batch_size_per_gpu 64).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate for a batch of 256, scaled by batch / 256 (official 5e-4).
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate at the end of the cosine schedule (official 1e-6).
    #[arg(long)]
    min_lr: Option<f64>,
    /// Epochs of linear learning-rate warmup (official 10).
    #[arg(long)]
    warmup_epochs: Option<usize>,
    /// Weight decay at the start, cosine-scheduled to --weight-decay-end (official 0.04).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Weight decay at the end (official 0.4).
    #[arg(long)]
    weight_decay_end: Option<f64>,
    /// Teacher EMA momentum at the start, cosine-scheduled to 1 (official 0.996).
    #[arg(long)]
    momentum_teacher: Option<f64>,
    /// Teacher temperature after its warmup (official 0.04).
    #[arg(long)]
    teacher_temp: Option<f64>,
    /// Teacher temperature at the start of its warmup (official 0.04).
    #[arg(long)]
    warmup_teacher_temp: Option<f64>,
    /// Epochs of teacher-temperature warmup (official 0).
    #[arg(long)]
    warmup_teacher_temp_epochs: Option<usize>,
    /// Per-parameter gradient norm clip; 0 disables (official 3.0).
    #[arg(long)]
    clip_grad: Option<f64>,
    /// Epochs with the head's last layer frozen (official 1).
    #[arg(long)]
    freeze_last_layer: Option<usize>,
    /// Stochastic depth of the student (official 0.1).
    #[arg(long)]
    drop_path_rate: Option<f64>,
    /// Local crops per image, seen by the student only (official 8).
    #[arg(long)]
    local_crops_number: Option<usize>,
    /// adamw, sgd or lars (official adamw).
    #[arg(long)]
    optimizer: Option<String>,
    /// Arithmetic of the forward and backward passes: f32; bf16 (on the CPU its matrix products,
    /// bf16 operands with f32 sums); or on a GPU f16 (with loss scaling, as main_dino.py's
    /// default --use_fp16). Weights, optimizer, EMA, norms and loss stay f32.
    #[arg(long, value_name = "f32|f16|bf16")]
    precision: Option<String>,
    /// Seed of initialisation, data order and augmentation (official 0).
    #[arg(long)]
    seed: Option<u64>,
    /// Threads preparing batches; 0 = all cores.
    #[arg(long)]
    num_workers: Option<usize>,
    /// Train on the first N images only (0 = all); for quick runs.
    #[arg(long)]
    max_images: Option<usize>,
}

impl TrainArgs {
    /// The flags given, as `key=value` overrides.
    fn flag_overrides(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut add = |key: &str, value: Option<String>| {
            if let Some(v) = value {
                out.push(format!("{key}={v}"));
            }
        };
        let quoted = |s: &Option<String>| s.as_ref().map(|v| format!("\"{v}\""));
        add("epochs", self.epochs.map(|v| v.to_string()));
        add("arch", quoted(&self.arch));
        add("patch_size", self.patch_size.map(|v| v.to_string()));
        add("out_dim", self.out_dim.map(|v| v.to_string()));
        add("batch_size", self.batch_size.map(|v| v.to_string()));
        for (key, value) in [
            ("lr", self.lr),
            ("min_lr", self.min_lr),
            ("weight_decay", self.weight_decay),
            ("weight_decay_end", self.weight_decay_end),
            ("momentum_teacher", self.momentum_teacher),
            ("teacher_temp", self.teacher_temp),
            ("warmup_teacher_temp", self.warmup_teacher_temp),
            ("clip_grad", self.clip_grad),
            ("drop_path_rate", self.drop_path_rate),
        ] {
            add(key, value.map(|v| format!("{v:?}")));
        }
        add("warmup_epochs", self.warmup_epochs.map(|v| v.to_string()));
        add("warmup_teacher_temp_epochs", self.warmup_teacher_temp_epochs.map(|v| v.to_string()));
        add("freeze_last_layer", self.freeze_last_layer.map(|v| v.to_string()));
        add("crops.local_crops", self.local_crops_number.map(|v| v.to_string()));
        add("optimizer", quoted(&self.optimizer));
        add("precision", quoted(&self.precision));
        add("seed", self.seed.map(|v| v.to_string()));
        add("num_workers", self.num_workers.map(|v| v.to_string()));
        add("max_images", self.max_images.map(|v| v.to_string()));
        out.extend(self.images.overrides());
        out
    }

    /// The settings of a new run: the preset, then --config, then the flags and --set.
    fn resolve_config(&self) -> anyhow::Result<TrainConfig> {
        let preset = self.preset.as_deref().unwrap_or("quick");
        let config = TrainConfig::preset(preset)
            .with_context(|| format!("unknown --preset '{preset}'; choose one of {}", PRESETS.join(", ")))?;
        self.apply_settings(config)
    }

    /// The settings of a resumed run: those recorded in its checkpoint, then --config, the flags
    /// and --set, which may change only what a resumed run can take (epochs, saving and
    /// monitoring, image limits), so that the config printed and saved is the one that runs.
    fn resumed_config(&self, checkpoint: &Path) -> anyhow::Result<TrainConfig> {
        if let Some(preset) = &self.preset {
            bail!(
                "--preset {preset} picks the settings of a new run, and --resume continues {} with its own; drop --preset, or train into a new --output",
                self.output.display()
            );
        }
        let saved = saved_config(checkpoint)?;
        let requested = self.apply_settings(saved.clone())?;
        saved.resume_changes(&requested).map_err(|e| {
            anyhow::anyhow!("{}: {e}; drop those flags, or train into a new --output", checkpoint.display())
        })?;
        Ok(requested)
    }

    fn apply_settings(&self, mut config: TrainConfig) -> anyhow::Result<TrainConfig> {
        if let Some(file) = &self.config {
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            config = config.with_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        }
        let overrides = self.flag_overrides();
        let all = overrides.iter().chain(&self.set).map(String::as_str);
        config.with_overrides(all).map_err(|e| anyhow::anyhow!("invalid setting: {e}"))
    }
}

/// Progress bar per epoch, a line per finished epoch; a stop at the first Ctrl-C or SIGTERM.
struct Progress {
    bar: ProgressBar,
    epochs: usize,
    stop: Arc<AtomicBool>,
}

impl Observer for Progress {
    fn epoch_start(&mut self, epoch: usize, iterations: usize) {
        self.bar = ProgressBar::new(iterations as u64).with_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:25}] {pos}/{len} {msg} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        self.bar.set_prefix(format!("{}/{}", epoch + 1, self.epochs));
    }

    fn iteration(&mut self, log: &IterationLog) {
        self.bar.set_position(log.iteration as u64 + 1);
        self.bar.set_message(format!(
            "loss {:.4} lr {:.2e} wd {:.3} {:.0} img/s",
            log.loss, log.lr, log.wd, log.images_per_sec
        ));
    }

    fn epoch_end(&mut self, log: &EpochLog) {
        self.bar.finish_and_clear();
        let knn = log.knn_top1.map(|k| format!(", teacher k-NN top-1 {k:.2} %")).unwrap_or_default();
        let skipped: usize = log.skipped_images.values().sum();
        let skipped = if skipped > 0 { format!(", {skipped} image files skipped") } else { String::new() };
        let h = &log.health;
        println!(
            "epoch {}/{}: loss {:.4} = teacher entropy {:.3} (ln K {:.2}) + KL {:.3}{knn}, batch entropy {:.2}, \
             center norm {:.3}, drift teacher {:.1e} / student {:.1e}, {:.0} img/s, {:.1} min{skipped}",
            log.epoch + 1,
            self.epochs,
            log.train_loss,
            h.teacher_entropy,
            h.entropy_ceiling,
            h.kl_divergence,
            h.teacher_batch_entropy,
            h.center_norm,
            h.teacher_drift,
            h.student_drift,
            log.images_per_sec,
            log.minutes
        );
    }

    fn note(&mut self, message: &str) {
        println!("{message}");
    }

    fn warning(&mut self, message: &str) {
        self.bar.suspend(|| eprintln!("warning: {message}"));
    }

    fn stop_requested(&mut self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// The flag the first Ctrl-C (SIGINT) or SIGTERM raises: training then finishes its iteration,
/// saves the checkpoint and exits 0. A second one quits at once, as Ctrl-C usually does.
fn stop_on_signal() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted again: quitting without saving (the last checkpoint is intact)");
            std::process::exit(130);
        }
        eprintln!("\nstopping after this iteration to save the checkpoint (Ctrl-C again quits at once)");
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(stop)
}

/// The images a run trains and monitors on, recorded in its directory (`data.toml`) so that
/// `--resume` continues on them without being told again (and never silently on the default).
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct RunData {
    data: String,
    val: Option<String>,
}

impl RunData {
    fn path(dir: &Path) -> PathBuf {
        dir.join("data.toml")
    }

    fn read(dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = Self::path(dir);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let record =
            toml::from_str(&text).with_context(|| format!("{} is damaged; give --data and --val", path.display()))?;
        Ok(Some(record))
    }

    /// Written whole or not at all (a temporary file renamed), as the checkpoints are.
    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(dir);
        let tmp = path.with_extension("toml.tmp");
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let text = toml::to_string(self).expect("two strings serialise");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// The flags' data, else (resuming a run that has a checkpoint) the run's recorded data,
    /// else `synthetic`; the validation images likewise, `synthetic#test` with `synthetic`.
    fn resolve(args: &TrainArgs) -> anyhow::Result<Self> {
        let dir = &args.output;
        let run = RunDir(dir.clone());
        let resuming = args.resume && run.resumable();
        let recorded = if resuming { Self::read(dir)? } else { None };
        let data = match (&args.data, &recorded) {
            (Some(data), Some(r)) if *data != r.data => {
                println!("note: resuming on --data {data}; {} started on {}", dir.display(), r.data);
                data.clone()
            }
            (Some(data), _) => data.clone(),
            (None, Some(r)) => r.data.clone(),
            (None, None) if resuming => bail!(
                "{} does not record the images it trained on (no data.toml); give --data (and --val) as when it started",
                dir.display()
            ),
            (None, None) => "synthetic".to_string(),
        };
        let val = args
            .val
            .clone()
            .or_else(|| recorded.and_then(|r| r.val))
            .or_else(|| (data == "synthetic").then(|| "synthetic#test".to_string()));
        Ok(Self { data, val })
    }
}

/// Whether `config` trains a ViT (patch size and depth mean nothing to a ResNet).
fn is_vit(config: &TrainConfig) -> anyhow::Result<bool> {
    Ok(config.model_config().map_err(anyhow::Error::msg)?.backbone.vit().is_some())
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let checkpoint = RunDir(args.output.clone()).checkpoint();
    let config =
        if args.resume && checkpoint.is_file() { args.resumed_config(&checkpoint)? } else { args.resolve_config()? };
    let specs = RunData::resolve(&args)?;
    let data = Arc::new(images::open(&specs.data, &config.images)?);
    let config = if config.sizes_from_images() {
        let side = data.typical_side()?;
        let fitted = config.fit_to_images(side);
        let patch = if is_vit(&fitted)? { format!(", patch {}", fitted.patch_size) } else { String::new() };
        println!(
            "sizes for {side} px images: global crops {} px, local crops {} px{patch} (recorded in config.toml)",
            fitted.crops.global_size, fitted.crops.local_size
        );
        fitted
    } else {
        config
    };
    let knn = match &specs.val {
        Some(spec) => {
            let queries = images::open(spec, &config.images)?;
            if queries.labels().is_none() || data.labels().is_none() {
                bail!("k-NN monitoring needs labels in both --data and --val ({spec} or {} has none)", specs.data);
            }
            Some(KnnData { bank: data.clone(), queries: Arc::new(queries) })
        }
        None => None,
    };
    let device = args.device.device()?;
    let vit =
        if is_vit(&config)? { format!("patch {}, depth {}, ", config.patch_size, config.depth) } else { String::new() };
    // The trainer uses the first `max_images` (the k-NN bank keeps them all).
    let images = match config.max_images {
        0 => data.len().to_string(),
        n if n >= data.len() => data.len().to_string(),
        n => format!("the first {n} of {}", data.len()),
    };
    println!(
        "training {} ({vit}K = {}) on {} ({images} images), {} epoch{}, batch {}, into {}",
        config.arch,
        config.out_dim,
        data.name,
        config.epochs,
        if config.epochs == 1 { "" } else { "s" },
        config.batch_size,
        args.output.display()
    );
    specs.write(&args.output)?;
    let mut progress = Progress { bar: ProgressBar::hidden(), epochs: config.epochs, stop: stop_on_signal()? };
    let summary = train(&config, data, knn, &args.output, &device, args.resume, &mut progress)?;
    let run = RunDir(args.output.clone());
    if let Some(at) = summary.stopped_at {
        progress.bar.finish_and_clear();
        println!(
            "stopped after {at}; checkpoint saved to {}; continue with (the run's data and settings are recorded):\n  dino train --output '{}' --resume",
            run.checkpoint().display(),
            args.output.display()
        );
        return Ok(());
    }
    if let Some(last) = &summary.last_epoch {
        let loss = match summary.first_loss {
            Some(first) => format!("loss {first:.4} (first iteration) -> {:.4} (last epoch)", last.train_loss),
            None => format!("loss {:.4}", last.train_loss),
        };
        let knn = match (summary.knn_before, last.knn_top1) {
            (Some(before), Some(after)) => format!("; teacher k-NN top-1 {before:.2} % -> {after:.2} %"),
            (None, Some(after)) => format!("; teacher k-NN top-1 {after:.2} %"),
            _ => String::new(),
        };
        println!("done in {:.1} min: {loss}{knn}", summary.minutes);
        if let (Some(pixels), Some(after)) = (summary.knn_pixels, last.knn_top1) {
            let verdict = if after > pixels { "beat" } else { "did NOT beat" };
            println!(
                "the teacher's features {verdict} the raw pixels: k-NN top-1 {after:.2} % vs {pixels:.2} % on the same images"
            );
        }
    }
    println!(
        "run directory {}: log.txt, training.png, {}, {}",
        args.output.display(),
        run.checkpoint().file_name().unwrap().to_string_lossy(),
        run.teacher_backbone().file_name().unwrap().to_string_lossy()
    );
    Ok(())
}
