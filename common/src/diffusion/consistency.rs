//! Proximal data consistency on the denoised estimate x̂_0, the "decomposed" step of the
//! Decomposed Diffusion Sampler (DDS; H. Chung, S. Lee, J. C. Ye, "Decomposed Diffusion
//! Sampler for Accelerating Large-Scale Inverse Problems", ICLR 2024).
//!
//! Instead of DPS's single gradient step on ‖y − A x̂_0‖, DDS replaces x̂_0 by a few
//! conjugate-gradient (CG) iterations on the data term, started at x̂_0, and re-noises
//! that with the unchanged ε̂. We solve the proximal problem
//!
//! ```text
//! x̃_0 = argmin_x  w ‖M_y (y − A x)‖² + ‖x − x̂_0‖²
//!     ⇔ (I + w AᵀM_y A) x = x̂_0 + w AᵀM_y y
//! ```
//!
//! with [`PROX_CG_ITERATIONS`] CG iterations from x = x̂_0 (M_y is a 0/1 mask, so
//! M_yᵀM_y = M_y). With a source mask M_s (the brain mask: a local field is produced by
//! sources inside it), A is replaced by A M_s: χ outside M_s neither explains the data
//! nor changes, so the fit cannot park sources outside the brain. The weight w plays ξ's role: w → 0 ignores the data, w → ∞ enforces
//! it, and inside the dipole cone or outside the sampled k-space (where A has no
//! energy) the prior's x̂_0 is kept for any w. All reductions are f64 sums over fixed
//! chunks, so the result is bitwise independent of the thread count.
//!
//! [`tv_proximal_consistency`] adds a total-variation term for the physics dipole task
//! (A = M_y ∘ D), the ADMM-TV data consistency of DiffusionMBIR (Chung, Ryu, McCann,
//! Klasky & Ye, CVPR 2023):
//!
//! ```text
//! x̃_0 = argmin_x  w ‖M_y (y − D x)‖² + ‖x − x̂_0‖² + 2wα s ‖∇x‖₁
//! ```
//!
//! (s the model's χ scale), which in ppm is exactly the TV inversion
//! α‖∇χ‖₁ + ½‖M_y(Dχ − φ)‖² of [`crate::inversion::tv`] with the anchor
//! (1/2w)‖χ − χ̂_0‖²: [`TvSolver`] solves it in closed-form ADMM steps from χ = χ̂_0.
//! w → ∞ gives the TV inversion, α → 0 the plain proximal step. Like the TV baseline, χ
//! may take any value on the FFT grid while solving; outside the source mask M_s the
//! prior's x̂_0 is then put back, as in the plain step.

use crate::error::{Error, Result};
use crate::fft::Padding;
use crate::geometry::B0Direction;
use crate::inversion::tv::{TvAnchor, TvParams, TvReport, TvSolver};
use crate::operators::LinearOperator;
use crate::volume::Volume;
use ndarray::{Array3, ArrayView3, Zip};
use rayon::prelude::*;

/// CG iterations of the proximal step per diffusion step (DDS uses 5).
pub const PROX_CG_ITERATIONS: usize = 5;

/// ⟨a, b⟩ in f64 with fixed chunking (bitwise independent of the thread count).
fn dot(a: &Array3<f32>, b: &Array3<f32>) -> Result<f64> {
    const CHUNK: usize = 1 << 15;
    let contiguous = || Error::Shape("CG vectors are not contiguous".into());
    let (a, b) = (
        a.as_slice().ok_or_else(contiguous)?,
        b.as_slice().ok_or_else(contiguous)?,
    );
    let partial: Vec<f64> = a
        .par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .map(|(a, b)| a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum())
        .collect();
    Ok(partial.iter().sum())
}

/// M_y ⊙ v for a 0/1 mask.
fn masked(v: Array3<f32>, mask: &Array3<bool>) -> Array3<f32> {
    let mut v = v;
    Zip::from(&mut v).and(mask).par_for_each(|v, &m| {
        if !m {
            *v = 0.0;
        }
    });
    v
}

