//! An exact score model for an i.i.d. Gaussian prior, for tests without training.
//!
//! Prior (model units): every voxel x_0 ~ N(μ, σ²) independently. Under the VP forward
//! process x_t = √ᾱ x_0 + √(1−ᾱ) ε the marginal is x_t ~ N(√ᾱ μ, v_t), v_t = ᾱσ² + 1 − ᾱ,
//! and the MMSE noise prediction is
//! ε*(x_t) = E[ε | x_t] = √(1−ᾱ) (x_t − √ᾱ μ) / v_t,
//! an affine map per voxel with Jacobian κ_t I, κ_t = √(1−ᾱ)/v_t, so Jᵀv = κ_t v.
//!
//! With this model the sampler's chains are linear Gaussian recursions whose moments
//! follow in closed form from the schedule ([`GaussianPriorModel::chain_moments`]).

use crate::diffusion::model::{ModelSpec, ScoreModel};
use crate::diffusion::schedule::{NoiseSchedule, SamplingSchedule, ScheduleConfig};
use crate::error::{Error, Result};
use crate::splitmix::mix64;
use ndarray::{Array4, ArrayView4, Zip};

/// The exact ε-prediction of an i.i.d. N(μ, σ²) prior (module docs). Implements
/// [`ScoreModel`].
#[derive(Debug, Clone)]
pub struct GaussianPriorModel {
    spec: ModelSpec,
    mean: f64,
    std: f64,
    schedule: NoiseSchedule,
}

impl GaussianPriorModel {
    /// A model with prior mean `mean` and standard deviation `std` (model units), patch
    /// edge `patch_size`, unit scale `chi_scale` (χ_model = χ_ppm × chi_scale) and training
    /// schedule `schedule`. Errors on σ ≤ 0, a bad scale or schedule.
    pub fn new(
        mean: f64,
        std: f64,
        patch_size: usize,
        chi_scale: f64,
        schedule: ScheduleConfig,
    ) -> Result<Self> {
        if !(std.is_finite() && std > 0.0 && mean.is_finite()) {
            return Err(Error::Parameter(format!(
                "Gaussian prior needs finite mean and std > 0, got {mean}, {std}"
            )));
        }
        if !(chi_scale.is_finite() && chi_scale > 0.0) || patch_size == 0 {
            return Err(Error::Parameter(format!(
                "Gaussian prior model: chi_scale {chi_scale} must be positive and patch size {patch_size} at least 1"
            )));
        }
        let noise = NoiseSchedule::new(&schedule)?;
        let hash = [
            mean.to_bits(),
            std.to_bits(),
            patch_size as u64,
            chi_scale.to_bits(),
        ]
        .iter()
        .fold(0x616e_616c_7974_6963u64, |h, &v| mix64(h ^ v));
        Ok(Self {
            spec: ModelSpec {
                model_id: format!("analytic-gaussian(mu={mean},sigma={std})"),
                content_hash: format!("analytic-{hash:016x}"),
                patch_size,
                schedule,
                chi_scale,
            },
            mean,
            std,
            schedule: noise,
        })
    }

    /// Prior mean μ (model units).
    pub fn mean(&self) -> f64 {
        self.mean
    }
    /// Prior standard deviation σ (model units).
    pub fn std(&self) -> f64 {
        self.std
    }

    /// (κ_t, √ᾱ_t μ): ε* = κ_t (x − √ᾱ_t μ) at training timestep t.
    pub fn affine(&self, t: usize) -> (f64, f64) {
        let a = self.schedule.alpha_bar(Some(t));
        let v = a * self.std * self.std + 1.0 - a;
        ((1.0 - a).sqrt() / v, a.sqrt() * self.mean)
    }

    fn timestep(&self, t: f32) -> Result<usize> {
        let r = t.round();
        if !(t.is_finite()
            && (t - r).abs() < 1e-3
            && r >= 0.0
            && (r as usize) < self.schedule.timesteps())
        {
            return Err(Error::Model(format!(
                "timestep {t} is not an index of the {}-step schedule",
                self.schedule.timesteps()
            )));
        }
        Ok(r as usize)
    }

    fn check(&self, patches: &ArrayView4<'_, f32>, t: &[f32]) -> Result<()> {
        let p = self.spec.patch_size;
        let s = patches.shape();
        if s[1..] != [p, p, p] || s[0] != t.len() {
            return Err(Error::Model(format!(
                "analytic model expects [B, {p}, {p}, {p}] patches with B timesteps, got {s:?} and {} timesteps",
                t.len()
            )));
        }
        Ok(())
    }

