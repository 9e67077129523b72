//! Smooth, seeded random fields defined in physical (anatomy) millimetres.
//!
//! A field is a random-phase sum of K plane waves,
//! n(p) = sqrt(2/K) · Σₘ cos(kₘ·p + φₘ), with isotropic random directions and wavelengths
//! drawn log-uniformly in [λ_min, λ_max]. Each term has variance 1/2 over its random phase,
//! so n has zero mean and unit variance whatever the grid, and it is approximately Gaussian
//! for K ≳ 16. Because it is defined in mm, any matrix or voxel size samples the same field.
//!
//! On an axis-aligned grid the exponentials factor per axis,
//! e^{i(k·p+φ)} = e^{i(kₓx+φ)} · e^{i k_y y} · e^{i k_z z}, so a voxel costs two complex
//! products per mode once per-axis tables are built ([`GridNoise`]).

use super::random::Rng;

/// A smooth random field: plane-wave modes with wave vectors in rad/mm.
#[derive(Debug, Clone)]
pub(crate) struct SmoothNoise {
    /// Wave vectors (rad/mm).
    k: Vec<[f64; 3]>,
    /// Phases (rad).
    phase: Vec<f64>,
}

impl SmoothNoise {
    /// `modes` plane waves with wavelengths log-uniform in [`lambda_min`, `lambda_max`] mm.
    pub(crate) fn new(rng: &mut Rng, modes: usize, lambda_min: f64, lambda_max: f64) -> Self {
        let mut k = Vec::with_capacity(modes);
        let mut phase = Vec::with_capacity(modes);
        for _ in 0..modes {
            let lambda = (lambda_min.ln() + rng.uniform() * (lambda_max / lambda_min).ln()).exp();
            let dir = rng.unit_vector();
            let kn = std::f64::consts::TAU / lambda;
            k.push([dir[0] * kn, dir[1] * kn, dir[2] * kn]);
            phase.push(rng.range(0.0, std::f64::consts::TAU));
        }
        Self { k, phase }
    }

    /// Root-mean-square wavenumber (rad/mm); the RMS gradient of the unit-variance field.
    pub(crate) fn k_rms(&self) -> f64 {
        if self.k.is_empty() {
            return 0.0;
        }
        let s: f64 = self
            .k
            .iter()
            .map(|k| k[0] * k[0] + k[1] * k[1] + k[2] * k[2])
            .sum();
        (s / self.k.len() as f64).sqrt()
    }

    /// The field at a point (mm).
    #[cfg(test)]
    pub(crate) fn at(&self, p: [f64; 3]) -> f64 {
        if self.k.is_empty() {
            return 0.0;
        }
        let amp = (2.0 / self.k.len() as f64).sqrt();
        let s: f64 = self
            .k
            .iter()
            .zip(&self.phase)
            .map(|(k, ph)| (k[0] * p[0] + k[1] * p[1] + k[2] * p[2] + ph).cos())
            .sum();
        amp * s
    }

    /// The field and its gradient (per mm) at a point (mm).
    pub(crate) fn value_and_gradient(&self, p: [f64; 3]) -> (f64, [f64; 3]) {
        if self.k.is_empty() {
            return (0.0, [0.0; 3]);
        }
        let amp = (2.0 / self.k.len() as f64).sqrt();
        let mut v = 0.0;
        let mut g = [0.0; 3];
        for (k, ph) in self.k.iter().zip(&self.phase) {
            let (s, c) = (k[0] * p[0] + k[1] * p[1] + k[2] * p[2] + ph).sin_cos();
            v += c;
            for a in 0..3 {
                g[a] -= s * k[a];
            }
        }
        (amp * v, g.map(|x| amp * x))
    }

    /// Per-axis tables for the grid whose voxel centres lie at `axes[a][i]` (mm).
    pub(crate) fn on_grid(&self, axes: &[Vec<f64>; 3]) -> GridNoise {
        let modes = self.k.len();
        let table = |a: usize| -> Vec<[f64; 2]> {
            let mut t = Vec::with_capacity(axes[a].len() * modes);
            for &x in &axes[a] {
                for (m, k) in self.k.iter().enumerate() {
                    let arg = k[a] * x + if a == 0 { self.phase[m] } else { 0.0 };
                    let (s, c) = arg.sin_cos();
                    t.push([c, s]);
                }
            }
            t
        };
        GridNoise {
            modes,
            amp: if modes == 0 {
                0.0
            } else {
                (2.0 / modes as f64).sqrt()
            },
            tables: [table(0), table(1), table(2)],
        }
    }
}

