//! Feature extraction for the images of a dataset, and the files it writes.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use dino_data::{BadImage, Dataset, EvalTransform, IMAGENET_MEAN, IMAGENET_STD, to_chw};
use dino_model::Backbone;
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

/// Features of a dataset's images: one row per image that could be decoded, in dataset order.
#[derive(Debug, Clone)]
pub struct DatasetFeatures {
    pub features: Features,
    /// The dataset index of each row.
    pub index: Vec<usize>,
    /// Images that passed the probe when the dataset was opened but could not be decoded
    /// (truncated, corrupt): they have no row.
    pub skipped: Vec<BadImage>,
}

impl DatasetFeatures {
    /// The labels of the rows, if the dataset has labels.
    pub fn labels(&self, dataset: &Dataset) -> Option<Vec<u32>> {
        dataset.labels().map(|labels| self.index.iter().map(|&i| labels[i]).collect())
    }

    /// The image files of the rows, for a dataset of files.
    pub fn paths(&self, dataset: &Dataset) -> Vec<PathBuf> {
        self.index.iter().filter_map(|&i| dataset.path(i).map(Path::to_path_buf)).collect()
    }
}

/// Rows that loaded, each with its image's index, and the images skipped.
type Loaded<T> = (Vec<(usize, T)>, Vec<BadImage>);

/// The rows of `count` images loaded in parallel by `load`, in order, with the skipped ones set
/// aside.
fn rows_of<T: Send>(
    count: usize,
    load: impl Fn(usize) -> Result<Result<T, BadImage>, EvalError> + Sync,
) -> Result<Loaded<T>, EvalError> {
    let loaded = (0..count).into_par_iter().map(|i| load(i).map(|r| (i, r))).collect::<Result<Vec<_>, _>>()?;
    let (mut rows, mut skipped) = (Vec::new(), Vec::new());
    for (i, row) in loaded {
        match row {
            Ok(row) => rows.push((i, row)),
            Err(bad) => skipped.push(bad),
        }
    }
    Ok((rows, skipped))
}

/// Backbone features of the first `count` images of a dataset (all with `count` >= its
/// length). Images are decoded in parallel, a batch at a time; a forward pass holds
/// consecutive images of one size (all of them, with the default center crop). Images that
/// cannot be decoded are left out (see [`DatasetFeatures`]) unless the dataset is strict.
/// `progress` is called with the number of images done after each batch.
pub fn dataset_features(
    backbone: &Backbone,
    dataset: &Dataset,
    count: usize,
    options: &ExtractOptions,
    device: &Device,
    mut progress: impl FnMut(usize),
) -> Result<DatasetFeatures, EvalError> {
    let count = count.min(dataset.len());
    let patch = backbone.input_multiple();
    let dim = options.features.dim(backbone.embed_dim());
    let (mut values, mut index, mut skipped) = (Vec::with_capacity(count * dim), Vec::new(), Vec::new());
    let batch = options.batch_size.max(1);
    for first in (0..count).step_by(batch) {
        let last = (first + batch).min(count);
        let (prepared, bad) = rows_of(last - first, |j| {
            let i = first + j;
            let img = match dataset.image_or_skip(i)? {
                Ok(img) => img,
                Err(bad) => return Ok(Err(bad)),
            };
            prepare(&img, &options.transform, patch).map(Ok).map_err(|problem| EvalError::Image {
                path: dataset.path(i).map_or_else(|| format!("{} image {i}", dataset.name).into(), Into::into),
                problem,
            })
        })?;
        skipped.extend(bad);
        let mut start = 0;
        while start < prepared.len() {
            let (h, w) = (prepared[start].1.height, prepared[start].1.width);
            let end = start + prepared[start..].iter().take_while(|(_, p)| (p.height, p.width) == (h, w)).count();
            let pixels: Vec<f32> = prepared[start..end].iter().flat_map(|(_, p)| p.chw.iter().copied()).collect();
            let batch = Tensor::<4>::from_data(TensorData::new(pixels, [end - start, 3, h, w]), device);
            let mut feats = options.features.forward(backbone, batch);
            if options.l2_norm {
                feats = l2_normalize(feats);
            }
            values.extend(feats.into_data().iter::<f32>());
            start = end;
        }
        index.extend(prepared.iter().map(|(j, _)| first + j));
        progress(last);
    }
    Ok(DatasetFeatures { features: Features { rows: index.len(), dim, values }, index, skipped })
}

/// Raw-pixel features of the first `count` images of a dataset (the k-NN baseline): the image
/// after `transform`, values in [0, 1], channel first, L2-normalised. Every image must have the
/// same size after the transform. Images that cannot be decoded are left out as in
/// [`dataset_features`].
pub fn pixel_features(
    dataset: &Dataset,
    count: usize,
    transform: &EvalTransform,
) -> Result<DatasetFeatures, EvalError> {
    let count = count.min(dataset.len());
    let (rows, skipped) = rows_of(count, |i| {
        let img = match dataset.image_or_skip(i)? {
            Ok(img) => img,
            Err(bad) => return Ok(Err(bad)),
        };
        let img = transform
            .apply(&img)
            .map_err(|problem| EvalError::Image { path: format!("{} image {i}", dataset.name).into(), problem })?;
        let mut v = to_chw(&img, [0.0; 3], [1.0; 3]);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= norm);
        Ok(Ok((img.dimensions(), v)))
    })?;
    let index: Vec<usize> = rows.iter().map(|(i, _)| *i).collect();
    let Some((_, ((w, h), first))) = rows.first() else {
        return Ok(DatasetFeatures { features: Features { rows: 0, dim: 0, values: Vec::new() }, index, skipped });
    };
    if let Some((_, ((w2, h2), _))) = rows.iter().find(|(_, (size, _))| *size != (*w, *h)) {
        return Err(EvalError::Image {
            path: dataset.name.clone().into(),
            problem: format!("images of different sizes ({w}x{h} and {w2}x{h2}); use --resize and --crop"),
        });
    }
    let dim = first.len();
    let values = rows.into_iter().flat_map(|(_, (_, v))| v).collect();
    Ok(DatasetFeatures { features: Features { rows: index.len(), dim, values }, index, skipped })
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
    let bad = |problem: String| EvalError::FeaturesFile { path: path.into(), problem };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labeled_features_round_trip_and_other_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("features.safetensors");
        let features = Features { rows: 3, dim: 2, values: vec![0.5, -1.0, 2.0, 0.0, 1e-7, 3.25] };
        write_labeled_features(&features, &[4, 0, 9], &path).unwrap();
        let (read, labels) = read_labeled_features(&path).unwrap();
        assert_eq!((read.rows, read.dim, read.values), (3, 2, features.values.clone()));
        assert_eq!(labels, [4, 0, 9]);

        let other = dir.path().join("other.safetensors");
        let values: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &values).unwrap();
        safetensors::serialize_to_file([("weights", view)], None, &other).unwrap();
        let e = read_labeled_features(&other).err().unwrap().to_string();
        assert!(e.contains("other.safetensors: no 'features' tensor"), "{e}");
        std::fs::write(&other, b"not safetensors").unwrap();
        let e = read_labeled_features(&other).err().unwrap().to_string();
        assert!(e.contains("other.safetensors: not a features file"), "{e}");
    }
}
