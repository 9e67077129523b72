//! Serving a model: [`serve`] on a listener until a shutdown signal, the in-process
//! [`spawn_local_worker`] (loopback port; used by the coordinator's embedded mode and the
//! tests), and [`connect`] for clients with matching message limits and HTTP/2 windows.
//!
//! The server carries the `Worker` service, standard health (`grpc.health.v1`, the
//! `dmqsm.v1.Worker` service and "" report SERVING until shutdown starts) and reflection
//! (`grpc.reflection.v1`). Message limits default to
//! [`DEFAULT_MAX_MESSAGE_BYTES`] on both ends (tonic's default is 4 MiB, about 9 f32
//! patches of 48³).
//!
//! Shutdown is graceful: when the shutdown future resolves the worker marks itself
//! draining (health NOT_SERVING, new requests `UNAVAILABLE`, a `draining: true`
//! heartbeat to the coordinator), stops accepting connections, lets in-flight requests
//! finish, then stops the model thread.

use crate::batching::{BatchConfig, BatchQueue, QueueStats};
use crate::error::{Result, WorkerError};
use crate::registration::{self, RegistrationConfig};
use crate::service::{RequestLimits, WorkerService};
use crate::simulated::SimulatedModel;
use crate::torch_model::TorchModel;
use dmqsm_common::diffusion::model::{ModelSpec, ScoreModel};
use dmqsm_proto::DEFAULT_MAX_MESSAGE_BYTES;
use dmqsm_proto::auth::{Authenticator, Bearer, Role};
use dmqsm_proto::transport::{AuthChannel, ClientTls, ServerTls};
use dmqsm_proto::v1::worker_client::WorkerClient;
use dmqsm_proto::v1::worker_server::WorkerServer;
use dmqsm_proto::v1::{Dtype, ModelInfo, WorkerInfo};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::Server;

/// A model ready to serve, with how it describes itself in `Info`.
#[derive(Clone)]
pub struct ServedModel {
    model: Arc<dyn ScoreModel + Send + Sync>,
    device: String,
    eval_batch: usize,
    precision: String,
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel")
            .field("model_id", &self.model.spec().model_id)
            .field("device", &self.device)
            .field("eval_batch", &self.eval_batch)
            .field("precision", &self.precision)
            .finish()
    }
}

impl ServedModel {
    /// Any score model; `device` ("cpu", "cuda:0", …), `eval_batch` and `precision`
    /// ("f32", "bf16") are reported in `Info`.
    pub fn new(
        model: Arc<dyn ScoreModel + Send + Sync>,
        device: impl Into<String>,
        eval_batch: usize,
        precision: impl Into<String>,
    ) -> Self {
        Self {
            model,
            device: device.into(),
            eval_batch,
            precision: precision.into(),
        }
    }

    /// A libtorch model.
    pub fn torch(model: TorchModel) -> Self {
        let device = model.device().to_string();
        let eval_batch = model.options().eval_batch;
        let precision = if model.options().bf16 { "bf16" } else { "f32" };
        Self::new(Arc::new(model), device, eval_batch, precision)
    }

    /// A simulated model (elementwise numerics: batch invariant at any eval batch).
    pub fn simulated(model: SimulatedModel) -> Self {
        Self::new(Arc::new(model), "cpu (simulated)", 1, "f32")
    }

    /// The model.
    pub fn model(&self) -> &Arc<dyn ScoreModel + Send + Sync> {
        &self.model
    }

    /// The model's spec.
    pub fn spec(&self) -> &ModelSpec {
        self.model.spec()
    }
}

