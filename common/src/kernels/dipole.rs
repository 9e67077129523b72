//! [`DipoleKernel`]: the unit dipole response in k-space.
//!
//! The local field (ppm) of a susceptibility map χ (ppm) is δB/B0 = F⁻¹[D · F χ] with
//!
//! D(k) = 1/3 − (k·b̂)² / |k|²,
//!
//! b̂ the unit B0 direction in voxel axes ([`B0Direction`]) and k the spatial frequency in
//! cycles/mm: on an axis of n voxels of size Δ (mm), index q stands for
//! [`fftfreq`](crate::fft::fftfreq)(n)\[q\] / Δ. Anisotropic voxels therefore change the
//! direction of k, not only its length. The 1/3 term is the Lorentz-sphere correction
//! (REFERENCE.md §4).
//!
//! Conventions, both tested below:
//! - **D(0) = 0** (as QSM.rs and QSM.jl; SEPIA and qsm-forward use 1/3): a local field has
//!   no DC term, so a constant offset of χ produces no field and inversions return χ up
//!   to an unknown constant. This also makes padding with a constant equivalent to
//!   zero-padding after subtracting that constant.
//! - **Nyquist planes are symmetrised.** On an axis of even length the index n/2 stands
//!   for both +½ and −½ cycles/voxel. With oblique B0, D(k) differs between the two
//!   (through cross terms kᵢ·kⱼ·bᵢ·bⱼ), which would make the filter non-Hermitian and the
//!   convolution of a real map complex. We use the average of the two signs, which
//!   amounts to D = 1/3 − (P² + Q²)/|k|² where P sums kᵢbᵢ over the non-Nyquist axes and
//!   Q over the Nyquist axes. This is exactly what Re(ifftn(D·fftn(χ))) does implicitly,
//!   and it keeps the dipole convolution real and self-adjoint. Off the Nyquist planes
//!   (and for B0 along a voxel axis everywhere) D is the closed form.

use crate::error::{Error, Result};
use crate::fft::fftfreq;
use crate::geometry::B0Direction;
use ndarray::Array3;
use ndarray::parallel::prelude::*;

/// The dipole kernel D(k) sampled on the FFT grid of a `shape` volume with `voxel_size`
/// (mm) and B0 direction `b0`. See the module documentation for conventions.
#[derive(Debug, Clone)]
pub struct DipoleKernel {
    shape: [usize; 3],
    voxel_size: [f64; 3],
    b0: B0Direction,
    /// Per axis: kₐ (cycles/mm) at every index.
    k: [Vec<f64>; 3],
    /// Per axis: whether the index is the (ambiguous) Nyquist index of an even axis.
    nyquist: [Vec<bool>; 3],
}

