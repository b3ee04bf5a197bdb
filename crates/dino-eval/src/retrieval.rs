//! Image retrieval: a feature index on disk, brought up to date incrementally, and
//! nearest-neighbour search by cosine similarity: exact (every row scored), or approximate
//! through an HNSW graph ([`ApproximateIndex`]) for large collections.
//!
//! The index is one safetensors file: `features` `[N, D]` (f32, L2-normalised rows), `images`
//! (u8, one line per row: `path \t bytes \t modified_ns`) and, in the header, the fingerprint of
//! the model and transform that computed the features. One file is written atomically, so the
//! rows and their paths never disagree. Reading memory-maps it: opening an index of a million
//! images copies nothing, and a search reads the features once, straight from the page cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use burn::tensor::TensorData;
use dino_data::BadImage;
use dino_kernels::dot;
use hnsw_rs::prelude::{Distance, Hnsw};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::EvalError;
use crate::extract::Features;

/// Header key of the model fingerprint.
const MODEL_KEY: &str = "dino_index_model";
/// Header key of the format version; another version is rebuilt, not misread.
const VERSION_KEY: &str = "dino_index_version";
const VERSION: &str = "1";

/// What identifies an image file's content without reading it: path, size and modification
/// time (as `make` and `rsync` decide whether a file changed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileStamp {
    pub path: PathBuf,
    pub bytes: u64,
    pub modified_ns: u128,
}

impl FileStamp {
    /// The stamp of the file at `path` now.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        let modified_ns = meta.modified()?.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        Ok(Self { path: path.to_path_buf(), bytes: meta.len(), modified_ns })
    }

    fn line(&self) -> String {
        format!("{}\t{}\t{}\n", self.path.display(), self.bytes, self.modified_ns)
    }

    fn parse(line: &str) -> Option<Self> {
        let mut fields = line.rsplitn(3, '\t');
        let modified_ns = fields.next()?.parse().ok()?;
        let bytes = fields.next()?.parse().ok()?;
        Some(Self { path: PathBuf::from(fields.next()?), bytes, modified_ns })
    }
}

/// The rows, mapped from the file where its bytes can be read as f32 in place, else copied.
#[derive(Debug)]
enum Rows {
    Mapped { map: Mmap, offset: usize, len: usize },
    Owned(Vec<f32>),
}

/// One search result: the row of the index and its cosine similarity to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub row: usize,
    pub score: f32,
}

/// An index of image features read from disk (see the module documentation).
#[derive(Debug)]
pub struct FeatureIndex {
    /// Fingerprint of the model and transform that computed the features.
    pub model: String,
    /// Feature width.
    pub dim: usize,
    /// The image of each row.
    pub images: Vec<FileStamp>,
    rows: Rows,
}

