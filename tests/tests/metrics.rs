//! Prometheus metrics end to end: a coordinator and a worker with `/metrics` endpoints on
//! loopback, a real job over gRPC, then
//! - the endpoints scraped directly: every counter equals what the job did (patches,
//!   batches, retries, steps, bytes each way, cross-checked between the two sides);
//! - a real Prometheus server (Debian's `prometheus` package, started here) scraping both
//!   every second: both targets `up`, and its queries return the same counts.
//!
//! Sizes are the shared fixtures' (24³, 16³ patches, overlap 8: 8 patches per round;
//! batches of 2 patches: 4 batches per round; approx guidance: one round per step).
//!
//! Without `/usr/bin/prometheus` (or `$DMQSM_PROMETHEUS_BIN`) the Prometheus test fails
//! and says how to install it: `apt-get install prometheus`, or
//! `deploy/prometheus/ci-install.sh` (which `.ci/run` calls).

use dmqsm_coordinator::Coordinator;
use dmqsm_proto::metrics_http::sample_value;
use dmqsm_proto::v1;
use dmqsm_tests::*;
use dmqsm_worker::{LocalWorker, ServerConfig, spawn_local_worker};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: u32 = 3;
const PATCHES_PER_ROUND: u64 = 8;
const BATCHES_PER_ROUND: u64 = 4;
/// Tensor payload bytes of one f32 patch of 16³.
const PATCH_BYTES: u64 = (PATCH * PATCH * PATCH * 4) as u64;

/// A loopback port that was free a moment ago (for servers that cannot report the port
/// they picked: Prometheus, and a worker's `--metrics-listen`).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A plain HTTP/1.0 GET (no chunked answers, the server closes): `(status, body)`.
fn http_get(addr: SocketAddr, target: &str, accept: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {target} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Scrapes `http://addr/metrics` (Prometheus text format) off the reactor.
async fn scrape(addr: SocketAddr) -> String {
    let (status, body) =
        tokio::task::spawn_blocking(move || http_get(addr, "/metrics", "text/plain"))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("scraping {addr}: {e}"));
    assert_eq!(status, 200, "{body}");
    body
}

