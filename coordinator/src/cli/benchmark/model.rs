//! The score model under test and the DM-QSM runs on it: [`load_model`] (a network
//! served by one `dmqsm-worker` on loopback, or the analytic prior in process), one run's
//! configuration [`Config`], and [`Bench`], which runs, scores and logs each run.

use super::QualityArgs;
use super::cases::{Case, Subject};
use super::settings::QualitySettings;
use anyhow::{Context, bail};
use dmqsm_common::diffusion::analytic::GaussianPriorModel;
use dmqsm_common::diffusion::model::ScoreModel;
use dmqsm_common::diffusion::sampler::{Guidance, SamplerSettings};
use dmqsm_common::diffusion::schedule::ScheduleConfig;
use dmqsm_common::driver;
use dmqsm_common::metrics::Metrics;
use dmqsm_common::metrics::calibration::{Calibration, calibration};
use dmqsm_common::patch::GridSpacing;
use dmqsm_common::tasks;
use dmqsm_common::volume::Volume;
use dmqsm_coordinator::local_workers::{LocalModel, LocalWorkerOptions, LocalWorkers};
use dmqsm_coordinator::remote_model::RemoteScoreModel;
use std::sync::Arc;
use std::time::Instant;

/// The score model of a benchmark run, and the worker process serving it (a network
/// runs in a `dmqsm-worker` on loopback; the analytic prior runs here).
pub(super) struct BenchModel {
    /// The model (a loopback client of the worker, or the analytic prior).
    pub(super) model: Box<dyn ScoreModel>,
    _worker: Option<LocalWorkers>,
}

/// Loads the model of `args`: the analytic prior (`--analytic-prior`) in process, or
/// `--model` served by one `dmqsm-worker` on loopback (CPU, `--threads`, `--max-batch`).
pub(super) fn load_model(args: &QualityArgs) -> anyhow::Result<BenchModel> {
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
        return Ok(BenchModel {
            model: Box::new(m),
            _worker: None,
        });
    }
    let Some(path) = &args.model else {
        bail!("give --model PATH (TorchScript .pt or .safetensors) or --analytic-prior SIGMA");
    };
    let model = LocalModel::Torch {
        path: path.clone(),
        device: "cpu".into(),
    };
    let options = LocalWorkerOptions {
        threads: args.threads,
        max_batch: Some(args.max_batch),
        ..LocalWorkerOptions::default()
    };
    let worker = LocalWorkers::start(&model, &options, 1)
        .with_context(|| format!("serving model {}", path.display()))?;
    let url = worker.urls().remove(0);
    let remote = RemoteScoreModel::connect(&url)
        .with_context(|| format!("connecting to the worker serving {}", path.display()))?;
    Ok(BenchModel {
        model: Box::new(remote),
        _worker: Some(worker),
    })
}

/// One DM-QSM configuration.
#[derive(Debug, Clone, Copy)]
pub(super) struct Config {
    /// Sampler steps.
    pub(super) steps: usize,
    /// Guidance mode.
    pub(super) guidance: Guidance,
    /// ξ (the DPS step or prox data weight).
    pub(super) xi: f64,
    /// Patch overlap (voxels).
    pub(super) overlap: usize,
    /// Warm-start timestep (`None`: from noise).
    pub(super) start: Option<usize>,
}

/// Runs DM-QSM configurations on one model and counts them for the progress log.
pub(super) struct Bench<'a> {
    /// The score model.
    pub(super) model: &'a dyn ScoreModel,
    /// The benchmark's settings (η, clamp, seed, samples).
    pub(super) settings: &'a QualitySettings,
    /// Patches per model call.
    pub(super) max_batch: usize,
    /// Runs finished so far (incremented as each starts).
    pub(super) runs_done: usize,
    /// Runs planned in all.
    pub(super) runs_total: usize,
}

impl Bench<'_> {
    /// One DM-QSM run of `c` on `problem` (`case` of `subj`): the mean of the settings'
    /// posterior samples masked with the truth's mask, its metrics, the wall time (s) and,
    /// with 2 or more samples, the calibration of the std map. Logs a progress line.
    pub(super) fn dmqsm(
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
            guidance: c.guidance,
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
