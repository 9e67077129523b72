//! The DM-QSM sampler as a state machine: patch-based DDIM/DDPM with DPS guidance.
//!
//! The sampler never calls a model. Each *round* it publishes which patch evaluations
//! it needs; a caller evaluates them anywhere (in process, on remote workers), in any
//! order and grouping, hands the results back, and completes the round:
//!
//! ```text
//! let mut s = Sampler::new(problem, &spec, settings)?;
//! while let Some(round) = s.round() {
//!     for indices in s.plan_batches(max_batch)? {          // or any grouping you like
//!         let batch = s.batch(&indices)?;                   // x [B,P,P,P], t [B], cotangent
//!         let out = evaluate(&batch);                       // model.eps, or model.vjp in a VJP round
//!         s.accept(PatchResults::new(round.id, indices, out)?)?; // checked once, rows not copied
//!     }
//!     s.complete_round()?;                                  // errors if anything is missing
//! }
//! let reconstruction = s.result()?;
//! ```
//!
//! One step at training timestep t (ᾱ = ᾱ_t), on the padded volume of the
//! [`PatchGrid`] (model units χ_model = χ_ppm × chi_scale):
//! 1. ε̂ = Σ_p E_pᵀ ε(E_p x_t) / count (WeatherDiffusion/DM-QSM overlap averaging);
//! 2. x̂_0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ, optionally clamped to a range;
//! 3. x'_{t−1} = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z_k (DDIM, η sets σ);
//! 4. DPS: x_{t−1} = x'_{t−1} − ξ ∇_{x_t} L, L = ‖M_y ⊙ (y − A crop(x̂_0))‖₂ (plain norm,
//!    DPS code convention, REFERENCE.md §2), g = ∇_{x̂_0} L = −crop*(Aᵀ r)/L.
//!    - [`Guidance::Exact`]: differentiating the patched map above,
//!      ∇_{x_t} L = (g − √(1−ᾱ) Σ_p E_pᵀ J_pᵀ E_p (g/count)) / √ᾱ,
//!      J_p = ∂ε/∂x of patch p. So the VJP round sends cotangent E_p(g/count) per patch
//!      and sums the returned Jᵀv *without* dividing by the count. This needs ε̂ (for
//!      x̂_0 and g) first, hence two rounds per step: ε, then Jᵀv (the VJP round returns
//!      Jᵀv only; the step uses the first round's ε).
//!    - [`Guidance::Approx`]: drops the network Jacobian, ∇ ≈ g/√ᾱ (one round).
//!    - [`Guidance::Prox`]: instead of step 4, x̂_0 is replaced by the proximal
//!      data-consistency solution x̃_0 = argmin ξ‖M_y(y − A M x)‖² + ‖x − x̂_0‖² (M the
//!      brain mask of the output; a few CG
//!      iterations, [`crate::diffusion::consistency`]) before the DDIM update of step 3
//!      (DDS, Chung et al. ICLR 2024; beyond the paper). One round per step; ξ is the
//!      data weight w.
//!    - [`Guidance::None`]: unconditional prior sampling (one round).
//!
//! Determinism: the step depends only on x_t, the per-patch results, the seed and the
//! step index. Results are stored per patch and summed in patch-index order; noise z_k
//! is a pure function of (seed, k, voxel); reductions use fixed chunking. So any
//! batching, order or retry policy yields bitwise identical steps, and a
//! [`Checkpoint`] (taken at any time; it records the state at the start of the current
//! step) restores bitwise identically.

mod batch;
mod checkpoint;
mod fused;
mod guidance;
mod rules;
mod step;

pub use batch::{BatchTensor, PatchBatch, PatchResults, PatchSource, PatchWork};
pub use checkpoint::Checkpoint;
pub use guidance::Guidance;
pub use rules::{DIVERGENCE_FACTOR, DIVERGENCE_MIN_ALPHA_BAR, PROX_TV_XI, default_xi};
pub use step::{ddim_update, denoise, dps_gradient, sum_squares};

use crate::diffusion::model::ModelSpec;
use crate::diffusion::noise::{NoiseStream, step_stream};
use crate::diffusion::schedule::{NoiseSchedule, SamplingSchedule, StepCoefficients};
use crate::error::{Error, Result};
use crate::patch::{GridSpacing, PatchGrid};
use crate::tasks::Problem;
use crate::volume::Volume;
use batch::RoundResults;
use ndarray::{Array3, ArrayView3, Zip};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Settings of one sampling run (one posterior sample).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerSettings {
    /// Number of re-spaced sampling steps N (1 … T).
    pub steps: usize,
    /// DDIM stochasticity η (0 deterministic DDIM, 1 ancestral DDPM-like).
    pub eta: f64,
    /// DPS step size ξ (the data weight for [`Guidance::Prox`]); `None` takes
    /// [`default_xi`] of the task, guidance and steps.
    pub xi: Option<f64>,
    /// How the DPS gradient is formed.
    pub guidance: Guidance,
    /// Patch spacing (overlap S or stride); the patch edge comes from the model.
    pub spacing: GridSpacing,
    /// Shift the patch grid by a seeded offset every step (beyond the paper).
    pub shift_grid: bool,
    /// Clamp x̂_0 to `[lo, hi]` ppm (DPS clamps to the data range); `None` disables.
    pub clamp_ppm: Option<[f64; 2]>,
    /// Seed of x_T, the step noise and the grid offsets.
    pub seed: u64,
    /// Warm start (SDEdit, Meng et al. ICLR 2022): begin at this training timestep t₀ < T
    /// from the problem's initial estimate x_init ([`Problem::initial_estimate`]),
    /// x_{t₀} = √ᾱ_{t₀} x_init + √(1 − ᾱ_{t₀}) z, and re-space the `steps` steps over
    /// t₀ … 0. `None`: from pure noise at T − 1.
    #[serde(default)]
    pub start_timestep: Option<usize>,
}

