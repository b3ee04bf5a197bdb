//! The GPU path through the real binary. In a GPU build run with `DINO_TEST_DEVICE=wgpu|vulkan`
//! (`scripts/gpu-check.sh`; software Vulkan, lavapipe, is enough), every command runs on that
//! device, and extraction and a short training run agree with the CPU step by step. In any build,
//! a GPU backend the binary was built without is refused with the command that builds it.

use std::path::Path;
use std::process::Output;

use dino_fixtures::sandbox::confined;
use dino_fixtures::{fashion_mnist_subset, fixture_dir, manifest_usize, rel_err_vec};

mod common;
use common::{write_clip, write_copydays, write_revisited};

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

// A match, not `matches!`: which arm is true depends on the build's features.
#[allow(clippy::match_like_matches_macro)]
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
    read_tensor(path, "features")
}

fn read_tensor(path: &Path, name: &str) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor(name).unwrap();
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
    let device = device_under_test();
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

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The GPU under test, checked against the build.
fn device_under_test() -> String {
    let device = std::env::var("DINO_TEST_DEVICE").expect("DINO_TEST_DEVICE names the GPU backend to test");
    assert!(built_with(&device) && device != "cpu", "DINO_TEST_DEVICE={device}: test a GPU backend this build has");
    device
}

#[test]
#[ignore = "needs a GPU build and DINO_TEST_DEVICE=wgpu|vulkan (scripts/gpu-check.sh)"]
fn search_copy_detection_frames_and_finetuning_run_on_the_gpu_as_on_the_cpu() {
    let device = device_under_test();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let tmp = |name: &str| root.join(name).to_str().unwrap().to_string();
    let backbone = fixture_dir().join("vit_backbone.safetensors");
    let heads = manifest_usize("heads").to_string();
    let weights = ["--weights", backbone.to_str().unwrap(), "--num-heads", &heads];
    // The command and its arguments, then the weights and the device.
    let run = |args: &[&str], d: &str| ok(&[args, &weights[..], &["--device", d][..]].concat());
    write_images(&root.join("images"));
    write_clip(root);
    let revisited = write_revisited(root);
    let copydays = write_copydays(root);

    for d in ["cpu", device.as_str()] {
        let query = tmp("images/2.png");
        let out = tmp(&format!("retrieve-{d}"));
        run(&["retrieve", "--data", &tmp("images"), "--query", &query, "--resize", "0", "--crop", "32", "-o", &out], d);
        let retrieval = ["eval", "retrieval", "--data", revisited.to_str().unwrap(), "--imsize", "32"];
        run(&[&retrieval[..], &["--json", &tmp(&format!("revisited-{d}.json"))]].concat(), d);
        let copies = ["eval", "copydetection", "--data", copydays.to_str().unwrap(), "--imsize", "48"];
        run(
            &[&copies[..], &["--whitening", &tmp("whiten"), "--json", &tmp(&format!("copydays-{d}.json"))]].concat(),
            d,
        );
        run(&["attention", "--frames", &tmp("frames"), "-o", &tmp(&format!("frames-{d}"))], d);
    }
    // The same neighbours in the same order, with the same scores.
    let neighbours = |d: &str| read_json(&root.join(format!("retrieve-{d}/results.json")))[0]["neighbours"].clone();
    let (cpu, gpu) = (neighbours("cpu"), neighbours(&device));
    assert_eq!(cpu.as_array().unwrap().len(), 4, "{cpu}");
    for (c, g) in cpu.as_array().unwrap().iter().zip(gpu.as_array().unwrap()) {
        assert_eq!(c["path"], g["path"], "retrieve: cpu {cpu}\n{device} {gpu}");
        let (c, g) = (c["score"].as_f64().unwrap(), g["score"].as_f64().unwrap());
        assert!((c - g).abs() < FEATURE_TOL, "retrieve: score {g} on {device}, {c} on the CPU");
    }
    // The same mean average precisions: the rankings agree.
    for (file, pointers) in [
        ("revisited", &["/medium/map", "/hard/map"][..]),
        ("copydays", &["/blocks/0/map", "/blocks/1/map", "/blocks/2/map", "/blocks/3/map"][..]),
    ] {
        let (cpu, gpu) =
            (read_json(&root.join(format!("{file}-cpu.json"))), read_json(&root.join(format!("{file}-{device}.json"))));
        for pointer in pointers {
            let (c, g) = (cpu.pointer(pointer).and_then(|v| v.as_f64()), gpu.pointer(pointer).and_then(|v| v.as_f64()));
            assert!(c.is_some() && c == g, "{file} {pointer}: {g:?} on {device}, {c:?} on the CPU");
        }
    }
    let maps = |d: &str| read_tensor(&root.join(format!("frames-{d}/attention.safetensors")), "attentions");
    let err = rel_err_vec(&maps(&device), &maps("cpu"));
    println!("attention --frames: maps rel err {err:.1e}");
    assert!(err < FEATURE_TOL, "attention --frames on {device}: rel err {err:e}");

    // Fine-tuning: a step of its own kind (label smoothing, layer decay, a fresh head) trains on
    // the device.
    let fashion = fashion_mnist_subset();
    let fashion = fashion.to_str().unwrap();
    let test = format!("{fashion}#test");
    let args = [
        "finetune",
        "--train",
        fashion,
        "--test",
        &test,
        "--epochs",
        "1",
        "--size",
        "28",
        "--max-train",
        "64",
        "--layer-decay",
        "0.75",
        "-o",
        &tmp("finetune"),
    ];
    let stdout = run(&args, &device);
    assert!(stdout.contains("epoch 1/1: train loss"), "{stdout}");
    let log = read_json(&root.join("finetune/log.txt"));
    assert!(log["train_loss"].as_f64().is_some_and(f64::is_finite), "{log}");
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
