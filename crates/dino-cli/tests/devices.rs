//! The GPU path through the real binary. In a GPU build run with `DINO_TEST_DEVICE=wgpu|vulkan`
//! (`scripts/gpu-check.sh`; software Vulkan, lavapipe, is enough), every command runs on that
//! device, and extraction and a short training run agree with the CPU step by step. In any build,
//! a GPU backend the binary was built without is refused with the command that builds it.

use std::path::Path;
use std::process::Output;

use dino_fixtures::sandbox::confined;
use dino_fixtures::{fashion_mnist_subset, fixture_dir, manifest_usize, rel_err_vec};

/// GPU f32 arithmetic sums in other orders (tiled matmuls, tree reductions) and uses its own
/// `exp`: features agree to ~1e-6 relative, and a training run of a few steps, whose
/// differences grow through every update, to ~1e-4.
const FEATURE_TOL: f64 = 1e-4;
const LOSS_TOL: f64 = 1e-3;

fn dino(args: &[&str]) -> Output {
    confined(Path::new(env!("CARGO_BIN_EXE_dino"))).args(args).output().expect("the dino binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = dino(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "dino {}\n{stdout}\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    stdout
}

fn built_with(device: &str) -> bool {
    match device {
        "wgpu" => cfg!(feature = "wgpu"),
        "vulkan" => cfg!(feature = "vulkan"),
        "cuda" => cfg!(feature = "cuda"),
        _ => true,
    }
}

#[test]
fn a_gpu_backend_the_build_lacks_is_refused_with_the_build_command() {
    for device in ["wgpu", "vulkan", "cuda"].into_iter().filter(|d| !built_with(d)) {
        let out = dino(&["bench", "--preset", "small28", "--steps", "1", "--device", device]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{device}: {stderr}");
        assert!(stderr.contains(&format!("cargo build --release --features {device}")), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

fn read_features(path: &Path) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor("features").unwrap();
    view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect()
}

/// `train_loss` of every line of a run's `log.txt`.
fn losses(run: &Path) -> Vec<f64> {
    let log = std::fs::read_to_string(run.join("log.txt")).unwrap();
    log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss"].as_f64().unwrap()).collect()
}

#[test]
#[ignore = "needs a GPU build and DINO_TEST_DEVICE=wgpu|vulkan (scripts/gpu-check.sh)"]
fn every_command_runs_on_the_gpu_and_agrees_with_the_cpu() {
    let device = std::env::var("DINO_TEST_DEVICE").expect("DINO_TEST_DEVICE names the GPU backend to test");
    assert!(built_with(&device) && device != "cpu", "DINO_TEST_DEVICE={device}: test a GPU backend this build has");
    let dir = tempfile::tempdir().unwrap();
    let tmp = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let backbone = fixture_dir().join("vit_backbone.safetensors");
    let backbone = backbone.to_str().unwrap();
    let images = tmp("images");
    write_images(Path::new(&images));
    let heads = manifest_usize("heads").to_string();

    // Extraction: the same features on both devices.
    for on in ["cpu", device.as_str()] {
        let out = tmp(&format!("{on}.safetensors"));
        let sizes = ["--resize", "40", "--crop", "32"];
        ok(&[
            &["extract", "--weights", backbone, "--num-heads", &heads, "--data", &images, "-o", &out, "--device", on],
            &sizes[..],
        ]
        .concat());
    }
    let (cpu, gpu) = (
        read_features(&dir.path().join("cpu.safetensors")),
        read_features(&dir.path().join(format!("{device}.safetensors"))),
    );
    assert_eq!(cpu.len(), gpu.len());
    let err = rel_err_vec(&gpu, &cpu);
    println!("extract: features rel err {err:.1e}");
    assert!(err < FEATURE_TOL, "extract on {device}: rel err {err:e}");

    ok(&[
        "attention",
        "--weights",
        backbone,
        "--num-heads",
        &heads,
        "--image",
        &format!("{images}/0.png"),
        "--image-size",
        "48",
        "48",
        "--output",
        &tmp("attention"),
        "--device",
        &device,
    ]);
    assert!(std::fs::read_dir(tmp("attention")).unwrap().count() > 0);

    // Training: one iteration per epoch, so log.txt holds every step's loss; drop path on (its
    // masks come from the host generator, as the weights do, so the seed means the same run).
    let fashion = fashion_mnist_subset();
    let fashion = fashion.to_str().unwrap();
    let train = |on: &str| {
        let run = tmp(&format!("run-{on}"));
        ok(&[
            "train",
            "--data",
            fashion,
            "--preset",
            "small28",
            "--epochs",
            "4",
            "--max-images",
            "16",
            "--batch-size",
            "16",
            "--out-dim",
            "128",
            "--set",
            "depth=2",
            "--set",
            "head_hidden_dim=64",
            "--set",
            "crops.local_crops=2",
            "--set",
            "warmup_epochs=0",
            "--output",
            &run,
            "--device",
            on,
        ]);
        run
    };
    let (cpu_run, gpu_run) = (train("cpu"), train(&device));
    let (cpu, gpu) = (losses(Path::new(&cpu_run)), losses(Path::new(&gpu_run)));
    assert_eq!(cpu.len(), 4);
    for (step, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        let err = (c - g).abs() / c.abs();
        println!("train step {step}: loss cpu {c:.6} {device} {g:.6}, rel err {err:.1e}");
        assert!(err < LOSS_TOL, "step {step}: loss {g} on {device}, {c} on the CPU");
    }

    // The trained teacher through every evaluation, on the device.
    let teacher = format!("{gpu_run}/teacher_backbone.safetensors");
    let test = format!("{fashion}#test");
    let split = ["--train", fashion, "--test", &test, "--max-train", "64", "--max-test", "32", "--device", &device];
    let knn = ok(&[&["eval", "knn", "--weights", &teacher, "--k", "5"], &split[..]].concat());
    assert!(knn.contains("5-NN: top1"), "{knn}");
    let linear = tmp("linear");
    ok(&[
        &[
            "eval",
            "linear",
            "--weights",
            &teacher,
            "--epochs",
            "1",
            "--n-last-blocks",
            "1",
            "--no-augmentation",
            "--output",
            &linear,
        ],
        &split[..],
    ]
    .concat());
    assert!(Path::new(&linear).join("linear.safetensors").is_file());
    let picture = tmp("embedding.png");
    ok(&[
        "eval",
        "embedding",
        "--weights",
        &teacher,
        "--data",
        &test,
        "--max-images",
        "32",
        "--output",
        &picture,
        "--device",
        &device,
    ]);
    assert!(Path::new(&picture).is_file());
    let bench = ok(&["bench", "--preset", "small28", "--batch", "8", "--steps", "1", "--device", &device]);
    assert!(bench.contains("train_img_per_s"), "{bench}");
}

/// Four 48 x 40 px images of smooth colour gradients with a bright square, different in each.
fn write_images(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..4u32 {
        let img = image::RgbImage::from_fn(48, 40, |x, y| {
            let square = (x / 12 == i % 4 && y / 10 == (i + 1) % 4) as u8 * 120;
            image::Rgb([(x * 5) as u8 + square, (y * 6 + i * 40) as u8, ((x + y) * 3) as u8])
        });
        img.save(dir.join(format!("{i}.png"))).unwrap();
    }
}
