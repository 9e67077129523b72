//! # Cohort submission: one DM-QSM job per subject/session of a BIDS dataset
//!
//! `dmqsm cohort <bids_dir>` (REFERENCE.md §8, QSMxT's cohort conventions):
//! - [`bids`]: finds each subject's and session's input (local field
//!   `*_localfield.nii[.gz]`, or low-resolution χ `*_Chimap.nii[.gz]` for SR), its brain
//!   mask, an optional ground truth (`*_desc-truth_Chimap`, for metrics), and reads
//!   `MagneticFieldStrength` (T), `EchoTime` (s), `Units` and the custom `B0_dir` key
//!   (QSMxT / qsm-forward) from the JSON sidecars.
//! - [`run`]: submits one job per input through the coordinator client, shows overall
//!   progress, writes `derivatives/dmqsm/sub-*/[ses-*/]anat/*_Chimap.nii.gz` (ppm) with
//!   a JSON sidecar (settings, model hash, metrics where a truth exists), skips inputs
//!   whose outputs are already there for the same inputs and settings, and reports a
//!   failing subject without stopping the others.
//! - [`slurm`]: writes one sbatch script per subject/session (coordinator + workers in
//!   the allocation, see `deploy/slurm/dmqsm.sbatch`), as QSMxT's Slurm mode does.

pub mod bids;
pub mod run;
pub mod slurm;

pub use bids::{Acquisition, Entry, InputKind, Selection, discover};
pub use run::{CohortOptions, CohortProgress, CohortReport, Outcome, SubjectReport, run_cohort};
pub use slurm::{SlurmOptions, SlurmPlan, write_slurm_scripts};

/// Errors of the cohort as a whole (a single subject's problems are reported in its
/// [`Outcome`] instead and never stop the others).
#[derive(Debug, thiserror::Error)]
pub enum CohortError {
    /// The dataset root is missing or unreadable.
    #[error("BIDS dataset {path}: {message}")]
    Dataset {
        /// The dataset root.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Bad options (the message names the option).
    #[error("{0}")]
    Options(String),
}

impl CohortError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
