//! [`BatchQueue`]: the worker's request queue. Requests are queued and coalesced into
//! batches (up to `max_batch` patches, waiting at most `max_queue_delay` for company)
//! and evaluated on one dedicated OS thread that owns the model, never on the async
//! reactor.
//!
//! Coalescing never changes results: [`TorchModel`](crate::TorchModel) evaluates in
//! fixed-size micro-batches, so a patch's ε is the same whichever request it came with
//! (see `torch_model`'s docs; checked by `worker/tests/grpc.rs`). Only requests of
//! the same kind (ε or VJP) are coalesced. If a coalesced call fails, each request is
//! retried alone, so an error reaches only the request that caused it.

use crate::device::configure_threads;
use crate::error::{Result, WorkerError, catch_torch};
use dmqsm_common::diffusion::model::ScoreModel;
use ndarray::{Array4, Axis, s};
use prometheus_client::metrics::histogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Coalescing settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Largest number of patches per model call (and per request).
    pub max_batch: usize,
    /// Longest time the first request of a batch waits for others (0: take only what is
    /// already queued).
    pub max_queue_delay: Duration,
}

impl Default for BatchConfig {
    /// 16 patches, 2 ms.
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_queue_delay: Duration::from_millis(2),
        }
    }
}

/// Counters of a [`BatchQueue`], shared with the heartbeat task and the metrics endpoint
/// (`crate::metrics`).
#[derive(Debug)]
pub struct QueueStats {
    /// Requests queued or running.
    pub in_flight: AtomicU64,
    /// Requests answered (successfully or not).
    pub requests: AtomicU64,
    /// Model calls made.
    pub batches: AtomicU64,
    /// Model calls that served more than one request.
    pub coalesced_batches: AtomicU64,
    /// Patches evaluated.
    pub patches: AtomicU64,
    /// Requests answered with an error.
    pub failures: AtomicU64,
    /// Nanoseconds the model thread spent in model calls (its busy time).
    pub busy_ns: AtomicU64,
    /// Seconds per model call (coalesced or not, failed ones included).
    pub batch_seconds: Histogram,
    /// Tensor payload bytes of the requests decoded (patches and cotangents), counted by
    /// the gRPC service.
    pub received_bytes: AtomicU64,
    /// Tensor payload bytes of the answers sent (ε or Jᵀv), counted by the gRPC service.
    pub sent_bytes: AtomicU64,
}

/// Upper bounds (seconds) of [`QueueStats::batch_seconds`]' buckets: 1 ms doubling to
/// about 33 s (16 buckets, plus +Inf).
pub fn batch_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16)
}

impl Default for QueueStats {
    fn default() -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            coalesced_batches: AtomicU64::new(0),
            patches: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            batch_seconds: Histogram::new(batch_buckets()),
            received_bytes: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
        }
    }
}

impl QueueStats {
    /// Records one model call that took `elapsed`.
    fn model_call(&self, elapsed: Duration) {
        self.busy_ns.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.batch_seconds.observe(elapsed.as_secs_f64());
    }
}

/// The result of one request, `[B, P, P, P]`: predicted ε for ε requests, Jᵀv for VJP
/// requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// ε or Jᵀv, one row per patch of the request.
    pub values: Array4<f32>,
}

struct Job {
    patches: Array4<f32>,
    t: Vec<f32>,
    cotangent: Option<Array4<f32>>,
    reply: oneshot::Sender<Result<Evaluation>>,
}

impl Job {
    fn batch(&self) -> usize {
        self.patches.shape()[0]
    }
    fn is_vjp(&self) -> bool {
        self.cotangent.is_some()
    }
}

/// The queue and its model thread (see the module docs).
pub struct BatchQueue {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    stats: Arc<QueueStats>,
    thread: Mutex<Option<JoinHandle<()>>>,
    config: BatchConfig,
}

impl std::fmt::Debug for BatchQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchQueue")
            .field("config", &self.config)
            .finish()
    }
}

impl BatchQueue {
    /// Starts the model thread. `threads` sets libtorch's intra-op threads on it;
    /// `stats` receives the counters (share it to read them elsewhere).
    pub fn start(
        model: Arc<dyn ScoreModel + Send + Sync>,
        config: BatchConfig,
        threads: Option<usize>,
        stats: Arc<QueueStats>,
    ) -> Result<Self> {
        if config.max_batch == 0 {
            return Err(WorkerError::Config("max_batch must be at least 1".into()));
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("dmqsm-model".into())
            .spawn(move || {
                configure_threads(threads);
                run_loop(model.as_ref(), config, rx, &thread_stats);
            })
            .map_err(|e| WorkerError::Config(format!("cannot start the model thread: {e}")))?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            stats,
            thread: Mutex::new(Some(thread)),
            config,
        })
    }

    /// The coalescing settings.
    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// The shared counters.
    pub fn stats(&self) -> Arc<QueueStats> {
        self.stats.clone()
    }

    /// ε for `[B, P, P, P]` patches at timesteps `t`.
    pub async fn eps(&self, patches: Array4<f32>, t: Vec<f32>) -> Result<Array4<f32>> {
        Ok(self.submit(patches, t, None).await?.values)
    }

    /// Jᵀv for patches, timesteps and cotangents.
    pub async fn vjp(
        &self,
        patches: Array4<f32>,
        t: Vec<f32>,
        cotangent: Array4<f32>,
    ) -> Result<Array4<f32>> {
        Ok(self.submit(patches, t, Some(cotangent)).await?.values)
    }

    async fn submit(
        &self,
        patches: Array4<f32>,
        t: Vec<f32>,
        cotangent: Option<Array4<f32>>,
    ) -> Result<Evaluation> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            patches,
            t,
            cotangent,
            reply,
        };
        {
            let guard = self
                .tx
                .lock()
                .map_err(|_| WorkerError::Model("request queue poisoned".into()))?;
            let tx = guard
                .as_ref()
                .ok_or_else(|| WorkerError::Unavailable("the worker is shutting down".into()))?;
            self.stats.in_flight.fetch_add(1, Ordering::SeqCst);
            if tx.send(job).is_err() {
                self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
                return Err(WorkerError::Unavailable(
                    "the model thread has stopped".into(),
                ));
            }
        }
        rx.await
            .map_err(|_| WorkerError::Model("the model thread dropped the request".into()))?
    }

    /// Stops taking requests; queued ones are still answered. Then waits for the model
    /// thread to finish (blocking: call from a blocking context or at the very end).
    pub fn close_and_join(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.thread.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("the model thread panicked");
        }
    }
}