impl Default for SamplerSettings {
    /// DPS defaults: 1000 ancestral steps (η = 1), exact guidance, task ξ, DM-QSM's
    /// overlap S = 8, no grid shift, no clamp, seed 0.
    fn default() -> Self {
        Self {
            steps: 1000,
            eta: 1.0,
            xi: None,
            guidance: Guidance::Exact,
            spacing: GridSpacing::default(),
            shift_grid: false,
            clamp_ppm: None,
            seed: 0,
            start_timestep: None,
        }
    }
}

/// What a round asks the model for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoundKind {
    /// ε only (`ScoreModel::eps`, proto `Denoise`).
    Eps,
    /// Jᵀv for a cotangent v (`ScoreModel::vjp`, proto `DenoiseVjp`).
    Vjp,
}

/// Identity of a round; results must quote it, so late results of an earlier round are
/// rejected rather than mixed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RoundId {
    /// Sampling step (0-based, 0 = noisiest).
    pub step: usize,
    /// Which round of the step.
    pub kind: RoundKind,
}

/// The open round: what is needed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundInfo {
    /// Round identity to quote when submitting.
    pub id: RoundId,
    /// Training timestep index t given to the model for every patch of the round.
    pub timestep: usize,
    /// Number of patches (all must be evaluated).
    pub patches: usize,
}

/// Progress of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Steps completed (0 … N).
    pub step: usize,
    /// Total steps N.
    pub total_steps: usize,
    /// The open round, `None` when finished.
    pub round: Option<RoundKind>,
    /// Patch results received in the open round.
    pub received: usize,
    /// Patches per round.
    pub patches: usize,
    /// DPS data residual ‖M_y(y − A x̂_0)‖ in ppm at the last evaluated step, if guided.
    pub residual_ppm: Option<f64>,
}

/// A finished reconstruction (one posterior sample).
#[derive(Debug, Clone, PartialEq)]
pub struct Reconstruction {
    /// χ in ppm on the output grid, zero outside the output mask.
    pub chi: Volume,
    /// Seed of this sample.
    pub seed: u64,
    /// Sampling steps taken.
    pub steps: usize,
    /// DPS data residual ‖M_y(y − A x̂_0)‖ in ppm at the last step, if guided.
    pub residual_ppm: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Eps,
    Vjp,
    Finished,
}

/// Intermediate of an exact-guidance step between its ε round and its VJP round.
#[derive(Debug, Clone)]
struct PendingStep {
    eps_hat: Array3<f32>,
    x0_hat: Array3<f32>,
    grad_x0: Array3<f32>,
    /// Shared with the VJP round's [`PatchSource`]s.
    cotangent: Arc<Array3<f32>>,
}

/// The DPS gradient ∇_{x_t} L of a step, kept in parts and evaluated per voxel.
enum Gradient {
    /// Unguided.
    None,
    /// g/√ᾱ from g = ∇_{x̂_0} L (padded).
    Approx(Array3<f32>),
    /// (g − √(1−ᾱ) Σ_p E_pᵀ J_pᵀ v_p)/√ᾱ from g and the summed Jᵀv (padded, f64).
    Exact(Array3<f32>, Array3<f64>),
}

/// Per-voxel evaluator of a [`Gradient`] (flat C-order index → value).
type GradientAt<'a> = Box<dyn Fn(usize) -> f32 + Sync + Send + 'a>;

impl Gradient {
    fn evaluator(&self, sa: f64, s1a: f64) -> Result<Option<GradientAt<'_>>> {
        let contiguous = || Error::Shape("gradient volume is not contiguous".into());
        Ok(match self {
            Gradient::None => None,
            Gradient::Approx(g) => {
                let g = g.as_slice().ok_or_else(contiguous)?;
                Some(Box::new(move |i| (g[i] as f64 / sa) as f32))
            }
            Gradient::Exact(g, jtv) => {
                let g = g.as_slice().ok_or_else(contiguous)?;
                let j = jtv.as_slice().ok_or_else(contiguous)?;
                Some(Box::new(move |i| ((g[i] as f64 - s1a * j[i]) / sa) as f32))
            }
        })
    }
}

