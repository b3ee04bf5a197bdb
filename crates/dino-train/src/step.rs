//! One DINO training iteration: the body of the official `train_one_epoch` loop.

use burn::tensor::Tensor;
use dino_model::DinoModel;

use crate::ema::ema_update;
use crate::health::{TargetEntropy, target_entropy};
use crate::loss::DinoLoss;
use crate::optim::{Optimizer, StepParams};

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
    let targets = loss.teacher_probs(teacher_out.clone(), params.teacher_temp);
    let teacher_entropy = target_entropy(&targets);
    let value = loss.cross_entropy(student_out, targets);
    let scalar = value.clone().into_scalar::<f64>();
    if !scalar.is_finite() {
        return Err(NonFinite::Loss(scalar));
    }
    let grads = value.backward();
    let (student, grad_norms) = optimizer.step(student, grads, &params.step);
    if let Some((index, &norm)) = grad_norms.iter().enumerate().find(|(_, n)| !n.is_finite()) {
        return Err(NonFinite::Gradient { index, norm });
    }
    let teacher = ema_update(teacher, &student, params.momentum);
    loss.update_center(teacher_out);
    Ok((TrainState { student, teacher, loss, optimizer }, StepReport { loss: scalar, grad_norms, teacher_entropy }))
}
