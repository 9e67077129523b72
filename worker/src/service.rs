//! The gRPC `Worker` service: decodes and validates requests, queues them on the
//! [`BatchQueue`], encodes the answers.
//!
//! Status codes: malformed requests (missing tensor, unsupported dtype, byte length not
//! matching the shape, wrong shape or patch size, empty batch, batch over `max_batch`,
//! timesteps missing, non-finite or outside [0, T−1], NaN/∞ in patches or cotangents,
//! unknown `response_dtype`, a `model_hash` that is not this worker's) answer
//! `INVALID_ARGUMENT` naming the problem; a shared-memory region that is not attached
//! (the worker restarted) answers `FAILED_PRECONDITION`; model failures answer `INTERNAL` with
//! libtorch's message; a draining worker answers `UNAVAILABLE`. Nothing a client sends
//! can crash the worker.

use crate::batching::BatchQueue;
use crate::shared_memory::AttachedRegions;
use dmqsm_proto::tensor::encode_array;
use dmqsm_proto::v1::worker_server::Worker;
use dmqsm_proto::v1::{
    AttachSharedMemoryRequest, AttachSharedMemoryResponse, DenoiseRequest, DenoiseResponse,
    DenoiseVjpRequest, DenoiseVjpResponse, Dtype, InfoRequest, Tensor, WorkerInfo,
};
use ndarray::Array4;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tonic::{Request, Response, Status};

/// Limits a request is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLimits {
    /// Patch edge P.
    pub patch_size: usize,
    /// Largest batch B accepted.
    pub max_batch: usize,
    /// Training timesteps T (t must lie in [0, T−1]).
    pub timesteps: usize,
    /// Content hash of the served model; a request naming another hash is refused.
    pub content_hash: String,
}

impl RequestLimits {
    /// Refuses a request pinned to another model.
    pub fn check_hash(&self, requested: &str) -> Result<(), Status> {
        if !requested.is_empty() && requested != self.content_hash {
            return Err(Status::invalid_argument(format!(
                "unknown model hash {requested}: this worker serves {}",
                self.content_hash
            )));
        }
        Ok(())
    }

    /// Checks a decoded `[B, P, P, P]` tensor (values and shape, from
    /// [`AttachedRegions::decode`], which checked dtype and byte length): shape, batch
    /// size and finiteness. `what` names the field in messages; `batch` (if given) is the
    /// B the tensor must have.
    pub fn check_patches(
        &self,
        decoded: Option<dmqsm_proto::tensor::Decoded>,
        what: &str,
        batch: Option<usize>,
    ) -> Result<Array4<f32>, Status> {
        let (values, shape) = decoded
            .ok_or_else(|| Status::invalid_argument(format!("the request has no {what}")))?;
        let p = self.patch_size;
        if shape.len() != 4 || shape[1] != p || shape[2] != p || shape[3] != p {
            return Err(Status::invalid_argument(format!(
                "{what} have shape {shape:?}; this worker's model needs [B, {p}, {p}, {p}]"
            )));
        }
        let b = shape[0];
        if b == 0 {
            return Err(Status::invalid_argument(format!(
                "{what}: the batch is empty"
            )));
        }
        if b > self.max_batch {
            return Err(Status::invalid_argument(format!(
                "{what}: batch of {b} patches exceeds this worker's max batch {}",
                self.max_batch
            )));
        }
        if let Some(expected) = batch
            && b != expected
        {
            return Err(Status::invalid_argument(format!(
                "{what} have batch {b}, the patches {expected}"
            )));
        }
        if !dmqsm_common::volume::all_finite(&values) {
            let bad = values.iter().filter(|v| !v.is_finite()).count();
            let first = values.iter().position(|v| !v.is_finite()).unwrap_or(0);
            let vox = p * p * p;
            return Err(Status::invalid_argument(format!(
                "{what} contain {bad} NaN or infinite value(s), the first in patch {} at \
                 voxel {}",
                first / vox,
                first % vox
            )));
        }
        Array4::from_shape_vec((b, p, p, p), values)
            .map_err(|e| Status::invalid_argument(format!("{what}: {e}")))
    }

    /// Checks one timestep per patch, each finite and in [0, T−1].
    pub fn check_timesteps(&self, t: &[f32], batch: usize) -> Result<(), Status> {
        if t.len() != batch {
            return Err(Status::invalid_argument(format!(
                "{} timesteps for {batch} patches",
                t.len()
            )));
        }
        let max = self.timesteps.saturating_sub(1) as f32;
        if let Some((i, v)) = t
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0 && **v <= max))
        {
            return Err(Status::invalid_argument(format!(
                "timestep {v} at position {i} is outside [0, {max}] (the model's schedule)"
            )));
        }
        Ok(())
    }
}

