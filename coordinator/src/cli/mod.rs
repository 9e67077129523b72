//! The `dmqsm` client and server subcommands: `serve`, `submit`, `status`, `watch`,
//! `cancel`, `fetch`, `workers` and `run` (embedded mode).

use anyhow::Context;
use clap::Args;
use dmqsm_common::diffusion::sampler::Guidance;
use dmqsm_common::tasks::Task;
use dmqsm_coordinator::client::{self, ClientError};
use dmqsm_coordinator::job::JobState;
use dmqsm_proto::{convert, v1};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod benchmark;
pub mod cohort;
pub mod physics;
pub mod server;

#[cfg(test)]
#[path = "defaults_tests.rs"]
mod defaults_tests;

/// Exit codes of `dmqsm`, shown in `--help`.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  other error (I/O, internal)
  2  usage error (bad arguments)
  3  submission rejected (bad input file, shapes, NaN, path outside the data root,
     unknown model, no workers)
  4  job failed (the message names the job, the worker and the cause)
  5  job cancelled
  6  coordinator unreachable (watch and submit --wait reconnect for 60 s first)
  7  job not found, or no result to fetch
  8  not authorised (no or unknown token, or the token's role may not do this)
  9  coordinator busy: queued and running jobs hold its memory budget (retry later)";

/// An error with its documented exit code.
#[derive(Debug)]
pub struct Exit {
    /// Process exit code (see [`EXIT_CODES`]).
    pub code: u8,
    /// Message printed to stderr.
    pub message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Exit code for job failed.
pub const EXIT_JOB_FAILED: u8 = 4;
/// Exit code for job cancelled.
pub const EXIT_JOB_CANCELLED: u8 = 5;
/// Exit code for a coordinator whose memory budget is held by other jobs.
pub const EXIT_BUSY: u8 = 9;

/// Maps a client error to its exit code.
pub fn exit_from_client(e: ClientError) -> Exit {
    let code = match &e {
        ClientError::Connect { .. } => 6,
        ClientError::Rpc(s) => match s.code() {
            tonic::Code::InvalidArgument => 3,
            tonic::Code::NotFound | tonic::Code::FailedPrecondition => 7,
            tonic::Code::Unavailable => 6,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => 8,
            tonic::Code::ResourceExhausted => EXIT_BUSY,
            _ => 1,
        },
        ClientError::Protocol(_) => 1,
    };
    Exit {
        code,
        message: e.to_string(),
    }
}

fn ce(e: ClientError) -> anyhow::Error {
    exit_from_client(e).into()
}

/// Where the coordinator is, and how to authenticate to it.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// Coordinator URL (https:// for TLS).
    #[arg(
        long,
        env = "DMQSM_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// File holding the bearer token (first line). Without it the token comes from the
    /// file named by $DMQSM_TOKEN_FILE, else from $DMQSM_TOKEN; tokens are never flags.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// How to dial `https://` servers (PEM files).
#[derive(Debug, Clone, Default, Args)]
pub struct ClientTlsArgs {
    /// CA certificate that signed the server's certificate.
    #[arg(long, env = "DMQSM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate, for servers that require mTLS.
    #[arg(long, env = "DMQSM_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// Key of the client certificate.
    #[arg(long, env = "DMQSM_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// Server name to verify, when it differs from the URL's host.
    #[arg(long)]
    pub tls_domain: Option<String>,
}

impl ClientTlsArgs {
    /// The TLS settings these flags describe.
    pub fn client_tls(&self) -> dmqsm_proto::transport::ClientTls {
        dmqsm_proto::transport::ClientTls {
            ca: self.tls_ca.clone(),
            cert: self.tls_client_cert.clone(),
            key: self.tls_client_key.clone(),
            domain: self.tls_domain.clone(),
        }
    }
}

impl ConnArgs {
    /// The token and TLS settings (usage error for an unreadable or malformed token).
    pub fn options(&self) -> anyhow::Result<client::ClientOptions> {
        let token =
            dmqsm_proto::auth::read_token(self.token_file.as_deref()).map_err(|e| Exit {
                code: 2,
                message: e.to_string(),
            })?;
        Ok(client::ClientOptions {
            token,
            tls: self.tls.client_tls(),
        })
    }

    /// Connects to the coordinator (exit code 6 when unreachable).
    pub async fn connect(&self) -> anyhow::Result<client::Client> {
        client::connect_with(&self.coordinator, &self.options()?)
            .await
            .map_err(ce)
    }
}

/// Reconstruction settings shared by `submit`, `run` and `cohort` (one set of flags,
/// one set of defaults).
#[derive(Debug, Clone, Args)]
pub struct SettingsArgs {
    /// Task. The default, `dipinv-physics`, uses the dipole model in the data term.
    #[arg(long, value_enum, default_value = "dipinv-physics")]
    pub task: Task,
    /// Diffusion (DDIM) steps (1–10000).
    #[arg(long, default_value_t = DEFAULT_STEPS,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub steps: u32,
    /// DDIM η (0 deterministic, 1 ancestral).
    #[arg(long, default_value_t = 1.0)]
    pub eta: f64,
    /// Warm start: the training timestep t₀ (1–999) the reverse process starts from, with
    /// a classical estimate noised to it (TV of the field, α from --tv-alpha or the
    /// L-curve; the zero-fill for sr); `none` starts from pure noise; `auto` is t₀ = 50,
    /// or steps − 1 when more steps are asked for.
    #[arg(long, default_value = "auto", value_parser = parse_start)]
    pub start_timestep: StartTimestep,
    /// TV weight α of the warm-start estimate (default: the L-curve corner).
    #[arg(long)]
    pub tv_alpha: Option<f64>,
    /// TV data consistency (dipinv-physics with prox guidance): each proximal step also
    /// minimises α‖∇χ‖₁ with α = FACTOR × the warm start's TV α; unset: 0.1 for
    /// dipinv-physics with prox (measured best on validation phantoms 500–502), off
    /// otherwise; 0: off (the plain CG proximal step).
    #[arg(long, value_name = "FACTOR", value_parser = parse_non_negative)]
    pub prox_tv: Option<f64>,
    /// ξ: the DPS step size, or the prox data weight (default: DM-QSM's 0.5 dipole
    /// inversion / 2 SR scaled by 1000/steps for DPS; 2–16 by task for prox (8 for the
    /// physics tasks, 24 with the TV step); see
    /// `dmqsm_common::diffusion::sampler::default_xi`); finite and > 0.
    #[arg(long, value_parser = parse_positive)]
    pub xi: Option<f64>,
    /// Guidance mode.
    #[arg(long, value_enum, default_value = "prox")]
    pub guidance: Guidance,
    /// Patch overlap in voxels (DM-QSM: 8).
    #[arg(long, default_value_t = 8)]
    pub overlap: u32,
    /// Noise seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Posterior samples (1–1000; > 1 adds a std map).
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub samples: u32,
    /// Priority (higher runs first).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub priority: i32,
    /// Required model id ("" accepts what the workers serve).
    #[arg(long, default_value = "")]
    pub model_id: String,
    /// SR factor: one value or three comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub factor: Vec<u32>,
    /// TKD threshold of the dipinv / sr-dipinv input, in (0, 1).
    #[arg(long, default_value_t = 0.1, value_parser = parse_open_unit)]
    pub tkd_threshold: f64,
    /// SR downsampling model: kspace or block.
    #[arg(long, default_value = "kspace")]
    pub downsample: String,
    /// Patches per worker batch (0: the coordinator's setting).
    #[arg(long, default_value_t = 0)]
    pub batch_size: u32,
}

/// The default number of diffusion steps of `run`, `submit` and `cohort`.
pub const DEFAULT_STEPS: u32 = 8;
/// The warm-start timestep `--start-timestep auto` uses when the steps fit.
pub const DEFAULT_START_TIMESTEP: u32 = 50;

/// `--start-timestep`: a training timestep, `none` or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartTimestep {
    /// [`DEFAULT_START_TIMESTEP`], or steps − 1 when more steps are asked for.
    Auto,
    /// From pure noise.
    None,
    /// This timestep.
    At(u32),
}

impl StartTimestep {
    /// The timestep for a run of `steps` steps (`None`: from noise).
    pub fn resolve(self, steps: u32) -> Option<u32> {
        match self {
            StartTimestep::Auto => {
                Some(DEFAULT_START_TIMESTEP.max(steps.saturating_sub(1)).min(999))
            }
            StartTimestep::None => None,
            StartTimestep::At(t) => Some(t),
        }
    }
}

/// A number strictly between 0 and 1 (clap value parser).
fn parse_open_unit(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number strictly between 0 and 1")),
    }
}

