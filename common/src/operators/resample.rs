//! Downsampling operators for super-resolution: [`KSpaceDownsample`] (centred k-space
//! crop) and [`BlockDownsample`] (block mean). Their adjoints (via
//! [`Adjoint`](super::Adjoint)) are the matching upsamplers; `upsample` on each gives the
//! constant-preserving interpolation (adjoint × factor product).

use super::{LinearOperator, check_shape};
use crate::error::{Error, Result};
use crate::fft::RealFft3;
use ndarray::parallel::prelude::*;
use ndarray::{Array3, Axis};
use rustfft::num_complex::Complex32;

fn check_factors(input: [usize; 3], factors: [usize; 3], what: &str) -> Result<[usize; 3]> {
    if input.contains(&0) {
        return Err(Error::Shape(format!(
            "{what}: input shape must be nonempty, got {input:?}"
        )));
    }
    for a in 0..3 {
        if factors[a] == 0 {
            return Err(Error::Parameter(format!(
                "{what}: factors must be ≥ 1, got {factors:?}"
            )));
        }
        if !input[a].is_multiple_of(factors[a]) {
            return Err(Error::Shape(format!(
                "{what}: axis {a} of length {} is not divisible by factor {} \
                 (pad or crop the volume first)",
                input[a], factors[a]
            )));
        }
    }
    Ok([0, 1, 2].map(|a| input[a] / factors[a]))
}

/// Index map of a centred k-space crop from n to m ≤ n points on one full axis.
#[derive(Debug, Clone)]
struct AxisCrop {
    /// For each output index: the input indices and weights summed into it.
    gather: Vec<Vec<(usize, f32)>>,
    /// For each input index: the output index it feeds and its weight, if any.
    scatter: Vec<Option<(usize, f32)>>,
}

impl AxisCrop {
    fn new(n: usize, m: usize) -> Self {
        let mut gather = vec![Vec::new(); m];
        let mut scatter = vec![None; n];
        for (q, g) in gather.iter_mut().enumerate() {
            if m < n && m.is_multiple_of(2) && q == m / 2 {
                // Output Nyquist: the mean of input frequencies +m/2 and −m/2.
                for p in [m / 2, n - m / 2] {
                    g.push((p, 0.5));
                    scatter[p] = Some((q, 0.5));
                }
            } else {
                let p = if q < m.div_ceil(2) { q } else { n - (m - q) };
                g.push((p, 1.0));
                scatter[p] = Some((q, 1.0));
            }
        }
        Self { gather, scatter }
    }
}

/// Downsampling by integer factors through a centred k-space crop:
/// A x = (M/N) · irfftn_M(C · rfftn_N(x)), N and M the input and output voxel counts.
///
/// C keeps the frequencies |f| < mₐ/2 of each axis. When an output axis length mₐ is
/// even (and smaller than the input), its Nyquist bin receives the mean of the input
/// frequencies +mₐ/2 and −mₐ/2; this keeps the cropped spectrum Hermitian (so A x is real)
/// and makes Cᵀ split the Nyquist bin equally between ±mₐ/2, so the adjoint
/// Aᵀ y = irfftn_N(Cᵀ · rfftn_M(y)) is exact. The factor M/N preserves constants
/// (A·c = c). Input lengths must be divisible by the factors.
pub struct KSpaceDownsample {
    input: [usize; 3],
    output: [usize; 3],
    factors: [usize; 3],
    crops: [AxisCrop; 2],
    fft_in: RealFft3<f32>,
    fft_out: RealFft3<f32>,
}

impl std::fmt::Debug for KSpaceDownsample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KSpaceDownsample")
            .field("input", &self.input)
            .field("output", &self.output)
            .field("factors", &self.factors)
            .finish()
    }
}

impl KSpaceDownsample {
    /// Downsampling of `input`-shaped arrays by `factors` (each ≥ 1, dividing the axis).
    pub fn new(input: [usize; 3], factors: [usize; 3]) -> Result<Self> {
        let output = check_factors(input, factors, "k-space downsampling")?;
        Ok(Self {
            input,
            output,
            factors,
            crops: [
                AxisCrop::new(input[0], output[0]),
                AxisCrop::new(input[1], output[1]),
            ],
            fft_in: RealFft3::new(input)?,
            fft_out: RealFft3::new(output)?,
        })
    }

