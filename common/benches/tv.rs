//! TV-ADMM benchmark: `dmqsm_common::inversion::tv` against the same algorithm in numpy
//! (`scripts/bench_tv.py`, an independent float32 `rfftn` implementation run in the same
//! command), on an n³ volume (default 256³, 1 mm, B0 along z) with a ball-shaped mask
//! weight and a fixed number of iterations (no early stop, so both sides do the same
//! work). Prints both wall times, their ratio, and the largest difference between the two
//! results relative to max |χ| (a cross-check of the implementation).
//!
//! Run: `cargo bench -p dmqsm-common --bench tv`. Environment: `TV_BENCH_N` (default
//! 256), `TV_BENCH_ITERATIONS` (default 30), `TV_BENCH_RUNS` (best of, default 2),
//! `TV_BENCH_NO_PYTHON=1` to skip numpy.

use dmqsm_common::Volume;
use dmqsm_common::fft::Padding;
use dmqsm_common::geometry::B0Direction;
use dmqsm_common::inversion::tv::{TvParams, tv};
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

fn write_f32(path: &std::path::Path, a: &Array3<f32>) {
    let bytes: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).expect("write bench input");
}

fn main() {
    let n = env_usize("TV_BENCH_N", 256);
    let iterations = env_usize("TV_BENCH_ITERATIONS", 30);
    let runs = env_usize("TV_BENCH_RUNS", 2);
    let alpha = 5e-4;
    let nf = n as f64;
    let c = nf / 2.0;
    let dist = |i: usize, j: usize, k: usize, cx: f64, cy: f64, cz: f64| {
        ((i as f64 - cx).powi(2) + (j as f64 - cy).powi(2) + (k as f64 - cz).powi(2)).sqrt()
    };
    let chi = Array3::from_shape_fn((n, n, n), |(i, j, k)| {
        let mut v = 0.0f32;
        if dist(i, j, k, c, c, c) < 0.3 * nf {
            v += 0.05;
        }
        if dist(i, j, k, 0.4 * nf, 0.45 * nf, 0.55 * nf) < 0.08 * nf {
            v += 0.2;
        }
        if dist(i, j, k, 0.6 * nf, 0.58 * nf, 0.42 * nf) < 0.05 * nf {
            v -= 0.1;
        }
        v
    });
    let weight = Array3::from_shape_fn((n, n, n), |(i, j, k)| {
        if dist(i, j, k, c, c, c) < 0.4 * nf {
            1.0f32
        } else {
            0.0
        }
    });
    let b0 = B0Direction::AXIAL;
    let field = forward_field(&Volume::new(chi, [1.0; 3]), b0).expect("field");
    let field = field.like(&field.data * &weight);
    let params = TvParams {
        alpha,
        max_iterations: iterations,
        tolerance: 0.0,
        padding: Padding::None,
        ..TvParams::default()
    };
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let r = tv(&field, Some(weight.view()), b0, &params).expect("TV");
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    let Some((ours, report)) = out else { return };
    println!(
        "TV-ADMM {n}³, {} iterations, α {alpha}: dmqsm {best:.2} s ({:.0} ms/iteration, {} rayon threads)",
        report.iterations,
        1e3 * best / report.iterations as f64,
        rayon::current_num_threads()
    );
    if std::env::var_os("TV_BENCH_NO_PYTHON").is_some() {
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().expect("temp dir");
    write_f32(&dir.path().join("field.f32"), &field.data);
    write_f32(&dir.path().join("weight.f32"), &weight);
    let status = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/bench_tv.py"))
        .args(["--n", &n.to_string(), "--alpha", &alpha.to_string()])
        .args([
            "--iterations",
            &iterations.to_string(),
            "--runs",
            &runs.to_string(),
        ])
        .arg("--dir")
        .arg(dir.path())
        .output();
    let out = match status {
        Ok(o) if o.status.success() => o,
        Ok(o) => return eprintln!("numpy TV failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => return eprintln!("cannot run the numpy TV: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let res: serde_json::Value = match text.lines().last().map(serde_json::from_str) {
        Some(Ok(v)) => v,
        _ => return eprintln!("cannot parse the numpy TV output {text:?}"),
    };
    let t_np = res["seconds"].as_f64().unwrap_or(f64::NAN);
    println!(
        "TV-ADMM {n}³ numpy {} float32 rfftn (single-threaded pocketfft): {t_np:.2} s, numpy/dmqsm {:.1}×",
        res["numpy"].as_str().unwrap_or("?"),
        t_np / best
    );
    let bytes = std::fs::read(dir.path().join("chi.f32")).unwrap_or_default();
    let theirs: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if theirs.len() == ours.data.len() {
        let peak = ours.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = ours
            .data
            .iter()
            .zip(&theirs)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        println!(
            "cross-check: max|χ_dmqsm − χ_numpy| / max|χ| = {:.2e}",
            diff / peak
        );
    }
}
