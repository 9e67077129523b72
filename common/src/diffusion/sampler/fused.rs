//! The whole step of an identity forward model (A = I, the `dipinv` task on its TKD
//! estimate) in two passes over the volume, where the general path takes about a dozen.
//!
//! With A = I the DPS gradient is voxel-wise, g = −M_y(y − x̂_0)/‖r‖ on the output
//! region, so nothing needs to be materialised: a first pass forms x̂_0 on the fly and
//! sums the residual r², a second forms x̂_0 again and writes the next state
//! x_{t−1} = √ᾱ_prev x̂_0 + c_ε ε̂ + σ z − ξ g/√ᾱ (DDIM eq. 12 with the DPS correction,
//! [`Guidance::Approx`](super::Guidance::Approx)) and checks that it is finite.
//!
//! Every value is computed by the same floating-point operations in the same order as
//! the general path (`denoise`, `dps_gradient`, padding, clamp mask, `finish_step`): the
//! residual's sum keeps [`sum_squares`](super::sum_squares)' chunks of the cropped
//! volume, and g keeps its f32 product with `(−1/‖r‖) as f32`. So the two paths give
//! bitwise identical states (the sampler tests compare them).

use super::step::SUM_CHUNK;
use crate::diffusion::noise::NoiseStream;
use crate::diffusion::schedule::StepCoefficients;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::ops::Range;

/// The inputs of one fused step, all contiguous C-order slices.
pub(super) struct FusedStep<'a> {
    /// x_t over the padded volume (model units).
    pub state: &'a [f32],
    /// ε̂ over the padded volume.
    pub eps_hat: &'a [f32],
    /// Padded shape.
    pub padded: [usize; 3],
    /// Where the output volume lies in the padded one (the grid's crop region).
    pub region: [Range<usize>; 3],
    /// M_y ⊙ y·scale on the output grid, or `None` for an unguided step.
    pub data: Option<(&'a [f32], &'a [bool])>,
    /// The step's coefficients.
    pub coefficients: StepCoefficients,
    /// The x̂_0 clamp (model units).
    pub clamp: Option<(f32, f32)>,
    /// Fresh noise z of the step, when σ > 0.
    pub noise: Option<NoiseStream>,
    /// DPS step size ξ.
    pub xi: f64,
}

/// Voxels per row piece: the passes work on runs of at most this many voxels of one row,
/// in small stack buffers, so each stage is a plain loop the compiler vectorises.
const PIECE: usize = 256;

