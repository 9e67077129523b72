//! 3D discrete Fourier transforms on [rustfft], parallel over lines with rayon.
//!
//! Conventions (the same as `numpy.fft`):
//! - forward: X\[k\] = Σₙ x\[n\]·e^{−2πi k·n/N}, unnormalised;
//! - inverse: x\[n\] = (1/N)·Σₖ X\[k\]·e^{+2πi k·n/N}, where N is the total number of voxels;
//! - frequency index k on an axis of length n stands for k/n cycles per voxel for
//!   k < ⌈n/2⌉ and (k − n)/n otherwise ([`fftfreq`]); on even axes the Nyquist index n/2
//!   is taken as −1/2.
//!
//! Precision: every routine is generic over [`FftFloat`] (f32 or f64). The physics code
//! (dipole convolution, simulation, TKD, operators) runs in f32, matching the f32 volumes:
//! the transform error is ~1e-7·log₂N relative to the signal norm, far below the ppb
//! level that matters for χ. The tests check the f64 path against a naive DFT to 1e-10.
//!
//! Layout: arrays are C-ordered `[n0, n1, n2]`. Axis 2 is transformed row by row in
//! place; axes 0 and 1 gather tiles of 16 columns into a contiguous buffer, transform
//! them together and scatter back. Real input uses the half spectrum `[n0, n1, n2/2+1]`
//! ([`RealFft3`]): two real rows are packed into one complex transform along axis 2;
//! axes 2 and 1 are done slab by slab (each slab `[n1, n2/2+1]` stays in cache), and a
//! convolution fuses forward FFT, filter and inverse FFT in its axis-0 pass, so a
//! convolution makes three passes over the spectrum. Zero-padding and cropping are folded
//! into the transforms (slabs and rows known to be zero or not needed are skipped), so
//! the padded real array is never materialised.
//!
//! Plans come from a process-wide cache keyed by (length, direction) ([`plan`]); an FFT
//! plan is `Send + Sync`, so one plan serves every thread. Each key is planned by a fresh
//! [`FftPlanner`], so a plan (and every output bit) does not depend on which other lengths
//! the process planned before ([`PlanCache`] says why rustfft's own cache is not used).

use crate::error::{Error, Result};
use ndarray::parallel::prelude::*;
use ndarray::{Array3, ArrayView3, ArrayViewMut2, Axis, s};
use rustfft::num_complex::Complex;
use rustfft::num_traits::Float;
use rustfft::{Fft, FftDirection, FftNum, FftPlanner};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// A real type the transforms run in: `f32` or `f64`.
pub trait FftFloat: FftNum + Float + Default {
    /// The process-wide plan cache for this precision.
    fn plan_cache() -> &'static PlanCache<Self>;
}

/// Cache of FFT plans keyed by (length, direction). Planning is done once per key, each
/// time with a fresh [`FftPlanner`].
///
/// Why not one shared `Mutex<FftPlanner<T>>` (rustfft caches plans per length itself):
/// rustfft's AVX planner builds a new length on top of the sub-FFTs it has already cached
/// (`replan_with_cache`), so the algorithm chosen for a length, and its rounding, depends
/// on the lengths planned before it in the process. Measured with rustfft 6.4.1 (AVX2), a
/// shared planner fed lengths 400, 399, …, 1 gives f64 transforms of lengths 321, 216,
/// 214 and 107 that differ bitwise from a fresh planner's (and 864, 1152, 1296, 1728 among
/// the fast lengths ≤ 2048); f32 showed no difference in the orders tried, but nothing
/// guarantees it. Results would then depend on the order in which a process met its
/// volume sizes. `plans_do_not_depend_on_planning_history` guards this.
pub struct PlanCache<T: FftNum> {
    plans: Mutex<PlanMap<T>>,
}

/// Plans keyed by (length, forward?).
type PlanMap<T> = HashMap<(usize, bool), Arc<dyn Fft<T>>>;

impl<T: FftNum> PlanCache<T> {
    fn new() -> Self {
        Self {
            plans: Mutex::new(HashMap::new()),
        }
    }

    /// The plan for `len` points in `direction`, planned on first use.
    pub fn get(&self, len: usize, direction: FftDirection) -> Arc<dyn Fft<T>> {
        let key = (len, direction == FftDirection::Forward);
        // A poisoned lock only means another thread panicked while planning; the map is
        // still a valid cache.
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        plans
            .entry(key)
            .or_insert_with(|| FftPlanner::new().plan_fft(len, direction))
            .clone()
    }
}

