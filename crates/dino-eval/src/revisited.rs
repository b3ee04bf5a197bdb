//! The Revisited Oxford and Paris protocol (Radenović et al., CVPR 2018) as the official
//! `eval_image_retrieval.py` runs it: the ground truth of `gnd_{roxford5k,rparis6k}.pkl`, and
//! mAP and mean precision at k for the Medium and Hard setups, computed as revisitop's
//! `compute_map` does.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use dino_data::{Filter, IMAGENET_MEAN, IMAGENET_STD, resize_exact, to_chw};
use dino_model::Backbone;
use dino_model::head::l2_normalize;
use image::RgbImage;
use serde_pickle::{DeOptions, HashableValue, Value};

use crate::EvalError;
use crate::features::multi_scale;

/// One query's ground truth: indices into the database list.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueryTruth {
    pub easy: Vec<usize>,
    pub hard: Vec<usize>,
    pub junk: Vec<usize>,
    /// The query's box `[x1, y1, x2, y2]` (not used by the official DINO evaluation, which
    /// embeds the whole query image).
    pub bbx: Option<[f64; 4]>,
}

/// A `gnd_*.pkl` file: database and query image names (without `.jpg`) and each query's truth.
#[derive(Debug, Clone, PartialEq)]
pub struct GroundTruth {
    pub imlist: Vec<String>,
    pub qimlist: Vec<String>,
    pub gnd: Vec<QueryTruth>,
}

impl GroundTruth {
    /// Reads a `gnd_*.pkl`. The pickle is parsed as data only: no class is imported and no code
    /// runs (an object of any other kind, a numpy array say, is an error naming the field).
    pub fn read(path: &Path) -> Result<Self, EvalError> {
        let bad = |problem: String| EvalError::GroundTruth { path: path.into(), problem };
        let bytes = std::fs::read(path).map_err(|source| EvalError::Io { path: path.into(), source })?;
        let value = serde_pickle::value_from_slice(&bytes, DeOptions::new().replace_unresolved_globals())
            .map_err(|e| bad(format!("not a readable pickle ({e})")))?;
        Self::from_value(&value).map_err(bad)
    }

    fn from_value(value: &Value) -> Result<Self, String> {
        let top = dict(value, "the top level")?;
        let imlist = strings(field(top, "imlist")?, "imlist")?;
        let qimlist = strings(field(top, "qimlist")?, "qimlist")?;
        let entries = list(field(top, "gnd")?, "gnd")?;
        let gnd = entries
            .iter()
            .enumerate()
            .map(|(q, entry)| {
                let where_ = format!("gnd[{q}]");
                let entry = dict(entry, &where_)?;
                let indices = |key: &str| -> Result<Vec<usize>, String> {
                    let Some(v) = entry.get(&HashableValue::String(key.into())) else {
                        return Ok(Vec::new());
                    };
                    let indices = usizes(v, &format!("{where_}['{key}']"))?;
                    match indices.iter().find(|&&i| i >= imlist.len()) {
                        Some(i) => {
                            Err(format!("{where_}['{key}'] names image {i}, past the {} of imlist", imlist.len()))
                        }
                        None => Ok(indices),
                    }
                };
                let bbx = match entry.get(&HashableValue::String("bbx".into())) {
                    Some(v) => numbers(v, &format!("{where_}['bbx']"))?.try_into().ok(),
                    None => None,
                };
                Ok(QueryTruth { easy: indices("easy")?, hard: indices("hard")?, junk: indices("junk")?, bbx })
            })
            .collect::<Result<Vec<_>, String>>()?;
        if gnd.len() != qimlist.len() {
            return Err(format!("{} ground-truth entries for {} queries", gnd.len(), qimlist.len()));
        }
        Ok(Self { imlist, qimlist, gnd })
    }
}

fn field<'a>(d: &'a BTreeMap<HashableValue, Value>, key: &str) -> Result<&'a Value, String> {
    d.get(&HashableValue::String(key.into())).ok_or_else(|| format!("no '{key}' entry"))
}

fn dict<'a>(v: &'a Value, what: &str) -> Result<&'a BTreeMap<HashableValue, Value>, String> {
    match v {
        Value::Dict(d) => Ok(d),
        other => Err(format!("{what} should be a dict, found {}", kind(other))),
    }
}

fn list<'a>(v: &'a Value, what: &str) -> Result<&'a [Value], String> {
    match v {
        Value::List(l) | Value::Tuple(l) => Ok(l),
        other => Err(format!("{what} should be a list, found {}", kind(other))),
    }
}

fn strings(v: &Value, what: &str) -> Result<Vec<String>, String> {
    list(v, what)?
        .iter()
        .map(|s| match s {
            Value::String(s) => Ok(s.clone()),
            Value::Bytes(b) => Ok(String::from_utf8_lossy(b).into_owned()),
            other => Err(format!("{what} should hold image names, found {}", kind(other))),
        })
        .collect()
}

