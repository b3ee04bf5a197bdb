//! Training configuration: every `main_dino.py` argument under its own name, with its official
//! default, plus named presets and `key=value` overrides.

use std::collections::BTreeMap;

use dino_data::{ImagePolicy, MultiCropConfig};
use dino_model::{BackboneConfig, DinoHeadConfig, ModelConfig, VitConfig};
use serde::{Deserialize, Serialize};

use crate::optim::OptimizerKind;
use crate::precision::Precision;

/// A training run's settings. `TrainConfig::default()` is `main_dino.py`'s defaults (commit
/// 7c446df) for the fields it has; the others say where their default comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    // ---- model ----
    /// `--arch`: vit_tiny, vit_small, vit_base, or resnet18/34/50 (`_cifar`: the 32 px stem).
    pub arch: String,
    /// `--patch_size` (official 16); 0 derives it from the images (`fit_to_images`). This and
    /// the other ViT settings below (depth to img_size, drop_path_rate) do nothing for a ResNet.
    pub patch_size: usize,
    /// Blocks; the official presets have 12 (ours: a smaller depth for small data and CPUs).
    pub depth: usize,
    /// Token width; 0 takes the arch's (192 / 384 / 768). For custom networks.
    pub embed_dim: usize,
    /// Attention heads; 0 takes the arch's (3 / 6 / 12). For custom networks.
    pub num_heads: usize,
    /// Resolution the position embedding is trained for (official model default 224); set it to
    /// the global crop size so training needs no interpolation (0: the global crop size).
    pub img_size: usize,
    /// `--out_dim`, K (official 65536).
    pub out_dim: usize,
    /// `--norm_last_layer` (official true).
    pub norm_last_layer: bool,
    /// `--use_bn_in_head` (official false).
    pub use_bn_in_head: bool,
    /// Hidden width of the head MLP (official `DINOHead` 2048).
    pub head_hidden_dim: usize,
    /// Bottleneck width of the head (official 256).
    pub head_bottleneck_dim: usize,
    /// `--drop_path_rate` (official 0.1), student only.
    pub drop_path_rate: f64,

    // ---- teacher ----
    /// `--momentum_teacher` (official 0.996), cosine-scheduled to 1.
    pub momentum_teacher: f64,
    /// `--warmup_teacher_temp` (official 0.04).
    pub warmup_teacher_temp: f64,
    /// `--teacher_temp` (official 0.04).
    pub teacher_temp: f64,
    /// `--warmup_teacher_temp_epochs` (official 0).
    pub warmup_teacher_temp_epochs: usize,
    /// Momentum of the center's EMA (official `DINOLoss(center_momentum=0.9)`); 1 keeps the
    /// center at zero, i.e. no centering.
    pub center_momentum: f64,

    // ---- optimisation ----
    /// `--optimizer` (official adamw).
    pub optimizer: OptimizerKind,
    /// `--lr`: peak learning rate for a batch of 256 (official 5e-4); scaled by batch / 256.
    pub lr: f64,
    /// `--min_lr` (official 1e-6).
    pub min_lr: f64,
    /// `--warmup_epochs` (official 10).
    pub warmup_epochs: usize,
    /// `--weight_decay` (official 0.04), cosine-scheduled to `weight_decay_end`.
    pub weight_decay: f64,
    /// `--weight_decay_end` (official 0.4).
    pub weight_decay_end: f64,
    /// `--clip_grad`: per-parameter max gradient norm, 0 disables (official 3.0).
    pub clip_grad: f64,
    /// `--freeze_last_layer`: epochs with the head's last layer frozen (official 1).
    pub freeze_last_layer: usize,
    /// `--use_fp16` (official true, f16 with loss scaling on CUDA): f32 here by default; f16 or
    /// bf16 run the forward and backward passes in that type on the GPU path (`precision`).
    pub precision: Precision,
    /// `--batch_size_per_gpu` (official 64); one device here.
    pub batch_size: usize,
    /// `--epochs` (official 100).
    pub epochs: usize,

    // ---- multi-crop ----
    /// Crop sizes, scales, number of local crops, blur range and normalisation (official:
    /// 224 / 96 px, scales (0.4, 1) and (0.05, 0.4), 8 local crops, ImageNet statistics).
    pub crops: MultiCropConfig,
    /// Decoding limits for image files, and whether a file that cannot be used stops the run
    /// (`strict`) or is skipped (ours; the official ImageFolder stops at the first).
    pub images: ImagePolicy,

    // ---- run ----
    /// `--seed` (official 0): initialisation, data order and augmentation.
    pub seed: u64,
    /// `--saveckp_freq`: keep a copy of the checkpoint every N epochs (official 20).
    pub saveckp_freq: usize,
    /// Threads preparing batches; 0 = all cores (official `--num_workers` 10 processes).
    pub num_workers: usize,
    /// Use only the first N training images (0 = all); for quick runs.
    pub max_images: usize,

    // ---- monitoring (ours) ----
    /// k-NN top-1 of the teacher on the validation set every N epochs (0 = never).
    pub knn_every: usize,
    /// k for that k-NN (official eval_knn: 20 works best).
    pub knn_k: usize,
    /// Temperature of the k-NN vote (official 0.07).
    pub knn_temperature: f64,
    /// Images of the training set used as the k-NN bank (0 = all).
    pub knn_train_images: usize,
    /// Validation images classified (0 = all).
    pub knn_test_images: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            arch: "vit_small".into(),
            patch_size: 16,
            depth: 12,
            embed_dim: 0,
            num_heads: 0,
            img_size: 224,
            out_dim: 65536,
            norm_last_layer: true,
            use_bn_in_head: false,
            head_hidden_dim: 2048,
            head_bottleneck_dim: 256,
            drop_path_rate: 0.1,
            momentum_teacher: 0.996,
            warmup_teacher_temp: 0.04,
            teacher_temp: 0.04,
            warmup_teacher_temp_epochs: 0,
            center_momentum: 0.9,
            optimizer: OptimizerKind::Adamw,
            lr: 0.0005,
            min_lr: 1e-6,
            warmup_epochs: 10,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            clip_grad: 3.0,
            freeze_last_layer: 1,
            precision: Precision::F32,
            batch_size: 64,
            epochs: 100,
            crops: MultiCropConfig::default(),
            images: ImagePolicy::default(),
            seed: 0,
            saveckp_freq: 20,
            num_workers: 0,
            max_images: 0,
            knn_every: 1,
            knn_k: 20,
            knn_temperature: 0.07,
            knn_train_images: 0,
            knn_test_images: 0,
        }
    }
}

