//! Metric tests: hand-computed cases, analytic filter responses, brute-force references
//! and the Challenge 2.0 invariances.

use super::filters::{gaussian_kernel, reflect};
use super::*;
use crate::phantom::{PhantomConfig, generate};
use ndarray::Array3;

fn vol(data: Array3<f32>) -> Volume {
    Volume::new(data, [1.0; 3])
}

fn line(v: &[f32]) -> Volume {
    vol(Array3::from_shape_vec((v.len(), 1, 1), v.to_vec()).unwrap())
}

/// Deterministic pseudo-random values in [−0.1, 0.1] (a small LCG, independent of the
/// phantom's generator).
fn noise(shape: (usize, usize, usize), seed: u64) -> Array3<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    Array3::from_shape_fn(shape, |_| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
    })
}

#[test]
fn hand_computed_four_voxels() {
    // x = [1, 2, 3, 4], y = [1, 2, 3, 5], plus a fifth voxel outside the mask that must be
    // ignored (its huge error would dominate otherwise).
    // RMSE = sqrt((0+0+0+1)/4) = 0.5.
    // x̃ = [−1.5, −0.5, 0.5, 1.5], ỹ = [−1.75, −0.75, 0.25, 2.25];
    // Σx̃² = 5, Σỹ² = 8.75, Σx̃ỹ = 2.625 + 0.375 + 0.125 + 3.375 = 6.5.
    // NRMSE = 100·sqrt((5 − 13 + 8.75)/8.75) = 100·sqrt(0.75/8.75) = 29.27700…
    // CC = 6.5 / sqrt(5·8.75) = 0.982708…
    // Detrended: a = 6.5/8.75, ‖x̃/a − ỹ‖² = 5/a² − 13/a + 8.75 = 0.310651…,
    // NRMSE_d = 100·sqrt(0.310651/8.75) = 18.8422… = 100·sqrt(1/CC² − 1).
    // Tolerance 1e-9: inputs are exact in f32 and sums are over four f64 terms.
    let x = line(&[1.0, 2.0, 3.0, 4.0, 100.0]);
    let y = line(&[1.0, 2.0, 3.0, 5.0, -100.0]);
    let m = line(&[1.0, 1.0, 1.0, 1.0, 0.0]);
    assert!((rmse(&x, &y, &m).unwrap() - 0.5).abs() < 1e-12);
    let want_nrmse = 100.0 * (0.75f64 / 8.75).sqrt();
    assert!((nrmse(&x, &y, &m).unwrap() - want_nrmse).abs() < 1e-9);
    let want_cc = 6.5 / (5.0f64 * 8.75).sqrt();
    assert!((pearson(&x, &y, &m).unwrap() - want_cc).abs() < 1e-12);
    let a = 6.5 / 8.75;
    let want_d = 100.0 * ((5.0 / (a * a) - 13.0 / a + 8.75) / 8.75f64).sqrt();
    let got_d = nrmse_detrended(&x, &y, &m).unwrap().unwrap();
    assert!((got_d - want_d).abs() < 1e-9, "{got_d} vs {want_d}");
    assert!((got_d - 100.0 * (1.0 / (want_cc * want_cc) - 1.0).sqrt()).abs() < 1e-9);
    assert!((want_d - 18.8422).abs() < 1e-4);
}

