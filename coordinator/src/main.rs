//! `dmqsm`: DM-QSM reconstructions on a coordinator and score-model workers.
//!
//! Client commands talk to a coordinator over gRPC (`--coordinator`, env
//! `DMQSM_COORDINATOR`); `serve` runs one; `run` runs a coordinator and local workers in
//! this process (the single-machine default). Exit codes are listed in `--help`.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod cli;

/// mimalloc, keeping freed pages ([`dmqsm_common::allocator`]): each step allocates
/// batches of 48³ patches and volume-sized buffers, which would otherwise be faulted in
/// zeroed again at every step (the scaling bench counts the page faults per patch; see
/// the README's "Feeding GPUs").
#[global_allocator]
static ALLOCATOR: dmqsm_common::allocator::Allocator = dmqsm_common::allocator::Allocator;

/// DM-QSM: quantitative susceptibility mapping with a patch-based score diffusion model.
#[derive(Debug, Parser)]
#[command(name = "dmqsm", version, about, after_help = cli::EXIT_CODES)]
struct Cli {
    /// Log filter (tracing-subscriber env-filter syntax), e.g. `info` or `dmqsm=debug`.
    #[arg(long, global = true, env = "DMQSM_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator service (jobs, scheduling, checkpoints in sled).
    Serve(cli::server::ServeArgs),
    /// Submit a reconstruction job; prints its id (--wait shows progress).
    Submit(cli::SubmitArgs),
    /// Show one job or all jobs.
    Status(cli::StatusArgs),
    /// Follow a job's progress until it ends.
    Watch(cli::JobIdArgs),
    /// Cancel a job.
    Cancel(cli::JobIdArgs),
    /// Download a finished job's files (χ NIfTI, std NIfTI, PNG preview, JSON report).
    Fetch(cli::FetchArgs),
    /// List the workers the coordinator knows.
    Workers(cli::WorkersArgs),
    /// Ask the coordinator's gRPC health service whether it serves (no token needed).
    Health(cli::HealthArgs),
    /// Embedded mode: coordinator and N local workers in this process, one job.
    Run(Box<cli::server::RunArgs>),
    /// Reconstruct a BIDS dataset: one job per subject/session, results in
    /// derivatives/dmqsm (or --slurm DIR: write sbatch scripts).
    Cohort(Box<cli::cohort::CohortArgs>),
    /// Physics subcommands: phantom, simulate, tkd, eval, preview, demo.
    #[command(flatten)]
    Physics(cli::physics::PhysicsCommand),
    /// Benchmarks: `quality` (DM-QSM vs TKD/L2 on held-out phantoms).
    #[command(subcommand)]
    Benchmark(cli::benchmark::BenchmarkCommand),
}

impl Command {
    fn default_log(&self) -> &'static str {
        match self {
            Command::Serve(_) => "info",
            _ => "warn",
        }
    }
}

fn main() -> ExitCode {
    dmqsm_common::allocator::retain_freed_pages();
    let cli = Cli::parse();
    let filter = cli
        .log
        .clone()
        .unwrap_or_else(|| cli.command.default_log().to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.downcast_ref::<cli::Exit>().map(|x| x.code).unwrap_or(1);
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    // `dmqsm serve --threads N` sizes the async runtime too (clap refuses 0).
    let runtime_with = |threads: Option<std::num::NonZeroUsize>| {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = threads {
            builder.worker_threads(n.get());
        }
        builder.enable_all().build()
    };
    let runtime = || runtime_with(None);
    match command {
        Command::Serve(a) => runtime_with(a.threads)?.block_on(cli::server::serve(a)),
        Command::Submit(a) => runtime()?.block_on(cli::submit(a)),
        Command::Status(a) => runtime()?.block_on(cli::status(a)),
        Command::Watch(a) => runtime()?.block_on(cli::watch(a)),
        Command::Cancel(a) => runtime()?.block_on(cli::cancel(a)),
        Command::Fetch(a) => runtime()?.block_on(cli::fetch(a)),
        Command::Workers(a) => runtime()?.block_on(cli::workers(a)),
        Command::Health(a) => runtime()?.block_on(cli::health(a)),
        Command::Run(a) => runtime()?.block_on(cli::server::run(*a)),
        Command::Cohort(a) => runtime()?.block_on(cli::cohort::cohort(*a)),
        Command::Physics(c) => cli::physics::run(c),
        Command::Benchmark(c) => cli::benchmark::run(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        // clap's own checks: unique argument ids, valid defaults, no conflicting flags.
        Cli::command().debug_assert();
    }
}
