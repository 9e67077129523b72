//! Image-quality metrics of a χ reconstruction against a ground truth, inside a mask,
//! with the QSM Challenge 2.0 definitions (Bilgic et al. 2021; the QSM-CI scorer;
//! REFERENCE.md §6).
//!
//! Notation: x = reconstruction, y = truth, M = mask (voxels with value > 0.5),
//! x̃ = x − mean_M(x), ỹ = y − mean_M(y), ‖·‖ the L2 norm over M.
//!
//! - RMSE (ppm): sqrt(mean_M (x − y)²), not demeaned.
//! - NRMSE (%): 100 · ‖x̃ − ỹ‖ / ‖ỹ‖.
//! - Detrended NRMSE (%): least-squares fit x̃ ≈ a·ỹ + b, x' = (x̃ − b)/a, then
//!   100 · ‖x' − ỹ‖ / ‖ỹ‖. Removes a global scaling error; equals 100·sqrt(1/CC² − 1).
//! - HFEN (%): 100 · ‖LoG(x) − LoG(y)‖ / ‖LoG(y)‖, LoG the Laplacian of Gaussian with
//!   σ = 1.5 voxels truncated at 5σ (radius 8), applied to the whole volume (scipy
//!   `gaussian_laplace` conventions, `reflect` boundary) and then masked.
//! - XSIM: the SSIM form ((2μₓμᵧ + C1)(2σₓᵧ + C2)) / ((μₓ² + μᵧ² + C1)(σₓ² + σᵧ² + C2)) with
//!   C1 = 1e-4, C2 = 1e-6 (K1 = 0.01, K2 = 0.001, L = 1 ppm; Milovic et al. 2024), local
//!   statistics over a 5 × 5 × 5 uniform window (`reflect` boundary, sample covariance
//!   N/(N − 1) as scikit-image's default), averaged over M.
//! - CC: Pearson correlation over M.
//! - Deep grey-matter linearity: per-region means of x and y over M, the least-squares
//!   slope of recon means against truth means, reported as |1 − slope|.
//!
//! [`calibration`] scores a posterior std map against the error (rank correlation,
//! ±2σ coverage).
//!
//! Inputs must share a shape and voxel size and be finite everywhere (the filters see the
//! whole volume); the mask must select at least one voxel.

pub mod calibration;
mod filters;
pub mod seams;
#[cfg(test)]
mod tests;

use crate::error::{Error, Result};
use crate::volume::Volume;
use ndarray::{Array3, Zip};
use serde::Serialize;

/// σ of the HFEN Laplacian of Gaussian, in voxels.
pub const HFEN_SIGMA_VOXELS: f64 = 1.5;
/// Truncation of the HFEN Gaussian, in σ.
pub const HFEN_TRUNCATE: f64 = 5.0;
/// Edge of the cubic XSIM window, in voxels.
pub const XSIM_WINDOW: usize = 5;
/// XSIM luminance constant C1 = (K1·L)² with K1 = 0.01, L = 1 ppm.
pub const XSIM_C1: f64 = 1e-4;
/// XSIM contrast constant C2 = (K2·L)² with K2 = 0.001, L = 1 ppm.
pub const XSIM_C2: f64 = 1e-6;

/// The metrics of one reconstruction (see the module docs for the definitions).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// Number of mask voxels the metrics were computed over.
    pub voxels: usize,
    /// Root-mean-square error (ppm).
    pub rmse: f64,
    /// Demeaned normalised RMSE (%).
    pub nrmse: f64,
    /// NRMSE after removing a linear trend (%); `None` when the reconstruction is
    /// uncorrelated with the truth (fitted slope 0).
    pub nrmse_detrended: Option<f64>,
    /// High-frequency error norm (%).
    pub hfen: f64,
    /// Structural similarity for QSM (1 = identical).
    pub xsim: f64,
    /// Pearson correlation (0 when the reconstruction is constant in the mask).
    pub cc: f64,
    /// Deep grey-matter linearity, when a label map was given and ≥ 2 regions with
    /// distinct truth means are in the mask.
    pub deep_gm: Option<RegionFit>,
}

/// Linear fit of per-region mean χ, reconstruction against truth.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegionFit {
    /// Least-squares slope of recon means vs truth means (1 = no under/over-estimation).
    pub slope: f64,
    /// Intercept of the fit (ppm).
    pub intercept: f64,
    /// |1 − slope|, the Challenge 2.0 linearity error.
    pub linearity: f64,
    /// The labels that were used (those with voxels inside the mask).
    pub regions: Vec<u8>,
    /// Per region: (truth mean, recon mean) in ppm, in the order of `regions`.
    pub means: Vec<(f64, f64)>,
}

