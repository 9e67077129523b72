//! The phantom's anatomy: seeded compartments, nuclei and cortex in the anatomy frame.
//!
//! Anatomy frame: x → subject right, y → anterior, z → superior (RAS), millimetres, origin
//! near the anterior commissure (roughly MNI space). Positions of the deep grey-matter
//! nuclei follow typical MNI coordinates; sizes are typical adult values. Every shape is
//! jittered per seed (centres by ~1–2 mm, sizes by a few %) and its surface perturbed by a
//! smooth random field, so two seeds give two plausible but different brains.
//!
//! Cortex model. Each voxel gets a "pial distance": the smallest distance (mm) to a CSF
//! surface among the outer brain surface, the sulci, the interhemispheric and Sylvian
//! fissures, the insula and the tentorial/brain-stem surfaces. Sulci are the zero lines of
//! a random folding field f on the cerebral surface (wavelengths 16–40 mm), extended
//! radially inwards to ~11 mm, so they are clefts perpendicular to the surface; the
//! distance to a cleft is estimated to first order as |f| / |∇ₜf| (∇ₜ the gradient along
//! the surface, floored at a third of its RMS value so flat spots do not blow up).
//! Pial distance < 0.7 mm is CSF, then a ~2.7 mm grey-matter ribbon, then white matter.
//! The cerebellum uses the same idea with a finer 3D field for its folia.

use super::Label;
use super::noise::{GridNoise, SmoothNoise};
use super::random::{Rng, Stream};
use rayon::prelude::*;

/// 3-vector helpers (mm).
pub(crate) mod v3 {
    /// a + b
    pub(crate) fn add(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
        [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
    }
    /// a − b
    pub(crate) fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
        [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
    }
    /// s·a
    pub(crate) fn scale(a: [f64; 3], s: f64) -> [f64; 3] {
        [a[0] * s, a[1] * s, a[2] * s]
    }
    /// a·b
    pub(crate) fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
        a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
    }
    /// a × b
    pub(crate) fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
        [
            a[1] * b[2] - a[2] * b[1],
            a[2] * b[0] - a[0] * b[2],
            a[0] * b[1] - a[1] * b[0],
        ]
    }
    /// |a|
    pub(crate) fn norm(a: [f64; 3]) -> f64 {
        dot(a, a).sqrt()
    }
    /// a / |a| (a itself when |a| = 0).
    pub(crate) fn normalize(a: [f64; 3]) -> [f64; 3] {
        let n = norm(a);
        if n > 0.0 { scale(a, 1.0 / n) } else { a }
    }
}

/// An ellipsoid with semi-axes `a` (mm) rotated by `yaw` (rad) about the z axis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Ellipsoid {
    /// Centre (mm, anatomy frame).
    pub c: [f64; 3],
    /// Semi-axes (mm) along the rotated x, y and z.
    pub a: [f64; 3],
    /// Rotation about z (rad): world = R_z(yaw) · local.
    pub yaw: f64,
}

impl Ellipsoid {
    const fn new(c: [f64; 3], a: [f64; 3], yaw: f64) -> Self {
        Self { c, a, yaw }
    }

    /// The point in normalised local coordinates (the unit ball is the ellipsoid).
    fn local(&self, p: [f64; 3]) -> [f64; 3] {
        let d = v3::sub(p, self.c);
        let (s, c) = self.yaw.sin_cos();
        [
            (c * d[0] + s * d[1]) / self.a[0],
            (-s * d[0] + c * d[1]) / self.a[1],
            d[2] / self.a[2],
        ]
    }

    /// Normalised radius ρ (< 1 inside).
    pub(crate) fn rho(&self, p: [f64; 3]) -> f64 {
        v3::norm(self.local(p))
    }

    /// First-order signed distance (mm, positive inside) to the surface ρ + `perturb` = 1.
    pub(crate) fn depth(&self, p: [f64; 3], perturb: f64) -> f64 {
        let q = self.local(p);
        let rho = v3::norm(q);
        if rho < 1e-9 {
            return self.a.iter().cloned().fold(f64::INFINITY, f64::min);
        }
        // ∇ρ = Rᵀ diag(1/a) q / ρ; the rotation keeps its norm.
        let g = v3::norm([q[0] / self.a[0], q[1] / self.a[1], q[2] / self.a[2]]) / rho;
        (1.0 - rho - perturb) / g
    }

