//! The same-host data plane: patch tensors through shared memory instead of the socket.
//!
//! When a worker runs on the coordinator's host (the 8-GPU node that runs `dmqsm serve`
//! and one `dmqsm-worker` per GPU), every batch otherwise crosses loopback TCP twice
//! (1.7 MB of 48³ f32 patches out, as much back): HTTP/2 framing, a copy into the kernel
//! and one out of it on each side, all on the coordinator's CPUs. Like the system
//! shared-memory extension of Triton Inference Server, gRPC stays the control plane and
//! the bytes move through a [`SharedRegion`] the coordinator creates for each worker:
//!
//! 1. The coordinator creates `/dev/shm/dmqsm-…` (mode 0600, `O_EXCL`), writes a fresh
//!    nonce into its first [`NONCE_LEN`] bytes and calls the worker's
//!    `AttachSharedMemory` with the name and the nonce. The worker maps the region and
//!    attaches only if it reads the same nonce there: proof that it sees the very region
//!    the coordinator made (the same host, the same `/dev/shm`). The coordinator then
//!    unlinks the file, so nothing is left behind even after `kill -9`; both mappings
//!    stay valid.
//! 2. A request names where its tensors' bytes lie (`Tensor.shared`, with `data` empty)
//!    and where the answer goes (`answer_to`); the answer's tensor points there.
//! 3. Every other check stays as it is: the worker checks shape, dtype, byte length and
//!    finiteness of what it reads; the coordinator checks the answer as it checks an
//!    inline one. The bytes are the same either way, so results are bitwise identical.
//!
//! A worker that cannot attach (another host, no `/dev/shm`, an older worker) answers
//! `attached: false` or `UNIMPLEMENTED`, and its batches travel inline as before.
//!
//! Memory model: a region is shared with another process that may write it at any time,
//! so it is only ever accessed through raw-pointer copies ([`SharedRegion::read`],
//! [`SharedRegion::read_f32`], [`SharedRegion::write`]), never through Rust references
//! into the mapping.

use crate::tensor::{Decoded, TensorError, layout, values};
use crate::v1::{Dtype, SharedBytes, Tensor};
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// Directory of the regions: the POSIX shared-memory tmpfs.
pub const REGION_DIR: &str = "/dev/shm";
/// Prefix of every region name; the worker opens nothing else.
pub const REGION_PREFIX: &str = "dmqsm-";
/// Bytes of the nonce at the start of a region.
pub const NONCE_LEN: usize = 32;
/// Bytes before the first slot (the nonce, padded to a page).
pub const HEADER_BYTES: usize = 4096;

/// Errors of the shared-memory data plane.
#[derive(Debug, thiserror::Error)]
pub enum SharedMemoryError {
    /// A name that is not `dmqsm-` followed by 1–100 of `[A-Za-z0-9_-]`.
    #[error(
        "shared-memory region name {0:?} is not a dmqsm region ({REGION_PREFIX} then 1–100 of A–Z, a–z, 0–9, _ and -)"
    )]
    BadName(String),
    /// The file could not be created, opened, sized or mapped.
    #[error("shared-memory region {name}: {source}")]
    Io {
        /// Region name.
        name: String,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// A byte range outside the region (or overflowing).
    #[error("shared-memory region {name}: bytes {offset}+{length} lie outside its {size} bytes")]
    OutOfBounds {
        /// Region name.
        name: String,
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        length: u64,
        /// Size of the region in bytes.
        size: usize,
    },
    /// A tensor whose dtype or shape does not fit the bytes it points at.
    #[error("shared-memory tensor: {0}")]
    Tensor(#[from] TensorError),
    /// A tensor that points into another region than the one it is read from.
    #[error("tensor points into shared-memory region {found:?}, read from {region:?}")]
    WrongRegion {
        /// The region read from.
        region: String,
        /// The region the tensor names.
        found: String,
    },
    /// A region too small for its header.
    #[error(
        "shared-memory region {name} has {size} bytes, fewer than its {HEADER_BYTES}-byte header"
    )]
    TooSmall {
        /// Region name.
        name: String,
        /// Size of the region in bytes.
        size: usize,
    },
}

