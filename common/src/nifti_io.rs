//! NIfTI-1 input and output of [`Volume`]s (`.nii` and `.nii.gz`, files or bytes).
//!
//! Reading (header parsing and datatype conversion by the `nifti` crate):
//! - gzip is detected from the content (magic bytes 1f 8b), not the name;
//! - integer (u8…u64, i8…i64) and real float (f32, f64) datatypes are accepted and
//!   converted to f32 after applying `scl_slope`/`scl_inter` (a slope of 0 or a
//!   non-finite slope means "no scaling", as in the NIfTI standard and nibabel);
//! - the image must be a 3-D volume: `dim[0]` ≥ 3 with at least 2 voxels along each of
//!   the three spatial axes (a 1-D or 2-D image, or a 3-D file holding a single slice,
//!   is refused); 4D+ images are accepted only when every axis beyond the third has
//!   length 1;
//! - the voxel data is decompressed with a hard cap at the size the header declares
//!   (shape × bytes per voxel): bytes beyond it are never decompressed, and buffers grow
//!   with the data that actually arrives, never to a size the header merely claims;
//! - [`read_nifti_header_bytes`] / [`read_nifti_header`] parse only the header (for a
//!   `.nii.gz`, only the first 348 decompressed bytes), so callers can size a volume
//!   before decoding it;
//! - geometry: the sform if `sform_code` > 0, else the qform if `qform_code` > 0, else a
//!   diagonal of `pixdim` (NIfTI "method 1"); voxel sizes are the column norms of the
//!   chosen affine and must be finite and positive;
//! - anything unusable (not NIfTI, NIfTI-2, a header-only `.hdr`, zero-length axes,
//!   truncated header or data, complex/RGB data, bad voxel sizes, corrupt gzip) is an
//!   [`Error::Nifti`] naming the file (or `<bytes>`) and the reason.
//!
//! Writing: a single-file NIfTI-1 (`n+1`), little-endian f32 data at offset 352, both
//! sform and qform set from the volume's affine with code 1 (scanner anatomical), the
//! qform being the nearest rotation (polar decomposition, qfac for left-handed affines),
//! units mm. `.gz` paths (or `gz = true`) are gzip-compressed.

use crate::error::{Error, Result};
use crate::volume::{Volume, voxel_size_from_affine};
use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use ndarray::Array3;
use nifti::{IntoNdArray, NiftiHeader, NiftiType};
use std::io::{Read, Write};
use std::path::Path;

/// The name used in errors for in-memory data.
const BYTES_NAME: &str = "<bytes>";
/// Size of a NIfTI-1 header.
const HEADER_LEN: usize = 348;
/// Offset of the voxel data in files we write (header + 4-byte empty extension flag).
const DATA_OFFSET: usize = 352;
/// Refuse to allocate more than this for voxel data (16 GiB), whatever the header says.
const MAX_DATA_BYTES: u64 = 16 << 30;
/// The voxel buffer starts at most this large (64 MiB) and grows as data arrives.
const INITIAL_DATA_CAPACITY: u64 = 64 << 20;

fn nifti_err(name: &str, reason: impl Into<String>) -> Error {
    Error::Nifti {
        path: name.to_string(),
        reason: reason.into(),
    }
}

/// Reads a `.nii` or `.nii.gz` file (gzip detected from the content).
pub fn read_nifti(path: impl AsRef<Path>) -> Result<Volume> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(&bytes, &path.display().to_string())
}

/// Reads a NIfTI-1 volume from in-memory bytes (plain or gzip-compressed).
pub fn read_nifti_bytes(bytes: &[u8]) -> Result<Volume> {
    decode(bytes, BYTES_NAME)
}

/// Writes `volume` to `path` as f32 NIfTI-1, gzip-compressed if the name ends in `.gz`.
pub fn write_nifti(path: impl AsRef<Path>, volume: &Volume) -> Result<()> {
    let path = path.as_ref();
    let gz = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.to_ascii_lowercase().ends_with(".gz"));
    let bytes = encode(volume, gz, &path.display().to_string())?;
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Encodes `volume` as an f32 NIfTI-1 file in memory, gzip-compressed if `gz`.
pub fn write_nifti_bytes(volume: &Volume, gz: bool) -> Result<Vec<u8>> {
    encode(volume, gz, BYTES_NAME)
}

fn is_gzip(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b
}

/// Reads as many bytes as possible into `buf`; returns how many were read.
fn read_full(r: &mut dyn Read, buf: &mut [u8], name: &str) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(nifti_err(name, format!("cannot read the data: {e}"))),
        }
    }
    Ok(got)
}

/// What the header of a NIfTI-1 file declares, read without touching the voxel data.
///
/// Produced by [`read_nifti_header`] / [`read_nifti_header_bytes`]; every check that the
/// header alone allows (NIfTI-1, 3-D, known datatype, finite affine with positive voxel
/// sizes, data size under the 16 GiB limit) has passed.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeHeader {
    /// `dim[0]`: the number of dimensions the header declares (3 or more; axes beyond the
    /// third have length 1).
    pub ndim: usize,
    /// The 3-D shape (voxels along i, j, k).
    pub shape: [usize; 3],
    /// The `nifti` crate's name of the datatype (e.g. `Uint8`, `Float32`).
    pub datatype: String,
    /// Bytes per stored voxel of that datatype (1, 2, 4 or 8).
    pub bytes_per_voxel: u64,
    /// Voxel sizes in mm (column norms of [`Self::affine`]).
    pub voxel_size: [f64; 3],
    /// The voxel-to-scanner affine (mm): sform, else qform, else diagonal pixdim.
    pub affine: [[f64; 4]; 4],
    /// Byte offset of the voxel data in the (decompressed) file.
    pub vox_offset: u64,
}

impl VolumeHeader {
    /// Number of voxels (product of the shape).
    pub fn voxels(&self) -> u64 {
        self.shape.iter().map(|&n| n as u64).product()
    }