/// A finite number ≥ 0 (clap value parser).
fn parse_non_negative(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a finite number ≥ 0")),
    }
}

/// A finite number above 0 (clap value parser).
fn parse_positive(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a finite number above 0")),
    }
}

fn parse_start(s: &str) -> std::result::Result<StartTimestep, String> {
    match s.trim() {
        "auto" => Ok(StartTimestep::Auto),
        "none" => Ok(StartTimestep::None),
        t => match t.parse::<u32>() {
            Ok(v) if (1..=999).contains(&v) => Ok(StartTimestep::At(v)),
            _ => Err(format!(
                "{t:?} is not a training timestep between 1 and 999, `auto` or `none`"
            )),
        },
    }
}

impl SettingsArgs {
    /// The proto settings; per-input fields (B0 direction, field units) stay unset.
    pub fn to_proto(&self) -> v1::JobSettings {
        v1::JobSettings {
            start_timestep: self.start_timestep.resolve(self.steps),
            tv_alpha: self.tv_alpha,
            prox_tv: self.prox_tv,
            task: v1::Task::from(self.task) as i32,
            steps: Some(self.steps),
            eta: self.eta,
            xi: self.xi,
            // The command line never offers `none` (`value(skip)`).
            guidance: v1::Guidance::try_from(self.guidance).map_or(v1::Guidance::Unspecified, |g| g)
                as i32,
            overlap: Some(self.overlap),
            seed: self.seed,
            samples: Some(self.samples),
            priority: self.priority,
            model_id: self.model_id.clone(),
            factor: self.factor.clone(),
            tkd_threshold: Some(self.tkd_threshold),
            downsample: self.downsample.clone(),
            batch_size: self.batch_size,
            ..Default::default()
        }
    }
}