#[test]
fn invariances() {
    // On random data: NRMSE(x, x) = 0, NRMSE(x + c, x) = 0 (demeaned), RMSE(x + c, x) = |c|,
    // detrended NRMSE(2x + 1, x) ≈ 0, CC(2x + 1, x) = 1, CC(−x, x) = −1, XSIM(x, x) = 1,
    // HFEN(x, x) = 0 and HFEN(2x, x) = 100 (LoG is linear). f32 rounding of the
    // transformed inputs (~1e-7 relative) bounds the "≈ 0" cases at ~1e-4 %.
    let y = vol(noise((12, 10, 9), 1));
    let m = vol(Array3::from_elem((12, 10, 9), 1.0));
    let shifted = y.like(y.data.mapv(|v| v + 0.05));
    let affine = y.like(y.data.mapv(|v| 2.0 * v + 1.0));
    let double = y.like(y.data.mapv(|v| 2.0 * v));
    let neg = y.like(y.data.mapv(|v| -v));
    assert_eq!(nrmse(&y, &y, &m).unwrap(), 0.0);
    assert!(nrmse(&shifted, &y, &m).unwrap() < 1e-4);
    assert!((rmse(&shifted, &y, &m).unwrap() - 0.05).abs() < 1e-6);
    assert!(nrmse_detrended(&affine, &y, &m).unwrap().unwrap() < 1e-3);
    assert!((pearson(&affine, &y, &m).unwrap() - 1.0).abs() < 1e-9);
    assert!((pearson(&neg, &y, &m).unwrap() + 1.0).abs() < 1e-12);
    assert!((xsim(&y, &y, &m).unwrap() - 1.0).abs() < 1e-12);
    assert_eq!(hfen(&y, &y, &m).unwrap(), 0.0);
    assert!((hfen(&double, &y, &m).unwrap() - 100.0).abs() < 1e-9);
    // Symmetry of XSIM; a zero reconstruction has NRMSE 100 and no detrended value.
    let z = y.like(Array3::zeros((12, 10, 9)));
    assert!((xsim(&z, &y, &m).unwrap() - xsim(&y, &z, &m).unwrap()).abs() < 1e-12);
    assert!((nrmse(&z, &y, &m).unwrap() - 100.0).abs() < 1e-9);
    assert_eq!(nrmse_detrended(&z, &y, &m).unwrap(), None);
    assert_eq!(pearson(&z, &y, &m).unwrap(), 0.0);
}

#[test]
fn xsim_of_constants_is_the_luminance_term() {
    // Constant x = 0.1, y = 0.2: all local variances are 0, so the contrast term is
    // C2/C2 = 1 and XSIM = (2·0.1·0.2 + C1)/(0.1² + 0.2² + C1) = 0.0401/0.0501.
    // Window sums of constants carry ~1e-17 rounding, negligible against C2 = 1e-6.
    let x = vol(Array3::from_elem((6, 6, 6), 0.1));
    let y = vol(Array3::from_elem((6, 6, 6), 0.2));
    let m = vol(Array3::from_elem((6, 6, 6), 1.0));
    let want = (2.0 * 0.1f32 as f64 * 0.2f32 as f64 + 1e-4)
        / ((0.1f32 as f64).powi(2) + (0.2f32 as f64).powi(2) + 1e-4);
    assert!((xsim(&x, &y, &m).unwrap() - want).abs() < 1e-9);
    assert!((want - 0.0401 / 0.0501).abs() < 1e-6);
}

#[test]
fn xsim_matches_a_brute_force_window() {
    // An independent direct implementation: for each voxel, loop over the 5³ window with
    // reflect indexing and form sample means and (N − 1)-normalised covariances.
    // Agreement to 1e-10 (f64 sums of 125 terms in a different order).
    let (nx, ny, nz) = (7, 6, 5);
    let x = noise((nx, ny, nz), 3);
    let y = noise((nx, ny, nz), 4).mapv(|v| v + 0.03);
    let mask = Array3::from_shape_fn((nx, ny, nz), |(i, j, k)| {
        ((i + j + k) % 3 != 0) as u8 as f32
    });
    let mut sum = 0.0;
    let mut count = 0;
    for i in 0..nx {
        for j in 0..ny {
            for k in 0..nz {
                if mask[[i, j, k]] == 0.0 {
                    continue;
                }
                let mut vals = Vec::new();
                for a in -2..=2isize {
                    for b in -2..=2isize {
                        for c in -2..=2isize {
                            let p = [
                                reflect(i as isize + a, nx),
                                reflect(j as isize + b, ny),
                                reflect(k as isize + c, nz),
                            ];
                            vals.push((x[p] as f64, y[p] as f64));
                        }
                    }
                }
                let n = vals.len() as f64;
                let mx = vals.iter().map(|v| v.0).sum::<f64>() / n;
                let my = vals.iter().map(|v| v.1).sum::<f64>() / n;
                let vx = vals.iter().map(|v| (v.0 - mx).powi(2)).sum::<f64>() / (n - 1.0);
                let vy = vals.iter().map(|v| (v.1 - my).powi(2)).sum::<f64>() / (n - 1.0);
                let vxy = vals.iter().map(|v| (v.0 - mx) * (v.1 - my)).sum::<f64>() / (n - 1.0);
                sum += ((2.0 * mx * my + XSIM_C1) * (2.0 * vxy + XSIM_C2))
                    / ((mx * mx + my * my + XSIM_C1) * (vx + vy + XSIM_C2));
                count += 1;
            }
        }
    }
    let want = sum / count as f64;
    let got = xsim(&vol(x), &vol(y), &vol(mask)).unwrap();
    assert!((got - want).abs() < 1e-10, "{got} vs {want}");
}

