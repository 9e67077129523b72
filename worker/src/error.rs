//! [`WorkerError`]: everything that can go wrong in the worker, and how each maps onto a
//! gRPC status (bad requests → `INVALID_ARGUMENT`, model failures → `INTERNAL`).

use std::path::PathBuf;

/// Errors of the worker library. Every message names the offending input or file.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A request is malformed (shape, dtype, byte length, NaN, batch size, model hash).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The model failed while evaluating a valid request (carries libtorch's message).
    #[error("model failure: {0}")]
    Model(String),
    /// The worker is shutting down and takes no new work.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A model card or weights file is missing, malformed or inconsistent.
    #[error("model card: {0}")]
    Card(String),
    /// A configuration value (device, threads, sizes, …) is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The gRPC server or a client connection failed.
    #[error("transport: {0}")]
    Transport(String),
    /// An error from the numerics core (schedules, phantoms, NIfTI).
    #[error(transparent)]
    Common(#[from] dmqsm_common::Error),
}

/// Result alias of the worker library.
pub type Result<T> = std::result::Result<T, WorkerError>;

impl WorkerError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Wraps a libtorch error (from a fallible `f_` call) as a model failure.
    pub fn torch(context: &str, err: tch::TchError) -> Self {
        Self::Model(format!("{context}: {err}"))
    }
}

impl From<WorkerError> for tonic::Status {
    fn from(err: WorkerError) -> Self {
        match &err {
            WorkerError::InvalidArgument(m) => tonic::Status::invalid_argument(m.clone()),
            WorkerError::Unavailable(m) => tonic::Status::unavailable(m.clone()),
            WorkerError::Common(e) => match e {
                dmqsm_common::Error::Shape(_)
                | dmqsm_common::Error::Parameter(_)
                | dmqsm_common::Error::NonFinite(_) => {
                    tonic::Status::invalid_argument(e.to_string())
                }
                _ => tonic::Status::internal(e.to_string()),
            },
            _ => tonic::Status::internal(err.to_string()),
        }
    }
}

/// Maps a worker error onto the numerics core's error type, for [`ScoreModel`] impls.
///
/// [`ScoreModel`]: dmqsm_common::diffusion::model::ScoreModel
impl From<WorkerError> for dmqsm_common::Error {
    fn from(err: WorkerError) -> Self {
        match err {
            WorkerError::Common(e) => e,
            WorkerError::InvalidArgument(m) => dmqsm_common::Error::Shape(m),
            other => dmqsm_common::Error::Model(other.to_string()),
        }
    }
}

/// Runs a closure that calls into libtorch, turning a panic (tch's infallible APIs panic
/// with libtorch's message) into [`WorkerError::Model`] so a request never crashes the
/// worker.
pub fn catch_torch<T>(context: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_string()
            } else {
                "unknown panic".to_string()
            };
            Err(WorkerError::Model(format!("{context}: {msg}")))
        }
    }
}
