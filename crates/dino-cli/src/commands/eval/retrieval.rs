//! `dino eval retrieval`: the Revisited Oxford/Paris protocol of the official
//! `eval_image_retrieval.py`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use dino_data::load_rgb;
use dino_eval::revisited::{GroundTruth, MapResult, evaluate, image_feature, rank};

use crate::device::ComputeArgs;
use crate::images::{ImageArgs, bar};
use crate::load::WeightArgs;

#[derive(Debug, Args)]
pub struct RetrievalArgs {
    #[command(flatten)]
    weights: WeightArgs,
    /// The dataset folder, as revisitop lays it out: gnd_<name>.pkl and jpg/<image>.jpg
    /// (e.g. data/roxford5k).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The ground-truth file [default: the one gnd_*.pkl in --data].
    #[arg(long, value_name = "FILE")]
    gnd: Option<PathBuf>,
    /// Shrink each image to fit N x N px first, keeping its aspect (PIL thumbnail); 0 keeps
    /// the size. Official 224 (README: 224 for Oxford, 512 for Paris).
    #[arg(long, default_value_t = 224, value_name = "N")]
    imsize: u32,
    /// Average the features at scales 1, 1/sqrt(2) and 1/2 (official --multiscale; README: on
    /// for Paris).
    #[arg(long)]
    multiscale: bool,
    /// Also write the scores and each query's average precision as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    #[command(flatten)]
    images: ImageArgs,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// The one `gnd_*.pkl` in `dir`.
fn find_ground_truth(dir: &Path) -> anyhow::Result<PathBuf> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read --data {}", dir.display()))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("gnd_") && name.ends_with(".pkl")
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => {
            bail!("{}: no gnd_*.pkl here; point --data at a Revisited dataset folder or pass --gnd FILE", dir.display())
        }
        n => bail!("{}: {n} gnd_*.pkl files; choose one with --gnd FILE", dir.display()),
    }
}

pub fn run(args: RetrievalArgs) -> anyhow::Result<()> {
    let gnd_path = match &args.gnd {
        Some(path) => path.clone(),
        None => find_ground_truth(&args.data)?,
    };
    let truth = GroundTruth::read(&gnd_path)?;
    let name = gnd_path
        .file_stem()
        .and_then(|s| s.to_str())
        .map_or("dataset".to_string(), |s| s.trim_start_matches("gnd_").to_string());
    let images = args.data.join("jpg");
    let file = |stem: &str| images.join(format!("{stem}.jpg"));
    // Every file is checked before the first forward pass: the protocol needs all of them.
    if let Some(missing) = truth.imlist.iter().chain(&truth.qimlist).map(|s| file(s)).find(|p| !p.is_file()) {
        bail!(
            "{}: missing; {name} lists {} database and {} query images under {}",
            missing.display(),
            truth.imlist.len(),
            truth.qimlist.len(),
            images.display()
        );
    }
    let policy = args.images.policy()?;
    let (device, _packed) = args.compute.inference_device()?;
    let (_, backbone) = args.weights.load(&device)?;
    let imsize = (args.imsize > 0).then_some(args.imsize);

    let features = |list: &[String], what: &str| -> anyhow::Result<(Vec<f32>, usize)> {
        let progress = bar(list.len(), what);
        let mut rows = Vec::new();
        let mut dim = 0;
        for stem in list {
            let img = load_rgb(&file(stem), &policy).with_context(|| format!("{name} needs every image it lists"))?;
            let v = image_feature(&backbone, &img, imsize, args.multiscale, &device);
            dim = v.len();
            rows.extend(v);
            progress.inc(1);
        }
        progress.finish_and_clear();
        Ok((rows, dim))
    };
    let (database, dim) = features(&truth.imlist, "database")?;
    let (queries, _) = features(&truth.qimlist, "queries")?;
    let ranks = rank(&database, &queries, dim);
    let result = evaluate(&ranks, &truth);

    let pct = |v: f64| (v * 10000.0).round() / 100.0;
    let list = |m: &MapResult| m.mp_at.iter().map(|&p| format!("{:.2}", pct(p))).collect::<Vec<_>>().join(", ");
    println!(">> {name}: mAP M: {:.2}, H: {:.2}", pct(result.medium.map), pct(result.hard.map));
    println!(">> {name}: mP@k{:?} M: [{}], H: [{}]", result.ks, list(&result.medium), list(&result.hard));
    if let Some(path) = &args.json {
        let setup = |m: &MapResult| {
            serde_json::json!({
                "map": m.map,
                "mp_at": result.ks.iter().zip(&m.mp_at).map(|(k, p)| (k.to_string(), serde_json::json!(p))).collect::<serde_json::Map<_, _>>(),
                "aps": m.aps.iter().zip(&truth.qimlist).map(|(ap, q)| (q.clone(), serde_json::json!(ap.is_finite().then_some(*ap)))).collect::<serde_json::Map<_, _>>(),
            })
        };
        let json = serde_json::json!({
            "dataset": name,
            "weights": args.weights.weights,
            "imsize": args.imsize,
            "multiscale": args.multiscale,
            "medium": setup(&result.medium),
            "hard": setup(&result.hard),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