/// The data term ‖M_y(y − A M_s x)‖ of a proximal step, in model units: the forward model
/// A from the χ grid to the measurement grid, the measurement `y` (already multiplied by
/// `mask`), M_y = `mask` (where y is trusted) and M_s = `source` (where χ may explain the
/// data; `None`: everywhere).
#[derive(Clone, Copy)]
pub struct DataTerm<'a> {
    /// A (χ grid → measurement grid).
    pub operator: &'a dyn LinearOperator,
    /// y on A's output grid, multiplied by `mask` (model units).
    pub y: &'a Array3<f32>,
    /// M_y, where y is trusted.
    pub mask: &'a Array3<bool>,
    /// M_s, where χ may explain the data (`None`: everywhere).
    pub source: Option<&'a Array3<bool>>,
}

impl DataTerm<'_> {
    /// Errors unless y and M_y, and M_s and an estimate of shape `x_shape`, agree.
    fn check(&self, x_shape: &[usize]) -> Result<()> {
        if self.y.shape() != self.mask.shape() {
            return Err(Error::Shape(format!(
                "measurement {:?} and its mask {:?} differ in shape",
                self.y.shape(),
                self.mask.shape()
            )));
        }
        if let Some(src) = self.source
            && src.shape() != x_shape
        {
            return Err(Error::Shape(format!(
                "source mask {:?} and estimate {:?} differ in shape",
                src.shape(),
                x_shape
            )));
        }
        Ok(())
    }

    /// A M_s v.
    fn forward(&self, v: &Array3<f32>) -> Result<Array3<f32>> {
        match self.source {
            Some(src) => self.operator.apply(&masked(v.to_owned(), src)),
            None => self.operator.apply(v),
        }
    }

    /// M_s Aᵀ r.
    fn backward(&self, r: &Array3<f32>) -> Result<Array3<f32>> {
        let v = self.operator.adjoint(r)?;
        Ok(match self.source {
            Some(src) => masked(v, src),
            None => v,
        })
    }

    /// M_y (y − A M_s x); errors if A returns another shape than y's.
    fn residual(&self, x: &Array3<f32>) -> Result<Array3<f32>> {
        let ax = self.forward(x)?;
        if ax.shape() != self.y.shape() {
            return Err(Error::Shape(format!(
                "forward model returned shape {:?}, measurement is {:?}",
                ax.shape(),
                self.y.shape()
            )));
        }
        Ok(masked(
            Zip::from(self.y).and(&ax).par_map_collect(|&y, &a| y - a),
            self.mask,
        ))
    }
}

/// The proximal data-consistency step (see the module docs): `data` the data term,
/// `x0` the denoised estimate x̂_0 (model units), `weight` w ≥ 0 and `iterations` CG
/// iterations (stops early once the residual is 0).
///
/// Returns x̃_0 and ‖M_y(y − A x̃_0)‖ (model units). Errors on mismatched shapes or a
/// non-finite result.
pub fn proximal_consistency(
    data: &DataTerm<'_>,
    x0: &Array3<f32>,
    weight: f64,
    iterations: usize,
) -> Result<(Array3<f32>, f64)> {
    if !(weight.is_finite() && weight >= 0.0) {
        return Err(Error::Parameter(format!(
            "data-consistency weight {weight} must be finite and non-negative"
        )));
    }
    data.check(x0.shape())?;
    let w = weight as f32;
    // H v = v + w A_sᵀM A_s v.
    let normal = |v: &Array3<f32>| -> Result<Array3<f32>> {
        let mut h = data.backward(&masked(data.forward(v)?, data.mask))?;
        Zip::from(&mut h)
            .and(v)
            .par_for_each(|h, &v| *h = v + w * *h);
        Ok(h)
    };
    let mut x = x0.to_owned();
    if weight > 0.0 && iterations > 0 {
        // r = b − H x0 = w A_sᵀM (y − A_s x0).
        let mut r = data.backward(&data.residual(&x)?)?;
        r.par_mapv_inplace(|v| v * w);
        let mut p = r.clone();
        let mut rr = dot(&r, &r)?;
        for _ in 0..iterations {
            if rr == 0.0 {
                break;
            }
            let hp = normal(&p)?;
            let php = dot(&p, &hp)?;
            if !(php.is_finite() && php > 0.0) {
                break;
            }
            let alpha = (rr / php) as f32;
            Zip::from(&mut x)
                .and(&p)
                .par_for_each(|x, &p| *x += alpha * p);
            Zip::from(&mut r)
                .and(&hp)
                .par_for_each(|r, &h| *r -= alpha * h);
            let rr_next = dot(&r, &r)?;
            let beta = (rr_next / rr) as f32;
            Zip::from(&mut p)
                .and(&r)
                .par_for_each(|p, &r| *p = r + beta * *p);
            rr = rr_next;
        }
    }
    let res = data.residual(&x)?;
    let norm = dot(&res, &res)?.sqrt();
    if !norm.is_finite() || x.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite(
            "data-consistency step produced a non-finite estimate".into(),
        ));
    }
    Ok((x, norm))
}

