//! `torch.nn.BatchNorm1d` / `BatchNorm2d`, with PyTorch's train and eval modes.
//!
//! burn's `BatchNorm` differs from PyTorch's in two ways that matter here: it updates the
//! running variance with the biased batch variance (PyTorch uses the unbiased one), and it uses
//! batch statistics only on an autodiff device. DINO's teacher runs without autodiff yet is never
//! put in eval mode (`main_dino.py`), so its BatchNorm layers normalise with batch statistics and
//! update their own running buffers. Here the mode is a flag of the layer, set for a whole
//! network with [`train_mode`] / [`eval_mode`], as `module.train()` / `module.eval()` do.

use burn::module::{Flag, Module, ModuleMapper, ModuleVisitor, Param, RunningState};
use burn::tensor::{Device, Tensor};

/// The running-statistics buffers' field names: state, not parameters. The EMA teacher, the
/// mixed-precision casts and the parameter statistics leave them alone, as PyTorch's
/// `parameters()` does.
pub const BUFFERS: [&str; 2] = ["running_mean", "running_var"];

/// Passes a module's parameters, not its BatchNorm buffers, to the visitor or mapper it wraps
/// (PyTorch's `parameters()`); buffers pass through unchanged.
struct Parameters<'a, T> {
    inner: &'a mut T,
    field: Vec<String>,
}

impl<T> Parameters<'_, T> {
    fn is_buffer(&self) -> bool {
        self.field.last().is_some_and(|f| BUFFERS.contains(&f.as_str()))
    }
}

impl<V: ModuleVisitor> ModuleVisitor for Parameters<'_, V> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.field.push(name.to_string());
        self.inner.enter_module(name, container_type);
    }
    fn exit_module(&mut self, name: &str, container_type: &str) {
        self.field.pop();
        self.inner.exit_module(name, container_type);
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.is_buffer() {
            self.inner.visit_float(param);
        }
    }
}

impl<M: ModuleMapper> ModuleMapper for Parameters<'_, M> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.field.push(name.to_string());
        self.inner.enter_module(name, container_type);
    }
    fn exit_module(&mut self, name: &str, container_type: &str) {
        self.field.pop();
        self.inner.exit_module(name, container_type);
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.is_buffer() { param } else { self.inner.map_float(param) }
    }
}

/// `visitor` over every parameter of `module`, in order, skipping the BatchNorm buffers.
pub fn visit_parameters<M: Module, V: ModuleVisitor>(module: &M, visitor: &mut V) {
    module.visit(&mut Parameters { inner: visitor, field: Vec::new() });
}

/// `mapper` over every parameter of `module`, in order; the BatchNorm buffers are kept as they are.
pub fn map_parameters<M: Module, T: ModuleMapper>(module: M, mapper: &mut T) -> M {
    module.map(&mut Parameters { inner: mapper, field: Vec::new() })
}

/// Batch normalisation over dimension 1 of `[B, C, ...]`; `gamma`/`beta` are burn's names for
/// PyTorch's `weight`/`bias` (checkpoints use PyTorch's).
#[derive(Module, Debug)]
pub struct BatchNorm {
    pub gamma: Param<Tensor<1>>,
    pub beta: Param<Tensor<1>>,
    pub running_mean: RunningState<Tensor<1>>,
    pub running_var: RunningState<Tensor<1>>,
    /// PyTorch's `training`: normalise with batch statistics and update the running ones.
    pub training: Param<Flag>,
    epsilon: f64,
    momentum: f64,
}

impl BatchNorm {
    /// PyTorch's defaults: weight 1, bias 0, running mean 0 and variance 1, eps 1e-5, momentum
    /// 0.1, train mode.
    pub fn new(channels: usize, device: &Device) -> Self {
        Self {
            gamma: Param::from_tensor(Tensor::ones([channels], device)),
            beta: Param::from_tensor(Tensor::zeros([channels], device)),
            running_mean: RunningState::new(Tensor::zeros([channels], device)),
            running_var: RunningState::new(Tensor::ones([channels], device)),
            training: Param::from_bool(true),
            epsilon: 1e-5,
            momentum: 0.1,
        }
    }