impl Drop for BatchQueue {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
    }
}

fn run_loop(
    model: &(dyn ScoreModel + Send + Sync),
    config: BatchConfig,
    rx: mpsc::Receiver<Job>,
    stats: &QueueStats,
) {
    let mut pending: Option<Job> = None;
    loop {
        let first = match pending.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => break,
            },
        };
        let vjp = first.is_vjp();
        let mut total = first.batch();
        let mut group = vec![first];
        let deadline = Instant::now() + config.max_queue_delay;
        while total < config.max_batch {
            let now = Instant::now();
            let next = if now >= deadline {
                rx.try_recv().ok()
            } else {
                rx.recv_timeout(deadline - now).ok()
            };
            let Some(next) = next else { break };
            if next.is_vjp() == vjp && total + next.batch() <= config.max_batch {
                total += next.batch();
                group.push(next);
            } else {
                pending = Some(next);
                break;
            }
        }
        run_group(model, group, stats);
    }
}

fn evaluate(
    model: &(dyn ScoreModel + Send + Sync),
    patches: &Array4<f32>,
    t: &[f32],
    cotangent: Option<&Array4<f32>>,
) -> Result<Evaluation> {
    catch_torch("evaluating the model", || match cotangent {
        None => Ok(Evaluation {
            values: model.eps(patches.view(), t)?,
        }),
        Some(v) => Ok(Evaluation {
            values: model.vjp(patches.view(), t, v.view())?,
        }),
    })
}

fn answer(job: Job, result: Result<Evaluation>, stats: &QueueStats) {
    if result.is_err() {
        stats.failures.fetch_add(1, Ordering::Relaxed);
    }
    stats.requests.fetch_add(1, Ordering::Relaxed);
    stats.in_flight.fetch_sub(1, Ordering::SeqCst);
    // The caller may have gone away (cancelled RPC); nothing to do then.
    let _ = job.reply.send(result);
}

fn run_single(model: &(dyn ScoreModel + Send + Sync), job: Job, stats: &QueueStats) {
    let started = Instant::now();
    let result = evaluate(model, &job.patches, &job.t, job.cotangent.as_ref());
    stats.model_call(started.elapsed());
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats
        .patches
        .fetch_add(job.batch() as u64, Ordering::Relaxed);
    answer(job, result, stats);
}

fn run_group(model: &(dyn ScoreModel + Send + Sync), group: Vec<Job>, stats: &QueueStats) {
    if group.len() == 1 {
        if let Some(job) = group.into_iter().next() {
            run_single(model, job, stats);
        }
        return;
    }
    let concat = |arrays: Vec<ndarray::ArrayView4<'_, f32>>| {
        ndarray::concatenate(Axis(0), &arrays)
            .map_err(|e| WorkerError::Model(format!("coalescing: {e}")))
    };
    let patches = concat(group.iter().map(|j| j.patches.view()).collect());
    let t: Vec<f32> = group.iter().flat_map(|j| j.t.iter().copied()).collect();
    let cot = if group[0].is_vjp() {
        Some(concat(
            group
                .iter()
                .filter_map(|j| j.cotangent.as_ref().map(|c| c.view()))
                .collect(),
        ))
    } else {
        None
    };
    let started = Instant::now();
    let result = match (patches, cot) {
        (Ok(p), None) => evaluate(model, &p, &t, None),
        (Ok(p), Some(Ok(c))) => evaluate(model, &p, &t, Some(&c)),
        (Err(e), _) | (_, Some(Err(e))) => Err(e),
    };
    stats.model_call(started.elapsed());
    match result {
        Ok(out) => {
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats.coalesced_batches.fetch_add(1, Ordering::Relaxed);
            let mut start = 0;
            for job in group {
                let b = job.batch();
                stats.patches.fetch_add(b as u64, Ordering::Relaxed);
                let values = out
                    .values
                    .slice(s![start..start + b, .., .., ..])
                    .to_owned();
                start += b;
                answer(job, Ok(Evaluation { values }), stats);
            }
        }
        Err(e) => {
            tracing::warn!(
                "coalesced batch of {} requests failed ({e}); retrying each alone",
                group.len()
            );
            for job in group {
                run_single(model, job, stats);
            }
        }
    }
}
