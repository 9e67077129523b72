//! Admission control: a job's peak memory estimated from its NIfTI headers alone
//! ([`MemoryEstimate`]), and the coordinator's memory budget ([`Admission`]) that refuses
//! a job larger than the budget and caps the total held by queued and running jobs.
//!
//! Every quantity here is in **bytes** (decimal GB only in messages).
//!
//! ## What the estimate counts
//!
//! With N_in the voxels of the measurement grid, N_out = N_in · f₀f₁f₂ those of the
//! output grid (the SR factors f), N_pad those of the output grid padded to whole
//! patches (`PatchGrid` of the model's patch size P and the job's overlap),
//! R = patches · P³ the voxels of all patches of one round, and G the voxels of the FFT
//! grid (`fft::fast_shape`) of the grid the dipole lives on (the measurement grid; the
//! output grid for `sr-dipinv-physics`), the job holds at its peak the largest of three
//! phases, each plus [`MemoryEstimate::uploads`] (the compressed input files, held twice:
//! the request and the stored copy), and [`MemoryEstimate::peak`] adds
//! [`HEADROOM_PERCENT`] to that:
//!
//! - **decode** (per input, the measurement kept while the mask decodes): the raw voxel
//!   data (bytes per voxel of the file's datatype), its f64 conversion (8) and the f32
//!   volume (4): N_in · (b + 12) per input, plus 4 · N_in for the measurement held;
//! - **prepare**: the decoded inputs (4 · N_in each), the problem (below), and for a warm
//!   start or the TV data consistency the TV solver: [`TV_BYTES_PER_FFT_VOXEL`] · G plus the L-curve's solutions
//!   (10 · 4 · N_in without a fixed α, 4 · N_in with one); TKD inputs add 16 · G;
//! - **sample**: the problem, the sampler (state 4 · N_pad, y in model units 4 · N_in, the
//!   step's accumulators and intermediates [`STEP_BYTES_PER_PADDED_VOXEL`] · N_pad), one
//!   round's patches three times (the batches sent, the answers received, the answers
//!   decoded: 12 · R), prox guidance's conjugate gradients (24 · N_out + 8 · G) or its TV
//!   step ((TV + [`TV_ANCHOR_BYTES_PER_FFT_VOXEL`]) · G + 12 · N_out), exact
//!   guidance's pending step and cotangents (16 · N_pad + 8 · R), and the samples: every
//!   finished one kept (4 · N_out each, twice when stored for a multi-sample job) and the
//!   result files (mean, std, NIfTI encodings: 24 · N_out).
//!
//! The problem is y (4 · N_in), the measurement mask (1 · N_in), the output mask
//! (1 · N_out), a warm start's initial estimate (4 · N_out) and the dipole kernel's half
//! spectrum (2 · G).
//!
//! The model is a deliberate upper bound of the arrays the code allocates (counted from
//! `dmqsm_common::tasks::prepare`, `inversion::tv`, `diffusion::sampler` and
//! `crate::runner`); allocator slack and small per-patch bookkeeping are not counted.

