//! Coordinator benchmarks, one command each (release build):
//!
//! ```text
//! cargo bench -p dmqsm-coordinator --bench coordinator -- overhead
//! cargo bench -p dmqsm-coordinator --bench coordinator -- scaling
//! cargo bench -p dmqsm-coordinator --bench coordinator -- throughput
//! cargo bench -p dmqsm-coordinator --bench coordinator -- threads
//! cargo bench -p dmqsm-coordinator --bench coordinator -- disk
//! ```
//!
//! - `overhead`: one job through coordinator + 1 worker over loopback gRPC against the
//!   in-process reference driver with the same model (the default ~0.6 M-parameter 3D
//!   U-Net, 48³ patches, CPU). Also checks the two outputs are bitwise equal.
//! - `scaling`: the realistic case first: 160×192×160 volumes, 48³ patches, overlap 8
//!   (80 patches a round), `dipinv-physics` in each guidance mode (approx, prox with the
//!   plain CG step, exact) and `dipinv` with approx (A = I: the patch path without FFTs),
//!   1 and 4 concurrent jobs, on 1, 2, 4 and 8 workers that are separate `dmqsm-worker`
//!   processes modelling a GPU: 1 ms per batch + 1 ms per patch spent sleeping (no CPU),
//!   analytic ε. It prints the efficiency T₁/(n·Tₙ) (also of the time inside the rounds
//!   alone, which a long job approaches), the non-model share of a step
//!   (1 − the workers' simulated busy time on the critical path / wall time; also inside
//!   the rounds alone, without the per-job set-up and result files, which only 3 steps
//!   cannot amortise), the
//!   coordinator's CPU per patch (this process: coordinator and client; with its system
//!   share and its minor page faults per patch), the bytes of patch tensors on the
//!   wire per patch and the CPU the worker processes spent per patch (reading their
//!   inputs, the analytic ε, writing their answers: on a machine with few cores it
//!   competes with the coordinator). Each row is one warm-up run and then 3 timed runs
//!   (`DMQSM_SCALING_REPEAT`); it reports the run with the median wall time and lists all
//!   three. `DMQSM_SCALING_ONLY=dipinv-approx`, `DMQSM_SCALING_JOBS=1` and
//!   `DMQSM_SCALING_WORKERS=1,8` pick rows (and skip the old one);
//!   `DMQSM_SCALING_STEPS=25` runs jobs of the API's default length instead of 3 steps.
//!   The workers run on this host, so their patch tensors go through shared memory (`dmqsm_proto::shm`; each
//!   row says for how many workers); `DMQSM_SCALING_TRANSPORT=socket` sends them over
//!   loopback gRPC instead, as a coordinator does with workers on other nodes, and
//!   `DMQSM_BENCH_PURGE_FREED=1` gives the freed pages of this process back to the
//!   kernel as mimalloc does by default (`dmqsm_common::allocator`). Then the old small
//!   row (64³, 16³ patches, 40 ms per batch: the coordinator's work is ~1 % of a step
//!   there, which hides its cost).
//! - `throughput`: 4 instant workers (analytic model, no latency): patches/s and MB/s on
//!   the wire (requests + answers), f32 and bf16.
//! - `threads`: the coordinator's own cost with instant workers at the realistic size
//!   (160×192×160, 48³ patches, overlap 8, `dipinv` approx, 25 steps, 1 job, 8
//!   `dmqsm-worker` processes that answer at once with the analytic ε): patches per
//!   second and process CPU per patch with the coordinator and its client confined to
//!   the first T cores (`sched_setaffinity`) and given T threads, as `dmqsm serve
//!   --threads T` does, for T = 1, 2, 4, … up to the machine's cores. The workers are
//!   started first and may run on every core. `DMQSM_THREADS=1,2` picks rows,
//!   `DMQSM_THREADS_STEPS` and `DMQSM_THREADS_REPEAT` (3 timed runs after a warm-up; the
//!   median is reported) change the run.
//! - `disk`: a long job (checkpoints every 5 steps): sled's disk use during and after.
//!
//! Timings are wall-clock on whatever machine runs them; compare ratios, not seconds.

use dmqsm_common::Volume;
use dmqsm_common::diffusion::analytic::GaussianPriorModel;
use dmqsm_common::diffusion::model::ScoreModel;
use dmqsm_common::diffusion::schedule::ScheduleConfig;
use dmqsm_common::geometry::B0Direction;
use dmqsm_coordinator::job::JobSpec;
use dmqsm_coordinator::{Coordinator, CoordinatorConfig, client};
use dmqsm_proto::v1;
use dmqsm_worker::batching::BatchConfig;
use dmqsm_worker::unet::{UNetConfig, seeded};
use dmqsm_worker::{
    DeviceSpec, EvalOptions, ModelCard, ServedModel, ServerConfig, SimulatedModel, TorchModel,
};
use ndarray::Array3;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The `dmqsm` binary's allocator, so that this process, which plays the coordinator,
/// allocates like it (`coordinator/src/main.rs`).
#[global_allocator]
static ALLOCATOR: dmqsm_common::allocator::Allocator = dmqsm_common::allocator::Allocator;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Field (ppm) and mask NIfTI bytes of a smooth phantom on an n³ grid at 1 mm.
fn inputs(n: usize) -> AnyResult<(Vec<u8>, Vec<u8>)> {
    inputs_shaped([n; 3])
}

