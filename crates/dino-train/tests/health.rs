//! The training-health warnings on real (tiny) runs: each fires on a run built to collapse in
//! that way, and none fires on a healthy run.

use std::sync::Arc;

use burn::tensor::Device;
use dino_data::{Dataset, Split};
use dino_train::health::Warning;
use dino_train::{EpochLog, Observer, TrainConfig, train};

mod common;
use common::tiny_config;

#[derive(Default)]
struct Record {
    epochs: Vec<EpochLog>,
    warnings: Vec<String>,
}

impl Observer for Record {
    fn epoch_end(&mut self, log: &EpochLog) {
        self.epochs.push(log.clone());
    }
    fn warning(&mut self, message: &str) {
        self.warnings.push(message.to_string());
    }
}

/// The warnings of the last epoch of a run of `config` on 96 synthetic images. Runs one at a
/// time: the backend RNG is process-wide, and a run beside another would draw from it between
/// its own seedings.
fn last_epoch_warnings(config: TrainConfig) -> (Vec<Warning>, Record) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let data = Arc::new(Dataset::synthetic(Split::Train));
    let dir = tempfile::tempdir().unwrap();
    let mut record = Record::default();
    let config = TrainConfig { max_images: 96, knn_every: 0, ..config };
    train(&config, data, None, dir.path(), &Device::flex(), false, &mut record).unwrap();
    let last = record.epochs.last().expect("an epoch ran").health;
    (Warning::diagnose(&last), record)
}

/// A healthy tiny run: preset `small`'s optimiser and augmentation on the tiny network and
/// crops of the other tests. The teacher's momentum fits the run's length: an epoch here is 12
/// iterations, and with `small`'s 0.99 (an average over ~100 iterations) the teacher would
/// rightly be reported as not following the student.
fn healthy() -> TrainConfig {
    let small = TrainConfig::preset("small").unwrap();
    let tiny = tiny_config(3);
    TrainConfig {
        momentum_teacher: 0.9,
        freeze_last_layer: small.freeze_last_layer,
        lr: small.lr,
        crops: dino_data::MultiCropConfig {
            global_size: tiny.crops.global_size,
            local_size: tiny.crops.local_size,
            local_crops: tiny.crops.local_crops,
            ..small.crops
        },
        ..tiny
    }
}

#[test]
fn a_healthy_run_raises_no_warning() {
    let (warnings, record) = last_epoch_warnings(healthy());
    assert!(warnings.is_empty(), "{warnings:?}: {:?}", record.epochs.last().unwrap().health);
    assert!(record.warnings.is_empty(), "{:?}", record.warnings);
    let health = record.epochs.last().unwrap().health;
    // The KL part is the loss minus the teacher's entropy, and both entropies stay under ln K.
    let loss = record.epochs.last().unwrap().train_loss;
    assert!((health.kl_divergence - (loss - health.teacher_entropy)).abs() < 1e-9);
    assert!(health.teacher_entropy <= health.entropy_ceiling + 1e-6);
    assert!(health.teacher_batch_entropy <= health.entropy_ceiling + 1e-6);
    assert!(health.center_norm > 0.0 && health.teacher_drift > 0.0 && health.student_drift > 0.0);
}

#[test]
fn a_hot_teacher_collapses_to_uniform() {
    // A teacher temperature far above the logits' range: every target is near uniform.
    let (warnings, record) =
        last_epoch_warnings(TrainConfig { teacher_temp: 5.0, warmup_teacher_temp: 5.0, ..healthy() });
    assert_eq!(warnings, [Warning::Uniform], "{:?}", record.epochs.last().unwrap().health);
    assert!(record.warnings[0].contains("uniform collapse") && record.warnings[0].contains("teacher_temp"));
}

#[test]
fn sharpening_without_centering_collapses_to_one_prototype() {
    // No centering (the center stays at zero) and a very sharp teacher.
    let (warnings, record) = last_epoch_warnings(TrainConfig {
        center_momentum: 1.0,
        teacher_temp: 0.005,
        warmup_teacher_temp: 0.005,
        lr: 0.02,
        epochs: 20,
        ..healthy()
    });
    assert!(warnings.contains(&Warning::OneHot), "{:?}", record.epochs.last().unwrap().health);
    assert!(record.warnings.iter().any(|w| w.contains("one-hot collapse")));
}

#[test]
fn a_teacher_with_momentum_one_does_not_move() {
    let (warnings, record) = last_epoch_warnings(TrainConfig { momentum_teacher: 1.0, ..healthy() });
    assert_eq!(warnings, [Warning::FrozenTeacher], "{:?}", record.epochs.last().unwrap().health);
    assert_eq!(record.epochs.last().unwrap().health.teacher_drift, 0.0);
    assert!(record.warnings[0].contains("momentum_teacher"));
}