/// Validated inputs: f64 copies of recon and truth and the mask as booleans.
struct Inputs {
    x: Array3<f64>,
    y: Array3<f64>,
    m: Array3<bool>,
    count: usize,
}

fn check_finite(v: &Volume, name: &str) -> Result<()> {
    let mut bad = 0usize;
    let mut first = None;
    for (idx, x) in v.data.indexed_iter() {
        if !x.is_finite() {
            bad += 1;
            first.get_or_insert(idx);
        }
    }
    match first {
        None => Ok(()),
        Some((i, j, k)) => Err(Error::NonFinite(format!(
            "{name}: {bad} non-finite voxel(s), first at [{i}, {j}, {k}]"
        ))),
    }
}

fn check_same_grid(a: &Volume, b: &Volume, na: &str, nb: &str) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::Shape(format!(
            "{na} shape {:?} differs from {nb} shape {:?}",
            a.shape(),
            b.shape()
        )));
    }
    let close = a
        .voxel_size
        .iter()
        .zip(&b.voxel_size)
        .all(|(p, q)| (p - q).abs() <= 1e-3 * p.abs().max(q.abs()));
    if !close {
        return Err(Error::Shape(format!(
            "{na} voxel size {:?} mm differs from {nb} voxel size {:?} mm",
            a.voxel_size, b.voxel_size
        )));
    }
    Ok(())
}

impl Inputs {
    fn new(recon: &Volume, truth: &Volume, mask: &Volume) -> Result<Self> {
        check_same_grid(recon, truth, "recon", "truth")?;
        check_same_grid(mask, truth, "mask", "truth")?;
        check_finite(recon, "recon")?;
        check_finite(truth, "truth")?;
        check_finite(mask, "mask")?;
        let m = mask.data.mapv(|v| v > 0.5);
        let count = m.iter().filter(|&&b| b).count();
        if count == 0 {
            return Err(Error::Parameter(
                "mask is empty: no voxel has a value above 0.5".into(),
            ));
        }
        Ok(Self {
            x: recon.data.mapv(f64::from),
            y: truth.data.mapv(f64::from),
            m,
            count,
        })
    }

    /// Means of x and y over the mask.
    fn means(&self) -> (f64, f64) {
        let (sx, sy) = Zip::from(&self.x).and(&self.y).and(&self.m).fold(
            (0.0, 0.0),
            |(sx, sy), &x, &y, &m| {
                if m { (sx + x, sy + y) } else { (sx, sy) }
            },
        );
        (sx / self.count as f64, sy / self.count as f64)
    }

    /// (Σx̃², Σỹ², Σx̃ỹ) over the mask.
    fn moments(&self) -> (f64, f64, f64) {
        let (mx, my) = self.means();
        Zip::from(&self.x).and(&self.y).and(&self.m).fold(
            (0.0, 0.0, 0.0),
            |(xx, yy, xy), &x, &y, &m| {
                if m {
                    let (a, b) = (x - mx, y - my);
                    (xx + a * a, yy + b * b, xy + a * b)
                } else {
                    (xx, yy, xy)
                }
            },
        )
    }

    fn rmse(&self) -> f64 {
        let s = Zip::from(&self.x)
            .and(&self.y)
            .and(&self.m)
            .fold(
                0.0,
                |s, &x, &y, &m| if m { s + (x - y) * (x - y) } else { s },
            );
        (s / self.count as f64).sqrt()
    }

    fn nrmse(&self) -> Result<f64> {
        let (xx, yy, xy) = self.moments();
        if yy <= 0.0 {
            return Err(Error::Parameter(
                "truth is constant inside the mask; NRMSE is undefined".into(),
            ));
        }
        // ‖x̃ − ỹ‖² = Σx̃² − 2Σx̃ỹ + Σỹ², clamped against rounding below zero.
        Ok(100.0 * ((xx - 2.0 * xy + yy).max(0.0) / yy).sqrt())
    }

    fn nrmse_detrended(&self) -> Result<Option<f64>> {
        let (mx, my) = self.means();
        let (_, yy, xy) = self.moments();
        if yy <= 0.0 {
            return Err(Error::Parameter(
                "truth is constant inside the mask; NRMSE is undefined".into(),
            ));
        }
        // Least squares x̃ ≈ a·ỹ + b; both are demeaned over M, so b = 0 up to rounding.
        let a = xy / yy;
        if a == 0.0 || !a.is_finite() {
            return Ok(None);
        }
        let s = Zip::from(&self.x)
            .and(&self.y)
            .and(&self.m)
            .fold(0.0, |s, &x, &y, &m| {
                if m {
                    let e = (x - mx) / a - (y - my);
                    s + e * e
                } else {
                    s
                }
            });
        Ok(Some(100.0 * (s / yy).sqrt()))
    }

