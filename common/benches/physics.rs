//! Physics benchmark: forward field simulation and TKD on an n³ volume (default 256³),
//! against numpy (`scripts/bench_physics.py`, run in the same command).
//!
//! - forward: χ (three balls) → local field, padded to fast_len(2N) = 512³ with the
//!   corner value, oblique B0, 1 mm voxels (`simulate::forward_field`);
//! - TKD: that field → χ, δ = 0.1, padded to the next fast length (`inversion::tkd`);
//! - the DPS operators at 160×192×160 (dipole, k-space downsampling, their composition
//!   with a mask), apply + adjoint, for the sampler's per-step budget (no numpy column).
//!
//! numpy is timed twice: the idiomatic complex `fftn` in float64 (as qsm-forward) and a
//! tuned `rfftn` in float32. Its float64 results are compared with ours (max difference
//! relative to max |numpy|), an independent check of the whole pipeline.
//!
//! Run: `cargo bench -p dmqsm-common --bench physics`. Environment: `PHYSICS_BENCH_N`
//! (default 256), `PHYSICS_BENCH_RUNS` (best of, default 3), `PHYSICS_BENCH_PY_RUNS`
//! (default 2), `PHYSICS_BENCH_NO_PYTHON=1` to skip numpy, `PHYSICS_BENCH_NO_F64=1` to
//! time only numpy's float32 variant (it needs ~8 GB at 256³).

use dmqsm_common::Volume;
use dmqsm_common::fft::Padding;
use dmqsm_common::geometry::B0Direction;
use dmqsm_common::inversion::tkd::tkd;
use dmqsm_common::operators::{Compose, DipoleConvolution, KSpaceDownsample, LinearOperator, Mask};
use dmqsm_common::simulate::forward_field;
use ndarray::Array3;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Three balls with hard edges (χ in ppm), bit-identical to `phantom` in the script.
fn phantom(n: usize) -> Array3<f32> {
    let balls = [
        ([0.5, 0.5, 0.5], 0.3, 0.05f32),
        ([0.35, 0.45, 0.55], 0.08, 0.2),
        ([0.62, 0.58, 0.4], 0.05, -0.1),
    ];
    let nf = n as f64;
    Array3::from_shape_fn((n, n, n), |(i, j, k)| {
        let mut v = 0.0f32;
        for (c, r, val) in &balls {
            let d2 = (i as f64 - c[0] * nf).powi(2)
                + (j as f64 - c[1] * nf).powi(2)
                + (k as f64 - c[2] * nf).powi(2);
            if d2 <= (r * nf).powi(2) {
                v += *val;
            }
        }
        v
    })
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        let r = f();
        best = best.min(t0.elapsed().as_secs_f64());
        out = Some(r);
    }
    match out {
        Some(r) => (best, r),
        None => unreachable!("runs.max(1) ≥ 1"),
    }
}

fn read_f32(path: &PathBuf, shape: [usize; 3]) -> Option<Array3<f32>> {
    let bytes = std::fs::read(path).ok()?;
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Array3::from_shape_vec(shape, v).ok()
}

fn rel_diff(ours: &Array3<f32>, theirs: &Array3<f32>) -> f64 {
    let peak = theirs.iter().fold(0.0f64, |m, v| m.max((*v as f64).abs()));
    let diff = ours
        .iter()
        .zip(theirs.iter())
        .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    diff / peak
}

