//! k-space kernels of the QSM forward model.
//!
//! - [`dipole`]: the unit dipole kernel D(k) = 1/3 − (k·b̂)²/|k|² on any grid, with
//!   anisotropic voxels and oblique B0.

pub mod dipole;

pub use dipole::DipoleKernel;