#[test]
fn log_matches_a_brute_force_kernel_and_analytic_cases() {
    // (1) Brute force: a direct 3D correlation with the 17³ kernel
    // Σₐ G''ₐ ⊗ G ⊗ G (reflect boundary) on a 9×8×7 random volume; 1e-10 agreement.
    let (nx, ny, nz) = (9, 8, 7);
    let d = noise((nx, ny, nz), 9);
    let g0 = gaussian_kernel(1.5, 5.0, 0);
    let g2 = gaussian_kernel(1.5, 5.0, 2);
    let r = 8isize;
    let got = laplacian_of_gaussian(&d, 1.5, 5.0).unwrap();
    for &(i, j, k) in &[(0usize, 0usize, 0usize), (4, 3, 3), (8, 7, 6), (2, 6, 1)] {
        let mut want = 0.0;
        for a in -r..=r {
            for b in -r..=r {
                for c in -r..=r {
                    let w = |t: isize| (t + r) as usize;
                    let kern = g2[w(a)] * g0[w(b)] * g0[w(c)]
                        + g0[w(a)] * g2[w(b)] * g0[w(c)]
                        + g0[w(a)] * g0[w(b)] * g2[w(c)];
                    let p = [
                        reflect(i as isize + a, nx),
                        reflect(j as isize + b, ny),
                        reflect(k as isize + c, nz),
                    ];
                    want += kern * d[p] as f64;
                }
            }
        }
        assert!((got[[i, j, k]] - want).abs() < 1e-10, "at {i},{j},{k}");
    }
    // (2) Constant: the Laplacian is 0; the sampled order-2 kernel sums to −1.3e-7 (its
    // truncated tail), so |LoG(3)| ≈ 3 axes · 3 · 1.3e-7 ≈ 1.2e-6 < 1e-5.
    let c = laplacian_of_gaussian(&Array3::from_elem((6, 6, 6), 3.0), 1.5, 5.0).unwrap();
    assert!(c.iter().all(|v| v.abs() < 1e-5), "{}", c[[3, 3, 3]]);
    // (3) Quadratic i² + j² + k²: Gaussian smoothing keeps its Laplacian, 6, exactly in
    // the continuum; the sampled kernels' moments match the continuum to the truncated
    // tail (second moment of G'' is 2 − 1.0e-5), so |LoG − 6| ≲ 5e-5 < 1e-4. Checked
    // ≥ 8 voxels (the kernel radius) from the borders so the reflection does not enter.
    let q = Array3::from_shape_fn((20, 20, 20), |(i, j, k)| {
        let f = |t: usize| (t as f32 - 9.5).powi(2);
        f(i) + f(j) + f(k)
    });
    let lq = laplacian_of_gaussian(&q, 1.5, 5.0).unwrap();
    for i in 8..12 {
        for j in 8..12 {
            for k in 8..12 {
                assert!((lq[[i, j, k]] - 6.0).abs() < 1e-4, "{}", lq[[i, j, k]]);
            }
        }
    }
    assert!(laplacian_of_gaussian(&q, 0.0, 5.0).is_err());
}

