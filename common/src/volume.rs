//! [`Volume`]: a 3D f32 image on a voxel grid with its physical geometry.

use crate::error::{Error, Result};
use ndarray::{Array3, ArrayView3};
use rayon::prelude::*;

/// A 3D scalar image (χ in ppm, field in ppm, a mask, …) with its geometry.
///
/// `data` is indexed `[i, j, k]` along the NIfTI voxel axes. `voxel_size` is in mm.
/// `affine` maps voxel indices (i, j, k, 1) to scanner coordinates in mm (NIfTI
/// sform/qform convention, RAS+).
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    /// Voxel values, indexed along the NIfTI voxel axes.
    pub data: Array3<f32>,
    /// Voxel size in mm along each voxel axis.
    pub voxel_size: [f64; 3],
    /// Voxel-to-scanner affine in mm (row-major 4×4).
    pub affine: [[f64; 4]; 4],
}

impl Volume {
    /// A volume with an axis-aligned affine: diagonal voxel sizes, origin at voxel 0.
    pub fn new(data: Array3<f32>, voxel_size: [f64; 3]) -> Self {
        let mut affine = [[0.0; 4]; 4];
        for (a, v) in voxel_size.iter().enumerate() {
            affine[a][a] = *v;
        }
        affine[3][3] = 1.0;
        Self {
            data,
            voxel_size,
            affine,
        }
    }

    /// A volume with an explicit affine; `voxel_size` should match its column norms.
    pub fn with_affine(data: Array3<f32>, voxel_size: [f64; 3], affine: [[f64; 4]; 4]) -> Self {
        Self {
            data,
            voxel_size,
            affine,
        }
    }

    /// Matrix size `[nx, ny, nz]`.
    pub fn shape(&self) -> [usize; 3] {
        let s = self.data.shape();
        [s[0], s[1], s[2]]
    }

    /// A new volume on the same grid (voxel size and affine) holding `data`.
    pub fn like(&self, data: Array3<f32>) -> Self {
        Self {
            data,
            voxel_size: self.voxel_size,
            affine: self.affine,
        }
    }

    /// A zero-filled volume of `shape` with an axis-aligned affine (see [`Volume::new`]).
    pub fn zeros(shape: [usize; 3], voxel_size: [f64; 3]) -> Self {
        Self::new(Array3::zeros(shape), voxel_size)
    }

    /// Errors with [`Error::NonFinite`] (naming `name`, the number of NaN/±∞ voxels and the
    /// first one in C order) unless every voxel is finite.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        check_finite(self.data.view(), name)
    }

    /// Errors with [`Error::Parameter`] unless the voxel sizes are finite and positive, the
    /// affine is finite and every matrix dimension is nonzero.
    pub fn check_geometry(&self, name: &str) -> Result<()> {
        if self.voxel_size.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(Error::Parameter(format!(
                "{name}: voxel size must be finite and positive (mm), got {:?}",
                self.voxel_size
            )));
        }
        if self.affine.iter().flatten().any(|v| !v.is_finite()) {
            return Err(Error::Parameter(format!("{name}: affine is not finite")));
        }
        if self.shape().contains(&0) {
            return Err(Error::Shape(format!(
                "{name}: empty volume of shape {:?}",
                self.shape()
            )));
        }
        Ok(())
    }
}

/// Whether every value is finite: one branch-free pass, which the compiler vectorises
/// (an early exit per value would not be).
pub fn all_finite(values: &[f32]) -> bool {
    values.iter().fold(true, |ok, v| ok & v.is_finite())
}

/// Errors with [`Error::NonFinite`] (naming `name`, the count of NaN/±∞ values and the
/// index of the first in C order) unless every element of `data` is finite.
pub fn check_finite(data: ArrayView3<'_, f32>, name: &str) -> Result<()> {
    // Fast pass over contiguous memory for the common case; the counting pass below only
    // runs on failure (or for non-contiguous views).
    if let Some(sl) = data.as_slice_memory_order()
        && sl.par_chunks(1 << 16).all(all_finite)
    {
        return Ok(());
    }
    let mut count = 0usize;
    let mut first = None;
    for (idx, v) in data.indexed_iter() {
        if !v.is_finite() {
            if first.is_none() {
                first = Some(idx);
            }
            count += 1;
        }
    }
    match first {
        None => Ok(()),
        Some((i, j, k)) => Err(Error::NonFinite(format!(
            "{name}: {count} non-finite voxel(s), first at [{i}, {j}, {k}]"
        ))),
    }
}

/// Voxel sizes (mm) implied by an affine: the norms of its first three columns.
pub fn voxel_size_from_affine(affine: &[[f64; 4]; 4]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (col, o) in out.iter_mut().enumerate() {
        *o = (0..3)
            .map(|row| affine[row][col] * affine[row][col])
            .sum::<f64>()
            .sqrt();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finite_check_names_count_and_first_index() {
        let mut v = Volume::zeros([3, 4, 5], [1.0, 1.0, 2.0]);
        assert!(v.check_finite("chi").is_ok());
        v.data[[1, 2, 3]] = f32::NAN;
        v.data[[2, 0, 0]] = f32::INFINITY;
        let e = v.check_finite("chi").unwrap_err();
        assert!(matches!(e, Error::NonFinite(_)));
        let msg = e.to_string();
        assert!(
            msg.contains("chi") && msg.contains("2 non-finite") && msg.contains("[1, 2, 3]"),
            "{msg}"
        );
    }

    #[test]
    fn geometry_check_and_voxel_size() {
        let v = Volume::zeros([2, 2, 2], [0.5, 1.0, 2.0]);
        assert!(v.check_geometry("x").is_ok());
        assert_eq!(voxel_size_from_affine(&v.affine), [0.5, 1.0, 2.0]);
        let mut w = v.clone();
        w.voxel_size[1] = 0.0;
        assert!(w.check_geometry("x").is_err());
        let e = Volume::zeros([0, 2, 2], [1.0; 3])
            .check_geometry("y")
            .unwrap_err();
        assert!(matches!(e, Error::Shape(_)));
    }
}
