//! ResNet parity with torchvision: forward in eval and train mode, BatchNorm's running-statistics
//! update, and the key -> shape maps of resnet18/34/50, from `fixtures/resnet-reference/`
//! (`scripts/make_resnet_fixtures.py`; `$DINO_RESNET_REFERENCE_DIR` overrides the directory).

use burn::tensor::Tensor;
use dino_fixtures::{
    read_resnet_fixture, rel_err, resnet_fixture_dir as dir, resnet_manifest as manifest, tensor, test_device,
};
use dino_model::batch_norm::train_mode;
use dino_model::weights::{CheckpointKey, Weights, official_shapes, save_backbone, state_dict};
use dino_model::{Backbone, BackboneConfig, ResNet, ResNetConfig};

const TOL: f64 = 1e-4;

#[test]
fn forward_and_running_statistics_match_torchvision() {
    let device = test_device();
    for (name, net) in manifest()["nets"].as_object().unwrap() {
        for file in [format!("{name}.safetensors"), format!("{name}.pth")] {
            let path = dir().join(&file);
            if !path.is_file() {
                continue;
            }
            let weights = Weights::read(&path, CheckpointKey::Teacher).unwrap();
            let BackboneConfig::ResNet(config) = weights.backbone_config(None).unwrap() else {
                panic!("{file}: not read as a ResNet");
            };
            let layers: Vec<usize> = serde_json::from_value(net["layers"].clone()).unwrap();
            assert_eq!(config.layers.to_vec(), layers, "{file}");
            assert_eq!(config.width, net["width"].as_u64().unwrap() as usize, "{file}");
            let io = read_resnet_fixture(&format!("{name}_io.safetensors"));
            for i in 0.. {
                let Some(x) = io.get(&format!("x{i}")) else { break };
                let x: Tensor<4> = tensor(x, &device);
                let eval = weights.resnet(&config, &device).unwrap();
                let err = rel_err(eval.forward(x.clone()), &io[&format!("x{i}.eval")]);
                println!("{file} x{i}: eval-mode rel err {err:.1e}");
                assert!(err < TOL, "{file} x{i} eval: {err:e}");

                let train: ResNet = train_mode(weights.resnet(&config, &device).unwrap());
                let err = rel_err(train.forward(x), &io[&format!("x{i}.train")]);
                println!("{file} x{i}: train-mode rel err {err:.1e}");
                assert!(err < TOL, "{file} x{i} train: {err:e}");
                let mut compared = 0;
                for (key, ours) in state_dict(&train) {
                    if let Some(reference) = io.get(&format!("x{i}.after_train.{key}")) {
                        let err = dino_fixtures::rel_err_vec(
                            &dino_fixtures::to_f64(&ours),
                            &dino_fixtures::to_f64(reference),
                        );
                        assert!(err < TOL, "{file} x{i} {key} after a train-mode forward: {err:e}");
                        compared += 1;
                    }
                }
                assert!(compared > 0 && compared % 2 == 0, "{file}: running_mean and running_var of every BatchNorm");
            }
        }
    }
}

/// What `dino` exports for each architecture is torchvision's state_dict without `fc`, key for
/// key and shape for shape, `num_batches_tracked` included: what `load_state_dict(strict=True)`
/// checks once `fc` is `nn.Identity()` (scripts/check_torchvision_load.py does that load).
#[test]
fn resnet_exports_have_torchvision_s_keys_and_shapes() {
    let text = std::fs::read_to_string(dir().join("resnet_shapes.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let out = tempfile::tempdir().unwrap();
    for arch in ["resnet18", "resnet34", "resnet50"] {
        let config = BackboneConfig::preset(arch, 16).unwrap();
        let path = out.path().join(format!("{arch}.safetensors"));
        save_backbone(&Backbone::new(&config, &test_device()), &config, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let ours: std::collections::BTreeMap<String, Vec<usize>> =
            file.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect();
        let theirs: std::collections::BTreeMap<String, Vec<usize>> = reference[arch]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::from_value(v.clone()).unwrap()))
            .collect();
        assert_eq!(ours, theirs, "{arch}");
        // The in-memory map the loaders use agrees too (float tensors only).
        let floats = official_shapes(&ResNet::new(&ResNetConfig::preset(arch).unwrap(), &test_device()));
        assert!(floats.len() < ours.len() && floats.iter().all(|(k, v)| ours.get(k) == Some(v)), "{arch}");
    }
}

/// main_dino.py's own checkpoint of a ResNet run (DDP's `module.` prefix on both networks, the
/// optimizer, the center, a pickled `args` Namespace) reads as either network, each equal to
/// the official loop's state after its last iteration, running statistics included.
#[test]
fn an_official_resnet_checkpoint_reads_as_student_or_teacher() {
    let path = dir().join("checkpoint.pth");
    let steps = read_resnet_fixture("train_steps.safetensors");
    let train = &manifest()["train"];
    let last = train["epochs"].as_u64().unwrap() * train["iters_per_epoch"].as_u64().unwrap() - 1;
    let ignored = dino_model::weights::ignored_objects(&path).unwrap();
    assert!(ignored.iter().any(|o| o.to_string().contains("args")), "{ignored:?}");
    for (key, name) in [(CheckpointKey::Teacher, "teacher"), (CheckpointKey::Student, "student")] {
        let weights = Weights::read(&path, key).unwrap();
        let BackboneConfig::ResNet(config) = weights.backbone_config(None).unwrap() else {
            panic!("{name}: not read as a ResNet");
        };
        let net = weights.resnet(&config, &test_device()).unwrap();
        let tensors = state_dict(&net);
        assert!(tensors.len() > 30, "{name}: {} tensors", tensors.len());
        for (k, ours) in tensors {
            let reference = &steps[&format!("iter{last}.{name}.backbone.{k}")];
            let err = dino_fixtures::rel_err_vec(&dino_fixtures::to_f64(&ours), &dino_fixtures::to_f64(reference));
            assert!(err < 1e-6, "{name} {k}: {err:e}");
        }
    }
}