    /// Distance from the centre to the surface along unit direction `u` (mm).
    pub(crate) fn ray_radius(&self, u: [f64; 3]) -> f64 {
        let r = self.rho(v3::add(self.c, u));
        if r > 0.0 { 1.0 / r } else { 0.0 }
    }

    /// This ellipsoid with its centre moved by N(0, `pos_sd`²) per axis (clipped at 2 sd)
    /// and its semi-axes scaled by U(1 − `size_frac`, 1 + `size_frac`).
    fn jittered(&self, rng: &mut Rng, pos_sd: f64, size_frac: f64) -> Self {
        let mut e = *self;
        for a in 0..3 {
            e.c[a] += pos_sd * rng.normal().clamp(-2.0, 2.0);
        }
        for a in 0..3 {
            e.a[a] *= rng.range(1.0 - size_frac, 1.0 + size_frac);
        }
        e
    }

    /// The mirror image across the mid-sagittal plane x = 0.
    fn mirrored(&self) -> Self {
        Self::new([-self.c[0], self.c[1], self.c[2]], self.a, -self.yaw)
    }

    /// Axis-aligned bounding box (min, max), mm.
    fn bounds(&self) -> ([f64; 3], [f64; 3]) {
        let r = self.a.iter().cloned().fold(0.0, f64::max);
        (
            [self.c[0] - r, self.c[1] - r, self.c[2] - self.a[2]],
            [self.c[0] + r, self.c[1] + r, self.c[2] + self.a[2]],
        )
    }
}

/// Nominal head (scalp outline): ~180 × 220 × 194 mm.
const HEAD: Ellipsoid = Ellipsoid::new([0.0, -15.0, -5.0], [90.0, 110.0, 97.0], 0.0);
/// Nominal cerebrum (before the posterior widening): ~136 × 172 × 132 mm.
const CEREBRUM: Ellipsoid = Ellipsoid::new([0.0, -17.0, 12.0], [68.0, 86.0, 66.0], 0.0);
/// Nominal cerebellum.
const CEREBELLUM: Ellipsoid = Ellipsoid::new([0.0, -60.0, -36.0], [48.0, 30.0, 22.0], 0.0);
/// Nominal brain stem (midbrain top to medulla).
const BRAINSTEM: Ellipsoid = Ellipsoid::new([0.0, -26.0, -34.0], [12.0, 13.0, 30.0], 0.0);

/// Bounding box of the nominal brain (cerebrum, cerebellum, brain stem), mm.
pub(crate) const BRAIN_BOX_MIN: [f64; 3] = [-68.0, -103.0, -64.0];
/// See [`BRAIN_BOX_MIN`].
pub(crate) const BRAIN_BOX_MAX: [f64; 3] = [68.0, 69.0, 78.0];
/// Margin (mm) kept around the brain box when the anatomy is fitted to the field of view;
/// covers shape jitter and surface perturbation.
pub(crate) const FIT_MARGIN_MM: f64 = 6.0;