impl FftFloat for f32 {
    fn plan_cache() -> &'static PlanCache<f32> {
        static CACHE: OnceLock<PlanCache<f32>> = OnceLock::new();
        CACHE.get_or_init(PlanCache::new)
    }
}

impl FftFloat for f64 {
    fn plan_cache() -> &'static PlanCache<f64> {
        static CACHE: OnceLock<PlanCache<f64>> = OnceLock::new();
        CACHE.get_or_init(PlanCache::new)
    }
}

/// A cached FFT plan of `len` points in `direction`.
pub fn plan<T: FftFloat>(len: usize, direction: FftDirection) -> Arc<dyn Fft<T>> {
    T::plan_cache().get(len, direction)
}

/// The smallest length ≥ `n` (and ≥ 1) whose only prime factors are 2, 3, 5 and 7; FFTs
/// of such lengths are fast.
pub fn fast_len(n: usize) -> usize {
    let mut m = n.max(1);
    loop {
        let mut r = m;
        for p in [2, 3, 5, 7] {
            while r.is_multiple_of(p) {
                r /= p;
            }
        }
        if r == 1 {
            return m;
        }
        m += 1;
    }
}

/// [`fast_len`] per axis.
pub fn fast_shape(shape: [usize; 3]) -> [usize; 3] {
    shape.map(fast_len)
}

/// How the FFT grid of a convolution is chosen from a volume's shape. Padding is with
/// zeros at the far end of each axis (equivalent to symmetric padding for a circular
/// convolution, up to a shift that the crop undoes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Padding {
    /// No padding: circular convolution on the volume's own grid.
    None,
    /// Pad each axis to the next fast FFT length ([`fast_len`]); little or no margin.
    Fast,
    /// Pad each axis by at least `margin` voxels, then to the next fast length.
    Margin([usize; 3]),
    /// Pad each axis to at least ⌈factor·n⌉ (factor ≥ 1), then to the next fast length;
    /// 2.0 is qsm-forward's 2N, which removes wrap-around for fields of compact sources.
    Factor(f64),
}

impl Padding {
    /// The FFT grid for a volume of `shape`.
    pub fn grid(&self, shape: [usize; 3]) -> Result<[usize; 3]> {
        check_nonempty(shape, "padding")?;
        Ok(match *self {
            Padding::None => shape,
            Padding::Fast => fast_shape(shape),
            Padding::Margin(m) => [0, 1, 2].map(|a| fast_len(shape[a] + m[a])),
            Padding::Factor(f) => {
                if !(f.is_finite() && (1.0..=16.0).contains(&f)) {
                    return Err(Error::Parameter(format!(
                        "padding factor must be in [1, 16], got {f}"
                    )));
                }
                shape.map(|n| fast_len((n as f64 * f).ceil() as usize))
            }
        })
    }
}

/// FFT sample frequencies of an axis of length `n` in cycles per voxel (as
/// `numpy.fft.fftfreq`): 0, 1/n, …, then negative; the Nyquist index n/2 (even n) is −1/2.
pub fn fftfreq(n: usize) -> Vec<f64> {
    (0..n)
        .map(|k| {
            let k = if k < n.div_ceil(2) {
                k as f64
            } else {
                k as f64 - n as f64
            };
            k / n as f64
        })
        .collect()
}

/// Copies `data` into the corner (origin at index 0) of a `shape` array filled with
/// `value`. Errors if `shape` is smaller than `data` on any axis.
pub fn pad<A: Clone>(data: ArrayView3<'_, A>, shape: [usize; 3], value: A) -> Result<Array3<A>> {
    let d = data.shape();
    if (0..3).any(|a| shape[a] < d[a]) {
        return Err(Error::Shape(format!(
            "cannot pad an array of shape {d:?} to the smaller shape {shape:?}"
        )));
    }
    let mut out = Array3::from_elem(shape, value);
    out.slice_mut(s![..d[0], ..d[1], ..d[2]]).assign(&data);
    Ok(out)
}

/// The corner `[..shape[0], ..shape[1], ..shape[2]]` of `data` (inverse of [`pad`]).
/// Errors if `shape` is larger than `data` on any axis.
pub fn crop<A: Clone>(data: ArrayView3<'_, A>, shape: [usize; 3]) -> Result<Array3<A>> {
    let d = data.shape();
    if (0..3).any(|a| shape[a] > d[a]) {
        return Err(Error::Shape(format!(
            "cannot crop an array of shape {d:?} to the larger shape {shape:?}"
        )));
    }
    Ok(data
        .slice(s![..shape[0], ..shape[1], ..shape[2]])
        .to_owned())
}

/// Columns per gathered tile for the strided axes (16 complex values = 128 bytes in f32).
const TILE: usize = 16;

