//! Veins (tubes along smooth random curves) and lesions (blobs) painted into the label map.
//!
//! Curves and radii are generated in the anatomy frame (mm) and rasterised on the voxel
//! grid by sweeping spheres along a Catmull–Rom spline through the control points. Along
//! each axis the painted radius is never below [`VEIN_MIN_RADIUS_VOXELS`] × that axis'
//! voxel size (the footprint becomes an axis-aligned ellipsoid), so a vein stays a
//! connected tube at coarse or anisotropic resolution instead of breaking into dots, while
//! staying thin along the finely sampled axes.

use super::Label;
use super::anatomy::{Anatomy, Frame, v3};
use super::random::Rng;
use ndarray::Array3;
use std::collections::HashMap;

/// Smallest painted vein radius along an axis, in voxels of that axis.
pub(crate) const VEIN_MIN_RADIUS_VOXELS: f64 = 0.75;
/// Smallest painted lesion radius along an axis, in voxels of that axis (an ellipsoid
/// with semi-axes ≥ 0.9 voxel (> sqrt(3)/2) always contains a voxel centre).
pub(crate) const LESION_MIN_RADIUS_VOXELS: f64 = 0.9;

/// Per-axis painted radii (mm) for a physical radius `r` and a minimum in voxels.
fn radii(frame: &Frame, r: f64, min_voxels: f64) -> [f64; 3] {
    frame.voxel.map(|v| r.max(min_voxels * v))
}

/// A vessel: control points (anatomy mm) and radii (anatomy mm) at those points.
#[derive(Debug, Clone)]
pub(crate) struct Tube {
    pub points: Vec<[f64; 3]>,
    pub radii: Vec<f64>,
}

/// A lesion: a union of spheres (anatomy mm) with one label and one χ (ppm).
#[derive(Debug, Clone)]
pub(crate) struct Blob {
    pub spheres: Vec<([f64; 3], f64)>,
    pub label: Label,
    pub chi: f64,
}

/// The major dural sinuses and deep veins (nominal paths, jittered per seed).
fn major_veins(rng: &mut Rng, anat: &Anatomy) -> Vec<Tube> {
    let mut tubes = Vec::new();
    // Superior sagittal sinus: the midline arc 2.5 mm under the cerebral surface, from
    // the frontal pole over the vertex to the occipital confluence; widening backwards.
    let c = anat.cerebrum;
    let mut pts = Vec::new();
    let mut radii = Vec::new();
    let n = 16;
    for s in 0..n {
        let theta = 0.35 + 3.1 * s as f64 / (n - 1) as f64;
        let u = [0.0, theta.cos(), theta.sin()];
        let r = c.ray_radius(u) - 2.5;
        let mut p = v3::add(c.c, v3::scale(u, r));
        p[0] = anat.midline_x;
        pts.push(p);
        radii.push(1.6 + 2.2 * s as f64 / (n - 1) as f64);
    }
    tubes.push(Tube { points: pts, radii });
    let m = anat.midline_x;
    let fixed: Vec<(Vec<[f64; 3]>, f64, bool)> = vec![
        // Straight sinus: vein of Galen to the confluence.
        (
            vec![
                [m, -38.0, 14.0],
                [m, -60.0, 8.0],
                [m, -80.0, 0.0],
                [m, -97.0, -8.0],
            ],
            2.2,
            false,
        ),
        // Internal cerebral vein.
        (
            vec![
                [-2.0, 2.0, 18.0],
                [-2.5, -18.0, 17.0],
                [-1.0, -34.0, 14.0],
                [m, -38.0, 14.0],
            ],
            1.2,
            true,
        ),
        // Transverse sinus.
        (
            vec![
                [m, -97.0, -8.0],
                [-30.0, -92.0, -16.0],
                [-52.0, -70.0, -22.0],
                [-58.0, -45.0, -28.0],
            ],
            2.8,
            true,
        ),
        // Thalamostriate vein.
        (
            vec![[-16.0, -14.0, 20.0], [-10.0, -6.0, 19.0], [-4.0, 2.0, 18.0]],
            0.8,
            true,
        ),
        // Basal vein of Rosenthal.
        (
            vec![
                [-18.0, 0.0, -10.0],
                [-20.0, -22.0, -6.0],
                [-10.0, -36.0, 8.0],
                [m, -38.0, 14.0],
            ],
            1.0,
            true,
        ),
    ];
    for (path, r, bilateral) in fixed {
        let sides: &[f64] = if bilateral { &[1.0, -1.0] } else { &[1.0] };
        for &side in sides {
            let f = rng.range(0.85, 1.15);
            let points: Vec<[f64; 3]> = path
                .iter()
                .map(|p| {
                    let x = if bilateral {
                        side * p[0] + m * (1.0 - side)
                    } else {
                        p[0]
                    };
                    [
                        x + 0.8 * rng.normal().clamp(-2.0, 2.0),
                        p[1] + 0.8 * rng.normal().clamp(-2.0, 2.0),
                        p[2] + 0.8 * rng.normal().clamp(-2.0, 2.0),
                    ]
                })
                .collect();
            let radii = vec![r * f; points.len()];
            tubes.push(Tube { points, radii });
        }
    }
    tubes
}