use crate::error::{CoordinatorError, Result};
use crate::job::JobSpec;
use dmqsm_common::diffusion::model::ModelSpec;
use dmqsm_common::diffusion::sampler::Guidance;
use dmqsm_common::fft::fast_shape;
use dmqsm_common::nifti_io::{VolumeHeader, read_nifti_header_bytes};
use dmqsm_common::patch::{GridSpacing, PatchGrid};
use dmqsm_common::tasks::Task;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// The command-line flag that sets the budget (named in refusals).
pub const BUDGET_FLAG: &str = "--memory-budget-gb";
/// Bytes of TV-ADMM state per voxel of its FFT grid: 18 f32 arrays on the grid (φ, W²,
/// z₁ ×3, s₁ ×3, z₂, s₂, χ, Dχ, the next χ, ∇χ ×3, the shrink factor, z₂ − s₂) and
/// 20 bytes of half-spectrum arrays (D, 1/den, the right-hand side, one FFT, D·rhs).
pub const TV_BYTES_PER_FFT_VOXEL: u64 = 18 * 4 + 20;
/// Extra bytes per FFT voxel of an anchored TV run (the sampler's TV data consistency):
/// the padded anchor (4) and β·F(χₐ) on the half spectrum (4).
pub const TV_ANCHOR_BYTES_PER_FFT_VOXEL: u64 = 8;
/// Bytes per padded voxel of one diffusion step besides the state: the f64 overlap sum
/// (8), its normalisation, ε̂, x̂₀, the next state and the guidance gradient (5 × 4).
pub const STEP_BYTES_PER_PADDED_VOXEL: u64 = 8 + 5 * 4;
/// Fraction of the machine's memory the default budget takes (the rest is left to the
/// coordinator's own store cache, the OS and whatever shares the machine).
pub const DEFAULT_BUDGET_FRACTION: f64 = 0.75;
/// Headroom added to the largest phase, in percent: allocator slack (per-thread arenas,
/// fragmentation) and short-lived copies the phase model leaves out. Measured
/// (`the_estimate_bounds_a_real_jobs_peak` in `tests/tests/admission.rs`, 80³
/// dipinv-physics, prox, TV warm start): the peak resident memory of coordinator and an
/// in-process worker together grew by 0.085–0.105 GB between runs, against 0.091 GB
/// modelled for the coordinator alone plus 0.048 GB for the worker's copies of a round.
pub const HEADROOM_PERCENT: u64 = 25;
/// The budget when the machine's memory cannot be read (8 GiB).
pub const FALLBACK_BUDGET_BYTES: u64 = 8 << 30;

/// A job's estimated peak memory, in bytes, by phase (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Voxels of the measurement grid (N_in).
    pub input_voxels: u64,
    /// Voxels of the output grid (N_out).
    pub output_voxels: u64,
    /// Voxels of the output grid padded to whole patches (N_pad).
    pub padded_voxels: u64,
    /// Voxels of all patches of one round (R).
    pub round_voxels: u64,
    /// Voxels of the FFT grid of the dipole (G; 0 for `sr`).
    pub fft_voxels: u64,
    /// Bytes of the compressed uploads, held twice (request and stored copy).
    pub uploads: u64,
    /// Bytes held while decoding the inputs.
    pub decode: u64,
    /// Bytes held while preparing the problem (TKD, warm-start TV).
    pub prepare: u64,
    /// Bytes held while sampling (problem, sampler, one round, samples and results).
    pub sample: u64,
}

impl MemoryEstimate {
    /// The estimated peak in bytes: the largest phase plus the uploads, plus
    /// [`HEADROOM_PERCENT`] of that.
    pub fn peak(&self) -> u64 {
        let base = self
            .uploads
            .saturating_add(self.decode.max(self.prepare).max(self.sample));
        // ⌊base · (100 + H) / 100⌋ without overflow.
        base.saturating_add(base / 100 * HEADROOM_PERCENT + base % 100 * HEADROOM_PERCENT / 100)
    }

