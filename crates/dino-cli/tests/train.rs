//! `dino train` end to end on real Fashion-MNIST images (a subset, a tiny model), then the
//! exported teacher used by `dino extract`; and the configuration errors a user can make.

use std::path::Path;
use std::process::Command;

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

fn dino(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dino")).args(args).output().expect("the dino binary runs")
}

#[test]
fn trains_on_fashion_mnist_and_exports_a_usable_teacher() {
    assert!(
        Path::new(FASHION_MNIST).join("train-images-idx3-ubyte.gz").is_file(),
        "Fashion-MNIST is missing: `apt-get install -y dataset-fashion-mnist` (.ci/run does it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = dino(&[
        "train",
        "--data",
        FASHION_MNIST,
        "--val",
        &format!("{FASHION_MNIST}#test"),
        "--preset",
        "small28",
        "--epochs",
        "2",
        "--max-images",
        "192",
        "--batch-size",
        "32",
        "--out-dim",
        "256",
        "--set",
        "depth=1",
        "--set",
        "knn_train_images=192",
        "--set",
        "knn_test_images=100",
        "--set",
        "head_hidden_dim=128",
        "--set",
        "crops.local_crops=2",
        "--output",
        run.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("teacher k-NN top-1"), "{stdout}");

    let log = std::fs::read_to_string(run.join("log.txt")).unwrap();
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{log}");
    for line in &lines {
        let loss = line["train_loss"].as_f64().unwrap();
        // ln(256) is the loss of uniform outputs; a sane DINO loss stays near or below it.
        assert!(loss.is_finite() && loss > 0.0 && loss < 2.0 * (256f64).ln(), "{line}");
        let knn = line["knn_top1"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&knn), "{line}");
    }
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("epochs = 2") && config.contains("out_dim = 256"), "{config}");

    let features = dir.path().join("f.safetensors");
    let out = dino(&[
        "extract",
        "--weights",
        run.join("teacher_backbone.safetensors").to_str().unwrap(),
        "--image",
        run.join("training.png").to_str().unwrap(),
        "--resize",
        "28",
        "--crop",
        "28",
        "--output",
        features.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn configuration_errors_are_one_line() {
    for (args, expected) in [
        (vec!["train", "--set", "epoch=3"], "unknown setting 'epoch'"),
        (vec!["train", "--preset", "huge"], "unknown --preset"),
        (vec!["train", "--epochs", "0"], "epochs must be at least 1"),
        (vec!["train", "--data", "/nonexistent/images"], "no such file"),
        (vec!["train", "--arch", "vit_giant"], "unknown arch"),
    ] {
        let out = dino(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
