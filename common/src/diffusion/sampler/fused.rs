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
//! bitwise identical states (the sampler tests compare them). Both passes are compiled
//! for each vector extension ([`crate::simd`]), with identical results.

use super::step::{SUM_CHUNK, clamp_x0, x0_voxel};
use crate::diffusion::noise::NoiseStream;
use crate::diffusion::schedule::StepCoefficients;
use crate::error::{Error, Result};
use crate::simd::VectorIsa;
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
    /// M_y ⊙ y·scale on the output grid with M_y, and the span of M_y in each row of
    /// the output grid ([`MaskSpans`]), or `None` for an unguided step.
    pub data: Option<(&'a [f32], &'a [bool], &'a MaskSpans)>,
    /// The step's coefficients.
    pub coefficients: StepCoefficients,
    /// The x̂_0 clamp (model units).
    pub clamp: Option<(f32, f32)>,
    /// Fresh noise z of the step, when σ > 0.
    pub noise: Option<NoiseStream>,
    /// DPS step size ξ.
    pub xi: f64,
}

/// The chunk sums Σ r² of one step's residual (model units), in chunk order, as far as
/// they are known ([`FusedStep::fold_residual`]); valid for one step's x_t and ε̂ only.
#[derive(Debug, Clone, Default)]
pub(super) struct ResidualSums {
    partial: Vec<Option<f64>>,
}

impl ResidualSums {
    /// Forgets every sum (a new step).
    pub fn clear(&mut self) {
        self.partial.clear();
    }
}

/// Where the measurement mask M_y lies in each z row of the output grid: from the first
/// to one past the last true voxel (an empty span for a row without any). Outside its
/// span a row's residual is exactly 0, so the passes neither read y and M_y there nor
/// form x̂_0 for the residual: skipping a sum of +0 terms, and applying the DPS
/// correction of a zero residual per voxel, give the same bits (a brain fills about a
/// third of its bounding volume, so most of the data term's memory traffic goes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct MaskSpans {
    /// `[start, end)` z indices of each row, rows in C order (x, then y).
    rows: Vec<(u32, u32)>,
}

impl MaskSpans {
    /// The spans of a mask of `shape` (C order).
    pub fn new(mask: &[bool], shape: [usize; 3]) -> Self {
        let nz = shape[2].max(1);
        let rows = mask
            .chunks(nz)
            .map(|row| {
                let first = row.iter().position(|&m| m);
                let last = row.iter().rposition(|&m| m);
                match (first, last) {
                    (Some(a), Some(b)) => (a as u32, b as u32 + 1),
                    _ => (0, 0),
                }
            })
            .collect();
        Self { rows }
    }

    /// The span of row `row` as a range of z indices (empty past the end).
    #[inline(always)]
    fn of(&self, row: usize) -> Range<usize> {
        self.rows
            .get(row)
            .map_or(0..0, |&(a, b)| a as usize..b as usize)
    }

    /// Rows described.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }
}

/// Voxels per row piece: the passes work on runs of at most this many voxels of one row,
/// in small stack buffers, so each stage is a plain loop the compiler vectorises.
const PIECE: usize = 256;

/// The per-voxel constants of the update (f64, as `finish_step` uses them).
struct Update {
    /// √ᾱ_prev, the x̂_0 coefficient.
    a: f64,
    /// c_ε, the ε̂ coefficient.
    b: f64,
    /// σ, the noise coefficient.
    s: f64,
    /// √ᾱ.
    sa: f64,
    /// ξ.
    xi: f64,
    /// (−1/‖r‖) as f32, the factor of g = r·inv; `None` without a DPS term.
    inv: Option<f32>,
}

