//! One job's life: wait for a run slot, build the problem, drive the sampler state
//! machine over the [`Dispatcher`](crate::dispatch::Dispatcher), checkpoint, and store
//! the results.
//!
//! Each round the sampler's deterministic batch plan (`plan_batches(batch_size)`, with the
//! batch size fixed in the job) becomes one [`WireBatch`] per group of patch indices, all
//! queued at once. A batch carries a read-only view of x_t
//! ([`PatchSource`](dmqsm_common::diffusion::sampler::PatchSource)), not its values: it is
//! cut when a worker takes it, straight into that worker's shared-memory slot or stacked
//! for the socket. Answers are handed to the sampler in plan order as they arrive, while
//! later batches are still being cut and computed; the sampler sums per-patch results in
//! patch-index order, so the step is bitwise the same whatever worker answered which
//! batch, in which order, after how many retries.
//!
//! Every `checkpoint_every` steps the sampler state is written to sled and flushed
//! before the job moves on; a restarted coordinator resumes from there and computes the
//! same bits (noise is a pure function of seed, step and voxel).

use crate::dispatch::{BatchInputs, DispatchError, WireBatch};
use crate::error::CoordinatorError;
use crate::job::{JobRecord, JobSpec, JobState, unix_now};
use crate::state::{JobHandle, Shared};
use dmqsm_common::diffusion::sampler::{
    Checkpoint, Guidance, Reconstruction, RoundKind, Sampler, SamplerSettings,
};
use dmqsm_common::patch::GridSpacing;
use dmqsm_common::tasks::Problem;
use dmqsm_proto::v1;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{oneshot, watch};

/// How a run ended early.
enum Stop {
    Cancelled,
    Failed(String),
    /// The coordinator is shutting down: the job stays `running` and resumes on the next
    /// start from its checkpoint.
    Shutdown,
    /// A worker whose answers this run used was proven wrong: start over.
    Tainted(String),
}

/// How many times a job starts over because a worker it used was proven wrong, before
/// it fails.
const MAX_TAINT_RESTARTS: u32 = 3;

impl From<dmqsm_common::Error> for Stop {
    fn from(e: dmqsm_common::Error) -> Self {
        Stop::Failed(e.to_string())
    }
}

impl From<CoordinatorError> for Stop {
    fn from(e: CoordinatorError) -> Self {
        Stop::Failed(e.to_string())
    }
}

/// The sampler settings of sample `k` of a job.
pub fn sampler_settings(spec: &JobSpec, k: u32) -> SamplerSettings {
    SamplerSettings {
        steps: spec.steps as usize,
        eta: spec.eta,
        xi: spec.xi,
        guidance: spec.guidance,
        spacing: GridSpacing::Overlap(spec.overlap as usize),
        shift_grid: false,
        clamp_ppm: None,
        seed: spec.seed.wrapping_add(k as u64),
        start_timestep: spec.start_timestep.map(|t| t as usize),
    }
}

