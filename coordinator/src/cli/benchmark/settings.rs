//! The resolved, validated settings of `dmqsm benchmark quality` ([`QualitySettings`],
//! from the arguments by [`resolve`]: `--quick` and the defaults applied).

use super::QualityArgs;
use super::cases::{Case, FIRST_HELD_OUT_SEED};
use anyhow::{Context, bail};
use dmqsm_common::diffusion::sampler::Guidance;
use dmqsm_common::tasks::ConsistencyTv;
use serde::Serialize;

/// Resolved settings of a quality benchmark (after `--quick` and the defaults).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QualitySettings {
    /// Phantom seeds.
    pub phantom_seeds: Vec<u64>,
    /// Phantom matrix (1 mm voxels).
    pub shape: [usize; 3],
    /// Cases.
    pub cases: Vec<Case>,
    /// Step counts.
    pub steps: Vec<usize>,
    /// Guidance modes (serialized by name).
    pub guidance: Vec<Guidance>,
    /// ξ sweep factors (× task default).
    pub xi_factors: Vec<f64>,
    /// Whether to run the overlap ablation.
    pub ablation: bool,
    /// Exact guidance runs only up to this many steps (`None`: all).
    pub exact_max_steps: Option<usize>,
    /// Whether to score the demo's configuration.
    pub demo: bool,
    /// Main-run overlap (voxels).
    pub overlap: usize,
    /// DDIM η.
    pub eta: f64,
    /// x̂_0 clamp (ppm).
    pub clamp_ppm: Option<[f64; 2]>,
    /// Sampler seed.
    pub seed: u64,
    /// Warm-start timesteps (`None`: from pure noise).
    pub starts: Vec<Option<usize>>,
    /// Posterior samples per DM-QSM run.
    pub samples: usize,
    /// TV α of the warm start (`None`: the L-curve corner).
    pub warm_start_alpha: Option<f64>,
    /// ξ of the main runs (`None`: the sampler's default).
    pub xi: Option<f64>,
    /// TV data-consistency factor of the `dipinv-physics` prox runs (`None`: plain CG).
    pub consistency_tv: Option<f64>,
}

fn parse_factors(raw: &[String], default: &[f64]) -> anyhow::Result<Vec<f64>> {
    if raw.is_empty() {
        return Ok(default.to_vec());
    }
    if raw.len() == 1 && raw[0].eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    raw.iter()
        .map(|s| {
            let v: f64 = s
                .trim()
                .parse()
                .with_context(|| format!("--xi-sweep: {s:?} is not a number"))?;
            if !(v.is_finite() && v > 0.0) {
                bail!("--xi-sweep: factor {v} must be finite and positive");
            }
            Ok(v)
        })
        .collect()
}

/// Resolves `args` into settings, validating them (clear errors, no panics).
pub fn resolve(args: &QualityArgs) -> anyhow::Result<QualitySettings> {
    if args.phantoms == 0 {
        bail!("--phantoms must be at least 1");
    }
    if args.phantom_seed < FIRST_HELD_OUT_SEED && !args.allow_training_seeds {
        bail!(
            "--phantom-seed {} is a training seed (< {FIRST_HELD_OUT_SEED}); evaluate on held-out seeds or pass --allow-training-seeds",
            args.phantom_seed
        );
    }
    let shape: [usize; 3] = match &args.shape {
        Some(s) if s.len() == 3 => [s[0], s[1], s[2]],
        Some(s) => bail!("--shape needs 3 values, got {s:?}"),
        None if args.quick => [64, 64, 48],
        None => [160, 192, 160],
    };
    if shape.iter().any(|&n| n < 8 || n % 2 != 0) {
        bail!("--shape {shape:?}: every axis must be even (×2 SR) and at least 8");
    }
    let cases = if args.cases.is_empty() {
        Case::ALL.to_vec()
    } else {
        dedup(&args.cases)
    };
    let steps = if args.steps.is_empty() {
        if args.quick { vec![10] } else { vec![50, 200] }
    } else {
        dedup(&args.steps)
    };
    if steps.iter().any(|&s| s == 0 || s > 1000) {
        bail!("--steps {steps:?}: each must be between 1 and 1000");
    }
    let guidance = if args.guidance.is_empty() {
        vec![Guidance::Approx, Guidance::Prox, Guidance::Exact]
    } else {
        dedup(&args.guidance)
    };
    let xi_factors = parse_factors(
        &args.xi_sweep,
        if args.quick {
            &[0.25, 4.0]
        } else {
            &[0.05, 0.25, 4.0]
        },
    )?;
    if !(args.eta.is_finite() && (0.0..=1.0).contains(&args.eta)) {
        bail!("--eta {} must be in [0, 1]", args.eta);
    }
    let clamp_ppm = if args.clamp_ppm.trim().eq_ignore_ascii_case("none") {
        None
    } else {
        let v: Vec<f64> = args
            .clamp_ppm
            .split(',')
            .map(|x| x.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("--clamp-ppm {:?}: expected LO,HI or none", args.clamp_ppm))?;
        match v[..] {
            [lo, hi] if lo.is_finite() && hi.is_finite() && lo < hi => Some([lo, hi]),
            _ => bail!(
                "--clamp-ppm {:?}: expected LO,HI with LO < HI, or none",
                args.clamp_ppm
            ),
        }
    };
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if args.samples == 0 || args.samples > 64 {
        bail!("--samples {} must be between 1 and 64", args.samples);
    }
    let starts: Vec<Option<usize>> = if args.start_timesteps.is_empty() {
        vec![None]
    } else {
        args.start_timesteps
            .iter()
            .map(|v| {
                let v = v.trim();
                if v.eq_ignore_ascii_case("none") {
                    return Ok(None);
                }
                let t: usize = v.parse().with_context(|| {
                    format!("--start-timesteps: {v:?} is not a timestep or none")
                })?;
                if t == 0 || t >= 1000 {
                    bail!("--start-timesteps: {t} must be between 1 and 999");
                }
                Ok(Some(t))
            })
            .collect::<anyhow::Result<_>>()?
    };
    if let Some(t) = starts
        .iter()
        .flatten()
        .find(|&&t| steps.iter().all(|&n| n > t + 1))
    {
        bail!(
            "--start-timesteps {t}: a warm start at t₀ allows at most t₀ + 1 steps, and every --steps value {steps:?} is larger"
        );
    }
    Ok(QualitySettings {
        phantom_seeds: (0..args.phantoms as u64)
            .map(|i| args.phantom_seed + i)
            .collect(),
        shape,
        cases,
        steps,
        guidance,
        xi_factors,
        ablation: !args.no_ablation,
        exact_max_steps: (args.exact_max_steps > 0).then_some(args.exact_max_steps),
        demo: !args.quick && !args.no_demo,
        overlap: args.overlap,
        eta: args.eta,
        clamp_ppm,
        seed: args.seed,
        starts: dedup(&starts),
        samples: args.samples,
        xi: match args.xi {
            Some(x) if !(x.is_finite() && x > 0.0) => bail!("--xi {x} must be finite and positive"),
            x => x,
        },
        consistency_tv: match args.consistency_tv.as_deref().map(str::trim) {
            None => Some(ConsistencyTv::DEFAULT_FACTOR),
            Some(v) if v.eq_ignore_ascii_case("none") => None,
            Some(v) => match v.parse::<f64>() {
                Ok(f) if f.is_finite() && f > 0.0 => Some(f),
                _ => bail!("--consistency-tv {v}: expected a positive factor or none"),
            },
        },
        warm_start_alpha: match args.warm_start_alpha {
            Some(a) if !(a.is_finite() && a > 0.0) => {
                bail!("--warm-start-alpha {a} must be finite and positive")
            }
            a => a,
        },
    })
}

