//! Diffusion-model machinery of DM-QSM: schedules, the score-model contract, and the
//! patch-based DPS sampler.

pub mod model;
pub mod schedule;
