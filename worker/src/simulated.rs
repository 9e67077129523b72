//! [`SimulatedModel`]: a cheap, deterministic stand-in for a GPU-backed network.
//!
//! It delegates the numbers to any inner [`ScoreModel`] (typically the analytic
//! Gaussian-prior model, whose ε is exact and costs one multiply per voxel) and sleeps a
//! fixed time per call plus a fixed time per patch, like a GPU with a fixed per-batch
//! cost. The coordinator's scaling benchmark uses it to time 1/2/4/8 workers without
//! libtorch speed getting in the way.

use dmqsm_common::diffusion::model::{ModelSpec, ScoreModel};
use ndarray::{Array4, ArrayView4};
use std::sync::Arc;
use std::time::Duration;

/// A score model with simulated latency (see the module docs).
#[derive(Clone)]
pub struct SimulatedModel {
    inner: Arc<dyn ScoreModel + Send + Sync>,
    latency_per_batch: Duration,
    latency_per_patch: Duration,
}

impl std::fmt::Debug for SimulatedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedModel")
            .field("model_id", &self.inner.spec().model_id)
            .field("latency_per_batch", &self.latency_per_batch)
            .field("latency_per_patch", &self.latency_per_patch)
            .finish()
    }
}

impl SimulatedModel {
    /// Wraps `inner`; every `eps`/`vjp` call first sleeps
    /// `latency_per_batch + B · latency_per_patch`.
    pub fn new(
        inner: Arc<dyn ScoreModel + Send + Sync>,
        latency_per_batch: Duration,
        latency_per_patch: Duration,
    ) -> Self {
        Self {
            inner,
            latency_per_batch,
            latency_per_patch,
        }
    }

    /// The simulated latency of one call with `batch` patches.
    pub fn latency(&self, batch: usize) -> Duration {
        self.latency_per_batch + self.latency_per_patch * batch as u32
    }

    fn wait(&self, batch: usize) {
        let d = self.latency(batch);
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

impl ScoreModel for SimulatedModel {
    fn spec(&self) -> &ModelSpec {
        self.inner.spec()
    }

    fn eps(&self, patches: ArrayView4<'_, f32>, t: &[f32]) -> dmqsm_common::Result<Array4<f32>> {
        self.wait(patches.shape()[0]);
        self.inner.eps(patches, t)
    }

    fn vjp(
        &self,
        patches: ArrayView4<'_, f32>,
        t: &[f32],
        cotangent: ArrayView4<'_, f32>,
    ) -> dmqsm_common::Result<Array4<f32>> {
        self.wait(patches.shape()[0]);
        self.inner.vjp(patches, t, cotangent)
    }
}
