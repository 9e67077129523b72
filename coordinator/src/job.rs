//! Jobs as the coordinator stores them: [`JobSpec`] (the resolved settings),
//! [`JobRecord`] (state, progress, history) and their mapping to the proto messages.

use crate::error::{CoordinatorError, Result};
use dmqsm_common::diffusion::model::ModelSpec;
use dmqsm_common::diffusion::sampler::Guidance;
use dmqsm_common::tasks::{ConsistencyTv, Task};
use dmqsm_proto::{convert, v1};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, as f64.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Diffusion steps of a job whose settings leave `steps` unset.
pub const DEFAULT_STEPS: u32 = 25;
/// TKD threshold δ of a job whose settings leave `tkd_threshold` unset.
pub const DEFAULT_TKD_THRESHOLD: f64 = 0.1;

/// The resolved settings of a job: every default filled in at submission, so a job
/// restarted under another coordinator configuration computes exactly the same thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// What to reconstruct (stored by its kebab-case name).
    pub task: Task,
    /// Diffusion (DDIM) steps.
    pub steps: u32,
    /// DDIM η: 0 deterministic, 1 ancestral.
    pub eta: f64,
    /// DPS step size ξ; `None` uses the task default (0.5 dipole inversion, 2 SR).
    pub xi: Option<f64>,
    /// Guidance mode (stored by its lowercase name; never [`Guidance::None`]).
    pub guidance: Guidance,
    /// Patch overlap S in voxels (stride P − S).
    pub overlap: u32,
    /// Noise seed of the first sample; sample k uses seed + k.
    pub seed: u64,
    /// Posterior samples; > 1 adds a voxelwise std map.
    pub samples: u32,
    /// Higher runs first.
    pub priority: i32,
    /// Model id requested ("" accepts whatever the workers serve).
    pub model_id: String,
    /// SR factor per axis (1 for none; SR tasks default to 2, DM-QSM's 2 mm → 1 mm).
    pub factor: [u32; 3],
    /// B0 direction in voxel axes; `None` derives it from the NIfTI affine.
    pub b0_dir: Option<[f64; 3]>,
    /// TKD threshold δ for the dipinv / sr-dipinv input.
    pub tkd_threshold: f64,
    /// Units of a field input: `ppm`, `hz` or `rad`.
    pub field_units: String,
    /// B0 in T (for Hz / rad field units).
    pub b0_tesla: f64,
    /// Echo time in s (for rad field units).
    pub te_seconds: f64,
    /// Downsampling model of SR tasks: `kspace` or `block`.
    pub downsample: String,
    /// Patches per worker batch, fixed at submission (batches are part of the job's
    /// deterministic definition).
    pub batch_size: u32,
    /// Warm-start timestep t₀ (`None`: from pure noise; jobs stored before warm starts
    /// existed read as `None`).
    #[serde(default)]
    pub start_timestep: Option<u32>,
    /// TV α of the warm-start estimate (`None`: the L-curve corner).
    #[serde(default)]
    pub tv_alpha: Option<f64>,
    /// TV data-consistency factor, resolved (`None`: the plain CG proximal step; unset in
    /// the proto takes [`ConsistencyTv::default_for`] the task and guidance, an explicit 0
    /// is off; jobs stored before the TV step existed read as `None`, so they resume
    /// unchanged).
    #[serde(default)]
    pub prox_tv: Option<f64>,
}