    /// The per-axis factors.
    pub fn factors(&self) -> [usize; 3] {
        self.factors
    }

    /// Sinc (k-space zero-fill) interpolation of `y` to the input grid, preserving
    /// constants: (N/M)·Aᵀy.
    pub fn upsample(&self, y: &Array3<f32>) -> Result<Array3<f32>> {
        let mut x = self.adjoint(y)?;
        let s = self.factors.iter().product::<usize>() as f32;
        x.par_mapv_inplace(|v| v * s);
        Ok(x)
    }

    /// Whether half-spectrum index `l` of the output is a cropped Nyquist bin on axis 2.
    fn nyquist2(&self, l: usize) -> bool {
        let (n2, m2) = (self.input[2], self.output[2]);
        m2 < n2 && m2.is_multiple_of(2) && l == m2 / 2
    }

    /// C · X on half spectra, times `scale`.
    fn crop(&self, x: &Array3<Complex32>, scale: f32) -> Array3<Complex32> {
        let [m0, m1, m2] = self.output;
        let h = m2 / 2 + 1;
        let [c0, c1] = &self.crops;
        let val = |q0: usize, q1: usize, l: usize| -> Complex32 {
            let mut acc = Complex32::new(0.0, 0.0);
            for &(p0, w0) in &c0.gather[q0] {
                for &(p1, w1) in &c1.gather[q1] {
                    acc += x[[p0, p1, l]] * (w0 * w1);
                }
            }
            acc
        };
        let mut out = Array3::zeros([m0, m1, h]);
        out.axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each(|(q0, mut slab)| {
                for ((q1, l), o) in slab.indexed_iter_mut() {
                    let v = val(q0, q1, l);
                    *o = if self.nyquist2(l) {
                        // Mean of +m2/2 and −m2/2; the latter is conj(X'[−q0, −q1, m2/2]).
                        let mirror = val((m0 - q0) % m0, (m1 - q1) % m1, l).conj();
                        (v + mirror) * (0.5 * scale)
                    } else {
                        v * scale
                    };
                }
            });
        out
    }

    /// Cᵀ · Y on half spectra.
    fn pad(&self, y: &Array3<Complex32>) -> Array3<Complex32> {
        let [n0, n1, n2] = self.input;
        let h_out = self.output[2] / 2 + 1;
        let [c0, c1] = &self.crops;
        let mut out = Array3::zeros([n0, n1, n2 / 2 + 1]);
        out.axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each(|(p0, mut slab)| {
                let Some((q0, w0)) = c0.scatter[p0] else {
                    return;
                };
                for p1 in 0..n1 {
                    let Some((q1, w1)) = c1.scatter[p1] else {
                        continue;
                    };
                    for l in 0..h_out {
                        let w2 = if self.nyquist2(l) { 0.5 } else { 1.0 };
                        slab[[p1, l]] = y[[q0, q1, l]] * (w0 * w1 * w2);
                    }
                }
            });
        out
    }
}

impl LinearOperator for KSpaceDownsample {
    fn input_shape(&self) -> [usize; 3] {
        self.input
    }
    fn output_shape(&self) -> [usize; 3] {
        self.output
    }
    fn apply(&self, x: &Array3<f32>) -> Result<Array3<f32>> {
        check_shape(x, self.input, "KSpaceDownsample input")?;
        let spec = self.fft_in.forward(x.view())?;
        let scale = 1.0 / self.factors.iter().product::<usize>() as f32;
        self.fft_out.inverse(self.crop(&spec, scale), self.output)
    }
    fn adjoint(&self, y: &Array3<f32>) -> Result<Array3<f32>> {
        check_shape(y, self.output, "KSpaceDownsample adjoint input")?;
        let spec = self.fft_out.forward(y.view())?;
        self.fft_in.inverse(self.pad(&spec), self.input)
    }
}

