//! VP/DDPM noise schedules ([`ScheduleConfig`], [`NoiseSchedule`]) and their DDIM
//! re-spacing with η ([`SamplingSchedule`]).
//!
//! Conventions follow DDPM (Ho et al. 2020) and DDIM (Song et al. 2021): training
//! timesteps are indexed t = 0 … T−1, β_t is the variance added at step t, and
//! ᾱ_t = ∏_{s ≤ t} (1 − β_s), so x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Shape of the β schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Linear β from `beta_start` to `beta_end` (Ho et al. 2020; DPS and DM-QSM).
    Linear,
    /// Cosine ᾱ (Nichol & Dhariwal 2021).
    Cosine,
}

/// A training noise schedule as stored in a model card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    /// β shape.
    pub kind: ScheduleKind,
    /// Number of training timesteps T.
    pub timesteps: usize,
    /// First β (linear only).
    pub beta_start: f64,
    /// Last β (linear only).
    pub beta_end: f64,
}

impl Default for ScheduleConfig {
    /// Linear β from 1e-4 to 0.02 over T = 1000, as in DDPM, DPS and DM-QSM.
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Linear,
            timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
        }
    }
}

/// Offset s of the cosine schedule (Nichol & Dhariwal 2021, §3.2).
const COSINE_OFFSET: f64 = 0.008;
/// Largest β of the cosine schedule (Nichol & Dhariwal clip at 0.999).
const COSINE_MAX_BETA: f64 = 0.999;

/// The discretised training schedule: β_t and ᾱ_t for t = 0 … T−1 (f64).
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    betas: Vec<f64>,
    alpha_bars: Vec<f64>,
}

impl NoiseSchedule {
    /// Builds β and ᾱ from a config.
    ///
    /// Linear: β_t = β_start + (β_end − β_start)·t/(T−1) (numpy `linspace`, as in DDPM;
    /// β_start/β_end are used as given, DPS's 1000/T rescaling is up to the model card).
    /// Cosine: β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999) with ᾱ(t) = f(t/T)/f(0),
    /// f(u) = cos²((u + 0.008)/1.008 · π/2) (improved-diffusion's `betas_for_alpha_bar`).
    /// Errors on T = 0 or β outside (0, 1).
    pub fn new(config: &ScheduleConfig) -> Result<Self> {
        let t_count = config.timesteps;
        if t_count == 0 {
            return Err(Error::Parameter(
                "schedule: timesteps must be at least 1".into(),
            ));
        }
        let betas: Vec<f64> = match config.kind {
            ScheduleKind::Linear => {
                let (b0, b1) = (config.beta_start, config.beta_end);
                if !(b0 > 0.0 && b0 < 1.0 && b1 > 0.0 && b1 < 1.0) {
                    return Err(Error::Parameter(format!(
                        "schedule: linear beta_start {b0} and beta_end {b1} must lie in (0, 1)"
                    )));
                }
                if t_count == 1 {
                    vec![b0]
                } else {
                    (0..t_count)
                        .map(|t| b0 + (b1 - b0) * t as f64 / (t_count - 1) as f64)
                        .collect()
                }
            }
            ScheduleKind::Cosine => {
                let f = |u: f64| {
                    let c = ((u + COSINE_OFFSET) / (1.0 + COSINE_OFFSET)
                        * std::f64::consts::FRAC_PI_2)
                        .cos();
                    c * c
                };
                (0..t_count)
                    .map(|t| {
                        let a = f(t as f64 / t_count as f64);
                        let b = f((t + 1) as f64 / t_count as f64);
                        (1.0 - b / a).min(COSINE_MAX_BETA)
                    })
                    .collect()
            }
        };
        let mut alpha_bars = Vec::with_capacity(t_count);
        let mut prod = 1.0_f64;
        for &b in &betas {
            prod *= 1.0 - b;
            alpha_bars.push(prod);
        }
        Ok(Self { betas, alpha_bars })
    }

    /// Number of training timesteps T.
    pub fn timesteps(&self) -> usize {
        self.betas.len()
    }

    /// β_t for t in 0 … T−1.
    pub fn betas(&self) -> &[f64] {
        &self.betas
    }

    /// ᾱ_t = ∏_{s ≤ t}(1 − β_s) for t in 0 … T−1.
    pub fn alpha_bars(&self) -> &[f64] {
        &self.alpha_bars
    }

    /// ᾱ_t; `None` maps to ᾱ_{−1} = 1 (the clean end of the chain).
    pub fn alpha_bar(&self, t: Option<usize>) -> f64 {
        match t {
            None => 1.0,
            Some(t) => self.alpha_bars[t.min(self.alpha_bars.len() - 1)],
        }
    }

