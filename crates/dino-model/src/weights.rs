//! Weights in and out, under the official PyTorch key names.
//!
//! Reads the released backbone `.pth` files (a bare state_dict), full official `checkpoint.pth`
//! files (`student` / `teacher` entries with `module.` and `backbone.` prefixes, a pickled
//! `args` Namespace beside them) and safetensors files; writes safetensors that
//! `torch`'s `load_state_dict(strict=True)` accepts, with our [`ModelConfig`] in the header so
//! tools need no `--arch`.
//!
//! Loading is strict: missing keys, unexpected keys and shape mismatches are reported together,
//! by name. Keys map one to one onto our module paths; burn-store's adapters translate burn's
//! `[in, out]` Linear weights and LayerNorm `gamma`/`beta` to PyTorch's layout and back.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, bridge, burn_pack, pytorch_reader};
use burn::tensor::{DType, TensorData};

use crate::config::{DinoHeadConfig, ModelConfig, VitConfig};
use crate::dino::DinoModel;
use crate::head::DinoHead;
use crate::vit::VisionTransformer;

/// The safetensors header entry that carries our [`ModelConfig`] as JSON.
pub const CONFIG_METADATA_KEY: &str = "dino_model_config";

/// Which network of a full training checkpoint to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckpointKey {
    /// The EMA teacher: the released weights are teacher weights (official issue #44).
    #[default]
    Teacher,
    /// The trained student.
    Student,
}

impl CheckpointKey {
    /// The entry name in `checkpoint.pth`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Teacher => "teacher",
            Self::Student => "student",
        }
    }
}

/// Why weights could not be read, written or applied.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Writing failed (a full disk, a file-size limit); what was under `path` before is intact.
    #[error("cannot write {path} ({source}); the file there before, if any, is intact")]
    Write { path: PathBuf, source: std::io::Error },
    /// The bytes are not a readable safetensors or PyTorch file (or are truncated).
    #[error(
        "{path}: not a readable weights file ({reason}); expected a .pth/.pt state_dict or checkpoint, or .safetensors"
    )]
    Format { path: PathBuf, reason: String },
    /// A full checkpoint without the requested network.
    #[error("{path}: this checkpoint has no '{key}' entry (top-level entries: {available})")]
    MissingEntry { path: PathBuf, key: String, available: String },
    /// The file holds no ViT backbone.
    #[error("{path}: no ViT backbone weights found (expected keys such as 'cls_token', 'blocks.0.attn.qkv.weight')")]
    NoBackbone { path: PathBuf },
    /// The architecture cannot be read off the file.
    #[error("{path}: cannot infer the architecture: {reason}")]
    UnknownArchitecture { path: PathBuf, reason: String },
    /// The tensors do not fit the network.
    #[error("{path}: the weights do not fit {network}: {details}")]
    Mismatch { path: PathBuf, network: String, details: String },
}

type Result<T> = std::result::Result<T, WeightsError>;

/// Tensors by official key, all floats as f32.
pub type StateDict = BTreeMap<String, TensorData>;

/// What a weights file holds, split into the backbone and (optional) head state_dicts with the
/// `module.`, `backbone.` and `head.` prefixes removed.
#[derive(Debug)]
pub struct Weights {
    /// Where it came from, for messages.
    pub path: PathBuf,
    /// The model config stored by us, if the file was written by us.
    pub config: Option<ModelConfig>,
    /// Backbone keys (`cls_token`, `blocks.0.norm1.weight`, ...).
    pub backbone: StateDict,
    /// Head keys (`mlp.0.weight`, `last_layer.weight_v`, ...); empty when there is no head.
    pub head: StateDict,
}