fn request(m: &[u8], k: &[u8], settings: v1::JobSettings) -> v1::SubmitJobRequest {
    let vi = |b: &[u8]| {
        Some(v1::VolumeInput {
            source: Some(v1::volume_input::Source::Nifti(b.to_vec().into())),
        })
    };
    v1::SubmitJobRequest {
        measurement: vi(m),
        mask: vi(k),
        settings: Some(settings),
        label: "bench".into(),
    }
}

fn settings(steps: u32, overlap: u32, batch: u32) -> v1::JobSettings {
    v1::JobSettings {
        task: v1::Task::Dipinv as i32,
        steps: Some(steps),
        eta: 0.0,
        guidance: v1::Guidance::Approx as i32,
        // A fixed DPS step: the default (0.5·1000/steps) diverges on this smooth phantom
        // at 20 steps, and the benches time the machinery, not the reconstruction.
        xi: Some(1.0),
        overlap: Some(overlap),
        seed: 1,
        samples: Some(1),
        batch_size: batch,
        ..Default::default()
    }
}

struct Setup {
    workers: Vec<dmqsm_worker::LocalWorker>,
    coordinator: Coordinator,
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn setup(
    models: Vec<ServedModel>,
    worker_batch: BatchConfig,
    tune: impl FnOnce(&mut CoordinatorConfig),
) -> AnyResult<Setup> {
    let mut workers = Vec::new();
    for (i, m) in models.into_iter().enumerate() {
        let config = ServerConfig {
            worker_id: Some(format!("w{i}")),
            batch: worker_batch,
            ..Default::default()
        };
        workers.push(dmqsm_worker::spawn_local_worker(m, config).await?);
    }
    let dir = tempfile::tempdir()?;
    let mut config = CoordinatorConfig::new(dir.path());
    config.checkpoint_every = 0;
    config.max_in_flight_per_worker = 2;
    tune(&mut config);
    let urls: Vec<String> = workers.iter().map(|w| w.url()).collect();
    let coordinator = Coordinator::start(config, &urls).await?;
    let (addr, stop, _h) =
        dmqsm_coordinator::spawn_server(coordinator.clone(), "127.0.0.1:0".parse()?).await?;
    Ok(Setup {
        workers,
        coordinator,
        url: format!("http://{addr}"),
        stop,
        _dir: dir,
    })
}

impl Setup {
    async fn close(self) {
        let _ = self.stop.send(());
        self.coordinator.shutdown().await;
        for w in self.workers {
            let _ = w.shutdown().await;
        }
    }
}

/// Runs one job end to end; returns (seconds from submit to succeeded, χ).
async fn timed_job(url: &str, req: v1::SubmitJobRequest) -> AnyResult<(f64, Array3<f32>)> {
    let run = timed_job_report(url, req).await?;
    Ok((run.secs, run.chi))
}

/// One job run end to end by [`timed_job_report`].
struct JobRun {
    /// Seconds from submission to `succeeded`.
    secs: f64,
    /// Seconds the `SubmitJob` call took: upload, decoding, the problem, storing inputs.
    submit_s: f64,
    /// Seconds fetching and decoding the result files.
    fetch_s: f64,
    /// The reconstruction (ppm).
    chi: Array3<f32>,
    /// The job's report.json.
    report: serde_json::Value,
}

/// Like [`timed_job`], also returning the job's report.json and the phases' times.
async fn timed_job_report(url: &str, req: v1::SubmitJobRequest) -> AnyResult<JobRun> {
    let mut c = client::connect(url).await?;
    let t = Instant::now();
    let id = c.submit_job(req).await?.into_inner().job_id;
    let submit_s = t.elapsed().as_secs_f64();
    let st = client::wait(&mut c, &id, |_| {}).await?;
    let secs = t.elapsed().as_secs_f64();
    if st.state != v1::JobState::Succeeded as i32 {
        return Err(format!("job failed: {}", st.error).into());
    }
    let files = client::fetch(&mut c, &id).await?;
    let chi = files.iter().find(|f| f.0 == "chi.nii.gz").ok_or("no chi")?;
    let report = files
        .iter()
        .find(|f| f.0 == "report.json")
        .ok_or("no report")?;
    let chi = dmqsm_common::nifti_io::read_nifti_bytes(&chi.1)?.data;
    let report = serde_json::from_slice(&report.1)?;
    Ok(JobRun {
        secs,
        submit_s,
        fetch_s: t.elapsed().as_secs_f64() - secs,
        chi,
        report,
    })
}

fn reference(
    model: &dyn ScoreModel,
    req: &v1::SubmitJobRequest,
    m: &[u8],
    k: &[u8],
) -> AnyResult<(f64, Array3<f32>)> {
    let t = Instant::now();
    let settings = req.settings.as_ref().ok_or("settings")?;
    let spec = JobSpec::from_proto(settings, 4)?;
    let problem = dmqsm_coordinator::problem::build_problem(&spec, model.spec(), m, Some(k))?;
    let s = dmqsm_coordinator::runner::sampler_settings(&spec, 0);
    let r = dmqsm_common::driver::sample(model, Arc::new(problem), &s, spec.batch_size as usize)?;
    Ok((t.elapsed().as_secs_f64(), r.chi.data))
}

async fn overhead() -> AnyResult<()> {
    let p = 48;
    let config = UNetConfig::default();
    config.validate(p)?;
    let (mut vs, net) = seeded(&config, tch::Device::Cpu, 0);
    let card = ModelCard::for_unet(
        "bench-unet",
        &config,
        p,
        ScheduleConfig::default(),
        10.0,
        0,
        "",
    );
    let model = TorchModel::from_unet(
        &mut vs,
        &net,
        card,
        DeviceSpec::Cpu,
        EvalOptions::for_device(DeviceSpec::Cpu),
    )?;
    let params = model.card().parameter_count;
    let model = Arc::new(model);
    let (m, k) = inputs(64)?;
    // An untrained (seeded) U-Net's ε is far from a score: with approx guidance its x̂₀
    // drifts until the sampler's divergence check stops the job (at step 5, for any ξ).
    // Prox guidance with its default weight keeps the residual bounded (ξ = 1 is too
    // weak: step 5 again); the bench times the machinery, not the reconstruction.
    let req = request(
        &m,
        &k,
        v1::JobSettings {
            guidance: v1::Guidance::Prox as i32,
            xi: None,
            ..settings(6, 8, 4)
        },
    );
    println!(
        "overhead: U-Net {:?} ({params} parameters), 64³ volume, 48³ patches, overlap 8 \
         (8 patches/round), 6 DDIM steps, batch 4, CPU",
        config.widths
    );
    let served = ServedModel::new(model.clone(), "cpu", 1, "f32");
    let s = setup(vec![served], BatchConfig::default(), |_| {}).await?;
    let mut best_ref = f64::INFINITY;
    let mut best_coord = f64::INFINITY;
    for rep in 0..2 {
        let (mm, kk, rq, md) = (m.clone(), k.clone(), req.clone(), model.clone());
        let (t_ref, chi_ref) = tokio::task::spawn_blocking(move || {
            reference(md.as_ref(), &rq, &mm, &kk).map_err(|e| e.to_string())
        })
        .await??;
        let (t_coord, chi) = timed_job(&s.url, req.clone()).await?;
        let same = chi
            .iter()
            .zip(chi_ref.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits());
        println!(
            "  rep {rep}: reference {t_ref:.2} s, coordinator + 1 worker {t_coord:.2} s, \
             ratio {:.3}, bitwise equal: {same}",
            t_coord / t_ref
        );
        best_ref = best_ref.min(t_ref);
        best_coord = best_coord.min(t_coord);
    }
    println!(
        "overhead: best reference {best_ref:.2} s, best coordinator {best_coord:.2} s, \
         ratio {:.3} (target ≤ 1.05)",
        best_coord / best_ref
    );
    s.close().await;
    Ok(())
}

/// What this process has used so far, from `/proc/self/stat` (Linux; clock ticks of
/// 1/100 s, the x86-64 and arm64 value): NaN where it cannot be read.
#[derive(Clone, Copy, Default)]
struct ProcessUse {
    /// User CPU seconds, all threads.
    user_s: f64,
    /// System CPU seconds, all threads.
    sys_s: f64,
    /// Minor page faults (first touches of fresh pages, mostly).
    minor_faults: f64,
}

impl ProcessUse {
    fn now() -> Self {
        Self::of("self")
    }

