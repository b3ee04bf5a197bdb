//! Step-exact parity with the official training loop: schedules, the DINO loss and its center,
//! and full training iterations from `train_steps.safetensors`, every setting read from the
//! fixture directory's `manifest.json`.

mod official;

use burn::tensor::{DType, Tensor};
use dino_fixtures::*;
use dino_train::{
    DEFAULT_MIN_LR, DinoLoss, IterationParams, LossScaler, Optimizer, OptimizerKind, StepParams, TrainState,
    cosine_schedule, train_step, train_step_mixed,
};
use official::*;

#[test]
fn schedules_match_the_official_cosine_scheduler() {
    let reference = read_fixture("schedules.safetensors");
    let ours = schedules();
    for (name, values) in [("lr", &ours.lr), ("wd", &ours.wd), ("momentum", &ours.momentum)] {
        let err = rel_err_vec(values, &to_f64(&reference[name]));
        println!("schedule {name}: rel err {err:.1e}");
        assert!(err < 1e-12, "{name}: {err:e}");
    }
    // The long schedule is the official default run: lr 5e-4 x 64 / 256, 100 epochs, 10 warmup.
    let long = to_f64(&reference["lr_long"]);
    let iters = long.len() / 100;
    let ours = cosine_schedule(0.0005 * 64.0 / 256.0, DEFAULT_MIN_LR, 100, iters, 10, 0.0);
    assert!(rel_err_vec(&ours, &long) < 1e-12);
}

#[test]
fn loss_and_center_match_the_official_dino_loss() {
    let io = read_fixture("loss_io.safetensors");
    let device = test_device();
    let temps = to_f64(&io["teacher_temp_schedule"]);
    assert_eq!(temps, schedules().teacher_temp, "the fixture's schedule is the manifest's");
    let student: Tensor<2> = tensor(&io["student_output"], &device);
    let teacher: Tensor<2> = tensor(&io["teacher_output"], &device);
    let [rows, k] = student.dims();
    let ncrops = rows / (teacher.dims()[0] / 2);
    for (epoch, temp) in temps.iter().enumerate() {
        let mut loss = DinoLoss::new(k, ncrops, &device);
        loss.center = tensor(&io["center_before"], &device);
        let value = loss.forward(student.clone(), teacher.clone(), *temp);
        let err = rel_err(value, &io[&format!("epoch{epoch}.loss")]);
        println!("epoch {epoch}: loss rel err {err:.1e}");
        assert!(err < FORWARD_TOL, "epoch {epoch}: loss rel err {err:e}");
        loss.update_center(teacher.clone());
        let err = rel_err(loss.center, &io[&format!("epoch{epoch}.center_after")]);
        assert!(err < FORWARD_TOL, "epoch {epoch}: center rel err {err:e}");
    }
}

#[test]
fn training_iterations_match_the_official_loop() {
    let tol = Tolerances { forward: FORWARD_TOL, params: Some(PARAM_TOL), update: PARAM_TOL };
    fixture_iterations(OfficialRun::vit(), tol, train_step);
}

/// A ResNet with BatchNorm in backbone and head, SGD: both networks in train mode (batch
/// statistics, each its own running buffers), the EMA over parameters only.
///
/// On a GPU the gradients are looser: the fixture's batch statistics cover few values (layer4
/// sees 4x4 and 2x2 maps of 4 images), so the backward through them divides rounding by small
/// variances, and the GPU sums in another order.
/// Measured on lavapipe (wgpu), two iterations: gradient norms 1.3e-4 and 3.1e-5, the worst
/// tensor 7.8e-4 and 8.7e-4 (BatchNorm biases a step or two from zero), the updates 5.1e-7 and
/// 3.9e-7.
#[test]
fn resnet_training_iterations_match_the_official_loop() {
    let on_gpu = std::env::var("DINO_TEST_DEVICE").is_ok_and(|d| d != "cpu");
    let tol = match on_gpu {
        false => Tolerances { forward: FORWARD_TOL, params: Some(PARAM_TOL), update: PARAM_TOL },
        true => Tolerances { forward: 1e-3, params: Some(5e-3), update: PARAM_TOL },
    };
    fixture_iterations(OfficialRun::resnet(), tol, train_step);
}

