//! The real `dino` binary on the reference fixture weights and on images the tests create:
//! happy paths, and bad input that must end in a one-line error and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::Output;

use burn::tensor::{Device, Tensor, TensorData};
use dino_data::{IMAGENET_MEAN, IMAGENET_STD, load_rgb, to_chw};
use dino_fixtures::fixture_dir;
use dino_fixtures::pth::{pth_tensors, write_malicious_pth};
use dino_fixtures::sandbox::confined;
use dino_model::weights::{CheckpointKey, Weights, save_backbone};
use dino_model::{VisionTransformer, VitConfig};
use image::{Rgb, RgbImage};

mod common;
use common::{write_clip, write_copydays, write_revisited};

fn heads_from_manifest() -> usize {
    dino_fixtures::manifest_usize("heads")
}

fn dino(args: &[&str]) -> Output {
    confined(Path::new(env!("CARGO_BIN_EXE_dino"))).args(args).output().expect("the dino binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = dino(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dino {args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail; returns its single stderr line.
fn fails(args: &[&str]) -> String {
    let out = dino(args);
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success(), "dino {args:?} should fail");
    assert_eq!(out.status.code(), Some(1), "dino {args:?}: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected, got: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

/// A test workspace: the fixture backbone saved with its config, and a few images.
struct Workspace {
    dir: tempfile::TempDir,
    config: VitConfig,
    vit: VisionTransformer,
}

impl Workspace {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let weights = Weights::read(&fixture_dir().join("vit_backbone.safetensors"), CheckpointKey::Teacher).unwrap();
        let config = weights.vit_config(Some(heads_from_manifest())).unwrap();
        let vit = weights.vit(&config, &Device::flex()).unwrap();
        save_backbone(
            &dino_model::Backbone::Vit(vit.clone()),
            &dino_model::BackboneConfig::Vit(config.clone()),
            &dir.path().join("backbone.safetensors"),
        )
        .unwrap();
        let images = dir.path().join("images");
        for (class, colour) in [("cats", [200u8, 120, 40]), ("dogs", [30, 90, 220])] {
            std::fs::create_dir_all(images.join(class)).unwrap();
            for i in 0..2u8 {
                let img = RgbImage::from_fn(40 + 8 * i as u32, 36, |x, y| {
                    Rgb([colour[0].wrapping_add((x * 3) as u8), colour[1].wrapping_add((y * 5) as u8), colour[2] ^ i])
                });
                let ext = if i == 0 { "png" } else { "jpg" };
                img.save(images.join(class).join(format!("{i}.{ext}"))).unwrap();
            }
        }
        Self { dir, config, vit }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

fn read_safetensors(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(name).unwrap();
    let values = view.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (view.shape().to_vec(), values)
}

#[test]
fn extract_writes_features_equal_to_the_model_forward() {
    let ws = Workspace::new();
    let out = ws.path("out/features.safetensors");
    let stdout = ok(&[
        "extract",
        "--weights",
        &ws.s("backbone.safetensors"),
        "--data",
        &ws.s("images"),
        "--resize",
        "0",
        "--crop",
        "0",
        "--batch-size",
        "3",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(stdout.contains(&format!("[4, {}]", ws.config.embed_dim)), "{stdout}");
    let (shape, values) = read_safetensors(&out, "features");
    assert_eq!(shape, vec![4, ws.config.embed_dim]);
    let listed: Vec<String> =
        std::fs::read_to_string(out.with_extension("txt")).unwrap().lines().map(String::from).collect();
    assert_eq!(listed.len(), 4);
    assert!(listed[0].ends_with("cats/0.png") && listed[3].ends_with("dogs/1.jpg"), "{listed:?}");
    // Row i is the final-normed CLS of image i, computed here directly.
    for (row, path) in listed.iter().enumerate() {
        let img = load_rgb(Path::new(path), &Default::default()).unwrap();
        let (w, h) = img.dimensions();
        let x = Tensor::<4>::from_data(
            TensorData::new(to_chw(&img, IMAGENET_MEAN, IMAGENET_STD), [1, 3, h as usize, w as usize]),
            &Device::flex(),
        );
        let expected: Vec<f32> = ws.vit.forward(x).into_data().iter::<f32>().collect();
        let got = &values[row * ws.config.embed_dim..(row + 1) * ws.config.embed_dim];
        let err = expected.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-4, "row {row}: max abs diff {err}");
    }

    // bf16 products: near the f32 features, but not them; f16 is refused on the CPU.
    let bf16 = ws.path("out/bf16.safetensors");
    let args = ["extract", "--weights", &ws.s("backbone.safetensors"), "--data", &ws.s("images"), "--resize", "0"];
    ok(&[&args[..], &["--crop", "0", "--precision", "bf16", "--output", bf16.to_str().unwrap()]].concat());
    let (_, rounded) = read_safetensors(&bf16, "features");
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let diff: Vec<f32> = rounded.iter().zip(&values).map(|(a, b)| a - b).collect();
    let rel = norm(&diff) / norm(&values);
    assert!(rel > 1e-5 && rel < 2e-2, "bf16 features differ from f32 by {rel:e}");
    let f16 = fails(&[&args[..], &["--precision", "f16", "--output", bf16.to_str().unwrap()]].concat());
    assert!(f16.contains("on the CPU use bf16 or f32"), "{f16}");
}

#[test]
fn extract_supports_official_files_npy_and_feature_options() {
    let ws = Workspace::new();
    let heads = heads_from_manifest().to_string();
    let out = ws.path("f.npy");
    for weights in ["vit_backbone.pth", "checkpoint.pth"] {
        let weights = fixture_dir().join(weights);
        ok(&[
            "extract",
            "--weights",
            weights.to_str().unwrap(),
            "--num-heads",
            &heads,
            "--image",
            &ws.s("images/cats/0.png"),
            "--resize",
            "64",
            "--crop",
            "32",
            "--l2-norm",
            "--n-last-blocks",
            "2",
            "--avgpool",
            "--output",
            out.to_str().unwrap(),
        ]);
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[..6], b"\x93NUMPY");
        let header = String::from_utf8_lossy(&bytes[10..128]);
        let dim = 3 * ws.config.embed_dim;
        assert!(header.contains(&format!("'shape': (1, {dim}, )")), "{header}");
        // --l2-norm: unit rows.
        let row: Vec<f32> =
            bytes[bytes.len() - 4 * dim..].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    }
}

/// `--checkpoint-key student` reads the student of an official checkpoint, which four training
/// iterations have moved away from the teacher; the teacher is the default.
#[test]
fn checkpoint_key_picks_the_network_of_a_checkpoint() {
    let ws = Workspace::new();
    let heads = heads_from_manifest().to_string();
    let checkpoint = fixture_dir().join("checkpoint.pth");
    let extract = |name: &str, key: &[&str]| {
        let out = ws.path(name);
        let image = ws.s("images/cats/0.png");
        let args = ["extract", "--weights", checkpoint.to_str().unwrap(), "--num-heads", &heads, "--image", &image];
        ok(&[&args[..], &["--resize", "32", "--crop", "32", "--output", out.to_str().unwrap()], key].concat());
        read_safetensors(&out, "features").1
    };
    let default = extract("default.safetensors", &[]);
    let teacher = extract("teacher.safetensors", &["--checkpoint-key", "teacher"]);
    let student = extract("student.safetensors", &["--checkpoint-key", "student"]);
    assert_eq!(default, teacher);
    let differs = student.iter().zip(&teacher).map(|(s, t)| (s - t).abs()).fold(0.0f32, f32::max);
    assert!(differs > 1e-4 && student.iter().all(|v| v.is_finite()), "student and teacher differ by {differs}");
}

#[test]
fn attention_writes_maps_masks_and_tensors() {
    let ws = Workspace::new();
    let out = ws.path("attn");
    let p = ws.config.patch_size;
    let stdout = ok(&[
        "attention",
        "--weights",
        &ws.s("backbone.safetensors"),
        "--image",
        &ws.s("images/dogs/1.jpg"),
        "--image-size",
        "30",
        "43",
        "--threshold",
        "0.6",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(stdout.contains("heads"), "{stdout}");
    let heads = ws.config.num_heads;
    for h in 0..heads {
        for file in [format!("attn-head{h}.png"), format!("mask_th0.6_head{h}.png")] {
            let img = image::open(out.join(&file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            // 30 x 43 cropped to whole patches.
            assert_eq!((img.height(), img.width()), ((30 / p * p) as u32, (43 / p * p) as u32), "{file}");
        }
    }
    assert!(image::open(out.join("attention.png")).is_ok());
    let (shape, values) = read_safetensors(&out.join("attention.safetensors"), "attentions");
    assert_eq!(shape, vec![heads, 30 / p, 43 / p]);
    // CLS-to-patch softmax weights: positive, and less than the whole row (CLS keeps some).
    for h in 0..heads {
        let n = shape[1] * shape[2];
        let sum: f32 = values[h * n..(h + 1) * n].iter().sum();
        assert!(values.iter().all(|&v| v > 0.0) && sum < 1.0 && sum > 0.0, "head {h}: {sum}");
    }
}

#[test]
fn attention_over_frames_writes_each_frame_and_an_animation() {
    use image::AnimationDecoder;
    let ws = Workspace::new();
    write_clip(ws.dir.path());
    let p = ws.config.patch_size;
    let heads = ws.config.num_heads;
    let weights = ws.s("backbone.safetensors");
    let gif_frames = |path: &Path| {
        let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        image::codecs::gif::GifDecoder::new(file).unwrap().into_frames().collect_frames().unwrap()
    };

    let out = ws.path("from-gif");
    let stdout = ok(&["attention", "--weights", &weights, "--frames", &ws.s("clip.gif"), "-o", out.to_str().unwrap()]);
    assert!(stdout.contains("3 frames of 40x32 px") || p != 8, "{stdout}");
    for i in 0..3 {
        for prefix in ["attn", "mask"] {
            let file = out.join(format!("{prefix}-frame{i:05}.png"));
            let img = image::open(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert_eq!(img.width(), 40 / p as u32 * p as u32);
        }
    }
    let animation = gif_frames(&out.join("attention.gif"));
    assert_eq!(animation.len(), 3);
    assert_eq!(animation[0].delay().numer_denom_ms(), (80, 1), "the clip's own pace");
    // Each frame's maps are the model's, on the frame as decoded.
    let (shape, values) = read_safetensors(&out.join("attention.safetensors"), "attentions");
    assert_eq!(shape, vec![3, heads, 32 / p, 40 / p]);
    let decoded = dino_data::open_frames(&ws.path("clip.gif"), &Default::default()).unwrap();
    let per_frame = heads * shape[2] * shape[3];
    for (i, frame) in decoded.enumerate() {
        let img = dino_eval::attention::prepare_image(&frame.unwrap().image, 40, 32, p);
        let maps = dino_eval::attention::cls_attention(&ws.vit, &img, &Device::flex());
        let got = &values[i * per_frame..(i + 1) * per_frame];
        let worst = maps.values.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-6, "frame {i}: {worst}");
    }

    // A folder of frames, resized, at a chosen pace.
    let out = ws.path("from-folder");
    let args = ["--frames", &ws.s("frames"), "--image-size", "24", "32", "--fps", "10", "--threshold", "0.5"];
    ok(&[&["attention", "--weights", &weights, "-o", out.to_str().unwrap()][..], &args].concat());
    assert!(out.join("mask-002.png").exists());
    let animation = gif_frames(&out.join("attention.gif"));
    assert_eq!(animation.len(), 3);
    assert_eq!(animation[2].delay().numer_denom_ms(), (100, 1));
    assert_eq!(read_safetensors(&out.join("attention.safetensors"), "attentions").0, vec![3, heads, 24 / p, 32 / p]);

    let e = fails(&["attention", "--weights", &weights, "--frames", &ws.s("clip.mp4"), "-o", &ws.s("v")]);
    assert!(e.contains("extract its frames first"), "{e}");
    let out = dino(&["attention", "--weights", &weights, "-o", &ws.s("v")]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains("not provided: <--image <FILE>|--frames <DIR|FILE>>"), "{e}");
}

#[test]
fn eval_retrieval_scores_the_revisited_protocol() {
    use dino_eval::revisited::{GroundTruth, evaluate, image_feature, rank};
    let ws = Workspace::new();
    let dir = write_revisited(ws.dir.path());
    let weights = ws.s("backbone.safetensors");
    let json = ws.path("retrieval.json");
    let args = ["--data", dir.to_str().unwrap(), "--imsize", "32", "--json", json.to_str().unwrap()];
    let stdout = ok(&[&["eval", "retrieval", "--weights", &weights][..], &args].concat());
    assert!(stdout.starts_with(">> tiny: mAP M: "), "{stdout}");
    assert!(stdout.contains(">> tiny: mP@k[1, 5, 10] M: ["), "{stdout}");
    let got: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();

    // The same protocol through the library, on the model the file holds.
    let truth = GroundTruth::read(&dir.join("gnd_tiny.pkl")).unwrap();
    let backbone = dino_model::Backbone::Vit(ws.vit.clone());
    let features = |list: &[String]| -> Vec<f32> {
        let f = |s: &String| load_rgb(&dir.join(format!("jpg/{s}.jpg")), &Default::default()).unwrap();
        list.iter().flat_map(|s| image_feature(&backbone, &f(s), Some(32), false, &Device::flex())).collect()
    };
    let dim = ws.config.embed_dim;
    let expect = evaluate(&rank(&features(&truth.imlist), &features(&truth.qimlist), dim), &truth);
    for (setup, result) in [("medium", &expect.medium), ("hard", &expect.hard)] {
        let map = got[setup]["map"].as_f64().unwrap();
        assert!((map - result.map).abs() < 1e-9, "{setup}: {map} vs {}", result.map);
    }
    // Query 1's one positive is its own copy: found first.
    assert_eq!(got["hard"]["aps"]["q1"].as_f64(), Some(1.0), "{got}");
    assert_eq!(got["medium"]["aps"]["q1"].as_f64(), Some(1.0), "{got}");

    let stdout = ok(&[&["eval", "retrieval", "--weights", &weights, "--multiscale"][..], &args[..4]].concat());
    assert!(stdout.contains("mAP M: "), "{stdout}");
    std::fs::remove_file(dir.join("jpg/db4.jpg")).unwrap();
    let e = fails(&["eval", "retrieval", "--weights", &weights, "--data", dir.to_str().unwrap()]);
    assert!(e.contains("db4.jpg: missing; tiny lists 6 database and 2 query images"), "{e}");
    let e = fails(&["eval", "retrieval", "--weights", &weights, "--data", &ws.s("images")]);
    assert!(e.contains("no gnd_*.pkl here"), "{e}");
}

#[test]
fn eval_copydetection_scores_each_block_of_edits() {
    let ws = Workspace::new();
    let dir = write_copydays(ws.dir.path());
    let weights = ws.s("backbone.safetensors");
    let json = ws.path("copy.json");
    let base = ["eval", "copydetection", "--weights", &weights, "--data", dir.to_str().unwrap(), "--imsize", "48"];
    let stdout = ok(&[&base[..], &["--json", json.to_str().unwrap()]].concat());
    assert!(stdout.contains("4 originals, 0 distractors, 16 queries in 4 blocks"), "{stdout}");
    // Each original finds itself first: the pipeline ranks by the features it computed.
    assert!(stdout.contains("eval on original mAP=1.000"), "{stdout}");
    for block in ["crops/50", "jpegqual/10", "strong"] {
        assert!(stdout.contains(&format!("eval on {block} mAP=")), "{stdout}");
    }
    let got: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let blocks = got["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 4);
    assert!(blocks.iter().all(|b| (0.0..=1.0).contains(&b["map"].as_f64().unwrap())), "{got}");

    // With distractors and whitening learned on other images.
    let extra = ["--distractors", &ws.s("distract"), "--whitening", &ws.s("whiten")];
    let stdout = ok(&[&base[..], &extra].concat());
    assert!(stdout.contains("4 originals, 4 distractors, 16 queries in 4 blocks; features"), "{stdout}");
    assert!(stdout.contains("whitened"), "{stdout}");
    assert!(stdout.contains("eval on original mAP=1.000"), "{stdout}");

    let e = fails(&["eval", "copydetection", "--weights", &weights, "--data", &ws.s("images")]);
    assert!(e.contains("no original/ folder of images"), "{e}");
}

#[test]
fn finetune_trains_a_head_and_backbone_and_keeps_the_best_epoch() {
    let ws = Workspace::new();
    let weights = ws.s("backbone.safetensors");
    let subset = dino_fixtures::fashion_mnist_subset();
    let (train, test) = (subset.display().to_string(), format!("{}#test", subset.display()));
    let out = ws.path("ft");
    let common =
        ["--train", &train, "--test", &test, "--epochs", "3", "--size", "28", "--lr", "5e-3", "--max-train", "256"];
    let stdout = ok(&[&["finetune", "--weights", &weights, "-o", out.to_str().unwrap()][..], &common].concat());
    assert!(stdout.contains("(256 images, 10 classes)"), "{stdout}");
    assert!(stdout.contains("epoch 3/3: train loss"), "{stdout}");
    let log: Vec<serde_json::Value> = std::fs::read_to_string(out.join("log.txt"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(log.len(), 3);
    let loss = |e: usize| log[e]["train_loss"].as_f64().unwrap();
    assert!(loss(2) < loss(0), "the training loss falls: {} -> {}", loss(0), loss(2));
    let best = log.iter().map(|e| e["test_top1"].as_f64().unwrap()).fold(0.0, f64::max);
    assert_eq!(log[2]["best_top1"].as_f64(), Some(best));

    // timm's layout: the backbone's keys, then the head; the backbone alone loads in every tool.
    let (shape, _) = read_safetensors(&out.join("best.safetensors"), "head.weight");
    assert_eq!(shape, vec![10, ws.config.embed_dim]);
    let feats = ws.path("ft-feats.safetensors");
    let backbone = out.join("best_backbone.safetensors");
    let extract = ["extract", "--weights", backbone.to_str().unwrap()];
    ok(&[&extract[..], &["--image", &ws.s("images/cats/0.png"), "-o", feats.to_str().unwrap()]].concat());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["init"], "pretrained");
    assert_eq!(config["recipe"]["label_smoothing"], 0.1);

    // The from-scratch baseline: the same network, freshly initialised.
    let scratch = ws.path("ft-scratch");
    let stdout =
        ok(&[&["finetune", "--weights", &weights, "--init", "random", "-o", scratch.to_str().unwrap()][..], &common]
            .concat());
    assert!(stdout.contains("random init"), "{stdout}");
    assert!(
        std::fs::read_to_string(scratch.join("log.txt")).unwrap()
            != std::fs::read_to_string(out.join("log.txt")).unwrap()
    );

    let e = fails(&[&["finetune", "--weights", &weights, "--layer-decay", "1.5"][..], &common].concat());
    assert!(e.contains("layer decay 1.5 is outside (0, 1]"), "{e}");
}

#[test]
fn bad_input_fails_with_one_line_naming_the_problem() {
    let ws = Workspace::new();
    let weights = ws.s("backbone.safetensors");
    let out = ws.s("out.safetensors");
    let extract = |extra: &[&str]| {
        let mut args = vec!["extract", "--weights", &weights, "--output", &out];
        args.extend_from_slice(extra);
        fails(&args)
    };

    let e = extract(&["--image", &ws.s("nope.png")]);
    assert!(e.contains("nope.png"), "{e}");

    std::fs::write(ws.path("fake.png"), "this is text").unwrap();
    let e = extract(&["--image", &ws.s("fake.png")]);
    assert!(e.contains("fake.png") && e.contains("not an image"), "{e}");

    RgbImage::new(2, 3).save(ws.path("tiny.png")).unwrap();
    let e = extract(&["--image", &ws.s("tiny.png"), "--resize", "0", "--crop", "0"]);
    assert!(e.contains("tiny.png") && e.contains("patch"), "{e}");
    let e = extract(&["--image", &ws.s("tiny.png"), "--resize", "0"]);
    assert!(e.contains("tiny.png") && e.contains("crop"), "{e}");

    let e = extract(&[]);
    assert!(e.contains("no input images"), "{e}");

    // Weights of another architecture, or not a backbone at all.
    let pth = fixture_dir().join("vit_backbone.pth");
    let e = fails(&[
        "extract",
        "--weights",
        pth.to_str().unwrap(),
        "--arch",
        "vit_small",
        "--image",
        &ws.s("images/cats/0.png"),
        "-o",
        &out,
    ]);
    assert!(e.contains("vit_small") && e.contains("embed dim"), "{e}");
    let e = fails(&["extract", "--weights", pth.to_str().unwrap(), "--image", &ws.s("images/cats/0.png"), "-o", &out]);
    assert!(e.contains("--num-heads"), "{e}");
    let head = fixture_dir().join("head.safetensors");
    let e = fails(&["extract", "--weights", head.to_str().unwrap(), "--image", &ws.s("images/cats/0.png"), "-o", &out]);
    assert!(e.contains("head.safetensors") && e.contains("no backbone weights"), "{e}");
    let other = VitConfig::new(ws.config.embed_dim, ws.config.depth + 1, ws.config.num_heads)
        .with_patch_size(ws.config.patch_size)
        .with_img_size(ws.config.img_size);
    let mut wrong = Weights::read(&ws.path("backbone.safetensors"), CheckpointKey::Teacher).unwrap();
    wrong.config = Some(dino_model::ModelConfig::new(dino_model::BackboneConfig::Vit(other)));
    let e = match wrong.vit(&wrong.vit_config(None).unwrap(), &Device::flex()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a deeper network must not accept these weights"),
    };
    let blocks = |n: usize| format!("{n} blocks");
    assert!(
        e.contains("holds") && e.contains(&blocks(ws.config.depth)) && e.contains(&blocks(ws.config.depth + 1)),
        "{e}"
    );

    // Truncated files.
    for (name, source) in [("cut.pth", pth.clone()), ("cut.safetensors", ws.path("backbone.safetensors"))] {
        let bytes = std::fs::read(&source).unwrap();
        std::fs::write(ws.path(name), &bytes[..bytes.len() / 2]).unwrap();
        let e = fails(&[
            "extract",
            "--weights",
            &ws.s(name),
            "--num-heads",
            "3",
            "--image",
            &ws.s("images/cats/0.png"),
            "-o",
            &out,
        ]);
        assert!(e.contains(&format!("{name}: damaged")) && e.contains("truncated"), "{e}");
    }

    let e = fails(&["attention", "--weights", &weights, "--image", &ws.s("fake.png"), "-o", &ws.s("a")]);
    assert!(e.contains("fake.png"), "{e}");
    let e = fails(&[
        "attention",
        "--weights",
        &weights,
        "--image",
        &ws.s("images/cats/0.png"),
        "-o",
        &ws.s("a"),
        "--image-size",
        "2",
        "2",
    ]);
    assert!(e.contains("patch"), "{e}");
    let e = fails(&[
        "attention",
        "--weights",
        &ws.s("nothing.pth"),
        "--image",
        &ws.s("images/cats/0.png"),
        "-o",
        &ws.s("a"),
    ]);
    assert!(e.contains("nothing.pth"), "{e}");
}

#[test]
fn a_malicious_pickle_runs_nothing_and_a_warning_names_its_objects() {
    let ws = Workspace::new();
    let evil = ws.path("evil.pth");
    let payloads =
        write_malicious_pth(&evil, &pth_tensors(&dino_model::weights::state_dict(&ws.vit)), ws.dir.path()).unwrap();
    let extract = |weights: &Path, out: &str| {
        let heads = ws.config.num_heads.to_string();
        let args = ["extract", "--weights", weights.to_str().unwrap(), "--num-heads", &heads, "--data"];
        let output = dino(&[&args[..], &[&ws.s("images"), "--output", &ws.s(out)]].concat());
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{stderr}");
        stderr
    };
    let stderr = extract(&evil, "evil.safetensors");
    for marker in payloads.iter().filter_map(|p| p.marker.as_ref()) {
        assert!(!marker.exists(), "{} was created: the pickle ran", marker.display());
    }
    let warning = format!(
        "warning: {}: ignored 9 Python objects, none of them run: args (argparse.Namespace), evil (posix.system), ",
        evil.display()
    );
    assert!(stderr.lines().any(|l| l.starts_with(&warning) && l.contains("hooks.on_load (posix.system)")), "{stderr}");
    // The tensors beside the payloads are the network: same features as from its safetensors.
    extract(&ws.path("backbone.safetensors"), "clean.safetensors");
    assert_eq!(
        read_safetensors(&ws.path("evil.safetensors"), "features"),
        read_safetensors(&ws.path("clean.safetensors"), "features")
    );
}

#[test]
fn eval_knn_reports_each_k_for_pixels_and_backbones() {
    let ws = Workspace::new();
    let json = ws.path("knn.json");
    let stdout = ok(&[
        "eval",
        "knn",
        "--train",
        "synthetic",
        "--test",
        "synthetic#test",
        "--features",
        "pixels",
        "--max-train",
        "200",
        "--max-test",
        "40",
        "--k",
        "1,20",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(stdout.contains("1-NN: top1") && stdout.contains("20-NN: top1"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["test"], 40);
    for r in report["results"].as_array().unwrap() {
        let (top1, top5) = (r["top1"].as_f64().unwrap(), r["top5"].as_f64().unwrap());
        assert!((0.0..=100.0).contains(&top1) && top1 <= top5, "{r}");
    }
    // Eight balanced classes: nearest neighbours in pixel space beat chance (12.5 %).
    assert!(report["results"][1]["top1"].as_f64().unwrap() > 12.5, "{report}");

    let stdout = ok(&[
        "eval",
        "knn",
        "--train",
        "synthetic",
        "--test",
        "synthetic#test",
        "--weights",
        &ws.s("backbone.safetensors"),
        "--max-train",
        "64",
        "--max-test",
        "16",
        "--k",
        "5",
    ]);
    assert!(stdout.contains("5-NN: top1"), "{stdout}");

    // --dump-features then --load-features: the same bank and queries, the same results.
    let (dumped, json_a, json_b) = (ws.path("dumped"), ws.path("a.json"), ws.path("b.json"));
    let common = ["eval", "knn", "--k", "1,5"];
    ok(&[
        &common[..],
        &["--train", "synthetic", "--test", "synthetic#test", "--weights", &ws.s("backbone.safetensors")],
        &["--max-train", "64", "--max-test", "16", "--dump-features", dumped.to_str().unwrap()],
        &["--json", json_a.to_str().unwrap()],
    ]
    .concat());
    let (shape, _) = read_safetensors(&dumped.join("train.safetensors"), "features");
    assert_eq!(shape, [64, ws.config.embed_dim]);
    let stdout =
        ok(&[&common[..], &["--load-features", dumped.to_str().unwrap(), "--json", json_b.to_str().unwrap()]].concat());
    assert!(stdout.contains("features from"), "{stdout}");
    let results = |path: &Path| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(path).unwrap()).unwrap()["results"].clone()
    };
    assert_eq!(results(&json_a), results(&json_b));

    let e = fails(&["eval", "knn", "--train", "synthetic", "--test", "synthetic#test"]);
    assert!(e.contains("--weights"), "{e}");
    let flat = ws.path("flat");
    std::fs::create_dir_all(&flat).unwrap();
    RgbImage::new(8, 8).save(flat.join("a.png")).unwrap();
    let e =
        fails(&["eval", "knn", "--train", flat.to_str().unwrap(), "--test", "synthetic#test", "--features", "pixels"]);
    assert!(e.contains("labels"), "{e}");
}

/// `dino bench` prints the reference script's fields; `--augment` times real image files.
#[test]
fn bench_prints_comparable_json() {
    let out = ok(&["bench", "--preset", "small28", "--steps", "1", "--batch", "4", "--threads", "2"]);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{out}");
    let (train, infer) = (&lines[0], &lines[1]);
    assert_eq!((train["what"].as_str(), infer["what"].as_str()), (Some("train"), Some("infer")));
    for key in ["preset", "dim", "depth", "heads", "patch", "global_px", "local_px", "n_local", "out_dim", "batch"] {
        assert!(!train[key].is_null() && !infer[key].is_null(), "{key} missing: {out}");
    }
    assert_eq!(train["threads"], 2);
    assert_eq!(train["batch"], 4);
    assert!(train["step_ms_median"].as_f64().unwrap() > 0.0 && train["train_img_per_s"].as_f64().unwrap() > 0.0);
    assert!(infer["infer_img_per_s"].as_f64().unwrap() > 0.0 && infer["infer_batch"] == 16);
    assert!(infer["peak_rss_mib"].as_f64().unwrap() > 10.0);

    let dir = tempfile::tempdir().unwrap();
    for i in 0..3u8 {
        RgbImage::from_fn(120 + i as u32 * 40, 100, |x, y| Rgb([x as u8, y as u8, i * 60]))
            .save(dir.path().join(format!("{i}.png")))
            .unwrap();
    }
    let out = ok(&["bench", "--augment", dir.path().to_str().unwrap(), "--seconds", "0.3"]);
    let augment: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(augment["images"], 3);
    assert!(augment["augment_img_per_s_one_thread"].as_f64().unwrap() > 0.0);
    assert!(augment["augment_img_per_s_all_threads"].as_f64().unwrap() > 0.0);
    assert!(fails(&["bench", "--preset", "huge"]).contains("small28, tiny32, official_s16"));

    // `--config` times what a run's config.toml trains; sizes left to the images are refused.
    let run = dir.path().join("config.toml");
    let settings = "arch = 'vit_tiny'\ndepth = 1\nimg_size = 8\nout_dim = 16\nhead_hidden_dim = 32\n\
                    head_bottleneck_dim = 16\nbatch_size = 2\n[crops]\nglobal_size = 8\nlocal_size = 4\nlocal_crops = 1\n";
    std::fs::write(&run, format!("patch_size = 4\n{settings}")).unwrap();
    let out = ok(&["bench", "--config", run.to_str().unwrap(), "--steps", "1"]);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{out}");
    for line in &lines {
        let fields = [&line["patch"], &line["depth"], &line["global_px"], &line["n_local"], &line["batch"]];
        assert_eq!(fields, [4, 1, 8, 1, 2], "{out}");
    }
    assert!(lines[0]["train_img_per_s"].as_f64().unwrap() > 0.0 && lines[1]["infer_img_per_s"].as_f64().unwrap() > 0.0);
    // bf16 products on the CPU; f16 is the GPU path's.
    let out = ok(&["bench", "--config", run.to_str().unwrap(), "--steps", "1", "--precision", "bf16"]);
    assert!(out.lines().all(|l| l.contains(r#""precision":"bf16""#)), "{out}");
    let f16 = fails(&["bench", "--config", run.to_str().unwrap(), "--precision", "f16"]);
    assert!(f16.contains("on the CPU use bf16 or f32"), "{f16}");
    std::fs::write(&run, format!("patch_size = 0\n{settings}")).unwrap();
    assert!(fails(&["bench", "--config", run.to_str().unwrap()]).contains("config.toml a run wrote"));
}

#[test]
fn retrieve_ranks_the_collection_updates_its_index_and_draws_sheets() {
    let ws = Workspace::new();
    let out = ws.path("retrieval");
    let query = ws.path("images/cats/0.png");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "retrieve",
            "--weights",
            &ws.s("backbone.safetensors") as &str,
            "--data",
            &ws.s("images"),
            "--query",
            query.to_str().unwrap(),
            "--top-k",
            "3",
            "--resize",
            "0",
            "--crop",
            "32",
            "--output",
            out.to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let first = run(&[]);
    assert!(first.contains("4 images (0 reused, 4 new, 0 removed)"), "{first}");
    // The query is in the collection: it comes back first, with cosine similarity 1.
    let ranks: Vec<&str> = first.lines().filter(|l| l.trim_start().starts_with(char::is_numeric)).collect();
    assert_eq!(ranks.len(), 3, "{first}");
    assert!(ranks[0].ends_with("cats/0.png") && ranks[0].contains("1.0000"), "{first}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let neighbours = results[0]["neighbours"].as_array().unwrap();
    assert_eq!(neighbours.len(), 3);
    let scores: Vec<f64> = neighbours.iter().map(|n| n["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    let sheet = image::open(results[0]["contact_sheet"].as_str().unwrap()).unwrap().to_rgb8();
    assert!(sheet.width() >= 4 * 160 && sheet.height() >= 160, "query and three neighbours in one row");

    // The index is reused; an added image is the only one computed; approximate search agrees.
    let second = run(&["--search", "exact"]);
    assert!(second.contains("4 images (4 reused, 0 new, 0 removed)"), "{second}");
    std::fs::copy(&query, ws.path("images/dogs/copy.png")).unwrap();
    let third = run(&["--search", "approximate"]);
    assert!(third.contains("5 images (4 reused, 1 new, 0 removed)"), "{third}");
    assert!(third.contains("HNSW graph of 5 images"), "{third}");
    let top2: Vec<&str> = third.lines().filter(|l| l.trim_start().starts_with(char::is_numeric)).take(2).collect();
    assert!(top2.iter().all(|l| l.contains("1.0000")), "the query and its copy: {third}");

    let missing = fails(&[
        "retrieve",
        "--weights",
        &ws.s("backbone.safetensors"),
        "--data",
        &ws.s("images"),
        "--query",
        &ws.s("nowhere.png"),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(missing.contains("nowhere.png"), "{missing}");
}
