//! From a stored job (settings + input NIfTI bytes) to the sampler's `Problem`.

use crate::error::{CoordinatorError, Result};
use crate::job::JobSpec;
use dmqsm_common::diffusion::model::ModelSpec;
use dmqsm_common::nifti_io::read_nifti_bytes;
use dmqsm_common::tasks::{
    ConsistencyTv, Downsampling, InitialEstimate, Problem, Resolution, TaskOptions, prepare,
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
    if let Some(factor) = spec.prox_tv {
        o.consistency_tv = ConsistencyTv::Relative { factor };
    }
    Ok(o)
}

/// Largest difference allowed between the translation columns of the mask's and the
/// measurement's affines, in mm.
pub const AFFINE_ORIGIN_TOLERANCE_MM: f64 = 1e-3;
/// Largest difference allowed between the linear parts (voxel size × direction) of the
/// two affines, relative to the length of each column (the voxel size).
pub const AFFINE_LINEAR_TOLERANCE: f64 = 1e-4;

/// Refuses a mask whose voxel-to-scanner affine differs from the measurement's: origin
/// (translation) by more than [`AFFINE_ORIGIN_TOLERANCE_MM`], or any entry of a column of
/// the 3×3 part by more than [`AFFINE_LINEAR_TOLERANCE`] × that column's length (its voxel
/// size), so another voxel size, orientation or origin is an error naming both affines.
pub fn check_mask_affine(measurement: &[[f64; 4]; 4], mask: &[[f64; 4]; 4]) -> Result<()> {
    check_same_affine("measurement", measurement, "mask", mask)
        .map_err(CoordinatorError::InvalidSubmission)
}

/// [`check_mask_affine`] for any two volumes that must share a grid: `other` (named
/// `other_name`) against the reference `reference` (named `reference_name`), with the
/// same tolerances; the error message names both and gives both affines.
pub fn check_same_affine(
    reference_name: &str,
    reference: &[[f64; 4]; 4],
    other_name: &str,
    other: &[[f64; 4]; 4],
) -> std::result::Result<(), String> {
    let (measurement, mask) = (reference, other);
    let mut worst: Option<String> = None;
    for col in 0..4 {
        let norm = (0..3)
            .map(|r| measurement[r][col].powi(2))
            .sum::<f64>()
            .sqrt();
        let tol = if col == 3 {
            AFFINE_ORIGIN_TOLERANCE_MM
        } else {
            AFFINE_LINEAR_TOLERANCE * norm
        };
        for row in 0..3 {
            let d = (measurement[row][col] - mask[row][col]).abs();
            // A NaN difference counts as too large.
            if (d > tol || d.is_nan()) && worst.is_none() {
                worst = Some(format!(
                    "entry [{row}][{col}] differs by {d:.3e} (tolerance {tol:.1e}{})",
                    if col == 3 {
                        " mm"
                    } else {
                        " mm, relative to the voxel size"
                    }
                ));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some(w) => Err(format!(
            "the {other_name}'s geometry differs from the {reference_name}'s (another voxel \
             size, orientation or origin): {w}; {reference_name} affine {}, {other_name} \
             affine {}; resample the {other_name} onto the {reference_name}'s grid",
            fmt_affine(measurement),
            fmt_affine(mask)
        )),
    }
}

/// The 3×4 part of an affine as `[[a, b, c, d], …]` with 4 decimals.
fn fmt_affine(a: &[[f64; 4]; 4]) -> String {
    let rows: Vec<String> = a
        .iter()
        .take(3)
        .map(|r| format!("[{:.4}, {:.4}, {:.4}, {:.4}]", r[0], r[1], r[2], r[3]))
        .collect();
    format!("[{}]", rows.join(", "))
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
    if let Some(k) = &k {
        check_mask_affine(&m.affine, &k.affine)?;
    }
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
    check_overlap(spec, model)?;
    let options = task_options(spec)?;
    prepare(&options, &m, k.as_ref())
        .map_err(|e| CoordinatorError::InvalidSubmission(format!("{}: {e}", spec.task.name())))
}

/// Refuses an overlap that is not below the model's patch size (the stride P − S must be
/// at least 1), naming the setting and the patch size.
pub fn check_overlap(spec: &JobSpec, model: &ModelSpec) -> Result<()> {
    if model.patch_size == 0 {
        return Err(CoordinatorError::InvalidSubmission(format!(
            "model {} declares patch size 0",
            model.model_id
        )));
    }
    if spec.overlap as usize >= model.patch_size {
        return Err(CoordinatorError::InvalidSubmission(format!(
            "settings.overlap {} must be below the model's patch size {} (valid: 0..={}; \
             the patch stride is patch size − overlap)",
            spec.overlap,
            model.patch_size,
            model.patch_size - 1
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affine(vox: [f64; 3], origin: [f64; 3]) -> [[f64; 4]; 4] {
        let mut a = [[0.0; 4]; 4];
        for i in 0..3 {
            a[i][i] = vox[i];
            a[i][3] = origin[i];
        }
        a[3][3] = 1.0;
        a
    }

    /// Same grid passes (also within f32 rounding); another voxel size, origin or an
    /// axis flip is refused with both affines in the message.
    #[test]
    fn mask_affine_must_match() {
        let m = affine([1.0, 1.0, 2.0], [-90.0, 12.5, 40.0]);
        check_mask_affine(&m, &m).unwrap();
        let mut near = m;
        near[0][3] += 5e-4;
        near[2][2] += 1e-4;
        check_mask_affine(&m, &near).unwrap();
        let cases = [
            affine([1.1, 1.0, 2.0], [-90.0, 12.5, 40.0]),
            affine([1.0, 1.0, 2.0], [-90.0, 12.5, 41.0]),
            affine([-1.0, 1.0, 2.0], [-90.0, 12.5, 40.0]),
        ];
        for k in cases {
            let e = check_mask_affine(&m, &k).unwrap_err().to_string();
            assert!(
                e.contains("measurement affine [[1.0000, 0.0000, 0.0000, -90.0000]")
                    && e.contains("mask affine [["),
                "{e}"
            );
        }
        let mut nan = m;
        nan[1][1] = f64::NAN;
        assert!(check_mask_affine(&m, &nan).is_err());
    }
}
