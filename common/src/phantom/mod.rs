//! Synthetic brain-like susceptibility (χ) phantoms, seeded, at any matrix and voxel size.
//!
//! [`generate`] builds a [`Phantom`]: a χ map in ppm, a brain mask and a label map
//! ([`Label`]). The anatomy is defined in physical millimetres (a head of about
//! 180 × 220 × 194 mm around a 136 × 172 × 142 mm brain, RAS axes) and sampled at the
//! voxel centres, so any matrix and voxel size sees the same brain. The brain is centred in
//! the field of view at true size when it fits (brain plus a 6 mm margin), otherwise shrunk
//! isotropically to fit ([`PhantomConfig::head_scale`] overrides this).
//!
//! Contents: scalp/skull (labelled, χ = 0 like every voxel outside the brain mask), a
//! cortical grey-matter ribbon with sulci and the interhemispheric and Sylvian fissures,
//! white matter, CSF with lateral, third and fourth ventricles, cerebellum with folia and
//! dentate nuclei, brain stem, the deep grey-matter nuclei (caudate, putamen, globus
//! pallidus, thalamus, red nucleus, substantia nigra) on both sides, the dural sinuses and
//! random cortical and medullary veins, and optional calcifications and haemorrhages.
//!
//! Values ([`SUSCEPTIBILITY_TABLE`], REFERENCE.md §7): the Challenge-2.0-like map for
//! grey matter, white matter and CSF, the Zubal phantom for the basal ganglia, thalamus
//! and veins, and Ridani et al.'s paramagnetic component χ⁺ for the red nucleus,
//! substantia nigra and dentate (the Zubal phantom has none). Per seed, each nucleus
//! (each side separately) and the veins are scaled by U(1 − j, 1 + j) with
//! j = [`PhantomConfig::value_jitter`], the other tissues by U(1 − j/2, 1 + j/2). Within a
//! region χ varies smoothly as base · (1 + c · n(p)), n a unit-variance random field with
//! wavelengths 8–60 mm clipped to ±2.5 and c = [`PhantomConfig::texture_cov`] (20 %, the
//! Zubal phantom's coefficient of variation). Region signs are therefore preserved.
//!
//! The same configuration (seed included) gives the bitwise same phantom on any thread
//! count: every voxel is computed independently from seeded tables.

mod anatomy;
mod noise;
mod random;
#[cfg(test)]
mod tests;
mod vessels;

use crate::error::{Error, Result};
use crate::volume::Volume;
use anatomy::{Anatomy, Frame};
use ndarray::{Array3, Zip};
use random::{Rng, Stream};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Tissue labels of the phantom's label map (stored as `u8`, the discriminant).
///
/// `0` and `1` are outside the brain mask; every other label is inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Label {
    /// Air outside the head (0).
    Background = 0,
    /// Scalp, skull and other tissue between head outline and brain (1).
    ExtraCerebral = 1,
    /// Cerebrospinal fluid in sulci, fissures, cisterns and around the brain (2).
    Csf = 2,
    /// CSF in the lateral, third and fourth ventricles (3).
    Ventricle = 3,
    /// Cortical and cerebellar grey matter (4).
    GreyMatter = 4,
    /// Cerebral, cerebellar and brain-stem white matter (5).
    WhiteMatter = 5,
    /// Caudate nucleus, head and body (6).
    Caudate = 6,
    /// Putamen (7).
    Putamen = 7,
    /// Globus pallidus (8).
    GlobusPallidus = 8,
    /// Thalamus (9).
    Thalamus = 9,
    /// Red nucleus (10).
    RedNucleus = 10,
    /// Substantia nigra (11).
    SubstantiaNigra = 11,
    /// Dentate nucleus of the cerebellum (12).
    DentateNucleus = 12,
    /// Veins and dural sinuses (13).
    Vein = 13,
    /// Calcification, diamagnetic (14).
    Calcification = 14,
    /// Haemorrhage, paramagnetic (15).
    Haemorrhage = 15,
}

