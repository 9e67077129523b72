//! [`AttachedRegions`]: the worker's side of the same-host data plane
//! ([`dmqsm_proto::shm`]): the shared-memory regions coordinators attached, from which
//! request tensors are read and into which answers are written.

use dmqsm_proto::shm::SharedRegion;
use dmqsm_proto::tensor::{Decoded, decode};
use dmqsm_proto::v1::{SharedBytes, Tensor};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tonic::Status;

/// Regions held at most; attaching one more drops the oldest (a coordinator attaches one
/// region per connection to this worker, so this only bounds restarts and reconnects).
pub const MAX_REGIONS: usize = 16;

/// The regions attached to this worker, newest last (see the module docs).
#[derive(Debug, Default)]
pub struct AttachedRegions {
    regions: Mutex<VecDeque<Arc<SharedRegion>>>,
}

impl AttachedRegions {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<SharedRegion>>> {
        self.regions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps region `name` and keeps it if its header holds `nonce`; otherwise says why
    /// not (another host's region, a missing file, a bad name).
    pub fn attach(&self, name: &str, nonce: &[u8]) -> Result<(), String> {
        let region = SharedRegion::open(name).map_err(|e| e.to_string())?;
        if !region.has_nonce(nonce).map_err(|e| e.to_string())? {
            return Err(format!(
                "region {name} does not hold the caller's nonce (not the caller's region)"
            ));
        }
        let mut regions = self.lock();
        regions.retain(|r| r.name() != name);
        if regions.len() >= MAX_REGIONS {
            regions.pop_front();
        }
        regions.push_back(Arc::new(region));
        Ok(())
    }

    fn get(&self, name: &str) -> Result<Arc<SharedRegion>, Status> {
        self.lock()
            .iter()
            .find(|r| r.name() == name)
            .cloned()
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "shared-memory region {name:?} is not attached to this worker"
                ))
            })
    }

    /// The f32 values and shape of `tensor`: decoded from its inline bytes, or copied
    /// once out of the region it points into (`data` must then be empty). `what` names
    /// the field in messages.
    pub fn decode(&self, tensor: Option<&Tensor>, what: &str) -> Result<Option<Decoded>, Status> {
        let Some(t) = tensor else {
            return Ok(None);
        };
        let invalid = |e: &dyn std::fmt::Display| Status::invalid_argument(format!("{what}: {e}"));
        let Some(shared) = &t.shared else {
            return decode(t).map(Some).map_err(|e| invalid(&e));
        };
        if !t.data.is_empty() {
            return Err(Status::invalid_argument(format!(
                "{what}: the tensor has both inline bytes and shared-memory bytes"
            )));
        }
        self.get(&shared.region)?
            .decode(t, shared)
            .map(Some)
            .map_err(|e| invalid(&e))
    }

    /// The answer `tensor`, its bytes written where `answer_to` says when given: the
    /// returned tensor then points there and carries no inline bytes.
    pub fn place(&self, tensor: Tensor, answer_to: Option<&SharedBytes>) -> Result<Tensor, Status> {
        let Some(to) = answer_to else {
            return Ok(tensor);
        };
        let n = tensor.data.len() as u64;
        if n > to.length {
            return Err(Status::invalid_argument(format!(
                "the answer has {n} bytes; answer_to gives room for {}",
                to.length
            )));
        }
        self.get(&to.region)?
            .write(to.offset, &tensor.data)
            .map_err(|e| Status::invalid_argument(format!("answer_to: {e}")))?;
        Ok(Tensor {
            shape: tensor.shape,
            dtype: tensor.dtype,
            data: Default::default(),
            shared: Some(SharedBytes {
                region: to.region.clone(),
                offset: to.offset,
                length: n,
            }),
        })
    }
}