impl FusedStep<'_> {
    /// ‖M_y(y − x̂_0)‖ over the output region (model units), summed in the chunks of
    /// [`super::sum_squares`] over the cropped volume; `None` for an unguided step. Takes
    /// the chunk sums already in `sums` (those of [`FusedStep::fold_residual`]) and
    /// computes the others: the same bits either way, since every chunk is summed by the
    /// same code and the chunk sums are added in chunk order.
    pub fn residual_norm_with(&self, isa: VectorIsa, sums: &mut ResidualSums) -> Option<f64> {
        self.data?;
        let ready = vec![true; self.padded[0]];
        self.fold_residual(isa, &ready, sums);
        let total: f64 = sums.partial.iter().map(|s| s.unwrap_or(f64::NAN)).sum();
        Some(total.sqrt())
    }

    /// Adds to `sums` the residual chunk sums that only read the padded x planes marked
    /// in `ready` (`[lx]`: planes whose ε̂ is final), so that most of the residual pass
    /// runs while a round's later results are still being computed. Unguided: nothing.
    pub fn fold_residual(&self, isa: VectorIsa, ready: &[bool], sums: &mut ResidualSums) {
        if self.data.is_none() {
            return;
        }
        let [rx, ry, rz] = &self.region;
        let plane = ry.len() * rz.len();
        let total = rx.len() * plane;
        let chunks = total.div_ceil(SUM_CHUNK);
        if sums.partial.len() != chunks {
            sums.partial = vec![None; chunks];
        }
        // Chunk c covers cropped voxels [c·K, (c+1)·K): cropped x planes first/plane …
        // (last−1)/plane, padded planes rx.start + those.
        let todo: Vec<usize> = (0..chunks)
            .filter(|&c| sums.partial[c].is_none())
            .filter(|&c| {
                let (first, last) = (c * SUM_CHUNK, ((c + 1) * SUM_CHUNK).min(total));
                (first / plane..=(last - 1) / plane)
                    .all(|i| ready.get(rx.start + i).copied().unwrap_or(false))
            })
            .collect();
        let new: Vec<(usize, f64)> = todo
            .into_par_iter()
            .map(|c| (c, residual_chunk_isa(isa, self, c, total)))
            .collect();
        for (c, v) in new {
            sums.partial[c] = Some(v);
        }
    }

    /// Writes x_{t−1} into `next` (the padded length) with the DPS gradient of residual
    /// norm `norm` (`None`: unguided; `Some(0.0)`: a zero residual, g = 0). Errors with
    /// [`Error::NonFinite`] if a value is not finite (the caller words it).
    pub fn write_next(&self, isa: VectorIsa, norm: Option<f64>, next: &mut [f32]) -> Result<()> {
        let c = &self.coefficients;
        let update = Update {
            a: c.alpha_bar_prev.sqrt(),
            b: c.eps_coefficient(),
            s: c.sigma,
            sa: c.sqrt_alpha_bar(),
            xi: self.xi,
            // g = r · inv in f32, as `dps_gradient` scales Aᵀr; a zero residual: g = 0.
            inv: norm.and_then(|n| (n != 0.0).then(|| (-1.0 / n) as f32)),
        };
        let [_, ly, lz] = self.padded;
        if next.len() != self.state.len() || next.len() != self.padded.iter().product::<usize>() {
            return Err(Error::Shape(format!(
                "fused step: {} output values for a padded volume of {:?}",
                next.len(),
                self.padded
            )));
        }
        let finite = next
            .par_chunks_mut(ly * lz)
            .enumerate()
            .map(|(i, out)| write_plane_isa(isa, self, &update, i, out))
            .reduce(|| true, |x, y| x && y);
        if finite {
            Ok(())
        } else {
            Err(Error::NonFinite("the next state x_t".into()))
        }
    }
}

/// x̂_0 and the clamp mask of a run of voxels (as `denoise` computes them), into `x0`
/// and `inside` (the run's length).
#[inline(always)]
fn x0_run(step: &FusedStep<'_>, x: &[f32], e: &[f32], x0: &mut [f32], inside: &mut [bool]) {
    let c = &step.coefficients;
    let (sa, s1a) = (c.sqrt_alpha_bar(), c.sqrt_one_minus_alpha_bar());
    let n = x0.len();
    let (x, e, inside) = (&x[..n], &e[..n], &mut inside[..n]);
    for k in 0..n {
        x0[k] = x0_voxel(x[k], e[k], sa, s1a);
    }
    match step.clamp {
        None => inside.fill(true),
        Some((lo, hi)) => {
            for k in 0..n {
                (x0[k], inside[k]) = clamp_x0(x0[k], lo, hi);
            }
        }
    }
}

/// Σ r² over chunk `c` of the cropped volume (`total` voxels), in C order.
#[inline(always)]
fn residual_chunk(step: &FusedStep<'_>, c: usize, total: usize) -> f64 {
    let Some((y, m, spans)) = step.data else {
        return 0.0;
    };
    let [rx, ry, rz] = &step.region;
    let (vy, vz) = (ry.len(), rz.len());
    let [_, ly, lz] = step.padded;
    let (mut q, end) = (c * SUM_CHUNK, ((c + 1) * SUM_CHUNK).min(total));
    let mut acc = 0.0f64;
    let (mut x0, mut inside) = ([0.0f32; PIECE], [false; PIECE]);
    let mut r = [0.0f32; PIECE];
    while q < end {
        // The cropped row holding q, from q to the row's or the chunk's end, within the
        // row's mask span: outside it r = 0, and adding r² = +0 leaves the sum (never
        // −0) as it is. Then the next row.
        let (row, k) = (q / vz, q % vz);
        let stop = vz.min(k + (end - q));
        let span = spans.of(row);
        let (from, to) = (k.max(span.start), stop.min(span.end));
        q = row * vz + stop;
        let mut k0 = from;
        while k0 < to {
            let len = (to - k0).min(PIECE);
            let q = row * vz + k0;
            let (i, j) = (row / vy + rx.start, row % vy + ry.start);
            let p = (i * ly + j) * lz + rz.start + k0;
            let (x0, r) = (&mut x0[..len], &mut r[..len]);
            x0_run(
                step,
                &step.state[p..p + len],
                &step.eps_hat[p..p + len],
                x0,
                &mut inside,
            );
            for (((r, &x0), &y), &m) in r
                .iter_mut()
                .zip(x0.iter())
                .zip(&y[q..q + len])
                .zip(&m[q..q + len])
            {
                *r = if m { y - x0 } else { 0.0 };
            }
            // In order: the sum is sequential, as sum_squares' per-chunk sum.
            for &r in r.iter() {
                acc += r as f64 * r as f64;
            }
            k0 += len;
        }
    }
    acc
}

