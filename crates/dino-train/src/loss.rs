//! The DINO loss and its center (`DINOLoss` in `main_dino.py`).

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};

/// Cross-entropy between the teacher's centered, sharpened softmax on the global crops and the
/// student's softmax on every other crop, with the center kept as an EMA of teacher outputs.
#[derive(Debug, Clone)]
pub struct DinoLoss {
    /// `[1, K]`, starts at zero.
    pub center: Tensor<2>,
    /// Crops per image the student sees (2 global + locals).
    pub ncrops: usize,
    /// Official 0.1.
    pub student_temp: f64,
    /// Official 0.9.
    pub center_momentum: f64,
}

impl DinoLoss {
    /// A loss with a zero center on `device` (not an autodiff one: the center never takes a
    /// gradient).
    pub fn new(out_dim: usize, ncrops: usize, device: &Device) -> Self {
        Self { center: Tensor::zeros([1, out_dim], device), ncrops, student_temp: 0.1, center_momentum: 0.9 }
    }

    /// Student outputs `[ncrops * B, K]` and teacher outputs `[2 * B, K]`, both ordered crop by
    /// crop, -> the scalar loss `[1]`, averaged over the `2 * ncrops - 2` (teacher view, other
    /// student view) pairs. The teacher side is a constant: no gradient flows to it.
    pub fn forward(&self, student_out: Tensor<2>, teacher_out: Tensor<2>, teacher_temp: f64) -> Tensor<1> {
        self.cross_entropy(student_out, self.teacher_probs(teacher_out, teacher_temp))
    }

    /// The teacher's targets: softmax((teacher_out - center) / teacher_temp), `[2 * B, K]` ->
    /// `[2 * B, K]`, on the plain device.
    pub fn teacher_probs(&self, teacher_out: Tensor<2>, teacher_temp: f64) -> Tensor<2> {
        // Without autodiff, the teacher side enters the student's graph as a constant.
        let teacher_out = teacher_out.without_autodiff();
        softmax((teacher_out - self.center.clone()) / teacher_temp, 1)
    }

    /// The loss of [`forward`](Self::forward) from targets already made by
    /// [`teacher_probs`](Self::teacher_probs): student `[ncrops * B, K]`, targets `[2 * B, K]`.
    pub fn cross_entropy(&self, student_out: Tensor<2>, teacher_probs: Tensor<2>) -> Tensor<1> {
        dino_kernels::dino_cross_entropy(student_out, teacher_probs, self.ncrops, self.student_temp)
    }

    /// The EMA update of the center with this batch's raw teacher outputs `[2 * B, K]`
    /// (called after the loss, as the official code does).
    pub fn update_center(&mut self, teacher_out: Tensor<2>) {
        let teacher_out = teacher_out.without_autodiff();
        let rows = teacher_out.dims()[0] as f64;
        let batch_center = teacher_out.sum_dim(0) / rows;
        self.center = self.center.clone() * self.center_momentum + batch_center * (1.0 - self.center_momentum);
    }
}