#[test]
fn region_linearity_recovers_a_known_slope() {
    // Three regions with truth means 0.1, 0.2, 0.05 and recon = 0.8·truth + 0.01:
    // slope 0.8, intercept 0.01, linearity 0.2 (exact up to f32 rounding of the inputs).
    let mut labels = Array3::<u8>::zeros((6, 2, 2));
    let mut t = Array3::<f32>::zeros((6, 2, 2));
    for ((i, _, _), l) in labels.indexed_iter_mut() {
        *l = (i / 2) as u8 + 6;
    }
    for ((i, j, k), v) in t.indexed_iter_mut() {
        *v = [0.1, 0.2, 0.05][i / 2] + 0.01 * (j as f32 - k as f32);
    }
    let x = t.mapv(|v| 0.8 * v + 0.01);
    let m = vol(Array3::from_elem((6, 2, 2), 1.0));
    let fit = region_linearity(&vol(x.clone()), &vol(t.clone()), &m, &labels, &[6, 7, 8, 9])
        .unwrap()
        .unwrap();
    assert_eq!(fit.regions, vec![6, 7, 8]);
    assert!((fit.slope - 0.8).abs() < 1e-6);
    assert!((fit.intercept - 0.01).abs() < 1e-6);
    assert!((fit.linearity - 0.2).abs() < 1e-6);
    // One region only: no fit.
    assert!(
        region_linearity(&vol(x), &vol(t), &m, &labels, &[6])
            .unwrap()
            .is_none()
    );
}

#[test]
fn bad_inputs_are_errors() {
    let a = vol(noise((5, 5, 5), 1));
    let b = vol(noise((5, 5, 4), 2));
    let m = vol(Array3::from_elem((5, 5, 5), 1.0));
    assert!(matches!(evaluate(&a, &b, &m), Err(Error::Shape(_))));
    assert!(matches!(
        evaluate(&a, &a, &vol(Array3::ones((5, 5, 4)))),
        Err(Error::Shape(_))
    ));
    let other_voxel = Volume::new(a.data.clone(), [1.0, 1.0, 2.0]);
    assert!(matches!(
        evaluate(&other_voxel, &a, &m),
        Err(Error::Shape(_))
    ));
    let mut nan = a.clone();
    nan.data[[1, 2, 3]] = f32::NAN;
    match evaluate(&nan, &a, &m) {
        Err(Error::NonFinite(s)) => assert!(s.contains("recon") && s.contains("[1, 2, 3]")),
        other => panic!("{other:?}"),
    }
    let mut inf = a.clone();
    inf.data[[0, 0, 0]] = f32::INFINITY;
    assert!(matches!(evaluate(&a, &inf, &m), Err(Error::NonFinite(_))));
    let empty = vol(Array3::zeros((5, 5, 5)));
    match evaluate(&a, &a, &empty) {
        Err(Error::Parameter(s)) => assert!(s.contains("mask is empty")),
        other => panic!("{other:?}"),
    }
    let flat = vol(Array3::from_elem((5, 5, 5), 0.1));
    assert!(matches!(evaluate(&a, &flat, &m), Err(Error::Parameter(_))));
    let labels = Array3::<u8>::zeros((5, 5, 4));
    assert!(matches!(
        evaluate_with_labels(&a, &a, &m, &labels, &[1, 2]),
        Err(Error::Shape(_))
    ));
}

