//! Reconstruction tasks of DM-QSM and the [`Problem`] the sampler consumes.
//!
//! A [`Problem`] is a measurement y (ppm), a linear forward model A from the output grid
//! (χ) to y's grid, and brain masks on both grids. DPS minimises the plain norm
//! ‖M_y ⊙ (y − A x̂_0)‖₂ (DPS code convention, REFERENCE.md §2); the output is χ in ppm on
//! the output grid, multiplied by the output mask.
//!
//! Tasks ([`Task`]): `dipinv`, `sr`, `sr-dipinv` follow DM-QSM (DipInv and SR-DipInv
//! recast as SR of a TKD estimate with threshold 0.1); `dipinv-physics` and
//! `sr-dipinv-physics` go beyond the paper and use the dipole model in A.
//! [`prepare`] builds the [`Problem`] of a task from a measurement volume, an optional
//! brain mask and [`TaskOptions`]. Fields are taken in ppm (convert Hz/rad with
//! [`crate::units`] first).

use crate::diffusion::consistency::TvConsistency;
use crate::error::{Error, Result};
use crate::fft::Padding;
use crate::geometry::B0Direction;
use crate::inversion::tkd::{DEFAULT_TKD_THRESHOLD, TkdOptions, tkd_with};
use crate::inversion::tv::{LCurve, LCurvePoint, TvParams, tv, tv_lcurve_default};
use crate::operators::{
    BlockDownsample, Compose, DipoleConvolution, Identity, KSpaceDownsample, LinearOperator, Mask,
};
use crate::splitmix::{GAMMA, mix64};
use crate::volume::Volume;
use ndarray::{Array3, Zip};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A reconstruction task.
///
/// Its serde and command-line names are kebab-case (`dipinv`, `sr-dipinv`, …): stored
/// jobs and cohort manifests hold them. The proto enum `dmqsm.v1.Task` maps onto it in
/// `dmqsm_proto::convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Local field → χ: y = TKD(field, δ = 0.1), A = identity (DM-QSM DipInv, SR at ×1).
    Dipinv,
    /// Low-res χ → high-res χ: A = downsample (DM-QSM SR).
    Sr,
    /// Low-res field → high-res χ: y = TKD(low-res field), A = downsample (DM-QSM SR-DipInv).
    SrDipinv,
    /// Local field → χ with A = mask ∘ dipole convolution (beyond the paper).
    DipinvPhysics,
    /// Low-res field → high-res χ with A = downsample ∘ mask ∘ dipole convolution.
    SrDipinvPhysics,
}

impl Task {
    /// All tasks, in proto enum order.
    pub const ALL: [Task; 5] = [
        Task::Dipinv,
        Task::Sr,
        Task::SrDipinv,
        Task::DipinvPhysics,
        Task::SrDipinvPhysics,
    ];

    /// The command-line / serde name, e.g. `sr-dipinv`.
    pub fn name(self) -> &'static str {
        match self {
            Task::Dipinv => "dipinv",
            Task::Sr => "sr",
            Task::SrDipinv => "sr-dipinv",
            Task::DipinvPhysics => "dipinv-physics",
            Task::SrDipinvPhysics => "sr-dipinv-physics",
        }
    }

    /// DM-QSM's DPS step size ξ per step at T = 1000 steps: 0.5 for dipole inversion and
    /// 2 for super-resolution; SR-DipInv is an SR problem of a TKD estimate, so 2; the
    /// physics variants take their resolution's value (our choice, the paper has no such
    /// task). A run's default scales it with its step count
    /// ([`crate::diffusion::sampler::default_xi`]).
    pub fn default_xi(self) -> f64 {
        match self {
            Task::Dipinv | Task::DipinvPhysics => 0.5,
            Task::Sr | Task::SrDipinv | Task::SrDipinvPhysics => 2.0,
        }
    }

    /// Whether the measurement is a field (ppm) rather than a χ map.
    pub fn measures_field(self) -> bool {
        match self {
            Task::Sr => false,
            Task::Dipinv | Task::SrDipinv | Task::DipinvPhysics | Task::SrDipinvPhysics => true,
        }
    }

    /// Whether the output grid is finer than the measurement grid.
    pub fn is_super_resolution(self) -> bool {
        match self {
            Task::Sr | Task::SrDipinv | Task::SrDipinvPhysics => true,
            Task::Dipinv | Task::DipinvPhysics => false,
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                Error::Parameter(format!(
                    "unknown task {s:?}; expected one of dipinv, sr, sr-dipinv, dipinv-physics, sr-dipinv-physics"
                ))
            })
    }
}

/// Geometry of the output χ map: matrix size, voxel size (mm) and affine (mm).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputGrid {
    /// Matrix size `[nx, ny, nz]`.
    pub shape: [usize; 3],
    /// Voxel size in mm.
    pub voxel_size: [f64; 3],
    /// Voxel-to-scanner affine in mm (row-major 4×4, NIfTI convention).
    pub affine: [[f64; 4]; 4],
}

impl OutputGrid {
    /// An axis-aligned grid with origin at voxel 0 (as [`crate::Volume::new`]).
    pub fn axis_aligned(shape: [usize; 3], voxel_size: [f64; 3]) -> Self {
        let mut affine = [[0.0; 4]; 4];
        for (a, v) in voxel_size.iter().enumerate() {
            affine[a][a] = *v;
        }
        affine[3][3] = 1.0;
        Self {
            shape,
            voxel_size,
            affine,
        }
    }
}

