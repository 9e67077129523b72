//! The Prometheus `/metrics` endpoint of `dmqsm serve` and `dmqsm-worker serve`: plain
//! HTTP/1.1 on a listener of its own (`--metrics-listen ADDR`), apart from the gRPC port.
//!
//! Each side owns its metric families (`dmqsm_coordinator::metrics`,
//! `dmqsm_worker::metrics`) and hands a finished [`Registry`] to [`serve_metrics`] or
//! [`spawn_metrics_server`]; this module only serves it:
//!
//! - `GET /metrics` answers the registry in the Prometheus text format 0.0.4
//!   (`text/plain; version=0.0.4`), or in OpenMetrics 1.0 text when the scraper's
//!   `Accept` header asks for `application/openmetrics-text` (Prometheus does). Values
//!   computed at scrape time (collectors) are read off the reactor, on a blocking thread.
//! - `GET /` answers a one-line pointer to `/metrics`; anything else is 404.
//!
//! There is no authentication and no TLS: bind the endpoint to an address that only the
//! monitoring network reaches (see `docs/metrics.md`).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Why the metrics endpoint could not be started, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum MetricsHttpError {
    /// The listen address could not be bound.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The HTTP server failed (or its listener's address could not be read).
    #[error("metrics HTTP server: {0}")]
    Serve(std::io::Error),
    /// The server task ended abnormally (it panicked or was aborted).
    #[error("metrics HTTP server task: {0}")]
    Task(String),
    /// A metric could not be encoded.
    #[error("encoding metrics: {0}")]
    Encode(std::fmt::Error),
}

/// An exposition format of `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4 (the default).
    Prometheus,
    /// OpenMetrics 1.0 text (ends with `# EOF`).
    OpenMetrics,
}

impl Format {
    /// The format a scraper asks for with its `Accept` header: OpenMetrics when the header
    /// names `application/openmetrics-text`, else the Prometheus text format.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Encodes every metric of `registry` (its collectors run now) in `format`.
pub fn render(registry: &Registry, format: Format) -> Result<String, MetricsHttpError> {
    let mut out = String::new();
    match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry),
    }
    .map_err(MetricsHttpError::Encode)?;
    Ok(out)
}

async fn metrics(State(registry): State<Arc<Registry>>, headers: HeaderMap) -> Response {
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    // Collectors may read stores or take locks: keep them off the reactor.
    match tokio::task::spawn_blocking(move || render(&registry, format)).await {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
        Ok(Err(e)) => {
            tracing::error!("/metrics: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
        Err(e) => {
            tracing::error!("/metrics: the encoder failed: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the metrics encoder failed: {e}"),
            )
                .into_response()
        }
    }
}

async fn index() -> &'static str {
    "dmqsm: Prometheus metrics are at /metrics\n"
}

/// Serves `registry` at `GET /metrics` on `listener` until `shutdown` resolves (see the
/// module docs), then finishes the requests in progress and returns.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MetricsHttpError> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(index))
        .with_state(registry);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(MetricsHttpError::Serve)
}

/// A `/metrics` endpoint serving in a background task (see [`spawn_metrics_server`]). It
/// stops on [`MetricsServer::shutdown`], or when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), MetricsHttpError>>>,
}

impl MetricsServer {
    /// The bound address (the real port when port 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/metrics`, the URL to scrape.
    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }

    /// Stops accepting scrapes, lets the ones in progress finish, and returns the server's
    /// result.
    pub async fn shutdown(mut self) -> Result<(), MetricsHttpError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(|e| MetricsHttpError::Task(e.to_string()))?,
            None => Ok(()),
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Binds `addr` (port 0 picks a free port) and serves `registry` there in a background
/// task of the current tokio runtime.
pub async fn spawn_metrics_server(
    addr: SocketAddr,
    registry: Arc<Registry>,
) -> Result<MetricsServer, MetricsHttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsHttpError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(MetricsHttpError::Serve)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_metrics(listener, registry, async move {
        let _ = stopped.await;
    }));
    tracing::info!("Prometheus metrics on http://{bound}/metrics");
    Ok(MetricsServer {
        addr: bound,
        stop: Some(stop),
        task: Some(task),
    })
}

/// The value of one series in a text exposition (either format): the number after the
/// line that starts with exactly `series` and a space, e.g. `dmqsm_worker_patches_total`
/// or `dmqsm_coordinator_jobs{state="running"}` (labels as the encoder writes them).
/// For tests and tools that scrape an endpoint.
pub fn sample_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let v = l.strip_prefix(series)?.strip_prefix(' ')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    /// A plain HTTP/1.1 GET on a blocking thread (the reactor keeps serving).
    async fn get(addr: SocketAddr, path: &str, accept: &str) -> String {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        );
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn serves_both_text_formats_and_stops() {
        let mut reg = Registry::with_prefix("t");
        let c: Counter = Counter::default();
        reg.register("things", "Things seen", c.clone());
        c.inc_by(3);
        let server = spawn_metrics_server("127.0.0.1:0".parse().unwrap(), Arc::new(reg))
            .await
            .unwrap();
        let addr = server.addr();
        assert_eq!(server.url(), format!("http://{addr}/metrics"));

        let plain = get(addr, "/metrics", "text/plain").await;
        assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
        assert!(plain.contains("version=0.0.4"), "{plain}");
        assert!(plain.contains("\nt_things_total 3\n"), "{plain}");
        assert!(!plain.contains("# EOF"), "{plain}");

        let om = get(
            addr,
            "/metrics",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .await;
        assert!(om.contains("application/openmetrics-text"), "{om}");
        assert!(om.contains("\nt_things_total 3\n"), "{om}");
        assert!(om.trim_end().ends_with("# EOF"), "{om}");

        assert!(
            get(addr, "/nothing", "*/*")
                .await
                .starts_with("HTTP/1.1 404")
        );
        assert!(get(addr, "/", "*/*").await.contains("/metrics"));

        server.shutdown().await.unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[test]
    fn sample_values_match_whole_series_names() {
        let t = "a_total 3\na_total_x 4\nb{l=\"x\"} 2.5\n# HELP b x\n";
        assert_eq!(sample_value(t, "a_total"), Some(3.0));
        assert_eq!(sample_value(t, "a_total_x"), Some(4.0));
        assert_eq!(sample_value(t, "b{l=\"x\"}"), Some(2.5));
        assert_eq!(sample_value(t, "b"), None);
    }

    #[tokio::test]
    async fn a_taken_address_is_named() {
        let first = spawn_metrics_server("127.0.0.1:0".parse().unwrap(), Arc::default())
            .await
            .unwrap();
        let e = spawn_metrics_server(first.addr(), Arc::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&first.addr().to_string()), "{e}");
    }
}
