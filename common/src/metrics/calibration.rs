//! Calibration of a posterior standard-deviation map against the actual error.
//!
//! For K posterior samples with mean x̄ and voxelwise standard deviation σ, inside the
//! mask M (voxels > 0.5):
//! - the Spearman rank correlation ρ(σ, |x̄ − y|): does the std map point at the voxels
//!   that are wrong (1: perfectly ordered, 0: uninformative);
//! - the coverage: the fraction of voxels with |x̄ − y| ≤ 2σ (about 0.95 for a calibrated
//!   Gaussian posterior).
//!
//! Ties get their average rank (the usual Spearman definition, as `scipy.stats.spearmanr`).

use crate::error::{Error, Result};
use crate::volume::Volume;
use serde::Serialize;

/// Calibration figures of a std map (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Calibration {
    /// Spearman rank correlation of σ with |x̄ − y| inside the mask.
    pub spearman: f64,
    /// Fraction of mask voxels with |x̄ − y| ≤ 2σ.
    pub coverage_2sigma: f64,
}

/// Calibration of `std` (ppm) for the estimate `mean` (ppm) against `truth` inside
/// `mask`. All four must share a shape; errors on an empty mask or non-finite values.
pub fn calibration(
    mean: &Volume,
    std: &Volume,
    truth: &Volume,
    mask: &Volume,
) -> Result<Calibration> {
    let shape = truth.shape();
    for (v, what) in [(mean, "mean"), (std, "std"), (mask, "mask")] {
        if v.shape() != shape {
            return Err(Error::Shape(format!(
                "calibration: {what} has shape {:?}, truth {shape:?}",
                v.shape()
            )));
        }
    }
    let mut sigma = Vec::new();
    let mut err = Vec::new();
    for (((&m, &x), &s), &y) in mask
        .data
        .iter()
        .zip(mean.data.iter())
        .zip(std.data.iter())
        .zip(truth.data.iter())
    {
        if m > 0.5 {
            if !(x.is_finite() && s.is_finite() && y.is_finite()) {
                return Err(Error::NonFinite(
                    "calibration: a non-finite value in the mask".into(),
                ));
            }
            sigma.push(s as f64);
            err.push((x as f64 - y as f64).abs());
        }
    }
    if sigma.is_empty() {
        return Err(Error::Parameter("calibration: the mask is empty".into()));
    }
    let covered = sigma
        .iter()
        .zip(&err)
        .filter(|(s, e)| **e <= 2.0 * **s)
        .count();
    Ok(Calibration {
        spearman: pearson(&ranks(&sigma), &ranks(&err)),
        coverage_2sigma: covered as f64 / sigma.len() as f64,
    })
}

/// Average ranks (1-based) of `v`, ties sharing their mean rank.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Pearson correlation (0 when either side is constant).
fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma).powi(2);
        sbb += (y - mb).powi(2);
    }
    if saa > 0.0 && sbb > 0.0 {
        sab / (saa * sbb).sqrt()
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    fn vol(v: Vec<f32>) -> Volume {
        let n = v.len();
        Volume::new(Array3::from_shape_vec([n, 1, 1], v).unwrap(), [1.0; 3])
    }

    /// Hand-computed cases: ranks with ties as scipy.stats.rankdata; a std map that
    /// orders the errors exactly has ρ = 1, a reversed one −1; coverage counts |e| ≤ 2σ.
    #[test]
    fn hand_computed_cases() {
        assert_eq!(ranks(&[3.0, 1.0, 2.0, 2.0]), vec![4.0, 1.0, 2.5, 2.5]);
        let truth = vol(vec![0.0; 5]);
        let mask = vol(vec![1.0, 1.0, 1.0, 1.0, 0.0]);
        let mean = vol(vec![0.1, -0.2, 0.3, 0.4, 9.0]);
        let std = vol(vec![0.05, 0.1, 0.1, 0.3, 0.0]);
        let c = calibration(&mean, &std, &truth, &mask).unwrap();
        // |e| = 0.1, 0.2, 0.3, 0.4 (ranks 1..4); σ ranks 1, 2.5, 2.5, 4 → ρ = 0.9487.
        assert!((c.spearman - 0.948_683_298).abs() < 1e-6, "{c:?}");
        // 0.1 ≤ 0.1, 0.2 ≤ 0.2, 0.3 > 0.2, 0.4 ≤ 0.6 → 3/4.
        assert_eq!(c.coverage_2sigma, 0.75);
        let rev = vol(vec![0.4, 0.3, 0.2, 0.1, 0.0]);
        assert!((calibration(&mean, &rev, &truth, &mask).unwrap().spearman + 1.0).abs() < 1e-12);
        assert!(calibration(&mean, &std, &truth, &vol(vec![0.0; 5])).is_err());
        assert!(calibration(&vol(vec![0.0; 4]), &std, &truth, &mask).is_err());
    }
}
