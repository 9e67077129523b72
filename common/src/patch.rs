//! [`PatchGrid`]: the overlapping cubic patch grid of DM-QSM.
//!
//! A volume of shape N is embedded (centred, zero padded) in a padded volume whose every
//! axis has length P + m·stride, so that patches of edge P at origins j·stride
//! (j = 0 … m) tile it exactly and every voxel is covered at least once. Reassembly sums
//! the patch values of each voxel and divides by the number of patches covering it (the
//! overlap/count normalisation of DM-QSM and WeatherDiffusion, REFERENCE.md §3).
//!
//! Determinism: sums are accumulated in f64 in ascending patch-index order for every
//! voxel, whatever the thread count, so results are bitwise reproducible. Summing in
//! f64 also makes `assemble(split(x)) == x` exact: c copies of an f32 value add exactly
//! in f64 and divide back exactly.
//!
//! Optional grid shifting (beyond the paper): the patch origins can be shifted by an
//! offset (drawn per step from a seed, [`PatchGrid::seeded_offset`]) so that seams move
//! between steps. Shifted patches wrap around the padded volume (indices modulo the
//! padded length, a torus), so coverage is preserved; a grid built for shifting carries
//! one extra stride of padding per axis so that the wrap seam falls in padding.

use crate::error::{Error, Result};
use crate::splitmix::{random_bits, stream_key};
use ndarray::{Array3, Array4, ArrayView3, ArrayView4};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Patch edge P of DM-QSM (48 voxels).
pub const DEFAULT_PATCH_SIZE: usize = 48;
/// Patch overlap S of DM-QSM (8 voxels, read as the overlap, i.e. stride P − S).
pub const DEFAULT_OVERLAP: usize = 8;

/// Noise stream used for seeded grid offsets (distinct from x_T and step noise streams,
/// which count up from 0).
const OFFSET_STREAM: u64 = 0x6f66_6673_6574_0000; // "offset"

/// How far apart patch origins are: by overlap S (stride P − S) or by stride directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GridSpacing {
    /// Overlap S in voxels between neighbouring patches (DM-QSM's S); stride = P − S.
    Overlap(usize),
    /// Distance between neighbouring patch origins in voxels (WeatherDiffusion's r).
    Stride(usize),
}

impl Default for GridSpacing {
    /// DM-QSM's S = 8 voxel overlap.
    fn default() -> Self {
        GridSpacing::Overlap(DEFAULT_OVERLAP)
    }
}

impl GridSpacing {
    /// The stride for patch edge `patch`; errors unless 1 ≤ stride ≤ P (an overlap must be
    /// smaller than P, a stride larger than P would leave gaps).
    pub fn stride(self, patch: usize) -> Result<usize> {
        match self {
            GridSpacing::Overlap(s) if s < patch => Ok(patch - s),
            GridSpacing::Overlap(s) => Err(Error::Parameter(format!(
                "patch overlap {s} must be smaller than the patch size {patch}"
            ))),
            GridSpacing::Stride(s) if s >= 1 && s <= patch => Ok(s),
            GridSpacing::Stride(s) => Err(Error::Parameter(format!(
                "patch stride {s} must be between 1 and the patch size {patch}"
            ))),
        }
    }
}

/// A contiguous run of one patch along one axis: `len` voxels starting at padded
/// coordinate `start`, which are patch-local coordinates `local ..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    start: usize,
    local: usize,
    len: usize,
}

/// An overlapping grid of cubic patches over a padded volume (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchGrid {
    volume_shape: [usize; 3],
    patch: usize,
    stride: usize,
    padded_shape: [usize; 3],
    pad_before: [usize; 3],
    per_axis: [usize; 3],
    offset: [usize; 3],
    shifting: bool,
}

impl PatchGrid {
    /// A grid of P³ patches spaced by `spacing` covering a volume of `volume_shape`.
    /// Errors on an empty volume, P = 0 or an invalid spacing.
    pub fn new(volume_shape: [usize; 3], patch: usize, spacing: GridSpacing) -> Result<Self> {
        Self::build(volume_shape, patch, spacing, false)
    }

    /// Like [`PatchGrid::new`], with one extra stride of padding per axis so that the grid
    /// can be shifted per step ([`PatchGrid::with_offset`]) with the wrap seam in padding.
    pub fn new_shifting(
        volume_shape: [usize; 3],
        patch: usize,
        spacing: GridSpacing,
    ) -> Result<Self> {
        Self::build(volume_shape, patch, spacing, true)
    }

