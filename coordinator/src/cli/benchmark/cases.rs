//! The benchmark cases and what builds their inputs: the [`Case`] enum (a task with its
//! measurement simulation), the held-out phantom [`Subject`] with its simulated
//! measurements (noise-free and SNR 100 fields, the finer-grid field, the 2 mm χ and
//! field), the non-learning baselines of each case and the sampler problem DM-QSM
//! starts from. χ and fields in ppm, 1 mm voxels (2 mm for the low-resolution inputs),
//! B0 along the voxel z axis.

use anyhow::{Context, bail};
use clap::ValueEnum;
use dmqsm_common::diffusion::consistency::TvConsistency;
use dmqsm_common::geometry::B0Direction;
use dmqsm_common::inversion::l2::l2;
use dmqsm_common::inversion::tkd::tkd;
use dmqsm_common::inversion::tv::{LCurvePoint, tv_lcurve_default};
use dmqsm_common::metrics::{self, Metrics};
use dmqsm_common::operators::resample::trilinear_upsample;
use dmqsm_common::operators::{BlockDownsample, KSpaceDownsample, LinearOperator};
use dmqsm_common::phantom::{self, PhantomConfig};
use dmqsm_common::simulate::{add_noise, forward_field};
use dmqsm_common::tasks::{self, InitialEstimate, Task, TaskOptions};
use dmqsm_common::volume::Volume;
use ndarray::{Array3, Zip};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// The first phantom seed that training never uses (the bundled model trains on < 1000).
pub const FIRST_HELD_OUT_SEED: u64 = 1000;
/// TKD threshold δ of the baselines (DM-QSM's value).
pub const TKD_THRESHOLD: f64 = 0.1;
/// Closed-form L2 weight λ of the baselines (SEPIA's default).
pub const L2_LAMBDA: f64 = 0.1;
/// SNR of the noisy `dipinv` case.
pub const NOISY_SNR: f64 = 100.0;

/// A benchmark case: a task with its measurement simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Case {
    /// Noise-free local field → χ (DM-QSM DipInv).
    Dipinv,
    /// Local field at SNR 100 → χ.
    DipinvSnr100,
    /// 2 mm χ → 1 mm χ (×2 SR).
    Sr,
    /// 2 mm field → 1 mm χ.
    SrDipinv,
    /// Field → χ with the dipole model in the DPS data term.
    DipinvPhysics,
    /// `dipinv-physics` at SNR 100.
    DipinvPhysicsSnr100,
    /// `dipinv-physics` without the inverse crime: the field is simulated on a 2× finer
    /// grid (χ replicated to 0.5 mm, the 0.5 mm dipole kernel) and block-averaged to
    /// 1 mm, so it is not the 1 mm kernel applied to the truth.
    DipinvPhysicsFine,
}

impl Case {
    /// All cases in table order.
    pub const ALL: [Case; 7] = [
        Case::Dipinv,
        Case::DipinvSnr100,
        Case::Sr,
        Case::SrDipinv,
        Case::DipinvPhysics,
        Case::DipinvPhysicsSnr100,
        Case::DipinvPhysicsFine,
    ];

    /// The sampler task of this case.
    pub fn task(self) -> Task {
        match self {
            Case::Dipinv | Case::DipinvSnr100 => Task::Dipinv,
            Case::Sr => Task::Sr,
            Case::SrDipinv => Task::SrDipinv,
            Case::DipinvPhysics | Case::DipinvPhysicsSnr100 | Case::DipinvPhysicsFine => {
                Task::DipinvPhysics
            }
        }
    }

    /// The name used in tables and file names.
    pub fn name(self) -> &'static str {
        match self {
            Case::Dipinv => "dipinv",
            Case::DipinvSnr100 => "dipinv-snr100",
            Case::Sr => "sr",
            Case::SrDipinv => "sr-dipinv",
            Case::DipinvPhysics => "dipinv-physics",
            Case::DipinvPhysicsSnr100 => "dipinv-physics-snr100",
            Case::DipinvPhysicsFine => "dipinv-physics-fine",
        }
    }
}

/// A held-out phantom with its simulated measurements.
pub(super) struct Subject {
    /// Phantom seed.
    pub(super) seed: u64,
    /// True χ (ppm, 1 mm).
    pub(super) chi: Volume,
    /// Brain mask (1 inside, 0 outside).
    pub(super) mask: Volume,
    /// The brain mask as booleans.
    pub(super) mask_bool: Array3<bool>,
    field: Volume,
    field_noisy: Volume,
    /// The field simulated on the 2× finer grid and block-averaged (only when a case
    /// needs it).
    field_fine: Option<Volume>,
    chi_lr: Volume,
    field_lr: Volume,
    mask_lr: Volume,
}

/// `v` with every voxel outside `mask` set to 0.
fn masked(v: &Volume, mask: &Array3<bool>) -> Volume {
    let mut d = v.data.clone();
    Zip::from(&mut d).and(mask).for_each(|x, &m| {
        if !m {
            *x = 0.0;
        }
    });
    v.like(d)
}