impl Weights {
    /// Reads `path` (safetensors, or any PyTorch file: zip, legacy, tar). From a full training
    /// checkpoint, `key` picks the teacher or the student.
    pub fn read(path: &Path, key: CheckpointKey) -> Result<Self> {
        let mut magic = [0u8; 9];
        let n = fs::File::open(path)
            .and_then(|mut f| f.read(&mut magic))
            .map_err(|source| WeightsError::Io { path: path.into(), source })?;
        let (tensors, config) = if n == 9 && magic[8] == b'{' {
            let (tensors, metadata) = read_safetensors(path)?;
            let config = match metadata.get(CONFIG_METADATA_KEY) {
                Some(json) => {
                    Some(serde_json::from_str(json).map_err(|e| format_error(path, format!("bad model config: {e}")))?)
                }
                None => None,
            };
            (tensors, config)
        } else {
            (read_pytorch(path)?, None)
        };
        let tensors = select_network(tensors, key, path)?;
        let mut weights = Self { path: path.into(), config, backbone: StateDict::new(), head: StateDict::new() };
        for (name, data) in tensors {
            let name = name.strip_prefix("module.").unwrap_or(&name);
            if let Some(head_key) = name.strip_prefix("head.") {
                weights.head.insert(head_key.to_string(), data);
            } else {
                let name = name.strip_prefix("backbone.").unwrap_or(name);
                weights.backbone.insert(name.to_string(), data);
            }
        }
        if !weights.backbone.contains_key("cls_token") && weights.head.is_empty() {
            // A bare head state_dict (`mlp.0.weight`, `last_layer.weight_v`, ...).
            weights.head = std::mem::take(&mut weights.backbone);
        }
        // `nn.Sequential` vs a single `nn.Linear` when the head has one layer.
        for suffix in ["weight", "bias"] {
            if let Some(t) = weights.head.remove(&format!("mlp.{suffix}")) {
                weights.head.insert(format!("mlp.0.{suffix}"), t);
            }
        }
        Ok(weights)
    }

    /// The backbone's config: the stored one, else inferred from the tensor shapes. The number
    /// of heads is not in the shapes; it is taken from the official preset of the same width,
    /// or from `num_heads` when given.
    pub fn vit_config(&self, num_heads: Option<usize>) -> Result<VitConfig> {
        if let Some(config) = &self.config {
            let mut vit = config.vit.clone();
            if let Some(h) = num_heads {
                vit.num_heads = h;
            }
            return Ok(vit);
        }
        if !self.backbone.contains_key("cls_token") {
            return Err(WeightsError::NoBackbone { path: self.path.clone() });
        }
        let unknown = |reason: String| WeightsError::UnknownArchitecture { path: self.path.clone(), reason };
        let shape = |key: &str| {
            self.backbone.get(key).map(|t| t.shape().to_vec()).ok_or_else(|| unknown(format!("key '{key}' is missing")))
        };
        let dim = shape("cls_token")?[2];
        let patch = shape("patch_embed.proj.weight")?[2];
        let slots = shape("pos_embed")?[1] - 1;
        let grid = (slots as f64).sqrt().round() as usize;
        if grid * grid != slots {
            return Err(unknown(format!("pos_embed has {slots} patch slots, not a square grid")));
        }
        let depth = (0..).take_while(|i| self.backbone.contains_key(&format!("blocks.{i}.norm1.weight"))).count();
        let hidden = shape("blocks.0.mlp.fc1.weight")?[0];
        let heads = match num_heads {
            Some(h) => h,
            None => VitConfig::preset(match dim {
                192 => "vit_tiny",
                384 => "vit_small",
                768 => "vit_base",
                _ => {
                    return Err(unknown(format!(
                        "embed dim {dim} matches no preset, so the number of heads is unknown; pass --arch or --num-heads"
                    )));
                }
            }, patch)
            .map(|c| c.num_heads)
            .unwrap_or(1),
        };
        Ok(VitConfig::new(dim, depth, heads)
            .with_patch_size(patch)
            .with_img_size(grid * patch)
            .with_mlp_ratio(hidden as f64 / dim as f64)
            .with_qkv_bias(self.backbone.contains_key("blocks.0.attn.qkv.bias")))
    }

