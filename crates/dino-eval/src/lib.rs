//! Using a trained backbone: feature extraction and per-head attention maps.

pub mod attention;
pub mod extract;
pub mod features;
pub mod knn;

pub use extract::{
    ExtractOptions, Features, dataset_features, extract, pixel_features, read_labeled_features, write_features,
    write_labeled_features,
};
pub use features::FeatureSpec;
pub use knn::{KnnResult, knn_classify};

use std::path::PathBuf;

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// An image could not be read.
    #[error(transparent)]
    Data(#[from] dino_data::DataError),
    /// An image does not fit the requested processing.
    #[error("{path}: {problem}")]
    Image { path: PathBuf, problem: String },
    /// An output could not be written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}
