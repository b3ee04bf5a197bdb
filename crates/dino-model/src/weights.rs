//! Weights in and out, under the official PyTorch key names.
//!
//! Reads the released backbone `.pth` files (a bare state_dict: a ViT's, or a torchvision
//! ResNet's without `fc`), full official `checkpoint.pth`
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

use crate::backbone::Backbone;
use crate::classifier::Classifier;
use crate::config::{BackboneConfig, BlockKind, DinoHeadConfig, ModelConfig, ResNetConfig, Stem, VitConfig};
use crate::dino::DinoModel;
use crate::head::DinoHead;
use crate::resnet::ResNet;
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
    /// The bytes are neither a safetensors nor a PyTorch file.
    #[error("{path}: not a weights file ({reason}); expected a .pth/.pt state_dict or checkpoint, or .safetensors")]
    Format { path: PathBuf, reason: String },
    /// A safetensors or PyTorch file whose contents contradict themselves or stop short.
    #[error("{path}: damaged {format} file: {reason}; fetch or export it again")]
    Damaged { path: PathBuf, format: &'static str, reason: String },
    /// A full checkpoint without the requested network.
    #[error("{path}: this checkpoint has no '{key}' entry (top-level entries: {available})")]
    MissingEntry { path: PathBuf, key: String, available: String },
    /// The file holds no backbone.
    #[error(
        "{path}: no backbone weights found (expected a ViT's 'cls_token', 'blocks.0.attn.qkv.weight', ... or a ResNet's 'conv1.weight', 'layer1.0.conv1.weight', ...)"
    )]
    NoBackbone { path: PathBuf },
    /// The architecture cannot be read off the file.
    #[error("{path}: cannot infer the architecture: {reason}")]
    UnknownArchitecture { path: PathBuf, reason: String },
    /// The file holds another network than the one asked for (architecture, out_dim, ...).
    #[error("{path}: holds {found}, not {expected}")]
    OtherNetwork { path: PathBuf, found: String, expected: String },
    /// The tensors do not fit the network.
    #[error("{path}: the weights do not fit {network}: {details}")]
    Mismatch { path: PathBuf, network: String, details: String },
}

/// A Python object in a PyTorch file that is neither plain data nor a tensor: a call such as
/// `os.system(...)`, an instance of a class (`argparse.Namespace`) or a class reference.
/// Nothing is imported or called to read a file; such objects are left out and named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredObject {
    /// Its dotted key in the file (`args`, `hooks.on_load`).
    pub key: String,
    /// The Python callable or class it names (`argparse.Namespace`, `posix.system`).
    pub python_type: String,
}

impl fmt::Display for IgnoredObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.key, self.python_type)
    }
}