/// The largest global crop `fit_to_images` picks: larger images are cropped and resized to it
/// (preset `small` is for 28-96 px images; bigger ones need preset `official`'s 224 px).
pub const MAX_AUTO_GLOBAL: u32 = 96;

/// The values a numeric setting accepts, for `validate` and its messages.
#[derive(Debug, Clone, Copy)]
enum Accepts {
    /// `value >= min`, finite.
    AtLeast(f64),
    /// `value > 0`, finite.
    Positive,
    /// `[min, max]`.
    Closed(f64, f64),
    /// `[min, max)`.
    HalfOpen(f64, f64),
}

impl Accepts {
    fn admits(self, value: f64) -> bool {
        match self {
            Accepts::AtLeast(min) => value >= min && value.is_finite(),
            Accepts::Positive => value > 0.0 && value.is_finite(),
            Accepts::Closed(min, max) => (min..=max).contains(&value),
            Accepts::HalfOpen(min, max) => (min..max).contains(&value),
        }
    }
}

impl std::fmt::Display for Accepts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Accepts::AtLeast(min) => write!(f, "at least {min}"),
            Accepts::Positive => write!(f, "positive"),
            Accepts::Closed(min, max) => write!(f, "in [{min}, {max}]"),
            Accepts::HalfOpen(min, max) => write!(f, "in [{min}, {max})"),
        }
    }
}

/// Names of the built-in presets.
pub const PRESETS: [&str; 6] = ["official", "official_rn50", "small", "small28", "fashion", "quick"];

