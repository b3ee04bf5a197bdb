//! Folders of unchecked images: `dino train`, `extract` and `eval` use every good file, skip
//! the bad ones with a report, keep rows and paths consistent, and stop only under `--strict`
//! or when nothing is usable.

use std::path::{Path, PathBuf};
use std::process::Output;

use dino_fixtures::bad_images::{Case, Expect, write_corpus};
use dino_fixtures::sandbox::confined;

fn dino(args: &[&str]) -> Output {
    confined(Path::new(env!("CARGO_BIN_EXE_dino"))).args(args).output().expect("the dino binary runs")
}

fn name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const TINY_NETWORK: [&str; 8] =
    ["--out-dim", "64", "--set", "depth=1", "--set", "head_hidden_dim=64", "--set", "crops.local_crops=1"];

/// The corpus and 12 good 40 px images in one flat folder.
fn corpus_folder(dir: &Path) -> (PathBuf, Vec<Case>) {
    let folder = dir.join("images");
    std::fs::create_dir(&folder).unwrap();
    let cases = write_corpus(&folder);
    for i in 0..12u32 {
        let picture = image::RgbImage::from_fn(40, 40, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 6 + 10 * i) as u8, if (x + i) % 8 < 4 { 200 } else { 40 }])
        });
        picture.save(folder.join(format!("photo-{i:02}.png"))).unwrap();
    }
    (folder, cases)
}