/// HTTP/2 settings of the server (both ends use the same, from the API crate).
pub use dmqsm_proto::transport::Http2Config;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Worker identity (default `worker-<listen address>`).
    pub worker_id: Option<String>,
    /// Request coalescing (`max_batch` is also the largest request accepted).
    pub batch: BatchConfig,
    /// Largest gRPC message, both directions (bytes).
    pub max_message_bytes: usize,
    /// HTTP/2 windows.
    pub http2: Http2Config,
    /// libtorch intra-op threads on the model thread.
    pub threads: Option<usize>,
    /// Coordinator to register with (its `advertise` empty means `http://<listen addr>`,
    /// with the host name for a wildcard listen address).
    pub registration: Option<RegistrationConfig>,
    /// Counters of the request queue; keep a clone to watch a running worker.
    pub stats: Arc<QueueStats>,
    /// This worker's bearer token: presented to the coordinator when registering, and
    /// required of every `Worker` RPC (the coordinator dials back with the same token).
    /// `None`: no authentication (loopback only, see `dmqsm_proto::auth`).
    pub token: Option<String>,
    /// TLS of the worker's server (plain TCP when `None`; with a client CA, only callers
    /// holding a certificate it signed, i.e. the coordinator, get through).
    pub tls: Option<ServerTls>,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (`crate::metrics`); `None`
    /// (the default) serves none.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            worker_id: None,
            batch: BatchConfig::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            http2: Http2Config::default(),
            threads: None,
            registration: None,
            stats: Arc::new(QueueStats::default()),
            token: None,
            tls: None,
            metrics_listen: None,
        }
    }
}

/// `Info`'s answer for a model served with a config.
pub fn worker_info(model: &ServedModel, config: &ServerConfig, worker_id: &str) -> WorkerInfo {
    let spec = model.spec();
    WorkerInfo {
        model: Some(ModelInfo::from(spec)),
        device: model.device.clone(),
        max_batch: config.batch.max_batch as u32,
        supports_eps: true,
        supports_vjp: true,
        dtypes: vec![Dtype::F32 as i32, Dtype::Bf16 as i32, Dtype::F16 as i32],
        worker_id: worker_id.to_string(),
        eval_batch: model.eval_batch as u32,
        precision: model.precision.clone(),
    }
}

/// The address to advertise when none is given: `http://<listen address>`, or, for a
/// wildcard listen address (0.0.0.0, ::), `http://<host name>:<port>` (the coordinator
/// cannot dial a wildcard).
fn default_advertise(addr: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    if !addr.ip().is_unspecified() {
        return format!("{scheme}://{addr}");
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty());
    match host {
        Some(h) => format!("{scheme}://{h}:{}", addr.port()),
        None => {
            tracing::warn!(
                "listening on {addr} without --advertise: the coordinator may not reach this worker"
            );
            format!("{scheme}://{addr}")
        }
    }
}

/// Serves `model` on `listener` until `shutdown` resolves, then drains (see the module
/// docs). Returns once in-flight requests are answered and the model thread stopped.
pub async fn serve(
    config: ServerConfig,
    model: ServedModel,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_err(|e| WorkerError::Transport(format!("listener address: {e}")))?;
    let worker_id = config
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("worker-{addr}"));
    let queue = Arc::new(BatchQueue::start(
        model.model.clone(),
        config.batch,
        config.threads,
        config.stats.clone(),
    )?);
    let stats = queue.stats();
    let info = worker_info(&model, &config, &worker_id);
    let metrics = start_metrics(&config, &info, stats.clone()).await?;
    let spec = model.spec();
    let limits = RequestLimits {
        patch_size: spec.patch_size,
        max_batch: config.batch.max_batch,
        timesteps: spec.schedule.timesteps,
        content_hash: spec.content_hash.clone(),
    };
    let draining = Arc::new(AtomicBool::new(false));
    let service = WorkerService::new(queue.clone(), info, limits, draining.clone());
    let worker = WorkerServer::new(service)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let auth = match &config.token {
        Some(t) => Authenticator::single(Role::Worker, "coordinator", t)
            .map_err(|e| WorkerError::Transport(e.to_string()))?,
        None => Authenticator::new(None),
    };
    let worker = tonic::service::interceptor::InterceptedService::new(worker, auth);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<WorkerServer<WorkerService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dmqsm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| WorkerError::Transport(format!("reflection: {e}")))?;

    let (drain_tx, drain_rx) = watch::channel(false);
    let registration_task = config.registration.clone().map(|mut reg| {
        if reg.advertise.is_empty() {
            reg.advertise = default_advertise(addr, config.tls.is_some());
        }
        if reg.token.is_none() {
            reg.token = config.token.clone();
        }
        tokio::spawn(registration::run(
            reg,
            worker_id.clone(),
            stats.clone(),
            drain_rx,
        ))
    });

    let drain_flag = draining.clone();
    let reporter = health_reporter.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: draining in-flight requests");
        drain_flag.store(true, Ordering::SeqCst);
        reporter
            .set_not_serving::<WorkerServer<WorkerService>>()
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let _ = drain_tx.send(true);
    };

    tracing::info!("worker {worker_id} serving '{}' on {addr}", spec.model_id);
    let h2 = config.http2;
    // TCP_NODELAY is set on the incoming stream below (the builder's setting only applies
    // to listeners it binds itself); without it small responses wait ~40 ms for delayed
    // ACKs.
    let mut builder = Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(
                tls.load()
                    .map_err(|e| WorkerError::Transport(e.to_string()))?,
            )
            .map_err(|e| WorkerError::Transport(format!("TLS: {e}")))?;
    }
    let mut builder = h2.apply_to_server(builder);
    let result = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(worker)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            signal,
        )
        .await
        .map_err(|e| WorkerError::Transport(format!("server on {addr}: {e}")));

    if let Some(task) = registration_task
        && tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
    {
        tracing::warn!("registration task did not stop in time");
    }
    let q = queue.clone();
    let _ = tokio::task::spawn_blocking(move || q.close_and_join()).await;
    if let Some(m) = metrics
        && !matches!(
            tokio::time::timeout(Duration::from_secs(5), m.shutdown()).await,
            Ok(Ok(()))
        )
    {
        tracing::warn!("the metrics endpoint did not stop cleanly");
    }
    tracing::info!("worker {worker_id} stopped");
    result
}

