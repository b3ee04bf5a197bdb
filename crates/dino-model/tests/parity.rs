//! Parity with the official implementation: every forward output in the reference fixtures,
//! the official key names and shapes, and loading every official file layout.

use burn::tensor::{Device, Tensor};
use dino_fixtures::*;
use dino_model::weights::{CheckpointKey, Weights, official_shapes, save_model, state_dict};
use dino_model::{BackboneConfig, DinoHead, DinoHeadConfig, DinoModel, ModelConfig, VitConfig};

const FORWARD_TOL: f64 = 1e-4;

/// `DINO_TEST_DEVICE` (cpu by default): the same checks run on a GPU backend.
fn device() -> Device {
    test_device()
}

/// The fixture backbone, read from `file` with the head count from the manifest.
fn fixture_backbone(file: &str) -> (VitConfig, dino_model::VisionTransformer) {
    let weights = Weights::read(&fixture_dir().join(file), CheckpointKey::Teacher).unwrap();
    let config = weights.vit_config(Some(manifest_usize("heads"))).unwrap();
    let vit = weights.vit(&config, &device()).unwrap();
    (config, vit)
}

#[test]
fn inferred_config_matches_the_manifest() {
    let (config, _) = fixture_backbone("vit_backbone.safetensors");
    assert_eq!(config.embed_dim, manifest_usize("dim"));
    assert_eq!(config.depth, manifest_usize("depth"));
    assert_eq!(config.patch_size, manifest_usize("patch"));
    assert_eq!(config.img_size, manifest_usize("img"));
    assert!(config.qkv_bias);
}

#[test]
fn vit_forward_outputs_match_the_reference() {
    let (_, vit) = fixture_backbone("vit_backbone.safetensors");
    let io = read_fixture("vit_io.safetensors");
    let inputs: Vec<&String> = io.keys().filter(|k| !k.contains('.')).collect();
    assert!(inputs.len() >= 3, "vit_io.safetensors should hold several inputs");
    for name in inputs {
        let x: Tensor<4> = tensor(&io[name], &device());
        let err = rel_err(vit.forward(x.clone()), &io[&format!("{name}.cls")]);
        println!("{name}: CLS rel err {err:.2e}");
        assert!(err < FORWARD_TOL, "{name}: CLS rel err {err:e}");
        let err = rel_err(vit.last_self_attention(x.clone()), &io[&format!("{name}.last_selfattention")]);
        println!("{name}: attention rel err {err:.2e}");
        assert!(err < FORWARD_TOL, "{name}: attention rel err {err:e}");
        // The CLS row alone (what `dino attention` draws) is the same row of the full weights.
        let reference: Tensor<4> = tensor(&io[&format!("{name}.last_selfattention")], &device());
        let [b, heads, tokens, _] = reference.dims();
        let row = reference.narrow(2, 0, 1).reshape([b, heads, tokens]);
        let err = rel_err(vit.last_cls_attention(x.clone()), &row.into_data());
        assert!(err < FORWARD_TOL, "{name}: CLS attention rel err {err:e}");
        let n = io.keys().filter(|k| k.starts_with(&format!("{name}.intermediate."))).count();
        let layers = vit.intermediate_layers(x, n);
        assert_eq!(layers.len(), n);
        for (i, layer) in layers.into_iter().enumerate() {
            let err = rel_err(layer, &io[&format!("{name}.intermediate.{i}")]);
            println!("{name}: intermediate {i} rel err {err:.2e}");
            assert!(err < FORWARD_TOL, "{name}: intermediate {i} rel err {err:e}");
        }
    }
}

#[test]
fn pth_and_safetensors_backbones_are_identical() {
    let from_pth = Weights::read(&fixture_dir().join("vit_backbone.pth"), CheckpointKey::Teacher).unwrap();
    let from_st = Weights::read(&fixture_dir().join("vit_backbone.safetensors"), CheckpointKey::Teacher).unwrap();
    assert_eq!(from_pth.backbone.keys().collect::<Vec<_>>(), from_st.backbone.keys().collect::<Vec<_>>());
    for (k, v) in &from_pth.backbone {
        assert_eq!(v, &from_st.backbone[k], "{k}");
    }
}

fn fixture_head_config() -> DinoHeadConfig {
    let m = manifest();
    DinoHeadConfig::new(manifest_usize("dim"), manifest_usize("out_dim"))
        .with_hidden_dim(manifest_usize("hidden"))
        .with_bottleneck_dim(manifest_usize("bottleneck"))
        .with_norm_last_layer(m["norm_last_layer"].as_bool().unwrap())
}

#[test]
fn head_forward_matches_the_reference() {
    let weights = Weights::read(&fixture_dir().join("head.safetensors"), CheckpointKey::Teacher).unwrap();
    let config = fixture_head_config();
    assert_eq!(weights.head_config().unwrap(), config, "head config read off the shapes");
    let head = weights.dino_head(&config, &device()).unwrap();
    let io = read_fixture("head_io.safetensors");
    let err = rel_err(head.forward(tensor(&io["input"], &device())), &io["output"]);
    println!("head rel err {err:.2e}");
    assert!(err < FORWARD_TOL, "head rel err {err:e}");
}