/// One line for a warning: "ignored 2 Python objects, none of them run: args
/// (argparse.Namespace), evil (posix.system)"; past 12 objects, "and N more".
pub fn describe_ignored(ignored: &[IgnoredObject]) -> String {
    const SHOWN: usize = 12;
    let mut names: Vec<String> = ignored.iter().take(SHOWN).map(ToString::to_string).collect();
    if ignored.len() > SHOWN {
        names.push(format!("and {} more", ignored.len() - SHOWN));
    }
    let s = if ignored.len() == 1 { "" } else { "s" };
    format!("ignored {} Python object{s}, none of them run: {}", ignored.len(), names.join(", "))
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
    /// The Python objects of a PyTorch file that were left out (see [`IgnoredObject`]).
    pub ignored: Vec<IgnoredObject>,
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
        let (tensors, config, ignored) = if n == 9 && magic[8] == b'{' {
            let (tensors, metadata) = read_safetensors(path)?;
            let config = match metadata.get(CONFIG_METADATA_KEY) {
                Some(json) => Some(
                    ModelConfig::from_json(json)
                        .map_err(|e| damaged(path, "safetensors", format!("bad model config in the header: {e}")))?,
                ),
                None => None,
            };
            (tensors, config, Vec::new())
        } else {
            (read_pytorch(path)?, None, ignored_objects(path)?)
        };
        let tensors = select_network(tensors, key, path)?;
        let mut weights =
            Self { path: path.into(), config, ignored, backbone: StateDict::new(), head: StateDict::new() };
        for (name, data) in tensors {
            let name = name.strip_prefix("module.").unwrap_or(&name);
            if let Some(head_key) = name.strip_prefix("head.") {
                weights.head.insert(head_key.to_string(), data);
            } else {
                let name = name.strip_prefix("backbone.").unwrap_or(name);
                weights.backbone.insert(name.to_string(), data);
            }
        }
        if weights.head.is_empty() && weights.backbone.contains_key("last_layer.weight_v") {
            // A bare head state_dict (`mlp.0.weight`, `last_layer.weight_v`, ...).
            weights.head = std::mem::take(&mut weights.backbone);
        }
        if weights.backbone.contains_key("conv1.weight") {
            // torchvision's classifier; DINO replaces it by `nn.Identity()`.
            weights.backbone.retain(|k, _| !k.starts_with("fc."));
        }
        // `nn.Sequential` vs a single `nn.Linear` when the head has one layer.
        for suffix in ["weight", "bias"] {
            if let Some(t) = weights.head.remove(&format!("mlp.{suffix}")) {
                weights.head.insert(format!("mlp.0.{suffix}"), t);
            }
        }
        Ok(weights)
    }

    /// The backbone's config: the stored one, else inferred from the tensor shapes. A ViT's
    /// number of heads is not in the shapes; it is taken from the official preset of the same
    /// width, or from `num_heads` when given.
    pub fn backbone_config(&self, num_heads: Option<usize>) -> Result<BackboneConfig> {
        match self.config.as_ref().map(|c| c.backbone.clone()) {
            Some(BackboneConfig::Vit(mut vit)) => {
                if let Some(h) = num_heads {
                    vit.num_heads = h;
                }
                Ok(BackboneConfig::Vit(vit))
            }
            Some(resnet) => Ok(resnet),
            None if self.backbone.contains_key("conv1.weight") => self.inferred_resnet().map(BackboneConfig::ResNet),
            None => self.inferred_vit(num_heads).map(BackboneConfig::Vit),
        }
    }

    /// The ViT backbone's config (see [`Self::backbone_config`]); an error for a ResNet.
    pub fn vit_config(&self, num_heads: Option<usize>) -> Result<VitConfig> {
        match self.backbone_config(num_heads)? {
            BackboneConfig::Vit(vit) => Ok(vit),
            BackboneConfig::ResNet(resnet) => Err(WeightsError::UnknownArchitecture {
                path: self.path.clone(),
                reason: format!("it holds {}, and this needs a ViT", describe_resnet(&resnet)),
            }),
        }
    }

    /// A ResNet's config as read off the tensor shapes alone: the stem from `conv1`'s kernel,
    /// the block type from `conv3`, the depth of each stage from its block indices.
    fn inferred_resnet(&self) -> Result<ResNetConfig> {
        let unknown = |reason: String| WeightsError::UnknownArchitecture { path: self.path.clone(), reason };
        let conv1 = self.backbone.get("conv1.weight").ok_or(WeightsError::NoBackbone { path: self.path.clone() })?;
        let stem = match conv1.shape().as_slice() {
            [w, 3, 7, 7] if *w > 0 => Stem::ImageNet,
            [w, 3, 3, 3] if *w > 0 => Stem::Cifar,
            other => {
                return Err(unknown(format!(
                    "conv1.weight has shape {other:?}, not [width, 3, 7, 7] or [width, 3, 3, 3]"
                )));
            }
        };
        let block =
            if self.backbone.contains_key("layer1.0.conv3.weight") { BlockKind::Bottleneck } else { BlockKind::Basic };
        let layers = [1, 2, 3, 4].map(|stage| {
            (0..).take_while(|b| self.backbone.contains_key(&format!("layer{stage}.{b}.conv1.weight"))).count()
        });
        Ok(ResNetConfig::new(layers, block).with_stem(stem).with_width(conv1.shape()[0]))
    }

    /// The backbone's config as read off the tensor shapes alone.
    fn inferred_vit(&self, num_heads: Option<usize>) -> Result<VitConfig> {
        if !self.backbone.contains_key("cls_token") {
            return Err(WeightsError::NoBackbone { path: self.path.clone() });
        }
        let unknown = |reason: String| WeightsError::UnknownArchitecture { path: self.path.clone(), reason };
        // Every size read must come from a tensor of the rank a ViT gives it, with no zero size
        // (an empty tensor could declare any width).
        let dims = |key: &str, rank: usize| {
            let shape = self.backbone.get(key).ok_or_else(|| unknown(format!("key '{key}' is missing")))?.shape();
            if shape.len() != rank || shape.contains(&0) {
                return Err(unknown(format!("'{key}' has shape {shape:?}, not {rank} non-zero sizes")));
            }
            Ok(shape.to_vec())
        };
        let dim = dims("cls_token", 3)?[2];
        let patch = dims("patch_embed.proj.weight", 4)?[2];
        let slots = dims("pos_embed", 3)?[1] - 1;
        let grid = (slots as f64).sqrt().round() as usize;
        if slots == 0 || grid * grid != slots {
            return Err(unknown(format!("pos_embed has {slots} patch slots, not a square grid")));
        }
        let depth = (0..).take_while(|i| self.backbone.contains_key(&format!("blocks.{i}.norm1.weight"))).count();
        let hidden = dims("blocks.0.mlp.fc1.weight", 2)?[0];
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
        self.inferred_head()
    }

    /// The head's config as read off the tensor shapes alone.
    fn inferred_head(&self) -> Option<DinoHeadConfig> {
        let v = self.head.get("last_layer.weight_v").filter(|v| v.shape().len() == 2 && !v.shape().contains(&0))?;
        // 2-D `mlp.{i}.weight` tensors are the Linear layers (BatchNorm weights are 1-D).
        let mut linears: Vec<(usize, Vec<usize>)> = self
            .head
            .iter()
            .filter_map(|(key, t)| {
                let index = key.strip_prefix("mlp.")?.strip_suffix(".weight")?.parse().ok()?;
                (t.shape().len() == 2 && !t.shape().contains(&0)).then(|| (index, t.shape().to_vec()))
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
    /// the backbone's business and are ignored, as the official loaders do), ready for
    /// inference: BatchNorm in eval mode. Weights of another network are refused with both
    /// named, before any key is compared.
    pub fn backbone(&self, config: &BackboneConfig, device: &burn::tensor::Device) -> Result<Backbone> {
        Ok(match config {
            BackboneConfig::Vit(c) => Backbone::Vit(self.vit(c, device)?),
            BackboneConfig::ResNet(c) => Backbone::ResNet(self.resnet(c, device)?),
        })
    }

    /// The ViT backbone of [`Self::backbone`].
    pub fn vit(&self, config: &VitConfig, device: &burn::tensor::Device) -> Result<VisionTransformer> {
        let found = self.inferred_vit(Some(config.num_heads)).map(|c| describe_vit(&c));
        let found = found.or_else(|_| self.inferred_resnet().map(|c| describe_resnet(&c)));
        if let Ok(found) = found
            && found != describe_vit(config)
        {
            return Err(self.other_network(found, describe_vit(config)));
        }
        let mut vit = VisionTransformer::new(config, device);
        apply_strict(&mut vit, &self.backbone, &self.path, &describe_vit(config))?;
        Ok(vit)
    }

    /// The ResNet backbone of [`Self::backbone`], in eval mode.
    pub fn resnet(&self, config: &ResNetConfig, device: &burn::tensor::Device) -> Result<ResNet> {
        let found = self.inferred_resnet().map(|c| describe_resnet(&c));
        let found = found.or_else(|_| self.inferred_vit(None).map(|c| describe_vit(&c)));
        if let Ok(found) = found
            && found != describe_resnet(config)
        {
            return Err(self.other_network(found, describe_resnet(config)));
        }
        let mut resnet = ResNet::new(config, device);
        apply_strict(&mut resnet, &self.backbone, &self.path, &describe_resnet(config))?;
        Ok(crate::batch_norm::eval_mode(resnet))
    }

    /// The head built from `config` with these weights, checked strictly; a head of another
    /// shape (out_dim, bottleneck, layers) is refused with both shapes named.
    pub fn dino_head(&self, config: &DinoHeadConfig, device: &burn::tensor::Device) -> Result<DinoHead> {
        if let Some(found) = self.inferred_head() {
            // Neither is in the shapes: norm_last_layer only fixes weight_g's values, and a
            // one-layer head has no hidden layer.
            let hidden_dim = if found.nlayers == 1 { config.hidden_dim } else { found.hidden_dim };
            let found = DinoHeadConfig { norm_last_layer: config.norm_last_layer, hidden_dim, ..found };
            if describe_head(&found) != describe_head(config) {
                return Err(self.other_network(describe_head(&found), describe_head(config)));
            }
        }
        let mut head = DinoHead::new(config, device);
        apply_strict(&mut head, &self.head, &self.path, &describe_head(config))?;
        Ok(head)
    }

    fn other_network(&self, found: String, expected: String) -> WeightsError {
        WeightsError::OtherNetwork { path: self.path.clone(), found, expected }
    }
}

/// "vit_small/16 (embed dim 384, 12 blocks, 16 px patches, 224 px images, MLP 1536)"; the
/// number of heads is not in the shapes and not compared.
fn describe_vit(c: &VitConfig) -> String {
    let name = c.arch_name().map_or("a ViT".to_string(), |a| format!("{a}/{}", c.patch_size));
    format!(
        "{name} (embed dim {}, {} blocks, {} px patches, {} px images, MLP {}{})",
        c.embed_dim,
        c.depth,
        c.patch_size,
        c.img_size,
        (c.embed_dim as f64 * c.mlp_ratio).round(),
        if c.qkv_bias { "" } else { ", no qkv bias" }
    )
}

/// "resnet50 (bottleneck blocks [3, 4, 6, 3], width 64, ImageNet stem)".
fn describe_resnet(c: &ResNetConfig) -> String {
    format!(
        "{} ({:?} blocks {:?}, width {}, {:?} stem)",
        c.arch_name().unwrap_or("a ResNet"),
        c.block,
        c.layers,
        c.width,
        c.stem
    )
    .replace("Basic blocks", "basic blocks")
    .replace("Bottleneck blocks", "bottleneck blocks")
}

/// "a DINO head 384 -> out_dim 65536 (3 layers, hidden 2048, bottleneck 256)".
fn describe_head(c: &DinoHeadConfig) -> String {
    format!(
        "a DINO head {} -> out_dim {} ({} layers, hidden {}, bottleneck {}{})",
        c.in_dim,
        c.out_dim,
        c.nlayers,
        c.hidden_dim,
        c.bottleneck_dim,
        if c.use_bn { ", batch norm" } else { "" }
    )
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

fn damaged(path: &Path, format: &'static str, reason: impl fmt::Display) -> WeightsError {
    WeightsError::Damaged { path: path.into(), format, reason: reason.to_string() }
}

/// Every float tensor of a safetensors file (as f32) and its header metadata.
pub fn read_safetensors(path: &Path) -> Result<(StateDict, HashMap<String, String>)> {
    let bytes = fs::read(path).map_err(|source| WeightsError::Io { path: path.into(), source })?;
    let broken = |reason: String| damaged(path, "safetensors", reason);
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| broken(safetensors_size_problem(&bytes).unwrap_or_else(|| e.to_string())))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| broken(e.to_string()))?;
    let mut tensors = StateDict::new();
    for (name, view) in file.tensors() {
        use safetensors::Dtype as S;
        let dtype = match view.dtype() {
            S::F64 => DType::F64,
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::I64 => DType::I64,
            other => return Err(broken(format!("tensor '{name}' has unsupported dtype {other:?}"))),
        };
        keep_as_f32(name, TensorData::from_bytes_vec(view.data().to_vec(), view.shape().to_vec(), dtype), &mut tensors);
    }
    Ok((tensors, metadata))
}

/// What is wrong with the size of a safetensors file whose header the crate refused: the
/// header or the tensor data it declares stops short (a truncated file) or runs on.
fn safetensors_size_problem(bytes: &[u8]) -> Option<String> {
    let header_len = usize::try_from(u64::from_le_bytes(*bytes.first_chunk::<8>()?)).ok()?;
    let Some(header) = bytes.get(8..8usize.checked_add(header_len)?) else {
        return Some(format!(
            "truncated: its header declares {header_len} bytes of JSON, the file holds {} bytes in all",
            bytes.len()
        ));
    };
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let declared = header
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .filter_map(|(_, entry)| entry.get("data_offsets")?.get(1)?.as_u64())
        .max()?;
    let held = (bytes.len() - 8 - header_len) as u64;
    (declared != held).then(|| {
        let what = if declared > held { "truncated" } else { "trailing bytes" };
        format!("{what}: its header declares {declared} bytes of tensor data, the file holds {held}")
    })
}

/// A PyTorch reader's error: an unknown kind of file is not a weights file; anything else
/// (a broken zip, a pickle that stops short, storages smaller than their tensors) is damage.
fn pytorch_error(path: &Path, e: pytorch_reader::PytorchError) -> WeightsError {
    match e {
        pytorch_reader::PytorchError::InvalidFormat(_) if fs::metadata(path).is_ok_and(|m| m.len() == 0) => {
            format_error(path, "the file is empty")
        }
        pytorch_reader::PytorchError::InvalidFormat(reason) => format_error(path, reason),
        pytorch_reader::PytorchError::Io(source) if source.kind() == std::io::ErrorKind::NotFound => {
            WeightsError::Io { path: path.into(), source }
        }
        pytorch_reader::PytorchError::Zip(e) => damaged(
            path,
            "PyTorch",
            format!("its zip archive is incomplete or corrupt, as a truncated copy leaves it ({e})"),
        ),
        other => damaged(path, "PyTorch", other),
    }
}

/// Every float tensor of a PyTorch file (as f32), under its dotted path through the pickled
/// dictionaries (`teacher.backbone.cls_token`, `optimizer.state.0.exp_avg`, ...). The pickle
/// is interpreted, never run: objects other than data and tensors are dropped (see
/// [`ignored_objects`]).
pub fn read_pytorch(path: &Path) -> Result<StateDict> {
    let reader = pytorch_reader::PytorchReader::new(path).map_err(|e| pytorch_error(path, e))?;
    let mut tensors = StateDict::new();
    for (name, tensor) in reader.into_tensors() {
        let (_, dtype, shape, _, bytes) = bridge::from_pytorch(tensor)
            .into_parts()
            .map_err(|e| damaged(path, "PyTorch", format!("tensor '{name}': {e}")))?;
        keep_as_f32(name, TensorData::from_bytes(bytes, shape, dtype), &mut tensors);
    }
    Ok(tensors)
}

/// The Python objects of a PyTorch file that are neither plain data (numbers, strings, lists,
/// dicts) nor tensors, by key: what [`read_pytorch`] leaves out.
pub fn ignored_objects(path: &Path) -> Result<Vec<IgnoredObject>> {
    use pytorch_reader::PickleValue;
    fn walk(value: &PickleValue, key: &str, out: &mut Vec<IgnoredObject>) {
        let join = |k: &dyn fmt::Display| if key.is_empty() { k.to_string() } else { format!("{key}.{k}") };
        match value {
            PickleValue::Dict(items) => items.iter().for_each(|(k, v)| walk(v, &join(k), out)),
            PickleValue::List(items) => items.iter().enumerate().for_each(|(i, v)| walk(v, &join(&i), out)),
            PickleValue::Unsupported(python_type)
                if !matches!(python_type.as_str(), "torch.Tensor" | "torch.TypedStorage" | "torch.UntypedStorage") =>
            {
                let key = if key.is_empty() { "(the whole file)".to_string() } else { key.to_string() };
                out.push(IgnoredObject { key, python_type: python_type.clone() });
            }
            _ => {}
        }
    }
    let root = pytorch_reader::PytorchReader::read_pickle_data(path, None).map_err(|e| pytorch_error(path, e))?;
    let mut ignored = Vec::new();
    walk(&root, "", &mut ignored);
    ignored.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(ignored)
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
                DType::U8 => safetensors::Dtype::U8,
                other => panic!("tensor '{name}' is {other:?}; only f32, i64 and u8 are written"),
            };
            let view = safetensors::tensor::TensorView::new(dtype, data.shape().to_vec(), data.as_bytes())
                .expect("shape and byte length agree");
            (name.clone(), view)
        })
        .collect();
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| WeightsError::Write { path: path.into(), source: std::io::Error::other(e) })?;
    let tmp = path.with_extension("safetensors.tmp");
    write_durably(&tmp, &bytes, path).map_err(|source| {
        let _ = fs::remove_file(&tmp);
        WeightsError::Write { path: path.into(), source }
    })
}

