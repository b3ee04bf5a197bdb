//! `dino bench`: training-step, inference and augmentation speed, printed as one JSON object per
//! measurement with the field names of `shared/bench/torch_reference.py`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use dino_data::bench::bench_augment;
use dino_data::list_images;
use dino_eval::bench::bench_infer;
use dino_train::bench::{BENCH_PRESETS, BenchPreset, bench_train};
use dino_train::{Precision, TrainConfig};
use serde_json::{Value, json};

use crate::device::DeviceArg;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Network, crops and batch: small28, tiny32, official_s16 or resnet18_32 (as the reference script).
    #[arg(long, value_name = "NAME", required_unless_present_any = ["augment", "config"])]
    preset: Option<String>,
    /// Instead of a preset: time what a run trains, from its `config.toml` (network, head,
    /// crops, batch, optimizer).
    #[arg(long, value_name = "FILE", conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// Threads (default: all cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Timed steps after two warm-up steps; the median is reported.
    #[arg(long, default_value_t = 6, value_name = "N")]
    steps: usize,
    /// Override the preset's batch size.
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
    /// Instead: time the official multi-crop augmentation (decoding included) of the images
    /// under DIR, on one thread and on all threads.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["preset", "config"])]
    augment: Option<PathBuf>,
    /// Seconds per augmentation measurement.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Arithmetic of the passes (`dino train --precision`): on the CPU, bf16 makes every matrix
    /// product bf16 with f32 sums, inference included; on a GPU it is the training step's.
    #[arg(long, default_value = "f32", value_name = "f32|f16|bf16")]
    precision: Precision,
    /// Time only the training step, or only inference (default: both, training first).
    #[arg(long, value_enum, value_name = "WHAT")]
    only: Option<Measurement>,
}

/// What `dino bench --preset` or `--config` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Measurement {
    /// The training step (`"what": "train"`).
    Train,
    /// The backbone's forward pass without gradients (`"what": "infer"`).
    Infer,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("cannot set up the thread pool")?;
    }
    let base = json!({
        "impl": "dino-rs",
        "version": env!("CARGO_PKG_VERSION"),
        "threads": rayon::current_num_threads(),
        "device": format!("{:?}", args.device).to_lowercase(),
        "precision": args.precision.name(),
    });
    let print = |what: &str, fields: Vec<Value>| {
        let mut object = base.as_object().expect("an object").clone();
        object.insert("what".into(), what.into());
        for field in fields {
            object.extend(field.as_object().expect("an object").clone());
        }
        if let Some(mib) = peak_rss_mib() {
            object.insert("peak_rss_mib".into(), json!(mib));
        }
        println!("{}", Value::Object(object));
    };
    if let Some(dir) = &args.augment {
        let files = list_images(dir)?.paths;
        print("augment", vec![json!(bench_augment(&files, args.seconds)?)]);
        return Ok(());
    }
    let (mut config, mut described) = match &args.config {
        Some(path) => run_config(path)?,
        None => {
            let name = args.preset.as_deref().expect("clap requires --preset without --augment or --config");
            let names: Vec<&str> = BENCH_PRESETS.iter().map(|p| p.preset).collect();
            let preset = BenchPreset::find(name)
                .with_context(|| format!("unknown --preset '{name}'; choose one of {}", names.join(", ")))?;
            (preset.train_config(), json!(preset))
        }
    };
    config.batch_size = args.batch.unwrap_or(config.batch_size).max(1);
    described["batch"] = json!(config.batch_size);
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let device = args.device.device()?;
    let step_precision = dino_train::precision::use_precision(args.precision, &device).map_err(anyhow::Error::msg)?;
    if let Some(warning) = dino_train::precision::slow_precision_warning(args.precision, &device) {
        eprintln!("warning: {warning}");
    }
    if args.only != Some(Measurement::Infer) {
        print("train", vec![described.clone(), json!(bench_train(&config, args.steps, step_precision, &device))]);
    }
    if args.only != Some(Measurement::Train) {
        let model = config.model_config().map_err(anyhow::Error::msg)?;
        let side = config.crops.global_size as usize;
        // As the inference commands run (`ComputeArgs::inference_device`).
        let _packed = dino_kernels::keep_packed_weights();
        print("infer", vec![described, json!(bench_infer(&model, config.batch_size, side, args.steps, &device))]);
    }
    Ok(())
}

/// The settings of a run from its `config.toml`, and the fields that describe them in the output
/// (those of a preset where they apply).
fn run_config(path: &Path) -> anyhow::Result<(TrainConfig, Value)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let config = TrainConfig::default().with_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if config.sizes_from_images() {
        bail!(
            "{} leaves sizes to the images (0); give the config.toml a run wrote, which records them",
            path.display()
        );
    }
    config.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let described = json!({
        "config": path.display().to_string(),
        "arch": config.arch,
        "patch": config.patch_size,
        "depth": config.depth,
        "global_px": config.crops.global_size,
        "local_px": config.crops.local_size,
        "n_local": config.crops.local_crops,
        "out_dim": config.out_dim,
    });
    Ok((config, described))
}

/// Peak resident memory of this process so far in MiB (`VmHWM`), where the OS reports it.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn peak_rss_is_read_on_linux() {
        assert!(super::peak_rss_mib().unwrap() > 1.0);
    }
}
