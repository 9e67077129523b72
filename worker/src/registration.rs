//! Registering with a coordinator (`--coordinator URL`) and heartbeats.
//!
//! The worker calls `RegisterWorker { address, name }` with its bearer token; the
//! coordinator dials it back, assigns its id and answers it. The worker then sends
//! `Heartbeat { worker_id, in_flight, draining: false }` every
//! `heartbeat_interval_ms` (from the coordinator's answer). A heartbeat answered with
//! `known: false` registers again, offering the old id (the coordinator keeps it when the
//! same identity asks); any transport error reconnects with
//! exponential backoff (initial → ×2 → max). On shutdown one last heartbeat with
//! `draining: true` tells the coordinator to send no new batches. The coordinator being
//! down never stops the worker from serving.

use crate::batching::QueueStats;
use dmqsm_proto::auth::Bearer;
use dmqsm_proto::transport::{AuthChannel, ClientTls};
use dmqsm_proto::v1::coordinator_client::CoordinatorClient;
use dmqsm_proto::v1::{HeartbeatRequest, RegisterWorkerRequest};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;

/// Where and how to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationConfig {
    /// Coordinator URL, e.g. `http://10.0.0.2:50051`.
    pub coordinator: String,
    /// Address the coordinator should dial for this worker, e.g. `http://10.0.0.5:50061`.
    pub advertise: String,
    /// First retry delay after a failure.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Heartbeat interval used when the coordinator answers 0.
    pub default_heartbeat: Duration,
    /// Bearer token presented to the coordinator (default: the worker's own token).
    pub token: Option<String>,
    /// How to dial an `https://` coordinator.
    pub tls: ClientTls,
}

impl RegistrationConfig {
    /// Defaults: backoff 250 ms → 10 s, heartbeat 5 s.
    pub fn new(coordinator: impl Into<String>, advertise: impl Into<String>) -> Self {
        Self {
            coordinator: coordinator.into(),
            advertise: advertise.into(),
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
            default_heartbeat: Duration::from_secs(5),
            token: None,
            tls: ClientTls::default(),
        }
    }
}

async fn connect(config: &RegistrationConfig) -> Result<CoordinatorClient<AuthChannel>, String> {
    let url = &config.coordinator;
    let bearer = Bearer::new(config.token.as_deref()).map_err(|e| e.to_string())?;
    let endpoint = dmqsm_proto::transport::endpoint(url, &config.tls)
        .map_err(|e| format!("coordinator URL {url}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot reach coordinator {url}: {e}"))?;
    Ok(CoordinatorClient::with_interceptor(channel, bearer))
}

/// Sleeps `d` unless draining starts first; returns true when draining.
async fn sleep_or_drain(d: Duration, drain: &mut watch::Receiver<bool>) -> bool {
    if *drain.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *drain.borrow(),
        r = drain.changed() => r.is_err() || *drain.borrow(),
    }
}

/// Runs registration and heartbeats until `drain` turns true (or its sender is
/// dropped), then sends the final draining heartbeat.
/// `name` is the worker's display name; the id heartbeats carry is the one the
/// coordinator assigns.
pub async fn run(
    config: RegistrationConfig,
    name: String,
    stats: Arc<QueueStats>,
    mut drain: watch::Receiver<bool>,
) {
    let mut backoff = config.initial_backoff;
    let mut client: Option<CoordinatorClient<AuthChannel>> = None;
    // Assigned by the coordinator; empty until the first registration succeeds.
    let mut worker_id = String::new();
    'outer: loop {
        if *drain.borrow() {
            break;
        }
        // (Re)connect and register.
        let mut c = match client.take() {
            Some(c) => c,
            None => match connect(&config).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("{e}; retrying in {backoff:?}");
                    if sleep_or_drain(backoff, &mut drain).await {
                        break;
                    }
                    backoff = (backoff * 2).min(config.max_backoff);
                    continue;
                }
            },
        };
        let interval = match c
            .register_worker(RegisterWorkerRequest {
                address: config.advertise.clone(),
                worker_id: worker_id.clone(),
                name: name.clone(),
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                let ms = r.heartbeat_interval_ms;
                worker_id = r.worker_id;
                tracing::info!(
                    "registered {name} as {worker_id} ({}) with coordinator {}",
                    config.advertise,
                    config.coordinator
                );
                backoff = config.initial_backoff;
                if ms == 0 {
                    config.default_heartbeat
                } else {
                    Duration::from_millis(ms as u64)
                }
            }
            Err(status) => {
                tracing::warn!(
                    "registering with {} failed: {}; retrying in {backoff:?}",
                    config.coordinator,
                    status.message()
                );
                if sleep_or_drain(backoff, &mut drain).await {
                    break;
                }
                backoff = (backoff * 2).min(config.max_backoff);
                continue;
            }
        };
        // Heartbeats.
        loop {
            if sleep_or_drain(interval, &mut drain).await {
                client = Some(c);
                break 'outer;
            }
            let req = HeartbeatRequest {
                worker_id: worker_id.clone(),
                in_flight: stats.in_flight.load(Ordering::SeqCst) as u32,
                draining: false,
            };
            match c.heartbeat(req).await {
                Ok(r) if r.get_ref().known => {}
                Ok(_) => {
                    tracing::info!("coordinator forgot this worker; registering again");
                    client = Some(c);
                    continue 'outer;
                }
                Err(status) => {
                    tracing::warn!(
                        "heartbeat to {} failed: {}; reconnecting in {backoff:?}",
                        config.coordinator,
                        status.message()
                    );
                    if sleep_or_drain(backoff, &mut drain).await {
                        break 'outer;
                    }
                    backoff = (backoff * 2).min(config.max_backoff);
                    continue 'outer;
                }
            }
        }
    }
    // Final heartbeat: draining (nothing to tell if the worker never registered).
    if worker_id.is_empty() {
        return;
    }
    let send = async {
        let mut c = match client {
            Some(c) => c,
            None => connect(&config).await?,
        };
        c.heartbeat(HeartbeatRequest {
            worker_id: worker_id.clone(),
            in_flight: stats.in_flight.load(Ordering::SeqCst) as u32,
            draining: true,
        })
        .await
        .map_err(|s| s.message().to_string())?;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(Duration::from_secs(3), send).await {
        Ok(Ok(())) => tracing::info!(
            "told coordinator {} that {worker_id} is draining",
            config.coordinator
        ),
        Ok(Err(e)) => tracing::warn!("draining heartbeat failed: {e}"),
        Err(_) => tracing::warn!("draining heartbeat timed out"),
    }
}