#[test]
fn phantom_evaluation_is_sensible_and_serialises() {
    // A degraded phantom (χ scaled by 0.7 plus a smooth offset) against the truth:
    // detrended NRMSE is near 0 up to the offset, the deep-GM slope is ~0.7, XSIM drops
    // below 1 and the zero map scores NRMSE 100.
    let p = generate(&PhantomConfig::new([40, 48, 40], [4.0; 3], 1)).unwrap();
    let truth = &p.chi;
    let recon = truth.like(truth.data.mapv(|v| 0.7 * v));
    let regions = deep_grey_matter_regions();
    let m = evaluate_with_labels(&recon, truth, &p.mask, &p.labels, &regions).unwrap();
    assert!(m.nrmse_detrended.unwrap() < 1e-3);
    assert!((m.nrmse - 30.0).abs() < 1e-3, "nrmse {}", m.nrmse);
    assert!((m.cc - 1.0).abs() < 1e-6);
    let fit = m.deep_gm.clone().unwrap();
    assert!((fit.slope - 0.7).abs() < 1e-5 && (fit.linearity - 0.3).abs() < 1e-5);
    assert_eq!(fit.regions.len(), 7);
    assert!(m.xsim < 1.0 && m.xsim > 0.5, "xsim {}", m.xsim);
    assert!((m.hfen - 30.0).abs() < 1e-3, "hfen {}", m.hfen);
    let zero = truth.like(Array3::zeros(truth.data.raw_dim()));
    let z = evaluate(&zero, truth, &p.mask).unwrap();
    assert!((z.nrmse - 100.0).abs() < 1e-9);
    assert!(z.deep_gm.is_none());
    let json = serde_json::to_value(&m).unwrap();
    for key in [
        "rmse",
        "nrmse",
        "nrmse_detrended",
        "hfen",
        "xsim",
        "cc",
        "deep_gm",
        "voxels",
    ] {
        assert!(json.get(key).is_some(), "{key} missing in {json}");
    }
    assert!(serde_json::to_value(&z).unwrap()["nrmse_detrended"].is_null());
}

#[test]
fn matches_scipy_and_scikit_image_fixture() {
    // Fixture computed independently with scipy 1.17.1 `gaussian_laplace(x, 1.5,
    // truncate=5.0)` and scikit-image 0.26.0 `structural_similarity(x, y, win_size=5,
    // K1=0.01, K2=0.001, data_range=1, gaussian_weights=False,
    // use_sample_covariance=True, full=True)` (map averaged over all voxels = our XSIM with
    // a full mask), and HFEN as 100·‖LoG(x) − LoG(y)‖/‖LoG(y)‖ over all voxels, on
    // x = f32(0.1 sin(0.7i + 1.3j + 0.4k²)), y = f32(0.08 cos(0.5i − 0.9j + 1.1k) + 0.02i/7),
    // 7×6×5. Agreement to 1e-12 absolute / 1e-9 relative: the same f64 arithmetic in
    // another summation order.
    let shape = (7, 6, 5);
    let x = Array3::from_shape_fn(shape, |(i, j, k)| {
        (0.1 * (0.7 * i as f64 + 1.3 * j as f64 + 0.4 * (k * k) as f64).sin()) as f32
    });
    let y = Array3::from_shape_fn(shape, |(i, j, k)| {
        (0.08 * (0.5 * i as f64 - 0.9 * j as f64 + 1.1 * k as f64).cos() + 0.02 * i as f64 / 7.0)
            as f32
    });
    let log = laplacian_of_gaussian(&x, 1.5, 5.0).unwrap();
    for (p, want) in [
        ([0, 0, 0], -0.02836998881297694),
        ([3, 2, 2], 0.003967399444640795),
        ([6, 5, 4], 0.00399984913429425),
        ([1, 4, 3], -0.0002337917835269011),
    ] {
        assert!(
            (log[p] - want).abs() < 1e-12,
            "LoG at {p:?}: {} vs {want}",
            log[p]
        );
    }
    let m = vol(Array3::from_elem(shape, 1.0));
    let got = xsim(&vol(x.clone()), &vol(y.clone()), &m).unwrap();
    assert!((got - -0.0032660313239838952).abs() < 1e-12, "xsim {got}");
    let h = hfen(&vol(x), &vol(y), &m).unwrap();
    assert!((h / 124.15653775269757 - 1.0).abs() < 1e-9, "hfen {h}");
}
