//! `dino train` end to end on real Fashion-MNIST images (the subset in `fixtures/`, a tiny
//! model), then the exported teacher used by `dino extract`, `dino eval knn` and `dino eval
//! linear`; and the configuration errors a user can make.

use std::path::Path;

use dino_fixtures::fashion_mnist_subset;
use dino_fixtures::sandbox::confined;

fn dino(args: &[&str]) -> std::process::Output {
    confined(Path::new(env!("CARGO_BIN_EXE_dino"))).args(args).output().expect("the dino binary runs")
}

#[test]
fn trains_on_fashion_mnist_and_evaluates_the_teacher() {
    let fashion = fashion_mnist_subset();
    let fashion = fashion.to_str().expect("a UTF-8 checkout path");
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = dino(&[
        "train",
        "--data",
        fashion,
        "--val",
        &format!("{fashion}#test"),
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
        // 10 balanced classes (chance 10 %): even a briefly trained tiny ViT sorts garments
        // far better, and raw pixels do too.
        let knn = line["knn_top1"].as_f64().unwrap();
        assert!((25.0..=100.0).contains(&knn), "{line}");
    }
    let pixels = lines[0]["knn_top1_pixels"].as_f64().unwrap();
    assert!((40.0..=100.0).contains(&pixels) && lines[1]["knn_top1_pixels"].is_null(), "{log}");
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

    let teacher = run.join("teacher_backbone.safetensors");
    let test = format!("{fashion}#test");
    let json = dir.path().join("knn.json");
    let out = dino(&[
        "eval",
        "knn",
        "--train",
        fashion,
        "--test",
        &test,
        "--weights",
        teacher.to_str().unwrap(),
        "--max-train",
        "500",
        "--max-test",
        "200",
        "--k",
        "20",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let knn: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let top1 = knn["results"][0]["top1"].as_f64().unwrap();
    // 10 classes: chance is 10 %; even a briefly trained tiny ViT sorts garments far better.
    assert!((25.0..=100.0).contains(&top1), "{knn}");
    assert_eq!(knn["test"], 200);

    // The linear probe, on augmented views and (--no-augmentation) on fixed center crops.
    let probe = |output: &Path, extra: &[&str]| {
        let teacher = teacher.to_str().unwrap();
        let args = ["eval", "linear", "--train", fashion, "--test", &test, "--weights", teacher];
        let sizes = ["--max-train", "500", "--max-test", "200", "--epochs", "3", "--n-last-blocks", "1"];
        let out = dino(&[&args[..], &sizes, &["--lr", "0.1", "--output", output.to_str().unwrap()], extra].concat());
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let log = std::fs::read_to_string(output.join("log.txt")).unwrap();
        let epochs: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(epochs.len(), 3, "{log}");
        let last = &epochs[2];
        let (top1, top5) = (last["test_acc1"].as_f64().unwrap(), last["test_acc5"].as_f64().unwrap());
        assert!((20.0..=100.0).contains(&top1) && top5 >= top1, "{log}");
        assert!(last["train_loss"].as_f64().unwrap().is_finite(), "{log}");
        stdout
    };
    let linear = dir.path().join("linear");
    let stdout = probe(&linear, &[]);
    assert!(stdout.contains("epoch 3/3") && stdout.contains("Top-1 test accuracy"), "{stdout}");
    assert!(stdout.contains("random-resized-crop + flip views"), "{stdout}");
    let stdout = probe(&dir.path().join("linear-fixed"), &["--no-augmentation"]);
    assert!(stdout.contains("fixed center crops"), "{stdout}");
    let picture = dir.path().join("embedding.png");
    let out = dino(&[
        "eval",
        "embedding",
        "--data",
        &test,
        "--weights",
        teacher.to_str().unwrap(),
        "--max-images",
        "100",
        "--output",
        picture.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(image::image_dimensions(&picture).unwrap(), (900, 800));
    let classifier = std::fs::read(linear.join("linear.safetensors")).unwrap();
    let classifier = safetensors::SafeTensors::deserialize(&classifier).unwrap();
    assert_eq!(classifier.tensor("linear.weight").unwrap().shape(), [10, 192]);
    assert_eq!(classifier.tensor("linear.bias").unwrap().shape(), [10]);
}

#[test]
fn configuration_errors_are_one_line() {
    for (args, expected) in [
        (vec!["train", "--set", "epoch=3"], "unknown setting 'epoch'"),
        (vec!["train", "--preset", "huge"], "unknown --preset"),
        (vec!["train", "--epochs", "0"], "epochs = 0 is out of range: it must be at least 1"),
        (vec!["train", "--lr", "-1"], "lr = -1 is out of range: it must be positive"),
        (vec!["train", "--set", "crops.local_crops=-1"], "crops.local_crops = -1"),
        (vec!["train", "--set", "crops.flip_prob=2"], "crops.flip_prob = 2 is not a probability"),
        (vec!["train", "--data", "/nonexistent/images"], "no such file"),
        (vec!["train", "--arch", "vit_giant"], "unknown arch"),
        // The suite builds without GPU features; a GPU device says how to get one.
        (vec!["train", "--device", "cuda"], "built without GPU support for --device cuda; rebuild with"),
        (
            vec!["eval", "linear", "--train", "synthetic", "--test", "synthetic#test", "--weights", "/nonexistent.pth"],
            "/nonexistent.pth",
        ),
    ] {
        let out = dino(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // A value the argument parser refuses: one line too, with its usage-error exit code.
    let out = dino(&["train", "--epochs", "-1"]);
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr, "error: invalid value '-1' for '--epochs <EPOCHS>': invalid digit found in string; see --help");
}

/// A network small enough for a test run in seconds.
const TINY_NETWORK: [&str; 6] = ["--out-dim", "64", "--set", "depth=1", "--set", "head_hidden_dim=64"];

/// Preset `small` on a folder of a user's own 40 px images: the crop, patch and
/// position-embedding sizes come from the images, are printed, and `config.toml` records them,
/// so the run is reproducible from its config alone.
#[test]
fn preset_small_derives_sizes_from_the_images() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for i in 0..16u32 {
        let picture = image::RgbImage::from_fn(40, 40, |x, y| {
            let inside = (x + 3 * i) % 40 < 20 && (y + 5 * i) % 40 < 16;
            if inside { image::Rgb([200, 60 + 8 * i as u8, 40]) } else { image::Rgb([30, 30, 90]) }
        });
        picture.save(images.join(format!("{i:02}.png"))).unwrap();
    }
    let run = dir.path().join("run");
    // --config: its settings apply over the preset's, and flags over the file's (epochs).
    let file = dir.path().join("settings.toml");
    std::fs::write(&file, "epochs = 5\nseed = 7\n\n[crops]\nlocal_crops = 2\n").unwrap();
    let (images, run_dir, file) = (images.to_str().unwrap(), run.to_str().unwrap(), file.to_str().unwrap());
    let args = ["train", "--data", images, "--preset", "small", "--config", file, "--epochs", "1", "--batch-size", "8"];
    let out = dino(&[&args[..], &["--output", run_dir], &TINY_NETWORK].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // A quarter of the side per patch (a 4 x 4 grid), local crops half the global side.
    assert!(stdout.contains("sizes for 40 px images: global crops 40 px, local crops 20 px, patch 10"), "{stdout}");
    let config: toml::Table = std::fs::read_to_string(run.join("config.toml")).unwrap().parse().unwrap();
    assert_eq!(config["patch_size"].as_integer(), Some(10), "{config:?}");
    assert_eq!(config["img_size"].as_integer(), Some(40), "{config:?}");
    assert_eq!(config["crops"]["global_size"].as_integer(), Some(40), "{config:?}");
    assert_eq!(config["crops"]["local_size"].as_integer(), Some(20), "{config:?}");
    assert_eq!(
        (config["seed"].as_integer(), config["crops"]["local_crops"].as_integer(), config["epochs"].as_integer()),
        (Some(7), Some(2), Some(1)),
        "{config:?}"
    );
    assert_eq!(std::fs::read_to_string(run.join("log.txt")).unwrap().lines().count(), 1);

    // --resume continues with the run's own settings and images (no need to repeat them: not
    // the default synthetic data), takes a longer --epochs and says so, and prints the number of
    // epochs that really runs.
    let out = dino(&["train", "--output", run_dir, "--resume", "--epochs", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("resuming with epochs = 1 -> 2") && stdout.contains(", 2 epochs, batch 8,"), "{stdout}");
    assert!(stdout.contains(&format!("on {images} (16 images)")) && !stdout.contains("synthetic"), "{stdout}");
    assert_eq!(std::fs::read_to_string(run.join("log.txt")).unwrap().lines().count(), 2);
    let config: toml::Table = std::fs::read_to_string(run.join("config.toml")).unwrap().parse().unwrap();
    assert_eq!((config["epochs"].as_integer(), config["patch_size"].as_integer()), (Some(2), Some(10)));
    // A run without its data record (one from before data.toml) must be told its images.
    std::fs::remove_file(run.join("data.toml")).unwrap();
    let out = dino(&["train", "--output", run_dir, "--resume", "--epochs", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("does not record the images it trained on") && stderr.contains("give --data"), "{stderr}");
    // A setting the checkpoint is in the middle of is refused by name, and so is a preset.
    for (extra, expected) in [
        (&["--lr", "0.5"][..], " -> 0.5; drop those flags, or train into a new --output"),
        (&["--preset", "small"][..], "--preset small picks the settings of a new run"),
    ] {
        let out = dino(&[&["train", "--data", images, "--output", run_dir, "--resume"][..], extra].concat());
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!((out.status.code(), stderr.lines().count()), (Some(1), 1), "{stderr}");
        assert!(
            stderr.contains(expected)
                && stderr.contains("keeps the settings it was started with") == extra[0].starts_with("--lr"),
            "{stderr}"
        );
    }
}

/// A checkpoint write that fails (here a file-size limit, as a full disk would) stops the run
/// with a clear message and leaves the previous checkpoint as it was.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn a_failed_checkpoint_write_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_dir = run.to_str().unwrap();
    let args = |epochs| {
        [&["train", "--epochs", epochs, "--max-images", "32", "--output", run_dir][..], &TINY_NETWORK].concat()
    };
    let out = dino(&args("1"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let checkpoint = run.join("checkpoint.safetensors");
    let before = std::fs::read(&checkpoint).unwrap();
    assert!(before.len() > 2 << 20, "the limit below must fall under the checkpoint's {} bytes", before.len());

    let mut command = confined(Path::new(env!("CARGO_BIN_EXE_dino")));
    command.args(args("2"));
    // SAFETY: runs in the forked child before exec; two async-signal-safe system calls. With
    // SIGXFSZ ignored, a write past the limit fails with EFBIG instead of killing the process.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 1 << 20, rlim_max: 1 << 20 };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot write") && stderr.contains("is intact"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert_eq!(std::fs::read(&checkpoint).unwrap(), before, "the previous checkpoint is unchanged");
    assert!(!run.join("checkpoint.safetensors.tmp").exists(), "no temporary file is left behind");
}

#[test]
fn trains_a_resnet_and_every_tool_reads_its_checkpoint() {
    let fashion = fashion_mnist_subset();
    let fashion = fashion.to_str().expect("a UTF-8 checkout path");
    let test = format!("{fashion}#test");
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = dino(&[
        "train",
        "--data",
        fashion,
        "--val",
        &test,
        "--preset",
        "small28",
        "--arch",
        "resnet18_cifar",
        "--optimizer",
        "sgd",
        "--lr",
        "0.03",
        "--epochs",
        "1",
        "--max-images",
        "64",
        "--batch-size",
        "32",
        "--out-dim",
        "256",
        "--local-crops-number",
        "0",
        "--set",
        "head_hidden_dim=128",
        "--set",
        "knn_train_images=64",
        "--set",
        "knn_test_images=40",
        "--output",
        run.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let log = std::fs::read_to_string(run.join("log.txt")).unwrap();
    let line: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    let loss = line["train_loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0 && loss < 2.0 * (256f64).ln(), "{line}");
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("arch = \"resnet18_cifar\"") && config.contains("optimizer = \"sgd\""), "{config}");

    // The exported teacher: extract gives the 512-wide pooled feature, k-NN and the linear probe
    // run on it, and attention (ViT-only) says so in one line.
    let teacher = run.join("teacher_backbone.safetensors");
    let teacher = teacher.to_str().unwrap();
    let features = dir.path().join("f.safetensors");
    let image = run.join("training.png");
    let image = image.to_str().unwrap();
    let args = ["extract", "--weights", teacher, "--image", image, "--resize", "28", "--crop", "28"];
    let out = dino(&[&args[..], &["--output", features.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&features).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, view) = file.tensors().into_iter().next().unwrap();
    assert_eq!(view.shape(), [1, 512]);

    let json = dir.path().join("knn.json");
    let sizes = ["--max-train", "64", "--max-test", "40", "--k", "10", "--json", json.to_str().unwrap()];
    let out = dino(&[&["eval", "knn", "--train", fashion, "--test", &test, "--weights", teacher][..], &sizes].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let knn: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // 10 classes, 64 neighbours to choose from: above chance, not a learning-quality bar.
    let top1 = knn["results"][0]["top1"].as_f64().unwrap();
    assert!((15.0..=100.0).contains(&top1), "{knn}");

    let linear = dir.path().join("linear");
    let args = ["eval", "linear", "--train", fashion, "--test", &test, "--weights", teacher];
    let sizes = ["--max-train", "64", "--max-test", "40", "--epochs", "1", "--output", linear.to_str().unwrap()];
    let out = dino(&[&args[..], &sizes].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let classifier = std::fs::read(linear.join("linear.safetensors")).unwrap();
    let classifier = safetensors::SafeTensors::deserialize(&classifier).unwrap();
    assert_eq!(classifier.tensor("linear.weight").unwrap().shape(), [10, 512]);

    let picture = dir.path().join("embedding.png");
    let args = ["eval", "embedding", "--data", &test, "--weights", teacher, "--max-images", "40"];
    let out = dino(&[&args[..], &["--output", picture.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(image::image_dimensions(&picture).unwrap(), (900, 800));

    let out = dino(&["attention", "--weights", teacher, "--image", image, "--output", dir.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.trim().lines().count() == 1, "{stderr}");
    assert!(stderr.contains("ViT"), "{stderr}");
}
