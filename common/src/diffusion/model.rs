//! The [`ScoreModel`] contract between the sampler and whatever evaluates the network.
//!
//! The sampler never calls a model itself (it is a state machine that hands out batches);
//! callers such as the in-process reference driver, the worker and the tests use this
//! trait to evaluate those batches.

use crate::diffusion::schedule::ScheduleConfig;
use crate::error::Result;
use ndarray::{Array4, ArrayView4};
use serde::{Deserialize, Serialize};

/// The parameterisation of every model served today: ε-prediction (the `parameterisation`
/// of model cards and of `dmqsm.v1.ModelInfo`).
pub const PARAMETERISATION_EPS: &str = "eps";

/// Identity and conventions of a score model, shared with its model card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Human-readable identifier, e.g. `dmqsm-phantom-unet-s`.
    pub model_id: String,
    /// SHA-256 (hex) of the weights; jobs pin it.
    pub content_hash: String,
    /// Cubic patch edge P in voxels (48 in DM-QSM).
    pub patch_size: usize,
    /// The training noise schedule.
    pub schedule: ScheduleConfig,
    /// Model units: χ_model = χ_ppm × `chi_scale`.
    pub chi_scale: f64,
}

/// A noise-prediction (ε) score model evaluated on batches of cubic patches.
///
/// Patches are `[B, P, P, P]` in model units; `t` holds one timestep index per patch
/// (0 … T−1 of the training schedule, as f32 to match the TorchScript contract).
pub trait ScoreModel {
    /// What the model is and the conventions it follows.
    fn spec(&self) -> &ModelSpec;

    /// Predicted ε for each patch, `[B, P, P, P]`.
    fn eps(&self, patches: ArrayView4<'_, f32>, t: &[f32]) -> Result<Array4<f32>>;

    /// The vector-Jacobian product Jᵀv, with J = ∂ε/∂x_t taken per patch and v =
    /// `cotangent`, `[B, P, P, P]`. (DPS's exact gradient needs only Jᵀv: its ε comes from
    /// the step's ε round.)
    fn vjp(
        &self,
        patches: ArrayView4<'_, f32>,
        t: &[f32],
        cotangent: ArrayView4<'_, f32>,
    ) -> Result<Array4<f32>>;
}