/// Deep structures in paint order (later ones win where they overlap), left-hemisphere
/// geometry; `true` marks bilateral ones (mirrored to the right with their own jitter).
/// Centres are typical MNI coordinates (mm), semi-axes typical adult sizes.
const DEEP: &[(Label, Ellipsoid, bool)] = &[
    // Lateral ventricles: frontal horn, body, atrium/occipital horn, temporal horn.
    (
        Label::Ventricle,
        Ellipsoid::new([-9.0, 14.0, 14.0], [5.0, 16.0, 8.0], 0.15),
        true,
    ),
    (
        Label::Ventricle,
        Ellipsoid::new([-11.0, -12.0, 19.0], [5.0, 18.0, 6.0], 0.0),
        true,
    ),
    (
        Label::Ventricle,
        Ellipsoid::new([-20.0, -38.0, 12.0], [6.0, 14.0, 8.0], -0.4),
        true,
    ),
    (
        Label::Ventricle,
        Ellipsoid::new([-30.0, -16.0, -14.0], [4.0, 16.0, 4.0], 0.2),
        true,
    ),
    // Third and fourth ventricles.
    (
        Label::Ventricle,
        Ellipsoid::new([0.0, -12.0, 2.0], [2.2, 13.0, 9.0], 0.0),
        false,
    ),
    (
        Label::Ventricle,
        Ellipsoid::new([0.0, -45.0, -32.0], [6.0, 4.0, 7.0], 0.0),
        false,
    ),
    // Deep grey matter.
    (
        Label::Thalamus,
        Ellipsoid::new([-11.0, -18.0, 6.0], [8.0, 14.0, 8.5], -0.25),
        true,
    ),
    (
        Label::Caudate,
        Ellipsoid::new([-15.0, 10.0, 10.0], [5.5, 10.0, 8.0], 0.0),
        true,
    ),
    (
        Label::Caudate,
        Ellipsoid::new([-17.0, -12.0, 20.0], [3.5, 14.0, 4.5], 0.1),
        true,
    ),
    (
        Label::Putamen,
        Ellipsoid::new([-25.0, 3.0, 1.0], [5.5, 15.0, 9.0], 0.0),
        true,
    ),
    (
        Label::GlobusPallidus,
        Ellipsoid::new([-19.0, -2.0, -1.0], [3.5, 9.0, 5.5], 0.0),
        true,
    ),
    (
        Label::RedNucleus,
        Ellipsoid::new([-5.0, -19.0, -8.0], [3.2, 3.8, 3.5], 0.0),
        true,
    ),
    (
        Label::SubstantiaNigra,
        Ellipsoid::new([-11.0, -16.0, -12.0], [2.5, 8.0, 2.5], 0.5),
        true,
    ),
    (
        Label::DentateNucleus,
        Ellipsoid::new([-15.0, -58.0, -34.0], [6.0, 9.0, 5.0], 0.4),
        true,
    ),
];

/// Half-width (mm) of CSF along every cerebral pial surface and sulcus.
const CSF_HALF: f64 = 0.7;
/// Mean cortical grey-matter thickness (mm).
const GM_THICKNESS: f64 = 2.7;
/// Thickness (mm) of the CSF shell outside the brain surface.
const OUTER_CSF: f64 = 1.5;
/// Mean depth (mm) reached by sulci.
const SULCUS_DEPTH: f64 = 11.0;
/// Amplitude of the depth-varying offset of the folding field (field units).
const WIGGLE: f64 = 0.35;
/// Cerebellar CSF half-width, grey-matter thickness and folium depth (mm).
const CB_CSF_HALF: f64 = 0.45;
const CB_GM: f64 = 2.4;
const FOLIA_DEPTH: f64 = 14.0;
/// Interhemispheric fissure floor: the top of the corpus callosum, an arch from
/// z = CC_END_Z at its anterior/posterior ends (y = CC_FRONT_Y, CC_BACK_Y) up to
/// z = CC_END_Z + CC_RISE at its middle (mm).
const CC_END_Z: f64 = 12.0;
const CC_RISE: f64 = 14.0;
const CC_FRONT_Y: f64 = 36.0;
const CC_BACK_Y: f64 = -46.0;
/// Sylvian fissure: plane z = z0 + slope·y, from the lateral surface in to the insula.
const SYLVIAN_Z0: f64 = 1.0;
const SYLVIAN_SLOPE: f64 = 0.3;
const INSULA_X: f64 = 38.0;
const SYLVIAN_Y_FRONT: f64 = 22.0;
const SYLVIAN_Y_BACK: f64 = -40.0;
/// Extent of the insular cistern (sheet at |x| = INSULA_X), mm.
const INSULA_Y_FRONT: f64 = 16.0;
const INSULA_Y_BACK: f64 = -32.0;
const INSULA_Z_TOP: f64 = 16.0;
const INSULA_Z_BOTTOM: f64 = -6.0;

/// A field and the magnitude of its tangential gradient sampled on the surface of an
/// axis-aligned ellipsoid, tabulated over the polar and azimuthal angles of the normalised
/// local direction (bilinear look-up).
#[derive(Debug, Clone)]
struct SurfaceTable {
    /// (value, |tangential gradient| per mm) per node.
    values: Vec<[f64; 2]>,
}

/// Angular resolution of [`SurfaceTable`]: nodes ≈ 1.3–1.7 mm apart on the cerebral
/// surface. Bilinear interpolation of a field with λ ≥ 16 mm then errs by at most
/// h²k²/8 ≈ 0.06 (field units), moving a sulcus by ~0.2 mm.
const TABLE_THETA: usize = 160;
const TABLE_PHI: usize = 320;