impl FeatureIndex {
    /// Opens the index file at `path`, memory-mapped.
    pub fn open(path: &Path) -> Result<Self, EvalError> {
        let bad = |problem: String| EvalError::Index { path: path.into(), problem };
        let file = std::fs::File::open(path).map_err(|source| EvalError::Io { path: path.into(), source })?;
        // SAFETY: the index is only ever replaced by rename (write_safetensors), never written in
        // place, so the mapped bytes do not change under us.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| EvalError::Io { path: path.into(), source })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get(VERSION_KEY).map(String::as_str) != Some(VERSION) {
            return Err(bad(format!("not a dino index of version {VERSION}")));
        }
        let model = meta.get(MODEL_KEY).cloned().unwrap_or_default();
        let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| bad(e.to_string()))?;
        let features = st.tensor("features").map_err(|_| bad("it has no tensor 'features'".into()))?;
        let images = st.tensor("images").map_err(|_| bad("it has no tensor 'images'".into()))?;
        let (&[rows, dim], safetensors::Dtype::F32) = (features.shape(), features.dtype()) else {
            return Err(bad(format!("'features' is {:?} {:?}, not f32 [N, D]", features.dtype(), features.shape())));
        };
        let text = std::str::from_utf8(images.data()).map_err(|_| bad("its image list is not UTF-8".into()))?;
        let images: Vec<FileStamp> = text
            .lines()
            .map(FileStamp::parse)
            .collect::<Option<_>>()
            .ok_or_else(|| bad("a damaged image list".into()))?;
        if images.len() != rows {
            return Err(bad(format!("{} images listed for {rows} feature rows", images.len())));
        }
        let data = features.data();
        let offset = data.as_ptr() as usize - map.as_ptr() as usize;
        // SAFETY: any 4 bytes are a valid f32; align_to only returns the aligned middle part.
        let aligned = unsafe { data.align_to::<f32>() }.0.is_empty();
        let rows_data = if aligned && cfg!(target_endian = "little") {
            Rows::Mapped { offset, len: rows * dim, map }
        } else {
            Rows::Owned(data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
        };
        Ok(Self { model, dim, images, rows: rows_data })
    }

    /// Writes an index of `images` with their feature rows `[images.len(), dim]` to `path`
    /// (atomically), then opens it.
    pub fn write(
        path: &Path,
        model: &str,
        dim: usize,
        images: &[FileStamp],
        values: Vec<f32>,
    ) -> Result<Self, EvalError> {
        assert_eq!(values.len(), images.len() * dim, "one row of {dim} values per image");
        let list: String = images.iter().map(FileStamp::line).collect();
        let list = list.into_bytes();
        let tensors = vec![
            ("features".to_string(), TensorData::new(values, [images.len(), dim])),
            ("images".to_string(), TensorData::new(list.clone(), [list.len()])),
        ];
        let meta =
            HashMap::from([(VERSION_KEY.to_string(), VERSION.to_string()), (MODEL_KEY.to_string(), model.to_string())]);
        dino_model::weights::write_safetensors(path, tensors, meta)
            .map_err(|e| EvalError::Index { path: path.into(), problem: e.to_string() })?;
        Self::open(path)
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// All rows, `[len, dim]` row-major.
    pub fn features(&self) -> &[f32] {
        match &self.rows {
            Rows::Mapped { map, offset, len } => {
                // SAFETY: `open` checked that these bytes are f32-aligned and hold `len` values.
                let (_, values, _) = unsafe { map[*offset..*offset + len * 4].align_to::<f32>() };
                values
            }
            Rows::Owned(values) => values,
        }
    }

    /// Row `i`, `[dim]`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features()[i * self.dim..(i + 1) * self.dim]
    }

    /// The `k` rows most similar to `query` (`[dim]`, L2-normalised), best first; exact: every
    /// row is scored. Ties keep the lower row first.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<Hit> {
        assert_eq!(query.len(), self.dim, "a query of the index's width");
        let scores: Vec<f32> = self.features().par_chunks_exact(self.dim.max(1)).map(|row| dot(row, query)).collect();
        top_k(&scores, k)
    }
}

/// Exact search without an index: each query's `k` best rows of `database` by dot product
/// (cosine for unit rows), best first, ties by row. `database` and `queries` hold rows of `dim`.
pub fn rank_rows(database: &[f32], queries: &[f32], dim: usize, k: usize) -> Vec<Vec<usize>> {
    queries
        .chunks(dim)
        .map(|q| {
            let scores: Vec<f32> = database.par_chunks_exact(dim).map(|row| dot(row, q)).collect();
            top_k(&scores, k).into_iter().map(|h| h.row).collect()
        })
        .collect()
}

/// The `k` highest of `scores` with their positions, highest first (NaN last).
fn top_k(scores: &[f32], k: usize) -> Vec<Hit> {
    let better = |a: &Hit, b: &Hit| b.score.total_cmp(&a.score).then(a.row.cmp(&b.row));
    let mut hits: Vec<Hit> = scores
        .iter()
        .enumerate()
        .map(|(row, &s)| Hit { row, score: if s.is_nan() { f32::NEG_INFINITY } else { s } })
        .collect();
    let k = k.min(hits.len());
    if k == 0 {
        return Vec::new();
    }
    if k < hits.len() {
        hits.select_nth_unstable_by(k - 1, better);
        hits.truncate(k);
    }
    hits.sort_by(better);
    hits
}

/// Collections of this many images and more are searched approximately by default. Exact search
/// took 12.9 ms a query over 60 000 rows of 2352 values on 2 cores (BENCHMARKS.md, retrieval),
/// so 100 000 rows of a ViT-S's 384 about 3.5 ms; past that the graph (2.2 ms a query there,
/// recall@10 0.995) pays for its build.
pub const APPROXIMATE_FROM: usize = 100_000;

