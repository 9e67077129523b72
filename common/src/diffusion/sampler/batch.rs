//! What goes to a model and what comes back: [`PatchWork`] and [`PatchBatch`] (the model
//! input of a round, cut by a [`PatchSource`]), [`PatchResults`] (a batch of results, checked once where it
//! arrives) and the sampler's store of a round's results, which keeps the batches as they
//! came instead of copying their rows and, in an ε round, reassembles ε̂ slab by slab as
//! the results arrive.

use super::{RoundId, RoundInfo, RoundKind};
use crate::error::{Error, Result};
use crate::patch::PatchGrid;
use ndarray::{Array3, Array4, ArrayView3, Axis};
use std::sync::Arc;

/// One patch evaluation: the model input of patch `index`.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchWork {
    /// Patch index in the grid.
    pub index: usize,
    /// Training timestep t (as f32, the TorchScript contract).
    pub timestep: f32,
    /// x_t patch `[P, P, P]`, model units.
    pub x: Array3<f32>,
    /// Cotangent v `[P, P, P]` for a VJP round (the patch of g/count), else `None`.
    pub cotangent: Option<Array3<f32>>,
}

/// A batch of patch evaluations stacked for a model call.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchBatch {
    /// Round identity to quote when submitting the results.
    pub round: RoundId,
    /// Patch indices, in the order of the batch rows.
    pub indices: Vec<usize>,
    /// x_t patches `[B, P, P, P]`, model units.
    pub x: Array4<f32>,
    /// Timestep per row.
    pub timesteps: Vec<f32>,
    /// Cotangents `[B, P, P, P]` for a VJP round.
    pub cotangent: Option<Array4<f32>>,
}

/// The model inputs of one open round, read-only: the round's grid and x_t (and the
/// cotangent volume g/count of a VJP round), shared with the sampler rather than copied
/// ([`super::Sampler::patch_source`]). Batches can be cut from it on one thread while the
/// sampler takes the round's results on another; the sampler does not change x_t until
/// the round is complete.
#[derive(Debug, Clone)]
pub struct PatchSource {
    round: RoundInfo,
    grid: PatchGrid,
    state: Arc<Array3<f32>>,
    cotangent: Option<Arc<Array3<f32>>>,
}

impl PatchSource {
    /// The inputs of `round` over `grid`; errors if a volume is not `grid`'s padded
    /// shape or a VJP round has no cotangent.
    pub(super) fn new(
        round: RoundInfo,
        grid: PatchGrid,
        state: Arc<Array3<f32>>,
        cotangent: Option<Arc<Array3<f32>>>,
    ) -> Result<Self> {
        let want = grid.padded_shape();
        for v in std::iter::once(&state).chain(&cotangent) {
            if v.shape() != want {
                return Err(Error::Shape(format!(
                    "patch source volume of shape {:?}, the grid's padded shape is {want:?}",
                    v.shape()
                )));
            }
        }
        if (round.id.kind == RoundKind::Vjp) != cotangent.is_some() {
            return Err(Error::Protocol(format!(
                "a {:?} round {} cotangents",
                round.id.kind,
                if cotangent.is_some() {
                    "with"
                } else {
                    "without"
                }
            )));
        }
        Ok(Self {
            round,
            grid,
            state,
            cotangent,
        })
    }

    /// The round these inputs belong to.
    pub fn round(&self) -> RoundInfo {
        self.round
    }

    /// The model input of patch `index`.
    pub fn work(&self, index: usize) -> Result<PatchWork> {
        Ok(PatchWork {
            index,
            timestep: self.round.timestep as f32,
            x: self.grid.extract(self.state.view(), index)?,
            cotangent: match &self.cotangent {
                Some(c) => Some(self.grid.extract(c.view(), index)?),
                None => None,
            },
        })
    }

    /// Patch edge P.
    pub fn patch_size(&self) -> usize {
        self.grid.patch_size()
    }

    /// Whether the batches carry cotangents (a VJP round).
    pub fn has_cotangents(&self) -> bool {
        self.cotangent.is_some()
    }

