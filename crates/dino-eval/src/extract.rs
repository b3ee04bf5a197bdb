//! Feature extraction for a list of image files, and the files it writes.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use dino_data::{EvalTransform, IMAGENET_MEAN, IMAGENET_STD, load_rgb, to_chw};
use dino_model::VisionTransformer;
use dino_model::head::l2_normalize;
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

fn prepare(path: &Path, transform: &EvalTransform, patch: usize) -> Result<Prepared, EvalError> {
    let img = load_rgb(path)?;
    let img = transform.apply(&img).map_err(|problem| EvalError::Image { path: path.into(), problem })?;
    let (w, h) = img.dimensions();
    if (w as usize) < patch || (h as usize) < patch {
        return Err(EvalError::Image {
            path: path.into(),
            problem: format!("{w}x{h} px is smaller than one {patch} px patch"),
        });
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
    mut progress: impl FnMut(usize),
) -> Result<Features, EvalError> {
    let dim = options.features.dim(vit.embed_dim());
    let mut values = Vec::with_capacity(paths.len() * dim);
    let mut done = 0;
    for chunk in paths.chunks(options.batch_size.max(1)) {
        let prepared = chunk
            .par_iter()
            .map(|p| prepare(p, &options.transform, vit.patch_size()))
            .collect::<Result<Vec<_>, _>>()?;
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
        done += chunk.len();
        progress(done);
    }
    Ok(Features { rows: paths.len(), dim, values })
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
