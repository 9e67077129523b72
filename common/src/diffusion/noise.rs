//! Counter-based Gaussian noise: the noise of step k of a job with seed s at voxel i is a
//! pure function of (s, k, i).
//!
//! Bits: [`crate::splitmix`] (SplitMix64, Steele, Lea & Flood 2014) evaluated at an arbitrary position,
//! `mix64(key + (n+1)·γ)` with γ the golden-ratio increment, keyed by (seed, stream).
//! Normals: the 256-layer ziggurat of Marsaglia & Tsang (2000), in the symmetric form
//! used by `rand_distr`. Voxel i takes its first 64 bits from position i of the stream;
//! the rare rejections (≈ 1 %) draw further bits from position i of derived streams, so
//! every voxel's value depends on (seed, stream, i) only. The ziggurat tables, the
//! exponential of the wedge test and the logarithm of the tail are computed with our
//! own polynomials using only IEEE-754 basic operations, so the bits do not depend on
//! the platform's libm: a coordinator restarted on another machine regenerates
//! identical noise.
//!
//! Streams: [`INITIAL_STREAM`] draws x_T; sampling step k uses [`step_stream`]`(k)`;
//! other consumers (grid offsets) use their own stream constants.

use ndarray::Array3;
use rayon::prelude::*;
use std::sync::OnceLock;

use crate::splitmix::{mix64, random_bits, stream_key};

/// Stream of the initial noise x_T.
pub const INITIAL_STREAM: u64 = 0;

/// Stream of the fresh noise z added by sampling step `k` (0-based).
pub fn step_stream(k: usize) -> u64 {
    (k as u64).wrapping_add(1)
}

/// Natural logarithm of x > 0 (finite, normal) with basic IEEE operations only.
///
/// x = m·2^e with m ∈ [1/√2, √2); ln m = 2 atanh(s), s = (m−1)/(m+1), |s| < 0.172, by its
/// series to s^25 (relative truncation < 1e-19).
fn det_ln(x: f64) -> f64 {
    const C: [f64; 12] = [
        1.0 / 3.0,
        1.0 / 5.0,
        1.0 / 7.0,
        1.0 / 9.0,
        1.0 / 11.0,
        1.0 / 13.0,
        1.0 / 15.0,
        1.0 / 17.0,
        1.0 / 19.0,
        1.0 / 21.0,
        1.0 / 23.0,
        1.0 / 25.0,
    ];
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let poly = C.iter().rev().fold(0.0, |acc, &c| acc * s2 + c);
    e as f64 * std::f64::consts::LN_2 + 2.0 * s * (1.0 + s2 * poly)
}

/// e^x for x ≤ 0 with basic IEEE operations only (0 below −700).
///
/// x = k·ln 2 + r, |r| ≤ ln2/2 (ln 2 split in a high and a low part), e^r by its Taylor
/// series to r^14 (truncation < 1e-18), times 2^k built from the exponent bits.
fn det_exp(x: f64) -> f64 {
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000); // fdlibm ln2_hi
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76); // fdlibm ln2_lo
    if x < -700.0 {
        return 0.0;
    }
    let k = (x * std::f64::consts::LOG2_E - 0.5).ceil();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut term = 1.0;
    let mut sum = 1.0;
    for n in 1..=14 {
        term = term * r / n as f64;
        sum += term;
    }
    sum * f64::from_bits(((k as i64 + 1023) as u64) << 52)
}

/// The wedge test `y < det_exp(t)` (t ≤ 0), decided first against the platform's
/// `exp` with a relative margin of 1e-9: both are within 1e-14 of eˣ (`det_exp` by
/// construction, libm to an ulp or so), so outside the margin they give the same
/// answer, and inside it (probability ~1e-9) `det_exp` itself decides. The result is
/// `det_exp`'s on every platform; the common case costs one libm `exp`, not fourteen
/// divisions.
fn wedge_accepts(y: f64, t: f64) -> bool {
    const MARGIN: f64 = 1e-9;
    let e = t.exp();
    if y < e * (1.0 - MARGIN) {
        true
    } else if y > e * (1.0 + MARGIN) {
        false
    } else {
        y < det_exp(t)
    }
}