/// A cortical vein: a random walk 1–3 mm under the cerebral surface, drifting towards the
/// vertex (where the superior sagittal sinus drains it), widening downstream.
fn cortical_vein(rng: &mut Rng, anat: &Anatomy) -> Tube {
    let c = anat.cerebrum;
    let mut u = rng.unit_vector();
    if u[2] < -0.3 {
        u[2] = -u[2];
    }
    let depth = rng.range(1.0, 3.0);
    let at = |u: [f64; 3]| v3::add(c.c, v3::scale(u, c.ray_radius(u) - depth));
    let v = rng.unit_vector();
    let mut t = v3::normalize(v3::sub(v, v3::scale(u, v3::dot(v, u))));
    let length = rng.range(30.0, 100.0);
    let step = 4.0;
    let steps = (length / step).ceil() as usize;
    let r0 = rng.range(0.5, 1.3);
    let mut points = vec![at(u)];
    let mut radii = vec![r0];
    for s in 1..=steps {
        let b = v3::cross(u, t);
        let up = [0.0, 0.0, 1.0];
        let up_t = v3::sub(up, v3::scale(u, v3::dot(up, u)));
        t = v3::normalize(v3::add(
            v3::add(t, v3::scale(b, 0.35 * rng.normal())),
            v3::scale(v3::normalize(up_t), 0.15),
        ));
        u = v3::normalize(v3::add(u, v3::scale(t, step / c.ray_radius(u).max(1.0))));
        t = v3::normalize(v3::sub(t, v3::scale(u, v3::dot(t, u))));
        points.push(at(u));
        radii.push(r0 * (1.0 + 0.6 * s as f64 / steps as f64));
    }
    Tube { points, radii }
}

/// A medullary vein: from near a lateral-ventricle wall out to just under the cortex.
fn medullary_vein(rng: &mut Rng, anat: &Anatomy) -> Tube {
    let c = anat.cerebrum;
    let side = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
    let start = [
        anat.midline_x + side * rng.range(8.0, 16.0),
        rng.range(-30.0, 15.0),
        rng.range(14.0, 24.0),
    ];
    let dir = v3::normalize([
        side * rng.range(0.3, 1.0),
        rng.range(-0.5, 0.5),
        rng.range(0.2, 1.0),
    ]);
    // Bisection for the distance along `dir` where ρ = 0.96 (a few mm under the surface).
    let (mut lo, mut hi) = (0.0, 200.0);
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if c.rho(v3::add(start, v3::scale(dir, mid))) < 0.96 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let end = v3::add(start, v3::scale(dir, lo));
    let mid = v3::add(
        v3::scale(v3::add(start, end), 0.5),
        [
            3.0 * rng.normal().clamp(-2.0, 2.0),
            3.0 * rng.normal().clamp(-2.0, 2.0),
            3.0 * rng.normal().clamp(-2.0, 2.0),
        ],
    );
    let r = rng.range(0.35, 0.7);
    Tube {
        points: vec![start, mid, end],
        radii: vec![r, r, r * 1.2],
    }
}

