//! Training patches: cubic P³ patches cut from χ maps on a regular grid (DM-QSM: 48³ with
//! a step of 30 voxels per dimension, patches with more than 80 % background dropped),
//! and the B0-respecting augmentation.
//!
//! Grid: along an axis of length N the patch origins are 0, s, 2s, … while origin + P ≤ N,
//! plus N − P when the last patch would otherwise miss the far edge. Axes shorter than P
//! are zero-padded (background) to P. Background voxels are those outside the mask (mask
//! value ≤ 0.5), or χ = 0 exactly when no mask is given (QSM maps are masked to 0).
//!
//! Augmentation (optional): each axis is flipped with probability ½, and the two axes
//! orthogonal to B0 are swapped with probability ½. The B0 axis never moves: χ maps are
//! orientation dependent (anisotropy, the dipole kernel's direction), and a mirror or a
//! swap of the in-plane axes leaves the dipole kernel D(k) = 1/3 − k_b²/|k|² unchanged.

use crate::error::{Result, WorkerError};
use ndarray::{Array3, ArrayView3};

/// Where a patch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchOrigin {
    /// Index of the volume in the set.
    pub volume: usize,
    /// Corner (voxel indices) of the patch in the padded volume.
    pub corner: [usize; 3],
}

/// One augmentation: flips per axis and whether the two axes ⟂ B0 are swapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Augmentation {
    /// Flip axis 0, 1, 2.
    pub flip: [bool; 3],
    /// Swap the two axes orthogonal to the B0 axis.
    pub swap: bool,
}

impl Augmentation {
    /// From 4 random bits (bit i flips axis i, bit 3 swaps).
    pub fn from_bits(bits: u64) -> Self {
        Self {
            flip: [bits & 1 != 0, bits & 2 != 0, bits & 4 != 0],
            swap: bits & 8 != 0,
        }
    }
}

/// χ maps cut into training patches (see the module docs).
#[derive(Debug, Clone)]
pub struct PatchSet {
    volumes: Vec<Array3<f32>>,
    origins: Vec<PatchOrigin>,
    patch_size: usize,
    candidates: usize,
}

/// Patch origins along one axis of length `n` (≥ p).
fn axis_origins(n: usize, p: usize, stride: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..)
        .map(|i| i * stride)
        .take_while(|o| o + p <= n)
        .collect();
    if v.last().is_none_or(|&o| o + p < n) {
        v.push(n - p);
    }
    v
}

fn pad_to(a: ArrayView3<'_, f32>, p: usize) -> Array3<f32> {
    let s = a.shape();
    let shape = [s[0].max(p), s[1].max(p), s[2].max(p)];
    if shape == [s[0], s[1], s[2]] {
        return a.to_owned();
    }
    let mut out = Array3::<f32>::zeros(shape);
    out.slice_mut(ndarray::s![..s[0], ..s[1], ..s[2]])
        .assign(&a);
    out
}

impl PatchSet {
    /// Cuts `volumes` (χ in ppm, each with an optional mask) into `patch_size`³ patches at
    /// `stride`, keeping those with a background fraction ≤ `max_background`.
    pub fn new(
        volumes: Vec<(Array3<f32>, Option<Array3<f32>>)>,
        patch_size: usize,
        stride: usize,
        max_background: f64,
    ) -> Result<Self> {
        if patch_size == 0 || stride == 0 {
            return Err(WorkerError::Config(format!(
                "patch size {patch_size} and stride {stride} must be positive"
            )));
        }
        let p = patch_size;
        let mut kept = Vec::new();
        let mut origins = Vec::new();
        let mut candidates = 0;
        for (chi, mask) in volumes {
            if let Some(m) = &mask
                && m.shape() != chi.shape()
            {
                return Err(WorkerError::Config(format!(
                    "mask shape {:?} differs from χ shape {:?}",
                    m.shape(),
                    chi.shape()
                )));
            }
            if let Some(bad) = chi.iter().position(|v| !v.is_finite()) {
                return Err(WorkerError::Config(format!(
                    "χ map {} has a non-finite value at linear index {bad}",
                    kept.len()
                )));
            }
            let chi = pad_to(chi.view(), p);
            let fg: Array3<f32> = match mask {
                Some(m) => pad_to(m.view(), p).mapv(|v| if v > 0.5 { 1.0 } else { 0.0 }),
                None => chi.mapv(|v| if v != 0.0 { 1.0 } else { 0.0 }),
            };
            let s = chi.shape().to_vec();
            let index = kept.len();
            for &i in &axis_origins(s[0], p, stride) {
                for &j in &axis_origins(s[1], p, stride) {
                    for &k in &axis_origins(s[2], p, stride) {
                        candidates += 1;
                        let fg_count: f64 = fg
                            .slice(ndarray::s![i..i + p, j..j + p, k..k + p])
                            .iter()
                            .map(|&v| f64::from(v))
                            .sum();
                        let background = 1.0 - fg_count / (p * p * p) as f64;
                        if background <= max_background {
                            origins.push(PatchOrigin {
                                volume: index,
                                corner: [i, j, k],
                            });
                        }
                    }
                }
            }
            // Outside the mask the map is background: zero it so patches see masked maps.
            kept.push(chi * &fg);
        }
        Ok(Self {
            volumes: kept,
            origins,
            patch_size,
            candidates,
        })
    }

