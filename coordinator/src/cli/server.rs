//! `dmqsm serve` (the coordinator service) and `dmqsm run` (embedded mode: coordinator
//! and N local `dmqsm-worker` processes on loopback, the same code path as a cluster).

use super::{Exit, JobArgs, outcome, progress_bar, show_progress, write_files};
use anyhow::Context;
use clap::{Args, ValueEnum};
use dmqsm_coordinator::client;
use dmqsm_coordinator::local_workers::{LocalModel, LocalWorkerOptions, LocalWorkers};
use dmqsm_coordinator::{Coordinator, CoordinatorConfig, spawn_server};
use dmqsm_proto::v1;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Wire element type of patch tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WireDtype {
    /// Exact (bitwise equal to the in-process reference).
    F32,
    /// Half the bytes; rounds patches and answers (not bitwise equal).
    Bf16,
}

/// Coordinator tunables (see `CoordinatorConfig` for what each does).
#[derive(Debug, Clone, Args)]
pub struct TuningArgs {
    /// Patches per worker batch (fixed per job at submission).
    #[arg(long = "coord-batch-size", default_value_t = 4)]
    pub coord_batch_size: usize,
    /// Batches in flight per worker.
    #[arg(long, default_value_t = 2)]
    pub max_in_flight: usize,
    /// Seconds before an unanswered batch is retried elsewhere.
    #[arg(long, default_value_t = 60.0)]
    pub batch_timeout_s: f64,
    /// Retries per batch before its job fails.
    #[arg(long, default_value_t = 4)]
    pub max_retries: u32,
    /// Heartbeat / probe interval in ms.
    #[arg(long, default_value_t = 2000)]
    pub heartbeat_ms: u64,
    /// Missed heartbeats before a worker is marked lost.
    #[arg(long, default_value_t = 3)]
    pub missed_heartbeats: u32,
    /// Seconds a job may wait with no usable worker before it fails.
    #[arg(long, default_value_t = 30.0)]
    pub no_worker_grace_s: f64,
    /// Checkpoint every N diffusion steps (0: never).
    #[arg(long, default_value_t = 5)]
    pub checkpoint_every: u32,
    /// Element type of patch tensors on the wire.
    #[arg(long, value_enum, default_value = "f32")]
    pub wire_dtype: WireDtype,
    /// Jobs sampling at once (others queue).
    #[arg(long, default_value_t = 8)]
    pub max_running_jobs: usize,
    /// Fraction of batches (0–1) recomputed on a second worker of the same device class
    /// and compared bitwise; a worker caught disagreeing with the majority is untrusted.
    #[arg(long, default_value_t = 0.0)]
    pub spot_check: f64,
    /// Memory budget in GB (10⁹ bytes): a job whose estimated peak memory exceeds it is
    /// refused before its inputs are decoded, and queued plus running jobs together hold
    /// at most this much (default: 3/4 of the machine's memory or cgroup limit).
    #[arg(long)]
    pub memory_budget_gb: Option<f64>,
    /// MiB of shared memory per batch in flight for workers on this host: their patch
    /// tensors then bypass the socket (0: every batch travels over gRPC; at most 1024).
    #[arg(long, default_value_t = 8)]
    pub shared_memory_mib: u64,
}

