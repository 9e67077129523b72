//! From a stored job (settings + input NIfTI bytes) to the sampler's `Problem`.

use crate::error::{CoordinatorError, Result};
use crate::job::JobSpec;
use dmqsm_common::diffusion::model::ModelSpec;
use dmqsm_common::nifti_io::read_nifti_bytes;
use dmqsm_common::tasks::{
    Downsampling, InitialEstimate, Problem, Resolution, TaskOptions, prepare,
};
use dmqsm_common::units::{FieldScale, FieldUnit};
use dmqsm_proto::v1;

/// The [`ModelSpec`] of a worker's model, as the sampler needs it.
pub fn model_spec(m: &v1::ModelInfo) -> Result<ModelSpec> {
    ModelSpec::try_from(m).map_err(|e| CoordinatorError::InvalidSubmission(e.to_string()))
}

/// The task options (`dmqsm_common::tasks::prepare`) of a job.
pub fn task_options(spec: &JobSpec) -> Result<TaskOptions> {
    let mut o = TaskOptions::new(spec.task);
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
    if spec.task.measures_field() && spec.field_units != "ppm" {
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