/// The patch-based DPS sampler state machine (see the module docs).
#[derive(Debug, Clone)]
pub struct Sampler {
    problem: Arc<Problem>,
    spec: ModelSpec,
    settings: SamplerSettings,
    xi: f64,
    clamp: Option<(f32, f32)>,
    base_grid: PatchGrid,
    grid: PatchGrid,
    schedule: SamplingSchedule,
    y_model: Array3<f32>,
    /// ‖M_y y‖ in model units (the zero map's residual), for the divergence check.
    y_norm: f64,
    /// Where M_y lies in each row of the output grid, for the two-pass step of approx
    /// guidance through A = I ([`fused::MaskSpans`]); empty otherwise.
    mask_spans: fused::MaskSpans,
    step: usize,
    /// x_t, shared with the [`PatchSource`]s of the open round (read-only while it is open).
    state: Arc<Array3<f32>>,
    phase: Phase,
    /// Results of the open round (ε in an ε round, Jᵀv in a VJP round), held as the
    /// batches they arrived in.
    results: RoundResults,
    /// The residual chunk sums of the open ε round of a two-pass step ([`fused`]),
    /// summed as the round's ε̂ planes become final.
    residual_sums: fused::ResidualSums,
    pending: Option<PendingStep>,
    residual_ppm: Option<f64>,
    last_gradient: Option<Array3<f32>>,
    record_gradient: bool,
    /// The previous step's state buffer, reused for the next state so a step neither
    /// allocates nor zeroes a padded volume (not part of the state: empty after a
    /// restore, then filled by the first step).
    spare: Vec<f32>,
}

impl Sampler {
    /// Starts a run: x_T ~ N(0, I) over the padded volume from `settings.seed`, or the
    /// warm start x_{t₀} of [`SamplerSettings::start_timestep`]. Errors on invalid
    /// settings, a model spec that cannot be used, or a warm start without an initial
    /// estimate.
    pub fn new(problem: Arc<Problem>, spec: &ModelSpec, settings: SamplerSettings) -> Result<Self> {
        let mut s = Self::build(problem, spec, settings)?;
        let z = crate::diffusion::noise::initial_noise(s.settings.seed, s.base_grid.padded_shape());
        s.state = Arc::new(match s.settings.start_timestep {
            None => z,
            Some(t0) => {
                let init = s.problem.initial_estimate().ok_or_else(|| {
                    Error::Parameter(format!(
                        "a warm start at timestep {t0} needs an initial estimate of the {} problem (TaskOptions::initial_estimate)",
                        s.problem.task()
                    ))
                })?;
                let scale = s.spec.chi_scale;
                let x0 = s.base_grid.pad(init.view())?;
                // A schedule started at t₀ carries ᾱ_{t₀} in its first step.
                let a = s.schedule.step(0).map_or(1.0, |c| c.alpha_bar);
                let (sa, s1a) = (a.sqrt(), (1.0 - a).sqrt());
                Zip::from(&x0)
                    .and(&z)
                    .par_map_collect(|&x, &z| (sa * scale * x as f64 + s1a * z as f64) as f32)
            }
        });
        s.enter_step()?;
        Ok(s)
    }

    /// Resumes from a checkpoint taken by [`Sampler::checkpoint`] on the same problem and
    /// model. Errors if the problem, model or format does not match.
    pub fn restore(
        problem: Arc<Problem>,
        spec: &ModelSpec,
        checkpoint: &Checkpoint,
    ) -> Result<Self> {
        let mismatch = |m: String| Err(Error::Protocol(format!("checkpoint does not match: {m}")));
        if checkpoint.format != Checkpoint::FORMAT {
            return mismatch(format!(
                "format {} (expected {})",
                checkpoint.format,
                Checkpoint::FORMAT
            ));
        }
        if checkpoint.problem_fingerprint != problem.fingerprint() {
            return mismatch(
                "it was taken on a different problem (measurement, masks or grid)".into(),
            );
        }
        if checkpoint.model_hash != spec.content_hash
            || checkpoint.patch_size != spec.patch_size
            || checkpoint.chi_scale.to_bits() != spec.chi_scale.to_bits()
            || checkpoint.schedule != spec.schedule
        {
            return mismatch(format!(
                "it was taken with model {} (patch {}, scale {}), not {} (patch {}, scale {})",
                checkpoint.model_hash,
                checkpoint.patch_size,
                checkpoint.chi_scale,
                spec.content_hash,
                spec.patch_size,
                spec.chi_scale
            ));
        }
        let mut s = Self::build(problem, spec, checkpoint.settings.clone())?;
        let shape = s.base_grid.padded_shape();
        if checkpoint.padded_shape != shape
            || checkpoint.state.len() != shape.iter().product::<usize>()
        {
            return mismatch(format!(
                "state of shape {:?} ({} values), sampler expects {shape:?}",
                checkpoint.padded_shape,
                checkpoint.state.len()
            ));
        }
        if checkpoint.step > s.schedule.len() {
            return mismatch(format!(
                "step {} beyond the {} steps",
                checkpoint.step,
                s.schedule.len()
            ));
        }
        s.state = Arc::new(
            Array3::from_shape_vec(shape, checkpoint.state.clone())
                .map_err(|e| Error::Shape(e.to_string()))?,
        );
        s.step = checkpoint.step;
        s.residual_ppm = checkpoint.residual_ppm;
        s.enter_step()?;
        Ok(s)
    }

