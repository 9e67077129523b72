//! Linear operators with adjoints, used as forward models A in DPS and in the baselines.
//!
//! Every operator maps a real 3D array of `input_shape()` to one of `output_shape()` and
//! provides its exact adjoint, checked by ⟨Ax, y⟩ = ⟨x, Aᵀy⟩ in the tests.

use crate::error::Result;
use ndarray::Array3;

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
}
