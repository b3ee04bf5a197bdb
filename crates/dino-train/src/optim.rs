//! The optimizer step of `main_dino.py`: per-parameter gradient clipping, dropping the last
//! layer's gradients while it is frozen, then AdamW, SGD or LARS with the scheduled learning rate
//! and weight decay.
//!
//! Written out rather than taken from burn-optim because DINO schedules the weight decay per
//! iteration (burn's AdamW has a fixed one), applies it to one parameter group only, clips each
//! parameter with the official epsilon, and its tests compare the gradient norms before clipping.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Gradients, Tensor};
use dino_kernels::AdamwScalars;
use serde::{Deserialize, Serialize};

/// The optimizers of `main_dino.py --optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// `torch.optim.AdamW` (betas 0.9/0.999, eps 1e-8), decoupled weight decay.
    #[default]
    Adamw,
    /// `torch.optim.SGD(momentum=0.9)`, weight decay added to the gradient.
    Sgd,
    /// The official `utils.LARS` (momentum 0.9, eta 0.001).
    Lars,
}

/// What one optimizer step uses, from the schedules and the config.
#[derive(Debug, Clone, Copy)]
pub struct StepParams {
    pub lr: f64,
    /// Applied to the regularised group only: parameters that are not biases and not 1-D.
    pub weight_decay: f64,
    /// Per-parameter max gradient norm; 0 disables clipping.
    pub clip_grad: f64,
    /// Drop the gradients of `last_layer` parameters (while epoch < freeze_last_layer).
    pub freeze_last_layer: bool,
}

const ADAM_BETAS: (f64, f64) = (0.9, 0.999);
const ADAM_EPS: f64 = 1e-8;
const MOMENTUM: f64 = 0.9;
const LARS_ETA: f64 = 0.001;

/// Per-parameter state, flattened to 1-D.
#[derive(Debug, Clone)]
struct ParamState {
    step: i32,
    /// Adam's first moment, or the momentum buffer of SGD and LARS.
    m: Tensor<1>,
    /// Adam's second moment.
    v: Option<Tensor<1>>,
}

/// An optimizer and its state, keyed by parameter id.
#[derive(Debug, Clone)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    states: HashMap<ParamId, ParamState>,
    /// Per-parameter multipliers of the learning rate (layer-wise decay); 1 for the others.
    lr_scales: HashMap<ParamId, f64>,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind) -> Self {
        Self { kind, states: HashMap::new(), lr_scales: HashMap::new() }
    }

    /// The same optimizer with the learning rate of each listed parameter multiplied by its
    /// scale (fine-tuning's layer-wise decay; DINO's own training uses none).
    pub fn with_lr_scales(self, lr_scales: HashMap<ParamId, f64>) -> Self {
        Self { lr_scales, ..self }
    }

    /// Updates every parameter of `model` that has a gradient in `grads`, in the official order
    /// (clip, drop frozen, step). Returns the model and the norm of each gradient before
    /// clipping, in parameter order (official `named_parameters` order).
    pub fn step<M: Module>(&mut self, model: M, grads: Gradients, params: &StepParams) -> (M, Vec<f64>) {
        let norms = grad_norms(&model, &grads, 1.0);
        (self.update(model, grads, params, &norms, 1.0), norms)
    }

    /// [`Optimizer::step`] on the gradients of a loss multiplied by `loss_scale` (mixed
    /// precision): they are unscaled inside the update, as `GradScaler.unscale_` does before
    /// clipping. If a gradient is not finite (an f16 overflow), nothing is updated and the norms
    /// come back as the error, as `GradScaler.step` skips the step.
    pub fn step_scaled<M: Module>(
        &mut self,
        model: M,
        grads: Gradients,
        params: &StepParams,
        loss_scale: f64,
    ) -> Result<(M, Vec<f64>), (M, Vec<f64>)> {
        let norms = grad_norms(&model, &grads, loss_scale);
        if norms.iter().any(|n| !n.is_finite()) {
            return Err((model, norms));
        }
        Ok((self.update(model, grads, params, &norms, loss_scale), norms))
    }

    fn update<M: Module>(
        &mut self,
        model: M,
        mut grads: Gradients,
        params: &StepParams,
        norms: &[f64],
        loss_scale: f64,
    ) -> M {
        let mut mapper =
            StepMapper { optimizer: self, grads: &mut grads, params, path: Vec::new(), norms, next: 0, loss_scale };
        model.map(&mut mapper)
    }
}

