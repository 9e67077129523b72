//! The error type of `dmqsm-common`. Every message names the offending input or parameter.

use std::path::PathBuf;

/// Errors from the physics and numerics core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A NIfTI file is malformed or cannot be used as a 3D volume.
    #[error("unusable NIfTI {path}: {reason}")]
    Nifti {
        /// The file (or "<bytes>" for in-memory data).
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two arrays that must agree in shape do not, or a shape is invalid.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A parameter is out of its valid range.
    #[error("invalid parameter: {0}")]
    Parameter(String),
    /// An input holds NaN or infinite values.
    #[error("non-finite input: {0}")]
    NonFinite(String),
    /// A score model failed or returned something unusable.
    #[error("score model: {0}")]
    Model(String),
    /// The sampler was driven out of order (e.g. results for a batch it did not ask for).
    #[error("sampler protocol: {0}")]
    Protocol(String),
    /// A reconstruction diverged on its own settings (its data residual exploded or went
    /// non-finite); the message names the setting to change. Not a model or worker fault.
    #[error("reconstruction diverged: {0}")]
    Diverged(String),
}

/// Result alias of `dmqsm-common`.
pub type Result<T> = std::result::Result<T, Error>;
