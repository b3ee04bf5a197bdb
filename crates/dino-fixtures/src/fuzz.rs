//! Bounded fuzzing on stable Rust, inside `cargo test`.
//!
//! Each target starts from valid files, split into their parts (PNG chunks with their CRCs
//! recomputed, a safetensors header's entries, the pickle and storages of a `.pth`, ...), and
//! mutates the parts with the structure-aware mutators of [`mutatis`]; bytes-only mutations of
//! whole files run beside them. The seed is fixed, so a run is repeatable; the budget is time
//! (`DINO_FUZZ_SECONDS`, default [`DEFAULT_SECONDS`] per target), so a faster machine tries
//! more inputs. A panic fails the test and shows the input.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use mutatis::Mutate;

/// The fixed RNG seed of every target.
pub const SEED: u64 = 0xD10F_0221;

/// Seconds per target in the test suite.
pub const DEFAULT_SECONDS: f64 = 2.0;

/// The time budget per target: `DINO_FUZZ_SECONDS` when set (for long runs), else the default.
pub fn budget() -> Duration {
    let seconds = std::env::var("DINO_FUZZ_SECONDS").ok().and_then(|s| s.parse::<f64>().ok());
    Duration::from_secs_f64(seconds.unwrap_or(DEFAULT_SECONDS).max(0.0))
}

/// How a target went.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Inputs run (seeds and mutations).
    pub inputs: usize,
    /// Inputs the code under test accepted (decoded, opened, loaded) rather than refused: a
    /// check that the mutations reach past the first validity test.
    pub accepted: usize,
}

/// Runs `property` on every seed, then on mutants for the time [`budget`]: a seed chosen at
/// random, copied, and changed by one to four mutations of `mutator` (staying near valid files,
/// where parsers go deepest). `property` checks whatever must hold and panics otherwise; it
/// returns whether the input was accepted. Prints and returns the counts; a panic fails with
/// the input's number, which the fixed seed makes repeatable.
pub fn fuzz<T, M>(name: &str, mut mutator: M, seeds: Vec<T>, mut property: impl FnMut(&T) -> bool) -> Report
where
    T: Clone + Debug,
    M: Mutate<T>,
{
    use rand::{Rng, SeedableRng};
    assert!(!seeds.is_empty(), "fuzz target {name} needs seeds");
    let budget = budget();
    let started = Instant::now();
    let mut session = mutatis::Session::new().seed(SEED);
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    let mut report = Report { inputs: 0, accepted: 0 };
    install_quiet_hook();
    let mut run = |input: &T, report: &mut Report| {
        FUZZING.set(true);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| property(input)));
        FUZZING.set(false);
        match outcome {
            Ok(accepted) => report.accepted += usize::from(accepted),
            Err(_) => {
                let mut shown = format!("{input:?}");
                shown.truncate(1500);
                let panic = LAST_PANIC.take();
                panic!(
                    "fuzz target {name}: input {} (seed {SEED:#x}) panicked at {panic}; input: {shown}",
                    report.inputs
                );
            }
        }
        report.inputs += 1;
    };
    for seed in &seeds {
        run(seed, &mut report);
    }
    while started.elapsed() < budget {
        let mut input = seeds[rng.random_range(0..seeds.len())].clone();
        for _ in 0..rng.random_range(1..=4) {
            // An exhausted mutator (nothing left to change) leaves the input as it is.
            let _ = session.mutate_with(&mut mutator, &mut input);
        }
        run(&input, &mut report);
    }
    eprintln!(
        "fuzz target {name}: {} inputs ({} accepted) in {:.1} s, none panicked",
        report.inputs,
        report.accepted,
        started.elapsed().as_secs_f64()
    );
    report
}

thread_local! {
    /// Whether this thread is running a fuzz input: its panics are expected to be caught.
    static FUZZING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The last panic of a fuzz input on this thread, for the failure message.
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// A panic hook that keeps quiet about panics under a fuzz input (the code under test may
/// catch its own: `dino-data` turns decoder panics into skips, and printing each one would
/// bury the test output), recording the last one instead; every other panic is reported as
/// the default hook reports it.
fn install_quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if FUZZING.get() {
                LAST_PANIC.set(info.to_string());
            } else {
                default(info);
            }
        }));
    });
}