/// HNSW settings (hnswlib's usual ones): neighbours kept per node and layer, the candidate list
/// while building, and the least candidate list while searching (raised to `k` when larger).
const HNSW_NEIGHBOURS: usize = 24;
const HNSW_EF_CONSTRUCTION: usize = 200;
const HNSW_EF_SEARCH: usize = 128;
const HNSW_LAYERS: usize = 16;

/// Cosine distance between unit vectors, `1 - a·b`, floored at 0 (rounding can push `a·a` past 1,
/// which `hnsw_rs`'s own `DistDot` asserts against).
struct UnitCosine;

impl Distance<f32> for UnitCosine {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

/// An approximate nearest-neighbour index over the rows of a [`FeatureIndex`]: a hierarchical
/// navigable small-world graph (`hnsw_rs`), built in parallel in memory from the mapped rows.
/// Scores are the exact cosine similarities of the rows it finds; what it can miss is a row.
pub struct ApproximateIndex {
    graph: Hnsw<'static, f32, UnitCosine>,
}

impl ApproximateIndex {
    /// Builds the graph over every row of `index`.
    pub fn build(index: &FeatureIndex) -> Self {
        let rows: Vec<(&[f32], usize)> = (0..index.len()).map(|i| (index.row(i), i)).collect();
        let mut graph = Hnsw::new(HNSW_NEIGHBOURS, rows.len().max(1), HNSW_LAYERS, HNSW_EF_CONSTRUCTION, UnitCosine);
        graph.parallel_insert_slice(&rows);
        graph.set_searching_mode(true);
        Self { graph }
    }

    /// The `k` rows most similar to `query` (`[dim]`, L2-normalised) that the graph finds, best
    /// first, ties by row.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<Hit> {
        if k == 0 || self.graph.get_nb_point() == 0 {
            return Vec::new();
        }
        let mut hits: Vec<Hit> = self
            .graph
            .search(query, k, HNSW_EF_SEARCH.max(k))
            .into_iter()
            .map(|n| Hit { row: n.d_id, score: 1.0 - n.distance })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.row.cmp(&b.row)));
        hits.truncate(k);
        hits
    }
}

/// The share of exact top-`k` rows that `approximate` also returns, over `queries`
/// (`[n, dim]`): recall@k of the approximate index against exact search.
pub fn recall_at_k(index: &FeatureIndex, approximate: &ApproximateIndex, queries: &[f32], k: usize) -> f64 {
    let (mut found, mut wanted) = (0usize, 0usize);
    for query in queries.chunks_exact(index.dim) {
        let exact = index.search(query, k);
        let approx: std::collections::HashSet<usize> = approximate.search(query, k).iter().map(|h| h.row).collect();
        found += exact.iter().filter(|h| approx.contains(&h.row)).count();
        wanted += exact.len();
    }
    found as f64 / wanted.max(1) as f64
}

/// What [`update_index`] did.
#[derive(Debug, Default)]
pub struct IndexUpdate {
    /// Rows kept from the previous index (the same file, unchanged).
    pub reused: usize,
    /// Rows computed now: new or changed files.
    pub added: usize,
    /// Rows of the previous index dropped: files gone or changed.
    pub removed: usize,
    /// Why nothing of the previous index could be kept (another model, a damaged file).
    pub rebuilt: Option<String>,
    /// Files that could not be decoded; they have no row, and are tried again next time.
    pub skipped: Vec<BadImage>,
}

/// Features of some image files: `(paths of the rows, rows, files skipped)`.
pub type Extracted = (Vec<PathBuf>, Features, Vec<BadImage>);