/// Runs a job to its end and records the outcome. Never panics on job errors: they end
/// the job as failed with a message naming job, worker and cause.
pub(crate) async fn run_job(shared: Arc<Shared>, job_id: String) {
    let Some(handle) = shared.handle(&job_id) else {
        return;
    };
    let mut cancel = handle.cancel.subscribe();
    let mut stopping = shared.stopping.subscribe();
    // Wait for a run slot (bounded concurrent samplers), or a cancel, or shutdown.
    let permit = tokio::select! {
        p = shared.run_slots.clone().acquire_owned() => p.ok().ok_or(Stop::Shutdown),
        _ = cancel.wait_for(|c| *c) => Err(Stop::Cancelled),
        _ = stopping.wait_for(|s| *s) => Err(Stop::Shutdown),
    };
    let outcome = match permit {
        Err(stop) => Err(stop),
        Ok(_permit) => {
            // A bug must fail the job with a message, never leave it hanging.
            use futures::FutureExt;
            let mut restarts = 0;
            loop {
                let run = std::panic::AssertUnwindSafe(execute(
                    &shared,
                    &job_id,
                    &handle,
                    cancel.clone(),
                ));
                let r = match run.catch_unwind().await {
                    Ok(r) => r,
                    Err(p) => {
                        let what = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "unknown panic".into());
                        Err(Stop::Failed(format!(
                            "internal error in the coordinator: {what}"
                        )))
                    }
                };
                match r {
                    Err(Stop::Tainted(worker)) if restarts < MAX_TAINT_RESTARTS => {
                        restarts += 1;
                        if let Err(e) = start_over(&shared, &job_id, &worker) {
                            break Err(e);
                        }
                    }
                    Err(Stop::Tainted(worker)) => {
                        break Err(Stop::Failed(format!(
                            "started over {restarts} times because workers it used were \
                             proven wrong (last: {worker}); check the workers"
                        )));
                    }
                    other => break other,
                }
            }
        }
    };
    shared.dispatcher.close_job(&job_id);
    shared.admission.release(&job_id);
    shared
        .prepared
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&job_id);
    let mut rec = match shared.store.get_job(&job_id) {
        Ok(Some(r)) => r,
        _ => return,
    };
    let outcome = match outcome {
        Err(Stop::Tainted(w)) => Err(Stop::Failed(format!(
            "worker {w}, whose answers it used, was proven wrong"
        ))),
        other => other,
    };
    match outcome {
        Ok(()) => {}
        Err(Stop::Tainted(_)) => {}
        Err(Stop::Shutdown) => {
            tracing::info!(job = %job_id, step = rec.step, "job paused for shutdown; it resumes on the next start");
            let _ = shared.store.flush();
            return;
        }
        Err(Stop::Cancelled) => {
            rec.state = JobState::Cancelled;
            rec.error = Some(format!("job {job_id}: cancelled by user"));
            rec.finished_unix = Some(unix_now());
            rec.log("cancelled");
            let _ = shared.store.clear_checkpoints(&job_id);
            tracing::info!(job = %job_id, "job cancelled");
        }
        Err(Stop::Failed(msg)) => {
            let msg = if msg.contains(&job_id) {
                msg
            } else {
                format!("job {job_id}: {msg}")
            };
            rec.state = JobState::Failed;
            rec.error = Some(msg.clone());
            rec.finished_unix = Some(unix_now());
            rec.log(format!("failed: {msg}"));
            let _ = shared.store.clear_checkpoints(&job_id);
            tracing::error!(job = %job_id, "job failed: {msg}");
        }
    }
    if let Err(e) = shared
        .store
        .put_job(&rec)
        .and_then(|_| shared.store.flush())
    {
        tracing::error!(job = %job_id, "cannot record the job's end: {e}");
    }
    handle.progress.send_replace(v1::JobProgress {
        status: Some(v1::JobStatus::from(&rec)),
        ..Default::default()
    });
}

/// Drops everything a job computed (checkpoints, samples, progress) after `worker`,
/// whose answers it used, was proven wrong; the next run starts from the beginning and,
/// with honest workers, gives the bits an undisturbed run gives.
fn start_over(shared: &Shared, job_id: &str, worker: &str) -> std::result::Result<(), Stop> {
    tracing::warn!(job = %job_id, %worker, "starting the job over: it used answers of an untrusted worker");
    shared.store.clear_checkpoints(job_id)?;
    let mut rec = shared
        .store
        .get_job(job_id)?
        .ok_or_else(|| Stop::Failed(format!("job {job_id} vanished from the store")))?;
    rec.step = 0;
    rec.sample = 0;
    rec.workers_used.clear();
    rec.log(format!(
        "started over: worker {worker}, whose answers it used, was proven wrong by a spot check"
    ));
    shared.store.put_job(&rec)?;
    Ok(())
}

/// Progress bookkeeping for `WatchJob`.
struct Meter {
    started: Instant,
    rounds_done: u64,
    patches_done: u64,
    rounds_per_step: u64,
}

