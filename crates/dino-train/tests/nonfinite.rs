//! A NaN or infinite loss stops the training step with the official message, and a run that
//! diverges stops with the iteration, the lr and the teacher temperature, and saves nothing
//! non-finite.

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use dino_model::DinoModel;
use dino_train::{
    DinoLoss, IterationParams, NonFinite, Observer, Optimizer, OptimizerKind, StepParams, TrainConfig, TrainError,
    TrainState, train, train_step,
};

mod common;
use common::tiny_config;

#[test]
fn a_non_finite_loss_stops_the_step_with_a_clear_error() {
    let config = tiny_config(1);
    let model_config = config.model_config().unwrap();
    let device = Device::flex();
    let student = DinoModel::new(&model_config, &device.clone().autodiff());
    let state = TrainState {
        teacher: student.valid(),
        student,
        loss: DinoLoss::new(config.out_dim, config.crops.num_crops(), &device),
        optimizer: Optimizer::new(OptimizerKind::Adamw),
    };
    let nan = |s: usize| Tensor::<4>::full([2, 3, s, s], f32::NAN, &device);
    let crops = [nan(16), nan(16), nan(8)];
    let params = IterationParams {
        step: StepParams { lr: 1e-3, weight_decay: 0.04, clip_grad: 3.0, freeze_last_layer: false },
        momentum: 0.996,
        teacher_temp: 0.04,
    };
    let err = train_step(state, &crops, &params).unwrap_err();
    assert!(matches!(err, NonFinite::Loss(loss) if loss.is_nan()), "{err}");
    assert!(err.to_string().contains("stopping training"), "{err}");
}

struct Quiet;
impl Observer for Quiet {}

#[test]
fn a_diverging_run_names_the_iteration_and_its_schedule_and_saves_nothing() {
    // An lr of 1e30 sends the weights to ~1e28 after one step; attention then overflows.
    let config = TrainConfig { lr: 1e30, knn_every: 0, ..tiny_config(1) };
    let data = Arc::new(dino_data::Dataset::synthetic(dino_data::Split::Train));
    let dir = tempfile::tempdir().unwrap();
    let err = train(&config, data, None, dir.path(), &Device::flex(), false, &mut Quiet).unwrap_err();
    assert!(matches!(err, TrainError::NonFinite { epoch: 0, .. }), "{err}");
    let message = err.to_string();
    for expected in ["epoch 1, iteration", "lr ", "teacher_temp 0.04", "stopping training", "--resume"] {
        assert!(message.contains(expected), "{expected}: {message}");
    }
    assert!(!dir.path().join("checkpoint.safetensors").exists(), "nothing non-finite is saved");
}
