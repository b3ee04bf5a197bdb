//! One DINO training iteration: the body of the official `train_one_epoch` loop.

use burn::tensor::{DType, Tensor};
use dino_model::DinoModel;
use dino_model::batch_norm::train_mode;

use crate::ema::ema_update;
use crate::health::{TargetEntropy, target_entropy};
use crate::loss::DinoLoss;
use crate::optim::{Optimizer, StepParams};
use crate::precision::{LossScaler, Precision, cast_params};

/// Everything a training iteration changes.
#[derive(Debug)]
pub struct TrainState {
    /// On an autodiff device; trained by the optimizer.
    pub student: DinoModel,
    /// On the plain device; an EMA of the student, never trained.
    pub teacher: DinoModel,
    pub loss: DinoLoss,
    pub optimizer: Optimizer,
}

impl TrainState {
    /// Student and teacher in PyTorch's train mode, as `main_dino.py` keeps them both (the
    /// teacher is never put in eval mode): BatchNorm layers normalise with batch statistics and
    /// update their own running ones.
    pub fn train_mode(self) -> Self {
        Self { student: train_mode(self.student), teacher: train_mode(self.teacher), ..self }
    }
}

/// The scheduled values for one iteration.
#[derive(Debug, Clone, Copy)]
pub struct IterationParams {
    pub step: StepParams,
    /// EMA momentum of the teacher (per iteration).
    pub momentum: f64,
    /// Teacher temperature (per epoch).
    pub teacher_temp: f64,
}

/// What an iteration reports.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub loss: f64,
    /// Norm of each parameter's gradient before clipping, in parameter order.
    pub grad_norms: Vec<f64>,
    /// Entropies of the teacher's targets (the loss minus the per-image one is the KL part).
    pub teacher_entropy: TargetEntropy,
    /// The optimizer step was skipped: an f16 gradient overflowed (mixed precision only).
    pub skipped: bool,
}

/// Raised when the loss or a gradient is NaN or infinite (the official loop exits on the loss
/// too). The state it came from is dropped, so nothing non-finite reaches a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum NonFinite {
    #[error("loss is {0}, stopping training")]
    Loss(f64),
    #[error("the gradient of parameter {index} has norm {norm}, stopping training")]
    Gradient { index: usize, norm: f64 },
}

/// One iteration on a batch of crops, each `[B, 3, H_i, W_i]` on the plain device, ordered
/// [global 1, global 2, locals...]: teacher forward on the two globals, student forward on all,
/// DINO loss, backward, clip + step, EMA of the teacher, then the center update.
pub fn train_step(
    state: TrainState,
    crops: &[Tensor<4>],
    params: &IterationParams,
) -> Result<(TrainState, StepReport), NonFinite> {
    let TrainState { student, teacher, mut loss, mut optimizer } = state;
    let teacher_out = teacher.forward_crops(&crops[..2]);
    let student_crops: Vec<Tensor<4>> = crops.iter().map(|c| c.clone().autodiff()).collect();
    let student_out = student.forward_crops(&student_crops);
    let (value, scalar, teacher_entropy) = objective(&loss, teacher_out.clone(), student_out, params)?;
    let grads = value.backward();
    let (student, grad_norms) = optimizer.step(student, grads, &params.step);
    if let Some((index, &norm)) = grad_norms.iter().enumerate().find(|(_, n)| !n.is_finite()) {
        return Err(NonFinite::Gradient { index, norm });
    }
    let teacher = ema_update(teacher, &student, params.momentum);
    loss.update_center(teacher_out);
    let report = StepReport { loss: scalar, grad_norms, teacher_entropy, skipped: false };
    Ok((TrainState { student, teacher, loss, optimizer }, report))
}

/// The DINO loss of the outputs (its value, read back, must be finite) and the targets' entropies.
fn objective(
    loss: &DinoLoss,
    teacher_out: Tensor<2>,
    student_out: Tensor<2>,
    params: &IterationParams,
) -> Result<(Tensor<1>, f64, TargetEntropy), NonFinite> {
    let targets = loss.teacher_probs(teacher_out, params.teacher_temp);
    let teacher_entropy = target_entropy(&targets);
    let value = loss.cross_entropy(student_out, targets);
    let scalar = value.clone().into_scalar::<f64>();
    if !scalar.is_finite() {
        return Err(NonFinite::Loss(scalar));
    }
    Ok((value, scalar, teacher_entropy))
}

/// [`train_step`] in mixed precision (`--precision f16|bf16`, the GPU path): both forward passes
/// and the backward pass run in `dtype` on copies of the f32 weights, cast once per step; the
/// loss, the gradients of the f32 weights, the optimizer, the EMA and the center stay f32. With
/// a `scaler` (f16) the loss is multiplied by its scale before the backward pass; when a gradient
/// overflows, the optimizer step is skipped and the scale halved, as `GradScaler` does, while the
/// EMA and the center update as in the official loop. Without one (bf16) a non-finite gradient
/// stops training as in f32.
pub fn train_step_mixed(
    state: TrainState,
    crops: &[Tensor<4>],
    params: &IterationParams,
    dtype: DType,
    scaler: Option<&mut LossScaler>,
) -> Result<(TrainState, StepReport), NonFinite> {
    let TrainState { student, teacher, mut loss, mut optimizer } = state;
    let half = |c: &Tensor<4>| c.clone().cast(dtype);
    let globals: Vec<Tensor<4>> = crops[..2].iter().map(half).collect();
    let teacher_out = cast_params(&teacher, dtype).forward_crops(&globals).cast(DType::F32);
    let student_crops: Vec<Tensor<4>> = crops.iter().map(|c| half(c).autodiff()).collect();
    let student_out = cast_params(&student, dtype).forward_crops(&student_crops).cast(DType::F32);
    let (value, scalar, teacher_entropy) = objective(&loss, teacher_out.clone(), student_out, params)?;
    let scale = scaler.as_ref().map_or(1.0, |s| s.scale);
    let grads = (value * scale).backward();
    let (student, grad_norms, skipped) = match (optimizer.step_scaled(student, grads, &params.step, scale), scaler) {
        (Ok((student, norms)), scaler) => {
            scaler.map(LossScaler::step_taken);
            (student, norms, false)
        }
        (Err((student, norms)), Some(scaler)) => {
            scaler.overflowed();
            (student, norms, true)
        }
        (Err((_, norms)), None) => {
            let (index, &norm) = norms.iter().enumerate().find(|(_, n)| !n.is_finite()).expect("a non-finite norm");
            return Err(NonFinite::Gradient { index, norm });
        }
    };
    let teacher = ema_update(teacher, &student, params.momentum);
    loss.update_center(teacher_out);
    let report = StepReport { loss: scalar, grad_norms, teacher_entropy, skipped };
    Ok((TrainState { student, teacher, loss, optimizer }, report))
}

/// The step a run in `precision` takes: [`train_step`] in f32, else [`train_step_mixed`] in its
/// half type, with `scaler` for f16.
pub fn train_step_in(
    precision: Precision,
    state: TrainState,
    crops: &[Tensor<4>],
    params: &IterationParams,
    scaler: &mut LossScaler,
) -> Result<(TrainState, StepReport), NonFinite> {
    match precision.half() {
        None => train_step(state, crops, params),
        Some(dtype) => {
            let scaler = (precision == Precision::F16).then_some(scaler);
            train_step_mixed(state, crops, params, dtype, scaler)
        }
    }
}