/// Number of labels; every label value is below this.
pub const LABEL_COUNT: usize = 16;

/// Reference χ (ppm) of every label and where it comes from (REFERENCE.md §7).
///
/// | label | χ (ppm) | source |
/// |---|---|---|
/// | background, extra-cerebral | 0 | outside the brain mask (QSM maps are masked) |
/// | CSF, ventricles | 0.019 | QSM Challenge 2.0 map |
/// | grey matter | 0.020 | QSM Challenge 2.0 map |
/// | white matter | −0.030 | QSM Challenge 2.0 map |
/// | caudate, putamen | 0.09 | Zubal-based phantom |
/// | globus pallidus | 0.19 | Zubal-based phantom |
/// | thalamus | 0.07 | Zubal-based phantom |
/// | red nucleus, substantia nigra, dentate | 0.106, 0.115, 0.158 | Ridani χ⁺ |
/// | veins | 0.3 | Zubal-based phantom |
/// | calcification | −0.25 (blobs: ×0.5 … 1.5) | typical in-vivo QSM, our choice |
/// | haemorrhage | 0.5 (blobs: ×0.6 … 1.6) | typical in-vivo QSM, our choice |
pub const SUSCEPTIBILITY_TABLE: [(Label, f64, &str); LABEL_COUNT] = [
    (Label::Background, 0.0, "outside the brain mask"),
    (Label::ExtraCerebral, 0.0, "outside the brain mask"),
    (Label::Csf, 0.019, "QSM Challenge 2.0 map"),
    (Label::Ventricle, 0.019, "QSM Challenge 2.0 map (CSF)"),
    (Label::GreyMatter, 0.020, "QSM Challenge 2.0 map"),
    (Label::WhiteMatter, -0.030, "QSM Challenge 2.0 map"),
    (Label::Caudate, 0.09, "Zubal-based phantom"),
    (Label::Putamen, 0.09, "Zubal-based phantom"),
    (Label::GlobusPallidus, 0.19, "Zubal-based phantom"),
    (Label::Thalamus, 0.07, "Zubal-based phantom"),
    (Label::RedNucleus, 0.106, "Ridani chi+"),
    (Label::SubstantiaNigra, 0.115, "Ridani chi+"),
    (Label::DentateNucleus, 0.158, "Ridani chi+"),
    (Label::Vein, 0.3, "Zubal-based phantom"),
    (
        Label::Calcification,
        -0.25,
        "typical in-vivo value (our choice)",
    ),
    (
        Label::Haemorrhage,
        0.5,
        "typical in-vivo value (our choice)",
    ),
];

impl Label {
    /// Every label in discriminant order.
    pub const ALL: [Label; LABEL_COUNT] = [
        Label::Background,
        Label::ExtraCerebral,
        Label::Csf,
        Label::Ventricle,
        Label::GreyMatter,
        Label::WhiteMatter,
        Label::Caudate,
        Label::Putamen,
        Label::GlobusPallidus,
        Label::Thalamus,
        Label::RedNucleus,
        Label::SubstantiaNigra,
        Label::DentateNucleus,
        Label::Vein,
        Label::Calcification,
        Label::Haemorrhage,
    ];

    /// The deep grey-matter nuclei (the regions of the Challenge-2.0 linearity metric).
    pub const DEEP_GREY_MATTER: [Label; 7] = [
        Label::Caudate,
        Label::Putamen,
        Label::GlobusPallidus,
        Label::Thalamus,
        Label::RedNucleus,
        Label::SubstantiaNigra,
        Label::DentateNucleus,
    ];

    /// The label with discriminant `v`, if any.
    pub fn from_u8(v: u8) -> Option<Label> {
        Label::ALL.get(v as usize).copied()
    }