impl TrainConfig {
    /// A named preset: `official` (main_dino.py's ViT-S/16 defaults), `official_rn50` (the
    /// README's ResNet-50 command), `small28` (28-32 px images
    /// such as Fashion-MNIST, after the small-data recipe in `docs/fashion-mnist-anchors.md`),
    /// `fashion` (our Fashion-MNIST recipe for 2 CPU cores, BENCHMARKS.md) or
    /// `quick` (a few minutes on 2 CPU cores with the built-in synthetic dataset: small batches,
    /// so that its 1000 iterations are enough to learn; peak lr 0.008 x 16 / 256).
    pub fn preset(name: &str) -> Option<Self> {
        let official = Self::default();
        match name {
            "official" => Some(official),
            // The official README's ResNet-50 run: `--arch resnet50 --optimizer sgd --lr 0.03
            // --weight_decay 1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1
            // --local_crops_scale 0.05 0.14`, main_dino.py's defaults otherwise.
            "official_rn50" => Some(Self {
                arch: "resnet50".into(),
                optimizer: OptimizerKind::Sgd,
                lr: 0.03,
                weight_decay: 1e-4,
                weight_decay_end: 1e-4,
                crops: MultiCropConfig { global_scale: (0.14, 1.0), local_scale: (0.05, 0.14), ..official.crops },
                ..official
            }),
            // Small images (28-96 px), chosen by the sweep on a Fashion-MNIST validation split
            // (BENCHMARKS.md, section 1): sizes from the data, a teacher that follows the student
            // within a few hundred iterations, no frozen last layer, K = 512. Batch 64 at the
            // per-step lr of small28 (2e-3 x 64 / 256) for twice its updates. Blur at most sigma
            // 0.5: the official 0.1-2 px is for 224 px, and sigma 1 erases a 28 px garment's
            // texture. No drop path: it slows learning in a run of a few epochs.
            "small" => Some(Self {
                arch: "vit_tiny".into(),
                patch_size: 0,
                depth: 4,
                img_size: 0,
                out_dim: 512,
                head_hidden_dim: 1024,
                head_bottleneck_dim: 256,
                drop_path_rate: 0.0,
                momentum_teacher: 0.99,
                freeze_last_layer: 0,
                batch_size: 64,
                lr: 0.002,
                // 11 epochs of Fashion-MNIST's 60 000 images, k-NN after each, fit in an hour
                // on 2 cores (about 5 minutes an epoch).
                epochs: 11,
                warmup_epochs: 1,
                crops: MultiCropConfig {
                    global_size: 0,
                    local_size: 0,
                    global_scale: (0.4, 1.0),
                    local_scale: (0.1, 0.4),
                    local_crops: 6,
                    blur_radius: (0.1, 0.5),
                    ..MultiCropConfig::default()
                },
                saveckp_freq: 5,
                ..official
            }),
            "small28" => Some(Self {
                arch: "vit_tiny".into(),
                patch_size: 4,
                depth: 4,
                img_size: 28,
                out_dim: 2048,
                head_hidden_dim: 1024,
                head_bottleneck_dim: 256,
                batch_size: 128,
                lr: 0.001,
                epochs: 6,
                warmup_epochs: 1,
                warmup_teacher_temp_epochs: 5,
                teacher_temp: 0.07,
                crops: MultiCropConfig {
                    global_size: 28,
                    local_size: 12,
                    global_scale: (0.4, 1.0),
                    local_scale: (0.1, 0.4),
                    local_crops: 4,
                    blur_radius: (0.1, 1.0),
                    ..MultiCropConfig::default()
                },
                saveckp_freq: 5,
                knn_train_images: 10000,
                knn_test_images: 2000,
                ..official
            }),
            // Preset small with the ImageNet-style teacher it replaced: K = 2048, momentum 0.996
            // to 1 and a frozen last layer in epoch 0, on fixed 28 px sizes (patch 7: 17 tokens per
            // global crop instead of 50 with patch 4, three times the images per second). Below
            // raw pixels after 3 epochs; BENCHMARKS.md, section 1, measures each difference.
            "fashion" => {
                let small = Self::preset("small")?;
                Some(Self {
                    patch_size: 7,
                    img_size: 28,
                    out_dim: 2048,
                    momentum_teacher: official.momentum_teacher,
                    freeze_last_layer: official.freeze_last_layer,
                    epochs: 3,
                    crops: MultiCropConfig { global_size: 28, local_size: 14, ..small.crops },
                    saveckp_freq: 1,
                    ..small
                })
            }
            "quick" => Some(Self {
                arch: "vit_tiny".into(),
                patch_size: 8,
                depth: 2,
                img_size: 32,
                out_dim: 256,
                head_hidden_dim: 512,
                head_bottleneck_dim: 128,
                batch_size: 16,
                lr: 0.008,
                epochs: 8,
                warmup_epochs: 1,
                momentum_teacher: 0.99,
                crops: MultiCropConfig {
                    global_size: 32,
                    local_size: 16,
                    global_scale: (0.4, 1.0),
                    local_scale: (0.1, 0.4),
                    local_crops: 2,
                    blur_radius: (0.1, 1.0),
                    ..MultiCropConfig::default()
                },
                saveckp_freq: 5,
                ..official
            }),
            _ => None,
        }
    }

