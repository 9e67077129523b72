//! Linear operators with adjoints, used as forward models A in DPS and in the baselines.
//!
//! Every operator maps a real 3D array of `input_shape()` to one of `output_shape()` and
//! provides its exact adjoint, checked by ⟨Ax, y⟩ = ⟨x, Aᵀy⟩ in the tests
//! ([`adjoint_mismatch`]). Inputs of the wrong shape give [`Error::Shape`].
//!
//! - [`Identity`], [`Mask`] (voxel-wise weights);
//! - [`DipoleConvolution`]: χ → local field (both ppm), circular or zero-padded;
//! - [`KSpaceDownsample`] (centred k-space crop) and [`BlockDownsample`] (block mean),
//!   whose adjoints ([`Adjoint`]) are the matching upsampling operators;
//! - [`Compose`]: a chain of boxed operators in application order, e.g.
//!   downsample ∘ mask ∘ dipole for SR-DipInv.
//!
//! Operators precompute their kernels and FFT plans at construction, so `apply` and
//! `adjoint` can be called at every diffusion step; they run in f32 and use all rayon
//! threads.

use crate::error::{Error, Result};
use ndarray::Array3;
use std::sync::Arc;

pub mod dipole;
pub mod mask;
pub mod resample;

pub use dipole::DipoleConvolution;
pub use mask::{Identity, Mask};
pub use resample::{BlockDownsample, KSpaceDownsample};

/// Sinc upsampling (k-space zero-fill), the exact adjoint of [`KSpaceDownsample`]; for the
/// constant-preserving interpolation use [`KSpaceDownsample::upsample`].
pub type KSpaceUpsample = Adjoint<KSpaceDownsample>;

/// Block replication divided by the block size, the exact adjoint of
/// [`BlockDownsample`]; for plain replication use [`BlockDownsample::upsample`].
pub type BlockUpsample = Adjoint<BlockDownsample>;

/// A real linear map between 3D arrays with its adjoint.
pub trait LinearOperator: Send + Sync {
    /// Shape of x in y = A x.
    fn input_shape(&self) -> [usize; 3];
    /// Shape of y in y = A x.
    fn output_shape(&self) -> [usize; 3];
    /// y = A x. Errors if `x` does not have `input_shape()`.
    fn apply(&self, x: &Array3<f32>) -> Result<Array3<f32>>;
    /// x = Aᵀ y. Errors if `y` does not have `output_shape()`.
    fn adjoint(&self, y: &Array3<f32>) -> Result<Array3<f32>>;
    /// Whether A x = x for every x (so A and Aᵀ may be skipped): lets the sampler fold
    /// the DPS gradient into its one pass over the volume. False unless an operator
    /// says otherwise.
    fn is_identity(&self) -> bool {
        false
    }
}

impl<T: LinearOperator + ?Sized> LinearOperator for Box<T> {
    fn input_shape(&self) -> [usize; 3] {
        (**self).input_shape()
    }
    fn output_shape(&self) -> [usize; 3] {
        (**self).output_shape()
    }
    fn apply(&self, x: &Array3<f32>) -> Result<Array3<f32>> {
        (**self).apply(x)
    }
    fn adjoint(&self, y: &Array3<f32>) -> Result<Array3<f32>> {
        (**self).adjoint(y)
    }
    fn is_identity(&self) -> bool {
        (**self).is_identity()
    }
}

impl<T: LinearOperator + ?Sized> LinearOperator for Arc<T> {
    fn input_shape(&self) -> [usize; 3] {
        (**self).input_shape()
    }
    fn output_shape(&self) -> [usize; 3] {
        (**self).output_shape()
    }
    fn apply(&self, x: &Array3<f32>) -> Result<Array3<f32>> {
        (**self).apply(x)
    }
    fn adjoint(&self, y: &Array3<f32>) -> Result<Array3<f32>> {
        (**self).adjoint(y)
    }
    fn is_identity(&self) -> bool {
        (**self).is_identity()
    }
}

/// Errors with [`Error::Shape`] unless `x` has shape `expected`; `what` names the input.
pub fn check_shape(x: &Array3<f32>, expected: [usize; 3], what: &str) -> Result<()> {
    if x.shape() != expected {
        return Err(Error::Shape(format!(
            "{what}: got shape {:?}, expected {expected:?}",
            x.shape()
        )));
    }
    Ok(())
}

/// The adjoint Aᵀ of an operator, itself an operator (e.g. upsampling as the adjoint of
/// downsampling). `Adjoint(Adjoint(a))` behaves as `a`.
#[derive(Debug, Clone)]
pub struct Adjoint<T>(pub T);

impl<T: LinearOperator> LinearOperator for Adjoint<T> {
    fn input_shape(&self) -> [usize; 3] {
        self.0.output_shape()
    }
    fn output_shape(&self) -> [usize; 3] {
        self.0.input_shape()
    }
    fn apply(&self, x: &Array3<f32>) -> Result<Array3<f32>> {
        self.0.adjoint(x)
    }
    fn adjoint(&self, y: &Array3<f32>) -> Result<Array3<f32>> {
        self.0.apply(y)
    }
    fn is_identity(&self) -> bool {
        self.0.is_identity()
    }
}

/// A chain of operators in application order: `Compose::new(vec![a, b, c])` is
/// c ∘ b ∘ a (a applied first); its adjoint is aᵀ ∘ bᵀ ∘ cᵀ.
pub struct Compose {
    ops: Vec<Box<dyn LinearOperator>>,
}

impl std::fmt::Debug for Compose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compose")
            .field("stages", &self.ops.len())
            .field("input_shape", &self.input_shape())
            .field("output_shape", &self.output_shape())
            .finish()
    }
}

