//! `dino bench`: training-step, inference and augmentation speed, printed as one JSON object per
//! measurement with the field names of `shared/bench/torch_reference.py`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use dino_data::bench::bench_augment;
use dino_data::list_images;
use dino_eval::bench::bench_infer;
use dino_train::Precision;
use dino_train::bench::{BENCH_PRESETS, BenchPreset, bench_train};
use serde_json::{Value, json};

use crate::device::DeviceArg;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Network, crops and batch: small28, tiny32, official_s16 or resnet18_32 (as the reference script).
    #[arg(long, value_name = "NAME", required_unless_present = "augment")]
    preset: Option<String>,
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
    #[arg(long, value_name = "DIR", conflicts_with = "preset")]
    augment: Option<PathBuf>,
    /// Seconds per augmentation measurement.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Arithmetic of the training step's passes (`dino train --precision`); inference is f32.
    #[arg(long, default_value = "f32", value_name = "f32|f16|bf16")]
    precision: Precision,
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
    let name = args.preset.as_deref().expect("clap requires --preset without --augment");
    let names: Vec<&str> = BENCH_PRESETS.iter().map(|p| p.preset).collect();
    let mut preset = BenchPreset::find(name)
        .with_context(|| format!("unknown --preset '{name}'; choose one of {}", names.join(", ")))?;
    if let Some(batch) = args.batch {
        preset.batch = batch.max(1);
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let device = args.device.device()?;
    dino_train::precision::check_support(args.precision, &device).map_err(anyhow::Error::msg)?;
    print("train", vec![json!(preset), json!(bench_train(&preset, args.steps, args.precision, &device))]);
    let model = preset.train_config().model_config().map_err(anyhow::Error::msg)?;
    print(
        "infer",
        vec![json!(preset), json!(bench_infer(&model, preset.batch, preset.global_px, args.steps, &device))],
    );
    Ok(())
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