/// A prepared inverse problem for the DPS sampler (see the module docs). Immutable and
/// validated at construction: shapes agree with the operator and the measurement is finite.
pub struct Problem {
    task: Task,
    measurement: Array3<f32>,
    measurement_mask: Array3<bool>,
    operator: Arc<dyn LinearOperator>,
    output: OutputGrid,
    output_mask: Array3<bool>,
    initial: Option<Array3<f32>>,
    tv_consistency: Option<Arc<TvConsistency>>,
    fingerprint: u64,
}

impl fmt::Debug for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Problem")
            .field("task", &self.task)
            .field("measurement_shape", &self.measurement.shape())
            .field("output", &self.output)
            .field("fingerprint", &format_args!("{:016x}", self.fingerprint))
            .finish()
    }
}

impl Problem {
    /// Builds and validates a problem.
    ///
    /// - `measurement`: y on its grid, ppm (χ for `sr`/`dipinv`/`sr-dipinv` after TKD,
    ///   local field for the physics tasks); must be finite and of `operator.output_shape()`.
    /// - `measurement_mask`: where y is trusted (`None`: everywhere).
    /// - `operator`: A from the output grid (χ) to y's grid; `operator.input_shape()` must
    ///   equal `output.shape`.
    /// - `output_mask`: brain mask of the output grid (`None`: everywhere).
    pub fn new(
        task: Task,
        measurement: Array3<f32>,
        measurement_mask: Option<Array3<bool>>,
        operator: Arc<dyn LinearOperator>,
        output: OutputGrid,
        output_mask: Option<Array3<bool>>,
    ) -> Result<Self> {
        let y_shape = operator.output_shape();
        if measurement.shape() != y_shape {
            return Err(Error::Shape(format!(
                "{task}: measurement has shape {:?} but the forward model produces {y_shape:?}",
                measurement.shape()
            )));
        }
        if operator.input_shape() != output.shape {
            return Err(Error::Shape(format!(
                "{task}: output grid {:?} does not match the forward model's input {:?}",
                output.shape,
                operator.input_shape()
            )));
        }
        if output.shape.contains(&0) {
            return Err(Error::Shape(format!(
                "{task}: empty output grid {:?}",
                output.shape
            )));
        }
        if !output.voxel_size.iter().all(|v| v.is_finite() && *v > 0.0) {
            return Err(Error::Parameter(format!(
                "{task}: output voxel size {:?} must be positive",
                output.voxel_size
            )));
        }
        if let Some((i, _)) = measurement.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFinite(format!(
                "{task}: measurement holds a non-finite value at voxel {i:?}"
            )));
        }
        let measurement_mask = match measurement_mask {
            Some(m) if m.shape() != y_shape => {
                return Err(Error::Shape(format!(
                    "{task}: measurement mask has shape {:?}, measurement {y_shape:?}",
                    m.shape()
                )));
            }
            Some(m) => m,
            None => Array3::from_elem(y_shape, true),
        };
        let output_mask = match output_mask {
            Some(m) if m.shape() != output.shape => {
                return Err(Error::Shape(format!(
                    "{task}: output mask has shape {:?}, output grid {:?}",
                    m.shape(),
                    output.shape
                )));
            }
            Some(m) => m,
            None => Array3::from_elem(output.shape, true),
        };
        if !measurement_mask.iter().any(|&b| b) {
            return Err(Error::Parameter(format!(
                "{task}: the measurement mask is empty"
            )));
        }
        let fingerprint = fingerprint(task, &measurement, &measurement_mask, &output, &output_mask);
        Ok(Self {
            task,
            measurement,
            measurement_mask,
            operator,
            output,
            output_mask,
            initial: None,
            tv_consistency: None,
            fingerprint,
        })
    }

    /// Attaches the TV regulariser of the proximal data-consistency step
    /// ([`crate::diffusion::consistency::tv_proximal_consistency`]; only the
    /// `dipinv-physics` task, whose forward model is M_y ∘ D on one grid, can take it).
    /// Its α becomes part of the fingerprint. Errors on another task or a regulariser
    /// prepared for another grid.
    pub fn with_tv_consistency(mut self, tv: Arc<TvConsistency>) -> Result<Self> {
        if self.task != Task::DipinvPhysics {
            return Err(Error::Parameter(format!(
                "TV data consistency needs the dipinv-physics task, not {}",
                self.task
            )));
        }
        if tv.shape() != self.output.shape {
            return Err(Error::Shape(format!(
                "TV data consistency prepared for {:?}, output grid {:?}",
                tv.shape(),
                self.output.shape
            )));
        }
        self.fingerprint =
            mix64(self.fingerprint ^ 0x7476 ^ tv.alpha().to_bits()).wrapping_add(GAMMA);
        self.tv_consistency = Some(tv);
        Ok(self)
    }

    /// The TV regulariser of the proximal step, if one was attached.
    pub fn tv_consistency(&self) -> Option<&TvConsistency> {
        self.tv_consistency.as_deref()
    }

    /// Attaches the estimate a warm-started sampler begins from (χ in ppm on the output
    /// grid, multiplied by the output mask here; see [`InitialEstimate`]). It becomes
    /// part of the fingerprint. Errors on a shape other than the output grid's or a
    /// non-finite value.
    pub fn with_initial_estimate(mut self, estimate: Array3<f32>) -> Result<Self> {
        let task = self.task;
        if estimate.shape() != self.output.shape {
            return Err(Error::Shape(format!(
                "{task}: initial estimate has shape {:?}, output grid {:?}",
                estimate.shape(),
                self.output.shape
            )));
        }
        crate::volume::check_finite(estimate.view(), &format!("{task} initial estimate"))?;
        let mut estimate = estimate;
        Zip::from(&mut estimate)
            .and(&self.output_mask)
            .for_each(|v, &m| {
                if !m {
                    *v = 0.0;
                }
            });
        let mut h = self.fingerprint ^ 0x696e_6974;
        for v in estimate.iter() {
            h = mix64(h ^ v.to_bits() as u64).wrapping_add(GAMMA);
        }
        self.fingerprint = h;
        self.initial = Some(estimate);
        Ok(self)
    }

    /// The warm-start estimate (χ in ppm on the output grid), if one was attached.
    pub fn initial_estimate(&self) -> Option<&Array3<f32>> {
        self.initial.as_ref()
    }

    /// The task that produced this problem.
    pub fn task(&self) -> Task {
        self.task
    }
    /// y in ppm on the measurement grid.
    pub fn measurement(&self) -> &Array3<f32> {
        &self.measurement
    }
    /// Where y is trusted (restricts the DPS data term).
    pub fn measurement_mask(&self) -> &Array3<bool> {
        &self.measurement_mask
    }
    /// The forward model A (output grid → measurement grid).
    pub fn operator(&self) -> &dyn LinearOperator {
        self.operator.as_ref()
    }
    /// Geometry of the output χ map.
    pub fn output(&self) -> &OutputGrid {
        &self.output
    }
    /// Brain mask on the output grid (the output is multiplied by it).
    pub fn output_mask(&self) -> &Array3<bool> {
        &self.output_mask
    }
    /// A 64-bit hash of the task, y, masks and output geometry (not the operator), used to
    /// check that a checkpoint is restored against the same problem.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

