//! Running a cohort: one job per [`Entry`], overall progress, derivatives and sidecars,
//! skipping finished work, reporting failures without stopping.
//!
//! Completion marker: the χ map is written first (atomically, temp file + rename), the
//! sidecar last; an entry counts as finished when both exist and the sidecar's
//! `DmqsmFingerprint` (SHA-256 over the input bytes, mask bytes and the job settings)
//! equals the current one. Changing an input or a setting therefore recomputes it.

use super::CohortError;
use super::bids::{Acquisition, Entry};
use crate::client::{self, Client, ClientError};
use dmqsm_common::content_hash::sha256_hex;
use dmqsm_common::geometry::B0Direction;
use dmqsm_common::nifti_io::read_nifti_bytes;
use dmqsm_proto::{convert, v1};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of a cohort run.
#[derive(Debug, Clone)]
pub struct CohortOptions {
    /// Job settings shared by every subject. `b0_dir`, `field_units`, `b0_tesla` and
    /// `te_seconds` are filled per subject from its sidecars / affine.
    pub settings: v1::JobSettings,
    /// Recompute entries whose outputs already exist.
    pub force: bool,
    /// How often job states are polled.
    pub poll: Duration,
}

impl CohortOptions {
    /// Options with `settings`, no forcing, polling every 250 ms.
    pub fn new(settings: v1::JobSettings) -> Self {
        Self {
            settings,
            force: false,
            poll: Duration::from_millis(250),
        }
    }
}

/// What happened to one entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Reconstructed now.
    Done {
        /// The coordinator's job id.
        job_id: String,
        /// The χ map written (ppm).
        chi: PathBuf,
        /// Metrics against the truth, when there was one.
        metrics: Option<Value>,
    },
    /// Outputs were already there for the same inputs and settings.
    Skipped {
        /// The existing χ map.
        chi: PathBuf,
    },
    /// Not reconstructed; the message names the cause.
    Failed {
        /// The job id, when a job was submitted.
        job_id: Option<String>,
        /// Why.
        error: String,
    },
}

/// One entry's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectReport {
    /// [`Entry::name`].
    pub name: String,
    /// Subject label.
    pub subject: String,
    /// Session label.
    pub session: Option<String>,
    /// The outcome.
    pub outcome: Outcome,
}

/// The outcome of a cohort run, in entry order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CohortReport {
    /// One report per entry.
    pub subjects: Vec<SubjectReport>,
}

impl CohortReport {
    /// Entries reconstructed now.
    pub fn done(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Done { .. }))
    }
    /// Entries skipped as finished.
    pub fn skipped(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Skipped { .. }))
    }
    /// Entries that failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed { .. }))
    }
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.subjects.iter().filter(|s| f(&s.outcome)).count()
    }

    /// A JSON summary (written to `derivatives/dmqsm/cohort_report.json`).
    pub fn to_json(&self) -> Value {
        let subjects: Vec<Value> = self
            .subjects
            .iter()
            .map(|s| {
                let (state, extra) = match &s.outcome {
                    Outcome::Done { job_id, chi, metrics } => (
                        "done",
                        json!({"job_id": job_id, "chi": chi, "metrics": metrics}),
                    ),
                    Outcome::Skipped { chi } => ("skipped", json!({"chi": chi})),
                    Outcome::Failed { job_id, error } => {
                        ("failed", json!({"job_id": job_id, "error": error}))
                    }
                };
                let mut v = json!({"name": s.name, "subject": s.subject, "session": s.session, "state": state});
                if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
                    o.extend(e);
                }
                v
            })
            .collect();
        json!({
            "done": self.done(), "skipped": self.skipped(), "failed": self.failed(),
            "subjects": subjects,
        })
    }
}

/// Overall progress, passed to the progress callback.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CohortProgress {
    /// Entries in the cohort.
    pub total: usize,
    /// Entries finished now.
    pub done: usize,
    /// Entries skipped as finished earlier.
    pub skipped: usize,
    /// Entries failed.
    pub failed: usize,
    /// Diffusion steps completed over all submitted jobs (all samples).
    pub steps_done: u64,
    /// Diffusion steps of all submitted jobs.
    pub steps_total: u64,
    /// The latest event, e.g. `sub-01: done` (empty when nothing happened).
    pub message: String,
}

