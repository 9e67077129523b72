//! [`Identity`] and [`Mask`]: the trivial forward models (denoising, masked inpainting).

use super::{LinearOperator, check_shape};
use crate::error::{Error, Result};
use ndarray::Array3;
use ndarray::parallel::prelude::*;

/// The identity on arrays of a fixed shape (A = I, self-adjoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    shape: [usize; 3],
}

impl Identity {
    /// The identity on arrays of `shape`.
    pub fn new(shape: [usize; 3]) -> Self {
        Self { shape }
    }
}

impl LinearOperator for Identity {
    fn input_shape(&self) -> [usize; 3] {
        self.shape
    }
    fn output_shape(&self) -> [usize; 3] {
        self.shape
    }
    fn apply(&self, x: &Array3<f32>) -> Result<Array3<f32>> {
        check_shape(x, self.shape, "Identity input")?;
        Ok(x.clone())
    }
    fn adjoint(&self, y: &Array3<f32>) -> Result<Array3<f32>> {
        check_shape(y, self.shape, "Identity adjoint input")?;
        Ok(y.clone())
    }
    fn is_identity(&self) -> bool {
        true
    }
}

/// Voxel-wise multiplication by fixed weights w (A x = w ⊙ x, self-adjoint); a binary
/// brain mask is the usual case (1 inside, 0 outside).
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    weights: Array3<f32>,
}

impl Mask {
    /// A mask from weights (finite; 0/1 for a binary mask).
    pub fn new(weights: Array3<f32>) -> Result<Self> {
        crate::volume::check_finite(weights.view(), "mask weights")?;
        if weights.is_empty() {
            return Err(Error::Shape("mask must be nonempty".to_string()));
        }
        Ok(Self {
            weights: weights.as_standard_layout().into_owned(),
        })
    }

    /// A binary mask: 1 where `mask` is true, 0 elsewhere.
    pub fn from_bool(mask: &Array3<bool>) -> Result<Self> {
        Self::new(mask.mapv(|b| if b { 1.0 } else { 0.0 }))
    }

    /// The weights.
    pub fn weights(&self) -> &Array3<f32> {
        &self.weights
    }

    fn shape(&self) -> [usize; 3] {
        let s = self.weights.shape();
        [s[0], s[1], s[2]]
    }

    fn multiply(&self, x: &Array3<f32>) -> Array3<f32> {
        let mut out = x.as_standard_layout().into_owned();
        if let (Some(o), Some(w)) = (out.as_slice_mut(), self.weights.as_slice()) {
            o.par_iter_mut()
                .zip(w.par_iter())
                .for_each(|(o, w)| *o *= *w);
        } else {
            out.zip_mut_with(&self.weights, |o, w| *o *= *w);
        }
        out
    }
}

impl LinearOperator for Mask {
    fn input_shape(&self) -> [usize; 3] {
        self.shape()
    }
    fn output_shape(&self) -> [usize; 3] {
        self.shape()
    }
    fn apply(&self, x: &Array3<f32>) -> Result<Array3<f32>> {
        check_shape(x, self.shape(), "Mask input")?;
        Ok(self.multiply(x))
    }
    fn adjoint(&self, y: &Array3<f32>) -> Result<Array3<f32>> {
        check_shape(y, self.shape(), "Mask adjoint input")?;
        Ok(self.multiply(y))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operators::adjoint_mismatch;

    #[test]
    fn identity_and_mask() {
        let id = Identity::new([3, 4, 5]);
        let x = crate::simulate::standard_normal([3, 4, 5], 1);
        assert_eq!(id.apply(&x).unwrap(), x);
        assert!(adjoint_mismatch(&id, 2).unwrap() < 1e-12);
        let mut m = Array3::from_elem([3, 4, 5], false);
        m[[1, 2, 3]] = true;
        let mask = Mask::from_bool(&m).unwrap();
        let y = mask.apply(&x).unwrap();
        assert_eq!(y[[1, 2, 3]], x[[1, 2, 3]]);
        assert_eq!(y.iter().filter(|v| **v != 0.0).count(), 1);
        // Exact: both sides multiply the same f32 products (1e-6 for summation order).
        let w = crate::simulate::standard_normal([3, 4, 5], 9);
        assert!(adjoint_mismatch(&Mask::new(w).unwrap(), 3).unwrap() < 1e-6);
        assert!(matches!(
            id.apply(&Array3::zeros([3, 4, 4])),
            Err(Error::Shape(_))
        ));
        assert!(mask.adjoint(&Array3::zeros([1, 1, 1])).is_err());
        let mut bad = Array3::zeros([2, 2, 2]);
        bad[[0, 0, 0]] = f32::NAN;
        assert!(matches!(Mask::new(bad), Err(Error::NonFinite(_))));
    }
}
