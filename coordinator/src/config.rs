//! [`CoordinatorConfig`]: every tunable of the coordinator, with documented defaults.

use crate::error::{CoordinatorError, Result};
use dmqsm_proto::auth::Authenticator;
use dmqsm_proto::transport::{ClientTls, ServerTls};
use dmqsm_proto::v1::Dtype;
use std::path::PathBuf;
use std::time::Duration;

/// Settings of one coordinator process.
///
/// Defaults follow the conventions of cluster schedulers (REFERENCE.md §9: Ballista
/// retries a task up to 4 times and fails running jobs when no executor remains after a
/// grace period), scaled down to a single-site service: seconds, not minutes.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Directory of the sled store (jobs, inputs, checkpoints, results).
    pub data_dir: PathBuf,
    /// Inputs given as paths in `SubmitJob` must resolve under this directory; `None`
    /// refuses path inputs altogether (uploads only).
    pub data_root: Option<PathBuf>,
    /// Patches per batch sent to a worker. Batches are fixed per job and step by patch
    /// index, so this (not the worker count) decides the grouping.
    pub batch_size: usize,
    /// Batches in flight per worker at once (pipelining; 2 keeps a GPU busy while the
    /// next batch travels).
    pub max_in_flight_per_worker: usize,
    /// A batch not answered within this time is abandoned and retried elsewhere.
    pub batch_timeout: Duration,
    /// How many times one batch may be retried before its job fails.
    pub max_retries: u32,
    /// How often registered workers send heartbeats (sent back on registration), and how
    /// often statically listed workers are probed with `Info`.
    pub heartbeat_interval: Duration,
    /// A worker silent for this many heartbeat intervals is marked lost and its
    /// in-flight batches are reassigned.
    pub missed_heartbeats: u32,
    /// After this many consecutive failed batches a worker is benched for
    /// [`Self::quarantine`] (a slow or broken worker stops eating retries).
    pub max_consecutive_failures: u32,
    /// How long a worker with repeated failures gets no new batches.
    pub quarantine: Duration,
    /// A job with work pending and no usable worker fails after this long.
    pub no_worker_grace: Duration,
    /// Write a step checkpoint every this many diffusion steps (0 disables).
    pub checkpoint_every: u32,
    /// Element type of patch tensors on the wire. F32 is exact and is the default; BF16
    /// halves the bytes but changes the result (not bitwise equal to the reference).
    pub wire_dtype: Dtype,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// How many jobs run their sampler at once; more are queued.
    pub max_running_jobs: usize,
    /// Memory budget in bytes: a job whose estimated peak
    /// ([`crate::admission::MemoryEstimate`]) exceeds it is refused, and queued plus
    /// running jobs together may hold at most this much. Default: 3/4 of the machine's
    /// memory ([`crate::admission::default_budget_bytes`]); `--memory-budget-gb`.
    pub memory_budget_bytes: u64,
    /// The Prometheus event counters of this coordinator (not a tunable: a handle, fresh
    /// per [`CoordinatorConfig::new`], shared by its clones; see [`crate::metrics`]).
    pub metrics: crate::metrics::CoordinatorMetrics,
    /// Fraction of batches (0 … 1) recomputed on a second worker of the same device
    /// class and compared bitwise (see `dispatch`). Chosen deterministically per job and
    /// batch; 0 turns spot checks off.
    pub spot_check_fraction: f64,
    /// How long shutdown waits for running jobs to reach a step boundary and checkpoint.
    pub shutdown_grace: Duration,
    /// Authentication, TLS and which workers are accepted.
    pub security: SecurityConfig,
    /// Bytes of one shared-memory slot (one batch in flight: its tensors plus an f32
    /// answer) for workers on this host, which then read patches from and write answers
    /// to shared memory instead of the socket (`dmqsm_proto::shm`,
    /// [`crate::shared_plane`]); each such worker gets `max_in_flight_per_worker` slots.
    /// Batches that do not fit travel inline; 0 turns the shared-memory data plane off.
    /// Default 8 MiB (a batch of 6 f32 patches of 48³ in an exact-guidance VJP round).
    pub shared_memory_slot_bytes: u64,
    /// Threads of the coordinator's own numerics (a step's volume math, problems,
    /// results; [`crate::compute::ComputePool`]); `None`: one per core.
    pub compute_threads: Option<usize>,
}

