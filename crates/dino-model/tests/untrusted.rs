//! Weights files nobody vouches for: pickles that run code when Python loads them, damaged
//! safetensors and PyTorch files, and files of another network. Reading never runs anything,
//! keeps the tensors, names what it left out, and fails with one line naming file and problem.

use std::path::Path;
use std::process::Command;

use burn::tensor::Device;
use dino_fixtures::fixture_dir;
use dino_fixtures::pth::{pth_tensors, write_malicious_pth, write_pth};
use dino_model::weights::{
    CheckpointKey, IgnoredObject, Weights, WeightsError, describe_ignored, save_backbone, save_model, state_dict,
};
use dino_model::{Backbone, BackboneConfig, DinoHeadConfig, DinoModel, ModelConfig, VisionTransformer, VitConfig};

fn tiny_vit() -> (VitConfig, VisionTransformer) {
    let config = VitConfig::new(16, 2, 2).with_patch_size(4).with_img_size(16);
    let vit = VisionTransformer::new(&config, &Device::flex());
    (config, vit)
}

fn read_err(path: &Path) -> String {
    match Weights::read(path, CheckpointKey::Teacher) {
        Ok(_) => panic!("{} must not load", path.display()),
        Err(e) => one_line(e),
    }
}

fn one_line(e: WeightsError) -> String {
    let e = e.to_string();
    assert_eq!(e.lines().count(), 1, "one line expected: {e}");
    e
}

/// Python's own unpickler, with `torch` stubbed out, on the file's pickle: the positive
/// control that the payloads are real and would run under `torch.load(weights_only=False)`.
const PYTHON_LOADS_IT: &str = r#"
import io, pickle, subprocess, sys, types, zipfile
torch = types.ModuleType("torch"); utils = types.ModuleType("torch._utils")
torch.FloatStorage = object
utils._rebuild_tensor_v2 = lambda *args: "tensor"
torch._utils = utils
sys.modules.update({"torch": torch, "torch._utils": utils})
class Payload: pass
class Unpickler(pickle.Unpickler):
    def persistent_load(self, pid): return "storage"
archive = zipfile.ZipFile(sys.argv[1])
loaded = Unpickler(io.BytesIO(archive.read("archive/data.pkl"))).load()
for value in loaded.values():
    if isinstance(value, subprocess.Popen): value.wait()
"#;

#[test]
fn a_malicious_pickle_runs_nothing_and_its_objects_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (config, vit) = tiny_vit();
    let tensors = state_dict(&vit);
    let path = dir.path().join("evil.pth");
    let payloads = write_malicious_pth(&path, &pth_tensors(&tensors), dir.path()).unwrap();
    let markers: Vec<_> = payloads.iter().filter_map(|p| p.marker.clone()).collect();
    assert_eq!(markers.len(), 6, "six calls that would create a file");

    let weights = Weights::read(&path, CheckpointKey::Teacher).unwrap();
    for marker in &markers {
        assert!(!marker.exists(), "{} was created: the pickle ran", marker.display());
    }
    // The tensors load, bit for bit, and build the network; plain data beside them is no tensor.
    assert_eq!(weights.backbone.len(), tensors.len());
    for (name, expected) in &tensors {
        assert_eq!(weights.backbone[name], *expected, "{name}");
    }
    assert!(weights.head.is_empty());
    let inferred = weights.vit_config(Some(config.num_heads)).unwrap();
    let loaded = weights.vit(&inferred, &Device::flex()).unwrap();
    assert_eq!(state_dict(&loaded), tensors);
    // Every planted object is named, with its key and Python type, and nothing else is.
    let mut expected: Vec<IgnoredObject> =
        payloads.iter().map(|p| IgnoredObject { key: p.key.clone(), python_type: p.python_type.clone() }).collect();
    expected.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(weights.ignored, expected);
    let warning = describe_ignored(&weights.ignored);
    assert!(
        warning.starts_with("ignored 9 Python objects, none of them run: args (argparse.Namespace), "),
        "{warning}"
    );
    assert!(warning.contains("evil (posix.system)") && warning.contains("hooks.on_load (posix.system)"), "{warning}");
    assert!(warning.contains("evil_popen (subprocess.Popen)") && warning.contains("payload (__main__.Payload)"));

    // Positive control: Python does run them. Skipped (with a note) where there is no python3.
    match Command::new("python3").arg("-c").arg(PYTHON_LOADS_IT).arg(&path).output() {
        Ok(out) => {
            assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
            for marker in &markers {
                assert!(marker.exists(), "Python's unpickler should have created {}", marker.display());
            }
        }
        Err(e) => eprintln!("note: no python3 ({e}); the payloads were not run as a control"),
    }
}

