//! Embedded mode's workers: `dmqsm-worker serve` processes on loopback, started the way a
//! cluster starts them, so `dmqsm run`, `demo`, `cohort --local-workers` and `benchmark`
//! exercise the same gRPC path as a cluster and the `dmqsm` binary never links libtorch.
//!
//! The worker binary is found beside the running `dmqsm` (both are built and installed
//! together), or at `$DMQSM_WORKER_BIN`. Each worker listens on `127.0.0.1:0` and prints
//! its URL on its first line of standard output; it is started with
//! `--exit-with-parent`, so it stops when its standard input, held by this process, closes:
//! at [`LocalWorkers::shutdown`], on drop, and also when this process is killed.

use crate::error::{CoordinatorError, Result};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Environment variable naming the `dmqsm-worker` binary (default: beside `dmqsm`).
pub const WORKER_BIN_ENV: &str = "DMQSM_WORKER_BIN";

/// How long a worker may take to load its model and listen.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);

/// The model local workers serve.
#[derive(Debug, Clone, PartialEq)]
pub enum LocalModel {
    /// A TorchScript (`.pt`) or native U-Net (`.safetensors`) file with its card beside it.
    Torch {
        /// The model file.
        path: PathBuf,
        /// `cpu` or `cuda:N`.
        device: String,
    },
    /// The analytic Gaussian-prior model N(mean, std²) in model units (exact ε, no
    /// network): smoke tests and plumbing checks.
    Analytic {
        /// Prior mean (model units).
        mean: f64,
        /// Prior standard deviation (model units).
        std: f64,
        /// Patch edge P (voxels).
        patch_size: usize,
        /// χ_model = χ_ppm × `chi_scale`.
        chi_scale: f64,
    },
}

/// Settings of every local worker besides its model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LocalWorkerOptions {
    /// libtorch intra-op threads per worker (`None`: libtorch's choice).
    pub threads: Option<usize>,
    /// Largest batch a worker accepts (`None`: the worker's default, 16 patches).
    pub max_batch: Option<usize>,
    /// Analytic model only: a simulated device latency per model call, spent sleeping
    /// (no CPU), to model a GPU in benchmarks (`--latency-ms`).
    pub latency_per_batch: Duration,
    /// Analytic model only: simulated latency per patch (`--latency-per-patch-ms`).
    pub latency_per_patch: Duration,
}

/// The `dmqsm-worker` binary: `$DMQSM_WORKER_BIN`, else beside the running executable
/// (for test executables in `target/*/deps`, the directory above).
pub fn worker_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(WORKER_BIN_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(CoordinatorError::Config(format!(
                "{WORKER_BIN_ENV}={} is not a file",
                p.display()
            )))
        };
    }
    let exe = std::env::current_exe()
        .map_err(|e| CoordinatorError::Config(format!("cannot locate this executable: {e}")))?;
    let name = format!("dmqsm-worker{}", std::env::consts::EXE_SUFFIX);
    let dirs = exe
        .parent()
        .into_iter()
        .chain(exe.parent().and_then(|d| d.parent()));
    let candidates: Vec<PathBuf> = dirs.map(|d| d.join(&name)).collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            CoordinatorError::Config(format!(
                "local workers need the {name} binary, which is not beside {} (looked at {}); \
             build it (`cargo build --release --bin dmqsm-worker`) or set {WORKER_BIN_ENV}",
                exe.display(),
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

struct Process {
    child: Child,
    /// Held open; closing it tells the worker to stop.
    stdin: Option<ChildStdin>,
    url: String,
}

/// Running local worker processes (see the module docs).
pub struct LocalWorkers {
    processes: Vec<Process>,
}

impl std::fmt::Debug for LocalWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalWorkers")
            .field("urls", &self.urls())
            .finish()
    }
}

