//! What goes to a model and what comes back: [`PatchWork`] and [`PatchBatch`] (the model
//! input of a round), [`PatchResults`] (a batch of results, checked once where it
//! arrives) and the sampler's store of a round's results, which keeps the batches as they
//! came instead of copying their rows.

use super::{RoundId, RoundKind};
use crate::error::{Error, Result};
use ndarray::{Array3, Array4, ArrayView3, Axis};

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
        for (row, &index) in indices.iter().enumerate() {
            if values
                .index_axis(Axis(0), row)
                .iter()
                .any(|x| !x.is_finite())
            {
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
#[derive(Debug, Clone, Default)]
pub(super) struct RoundResults {
    batches: Vec<Array4<f32>>,
    /// `(batch, row)` of each patch's result.
    slots: Vec<Option<(usize, usize)>>,
    received: usize,
}

impl RoundResults {
    /// An empty store for `n` patches.
    pub(super) fn new(n: usize) -> Self {
        Self {
            batches: Vec::new(),
            slots: vec![None; n],
            received: 0,
        }
    }

    /// Empties the store for a round of `n` patches.
    pub(super) fn clear(&mut self, n: usize) {
        *self = Self::new(n);
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
            self.batches.push(results.values);
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
}