    /// Moments of the output of a re-spaced DDIM/DDPM chain (no guidance) started from
    /// x_T ~ N(m_T, v_T): every step is the per-voxel map
    /// x' − √ᾱ' μ = ρ (x − √ᾱ μ) + σ z with
    /// ρ = (√(ᾱ'ᾱ) σ_p² + √(1−ᾱ) √(1−ᾱ'−σ²)) / (ᾱσ_p² + 1 − ᾱ),
    /// so the deviation from √ᾱ μ is scaled by ρ and gains variance σ². Returns
    /// (gain Π ρ, output mean, output variance). For η = 0 the output is exactly
    /// μ + (Π ρ)(x_T − √ᾱ_first μ), an affine function of x_T.
    pub fn chain_moments(
        &self,
        schedule: &SamplingSchedule,
        m_t: f64,
        v_t: f64,
    ) -> (f64, f64, f64) {
        let s2 = self.std * self.std;
        let first = schedule.steps().first().map(|c| c.alpha_bar).unwrap_or(1.0);
        let (mut gain, mut dev_mean, mut dev_var) = (1.0, m_t - first.sqrt() * self.mean, v_t);
        for c in schedule.steps() {
            let (a, ap) = (c.alpha_bar, c.alpha_bar_prev);
            let rho = ((ap * a).sqrt() * s2 + (1.0 - a).sqrt() * c.eps_coefficient())
                / (a * s2 + 1.0 - a);
            gain *= rho;
            dev_mean *= rho;
            dev_var = rho * rho * dev_var + c.sigma * c.sigma;
        }
        (gain, self.mean + dev_mean, dev_var)
    }
}

impl ScoreModel for GaussianPriorModel {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn eps(&self, patches: ArrayView4<'_, f32>, t: &[f32]) -> Result<Array4<f32>> {
        self.check(&patches, t)?;
        // Written once, in C order, row after row (no zeroed buffer first).
        let mut out = Vec::with_capacity(patches.len());
        for (b, &tb) in t.iter().enumerate() {
            let (k, m) = self.affine(self.timestep(tb)?);
            let row = patches.index_axis(ndarray::Axis(0), b);
            let eps = |x: &f32| (k * (*x as f64 - m)) as f32;
            match row.as_slice() {
                Some(values) => out.extend(values.iter().map(eps)),
                None => out.extend(row.iter().map(eps)),
            }
        }
        Array4::from_shape_vec(patches.raw_dim(), out).map_err(|e| Error::Shape(e.to_string()))
    }

    fn vjp(
        &self,
        patches: ArrayView4<'_, f32>,
        t: &[f32],
        cotangent: ArrayView4<'_, f32>,
    ) -> Result<Array4<f32>> {
        self.check(&patches, t)?;
        if cotangent.shape() != patches.shape() {
            return Err(Error::Model(format!(
                "cotangent shape {:?} differs from patches {:?}",
                cotangent.shape(),
                patches.shape()
            )));
        }
        let mut jtv = Array4::<f32>::zeros(patches.raw_dim());
        for (b, &tb) in t.iter().enumerate() {
            let (k, _) = self.affine(self.timestep(tb)?);
            Zip::from(jtv.index_axis_mut(ndarray::Axis(0), b))
                .and(cotangent.index_axis(ndarray::Axis(0), b))
                .for_each(|j, &v| *j = (k * v as f64) as f32);
        }
        Ok(jtv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eps_is_the_posterior_mean_of_the_noise() {
        // Monte Carlo check of ε* = E[ε | x_t] by regression: for x_t = √ᾱ x0 + √(1−ᾱ) ε,
        // the least-squares slope of ε on x_t equals κ_t. n = 2^18 pairs: the slope's s.e.
        // is about √(1−ρ²)/(√n σ_x) < 2e-3; tolerance 1e-2.
        let m = GaussianPriorModel::new(0.3, 1.5, 4, 1.0, ScheduleConfig::default()).unwrap();
        let t = 300;
        let a = m.schedule.alpha_bar(Some(t));
        let n = 1 << 18;
        let mut x0 = vec![0.0f32; n];
        let mut e = vec![0.0f32; n];
        crate::diffusion::noise::fill_standard_normal(1, 1, 0, &mut x0);
        crate::diffusion::noise::fill_standard_normal(1, 2, 0, &mut e);
        let xt: Vec<f64> = x0
            .iter()
            .zip(&e)
            .map(|(&z, &e)| a.sqrt() * (0.3 + 1.5 * z as f64) + (1.0 - a).sqrt() * e as f64)
            .collect();
        let mx = xt.iter().sum::<f64>() / n as f64;
        let me = e.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let cov: f64 = xt
            .iter()
            .zip(&e)
            .map(|(x, &v)| (x - mx) * (v as f64 - me))
            .sum::<f64>();
        let var: f64 = xt.iter().map(|x| (x - mx).powi(2)).sum::<f64>();
        let (k, off) = m.affine(t);
        assert!((cov / var - k).abs() < 1e-2, "slope {} vs κ {k}", cov / var);
        assert!((off - a.sqrt() * 0.3).abs() < 1e-12);
        // And the model's batch output is that affine map; the VJP is κ v.
        let p = Array4::from_elem((2, 4, 4, 4), 0.7f32);
        let v = Array4::from_elem((2, 4, 4, 4), 2.0f32);
        let eps = m.eps(p.view(), &[t as f32, t as f32]).unwrap();
        let jtv = m.vjp(p.view(), &[t as f32, t as f32], v.view()).unwrap();
        assert!((eps[[1, 2, 3, 0]] as f64 - k * (0.7 - off)).abs() < 1e-6);
        assert!((jtv[[0, 0, 0, 0]] as f64 - 2.0 * k).abs() < 1e-6);
        assert!(m.eps(p.view(), &[t as f32]).is_err());
        assert!(m.eps(p.view(), &[0.5, 1.0]).is_err());
    }
}