/// Starts the metrics endpoint when `config.metrics_listen` asks for one.
async fn start_metrics(
    config: &ServerConfig,
    info: &WorkerInfo,
    stats: Arc<QueueStats>,
) -> Result<Option<dmqsm_proto::metrics_http::MetricsServer>> {
    let Some(addr) = config.metrics_listen else {
        return Ok(None);
    };
    let model = info.model.clone().unwrap_or_default();
    let labels = crate::metrics::ModelLabels {
        worker_id: info.worker_id.clone(),
        model_id: model.model_id,
        content_hash: model.content_hash,
        device: info.device.clone(),
    };
    crate::metrics::spawn_metrics_server(addr, stats, Some(&labels))
        .await
        .map(Some)
        .map_err(|e| WorkerError::Transport(e.to_string()))
}

/// A worker serving on a loopback port inside this process.
#[derive(Debug)]
pub struct LocalWorker {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<()>>,
}

impl LocalWorker {
    /// The bound address (127.0.0.1:port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful shutdown: drains in-flight requests, then returns the server's result.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.handle)
            .await
            .map_err(|e| WorkerError::Transport(format!("worker task: {e}")))?
    }
}

/// Starts a worker for `model` on `127.0.0.1:0` (an ephemeral port) in this tokio
/// runtime.
pub async fn spawn_local_worker(model: ServedModel, config: ServerConfig) -> Result<LocalWorker> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| WorkerError::Transport(format!("binding a loopback port: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| WorkerError::Transport(format!("listener address: {e}")))?;
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(serve(config, model, listener, async move {
        let _ = rx.await;
    }));
    Ok(LocalWorker {
        addr,
        shutdown: Some(tx),
        handle,
    })
}

/// Connects a `Worker` client (plain `http://`, presenting `token` if given) with the
/// given message limit and the default HTTP/2 windows (matching the server).
pub async fn connect(
    url: &str,
    max_message_bytes: usize,
    token: Option<&str>,
) -> Result<WorkerClient<AuthChannel>> {
    let bearer = Bearer::new(token).map_err(|e| WorkerError::Transport(e.to_string()))?;
    let channel = dmqsm_proto::transport::endpoint(url, &ClientTls::default())
        .map_err(|e| WorkerError::Transport(format!("bad worker URL {url}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| WorkerError::Transport(format!("connecting to {url}: {e}")))?;
    Ok(WorkerClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes))
}