fn check_nonempty(shape: [usize; 3], what: &str) -> Result<()> {
    if shape.contains(&0) {
        return Err(Error::Shape(format!(
            "{what}: FFT shape must be nonzero on every axis, got {shape:?}"
        )));
    }
    Ok(())
}

fn make_standard<A: Clone>(data: &mut Array3<A>) {
    if !data.is_standard_layout() {
        *data = data.as_standard_layout().into_owned();
    }
}

/// Per-task buffers: the gathered tile, the FFT scratch and one filter line.
type Buffers<T> = (Vec<Complex<T>>, Vec<Complex<T>>, Vec<T>);

fn buffers<T: FftFloat>(len: usize, fft: &dyn Fft<T>) -> Buffers<T> {
    let zero = Complex::new(T::zero(), T::zero());
    (
        vec![zero; len * TILE],
        vec![zero; fft.get_inplace_scratch_len().max(1)],
        vec![T::zero(); len],
    )
}

/// An array of `shape` filled with `value`, written in parallel.
fn par_filled<A: Clone + Send + Sync>(shape: [usize; 3], value: A) -> Array3<A> {
    let n = shape.iter().product::<usize>();
    let v: Vec<A> = (0..n).into_par_iter().map(|_| value.clone()).collect();
    Array3::from_shape_vec(shape, v).unwrap_or_else(|_| Array3::from_elem(shape, value))
}

/// Transforms every column of `view` (`[len, ncols]`, contiguous rows) in place: tiles of
/// up to [`TILE`] columns are gathered, transformed with `fft` and scattered back. When
/// `then` is given, each column is also multiplied by the filter line that
/// `filter(col, line)` writes and transformed with `then` before scattering (the fused
/// filter step of [`RealFft3::convolve_lines`]).
fn transform_columns<T, F>(
    mut view: ArrayViewMut2<'_, Complex<T>>,
    fft: &dyn Fft<T>,
    then: Option<(&dyn Fft<T>, &F)>,
    (buf, scratch, line): &mut Buffers<T>,
) where
    T: FftFloat,
    F: Fn(usize, &mut [T]) + ?Sized,
{
    let (len, ncols) = view.dim();
    let mut c0 = 0;
    while c0 < ncols {
        let w = TILE.min(ncols - c0);
        for r in 0..len {
            let row = view.row(r);
            match row.as_slice() {
                Some(sl) => {
                    for (b, v) in sl[c0..c0 + w].iter().enumerate() {
                        buf[b * len + r] = *v;
                    }
                }
                None => {
                    for b in 0..w {
                        buf[b * len + r] = row[c0 + b];
                    }
                }
            }
        }
        let tile = &mut buf[..w * len];
        fft.process_with_scratch(tile, scratch);
        if let Some((inv, filter)) = then {
            for b in 0..w {
                filter(c0 + b, line);
                for (v, h) in tile[b * len..(b + 1) * len].iter_mut().zip(line.iter()) {
                    *v = *v * *h;
                }
            }
            inv.process_with_scratch(tile, scratch);
        }
        for r in 0..len {
            let mut row = view.row_mut(r);
            match row.as_slice_mut() {
                Some(sl) => {
                    for (b, v) in sl[c0..c0 + w].iter_mut().enumerate() {
                        *v = buf[b * len + r];
                    }
                }
                None => {
                    for b in 0..w {
                        row[c0 + b] = buf[b * len + r];
                    }
                }
            }
        }
        c0 += w;
    }
}

/// Transforms axis 2 (contiguous rows) of slabs `0..slabs` in place.
fn fft_axis2<T: FftFloat>(data: &mut Array3<Complex<T>>, slabs: usize, fft: &Arc<dyn Fft<T>>) {
    let n2 = data.shape()[2];
    data.axis_iter_mut(Axis(0))
        .into_par_iter()
        .take(slabs)
        .for_each_init(
            || vec![Complex::new(T::zero(), T::zero()); fft.get_inplace_scratch_len().max(1)],
            |scratch, mut slab| match slab.as_slice_mut() {
                Some(sl) => {
                    debug_assert_eq!(sl.len() % n2, 0);
                    fft.process_with_scratch(sl, scratch);
                }
                None => {
                    // Cannot happen for standard-layout arrays; stay correct anyway by
                    // transforming row by row through a copy.
                    for mut row in slab.rows_mut() {
                        let mut line: Vec<_> = row.iter().copied().collect();
                        fft.process_with_scratch(&mut line, scratch);
                        row.iter_mut().zip(line).for_each(|(d, s)| *d = s);
                    }
                }
            },
        );
}