/// Layers of the ziggurat.
const ZIG_LAYERS: usize = 256;
/// Right edge R of the base layer (Marsaglia & Tsang 2000, 256 layers).
const ZIG_R: f64 = 3.654_152_885_361_009;
/// Area V of every layer (same source).
const ZIG_V: f64 = 4.928_673_233_99e-3;

/// Ziggurat tables: layer edges x_i (x_0 = V/f(R), x_1 = R, …, x_256 = 0) and
/// f_i = exp(−x_i²/2).
struct Ziggurat {
    x: [f64; ZIG_LAYERS + 1],
    f: [f64; ZIG_LAYERS + 1],
}

fn ziggurat() -> &'static Ziggurat {
    static TABLES: OnceLock<Ziggurat> = OnceLock::new();
    TABLES.get_or_init(|| {
        let pdf = |x: f64| det_exp(-0.5 * x * x);
        let mut x = [0.0; ZIG_LAYERS + 1];
        x[0] = ZIG_V / pdf(ZIG_R);
        x[1] = ZIG_R;
        for i in 1..ZIG_LAYERS - 1 {
            x[i + 1] = (-2.0 * det_ln(ZIG_V / x[i] + pdf(x[i]))).sqrt();
        }
        x[ZIG_LAYERS] = 0.0;
        let mut f = [0.0; ZIG_LAYERS + 1];
        for i in 0..=ZIG_LAYERS {
            f[i] = pdf(x[i]);
        }
        Ziggurat { x, f }
    })
}

/// 2^−53.
const TWO_POW_M53: f64 = 1.0 / 9_007_199_254_740_992.0;

/// Draw `j` of voxel `index`: draw 0 is position `index` of the stream; later draws come
/// from position `index` of streams derived from `key` and `j`.
fn draw(key: u64, index: u64, j: u64) -> u64 {
    if j == 0 {
        random_bits(key, index)
    } else {
        random_bits(mix64(key ^ j.wrapping_mul(0xa076_1d64_78bd_642f)), index)
    }
}

/// The top 53 bits as an exact f64 (through i64, whose conversion is one instruction;
/// the value is below 2⁵³, so it is the same number as the u64 conversion).
#[inline(always)]
fn top53(bits: u64) -> f64 {
    ((bits >> 11) as i64) as f64
}

/// [`top53`] without an integer-to-float conversion, for vector loops: AVX2 has none for
/// 64-bit lanes, so the compiler would convert lane by lane. The value v < 2⁵³ is split
/// into h = v >> 32 and l = v mod 2³²; placing each in the mantissa of a float of known
/// exponent and subtracting that float's leading bit gives h·2³² and l exactly (the
/// classic "magic number" conversion), and their sum v is exact too, being an integer
/// below 2⁵³. So it is the same number as `top53`, on every ISA.
#[inline(always)]
fn top53_split(bits: u64) -> f64 {
    /// 2⁸⁴: exponent field 0x453, so one mantissa unit is 2³².
    const HI_BASE: u64 = 0x4530_0000_0000_0000;
    /// 2⁵²: exponent field 0x433, so one mantissa unit is 1.
    const LO_BASE: u64 = 0x4330_0000_0000_0000;
    let v = bits >> 11;
    let hi = f64::from_bits(HI_BASE | (v >> 32)) - f64::from_bits(HI_BASE);
    let lo = f64::from_bits(LO_BASE | (v & 0xffff_ffff)) - f64::from_bits(LO_BASE);
    hi + lo
}

/// A uniform in (0, 1] from 64 bits.
fn open01(bits: u64) -> f64 {
    (((bits >> 11) + 1) as i64) as f64 * TWO_POW_M53
}

