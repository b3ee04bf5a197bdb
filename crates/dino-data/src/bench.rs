//! The speed of the data pipeline: `dino bench --augment` (the `bench_augment` of
//! `shared/bench/torch_reference.py`).

use std::path::PathBuf;
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rayon::prelude::*;

use crate::{DataError, MultiCropConfig, load_rgb};

/// The augmentation measurement (`bench_augment` of the reference, plus all threads).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct AugmentTiming {
    pub augment_img_per_s_one_thread: f64,
    pub augment_img_per_s_all_threads: f64,
    pub images: usize,
}

/// The official 224 px multi-crop augmentation (2 global + 8 local crops) of the image files in
/// `files`, decoding included, for about `seconds` on one thread, then as long on all threads.
pub fn bench_augment(files: &[PathBuf], seconds: f64) -> Result<AugmentTiming, DataError> {
    let config = MultiCropConfig::default();
    let one = |i: usize| -> Result<(), DataError> {
        let img = load_rgb(&files[i % files.len()], &Default::default())?;
        std::hint::black_box(config.apply(&img, &mut StdRng::seed_from_u64(i as u64)));
        Ok(())
    };
    let (mut n, started) = (0, Instant::now());
    while started.elapsed().as_secs_f64() < seconds {
        one(n)?;
        n += 1;
    }
    let single = n as f64 / started.elapsed().as_secs_f64();
    let chunk = rayon::current_num_threads() * 4;
    let (mut n, started) = (0, Instant::now());
    while started.elapsed().as_secs_f64() < seconds {
        (n..n + chunk).into_par_iter().try_for_each(one)?;
        n += chunk;
    }
    let all = n as f64 / started.elapsed().as_secs_f64();
    Ok(AugmentTiming { augment_img_per_s_one_thread: single, augment_img_per_s_all_threads: all, images: files.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn augmentation_speed_is_measured_on_real_files() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = (0..2)
            .map(|i| {
                let path = dir.path().join(format!("{i}.png"));
                image::RgbImage::from_fn(48, 40, |x, y| image::Rgb([x as u8, y as u8, i])).save(&path).unwrap();
                path
            })
            .collect();
        let timing = bench_augment(&files, 0.05).unwrap();
        assert_eq!(timing.images, 2);
        assert!(timing.augment_img_per_s_one_thread > 0.0 && timing.augment_img_per_s_all_threads > 0.0);
        let missing = bench_augment(&[dir.path().join("gone.png")], 0.05);
        assert!(missing.is_err(), "an unreadable file is an error, not a rate");
    }
}