    /// Bytes of voxel data the header declares: voxels × bytes per voxel.
    pub fn data_bytes(&self) -> u64 {
        self.voxels() * self.bytes_per_voxel
    }
}

/// Reads only the header of a `.nii` or `.nii.gz` file (for gzip, only enough of the
/// stream is decompressed to hold the 348-byte header).
pub fn read_nifti_header(path: impl AsRef<Path>) -> Result<VolumeHeader> {
    let path = path.as_ref();
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut magic = [0u8; 2];
    let name = path.display().to_string();
    let got = read_full(&mut file, &mut magic, &name)?;
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let reader = std::io::BufReader::new(file);
    let mut reader: Box<dyn Read> = if is_gzip(&magic[..got]) {
        Box::new(MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let (_, info) = parse_header(reader.as_mut(), &name, is_gzip(&magic[..got]))?;
    Ok(info)
}

/// Reads only the header of in-memory NIfTI-1 bytes (plain or gzip-compressed; for
/// gzip, only enough is decompressed to hold the 348-byte header).
pub fn read_nifti_header_bytes(bytes: &[u8]) -> Result<VolumeHeader> {
    let gz = is_gzip(bytes);
    let mut reader: Box<dyn Read + '_> = if gz {
        Box::new(MultiGzDecoder::new(bytes))
    } else {
        Box::new(bytes)
    };
    let (_, info) = parse_header(reader.as_mut(), BYTES_NAME, gz)?;
    Ok(info)
}

fn decode(bytes: &[u8], name: &str) -> Result<Volume> {
    let gz = is_gzip(bytes);
    let mut reader: Box<dyn Read + '_> = if gz {
        Box::new(MultiGzDecoder::new(bytes))
    } else {
        Box::new(bytes)
    };
    let ctx = if gz { " (after gunzip)" } else { "" };
    let (mut header, info) = parse_header(reader.as_mut(), name, gz)?;
    let shape = info.shape;
    let nbytes = info.data_bytes();
    let offset = info.vox_offset;
    let skip = offset - HEADER_LEN as u64;
    let skipped = std::io::copy(&mut reader.as_mut().take(skip), &mut std::io::sink())
        .map_err(|e| nifti_err(name, format!("cannot read the data: {e}")))?;
    if skipped < skip {
        return Err(nifti_err(
            name,
            format!("truncated file{ctx}: ends before the voxel data offset {offset}"),
        ));
    }
    // Hard cap: decompress at most the declared size, and let the buffer grow with the
    // data that arrives (a header may claim far more than the file holds).
    let mut raw = Vec::with_capacity(nbytes.min(INITIAL_DATA_CAPACITY) as usize);
    reader
        .as_mut()
        .take(nbytes)
        .read_to_end(&mut raw)
        .map_err(|e| nifti_err(name, format!("cannot read the data: {e}")))?;
    if (raw.len() as u64) < nbytes {
        return Err(nifti_err(
            name,
            format!(
                "truncated voxel data{ctx}: shape {shape:?} of {} needs {nbytes} bytes, \
                 found {}",
                info.datatype,
                raw.len()
            ),
        ));
    }
    let affine = info.affine;
    let voxel_size = info.voxel_size;

    // Scaling: slope 0 or non-finite means none (NIfTI-1 standard, nibabel).
    if !(header.scl_slope.is_finite() && header.scl_slope != 0.0) {
        header.scl_slope = 1.0;
        header.scl_inter = 0.0;
    } else if !header.scl_inter.is_finite() {
        header.scl_inter = 0.0;
    }
    let data = match unscaled_f32(&header, &raw, shape) {
        Some(data) => data,
        None => any_datatype(&header, raw, shape, name)?,
    };
    Ok(Volume::with_affine(data, voxel_size, affine))
}

/// The voxels of any datatype and scaling, through the `nifti` crate (values in f64,
/// scaled, narrowed to f32), in C order.
fn any_datatype(
    header: &NiftiHeader,
    raw: Vec<u8>,
    shape: [usize; 3],
    name: &str,
) -> Result<Array3<f32>> {
    let volume = nifti::InMemNiftiVolume::from_raw_data(header, raw)
        .map_err(|e| nifti_err(name, format!("cannot interpret the voxel data: {e}")))?;
    let arr = volume
        .into_ndarray::<f64>()
        .map_err(|e| nifti_err(name, format!("cannot convert the voxel data: {e}")))?;
    // The crate's array is in NIfTI's (Fortran) memory order, possibly with trailing unit
    // axes. Drop those, narrow to f32 in memory order, then copy once into C order: the
    // same values as iterating the n-D array logically, without its slow dynamic-rank
    // iterator (a quarter of a 160×192×160 job's set-up went there).
    let mut arr = arr;
    while arr.ndim() > 3 && arr.shape()[arr.ndim() - 1] == 1 {
        let last = arr.ndim() - 1;
        arr = arr.index_axis_move(ndarray::Axis(last), 0);
    }
    let arr = arr
        .into_dimensionality::<ndarray::Ix3>()
        .map_err(|e| nifti_err(name, format!("voxel data is not 3-D: {e}")))?;
    if arr.dim() != (shape[0], shape[1], shape[2]) {
        return Err(nifti_err(
            name,
            format!(
                "voxel data has shape {:?}, the header says {shape:?}",
                arr.shape()
            ),
        ));
    }
    Ok(arr.mapv(|v| v as f32).as_standard_layout().into_owned())
}

