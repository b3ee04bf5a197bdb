//! `--precision bf16` on the CPU: every matrix product of the kernels with bf16 operands and f32
//! sums, everything else f32. Its own test binary: the matmul precision is process-wide.

mod official;

use burn::tensor::Tensor;
use dino_fixtures::*;
use dino_kernels::{MatmulPrecision, set_matmul_precision};
use dino_train::{Precision, train_step};
use official::*;

/// The tests change the process-wide precision: one at a time, and only on the CPU (the GPU
/// path's bf16 is `parity.rs`'s).
fn on_cpu_alone() -> Option<std::sync::MutexGuard<'static, ()>> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    (test_device() == burn::tensor::Device::flex()).then_some(guard)
}

/// The fixture ViT's forward (backbone and head, on the first iteration's crops) in bf16 against
/// f32: the relative error stays near bf16's rounding (2^-9 = 2e-3 per operand), far from f32's.
/// Measured: backbone 2.7e-3, head 4.4e-3 (its last layer's product in bf16 too); on AMX 2.7e-3
/// and 4.7e-3.
#[test]
fn a_bf16_forward_stays_near_the_f32_one() {
    let Some(_alone) = on_cpu_alone() else { return };
    let run = OfficialRun::vit();
    let device = test_device();
    let model = (run.model)(&run.steps, "init.", &device);
    let crop: Tensor<4> = tensor(&run.steps["iter0.crop0"], &device);
    let forward = |precision| {
        set_matmul_precision(precision);
        let features = model.backbone.forward(crop.clone());
        let out = model.head.forward(features.clone());
        (features.into_data(), out.into_data())
    };
    let (f32_features, f32_out) = forward(MatmulPrecision::F32);
    let (bf16_features, bf16_out) = forward(MatmulPrecision::Bf16);
    set_matmul_precision(MatmulPrecision::F32);
    let err = |a: &burn::tensor::TensorData, b: &burn::tensor::TensorData| rel_err_vec(&to_f64(a), &to_f64(b));
    let (features_err, out_err) = (err(&bf16_features, &f32_features), err(&bf16_out, &f32_out));
    println!("bf16 against f32: backbone {features_err:.1e}, head {out_err:.1e}");
    assert!(features_err < 2e-2 && out_err < 2e-2, "backbone {features_err:e}, head {out_err:e}");
    assert!(features_err > 1e-5, "the products did not run in bf16 ({features_err:e})");
}

/// The official fixture's four training iterations with bf16 products: loss, gradient norms and
/// center within 6e-2 of the official f32 run, the model's change since the initial weights
/// within 8e-2 (about twice the measured errors). Measured on flex (the same bits on the
/// AVX-512 BF16 and portable kernels): loss 1.3e-2, gradient norms 3.0e-2, center 3.8e-3,
/// change 3.7e-2, with the head's last layer in bf16 as well (before it was: 1.1e-2, 1.1e-2,
/// 3.1e-3, 2.7e-2); on AMX (its own order of sums): 1.4e-2, 2.5e-2, 4.0e-3, 3.7e-2; the GPU
/// path's bf16 (every op in bf16) gives 2.5e-2, 5.6e-2, 4.3e-3 and 4.5e-2.
#[test]
fn bf16_iterations_stay_near_the_official_f32_ones() {
    let Some(_alone) = on_cpu_alone() else { return };
    let step_precision = dino_train::precision::use_precision(Precision::Bf16, &test_device()).unwrap();
    assert_eq!(step_precision, Precision::F32, "on the CPU the step stays f32 around bf16 products");
    assert_eq!(dino_kernels::matmul_precision(), MatmulPrecision::Bf16);
    let tol = Tolerances { forward: 6e-2, params: None, update: 8e-2 };
    fixture_iterations(OfficialRun::vit(), tol, train_step);
    set_matmul_precision(MatmulPrecision::F32);
}
