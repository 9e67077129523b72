//! [`RemoteScoreModel`]: a worker's score model as a [`ScoreModel`], for in-process
//! drivers (`dmqsm benchmark quality`) that evaluate the network through the gRPC
//! `Worker` service instead of linking libtorch.
//!
//! Bits: with f32 on the wire a worker's answer is bitwise the model's (a patch's ε
//! depends only on the patch, the model, the device type, the precision and the worker's
//! `eval_batch`; `dmqsm.v1.WorkerInfo`), so results equal those of the model in process.

use crate::error::{CoordinatorError, Result};
use crate::workers::{connect, fetch_info};
use dmqsm_common::diffusion::model::{ModelSpec, ScoreModel};
use dmqsm_proto::tensor::{decode, encode};
use dmqsm_proto::transport::AuthChannel;
use dmqsm_proto::v1::{self, worker_client::WorkerClient};
use ndarray::{Array4, ArrayView4};
use std::time::Duration;

/// A score model served by the worker at a URL (see the module docs). Calls block on a
/// runtime of its own, so it can be used from synchronous code.
pub struct RemoteScoreModel {
    runtime: tokio::runtime::Runtime,
    client: WorkerClient<AuthChannel>,
    spec: ModelSpec,
    url: String,
}

impl std::fmt::Debug for RemoteScoreModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteScoreModel")
            .field("url", &self.url)
            .field("model_id", &self.spec.model_id)
            .finish()
    }
}

impl RemoteScoreModel {
    /// Connects to the worker at `url` and asks what it serves.
    pub fn connect(url: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CoordinatorError::Config(format!("starting a runtime: {e}")))?;
        // The lazy channel spawns its connection task on the current runtime.
        let mut client = {
            let _inside = runtime.enter();
            connect(
                url,
                dmqsm_proto::DEFAULT_MAX_MESSAGE_BYTES,
                None,
                &dmqsm_proto::transport::ClientTls::default(),
            )?
        };
        let info = runtime.block_on(fetch_info(&mut client, url, Duration::from_secs(30)))?;
        let model = info.model.unwrap_or_default();
        let spec = ModelSpec::try_from(&model).map_err(|e| CoordinatorError::Worker {
            worker: info.worker_id.clone(),
            address: url.to_string(),
            cause: e.to_string(),
        })?;
        Ok(Self {
            runtime,
            client,
            spec,
            url: url.to_string(),
        })
    }

    fn failed(&self, cause: String) -> dmqsm_common::Error {
        dmqsm_common::Error::Model(format!("worker {}: {cause}", self.url))
    }

    fn unpack(
        &self,
        t: Option<v1::Tensor>,
        shape: &[usize],
        what: &str,
    ) -> dmqsm_common::Result<Array4<f32>> {
        let t = t.ok_or_else(|| self.failed(format!("the reply has no {what}")))?;
        let (values, got) = decode(&t).map_err(|e| self.failed(format!("{what}: {e}")))?;
        if got != shape {
            return Err(self.failed(format!("{what} has shape {got:?}, expected {shape:?}")));
        }
        Array4::from_shape_vec([shape[0], shape[1], shape[2], shape[3]], values)
            .map_err(|e| self.failed(format!("{what}: {e}")))
    }
}

fn contiguous(x: ArrayView4<'_, f32>) -> Vec<f32> {
    x.as_standard_layout().iter().copied().collect()
}

impl ScoreModel for RemoteScoreModel {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn eps(&self, patches: ArrayView4<'_, f32>, t: &[f32]) -> dmqsm_common::Result<Array4<f32>> {
        let shape = patches.shape().to_vec();
        let request = v1::DenoiseRequest {
            model_hash: self.spec.content_hash.clone(),
            patches: Some(encode(&contiguous(patches), &shape, v1::Dtype::F32)),
            timesteps: t.to_vec(),
            response_dtype: v1::Dtype::F32 as i32,
            answer_to: None,
        };
        let mut client = self.client.clone();
        let reply = self
            .runtime
            .block_on(client.denoise(request))
            .map_err(|s| self.failed(format!("Denoise: {}", s.message())))?
            .into_inner();
        self.unpack(reply.eps, &shape, "eps")
    }

    fn vjp(
        &self,
        patches: ArrayView4<'_, f32>,
        t: &[f32],
        cotangent: ArrayView4<'_, f32>,
    ) -> dmqsm_common::Result<Array4<f32>> {
        let shape = patches.shape().to_vec();
        let request = v1::DenoiseVjpRequest {
            model_hash: self.spec.content_hash.clone(),
            patches: Some(encode(&contiguous(patches), &shape, v1::Dtype::F32)),
            timesteps: t.to_vec(),
            cotangents: Some(encode(&contiguous(cotangent), &shape, v1::Dtype::F32)),
            response_dtype: v1::Dtype::F32 as i32,
            answer_to: None,
        };
        let mut client = self.client.clone();
        let reply = self
            .runtime
            .block_on(client.denoise_vjp(request))
            .map_err(|s| self.failed(format!("DenoiseVjp: {}", s.message())))?
            .into_inner();
        self.unpack(reply.vjp, &shape, "vjp")
    }
}