/// The reconstruction: inputs and settings (shared by `submit` and `run`).
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// Measurement NIfTI: local field (dipinv tasks) or low-res χ (sr), in ppm unless
    /// --field-units says otherwise.
    pub measurement: PathBuf,
    /// Brain mask NIfTI (optional).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// B0 direction in voxel axes (x,y,z); default from the NIfTI affine.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub b0_dir: Vec<f64>,
    /// Units of a field input: ppm, hz or rad.
    #[arg(long, default_value = "ppm")]
    pub field_units: String,
    /// B0 in T (for hz / rad units).
    #[arg(long, default_value_t = 0.0)]
    pub b0_tesla: f64,
    /// Echo time in s (for rad units).
    #[arg(long, default_value_t = 0.0)]
    pub te_seconds: f64,
    /// Free-form label (default: the measurement file name).
    #[arg(long)]
    pub label: Option<String>,
}

impl JobArgs {
    /// The proto settings.
    pub fn settings(&self) -> v1::JobSettings {
        v1::JobSettings {
            b0_dir: self.b0_dir.clone(),
            field_units: self.field_units.clone(),
            b0_tesla: self.b0_tesla,
            te_seconds: self.te_seconds,
            ..self.settings.to_proto()
        }
    }

    /// The label: given, else the measurement's file name.
    pub fn label(&self) -> String {
        self.label.clone().unwrap_or_else(|| {
            self.measurement
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
    }

    /// A submission that uploads the files (or names them, with `remote_paths`).
    pub fn request(&self, remote_paths: bool) -> anyhow::Result<v1::SubmitJobRequest> {
        let input = |p: &Path| -> anyhow::Result<v1::VolumeInput> {
            let source = if remote_paths {
                v1::volume_input::Source::Path(p.to_string_lossy().into_owned())
            } else {
                let bytes = std::fs::read(p).map_err(|e| Exit {
                    code: 1,
                    message: format!("cannot read {}: {e}", p.display()),
                })?;
                v1::volume_input::Source::Nifti(bytes.into())
            };
            Ok(v1::VolumeInput {
                source: Some(source),
            })
        };
        Ok(v1::SubmitJobRequest {
            measurement: Some(input(&self.measurement)?),
            mask: self.mask.as_deref().map(input).transpose()?,
            settings: Some(self.settings()),
            label: self.label(),
        })
    }
}

/// `dmqsm submit`.
#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub job: JobArgs,
    /// Send the paths (resolved on the coordinator, under its --data-root) instead of
    /// uploading the files.
    #[arg(long)]
    pub remote_paths: bool,
    /// Wait for the job with a progress bar; exit code reflects the outcome.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: download the results into this directory.
    #[arg(long, requires = "wait")]
    pub out: Option<PathBuf>,
}

/// Commands that take a job id.
#[derive(Debug, Clone, Args)]
pub struct JobIdArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Job id (e.g. job-000001).
    pub job_id: String,
}

