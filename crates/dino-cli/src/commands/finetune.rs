//! `dino finetune`: supervised fine-tuning of a backbone with a linear head on labeled images
//! (`dino_train::finetune`), the pretrained weights or, for the baseline, the same network
//! freshly initialised.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use dino_data::EvalTransform;
use dino_model::weights::{save_backbone, save_classifier};
use dino_model::{Backbone, Classifier};
use dino_train::finetune::{FinetuneConfig, FinetuneProgress, finetune};

use crate::device::ComputeArgs;
use crate::images::{self, ImageArgs, bar};
use crate::load::WeightArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Init {
    /// The weights of --weights.
    Pretrained,
    /// The architecture of --weights, freshly initialised (the from-scratch baseline).
    Random,
}

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    weights: WeightArgs,
    /// Start from the weights, or from the same network freshly initialised.
    #[arg(long, value_enum, default_value = "pretrained")]
    init: Init,
    /// Labeled training images (SPEC, e.g. /usr/share/datasets/fashion-mnist).
    #[arg(long, value_name = "SPEC")]
    train: String,
    /// Labeled test images, evaluated after every epoch (SPEC, e.g. /usr/share/datasets/fashion-mnist#test).
    #[arg(long, value_name = "SPEC")]
    test: String,
    /// Where log.txt, config.json and the best epoch's network go.
    #[arg(long, short, default_value = "finetune", value_name = "DIR")]
    output: PathBuf,
    /// Passes over the training images, each followed by a test.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 64, value_name = "N")]
    batch_size: usize,
    /// Peak learning rate for a batch of 512, scaled by batch / 512 (DeiT 5e-4).
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// Linear warm-up epochs before the cosine decay.
    #[arg(long, default_value_t = 1, value_name = "N")]
    warmup_epochs: usize,
    /// AdamW weight decay on weights (not biases or norms) (DeiT 0.05).
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    /// Label smoothing (DeiT 0.1).
    #[arg(long, default_value_t = 0.1)]
    label_smoothing: f64,
    /// Stochastic depth at the last block, linear from 0 (DeiT 0.1; ViTs only).
    #[arg(long, default_value_t = 0.1)]
    drop_path: f64,
    /// Layer-wise lr decay, e.g. 0.75: block i learns at decay^(depth + 1 - i) of the head's lr.
    #[arg(long, value_name = "DECAY")]
    layer_decay: Option<f64>,
    /// Range of the training crops' share of the image area (torchvision's 0.08-1; for 28-32 px
    /// images larger crops such as 0.4 1 keep the object).
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"], default_values_t = [0.08, 1.0])]
    crop_scale: Vec<f64>,
    /// Side of the training crops and test images [default: the backbone's training size].
    #[arg(long, value_name = "N")]
    size: Option<u32>,
    /// Train on the first N images only (0 = all).
    #[arg(long, default_value_t = 0, value_name = "N")]
    max_train: usize,
    /// Seed of the head, a random init, the order, the crops and the stochastic depth.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    images: ImageArgs,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(args: FinetuneArgs) -> anyhow::Result<()> {
    let policy = args.images.policy()?;
    let mut train = images::open(&args.train, &policy)?;
    let test = images::open(&args.test, &policy)?;
    if args.max_train > 0 {
        train.truncate(args.max_train);
    }
    let device = args.compute.device()?;
    // Built on the autodiff device, where the parameters are trained (and stochastic depth acts).
    let train_device = device.clone().autodiff();
    let (config, backbone) = args.weights.load(&train_device)?;
    let backbone = match args.init {
        Init::Pretrained => backbone,
        Init::Random => {
            dino_model::init::seed(args.seed);
            Backbone::new(&config, &train_device)
        }
    };
    let size = args.size.unwrap_or(config.img_size() as u32);
    let recipe = FinetuneConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        warmup_epochs: args.warmup_epochs,
        weight_decay: args.weight_decay,
        label_smoothing: args.label_smoothing,
        drop_path: args.drop_path,
        layer_decay: args.layer_decay,
        crop_scale: (args.crop_scale[0], args.crop_scale[1]),
        size,
        seed: args.seed,
        ..FinetuneConfig::default()
    };
    if let Err(problem) = recipe.validate() {
        bail!("{problem}");
    }
    let Some(classes) = train.labels().and_then(|l| l.iter().chain(test.labels().unwrap_or(&[])).max()) else {
        bail!("{}: fine-tuning needs labeled images (class folders, IDX or CIFAR files)", args.train);
    };
    let classes = *classes as usize + 1;
    // Test images as the evaluation commands see them: Resize(256) + CenterCrop(224) for a
    // 224 px network, else the network's own size.
    let test_transform = match size {
        224 => EvalTransform { resize: Some(256), crop: Some(224) },
        s => EvalTransform { resize: Some(s), crop: Some(s) },
    };
    dino_model::init::seed(args.seed ^ 0x5eed);
    let model = Classifier::new(backbone.with_drop_path(recipe.drop_path), classes, &train_device);

    std::fs::create_dir_all(&args.output).with_context(|| format!("cannot create {}", args.output.display()))?;
    let resolved = serde_json::json!({
        "weights": args.weights.weights, "init": format!("{:?}", args.init).to_lowercase(),
        "train": args.train, "test": args.test, "train_images": train.len(), "test_images": test.len(),
        "classes": classes, "backbone": config, "recipe": recipe, "lr_used": recipe.scaled_lr(),
    });
    std::fs::write(args.output.join("config.json"), serde_json::to_string_pretty(&resolved)? + "\n")?;
    let log_path = args.output.join("log.txt");
    let mut log = std::fs::File::create(&log_path).with_context(|| format!("cannot write {}", log_path.display()))?;
    println!(
        "fine-tuning {} ({}, {} init) on {} ({} images, {classes} classes), testing on {} ({} images): {} epochs, \
         batch {}, lr {:.2e}, {size} px",
        args.weights.weights.display(),
        config.arch_name(),
        format!("{:?}", args.init).to_lowercase(),
        args.train,
        train.len(),
        args.test,
        test.len(),
        recipe.epochs,
        recipe.batch_size,
        recipe.scaled_lr()
    );

    let progress = bar(train.len(), "epoch 1");
    let best = args.output.join("best.safetensors");
    let best_backbone = args.output.join("best_backbone.safetensors");
    let save_best = |model: &Classifier, _: &dino_train::finetune::FinetuneEpoch| {
        save_classifier(model, &config, &best)?;
        save_backbone(&model.backbone, &config, &best_backbone)?;
        Ok(())
    };
    let mut failed_log = None;
    let (_, history) =
        finetune(model, &recipe, &train, (&test, &test_transform), &device, save_best, |event| match event {
            FinetuneProgress::Batch { epoch, done, .. } => {
                progress.set_prefix(format!("epoch {}", epoch + 1));
                progress.set_position(done as u64);
            }
            FinetuneProgress::Epoch(e) => {
                progress.suspend(|| {
                    println!(
                        "epoch {}/{}: train loss {:.4}, test top-1 {:.2} % (best {:.2} %), {:.1} min",
                        e.epoch + 1,
                        recipe.epochs,
                        e.train_loss,
                        e.test_top1,
                        e.best_top1,
                        e.minutes
                    )
                });
                if let Err(err) = writeln!(log, "{}", serde_json::json!(e)) {
                    failed_log.get_or_insert(err);
                }
                progress.reset();
            }
        })?;
    progress.finish_and_clear();
    if let Some(err) = failed_log {
        bail!("cannot write {}: {err}", log_path.display());
    }
    let last = history.last().context("at least one epoch")?;
    println!(
        "best test top-1 {:.2} % (epoch {}); last {:.2} %; {:.1} min; best network: {}",
        last.best_top1,
        history.iter().position(|e| e.test_top1 == last.best_top1).map_or(0, |i| i + 1),
        last.test_top1,
        last.minutes,
        best.display()
    );
    Ok(())
}
