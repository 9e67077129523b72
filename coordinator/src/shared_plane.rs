//! [`SharedPlane`]: the coordinator's side of the same-host data plane
//! ([`dmqsm_proto::shm`]): one shared-memory region per worker, cut into slots, one slot
//! per batch in flight.
//!
//! A slot holds a batch's tensors one after the other (patches, then cotangents in a VJP
//! round) and then room for the answer; [`SlotLease::stage`] copies a request's tensors in and
//! [`SlotLease::collect`] copies the answer out, so what reaches the sampler is exactly
//! what would have come over the socket. A slot whose worker may still write into it
//! (its call timed out, failed in transit or was abandoned) is retired, never reused:
//! a late answer cannot land in another batch. A plane whose worker no longer knows its
//! region (it restarted) is marked broken, and that worker's batches travel inline.

use dmqsm_common::content_hash::{Digest, Hasher, sha256_hex};
use dmqsm_proto::shm::{HEADER_BYTES, NONCE_LEN, SharedMemoryError, SharedRegion};
use dmqsm_proto::transport::AuthChannel;
use dmqsm_proto::v1;
use dmqsm_proto::v1::worker_client::WorkerClient;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Regions made by this process so far (part of each region's unique name).
static REGIONS_MADE: AtomicU64 = AtomicU64::new(0);

/// One worker's shared-memory region and its free slots (see the module docs).
#[derive(Debug)]
pub struct SharedPlane {
    region: SharedRegion,
    slot_bytes: u64,
    free: Mutex<Vec<usize>>,
    broken: AtomicBool,
}

impl SharedPlane {
    /// Makes a region of `slots` slots of `slot_bytes` for worker `worker` and asks the
    /// worker to attach it (see [`dmqsm_proto::shm`]). `None`, with the reason logged, if
    /// the region cannot be made or the worker does not attach it (another host, an older
    /// worker): its batches then travel inline. The region's name is unlinked either way.
    pub async fn attach(
        client: &mut WorkerClient<AuthChannel>,
        worker: &str,
        slots: usize,
        slot_bytes: u64,
        timeout: Duration,
    ) -> Option<Arc<Self>> {
        let n = REGIONS_MADE.fetch_add(1, Ordering::Relaxed);
        let nonce = nonce(worker, n);
        let name = format!(
            "{}c{}-{n}-{}",
            dmqsm_proto::shm::REGION_PREFIX,
            std::process::id(),
            &sha256_hex(&nonce)[..12]
        );
        let size = (slot_bytes as usize)
            .checked_mul(slots)
            .and_then(|b| b.checked_add(HEADER_BYTES));
        let region = match size.map(|s| SharedRegion::create(&name, s, &nonce)) {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                tracing::info!(%worker, "shared memory unavailable, batches travel inline: {e}");
                return None;
            }
            None => {
                tracing::warn!(%worker, slots, slot_bytes, "shared-memory region size overflows");
                return None;
            }
        };
        let request = v1::AttachSharedMemoryRequest {
            region: name.clone(),
            nonce: nonce.to_vec().into(),
        };
        let answer = tokio::time::timeout(timeout, client.attach_shared_memory(request)).await;
        if let Err(e) = region.unlink() {
            tracing::warn!(%worker, "could not unlink shared-memory region {name}: {e}");
        }
        match answer {
            Ok(Ok(r)) if r.get_ref().attached => {
                tracing::info!(%worker, region = %name, slots, slot_bytes, "worker attached shared memory");
                Some(Arc::new(Self {
                    region,
                    slot_bytes,
                    free: Mutex::new((0..slots).rev().collect()),
                    broken: AtomicBool::new(false),
                }))
            }
            Ok(Ok(r)) => {
                tracing::info!(%worker, "worker did not attach shared memory ({}); batches travel inline", r.get_ref().reason);
                None
            }
            Ok(Err(s)) => {
                tracing::info!(%worker, "worker did not attach shared memory ({:?}: {}); batches travel inline", s.code(), s.message());
                None
            }
            Err(_) => {
                tracing::info!(%worker, "worker did not answer AttachSharedMemory in time; batches travel inline");
                None
            }
        }
    }

    /// A free slot, unless none is left or the plane is broken.
    pub fn lease(self: &Arc<Self>) -> Option<SlotLease> {
        if self.broken.load(Ordering::Relaxed) {
            return None;
        }
        let slot = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
        Some(SlotLease {
            plane: self.clone(),
            slot,
            retired: false,
        })
    }

    /// Stops using the plane: the worker lost the region (it restarted).
    pub fn mark_broken(&self) {
        self.broken.store(true, Ordering::Relaxed);
    }
}