impl SurfaceTable {
    fn new(field: &SmoothNoise, e: &Ellipsoid) -> Self {
        // Rows are independent: build them in parallel (deterministic, collected in order).
        let rows: Vec<Vec<[f64; 2]>> = (0..=TABLE_THETA)
            .into_par_iter()
            .map(|it| {
                let theta = std::f64::consts::PI * it as f64 / TABLE_THETA as f64;
                (0..=TABLE_PHI)
                    .map(|ip| {
                        let phi = std::f64::consts::TAU * ip as f64 / TABLE_PHI as f64;
                        let q = [
                            theta.sin() * phi.cos(),
                            theta.sin() * phi.sin(),
                            theta.cos(),
                        ];
                        let p = [0, 1, 2].map(|a| e.c[a] + e.a[a] * q[a]);
                        let (v, g) = field.value_and_gradient(p);
                        let n = v3::normalize([q[0] / e.a[0], q[1] / e.a[1], q[2] / e.a[2]]);
                        let gt = v3::sub(g, v3::scale(n, v3::dot(g, n)));
                        [v, v3::norm(gt)]
                    })
                    .collect()
            })
            .collect();
        Self {
            values: rows.into_iter().flatten().collect(),
        }
    }

    /// The field and its tangential gradient magnitude at the surface point in direction
    /// `q` (normalised local coordinates).
    fn at(&self, q: [f64; 3]) -> [f64; 2] {
        let r = v3::norm(q);
        if r <= 0.0 {
            return self.values[0];
        }
        let theta = (q[2] / r).clamp(-1.0, 1.0).acos();
        let mut phi = q[1].atan2(q[0]);
        if phi < 0.0 {
            phi += std::f64::consts::TAU;
        }
        let ft = (theta / std::f64::consts::PI * TABLE_THETA as f64).clamp(0.0, TABLE_THETA as f64);
        let fp = (phi / std::f64::consts::TAU * TABLE_PHI as f64).clamp(0.0, TABLE_PHI as f64);
        let (it, ip) = (
            (ft as usize).min(TABLE_THETA - 1),
            (fp as usize).min(TABLE_PHI - 1),
        );
        let (wt, wp) = (ft - it as f64, fp - ip as f64);
        let row = TABLE_PHI + 1;
        let v = |a: usize, b: usize, c: usize| self.values[a * row + b][c];
        [0, 1].map(|c| {
            (1.0 - wt) * ((1.0 - wp) * v(it, ip, c) + wp * v(it, ip + 1, c))
                + wt * ((1.0 - wp) * v(it + 1, ip, c) + wp * v(it + 1, ip + 1, c))
        })
    }
}

/// A deep structure instance (one side).
#[derive(Debug, Clone)]
pub(crate) struct DeepStructure {
    pub label: Label,
    pub shape: Ellipsoid,
    /// Surface perturbation amplitude (fraction of the normalised radius).
    perturb: f64,
}

/// Mapping between voxel indices and the anatomy frame.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    /// Matrix size.
    pub shape: [usize; 3],
    /// Voxel size (mm).
    pub voxel: [f64; 3],
    /// Physical mm per anatomy mm.
    pub scale: f64,
    /// Anatomy point at the centre of the field of view.
    pub centre: [f64; 3],
    /// Anatomy coordinate of every voxel centre along each axis.
    pub axes: [Vec<f64>; 3],
}

impl Frame {
    /// The frame that centres the brain box in the field of view at `scale`.
    pub(crate) fn new(shape: [usize; 3], voxel: [f64; 3], scale: f64) -> Self {
        let centre = [0, 1, 2].map(|a| 0.5 * (BRAIN_BOX_MIN[a] + BRAIN_BOX_MAX[a]));
        let axes = [0, 1, 2].map(|a| {
            let mid = (shape[a] as f64 - 1.0) / 2.0;
            (0..shape[a])
                .map(|i| centre[a] + (i as f64 - mid) * voxel[a] / scale)
                .collect()
        });
        Self {
            shape,
            voxel,
            scale,
            centre,
            axes,
        }
    }

