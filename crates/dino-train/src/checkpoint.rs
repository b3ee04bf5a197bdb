//! Training checkpoints: everything needed to continue a run exactly.
//!
//! One safetensors file: the student and teacher under the official checkpoint keys
//! (`student.backbone.*`, `teacher.head.*`, ...; readable by `Weights::read` with either
//! checkpoint key), the DINO loss center (`dino_loss.center`), the optimizer state
//! (`optimizer.{i}.m` / `.v` by parameter position) and, in the header, the position reached
//! (epochs done, and iterations of the next when written mid-epoch, with that epoch's sums so
//! far), the f16 loss scale (`fp16_scaler`, as main_dino.py saves its GradScaler), the resolved
//! training config and the model config.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use dino_model::DinoModel;
use dino_model::weights::{
    CheckpointKey, IgnoredObject, Weights, WeightsError, config_metadata, ignored_objects, model_tensors, read_pytorch,
    read_pytorch_int, read_safetensors, write_safetensors,
};

use crate::TrainConfig;
use crate::optim::{Optimizer, SavedState, official_state_order};
use crate::precision::LossScaler;
use crate::step::TrainState;
use crate::trainer::{EpochTotals, Position};

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: {problem}")]
    Invalid { path: String, problem: String },
}

fn tensor_data(t: Tensor<1>) -> TensorData {
    t.into_data()
}

/// Writes `state` and the loss scale at `position`, with the sums of the unfinished epoch when
/// mid-epoch.
pub(crate) fn save_checkpoint(
    path: &Path,
    (state, scaler): (&TrainState, &LossScaler),
    position: Position,
    epoch_sums: Option<&EpochTotals>,
    config: &TrainConfig,
) -> Result<(), CheckpointError> {
    let model_config = config
        .model_config()
        .map_err(|problem| CheckpointError::Invalid { path: path.display().to_string(), problem })?;
    let mut tensors = model_tensors(&state.student, "student.");
    tensors.extend(model_tensors(&state.teacher, "teacher."));
    tensors.push(("dino_loss.center".into(), state.loss.center.clone().into_data()));
    let mut steps = Vec::new();
    for s in state.optimizer.export(&state.student) {
        steps.push((s.index, s.step));
        tensors.push((format!("optimizer.{}.m", s.index), tensor_data(s.m)));
        if let Some(v) = s.v {
            tensors.push((format!("optimizer.{}.v", s.index), tensor_data(v)));
        }
    }
    let mut metadata: HashMap<String, String> = config_metadata(&model_config);
    metadata.insert("epoch".into(), position.epoch.to_string());
    metadata.insert("iteration".into(), position.iteration.to_string());
    if let Some(sums) = epoch_sums {
        metadata.insert("epoch_sums".into(), serde_json::to_string(sums).expect("numbers serialise"));
    }
    metadata.insert("fp16_scaler".into(), serde_json::to_string(scaler).expect("numbers serialise"));
    metadata.insert("train_config".into(), config.to_toml());
    metadata.insert("optimizer_steps".into(), serde_json::to_string(&steps).expect("numbers serialise"));
    Ok(write_safetensors(path, tensors, metadata)?)
}

/// A run restored from a checkpoint.
pub struct Restored {
    pub state: TrainState,
    /// Where training continues.
    pub position: Position,
    /// The sums of the unfinished epoch, for a checkpoint written mid-epoch.
    pub(crate) epoch_sums: Option<EpochTotals>,
    /// The f16 loss scale reached (GradScaler's start for a new run or an official checkpoint).
    pub scaler: LossScaler,
    /// The config the run was started with.
    pub config: TrainConfig,
    /// Python objects of an official checkpoint that were left out (its `args`, ...).
    pub ignored: Vec<IgnoredObject>,
}