    fn build(
        volume_shape: [usize; 3],
        patch: usize,
        spacing: GridSpacing,
        shifting: bool,
    ) -> Result<Self> {
        if patch == 0 {
            return Err(Error::Parameter("patch size must be at least 1".into()));
        }
        if volume_shape.contains(&0) {
            return Err(Error::Shape(format!(
                "cannot build a patch grid over an empty volume of shape {volume_shape:?}"
            )));
        }
        let stride = spacing.stride(patch)?;
        let mut padded_shape = [0; 3];
        let mut pad_before = [0; 3];
        let mut per_axis = [0; 3];
        for a in 0..3 {
            let n = volume_shape[a];
            let mut m = n.saturating_sub(patch).div_ceil(stride);
            if shifting {
                m += 1;
            }
            padded_shape[a] = patch + m * stride;
            pad_before[a] = (padded_shape[a] - n) / 2;
            per_axis[a] = m + 1;
        }
        Ok(Self {
            volume_shape,
            patch,
            stride,
            padded_shape,
            pad_before,
            per_axis,
            offset: [0; 3],
            shifting,
        })
    }

    /// Shape of the (unpadded) volume.
    pub fn volume_shape(&self) -> [usize; 3] {
        self.volume_shape
    }
    /// Shape of the padded volume the patches tile.
    pub fn padded_shape(&self) -> [usize; 3] {
        self.padded_shape
    }
    /// Padding voxels before the volume on each axis (the volume starts there).
    pub fn pad_before(&self) -> [usize; 3] {
        self.pad_before
    }
    /// Index ranges of the volume inside the padded volume.
    pub fn volume_region(&self) -> [Range<usize>; 3] {
        std::array::from_fn(|a| self.pad_before[a]..self.pad_before[a] + self.volume_shape[a])
    }
    /// Patch edge P in voxels.
    pub fn patch_size(&self) -> usize {
        self.patch
    }
    /// Distance between patch origins in voxels.
    pub fn stride(&self) -> usize {
        self.stride
    }
    /// Overlap P − stride in voxels.
    pub fn overlap(&self) -> usize {
        self.patch - self.stride
    }
    /// Number of patches along each axis.
    pub fn patches_per_axis(&self) -> [usize; 3] {
        self.per_axis
    }
    /// Total number of patches.
    pub fn len(&self) -> usize {
        self.per_axis.iter().product()
    }
    /// Always false: a grid has at least one patch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the grid was built with the extra padding for shifting.
    pub fn is_shifting(&self) -> bool {
        self.shifting
    }
    /// Current cyclic offset of the patch origins in voxels.
    pub fn offset(&self) -> [usize; 3] {
        self.offset
    }

    /// The same grid with its patch origins shifted cyclically by `offset` voxels.
    /// Errors if an offset is not smaller than the stride.
    pub fn with_offset(&self, offset: [usize; 3]) -> Result<Self> {
        if offset.iter().any(|&o| o >= self.stride) {
            return Err(Error::Parameter(format!(
                "grid offset {offset:?} must be smaller than the stride {} on every axis",
                self.stride
            )));
        }
        Ok(Self {
            offset,
            ..self.clone()
        })
    }

    /// The offset of sampling step `step` of a job with seed `seed`: uniform in
    /// [0, stride) per axis, a pure function of (seed, step) (keyed SplitMix64).
    pub fn seeded_offset(&self, seed: u64, step: usize) -> [usize; 3] {
        let key = stream_key(seed, OFFSET_STREAM);
        std::array::from_fn(|a| {
            (random_bits(key, 3 * step as u64 + a as u64) % self.stride as u64) as usize
        })
    }

    /// Patch index of the patch at grid position `(jx, jy, jz)` (C order).
    pub fn index(&self, pos: [usize; 3]) -> usize {
        (pos[0] * self.per_axis[1] + pos[1]) * self.per_axis[2] + pos[2]
    }

    /// Grid position `(jx, jy, jz)` of patch `index`.
    pub fn position(&self, index: usize) -> [usize; 3] {
        let jz = index % self.per_axis[2];
        let r = index / self.per_axis[2];
        [r / self.per_axis[1], r % self.per_axis[1], jz]
    }

    /// Padded-volume origin of patch `index` (its voxels wrap modulo the padded shape).
    pub fn origin(&self, index: usize) -> [usize; 3] {
        let pos = self.position(index);
        std::array::from_fn(|a| self.axis_origin(a, pos[a]))
    }

    fn axis_origin(&self, axis: usize, j: usize) -> usize {
        (self.offset[axis] + j * self.stride) % self.padded_shape[axis]
    }

    /// The (at most two) contiguous runs of patch `j` along `axis`.
    fn runs(&self, axis: usize, j: usize) -> [Run; 2] {
        let l = self.padded_shape[axis];
        let o = self.axis_origin(axis, j);
        let first = (l - o).min(self.patch);
        [
            Run {
                start: o,
                local: 0,
                len: first,
            },
            Run {
                start: 0,
                local: first,
                len: self.patch - first,
            },
        ]
    }

    /// For each padded coordinate along `axis`, the (patch j, local coordinate) pairs
    /// covering it, in ascending j.
    fn coverage(&self, axis: usize) -> Vec<Vec<(usize, usize)>> {
        let l = self.padded_shape[axis];
        let mut cov = vec![Vec::new(); l];
        for j in 0..self.per_axis[axis] {
            let o = self.axis_origin(axis, j);
            for local in 0..self.patch {
                cov[(o + local) % l].push((j, local));
            }
        }
        cov
    }

