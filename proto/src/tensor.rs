//! Packing f32 data into [`Tensor`] messages and back.
//!
//! Data travel as raw little-endian bytes in C order. f32 is exact; bf16 and f16 halve
//! the bytes at the cost of rounding (round-to-nearest-even): bf16 keeps f32's range with a
//! relative error ≤ 2⁻⁹, f16 has relative error ≤ 2⁻¹¹ but overflows past ±65504.

use crate::v1::{Dtype, Tensor};
use bytes::Bytes;

/// Why a [`Tensor`] message could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    /// The dtype field is unset or unknown.
    #[error("tensor dtype {0} is not supported (use F32, BF16 or F16)")]
    UnsupportedDtype(i32),
    /// The byte length disagrees with shape × element size.
    #[error("tensor of shape {shape:?} and dtype {dtype} needs {expected} bytes, got {got}")]
    ByteLength {
        /// Declared shape.
        shape: Vec<u32>,
        /// Declared dtype name.
        dtype: &'static str,
        /// Bytes implied by the shape.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// The shape overflows `usize` when multiplied out.
    #[error("tensor shape {0:?} is too large")]
    ShapeOverflow(Vec<u32>),
}

/// Bytes per element of a dtype, or `None` if it is not a data type.
pub fn element_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::Bf16 | Dtype::F16 => Some(2),
        Dtype::Unspecified => None,
    }
}

