//! [`Checkpoint`]: the sampler's state at a step boundary and its byte framing (magic,
//! JSON header, raw little-endian f32 state), restoring bitwise identically.

use super::SamplerSettings;
use crate::diffusion::schedule::ScheduleConfig;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Serializable sampler state at a step boundary; restores bitwise identically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version ([`Checkpoint::FORMAT`]).
    pub format: u32,
    /// Settings of the run (seed included).
    pub settings: SamplerSettings,
    /// Content hash of the model the run uses.
    pub model_hash: String,
    /// Patch edge P of the model.
    pub patch_size: usize,
    /// Model unit scale (χ_model = χ_ppm × chi_scale).
    pub chi_scale: f64,
    /// Training schedule of the model.
    pub schedule: ScheduleConfig,
    /// [`Problem::fingerprint`] of the problem.
    pub problem_fingerprint: u64,
    /// Padded volume shape of the state.
    pub padded_shape: [usize; 3],
    /// Steps completed.
    pub step: usize,
    /// Last data residual in ppm.
    pub residual_ppm: Option<f64>,
    /// x_t over the padded volume, C order, model units.
    pub state: Vec<f32>,
}

const CHECKPOINT_MAGIC: &[u8; 8] = b"DMQSMCK1";

#[derive(Serialize, Deserialize)]
struct CheckpointHeader {
    format: u32,
    settings: SamplerSettings,
    model_hash: String,
    patch_size: usize,
    chi_scale: f64,
    schedule: ScheduleConfig,
    problem_fingerprint: u64,
    padded_shape: [usize; 3],
    step: usize,
    residual_ppm: Option<f64>,
    state_len: usize,
}

impl Checkpoint {
    /// Current checkpoint format version.
    pub const FORMAT: u32 = 1;

    /// Compact binary encoding: magic `DMQSMCK1`, u64 LE header length, JSON header, then
    /// the state as f32 little-endian.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = CheckpointHeader {
            format: self.format,
            settings: self.settings.clone(),
            model_hash: self.model_hash.clone(),
            patch_size: self.patch_size,
            chi_scale: self.chi_scale,
            schedule: self.schedule.clone(),
            problem_fingerprint: self.problem_fingerprint,
            padded_shape: self.padded_shape,
            step: self.step,
            residual_ppm: self.residual_ppm,
            state_len: self.state.len(),
        };
        let json = serde_json::to_vec(&header)
            .map_err(|e| Error::Protocol(format!("checkpoint header: {e}")))?;
        let mut out = Vec::with_capacity(16 + json.len() + 4 * self.state.len());
        out.extend_from_slice(CHECKPOINT_MAGIC);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        for v in &self.state {
            out.extend_from_slice(&v.to_le_bytes());
        }
        Ok(out)
    }

    /// Decodes [`Checkpoint::to_bytes`]; errors name what is malformed.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |m: &str| Error::Protocol(format!("malformed checkpoint: {m}"));
        if bytes.len() < 16 || &bytes[..8] != CHECKPOINT_MAGIC {
            return Err(bad("missing DMQSMCK1 magic"));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[8..16]);
        let hlen = usize::try_from(u64::from_le_bytes(len)).map_err(|_| bad("header length"))?;
        let body = bytes.get(16..).ok_or_else(|| bad("truncated"))?;
        if hlen > body.len() {
            return Err(bad("header longer than the file"));
        }
        let header: CheckpointHeader =
            serde_json::from_slice(&body[..hlen]).map_err(|e| bad(&format!("header: {e}")))?;
        let data = &body[hlen..];
        if data.len() != header.state_len.saturating_mul(4) {
            return Err(bad(&format!(
                "state holds {} bytes, header says {} values",
                data.len(),
                header.state_len
            )));
        }
        let state = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Self {
            format: header.format,
            settings: header.settings,
            model_hash: header.model_hash,
            patch_size: header.patch_size,
            chi_scale: header.chi_scale,
            schedule: header.schedule,
            problem_fingerprint: header.problem_fingerprint,
            padded_shape: header.padded_shape,
            step: header.step,
            residual_ppm: header.residual_ppm,
            state,
        })
    }
}
