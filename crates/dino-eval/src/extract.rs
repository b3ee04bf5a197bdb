//! Feature extraction for a list of image files, and the files it writes.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use dino_data::{Dataset, EvalTransform, IMAGENET_MEAN, IMAGENET_STD, load_rgb, to_chw};
use dino_model::VisionTransformer;
use dino_model::head::l2_normalize;
use image::RgbImage;
use npyz::WriterBuilder;
use rayon::prelude::*;

use crate::EvalError;
use crate::features::FeatureSpec;

/// How `extract` prepares images and features.
#[derive(Debug, Clone, Copy)]
pub struct ExtractOptions {
    pub transform: EvalTransform,
    pub features: FeatureSpec,
    /// L2-normalise each feature row (as `eval_knn.py` does before the k-NN).
    pub l2_norm: bool,
    /// Images per forward pass.
    pub batch_size: usize,
}

/// Features `[N, dim]` in row-major order, one row per input path.
#[derive(Debug, Clone)]
pub struct Features {
    pub rows: usize,
    pub dim: usize,
    pub values: Vec<f32>,
}

/// One decoded, preprocessed image: `[3, H, W]` floats.
struct Prepared {
    height: usize,
    width: usize,
    chw: Vec<f32>,
}

/// Applies the transform and checks the result against the patch size.
fn prepare(img: &RgbImage, transform: &EvalTransform, patch: usize) -> Result<Prepared, String> {
    let img = transform.apply(img)?;
    let (w, h) = img.dimensions();
    if (w as usize) < patch || (h as usize) < patch {
        return Err(format!("{w}x{h} px is smaller than one {patch} px patch"));
    }
    Ok(Prepared { height: h as usize, width: w as usize, chw: to_chw(&img, IMAGENET_MEAN, IMAGENET_STD) })
}

/// Features of every image in `paths`, in order. Images are decoded in parallel; a batch holds
/// consecutive images of one size (all of them, with the default center crop). `progress` is
/// called with the number of images done after each batch.
pub fn extract(
    vit: &VisionTransformer,
    paths: &[PathBuf],
    options: &ExtractOptions,
    device: &Device,
    progress: impl FnMut(usize),
) -> Result<Features, EvalError> {
    let patch = vit.patch_size();
    let load = |i: usize| {
        let path = &paths[i];
        prepare(&load_rgb(path)?, &options.transform, patch)
            .map_err(|problem| EvalError::Image { path: path.clone(), problem })
    };
    extract_with(vit, paths.len(), load, options, device, progress)
}

/// Features of the first `count` images of a dataset (all with `count` >= its length).
pub fn dataset_features(
    vit: &VisionTransformer,
    dataset: &Dataset,
    count: usize,
    options: &ExtractOptions,
    device: &Device,
    progress: impl FnMut(usize),
) -> Result<Features, EvalError> {
    let patch = vit.patch_size();
    let load = |i: usize| {
        prepare(&dataset.image(i)?, &options.transform, patch).map_err(|problem| EvalError::Image {
            path: dataset.path(i).map_or_else(|| format!("{} image {i}", dataset.name).into(), Into::into),
            problem,
        })
    };
    extract_with(vit, count.min(dataset.len()), load, options, device, progress)
}

/// Raw-pixel features of the first `count` images of a dataset (the k-NN baseline): the image
/// after `transform`, values in [0, 1], channel first, L2-normalised. Every image must have the
/// same size after the transform.
pub fn pixel_features(dataset: &Dataset, count: usize, transform: &EvalTransform) -> Result<Features, EvalError> {
    let count = count.min(dataset.len());
    let rows = (0..count)
        .into_par_iter()
        .map(|i| {
            let img = transform
                .apply(&dataset.image(i)?)
                .map_err(|problem| EvalError::Image { path: format!("{} image {i}", dataset.name).into(), problem })?;
            let mut v = to_chw(&img, [0.0; 3], [1.0; 3]);
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
            Ok((img.dimensions(), v))
        })
        .collect::<Result<Vec<_>, EvalError>>()?;
    let Some(((w, h), _)) = rows.first() else {
        return Ok(Features { rows: 0, dim: 0, values: Vec::new() });
    };
    if let Some(((w2, h2), _)) = rows.iter().find(|(size, _)| *size != (*w, *h)) {
        return Err(EvalError::Image {
            path: dataset.name.clone().into(),
            problem: format!("images of different sizes ({w}x{h} and {w2}x{h2}); use --resize and --crop"),
        });
    }
    let dim = rows[0].1.len();
    Ok(Features { rows: count, dim, values: rows.into_iter().flat_map(|(_, v)| v).collect() })
}

