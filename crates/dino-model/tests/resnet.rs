//! ResNet parity with torchvision: forward in eval and train mode, BatchNorm's running-statistics
//! update, and the key -> shape maps of resnet18/34/50, from `fixtures/resnet-reference/`
//! (`scripts/make_resnet_fixtures.py`; `$DINO_RESNET_REFERENCE_DIR` overrides the directory).

use burn::tensor::Tensor;
use dino_fixtures::{
    read_resnet_fixture, rel_err, resnet_fixture_dir as dir, resnet_manifest as manifest, tensor, test_device,
};
use dino_model::batch_norm::train_mode;
use dino_model::weights::{CheckpointKey, Weights, official_shapes, state_dict};
use dino_model::{BackboneConfig, ResNet, ResNetConfig};

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

#[test]
fn resnet_keys_and_shapes_are_torchvision_s() {
    let text = std::fs::read_to_string(dir().join("resnet_shapes.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    for arch in ["resnet18", "resnet34", "resnet50"] {
        let ours = official_shapes(&ResNet::new(&ResNetConfig::preset(arch).unwrap(), &test_device()));
        let theirs: std::collections::BTreeMap<String, Vec<usize>> = reference[arch]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
            .map(|(k, v)| (k.clone(), serde_json::from_value(v.clone()).unwrap()))
            .collect();
        assert_eq!(ours, theirs, "{arch}");
    }
}
