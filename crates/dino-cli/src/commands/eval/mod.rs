//! `dino eval`: evaluations of frozen features.

mod copydetection;
mod retrieval;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use burn::tensor::{Device, Tensor, TensorData};
use clap::{Args, Subcommand, ValueEnum};
use dino_data::{Dataset, EvalTransform, ImagePolicy, LinearTrainTransform};
use dino_eval::embedding::pca_2d;
use dino_eval::figures::plot_embedding;
use dino_eval::{
    DatasetFeatures, ExtractOptions, FeatureSpec, Features, LinearConfig, LinearProgress, TrainFeatures, knn_classify,
    pixel_features, read_labeled_features, train_linear, write_labeled_features,
};

use crate::device::ComputeArgs;
use crate::images::{self, ImageArgs, warn_skipped};
use crate::load::{WeightArgs, WeightFileArgs};

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Weighted k-NN classification on frozen features (the official eval_knn.py protocol).
    Knn(Box<KnnArgs>),
    /// Linear classifier on frozen features (the official eval_linear.py protocol).
    Linear(Box<LinearArgs>),
    /// Picture of the feature space: PCA of labeled images' features, coloured by class.
    Embedding(Box<EmbeddingArgs>),
    /// Image retrieval on Revisited Oxford/Paris: mAP and mP@k, Medium and Hard (the official
    /// eval_image_retrieval.py protocol).
    Retrieval(Box<retrieval::RetrievalArgs>),
    /// Copy detection on Copydays: CLS + GeM features, optional whitening, mAP per block of
    /// edits (the official eval_copy_detection.py protocol).
    Copydetection(Box<copydetection::CopyDetectionArgs>),
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
    #[command(flatten)]
    source: FeatureArgs,
    /// Numbers of neighbours, comma-separated (official 10,20,100,200).
    #[arg(long, value_delimiter = ',', default_value = "10,20,100,200")]
    k: Vec<usize>,
    /// Temperature of the vote weights exp(similarity / T) (official 0.07).
    #[arg(long, default_value_t = 0.07)]
    temperature: f64,
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
    #[command(flatten)]
    compute: ComputeArgs,
}

/// Which features the k-NN and the embedding use: a backbone's or the raw pixels.
#[derive(Debug, Args)]
struct FeatureArgs {
    /// Weights of the backbone (not needed with --features pixels).
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    #[command(flatten)]
    weight_file: WeightFileArgs,
    /// What to use: the backbone's final-normed CLS token or the raw pixels.
    #[arg(long, value_enum, default_value = "backbone")]
    features: FeatureSource,
    #[command(flatten)]
    size: SizeArgs,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128, value_name = "N")]
    batch_size: usize,
    #[command(flatten)]
    images: ImageArgs,
}

impl FeatureArgs {
    /// L2-normalised features of the first `count` images of each labeled `(dataset, count,
    /// name)` with their labels (images that fail to decode have no row), and a description of
    /// what they are.
    fn compute(&self, sets: &[(&Dataset, usize, &str)], device: &Device) -> anyhow::Result<(Vec<Labeled>, String)> {
        let labeled = |f: DatasetFeatures, data: &Dataset, name: &str| -> Labeled {
            warn_skipped(name, &f.skipped, data.len());
            let labels = f.labels(data).expect("evaluation datasets are labeled");
            (f.features, labels)
        };
        match self.features {
            FeatureSource::Pixels => {
                let transform = self.size.transform(None);
                let features = sets
                    .iter()
                    .map(|(data, count, name)| Ok(labeled(pixel_features(data, *count, &transform)?, data, name)))
                    .collect::<anyhow::Result<_>>()?;
                Ok((features, "raw pixels".into()))
            }
            FeatureSource::Backbone => {
                let weights = self.weights.clone().context("--weights FILE is required (or use --features pixels)")?;
                let (config, backbone) = self.weight_file.load(&weights, device)?;
                let options = ExtractOptions {
                    transform: self.size.transform(Some(config.img_size() as u32)),
                    features: FeatureSpec::default(),
                    l2_norm: true,
                    batch_size: self.batch_size.max(1),
                };
                let features = sets
                    .iter()
                    .map(|(data, count, name)| {
                        Ok(labeled(
                            images::backbone_features(&backbone, data, *count, &options, device, name)?,
                            data,
                            name,
                        ))
                    })
                    .collect::<anyhow::Result<_>>()?;
                Ok((features, format!("{} features", weights.display())))
            }
        }
    }
}

