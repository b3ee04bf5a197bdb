//! Step-exact parity with the official training loop: schedules, the DINO loss and its center,
//! and full training iterations from `train_steps.safetensors`, every setting read from the
//! fixture directory's `manifest.json`.

use std::collections::BTreeMap;

use burn::tensor::{DType, Device, Tensor, TensorData};
use dino_fixtures::*;
use dino_model::weights::{Weights, state_dict};
use dino_model::{BlockKind, DinoHeadConfig, DinoModel, ResNetConfig, Stem, VitConfig};
use dino_train::{
    DEFAULT_MIN_LR, DinoLoss, IterationParams, LossScaler, NonFinite, Optimizer, OptimizerKind, StepParams, StepReport,
    TrainState, cosine_schedule, teacher_temp_schedule, train_step, train_step_mixed,
};

const FORWARD_TOL: f64 = 1e-4;
const PARAM_TOL: f64 = 1e-3;

fn f64_of(key: &str) -> f64 {
    manifest()[key].as_f64().unwrap_or_else(|| panic!("manifest.json: config.{key} is not a number"))
}

fn pair(key: &str) -> (f64, f64) {
    let v = &manifest()[key];
    (v[0].as_f64().unwrap(), v[1].as_f64().unwrap())
}

struct Schedules {
    lr: Vec<f64>,
    wd: Vec<f64>,
    momentum: Vec<f64>,
    teacher_temp: Vec<f64>,
}

/// The schedules of the fixture run, computed by our code from the manifest. The manifest's
/// `lr` is the peak learning rate of the run (already batch-scaled).
fn schedules() -> Schedules {
    let (epochs, iters) = (manifest_usize("epochs"), manifest_usize("iters_per_epoch"));
    let (wd, wd_end) = pair("wd");
    Schedules {
        lr: cosine_schedule(f64_of("lr"), DEFAULT_MIN_LR, epochs, iters, manifest_usize("warmup_epochs"), 0.0),
        wd: cosine_schedule(wd, wd_end, epochs, iters, 0, 0.0),
        momentum: cosine_schedule(f64_of("momentum"), 1.0, epochs, iters, 0, 0.0),
        teacher_temp: teacher_temp_schedule(
            f64_of("warmup_tt"),
            f64_of("tt"),
            manifest_usize("warmup_tt_epochs"),
            epochs,
        ),
    }
}

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

/// `prefix` keys of `steps` (`init.backbone.*`, `init.head.*`) as [`Weights`].
fn weights_from(steps: &BTreeMap<String, TensorData>, prefix: &str) -> Weights {
    let mut weights = Weights {
        path: "train_steps.safetensors".into(),
        config: None,
        ignored: Vec::new(),
        backbone: Default::default(),
        head: Default::default(),
    };
    for (key, data) in steps.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k, v))) {
        if !data.dtype().is_float() {
            continue; // num_batches_tracked
        }
        if let Some(k) = key.strip_prefix("backbone.") {
            weights.backbone.insert(k.into(), data.clone());
        } else if let Some(k) = key.strip_prefix("head.") {
            weights.head.insert(k.into(), data.clone());
        }
    }
    weights
}

/// The ViT fixture's `prefix` keys as a model on `device`.
fn vit_model(steps: &BTreeMap<String, TensorData>, prefix: &str, device: &Device) -> DinoModel {
    let weights = weights_from(steps, prefix);
    let vit = VitConfig::new(manifest_usize("dim"), manifest_usize("depth"), manifest_usize("heads"))
        .with_patch_size(manifest_usize("patch"))
        .with_img_size(manifest_usize("img"));
    let head = DinoHeadConfig::new(manifest_usize("dim"), manifest_usize("out_dim"))
        .with_hidden_dim(manifest_usize("hidden"))
        .with_bottleneck_dim(manifest_usize("bottleneck"))
        .with_norm_last_layer(manifest()["norm_last_layer"].as_bool().unwrap());
    DinoModel {
        backbone: dino_model::Backbone::Vit(weights.vit(&vit, device).unwrap()),
        head: weights.dino_head(&head, device).unwrap(),
    }
}

/// The ResNet fixture's `prefix` keys as a model on `device`: the manifest's small ResNet and a
/// head with `use_bn_in_head`.
fn resnet_model(steps: &BTreeMap<String, TensorData>, prefix: &str, device: &Device) -> DinoModel {
    let train = &resnet_manifest()["train"];
    let n = |key: &str| train[key].as_u64().unwrap() as usize;
    let config = ResNetConfig::new(serde_json::from_value(train["layers"].clone()).unwrap(), BlockKind::Basic)
        .with_stem(if train["cifar"].as_bool().unwrap() { Stem::Cifar } else { Stem::ImageNet })
        .with_width(n("width"));
    assert_eq!(train["block"], "basic");
    let head = DinoHeadConfig::new(config.embed_dim(), n("out_dim"))
        .with_hidden_dim(n("hidden"))
        .with_bottleneck_dim(n("bottleneck"))
        .with_use_bn(train["use_bn_in_head"].as_bool().unwrap())
        .with_norm_last_layer(train["norm_last_layer"].as_bool().unwrap());
    let weights = weights_from(steps, prefix);
    DinoModel {
        backbone: dino_model::Backbone::ResNet(weights.resnet(&config, device).unwrap()),
        head: weights.dino_head(&head, device).unwrap(),
    }
}

