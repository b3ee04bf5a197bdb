//! Whole runs: a run stopped mid-epoch (as Ctrl-C stops it) and resumed ends with exactly the
//! weights and the log of an uninterrupted run with the same seed (CPU), and the run directory
//! holds what it should.
//!
//! Alone in its test binary: the backend RNG (initialisation, drop path) is process-wide, and a
//! test training beside it in another thread would draw from it between our seedings.

use std::sync::Arc;

use burn::tensor::Device;
use dino_data::{Dataset, Split};
use dino_model::weights::{CheckpointKey, read_safetensors};
use dino_train::{IterationLog, KnnData, Observer, Position, RunDir, train};

mod common;
use common::tiny_config;

struct Quiet;
impl Observer for Quiet {}

fn knn() -> Option<KnnData> {
    Some(KnnData {
        bank: Arc::new(Dataset::synthetic(Split::Train)),
        queries: Arc::new(Dataset::synthetic(Split::Test)),
    })
}

#[test]
fn resumed_run_matches_an_uninterrupted_one() {
    let data = Arc::new(Dataset::synthetic(Split::Train));
    let device = Device::flex();
    let straight = tempfile::tempdir().unwrap();
    let summary = train(&tiny_config(2), data.clone(), knn(), straight.path(), &device, false, &mut Quiet).unwrap();
    assert!(summary.knn_before.is_some() && summary.last_epoch.as_ref().unwrap().knn_top1.is_some());

    let split = tempfile::tempdir().unwrap();
    let iterations = dino_data::loader::iterations_per_epoch(tiny_config(2).max_images, tiny_config(2).batch_size);
    assert!(iterations >= 3, "{iterations} iterations per epoch");
    let mut stop = StopAfter(iterations + 2);
    let first = train(&tiny_config(2), data.clone(), None, split.path(), &device, false, &mut stop).unwrap();
    assert_eq!(first.stopped_at, Some(Position { epoch: 1, iteration: 2 }));
    assert_eq!(first.last_epoch.unwrap().epoch, 0);
    train(&tiny_config(2), data, None, split.path(), &device, true, &mut Quiet).unwrap();

    let a = RunDir(straight.path().into()).checkpoint();
    let b = RunDir(split.path().into()).checkpoint();
    let (ta, _) = read_safetensors(&a).unwrap();
    let (tb, _) = read_safetensors(&b).unwrap();
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    let mut compared = 0;
    for (key, value) in &ta {
        assert_eq!(value, &tb[key], "{key} differs after resume");
        compared += 1;
    }
    assert!(compared > 20);
    let losses = |dir: &std::path::Path| -> Vec<f64> {
        let log = std::fs::read_to_string(RunDir(dir.into()).log()).unwrap();
        log.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(losses(straight.path()), losses(split.path()), "one log line per epoch, the same losses");
    // Student and teacher both readable as networks.
    for key in [CheckpointKey::Student, CheckpointKey::Teacher] {
        dino_model::weights::Weights::read(&a, key).unwrap();
    }

    let run = RunDir(straight.path().into());
    let log = std::fs::read_to_string(run.log()).unwrap();
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for field in ["train_loss", "train_lr", "train_wd", "epoch", "knn_top1"] {
        assert!(lines[1][field].is_number(), "log.txt lacks {field}: {log}");
    }
    assert!(lines[0]["knn_top1_initial"].is_number());
    for file in [run.config(), run.plot(), run.teacher_backbone(), straight.path().join("checkpoint0000.safetensors")] {
        assert!(file.is_file(), "{} missing", file.display());
    }
}

/// Asks the run to stop after this many iterations, as Ctrl-C would.
struct StopAfter(usize);

impl Observer for StopAfter {
    fn iteration(&mut self, _: &IterationLog) {
        self.0 = self.0.saturating_sub(1);
    }

    fn stop_requested(&mut self) -> bool {
        self.0 == 0
    }
}
