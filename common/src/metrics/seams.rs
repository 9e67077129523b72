//! Patch-seam measures of a reconstruction assembled from a [`PatchGrid`]: where the
//! patch boundaries lie ([`boundary_planes`]), how much stronger the voxel-to-voxel
//! differences across them are than elsewhere ([`seam_ratio`]), and a gradient magnitude
//! map in which seams show as lines ([`gradient_magnitude`]).
//!
//! Conventions: volumes are indexed `[x, y, z]` in voxels; plane p of an axis lies
//! between voxels p − 1 and p; differences are in the volume's units (ppm for χ).

use crate::error::{Error, Result};
use crate::patch::PatchGrid;
use ndarray::Array3;

/// Patch-boundary planes of `grid` along each axis, in volume coordinates: plane p lies
/// between voxels p − 1 and p (1 ≤ p < N), where a patch starts or ends. Sorted, without
/// duplicates; padding planes outside the volume are dropped. The grid's per-step offset
/// is ignored (the unshifted grid).
pub fn boundary_planes(grid: &PatchGrid) -> [Vec<usize>; 3] {
    let shape = grid.volume_shape();
    let pad = grid.pad_before();
    let per_axis = grid.patches_per_axis();
    let (p, stride) = (grid.patch_size(), grid.stride());
    std::array::from_fn(|a| {
        let mut planes: Vec<usize> = Vec::new();
        for j in 0..per_axis[a] {
            let start = j * stride;
            for edge in [start, start + p] {
                // Padded → volume coordinates; keep the planes inside the volume.
                if edge > pad[a] && edge - pad[a] < shape[a] && !planes.contains(&(edge - pad[a])) {
                    planes.push(edge - pad[a]);
                }
            }
        }
        planes.sort_unstable();
        planes
    })
}

/// Seam number: the mean squared forward difference `(x[p] − x[p−1])²` across the planes
/// in `planes` (per axis), divided by the mean across all other planes, both over voxel
/// pairs inside `mask` (accumulated in f64). 1 when boundaries look like the interior;
/// `Ok(None)` when either set is empty or the interior has no gradient energy. Planes
/// outside the volume are ignored.
///
/// Errors with [`Error::Shape`] if `mask` and `x` differ in shape.
pub fn seam_ratio(
    x: &Array3<f32>,
    mask: &Array3<bool>,
    planes: &[Vec<usize>; 3],
) -> Result<Option<f64>> {
    if x.shape() != mask.shape() {
        return Err(Error::Shape(format!(
            "seam ratio: volume {:?} and mask {:?} differ in shape",
            x.shape(),
            mask.shape()
        )));
    }
    let s = x.shape();
    let (mut eb, mut nb, mut ei, mut ni) = (0.0f64, 0usize, 0.0f64, 0usize);
    for (a, axis_planes) in planes.iter().enumerate() {
        let mut is_boundary = vec![false; s[a]];
        for &p in axis_planes {
            if p < s[a] {
                is_boundary[p] = true;
            }
        }
        for ((i, j, k), &v) in x.indexed_iter() {
            let idx = [i, j, k];
            if idx[a] == 0 {
                continue;
            }
            let mut prev = idx;
            prev[a] -= 1;
            if !(mask[idx] && mask[prev]) {
                continue;
            }
            let d = f64::from(v - x[prev]);
            if is_boundary[idx[a]] {
                eb += d * d;
                nb += 1;
            } else {
                ei += d * d;
                ni += 1;
            }
        }
    }
    if nb == 0 || ni == 0 || ei == 0.0 {
        return Ok(None);
    }
    Ok(Some((eb / nb as f64) / (ei / ni as f64)))
}