    fn build(problem: Arc<Problem>, spec: &ModelSpec, settings: SamplerSettings) -> Result<Self> {
        if !(spec.chi_scale.is_finite() && spec.chi_scale > 0.0) {
            return Err(Error::Model(format!(
                "model {} has chi_scale {}; it must be positive",
                spec.model_id, spec.chi_scale
            )));
        }
        let noise = NoiseSchedule::new(&spec.schedule)?;
        let schedule = match settings.start_timestep {
            None => SamplingSchedule::new(&noise, settings.steps, settings.eta)?,
            Some(t0) => SamplingSchedule::from_timestep(&noise, settings.steps, settings.eta, t0)?,
        };
        let xi = settings.xi.unwrap_or_else(|| {
            default_xi(
                problem.task(),
                settings.guidance,
                settings.steps,
                problem.tv_consistency().is_some(),
            )
        });
        if !(xi.is_finite() && xi >= 0.0) {
            return Err(Error::Parameter(format!(
                "DPS step size xi {xi} must be finite and non-negative"
            )));
        }
        let clamp = match settings.clamp_ppm {
            None => None,
            Some([lo, hi]) if lo.is_finite() && hi.is_finite() && lo < hi => {
                Some(((lo * spec.chi_scale) as f32, (hi * spec.chi_scale) as f32))
            }
            Some(r) => {
                return Err(Error::Parameter(format!(
                    "clamp range {r:?} ppm must be finite with lo < hi"
                )));
            }
        };
        let out_shape = problem.output().shape;
        let base_grid = if settings.shift_grid {
            PatchGrid::new_shifting(out_shape, spec.patch_size, settings.spacing)?
        } else {
            PatchGrid::new(out_shape, spec.patch_size, settings.spacing)?
        };
        let scale = spec.chi_scale as f32;
        let y_model = Zip::from(problem.measurement())
            .and(problem.measurement_mask())
            .map_collect(|&y, &m| if m { y * scale } else { 0.0 });
        let n = base_grid.len();
        let y_norm = sum_squares(y_model.as_slice().unwrap_or(&[])).sqrt();
        let mask_spans = match (
            settings.guidance,
            problem.operator().is_identity(),
            problem.measurement_mask().as_slice(),
        ) {
            (Guidance::Approx, true, Some(m)) => fused::MaskSpans::new(m, out_shape),
            _ => fused::MaskSpans::default(),
        };
        Ok(Self {
            grid: base_grid.clone(),
            base_grid,
            spec: spec.clone(),
            settings,
            xi,
            clamp,
            schedule,
            y_model,
            y_norm,
            mask_spans,
            step: 0,
            state: Arc::new(Array3::zeros([0, 0, 0])),
            phase: Phase::Eps,
            results: RoundResults::new(n),
            residual_sums: fused::ResidualSums::default(),
            pending: None,
            residual_ppm: None,
            last_gradient: None,
            record_gradient: false,
            spare: Vec::new(),
            problem,
        })
    }

    /// Sets up the grid and result slots of step `self.step` (or marks the run finished).
    fn enter_step(&mut self) -> Result<()> {
        self.results.clear(self.base_grid.len());
        self.residual_sums.clear();
        self.pending = None;
        if self.step >= self.schedule.len() {
            self.phase = Phase::Finished;
            return Ok(());
        }
        self.phase = Phase::Eps;
        self.grid = if self.settings.shift_grid {
            let off = self.base_grid.seeded_offset(self.settings.seed, self.step);
            self.base_grid.with_offset(off)?
        } else {
            self.base_grid.clone()
        };
        Ok(())
    }

    fn coefficients(&self) -> Result<StepCoefficients> {
        self.schedule
            .step(self.step)
            .copied()
            .ok_or_else(|| Error::Protocol("the sampler has finished; no step is open".into()))
    }

    /// The problem being solved.
    pub fn problem(&self) -> &Arc<Problem> {
        &self.problem
    }
    /// The model spec the run was started with.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }
    /// Settings of the run.
    pub fn settings(&self) -> &SamplerSettings {
        &self.settings
    }
    /// The DPS step size ξ in use.
    pub fn xi(&self) -> f64 {
        self.xi
    }
    /// The re-spaced schedule.
    pub fn schedule(&self) -> &SamplingSchedule {
        &self.schedule
    }
    /// The patch grid of the current step (offset included).
    pub fn grid(&self) -> &PatchGrid {
        &self.grid
    }
    /// x_t over the padded volume, model units (the state at the start of the open step).
    pub fn state(&self) -> &Array3<f32> {
        &self.state
    }
    /// The DPS gradient ∇_{x_t} L of the last completed step (padded, model units), if
    /// guided and recording was switched on with [`Sampler::record_gradient`].
    pub fn last_gradient(&self) -> Option<&Array3<f32>> {
        self.last_gradient.as_ref()
    }

    /// Keep a copy of each step's DPS gradient for [`Sampler::last_gradient`] (a
    /// diagnostic: one extra padded volume and pass per step; off by default).
    pub fn record_gradient(&mut self, on: bool) {
        self.record_gradient = on;
        if !on {
            self.last_gradient = None;
        }
    }
    /// Whether all steps are done.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// The open round, `None` when finished.
    pub fn round(&self) -> Option<RoundInfo> {
        let kind = match self.phase {
            Phase::Eps => RoundKind::Eps,
            Phase::Vjp => RoundKind::Vjp,
            Phase::Finished => return None,
        };
        let t = self.schedule.step(self.step)?.t;
        Some(RoundInfo {
            id: RoundId {
                step: self.step,
                kind,
            },
            timestep: t,
            patches: self.grid.len(),
        })
    }

    /// Progress of the run.
    pub fn progress(&self) -> Progress {
        Progress {
            step: self.step,
            total_steps: self.schedule.len(),
            round: self.round().map(|r| r.id.kind),
            received: self.results.received(),
            patches: self.grid.len(),
            residual_ppm: self.residual_ppm,
        }
    }

