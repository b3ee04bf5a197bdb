//! Test support: the reference fixtures produced by the official implementation, the small
//! real dataset the repository ships, a corpus of bad image files ([`bad_images`]), PyTorch
//! files written byte by byte, malicious ones included ([`pth`]), bounded fuzzing ([`fuzz`]),
//! and a sandbox that keeps binaries under test inside the repository ([`sandbox`]).
//!
//! The fixture directory is `$DINO_REFERENCE_DIR` when set, else the copy in this repository.
//! Every setting a test needs is read from its `manifest.json`, so the tests run unchanged on any
//! other fixture set of the same layout.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};

pub mod bad_images;
pub mod fuzz;
pub mod pth;
pub mod sandbox;

/// The first 512 training and 256 test images of Fashion-MNIST, in IDX files
/// (`fixtures/fashion-mnist-subset/`, see its README): a dataset SPEC for `Dataset::open` and
/// `--data`, with `#test` for the test split.
pub fn fashion_mnist_subset() -> PathBuf {
    sandbox::repo_root().join("fixtures/fashion-mnist-subset")
}

/// The device the device-generic tests (the parity tests) run on: `$DINO_TEST_DEVICE`, `cpu`
/// (the default), `wgpu` or `vulkan`. A GPU device needs this crate's feature of the same name
/// (`scripts/gpu-check.sh` builds it); asking for one the build lacks panics rather than quietly
/// testing the CPU again.
pub fn test_device() -> Device {
    match std::env::var("DINO_TEST_DEVICE").as_deref() {
        Err(_) | Ok("cpu") => Device::flex(),
        #[cfg(feature = "wgpu")]
        Ok("wgpu") => Device::wgpu(Default::default()),
        #[cfg(feature = "vulkan")]
        Ok("vulkan") => Device::vulkan(Default::default()),
        Ok(other) => panic!(
            "DINO_TEST_DEVICE={other}: this test build has no such device; build the tests with --features dino-fixtures/{other}"
        ),
    }
}

pub fn fixture_dir() -> PathBuf {
    let dir = match std::env::var_os("DINO_REFERENCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => sandbox::repo_root().join("fixtures/dino-reference"),
    };
    assert!(
        dir.join("manifest.json").is_file(),
        "reference fixtures not found at {} (set DINO_REFERENCE_DIR to a fixture directory)",
        dir.display()
    );
    dir
}

/// `manifest.json`'s `config` object.
pub fn manifest() -> serde_json::Value {
    let path = fixture_dir().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let manifest: serde_json::Value = serde_json::from_str(&text).expect("manifest.json is JSON");
    manifest["config"].clone()
}

pub fn manifest_usize(key: &str) -> usize {
    manifest()[key].as_u64().unwrap_or_else(|| panic!("manifest.json: config.{key} is not an integer")) as usize
}

/// The torchvision and official-DINO ResNet fixtures (`scripts/make_resnet_fixtures.py`):
/// `$DINO_RESNET_REFERENCE_DIR` when set, else the copy in this repository.
pub fn resnet_fixture_dir() -> PathBuf {
    let dir = match std::env::var_os("DINO_RESNET_REFERENCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => sandbox::repo_root().join("fixtures/resnet-reference"),
    };
    assert!(
        dir.join("manifest.json").is_file(),
        "ResNet fixtures not found at {} (set DINO_RESNET_REFERENCE_DIR to a fixture directory)",
        dir.display()
    );
    dir
}

/// The ResNet fixtures' whole `manifest.json` (`nets`, `train`).
pub fn resnet_manifest() -> serde_json::Value {
    let path = resnet_fixture_dir().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("manifest.json is JSON")
}

/// A fixture safetensors file: name -> data (as stored).
pub fn read_fixture(file: &str) -> BTreeMap<String, TensorData> {
    read_safetensors(&fixture_dir().join(file))
}

/// A ResNet fixture safetensors file: name -> data (as stored).
pub fn read_resnet_fixture(file: &str) -> BTreeMap<String, TensorData> {
    read_safetensors(&resnet_fixture_dir().join(file))
}

fn read_safetensors(path: &std::path::Path) -> BTreeMap<String, TensorData> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("fixture is safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => burn::tensor::DType::F32,
                safetensors::Dtype::F64 => burn::tensor::DType::F64,
                safetensors::Dtype::I64 => burn::tensor::DType::I64,
                other => panic!("unexpected dtype {other:?}"),
            };
            (name, TensorData::from_bytes_vec(view.data().to_vec(), view.shape().to_vec(), dtype))
        })
        .collect()
}

pub fn tensor<const D: usize>(data: &TensorData, device: &Device) -> Tensor<D> {
    Tensor::from_data(data.clone(), device)
}

pub fn to_f64(data: &TensorData) -> Vec<f64> {
    data.iter::<f64>().collect()
}

/// ||ours - reference|| / ||reference||, after checking the shapes agree.
pub fn rel_err<const D: usize>(ours: Tensor<D>, reference: &TensorData) -> f64 {
    let ours = ours.into_data();
    assert_eq!(ours.shape(), reference.shape(), "shape mismatch");
    rel_err_vec(&to_f64(&ours), &to_f64(reference))
}

pub fn rel_err_vec(ours: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let diff: f64 = ours.iter().zip(reference).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = reference.iter().map(|b| b * b).sum::<f64>().sqrt();
    diff / norm.max(1e-30)
}