impl QualitySettings {
    /// Whether the main table runs guidance `g` at `steps` (exact is capped).
    pub(super) fn runs(&self, g: Guidance, steps: usize) -> bool {
        g != Guidance::Exact || self.exact_max_steps.is_none_or(|m| steps <= m)
    }

    /// The warm starts that `steps` steps can use (a start at t₀ allows ≤ t₀ + 1 steps).
    pub(super) fn starts_for(&self, steps: usize) -> impl Iterator<Item = Option<usize>> + '_ {
        self.starts
            .iter()
            .copied()
            .filter(move |s| s.is_none_or(|t| steps <= t + 1))
    }
}

fn dedup<T: PartialEq + Copy>(v: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for &x in v {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn resolve_rejects_training_seeds_and_bad_shapes() {
        let mut a = QualityArgs {
            model: None,
            analytic_prior: Some(0.05),
            analytic_patch: 16,
            out: PathBuf::from("x"),
            quick: true,
            phantoms: 1,
            phantom_seed: 5,
            allow_training_seeds: false,
            shape: None,
            cases: vec![],
            steps: vec![],
            guidance: vec![],
            xi_sweep: vec![],
            no_ablation: false,
            exact_max_steps: 50,
            no_demo: false,
            overlap: 8,
            eta: 1.0,
            clamp_ppm: "-1,1".into(),
            seed: 0,
            start_timesteps: vec![],
            samples: 1,
            warm_start_alpha: None,
            consistency_tv: None,
            xi: None,
            max_batch: 8,
            threads: None,
        };
        assert!(resolve(&a).is_err());
        a.phantom_seed = 1000;
        let s = resolve(&a).unwrap();
        assert_eq!(s.shape, [64, 64, 48]);
        assert_eq!(s.steps, vec![10]);
        assert_eq!(s.cases.len(), Case::ALL.len());
        assert_eq!(s.starts, vec![None]);
        assert_eq!(
            s.guidance,
            vec![Guidance::Approx, Guidance::Prox, Guidance::Exact]
        );
        assert!(!s.demo, "--quick skips the demo rows");
        // Exact guidance is capped at --exact-max-steps; 0 lifts the cap.
        assert!(s.runs(Guidance::Exact, 50) && !s.runs(Guidance::Exact, 200));
        assert!(s.runs(Guidance::Prox, 200));
        a.exact_max_steps = 0;
        assert!(resolve(&a).unwrap().runs(Guidance::Exact, 200));
        a.quick = false;
        assert!(resolve(&a).unwrap().demo);
        a.quick = true;
        a.shape = Some(vec![33, 32, 32]);
        assert!(resolve(&a).is_err());
        a.shape = None;
        a.xi_sweep = vec!["none".into()];
        assert!(resolve(&a).unwrap().xi_factors.is_empty());
        a.xi_sweep = vec!["-1".into()];
        assert!(resolve(&a).is_err());
        a.xi_sweep = vec![];
        assert_eq!(resolve(&a).unwrap().clamp_ppm, Some([-1.0, 1.0]));
        a.clamp_ppm = "none".into();
        assert_eq!(resolve(&a).unwrap().clamp_ppm, None);
        a.clamp_ppm = "1,-1".into();
        assert!(resolve(&a).is_err());
    }
}