fn extract_with(
    vit: &VisionTransformer,
    count: usize,
    load: impl Fn(usize) -> Result<Prepared, EvalError> + Sync,
    options: &ExtractOptions,
    device: &Device,
    mut progress: impl FnMut(usize),
) -> Result<Features, EvalError> {
    let dim = options.features.dim(vit.embed_dim());
    let mut values = Vec::with_capacity(count * dim);
    let batch = options.batch_size.max(1);
    for first in (0..count).step_by(batch) {
        let last = (first + batch).min(count);
        let prepared = (first..last).into_par_iter().map(&load).collect::<Result<Vec<_>, _>>()?;
        let mut start = 0;
        while start < prepared.len() {
            let (h, w) = (prepared[start].height, prepared[start].width);
            let end = start + prepared[start..].iter().take_while(|p| (p.height, p.width) == (h, w)).count();
            let pixels: Vec<f32> = prepared[start..end].iter().flat_map(|p| p.chw.iter().copied()).collect();
            let batch = Tensor::<4>::from_data(TensorData::new(pixels, [end - start, 3, h, w]), device);
            let mut feats = options.features.forward(vit, batch);
            if options.l2_norm {
                feats = l2_normalize(feats);
            }
            values.extend(feats.into_data().iter::<f32>());
            start = end;
        }
        progress(last);
    }
    Ok(Features { rows: count, dim, values })
}

/// Writes `features` to `path` — `.npy` for NumPy, anything else as safetensors with the tensor
/// `features` — and the image paths, one per line in row order, to `path` with extension `.txt`.
pub fn write_features(features: &Features, image_paths: &[PathBuf], path: &Path) -> Result<PathBuf, EvalError> {
    let io = |source| EvalError::Io { path: path.into(), source };
    let shape = [features.rows, features.dim];
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy")) {
        let mut writer = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&[shape[0] as u64, shape[1] as u64])
            .writer(std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?))
            .begin_nd()
            .map_err(io)?;
        writer.extend(features.values.iter().copied()).map_err(io)?;
        writer.finish().map_err(io)?;
    } else {
        let bytes: Vec<u8> = features.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &bytes)
            .expect("rows * dim floats");
        safetensors::serialize_to_file([("features", view)], None, path)
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    }
    let list = path.with_extension("txt");
    let text: String = image_paths.iter().map(|p| format!("{}\n", p.display())).collect();
    std::fs::write(&list, text).map_err(|source| EvalError::Io { path: list.clone(), source })?;
    Ok(list)
}

/// Writes features `[N, D]` with their labels `[N]` (tensors `features` and `labels`), as
/// `dino eval knn --dump-features` does.
pub fn write_labeled_features(features: &Features, labels: &[u32], path: &Path) -> Result<(), EvalError> {
    let io = |e: String| EvalError::Io { path: path.into(), source: std::io::Error::other(e) };
    let values: Vec<u8> = features.values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let labels: Vec<u8> = labels.iter().flat_map(|&l| (l as i64).to_le_bytes()).collect();
    let f = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![features.rows, features.dim], &values)
        .map_err(|e| io(e.to_string()))?;
    let l = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![features.rows], &labels)
        .map_err(|e| io(e.to_string()))?;
    safetensors::serialize_to_file([("features", f), ("labels", l)], None, path).map_err(|e| io(e.to_string()))
}

/// Reads what `write_labeled_features` wrote.
pub fn read_labeled_features(path: &Path) -> Result<(Features, Vec<u32>), EvalError> {
    let bad = |problem: String| EvalError::Image { path: path.into(), problem };
    let bytes = std::fs::read(path).map_err(|source| EvalError::Io { path: path.into(), source })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a features file: {e}")))?;
    let f = st.tensor("features").map_err(|_| bad("no 'features' tensor".into()))?;
    let l = st.tensor("labels").map_err(|_| bad("no 'labels' tensor".into()))?;
    let (&[rows, dim], &[n]) = (f.shape(), l.shape()) else {
        return Err(bad("features must be [N, D] and labels [N]".into()));
    };
    if n != rows || f.dtype() != safetensors::Dtype::F32 || l.dtype() != safetensors::Dtype::I64 {
        return Err(bad("expected f32 features [N, D] and i64 labels [N]".into()));
    }
    let values = f.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
    let labels = l.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32).collect();
    Ok((Features { rows, dim, values }, labels))
}
