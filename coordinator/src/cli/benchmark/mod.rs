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
//! DM-QSM runs in process (`dmqsm_common::driver::sample`); the given TorchScript or
//! native U-Net model is evaluated by one `dmqsm-worker` process on loopback
//! (`dmqsm_coordinator::remote_model`, f32 on the wire: the same bits as in process), in
//! the selected guidance modes (DPS approx and exact, and the DDS
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
//!
//! Layout: [`settings`] (validated settings from the arguments), [`cases`] (the cases,
//! the phantom subjects with their measurements, the baselines and the sampler problems),
//! [`model`] (the score model and the DM-QSM runs), [`demo`] (the demo rows), [`report`]
//! (rows, `results.md`, `results.json`, the PNG figures); this module holds the
//! subcommand, its arguments and the orchestration ([`quality`]).
//!
//! [`KSpaceDownsample::upsample`]: dmqsm_common::operators::KSpaceDownsample::upsample
//! [`trilinear_upsample`]: dmqsm_common::operators::resample::trilinear_upsample
//! [`field_from_finer_grid`]: cases::field_from_finer_grid

pub mod cases;
pub mod demo;
pub mod model;
pub mod report;
pub mod settings;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use dmqsm_common::diffusion::model::ScoreModel;
use dmqsm_common::diffusion::sampler::{Guidance, default_xi};
use dmqsm_common::geometry::B0Direction;
use dmqsm_common::inversion::tv::{TvParams, tv};
use dmqsm_common::metrics::seams::{boundary_planes, seam_ratio};
use dmqsm_common::patch::{GridSpacing, PatchGrid};
use dmqsm_common::tasks::Task;
use dmqsm_common::volume::Volume;
use model::{Bench, Config, load_model};
use report::{baseline_row, dm_row};
use std::path::PathBuf;
use std::time::Instant;

pub use cases::{Case, FIRST_HELD_OUT_SEED};
pub use report::Row;
pub use settings::resolve;

/// `dmqsm benchmark …` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchmarkCommand {
    /// DM-QSM vs TKD / L2 / zero-fill / trilinear on held-out phantoms: metrics table,
    /// triptychs, overlap ablation with a seam number, ξ sweep.
    Quality(Box<QualityArgs>),
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
    pub guidance: Vec<Guidance>,
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
    /// TV data consistency of the `dipinv-physics` cases' prox runs: α = FACTOR × the
    /// warm start's TV α (the L-curve corner unless --warm-start-alpha); default 0.1, as
    /// `dmqsm run` (`ConsistencyTv::DEFAULT_FACTOR`); `none` runs the plain CG proximal
    /// step.
    #[arg(long, value_name = "FACTOR|none")]
    pub consistency_tv: Option<String>,
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

/// The `benchmark` entry point.
pub fn run(command: BenchmarkCommand) -> anyhow::Result<()> {
    match command {
        BenchmarkCommand::Quality(a) => quality(*a),
    }
}

/// Runs the quality benchmark with `args`; writes the outputs and prints the table.
pub fn quality(args: QualityArgs) -> anyhow::Result<()> {
    let settings = resolve(&args)?;
    let loaded = load_model(&args)?;
    let model: &dyn ScoreModel = loaded.model.as_ref();
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
    let one_round = guidance.iter().filter(|&&g| g != Guidance::Exact).count();
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
        let subj = cases::subject(seed, settings.shape, fine)?;
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
            let tv_alpha = match settings.consistency_tv {
                Some(factor) if case.task() == Task::DipinvPhysics => {
                    let reference = settings.warm_start_alpha.or_else(|| {
                        base.iter()
                            .find(|b| b.name == cases::TV_LCURVE)
                            .and_then(|b| b.alpha)
                    });
                    reference.map(|a| factor * a)
                }
                _ => None,
            };
            let problem = subj.problem(case, warm.as_ref(), tv_alpha)?;
            let default_xi = |g: Guidance, steps: usize| {
                settings.xi.unwrap_or_else(|| {
                    default_xi(case.task(), g, steps, problem.tv_consistency().is_some())
                })
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
            for &g in guidance.iter().filter(|&&g| g != Guidance::Exact) {
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
                report::write_triptych(
                    &args.out,
                    seed,
                    case,
                    &subj.chi,
                    (&base[bi].name, &base[bi].volume),
                    (v, label),
                )?;
            }
        }
        if settings.ablation
            && let (Some(&case), Some(&g)) = (settings.cases.first(), guidance.first())
        {
            let problem = subj.problem(case, None, None)?;
            let grid0 = PatchGrid::new(settings.shape, patch, GridSpacing::Overlap(0))?;
            let planes = boundary_planes(&grid0);
            let truth_ratio = seam_ratio(&subj.chi.data, &subj.mask_bool, &planes)?;
            let mut vols = Vec::new();
            for overlap in [0, 8] {
                let c = Config {
                    steps: min_steps,
                    guidance: g,
                    xi: default_xi(case.task(), g, min_steps, false),
                    overlap,
                    start: None,
                };
                let (v, m, secs, _) = bench.dmqsm(&subj, &problem, case, c)?;
                let mut r = dm_row(seed, case, c, "ablation", m, secs);
                r.seam_ratio = seam_ratio(&v.data, &subj.mask_bool, &planes)?;
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
                seam_png = Some(report::write_seams_png(
                    &args.out,
                    seed,
                    case,
                    min_steps,
                    &subj.chi,
                    [&vols[0], &vols[1]],
                )?);
            }
        }
    }
    if settings.demo {
        rows.extend(demo::demo_rows(&mut bench)?);
    }
    let (md, md_path, json_path) = report::write_results(&args.out, &settings, model, &rows)?;
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
