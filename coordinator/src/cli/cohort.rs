//! `dmqsm cohort <bids_dir>`: one DM-QSM job per subject/session of a BIDS dataset,
//! on a coordinator (`--coordinator`), on local `dmqsm-worker` processes
//! (`--local-workers N`), or as generated sbatch scripts (`--slurm DIR`).
//! The logic lives in [`dmqsm_coordinator::cohort`].

use super::server::LocalModelArgs;
use super::{ConnArgs, Exit, SettingsArgs};
use anyhow::Context;
use clap::{Args, ValueEnum};
use dmqsm_coordinator::cohort::{
    self, CohortOptions, CohortProgress, CohortReport, Entry, InputKind, Outcome, Selection,
    SlurmOptions,
};
use dmqsm_coordinator::local_workers::LocalWorkerOptions;
use dmqsm_coordinator::{Coordinator, CoordinatorConfig, client, spawn_server};
use dmqsm_proto::v1;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The input the cohort reconstructs from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputArg {
    /// `*_localfield.nii[.gz]` (ppm, or Hz / rad per the sidecar's `Units`).
    Localfield,
    /// `*_Chimap.nii[.gz]` low-resolution χ (with `--task sr`).
    Chimap,
}

/// `dmqsm cohort`.
#[derive(Debug, Clone, Args)]
pub struct CohortArgs {
    /// BIDS dataset root (results go to <bids_dir>/derivatives/dmqsm).
    pub bids_dir: PathBuf,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Subjects to process (labels, comma-separated, with or without `sub-`); default all.
    #[arg(long, value_delimiter = ',')]
    pub subjects: Vec<String>,
    /// Sessions to process (labels, with or without `ses-`); default all.
    #[arg(long, value_delimiter = ',')]
    pub sessions: Vec<String>,
    /// Which files are the input.
    #[arg(long, value_enum, default_value = "localfield")]
    pub input: InputArg,
    /// Reconstruction settings (every subject uses the same, seed included).
    #[command(flatten)]
    pub job: SettingsArgs,
    /// Recompute subjects whose outputs already exist.
    #[arg(long)]
    pub force: bool,
    /// Only list what was found and what would run.
    #[arg(long)]
    pub list: bool,
    /// Run on N local `dmqsm-worker` processes instead of a coordinator (needs --model or
    /// --analytic).
    #[arg(long)]
    pub local_workers: Option<usize>,
    /// The local workers' model (also the workers' model of `--slurm` scripts).
    #[command(flatten)]
    pub local: LocalModelArgs,
    /// Local workers: sled store of the embedded coordinator (default: a temp folder).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Write sbatch scripts (one per subject/session) and submit_all.sh here instead of
    /// running.
    #[arg(long)]
    pub slurm: Option<PathBuf>,
    /// --slurm: worker tasks per job.
    #[arg(long, default_value_t = 1)]
    pub slurm_workers: u32,
    /// --slurm: GPUs per worker task (0 = CPU workers).
    #[arg(long, default_value_t = 1)]
    pub slurm_gpus_per_worker: u32,
    /// --slurm: CPUs per worker task.
    #[arg(long, default_value_t = 4)]
    pub slurm_cpus_per_worker: u32,
    /// --slurm: the workers' model arguments, e.g. "--model /models/dmqsm.pt"
    /// (default: --model of this command).
    #[arg(long, allow_hyphen_values = true)]
    pub worker_args: Option<String>,
    /// --slurm: extra #SBATCH option (repeatable), e.g. --sbatch=--partition=gpu.
    #[arg(long, allow_hyphen_values = true)]
    pub sbatch: Vec<String>,
}

