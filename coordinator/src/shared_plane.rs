//! [`SharedPlane`]: the coordinator's side of the same-host data plane
//! ([`dmqsm_proto::shm`]): one shared-memory region per worker, cut into slots, one slot
//! per batch in flight.
//!
//! A slot holds a batch's tensors one after the other (patches, then cotangents in a VJP
//! round) and then room for the answer. A batch cut from x_t is written straight into
//! its places ([`SlotLease::layout`], [`SlotLease::write`]); encoded tensors are copied in
//! ([`SlotLease::stage`]); [`SlotLease::decode`] copies the answer out. What reaches the
//! sampler is exactly what would have come over the socket. A slot whose worker may still
//! write into it (its call timed out, failed in transit or was abandoned) is retired,
//! never reused: a late answer cannot land in another batch. A plane whose worker no
//! longer knows its region (it restarted) is marked broken, and that worker's batches
//! travel inline.

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

/// Where a batch's tensors lie in a slot ([`SlotLease::layout`]): each input tensor's
/// place, then the answer's.
#[derive(Debug, Clone)]
pub struct SlotLayout {
    /// The input tensors' places, in the order asked for.
    pub inputs: Vec<v1::SharedBytes>,
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

    /// Places input tensors of `inputs` bytes one after the other from the slot's start,
    /// and the answer after them (the rest of the slot, at least `answer` bytes); `None`
    /// if they do not fit.
    pub fn layout(&self, inputs: &[u64], answer: u64) -> Option<SlotLayout> {
        let need = inputs
            .iter()
            .try_fold(answer, |acc, &b| acc.checked_add(b))?;
        if need > self.plane.slot_bytes {
            return None;
        }
        let region = self.plane.region.name().to_string();
        let mut at = self.base();
        let inputs = inputs
            .iter()
            .map(|&length| {
                let place = v1::SharedBytes {
                    region: region.clone(),
                    offset: at,
                    length,
                };
                at += length;
                place
            })
            .collect();
        Some(SlotLayout {
            inputs,
            answer_to: v1::SharedBytes {
                region,
                offset: at,
                length: self.base() + self.plane.slot_bytes - at,
            },
        })
    }

    /// Writes `data` at byte `offset` of `place`, one of this slot's places from
    /// [`SlotLease::layout`]; errors if the bytes would leave `place` or the slot.
    pub fn write(
        &self,
        place: &v1::SharedBytes,
        offset: u64,
        data: &[u8],
    ) -> Result<(), SharedMemoryError> {
        let (start, end) = (self.base(), self.base() + self.plane.slot_bytes);
        let inside = offset
            .checked_add(data.len() as u64)
            .is_some_and(|e| e <= place.length)
            && place.offset >= start
            && place.offset.saturating_add(place.length) <= end;
        if !inside {
            return Err(SharedMemoryError::OutOfBounds {
                name: self.plane.region.name().to_string(),
                offset: place.offset.saturating_add(offset),
                length: data.len() as u64,
                size: self.plane.region.size(),
            });
        }
        self.plane.region.write(place.offset + offset, data)
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
        let Some(answer) = patches
            .shape
            .iter()
            .try_fold(4u64, |acc, &s| acc.checked_mul(s as u64))
        else {
            return Ok(None);
        };
        let tensors: Vec<&v1::Tensor> = std::iter::once(patches).chain(cotangents).collect();
        let sizes: Vec<u64> = tensors.iter().map(|t| t.data.len() as u64).collect();
        let Some(layout) = self.layout(&sizes, answer) else {
            return Ok(None);
        };
        let mut placed = Vec::with_capacity(tensors.len());
        for (t, place) in tensors.iter().zip(&layout.inputs) {
            self.write(place, 0, &t.data)?;
            placed.push(v1::Tensor {
                shape: t.shape.clone(),
                dtype: t.dtype,
                data: Default::default(),
                shared: Some(place.clone()),
            });
        }
        let mut placed = placed.into_iter();
        Ok(placed.next().map(|patches| StagedTensors {
            patches,
            cotangents: placed.next(),
            answer_to: layout.answer_to,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A plane of `slots` slots of `slot_bytes` over a fresh, already unlinked region.
    fn plane(slots: usize, slot_bytes: u64) -> Arc<SharedPlane> {
        let n = REGIONS_MADE.fetch_add(1, Ordering::Relaxed);
        let name = format!("dmqsm-test-plane-{}-{n}", std::process::id());
        let size = HEADER_BYTES + slots * slot_bytes as usize;
        let region = SharedRegion::create(&name, size, &nonce("test", n)).unwrap();
        region.unlink().unwrap();
        Arc::new(SharedPlane {
            region,
            slot_bytes,
            free: Mutex::new((0..slots).rev().collect()),
            broken: AtomicBool::new(false),
        })
    }

    #[test]
    fn layout_places_inputs_then_the_answer_inside_the_slot_and_writes_stay_in_place() {
        let plane = plane(2, 256);
        let first = plane.lease().unwrap();
        let lease = plane.lease().unwrap();
        let base = lease.base();
        assert_eq!(base, HEADER_BYTES as u64 + 256, "the second slot");
        let layout = lease.layout(&[64, 32], 100).unwrap();
        let offsets: Vec<(u64, u64)> = layout.inputs.iter().map(|p| (p.offset, p.length)).collect();
        assert_eq!(offsets, vec![(base, 64), (base + 64, 32)]);
        assert_eq!(
            (layout.answer_to.offset, layout.answer_to.length),
            (base + 96, 160)
        );
        // Too big for one slot: the batch travels inline.
        assert!(lease.layout(&[64, 32], 161).is_none());
        assert!(lease.layout(&[u64::MAX, 2], 0).is_none());

        // A write lands where it was asked, and nowhere else.
        let place = &layout.inputs[1];
        lease.write(place, 8, &[7; 24]).unwrap();
        let bytes = plane.region.read(base + 64, 32).unwrap();
        assert_eq!(&bytes[..8], &[0; 8]);
        assert_eq!(&bytes[8..], &[7; 24]);
        assert_eq!(plane.region.read(base + 60, 4).unwrap().as_ref(), &[0; 4]);
        // Past the end of its place, or a place outside the slot: refused, nothing written.
        assert!(lease.write(place, 9, &[1; 24]).is_err());
        assert!(lease.write(place, u64::MAX, &[1]).is_err());
        let elsewhere = first.layout(&[16], 0).unwrap().inputs[0].clone();
        assert!(lease.write(&elsewhere, 0, &[1; 4]).is_err());
        assert_eq!(
            plane.region.read(elsewhere.offset, 16).unwrap().as_ref(),
            &[0; 16]
        );
        assert_eq!(plane.region.read(base + 96, 1).unwrap().as_ref(), &[0]);
    }
}