type Result<T> = std::result::Result<T, SharedMemoryError>;

/// Checks a region name (see [`SharedMemoryError::BadName`]); the name never carries a
/// path, so a request can make a worker open nothing outside [`REGION_DIR`].
pub fn check_name(name: &str) -> Result<()> {
    let rest = name
        .strip_prefix(REGION_PREFIX)
        .ok_or_else(|| SharedMemoryError::BadName(name.to_string()))?;
    let ok = (1..=100).contains(&rest.len())
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SharedMemoryError::BadName(name.to_string()))
    }
}

/// Sizes `file` to `size` bytes and reserves its pages: on a full tmpfs (a container's
/// small `/dev/shm`, say) a write into a sparse region would raise SIGBUS later, where
/// `posix_fallocate` fails now with `ENOSPC`, and the batches then travel inline.
fn reserve(file: &File, size: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(size).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: plain system call on an open descriptor this function borrows.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// One mapped shared-memory region (see the module docs).
#[derive(Debug)]
pub struct SharedRegion {
    name: String,
    map: memmap2::MmapRaw,
}

impl SharedRegion {
    fn path(name: &str) -> PathBuf {
        PathBuf::from(REGION_DIR).join(name)
    }

    fn io(name: &str) -> impl FnOnce(std::io::Error) -> SharedMemoryError + '_ {
        move |source| SharedMemoryError::Io {
            name: name.to_string(),
            source,
        }
    }

    fn map(name: &str, file: &File) -> Result<Self> {
        let map = memmap2::MmapRaw::map_raw(file).map_err(Self::io(name))?;
        if map.len() < HEADER_BYTES {
            return Err(SharedMemoryError::TooSmall {
                name: name.to_string(),
                size: map.len(),
            });
        }
        Ok(Self {
            name: name.to_string(),
            map,
        })
    }

    /// Creates region `name` of `size` bytes (at least the header), readable and
    /// writable by this user only, and writes `nonce` into its header. Fails if the name
    /// exists.
    pub fn create(name: &str, size: usize, nonce: &[u8; NONCE_LEN]) -> Result<Self> {
        check_name(name)?;
        let size = size.max(HEADER_BYTES);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(Self::path(name))
            .map_err(Self::io(name))?;
        let region = reserve(&file, size)
            .map_err(Self::io(name))
            .and_then(|()| Self::map(name, &file));
        match region {
            Ok(r) => {
                r.write(0, nonce)?;
                Ok(r)
            }
            Err(e) => {
                let _ = std::fs::remove_file(Self::path(name));
                Err(e)
            }
        }
    }

    /// Maps the existing region `name`.
    pub fn open(name: &str) -> Result<Self> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(Self::path(name))
            .map_err(Self::io(name))?;
        Self::map(name, &file)
    }

    /// Removes the region's name from [`REGION_DIR`]; the mappings stay valid, and the
    /// memory goes back to the system when the last one is dropped.
    pub fn unlink(&self) -> Result<()> {
        std::fs::remove_file(Self::path(&self.name)).map_err(Self::io(&self.name))
    }

    /// The region's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.map.len()
    }

    /// Whether the header holds `nonce`.
    pub fn has_nonce(&self, nonce: &[u8]) -> Result<bool> {
        Ok(nonce.len() == NONCE_LEN && self.read(0, NONCE_LEN as u64)? == nonce)
    }

    fn range(&self, offset: u64, length: u64) -> Result<(usize, usize)> {
        let out = || SharedMemoryError::OutOfBounds {
            name: self.name.clone(),
            offset,
            length,
            size: self.map.len(),
        };
        let end = offset.checked_add(length).ok_or_else(out)?;
        if end > self.map.len() as u64 {
            return Err(out());
        }
        Ok((offset as usize, length as usize))
    }

    /// A copy of bytes `offset .. offset + length`.
    pub fn read(&self, offset: u64, length: u64) -> Result<Bytes> {
        let (offset, length) = self.range(offset, length)?;
        let mut out = Vec::<u8>::with_capacity(length);
        // SAFETY: `range` keeps the source inside the mapping, the destination has
        // `length` bytes of capacity, and the two cannot overlap (one is private heap).
        // Concurrent writers elsewhere can only change which bytes are copied.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(offset), out.as_mut_ptr(), length);
            out.set_len(length);
        }
        Ok(Bytes::from(out))
    }

    /// A copy of bytes `offset .. offset + length` as little-endian f32 values, copied
    /// once, straight into the values. Errors if `length` is not a multiple of 4.
    pub fn read_f32(&self, offset: u64, length: u64) -> Result<Vec<f32>> {
        let (offset, length) = self.range(offset, length)?;
        if length % 4 != 0 {
            return Err(SharedMemoryError::Tensor(TensorError::ByteLength {
                shape: Vec::new(),
                dtype: "F32",
                expected: length / 4 * 4,
                got: length,
            }));
        }
        let mut out = Vec::<f32>::with_capacity(length / 4);
        // SAFETY: `range` keeps the source inside the mapping, the destination has
        // `length` bytes of capacity (length / 4 f32s, any bit pattern is a valid f32),
        // and the two cannot overlap (one is private heap). Concurrent writers elsewhere
        // can only change which bytes are copied.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset),
                out.as_mut_ptr().cast::<u8>(),
                length,
            );
            out.set_len(length / 4);
        }
        if cfg!(target_endian = "big") {
            for v in &mut out {
                *v = f32::from_bits(u32::from_le(v.to_bits()));
            }
        }
        Ok(out)
    }

    /// Decodes `tensor`, whose bytes lie at `at` in this region, into f32 values and its
    /// shape, with the checks of [`crate::tensor::decode`]: f32 data is copied once, the
    /// half-precision types through a copy of their bytes.
    pub fn decode(&self, tensor: &Tensor, at: &SharedBytes) -> Result<Decoded> {
        if at.region != self.name {
            return Err(SharedMemoryError::WrongRegion {
                region: self.name.clone(),
                found: at.region.clone(),
            });
        }
        let bytes = usize::try_from(at.length).map_err(|_| self.out_of_bounds(at))?;
        let (dtype, shape) = layout(tensor, bytes)?;
        let v = match dtype {
            Dtype::F32 | Dtype::Unspecified => self.read_f32(at.offset, at.length)?,
            Dtype::Bf16 | Dtype::F16 => values(dtype, &self.read(at.offset, at.length)?),
        };
        Ok((v, shape))
    }

    fn out_of_bounds(&self, at: &SharedBytes) -> SharedMemoryError {
        SharedMemoryError::OutOfBounds {
            name: self.name.clone(),
            offset: at.offset,
            length: at.length,
            size: self.map.len(),
        }
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let (offset, length) = self.range(offset, data.len() as u64)?;
        // SAFETY: `range` keeps the destination inside the mapping; `data` is private
        // memory, so the two cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.as_mut_ptr().add(offset), length);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique(tag: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{REGION_PREFIX}test-{tag}-{}-{nanos}", std::process::id())
    }

    #[test]
    fn names_are_checked_before_any_file_is_touched() {
        for bad in [
            "",
            "dmqsm-",
            "dmqsm-../etc/passwd",
            "/dev/shm/dmqsm-a",
            "other-a",
            "dmqsm-a b",
            "dmqsm-a/b",
            &format!("dmqsm-{}", "a".repeat(101)),
        ] {
            let e = SharedRegion::open(bad).unwrap_err();
            assert!(matches!(e, SharedMemoryError::BadName(_)), "{bad}: {e}");
        }
        assert!(check_name("dmqsm-w1_2-abc").is_ok());
    }

    /// Bytes written through one mapping are read back through another (what the two
    /// processes do), the nonce proves the region, out-of-range access is an error, and
    /// after unlinking the name is gone while both mappings keep working.
    #[test]
    fn two_mappings_share_bytes_and_survive_unlink() {
        let name = unique("share");
        let nonce = [7u8; NONCE_LEN];
        let a = SharedRegion::create(&name, HEADER_BYTES + 1000, &nonce).unwrap();
        assert!(
            SharedRegion::create(&name, 10_000, &nonce).is_err(),
            "O_EXCL"
        );
        let b = SharedRegion::open(&name).unwrap();
        assert!(b.has_nonce(&nonce).unwrap());
        assert!(!b.has_nonce(&[8u8; NONCE_LEN]).unwrap());
        assert!(!b.has_nonce(&[7u8; 3]).unwrap());
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        a.write(HEADER_BYTES as u64, &data).unwrap();
        assert_eq!(b.read(HEADER_BYTES as u64, 1000).unwrap(), data);
        let size = a.size() as u64;
        assert!(matches!(
            b.read(size - 10, 11),
            Err(SharedMemoryError::OutOfBounds { .. })
        ));
        assert!(b.read(u64::MAX, 2).is_err(), "overflow is out of range");
        assert!(a.write(size, &[1]).is_err());
        a.unlink().unwrap();
        assert!(SharedRegion::open(&name).is_err(), "the name is gone");
        b.write(HEADER_BYTES as u64, &[42]).unwrap();
        assert_eq!(a.read(HEADER_BYTES as u64, 1).unwrap()[..], [42]);
    }

    /// A region larger than the tmpfs can hold is refused when it is made (no SIGBUS
    /// later), and no file is left behind.
    #[test]
    fn a_region_the_tmpfs_cannot_hold_is_refused_up_front() {
        let name = unique("huge");
        let e = SharedRegion::create(&name, 1 << 50, &[1u8; NONCE_LEN]).unwrap_err();
        assert!(matches!(e, SharedMemoryError::Io { .. }), "{e}");
        assert!(SharedRegion::open(&name).is_err(), "nothing left behind");
    }

    #[test]
    fn a_missing_region_is_a_named_io_error() {
        let e = SharedRegion::open(&unique("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dmqsm-test-missing"), "{e}");
    }

    /// A tensor read out of a region decodes to the values `tensor::decode` gives for the
    /// same bytes inline, for f32 (one copy) and bf16, at an odd offset; a shape that does
    /// not fit the bytes, a length that is no whole number of f32s, another region's name
    /// and bytes past the end are named errors.
    #[test]
    fn tensors_decode_from_a_region_as_they_decode_inline() {
        use crate::tensor::{decode, encode};
        let name = unique("decode");
        let r = SharedRegion::create(&name, HEADER_BYTES + 4096, &[3u8; NONCE_LEN]).unwrap();
        let v: Vec<f32> = (0..60).map(|i| i as f32 * 0.37 - 9.0).collect();
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let inline = encode(&v, &[3, 4, 5], dtype);
            let at = SharedBytes {
                region: name.clone(),
                offset: HEADER_BYTES as u64 + 1,
                length: inline.data.len() as u64,
            };
            r.write(at.offset, &inline.data).unwrap();
            let meta = Tensor {
                data: Bytes::new(),
                shared: Some(at.clone()),
                ..inline.clone()
            };
            let (got, shape) = r.decode(&meta, &at).unwrap();
            let (want, want_shape) = decode(&inline).unwrap();
            assert_eq!(shape, want_shape);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{dtype:?}");
            let wrong_shape = Tensor {
                shape: vec![3, 4, 6],
                ..meta.clone()
            };
            assert!(matches!(
                r.decode(&wrong_shape, &at),
                Err(SharedMemoryError::Tensor(TensorError::ByteLength { .. }))
            ));
            let elsewhere = SharedBytes {
                region: format!("{name}-other"),
                ..at.clone()
            };
            assert!(matches!(
                r.decode(&meta, &elsewhere),
                Err(SharedMemoryError::WrongRegion { .. })
            ));
            let past = SharedBytes {
                offset: r.size() as u64 - 8,
                ..at.clone()
            };
            assert!(matches!(
                r.decode(&meta, &past),
                Err(SharedMemoryError::OutOfBounds { .. })
            ));
        }
        assert!(matches!(
            r.read_f32(HEADER_BYTES as u64, 7),
            Err(SharedMemoryError::Tensor(_))
        ));
        r.unlink().unwrap();
    }
}
