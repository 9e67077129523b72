//! [`Dispatcher`]: sends patch batches of many jobs to many workers.
//!
//! - **Bounded in-flight.** Each worker holds at most `max_in_flight_per_worker` batches,
//!   enough to keep a device busy while the next batch travels, never a flood.
//! - **Fair, with priority.** Jobs are served strictly by priority; jobs of equal
//!   priority take turns (the one served longest ago goes next), so a big job cannot
//!   starve a small one.
//! - **Model pinning.** A batch only goes to a worker whose model content hash equals
//!   the job's. A worker that changes its model is a new worker.
//! - **Retries.** A failed or timed-out batch goes back to the head of its job's queue
//!   and is retried, preferably on a worker that has not failed it yet. After
//!   `max_retries` retries the batch (and so its job) fails with an error naming the job,
//!   the batch, the last worker and the cause.
//! - **Lost workers.** Registered workers must heartbeat; static ones are probed with
//!   `Info`. A worker silent for `missed_heartbeats` intervals is marked lost and its
//!   in-flight batches are reassigned at once. A worker failing several batches in a row
//!   is benched for a while. A job whose batches have no usable worker for
//!   `no_worker_grace` fails instead of hanging.
//!
//! - **Checked answers.** A malformed answer (wrong shape, non-finite values) is proof
//!   that the worker is broken: it is marked untrusted at once and the batch is retried
//!   elsewhere. With spot checks on (`spot_check_fraction`), a deterministic share of
//!   batches (by job and batch label) is recomputed on a second worker of the same
//!   device class (device kind, precision, micro-batch, model), which must agree bit for
//!   bit. On a disagreement a third worker of the class decides: the outvoted worker is
//!   untrusted, and jobs that took unchecked answers from it start over
//!   ([`Dispatcher::is_untrusted`]). Without a third worker the batch fails, naming both.
//!
//! The dispatcher does not choose a batch's contents: which patches form a batch is fixed
//! by the job (see `runner`), so the bits of a result never depend on which worker ran
//! it. It is the edge where answers arrive, so it decodes and checks each answer once,
//! into the sampler's `PatchResults`; a malformed answer counts as that worker's failure.

use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result};
use crate::shared_plane::{SharedPlane, SlotLease};
use crate::workers::{WorkerEntry, WorkerHealth, connect, fetch_info};
use dmqsm_common::diffusion::sampler::{
    BatchTensor, PatchResults, PatchSource, RoundId, RoundKind,
};
use dmqsm_proto::v1;
use ndarray::Array4;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

/// The RPC a batch is sent as, built at send time ([`WireBatch::inline`],
/// [`WireBatch::staged`]).
#[derive(Debug, Clone)]
pub enum BatchRequest {
    /// ε (`Denoise`).
    Eps(v1::DenoiseRequest),
    /// Jᵀv (`DenoiseVjp`).
    Vjp(v1::DenoiseVjpRequest),
}

/// Where a batch's input tensors come from.
#[derive(Debug, Clone)]
pub enum BatchInputs {
    /// Cut from the round's read-only x_t (and cotangents) when the batch is sent:
    /// straight into the worker's shared-memory slot, with no buffer in between, or
    /// stacked and encoded for the socket. A queued batch holds no tensor bytes, and a
    /// retry cuts the same values again.
    Cut(PatchSource),
    /// Encoded already: the patches `[B, P, P, P]`, and the cotangents of a VJP batch.
    Encoded {
        /// The patches.
        patches: v1::Tensor,
        /// The cotangents (VJP batches only).
        cotangents: Option<v1::Tensor>,
    },
}

/// One batch of patch evaluations of a job as it goes to a worker: which patches of
/// which round, for which model, and where its inputs come from (the sampler's stacked
/// patches are `dmqsm_common::diffusion::sampler::PatchBatch`).
#[derive(Debug, Clone)]
pub struct WireBatch {
    /// The job it belongs to.
    pub job_id: String,
    /// Human-readable position, e.g. `sample 1 step 3/25 eps batch 7/12`, used in errors.
    pub label: String,
    /// The sampler round the batch belongs to: an ε round sends `Denoise`, a VJP round
    /// `DenoiseVjp`.
    pub round: RoundId,
    /// The patch of each row.
    pub indices: Vec<usize>,
    /// Content hash of the model every row must be evaluated with.
    pub model_hash: String,
    /// Training timestep per row.
    pub timesteps: Vec<f32>,
    /// Element type of the tensors both ways (the answer is asked for in it too).
    pub dtype: v1::Dtype,
    /// The input tensors.
    pub inputs: BatchInputs,
}

impl WireBatch {
    fn is_vjp(&self) -> bool {
        self.round.kind == RoundKind::Vjp
    }

    /// Shape of the patches tensor, `[B, P, P, P]` (the shape an answer must have).
    fn patch_shape(&self) -> Vec<u32> {
        match &self.inputs {
            BatchInputs::Encoded { patches, .. } => patches.shape.clone(),
            BatchInputs::Cut(source) => {
                let p = source.patch_size() as u32;
                vec![self.indices.len() as u32, p, p, p]
            }
        }
    }

    fn element_size(&self) -> u64 {
        dmqsm_proto::tensor::element_size(self.dtype).unwrap_or(4) as u64
    }

    /// Tensor payload bytes the request carries (patches, plus cotangents for a VJP).
    pub fn payload_bytes(&self) -> u64 {
        match &self.inputs {
            BatchInputs::Encoded {
                patches,
                cotangents,
            } => patches.data.len() as u64 + cotangents.as_ref().map_or(0, |c| c.data.len() as u64),
            BatchInputs::Cut(source) => {
                let tensors = if source.has_cotangents() { 2 } else { 1 };
                tensors * self.values() * self.element_size()
            }
        }
    }

    /// Values per input tensor: B·P³.
    fn values(&self) -> u64 {
        self.patch_shape().iter().map(|&s| s as u64).product()
    }

    /// Tensor payload bytes of an accepted answer to it: the answer's values in the element
    /// type the request asked for (workers answer in it).
    pub fn answer_bytes(&self, answer: &PatchResults) -> u64 {
        answer.values().len() as u64 * self.element_size()
    }

    /// The request around `patches` (and `cotangents`), answered into `answer_to` when
    /// it is a shared-memory place.
    fn request(
        &self,
        patches: v1::Tensor,
        cotangents: Option<v1::Tensor>,
        answer_to: Option<v1::SharedBytes>,
    ) -> BatchRequest {
        if self.is_vjp() {
            BatchRequest::Vjp(v1::DenoiseVjpRequest {
                model_hash: self.model_hash.clone(),
                patches: Some(patches),
                timesteps: self.timesteps.clone(),
                cotangents,
                response_dtype: self.dtype as i32,
                answer_to,
            })
        } else {
            BatchRequest::Eps(v1::DenoiseRequest {
                model_hash: self.model_hash.clone(),
                patches: Some(patches),
                timesteps: self.timesteps.clone(),
                response_dtype: self.dtype as i32,
                answer_to,
            })
        }
    }

    /// The encoded input tensors (patches, cotangents), cut and stacked now for a
    /// [`BatchInputs::Cut`] batch.
    fn encoded(&self) -> std::result::Result<(v1::Tensor, Option<v1::Tensor>), String> {
        match &self.inputs {
            BatchInputs::Encoded {
                patches,
                cotangents,
            } => Ok((patches.clone(), cotangents.clone())),
            BatchInputs::Cut(source) => {
                let b = source
                    .batch(&self.indices)
                    .map_err(|e| format!("cutting the batch: {e}"))?;
                let encode = |a| dmqsm_proto::tensor::encode_array(a, self.dtype);
                Ok((encode(b.x), b.cotangent.map(encode)))
            }
        }
    }