impl JobSpec {
    /// Resolves proto settings, filling defaults and rejecting nonsense with a message
    /// naming the field and its valid range. Unset optional fields take their defaults;
    /// an explicit 0 where 0 is meaningless (steps, samples, ξ, TKD threshold) is an
    /// error. `batch_size` (the coordinator's setting) applies when the settings leave it
    /// 0.
    pub fn from_proto(s: &v1::JobSettings, batch_size: usize) -> Result<Self> {
        let bad = |m: String| Err(CoordinatorError::InvalidSubmission(m));
        let invalid = |e: convert::ConvertError| CoordinatorError::InvalidSubmission(e.to_string());
        let task = convert::task(s.task, "settings.task").map_err(invalid)?;
        // Unset guidance is approx DPS, DM-QSM's one-round mode.
        let guidance = convert::guidance(s.guidance, "settings.guidance")
            .map_err(invalid)?
            .unwrap_or(Guidance::Approx);
        // Unset means the default; an explicit value out of range (0 included) is an
        // error naming the field and the valid range, never a silent default.
        let steps = s.steps.unwrap_or(DEFAULT_STEPS);
        if !(1..=10_000).contains(&steps) {
            return bad(format!(
                "settings.steps {steps} is out of range: give 1 to 10000 diffusion steps \
                 (unset means {DEFAULT_STEPS})"
            ));
        }
        if !s.eta.is_finite() || !(0.0..=1.0).contains(&s.eta) {
            return bad(format!("settings.eta {} must be in [0, 1]", s.eta));
        }
        if let Some(xi) = s.xi
            && !(xi.is_finite() && xi > 0.0)
        {
            return bad(format!(
                "settings.xi {xi} must be finite and > 0 (unset means the task's default)"
            ));
        }
        let samples = s.samples.unwrap_or(1);
        if !(1..=1000).contains(&samples) {
            return bad(format!(
                "settings.samples {samples} is out of range: give 1 to 1000 posterior samples \
                 (unset means 1)"
            ));
        }
        let factor = match s.factor.as_slice() {
            // DM-QSM evaluates SR from 2 mm to 1 mm.
            [] if task.is_super_resolution() => [2, 2, 2],
            [] => [1, 1, 1],
            [f] => [*f; 3],
            [a, b, c] => [*a, *b, *c],
            other => {
                return bad(format!(
                    "settings.factor needs 1 or 3 values, got {}",
                    other.len()
                ));
            }
        };
        if factor.iter().any(|&f| f == 0 || f > 8) {
            return bad(format!("settings.factor {factor:?} must be in 1..=8"));
        }
        let b0_dir = match s.b0_dir.as_slice() {
            [] => None,
            [x, y, z] => {
                let n = (x * x + y * y + z * z).sqrt();
                if !n.is_finite() || n < 1e-9 {
                    return bad(format!("settings.b0_dir {:?} is not a direction", s.b0_dir));
                }
                Some([x / n, y / n, z / n])
            }
            _ => {
                return bad(format!(
                    "settings.b0_dir needs 3 values, got {:?}",
                    s.b0_dir
                ));
            }
        };
        let tkd_threshold = s.tkd_threshold.unwrap_or(DEFAULT_TKD_THRESHOLD);
        if !tkd_threshold.is_finite() || tkd_threshold <= 0.0 || tkd_threshold >= 1.0 {
            return bad(format!(
                "settings.tkd_threshold {tkd_threshold} is out of range: it must be in (0, 1) \
                 (unset means {DEFAULT_TKD_THRESHOLD})"
            ));
        }
        let field_units = if s.field_units.is_empty() {
            "ppm".to_string()
        } else {
            s.field_units.to_lowercase()
        };
        if !["ppm", "hz", "rad"].contains(&field_units.as_str()) {
            return bad(format!(
                "settings.field_units {:?} must be ppm, hz or rad",
                s.field_units
            ));
        }
        if field_units != "ppm" && !(s.b0_tesla.is_finite() && s.b0_tesla > 0.0) {
            return bad(format!(
                "settings.b0_tesla must be > 0 for field units {field_units}"
            ));
        }
        if field_units == "rad" && !(s.te_seconds.is_finite() && s.te_seconds > 0.0) {
            return bad("settings.te_seconds must be > 0 for field units rad".to_string());
        }
        if let Some(t) = s.start_timestep {
            if t == 0 || t >= 1000 {
                return bad(format!(
                    "settings.start_timestep {t} must be between 1 and 999 (a training timestep)"
                ));
            }
            if steps > t + 1 {
                return bad(format!(
                    "settings.steps {steps} is more than a warm start at timestep {t} allows ({}); raise start_timestep or lower steps",
                    t + 1
                ));
            }
        }
        if let Some(a) = s.tv_alpha
            && !(a.is_finite() && a > 0.0)
        {
            return bad(format!("settings.tv_alpha {a} must be finite and positive"));
        }
        let prox_tv = match s.prox_tv {
            Some(f) if !(f.is_finite() && f >= 0.0) => {
                return bad(format!(
                    "settings.prox_tv {f} must be finite and non-negative (0 turns the TV step off)"
                ));
            }
            Some(f) if f > 0.0 && !(task == Task::DipinvPhysics && guidance == Guidance::Prox) => {
                return bad(format!(
                    "settings.prox_tv {f}: the TV data-consistency step needs task dipinv-physics and prox guidance, not {task} with {} guidance",
                    guidance.name()
                ));
            }
            Some(f) if f > 0.0 => Some(f),
            Some(_) => None,
            // Unset: the measured default of the task and guidance.
            None => ConsistencyTv::default_for(task, guidance).factor(),
        };
        let downsample = if s.downsample.is_empty() {
            "kspace".to_string()
        } else {
            s.downsample.to_lowercase()
        };
        if !["kspace", "block"].contains(&downsample.as_str()) {
            return bad(format!(
                "settings.downsample {:?} must be kspace or block",
                s.downsample
            ));
        }
        Ok(Self {
            task,
            steps,
            eta: s.eta,
            xi: s.xi,
            guidance,
            overlap: s.overlap.unwrap_or(8),
            seed: s.seed,
            samples,
            priority: s.priority,
            model_id: s.model_id.clone(),
            factor,
            b0_dir,
            tkd_threshold,
            field_units,
            b0_tesla: s.b0_tesla,
            te_seconds: s.te_seconds,
            downsample,
            batch_size: if s.batch_size > 0 {
                s.batch_size
            } else {
                batch_size.max(1) as u32
            },
            start_timestep: s.start_timestep,
            tv_alpha: s.tv_alpha,
            prox_tv,
        })
    }
}