    /// The phase that sets the peak (`decode`, `prepare` or `sample`).
    pub fn peak_phase(&self) -> &'static str {
        if self.decode >= self.prepare && self.decode >= self.sample {
            "decode"
        } else if self.prepare >= self.sample {
            "prepare"
        } else {
            "sample"
        }
    }

    /// Estimates a job from its settings, its model and its input headers. `uploads` is
    /// the byte length of the input files as received. Errors (naming the setting) when
    /// the patch grid cannot be built, e.g. an overlap not below the patch size.
    pub fn new(
        spec: &JobSpec,
        model: &ModelSpec,
        measurement: &VolumeHeader,
        mask: Option<&VolumeHeader>,
        uploads: u64,
    ) -> Result<Self> {
        crate::problem::check_overlap(spec, model)?;
        let in_shape = measurement.shape;
        let factors = if spec.task.is_super_resolution() {
            spec.factor
        } else {
            [1, 1, 1]
        };
        let out_shape: [usize; 3] =
            std::array::from_fn(|a| in_shape[a].saturating_mul(factors[a] as usize));
        let n_in = measurement.voxels();
        let n_out = voxels(out_shape);
        let grid = PatchGrid::new(
            out_shape,
            model.patch_size,
            GridSpacing::Overlap(spec.overlap as usize),
        )
        .map_err(|e| {
            CoordinatorError::InvalidSubmission(format!(
                "settings.overlap {} with the model's patch size {}: {e}",
                spec.overlap, model.patch_size
            ))
        })?;
        let n_pad = voxels(grid.padded_shape());
        let p = model.patch_size as u64;
        let round = (grid.len() as u64).saturating_mul(p * p * p);
        let fft = match spec.task {
            Task::Sr => 0,
            Task::SrDipinvPhysics => voxels(fast_shape(out_shape)),
            Task::Dipinv | Task::SrDipinv | Task::DipinvPhysics => voxels(fast_shape(in_shape)),
        };

        let mul = |a: u64, b: u64| a.saturating_mul(b);
        let warm = spec.start_timestep.is_some() && spec.task.measures_field();
        // Decode: the measurement, then the mask with the measurement held.
        let decode_one = |h: &VolumeHeader| mul(h.voxels(), h.bytes_per_voxel + 12);
        let decode = match mask {
            None => decode_one(measurement),
            Some(k) => decode_one(measurement).max(mul(n_in, 4).saturating_add(decode_one(k))),
        };
        let inputs_f32 = mul(n_in, 4 * (1 + mask.is_some() as u64));
        let problem = mul(n_in, 4 + 1)
            .saturating_add(n_out)
            .saturating_add(if warm { mul(n_out, 4) } else { 0 })
            .saturating_add(mul(fft, 2));
        let tkd = match spec.task {
            Task::Dipinv | Task::SrDipinv => mul(fft, 16),
            _ => 0,
        };
        let tv = if warm || spec.prox_tv.is_some() {
            let kept = if spec.tv_alpha.is_some() { 1 } else { 10 };
            mul(fft, TV_BYTES_PER_FFT_VOXEL).saturating_add(mul(n_in, 4 * kept))
        } else {
            0
        };
        let prepare = inputs_f32
            .saturating_add(problem)
            .saturating_add(tkd.max(tv));
        let guidance = match spec.guidance {
            // The TV step: the solver kept in the problem and one anchored run, plus the
            // anchor and the result on the output grid; else the CG vectors.
            Guidance::Prox if spec.prox_tv.is_some() => {
                mul(fft, TV_BYTES_PER_FFT_VOXEL + TV_ANCHOR_BYTES_PER_FFT_VOXEL)
                    .saturating_add(mul(n_out, 12))
            }
            Guidance::Prox => mul(n_out, 24).saturating_add(mul(fft, 8)),
            Guidance::Exact => mul(n_pad, 16).saturating_add(mul(round, 8)),
            Guidance::Approx => mul(n_out, 8).saturating_add(mul(fft, 8)),
            Guidance::None => 0,
        };
        let samples = spec.samples.max(1) as u64;
        let kept = mul(mul(n_out, 4), samples * if samples > 1 { 2 } else { 1 });
        let sample = problem
            .saturating_add(mul(n_pad, 4 + STEP_BYTES_PER_PADDED_VOXEL))
            .saturating_add(mul(n_in, 4))
            .saturating_add(mul(round, 12))
            .saturating_add(guidance)
            .saturating_add(kept)
            .saturating_add(mul(n_out, 24));
        Ok(Self {
            input_voxels: n_in,
            output_voxels: n_out,
            padded_voxels: n_pad,
            round_voxels: round,
            fft_voxels: fft,
            uploads: mul(uploads, 2),
            decode,
            prepare,
            sample,
        })
    }

    /// Estimates a job from its input files' bytes, reading only their headers.
    pub fn from_inputs(
        spec: &JobSpec,
        model: &ModelSpec,
        measurement: &[u8],
        mask: Option<&[u8]>,
    ) -> Result<Self> {
        let bad = |what: &str, e: dmqsm_common::Error| {
            CoordinatorError::InvalidSubmission(format!("{what}: {e}"))
        };
        let m = read_nifti_header_bytes(measurement).map_err(|e| bad("measurement", e))?;
        let k = mask
            .map(read_nifti_header_bytes)
            .transpose()
            .map_err(|e| bad("mask", e))?;
        if let Some(k) = &k {
            if k.shape != m.shape {
                return Err(CoordinatorError::InvalidSubmission(format!(
                    "mask has shape {:?} but the measurement has {:?}",
                    k.shape, m.shape
                )));
            }
            crate::problem::check_mask_affine(&m.affine, &k.affine)?;
        }
        let uploads = (measurement.len() + mask.map_or(0, <[u8]>::len)) as u64;
        Self::new(spec, model, &m, k.as_ref(), uploads)
    }

    /// One line for messages: the peak, its phase and the grids behind it.
    pub fn describe(&self) -> String {
        format!(
            "{} at its peak ({} phase; {} input voxels, {} output voxels, {} padded voxels, \
             {} patch voxels per round)",
            gb(self.peak()),
            self.peak_phase(),
            self.input_voxels,
            self.output_voxels,
            self.padded_voxels,
            self.round_voxels
        )
    }
}