    /// The N training timesteps visited by a re-spaced sampler, in sampling order
    /// (descending). t_i = round(i·(T−1)/(N−1)) for i = 0 … N−1 (round half up, in
    /// integers), so the chain starts at T−1, ends at 0, and N = T visits every step.
    /// Errors unless 1 ≤ N ≤ T.
    pub fn respace(&self, steps: usize) -> Result<Vec<usize>> {
        self.respace_from(steps, self.timesteps() - 1)
    }

    /// [`NoiseSchedule::respace`] for a chain that starts at training timestep `start`
    /// (an SDEdit warm start, Meng et al. ICLR 2022) instead of T−1:
    /// t_i = round(i·start/(N−1)), descending from `start` to 0. Errors unless
    /// `start` < T and 1 ≤ N ≤ start + 1.
    pub fn respace_from(&self, steps: usize, start: usize) -> Result<Vec<usize>> {
        let t_count = self.timesteps();
        if start >= t_count {
            return Err(Error::Parameter(format!(
                "schedule: start timestep {start} must be below the {t_count} training timesteps"
            )));
        }
        if steps == 0 || steps > start + 1 {
            return Err(Error::Parameter(format!(
                "schedule: {steps} sampling steps requested from timestep {start}; must be between 1 and {}",
                start + 1
            )));
        }
        if steps == 1 {
            return Ok(vec![start]);
        }
        let (n1, t1) = ((steps - 1) as u128, start as u128);
        let mut ts: Vec<usize> = (0..steps as u128)
            .map(|i| ((2 * i * t1 + n1) / (2 * n1)) as usize)
            .collect();
        ts.reverse();
        Ok(ts)
    }
}

/// Coefficients of one re-spaced sampling step from training timestep `t` to `t_prev`.
///
/// DDIM (Song et al. 2021, eq. 12): x_{prev} = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z
/// with σ = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev). η = 0 is deterministic DDIM,
/// η = 1 the ancestral DDPM posterior variance β̃ of the re-spaced chain.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepCoefficients {
    /// Training timestep index of x_t (what the model is told).
    pub t: usize,
    /// Training timestep of the next state; `None` after the last step (ᾱ = 1).
    pub t_prev: Option<usize>,
    /// ᾱ_t.
    pub alpha_bar: f64,
    /// ᾱ at `t_prev` (1 for the last step).
    pub alpha_bar_prev: f64,
    /// Standard deviation σ of the fresh noise added by this step.
    pub sigma: f64,
}

impl StepCoefficients {
    /// √ᾱ_t.
    pub fn sqrt_alpha_bar(&self) -> f64 {
        self.alpha_bar.sqrt()
    }
    /// √(1 − ᾱ_t).
    pub fn sqrt_one_minus_alpha_bar(&self) -> f64 {
        (1.0 - self.alpha_bar).sqrt()
    }
    /// Coefficient √(1 − ᾱ_prev − σ²) of ε̂ in the update (clamped at 0 against rounding).
    pub fn eps_coefficient(&self) -> f64 {
        (1.0 - self.alpha_bar_prev - self.sigma * self.sigma)
            .max(0.0)
            .sqrt()
    }
}

/// A re-spaced sampling schedule: N steps with their DDIM/DDPM coefficients, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingSchedule {
    steps: Vec<StepCoefficients>,
    eta: f64,
}

impl SamplingSchedule {
    /// Re-spaces `schedule` to `steps` steps (see [`NoiseSchedule::respace`]) with
    /// stochasticity η ≥ 0 (0 = DDIM, 1 = ancestral DDPM-like). Errors on bad N or η.
    pub fn new(schedule: &NoiseSchedule, steps: usize, eta: f64) -> Result<Self> {
        Self::from_timestep(schedule, steps, eta, schedule.timesteps() - 1)
    }

