//! Copy detection as the official `eval_copy_detection.py` runs it on Copydays: the feature is
//! the CLS token concatenated with the GeM-pooled (p = 4) patch tokens of the last block,
//! optionally whitened by a PCA learned on a separate set, and each query's top 20 originals are
//! scored by average precision per block of edits.

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use dino_model::VisionTransformer;
use nalgebra::{DMatrix, SymmetricEigen};

use crate::revisited::average_precision;

/// GeM's exponent in the official script.
pub const GEM_P: f32 = 4.0;
/// How many neighbours each query keeps (`similarity.topk(20)`).
pub const TOP_K: usize = 20;

/// Images `[B, 3, H, W]` -> `[B, 2D]`: the final-normed CLS token, then the GeM (p = 4) of the
/// final-normed patch tokens, each clamped to 1e-6 first, as the official script.
pub fn cls_gem_features(vit: &VisionTransformer, images: Tensor<4>) -> Tensor<2> {
    let tokens = vit.forward_features(images); // [B, 1 + N, D]
    let [b, n, d] = tokens.dims();
    let cls = tokens.clone().narrow(1, 0, 1).reshape([b, d]);
    let gem = tokens.narrow(1, 1, n - 1).clamp_min(1e-6).powf_scalar(GEM_P).mean_dim(1).powf_scalar(1.0 / GEM_P);
    Tensor::cat(vec![cls, gem.reshape([b, d])], 1)
}

/// The official `utils.PCA(whit=0.5)` trained as `eval_copy_detection.py` trains it: on the
/// *uncentred* second-moment matrix `XᵀX / n` of the whitening set (its mean is subtracted from
/// the features it is applied to, not from the training set), eigenvalues floored at
/// `1e-5 · max`, every dimension kept, scaled by `eigenvalue^-0.5`.
#[derive(Debug, Clone)]
pub struct Whitening {
    mean: Vec<f32>,
    /// `diag(d^-whit) Vᵀ`, `[dim, dim]` row-major.
    dvt: Vec<f32>,
    dim: usize,
}

impl Whitening {
    /// Learns the whitening from `rows` of `dim` features.
    pub fn learn(rows: &[f32], dim: usize) -> Self {
        let n = rows.len() / dim;
        assert!(n > 0 && rows.len() == n * dim, "whitening needs whole rows of {dim} features");
        let mut mean = vec![0f64; dim];
        for row in rows.chunks(dim) {
            mean.iter_mut().zip(row).for_each(|(m, &x)| *m += x as f64 / n as f64);
        }
        let x = DMatrix::from_row_iterator(n, dim, rows.iter().map(|&v| v as f64));
        let cov = x.transpose() * &x / n as f64;
        let eigen = SymmetricEigen::new(cov);
        let eps = eigen.eigenvalues.max() * 1e-5;
        let values: Vec<f64> = eigen.eigenvalues.iter().map(|&d| d.max(eps)).collect();
        let mut order: Vec<usize> = (0..dim).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
        let mut dvt = vec![0f32; dim * dim];
        for (r, &i) in order.iter().enumerate() {
            let scale = values[i].powf(-0.5);
            for c in 0..dim {
                dvt[r * dim + c] = (eigen.eigenvectors[(c, i)] * scale) as f32;
            }
        }
        Self { mean: mean.into_iter().map(|m| m as f32).collect(), dvt, dim }
    }

    /// `(x − mean)` whitened, row by row.
    pub fn apply(&self, rows: &[f32]) -> Vec<f32> {
        let d = self.dim;
        rows.chunks(d)
            .flat_map(|row| {
                let centred: Vec<f32> = row.iter().zip(&self.mean).map(|(x, m)| x - m).collect();
                (0..d).map(move |r| self.dvt[r * d..(r + 1) * d].iter().zip(&centred).map(|(a, b)| a * b).sum::<f32>())
            })
            .collect()
    }
}

/// Rows L2-normalised in place (`F.normalize`, eps 1e-12).
pub fn l2_normalize(rows: &mut [f32], dim: usize) {
    for row in rows.chunks_mut(dim) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|x| *x /= norm);
    }
}

/// The Copydays layout: `original/` is the database; every folder holding images (at any depth:
/// `strong`, `jpegqual/50`, `crops/10`…) is a block of queries, `original` included, as in the
/// official script (each original finds itself: a check of the pipeline, mAP 1).
#[derive(Debug, Clone)]
pub struct CopyBlocks {
    pub originals: Vec<PathBuf>,
    /// `(name, files)`, sorted by name, each folder's files sorted.
    pub blocks: Vec<(String, Vec<PathBuf>)>,
}

impl CopyBlocks {
    /// Lists `dir`; `None` when it has no `original/` folder of images.
    pub fn list(dir: &Path) -> std::io::Result<Option<Self>> {
        let mut folders: std::collections::BTreeMap<String, Vec<PathBuf>> = Default::default();
        for entry in walkdir::WalkDir::new(dir).follow_links(true).sort_by_file_name() {
            let entry = entry.map_err(std::io::Error::other)?;
            if !entry.file_type().is_file() || !dino_data::is_image_file(entry.path()) {
                continue;
            }
            let parent = entry.path().parent().unwrap_or(dir);
            let name = parent.strip_prefix(dir).unwrap_or(parent).to_string_lossy().replace('\\', "/");
            folders.entry(name).or_default().push(entry.into_path());
        }
        let Some(originals) = folders.get("original").cloned() else {
            return Ok(None);
        };
        folders.remove("");
        Ok(Some(Self { originals, blocks: folders.into_iter().collect() }))
    }