    /// Number of patches covering each padded coordinate along `axis`.
    pub fn axis_counts(&self, axis: usize) -> Vec<usize> {
        self.coverage(axis).iter().map(Vec::len).collect()
    }

    /// Per-voxel patch count over the padded volume (product of the axis counts, since
    /// the grid is a Cartesian product). Every entry is ≥ 1.
    pub fn count_volume(&self) -> Array3<f32> {
        let c: [Vec<usize>; 3] = std::array::from_fn(|a| self.axis_counts(a));
        Array3::from_shape_fn(self.padded_shape, |(i, j, k)| {
            (c[0][i] * c[1][j] * c[2][k]) as f32
        })
    }

    /// Embeds a volume of `volume_shape` in a zero padded volume.
    pub fn pad(&self, x: ArrayView3<'_, f32>) -> Result<Array3<f32>> {
        self.check_shape("volume", x.shape(), self.volume_shape)?;
        let mut out = Array3::<f32>::zeros(self.padded_shape);
        let [rx, ry, rz] = self.volume_region();
        out.slice_mut(ndarray::s![rx, ry, rz]).assign(&x);
        Ok(out)
    }

    /// Cuts the volume region out of a padded volume.
    pub fn crop<T: Clone>(&self, padded: ArrayView3<'_, T>) -> Result<Array3<T>> {
        self.check_shape("padded volume", padded.shape(), self.padded_shape)?;
        let [rx, ry, rz] = self.volume_region();
        let Some(src) = padded.as_slice() else {
            return Ok(padded.slice(ndarray::s![rx, ry, rz]).to_owned());
        };
        // Row-wise copies of the contiguous padded volume.
        let [_, ly, lz] = self.padded_shape;
        let mut out = Vec::with_capacity(self.volume_shape.iter().product());
        for i in rx {
            for j in ry.clone() {
                let row = (i * ly + j) * lz;
                out.extend_from_slice(&src[row + rz.start..row + rz.end]);
            }
        }
        Array3::from_shape_vec(self.volume_shape, out).map_err(|e| Error::Shape(e.to_string()))
    }

    /// Patch `index` of a padded volume, `[P, P, P]`.
    pub fn extract(&self, padded: ArrayView3<'_, f32>, index: usize) -> Result<Array3<f32>> {
        self.check_shape("padded volume", padded.shape(), self.padded_shape)?;
        self.check_index(index)?;
        let src = padded.as_standard_layout();
        let src = src
            .as_slice()
            .ok_or_else(|| Error::Shape("padded volume is not contiguous".into()))?;
        let p = self.patch;
        let mut out = vec![0.0f32; p * p * p];
        self.extract_slice(src, index, &mut out);
        Array3::from_shape_vec((p, p, p), out).map_err(|e| Error::Shape(e.to_string()))
    }

    fn extract_slice(&self, src: &[f32], index: usize, out: &mut [f32]) {
        self.for_each_run(src, index, |at, run| {
            out[at..at + run.len()].copy_from_slice(run)
        });
    }

    /// Appends patches `indices` (any order) of a padded volume to a new buffer, `[B, P,
    /// P, P]` values in C order: a batch's model input, without zeroing the buffer first.
    pub fn extract_batch(
        &self,
        padded: ArrayView3<'_, f32>,
        indices: &[usize],
    ) -> Result<Vec<f32>> {
        self.check_shape("padded volume", padded.shape(), self.padded_shape)?;
        for &i in indices {
            self.check_index(i)?;
        }
        let src = padded.as_standard_layout();
        let src = src
            .as_slice()
            .ok_or_else(|| Error::Shape("padded volume is not contiguous".into()))?;
        let mut out = Vec::with_capacity(indices.len() * self.patch.pow(3));
        for &i in indices {
            // The runs come in patch order, so appending them fills the patch in C order.
            self.for_each_run(src, i, |_, run| out.extend_from_slice(run));
        }
        Ok(out)
    }

    /// Calls `emit(offset, run)` for every contiguous run of patch `index` of a padded
    /// volume (`padded`: its values in C order), in ascending offset within the patch's
    /// P³ values (C order): the runs tile the patch, so copying each run to its offset
    /// cuts the patch wherever it is to live (a shared-memory slot, say) without a buffer
    /// in between. A run is at most one patch row of P values (a row that wraps around a
    /// shifted grid's padded volume comes as two). Errors on a volume of the wrong length
    /// or an index outside the grid.
    pub fn visit_patch(
        &self,
        padded: &[f32],
        index: usize,
        emit: impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        let n: usize = self.padded_shape.iter().product();
        if padded.len() != n {
            return Err(Error::Shape(format!(
                "padded volume of {} values, the grid's padded shape {:?} has {n}",
                padded.len(),
                self.padded_shape
            )));
        }
        self.check_index(index)?;
        self.for_each_run(padded, index, emit);
        Ok(())
    }

