//! The coordinator's Prometheus event metrics: [`CoordinatorMetrics`], counters and a
//! histogram named `dmqsm_coordinator_*` (`docs/metrics.md` lists every metric with
//! example queries).
//!
//! The handle is cheap to clone and is kept in
//! [`CoordinatorConfig::metrics`](crate::config::CoordinatorConfig::metrics): every
//! coordinator built from its own configuration has its own counters, so tests can run
//! several in one process. The dispatcher reports every batch attempt, retry and
//! benching, the job runner every finished diffusion step. The gauges of the coordinator's
//! state (queue depth, jobs by state, workers by health, per-worker load) are computed at
//! scrape time instead, and the endpoint that serves both is
//! [`metrics_endpoint`](crate::metrics_endpoint).
//!
//! Bytes on the wire count tensor payloads (patches and cotangents sent, ε or Jᵀv
//! received): the bulk of every message; protobuf framing, gRPC and HTTP/2 headers are
//! not counted. A retried batch is sent, and counted, again.
//!
//! This module uses nothing else of the crate (the configuration holds it).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// The prefix of every coordinator metric.
pub const PREFIX: &str = "dmqsm_coordinator";

/// Upper bounds (seconds) of the step-duration histogram's buckets: 10 ms doubling to
/// about 82 s (14 buckets, plus +Inf).
pub fn step_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.01, 2.0, 14)
}

/// Labels of one worker's series: `worker` is the worker's id as `dmqsm workers` shows it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

/// Labels of a batch attempt: the worker, and `outcome` `ok` (answered and accepted) or
/// `failed` (error status, timeout, lost worker or malformed answer).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    worker: String,
    outcome: &'static str,
}

#[derive(Debug)]
struct Families {
    patches: Counter,
    batch_retries: Counter,
    worker_benched: Counter,
    sent_bytes: Counter,
    received_bytes: Counter,
    step_seconds: Histogram,
    worker_batches: Family<AttemptLabels, Counter>,
    worker_in_flight_seconds: Family<WorkerLabel, Counter<f64, AtomicU64>>,
}

/// The coordinator's event metrics (see the module docs). Clones share the counters.
#[derive(Clone)]
pub struct CoordinatorMetrics {
    families: Arc<Families>,
}

impl std::fmt::Debug for CoordinatorMetrics {
    /// Terse (it sits in the configuration's `Debug`): the patch and retry counts.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorMetrics")
            .field("patches", &self.families.patches.get())
            .field("batch_retries", &self.families.batch_retries.get())
            .finish_non_exhaustive()
    }
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self {
            families: Arc::new(Families {
                patches: Counter::default(),
                batch_retries: Counter::default(),
                worker_benched: Counter::default(),
                sent_bytes: Counter::default(),
                received_bytes: Counter::default(),
                step_seconds: Histogram::new(step_buckets()),
                worker_batches: Family::default(),
                worker_in_flight_seconds: Family::default(),
            }),
        }
    }
}

impl CoordinatorMetrics {
    /// Records one batch attempt on worker `worker` that took `elapsed` (the RPC's wall
    /// time, from sending to the answer or the failure) and sent `sent_bytes` of tensor
    /// payload: the worker's in-flight seconds and attempt count by outcome, and, for an
    /// answered and accepted batch (`answered` = `(patches, received_bytes)`), the patches
    /// evaluated and the answer's payload bytes.
    pub fn attempt_finished(
        &self,
        worker: &str,
        elapsed: Duration,
        sent_bytes: u64,
        answered: Option<(usize, u64)>,
    ) {
        let f = &self.families;
        f.sent_bytes.inc_by(sent_bytes);
        let w = WorkerLabel {
            worker: worker.to_string(),
        };
        f.worker_in_flight_seconds
            .get_or_create(&w)
            .inc_by(elapsed.as_secs_f64());
        let outcome = if answered.is_some() { "ok" } else { "failed" };
        f.worker_batches
            .get_or_create(&AttemptLabels {
                worker: w.worker,
                outcome,
            })
            .inc();
        if let Some((patches, received_bytes)) = answered {
            f.patches.inc_by(patches as u64);
            f.received_bytes.inc_by(received_bytes);
        }
    }

    /// Records that a failed batch was queued again for another attempt.
    pub fn batch_retried(&self) {
        self.families.batch_retries.inc();
    }

    /// Records that a worker was benched after consecutive failures.
    pub fn worker_benched(&self) {
        self.families.worker_benched.inc();
    }