    /// Cuts the model input of patches `indices` (any subset, any order) without
    /// stacking it: calls `emit(tensor, offset, run)` for every contiguous run of values,
    /// `offset` being where the run lies in that tensor's `[B, P, P, P]` C-order values
    /// ([`PatchSource::batch`]'s `x` and `cotangent`). The runs of each tensor tile it,
    /// so a caller copies each run where the tensor is to live (a worker's
    /// shared-memory slot) and nothing else is allocated. Errors on an index outside the
    /// grid, before anything is emitted.
    pub fn visit_batch(
        &self,
        indices: &[usize],
        mut emit: impl FnMut(BatchTensor, usize, &[f32]),
    ) -> Result<()> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.grid.len()) {
            return Err(Error::Parameter(format!(
                "patch index {bad} out of range (grid has {} patches)",
                self.grid.len()
            )));
        }
        let p3 = self.grid.patch_size().pow(3);
        let contiguous = || Error::Shape("patch source volume is not contiguous".into());
        let volumes = std::iter::once((BatchTensor::Patches, &self.state))
            .chain(self.cotangent.iter().map(|c| (BatchTensor::Cotangents, c)));
        for (tensor, volume) in volumes {
            let src = volume.as_slice().ok_or_else(contiguous)?;
            for (b, &index) in indices.iter().enumerate() {
                self.grid
                    .visit_patch(src, index, |at, run| emit(tensor, b * p3 + at, run))?;
            }
        }
        Ok(())
    }

    /// The stacked model input for patches `indices` (any subset, any order); errors on
    /// an index outside the grid.
    pub fn batch(&self, indices: &[usize]) -> Result<PatchBatch> {
        let p = self.grid.patch_size();
        let stack = |v: &Array3<f32>| -> Result<Array4<f32>> {
            let values = self.grid.extract_batch(v.view(), indices)?;
            Array4::from_shape_vec((indices.len(), p, p, p), values)
                .map_err(|e| Error::Shape(e.to_string()))
        };
        Ok(PatchBatch {
            round: self.round.id,
            indices: indices.to_vec(),
            x: stack(&self.state)?,
            timesteps: vec![self.round.timestep as f32; indices.len()],
            cotangent: match &self.cotangent {
                Some(c) => Some(stack(c)?),
                None => None,
            },
        })
    }
}

/// Which tensor of a batch a run of values belongs to ([`PatchSource::visit_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchTensor {
    /// The x_t patches.
    Patches,
    /// The cotangents of a VJP round.
    Cotangents,
}

/// The results of one batch of a round, checked: row b of [`PatchResults::values`]
/// (`[B, P, P, P]`, model units) is ε (ε round) or Jᵀv (VJP round) of patch
/// `indices()[b]`, and every value is finite. Built once where results arrive (a worker's
/// reply at the coordinator's edge, a model call in process) and taken by
/// [`super::Sampler::accept`] without copying.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchResults {
    round: RoundId,
    indices: Vec<usize>,
    values: Array4<f32>,
}

impl PatchResults {
    /// Checks `values` against `indices`: cubic patches, one row per index, finite values.
    pub fn new(round: RoundId, indices: Vec<usize>, values: Array4<f32>) -> Result<Self> {
        let what = match round.kind {
            RoundKind::Eps => "ε",
            RoundKind::Vjp => "Jᵀv",
        };
        let s = values.shape();
        if s[0] != indices.len() {
            return Err(Error::Model(format!(
                "batch of {} patches returned {} results",
                indices.len(),
                s[0]
            )));
        }
        if s[1] != s[2] || s[1] != s[3] {
            return Err(Error::Model(format!(
                "{what} has shape {s:?}; patches are cubic, [B, P, P, P]"
            )));
        }
        let p3 = s[1] * s[2] * s[3];
        for (row, &index) in indices.iter().enumerate() {
            let finite = match values.as_slice() {
                Some(all) => crate::volume::all_finite(&all[row * p3..(row + 1) * p3]),
                None => values
                    .index_axis(Axis(0), row)
                    .iter()
                    .all(|x| x.is_finite()),
            };
            if !finite {
                return Err(Error::Model(format!(
                    "{what} of patch {index} holds non-finite values"
                )));
            }
        }
        Ok(Self {
            round,
            indices,
            values,
        })
    }

    /// The round the results belong to.
    pub fn round(&self) -> RoundId {
        self.round
    }

    /// Patch indices, in the order of the rows.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }

    /// The patch edge P.
    pub fn patch_size(&self) -> usize {
        self.values.shape()[1]
    }

    /// The results `[B, P, P, P]`.
    pub fn values(&self) -> &Array4<f32> {
        &self.values
    }
}

/// The results of the open round, as the batches they arrived in, with the batch and row
/// of every patch held. The first result of a patch wins.
///
/// In an ε round it also holds ε̂ reassembled so far ([`RoundResults::fold`]): each x
/// plane of the padded volume is reassembled as soon as every patch covering it is in,
/// with the arithmetic of [`PatchGrid::assemble_padded`], so the finished ε̂ is bitwise
/// the one-shot reassembly whatever the order of arrival. The buffer is kept across
/// rounds, so a step neither allocates nor zeroes it.
#[derive(Debug, Clone, Default)]
pub(super) struct RoundResults {
    batches: Vec<Array4<f32>>,
    /// `(batch, row)` of each patch's result.
    slots: Vec<Option<(usize, usize)>>,
    received: usize,
    /// ε̂ over the padded volume (C order); the x planes marked in `planes_done` are final.
    assembled: Vec<f32>,
    planes_done: Vec<bool>,
}

