//! [`JobStore`]: the coordinator's durable state in sled 0.34.
//!
//! Trees, all keyed by job id:
//! - `jobs`: `job-…` → [`JobRecord`] as JSON (settings, state, progress, history);
//! - `inputs`: `job-…/measurement`, `job-…/mask` → the NIfTI bytes as submitted (path
//!   inputs are read once at submission, so a resumed job never sees a changed file);
//! - `results`: `job-…/<file>` → result files (`chi.nii.gz`, `std.nii.gz`,
//!   `preview.png`, `report.json`).
//!
//! Step checkpoints (x_t over the padded volume, megabytes, replaced every few steps) and
//! finished posterior samples live beside sled in `checkpoints/` as `job-….step` and
//! `job-….sample-NNNN`, each written to a temporary file, fsynced and renamed over the
//! old one (then the directory is fsynced), so a checkpoint only counts once it is on
//! disk and a crash leaves either the old or the new one. They are not sled values
//! because sled 0.34 does not reclaim the space of large values that are overwritten:
//! measured with the `disk` benchmark, every 8.4 MB checkpoint of a 128³ state grew the
//! database by 8.4 MB (497 MB after 59 checkpoints, 398 MB left after the job ended),
//! the space amplification REFERENCE.md §9 warns about. As files, one checkpoint per
//! running job exists at any time, and they are removed when a job ends: disk use stays
//! bounded by the running jobs plus the kept results.
//!
//! sled fsyncs on its own every 500 ms; [`JobStore::flush`] forces it (at submission and
//! at a job's end).

use crate::error::{CoordinatorError, Result};
use crate::job::JobRecord;
use std::path::{Path, PathBuf};

/// The sled-backed store of jobs, inputs, checkpoints and results.
#[derive(Clone)]
pub struct JobStore {
    db: sled::Db,
    jobs: sled::Tree,
    inputs: sled::Tree,
    results: sled::Tree,
    checkpoint_dir: PathBuf,
}

impl std::fmt::Debug for JobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStore").finish_non_exhaustive()
    }
}

fn key(job_id: &str, name: &str) -> Vec<u8> {
    format!("{job_id}/{name}").into_bytes()
}

fn prefix(job_id: &str) -> Vec<u8> {
    format!("{job_id}/").into_bytes()
}