fn usizes(v: &Value, what: &str) -> Result<Vec<usize>, String> {
    list(v, what)?
        .iter()
        .map(|i| match i {
            Value::I64(i) if *i >= 0 => Ok(*i as usize),
            other => Err(format!("{what} should hold image indices, found {}", kind(other))),
        })
        .collect()
}

fn numbers(v: &Value, what: &str) -> Result<Vec<f64>, String> {
    list(v, what)?
        .iter()
        .map(|x| match x {
            Value::F64(x) => Ok(*x),
            Value::I64(i) => Ok(*i as f64),
            other => Err(format!("{what} should hold numbers, found {}", kind(other))),
        })
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None (or an object of a class not read, e.g. a numpy array)",
        Value::Bool(_) => "a bool",
        Value::I64(_) | Value::Int(_) => "an int",
        Value::F64(_) => "a float",
        Value::Bytes(_) => "bytes",
        Value::String(_) => "a string",
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Set(_) | Value::FrozenSet(_) => "a set",
        Value::Dict(_) => "a dict",
    }
}

/// One setup's scores, in [0, 1] (the official script prints them x 100).
#[derive(Debug, Clone, PartialEq)]
pub struct MapResult {
    /// Mean average precision over the queries that have positives.
    pub map: f64,
    /// Each query's average precision (NaN for a query with no positive).
    pub aps: Vec<f64>,
    /// Mean precision at each k.
    pub mp_at: Vec<f64>,
}

/// The Medium (positives easy + hard, junk ignored) and Hard (positives hard, easy and junk
/// ignored) setups.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisitedResult {
    pub medium: MapResult,
    pub hard: MapResult,
    /// The k of `mp_at`: 1, 5, 10 as the official script.
    pub ks: Vec<usize>,
}

/// The official precision cut-offs.
pub const PRECISION_AT: [usize; 3] = [1, 5, 10];

/// Scores each query's ranking of the database (`ranks[q]`: database indices, best first, every
/// image once) in both setups.
pub fn evaluate(ranks: &[Vec<usize>], truth: &GroundTruth) -> RevisitedResult {
    let medium: Vec<(Vec<usize>, Vec<usize>)> =
        truth.gnd.iter().map(|g| ([&g.easy[..], &g.hard].concat(), g.junk.clone())).collect();
    let hard: Vec<(Vec<usize>, Vec<usize>)> =
        truth.gnd.iter().map(|g| (g.hard.clone(), [&g.junk[..], &g.easy].concat())).collect();
    RevisitedResult {
        medium: compute_map(ranks, &medium, &PRECISION_AT),
        hard: compute_map(ranks, &hard, &PRECISION_AT),
        ks: PRECISION_AT.to_vec(),
    }
}

/// revisitop's `compute_map`: per query, the positions of its positives in the ranking, each
/// moved up by the junk images ranked above it, give the trapezoidal average precision and the
/// precision at each k (k capped at the last positive's position). Queries without positives
/// are left out of the means, which are NaN when no query has one.
pub fn compute_map(ranks: &[Vec<usize>], truth: &[(Vec<usize>, Vec<usize>)], ks: &[usize]) -> MapResult {
    let mut aps = Vec::with_capacity(truth.len());
    let (mut map, mut mp_at, mut counted) = (0.0, vec![0.0; ks.len()], 0usize);
    for (ranking, (ok, junk)) in ranks.iter().zip(truth) {
        if ok.is_empty() {
            aps.push(f64::NAN);
            continue;
        }
        let (mut pos, mut junk_pos) = (Vec::new(), Vec::new());
        for (position, image) in ranking.iter().enumerate() {
            if ok.contains(image) {
                pos.push(position);
            } else if junk.contains(image) {
                junk_pos.push(position);
            }
        }
        // Positives lose one position for each junk image above them.
        let mut skipped = 0;
        for p in &mut pos {
            skipped += junk_pos[skipped..].iter().take_while(|&&j| j < *p).count();
            *p -= skipped;
        }
        let ap = average_precision(&pos, ok.len());
        aps.push(ap);
        map += ap;
        let last = pos.iter().map(|p| p + 1).max().unwrap_or(0);
        for (acc, &k) in mp_at.iter_mut().zip(ks) {
            let kq = last.min(k);
            if kq > 0 {
                *acc += pos.iter().filter(|&&p| p < kq).count() as f64 / kq as f64;
            }
        }
        counted += 1;
    }
    // No query with positives: NaN (revisitop divides by zero there).
    let n = counted as f64;
    MapResult { map: map / n, aps, mp_at: mp_at.into_iter().map(|p| p / n).collect() }
}

