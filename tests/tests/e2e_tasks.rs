//! End-to-end: every task in every guidance mode (DPS exact and approx, DDS prox) through
//! a coordinator and workers over
//! real gRPC on loopback equals the in-process reference driver bit for bit, with 1
//! worker and with 3. Tolerance: none (bitwise). The model is the analytic Gaussian
//! prior (exact, elementwise, so batching and worker assignment cannot change a bit;
//! determinism of the coordinator path is what is tested).

use dmqsm_proto::v1;
use dmqsm_tests::*;
use std::time::Duration;

const STEPS: u32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_tasks_in_all_guidance_modes_match_the_reference_with_1_and_3_workers() {
    let m = model();
    let one = Cluster::start(vec![served(&m, Duration::ZERO)], |_| {}).await;
    let three = Cluster::start((0..3).map(|_| served(&m, Duration::ZERO)).collect(), |_| {}).await;
    let mut cases = Vec::new();
    for task in [
        v1::Task::Dipinv,
        v1::Task::Sr,
        v1::Task::SrDipinv,
        v1::Task::DipinvPhysics,
        v1::Task::SrDipinvPhysics,
    ] {
        for guidance in [
            v1::Guidance::Exact,
            v1::Guidance::Approx,
            v1::Guidance::Prox,
        ] {
            cases.push(request(
                settings(task, guidance, STEPS),
                &format!("{task:?}-{guidance:?}"),
            ));
        }
    }
    // Submit everything to both clusters at once (many concurrent jobs), then check.
    let mut c1 = one.client().await;
    let mut c3 = three.client().await;
    let mut ids = Vec::new();
    for req in &cases {
        let a = c1
            .submit_job(req.clone())
            .await
            .unwrap()
            .into_inner()
            .job_id;
        let b = c3
            .submit_job(req.clone())
            .await
            .unwrap()
            .into_inner()
            .job_id;
        ids.push((a, b));
    }
    for (req, (a, b)) in cases.iter().zip(&ids) {
        let want = reference(&m, req, 2).0;
        for (c, id, n) in [(&mut c1, a, 1), (&mut c3, b, 3)] {
            let st = dmqsm_coordinator::client::wait(c, id, |_| {})
                .await
                .unwrap();
            assert_eq!(
                st.state,
                v1::JobState::Succeeded as i32,
                "{} on {n} workers: {}",
                req.label,
                st.error
            );
            let (chi, std, report) = fetch_chi(c, id).await;
            assert!(std.is_none());
            assert_bitwise(&chi, &want, &format!("{} on {n} workers", req.label));
            assert_eq!(report["model"]["content_hash"], m_hash(&m));
            let used = report["workers_used"].as_object().unwrap();
            assert!(!used.is_empty() && used.len() <= n, "{used:?}");
        }
    }
    // With 3 workers every worker took part.
    let ws = three.coordinator.dispatcher().workers();
    assert_eq!(ws.len(), 3);
    assert!(ws.iter().all(|w| w.batches_done > 0), "{ws:?}");
}

fn m_hash(m: &dmqsm_common::diffusion::analytic::GaussianPriorModel) -> String {
    use dmqsm_common::diffusion::model::ScoreModel;
    m.spec().content_hash.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posterior_samples_give_the_reference_mean_and_std_and_results_stay_fetchable() {
    let m = model();
    let cluster = Cluster::start(vec![served(&m, Duration::ZERO); 2], |_| {}).await;
    let mut s = settings(v1::Task::Dipinv, v1::Guidance::Approx, STEPS);
    s.samples = Some(3);
    s.eta = 1.0;
    let req = request(s, "posterior");
    let mut c = cluster.client().await;
    let st = run_job(&mut c, req.clone()).await;
    assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
    assert_eq!(st.sample, 3);
    let (chi, std, report) = fetch_chi(&mut c, &st.job_id).await;
    let (want_mean, want_std) = reference(&m, &req, 2);
    assert_bitwise(&chi, &want_mean, "posterior mean");
    assert_bitwise(
        &std.expect("std.nii.gz"),
        &want_std.unwrap(),
        "posterior std",
    );
    assert_eq!(report["samples"].as_array().unwrap().len(), 3);
    // Checkpoints are gone once the job is done; the results stay listed and fetchable.
    assert_eq!(cluster.coordinator.store().checkpoint_bytes(), 0);
    let listed = c
        .list_jobs(v1::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(listed.iter().any(|j| j.job_id == st.job_id));
    let files = dmqsm_coordinator::client::fetch(&mut c, &st.job_id)
        .await
        .unwrap();
    let names: Vec<_> = files.iter().map(|f| f.0.as_str()).collect();
    assert!(
        names.contains(&"report.json") && names.contains(&"std.nii.gz"),
        "{names:?}"
    );
}
