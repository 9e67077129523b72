//! A thin client of the `Coordinator` service, shared by the CLI, the embedded mode and
//! the end-to-end tests: connect, wait for a job, fetch its files.

use dmqsm_proto::v1;
use dmqsm_proto::v1::coordinator_client::CoordinatorClient;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

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

/// A connected coordinator client.
pub type Client = CoordinatorClient<Channel>;

/// Connects to a coordinator at `url` (e.g. `http://127.0.0.1:50051`), with raised
/// message limits.
pub async fn connect(url: &str) -> Result<Client, ClientError> {
    let fail = |cause: String| ClientError::Connect {
        url: url.to_string(),
        cause,
    };
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| fail(format!("bad address: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_adaptive_window(true);
    let channel = endpoint.connect().await.map_err(|e| {
        let mut cause = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            cause = format!("{cause}: {s}");
            src = s.source();
        }
        fail(cause)
    })?;
    let max = dmqsm_proto::DEFAULT_MAX_MESSAGE_BYTES;
    Ok(CoordinatorClient::new(channel)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max))
}

/// True for the states a job cannot leave.
pub fn is_terminal(state: i32) -> bool {
    crate::job::JobState::from_wire(state).is_some_and(crate::job::JobState::is_terminal)
}

/// Follows a job with `WatchJob` until it ends, calling `on_progress` on every report.
/// Returns the final status. Reconnects the stream if it breaks before the end.
pub async fn wait(
    client: &mut Client,
    job_id: &str,
    mut on_progress: impl FnMut(&v1::JobProgress),
) -> Result<v1::JobStatus, ClientError> {
    loop {
        let mut stream = client
            .watch_job(v1::GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await?
            .into_inner();
        while let Ok(Some(p)) = stream.message().await {
            on_progress(&p);
            if let Some(s) = &p.status
                && is_terminal(s.state)
            {
                return Ok(s.clone());
            }
        }
        // Stream ended without a terminal report: ask directly, then watch again.
        let s = client
            .get_job(v1::GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await?
            .into_inner();
        if is_terminal(s.state) {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Downloads every result file of a finished job, `(name, bytes)` in name order.
pub async fn fetch(
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