/// Brings the index at `path` up to date with `images` for `model` (a fingerprint of the model
/// and transform) and rows of `dim` values: rows of unchanged files are kept, new and changed files go through `extract`
/// (all at once), rows of files no longer listed are dropped. Rows follow the order of `images`.
/// A missing index is built; one of another model or format, or a damaged one, is rebuilt.
pub fn update_index(
    path: &Path,
    model: &str,
    dim: usize,
    images: &[PathBuf],
    extract: impl FnOnce(&[PathBuf]) -> Result<Extracted, EvalError>,
) -> Result<(FeatureIndex, IndexUpdate), EvalError> {
    let mut update = IndexUpdate::default();
    let previous = match FeatureIndex::open(path) {
        Ok(index) if index.model == model && index.dim == dim => Some(index),
        Ok(_) => {
            update.rebuilt = Some("it was computed by another model or transform".into());
            None
        }
        Err(EvalError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            update.rebuilt = Some(e.to_string());
            None
        }
    };
    let stamps = images
        .iter()
        .map(|p| FileStamp::of(p).map_err(|source| EvalError::Io { path: p.clone(), source }))
        .collect::<Result<Vec<_>, _>>()?;
    let old_rows: HashMap<&FileStamp, usize> =
        previous.iter().flat_map(|index| index.images.iter().enumerate().map(|(i, s)| (s, i))).collect();
    let missing: Vec<PathBuf> = stamps.iter().filter(|s| !old_rows.contains_key(s)).map(|s| s.path.clone()).collect();
    let (new_paths, new_rows, skipped) = if missing.is_empty() {
        (Vec::new(), Features { rows: 0, dim, values: Vec::new() }, Vec::new())
    } else {
        extract(&missing)?
    };
    assert_eq!(new_rows.dim, dim, "the extractor gives rows of the index's width");
    let new_of: HashMap<&Path, usize> = new_paths.iter().enumerate().map(|(i, p)| (p.as_path(), i)).collect();
    let (mut kept, mut values) = (Vec::with_capacity(stamps.len()), Vec::with_capacity(stamps.len() * dim));
    for stamp in &stamps {
        let row = match (old_rows.get(stamp), new_of.get(stamp.path.as_path())) {
            (Some(&i), _) => {
                update.reused += 1;
                previous.as_ref().expect("rows come from an index").row(i)
            }
            (None, Some(&i)) => {
                update.added += 1;
                &new_rows.values[i * dim..(i + 1) * dim]
            }
            (None, None) => continue, // skipped
        };
        values.extend_from_slice(row);
        kept.push(stamp.clone());
    }
    update.removed = previous.as_ref().map_or(0, |i| i.len()) - update.reused;
    update.skipped = skipped;
    drop(old_rows);
    drop(previous); // unmapped before the file is replaced
    let index = FeatureIndex::write(path, model, dim, &kept, values)?;
    Ok((index, update))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    /// A fake extractor: the row of a file is its first bytes, normalised; counts its calls.
    fn extractor(calls: &mut Vec<usize>) -> impl FnOnce(&[PathBuf]) -> Result<Extracted, EvalError> + '_ {
        move |paths| {
            calls.push(paths.len());
            let mut values = Vec::new();
            for p in paths {
                let bytes = std::fs::read(p).unwrap();
                values.extend(unit(&[bytes[0] as f32, bytes[1] as f32, 1.0]));
            }
            Ok((paths.to_vec(), Features { rows: paths.len(), dim: 3, values }, Vec::new()))
        }
    }

    #[test]
    fn the_index_keeps_unchanged_rows_and_recomputes_only_new_or_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let (a, b) = (file("a", &[1, 0]), file("b", &[0, 1]));
        let index_path = dir.path().join("index.safetensors");
        let mut calls = Vec::new();
        let (index, update) =
            update_index(&index_path, "m1", 3, &[a.clone(), b.clone()], extractor(&mut calls)).unwrap();
        assert_eq!((update.reused, update.added, update.removed), (0, 2, 0));
        assert!(matches!(index.rows, Rows::Mapped { .. }), "a fresh index is memory-mapped");
        assert_eq!(index.row(1), unit(&[0.0, 1.0, 1.0]).as_slice());
        drop(index);

        // Unchanged: nothing extracted.
        let (index, update) =
            update_index(&index_path, "m1", 3, &[a.clone(), b.clone()], extractor(&mut calls)).unwrap();
        assert_eq!((update.reused, update.added, update.removed), (2, 0, 0));
        assert_eq!(calls, vec![2]);
        drop(index);

        // One file added, one changed (another size), one gone: two extracted, one dropped.
        let c = file("c", &[5, 5]);
        std::fs::write(&a, [0, 0, 9]).unwrap();
        let (index, update) =
            update_index(&index_path, "m1", 3, &[a.clone(), c.clone()], extractor(&mut calls)).unwrap();
        assert_eq!((update.reused, update.added, update.removed), (0, 2, 2));
        assert_eq!(calls, vec![2, 2]);
        assert_eq!(index.images.iter().map(|s| s.path.clone()).collect::<Vec<_>>(), vec![a.clone(), c.clone()]);
        assert_eq!(index.row(0), unit(&[0.0, 0.0, 1.0]).as_slice());
        drop(index);

        // Another model: everything recomputed, and said why.
        let (_, update) = update_index(&index_path, "m2", 3, &[a.clone(), c.clone()], extractor(&mut calls)).unwrap();
        assert_eq!((update.reused, update.added), (0, 2));
        assert!(update.rebuilt.unwrap().contains("another model"));

        // A damaged file is rebuilt too; opening it directly names the problem.
        std::fs::write(&index_path, b"not an index").unwrap();
        let e = FeatureIndex::open(&index_path).unwrap_err().to_string();
        assert!(e.contains("index.safetensors"), "{e}");
        let (index, update) =
            update_index(&index_path, "m2", 3, std::slice::from_ref(&c), extractor(&mut calls)).unwrap();
        assert!(update.rebuilt.is_some() && index.len() == 1);
    }

    #[test]
    fn search_is_exact_and_best_first() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<Vec<f32>> =
            (0..50).map(|i| unit(&[(i as f32 * 0.37).sin(), (i as f32 * 0.11).cos(), 0.3])).collect();
        let stamps: Vec<FileStamp> =
            (0..50).map(|i| FileStamp { path: format!("img {i}.png").into(), bytes: i, modified_ns: 7 }).collect();
        let path = dir.path().join("i.safetensors");
        let index = FeatureIndex::write(&path, "m", 3, &stamps, rows.concat()).unwrap();
        assert_eq!(index.images, stamps, "paths with spaces survive");
        let query = unit(&[0.2, 0.9, 0.1]);
        let hits = index.search(&query, 5);
        let mut brute: Vec<(usize, f32)> =
            rows.iter().enumerate().map(|(i, r)| (i, r.iter().zip(&query).map(|(a, b)| a * b).sum())).collect();
        brute.sort_by(|a, b| b.1.total_cmp(&a.1));
        assert_eq!(hits.iter().map(|h| h.row).collect::<Vec<_>>(), brute[..5].iter().map(|b| b.0).collect::<Vec<_>>());
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        assert_eq!(index.search(&query, 500).len(), 50, "k beyond the index returns every row");
        assert!(index.search(&query, 0).is_empty());
    }

    #[test]
    fn the_approximate_index_finds_what_exact_search_finds() {
        // 4000 unit vectors in 32 dimensions around 40 centres: clustered, as features are.
        let (n, dim) = (4000usize, 32usize);
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        };
        let centres: Vec<Vec<f32>> = (0..40).map(|_| (0..dim).map(|_| uniform()).collect()).collect();
        let rows: Vec<f32> = (0..n)
            .flat_map(|i| unit(&centres[i % 40].iter().map(|c| c + 0.3 * uniform()).collect::<Vec<_>>()))
            .collect();
        let stamps: Vec<FileStamp> =
            (0..n).map(|i| FileStamp { path: format!("{i}.png").into(), bytes: 0, modified_ns: 0 }).collect();
        let dir = tempfile::tempdir().unwrap();
        let index = FeatureIndex::write(&dir.path().join("i.safetensors"), "m", dim, &stamps, rows).unwrap();
        let approximate = ApproximateIndex::build(&index);
        let queries: Vec<f32> = (0..100)
            .flat_map(|q| unit(&centres[q % 40].iter().map(|c| c + 0.3 * uniform()).collect::<Vec<_>>()))
            .collect();
        let recall = recall_at_k(&index, &approximate, &queries, 10);
        assert!(recall >= 0.95, "recall@10 {recall}");
        // A row queried by itself is its own best hit, with its exact score.
        let hits = approximate.search(index.row(123), 3);
        assert_eq!(hits[0].row, 123);
        assert!((hits[0].score - 1.0).abs() < 1e-5 && hits.windows(2).all(|w| w[0].score >= w[1].score));
        assert!(approximate.search(index.row(0), 0).is_empty());
    }

    #[test]
    fn top_k_breaks_ties_by_row_and_puts_nan_last() {
        let hits = top_k(&[0.5, f32::NAN, 0.9, 0.5], 4);
        assert_eq!(hits.iter().map(|h| h.row).collect::<Vec<_>>(), vec![2, 0, 3, 1]);
    }
}
