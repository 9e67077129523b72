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
    /// Memory budget in GB (10⁹ bytes): a job whose estimated peak memory exceeds it is
    /// refused before its inputs are decoded, and queued plus running jobs together hold
    /// at most this much (default: 3/4 of the machine's memory or cgroup limit).
    #[arg(long)]
    pub memory_budget_gb: Option<f64>,
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
    #[command(flatten)]
    pub tuning: TuningArgs,
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
    let config = args
        .tuning
        .config(args.data_dir.clone(), args.data_root.clone())?;
    let coordinator = Coordinator::start(config, &args.workers)
        .await
        .with_context(|| format!("starting the coordinator in {}", args.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener.local_addr()?;
    // Machine-readable line for scripts and tests (port 0 picks a free port).
    println!("dmqsm coordinator listening on http://{bound}");
    tracing::info!(data_dir = %args.data_dir.display(), "coordinator listening on {bound}");
    dmqsm_coordinator::serve(coordinator.clone(), listener, shutdown_signal()).await?;
    coordinator.shutdown();
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
    let _ = stop.send(());
    let _ = server.await;
    coordinator.shutdown();
    let _ = tokio::task::spawn_blocking(move || workers.shutdown()).await;
    result
}