    /// What the processes `pids` have used so far, summed.
    fn of_all(pids: &[u32]) -> Self {
        pids.iter()
            .map(|p| Self::of(&p.to_string()))
            .fold(ProcessUse::default(), |a, b| ProcessUse {
                user_s: a.user_s + b.user_s,
                sys_s: a.sys_s + b.sys_s,
                minor_faults: a.minor_faults + b.minor_faults,
            })
    }

    /// What process `pid` (a number, or `self`) has used so far.
    fn of(pid: &str) -> Self {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the parenthesised command name: minflt is field 10, utime and
        // stime are 14 and 15 (1-based, counting the pid as 1).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| {
            f.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        ProcessUse {
            user_s: field(11) / 100.0,
            sys_s: field(12) / 100.0,
            minor_faults: field(7),
        }
    }

    /// What was used since `earlier`.
    fn since(self, earlier: ProcessUse) -> ProcessUse {
        ProcessUse {
            user_s: self.user_s - earlier.user_s,
            sys_s: self.sys_s - earlier.sys_s,
            minor_faults: self.minor_faults - earlier.minor_faults,
        }
    }
}

/// Field and mask NIfTI bytes of a smooth phantom on a `shape` grid at 1 mm.
fn inputs_shaped(shape: [usize; 3]) -> AnyResult<(Vec<u8>, Vec<u8>)> {
    let c = shape.map(|n| (n as f64 - 1.0) / 2.0);
    let r0 = 0.42 * shape.iter().copied().min().unwrap_or(1) as f64;
    let mask = Array3::from_shape_fn(shape, |(i, j, k)| {
        let r = ((i as f64 - c[0]).powi(2) + (j as f64 - c[1]).powi(2) + (k as f64 - c[2]).powi(2))
            .sqrt();
        if r < r0 { 1.0f32 } else { 0.0 }
    });
    let chi = Array3::from_shape_fn(shape, |(i, j, k)| {
        0.1 * ((i as f32) * 0.2).sin() * ((j + k) as f32 * 0.15).cos() * mask[[i, j, k]]
    });
    let b0 = B0Direction::new([0.0, 0.0, 1.0])?;
    let field = dmqsm_common::simulate::forward_field(&Volume::new(chi, [1.0; 3]), b0)?;
    let masked = &field.data * &mask;
    Ok((
        dmqsm_common::nifti_io::write_nifti_bytes(&field.like(masked), true)?,
        dmqsm_common::nifti_io::write_nifti_bytes(&Volume::new(mask, [1.0; 3]), true)?,
    ))
}

/// One timed run of the scaling bench: `jobs` identical jobs submitted at once.
#[derive(Clone, Copy)]
struct ScalingRun {
    /// Seconds from the first submission to the last job's files fetched.
    wall: f64,
    /// What this process (coordinator and client) used meanwhile.
    used: ProcessUse,
    /// The jobs' `coordinator_numerics` seconds, summed.
    numerics: f64,
    /// The longest job's time inside its rounds (encode, wait, finish the step), as
    /// against its set-up (inputs, problem) and result files.
    in_rounds: f64,
    /// The longest `SubmitJob` call (upload, decoding, the problem, storing the inputs).
    submit_s: f64,
    /// The longest fetch of a job's result files, with decoding χ.
    fetch_s: f64,
}

async fn concurrent_jobs(
    url: &str,
    jobs: usize,
    m: &[u8],
    k: &[u8],
    settings: &v1::JobSettings,
) -> AnyResult<ScalingRun> {
    let use0 = ProcessUse::now();
    let t = Instant::now();
    let runs: Vec<_> = (0..jobs)
        .map(|_| timed_job_report(url, request(m, k, settings.clone())))
        .collect();
    let results = futures::future::join_all(runs).await;
    let wall = t.elapsed().as_secs_f64();
    let used = ProcessUse::now().since(use0);
    let (mut numerics, mut in_rounds) = (0.0, 0.0f64);
    let (mut submit_s, mut fetch_s) = (0.0f64, 0.0f64);
    for r in results {
        let run = r?;
        let t = |k: &str| run.report["timings_s"][k].as_f64().unwrap_or(0.0);
        numerics += t("coordinator_numerics");
        in_rounds = in_rounds.max(t("coordinator_numerics") + t("waiting_for_workers"));
        submit_s = submit_s.max(run.submit_s);
        fetch_s = fetch_s.max(run.fetch_s);
    }
    Ok(ScalingRun {
        wall,
        used,
        numerics,
        in_rounds,
        submit_s,
        fetch_s,
    })
}

/// Whether `value` is among the comma-separated numbers in the environment variable
/// `var` (all values when it is unset): `DMQSM_SCALING_WORKERS=1,8` runs two columns.
fn selected(var: &str, value: usize) -> bool {
    match std::env::var(var) {
        Ok(list) => list.split(',').any(|v| v.trim().parse() == Ok(value)),
        Err(_) => true,
    }
}

/// `n` `dmqsm-worker` processes serving the analytic model on 48³ patches in batches of
/// at most `batch`, each call sleeping `per_batch + B·per_patch` as a GPU would be busy
/// (zero: workers that answer at once).
async fn analytic_workers(
    n: usize,
    batch: usize,
    per_batch: Duration,
    per_patch: Duration,
) -> AnyResult<dmqsm_coordinator::local_workers::LocalWorkers> {
    use dmqsm_coordinator::local_workers::{LocalModel, LocalWorkerOptions, LocalWorkers};
    let model = LocalModel::Analytic {
        mean: 0.0,
        std: 0.5,
        patch_size: 48,
        chi_scale: 10.0,
    };
    let options = LocalWorkerOptions {
        max_batch: Some(batch),
        latency_per_batch: per_batch,
        latency_per_patch: per_patch,
        ..LocalWorkerOptions::default()
    };
    Ok(tokio::task::spawn_blocking(move || LocalWorkers::start(&model, &options, n)).await??)
}

/// The realistic scaling case (see the module docs).
async fn gpu_scaling() -> AnyResult<()> {
    const BATCH: u32 = 4;
    // `DMQSM_SCALING_STEPS=25` (the API's default) for a job whose set-up is amortised
    // as in real use; 3 steps by default, to keep the whole table short.
    let steps: u32 = std::env::var("DMQSM_SCALING_STEPS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(3);
    // `DMQSM_SCALING_REPEAT=1` for a quick look; 3 timed runs per row by default.
    let repeat = std::env::var("DMQSM_SCALING_REPEAT")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&r| r > 0)
        .unwrap_or(3);
    let shape = [160, 192, 160];
    // `DMQSM_SCALING_TRANSPORT=socket` sends every tensor over loopback gRPC, as before the
    // shared-memory data plane (`dmqsm serve --shared-memory-mib 0`).
    let socket_only = std::env::var("DMQSM_SCALING_TRANSPORT").is_ok_and(|t| t == "socket");
    let (per_batch, per_patch) = (Duration::from_millis(1), Duration::from_millis(1));
    let grid = dmqsm_common::patch::PatchGrid::new(
        shape,
        48,
        dmqsm_common::patch::GridSpacing::Overlap(8),
    )?;
    let patches = grid.len();
    let batches = patches.div_ceil(BATCH as usize);
    let (m, k) = inputs_shaped(shape)?;
    let p3 = 48f64.powi(3);
    println!(
        "scaling (realistic): {shape:?} volume, 48³ patches, overlap 8 ({patches} patches, \
         {batches} batches of {BATCH} a round), {steps} steps from noise, \
         workers = dmqsm-worker processes modelling a GPU ({} ms per batch + {} ms per patch, \
         sleeping), analytic ε, f32 on the wire, 2 batches in flight per worker",
        per_batch.as_millis(),
        per_patch.as_millis()
    );
    // dipinv-physics in each guidance mode (its data term costs FFTs every step), then
    // dipinv with approx (the API's default task and guidance: A = I on the TKD estimate,
    // so a step is the patch path alone, without FFTs).
    for (task, guidance) in [
        (v1::Task::DipinvPhysics, v1::Guidance::Approx),
        (v1::Task::DipinvPhysics, v1::Guidance::Prox),
        (v1::Task::DipinvPhysics, v1::Guidance::Exact),
        (v1::Task::Dipinv, v1::Guidance::Approx),
    ] {
        let task_name = task
            .as_str_name()
            .trim_start_matches("TASK_")
            .to_lowercase()
            .replace('_', "-");
        let guidance_name = guidance
            .as_str_name()
            .trim_start_matches("GUIDANCE_")
            .to_lowercase();
        // `DMQSM_SCALING_ONLY=dipinv-approx` (say) runs one row group, for profiling.
        let name = format!("{task_name}-{guidance_name}");
        if std::env::var("DMQSM_SCALING_ONLY").is_ok_and(|only| only != name) {
            continue;
        }
        let rounds_per_step = if guidance == v1::Guidance::Exact {
            2
        } else {
            1
        };
        // Patch tensors per patch and round: x in and ε out; a VJP round adds v in.
        let wire_per_patch = if rounds_per_step == 2 {
            (2.0 + 3.0) / 2.0
        } else {
            2.0
        } * p3
            * 4.0;
        for jobs in [1usize, 4] {
            if !selected("DMQSM_SCALING_JOBS", jobs) {
                continue;
            }
            // Wall time, and time inside the rounds, on 1 worker.
            let (mut t1, mut r1) = (f64::NAN, f64::NAN);
            for n in [1usize, 2, 4, 8] {
                if !selected("DMQSM_SCALING_WORKERS", n) {
                    continue;
                }
                let workers = analytic_workers(n, BATCH as usize, per_batch, per_patch).await?;
                let dir = tempfile::tempdir()?;
                let mut config = CoordinatorConfig::new(dir.path());
                config.checkpoint_every = 0;
                config.max_in_flight_per_worker = 2;
                config.max_running_jobs = jobs.max(1);
                if socket_only {
                    config.shared_memory_slot_bytes = 0;
                }
                let coordinator = Coordinator::start(config, &workers.urls()).await?;
                let through_shm = coordinator
                    .dispatcher()
                    .workers()
                    .iter()
                    .filter(|w| w.shared_memory)
                    .count();
                let (addr, stop, _h) =
                    dmqsm_coordinator::spawn_server(coordinator.clone(), "127.0.0.1:0".parse()?)
                        .await?;
                let url = format!("http://{addr}");
                let settings = v1::JobSettings {
                    task: task as i32,
                    steps: Some(steps),
                    eta: 0.0,
                    xi: Some(1.0),
                    guidance: guidance as i32,
                    overlap: Some(8),
                    seed: 1,
                    samples: Some(1),
                    batch_size: BATCH,
                    // The plain CG proximal step, as in the figures before the TV step
                    // became `dmqsm run`'s default; the TV step (an L-curve at set-up and
                    // up to 100 ADMM iterations a step) is coordinator work on top.
                    prox_tv: Some(0.0),
                    ..Default::default()
                };
                // A warm-up run (connections, the allocator's first pages), then `REPEAT`
                // timed ones; the run with the median wall time is reported.
                let _ = concurrent_jobs(&url, jobs, &m, &k, &settings).await?;
                let mut runs = Vec::with_capacity(repeat);
                let pids = workers.pids();
                let workers0 = ProcessUse::of_all(&pids);
                for _ in 0..repeat {
                    runs.push(concurrent_jobs(&url, jobs, &m, &k, &settings).await?);
                }
                let workers_used = ProcessUse::of_all(&pids).since(workers0);
                runs.sort_by(|a, b| a.wall.total_cmp(&b.wall));
                let walls: Vec<String> = runs.iter().map(|r| format!("{:.2}", r.wall)).collect();
                let run = runs[runs.len() / 2];
                let (wall, used, numerics, in_rounds) =
                    (run.wall, run.used, run.numerics, run.in_rounds);
                let cpu = used.user_s + used.sys_s;
                let _ = stop.send(());
                coordinator.shutdown().await;
                tokio::task::spawn_blocking(move || workers.shutdown()).await?;
                if n == 1 {
                    (t1, r1) = (wall, in_rounds);
                }
                let total_patches = (jobs * steps as usize * rounds_per_step * patches) as f64;
                // The workers' simulated busy time, spread evenly: the least a step can take.
                let busy = (jobs * steps as usize * rounds_per_step * batches) as f64
                    * (per_batch + per_patch * BATCH).as_secs_f64()
                    / n as f64;
                println!(
                    "  {:<14} {:<6} {jobs} job(s) {n} worker(s): {wall:6.2} s (of {}), \
                     efficiency {:.3} ({:.3} inside the rounds), non-model share {:.0} % \
                     ({:.0} % inside the rounds, which take {:.2} s of it; the submit call \
                     {:.2} s, the fetch {:.2} s), coordinator numerics {:.2} s ({:.2} \
                     ms/patch), process CPU {:.2} ms/patch ({:.0} % system), {:.0} page \
                     faults per patch, {:.0} KiB of patch tensors per patch, through shared \
                     memory for {through_shm} of {n} workers; the worker processes' CPU \
                     {:.2} ms/patch (all timed runs)",
                    task_name,
                    guidance_name,
                    walls.join(" "),
                    t1 / (n as f64 * wall),
                    r1 / (n as f64 * in_rounds),
                    100.0 * (1.0 - busy / wall).max(0.0),
                    100.0 * (1.0 - busy / in_rounds.max(busy)).max(0.0),
                    in_rounds,
                    run.submit_s,
                    run.fetch_s,
                    numerics,
                    1e3 * numerics / total_patches,
                    1e3 * cpu / total_patches,
                    100.0 * used.sys_s / cpu,
                    used.minor_faults / total_patches,
                    wire_per_patch / 1024.0,
                    1e3 * (workers_used.user_s + workers_used.sys_s)
                        / (total_patches * repeat as f64),
                );
            }
        }
    }
    Ok(())
}

async fn scaling() -> AnyResult<()> {
    gpu_scaling().await?;
    if std::env::var("DMQSM_SCALING_ONLY").is_ok() {
        return Ok(());
    }
    const STEPS: u32 = 20;
    let latency = Duration::from_millis(40);
    let model = GaussianPriorModel::new(0.0, 0.5, 16, 10.0, ScheduleConfig::default())?;
    let (m, k) = inputs(64)?;
    // 64³, P = 16, overlap 0: 64 patches per round, 16 batches of 4.
    let req = request(&m, &k, settings(STEPS, 0, 4));
    println!(
        "scaling (the old small row): in-process simulated GPU workers ({} ms per batch, \
         analytic numerics), 64³ volume, 16³ patches, 16 batches of 4 per round, {STEPS} \
         steps, 2 batches in flight per worker",
        latency.as_millis()
    );
    let mut t1 = 0.0;
    let mut reference_chi: Option<Array3<f32>> = None;
    for n in [1usize, 2, 4, 8] {
        let served = ServedModel::simulated(SimulatedModel::new(
            Arc::new(model.clone()),
            latency,
            Duration::ZERO,
        ));
        // One model call per request (no coalescing), like a GPU busy with one batch.
        let wb = BatchConfig {
            max_batch: 4,
            max_queue_delay: Duration::ZERO,
        };
        let s = setup(vec![served; n], wb, |_| {}).await?;
        let JobRun {
            secs: t,
            chi,
            report,
            ..
        } = timed_job_report(&s.url, req.clone()).await?;
        let timings = &report["timings_s"];
        let same = match &reference_chi {
            None => {
                reference_chi = Some(chi);
                true
            }
            Some(r) => r
                .iter()
                .zip(chi.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits()),
        };
        if n == 1 {
            t1 = t;
        }
        let ideal = STEPS as f64 * 16.0 * latency.as_secs_f64() / n as f64;
        println!(
            "  {n} worker(s): {t:.2} s (ideal {ideal:.2} s), speed-up {:.2}, efficiency {:.3}, \
             output equal to 1 worker: {same}; job running {:.2} s of which waiting for \
             workers {:.2} s, coordinator numerics {:.2} s",
            t1 / t,
            t1 / (n as f64 * t),
            timings["running"].as_f64().unwrap_or(0.0),
            timings["waiting_for_workers"].as_f64().unwrap_or(0.0),
            timings["coordinator_numerics"].as_f64().unwrap_or(0.0),
        );
        s.close().await;
    }
    Ok(())
}

/// A positive number from the environment variable `var`, if set and valid.
fn env_number<T: std::str::FromStr + PartialOrd + Default>(var: &str) -> Option<T> {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<T>().ok())
        .filter(|v| *v > T::default())
}