impl JobStore {
    /// Opens (or creates) the store in `dir`. Fails with a message naming the directory,
    /// e.g. when another coordinator holds it.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            CoordinatorError::Store(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .open()
            .map_err(|e| {
                CoordinatorError::Store(format!("cannot open store in {}: {e}", dir.display()))
            })?;
        let checkpoint_dir = dir.join("checkpoints");
        std::fs::create_dir_all(&checkpoint_dir).map_err(|e| {
            CoordinatorError::Store(format!("cannot create {}: {e}", checkpoint_dir.display()))
        })?;
        // sled holds the directory's lock now, so no other coordinator writes here: a
        // temporary left by a killed process is garbage.
        match dmqsm_common::atomic_file::remove_stale_temporaries(&checkpoint_dir) {
            Ok(0) => {}
            Ok(n) => tracing::info!("removed {n} unfinished checkpoint writes"),
            Err(e) => tracing::warn!("cannot clear unfinished checkpoint writes: {e}"),
        }
        Ok(Self {
            jobs: db.open_tree("jobs")?,
            inputs: db.open_tree("inputs")?,
            results: db.open_tree("results")?,
            checkpoint_dir,
            db,
        })
    }

    /// A fresh job id, `job-000001` style, unique for the life of the store.
    pub fn next_job_id(&self) -> Result<String> {
        Ok(format!("job-{:06}", self.db.generate_id()? + 1))
    }

    /// Stores (creates or replaces) a job record.
    pub fn put_job(&self, job: &JobRecord) -> Result<()> {
        let json = serde_json::to_vec(job)
            .map_err(|e| CoordinatorError::Store(format!("encoding job {}: {e}", job.job_id)))?;
        self.jobs.insert(job.job_id.as_bytes(), json)?;
        Ok(())
    }

    /// The record of a job, if stored.
    pub fn get_job(&self, job_id: &str) -> Result<Option<JobRecord>> {
        match self.jobs.get(job_id.as_bytes())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| CoordinatorError::Store(format!("job {job_id}: corrupt record: {e}"))),
        }
    }

    /// Every stored job, in submission order.
    pub fn list_jobs(&self) -> Result<Vec<JobRecord>> {
        let mut out = Vec::new();
        for kv in self.jobs.iter() {
            let (k, v) = kv?;
            match serde_json::from_slice::<JobRecord>(&v) {
                Ok(j) => out.push(j),
                Err(e) => tracing::warn!(
                    job = %String::from_utf8_lossy(&k),
                    "skipping corrupt job record: {e}"
                ),
            }
        }
        out.sort_by(|a, b| {
            a.submitted_unix
                .total_cmp(&b.submitted_unix)
                .then_with(|| a.job_id.cmp(&b.job_id))
        });
        Ok(out)
    }

    /// How many stored jobs are in each state, as `(state, count)` in first-seen order
    /// (states without jobs are absent). Reads only the `state` field of each record, so
    /// it is cheap enough for every metrics scrape; corrupt records are skipped.
    pub fn count_by_state(&self) -> Result<Vec<(crate::job::JobState, u64)>> {
        #[derive(serde::Deserialize)]
        struct StateOnly {
            state: crate::job::JobState,
        }
        let mut out: Vec<(crate::job::JobState, u64)> = Vec::new();
        for kv in self.jobs.iter() {
            let (_, v) = kv?;
            let Ok(StateOnly { state }) = serde_json::from_slice::<StateOnly>(&v) else {
                continue;
            };
            match out.iter_mut().find(|(s, _)| *s == state) {
                Some((_, n)) => *n += 1,
                None => out.push((state, 1)),
            }
        }
        Ok(out)
    }

    /// Stores an input file of a job (`measurement` or `mask`).
    pub fn put_input(&self, job_id: &str, name: &str, bytes: &[u8]) -> Result<()> {
        self.inputs.insert(key(job_id, name), bytes)?;
        Ok(())
    }

    /// An input file of a job.
    pub fn get_input(&self, job_id: &str, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.inputs.get(key(job_id, name))?.map(|v| v.to_vec()))
    }

    fn checkpoint_path(&self, job_id: &str, name: &str) -> Result<PathBuf> {
        // Job ids are ours (`job-NNNNNN`), but never let one name a path elsewhere.
        if job_id.is_empty()
            || !job_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(CoordinatorError::Store(format!("bad job id {job_id:?}")));
        }
        Ok(self.checkpoint_dir.join(format!("{job_id}.{name}")))
    }

    /// Writes `bytes` to `path` atomically and durably
    /// ([`dmqsm_common::atomic_file::write_atomic`]: temporary sibling, fsync, rename,
    /// fsync of the directory).
    fn write_durable(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        dmqsm_common::atomic_file::write_atomic(path, bytes)
            .map_err(|e| CoordinatorError::Store(format!("writing {}: {e}", path.display())))
    }

    fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CoordinatorError::Store(format!(
                "reading {}: {e}",
                path.display()
            ))),
        }
    }

    /// Replaces the job's step checkpoint; when this returns Ok the checkpoint is durable.
    pub fn put_checkpoint(&self, job_id: &str, bytes: &[u8]) -> Result<()> {
        self.write_durable(&self.checkpoint_path(job_id, "step")?, bytes)
    }

    /// The job's latest step checkpoint.
    pub fn get_checkpoint(&self, job_id: &str) -> Result<Option<Vec<u8>>> {
        Self::read_optional(&self.checkpoint_path(job_id, "step")?)
    }

    /// Stores finished posterior sample `k` of a job (durable, like a checkpoint).
    pub fn put_sample(&self, job_id: &str, k: u32, bytes: &[u8]) -> Result<()> {
        self.write_durable(
            &self.checkpoint_path(job_id, &format!("sample-{k:04}"))?,
            bytes,
        )
    }

    /// Finished posterior sample `k` of a job.
    pub fn get_sample(&self, job_id: &str, k: u32) -> Result<Option<Vec<u8>>> {
        Self::read_optional(&self.checkpoint_path(job_id, &format!("sample-{k:04}"))?)
    }

    /// Removes the step checkpoint and stored samples of a job (at its end).
    pub fn clear_checkpoints(&self, job_id: &str) -> Result<()> {
        let prefix = format!("{job_id}.");
        let rd = std::fs::read_dir(&self.checkpoint_dir).map_err(|e| {
            CoordinatorError::Store(format!("listing {}: {e}", self.checkpoint_dir.display()))
        })?;
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                std::fs::remove_file(e.path()).map_err(|err| {
                    CoordinatorError::Store(format!("removing {}: {err}", e.path().display()))
                })?;
            }
        }
        Ok(())
    }

    /// Stores a result file of a job.
    pub fn put_result(&self, job_id: &str, name: &str, bytes: &[u8]) -> Result<()> {
        self.results.insert(key(job_id, name), bytes)?;
        Ok(())
    }

    /// The result files of a job, `(name, bytes)` in name order.
    pub fn get_results(&self, job_id: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let p = prefix(job_id);
        let mut out = Vec::new();
        for kv in self.results.scan_prefix(&p) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[p.len()..]).into_owned();
            out.push((name, v.to_vec()));
        }
        Ok(out)
    }

    /// Flushes everything to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// Bytes the store occupies on disk (sled's own estimate).
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }

    /// Bytes held by checkpoints and stored samples.
    pub fn checkpoint_bytes(&self) -> u64 {
        std::fs::read_dir(&self.checkpoint_dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Bytes the store occupies on disk: sled's estimate plus the checkpoint files.
    pub fn disk_bytes(&self) -> Result<u64> {
        Ok(self.size_on_disk()? + self.checkpoint_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobSpec, JobState};
    use dmqsm_common::diffusion::model::ModelSpec;
    use dmqsm_proto::v1;

    fn record(store: &JobStore) -> JobRecord {
        let spec = JobSpec::from_proto(
            &v1::JobSettings {
                task: v1::Task::Dipinv as i32,
                ..Default::default()
            },
            4,
        )
        .unwrap();
        let model = ModelSpec {
            model_id: "m".into(),
            content_hash: "h".into(),
            patch_size: 16,
            schedule: Default::default(),
            chi_scale: 1.0,
        };
        JobRecord::new(store.next_job_id().unwrap(), "l".into(), spec, model)
    }

    #[test]
    fn jobs_checkpoints_and_results_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let s = JobStore::open(dir.path()).unwrap();
            let mut j = record(&s);
            id = j.job_id.clone();
            j.state = JobState::Running;
            s.put_job(&j).unwrap();
            s.put_input(&id, "measurement", b"nii").unwrap();
            s.put_checkpoint(&id, b"ck1").unwrap();
            s.put_checkpoint(&id, b"ck2").unwrap();
            s.put_sample(&id, 0, b"s0").unwrap();
            s.put_result(&id, "report.json", b"{}").unwrap();
            s.flush().unwrap();
        }
        let s = JobStore::open(dir.path()).unwrap();
        let j = s.get_job(&id).unwrap().unwrap();
        assert_eq!(j.state, JobState::Running);
        assert_eq!(s.get_input(&id, "measurement").unwrap().unwrap(), b"nii");
        // The checkpoint is replaced, not accumulated.
        assert_eq!(s.get_checkpoint(&id).unwrap().unwrap(), b"ck2");
        assert_eq!(s.get_sample(&id, 0).unwrap().unwrap(), b"s0");
        assert_eq!(s.checkpoint_bytes(), 5);
        s.clear_checkpoints(&id).unwrap();
        assert!(s.get_checkpoint(&id).unwrap().is_none());
        assert_eq!(s.checkpoint_bytes(), 0);
        let r = s.get_results(&id).unwrap();
        assert_eq!(r, vec![("report.json".to_string(), b"{}".to_vec())]);
        assert_eq!(s.list_jobs().unwrap().len(), 1);
        // Ids keep increasing across reopen.
        assert_ne!(s.next_job_id().unwrap(), id);
    }
}
