//! VP/DDPM noise schedules and their DDIM re-spacing.

use serde::{Deserialize, Serialize};

/// Shape of the β schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Linear β from `beta_start` to `beta_end` (Ho et al. 2020; DPS and DM-QSM).
    Linear,
    /// Cosine ᾱ (Nichol & Dhariwal 2021).
    Cosine,
}

/// A training noise schedule as stored in a model card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    /// β shape.
    pub kind: ScheduleKind,
    /// Number of training timesteps T.
    pub timesteps: usize,
    /// First β (linear only).
    pub beta_start: f64,
    /// Last β (linear only).
    pub beta_end: f64,
}

impl Default for ScheduleConfig {
    /// Linear β from 1e-4 to 0.02 over T = 1000, as in DDPM, DPS and DM-QSM.
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Linear,
            timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
        }
    }
}