/// The norm of every gradient of `model` in `grads` divided by `loss_scale`, in parameter order.
fn grad_norms<M: Module>(model: &M, grads: &Gradients, loss_scale: f64) -> Vec<f64> {
    struct Norms<'a> {
        grads: &'a Gradients,
        loss_scale: f64,
        norms: Vec<f64>,
    }
    impl ModuleVisitor for Norms<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = param.val().grad(self.grads) {
                self.norms.push(dino_kernels::squared_norm(grad).sqrt() / self.loss_scale);
            }
        }
    }
    let mut visitor = Norms { grads, loss_scale, norms: Vec::new() };
    model.visit(&mut visitor);
    visitor.norms
}

/// One parameter's optimizer state, by the parameter's position in visiting order (stable across
/// runs, unlike parameter ids), for checkpoints.
#[derive(Debug, Clone)]
pub struct SavedState {
    pub index: usize,
    pub step: i32,
    pub m: Tensor<1>,
    pub v: Option<Tensor<1>>,
}

struct ParamIds(Vec<ParamId>);

impl ModuleVisitor for ParamIds {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.id);
    }
}

fn param_ids<M: Module>(model: &M) -> Vec<ParamId> {
    let mut ids = ParamIds(Vec::new());
    model.visit(&mut ids);
    ids.0
}

impl Optimizer {
    /// The state of every parameter of `model` that has one.
    pub fn export<M: Module>(&self, model: &M) -> Vec<SavedState> {
        param_ids(model)
            .into_iter()
            .enumerate()
            .filter_map(|(index, id)| {
                let s = self.states.get(&id)?;
                Some(SavedState { index, step: s.step, m: s.m.clone(), v: s.v.clone() })
            })
            .collect()
    }

    /// An optimizer holding `saved` states for the parameters of `model`.
    pub fn import<M: Module>(kind: OptimizerKind, model: &M, saved: Vec<SavedState>) -> Self {
        let ids = param_ids(model);
        let states = saved
            .into_iter()
            .filter_map(|s| Some((*ids.get(s.index)?, ParamState { step: s.step, m: s.m, v: s.v })))
            .collect();
        Self { kind, states, lr_scales: HashMap::new() }
    }
}

struct StepMapper<'a> {
    optimizer: &'a mut Optimizer,
    grads: &'a mut Gradients,
    params: &'a StepParams,
    path: Vec<String>,
    /// The unscaled gradient norms, in visiting order; `next` is the next one's index.
    norms: &'a [f64],
    next: usize,
    /// What the gradients are multiplied by (1 but in mixed precision).
    loss_scale: f64,
}

impl ModuleMapper for StepMapper<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        // Taken out of `grads`, so that the update can reuse its buffer.
        let Some(grad) = tensor.grad_remove(self.grads) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let shape = tensor.shape();
        let n = shape.num_elements();
        let grad = grad.reshape([n]);

        // utils.clip_gradients: each parameter on its own, with the official epsilon, on the
        // unscaled gradient.
        let norm = self.norms[self.next];
        self.next += 1;
        let coef = if self.params.clip_grad > 0.0 { self.params.clip_grad / (norm + 1e-6) } else { 1.0 };
        let grad_scale = coef.min(1.0) / self.loss_scale;
        // utils.cancel_gradients_last_layer, after clipping: the parameter is left untouched.
        if self.params.freeze_last_layer && self.path.iter().any(|p| p == "last_layer") {
            return Param::from_mapped_value(id, tensor, mapper);
        }

        let wd = if is_regularised(&self.path, D) { self.params.weight_decay } else { 0.0 };
        let lr = self.params.lr * self.optimizer.lr_scales.get(&id).copied().unwrap_or(1.0);
        let require_grad = tensor.is_require_grad();
        let p = tensor.without_autodiff().reshape([n]);
        let state = self.optimizer.states.remove(&id);
        let clipped = |grad: Tensor<1>| if grad_scale != 1.0 { grad * grad_scale } else { grad };
        let (p, state) = match self.optimizer.kind {
            // AdamW scales the gradient inside its single pass.
            OptimizerKind::Adamw => adamw(p, grad, grad_scale, state, lr, wd),
            OptimizerKind::Sgd => sgd(p, clipped(grad), state, lr, wd),
            OptimizerKind::Lars => lars(p, clipped(grad), state, lr, wd, D == 1),
        };
        self.optimizer.states.insert(id, state);
        let mut updated = p.reshape(shape).autodiff();
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// `utils.get_params_groups`: biases and 1-D parameters are not regularised.
fn is_regularised(path: &[String], ndim: usize) -> bool {
    ndim > 1 && path.last().is_none_or(|name| name != "bias")
}

/// Positions (in visiting order) of the trainable parameters in the order of an official
/// optimizer's state indices: the regularised group, then the rest.
struct OfficialOrder {
    path: Vec<String>,
    position: usize,
    regularised: Vec<(usize, usize)>,
    others: Vec<(usize, usize)>,
}

