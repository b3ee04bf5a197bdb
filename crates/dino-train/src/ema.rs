//! The teacher as an exponential moving average of the student.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;
use dino_model::batch_norm::is_buffer;

/// Every float parameter of a module (not the BatchNorm buffers), flattened, in visiting order.
struct Collect {
    path: Vec<String>,
    params: Vec<Tensor<1>>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if is_buffer(self.path.last()) {
            return;
        }
        let t = param.val().without_autodiff();
        let n = t.shape().num_elements();
        self.params.push(t.reshape([n]));
    }
}

struct Ema {
    path: Vec<String>,
    student: std::vec::IntoIter<Tensor<1>>,
    momentum: f64,
}

impl ModuleMapper for Ema {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if is_buffer(self.path.last()) {
            return param;
        }
        let s = self.student.next().expect("teacher and student have the same structure");
        let m = self.momentum;
        param.map(|t| {
            let shape = t.dims();
            dino_kernels::ema(t, s.reshape(shape), m)
        })
    }
}

/// `teacher = m * teacher + (1 - m) * student` for every parameter (BatchNorm's running
/// statistics excluded: the official loop zips `parameters()`, so the teacher keeps its own;
/// parameters that are not trained, like a frozen `weight_g`, included). The two
/// modules are matched by structure, not by parameter id, so a teacher restored from a
/// checkpoint pairs up as well as one cloned from the student.
pub fn ema_update<M: Module>(teacher: M, student: &M, momentum: f64) -> M {
    let mut collect = Collect { path: Vec::new(), params: Vec::new() };
    student.visit(&mut collect);
    teacher.map(&mut Ema { path: Vec::new(), student: collect.params.into_iter(), momentum })
}
