//! Bounded fuzz tests (`dino_fixtures::fuzz`: fixed seed, time budget): the image loader on
//! PNG chunks and on the bytes of every format in the bad-image corpus, and the IDX and CIFAR
//! readers on their headers and records. No input may panic, and what loads must be sane.

use std::fs;
use std::path::Path;

use dino_data::{Dataset, ImagePolicy, load_rgb, probe};
use dino_fixtures::bad_images::write_corpus;
use dino_fixtures::fuzz::{PngFile, fuzz};
use mutatis::mutators as m;

/// Tight limits keep every input fast and small in memory; they are settings users have too.
fn policy() -> ImagePolicy {
    ImagePolicy { max_pixels: 1 << 16, max_file_bytes: 1 << 20, strict: false }
}

/// Decodes `bytes` as an image file: an error is fine, a panic is not, and a decoded image has
/// pixels within the limits and was not refused by the header probe. Returns whether it decoded.
fn load_image(path: &Path, bytes: &[u8]) -> bool {
    fs::write(path, bytes).unwrap();
    let probed = probe(path, &policy());
    let Ok(image) = load_rgb(path, &policy()) else { return false };
    assert!(probed.is_ok(), "the probe refused an image that decodes");
    let pixels = image.width() as u64 * image.height() as u64;
    assert!(pixels > 0 && pixels <= policy().max_pixels, "{}x{}", image.width(), image.height());
    true
}

/// The corpus files no bigger than `max_len` bytes (the mutators walk every byte).
fn corpus_files(dir: &Path, max_len: usize) -> Vec<Vec<u8>> {
    fs::create_dir_all(dir).unwrap();
    write_corpus(dir);
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| fs::read(e.unwrap().path()).ok())
        .filter(|b| !b.is_empty() && b.len() <= max_len)
        .collect();
    files.sort();
    files
}

#[test]
fn fuzz_png_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let seeds: Vec<PngFile> = corpus_files(&dir.path().join("corpus"), 16 << 10)
        .iter()
        .filter_map(|b| PngFile::parse(b))
        .filter(|png| !png.chunks.is_empty())
        .collect();
    assert!(seeds.len() >= 6, "the corpus has PNGs of several kinds: {}", seeds.len());
    let input = dir.path().join("input.png");
    let seeded = seeds.len();
    let report = fuzz("png chunks", m::default::<PngFile>(), seeds, |png| load_image(&input, &png.bytes()));
    // Mutated inputs too are accepted: the mutations reach past the first check.
    assert!(report.inputs > 100 && report.accepted > seeded, "{report:?}");
}

#[test]
fn fuzz_image_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = corpus_files(&dir.path().join("corpus"), 16 << 10);
    assert!(seeds.len() >= 15, "{}", seeds.len());
    let input = dir.path().join("input.jpg");
    let seeded = seeds.len();
    let report = fuzz("image bytes", m::default::<Vec<u8>>(), seeds, |bytes| load_image(&input, bytes));
    // Mutated inputs too are accepted: the mutations reach past the first check.
    assert!(report.inputs > 100 && report.accepted > seeded, "{report:?}");
}

/// An IDX image file and its label file, as header fields and payloads.
#[derive(Debug, Clone, mutatis::Mutate)]
struct IdxPair {
    image_magic: u32,
    sizes: Vec<u32>,
    pixels: Vec<u8>,
    label_magic: u32,
    label_count: u32,
    labels: Vec<u8>,
}

impl IdxPair {
    fn valid(n: u32, h: u32, w: u32) -> Self {
        Self {
            image_magic: 0x0803,
            sizes: vec![n, h, w],
            pixels: (0..n * h * w).map(|i| (i * 7) as u8).collect(),
            label_magic: 0x0801,
            label_count: n,
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
        }
    }

    fn write(&self, dir: &Path) {
        let mut images: Vec<u8> = self.image_magic.to_be_bytes().to_vec();
        images.extend(self.sizes.iter().flat_map(|s| s.to_be_bytes()));
        images.extend(&self.pixels);
        let mut labels: Vec<u8> = [self.label_magic, self.label_count].iter().flat_map(|v| v.to_be_bytes()).collect();
        labels.extend(&self.labels);
        fs::write(dir.join("train-images-idx3-ubyte"), images).unwrap();
        fs::write(dir.join("train-labels-idx1-ubyte"), labels).unwrap();
    }
}

/// Opens `spec` as a dataset: an error is fine; a dataset that opens gives its first images.
/// Returns whether it opened.
fn open_dataset(spec: &str) -> bool {
    let Ok(data) = Dataset::open(spec, &policy()) else { return false };
    for i in 0..data.len().min(3) {
        let image = data.image(i).expect("an opened in-memory dataset yields its images");
        assert!(image.width() > 0 && image.height() > 0);
    }
    data.typical_side().ok();
    true
}

#[test]
fn fuzz_idx_files() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = vec![IdxPair::valid(3, 4, 5), IdxPair::valid(1, 2, 2), IdxPair::valid(2, 28, 28)];
    let spec = dir.path().display().to_string();
    let seeded = seeds.len();
    let report = fuzz("IDX", m::default::<IdxPair>(), seeds, |idx| {
        idx.write(dir.path());
        open_dataset(&spec)
    });
    // Mutated inputs too are accepted: the mutations reach past the first check.
    assert!(report.inputs > 100 && report.accepted > seeded, "{report:?}");
}

/// A CIFAR-10 test batch or a CIFAR-100 train file, as records.
#[derive(Debug, Clone, mutatis::Mutate)]
struct CifarBatch {
    hundred: bool,
    records: Vec<CifarRecord>,
}

#[derive(Debug, Clone, mutatis::Mutate)]
struct CifarRecord {
    coarse: u8,
    label: u8,
    pixels: Vec<u8>,
}

#[test]
fn fuzz_cifar_batches() {
    let dir = tempfile::tempdir().unwrap();
    let record = |label: u8| CifarRecord { coarse: label / 5, label, pixels: vec![label * 20; 3072] };
    let seeds = vec![
        CifarBatch { hundred: false, records: vec![record(3), record(7)] },
        CifarBatch { hundred: true, records: vec![record(42)] },
    ];
    let seeded = seeds.len();
    let report = fuzz("CIFAR", m::default::<CifarBatch>(), seeds, |batch| {
        let mut bytes = Vec::new();
        for r in &batch.records {
            if batch.hundred {
                bytes.push(r.coarse);
            }
            bytes.push(r.label);
            bytes.extend(&r.pixels);
        }
        for name in ["train.bin", "test_batch.bin"] {
            let _ = fs::remove_file(dir.path().join(name));
        }
        let (name, split) = if batch.hundred { ("train.bin", "") } else { ("test_batch.bin", "#test") };
        fs::write(dir.path().join(name), bytes).unwrap();
        open_dataset(&format!("{}{split}", dir.path().display()))
    });
    // Mutated inputs too are accepted: the mutations reach past the first check.
    assert!(report.inputs > 100 && report.accepted > seeded, "{report:?}");
}
