//! kill -9 the coordinator mid-job, restart it on the same data dir, and the job resumes
//! from its last sled checkpoint and ends bitwise identical to the in-process reference
//! (tolerance: none). The coordinator runs as the real `dmqsm serve` child process; the
//! workers (analytic model with a simulated 25 ms per batch) run in this test process.

use dmqsm_common::Volume;
use dmqsm_common::diffusion::analytic::GaussianPriorModel;
use dmqsm_common::diffusion::model::ScoreModel;
use dmqsm_common::diffusion::schedule::ScheduleConfig;
use dmqsm_common::geometry::B0Direction;
use dmqsm_coordinator::client;
use dmqsm_coordinator::job::JobSpec;
use dmqsm_proto::v1;
mod support;

use dmqsm_worker::{ServedModel, SimulatedModel};
use ndarray::Array3;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use support::start_worker;

/// A child process killed (SIGKILL) when dropped, so a failing test leaves nothing behind.
struct Guard(Child);

impl Guard {
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Starts `dmqsm serve` and returns the child and the URL it printed.
fn start_coordinator(data_dir: &std::path::Path, workers: &[String]) -> (Guard, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dmqsm"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args([
            "--checkpoint-every",
            "2",
            "--heartbeat-ms",
            "100",
            "--coord-batch-size",
            "2",
            "--log",
            "warn",
        ]);
    for w in workers {
        cmd.args(["--worker", w]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(
        url.starts_with("http://127.0.0.1:"),
        "unexpected first line {line:?}"
    );
    (Guard(child), url)
}

fn inputs() -> (Vec<u8>, Vec<u8>) {
    let n = 24;
    let c = (n as f64 - 1.0) / 2.0;
    let mask = Array3::from_shape_fn((n, n, n), |(i, j, k)| {
        let r = ((i as f64 - c).powi(2) + (j as f64 - c).powi(2) + (k as f64 - c).powi(2)).sqrt();
        if r < 10.0 { 1.0f32 } else { 0.0 }
    });
    let chi = Array3::from_shape_fn((n, n, n), |(i, j, k)| {
        (0.1 * ((i as f32) * 0.4).sin() * ((j + k) as f32 * 0.3).cos()) * mask[[i, j, k]]
    });
    let b0 = B0Direction::new([0.0, 0.0, 1.0]).unwrap();
    let field = dmqsm_common::simulate::forward_field(&Volume::new(chi, [1.0; 3]), b0).unwrap();
    let masked = &field.data * &mask;
    (
        dmqsm_common::nifti_io::write_nifti_bytes(&field.like(masked), true).unwrap(),
        dmqsm_common::nifti_io::write_nifti_bytes(&Volume::new(mask, [1.0; 3]), true).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_coordinator_mid_job_resumes_from_checkpoint_with_identical_output() {
    let model = GaussianPriorModel::new(0.0, 0.5, 16, 10.0, ScheduleConfig::default()).unwrap();
    let served = ServedModel::simulated(SimulatedModel::new(
        Arc::new(model.clone()),
        Duration::from_millis(25),
        Duration::ZERO,
    ));
    let (u1, r1) = start_worker(served.clone(), "w0");
    let (u2, r2) = start_worker(served, "w1");
    let workers = vec![u1, u2];
    let dir = tempfile::tempdir().unwrap();
    let (m, k) = inputs();
    let settings = v1::JobSettings {
        task: v1::Task::Dipinv as i32,
        steps: Some(16),
        eta: 0.5,
        guidance: v1::Guidance::Exact as i32,
        overlap: Some(8),
        seed: 11,
        samples: Some(1),
        ..Default::default()
    };
    let req = v1::SubmitJobRequest {
        measurement: Some(v1::VolumeInput {
            source: Some(v1::volume_input::Source::Nifti(m.clone().into())),
        }),
        mask: Some(v1::VolumeInput {
            source: Some(v1::volume_input::Source::Nifti(k.clone().into())),
        }),
        settings: Some(settings.clone()),
        label: "restart".into(),
    };

    let (mut child, url) = start_coordinator(dir.path(), &workers);
    let mut c = client::connect(&url).await.unwrap();
    let id = c.submit_job(req).await.unwrap().into_inner().job_id;
    // Let it pass a few checkpoints (every 2 steps), then kill -9.
    let mut step = 0;
    for _ in 0..1000 {
        step = c
            .get_job(v1::GetJobRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner()
            .step;
        if step >= 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        (7..16).contains(&step),
        "job at step {step} before the kill"
    );
    child.kill9();

    let (mut child, url) = start_coordinator(dir.path(), &workers);
    let mut c = client::connect(&url).await.unwrap();
    let st = tokio::time::timeout(Duration::from_secs(120), client::wait(&mut c, &id, |_| {}))
        .await
        .expect("the resumed job must finish")
        .unwrap();
    assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
    let files = client::fetch(&mut c, &id).await.unwrap();
    let chi_bytes = &files.iter().find(|f| f.0 == "chi.nii.gz").unwrap().1;
    let chi = dmqsm_common::nifti_io::read_nifti_bytes(chi_bytes)
        .unwrap()
        .data;
    let report: serde_json::Value =
        serde_json::from_slice(&files.iter().find(|f| f.0 == "report.json").unwrap().1).unwrap();
    let resumed: Vec<u64> = report["resumed_from_steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(resumed.len(), 1, "{report}");
    assert!(
        resumed[0] >= 6 && resumed[0].is_multiple_of(2),
        "resumed from {resumed:?}"
    );
    child.kill9();

    // The in-process reference.
    let spec = JobSpec::from_proto(&settings, 2).unwrap();
    let problem =
        dmqsm_coordinator::problem::build_problem(&spec, model.spec(), &m, Some(&k)).unwrap();
    let s = dmqsm_coordinator::runner::sampler_settings(&spec, 0);
    let want = dmqsm_common::driver::sample(&model, Arc::new(problem), &s, 2).unwrap();
    assert_eq!(chi.shape(), want.chi.data.shape());
    let same = chi
        .iter()
        .zip(want.chi.data.iter())
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "resumed output differs from the reference");
    r1.shutdown_background();
    r2.shutdown_background();
}