/// A fresh 32-byte nonce: SHA-256 of the worker, the process, a counter and the time.
fn nonce(worker: &str, n: u64) -> [u8; NONCE_LEN] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = Hasher::new();
    h.update(worker.as_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(n.to_le_bytes());
    h.update(nanos.to_le_bytes());
    h.finalize().into()
}

/// A request's tensors placed in a slot by [`SlotLease::stage`]: they point into it, and
/// `answer_to` is where the worker is to write its answer.
#[derive(Debug, Clone)]
pub struct StagedTensors {
    /// The patches, pointing into the slot.
    pub patches: v1::Tensor,
    /// The cotangents of a VJP round, pointing into the slot.
    pub cotangents: Option<v1::Tensor>,
    /// The rest of the slot, for the answer.
    pub answer_to: v1::SharedBytes,
}

/// One slot of a [`SharedPlane`], held for one call; back in the pool when dropped unless
/// [`SlotLease::retire`]d.
#[derive(Debug)]
pub struct SlotLease {
    plane: Arc<SharedPlane>,
    slot: usize,
    retired: bool,
}

impl SlotLease {
    fn base(&self) -> u64 {
        HEADER_BYTES as u64 + self.slot as u64 * self.plane.slot_bytes
    }

    /// The plane this slot belongs to.
    pub fn plane(&self) -> &Arc<SharedPlane> {
        &self.plane
    }

    /// The tensors of a request (`patches`, and `cotangents` in a VJP round) with their
    /// bytes copied into the slot, and the rest of the slot as the answer's place; `None`
    /// if they and an f32 answer of the patches' shape do not fit in one slot (the batch
    /// then travels inline).
    pub fn stage(
        &self,
        patches: &v1::Tensor,
        cotangents: Option<&v1::Tensor>,
    ) -> Result<Option<StagedTensors>, SharedMemoryError> {
        let answer_bytes = patches
            .shape
            .iter()
            .try_fold(4u64, |acc, &s| acc.checked_mul(s as u64));
        let inputs = patches.data.len() as u64 + cotangents.map_or(0, |c| c.data.len() as u64);
        let Some(need) = answer_bytes.and_then(|a| a.checked_add(inputs)) else {
            return Ok(None);
        };
        if need > self.plane.slot_bytes {
            return Ok(None);
        }
        let region = self.plane.region.name().to_string();
        let mut at = self.base();
        let mut place = |t: &v1::Tensor| -> Result<v1::Tensor, SharedMemoryError> {
            self.plane.region.write(at, &t.data)?;
            let shared = v1::SharedBytes {
                region: region.clone(),
                offset: at,
                length: t.data.len() as u64,
            };
            at += t.data.len() as u64;
            Ok(v1::Tensor {
                shape: t.shape.clone(),
                dtype: t.dtype,
                data: Default::default(),
                shared: Some(shared),
            })
        };
        let patches = place(patches)?;
        let cotangents = cotangents.map(&mut place).transpose()?;
        Ok(Some(StagedTensors {
            patches,
            cotangents,
            answer_to: v1::SharedBytes {
                region,
                offset: at,
                length: self.base() + self.plane.slot_bytes - at,
            },
        }))
    }

    /// The values and shape of an answer tensor that points into this slot, copied out
    /// once (see [`SharedRegion::decode`]); it must lie inside the slot and carry no
    /// inline bytes. Errors name what was wrong with the answer.
    pub fn decode(&self, t: &v1::Tensor) -> Result<dmqsm_proto::tensor::Decoded, String> {
        let shared = t
            .shared
            .as_ref()
            .ok_or("the answer does not point into shared memory")?;
        let (start, end) = (self.base(), self.base() + self.plane.slot_bytes);
        let inside = shared.region == self.plane.region.name()
            && shared.offset >= start
            && shared
                .offset
                .checked_add(shared.length)
                .is_some_and(|e| e <= end);
        if !inside || !t.data.is_empty() {
            return Err(format!(
                "answer points at {}+{} in region {:?}, outside the slot it was given",
                shared.offset, shared.length, shared.region
            ));
        }
        self.plane
            .region
            .decode(t, shared)
            .map_err(|e| e.to_string())
    }

    /// Never hands the slot out again (its worker may still write into it).
    pub fn retire(mut self) {
        self.retired = true;
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        if !self.retired {
            self.plane
                .free
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(self.slot);
        }
    }
}