    /// A schedule of `steps` steps starting at training timestep `start` < T
    /// ([`NoiseSchedule::respace_from`]), for a warm start.
    pub fn from_timestep(
        schedule: &NoiseSchedule,
        steps: usize,
        eta: f64,
        start: usize,
    ) -> Result<Self> {
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(Error::Parameter(format!(
                "sampler: eta {eta} must be finite and non-negative"
            )));
        }
        let ts = schedule.respace_from(steps, start)?;
        let steps = ts
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let t_prev = ts.get(i + 1).copied();
                let a = schedule.alpha_bar(Some(t));
                let a_prev = schedule.alpha_bar(t_prev);
                let var = (1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev);
                let sigma = eta * var.max(0.0).sqrt();
                StepCoefficients {
                    t,
                    t_prev,
                    alpha_bar: a,
                    alpha_bar_prev: a_prev,
                    sigma,
                }
            })
            .collect();
        Ok(Self { steps, eta })
    }

    /// Number of sampling steps N.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Always false (a schedule has at least one step); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The η it was built with.
    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// Coefficients of sampling step k (0 = the noisiest).
    pub fn step(&self, k: usize) -> Option<&StepCoefficients> {
        self.steps.get(k)
    }

    /// All steps in sampling order.
    pub fn steps(&self) -> &[StepCoefficients] {
        &self.steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_matches_ddpm_endpoints() {
        let s = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
        assert_eq!(s.timesteps(), 1000);
        assert_eq!(s.betas()[0], 1e-4);
        assert!((s.betas()[999] - 0.02).abs() < 1e-15);
        // ᾱ_{T−1} of the DDPM linear schedule is about 4.04e-5 (independent: the closed
        // form exp(Σ ln(1−β)) computed here in a second way; tolerance is f64 round-off).
        let log_sum: f64 = s.betas().iter().map(|b| (1.0 - b).ln()).sum();
        assert!((s.alpha_bars()[999] - log_sum.exp()).abs() < 1e-15);
        assert!((s.alpha_bars()[999] - 4.04e-5).abs() < 1e-6);
        assert!(s.alpha_bars().windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn cosine_schedule_follows_closed_form_alpha_bar() {
        let cfg = ScheduleConfig {
            kind: ScheduleKind::Cosine,
            ..ScheduleConfig::default()
        };
        let s = NoiseSchedule::new(&cfg).unwrap();
        let f = |u: f64| {
            ((u + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                .cos()
                .powi(2)
        };
        // Away from the 0.999 clip, ᾱ_t = f((t+1)/T)/f(0) exactly up to round-off
        // accumulated over ≤ 1000 products (relative 1e-12 is ample).
        for t in [0usize, 10, 250, 500, 900] {
            let want = f((t + 1) as f64 / 1000.0) / f(0.0);
            assert!(
                (s.alpha_bars()[t] - want).abs() <= 1e-12 * want.max(1e-300) + 1e-15,
                "t={t}"
            );
        }
    }

    #[test]
    fn respacing_visits_both_ends_and_is_strictly_decreasing() {
        let s = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
        for n in [1usize, 2, 25, 50, 200, 999, 1000] {
            let ts = s.respace(n).unwrap();
            assert_eq!(ts.len(), n);
            assert_eq!(ts[0], 999);
            if n > 1 {
                assert_eq!(*ts.last().unwrap(), 0);
            }
            assert!(ts.windows(2).all(|w| w[0] > w[1]), "n={n}");
        }
        assert_eq!(
            s.respace(1000).unwrap(),
            (0..1000).rev().collect::<Vec<_>>()
        );
        assert!(s.respace(0).is_err());
        assert!(s.respace(1001).is_err());
        // Warm starts: from t0 = 50 in 8 steps (Flow-QSM's setting), every step visited
        // from t0 = 7 in 8 steps, and the bounds.
        let ts = s.respace_from(8, 50).unwrap();
        assert_eq!(ts, vec![50, 43, 36, 29, 21, 14, 7, 0]);
        assert_eq!(
            s.respace_from(8, 7).unwrap(),
            (0..8).rev().collect::<Vec<_>>()
        );
        assert_eq!(s.respace_from(1000, 999).unwrap(), s.respace(1000).unwrap());
        assert!(s.respace_from(9, 7).is_err());
        assert!(s.respace_from(4, 1000).is_err());
    }

    #[test]
    fn eta_one_at_full_length_is_the_ddpm_posterior_variance() {
        // With N = T, σ² must equal β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t (Ho et al. eq. 7).
        let s = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
        let ss = SamplingSchedule::new(&s, 1000, 1.0).unwrap();
        for c in ss.steps().iter().filter(|c| c.t > 0) {
            let t = c.t;
            let bt = (1.0 - s.alpha_bars()[t - 1]) / (1.0 - s.alpha_bars()[t]) * s.betas()[t];
            assert!(
                (c.sigma * c.sigma - bt).abs() < 1e-12 * bt.max(1e-12),
                "t={t}"
            );
        }
        let last = ss.steps().last().unwrap();
        assert_eq!(last.t_prev, None);
        assert_eq!(last.alpha_bar_prev, 1.0);
        assert_eq!(last.sigma, 0.0);
        let ddim = SamplingSchedule::new(&s, 25, 0.0).unwrap();
        assert!(ddim.steps().iter().all(|c| c.sigma == 0.0));
        assert!(SamplingSchedule::new(&s, 25, -1.0).is_err());
    }
}