fn name<T: ValueEnum>(v: T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

impl CohortArgs {
    /// The job settings shared by every subject (per-subject B0 and units are added by
    /// the cohort runner).
    pub fn settings(&self) -> v1::JobSettings {
        self.job.to_proto()
    }

    /// The settings as `dmqsm cohort` options (forwarded by --slurm).
    pub fn settings_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--input".into(),
            name(self.input),
            "--task".into(),
            name(self.job.task),
            "--steps".into(),
            self.job.steps.to_string(),
            "--eta".into(),
            self.job.eta.to_string(),
            "--guidance".into(),
            name(self.job.guidance),
            "--overlap".into(),
            self.job.overlap.to_string(),
            "--seed".into(),
            self.job.seed.to_string(),
            "--samples".into(),
            self.job.samples.to_string(),
            "--priority".into(),
            self.job.priority.to_string(),
            "--tkd-threshold".into(),
            self.job.tkd_threshold.to_string(),
            "--downsample".into(),
            self.job.downsample.clone(),
            "--batch-size".into(),
            self.job.batch_size.to_string(),
        ];
        if let Some(xi) = self.job.xi {
            a.extend(["--xi".into(), xi.to_string()]);
        }
        let start = match self.job.start_timestep {
            super::StartTimestep::Auto => "auto".to_string(),
            super::StartTimestep::None => "none".to_string(),
            super::StartTimestep::At(t) => t.to_string(),
        };
        a.extend(["--start-timestep".into(), start]);
        if let Some(alpha) = self.job.tv_alpha {
            a.extend(["--tv-alpha".into(), alpha.to_string()]);
        }
        if let Some(f) = self.job.prox_tv {
            a.extend(["--prox-tv".into(), f.to_string()]);
        }
        if !self.job.model_id.is_empty() {
            a.extend(["--model-id".into(), self.job.model_id.clone()]);
        }
        if !self.job.factor.is_empty() {
            let f: Vec<String> = self.job.factor.iter().map(|x| x.to_string()).collect();
            a.extend(["--factor".into(), f.join(",")]);
        }
        if self.force {
            a.push("--force".into());
        }
        a
    }

    fn kind(&self) -> InputKind {
        match self.input {
            InputArg::Localfield => InputKind::LocalField,
            InputArg::Chimap => InputKind::Chi,
        }
    }
}

fn usage(message: String) -> anyhow::Error {
    Exit { code: 2, message }.into()
}

fn print_entries(entries: &[Entry]) {
    for e in entries {
        match &e.input {
            Ok(a) => println!(
                "{:<28} {}{}{}",
                e.name(),
                a.measurement.display(),
                a.mask
                    .as_ref()
                    .map(|m| format!("  mask {}", m.display()))
                    .unwrap_or_default(),
                a.truth
                    .as_ref()
                    .map(|m| format!("  truth {}", m.display()))
                    .unwrap_or_default()
            ),
            Err(err) => println!("{:<28} PROBLEM: {err}", e.name()),
        }
    }
}

fn progress_bar() -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(1);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "cohort [{elapsed_precise}] {wide_bar} {pos}/{len} steps  {msg}",
    ) {
        pb.set_style(style);
    }
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

fn show(pb: &indicatif::ProgressBar, p: &CohortProgress) {
    pb.set_length(p.steps_total.max(1));
    pb.set_position(p.steps_done);
    pb.set_message(format!(
        "{} done · {} skipped · {} failed · {} subjects",
        p.done, p.skipped, p.failed, p.total
    ));
    if !p.message.is_empty() {
        pb.println(&p.message);
    }
}

fn summarise(report: &CohortReport) -> anyhow::Result<()> {
    for s in &report.subjects {
        match &s.outcome {
            Outcome::Done { chi, .. } => println!("{:<28} done     {}", s.name, chi.display()),
            Outcome::Skipped { chi } => println!("{:<28} skipped  {}", s.name, chi.display()),
            Outcome::Failed { error, .. } => println!("{:<28} FAILED   {error}", s.name),
        }
    }
    println!(
        "{} done, {} skipped, {} failed of {}",
        report.done(),
        report.skipped(),
        report.failed(),
        report.subjects.len()
    );
    if report.failed() > 0 {
        let names: Vec<&str> = report
            .subjects
            .iter()
            .filter(|s| matches!(s.outcome, Outcome::Failed { .. }))
            .map(|s| s.name.as_str())
            .collect();
        return Err(Exit {
            code: super::EXIT_JOB_FAILED,
            message: format!(
                "{} of {} cohort entries failed: {}",
                names.len(),
                report.subjects.len(),
                names.join(", ")
            ),
        }
        .into());
    }
    Ok(())
}