    /// The head's config: the stored one, else inferred from the shapes (`None` without a head).
    pub fn head_config(&self) -> Option<DinoHeadConfig> {
        if let Some(head) = self.config.as_ref().and_then(|c| c.head.clone()) {
            return Some(head);
        }
        let v = self.head.get("last_layer.weight_v")?;
        // 2-D `mlp.{i}.weight` tensors are the Linear layers (BatchNorm weights are 1-D).
        let mut linears: Vec<(usize, Vec<usize>)> = self
            .head
            .iter()
            .filter_map(|(key, t)| {
                let index = key.strip_prefix("mlp.")?.strip_suffix(".weight")?.parse().ok()?;
                (t.shape().len() == 2).then(|| (index, t.shape().to_vec()))
            })
            .collect();
        linears.sort();
        let first = &linears.first()?.1;
        let use_bn = self.head.keys().any(|k| k.ends_with("running_mean"));
        let g = self.head.get("last_layer.weight_g")?.try_to_vec::<f32>().ok()?;
        Some(
            DinoHeadConfig::new(first[1], v.shape()[0])
                .with_use_bn(use_bn)
                .with_nlayers(linears.len())
                .with_hidden_dim(if linears.len() > 1 { first[0] } else { 2048 })
                .with_bottleneck_dim(v.shape()[1])
                .with_norm_last_layer(g.iter().all(|&x| x == 1.0)),
        )
    }

    /// A backbone built from `config` with these weights, checked strictly (head keys are not
    /// the backbone's business and are ignored, as the official loaders do).
    pub fn backbone(&self, config: &VitConfig, device: &burn::tensor::Device) -> Result<VisionTransformer> {
        let mut vit = VisionTransformer::new(config, device);
        let network = format!(
            "{} (embed dim {}, depth {}, patch {})",
            config.arch_name().unwrap_or("the ViT"),
            config.embed_dim,
            config.depth,
            config.patch_size
        );
        apply_strict(&mut vit, &self.backbone, &self.path, &network)?;
        Ok(vit)
    }

    /// The head built from `config` with these weights, checked strictly.
    pub fn dino_head(&self, config: &DinoHeadConfig, device: &burn::tensor::Device) -> Result<DinoHead> {
        let mut head = DinoHead::new(config, device);
        let network = format!("the DINO head ({} -> {})", config.in_dim, config.out_dim);
        apply_strict(&mut head, &self.head, &self.path, &network)?;
        Ok(head)
    }
}

fn format_error(path: &Path, reason: impl fmt::Display) -> WeightsError {
    WeightsError::Format { path: path.into(), reason: reason.to_string() }
}

/// Floats become f32; integer buffers (BatchNorm's `num_batches_tracked`) are dropped.
fn keep_as_f32(name: String, data: TensorData, into: &mut StateDict) {
    if data.dtype().is_float() {
        into.insert(name, data.convert_dtype(DType::F32));
    }
}

/// Every float tensor of a safetensors file (as f32) and its header metadata.
pub fn read_safetensors(path: &Path) -> Result<(StateDict, HashMap<String, String>)> {
    let bytes = fs::read(path).map_err(|source| WeightsError::Io { path: path.into(), source })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| format_error(path, e))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format_error(path, e))?;
    let mut tensors = StateDict::new();
    for (name, view) in file.tensors() {
        use safetensors::Dtype as S;
        let dtype = match view.dtype() {
            S::F64 => DType::F64,
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::I64 => DType::I64,
            other => return Err(format_error(path, format!("tensor '{name}' has unsupported dtype {other:?}"))),
        };
        keep_as_f32(name, TensorData::from_bytes_vec(view.data().to_vec(), view.shape().to_vec(), dtype), &mut tensors);
    }
    Ok((tensors, metadata))
}

/// Every float tensor of a PyTorch file (as f32), under its dotted path through the pickled
/// dictionaries (`teacher.backbone.cls_token`, `optimizer.state.0.exp_avg`, ...).
pub fn read_pytorch(path: &Path) -> Result<StateDict> {
    let reader = pytorch_reader::PytorchReader::new(path).map_err(|e| format_error(path, e))?;
    let mut tensors = StateDict::new();
    for (name, tensor) in reader.into_tensors() {
        let (_, dtype, shape, _, bytes) = bridge::from_pytorch(tensor)
            .into_parts()
            .map_err(|e| format_error(path, format!("tensor '{name}': {e}")))?;
        keep_as_f32(name, TensorData::from_bytes(bytes, shape, dtype), &mut tensors);
    }
    Ok(tensors)
}