/// The model's parameters under their official names.
fn named_params(model: &DinoModel, steps: &BTreeMap<String, TensorData>, prefix: &str) -> Vec<(String, TensorData)> {
    let mut ours =
        state_dict(&model.backbone).into_iter().map(|(k, v)| (format!("backbone.{k}"), v)).collect::<Vec<_>>();
    ours.extend(state_dict(&model.head).into_iter().map(|(k, v)| (format!("head.{k}"), v)));
    // Every float tensor: parameters and BatchNorm's running statistics.
    let theirs = steps.iter().filter(|(k, v)| k.starts_with(prefix) && v.dtype().is_float()).count();
    assert_eq!(ours.len(), theirs, "{prefix}: tensor count");
    ours
}

/// The error of the whole model's change since the initial weights: ‖ours − official‖ over
/// ‖official − initial‖, every parameter together. Per-tensor errors mislead in low precision:
/// Adam's first steps move each weight by about ±lr whatever its gradient's size, so a bias whose
/// gradients are near zero flips sign under rounding noise.
fn update_err(model: &DinoModel, steps: &BTreeMap<String, TensorData>, prefix: &str) -> f64 {
    let (mut diff, mut moved) = (0.0, 0.0);
    for (k, v) in named_params(model, steps, prefix) {
        let (official, init) = (to_f64(&steps[&format!("{prefix}{k}")]), to_f64(&steps[&format!("init.{k}")]));
        for ((o, i), x) in official.iter().zip(&init).zip(to_f64(&v)) {
            diff += (x - o) * (x - o);
            moved += (o - i) * (o - i);
        }
    }
    (diff / moved).sqrt()
}

/// Max over parameters of the relative error against the fixture's `prefix` keys, ‖ours −
/// official‖ / max(‖official‖, 1e-5). The floor keeps rounding noise from counting as an
/// error: a bias followed by BatchNorm starts at 0 and has zero gradient, so both runs move it by
/// float noise alone (~1e-10 in the ResNet fixture's head).
fn worst_param_err(model: &DinoModel, steps: &BTreeMap<String, TensorData>, prefix: &str) -> (f64, String) {
    named_params(model, steps, prefix)
        .iter()
        .map(|(k, v)| {
            let (ours, official) = (to_f64(v), to_f64(&steps[&format!("{prefix}{k}")]));
            let norm = official.iter().map(|x| x * x).sum::<f64>().sqrt();
            (rel_err_vec(&ours, &official) * norm / norm.max(1e-5), k.clone())
        })
        .fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a })
}

/// How far each iteration's results may be from the official f32 ones: loss, gradient norms
/// and center (`forward`), each parameter tensor (`params`, where checked) and the whole model's
/// change since the initial weights (`update`, [`update_err`]).
struct Tolerances {
    forward: f64,
    params: Option<f64>,
    update: f64,
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

/// A training run recorded from the official loop: its tensors, its networks and optimizer, and
/// each iteration's scheduled values.
struct OfficialRun {
    steps: BTreeMap<String, TensorData>,
    /// The networks under a prefix of `steps` (`init.`, `iterN.student.`).
    model: fn(&BTreeMap<String, TensorData>, &str, &Device) -> DinoModel,
    optimizer: OptimizerKind,
    out_dim: usize,
    ncrops: usize,
    iterations: Vec<IterationParams>,
}

impl OfficialRun {
    /// `fixtures/dino-reference`: a ViT trained with AdamW, every setting from its manifest.
    fn vit() -> Self {
        let steps = read_fixture("train_steps.safetensors");
        let s = schedules();
        let iters_per_epoch = manifest_usize("iters_per_epoch");
        let count = (0..).take_while(|i| steps.contains_key(&format!("iter{i}.loss"))).count();
        let iterations = (0..count)
            .map(|it| {
                let epoch = it / iters_per_epoch;
                IterationParams {
                    step: StepParams {
                        lr: s.lr[it],
                        weight_decay: s.wd[it],
                        clip_grad: f64_of("clip"),
                        freeze_last_layer: epoch < manifest_usize("freeze_last_layer"),
                    },
                    momentum: s.momentum[it],
                    teacher_temp: s.teacher_temp[epoch],
                }
            })
            .collect();
        OfficialRun {
            steps,
            model: vit_model,
            optimizer: OptimizerKind::Adamw,
            out_dim: manifest_usize("out_dim"),
            ncrops: 2 + manifest_usize("ncrops_local"),
            iterations,
        }
    }