fn main() {
    let n = env_usize("PHYSICS_BENCH_N", 256);
    let runs = env_usize("PHYSICS_BENCH_RUNS", 3);
    let py_runs = env_usize("PHYSICS_BENCH_PY_RUNS", 2);
    println!(
        "dmqsm physics benchmark: {n}³, best of {runs}, {} rayon threads, f32 FFTs",
        rayon::current_num_threads()
    );
    let b0 = B0Direction::new([0.1, -0.2, 1.0]).expect("valid B0");
    let chi = Volume::new(phantom(n), [1.0; 3]);

    let (t_fwd, field) = best_of(runs, || forward_field(&chi, b0).expect("forward"));
    let (t_tkd, chi_tkd) = best_of(runs, || tkd(&field, b0, 0.1).expect("tkd"));
    println!("dmqsm  forward (pad to 2N) {t_fwd:8.3} s");
    println!("dmqsm  TKD (fast pad)      {t_tkd:8.3} s");

    // DPS operators at the sampler's size.
    let s = [160, 192, 160];
    let x = dmqsm_common::simulate::standard_normal(s, 1);
    let dip = DipoleConvolution::new(s, [1.0; 3], b0, Padding::Fast).expect("dipole");
    let (t_dip, _) = best_of(runs, || dip.apply(&x).expect("apply"));
    let ks = KSpaceDownsample::new(s, [2, 2, 2]).expect("kspace");
    let (t_ks, y) = best_of(runs, || ks.apply(&x).expect("apply"));
    let (t_ks_adj, _) = best_of(runs, || ks.adjoint(&y).expect("adjoint"));
    let chain = Compose::new(vec![
        Box::new(DipoleConvolution::new(s, [1.0; 3], b0, Padding::Fast).expect("dipole")),
        Box::new(Mask::new(Array3::from_elem(s, 1.0)).expect("mask")),
        Box::new(KSpaceDownsample::new(s, [2, 2, 2]).expect("kspace")),
    ])
    .expect("compose");
    let (t_chain, y) = best_of(runs, || chain.apply(&x).expect("apply"));
    let (t_chain_adj, _) = best_of(runs, || chain.adjoint(&y).expect("adjoint"));
    println!("dmqsm  operators at {s:?}:");
    println!(
        "         DipoleConvolution apply         {:8.1} ms",
        t_dip * 1e3
    );
    println!(
        "         KSpaceDownsample ×2 apply/adjoint {:6.1} / {:.1} ms",
        t_ks * 1e3,
        t_ks_adj * 1e3
    );
    println!(
        "         down∘mask∘dipole apply/adjoint  {:6.1} / {:.1} ms",
        t_chain * 1e3,
        t_chain_adj * 1e3
    );

    if std::env::var_os("PHYSICS_BENCH_NO_PYTHON").is_some() {
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".venv/bin/python");
    let script = root.join("scripts/bench_physics.py");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .args([
            "--n",
            &n.to_string(),
            "--runs",
            &py_runs.to_string(),
            "--out",
        ])
        .arg(dir.path());
    if std::env::var_os("PHYSICS_BENCH_NO_F64").is_some() {
        cmd.arg("--skip-f64");
    }
    let out = match cmd.output() {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            eprintln!(
                "numpy benchmark failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return;
        }
        Err(e) => {
            eprintln!("cannot run {}: {e}", python.display());
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().last() else {
        eprintln!("numpy benchmark printed nothing");
        return;
    };
    let res: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("cannot parse numpy output {line:?}: {e}");
            return;
        }
    };
    println!(
        "numpy {} (single-threaded pocketfft), best of {py_runs}:",
        res["numpy"].as_str().unwrap_or("?")
    );
    for variant in ["fftn_f64", "rfftn_f32"] {
        let (Some(f), Some(t)) = (
            res[format!("forward_{variant}")].as_f64(),
            res[format!("tkd_{variant}")].as_f64(),
        ) else {
            continue;
        };
        println!(
            "numpy  {variant:9}  forward {f:8.3} s  (numpy/dmqsm {:5.1}×)   TKD {t:7.3} s  \
             (numpy/dmqsm {:5.1}×)",
            f / t_fwd,
            t / t_tkd
        );
    }
    let shape = [n, n, n];
    if let (Some(f), Some(t)) = (
        read_f32(&dir.path().join("field.f32"), shape),
        read_f32(&dir.path().join("tkd.f32"), shape),
    ) {
        println!(
            "cross-check vs numpy: field max|Δ|/max|numpy| = {:.2e}, TKD = {:.2e}",
            rel_diff(&field.data, &f),
            rel_diff(&chi_tkd.data, &t)
        );
    }
}
