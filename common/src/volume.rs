//! [`Volume`]: a 3D f32 image on a voxel grid with its physical geometry.

use ndarray::Array3;

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
}