/// The voxels of unscaled f32 data (`FLOAT32`, slope 1, intercept 0: what dmqsm, QSM
/// pipelines and nibabel write for field and χ maps), read straight from `raw` in NIfTI's
/// (Fortran) order and copied once into C order. The bits are those of the general path,
/// which applies slope 1 and intercept 0 (exact, except that −0 becomes +0: hence the
/// `+ 0.0`); `None` for any other datatype or scaling.
fn unscaled_f32(header: &NiftiHeader, raw: &[u8], shape: [usize; 3]) -> Option<Array3<f32>> {
    if header.datatype != NiftiType::Float32 as i16
        || header.scl_slope != 1.0
        || header.scl_inter != 0.0
    {
        return None;
    }
    let n = shape.iter().product::<usize>();
    let raw = raw.get(..n.checked_mul(4)?)?;
    let read: fn([u8; 4]) -> f32 = match header.endianness {
        nifti::Endianness::Little => f32::from_le_bytes,
        nifti::Endianness::Big => f32::from_be_bytes,
    };
    let [nx, ny, nz] = shape;
    let mut values = vec![0.0f32; n];
    // Fortran [i, j, k] sits at i + nx·(j + ny·k) in `raw`, C [i, j, k] at
    // (i·ny + j)·nz + k in `values`: for each j a 2-D transpose of (k, i) into (i, k),
    // done in TILE × TILE tiles so that reads and writes both stay in cache lines (one
    // pass, no intermediate Fortran-order copy). `+ 0.0` as in the general path.
    const TILE: usize = 16;
    for j in 0..ny {
        for k0 in (0..nz).step_by(TILE) {
            for i0 in (0..nx).step_by(TILE) {
                for k in k0..(k0 + TILE).min(nz) {
                    for i in i0..(i0 + TILE).min(nx) {
                        let at = 4 * (i + nx * (j + ny * k));
                        let word = [raw[at], raw[at + 1], raw[at + 2], raw[at + 3]];
                        values[(i * ny + j) * nz + k] = read(word) + 0.0;
                    }
                }
            }
        }
    }
    Array3::from_shape_vec((nx, ny, nz), values).ok()
}

/// Reads and checks the 348-byte header from `reader` (positioned at the start of the
/// decompressed file); leaves it positioned right after the header.
fn parse_header(
    reader: &mut dyn Read,
    name: &str,
    gz: bool,
) -> Result<(NiftiHeader, VolumeHeader)> {
    let ctx = if gz { " (after gunzip)" } else { "" };
    let mut head = [0u8; HEADER_LEN];
    let got = read_full(reader, &mut head, name)?;
    if got < HEADER_LEN {
        return Err(nifti_err(
            name,
            format!("truncated header: {got} bytes{ctx}, a NIfTI-1 header needs {HEADER_LEN}"),
        ));
    }
    let sizeof_hdr_le = i32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let sizeof_hdr_be = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if sizeof_hdr_le == 540 || sizeof_hdr_be == 540 {
        return Err(nifti_err(
            name,
            "NIfTI-2 files are not supported; save as NIfTI-1",
        ));
    }
    if sizeof_hdr_le != 348 && sizeof_hdr_be != 348 {
        return Err(nifti_err(
            name,
            format!("not a NIfTI-1 file (header size field is {sizeof_hdr_le}, expected 348)"),
        ));
    }
    let header = NiftiHeader::from_reader(&head[..])
        .map_err(|e| nifti_err(name, format!("not a NIfTI-1 file: {e}")))?;
    if &header.magic == b"ni1\0" {
        return Err(nifti_err(
            name,
            "header-only NIfTI (.hdr/.img pair) is not supported; use a single .nii file",
        ));
    }

    let shape = volume_shape(&header, name)?;
    let datatype = header
        .data_type()
        .map_err(|_| nifti_err(name, format!("unknown datatype code {}", header.datatype)))?;
    let bytes_per_voxel = match datatype {
        NiftiType::Uint8 | NiftiType::Int8 => 1u64,
        NiftiType::Uint16 | NiftiType::Int16 => 2,
        NiftiType::Uint32 | NiftiType::Int32 | NiftiType::Float32 => 4,
        NiftiType::Uint64 | NiftiType::Int64 | NiftiType::Float64 => 8,
        other => {
            return Err(nifti_err(
                name,
                format!(
                    "unsupported datatype {other:?} (code {}); dmqsm reads integer and real \
                     float volumes",
                    header.datatype
                ),
            ));
        }
    };
    let nvox = shape.iter().map(|&n| n as u64).product::<u64>();
    let nbytes = nvox * bytes_per_voxel;
    if nbytes > MAX_DATA_BYTES {
        return Err(nifti_err(
            name,
            format!("volume of shape {shape:?} needs {nbytes} bytes, over the 16 GiB limit"),
        ));
    }
    let offset = header.vox_offset;
    if !(offset.is_finite() && offset >= HEADER_LEN as f32 && offset < 1e9) {
        return Err(nifti_err(name, format!("invalid vox_offset {offset}{ctx}")));
    }
    let affine = header_affine(&header, name)?;
    let voxel_size = voxel_size_from_affine(&affine);
    if voxel_size.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(nifti_err(
            name,
            format!("voxel size must be finite and positive, got {voxel_size:?} mm"),
        ));
    }
    let info = VolumeHeader {
        ndim: header.dim[0] as usize,
        shape,
        datatype: format!("{datatype:?}"),
        bytes_per_voxel,
        voxel_size,
        affine,
        vox_offset: offset as u64,
    };
    Ok((header, info))
}