/// The standard-normal value of voxel `index` of the keyed stream (ziggurat).
fn normal_at(z: &Ziggurat, key: u64, index: u64) -> f64 {
    let mut j = 0u64;
    loop {
        let bits = draw(key, index, j);
        j += 1;
        let layer = (bits & 0xff) as usize;
        let u = 2.0 * (top53(bits) * TWO_POW_M53) - 1.0; // [−1, 1)
        let x = u * z.x[layer];
        if x.abs() < z.x[layer + 1] {
            return x;
        }
        if layer == 0 {
            // The tail beyond R (Marsaglia 1964): x = −ln(a)/R accepted when
            // −2 ln b ≥ x².
            loop {
                let a = open01(draw(key, index, j));
                let b = open01(draw(key, index, j + 1));
                j += 2;
                let xt = det_ln(a) / ZIG_R;
                let yt = det_ln(b);
                if -2.0 * yt >= xt * xt {
                    return if u < 0.0 { xt - ZIG_R } else { ZIG_R - xt };
                }
            }
        }
        let w = open01(draw(key, index, j)) - TWO_POW_M53; // [0, 1)
        j += 1;
        if wedge_accepts(
            z.f[layer + 1] + (z.f[layer] - z.f[layer + 1]) * w,
            -0.5 * x * x,
        ) {
            return x;
        }
    }
}

/// The standard normals of one (seed, stream), evaluated voxel by voxel: `at(i)` equals
/// [`standard_normal`]`(seed, stream, i)` (for fusing noise into other per-voxel loops).
#[derive(Clone, Copy)]
pub struct NoiseStream {
    key: u64,
    tables: &'static Ziggurat,
}

impl std::fmt::Debug for NoiseStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseStream")
            .field("key", &self.key)
            .finish()
    }
}

impl NoiseStream {
    /// The stream `stream` of job seed `seed`.
    pub fn new(seed: u64, stream: u64) -> Self {
        Self {
            key: stream_key(seed, stream),
            tables: ziggurat(),
        }
    }

    /// The N(0, 1) value of voxel `index`.
    pub fn at(&self, index: u64) -> f32 {
        normal_at(self.tables, self.key, index) as f32
    }

    /// `out[i]` = [`NoiseStream::at`]`(first + i)`, bitwise; many values at once are
    /// cheaper (see [`fill_normals`]).
    pub fn fill(&self, first: u64, out: &mut [f32]) {
        fill_normals(self.tables, self.key, first, out);
    }
}

/// Values per batch of [`fill_normals`].
const FILL_LANES: usize = 64;

/// `out[i]` = `normal_at(z, key, first + i)` as f32, bitwise: the first draw of every
/// voxel and its fast-path test (|x| below the next layer edge, ≈ 99 % of voxels) for
/// [`FILL_LANES`] voxels at once in plain loops the compiler vectorises, all of them
/// written out as f32, then `normal_at` itself over the few rejected ones. The fast
/// path's operations are the same IEEE-754 basic operations as `normal_at`'s (with
/// [`top53_split`] for the conversion), so the values are too. With AVX-512
/// ([`crate::simd`]) the loops use its 64-bit multiplies and gathers.
fn fill_normals(z: &Ziggurat, key: u64, first: u64, out: &mut [f32]) {
    fill_normals_isa(crate::simd::VectorIsa::detect(), z, key, first, out);
}

crate::dispatch_isa!(fn fill_normals_isa(z: &Ziggurat, key: u64, first: u64, out: &mut [f32]) => fill_normals_portable);

#[inline(always)]
fn fill_normals_portable(z: &Ziggurat, key: u64, first: u64, out: &mut [f32]) {
    for (c, out) in out.chunks_mut(FILL_LANES).enumerate() {
        let start = first.wrapping_add((c * FILL_LANES) as u64);
        let mut x = [0.0f64; FILL_LANES];
        let mut fast = [false; FILL_LANES];
        for k in 0..FILL_LANES {
            let bits = random_bits(key, start.wrapping_add(k as u64));
            let layer = (bits & 0xff) as usize;
            let u = 2.0 * (top53_split(bits) * TWO_POW_M53) - 1.0;
            let v = u * z.x[layer];
            fast[k] = v.abs() < z.x[layer + 1];
            x[k] = v;
        }
        for (o, &v) in out.iter_mut().zip(&x) {
            *o = v as f32;
        }
        // Rejections are ≈ 1 % of voxels: gather the chunk's rejected lanes into a bit
        // mask (a branch-free reduction), then visit only those.
        let mut rejected = fast
            .iter()
            .enumerate()
            .fold(0u64, |m, (k, &f)| m | (u64::from(!f) << k));
        if out.len() < FILL_LANES {
            rejected &= (1u64 << out.len()) - 1;
        }
        while rejected != 0 {
            let k = rejected.trailing_zeros() as usize;
            rejected &= rejected - 1;
            out[k] = normal_at(z, key, start.wrapping_add(k as u64)) as f32;
        }
    }
}

