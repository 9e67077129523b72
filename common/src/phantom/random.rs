//! A small seeded random source for the phantom generator (SplitMix64, Steele et al. 2014).
//!
//! Kept in-crate so phantoms are bitwise reproducible whatever the version of a random
//! crate, and split into named streams so that changing one setting (say the number of
//! veins) leaves the other random draws (texture, shape) unchanged.

use crate::splitmix::{GAMMA, mix64};

/// Named, independent random streams of one phantom seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    /// Shape jitter of the compartments and nuclei.
    Shape = 1,
    /// Per-region value jitter.
    Values = 2,
    /// Smooth noise fields (outline, folding, texture).
    Fields = 3,
    /// Vein paths and radii.
    Veins = 4,
    /// Calcifications and haemorrhages.
    Lesions = 5,
}

/// SplitMix64 generator with a few distributions.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    state: u64,
}

impl Rng {
    /// The generator of `stream` for phantom `seed`.
    pub(crate) fn new(seed: u64, stream: Stream) -> Self {
        let state = mix64(seed ^ mix64((stream as u64).wrapping_mul(GAMMA).wrapping_add(GAMMA)));
        Self { state }
    }

    /// Next raw 64-bit value.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix64(self.state)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub(crate) fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [lo, hi] (inclusive).
    pub(crate) fn int(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.uniform() * (hi - lo + 1) as f64) as usize
    }

    /// Standard normal (Box–Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniformly distributed unit vector.
    pub(crate) fn unit_vector(&mut self) -> [f64; 3] {
        let z = self.range(-1.0, 1.0);
        let phi = self.range(0.0, std::f64::consts::TAU);
        let r = (1.0 - z * z).max(0.0).sqrt();
        [r * phi.cos(), r * phi.sin(), z]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = {
            let mut r = Rng::new(7, Stream::Veins);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(7, Stream::Veins);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = Rng::new(7, Stream::Shape);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn uniform_and_normal_moments() {
        // 20 000 draws: the standard error of the mean is 1/sqrt(12·20000) ≈ 0.002 for
        // the uniform and 0.007 for the normal; 5 standard errors are allowed.
        let mut r = Rng::new(1, Stream::Fields);
        let n = 20_000;
        let u: f64 = (0..n).map(|_| r.uniform()).sum::<f64>() / n as f64;
        assert!((u - 0.5).abs() < 0.01, "uniform mean {u}");
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let m = xs.iter().sum::<f64>() / n as f64;
        let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.035, "normal mean {m}");
        assert!((v - 1.0).abs() < 0.05, "normal variance {v}");
    }
}