/// Downsampling by integer factors through block means: each output voxel is the mean of
/// an f₀×f₁×f₂ block (the partial-volume model of a thicker acquisition). Aᵀ copies each
/// value divided by f₀f₁f₂ back into its block. Input lengths must be divisible by the
/// factors.
#[derive(Debug, Clone)]
pub struct BlockDownsample {
    input: [usize; 3],
    output: [usize; 3],
    factors: [usize; 3],
}

impl BlockDownsample {
    /// Block-mean downsampling of `input`-shaped arrays by `factors`.
    pub fn new(input: [usize; 3], factors: [usize; 3]) -> Result<Self> {
        let output = check_factors(input, factors, "block downsampling")?;
        Ok(Self {
            input,
            output,
            factors,
        })
    }

    /// The per-axis factors.
    pub fn factors(&self) -> [usize; 3] {
        self.factors
    }

    /// Nearest-neighbour (block replication) upsampling: f₀f₁f₂·Aᵀy.
    pub fn upsample(&self, y: &Array3<f32>) -> Result<Array3<f32>> {
        check_shape(y, self.output, "BlockDownsample upsample input")?;
        Ok(self.spread(y, 1.0))
    }

    fn spread(&self, y: &Array3<f32>, weight: f32) -> Array3<f32> {
        let [f0, f1, f2] = self.factors;
        let mut out = Array3::zeros(self.input);
        out.axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each(|(p0, mut slab)| {
                let src = y.index_axis(Axis(0), p0 / f0);
                for ((p1, p2), o) in slab.indexed_iter_mut() {
                    *o = src[[p1 / f1, p2 / f2]] * weight;
                }
            });
        out
    }
}

impl LinearOperator for BlockDownsample {
    fn input_shape(&self) -> [usize; 3] {
        self.input
    }
    fn output_shape(&self) -> [usize; 3] {
        self.output
    }
    fn apply(&self, x: &Array3<f32>) -> Result<Array3<f32>> {
        check_shape(x, self.input, "BlockDownsample input")?;
        let [f0, f1, f2] = self.factors;
        let inv = 1.0 / (f0 * f1 * f2) as f64;
        let mut out = Array3::zeros(self.output);
        out.axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each(|(q0, mut slab)| {
                for ((q1, q2), o) in slab.indexed_iter_mut() {
                    let mut acc = 0.0f64;
                    for a in 0..f0 {
                        for b in 0..f1 {
                            for c in 0..f2 {
                                acc += x[[q0 * f0 + a, q1 * f1 + b, q2 * f2 + c]] as f64;
                            }
                        }
                    }
                    *o = (acc * inv) as f32;
                }
            });
        Ok(out)
    }
    fn adjoint(&self, y: &Array3<f32>) -> Result<Array3<f32>> {
        check_shape(y, self.output, "BlockDownsample adjoint input")?;
        let f = self.factors.iter().product::<usize>() as f32;
        Ok(self.spread(y, 1.0 / f))
    }
}