/// The settings as JSON (the sidecar's `DmqsmSettings`, also hashed into the
/// fingerprint).
pub fn settings_json(s: &v1::JobSettings) -> Value {
    // Values outside the schema (never produced by this crate's CLI) are spelled out
    // rather than refused: this is a record of what was asked, not a validation.
    let task = convert::task(s.task, "settings.task")
        .map(|t| t.name().to_string())
        .unwrap_or_else(|_| format!("unknown({})", s.task));
    let guidance = match convert::guidance(s.guidance, "settings.guidance") {
        Ok(Some(g)) => g.name().to_string(),
        _ => format!("unknown({})", s.guidance),
    };
    // Unset optional numbers are written as the 0 the wire used to carry for "unset",
    // so the fingerprints of cohorts run before they became optional stay valid.
    let mut v = json!({
        "task": task, "steps": s.steps.unwrap_or(0), "eta": s.eta,
        "xi": s.xi.unwrap_or(0.0), "guidance": guidance,
        "overlap": s.overlap.unwrap_or(8), "seed": s.seed, "samples": s.samples.unwrap_or(0),
        "model_id": s.model_id, "factor": s.factor, "b0_dir": s.b0_dir,
        "tkd_threshold": s.tkd_threshold.unwrap_or(0.0), "field_units": s.field_units,
        "b0_tesla": s.b0_tesla, "te_seconds": s.te_seconds, "downsample": s.downsample,
        "batch_size": s.batch_size,
    });
    // Added only when set, so the fingerprints of cohorts run before warm starts existed
    // stay valid.
    if let Some(t) = s.start_timestep {
        v["start_timestep"] = json!(t);
    }
    if let Some(a) = s.tv_alpha {
        v["tv_alpha"] = json!(a);
    }
    if let Some(f) = s.prox_tv {
        v["prox_tv"] = json!(f);
    }
    v
}