#[derive(Debug, Args)]
pub struct EmbeddingArgs {
    /// Labeled images to embed (SPEC, e.g. /usr/share/datasets/fashion-mnist#test).
    #[arg(long, value_name = "SPEC")]
    data: String,
    #[command(flatten)]
    source: FeatureArgs,
    /// Embed only the first N images (0 = all).
    #[arg(long, default_value_t = 2000, value_name = "N")]
    max_images: usize,
    /// The PNG to write.
    #[arg(long, short, default_value = "embedding.png", value_name = "FILE")]
    output: PathBuf,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// How evaluation images are resized (`Resize(256)` + `CenterCrop(224)` in the official scripts).
#[derive(Debug, Args)]
struct SizeArgs {
    /// Resize the shorter side to N px first (default: 256 for 224 px models as the official
    /// scripts, else the model's training size; 0 keeps the size).
    #[arg(long, value_name = "N")]
    resize: Option<u32>,
    /// Then center-crop N px (default: 224 for 224 px models, else the training size; 0 = none).
    #[arg(long, value_name = "N")]
    crop: Option<u32>,
}

impl SizeArgs {
    /// The transform for a backbone trained at `trained` px (None: raw pixels, no defaults).
    fn transform(&self, trained: Option<u32>) -> EvalTransform {
        let (resize, crop) = match trained {
            Some(224) => (Some(256), Some(224)),
            other => (other, other),
        };
        let pick = |v: Option<u32>, default: Option<u32>| match v {
            Some(0) => None,
            Some(n) => Some(n),
            None => default,
        };
        EvalTransform { resize: pick(self.resize, resize), crop: pick(self.crop, crop) }
    }
}

#[derive(Debug, Args)]
pub struct LinearArgs {
    /// Labeled images to train the classifier on (SPEC, e.g. /usr/share/datasets/fashion-mnist).
    #[arg(long, value_name = "SPEC")]
    train: String,
    /// Labeled images to evaluate it on (SPEC, e.g. /usr/share/datasets/fashion-mnist#test).
    #[arg(long, value_name = "SPEC")]
    test: String,
    #[command(flatten)]
    weights: WeightArgs,
    /// Epochs (official 100).
    #[arg(long, default_value_t = 100)]
    epochs: usize,
    /// Learning rate for a batch of 256, scaled by batch / 256 and cosine-annealed to 0
    /// (official 0.001).
    #[arg(long, default_value_t = 0.001)]
    lr: f64,
    /// Images per SGD step (official 128).
    #[arg(long, default_value_t = 128, value_name = "N")]
    batch_size: usize,
    /// Concatenate the CLS tokens of the last N blocks (official 4 for ViT-S, 1 for ViT-B).
    #[arg(long, default_value_t = 4, value_name = "N")]
    n_last_blocks: usize,
    /// Also concatenate the mean of the last block's patch tokens (official: for ViT-B).
    #[arg(long)]
    avgpool: bool,
    #[command(flatten)]
    size: SizeArgs,
    /// Train on the center-crop features, computed once, instead of a new random-resized-crop
    /// and flip of every image each epoch: much faster, not the official protocol.
    #[arg(long)]
    no_augmentation: bool,
    /// Train on only the first N images (0 = all).
    #[arg(long, default_value_t = 0, value_name = "N")]
    max_train: usize,
    /// Evaluate on only the first N test images (0 = all).
    #[arg(long, default_value_t = 0, value_name = "N")]
    max_test: usize,
    /// Seed of the initialisation, order and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory for log.txt (one JSON line per epoch) and the classifier (linear.safetensors).
    #[arg(long, short, default_value = "runs/linear", value_name = "DIR")]
    output: PathBuf,
    #[command(flatten)]
    images: ImageArgs,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(command: EvalCommand) -> anyhow::Result<()> {
    match command {
        EvalCommand::Knn(args) => knn(*args),
        EvalCommand::Linear(args) => linear(*args),
        EvalCommand::Embedding(args) => embedding(*args),
        EvalCommand::Retrieval(args) => retrieval::run(*args),
        EvalCommand::Copydetection(args) => copydetection::run(*args),
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
    let (device, _packed) = args.compute.inference_device()?;
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

/// Opens a dataset that must have labels.
fn labeled(spec: &str, policy: &ImagePolicy) -> anyhow::Result<(Dataset, Vec<u32>)> {
    let data = images::open(spec, policy)?;
    let labels = data
        .labels()
        .with_context(|| format!("{spec} has no labels; evaluation needs class subfolders, IDX or CIFAR data"))?
        .to_vec();
    Ok((data, labels))
}

/// Bank and test features with their labels, from images.
fn compute_features(args: &KnnArgs) -> anyhow::Result<(Labeled, Labeled, String)> {
    let policy = args.source.images.policy()?;
    let (train, _) = labeled(args.train.as_deref().unwrap_or_default(), &policy)?;
    let (test, _) = labeled(args.test.as_deref().unwrap_or_default(), &policy)?;
    let (device, _packed) = args.compute.inference_device()?;
    let sets = [(&train, limit(args.max_train), "bank"), (&test, limit(args.max_test), "test")];
    let (mut features, what) = args.source.compute(&sets, &device)?;
    let queries = features.pop().expect("two sets");
    let bank = features.pop().expect("two sets");
    Ok((bank, queries, what))
}

/// PCA of the L2-normalised features (the space the k-NN searches), coloured by class.
fn embedding(args: EmbeddingArgs) -> anyhow::Result<()> {
    let (data, _) = labeled(&args.data, &args.source.images.policy()?)?;
    let (device, _packed) = args.compute.inference_device()?;
    let (features, what) = args.source.compute(&[(&data, limit(args.max_images), "features")], &device)?;
    let (features, labels) = &features[0];
    let points = pca_2d(features);
    let source = match (&args.source.features, &args.source.weights) {
        (FeatureSource::Backbone, Some(w)) => w.file_name().map_or(what.clone(), |f| f.to_string_lossy().into_owned()),
        _ => what,
    };
    let title = format!("PCA of {source}, {} images", features.rows);
    plot_embedding(&points, labels, &data.classes, &title, &args.output)
        .map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", args.output.display()))?;
    println!("{} images of {} -> {}", features.rows, data.name, args.output.display());
    Ok(())
}

fn linear(args: LinearArgs) -> anyhow::Result<()> {
    if args.epochs == 0 || args.batch_size == 0 {
        bail!("--epochs and --batch-size must be positive");
    }
    if args.lr.is_nan() || args.lr <= 0.0 {
        bail!("--lr must be positive");
    }
    let (device, _packed) = args.compute.inference_device()?;
    let (model, backbone) = args.weights.load(&device)?;
    let features = FeatureSpec::new(args.n_last_blocks, args.avgpool, &model)
        .map_err(|e| anyhow::anyhow!("--n-last-blocks: {e}"))?;
    let policy = args.images.policy()?;
    let (train, train_labels) = labeled(&args.train, &policy)?;
    let (test, _) = labeled(&args.test, &policy)?;
    let transform = args.size.transform(Some(model.img_size() as u32));
    let options = ExtractOptions { transform, features, l2_norm: false, batch_size: args.batch_size };
    let config = LinearConfig {
        epochs: args.epochs,
        lr: args.lr,
        batch_size: args.batch_size,
        features,
        seed: args.seed,
        ..LinearConfig::default()
    };
    std::fs::create_dir_all(&args.output).with_context(|| format!("cannot create {}", args.output.display()))?;
    let log_path = args.output.join("log.txt");
    let mut log = std::fs::File::create(&log_path).with_context(|| format!("cannot write {}", log_path.display()))?;

    let test_features =
        images::backbone_features(&backbone, &test, limit(args.max_test), &options, &device, "test features")?;
    warn_skipped("test features", &test_features.skipped, test.len());
    let test_labels = &test_features.labels(&test).expect("labeled");
    let to_tensor = |f: Features| Tensor::<2>::from_data(TensorData::new(f.values, [f.rows, f.dim]), &device);
    let test_features = to_tensor(test_features.features);
    let count = limit(args.max_train).min(train.len());
    let fixed = match args.no_augmentation {
        true => {
            let f = images::backbone_features(&backbone, &train, count, &options, &device, "train features")?;
            warn_skipped("train features", &f.skipped, train.len());
            let labels = f.labels(&train).expect("labeled");
            Some((to_tensor(f.features), labels))
        }
        false => None,
    };
    let (source, labels) = if let Some((features, labels)) = &fixed {
        (TrainFeatures::Fixed { features, labels }, &labels[..])
    } else {
        let size = transform.crop.unwrap_or(model.img_size() as u32);
        // All labels: an image that fails to decode is replaced by the next usable one, anywhere.
        let augmented = TrainFeatures::Augmented {
            backbone: &backbone,
            data: &train,
            count,
            transform: LinearTrainTransform::official(size),
        };
        (augmented, &train_labels[..])
    };
    println!(
        "linear probe on {} ({} x {} features, {}): {count} training images, {} test images, {} epochs",
        args.weights.weights.display(),
        features.n_last_blocks,
        model.embed_dim(),
        if args.no_augmentation { "fixed center crops" } else { "random-resized-crop + flip views" },
        test_labels.len(),
        args.epochs,
    );
    let bar = images::bar(count, "epoch 1");
    let mut log_error = None;
    let (classifier, history) =
        train_linear(&config, source, labels, (&test_features, test_labels), &device, |p| match p {
            LinearProgress::Batch { epoch, done, .. } => {
                bar.set_prefix(format!("epoch {}/{}", epoch + 1, args.epochs));
                bar.set_position(done as u64);
            }
            LinearProgress::Epoch(e) => {
                bar.suspend(|| {
                    println!(
                        "epoch {}/{}: loss {:.4}, test top1 {:.2} top5 {:.2}, best top1 {:.2}",
                        e.epoch + 1,
                        args.epochs,
                        e.train_loss,
                        e.test_top1,
                        e.test_top5,
                        e.best_top1
                    )
                });
                if let Err(err) = writeln!(log, "{}", e.log_line()) {
                    log_error.get_or_insert(err);
                }
                bar.reset();
            }
        })?;
    bar.finish_and_clear();
    if let Some(err) = log_error {
        return Err(err).with_context(|| format!("cannot write {}", log_path.display()));
    }
    let saved = args.output.join("linear.safetensors");
    classifier.save(&saved, &features)?;
    let last = history.last().expect("epochs > 0");
    println!(
        "Top-1 test accuracy: {:.2} (top-5 {:.2}; best top-1 {:.2})",
        last.test_top1, last.test_top5, last.best_top1
    );
    println!("classifier: {}, log: {}", saved.display(), log_path.display());
    Ok(())
}