/// Transforms axis 1 of slabs `0..slabs` in place.
fn fft_axis1<T: FftFloat>(data: &mut Array3<Complex<T>>, slabs: usize, fft: &Arc<dyn Fft<T>>) {
    let n1 = data.shape()[1];
    data.axis_iter_mut(Axis(0))
        .into_par_iter()
        .take(slabs)
        .for_each_init(
            || buffers(n1, fft.as_ref()),
            |bufs, slab| transform_columns::<T, NoLine<T>>(slab, fft.as_ref(), None, bufs),
        );
}

type NoLine<T> = dyn Fn(usize, &mut [T]) + Sync;
type NoLine3<T> = fn(usize, usize, &mut [T]);

/// Transforms axis 0 in place (parallel over axis 1). With `then`, each line (j, l) is
/// multiplied by the filter line `filter(j, l, out)` writes and transformed again by
/// `then` (fused convolution step).
fn fft_axis0<T, F>(
    data: &mut Array3<Complex<T>>,
    fft: &Arc<dyn Fft<T>>,
    then: Option<(&Arc<dyn Fft<T>>, &F)>,
) where
    T: FftFloat,
    F: Fn(usize, usize, &mut [T]) + Sync,
{
    let n0 = data.shape()[0];
    data.axis_iter_mut(Axis(1))
        .into_par_iter()
        .enumerate()
        .for_each_init(
            || buffers(n0, fft.as_ref()),
            |bufs, (j, plane)| match then {
                Some((inv, filter)) => {
                    let f = |l: usize, out: &mut [T]| filter(j, l, out);
                    transform_columns(plane, fft.as_ref(), Some((inv.as_ref(), &f)), bufs)
                }
                None => transform_columns::<T, NoLine<T>>(plane, fft.as_ref(), None, bufs),
            },
        );
}

/// In-place unnormalised 3D FFT of a complex array in `direction`.
pub fn fft3<T: FftFloat>(data: &mut Array3<Complex<T>>, direction: FftDirection) -> Result<()> {
    let sh = data.shape();
    let shape = [sh[0], sh[1], sh[2]];
    check_nonempty(shape, "fft3")?;
    make_standard(data);
    let p: Vec<Arc<dyn Fft<T>>> = shape.iter().map(|&n| plan::<T>(n, direction)).collect();
    fft_axis2(data, shape[0], &p[2]);
    fft_axis1(data, shape[0], &p[1]);
    fft_axis0::<T, NoLine3<T>>(data, &p[0], None);
    Ok(())
}

/// In-place forward 3D FFT (unnormalised), as `numpy.fft.fftn`.
pub fn fftn<T: FftFloat>(data: &mut Array3<Complex<T>>) -> Result<()> {
    fft3(data, FftDirection::Forward)
}

/// In-place inverse 3D FFT normalised by 1/N, as `numpy.fft.ifftn`.
pub fn ifftn<T: FftFloat>(data: &mut Array3<Complex<T>>) -> Result<()> {
    fft3(data, FftDirection::Inverse)?;
    let scale = T::one() / T::from_usize(data.len()).unwrap_or_else(T::one);
    data.par_mapv_inplace(|v| v * scale);
    Ok(())
}

/// A real-to-complex 3D FFT of fixed (possibly padded) `shape` with its inverse, on the
/// half spectrum `[n0, n1, n2/2 + 1]` (axis 2 halved, as `numpy.fft.rfftn`).
///
/// Inputs smaller than `shape` are zero-padded at the far end of each axis and outputs
/// can be cropped to a corner, without materialising the padded real array.
pub struct RealFft3<T: FftFloat> {
    shape: [usize; 3],
    fwd: [Arc<dyn Fft<T>>; 3],
    inv: [Arc<dyn Fft<T>>; 3],
}

impl<T: FftFloat> std::fmt::Debug for RealFft3<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealFft3")
            .field("shape", &self.shape)
            .finish()
    }
}

impl<T: FftFloat> RealFft3<T> {
    /// Plans the transforms for a real grid of `shape` (every axis ≥ 1).
    pub fn new(shape: [usize; 3]) -> Result<Self> {
        check_nonempty(shape, "RealFft3")?;
        let f = |d| shape.map(|n| plan::<T>(n, d));
        Ok(Self {
            shape,
            fwd: f(FftDirection::Forward),
            inv: f(FftDirection::Inverse),
        })
    }

    /// The real grid shape.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// The half-spectrum shape `[n0, n1, n2/2 + 1]`.
    pub fn spectrum_shape(&self) -> [usize; 3] {
        [self.shape[0], self.shape[1], self.shape[2] / 2 + 1]
    }