impl DipoleKernel {
    /// The kernel for a `shape` grid (every axis ≥ 1) of `voxel_size` mm voxels (finite,
    /// > 0) and B0 direction `b0`.
    pub fn new(shape: [usize; 3], voxel_size: [f64; 3], b0: B0Direction) -> Result<Self> {
        if shape.contains(&0) {
            return Err(Error::Shape(format!(
                "dipole kernel grid must be nonempty, got {shape:?}"
            )));
        }
        if voxel_size.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(Error::Parameter(format!(
                "voxel size must be finite and positive (mm), got {voxel_size:?}"
            )));
        }
        let k = [0, 1, 2].map(|a| {
            fftfreq(shape[a])
                .into_iter()
                .map(|f| f / voxel_size[a])
                .collect::<Vec<_>>()
        });
        let nyquist = [0, 1, 2].map(|a| {
            (0..shape[a])
                .map(|q| shape[a].is_multiple_of(2) && q == shape[a] / 2)
                .collect()
        });
        Ok(Self {
            shape,
            voxel_size,
            b0,
            k,
            nyquist,
        })
    }

    /// The grid shape.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// The voxel size in mm.
    pub fn voxel_size(&self) -> [f64; 3] {
        self.voxel_size
    }

    /// The B0 direction.
    pub fn b0(&self) -> B0Direction {
        self.b0
    }

    /// The closed form 1/3 − (k·b̂)²/|k|² at frequency `k` (any unit) for a unit `b0`;
    /// 0 at k = 0 (our D(0) convention).
    pub fn closed_form(k: [f64; 3], b0: [f64; 3]) -> f64 {
        let k2 = k[0] * k[0] + k[1] * k[1] + k[2] * k[2];
        if k2 == 0.0 {
            return 0.0;
        }
        let kb = k[0] * b0[0] + k[1] * b0[1] + k[2] * b0[2];
        1.0 / 3.0 - kb * kb / k2
    }

    /// D at grid index (i, j, l) of the full spectrum (Nyquist planes symmetrised).
    /// Indices must be inside [`DipoleKernel::shape`] (panics otherwise, like slicing).
    #[inline]
    pub fn value(&self, i: usize, j: usize, l: usize) -> f64 {
        let b = self.b0.as_array();
        let idx = [i, j, l];
        let mut p = 0.0;
        let mut q = 0.0;
        let mut k2 = 0.0;
        for a in 0..3 {
            let ka = self.k[a][idx[a]];
            k2 += ka * ka;
            if self.nyquist[a][idx[a]] {
                q += ka * b[a];
            } else {
                p += ka * b[a];
            }
        }
        if k2 == 0.0 {
            0.0
        } else {
            1.0 / 3.0 - (p * p + q * q) / k2
        }
    }

    /// Writes `f(i, D(i, j, l))` for every i along axis 0 into `out` (whose length must be
    /// n0): the line form used by fused convolutions
    /// ([`RealFft3::convolve_lines`](crate::fft::RealFft3::convolve_lines)). The values
    /// are bit-identical to [`DipoleKernel::value`].
    pub fn line_map<T>(&self, j: usize, l: usize, out: &mut [T], f: impl Fn(usize, f64) -> T) {
        let b = self.b0.as_array();
        let split = |a: usize, idx: usize| {
            let t = self.k[a][idx] * b[a];
            if self.nyquist[a][idx] {
                (0.0, t)
            } else {
                (t, 0.0)
            }
        };
        let (py, qy) = split(1, j);
        let (pz, qz) = split(2, l);
        let ky2 = self.k[1][j] * self.k[1][j];
        let kz2 = self.k[2][l] * self.k[2][l];
        for (i, o) in out.iter_mut().enumerate() {
            let kx = self.k[0][i];
            let (px, qx) = split(0, i);
            let p = px + py + pz;
            let q = qx + qy + qz;
            let k2 = kx * kx + ky2 + kz2;
            let d = if k2 == 0.0 {
                0.0
            } else {
                1.0 / 3.0 - (p * p + q * q) / k2
            };
            *o = f(i, d);
        }
    }

    /// D on the full grid `[n0, n1, n2]` as f32.
    pub fn full(&self) -> Array3<f32> {
        self.sample(self.shape[2])
    }

    /// D on the half spectrum `[n0, n1, n2/2 + 1]` used by real-to-complex FFTs
    /// ([`RealFft3`](crate::fft::RealFft3)).
    pub fn half_spectrum(&self) -> Array3<f32> {
        self.sample(self.shape[2] / 2 + 1)
    }

    fn sample(&self, n2: usize) -> Array3<f32> {
        let mut out = Array3::zeros([self.shape[0], self.shape[1], n2]);
        out.axis_iter_mut(ndarray::Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each(|(i, mut slab)| {
                for ((j, l), v) in slab.indexed_iter_mut() {
                    *v = self.value(i, j, l) as f32;
                }
            });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oblique() -> B0Direction {
        B0Direction::new([0.2, -0.3, 0.9]).unwrap()
    }

    /// Off the Nyquist planes the kernel is the closed form at k = fftfreq/Δ (1e-15:
    /// identical arithmetic up to summation order).
    #[test]
    fn values_match_closed_form_with_oblique_b0_and_anisotropic_voxels() {
        let shape = [8, 10, 9];
        let vox = [1.0, 1.5, 2.0];
        let b0 = oblique();
        let d = DipoleKernel::new(shape, vox, b0).unwrap();
        for &(i, j, l) in &[(1, 2, 3), (7, 9, 8), (3, 0, 0), (0, 6, 4), (2, 7, 5)] {
            let k = [
                fftfreq(8)[i] / vox[0],
                fftfreq(10)[j] / vox[1],
                fftfreq(9)[l] / vox[2],
            ];
            let expect = DipoleKernel::closed_form(k, b0.as_array());
            assert!((d.value(i, j, l) - expect).abs() < 1e-15, "({i},{j},{l})");
        }
        // Hand-computed: index (1, 2, 3) → k = (1/8, 2/15, 1/6) cycles/mm.
        let k = [0.125, 2.0 / 15.0, 1.0 / 6.0];
        let b = b0.as_array();
        let kb = k[0] * b[0] + k[1] * b[1] + k[2] * b[2];
        let k2 = k[0] * k[0] + k[1] * k[1] + k[2] * k[2];
        assert!((d.value(1, 2, 3) - (1.0 / 3.0 - kb * kb / k2)).abs() < 1e-15);
    }

    /// D(0) = 0; k ⟂ b̂ gives 1/3 and k ∥ b̂ gives −2/3 (also for oblique b̂ along a grid
    /// diagonal); the range is [−2/3, 1/3].
    #[test]
    fn special_values() {
        let d = DipoleKernel::new([8, 8, 8], [1.0; 3], B0Direction::AXIAL).unwrap();
        assert_eq!(d.value(0, 0, 0), 0.0);
        assert!((d.value(1, 0, 0) - 1.0 / 3.0).abs() < 1e-15);
        assert!((d.value(0, 3, 0) - 1.0 / 3.0).abs() < 1e-15);
        assert!((d.value(0, 0, 2) + 2.0 / 3.0).abs() < 1e-15);
        let diag = B0Direction::new([1.0, 1.0, 0.0]).unwrap();
        let d = DipoleKernel::new([8, 8, 8], [1.0; 3], diag).unwrap();
        assert!((d.value(1, 1, 0) + 2.0 / 3.0).abs() < 1e-15);
        assert!((d.value(1, 7, 0) - 1.0 / 3.0).abs() < 1e-15);
        let full = d.full();
        assert!(
            full.iter()
                .all(|&v| (-2.0 / 3.0 - 1e-6..=1.0 / 3.0 + 1e-6).contains(&v))
        );
    }

    /// Nyquist planes hold the average of the closed form over both signs of the
    /// Nyquist component, so D(q) = D(−q mod n) on the whole grid (Hermitian), even with
    /// oblique B0; for axial B0 no averaging is needed.
    #[test]
    fn nyquist_symmetrisation_and_hermitian_symmetry() {
        let shape = [6, 4, 5];
        let vox = [0.8, 1.0, 1.7];
        let b0 = oblique();
        let d = DipoleKernel::new(shape, vox, b0).unwrap();
        // (3, 1, 2): axis 0 at Nyquist → average of kx = ±1/2 cycles/voxel.
        let k = |kx: f64| [kx / vox[0], 0.25 / vox[1], 0.4 / vox[2]];
        let avg = 0.5
            * (DipoleKernel::closed_form(k(-0.5), b0.as_array())
                + DipoleKernel::closed_form(k(0.5), b0.as_array()));
        assert!((d.value(3, 1, 2) - avg).abs() < 1e-15);
        for i in 0..6 {
            for j in 0..4 {
                for l in 0..5 {
                    let m = d.value((6 - i) % 6, (4 - j) % 4, (5 - l) % 5);
                    assert!((d.value(i, j, l) - m).abs() < 1e-15, "({i},{j},{l})");
                }
            }
        }
        let ax = DipoleKernel::new(shape, vox, B0Direction::AXIAL).unwrap();
        let kk = [-0.5 / vox[0], 0.25 / vox[1], 0.4 / vox[2]];
        assert!((ax.value(3, 1, 2) - DipoleKernel::closed_form(kk, [0.0, 0.0, 1.0])).abs() < 1e-15);
    }

    /// The line form gives exactly the pointwise values (same arithmetic order).
    #[test]
    fn line_map_equals_value() {
        let d = DipoleKernel::new([6, 5, 8], [0.9, 1.0, 1.3], oblique()).unwrap();
        let mut line = vec![0.0f64; 6];
        for j in 0..5 {
            for l in 0..8 {
                d.line_map(j, l, &mut line, |_, v| v);
                for (i, v) in line.iter().enumerate() {
                    assert_eq!(*v, d.value(i, j, l), "({i},{j},{l})");
                }
            }
        }
    }

    #[test]
    fn half_spectrum_is_the_first_half_of_full() {
        let d = DipoleKernel::new([4, 6, 7], [1.0, 1.0, 1.2], oblique()).unwrap();
        let full = d.full();
        let half = d.half_spectrum();
        assert_eq!(half.shape(), &[4, 6, 4]);
        assert_eq!(half, full.slice(ndarray::s![.., .., ..4]));
    }

    #[test]
    fn invalid_inputs() {
        assert!(DipoleKernel::new([0, 4, 4], [1.0; 3], B0Direction::AXIAL).is_err());
        assert!(DipoleKernel::new([4, 4, 4], [1.0, 0.0, 1.0], B0Direction::AXIAL).is_err());
        assert!(DipoleKernel::new([4, 4, 4], [1.0, f64::NAN, 1.0], B0Direction::AXIAL).is_err());
    }
}