/// `dmqsm status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Job id; all jobs when omitted.
    pub job_id: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `dmqsm fetch`.
#[derive(Debug, Clone, Args)]
pub struct FetchArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Job id.
    pub job_id: String,
    /// Output directory (created).
    #[arg(long, short, default_value = ".")]
    pub out: PathBuf,
}

/// `dmqsm workers`.
#[derive(Debug, Clone, Args)]
pub struct WorkersArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn state_name(state: i32) -> &'static str {
    JobState::from_wire(state).map_or("unknown", JobState::name)
}

fn task_name(s: &v1::JobStatus) -> &'static str {
    s.settings
        .as_ref()
        .and_then(|x| convert::task(x.task, "settings.task").ok())
        .map(Task::name)
        .unwrap_or("?")
}

fn status_json(s: &v1::JobStatus) -> serde_json::Value {
    serde_json::json!({
        "job_id": s.job_id,
        "label": s.label,
        "state": state_name(s.state),
        "task": task_name(s),
        "step": s.step,
        "total_steps": s.total_steps,
        "sample": s.sample,
        "total_samples": s.total_samples,
        "retries": s.retries,
        "model_id": s.model_id,
        "model_hash": s.model_hash,
        "error": s.error,
        "submitted_unix": s.submitted_unix,
        "finished_unix": s.finished_unix,
    })
}

/// Converts a final status into the process outcome (exit 0, 4 or 5).
pub fn outcome(s: &v1::JobStatus) -> anyhow::Result<()> {
    match JobState::from_wire(s.state) {
        Some(JobState::Succeeded) => Ok(()),
        Some(JobState::Cancelled) => Err(Exit {
            code: EXIT_JOB_CANCELLED,
            message: format!("job {} was cancelled", s.job_id),
        }
        .into()),
        // A status that is not final reaches here only from a broken coordinator: fail.
        Some(JobState::Failed | JobState::Queued | JobState::Running) | None => Err(Exit {
            code: EXIT_JOB_FAILED,
            message: if s.error.starts_with(&format!("job {}", s.job_id)) {
                s.error.clone()
            } else {
                format!("job {} failed: {}", s.job_id, s.error)
            },
        }
        .into()),
    }
}

/// A progress bar over all steps of all samples, with ETA and throughput.
pub fn progress_bar(job_id: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(1);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} steps  {msg}",
    ) {
        pb.set_style(style);
    }
    pb.set_prefix(job_id.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Updates a progress bar from a report.
pub fn show_progress(pb: &indicatif::ProgressBar, p: &v1::JobProgress) {
    if let Some(s) = &p.status {
        let total = (s.total_steps as u64 * s.total_samples.max(1) as u64).max(1);
        pb.set_length(total);
        pb.set_position(s.sample as u64 * s.total_steps as u64 + s.step as u64);
        let busy: Vec<String> = p
            .workers
            .iter()
            .map(|w| format!("{}:{}", w.worker_id, w.in_flight))
            .collect();
        pb.set_message(format!(
            "{} · ETA {} · {:.1} patches/s · in flight {}",
            state_name(s.state),
            if p.eta_seconds > 0.0 {
                format!("{:.0} s", p.eta_seconds)
            } else {
                "–".into()
            },
            p.patches_per_second,
            busy.join(" ")
        ));
    }
}

/// Writes fetched files into `out`.
pub fn write_files(out: &Path, files: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (name, data) in files {
        let p = out.join(name);
        std::fs::write(&p, data).with_context(|| format!("writing {}", p.display()))?;
        println!("{}", p.display());
    }
    Ok(())
}

/// `dmqsm submit`.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let req = args.job.request(args.remote_paths)?;
    let mut c = args.conn.connect().await?;
    let job_id = c
        .submit_job(req)
        .await
        .map_err(|s| ce(s.into()))?
        .into_inner()
        .job_id;
    println!("{job_id}");
    if !args.wait {
        return Ok(());
    }
    let pb = progress_bar(&job_id);
    let fin = client::wait(&mut c, &job_id, |p| show_progress(&pb, p))
        .await
        .map_err(ce)?;
    pb.finish_with_message(state_name(fin.state).to_string());
    outcome(&fin)?;
    if let Some(out) = &args.out {
        let files = client::fetch(&mut c, &job_id).await.map_err(ce)?;
        write_files(out, &files)?;
    }
    Ok(())
}