    /// The automatic scale: 1 (true size) when the brain box plus margin fits the field
    /// of view, otherwise the largest isotropic shrink that makes it fit.
    pub(crate) fn fit_scale(shape: [usize; 3], voxel: [f64; 3]) -> f64 {
        (0..3)
            .map(|a| {
                let fov = shape[a] as f64 * voxel[a];
                fov / (BRAIN_BOX_MAX[a] - BRAIN_BOX_MIN[a] + 2.0 * FIT_MARGIN_MM)
            })
            .fold(1.0, f64::min)
    }

    /// Anatomy coordinates of voxel `[i, j, k]`.
    #[inline]
    pub(crate) fn point(&self, i: usize, j: usize, k: usize) -> [f64; 3] {
        [self.axes[0][i], self.axes[1][j], self.axes[2][k]]
    }

    /// Fractional voxel index of an anatomy point.
    pub(crate) fn index_of(&self, p: [f64; 3]) -> [f64; 3] {
        [0, 1, 2].map(|a| {
            (p[a] - self.centre[a]) * self.scale / self.voxel[a]
                + (self.shape[a] as f64 - 1.0) / 2.0
        })
    }
}

/// One seeded brain: jittered shapes and the noise fields tabulated on the grid.
pub(crate) struct Anatomy {
    pub head: Ellipsoid,
    pub cerebrum: Ellipsoid,
    pub cerebellum: Ellipsoid,
    pub brainstem: Ellipsoid,
    /// Deep structures in paint order.
    pub deep: Vec<DeepStructure>,
    /// x (mm) of the mid-sagittal plane.
    pub midline_x: f64,
    deep_min: [f64; 3],
    deep_max: [f64; 3],
    head_min: [f64; 3],
    head_max: [f64; 3],
    pons_top: f64,
    outline: GridNoise,
    fold: SurfaceTable,
    fold_g: f64,
    /// 3D field (12–24 mm) added to the folding field so sulci wander with depth.
    wiggle: GridNoise,
    folia: GridNoise,
    folia_k: f64,
    /// Two independent unit-variance texture fields (8–60 mm).
    pub texture: [GridNoise; 2],
}

impl Anatomy {
    /// The anatomy of `seed` on `frame`; no structure is thinner than ~one voxel
    /// (semi-axes ≥ 0.9 × the largest voxel size), so all are present at any resolution.
    pub(crate) fn new(seed: u64, frame: &Frame) -> Self {
        let mut rng = Rng::new(seed, Stream::Shape);
        let head = HEAD.jittered(&mut rng, 1.5, 0.02);
        let cerebrum = CEREBRUM.jittered(&mut rng, 1.5, 0.025);
        let cerebellum = CEREBELLUM.jittered(&mut rng, 1.5, 0.04);
        let brainstem = BRAINSTEM.jittered(&mut rng, 1.0, 0.05);
        let midline_x = 0.8 * rng.normal().clamp(-2.0, 2.0);
        let vmax = frame.voxel.iter().cloned().fold(0.0, f64::max);
        let min_semi = 0.9 * vmax / frame.scale;
        let mut deep = Vec::new();
        for &(label, shape, bilateral) in DEEP {
            let sides: &[Ellipsoid] = if bilateral {
                &[shape, shape.mirrored()]
            } else {
                &[shape]
            };
            for s in sides {
                let mut e = s.jittered(&mut rng, 1.0, 0.1);
                e.c[0] += midline_x;
                for a in e.a.iter_mut() {
                    *a = a.max(min_semi);
                }
                let perturb = if label == Label::Ventricle { 0.1 } else { 0.06 };
                deep.push(DeepStructure {
                    label,
                    shape: e,
                    perturb,
                });
            }
        }
        let mut deep_min = [f64::INFINITY; 3];
        let mut deep_max = [f64::NEG_INFINITY; 3];
        for d in &deep {
            let (lo, hi) = d.shape.bounds();
            for a in 0..3 {
                // 1.2: room for the surface perturbation.
                let c = d.shape.c[a];
                deep_min[a] = deep_min[a].min(c - 1.2 * (c - lo[a]));
                deep_max[a] = deep_max[a].max(c + 1.2 * (hi[a] - c));
            }
        }
        let (hl, hh) = head.bounds();
        let head_min = [0, 1, 2].map(|a| head.c[a] - 1.1 * (head.c[a] - hl[a]));
        let head_max = [0, 1, 2].map(|a| head.c[a] + 1.1 * (hh[a] - head.c[a]));

        let mut frng = Rng::new(seed, Stream::Fields);
        let outline = SmoothNoise::new(&mut frng, 16, 40.0, 160.0);
        let fold = SmoothNoise::new(&mut frng, 48, 16.0, 40.0);
        let folia = SmoothNoise::new(&mut frng, 32, 5.0, 10.0);
        let wiggle = SmoothNoise::new(&mut frng, 16, 12.0, 24.0);
        let tex_a = SmoothNoise::new(&mut frng, 24, 8.0, 60.0);
        let tex_b = SmoothNoise::new(&mut frng, 24, 8.0, 60.0);
        Self {
            pons_top: brainstem.c[2] + 20.0,
            head,
            cerebrum,
            cerebellum,
            brainstem,
            deep,
            midline_x,
            deep_min,
            deep_max,
            head_min,
            head_max,
            outline: outline.on_grid(&frame.axes),
            // The RMS gradient of a unit-variance isotropic field within a plane is
            // k_rms·sqrt(2/3).
            fold_g: fold.k_rms() * (2.0f64 / 3.0).sqrt(),
            fold: SurfaceTable::new(&fold, &cerebrum),
            wiggle: wiggle.on_grid(&frame.axes),
            folia_k: folia.k_rms(),
            folia: folia.on_grid(&frame.axes),
            texture: [tex_a.on_grid(&frame.axes), tex_b.on_grid(&frame.axes)],
        }
    }