/// ADMM iteration cap of the TV step per diffusion step. It starts at x̂_0, so it needs
/// far fewer iterations than the TV baseline's cold start (at most 300).
pub const PROX_TV_MAX_ITERATIONS: usize = 100;

/// The TV regulariser of the physics dipole task's proximal step: the prepared TV
/// inversion of the local field (ppm, brain-mask weight, the task's dipole padding) and
/// its weight α (ppm, on the scale of the TV baseline's α).
pub struct TvConsistency {
    solver: TvSolver,
    params: TvParams,
}

impl std::fmt::Debug for TvConsistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TvConsistency")
            .field("shape", &self.solver.shape())
            .field("alpha", &self.params.alpha)
            .finish()
    }
}

impl TvConsistency {
    /// Prepares the TV step for `field` (ppm) with data weight `weight` (the brain mask as
    /// 0/1, field shape; `None`: everywhere), B0 `b0`, FFT `padding` and TV weight `alpha`
    /// (finite, > 0). Errors on invalid input, as [`TvSolver::new`].
    pub fn new(
        field: &Volume,
        weight: Option<ArrayView3<'_, f32>>,
        b0: B0Direction,
        padding: Padding,
        alpha: f64,
    ) -> Result<Self> {
        let params = TvParams {
            alpha,
            max_iterations: PROX_TV_MAX_ITERATIONS,
            padding,
            ..TvParams::default()
        };
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(Error::Parameter(format!(
                "the TV weight of the data-consistency step must be finite and positive, got {alpha}"
            )));
        }
        let solver = TvSolver::new(field, weight, b0, padding)?;
        Ok(Self { solver, params })
    }

    /// The TV weight α (ppm).
    pub fn alpha(&self) -> f64 {
        self.params.alpha
    }

    /// The field's grid shape.
    pub fn shape(&self) -> [usize; 3] {
        self.solver.shape()
    }
}

