//! `dmqsm-worker`: serve the DM-QSM score model over gRPC, train it, export it, and
//! report what libtorch sees.
//!
//! ```text
//! dmqsm-worker serve --listen 0.0.0.0:50061 --model model.pt [--device cuda:0]
//! dmqsm-worker serve --synthetic --latency-ms 20          # analytic model, simulated GPU
//! dmqsm-worker train --phantoms 16 --out runs/unet [--resume]
//! dmqsm-worker export --weights runs/unet/model_ema.safetensors --out model.pt
//! dmqsm-worker info --model model.pt | --remote http://host:50061
//! dmqsm-worker devices
//! ```

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use dmqsm_common::diffusion::analytic::GaussianPriorModel;
use dmqsm_common::diffusion::schedule::{ScheduleConfig, ScheduleKind};
use dmqsm_worker::batching::BatchConfig;
use dmqsm_worker::device::DeviceReport;
use dmqsm_worker::registration::RegistrationConfig;
use dmqsm_worker::train::optim::AdamWConfig;
use dmqsm_worker::train::{DataSource, TrainConfig, TrainOptions};
use dmqsm_worker::{
    DeviceSpec, EvalOptions, ServedModel, ServerConfig, SimulatedModel, TorchModel, UNetConfig,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// mimalloc, keeping freed pages ([`dmqsm_common::allocator`]): every batch decodes
/// into and encodes from buffers of 48³ patches, which would otherwise be faulted in
/// zeroed again. Rust-side allocations only; libtorch keeps its own allocator.
#[global_allocator]
static ALLOCATOR: dmqsm_common::allocator::Allocator = dmqsm_common::allocator::Allocator;

#[derive(Parser)]
#[command(
    name = "dmqsm-worker",
    version,
    about = "Serve and train the DM-QSM score model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model over gRPC (Worker service, health, reflection) until SIGINT/SIGTERM.
    Serve(Box<ServeArgs>),
    /// Print what libtorch sees: CUDA, devices, cuDNN, MKL/OpenMP, threads, version.
    Devices {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Trace native U-Net weights (safetensors + card) to TorchScript + card.
    Export(ExportArgs),
    /// Train the native U-Net by denoising score matching.
    Train(Box<TrainArgs>),
    /// Describe a model file, or ask a running worker.
    Info(InfoArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on. Beyond loopback only with a token (see --token-file).
    #[arg(long, default_value = "127.0.0.1:50061")]
    listen: String,
    /// Model: TorchScript (.pt) or native weights (.safetensors), card beside it.
    #[arg(long, conflicts_with = "synthetic")]
    model: Option<PathBuf>,
    /// Serve the analytic Gaussian-prior model instead (exact ε, no network).
    #[arg(long)]
    synthetic: bool,
    /// Synthetic model: patch edge P.
    #[arg(long, default_value_t = 48)]
    synthetic_patch_size: usize,
    /// Synthetic model: prior mean (model units).
    #[arg(long, default_value_t = 0.0)]
    synthetic_mean: f64,
    /// Synthetic model: prior standard deviation (model units).
    #[arg(long, default_value_t = 0.5)]
    synthetic_std: f64,
    /// Synthetic model: χ scale (χ_model = χ_ppm × scale).
    #[arg(long, default_value_t = 5.0)]
    synthetic_chi_scale: f64,
    /// Simulated latency per model call (ms), e.g. to mimic a GPU.
    #[arg(long, default_value_t = 0.0)]
    latency_ms: f64,
    /// Simulated latency per patch (ms).
    #[arg(long, default_value_t = 0.0)]
    latency_per_patch_ms: f64,
    /// Device: cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Largest batch per request and per model call (patches).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Longest wait for requests to coalesce with (ms).
    #[arg(long, default_value_t = 2.0)]
    max_queue_delay_ms: f64,
    /// Fixed micro-batch of model evaluation (default: 1 on CPU, 8 on CUDA). Workers
    /// that must agree bit for bit need the same value.
    #[arg(long)]
    eval_batch: Option<usize>,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<usize>,
    /// Run the model in bfloat16 (meant for GPUs).
    #[arg(long)]
    bf16_autocast: bool,
    /// Largest gRPC message (MiB), both directions.
    #[arg(long, default_value_t = 256)]
    max_message_mb: usize,
    /// Coordinator to register with, e.g. http://coordinator:50051.
    #[arg(long)]
    coordinator: Option<String>,
    /// Address the coordinator should dial (default http://<listen address>).
    #[arg(long)]
    advertise: Option<String>,
    /// Display name of this worker (default worker-<listen address>); the coordinator
    /// assigns the id, `w<N>-<name>`.
    #[arg(long)]
    worker_id: Option<String>,
    /// Stop when standard input closes (set by `dmqsm` for the workers it starts, so
    /// they end with it).
    #[arg(long)]
    exit_with_parent: bool,
    /// File holding this worker's bearer token (a `worker` token of the coordinator's
    /// table). Without it: the file named by $DMQSM_TOKEN_FILE, else $DMQSM_TOKEN. The
    /// worker presents it when registering and requires it of every caller.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// TLS certificate (PEM) of the worker's server; also its client certificate when
    /// the coordinator requires mTLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Accept only callers with a client certificate signed by this CA (mTLS).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// CA (PEM) that signed an https:// coordinator's certificate.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, no authentication:
    /// bind it where only monitoring reaches, e.g. 0.0.0.0:9401 in a pod). Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Args)]
struct ExportArgs {
    /// Native U-Net weights (.safetensors) with their card beside them.
    #[arg(long)]
    weights: PathBuf,
    /// TorchScript output (default: the weights path with .pt).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Device to trace on.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct InfoArgs {
    /// A model file (.pt or .safetensors, card beside it).
    #[arg(long, conflicts_with = "remote")]
    model: Option<PathBuf>,
    /// A running worker, e.g. http://127.0.0.1:50061.
    #[arg(long)]
    remote: Option<String>,
}

#[derive(Args)]
struct TrainArgs {
    /// Output directory (checkpoints, weights, TorchScript, cards, loss curve).
    #[arg(long)]
    out: PathBuf,
    /// Continue from the checkpoint in --out (same settings; --iterations may grow).
    #[arg(long)]
    resume: bool,
    /// Train on this many freshly generated synthetic phantoms.
    #[arg(long, conflicts_with = "chi")]
    phantoms: Option<usize>,
    /// Phantom matrix, e.g. 160,192,160.
    #[arg(long, value_delimiter = ',', default_values_t = [160usize, 192, 160])]
    phantom_shape: Vec<usize>,
    /// Phantom voxel size in mm.
    #[arg(long, value_delimiter = ',', default_values_t = [1.0f64, 1.0, 1.0])]
    phantom_voxel: Vec<f64>,
    /// Seed of the first phantom (default: --seed).
    #[arg(long)]
    phantom_seed: Option<u64>,
    /// χ maps (NIfTI, ppm).
    #[arg(long, num_args = 1..)]
    chi: Vec<PathBuf>,
    /// Brain masks matching --chi (optional).
    #[arg(long, num_args = 1..)]
    mask: Vec<PathBuf>,
    /// Patch edge P.
    #[arg(long, default_value_t = 48)]
    patch_size: usize,
    /// Patch grid stride.
    #[arg(long, default_value_t = 30)]
    stride: usize,
    /// Largest background fraction of a kept patch.
    #[arg(long, default_value_t = 0.8)]
    max_background: f64,
    /// U-Net widths per level.
    #[arg(long, value_delimiter = ',', default_values_t = [16usize, 32, 64])]
    widths: Vec<usize>,
    /// Residual blocks per level.
    #[arg(long, default_value_t = 1)]
    blocks: usize,
    /// No self-attention at the lowest resolution.
    #[arg(long)]
    no_attention: bool,
    /// GroupNorm groups (max).
    #[arg(long, default_value_t = 8)]
    groups: usize,
    /// Iterations in total.
    #[arg(long, default_value_t = 10_000)]
    iterations: u64,
    /// Patches per iteration.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Warm-up iterations.
    #[arg(long, default_value_t = 500)]
    warmup: u64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// EMA decay.
    #[arg(long, default_value_t = 0.999)]
    ema_decay: f64,
    /// Checkpoint interval (iterations).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: u64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// χ scale (χ_model = χ_ppm × scale).
    #[arg(long, default_value_t = 5.0)]
    chi_scale: f64,
    /// Voxel axis along B0.
    #[arg(long, default_value_t = 2)]
    b0_axis: usize,
    /// No augmentation.
    #[arg(long)]
    no_augment: bool,
    /// Schedule: linear or cosine.
    #[arg(long, default_value = "linear")]
    schedule: String,
    /// Training timesteps T.
    #[arg(long, default_value_t = 1000)]
    timesteps: usize,
    /// Linear schedule: first β.
    #[arg(long, default_value_t = 1e-4)]
    beta_start: f64,
    /// Linear schedule: last β.
    #[arg(long, default_value_t = 0.02)]
    beta_end: f64,
    /// Model id for the cards.
    #[arg(long, default_value = "dmqsm-unet")]
    model_id: String,
    /// Device.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch intra-op threads.
    #[arg(long)]
    threads: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

fn device(s: &str) -> anyhow::Result<DeviceSpec> {
    Ok(s.parse::<DeviceSpec>()?)
}

fn ms(v: f64, what: &str) -> anyhow::Result<Duration> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("{what} must be a non-negative number of milliseconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v / 1000.0))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let dev = device(&args.device)?;
    let served = if args.synthetic {
        let gauss = GaussianPriorModel::new(
            args.synthetic_mean,
            args.synthetic_std,
            args.synthetic_patch_size,
            args.synthetic_chi_scale,
            ScheduleConfig::default(),
        )?;
        ServedModel::simulated(SimulatedModel::new(
            Arc::new(gauss),
            ms(args.latency_ms, "--latency-ms")?,
            ms(args.latency_per_patch_ms, "--latency-per-patch-ms")?,
        ))
    } else {
        let Some(path) = &args.model else {
            bail!("give --model PATH (TorchScript or safetensors with its card) or --synthetic");
        };
        let mut options = EvalOptions::for_device(dev);
        if let Some(eb) = args.eval_batch {
            options.eval_batch = eb;
        }
        options.bf16 = args.bf16_autocast;
        options.threads = args.threads;
        if options.bf16 && !dev.is_cuda() {
            tracing::warn!("--bf16-autocast on the CPU is slow and meant for GPUs");
        }
        let model = TorchModel::load(path, dev, options)
            .with_context(|| format!("loading {}", path.display()))?;
        ServedModel::torch(model)
    };
    let token = dmqsm_proto::auth::read_token(args.token_file.as_deref())?;
    let tls = dmqsm_proto::transport::ServerTls::from_parts(
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.tls_client_ca.as_deref(),
    )?;
    let registration = args.coordinator.as_ref().map(|c| {
        let mut r = RegistrationConfig::new(c.clone(), args.advertise.clone().unwrap_or_default());
        r.tls = dmqsm_proto::transport::ClientTls {
            ca: args.tls_ca.clone(),
            cert: args.tls_cert.clone(),
            key: args.tls_key.clone(),
            domain: None,
        };
        r
    });
    let config = ServerConfig {
        worker_id: args.worker_id.clone(),
        batch: BatchConfig {
            max_batch: args.max_batch,
            max_queue_delay: ms(args.max_queue_delay_ms, "--max-queue-delay-ms")?,
        },
        max_message_bytes: args.max_message_mb.saturating_mul(1 << 20),
        threads: args.threads,
        registration,
        token: token.clone(),
        tls: tls.clone(),
        metrics_listen: args.metrics_listen,
        ..ServerConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let bound = listener.local_addr()?;
        dmqsm_proto::auth::require_loopback_without_auth(
            bound,
            token.is_some(),
            "--token-file FILE or $DMQSM_TOKEN",
        )?;
        // A worker that `dmqsm` started for itself (embedded mode) is loopback-only by
        // design; say it quietly there.
        if token.is_none() && args.exit_with_parent {
            tracing::debug!("authentication is off: listening on loopback {bound} only");
        } else if token.is_none() {
            tracing::warn!(
                "no token (--token-file, $DMQSM_TOKEN_FILE, $DMQSM_TOKEN): authentication is off, \
                 listening on loopback {bound} only"
            );
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        // Machine-readable line for the `dmqsm` processes that start workers on loopback
        // (embedded mode) and for scripts (port 0 picks a free port).
        println!("dmqsm-worker listening on {scheme}://{bound}");
        let parent_gone = parent_gone(args.exit_with_parent);
        let stop = async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = parent_gone => tracing::info!("standard input closed: the parent process is gone"),
            }
        };
        dmqsm_worker::serve(config, served, listener, stop).await?;
        Ok(())
    })
}

/// Resolves when standard input reaches its end, if `enabled` (never otherwise): a
/// parent that holds the other end of the pipe (`dmqsm run`, `demo`, `benchmark`) closes
/// it when it exits, also when it is killed, so its workers never outlive it.
async fn parent_gone(enabled: bool) {
    if !enabled {
        return std::future::pending().await;
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin();
        while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let _ = rx.await;
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    let dev = device(&args.device)?;
    let model = TorchModel::load_safetensors(&args.weights, dev, EvalOptions::for_device(dev))
        .with_context(|| format!("loading {}", args.weights.display()))?;
    let out = args
        .out
        .unwrap_or_else(|| args.weights.with_extension("pt"));
    let card = model.save_torchscript(&out)?;
    println!(
        "wrote {} and {} (model {}, {} parameters, weights sha256 {})",
        out.display(),
        dmqsm_worker::card::card_path_for(&out).display(),
        card.model_id,
        card.parameter_count,
        card.weights_sha256
    );
    Ok(())
}

fn info(args: InfoArgs) -> anyhow::Result<()> {
    if let Some(path) = args.model {
        let model = TorchModel::load(
            &path,
            DeviceSpec::Cpu,
            EvalOptions::for_device(DeviceSpec::Cpu),
        )
        .with_context(|| format!("loading {}", path.display()))?;
        println!("{}", serde_json::to_string_pretty(model.card())?);
        return Ok(());
    }
    let Some(url) = args.remote else {
        bail!("give --model PATH or --remote URL");
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // A worker that requires a token (its own: $DMQSM_TOKEN / $DMQSM_TOKEN_FILE, as
        // in its container) answers Info only with it.
        let token = dmqsm_proto::auth::read_token(None)?;
        let mut client = dmqsm_worker::connect(
            &url,
            dmqsm_proto::DEFAULT_MAX_MESSAGE_BYTES,
            token.as_deref(),
        )
        .await?;
        let info = client
            .info(dmqsm_proto::v1::InfoRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("Info on {url}: {}", s.message()))?
            .into_inner();
        println!("{info:#?}");
        Ok(())
    })
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let dev = device(&args.device)?;
    let data = if let Some(count) = args.phantoms {
        let [a, b, c] = args.phantom_shape[..] else {
            bail!("--phantom-shape needs three numbers");
        };
        let [x, y, z] = args.phantom_voxel[..] else {
            bail!("--phantom-voxel needs three numbers");
        };
        DataSource::Phantoms {
            count,
            shape: [a, b, c],
            voxel_size_mm: [x, y, z],
            seed: args.phantom_seed.unwrap_or(args.seed),
        }
    } else if !args.chi.is_empty() {
        DataSource::Nifti {
            chi: args.chi.clone(),
            masks: args.mask.clone(),
        }
    } else {
        bail!("give --phantoms N or --chi FILES");
    };
    let kind = match args.schedule.as_str() {
        "linear" => ScheduleKind::Linear,
        "cosine" => ScheduleKind::Cosine,
        other => bail!("--schedule {other}: use linear or cosine"),
    };
    let config = TrainConfig {
        model_id: args.model_id.clone(),
        data,
        unet: UNetConfig {
            widths: args.widths.clone(),
            blocks_per_level: args.blocks,
            attention: !args.no_attention,
            groups: args.groups,
        },
        patch_size: args.patch_size,
        stride: args.stride,
        max_background: args.max_background,
        schedule: ScheduleConfig {
            kind,
            timesteps: args.timesteps,
            beta_start: args.beta_start,
            beta_end: args.beta_end,
        },
        chi_scale: args.chi_scale,
        b0_axis: args.b0_axis,
        augment: !args.no_augment,
        iterations: args.iterations,
        batch_size: args.batch_size,
        learning_rate: args.lr,
        warmup: args.warmup,
        adamw: AdamWConfig {
            weight_decay: args.weight_decay,
            ..AdamWConfig::default()
        },
        grad_clip: args.grad_clip,
        ema_decay: args.ema_decay,
        checkpoint_every: args.checkpoint_every,
        seed: args.seed,
    };
    let options = TrainOptions {
        out_dir: args.out.clone(),
        resume: args.resume,
        device: dev,
        threads: args.threads,
        progress: !args.no_progress,
        stop_after: None,
    };
    let report = dmqsm_worker::train::train(&config, &options)?;
    let tail = &report.losses[report.losses.len().saturating_sub(20)..];
    println!(
        "trained {} iterations (from {}) on {} patches; mean loss of the last {}: {:.5}",
        report.iterations,
        report.resumed_from,
        report.patches,
        tail.len(),
        tail.iter().map(|&l| f64::from(l)).sum::<f64>() / tail.len().max(1) as f64
    );
    if let Some(ts) = report.torchscript {
        println!("TorchScript: {}", ts.display());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    dmqsm_common::allocator::retain_freed_pages();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => serve(*a),
        Command::Devices { json } => {
            let report = DeviceReport::collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
            Ok(())
        }
        Command::Export(a) => export(a),
        Command::Train(a) => train(*a),
        Command::Info(a) => info(a),
    }
}