    fn cc(&self) -> f64 {
        let (xx, yy, xy) = self.moments();
        if xx <= 0.0 || yy <= 0.0 {
            return 0.0;
        }
        xy / (xx * yy).sqrt()
    }

    fn hfen(&self) -> Result<f64> {
        let ly = filters::log_filter(&self.y, HFEN_SIGMA_VOXELS, HFEN_TRUNCATE);
        let d = &self.x - &self.y;
        // LoG is linear: LoG(x) − LoG(y) = LoG(x − y).
        let ld = filters::log_filter(&d, HFEN_SIGMA_VOXELS, HFEN_TRUNCATE);
        let (num, den) =
            Zip::from(&ld)
                .and(&ly)
                .and(&self.m)
                .fold(
                    (0.0, 0.0),
                    |(n, d), &a, &b, &m| {
                        if m { (n + a * a, d + b * b) } else { (n, d) }
                    },
                );
        if den <= 0.0 {
            return Err(Error::Parameter(
                "LoG of the truth is zero inside the mask; HFEN is undefined".into(),
            ));
        }
        Ok(100.0 * (num / den).sqrt())
    }

    fn xsim(&self) -> f64 {
        let u = |a: &Array3<f64>| filters::uniform_filter(a, XSIM_WINDOW);
        let ux = u(&self.x);
        let uy = u(&self.y);
        let uxx = u(&(&self.x * &self.x));
        let uyy = u(&(&self.y * &self.y));
        let uxy = u(&(&self.x * &self.y));
        let np = XSIM_WINDOW.pow(3) as f64;
        let cov_norm = np / (np - 1.0);
        let mut sum = 0.0;
        Zip::from(&ux)
            .and(&uy)
            .and(&uxx)
            .and(&uyy)
            .and(&uxy)
            .and(&self.m)
            .for_each(|&mx, &my, &xx, &yy, &xy, &m| {
                if m {
                    let vx = cov_norm * (xx - mx * mx);
                    let vy = cov_norm * (yy - my * my);
                    let vxy = cov_norm * (xy - mx * my);
                    sum += ((2.0 * mx * my + XSIM_C1) * (2.0 * vxy + XSIM_C2))
                        / ((mx * mx + my * my + XSIM_C1) * (vx + vy + XSIM_C2));
                }
            });
        sum / self.count as f64
    }

    fn region_fit(&self, labels: &Array3<u8>, regions: &[u8]) -> Result<Option<RegionFit>> {
        if labels.dim() != self.m.dim() {
            return Err(Error::Shape(format!(
                "label map shape {:?} differs from truth shape {:?}",
                labels.shape(),
                self.m.shape()
            )));
        }
        let mut used = Vec::new();
        let mut means = Vec::new();
        for &r in regions {
            if used.contains(&r) {
                continue;
            }
            let (sx, sy, n) = Zip::from(&self.x)
                .and(&self.y)
                .and(&self.m)
                .and(labels)
                .fold((0.0, 0.0, 0usize), |(sx, sy, n), &x, &y, &m, &l| {
                    if m && l == r {
                        (sx + x, sy + y, n + 1)
                    } else {
                        (sx, sy, n)
                    }
                });
            if n > 0 {
                used.push(r);
                means.push((sy / n as f64, sx / n as f64));
            }
        }
        if means.len() < 2 {
            return Ok(None);
        }
        let k = means.len() as f64;
        let mt = means.iter().map(|m| m.0).sum::<f64>() / k;
        let mr = means.iter().map(|m| m.1).sum::<f64>() / k;
        let stt: f64 = means.iter().map(|m| (m.0 - mt) * (m.0 - mt)).sum();
        let str_: f64 = means.iter().map(|m| (m.0 - mt) * (m.1 - mr)).sum();
        if stt <= 0.0 {
            return Ok(None);
        }
        let slope = str_ / stt;
        Ok(Some(RegionFit {
            slope,
            intercept: mr - slope * mt,
            linearity: (1.0 - slope).abs(),
            regions: used,
            means,
        }))
    }

    fn all(&self) -> Result<Metrics> {
        Ok(Metrics {
            voxels: self.count,
            rmse: self.rmse(),
            nrmse: self.nrmse()?,
            nrmse_detrended: self.nrmse_detrended()?,
            hfen: self.hfen()?,
            xsim: self.xsim(),
            cc: self.cc(),
            deep_gm: None,
        })
    }
}

