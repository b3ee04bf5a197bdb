//! Training health: the numbers of the paper's collapse study (section 5.3, figure 7) and the
//! warnings they justify.
//!
//! The DINO loss of a batch is the cross-entropy H(q, p) between the teacher's targets q and the
//! student's softmax p, which splits into the teacher's entropy H(q) plus KL(q ‖ p). The two
//! collapses look different in these terms:
//! - **uniform**: centering wins, every target is near uniform: H(q) near its ceiling ln K and
//!   KL near 0, whatever the image;
//! - **one-hot** (one dimension dominates): sharpening wins, every image gets the same
//!   prototype: the entropy of the batch's *mean* target falls towards 0;
//! - and a **frozen teacher** (momentum too close to 1 for the run's length) moves much less than
//!   the student, so the targets stay those of an old network.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use serde::Serialize;

/// Entropies (nats) of one batch of teacher targets `[2B, K]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TargetEntropy {
    /// Mean over rows of H(q_row): how sharp each target is.
    pub per_image: f64,
    /// H(mean of the rows): how many prototypes the batch uses as a whole.
    pub of_batch_mean: f64,
}

/// The entropies of `q` (rows summing to 1).
pub fn target_entropy(q: &Tensor<2>) -> TargetEntropy {
    let plogp = |p: Tensor<2>| (p.clone() * p.clamp_min(1e-30).log()).sum_dim(1);
    let per_image = plogp(q.clone()).mean().neg();
    let of_batch_mean = plogp(q.clone().mean_dim(0)).neg().reshape([1]);
    let both: Vec<f64> = Tensor::cat(vec![per_image, of_batch_mean], 0).into_data().iter::<f64>().collect();
    TargetEntropy { per_image: both[0], of_batch_mean: both[1] }
}

/// Every float parameter of a module, flattened into one host vector (buffers excluded).
pub fn parameter_vector<M: Module>(module: &M) -> Vec<f32> {
    struct Flatten(Vec<f32>);
    impl ModuleVisitor for Flatten {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.extend(param.val().without_autodiff().into_data().iter::<f32>());
        }
    }
    let mut flat = Flatten(Vec::new());
    dino_model::batch_norm::visit_parameters(module, &mut flat);
    flat.0
}

/// ‖after − before‖ / ‖before‖.
pub fn relative_change(before: &[f32], after: &[f32]) -> f64 {
    assert_eq!(before.len(), after.len(), "the same module before and after");
    let (diff, norm) = before
        .iter()
        .zip(after)
        .fold((0.0f64, 0.0f64), |(d, n), (&b, &a)| (d + (a as f64 - b as f64).powi(2), n + (b as f64).powi(2)));
    (diff / norm.max(1e-30)).sqrt()
}

/// An epoch's health numbers (means over its iterations, or values at its end).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Health {
    /// Mean per-image teacher entropy H(q), nats.
    pub teacher_entropy: f64,
    /// Entropy of the batch-mean target, nats (averaged over batches).
    pub teacher_batch_entropy: f64,
    /// Mean KL(q ‖ p) = loss − H(q).
    pub kl_divergence: f64,
    /// ln K, the ceiling of both entropies.
    pub entropy_ceiling: f64,
    /// ‖center‖ at the end of the epoch.
    pub center_norm: f64,
    /// Relative change of the teacher's parameters over the epoch.
    pub teacher_drift: f64,
    /// Relative change of the student's parameters over the epoch.
    pub student_drift: f64,
}

/// Targets closer than this to uniform (nats: ln K − H(q) is their mean KL from the uniform
/// distribution) carry next to nothing: a teacher hotter than its logits' range sits within
/// 1e-4 (`tests/health.rs`). The default `dino train` stays 0.1-0.4 nats away from uniform
/// while its k-NN rises from 52 to 70 % (BENCHMARKS.md, section 3), so nearness alone is judged
/// in nats, not as a fraction of ln K.
pub const UNIFORM_NATS: f64 = 0.05;
/// Above this fraction of ln K the targets are near uniform, and if the student also matches
/// them (KL under [`UNIFORM_KL_NATS`]) they teach nothing more: the paper's signature of
/// collapse. A random network's targets sit at 0.99 ln K or more; preset `small` on
/// Fashion-MNIST leaves 0.9 within the first epoch (0.85 ln K; BENCHMARKS.md, section 1).
pub const UNIFORM_FRACTION: f64 = 0.9;
/// See [`UNIFORM_FRACTION`]. Between the runs of BENCHMARKS.md: teacher temperature 0.07 on
/// Fashion-MNIST stalls at 0.98 ln K with a KL of 0.031 (warned); the default `dino train`,
/// which learns, never goes under 0.069.
pub const UNIFORM_KL_NATS: f64 = 0.04;
/// A batch-mean target below this entropy (nats) puts the whole batch on one or two prototypes.
pub const ONE_HOT_NATS: f64 = 0.5;
/// A teacher that moves less than this fraction of the student's movement over an epoch is not
/// following it: with momentum m it averages the last ~1 / (1 - m) iterations, so m too close
/// to 1 for the epoch's length leaves it near where it started.
pub const FROZEN_RATIO: f64 = 0.1;