    fn check_inner(&self, m: &[usize], what: &str) -> Result<[usize; 3]> {
        if m.len() != 3 || (0..3).any(|a| m[a] == 0 || m[a] > self.shape[a]) {
            return Err(Error::Shape(format!(
                "{what} of shape {m:?} must be nonempty and fit in the FFT grid {:?}",
                self.shape
            )));
        }
        Ok([m[0], m[1], m[2]])
    }

    /// Forward transform of `x` zero-padded (at the far end) to [`RealFft3::shape`];
    /// returns the unnormalised half spectrum. Errors if `x` is larger than the grid.
    pub fn forward(&self, x: ArrayView3<'_, T>) -> Result<Array3<Complex<T>>> {
        self.check_inner(x.shape(), "FFT input")?;
        let mut spec = self.r2c_slabs(x);
        fft_axis0::<T, NoLine3<T>>(&mut spec, &self.fwd[0], None);
        Ok(spec)
    }

    /// Inverse transform (normalised by 1/N) of a Hermitian half spectrum, cropped to the
    /// corner of `out_shape`. For any half spectrum H the result is Re(ifftn(Z)), Z the
    /// full spectrum implied by H (Z\[q\] = conj(H\[−q\]) on the missing half), as
    /// `numpy.fft.irfftn`.
    pub fn inverse(
        &self,
        mut spec: Array3<Complex<T>>,
        out_shape: [usize; 3],
    ) -> Result<Array3<T>> {
        self.check_spectrum(&spec)?;
        let m = self.check_inner(&out_shape, "FFT output")?;
        make_standard(&mut spec);
        fft_axis0::<T, NoLine3<T>>(&mut spec, &self.inv[0], None);
        Ok(self.c2r_slabs(&mut spec, m))
    }

    /// Circular convolution on the grid: Re(ifftn(H · fftn(pad(x)))) cropped to
    /// `out_shape`, for a real filter H given on the half spectrum by `filter(i, j, l)`
    /// (indices into [`RealFft3::spectrum_shape`]). H must be Hermitian-consistent, i.e.
    /// H(k) = H(−k), for the result to be the exact real convolution.
    pub fn convolve<F>(
        &self,
        x: ArrayView3<'_, T>,
        out_shape: [usize; 3],
        filter: F,
    ) -> Result<Array3<T>>
    where
        F: Fn(usize, usize, usize) -> T + Sync,
    {
        self.convolve_lines(x, out_shape, |j, l, out: &mut [T]| {
            for (i, o) in out.iter_mut().enumerate() {
                *o = filter(i, j, l);
            }
        })
    }

    /// [`RealFft3::convolve`] with the filter given by lines along axis 0:
    /// `filter(j, l, out)` writes H(i, j, l) for every i into `out` (length n0). Faster
    /// when the filter is cheaper to evaluate or copy a line at a time.
    pub fn convolve_lines<F>(
        &self,
        x: ArrayView3<'_, T>,
        out_shape: [usize; 3],
        filter: F,
    ) -> Result<Array3<T>>
    where
        F: Fn(usize, usize, &mut [T]) + Sync,
    {
        self.check_inner(x.shape(), "convolution input")?;
        let m_out = self.check_inner(&out_shape, "convolution output")?;
        let mut spec = self.r2c_slabs(x);
        fft_axis0(&mut spec, &self.fwd[0], Some((&self.inv[0], &filter)));
        Ok(self.c2r_slabs(&mut spec, m_out))
    }

    fn check_spectrum(&self, spec: &Array3<Complex<T>>) -> Result<()> {
        let want = self.spectrum_shape();
        if spec.shape() != want {
            return Err(Error::Shape(format!(
                "half spectrum has shape {:?}, expected {want:?}",
                spec.shape()
            )));
        }
        Ok(())
    }