impl TuningArgs {
    /// A configuration with the store in `data_dir`.
    pub fn config(
        &self,
        data_dir: PathBuf,
        data_root: Option<PathBuf>,
    ) -> anyhow::Result<CoordinatorConfig> {
        let secs = |v: f64, name: &str| -> anyhow::Result<Duration> {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    Exit {
                        code: 2,
                        message: format!("--{name} {v} must be a positive number of seconds"),
                    }
                    .into()
                })
        };
        let mut c = CoordinatorConfig::new(data_dir);
        c.data_root = data_root;
        c.batch_size = self.coord_batch_size;
        c.max_in_flight_per_worker = self.max_in_flight;
        c.batch_timeout = secs(self.batch_timeout_s, "batch-timeout-s")?;
        c.max_retries = self.max_retries;
        c.heartbeat_interval = Duration::from_millis(self.heartbeat_ms.max(1));
        c.missed_heartbeats = self.missed_heartbeats;
        c.no_worker_grace = secs(self.no_worker_grace_s, "no-worker-grace-s")?;
        c.checkpoint_every = self.checkpoint_every;
        c.wire_dtype = match self.wire_dtype {
            WireDtype::F32 => v1::Dtype::F32,
            WireDtype::Bf16 => v1::Dtype::Bf16,
        };
        c.max_running_jobs = self.max_running_jobs;
        c.spot_check_fraction = self.spot_check;
        if self.shared_memory_mib > 1024 {
            return Err(Exit {
                code: 2,
                message: format!(
                    "--shared-memory-mib {} must be at most 1024",
                    self.shared_memory_mib
                ),
            }
            .into());
        }
        c.shared_memory_slot_bytes = self.shared_memory_mib << 20;
        if let Some(gb) = self.memory_budget_gb {
            if !(gb.is_finite() && gb > 0.0 && gb < 1e9) {
                return Err(Exit {
                    code: 2,
                    message: format!(
                        "--memory-budget-gb {gb} must be a positive number of gigabytes"
                    ),
                }
                .into());
            }
            c.memory_budget_bytes = ((gb * 1e9) as u64).max(1);
        }
        c.validate().map_err(|e| Exit {
            code: 2,
            message: e.to_string(),
        })?;
        Ok(c)
    }
}

/// `dmqsm serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Directory of the sled store (jobs, checkpoints, results).
    #[arg(long, default_value = "dmqsm-data")]
    pub data_dir: PathBuf,
    /// Directory under which path inputs of SubmitJob must lie (path inputs are refused
    /// without it; uploads always work).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Statically listed worker URL (repeatable), e.g. http://10.0.0.5:50061. Workers can
    /// also register themselves with `dmqsm-worker serve --coordinator`.
    #[arg(long = "worker")]
    pub workers: Vec<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, no authentication:
    /// bind it where only monitoring reaches, e.g. 0.0.0.0:9400 in a pod). Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// CPU threads of the coordinator: its numerics (a step's volume math, problems,
    /// results) and its async runtime (gRPC, cutting batches into shared memory) each get
    /// this many. Default: one per core. On a GPU node, leave the workers the rest.
    #[arg(long)]
    pub threads: Option<std::num::NonZeroUsize>,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

/// Which worker addresses `RegisterWorker` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AcceptWorkerAddress {
    /// The address must resolve to the host the registration came from.
    SameHost,
    /// Any http(s)://host:port (NAT, multi-homed nodes).
    Any,
}

/// Authentication and TLS of `dmqsm serve` (see the README's "Security" section).
#[derive(Debug, Clone, Args)]
pub struct SecurityArgs {
    /// Token table (`ROLE NAME TOKEN` per line; roles worker, user, admin). Without it
    /// authentication is off and the coordinator listens on loopback only.
    #[arg(long, env = "DMQSM_TOKENS_FILE")]
    pub tokens: Option<PathBuf>,
    /// TLS certificate (PEM) of the coordinator's server.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS key (PEM) of the coordinator's server.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mTLS) from every caller.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// CA (PEM) that signed the certificates of https:// workers.
    #[arg(long)]
    pub worker_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) the coordinator presents to workers that require mTLS.
    #[arg(long, requires = "worker_tls_key")]
    pub worker_tls_cert: Option<PathBuf>,
    /// Key of --worker-tls-cert.
    #[arg(long, requires = "worker_tls_cert")]
    pub worker_tls_key: Option<PathBuf>,
    /// File with the token presented to statically listed workers (--worker).
    #[arg(long)]
    pub worker_token_file: Option<PathBuf>,
    /// Which addresses registering workers may ask to be dialled at.
    #[arg(long, value_enum, default_value = "same-host")]
    pub accept_worker_address: AcceptWorkerAddress,
}