/// A [`SmoothNoise`] field tabulated on an axis-aligned grid.
#[derive(Debug, Clone)]
pub(crate) struct GridNoise {
    modes: usize,
    amp: f64,
    /// Per axis, `[index * modes + m]` = (cos, sin) of the mode's phase along that axis.
    tables: [Vec<[f64; 2]>; 3],
}

impl GridNoise {
    /// The field at voxel `[i, j, k]`.
    #[inline]
    pub(crate) fn at(&self, i: usize, j: usize, k: usize) -> f64 {
        let m = self.modes;
        let tx = &self.tables[0][i * m..(i + 1) * m];
        let ty = &self.tables[1][j * m..(j + 1) * m];
        let tz = &self.tables[2][k * m..(k + 1) * m];
        let mut s = 0.0;
        for ((a, b), c) in tx.iter().zip(ty).zip(tz) {
            let re = a[0] * b[0] - a[1] * b[1];
            let im = a[0] * b[1] + a[1] * b[0];
            s += re * c[0] - im * c[1];
        }
        s * self.amp
    }
}

#[cfg(test)]
mod tests {
    use super::super::random::Stream;
    use super::*;

    #[test]
    fn grid_tables_match_direct_evaluation() {
        // The factorised evaluation is the same sum reordered: agreement to 1e-12 (f64
        // rounding of ~100 terms of size ≤ 1).
        let mut rng = Rng::new(3, Stream::Fields);
        let f = SmoothNoise::new(&mut rng, 24, 5.0, 50.0);
        let axes = [
            vec![-3.0, 0.5, 7.25],
            vec![1.0, -2.0],
            vec![0.0, 11.0, -4.5, 2.0],
        ];
        let g = f.on_grid(&axes);
        for (i, &x) in axes[0].iter().enumerate() {
            for (j, &y) in axes[1].iter().enumerate() {
                for (k, &z) in axes[2].iter().enumerate() {
                    let d = f.at([x, y, z]);
                    assert!((g.at(i, j, k) - d).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        // Central differences with h = 1e-4 mm have truncation error O(h² k³) ≈ 1e-8 for
        // k ≤ 2π/5 mm⁻¹, plus rounding ~1e-16/h = 1e-12; 1e-6 is a safe bound.
        let mut rng = Rng::new(5, Stream::Fields);
        let f = SmoothNoise::new(&mut rng, 16, 5.0, 40.0);
        let p = [3.0, -7.5, 12.25];
        let (v, g) = f.value_and_gradient(p);
        assert!((v - f.at(p)).abs() < 1e-12);
        let h = 1e-4;
        for a in 0..3 {
            let mut lo = p;
            let mut hi = p;
            lo[a] -= h;
            hi[a] += h;
            let fd = (f.at(hi) - f.at(lo)) / (2.0 * h);
            assert!((fd - g[a]).abs() < 1e-6, "axis {a}: {fd} vs {}", g[a]);
        }
    }

    #[test]
    fn unit_variance_over_space() {
        // Sampled on a 2 mm lattice over a 200 mm cube (~10 wavelengths across), the
        // spatial mean is ~0 and variance ~1; with 32 modes the realisation's spatial
        // variance departs from 1 by O(1/sqrt(K)) at most, so 0.35 is allowed.
        let mut rng = Rng::new(11, Stream::Fields);
        let f = SmoothNoise::new(&mut rng, 32, 8.0, 30.0);
        let mut s = 0.0;
        let mut s2 = 0.0;
        let mut n = 0.0;
        for i in 0..100 {
            for j in 0..100 {
                for k in (0..100).step_by(10) {
                    let v = f.at([i as f64 * 2.0, j as f64 * 2.0, k as f64 * 2.0]);
                    s += v;
                    s2 += v * v;
                    n += 1.0;
                }
            }
        }
        let mean = s / n;
        let var = s2 / n - mean * mean;
        assert!(mean.abs() < 0.15, "mean {mean}");
        assert!((var - 1.0).abs() < 0.35, "variance {var}");
    }
}
