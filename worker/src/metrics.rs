//! Prometheus metrics of a worker, all named `dmqsm_worker_*`, served by
//! `dmqsm-worker serve --metrics-listen ADDR` ([`ServerConfig::metrics_listen`]) through
//! [`dmqsm_proto::metrics_http`]. `docs/metrics.md` lists them with example queries.
//!
//! Everything is read at scrape time from the request queue's [`QueueStats`] (the same
//! counters the heartbeats report), so the model thread only bumps atomics and one
//! histogram:
//! - requests answered (and failed), patches evaluated, model calls (and coalesced ones);
//! - requests in flight (queued or running: the queue depth);
//! - busy seconds of the model thread: `rate()` of it is the worker's utilisation, the
//!   share of time its device spends in model calls (0 to 1);
//! - seconds per model call (histogram);
//! - tensor payload bytes received and sent (patches and cotangents in, ε or Jᵀv out;
//!   protobuf framing, gRPC and HTTP/2 headers are not counted);
//! - `dmqsm_worker_model_info`: 1, labelled with the worker id, model id, content hash
//!   and device, to join the other series on.
//!
//! [`ServerConfig::metrics_listen`]: crate::ServerConfig::metrics_listen

use crate::batching::QueueStats;
use dmqsm_proto::metrics_http::{self, MetricsHttpError, MetricsServer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// The prefix of every worker metric.
pub const PREFIX: &str = "dmqsm_worker";

/// What a worker serves, for `dmqsm_worker_model_info`'s labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelLabels {
    /// The worker's id (`worker_id` label).
    pub worker_id: String,
    /// The model's id (`model_id` label).
    pub model_id: String,
    /// The model's content hash, the one jobs are pinned to (`content_hash` label).
    pub content_hash: String,
    /// The device, e.g. `cpu` or `cuda:0` (`device` label).
    pub device: String,
}

/// Reads [`QueueStats`] at scrape time.
#[derive(Debug)]
struct StatsCollector {
    stats: Arc<QueueStats>,
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let e = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
    ConstCounter::new(value).encode(e)
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let e = &mut encoder;
        counter(
            e,
            "requests",
            "Requests answered by the model queue, successfully or not (requests refused before it, e.g. malformed ones, are not counted).",
            None,
            get(&s.requests),
        )?;
        counter(
            e,
            "failed_requests",
            "Requests the model queue answered with an error.",
            None,
            get(&s.failures),
        )?;
        counter(
            e,
            "patches",
            "Patches evaluated (rate() is patches per second).",
            None,
            get(&s.patches),
        )?;
        counter(
            e,
            "batches",
            "Successful model calls (several coalesced requests make one call).",
            None,
            get(&s.batches),
        )?;
        counter(
            e,
            "coalesced_batches",
            "Successful model calls that served more than one request.",
            None,
            get(&s.coalesced_batches),
        )?;
        let g = e.encode_descriptor(
            "in_flight_requests",
            "Requests queued or being evaluated now (the worker's queue depth).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(get(&s.in_flight)).encode(g)?;
        let busy = e.encode_descriptor(
            "busy",
            "Time the model thread spent in model calls; rate() is the worker's utilisation (0 to 1).",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        ConstCounter::new(get(&s.busy_ns) as f64 * 1e-9).encode(busy)?;
        counter(
            e,
            "received",
            "Tensor payload bytes of the requests received (patches and cotangents).",
            Some(&Unit::Bytes),
            get(&s.received_bytes),
        )?;
        counter(
            e,
            "sent",
            "Tensor payload bytes of the answers sent (eps or J^T v).",
            Some(&Unit::Bytes),
            get(&s.sent_bytes),
        )?;
        Ok(())
    }
}

/// Every metric of a worker under [`PREFIX`]: the counters of `stats` (read at each
/// scrape), the model-call histogram and, when given, the model info.
pub fn registry(stats: Arc<QueueStats>, model: Option<&ModelLabels>) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_with_unit(
        "batch_duration",
        "Wall time of one model call (coalesced or not, failed ones included)",
        Unit::Seconds,
        stats.batch_seconds.clone(),
    );
    if let Some(m) = model {
        registry.register(
            "model",
            "What this worker serves (always 1)",
            Info::new(vec![
                ("worker_id".to_string(), m.worker_id.clone()),
                ("model_id".to_string(), m.model_id.clone()),
                ("content_hash".to_string(), m.content_hash.clone()),
                ("device".to_string(), m.device.clone()),
            ]),
        );
    }
    registry.register_collector(Box::new(StatsCollector { stats }));
    registry
}

/// Serves [`registry`] at `http://ADDR/metrics` in the background (port 0 picks a free
/// port; [`MetricsServer::addr`] tells which). It stops when the returned server is shut
/// down or dropped.
pub async fn spawn_metrics_server(
    addr: SocketAddr,
    stats: Arc<QueueStats>,
    model: Option<&ModelLabels>,
) -> Result<MetricsServer, MetricsHttpError> {
    metrics_http::spawn_metrics_server(addr, Arc::new(registry(stats, model))).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmqsm_proto::metrics_http::{Format, render, sample_value};

    #[test]
    fn the_queue_counters_are_read_at_scrape_time() {
        let stats = Arc::new(QueueStats::default());
        let labels = ModelLabels {
            worker_id: "w0".into(),
            model_id: "m".into(),
            content_hash: "abc".into(),
            device: "cpu".into(),
        };
        let reg = registry(stats.clone(), Some(&labels));
        stats.requests.store(5, Ordering::Relaxed);
        stats.failures.store(1, Ordering::Relaxed);
        stats.patches.store(40, Ordering::Relaxed);
        stats.batches.store(4, Ordering::Relaxed);
        stats.in_flight.store(2, Ordering::Relaxed);
        stats.busy_ns.store(1_500_000_000, Ordering::Relaxed);
        stats.received_bytes.store(1000, Ordering::Relaxed);
        stats.sent_bytes.store(500, Ordering::Relaxed);
        stats.batch_seconds.observe(0.003);
        let text = render(&reg, Format::Prometheus).unwrap();
        let v = |s: &str| sample_value(&text, s).unwrap_or_else(|| panic!("{s} in\n{text}"));
        assert_eq!(v("dmqsm_worker_requests_total"), 5.0);
        assert_eq!(v("dmqsm_worker_failed_requests_total"), 1.0);
        assert_eq!(v("dmqsm_worker_patches_total"), 40.0);
        assert_eq!(v("dmqsm_worker_batches_total"), 4.0);
        assert_eq!(v("dmqsm_worker_coalesced_batches_total"), 0.0);
        assert_eq!(v("dmqsm_worker_in_flight_requests"), 2.0);
        assert_eq!(v("dmqsm_worker_busy_seconds_total"), 1.5);
        assert_eq!(v("dmqsm_worker_received_bytes_total"), 1000.0);
        assert_eq!(v("dmqsm_worker_sent_bytes_total"), 500.0);
        assert_eq!(v("dmqsm_worker_batch_duration_seconds_count"), 1.0);
        assert_eq!(
            v(r#"dmqsm_worker_batch_duration_seconds_bucket{le="0.004"}"#),
            1.0
        );
        assert!(
            text.contains(r#"dmqsm_worker_model_info{worker_id="w0",model_id="m",content_hash="abc",device="cpu"} 1"#),
            "{text}"
        );
    }
}