    /// Whether some size is left to the data (0): `patch_size`, `img_size` or a crop size.
    pub fn sizes_from_images(&self) -> bool {
        self.patch_size == 0 || self.img_size == 0 || self.crops.global_size == 0 || self.crops.local_size == 0
    }

    /// The config with every size left at 0 derived from the images' typical shorter side
    /// (`Dataset::typical_side`), for presets that work on any small image:
    /// - global crops: the images' side, at most [`MAX_AUTO_GLOBAL`] px;
    /// - patch: a quarter of the global crop (4 x 4 tokens, the grid that trained best on
    ///   28 px Fashion-MNIST per unit of time; BENCHMARKS.md), at least 4 px; the global crop is
    ///   then rounded down to whole patches;
    /// - local crops: half the global side in whole patches (at least one patch);
    /// - `img_size`: the global crop, so training needs no position-embedding interpolation.
    ///
    /// Sizes that are set are kept. The result is what `config.toml` records.
    pub fn fit_to_images(mut self, side: u32) -> Self {
        let global = if self.crops.global_size == 0 { side.min(MAX_AUTO_GLOBAL) } else { self.crops.global_size };
        if self.patch_size == 0 {
            self.patch_size = (global as usize / 4).max(4);
        }
        let patch = self.patch_size as u32;
        if self.crops.global_size == 0 {
            self.crops.global_size = (global / patch).max(1) * patch;
        }
        if self.crops.local_size == 0 {
            self.crops.local_size = (self.crops.global_size / 2 / patch).max(1) * patch;
        }
        if self.img_size == 0 {
            self.img_size = self.crops.global_size as usize;
        }
        self
    }

    /// The network this config trains (student and teacher share it; only the student uses drop
    /// path).
    pub fn model_config(&self) -> Result<ModelConfig, String> {
        let backbone = match BackboneConfig::preset(&self.arch, self.patch_size) {
            Some(BackboneConfig::Vit(base)) => BackboneConfig::Vit(VitConfig {
                depth: self.depth,
                embed_dim: if self.embed_dim > 0 { self.embed_dim } else { base.embed_dim },
                num_heads: if self.num_heads > 0 { self.num_heads } else { base.num_heads },
                img_size: self.img_size,
                drop_path_rate: self.drop_path_rate,
                ..base
            }),
            Some(resnet) => resnet,
            None => {
                return Err(format!(
                    "unknown arch '{}'; choose one of {}",
                    self.arch,
                    dino_model::config::arch_names()
                ));
            }
        };
        let head = DinoHeadConfig::new(backbone.embed_dim(), self.out_dim)
            .with_use_bn(self.use_bn_in_head)
            .with_norm_last_layer(self.norm_last_layer)
            .with_hidden_dim(self.head_hidden_dim)
            .with_bottleneck_dim(self.head_bottleneck_dim);
        Ok(ModelConfig::new(backbone).with_head(Some(head)))
    }