    /// Patch indices of the open round whose results are still missing, ascending.
    pub fn pending(&self) -> Vec<usize> {
        if self.phase == Phase::Finished {
            return Vec::new();
        }
        (0..self.grid.len())
            .filter(|&i| !self.results.has(i))
            .collect()
    }

    /// Whether every result of the open round has arrived.
    pub fn is_round_complete(&self) -> bool {
        self.phase != Phase::Finished && self.results.received() == self.grid.len()
    }

    /// The deterministic default batching of the pending patches: ascending indices in
    /// chunks of at most `max_batch`. Errors on `max_batch` = 0.
    pub fn plan_batches(&self, max_batch: usize) -> Result<Vec<Vec<usize>>> {
        if max_batch == 0 {
            return Err(Error::Parameter("max batch size must be at least 1".into()));
        }
        Ok(self
            .pending()
            .chunks(max_batch)
            .map(<[usize]>::to_vec)
            .collect())
    }

    /// The model input of patch `index` in the open round.
    pub fn work(&self, index: usize) -> Result<PatchWork> {
        self.patch_source()?.work(index)
    }

    /// The stacked model input for patches `indices` (any subset, any order) of the open
    /// round (see [`PatchSource::batch`]).
    pub fn batch(&self, indices: &[usize]) -> Result<PatchBatch> {
        self.patch_source()?.batch(indices)
    }

    /// A read-only view of the open round's model inputs that can cut batches on another
    /// thread while this sampler takes the round's results ([`Sampler::accept`]): it
    /// shares x_t (and the VJP round's cotangents) instead of copying them.
    pub fn patch_source(&self) -> Result<PatchSource> {
        let round = self
            .round()
            .ok_or_else(|| Error::Protocol("the sampler has finished; there is no work".into()))?;
        let cotangent = match (&self.pending, round.id.kind) {
            (Some(pending), RoundKind::Vjp) => Some(pending.cotangent.clone()),
            _ => None,
        };
        PatchSource::new(round, self.grid.clone(), self.state.clone(), cotangent)
    }

    fn check_round(&self, round: RoundId) -> Result<RoundKind> {
        match self.round() {
            Some(open) if open.id == round => Ok(round.kind),
            Some(open) => Err(Error::Protocol(format!(
                "results for step {} {:?} round, but the open round is step {} {:?}",
                round.step, round.kind, open.id.step, open.id.kind
            ))),
            None => Err(Error::Protocol(
                "results submitted after the sampler finished".into(),
            )),
        }
    }

    /// Takes the checked results of one batch of the open round: their rows are kept as
    /// they are, not copied. Returns how many patches were new: a patch already held keeps
    /// its first result (duplicates from retries are harmless). Errors on a wrong round,
    /// an index outside the grid or a patch edge other than the grid's; nothing is stored
    /// then.
    pub fn accept(&mut self, results: PatchResults) -> Result<usize> {
        self.check_round(results.round())?;
        let p = self.grid.patch_size();
        if results.patch_size() != p {
            return Err(Error::Model(format!(
                "results of patch edge {}, but the grid's patches are {p}³",
                results.patch_size()
            )));
        }
        if let Some(&bad) = results.indices().iter().find(|&&i| i >= self.grid.len()) {
            return Err(Error::Protocol(format!(
                "result for patch {bad}, but the grid has {} patches",
                self.grid.len()
            )));
        }
        let kind = results.round().kind;
        let new = self.results.insert(results);
        // ε̂ is reassembled slab by slab while the rest of the round is computed, and so
        // is the residual of a two-pass step over the slabs done.
        if new > 0 && kind == RoundKind::Eps {
            self.results.fold(&self.grid)?;
            if self.settings.guidance == Guidance::Approx && self.is_fusable() {
                self.fold_residual()?;
            }
        }
        Ok(new)
    }

    /// Hands back the result of one patch of round `round`: ε (needed in an ε round) or
    /// Jᵀv (needed in a VJP round). A convenience for tools and tests that copies the
    /// patch; batch callers use [`Sampler::accept`]. Returns `true` if stored.
    pub fn submit(
        &mut self,
        round: RoundId,
        index: usize,
        eps: Option<ArrayView3<'_, f32>>,
        vjp: Option<ArrayView3<'_, f32>>,
    ) -> Result<bool> {
        let kind = self.check_round(round)?;
        let value = match kind {
            RoundKind::Eps => {
                eps.ok_or_else(|| Error::Protocol(format!("ε round: patch {index} sent no ε")))?
            }
            RoundKind::Vjp => {
                vjp.ok_or_else(|| Error::Protocol(format!("VJP round: patch {index} sent no Jᵀv")))?
            }
        };
        let values = value.insert_axis(ndarray::Axis(0)).to_owned();
        Ok(self.accept(PatchResults::new(round, vec![index], values)?)? == 1)
    }