/// Which addresses a registering worker may ask the coordinator to dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerAddressPolicy {
    /// The address's host must resolve to the IP the registration came from, so a
    /// caller cannot point the coordinator at another machine.
    #[default]
    SameHost,
    /// Any http(s)://host:port (for NAT or multi-homed nodes; still never `unix:`).
    Any,
}

/// How the coordinator checks callers and secures its links
/// (`dmqsm_proto::auth`, `dmqsm_proto::transport`).
#[derive(Debug, Clone, Default)]
pub struct SecurityConfig {
    /// Checks bearer tokens; off by default, in which case the server must listen on
    /// loopback only.
    pub auth: Authenticator,
    /// TLS of the coordinator's own gRPC server (plain TCP when `None`).
    pub tls: Option<ServerTls>,
    /// How the coordinator dials `https://` workers (CA; client certificate for mTLS).
    pub worker_tls: ClientTls,
    /// Token presented to statically listed workers (`--worker URL`); registered workers
    /// are dialled with the token they registered with.
    pub static_worker_token: Option<String>,
    /// Which worker addresses registration accepts.
    pub worker_addresses: WorkerAddressPolicy,
}

impl CoordinatorConfig {
    /// Defaults with the store in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            data_root: None,
            batch_size: 4,
            max_in_flight_per_worker: 2,
            batch_timeout: Duration::from_secs(60),
            max_retries: 4,
            heartbeat_interval: Duration::from_secs(2),
            missed_heartbeats: 3,
            max_consecutive_failures: 3,
            quarantine: Duration::from_secs(10),
            no_worker_grace: Duration::from_secs(30),
            checkpoint_every: 5,
            wire_dtype: Dtype::F32,
            max_message_bytes: dmqsm_proto::DEFAULT_MAX_MESSAGE_BYTES,
            max_running_jobs: 8,
            spot_check_fraction: 0.0,
            shutdown_grace: Duration::from_secs(3),
            security: SecurityConfig::default(),
            metrics: crate::metrics::CoordinatorMetrics::default(),
            memory_budget_bytes: crate::admission::default_budget_bytes(),
            shared_memory_slot_bytes: 8 << 20,
            compute_threads: None,
        }
    }

    /// Checks ranges; returns a message naming the bad setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(CoordinatorError::Config(m.to_string()));
        if self.batch_size == 0 {
            return bad("batch_size must be ≥ 1");
        }
        if self.max_in_flight_per_worker == 0 {
            return bad("max_in_flight_per_worker must be ≥ 1");
        }
        if self.shared_memory_slot_bytes > 1 << 30 {
            return bad("shared_memory_slot_bytes must be at most 1 GiB");
        }
        if self.compute_threads == Some(0) {
            return bad("compute_threads must be ≥ 1 (--threads)");
        }
        if self.batch_timeout.is_zero() {
            return bad("batch_timeout must be > 0");
        }
        if self.heartbeat_interval.is_zero() {
            return bad("heartbeat_interval must be > 0");
        }
        if self.missed_heartbeats == 0 {
            return bad("missed_heartbeats must be ≥ 1");
        }
        if self.max_running_jobs == 0 {
            return bad("max_running_jobs must be ≥ 1");
        }
        if !(0.0..=1.0).contains(&self.spot_check_fraction) {
            return bad("spot_check_fraction must be in [0, 1]");
        }
        if self.memory_budget_bytes == 0 {
            return bad("memory_budget_bytes must be > 0 (--memory-budget-gb)");
        }
        if self.max_message_bytes < 1024 {
            return bad("max_message_bytes must be ≥ 1024");
        }
        Ok(())
    }

    /// How long a worker may stay silent before it is marked lost.
    pub fn lost_after(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        let c = CoordinatorConfig::new("/tmp/x");
        c.validate().unwrap();
        assert_eq!(c.lost_after(), Duration::from_secs(6));
        let mut b = c.clone();
        b.batch_size = 0;
        assert!(b.validate().unwrap_err().to_string().contains("batch_size"));
    }
}
