//! Trust on a shared cluster, over real gRPC on loopback with TLS: bearer tokens and
//! roles, job ownership, worker identity and addresses, spot checks against a rogue
//! worker with a valid token, and a coordinator stopped with SIGTERM (and killed with
//! SIGKILL) while clients watch, whose job resumes bit for bit. Every attack of the
//! issue "Trust on a shared cluster" is one assertion here.

use dmqsm_coordinator::client;
use dmqsm_proto::v1;
use dmqsm_tests::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;

fn code(e: tonic::Status) -> (Code, String) {
    (e.code(), e.message().to_string())
}

fn get(id: &str) -> v1::GetJobRequest {
    v1::GetJobRequest {
        job_id: id.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_roles_and_job_ownership_over_tls() {
    let pki = TestPki::new();
    let m = model();
    let cluster = Cluster::start_secure(
        &pki,
        vec![served(&m, Duration::ZERO), served(&m, Duration::ZERO)],
        |_| {},
    )
    .await;
    let req = request(
        settings(v1::Task::Dipinv, v1::Guidance::Approx, 4),
        "alice's",
    );

    // No token, an unknown token: UNAUTHENTICATED on every RPC.
    for token in [None, Some("nope-0123456789abcdef")] {
        let mut c = cluster.client_as(&pki, token).await;
        let (k, msg) = code(c.list_jobs(v1::ListJobsRequest {}).await.unwrap_err());
        assert_eq!(k, Code::Unauthenticated, "{msg}");
        let (k, _) = code(c.submit_job(req.clone()).await.unwrap_err());
        assert_eq!(k, Code::Unauthenticated);
        let (k, _) = code(
            c.heartbeat(v1::HeartbeatRequest {
                worker_id: "w0".into(),
                in_flight: 0,
                draining: true,
            })
            .await
            .unwrap_err(),
        );
        assert_eq!(k, Code::Unauthenticated);
    }
    // Plain TCP to the TLS port gets nowhere.
    let plain = cluster.url.replace("https://", "http://");
    if let Ok(mut c) = client::connect(&plain).await {
        assert!(c.list_jobs(v1::ListJobsRequest {}).await.is_err());
    }

    // A worker token may not submit or list jobs; a user token may not register,
    // heartbeat or drain.
    let mut w = cluster.client_as(&pki, Some(tokens::WORKER)).await;
    let (k, msg) = code(w.submit_job(req.clone()).await.unwrap_err());
    assert_eq!(k, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("user token"), "{msg}");
    let (k, _) = code(w.list_jobs(v1::ListJobsRequest {}).await.unwrap_err());
    assert_eq!(k, Code::PermissionDenied);
    let mut bob = cluster.client_as(&pki, Some(tokens::BOB)).await;
    let (k, _) = code(
        bob.register_worker(v1::RegisterWorkerRequest {
            address: "http://127.0.0.1:1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    assert_eq!(k, Code::PermissionDenied);
    let (k, _) = code(
        bob.heartbeat(v1::HeartbeatRequest {
            worker_id: "w0".into(),
            in_flight: 0,
            draining: true,
        })
        .await
        .unwrap_err(),
    );
    assert_eq!(k, Code::PermissionDenied);

    // Alice's job: Bob can neither see, watch, fetch nor cancel it; the admin sees it.
    let mut alice = cluster.client_as(&pki, Some(tokens::ALICE)).await;
    let id = alice
        .submit_job(req.clone())
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let bobs = bob
        .list_jobs(v1::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(bobs.is_empty(), "bob sees {bobs:?}");
    let (k, msg) = code(bob.get_job(get(&id)).await.unwrap_err());
    assert_eq!(k, Code::PermissionDenied);
    assert!(msg.contains("another user"), "{msg}");
    let (k, _) = code(
        bob.cancel_job(v1::CancelJobRequest { job_id: id.clone() })
            .await
            .unwrap_err(),
    );
    assert_eq!(k, Code::PermissionDenied);
    assert!(bob.watch_job(get(&id)).await.is_err());
    assert!(
        bob.fetch_result(v1::FetchResultRequest { job_id: id.clone() })
            .await
            .is_err()
    );
    let st = client::wait(&mut alice, &id, |_| {}).await.unwrap();
    assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
    assert_eq!(st.owner, "alice");
    let mut admin = cluster.client_as(&pki, Some(tokens::ADMIN)).await;
    let all = admin
        .list_jobs(v1::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].owner, "alice");
    // Auth and TLS change nothing in the bits.
    let (chi, _, _) = fetch_chi(&mut alice, &id).await;
    assert_bitwise(&chi, &reference(&m, &req, 2).0, "auth + TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_identity_and_addresses_cannot_be_hijacked() {
    let pki = TestPki::new();
    let m = model();
    let cluster = Cluster::start_secure(&pki, vec![], |_| {}).await;
    let honest = secure_worker(
        &pki,
        served(&m, Duration::ZERO),
        "gpu-a",
        tokens::WORKER,
        Some(&cluster.url),
    )
    .await;
    let mut id = String::new();
    for _ in 0..200 {
        let ws = cluster.coordinator.dispatcher().workers();
        if let Some(w) = ws.iter().find(|w| w.state == "ready") {
            id = w.worker_id.clone();
            assert_eq!(w.name, "gpu-a");
            assert_eq!(w.owner, "pool");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(id, "w1-gpu-a", "the coordinator assigns ids");

    // A second, valid worker identity tries to take the first worker over.
    let mut rogue = cluster.client_as(&pki, Some(tokens::ROGUE)).await;
    let (k, msg) = code(
        rogue
            .heartbeat(v1::HeartbeatRequest {
                worker_id: id.clone(),
                in_flight: 0,
                draining: true,
            })
            .await
            .unwrap_err(),
    );
    assert_eq!(k, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("another identity"), "{msg}");
    let (k, msg) = code(
        rogue
            .register_worker(v1::RegisterWorkerRequest {
                address: honest.url.clone(),
                worker_id: id.clone(),
                name: "evil".into(),
            })
            .await
            .unwrap_err(),
    );
    assert_eq!(k, Code::PermissionDenied, "{msg}");
    let (k, msg) = code(
        rogue
            .register_worker(v1::RegisterWorkerRequest {
                address: honest.url.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    assert_eq!(k, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("another worker identity"), "{msg}");
    // The coordinator dials nothing but http(s)://host:port, and says nothing about
    // what exists at an address of the caller's choosing.
    for address in [
        "unix:/etc/passwd",
        "unix:///var/run/docker.sock",
        "file:///etc",
    ] {
        let (k, msg) = code(
            rogue
                .register_worker(v1::RegisterWorkerRequest {
                    address: address.into(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        );
        assert_eq!(k, Code::InvalidArgument, "{address}: {msg}");
        assert!(!msg.to_lowercase().contains("no such file"), "{msg}");
    }
    // Another host's address is refused (the registration came from 127.0.0.1).
    let (k, msg) = code(
        rogue
            .register_worker(v1::RegisterWorkerRequest {
                address: "http://10.255.255.1:50061".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    assert_eq!(k, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("does not resolve to"), "{msg}");
    // A closed port and an open one that is no worker give the same answer.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut messages = Vec::new();
    for address in [format!("http://127.0.0.1:{closed}"), cluster.url.clone()] {
        let (k, msg) = code(
            rogue
                .register_worker(v1::RegisterWorkerRequest {
                    address: address.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        );
        assert_eq!(k, Code::FailedPrecondition, "{address}: {msg}");
        messages.push(msg.replace(&address, "ADDR"));
    }
    assert_eq!(messages[0], messages[1]);

    // The honest worker is still in service: a job runs on it.
    let ws = cluster.coordinator.dispatcher().workers();
    assert_eq!(ws.len(), 1, "{ws:?}");
    assert_eq!(ws[0].state, "ready");
    let mut alice = cluster.client_as(&pki, Some(tokens::ALICE)).await;
    let req = request(settings(v1::Task::Dipinv, v1::Guidance::Approx, 3), "j");
    let st = run_job(&mut alice, req).await;
    assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
    drop(honest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_worker_with_a_valid_token_is_caught_by_spot_checks() {
    let m = model();
    let req = request(settings(v1::Task::Dipinv, v1::Guidance::Approx, 12), "spot");
    let want = reference(&m, &req, 2).0;

    // Every batch checked: the rogue is outvoted on its first batch, untrusted, and the
    // result is the honest one, bit for bit.
    let workers = || {
        vec![
            served(&m, Duration::ZERO),
            rogue(&m, 0.7),
            served(&m, Duration::ZERO),
        ]
    };
    for fraction in [1.0, 0.3] {
        let cluster = Cluster::start(workers(), |c| c.spot_check_fraction = fraction).await;
        let mut c = cluster.client().await;
        let id = c.submit_job(req.clone()).await.unwrap().into_inner().job_id;
        let st = client::wait(&mut c, &id, |_| {}).await.unwrap();
        assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
        let (chi, _, _) = fetch_chi(&mut c, &id).await;
        assert_bitwise(&chi, &want, &format!("spot checks at {fraction}"));
        let ws = cluster.coordinator.dispatcher().workers();
        let rogue_state = ws
            .iter()
            .find(|w| w.address == cluster.workers[1].url)
            .map(|w| w.state.clone());
        assert_eq!(rogue_state.as_deref(), Some("untrusted"), "{ws:?}");
        assert!(
            ws.iter()
                .filter(|w| w.address != cluster.workers[1].url)
                .all(|w| w.state == "ready")
        );
    }

    // Without spot checks the same rogue corrupts the result silently: the check is
    // what catches it.
    let cluster = Cluster::start(workers(), |_| {}).await;
    let mut c = cluster.client().await;
    let st = run_job(&mut c, req.clone()).await;
    assert_eq!(st.state, v1::JobState::Succeeded as i32);
    let (chi, _, _) = fetch_chi(&mut c, &st.job_id).await;
    assert!(
        chi.iter()
            .zip(want.iter())
            .any(|(a, b)| a.to_bits() != b.to_bits()),
        "the rogue should have changed the result"
    );

    // One honest worker and one rogue: nobody can decide, so the job fails naming both.
    let cluster = Cluster::start(vec![served(&m, Duration::ZERO), rogue(&m, 0.7)], |c| {
        c.spot_check_fraction = 1.0
    })
    .await;
    let mut c = cluster.client().await;
    let st = run_job(&mut c, req).await;
    assert_eq!(st.state, v1::JobState::Failed as i32);
    assert!(st.error.contains("disagree"), "{}", st.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_loss_under_auth_and_tls_keeps_the_output_identical() {
    let pki = TestPki::new();
    let m = model();
    let mut cluster = Cluster::start_secure(
        &pki,
        vec![
            served(&m, Duration::from_millis(15)),
            served(&m, Duration::from_millis(15)),
        ],
        |_| {},
    )
    .await;
    let req = request(settings(v1::Task::Dipinv, v1::Guidance::Exact, 12), "loss");
    let mut alice = cluster.client_as(&pki, Some(tokens::ALICE)).await;
    let id = alice
        .submit_job(req.clone())
        .await
        .unwrap()
        .into_inner()
        .job_id;
    wait_for_step(&mut alice, &id, 3).await;
    cluster.workers[0].kill();
    let st = client::wait(&mut alice, &id, |_| {}).await.unwrap();
    assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
    let (chi, _, _) = fetch_chi(&mut alice, &id).await;
    assert_bitwise(
        &chi,
        &reference(&m, &req, 2).0,
        "worker loss with auth + TLS",
    );
}

/// `dmqsm serve` as a child process, killed with SIGKILL when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_serve(dmqsm: &std::path::Path, pki: &TestPki, port: u16, workers: &[String]) -> Serve {
    let dir = pki.dir.path();
    let worker_token = dir.join("worker-token");
    std::fs::write(&worker_token, tokens::WORKER).unwrap();
    let mut cmd = Command::new(dmqsm);
    cmd.arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("store"))
        .arg("--tokens")
        .arg(&pki.tokens)
        .arg("--tls-cert")
        .arg(&pki.cert)
        .arg("--tls-key")
        .arg(&pki.key)
        .arg("--worker-tls-ca")
        .arg(&pki.ca)
        .arg("--worker-tls-cert")
        .arg(&pki.client_cert)
        .arg("--worker-tls-key")
        .arg(&pki.client_key)
        .arg("--worker-token-file")
        .arg(&worker_token)
        .args(["--checkpoint-every", "4", "--heartbeat-ms", "100"])
        .args(["--coord-batch-size", "2", "--log", "warn"]);
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
    assert_eq!(
        line.trim(),
        format!("dmqsm coordinator listening on https://127.0.0.1:{port}")
    );
    Serve(child)
}

/// SIGTERM with two clients watching: the coordinator ends their streams, checkpoints
/// the running job and exits within 5 s; the watchers reconnect to the restarted
/// coordinator. Then SIGKILL mid-job and another restart. The job ends bitwise identical
/// to the in-process reference, with auth and TLS on throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_watchers_exits_fast_and_the_job_resumes_with_auth_and_tls() {
    let (dmqsm, _) = binaries();
    let pki = TestPki::new();
    let m = model();
    let mut workers = Vec::new();
    for i in 0..2 {
        workers.push(
            secure_worker(
                &pki,
                served(&m, Duration::from_millis(30)),
                &format!("w{i}"),
                tokens::WORKER,
                None,
            )
            .await,
        );
    }
    let urls: Vec<String> = workers.iter().map(|w| w.url.clone()).collect();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("https://127.0.0.1:{port}");
    let options = client::ClientOptions {
        token: Some(tokens::ALICE.to_string()),
        tls: pki.client_tls(),
    };
    let mut serve = start_serve(&dmqsm, &pki, port, &urls);
    let mut c = client::connect_with(&url, &options).await.unwrap();
    let req = request(
        settings(v1::Task::Dipinv, v1::Guidance::Exact, 30),
        "sigterm",
    );
    let id = c.submit_job(req.clone()).await.unwrap().into_inner().job_id;
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let watchers: Vec<_> = (0..2)
        .map(|_| {
            let (url, options, id) = (url.clone(), options.clone(), id.clone());
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut c = client::connect_with(&url, &options).await.unwrap();
                client::wait(&mut c, &id, |p| {
                    if let Some(s) = &p.status {
                        seen.fetch_max(s.step, std::sync::atomic::Ordering::SeqCst);
                    }
                })
                .await
            })
        })
        .collect();
    wait_for_step(&mut c, &id, 5).await;

    // SIGTERM: out within 5 s, streams closed, the job checkpointed where it stopped.
    let t = Instant::now();
    let pid = serve.0.id() as i32;
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = loop {
        if let Some(s) = serve.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stop_s = t.elapsed().as_secs_f64();
    let last_seen = seen.load(std::sync::atomic::Ordering::SeqCst);
    assert!(status.success(), "exit status after SIGTERM: {status}");
    eprintln!("SIGTERM to exit: {stop_s:.2} s");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        watchers.iter().all(|w| !w.is_finished()),
        "watchers must wait for the restart, not give up"
    );

    // Restart; the watchers reconnect. Then SIGKILL mid-job and restart again.
    serve = start_serve(&dmqsm, &pki, port, &urls);
    let mut c = client::connect_with(&url, &options).await.unwrap();
    assert!(
        last_seen >= 5,
        "watchers saw step {last_seen} before SIGTERM"
    );
    wait_for_step(&mut c, &id, last_seen + 8).await;
    drop(serve);
    let _serve = start_serve(&dmqsm, &pki, port, &urls);
    for w in watchers {
        let st = tokio::time::timeout(Duration::from_secs(120), w)
            .await
            .expect("a watcher must see the end")
            .unwrap()
            .unwrap();
        assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
    }
    let mut c = client::connect_with(&url, &options).await.unwrap();
    let (chi, _, report) = fetch_chi(&mut c, &id).await;
    let resumed: Vec<u64> = report["resumed_from_steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(resumed.len(), 2, "{report}");
    // Periodic checkpoints (every 4 steps) alone would resume below the last step the
    // watchers saw; SIGTERM checkpoints where it stopped.
    assert!(
        resumed[0] >= last_seen as u64,
        "resumed from {resumed:?}, watchers saw step {last_seen}"
    );
    assert_bitwise(&chi, &reference(&m, &req, 2).0, "SIGTERM + SIGKILL");
}