/// A PNG as its chunks; [`PngFile::bytes`] writes each with its true length and CRC, so
/// mutations reach the decoder instead of stopping at a checksum.
#[derive(Debug, Clone, mutatis::Mutate)]
pub struct PngFile {
    pub chunks: Vec<PngChunk>,
}

/// One PNG chunk: its four-letter type (as a big-endian u32) and its data.
#[derive(Debug, Clone, mutatis::Mutate)]
pub struct PngChunk {
    pub kind: u32,
    pub data: Vec<u8>,
}

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

impl PngFile {
    /// Splits a valid PNG into chunks (`None` if it is not one).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let mut rest = bytes.strip_prefix(&PNG_SIGNATURE)?;
        let mut chunks = Vec::new();
        while rest.len() >= 12 {
            let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
            let kind = u32::from_be_bytes(rest[4..8].try_into().ok()?);
            let data = rest.get(8..8 + len)?.to_vec();
            chunks.push(PngChunk { kind, data });
            rest = &rest[12 + len..];
        }
        Some(Self { chunks })
    }

    /// The file, with every chunk's length and CRC computed.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = PNG_SIGNATURE.to_vec();
        for chunk in &self.chunks {
            out.extend((chunk.data.len() as u32).to_be_bytes());
            let mut crc = flate2::Crc::new();
            crc.update(&chunk.kind.to_be_bytes());
            crc.update(&chunk.data);
            out.extend(chunk.kind.to_be_bytes());
            out.extend(&chunk.data);
            out.extend(crc.sum().to_be_bytes());
        }
        out
    }
}

/// A safetensors file as its header entries and data; [`SafetensorsFile::bytes`] writes the
/// JSON header and its length prefix, so mutations of dtypes, shapes and offsets reach the
/// reader's checks.
#[derive(Debug, Clone, mutatis::Mutate)]
pub struct SafetensorsFile {
    pub tensors: Vec<SafetensorsEntry>,
    /// `__metadata__` entries.
    pub metadata: Vec<(String, String)>,
    pub data: Vec<u8>,
}

/// One tensor's header entry.
#[derive(Debug, Clone, mutatis::Mutate)]
pub struct SafetensorsEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub start: u64,
    pub end: u64,
}

impl SafetensorsFile {
    /// Splits a valid safetensors file (`None` if it is not one).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let n = u64::from_le_bytes(*bytes.first_chunk::<8>()?) as usize;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes.get(8..8 + n)?).ok()?;
        let mut file = Self { tensors: Vec::new(), metadata: Vec::new(), data: bytes[8 + n..].to_vec() };
        for (name, entry) in header {
            if name == "__metadata__" {
                for (k, v) in entry.as_object()? {
                    file.metadata.push((k.clone(), v.as_str()?.to_string()));
                }
                continue;
            }
            let offsets = entry["data_offsets"].as_array()?;
            file.tensors.push(SafetensorsEntry {
                dtype: entry["dtype"].as_str()?.to_string(),
                shape: entry["shape"].as_array()?.iter().map(|d| d.as_u64()).collect::<Option<_>>()?,
                start: offsets[0].as_u64()?,
                end: offsets[1].as_u64()?,
                name,
            });
        }
        Some(file)
    }

    /// The file: length prefix, JSON header, data.
    pub fn bytes(&self) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        if !self.metadata.is_empty() {
            let metadata = self.metadata.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
            header.insert("__metadata__".into(), serde_json::Value::Object(metadata));
        }
        for t in &self.tensors {
            header.insert(
                t.name.clone(),
                serde_json::json!({ "dtype": t.dtype, "shape": t.shape, "data_offsets": [t.start, t.end] }),
            );
        }
        let json = serde_json::to_vec(&header).expect("JSON values serialise");
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend(json);
        out.extend(&self.data);
        out
    }
}

/// A `.pth` as its pickle and storages, rewrapped in a valid zip by [`crate::pth`], so
/// mutations reach the unpickler instead of stopping at the zip's CRCs.
#[derive(Debug, Clone, mutatis::Mutate)]
pub struct PthParts {
    pub pickle: Vec<u8>,
    /// `(key, bytes)` per storage (`archive/data/{key}`).
    pub storages: Vec<(String, Vec<u8>)>,
}
