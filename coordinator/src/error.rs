//! The error type of the coordinator. Every message names the job, the worker and the
//! cause where they apply, so a failed job says why it failed.

/// Errors of the coordinator library.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A submission was rejected before it became a job (bad NIfTI, shapes, NaN, path
    /// outside the data root, unknown model, no workers, bad settings).
    #[error("invalid submission: {0}")]
    InvalidSubmission(String),
    /// No job with this id is stored.
    #[error("job {0} not found")]
    JobNotFound(String),
    /// The job exists but has no result yet (or failed / was cancelled).
    #[error("job {job}: {reason}")]
    NoResult {
        /// The job id.
        job: String,
        /// Why there is nothing to fetch.
        reason: String,
    },
    /// The sled store failed.
    #[error("store: {0}")]
    Store(String),
    /// A worker could not be reached or answered something unusable.
    #[error("worker {worker} ({address}): {cause}")]
    Worker {
        /// Worker id.
        worker: String,
        /// Address the coordinator dialled.
        address: String,
        /// What went wrong.
        cause: String,
    },
    /// A job failed while running; the message names job, worker and cause.
    #[error("job {job} failed: {cause}")]
    JobFailed {
        /// The job id.
        job: String,
        /// What went wrong, naming the worker when one was involved.
        cause: String,
    },
    /// The numerics core rejected an input or failed.
    #[error("{0}")]
    Numerics(#[from] dmqsm_common::Error),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The submission is valid but the coordinator cannot take it now: queued and running
    /// jobs hold its memory budget (gRPC `RESOURCE_EXHAUSTED`; retry later).
    #[error("coordinator busy: {0}")]
    Busy(String),
}

impl From<sled::Error> for CoordinatorError {
    fn from(e: sled::Error) -> Self {
        CoordinatorError::Store(e.to_string())
    }
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        let msg = e.to_string();
        match e {
            CoordinatorError::InvalidSubmission(_) | CoordinatorError::Numerics(_) => {
                tonic::Status::invalid_argument(msg)
            }
            CoordinatorError::JobNotFound(_) => tonic::Status::not_found(msg),
            CoordinatorError::NoResult { .. } => tonic::Status::failed_precondition(msg),
            CoordinatorError::Worker { .. } => tonic::Status::unavailable(msg),
            CoordinatorError::Config(_) => tonic::Status::invalid_argument(msg),
            CoordinatorError::Busy(_) => tonic::Status::resource_exhausted(msg),
            CoordinatorError::Store(_) | CoordinatorError::JobFailed { .. } => {
                tonic::Status::internal(msg)
            }
        }
    }
}

/// Result alias of the coordinator library.
pub type Result<T> = std::result::Result<T, CoordinatorError>;
