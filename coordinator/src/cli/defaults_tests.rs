//! The command-line defaults of `run`, `submit` and `cohort` are stable for every task,
//! with and without a mask, from 4 to 1000 steps: the settings parsed from the flags go
//! through the same path as a job (proto → `JobSpec` → problem and sampler settings) and
//! are sampled in process with the exact score of a Gaussian prior on small volumes. χ
//! must stay finite and within ±1 ppm, ten times the truth's range (the blow-ups these
//! defaults replace reached ±365 to ±1000 ppm).

use super::SettingsArgs;
use clap::Parser;
use dmqsm_common::diffusion::analytic::GaussianPriorModel;
use dmqsm_common::diffusion::schedule::ScheduleConfig;
use dmqsm_common::driver;
use dmqsm_common::geometry::B0Direction;
use dmqsm_common::operators::{KSpaceDownsample, LinearOperator};
use dmqsm_common::simulate::forward_field;
use dmqsm_common::tasks::prepare;
use dmqsm_common::{Error, Volume};
use dmqsm_coordinator::job::JobSpec;
use dmqsm_coordinator::problem::task_options;
use dmqsm_coordinator::runner::sampler_settings;
use ndarray::Array3;
use std::sync::Arc;

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    settings: SettingsArgs,
}

/// A χ map of two blobs (+0.1 and −0.05 ppm) inside a ball mask, on an n³ 1 mm grid.
fn truth(n: usize) -> (Volume, Volume) {
    let c = n as f64 / 2.0;
    let d = |i: usize, j: usize, k: usize, x: f64, y: f64, z: f64| {
        (i as f64 - x).powi(2) + (j as f64 - y).powi(2) + (k as f64 - z).powi(2)
    };
    let chi = Array3::from_shape_fn([n; 3], |(i, j, k)| {
        (0.1 * (-d(i, j, k, c - 3.0, c, c) / 8.0).exp()
            - 0.05 * (-d(i, j, k, c + 3.0, c + 2.0, c) / 6.0).exp()) as f32
    });
    let mask = Array3::from_shape_fn([n; 3], |(i, j, k)| {
        if d(i, j, k, c, c, c) < (0.42 * n as f64).powi(2) {
            1.0f32
        } else {
            0.0
        }
    });
    (Volume::new(chi, [1.0; 3]), Volume::new(mask, [1.0; 3]))
}

fn run(task: &str, steps: u32, masked: bool, extra: &[&str]) -> dmqsm_common::Result<f32> {
    let mut argv = vec!["x", "--task", task];
    let steps = steps.to_string();
    argv.extend(["--steps", &steps]);
    argv.extend(extra);
    let flags = Flags::try_parse_from(argv).expect("the flags parse");
    let spec = JobSpec::from_proto(&flags.settings.to_proto(), 8).expect("a valid job");
    let (chi, mask) = truth(20);
    let b0 = B0Direction::AXIAL;
    let (measurement, mask) = if spec.task.is_super_resolution() {
        let down = KSpaceDownsample::new([20; 3], [2; 3])?;
        let lr = |v: &Volume| -> dmqsm_common::Result<Volume> {
            Ok(Volume::new(down.apply(&v.data)?, [2.0; 3]))
        };
        let y = if task == "sr" {
            lr(&chi)?
        } else {
            lr(&forward_field(&chi, b0)?)?
        };
        let m = Volume::new(
            lr(&mask)?.data.mapv(|v| if v > 0.5 { 1.0 } else { 0.0 }),
            [2.0; 3],
        );
        (y, m)
    } else {
        (forward_field(&chi, b0)?, mask)
    };
    let options = task_options(&spec).expect("task options");
    let problem = prepare(&options, &measurement, masked.then_some(&mask))?;
    let model = GaussianPriorModel::new(0.0, 0.05, 16, 5.0, ScheduleConfig::default())?;
    let rec = driver::sample(&model, Arc::new(problem), &sampler_settings(&spec, 0), 8)?;
    Ok(rec.chi.data.iter().fold(0.0f32, |m, v| {
        if v.is_finite() {
            m.max(v.abs())
        } else {
            f32::INFINITY
        }
    }))
}

#[test]
fn defaults_are_stable_for_every_task_with_and_without_a_mask_from_4_to_1000_steps() {
    for task in [
        "dipinv-physics",
        "dipinv",
        "sr",
        "sr-dipinv",
        "sr-dipinv-physics",
    ] {
        for steps in [4, 50, 1000] {
            for masked in [true, false] {
                let peak = run(task, steps, masked, &[])
                    .unwrap_or_else(|e| panic!("{task}, {steps} steps, mask {masked}: {e}"));
                assert!(
                    peak < 1.0,
                    "{task}, {steps} steps, mask {masked}: max |χ| = {peak} ppm"
                );
            }
        }
    }
}

/// A job that diverges on its own settings fails with a message that says so and names
/// the setting to change.
#[test]
fn a_diverging_job_names_the_setting_to_change() {
    let err = run(
        "dipinv-physics",
        8,
        true,
        &["--guidance", "approx", "--xi", "1e9"],
    )
    .expect_err("ξ = 1e9 must diverge");
    assert!(matches!(err, Error::Diverged(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("diverged") && msg.contains("--xi"), "{msg}");
}