/// A full training checkpoint nests the networks under `student.` / `teacher.`: keep `key`'s,
/// without the prefix. Other files pass through.
fn select_network(all: StateDict, key: CheckpointKey, path: &Path) -> Result<StateDict> {
    let nested = all.keys().any(|k| k.starts_with("teacher.") || k.starts_with("student."));
    if !nested {
        return Ok(all);
    }
    let prefix = format!("{}.", key.as_str());
    if !all.keys().any(|k| k.starts_with(&prefix)) {
        let mut available: Vec<_> = all.keys().filter_map(|k| k.split('.').next()).collect();
        available.dedup();
        return Err(WeightsError::MissingEntry {
            path: path.into(),
            key: key.as_str().into(),
            available: available.join(", "),
        });
    }
    Ok(all.into_iter().filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_string(), v))).collect())
}

/// Applies `tensors` to `module`, failing with every missing, unexpected and misshapen key.
fn apply_strict<M: ModuleSnapshot>(module: &mut M, tensors: &StateDict, path: &Path, network: &str) -> Result<()> {
    let packed: Vec<_> = tensors
        .iter()
        .map(|(name, data)| {
            burn_pack::Tensor::new(name.clone(), DType::F32, data.shape().clone(), None, data.bytes().clone())
        })
        .collect();
    let result = module.apply(packed, None, Some(Box::new(PyTorchToBurnAdapter)), true);
    let mut problems = Vec::new();
    let list = |what: &str, names: Vec<String>, problems: &mut Vec<String>| {
        if !names.is_empty() {
            let shown: Vec<_> = names.iter().take(8).cloned().collect();
            let more = if names.len() > 8 { format!(" and {} more", names.len() - 8) } else { String::new() };
            problems.push(format!("{what} {}{more}", shown.join(", ")));
        }
    };
    list("missing keys:", result.missing.iter().map(|(p, _)| torch_name(p)).collect(), &mut problems);
    list("unexpected keys:", result.unused.clone(), &mut problems);
    list("", result.errors.iter().map(|e| e.to_string()).collect(), &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(WeightsError::Mismatch { path: path.into(), network: network.into(), details: problems.join("; ") })
    }
}

/// burn's module path of a parameter under its PyTorch name (norm `gamma`/`beta` ->
/// `weight`/`bias`), for messages.
fn torch_name(path: &str) -> String {
    match path.rsplit_once('.') {
        Some((parent, "gamma")) => format!("{parent}.weight"),
        Some((parent, "beta")) => format!("{parent}.bias"),
        _ => path.to_string(),
    }
}

/// A module's tensors under the official key names, each prefixed with `prefix`.
fn torch_tensors<M: ModuleSnapshot>(module: &M, prefix: &str) -> Vec<(String, TensorData)> {
    let mut out = Vec::new();
    for tensor in module.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true) {
        let (name, dtype, shape, _, bytes) = tensor.into_parts().expect("in-memory tensors are readable");
        let data = TensorData::from_bytes(bytes, shape, dtype);
        if name.ends_with("running_mean") {
            // PyTorch's BatchNorm also has this buffer, and strict loading wants it.
            let counter = name.replace("running_mean", "num_batches_tracked");
            out.push((format!("{prefix}{counter}"), TensorData::new(vec![0i64], Vec::<usize>::new())));
        }
        out.push((format!("{prefix}{name}"), data));
    }
    out
}

/// The header entries that record `config` in a file of ours.
pub fn config_metadata(config: &ModelConfig) -> HashMap<String, String> {
    HashMap::from([
        (CONFIG_METADATA_KEY.to_string(), serde_json::to_string(config).expect("configs serialise")),
        ("format".to_string(), "pt".to_string()),
    ])
}