/// The element type to answer in (`UNSPECIFIED` means f32).
pub fn response_dtype(value: i32) -> Result<Dtype, Status> {
    match Dtype::try_from(value) {
        Ok(Dtype::Unspecified) => Ok(Dtype::F32),
        Ok(d) => Ok(d),
        Err(_) => Err(Status::invalid_argument(format!(
            "response_dtype {value} is not a known dtype (use F32, BF16 or F16)"
        ))),
    }
}

/// The `Worker` gRPC service.
#[derive(Debug, Clone)]
pub struct WorkerService {
    queue: Arc<BatchQueue>,
    info: WorkerInfo,
    limits: RequestLimits,
    draining: Arc<AtomicBool>,
    regions: Arc<AttachedRegions>,
}

impl WorkerService {
    /// A service answering `Info` with `info` and checking requests against `limits`.
    /// While `draining` is set it refuses new work with `UNAVAILABLE`.
    pub fn new(
        queue: Arc<BatchQueue>,
        info: WorkerInfo,
        limits: RequestLimits,
        draining: Arc<AtomicBool>,
    ) -> Self {
        Self {
            queue,
            info,
            limits,
            draining,
            regions: Arc::default(),
        }
    }

    /// Counts the tensor payload bytes of a request (the metrics' bytes received).
    fn count_received(&self, tensors: &[Option<&Tensor>]) {
        let bytes = |t: &&Tensor| match &t.shared {
            Some(s) => s.length as usize,
            None => t.data.len(),
        };
        let n: usize = tensors.iter().flatten().map(bytes).sum();
        (self.queue.stats().received_bytes).fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts the tensor payload bytes of an answer (the metrics' bytes sent) and puts
    /// them where the request asked (inline, or into its shared-memory region).
    fn answer(
        &self,
        tensor: Tensor,
        answer_to: Option<&dmqsm_proto::v1::SharedBytes>,
    ) -> Result<Option<Tensor>, Status> {
        (self.queue.stats().sent_bytes).fetch_add(tensor.data.len() as u64, Ordering::Relaxed);
        self.regions.place(tensor, answer_to).map(Some)
    }

    fn check_draining(&self) -> Result<(), Status> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable(
                "the worker is draining (shutting down)",
            ));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn denoise(
        &self,
        request: Request<DenoiseRequest>,
    ) -> Result<Response<DenoiseResponse>, Status> {
        self.check_draining()?;
        let req = request.into_inner();
        self.count_received(&[req.patches.as_ref()]);
        self.limits.check_hash(&req.model_hash)?;
        let dtype = response_dtype(req.response_dtype)?;
        let patches = self.regions.decode(req.patches.as_ref(), "patches")?;
        let patches = self.limits.check_patches(patches, "patches", None)?;
        self.limits
            .check_timesteps(&req.timesteps, patches.shape()[0])?;
        let eps = self.queue.eps(patches, req.timesteps).await?;
        Ok(Response::new(DenoiseResponse {
            eps: self.answer(encode_array(eps, dtype), req.answer_to.as_ref())?,
        }))
    }

    async fn denoise_vjp(
        &self,
        request: Request<DenoiseVjpRequest>,
    ) -> Result<Response<DenoiseVjpResponse>, Status> {
        self.check_draining()?;
        let req = request.into_inner();
        self.count_received(&[req.patches.as_ref(), req.cotangents.as_ref()]);
        self.limits.check_hash(&req.model_hash)?;
        let dtype = response_dtype(req.response_dtype)?;
        let patches = self.regions.decode(req.patches.as_ref(), "patches")?;
        let patches = self.limits.check_patches(patches, "patches", None)?;
        let b = patches.shape()[0];
        self.limits.check_timesteps(&req.timesteps, b)?;
        let cot = self.regions.decode(req.cotangents.as_ref(), "cotangents")?;
        let cot = self.limits.check_patches(cot, "cotangents", Some(b))?;
        let vjp = self.queue.vjp(patches, req.timesteps, cot).await?;
        Ok(Response::new(DenoiseVjpResponse {
            vjp: self.answer(encode_array(vjp, dtype), req.answer_to.as_ref())?,
        }))
    }

    async fn attach_shared_memory(
        &self,
        request: Request<AttachSharedMemoryRequest>,
    ) -> Result<Response<AttachSharedMemoryResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            match self.regions.attach(&req.region, &req.nonce) {
                Ok(()) => {
                    tracing::info!(region = %req.region, "attached a coordinator's shared memory");
                    AttachSharedMemoryResponse {
                        attached: true,
                        reason: String::new(),
                    }
                }
                Err(reason) => {
                    tracing::info!(region = %req.region, "shared memory not attached: {reason}");
                    AttachSharedMemoryResponse {
                        attached: false,
                        reason,
                    }
                }
            },
        ))
    }
}
