//! The coordinator's view of one worker: its address, model, health and load
//! ([`WorkerEntry`]), and dialling it ([`connect`], [`fetch_info`]).

use crate::error::{CoordinatorError, Result};
use dmqsm_proto::auth::Bearer;
use dmqsm_proto::transport::{AuthChannel, ClientTls};
use dmqsm_proto::v1;
use dmqsm_proto::v1::worker_client::WorkerClient;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Health of a worker as the dispatcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerHealth {
    /// Takes new batches.
    Ready,
    /// Missed its heartbeats (or probes); its in-flight batches were reassigned.
    Lost,
    /// Shutting down: finishes in-flight batches, gets no new ones.
    Draining,
    /// Failed several batches in a row; no new batches until the instant passes.
    Benched(Instant),
    /// Proven wrong: sent a malformed answer, or lost a spot check. Gets no batches
    /// until it registers again (or, if statically listed, the coordinator restarts).
    Untrusted,
}

impl WorkerHealth {
    /// The name used in `ListWorkers` ("ready", "lost", "draining", "benched").
    pub fn name(self) -> &'static str {
        match self {
            WorkerHealth::Ready => "ready",
            WorkerHealth::Lost => "lost",
            WorkerHealth::Draining => "draining",
            WorkerHealth::Benched(_) => "benched",
            WorkerHealth::Untrusted => "untrusted",
        }
    }
}

/// One worker known to the coordinator.
#[derive(Debug)]
pub struct WorkerEntry {
    /// Id assigned by the coordinator at registration (`w1`, `w2`, …; for statically
    /// listed workers the address).
    pub id: String,
    /// The name the worker gave itself (host, GPU); display only.
    pub name: String,
    /// Name of the token it registered with (`None` for statically listed workers):
    /// only that identity may heartbeat, drain or re-register it.
    pub owner: Option<String>,
    /// Address dialled, e.g. `http://127.0.0.1:50061`.
    pub address: String,
    /// gRPC client (cheap to clone; the channel reconnects on its own).
    pub client: WorkerClient<AuthChannel>,
    /// What the worker serves; `None` until its `Info` answered.
    pub info: Option<v1::WorkerInfo>,
    /// True for workers that registered themselves and send heartbeats; false for
    /// statically listed ones, which the coordinator probes with `Info`.
    pub registered: bool,
    /// Health.
    pub health: WorkerHealth,
    /// Last sign of life (heartbeat, probe or answered batch).
    pub last_seen: Instant,
    /// The same in Unix seconds, for `ListWorkers`.
    pub last_seen_unix: f64,
    /// Batches sent and not yet answered.
    pub in_flight: usize,
    /// Batches answered.
    pub batches_done: u64,
    /// Batches failed (errors and timeouts).
    pub failures: u64,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Bumped whenever the worker is marked lost: RPCs started under an older
    /// generation are abandoned and their batches reassigned.
    pub generation: u64,
    /// Broadcasts [`Self::generation`] to running RPCs.
    pub generation_tx: watch::Sender<u64>,
    /// The shared-memory data plane to this worker when it runs on this host and
    /// attached it (`None`: its batches travel inline).
    pub shared: Option<std::sync::Arc<crate::shared_plane::SharedPlane>>,
}

impl WorkerEntry {
    /// A new entry (health `Lost` until `info` is known).
    pub fn new(
        id: String,
        address: String,
        client: WorkerClient<AuthChannel>,
        info: Option<v1::WorkerInfo>,
        registered: bool,
    ) -> Self {
        let (generation_tx, _) = watch::channel(0);
        let name = info
            .as_ref()
            .map(|i| i.worker_id.clone())
            .unwrap_or_default();
        Self {
            id,
            name,
            owner: None,
            address,
            client,
            health: if info.is_some() {
                WorkerHealth::Ready
            } else {
                WorkerHealth::Lost
            },
            info,
            registered,
            last_seen: Instant::now(),
            last_seen_unix: crate::job::unix_now(),
            in_flight: 0,
            batches_done: 0,
            failures: 0,
            consecutive_failures: 0,
            generation: 0,
            generation_tx,
            shared: None,
        }
    }