/// The standard-normal value of voxel `index` in stream `stream` of job seed `seed`.
pub fn standard_normal(seed: u64, stream: u64, index: u64) -> f32 {
    normal_at(ziggurat(), stream_key(seed, stream), index) as f32
}

/// Fills `out[i]` with [`standard_normal`]`(seed, stream, first + i)`, in parallel; the
/// values do not depend on the thread count.
pub fn fill_standard_normal(seed: u64, stream: u64, first: u64, out: &mut [f32]) {
    const CHUNK: usize = 1 << 14;
    let key = stream_key(seed, stream);
    let z = ziggurat();
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(ci, chunk)| {
            fill_normals(z, key, first + (ci * CHUNK) as u64, chunk);
        });
}

/// A `shape` volume of standard-normal noise of `stream`; voxel (i, j, k) has linear
/// index (i·ny + j)·nz + k (C order).
pub fn noise_volume(seed: u64, stream: u64, shape: [usize; 3]) -> Array3<f32> {
    let mut out = Array3::<f32>::zeros(shape);
    if let Some(buf) = out.as_slice_mut() {
        fill_standard_normal(seed, stream, 0, buf);
    }
    out
}

/// The initial state x_T ~ N(0, I) of a job with seed `seed` over a (padded) volume.
pub fn initial_noise(seed: u64, shape: [usize; 3]) -> Array3<f32> {
    noise_volume(seed, INITIAL_STREAM, shape)
}