/// The TV-regularised proximal step (see the module docs): `tv` the prepared regulariser,
/// `data` the data term (A must be M_y ∘ D of `tv`'s field), `x0` the denoised estimate
/// (model units), `weight` w > 0 and `scale` the model's χ scale s (model units per
/// ppm). Returns x̃_0, ‖M_y(y − A M_s x̃_0)‖ (model units, as the plain step reports
/// it) and the TV run's report.
pub fn tv_proximal_consistency(
    tv: &TvConsistency,
    data: &DataTerm<'_>,
    x0: &Array3<f32>,
    weight: f64,
    scale: f64,
) -> Result<(Array3<f32>, f64, TvReport)> {
    if !(weight.is_finite() && weight > 0.0) {
        return Err(Error::Parameter(format!(
            "TV data-consistency weight {weight} must be finite and positive"
        )));
    }
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::Parameter(format!(
            "model χ scale {scale} must be finite and positive"
        )));
    }
    if x0.shape() != tv.shape() {
        return Err(Error::Shape(format!(
            "TV data consistency: estimate {:?}, field {:?}",
            x0.shape(),
            tv.shape()
        )));
    }
    data.check(x0.shape())?;
    let inv = (1.0 / scale) as f32;
    let anchor = x0.mapv(|v| v * inv);
    let (chi, report) = tv.solver.solve(
        &tv.params,
        Some(TvAnchor {
            chi: anchor.view(),
            weight: 1.0 / weight,
        }),
    )?;
    let s = scale as f32;
    let mut x = chi.mapv(|v| v * s);
    if let Some(src) = data.source {
        Zip::from(&mut x)
            .and(x0)
            .and(src)
            .par_for_each(|x, &x0, &m| {
                if !m {
                    *x = x0;
                }
            });
    }
    let res = data.residual(&x)?;
    let norm = dot(&res, &res)?.sqrt();
    if !norm.is_finite() || x.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite(
            "TV data-consistency step produced a non-finite estimate".into(),
        ));
    }
    Ok((x, norm, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fft::Padding;
    use crate::geometry::B0Direction;
    use crate::operators::{DipoleConvolution, Identity};
    use ndarray::Array3;

    fn term<'a>(
        op: &'a dyn LinearOperator,
        y: &'a Array3<f32>,
        mask: &'a Array3<bool>,
        source: Option<&'a Array3<bool>>,
    ) -> DataTerm<'a> {
        DataTerm {
            operator: op,
            y,
            mask,
            source,
        }
    }

    fn field(shape: [usize; 3], seed: u64) -> Array3<f32> {
        // Small deterministic pseudo-random values (LCG), no extra dependency.
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        Array3::from_shape_fn(shape, |_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
    }

    /// A = I with a data mask M and a source mask M_s: the minimiser is
    /// (x̂_0 + w M y)/(1 + w M) where M_s holds and x̂_0 elsewhere, and CG reaches it in two
    /// iterations (H has two eigenvalues). Tolerance 1e-6: f32.
    #[test]
    fn identity_matches_closed_form() {
        let shape = [6, 7, 5];
        let x0 = field(shape, 1);
        let mask = Array3::from_shape_fn(shape, |(i, j, _)| (i + j) % 3 != 0);
        let source = Array3::from_shape_fn(shape, |(_, _, k)| k != 2);
        let y = masked(field(shape, 2), &mask);
        let op = Identity::new(shape);
        for (w, src) in [
            (0.0, None),
            (0.5, None),
            (2.0, Some(&source)),
            (100.0, Some(&source)),
        ] {
            let (x, _) = proximal_consistency(&term(&op, &y, &mask, src), &x0, w, 2).unwrap();
            for ((idx, &v), &m) in x.indexed_iter().zip(mask.iter()) {
                let free = src.is_none_or(|s| s[idx]);
                let want = if m && free {
                    (x0[idx] as f64 + w * y[idx] as f64) / (1.0 + w)
                } else {
                    x0[idx] as f64
                };
                assert!(
                    (v as f64 - want).abs() < 1e-6,
                    "w {w} {idx:?}: {v} vs {want}"
                );
            }
        }
    }

    /// Dipole forward model (oblique B0, circular): after enough iterations the gradient
    /// of the objective, (x − x̂_0) + w A_sᵀM(A_s x − y) with A_s = A M_s (M_s = I or a
    /// source mask), vanishes relative to its value at
    /// x̂_0 (1e-3: f32 CG on a condition number 1 + w·max D² ≈ 4), and every CG
    /// iteration lowers the objective.
    #[test]
    fn dipole_solves_normal_equations() {
        let shape = [12, 10, 8];
        let op = DipoleConvolution::new(
            shape,
            [1.0, 1.0, 1.2],
            B0Direction::new([0.2, 0.1, 1.0]).unwrap(),
            Padding::None,
        )
        .unwrap();
        let mask = Array3::from_shape_fn(shape, |(i, _, _)| i > 1 && i < 10);
        let y = masked(field(shape, 3), &mask);
        let x0 = field(shape, 4);
        let w = 5.0;
        // With a source mask M_s the model is A M_s: χ outside M_s must stay x̂_0.
        let source = Array3::from_shape_fn(shape, |(_, j, _)| j > 0 && j < 9);
        for src in [None, Some(&source)] {
            let restrict = |v: &Array3<f32>| match src {
                Some(s) => masked(v.clone(), s),
                None => v.clone(),
            };
            let forward = |x: &Array3<f32>| op.apply(&restrict(x)).unwrap();
            let objective = |x: &Array3<f32>| {
                let r = masked(&y - &forward(x), &mask);
                let d = x - &x0;
                w * dot(&r, &r).unwrap() + dot(&d, &d).unwrap()
            };
            let gradient_norm = |x: &Array3<f32>| {
                let r = masked(&forward(x) - &y, &mask);
                let g = &(x - &x0) + &(restrict(&op.adjoint(&r).unwrap()) * w as f32);
                dot(&g, &g).unwrap().sqrt()
            };
            let mut last = objective(&x0);
            for k in 1..=5 {
                let (x, _) = proximal_consistency(&term(&op, &y, &mask, src), &x0, w, k).unwrap();
                let f = objective(&x);
                assert!(f < last, "iteration {k}: objective {f} not below {last}");
                last = f;
            }
            let (x, norm) = proximal_consistency(&term(&op, &y, &mask, src), &x0, w, 60).unwrap();
            let rel = gradient_norm(&x) / gradient_norm(&x0);
            assert!(rel < 1e-3, "relative gradient {rel}");
            let r = masked(&y - &forward(&x), &mask);
            assert!((dot(&r, &r).unwrap().sqrt() - norm).abs() < 1e-9);
            if let Some(s) = src {
                for ((idx, &v), &inside) in x.indexed_iter().zip(s.iter()) {
                    if !inside {
                        assert_eq!(v.to_bits(), x0[idx].to_bits(), "{idx:?} changed");
                    }
                }
            }
        }
    }

    /// The TV step minimises its model-unit objective
    /// w‖M(y − A x)‖² + ‖x − x̂_0‖² + 2wαs‖∇x‖₁ (A = M ∘ D, circular grid, oblique
    /// B0), evaluated here independently of the ADMM's ppm form: no perturbation of the
    /// result (`inversion::tv::least_perturbed_change`: 40 Gaussian directions at each of
    /// 1e-3, 1e-2 and 1e-1 of its RMS, both signs, and rescalings) lowers it by more than
    /// 1e-6 relative (f32 rounding of the sums), which checks the unit conversion (s) and the
    /// anchor weight (1/w). With a source mask, χ outside it is x̂_0 bit for bit, and the
    /// reported residual is ‖M(y − A M_s x̃)‖ recomputed.
    #[test]
    fn tv_step_minimises_its_objective() {
        use crate::inversion::tv::total_variation;
        use crate::operators::{Compose, Mask};
        use crate::volume::Volume;
        let shape = [16, 14, 12];
        let vox = [1.0, 1.0, 1.2];
        let b0 = B0Direction::new([0.1, 0.2, 1.0]).unwrap();
        let mask = Array3::from_shape_fn(shape, |(i, j, _)| (2..14).contains(&i) && j > 1);
        let op = Compose::new(vec![
            Box::new(DipoleConvolution::new(shape, vox, b0, Padding::None).unwrap()),
            Box::new(Mask::from_bool(&mask).unwrap()),
        ])
        .unwrap();
        let (scale, w, alpha) = (10.0f64, 8.0f64, 1e-3f64);
        let truth = field(shape, 9).mapv(|v| 0.1 * v);
        let phi = op.apply(&truth).unwrap();
        let y = phi.mapv(|v| v * scale as f32);
        let x0 = (&truth + &field(shape, 10).mapv(|v| 0.05 * v)).mapv(|v| v * scale as f32);
        let tight = TvConsistency {
            solver: TvSolver::new(
                &Volume::new(phi.clone(), vox),
                Some(mask.mapv(|b| if b { 1.0f32 } else { 0.0 }).view()),
                b0,
                Padding::None,
            )
            .unwrap(),
            params: TvParams {
                alpha,
                max_iterations: 4000,
                tolerance: 1e-6,
                padding: Padding::None,
                ..TvParams::default()
            },
        };
        let (x, norm, report) =
            tv_proximal_consistency(&tight, &term(&op, &y, &mask, None), &x0, w, scale).unwrap();
        assert!(report.converged, "{report:?}");
        let objective = |x: &Array3<f32>| {
            let r = masked(&y - &op.apply(x).unwrap(), &mask);
            let d = x - &x0;
            w * dot(&r, &r).unwrap()
                + dot(&d, &d).unwrap()
                + 2.0 * w * alpha * scale * total_variation(x).unwrap()
        };
        let f0 = objective(&x);
        let r = masked(&y - &op.apply(&x).unwrap(), &mask);
        assert!((dot(&r, &r).unwrap().sqrt() - norm).abs() < 1e-9 * (1.0 + norm));
        let worst = crate::inversion::tv::least_perturbed_change(&x, objective, 100);
        assert!(worst > -1e-6 * f0, "lowered by {} (f = {f0})", -worst);
        // The source mask keeps x̂_0 outside it and the residual is that of A M_s x̃.
        let source = Array3::from_shape_fn(shape, |(_, _, k)| (1..11).contains(&k));
        let (xs, norm_s, _) =
            tv_proximal_consistency(&tight, &term(&op, &y, &mask, Some(&source)), &x0, w, scale)
                .unwrap();
        for ((idx, &v), &inside) in xs.indexed_iter().zip(source.iter()) {
            if !inside {
                assert_eq!(v.to_bits(), x0[idx].to_bits(), "{idx:?} changed");
            }
        }
        let r = masked(&y - &op.apply(&masked(xs.clone(), &source)).unwrap(), &mask);
        assert!((dot(&r, &r).unwrap().sqrt() - norm_s).abs() < 1e-9 * (1.0 + norm_s));
        // Bad weights and shapes are errors.
        let bad = |w: f64, s: f64| {
            tv_proximal_consistency(&tight, &term(&op, &y, &mask, None), &x0, w, s)
        };
        assert!(bad(0.0, scale).is_err() && bad(f64::NAN, scale).is_err());
        assert!(bad(w, 0.0).is_err());
        let small = Array3::<f32>::zeros([3, 3, 3]);
        assert!(
            tv_proximal_consistency(&tight, &term(&op, &y, &mask, None), &small, w, scale).is_err()
        );
        assert!(TvConsistency::new(&Volume::new(phi, vox), None, b0, Padding::None, 0.0).is_err());
    }

    /// Bad weights and mismatched shapes are errors, not panics.
    #[test]
    fn rejects_bad_input() {
        let shape = [4, 4, 4];
        let op = Identity::new(shape);
        let x0 = field(shape, 5);
        let mask = Array3::from_elem(shape, true);
        let y = field(shape, 6);
        assert!(proximal_consistency(&term(&op, &y, &mask, None), &x0, f64::NAN, 5).is_err());
        assert!(proximal_consistency(&term(&op, &y, &mask, None), &x0, -1.0, 5).is_err());
        let small = Array3::from_elem([3, 4, 4], true);
        assert!(proximal_consistency(&term(&op, &y, &small, None), &x0, 1.0, 5).is_err());
        assert!(proximal_consistency(&term(&op, &y, &mask, Some(&small)), &x0, 1.0, 5).is_err());
    }
}
