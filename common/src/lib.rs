//! # dmqsm-common: the physics and numerics of DM-QSM
//!
//! Pure numerics, no async and no I/O beyond NIfTI. The servers (`dmqsm-worker`,
//! `dmqsm-coordinator`) are thin layers around this crate.
//!
//! Layout, one concept per module:
//! - Data and I/O: [`volume`], [`nifti_io`], [`geometry`] (B0 direction), [`units`].
//! - Fourier and dipole physics: [`fft`], [`kernels`] (dipole kernel), [`simulate`]
//!   (χ → local field), [`operators`] (forward models with adjoints).
//! - Classical inversions: [`inversion`] (TKD, closed-form L2).
//! - Test data and scoring: [`phantom`], [`metrics`], [`preview`] (PNG slices).
//! - DM-QSM: [`patch`] (overlapping patch grid), [`diffusion`] (schedule, noise, score
//!   model contract, sampler state machine), [`tasks`] (dipinv, sr, …) and [`driver`]
//!   (the in-process reference driver).
//!
//! - Base utilities: [`allocator`] (the binaries' mimalloc, keeping freed pages),
//!   [`splitmix`] (the seeded mixer), [`content_hash`] (SHA-256), [`atomic_file`]
//!   (crash-safe writes), [`simd`] (run-time choice of vector extension for hot loops).
//!
//! Units: χ and local field in ppm, lengths in mm, B0 in T, TE in s.

pub mod allocator;
pub mod atomic_file;
pub mod content_hash;
pub mod diffusion;
pub mod driver;
pub mod error;
pub mod fft;
pub mod geometry;
pub mod inversion;
pub mod kernels;
pub mod metrics;
pub mod nifti_io;
pub mod operators;
pub mod patch;
pub mod phantom;
pub mod preview;
pub mod simd;
pub mod simulate;
pub mod splitmix;
pub mod tasks;
pub mod units;
pub mod volume;

pub use error::{Error, Result};
pub use volume::Volume;
