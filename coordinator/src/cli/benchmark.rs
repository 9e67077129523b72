//! `dmqsm benchmark quality`: DM-QSM against the non-learning baselines on held-out
//! synthetic phantoms (issue 6).
//!
//! For every phantom (seeds ≥ 1000; the bundled model trains on seeds < 1000) at 1 mm
//! with its brain mask, the local field is simulated with B0 along the voxel z axis
//! (`dmqsm_common::simulate::forward_field`, padded to 2N) and masked. The cases:
//!
//! - `dipinv`: noise-free field; DM-QSM `dipinv` (SR at ×1 of TKD δ = 0.1) against TKD
//!   (δ = 0.1) and closed-form L2 (λ = 0.1);
//! - `dipinv-snr100`: the same with Gaussian noise at SNR 100 (σ = RMS of the field in
//!   the mask / 100, [`dmqsm_common::simulate::add_noise`]);
//! - `sr`: ×2 super-resolution of a k-space-cropped χ map (2 mm); baselines k-space
//!   zero-fill ([`KSpaceDownsample::upsample`]) and trilinear upsampling
//!   ([`trilinear_upsample`]);
//! - `sr-dipinv`: the 2 mm field (k-space crop of the 1 mm field) to 1 mm χ; baselines
//!   TKD or L2 at 2 mm followed by zero-fill or trilinear upsampling;
//! - `dipinv-physics`: DPS with A = mask ∘ dipole convolution, against TKD, L2 and TV;
//! - `dipinv-physics-snr100`: the same on the SNR 100 field;
//! - `dipinv-physics-fine`: the same without the inverse crime: the field is simulated on
//!   a grid 2× finer per axis (χ replicated, the 0.5 mm dipole kernel) and block-averaged
//!   to 1 mm ([`field_from_finer_grid`]).
//!
//! The dipole cases' TV baseline (`dmqsm_common::inversion::tv`, brain-mask weight) runs
//! at 10 values of α from 1e-5 to 1e-2: the row "TV (α tuned on truth)" is the one with
//! the lowest NRMSE, TV's best case and out of a user's reach; "TV (L-curve α)" is the
//! L-curve corner, which needs no truth. DM-QSM's warm starts (`--start-timesteps`) begin
//! from the L-curve TV (or `--warm-start-alpha`), never from the truth-tuned one;
//! `--samples K` scores the mean of K posterior samples and the calibration of their std.
//!
//! DM-QSM runs in process (`dmqsm_common::driver::sample`) with the given TorchScript or
//! native U-Net model, in the selected guidance modes (DPS approx and exact, and the DDS
//! proximal `prox`) and step counts, at the default ξ of each (task, mode, steps)
//! (`dmqsm_common::diffusion::sampler::default_xi`). Exact guidance is skipped above
//! `--exact-max-steps`. Every
//! reconstruction is masked with the truth's brain mask and scored with
//! `dmqsm_common::metrics` (NRMSE, detrended NRMSE, HFEN, XSIM, CC; QSM Challenge 2.0
//! definitions, REFERENCE.md §6). Outputs in `--out`: `results.md` (tables),
//! `results.json` (every run), `triptych-<seed>-<case>.png` (truth, best baseline,
//! DM-QSM, both errors) and `seams.png`.
//!
//! Overlap ablation (DM-QSM's): the first case with overlap 0 and 8. The seam number is
//! the mean squared forward difference across patch-boundary planes divided by the mean
//! across all other planes, inside the mask ([`seam_ratio`]); 1 means the boundaries are
//! invisible, the truth gives the reference value.
//!
//! ξ sweep: every case at the smallest step count in each one-round guidance mode
//! (approx, prox), with ξ = factor × that default, best ξ by NRMSE reported per case and
//! mode. The triptych shows the best DM-QSM run (main or sweep) by NRMSE next to the best
//! baseline.
//!
//! Demo rows: `dmqsm demo`'s phantom and settings, computed in process, so the demo's
//! printed metrics can be checked against the table.

use super::GuidanceArg;
use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use dmqsm_common::diffusion::analytic::GaussianPriorModel;
use dmqsm_common::diffusion::model::ScoreModel;
use dmqsm_common::diffusion::sampler::{SamplerSettings, default_xi};
use dmqsm_common::diffusion::schedule::ScheduleConfig;
use dmqsm_common::driver;
use dmqsm_common::geometry::B0Direction;
use dmqsm_common::inversion::l2::l2;
use dmqsm_common::inversion::tkd::tkd;
use dmqsm_common::inversion::tv::{LCurvePoint, TvParams, tv, tv_lcurve_default};
use dmqsm_common::metrics::calibration::{Calibration, calibration};
use dmqsm_common::metrics::{self, Metrics};
use dmqsm_common::operators::{BlockDownsample, KSpaceDownsample, LinearOperator};
use dmqsm_common::patch::{GridSpacing, PatchGrid};
use dmqsm_common::phantom::{self, PhantomConfig};
use dmqsm_common::preview::{Panel, RowOptions, View, Window, panel_row_png};
use dmqsm_common::simulate::{add_noise, forward_field};
use dmqsm_common::tasks::{self, InitialEstimate, Task, TaskOptions};
use dmqsm_common::volume::Volume;
use dmqsm_worker::{DeviceSpec, EvalOptions, TorchModel};
use ndarray::{Array3, Zip};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
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
/// Half-width (ppm) of the error-map display window.
const ERROR_WINDOW_PPM: f32 = 0.05;

/// `dmqsm benchmark …` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchmarkCommand {
    /// DM-QSM vs TKD / L2 / zero-fill / trilinear on held-out phantoms: metrics table,
    /// triptychs, overlap ablation with a seam number, ξ sweep.
    Quality(Box<QualityArgs>),
}

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