/// All metrics of `recon` against `truth` inside `mask` (χ in ppm).
///
/// Errors: [`Error::Shape`] if shapes or voxel sizes differ, [`Error::NonFinite`] if any
/// input holds NaN/∞, [`Error::Parameter`] if the mask is empty or the truth is constant
/// inside it.
pub fn evaluate(recon: &Volume, truth: &Volume, mask: &Volume) -> Result<Metrics> {
    Inputs::new(recon, truth, mask)?.all()
}

/// [`evaluate`] plus the deep grey-matter linearity over the label values `regions` of
/// `labels` (e.g. the phantom's [`crate::phantom::Label::DEEP_GREY_MATTER`] as `u8`).
pub fn evaluate_with_labels(
    recon: &Volume,
    truth: &Volume,
    mask: &Volume,
    labels: &Array3<u8>,
    regions: &[u8],
) -> Result<Metrics> {
    let inputs = Inputs::new(recon, truth, mask)?;
    let mut m = inputs.all()?;
    m.deep_gm = inputs.region_fit(labels, regions)?;
    Ok(m)
}

/// The deep grey-matter labels of [`crate::phantom::Label`] as `u8`, for
/// [`evaluate_with_labels`].
pub fn deep_grey_matter_regions() -> Vec<u8> {
    crate::phantom::Label::DEEP_GREY_MATTER
        .iter()
        .map(|&l| l as u8)
        .collect()
}

/// RMSE (ppm) inside the mask. Errors as [`evaluate`].
pub fn rmse(recon: &Volume, truth: &Volume, mask: &Volume) -> Result<f64> {
    Ok(Inputs::new(recon, truth, mask)?.rmse())
}

/// Demeaned NRMSE (%) inside the mask. Errors as [`evaluate`].
pub fn nrmse(recon: &Volume, truth: &Volume, mask: &Volume) -> Result<f64> {
    Inputs::new(recon, truth, mask)?.nrmse()
}

/// Detrended NRMSE (%) inside the mask; `None` when the fitted slope is 0.
pub fn nrmse_detrended(recon: &Volume, truth: &Volume, mask: &Volume) -> Result<Option<f64>> {
    Inputs::new(recon, truth, mask)?.nrmse_detrended()
}

/// HFEN (%) inside the mask. Errors as [`evaluate`], and if LoG(truth) is 0 in the mask.
pub fn hfen(recon: &Volume, truth: &Volume, mask: &Volume) -> Result<f64> {
    Inputs::new(recon, truth, mask)?.hfen()
}

/// XSIM averaged over the mask (defined for constant volumes too).
pub fn xsim(recon: &Volume, truth: &Volume, mask: &Volume) -> Result<f64> {
    Ok(Inputs::new(recon, truth, mask)?.xsim())
}

/// Pearson correlation inside the mask (0 if the reconstruction is constant there).
pub fn pearson(recon: &Volume, truth: &Volume, mask: &Volume) -> Result<f64> {
    Ok(Inputs::new(recon, truth, mask)?.cc())
}

/// Linear fit of per-region means (see [`RegionFit`]); `None` when fewer than two of
/// `regions` have voxels in the mask or their truth means are all equal.
pub fn region_linearity(
    recon: &Volume,
    truth: &Volume,
    mask: &Volume,
    labels: &Array3<u8>,
    regions: &[u8],
) -> Result<Option<RegionFit>> {
    Inputs::new(recon, truth, mask)?.region_fit(labels, regions)
}

/// Laplacian of Gaussian of `data` (σ and truncation in voxels and σ; scipy
/// `gaussian_laplace` conventions with `reflect` boundary), as used by HFEN.
///
/// Errors: [`Error::Parameter`] for a non-positive σ or truncation, [`Error::NonFinite`]
/// for NaN/∞ input.
pub fn laplacian_of_gaussian(
    data: &Array3<f32>,
    sigma_voxels: f64,
    truncate: f64,
) -> Result<Array3<f64>> {
    if !(sigma_voxels.is_finite() && sigma_voxels > 0.0 && truncate.is_finite() && truncate > 0.0) {
        return Err(Error::Parameter(format!(
            "LoG sigma ({sigma_voxels}) and truncate ({truncate}) must be finite and positive"
        )));
    }
    if data.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite("LoG input holds NaN or infinity".into()));
    }
    Ok(filters::log_filter(
        &data.mapv(f64::from),
        sigma_voxels,
        truncate,
    ))
}