    /// A short lower-case name, e.g. `"globus_pallidus"`.
    pub fn name(self) -> &'static str {
        match self {
            Label::Background => "background",
            Label::ExtraCerebral => "extra_cerebral",
            Label::Csf => "csf",
            Label::Ventricle => "ventricle",
            Label::GreyMatter => "grey_matter",
            Label::WhiteMatter => "white_matter",
            Label::Caudate => "caudate",
            Label::Putamen => "putamen",
            Label::GlobusPallidus => "globus_pallidus",
            Label::Thalamus => "thalamus",
            Label::RedNucleus => "red_nucleus",
            Label::SubstantiaNigra => "substantia_nigra",
            Label::DentateNucleus => "dentate_nucleus",
            Label::Vein => "vein",
            Label::Calcification => "calcification",
            Label::Haemorrhage => "haemorrhage",
        }
    }

    /// Whether the label is inside the brain mask (everything but background and
    /// extra-cerebral tissue).
    pub fn is_brain(self) -> bool {
        !matches!(self, Label::Background | Label::ExtraCerebral)
    }

    /// Whether the label is one of [`Label::DEEP_GREY_MATTER`].
    pub fn is_deep_grey_matter(self) -> bool {
        Label::DEEP_GREY_MATTER.contains(&self)
    }

    /// Reference χ (ppm) from [`SUSCEPTIBILITY_TABLE`].
    pub fn reference_chi_ppm(self) -> f64 {
        SUSCEPTIBILITY_TABLE[self as usize].1
    }
}

/// Settings of a synthetic phantom. All lengths in mm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PhantomConfig {
    /// Matrix size `[nx, ny, nz]` along RAS voxel axes (x right, y anterior, z superior).
    pub shape: [usize; 3],
    /// Voxel size (mm).
    pub voxel_size_mm: [f64; 3],
    /// Seed of every random choice (shape, values, texture, veins, lesions).
    pub seed: u64,
    /// Number of random veins besides the sinuses (2/3 cortical, 1/3 medullary).
    pub veins: usize,
    /// Whether to draw the dural sinuses and deep veins (superior sagittal, straight and
    /// transverse sinuses; internal cerebral, thalamostriate and basal veins).
    pub sinuses: bool,
    /// Number of calcifications (χ < 0, 1–3 mm).
    pub calcifications: usize,
    /// Number of haemorrhages (χ > 0, 4–10 mm).
    pub haemorrhages: usize,
    /// Coefficient of variation of the smooth within-region texture (0 … 0.35).
    pub texture_cov: f64,
    /// Half-range of the per-seed scaling of nucleus and vein values (0 … 0.5); other
    /// tissues get half of it.
    pub value_jitter: f64,
    /// Physical mm per anatomy mm; `None` fits the brain to the field of view (true size
    /// when it fits, otherwise shrunk).
    pub head_scale: Option<f64>,
}

impl Default for PhantomConfig {
    /// 160 × 192 × 160 at 1 mm isotropic, seed 0, 16 veins and the sinuses, no lesions,
    /// 20 % texture and ±20 % nucleus values.
    fn default() -> Self {
        Self {
            shape: [160, 192, 160],
            voxel_size_mm: [1.0, 1.0, 1.0],
            seed: 0,
            veins: 16,
            sinuses: true,
            calcifications: 0,
            haemorrhages: 0,
            texture_cov: 0.2,
            value_jitter: 0.2,
            head_scale: None,
        }
    }
}

/// Largest accepted number of voxels (2²⁸, 1 GiB of f32).
pub const MAX_VOXELS: usize = 1 << 28;

impl PhantomConfig {
    /// The default configuration with another matrix, voxel size (mm) and seed.
    pub fn new(shape: [usize; 3], voxel_size_mm: [f64; 3], seed: u64) -> Self {
        Self {
            shape,
            voxel_size_mm,
            seed,
            ..Self::default()
        }
    }