    /// The request with its tensors inline, for the socket.
    fn inline(&self) -> std::result::Result<BatchRequest, String> {
        let (patches, cotangents) = self.encoded()?;
        Ok(self.request(patches, cotangents, None))
    }

    /// The request with its tensors in `lease`'s slot; `None` when they and the answer
    /// do not fit (the request then travels inline). A [`BatchInputs::Cut`] batch in f32
    /// is cut straight into the slot, row run by row run, without a buffer in between:
    /// the same bytes as [`WireBatch::inline`]'s tensors.
    fn staged(&self, lease: &SlotLease) -> std::result::Result<Option<BatchRequest>, String> {
        let source = match &self.inputs {
            BatchInputs::Cut(source) if matches!(self.dtype, v1::Dtype::F32) => source,
            _ => {
                let (patches, cotangents) = self.encoded()?;
                let Some(t) = lease
                    .stage(&patches, cotangents.as_ref())
                    .map_err(|e| e.to_string())?
                else {
                    return Ok(None);
                };
                return Ok(Some(self.request(
                    t.patches,
                    t.cotangents,
                    Some(t.answer_to),
                )));
            }
        };
        let bytes = self.values() * 4;
        let tensors = if source.has_cotangents() { 2 } else { 1 };
        let Some(layout) = lease.layout(&vec![bytes; tensors], bytes) else {
            return Ok(None);
        };
        let mut failed = None;
        source
            .visit_batch(&self.indices, |tensor, at, run| {
                let place = match tensor {
                    BatchTensor::Patches => &layout.inputs[0],
                    BatchTensor::Cotangents => &layout.inputs[1],
                };
                if failed.is_none()
                    && let Err(e) = dmqsm_proto::tensor::with_f32_le_bytes(run, |b| {
                        lease.write(place, at as u64 * 4, b)
                    })
                {
                    failed = Some(e);
                }
            })
            .map_err(|e| format!("cutting the batch: {e}"))?;
        if let Some(e) = failed {
            return Err(e.to_string());
        }
        let shape = self.patch_shape();
        let tensor = |at: &v1::SharedBytes| v1::Tensor {
            shape: shape.clone(),
            dtype: v1::Dtype::F32 as i32,
            data: Default::default(),
            shared: Some(at.clone()),
        };
        let patches = tensor(&layout.inputs[0]);
        let cotangents = source.has_cotangents().then(|| tensor(&layout.inputs[1]));
        Ok(Some(self.request(
            patches,
            cotangents,
            Some(layout.answer_to),
        )))
    }
}

/// A batch answered.
#[derive(Debug, Clone)]
pub struct BatchOutcome {
    /// The worker's answer, decoded and checked once here at the edge (shape against the
    /// request, finite values): ε for an ε batch, Jᵀv for a VJP batch.
    pub results: PatchResults,
    /// Worker that answered.
    pub worker_id: String,
    /// Failed attempts before this answer (0 if the first try succeeded).
    pub retries: u32,
}

/// Why a batch was not answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DispatchError {
    /// The job was cancelled or removed.
    #[error("job {job}: cancelled")]
    Cancelled {
        /// Job id.
        job: String,
    },
    /// Every attempt failed.
    #[error(
        "job {job}: {batch} failed {attempts} times; last on worker {worker} ({address}): {cause}"
    )]
    Exhausted {
        /// Job id.
        job: String,
        /// Batch label.
        batch: String,
        /// Attempts made.
        attempts: u32,
        /// Last worker tried.
        worker: String,
        /// Its address.
        address: String,
        /// The last cause.
        cause: String,
    },
    /// No usable worker for the job's model for longer than the grace period.
    #[error(
        "job {job}: no usable worker serves model {model_hash} (waited {waited_s:.1} s; {detail})"
    )]
    NoWorker {
        /// Job id.
        job: String,
        /// The pinned model hash.
        model_hash: String,
        /// Seconds waited.
        waited_s: f64,
        /// What the workers were doing.
        detail: String,
    },
}

/// Per-worker load, for progress reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerLoadView {
    /// Worker id.
    pub worker_id: String,
    /// Batches in flight on it (all jobs).
    pub in_flight: u32,
    /// Batches it answered (all jobs).
    pub batches_done: u64,
}

struct Pending {
    batch: Arc<WireBatch>,
    attempts: u32,
    tried: BTreeSet<String>,
    reply: oneshot::Sender<std::result::Result<BatchOutcome, DispatchError>>,
    /// Answers of a spot-checked batch so far (worker id, results); the next attempt
    /// must go to a worker of `class` that is not among them.
    check: Option<SpotCheck>,
}

impl Pending {
    /// Sends the batch's outcome. The batch is dropped first, so the round's x_t it
    /// views is no longer held here once the runner has the answer (the sampler then
    /// reuses that buffer for the next state instead of allocating one).
    fn answer(self, outcome: std::result::Result<BatchOutcome, DispatchError>) {
        let Pending { batch, reply, .. } = self;
        drop(batch);
        let _ = reply.send(outcome);
    }
}

struct SpotCheck {
    class: String,
    answers: Vec<(String, PatchResults)>,
}

impl SpotCheck {
    fn answered(&self, worker: &str) -> bool {
        self.answers.iter().any(|(w, _)| w == worker)
    }
}

/// True if the batch `label` of `job` is spot-checked at `fraction`: a hash of the two,
/// mapped to [0, 1), is below it. The same batches are chosen on every run.
pub fn spot_checked(job: &str, label: &str, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let h = job
        .bytes()
        .chain([0u8])
        .chain(label.bytes())
        .fold(0x5eed_u64, |h, b| {
            dmqsm_common::splitmix::mix64(h ^ u64::from(b))
        });
    ((h >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

fn same_bits(a: &PatchResults, b: &PatchResults) -> bool {
    a.indices() == b.indices()
        && a.values().shape() == b.values().shape()
        && a.values()
            .iter()
            .zip(b.values().iter())
            .all(|(x, y)| x.to_bits() == y.to_bits())
}

struct JobQueue {
    priority: i32,
    model_hash: String,
    pending: VecDeque<Pending>,
    last_served: u64,
    starved_since: Option<Instant>,
}

/// A worker's `RegisterWorker` call, authenticated (see [`Dispatcher::register_worker`]).
#[derive(Debug, Clone, Copy)]
pub struct WorkerRegistration<'a> {
    /// Address to dial back (`http(s)://host:port`, already checked by the service).
    pub address: &'a str,
    /// The id an earlier registration assigned ("" for a new worker).
    pub previous_id: &'a str,
    /// Display name.
    pub name: &'a str,
    /// Name of the caller's token ("local" without authentication).
    pub owner: &'a str,
    /// The caller's token, presented when dialling the worker back.
    pub token: Option<&'a str>,
}

/// The id of the `n`-th registration: `w<n>`, followed by the worker's name when it has
/// one (`w3-gpu-node-1`), so logs and reports stay readable. Only ASCII letters, digits,
/// `-`, `_` and `.` of the name are kept, at most 48 of them.
pub fn assigned_id(n: u64, name: &str) -> String {
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(48)
        .collect();
    if clean.is_empty() {
        format!("w{n}")
    } else {
        format!("w{n}-{clean}")
    }
}

/// Why a registration or heartbeat was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    /// The worker id belongs to another authenticated identity.
    #[error(
        "worker {0} was registered by another identity; only it may heartbeat, drain or re-register it"
    )]
    NotYours(String),
    /// The address is registered by another identity.
    #[error("address {0} is registered by another worker identity")]
    AddressTaken(String),
    /// The worker could not be dialled back, or refused the caller's token.
    #[error(
        "could not reach a worker at {0} that accepts this token (is `dmqsm-worker serve` listening there, with the same token?)"
    )]
    Unreachable(String),
}