/// `dmqsm status`.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect().await?;
    let jobs = match &args.job_id {
        Some(id) => vec![
            c.get_job(v1::GetJobRequest { job_id: id.clone() })
                .await
                .map_err(|s| ce(s.into()))?
                .into_inner(),
        ],
        None => {
            c.list_jobs(v1::ListJobsRequest {})
                .await
                .map_err(|s| ce(s.into()))?
                .into_inner()
                .jobs
        }
    };
    if args.json {
        let v: Vec<_> = jobs.iter().map(status_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<12} {:<10} {:<18} {:>11} {:>7} {:>7}  label / error",
        "job", "state", "task", "step", "sample", "retries"
    );
    for s in &jobs {
        println!(
            "{:<12} {:<10} {:<18} {:>5}/{:<5} {:>3}/{:<3} {:>7}  {}",
            s.job_id,
            state_name(s.state),
            task_name(s),
            s.step,
            s.total_steps,
            s.sample,
            s.total_samples,
            s.retries,
            if s.error.is_empty() {
                &s.label
            } else {
                &s.error
            }
        );
    }
    Ok(())
}

/// `dmqsm watch`.
pub async fn watch(args: JobIdArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect().await?;
    let pb = progress_bar(&args.job_id);
    let fin = client::wait(&mut c, &args.job_id, |p| show_progress(&pb, p))
        .await
        .map_err(ce)?;
    pb.finish_with_message(state_name(fin.state).to_string());
    outcome(&fin)
}

/// `dmqsm cancel`.
pub async fn cancel(args: JobIdArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect().await?;
    let s = c
        .cancel_job(v1::CancelJobRequest {
            job_id: args.job_id.clone(),
        })
        .await
        .map_err(|s| ce(s.into()))?
        .into_inner();
    println!("{} {}", s.job_id, state_name(s.state));
    Ok(())
}

/// `dmqsm fetch`.
pub async fn fetch(args: FetchArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect().await?;
    let files = client::fetch(&mut c, &args.job_id).await.map_err(ce)?;
    write_files(&args.out, &files)
}

/// `dmqsm health`.
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// `dmqsm health`: exit 0 if the coordinator's gRPC health service says SERVING, 6
/// otherwise. Needs no token (for container and load-balancer health checks).
pub async fn health(args: HealthArgs) -> anyhow::Result<()> {
    let options = client::ClientOptions {
        token: None,
        tls: args.conn.tls.client_tls(),
    };
    let serving = client::health(&args.conn.coordinator, &options)
        .await
        .map_err(ce)?;
    if serving {
        println!("SERVING");
        Ok(())
    } else {
        Err(Exit {
            code: 6,
            message: format!("{} is not serving", args.conn.coordinator),
        }
        .into())
    }
}

/// `dmqsm workers`.
pub async fn workers(args: WorkersArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect().await?;
    let ws = c
        .list_workers(v1::ListWorkersRequest {})
        .await
        .map_err(|s| ce(s.into()))?
        .into_inner()
        .workers;
    let model = |w: &v1::WorkerStatus| {
        w.info
            .as_ref()
            .and_then(|i| i.model.as_ref())
            .map(|m| {
                (
                    m.model_id.clone(),
                    m.content_hash.chars().take(12).collect::<String>(),
                )
            })
            .unwrap_or_default()
    };
    if args.json {
        let v: Vec<_> = ws
            .iter()
            .map(|w| {
                let (id, hash) = model(w);
                serde_json::json!({
                    "worker_id": w.worker_id, "address": w.address, "state": w.state,
                    "model_id": id, "model_hash": hash,
                    "device": w.info.as_ref().map(|i| i.device.clone()).unwrap_or_default(),
                    "in_flight": w.in_flight, "batches_done": w.batches_done,
                    "failures": w.failures, "last_heartbeat_unix": w.last_heartbeat_unix,
                    "shared_memory": w.shared_memory,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<9} {:<28} {:<8} {:>9} {:>9} {:>8}  tensors",
        "worker", "state", "model", "device", "in flight", "batches", "failures"
    );
    for w in &ws {
        let (id, hash) = model(w);
        println!(
            "{:<24} {:<9} {:<28} {:<8} {:>9} {:>9} {:>8}  {}",
            w.worker_id,
            w.state,
            format!("{id} {hash}"),
            w.info.as_ref().map(|i| i.device.as_str()).unwrap_or("?"),
            w.in_flight,
            w.batches_done,
            w.failures,
            if w.shared_memory {
                "shared memory"
            } else {
                "gRPC"
            }
        );
    }
    Ok(())
}