/// The field of `chi` simulated without the inverse crime: χ replicated onto a grid 2×
/// finer per axis (each voxel an exact 2×2×2 block), the field computed there with the
/// fine grid's dipole kernel (padded to 2N), then block-averaged back.
pub(super) fn field_from_finer_grid(chi: &Volume, b0: B0Direction) -> anyhow::Result<Volume> {
    let f = [2, 2, 2];
    let fine_shape = chi.shape().map(|n| 2 * n);
    let block = BlockDownsample::new(fine_shape, f)?;
    let vox = chi.voxel_size.map(|v| v / 2.0);
    let fine = Volume::new(block.upsample(&chi.data)?, vox);
    let field = forward_field(&fine, b0)?;
    Ok(chi.like(block.apply(&field.data)?))
}

/// Held-out phantom `seed` at `shape` (1 mm voxels, anatomy at true size) with its
/// measurements: the masked local field (B0 along z), the same at SNR 100, the 2 mm χ and
/// field (k-space crops) with their mask, and with `fine` the finer-grid field.
pub(super) fn subject(seed: u64, shape: [usize; 3], fine: bool) -> anyhow::Result<Subject> {
    let cfg = PhantomConfig {
        head_scale: Some(1.0),
        ..PhantomConfig::new(shape, [1.0; 3], seed)
    };
    let ph = phantom::generate(&cfg).with_context(|| format!("phantom seed {seed}"))?;
    let mask_bool = ph.mask.data.mapv(|v| v > 0.5);
    if !mask_bool.iter().any(|&b| b) {
        bail!("phantom seed {seed} at {shape:?} has an empty brain mask");
    }
    let b0 = B0Direction::AXIAL;
    let field = masked(&forward_field(&ph.chi, b0)?, &mask_bool);
    let (noisy, _sigma) = add_noise(&field, Some(&ph.mask.data), NOISY_SNR, seed)?;
    let field_noisy = masked(&noisy, &mask_bool);
    let field_fine = fine
        .then(|| anyhow::Ok(masked(&field_from_finer_grid(&ph.chi, b0)?, &mask_bool)))
        .transpose()?;
    let f = [2, 2, 2];
    let down = KSpaceDownsample::new(shape, f)?;
    let block = BlockDownsample::new(shape, f)?;
    // A low-res voxel is inside when any of its high-res voxels is, so the refined mask
    // covers the truth's mask.
    let mask_lr_data = block
        .apply(&ph.mask.data)?
        .mapv(|v| if v > 0.0 { 1.0 } else { 0.0 });
    let lr_bool = mask_lr_data.mapv(|v| v > 0.5);
    let lr = |d: Array3<f32>| masked(&Volume::new(d, [2.0; 3]), &lr_bool);
    let chi_lr = lr(down.apply(&ph.chi.data)?);
    let field_lr = lr(down.apply(&field.data)?);
    Ok(Subject {
        seed,
        chi: ph.chi,
        mask: ph.mask,
        mask_bool,
        field,
        field_noisy,
        field_fine,
        chi_lr,
        field_lr,
        mask_lr: Volume::new(mask_lr_data, [2.0; 3]),
    })
}

impl Subject {
    /// The measurement (and its mask) a case starts from.
    pub(super) fn measurement(&self, case: Case) -> (&Volume, &Volume) {
        match case {
            Case::Dipinv | Case::DipinvPhysics => (&self.field, &self.mask),
            Case::DipinvSnr100 | Case::DipinvPhysicsSnr100 => (&self.field_noisy, &self.mask),
            Case::DipinvPhysicsFine => {
                (self.field_fine.as_ref().unwrap_or(&self.field), &self.mask)
            }
            Case::Sr => (&self.chi_lr, &self.mask_lr),
            Case::SrDipinv => (&self.field_lr, &self.mask_lr),
        }
    }

    /// Masks a reconstruction with the truth's mask, on the truth's grid.
    pub(super) fn finish(&self, data: Array3<f32>) -> Volume {
        masked(&self.chi.like(data), &self.mask_bool)
    }

    /// Metrics of `recon` against the truth in the brain mask.
    pub(super) fn score(&self, recon: &Volume) -> anyhow::Result<Metrics> {
        Ok(metrics::evaluate(recon, &self.chi, &self.mask)?)
    }