/// What went wrong, with what to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warning {
    Uniform,
    OneHot,
    FrozenTeacher,
}

impl Warning {
    /// The warnings `health` justifies.
    pub fn diagnose(health: &Health) -> Vec<Warning> {
        let mut found = Vec::new();
        let from_uniform = health.entropy_ceiling - health.teacher_entropy;
        let matched = health.teacher_entropy > UNIFORM_FRACTION * health.entropy_ceiling
            && health.kl_divergence < UNIFORM_KL_NATS;
        if from_uniform < UNIFORM_NATS || matched {
            found.push(Warning::Uniform);
        }
        if health.teacher_batch_entropy < ONE_HOT_NATS {
            found.push(Warning::OneHot);
        }
        if health.teacher_drift < FROZEN_RATIO * health.student_drift {
            found.push(Warning::FrozenTeacher);
        }
        found
    }

    /// One line: what the numbers show, and what to change.
    pub fn message(&self, health: &Health) -> String {
        match self {
            Warning::Uniform => format!(
                "uniform collapse: the teacher's targets are near uniform and carry almost no information (entropy {:.2} of ln K = {:.2}, KL {:.3}); \
                 lower teacher_temp (0.04), lower momentum_teacher (0.99) so the teacher follows the student, \
                 raise lr, or lower out_dim",
                health.teacher_entropy, health.entropy_ceiling, health.kl_divergence
            ),
            Warning::OneHot => format!(
                "one-hot collapse: every image of a batch gets the same prototype (entropy of the mean target \
                 {:.2} nats); raise teacher_temp, keep centering on (center_momentum < 1), or lower lr",
                health.teacher_batch_entropy
            ),
            Warning::FrozenTeacher => format!(
                "the teacher barely moves: its parameters changed by {:.1e} this epoch, the student's by {:.1e}; \
                 lower momentum_teacher (0.99 for runs of a few thousand iterations)",
                health.teacher_drift, health.student_drift
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;

    #[test]
    fn entropies_of_uniform_and_one_hot_targets() {
        let device = Device::flex();
        let k = 8;
        let uniform = Tensor::<2>::from_data(TensorData::new(vec![1.0f32 / k as f32; 4 * k], [4, k]), &device);
        let e = target_entropy(&uniform);
        assert!((e.per_image - (k as f64).ln()).abs() < 1e-5 && (e.of_batch_mean - (k as f64).ln()).abs() < 1e-5);
        // Each row one-hot on its own prototype: sharp images, a spread batch.
        let mut eye = vec![0.0f32; 4 * k];
        (0..4).for_each(|i| eye[i * k + 2 * i] = 1.0);
        let e = target_entropy(&Tensor::from_data(TensorData::new(eye, [4, k]), &device));
        assert!(e.per_image.abs() < 1e-5 && (e.of_batch_mean - 4f64.ln()).abs() < 1e-5, "{e:?}");
    }

    #[test]
    fn each_warning_from_its_numbers() {
        let healthy = Health {
            teacher_entropy: 4.0,
            teacher_batch_entropy: 6.5,
            kl_divergence: 0.8,
            entropy_ceiling: 2048f64.ln(),
            center_norm: 0.5,
            teacher_drift: 0.02,
            student_drift: 0.03,
        };
        assert!(Warning::diagnose(&healthy).is_empty());
        // Targets at uniform, however far the student is from them; or near uniform, and matched.
        let uniform = Health { teacher_entropy: 7.62, ..healthy };
        assert_eq!(Warning::diagnose(&uniform), [Warning::Uniform]);
        let matched = Health { teacher_entropy: 7.2, kl_divergence: 0.004, ..healthy };
        assert_eq!(Warning::diagnose(&matched), [Warning::Uniform]);
        // Near-uniform targets the student has not matched yet still teach.
        let still_learning = Health { teacher_entropy: 7.2, kl_divergence: 0.1, ..healthy };
        assert!(Warning::diagnose(&still_learning).is_empty());
        let one_hot = Health { teacher_entropy: 0.01, teacher_batch_entropy: 0.2, ..healthy };
        assert_eq!(Warning::diagnose(&one_hot), [Warning::OneHot]);
        let frozen = Health { teacher_drift: 0.001, ..healthy };
        assert_eq!(Warning::diagnose(&frozen), [Warning::FrozenTeacher]);
        assert!(Warning::Uniform.message(&uniform).contains("teacher_temp"));
    }

    #[test]
    fn relative_change_of_parameters() {
        assert_eq!(relative_change(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((relative_change(&[3.0, 4.0], &[3.0, 4.5]) - 0.1).abs() < 1e-9);
    }
}
