//! `dino retrieve`: index a collection of images, then list each query's nearest neighbours.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use dino_data::{DataError, Dataset, EvalTransform, ImagePolicy, Listing, list_images, load_rgb};
use dino_eval::figures::{SheetImage, contact_sheet};
use dino_eval::retrieval::{
    APPROXIMATE_FROM, ApproximateIndex, Extracted, FeatureIndex, Hit, IndexUpdate, update_index,
};
use dino_eval::{EvalError, ExtractOptions, FeatureSpec, Features, dataset_features};
use dino_model::{Backbone, BackboneConfig};

use crate::device::ComputeArgs;
use crate::images::{self, ImageArgs, warn_skipped};
use crate::load::{KeyArg, WeightArgs};

#[derive(Debug, Args)]
pub struct RetrieveArgs {
    #[command(flatten)]
    weights: WeightArgs,
    /// The collection: a directory of images, searched recursively (repeatable).
    #[arg(long, value_name = "DIR", required = true)]
    data: Vec<PathBuf>,
    /// A query image (repeatable).
    #[arg(long, value_name = "FILE", required = true, num_args = 1..)]
    query: Vec<PathBuf>,
    /// Neighbours listed per query.
    #[arg(long, default_value_t = 5, value_name = "K")]
    top_k: usize,
    /// Where the results (results.json, one contact sheet per query) go.
    #[arg(long, short, default_value = "retrieval", value_name = "DIR")]
    output: PathBuf,
    /// The feature index of the collection, updated incrementally [default: OUTPUT/index.safetensors].
    #[arg(long, value_name = "FILE")]
    index: Option<PathBuf>,
    /// Resize the shorter side to N px (bicubic) first; 0 keeps the size.
    #[arg(long, default_value_t = 256, value_name = "N")]
    resize: u32,
    /// Then center-crop N x N px; 0 keeps the whole image.
    #[arg(long, default_value_t = 224, value_name = "N")]
    crop: u32,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32, value_name = "N")]
    batch_size: usize,
    /// Exact search scores every image; approximate walks an HNSW graph built for this run;
    /// auto is exact below 100000 images.
    #[arg(long, value_enum, default_value = "auto")]
    search: SearchArg,
    #[command(flatten)]
    images: ImageArgs,
    #[command(flatten)]
    compute: ComputeArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SearchArg {
    Auto,
    Exact,
    Approximate,
}

/// The search a run uses.
enum Search {
    Exact,
    Approximate(ApproximateIndex),
}

impl Search {
    fn new(arg: SearchArg, index: &FeatureIndex) -> Self {
        match arg {
            SearchArg::Exact => Self::Exact,
            SearchArg::Auto if index.len() < APPROXIMATE_FROM => Self::Exact,
            SearchArg::Auto | SearchArg::Approximate => {
                let started = std::time::Instant::now();
                let graph = ApproximateIndex::build(index);
                println!("approximate search: HNSW graph of {} images built in {:.1?}", index.len(), started.elapsed());
                Self::Approximate(graph)
            }
        }
    }

    fn top_k(&self, index: &FeatureIndex, query: &[f32], k: usize) -> Vec<Hit> {
        match self {
            Self::Exact => index.search(query, k),
            Self::Approximate(graph) => graph.search(query, k),
        }
    }
}

pub fn run(args: RetrieveArgs) -> anyhow::Result<()> {
    if args.top_k == 0 || args.batch_size == 0 {
        bail!("--top-k and --batch-size must be at least 1");
    }
    let mut collection = Listing::default();
    for dir in &args.data {
        let listing = list_images(dir)?;
        collection.paths.extend(listing.paths);
        collection.skipped.extend(listing.skipped);
    }
    collection.paths.sort();
    collection.paths.dedup();
    let policy = args.images.policy()?;
    // A bad query is an error before any indexing work.
    let queries = Dataset::from_files(
        "the query images",
        Listing { paths: args.query.clone(), skipped: Vec::new() },
        &ImagePolicy { strict: true, ..policy },
    )?;
    let (device, _packed) = args.compute.inference_device()?;
    let (config, backbone) = args.weights.load(&device)?;
    // The official retrieval and copy-detection features: the final-normed CLS token, L2-normalised.
    let options = ExtractOptions {
        transform: EvalTransform {
            resize: (args.resize > 0).then_some(args.resize),
            crop: (args.crop > 0).then_some(args.crop),
        },
        features: FeatureSpec::default(),
        l2_norm: true,
        batch_size: args.batch_size,
    };
    std::fs::create_dir_all(&args.output).with_context(|| format!("cannot create {}", args.output.display()))?;
    let index_path = args.index.clone().unwrap_or_else(|| args.output.join("index.safetensors"));
    let model = fingerprint(&args, &config)?;
    let dim = options.features.dim(backbone.embed_dim());
    let extract = |paths: &[PathBuf]| extract_new(&backbone, paths, &options, &policy, &device);
    let (index, update) = update_index(&index_path, &model, dim, &collection.paths, extract)?;
    report_update(&index_path, &index, &update, &collection);
    if index.is_empty() {
        bail!("no image of {} could be indexed", describe_dirs(&args.data));
    }

    let query_features = images::backbone_features(&backbone, &queries, queries.len(), &options, &device, "queries")?;
    let search = Search::new(args.search, &index);
    let mut results = Vec::new();
    for (q, query) in args.query.iter().enumerate() {
        let hits = search.top_k(&index, &query_features.features.values[q * dim..(q + 1) * dim], args.top_k);
        println!("query {}", query.display());
        for (rank, hit) in hits.iter().enumerate() {
            println!("  {:>3}  {:.4}  {}", rank + 1, hit.score, index.images[hit.row].path.display());
        }
        let sheet = args.output.join(format!("{:02}-{}.png", q + 1, stem(query)));
        draw_sheet(query, &hits, &index, &policy, &sheet)?;
        println!("  contact sheet: {}", sheet.display());
        results.push(serde_json::json!({
            "query": query.display().to_string(),
            "contact_sheet": sheet.display().to_string(),
            "neighbours": hits.iter().enumerate().map(|(rank, hit)| serde_json::json!({
                "rank": rank + 1,
                "path": index.images[hit.row].path.display().to_string(),
                "score": hit.score,
            })).collect::<Vec<_>>(),
        }));
    }
    let json = args.output.join("results.json");
    let text = serde_json::to_string_pretty(&results).expect("JSON values serialise") + "\n";
    std::fs::write(&json, text).with_context(|| format!("cannot write {}", json.display()))?;
    println!("wrote {}", json.display());
    Ok(())
}