impl Compose {
    /// Chains `ops` (first applied first). Errors if `ops` is empty or if the output shape
    /// of one stage differs from the input shape of the next.
    pub fn new(ops: Vec<Box<dyn LinearOperator>>) -> Result<Self> {
        if ops.is_empty() {
            return Err(Error::Shape("cannot compose zero operators".to_string()));
        }
        for (k, w) in ops.windows(2).enumerate() {
            if w[0].output_shape() != w[1].input_shape() {
                return Err(Error::Shape(format!(
                    "composition stage {k} outputs {:?} but stage {} expects {:?}",
                    w[0].output_shape(),
                    k + 1,
                    w[1].input_shape()
                )));
            }
        }
        Ok(Self { ops })
    }

    /// The number of stages.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Always false: a composition has at least one stage.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

impl LinearOperator for Compose {
    fn input_shape(&self) -> [usize; 3] {
        self.ops.first().map_or([0; 3], |o| o.input_shape())
    }
    fn output_shape(&self) -> [usize; 3] {
        self.ops.last().map_or([0; 3], |o| o.output_shape())
    }
    fn apply(&self, x: &Array3<f32>) -> Result<Array3<f32>> {
        check_shape(x, self.input_shape(), "Compose input")?;
        let mut it = self.ops.iter();
        let mut y = match it.next() {
            Some(op) => op.apply(x)?,
            None => x.clone(),
        };
        for op in it {
            y = op.apply(&y)?;
        }
        Ok(y)
    }
    fn adjoint(&self, y: &Array3<f32>) -> Result<Array3<f32>> {
        check_shape(y, self.output_shape(), "Compose adjoint input")?;
        let mut it = self.ops.iter().rev();
        let mut x = match it.next() {
            Some(op) => op.adjoint(y)?,
            None => y.clone(),
        };
        for op in it {
            x = op.adjoint(&x)?;
        }
        Ok(x)
    }
    fn is_identity(&self) -> bool {
        self.ops.iter().all(|o| o.is_identity())
    }
}

/// Relative adjoint mismatch |⟨Ax, y⟩ − ⟨x, Aᵀy⟩| / max(|⟨Ax, y⟩|, |⟨x, Aᵀy⟩|) for
/// standard-normal x and y drawn from `seed` (inner products accumulated in f64).
/// An exact adjoint gives ~1e-7 in f32.
pub fn adjoint_mismatch(op: &dyn LinearOperator, seed: u64) -> Result<f64> {
    let x = crate::simulate::standard_normal(op.input_shape(), seed);
    let y = crate::simulate::standard_normal(op.output_shape(), seed ^ 0x5EED_0000_0000_0001);
    let ax = op.apply(&x)?;
    let aty = op.adjoint(&y)?;
    let dot = |a: &Array3<f32>, b: &Array3<f32>| -> f64 {
        a.iter()
            .zip(b.iter())
            .map(|(p, q)| *p as f64 * *q as f64)
            .sum()
    };
    let l = dot(&ax, &y);
    let r = dot(&x, &aty);
    let scale = l.abs().max(r.abs());
    Ok(if scale == 0.0 {
        0.0
    } else {
        (l - r).abs() / scale
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::B0Direction;

    /// Adjointness of every operator and composition, 1e-5 relative (see
    /// [`adjoint_mismatch`]; exact adjoints in f32 give ~1e-7, a wrong scale or a missing
    /// Nyquist term gives ≥1e-2).
    #[test]
    fn adjoint_identity_for_compositions() {
        let shape = [12, 10, 8];
        let mut w = Array3::zeros(shape);
        w.slice_mut(ndarray::s![2..10, 1..9, 1..7]).fill(1.0);
        let b0 = B0Direction::new([0.1, 0.2, 1.0]).unwrap();
        let dip =
            DipoleConvolution::new(shape, [1.0, 1.2, 1.5], b0, crate::fft::Padding::Fast).unwrap();
        let ops: Vec<Box<dyn LinearOperator>> = vec![
            Box::new(dip),
            Box::new(Mask::new(w).unwrap()),
            Box::new(KSpaceDownsample::new(shape, [2, 2, 2]).unwrap()),
        ];
        let c = Compose::new(ops).unwrap();
        assert_eq!(c.output_shape(), [6, 5, 4]);
        for seed in 0..3 {
            let m = adjoint_mismatch(&c, seed).unwrap();
            assert!(m < 1e-5, "seed {seed}: {m}");
        }
        let up: BlockUpsample = Adjoint(BlockDownsample::new(shape, [3, 2, 1]).unwrap());
        assert_eq!(up.input_shape(), [4, 5, 8]);
        assert!(adjoint_mismatch(&up, 1).unwrap() < 1e-5);
        let arc: Arc<dyn LinearOperator> = Arc::new(Identity::new(shape));
        assert!(adjoint_mismatch(&arc, 1).unwrap() < 1e-12);
    }

    #[test]
    fn composition_shapes_are_checked() {
        let ops: Vec<Box<dyn LinearOperator>> = vec![
            Box::new(BlockDownsample::new([8, 8, 8], [2, 2, 2]).unwrap()),
            Box::new(Identity::new([8, 8, 8])),
        ];
        let e = Compose::new(ops).unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "{e}");
        assert!(Compose::new(vec![]).is_err());
        let c = Compose::new(vec![
            Box::new(Identity::new([2, 3, 4])) as Box<dyn LinearOperator>
        ])
        .unwrap();
        assert!(matches!(
            c.apply(&Array3::zeros([2, 3, 5])),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            c.adjoint(&Array3::zeros([2, 3, 5])),
            Err(Error::Shape(_))
        ));
        assert_eq!(c.len(), 1);
    }
}
