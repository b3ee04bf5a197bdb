//! The official training runs of the fixtures and the harness that replays them through a
//! training step, comparing every iteration (shared by `parity.rs` and `bf16_cpu.rs`; each uses
//! part of it).
#![allow(dead_code)]

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor, TensorData};
use dino_fixtures::*;
use dino_model::weights::{Weights, state_dict};
use dino_model::{BlockKind, DinoHeadConfig, DinoModel, ResNetConfig, Stem, VitConfig};
use dino_train::{
    DEFAULT_MIN_LR, DinoLoss, IterationParams, NonFinite, Optimizer, OptimizerKind, StepParams, StepReport, TrainState,
    cosine_schedule, teacher_temp_schedule,
};

pub const FORWARD_TOL: f64 = 1e-4;
pub const PARAM_TOL: f64 = 1e-3;

pub fn f64_of(key: &str) -> f64 {
    manifest()[key].as_f64().unwrap_or_else(|| panic!("manifest.json: config.{key} is not a number"))
}

pub fn pair(key: &str) -> (f64, f64) {
    let v = &manifest()[key];
    (v[0].as_f64().unwrap(), v[1].as_f64().unwrap())
}

pub struct Schedules {
    pub lr: Vec<f64>,
    pub wd: Vec<f64>,
    pub momentum: Vec<f64>,
    pub teacher_temp: Vec<f64>,
}

/// The schedules of the fixture run, computed by our code from the manifest. The manifest's
/// `lr` is the peak learning rate of the run (already batch-scaled).
pub fn schedules() -> Schedules {
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

/// `prefix` keys of `steps` (`init.backbone.*`, `init.head.*`) as [`Weights`].
pub fn weights_from(steps: &BTreeMap<String, TensorData>, prefix: &str) -> Weights {
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
pub fn vit_model(steps: &BTreeMap<String, TensorData>, prefix: &str, device: &Device) -> DinoModel {
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
pub fn resnet_model(steps: &BTreeMap<String, TensorData>, prefix: &str, device: &Device) -> DinoModel {
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
pub fn named_params(
    model: &DinoModel,
    steps: &BTreeMap<String, TensorData>,
    prefix: &str,
) -> Vec<(String, TensorData)> {
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
pub fn update_err(model: &DinoModel, steps: &BTreeMap<String, TensorData>, prefix: &str) -> f64 {
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
pub fn worst_param_err(model: &DinoModel, steps: &BTreeMap<String, TensorData>, prefix: &str) -> (f64, String) {
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
pub struct Tolerances {
    pub forward: f64,
    pub params: Option<f64>,
    pub update: f64,
}

/// A training run recorded from the official loop: its tensors, its networks and optimizer, and
/// each iteration's scheduled values.
pub struct OfficialRun {
    pub steps: BTreeMap<String, TensorData>,
    /// The networks under a prefix of `steps` (`init.`, `iterN.student.`).
    pub model: fn(&BTreeMap<String, TensorData>, &str, &Device) -> DinoModel,
    pub optimizer: OptimizerKind,
    pub out_dim: usize,
    pub ncrops: usize,
    pub iterations: Vec<IterationParams>,
}

impl OfficialRun {
    /// `fixtures/dino-reference`: a ViT trained with AdamW, every setting from its manifest.
    pub fn vit() -> Self {
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
    pub fn resnet() -> Self {
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
pub fn fixture_iterations(
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