#[derive(Default)]
struct State {
    /// Workers proven wrong, ever (ids are never reused within a process).
    untrusted: BTreeSet<String>,
    next_worker: u64,
    workers: BTreeMap<String, WorkerEntry>,
    jobs: BTreeMap<String, JobQueue>,
    serve_counter: u64,
    shut_down: bool,
}

struct Assignment {
    pending: Pending,
    worker_id: String,
    address: String,
    client: v1::worker_client::WorkerClient<dmqsm_proto::transport::AuthChannel>,
    /// The worker's shared-memory plane, when it runs on this host.
    shared: Option<Arc<SharedPlane>>,
    generation: u64,
    generation_rx: tokio::sync::watch::Receiver<u64>,
}

struct Inner {
    config: CoordinatorConfig,
    state: Mutex<State>,
    wake: Notify,
}

/// Schedules patch batches of all jobs onto the workers (see the module docs).
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state (counters only).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Dispatcher {
    /// A dispatcher with no workers; starts its scheduling and health loops on the
    /// current tokio runtime.
    pub fn new(config: CoordinatorConfig) -> Self {
        let inner = Arc::new(Inner {
            config,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        });
        let sched = tokio::spawn(scheduler_loop(inner.clone()));
        let health = tokio::spawn(health_loop(inner.clone()));
        Self {
            inner,
            tasks: Arc::new(Mutex::new(vec![sched, health])),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.inner.config
    }

    /// Adds a statically listed worker (probed with `Info`, no heartbeats expected). If it
    /// does not answer yet it is kept as lost and probed until it does. Returns its id.
    pub async fn add_static_worker(&self, address: &str) -> Result<String> {
        let sec = &self.inner.config.security;
        let mut client = connect(
            address,
            self.inner.config.max_message_bytes,
            sec.static_worker_token.as_deref(),
            &sec.worker_tls,
        )?;
        let info = fetch_info(
            &mut client,
            address,
            self.inner.config.heartbeat_interval * 2,
        )
        .await
        .map_err(|e| tracing::warn!("static worker {address} not answering yet: {e}"))
        .ok();
        let id = info
            .as_ref()
            .map(|i| i.worker_id.clone())
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| address.to_string());
        let shared = match info {
            Some(_) => self.shared_plane(&mut client, &id).await,
            None => None,
        };
        let mut entry = WorkerEntry::new(id.clone(), address.to_string(), client, info, false);
        entry.shared = shared;
        self.insert_worker(entry);
        Ok(id)
    }

    /// The shared-memory plane to a worker on this host, unless the configuration turns
    /// it off or the worker does not attach it (see [`SharedPlane::attach`]).
    async fn shared_plane(
        &self,
        client: &mut v1::worker_client::WorkerClient<dmqsm_proto::transport::AuthChannel>,
        worker: &str,
    ) -> Option<Arc<SharedPlane>> {
        let c = &self.inner.config;
        if c.shared_memory_slot_bytes == 0 {
            return None;
        }
        SharedPlane::attach(
            client,
            worker,
            c.max_in_flight_per_worker,
            c.shared_memory_slot_bytes,
            Duration::from_secs(10),
        )
        .await
    }

    /// Registers a worker that dialled in (`RegisterWorker`) as `owner` (the name of its
    /// token): dials `address` back presenting `token`, fetches its `Info`, and adds it
    /// under a coordinator-assigned id, which it returns. `previous_id` re-registers an
    /// earlier registration of the same owner (after a lost link); the same address
    /// registered again by the same owner replaces the old entry. An id or address held
    /// by another owner is refused.
    pub async fn register_worker(
        &self,
        registration: WorkerRegistration<'_>,
    ) -> std::result::Result<String, RegistrationError> {
        let WorkerRegistration {
            address,
            previous_id,
            name,
            owner,
            token,
        } = registration;
        {
            let st = self.inner.lock();
            if let Some(w) = st.workers.get(previous_id)
                && w.owner.as_deref() != Some(owner)
            {
                return Err(RegistrationError::NotYours(previous_id.to_string()));
            }
            if let Some(w) = st
                .workers
                .values()
                .find(|w| w.address == address && w.owner.as_deref() != Some(owner))
                && w.health != WorkerHealth::Lost
            {
                return Err(RegistrationError::AddressTaken(w.address.clone()));
            }
        }
        let sec = &self.inner.config.security;
        let mut client = connect(
            address,
            self.inner.config.max_message_bytes,
            token,
            &sec.worker_tls,
        )
        .map_err(|e| RegistrationError::Unreachable(e.to_string()))?;
        // The dial-back's error text is not passed on: it would tell the caller what
        // exists at an address of its choosing.
        let info = fetch_info(&mut client, address, Duration::from_secs(10))
            .await
            .map_err(|e| {
                tracing::warn!(%address, %owner, "registration refused: {e}");
                RegistrationError::Unreachable(address.to_string())
            })?;
        let shared = self.shared_plane(&mut client, address).await;
        let mut st = self.inner.lock();
        let id = match st.workers.get(previous_id) {
            Some(w) if w.owner.as_deref() == Some(owner) => previous_id.to_string(),
            _ => {
                st.next_worker += 1;
                assigned_id(st.next_worker, name)
            }
        };
        // A worker restarted on the same address replaces its old entry.
        let stale: Vec<String> = st
            .workers
            .values()
            .filter(|w| w.address == address && w.id != id)
            .map(|w| w.id.clone())
            .collect();
        for s in stale {
            if let Some(mut old) = st.workers.remove(&s) {
                old.mark_lost(&format!("replaced by the new registration {id}"));
            }
        }
        let mut entry = WorkerEntry::new(id.clone(), address.to_string(), client, Some(info), true);
        entry.owner = Some(owner.to_string());
        entry.shared = shared;
        if !name.is_empty() {
            entry.name = name.to_string();
        }
        tracing::info!(worker = %id, name = %entry.name, %address, %owner, model = ?entry.info.as_ref().and_then(|i| i.model.as_ref()).map(|m| &m.model_id), "worker registered");
        if let Some(mut old) = st.workers.remove(&id) {
            old.mark_lost("registered again");
        }
        st.workers.insert(id.clone(), entry);
        drop(st);
        self.inner.wake.notify_one();
        Ok(id)
    }

    fn insert_worker(&self, entry: WorkerEntry) {
        let mut st = self.inner.lock();
        if let Some(mut old) = st.workers.remove(&entry.id) {
            old.mark_lost("replaced by a new registration");
        }
        st.workers.insert(entry.id.clone(), entry);
        drop(st);
        self.inner.wake.notify_one();
    }

    /// Records a heartbeat from `owner` (the name of the caller's token). Returns
    /// `Ok(false)` if the worker is unknown (it should register), and refuses a
    /// heartbeat (or a drain) for a worker another identity registered.
    pub fn heartbeat(
        &self,
        worker_id: &str,
        draining: bool,
        owner: &str,
    ) -> std::result::Result<bool, RegistrationError> {
        let mut st = self.inner.lock();
        let Some(w) = st.workers.get_mut(worker_id) else {
            return Ok(false);
        };
        if w.owner.as_deref() != Some(owner) {
            return Err(RegistrationError::NotYours(worker_id.to_string()));
        }
        w.seen();
        if draining {
            w.health = WorkerHealth::Draining;
        } else if matches!(w.health, WorkerHealth::Lost | WorkerHealth::Draining) {
            tracing::info!(worker = %worker_id, "worker is back");
            w.health = WorkerHealth::Ready;
        }
        drop(st);
        self.inner.wake.notify_one();
        Ok(true)
    }

    /// Removes a worker; its in-flight batches are reassigned.
    pub fn remove_worker(&self, worker_id: &str) -> bool {
        let mut st = self.inner.lock();
        let found = st
            .workers
            .remove(worker_id)
            .map(|mut w| w.mark_lost("removed"));
        drop(st);
        self.inner.wake.notify_one();
        found.is_some()
    }

    /// Every known worker, for `ListWorkers`.
    pub fn workers(&self) -> Vec<v1::WorkerStatus> {
        self.inner
            .lock()
            .workers
            .values()
            .map(WorkerEntry::to_proto)
            .collect()
    }

    /// Models served by ready workers, with how many workers serve each:
    /// `(ModelInfo, count)`, most-served first then by hash.
    pub fn ready_models(&self) -> Vec<(v1::ModelInfo, usize)> {
        let st = self.inner.lock();
        let mut by_hash: BTreeMap<String, (v1::ModelInfo, usize)> = BTreeMap::new();
        for w in st.workers.values() {
            if w.health != WorkerHealth::Ready {
                continue;
            }
            if let Some(m) = w.info.as_ref().and_then(|i| i.model.as_ref()) {
                by_hash
                    .entry(m.content_hash.clone())
                    .or_insert_with(|| (m.clone(), 0))
                    .1 += 1;
            }
        }
        let mut v: Vec<_> = by_hash.into_values().collect();
        v.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| a.0.content_hash.cmp(&b.0.content_hash))
        });
        v
    }

    /// True if `worker_id` was proven wrong (a malformed answer or a lost spot check)
    /// since this coordinator started. A job that took answers from it starts over.
    pub fn is_untrusted(&self, worker_id: &str) -> bool {
        self.inner.lock().untrusted.contains(worker_id)
    }

    /// Per-worker load.
    pub fn load(&self) -> Vec<WorkerLoadView> {
        self.inner
            .lock()
            .workers
            .values()
            .map(|w| WorkerLoadView {
                worker_id: w.id.clone(),
                in_flight: w.in_flight as u32,
                batches_done: w.batches_done,
            })
            .collect()
    }

    /// Batches queued and not yet sent to a worker, all jobs (for the metrics endpoint).
    pub fn pending_batches(&self) -> usize {
        self.inner
            .lock()
            .jobs
            .values()
            .map(|q| q.pending.len())
            .sum()
    }

    /// Opens (or updates) the queue of a job pinned to `model_hash`.
    pub fn open_job(&self, job_id: &str, priority: i32, model_hash: &str) {
        let mut st = self.inner.lock();
        let q = st
            .jobs
            .entry(job_id.to_string())
            .or_insert_with(|| JobQueue {
                priority,
                model_hash: model_hash.to_string(),
                pending: VecDeque::new(),
                last_served: 0,
                starved_since: None,
            });
        q.priority = priority;
        q.model_hash = model_hash.to_string();
    }

    /// Closes a job's queue: pending batches answer `Cancelled`, answers still in flight
    /// are dropped.
    pub fn close_job(&self, job_id: &str) {
        let q = self.inner.lock().jobs.remove(job_id);
        if let Some(q) = q {
            for p in q.pending {
                p.answer(Err(DispatchError::Cancelled {
                    job: job_id.to_string(),
                }));
            }
        }
    }

    /// Queues a batch of an open job; the receiver yields its outcome.
    pub fn submit(
        &self,
        batch: WireBatch,
    ) -> oneshot::Receiver<std::result::Result<BatchOutcome, DispatchError>> {
        let (tx, rx) = oneshot::channel();
        let job = batch.job_id.clone();
        let pending = Pending {
            batch: Arc::new(batch),
            attempts: 0,
            tried: BTreeSet::new(),
            reply: tx,
            check: None,
        };
        let mut st = self.inner.lock();
        match st.jobs.get_mut(&job) {
            Some(q) => q.pending.push_back(pending),
            None => {
                pending.answer(Err(DispatchError::Cancelled { job }));
            }
        }
        drop(st);
        self.inner.wake.notify_one();
        rx
    }

    /// Stops the background loops (in-flight RPCs finish on their own).
    pub fn shutdown(&self) {
        self.inner.lock().shut_down = true;
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
        }
    }
}

