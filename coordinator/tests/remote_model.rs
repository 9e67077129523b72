//! `RemoteScoreModel` and `LocalWorkers` (the path `dmqsm benchmark quality --model` and
//! embedded mode take): a worker's answers over gRPC are bitwise the model's in process,
//! for ε and for Jᵀv, and so is a whole DPS run with exact guidance (both rounds).
//!
//! The `dmqsm-worker` binary must be built (`cargo build --bins`, as `scripts/test.sh`
//! does) for the `LocalWorkers` test.

use dmqsm_common::Volume;
use dmqsm_common::diffusion::analytic::GaussianPriorModel;
use dmqsm_common::diffusion::model::ScoreModel;
use dmqsm_common::diffusion::sampler::{Guidance, SamplerSettings};
use dmqsm_common::diffusion::schedule::ScheduleConfig;
use dmqsm_common::driver;
use dmqsm_common::patch::GridSpacing;
use dmqsm_common::tasks::{Task, TaskOptions, prepare};
use dmqsm_coordinator::local_workers::{LocalModel, LocalWorkerOptions, LocalWorkers};
use dmqsm_coordinator::remote_model::RemoteScoreModel;
mod support;

use dmqsm_worker::ServedModel;
use ndarray::{Array3, Array4};
use std::sync::Arc;
use support::start_worker;

fn prior() -> GaussianPriorModel {
    GaussianPriorModel::new(0.1, 0.4, 8, 5.0, ScheduleConfig::default()).unwrap()
}

/// A worker serving `model` in process (see `support::start_worker`).
fn start_model_worker(model: GaussianPriorModel) -> (String, tokio::runtime::Runtime) {
    start_worker(
        ServedModel::new(Arc::new(model), "cpu", 1, "f32"),
        "remote-test",
    )
}

fn patches(b: usize, seed: f32) -> Array4<f32> {
    Array4::from_shape_fn((b, 8, 8, 8), |(n, i, j, k)| {
        ((n * 512 + i * 64 + j * 8 + k) as f32 * 0.37 + seed).sin()
    })
}

#[test]
fn remote_answers_and_a_whole_exact_dps_run_are_bitwise_the_in_process_ones() {
    let local = prior();
    let (url, _rt) = start_model_worker(prior());
    let remote = RemoteScoreModel::connect(&url).expect("the worker answers Info");
    assert_eq!(remote.spec(), local.spec());

    let (x, v) = (patches(3, 0.0), patches(3, 1.0));
    let t = [10.0, 500.0, 990.0];
    assert_eq!(
        remote.eps(x.view(), &t).unwrap(),
        local.eps(x.view(), &t).unwrap()
    );
    assert_eq!(
        remote.vjp(x.view(), &t, v.view()).unwrap(),
        local.vjp(x.view(), &t, v.view()).unwrap()
    );
    // A bad request comes back as the worker's error, naming the worker.
    let e = remote.eps(x.view(), &t[..2]).unwrap_err().to_string();
    assert!(e.contains(&url), "{e}");

    let chi = Array3::from_shape_fn([12, 12, 12], |(i, j, k)| {
        0.05 * ((i as f32 * 0.7).sin() + (j as f32 * 0.3).cos() * (k as f32 * 0.5).sin())
    });
    let field = dmqsm_common::simulate::forward_field(
        &Volume::new(chi, [1.0; 3]),
        dmqsm_common::geometry::B0Direction::AXIAL,
    )
    .unwrap();
    let problem = Arc::new(prepare(&TaskOptions::new(Task::DipinvPhysics), &field, None).unwrap());
    let settings = SamplerSettings {
        steps: 4,
        guidance: Guidance::Exact,
        xi: Some(1.0),
        spacing: GridSpacing::Overlap(2),
        ..SamplerSettings::default()
    };
    let a = driver::sample(&local, problem.clone(), &settings, 3).unwrap();
    let b = driver::sample(&remote, problem, &settings, 3).unwrap();
    assert_eq!(a.chi.data, b.chi.data);
}

#[test]
fn local_worker_processes_serve_and_stop() {
    let model = LocalModel::Analytic {
        mean: 0.1,
        std: 0.4,
        patch_size: 8,
        chi_scale: 5.0,
    };
    let workers = LocalWorkers::start(&model, &LocalWorkerOptions::default(), 2)
        .expect("dmqsm-worker beside the test binary (cargo build --bins)");
    let urls = workers.urls();
    assert_eq!(urls.len(), 2);
    assert_ne!(urls[0], urls[1]);
    let local = prior();
    let x = patches(2, 2.0);
    for url in &urls {
        let remote = RemoteScoreModel::connect(url).unwrap();
        assert_eq!(
            remote.eps(x.view(), &[3.0, 700.0]).unwrap(),
            local.eps(x.view(), &[3.0, 700.0]).unwrap()
        );
    }
    workers.shutdown();
    // Stopped: nothing listens there any more.
    assert!(RemoteScoreModel::connect(&urls[0]).is_err());
}
