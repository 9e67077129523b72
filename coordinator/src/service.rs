//! [`Coordinator`]: the job service (submit, status, cancel, watch, fetch, workers) and
//! its gRPC face ([`serve`]).
//!
//! Every job runs in its own task ([`crate::runner`]); the [`Dispatcher`] multiplexes
//! the batches of all jobs onto the workers. On start, jobs left queued or running by a
//! previous process resume from their last checkpoint.

use crate::config::CoordinatorConfig;
use crate::dispatch::Dispatcher;
use crate::error::{CoordinatorError, Result};
use crate::job::{JobRecord, JobSpec, JobState, unix_now};
use crate::state::{JobHandle, Shared};
use crate::store::JobStore;
use dmqsm_proto::auth::{Principal, Role};
use dmqsm_proto::v1;
use dmqsm_proto::v1::coordinator_server::{self, CoordinatorServer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tonic::{Request, Response, Status};

/// Largest result chunk streamed by `FetchResult`, in bytes.
pub const RESULT_CHUNK_BYTES: usize = 1 << 20;

/// The coordinator: store, dispatcher and running jobs (see the module docs).
#[derive(Clone)]
pub struct Coordinator {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("data_dir", &self.shared.config.data_dir)
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// Opens the store, connects the statically listed `workers` (addresses such as
    /// `http://127.0.0.1:50061`) and resumes unfinished jobs. Needs a tokio runtime.
    pub async fn start(config: CoordinatorConfig, workers: &[String]) -> Result<Self> {
        config.validate()?;
        let store = JobStore::open(&config.data_dir)?;
        let compute = crate::compute::ComputePool::new(config.compute_threads)?;
        let dispatcher = Dispatcher::new(config.clone());
        for w in workers {
            dispatcher.add_static_worker(w).await?;
        }
        let shared = Arc::new(Shared {
            admission: crate::admission::Admission::new(config.memory_budget_bytes),
            run_slots: Arc::new(Semaphore::new(config.max_running_jobs)),
            config,
            store,
            dispatcher,
            jobs: Mutex::new(HashMap::new()),
            prepared: Mutex::new(HashMap::new()),
            stopping: watch::channel(false).0,
            compute,
        });
        let c = Self { shared };
        for job in c.shared.store.list_jobs()? {
            // A stored job that cannot be admitted again is failed with its reason.
            if !job.state.is_terminal()
                && crate::admission::admit_resumed(&c.shared.store, &c.shared.admission, &job)
            {
                tracing::info!(job = %job.job_id, step = job.step, "resuming unfinished job");
                c.launch(&job);
            }
        }
        Ok(c)
    }

    /// The dispatcher (workers and batches).
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.shared.dispatcher
    }

    /// The store.
    pub fn store(&self) -> &JobStore {
        &self.shared.store
    }

    /// The configuration in force.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.shared.config
    }

    fn launch(&self, job: &JobRecord) {
        let (cancel, _) = watch::channel(false);
        let (progress, _) = watch::channel(v1::JobProgress {
            status: Some(v1::JobStatus::from(job)),
            ..Default::default()
        });
        let handle = Arc::new(JobHandle { cancel, progress });
        self.shared
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.job_id.clone(), handle);
        let shared = self.shared.clone();
        let job_id = job.job_id.clone();
        tokio::spawn(async move {
            crate::runner::run_job(shared.clone(), job_id.clone()).await;
            shared
                .jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&job_id);
        });
    }

    /// Validates a submission, stores it and starts it. Returns the job id. Rejected
    /// submissions (bad NIfTI, shapes, NaN, path outside the data root, unknown model, no
    /// workers) get [`CoordinatorError::InvalidSubmission`] naming the problem; nothing
    /// is stored for them.
    pub async fn submit(&self, req: v1::SubmitJobRequest) -> Result<String> {
        self.submit_as(req, &Principal::local()).await
    }

    /// [`Self::submit`] on behalf of `owner`, who will be the only user to see the job.
    pub async fn submit_as(&self, req: v1::SubmitJobRequest, owner: &Principal) -> Result<String> {
        let settings = req.settings.clone().ok_or_else(|| {
            CoordinatorError::InvalidSubmission("settings are missing".to_string())
        })?;
        let spec = JobSpec::from_proto(&settings, self.shared.config.batch_size)?;
        let model = self.pick_model(&spec.model_id)?;
        let root = self.shared.config.data_root.clone();
        // The inputs move into the blocking tasks and come back: no copy of the upload.
        let label = req.label;
        let (measurement, mask) = {
            let (measurement, mask) = (req.measurement, req.mask);
            crate::compute::blocking("input reader", move || -> Result<_> {
                let m = crate::inputs::read_input(
                    measurement.as_ref(),
                    root.as_deref(),
                    "measurement",
                )?
                .ok_or_else(|| {
                    CoordinatorError::InvalidSubmission("measurement is missing".to_string())
                })?;
                let k = crate::inputs::read_input(mask.as_ref(), root.as_deref(), "mask")?;
                Ok((m, k))
            })
            .await?
        };
        // Admission from the headers alone, before anything is decoded.
        let estimate = crate::admission::MemoryEstimate::from_inputs(
            &spec,
            &model,
            &measurement,
            mask.as_deref(),
        )?;
        let reservation = self.shared.admission.reserve(&estimate)?;
        // Build the problem now so that bad inputs are refused at submission.
        let (problem, measurement, mask) = {
            let (spec, model) = (spec.clone(), model.clone());
            let (problem, m, k) = self
                .shared
                .compute
                .run("input check", move || {
                    let problem =
                        crate::problem::build_problem(&spec, &model, &measurement, mask.as_deref());
                    Ok((problem, measurement, mask))
                })
                .await?;
            let problem = problem.map_err(|e| match e {
                CoordinatorError::InvalidSubmission(_) => e,
                other => CoordinatorError::InvalidSubmission(other.to_string()),
            })?;
            (problem, m, k)
        };
        let store = &self.shared.store;
        let job_id = store.next_job_id()?;
        let mut record = JobRecord::new(job_id.clone(), label, spec, model);
        record.owner = owner.name.clone();
        store.put_input(&job_id, "measurement", &measurement)?;
        if let Some(k) = &mask {
            store.put_input(&job_id, "mask", k)?;
        }
        store.put_job(&record)?;
        store.flush()?;
        reservation.commit(&job_id);
        tracing::info!(job = %job_id, task = record.spec.task.name(), model = %record.model.content_hash, "job submitted");
        self.shared
            .prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job_id.clone(), Arc::new(problem));
        self.launch(&record);
        Ok(job_id)
    }

    /// Chooses the model a new job is pinned to: the requested id (or any, if empty)
    /// among the ready workers; the hash served by most workers wins.
    fn pick_model(&self, model_id: &str) -> Result<dmqsm_common::diffusion::model::ModelSpec> {
        let models = self.shared.dispatcher.ready_models();
        if models.is_empty() {
            return Err(CoordinatorError::InvalidSubmission(
                "no workers are ready (zero workers connected); start dmqsm-worker or list \
                 workers with --worker"
                    .to_string(),
            ));
        }
        let found = models.iter().find(|(m, _)| {
            model_id.is_empty() || m.model_id == model_id || m.content_hash == model_id
        });
        let Some((m, _)) = found else {
            let served: Vec<String> = models
                .iter()
                .map(|(m, n)| format!("{} ({}, {n} workers)", m.model_id, short(&m.content_hash)))
                .collect();
            return Err(CoordinatorError::InvalidSubmission(format!(
                "unknown model {model_id:?}; the workers serve {}",
                served.join(", ")
            )));
        };
        crate::problem::model_spec(m)
    }

    /// A job's record.
    pub fn get(&self, job_id: &str) -> Result<JobRecord> {
        self.shared
            .store
            .get_job(job_id)?
            .ok_or_else(|| CoordinatorError::JobNotFound(job_id.to_string()))
    }

    /// A job's record if `who` may see it: its owner, or an admin.
    pub fn get_as(&self, job_id: &str, who: &Principal) -> std::result::Result<JobRecord, Status> {
        let job = self.get(job_id)?;
        if who.sees_all_jobs() || job.owner == who.name {
            Ok(job)
        } else {
            Err(Status::permission_denied(format!(
                "job {job_id} belongs to another user; a user token sees only its own jobs, \
                 an admin token sees all"
            )))
        }
    }

    /// Every job, in submission order.
    pub fn list(&self) -> Result<Vec<JobRecord>> {
        self.shared.store.list_jobs()
    }

    /// Cancels a job. A finished job is returned unchanged. Waits briefly for the runner
    /// to record the cancellation.
    pub async fn cancel(&self, job_id: &str) -> Result<JobRecord> {
        let job = self.get(job_id)?;
        if job.state.is_terminal() {
            return Ok(job);
        }
        if let Some(h) = self.shared.handle(job_id) {
            h.cancel.send_replace(true);
            let mut rx = h.progress.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    let done = rx
                        .borrow_and_update()
                        .status
                        .as_ref()
                        .map(|s| {
                            matches!(
                                v1::JobState::try_from(s.state),
                                Ok(v1::JobState::Cancelled
                                    | v1::JobState::Failed
                                    | v1::JobState::Succeeded)
                            )
                        })
                        .unwrap_or(false);
                    if done || rx.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
        } else {
            // No runner (should not happen for a non-terminal job): record it directly.
            let mut job = job;
            job.state = JobState::Cancelled;
            job.error = Some("cancelled by user".into());
            job.finished_unix = Some(unix_now());
            job.log("cancelled by user");
            self.shared.store.put_job(&job)?;
        }
        self.get(job_id)
    }

    /// A stream of progress reports until the job ends (the last report is terminal).
    /// When the coordinator shuts down, the stream ends with `UNAVAILABLE` ("coordinator
    /// shutting down"): the job resumes on the next start and a client may reconnect.
    pub fn watch(&self, job_id: &str) -> Result<BoxStream<v1::JobProgress>> {
        let job = self.get(job_id)?;
        let Some(h) = self
            .shared
            .handle(job_id)
            .filter(|_| !job.state.is_terminal())
        else {
            let last = v1::JobProgress {
                status: Some(v1::JobStatus::from(&job)),
                ..Default::default()
            };
            return Ok(Box::pin(futures::stream::iter([Ok(last)])));
        };
        let rx = h.progress.subscribe();
        let stop = self.shared.stopping.subscribe();
        let store = self.shared.store.clone();
        let id = job_id.to_string();
        let stream = futures::stream::unfold(Some((rx, stop)), move |state| {
            let store = store.clone();
            let id = id.clone();
            async move {
                let (mut rx, mut stop) = state?;
                if *stop.borrow() {
                    return Some((Err(shutting_down()), None));
                }
                let item = rx.borrow_and_update().clone();
                let terminal = item
                    .status
                    .as_ref()
                    .map(|s| crate::client::is_terminal(s.state))
                    .unwrap_or(false);
                if terminal {
                    return Some((Ok(item), None));
                }
                // Emit the current report, then wait for the next change (or shutdown).
                let changed = tokio::select! {
                    c = rx.changed() => Some(c),
                    _ = stop.wait_for(|s| *s) => None,
                };
                let Some(changed) = changed else {
                    // Shutdown: emit the current report; the next poll ends the stream.
                    return Some((Ok(item), Some((rx, stop))));
                };
                if changed.is_err() {
                    // Runner ended: report the stored final state.
                    let last = store
                        .get_job(&id)
                        .ok()
                        .flatten()
                        .map(|j| v1::JobProgress {
                            status: Some(v1::JobStatus::from(&j)),
                            ..Default::default()
                        })
                        .unwrap_or(item);
                    return Some((Ok(last), None));
                }
                Some((Ok(item), Some((rx, stop))))
            }
        });
        Ok(Box::pin(stream))
    }

    /// The result files of a finished job, `(name, bytes)`.
    pub fn fetch(&self, job_id: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let job = self.get(job_id)?;
        if job.state != JobState::Succeeded {
            return Err(CoordinatorError::NoResult {
                job: job_id.to_string(),
                reason: match job.state {
                    JobState::Failed => format!(
                        "failed: {}",
                        job.error.unwrap_or_else(|| "unknown cause".into())
                    ),
                    JobState::Cancelled => "was cancelled".to_string(),
                    s => format!("is {s:?}, not finished yet").to_lowercase(),
                },
            });
        }
        self.shared.store.get_results(job_id)
    }

    /// Starts shutting down: `watch` streams end with `UNAVAILABLE`, and running jobs
    /// checkpoint at their next step boundary and stop (they stay `running` in the
    /// store and resume when a coordinator starts on the same data dir). Call before
    /// stopping the gRPC server, so that open streams do not hold it up.
    pub fn begin_shutdown(&self) {
        self.shared.stopping.send_replace(true);
    }

    /// Shuts down: [`Self::begin_shutdown`], then waits up to
    /// `CoordinatorConfig::shutdown_grace` for running jobs to checkpoint, stops the
    /// dispatcher's loops and flushes the store. Jobs not at a step boundary by then
    /// resume from their last periodic checkpoint.
    pub async fn shutdown(&self) {
        self.begin_shutdown();
        let deadline = tokio::time::Instant::now() + self.shared.config.shutdown_grace;
        while !self
            .shared
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.shutdown_now();
    }

    /// Shuts down without waiting: streams end, the dispatcher's loops stop and the store
    /// is flushed; running jobs resume from their last checkpoint on the next start.
    pub fn shutdown_now(&self) {
        self.begin_shutdown();
        self.shared.dispatcher.shutdown();
        let _ = self.shared.store.flush();
    }
}