    /// Errors with [`Error::Shape`] or [`Error::Parameter`] naming the first bad setting.
    pub fn validate(&self) -> Result<()> {
        if self.shape.iter().any(|&n| n < 2) {
            return Err(Error::Shape(format!(
                "phantom shape must be at least 2 in every dimension, got {:?}",
                self.shape
            )));
        }
        let voxels = self
            .shape
            .iter()
            .try_fold(1usize, |acc, &n| acc.checked_mul(n));
        if voxels.is_none_or(|v| v > MAX_VOXELS) {
            return Err(Error::Shape(format!(
                "phantom shape {:?} exceeds {MAX_VOXELS} voxels",
                self.shape
            )));
        }
        if self
            .voxel_size_mm
            .iter()
            .any(|v| !(v.is_finite() && *v > 0.0 && *v <= 20.0))
        {
            return Err(Error::Parameter(format!(
                "phantom voxel size must be finite and in (0, 20] mm, got {:?}",
                self.voxel_size_mm
            )));
        }
        if !(self.texture_cov.is_finite() && (0.0..=0.35).contains(&self.texture_cov)) {
            return Err(Error::Parameter(format!(
                "phantom texture_cov must be in [0, 0.35], got {}",
                self.texture_cov
            )));
        }
        if !(self.value_jitter.is_finite() && (0.0..=0.5).contains(&self.value_jitter)) {
            return Err(Error::Parameter(format!(
                "phantom value_jitter must be in [0, 0.5], got {}",
                self.value_jitter
            )));
        }
        if let Some(s) = self.head_scale
            && !(s.is_finite() && s > 0.0 && s <= 10.0)
        {
            return Err(Error::Parameter(format!(
                "phantom head_scale must be in (0, 10], got {s}"
            )));
        }
        if self.veins > 1000 || self.calcifications > 200 || self.haemorrhages > 50 {
            return Err(Error::Parameter(format!(
                "phantom counts too large (veins ≤ 1000, calcifications ≤ 200, \
                 haemorrhages ≤ 50), got {} / {} / {}",
                self.veins, self.calcifications, self.haemorrhages
            )));
        }
        Ok(())
    }
}

/// A generated phantom.
#[derive(Debug, Clone, PartialEq)]
pub struct Phantom {
    /// Susceptibility (ppm); 0 outside the brain mask. RAS affine with the field-of-view
    /// centre at scanner (0, 0, 0).
    pub chi: Volume,
    /// Brain mask (1 inside, 0 outside) on the same grid.
    pub mask: Volume,
    /// [`Label`] discriminants, same shape.
    pub labels: Array3<u8>,
    /// Physical mm per anatomy mm that was used (1 = true size).
    pub scale: f64,
}

impl Phantom {
    /// Number of voxels labelled `label`.
    pub fn count(&self, label: Label) -> usize {
        self.labels.iter().filter(|&&l| l == label as u8).count()
    }

    /// Mean χ (ppm) over the voxels labelled `label`, `None` if there are none.
    pub fn region_mean(&self, label: Label) -> Option<f64> {
        let (s, n) =
            Zip::from(&self.labels)
                .and(&self.chi.data)
                .fold((0.0f64, 0usize), |(s, n), &l, &c| {
                    if l == label as u8 {
                        (s + c as f64, n + 1)
                    } else {
                        (s, n)
                    }
                });
        (n > 0).then(|| s / n as f64)
    }
}

/// Per-seed χ (ppm) of every label on each side (0 = left, 1 = right) and the mixing angle
/// of the two texture fields for each label.
struct RegionValues {
    base: [[f64; 2]; LABEL_COUNT],
    mix: [(f64, f64); LABEL_COUNT],
}

