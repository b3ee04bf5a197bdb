//! DINO self-supervised training, step-exact with the official `main_dino.py`.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod ema;
pub mod finetune;
pub mod health;
pub mod loss;
pub mod optim;
pub mod precision;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use config::TrainConfig;
pub use ema::ema_update;
pub use loss::DinoLoss;
pub use optim::{Optimizer, OptimizerKind, StepParams};
pub use precision::{LossScaler, Precision};
pub use schedule::{cosine_schedule, teacher_temp_schedule};
pub use step::{IterationParams, NonFinite, StepReport, TrainState, train_step, train_step_in, train_step_mixed};
pub use trainer::{EpochLog, IterationLog, KnnData, Observer, Position, RunDir, Summary, TrainError, train};

/// Official `--min_lr` default, the end of the learning-rate cosine.
pub const DEFAULT_MIN_LR: f64 = 1e-6;
