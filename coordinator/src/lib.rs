//! # dmqsm-coordinator: DM-QSM as a cluster service
//!
//! The coordinator turns the sampler of `dmqsm_common` into a service: it accepts jobs
//! over gRPC, splits every diffusion step of every job into deterministic patch batches,
//! sends them to score-model workers, gathers the answers, finishes the step (overlap
//! normalisation, DDIM update, DPS correction) and checkpoints in sled.
//!
//! One concept per module:
//! - [`config`]: every tunable, with defaults.
//! - [`admission`]: a job's peak memory from its headers; the memory budget.
//! - [`job`]: job settings, records and history as stored.
//! - [`convert`]: stored job types ↔ their wire messages.
//! - [`store`]: the sled store (jobs, inputs, checkpoints, results).
//! - [`inputs`]: uploaded or path inputs under the data root.
//! - [`problem`]: stored inputs → the sampler's problem.
//! - [`workers`]: one worker as the coordinator sees it.
//! - [`dispatch`]: batches → workers (bounded in-flight, fairness, retries, lost workers).
//! - [`shared_plane`]: the shared-memory slots of workers on this host (the same-host
//!   data plane of `dmqsm_proto::shm`).
//! - [`metrics`]: Prometheus event metrics (counters, step histogram) in the config.
//! - [`metrics_endpoint`]: the `/metrics` endpoint: those plus scrape-time gauges.
//! - [`runner`]: one job's life: rounds, steps, checkpoints, results.
//! - [`results`]: result files (NIfTI, PNG, JSON report).
//! - [`service`]: the job service and its gRPC face.
//! - `state`: what the service and the runners share (store, dispatcher, live jobs).
//! - [`client`]: the client side, shared by the CLI and the tests.
//! - [`local_workers`]: embedded mode's `dmqsm-worker` processes on loopback.
//! - [`remote_model`]: a worker's model as a `ScoreModel`, for in-process drivers.
//!
//! Nothing here links libtorch: models run in `dmqsm-worker` processes.

pub mod admission;
pub mod client;
pub mod cohort;
pub mod compute;
pub mod config;
pub mod convert;
pub mod dispatch;
pub mod error;
pub mod inputs;
pub mod job;
pub mod local_workers;
pub mod metrics;
pub mod metrics_endpoint;
pub mod problem;
pub mod remote_model;
pub mod results;
pub mod runner;
pub mod service;
pub mod shared_plane;
pub(crate) mod state;
pub mod store;
pub mod workers;

pub use config::CoordinatorConfig;
pub use error::{CoordinatorError, Result};
pub use service::{Coordinator, serve, spawn_server};