impl RoundResults {
    /// An empty store for `n` patches.
    pub(super) fn new(n: usize) -> Self {
        Self {
            slots: vec![None; n],
            ..Self::default()
        }
    }

    /// Empties the store for a round of `n` patches (keeping the reassembly buffer).
    pub(super) fn clear(&mut self, n: usize) {
        let assembled = std::mem::take(&mut self.assembled);
        *self = Self::new(n);
        self.assembled = assembled;
    }

    /// Patches with a result.
    pub(super) fn received(&self) -> usize {
        self.received
    }

    /// Whether patch `i` has a result.
    pub(super) fn has(&self, i: usize) -> bool {
        self.slots.get(i).is_some_and(Option::is_some)
    }

    /// Keeps `results` (indices already checked against the grid); returns how many
    /// patches were new. A batch with nothing new is dropped.
    pub(super) fn insert(&mut self, results: PatchResults) -> usize {
        let b = self.batches.len();
        let mut new = 0;
        for (row, &i) in results.indices.iter().enumerate() {
            if self.slots[i].is_none() {
                self.slots[i] = Some((b, row));
                new += 1;
            }
        }
        if new > 0 {
            // Rows are read as contiguous slices when ε̂ is reassembled.
            let values = if results.values.is_standard_layout() {
                results.values
            } else {
                results.values.as_standard_layout().into_owned()
            };
            self.batches.push(values);
            self.received += new;
        }
        new
    }

    /// Every patch's result in patch-index order; errors if one is missing.
    pub(super) fn views(&self) -> Result<Vec<ArrayView3<'_, f32>>> {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (b, row) =
                    s.ok_or_else(|| Error::Protocol(format!("patch {i} has no result")))?;
                Ok(self.batches[b].index_axis(Axis(0), row))
            })
            .collect()
    }

    /// Reassembles into ε̂ the x planes of `grid` that the results now cover completely
    /// and that are not done yet (see the type's docs). Errors if `grid` is not the
    /// round's grid.
    pub(super) fn fold(&mut self, grid: &PatchGrid) -> Result<()> {
        let [nx, ny, nz] = grid.patches_per_axis();
        let slab = ny * nz;
        if self.slots.len() != grid.len() {
            return Err(Error::Shape(format!(
                "{} result slots for a grid of {} patches",
                self.slots.len(),
                grid.len()
            )));
        }
        let complete: Vec<bool> = (0..nx)
            .map(|jx| {
                self.slots[jx * slab..(jx + 1) * slab]
                    .iter()
                    .all(Option::is_some)
            })
            .collect();
        let mut want = grid.planes_covered_by(&complete);
        if self.planes_done.len() != want.len() {
            self.planes_done = vec![false; want.len()];
        }
        for (w, d) in want.iter_mut().zip(&self.planes_done) {
            *w &= !*d;
        }
        if !want.contains(&true) {
            return Ok(());
        }
        let n: usize = grid.padded_shape().iter().product();
        if self.assembled.len() != n {
            // Every voxel is written by its plane; the zeros only size a new buffer.
            self.assembled.clear();
            self.assembled.resize(n, 0.0);
        }
        let batches = &self.batches;
        let rows: Vec<&[f32]> = self
            .slots
            .iter()
            .map(|s| {
                s.and_then(|(b, row)| batches[b].index_axis(Axis(0), row).to_slice())
                    .unwrap_or(&[])
            })
            .collect();
        grid.assemble_planes_into(&rows, &want, &mut self.assembled)?;
        for (d, w) in self.planes_done.iter_mut().zip(&want) {
            *d |= *w;
        }
        Ok(())
    }

    /// ε̂ reassembled so far over the padded volume (C order) and, per x plane, whether
    /// it is final; both empty before the first fold of a round.
    pub(super) fn partial_assembly(&self) -> (&[f32], &[bool]) {
        (&self.assembled, &self.planes_done)
    }

    /// The finished ε̂ of an ε round over `grid`'s padded volume (folding what is left);
    /// errors if a result is missing. The store then starts its reassembly afresh.
    pub(super) fn take_assembled(&mut self, grid: &PatchGrid) -> Result<Array3<f32>> {
        self.fold(grid)?;
        if let Some(i) = self.planes_done.iter().position(|d| !d) {
            return Err(Error::Protocol(format!(
                "ε̂ plane {i} cannot be reassembled: a patch covering it has no result"
            )));
        }
        self.planes_done.clear();
        let values = std::mem::take(&mut self.assembled);
        Array3::from_shape_vec(grid.padded_shape(), values).map_err(|e| Error::Shape(e.to_string()))
    }

    /// Hands back a padded volume buffer no longer needed (the ε̂ of a finished step), to
    /// be reused by the next round's reassembly.
    pub(super) fn recycle(&mut self, buffer: Vec<f32>) {
        if self.assembled.is_empty() {
            self.assembled = buffer;
        }
    }
}