/// The fresh noise z of sampling step `k` of a job with seed `seed`.
pub fn step_noise(seed: u64, k: usize, shape: [usize; 3]) -> Array3<f32> {
    noise_volume(seed, step_stream(k), shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The noise of one stream is pinned by a fingerprint of 2²⁰ values recorded with the
    /// scalar, det_exp-only generator of 0e40aa0: any change of the bits (a faster path, a
    /// new platform) fails here. Also the wedge and tail paths are among these values.
    #[test]
    fn noise_matches_its_recorded_fingerprint() {
        let mut v = vec![0.0f32; 1 << 20];
        fill_standard_normal(2024, step_stream(7), 12_345, &mut v);
        let fp = v
            .iter()
            .fold(0u64, |h, x| mix64(h ^ u64::from(x.to_bits())));
        assert_eq!(fp, 0x8a1a_afa0_851c_7354, "noise fingerprint {fp:#018x}");
    }

    /// The wedge test through libm's `exp` with its margin decides as `det_exp` alone
    /// would, on values spread over the wedge range and on values at and around
    /// det_exp(t) itself.
    #[test]
    fn the_wedge_test_decides_as_det_exp_does() {
        for i in 0..200_000u64 {
            let b = random_bits(99, i);
            // t over the range the layers can give (|x| < R, t = −x²/2 ≥ −6.7).
            let t = -6.7 * (top53(b) * TWO_POW_M53);
            let e = det_exp(t);
            let u = top53(random_bits(98, i)) * TWO_POW_M53;
            for y in [
                u,
                e,
                e * (1.0 + 1e-12),
                e * (1.0 - 1e-12),
                e * (1.0 + 1e-8),
                e * (1.0 - 1e-8),
            ] {
                assert_eq!(wedge_accepts(y, t), y < e, "y {y} t {t}");
            }
        }
    }

    /// The conversion without `cvtsi2sd` is exact: the same f64 as `top53` at both ends
    /// of the range, at the 2³² boundary of its two halves, and on a million random bit
    /// patterns.
    #[test]
    fn split_conversion_is_exact() {
        let edges = [
            0u64,
            1 << 11,
            (1 << 43) - 1,
            1 << 43,
            (1 << 43) | (1 << 11),
            u64::MAX,
        ];
        let random = (0..1_000_000u64).map(|i| random_bits(5, i));
        for bits in edges.into_iter().chain(random) {
            assert_eq!(
                top53_split(bits).to_bits(),
                top53(bits).to_bits(),
                "bits {bits:#018x}"
            );
        }
    }

    /// The batched fill (on each vector extension this CPU has) equals `normal_at`
    /// voxel by voxel, bitwise, from starts on and off its batch edges, with both the fast
    /// path and the rejections (wedge and tail) exercised.
    #[test]
    fn batched_fill_is_normal_at_bitwise() {
        let z = ziggurat();
        let key = stream_key(7, 3);
        let mut rejected = 0;
        for first in [0u64, 1, 63, 64, 1_000_003, u64::MAX / 2] {
            let n = 70_001;
            let want: Vec<u32> = (0..n)
                .map(|i| (normal_at(z, key, first + i) as f32).to_bits())
                .collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for isa in crate::simd::VectorIsa::available() {
                let mut got = vec![0.0f32; n as usize];
                fill_normals_isa(isa, z, key, first, &mut got);
                assert_eq!(bits(&got), want, "{isa:?} from {first}");
            }
            let mut dispatched = vec![0.0f32; n as usize];
            fill_normals(z, key, first, &mut dispatched);
            assert_eq!(bits(&dispatched), want, "dispatched from {first}");
            rejected += (0..n)
                .filter(|&i| {
                    let b = random_bits(key, first + i);
                    let l = (b & 0xff) as usize;
                    (2.0 * (top53(b) * TWO_POW_M53) - 1.0).abs() * z.x[l] >= z.x[l + 1]
                })
                .count();
        }
        assert!(rejected > 1000, "{rejected} rejections");
    }

    #[test]
    fn deterministic_ln_and_exp_match_libm() {
        // Our polynomials vs the platform libm: relative 1e-14 is far below what an f32
        // normal can see (2^-24 ≈ 6e-8) and a few ulp above f64 round-off.
        for i in 1..2000u64 {
            let x = (i as f64 / 1999.0).powi(3) + 1e-16;
            assert!(
                (det_ln(x) - x.ln()).abs() <= 1e-14 * x.ln().abs().max(1.0),
                "ln {x}"
            );
            let y = -(i as f64) / 50.0;
            assert!((det_exp(y) - y.exp()).abs() <= 1e-14 * y.exp(), "exp {y}");
        }
        assert_eq!(det_ln(1.0), 0.0);
        assert_eq!(det_exp(0.0), 1.0);
        assert_eq!(det_exp(-800.0), 0.0);
    }

    #[test]
    fn ziggurat_tables_match_the_published_ones() {
        // Marsaglia & Tsang's 256-layer table as printed in rand_distr's
        // ziggurat_tables.rs (x_0, x_2, x_255, f_1); 1e-12 allows for their 18-digit rounding.
        let z = ziggurat();
        assert!((z.x[0] - 3.910_757_959_537_09).abs() < 1e-12, "{}", z.x[0]);
        assert!((z.x[2] - 3.449_278_298_560_964).abs() < 1e-12, "{}", z.x[2]);
        assert!(
            (z.x[255] - 0.215_241_895_913_273_8).abs() < 1e-12,
            "{}",
            z.x[255]
        );
        assert!(
            (z.f[1] - 0.001_260_285_930_498_598).abs() < 1e-15,
            "{}",
            z.f[1]
        );
        assert!(z.x.windows(2).all(|w| w[0] > w[1]));
        // Every layer has area V: x_i (f_{i+1} − f_i) = V for i ≥ 1 (construction check).
        for i in 1..ZIG_LAYERS - 1 {
            assert!(
                (z.x[i] * (z.f[i + 1] - z.f[i]) - ZIG_V).abs() < 1e-12,
                "layer {i}"
            );
        }
    }

    #[test]
    fn noise_is_a_pure_function_of_seed_stream_and_index() {
        let a = noise_volume(7, 3, [5, 6, 7]);
        let b = noise_volume(7, 3, [5, 6, 7]);
        assert_eq!(a, b);
        assert_eq!(
            a[[2, 3, 4]],
            standard_normal(7, 3, ((2 * 6 + 3) * 7 + 4) as u64)
        );
        let mut part = vec![0.0f32; 11];
        fill_standard_normal(7, 3, 51, &mut part);
        for (i, v) in part.iter().enumerate() {
            assert_eq!(*v, a.as_slice().unwrap()[51 + i]);
        }
        assert_ne!(noise_volume(8, 3, [5, 6, 7]), a);
        assert_ne!(noise_volume(7, 4, [5, 6, 7]), a);
    }

    #[test]
    fn noise_follows_the_standard_normal_distribution() {
        // n = 2^21 draws. Moments: s.e. of the mean 7e-4, of the variance 1e-3, of the
        // kurtosis 3.4e-3; bounds at ≈ 5 s.e. Shape: a χ² test on 64 equiprobable-ish
        // bins over [−4, 4] plus both tails, with probabilities from Simpson integration
        // of the density; the 0.9999 quantile of χ²(65) is about 120.
        let n = 1usize << 21;
        let mut v = vec![0.0f32; n];
        fill_standard_normal(12345, step_stream(3), 0, &mut v);
        let nf = n as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / nf;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / nf;
        let kurt = v.iter().map(|&x| (x as f64 - mean).powi(4)).sum::<f64>() / nf / (var * var);
        let lag1 = v.windows(2).map(|w| w[0] as f64 * w[1] as f64).sum::<f64>() / (nf - 1.0);
        assert!(mean.abs() < 3.5e-3, "mean {mean}");
        assert!((var - 1.0).abs() < 5e-3, "var {var}");
        assert!((kurt - 3.0).abs() < 0.02, "kurtosis {kurt}");
        assert!(lag1.abs() < 3.5e-3, "lag-1 correlation {lag1}");

        let pdf = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let integrate = |a: f64, b: f64| {
            let m = 200;
            let h = (b - a) / m as f64;
            (0..=m)
                .map(|k| {
                    let w = if k == 0 || k == m {
                        1.0
                    } else if k % 2 == 1 {
                        4.0
                    } else {
                        2.0
                    };
                    w * pdf(a + k as f64 * h)
                })
                .sum::<f64>()
                * h
                / 3.0
        };
        let bins = 64;
        let edges: Vec<f64> = (0..=bins)
            .map(|k| -4.0 + 8.0 * k as f64 / bins as f64)
            .collect();
        let mut counts = vec![0usize; bins + 2];
        for &x in &v {
            let x = x as f64;
            let b = if x < -4.0 {
                bins
            } else if x >= 4.0 {
                bins + 1
            } else {
                (((x + 4.0) / 8.0 * bins as f64) as usize).min(bins - 1)
            };
            counts[b] += 1;
        }
        let inner: Vec<f64> = (0..bins)
            .map(|k| integrate(edges[k], edges[k + 1]))
            .collect();
        let tail = (1.0 - inner.iter().sum::<f64>()) / 2.0;
        let mut chi2 = 0.0;
        for (k, &c) in counts.iter().enumerate() {
            let p = if k < bins { inner[k] } else { tail };
            let e = p * nf;
            chi2 += (c as f64 - e).powi(2) / e;
        }
        assert!(chi2 < 120.0, "chi-square {chi2} on {} bins", bins + 2);
        // Tail beyond R = 3.654 (the ziggurat's tail branch): P = 2.58e-4 both sides.
        let far = v.iter().filter(|x| x.abs() as f64 > ZIG_R).count() as f64 / nf;
        assert!((far - 2.58e-4).abs() < 6e-5, "tail {far}");
    }
}
