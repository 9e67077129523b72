//! Per-step cost of the DM-QSM sampler outside the model, against numpy.
//!
//! On a 160×192×160 volume (48³ patches, overlap 8: 80 patches over a 168×208×168 padded
//! grid) it times one sampler step — split into patches (`Sampler::batch`), hand-back
//! (`submit_batch`), overlap-normalised assembly, x̂_0, the DPS operator and gradient, the
//! DDPM update with fresh noise — for `dipinv` (A = I) and `dipinv-physics` (A = M∘D, an
//! FFT dipole convolution), with approximate and exact guidance. The model (ε = x patch,
//! Jᵀv = v) is excluded. The same step in numpy (`scripts/bench_step.py`) runs in the same
//! command through `.venv/bin/python`.
//!
//! Run: `cargo bench -p dmqsm-common --bench step` (env `STEP_BENCH_STEPS`, default 5;
//! `STEP_BENCH_SHAPE=NX,NY,NZ` for another size; `STEP_BENCH_NO_PYTHON=1` skips numpy;
//! `STEP_BENCH_ONLY=dipinv-approx` runs one task and guidance).

use dmqsm_common::Volume;
use dmqsm_common::diffusion::model::ModelSpec;
use dmqsm_common::diffusion::sampler::{
    Guidance, PatchResults, RoundKind, Sampler, SamplerSettings,
};
use dmqsm_common::diffusion::schedule::ScheduleConfig;
use dmqsm_common::patch::GridSpacing;
use dmqsm_common::tasks::{Task, TaskOptions, prepare};
use ndarray::Array3;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

fn spec() -> ModelSpec {
    ModelSpec {
        model_id: "bench-identity".into(),
        content_hash: "bench".into(),
        patch_size: 48,
        schedule: ScheduleConfig::default(),
        chi_scale: 10.0,
    }
}

fn ball(shape: [usize; 3]) -> Array3<f32> {
    let c = shape.map(|n| (n as f64 - 1.0) / 2.0);
    let r = 0.4 * *shape.iter().min().unwrap_or(&1) as f64;
    Array3::from_shape_fn(shape, |(i, j, k)| {
        let d2 = (i as f64 - c[0]).powi(2) + (j as f64 - c[1]).powi(2) + (k as f64 - c[2]).powi(2);
        if d2 < r * r { 1.0 } else { 0.0 }
    })
}

/// The benchmark problem of `task`: a small random field in a ball mask.
fn problem(task: Task, shape: [usize; 3]) -> Arc<dmqsm_common::tasks::Problem> {
    let field = Volume::new(
        dmqsm_common::diffusion::noise::noise_volume(1, 5, shape).mapv(|v| 0.01 * v),
        [1.0; 3],
    );
    let mask = Volume::new(ball(shape), [1.0; 3]);
    Arc::new(prepare(&TaskOptions::new(task), &field, Some(&mask)).expect("prepare"))
}

/// Milliseconds per step outside the model: (median step, fastest step, the median
/// step's [split, hand-back, step math]).
fn time_rust(
    problem: &Arc<dmqsm_common::tasks::Problem>,
    guidance: Guidance,
    steps: usize,
) -> (f64, f64, [f64; 3]) {
    let settings = SamplerSettings {
        steps: 200,
        eta: 1.0,
        guidance,
        spacing: GridSpacing::Overlap(8),
        ..SamplerSettings::default()
    };
    let mut s = Sampler::new(problem.clone(), &spec(), settings).expect("sampler");
    let mut per_step: Vec<(f64, [f64; 3])> = Vec::new();
    for step in 0..steps + 1 {
        let (mut split, mut submit, mut complete) = (0.0f64, 0.0f64, 0.0f64);
        let start = s.progress().step;
        while s.progress().step == start {
            let round = s.round().expect("open round");
            for idx in s.plan_batches(8).expect("plan") {
                let t = Instant::now();
                let b = s.batch(&idx).expect("batch");
                split += t.elapsed().as_secs_f64();
                // The "model": ε = x, Jᵀv = v (not timed).
                let out = match round.id.kind {
                    RoundKind::Eps => b.x,
                    RoundKind::Vjp => b.cotangent.expect("cotangent"),
                };
                let t = Instant::now();
                let results = PatchResults::new(round.id, idx, out).expect("checked results");
                s.accept(results).expect("submit");
                submit += t.elapsed().as_secs_f64();
            }
            let t = Instant::now();
            s.complete_round().expect("complete");
            complete += t.elapsed().as_secs_f64();
        }
        if step > 0 {
            let parts = [split, submit, complete].map(|v| 1e3 * v);
            per_step.push((parts.iter().sum(), parts));
        }
    }
    per_step.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (median, parts) = per_step[per_step.len() / 2];
    (median, per_step[0].0, parts)
}