/// revisitop's `compute_ap`: the trapezoidal area under precision-recall, from the 0-based
/// positions of the positives found (sorted) and the number of positives `total`.
pub fn average_precision(positions: &[usize], total: usize) -> f64 {
    let step = 1.0 / total as f64;
    positions
        .iter()
        .enumerate()
        .map(|(j, &rank)| {
            let before = if rank == 0 { 1.0 } else { j as f64 / rank as f64 };
            let after = (j + 1) as f64 / (rank + 1) as f64;
            (before + after) * step / 2.0
        })
        // From +0: `sum` starts at -0.0, which prints as "-0.000" when nothing was found.
        .fold(0.0, |total, area| total + area)
}

/// PIL's `Image.thumbnail((size, size))` target: the largest size within `size x size` with the
/// image's aspect ratio, rounded as Pillow 9+ rounds it; images already within it keep their
/// size (thumbnail never enlarges).
pub fn thumbnail_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    if width <= size && height <= size {
        return (width, height);
    }
    let aspect = width as f64 / height as f64;
    let (x, y) = (size as f64, size as f64);
    // round_aspect: floor or ceil of `number`, whichever `key` prefers, at least 1.
    let round_aspect = |number: f64, key: &dyn Fn(f64) -> f64| -> u32 {
        let (lo, hi) = (number.floor(), number.ceil());
        (if key(hi) < key(lo) { hi } else { lo }).max(1.0) as u32
    };
    if x / y >= aspect {
        (round_aspect(y * aspect, &|n| (aspect - n / y).abs()), size)
    } else {
        (size, round_aspect(x / aspect, &|n| if n == 0.0 { 0.0 } else { (aspect - x / n).abs() }))
    }
}