impl LocalWorkers {
    /// Starts `count` workers serving `model` and waits until each listens. They start in
    /// parallel (each loads libtorch and the model once). Blocking; from async code call
    /// it through `tokio::task::spawn_blocking`.
    pub fn start(model: &LocalModel, options: &LocalWorkerOptions, count: usize) -> Result<Self> {
        if count == 0 {
            return Err(CoordinatorError::Config(
                "at least one local worker is needed".into(),
            ));
        }
        let bin = worker_binary()?;
        let mut workers = LocalWorkers {
            processes: Vec::with_capacity(count),
        };
        let mut pending = Vec::with_capacity(count);
        for i in 0..count {
            let mut cmd = Command::new(&bin);
            cmd.args(["serve", "--listen", "127.0.0.1:0", "--exit-with-parent"])
                .args(["--worker-id", &format!("local-{i}")]);
            match model {
                LocalModel::Torch { path, device } => {
                    cmd.arg("--model").arg(path).args(["--device", device]);
                }
                LocalModel::Analytic {
                    mean,
                    std,
                    patch_size,
                    chi_scale,
                } => {
                    cmd.arg("--synthetic")
                        .arg(format!("--synthetic-mean={mean}"))
                        .arg(format!("--synthetic-std={std}"))
                        .arg(format!("--synthetic-patch-size={patch_size}"))
                        .arg(format!("--synthetic-chi-scale={chi_scale}"))
                        .arg(format!(
                            "--latency-ms={}",
                            options.latency_per_batch.as_secs_f64() * 1e3
                        ))
                        .arg(format!(
                            "--latency-per-patch-ms={}",
                            options.latency_per_patch.as_secs_f64() * 1e3
                        ));
                }
            }
            if let Some(t) = options.threads {
                cmd.args(["--threads", &t.to_string()]);
            }
            if let Some(b) = options.max_batch {
                cmd.args(["--max-batch", &b.to_string()]);
            }
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "warn");
            }
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = cmd.spawn().map_err(|e| {
                CoordinatorError::Config(format!("starting {}: {e}", bin.display()))
            })?;
            let stdin = child.stdin.take();
            let (tx, rx) = mpsc::channel::<String>();
            if let Some(out) = child.stdout.take() {
                std::thread::spawn(move || {
                    let mut sent = false;
                    // Keep reading after the first line so the pipe never fills.
                    for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                        if !sent && let Some(url) = line.strip_prefix("dmqsm-worker listening on ")
                        {
                            sent = tx.send(url.trim().to_string()).is_ok();
                        }
                    }
                });
            }
            workers.processes.push(Process {
                child,
                stdin,
                url: String::new(),
            });
            pending.push(rx);
        }
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for (i, rx) in pending.into_iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(url) => workers.processes[i].url = url,
                Err(e) => {
                    let p = &mut workers.processes[i];
                    let why = match p.child.try_wait() {
                        Ok(Some(status)) => {
                            format!("exited with {status} (its messages are above)")
                        }
                        _ if matches!(e, mpsc::RecvTimeoutError::Timeout) => {
                            format!("did not listen within {} s", STARTUP_TIMEOUT.as_secs())
                        }
                        _ => "closed its output without listening".to_string(),
                    };
                    return Err(CoordinatorError::Config(format!(
                        "local worker local-{i} ({}) {why}",
                        bin.display()
                    )));
                }
            }
        }
        tracing::info!(workers = count, "local workers listening");
        Ok(workers)
    }

    /// The workers' URLs (`http://127.0.0.1:PORT`), in start order.
    pub fn urls(&self) -> Vec<String> {
        self.processes.iter().map(|p| p.url.clone()).collect()
    }

    /// The workers' process ids, in the order of [`LocalWorkers::urls`].
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(|p| p.child.id()).collect()
    }

    /// Stops the workers: closes their standard input (they drain and exit), then kills
    /// any still running after five seconds. Blocking.
    pub fn shutdown(mut self) {
        self.stop(Duration::from_secs(5));
    }

    fn stop(&mut self, grace: Duration) {
        for p in &mut self.processes {
            p.stdin.take();
        }
        let deadline = Instant::now() + grace;
        for p in &mut self.processes {
            loop {
                match p.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = p.child.kill();
                        let _ = p.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        self.processes.clear();
    }
}

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}
