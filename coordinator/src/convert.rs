//! Conversions between the coordinator's stored types ([`JobState`], [`JobSpec`],
//! [`JobRecord`]) and their wire messages; the domain enums of `dmqsm-common` (task,
//! guidance, model spec) convert in `dmqsm_proto::convert`. Every match is exhaustive, so
//! a state added on either side fails to compile here until it is mapped.
//!
//! Resolving a submission's settings, with defaults and validation, is a policy of the
//! job and lives with it ([`JobSpec::from_proto`]).

use crate::job::{JobRecord, JobSpec, JobState};
use dmqsm_proto::v1;

impl From<JobState> for v1::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Queued => v1::JobState::Queued,
            JobState::Running => v1::JobState::Running,
            JobState::Succeeded => v1::JobState::Succeeded,
            JobState::Failed => v1::JobState::Failed,
            JobState::Cancelled => v1::JobState::Cancelled,
        }
    }
}

impl JobState {
    /// The state of a wire value; `None` for `JOB_STATE_UNSPECIFIED` and values outside
    /// the schema.
    pub fn from_wire(state: i32) -> Option<Self> {
        match v1::JobState::try_from(state).ok()? {
            v1::JobState::Unspecified => None,
            v1::JobState::Queued => Some(JobState::Queued),
            v1::JobState::Running => Some(JobState::Running),
            v1::JobState::Succeeded => Some(JobState::Succeeded),
            v1::JobState::Failed => Some(JobState::Failed),
            v1::JobState::Cancelled => Some(JobState::Cancelled),
        }
    }
}

impl From<&JobSpec> for v1::JobSettings {
    /// The settings with every default resolved.
    fn from(spec: &JobSpec) -> Self {
        let s = spec;
        v1::JobSettings {
            task: v1::Task::from(s.task) as i32,
            steps: Some(s.steps),
            eta: s.eta,
            xi: s.xi,
            // A spec is built by `from_proto`, which never yields `Guidance::None`.
            guidance: v1::Guidance::try_from(s.guidance).map_or(v1::Guidance::Unspecified, |g| g)
                as i32,
            overlap: Some(s.overlap),
            seed: s.seed,
            samples: Some(s.samples),
            priority: s.priority,
            model_id: s.model_id.clone(),
            factor: s.factor.to_vec(),
            b0_dir: s.b0_dir.map(|d| d.to_vec()).unwrap_or_default(),
            tkd_threshold: Some(s.tkd_threshold),
            field_units: s.field_units.clone(),
            b0_tesla: s.b0_tesla,
            te_seconds: s.te_seconds,
            downsample: s.downsample.clone(),
            batch_size: s.batch_size,
            start_timestep: s.start_timestep,
            tv_alpha: s.tv_alpha,
            prox_tv: Some(s.prox_tv.unwrap_or(0.0)),
        }
    }
}

impl From<&JobRecord> for v1::JobStatus {
    fn from(r: &JobRecord) -> Self {
        v1::JobStatus {
            job_id: r.job_id.clone(),
            label: r.label.clone(),
            state: v1::JobState::from(r.state) as i32,
            step: r.step,
            total_steps: r.spec.steps,
            sample: r.sample,
            total_samples: r.spec.samples,
            error: r.error.clone().unwrap_or_default(),
            settings: Some(v1::JobSettings::from(&r.spec)),
            submitted_unix: r.submitted_unix,
            finished_unix: r.finished_unix.unwrap_or(0.0),
            retries: r.retries,
            model_id: r.model.model_id.clone(),
            model_hash: r.model.content_hash.clone(),
            owner: r.owner.clone(),
        }
    }
}