/// One image's retrieval feature as `eval_image_retrieval.py` computes it: the image shrunk to
/// fit `imsize x imsize` (PIL `thumbnail`, Lanczos; `None` keeps it), normalised, through the
/// backbone whole (batch 1, any aspect ratio), at one scale or averaged over
/// [`MULTI_SCALES`](crate::features::MULTI_SCALES); L2-normalised.
pub fn image_feature(
    backbone: &Backbone,
    img: &RgbImage,
    imsize: Option<u32>,
    multiscale: bool,
    device: &Device,
) -> Vec<f32> {
    let img = match imsize {
        Some(size) => {
            let (w, h) = thumbnail_size(img.width(), img.height(), size);
            resize_exact(img, w, h, Filter::Lanczos)
        }
        None => img.clone(),
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    let x = Tensor::<4>::from_data(TensorData::new(to_chw(&img, IMAGENET_MEAN, IMAGENET_STD), [1, 3, h, w]), device);
    let feature = if multiscale { multi_scale(backbone, x) } else { backbone.forward(x) };
    l2_normalize(feature).into_data().iter::<f32>().collect()
}

/// Each query's ranking of the whole database by cosine similarity, best first (`argsort(-sim)`;
/// ties keep database order). `database` and `queries` are rows of `dim` unit vectors.
pub fn rank(database: &[f32], queries: &[f32], dim: usize) -> Vec<Vec<usize>> {
    crate::retrieval::rank_rows(database, queries, dim, database.len() / dim.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values worked by hand with revisitop's `compute_map`.
    #[test]
    fn map_and_precision_follow_revisitop() {
        // Positives 3 and 7 of ten images; junk 5 ranked second.
        let ranking = vec![3, 5, 1, 7, 0, 2, 4, 6, 8, 9];
        let r = compute_map(std::slice::from_ref(&ranking), &[(vec![3, 7], vec![5])], &[1, 5, 10]);
        // Positions 0 and 3, the second moved up to 2 past the junk image:
        // AP = ((1 + 1) / 2 + (1/2 + 2/3) / 2) / 2 = 0.791666...
        assert!((r.map - (1.0 + (0.5 + 2.0 / 3.0) / 2.0) / 2.0).abs() < 1e-12, "{}", r.map);
        // P@1 = 1; P@5 and P@10 cap k at the last positive (3): 2/3.
        let expect = [1.0, 2.0 / 3.0, 2.0 / 3.0];
        assert!(r.mp_at.iter().zip(expect).all(|(a, b)| (a - b).abs() < 1e-12), "{:?}", r.mp_at);

        // Without the junk: positions 0 and 3, AP = (1 + (1/3 + 2/4) / 2) / 2.
        let r = compute_map(&[ranking], &[(vec![3, 7], vec![])], &[1]);
        assert!((r.map - (1.0 + (1.0 / 3.0 + 0.5) / 2.0) / 2.0).abs() < 1e-12);
        // A query with no positives is NaN and left out of the mean.
        let r = compute_map(&[vec![0, 1], vec![1, 0]], &[(vec![1], vec![]), (vec![], vec![])], &[1]);
        assert!(r.aps[1].is_nan());
        assert!((r.map - 0.25).abs() < 1e-12 && r.mp_at == [0.0], "{r:?}");
        let r = compute_map(&[vec![0, 1]], &[(vec![], vec![])], &[1]);
        assert!(r.map.is_nan() && r.mp_at[0].is_nan());
    }

    #[test]
    fn medium_counts_easy_and_hard_hard_ignores_easy() {
        let truth = GroundTruth {
            imlist: (0..4).map(|i| i.to_string()).collect(),
            qimlist: vec!["q".into()],
            gnd: vec![QueryTruth { easy: vec![0], hard: vec![2], junk: vec![], bbx: None }],
        };
        let r = evaluate(&[vec![0, 1, 2, 3]], &truth);
        // Medium: positives at 0 and 2. Hard: the easy image is ignored, so 2 moves to 1.
        assert!((r.medium.map - (1.0 + (0.5 + 2.0 / 3.0) / 2.0) / 2.0).abs() < 1e-12);
        assert!((r.hard.map - (0.0 + 0.5) / 2.0).abs() < 1e-12, "{}", r.hard.map);
    }

    /// A pickle as Python writes it (protocol 4, as revisitop's files), round-tripped through
    /// serde-pickle's writer for the other protocol it makes.
    #[test]
    fn reads_a_ground_truth_pickle_and_refuses_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        // pickle.dumps({'gnd': [{'bbx': [1.5, 2.0, 30.0, 40.5], 'easy': [1], 'hard': [2],
        // 'junk': [0]}], 'imlist': ['a', 'b', 'c'], 'qimlist': ['q']}, protocol=4)
        let python: &[u8] = b"\x80\x04\x95\x8e\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x03gnd\x94]\x94}\x94(\x8c\x03bbx\x94]\x94(G?\xf8\x00\x00\x00\x00\x00\x00G@\x00\x00\x00\x00\x00\x00\x00G@>\x00\x00\x00\x00\x00\x00G@D@\x00\x00\x00\x00\x00e\x8c\x04easy\x94]\x94K\x01a\x8c\x04hard\x94]\x94K\x02a\x8c\x04junk\x94]\x94K\x00aua\x8c\x06imlist\x94]\x94(\x8c\x01a\x94\x8c\x01b\x94\x8c\x01c\x94e\x8c\x07qimlist\x94]\x94\x8c\x01q\x94au.";
        let path = dir.path().join("gnd_test.pkl");
        std::fs::write(&path, python).unwrap();
        let truth = GroundTruth::read(&path).unwrap();
        assert_eq!(truth.imlist, ["a", "b", "c"]);
        assert_eq!(truth.qimlist, ["q"]);
        let expect = QueryTruth { easy: vec![1], hard: vec![2], junk: vec![0], bbx: Some([1.5, 2.0, 30.0, 40.5]) };
        assert_eq!(truth.gnd, [expect]);

        let write = |value: &Value| {
            std::fs::write(&path, serde_pickle::value_to_vec(value, Default::default()).unwrap()).unwrap();
            GroundTruth::read(&path).unwrap_err().to_string()
        };
        let s = |x: &str| HashableValue::String(x.into());
        let mut top = BTreeMap::new();
        top.insert(s("imlist"), Value::List(vec![Value::String("a".into())]));
        top.insert(s("qimlist"), Value::List(vec![Value::String("q".into())]));
        let mut entry = BTreeMap::new();
        entry.insert(s("easy"), Value::List(vec![Value::I64(4)]));
        top.insert(s("gnd"), Value::List(vec![Value::Dict(entry.clone())]));
        let e = write(&Value::Dict(top.clone()));
        assert!(e.contains("gnd[0]['easy'] names image 4, past the 1 of imlist"), "{e}");
        entry.insert(s("easy"), Value::None);
        top.insert(s("gnd"), Value::List(vec![Value::Dict(entry)]));
        let e = write(&Value::Dict(top.clone()));
        assert!(e.contains("gnd[0]['easy'] should be a list, found None"), "{e}");
        top.remove(&s("gnd"));
        assert!(write(&Value::Dict(top)).contains("no 'gnd' entry"));
        std::fs::write(&path, b"\x80\x04not a pickle").unwrap();
        assert!(GroundTruth::read(&path).unwrap_err().to_string().contains("not a readable pickle"));
    }

    /// Sizes Pillow 10's `thumbnail((224, 224))` gives.
    #[test]
    fn thumbnails_keep_the_aspect_as_pillow_rounds_it() {
        assert_eq!(thumbnail_size(1024, 768, 224), (224, 168));
        assert_eq!(thumbnail_size(768, 1024, 224), (168, 224));
        assert_eq!(thumbnail_size(1000, 333, 224), (224, 75));
        assert_eq!(thumbnail_size(200, 100, 224), (200, 100));
        assert_eq!(thumbnail_size(5, 1000, 224), (1, 224));
    }
}
