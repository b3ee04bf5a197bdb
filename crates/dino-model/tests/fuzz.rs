//! Bounded fuzz tests (`dino_fixtures::fuzz`: fixed seed, time budget) of the weights readers:
//! safetensors as header entries and data, `.pth` as pickle and storages rewrapped in a valid
//! zip, and both as plain bytes. No input may panic; what loads builds its network.

use std::path::Path;

use burn::tensor::Device;
use dino_fixtures::fuzz::{PthParts, SafetensorsFile, fuzz};
use dino_fixtures::pth::{Pickle, pth_tensors, write_malicious_pth, write_pth, write_pth_archive};
use dino_model::weights::{CheckpointKey, Weights, read_pytorch_int, save_model, state_dict};
use dino_model::{BackboneConfig, DinoHeadConfig, DinoModel, ModelConfig, VitConfig};
use mutatis::mutators as m;

fn tiny_model() -> (ModelConfig, DinoModel) {
    let vit = VitConfig::new(8, 1, 2).with_patch_size(4).with_img_size(8);
    let head = DinoHeadConfig::new(8, 16).with_hidden_dim(12).with_bottleneck_dim(4);
    let config = ModelConfig::new(BackboneConfig::Vit(vit)).with_head(Some(head));
    let model = DinoModel::new(&config, &Device::flex());
    (config, model)
}

/// Reads `path` as every command would: an error is fine, a panic is not; weights that read
/// and describe a valid network build it. Returns whether the file was read.
fn load(path: &Path) -> bool {
    let device = Device::flex();
    let Ok(weights) = Weights::read(path, CheckpointKey::Teacher) else { return false };
    for heads in [None, Some(2)] {
        if let Ok(config) = weights.vit_config(heads)
            && config.validate().is_ok()
        {
            let _ = weights.vit(&config, &device);
        }
    }
    if let Some(head) = weights.head_config()
        && head.validate().is_ok()
    {
        let _ = weights.dino_head(&head, &device);
    }
    let _ = read_pytorch_int(path, "epoch");
    true
}

/// The tiny model as one of our safetensors files (config in the header), as bytes.
fn tiny_safetensors(dir: &Path) -> Vec<u8> {
    let (config, model) = tiny_model();
    let path = dir.join("model.safetensors");
    save_model(&model, &config, &path).unwrap();
    std::fs::read(&path).unwrap()
}

#[test]
fn fuzz_safetensors_headers() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = vec![SafetensorsFile::parse(&tiny_safetensors(dir.path())).unwrap()];
    let input = dir.path().join("input.safetensors");
    let report = fuzz("safetensors header", m::default::<SafetensorsFile>(), seeds, |file| {
        std::fs::write(&input, file.bytes()).unwrap();
        load(&input)
    });
    assert!(report.inputs > 100 && report.accepted > 1, "{report:?}");
}

#[test]
fn fuzz_safetensors_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = vec![tiny_safetensors(dir.path())];
    let input = dir.path().join("input.safetensors");
    let report = fuzz("safetensors bytes", m::default::<Vec<u8>>(), seeds, |bytes| {
        std::fs::write(&input, bytes).unwrap();
        load(&input)
    });
    assert!(report.inputs > 100 && report.accepted > 1, "{report:?}");
}

/// `.pth` seeds: the tiny backbone as a state_dict, and beside the payloads of a malicious
/// file; each split into its pickle and storages.
fn pth_seeds(dir: &Path) -> Vec<PthParts> {
    let (_, model) = tiny_model();
    let tensors = pth_tensors(&state_dict(&model.backbone));
    let plain = dir.join("plain.pth");
    write_pth(&plain, &tensors).unwrap();
    let evil = dir.join("evil.pth");
    write_malicious_pth(&evil, &tensors, dir).unwrap();
    [plain, evil]
        .iter()
        .map(|path| {
            let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
            let mut read = |name: &str| {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut zip.by_name(name).unwrap(), &mut bytes).unwrap();
                bytes
            };
            let pickle = read("archive/data.pkl");
            let storages = (0..tensors.len()).map(|i| (i.to_string(), read(&format!("archive/data/{i}")))).collect();
            PthParts { pickle, storages }
        })
        .collect()
}

#[test]
fn fuzz_pth_pickles() {
    let dir = tempfile::tempdir().unwrap();
    let mut seeds = pth_seeds(dir.path());
    // A bare pickle of plain values, so mutations reach every opcode family quickly.
    let mut small = Pickle::new();
    small.dict().str("epoch").int(3).str("lr").float(0.5).str("args");
    small.object("argparse", "Namespace", &[("arch", "vit_small")]).set_items();
    seeds.push(PthParts { pickle: small.finish(), storages: Vec::new() });
    let input = dir.path().join("input.pth");
    let report = fuzz("pth pickle", m::default::<PthParts>(), seeds, |parts| {
        // Two storages under one key make no zip at all: nothing to read.
        write_pth_archive(&input, &parts.pickle, &parts.storages).is_ok() && load(&input)
    });
    assert!(report.inputs > 100 && report.accepted > 3, "{report:?}");
}

#[test]
fn fuzz_pth_bytes() {
    let dir = tempfile::tempdir().unwrap();
    pth_seeds(dir.path());
    let seeds = ["plain.pth", "evil.pth"].map(|name| std::fs::read(dir.path().join(name)).unwrap()).to_vec();
    let input = dir.path().join("input.pth");
    let report = fuzz("pth bytes", m::default::<Vec<u8>>(), seeds, |bytes| {
        std::fs::write(&input, bytes).unwrap();
        load(&input)
    });
    assert!(report.inputs > 100 && report.accepted > 2, "{report:?}");
}
