//! A NaN or infinite loss stops the training step with the official message.

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use dino_model::DinoModel;
use dino_train::{DinoLoss, IterationParams, Optimizer, OptimizerKind, StepParams, TrainState, train_step};

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
    assert!(err.loss.is_nan());
    assert!(err.to_string().contains("stopping training"), "{err}");
}