fn fingerprint(
    task: Task,
    y: &Array3<f32>,
    y_mask: &Array3<bool>,
    out: &OutputGrid,
    out_mask: &Array3<bool>,
) -> u64 {
    let mut h = mix64(0x7461_736b ^ task as u64);
    let mut eat = |v: u64| h = mix64(h ^ v).wrapping_add(GAMMA);
    for &s in y.shape().iter().chain(out.shape.iter()) {
        eat(s as u64);
    }
    for v in out.voxel_size.iter().chain(out.affine.iter().flatten()) {
        eat(v.to_bits());
    }
    for v in y.iter() {
        eat(v.to_bits() as u64);
    }
    let (mut word, mut bits) = (0u64, 0u32);
    for &b in y_mask.iter().chain(out_mask.iter()) {
        word = (word << 1) | b as u64;
        bits += 1;
        if bits == 64 {
            eat(word);
            (word, bits) = (0, 0);
        }
    }
    eat(word ^ ((bits as u64) << 56));
    h
}

/// The downsampling model A of the super-resolution tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Downsampling {
    /// Centred k-space crop ([`KSpaceDownsample`]): the usual model of a lower-resolution
    /// acquisition (DM-QSM's default reading).
    #[default]
    Kspace,
    /// Block mean ([`BlockDownsample`]): the partial-volume model.
    Block,
}

impl FromStr for Downsampling {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "kspace" | "k-space" => Ok(Downsampling::Kspace),
            "block" => Ok(Downsampling::Block),
            other => Err(Error::Parameter(format!(
                "unknown downsampling {other:?}; expected \"kspace\" or \"block\""
            ))),
        }
    }
}

/// Output resolution of the super-resolution tasks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resolution {
    /// Integer factor per axis (output voxels per measurement voxel); `[1, 1, 1]` = none.
    Factor([usize; 3]),
    /// Target voxel size in mm; each measurement voxel size must be an integer multiple
    /// of it (within 0.1 %).
    VoxelSize([f64; 3]),
}

impl Default for Resolution {
    /// DM-QSM's evaluation: 2 mm³ inputs to 1 mm³ outputs, i.e. ×2 per axis.
    fn default() -> Self {
        Resolution::Factor([2, 2, 2])
    }
}

/// The classical estimate a warm-started sampler begins from (SDEdit, Meng et al. ICLR
/// 2022; Flow-QSM starts from an estimate at noise level 50 of 1000). For the dipole
/// tasks it is an inversion of the field on the measurement grid; the SR tasks refine it
/// to the output grid by k-space zero-fill (`sr`: the zero-fill of y itself).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum InitialEstimate {
    /// No estimate: the sampler can only start from pure noise.
    #[default]
    None,
    /// TKD with the task's threshold δ.
    Tkd,
    /// Weighted TV-ADMM ([`crate::inversion::tv`]) with the brain mask as weight and
    /// weight α; `None` picks α at the L-curve corner ([`crate::inversion::tv_lcurve`]).
    Tv {
        /// TV weight α; `None`: the L-curve's choice.
        alpha: Option<f64>,
    },
}

/// How to build a [`Problem`] from a measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskOptions {
    /// The task.
    pub task: Task,
    /// Output resolution (SR tasks only; ignored by `dipinv` and `dipinv-physics`).
    pub resolution: Resolution,
    /// Downsampling model of the SR tasks.
    pub downsampling: Downsampling,
    /// TKD threshold δ for `dipinv` / `sr-dipinv` (DM-QSM: 0.1).
    pub tkd_threshold: f64,
    /// B0 direction in voxel axes; `None` derives it from the measurement's affine.
    pub b0_dir: Option<[f64; 3]>,
    /// FFT padding of the dipole convolution in the physics tasks.
    #[serde(skip, default = "default_padding")]
    pub dipole_padding: Padding,
    /// The estimate a warm start begins from (none by default).
    #[serde(default)]
    pub initial_estimate: InitialEstimate,
    /// The TV term of the proximal data consistency (`dipinv-physics` only; none by
    /// default).
    #[serde(default)]
    pub consistency_tv: ConsistencyTv,
}