    /// Content hash of the served model ("" while unknown).
    pub fn model_hash(&self) -> &str {
        self.info
            .as_ref()
            .and_then(|i| i.model.as_ref())
            .map(|m| m.content_hash.as_str())
            .unwrap_or("")
    }

    /// The worker's device class: device kind (`cuda`, `cpu`, …, without the index),
    /// precision, evaluation micro-batch and model hash. Workers of one class give bitwise
    /// identical answers (see `WorkerInfo.eval_batch`), so spot checks compare within it.
    pub fn device_class(&self) -> String {
        match &self.info {
            None => String::new(),
            Some(i) => format!(
                "{}/{}/eb{}/{}",
                i.device.split(':').next().unwrap_or(""),
                i.precision,
                i.eval_batch,
                self.model_hash()
            ),
        }
    }

    /// True if the worker may receive a new batch of a job pinned to `hash` now.
    pub fn can_take(&self, hash: &str, max_in_flight: usize) -> bool {
        self.health == WorkerHealth::Ready
            && self.in_flight < max_in_flight
            && !hash.is_empty()
            && self.model_hash() == hash
    }

    /// True if the worker serves `hash` and is or may become usable (ready or benched).
    pub fn may_serve(&self, hash: &str) -> bool {
        matches!(self.health, WorkerHealth::Ready | WorkerHealth::Benched(_))
            && !hash.is_empty()
            && self.model_hash() == hash
    }

    /// Records a sign of life.
    pub fn seen(&mut self) {
        self.last_seen = Instant::now();
        self.last_seen_unix = crate::job::unix_now();
    }

    /// Marks the worker lost and abandons its in-flight RPCs (they will be reassigned).
    pub fn mark_lost(&mut self, why: &str) {
        if self.health != WorkerHealth::Lost {
            tracing::warn!(worker = %self.id, address = %self.address, "worker lost: {why}");
        }
        self.health = WorkerHealth::Lost;
        self.generation += 1;
        self.in_flight = 0;
        self.generation_tx.send_replace(self.generation);
    }

    /// The proto view for `ListWorkers`.
    pub fn to_proto(&self) -> v1::WorkerStatus {
        v1::WorkerStatus {
            worker_id: self.id.clone(),
            address: self.address.clone(),
            info: self.info.clone(),
            state: self.health.name().to_string(),
            last_heartbeat_unix: self.last_seen_unix,
            in_flight: self.in_flight as u32,
            batches_done: self.batches_done,
            failures: self.failures,
            name: self.name.clone(),
            owner: self.owner.clone().unwrap_or_default(),
            shared_memory: self.shared.is_some(),
        }
    }
}

/// A lazily connecting client for `address` with raised message limits and HTTP/2
/// windows sized for patch tensors (REFERENCE.md §9), presenting `token` and dialling
/// `https://` with `tls`.
pub fn connect(
    address: &str,
    max_message_bytes: usize,
    token: Option<&str>,
    tls: &ClientTls,
) -> Result<WorkerClient<AuthChannel>> {
    let fail = |cause: String| CoordinatorError::Worker {
        worker: address.to_string(),
        address: address.to_string(),
        cause,
    };
    let bearer = Bearer::new(token).map_err(|e| fail(e.to_string()))?;
    let endpoint = dmqsm_proto::transport::endpoint(address, tls)
        .map_err(|e| fail(e.to_string()))?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect_lazy();
    Ok(WorkerClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes))
}

/// Asks a worker what it serves, within `timeout`.
pub async fn fetch_info(
    client: &mut WorkerClient<AuthChannel>,
    address: &str,
    timeout: Duration,
) -> Result<v1::WorkerInfo> {
    let fail = |cause: String| CoordinatorError::Worker {
        worker: address.to_string(),
        address: address.to_string(),
        cause,
    };
    match tokio::time::timeout(timeout, client.info(v1::InfoRequest {})).await {
        Err(_) => Err(fail(format!("Info not answered within {timeout:?}"))),
        Ok(Err(s)) => Err(fail(format!("Info failed: {}", s.message()))),
        Ok(Ok(r)) => {
            let info = r.into_inner();
            match &info.model {
                Some(m) if !m.content_hash.is_empty() && m.patch_size > 0 => Ok(info),
                _ => Err(fail(
                    "Info names no model (content hash and patch size are required)".into(),
                )),
            }
        }
    }
}
