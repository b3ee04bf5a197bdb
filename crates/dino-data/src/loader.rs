//! Multi-crop batches for one epoch, prepared on worker threads while the model computes.
//!
//! Deterministic: the image order of epoch `e` depends only on (seed, e), and the augmentation of
//! an image only on (seed, e, image index), whatever the number of threads — so a run resumed at
//! an epoch boundary sees exactly the batches an uninterrupted run would.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;

use crate::{BadImage, DataError, Dataset, MultiCropConfig};

/// One crop position of a batch: `batch` normalised images `[batch, 3, size, size]`.
#[derive(Debug, Clone)]
pub struct CropBatch {
    pub size: u32,
    pub data: Vec<f32>,
}

/// A batch of multi-crop samples, crop by crop: [global 1, global 2, locals...].
#[derive(Debug, Clone)]
pub struct MultiCropBatch {
    pub batch_size: usize,
    pub crops: Vec<CropBatch>,
    /// Images of the batch that could not be decoded; the next usable image of the dataset
    /// took each one's place (`Dataset::image_or_next`).
    pub skipped: Vec<BadImage>,
}

/// One image's crops, and the files skipped to reach it.
type Sample = (Vec<Vec<f32>>, Vec<BadImage>);

/// Mixes a seed with the epoch and an index into an RNG seed (splitmix64 steps).
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed ^ a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Iterations per epoch: full batches only (the official loader drops the last partial one).
pub fn iterations_per_epoch(dataset_len: usize, batch_size: usize) -> usize {
    dataset_len / batch_size
}

/// The epoch's batches, produced by a background thread that decodes and augments each batch
/// in parallel on `threads` threads (0 = all cores), at most two batches ahead. Iteration
/// `skip..` only: a run resumed mid-epoch continues where it stopped. An image that cannot be
/// decoded is replaced by the next usable one (same augmentation draw) and reported in the
/// batch's `skipped`, unless the dataset's policy is strict.
pub fn epoch_batches(
    dataset: Arc<Dataset>,
    config: MultiCropConfig,
    batch_size: usize,
    seed: u64,
    epoch: usize,
    skip: usize,
    threads: usize,
) -> Receiver<Result<MultiCropBatch, DataError>> {
    let (tx, rx) = sync_channel(2);
    std::thread::spawn(move || {
        let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
            Ok(pool) => pool,
            Err(e) => {
                let _ = tx.send(Err(DataError::Threads { threads, reason: e.to_string() }));
                return;
            }
        };
        let mut order: Vec<usize> = (0..dataset.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(mix(seed, epoch as u64, u64::MAX)));
        for indices in order.chunks_exact(batch_size).skip(skip) {
            let samples: Result<Vec<Sample>, DataError> = pool.install(|| {
                indices
                    .par_iter()
                    .map(|&i| {
                        let found = dataset.image_or_next(i)?;
                        let mut rng = StdRng::seed_from_u64(mix(seed, epoch as u64, i as u64));
                        Ok((config.apply(&found.image, &mut rng), found.skipped))
                    })
                    .collect()
            });
            let batch = samples.map(|samples| MultiCropBatch {
                batch_size,
                crops: (0..config.num_crops())
                    .map(|c| CropBatch {
                        size: config.crop_size(c),
                        data: samples.iter().flat_map(|s| s.0[c].iter().copied()).collect(),
                    })
                    .collect(),
                skipped: samples.into_iter().flat_map(|s| s.1).collect(),
            });
            let failed = batch.is_err();
            if tx.send(batch).is_err() || failed {
                return; // the trainer stopped listening, or the error was delivered
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_deterministic_and_resumable() {
        let mut data = Dataset::synthetic(crate::Split::Train);
        data.truncate(20);
        let data = Arc::new(data);
        let config = MultiCropConfig { global_size: 16, local_size: 8, local_crops: 1, ..Default::default() };
        let collect = |skip, threads| -> Vec<MultiCropBatch> {
            epoch_batches(data.clone(), config.clone(), 6, 3, 1, skip, threads)
                .into_iter()
                .map(Result::unwrap)
                .collect()
        };
        let all = collect(0, 1);
        assert_eq!(all.len(), 3, "20 images in batches of 6: 3 full batches");
        assert_eq!(all[0].crops.len(), 3);
        assert_eq!(all[0].crops[0].data.len(), 6 * 3 * 16 * 16);
        assert_eq!(all[0].crops[2].data.len(), 6 * 3 * 8 * 8);
        let resumed = collect(1, 2);
        assert_eq!(resumed.len(), 2);
        assert_eq!(resumed[1].crops[1].data, all[2].crops[1].data, "same batches whatever the threads");
        let other_epoch = epoch_batches(data, config, 6, 3, 2, 0, 1).recv().unwrap().unwrap();
        assert_ne!(other_epoch.crops[0].data, all[0].crops[0].data);
    }

    #[test]
    fn an_image_that_fails_to_decode_is_replaced_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for i in 0..4u8 {
            let path = dir.path().join(format!("{i}.png"));
            image::RgbImage::from_pixel(12, 12, image::Rgb([i * 60; 3])).save(&path).unwrap();
            paths.push(path);
        }
        let bytes = std::fs::read(&paths[2]).unwrap();
        std::fs::write(&paths[2], &bytes[..bytes.len() - 20]).unwrap();
        let data = Arc::new(
            Dataset::from_files("four", crate::Listing { paths, skipped: Vec::new() }, &Default::default()).unwrap(),
        );
        let config = MultiCropConfig { global_size: 8, local_size: 4, local_crops: 0, ..Default::default() };
        let batch = epoch_batches(data, config, 4, 0, 0, 0, 1).recv().unwrap().unwrap();
        assert_eq!(batch.crops[0].data.len(), 4 * 3 * 8 * 8, "the batch is full");
        assert_eq!(batch.skipped.len(), 1);
        assert!(batch.skipped[0].path.ends_with("2.png"), "{}", batch.skipped[0]);
    }
}