/// f16 (10-bit mantissa) forward and backward passes on f32 master weights, loss scaled: loss,
/// gradient norms and center within 1e-2 of the official f32 run, the model's change within 3e-2
/// (measured on flex: 1.1e-3, 3.0e-3, 6.3e-4 and 1.0e-2). The fixture's tiny network has
/// gradient norms up to 23, which overflow f16 at GradScaler's initial 2^16 (the first steps of
/// a real run are skipped so until the scale fits); the test starts at 2^8 to compare every step.
#[test]
fn f16_mixed_precision_iterations_stay_near_the_official_f32_ones() {
    let mut scaler = LossScaler { scale: 256.0, good_steps: 0 };
    let tol = Tolerances { forward: 1e-2, params: None, update: 3e-2 };
    fixture_iterations(OfficialRun::vit(), tol, |state, crops, params| {
        train_step_mixed(state, crops, params, DType::F16, Some(&mut scaler))
    });
    assert_eq!(scaler, LossScaler { scale: 256.0, good_steps: 4 }, "no step skipped");
}

/// bf16 (8-bit mantissa), no loss scaling: loss, norms and center within 1e-1, the model's
/// change within 1e-1 (measured on flex: 2.5e-2, 5.6e-2, 4.3e-3 and 4.5e-2).
#[test]
fn bf16_mixed_precision_iterations_stay_near_the_official_f32_ones() {
    let device = test_device();
    if !device.supports_dtype(DType::BF16) {
        // WGSL has no bf16: `dino train` and `dino bench` refuse `--precision bf16` there.
        let refused = dino_train::precision::check_support(dino_train::Precision::Bf16, &device).unwrap_err();
        assert!(refused.contains("use f16"), "{refused}");
        return;
    }
    let tol = Tolerances { forward: 1e-1, params: None, update: 1e-1 };
    fixture_iterations(OfficialRun::vit(), tol, |state, crops, params| {
        train_step_mixed(state, crops, params, DType::BF16, None)
    });
}

/// A loss scale so large that the f16 gradients overflow: the step is skipped (student and
/// optimizer untouched), the scale halves, and the EMA and the center still update.
#[test]
fn an_f16_overflow_skips_the_step_and_halves_the_scale() {
    let steps = read_fixture("train_steps.safetensors");
    let device = test_device();
    let student = vit_model(&steps, "init.", &device.clone().autodiff());
    let before = worst_param_err(&student, &steps, "init.").0;
    assert!(before < 1e-7);
    let state = TrainState {
        student,
        teacher: vit_model(&steps, "init.", &device),
        loss: DinoLoss::new(manifest_usize("out_dim"), 2 + manifest_usize("ncrops_local"), &device),
        optimizer: Optimizer::new(OptimizerKind::Adamw),
    };
    let crops: Vec<Tensor<4>> =
        (0..2 + manifest_usize("ncrops_local")).map(|c| tensor(&steps[&format!("iter0.crop{c}")], &device)).collect();
    let params = IterationParams {
        step: StepParams { lr: 1e-3, weight_decay: 0.04, clip_grad: 3.0, freeze_last_layer: false },
        momentum: 0.996,
        teacher_temp: 0.04,
    };
    let mut scaler = LossScaler { scale: 1e30, good_steps: 7 };
    let (state, report) = train_step_mixed(state, &crops, &params, DType::F16, Some(&mut scaler)).unwrap();
    assert!(report.skipped && report.grad_norms.iter().any(|n| !n.is_finite()));
    assert_eq!(scaler, LossScaler { scale: 5e29, good_steps: 0 });
    let (student_err, worst) = worst_param_err(&state.student, &steps, "init.");
    assert!(student_err < 1e-7, "the skipped step changed {worst}: {student_err:e}");
    assert!(state.optimizer.export(&state.student).is_empty(), "no optimizer state from a skipped step");
    assert!(state.loss.center.abs().sum().into_scalar::<f64>() > 0.0, "the center still updates");
}