fn time_numpy(
    root: &Path,
    task: Task,
    guidance: Guidance,
    shape: [usize; 3],
    steps: usize,
) -> Option<f64> {
    let py = root.join(".venv/bin/python");
    let out = Command::new(&py)
        .arg(root.join("scripts/bench_step.py"))
        .args([
            "--task",
            task.name(),
            "--guidance",
            if guidance == Guidance::Exact {
                "exact"
            } else {
                "approx"
            },
        ])
        .arg("--shape")
        .args(shape.map(|n| n.to_string()))
        .args(["--steps", &steps.to_string()])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            v["ms_per_step"].as_f64()
        }
        Ok(o) => {
            eprintln!(
                "numpy reference failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            None
        }
        Err(e) => {
            eprintln!("cannot run {}: {e}", py.display());
            None
        }
    }
}

fn main() {
    let steps: usize = std::env::var("STEP_BENCH_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let shape: [usize; 3] = std::env::var("STEP_BENCH_SHAPE")
        .ok()
        .and_then(|v| {
            let n: Vec<usize> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            (n.len() == 3).then(|| [n[0], n[1], n[2]])
        })
        .unwrap_or([160, 192, 160]);
    let no_python = std::env::var_os("STEP_BENCH_NO_PYTHON").is_some();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    println!(
        "DM-QSM sampler step outside the model: volume {shape:?}, patch 48, overlap 8, η = 1, {steps} timed steps (median)"
    );
    println!(
        "{:<16} {:<7} {:>7} {:>12} {:>9} {:>7} {:>9} {:>9} {:>13} {:>7}",
        "task",
        "guide",
        "threads",
        "rust ms/step",
        "rust min",
        "split",
        "hand-back",
        "step math",
        "numpy ms/step",
        "ratio"
    );
    let all = rayon::current_num_threads();
    // `STEP_BENCH_ONLY=dipinv-approx` (say) runs one row group, for profiling.
    let only = std::env::var("STEP_BENCH_ONLY").ok();
    for task in [Task::Dipinv, Task::DipinvPhysics] {
        let prob = problem(task, shape);
        for guidance in [Guidance::Approx, Guidance::Exact] {
            let name = format!("{}-{}", task.name(), format!("{guidance:?}").to_lowercase());
            if only.as_ref().is_some_and(|o| *o != name) {
                continue;
            }
            let np = if no_python {
                None
            } else {
                time_numpy(&root, task, guidance, shape, steps)
            };
            let mut pools = vec![1];
            if all > 1 {
                pools.push(all);
            }
            for threads in pools {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                let (med, min, parts) = pool.install(|| time_rust(&prob, guidance, steps));
                let (np_s, ratio) = match np {
                    Some(v) => (format!("{v:.1}"), format!("{:.2}x", v / med)),
                    None => ("-".into(), "-".into()),
                };
                println!(
                    "{:<16} {:<7} {:>7} {:>12.1} {:>9.1} {:>7.1} {:>9.1} {:>9.1} {:>13} {:>7}",
                    task.name(),
                    format!("{guidance:?}").to_lowercase(),
                    threads,
                    med,
                    min,
                    parts[0],
                    parts[1],
                    parts[2],
                    np_s,
                    ratio
                );
            }
        }
    }
    println!(
        "numpy is single-threaded (pocketfft, ufuncs). ratio = numpy ms / rust ms (> 1: Rust faster). \
         split = patch extraction, hand-back = result copies, step math = assemble/normalise/x̂0/DPS/update/noise."
    );
}