    /// Records one finished diffusion step of a job that took `elapsed` (wall time of its
    /// rounds, from the end of the previous step or the sampler's start, including a
    /// checkpoint written at its end).
    pub fn step_finished(&self, elapsed: Duration) {
        self.families.step_seconds.observe(elapsed.as_secs_f64());
    }

    /// Registers the event families in `registry` (unprefixed names: the endpoint's
    /// registry puts them under [`PREFIX`]).
    pub fn register(&self, registry: &mut Registry) {
        let f = &self.families;
        registry.register(
            "patches",
            "Patches evaluated by workers and accepted (one per row of every answered batch; rate() is patches per second)",
            f.patches.clone(),
        );
        registry.register(
            "batch_retries",
            "Failed batch attempts queued again for another attempt",
            f.batch_retries.clone(),
        );
        registry.register(
            "worker_benched",
            "Times a worker was benched (no new batches for the quarantine) after consecutive failures",
            f.worker_benched.clone(),
        );
        registry.register_with_unit(
            "wire_sent",
            "Tensor payload bytes sent to workers (patches and cotangents, every attempt)",
            Unit::Bytes,
            f.sent_bytes.clone(),
        );
        registry.register_with_unit(
            "wire_received",
            "Tensor payload bytes of accepted worker answers (eps or J^T v)",
            Unit::Bytes,
            f.received_bytes.clone(),
        );
        registry.register_with_unit(
            "step_duration",
            "Wall time of one diffusion step of a job, all its rounds (two for exact DPS)",
            Unit::Seconds,
            f.step_seconds.clone(),
        );
        registry.register(
            "worker_batches",
            "Batch attempts per worker by outcome (ok: answered and accepted; failed: error, timeout, lost worker or malformed answer)",
            f.worker_batches.clone(),
        );
        registry.register_with_unit(
            "worker_in_flight",
            "Integral of the worker's in-flight batches over time (every attempt adds its RPC wall time); rate() is the mean number in flight, divided by worker_slots the worker's utilisation",
            Unit::Seconds,
            f.worker_in_flight_seconds.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmqsm_proto::metrics_http::{Format, render, sample_value};

    #[test]
    fn events_appear_in_the_exposition_with_their_units() {
        let m = CoordinatorMetrics::default();
        let mut reg = Registry::with_prefix(PREFIX);
        m.register(&mut reg);
        // Three answered batches of 3 patches (96 bytes each way), one failure (48 bytes
        // sent), two retries, a benching and two steps.
        for _ in 0..3 {
            m.attempt_finished("w0", Duration::from_millis(500), 96, Some((3, 96)));
        }
        m.attempt_finished("w1", Duration::from_secs(2), 48, None);
        m.batch_retried();
        m.batch_retried();
        m.worker_benched();
        m.step_finished(Duration::from_millis(30));
        m.step_finished(Duration::from_secs(3));
        // A clone shares the counters.
        m.clone().batch_retried();

        let text = render(&reg, Format::Prometheus).unwrap();
        let v = |s: &str| sample_value(&text, s).unwrap_or_else(|| panic!("{s} in\n{text}"));
        assert_eq!(v("dmqsm_coordinator_patches_total"), 9.0);
        assert_eq!(v("dmqsm_coordinator_batch_retries_total"), 3.0);
        assert_eq!(v("dmqsm_coordinator_worker_benched_total"), 1.0);
        assert_eq!(
            v("dmqsm_coordinator_wire_sent_bytes_total"),
            3.0 * 96.0 + 48.0
        );
        assert_eq!(v("dmqsm_coordinator_wire_received_bytes_total"), 3.0 * 96.0);
        assert_eq!(
            v(r#"dmqsm_coordinator_worker_batches_total{worker="w0",outcome="ok"}"#),
            3.0
        );
        assert_eq!(
            v(r#"dmqsm_coordinator_worker_batches_total{worker="w1",outcome="failed"}"#),
            1.0
        );
        assert_eq!(
            v(r#"dmqsm_coordinator_worker_in_flight_seconds_total{worker="w0"}"#),
            1.5
        );
        assert_eq!(v("dmqsm_coordinator_step_duration_seconds_count"), 2.0);
        assert_eq!(
            v(r#"dmqsm_coordinator_step_duration_seconds_bucket{le="0.04"}"#),
            1.0
        );
        assert!(text.contains("# TYPE dmqsm_coordinator_step_duration_seconds histogram"));
        assert!(text.contains("# TYPE dmqsm_coordinator_patches_total counter"));
    }
}
