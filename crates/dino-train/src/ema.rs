//! The teacher as an exponential moving average of the student.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;
use dino_model::batch_norm::{map_parameters, visit_parameters};

/// Every float parameter of a module, flattened, in visiting order.
struct Collect(Vec<Tensor<1>>);

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val().without_autodiff();
        let n = t.shape().num_elements();
        self.0.push(t.reshape([n]));
    }
}

struct Ema {
    student: std::vec::IntoIter<Tensor<1>>,
    momentum: f64,
}

impl ModuleMapper for Ema {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
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
    let mut collect = Collect(Vec::new());
    visit_parameters(student, &mut collect);
    map_parameters(teacher, &mut Ema { student: collect.0.into_iter(), momentum })
}