/// Trilinear upsampling by integer `factors` with block-centred sample positions: output
/// voxel i sits at input coordinate (i + ½)/f − ½ (the geometry of
/// [`crate::tasks::refined_grid`]), clamped to the input's extent at the edges. The output
/// has shape `input × factors`; values keep the input's units. The SR benchmarks'
/// interpolation baseline (not an operator: it has no adjoint here).
///
/// Errors with [`Error::Parameter`] if a factor is 0 and [`Error::Shape`] if the input is
/// empty.
pub fn trilinear_upsample(x: &Array3<f32>, factors: [usize; 3]) -> Result<Array3<f32>> {
    let s = x.shape();
    if factors.contains(&0) {
        return Err(Error::Parameter(format!(
            "trilinear upsampling needs factors ≥ 1, got {factors:?} (input {s:?})"
        )));
    }
    if s.contains(&0) {
        return Err(Error::Shape(format!(
            "trilinear upsampling needs a nonempty input, got {s:?} (factors {factors:?})"
        )));
    }
    let taps = |a: usize| -> Vec<(usize, usize, f32)> {
        let (n, f) = (s[a], factors[a]);
        (0..n * f)
            .map(|i| {
                let u = ((i as f64 + 0.5) / f as f64 - 0.5).clamp(0.0, (n - 1) as f64);
                let i0 = u.floor() as usize;
                let i1 = (i0 + 1).min(n - 1);
                (i0, i1, (u - i0 as f64) as f32)
            })
            .collect()
    };
    let (tx, ty, tz) = (taps(0), taps(1), taps(2));
    let shape = [tx.len(), ty.len(), tz.len()];
    Ok(Array3::from_shape_fn(shape, |(i, j, k)| {
        let (i0, i1, wi) = tx[i];
        let (j0, j1, wj) = ty[j];
        let (k0, k1, wk) = tz[k];
        let lerp_k = |a: usize, b: usize| x[[a, b, k0]] * (1.0 - wk) + x[[a, b, k1]] * wk;
        let lerp_j = |a: usize| lerp_k(a, j0) * (1.0 - wj) + lerp_k(a, j1) * wj;
        lerp_j(i0) * (1.0 - wi) + lerp_j(i1) * wi
    }))
}

#[cfg(test)]
mod trilinear_tests {
    use super::*;