/// All veins of a phantom: the major sinuses (if `sinuses`) then `count` random veins,
/// two thirds cortical and one third medullary.
pub(crate) fn veins(rng: &mut Rng, anat: &Anatomy, sinuses: bool, count: usize) -> Vec<Tube> {
    let mut tubes = if sinuses {
        major_veins(rng, anat)
    } else {
        Vec::new()
    };
    for v in 0..count {
        if v % 3 == 2 {
            tubes.push(medullary_vein(rng, anat));
        } else {
            tubes.push(cortical_vein(rng, anat));
        }
    }
    tubes
}

/// A point uniformly distributed in the cerebrum shrunk to normalised radius `rho_max`.
fn point_in_cerebrum(rng: &mut Rng, anat: &Anatomy, rho_max: f64) -> [f64; 3] {
    let c = anat.cerebrum;
    loop {
        let q = [
            rng.range(-1.0, 1.0),
            rng.range(-1.0, 1.0),
            rng.range(-1.0, 1.0),
        ];
        if v3::dot(q, q) <= 1.0 {
            return [0, 1, 2].map(|a| c.c[a] + rho_max * c.a[a] * q[a]);
        }
    }
}

/// A lumpy blob: a union of 1 + `extra` spheres around a random point.
fn blob(rng: &mut Rng, centre: [f64; 3], radius: f64, extra: usize) -> Vec<([f64; 3], f64)> {
    let mut s = vec![(centre, radius)];
    for _ in 0..extra {
        let off = v3::scale(rng.unit_vector(), radius * rng.range(0.3, 0.8));
        s.push((v3::add(centre, off), radius * rng.range(0.5, 0.9)));
    }
    s
}

/// Calcifications (χ −0.125 … −0.375 ppm, radius 1–3 mm) and haemorrhages (χ +0.3 …
/// +0.8 ppm, radius 4–10 mm), at random positions inside the cerebrum.
pub(crate) fn lesions(
    rng: &mut Rng,
    anat: &Anatomy,
    calcifications: usize,
    haemorrhages: usize,
) -> Vec<Blob> {
    let mut out = Vec::new();
    for _ in 0..haemorrhages {
        let p = point_in_cerebrum(rng, anat, 0.6);
        let r = rng.range(4.0, 10.0);
        let extra = rng.int(1, 3);
        let spheres = blob(rng, p, r, extra);
        let chi = Label::Haemorrhage.reference_chi_ppm() * rng.range(0.6, 1.6);
        out.push(Blob {
            spheres,
            label: Label::Haemorrhage,
            chi,
        });
    }
    for _ in 0..calcifications {
        let p = point_in_cerebrum(rng, anat, 0.75);
        let r = rng.range(1.0, 3.0);
        let extra = rng.int(0, 2);
        let spheres = blob(rng, p, r, extra);
        let chi = Label::Calcification.reference_chi_ppm() * rng.range(0.5, 1.5);
        out.push(Blob {
            spheres,
            label: Label::Calcification,
            chi,
        });
    }
    out
}

