//! Conversions between the wire types of `dmqsm.v1` and the domain types of
//! `dmqsm-common`: the one place where a proto enum or message meets its Rust meaning.
//!
//! Every match is exhaustive on both sides, so a value added to either enum fails to
//! compile here until it is mapped. Proto enums arrive as `i32`; values the schema does not
//! know, and `*_UNSPECIFIED`, are errors that name the field. Defaults for an unset field
//! (a job without guidance uses approx DPS, say) are a policy of the receiver, not of
//! these conversions.

use crate::v1;
use dmqsm_common::diffusion::model::{ModelSpec, PARAMETERISATION_EPS};
use dmqsm_common::diffusion::sampler::Guidance;
use dmqsm_common::diffusion::schedule::{ScheduleConfig, ScheduleKind};
use dmqsm_common::tasks::Task;

/// A wire value without a domain meaning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A proto enum value that is unknown or `*_UNSPECIFIED`.
    #[error("{field} {value} is not one of {expected}")]
    Enum {
        /// What the value is (e.g. `settings.task`).
        field: &'static str,
        /// The raw value.
        value: i32,
        /// The accepted names.
        expected: &'static str,
    },
    /// A domain value with no wire form.
    #[error("{0} has no wire form")]
    NoWireForm(String),
    /// A message field that is out of range.
    #[error("{0}")]
    Invalid(String),
}

const TASKS: &str = "dipinv, sr, sr-dipinv, dipinv-physics, sr-dipinv-physics";
const GUIDANCES: &str = "exact, approx, prox";

impl From<Task> for v1::Task {
    fn from(t: Task) -> Self {
        match t {
            Task::Dipinv => v1::Task::Dipinv,
            Task::Sr => v1::Task::Sr,
            Task::SrDipinv => v1::Task::SrDipinv,
            Task::DipinvPhysics => v1::Task::DipinvPhysics,
            Task::SrDipinvPhysics => v1::Task::SrDipinvPhysics,
        }
    }
}

/// The task of a proto `Task` value (`field` names it in the error).
pub fn task(value: i32, field: &'static str) -> Result<Task, ConvertError> {
    let bad = ConvertError::Enum {
        field,
        value,
        expected: TASKS,
    };
    match v1::Task::try_from(value).map_err(|_| bad.clone())? {
        v1::Task::Unspecified => Err(bad),
        v1::Task::Dipinv => Ok(Task::Dipinv),
        v1::Task::Sr => Ok(Task::Sr),
        v1::Task::SrDipinv => Ok(Task::SrDipinv),
        v1::Task::DipinvPhysics => Ok(Task::DipinvPhysics),
        v1::Task::SrDipinvPhysics => Ok(Task::SrDipinvPhysics),
    }
}

impl TryFrom<v1::Task> for Task {
    type Error = ConvertError;
    fn try_from(t: v1::Task) -> Result<Self, ConvertError> {
        task(t as i32, "task")
    }
}

impl TryFrom<Guidance> for v1::Guidance {
    type Error = ConvertError;
    fn try_from(g: Guidance) -> Result<Self, ConvertError> {
        match g {
            Guidance::Exact => Ok(v1::Guidance::Exact),
            Guidance::Approx => Ok(v1::Guidance::Approx),
            Guidance::Prox => Ok(v1::Guidance::Prox),
            Guidance::None => Err(ConvertError::NoWireForm(
                "guidance none (prior sampling)".into(),
            )),
        }
    }
}

/// The guidance of a proto `Guidance` value; `None` for `GUIDANCE_UNSPECIFIED` (the
/// receiver picks its default), an error for a value the schema does not know.
pub fn guidance(value: i32, field: &'static str) -> Result<Option<Guidance>, ConvertError> {
    let bad = ConvertError::Enum {
        field,
        value,
        expected: GUIDANCES,
    };
    Ok(match v1::Guidance::try_from(value).map_err(|_| bad)? {
        v1::Guidance::Unspecified => None,
        v1::Guidance::Exact => Some(Guidance::Exact),
        v1::Guidance::Approx => Some(Guidance::Approx),
        v1::Guidance::Prox => Some(Guidance::Prox),
    })
}