    #[test]
    fn trilinear_reproduces_linear_functions_in_the_interior() {
        // A linear function of the index is reproduced exactly (f32 round-off, 1e-5) by
        // trilinear interpolation wherever no clamping happens (block-centred positions
        // (i + ½)/f − ½ inside [0, n − 1]); a constant everywhere.
        let x = Array3::from_shape_fn((5, 6, 4), |(i, j, k)| {
            0.5 + 0.1 * i as f32 - 0.2 * j as f32 + 0.3 * k as f32
        });
        let f = [2, 2, 2];
        let y = trilinear_upsample(&x, f).unwrap();
        assert_eq!(y.shape(), &[10, 12, 8]);
        for ((i, j, k), &v) in y.indexed_iter() {
            let u = |q: usize| (q as f32 + 0.5) / 2.0 - 0.5;
            let inside = |q: usize, n: usize| u(q) >= 0.0 && u(q) <= (n - 1) as f32;
            if inside(i, 5) && inside(j, 6) && inside(k, 4) {
                let want = 0.5 + 0.1 * u(i) - 0.2 * u(j) + 0.3 * u(k);
                assert!((v - want).abs() < 1e-5, "{i} {j} {k}: {v} vs {want}");
            }
        }
        let c = trilinear_upsample(&Array3::from_elem((3, 3, 3), 0.25), [3, 1, 2]).unwrap();
        assert!(c.iter().all(|&v| (v - 0.25).abs() < 1e-7));
        assert!(matches!(
            trilinear_upsample(&x, [0, 1, 1]),
            Err(Error::Parameter(_))
        ));
        assert!(matches!(
            trilinear_upsample(&Array3::zeros((0, 2, 2)), [2, 2, 2]),
            Err(Error::Shape(_))
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operators::{Adjoint, adjoint_mismatch};

    /// Exact adjoints (1e-5 relative) for even/odd output lengths, factor 1 axes and
    /// even inputs with odd outputs: all Nyquist cases of the crop.
    #[test]
    fn adjoints_are_exact() {
        for (shape, f) in [
            ([8, 12, 10], [2, 2, 2]),  // even outputs 4, 6, 5(odd)
            ([9, 12, 16], [3, 4, 4]),  // odd 3, odd 3, even 4
            ([6, 10, 12], [1, 2, 3]),  // factor 1, odd 5, even 4
            ([12, 12, 12], [4, 6, 2]), // odd 3, even 2, even 6
        ] {
            let k = KSpaceDownsample::new(shape, f).unwrap();
            let m = adjoint_mismatch(&k, 21).unwrap();
            assert!(m < 1e-5, "k-space {shape:?}/{f:?}: {m}");
            let m = adjoint_mismatch(&Adjoint(k), 22).unwrap();
            assert!(m < 1e-5, "k-space adjoint {shape:?}/{f:?}: {m}");
            let b = BlockDownsample::new(shape, f).unwrap();
            let m = adjoint_mismatch(&b, 23).unwrap();
            assert!(m < 1e-5, "block {shape:?}/{f:?}: {m}");
        }
    }

    /// Constants are preserved by both downsamplers and their `upsample` (1e-5: f32 FFT
    /// rounding on values of 1).
    #[test]
    fn constants_are_preserved() {
        let k = KSpaceDownsample::new([8, 9, 10], [2, 3, 2]).unwrap();
        let y = k.apply(&Array3::from_elem([8, 9, 10], 0.7)).unwrap();
        assert_eq!(y.shape(), &[4, 3, 5]);
        assert!(y.iter().all(|v| (v - 0.7).abs() < 1e-5));
        let x = k.upsample(&y).unwrap();
        assert!(x.iter().all(|v| (v - 0.7).abs() < 1e-5));
        let b = BlockDownsample::new([8, 9, 10], [2, 3, 2]).unwrap();
        let y = b.apply(&Array3::from_elem([8, 9, 10], 0.7)).unwrap();
        assert!(y.iter().all(|v| (v - 0.7).abs() < 1e-6));
        assert!(
            b.upsample(&y)
                .unwrap()
                .iter()
                .all(|v| (v - 0.7).abs() < 1e-6)
        );
    }

    /// Band-limited inputs pass through unchanged: a cosine with frequency below the
    /// output Nyquist is sampled exactly by the k-space crop (1e-5), and a cosine at the
    /// input's (cropped-away) high frequency vanishes.
    #[test]
    fn k_space_crop_is_ideal_low_pass() {
        let n = [16, 8, 12];
        let k = KSpaceDownsample::new(n, [2, 1, 2]).unwrap();
        let tau = 2.0 * std::f64::consts::PI;
        let low = Array3::from_shape_fn(n, |(i, j, l)| {
            ((tau * (2.0 * i as f64 / 16.0 + j as f64 / 8.0 + 1.0 * l as f64 / 12.0)).cos()) as f32
        });
        let y = k.apply(&low).unwrap();
        for ((i, j, l), v) in y.indexed_iter() {
            let e = (tau * (2.0 * i as f64 / 8.0 + j as f64 / 8.0 + l as f64 / 6.0)).cos();
            assert!((*v as f64 - e).abs() < 1e-5, "({i},{j},{l})");
        }
        let high =
            Array3::from_shape_fn(n, |(i, _, _)| ((tau * 6.0 * i as f64 / 16.0).cos()) as f32);
        assert!(k.apply(&high).unwrap().iter().all(|v| v.abs() < 1e-5));
    }

    /// Block means by hand on a small ramp.
    #[test]
    fn block_mean_values() {
        let x = Array3::from_shape_fn([4, 2, 2], |(i, j, l)| (i * 4 + j * 2 + l) as f32);
        let b = BlockDownsample::new([4, 2, 2], [2, 2, 1]).unwrap();
        let y = b.apply(&x).unwrap();
        // Block (0,0,0): x[0..2, 0..2, 0] = {0, 2, 4, 6} → 3.
        assert_eq!(y[[0, 0, 0]], 3.0);
        assert_eq!(y[[1, 0, 1]], 12.0);
    }

    #[test]
    fn invalid_factors() {
        assert!(matches!(
            KSpaceDownsample::new([8, 9, 8], [2, 2, 2]),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            BlockDownsample::new([8, 8, 8], [0, 2, 2]),
            Err(Error::Parameter(_))
        ));
        let b = BlockDownsample::new([8, 8, 8], [2, 2, 2]).unwrap();
        assert!(b.apply(&Array3::zeros([4, 4, 4])).is_err());
        assert!(b.adjoint(&Array3::zeros([8, 8, 8])).is_err());
        let k = KSpaceDownsample::new([8, 8, 8], [2, 2, 2]).unwrap();
        assert!(k.apply(&Array3::zeros([4, 4, 4])).is_err());
        assert!(k.upsample(&Array3::zeros([8, 8, 8])).is_err());
    }
}