/// f32 values as little-endian bytes: one copy on little-endian machines.
fn f32_to_le_bytes(values: &[f32]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice::<f32, u8>(values).to_vec()
    } else {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

/// f32 values from little-endian bytes (length a multiple of 4, checked by the caller):
/// one copy on little-endian machines, whatever the alignment of `bytes`.
fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    if cfg!(target_endian = "little") {
        bytemuck::pod_collect_to_vec::<u8, f32>(bytes)
    } else {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

/// Packs `values` with the given `shape` into a tensor of element type `dtype`
/// (`Unspecified` is treated as f32).
pub fn encode(values: &[f32], shape: &[usize], dtype: Dtype) -> Tensor {
    let shape: Vec<u32> = shape.iter().map(|&s| s as u32).collect();
    let (dtype, data) = match dtype {
        Dtype::F32 | Dtype::Unspecified => (Dtype::F32, f32_to_le_bytes(values)),
        Dtype::Bf16 => {
            let mut out = Vec::with_capacity(values.len() * 2);
            for v in values {
                out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
            }
            (Dtype::Bf16, out)
        }
        Dtype::F16 => {
            let mut out = Vec::with_capacity(values.len() * 2);
            for v in values {
                out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
            (Dtype::F16, out)
        }
    };
    Tensor {
        shared: None,
        shape,
        dtype: dtype as i32,
        data: Bytes::from(data),
    }
}

/// Calls `f` with the little-endian bytes of `values` (an f32 tensor's data): the values'
/// own memory on a little-endian machine, a converted copy elsewhere.
pub fn with_f32_le_bytes<R>(values: &[f32], f: impl FnOnce(&[u8]) -> R) -> R {
    if cfg!(target_endian = "little") {
        f(bytemuck::cast_slice(values))
    } else {
        f(&f32_to_le_bytes(values))
    }
}

/// f32 values that are their own little-endian bytes (little-endian machines only).
struct F32LeBytes(Vec<f32>);

impl AsRef<[u8]> for F32LeBytes {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// [`encode`] of owned values. For f32 on a little-endian machine the tensor takes the
/// buffer as it is, without a copy (the bytes are the same as [`encode`]'s); otherwise it
/// is [`encode`].
pub fn encode_vec(values: Vec<f32>, shape: &[usize], dtype: Dtype) -> Tensor {
    if cfg!(target_endian = "little") && matches!(dtype, Dtype::F32 | Dtype::Unspecified) {
        return Tensor {
            shared: None,
            shape: shape.iter().map(|&s| s as u32).collect(),
            dtype: Dtype::F32 as i32,
            data: Bytes::from_owner(F32LeBytes(values)),
        };
    }
    encode(&values, shape, dtype)
}

/// [`encode`] of an owned array in C order, with its shape. An array in standard layout
/// that fills its buffer (a stacked batch, a model's answer) lends the buffer to the
/// tensor through [`encode_vec`], without a copy; any other layout is copied in C order.
pub fn encode_array<D: ndarray::Dimension>(a: ndarray::Array<f32, D>, dtype: Dtype) -> Tensor {
    let shape = a.shape().to_vec();
    let n = a.len();
    if a.is_standard_layout() {
        let (values, offset) = a.into_raw_vec_and_offset();
        let start = offset.unwrap_or(0);
        if start == 0 && values.len() == n {
            return encode_vec(values, &shape, dtype);
        }
        // Standard layout keeps the elements contiguous from `start` (ndarray's
        // invariant); were it broken, the receiver would reject the short tensor by name.
        return encode(
            values.get(start..start + n).unwrap_or_default(),
            &shape,
            dtype,
        );
    }
    let v: Vec<f32> = a.iter().copied().collect();
    encode_vec(v, &shape, dtype)
}

/// A decoded tensor: its f32 values in C order and its shape.
pub type Decoded = (Vec<f32>, Vec<usize>);

/// Decodes a tensor into f32 values and its shape, checking dtype and byte length.
pub fn decode(tensor: &Tensor) -> Result<Decoded, TensorError> {
    let (dtype, shape) = layout(tensor, tensor.data.len())?;
    Ok((values(dtype, &tensor.data), shape))
}

/// Checks a tensor's dtype and shape against `bytes` bytes of data (inline or elsewhere,
/// in shared memory say); returns its element type and shape.
pub fn layout(tensor: &Tensor, bytes: usize) -> Result<(Dtype, Vec<usize>), TensorError> {
    let dtype = Dtype::try_from(tensor.dtype)
        .ok()
        .filter(|d| *d != Dtype::Unspecified)
        .ok_or(TensorError::UnsupportedDtype(tensor.dtype))?;
    let size = element_size(dtype).ok_or(TensorError::UnsupportedDtype(tensor.dtype))?;
    let shape: Vec<usize> = tensor.shape.iter().map(|&s| s as usize).collect();
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .ok_or_else(|| TensorError::ShapeOverflow(tensor.shape.clone()))?;
    let expected = count
        .checked_mul(size)
        .ok_or_else(|| TensorError::ShapeOverflow(tensor.shape.clone()))?;
    if bytes != expected {
        return Err(TensorError::ByteLength {
            shape: tensor.shape.clone(),
            dtype: dtype.as_str_name(),
            expected,
            got: bytes,
        });
    }
    Ok((dtype, shape))
}

/// The f32 values of little-endian `bytes` of element type `dtype` (a whole number of
/// elements, as [`layout`] checks); `Unspecified` is read as f32.
pub fn values(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 | Dtype::Unspecified => f32_from_le_bytes(bytes),
        Dtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whole buffers, sliced arrays (an offset into their buffer) and transposed ones all
    /// give the bytes of [`encode`] of their C-order values, with their shape.
    #[test]
    fn encode_array_is_encode_of_the_c_order_values() {
        let a = ndarray::Array3::from_shape_fn((3, 4, 5), |(i, j, k)| {
            (i * 20 + j * 5 + k) as f32 * 0.25 - 3.0
        });
        let sliced = a.slice(ndarray::s![1.., .., ..]).to_owned();
        let offset = {
            let mut b = a.clone();
            b.slice_collapse(ndarray::s![1.., .., ..]);
            b
        };
        let transposed = a.clone().reversed_axes();
        for (what, arr) in [
            ("whole", a.clone()),
            ("sliced copy", sliced),
            ("offset", offset),
            ("transposed", transposed),
        ] {
            let c_order: Vec<f32> = arr.iter().copied().collect();
            let shape = arr.shape().to_vec();
            for dtype in [Dtype::F32, Dtype::Bf16] {
                let want = encode(&c_order, &shape, dtype);
                assert_eq!(encode_array(arr.clone(), dtype), want, "{what} {dtype:?}");
            }
        }
    }

    #[test]
    fn f32_round_trip_is_exact() {
        let v: Vec<f32> = (0..24).map(|i| (i as f32 - 7.5) * 0.37).collect();
        let t = encode(&v, &[2, 3, 4], Dtype::F32);
        assert_eq!(t.data.len(), 96);
        let (back, shape) = decode(&t).unwrap();
        assert_eq!(shape, vec![2, 3, 4]);
        assert_eq!(back, v);
    }

    /// The bulk copies give exactly the per-element little-endian bytes, also for
    /// unaligned input, NaN payloads, infinities and signed zeros.
    #[test]
    fn bulk_f32_coding_matches_the_element_wise_definition() {
        let v: Vec<f32> = vec![
            1.5,
            -0.0,
            f32::INFINITY,
            f32::from_bits(0x7fc0_1234),
            f32::MIN_POSITIVE / 2.0,
            -3.25e-7,
        ];
        let reference: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(f32_to_le_bytes(&v), reference);
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&reference);
        let back = f32_from_le_bytes(&shifted[1..]);
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }

    /// The zero-copy coding of owned values gives the same tensor as [`encode`] in every
    /// dtype (the bytes of special values included).
    #[test]
    fn owned_coding_equals_the_copying_one() {
        let v: Vec<f32> = vec![
            1.5,
            -0.0,
            f32::NEG_INFINITY,
            f32::from_bits(0x7fc0_1234),
            3.0,
        ];
        for dtype in [Dtype::F32, Dtype::Unspecified, Dtype::Bf16, Dtype::F16] {
            assert_eq!(encode_vec(v.clone(), &[5], dtype), encode(&v, &[5], dtype));
        }
    }

    #[test]
    fn half_precisions_round_within_their_epsilon() {
        let v: Vec<f32> = (1..100).map(|i| (i as f32).sqrt() * 0.01 - 0.03).collect();
        // Round-to-nearest: relative error ≤ 2^-(mantissa bits + 1).
        for (dtype, tol) in [(Dtype::Bf16, 2f32.powi(-8)), (Dtype::F16, 2f32.powi(-10))] {
            let t = encode(&v, &[v.len()], dtype);
            assert_eq!(t.data.len(), v.len() * 2);
            let (back, _) = decode(&t).unwrap();
            for (a, b) in v.iter().zip(&back) {
                assert!(
                    (a - b).abs() <= tol * a.abs() + 1e-7,
                    "{dtype:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn bad_tensors_are_named() {
        let mut t = encode(&[1.0, 2.0], &[2], Dtype::F32);
        t.shape = vec![3];
        let err = decode(&t).unwrap_err();
        assert!(err.to_string().contains("needs 12 bytes, got 8"), "{err}");
        t.dtype = 0;
        assert_eq!(decode(&t).unwrap_err(), TensorError::UnsupportedDtype(0));
    }
}