    /// Signed distance (mm, positive inside) to the cerebral surface: the cerebrum
    /// ellipsoid widened by up to 6 % posteriorly (an egg-shaped axial outline) and
    /// perturbed by the outline field `no`.
    /// Also returns the normalised local direction of `p` (for the folding table).
    pub(crate) fn cerebrum_depth(&self, p: [f64; 3], no: f64) -> (f64, [f64; 3]) {
        let c = &self.cerebrum;
        let d = v3::sub(p, c.c);
        let widen = 1.0 + 0.06 * (-d[1] / c.a[1]).clamp(-1.0, 1.0);
        let ax = [c.a[0] * widen, c.a[1], c.a[2]];
        let q = [d[0] / ax[0], d[1] / ax[1], d[2] / ax[2]];
        let rho = v3::norm(q);
        if rho < 1e-9 {
            return (c.a[2], q);
        }
        let g = v3::norm([q[0] / ax[0], q[1] / ax[1], q[2] / ax[2]]) / rho;
        ((1.0 - rho - 0.025 * no) / g, q)
    }

    /// The tissue label of voxel `[i, j, k]` before veins and lesions are painted.
    pub(crate) fn tissue_label(&self, frame: &Frame, i: usize, j: usize, k: usize) -> Label {
        let p = frame.point(i, j, k);
        if (0..3).any(|a| p[a] < self.head_min[a] || p[a] > self.head_max[a]) {
            return Label::Background;
        }
        let no = self.outline.at(i, j, k);
        if self.head.rho(p) + 0.02 * no > 1.0 {
            return Label::Background;
        }
        let d_bs = self.brainstem.depth(p, 0.03 * no);
        let d_cb = self.cerebellum.depth(p, 0.03 * no);
        let (d_c, q) = self.cerebrum_depth(p, no);
        let ijk = [i, j, k];
        let mut label = if d_bs > 0.0 {
            if p[2] < self.pons_top && d_bs < CSF_HALF {
                Label::Csf
            } else {
                Label::WhiteMatter
            }
        } else if d_cb > 0.0 {
            self.cerebellar_tissue(i, j, k, p, d_cb)
        } else if d_c > 0.0 {
            self.cerebral_tissue(ijk, p, q, [d_c, d_cb, d_bs], no)
        } else if d_c.max(d_cb).max(d_bs) > -OUTER_CSF {
            Label::Csf
        } else {
            Label::ExtraCerebral
        };
        if label.is_brain() && (0..3).all(|a| p[a] >= self.deep_min[a] && p[a] <= self.deep_max[a])
        {
            for s in self.deep.iter().rev() {
                if s.shape.rho(p) + s.perturb * no < 1.0 {
                    label = s.label;
                    break;
                }
            }
        }
        label
    }