/// Replaces `path` with `bytes` whole or not at all: written to `tmp`, synced, renamed over
/// `path`, and the directory synced, so that a process killed at any moment leaves the old file
/// or the new one (and perhaps `tmp`).
pub fn write_durably(tmp: &Path, bytes: &[u8], path: &Path) -> std::io::Result<()> {
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
pub fn save_backbone(backbone: &Backbone, config: &BackboneConfig, path: &Path) -> Result<()> {
    write_safetensors(path, torch_tensors(backbone, ""), config_metadata(&ModelConfig::new(config.clone())))
}

/// Saves a fine-tuned classifier as timm's `VisionTransformer(num_classes=C)` holds it: the
/// backbone's bare keys, then `head.weight` `[C, D]` and `head.bias`; the header records the
/// backbone's config and the number of classes.
pub fn save_classifier(classifier: &Classifier, config: &BackboneConfig, path: &Path) -> Result<()> {
    let mut tensors = torch_tensors(&classifier.backbone, "");
    tensors.extend(torch_tensors(&classifier.head, "head."));
    let mut metadata = config_metadata(&ModelConfig::new(config.clone()));
    metadata.insert("classes".into(), classifier.classes().to_string());
    write_safetensors(path, tensors, metadata)
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
        Ok(other) => Err(damaged(path, "PyTorch", format!("'{key}' is not an integer: {other:?}"))),
        Err(e) => Err(pytorch_error(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_list_of_ignored_objects_stays_one_short_line() {
        let objects: Vec<IgnoredObject> = (0..40)
            .map(|i| IgnoredObject {
                key: format!("optimizer.param_groups.{i}.lr"),
                python_type: "numpy.float64".into(),
            })
            .collect();
        let line = describe_ignored(&objects);
        assert!(line.starts_with("ignored 40 Python objects, none of them run: optimizer.param_groups.0.lr"));
        assert!(line.ends_with("optimizer.param_groups.11.lr (numpy.float64), and 28 more"), "{line}");
        assert_eq!(
            describe_ignored(&objects[..1]),
            "ignored 1 Python object, none of them run: optimizer.param_groups.0.lr (numpy.float64)"
        );
    }
}