#[test]
fn training_skips_bad_files_counts_them_by_reason_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, cases) = corpus_folder(dir.path());
    // What the library finds when it opens the folder (the header of each file), and so what
    // only decoding finds (truncated and corrupt data).
    let opened = dino_data::Dataset::open(folder.to_str().unwrap(), &Default::default()).unwrap();
    let at_open: Vec<String> = opened.skipped().iter().map(|b| name(&b.path)).collect();
    let at_decode: Vec<String> = cases
        .iter()
        .filter(|c| matches!(c.expect, Expect::Skipped(_)) && !at_open.contains(&name(&c.path)))
        .map(|c| name(&c.path))
        .collect();
    assert!(at_open.len() >= 8 && at_decode.len() >= 2, "{at_open:?} {at_decode:?}");
    let run = dir.path().join("run");
    let (folder, run_dir) = (folder.to_str().unwrap(), run.to_str().unwrap());
    // Batches of one: every image is drawn each epoch, the truncated ones too.
    let args = ["train", "--data", folder, "--epochs", "2", "--batch-size", "1", "--output", run_dir];
    let out = dino(&[&args[..], &TINY_NETWORK].concat());
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("image files (") && stderr.contains("--strict makes this an error"), "{stderr}");
    for name in &at_open {
        assert!(stderr.contains(name.as_str()), "{name} is not reported: {stderr}");
    }
    // Truncated and corrupt files pass the header check and fail to decode: reported per epoch.
    let n = at_decode.len();
    assert!(
        stderr.contains(&format!("epoch 1: {n} images could not be decoded ({n} corrupt or truncated)")),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("epoch 2: {n} images could not be decoded")), "{stderr}");
    assert!(stdout.contains("image files skipped"), "{stdout}");

    let log = std::fs::read_to_string(run.join("log.txt")).unwrap();
    for line in log.lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        let skipped = &line["skipped_images"];
        let corrupt_at_open =
            opened.skipped().iter().filter(|b| b.reason.to_string() == "corrupt or truncated").count();
        assert_eq!(skipped["corrupt or truncated"], n + corrupt_at_open, "{line}");
        assert_eq!(skipped["empty"], 2, "{line}");
        assert_eq!(skipped["not an image"], 2, "{line}");
        assert_eq!(skipped["over the decoding limits"], 1, "{line}");
        assert_eq!(skipped["filesystem loop"], 1, "{line}");
    }
    let listed = std::fs::read_to_string(run.join("skipped.txt")).unwrap();
    for name in at_open.iter().chain(&at_decode) {
        assert!(listed.contains(name.as_str()), "{name} missing from skipped.txt:\n{listed}");
    }

    // --strict stops at the first bad file, before training; so does a folder with nothing usable.
    let strict = dino(&[&args[..], &TINY_NETWORK, &["--strict"]].concat());
    let stderr = text(&strict.stderr);
    assert_eq!(strict.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot be used") && stderr.trim().lines().count() == 1, "{stderr}");
    let hopeless = dir.path().join("hopeless");
    std::fs::create_dir(&hopeless).unwrap();
    std::fs::write(hopeless.join("a.png"), b"").unwrap();
    std::fs::write(hopeless.join("b.jpg"), b"<html>").unwrap();
    let out = dino(&["train", "--data", hopeless.to_str().unwrap(), "--output", run_dir]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("none of its 2 image files can be used (1 empty, 1 not an image)"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// `extract` writes one row per usable image, its path on the same line of FILE.txt, the
/// skipped files to FILE.skipped.txt; a row equals the features of its image extracted alone.
#[test]
fn extract_and_eval_skip_the_same_files_and_keep_rows_and_paths_together() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, cases) = corpus_folder(dir.path());
    let weights = dir.path().join("backbone.safetensors");
    let out = dino(&[
        "train",
        "--epochs",
        "1",
        "--max-images",
        "16",
        "--batch-size",
        "8",
        "--output",
        dir.path().join("run").to_str().unwrap(),
        "--out-dim",
        "64",
        "--set",
        "depth=1",
        "--set",
        "head_hidden_dim=64",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::copy(dir.path().join("run/teacher_backbone.safetensors"), &weights).unwrap();
    let weights = weights.to_str().unwrap();

    let features = dir.path().join("f.safetensors");
    let sizes = ["--resize", "32", "--crop", "32"];
    let args = ["extract", "--weights", weights, "--data", folder.to_str().unwrap(), "--output"];
    let out = dino(&[&args[..], &[features.to_str().unwrap()], &sizes].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("warning: extract: skipped"), "{}", text(&out.stderr));
    let rows: Vec<String> =
        std::fs::read_to_string(dir.path().join("f.txt")).unwrap().lines().map(String::from).collect();
    let used: Vec<String> = cases
        .iter()
        .filter(|c| matches!(c.expect, Expect::Used { .. }))
        .map(|c| c.path.display().to_string())
        .chain((0..12).map(|i| folder.join(format!("photo-{i:02}.png")).display().to_string()))
        .collect();
    let mut sorted_used = used.clone();
    sorted_used.sort();
    let mut sorted_rows = rows.clone();
    sorted_rows.sort();
    assert_eq!(sorted_rows, sorted_used, "FILE.txt lists exactly the usable images");
    let skipped = std::fs::read_to_string(dir.path().join("f.skipped.txt")).unwrap();
    for case in cases.iter().filter(|c| matches!(c.expect, Expect::Skipped(_))) {
        let name = case.path.file_name().unwrap().to_str().unwrap();
        assert!(skipped.contains(name), "{name} missing from f.skipped.txt:\n{skipped}");
    }
    let (shape, values) = read_features(&features);
    assert_eq!(shape[0], rows.len(), "one row per listed path");
    let row = rows.iter().position(|r| r.ends_with("good.png")).unwrap();
    let alone = dir.path().join("alone.safetensors");
    let good = folder.join("good.png");
    let out =
        dino(&[&args[..3], &["--image", good.to_str().unwrap(), "--output", alone.to_str().unwrap()], &sizes].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (_, single) = read_features(&alone);
    assert_eq!(&values[row * shape[1]..(row + 1) * shape[1]], &single[..], "the row of good.png is good.png's");

    // k-NN on class folders holding bad files: the bank and queries are the usable images.
    let classes = dir.path().join("classes");
    for (class, colour) in [("a", [200u8, 40, 40]), ("b", [40, 40, 200])] {
        std::fs::create_dir_all(classes.join(class)).unwrap();
        for i in 0..3u8 {
            image::RgbImage::from_pixel(12, 12, image::Rgb([colour[0], colour[1] + 20 * i, colour[2]]))
                .save(classes.join(class).join(format!("{i}.png")))
                .unwrap();
        }
        std::fs::write(classes.join(class).join("empty.png"), b"").unwrap();
    }
    let bytes = std::fs::read(classes.join("a/2.png")).unwrap();
    std::fs::write(classes.join("a/2.png"), &bytes[..bytes.len() - 20]).unwrap();
    let classes = classes.to_str().unwrap();
    let knn = ["eval", "knn", "--train", classes, "--test", classes, "--features", "pixels", "--k", "1"];
    let out = dino(&[&knn[..], &["--resize", "8", "--crop", "8"]].concat());
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("5 bank images, 5 test images"), "{stdout}");
    assert!(stdout.contains("1-NN: top1 100.00"), "{stdout}");
    assert!(stderr.contains("skipped 2 of 8 image files (2 empty)"), "{stderr}");
    assert!(stderr.contains("a/2.png: corrupt or truncated"), "{stderr}");
}

fn read_features(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("features").unwrap();
    let values = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (t.shape().to_vec(), values)
}
