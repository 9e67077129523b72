//! Diffusion-model machinery of DM-QSM: schedules, the score-model contract, and the
//! patch-based DPS sampler.
//!
//! - [`schedule`]: VP/DDPM β and ᾱ, DDIM re-spacing with η.
//! - [`noise`]: counter-based Gaussian noise, a pure function of (seed, step, voxel).
//! - [`model`]: the [`model::ScoreModel`] contract (ε and VJP on patch batches).
//! - [`sampler`]: the sampler state machine (rounds of patch work, DPS, checkpoints).
//! - [`consistency`]: DDS proximal data consistency (CG on x̂_0) for `Guidance::Prox`.
//! - [`posterior`]: mean and voxelwise standard deviation over posterior samples.
//! - [`analytic`]: an exact score model for an i.i.d. Gaussian prior (for tests).

pub mod analytic;
pub mod consistency;
pub mod model;
pub mod noise;
pub mod posterior;
pub mod sampler;
pub mod schedule;