/// Restricts the calling thread, and every thread or process it starts from now on, to
/// the first `cores` CPUs of the machine (Linux `sched_setaffinity`).
fn pin_to_first_cores(cores: usize) -> AnyResult<()> {
    // SAFETY: `set` is a plain bit set owned here; CPU_ZERO/CPU_SET only write into it, and
    // sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for c in 0..cores {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(format!(
            "sched_setaffinity to {cores} cores: {}",
            std::io::Error::last_os_error()
        )
        .into());
    }
    Ok(())
}

/// The coordinator's own cost with instant workers (see the module docs): one `dipinv`
/// approx job (A = I, the patch path without FFTs) at the realistic size on workers that
/// answer at once, with the coordinator and its client confined to `threads` cores
/// (`dmqsm serve --threads`: its compute pool and tokio threads).
async fn instant_workers_run(
    urls: Vec<String>,
    threads: usize,
    steps: u32,
    repeat: usize,
    m: Arc<Vec<u8>>,
    k: Arc<Vec<u8>>,
) -> AnyResult<Vec<ScalingRun>> {
    let dir = tempfile::tempdir()?;
    let mut config = CoordinatorConfig::new(dir.path());
    config.checkpoint_every = 0;
    config.max_in_flight_per_worker = 2;
    config.compute_threads = Some(threads);
    let coordinator = Coordinator::start(config, &urls).await?;
    let (addr, stop, _h) =
        dmqsm_coordinator::spawn_server(coordinator.clone(), "127.0.0.1:0".parse()?).await?;
    let url = format!("http://{addr}");
    let settings = v1::JobSettings {
        task: v1::Task::Dipinv as i32,
        steps: Some(steps),
        eta: 0.0,
        xi: Some(1.0),
        guidance: v1::Guidance::Approx as i32,
        overlap: Some(8),
        seed: 1,
        samples: Some(1),
        batch_size: 4,
        ..Default::default()
    };
    let _ = concurrent_jobs(&url, 1, &m, &k, &settings).await?;
    let mut runs = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        runs.push(concurrent_jobs(&url, 1, &m, &k, &settings).await?);
    }
    let _ = stop.send(());
    coordinator.shutdown().await;
    Ok(runs)
}