    /// Number of kept patches.
    pub fn len(&self) -> usize {
        self.origins.len()
    }

    /// True when no patch was kept.
    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// Number of grid positions before the background filter.
    pub fn candidates(&self) -> usize {
        self.candidates
    }

    /// The kept patch origins.
    pub fn origins(&self) -> &[PatchOrigin] {
        &self.origins
    }

    /// Writes patch `index`, augmented and multiplied by `scale` (χ_ppm → model units),
    /// into `out` (P³ values, C order). `b0_axis` is the voxel axis along B0.
    pub fn write_patch(
        &self,
        index: usize,
        aug: Augmentation,
        b0_axis: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let p = self.patch_size;
        let o = self.origins[index];
        let vol = &self.volumes[o.volume];
        let [ci, cj, ck] = o.corner;
        // The two axes orthogonal to B0, in increasing order.
        let (a, b) = match b0_axis {
            0 => (1, 2),
            1 => (0, 2),
            _ => (0, 1),
        };
        for i in 0..p {
            for j in 0..p {
                for k in 0..p {
                    // Output voxel (i, j, k) reads the source at permuted, flipped indices.
                    let mut src = [i, j, k];
                    if aug.swap {
                        src.swap(a, b);
                    }
                    for (axis, s) in src.iter_mut().enumerate() {
                        if aug.flip[axis] {
                            *s = p - 1 - *s;
                        }
                    }
                    out[(i * p + j) * p + k] = vol[[ci + src[0], cj + src[1], ck + src[2]]] * scale;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_the_far_edge() {
        assert_eq!(axis_origins(48, 48, 30), vec![0]);
        assert_eq!(axis_origins(100, 48, 30), vec![0, 30, 52]);
        assert_eq!(axis_origins(108, 48, 30), vec![0, 30, 60]);
        assert_eq!(axis_origins(109, 48, 30), vec![0, 30, 60, 61]);
    }

    #[test]
    fn background_filter_and_masking() {
        // 8³ volume, P = 4, stride 4: 8 candidate patches; χ is non-zero only in the
        // corner octant [0,4)³, so with no mask only that patch is ≤ 80 % background.
        let mut chi = Array3::<f32>::zeros((8, 8, 8));
        chi.slice_mut(ndarray::s![0..4, 0..4, 0..4]).fill(0.1);
        let set = PatchSet::new(vec![(chi.clone(), None)], 4, 4, 0.8).unwrap();
        assert_eq!((set.len(), set.candidates()), (1, 8));
        // A mask covering half the volume keeps the 4 patches inside it and zeroes χ
        // outside the mask.
        let mut mask = Array3::<f32>::zeros((8, 8, 8));
        mask.slice_mut(ndarray::s![0..4, .., ..]).fill(1.0);
        chi.fill(0.2);
        let set = PatchSet::new(vec![(chi, Some(mask))], 4, 4, 0.8).unwrap();
        assert_eq!(set.len(), 4);
        assert!(set.origins().iter().all(|o| o.corner[0] == 0));
    }

    #[test]
    fn augmentation_keeps_the_b0_axis() {
        // χ = 100 i + 10 j + k; B0 along axis 2: swapping exchanges i and j only.
        let chi = Array3::from_shape_fn((4, 4, 4), |(i, j, k)| (100 * i + 10 * j + k) as f32 + 1.0);
        let set = PatchSet::new(vec![(chi, None)], 4, 4, 0.8).unwrap();
        let mut out = vec![0f32; 64];
        let aug = Augmentation {
            flip: [false, false, true],
            swap: true,
        };
        set.write_patch(0, aug, 2, 1.0, &mut out);
        // Output (i, j, k) = source (j, i, 3 − k).
        assert_eq!(out[(4 + 2) * 4], (200 + 10 + 3) as f32 + 1.0);
        set.write_patch(0, Augmentation::default(), 2, 2.0, &mut out);
        assert_eq!(out[(4 + 2) * 4 + 3], 2.0 * (100 + 20 + 3 + 1) as f32);
    }
}