/// Arguments of `dmqsm benchmark quality`.
#[derive(Debug, Args)]
pub struct QualityArgs {
    /// Score model: TorchScript (`.pt`, card beside it) or native U-Net `.safetensors`.
    #[arg(long, required_unless_present = "analytic_prior")]
    pub model: Option<PathBuf>,
    /// Use the exact score of an i.i.d. Gaussian prior N(0, σ²) instead of a trained
    /// model (σ in ppm; tests and plumbing checks only).
    #[arg(long, value_name = "SIGMA_PPM", conflicts_with = "model")]
    pub analytic_prior: Option<f64>,
    /// Patch edge of the analytic prior model.
    #[arg(long, default_value_t = 16)]
    pub analytic_patch: usize,
    /// Output directory.
    #[arg(long, default_value = "benchmark-quality")]
    pub out: PathBuf,
    /// Small, fast settings (64×64×48 phantom, 10 steps, ξ sweep ×{0.25, 4}, no demo
    /// rows); explicit options still override.
    #[arg(long)]
    pub quick: bool,
    /// Number of phantoms (seeds --phantom-seed, +1, …).
    #[arg(long, default_value_t = 1)]
    pub phantoms: usize,
    /// Seed of the first phantom (must be ≥ 1000: seeds below are training data).
    #[arg(long, default_value_t = FIRST_HELD_OUT_SEED)]
    pub phantom_seed: u64,
    /// Allow phantom seeds below 1000 (they were used to train the bundled model).
    #[arg(long)]
    pub allow_training_seeds: bool,
    /// Phantom matrix at 1 mm, anatomy at true size (a smaller matrix shows the brain's
    /// centre); even on every axis for ×2 SR [default: 160,192,160; --quick 64,64,48].
    #[arg(long, value_delimiter = ',')]
    pub shape: Option<Vec<usize>>,
    /// Cases to run [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub cases: Vec<Case>,
    /// DM-QSM step counts [default: 50,200; --quick 10].
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<usize>,
    /// Guidance modes [default: approx,prox,exact].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub guidance: Vec<GuidanceArg>,
    /// ξ sweep factors (× the default ξ of the task, mode and steps); `none` disables
    /// [default: 0.05,0.25,4; --quick 0.25,4]. At 50 steps, DPS factor 0.05 is the
    /// paper's unscaled ξ.
    #[arg(long, value_delimiter = ',')]
    pub xi_sweep: Vec<String>,
    /// Skip the overlap 0 vs 8 ablation.
    #[arg(long)]
    pub no_ablation: bool,
    /// Skip exact guidance above this many steps (two model rounds per step, each with a
    /// backward pass: about 3× the cost of approx); 0 runs every step count
    /// [default: 50].
    #[arg(long, default_value_t = 50)]
    pub exact_max_steps: usize,
    /// Skip the demo rows (`dmqsm demo`'s phantom and settings, scored in process; on by
    /// default except with --quick).
    #[arg(long)]
    pub no_demo: bool,
    /// Patch overlap S (voxels) of the main runs (DM-QSM: 8).
    #[arg(long, default_value_t = 8)]
    pub overlap: usize,
    /// DDIM η (1: ancestral, DPS; 0: deterministic DDIM).
    #[arg(long, default_value_t = 1.0)]
    pub eta: f64,
    /// Clamp the one-step estimate x̂_0 to [LO, HI] ppm at every step (DPS clamps to the
    /// data range); `none` disables.
    #[arg(long, default_value = "-1,1", value_name = "LO,HI|none")]
    pub clamp_ppm: String,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Warm starts: start each DM-QSM run at these training timesteps t₀ from the
    /// classical estimate (SDEdit; TV with the L-curve α for the dipole cases, TKD for
    /// `dipinv`'s own input… see [`dmqsm_common::tasks::InitialEstimate`]); `none` runs
    /// from pure noise. Several values give a row each [default: none].
    #[arg(long, value_delimiter = ',')]
    pub start_timesteps: Vec<String>,
    /// ξ of the main runs (the DPS step or prox data weight; the sweep's factors multiply
    /// it); default: the sampler's default for the task, guidance and steps.
    #[arg(long)]
    pub xi: Option<f64>,
    /// TV weight α of the warm-start estimate of the dipole cases; default: the L-curve
    /// corner (the TV (L-curve α) baseline itself).
    #[arg(long)]
    pub warm_start_alpha: Option<f64>,
    /// Posterior samples per DM-QSM run: the row scores their mean (MMSE), and with 2 or
    /// more the calibration table scores the std map.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Patches per model call.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Resolved settings of a quality benchmark (after `--quick` and the defaults).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QualitySettings {
    /// Phantom seeds.
    pub phantom_seeds: Vec<u64>,
    /// Phantom matrix (1 mm voxels).
    pub shape: [usize; 3],
    /// Cases.
    pub cases: Vec<Case>,
    /// Step counts.
    pub steps: Vec<usize>,
    /// Guidance modes (serialized by name).
    pub guidance: Vec<GuidanceArg>,
    /// ξ sweep factors (× task default).
    pub xi_factors: Vec<f64>,
    /// Whether to run the overlap ablation.
    pub ablation: bool,
    /// Exact guidance runs only up to this many steps (`None`: all).
    pub exact_max_steps: Option<usize>,
    /// Whether to score the demo's configuration.
    pub demo: bool,
    /// Main-run overlap (voxels).
    pub overlap: usize,
    /// DDIM η.
    pub eta: f64,
    /// x̂_0 clamp (ppm).
    pub clamp_ppm: Option<[f64; 2]>,
    /// Sampler seed.
    pub seed: u64,
    /// Warm-start timesteps (`None`: from pure noise).
    pub starts: Vec<Option<usize>>,
    /// Posterior samples per DM-QSM run.
    pub samples: usize,
    /// TV α of the warm start (`None`: the L-curve corner).
    pub warm_start_alpha: Option<f64>,
    /// ξ of the main runs (`None`: the sampler's default).
    pub xi: Option<f64>,
}

/// One scored reconstruction.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Phantom seed.
    pub phantom: u64,
    /// Case name.
    pub case: &'static str,
    /// Method, e.g. `TKD`, `L2`, `zero-fill`, `DM-QSM`.
    pub method: String,
    /// DM-QSM steps (`None` for baselines).
    pub steps: Option<usize>,
    /// DM-QSM guidance mode.
    pub guidance: Option<&'static str>,
    /// DPS step size ξ.
    pub xi: Option<f64>,
    /// Patch overlap (voxels).
    pub overlap: Option<usize>,
    /// Which part of the benchmark: `main`, `xi-sweep` or `ablation`.
    pub part: &'static str,
    /// Metrics against the truth in the brain mask.
    pub metrics: Metrics,
    /// Wall time of the reconstruction (s).
    pub seconds: f64,
    /// Seam ratio on the overlap-0 grid's boundary planes (ablation rows and truth).
    pub seam_ratio: Option<f64>,
    /// Warm-start timestep t₀ of a DM-QSM run (`None`: from noise).
    pub start: Option<usize>,
    /// Posterior samples averaged (DM-QSM).
    pub samples: Option<usize>,
    /// TV weight α of a TV baseline.
    pub alpha: Option<f64>,
    /// Calibration of the posterior std map (DM-QSM with 2 or more samples).
    pub calibration: Option<Calibration>,
}

/// The `benchmark` entry point.
pub fn run(command: BenchmarkCommand) -> anyhow::Result<()> {
    match command {
        BenchmarkCommand::Quality(a) => quality(*a),
    }
}

fn parse_factors(raw: &[String], default: &[f64]) -> anyhow::Result<Vec<f64>> {
    if raw.is_empty() {
        return Ok(default.to_vec());
    }
    if raw.len() == 1 && raw[0].eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    raw.iter()
        .map(|s| {
            let v: f64 = s
                .trim()
                .parse()
                .with_context(|| format!("--xi-sweep: {s:?} is not a number"))?;
            if !(v.is_finite() && v > 0.0) {
                bail!("--xi-sweep: factor {v} must be finite and positive");
            }
            Ok(v)
        })
        .collect()
}

