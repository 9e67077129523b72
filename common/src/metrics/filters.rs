//! Separable 3D filters with scipy.ndimage conventions: symmetric 1D kernels applied along
//! each axis, `reflect` boundary (d c b a | a b c d | d c b a), f64 throughout.

use ndarray::{Array3, Axis, Zip};
use rayon::prelude::*;

/// Index into a lane of length `n` with scipy's `reflect` boundary (edge sample repeated).
#[inline]
pub(crate) fn reflect(idx: isize, n: usize) -> usize {
    let n = n as isize;
    let period = 2 * n;
    let m = idx.rem_euclid(period);
    (if m < n { m } else { period - 1 - m }) as usize
}

/// Correlates every lane along `axis` with the odd-length `kernel` (centred) into a new
/// array. Symmetric kernels make this the same as convolution.
///
/// For axes 0 and 1 of a standard-layout array the sum runs over whole contiguous rows
/// (out[o, i, :] += k_t · in[o, reflect(i + t − r), :]), which is cache-friendly; axis 2
/// (contiguous lanes) and other layouts go lane by lane.
pub(crate) fn filter_axis(data: &Array3<f64>, axis: usize, kernel: &[f64]) -> Array3<f64> {
    let r = (kernel.len() / 2) as isize;
    let mut out = Array3::<f64>::zeros(data.raw_dim());
    let (d0, d1, d2) = data.dim();
    let dims = [d0, d1, d2];
    if axis < 2
        && let (Some(src), Some(dst)) = (data.as_slice(), out.as_slice_mut())
    {
        let n = dims[axis];
        let inner: usize = dims[axis + 1..].iter().product();
        if inner > 0 {
            dst.par_chunks_mut(inner).enumerate().for_each(|(row, o)| {
                let (outer, i) = (row / n, row % n);
                for (t, &kv) in kernel.iter().enumerate() {
                    let s = reflect(i as isize + t as isize - r, n);
                    let base = (outer * n + s) * inner;
                    for (ov, &iv) in o.iter_mut().zip(&src[base..base + inner]) {
                        *ov += kv * iv;
                    }
                }
            });
        }
        return out;
    }
    Zip::from(out.lanes_mut(Axis(axis)))
        .and(data.lanes(Axis(axis)))
        .par_for_each(|mut o, i| {
            let n = i.len();
            let padded: Vec<f64> = (-r..n as isize + r).map(|t| i[reflect(t, n)]).collect();
            for (t, ov) in o.iter_mut().enumerate() {
                *ov = kernel
                    .iter()
                    .zip(&padded[t..t + kernel.len()])
                    .map(|(k, v)| k * v)
                    .sum();
            }
        });
    out
}

/// Applies `kernels[a]` along axis `a` for a = 0, 1, 2.
pub(crate) fn separable(data: &Array3<f64>, kernels: [&[f64]; 3]) -> Array3<f64> {
    let a = filter_axis(data, 0, kernels[0]);
    let b = filter_axis(&a, 1, kernels[1]);
    filter_axis(&b, 2, kernels[2])
}

/// scipy's sampled Gaussian kernel (`_gaussian_kernel1d`): radius ⌊truncate·σ + 0.5⌋,
/// weights exp(−t²/2σ²) normalised to sum 1, times the `order`-th derivative polynomial
/// (order 0: 1; order 2: t²/σ⁴ − 1/σ²).
pub(crate) fn gaussian_kernel(sigma: f64, truncate: f64, order: u8) -> Vec<f64> {
    let radius = (truncate * sigma + 0.5) as isize;
    let s2 = sigma * sigma;
    let phi: Vec<f64> = (-radius..=radius)
        .map(|t| (-0.5 * (t * t) as f64 / s2).exp())
        .collect();
    let sum: f64 = phi.iter().sum();
    (-radius..=radius)
        .zip(phi)
        .map(|(t, p)| {
            let p = p / sum;
            match order {
                0 => p,
                _ => p * ((t * t) as f64 / (s2 * s2) - 1.0 / s2),
            }
        })
        .collect()
}