#[test]
fn official_checkpoint_restores_networks_center_and_optimizer() {
    use dino_data::MultiCropConfig;
    use dino_train::TrainConfig;
    use dino_train::checkpoint::load_official_checkpoint;

    let config = TrainConfig {
        arch: "vit_tiny".into(),
        embed_dim: manifest_usize("dim"),
        num_heads: manifest_usize("heads"),
        depth: manifest_usize("depth"),
        patch_size: manifest_usize("patch"),
        img_size: manifest_usize("img"),
        out_dim: manifest_usize("out_dim"),
        head_hidden_dim: manifest_usize("hidden"),
        head_bottleneck_dim: manifest_usize("bottleneck"),
        norm_last_layer: manifest()["norm_last_layer"].as_bool().unwrap(),
        drop_path_rate: 0.0,
        crops: MultiCropConfig {
            global_size: manifest_usize("img") as u32,
            local_size: manifest_usize("local") as u32,
            local_crops: manifest_usize("ncrops_local"),
            ..MultiCropConfig::default()
        },
        ..TrainConfig::default()
    };
    let device = test_device();
    let path = fixture_dir().join("checkpoint.pth");
    let restored = load_official_checkpoint(&path, &config, &device, &device.clone().autodiff()).unwrap();
    assert_eq!(restored.position.epoch, manifest_usize("epochs"));
    assert_eq!(restored.ignored[0].to_string(), "args (argparse.Namespace)");
    // Another network than the checkpoint's is refused by name, before anything is restored.
    let refused = |other: TrainConfig| {
        let e = load_official_checkpoint(&path, &other, &device, &device.clone().autodiff()).err().unwrap().to_string();
        assert!(e.starts_with(&format!("{}: holds ", path.display())) && e.lines().count() == 1, "{e}");
        e
    };
    let e = refused(TrainConfig { out_dim: 2 * config.out_dim, ..config.clone() });
    assert!(
        e.contains(&format!("out_dim {} (", config.out_dim))
            && e.contains(&format!("out_dim {} (", 2 * config.out_dim))
    );
    let e = refused(TrainConfig { depth: config.depth + 1, ..config.clone() });
    assert!(
        e.contains(&format!("{} blocks", config.depth)) && e.contains(&format!("{} blocks", config.depth + 1)),
        "{e}"
    );

    let steps = read_fixture("train_steps.safetensors");
    let last = (0..).take_while(|i| steps.contains_key(&format!("iter{i}.loss"))).count() - 1;
    let center_err = rel_err(restored.state.loss.center.clone(), &steps[&format!("iter{last}.center_after")]);
    assert!(center_err < 1e-6, "center {center_err:e}");
    let (student_err, worst) = worst_param_err(&restored.state.student, &steps, &format!("iter{last}.student."));
    assert!(student_err < 1e-6, "{worst}: {student_err:e}");

    // Every trainable parameter has AdamW state; the last layer's started one epoch late.
    let saved = restored.state.optimizer.export(&restored.state.student);
    let trainable = steps.keys().filter(|k| k.starts_with("iter0.student.")).count() - 1; // weight_g is frozen
    assert_eq!(saved.len(), trainable);
    let iterations = (last + 1) as i32;
    let frozen = (manifest_usize("freeze_last_layer") * manifest_usize("iters_per_epoch")) as i32;
    let mut step_counts: Vec<i32> = saved.iter().map(|s| s.step).collect();
    step_counts.sort();
    step_counts.dedup();
    assert_eq!(step_counts, vec![iterations - frozen, iterations], "AdamW step counts");
    assert!(saved.iter().all(|s| s.v.is_some()));
}