fn voxels(shape: [usize; 3]) -> u64 {
    shape
        .iter()
        .fold(1u64, |acc, &n| acc.saturating_mul(n as u64))
}

/// Bytes as decimal gigabytes with two decimals (`"1.50 GB"`).
pub fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// The default budget: [`DEFAULT_BUDGET_FRACTION`] of the machine's memory, the smaller
/// of `MemTotal` in `/proc/meminfo` and the cgroup's limit (v2 `memory.max`, v1
/// `memory.limit_in_bytes`) when one is set; [`FALLBACK_BUDGET_BYTES`] when neither can
/// be read.
pub fn default_budget_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| parse_meminfo_total(&s));
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .find_map(|s| parse_cgroup_limit(&s));
    match machine_memory(meminfo, cgroup) {
        Some(m) => (m as f64 * DEFAULT_BUDGET_FRACTION) as u64,
        None => FALLBACK_BUDGET_BYTES,
    }
}

/// The machine's usable memory: the smaller of the two known values.
fn machine_memory(meminfo: Option<u64>, cgroup: Option<u64>) -> Option<u64> {
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemTotal` of `/proc/meminfo` in bytes (the file gives kB = KiB).
fn parse_meminfo_total(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut it = line.split_whitespace().skip(1);
    let kb: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => kb.checked_mul(1024),
        Some(_) => None,
    }
}

/// A cgroup memory limit in bytes; `max` (v2) or an absurd v1 "unlimited" value is none.
fn parse_cgroup_limit(s: &str) -> Option<u64> {
    let v: u64 = s.trim().parse().ok()?;
    // cgroup v1 reports "no limit" as a page-aligned i64::MAX.
    (v > 0 && v < (1u64 << 60)).then_some(v)
}

/// The coordinator's memory budget and what queued and running jobs hold of it.
///
/// A job is admitted when its [`MemoryEstimate::peak`] fits the budget on its own
/// (else the submission is refused as invalid, naming the estimate, the budget and
/// [`BUDGET_FLAG`]) and when it fits next to what the jobs already admitted hold (else it
/// is refused as [`CoordinatorError::Busy`]: retry once jobs finish).
#[derive(Debug)]
pub struct Admission {
    budget: u64,
    /// Bytes held per key: a job id, or a submission's ticket until it becomes a job.
    held: Mutex<BTreeMap<String, u64>>,
    tickets: AtomicU64,
}

/// A submission's hold on the budget; released when dropped unless [`Self::commit`]ted
/// to a job id.
#[derive(Debug)]
pub struct Reservation<'a> {
    admission: &'a Admission,
    key: Option<String>,
}

impl Reservation<'_> {
    /// Moves the hold to `job_id`: it stays until [`Admission::release`] for that job.
    pub fn commit(mut self, job_id: &str) {
        if let Some(key) = self.key.take() {
            let mut held = self.admission.lock();
            if let Some(bytes) = held.remove(&key) {
                held.insert(job_id.to_string(), bytes);
            }
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.admission.lock().remove(&key);
        }
    }
}

impl Admission {
    /// An empty admission with a budget of `budget` bytes.
    pub fn new(budget: u64) -> Self {
        tracing::info!(
            budget_bytes = budget,
            "memory budget {} ({BUDGET_FLAG})",
            gb(budget)
        );
        Self {
            budget,
            held: Mutex::new(BTreeMap::new()),
            tickets: AtomicU64::new(0),
        }
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes held by admitted jobs and submissions in progress.
    pub fn held(&self) -> u64 {
        self.lock().values().sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses a job that exceeds the budget on its own (naming the estimate, the budget
    /// and the flag).
    pub fn check_fits(&self, estimate: &MemoryEstimate) -> Result<()> {
        let need = estimate.peak();
        if need > self.budget {
            return Err(CoordinatorError::InvalidSubmission(format!(
                "the job needs an estimated {}, over this coordinator's memory budget of {} \
                 (set with {BUDGET_FLAG}); use a smaller volume, a smaller SR factor or \
                 fewer samples, or raise the budget",
                estimate.describe(),
                gb(self.budget)
            )));
        }
        Ok(())
    }

    /// Reserves a submission's estimate: refused when it does not fit the budget on its
    /// own ([`Self::check_fits`]) or next to what queued and running jobs hold
    /// ([`CoordinatorError::Busy`]).
    pub fn reserve(&self, estimate: &MemoryEstimate) -> Result<Reservation<'_>> {
        self.check_fits(estimate)?;
        let need = estimate.peak();
        let mut held = self.lock();
        let total: u64 = held.values().sum();
        if total.saturating_add(need) > self.budget {
            return Err(CoordinatorError::Busy(format!(
                "the job needs an estimated {}, but queued and running jobs ({}) already hold \
                 {} of this coordinator's memory budget of {} (set with {BUDGET_FLAG}); \
                 retry when jobs have finished",
                gb(need),
                held.len(),
                gb(total),
                gb(self.budget)
            )));
        }
        let key = format!(
            "submission-{}",
            self.tickets.fetch_add(1, Ordering::Relaxed)
        );
        held.insert(key.clone(), need);
        drop(held);
        Ok(Reservation {
            admission: self,
            key: Some(key),
        })
    }

    /// Holds `bytes` for a stored job resumed on start, whether or not it fits next to
    /// the others (it was admitted before; new submissions wait until the total drains).
    pub fn hold(&self, job_id: &str, bytes: u64) {
        self.lock().insert(job_id.to_string(), bytes);
    }

    /// Releases what a job holds (no-op if it holds nothing).
    pub fn release(&self, job_id: &str) {
        self.lock().remove(job_id);
    }
}

/// A job resumed this many times in a row by coordinator starts without advancing a step
/// is failed instead of resumed again: the coordinator probably died on it.
pub const MAX_RESUMES_WITHOUT_PROGRESS: u32 = 3;

/// Decides on start whether a stored unfinished job resumes: its stored inputs must still
/// be readable and its estimate fit the budget (then it holds its share, even past the
/// total: it was admitted before), and it must not have been resumed
/// [`MAX_RESUMES_WITHOUT_PROGRESS`] times in a row without progress. Otherwise the job is
/// recorded failed with the reason, and false is returned, so a job that cannot load or
/// crashes the coordinator is not retried forever.
pub(crate) fn admit_resumed(
    store: &crate::store::JobStore,
    admission: &Admission,
    job: &crate::job::JobRecord,
) -> bool {
    let mut rec = job.clone();
    let verdict = resume_verdict(store, admission, &mut rec);
    match verdict {
        Ok(bytes) => {
            let recorded = store.put_job(&rec).and_then(|_| store.flush());
            if let Err(e) = recorded {
                tracing::error!(job = %rec.job_id, "cannot record the resume: {e}");
            }
            admission.hold(&rec.job_id, bytes);
            true
        }
        Err(reason) => {
            let msg = format!(
                "job {}: not resumed after a coordinator restart: {reason}",
                rec.job_id
            );
            tracing::error!(job = %rec.job_id, "{msg}");
            rec.state = crate::job::JobState::Failed;
            rec.error = Some(msg.clone());
            rec.finished_unix = Some(crate::job::unix_now());
            rec.log(format!("failed: {msg}"));
            let _ = store.clear_checkpoints(&rec.job_id);
            if let Err(e) = store.put_job(&rec).and_then(|_| store.flush()) {
                tracing::error!(job = %rec.job_id, "cannot record the job's failure: {e}");
            }
            false
        }
    }
}

/// The bytes a resumed job holds, or why it must not resume. Updates the resume counter.
fn resume_verdict(
    store: &crate::store::JobStore,
    admission: &Admission,
    rec: &mut crate::job::JobRecord,
) -> std::result::Result<u64, String> {
    // Only a job that was running can have taken the coordinator down with it; a queued
    // one keeps its count.
    if rec.state == crate::job::JobState::Running {
        let progress = (rec.sample, rec.step);
        if rec.resumed_at == Some(progress) {
            rec.resumes_without_progress += 1;
        } else {
            rec.resumes_without_progress = 1;
        }
        rec.resumed_at = Some(progress);
    }
    if rec.resumes_without_progress > MAX_RESUMES_WITHOUT_PROGRESS {
        return Err(format!(
            "resumed {} times in a row at sample {} step {} without progress (the \
             coordinator may have died on it)",
            MAX_RESUMES_WITHOUT_PROGRESS, rec.sample, rec.step
        ));
    }
    let measurement = store
        .get_input(&rec.job_id, "measurement")
        .map_err(|e| format!("cannot read its stored measurement: {e}"))?
        .ok_or_else(|| "its measurement is not stored".to_string())?;
    let mask = store
        .get_input(&rec.job_id, "mask")
        .map_err(|e| format!("cannot read its stored mask: {e}"))?;
    let estimate =
        MemoryEstimate::from_inputs(&rec.spec, &rec.model, &measurement, mask.as_deref())
            .map_err(|e| e.to_string())?;
    admission.check_fits(&estimate).map_err(|e| e.to_string())?;
    rec.log(format!(
        "admitted on restart (resume {} at sample {} step {}): estimated peak {}",
        rec.resumes_without_progress,
        rec.sample,
        rec.step,
        gb(estimate.peak())
    ));
    Ok(estimate.peak())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmqsm_proto::v1;

    fn spec(task: v1::Task, f: impl FnOnce(&mut v1::JobSettings)) -> JobSpec {
        let mut s = v1::JobSettings {
            task: task as i32,
            ..Default::default()
        };
        f(&mut s);
        JobSpec::from_proto(&s, 4).unwrap()
    }

    fn model(patch: usize) -> ModelSpec {
        ModelSpec {
            model_id: "m".into(),
            content_hash: "h".into(),
            patch_size: patch,
            schedule: Default::default(),
            chi_scale: 1.0,
        }
    }

    fn header(shape: [usize; 3], bpv: u64) -> VolumeHeader {
        let mut affine = [[0.0; 4]; 4];
        for (a, row) in affine.iter_mut().enumerate() {
            row[a] = 1.0;
        }
        VolumeHeader {
            ndim: 3,
            shape,
            datatype: "Float32".into(),
            bytes_per_voxel: bpv,
            voxel_size: [1.0; 3],
            affine,
            vox_offset: 352,
        }
    }

    /// The estimate of a small dipinv-physics job with prox guidance (the plain CG step,
    /// `prox_tv` 0) and a TV warm start, checked term by term against the module docs'
    /// formulas written out by hand: 40³
    /// input, patch 16 with overlap 4 (stride 12: ⌈(40 − 16)/12⌉ + 1 = 3 patches per
    /// axis, padded to 2·12 + 16 = 40 per axis), FFT grid 40³ (40 = 2³·5 is fast).
    #[test]
    fn estimate_matches_the_documented_formulas() {
        let s = spec(v1::Task::DipinvPhysics, |s| {
            s.guidance = v1::Guidance::Prox as i32;
            s.overlap = Some(4);
            s.start_timestep = Some(20);
            s.steps = Some(8);
            s.prox_tv = Some(0.0);
        });
        let m = header([40, 40, 40], 4);
        let k = header([40, 40, 40], 1);
        let e = MemoryEstimate::new(&s, &model(16), &m, Some(&k), 1000).unwrap();
        let n: u64 = 40 * 40 * 40;
        assert_eq!(e.input_voxels, n);
        assert_eq!(e.output_voxels, n);
        assert_eq!(e.padded_voxels, n);
        assert_eq!(e.round_voxels, 27 * 16 * 16 * 16);
        assert_eq!(e.fft_voxels, n);
        assert_eq!(e.uploads, 2000);
        // decode: max(m (4 + 12), 4 held + mask (1 + 12)) per voxel.
        assert_eq!(e.decode, n * 17);
        // problem: y 4 + mask 1 + out mask 1 + initial 4 + kernel 2 = 12 per voxel.
        let problem = n * 12;
        // prepare: inputs 8 + problem + TV 92 + 10 L-curve solutions 40.
        assert_eq!(e.prepare, n * 8 + problem + n * 92 + n * 40);
        // sample: problem + state/step 32·N_pad + y 4 + 12·R + prox (24 + 8) + 4 + 24.
        let r = 27 * 16 * 16 * 16;
        assert_eq!(
            e.sample,
            problem + n * 32 + n * 4 + 12 * r + n * 32 + n * 4 + n * 24
        );
        let base = 2000 + e.prepare;
        assert_eq!(e.peak(), base + base * 25 / 100);
        assert_eq!(e.peak_phase(), "prepare");
    }

    /// SR multiplies the output grid by the factors; more samples add kept copies; a
    /// fixed α keeps one TV solution instead of ten.
    #[test]
    fn sr_factor_samples_and_alpha_move_the_estimate() {
        let m = header([24, 24, 24], 4);
        let sr = spec(v1::Task::SrDipinvPhysics, |s| {
            s.factor = vec![2];
            s.overlap = Some(4);
        });
        let e = MemoryEstimate::new(&sr, &model(16), &m, None, 0).unwrap();
        assert_eq!(e.output_voxels, 48 * 48 * 48);
        // fast_shape(48) = 48 (2⁴·3).
        assert_eq!(e.fft_voxels, 48 * 48 * 48);
        let one = spec(v1::Task::Dipinv, |s| s.overlap = Some(4));
        let four = spec(v1::Task::Dipinv, |s| {
            s.overlap = Some(4);
            s.samples = Some(4);
        });
        let e1 = MemoryEstimate::new(&one, &model(16), &m, None, 0).unwrap();
        let e4 = MemoryEstimate::new(&four, &model(16), &m, None, 0).unwrap();
        let n = 24u64 * 24 * 24;
        assert_eq!(e4.sample - e1.sample, n * 4 * (4 * 2 - 1));
        let fixed = spec(v1::Task::DipinvPhysics, |s| {
            s.start_timestep = Some(20);
            s.steps = Some(8);
            s.tv_alpha = Some(1e-3);
        });
        let free = spec(v1::Task::DipinvPhysics, |s| {
            s.start_timestep = Some(20);
            s.steps = Some(8);
        });
        let ef = MemoryEstimate::new(&fixed, &model(16), &m, None, 0).unwrap();
        let eh = MemoryEstimate::new(&free, &model(16), &m, None, 0).unwrap();
        assert_eq!(eh.prepare - ef.prepare, n * 4 * 9);
    }

    /// The 1024×1024×512 u8 bomb: the decode phase alone is 2²⁹ · 13 bytes.
    #[test]
    fn bomb_estimate_is_far_over_a_machine_budget() {
        let s = spec(v1::Task::DipinvPhysics, |_| {});
        let m = header([1024, 1024, 512], 1);
        let e = MemoryEstimate::new(&s, &model(48), &m, None, 530_000).unwrap();
        assert_eq!(e.decode, (1u64 << 29) * 13);
        assert!(e.peak() > 50_000_000_000, "{}", e.describe());
        let a = Admission::new(16_000_000_000);
        let msg = a.check_fits(&e).unwrap_err().to_string();
        assert!(
            msg.contains("16.00 GB") && msg.contains(BUDGET_FLAG) && msg.contains(&gb(e.peak())),
            "{msg}"
        );
    }

    #[test]
    fn overlap_must_be_below_the_patch_size() {
        let m = header([40, 40, 40], 4);
        for (overlap, ok) in [(47, true), (48, false), (60, false)] {
            let s = spec(v1::Task::Dipinv, |s| s.overlap = Some(overlap));
            let r = MemoryEstimate::new(&s, &model(48), &m, None, 0);
            assert_eq!(r.is_ok(), ok, "overlap {overlap}");
            if let Err(e) = r {
                let e = e.to_string();
                assert!(e.contains("settings.overlap") && e.contains("48"), "{e}");
            }
        }
    }

    /// Reservations add up to the budget; one more is Busy; dropping a reservation or
    /// releasing a committed job frees its share; a job over the budget alone is invalid.
    #[test]
    fn the_total_of_admitted_jobs_is_capped() {
        let est = |peak: u64| MemoryEstimate {
            input_voxels: 0,
            output_voxels: 0,
            padded_voxels: 0,
            round_voxels: 0,
            fft_voxels: 0,
            uploads: 0,
            decode: peak,
            prepare: 0,
            sample: 0,
        };
        // Peaks with the 25 % headroom: 480 → 600, 400 → 500, 320 → 400, 801 → 1001.
        assert_eq!(est(480).peak(), 600);
        assert_eq!(est(801).peak(), 1001);
        let a = Admission::new(1000);
        let r1 = a.reserve(&est(480)).unwrap();
        assert_eq!(a.held(), 600);
        let e = a.reserve(&est(400)).unwrap_err();
        assert!(matches!(e, CoordinatorError::Busy(_)), "{e}");
        assert!(e.to_string().contains(BUDGET_FLAG), "{e}");
        r1.commit("job-1");
        assert_eq!(a.held(), 600);
        {
            let _r2 = a.reserve(&est(320)).unwrap();
            assert_eq!(a.held(), 1000);
        }
        assert_eq!(a.held(), 600);
        a.release("job-1");
        assert_eq!(a.held(), 0);
        let e = a.reserve(&est(801)).unwrap_err();
        assert!(matches!(e, CoordinatorError::InvalidSubmission(_)), "{e}");
        a.hold("job-2", 5000);
        assert_eq!(a.held(), 5000);
    }

    #[test]
    fn machine_memory_parsing() {
        let info = "MemTotal:       24683584 kB\nMemFree:        21225252 kB\n";
        assert_eq!(parse_meminfo_total(info), Some(24683584 * 1024));
        assert_eq!(parse_meminfo_total("garbage"), None);
        assert_eq!(parse_cgroup_limit("max\n"), None);
        assert_eq!(parse_cgroup_limit("4294967296\n"), Some(4 << 30));
        assert_eq!(parse_cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(machine_memory(Some(10), Some(4)), Some(4));
        assert_eq!(machine_memory(None, Some(4)), Some(4));
        assert_eq!(machine_memory(None, None), None);
        let d = default_budget_bytes();
        assert!(d > 0);
    }
}