/// The 3D shape from `dim`, rejecting fewer than 3 dimensions, zero-length or unit
/// spatial axes and non-trivial 4th+ axes.
fn volume_shape(header: &NiftiHeader, name: &str) -> Result<[usize; 3]> {
    let ndim = header.dim[0] as usize;
    if !(1..=7).contains(&ndim) {
        return Err(nifti_err(
            name,
            format!("invalid number of dimensions dim[0] = {ndim}"),
        ));
    }
    let dims = &header.dim[1..=ndim];
    if ndim < 3 {
        return Err(nifti_err(
            name,
            format!(
                "{ndim}-D image of shape {dims:?} (dim[0] = {ndim}); dmqsm reconstructs 3-D \
                 volumes"
            ),
        ));
    }
    if dims.contains(&0) {
        return Err(nifti_err(
            name,
            format!("zero-length dimension in {dims:?}"),
        ));
    }
    if dims.iter().skip(3).any(|&d| d != 1) {
        return Err(nifti_err(
            name,
            format!(
                "{ndim}D image of shape {dims:?}; dmqsm needs a single 3D volume (split \
                 4D series first)"
            ),
        ));
    }
    let shape = [dims[0] as usize, dims[1] as usize, dims[2] as usize];
    if shape.contains(&1) {
        return Err(nifti_err(
            name,
            format!(
                "shape {shape:?} is a single slice or line, not a volume; dmqsm reconstructs \
                 3-D volumes with at least 2 voxels along each axis"
            ),
        ));
    }
    Ok(shape)
}

/// The voxel-to-scanner affine: sform, else qform, else diagonal pixdim.
///
/// Kept by hand rather than `NiftiHeader::affine` (nifti 0.18, feature `nalgebra_affine`,
/// which pulls in nalgebra 0.35 + simba): that one agrees on the sform and to ~5e-17 on
/// ordinary qforms, but panics on `pixdim[0]` = 0 (common; means qfac = 1), negative
/// pixdim or b² + c² + d² > 1, keeps a ≈ √a² where `nifti_quatern_to_mat44` (here) sets
/// a = 0 below a² = 1e-7 (2.7e-4 apart near 180°), and without sform/qform it returns a
/// centred, x-flipped affine instead of NIfTI method 1.
fn header_affine(h: &NiftiHeader, name: &str) -> Result<[[f64; 4]; 4]> {
    let mut a = [[0.0f64; 4]; 4];
    a[3][3] = 1.0;
    if h.sform_code > 0 {
        for (row, srow) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
            for col in 0..4 {
                a[row][col] = srow[col] as f64;
            }
        }
    } else if h.qform_code > 0 {
        let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let a2 = 1.0 - (b * b + c * c + d * d);
        let (qa, b, c, d) = if a2 > 1e-7 {
            (a2.sqrt(), b, c, d)
        } else {
            // 180° rotation: renormalise (b, c, d) as nifti_quatern_to_mat44 does.
            let n = (b * b + c * c + d * d).sqrt();
            if n == 0.0 || !n.is_finite() {
                return Err(nifti_err(name, "invalid qform quaternion"));
            }
            (0.0, b / n, c / n, d / n)
        };
        let r = [
            [
                qa * qa + b * b - c * c - d * d,
                2.0 * (b * c - qa * d),
                2.0 * (b * d + qa * c),
            ],
            [
                2.0 * (b * c + qa * d),
                qa * qa + c * c - b * b - d * d,
                2.0 * (c * d - qa * b),
            ],
            [
                2.0 * (b * d - qa * c),
                2.0 * (c * d + qa * b),
                qa * qa + d * d - c * c - b * b,
            ],
        ];
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let zoom = [
            h.pixdim[1].abs() as f64,
            h.pixdim[2].abs() as f64,
            h.pixdim[3].abs() as f64 * qfac,
        ];
        for row in 0..3 {
            for col in 0..3 {
                a[row][col] = r[row][col] * zoom[col];
            }
        }
        a[0][3] = h.quatern_x as f64;
        a[1][3] = h.quatern_y as f64;
        a[2][3] = h.quatern_z as f64;
    } else {
        for (axis, row) in a.iter_mut().take(3).enumerate() {
            row[axis] = h.pixdim[axis + 1].abs() as f64;
        }
    }
    if a.iter().flatten().any(|v| !v.is_finite()) {
        return Err(nifti_err(
            name,
            "the affine (sform/qform/pixdim) is not finite",
        ));
    }
    Ok(a)
}

/// The qform parameters (quaternion b, c, d and qfac) of the rotation nearest to the
/// affine's 3×3 part with unit columns; None if that part is singular.
fn qform_params(affine: &[[f64; 4]; 4]) -> Option<([f64; 3], f64)> {
    let zoom = voxel_size_from_affine(affine);
    if zoom.iter().any(|z| !(z.is_finite() && *z > 0.0)) {
        return None;
    }
    let mut r = [[0.0f64; 3]; 3];
    for row in 0..3 {
        for col in 0..3 {
            r[row][col] = affine[row][col] / zoom[col];
        }
    }
    let mut qfac = 1.0;
    if det3(&r) < 0.0 {
        qfac = -1.0;
        for row in r.iter_mut() {
            row[2] = -row[2];
        }
    }
    // Polar decomposition by Newton iteration R ← (R + R⁻ᵀ)/2 (converges quadratically to
    // the nearest rotation for nonsingular R).
    for _ in 0..50 {
        let inv = inv3(&r)?;
        let mut next = [[0.0; 3]; 3];
        let mut change = 0.0f64;
        for i in 0..3 {
            for j in 0..3 {
                next[i][j] = 0.5 * (r[i][j] + inv[j][i]);
                change = change.max((next[i][j] - r[i][j]).abs());
            }
        }
        r = next;
        if change < 1e-14 {
            break;
        }
    }
    // Rotation matrix → unit quaternion with a ≥ 0 (nifti_mat44_to_quatern).
    let (r11, r12, r13) = (r[0][0], r[0][1], r[0][2]);
    let (r21, r22, r23) = (r[1][0], r[1][1], r[1][2]);
    let (r31, r32, r33) = (r[2][0], r[2][1], r[2][2]);
    let trace = r11 + r22 + r33 + 1.0;
    let (a, b, c, d);
    if trace > 0.5 {
        a = 0.5 * trace.sqrt();
        b = 0.25 * (r32 - r23) / a;
        c = 0.25 * (r13 - r31) / a;
        d = 0.25 * (r21 - r12) / a;
    } else {
        let xd = 1.0 + r11 - (r22 + r33);
        let yd = 1.0 + r22 - (r11 + r33);
        let zd = 1.0 + r33 - (r11 + r22);
        if xd > 1.0 {
            let bb = 0.5 * xd.sqrt();
            b = bb;
            c = 0.25 * (r12 + r21) / bb;
            d = 0.25 * (r13 + r31) / bb;
            a = 0.25 * (r32 - r23) / bb;
        } else if yd > 1.0 {
            let cc = 0.5 * yd.sqrt();
            c = cc;
            b = 0.25 * (r12 + r21) / cc;
            d = 0.25 * (r23 + r32) / cc;
            a = 0.25 * (r13 - r31) / cc;
        } else {
            let dd = 0.5 * zd.sqrt();
            d = dd;
            b = 0.25 * (r13 + r31) / dd;
            c = 0.25 * (r23 + r32) / dd;
            a = 0.25 * (r21 - r12) / dd;
        }
    }
    let s = if a < 0.0 { -1.0 } else { 1.0 };
    let q = [b * s, c * s, d * s];
    q.iter().all(|v| v.is_finite()).then_some((q, qfac))
}