impl SecurityArgs {
    /// The coordinator's security settings (usage error for unreadable or bad files).
    pub fn config(&self) -> anyhow::Result<dmqsm_coordinator::config::SecurityConfig> {
        use dmqsm_coordinator::config::{SecurityConfig, WorkerAddressPolicy};
        use dmqsm_proto::auth::{Authenticator, TokenTable};
        use dmqsm_proto::transport::{ClientTls, ServerTls};
        let usage = |m: String| -> anyhow::Error {
            Exit {
                code: 2,
                message: m,
            }
            .into()
        };
        let table = self
            .tokens
            .as_deref()
            .map(TokenTable::load)
            .transpose()
            .map_err(|e| usage(e.to_string()))?;
        let tls = ServerTls::from_parts(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
        )
        .map_err(|e| usage(e.to_string()))?;
        if let Some(t) = &tls {
            t.load().map_err(|e| usage(e.to_string()))?;
        }
        let static_worker_token = match &self.worker_token_file {
            Some(f) => dmqsm_proto::auth::read_token(Some(f)).map_err(|e| usage(e.to_string()))?,
            None => None,
        };
        Ok(SecurityConfig {
            auth: Authenticator::new(table),
            tls,
            worker_tls: ClientTls {
                ca: self.worker_tls_ca.clone(),
                cert: self.worker_tls_cert.clone(),
                key: self.worker_tls_key.clone(),
                domain: None,
            },
            static_worker_token,
            worker_addresses: match self.accept_worker_address {
                AcceptWorkerAddress::SameHost => WorkerAddressPolicy::SameHost,
                AcceptWorkerAddress::Any => WorkerAddressPolicy::Any,
            },
        })
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `dmqsm serve`: runs until SIGINT / SIGTERM. Unfinished jobs resume on the next start.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = args
        .tuning
        .config(args.data_dir.clone(), args.data_root.clone())?;
    config.security = args.security.config()?;
    config.compute_threads = args.threads.map(std::num::NonZeroUsize::get);
    let authenticated = config.security.auth.enabled();
    dmqsm_proto::auth::require_loopback_without_auth(args.listen, authenticated, "--tokens FILE")
        .map_err(|e| Exit {
        code: 2,
        message: e.to_string(),
    })?;
    let scheme = if config.security.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let coordinator = Coordinator::start(config, &args.workers)
        .await
        .with_context(|| format!("starting the coordinator in {}", args.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener.local_addr()?;
    if !authenticated {
        tracing::warn!(
            "authentication is off (no --tokens): listening on loopback {bound} only; every \
             local caller may submit, see and cancel every job"
        );
    }
    // Machine-readable line for scripts and tests (port 0 picks a free port).
    println!("dmqsm coordinator listening on {scheme}://{bound}");
    tracing::info!(data_dir = %args.data_dir.display(), authenticated, "coordinator listening on {bound}");
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let m = dmqsm_coordinator::metrics_endpoint::spawn_metrics_server(addr, &coordinator)
                .await?;
            println!("dmqsm coordinator metrics on {}", m.url());
            Some(m)
        }
        None => None,
    };
    let stopping = coordinator.clone();
    let signal = async move {
        shutdown_signal().await;
        tracing::info!("shutting down: closing streams, checkpointing running jobs");
        stopping.begin_shutdown();
    };
    dmqsm_coordinator::serve(coordinator.clone(), listener, signal).await?;
    coordinator.shutdown().await;
    if let Some(m) = metrics {
        match tokio::time::timeout(Duration::from_secs(5), m.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("metrics endpoint: {e}"),
            Err(_) => tracing::warn!("metrics endpoint did not stop within 5 s"),
        }
    }
    tracing::info!("coordinator stopped; unfinished jobs resume on the next start");
    Ok(())
}

/// `dmqsm run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Local workers to start.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    #[command(flatten)]
    pub local: LocalModelArgs,
    /// libtorch threads per worker.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Directory of the sled store.
    #[arg(long, default_value = "dmqsm-data")]
    pub data_dir: PathBuf,
    /// Where the result files go.
    #[arg(long, short, default_value = "dmqsm-out")]
    pub out: PathBuf,
    /// Also serve the coordinator API on this address (e.g. for `dmqsm watch`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

/// The model of local workers (`run`, `cohort --local-workers`): one set of flags, one
/// meaning.
#[derive(Debug, Clone, Args)]
pub struct LocalModelArgs {
    /// Model: TorchScript file (card beside it) or U-Net safetensors (card beside it).
    #[arg(long, conflicts_with = "analytic")]
    pub model: Option<PathBuf>,
    /// Use the analytic Gaussian-prior model N(mean, std²) (model units) instead of a
    /// network: fast, for smoke tests. Format: MEAN,STD.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub analytic: Option<Vec<f64>>,
    /// Patch size of the analytic model.
    #[arg(long, default_value_t = 48)]
    pub analytic_patch: usize,
    /// χ scale of the analytic model (χ_model = χ_ppm × scale).
    #[arg(long, default_value_t = 10.0)]
    pub analytic_scale: f64,
    /// Device of the local workers (cpu, cuda:N).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl LocalModelArgs {
    /// The model the local workers serve (usage error without `--model` or `--analytic`).
    pub fn local_model(&self) -> anyhow::Result<LocalModel> {
        if let Some(a) = &self.analytic {
            let [mean, std] = a[..] else {
                return Err(Exit {
                    code: 2,
                    message: format!("--analytic needs MEAN,STD, got {} values", a.len()),
                }
                .into());
            };
            return Ok(LocalModel::Analytic {
                mean,
                std,
                patch_size: self.analytic_patch,
                chi_scale: self.analytic_scale,
            });
        }
        let Some(path) = &self.model else {
            return Err(Exit {
                code: 2,
                message: "give a model with --model PATH (TorchScript or safetensors with its \
                          card) or --analytic MEAN,STD"
                    .into(),
            }
            .into());
        };
        Ok(LocalModel::Torch {
            path: path.clone(),
            device: self.device.clone(),
        })
    }
}

/// Starts `count` local workers (blocking work moved off the runtime).
pub async fn start_local_workers(
    model: LocalModel,
    options: LocalWorkerOptions,
    count: usize,
) -> anyhow::Result<LocalWorkers> {
    tokio::task::spawn_blocking(move || LocalWorkers::start(&model, &options, count))
        .await
        .context("starting local workers")?
        .map_err(|e| {
            Exit {
                code: 2,
                message: e.to_string(),
            }
            .into()
        })
}

/// `dmqsm run`: one job on a coordinator with local workers on loopback.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.workers == 0 {
        return Err(Exit {
            code: 2,
            message: "--workers must be at least 1".into(),
        }
        .into());
    }
    let model = args.local.local_model()?;
    let options = LocalWorkerOptions {
        threads: args.threads,
        ..LocalWorkerOptions::default()
    };
    let workers = start_local_workers(model, options, args.workers).await?;
    let urls = workers.urls();
    let config = args.tuning.config(args.data_dir.clone(), None)?;
    let coordinator = Coordinator::start(config, &urls)
        .await
        .with_context(|| format!("starting the coordinator in {}", args.data_dir.display()))?;
    let addr = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let (bound, stop, server) = spawn_server(coordinator.clone(), addr).await?;
    if args.listen.is_some() {
        eprintln!("coordinator API on http://{bound}");
    }
    let url = format!("http://{bound}");
    let result = async {
        let mut c = client::connect(&url)
            .await
            .map_err(super::exit_from_client)?;
        let job_id = c
            .submit_job(args.job.request(false)?)
            .await
            .map_err(|s| super::exit_from_client(s.into()))?
            .into_inner()
            .job_id;
        println!("{job_id}");
        let pb = progress_bar(&job_id);
        let fin = client::wait(&mut c, &job_id, |p| show_progress(&pb, p))
            .await
            .map_err(super::exit_from_client)?;
        pb.finish_and_clear();
        outcome(&fin)?;
        let files = client::fetch(&mut c, &job_id)
            .await
            .map_err(super::exit_from_client)?;
        write_files(&args.out, &files)?;
        anyhow::Ok(())
    }
    .await;
    coordinator.begin_shutdown();
    let _ = stop.send(());
    let _ = server.await;
    coordinator.shutdown().await;
    let _ = tokio::task::spawn_blocking(move || workers.shutdown()).await;
    result
}
