//! The coordinator's shared state: configuration, the store, the dispatcher and the
//! control channels of live jobs. The job service ([`crate::service`]) and the job
//! runners ([`crate::runner`]) both hold it; neither imports the other for it.

use crate::config::CoordinatorConfig;
use crate::dispatch::Dispatcher;
use crate::store::JobStore;
use dmqsm_proto::v1;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{Semaphore, watch};

/// A live job's control channels.
pub(crate) struct JobHandle {
    /// Set to true to cancel.
    pub cancel: watch::Sender<bool>,
    /// The latest progress report.
    pub progress: watch::Sender<v1::JobProgress>,
}

/// State shared by the service and the job runners.
pub(crate) struct Shared {
    pub config: CoordinatorConfig,
    pub store: JobStore,
    pub dispatcher: Dispatcher,
    pub jobs: Mutex<HashMap<String, Arc<JobHandle>>>,
    pub run_slots: Arc<Semaphore>,
    /// Problems built while validating a submission, taken by the job's runner (so the
    /// inputs are decoded once; a resumed job rebuilds from the stored inputs).
    pub prepared: Mutex<HashMap<String, Arc<dmqsm_common::tasks::Problem>>>,
    /// Turns true when the coordinator shuts down: watch streams end and runners
    /// checkpoint at the next step boundary and stop.
    pub stopping: watch::Sender<bool>,
    /// The memory budget and what queued and running jobs hold of it.
    pub admission: crate::admission::Admission,
    /// The threads of the coordinator's numerics.
    pub compute: crate::compute::ComputePool,
}

impl Shared {
    pub(crate) fn handle(&self, job_id: &str) -> Option<Arc<JobHandle>> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(job_id)
            .cloned()
    }
}