/// Writes `tensors` as safetensors with `metadata` in the header; atomically and durably (a
/// temporary file in the same directory, synced, renamed over `path`, then the directory synced),
/// so neither a crash nor a failed write (a full disk, a file-size limit) leaves anything but the
/// previous complete file under `path`.
pub fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, TensorData)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, data)| {
            let dtype = match data.dtype() {
                DType::I64 => safetensors::Dtype::I64,
                DType::F32 => safetensors::Dtype::F32,
                other => panic!("tensor '{name}' is {other:?}; only f32 and i64 are written"),
            };
            let view = safetensors::tensor::TensorView::new(dtype, data.shape().to_vec(), data.as_bytes())
                .expect("shape and byte length agree");
            (name.clone(), view)
        })
        .collect();
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| format_error(path, e))?;
    let tmp = path.with_extension("safetensors.tmp");
    write_durably(&tmp, &bytes, path).map_err(|source| {
        let _ = fs::remove_file(&tmp);
        WeightsError::Write { path: path.into(), source }
    })
}

fn write_durably(tmp: &Path, bytes: &[u8], path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = fs::File::create(tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(tmp, path)?;
    // On POSIX the rename survives a crash only once the directory is synced too.
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Renames a one-layer head's `mlp.0.*` to the official `mlp.*` (a bare `nn.Linear`).
fn official_head_names(tensors: &mut [(String, TensorData)], head: &DinoHead, prefix: &str) {
    if head.mlp.len() == 1 {
        for (name, _) in tensors.iter_mut() {
            if let Some(rest) = name.strip_prefix(&format!("{prefix}mlp.0.")) {
                *name = format!("{prefix}mlp.{rest}");
            }
        }
    }
}

/// Saves a backbone as the released hub files hold it (bare keys), plus its config.
pub fn save_backbone(vit: &VisionTransformer, config: &VitConfig, path: &Path) -> Result<()> {
    write_safetensors(path, torch_tensors(vit, ""), config_metadata(&ModelConfig::new(config.clone())))
}

/// Backbone and head under the official wrapper's keys (`{prefix}backbone.*`, `{prefix}head.*`).
pub fn model_tensors(model: &DinoModel, prefix: &str) -> Vec<(String, TensorData)> {
    let mut tensors = torch_tensors(&model.backbone, &format!("{prefix}backbone."));
    let head_prefix = format!("{prefix}head.");
    let mut head = torch_tensors(&model.head, &head_prefix);
    official_head_names(&mut head, &model.head, &head_prefix);
    tensors.extend(head);
    tensors
}

/// Saves backbone and head under the official wrapper's keys (`backbone.*`, `head.*`).
pub fn save_model(model: &DinoModel, config: &ModelConfig, path: &Path) -> Result<()> {
    write_safetensors(path, model_tensors(model, ""), config_metadata(config))
}

/// A backbone's or head's tensors under official keys, for comparisons and tests.
pub fn state_dict<M: ModuleSnapshot + Module>(module: &M) -> StateDict {
    torch_tensors(module, "").into_iter().filter(|(_, d)| d.dtype().is_float()).collect()
}

/// Official key -> shape of a module's tensors, without reading any data.
pub fn official_shapes<M: ModuleSnapshot>(module: &M) -> BTreeMap<String, Vec<usize>> {
    module
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|t| (torch_name(&t.name), t.shape.to_vec()))
        .collect()
}

/// An integer entry of a PyTorch file's top-level dictionary (e.g. a checkpoint's `epoch`).
pub fn read_pytorch_int(path: &Path, key: &str) -> Result<i64> {
    match pytorch_reader::PytorchReader::read_pickle_data(path, Some(key)) {
        Ok(pytorch_reader::PickleValue::Int(v)) => Ok(v),
        Ok(other) => Err(format_error(path, format!("'{key}' is not an integer: {other:?}"))),
        Err(e) => Err(format_error(path, e)),
    }
}