    /// `[B, C, ...]` -> `[B, C, ...]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.normalise(x, dino_kernels::batch_norm_eval, dino_kernels::batch_norm_train)
    }

    /// `relu(self.forward(x))`, in one pass on the CPU: `[B, C, ...]` -> `[B, C, ...]`.
    pub fn forward_relu<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.normalise(x, dino_kernels::batch_norm_eval_relu, dino_kernels::batch_norm_train_relu)
    }

    /// x through `eval` (running statistics) or `train` (batch statistics, which then update the
    /// running ones), by the layer's mode.
    fn normalise<const D: usize>(&self, x: Tensor<D>, eval: EvalNorm<D>, train: TrainNorm<D>) -> Tensor<D> {
        if !self.training.is_enabled() {
            let (mean, var) = self.running_for(&x);
            return eval(x, self.gamma.val(), self.beta.val(), mean, var, self.epsilon);
        }
        let per_channel = per_channel(&x);
        let (y, stats) = train(x, self.gamma.val(), self.beta.val(), self.epsilon);
        self.update_running(stats, per_channel);
        y
    }

    /// The running mean and variance on x's device, in x's dtype.
    fn running_for<const D: usize>(&self, x: &Tensor<D>) -> (Tensor<1>, Tensor<1>) {
        let (device, dtype) = (x.device(), x.dtype());
        let get = |state: &RunningState<Tensor<1>>| state.value().to_device(&device).cast(dtype);
        (get(&self.running_mean), get(&self.running_var))
    }

    /// PyTorch's update from the batch statistics `[2, C]` (means, biased variances): momentum
    /// 0.1 towards the mean and the unbiased variance.
    fn update_running(&self, stats: Tensor<2>, per_channel: usize) {
        let [_, channels] = stats.dims();
        // PyTorch keeps the unbiased variance; a single value per channel has none.
        let unbiased = per_channel as f64 / (per_channel.max(2) - 1) as f64;
        let m = self.momentum;
        let update = |state: &RunningState<Tensor<1>>, batch: Tensor<1>| {
            let old = state.value_sync();
            let batch = batch.cast(old.dtype()).to_device(&old.device());
            state.update(old * (1.0 - m) + batch * m);
            // burn keeps an update per thread until the next read syncs it; fold it in now, so
            // that a checkpoint written after this forward holds it.
            let _ = state.value_sync();
        };
        update(&self.running_mean, stats.clone().slice([0..1, 0..channels]).reshape([channels]));
        update(&self.running_var, stats.slice([1..2, 0..channels]).reshape([channels]) * unbiased);
    }
}

/// `dino_kernels::batch_norm_eval(_relu)`: x, gamma, beta, running mean and variance, eps.
type EvalNorm<const D: usize> = fn(Tensor<D>, Tensor<1>, Tensor<1>, Tensor<1>, Tensor<1>, f64) -> Tensor<D>;
/// `dino_kernels::batch_norm_train(_relu)`: x, gamma, beta, eps -> (y, batch statistics).
type TrainNorm<const D: usize> = fn(Tensor<D>, Tensor<1>, Tensor<1>, f64) -> (Tensor<D>, Tensor<2>);

/// Elements per channel of `[B, C, ...]`.
fn per_channel<const D: usize>(x: &Tensor<D>) -> usize {
    let dims = x.dims();
    dims.iter().product::<usize>() / dims[1].max(1)
}

/// Sets the mode of every [`BatchNorm`] in `module`.
struct SetMode(bool);

impl ModuleMapper for SetMode {
    fn map_flag(&mut self, flag: Param<Flag>) -> Param<Flag> {
        flag.with_value(self.0)
    }
}

/// `module.train()`: every BatchNorm normalises with batch statistics and updates its running
/// ones. What a network is in when built.
pub fn train_mode<M: Module>(module: M) -> M {
    module.map(&mut SetMode(true))
}

/// `module.eval()`: every BatchNorm normalises with its running statistics and changes nothing.
pub fn eval_mode<M: Module>(module: M) -> M {
    module.map(&mut SetMode(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().iter::<f32>().collect()
    }

    #[test]
    fn train_mode_normalises_by_the_batch_and_keeps_unbiased_running_statistics() {
        let device = Device::flex();
        // Channel 0 holds 1, 2, 3, 4 (mean 2.5, biased var 1.25, unbiased 5/3); channel 1 is 0.
        let x = Tensor::<3>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0], [2, 2, 2]),
            &device,
        );
        let bn = BatchNorm::new(2, &device);
        let y = values(bn.forward(x.clone()));
        let s = (1.25f32 + 1e-5).sqrt();
        assert!((y[0] - (1.0 - 2.5) / s).abs() < 1e-5 && (y[5] - (4.0 - 2.5) / s).abs() < 1e-5, "{y:?}");
        let mean = values(bn.running_mean.value_sync());
        let var = values(bn.running_var.value_sync());
        assert!((mean[0] - 0.25).abs() < 1e-6 && mean[1] == 0.0, "{mean:?}");
        assert!((var[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6 && (var[1] - 0.9).abs() < 1e-6, "{var:?}");

        // In eval mode the running statistics normalise, and stay as they are.
        let bn = eval_mode(bn);
        let y = values(bn.forward(x));
        assert!((y[0] - (1.0 - 0.25) / (var[0] + 1e-5).sqrt()).abs() < 1e-5, "{y:?}");
        assert_eq!(values(bn.running_mean.value_sync()), mean);
        assert!(train_mode(bn).training.is_enabled());
    }
}