/// Lifecycle of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Accepted, waiting for a run slot.
    Queued,
    /// Sampling.
    Running,
    /// Finished; results are stored and fetchable.
    Succeeded,
    /// Stopped with an error (see [`JobRecord::error`]).
    Failed,
    /// Cancelled by a user.
    Cancelled,
}

impl JobState {
    /// The stored (serde) and displayed name: `queued`, `running`, `succeeded`, `failed`,
    /// `cancelled`.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// True once the job can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// One line of a job's history (state changes, checkpoints, retries, resumes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEvent {
    /// When, in Unix seconds.
    pub unix: f64,
    /// What happened.
    pub message: String,
}

/// Wall-clock timings of a job, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobTimings {
    /// Seconds spent waiting for worker batches (summed over rounds).
    pub waiting_for_workers_s: f64,
    /// Seconds spent in the coordinator's own numerics (steps, FFT, DPS).
    pub coordinator_numerics_s: f64,
    /// Seconds from start (or last resume) to the end.
    pub running_s: f64,
}

/// Everything the coordinator keeps about a job besides its inputs, checkpoints and
/// result files (stored as JSON in sled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id (`job-000001`, …).
    pub job_id: String,
    /// Free-form label given at submission.
    pub label: String,
    /// Name of the token that submitted the job ([`dmqsm_proto::auth::Principal::name`];
    /// "local" without authentication). Users see only their own jobs.
    #[serde(default = "local_owner")]
    pub owner: String,
    /// Resolved settings.
    pub spec: JobSpec,
    /// The model the job is pinned to (id, hash, patch size, schedule, χ scale).
    pub model: ModelSpec,
    /// Current state.
    pub state: JobState,
    /// Diffusion steps finished in the current sample.
    pub step: u32,
    /// Samples finished.
    pub sample: u32,
    /// Why the job failed or was cancelled.
    pub error: Option<String>,
    /// Submission time (Unix s).
    pub submitted_unix: f64,
    /// Start of the first run (Unix s).
    pub started_unix: Option<f64>,
    /// End time (Unix s).
    pub finished_unix: Option<f64>,
    /// Batches retried on another worker.
    pub retries: u32,
    /// Batches answered per worker id.
    pub workers_used: BTreeMap<String, u64>,
    /// Steps this job resumed from after coordinator restarts.
    pub resumed_from: Vec<u32>,
    /// Timings.
    pub timings: JobTimings,
    /// History, oldest first (bounded to the last [`HISTORY_LIMIT`] events).
    pub history: Vec<HistoryEvent>,
    /// Coordinator starts that resumed this job in a row without it making progress
    /// (see [`crate::admission::MAX_RESUMES_WITHOUT_PROGRESS`]).
    #[serde(default)]
    pub resumes_without_progress: u32,
    /// `(sample, step)` of the job when it was last resumed.
    #[serde(default)]
    pub resumed_at: Option<(u32, u32)>,
}

fn local_owner() -> String {
    dmqsm_proto::auth::Principal::local().name
}

/// Most history events kept per job.
pub const HISTORY_LIMIT: usize = 200;

impl JobRecord {
    /// A new queued job.
    pub fn new(job_id: String, label: String, spec: JobSpec, model: ModelSpec) -> Self {
        let now = unix_now();
        let mut r = Self {
            job_id,
            label,
            owner: local_owner(),
            spec,
            model,
            state: JobState::Queued,
            step: 0,
            sample: 0,
            error: None,
            submitted_unix: now,
            started_unix: None,
            finished_unix: None,
            retries: 0,
            workers_used: BTreeMap::new(),
            resumed_from: Vec::new(),
            timings: JobTimings::default(),
            history: Vec::new(),
            resumes_without_progress: 0,
            resumed_at: None,
        };
        r.log("submitted");
        r
    }

