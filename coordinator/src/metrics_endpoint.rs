//! The coordinator's Prometheus `/metrics` endpoint: [`registry`] gathers every
//! `dmqsm_coordinator_*` metric of a [`Coordinator`], [`spawn_metrics_server`] serves it
//! (through [`dmqsm_proto::metrics_http`]; `dmqsm serve --metrics-listen ADDR`).
//!
//! The event counters are the configuration's [`CoordinatorMetrics`](crate::metrics::CoordinatorMetrics);
//! the gauges of the coordinator's state are computed at every scrape from the dispatcher
//! and the store, so they cannot drift from what `dmqsm status` and `dmqsm workers` show:
//! the batch queue depth, jobs by state, workers by health, and each worker's in-flight
//! batches and utilisation (in-flight / `--max-in-flight`). `docs/metrics.md` lists them.

use crate::config::CoordinatorConfig;
use crate::dispatch::Dispatcher;
use crate::job::JobState;
use crate::metrics::PREFIX;
use crate::service::Coordinator;
use crate::store::JobStore;
use dmqsm_proto::metrics_http::{self, MetricsHttpError, MetricsServer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;

/// The gauges computed at scrape time (see the module docs).
#[derive(Debug)]
struct StateCollector {
    dispatcher: Dispatcher,
    store: JobStore,
    slots: usize,
}

const JOB_STATES: [JobState; 5] = [
    JobState::Queued,
    JobState::Running,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
];

/// Worker health names always listed (with 0 when no worker is in them).
const WORKER_STATES: [&str; 5] = ["ready", "benched", "draining", "lost", "untrusted"];

/// [`WORKER_STATES`], then any other state a worker reports, in first-seen order.
fn worker_states(workers: &[dmqsm_proto::v1::WorkerStatus]) -> Vec<String> {
    let mut out: Vec<String> = WORKER_STATES.iter().map(|s| s.to_string()).collect();
    for w in workers {
        if !out.contains(&w.state) {
            out.push(w.state.clone());
        }
    }
    out
}

fn gauge<N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error> {
    let e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(e)
}

fn labelled_gauges<N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: impl IntoIterator<Item = (String, N)>,
) -> Result<(), std::fmt::Error> {
    let mut e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value_of_label, v) in values {
        let labels = [(label, value_of_label)];
        ConstGauge::new(v).encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        gauge(
            e,
            "pending_batches",
            "Batches queued in the dispatcher and not yet sent to a worker, all jobs (the batch queue depth).",
            self.dispatcher.pending_batches() as u64,
        )?;
        match self.store.count_by_state() {
            Ok(counts) => labelled_gauges(
                e,
                "jobs",
                "Stored jobs by state (queued: waiting for a run slot, the job queue depth; running; succeeded; failed; cancelled).",
                "state",
                JOB_STATES.iter().map(|s| {
                    let n = counts.iter().find(|(c, _)| c == s).map_or(0, |(_, n)| *n);
                    (s.name().to_string(), n)
                }),
            )?,
            Err(err) => tracing::warn!("metrics: cannot count jobs by state: {err}"),
        }
        let workers = self.dispatcher.workers();
        labelled_gauges(
            e,
            "workers",
            "Known workers by health (ready; benched after consecutive failures; draining; lost: missed heartbeats or probes; untrusted: a malformed answer or a lost spot check).",
            "state",
            worker_states(&workers).into_iter().map(|s| {
                let n = workers.iter().filter(|w| w.state == s).count() as u64;
                (s, n)
            }),
        )?;
        gauge(
            e,
            "worker_slots",
            "Batches a worker may hold in flight at once (--max-in-flight).",
            self.slots as u64,
        )?;
        labelled_gauges(
            e,
            "worker_in_flight_batches",
            "Batches in flight on each worker now.",
            "worker",
            workers
                .iter()
                .map(|w| (w.worker_id.clone(), w.in_flight as u64)),
        )?;
        labelled_gauges(
            e,
            "worker_utilisation_ratio",
            "Share of each worker's slots in flight now (in-flight batches / worker_slots, 0 to 1).",
            "worker",
            workers.iter().map(|w| {
                (
                    w.worker_id.clone(),
                    w.in_flight as f64 / self.slots.max(1) as f64,
                )
            }),
        )?;
        Ok(())
    }
}

