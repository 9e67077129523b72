//! From a stored job (settings + input NIfTI bytes) to the sampler's `Problem`.

use crate::error::{CoordinatorError, Result};
use crate::job::{JobSpec, TaskKind};
use dmqsm_common::diffusion::model::ModelSpec;
use dmqsm_common::diffusion::schedule::{ScheduleConfig, ScheduleKind};
use dmqsm_common::nifti_io::read_nifti_bytes;
use dmqsm_common::tasks::{
    Downsampling, InitialEstimate, Problem, Resolution, Task, TaskOptions, prepare,
};
use dmqsm_common::units::{FieldScale, FieldUnit};
use dmqsm_proto::v1;

/// The [`ModelSpec`] of a worker's model, as the sampler needs it.
pub fn model_spec(m: &v1::ModelInfo) -> Result<ModelSpec> {
    let s = m.schedule.clone().unwrap_or_default();
    let kind = match s.kind.as_str() {
        "linear" | "" => ScheduleKind::Linear,
        "cosine" => ScheduleKind::Cosine,
        other => {
            return Err(CoordinatorError::InvalidSubmission(format!(
                "model {} has an unknown schedule kind {other:?}",
                m.model_id
            )));
        }
    };
    let schedule = if s.timesteps == 0 {
        ScheduleConfig::default()
    } else {
        ScheduleConfig {
            kind,
            timesteps: s.timesteps as usize,
            beta_start: s.beta_start,
            beta_end: s.beta_end,
        }
    };
    if !(m.chi_scale.is_finite() && m.chi_scale > 0.0) {
        return Err(CoordinatorError::InvalidSubmission(format!(
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

/// The common crate's task of a job.
pub fn task_of(kind: TaskKind) -> Task {
    match kind {
        TaskKind::Dipinv => Task::Dipinv,
        TaskKind::Sr => Task::Sr,
        TaskKind::SrDipinv => Task::SrDipinv,
        TaskKind::DipinvPhysics => Task::DipinvPhysics,
        TaskKind::SrDipinvPhysics => Task::SrDipinvPhysics,
    }
}

/// The task options (`dmqsm_common::tasks::prepare`) of a job.
pub fn task_options(spec: &JobSpec) -> Result<TaskOptions> {
    let mut o = TaskOptions::new(task_of(spec.task));
    o.resolution = Resolution::Factor(spec.factor.map(|f| f as usize));
    o.downsampling = spec
        .downsample
        .parse::<Downsampling>()
        .map_err(|e| CoordinatorError::InvalidSubmission(e.to_string()))?;
    o.tkd_threshold = spec.tkd_threshold;
    o.b0_dir = spec.b0_dir;
    if spec.start_timestep.is_some() {
        o.initial_estimate = InitialEstimate::Tv {
            alpha: spec.tv_alpha,
        };
    }
    Ok(o)
}

/// Decodes a job's input NIfTI bytes, converts a field to ppm, and builds the sampler's
/// problem with `dmqsm_common::tasks::prepare`. Every error is an
/// [`CoordinatorError::InvalidSubmission`] naming the input and the problem (malformed
/// NIfTI, shapes that differ, NaN, bad geometry or factors).
pub fn build_problem(
    spec: &JobSpec,
    model: &ModelSpec,
    measurement: &[u8],
    mask: Option<&[u8]>,
) -> Result<Problem> {
    let bad = |what: &str, e: dmqsm_common::Error| {
        CoordinatorError::InvalidSubmission(format!("{what}: {e}"))
    };
    let mut m = read_nifti_bytes(measurement).map_err(|e| bad("measurement", e))?;
    let k = mask
        .map(read_nifti_bytes)
        .transpose()
        .map_err(|e| bad("mask", e))?;
    if spec.task.takes_field() && spec.field_units != "ppm" {
        let unit: FieldUnit = spec
            .field_units
            .parse()
            .map_err(|e| bad("field units", e))?;
        let te = (spec.te_seconds > 0.0).then_some(spec.te_seconds);
        let scale = FieldScale::new(spec.b0_tesla, te).map_err(|e| bad("field units", e))?;
        let f = scale
            .factor(unit, FieldUnit::Ppm)
            .map_err(|e| bad("field units", e))?;
        m.data.mapv_inplace(|v| (v as f64 * f) as f32);
    }
    if model.patch_size == 0 {
        return Err(CoordinatorError::InvalidSubmission(format!(
            "model {} declares patch size 0",
            model.model_id
        )));
    }
    let options = task_options(spec)?;
    prepare(&options, &m, k.as_ref())
        .map_err(|e| CoordinatorError::InvalidSubmission(format!("{}: {e}", spec.task.name())))
}
