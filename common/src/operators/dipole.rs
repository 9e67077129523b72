//! [`DipoleConvolution`]: χ (ppm) → local field (ppm) as a linear operator.

use super::{LinearOperator, check_shape};
use crate::error::{Error, Result};
use crate::fft::{Padding, RealFft3};
use crate::geometry::B0Direction;
use crate::kernels::DipoleKernel;
use ndarray::Array3;
use rayon::prelude::*;

/// The dipole convolution A x = crop(F⁻¹[D · F pad(x)]) with the [`DipoleKernel`]
/// (D(0) = 0, symmetrised Nyquist planes) on the grid chosen by a [`Padding`]:
/// [`Padding::None`] is the circular convolution on the volume's own grid; the other
/// variants zero-pad at the far end and crop back.
///
/// A is self-adjoint (D is real and even in k, and crop is the adjoint of zero-padding),
/// so `adjoint` = `apply`. The half-spectrum kernel is precomputed; each call runs one
/// real-to-complex and one complex-to-real 3D FFT in f32.
pub struct DipoleConvolution {
    shape: [usize; 3],
    kernel: Vec<f32>,
    fft: RealFft3<f32>,
    voxel_size: [f64; 3],
    b0: B0Direction,
}

impl std::fmt::Debug for DipoleConvolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DipoleConvolution")
            .field("shape", &self.shape)
            .field("grid", &self.fft.shape())
            .field("voxel_size", &self.voxel_size)
            .field("b0", &self.b0)
            .finish()
    }
}

impl DipoleConvolution {
    /// The operator for volumes of `shape` with `voxel_size` (mm) and B0 along `b0`.
    pub fn new(
        shape: [usize; 3],
        voxel_size: [f64; 3],
        b0: B0Direction,
        padding: Padding,
    ) -> Result<Self> {
        if shape.contains(&0) {
            return Err(Error::Shape(format!(
                "dipole convolution needs a nonempty shape, got {shape:?}"
            )));
        }
        let grid = padding.grid(shape)?;
        let k = DipoleKernel::new(grid, voxel_size, b0)?;
        let fft = RealFft3::new(grid)?;
        // Half spectrum stored line by line along axis 0: index ((j·h) + l)·n0 + i.
        let [n0, n1, _] = grid;
        let h = fft.spectrum_shape()[2];
        let mut kernel = vec![0f32; n0 * n1 * h];
        kernel
            .par_chunks_mut(n0 * h)
            .enumerate()
            .for_each(|(j, plane)| {
                for (l, line) in plane.chunks_mut(n0).enumerate() {
                    k.line_map(j, l, line, |_, d| d as f32);
                }
            });
        Ok(Self {
            shape,
            kernel,
            fft,
            voxel_size,
            b0,
        })
    }

    /// The FFT grid (≥ the volume shape).
    pub fn grid_shape(&self) -> [usize; 3] {
        self.fft.shape()
    }

    /// The voxel size in mm.
    pub fn voxel_size(&self) -> [f64; 3] {
        self.voxel_size
    }

    /// The B0 direction.
    pub fn b0(&self) -> B0Direction {
        self.b0
    }

    fn convolve(&self, x: &Array3<f32>) -> Result<Array3<f32>> {
        let n0 = self.fft.shape()[0];
        let h = self.fft.spectrum_shape()[2];
        let k = &self.kernel;
        self.fft.convolve_lines(x.view(), self.shape, |j, l, out| {
            let start = (j * h + l) * n0;
            out.copy_from_slice(&k[start..start + n0]);
        })
    }
}

impl LinearOperator for DipoleConvolution {
    fn input_shape(&self) -> [usize; 3] {
        self.shape
    }
    fn output_shape(&self) -> [usize; 3] {
        self.shape
    }
    fn apply(&self, x: &Array3<f32>) -> Result<Array3<f32>> {
        check_shape(x, self.shape, "DipoleConvolution input")?;
        self.convolve(x)
    }
    fn adjoint(&self, y: &Array3<f32>) -> Result<Array3<f32>> {
        check_shape(y, self.shape, "DipoleConvolution adjoint input")?;
        self.convolve(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operators::adjoint_mismatch;
    use crate::simulate::{ForwardOptions, PadValue, forward_field_with, standard_normal};
    use crate::volume::Volume;

    /// Adjointness on odd and even shapes, circular and padded, oblique B0 (1e-5).
    #[test]
    fn adjoint_is_exact() {
        let b0 = B0Direction::new([0.3, 0.1, 0.9]).unwrap();
        for (shape, pad) in [
            ([9, 8, 7], Padding::None),
            ([10, 12, 6], Padding::None),
            ([9, 8, 7], Padding::Margin([3, 4, 5])),
            ([10, 11, 9], Padding::Factor(2.0)),
        ] {
            let op = DipoleConvolution::new(shape, [1.0, 0.9, 1.4], b0, pad).unwrap();
            let m = adjoint_mismatch(&op, 11).unwrap();
            assert!(m < 1e-5, "{shape:?} {pad:?}: {m}");
        }
    }

    /// The operator equals the forward simulation with zero padding on the same grid
    /// (two code paths sharing only the kernel), and a circular convolution of a single
    /// voxel at the origin gives the point-spread function F⁻¹D, which is even,
    /// PSF(r) = PSF(−r) (to 1e-7, f32 rounding), and sums to D(0) = 0.
    #[test]
    fn matches_simulation_and_psf_is_symmetric() {
        let shape = [10, 9, 8];
        let vox = [1.0, 1.0, 2.0];
        let b0 = B0Direction::new([0.0, 0.3, 1.0]).unwrap();
        let x = standard_normal(shape, 5);
        let op = DipoleConvolution::new(shape, vox, b0, Padding::Factor(2.0)).unwrap();
        let opts = ForwardOptions {
            padding: Padding::Factor(2.0),
            pad_value: PadValue::Zero,
        };
        let sim = forward_field_with(&Volume::new(x.clone(), vox), b0, &opts).unwrap();
        let d = (&op.apply(&x).unwrap() - &sim.data)
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(d < 1e-6, "{d}");

        let circ = DipoleConvolution::new(shape, vox, b0, Padding::None).unwrap();
        let mut delta = Array3::zeros(shape);
        delta[[0, 0, 0]] = 1.0;
        let psf = circ.apply(&delta).unwrap();
        for ((i, j, l), v) in psf.indexed_iter() {
            let m = psf[[(10 - i) % 10, (9 - j) % 9, (8 - l) % 8]];
            assert!((v - m).abs() < 1e-7, "({i},{j},{l})");
        }
        // Sum of the PSF is D(0) = 0.
        assert!(psf.sum().abs() < 1e-6);
    }

    #[test]
    fn shape_errors() {
        let op =
            DipoleConvolution::new([4, 4, 4], [1.0; 3], B0Direction::AXIAL, Padding::None).unwrap();
        assert!(matches!(
            op.apply(&Array3::zeros([4, 4, 5])),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            op.adjoint(&Array3::zeros([4, 4, 5])),
            Err(Error::Shape(_))
        ));
        assert!(
            DipoleConvolution::new([0, 4, 4], [1.0; 3], B0Direction::AXIAL, Padding::None).is_err()
        );
        assert!(
            DipoleConvolution::new(
                [4, 4, 4],
                [1.0, 0.0, 1.0],
                B0Direction::AXIAL,
                Padding::None
            )
            .is_err()
        );
        assert_eq!(op.grid_shape(), [4, 4, 4]);
    }
}