fn det3(m: &[[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

fn inv3(m: &[[f64; 3]; 3]) -> Option<[[f64; 3]; 3]> {
    let det = det3(m);
    if det.abs() < 1e-12 || !det.is_finite() {
        return None;
    }
    let mut inv = [[0.0; 3]; 3];
    for (i, row) in inv.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            // Cofactor C[j][i] / det (adjugate transpose).
            let (r0, r1) = match j {
                0 => (1, 2),
                1 => (0, 2),
                _ => (0, 1),
            };
            let (c0, c1) = match i {
                0 => (1, 2),
                1 => (0, 2),
                _ => (0, 1),
            };
            let minor = m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
            let sign = if (i + j) % 2 == 0 { 1.0 } else { -1.0 };
            *v = sign * minor / det;
        }
    }
    Some(inv)
}

fn put_i16(buf: &mut [u8], off: usize, v: i16) {
    buf[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_f32(buf: &mut [u8], off: usize, v: f32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// The 352-byte NIfTI-1 header (and empty extension flag) for `volume` as f32 data.
fn header_bytes(volume: &Volume, name: &str) -> Result<Vec<u8>> {
    let shape = volume.shape();
    if let Some(n) = shape.iter().find(|&&n| n == 0 || n > i16::MAX as usize) {
        return Err(nifti_err(
            name,
            format!("cannot write shape {shape:?}: axis length {n} outside 1..=32767"),
        ));
    }
    if volume.affine.iter().flatten().any(|v| !v.is_finite())
        || volume.voxel_size.iter().any(|v| !v.is_finite())
    {
        return Err(nifti_err(
            name,
            "cannot write a non-finite affine or voxel size",
        ));
    }
    let mut h = vec![0u8; DATA_OFFSET];
    h[0..4].copy_from_slice(&(HEADER_LEN as i32).to_le_bytes());
    h[38] = b'r';
    put_i16(&mut h, 40, 3);
    for (a, &n) in shape.iter().enumerate() {
        put_i16(&mut h, 42 + 2 * a, n as i16);
    }
    for a in 3..7 {
        put_i16(&mut h, 42 + 2 * a, 1);
    }
    put_i16(&mut h, 70, 16); // NIFTI_TYPE_FLOAT32
    put_i16(&mut h, 72, 32); // bitpix
    let q = qform_params(&volume.affine);
    put_f32(&mut h, 76, q.map_or(1.0, |(_, qfac)| qfac as f32));
    for a in 0..3 {
        put_f32(&mut h, 80 + 4 * a, volume.voxel_size[a] as f32);
    }
    for a in 3..7 {
        put_f32(&mut h, 80 + 4 * a, 1.0);
    }
    put_f32(&mut h, 108, DATA_OFFSET as f32);
    put_f32(&mut h, 112, 1.0); // scl_slope
    h[123] = 2 | 8; // mm, s
    let descrip = b"dmqsm";
    h[148..148 + descrip.len()].copy_from_slice(descrip);
    if let Some((quat, _)) = q {
        put_i16(&mut h, 252, 1); // qform_code: scanner anatomical
        for (k, v) in quat.iter().enumerate() {
            put_f32(&mut h, 256 + 4 * k, *v as f32);
        }
    }
    for row in 0..3 {
        put_f32(&mut h, 268 + 4 * row, volume.affine[row][3] as f32);
    }
    put_i16(&mut h, 254, 1); // sform_code: scanner anatomical
    for row in 0..3 {
        for col in 0..4 {
            put_f32(
                &mut h,
                280 + 16 * row + 4 * col,
                volume.affine[row][col] as f32,
            );
        }
    }
    h[344..348].copy_from_slice(b"n+1\0");
    Ok(h)
}

fn encode(volume: &Volume, gz: bool, name: &str) -> Result<Vec<u8>> {
    let [nx, ny, nz] = volume.shape();
    let mut out = header_bytes(volume, name)?;
    out.reserve(nx * ny * nz * 4);
    // NIfTI stores voxels with the first index fastest (Fortran order).
    for v in volume.data.t().iter() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    if !gz {
        return Ok(out);
    }
    let mut enc = GzEncoder::new(Vec::with_capacity(out.len() / 2), Compression::fast());
    enc.write_all(&out)
        .and_then(|_| enc.finish())
        .map_err(|e| nifti_err(name, format!("gzip compression failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;
    use nifti::{InMemNiftiObject, NiftiObject};

    /// An oblique, anisotropic, translated affine (rotation about a tilted axis).
    fn oblique_volume(shape: [usize; 3]) -> Volume {
        let data = Array3::from_shape_fn(shape, |(i, j, k)| {
            (i as f32) * 0.5 - (j as f32) * 0.25 + (k as f32) * 0.125 + 0.001
        });
        let (t, u) = (0.3f64, -0.2f64);
        let rx = [
            [1.0, 0.0, 0.0],
            [0.0, t.cos(), -t.sin()],
            [0.0, t.sin(), t.cos()],
        ];
        let ry = [
            [u.cos(), 0.0, u.sin()],
            [0.0, 1.0, 0.0],
            [-u.sin(), 0.0, u.cos()],
        ];
        let vox = [0.9, 1.1, 2.0];
        let mut a = [[0.0; 4]; 4];
        for r in 0..3 {
            for c in 0..3 {
                a[r][c] = (0..3).map(|m| rx[r][m] * ry[m][c]).sum::<f64>() * vox[c];
            }
        }
        a[0][3] = -90.5;
        a[1][3] = 12.25;
        a[2][3] = 40.0;
        a[3][3] = 1.0;
        Volume::with_affine(data, vox, a)
    }

    fn assert_affine_close(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4], tol: f64) {
        for r in 0..4 {
            for c in 0..4 {
                assert!(
                    (a[r][c] - b[r][c]).abs() < tol,
                    "[{r}][{c}]: {} vs {}",
                    a[r][c],
                    b[r][c]
                );
            }
        }
    }

    fn set_i16(b: &mut [u8], off: usize, v: i16) {
        b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_f32(b: &mut [u8], off: usize, v: f32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Round trip through bytes, plain and gzip: data bit-exact, affine to f32 precision
    /// (1e-4 mm on translations of ~100 mm), voxel sizes to 1e-6.
    #[test]
    fn round_trip_bytes() {
        let v = oblique_volume([5, 4, 3]);
        for gz in [false, true] {
            let bytes = write_nifti_bytes(&v, gz).unwrap();
            assert_eq!(is_gzip(&bytes), gz);
            let w = read_nifti_bytes(&bytes).unwrap();
            assert_eq!(w.data, v.data);
            assert_affine_close(&w.affine, &v.affine, 1e-4);
            for a in 0..3 {
                assert!((w.voxel_size[a] - v.voxel_size[a]).abs() < 1e-6);
            }
        }
    }

    /// A volume declared 4-D or 5-D with unit trailing axes decodes to the same 3-D
    /// array, voxel for voxel, and the values sit where the logical (i, j, k) order puts
    /// them (each voxel holds a distinct value).
    #[test]
    fn trailing_unit_axes_and_memory_order() {
        let v = Volume::new(
            Array3::from_shape_fn((5, 4, 3), |(i, j, k)| (100 * i + 10 * j + k) as f32),
            [1.0; 3],
        );
        let bytes = write_nifti_bytes(&v, false).unwrap();
        assert_eq!(read_nifti_bytes(&bytes).unwrap().data, v.data);
        for ndim in [4i16, 5] {
            let mut b = bytes.clone();
            b[40..42].copy_from_slice(&ndim.to_le_bytes());
            for axis in 4..=ndim as usize {
                b[40 + 2 * axis..42 + 2 * axis].copy_from_slice(&1i16.to_le_bytes());
            }
            let w = read_nifti_bytes(&b).unwrap();
            assert_eq!(w.data, v.data, "dim[0] = {ndim}");
            assert_eq!(w.data[[4, 3, 2]], 432.0);
        }
    }

    /// The unscaled-f32 fast path gives, bit for bit, what the general path through the
    /// `nifti` crate gives (so fingerprints and results are those of the general path), in
    /// both byte orders, on values with edge cases (±0, ±∞, subnormals, the extremes),
    /// each at its logical (i, j, k); scaled or non-f32 data is left to the general path.
    /// Shapes below one 16-voxel tile and across several tiles with partial ones at the
    /// ends (the fast path transposes in tiles).
    #[test]
    fn unscaled_f32_fast_path_equals_the_general_path() {
        for shape in [[5usize, 4, 3], [37, 3, 41], [16, 2, 33]] {
            unscaled_f32_case(shape);
        }
    }

    fn unscaled_f32_case(shape: [usize; 3]) {
        let special = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            f32::MAX,
            f32::MIN,
        ];
        let v = Array3::from_shape_fn(shape, |(i, j, k)| {
            let n = i + shape[0] * (j + shape[1] * k);
            special.get(n).copied().unwrap_or(n as f32 * 0.37 - 9.0)
        });
        for endianness in [nifti::Endianness::Little, nifti::Endianness::Big] {
            let mut raw = Vec::new();
            for k in 0..shape[2] {
                for j in 0..shape[1] {
                    for i in 0..shape[0] {
                        let x = v[[i, j, k]];
                        raw.extend(match endianness {
                            nifti::Endianness::Little => x.to_le_bytes(),
                            nifti::Endianness::Big => x.to_be_bytes(),
                        });
                    }
                }
            }
            let mut h = NiftiHeader {
                datatype: NiftiType::Float32 as i16,
                bitpix: 32,
                scl_slope: 1.0,
                scl_inter: 0.0,
                endianness,
                ..NiftiHeader::default()
            };
            let [x, y, z] = shape.map(|n| n as u16);
            h.dim = [3, x, y, z, 1, 1, 1, 1];
            let fast = unscaled_f32(&h, &raw, shape).unwrap();
            let general = any_datatype(&h, raw.clone(), shape, "t").unwrap();
            let bits = |a: &Array3<f32>| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&general), "{endianness:?}");
            // Scaling by 1 and adding 0 turns −0 into +0 and keeps every other value.
            assert_eq!(bits(&fast), bits(&v.mapv(|x| x + 0.0)), "{endianness:?}");
            assert_eq!(fast[[1, 0, 0]].to_bits(), 0);
            h.scl_slope = 2.0;
            assert!(unscaled_f32(&h, &raw, shape).is_none());
            h.scl_slope = 1.0;
            h.datatype = NiftiType::Int32 as i16;
            assert!(unscaled_f32(&h, &raw, shape).is_none());
        }
    }

    /// Path-based round trip; `.nii.gz` is compressed, `.nii` not.
    #[test]
    fn round_trip_files() {
        let dir = tempfile::tempdir().unwrap();
        let v = oblique_volume([3, 6, 2]);
        for name in ["a.nii", "b.nii.gz"] {
            let p = dir.path().join(name);
            write_nifti(&p, &v).unwrap();
            let raw = std::fs::read(&p).unwrap();
            assert_eq!(is_gzip(&raw), name.ends_with(".gz"));
            let w = read_nifti(&p).unwrap();
            assert_eq!(w.data, v.data);
            assert_affine_close(&w.affine, &v.affine, 1e-4);
        }
        let e = read_nifti(dir.path().join("missing.nii")).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }

    /// Our files read with the `nifti` crate's own reader: same dims, sform, qform
    /// (through its quaternion code) and values in Fortran order.
    #[test]
    fn files_are_readable_by_the_nifti_crate() {
        let v = oblique_volume([4, 3, 2]);
        let bytes = write_nifti_bytes(&v, false).unwrap();
        let obj = InMemNiftiObject::from_reader(&bytes[..]).unwrap();
        let h = obj.header();
        assert_eq!(&h.dim[..4], &[3, 4, 3, 2]);
        assert_eq!(h.sform_code, 1);
        assert!((h.srow_y[3] - 12.25).abs() < 1e-6);
        let arr = obj.volume().into_ndarray::<f32>().unwrap();
        for ((i, j, k), x) in v.data.indexed_iter() {
            assert_eq!(arr[[i, j, k]], *x);
        }
    }

    /// With the sform disabled the qform (nearest rotation + qfac) reproduces an
    /// orthogonal affine to 1e-4, for right- and left-handed (flipped) affines; with
    /// neither, pixdim gives a diagonal affine.
    #[test]
    fn qform_and_pixdim_fallbacks() {
        let mut v = oblique_volume([3, 3, 3]);
        for flip in [false, true] {
            if flip {
                for r in 0..3 {
                    v.affine[r][0] = -v.affine[r][0];
                }
            }
            let mut bytes = write_nifti_bytes(&v, false).unwrap();
            set_i16(&mut bytes, 254, 0);
            let w = read_nifti_bytes(&bytes).unwrap();
            assert_affine_close(&w.affine, &v.affine, 1e-4);
            set_i16(&mut bytes, 252, 0);
            let w = read_nifti_bytes(&bytes).unwrap();
            assert_eq!(w.voxel_size, [0.9f32 as f64, 1.1f32 as f64, 2.0]);
            assert_eq!(w.affine[0][1], 0.0);
            assert_eq!(w.affine[2][2], 2.0);
        }
    }

    /// Integer data with scl_slope/scl_inter, written independently by the nifti crate
    /// (i16, then slope 0.5 and intercept −1 patched in): values are slope·raw + inter.
    /// A slope of 0 means no scaling.
    #[test]
    fn integer_data_and_scaling() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("int.nii");
        let raw = Array3::from_shape_fn((3, 2, 2), |(i, j, k)| (i * 100 + j * 10 + k) as i16 - 50);
        nifti::writer::WriterOptions::new(&p)
            .write_nifti(&raw)
            .unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        set_f32(&mut bytes, 112, 0.5);
        set_f32(&mut bytes, 116, -1.0);
        let v = read_nifti_bytes(&bytes).unwrap();
        for (idx, r) in raw.indexed_iter() {
            assert_eq!(v.data[idx], *r as f32 * 0.5 - 1.0);
        }
        set_f32(&mut bytes, 112, 0.0);
        let v = read_nifti_bytes(&bytes).unwrap();
        assert_eq!(v.data[[2, 1, 1]], 161.0);
        // u8 as well.
        let q = dir.path().join("u8.nii.gz");
        let raw8 = Array3::from_shape_fn((2, 2, 2), |(i, j, k)| (i * 4 + j * 2 + k) as u8 * 30);
        nifti::writer::WriterOptions::new(&q)
            .write_nifti(&raw8)
            .unwrap();
        let v = read_nifti(&q).unwrap();
        assert_eq!(v.data[[1, 1, 1]], 210.0);
    }

    /// 4D files with a unit fourth axis are accepted; real 4D, zero axes, bad voxel
    /// sizes, truncation, NIfTI-2, complex data, garbage and corrupt gzip are errors that
    /// say why (and name the file for path-based reads).
    #[test]
    fn unusable_files_are_rejected_with_reasons() {
        let v = oblique_volume([4, 3, 2]);
        let good = write_nifti_bytes(&v, false).unwrap();
        let reason = |b: &[u8]| match read_nifti_bytes(b) {
            Err(Error::Nifti { path, reason }) => {
                assert_eq!(path, "<bytes>");
                reason
            }
            other => panic!("expected a NIfTI error, got {other:?}"),
        };

        let mut b = good.clone();
        set_i16(&mut b, 40, 4);
        set_i16(&mut b, 48, 1);
        assert_eq!(read_nifti_bytes(&b).unwrap().data, v.data);
        set_i16(&mut b, 48, 2);
        assert!(reason(&b).contains("4D"));

        let mut b = good.clone();
        set_i16(&mut b, 44, 0);
        assert!(reason(&b).contains("zero-length"));

        let mut b = good.clone();
        set_i16(&mut b, 254, 0);
        set_i16(&mut b, 252, 0);
        set_f32(&mut b, 84, f32::NAN);
        assert!(reason(&b).contains("not finite"));
        set_f32(&mut b, 84, 0.0);
        assert!(reason(&b).contains("voxel size"));

        assert!(reason(&good[..good.len() - 3]).contains("truncated voxel data"));
        assert!(reason(&good[..200]).contains("truncated header"));
        let gz = write_nifti_bytes(&v, true).unwrap();
        let r = reason(&gz[..gz.len() / 2]);
        assert!(r.contains("truncated") || r.contains("cannot read"), "{r}");
        let mut bad_gz = gz.clone();
        for x in bad_gz[20..40].iter_mut() {
            *x ^= 0x5a;
        }
        assert!(read_nifti_bytes(&bad_gz).is_err());

        let mut b = good.clone();
        b[0..4].copy_from_slice(&540i32.to_le_bytes());
        assert!(reason(&b).contains("NIfTI-2"));

        let mut b = good.clone();
        set_i16(&mut b, 70, 32); // complex64
        set_i16(&mut b, 72, 64);
        assert!(reason(&b).contains("unsupported datatype"));

        let text = b"this is certainly not a NIfTI file, but it is long enough ".repeat(8);
        assert!(reason(&text).contains("not a NIfTI-1 file"));
        let mut b = good.clone();
        b[344..348].copy_from_slice(b"xyz\0");
        assert!(reason(&b).contains("not a NIfTI-1"));

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("broken.nii");
        std::fs::write(&p, &good[..100]).unwrap();
        let e = read_nifti(&p).unwrap_err().to_string();
        assert!(e.contains("broken.nii") && e.contains("truncated"), "{e}");
    }

    /// The header alone (plain, gzip, file) agrees with the full decode on shape, affine
    /// and voxel size, and reports the datatype's size; a header on a truncated gzip
    /// stream reads (only the header is decompressed), while the full decode fails.
    #[test]
    fn header_only_reads_agree_with_the_full_decode() {
        let v = oblique_volume([5, 4, 3]);
        let dir = tempfile::tempdir().unwrap();
        for gz in [false, true] {
            let bytes = write_nifti_bytes(&v, gz).unwrap();
            let h = read_nifti_header_bytes(&bytes).unwrap();
            let w = read_nifti_bytes(&bytes).unwrap();
            assert_eq!(h.shape, w.shape());
            assert_eq!(h.affine, w.affine);
            assert_eq!(h.voxel_size, w.voxel_size);
            assert_eq!((h.ndim, h.bytes_per_voxel, h.vox_offset), (3, 4, 352));
            assert_eq!(h.datatype, "Float32");
            assert_eq!(h.voxels(), 60);
            assert_eq!(h.data_bytes(), 240);
            let p = dir.path().join(if gz { "v.nii.gz" } else { "v.nii" });
            std::fs::write(&p, &bytes).unwrap();
            assert_eq!(read_nifti_header(&p).unwrap(), h);
        }
        let big = Volume::zeros([64, 64, 64], [1.0; 3]);
        let gz = write_nifti_bytes(&big, true).unwrap();
        let cut = &gz[..gz.len() / 4];
        assert_eq!(read_nifti_header_bytes(cut).unwrap().shape, [64, 64, 64]);
        assert!(read_nifti_bytes(cut).is_err());
        assert!(matches!(
            read_nifti_header(dir.path().join("missing.nii")),
            Err(Error::Io { .. })
        ));
    }

    /// A header claiming far more voxels than the file holds fails as truncated (the
    /// buffer grows with the data, it is not allocated at the declared size); bytes after
    /// the declared data are never decoded (the volume equals the one without them).
    #[test]
    fn decoding_is_capped_at_the_declared_size() {
        let v = oblique_volume([4, 3, 2]);
        let good = write_nifti_bytes(&v, false).unwrap();
        let mut claims = good.clone();
        for a in 0..3 {
            set_i16(&mut claims, 42 + 2 * a, 1000);
        }
        let e = read_nifti_bytes(&claims).unwrap_err().to_string();
        assert!(
            e.contains("truncated voxel data") && e.contains("found 96"),
            "{e}"
        );
        let mut trailing = good.clone();
        trailing.extend_from_slice(&[0xff; 1000]);
        for gz in [false, true] {
            let bytes = if gz {
                let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
                enc.write_all(&trailing).unwrap();
                enc.finish().unwrap()
            } else {
                trailing.clone()
            };
            assert_eq!(read_nifti_bytes(&bytes).unwrap().data, v.data);
        }
    }

    /// 1-D and 2-D images and 3-D files holding one slice are refused, naming why.
    #[test]
    fn images_that_are_not_volumes_are_refused() {
        let v = oblique_volume([4, 3, 2]);
        let good = write_nifti_bytes(&v, false).unwrap();
        for (ndim, needle) in [(1i16, "1-D image"), (2, "2-D image")] {
            let mut b = good.clone();
            set_i16(&mut b, 40, ndim);
            for r in [
                read_nifti_bytes(&b).unwrap_err(),
                read_nifti_header_bytes(&b).unwrap_err(),
            ] {
                let r = r.to_string();
                assert!(r.contains(needle) && r.contains("3-D volumes"), "{r}");
            }
        }
        let slice = write_nifti_bytes(&Volume::zeros([8, 8, 1], [1.0; 3]), true).unwrap();
        let e = read_nifti_bytes(&slice).unwrap_err().to_string();
        assert!(e.contains("single slice"), "{e}");
    }

    #[test]
    fn writing_rejects_unwritable_volumes() {
        let mut v = Volume::zeros([2, 2, 2], [1.0; 3]);
        v.affine[0][3] = f64::NAN;
        assert!(write_nifti_bytes(&v, false).is_err());
        let v = Volume::zeros([0, 2, 2], [1.0; 3]);
        assert!(write_nifti_bytes(&v, false).is_err());
        // A singular affine still writes (sform only, qform_code 0).
        let mut v = Volume::zeros([2, 2, 2], [1.0; 3]);
        v.affine[2][2] = 0.0;
        let b = write_nifti_bytes(&v, false).unwrap();
        assert_eq!(i16::from_le_bytes([b[252], b[253]]), 0);
    }
}
