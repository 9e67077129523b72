//! The model card: a JSON file beside every model (`<stem>.card.json`) recording what
//! the network is, how it was trained, and the conventions a sampler must follow.
//!
//! Contract for TorchScript models (trained in PyTorch or exported by
//! `dmqsm-worker export`): `forward(x: [B,1,P,P,P] f32, t: [B] f32) -> [B,1,P,P,P]`,
//! predicting ε (DDPM ε-parameterisation) for x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, with x₀ in
//! model units χ_model = χ_ppm × `chi_scale` and t the integer timestep index
//! 0 … T−1 of `schedule` carried as f32.
//!
//! Identity: `weights_sha256` is the SHA-256 (hex) of the weights file the model was
//! built from (the `.safetensors` for native U-Nets, also for their TorchScript export;
//! the `.pt` file itself for TorchScript models whose card does not give one). It becomes
//! [`ModelSpec::content_hash`], which jobs pin.

use crate::error::{Result, WorkerError};
use crate::unet::UNetConfig;
use dmqsm_common::diffusion::model::ModelSpec;
use dmqsm_common::diffusion::schedule::{NoiseSchedule, ScheduleConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Version of the card format written by this crate.
pub const CARD_FORMAT_VERSION: u32 = 1;

pub use dmqsm_common::diffusion::model::PARAMETERISATION_EPS;

/// The network behind a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Architecture {
    /// The native 3D U-Net of [`crate::unet`], rebuilt from this config.
    Unet3d(UNetConfig),
    /// An opaque TorchScript module (e.g. trained in PyTorch).
    Torchscript {
        /// Free-form description of the network.
        #[serde(default)]
        description: String,
    },
}

/// How a model was trained (free-form where PyTorch-side cards carry less).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingSummary {
    /// Training data, e.g. "64 synthetic phantoms (seed 7), 48³ patches, stride 30".
    pub data: String,
    /// Number of distinct training patches.
    pub patches: u64,
    /// Optimiser iterations done.
    pub iterations: u64,
    /// Patches per iteration.
    pub batch_size: u64,
    /// Peak learning rate (AdamW).
    pub learning_rate: f64,
    /// EMA decay of the weights.
    pub ema_decay: f64,
    /// Which weights this card describes: "ema" or "raw".
    pub weights: String,
    /// Mean ε-MSE loss over the last logged window.
    pub final_loss: f64,
    /// Augmentation, e.g. "flips on all axes; permutation of the two axes ⟂ B0 (axis 2)".
    pub augmentation: String,
    /// Training seed.
    pub seed: u64,
}

/// A model card (see the module docs for the contract it documents).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// Card format version ([`CARD_FORMAT_VERSION`]).
    #[serde(default = "default_format")]
    pub format_version: u32,
    /// Human-readable identifier, e.g. `dmqsm-phantom-unet-s`.
    pub model_id: String,
    /// Always [`PARAMETERISATION_EPS`] today.
    #[serde(default = "default_parameterisation")]
    pub parameterisation: String,
    /// Cubic patch edge P in voxels.
    pub patch_size: usize,
    /// Training noise schedule.
    pub schedule: ScheduleConfig,
    /// χ_model = χ_ppm × `chi_scale`.
    pub chi_scale: f64,
    /// The network.
    pub architecture: Architecture,
    /// Number of scalar parameters (0 if unknown).
    #[serde(default)]
    pub parameter_count: u64,
    /// SHA-256 (hex) of the weights file; empty means "hash the model file".
    #[serde(default)]
    pub weights_sha256: String,
    /// SHA-256 (hex) of the TorchScript file, when one was exported (integrity check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torchscript_sha256: Option<String>,
    /// Training summary, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingSummary>,
}

fn default_format() -> u32 {
    CARD_FORMAT_VERSION
}

fn default_parameterisation() -> String {
    PARAMETERISATION_EPS.to_string()
}

