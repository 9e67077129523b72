//! The rules of a run that are not its state: the default ξ of each task, guidance and
//! step count, and when a run counts as diverged.

use super::Guidance;
use crate::tasks::Task;

/// A run is declared diverged when its data residual ‖M_y(y − A x̂_0)‖ exceeds this many
/// times ‖M_y y‖, the residual of the zero map, at a step with ᾱ_t ≥
/// [`DIVERGENCE_MIN_ALPHA_BAR`]: the estimate then explains the data far worse than
/// predicting nothing at all (the blow-ups seen with large DPS steps reach 10³–10⁵). A
/// non-finite residual is divergence at any step.
pub const DIVERGENCE_FACTOR: f64 = 20.0;
/// The residual is only judged once ᾱ_t ≥ this: at the noisiest steps x̂_0 = (x_t −
/// √(1−ᾱ) ε̂)/√ᾱ amplifies any error of ε̂ by up to 1/√ᾱ ≈ 160, so a large residual
/// there says nothing about the result.
pub const DIVERGENCE_MIN_ALPHA_BAR: f64 = 0.5;

/// The default ξ of a run: what [`SamplerSettings::xi`] = `None` means.
///
/// - DPS ([`Guidance::Exact`], [`Guidance::Approx`]): DM-QSM's ξ ([`Task::default_xi`]:
///   0.5 dipole inversion, 2 SR) is a per-step size at T = 1000 steps. With the
///   plain-norm DPS gradient each step moves x by about ξ whatever the residual, so the
///   total pull toward the data grows with the number of steps; N re-spaced steps take
///   ξ·1000/N to keep it (equal to the paper's value at N = 1000).
/// - [`Guidance::Prox`]: ξ is the data weight w of the proximal step, which does not
///   accumulate over steps: 2 (`dipinv`, A = I on a TKD estimate), 16 (`sr`), 8
///   (`sr-dipinv`) and 8 (physics tasks). The first three were tuned on held-out phantom
///   1000 at 25 steps with the bundled model; the physics weight on the same phantom
///   (64×64×48 crop) for the warm-started default (8 steps from t₀ = 50, where w = 2, 4,
///   8 and 64 gave NRMSE 40.3, 37.9, 36.8 and 40.0 %); `dmqsm benchmark quality` sweeps
///   around them. With the TV data-consistency step (`tv_step`, `dipinv-physics` only)
///   the weight is [`PROX_TV_XI`].
/// - [`Guidance::None`]: ξ is not used.
///
/// `tv_step` says whether the problem carries the TV data-consistency step
/// ([`crate::tasks::Problem::tv_consistency`]); it matters only to prox guidance.
pub fn default_xi(task: Task, guidance: Guidance, steps: usize, tv_step: bool) -> f64 {
    match guidance {
        Guidance::Exact | Guidance::Approx | Guidance::None => {
            task.default_xi() * 1000.0 / steps.max(1) as f64
        }
        Guidance::Prox => match task {
            Task::Dipinv => 2.0,
            Task::Sr => 16.0,
            Task::SrDipinv => 8.0,
            Task::DipinvPhysics if tv_step => PROX_TV_XI,
            Task::DipinvPhysics | Task::SrDipinvPhysics => 8.0,
        },
    }
}

/// The prox data weight w of `dipinv-physics` with the TV data-consistency step
/// ([`crate::diffusion::consistency::tv_proximal_consistency`], α = 0.1 × the warm
/// start's TV α). Measured on validation phantoms 500–502 (never trained on or
/// evaluated; 96×112×96, noise-free, 8 steps from t₀ = 50), NRMSE / HFEN % of phantom
/// 500: w = 8: 47.3 / 31.5, 16: 47.2 / 28.8, 24: 47.9 / 28.0, 32: 48.7 / 27.7. 24 is the
/// smallest w that beats truth-tuned TV on NRMSE, HFEN and XSIM on all three (16 trails
/// on phantom 501's HFEN by 0.1); larger w trades NRMSE for HFEN.
pub const PROX_TV_XI: f64 = 24.0;
