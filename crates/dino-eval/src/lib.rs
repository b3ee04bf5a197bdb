//! Using a trained backbone: feature extraction, k-NN and linear evaluation, per-head attention maps.

pub mod attention;
pub mod bench;
pub mod copydetection;
pub mod embedding;
pub mod extract;
pub mod features;
pub mod figures;
pub mod knn;
pub mod linear;
pub mod retrieval;
pub mod revisited;

pub use extract::{
    DatasetFeatures, ExtractOptions, Features, dataset_features, pixel_features, read_labeled_features, write_features,
    write_labeled_features,
};
pub use features::FeatureSpec;
pub use knn::{KnnResult, knn_classify};
pub use linear::{LinearClassifier, LinearConfig, LinearEpoch, LinearProgress, TrainFeatures, train_linear};

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
    /// A features file (`--load-features`) that is not what `--dump-features` writes.
    #[error("{path}: {problem}")]
    FeaturesFile { path: PathBuf, problem: String },
    /// A ground-truth file (`gnd_*.pkl`) that is not what the Revisited datasets ship.
    #[error("{path}: {problem}; the Revisited Oxford/Paris gnd_*.pkl holds a dict of imlist, qimlist and gnd")]
    GroundTruth { path: PathBuf, problem: String },
    /// A retrieval index file that cannot be read or written.
    #[error("{path}: {problem}")]
    Index { path: PathBuf, problem: String },
    /// The linear probe's loss became NaN or infinite.
    #[error("the linear classifier diverged in epoch {epoch} (lr {lr}); lower --lr")]
    Diverged { epoch: usize, lr: f64 },
    /// An output could not be written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}