    /// Calls `emit(offset in the patch, run)` for every contiguous run of patch `index`
    /// in a padded volume (C order), in ascending offset: the runs tile the patch.
    fn for_each_run(&self, src: &[f32], index: usize, mut emit: impl FnMut(usize, &[f32])) {
        let p = self.patch;
        let [_, ly, lz] = self.padded_shape;
        let pos = self.position(index);
        let (ox, oy) = (self.axis_origin(0, pos[0]), self.axis_origin(1, pos[1]));
        let runs = self.runs(2, pos[2]);
        for a in 0..p {
            let px = (ox + a) % self.padded_shape[0];
            for b in 0..p {
                let py = (oy + b) % ly;
                let row = &src[(px * ly + py) * lz..(px * ly + py + 1) * lz];
                let at = (a * p + b) * p;
                for r in runs.iter().filter(|r| r.len > 0) {
                    emit(at + r.local, &row[r.start..r.start + r.len]);
                }
            }
        }
    }

    /// All patches of a padded volume, `[n, P, P, P]` in patch-index order.
    pub fn split_padded(&self, padded: ArrayView3<'_, f32>) -> Result<Array4<f32>> {
        self.check_shape("padded volume", padded.shape(), self.padded_shape)?;
        let src = padded.as_standard_layout();
        let src = src
            .as_slice()
            .ok_or_else(|| Error::Shape("padded volume is not contiguous".into()))?;
        let p = self.patch;
        let p3 = p * p * p;
        let mut out = vec![0.0f32; self.len() * p3];
        out.par_chunks_mut(p3)
            .enumerate()
            .for_each(|(idx, dst)| self.extract_slice(src, idx, dst));
        Array4::from_shape_vec((self.len(), p, p, p), out).map_err(|e| Error::Shape(e.to_string()))
    }

    /// Zero pads a volume of `volume_shape` and splits it into patches.
    pub fn split(&self, x: ArrayView3<'_, f32>) -> Result<Array4<f32>> {
        self.split_padded(self.pad(x)?.view())
    }