impl From<&ScheduleConfig> for v1::Schedule {
    fn from(s: &ScheduleConfig) -> Self {
        let kind = match s.kind {
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        };
        v1::Schedule {
            kind: kind.to_string(),
            timesteps: s.timesteps as u32,
            beta_start: s.beta_start,
            beta_end: s.beta_end,
        }
    }
}

impl TryFrom<&v1::Schedule> for ScheduleConfig {
    type Error = ConvertError;
    /// An empty schedule (0 timesteps) is the default, DDPM's linear β over T = 1000.
    fn try_from(s: &v1::Schedule) -> Result<Self, ConvertError> {
        let kind = match s.kind.as_str() {
            "linear" | "" => ScheduleKind::Linear,
            "cosine" => ScheduleKind::Cosine,
            other => {
                return Err(ConvertError::Invalid(format!(
                    "unknown schedule kind {other:?} (linear, cosine)"
                )));
            }
        };
        Ok(if s.timesteps == 0 {
            ScheduleConfig::default()
        } else {
            ScheduleConfig {
                kind,
                timesteps: s.timesteps as usize,
                beta_start: s.beta_start,
                beta_end: s.beta_end,
            }
        })
    }
}

impl From<&ModelSpec> for v1::ModelInfo {
    fn from(spec: &ModelSpec) -> Self {
        v1::ModelInfo {
            model_id: spec.model_id.clone(),
            content_hash: spec.content_hash.clone(),
            patch_size: spec.patch_size as u32,
            schedule: Some(v1::Schedule::from(&spec.schedule)),
            chi_scale: spec.chi_scale,
            parameterisation: PARAMETERISATION_EPS.to_string(),
        }
    }
}

impl TryFrom<&v1::ModelInfo> for ModelSpec {
    type Error = ConvertError;
    fn try_from(m: &v1::ModelInfo) -> Result<Self, ConvertError> {
        let schedule = ScheduleConfig::try_from(&m.schedule.clone().unwrap_or_default())
            .map_err(|e| ConvertError::Invalid(format!("model {}: {e}", m.model_id)))?;
        if !(m.chi_scale.is_finite() && m.chi_scale > 0.0) {
            return Err(ConvertError::Invalid(format!(
                "model {} has an invalid chi_scale {}",
                m.model_id, m.chi_scale
            )));
        }
        Ok(ModelSpec {
            model_id: m.model_id.clone(),
            content_hash: m.content_hash.clone(),
            patch_size: m.patch_size as usize,
            schedule,
            chi_scale: m.chi_scale,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every proto task maps to a task in `Task::ALL` and back; so adding a task to
    /// either enum without the other fails here or in the exhaustive matches above.
    #[test]
    fn every_wire_task_round_trips() {
        let mut seen = Vec::new();
        for value in 0..64 {
            match task(value, "task") {
                Ok(t) => {
                    assert_eq!(v1::Task::from(t) as i32, value);
                    seen.push(t);
                }
                Err(e) => assert!(e.to_string().contains(&value.to_string()), "{e}"),
            }
        }
        assert_eq!(seen, Task::ALL.to_vec());
    }

    #[test]
    fn guidance_round_trips_and_none_has_no_wire_form() {
        for g in [Guidance::Exact, Guidance::Approx, Guidance::Prox] {
            let w = v1::Guidance::try_from(g).unwrap();
            assert_eq!(guidance(w as i32, "g").unwrap(), Some(g));
        }
        assert!(v1::Guidance::try_from(Guidance::None).is_err());
        assert_eq!(guidance(0, "g").unwrap(), None);
        assert!(
            guidance(99, "settings.guidance")
                .unwrap_err()
                .to_string()
                .contains("settings.guidance 99")
        );
    }

    #[test]
    fn model_info_round_trips() {
        let spec = ModelSpec {
            model_id: "m".into(),
            content_hash: "ab".into(),
            patch_size: 48,
            schedule: ScheduleConfig {
                kind: ScheduleKind::Cosine,
                timesteps: 500,
                beta_start: 1e-4,
                beta_end: 0.02,
            },
            chi_scale: 5.0,
        };
        assert_eq!(
            ModelSpec::try_from(&v1::ModelInfo::from(&spec)).unwrap(),
            spec
        );
        let bad = v1::ModelInfo {
            chi_scale: f64::NAN,
            ..v1::ModelInfo::from(&spec)
        };
        assert!(ModelSpec::try_from(&bad).is_err());
    }
}