async fn threads() -> AnyResult<()> {
    let steps: u32 = env_number("DMQSM_THREADS_STEPS").unwrap_or(25);
    let repeat: usize = env_number("DMQSM_THREADS_REPEAT").unwrap_or(3);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shape = [160, 192, 160];
    let grid = dmqsm_common::patch::PatchGrid::new(
        shape,
        48,
        dmqsm_common::patch::GridSpacing::Overlap(8),
    )?;
    let patches = (grid.len() * steps as usize) as f64;
    let (m, k) = inputs_shaped(shape)?;
    let (m, k) = (Arc::new(m), Arc::new(k));
    // 8 instant workers, started before any pinning so that their processes may use
    // every core.
    let workers = analytic_workers(8, 4, Duration::ZERO, Duration::ZERO).await?;
    println!(
        "threads: the coordinator's cost with instant workers: {shape:?} volume, 48³ patches, \
         overlap 8 ({} patches, 20 batches of 4 a round), dipinv approx, {steps} steps, 1 job, \
         8 dmqsm-worker processes answering at once (analytic ε) on any of the {cores} cores; \
         the coordinator and its client confined to T cores with T compute threads",
        grid.len()
    );
    let mut threads_list: Vec<usize> = (1..=cores)
        .filter(|&t| t.is_power_of_two() || t == cores)
        .collect();
    threads_list.retain(|&t| selected("DMQSM_THREADS", t));
    for t in threads_list {
        let (urls, m, k) = (workers.urls(), m.clone(), k.clone());
        let runs = std::thread::spawn(move || -> Result<Vec<ScalingRun>, String> {
            pin_to_first_cores(t).map_err(|e| e.to_string())?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(t)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(instant_workers_run(urls, t, steps, repeat, m, k))
                .map_err(|e| e.to_string())
        })
        .join()
        .map_err(|_| "the pinned bench thread panicked")??;
        let mut runs = runs;
        runs.sort_by(|a, b| a.wall.total_cmp(&b.wall));
        let walls: Vec<String> = runs.iter().map(|r| format!("{:.2}", r.wall)).collect();
        let run = runs[runs.len() / 2];
        let cpu = run.used.user_s + run.used.sys_s;
        println!(
            "  {t} thread(s): {:.2} s (of {}), {:.0} patches/s in the rounds ({:.0} per thread), \
             {:.0} patches/s over the whole job; process CPU {:.2} ms/patch ({:.0} % system)",
            run.wall,
            walls.join(" "),
            patches / run.in_rounds,
            patches / run.in_rounds / t as f64,
            patches / run.wall,
            1e3 * cpu / patches,
            100.0 * run.used.sys_s / cpu,
        );
    }
    tokio::task::spawn_blocking(move || workers.shutdown()).await?;
    Ok(())
}