/// The TV term of the physics dipole task's proximal data-consistency step
/// ([`crate::diffusion::consistency::tv_proximal_consistency`]).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ConsistencyTv {
    /// The plain proximal step (CG on the data term).
    #[default]
    None,
    /// TV with α = `factor` × the reference α: the warm start's TV α when one is given
    /// ([`InitialEstimate::Tv`]), else the L-curve corner's
    /// ([`crate::inversion::tv_lcurve_default`]).
    Relative {
        /// Multiplier of the reference α (finite, > 0).
        factor: f64,
    },
}

impl ConsistencyTv {
    /// The factor of the default TV step: α = 0.1 × the warm start's TV α. Measured on
    /// validation phantoms 500–502 at prox weight 8: factors 0.015, 0.04 and 0.1 improve
    /// on the plain CG step in turn, 0.25 and 0.5 lose XSIM and HFEN to 0.1; at weight 16,
    /// 0.15 trades XSIM and HFEN for NRMSE against 0.1. The weight was then swept at 0.1
    /// ([`crate::diffusion::sampler::PROX_TV_XI`]).
    pub const DEFAULT_FACTOR: f64 = 0.1;

    /// The default of a run of `task` with `guidance`: the TV step at
    /// [`Self::DEFAULT_FACTOR`] for `dipinv-physics` with prox guidance (the only pair
    /// the step serves), otherwise none.
    pub fn default_for(task: Task, guidance: crate::diffusion::sampler::Guidance) -> Self {
        if task == Task::DipinvPhysics && guidance == crate::diffusion::sampler::Guidance::Prox {
            ConsistencyTv::Relative {
                factor: Self::DEFAULT_FACTOR,
            }
        } else {
            ConsistencyTv::None
        }
    }

    /// The factor, or `None` for the plain step.
    pub fn factor(self) -> Option<f64> {
        match self {
            ConsistencyTv::None => None,
            ConsistencyTv::Relative { factor } => Some(factor),
        }
    }
}

fn default_padding() -> Padding {
    Padding::Fast
}

impl TaskOptions {
    /// Defaults for `task`: ×2 SR by k-space crop, TKD δ = 0.1, B0 from the affine, dipole
    /// convolution padded to a fast FFT length.
    pub fn new(task: Task) -> Self {
        Self {
            task,
            resolution: Resolution::default(),
            downsampling: Downsampling::default(),
            tkd_threshold: DEFAULT_TKD_THRESHOLD,
            b0_dir: None,
            dipole_padding: default_padding(),
            initial_estimate: InitialEstimate::None,
            consistency_tv: ConsistencyTv::None,
        }
    }
}

/// Resolves the per-axis SR factors of `options` for a measurement of `voxel_size`.
pub fn sr_factors(options: &TaskOptions, voxel_size: [f64; 3]) -> Result<[usize; 3]> {
    if !options.task.is_super_resolution() {
        return Ok([1, 1, 1]);
    }
    match options.resolution {
        Resolution::Factor(f) if f.iter().all(|&v| (1..=16).contains(&v)) => Ok(f),
        Resolution::Factor(f) => Err(Error::Parameter(format!(
            "{}: SR factors {f:?} must be between 1 and 16",
            options.task
        ))),
        Resolution::VoxelSize(target) => {
            let mut f = [1; 3];
            for a in 0..3 {
                let r = voxel_size[a] / target[a];
                let n = r.round();
                if !(target[a].is_finite()
                    && target[a] > 0.0
                    && (1.0..=16.0).contains(&n)
                    && (r - n).abs() <= 1e-3 * n)
                {
                    return Err(Error::Parameter(format!(
                        "{}: target voxel size {:?} mm must divide the measurement voxel size {:?} mm by an integer (1–16) on every axis",
                        options.task, target, voxel_size
                    )));
                }
                f[a] = n as usize;
            }
            Ok(f)
        }
    }
}

/// The geometry of a grid refined by `factors`: voxel sizes divided, and the affine
/// adjusted so that each block of f high-res voxels is centred on its low-res voxel.
pub fn refined_grid(measurement: &Volume, factors: [usize; 3]) -> OutputGrid {
    let shape = std::array::from_fn(|a| measurement.shape()[a] * factors[a]);
    let voxel_size = std::array::from_fn(|a| measurement.voxel_size[a] / factors[a] as f64);
    let mut affine = measurement.affine;
    for (r, row) in affine.iter_mut().enumerate().take(3) {
        let src = measurement.affine[r];
        for c in 0..3 {
            let f = factors[c] as f64;
            row[c] = src[c] / f;
            row[3] += src[c] * (0.5 / f - 0.5);
        }
    }
    OutputGrid {
        shape,
        voxel_size,
        affine,
    }
}

/// Block replication of a mask to a grid refined by `factors`.
fn refine_mask(mask: &Array3<bool>, factors: [usize; 3]) -> Array3<bool> {
    let s = mask.shape();
    let shape = [s[0] * factors[0], s[1] * factors[1], s[2] * factors[2]];
    Array3::from_shape_fn(shape, |(i, j, k)| {
        mask[[i / factors[0], j / factors[1], k / factors[2]]]
    })
}

fn downsampler(
    kind: Downsampling,
    input: [usize; 3],
    factors: [usize; 3],
) -> Result<Box<dyn LinearOperator>> {
    Ok(match kind {
        Downsampling::Kspace => Box::new(KSpaceDownsample::new(input, factors)?),
        Downsampling::Block => Box::new(BlockDownsample::new(input, factors)?),
    })
}