/// Every coordinator metric of `coordinator` under `dmqsm_coordinator_`: its
/// configuration's event counters and the scrape-time gauges over its dispatcher and store.
pub fn registry(coordinator: &Coordinator) -> Registry {
    registry_parts(
        coordinator.config(),
        coordinator.dispatcher().clone(),
        coordinator.store().clone(),
    )
}

fn registry_parts(config: &CoordinatorConfig, dispatcher: Dispatcher, store: JobStore) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    config.metrics.register(&mut registry);
    registry.register_collector(Box::new(StateCollector {
        dispatcher,
        store,
        slots: config.max_in_flight_per_worker,
    }));
    registry
}

/// Serves [`registry`] of `coordinator` at `http://ADDR/metrics` in the background (port
/// 0 picks a free port; [`MetricsServer::addr`] tells which). It stops when the returned
/// server is shut down or dropped.
pub async fn spawn_metrics_server(
    addr: SocketAddr,
    coordinator: &Coordinator,
) -> Result<MetricsServer, MetricsHttpError> {
    metrics_http::spawn_metrics_server(addr, Arc::new(registry(coordinator))).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{BatchInputs, WireBatch};
    use dmqsm_common::diffusion::sampler::{RoundId, RoundKind};
    use dmqsm_proto::metrics_http::{Format, render, sample_value};
    use dmqsm_proto::v1;

    fn batch() -> WireBatch {
        WireBatch {
            job_id: "j".into(),
            label: "b".into(),
            round: RoundId {
                step: 0,
                kind: RoundKind::Eps,
            },
            indices: vec![0],
            model_hash: "h".into(),
            timesteps: vec![1.0],
            dtype: v1::Dtype::F32,
            inputs: BatchInputs::Encoded {
                patches: dmqsm_proto::tensor::encode(&[0.0; 8], &[1, 2, 2, 2], v1::Dtype::F32),
                cotangents: None,
            },
        }
    }

    #[tokio::test]
    async fn state_gauges_are_computed_at_scrape_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = CoordinatorConfig::new(dir.path());
        config.max_in_flight_per_worker = 3;
        let store = JobStore::open(dir.path()).unwrap();
        let dispatcher = Dispatcher::new(config.clone());
        let reg = registry_parts(&config, dispatcher.clone(), store);
        let text = render(&reg, Format::Prometheus).unwrap();
        let v = |t: &str, s: &str| sample_value(t, s).unwrap_or_else(|| panic!("{s} in\n{t}"));
        // Nothing yet, but every state is listed.
        assert_eq!(v(&text, "dmqsm_coordinator_pending_batches"), 0.0);
        for s in ["queued", "running", "succeeded", "failed", "cancelled"] {
            assert_eq!(
                v(&text, &format!("dmqsm_coordinator_jobs{{state=\"{s}\"}}")),
                0.0
            );
        }
        for s in WORKER_STATES {
            assert_eq!(
                v(
                    &text,
                    &format!("dmqsm_coordinator_workers{{state=\"{s}\"}}")
                ),
                0.0
            );
        }
        assert_eq!(v(&text, "dmqsm_coordinator_worker_slots"), 3.0);
        // The event counters are there too.
        assert_eq!(v(&text, "dmqsm_coordinator_patches_total"), 0.0);
        // Batches of a job that no worker serves wait in the queue.
        dispatcher.open_job("j", 0, "h");
        let _a = dispatcher.submit(batch());
        let _b = dispatcher.submit(batch());
        let text = render(&reg, Format::OpenMetrics).unwrap();
        assert_eq!(v(&text, "dmqsm_coordinator_pending_batches"), 2.0);
        assert!(text.trim_end().ends_with("# EOF"));
        dispatcher.shutdown();
    }
}
