//! [`B0Direction`]: the main-field direction expressed in voxel axes.
//!
//! The dipole kernel needs b̂, the unit vector of B0 in the coordinate system of the voxel
//! grid (axes i, j, k of the array). For a scan whose slices are not perpendicular to B0
//! (oblique acquisition) b̂ differs from (0, 0, 1). Following QSMxT (REFERENCE.md §4), it
//! is computed from the voxel-to-scanner affine A: take its 3×3 part, divide every column
//! by its norm (which removes the voxel size, so anisotropic voxels are handled), giving
//! R; then b̂ = Rᵀ·(0, 0, 1), normalised. The scanner z axis is the B0 axis (NIfTI scanner
//! coordinates, RAS+). b̂ and −b̂ give the same dipole kernel.

use crate::error::{Error, Result};
use crate::volume::Volume;

/// Unit vector of the B0 direction in voxel axes (i, j, k); always finite and of norm 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct B0Direction([f64; 3]);

impl B0Direction {
    /// B0 along the third voxel axis, (0, 0, 1): an axial acquisition without obliquity.
    pub const AXIAL: B0Direction = B0Direction([0.0, 0.0, 1.0]);

    /// An explicit direction in voxel axes, e.g. from a `"B0_dir"` sidecar key (QSMxT,
    /// qsm-forward). Normalised on return; errors if non-finite or (near) zero.
    pub fn new(direction: [f64; 3]) -> Result<Self> {
        if direction.iter().any(|v| !v.is_finite()) {
            return Err(Error::Parameter(format!(
                "B0 direction must be finite, got {direction:?}"
            )));
        }
        let norm = norm3(direction);
        if norm < 1e-12 {
            return Err(Error::Parameter(format!(
                "B0 direction must be nonzero, got {direction:?}"
            )));
        }
        Ok(Self(direction.map(|v| v / norm)))
    }

    /// The direction from a voxel-to-scanner affine (row-major 4×4, mm): b̂ = Rᵀ·ẑ with R
    /// the 3×3 part with unit columns (QSMxT). Errors on non-finite entries or a zero column.
    pub fn from_affine(affine: &[[f64; 4]; 4]) -> Result<Self> {
        let mut r = [[0.0f64; 3]; 3];
        for col in 0..3 {
            let c = [affine[0][col], affine[1][col], affine[2][col]];
            if c.iter().any(|v| !v.is_finite()) {
                return Err(Error::Parameter(format!(
                    "affine column {col} is not finite: {c:?}"
                )));
            }
            let n = norm3(c);
            if n < 1e-12 {
                return Err(Error::Parameter(format!(
                    "affine column {col} is zero: the voxel axes are degenerate"
                )));
            }
            for row in 0..3 {
                r[row][col] = c[row] / n;
            }
        }
        // Rᵀ·(0,0,1) is the third row of R.
        Self::new([r[2][0], r[2][1], r[2][2]])
            .map_err(|e| Error::Parameter(format!("affine gives no usable B0 direction ({e})")))
    }

    /// The direction implied by a volume's affine; see [`B0Direction::from_affine`].
    pub fn from_volume(volume: &Volume) -> Result<Self> {
        Self::from_affine(&volume.affine)
    }

    /// Components (unit norm) along voxel axes i, j, k.
    pub fn as_array(&self) -> [f64; 3] {
        self.0
    }

    /// Angle between B0 and the third voxel axis in degrees (0 for an axial scan; the
    /// sign of b̂ is irrelevant, so the result is in [0, 90]).
    pub fn obliquity_degrees(&self) -> f64 {
        self.0[2].abs().min(1.0).acos().to_degrees()
    }
}

impl Default for B0Direction {
    fn default() -> Self {
        Self::AXIAL
    }
}

fn norm3(v: [f64; 3]) -> f64 {
    (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: [f64; 3], b: [f64; 3], tol: f64) -> bool {
        a.iter().zip(b.iter()).all(|(x, y)| (x - y).abs() < tol)
    }

    #[test]
    fn explicit_direction_is_normalised_and_validated() {
        let b = B0Direction::new([0.0, 3.0, 4.0]).unwrap();
        assert!(close(b.as_array(), [0.0, 0.6, 0.8], 1e-15));
        assert!(B0Direction::new([0.0, 0.0, 0.0]).is_err());
        assert!(B0Direction::new([f64::NAN, 0.0, 1.0]).is_err());
        assert!(B0Direction::new([f64::INFINITY, 0.0, 1.0]).is_err());
        assert_eq!(B0Direction::default(), B0Direction::AXIAL);
    }

    /// A diagonal affine with anisotropic voxels gives (0, 0, 1): the column normalisation
    /// removes the voxel size (the QSMxT bug with anisotropic voxels would not).
    #[test]
    fn axial_anisotropic_affine() {
        let a = [
            [0.5, 0.0, 0.0, -10.0],
            [0.0, 0.7, 0.0, 3.0],
            [0.0, 0.0, 2.5, 1.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let b = B0Direction::from_affine(&a).unwrap();
        assert!(close(b.as_array(), [0.0, 0.0, 1.0], 1e-15));
        assert!(b.obliquity_degrees().abs() < 1e-6);
    }

    /// Voxel axes rotated by θ about the i axis: scanner z = cosθ·(voxel k) + sinθ·(voxel j)
    /// direction in voxel coordinates is Rᵀẑ = (0, sinθ, cosθ), independent of voxel size.
    #[test]
    fn rotated_affine_anisotropic() {
        let th: f64 = 20f64.to_radians();
        let (s, c) = th.sin_cos();
        let vox = [0.8, 1.2, 3.0];
        // R = rotation about x by θ: columns are the scanner directions of voxel axes.
        let r = [[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]];
        let mut a = [[0.0; 4]; 4];
        for row in 0..3 {
            for col in 0..3 {
                a[row][col] = r[row][col] * vox[col];
            }
        }
        a[3][3] = 1.0;
        let b = B0Direction::from_affine(&a).unwrap();
        assert!(close(b.as_array(), [0.0, s, c], 1e-12), "{:?}", b);
        assert!((b.obliquity_degrees() - 20.0).abs() < 1e-9);
    }

    #[test]
    fn degenerate_affine_is_an_error() {
        let mut a = [[0.0; 4]; 4];
        a[0][0] = 1.0;
        a[1][1] = 1.0;
        a[3][3] = 1.0;
        let e = B0Direction::from_affine(&a).unwrap_err().to_string();
        assert!(e.contains("column 2"), "{e}");
        a[2][2] = f64::NAN;
        assert!(B0Direction::from_affine(&a).is_err());
    }
}