    /// `fixtures/resnet-reference`: a small ResNet with a BatchNorm head, trained with SGD as the
    /// official RN50 recipe is. Our schedules must give the values the official loop recorded.
    fn resnet() -> Self {
        let steps = read_resnet_fixture("train_steps.safetensors");
        let train = &resnet_manifest()["train"];
        let (f, n) = (|key: &str| train[key].as_f64().unwrap(), |key: &str| train[key].as_u64().unwrap() as usize);
        let (epochs, iters_per_epoch) = (n("epochs"), n("iters_per_epoch"));
        let lr = cosine_schedule(f("lr"), f("min_lr"), epochs, iters_per_epoch, n("warmup_epochs"), 0.0);
        let momentum = cosine_schedule(f("momentum"), 1.0, epochs, iters_per_epoch, 0, 0.0);
        let teacher_temp = teacher_temp_schedule(f("warmup_tt"), f("tt"), n("warmup_tt_epochs"), epochs);
        let count = (0..).take_while(|i| steps.contains_key(&format!("iter{i}.loss"))).count();
        let iterations = (0..count)
            .map(|it| {
                let epoch = it / iters_per_epoch;
                let params = IterationParams {
                    step: StepParams {
                        lr: lr[it],
                        weight_decay: f("wd"),
                        clip_grad: f("clip"),
                        freeze_last_layer: epoch < n("freeze_last_layer"),
                    },
                    momentum: momentum[it],
                    teacher_temp: teacher_temp[epoch],
                };
                let recorded = |key: &str| to_f64(&steps[&format!("iter{it}.{key}")])[0];
                for (key, ours) in [
                    ("lr", params.step.lr),
                    ("wd", params.step.weight_decay),
                    ("momentum", params.momentum),
                    ("teacher_temp", params.teacher_temp),
                ] {
                    assert!((ours - recorded(key)).abs() <= 1e-12 * recorded(key).abs(), "iter {it}: {key} {ours}");
                }
                params
            })
            .collect();
        OfficialRun {
            steps,
            model: resnet_model,
            optimizer: OptimizerKind::Sgd,
            out_dim: n("out_dim"),
            ncrops: 2 + n("ncrops_local"),
            iterations,
        }
    }
}

/// The run's iterations through `step`, each compared with the official results: loss, gradient
/// norms, center, and every parameter and BatchNorm running statistic of student and teacher.
fn fixture_iterations(
    run: OfficialRun,
    tol: Tolerances,
    mut step: impl FnMut(TrainState, &[Tensor<4>], &IterationParams) -> Result<(TrainState, StepReport), NonFinite>,
) {
    let steps = &run.steps;
    let device = test_device();
    let mut state = TrainState {
        student: (run.model)(steps, "init.", &device.clone().autodiff()),
        teacher: (run.model)(steps, "init.", &device),
        loss: DinoLoss::new(run.out_dim, run.ncrops, &device),
        optimizer: Optimizer::new(run.optimizer),
    }
    .train_mode();
    assert!(run.iterations.len() >= 2, "the fixture holds several iterations");
    for (it, params) in run.iterations.iter().enumerate() {
        let crops: Vec<Tensor<4>> =
            (0..run.ncrops).map(|c| tensor(&steps[&format!("iter{it}.crop{c}")], &device)).collect();
        let (next, report) = step(state, &crops, params).unwrap();
        state = next;

        let loss_err = rel_err_vec(&[report.loss], &to_f64(&steps[&format!("iter{it}.loss")]));
        let norms_err = rel_err_vec(&report.grad_norms, &to_f64(&steps[&format!("iter{it}.grad_norms_before_clip")]));
        let center_err = rel_err(state.loss.center.clone(), &steps[&format!("iter{it}.center_after")]);
        let (student_err, worst_s) = worst_param_err(&state.student, steps, &format!("iter{it}.student."));
        let (teacher_err, worst_t) = worst_param_err(&state.teacher, steps, &format!("iter{it}.teacher."));
        let student_update = update_err(&state.student, steps, &format!("iter{it}.student."));
        let teacher_update = update_err(&state.teacher, steps, &format!("iter{it}.teacher."));
        println!(
            "iter {it}: loss {loss_err:.1e}, grad norms {norms_err:.1e}, center {center_err:.1e}, \
             student {student_err:.1e} ({worst_s}), teacher {teacher_err:.1e} ({worst_t}), \
             updates: student {student_update:.1e}, teacher {teacher_update:.1e}"
        );
        assert!(loss_err < tol.forward, "iter {it}: loss rel err {loss_err:e}");
        assert!(norms_err < tol.forward, "iter {it}: grad norms rel err {norms_err:e}");
        assert!(center_err < tol.forward, "iter {it}: center rel err {center_err:e}");
        if let Some(params) = tol.params {
            assert!(student_err < params, "iter {it}: student {worst_s} rel err {student_err:e}");
            assert!(teacher_err < params, "iter {it}: teacher {worst_t} rel err {teacher_err:e}");
        }
        if params.step.lr > 0.0 {
            // At lr 0 (a warm-up's first iteration) nothing moves: the teacher's EMA is of an
            // unchanged student.
            assert!(student_update < tol.update, "iter {it}: student update rel err {student_update:e}");
            assert!(teacher_update < tol.update, "iter {it}: teacher update rel err {teacher_update:e}");
        }
    }
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