    /// The originals a query of `block` copies: in `strong`, every original whose name shares
    /// the query's first four characters (Copydays' scene prefix, as the official script);
    /// elsewhere the original of the same file name. (The official script pairs those blocks by
    /// position in sorted order, which is the same on Copydays, where the names agree.)
    pub fn positives(&self, block: &str, query: &Path) -> Vec<usize> {
        let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let q = stem(query);
        self.originals
            .iter()
            .enumerate()
            .filter(|(_, o)| {
                let o = stem(o);
                if block == "strong" { o.chars().take(4).eq(q.chars().take(4)) } else { o == q }
            })
            .map(|(i, _)| i)
            .collect()
    }
}

/// One block's score.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockScore {
    pub name: String,
    pub queries: usize,
    pub map: f64,
}

/// The mAP of each block: `retrieved[q]` holds query q's top-k database rows, queries in block
/// order. Rows past the originals (distractors) are never positives. A query with no original
/// to find scores 0, as in the official script, where it would divide by zero.
pub fn score_blocks(blocks: &CopyBlocks, retrieved: &[Vec<usize>]) -> Vec<BlockScore> {
    let mut next = retrieved.iter();
    blocks
        .blocks
        .iter()
        .map(|(name, files)| {
            let sum: f64 = files
                .iter()
                .zip(next.by_ref())
                .map(|(query, hits)| {
                    let positives = blocks.positives(name, query);
                    let ranks: Vec<usize> =
                        hits.iter().enumerate().filter(|(_, h)| positives.contains(h)).map(|(r, _)| r).collect();
                    // score_ap_from_ranks_1: revisitop's trapezoids; positives past the top k
                    // count as missed.
                    if positives.is_empty() { 0.0 } else { average_precision(&ranks, positives.len()) }
                })
                .sum();
            BlockScore { name: name.clone(), queries: files.len(), map: sum / files.len().max(1) as f64 }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whitening makes the second moment of its own training set the identity (it is
    /// learned uncentred), and applies `(x − mean)` first.
    #[test]
    fn whitening_gives_the_training_set_unit_second_moments() {
        let dim = 3;
        let rows: Vec<f32> = (0..40)
            .flat_map(|i| {
                let t = i as f32 * 0.37;
                [t.sin() * 3.0 + 1.0, t.cos() + 0.5 * t.sin(), (t * 1.7).sin() * 0.2 + 2.0]
            })
            .collect();
        let w = Whitening::learn(&rows, dim);
        // Undo the centring to see the raw projection.
        let shifted: Vec<f32> =
            rows.chunks(dim).flat_map(|r| r.iter().zip(&w.mean).map(|(x, m)| x + m).collect::<Vec<_>>()).collect();
        let out = w.apply(&shifted);
        for a in 0..dim {
            for b in 0..dim {
                let m: f32 = out.chunks(dim).map(|r| r[a] * r[b]).sum::<f32>() / 40.0;
                assert!((m - (a == b) as u8 as f32).abs() < 1e-3, "moment ({a}, {b}) = {m}");
            }
        }
    }

    #[test]
    fn blocks_pair_queries_with_their_originals() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "original/200000.jpg",
            "original/200001.jpg",
            "original/200100.jpg",
            "strong/200005.jpg",
            "crops/50/200001.jpg",
            "crops/50/200100.jpg",
        ] {
            let path = dir.path().join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            image::RgbImage::new(4, 4).save(&path).unwrap();
        }
        let blocks = CopyBlocks::list(dir.path()).unwrap().unwrap();
        assert_eq!(blocks.originals.len(), 3);
        let names: Vec<&str> = blocks.blocks.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["crops/50", "original", "strong"]);
        assert_eq!(blocks.positives("strong", Path::new("200005.jpg")), [0, 1]);
        assert_eq!(blocks.positives("crops/50", Path::new("200100.jpg")), [2]);

        // crops/50: 200001 found at rank 1, 200100 missed; the originals find themselves;
        // strong: 200000 and 200001 at 0 and 2.
        let retrieved = vec![vec![0, 1, 2], vec![0, 1], vec![0], vec![1], vec![2, 0], vec![0, 2, 1]];
        let scores = score_blocks(&blocks, &retrieved);
        assert!((scores[0].map - ((0.0 + 0.5) / 2.0 + 0.0) / 2.0).abs() < 1e-12, "{scores:?}");
        assert_eq!(scores[1].map, 1.0);
        let strong = (1.0 + 1.0) / 2.0 * 0.5 + (0.5 + 2.0 / 3.0) / 2.0 * 0.5;
        assert!((scores[2].map - strong).abs() < 1e-12, "{scores:?}");
        assert!(CopyBlocks::list(&dir.path().join("strong")).unwrap().is_none());
    }
}