/// Picks the worker for the head batch of a job: ready, same model, spare capacity,
/// preferring workers that have not failed this batch, then the least loaded.
fn pick_worker(
    workers: &BTreeMap<String, WorkerEntry>,
    hash: &str,
    pending: &Pending,
    max_in_flight: usize,
) -> Option<String> {
    let tried = &pending.tried;
    let eligible = |w: &WorkerEntry| match &pending.check {
        None => true,
        Some(c) => !c.answered(&w.id) && w.device_class() == c.class,
    };
    let fresh_exists = workers
        .values()
        .any(|w| w.may_serve(hash) && eligible(w) && !tried.contains(&w.id));
    workers
        .values()
        .filter(|w| w.can_take(hash, max_in_flight) && eligible(w))
        .filter(|w| !fresh_exists || !tried.contains(&w.id))
        .min_by(|a, b| {
            a.in_flight
                .cmp(&b.in_flight)
                .then(a.batches_done.cmp(&b.batches_done))
                .then_with(|| a.id.cmp(&b.id))
        })
        .map(|w| w.id.clone())
}

/// Assigns as many batches as capacity allows.
fn schedule(st: &mut State, config: &CoordinatorConfig) -> Vec<Assignment> {
    let now = Instant::now();
    for w in st.workers.values_mut() {
        if let WorkerHealth::Benched(until) = w.health
            && now >= until
        {
            w.health = WorkerHealth::Ready;
            w.consecutive_failures = 0;
        }
    }
    settle_unanswerable_checks(st);
    let mut out = Vec::new();
    loop {
        let mut order: Vec<(&String, &JobQueue)> = st
            .jobs
            .iter()
            .filter(|(_, q)| !q.pending.is_empty())
            .collect();
        order.sort_by(|a, b| {
            b.1.priority
                .cmp(&a.1.priority)
                .then(a.1.last_served.cmp(&b.1.last_served))
                .then_with(|| a.0.cmp(b.0))
        });
        let mut chosen = None;
        for (job_id, q) in order {
            let head = &q.pending[0];
            if let Some(w) = pick_worker(
                &st.workers,
                &q.model_hash,
                head,
                config.max_in_flight_per_worker,
            ) {
                chosen = Some((job_id.clone(), w));
                break;
            }
        }
        let Some((job_id, worker_id)) = chosen else {
            break;
        };
        st.serve_counter += 1;
        let counter = st.serve_counter;
        let Some(q) = st.jobs.get_mut(&job_id) else {
            break;
        };
        let Some(pending) = q.pending.pop_front() else {
            break;
        };
        q.last_served = counter;
        let Some(w) = st.workers.get_mut(&worker_id) else {
            break;
        };
        w.in_flight += 1;
        out.push(Assignment {
            pending,
            worker_id,
            address: w.address.clone(),
            client: w.client.clone(),
            shared: w.shared.clone(),
            generation: w.generation,
            generation_rx: w.generation_tx.subscribe(),
        });
    }
    // Jobs with work and no usable worker fail after the grace period.
    let mut starved = Vec::new();
    for (job_id, q) in st.jobs.iter_mut() {
        if q.pending.is_empty() {
            q.starved_since = None;
            continue;
        }
        let usable = st.workers.values().any(|w| w.may_serve(&q.model_hash));
        if usable {
            q.starved_since = None;
        } else {
            let since = *q.starved_since.get_or_insert(now);
            if now.duration_since(since) >= config.no_worker_grace {
                starved.push((job_id.clone(), now.duration_since(since)));
            }
        }
    }
    for (job_id, waited) in starved {
        let detail = if st.workers.is_empty() {
            "no workers are connected".to_string()
        } else {
            st.workers
                .values()
                .map(|w| {
                    format!(
                        "{} {} model {}",
                        w.id,
                        w.health.name(),
                        if w.model_hash().is_empty() {
                            "unknown"
                        } else {
                            w.model_hash()
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(q) = st.jobs.get_mut(&job_id) {
            tracing::error!(job = %job_id, "no usable worker for {:.1} s: {detail}", waited.as_secs_f64());
            for p in q.pending.drain(..) {
                p.answer(Err(DispatchError::NoWorker {
                    job: job_id.clone(),
                    model_hash: q.model_hash.clone(),
                    waited_s: waited.as_secs_f64(),
                    detail: detail.clone(),
                }));
            }
            q.starved_since = None;
        }
    }
    out
}

/// Spot checks that no worker can take any more: a check with one answer and no second
/// worker of its class is skipped (the answer stands; a check needs two workers); a
/// disagreement with no third worker to decide fails the batch, naming both workers.
fn settle_unanswerable_checks(st: &mut State) {
    let State { workers, jobs, .. } = st;
    for (job_id, q) in jobs.iter_mut() {
        let mut i = 0;
        while i < q.pending.len() {
            let p = &q.pending[i];
            let Some(c) = &p.check else {
                i += 1;
                continue;
            };
            let someone = workers.values().any(|w| {
                w.may_serve(&q.model_hash) && !c.answered(&w.id) && w.device_class() == c.class
            });
            if someone {
                i += 1;
                continue;
            }
            let Some(mut p) = q.pending.remove(i) else {
                break;
            };
            let Some(c) = p.check.take() else { continue };
            let mut answers = c.answers;
            if answers.len() == 1 {
                let (worker, results) = answers.remove(0);
                tracing::warn!(job = %job_id, batch = %p.batch.label, "spot check skipped: no second worker of class {} to compare with", c.class);
                let outcome = Ok(BatchOutcome {
                    results,
                    worker_id: worker,
                    retries: p.attempts,
                });
                p.answer(outcome);
            } else {
                let names: Vec<&str> = answers.iter().map(|(w, _)| w.as_str()).collect();
                let outcome = Err(DispatchError::Exhausted {
                    job: job_id.clone(),
                    batch: p.batch.label.clone(),
                    attempts: p.attempts + answers.len() as u32,
                    worker: names.join(" and "),
                    address: "spot check".into(),
                    cause: format!(
                        "workers {} disagree bit for bit on this batch, and no third worker of \
                         class {} can decide which is wrong",
                        names.join(" and "),
                        c.class
                    ),
                });
                p.answer(outcome);
            }
        }
    }
}

async fn scheduler_loop(inner: Arc<Inner>) {
    let tick = (inner.config.no_worker_grace / 4)
        .clamp(Duration::from_millis(20), Duration::from_millis(250));
    loop {
        let assignments = {
            let mut st = inner.lock();
            if st.shut_down {
                return;
            }
            schedule(&mut st, &inner.config)
        };
        for a in assignments {
            tokio::spawn(run_assignment(inner.clone(), a));
        }
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// The one place a worker's answer is decoded and checked: the tensor the request asked
/// for (ε for `Denoise`, Jᵀv for `DenoiseVjp`), with the request's shape, decoded to f32
/// (out of the batch's shared-memory slot `lease` when it points there, copied once) and
/// checked as [`PatchResults`] (one row per patch, finite values). A bad answer is a
/// failure of this worker, and the batch is retried elsewhere.
fn decode_reply(
    batch: &WireBatch,
    tensor: Option<v1::Tensor>,
    lease: Option<&SlotLease>,
) -> std::result::Result<PatchResults, String> {
    let name = if batch.is_vjp() { "vjp" } else { "eps" };
    let want = batch.patch_shape();
    let t = tensor.ok_or_else(|| format!("answer has no {name} tensor"))?;
    if t.shape != want {
        return Err(format!(
            "answer {name} has shape {:?}, expected {want:?}",
            t.shape
        ));
    }
    let (values, shape) = match (&t.shared, lease) {
        (Some(_), Some(l)) => l.decode(&t).map_err(|e| format!("answer {name}: {e}"))?,
        (Some(_), None) => {
            return Err("answer points into shared memory the request did not give".into());
        }
        (None, _) => dmqsm_proto::tensor::decode(&t).map_err(|e| format!("answer {name}: {e}"))?,
    };
    let dims: [usize; 4] = shape
        .try_into()
        .map_err(|s: Vec<usize>| format!("answer {name} has shape {s:?}, expected 4-D"))?;
    let values = Array4::from_shape_vec(dims, values).map_err(|e| format!("answer {name}: {e}"))?;
    PatchResults::new(batch.round, batch.indices.clone(), values)
        .map_err(|e| format!("answer rejected: {e}"))
}

/// Why an attempt failed; `malformed` answers are proof that the worker is broken.
struct Failure {
    cause: String,
    malformed: bool,
}

/// One attempt of a batch on its assigned worker. Through a slot of the worker's shared
/// memory plane when it has a free one and the batch fits (see [`SharedPlane`]),
/// otherwise inline; the answer is decoded and checked the same way either way.
async fn call_worker(
    a: &mut Assignment,
    timeout: Duration,
) -> std::result::Result<PatchResults, Failure> {
    let plain = |cause: String| Failure {
        cause,
        malformed: false,
    };
    let lease = a.shared.as_ref().and_then(SharedPlane::lease);
    let staged = match &lease {
        Some(l) => a.pending.batch.staged(l).unwrap_or_else(|e| {
            tracing::warn!(worker = %a.worker_id, "batch sent inline: {e}");
            None
        }),
        None => None,
    };
    // A slot the batch does not use goes back at once.
    let lease = if staged.is_some() { lease } else { None };
    let request = match staged {
        Some(r) => r,
        None => a.pending.batch.inline().map_err(plain)?,
    };
    let mut client = a.client.clone();
    let rpc = async move {
        match request {
            BatchRequest::Eps(r) => client.denoise(r).await.map(|r| r.into_inner().eps),
            BatchRequest::Vjp(r) => client.denoise_vjp(r).await.map(|r| r.into_inner().vjp),
        }
    };
    let generation = a.generation;
    let rx = &mut a.generation_rx;
    let malformed = |cause: String| Failure {
        cause,
        malformed: true,
    };
    tokio::select! {
        r = tokio::time::timeout(timeout, rpc) => match r {
            Err(_) => {
                // The worker may still write its answer into the slot.
                if let Some(l) = lease {
                    l.retire();
                }
                Err(plain(format!("no answer within {:.1} s (batch timeout)", timeout.as_secs_f64())))
            }
            Ok(Err(s)) => {
                if let Some(l) = lease {
                    if s.code() == tonic::Code::FailedPrecondition {
                        // The worker lost the region (it restarted): inline from now on.
                        l.plane().mark_broken();
                    }
                    // A failure in transit may leave the worker running; never reuse it.
                    l.retire();
                }
                Err(plain(format!("{:?}: {}", s.code(), s.message())))
            }
            Ok(Ok(tensor)) => decode_reply(&a.pending.batch, tensor, lease.as_ref()).map_err(malformed),
        },
        _ = rx.wait_for(|g| *g != generation) => {
            if let Some(l) = lease {
                l.retire();
            }
            Err(plain("worker lost or untrusted; batch reassigned".to_string()))
        }
    }
}

/// Marks a worker untrusted (see [`WorkerHealth::Untrusted`]): its in-flight batches
/// are abandoned and reassigned, and jobs that used its answers start over.
fn untrust(st: &mut State, worker_id: &str, why: &str) {
    if let Some(w) = st.workers.get_mut(worker_id) {
        tracing::error!(worker = %worker_id, address = %w.address, "worker untrusted: {why}");
        w.mark_lost(why);
        w.health = WorkerHealth::Untrusted;
    }
    st.untrusted.insert(worker_id.to_string());
}

/// Reports one finished attempt to the metrics: worker, wall time, bytes each way and,
/// when answered, the patches evaluated.
fn record_attempt(
    config: &CoordinatorConfig,
    a: &Assignment,
    answer: Option<&PatchResults>,
    elapsed: Duration,
) {
    let batch = &a.pending.batch;
    config.metrics.attempt_finished(
        &a.worker_id,
        elapsed,
        batch.payload_bytes(),
        answer.map(|r| (r.indices().len(), batch.answer_bytes(r))),
    );
}

async fn run_assignment(inner: Arc<Inner>, mut a: Assignment) {
    let started = Instant::now();
    let result = call_worker(&mut a, inner.config.batch_timeout).await;
    let config = &inner.config;
    record_attempt(config, &a, result.as_ref().ok(), started.elapsed());
    let mut st = inner.lock();
    let mut class = String::new();
    if let Some(w) = st.workers.get_mut(&a.worker_id)
        && w.generation == a.generation
    {
        class = w.device_class();
        w.in_flight = w.in_flight.saturating_sub(1);
        match &result {
            Ok(_) => {
                w.batches_done += 1;
                w.consecutive_failures = 0;
                w.seen();
            }
            Err(f) => {
                w.failures += 1;
                w.consecutive_failures += 1;
                tracing::warn!(worker = %a.worker_id, job = %a.pending.batch.job_id, batch = %a.pending.batch.label, "batch failed: {}", f.cause);
                if w.consecutive_failures >= config.max_consecutive_failures
                    && w.health == WorkerHealth::Ready
                {
                    tracing::warn!(worker = %a.worker_id, "{} failures in a row; benched for {:?}", w.consecutive_failures, config.quarantine);
                    w.health = WorkerHealth::Benched(Instant::now() + config.quarantine);
                    config.metrics.worker_benched();
                }
            }
        }
    }
    if let Err(f) = &result
        && f.malformed
    {
        untrust(
            &mut st,
            &a.worker_id,
            &format!("malformed answer: {}", f.cause),
        );
    }
    let mut pending = a.pending;
    let job = pending.batch.job_id.clone();
    let requeue = |st: &mut State, pending: Pending| match st.jobs.get_mut(&pending.batch.job_id) {
        Some(q) => q.pending.push_front(pending),
        None => {
            let job = pending.batch.job_id.clone();
            pending.answer(Err(DispatchError::Cancelled { job }));
        }
    };
    match result {
        Ok(results) => {
            let checked = pending.check.is_some()
                || (!class.is_empty()
                    && spot_checked(&job, &pending.batch.label, config.spot_check_fraction));
            if !checked {
                let outcome = Ok(BatchOutcome {
                    results,
                    worker_id: a.worker_id,
                    retries: pending.attempts,
                });
                pending.answer(outcome);
            } else {
                let mut c = pending.check.take().unwrap_or(SpotCheck {
                    class,
                    answers: Vec::new(),
                });
                c.answers.push((a.worker_id.clone(), results));
                match c.answers.len() {
                    1 => {
                        pending.check = Some(c);
                        requeue(&mut st, pending);
                    }
                    2 if same_bits(&c.answers[0].1, &c.answers[1].1) => {
                        let (worker, results) = c.answers.swap_remove(0);
                        let outcome = Ok(BatchOutcome {
                            results,
                            worker_id: worker,
                            retries: pending.attempts,
                        });
                        pending.answer(outcome);
                    }
                    2 => {
                        tracing::warn!(job = %job, batch = %pending.batch.label, "spot check: workers {} and {} disagree; asking a third", c.answers[0].0, c.answers[1].0);
                        pending.check = Some(c);
                        requeue(&mut st, pending);
                    }
                    _ => {
                        let third = &c.answers[2].1;
                        let agree: Vec<usize> = (0..2)
                            .filter(|&i| same_bits(&c.answers[i].1, third))
                            .collect();
                        if let [good] = agree[..] {
                            let bad = c.answers[1 - good].0.clone();
                            untrust(
                                &mut st,
                                &bad,
                                &format!(
                                    "lost a spot check on job {job} {}: workers {} and {} agree bit for bit, it does not",
                                    pending.batch.label, c.answers[good].0, c.answers[2].0
                                ),
                            );
                            let (worker, results) = c.answers.swap_remove(good);
                            let outcome = Ok(BatchOutcome {
                                results,
                                worker_id: worker,
                                retries: pending.attempts,
                            });
                            pending.answer(outcome);
                        } else {
                            let names: Vec<String> =
                                c.answers.iter().map(|(w, _)| w.clone()).collect();
                            let outcome = Err(DispatchError::Exhausted {
                                job: job.clone(),
                                batch: pending.batch.label.clone(),
                                attempts: pending.attempts + 3,
                                worker: names.join(", "),
                                address: "spot check".into(),
                                cause: format!(
                                    "workers {} give three different answers for this batch",
                                    names.join(", ")
                                ),
                            });
                            pending.answer(outcome);
                        }
                    }
                }
            }
        }
        Err(f) => {
            pending.attempts += 1;
            pending.tried.insert(a.worker_id.clone());
            if pending.attempts > config.max_retries {
                let outcome = Err(DispatchError::Exhausted {
                    job,
                    batch: pending.batch.label.clone(),
                    attempts: pending.attempts,
                    worker: a.worker_id,
                    address: a.address,
                    cause: f.cause,
                });
                pending.answer(outcome);
            } else {
                config.metrics.batch_retried();
                requeue(&mut st, pending);
            }
        }
    }
    drop(st);
    inner.wake.notify_one();
}

async fn health_loop(inner: Arc<Inner>) {
    let interval = inner.config.heartbeat_interval;
    let lost_after = inner.config.lost_after();
    loop {
        tokio::time::sleep(interval).await;
        let mut probes = Vec::new();
        {
            let mut st = inner.lock();
            if st.shut_down {
                return;
            }
            let now = Instant::now();
            for w in st.workers.values_mut() {
                if w.registered {
                    if w.health != WorkerHealth::Lost
                        && now.duration_since(w.last_seen) > lost_after
                    {
                        w.mark_lost(&format!(
                            "no heartbeat for {:.1} s",
                            now.duration_since(w.last_seen).as_secs_f64()
                        ));
                    }
                } else {
                    probes.push((w.id.clone(), w.address.clone(), w.client.clone()));
                }
            }
        }
        inner.wake.notify_one();
        for (id, address, mut client) in probes {
            let inner = inner.clone();
            tokio::spawn(async move {
                let r = fetch_info(&mut client, &address, interval).await;
                let mut st = inner.lock();
                let Some(w) = st.workers.get_mut(&id) else {
                    return;
                };
                match r {
                    Ok(info) => {
                        let old_hash = w.model_hash().to_string();
                        let new_hash = info
                            .model
                            .as_ref()
                            .map(|m| m.content_hash.clone())
                            .unwrap_or_default();
                        if !old_hash.is_empty() && old_hash != new_hash {
                            w.mark_lost("it now serves a different model");
                        }
                        w.info = Some(info);
                        w.seen();
                        if w.health == WorkerHealth::Lost {
                            tracing::info!(worker = %id, "worker answers again");
                            w.health = WorkerHealth::Ready;
                        }
                    }
                    Err(e) => {
                        if w.health != WorkerHealth::Lost && w.last_seen.elapsed() > lost_after {
                            w.mark_lost(&format!("probe failed: {e}"));
                        }
                    }
                }
                drop(st);
                inner.wake.notify_one();
            });
        }
    }
}

/// Registers the error type of a dispatch failure as a job failure.
impl From<DispatchError> for CoordinatorError {
    fn from(e: DispatchError) -> Self {
        let job = match &e {
            DispatchError::Cancelled { job }
            | DispatchError::Exhausted { job, .. }
            | DispatchError::NoWorker { job, .. } => job.clone(),
        };
        CoordinatorError::JobFailed {
            job,
            cause: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmqsm_proto::v1::worker_server::{Worker, WorkerServer};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tonic::{Request, Response, Status};

    /// A scripted worker: ε = x / 2, optional latency, optional failures.
    #[derive(Clone, Default)]
    struct Fake {
        hash: String,
        latency: Duration,
        fail: Arc<AtomicBool>,
        /// Answers NaN instead of ε (a broken or rogue worker).
        nan: bool,
        active: Arc<AtomicUsize>,
        max_active: Arc<AtomicUsize>,
        calls: Arc<AtomicUsize>,
        /// Attaches shared memory (`Some`), answering into its slot or, `Some(true)`,
        /// pointing its answer outside the slot (a rogue worker).
        shm: Option<bool>,
        region: Arc<Mutex<Option<dmqsm_proto::shm::SharedRegion>>>,
        /// Requests whose patches came through shared memory.
        shared_calls: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl Worker for Fake {
        async fn info(
            &self,
            _r: Request<v1::InfoRequest>,
        ) -> std::result::Result<Response<v1::WorkerInfo>, Status> {
            Ok(Response::new(v1::WorkerInfo {
                model: Some(v1::ModelInfo {
                    model_id: "fake".into(),
                    content_hash: self.hash.clone(),
                    patch_size: 2,
                    chi_scale: 1.0,
                    ..Default::default()
                }),
                ..Default::default()
            }))
        }
        async fn denoise(
            &self,
            r: Request<v1::DenoiseRequest>,
        ) -> std::result::Result<Response<v1::DenoiseResponse>, Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_active.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.latency).await;
            self.active.fetch_sub(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(Status::internal("scripted failure"));
            }
            let r = r.into_inner();
            let mut t = r.patches.unwrap_or_default();
            let region = self.region.lock().unwrap();
            if let Some(shared) = t.shared.take() {
                self.shared_calls.fetch_add(1, Ordering::SeqCst);
                let region = region.as_ref().unwrap();
                t.data = region.read(shared.offset, shared.length).unwrap();
            }
            let (v, shape) = dmqsm_proto::tensor::decode(&t)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let half: Vec<f32> = v
                .iter()
                .map(|x| if self.nan { f32::NAN } else { x / 2.0 })
                .collect();
            let mut eps = dmqsm_proto::tensor::encode(&half, &shape, v1::Dtype::F32);
            if let (Some(to), Some(region)) = (r.answer_to, region.as_ref()) {
                // The rogue variant points at the region's header, outside its slot.
                let offset = if self.shm == Some(true) { 0 } else { to.offset };
                region.write(offset, &eps.data).unwrap();
                eps.shared = Some(v1::SharedBytes {
                    offset,
                    length: eps.data.len() as u64,
                    ..to
                });
                eps.data = Default::default();
            }
            Ok(Response::new(v1::DenoiseResponse { eps: Some(eps) }))
        }
        async fn denoise_vjp(
            &self,
            _r: Request<v1::DenoiseVjpRequest>,
        ) -> std::result::Result<Response<v1::DenoiseVjpResponse>, Status> {
            Err(Status::unimplemented("no vjp"))
        }
        async fn attach_shared_memory(
            &self,
            r: Request<v1::AttachSharedMemoryRequest>,
        ) -> std::result::Result<Response<v1::AttachSharedMemoryResponse>, Status> {
            if self.shm.is_none() {
                return Err(Status::unimplemented("no shared memory"));
            }
            let r = r.into_inner();
            let region = dmqsm_proto::shm::SharedRegion::open(&r.region).unwrap();
            assert!(region.has_nonce(&r.nonce).unwrap());
            *self.region.lock().unwrap() = Some(region);
            Ok(Response::new(v1::AttachSharedMemoryResponse {
                attached: true,
                reason: String::new(),
            }))
        }
    }

    async fn start(fake: Fake) -> (String, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(WorkerServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
                .await;
        });
        (format!("http://{addr}"), h)
    }

    fn config() -> CoordinatorConfig {
        let mut c = CoordinatorConfig::new("/nonexistent");
        c.batch_timeout = Duration::from_millis(500);
        c.heartbeat_interval = Duration::from_millis(100);
        c.no_worker_grace = Duration::from_millis(300);
        c.max_in_flight_per_worker = 2;
        c.max_retries = 2;
        c
    }

    fn batch(job: &str, i: usize) -> WireBatch {
        let x = [i as f32, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
        WireBatch {
            job_id: job.into(),
            label: format!("batch {i}"),
            round: RoundId {
                step: 0,
                kind: dmqsm_common::diffusion::sampler::RoundKind::Eps,
            },
            indices: vec![i],
            model_hash: "h1".into(),
            timesteps: vec![1.0],
            dtype: v1::Dtype::F32,
            inputs: BatchInputs::Encoded {
                patches: dmqsm_proto::tensor::encode(&x, &[1, 2, 2, 2], v1::Dtype::F32),
                cotangents: None,
            },
        }
    }

    fn first_value(o: &BatchOutcome) -> f32 {
        o.results.values()[[0, 0, 0, 0]]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spreads_batches_with_bounded_in_flight_and_never_uses_other_models() {
        let fakes: Vec<Fake> = (0..3)
            .map(|i| Fake {
                hash: if i < 2 { "h1".into() } else { "other".into() },
                latency: Duration::from_millis(20),
                ..Default::default()
            })
            .collect();
        let d = Dispatcher::new(config());
        for f in &fakes {
            let (url, _h) = start(f.clone()).await;
            d.add_static_worker(&url).await.unwrap();
        }
        d.open_job("j", 0, "h1");
        let rxs: Vec<_> = (0..12).map(|i| d.submit(batch("j", i))).collect();
        for (i, rx) in rxs.into_iter().enumerate() {
            let o = rx.await.unwrap().unwrap();
            assert_eq!(first_value(&o), i as f32 / 2.0);
            assert_eq!(o.retries, 0);
        }
        assert!(fakes[0].calls.load(Ordering::SeqCst) > 0);
        assert!(fakes[1].calls.load(Ordering::SeqCst) > 0);
        assert_eq!(
            fakes[2].calls.load(Ordering::SeqCst),
            0,
            "worker of another model used"
        );
        for f in &fakes[..2] {
            assert!(
                f.max_active.load(Ordering::SeqCst) <= 2,
                "in-flight bound exceeded"
            );
        }
        d.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_and_slow_batches_are_retried_elsewhere() {
        let bad = Fake {
            hash: "h1".into(),
            fail: Arc::new(AtomicBool::new(true)),
            ..Default::default()
        };
        let slow = Fake {
            hash: "h1".into(),
            latency: Duration::from_secs(3),
            ..Default::default()
        };
        let good = Fake {
            hash: "h1".into(),
            ..Default::default()
        };
        let d = Dispatcher::new(config());
        for f in [&bad, &slow, &good] {
            let (url, _h) = start(f.clone()).await;
            d.add_static_worker(&url).await.unwrap();
        }
        d.open_job("j", 0, "h1");
        let rxs: Vec<_> = (0..8).map(|i| d.submit(batch("j", i))).collect();
        let mut retried = 0;
        for (i, rx) in rxs.into_iter().enumerate() {
            let o = rx.await.unwrap().unwrap();
            assert_eq!(first_value(&o), i as f32 / 2.0);
            retried += o.retries;
        }
        assert!(retried > 0);
        assert!(good.calls.load(Ordering::SeqCst) >= 1);
        d.shutdown();
    }

    /// Runs 8 batches on `rogue` and an honest worker: every answer is right and none
    /// comes from the rogue, which ends untrusted. Returns the dispatcher, the rogue's id
    /// and the two servers.
    async fn rogue_is_untrusted_and_bypassed(
        rogue: Fake,
    ) -> (Dispatcher, String, [tokio::task::JoinHandle<()>; 2]) {
        let good = Fake {
            hash: "h1".into(),
            ..Default::default()
        };
        let d = Dispatcher::new(config());
        let (rogue_url, h1) = start(rogue.clone()).await;
        let (good_url, h2) = start(good).await;
        let rogue_id = d.add_static_worker(&rogue_url).await.unwrap();
        d.add_static_worker(&good_url).await.unwrap();
        d.open_job("j", 0, "h1");
        let rxs: Vec<_> = (0..8).map(|i| d.submit(batch("j", i))).collect();
        for (i, rx) in rxs.into_iter().enumerate() {
            let o = rx.await.unwrap().unwrap();
            assert_eq!(first_value(&o), i as f32 / 2.0);
            assert_ne!(o.worker_id, rogue_id);
        }
        assert!(rogue.calls.load(Ordering::SeqCst) >= 1);
        assert!(d.is_untrusted(&rogue_id));
        (d, rogue_id, [h1, h2])
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_non_finite_answer_untrusts_its_worker_and_the_batch_goes_elsewhere() {
        let rogue = Fake {
            hash: "h1".into(),
            nan: true,
            ..Default::default()
        };
        let (d, rogue_id, _h) = rogue_is_untrusted_and_bypassed(rogue).await;
        let ws = d.workers();
        let state = |id: &str| {
            ws.iter()
                .find(|w| w.worker_id == id)
                .map(|w| w.state.clone())
        };
        assert_eq!(state(&rogue_id).as_deref(), Some("untrusted"));
        // Untrusted stays untrusted: probes that it answers do not bring it back.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let ws = d.workers();
        assert_eq!(
            ws.iter()
                .find(|w| w.worker_id == rogue_id)
                .map(|w| w.state.as_str()),
            Some("untrusted")
        );
        d.shutdown();
    }

    /// A worker on this host gets its batches through shared memory, with the same
    /// answers; a worker pointing its answer outside its slot is untrusted like any
    /// malformed answer, and its batches go elsewhere.
    #[tokio::test]
    async fn shared_memory_carries_batches_and_an_answer_outside_the_slot_untrusts() {
        let honest = Fake {
            hash: "h1".into(),
            shm: Some(false),
            ..Default::default()
        };
        let d = Dispatcher::new(config());
        let (url, _h) = start(honest.clone()).await;
        let id = d.add_static_worker(&url).await.unwrap();
        assert!(d.workers().iter().all(|w| w.shared_memory));
        d.open_job("j", 0, "h1");
        let rxs: Vec<_> = (0..6).map(|i| d.submit(batch("j", i))).collect();
        for (i, rx) in rxs.into_iter().enumerate() {
            let o = rx.await.unwrap().unwrap();
            assert_eq!(first_value(&o), i as f32 / 2.0);
            assert_eq!(o.worker_id, id);
        }
        assert_eq!(honest.shared_calls.load(Ordering::SeqCst), 6);
        d.shutdown();

        let rogue = Fake {
            hash: "h1".into(),
            shm: Some(true),
            ..Default::default()
        };
        let (d, _, _h) = rogue_is_untrusted_and_bypassed(rogue.clone()).await;
        assert!(rogue.shared_calls.load(Ordering::SeqCst) >= 1);
        d.shutdown();
    }

    #[test]
    fn spot_checks_choose_batches_deterministically_at_the_asked_rate() {
        let picked = (0..10_000)
            .filter(|i| spot_checked("job-000001", &format!("batch {i}"), 0.25))
            .count();
        // Binomial(10⁴, 0.25): σ ≈ 43; 5σ either side.
        assert!((2285..=2715).contains(&picked), "{picked}");
        assert!(!spot_checked("j", "b", 0.0));
        assert!((0..100).all(|i| spot_checked("j", &i.to_string(), 1.0)));
        assert_eq!(
            spot_checked("job-7", "sample 0 step 3/25 eps batch 2/12", 0.5),
            spot_checked("job-7", "sample 0 step 3/25 eps batch 2/12", 0.5)
        );
        assert_eq!(assigned_id(3, "gpu node/1 ☃"), "w3-gpunode1");
        assert_eq!(assigned_id(4, ""), "w4");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exhausted_retries_and_missing_workers_fail_with_names() {
        let bad = Fake {
            hash: "h1".into(),
            fail: Arc::new(AtomicBool::new(true)),
            ..Default::default()
        };
        let d = Dispatcher::new(config());
        let (url, _h) = start(bad.clone()).await;
        d.add_static_worker(&url).await.unwrap();
        d.open_job("j", 0, "h1");
        let e = d
            .submit(batch("j", 0))
            .await
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("job j")
                && e.contains("batch 0")
                && e.contains(&url)
                && e.contains("scripted failure"),
            "{e}"
        );
        // A job pinned to a model nobody serves fails after the grace period.
        d.open_job("k", 0, "nobody");
        let e = d
            .submit(batch("k", 0))
            .await
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("job k") && e.contains("no usable worker") && e.contains("nobody"),
            "{e}"
        );
        // Closing a job answers its pending batches.
        d.close_job("j");
        let e = d.submit(batch("j", 1)).await.unwrap().unwrap_err();
        assert!(matches!(e, DispatchError::Cancelled { .. }));
        d.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn higher_priority_jobs_go_first_and_equal_ones_take_turns() {
        let w = Fake {
            hash: "h1".into(),
            latency: Duration::from_millis(5),
            ..Default::default()
        };
        let mut c = config();
        c.max_in_flight_per_worker = 1;
        let d = Dispatcher::new(c);
        let (url, _h) = start(w.clone()).await;
        // Queue everything before the worker exists, then let the scheduler choose.
        d.open_job("low", 0, "h1");
        d.open_job("high", 5, "h1");
        d.open_job("low2", 0, "h1");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut all = Vec::new();
        for (job, n) in [("low", 4), ("high", 4), ("low2", 4)] {
            for i in 0..n {
                let rx = d.submit(batch(job, i));
                let order = order.clone();
                all.push(tokio::spawn(async move {
                    rx.await.unwrap().unwrap();
                    order.lock().unwrap().push(job);
                }));
            }
        }
        d.add_static_worker(&url).await.unwrap();
        for h in all {
            h.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(&order[..4], &["high"; 4], "{order:?}");
        // The two equal-priority jobs alternate.
        let rest: Vec<_> = order[4..].to_vec();
        assert!(rest.windows(2).all(|w| w[0] != w[1]), "{rest:?}");
        d.shutdown();
    }
}