    /// The non-learning baselines of `case` and, for the dipole cases, the TV solution
    /// at the L-curve corner (the warm start of DM-QSM: no truth is used to make it).
    pub(super) fn baselines(&self, case: Case) -> anyhow::Result<(Vec<Baseline>, Option<Volume>)> {
        let b0 = B0Direction::AXIAL;
        let mut out = Vec::new();
        let mut timed = |name: &str, f: &dyn Fn() -> anyhow::Result<Array3<f32>>| {
            let t = Instant::now();
            let d = f()?;
            out.push(Baseline {
                name: name.to_string(),
                volume: self.finish(d),
                seconds: t.elapsed().as_secs_f64(),
                alpha: None,
            });
            anyhow::Ok(())
        };
        let f2 = [2, 2, 2];
        let mut warm = None;
        match case {
            Case::Dipinv
            | Case::DipinvSnr100
            | Case::DipinvPhysics
            | Case::DipinvPhysicsSnr100
            | Case::DipinvPhysicsFine => {
                let (field, mask) = self.measurement(case);
                timed("TKD", &|| Ok(tkd(field, b0, TKD_THRESHOLD)?.data))?;
                timed("L2", &|| Ok(l2(field, b0, L2_LAMBDA)?.data))?;
                let t = Instant::now();
                let curve = tv_lcurve_default(field, Some(mask.data.view()), b0)?;
                let secs = t.elapsed().as_secs_f64() / curve.points.len() as f64;
                let mut tuned: Option<(f64, &LCurvePoint)> = None;
                for p in &curve.points {
                    let n = self.score(&self.finish(p.chi.data.clone()))?.nrmse;
                    if tuned.is_none_or(|(b, _)| n < b) {
                        tuned = Some((n, p));
                    }
                }
                if let Some((_, p)) = tuned {
                    out.push(Baseline {
                        name: TV_TUNED.into(),
                        volume: self.finish(p.chi.data.clone()),
                        seconds: secs,
                        alpha: Some(p.report.alpha),
                    });
                }
                let corner = curve.best();
                out.push(Baseline {
                    name: TV_LCURVE.into(),
                    volume: self.finish(corner.chi.data.clone()),
                    seconds: secs,
                    alpha: Some(corner.report.alpha),
                });
                warm = Some(corner.chi.clone());
            }
            Case::Sr => {
                let lr = &self.chi_lr.data;
                let down = KSpaceDownsample::new(self.chi.shape(), f2)?;
                timed("zero-fill", &|| Ok(down.upsample(lr)?))?;
                timed("trilinear", &|| Ok(trilinear_upsample(lr, f2)?))?;
            }
            Case::SrDipinv => {
                let field = &self.field_lr;
                let down = KSpaceDownsample::new(self.chi.shape(), f2)?;
                let lr_mask = self.mask_lr.data.mapv(|v| v > 0.5);
                timed("TKD+zero-fill", &|| {
                    Ok(down.upsample(&masked(&tkd(field, b0, TKD_THRESHOLD)?, &lr_mask).data)?)
                })?;
                timed("TKD+trilinear", &|| {
                    Ok(trilinear_upsample(
                        &masked(&tkd(field, b0, TKD_THRESHOLD)?, &lr_mask).data,
                        f2,
                    )?)
                })?;
                timed("L2+zero-fill", &|| {
                    Ok(down.upsample(&masked(&l2(field, b0, L2_LAMBDA)?, &lr_mask).data)?)
                })?;
            }
        }
        Ok((out, warm))
    }

    /// The sampler's problem of `case`, with `initial` (χ on the output grid) attached
    /// for warm starts. For the dipole cases that is the L-curve TV of [`Subject::baselines`],
    /// bitwise what `tasks::prepare` computes for `InitialEstimate::Tv { alpha: None }`;
    /// without it, the SR cases take the zero-fill of their measurement.
    /// `tv_alpha` attaches the TV data consistency with that α (`dipinv-physics` only).
    pub(super) fn problem(
        &self,
        case: Case,
        initial: Option<&Volume>,
        tv_alpha: Option<f64>,
    ) -> anyhow::Result<Arc<tasks::Problem>> {
        let (y, m) = self.measurement(case);
        let mut options = TaskOptions::new(case.task());
        options.b0_dir = Some([0.0, 0.0, 1.0]);
        if initial.is_none() {
            options.initial_estimate = InitialEstimate::Tkd;
        }
        let mut p = tasks::prepare(&options, y, Some(m))
            .with_context(|| format!("preparing {} for phantom {}", case.name(), self.seed))?;
        if let Some(init) = initial {
            p = p.with_initial_estimate(init.data.clone())?;
        }
        if let Some(alpha) = tv_alpha {
            let tv = TvConsistency::new(
                y,
                Some(m.data.view()),
                B0Direction::AXIAL,
                options.dipole_padding,
                alpha,
            )?;
            p = p.with_tv_consistency(Arc::new(tv))?;
        }
        Ok(Arc::new(p))
    }
}

/// A baseline reconstruction.
pub(super) struct Baseline {
    /// Method label, e.g. `TKD`, `TV (L-curve α)`.
    pub(super) name: String,
    /// The reconstruction, masked with the truth's mask (ppm).
    pub(super) volume: Volume,
    /// Wall time (s; TV: per α of the L-curve).
    pub(super) seconds: f64,
    /// TV weight α (TV rows).
    pub(super) alpha: Option<f64>,
}

/// Label of the TV baseline whose α (from the L-curve's grid) is chosen by NRMSE against
/// the truth: TV's best case, not available to a user.
pub const TV_TUNED: &str = "TV (α tuned on truth)";
/// Label of the TV baseline with α at the L-curve corner (no truth used).
pub const TV_LCURVE: &str = "TV (L-curve α)";