/// A prepared submission.
struct Prepared {
    /// The submission (its NIfTI bytes are dropped once submitted).
    request: v1::SubmitJobRequest,
    settings: v1::JobSettings,
    fingerprint: String,
    b0_source: &'static str,
    steps: u64,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn prepare(entry: &Entry, acq: &Acquisition, opts: &CohortOptions) -> Result<Prepared, String> {
    let meas = read(&acq.measurement)?;
    let mask = acq.mask.as_deref().map(read).transpose()?;
    let mut s = opts.settings.clone();
    let b0_source = match acq.b0_dir {
        Some(d) => {
            s.b0_dir = d.to_vec();
            "sidecar B0_dir"
        }
        None => {
            // Read here so the sidecar records the direction the coordinator will use
            // (the same QSMxT rule: b̂ = Rᵀ·ẑ with R the affine's unit-column 3×3 part).
            let v = read_nifti_bytes(&meas)
                .map_err(|e| format!("{}: {e}", acq.measurement.display()))?;
            let b0 = B0Direction::from_volume(&v)
                .map_err(|e| format!("{}: {e}", acq.measurement.display()))?;
            s.b0_dir = b0.as_array().to_vec();
            "affine"
        }
    };
    s.field_units = acq.units.clone();
    s.b0_tesla = acq.field_strength_t.unwrap_or(0.0);
    s.te_seconds = acq.echo_time_s.unwrap_or(0.0);
    let mut h = serde_json::to_vec(&settings_json(&s)).unwrap_or_default();
    h.extend_from_slice(sha256_hex(&meas).as_bytes());
    if let Some(m) = &mask {
        h.extend_from_slice(sha256_hex(m).as_bytes());
    }
    let steps =
        s.steps.unwrap_or(crate::job::DEFAULT_STEPS) as u64 * s.samples.unwrap_or(1).max(1) as u64;
    Ok(Prepared {
        fingerprint: sha256_hex(&h),
        settings: s.clone(),
        b0_source,
        steps,
        request: v1::SubmitJobRequest {
            measurement: Some(v1::VolumeInput {
                source: Some(v1::volume_input::Source::Nifti(meas.into())),
            }),
            mask: mask.map(|m| v1::VolumeInput {
                source: Some(v1::volume_input::Source::Nifti(m.into())),
            }),
            settings: Some(s),
            label: format!("cohort {}", entry.entities),
        },
    })
}

fn is_finished(entry: &Entry, root: &Path, fingerprint: &str) -> bool {
    let chi = entry.output_chi(root);
    let Ok(bytes) = std::fs::read(entry.output_sidecar(root)) else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return false;
    };
    chi.is_file() && v.get("DmqsmFingerprint").and_then(Value::as_str) == Some(fingerprint)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    dmqsm_common::atomic_file::write_atomic(path, bytes)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Metrics of `chi` against the entry's truth (and labels), `None` without a truth.
fn metrics(acq: &Acquisition, chi: &[u8]) -> Result<Option<Value>, String> {
    let Some(truth) = &acq.truth else {
        return Ok(None);
    };
    let load = |p: &Path| {
        dmqsm_common::nifti_io::read_nifti(p).map_err(|e| format!("{}: {e}", p.display()))
    };
    let recon = read_nifti_bytes(chi).map_err(|e| format!("result χ: {e}"))?;
    let truth_v = load(truth)?;
    let mask = match &acq.mask {
        Some(m) => load(m)?,
        None => truth_v.like(truth_v.data.mapv(|v| if v != 0.0 { 1.0 } else { 0.0 })),
    };
    let m = match &acq.labels {
        Some(l) => {
            let labels = load(l)?.data.mapv(|v| v.round().clamp(0.0, 255.0) as u8);
            dmqsm_common::metrics::evaluate_with_labels(
                &recon,
                &truth_v,
                &mask,
                &labels,
                &dmqsm_common::metrics::deep_grey_matter_regions(),
            )
        }
        None => dmqsm_common::metrics::evaluate(&recon, &truth_v, &mask),
    }
    .map_err(|e| format!("metrics against {}: {e}", truth.display()))?;
    let mut v = serde_json::to_value(&m).map_err(|e| e.to_string())?;
    if let Value::Object(o) = &mut v {
        o.insert("Truth".into(), json!(truth));
    }
    Ok(Some(v))
}

/// Fetches a finished job's χ, writes it and its sidecar; returns the metrics.
async fn finish(
    c: &mut Client,
    root: &Path,
    entry: &Entry,
    acq: &Acquisition,
    prep: &Prepared,
    st: &v1::JobStatus,
) -> Result<Option<Value>, String> {
    let files = client::fetch(c, &st.job_id)
        .await
        .map_err(|e| format!("fetching {}: {e}", st.job_id))?;
    let get = |n: &str| files.iter().find(|f| f.0 == n).map(|f| &f.1);
    let chi =
        get("chi.nii.gz").ok_or_else(|| format!("job {} returned no chi.nii.gz", st.job_id))?;
    let metrics = metrics(acq, chi)?;
    let out_chi = entry.output_chi(root);
    write_atomic(&out_chi, chi)?;
    if let Some(std) = get("std.nii.gz") {
        let p = entry
            .output_dir(root)
            .join(format!("{}_desc-std_Chimap.nii.gz", entry.entities));
        write_atomic(&p, std)?;
    }
    let report: Value = get("report.json")
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or(Value::Null);
    let settings = &prep.settings;
    let rel = |p: &Path| {
        p.strip_prefix(root)
            .map(|r| format!("bids::{}", r.display()))
            .unwrap_or_else(|_| p.display().to_string())
    };
    let mut sources = vec![rel(&acq.measurement)];
    sources.extend(acq.mask.as_deref().map(rel));
    let sidecar = json!({
        "Units": "ppm",
        "Description": "Magnetic susceptibility (χ) reconstructed with DM-QSM (patch-based score diffusion with DPS)",
        "Sources": sources,
        "MagneticFieldStrength": acq.field_strength_t,
        "B0_dir": settings.b0_dir,
        "B0DirSource": prep.b0_source,
        "GeneratedBy": [{"Name": "dmqsm", "Version": env!("CARGO_PKG_VERSION")}],
        "DmqsmJobId": st.job_id,
        "DmqsmModel": {"ModelId": st.model_id, "ContentHash": st.model_hash},
        "DmqsmSettings": settings_json(settings),
        "DmqsmRetries": st.retries,
        "DmqsmWorkersUsed": report.get("workers_used").cloned().unwrap_or(Value::Null),
        "DmqsmFingerprint": prep.fingerprint,
        "Metrics": metrics,
    });
    let bytes = serde_json::to_vec_pretty(&sidecar).map_err(|e| e.to_string())?;
    write_atomic(&entry.output_sidecar(root), &bytes)?;
    Ok(metrics)
}

fn write_dataset_description(root: &Path) -> Result<(), CohortError> {
    let dir = root.join("derivatives").join("dmqsm");
    std::fs::create_dir_all(&dir).map_err(|e| CohortError::io(&dir, e))?;
    let p = dir.join("dataset_description.json");
    if p.exists() {
        return Ok(());
    }
    let v = json!({
        "Name": "dmqsm",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "dmqsm", "Version": env!("CARGO_PKG_VERSION"),
                         "Description": "DM-QSM susceptibility maps"}],
    });
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap_or_default())
        .map_err(|e| CohortError::io(&p, e))
}

struct Pending<'a> {
    index: usize,
    entry: &'a Entry,
    acq: &'a Acquisition,
    prep: Prepared,
    job_id: String,
    steps_done: u64,
}

