//! `dino eval`: evaluations of frozen features.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use dino_data::{Dataset, EvalTransform};
use dino_eval::{
    ExtractOptions, FeatureSpec, Features, dataset_features, knn_classify, pixel_features, read_labeled_features,
    write_labeled_features,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::DeviceArg;
use crate::load::WeightArgs;

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Weighted k-NN classification on frozen features (the official eval_knn.py protocol).
    Knn(KnnArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FeatureSource {
    /// The final-normed CLS token of the backbone given by --weights.
    Backbone,
    /// The raw pixels (values in [0, 1]): the baseline.
    Pixels,
}

#[derive(Debug, Args)]
pub struct KnnArgs {
    /// Labeled images for the feature bank (SPEC, e.g. /usr/share/datasets/fashion-mnist).
    #[arg(long, value_name = "SPEC", required_unless_present = "load_features")]
    train: Option<String>,
    /// Labeled images to classify (SPEC, e.g. /usr/share/datasets/fashion-mnist#test).
    #[arg(long, value_name = "SPEC", required_unless_present = "load_features")]
    test: Option<String>,
    /// Weights of the backbone (not needed with --features pixels).
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    #[command(flatten)]
    weight_args: WeightFlags,
    /// What to classify: the backbone's features or the raw pixels.
    #[arg(long, value_enum, default_value = "backbone")]
    features: FeatureSource,
    /// Numbers of neighbours, comma-separated (official 10,20,100,200).
    #[arg(long, value_delimiter = ',', default_value = "10,20,100,200")]
    k: Vec<usize>,
    /// Temperature of the vote weights exp(similarity / T) (official 0.07).
    #[arg(long, default_value_t = 0.07)]
    temperature: f64,
    /// Resize the shorter side to N px first (default: 256 for 224 px models as the official
    /// script, else the model's training size; 0 keeps the size).
    #[arg(long, value_name = "N")]
    resize: Option<u32>,
    /// Then center-crop N px (default: 224 for 224 px models, else the training size; 0 = none).
    #[arg(long, value_name = "N")]
    crop: Option<u32>,
    /// Use only the first N bank images (0 = all).
    #[arg(long, default_value_t = 0, value_name = "N")]
    max_train: usize,
    /// Classify only the first N test images (0 = all).
    #[arg(long, default_value_t = 0, value_name = "N")]
    max_test: usize,
    /// Save the bank and test features with their labels to DIR/train.safetensors and
    /// DIR/test.safetensors.
    #[arg(long, value_name = "DIR")]
    dump_features: Option<PathBuf>,
    /// Classify features saved by --dump-features instead of computing them (--train and --test
    /// are then not read).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["train", "test", "weights"])]
    load_features: Option<PathBuf>,
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128, value_name = "N")]
    batch_size: usize,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

/// The weight flags of `extract`, without `--weights` (optional here).
#[derive(Debug, Args)]
pub struct WeightFlags {
    #[arg(long, value_enum, default_value = "teacher")]
    checkpoint_key: crate::load::KeyArg,
    #[arg(long, value_name = "NAME")]
    arch: Option<String>,
    #[arg(long, value_name = "N")]
    patch_size: Option<usize>,
    #[arg(long, value_name = "N")]
    num_heads: Option<usize>,
}

pub fn run(command: EvalCommand) -> anyhow::Result<()> {
    match command {
        EvalCommand::Knn(args) => knn(args),
    }
}

fn limit(n: usize) -> usize {
    if n == 0 { usize::MAX } else { n }
}

fn knn(args: KnnArgs) -> anyhow::Result<()> {
    if args.k.is_empty() || args.k.contains(&0) {
        bail!("--k needs positive numbers of neighbours");
    }
    if args.temperature.is_nan() || args.temperature <= 0.0 {
        bail!("--temperature must be positive");
    }
    let ((bank, bank_labels), (queries, query_labels), what) = match &args.load_features {
        Some(dir) => {
            let bank = read_labeled_features(&dir.join("train.safetensors"))?;
            let queries = read_labeled_features(&dir.join("test.safetensors"))?;
            (bank, queries, format!("features from {}", dir.display()))
        }
        None => compute_features(&args)?,
    };
    if let Some(dir) = &args.dump_features {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_labeled_features(&bank, &bank_labels, &dir.join("train.safetensors"))?;
        write_labeled_features(&queries, &query_labels, &dir.join("test.safetensors"))?;
    }
    if bank.dim != queries.dim {
        bail!("bank and test features differ in size ({} vs {}); give --resize and --crop", bank.dim, queries.dim);
    }
    let device = args.device.device()?;
    let results = knn_classify(
        &bank.values,
        &bank_labels,
        &queries.values,
        &query_labels,
        bank.dim,
        &args.k,
        args.temperature,
        &device,
    );
    println!("k-NN on {what}: {} bank images, {} test images, T = {}", bank.rows, queries.rows, args.temperature);
    for r in &results {
        println!("{}-NN: top1 {:.2} top5 {:.2}", r.k, r.top1, r.top5);
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "features": what,
            "bank": bank.rows,
            "test": queries.rows,
            "temperature": args.temperature,
            "results": results.iter().map(|r| serde_json::json!({"k": r.k, "top1": r.top1, "top5": r.top5})).collect::<Vec<_>>(),
        });
        let json = format!("{json:#}\n");
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

type Labeled = (Features, Vec<u32>);

/// Bank and test features with their labels, from images.
fn compute_features(args: &KnnArgs) -> anyhow::Result<(Labeled, Labeled, String)> {
    let (train_spec, test_spec) = (args.train.as_deref().unwrap_or_default(), args.test.as_deref().unwrap_or_default());
    let train = Dataset::open(train_spec)?;
    let test = Dataset::open(test_spec)?;
    let (Some(train_labels), Some(test_labels)) = (train.labels(), test.labels()) else {
        bail!(
            "k-NN needs labeled data: {train_spec} or {test_spec} has no labels (use class subfolders, IDX or CIFAR)"
        );
    };
    let size_or = |v: Option<u32>, default: Option<u32>| match v {
        Some(0) => None,
        Some(n) => Some(n),
        None => default,
    };
    let device = args.device.device()?;
    let (bank, queries, what): (Features, Features, String) = match args.features {
        FeatureSource::Pixels => {
            let transform = EvalTransform { resize: size_or(args.resize, None), crop: size_or(args.crop, None) };
            let bank = pixel_features(&train, limit(args.max_train), &transform)?;
            let queries = pixel_features(&test, limit(args.max_test), &transform)?;
            (bank, queries, "raw pixels".into())
        }
        FeatureSource::Backbone => {
            let weights = args.weights.clone().context("--weights FILE is required (or use --features pixels)")?;
            let flags = &args.weight_args;
            let loader = WeightArgs {
                weights,
                checkpoint_key: flags.checkpoint_key,
                arch: flags.arch.clone(),
                patch_size: flags.patch_size,
                num_heads: flags.num_heads,
            };
            let (config, vit) = loader.load(&device)?;
            let trained = config.img_size as u32;
            let (resize, crop) = if trained == 224 { (256, 224) } else { (trained, trained) };
            let options = ExtractOptions {
                transform: EvalTransform {
                    resize: size_or(args.resize, Some(resize)),
                    crop: size_or(args.crop, Some(crop)),
                },
                features: FeatureSpec::default(),
                l2_norm: true,
                batch_size: args.batch_size.max(1),
            };
            let run = |data: &Dataset, n: usize, label: &str| -> anyhow::Result<Features> {
                let count = n.min(data.len());
                let bar = ProgressBar::new(count as u64).with_style(
                    ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} images, eta {eta}")
                        .expect("valid template")
                        .progress_chars("=> "),
                );
                bar.set_prefix(label.to_string());
                let f = dataset_features(&vit, data, count, &options, &device, |done| bar.set_position(done as u64))?;
                bar.finish_and_clear();
                Ok(f)
            };
            let bank = run(&train, limit(args.max_train), "bank")?;
            let queries = run(&test, limit(args.max_test), "test")?;
            (bank, queries, format!("{} teacher features", args.weights.as_ref().unwrap().display()))
        }
    };
    let bank_labels = train_labels[..bank.rows].to_vec();
    let query_labels = test_labels[..queries.rows].to_vec();
    Ok(((bank, bank_labels), (queries, query_labels), what))
}