    /// Appends a history event (and keeps the history bounded).
    pub fn log(&mut self, message: impl Into<String>) {
        self.history.push(HistoryEvent {
            unix: unix_now(),
            message: message.into(),
        });
        if self.history.len() > HISTORY_LIMIT {
            let cut = self.history.len() - HISTORY_LIMIT;
            self.history.drain(..cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve_and_round_trip() {
        let s = v1::JobSettings {
            task: v1::Task::Dipinv as i32,
            ..Default::default()
        };
        let spec = JobSpec::from_proto(&s, 4).unwrap();
        assert_eq!(spec.steps, 25);
        assert_eq!(spec.overlap, 8);
        assert_eq!(spec.samples, 1);
        assert_eq!(spec.factor, [1, 1, 1]);
        assert_eq!(spec.tkd_threshold, 0.1);
        assert_eq!(spec.guidance, Guidance::Approx);
        let back = JobSpec::from_proto(&v1::JobSettings::from(&spec), 4).unwrap();
        assert_eq!(back, spec);
    }

    /// Unset `prox_tv` takes the TV step's default only where it applies
    /// (`dipinv-physics` with prox guidance); an explicit 0 is off; both survive the
    /// round trip through the proto, so a resumed job keeps its data-consistency step.
    #[test]
    fn prox_tv_defaults_to_the_tv_step_for_physics_prox_only() {
        let with = |task: v1::Task, guidance: v1::Guidance, prox_tv: Option<f64>| {
            let s = v1::JobSettings {
                task: task as i32,
                guidance: guidance as i32,
                prox_tv,
                ..Default::default()
            };
            let spec = JobSpec::from_proto(&s, 4).unwrap();
            let back = JobSpec::from_proto(&v1::JobSettings::from(&spec), 4).unwrap();
            assert_eq!(back, spec);
            spec.prox_tv
        };
        let (physics, prox) = (v1::Task::DipinvPhysics, v1::Guidance::Prox);
        assert_eq!(
            with(physics, prox, None),
            Some(ConsistencyTv::DEFAULT_FACTOR)
        );
        assert_eq!(with(physics, prox, Some(0.0)), None);
        assert_eq!(with(physics, prox, Some(0.3)), Some(0.3));
        assert_eq!(with(physics, v1::Guidance::Approx, None), None);
        assert_eq!(with(v1::Task::Dipinv, prox, None), None);
        assert_eq!(with(v1::Task::SrDipinvPhysics, prox, None), None);
    }
    /// An explicit 0 (or out-of-range value) is an error naming the field and its valid
    /// range, never the default; the limits themselves are accepted.
    #[test]
    fn zero_and_out_of_range_are_errors_not_defaults() {
        let base = || v1::JobSettings {
            task: v1::Task::Dipinv as i32,
            ..Default::default()
        };
        let cases: Vec<(v1::JobSettings, &str)> = vec![
            (
                v1::JobSettings {
                    steps: Some(0),
                    ..base()
                },
                "settings.steps 0 is out of range: give 1 to 10000",
            ),
            (
                v1::JobSettings {
                    steps: Some(10_001),
                    ..base()
                },
                "settings.steps 10001",
            ),
            (
                v1::JobSettings {
                    samples: Some(0),
                    ..base()
                },
                "settings.samples 0 is out of range: give 1 to 1000",
            ),
            (
                v1::JobSettings {
                    samples: Some(1001),
                    ..base()
                },
                "settings.samples 1001",
            ),
            (
                v1::JobSettings {
                    tkd_threshold: Some(0.0),
                    ..base()
                },
                "settings.tkd_threshold 0 is out of range: it must be in (0, 1)",
            ),
            (
                v1::JobSettings {
                    tkd_threshold: Some(1.0),
                    ..base()
                },
                "settings.tkd_threshold 1",
            ),
            (
                v1::JobSettings {
                    xi: Some(0.0),
                    ..base()
                },
                "settings.xi 0 must be finite and > 0",
            ),
            (
                v1::JobSettings {
                    xi: Some(f64::NAN),
                    ..base()
                },
                "settings.xi NaN",
            ),
        ];
        for (s, needle) in cases {
            let e = JobSpec::from_proto(&s, 4).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
        }
        let s = v1::JobSettings {
            steps: Some(10_000),
            samples: Some(1000),
            tkd_threshold: Some(0.05),
            xi: Some(0.5),
            ..base()
        };
        let spec = JobSpec::from_proto(&s, 4).unwrap();
        assert_eq!(
            (spec.steps, spec.samples, spec.tkd_threshold, spec.xi),
            (10_000, 1000, 0.05, Some(0.5))
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let cases: Vec<(v1::JobSettings, &str)> = vec![
            (v1::JobSettings::default(), "settings.task"),
            (
                v1::JobSettings {
                    task: 1,
                    eta: 2.0,
                    ..Default::default()
                },
                "settings.eta",
            ),
            (
                v1::JobSettings {
                    task: 2,
                    factor: vec![2, 2],
                    ..Default::default()
                },
                "settings.factor",
            ),
            (
                v1::JobSettings {
                    task: 1,
                    field_units: "hz".into(),
                    ..Default::default()
                },
                "b0_tesla",
            ),
        ];
        for (s, needle) in cases {
            let e = JobSpec::from_proto(&s, 4).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
        }
    }
}