impl FusedStep<'_> {
    /// x̂_0 and the clamp mask of a run of voxels (as `denoise` computes them), into
    /// `x0` and `inside` (the run's length).
    #[inline(always)]
    fn x0_run(&self, x: &[f32], e: &[f32], x0: &mut [f32], inside: &mut [bool]) {
        let c = &self.coefficients;
        let (sa, s1a) = (c.sqrt_alpha_bar(), c.sqrt_one_minus_alpha_bar());
        let n = x0.len();
        let (x, e, inside) = (&x[..n], &e[..n], &mut inside[..n]);
        for k in 0..n {
            x0[k] = ((x[k] as f64 - s1a * e[k] as f64) / sa) as f32;
        }
        match self.clamp {
            None => inside.fill(true),
            Some((lo, hi)) => {
                for k in 0..n {
                    let v = x0[k];
                    inside[k] = v > lo && v < hi;
                    x0[k] = v.clamp(lo, hi);
                }
            }
        }
    }

    /// ‖M_y(y − x̂_0)‖ over the output region (model units), summed in the chunks of
    /// [`super::sum_squares`] over the cropped volume. `None` for an unguided step.
    pub fn residual_norm(&self) -> Option<f64> {
        let (y, m) = self.data?;
        let [rx, ry, rz] = &self.region;
        let (vy, vz) = (ry.len(), rz.len());
        let [_, ly, lz] = self.padded;
        let total = rx.len() * vy * vz;
        let partial: Vec<f64> = (0..total.div_ceil(SUM_CHUNK))
            .into_par_iter()
            .map(|c| {
                let (mut q, end) = (c * SUM_CHUNK, ((c + 1) * SUM_CHUNK).min(total));
                let mut acc = 0.0f64;
                let (mut x0, mut inside) = ([0.0f32; PIECE], [false; PIECE]);
                while q < end {
                    // One piece of the cropped row holding q.
                    let (row, k0) = (q / vz, q % vz);
                    let len = (vz - k0).min(end - q).min(PIECE);
                    let (i, j) = (row / vy + rx.start, row % vy + ry.start);
                    let p = (i * ly + j) * lz + rz.start + k0;
                    let x0 = &mut x0[..len];
                    self.x0_run(
                        &self.state[p..p + len],
                        &self.eps_hat[p..p + len],
                        x0,
                        &mut inside,
                    );
                    for ((&x0, &y), &m) in x0.iter().zip(&y[q..q + len]).zip(&m[q..q + len]) {
                        let r = if m { y - x0 } else { 0.0 };
                        acc += r as f64 * r as f64;
                    }
                    q += len;
                }
                acc
            })
            .collect();
        Some(partial.iter().sum::<f64>().sqrt())
    }

    /// Writes x_{t−1} into `next` (the padded length) with the DPS gradient of residual
    /// norm `norm` (`None`: unguided; `Some(0.0)`: a zero residual, g = 0). Errors with
    /// [`Error::NonFinite`] if a value is not finite (the caller words it).
    pub fn write_next(&self, norm: Option<f64>, next: &mut [f32]) -> Result<()> {
        let c = &self.coefficients;
        let (a, b, s) = (c.alpha_bar_prev.sqrt(), c.eps_coefficient(), c.sigma);
        let sa = c.sqrt_alpha_bar();
        let xi = self.xi;
        // g = r · inv in f32, as `dps_gradient` scales Aᵀr; a zero residual gives g = 0.
        let inv = norm.and_then(|n| (n != 0.0).then(|| (-1.0 / n) as f32));
        let [_, ly, lz] = self.padded;
        let [rx, ry, rz] = &self.region;
        let (vy, vz) = (ry.len(), rz.len());
        let plane = ly * lz;
        if next.len() != self.state.len() || next.len() != self.padded.iter().product::<usize>() {
            return Err(Error::Shape(format!(
                "fused step: {} output values for a padded volume of {:?}",
                next.len(),
                self.padded
            )));
        }
        let finite = next
            .par_chunks_mut(plane)
            .enumerate()
            .map(|(i, out)| {
                let mut finite = true;
                let (mut x0, mut inside) = ([0.0f32; PIECE], [false; PIECE]);
                let mut z = [0.0f32; PIECE];
                for (j, row) in out.chunks_mut(lz).enumerate() {
                    let p0 = i * plane + j * lz;
                    let in_region = rx.contains(&i) && ry.contains(&j);
                    for (piece, out) in row.chunks_mut(PIECE).enumerate() {
                        let (k0, n) = (piece * PIECE, out.len());
                        let p = p0 + k0;
                        let (x0, inside) = (&mut x0[..n], &mut inside[..n]);
                        let e = &self.eps_hat[p..p + n];
                        self.x0_run(&self.state[p..p + n], e, x0, inside);
                        // The update in f64 as `finish_step` forms it:
                        // ((a x̂_0 + b ε̂) + σ z) − ξ (g/√ᾱ), rounded once at the end.
                        let mut acc: [f64; PIECE] = [0.0; PIECE];
                        let acc = &mut acc[..n];
                        for k in 0..n {
                            acc[k] = a * x0[k] as f64 + b * e[k] as f64;
                        }
                        if let Some(noise) = &self.noise {
                            let z = &mut z[..n];
                            noise.fill(p as u64, z);
                            for k in 0..n {
                                acc[k] += s * z[k] as f64;
                            }
                        }
                        // − ξ g/√ᾱ on the output region, g = r·inv with r = M_y(y − x̂_0)
                        // (−0 where M_y is false, as r·inv gives) and g = 0 where x̂_0
                        // was clamped. Elsewhere g = +0 (padding, a zero residual), whose
                        // subtraction leaves every value as it is, so it is skipped.
                        if let (Some((y, m)), Some(inv), true) = (self.data, inv, in_region) {
                            let q0 = ((i - rx.start) * vy + (j - ry.start)) * vz;
                            let lo = rz.start.clamp(k0, k0 + n);
                            let hi = rz.end.clamp(lo, k0 + n);
                            for k in lo - k0..hi - k0 {
                                let q = q0 + k0 + k - rz.start;
                                let r = if m[q] { y[q] - x0[k] } else { 0.0 };
                                let g = if inside[k] { r * inv } else { 0.0 };
                                acc[k] -= xi * ((g as f64 / sa) as f32) as f64;
                            }
                        }
                        for (o, &v) in out.iter_mut().zip(acc.iter()) {
                            *o = v as f32;
                        }
                        finite &= out.iter().all(|v| v.is_finite());
                    }
                }
                finite
            })
            .reduce(|| true, |x, y| x && y);
        if finite {
            Ok(())
        } else {
            Err(Error::NonFinite("the next state x_t".into()))
        }
    }
}