async fn throughput() -> AnyResult<()> {
    let model = GaussianPriorModel::new(0.0, 0.5, 48, 10.0, ScheduleConfig::default())?;
    let (m, k) = inputs(96)?;
    let steps = 10u32;
    // 96³, P = 48, overlap 8: 27 patches per round.
    let req = request(&m, &k, settings(steps, 8, 4));
    println!(
        "throughput: 4 instant workers (analytic model, no latency), 96³ volume, 48³ patches, \
         27 patches/round, {steps} steps, batch 4"
    );
    for (name, dtype) in [("f32", v1::Dtype::F32), ("bf16", v1::Dtype::Bf16)] {
        let served = ServedModel::new(Arc::new(model.clone()), "cpu", 1, "f32");
        let s = setup(vec![served; 4], BatchConfig::default(), |c| {
            c.wire_dtype = dtype
        })
        .await?;
        // Warm-up job (connections, allocations), then the timed one.
        timed_job(&s.url, request(&m, &k, settings(1, 8, 4))).await?;
        let (t, _) = timed_job(&s.url, req.clone()).await?;
        let patches = 27.0 * steps as f64;
        let bytes_per_value = if dtype == v1::Dtype::F32 { 4.0 } else { 2.0 };
        let wire = patches * 2.0 * 48f64.powi(3) * bytes_per_value;
        println!(
            "  {name}: {t:.2} s, {:.0} patches/s, {:.0} MB/s of patch tensors on the wire \
             ({:.0} KiB per patch round trip)",
            patches / t,
            wire / t / 1e6,
            2.0 * 48f64.powi(3) * bytes_per_value / 1024.0
        );
        s.close().await;
    }
    Ok(())
}