#[test]
fn multicrop_forward_groups_crops_like_the_official_wrapper() {
    let (vit_config, vit) = fixture_backbone("vit_backbone.safetensors");
    let head_weights = Weights::read(&fixture_dir().join("head.safetensors"), CheckpointKey::Teacher).unwrap();
    let head = head_weights.dino_head(&fixture_head_config(), &device()).unwrap();
    let io = read_fixture("vit_io.safetensors");
    let (g, l): (Tensor<4>, Tensor<4>) = (tensor(&io["x_global"], &device()), tensor(&io["x_local"], &device()));
    let crops = [g.clone(), g.clone(), l.clone()];
    let expected = head.forward(Tensor::cat(vec![vit.forward(g.clone()), vit.forward(g), vit.forward(l)], 0));
    let model = DinoModel { backbone: dino_model::Backbone::Vit(vit), head };
    let err = rel_err(model.forward_crops(&crops), &expected.into_data());
    assert!(err < 1e-6, "multi-crop rel err {err:e}");
    let _ = vit_config;
}

#[test]
fn full_checkpoint_loads_teacher_and_student() {
    let steps = read_fixture("train_steps.safetensors");
    let last = (0..).take_while(|i| steps.contains_key(&format!("iter{i}.loss"))).count() - 1;
    for key in [CheckpointKey::Teacher, CheckpointKey::Student] {
        let weights = Weights::read(&fixture_dir().join("checkpoint.pth"), key).unwrap();
        assert!(!weights.head.is_empty(), "the full checkpoint has a head");
        let prefix = format!("iter{last}.{}.", key.as_str());
        let mut compared = 0;
        for (name, expected) in steps.iter().filter_map(|(k, v)| k.strip_prefix(&prefix).map(|n| (n, v))) {
            let ours = match name.strip_prefix("head.") {
                Some(h) => &weights.head[h],
                None => &weights.backbone[name.strip_prefix("backbone.").unwrap()],
            };
            assert_eq!(rel_err_vec(&to_f64(ours), &to_f64(expected)), 0.0, "{key:?} {name}");
            compared += 1;
        }
        assert_eq!(compared, weights.backbone.len() + weights.head.len());
        // ... and they build the networks.
        let vit = weights.vit_config(Some(manifest_usize("heads"))).unwrap();
        weights.vit(&vit, &device()).unwrap();
        weights.dino_head(&weights.head_config().unwrap(), &device()).unwrap();
    }
}

#[test]
fn exported_keys_and_shapes_equal_the_official_ones() {
    let text = std::fs::read_to_string(fixture_dir().join("official_shapes.json")).unwrap();
    let official: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Vec<usize>>> =
        serde_json::from_str(&text).unwrap();
    assert!(official.len() >= 7);
    for (name, expected) in official {
        let ours = if let Some(dims) = name.strip_prefix("dino_head/") {
            let (i, o) = dims.split_once("->").unwrap();
            official_shapes(&DinoHead::new(&DinoHeadConfig::new(i.parse().unwrap(), o.parse().unwrap()), &device()))
        } else {
            let (arch, patch) = name.split_once('/').unwrap();
            let config = VitConfig::preset(arch, patch.parse().unwrap()).unwrap();
            official_shapes(&dino_model::VisionTransformer::new(&config, &device()))
        };
        assert_eq!(ours, expected, "{name}");
    }
}

#[test]
fn saved_models_reload_identically_with_their_config() {
    let vit = VitConfig::new(24, 2, 2).with_patch_size(4).with_img_size(16);
    for head in [
        DinoHeadConfig::new(24, 10).with_hidden_dim(16).with_bottleneck_dim(8),
        DinoHeadConfig::new(24, 10).with_nlayers(1).with_bottleneck_dim(8),
        DinoHeadConfig::new(24, 10).with_use_bn(true).with_hidden_dim(16).with_bottleneck_dim(8),
    ] {
        let config = ModelConfig::new(BackboneConfig::Vit(vit.clone())).with_head(Some(head.clone()));
        let model = DinoModel::new(&config, &device());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        save_model(&model, &config, &path).unwrap();
        let weights = Weights::read(&path, CheckpointKey::Teacher).unwrap();
        assert_eq!(weights.config.as_ref(), Some(&config));
        if head.nlayers == 1 {
            assert!(weights.head.contains_key("mlp.0.weight"), "read back under our index");
        }
        let back = weights.vit(&weights.vit_config(None).unwrap(), &device()).unwrap();
        let back_head = weights.dino_head(&weights.head_config().unwrap(), &device()).unwrap();
        assert_eq!(state_dict(&back), state_dict(&model.backbone));
        assert_eq!(state_dict(&back_head), state_dict(&model.head));
    }
}