impl ModelCard {
    /// A card for a native U-Net (no training summary, no TorchScript hash yet).
    pub fn for_unet(
        model_id: impl Into<String>,
        config: &UNetConfig,
        patch_size: usize,
        schedule: ScheduleConfig,
        chi_scale: f64,
        parameter_count: u64,
        weights_sha256: impl Into<String>,
    ) -> Self {
        Self {
            format_version: CARD_FORMAT_VERSION,
            model_id: model_id.into(),
            parameterisation: PARAMETERISATION_EPS.to_string(),
            patch_size,
            schedule,
            chi_scale,
            architecture: Architecture::Unet3d(config.clone()),
            parameter_count,
            weights_sha256: weights_sha256.into(),
            torchscript_sha256: None,
            training: None,
        }
    }

    /// Reads and validates a card.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| WorkerError::io(path, e))?;
        let card: Self = serde_json::from_str(&text)
            .map_err(|e| WorkerError::Card(format!("{}: {e}", path.display())))?;
        card.validate()
            .map_err(|e| WorkerError::Card(format!("{}: {e}", path.display())))?;
        Ok(card)
    }

    /// Writes the card as pretty JSON (atomically: temp file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| WorkerError::Card(format!("serialising card: {e}")))?;
        write_atomic(path, text.as_bytes())
    }

    /// Checks the fields a sampler relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.parameterisation != PARAMETERISATION_EPS {
            return Err(format!(
                "parameterisation '{}' is not supported (only 'eps')",
                self.parameterisation
            ));
        }
        if self.patch_size == 0 {
            return Err("patch_size must be positive".into());
        }
        if !(self.chi_scale.is_finite() && self.chi_scale > 0.0) {
            return Err(format!(
                "chi_scale {} must be finite and > 0",
                self.chi_scale
            ));
        }
        NoiseSchedule::new(&self.schedule).map_err(|e| e.to_string())?;
        if let Architecture::Unet3d(cfg) = &self.architecture {
            cfg.validate(self.patch_size).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The sampler-facing identity of the model.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            model_id: self.model_id.clone(),
            content_hash: self.weights_sha256.clone(),
            patch_size: self.patch_size,
            schedule: self.schedule.clone(),
            chi_scale: self.chi_scale,
        }
    }
}

/// The card path beside a model file: `dir/model.pt` → `dir/model.card.json`.
pub fn card_path_for(model: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    model.with_file_name(format!("{stem}.card.json"))
}

/// SHA-256 of a file's bytes, as lowercase hex ([`dmqsm_common::content_hash`]).
pub fn sha256_file(path: &Path) -> Result<String> {
    dmqsm_common::content_hash::sha256_file_hex(path).map_err(|e| WorkerError::io(path, e))
}

/// Writes a file atomically ([`dmqsm_common::atomic_file`]), naming `path` in the error.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    dmqsm_common::atomic_file::write_atomic(path, bytes).map_err(|e| WorkerError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card() -> ModelCard {
        ModelCard {
            format_version: CARD_FORMAT_VERSION,
            model_id: "m".into(),
            parameterisation: "eps".into(),
            patch_size: 16,
            schedule: ScheduleConfig::default(),
            chi_scale: 5.0,
            architecture: Architecture::Torchscript {
                description: "x".into(),
            },
            parameter_count: 3,
            weights_sha256: "ab".into(),
            torchscript_sha256: None,
            training: None,
        }
    }

    #[test]
    fn card_round_trips_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.card.json");
        card().save(&path).unwrap();
        assert_eq!(ModelCard::load(&path).unwrap(), card());
        let mut bad = card();
        bad.parameterisation = "v".into();
        bad.save(&path).unwrap();
        let err = ModelCard::load(&path).unwrap_err().to_string();
        assert!(err.contains("parameterisation 'v'"), "{err}");
    }

    #[test]
    fn minimal_pytorch_card_is_accepted() {
        let json = r#"{"model_id":"py","patch_size":48,"chi_scale":5.0,
            "schedule":{"kind":"linear","timesteps":1000,"beta_start":0.0001,"beta_end":0.02},
            "architecture":{"kind":"torchscript"}}"#;
        let card: ModelCard = serde_json::from_str(json).unwrap();
        card.validate().unwrap();
        assert_eq!(card.parameterisation, "eps");
        assert_eq!(card.weights_sha256, "");
    }

    #[test]
    fn card_sits_beside_its_model() {
        assert_eq!(
            card_path_for(Path::new("/a/b/model.pt")),
            Path::new("/a/b/model.card.json")
        );
    }
}