crate::dispatch_isa!(fn residual_chunk_isa(step: &FusedStep<'_>, c: usize, total: usize) -> f64 => residual_chunk);

/// x_{t−1} on x plane `i` of the padded volume, into `out`; whether it is all finite.
#[inline(always)]
fn write_plane(step: &FusedStep<'_>, u: &Update, i: usize, out: &mut [f32]) -> bool {
    let [_, ly, lz] = step.padded;
    let [rx, ry, rz] = &step.region;
    let (vy, vz) = (ry.len(), rz.len());
    let mut finite = true;
    let (mut x0, mut inside) = ([0.0f32; PIECE], [false; PIECE]);
    let mut z = [0.0f32; PIECE];
    let mut acc = [0.0f64; PIECE];
    for (j, row) in out.chunks_mut(lz).enumerate() {
        let p0 = (i * ly + j) * lz;
        let in_region = rx.contains(&i) && ry.contains(&j);
        for (piece, out) in row.chunks_mut(PIECE).enumerate() {
            let (k0, n) = (piece * PIECE, out.len());
            let p = p0 + k0;
            let (x0, inside, acc) = (&mut x0[..n], &mut inside[..n], &mut acc[..n]);
            let e = &step.eps_hat[p..p + n];
            x0_run(step, &step.state[p..p + n], e, x0, inside);
            // The update in f64 as `finish_step` forms it:
            // ((a x̂_0 + b ε̂) + σ z) − ξ (g/√ᾱ), rounded once at the end.
            for ((acc, &x0), &e) in acc.iter_mut().zip(x0.iter()).zip(e) {
                *acc = u.a * x0 as f64 + u.b * e as f64;
            }
            if let Some(noise) = &step.noise {
                let z = &mut z[..n];
                noise.fill(p as u64, z);
                for (acc, &z) in acc.iter_mut().zip(z.iter()) {
                    *acc += u.s * z as f64;
                }
            }
            // − ξ g/√ᾱ on the output region, g = r·inv with r = M_y(y − x̂_0) (−0 where
            // M_y is false, as r·inv gives) and g = 0 where x̂_0 was clamped. Elsewhere
            // g = +0 (padding, a zero residual), whose subtraction leaves every value as
            // it is, so it is skipped.
            if let (Some((y, m, spans)), Some(inv), true) = (step.data, u.inv, in_region) {
                // The piece's part of the region row, [lo, hi), and of the mask span
                // in it, [s0, s1) (padded z). Outside the span r = 0: the same update
                // without reading y or M_y.
                let lo = rz.start.clamp(k0, k0 + n);
                let hi = rz.end.clamp(lo, k0 + n);
                let row = (i - rx.start) * vy + (j - ry.start);
                let mask = spans.of(row);
                let s0 = (rz.start + mask.start).clamp(lo, hi);
                let s1 = (rz.start + mask.end).clamp(s0, hi);
                // r = 0 makes the subtracted term one of two constants (a signed zero
                // each), formed by the same operations as in the span below; subtracting
                // them per voxel keeps the −0 → +0 rule without a division per voxel.
                let term = |g: f32| u.xi * ((g as f64 / u.sa) as f32) as f64;
                let (t_inside, t_clamped) = (term(0.0f32 * inv), term(0.0));
                let zero_residual = |acc: &mut [f64], flags: &[bool]| {
                    for (acc, &inside) in acc.iter_mut().zip(flags) {
                        *acc -= if inside { t_inside } else { t_clamped };
                    }
                };
                zero_residual(&mut acc[lo - k0..s0 - k0], &inside[lo - k0..s0 - k0]);
                zero_residual(&mut acc[s1 - k0..hi - k0], &inside[s1 - k0..hi - k0]);
                let q = row * vz + s0 - rz.start;
                let span = s0 - k0..s1 - k0;
                let (y, m) = (&y[q..q + span.len()], &m[q..q + span.len()]);
                for ((((acc, &x0), &inside), &y), &m) in acc[span.clone()]
                    .iter_mut()
                    .zip(&x0[span.clone()])
                    .zip(&inside[span.clone()])
                    .zip(y)
                    .zip(m)
                {
                    let r = if m { y - x0 } else { 0.0 };
                    let g = if inside { r * inv } else { 0.0 };
                    *acc -= u.xi * ((g as f64 / u.sa) as f32) as f64;
                }
            }
            for (o, &v) in out.iter_mut().zip(acc.iter()) {
                *o = v as f32;
            }
            finite &= crate::volume::all_finite(out);
        }
    }
    finite
}

crate::dispatch_isa!(fn write_plane_isa(step: &FusedStep<'_>, u: &Update, i: usize, out: &mut [f32]) -> bool => write_plane);