    /// Real-to-complex transform along axis 2 (two rows per complex FFT) followed by the
    /// forward transform along axis 1, slab by slab while the slab is in cache. Slabs and
    /// rows beyond the input are zero and skipped.
    fn r2c_slabs(&self, x: ArrayView3<'_, T>) -> Array3<Complex<T>> {
        let n2 = self.shape[2];
        let h = n2 / 2 + 1;
        let zero = Complex::new(T::zero(), T::zero());
        let mut spec = par_filled(self.spectrum_shape(), zero);
        let x = x.as_standard_layout();
        let m2 = x.shape()[2];
        let fft = &self.fwd[2];
        let fft1 = self.fwd[1].as_ref();
        let half = T::from_f64(0.5).unwrap_or_else(T::one);
        spec.axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(x.axis_iter(Axis(0)).into_par_iter())
            .for_each_init(
                || {
                    (
                        vec![zero; n2],
                        vec![zero; fft.get_inplace_scratch_len().max(1)],
                        buffers(self.shape[1], fft1),
                    )
                },
                |(buf, scratch, ybufs), (mut out, inp)| {
                    let rows = inp.shape()[0];
                    let mut j = 0;
                    while j < rows {
                        let pair = j + 1 < rows;
                        let a = inp.row(j);
                        for (l, v) in buf.iter_mut().enumerate() {
                            *v = if l < m2 {
                                Complex::new(a[l], T::zero())
                            } else {
                                zero
                            };
                        }
                        if pair {
                            let b = inp.row(j + 1);
                            for (v, bv) in buf.iter_mut().zip(b.iter()) {
                                v.im = *bv;
                            }
                        }
                        fft.process_with_scratch(buf, scratch);
                        if pair {
                            for k in 0..h {
                                let z = buf[k];
                                let zc = buf[(n2 - k) % n2].conj();
                                let sum = z + zc;
                                let dif = z - zc;
                                out[[j, k]] = sum * half;
                                // (z − zc) / (2i)
                                out[[j + 1, k]] = Complex::new(dif.im * half, -dif.re * half);
                            }
                        } else {
                            for k in 0..h {
                                out[[j, k]] = buf[k];
                            }
                        }
                        j += 2;
                    }
                    transform_columns::<T, NoLine<T>>(out, fft1, None, ybufs);
                },
            );
        spec
    }