/// Gradient magnitude |∇x| (units of `x` per voxel, e.g. ppm/voxel) by central
/// differences, one-sided at the edges (a single-voxel axis contributes 0), in f32.
/// Seams of a patch-wise reconstruction show as lines in it.
pub fn gradient_magnitude(x: &Array3<f32>) -> Array3<f32> {
    let s = x.shape().to_vec();
    Array3::from_shape_fn((s[0], s[1], s[2]), |(i, j, k)| {
        let idx = [i, j, k];
        let mut g2 = 0.0f32;
        for a in 0..3 {
            let (mut lo, mut hi) = (idx, idx);
            if idx[a] > 0 {
                lo[a] -= 1;
            }
            if idx[a] + 1 < s[a] {
                hi[a] += 1;
            }
            let span = (hi[a] - lo[a]).max(1) as f32;
            let d = (x[hi] - x[lo]) / span;
            g2 += d * d;
        }
        g2.sqrt()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patch::GridSpacing;

    #[test]
    fn seam_ratio_is_one_for_a_ramp_and_large_for_steps_on_boundaries() {
        let shape = (24, 24, 24);
        let mask = Array3::from_elem(shape, true);
        let planes: [Vec<usize>; 3] = [vec![8, 16], vec![8, 16], vec![8, 16]];
        // A linear ramp has the same difference across every plane: ratio 1. Tolerance
        // 1e-6: the ramp is stored in f32 (values ≤ 1.4, ulp ≈ 1e-7), so single
        // differences of 0.01–0.03 carry ~1e-5 relative round-off that averages down.
        let ramp = Array3::from_shape_fn(shape, |(i, j, k)| 0.01 * (i + 2 * j + 3 * k) as f32);
        let r = seam_ratio(&ramp, &mask, &planes).unwrap().unwrap();
        assert!((r - 1.0).abs() < 1e-6, "{r}");
        // Ramp along x plus a jump of 0.1 across x-planes 8 and 16: boundary pairs along x
        // have d = 0.01 + 0.1, interior ones 0.01; y and z differences are 0 (counted).
        let stepped =
            Array3::from_shape_fn(shape, |(i, _, _)| 0.01 * i as f32 + 0.1 * (i / 8) as f32);
        let r = seam_ratio(&stepped, &mask, &planes).unwrap().unwrap();
        // Boundary: x-pairs 2·24² with 0.11², y/z pairs 2·2·24² with 0. Interior: x-pairs
        // 21·24² with 0.01², y/z pairs 2·21·24² with 0.
        let want = (2.0 * 0.11f64.powi(2) / 6.0) / (21.0 * 0.01f64.powi(2) / 63.0);
        assert!((r - want).abs() / want < 1e-4, "{r} vs {want}");
        // No interior gradient energy → None.
        assert!(
            seam_ratio(&Array3::zeros(shape), &mask, &planes)
                .unwrap()
                .is_none()
        );
        // A mask of another shape is an error, not a panic.
        let small = Array3::from_elem((24, 24, 23), true);
        assert!(matches!(
            seam_ratio(&ramp, &small, &planes),
            Err(Error::Shape(_))
        ));
    }

    #[test]
    fn boundary_planes_follow_the_patch_grid() {
        // 96 voxels, P = 48, overlap 0: stride 48, patches at 0 and 48, no padding → the
        // only interior boundary is plane 48.
        let g = PatchGrid::new([96, 96, 96], 48, GridSpacing::Overlap(0)).unwrap();
        assert_eq!(boundary_planes(&g)[0], vec![48]);
        // Overlap 8 (stride 40): padded length 48 + 2·40 = 128 (3 patches), 16 voxels of
        // padding before → starts at 0, 40, 80 and ends at 48, 88, 128 in padded
        // coordinates; minus 16 → 24, 32, 64, 72 inside (0 < p < 96).
        let g = PatchGrid::new([96, 96, 96], 48, GridSpacing::Overlap(8)).unwrap();
        let pad = g.pad_before()[0];
        let planes = boundary_planes(&g)[0].clone();
        let mut want: Vec<usize> = [0usize, 40, 80, 48, 88, 128]
            .iter()
            .filter(|&&e| e > pad && e - pad < 96)
            .map(|&e| e - pad)
            .collect();
        want.sort_unstable();
        assert_eq!(planes, want);
    }

    #[test]
    fn gradient_magnitude_of_a_ramp_is_its_slope() {
        // x = 0.02·i + 0.01·k: central and one-sided differences are exact for a linear
        // function, so |∇x| = sqrt(0.02² + 0.01²) everywhere (f32 round-off); an axis of
        // length 1 contributes 0.
        let x = Array3::from_shape_fn((6, 1, 5), |(i, _, k)| 0.02 * i as f32 + 0.01 * k as f32);
        let g = gradient_magnitude(&x);
        assert_eq!(g.shape(), x.shape());
        let want = (0.02f32.powi(2) + 0.01f32.powi(2)).sqrt();
        assert!(g.iter().all(|&v| (v - want).abs() < 1e-6), "{g:?}");
    }
}