impl RegionValues {
    fn new(seed: u64, jitter: f64) -> Self {
        let mut rng = Rng::new(seed, Stream::Values);
        let mut base = [[0.0; 2]; LABEL_COUNT];
        let mut mix = [(1.0, 0.0); LABEL_COUNT];
        for label in Label::ALL {
            // Always three draws per label, so the stream stays aligned.
            let (u0, u1, u2) = (rng.uniform(), rng.uniform(), rng.uniform());
            let r = label.reference_chi_ppm();
            let f = |u: f64, j: f64| 1.0 - j + 2.0 * j * u;
            base[label as usize] = if label.is_deep_grey_matter() {
                [r * f(u0, jitter), r * f(u1, jitter)]
            } else if label == Label::Vein {
                [r * f(u0, jitter); 2]
            } else {
                [r * f(u0, 0.5 * jitter); 2]
            };
            let angle = u2 * std::f64::consts::TAU;
            mix[label as usize] = (angle.cos(), angle.sin());
        }
        Self { base, mix }
    }
}

/// Clip of the unit-variance texture field (so base · (1 + c·n) keeps its sign).
const TEXTURE_CLIP: f64 = 2.5;

/// Generates the phantom described by `config`.
///
/// Errors: [`Error::Shape`] / [`Error::Parameter`] from [`PhantomConfig::validate`].
pub fn generate(config: &PhantomConfig) -> Result<Phantom> {
    config.validate()?;
    let shape = config.shape;
    let voxel = config.voxel_size_mm;
    let scale = config
        .head_scale
        .unwrap_or_else(|| Frame::fit_scale(shape, voxel));
    let frame = Frame::new(shape, voxel, scale);
    let anat = Anatomy::new(config.seed, &frame);

    let mut labels = Array3::<u8>::zeros(shape);
    Zip::indexed(&mut labels).par_for_each(|(i, j, k), l| {
        *l = anat.tissue_label(&frame, i, j, k) as u8;
    });

    let mut vrng = Rng::new(config.seed, Stream::Veins);
    for tube in vessels::veins(&mut vrng, &anat, config.sinuses, config.veins) {
        vessels::paint_tube(&mut labels, &frame, &tube);
    }
    let mut lrng = Rng::new(config.seed, Stream::Lesions);
    let mut lesion_chi = HashMap::new();
    for blob in vessels::lesions(&mut lrng, &anat, config.calcifications, config.haemorrhages) {
        vessels::paint_blob(&mut labels, &frame, &blob, &mut lesion_chi);
    }

    let values = RegionValues::new(config.seed, config.value_jitter);
    let cov = config.texture_cov;
    let [_, ny, nz] = shape;
    let mut chi = Array3::<f32>::zeros(shape);
    Zip::indexed(&mut chi)
        .and(&labels)
        .par_for_each(|(i, j, k), c, &l| {
            let Some(label) = Label::from_u8(l) else {
                return;
            };
            if !label.is_brain() {
                return;
            }
            let base = match label {
                Label::Calcification | Label::Haemorrhage => lesion_chi
                    .get(&((i * ny + j) * nz + k))
                    .copied()
                    .unwrap_or_else(|| label.reference_chi_ppm()),
                _ => {
                    let side = usize::from(frame.axes[0][i] >= anat.midline_x);
                    values.base[l as usize][side]
                }
            };
            let (ca, sa) = values.mix[l as usize];
            let n = ca * anat.texture[0].at(i, j, k) + sa * anat.texture[1].at(i, j, k);
            *c = (base * (1.0 + cov * n.clamp(-TEXTURE_CLIP, TEXTURE_CLIP))) as f32;
        });
    let mask = labels.mapv(|l| {
        if Label::from_u8(l).is_some_and(Label::is_brain) {
            1.0f32
        } else {
            0.0
        }
    });

    let mut affine = [[0.0; 4]; 4];
    for a in 0..3 {
        affine[a][a] = voxel[a];
        affine[a][3] = -(shape[a] as f64 - 1.0) / 2.0 * voxel[a];
    }
    affine[3][3] = 1.0;
    Ok(Phantom {
        chi: Volume::with_affine(chi, voxel, affine),
        mask: Volume::with_affine(mask, voxel, affine),
        labels,
        scale,
    })
}