/// Runs the cohort `entries` (from [`super::discover`] on `root`) on the coordinator
/// behind `c`: every pending entry is submitted at once (the coordinator queues and
/// schedules them), then polled until each ends. `on_progress` is called after every
/// change. Per-entry problems (unreadable input, rejected submission, failed job,
/// unwritable output) become [`Outcome::Failed`] and the rest carry on; only an
/// unwritable derivatives folder is an error. The summary is also written to
/// `<root>/derivatives/dmqsm/cohort_report.json`.
pub async fn run_cohort(
    c: &mut Client,
    root: &Path,
    entries: &[Entry],
    opts: &CohortOptions,
    mut on_progress: impl FnMut(&CohortProgress),
) -> Result<CohortReport, CohortError> {
    write_dataset_description(root)?;
    let mut outcomes: Vec<Option<Outcome>> = vec![None; entries.len()];
    let mut progress = CohortProgress {
        total: entries.len(),
        ..Default::default()
    };
    let mut pending: Vec<Pending> = Vec::new();
    let fail = |job_id: Option<String>, error: String| Outcome::Failed { job_id, error };
    for (index, entry) in entries.iter().enumerate() {
        let acq = match &entry.input {
            Ok(a) => a,
            Err(e) => {
                outcomes[index] = Some(fail(None, e.clone()));
                progress.failed += 1;
                progress.message = format!("{}: failed: {e}", entry.name());
                on_progress(&progress);
                continue;
            }
        };
        let mut prep = match prepare(entry, acq, opts) {
            Ok(p) => p,
            Err(e) => {
                progress.failed += 1;
                progress.message = format!("{}: failed: {e}", entry.name());
                outcomes[index] = Some(fail(None, e));
                on_progress(&progress);
                continue;
            }
        };
        if !opts.force && is_finished(entry, root, &prep.fingerprint) {
            outcomes[index] = Some(Outcome::Skipped {
                chi: entry.output_chi(root),
            });
            progress.skipped += 1;
            progress.message = format!("{}: already done, skipped", entry.name());
            on_progress(&progress);
            continue;
        }
        match c.submit_job(std::mem::take(&mut prep.request)).await {
            Ok(r) => {
                progress.steps_total += prep.steps;
                pending.push(Pending {
                    index,
                    entry,
                    acq,
                    prep,
                    job_id: r.into_inner().job_id,
                    steps_done: 0,
                });
            }
            Err(s) => {
                let e = format!("submission rejected: {}", ClientError::from(s));
                progress.failed += 1;
                progress.message = format!("{}: {e}", entry.name());
                outcomes[index] = Some(fail(None, e));
                on_progress(&progress);
            }
        }
    }
    on_progress(&progress);
    while !pending.is_empty() {
        let mut still = Vec::new();
        for mut p in std::mem::take(&mut pending) {
            let st = match c
                .get_job(v1::GetJobRequest {
                    job_id: p.job_id.clone(),
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    let e = format!("job {}: {}", p.job_id, ClientError::from(s));
                    progress.failed += 1;
                    progress.steps_done += p.prep.steps - p.steps_done;
                    progress.message = format!("{}: {e}", p.entry.name());
                    outcomes[p.index] = Some(fail(Some(p.job_id.clone()), e));
                    on_progress(&progress);
                    continue;
                }
            };
            let now = (st.sample as u64 * st.total_steps as u64 + st.step as u64).min(p.prep.steps);
            if !client::is_terminal(st.state) {
                if now != p.steps_done {
                    progress.steps_done += now.saturating_sub(p.steps_done);
                    p.steps_done = now.max(p.steps_done);
                    progress.message.clear();
                    on_progress(&progress);
                }
                still.push(p);
                continue;
            }
            progress.steps_done += p.prep.steps - p.steps_done;
            let outcome = if st.state == v1::JobState::Succeeded as i32 {
                match finish(c, root, p.entry, p.acq, &p.prep, &st).await {
                    Ok(metrics) => Outcome::Done {
                        job_id: st.job_id.clone(),
                        chi: p.entry.output_chi(root),
                        metrics,
                    },
                    Err(e) => fail(Some(st.job_id.clone()), e),
                }
            } else {
                let state = v1::JobState::try_from(st.state)
                    .map(|s| s.as_str_name().to_ascii_lowercase())
                    .unwrap_or_default();
                fail(
                    Some(st.job_id.clone()),
                    format!("job {} {state}: {}", st.job_id, st.error),
                )
            };
            match &outcome {
                Outcome::Failed { error, .. } => {
                    progress.failed += 1;
                    progress.message = format!("{}: {error}", p.entry.name());
                }
                _ => {
                    progress.done += 1;
                    progress.message = format!("{}: done", p.entry.name());
                }
            }
            outcomes[p.index] = Some(outcome);
            on_progress(&progress);
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(opts.poll).await;
        }
    }
    let report = CohortReport {
        subjects: entries
            .iter()
            .zip(outcomes)
            .map(|(e, o)| SubjectReport {
                name: e.name(),
                subject: e.subject.clone(),
                session: e.session.clone(),
                outcome: o.unwrap_or_else(|| fail(None, "not processed".into())),
            })
            .collect(),
    };
    let p = root.join("derivatives/dmqsm/cohort_report.json");
    std::fs::write(
        &p,
        serde_json::to_vec_pretty(&report.to_json()).unwrap_or_default(),
    )
    .map_err(|e| CohortError::io(&p, e))?;
    Ok(report)
}