    /// Checks everything that would otherwise fail later, with a message naming the setting.
    /// Sizes left to the data are checked as they would be for 64 px images.
    pub fn validate(&self) -> Result<(), String> {
        if self.sizes_from_images() {
            return self.clone().fit_to_images(64).validate();
        }
        use Accepts::{AtLeast, Closed, HalfOpen, Positive};
        let settings = [
            ("depth", self.depth as f64, AtLeast(1.0)),
            ("out_dim", self.out_dim as f64, AtLeast(1.0)),
            ("head_hidden_dim", self.head_hidden_dim as f64, AtLeast(1.0)),
            ("head_bottleneck_dim", self.head_bottleneck_dim as f64, AtLeast(1.0)),
            ("epochs", self.epochs as f64, AtLeast(1.0)),
            ("batch_size", self.batch_size as f64, AtLeast(1.0)),
            ("lr", self.lr, Positive),
            ("min_lr", self.min_lr, AtLeast(0.0)),
            ("weight_decay", self.weight_decay, AtLeast(0.0)),
            ("weight_decay_end", self.weight_decay_end, AtLeast(0.0)),
            ("clip_grad", self.clip_grad, AtLeast(0.0)),
            ("drop_path_rate", self.drop_path_rate, HalfOpen(0.0, 1.0)),
            ("momentum_teacher", self.momentum_teacher, Closed(0.0, 1.0)),
            ("center_momentum", self.center_momentum, Closed(0.0, 1.0)),
            ("teacher_temp", self.teacher_temp, Positive),
            ("warmup_teacher_temp", self.warmup_teacher_temp, Positive),
            ("knn_k", self.knn_k as f64, AtLeast(1.0)),
            ("knn_temperature", self.knn_temperature, Positive),
            ("images.max_pixels", self.images.max_pixels as f64, AtLeast(1.0)),
            ("images.max_file_bytes", self.images.max_file_bytes as f64, AtLeast(1.0)),
        ];
        for (key, value, accepts) in settings {
            if !accepts.admits(value) {
                return Err(format!("{key} = {value} is out of range: it must be {accepts}"));
            }
        }
        let model = self.model_config()?;
        model.backbone.validate()?;
        if let Some(head) = &model.head {
            head.validate()?;
        }
        self.crops.validate().map_err(|e| format!("crops.{e}"))?;
        for (name, size) in [("crops.global_size", self.crops.global_size), ("crops.local_size", self.crops.local_size)]
        {
            if (size as usize) < self.patch_size {
                return Err(format!("{name} = {size} is smaller than one patch (patch_size = {})", self.patch_size));
            }
        }
        Ok(())
    }

    /// The DINO loss of this config, with a zero center.
    pub fn dino_loss(&self, device: &burn::tensor::Device) -> crate::DinoLoss {
        crate::DinoLoss {
            center_momentum: self.center_momentum,
            ..crate::DinoLoss::new(self.out_dim, self.crops.num_crops(), device)
        }
    }

    /// The peak learning rate: `lr * batch_size / 256` (linear scaling rule, as main_dino.py).
    pub fn peak_lr(&self) -> f64 {
        self.lr * self.batch_size as f64 / 256.0
    }