/// Resolves `args` into settings, validating them (clear errors, no panics).
pub fn resolve(args: &QualityArgs) -> anyhow::Result<QualitySettings> {
    if args.phantoms == 0 {
        bail!("--phantoms must be at least 1");
    }
    if args.phantom_seed < FIRST_HELD_OUT_SEED && !args.allow_training_seeds {
        bail!(
            "--phantom-seed {} is a training seed (< {FIRST_HELD_OUT_SEED}); evaluate on held-out seeds or pass --allow-training-seeds",
            args.phantom_seed
        );
    }
    let shape: [usize; 3] = match &args.shape {
        Some(s) if s.len() == 3 => [s[0], s[1], s[2]],
        Some(s) => bail!("--shape needs 3 values, got {s:?}"),
        None if args.quick => [64, 64, 48],
        None => [160, 192, 160],
    };
    if shape.iter().any(|&n| n < 8 || n % 2 != 0) {
        bail!("--shape {shape:?}: every axis must be even (×2 SR) and at least 8");
    }
    let cases = if args.cases.is_empty() {
        Case::ALL.to_vec()
    } else {
        dedup(&args.cases)
    };
    let steps = if args.steps.is_empty() {
        if args.quick { vec![10] } else { vec![50, 200] }
    } else {
        dedup(&args.steps)
    };
    if steps.iter().any(|&s| s == 0 || s > 1000) {
        bail!("--steps {steps:?}: each must be between 1 and 1000");
    }
    let guidance = if args.guidance.is_empty() {
        vec![GuidanceArg::Approx, GuidanceArg::Prox, GuidanceArg::Exact]
    } else {
        dedup(&args.guidance)
    };
    let xi_factors = parse_factors(
        &args.xi_sweep,
        if args.quick {
            &[0.25, 4.0]
        } else {
            &[0.05, 0.25, 4.0]
        },
    )?;
    if !(args.eta.is_finite() && (0.0..=1.0).contains(&args.eta)) {
        bail!("--eta {} must be in [0, 1]", args.eta);
    }
    let clamp_ppm = if args.clamp_ppm.trim().eq_ignore_ascii_case("none") {
        None
    } else {
        let v: Vec<f64> = args
            .clamp_ppm
            .split(',')
            .map(|x| x.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("--clamp-ppm {:?}: expected LO,HI or none", args.clamp_ppm))?;
        match v[..] {
            [lo, hi] if lo.is_finite() && hi.is_finite() && lo < hi => Some([lo, hi]),
            _ => bail!(
                "--clamp-ppm {:?}: expected LO,HI with LO < HI, or none",
                args.clamp_ppm
            ),
        }
    };
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if args.samples == 0 || args.samples > 64 {
        bail!("--samples {} must be between 1 and 64", args.samples);
    }
    let starts: Vec<Option<usize>> = if args.start_timesteps.is_empty() {
        vec![None]
    } else {
        args.start_timesteps
            .iter()
            .map(|v| {
                let v = v.trim();
                if v.eq_ignore_ascii_case("none") {
                    return Ok(None);
                }
                let t: usize = v.parse().with_context(|| {
                    format!("--start-timesteps: {v:?} is not a timestep or none")
                })?;
                if t == 0 || t >= 1000 {
                    bail!("--start-timesteps: {t} must be between 1 and 999");
                }
                Ok(Some(t))
            })
            .collect::<anyhow::Result<_>>()?
    };
    if let Some(t) = starts
        .iter()
        .flatten()
        .find(|&&t| steps.iter().all(|&n| n > t + 1))
    {
        bail!(
            "--start-timesteps {t}: a warm start at t₀ allows at most t₀ + 1 steps, and every --steps value {steps:?} is larger"
        );
    }
    Ok(QualitySettings {
        phantom_seeds: (0..args.phantoms as u64)
            .map(|i| args.phantom_seed + i)
            .collect(),
        shape,
        cases,
        steps,
        guidance,
        xi_factors,
        ablation: !args.no_ablation,
        exact_max_steps: (args.exact_max_steps > 0).then_some(args.exact_max_steps),
        demo: !args.quick && !args.no_demo,
        overlap: args.overlap,
        eta: args.eta,
        clamp_ppm,
        seed: args.seed,
        starts: dedup(&starts),
        samples: args.samples,
        xi: match args.xi {
            Some(x) if !(x.is_finite() && x > 0.0) => bail!("--xi {x} must be finite and positive"),
            x => x,
        },
        warm_start_alpha: match args.warm_start_alpha {
            Some(a) if !(a.is_finite() && a > 0.0) => {
                bail!("--warm-start-alpha {a} must be finite and positive")
            }
            a => a,
        },
    })
}

impl QualitySettings {
    /// Whether the main table runs guidance `g` at `steps` (exact is capped).
    fn runs(&self, g: GuidanceArg, steps: usize) -> bool {
        g != GuidanceArg::Exact || self.exact_max_steps.is_none_or(|m| steps <= m)
    }

    /// The warm starts that `steps` steps can use (a start at t₀ allows ≤ t₀ + 1 steps).
    fn starts_for(&self, steps: usize) -> impl Iterator<Item = Option<usize>> + '_ {
        self.starts
            .iter()
            .copied()
            .filter(move |s| s.is_none_or(|t| steps <= t + 1))
    }
}

/// The demo's configuration (`dmqsm demo` with its defaults: phantom, field, task
/// `dipinv-physics`, prox guidance, steps, η, no clamp, overlap 8, sampler seed 0),
/// computed in process. `dmqsm demo` runs the same through the coordinator and its
/// workers; determinism makes its printed metrics equal to these rows.
fn demo_rows(bench: &mut Bench<'_>) -> anyhow::Result<Vec<Row>> {
    use crate::cli::physics::demo::{
        DEMO_BASELINES, DEMO_ETA, DEMO_SEED, DEMO_SHAPE, DEMO_START_TIMESTEP, DEMO_STEPS,
        demo_baseline, demo_subject,
    };
    let (p, field) = demo_subject(DEMO_SHAPE, [1.0; 3], DEMO_SEED, None)?;
    let case = "demo: dipinv-physics";
    let row = |method: &str, steps, guidance, xi, m: Metrics, seconds: f64| Row {
        phantom: DEMO_SEED,
        case,
        method: method.into(),
        steps,
        guidance,
        xi,
        overlap: steps.map(|_| 8),
        part: "demo",
        metrics: m,
        seconds,
        seam_ratio: None,
        start: None,
        samples: None,
        alpha: None,
        calibration: None,
    };
    let mut rows = Vec::new();
    for name in DEMO_BASELINES {
        let t = Instant::now();
        let chi = demo_baseline(name, &field, &p.mask)?;
        let secs = t.elapsed().as_secs_f64();
        let m = metrics::evaluate(&chi, &p.chi, &p.mask)?;
        rows.push(row(name, None, None, None, m, secs));
    }
    let problem = Arc::new(
        tasks::prepare(
            &TaskOptions {
                initial_estimate: InitialEstimate::Tv { alpha: None },
                ..TaskOptions::new(Task::DipinvPhysics)
            },
            &field,
            Some(&p.mask),
        )
        .context("preparing the demo problem")?,
    );
    let guidance = GuidanceArg::Prox;
    let settings = SamplerSettings {
        steps: DEMO_STEPS as usize,
        eta: DEMO_ETA,
        xi: None,
        guidance: guidance.guidance(),
        spacing: GridSpacing::Overlap(8),
        shift_grid: false,
        clamp_ppm: None,
        seed: 0,
        start_timestep: Some(DEMO_START_TIMESTEP as usize),
    };
    let xi = default_xi(Task::DipinvPhysics, settings.guidance, settings.steps);
    bench.runs_done += 1;
    let t = Instant::now();
    let rec = driver::sample(bench.model, problem, &settings, bench.max_batch)
        .context("DM-QSM on the demo phantom")?;
    let secs = t.elapsed().as_secs_f64();
    let m = metrics::evaluate(&rec.chi, &p.chi, &p.mask)?;
    eprintln!(
        "[{}/{}] demo phantom {DEMO_SEED} dipinv-physics DM-QSM {DEMO_STEPS} steps prox ξ {xi}: NRMSE {:.1} HFEN {:.1} ({secs:.1} s)",
        bench.runs_done, bench.runs_total, m.nrmse, m.hfen
    );
    rows.push(Row {
        start: settings.start_timestep,
        ..row(
            "DM-QSM",
            Some(settings.steps),
            Some(guidance.name()),
            Some(xi),
            m,
            secs,
        )
    });
    Ok(rows)
}

