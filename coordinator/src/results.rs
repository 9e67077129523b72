//! A finished job's files: `chi.nii.gz` (χ in ppm; the posterior mean when samples > 1),
//! `std.nii.gz` (voxelwise posterior standard deviation, samples > 1), `preview.png`
//! (orthogonal slices) and `report.json` (settings, model, timings, workers, retries).
//! Also the exact binary encoding of finished samples kept between restarts.

use crate::error::{CoordinatorError, Result};
use crate::job::JobRecord;
use dmqsm_common::Volume;
use dmqsm_common::diffusion::posterior::summarize;
use dmqsm_common::diffusion::sampler::Reconstruction;
use ndarray::Array3;
use serde::{Deserialize, Serialize};

const SAMPLE_MAGIC: &[u8; 8] = b"DMQSMSM1";

#[derive(Serialize, Deserialize)]
struct SampleHeader {
    shape: [usize; 3],
    voxel_size: [f64; 3],
    affine: [[f64; 4]; 4],
    seed: u64,
    steps: usize,
    residual_ppm: Option<f64>,
}

/// Exact binary encoding of a finished sample: magic `DMQSMSM1`, u64 LE header length,
/// JSON header (grid, seed, steps, residual), χ as f32 LE in C order.
pub fn encode_sample(r: &Reconstruction) -> Vec<u8> {
    let header = SampleHeader {
        shape: r.chi.shape(),
        voxel_size: r.chi.voxel_size,
        affine: r.chi.affine,
        seed: r.seed,
        steps: r.steps,
        residual_ppm: r.residual_ppm,
    };
    let json = serde_json::to_vec(&header).unwrap_or_default();
    let mut out = Vec::with_capacity(16 + json.len() + 4 * r.chi.data.len());
    out.extend_from_slice(SAMPLE_MAGIC);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for v in r.chi.data.iter() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Decodes [`encode_sample`]; the error names what is malformed.
pub fn decode_sample(bytes: &[u8]) -> std::result::Result<Reconstruction, String> {
    let bad = |m: &str| format!("stored sample is malformed: {m}");
    if bytes.len() < 16 || &bytes[..8] != SAMPLE_MAGIC {
        return Err(bad("missing magic"));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[8..16]);
    let hlen = u64::from_le_bytes(len) as usize;
    let body = &bytes[16..];
    if hlen > body.len() {
        return Err(bad("truncated header"));
    }
    let h: SampleHeader = serde_json::from_slice(&body[..hlen]).map_err(|e| bad(&e.to_string()))?;
    let data = &body[hlen..];
    let n: usize = h.shape.iter().product();
    if data.len() != 4 * n {
        return Err(bad("data length"));
    }
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let arr = Array3::from_shape_vec(h.shape, values).map_err(|e| bad(&e.to_string()))?;
    Ok(Reconstruction {
        chi: Volume::with_affine(arr, h.voxel_size, h.affine),
        seed: h.seed,
        steps: h.steps,
        residual_ppm: h.residual_ppm,
    })
}

/// Encodes a volume as gzipped NIfTI-1 (float32, ppm).
pub fn nifti_bytes(v: &Volume, description: &str) -> Result<Vec<u8>> {
    dmqsm_common::nifti_io::write_nifti_bytes(v, true)
        .map_err(|e| CoordinatorError::Store(format!("encoding {description}: {e}")))
}

/// Builds every result file of a finished job from its samples (in seed order).
pub fn build_results(
    rec: &JobRecord,
    samples: &[Reconstruction],
) -> Result<Vec<(String, Vec<u8>)>> {
    let job = &rec.job_id;
    let fail = |m: String| CoordinatorError::JobFailed {
        job: job.clone(),
        cause: m,
    };
    let first = samples
        .first()
        .ok_or_else(|| fail("no samples to write".into()))?;
    let mut files = Vec::new();
    let (chi, std) = if samples.len() > 1 {
        let s = summarize(samples)?;
        (s.mean, Some(s.std))
    } else {
        (first.chi.clone(), None)
    };
    files.push(("chi.nii.gz".to_string(), nifti_bytes(&chi, "chi_ppm")?));
    if let Some(std) = &std {
        files.push(("std.nii.gz".to_string(), nifti_bytes(std, "std_ppm")?));
    }
    let preview = dmqsm_common::preview::PreviewOptions {
        title: Some(format!("{} {} χ (ppm)", rec.job_id, rec.spec.task.name())),
        ..Default::default()
    };
    match dmqsm_common::preview::orthogonal_slices_png(&chi, &preview) {
        Ok(png) => files.push(("preview.png".to_string(), png)),
        Err(e) => tracing::warn!(job = %job, "no preview: {e}"),
    }
    let report = serde_json::json!({
        "job_id": rec.job_id,
        "label": rec.label,
        "settings": rec.spec,
        "model": {
            "model_id": rec.model.model_id,
            "content_hash": rec.model.content_hash,
            "patch_size": rec.model.patch_size,
            "schedule": rec.model.schedule,
            "chi_scale": rec.model.chi_scale,
        },
        "output": {
            "shape": chi.shape(),
            "voxel_size_mm": chi.voxel_size,
            "units": "ppm",
            "files": if std.is_some() { vec!["chi.nii.gz", "std.nii.gz", "preview.png"] } else { vec!["chi.nii.gz", "preview.png"] },
        },
        "samples": samples.iter().map(|s| serde_json::json!({
            "seed": s.seed, "steps": s.steps, "residual_ppm": s.residual_ppm,
        })).collect::<Vec<_>>(),
        "timings_s": {
            "submitted_unix": rec.submitted_unix,
            "started_unix": rec.started_unix,
            "finished_unix": crate::job::unix_now(),
            "running": rec.timings.running_s,
            "waiting_for_workers": rec.timings.waiting_for_workers_s,
            "coordinator_numerics": rec.timings.coordinator_numerics_s,
        },
        "workers_used": rec.workers_used,
        "retries": rec.retries,
        "resumed_from_steps": rec.resumed_from,
        "history": rec.history,
        "software": {
            "dmqsm": env!("CARGO_PKG_VERSION"),
        },
    });
    let json = serde_json::to_vec_pretty(&report)
        .map_err(|e| fail(format!("encoding report.json: {e}")))?;
    files.push(("report.json".to_string(), json));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_round_trip_exactly() {
        let data = Array3::from_shape_fn((3, 4, 5), |(i, j, k)| {
            (i * 20 + j * 5 + k) as f32 * 0.1 - 2.0
        });
        let r = Reconstruction {
            chi: Volume::new(data, [1.0, 1.5, 2.0]),
            seed: 7,
            steps: 25,
            residual_ppm: Some(0.25),
        };
        let back = decode_sample(&encode_sample(&r)).unwrap();
        assert_eq!(back, r);
        assert!(decode_sample(b"nonsense").is_err());
        let mut bytes = encode_sample(&r);
        bytes.pop();
        assert!(decode_sample(&bytes).unwrap_err().contains("data length"));
    }
}
