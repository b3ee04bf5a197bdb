//! Exact against approximate (HNSW) search on real features: build time, time per query and
//! recall@k, for BENCHMARKS.md.
//!
//!   dino eval knn --train BANK --test QUERIES --features pixels --dump-features feats/
//!   cargo run --release -p dino-eval --example retrieval_recall -- feats/train.safetensors feats/test.safetensors [QUERIES]
//!
//! Rows are L2-normalised (as `dino retrieve` stores them); the first QUERIES (default 1000) rows
//! of the second file are the queries.

use std::path::PathBuf;
use std::time::Instant;

use dino_eval::read_labeled_features;
use dino_eval::retrieval::{ApproximateIndex, FeatureIndex, FileStamp, recall_at_k};

fn unit_rows(values: &mut [f32], dim: usize) {
    for row in values.chunks_exact_mut(dim) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bank, queries, rest @ ..] = args.as_slice() else {
        return Err("usage: retrieval_recall BANK.safetensors QUERIES.safetensors [N_QUERIES]".into());
    };
    let n_queries: usize = rest.first().map_or(Ok(1000), |n| n.parse())?;
    let (mut bank, _) = read_labeled_features(&PathBuf::from(bank))?;
    let (mut queries, _) = read_labeled_features(&PathBuf::from(queries))?;
    let dim = bank.dim;
    unit_rows(&mut bank.values, dim);
    unit_rows(&mut queries.values, dim);
    let queries = &queries.values[..n_queries.min(queries.rows) * dim];
    let n_queries = queries.len() / dim;

    let dir = tempfile::tempdir()?;
    let stamps: Vec<FileStamp> =
        (0..bank.rows).map(|i| FileStamp { path: format!("{i}").into(), bytes: 0, modified_ns: 0 }).collect();
    let index = FeatureIndex::write(&dir.path().join("index.safetensors"), "bench", dim, &stamps, bank.values)?;

    let started = Instant::now();
    let approximate = ApproximateIndex::build(&index);
    let build = started.elapsed();
    let time_per_query = |search: &dyn Fn(&[f32])| {
        let started = Instant::now();
        queries.chunks_exact(dim).for_each(search);
        started.elapsed().as_secs_f64() * 1e3 / n_queries as f64
    };
    let exact_ms = time_per_query(&|q| drop(index.search(q, 10)));
    let approx_ms = time_per_query(&|q| drop(approximate.search(q, 10)));
    println!("{} rows of {dim}, {n_queries} queries, {} rayon threads", index.len(), rayon::current_num_threads());
    println!("exact search: {exact_ms:.3} ms/query");
    println!("HNSW: built in {:.1} s, {approx_ms:.3} ms/query", build.as_secs_f64());
    for k in [1, 10, 100] {
        println!("recall@{k}: {:.4}", recall_at_k(&index, &approximate, queries, k));
    }
    Ok(())
}