#[test]
fn the_official_checkpoint_loads_and_its_args_namespace_is_named() {
    let weights = Weights::read(&fixture_dir().join("checkpoint.pth"), CheckpointKey::Teacher).unwrap();
    // main_dino.py pickles its argparse Namespace, and the schedules' numpy scalars land in the
    // optimizer's param_groups.
    let object = |key: &str, python_type: &str| IgnoredObject { key: key.into(), python_type: python_type.into() };
    let scalar = "numpy._core.multiarray.scalar";
    assert_eq!(
        weights.ignored,
        vec![
            object("args", "argparse.Namespace"),
            object("optimizer.param_groups.0.lr", scalar),
            object("optimizer.param_groups.0.weight_decay", scalar),
            object("optimizer.param_groups.1.lr", scalar),
        ]
    );
    let vit = weights.vit_config(Some(dino_fixtures::manifest_usize("heads"))).unwrap();
    weights.vit(&vit, &Device::flex()).unwrap();
    weights.dino_head(&weights.head_config().unwrap(), &Device::flex()).unwrap();
    // Released backbones are bare state_dicts: nothing to name.
    let hub = Weights::read(&fixture_dir().join("vit_backbone.pth"), CheckpointKey::Teacher).unwrap();
    assert!(hub.ignored.is_empty(), "{:?}", hub.ignored);
}