fn dedup<T: PartialEq + Copy>(v: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for &x in v {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

fn load_model(args: &QualityArgs) -> anyhow::Result<Box<dyn ScoreModel>> {
    if let Some(sigma) = args.analytic_prior {
        let scale = ScheduleConfig::default();
        let chi_scale = 5.0;
        let m = GaussianPriorModel::new(
            0.0,
            sigma * chi_scale,
            args.analytic_patch,
            chi_scale,
            scale,
        )
        .context("analytic prior model")?;
        return Ok(Box::new(m));
    }
    let Some(path) = &args.model else {
        bail!("give --model PATH (TorchScript .pt or .safetensors) or --analytic-prior SIGMA");
    };
    dmqsm_worker::device::configure_threads(args.threads);
    let options = EvalOptions {
        threads: args.threads,
        ..EvalOptions::for_device(DeviceSpec::Cpu)
    };
    let m = TorchModel::load(path, DeviceSpec::Cpu, options)
        .with_context(|| format!("loading model {}", path.display()))?;
    Ok(Box::new(m))
}

/// Trilinear upsampling by integer `factors` with block-centred sample positions: output
/// voxel i sits at input coordinate (i + ½)/f − ½ (the geometry of
/// `dmqsm_common::tasks::refined_grid`), clamped to the input's extent at the edges.
pub fn trilinear_upsample(x: &Array3<f32>, factors: [usize; 3]) -> anyhow::Result<Array3<f32>> {
    let s = x.shape();
    if factors.contains(&0) || s.contains(&0) {
        bail!(
            "trilinear upsampling needs a nonempty input and factors ≥ 1, got {s:?} × {factors:?}"
        );
    }
    let taps = |a: usize| -> Vec<(usize, usize, f32)> {
        let (n, f) = (s[a], factors[a]);
        (0..n * f)
            .map(|i| {
                let u = ((i as f64 + 0.5) / f as f64 - 0.5).clamp(0.0, (n - 1) as f64);
                let i0 = u.floor() as usize;
                let i1 = (i0 + 1).min(n - 1);
                (i0, i1, (u - i0 as f64) as f32)
            })
            .collect()
    };
    let (tx, ty, tz) = (taps(0), taps(1), taps(2));
    let shape = [tx.len(), ty.len(), tz.len()];
    Ok(Array3::from_shape_fn(shape, |(i, j, k)| {
        let (i0, i1, wi) = tx[i];
        let (j0, j1, wj) = ty[j];
        let (k0, k1, wk) = tz[k];
        let lerp_k = |a: usize, b: usize| x[[a, b, k0]] * (1.0 - wk) + x[[a, b, k1]] * wk;
        let lerp_j = |a: usize| lerp_k(a, j0) * (1.0 - wj) + lerp_k(a, j1) * wj;
        lerp_j(i0) * (1.0 - wi) + lerp_j(i1) * wi
    }))
}

/// Patch-boundary planes of `grid` along each axis, in volume coordinates: plane p lies
/// between voxels p − 1 and p (1 ≤ p < N), where a patch starts or ends.
pub fn boundary_planes(grid: &PatchGrid) -> [Vec<usize>; 3] {
    let shape = grid.volume_shape();
    let pad = grid.pad_before();
    let per_axis = grid.patches_per_axis();
    let (p, stride) = (grid.patch_size(), grid.stride());
    std::array::from_fn(|a| {
        let mut planes: Vec<usize> = Vec::new();
        for j in 0..per_axis[a] {
            let start = j * stride;
            for edge in [start, start + p] {
                // Padded → volume coordinates; keep the planes inside the volume.
                if edge > pad[a] && edge - pad[a] < shape[a] && !planes.contains(&(edge - pad[a])) {
                    planes.push(edge - pad[a]);
                }
            }
        }
        planes.sort_unstable();
        planes
    })
}

/// Seam number: the mean squared forward difference (x[p] − x[p−1])² across the planes
/// in `planes` (per axis), divided by the mean across all other planes, both over voxel
/// pairs inside `mask`. 1 when boundaries look like the interior; `None` when either set
/// is empty or the interior has no gradient energy.
pub fn seam_ratio(x: &Array3<f32>, mask: &Array3<bool>, planes: &[Vec<usize>; 3]) -> Option<f64> {
    let s = x.shape();
    let (mut eb, mut nb, mut ei, mut ni) = (0.0f64, 0usize, 0.0f64, 0usize);
    for (a, axis_planes) in planes.iter().enumerate() {
        let mut is_boundary = vec![false; s[a]];
        for &p in axis_planes {
            if p < s[a] {
                is_boundary[p] = true;
            }
        }
        for ((i, j, k), &v) in x.indexed_iter() {
            let idx = [i, j, k];
            if idx[a] == 0 {
                continue;
            }
            let mut prev = idx;
            prev[a] -= 1;
            if !(mask[idx] && mask[prev]) {
                continue;
            }
            let d = f64::from(v - x[prev]);
            if is_boundary[idx[a]] {
                eb += d * d;
                nb += 1;
            } else {
                ei += d * d;
                ni += 1;
            }
        }
    }
    if nb == 0 || ni == 0 || ei == 0.0 {
        return None;
    }
    Some((eb / nb as f64) / (ei / ni as f64))
}

/// Gradient magnitude (ppm/voxel) by central differences (one-sided at the edges).
fn gradient_magnitude(x: &Array3<f32>) -> Array3<f32> {
    let s = x.shape().to_vec();
    Array3::from_shape_fn((s[0], s[1], s[2]), |(i, j, k)| {
        let idx = [i, j, k];
        let mut g2 = 0.0f32;
        for a in 0..3 {
            let (mut lo, mut hi) = (idx, idx);
            if idx[a] > 0 {
                lo[a] -= 1;
            }
            if idx[a] + 1 < s[a] {
                hi[a] += 1;
            }
            let span = (hi[a] - lo[a]).max(1) as f32;
            let d = (x[hi] - x[lo]) / span;
            g2 += d * d;
        }
        g2.sqrt()
    })
}

/// A held-out phantom with its simulated measurements.
struct Subject {
    seed: u64,
    chi: Volume,
    mask: Volume,
    mask_bool: Array3<bool>,
    field: Volume,
    field_noisy: Volume,
    /// The field simulated on the 2× finer grid and block-averaged (only when a case
    /// needs it).
    field_fine: Option<Volume>,
    chi_lr: Volume,
    field_lr: Volume,
    mask_lr: Volume,
}

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
fn field_from_finer_grid(chi: &Volume, b0: B0Direction) -> anyhow::Result<Volume> {
    let f = [2, 2, 2];
    let fine_shape = chi.shape().map(|n| 2 * n);
    let block = BlockDownsample::new(fine_shape, f)?;
    let vox = chi.voxel_size.map(|v| v / 2.0);
    let fine = Volume::new(block.upsample(&chi.data)?, vox);
    let field = forward_field(&fine, b0)?;
    Ok(chi.like(block.apply(&field.data)?))
}

fn subject(seed: u64, shape: [usize; 3], fine: bool) -> anyhow::Result<Subject> {
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
    fn measurement(&self, case: Case) -> (&Volume, &Volume) {
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
    fn finish(&self, data: Array3<f32>) -> Volume {
        masked(&self.chi.like(data), &self.mask_bool)
    }

    fn score(&self, recon: &Volume) -> anyhow::Result<Metrics> {
        Ok(metrics::evaluate(recon, &self.chi, &self.mask)?)
    }

    /// The non-learning baselines of `case` and, for the dipole cases, the TV solution
    /// at the L-curve corner (the warm start of DM-QSM: no truth is used to make it).
    fn baselines(&self, case: Case) -> anyhow::Result<(Vec<Baseline>, Option<Volume>)> {
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
                timed("trilinear", &|| trilinear_upsample(lr, f2))?;
            }
            Case::SrDipinv => {
                let field = &self.field_lr;
                let down = KSpaceDownsample::new(self.chi.shape(), f2)?;
                let lr_mask = self.mask_lr.data.mapv(|v| v > 0.5);
                timed("TKD+zero-fill", &|| {
                    Ok(down.upsample(&masked(&tkd(field, b0, TKD_THRESHOLD)?, &lr_mask).data)?)
                })?;
                timed("TKD+trilinear", &|| {
                    trilinear_upsample(&masked(&tkd(field, b0, TKD_THRESHOLD)?, &lr_mask).data, f2)
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
    fn problem(&self, case: Case, initial: Option<&Volume>) -> anyhow::Result<Arc<tasks::Problem>> {
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
        Ok(Arc::new(p))
    }
}

/// A baseline reconstruction.
struct Baseline {
    name: String,
    volume: Volume,
    seconds: f64,
    /// TV weight α (TV rows).
    alpha: Option<f64>,
}

/// Label of the TV baseline whose α (from the L-curve's grid) is chosen by NRMSE against
/// the truth: TV's best case, not available to a user.
pub const TV_TUNED: &str = "TV (α tuned on truth)";
/// Label of the TV baseline with α at the L-curve corner (no truth used).
pub const TV_LCURVE: &str = "TV (L-curve α)";

/// One DM-QSM configuration.
#[derive(Debug, Clone, Copy)]
struct Config {
    steps: usize,
    guidance: GuidanceArg,
    xi: f64,
    overlap: usize,
    /// Warm-start timestep (`None`: from noise).
    start: Option<usize>,
}

struct Bench<'a> {
    model: &'a dyn ScoreModel,
    settings: &'a QualitySettings,
    max_batch: usize,
    runs_done: usize,
    runs_total: usize,
}

impl Bench<'_> {
    fn dmqsm(
        &mut self,
        subj: &Subject,
        problem: &Arc<tasks::Problem>,
        case: Case,
        c: Config,
    ) -> anyhow::Result<(Volume, Metrics, f64, Option<Calibration>)> {
        let settings = SamplerSettings {
            steps: c.steps,
            eta: self.settings.eta,
            xi: Some(c.xi),
            guidance: c.guidance.guidance(),
            spacing: GridSpacing::Overlap(c.overlap),
            shift_grid: false,
            clamp_ppm: self.settings.clamp_ppm,
            seed: self.settings.seed,
            start_timestep: c.start,
        };
        self.runs_done += 1;
        let t = Instant::now();
        let k = self.settings.samples;
        let (_, summary) =
            driver::sample_posterior(self.model, problem.clone(), &settings, k, self.max_batch)
                .with_context(|| {
                    format!(
                        "DM-QSM {} phantom {} ({} steps, {} guidance, ξ {}, overlap {})",
                        case.name(),
                        subj.seed,
                        c.steps,
                        c.guidance.name(),
                        c.xi,
                        c.overlap
                    )
                })?;
        let secs = t.elapsed().as_secs_f64();
        let v = subj.finish(summary.mean.data);
        let m = subj.score(&v)?;
        let cal = (k > 1)
            .then(|| {
                let std = subj.finish(summary.std.data);
                calibration(&v, &std, &subj.chi, &subj.mask)
            })
            .transpose()?;
        eprintln!(
            "[{}/{}] phantom {} {} DM-QSM {} steps {} ξ {} overlap {}{}{}: NRMSE {:.1} HFEN {:.1} XSIM {:.3} ({:.1} s)",
            self.runs_done,
            self.runs_total,
            subj.seed,
            case.name(),
            c.steps,
            c.guidance.name(),
            c.xi,
            c.overlap,
            c.start.map(|t| format!(" from t0 {t}")).unwrap_or_default(),
            if k > 1 {
                format!(", mean of {k}")
            } else {
                String::new()
            },
            m.nrmse,
            m.hfen,
            m.xsim,
            secs
        );
        Ok((v, m, secs, cal))
    }
}

fn write_png(path: &Path, panels: &[Panel<'_>], title: String) -> anyhow::Result<()> {
    let opts = RowOptions {
        views: vec![View::Axial, View::Coronal],
        title: Some(title),
        ..RowOptions::default()
    };
    let png = panel_row_png(panels, &opts)?;
    std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
}

fn diff(a: &Volume, b: &Volume) -> Volume {
    a.like(&a.data - &b.data)
}

/// Runs the quality benchmark with `args`; writes the outputs and prints the table.
pub fn quality(args: QualityArgs) -> anyhow::Result<()> {
    let settings = resolve(&args)?;
    let model = load_model(&args)?;
    let model: &dyn ScoreModel = model.as_ref();
    let patch = model.spec().patch_size;
    if settings.overlap >= patch || (settings.ablation && patch <= 8) {
        bail!(
            "overlap {} (and the ablation's 8) must be smaller than the model's patch edge {patch}",
            settings.overlap
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let guidance = &settings.guidance;
    let n_main = settings.cases.len()
        * settings
            .steps
            .iter()
            .map(|&n| {
                guidance.iter().filter(|&&g| settings.runs(g, n)).count()
                    * settings.starts_for(n).count()
            })
            .sum::<usize>();
    let one_round = guidance
        .iter()
        .filter(|&&g| g != GuidanceArg::Exact)
        .count();
    let n_sweep = settings.cases.len() * settings.xi_factors.len() * one_round;
    let n_abl = if settings.ablation { 2 } else { 0 };
    let mut bench = Bench {
        model,
        settings: &settings,
        max_batch: args.max_batch,
        runs_done: 0,
        runs_total: settings.phantom_seeds.len() * (n_main + n_sweep + n_abl)
            + usize::from(settings.demo),
    };
    let mut rows: Vec<Row> = Vec::new();
    let min_steps = settings.steps.iter().copied().min().unwrap_or(1);
    let mut seam_png: Option<PathBuf> = None;
    for &seed in &settings.phantom_seeds {
        let t = Instant::now();
        let fine = settings.cases.contains(&Case::DipinvPhysicsFine);
        let subj = subject(seed, settings.shape, fine)?;
        eprintln!(
            "phantom {seed} {:?} simulated in {:.1} s",
            settings.shape,
            t.elapsed().as_secs_f64()
        );
        for &case in &settings.cases {
            let (base, mut warm) = subj.baselines(case)?;
            if let (Some(alpha), true) = (settings.warm_start_alpha, warm.is_some()) {
                let (field, mask) = subj.measurement(case);
                let params = TvParams {
                    alpha,
                    ..TvParams::default()
                };
                warm = Some(tv(field, Some(mask.data.view()), B0Direction::AXIAL, &params)?.0);
            }
            let mut best_base: Option<(usize, f64)> = None;
            for (i, b) in base.iter().enumerate() {
                let m = subj.score(&b.volume)?;
                if best_base.is_none_or(|(_, x)| m.nrmse < x) {
                    best_base = Some((i, m.nrmse));
                }
                eprintln!(
                    "phantom {seed} {} {}{}: NRMSE {:.1} HFEN {:.1} XSIM {:.3}",
                    case.name(),
                    b.name,
                    b.alpha.map(|a| format!(" α {a:.2e}")).unwrap_or_default(),
                    m.nrmse,
                    m.hfen,
                    m.xsim
                );
                rows.push(Row {
                    alpha: b.alpha,
                    ..baseline_row(seed, case, &b.name, m, b.seconds)
                });
            }
            let problem = subj.problem(case, warm.as_ref())?;
            let default_xi = |g: GuidanceArg, steps: usize| {
                settings
                    .xi
                    .unwrap_or_else(|| default_xi(case.task(), g.guidance(), steps))
            };
            let mut best: Option<(Volume, f64, String)> = None;
            for &steps in &settings.steps {
                for &g in guidance.iter().filter(|&&g| settings.runs(g, steps)) {
                    for start in settings.starts_for(steps) {
                        let c = Config {
                            steps,
                            guidance: g,
                            xi: default_xi(g, steps),
                            overlap: settings.overlap,
                            start,
                        };
                        let (v, m, secs, cal) = bench.dmqsm(&subj, &problem, case, c)?;
                        let label = format!("DM-QSM {steps} {}", g.name());
                        if best.as_ref().is_none_or(|(_, b, _)| m.nrmse < *b) {
                            best = Some((v, m.nrmse, label));
                        }
                        let mut r = dm_row(seed, case, c, "main", m, secs);
                        r.samples = Some(settings.samples);
                        r.calibration = cal;
                        rows.push(r);
                    }
                }
            }
            for &g in guidance.iter().filter(|&&g| g != GuidanceArg::Exact) {
                for &f in &settings.xi_factors {
                    let c = Config {
                        steps: min_steps,
                        guidance: g,
                        xi: default_xi(g, min_steps) * f,
                        overlap: settings.overlap,
                        start: settings.starts_for(min_steps).next().flatten(),
                    };
                    let (v, m, secs, _) = bench.dmqsm(&subj, &problem, case, c)?;
                    if best.as_ref().is_none_or(|(_, b, _)| m.nrmse < *b) {
                        let label = format!("DM-QSM {} {} xi {}", c.steps, g.name(), c.xi);
                        best = Some((v, m.nrmse, label));
                    }
                    rows.push(dm_row(seed, case, c, "xi-sweep", m, secs));
                }
            }
            if let (Some((bi, _)), Some((v, _, label))) = (best_base, &best) {
                // The PNG font has no Greek letters.
                let bname = &base[bi].name.replace('α', "alpha");
                let bv = &base[bi].volume;
                let path = args
                    .out
                    .join(format!("triptych-{seed}-{}.png", case.name()));
                let err_w = Window::symmetric(ERROR_WINDOW_PPM)?;
                let (e_base, e_dm) = (diff(bv, &subj.chi), diff(v, &subj.chi));
                write_png(
                    &path,
                    &[
                        panel(&subj.chi, "truth", Window::CHI),
                        panel(bv, bname, Window::CHI),
                        panel(v, label, Window::CHI),
                        panel(&e_base, &format!("{bname} - truth"), err_w),
                        panel(&e_dm, "DM-QSM - truth", err_w),
                    ],
                    format!("phantom {seed}, {}", case.name()),
                )?;
            }
        }
        if settings.ablation
            && let (Some(&case), Some(&g)) = (settings.cases.first(), guidance.first())
        {
            let problem = subj.problem(case, None)?;
            let grid0 = PatchGrid::new(settings.shape, patch, GridSpacing::Overlap(0))?;
            let planes = boundary_planes(&grid0);
            let truth_ratio = seam_ratio(&subj.chi.data, &subj.mask_bool, &planes);
            let mut vols = Vec::new();
            for overlap in [0, 8] {
                let c = Config {
                    steps: min_steps,
                    guidance: g,
                    xi: default_xi(case.task(), g.guidance(), min_steps),
                    overlap,
                    start: None,
                };
                let (v, m, secs, _) = bench.dmqsm(&subj, &problem, case, c)?;
                let mut r = dm_row(seed, case, c, "ablation", m, secs);
                r.seam_ratio = seam_ratio(&v.data, &subj.mask_bool, &planes);
                rows.push(r);
                vols.push(v);
            }
            let truth_m = subj.score(&subj.chi)?;
            rows.push(Row {
                part: "ablation",
                seam_ratio: truth_ratio,
                ..baseline_row(seed, case, "truth", truth_m, 0.0)
            });
            if seam_png.is_none() {
                let g0 = subj.chi.like(gradient_magnitude(&vols[0].data));
                let g8 = subj.chi.like(gradient_magnitude(&vols[1].data));
                let gw = Window::new(0.0, ERROR_WINDOW_PPM)?;
                let path = args.out.join("seams.png");
                let opts = RowOptions {
                    views: vec![View::Axial, View::Coronal],
                    title: Some(format!(
                        "overlap ablation, phantom {seed}, {} ({min_steps} steps): seams show as lines in |grad|",
                        case.name()
                    )),
                    ..RowOptions::default()
                };
                let png = panel_row_png(
                    &[
                        panel(&vols[0], "overlap 0", Window::CHI),
                        panel(&vols[1], "overlap 8", Window::CHI),
                        panel(&g0, "|grad| overlap 0", gw),
                        panel(&g8, "|grad| overlap 8", gw),
                    ],
                    &opts,
                )?;
                std::fs::write(&path, png)
                    .with_context(|| format!("writing {}", path.display()))?;
                seam_png = Some(path);
            }
        }
    }
    if settings.demo {
        rows.extend(demo_rows(&mut bench)?);
    }
    let md = markdown(&settings, model, &rows);
    let md_path = args.out.join("results.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let json = serde_json::json!({
        "settings": settings,
        "model": {
            "id": model.spec().model_id,
            "hash": model.spec().content_hash,
            "patch_size": patch,
        },
        "rows": rows,
    });
    let json_path = args.out.join("results.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("{md}");
    eprintln!(
        "wrote {}, {}{}",
        md_path.display(),
        json_path.display(),
        seam_png
            .map(|p| format!(", {}", p.display()))
            .unwrap_or_default()
    );
    Ok(())
}

fn panel<'a>(v: &'a Volume, caption: &str, window: Window) -> Panel<'a> {
    Panel {
        volume: v,
        caption: caption.to_string(),
        window,
    }
}

fn baseline_row(phantom: u64, case: Case, method: &str, m: Metrics, secs: f64) -> Row {
    Row {
        phantom,
        case: case.name(),
        method: method.into(),
        steps: None,
        guidance: None,
        xi: None,
        overlap: None,
        part: "main",
        metrics: m,
        seconds: secs,
        seam_ratio: None,
        start: None,
        samples: None,
        alpha: None,
        calibration: None,
    }
}

fn dm_row(phantom: u64, case: Case, c: Config, part: &'static str, m: Metrics, secs: f64) -> Row {
    Row {
        steps: Some(c.steps),
        guidance: Some(c.guidance.name()),
        xi: Some(c.xi),
        overlap: Some(c.overlap),
        part,
        start: c.start,
        ..baseline_row(phantom, case, "DM-QSM", m, secs)
    }
}

/// Rows of `part` grouped by (case, method, steps, guidance, ξ, overlap), averaged over
/// phantoms, in first-seen order.
fn averaged<'a>(rows: &'a [Row], part: &str) -> Vec<(&'a Row, Vec<&'a Row>)> {
    let mut groups: Vec<(&Row, Vec<&Row>)> = Vec::new();
    for r in rows.iter().filter(|r| r.part == part) {
        let key = |x: &Row| {
            (
                x.case,
                x.method.clone(),
                x.steps,
                x.guidance,
                x.xi.map(f64::to_bits),
                x.overlap,
                x.start,
                x.samples,
            )
        };
        match groups.iter_mut().find(|(k, _)| key(k) == key(r)) {
            Some((_, v)) => v.push(r),
            None => groups.push((r, vec![r])),
        }
    }
    groups
}

fn mean(v: &[&Row], f: impl Fn(&Row) -> Option<f64>) -> String {
    let vals: Vec<f64> = v.iter().filter_map(|r| f(r)).collect();
    if vals.is_empty() {
        return "—".into();
    }
    let m = vals.iter().sum::<f64>() / vals.len() as f64;
    format!("{m:.3}")
}

fn fmt_mean(v: &[&Row], f: impl Fn(&Row) -> Option<f64>, digits: usize) -> String {
    let vals: Vec<f64> = v.iter().filter_map(|r| f(r)).collect();
    if vals.is_empty() {
        return "—".into();
    }
    let m = vals.iter().sum::<f64>() / vals.len() as f64;
    format!("{m:.digits$}")
}

fn method_label(r: &Row) -> String {
    let mut label = match (r.steps, r.guidance) {
        (Some(s), Some(g)) => format!("{} {s} steps, {g}", r.method),
        _ => r.method.clone(),
    };
    if let Some(t) = r.start {
        let _ = write!(label, ", warm start t₀ {t}");
    }
    if let Some(k) = r.samples.filter(|&k| k > 1) {
        let _ = write!(label, ", mean of {k}");
    }
    label
}

fn metric_cells(g: &[&Row]) -> String {
    format!(
        "{} | {} | {} | {} | {} | {}",
        fmt_mean(g, |r| Some(r.metrics.nrmse), 1),
        fmt_mean(g, |r| r.metrics.nrmse_detrended, 1),
        fmt_mean(g, |r| Some(r.metrics.hfen), 1),
        fmt_mean(g, |r| Some(r.metrics.xsim), 3),
        fmt_mean(g, |r| Some(r.metrics.cc), 3),
        fmt_mean(g, |r| Some(r.seconds), 2),
    )
}

/// One markdown table row per group: case, method, ξ (— for baselines), metrics.
fn write_rows(md: &mut String, groups: &[(&Row, Vec<&Row>)]) {
    for (r, g) in groups {
        let xi = r.xi.map(|x| format!("{x}")).unwrap_or_else(|| "—".into());
        let _ = writeln!(
            md,
            "| {} | {} | {xi} | {} |",
            r.case,
            method_label(r),
            metric_cells(g)
        );
    }
}

/// The markdown report: main table, ξ sweep with the best ξ per case, overlap ablation.
fn markdown(s: &QualitySettings, model: &dyn ScoreModel, rows: &[Row]) -> String {
    let mut md = String::new();
    let seeds: Vec<String> = s.phantom_seeds.iter().map(u64::to_string).collect();
    let _ = writeln!(
        md,
        "Model `{}` (patch {}), phantoms {} ({}×{}×{} at 1 mm, held out), B0 along z, \
         DDIM η {}, overlap {}, x̂0 clamp {}, sampler seed {}. Baselines: TKD δ = 0.1, closed-form L2 \
         λ = 0.1, weighted TV-ADMM (FANSI style, brain-mask weight) with α from 10 values \
         1e-5…1e-2 either chosen against the truth by NRMSE (TV's best case, which a user \
         cannot have) or at the L-curve corner, k-space zero-fill, trilinear. A warm start \
         t₀ begins DM-QSM at training timestep t₀ from the L-curve TV (dipole cases) or the \
         zero-fill (SR). Metrics in the brain mask, means over phantoms; NRMSE, dNRMSE \
         (detrended) and HFEN in %, time in s (TV: per α).\n",
        model.spec().model_id,
        model.spec().patch_size,
        seeds.join(", "),
        s.shape[0],
        s.shape[1],
        s.shape[2],
        s.eta,
        s.overlap,
        s.clamp_ppm
            .map(|[lo, hi]| format!("[{lo}, {hi}] ppm"))
            .unwrap_or_else(|| "off".into()),
        s.seed
    );
    let header = "| case | method | ξ | NRMSE | dNRMSE | HFEN | XSIM | CC | time |\n|---|---|---|---|---|---|---|---|---|";
    let _ = writeln!(md, "{header}");
    write_rows(&mut md, &averaged(rows, "main"));
    if s.phantom_seeds.len() > 1 {
        let _ = writeln!(md, "\nPer phantom (main table):\n");
        let _ = writeln!(
            md,
            "| phantom | case | method | ξ / α | NRMSE | dNRMSE | HFEN | XSIM | CC | time |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in rows.iter().filter(|r| r.part == "main") {
            let param =
                r.xi.or(r.alpha)
                    .map(|x| format!("{x:.3}"))
                    .unwrap_or_else(|| "—".into());
            let _ = writeln!(
                md,
                "| {} | {} | {} | {param} | {} |",
                r.phantom,
                r.case,
                method_label(r),
                metric_cells(&[r])
            );
        }
    }
    let cal: Vec<&Row> = rows.iter().filter(|r| r.calibration.is_some()).collect();
    if !cal.is_empty() {
        let _ = writeln!(
            md,
            "\nCalibration of the posterior std map (mean of K samples; Spearman ρ of std \
             with |error| in the mask, and the fraction of voxels with |error| ≤ 2σ):\n"
        );
        let _ = writeln!(
            md,
            "| phantom | case | method | ρ(std, abs error) | within ±2σ |\n|---|---|---|---|---|"
        );
        for r in cal {
            if let Some(c) = r.calibration {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.3} | {:.3} |",
                    r.phantom,
                    r.case,
                    method_label(r),
                    c.spearman,
                    c.coverage_2sigma
                );
            }
        }
    }
    let sweep = averaged(rows, "xi-sweep");
    if !sweep.is_empty() {
        let _ = writeln!(
            md,
            "\nξ sweep ({} steps, one-round guidance modes; ξ = factor × the default of the \
             main table, `dmqsm_common::diffusion::sampler::default_xi`):\n",
            s.steps.iter().min().copied().unwrap_or(0),
        );
        let _ = writeln!(md, "{header}");
        write_rows(&mut md, &sweep);
        let _ = writeln!(md, "\nBest ξ per case by NRMSE (sweep and default):\n");
        for (&case, &g) in s.cases.iter().flat_map(|c| {
            s.guidance
                .iter()
                .filter(|&&g| g != GuidanceArg::Exact)
                .map(move |g| (c, g))
        }) {
            let min_steps = s.steps.iter().min().copied();
            let first_g = Some(g.name());
            let cands: Vec<(f64, f64)> = averaged(rows, "xi-sweep")
                .into_iter()
                .chain(averaged(rows, "main"))
                .filter(|(r, _)| {
                    r.case == case.name()
                        && r.method == "DM-QSM"
                        && r.steps == min_steps
                        && r.guidance == first_g
                })
                .filter_map(|(r, g)| {
                    let n = g.iter().map(|x| x.metrics.nrmse).sum::<f64>() / g.len() as f64;
                    r.xi.map(|x| (x, n))
                })
                .collect();
            if let Some((xi, n)) = cands.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)) {
                let _ = writeln!(
                    md,
                    "- {} ({}): ξ = {xi} (NRMSE {n:.1})",
                    case.name(),
                    g.name()
                );
            }
        }
    }
    let demo = averaged(rows, "demo");
    if !demo.is_empty() {
        let _ = writeln!(
            md,
            "\nDemo phantom (`scripts/demo.sh`, i.e. `dmqsm demo` with its defaults: phantom \
             1001, 96×112×96 at 1 mm, anatomy at true size; noise-free field; DM-QSM \
             dipinv-physics with prox guidance warm-started from the L-curve TV at t₀ 50, \
             η 1, no clamp, sampler seed 0), scored \
             in process; the demo runs the same through the coordinator and two workers and \
             prints these figures:\n"
        );
        let _ = writeln!(md, "{header}");
        write_rows(&mut md, &demo);
    }
    let abl = averaged(rows, "ablation");
    if !abl.is_empty() {
        let _ = writeln!(
            md,
            "\nOverlap ablation (seam number = mean squared difference across the overlap-0 \
             patch-boundary planes / across all other planes, in the mask; 1 = no seams):\n"
        );
        let _ = writeln!(
            md,
            "| case | run | overlap | NRMSE | HFEN | seam number |\n|---|---|---|---|---|---|"
        );
        for (r, g) in abl {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                r.case,
                method_label(r),
                r.overlap
                    .map(|o| o.to_string())
                    .unwrap_or_else(|| "—".into()),
                fmt_mean(&g, |r| Some(r.metrics.nrmse), 1),
                fmt_mean(&g, |r| Some(r.metrics.hfen), 1),
                mean(&g, |r| r.seam_ratio),
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trilinear_reproduces_linear_functions_in_the_interior() {
        // A linear function of the index is reproduced exactly (f32 round-off, 1e-5) by
        // trilinear interpolation wherever no clamping happens (block-centred positions
        // (i + ½)/f − ½ inside [0, n − 1]); a constant everywhere.
        let x = Array3::from_shape_fn((5, 6, 4), |(i, j, k)| {
            0.5 + 0.1 * i as f32 - 0.2 * j as f32 + 0.3 * k as f32
        });
        let f = [2, 2, 2];
        let y = trilinear_upsample(&x, f).unwrap();
        assert_eq!(y.shape(), &[10, 12, 8]);
        for ((i, j, k), &v) in y.indexed_iter() {
            let u = |q: usize| (q as f32 + 0.5) / 2.0 - 0.5;
            let inside = |q: usize, n: usize| u(q) >= 0.0 && u(q) <= (n - 1) as f32;
            if inside(i, 5) && inside(j, 6) && inside(k, 4) {
                let want = 0.5 + 0.1 * u(i) - 0.2 * u(j) + 0.3 * u(k);
                assert!((v - want).abs() < 1e-5, "{i} {j} {k}: {v} vs {want}");
            }
        }
        let c = trilinear_upsample(&Array3::from_elem((3, 3, 3), 0.25), [3, 1, 2]).unwrap();
        assert!(c.iter().all(|&v| (v - 0.25).abs() < 1e-7));
        assert!(trilinear_upsample(&x, [0, 1, 1]).is_err());
    }

    #[test]
    fn seam_ratio_is_one_for_a_ramp_and_large_for_steps_on_boundaries() {
        let shape = (24, 24, 24);
        let mask = Array3::from_elem(shape, true);
        let planes: [Vec<usize>; 3] = [vec![8, 16], vec![8, 16], vec![8, 16]];
        // A linear ramp has the same difference across every plane: ratio 1. Tolerance
        // 1e-6: the ramp is stored in f32 (values ≤ 1.4, ulp ≈ 1e-7), so single
        // differences of 0.01–0.03 carry ~1e-5 relative round-off that averages down.
        let ramp = Array3::from_shape_fn(shape, |(i, j, k)| 0.01 * (i + 2 * j + 3 * k) as f32);
        let r = seam_ratio(&ramp, &mask, &planes).unwrap();
        assert!((r - 1.0).abs() < 1e-6, "{r}");
        // Ramp along x plus a jump of 0.1 across x-planes 8 and 16: boundary pairs along x
        // have d = 0.01 + 0.1, interior ones 0.01; y and z differences are 0 (counted).
        let stepped =
            Array3::from_shape_fn(shape, |(i, _, _)| 0.01 * i as f32 + 0.1 * (i / 8) as f32);
        let r = seam_ratio(&stepped, &mask, &planes).unwrap();
        // Boundary: x-pairs 2·24² with 0.11², y/z pairs 2·2·24² with 0. Interior: x-pairs
        // 21·24² with 0.01², y/z pairs 2·21·24² with 0.
        let want = (2.0 * 0.11f64.powi(2) / 6.0) / (21.0 * 0.01f64.powi(2) / 63.0);
        assert!((r - want).abs() / want < 1e-4, "{r} vs {want}");
        // No interior gradient energy → None.
        assert!(seam_ratio(&Array3::zeros(shape), &mask, &planes).is_none());
    }

    #[test]
    fn boundary_planes_follow_the_patch_grid() {
        // 96 voxels, P = 48, overlap 0: stride 48, patches at 0 and 48, no padding → the
        // only interior boundary is plane 48.
        let g = PatchGrid::new([96, 96, 96], 48, GridSpacing::Overlap(0)).unwrap();
        assert_eq!(boundary_planes(&g)[0], vec![48]);
        // Overlap 8 (stride 40): padded length 48 + 2·40 = 128 (3 patches), 16 voxels of
        // padding before → starts at 0, 40, 80 and ends at 48, 88, 128 in padded
        // coordinates; minus 16 → 24, 32, 64, 72 inside (0 < p < 96).
        let g = PatchGrid::new([96, 96, 96], 48, GridSpacing::Overlap(8)).unwrap();
        let pad = g.pad_before()[0];
        let planes = boundary_planes(&g)[0].clone();
        let mut want: Vec<usize> = [0usize, 40, 80, 48, 88, 128]
            .iter()
            .filter(|&&e| e > pad && e - pad < 96)
            .map(|&e| e - pad)
            .collect();
        want.sort_unstable();
        assert_eq!(planes, want);
    }

    #[test]
    fn resolve_rejects_training_seeds_and_bad_shapes() {
        let mut a = QualityArgs {
            model: None,
            analytic_prior: Some(0.05),
            analytic_patch: 16,
            out: PathBuf::from("x"),
            quick: true,
            phantoms: 1,
            phantom_seed: 5,
            allow_training_seeds: false,
            shape: None,
            cases: vec![],
            steps: vec![],
            guidance: vec![],
            xi_sweep: vec![],
            no_ablation: false,
            exact_max_steps: 50,
            no_demo: false,
            overlap: 8,
            eta: 1.0,
            clamp_ppm: "-1,1".into(),
            seed: 0,
            start_timesteps: vec![],
            samples: 1,
            warm_start_alpha: None,
            xi: None,
            max_batch: 8,
            threads: None,
        };
        assert!(resolve(&a).is_err());
        a.phantom_seed = 1000;
        let s = resolve(&a).unwrap();
        assert_eq!(s.shape, [64, 64, 48]);
        assert_eq!(s.steps, vec![10]);
        assert_eq!(s.cases.len(), Case::ALL.len());
        assert_eq!(s.starts, vec![None]);
        assert_eq!(
            s.guidance,
            vec![GuidanceArg::Approx, GuidanceArg::Prox, GuidanceArg::Exact]
        );
        assert!(!s.demo, "--quick skips the demo rows");
        // Exact guidance is capped at --exact-max-steps; 0 lifts the cap.
        assert!(s.runs(GuidanceArg::Exact, 50) && !s.runs(GuidanceArg::Exact, 200));
        assert!(s.runs(GuidanceArg::Prox, 200));
        a.exact_max_steps = 0;
        assert!(resolve(&a).unwrap().runs(GuidanceArg::Exact, 200));
        a.quick = false;
        assert!(resolve(&a).unwrap().demo);
        a.quick = true;
        a.shape = Some(vec![33, 32, 32]);
        assert!(resolve(&a).is_err());
        a.shape = None;
        a.xi_sweep = vec!["none".into()];
        assert!(resolve(&a).unwrap().xi_factors.is_empty());
        a.xi_sweep = vec!["-1".into()];
        assert!(resolve(&a).is_err());
        a.xi_sweep = vec![];
        assert_eq!(resolve(&a).unwrap().clamp_ppm, Some([-1.0, 1.0]));
        a.clamp_ppm = "none".into();
        assert_eq!(resolve(&a).unwrap().clamp_ppm, None);
        a.clamp_ppm = "1,-1".into();
        assert!(resolve(&a).is_err());
    }
}