/// Builds the [`Problem`] of `options.task` from a measurement (local field in ppm, or
/// low-res χ in ppm for `sr`) and an optional brain mask on the measurement grid
/// (voxels > 0.5 are inside).
///
/// - `dipinv`: y = TKD(field, δ), A = I, output on the field's grid.
/// - `sr`: y = χ_lr, A = downsample(f), output on the grid refined by f.
/// - `sr-dipinv`: y = TKD(field_lr, δ) at low resolution, A = downsample(f).
/// - `dipinv-physics`: y = field, A = M ∘ D (dipole convolution with the measurement's
///   voxel size and B0 direction, oblique and anisotropic allowed).
/// - `sr-dipinv-physics`: y = field_lr, A = downsample ∘ M_hr ∘ D_hr on the refined grid.
///
/// The measurement mask restricts the DPS residual; its refinement masks the output.
/// Errors name the problem: shapes, non-finite values, geometry, factors.
pub fn prepare(
    options: &TaskOptions,
    measurement: &Volume,
    mask: Option<&Volume>,
) -> Result<Problem> {
    let task = options.task;
    let what = format!("{task} measurement");
    measurement.check_geometry(&what)?;
    measurement.check_finite(&what)?;
    let lr_mask = match mask {
        Some(m) => {
            if m.shape() != measurement.shape() {
                return Err(Error::Shape(format!(
                    "{task}: mask has shape {:?} but the measurement has {:?}",
                    m.shape(),
                    measurement.shape()
                )));
            }
            m.check_finite(&format!("{task} mask"))?;
            Some(m.data.mapv(|v| v > 0.5))
        }
        None => None,
    };
    let b0 = match options.b0_dir {
        Some(d) => B0Direction::new(d)?,
        None => B0Direction::from_volume(measurement)?,
    };
    let factors = sr_factors(options, measurement.voxel_size)?;
    let lr_shape = measurement.shape();
    let tkd = |field: &Volume| -> Result<Array3<f32>> {
        let mut chi = tkd_with(
            field,
            b0,
            &TkdOptions {
                threshold: options.tkd_threshold,
                ..TkdOptions::default()
            },
        )?
        .data;
        if let Some(m) = &lr_mask {
            Zip::from(&mut chi).and(m).for_each(|c, &m| {
                if !m {
                    *c = 0.0;
                }
            });
        }
        Ok(chi)
    };
    let same_grid = OutputGrid {
        shape: lr_shape,
        voxel_size: measurement.voxel_size,
        affine: measurement.affine,
    };
    let (y, operator, output, out_mask): (
        Array3<f32>,
        Arc<dyn LinearOperator>,
        OutputGrid,
        Option<Array3<bool>>,
    ) = match task {
        Task::Dipinv => (
            tkd(measurement)?,
            Arc::new(Identity::new(lr_shape)),
            same_grid,
            lr_mask.clone(),
        ),
        Task::Sr | Task::SrDipinv => {
            let y = if task == Task::Sr {
                measurement.data.clone()
            } else {
                tkd(measurement)?
            };
            let out = refined_grid(measurement, factors);
            let a = downsampler(options.downsampling, out.shape, factors)?;
            let m = lr_mask.as_ref().map(|m| refine_mask(m, factors));
            (y, Arc::new(a), out, m)
        }
        Task::DipinvPhysics => {
            let d = DipoleConvolution::new(
                lr_shape,
                measurement.voxel_size,
                b0,
                options.dipole_padding,
            )?;
            let a: Arc<dyn LinearOperator> = match &lr_mask {
                Some(m) => Arc::new(Compose::new(vec![
                    Box::new(d),
                    Box::new(Mask::from_bool(m)?),
                ])?),
                None => Arc::new(d),
            };
            (measurement.data.clone(), a, same_grid, lr_mask.clone())
        }
        Task::SrDipinvPhysics => {
            let out = refined_grid(measurement, factors);
            let d = DipoleConvolution::new(out.shape, out.voxel_size, b0, options.dipole_padding)?;
            let hr_mask = lr_mask.as_ref().map(|m| refine_mask(m, factors));
            let mut stages: Vec<Box<dyn LinearOperator>> = vec![Box::new(d)];
            if let Some(m) = &hr_mask {
                stages.push(Box::new(Mask::from_bool(m)?));
            }
            stages.push(downsampler(options.downsampling, out.shape, factors)?);
            (
                measurement.data.clone(),
                Arc::new(Compose::new(stages)?),
                out,
                hr_mask,
            )
        }
    };
    let mut problem = Problem::new(task, y, lr_mask.clone(), operator, output, out_mask)?;
    let weight = lr_mask
        .as_ref()
        .map(|m| m.mapv(|b| if b { 1.0f32 } else { 0.0 }));
    let w = weight.as_ref().map(|w| w.view());
    // The L-curve, computed at most once: the warm start and the TV consistency share it.
    let mut lcurve = None;
    let corner = |lcurve: &mut Option<LCurve>| -> Result<LCurvePoint> {
        let curve = match lcurve.take() {
            Some(c) => c,
            None => tv_lcurve_default(measurement, w, b0)?,
        };
        let best = curve.best().clone();
        *lcurve = Some(curve);
        Ok(best)
    };
    if let ConsistencyTv::Relative { factor } = options.consistency_tv {
        if task != Task::DipinvPhysics {
            return Err(Error::Parameter(format!(
                "TV data consistency applies to dipinv-physics only, not {task}"
            )));
        }
        if !(factor.is_finite() && factor > 0.0) {
            return Err(Error::Parameter(format!(
                "the TV consistency factor must be finite and positive, got {factor}"
            )));
        }
        let reference = match options.initial_estimate {
            InitialEstimate::Tv { alpha: Some(a) } => a,
            _ => corner(&mut lcurve)?.report.alpha,
        };
        let tv = TvConsistency::new(
            measurement,
            w,
            b0,
            options.dipole_padding,
            factor * reference,
        )?;
        problem = problem.with_tv_consistency(Arc::new(tv))?;
    }
    let estimate = match options.initial_estimate {
        InitialEstimate::None => return Ok(problem),
        InitialEstimate::Tkd if task.measures_field() => tkd(measurement)?,
        InitialEstimate::Tv { alpha } if task.measures_field() => {
            let chi = match alpha {
                Some(alpha) => {
                    let params = TvParams {
                        alpha,
                        ..TvParams::default()
                    };
                    tv(measurement, w, b0, &params)?.0
                }
                None => corner(&mut lcurve)?.chi,
            };
            chi.data
        }
        // `sr` measures χ itself.
        InitialEstimate::Tkd | InitialEstimate::Tv { .. } => measurement.data.clone(),
    };
    let estimate = if task.is_super_resolution() {
        KSpaceDownsample::new(problem.output().shape, factors)?.upsample(&estimate)?
    } else {
        estimate
    };
    problem.with_initial_estimate(estimate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::analytic::GaussianPriorModel;
    use crate::diffusion::sampler::{Guidance, SamplerSettings, dps_gradient};
    use crate::diffusion::schedule::ScheduleConfig;
    use crate::operators::adjoint_mismatch;
    use crate::patch::GridSpacing;
    use crate::simulate::standard_normal;

    fn ball_mask(shape: [usize; 3]) -> Array3<f32> {
        let c = shape.map(|n| (n as f64 - 1.0) / 2.0);
        let r = shape.iter().copied().min().unwrap() as f64 * 0.4;
        Array3::from_shape_fn(shape, |(i, j, k)| {
            let d =
                ((i as f64 - c[0]).powi(2) + (j as f64 - c[1]).powi(2) + (k as f64 - c[2]).powi(2))
                    .sqrt();
            if d < r { 1.0 } else { 0.0 }
        })
    }

    #[test]
    fn task_names_round_trip_and_defaults_follow_dm_qsm() {
        for t in Task::ALL {
            assert_eq!(t.name().parse::<Task>().unwrap(), t);
        }
        assert!("dipole".parse::<Task>().is_err());
        assert_eq!(Task::Dipinv.default_xi(), 0.5);
        assert_eq!(Task::Sr.default_xi(), 2.0);
        assert_eq!(
            "block".parse::<Downsampling>().unwrap(),
            Downsampling::Block
        );
    }

    #[test]
    fn dipinv_problem_is_masked_tkd_with_identity() {
        let shape = [12, 10, 8];
        let field = Volume::new(
            standard_normal(shape, 3).mapv(|v| 0.01 * v),
            [1.0, 1.0, 1.2],
        );
        let mask = Volume::new(ball_mask(shape), field.voxel_size);
        let p = prepare(&TaskOptions::new(Task::Dipinv), &field, Some(&mask)).unwrap();
        let want = tkd_with(&field, B0Direction::AXIAL, &TkdOptions::default()).unwrap();
        for ((&y, &t), &m) in p
            .measurement()
            .iter()
            .zip(want.data.iter())
            .zip(mask.data.iter())
        {
            assert_eq!(y, if m > 0.5 { t } else { 0.0 });
        }
        assert_eq!(p.output().shape, shape);
        assert_eq!(p.output().affine, field.affine);
        let x = standard_normal(shape, 4);
        assert_eq!(p.operator().apply(&x).unwrap(), x);
        assert_eq!(p.output_mask(), &mask.data.mapv(|v| v > 0.5));
    }

    #[test]
    fn sr_grid_centres_each_block_on_its_low_res_voxel() {
        // An oblique, anisotropic low-res affine: the centre of the f-block of high-res
        // voxels must map to the low-res voxel centre (1e-12 mm, f64 round-off).
        let aff = [
            [1.8, 0.3, 0.1, -90.0],
            [-0.2, 1.9, 0.4, -100.0],
            [0.1, -0.5, 2.9, -60.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let vs = crate::volume::voxel_size_from_affine(&aff);
        let lr = Volume::with_affine(Array3::zeros([4, 5, 3]), vs, aff);
        let f = [2, 3, 2];
        let g = refined_grid(&lr, f);
        assert_eq!(g.shape, [8, 15, 6]);
        let map = |a: &[[f64; 4]; 4], p: [f64; 3]| -> [f64; 3] {
            std::array::from_fn(|r| a[r][0] * p[0] + a[r][1] * p[1] + a[r][2] * p[2] + a[r][3])
        };
        for idx in [[0usize, 0, 0], [3, 4, 2], [1, 2, 1]] {
            let centre: [f64; 3] =
                std::array::from_fn(|a| (f[a] * idx[a]) as f64 + (f[a] as f64 - 1.0) / 2.0);
            let hr = map(&g.affine, centre);
            let lo = map(&aff, idx.map(|v| v as f64));
            assert!(
                hr.iter().zip(lo).all(|(a, b)| (a - b).abs() < 1e-12),
                "{idx:?}"
            );
        }
        let mut o = TaskOptions::new(Task::Sr);
        o.resolution = Resolution::VoxelSize([vs[0] / 2.0, vs[1] / 3.0, vs[2]]);
        assert_eq!(sr_factors(&o, vs).unwrap(), [2, 3, 1]);
        o.resolution = Resolution::VoxelSize([vs[0] / 2.5, vs[1], vs[2]]);
        assert!(matches!(sr_factors(&o, vs), Err(Error::Parameter(_))));
        assert_eq!(
            sr_factors(&TaskOptions::new(Task::Dipinv), vs).unwrap(),
            [1, 1, 1]
        );
    }

    #[test]
    fn sr_problems_downsample_the_refined_grid() {
        let lr = Volume::new(
            standard_normal([6, 4, 5], 8).mapv(|v| 0.05 * v),
            [2.0, 2.0, 2.0],
        );
        let mask = Volume::new(ball_mask([6, 4, 5]), lr.voxel_size);
        for (task, ds) in [
            (Task::Sr, Downsampling::Kspace),
            (Task::SrDipinv, Downsampling::Block),
        ] {
            let mut o = TaskOptions::new(task);
            o.downsampling = ds;
            let p = prepare(&o, &lr, Some(&mask)).unwrap();
            assert_eq!(p.output().shape, [12, 8, 10]);
            assert_eq!(p.output().voxel_size, [1.0; 3]);
            assert_eq!(p.operator().input_shape(), [12, 8, 10]);
            assert_eq!(p.operator().output_shape(), [6, 4, 5]);
            assert_eq!(p.output_mask()[[5, 3, 4]], mask.data[[2, 1, 2]] > 0.5);
            // A constant high-res map downsamples to the same constant (both models).
            let c = p
                .operator()
                .apply(&Array3::from_elem([12, 8, 10], 0.25))
                .unwrap();
            assert!(c.iter().all(|v| (v - 0.25).abs() < 1e-6));
        }
        let p = prepare(&TaskOptions::new(Task::Sr), &lr, None).unwrap();
        assert_eq!(p.measurement(), &lr.data);
    }

    #[test]
    fn physics_operators_are_consistent_adjoint_and_zero_at_the_truth() {
        // Oblique B0 and anisotropic voxels. A is built from the same operators, so the
        // residual of the truth is zero up to f32 FFT round-off (1e-5 of ‖y‖); adjointness
        // to 1e-5 (operators' own bound).
        let b0 = [0.2, -0.1, 0.97];
        let hr_vs = [1.0, 1.0, 1.5];
        let hr = [12, 10, 8];
        let chi = standard_normal(hr, 21).mapv(|v| 0.05 * v);
        let hr_mask = ball_mask(hr).mapv(|v| v > 0.5);
        let d = DipoleConvolution::new(hr, hr_vs, B0Direction::new(b0).unwrap(), Padding::Fast)
            .unwrap();
        let field_hr = d.apply(&chi).unwrap();

        let mut o = TaskOptions::new(Task::DipinvPhysics);
        o.b0_dir = Some(b0);
        let meas = Volume::new(field_hr.clone(), hr_vs);
        let mask = Volume::new(hr_mask.mapv(|b| b as u8 as f32), hr_vs);
        let p = prepare(&o, &meas, Some(&mask)).unwrap();
        assert!(adjoint_mismatch(p.operator(), 5).unwrap() < 1e-5);
        let (_, r) = dps_gradient(&p, &p.measurement().clone(), &chi).unwrap();
        let yn = p
            .measurement()
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(r < 1e-5 * yn, "residual {r} vs ‖y‖ {yn}");

        // SR-DipInv-physics: y = downsample(M ∘ D χ) at 2× coarser voxels.
        let mut o = TaskOptions::new(Task::SrDipinvPhysics);
        o.b0_dir = Some(b0);
        o.downsampling = Downsampling::Block;
        let ds = BlockDownsample::new(hr, [2, 2, 2]).unwrap();
        let lr_mask = Array3::from_shape_fn([6, 5, 4], |(i, j, k)| hr_mask[[2 * i, 2 * j, 2 * k]]);
        let hr_masked_mask = refine_mask(&lr_mask, [2, 2, 2]);
        let field_lr = ds
            .apply(
                &Zip::from(&field_hr)
                    .and(&hr_masked_mask)
                    .map_collect(|&f, &m| if m { f } else { 0.0 }),
            )
            .unwrap();
        let meas = Volume::new(field_lr, [2.0, 2.0, 3.0]);
        let mask = Volume::new(lr_mask.mapv(|b| b as u8 as f32), meas.voxel_size);
        let p = prepare(&o, &meas, Some(&mask)).unwrap();
        assert_eq!(p.output().voxel_size, hr_vs);
        assert!(adjoint_mismatch(p.operator(), 6).unwrap() < 1e-5);
        let (_, r) = dps_gradient(&p, &p.measurement().mapv(|v| v), &chi).unwrap();
        // The measurement mask zeroes y outside; compare against the masked measurement.
        let yn = p
            .measurement()
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            r < 1e-5 * yn.max(1e-12) || yn == 0.0,
            "residual {r} vs ‖y‖ {yn}"
        );
    }

    #[test]
    fn dps_gradient_matches_finite_differences_through_a_physics_operator() {
        // L(x) = ‖M(y − A x)‖ with A = block-downsample ∘ mask ∘ dipole: central
        // differences (h = 1e-3 on O(0.1) values, f64 sums of f32 operators) agree with
        // −Aᵀr/‖r‖ to 1e-3 relative.
        let lr = Volume::new(
            standard_normal([6, 5, 4], 2).mapv(|v| 0.02 * v),
            [2.0, 2.0, 2.0],
        );
        let mut o = TaskOptions::new(Task::SrDipinvPhysics);
        o.b0_dir = Some([0.3, 0.0, 0.95]);
        o.downsampling = Downsampling::Block;
        let mask = Volume::new(ball_mask([6, 5, 4]), lr.voxel_size);
        let p = prepare(&o, &lr, Some(&mask)).unwrap();
        let y = p.measurement().clone();
        let x = standard_normal(p.output().shape, 3).mapv(|v| 0.1 * v);
        let d = standard_normal(p.output().shape, 4);
        let (g, _) = dps_gradient(&p, &y, &x).unwrap();
        let l = |x: &Array3<f32>| dps_gradient(&p, &y, x).unwrap().1;
        let h = 1e-3f32;
        let fd = (l(&(&x + &d.mapv(|v| v * h))) - l(&(&x - &d.mapv(|v| v * h)))) / (2.0 * h as f64);
        let an: f64 = g
            .iter()
            .zip(d.iter())
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        assert!(
            (fd - an).abs() < 1e-3 * an.abs().max(1e-9),
            "FD {fd} vs analytic {an}"
        );
    }

    #[test]
    fn bad_inputs_are_named_errors() {
        let shape = [8, 8, 8];
        let mut data = standard_normal(shape, 1);
        let field = Volume::new(data.clone(), [1.0; 3]);
        let wrong = Volume::new(Array3::zeros([8, 8, 7]), [1.0; 3]);
        let o = TaskOptions::new(Task::Dipinv);
        assert!(matches!(
            prepare(&o, &field, Some(&wrong)),
            Err(Error::Shape(_))
        ));
        data[[1, 2, 3]] = f32::NAN;
        let bad = Volume::new(data, [1.0; 3]);
        assert!(matches!(prepare(&o, &bad, None), Err(Error::NonFinite(_))));
        let mut o2 = TaskOptions::new(Task::Dipinv);
        o2.tkd_threshold = 0.0;
        assert!(prepare(&o2, &field, None).is_err());
        let empty = Volume::new(Array3::zeros(shape), [1.0; 3]);
        assert!(matches!(
            prepare(&o, &field, Some(&empty)),
            Err(Error::Parameter(_))
        ));
        let mut o3 = TaskOptions::new(Task::Sr);
        o3.resolution = Resolution::Factor([0, 2, 2]);
        assert!(prepare(&o3, &field, None).is_err());
    }

    #[test]
    fn dipinv_physics_runs_end_to_end_with_the_analytic_model() {
        // Smoke test of the whole path: prepare → sampler (exact guidance) → masked ppm.
        let shape = [14, 12, 10];
        let field = Volume::new(
            standard_normal(shape, 9).mapv(|v| 0.01 * v),
            [1.0, 1.0, 1.3],
        );
        let mask = Volume::new(ball_mask(shape), field.voxel_size);
        let p =
            Arc::new(prepare(&TaskOptions::new(Task::DipinvPhysics), &field, Some(&mask)).unwrap());
        let model = GaussianPriorModel::new(0.0, 1.0, 8, 10.0, ScheduleConfig::default()).unwrap();
        let st = SamplerSettings {
            steps: 6,
            guidance: Guidance::Exact,
            spacing: GridSpacing::Overlap(2),
            ..SamplerSettings::default()
        };
        let rec = crate::driver::sample(&model, p, &st, 16).unwrap();
        assert_eq!(rec.chi.shape(), shape);
        assert!(rec.chi.data.iter().all(|v| v.is_finite()));
        for (&v, &m) in rec.chi.data.iter().zip(mask.data.iter()) {
            if m < 0.5 {
                assert_eq!(v, 0.0);
            }
        }
        assert!(rec.residual_ppm.unwrap().is_finite());
    }

    /// `ConsistencyTv::Relative` attaches the TV step with α = factor × the reference:
    /// the warm start's given α, else the L-curve corner's (the same curve the warm start
    /// uses); it changes the fingerprint, is refused for other tasks and bad factors, and
    /// a prox run with it ends finite and masked.
    #[test]
    fn tv_consistency_takes_its_alpha_from_the_warm_start() {
        let shape = [16, 14, 12];
        let field = Volume::new(standard_normal(shape, 4).mapv(|v| 0.01 * v), [1.0; 3]);
        let mask = Volume::new(ball_mask(shape), field.voxel_size);
        let mut o = TaskOptions::new(Task::DipinvPhysics);
        o.initial_estimate = InitialEstimate::Tv { alpha: Some(1e-3) };
        let plain = prepare(&o, &field, Some(&mask)).unwrap();
        assert!(plain.tv_consistency().is_none());
        o.consistency_tv = ConsistencyTv::Relative { factor: 0.5 };
        let p = prepare(&o, &field, Some(&mask)).unwrap();
        assert_eq!(p.tv_consistency().map(|t| t.alpha()), Some(5e-4));
        assert_ne!(p.fingerprint(), plain.fingerprint());
        o.initial_estimate = InitialEstimate::Tv { alpha: None };
        let p = prepare(&o, &field, Some(&mask)).unwrap();
        let w = mask.data.view();
        let corner = tv_lcurve_default(&field, Some(w), B0Direction::AXIAL)
            .unwrap()
            .best()
            .report
            .alpha;
        assert_eq!(p.tv_consistency().map(|t| t.alpha()), Some(0.5 * corner));
        let model = GaussianPriorModel::new(0.0, 1.0, 8, 10.0, ScheduleConfig::default()).unwrap();
        let st = SamplerSettings {
            steps: 4,
            guidance: Guidance::Prox,
            xi: Some(8.0),
            spacing: GridSpacing::Overlap(2),
            start_timestep: Some(50),
            ..SamplerSettings::default()
        };
        let rec = crate::driver::sample(&model, Arc::new(p), &st, 16).unwrap();
        assert!(rec.chi.data.iter().all(|v| v.is_finite()));
        for (&v, &m) in rec.chi.data.iter().zip(mask.data.iter()) {
            if m < 0.5 {
                assert_eq!(v, 0.0);
            }
        }
        o.consistency_tv = ConsistencyTv::Relative { factor: 0.0 };
        assert!(prepare(&o, &field, Some(&mask)).is_err());
        let mut sr = TaskOptions::new(Task::Sr);
        sr.consistency_tv = ConsistencyTv::Relative { factor: 0.5 };
        let err = prepare(&sr, &field, Some(&mask)).unwrap_err().to_string();
        assert!(err.contains("dipinv-physics"), "{err}");
    }
}