async fn disk() -> AnyResult<()> {
    let model = GaussianPriorModel::new(0.0, 0.5, 48, 10.0, ScheduleConfig::default())?;
    let (m, k) = inputs(96)?;
    let steps = 300u32;
    let served = ServedModel::new(Arc::new(model.clone()), "cpu", 1, "f32");
    let s = setup(vec![served; 2], BatchConfig::default(), |c| {
        c.checkpoint_every = 5
    })
    .await?;
    let store = s.coordinator.store().clone();
    let data_dir = s._dir.path().to_path_buf();
    println!(
        "disk: {steps}-step job on 96³ (padded state 128³ = {:.1} MB per checkpoint), \
         checkpoint every 5 steps ({} checkpoints)",
        4.0 * 128f64.powi(3) / 1e6,
        steps / 5 - 1
    );
    let mut c = client::connect(&s.url).await?;
    let t = Instant::now();
    let id = c
        .submit_job(request(&m, &k, settings(steps, 8, 4)))
        .await?
        .into_inner()
        .job_id;
    let mut next = 0;
    loop {
        let st = c
            .get_job(v1::GetJobRequest { job_id: id.clone() })
            .await?
            .into_inner();
        if st.step >= next || client::is_terminal(st.state) {
            println!(
                "  step {:>3}: sled size_on_disk {:>6.1} MB, all files {:>6.1} MB, checkpoints {:.1} MB",
                st.step,
                store.size_on_disk()? as f64 / 1e6,
                dir_bytes(&data_dir) as f64 / 1e6,
                store.checkpoint_bytes() as f64 / 1e6
            );
            next += 50;
        }
        if client::is_terminal(st.state) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.flush()?;
    println!(
        "  done in {:.1} s; after completion: sled size_on_disk {:.1} MB, all files {:.1} MB, \
         checkpoint bytes left {}",
        t.elapsed().as_secs_f64(),
        store.size_on_disk()? as f64 / 1e6,
        dir_bytes(&data_dir) as f64 / 1e6,
        store.checkpoint_bytes()
    );
    s.close().await;
    Ok(())
}

/// Bytes of all files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += dir_bytes(&p);
            } else if let Ok(m) = e.metadata() {
                total += m.len();
            }
        }
    }
    total
}

fn main() -> AnyResult<()> {
    // As `dmqsm` does; `DMQSM_BENCH_PURGE_FREED=1` keeps mimalloc's default purging, for
    // an A/B of this process (the worker processes keep their pages either way).
    if std::env::var_os("DMQSM_BENCH_PURGE_FREED").is_none() {
        dmqsm_common::allocator::retain_freed_pages();
    }
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let which = which.first().map(String::as_str).unwrap_or("all");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match which {
            "overhead" => overhead().await,
            "scaling" => scaling().await,
            "throughput" => throughput().await,
            "threads" => threads().await,
            "disk" => disk().await,
            "all" => {
                overhead().await?;
                scaling().await?;
                throughput().await?;
                threads().await?;
                disk().await
            }
            other => Err(format!(
                "unknown benchmark {other:?}: overhead, scaling, throughput, threads, disk or all"
            )
            .into()),
        }
    })
}