    /// Inverse transform along axis 1 then complex-to-real along axis 2, slab by slab, of
    /// the slabs and rows inside `m` only; normalised by 1/N.
    fn c2r_slabs(&self, spec: &mut Array3<Complex<T>>, m: [usize; 3]) -> Array3<T> {
        let n2 = self.shape[2];
        let h = n2 / 2 + 1;
        let zero = Complex::new(T::zero(), T::zero());
        let n_total = self.shape.iter().product::<usize>();
        let scale = T::one() / T::from_usize(n_total).unwrap_or_else(T::one);
        let fft = &self.inv[2];
        let fft1 = self.inv[1].as_ref();
        let mut out = par_filled(m, T::zero());
        // Entries whose imaginary part must vanish for a real signal: DC and (even n2)
        // Nyquist.
        let real_only = |k: usize| k == 0 || (n2.is_multiple_of(2) && k == n2 / 2);
        out.axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(spec.axis_iter_mut(Axis(0)).into_par_iter())
            .for_each_init(
                || {
                    (
                        vec![zero; n2],
                        vec![zero; fft.get_inplace_scratch_len().max(1)],
                        buffers(self.shape[1], fft1),
                    )
                },
                |(buf, scratch, ybufs), (mut out, mut sp)| {
                    transform_columns::<T, NoLine<T>>(sp.view_mut(), fft1, None, ybufs);
                    let rows = m[1];
                    let mut j = 0;
                    while j < rows {
                        let pair = j + 1 < rows;
                        let a = sp.row(j);
                        let b = if pair { Some(sp.row(j + 1)) } else { None };
                        for k in 0..h {
                            let mut av = a[k];
                            let mut bv = b.as_ref().map_or(zero, |b| b[k]);
                            if real_only(k) {
                                av.im = T::zero();
                                bv.im = T::zero();
                            }
                            // z = a + i·b
                            buf[k] = Complex::new(av.re - bv.im, av.im + bv.re);
                            if k > 0 && n2 - k >= h {
                                // z[n−k] = conj(a) + i·conj(b)
                                buf[n2 - k] = Complex::new(av.re + bv.im, -av.im + bv.re);
                            }
                        }
                        fft.process_with_scratch(buf, scratch);
                        let mut ra = out.row_mut(j);
                        for (l, o) in ra.iter_mut().enumerate() {
                            *o = buf[l].re * scale;
                        }
                        if pair {
                            let mut rb = out.row_mut(j + 1);
                            for (l, o) in rb.iter_mut().enumerate() {
                                *o = buf[l].im * scale;
                            }
                        }
                        j += 2;
                    }
                },
            );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    /// Deterministic pseudo-random reals in [−1, 1) (splitmix64), for test inputs.
    fn rand_array(shape: [usize; 3], seed: u64) -> Array3<f64> {
        let mut s = seed;
        Array3::from_shape_fn(shape, |_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
    }

    /// Naive O(N²) DFT of a real or complex array, forward (sign −1) or inverse (+1,
    /// unnormalised).
    fn naive_dft(x: &Array3<Complex<f64>>, sign: f64) -> Array3<Complex<f64>> {
        let sh = x.shape();
        let (n0, n1, n2) = (sh[0], sh[1], sh[2]);
        Array3::from_shape_fn((n0, n1, n2), |(k0, k1, k2)| {
            let mut acc = Complex::new(0.0, 0.0);
            for ((i, j, l), v) in x.indexed_iter() {
                let ph = sign
                    * 2.0
                    * std::f64::consts::PI
                    * ((k0 * i) as f64 / n0 as f64
                        + (k1 * j) as f64 / n1 as f64
                        + (k2 * l) as f64 / n2 as f64);
                acc += v * Complex::new(ph.cos(), ph.sin());
            }
            acc
        })
    }

    fn max_abs_diff(a: &Array3<Complex<f64>>, b: &Array3<Complex<f64>>) -> f64 {
        a.iter()
            .zip(b.iter())
            .map(|(x, y)| (x - y).norm())
            .fold(0.0, f64::max)
    }

    #[test]
    fn fast_len_and_freq() {
        assert_eq!(fast_len(0), 1);
        assert_eq!(fast_len(1), 1);
        assert_eq!(fast_len(11), 12);
        assert_eq!(fast_len(13), 14);
        assert_eq!(fast_len(97), 98);
        assert_eq!(fast_len(256), 256);
        assert_eq!(fast_len(161), 162);
        assert_eq!(fast_len(211), 216);
        assert_eq!(fast_shape([11, 16, 17]), [12, 16, 18]);
        assert_eq!(fftfreq(4), vec![0.0, 0.25, -0.5, -0.25]);
        assert_eq!(fftfreq(5), vec![0.0, 0.2, 0.4, -0.4, -0.2]);
        assert_eq!(Padding::None.grid([11, 13, 4]).unwrap(), [11, 13, 4]);
        assert_eq!(Padding::Fast.grid([11, 13, 4]).unwrap(), [12, 14, 4]);
        assert_eq!(
            Padding::Margin([2, 0, 1]).grid([11, 13, 4]).unwrap(),
            [14, 14, 5]
        );
        assert_eq!(
            Padding::Factor(2.0).grid([11, 13, 256]).unwrap(),
            [24, 27, 512]
        );
        assert!(Padding::Factor(0.5).grid([4, 4, 4]).is_err());
        assert!(Padding::Factor(f64::NAN).grid([4, 4, 4]).is_err());
    }

    #[test]
    fn pad_and_crop() {
        let a = rand_array([2, 3, 4], 1);
        let p = pad(a.view(), [3, 3, 6], 7.0).unwrap();
        assert_eq!(p[[2, 0, 0]], 7.0);
        assert_eq!(p[[1, 2, 5]], 7.0);
        assert_eq!(crop(p.view(), [2, 3, 4]).unwrap(), a);
        assert!(pad(a.view(), [1, 3, 4], 0.0).is_err());
        assert!(crop(a.view(), [3, 3, 4]).is_err());
    }

    /// Complex fftn/ifftn on an odd, non-power-of-two shape against a naive DFT. f64:
    /// errors are a few ulp × N, so 1e-10 absolute on O(N) values is generous.
    #[test]
    fn complex_fft_matches_naive_dft() {
        let shape = [5, 6, 7];
        let re = rand_array(shape, 2);
        let im = rand_array(shape, 3);
        let x = Array3::from_shape_fn(shape, |i| Complex::new(re[i], im[i]));
        let mut y = x.clone();
        fftn(&mut y).unwrap();
        assert!(max_abs_diff(&y, &naive_dft(&x, -1.0)) < 1e-10);
        ifftn(&mut y).unwrap();
        assert!(max_abs_diff(&y, &x) < 1e-12);
        let mut z = x.clone();
        fft3(&mut z, FftDirection::Inverse).unwrap();
        assert!(max_abs_diff(&z, &naive_dft(&x, 1.0)) < 1e-10);
    }

    /// Axis 0/1 tiles span more than one TILE of columns (n2 = 37 → 19 half-spectrum
    /// columns) and an odd row count along axis 1 exercises the unpaired row.
    #[test]
    fn real_fft_matches_naive_dft_with_padding() {
        for (m, n) in [
            ([3, 5, 7], [3, 5, 7]),
            ([4, 3, 6], [6, 5, 8]),
            ([2, 3, 30], [3, 4, 37]),
            ([1, 1, 1], [2, 1, 3]),
        ] {
            let x = rand_array(m, 4);
            let f = RealFft3::<f64>::new(n).unwrap();
            let spec = f.forward(x.view()).unwrap();
            let padded = pad(x.view(), n, 0.0)
                .unwrap()
                .mapv(|v| Complex::new(v, 0.0));
            let full = naive_dft(&padded, -1.0);
            let half = full.slice(s![.., .., ..n[2] / 2 + 1]).to_owned();
            assert!(max_abs_diff(&spec, &half) < 1e-10, "{m:?} in {n:?}");
            // Inverse with cropping returns the input corner (padded zeros dropped).
            let back = f.inverse(spec, m).unwrap();
            let err = (&back - &x).iter().fold(0.0f64, |a, v| a.max(v.abs()));
            assert!(err < 1e-12, "{m:?} in {n:?}: {err}");
        }
    }

    /// Circular convolution with a symmetric real filter equals the naive
    /// Re(ifftn(H·fftn(x))) computed with full complex transforms.
    #[test]
    fn convolve_matches_full_complex_path() {
        let n = [6, 5, 8];
        let m_in = [4, 5, 7];
        let m_out = [5, 3, 8];
        let x = rand_array(m_in, 5);
        let fr = [fftfreq(n[0]), fftfreq(n[1]), fftfreq(n[2])];
        // H(k) = 1 + kx² + 2ky² + 3kz² + kx·kz: even in k → Hermitian-consistent, except
        // the cross term on Nyquist planes, which we avoid by using |kx|·|kz|.
        let h = |i: usize, j: usize, l: usize| {
            let (a, b, c) = (fr[0][i], fr[1][j], fr[2][l]);
            1.0 + a * a + 2.0 * b * b + 3.0 * c * c + a.abs() * c.abs()
        };
        let f = RealFft3::<f64>::new(n).unwrap();
        let y = f.convolve(x.view(), m_out, h).unwrap();
        let mut full = pad(x.view(), n, 0.0)
            .unwrap()
            .mapv(|v| Complex::new(v, 0.0));
        fftn(&mut full).unwrap();
        for ((i, j, l), v) in full.indexed_iter_mut() {
            *v *= h(i, j, l);
        }
        ifftn(&mut full).unwrap();
        let expect = crop(full.mapv(|v| v.re).view(), m_out).unwrap();
        let err = (&y - &expect).iter().fold(0.0f64, |a, v| a.max(v.abs()));
        assert!(err < 1e-12, "{err}");
    }

    /// f32 round trip on a larger fast shape: relative error ~1e-7·log₂N, bound 1e-5.
    #[test]
    fn f32_round_trip() {
        let n = [20, 18, 24];
        let x = rand_array(n, 6).mapv(|v| v as f32);
        let f = RealFft3::<f32>::new(n).unwrap();
        let back = f.inverse(f.forward(x.view()).unwrap(), n).unwrap();
        let err = (&back - &x).iter().fold(0.0f32, |a, v| a.max(v.abs()));
        assert!(err < 1e-5, "{err}");
    }

    /// Every cached plan computes bit for bit what a fresh planner's plan of the same
    /// length computes, whatever was planned before: lengths are planned in descending
    /// order, the order in which a shared rustfft planner would reuse cached sub-FFTs and
    /// change the f64 plans of lengths 321, 216, 214 and 107.
    #[test]
    fn plans_do_not_depend_on_planning_history() {
        for n in (1..=400).rev() {
            for d in [FftDirection::Forward, FftDirection::Inverse] {
                let x: Vec<Complex<f64>> = (0..n)
                    .map(|i| Complex::new((0.37 * i as f64).sin(), (0.11 * i as f64).cos()))
                    .collect();
                let (mut a, mut b) = (x.clone(), x);
                plan::<f64>(n, d).process(&mut a);
                FftPlanner::<f64>::new().plan_fft(n, d).process(&mut b);
                let same = a.iter().zip(&b).all(|(p, q)| {
                    p.re.to_bits() == q.re.to_bits() && p.im.to_bits() == q.im.to_bits()
                });
                assert!(
                    same,
                    "length {n} {d:?}: cached plan differs from a fresh one"
                );
            }
        }
    }

    #[test]
    fn shape_errors() {
        let f = RealFft3::<f64>::new([4, 4, 4]).unwrap();
        assert!(matches!(
            f.forward(Array3::zeros((5, 4, 4)).view()),
            Err(Error::Shape(_))
        ));
        assert!(f.inverse(Array3::zeros((4, 4, 4)), [4, 4, 4]).is_err());
        assert!(RealFft3::<f64>::new([0, 4, 4]).is_err());
        let mut e: Array3<Complex<f64>> = Array3::zeros((0, 2, 2));
        assert!(fftn(&mut e).is_err());
    }
}
