//! A thin client of the `Coordinator` service, shared by the CLI, the embedded mode and
//! the end-to-end tests: connect, wait for a job, fetch its files.

use dmqsm_proto::auth::Bearer;
use dmqsm_proto::transport::{AuthChannel, ClientTls};
use dmqsm_proto::v1;
use dmqsm_proto::v1::coordinator_client::CoordinatorClient;
use std::time::Duration;

/// Errors of the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator could not be reached.
    #[error("cannot reach the coordinator at {url}: {cause}")]
    Connect {
        /// Address dialled.
        url: String,
        /// Transport error.
        cause: String,
    },
    /// The coordinator answered with an error status.
    #[error("{}", .0.message())]
    Rpc(#[from] tonic::Status),
    /// The answer stream was malformed or ended early.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// A connected coordinator client (every request carries the configured token).
pub type Client = CoordinatorClient<AuthChannel>;

/// How a client authenticates and dials: its bearer token and, for `https://`, TLS.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Bearer token (read from a file or `$DMQSM_TOKEN`, see `dmqsm_proto::auth`).
    pub token: Option<String>,
    /// TLS for `https://` URLs.
    pub tls: ClientTls,
}

/// Connects to a coordinator at `url` (e.g. `http://127.0.0.1:50051`) without a token,
/// with raised message limits.
pub async fn connect(url: &str) -> Result<Client, ClientError> {
    connect_with(url, &ClientOptions::default()).await
}

/// Connects to a coordinator at `url` (`http://` or `https://`) with `options`.
pub async fn connect_with(url: &str, options: &ClientOptions) -> Result<Client, ClientError> {
    let bearer = Bearer::new(options.token.as_deref()).map_err(|e| ClientError::Connect {
        url: url.to_string(),
        cause: e.to_string(),
    })?;
    let channel = channel(url, options).await?;
    let max = dmqsm_proto::DEFAULT_MAX_MESSAGE_BYTES;
    Ok(CoordinatorClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max))
}

/// Asks the coordinator's standard gRPC health service (`grpc.health.v1`, no token
/// needed) whether it serves. `Ok(true)` for SERVING.
pub async fn health(url: &str, options: &ClientOptions) -> Result<bool, ClientError> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let mut c = tonic_health::pb::health_client::HealthClient::new(channel(url, options).await?);
    let r = c
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    Ok(r.status == ServingStatus::Serving as i32)
}

/// An established channel to `url`, with TLS from `options` for `https://`.
async fn channel(
    url: &str,
    options: &ClientOptions,
) -> Result<tonic::transport::Channel, ClientError> {
    let fail = |cause: String| ClientError::Connect {
        url: url.to_string(),
        cause,
    };
    let endpoint = dmqsm_proto::transport::endpoint(url, &options.tls)
        .map_err(|e| fail(e.to_string()))?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| {
        let mut cause = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            cause = format!("{cause}: {s}");
            src = s.source();
        }
        fail(cause)
    })?;
    Ok(channel)
}

/// True for the states a job cannot leave.
pub fn is_terminal(state: i32) -> bool {
    crate::job::JobState::from_wire(state).is_some_and(crate::job::JobState::is_terminal)
}

/// How long [`wait`] keeps reconnecting to a coordinator that went away (a restart
/// after SIGTERM takes seconds) before it gives up with [`ClientError::Connect`].
pub const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// True for errors a restarting coordinator produces (transport errors, `UNAVAILABLE`),
/// after which the same call may succeed again.
fn transient(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
}

/// Follows a job with `WatchJob` until it ends, calling `on_progress` on every report.
/// Returns the final status. If the stream breaks or the coordinator goes away (it
/// restarts after SIGTERM), reconnects with backoff for up to [`RECONNECT_FOR`]; after
/// that the error is [`ClientError::Connect`].
pub async fn wait(
    client: &mut Client,
    job_id: &str,
    mut on_progress: impl FnMut(&v1::JobProgress),
) -> Result<v1::JobStatus, ClientError> {
    let req = || v1::GetJobRequest {
        job_id: job_id.to_string(),
    };
    let mut down_since: Option<tokio::time::Instant> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        let outcome: Result<Option<v1::JobStatus>, tonic::Status> = async {
            let mut stream = client.watch_job(req()).await?.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(p)) => {
                        down_since = None;
                        on_progress(&p);
                        if let Some(s) = &p.status
                            && is_terminal(s.state)
                        {
                            return Ok(Some(s.clone()));
                        }
                    }
                    Ok(None) => break,
                    Err(s) => return Err(s),
                }
            }
            // Stream ended without a terminal report: ask directly, then watch again.
            let s = client.get_job(req()).await?.into_inner();
            Ok(is_terminal(s.state).then_some(s))
        }
        .await;
        match outcome {
            Ok(Some(s)) => return Ok(s),
            Ok(None) => backoff = Duration::from_millis(200),
            Err(s) if transient(&s) => {
                let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= RECONNECT_FOR {
                    return Err(ClientError::Connect {
                        url: "the coordinator".into(),
                        cause: format!(
                            "gone for {:.0} s while watching job {job_id}: {}",
                            since.elapsed().as_secs_f64(),
                            s.message()
                        ),
                    });
                }
                tracing::info!("coordinator unavailable ({}); reconnecting", s.message());
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(s) => return Err(s.into()),
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Downloads every result file of a finished job, `(name, bytes)` in name order. Like
/// [`wait`], retries for up to [`RECONNECT_FOR`] while the coordinator is unavailable
/// (a `submit --wait --out` whose job ended just before a restart still gets its files).
pub async fn fetch(
    client: &mut Client,
    job_id: &str,
) -> Result<Vec<(String, Vec<u8>)>, ClientError> {
    let start = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(200);
    loop {
        match fetch_once(client, job_id).await {
            Err(ClientError::Rpc(s)) if transient(&s) && start.elapsed() < RECONNECT_FOR => {
                tracing::info!(
                    "coordinator unavailable ({}); retrying the fetch",
                    s.message()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

async fn fetch_once(
    client: &mut Client,
    job_id: &str,
) -> Result<Vec<(String, Vec<u8>)>, ClientError> {
    let mut stream = client
        .fetch_result(v1::FetchResultRequest {
            job_id: job_id.to_string(),
        })
        .await?
        .into_inner();
    let mut files: Vec<(String, Vec<u8>, bool)> = Vec::new();
    while let Some(chunk) = stream.message().await? {
        if chunk.name.is_empty()
            || chunk.name.contains('/')
            || chunk.name.contains('\\')
            || chunk.name.starts_with('.')
        {
            return Err(ClientError::Protocol(format!(
                "result file name {:?} is not a plain file name",
                chunk.name
            )));
        }
        match files.iter_mut().find(|f| f.0 == chunk.name) {
            Some(f) if f.2 => {
                return Err(ClientError::Protocol(format!(
                    "result file {} continued after its last chunk",
                    chunk.name
                )));
            }
            Some(f) => {
                f.1.extend_from_slice(&chunk.data);
                f.2 = chunk.last;
            }
            None => files.push((chunk.name.clone(), chunk.data.to_vec(), chunk.last)),
        }
    }
    if let Some(f) = files.iter().find(|f| !f.2) {
        return Err(ClientError::Protocol(format!(
            "result file {} is truncated (no last chunk)",
            f.0
        )));
    }
    let mut out: Vec<(String, Vec<u8>)> = files.into_iter().map(|(n, d, _)| (n, d)).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