impl Meter {
    fn report(&self, shared: &Shared, rec: &JobRecord) -> v1::JobProgress {
        let elapsed = self.started.elapsed().as_secs_f64();
        let total = rec.spec.samples as u64 * rec.spec.steps as u64;
        let done = rec.sample as u64 * rec.spec.steps as u64 + rec.step as u64;
        let steps_left = total.saturating_sub(done);
        let eta = if self.rounds_done > 0 {
            elapsed / self.rounds_done as f64 * (steps_left * self.rounds_per_step) as f64
        } else {
            0.0
        };
        v1::JobProgress {
            status: Some(v1::JobStatus::from(rec)),
            eta_seconds: eta,
            patches_per_second: if elapsed > 0.0 {
                self.patches_done as f64 / elapsed
            } else {
                0.0
            },
            workers: shared
                .dispatcher
                .load()
                .into_iter()
                .map(|w| v1::WorkerLoad {
                    worker_id: w.worker_id,
                    in_flight: w.in_flight,
                    batches_done: w.batches_done,
                })
                .collect(),
        }
    }
}

async fn execute(
    shared: &Arc<Shared>,
    job_id: &str,
    handle: &JobHandle,
    mut cancel: watch::Receiver<bool>,
) -> std::result::Result<(), Stop> {
    let store = shared.store.clone();
    let mut rec = store
        .get_job(job_id)?
        .ok_or_else(|| Stop::Failed(format!("job {job_id} vanished from the store")))?;
    if rec.state.is_terminal() {
        return Ok(());
    }
    let run_start = Instant::now();
    let resuming = rec.state == JobState::Running;
    rec.state = JobState::Running;
    rec.started_unix.get_or_insert_with(unix_now);
    rec.log(if resuming {
        "restarted after a coordinator restart"
    } else {
        "started"
    });
    store.put_job(&rec)?;

    // Inputs → problem: the one built at submission, else (after a restart) from the
    // stored inputs, off the reactor.
    let cached = shared
        .prepared
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(job_id);
    let problem = match cached {
        Some(p) => p,
        None => {
            let measurement = store.get_input(job_id, "measurement")?.ok_or_else(|| {
                Stop::Failed(format!("job {job_id}: its measurement is not stored"))
            })?;
            let mask = store.get_input(job_id, "mask")?;
            let (spec, model) = (rec.spec.clone(), rec.model.clone());
            Arc::new(
                shared
                    .compute
                    .run("problem builder", move || {
                        crate::problem::build_problem(&spec, &model, &measurement, mask.as_deref())
                    })
                    .await?,
            )
        }
    };
    shared
        .dispatcher
        .open_job(job_id, rec.spec.priority, &rec.model.content_hash);

    let mut meter = Meter {
        started: Instant::now(),
        rounds_done: 0,
        patches_done: 0,
        rounds_per_step: if rec.spec.guidance == Guidance::Exact {
            2
        } else {
            1
        },
    };
    let mut samples: Vec<Reconstruction> = Vec::new();
    for k in 0..rec.spec.samples {
        if let Some(bytes) = store.get_sample(job_id, k)? {
            samples.push(crate::results::decode_sample(&bytes).map_err(Stop::Failed)?);
            continue;
        }
        let settings = sampler_settings(&rec.spec, k);
        let resumes = rec.resumed_from.len();
        let mut sampler = start_sampler(shared, &mut rec, &problem, settings).await?;
        rec.sample = k;
        rec.step = sampler.progress().step as u32;
        store.put_job(&rec)?;
        if rec.resumed_from.len() != resumes {
            // A resume is part of the job's history: durable before the job moves on,
            // not only at sled's next periodic sync.
            store.flush()?;
        }
        handle.progress.send_replace(meter.report(shared, &rec));
        let stopping = shared.stopping.subscribe();
        let mut step_started = Instant::now();
        while !sampler.is_finished() {
            sampler = run_round(shared, &mut rec, sampler, &mut meter, &mut cancel).await?;
            if let Some(w) = rec
                .workers_used
                .keys()
                .find(|w| shared.dispatcher.is_untrusted(w))
            {
                return Err(Stop::Tainted(w.clone()));
            }
            let step = sampler.progress().step as u32;
            if step != rec.step {
                rec.step = step;
                let every = shared.config.checkpoint_every;
                let stop_now = *stopping.borrow();
                let mut checkpointed = false;
                if !sampler.is_finished() && (stop_now || (every > 0 && step.is_multiple_of(every)))
                {
                    let t = Instant::now();
                    let ck = sampler.checkpoint();
                    let (store2, id) = (store.clone(), job_id.to_string());
                    crate::compute::blocking("checkpoint writer", move || {
                        let bytes = ck.to_bytes()?;
                        store2.put_checkpoint(&id, &bytes)
                    })
                    .await?;
                    rec.log(format!("checkpoint at step {step} of sample {k}"));
                    rec.timings.coordinator_numerics_s += t.elapsed().as_secs_f64();
                    checkpointed = true;
                }
                store.put_job(&rec)?;
                if checkpointed {
                    // The record that names the checkpoint is as durable as the file.
                    store.flush()?;
                }
                if stop_now && !sampler.is_finished() {
                    rec.log(format!("paused for shutdown at step {step} of sample {k}"));
                    store.put_job(&rec)?;
                    return Err(Stop::Shutdown);
                }
                shared.config.metrics.step_finished(step_started.elapsed());
                step_started = Instant::now();
            }
            handle.progress.send_replace(meter.report(shared, &rec));
        }
        let result = sampler.result()?;
        if rec.spec.samples > 1 {
            let bytes = crate::results::encode_sample(&result);
            store.put_sample(job_id, k, &bytes)?;
        }
        samples.push(result);
        rec.sample = k + 1;
        rec.log(format!("sample {k} finished"));
        store.put_job(&rec)?;
    }

    // Results.
    rec.timings.running_s += run_start.elapsed().as_secs_f64();
    let files = {
        let rec2 = rec.clone();
        shared
            .compute
            .run("result writer", move || {
                crate::results::build_results(&rec2, &samples)
            })
            .await?
    };
    for (name, bytes) in &files {
        store.put_result(job_id, name, bytes)?;
    }
    store.clear_checkpoints(job_id)?;
    rec.state = JobState::Succeeded;
    rec.step = rec.spec.steps;
    rec.sample = rec.spec.samples;
    rec.finished_unix = Some(unix_now());
    rec.log("succeeded");
    store.put_job(&rec)?;
    store.flush()?;
    handle.progress.send_replace(meter.report(shared, &rec));
    tracing::info!(job = %job_id, "job succeeded");
    Ok(())
}