/// `dmqsm cohort`.
pub async fn cohort(args: CohortArgs) -> anyhow::Result<()> {
    let selection = Selection {
        subjects: args.subjects.clone(),
        sessions: args.sessions.clone(),
    };
    let entries = cohort::discover(&args.bids_dir, &selection, args.kind()).map_err(|e| Exit {
        code: 3,
        message: e.to_string(),
    })?;
    if entries.is_empty() {
        return Err(Exit {
            code: 3,
            message: format!("no sub-* subjects selected in {}", args.bids_dir.display()),
        }
        .into());
    }
    if args.list {
        print_entries(&entries);
        return Ok(());
    }
    if let Some(dir) = &args.slurm {
        let worker_args = match (&args.worker_args, &args.local.model, &args.local.analytic) {
            (Some(w), _, _) => w.clone(),
            (None, Some(m), _) => format!(
                "--model {}",
                cohort::slurm::sh_quote(&std::path::absolute(m)?.display().to_string())?
            ),
            (None, None, Some(_)) => "--synthetic".into(),
            (None, None, None) => {
                return Err(usage(
                    "--slurm needs the workers' model: --model PATH or --worker-args".into(),
                ));
            }
        };
        let opts = SlurmOptions {
            workers: args.slurm_workers,
            gpus_per_worker: args.slurm_gpus_per_worker,
            cpus_per_worker: args.slurm_cpus_per_worker,
            worker_args,
            bin_dir: std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.to_path_buf())),
            sbatch: args.sbatch.clone(),
            cohort_args: args.settings_args(),
        };
        let plan = cohort::write_slurm_scripts(dir, &args.bids_dir, &entries, &opts)
            .map_err(|e| usage(e.to_string()))?;
        for s in &plan.scripts {
            println!("{}", s.display());
        }
        println!("submit them all with: sh {}", plan.submit_all.display());
        return Ok(());
    }
    let mut opts = CohortOptions::new(args.settings());
    opts.force = args.force;
    let pb = progress_bar();
    let report = match args.local_workers {
        None => {
            let mut c = args.conn.connect().await?;
            cohort::run_cohort(&mut c, &args.bids_dir, &entries, &opts, |p| show(&pb, p)).await?
        }
        Some(0) => return Err(usage("--local-workers must be at least 1".into())),
        Some(n) => {
            let model = args.local.local_model()?;
            let workers =
                super::server::start_local_workers(model, LocalWorkerOptions::default(), n).await?;
            let urls = workers.urls();
            let tmp;
            let data_dir = match &args.data_dir {
                Some(d) => d.clone(),
                None => {
                    tmp = std::env::temp_dir().join(format!("dmqsm-cohort-{}", std::process::id()));
                    tmp.clone()
                }
            };
            let coordinator = Coordinator::start(CoordinatorConfig::new(&data_dir), &urls)
                .await
                .with_context(|| format!("starting the coordinator in {}", data_dir.display()))?;
            let (bound, stop, server) =
                spawn_server(coordinator.clone(), SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            let result = async {
                let mut c = client::connect(&format!("http://{bound}"))
                    .await
                    .map_err(super::exit_from_client)?;
                anyhow::Ok(
                    cohort::run_cohort(&mut c, &args.bids_dir, &entries, &opts, |p| show(&pb, p))
                        .await?,
                )
            }
            .await;
            let _ = stop.send(());
            let _ = server.await;
            coordinator.shutdown().await;
            let _ = tokio::task::spawn_blocking(move || workers.shutdown()).await;
            if args.data_dir.is_none() {
                let _ = std::fs::remove_dir_all(&data_dir);
            }
            result?
        }
    };
    pb.finish_and_clear();
    summarise(&report)
}