    /// Finishes the open round once all its results are in: an ε round of approx/none
    /// guidance (or the VJP round of exact guidance) completes the step; an ε round of
    /// exact guidance opens the VJP round. Errors (changing nothing) if results are missing.
    pub fn complete_round(&mut self) -> Result<()> {
        let round = self
            .round()
            .ok_or_else(|| Error::Protocol("the sampler has finished".into()))?;
        let missing = self.pending();
        if !missing.is_empty() {
            return Err(Error::Protocol(format!(
                "step {} {:?} round: {} of {} patch results missing (first: {})",
                round.id.step,
                round.id.kind,
                missing.len(),
                self.grid.len(),
                missing[0]
            )));
        }
        let c = self.coefficients()?;
        match round.id.kind {
            RoundKind::Eps => {
                let eps_hat = self.results.take_assembled(&self.grid)?;
                if self.is_fusable()
                    && eps_hat.is_standard_layout()
                    && eps_hat.shape() == self.state.shape()
                {
                    self.finish_fused(&c, &eps_hat)?;
                    self.results.recycle(eps_hat.into_raw_vec_and_offset().0);
                    return Ok(());
                }
                let (x0_hat, inside) = denoise(&self.state, &eps_hat, &c, self.clamp);
                match self.settings.guidance {
                    Guidance::None => self.finish_step(&c, &eps_hat, &x0_hat, Gradient::None)?,
                    Guidance::Approx => {
                        let g = self.data_gradient(&x0_hat, inside.as_ref())?;
                        self.finish_step(&c, &eps_hat, &x0_hat, Gradient::Approx(g))?
                    }
                    Guidance::Prox => {
                        let x0_hat = self.data_consistency(x0_hat)?;
                        self.finish_step(&c, &eps_hat, &x0_hat, Gradient::None)?
                    }
                    Guidance::Exact => {
                        let g = self.data_gradient(&x0_hat, inside.as_ref())?;
                        let cotangent = Arc::new(self.grid.divide_by_count(&g)?);
                        self.pending = Some(PendingStep {
                            eps_hat,
                            x0_hat,
                            grad_x0: g,
                            cotangent,
                        });
                        self.phase = Phase::Vjp;
                        self.results.clear(self.grid.len());
                        return Ok(());
                    }
                }
                // The next round reassembles into this step's ε̂ buffer.
                self.results.recycle(eps_hat.into_raw_vec_and_offset().0);
                Ok(())
            }
            RoundKind::Vjp => {
                let pending = self
                    .pending
                    .take()
                    .ok_or_else(|| Error::Protocol("VJP round without its ε round".into()))?;
                let jtv = self.grid.accumulate(&self.results.views()?)?;
                self.finish_step(
                    &c,
                    &pending.eps_hat,
                    &pending.x0_hat,
                    Gradient::Exact(pending.grad_x0, jtv),
                )
            }
        }
    }

    /// Whether this step can take the two-pass path of [`fused`]: unguided, or approx
    /// guidance through A = I, with no gradient to record and contiguous volumes.
    fn is_fusable(&self) -> bool {
        let volumes = self.state.is_standard_layout();
        let data = self.problem.operator().is_identity()
            && self.y_model.is_standard_layout()
            && self.problem.measurement_mask().is_standard_layout()
            && self.y_model.shape() == self.grid.volume_shape()
            && self.problem.measurement_mask().shape() == self.grid.volume_shape();
        let guidance = match self.settings.guidance {
            Guidance::None => true,
            Guidance::Approx => data,
            Guidance::Exact | Guidance::Prox => false,
        };
        volumes && guidance && !self.record_gradient
    }

    /// The step of [`Sampler::finish_step`] with approx guidance through A = I (or none)
    /// in two passes, bitwise equal to the general path (see [`fused`]); records the
    /// residual and advances to the next step.
    fn finish_fused(&mut self, c: &StepCoefficients, eps_hat: &Array3<f32>) -> Result<()> {
        let contiguous = || Error::Shape("sampler volumes are not contiguous".into());
        let mut sums = std::mem::take(&mut self.residual_sums);
        let mut next = std::mem::take(&mut self.spare);
        let step = self.fused_step(c, eps_hat.as_slice().ok_or_else(contiguous)?)?;
        let isa = crate::simd::VectorIsa::detect();
        let norm = step.residual_norm_with(isa, &mut sums);
        if let Some(norm) = norm {
            if !norm.is_finite() {
                return Err(self.diverged(f64::NAN));
            }
            self.check_residual(norm)?;
        }
        // Every element is written; the resize only acts on the first step.
        next.resize(step.state.len(), 0.0);
        step.write_next(isa, norm, &mut next).map_err(|e| match e {
            Error::NonFinite(_) => self.state_diverged(),
            e => e,
        })?;
        if let Some(norm) = norm {
            self.residual_ppm = Some(norm / self.spec.chi_scale);
        }
        self.advance(next)
    }