fn value(text: &str, series: &str) -> f64 {
    sample_value(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// A worker `id` on loopback serving the analytic test model after `latency` per batch,
/// with (if `metrics`) its metrics endpoint on the returned address, started through
/// `ServerConfig::metrics_listen` (the `--metrics-listen` path).
async fn metrics_worker(id: &str, latency: Duration, metrics: bool) -> (LocalWorker, SocketAddr) {
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = ServerConfig {
        worker_id: Some(id.to_string()),
        metrics_listen: metrics.then_some(metrics_addr),
        ..ServerConfig::default()
    };
    let w = spawn_local_worker(served(&model(), latency), config)
        .await
        .unwrap();
    (w, metrics_addr)
}

/// A coordinator listing `workers`, served over gRPC, with its metrics endpoint on a port
/// it picks itself.
struct Coord {
    coordinator: Coordinator,
    url: String,
    metrics: dmqsm_proto::metrics_http::MetricsServer,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn coordinator(
    workers: &[&LocalWorker],
    tune: impl FnOnce(&mut dmqsm_coordinator::CoordinatorConfig),
) -> Coord {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    tune(&mut config);
    let urls: Vec<String> = workers.iter().map(|w| w.url()).collect();
    let coordinator = Coordinator::start(config, &urls).await.unwrap();
    let (addr, stop, _h) =
        dmqsm_coordinator::spawn_server(coordinator.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
    let metrics = dmqsm_coordinator::metrics_endpoint::spawn_metrics_server(
        "127.0.0.1:0".parse().unwrap(),
        &coordinator,
    )
    .await
    .unwrap();
    Coord {
        coordinator,
        url: format!("http://{addr}"),
        metrics,
        _stop: stop,
        _dir: dir,
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        self.coordinator.shutdown_now();
    }
}

async fn run(c: &Coord, label: &str) -> v1::JobStatus {
    let mut client = dmqsm_coordinator::client::connect(&c.url).await.unwrap();
    let req = request(
        settings(v1::Task::Dipinv, v1::Guidance::Approx, STEPS),
        label,
    );
    let st = run_job(&mut client, req).await;
    assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
    st
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoints_count_what_a_job_did_on_both_sides() {
    // w0 answers at once; w1 always answers after the 1 s batch timeout, so every batch
    // sent to it fails and is retried (on w0).
    let (w0, w0_metrics) = metrics_worker("w0", Duration::ZERO, true).await;
    let (w1, _) = metrics_worker("w1", Duration::from_millis(2500), false).await;
    let c = coordinator(&[&w0, &w1], |c| c.batch_timeout = Duration::from_secs(1)).await;
    let st = run(&c, "metrics-direct").await;
    assert!(st.retries > 0, "the slow worker was never tried");

    let coord = scrape(c.metrics.addr()).await;
    let work = scrape(w0_metrics).await;
    let batches = BATCHES_PER_ROUND * STEPS as u64;
    let patches = PATCHES_PER_ROUND * STEPS as u64;
    let retries = st.retries as f64;

    // Work done, as the coordinator saw it.
    assert_eq!(
        value(&coord, "dmqsm_coordinator_patches_total"),
        patches as f64
    );
    assert_eq!(
        value(&coord, "dmqsm_coordinator_batch_retries_total"),
        retries
    );
    assert_eq!(
        value(
            &coord,
            r#"dmqsm_coordinator_worker_batches_total{worker="w0",outcome="ok"}"#
        ),
        batches as f64
    );
    assert_eq!(
        value(
            &coord,
            r#"dmqsm_coordinator_worker_batches_total{worker="w1",outcome="failed"}"#
        ),
        retries
    );
    // Failed attempts held w1's slots too.
    assert!(
        value(
            &coord,
            r#"dmqsm_coordinator_worker_in_flight_seconds_total{worker="w1"}"#
        ) > 0.0
    );
    assert_eq!(
        value(&coord, "dmqsm_coordinator_step_duration_seconds_count"),
        STEPS as f64
    );
    // State at scrape time: the job finished, nothing queued, both workers known.
    assert_eq!(
        value(&coord, r#"dmqsm_coordinator_jobs{state="succeeded"}"#),
        1.0
    );
    assert_eq!(
        value(&coord, r#"dmqsm_coordinator_jobs{state="running"}"#),
        0.0
    );
    assert_eq!(value(&coord, "dmqsm_coordinator_pending_batches"), 0.0);
    let known: f64 = ["ready", "benched", "draining", "lost"]
        .iter()
        .map(|s| {
            value(
                &coord,
                &format!("dmqsm_coordinator_workers{{state=\"{s}\"}}"),
            )
        })
        .sum();
    assert_eq!(known, 2.0);
    assert!(coord.contains(r#"dmqsm_coordinator_worker_utilisation_ratio{worker="w0"}"#));

    // The worker served exactly the accepted batches, and the bytes agree both ways.
    assert_eq!(value(&work, "dmqsm_worker_requests_total"), batches as f64);
    assert_eq!(value(&work, "dmqsm_worker_failed_requests_total"), 0.0);
    assert_eq!(value(&work, "dmqsm_worker_patches_total"), patches as f64);
    assert_eq!(value(&work, "dmqsm_worker_in_flight_requests"), 0.0);
    assert!(value(&work, "dmqsm_worker_busy_seconds_total") > 0.0);
    assert_eq!(
        value(&work, "dmqsm_worker_batch_duration_seconds_count"),
        value(&work, "dmqsm_worker_batches_total")
    );
    let payload = (patches * PATCH_BYTES) as f64;
    assert_eq!(value(&work, "dmqsm_worker_received_bytes_total"), payload);
    assert_eq!(value(&work, "dmqsm_worker_sent_bytes_total"), payload);
    assert_eq!(
        value(&coord, "dmqsm_coordinator_wire_received_bytes_total"),
        payload
    );
    // Every attempt on w1 sent a 2-patch batch too.
    assert_eq!(
        value(&coord, "dmqsm_coordinator_wire_sent_bytes_total"),
        payload + retries * 2.0 * PATCH_BYTES as f64
    );
    assert!(
        work.contains(r#"dmqsm_worker_model_info{worker_id="w0","#),
        "{work}"
    );

    // OpenMetrics on request.
    let addr = c.metrics.addr();
    let (status, om) = tokio::task::spawn_blocking(move || {
        http_get(
            addr,
            "/metrics",
            "application/openmetrics-text; version=1.0.0",
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status, 200);
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
    assert_eq!(
        value(&om, "dmqsm_coordinator_patches_total"),
        patches as f64
    );

    drop(c);
    w0.shutdown().await.unwrap();
    // w1's model thread still works through the abandoned batches: leave it.
    drop(w1);
}

/// Where the Prometheus server is: `$DMQSM_PROMETHEUS_BIN`, else Debian's path.
fn prometheus_binary() -> PathBuf {
    let path = std::env::var_os("DMQSM_PROMETHEUS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/prometheus"));
    assert!(
        path.is_file(),
        "{} is missing: this test scrapes the endpoints with a real Prometheus server. \
         Install Debian's package with `sudo apt-get install -y prometheus` (or run \
         `deploy/prometheus/ci-install.sh`, as .ci/run does), or point \
         DMQSM_PROMETHEUS_BIN at a prometheus binary.",
        path.display()
    );
    path
}

/// A Prometheus server killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &std::path::Path, targets: &[(&str, SocketAddr)]) -> Self {
        let bin = prometheus_binary();
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.join("prometheus.log");
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        Self { child, addr, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The samples of an instant query to the Prometheus at `addr`, as `(labels, value)`;
/// `None` while it does not answer (starting up).
fn prom_query(addr: SocketAddr, expr: &str) -> Option<Vec<(serde_json::Value, f64)>> {
    let target = format!("/api/v1/query?query={}", percent_encode(expr));
    let (status, body) = http_get(addr, &target, "application/json").ok()?;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    let result = json.get("data")?.get("result")?.as_array()?;
    Some(
        result
            .iter()
            .filter_map(|r| {
                let v = r.get("value")?.get(1)?.as_str()?.parse().ok()?;
                Some((r.get("metric")?.clone(), v))
            })
            .collect(),
    )
}

/// Checks Prometheus' answers once: `(all as wanted, what it said)`.
fn prom_check(addr: SocketAddr, want: &[(&str, f64)]) -> (bool, String) {
    let up = prom_query(addr, "up").unwrap_or_default();
    let up_jobs: Vec<&str> = up
        .iter()
        .filter(|(_, v)| *v == 1.0)
        .filter_map(|(m, _)| m.get("job")?.as_str())
        .collect();
    let mut ok = up_jobs.contains(&"dmqsm-coordinator") && up_jobs.contains(&"dmqsm-worker");
    let mut seen = format!("up: {up:?}\n");
    for (expr, v) in want {
        let got = prom_query(addr, expr).unwrap_or_default();
        ok &= got.len() == 1 && got[0].1 == *v;
        seen.push_str(&format!("{expr}: {got:?} (want {v})\n"));
    }
    (ok, seen)
}

/// Percent-encodes a query-string value (everything but unreserved characters).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_server_scrapes_the_coordinator_and_the_worker() {
    let bin = prometheus_binary();
    let (w0, w0_metrics) = metrics_worker("w0", Duration::ZERO, true).await;
    let c = coordinator(&[&w0], |_| {}).await;
    run(&c, "metrics-prometheus").await;
    let coord = scrape(c.metrics.addr()).await;
    let work = scrape(w0_metrics).await;

    let dir = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(
        dir.path(),
        &[
            ("dmqsm-coordinator", c.metrics.addr()),
            ("dmqsm-worker", w0_metrics),
        ],
    );
    // What Prometheus must report: both targets up, and the values scraped directly.
    let want: Vec<(&str, f64)> = vec![
        (
            "dmqsm_coordinator_patches_total",
            value(&coord, "dmqsm_coordinator_patches_total"),
        ),
        (
            "dmqsm_worker_patches_total",
            value(&work, "dmqsm_worker_patches_total"),
        ),
        (
            "dmqsm_coordinator_step_duration_seconds_count",
            STEPS as f64,
        ),
        (r#"dmqsm_coordinator_jobs{state="succeeded"}"#, 1.0),
        (r#"dmqsm_coordinator_workers{state="ready"}"#, 1.0),
        (
            "dmqsm_coordinator_wire_sent_bytes_total",
            value(&work, "dmqsm_worker_received_bytes_total"),
        ),
    ];
    assert!(want[0].1 > 0.0 && want[1].1 > 0.0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (addr, w) = (prom.addr, want.clone());
        let (ok, seen) = tokio::task::spawn_blocking(move || prom_check(addr, &w))
            .await
            .unwrap();
        if ok {
            eprintln!("Prometheus answered:\n{seen}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus ({}) did not report the expected values within 60 s; its last \
             answers:\n{seen}\nits log:\n{}",
            bin.display(),
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(prom);
    drop(c);
    w0.shutdown().await.unwrap();
}
