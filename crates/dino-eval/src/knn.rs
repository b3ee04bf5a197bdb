//! Weighted k-NN classification on frozen features, the official `eval_knn.knn_classifier`.

use burn::tensor::{Device, Tensor, TensorData};

/// Top-1 and top-5 accuracy in percent for one k.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnnResult {
    pub k: usize,
    pub top1: f64,
    pub top5: f64,
}

/// Test rows compared with the whole bank at once; bounds memory at rows x bank floats.
const CHUNK_ROWS: usize = 256;

/// For each test feature, the `k` most similar training features (dot product; features should
/// be L2-normalised, as `eval_knn.py` does) vote for their label with weight `exp(sim / T)`;
/// classes are ranked by total weight (ties: lower class index first). Returns top-1 and top-5
/// (over min(5, k) predictions) accuracy in percent for each `k`. Any number of test images and
/// classes (the official script needs at least 100 test images and 1000 classes).
#[allow(clippy::too_many_arguments)]
pub fn knn_classify(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    dim: usize,
    ks: &[usize],
    temperature: f64,
    device: &Device,
) -> Vec<KnnResult> {
    let n_train = train_labels.len();
    assert_eq!(train.len(), n_train * dim, "train features are [N, dim]");
    assert_eq!(test.len(), test_labels.len() * dim, "test features are [N, dim]");
    let num_classes = train_labels.iter().chain(test_labels).copied().max().map_or(1, |m| m as usize + 1);
    let max_k = ks.iter().copied().max().unwrap_or(1).min(n_train);
    let bank = Tensor::<2>::from_data(TensorData::new(train.to_vec(), [n_train, dim]), device).transpose();
    let mut hits = vec![(0usize, 0usize); ks.len()];
    for (chunk, labels) in test.chunks(CHUNK_ROWS * dim).zip(test_labels.chunks(CHUNK_ROWS)) {
        let rows = labels.len();
        let queries = Tensor::<2>::from_data(TensorData::new(chunk.to_vec(), [rows, dim]), device);
        let sims: Vec<f32> = queries.matmul(bank.clone()).into_data().iter::<f32>().collect();
        for (row, &target) in sims.chunks(n_train).zip(labels) {
            // The max_k nearest, most similar first (ties: lower index first, as a stable top-k).
            let mut order: Vec<usize> = (0..n_train).collect();
            let by_similarity = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
            if max_k < n_train {
                order.select_nth_unstable_by(max_k, by_similarity);
                order.truncate(max_k);
            }
            order.sort_by(by_similarity);
            for (result, &k) in hits.iter_mut().zip(ks) {
                let mut votes = vec![0.0f64; num_classes];
                for &j in order.iter().take(k) {
                    votes[train_labels[j] as usize] += (row[j] as f64 / temperature).exp();
                }
                let mut classes: Vec<usize> = (0..num_classes).collect();
                classes.sort_by(|a, b| votes[*b].total_cmp(&votes[*a]).then(a.cmp(b)));
                let rank = classes.iter().position(|&c| c == target as usize).expect("every class is ranked");
                result.0 += (rank == 0) as usize;
                result.1 += (rank < 5.min(k)) as usize;
            }
        }
    }
    let total = test_labels.len().max(1) as f64;
    ks.iter()
        .zip(hits)
        .map(|(&k, (top1, top5))| KnnResult { k, top1: top1 as f64 * 100.0 / total, top5: top5 as f64 * 100.0 / total })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_neighbours_vote_with_their_labels() {
        // Two clusters on the unit circle; a handful of test points, fewer than 100.
        let train = [1.0, 0.0, 0.99, 0.14, 0.0, 1.0, 0.14, 0.99];
        let labels = [0, 0, 1, 1];
        let test = [0.98, 0.2, 0.2, 0.98, 0.6, -0.8];
        let results = knn_classify(&train, &labels, &test, &[0, 1, 0], 2, &[1, 3], 0.07, &Device::flex());
        assert_eq!(results[0].top1, 100.0);
        assert_eq!(results[0].top5, 100.0);
        // k = 3 pulls a far neighbour in but the near ones outweigh it.
        assert_eq!(results[1].top1, 100.0);
    }
}