/// What the index's rows depend on: the weights file (path, size, modification time), which
/// network of it, the architecture and the transform.
fn fingerprint(args: &RetrieveArgs, config: &BackboneConfig) -> anyhow::Result<String> {
    let path = &args.weights.weights;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let modified = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.clone());
    let key = match args.weights.file.checkpoint_key {
        KeyArg::Teacher => "teacher",
        KeyArg::Student => "student",
    };
    Ok(format!(
        "weights {} ({} bytes, modified {modified} ns) {key}, {}, resize {} crop {}, CLS L2",
        absolute.display(),
        meta.len(),
        config.arch_name(),
        args.resize,
        args.crop
    ))
}

/// Features of files new to the index; the files that cannot be used are skipped.
fn extract_new(
    backbone: &Backbone,
    paths: &[PathBuf],
    options: &ExtractOptions,
    policy: &ImagePolicy,
    device: &burn::tensor::Device,
) -> Result<Extracted, EvalError> {
    let listing = Listing { paths: paths.to_vec(), skipped: Vec::new() };
    let data = match Dataset::from_files("the new images", listing, policy) {
        Ok(data) => data,
        Err(DataError::NoUsableImages { summary, .. }) if !policy.strict => {
            eprintln!("warning: none of the {} new image files can be used ({summary})", paths.len());
            let none = Features { rows: 0, dim: options.features.dim(backbone.embed_dim()), values: Vec::new() };
            return Ok((Vec::new(), none, Vec::new()));
        }
        Err(e) => return Err(e.into()),
    };
    let bar = images::bar(data.len(), "indexing");
    let extracted =
        dataset_features(backbone, &data, data.len(), options, device, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let mut skipped = data.skipped().to_vec();
    skipped.extend(extracted.skipped.iter().cloned());
    Ok((extracted.paths(&data), extracted.features, skipped))
}

fn report_update(path: &Path, index: &FeatureIndex, update: &IndexUpdate, collection: &Listing) {
    if let Some(why) = &update.rebuilt {
        eprintln!("note: rebuilding {}: {why}", path.display());
    }
    let mut skipped = collection.skipped.clone();
    skipped.extend(update.skipped.iter().cloned());
    warn_skipped("the collection", &skipped, collection.paths.len() + collection.skipped.len());
    println!(
        "index {}: {} images ({} reused, {} new, {} removed)",
        path.display(),
        index.len(),
        update.reused,
        update.added,
        update.removed
    );
}

/// The query and its neighbours, captioned with rank and score.
fn draw_sheet(
    query: &Path,
    hits: &[Hit],
    index: &FeatureIndex,
    policy: &ImagePolicy,
    out: &Path,
) -> anyhow::Result<()> {
    let query_image = load_rgb(query, policy)?;
    let neighbours = hits
        .iter()
        .map(|hit| load_rgb(&index.images[hit.row].path, policy).map(|image| (image, hit)))
        .collect::<Result<Vec<_>, _>>()?;
    let cells: Vec<SheetImage> = neighbours
        .iter()
        .enumerate()
        .map(|(rank, (image, hit))| SheetImage { image, caption: format!("{}  {:.3}", rank + 1, hit.score) })
        .collect();
    contact_sheet(SheetImage { image: &query_image, caption: "query".into() }, &cells, out)
        .map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", out.display()))
}

fn stem(path: &Path) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    stem.chars().map(|c| if c.is_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

fn describe_dirs(dirs: &[PathBuf]) -> String {
    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
}
