//! `--metrics-listen` on both binaries: `dmqsm-worker serve --synthetic` and `dmqsm serve`
//! as child processes, each with its metrics endpoint on loopback; both answer
//! `GET /metrics` with their families, and the coordinator sees the worker ready.
//! (The counts after a job, and a real Prometheus scraping them, are in
//! `tests/tests/metrics.rs`.) Needs the `dmqsm-worker` binary (`cargo build --bins`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The rest of the line after `prefix`, from the first line of `out` that starts with it.
fn line_after(out: &mut BufReader<ChildStdout>, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "the process ended before printing {prefix:?}");
        if let Some(rest) = line.trim().strip_prefix(prefix) {
            return rest.to_string();
        }
    }
}

/// `GET /metrics` (HTTP/1.0), retried until the endpoint answers (at most 20 s).
fn scrape(addr: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut raw = String::new();
            s.read_to_string(&mut raw)?;
            Ok(raw)
        })();
        match attempt {
            Ok(raw) if raw.starts_with("HTTP/1.0 200") || raw.starts_with("HTTP/1.1 200") => {
                return raw;
            }
            other => assert!(Instant::now() < deadline, "no metrics at {addr}: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

#[test]
fn both_binaries_serve_metrics_with_metrics_listen() {
    let worker_bin = dmqsm_coordinator::local_workers::worker_binary().unwrap();
    let worker_metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut w = Guard(
        Command::new(worker_bin)
            .args([
                "serve",
                "--synthetic",
                "--synthetic-patch-size",
                "16",
                "--listen",
                "127.0.0.1:0",
                "--worker-id",
                "wm",
            ])
            .arg(format!("--metrics-listen={worker_metrics}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut w_out = BufReader::new(w.0.stdout.take().unwrap());
    let worker_url = line_after(&mut w_out, "dmqsm-worker listening on ");

    let dir = tempfile::tempdir().unwrap();
    let mut c = Guard(
        Command::new(env!("CARGO_BIN_EXE_dmqsm"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("store"))
            .args([
                "--worker",
                &worker_url,
                "--heartbeat-ms",
                "100",
                "--log",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut c_out = BufReader::new(c.0.stdout.take().unwrap());
    let url = line_after(&mut c_out, "dmqsm coordinator metrics on ");
    let addr: SocketAddr = url
        .strip_prefix("http://")
        .and_then(|u| u.strip_suffix("/metrics"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("bad metrics URL {url:?}"));

    let work = scrape(worker_metrics);
    assert!(
        work.contains("# TYPE dmqsm_worker_patches_total counter"),
        "{work}"
    );
    assert!(work.contains("\ndmqsm_worker_requests_total 0\n"), "{work}");
    assert!(
        work.contains(r#"dmqsm_worker_model_info{worker_id="wm","#),
        "{work}"
    );
    // The coordinator probes the static worker at once and then every 100 ms.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let coord = scrape(addr);
        assert!(coord.contains("# TYPE dmqsm_coordinator_step_duration_seconds histogram"));
        assert!(
            coord.contains("\ndmqsm_coordinator_jobs{state=\"queued\"} 0\n"),
            "{coord}"
        );
        if coord.contains("\ndmqsm_coordinator_workers{state=\"ready\"} 1\n")
            && coord.contains("dmqsm_coordinator_worker_in_flight_batches{worker=\"wm\"} 0\n")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never became ready:\n{coord}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(c);
    drop(w);
}