#[test]
fn damaged_files_fail_with_one_line_naming_file_and_damage() {
    let dir = tempfile::tempdir().unwrap();
    let (config, vit) = tiny_vit();
    let st = dir.path().join("good.safetensors");
    save_backbone(&Backbone::Vit(vit.clone()), &BackboneConfig::Vit(config), &st).unwrap();
    let pth = dir.path().join("good.pth");
    write_pth(&pth, &pth_tensors(&state_dict(&vit))).unwrap();
    let st_bytes = std::fs::read(&st).unwrap();
    let pth_bytes = std::fs::read(&pth).unwrap();
    let header_len = u64::from_le_bytes(st_bytes[..8].try_into().unwrap()) as usize;
    let data_len = st_bytes.len() - 8 - header_len;
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };

    let e = read_err(&write("cut.safetensors", &st_bytes[..st_bytes.len() - 100]));
    let expected =
        format!("truncated: its header declares {data_len} bytes of tensor data, the file holds {}", data_len - 100);
    assert!(e.contains("cut.safetensors: damaged safetensors file") && e.contains(&expected), "{e}");
    let e = read_err(&write("cut-header.safetensors", &st_bytes[..header_len / 2]));
    assert!(e.contains("cut-header.safetensors") && e.contains("truncated: its header declares"), "{e}");
    let mut padded = st_bytes.clone();
    padded.extend([0u8; 12]);
    let e = read_err(&write("padded.safetensors", &padded));
    assert!(e.contains("trailing bytes") && e.contains(&format!("the file holds {}", data_len + 12)), "{e}");
    // A header whose offsets contradict a tensor's shape: one tensor's end moved onto the next.
    let header = std::str::from_utf8(&st_bytes[8..8 + header_len]).unwrap();
    let json: serde_json::Value = serde_json::from_str(header).unwrap();
    let (name, entry) = json.as_object().unwrap().iter().find(|(k, _)| *k != "__metadata__").unwrap();
    let end = entry["data_offsets"][1].as_u64().unwrap();
    let bad_header = header.replacen(&format!("[{},{end}]", entry["data_offsets"][0]), &format!("[0,{}]", end + 4), 1);
    assert_ne!(bad_header, header, "the offsets of {name} are rewritten");
    let mut bad = (bad_header.len() as u64).to_le_bytes().to_vec();
    bad.extend(bad_header.as_bytes());
    bad.extend(&st_bytes[8 + header_len..]);
    let e = read_err(&write("offsets.safetensors", &bad));
    assert!(e.contains("offsets.safetensors: damaged safetensors file"), "{e}");

    let e = read_err(&write("cut.pth", &pth_bytes[..pth_bytes.len() / 2]));
    assert!(e.contains("cut.pth: damaged PyTorch file: its zip archive is incomplete"), "{e}");
    // A storage shorter than the tensor it backs: the archive is intact, its contents are not.
    let mut short = pth_tensors(&state_dict(&vit));
    short[0].values.pop();
    let short_path = dir.path().join("short.pth");
    write_pth(&short_path, &short).unwrap();
    let e = read_err(&short_path);
    assert!(e.contains("short.pth: damaged PyTorch file") && e.contains(&short[0].name), "{e}");

    let e = read_err(&write("empty.pth", b""));
    assert!(e.contains("empty.pth: not a weights file (the file is empty)"), "{e}");
    let e = read_err(&write("text.pth", b"hello, these are not weights"));
    assert!(e.contains("text.pth: not a weights file"), "{e}");
    let missing = dir.path().join("missing.pth");
    assert!(read_err(&missing).contains("missing.pth"));
}

#[test]
fn weights_of_another_network_are_refused_with_both_named() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let (vit_config, _) = tiny_vit();
    let head = DinoHeadConfig::new(16, 32).with_hidden_dim(24).with_bottleneck_dim(8);
    let model_config = ModelConfig::new(BackboneConfig::Vit(vit_config.clone())).with_head(Some(head.clone()));
    let path = dir.path().join("model.safetensors");
    save_model(&DinoModel::new(&model_config, &device), &model_config, &path).unwrap();
    let weights = Weights::read(&path, CheckpointKey::Teacher).unwrap();

    let deeper = VitConfig { depth: 3, ..vit_config.clone() };
    let e = one_line(weights.vit(&deeper, &device).expect_err("a deeper ViT must not load"));
    assert!(
        e.contains("model.safetensors: holds a ViT (embed dim 16, 2 blocks")
            && e.contains("not a ViT (embed dim 16, 3 blocks"),
        "{e}"
    );
    let bigger_images = VitConfig { img_size: 32, ..vit_config.clone() };
    let e = one_line(weights.vit(&bigger_images, &device).expect_err("another grid must not load"));
    assert!(e.contains("16 px images") && e.contains("32 px images"), "{e}");

    let other_out = DinoHeadConfig { out_dim: 64, ..head.clone() };
    let e = one_line(weights.dino_head(&other_out, &device).expect_err("another out_dim must not load"));
    assert!(e.contains("holds a DINO head 16 -> out_dim 32") && e.contains("not a DINO head 16 -> out_dim 64"), "{e}");
    let other_bottleneck = DinoHeadConfig { bottleneck_dim: 12, ..head.clone() };
    let e = one_line(weights.dino_head(&other_bottleneck, &device).expect_err("another bottleneck must not load"));
    assert!(e.contains("bottleneck 8") && e.contains("bottleneck 12"), "{e}");
    // The same network loads; norm_last_layer is not in the shapes and is not compared.
    weights.vit(&vit_config, &device).unwrap();
    weights.dino_head(&DinoHeadConfig { norm_last_layer: false, ..head }, &device).unwrap();
}