impl ModuleVisitor for OfficialOrder {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if param.val().is_require_grad() {
            let group = if is_regularised(&self.path, D) { &mut self.regularised } else { &mut self.others };
            group.push((self.position, param.val().shape().num_elements()));
        }
        self.position += 1;
    }
}

/// For each index of an official optimizer state dict (`get_params_groups` order), the position
/// of that parameter in `model`'s visiting order and its number of elements.
pub fn official_state_order<M: Module>(model: &M) -> Vec<(usize, usize)> {
    let mut order = OfficialOrder { path: Vec::new(), position: 0, regularised: Vec::new(), others: Vec::new() };
    model.visit(&mut order);
    order.regularised.into_iter().chain(order.others).collect()
}

/// `torch.optim.AdamW` for one parameter, on the gradient `g · grad_scale`.
fn adamw(
    p: Tensor<1>,
    g: Tensor<1>,
    grad_scale: f64,
    state: Option<ParamState>,
    lr: f64,
    wd: f64,
) -> (Tensor<1>, ParamState) {
    let (step, m, v) = match state {
        Some(ParamState { step, m, v: Some(v) }) => (step + 1, m, v),
        _ => (1, g.zeros_like(), g.zeros_like()),
    };
    let scalars = AdamwScalars::new(lr, wd, ADAM_BETAS, ADAM_EPS, step).with_grad_scale(grad_scale);
    let [p, m, v] = dino_kernels::adamw_step(p, g, m, v, scalars);
    (p, ParamState { step, m, v: Some(v) })
}

/// `torch.optim.SGD(momentum=0.9)` for one parameter (coupled weight decay).
fn sgd(p: Tensor<1>, g: Tensor<1>, state: Option<ParamState>, lr: f64, wd: f64) -> (Tensor<1>, ParamState) {
    let g = if wd != 0.0 { g + p.clone() * wd } else { g };
    let (step, buf) = match state {
        Some(s) => (s.step + 1, s.m * MOMENTUM + g),
        None => (1, g),
    };
    (p - buf.clone() * lr, ParamState { step, m: buf, v: None })
}

/// The official `utils.LARS` for one parameter: decay and trust ratio skip 1-D parameters.
fn lars(
    p: Tensor<1>,
    g: Tensor<1>,
    state: Option<ParamState>,
    lr: f64,
    wd: f64,
    one_dim: bool,
) -> (Tensor<1>, ParamState) {
    let mut dp = g;
    if !one_dim {
        dp = dp + p.clone() * wd;
        let p_norm = p.clone().square().sum().into_scalar::<f64>().sqrt();
        let u_norm = dp.clone().square().sum().into_scalar::<f64>().sqrt();
        if p_norm > 0.0 && u_norm > 0.0 {
            dp = dp * (LARS_ETA * p_norm / u_norm);
        }
    }
    let (step, mu) = match state {
        Some(s) => (s.step + 1, s.m * MOMENTUM + dp),
        None => (1, dp),
    };
    (p - mu.clone() * lr, ParamState { step, m: mu, v: None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn t(v: &[f32]) -> Tensor<1> {
        Tensor::from_floats(v, &Device::flex())
    }

    fn values(x: Tensor<1>) -> Vec<f32> {
        x.into_data().iter::<f32>().collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6), "{a:?} != {b:?}");
    }

    #[test]
    fn sgd_adds_coupled_decay_then_momentum() {
        let (p, state) = sgd(t(&[1.0, 2.0]), t(&[0.5, -1.0]), None, 0.1, 0.1);
        // buf = g + wd p = [0.6, -0.8]; p -= lr buf
        close(&values(p.clone()), &[0.94, 2.08]);
        let (p, _) = sgd(p, t(&[0.0, 0.0]), Some(state), 0.1, 0.0);
        // buf = 0.9 buf
        close(&values(p), &[0.94 - 0.054, 2.08 + 0.072]);
    }

    #[test]
    fn lars_scales_by_the_trust_ratio_except_for_1d_parameters() {
        // ||p|| = 5, ||g|| = 2: q = 0.001 * 5 / 2.
        let (p, _) = lars(t(&[3.0, 4.0]), t(&[0.0, 2.0]), None, 1.0, 0.0, false);
        close(&values(p), &[3.0, 4.0 - 0.005]);
        let (p, _) = lars(t(&[3.0, 4.0]), t(&[0.0, 2.0]), None, 1.0, 0.5, true);
        close(&values(p), &[3.0, 2.0]);
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_about_lr() {
        let (p, state) = adamw(t(&[1.0, -1.0]), t(&[0.3, -2.0]), 1.0, None, 0.01, 0.0);
        close(&values(p), &[0.99, -0.99]);
        assert_eq!(state.step, 1);
    }
}