    /// The two-pass step ([`fused`]) of the open step over ε̂ `eps_hat` (the padded
    /// volume, C order).
    fn fused_step<'a>(
        &'a self,
        c: &StepCoefficients,
        eps_hat: &'a [f32],
    ) -> Result<fused::FusedStep<'a>> {
        let contiguous = || Error::Shape("sampler volumes are not contiguous".into());
        let data = match self.settings.guidance == Guidance::Approx {
            false => None,
            true => {
                let [rx, ry, _] = self.grid.volume_region();
                if self.mask_spans.rows() != rx.len() * ry.len() {
                    return Err(Error::Shape(format!(
                        "mask spans of {} rows for an output grid of {} rows",
                        self.mask_spans.rows(),
                        rx.len() * ry.len()
                    )));
                }
                Some((
                    self.y_model.as_slice().ok_or_else(contiguous)?,
                    self.problem
                        .measurement_mask()
                        .as_slice()
                        .ok_or_else(contiguous)?,
                    &self.mask_spans,
                ))
            }
        };
        Ok(fused::FusedStep {
            state: self.state.as_slice().ok_or_else(contiguous)?,
            eps_hat,
            padded: self.grid.padded_shape(),
            region: self.grid.volume_region(),
            data,
            coefficients: *c,
            clamp: self.clamp,
            noise: (c.sigma > 0.0)
                .then(|| NoiseStream::new(self.settings.seed, step_stream(self.step))),
            xi: self.xi,
        })
    }

    /// Sums the residual chunks of the two-pass step over the ε̂ planes reassembled so far
    /// (see [`fused::FusedStep::fold_residual`]).
    fn fold_residual(&mut self) -> Result<()> {
        let c = self.coefficients()?;
        let mut sums = std::mem::take(&mut self.residual_sums);
        let (eps_hat, done) = self.results.partial_assembly();
        // Before the first reassembled plane there is nothing to sum.
        if eps_hat.len() == self.state.len() && done.len() == self.grid.padded_shape()[0] {
            self.fused_step(&c, eps_hat)?.fold_residual(
                crate::simd::VectorIsa::detect(),
                done,
                &mut sums,
            );
        }
        self.residual_sums = sums;
        Ok(())
    }

    /// g = ∇_{x̂_0} ‖M_y(y − A crop(x̂_0))‖ over the padded volume (zero in padding and
    /// where x̂_0 was clamped); records the residual.
    fn data_gradient(
        &mut self,
        x0_hat: &Array3<f32>,
        inside: Option<&Array3<bool>>,
    ) -> Result<Array3<f32>> {
        let x0 = self.grid.crop(x0_hat.view())?;
        let (g, norm) =
            dps_gradient(self.problem.as_ref(), &self.y_model, &x0).map_err(|e| match e {
                Error::NonFinite(_) => self.diverged(f64::NAN),
                e => e,
            })?;
        self.check_residual(norm)?;
        self.residual_ppm = Some(norm / self.spec.chi_scale);
        let mut g = self.grid.pad(g.view())?;
        if let Some(inside) = inside {
            Zip::from(&mut g).and(inside).par_for_each(|g, &m| {
                if !m {
                    *g = 0.0;
                }
            });
        }
        Ok(g)
    }

    /// Errors with [`Error::Diverged`] if the residual is not finite, or above
    /// [`DIVERGENCE_FACTOR`] × ‖M_y y‖ at a step with ᾱ_t ≥ [`DIVERGENCE_MIN_ALPHA_BAR`].
    fn check_residual(&self, norm: f64) -> Result<()> {
        let judged = self
            .schedule
            .step(self.step)
            .is_some_and(|c| c.alpha_bar >= DIVERGENCE_MIN_ALPHA_BAR);
        let too_large = judged && self.y_norm > 0.0 && norm > DIVERGENCE_FACTOR * self.y_norm;
        if norm.is_finite() && !too_large {
            Ok(())
        } else {
            Err(self.diverged(norm))
        }
    }

    fn diverged(&self, norm: f64) -> Error {
        let scale = self.spec.chi_scale;
        let hint = match self.settings.guidance {
            Guidance::Prox => "lower --xi (the prox data weight)",
            _ => "lower --xi, or use --guidance prox, whose step is bounded",
        };
        Error::Diverged(format!(
            "at step {} of {} the data residual ‖y − A x̂₀‖ is {:.3e} ppm against {:.3e} ppm for a zero map ({}× allowed) with {} guidance and ξ = {}: {hint}",
            self.step + 1,
            self.schedule.len(),
            norm / scale,
            self.y_norm / scale,
            DIVERGENCE_FACTOR,
            match self.settings.guidance {
                Guidance::Exact => "exact",
                Guidance::Approx => "approx",
                Guidance::Prox => "prox",
                Guidance::None => "no",
            },
            self.xi
        ))
    }

    /// x̃_0: the proximal data-consistency solution on the output grid with weight ξ,
    /// put back into the padded x̂_0 (padding unchanged); records the residual.
    fn data_consistency(&mut self, x0_hat: Array3<f32>) -> Result<Array3<f32>> {
        use crate::diffusion::consistency::{
            DataTerm, PROX_CG_ITERATIONS, proximal_consistency, tv_proximal_consistency,
        };
        let x0 = self.grid.crop(x0_hat.view())?;
        let p = self.problem.as_ref();
        let data = DataTerm {
            operator: p.operator(),
            y: &self.y_model,
            mask: p.measurement_mask(),
            source: Some(p.output_mask()),
        };
        let (x, norm) = match p.tv_consistency() {
            Some(tv) if self.xi > 0.0 => {
                let (x, norm, report) =
                    tv_proximal_consistency(tv, &data, &x0, self.xi, self.spec.chi_scale)?;
                tracing::debug!(step = self.step, ?report, "TV data consistency");
                (x, norm)
            }
            _ => proximal_consistency(&data, &x0, self.xi, PROX_CG_ITERATIONS)?,
        };
        self.check_residual(norm)?;
        self.residual_ppm = Some(norm / self.spec.chi_scale);
        let mut out = x0_hat;
        let [rx, ry, rz] = self.grid.volume_region();
        out.slice_mut(ndarray::s![rx, ry, rz]).assign(&x);
        Ok(out)
    }

    /// DDIM/DDPM update plus DPS correction, fused into one pass over the padded volume
    /// (noise drawn in place); advances to the next step. Per voxel, in f64:
    /// x' = ((√ᾱ_prev x̂_0 + c_ε ε̂) + σ z) − ξ ∇, the expression of [`ddim_update`]
    /// followed by the DPS correction.
    fn finish_step(
        &mut self,
        c: &StepCoefficients,
        eps_hat: &Array3<f32>,
        x0_hat: &Array3<f32>,
        grad: Gradient,
    ) -> Result<()> {
        const CHUNK: usize = 1 << 14;
        let (a, b, s) = (c.alpha_bar_prev.sqrt(), c.eps_coefficient(), c.sigma);
        let (sa, s1a) = (c.sqrt_alpha_bar(), c.sqrt_one_minus_alpha_bar());
        let noise = (s > 0.0).then(|| NoiseStream::new(self.settings.seed, step_stream(self.step)));
        let xi = self.xi;
        let contiguous = || Error::Shape("sampler volumes are not contiguous".into());
        let x0s = x0_hat.as_slice().ok_or_else(contiguous)?;
        let epss = eps_hat.as_slice().ok_or_else(contiguous)?;
        let grad_at = grad.evaluator(sa, s1a)?;
        let n = x0s.len();
        let mut next = std::mem::take(&mut self.spare);
        // Every element is written below; the resize only acts on the first step (the
        // spare then has the state's length already).
        next.resize(n, 0.0);
        next.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(ci, out)| {
                let base = ci * CHUNK;
                for (k, o) in out.iter_mut().enumerate() {
                    let i = base + k;
                    let mut acc = a * x0s[i] as f64 + b * epss[i] as f64;
                    if let Some(z) = &noise {
                        acc += s * z.at(i as u64) as f64;
                    }
                    if let Some(g) = &grad_at {
                        acc -= xi * g(i) as f64;
                    }
                    *o = acc as f32;
                }
            });
        self.last_gradient = match (&grad_at, self.record_gradient) {
            (Some(g), true) => Some(
                Array3::from_shape_vec(
                    self.state.raw_dim(),
                    (0..n).into_par_iter().map(g).collect(),
                )
                .map_err(|e| Error::Shape(e.to_string()))?,
            ),
            _ => None,
        };
        // The run's own blow-up (a huge ξ, say) is caught here, before a non-finite state
        // reaches the workers, whose answers would then look like their fault.
        if !next.par_chunks(1 << 16).all(crate::volume::all_finite) {
            return Err(self.state_diverged());
        }
        self.advance(next)
    }

    /// Makes `next` (the padded length) the state, keeps the previous state's buffer as
    /// the spare, and enters the next step.
    fn advance(&mut self, next: Vec<f32>) -> Result<()> {
        let next = Array3::from_shape_vec(self.state.raw_dim(), next)
            .map_err(|e| Error::Shape(e.to_string()))?;
        let previous = std::mem::replace(&mut self.state, Arc::new(next));
        // A patch source of the finished round still held elsewhere keeps its copy; the
        // next step then allocates its buffer.
        self.spare = Arc::try_unwrap(previous)
            .map(|a| a.into_raw_vec_and_offset().0)
            .unwrap_or_default();
        self.step += 1;
        self.enter_step()
    }

    /// The error of a state that became non-finite.
    fn state_diverged(&self) -> Error {
        Error::Diverged(format!(
            "at step {} of {} the state x_t became non-finite with ξ = {}: {}",
            self.step + 1,
            self.schedule.len(),
            self.xi,
            match self.settings.guidance {
                Guidance::Prox => "lower --xi (the prox data weight)",
                _ => "lower --xi, or use --guidance prox, whose step is bounded",
            }
        ))
    }

    /// The state at the start of the open step (or the final state), serializable.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            format: Checkpoint::FORMAT,
            settings: self.settings.clone(),
            model_hash: self.spec.content_hash.clone(),
            patch_size: self.spec.patch_size,
            chi_scale: self.spec.chi_scale,
            schedule: self.spec.schedule.clone(),
            problem_fingerprint: self.problem.fingerprint(),
            padded_shape: self.base_grid.padded_shape(),
            step: self.step,
            residual_ppm: self.residual_ppm,
            state: self.state.iter().copied().collect(),
        }
    }

    /// The current state as χ in ppm on the output grid, masked (the final
    /// reconstruction once finished; a noisy preview before).
    pub fn chi_ppm(&self) -> Result<Volume> {
        let x = self.base_grid.crop(self.state.view())?;
        let inv = 1.0 / self.spec.chi_scale;
        let chi = Zip::from(&x)
            .and(self.problem.output_mask())
            .map_collect(|&v, &m| if m { (v as f64 * inv) as f32 } else { 0.0 });
        let out = self.problem.output();
        Ok(Volume::with_affine(chi, out.voxel_size, out.affine))
    }

    /// The reconstruction; errors unless finished.
    pub fn result(&self) -> Result<Reconstruction> {
        if !self.is_finished() {
            return Err(Error::Protocol(format!(
                "reconstruction requested at step {} of {}",
                self.step,
                self.schedule.len()
            )));
        }
        Ok(Reconstruction {
            chi: self.chi_ppm()?,
            seed: self.settings.seed,
            steps: self.schedule.len(),
            residual_ppm: self.residual_ppm,
        })
    }
}

#[cfg(test)]
mod tests;