    /// Sum over patches of their values at each padded voxel (no normalisation), in f64,
    /// in ascending patch-index order per voxel. `patches[i]` is patch i, `[P, P, P]`.
    ///
    /// This is the adjoint of [`PatchGrid::split_padded`] (Σ_p E_pᵀ v_p).
    pub fn accumulate(&self, patches: &[ArrayView3<'_, f32>]) -> Result<Array3<f64>> {
        let owned = self.standard_patches(patches)?;
        let slices = contiguous(&owned)?;
        let plan = self.plane_plan();
        let [_, ly, lz] = self.padded_shape;
        let mut out = vec![0.0f64; self.padded_shape.iter().product()];
        out.par_chunks_mut(ly * lz)
            .enumerate()
            .for_each(|(i, plane)| self.accumulate_plane(&plan, &slices, i, plane));
        Array3::from_shape_vec(self.padded_shape, out).map_err(|e| Error::Shape(e.to_string()))
    }

    /// The patches in standard layout (borrowed when they already are), checked: one per
    /// grid patch, each `[P, P, P]`.
    fn standard_patches<'a>(
        &self,
        patches: &'a [ArrayView3<'a, f32>],
    ) -> Result<Vec<ndarray::CowArray<'a, f32, ndarray::Ix3>>> {
        if patches.len() != self.len() {
            return Err(Error::Shape(format!(
                "patch grid has {} patches, got {}",
                self.len(),
                patches.len()
            )));
        }
        let p = self.patch;
        patches
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if v.shape() != [p, p, p] {
                    return Err(Error::Shape(format!(
                        "patch {i} has shape {:?}, expected [{p}, {p}, {p}]",
                        v.shape()
                    )));
                }
                Ok(v.as_standard_layout())
            })
            .collect()
    }

    /// Which patch rows cover each x plane, y row and z run (see [`PatchGrid::accumulate`]).
    fn plane_plan(&self) -> PlanePlan {
        PlanePlan {
            cov_x: self.coverage(0),
            cov_y: self.coverage(1),
            runs_z: (0..self.per_axis[2]).map(|j| self.runs(2, j)).collect(),
        }
    }

    /// Adds every patch's contribution to x plane `i` into `plane` (`[ly, lz]`, C order),
    /// per voxel in ascending patch-index order.
    fn accumulate_plane(&self, plan: &PlanePlan, patches: &[&[f32]], i: usize, plane: &mut [f64]) {
        let p = self.patch;
        let lz = self.padded_shape[2];
        for &(jx, a) in &plan.cov_x[i] {
            for (py, cy) in plan.cov_y.iter().enumerate() {
                let row = &mut plane[py * lz..(py + 1) * lz];
                for &(jy, b) in cy {
                    for (jz, runs) in plan.runs_z.iter().enumerate() {
                        let src = patches[self.index([jx, jy, jz])];
                        let src_row = &src[(a * p + b) * p..(a * p + b + 1) * p];
                        for r in runs.iter().filter(|r| r.len > 0) {
                            for (d, s) in row[r.start..r.start + r.len]
                                .iter_mut()
                                .zip(&src_row[r.local..r.local + r.len])
                            {
                                *d += *s as f64;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Per-axis counts and a table of reciprocals 1/n for every product count n;
    /// errors if any voxel is uncovered (cannot happen for a grid built here).
    fn count_tables(&self) -> Result<([Vec<usize>; 3], Vec<f64>)> {
        let c: [Vec<usize>; 3] = std::array::from_fn(|a| self.axis_counts(a));
        if c.iter().any(|v| v.contains(&0)) {
            return Err(Error::Shape(format!(
                "patch grid leaves voxels uncovered (patch {}, stride {}, padded {:?})",
                self.patch, self.stride, self.padded_shape
            )));
        }
        let max: usize = c
            .iter()
            .map(|v| v.iter().copied().max().unwrap_or(1))
            .product();
        let recip = (0..=max)
            .map(|n| if n == 0 { 0.0 } else { 1.0 / n as f64 })
            .collect();
        Ok((c, recip))
    }

    /// Applies `f(value, 1/count)` over a padded volume, row by row in parallel.
    fn per_count<T: Copy + Sync>(
        &self,
        v: &[T],
        f: impl Fn(T, f64) -> f32 + Sync,
    ) -> Result<Array3<f32>> {
        let (c, recip) = self.count_tables()?;
        let [_, ly, lz] = self.padded_shape;
        let mut out = vec![0.0f32; v.len()];
        out.par_chunks_mut(ly * lz)
            .zip(v.par_chunks(ly * lz))
            .enumerate()
            .for_each(|(i, (o, s))| {
                for j in 0..ly {
                    let cij = c[0][i] * c[1][j];
                    let (o, s) = (&mut o[j * lz..(j + 1) * lz], &s[j * lz..(j + 1) * lz]);
                    for ((o, &s), &ck) in o.iter_mut().zip(s).zip(&c[2]) {
                        *o = f(s, recip[cij * ck]);
                    }
                }
            });
        Array3::from_shape_vec(self.padded_shape, out).map_err(|e| Error::Shape(e.to_string()))
    }

    /// Divides a padded f64 sum by the per-voxel patch count and rounds to f32
    /// (multiplying by 1/count in f64: for a sum of c equal f32 values this returns the
    /// value exactly, since the f64 error is far below half an f32 ulp).
    /// Errors if any count is 0 (cannot happen for a grid built here; checked anyway).
    pub fn normalise(&self, sum: &Array3<f64>) -> Result<Array3<f32>> {
        self.check_shape("patch sum", sum.shape(), self.padded_shape)?;
        let s = sum.as_standard_layout();
        let s = s
            .as_slice()
            .ok_or_else(|| Error::Shape("patch sum is not contiguous".into()))?;
        self.per_count(s, |v, r| (v * r) as f32)
    }

    /// v / count over the padded volume (the DPS cotangent g/count of exact guidance).
    pub fn divide_by_count(&self, v: &Array3<f32>) -> Result<Array3<f32>> {
        self.check_shape("volume", v.shape(), self.padded_shape)?;
        let s = v.as_standard_layout();
        let s = s
            .as_slice()
            .ok_or_else(|| Error::Shape("volume is not contiguous".into()))?;
        self.per_count(s, |v, r| (v as f64 * r) as f32)
    }

    /// Overlap-normalised reassembly over the padded volume: Σ_p E_pᵀ v_p / count.
    ///
    /// The same arithmetic as [`PatchGrid::normalise`] of [`PatchGrid::accumulate`] (f64
    /// sums in patch order, times 1/count, rounded to f32), bit for bit, but plane by
    /// plane through one reused f64 plane per thread instead of a whole f64 volume.
    pub fn assemble_padded(&self, patches: &[ArrayView3<'_, f32>]) -> Result<Array3<f32>> {
        let owned = self.standard_patches(patches)?;
        let slices = contiguous(&owned)?;
        let mut out = vec![0.0f32; self.padded_shape.iter().product()];
        self.assemble_planes_into(&slices, &vec![true; self.padded_shape[0]], &mut out)?;
        Array3::from_shape_vec(self.padded_shape, out).map_err(|e| Error::Shape(e.to_string()))
    }

    /// The x planes of the padded volume (`[lx]`, `true` = ready) that only patches of
    /// complete x slabs cover; `complete[jx]` says whether every patch at grid position
    /// `jx` along x is in. The planes a streamed reassembly can finish already.
    pub fn planes_covered_by(&self, complete: &[bool]) -> Vec<bool> {
        self.coverage(0)
            .iter()
            .map(|cov| {
                cov.iter()
                    .all(|&(jx, _)| complete.get(jx).copied().unwrap_or(false))
            })
            .collect()
    }

    /// Overlap-normalised reassembly ([`PatchGrid::assemble_padded`], bit for bit) of
    /// the x planes marked in `planes` (`[lx]`) into `out` (the padded volume, C order);
    /// the other planes of `out` are left as they are. `patches[i]` is patch i (`P³`
    /// values, C order); a patch no marked plane needs may be empty, so that a round's
    /// reassembly can run slab by slab while the later patches are still being computed.
    /// Errors on a wrong `out` or `planes` length, or a needed patch that is missing or
    /// not `P³` long.
    pub fn assemble_planes_into(
        &self,
        patches: &[&[f32]],
        planes: &[bool],
        out: &mut [f32],
    ) -> Result<()> {
        let [lx, ly, lz] = self.padded_shape;
        if out.len() != lx * ly * lz || planes.len() != lx || patches.len() != self.len() {
            return Err(Error::Shape(format!(
                "reassembly into {} values of {} planes from {} patches; the grid has {} \
                 values, {lx} planes and {} patches",
                out.len(),
                planes.len(),
                patches.len(),
                lx * ly * lz,
                self.len()
            )));
        }
        let plan = self.plane_plan();
        let p3 = self.patch.pow(3);
        let [_, ny, nz] = self.per_axis;
        for (i, _) in planes.iter().enumerate().filter(|(_, w)| **w) {
            for &(jx, _) in &plan.cov_x[i] {
                let slab = jx * ny * nz..(jx + 1) * ny * nz;
                if let Some(bad) = slab.clone().find(|&k| patches[k].len() != p3) {
                    return Err(Error::Shape(format!(
                        "x plane {i} needs patch {bad}, which has {} of {p3} values",
                        patches[bad].len()
                    )));
                }
            }
        }
        let (c, recip) = self.count_tables()?;
        out.par_chunks_mut(ly * lz)
            .enumerate()
            .filter(|(i, _)| planes[*i])
            .for_each_init(
                || vec![0.0f64; ly * lz],
                |acc, (i, o)| {
                    acc.fill(0.0);
                    self.accumulate_plane(&plan, patches, i, acc);
                    for j in 0..ly {
                        let cij = c[0][i] * c[1][j];
                        let (o, s) = (&mut o[j * lz..(j + 1) * lz], &acc[j * lz..(j + 1) * lz]);
                        for ((o, &s), &ck) in o.iter_mut().zip(s).zip(&c[2]) {
                            *o = (s * recip[cij * ck]) as f32;
                        }
                    }
                },
            );
        Ok(())
    }

    /// Overlap-normalised reassembly of `[n, P, P, P]` patches, cropped to the volume.
    pub fn assemble(&self, patches: ArrayView4<'_, f32>) -> Result<Array3<f32>> {
        let views: Vec<ArrayView3<'_, f32>> = patches.outer_iter().collect();
        let padded = self.assemble_padded(&views)?;
        self.crop(padded.view())
    }

    fn check_shape(&self, what: &str, got: &[usize], want: [usize; 3]) -> Result<()> {
        if got != want {
            return Err(Error::Shape(format!(
                "{what} has shape {got:?}, expected {want:?}"
            )));
        }
        Ok(())
    }

    fn check_index(&self, index: usize) -> Result<()> {
        if index >= self.len() {
            return Err(Error::Parameter(format!(
                "patch index {index} out of range (grid has {} patches)",
                self.len()
            )));
        }
        Ok(())
    }
}

/// Coverage tables of one grid, shared by the planes of an accumulation.
struct PlanePlan {
    cov_x: Vec<Vec<(usize, usize)>>,
    cov_y: Vec<Vec<(usize, usize)>>,
    runs_z: Vec<[Run; 2]>,
}

/// The contiguous data of standard-layout patches.
fn contiguous<'a>(owned: &'a [ndarray::CowArray<'_, f32, ndarray::Ix3>]) -> Result<Vec<&'a [f32]>> {
    owned
        .iter()
        .map(|v| {
            v.as_slice()
                .ok_or_else(|| Error::Shape("patch is not contiguous".into()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::noise::noise_volume;

    fn random(shape: [usize; 3], seed: u64) -> Array3<f32> {
        noise_volume(seed, 99, shape)
    }

    #[test]
    fn round_trip_is_exact_for_odd_shapes_and_overlaps() {
        // Exact equality: f64 sums of c equal f32 copies divided by c are exact.
        for (shape, p) in [([61, 73, 50], 16), ([9, 20, 33], 8), ([5, 5, 5], 16)] {
            for overlap in [0usize, 8, 16] {
                if overlap >= p {
                    continue;
                }
                let grid = PatchGrid::new(shape, p, GridSpacing::Overlap(overlap)).unwrap();
                let x = random(shape, 1);
                let back = grid.assemble(grid.split(x.view()).unwrap().view()).unwrap();
                assert_eq!(back, x, "shape {shape:?} P {p} overlap {overlap}");
            }
        }
        // Overlap 16 on a 48³ patch (the case), on a small odd volume.
        let grid = PatchGrid::new([61, 50, 49], 48, GridSpacing::Overlap(16)).unwrap();
        let x = random([61, 50, 49], 2);
        assert_eq!(
            grid.assemble(grid.split(x.view()).unwrap().view()).unwrap(),
            x
        );
    }

    #[test]
    fn coverage_counts_are_positive_and_sum_to_patch_volume() {
        for spacing in [
            GridSpacing::Overlap(0),
            GridSpacing::Overlap(3),
            GridSpacing::Stride(2),
        ] {
            let grid = PatchGrid::new([23, 17, 30], 8, spacing).unwrap();
            let count = grid.count_volume();
            assert!(count.iter().all(|&c| c >= 1.0));
            // Σ count = n·P³ (each patch contributes P³ voxel visits) — independent of
            // the per-axis construction.
            let total: f64 = count.iter().map(|&c| c as f64).sum();
            assert_eq!(total, (grid.len() * 512) as f64);
            // The padded volume is tiled exactly: last patch ends at the padded edge.
            for a in 0..3 {
                let l = grid.padded_shape()[a];
                assert_eq!(
                    grid.patch_size() + (grid.patches_per_axis()[a] - 1) * grid.stride(),
                    l
                );
                assert!(l >= grid.volume_shape()[a]);
            }
        }
        // Count of the accumulated all-ones patches equals count_volume.
        let grid = PatchGrid::new([20, 13, 9], 8, GridSpacing::Overlap(5)).unwrap();
        let ones = Array4::<f32>::ones((grid.len(), 8, 8, 8));
        let views: Vec<_> = ones.outer_iter().collect();
        let sum = grid.accumulate(&views).unwrap();
        assert_eq!(sum.mapv(|v| v as f32), grid.count_volume());
        assert!(
            grid.assemble_padded(&views)
                .unwrap()
                .iter()
                .all(|&v| v == 1.0)
        );
    }

    #[test]
    fn normalisation_averages_overlapping_values() {
        // Patch i filled with the constant i: a voxel's assembled value is the mean of the
        // indices of the patches covering it (computed here by brute force).
        let grid = PatchGrid::new([14, 14, 10], 8, GridSpacing::Overlap(4)).unwrap();
        let n = grid.len();
        let patches = Array4::from_shape_fn((n, 8, 8, 8), |(i, _, _, _)| i as f32);
        let views: Vec<_> = patches.outer_iter().collect();
        let got = grid.assemble_padded(&views).unwrap();
        let shape = grid.padded_shape();
        for ((x, y, z), v) in got.indexed_iter() {
            let (mut s, mut c) = (0.0f64, 0usize);
            for i in 0..n {
                let o = grid.origin(i);
                let inside = [x, y, z]
                    .iter()
                    .zip(o)
                    .zip(shape)
                    .all(|((&q, o), l)| (q + l - o) % l < 8);
                if inside {
                    s += i as f64;
                    c += 1;
                }
            }
            assert_eq!(*v, (s / c as f64) as f32);
        }
    }

    #[test]
    fn accumulate_is_the_adjoint_of_split() {
        // ⟨split(x), v⟩ = ⟨x, accumulate(v)⟩, f64 sums of f32 products: relative 1e-9.
        let grid = PatchGrid::new_shifting([12, 11, 10], 8, GridSpacing::Overlap(3))
            .unwrap()
            .with_offset([1, 4, 2])
            .unwrap();
        let x = random(grid.padded_shape(), 3);
        let p = grid.split_padded(x.view()).unwrap();
        let v = Array4::from_shape_vec(
            p.raw_dim(),
            random([grid.len() * 8, 8, 8], 4)
                .into_raw_vec_and_offset()
                .0,
        )
        .unwrap();
        let lhs: f64 = p
            .iter()
            .zip(v.iter())
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        let views: Vec<_> = v.outer_iter().collect();
        let acc = grid.accumulate(&views).unwrap();
        let rhs: f64 = x.iter().zip(acc.iter()).map(|(&a, &b)| a as f64 * b).sum();
        assert!(
            (lhs - rhs).abs() <= 1e-9 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }

    /// The plane-by-plane assembly is bitwise the two-pass one (f64 volume, then
    /// normalise), on plain and shifted grids with uneven overlaps.
    #[test]
    fn fused_assembly_is_bitwise_normalise_of_accumulate() {
        for grid in [
            PatchGrid::new([13, 11, 10], 6, GridSpacing::Overlap(2)).unwrap(),
            PatchGrid::new_shifting([12, 11, 10], 8, GridSpacing::Overlap(3))
                .unwrap()
                .with_offset([1, 4, 2])
                .unwrap(),
        ] {
            let p = grid.patch_size();
            let v = Array4::from_shape_vec(
                (grid.len(), p, p, p),
                random([grid.len() * p, p, p], 9)
                    .into_raw_vec_and_offset()
                    .0,
            )
            .unwrap();
            let views: Vec<_> = v.outer_iter().collect();
            let two_pass = grid.normalise(&grid.accumulate(&views).unwrap()).unwrap();
            let fused = grid.assemble_padded(&views).unwrap();
            assert!(
                two_pass
                    .iter()
                    .zip(fused.iter())
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
    }

    /// Reassembly slab by slab, as a streamed round does it while patches arrive (slabs
    /// complete in a scrambled order, empty slices for patches not yet in), ends bitwise
    /// equal to the one-shot assembly, on a plain and a wrapped (shifted) grid; a plane
    /// whose patches are missing is an error, not a panic.
    #[test]
    fn slab_by_slab_assembly_is_bitwise_the_one_shot_assembly() {
        for grid in [
            PatchGrid::new([29, 11, 10], 6, GridSpacing::Overlap(2)).unwrap(),
            PatchGrid::new_shifting([30, 11, 10], 8, GridSpacing::Overlap(3))
                .unwrap()
                .with_offset([3, 4, 2])
                .unwrap(),
        ] {
            let p = grid.patch_size();
            let nx = grid.patches_per_axis()[0];
            assert!(nx >= 4, "the test wants several slabs");
            let v = Array4::from_shape_vec(
                (grid.len(), p, p, p),
                random([grid.len() * p, p, p], 11)
                    .into_raw_vec_and_offset()
                    .0,
            )
            .unwrap();
            let views: Vec<_> = v.outer_iter().collect();
            let one_shot = grid.assemble_padded(&views).unwrap();
            let all: Vec<&[f32]> = views.iter().map(|a| a.to_slice().unwrap()).collect();
            let lx = grid.padded_shape()[0];
            // NaN everywhere first: every voxel must be written exactly by its plane.
            let mut out = vec![f32::NAN; one_shot.len()];
            let mut done = vec![false; lx];
            let mut complete = vec![false; nx];
            let order: Vec<usize> = (0..nx).map(|k| (k * 3 + 1) % nx).collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..nx).collect::<Vec<_>>(), "a permutation");
            for (step, &jx) in order.iter().enumerate() {
                complete[jx] = true;
                let have: Vec<&[f32]> = (0..grid.len())
                    .map(|i| {
                        if complete[grid.position(i)[0]] {
                            all[i]
                        } else {
                            &[]
                        }
                    })
                    .collect();
                let mut want = grid.planes_covered_by(&complete);
                for (w, d) in want.iter_mut().zip(&done) {
                    *w &= !*d;
                }
                grid.assemble_planes_into(&have, &want, &mut out).unwrap();
                for (d, w) in done.iter_mut().zip(&want) {
                    *d |= *w;
                }
                if step + 1 < nx {
                    assert!(
                        !done.iter().all(|&d| d),
                        "not all planes before the last slab"
                    );
                    // Asking for every plane now needs a missing patch.
                    let err = grid
                        .assemble_planes_into(&have, &vec![true; lx], &mut out.clone())
                        .unwrap_err()
                        .to_string();
                    assert!(err.contains("needs patch"), "{err}");
                }
            }
            assert!(done.iter().all(|&d| d));
            assert!(
                one_shot
                    .iter()
                    .zip(&out)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
    }

    #[test]
    fn shifted_grid_wraps_covers_and_round_trips() {
        let base = PatchGrid::new_shifting([21, 30, 17], 8, GridSpacing::Overlap(2)).unwrap();
        assert!(base.with_offset([6, 0, 0]).is_err());
        let x = random([21, 30, 17], 5);
        for step in 0..6 {
            let off = base.seeded_offset(42, step);
            assert_eq!(off, base.seeded_offset(42, step));
            let grid = base.with_offset(off).unwrap();
            assert!(grid.count_volume().iter().all(|&c| c >= 1.0));
            assert_eq!(
                grid.assemble(grid.split(x.view()).unwrap().view()).unwrap(),
                x
            );
        }
        let offs: Vec<_> = (0..20).map(|k| base.seeded_offset(42, k)).collect();
        assert!(
            offs.iter().any(|o| *o != offs[0]),
            "offsets should vary between steps"
        );
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(PatchGrid::new([10, 10, 10], 8, GridSpacing::Overlap(8)).is_err());
        assert!(PatchGrid::new([10, 10, 10], 8, GridSpacing::Stride(0)).is_err());
        assert!(PatchGrid::new([10, 10, 10], 8, GridSpacing::Stride(9)).is_err());
        assert!(PatchGrid::new([10, 0, 10], 8, GridSpacing::Overlap(2)).is_err());
        assert!(PatchGrid::new([10, 10, 10], 0, GridSpacing::Overlap(0)).is_err());
        let grid = PatchGrid::new([10, 10, 10], 8, GridSpacing::Overlap(2)).unwrap();
        assert!(grid.pad(Array3::<f32>::zeros([10, 10, 9]).view()).is_err());
        assert!(
            grid.extract(Array3::<f32>::zeros(grid.padded_shape()).view(), grid.len())
                .is_err()
        );
        assert!(grid.accumulate(&[]).is_err());
    }
}