fn shutting_down() -> Status {
    Status::unavailable(
        "coordinator shutting down; the job resumes when it restarts (watch again then)",
    )
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// The tonic service over a [`Coordinator`].
#[derive(Debug, Clone)]
pub struct CoordinatorService {
    coordinator: Coordinator,
}

impl CoordinatorService {
    /// Wraps a coordinator.
    pub fn new(coordinator: Coordinator) -> Self {
        Self { coordinator }
    }
}

/// A boxed stream of RPC results (server-streaming answers).
pub type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = std::result::Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl coordinator_server::Coordinator for CoordinatorService {
    async fn submit_job(
        &self,
        request: Request<v1::SubmitJobRequest>,
    ) -> std::result::Result<Response<v1::SubmitJobResponse>, Status> {
        let who = Principal::of(&request);
        who.require(Role::User, "SubmitJob")?;
        let job_id = self
            .coordinator
            .submit_as(request.into_inner(), &who)
            .await?;
        Ok(Response::new(v1::SubmitJobResponse { job_id }))
    }

    async fn get_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> std::result::Result<Response<v1::JobStatus>, Status> {
        let who = Principal::of(&request);
        who.require(Role::User, "GetJob")?;
        let job = self.coordinator.get_as(&request.get_ref().job_id, &who)?;
        Ok(Response::new(v1::JobStatus::from(&job)))
    }

    async fn list_jobs(
        &self,
        request: Request<v1::ListJobsRequest>,
    ) -> std::result::Result<Response<v1::ListJobsResponse>, Status> {
        let who = Principal::of(&request);
        who.require(Role::User, "ListJobs")?;
        let jobs = self
            .coordinator
            .list()?
            .iter()
            .filter(|j| who.sees_all_jobs() || j.owner == who.name)
            .map(v1::JobStatus::from)
            .collect();
        Ok(Response::new(v1::ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> std::result::Result<Response<v1::JobStatus>, Status> {
        let who = Principal::of(&request);
        who.require(Role::User, "CancelJob")?;
        let id = &request.get_ref().job_id;
        self.coordinator.get_as(id, &who)?;
        let job = self.coordinator.cancel(id).await?;
        Ok(Response::new(v1::JobStatus::from(&job)))
    }

    type WatchJobStream = BoxStream<v1::JobProgress>;

    async fn watch_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> std::result::Result<Response<Self::WatchJobStream>, Status> {
        let who = Principal::of(&request);
        who.require(Role::User, "WatchJob")?;
        let id = &request.get_ref().job_id;
        self.coordinator.get_as(id, &who)?;
        let s = self.coordinator.watch(id)?;
        Ok(Response::new(s))
    }

    type FetchResultStream = BoxStream<v1::ResultChunk>;

    async fn fetch_result(
        &self,
        request: Request<v1::FetchResultRequest>,
    ) -> std::result::Result<Response<Self::FetchResultStream>, Status> {
        let who = Principal::of(&request);
        who.require(Role::User, "FetchResult")?;
        let id = &request.get_ref().job_id;
        self.coordinator.get_as(id, &who)?;
        let files = self.coordinator.fetch(id)?;
        let mut chunks = Vec::new();
        for (name, data) in files {
            let data = bytes::Bytes::from(data);
            if data.is_empty() {
                chunks.push(Ok(v1::ResultChunk {
                    name,
                    data,
                    last: true,
                }));
                continue;
            }
            let n = data.len().div_ceil(RESULT_CHUNK_BYTES);
            for i in 0..n {
                let lo = i * RESULT_CHUNK_BYTES;
                let hi = (lo + RESULT_CHUNK_BYTES).min(data.len());
                chunks.push(Ok(v1::ResultChunk {
                    name: name.clone(),
                    data: data.slice(lo..hi),
                    last: i + 1 == n,
                }));
            }
        }
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn list_workers(
        &self,
        request: Request<v1::ListWorkersRequest>,
    ) -> std::result::Result<Response<v1::ListWorkersResponse>, Status> {
        Principal::of(&request).require(Role::User, "ListWorkers")?;
        Ok(Response::new(v1::ListWorkersResponse {
            workers: self.coordinator.dispatcher().workers(),
        }))
    }

    async fn register_worker(
        &self,
        request: Request<v1::RegisterWorkerRequest>,
    ) -> std::result::Result<Response<v1::RegisterWorkerResponse>, Status> {
        let who = Principal::of(&request);
        who.require(Role::Worker, "RegisterWorker")?;
        let token = dmqsm_proto::auth::bearer_of(&request).map(str::to_string);
        let peer = request.remote_addr();
        let r = request.into_inner();
        if r.address.is_empty() {
            return Err(Status::invalid_argument(
                "RegisterWorker: address is empty (give the URL the coordinator should dial)",
            ));
        }
        check_worker_address(
            &r.address,
            peer,
            self.coordinator.config().security.worker_addresses,
        )
        .await?;
        let worker_id = self
            .coordinator
            .dispatcher()
            .register_worker(crate::dispatch::WorkerRegistration {
                address: &r.address,
                previous_id: &r.worker_id,
                name: &r.name,
                owner: &who.name,
                token: token.as_deref(),
            })
            .await
            .map_err(registration_status)?;
        Ok(Response::new(v1::RegisterWorkerResponse {
            heartbeat_interval_ms: self.coordinator.config().heartbeat_interval.as_millis() as u32,
            worker_id,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> std::result::Result<Response<v1::HeartbeatResponse>, Status> {
        let who = Principal::of(&request);
        who.require(Role::Worker, "Heartbeat")?;
        let r = request.into_inner();
        let known = self
            .coordinator
            .dispatcher()
            .heartbeat(&r.worker_id, r.draining, &who.name)
            .map_err(registration_status)?;
        Ok(Response::new(v1::HeartbeatResponse { known }))
    }
}

fn registration_status(e: crate::dispatch::RegistrationError) -> Status {
    use crate::dispatch::RegistrationError as E;
    match e {
        E::NotYours(_) | E::AddressTaken(_) => Status::permission_denied(e.to_string()),
        E::Unreachable(_) => Status::failed_precondition(e.to_string()),
    }
}

/// Refuses a worker address the coordinator should not dial: anything but
/// `http(s)://host:port` (no `unix:` paths), and, under
/// [`WorkerAddressPolicy::SameHost`], a host that does not resolve to the IP the
/// registration came from. Nothing is dialled here.
async fn check_worker_address(
    address: &str,
    peer: Option<std::net::SocketAddr>,
    policy: crate::config::WorkerAddressPolicy,
) -> std::result::Result<(), Status> {
    let bad = |m: String| Status::invalid_argument(format!("RegisterWorker: {m}"));
    let rest = address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
        .ok_or_else(|| {
            bad(format!(
                "address {address:?} is not http://host:port or https://host:port"
            ))
        })?;
    let authority = rest.split('/').next().unwrap_or("");
    let uri: tonic::codegen::http::uri::Authority = authority
        .parse()
        .map_err(|e| bad(format!("address {address:?}: {e}")))?;
    let port = uri
        .port_u16()
        .ok_or_else(|| bad(format!("address {address:?} has no port")))?;
    if policy == crate::config::WorkerAddressPolicy::Any {
        return Ok(());
    }
    let Some(peer) = peer else {
        return Err(bad(
            "the registration's source address is unknown, so the worker address cannot be \
             checked"
                .into(),
        ));
    };
    let host = uri.host().trim_start_matches('[').trim_end_matches(']');
    let resolved: Vec<std::net::IpAddr> = tokio::net::lookup_host((host, port))
        .await
        .map(|it| it.map(|a| a.ip()).collect())
        .unwrap_or_default();
    let canon = |ip: std::net::IpAddr| ip.to_canonical();
    let peer_ip = canon(peer.ip());
    // Loopback is one host whatever the address (a host name mapped to 127.0.1.1 is
    // reached from 127.0.0.1).
    let same = |ip: &std::net::IpAddr| {
        canon(*ip) == peer_ip || (canon(*ip).is_loopback() && peer_ip.is_loopback())
    };
    if resolved.iter().any(same) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "RegisterWorker: address {address} does not resolve to {}, where this \
             registration came from; a worker may only register an address of its own \
             host (or start the coordinator with --accept-worker-address any)",
            peer.ip()
        )))
    }
}

/// Serves the coordinator (plus standard health and reflection) on `listener` until
/// `shutdown` resolves.
pub async fn serve(
    coordinator: Coordinator,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let max = coordinator.config().max_message_bytes;
    let security = coordinator.config().security.clone();
    let svc = CoordinatorServer::new(CoordinatorService::new(coordinator))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let svc = tonic::service::interceptor::InterceptedService::new(svc, security.auth.clone());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dmqsm_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordinatorError::Config(format!("reflection service: {e}")))?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &security.tls {
        builder = builder
            .tls_config(
                tls.load()
                    .map_err(|e| CoordinatorError::Config(e.to_string()))?,
            )
            .map_err(|e| CoordinatorError::Config(format!("TLS: {e}")))?;
    }
    dmqsm_proto::transport::Http2Config::default()
        .apply_to_server(builder)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| CoordinatorError::Config(format!("gRPC server: {e}")))
}

/// Binds `addr` (port 0 picks a free one) and serves in a background task. Returns the
/// bound address and a sender that stops the server.
pub async fn spawn_server(
    coordinator: Coordinator,
    addr: SocketAddr,
) -> Result<(
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CoordinatorError::Config(format!("cannot listen on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| CoordinatorError::Config(format!("listener address: {e}")))?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(serve(coordinator, listener, async move {
        let _ = rx.await;
    }));
    Ok((bound, tx, handle))
}