/// A new sampler for `settings`, or the one restored from the job's checkpoint when it
/// belongs to this sample (same seed) and problem.
async fn start_sampler(
    shared: &Shared,
    rec: &mut JobRecord,
    problem: &Arc<Problem>,
    settings: SamplerSettings,
) -> std::result::Result<Sampler, Stop> {
    let ck = shared.store.get_checkpoint(&rec.job_id)?;
    let (p, spec) = (problem.clone(), rec.model.clone());
    let restored = shared
        .compute
        .run("sampler setup", move || {
            if let Some(bytes) = ck {
                match Checkpoint::from_bytes(&bytes) {
                    Ok(ck) if ck.settings == settings => {
                        let s = Sampler::restore(p, &spec, &ck)?;
                        return Ok((s, Some(ck.step)));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("ignoring unreadable checkpoint: {e}"),
                }
            }
            Ok((Sampler::new(p, &spec, settings)?, None))
        })
        .await?;
    let (sampler, from) = restored;
    if let Some(step) = from {
        rec.resumed_from.push(step as u32);
        rec.log(format!("resumed from the checkpoint at step {step}"));
        tracing::info!(job = %rec.job_id, step, "resumed from checkpoint");
    }
    Ok(sampler)
}

/// Builds the round's batches, runs them on the workers and completes the round.
async fn run_round(
    shared: &Arc<Shared>,
    rec: &mut JobRecord,
    mut sampler: Sampler,
    meter: &mut Meter,
    cancel: &mut watch::Receiver<bool>,
) -> std::result::Result<Sampler, Stop> {
    let job_id = rec.job_id.clone();
    let round = sampler
        .round()
        .ok_or_else(|| Stop::Failed("the sampler has no open round".into()))?;
    let batch_size = rec.spec.batch_size as usize;
    let dtype = shared.config.wire_dtype;
    let hash = rec.model.content_hash.clone();
    let label = format!(
        "sample {} step {}/{} {}",
        rec.sample,
        round.id.step + 1,
        rec.spec.steps,
        match round.id.kind {
            RoundKind::Eps => "eps",
            RoundKind::Vjp => "vjp",
        }
    );
    let t0 = Instant::now();
    // 1. Queue every batch at once. A batch holds a read-only view of x_t, not its
    //    values: it is cut when a worker takes it, straight into that worker's
    //    shared-memory slot (or stacked for the socket), so the workers start on the first
    //    batches while the later ones are cut, and the answers are taken (step 2)
    //    meanwhile.
    let source = sampler.patch_source()?;
    let plan = sampler.plan_batches(batch_size)?;
    let n = plan.len();
    let mut receivers: VecDeque<_> = plan
        .iter()
        .enumerate()
        .map(|(b, indices)| {
            shared.dispatcher.submit(WireBatch {
                job_id: job_id.clone(),
                label: format!("{label} batch {}/{n}", b + 1),
                round: round.id,
                indices: indices.clone(),
                model_hash: hash.clone(),
                timesteps: vec![round.timestep as f32; indices.len()],
                dtype,
                inputs: BatchInputs::Cut(source.clone()),
            })
        })
        .collect();
    drop(source);
    // 2. Take the answers in plan order as they arrive; each group of answers already in
    //    is handed to the sampler at once, which reassembles ε̂ slab by slab meanwhile.
    //    The result does not depend on the order of arrival (the sampler sums per voxel
    //    in patch order). Only the time spent waiting on an answer whose batch is queued
    //    counts as waiting for the workers.
    let mut waiting = std::time::Duration::ZERO;
    while let Some(first) = receivers.pop_front() {
        let w = Instant::now();
        // `None`: the dispatcher dropped the batch without an answer.
        let first = tokio::select! {
            r = first => r.ok(),
            _ = cancel.wait_for(|c| *c) => return Err(Stop::Cancelled),
        };
        waiting += w.elapsed();
        let mut arrived = vec![first];
        while let Some(next) = receivers.front_mut() {
            match next.try_recv() {
                Ok(r) => arrived.push(Some(r)),
                Err(oneshot::error::TryRecvError::Empty) => break,
                Err(oneshot::error::TryRecvError::Closed) => arrived.push(None),
            }
            receivers.pop_front();
        }
        let mut outcomes = Vec::with_capacity(arrived.len());
        for a in arrived {
            match a {
                Some(Ok(o)) => outcomes.push(o),
                Some(Err(DispatchError::Cancelled { .. })) | None if *cancel.borrow() => {
                    return Err(Stop::Cancelled);
                }
                Some(Err(e)) => return Err(Stop::Failed(e.to_string())),
                None => {
                    return Err(Stop::Failed(format!(
                        "{label}: the dispatcher dropped a batch without an answer"
                    )));
                }
            }
        }
        for o in &outcomes {
            *rec.workers_used.entry(o.worker_id.clone()).or_insert(0) += 1;
            rec.retries += o.retries;
            if o.retries > 0 {
                rec.log(format!(
                    "a batch of {label} succeeded on worker {} after {} retries",
                    o.worker_id, o.retries
                ));
            }
        }
        sampler = {
            let (job, label) = (job_id.clone(), label.clone());
            shared
                .compute
                .run("answer intake", move || {
                    let mut sampler = sampler;
                    // The answers were decoded and checked at the edge (the dispatcher); the
                    // sampler keeps their rows as they are.
                    for o in outcomes {
                        let worker = o.worker_id;
                        sampler
                            .accept(o.results)
                            .map_err(|e| CoordinatorError::JobFailed {
                                job: job.clone(),
                                cause: format!(
                                    "{label}: result from worker {worker} rejected: {e}"
                                ),
                            })?;
                    }
                    Ok(sampler)
                })
                .await?
        };
    }
    // 3. Finish the round: the last slab of ε̂, then the step's volume math.
    let patches: usize = plan.iter().map(Vec::len).sum();
    let sampler = shared
        .compute
        .run("round completion", move || {
            sampler.complete_round()?;
            Ok(sampler)
        })
        .await?;
    let wall = t0.elapsed();
    rec.timings.waiting_for_workers_s += waiting.as_secs_f64();
    rec.timings.coordinator_numerics_s += wall.saturating_sub(waiting).as_secs_f64();
    meter.rounds_done += 1;
    meter.patches_done += patches as u64;
    Ok(sampler)
}