/// The training config recorded in a checkpoint's header, read without its tensors.
pub fn saved_config(path: &Path) -> Result<TrainConfig, CheckpointError> {
    use std::io::Read;
    let invalid = |problem: String| CheckpointError::Invalid { path: path.display().to_string(), problem };
    let mut file = std::fs::File::open(path).map_err(|e| invalid(e.to_string()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| invalid(format!("no safetensors header ({e})")))?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err(invalid(format!("a {len}-byte header is not a checkpoint's")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| invalid(format!("truncated header ({e})")))?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| invalid(format!("bad header: {e}")))?;
    let text = header["__metadata__"]["train_config"]
        .as_str()
        .ok_or_else(|| invalid("not a dino training checkpoint (no train_config)".into()))?;
    TrainConfig::default().with_toml(text).map_err(|e| invalid(format!("bad train_config: {e}")))
}

/// Reads a checkpoint written by `save_checkpoint`: the student on `train_device` (autodiff),
/// the teacher, center and optimizer state on `device`.
pub fn load_checkpoint(path: &Path, device: &Device, train_device: &Device) -> Result<Restored, CheckpointError> {
    let invalid = |problem: String| CheckpointError::Invalid { path: path.display().to_string(), problem };
    let (raw, metadata) = read_safetensors(path)?;
    let config = saved_config(path)?;
    let epochs_done = metadata.get("epoch").and_then(|e| e.parse().ok()).ok_or_else(|| invalid("no epoch".into()))?;
    // Checkpoints from before mid-epoch saves have no iteration: they are at an epoch's end.
    let iteration =
        metadata.get("iteration").map_or(Ok(0), |i| i.parse()).map_err(|_| invalid("bad iteration".into()))?;
    let epoch_sums = match metadata.get("epoch_sums") {
        Some(json) => Some(serde_json::from_str(json).map_err(|e| invalid(format!("bad epoch_sums: {e}")))?),
        None => None,
    };
    // Checkpoints from before the scale was saved restart it, as a new run does.
    let scaler = match metadata.get("fp16_scaler") {
        Some(json) => serde_json::from_str(json).map_err(|e| invalid(format!("bad fp16_scaler: {e}")))?,
        None => LossScaler::default(),
    };

    let student = read_network(path, CheckpointKey::Student, &config, train_device)?;
    let teacher = read_network(path, CheckpointKey::Teacher, &config, device)?;

    let center = raw.get("dino_loss.center").ok_or_else(|| invalid("no dino_loss.center".into()))?;
    let mut loss = config.dino_loss(device);
    loss.center = Tensor::from_data(center.clone(), device);

    let steps = metadata
        .get("optimizer_steps")
        .and_then(|s| serde_json::from_str::<Vec<(usize, i32)>>(s).ok())
        .ok_or_else(|| invalid("no optimizer_steps".into()))?;
    let mut saved = Vec::new();
    for (index, step) in steps {
        let get =
            |k: &str| raw.get(&format!("optimizer.{index}.{k}")).map(|d| Tensor::<1>::from_data(d.clone(), device));
        let m = get("m").ok_or_else(|| invalid(format!("optimizer.{index}.m is missing")))?;
        saved.push(SavedState { index, step, m, v: get("v") });
    }
    let optimizer = Optimizer::import(config.optimizer, &student, saved);
    let position = Position { epoch: epochs_done, iteration };
    let state = TrainState { student, teacher, loss, optimizer };
    Ok(Restored { state, position, epoch_sums, scaler, config, ignored: Vec::new() })
}

/// The student or teacher of a checkpoint (ours or official), built as `config` says and
/// checked strictly.
fn read_network(
    path: &Path,
    key: CheckpointKey,
    config: &TrainConfig,
    device: &Device,
) -> Result<DinoModel, CheckpointError> {
    let invalid = |problem: String| CheckpointError::Invalid { path: path.display().to_string(), problem };
    let model_config = config.model_config().map_err(invalid)?;
    let head_config = model_config.head.clone().expect("training configs have a head");
    let weights = Weights::read(path, key)?;
    Ok(DinoModel {
        backbone: weights.backbone(&model_config.backbone, device)?,
        head: weights.dino_head(&head_config, device)?,
    })
}

/// Reads an official `main_dino.py` checkpoint (`checkpoint.pth`: `student` with `module.`
/// prefixes, `teacher`, `optimizer`, `epoch`, `dino_loss`) to continue training it with `config`,
/// which must describe the same network (checked strictly). The optimizer state is mapped from
/// the official parameter groups (regularised, then not) onto our parameters.
pub fn load_official_checkpoint(
    path: &Path,
    config: &TrainConfig,
    device: &Device,
    train_device: &Device,
) -> Result<Restored, CheckpointError> {
    let invalid = |problem: String| CheckpointError::Invalid { path: path.display().to_string(), problem };
    let student = read_network(path, CheckpointKey::Student, config, train_device)?;
    let teacher = read_network(path, CheckpointKey::Teacher, config, device)?;
    let raw = read_pytorch(path)?;
    let epochs_done = read_pytorch_int(path, "epoch")? as usize;

    let center = raw.get("dino_loss.center").ok_or_else(|| invalid("no dino_loss.center".into()))?;
    let mut loss = config.dino_loss(device);
    loss.center = Tensor::from_data(center.clone(), device);

    let mut saved = Vec::new();
    for (i, (position, numel)) in official_state_order(&student).into_iter().enumerate() {
        let get = |k: &str| raw.get(&format!("optimizer.state.{i}.{k}"));
        let flat = |d: &TensorData| {
            Tensor::<1>::from_data(TensorData::new(d.iter::<f32>().collect::<Vec<_>>(), [d.num_elements()]), device)
        };
        // AdamW keeps exp_avg / exp_avg_sq / step, SGD momentum_buffer, LARS mu.
        let Some(m) = get("exp_avg").or_else(|| get("momentum_buffer")).or_else(|| get("mu")) else {
            continue; // no state yet (e.g. a frozen last layer)
        };
        if m.num_elements() != numel {
            return Err(invalid(format!(
                "optimizer.state.{i} has {} values but parameter {position} has {numel}: not the same network",
                m.num_elements()
            )));
        }
        let step = get("step").map_or(1, |s| s.iter::<f32>().next().unwrap_or(1.0) as i32);
        saved.push(SavedState { index: position, step, m: flat(m), v: get("exp_avg_sq").map(flat) });
    }
    let optimizer = Optimizer::import(config.optimizer, &student, saved);
    let position = Position { epoch: epochs_done, iteration: 0 };
    let state = TrainState { student, teacher, loss, optimizer };
    let ignored = ignored_objects(path)?;
    Ok(Restored { state, position, epoch_sums: None, scaler: LossScaler::default(), config: config.clone(), ignored })
}

#[cfg(test)]
mod tests {
    use burn::module::Module;

    use super::*;

    /// A resumed f16 run goes on with the scale it reached, as main_dino.py restores its
    /// GradScaler, instead of starting again at 2^16 and overflowing its way back down.
    #[test]
    fn the_loss_scale_is_saved_and_restored() {
        let config = TrainConfig {
            arch: "vit_tiny".into(),
            patch_size: 8,
            depth: 1,
            img_size: 16,
            out_dim: 8,
            head_hidden_dim: 16,
            head_bottleneck_dim: 8,
            ..TrainConfig::default()
        };
        let device = Device::flex();
        let model_config = config.model_config().unwrap();
        let student = DinoModel::new(&model_config, &device.clone().autodiff());
        let teacher = student.valid();
        let state = TrainState {
            student,
            teacher,
            loss: config.dino_loss(&device),
            optimizer: Optimizer::new(config.optimizer),
        };
        let scaler = LossScaler { scale: 512.0, good_steps: 17 };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.safetensors");
        save_checkpoint(&path, (&state, &scaler), Position { epoch: 3, iteration: 0 }, None, &config).unwrap();
        let restored = load_checkpoint(&path, &device, &device.clone().autodiff()).unwrap();
        assert_eq!(restored.scaler, scaler);
        assert_eq!(restored.position, Position { epoch: 3, iteration: 0 });
    }
}
