//! The arithmetic of one step on whole volumes: x̂_0 from ε̂, the DDIM update and the
//! DPS gradient of the plain-norm data term (see the sampler's module docs).

use crate::diffusion::schedule::StepCoefficients;
use crate::error::{Error, Result};
use crate::tasks::Problem;
use ndarray::{Array3, Zip};
use rayon::prelude::*;

/// x̂_0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ, clamped to `clamp` (model units) if given; with a clamp
/// also returns where x̂_0 was inside the range (the clamp's derivative).
pub fn denoise(
    x: &Array3<f32>,
    eps_hat: &Array3<f32>,
    c: &StepCoefficients,
    clamp: Option<(f32, f32)>,
) -> (Array3<f32>, Option<Array3<bool>>) {
    let (sa, s1a) = (c.sqrt_alpha_bar(), c.sqrt_one_minus_alpha_bar());
    let x0 = |x: f32, e: f32| x0_voxel(x, e, sa, s1a);
    match clamp {
        None => (
            Zip::from(x).and(eps_hat).par_map_collect(|&x, &e| x0(x, e)),
            None,
        ),
        Some((lo, hi)) => {
            // One pass for x̂_0, the clamp and the mask (the clamp acts on the f32 x̂_0).
            let mut inside = Array3::from_elem(x.raw_dim(), false);
            let mut out = Array3::<f32>::zeros(x.raw_dim());
            Zip::from(&mut out)
                .and(&mut inside)
                .and(x)
                .and(eps_hat)
                .par_for_each(|o, m, &x, &e| {
                    (*o, *m) = clamp_x0(x0(x, e), lo, hi);
                });
            (out, Some(inside))
        }
    }
}

/// x̂_0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ of one voxel, in f64 and rounded once (`sa` = √ᾱ,
/// `s1a` = √(1−ᾱ)); the one home of the formula, so every path gives the same bits.
#[inline(always)]
pub(super) fn x0_voxel(x: f32, e: f32, sa: f64, s1a: f64) -> f32 {
    ((x as f64 - s1a * e as f64) / sa) as f32
}

/// x̂_0 clamped to `[lo, hi]` and whether it lay strictly inside (the clamp's
/// derivative mask).
#[inline(always)]
pub(super) fn clamp_x0(v: f32, lo: f32, hi: f32) -> (f32, bool) {
    (v.clamp(lo, hi), v > lo && v < hi)
}

/// x'_{prev} = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z (DDIM eq. 12).
pub fn ddim_update(
    x0_hat: &Array3<f32>,
    eps_hat: &Array3<f32>,
    c: &StepCoefficients,
    z: Option<&Array3<f32>>,
) -> Array3<f32> {
    let (a, b, s) = (c.alpha_bar_prev.sqrt(), c.eps_coefficient(), c.sigma);
    match z {
        Some(z) => Zip::from(x0_hat)
            .and(eps_hat)
            .and(z)
            .par_map_collect(|&x0, &e, &z| (a * x0 as f64 + b * e as f64 + s * z as f64) as f32),
        None => Zip::from(x0_hat)
            .and(eps_hat)
            .par_map_collect(|&x0, &e| (a * x0 as f64 + b * e as f64) as f32),
    }
}

/// Elements per partial sum of [`sum_squares`] (the fixed chunking that makes it
/// independent of the thread count; the fused step keeps it too).
pub(super) const SUM_CHUNK: usize = 1 << 15;

/// Σ v² in f64 with fixed chunking (bitwise independent of the thread count).
pub fn sum_squares(v: &[f32]) -> f64 {
    let partial: Vec<f64> = v
        .par_chunks(SUM_CHUNK)
        .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
        .collect();
    partial.iter().sum()
}

/// The DPS data term on the output grid: for x̂_0 (model units, output shape) and
/// y_model = M_y ⊙ y·scale, returns g = ∇_{x̂_0}‖M_y(y − A x̂_0)‖₂ = −Aᵀ r / ‖r‖ with
/// r = M_y(y − A x̂_0) (g = 0 when r = 0), and ‖r‖ (model units).
pub fn dps_gradient(
    problem: &Problem,
    y_model: &Array3<f32>,
    x0: &Array3<f32>,
) -> Result<(Array3<f32>, f64)> {
    let ax = problem.operator().apply(x0)?;
    if ax.shape() != y_model.shape() {
        return Err(Error::Shape(format!(
            "forward model returned shape {:?}, measurement is {:?}",
            ax.shape(),
            y_model.shape()
        )));
    }
    let r = Zip::from(y_model)
        .and(&ax)
        .and(problem.measurement_mask())
        .par_map_collect(|&y, &a, &m| if m { y - a } else { 0.0 });
    let r_std = r.as_standard_layout();
    let norm = sum_squares(r_std.as_slice().unwrap_or(&[])).sqrt();
    if !norm.is_finite() {
        return Err(Error::NonFinite(
            "DPS residual ‖y − A x̂_0‖ is not finite".into(),
        ));
    }
    if norm == 0.0 {
        return Ok((Array3::zeros(x0.raw_dim()), 0.0));
    }
    let mut g = problem.operator().adjoint(&r)?;
    let inv = (-1.0 / norm) as f32;
    g.par_mapv_inplace(|v| v * inv);
    Ok((g, norm))
}