    /// Cerebral CSF / grey / white matter from the pial distance (see the module docs).
    /// `d` = signed depths in the cerebrum, cerebellum and brain stem.
    /// `q` = normalised direction of `p` in the cerebrum.
    fn cerebral_tissue(
        &self,
        ijk: [usize; 3],
        p: [f64; 3],
        q: [f64; 3],
        d: [f64; 3],
        no: f64,
    ) -> Label {
        let [d_c, d_cb, d_bs] = d;
        let mut pial = d_c;
        let sulcus_depth = SULCUS_DEPTH * (1.0 + 0.3 * no.clamp(-2.0, 2.0));
        if d_c < sulcus_depth + CSF_HALF + 2.0 * GM_THICKNESS {
            let [f, g] = self.fold.at(q);
            let w = self.wiggle.at(ijk[0], ijk[1], ijk[2]);
            let ds = (f + WIGGLE * w).abs() / g.max(self.fold_g / 3.0);
            let to_sulcus = if d_c <= sulcus_depth {
                ds
            } else {
                ds.hypot(d_c - sulcus_depth)
            };
            pial = pial.min(to_sulcus);
        }
        // Interhemispheric fissure, down to the corpus callosum between its ends.
        let dx = (p[0] - self.midline_x - 1.5 * no).abs();
        let beyond_cc = (p[1] - CC_FRONT_Y).max(CC_BACK_Y - p[1]).max(0.0);
        let half = 0.5 * (CC_FRONT_Y - CC_BACK_Y);
        let u = ((p[1] - 0.5 * (CC_FRONT_Y + CC_BACK_Y)) / half).clamp(-1.0, 1.0);
        let floor = CC_END_Z + CC_RISE * (1.0 - u * u).sqrt() - 8.0 * beyond_cc;
        let d_ihf = if p[2] >= floor {
            dx
        } else {
            dx.hypot(floor - p[2])
        };
        pial = pial.min(d_ihf);
        // Sylvian fissure, from the lateral surface to the insula.
        let dz = p[2] - (SYLVIAN_Z0 + SYLVIAN_SLOPE * p[1]);
        let dx_in = (INSULA_X - (p[0] - self.midline_x).abs()).max(0.0);
        let dy = (p[1] - SYLVIAN_Y_FRONT).max(SYLVIAN_Y_BACK - p[1]).max(0.0);
        pial = pial.min((dz * dz + dx_in * dx_in + dy * dy).sqrt());
        // Insular cistern: a sagittal sheet lateral to the putamen, under the opercula.
        let dx_ins = (p[0] - self.midline_x).abs() - INSULA_X;
        let dy_ins = (p[1] - INSULA_Y_FRONT).max(INSULA_Y_BACK - p[1]).max(0.0);
        let dz_ins = (p[2] - INSULA_Z_TOP).max(INSULA_Z_BOTTOM - p[2]).max(0.0);
        pial = pial.min((dx_ins * dx_ins + dy_ins * dy_ins + dz_ins * dz_ins).sqrt());
        // Tentorial surface over the cerebellum; cisterns around the lower brain stem.
        pial = pial.min(-d_cb);
        if p[2] < self.pons_top {
            pial = pial.min(-d_bs);
        }
        let gm = GM_THICKNESS * (1.0 + 0.15 * no.clamp(-2.0, 2.0));
        if pial < CSF_HALF {
            Label::Csf
        } else if pial < CSF_HALF + gm {
            Label::GreyMatter
        } else {
            Label::WhiteMatter
        }
    }

    /// Cerebellar CSF / grey / white matter: folia and the posterior midline notch.
    fn cerebellar_tissue(&self, i: usize, j: usize, k: usize, p: [f64; 3], d_cb: f64) -> Label {
        let ds = self.folia.at(i, j, k).abs() / self.folia_k;
        let to_fissure = if d_cb <= FOLIA_DEPTH {
            ds
        } else {
            ds.hypot(d_cb - FOLIA_DEPTH)
        };
        let mut pial = d_cb.min(to_fissure);
        let notch_y = self.cerebellum.c[1] - 15.0;
        let notch = (p[0] - self.midline_x)
            .abs()
            .hypot((p[1] - notch_y).max(0.0));
        pial = pial.min(notch);
        if pial < CB_CSF_HALF {
            Label::Csf
        } else if pial < CB_CSF_HALF + CB_GM {
            Label::GreyMatter
        } else {
            Label::WhiteMatter
        }
    }
}
