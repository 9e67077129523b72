//! Training checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! A checkpoint is `checkpoint.json` (the [`TrainState`]: iteration, the full training
//! config, the loss history, and the name and SHA-256 of the tensor file) plus
//! `checkpoint-<iteration>.safetensors` holding the raw weights (`model.*`), the EMA
//! weights (`ema.*`) and AdamW's moments (`adam_m.*`, `adam_v.*`). The tensor file is
//! written first under its own name, then the JSON is replaced atomically, then the
//! previous tensor file is removed: a crash at any point leaves a consistent pair.
//!
//! The random numbers of iteration k (patch choice, augmentation, timesteps, noise) are
//! pure functions of (seed, k) (counter-based, `dmqsm_common::diffusion::noise`), and the
//! data set is rebuilt from the same config, so no generator state needs saving: resuming
//! at k+1 repeats exactly what an uninterrupted run would have done.

use crate::card::{sha256_file, write_atomic};
use crate::error::{Result, WorkerError};
use crate::train::TrainConfig;
use dmqsm_common::atomic_file::AtomicFile;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// File name of the checkpoint's JSON part.
pub const CHECKPOINT_JSON: &str = "checkpoint.json";

/// The JSON part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Iterations completed.
    pub iteration: u64,
    /// The run's configuration.
    pub config: TrainConfig,
    /// Loss (ε-MSE) of every completed iteration, in order.
    pub losses: Vec<f32>,
    /// Learning rate of every completed iteration.
    pub learning_rates: Vec<f64>,
    /// Tensor file (relative to the output directory).
    pub tensors: String,
    /// SHA-256 of the tensor file.
    pub tensors_sha256: String,
}

/// Writes a checkpoint into `dir` (see the module docs).
pub fn save(dir: &Path, state: &TrainState, tensors: &[(String, Tensor)]) -> Result<()> {
    let name = format!("checkpoint-{:08}.safetensors", state.iteration);
    let path = dir.join(&name);
    let file = AtomicFile::new(&path).map_err(|e| WorkerError::io(&path, e))?;
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.detach().to_device(tch::Device::Cpu).contiguous(),
            )
        })
        .collect();
    Tensor::write_safetensors(&cpu, file.path())
        .map_err(|e| WorkerError::torch(&format!("writing {}", path.display()), e))?;
    file.commit().map_err(|e| WorkerError::io(&path, e))?;
    let previous = load_state(dir).ok().map(|s| s.tensors);
    let mut state = state.clone();
    state.tensors = name.clone();
    state.tensors_sha256 = sha256_file(&path)?;
    let json = serde_json::to_string_pretty(&state)
        .map_err(|e| WorkerError::Card(format!("serialising the checkpoint: {e}")))?;
    write_atomic(&dir.join(CHECKPOINT_JSON), json.as_bytes())?;
    if let Some(prev) = previous
        && prev != name
    {
        let _ = std::fs::remove_file(dir.join(prev));
    }
    Ok(())
}

/// Reads the JSON part of the checkpoint in `dir`.
pub fn load_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(CHECKPOINT_JSON);
    let text = std::fs::read_to_string(&path).map_err(|e| WorkerError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| WorkerError::Card(format!("{}: {e}", path.display())))
}

/// Reads a checkpoint: its state and its named tensors (hash-checked).
pub fn load(dir: &Path) -> Result<(TrainState, BTreeMap<String, Tensor>)> {
    let state = load_state(dir)?;
    let path: PathBuf = dir.join(&state.tensors);
    let hash = sha256_file(&path)?;
    if hash != state.tensors_sha256 {
        return Err(WorkerError::Card(format!(
            "{}: SHA-256 {hash} differs from {CHECKPOINT_JSON}'s {}",
            path.display(),
            state.tensors_sha256
        )));
    }
    let named = Tensor::read_safetensors(&path)
        .map_err(|e| WorkerError::torch(&format!("reading {}", path.display()), e))?;
    Ok((state, named.into_iter().collect()))
}
