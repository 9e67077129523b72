//! Demo rows: `dmqsm demo`'s phantom and settings scored in process, so the demo's
//! printed metrics can be checked against the benchmark table.

use super::model::Bench;
use super::report::Row;
use anyhow::Context;
use dmqsm_common::diffusion::sampler::{Guidance, SamplerSettings, default_xi};
use dmqsm_common::driver;
use dmqsm_common::metrics::{self, Metrics};
use dmqsm_common::patch::GridSpacing;
use dmqsm_common::tasks::{self, ConsistencyTv, InitialEstimate, Task, TaskOptions};
use std::sync::Arc;
use std::time::Instant;

/// The demo's configuration (`dmqsm demo` with its defaults: phantom, field, task
/// `dipinv-physics`, prox guidance, steps, η, no clamp, overlap 8, sampler seed 0),
/// computed in process. `dmqsm demo` runs the same through the coordinator and its
/// workers; determinism makes its printed metrics equal to these rows.
pub(super) fn demo_rows(bench: &mut Bench<'_>) -> anyhow::Result<Vec<Row>> {
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
                consistency_tv: ConsistencyTv::default_for(Task::DipinvPhysics, Guidance::Prox),
                ..TaskOptions::new(Task::DipinvPhysics)
            },
            &field,
            Some(&p.mask),
        )
        .context("preparing the demo problem")?,
    );
    let guidance = Guidance::Prox;
    let settings = SamplerSettings {
        steps: DEMO_STEPS as usize,
        eta: DEMO_ETA,
        xi: None,
        guidance,
        spacing: GridSpacing::Overlap(8),
        shift_grid: false,
        clamp_ppm: None,
        seed: 0,
        start_timestep: Some(DEMO_START_TIMESTEP as usize),
    };
    let xi = default_xi(
        Task::DipinvPhysics,
        settings.guidance,
        settings.steps,
        problem.tv_consistency().is_some(),
    );
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