/// Laplacian of Gaussian: Σₐ (G'' along a, G along the others), as
/// `scipy.ndimage.gaussian_laplace`.
pub(crate) fn log_filter(data: &Array3<f64>, sigma: f64, truncate: f64) -> Array3<f64> {
    let g0 = gaussian_kernel(sigma, truncate, 0);
    let g2 = gaussian_kernel(sigma, truncate, 2);
    // Share the first pass of the two terms that start with G along axis 0.
    let s0 = filter_axis(data, 0, &g0);
    let t1 = filter_axis(&filter_axis(&s0, 1, &g2), 2, &g0);
    let t2 = filter_axis(&filter_axis(&s0, 1, &g0), 2, &g2);
    let mut out = separable(data, [&g2, &g0, &g0]);
    out += &t1;
    out += &t2;
    out
}

/// Mean over a `size`³ cube centred on each voxel (scipy `uniform_filter`, reflect).
pub(crate) fn uniform_filter(data: &Array3<f64>, size: usize) -> Array3<f64> {
    let k = vec![1.0 / size as f64; size];
    separable(data, [&k, &k, &k])
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::ShapeBuilder;

    #[test]
    fn reflect_matches_scipy_convention() {
        // scipy 'reflect' on [a b c d]: index −1 → a, −2 → b, 4 → d, 5 → c, and a lane of
        // length 1 repeats its only sample.
        let got: Vec<usize> = (-5..9).map(|i| reflect(i, 4)).collect();
        assert_eq!(got, vec![3, 3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0, 0]);
        assert!((-7..7).all(|i| reflect(i, 1) == 0));
    }

    #[test]
    fn row_and_lane_paths_agree() {
        // The contiguous-row path (axes 0, 1) against the lane path on a non-standard
        // (transposed) view of the same data: identical sums up to f64 reordering.
        let a = Array3::from_shape_fn((5, 4, 3), |(i, j, k)| {
            ((i * 7 + j * 3 + k) as f64 * 0.37).sin()
        });
        let k = [0.1, 0.2, 0.4, 0.2, 0.1];
        for axis in 0..2 {
            let fast = filter_axis(&a, axis, &k);
            // Same data in Fortran order: as_slice() is None, so the lane path runs.
            let mut f = Array3::<f64>::zeros((5, 4, 3).f());
            f.assign(&a);
            assert!(f.as_slice().is_none());
            let slow = filter_axis(&f, axis, &k);
            for (x, y) in fast.iter().zip(slow.iter()) {
                assert!((x - y).abs() < 1e-14);
            }
        }
    }

    #[test]
    fn gaussian_kernels_have_the_expected_moments() {
        // Sampled Gaussian with σ = 1.5 truncated at 5σ (radius 8): sum 1 by construction;
        // second moment σ² up to the truncated tail (weight ≈ e^{−8.5²/4.5} ≈ 1e-7 times
        // t² ≤ 81, so < 1e-5). The order-2 kernel sums to ≈ 0 and its second moment is
        // ≈ 2 (the second derivative of t²), to the same tail bound.
        let g0 = gaussian_kernel(1.5, 5.0, 0);
        let g2 = gaussian_kernel(1.5, 5.0, 2);
        assert_eq!(g0.len(), 17);
        let t = |i: usize| i as f64 - 8.0;
        assert!((g0.iter().sum::<f64>() - 1.0).abs() < 1e-14);
        let m2: f64 = g0.iter().enumerate().map(|(i, w)| w * t(i) * t(i)).sum();
        assert!((m2 - 2.25).abs() < 1e-5, "second moment {m2}");
        assert!(g2.iter().sum::<f64>().abs() < 1e-5);
        let m2: f64 = g2.iter().enumerate().map(|(i, w)| w * t(i) * t(i)).sum();
        assert!((m2 - 2.0).abs() < 1e-4, "{m2}");
        // Symmetric, so correlation equals convolution.
        for i in 0..17 {
            assert_eq!(g2[i], g2[16 - i]);
        }
    }
}
