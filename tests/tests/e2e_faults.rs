//! Fault tolerance end to end over loopback gRPC: a worker killed mid-job, a slow worker
//! past its timeout, cancel, bad submissions (each with a clear error while other jobs
//! finish untouched), a worker serving another model, and a job that loses every
//! worker. Every job that finishes must equal the in-process reference bit for bit
//! (tolerance: none).

use dmqsm_proto::v1;
use dmqsm_tests::*;
use std::time::Duration;

fn code_and_message(e: tonic::Status) -> (tonic::Code, String) {
    (e.code(), e.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_leaves_the_job_to_the_others_with_identical_output() {
    let m = model();
    // A simulated GPU: 15 ms per batch, so the job runs long enough to be interrupted.
    let mut cluster = Cluster::start(vec![served(&m, Duration::from_millis(15)); 3], |_| {}).await;
    let mut c = cluster.client().await;
    let req = request(
        settings(v1::Task::Dipinv, v1::Guidance::Exact, 12),
        "kill-worker",
    );
    let id = c.submit_job(req.clone()).await.unwrap().into_inner().job_id;
    wait_for_step(&mut c, &id, 3).await;
    cluster.workers[0].kill();
    let st = dmqsm_coordinator::client::wait(&mut c, &id, |_| {})
        .await
        .unwrap();
    assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
    let (chi, _, _) = fetch_chi(&mut c, &id).await;
    assert_bitwise(&chi, &reference(&m, &req, 2).0, "after a worker was killed");
    // The killed worker is reported lost.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let ws = cluster.coordinator.dispatcher().workers();
    let w0 = ws.iter().find(|w| w.worker_id == "w0").unwrap();
    assert_eq!(w0.state, "lost", "{ws:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_worker_past_its_timeout_is_bypassed_with_identical_output() {
    let m = model();
    let cluster = Cluster::start(
        vec![
            served(&m, Duration::from_secs(2)),
            served(&m, Duration::ZERO),
        ],
        |c| c.batch_timeout = Duration::from_millis(300),
    )
    .await;
    let mut c = cluster.client().await;
    let req = request(
        settings(v1::Task::Sr, v1::Guidance::Approx, 4),
        "slow-worker",
    );
    let st = run_job(&mut c, req.clone()).await;
    assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
    assert!(
        st.retries > 0,
        "the slow worker should have timed out at least once"
    );
    let (chi, _, report) = fetch_chi(&mut c, &st.job_id).await;
    assert_bitwise(&chi, &reference(&m, &req, 2).0, "with a slow worker");
    assert!(report["retries"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_job_and_leaves_others_untouched() {
    let m = model();
    let cluster = Cluster::start(vec![served(&m, Duration::from_millis(10)); 2], |_| {}).await;
    let mut c = cluster.client().await;
    let long = request(settings(v1::Task::Dipinv, v1::Guidance::Exact, 200), "long");
    let short = request(settings(v1::Task::Dipinv, v1::Guidance::Approx, 4), "short");
    let long_id = c.submit_job(long).await.unwrap().into_inner().job_id;
    let short_id = c
        .submit_job(short.clone())
        .await
        .unwrap()
        .into_inner()
        .job_id;
    wait_for_step(&mut c, &long_id, 1).await;
    let st = c
        .cancel_job(v1::CancelJobRequest {
            job_id: long_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.state, v1::JobState::Cancelled as i32);
    assert!(st.step < 200);
    let e = c
        .fetch_result(v1::FetchResultRequest {
            job_id: long_id.clone(),
        })
        .await
        .expect_err("no result for a cancelled job");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains(&long_id) && e.message().contains("cancelled"),
        "{e}"
    );
    let st = dmqsm_coordinator::client::wait(&mut c, &short_id, |_| {})
        .await
        .unwrap();
    assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
    let (chi, _, _) = fetch_chi(&mut c, &short_id).await;
    assert_bitwise(
        &chi,
        &reference(&m, &short, 2).0,
        "job next to a cancelled one",
    );
    // Unknown ids are named.
    let e = c
        .get_job(v1::GetJobRequest {
            job_id: "job-999999".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("job-999999"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submissions_get_clear_errors_while_another_job_finishes() {
    let m = model();
    let root = tempfile::tempdir().unwrap();
    let root_path = root.path().to_path_buf();
    let cluster = Cluster::start(vec![served(&m, Duration::from_millis(5))], move |c| {
        c.data_root = Some(root_path)
    })
    .await;
    let mut c = cluster.client().await;
    let good = request(settings(v1::Task::Dipinv, v1::Guidance::Exact, 6), "good");
    let good_id = c
        .submit_job(good.clone())
        .await
        .unwrap()
        .into_inner()
        .job_id;

    let base = || request(settings(v1::Task::Dipinv, v1::Guidance::Approx, 4), "bad");
    let nifti = |b: Vec<u8>| {
        Some(v1::VolumeInput {
            source: Some(v1::volume_input::Source::Nifti(b.into())),
        })
    };
    let vol = |data: ndarray::Array3<f32>| {
        dmqsm_common::nifti_io::write_nifti_bytes(&dmqsm_common::Volume::new(data, [1.0; 3]), false)
            .unwrap()
    };
    let mut malformed = base();
    malformed.measurement = nifti(b"this is not a NIfTI file at all, not even close".to_vec());
    let mut shapes = base();
    shapes.mask = nifti(vol(ndarray::Array3::ones((20, 24, 24))));
    let mut nan = base();
    let mut field = chi_phantom(N);
    field[[3, 4, 5]] = f32::NAN;
    nan.measurement = nifti(vol(field));
    let mut unknown = base();
    unknown.settings.as_mut().unwrap().model_id = "no-such-model".into();
    let mut outside = base();
    outside.measurement = Some(v1::VolumeInput {
        source: Some(v1::volume_input::Source::Path("../../etc/passwd".into())),
    });
    let mut no_task = base();
    no_task.settings.as_mut().unwrap().task = 0;
    let cases = [
        (malformed, "measurement"),
        (shapes, "mask has shape"),
        (nan, "non-finite"),
        (unknown, "unknown model \"no-such-model\""),
        (outside, "outside the data root"),
        (no_task, "settings.task"),
    ];
    for (req, needle) in cases {
        let (code, msg) = code_and_message(c.submit_job(req).await.unwrap_err());
        assert_eq!(code, tonic::Code::InvalidArgument, "{msg}");
        assert!(
            msg.contains(needle),
            "error {msg:?} should mention {needle:?}"
        );
    }
    // Nothing was stored for the rejected submissions.
    let jobs = c
        .list_jobs(v1::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1);
    let st = dmqsm_coordinator::client::wait(&mut c, &good_id, |_| {})
        .await
        .unwrap();
    assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
    let (chi, _, _) = fetch_chi(&mut c, &good_id).await;
    assert_bitwise(
        &chi,
        &reference(&m, &good, 2).0,
        "job next to bad submissions",
    );

    // Zero workers: refused at submission.
    let empty = Cluster::start(vec![], |_| {}).await;
    let mut c0 = empty.client().await;
    let (code, msg) = code_and_message(c0.submit_job(base()).await.unwrap_err());
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("zero workers"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_model_is_never_used() {
    let m = model();
    let other = analytic(0.3, 0.5);
    let cluster = Cluster::start(
        vec![served(&other, Duration::ZERO), served(&m, Duration::ZERO)],
        |_| {},
    )
    .await;
    let mut c = cluster.client().await;
    let mut s = settings(v1::Task::Dipinv, v1::Guidance::Exact, 4);
    use dmqsm_common::diffusion::model::ScoreModel;
    s.model_id = m.spec().model_id.clone();
    let req = request(s, "pinned");
    let st = run_job(&mut c, req.clone()).await;
    assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
    assert_eq!(st.model_hash, m.spec().content_hash);
    let (chi, _, _) = fetch_chi(&mut c, &st.job_id).await;
    assert_bitwise(&chi, &reference(&m, &req, 2).0, "pinned model");
    let ws = cluster.coordinator.dispatcher().workers();
    let w0 = ws.iter().find(|w| w.worker_id == "w0").unwrap();
    assert_eq!(w0.batches_done, 0, "the other model's worker was used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_loses_every_worker_fails_with_a_reason_instead_of_hanging() {
    let m = model();
    let mut cluster = Cluster::start(vec![served(&m, Duration::from_millis(20))], |c| {
        c.no_worker_grace = Duration::from_millis(800)
    })
    .await;
    let mut c = cluster.client().await;
    let req = request(
        settings(v1::Task::Dipinv, v1::Guidance::Exact, 100),
        "orphan",
    );
    let id = c.submit_job(req).await.unwrap().into_inner().job_id;
    wait_for_step(&mut c, &id, 1).await;
    cluster.workers[0].kill();
    let st = tokio::time::timeout(
        Duration::from_secs(30),
        dmqsm_coordinator::client::wait(&mut c, &id, |_| {}),
    )
    .await
    .expect("the job must end, not hang")
    .unwrap();
    assert_eq!(st.state, v1::JobState::Failed as i32);
    assert!(st.error.contains(&id), "{}", st.error);
    assert!(
        st.error.contains("w0") || st.error.contains("no usable worker"),
        "{}",
        st.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_workers_heartbeat_stream_progress_and_are_lost_when_killed() {
    let m = model();
    let cluster = Cluster::start(vec![], |_| {}).await;
    let mut workers = Vec::new();
    for i in 0..2 {
        workers.push(
            TestWorker::start_with(
                served(&m, Duration::from_millis(10)),
                &format!("reg{i}"),
                Some(&cluster.url),
            )
            .await,
        );
    }
    // Both register (RegisterWorker, then heartbeats at the coordinator's interval).
    for _ in 0..200 {
        let ws = cluster.coordinator.dispatcher().workers();
        if ws.len() == 2 && ws.iter().all(|w| w.state == "ready") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = cluster.client().await;
    let ws = c
        .list_workers(v1::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(ws.len(), 2, "{ws:?}");
    assert!(ws.iter().all(|w| w.state == "ready"), "{ws:?}");
    // The coordinator assigns the ids; the workers' own names are kept for display.
    let mut ids: Vec<&str> = ws.iter().map(|w| w.worker_id.as_str()).collect();
    ids.sort();
    assert!(
        ids == ["w1-reg0", "w2-reg1"] || ids == ["w1-reg1", "w2-reg0"],
        "{ws:?}"
    );
    assert!(ws.iter().any(|w| w.name == "reg0") && ws.iter().any(|w| w.name == "reg1"));

    // WatchJob streams progress with step counts, throughput and per-worker load.
    let req = request(
        settings(v1::Task::Dipinv, v1::Guidance::Exact, 10),
        "watched",
    );
    let id = c.submit_job(req.clone()).await.unwrap().into_inner().job_id;
    let mut reports = Vec::new();
    let st = dmqsm_coordinator::client::wait(&mut c, &id, |p| reports.push(p.clone()))
        .await
        .unwrap();
    assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
    let steps: Vec<u32> = reports
        .iter()
        .map(|p| p.status.as_ref().unwrap().step)
        .collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    assert!(reports.len() >= 3, "{} reports", reports.len());
    assert!(
        reports
            .iter()
            .any(|p| p.patches_per_second > 0.0 && p.eta_seconds > 0.0)
    );
    assert!(reports.iter().any(|p| p.workers.len() == 2));
    let (chi, _, _) = fetch_chi(&mut c, &id).await;
    assert_bitwise(&chi, &reference(&m, &req, 2).0, "registered workers");

    // A killed registered worker misses its heartbeats and is marked lost.
    workers[0].kill();
    let mut state = String::new();
    for _ in 0..100 {
        let ws = cluster.coordinator.dispatcher().workers();
        state = ws.iter().find(|w| w.name == "reg0").unwrap().state.clone();
        if state == "lost" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state, "lost");
}