    /// Applies `key=value` overrides (TOML values; dotted keys reach `crops.*`), failing on
    /// unknown keys and ill-typed values.
    pub fn with_overrides<'a>(self, overrides: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut table = toml::Table::try_from(&self).map_err(|e| e.to_string())?;
        for item in overrides {
            let (key, raw) = item.split_once('=').ok_or_else(|| format!("'{item}' is not key=value"))?;
            let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
                Ok(mut t) => t.remove("v").expect("parsed"),
                Err(_) => toml::Value::String(raw.to_string()),
            };
            let mut target = &mut table;
            let mut parts: Vec<&str> = key.trim().split('.').collect();
            let last = parts.pop().expect("split yields one part");
            for part in parts {
                target = target
                    .get_mut(part)
                    .and_then(toml::Value::as_table_mut)
                    .ok_or_else(|| format!("unknown setting '{key}'"))?;
            }
            if !target.contains_key(last) {
                return Err(format!("unknown setting '{key}'"));
            }
            target.insert(last.to_string(), value);
            // A value of the wrong type (-1 for a count, a word for a number) is named here,
            // where the key is known.
            if let Err(e) = toml::Value::Table(table.clone()).try_into::<Self>() {
                return Err(format!("{key} = {raw}: {}", e.message()));
            }
        }
        Self::from_table(table)
    }

    /// Merges a TOML config file's text over this config. Every key must be a setting: a
    /// `preset` key is refused like any unknown one (presets are picked with `--preset`).
    pub fn with_toml(self, text: &str) -> Result<Self, String> {
        let mut table = toml::Table::try_from(&self).map_err(|e| e.to_string())?;
        let file: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        merge(&mut table, file);
        Self::from_table(table)
    }

    fn from_table(table: toml::Table) -> Result<Self, String> {
        let config: Self =
            toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| e.message().to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// The resolved config as TOML, as saved in every run directory.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("configs serialise")
    }

    /// Every setting by dotted key (`lr`, `crops.local_crops`, ...).
    pub fn settings(&self) -> BTreeMap<String, toml::Value> {
        fn walk(table: toml::Table, prefix: &str, out: &mut BTreeMap<String, toml::Value>) {
            for (key, value) in table {
                match value {
                    toml::Value::Table(inner) => walk(inner, &format!("{prefix}{key}."), out),
                    value => {
                        out.insert(format!("{prefix}{key}"), value);
                    }
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(toml::Table::try_from(self).expect("configs serialise"), "", &mut out);
        out
    }

    /// What a resumed run takes of `requested` over the run's own `self`: the settings of
    /// [`RESUMABLE`] that differ, as "`key` = old -> new" lines, or, when any other setting
    /// differs, an error naming each (those shape the network, the data or the optimisation
    /// the checkpoint is in the middle of).
    pub fn resume_changes(&self, requested: &TrainConfig) -> Result<Vec<String>, String> {
        let (saved, wanted) = (self.settings(), requested.settings());
        let differing = saved.iter().filter(|(key, value)| wanted.get(*key) != Some(value));
        let (safe, fixed): (Vec<_>, Vec<_>) = differing
            .map(|(key, old)| {
                (key, format!("{key} = {old} -> {}", wanted.get(key).map_or("?".into(), |v| v.to_string())))
            })
            .partition(|(key, _)| RESUMABLE.iter().any(|r| r == key || key.starts_with(&format!("{r}."))));
        if !fixed.is_empty() {
            let list: Vec<_> = fixed.into_iter().map(|(_, change)| change).collect();
            return Err(format!(
                "a resumed run keeps the settings it was started with, but these differ: {}",
                list.join(", ")
            ));
        }
        Ok(safe.into_iter().map(|(_, change)| change).collect())
    }
}

/// Settings a resumed run may change: how long it runs (the schedules are then spread over the
/// new number of epochs, as `main_dino.py` recomputes them from `--epochs`), how often it saves
/// and monitors, how many loader threads it uses, and how it reads images.
pub const RESUMABLE: [&str; 9] = [
    "epochs",
    "saveckp_freq",
    "num_workers",
    "knn_every",
    "knn_k",
    "knn_temperature",
    "knn_train_images",
    "knn_test_images",
    "images",
];

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(dst)), toml::Value::Table(src)) => merge(dst, src),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_official_is_the_default() {
        for name in PRESETS {
            TrainConfig::preset(name).unwrap().validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert_eq!(TrainConfig::preset("official").unwrap(), TrainConfig::default());
        assert_eq!(TrainConfig::default().peak_lr(), 0.0005 * 64.0 / 256.0);
    }

    #[test]
    fn overrides_reach_nested_keys_and_reject_unknown_ones() {
        let c = TrainConfig::default()
            .with_overrides(["epochs=3", "crops.local_crops=2", "optimizer=sgd", "arch=vit_tiny"])
            .unwrap();
        assert_eq!((c.epochs, c.crops.local_crops, c.optimizer), (3, 2, OptimizerKind::Sgd));
        assert!(TrainConfig::default().with_overrides(["epoch=3"]).unwrap_err().contains("unknown setting 'epoch'"));
        assert!(TrainConfig::default().with_overrides(["epochs=0"]).unwrap_err().contains("epochs"));
        assert!(TrainConfig::default().with_overrides(["epochs=many"]).is_err());
        let round = TrainConfig::default().with_toml(&TrainConfig::preset("quick").unwrap().to_toml()).unwrap();
        assert_eq!(round, TrainConfig::preset("quick").unwrap());
        assert!(TrainConfig::default().with_toml("preset = \"small\"").is_err(), "a file names settings only");
    }

    /// Every numeric setting, nested ones included, refuses -1 (except a normalisation mean,
    /// which may be negative) and NaN, with a message naming the key and the value.
    #[test]
    fn every_numeric_setting_is_range_checked() {
        let is_number = |v: &toml::Value| v.is_integer() || v.is_float();
        let keys: Vec<(String, toml::Value)> = TrainConfig::default()
            .settings()
            .into_iter()
            .filter(|(_, v)| is_number(v) || v.as_array().is_some_and(|items| items.iter().all(is_number)))
            .collect();
        assert!(keys.len() > 40, "{keys:?}");
        for (key, value) in keys {
            let (minus_one, nan) = match &value {
                toml::Value::Array(items) => (
                    format!("[{}]", vec!["-1"; items.len()].join(", ")),
                    format!("[{}]", vec!["nan"; items.len()].join(", ")),
                ),
                _ => ("-1".to_string(), "nan".to_string()),
            };
            let is_float = value.is_float() || value.as_array().is_some_and(|a| a[0].is_float());
            let mut bad = vec![minus_one.clone()];
            if is_float {
                bad.push(nan);
            }
            for raw in bad {
                let result = TrainConfig::default().with_overrides([format!("{key}={raw}").as_str()]);
                if key == "crops.mean" && raw == minus_one {
                    assert!(result.is_ok(), "{key}={raw}: {result:?}");
                    continue;
                }
                let message = result.expect_err(&format!("{key}={raw} was accepted"));
                assert!(message.contains(&key), "{key}={raw}: {message}");
                assert!(message.contains("-1") || message.to_lowercase().contains("nan"), "{key}={raw}: {message}");
            }
        }
    }

    #[test]
    fn a_resumed_run_takes_only_the_settings_that_may_change() {
        let saved = TrainConfig::default();
        let longer = saved.clone().with_overrides(["epochs=200", "knn_every=5", "images.max_pixels=1000"]).unwrap();
        let changes = saved.resume_changes(&longer).unwrap();
        assert_eq!(changes, ["epochs = 100 -> 200", "images.max_pixels = 178956970 -> 1000", "knn_every = 1 -> 5"]);
        assert_eq!(saved.resume_changes(&saved).unwrap(), Vec::<String>::new());
        let other = saved.clone().with_overrides(["epochs=200", "lr=0.001", "crops.local_crops=2"]).unwrap();
        let e = saved.resume_changes(&other).unwrap_err();
        assert!(e.ends_with("these differ: crops.local_crops = 8 -> 2, lr = 0.0005 -> 0.001"), "{e}");
    }

    #[test]
    fn sizes_left_at_zero_come_from_the_images() {
        let sizes = |c: TrainConfig| (c.crops.global_size, c.crops.local_size, c.patch_size, c.img_size);
        let small = TrainConfig::preset("small").unwrap();
        assert!(small.sizes_from_images());
        // Fashion-MNIST: a 4 x 4 grid of 7 px patches, local crops of 2 x 2 patches.
        assert_eq!(sizes(small.clone().fit_to_images(28)), (28, 14, 7, 28));
        // Not a multiple of 4: the global crop is rounded down to whole patches.
        assert_eq!(sizes(small.clone().fit_to_images(30)), (28, 14, 7, 28));
        // Tiny and large images: patches of at least 4 px, global crops of at most 96 px.
        assert_eq!(sizes(small.clone().fit_to_images(10)), (8, 4, 4, 8));
        assert_eq!(sizes(small.clone().fit_to_images(500)), (MAX_AUTO_GLOBAL, 48, 24, 96));
        // Sizes that are set are kept.
        let set = small.with_overrides(["patch_size=8", "crops.local_size=16"]).unwrap().fit_to_images(64);
        assert_eq!(sizes(set.clone()), (64, 16, 8, 64));
        assert!(!set.sizes_from_images());
    }
}