/// Calls `f(flat_index)` for every brain voxel whose centre lies inside the axis-aligned
/// ellipsoid with physical semi-axes `radius_mm` around the anatomy point `p`.
fn for_ellipsoid(
    labels: &Array3<u8>,
    frame: &Frame,
    p: [f64; 3],
    radius_mm: [f64; 3],
    mut f: impl FnMut(usize),
) {
    let ci = frame.index_of(p);
    let mut lo = [0usize; 3];
    let mut hi = [0usize; 3];
    for a in 0..3 {
        let ext = radius_mm[a] / frame.voxel[a];
        let l = (ci[a] - ext).ceil();
        let h = (ci[a] + ext).floor();
        if h < 0.0 || l > frame.shape[a] as f64 - 1.0 || l > h {
            return;
        }
        lo[a] = l.max(0.0) as usize;
        hi[a] = h.min(frame.shape[a] as f64 - 1.0) as usize;
    }
    let [_, ny, nz] = frame.shape;
    for i in lo[0]..=hi[0] {
        let dx = (i as f64 - ci[0]) * frame.voxel[0] / radius_mm[0];
        for j in lo[1]..=hi[1] {
            let dy = (j as f64 - ci[1]) * frame.voxel[1] / radius_mm[1];
            for k in lo[2]..=hi[2] {
                let dz = (k as f64 - ci[2]) * frame.voxel[2] / radius_mm[2];
                if dx * dx + dy * dy + dz * dz <= 1.0 {
                    let is_brain = Label::from_u8(labels[[i, j, k]]).is_some_and(Label::is_brain);
                    if is_brain {
                        f((i * ny + j) * nz + k);
                    }
                }
            }
        }
    }
}

/// Catmull–Rom point on the segment from `p[1]` to `p[2]` at `t` ∈ [0, 1].
fn catmull_rom(p: [[f64; 3]; 4], t: f64) -> [f64; 3] {
    let t2 = t * t;
    let t3 = t2 * t;
    [0, 1, 2].map(|a| {
        0.5 * (2.0 * p[1][a]
            + (-p[0][a] + p[2][a]) * t
            + (2.0 * p[0][a] - 5.0 * p[1][a] + 4.0 * p[2][a] - p[3][a]) * t2
            + (-p[0][a] + 3.0 * p[1][a] - 3.0 * p[2][a] + p[3][a]) * t3)
    })
}

/// Paints `tube` as [`Label::Vein`] over brain voxels.
pub(crate) fn paint_tube(labels: &mut Array3<u8>, frame: &Frame, tube: &Tube) {
    let n = tube.points.len();
    if n == 0 {
        return;
    }
    let vmin = frame.voxel.iter().cloned().fold(f64::INFINITY, f64::min);
    let mut hits = Vec::new();
    for seg in 0..n.saturating_sub(1).max(1) {
        let idx = |o: isize| -> [f64; 3] {
            let q = (seg as isize + o).clamp(0, n as isize - 1) as usize;
            tube.points[q]
        };
        let ctrl = [idx(-1), idx(0), idx(1), idx(2)];
        let r0 = tube.radii[seg.min(n - 1)];
        let r1 = tube.radii[(seg + 1).min(n - 1)];
        let len_phys = v3::norm(v3::sub(ctrl[2], ctrl[1])) * frame.scale;
        let rphys = (r0.min(r1) * frame.scale).max(VEIN_MIN_RADIUS_VOXELS * vmin);
        let step = 0.5 * rphys.min(vmin);
        let m = ((len_phys / step).ceil() as usize).max(1);
        for s in 0..=m {
            let t = s as f64 / m as f64;
            let p = catmull_rom(ctrl, t);
            let r = radii(
                frame,
                (r0 + (r1 - r0) * t) * frame.scale,
                VEIN_MIN_RADIUS_VOXELS,
            );
            for_ellipsoid(labels, frame, p, r, |f| hits.push(f));
        }
    }
    if let Some(s) = labels.as_slice_mut() {
        for f in hits {
            s[f] = Label::Vein as u8;
        }
    }
}

/// Paints `blob` over brain voxels and records its χ (ppm) per voxel in `values`.
pub(crate) fn paint_blob(
    labels: &mut Array3<u8>,
    frame: &Frame,
    blob: &Blob,
    values: &mut HashMap<usize, f64>,
) {
    let mut hits = Vec::new();
    for &(p, r) in &blob.spheres {
        let r = radii(frame, r * frame.scale, LESION_MIN_RADIUS_VOXELS);
        for_ellipsoid(labels, frame, p, r, |f| hits.push(f));
    }
    if let Some(s) = labels.as_slice_mut() {
        for f in hits {
            s[f] = blob.label as u8;
            values.insert(f, blob.chi);
        }
    }
}
