//! End-to-end run of `dmqsm benchmark quality` on a tiny held-out phantom with the exact
//! score of a Gaussian prior (no trained model needed), 2 steps per run: every part of
//! the benchmark (baselines, both guidance modes, ξ sweep, overlap ablation, tables,
//! PNGs) runs through the real code path in a few seconds.

use dmqsm_common::geometry::B0Direction;
use dmqsm_common::inversion::tkd;
use dmqsm_common::metrics;
use dmqsm_common::phantom::{self, PhantomConfig};
use dmqsm_common::simulate::forward_field;
use std::process::Command;

fn dmqsm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dmqsm"))
}

#[test]
fn quality_benchmark_runs_end_to_end_on_a_tiny_phantom() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let status = dmqsm()
        .args([
            "benchmark",
            "quality",
            "--analytic-prior",
            "0.05",
            "--analytic-patch",
            "16",
            "--shape",
            "32,32,32",
            "--cases",
            "dipinv,sr,sr-dipinv",
            "--steps",
            "2",
            "--guidance",
            "approx,prox,exact",
            "--xi-sweep",
            "0.5",
            "--no-demo",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    for needle in [
        "| case | method |",
        "| TKD |",
        "| L2 |",
        "zero-fill",
        "trilinear",
        "TKD+zero-fill",
        "| TV (α tuned on truth) |",
        "| TV (L-curve α) |",
        "DM-QSM 2 steps, approx",
        "DM-QSM 2 steps, exact",
        "DM-QSM 2 steps, prox",
        "Best ξ per case",
        "Overlap ablation",
    ] {
        assert!(md.contains(needle), "{needle:?} missing from:\n{md}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    // Baselines: 4 for dipinv (TKD, L2, TV tuned on the truth, TV at the L-curve
    // corner), 2 for sr, 3 for sr-dipinv; + 3 × 3 main + 3 × 2 sweep (approx, prox; exact
    // is not swept) + 2 ablation + 1 truth.
    assert_eq!(rows.len(), 4 + 2 + 3 + 9 + 6 + 2 + 1);
    for r in rows {
        let n = r["metrics"]["nrmse"].as_f64().unwrap();
        assert!(n.is_finite() && n >= 0.0, "{r}");
    }
    let seams: Vec<f64> = rows
        .iter()
        .filter(|r| r["part"] == "ablation")
        .map(|r| r["seam_ratio"].as_f64().unwrap())
        .collect();
    assert_eq!(seams.len(), 3);
    assert!(seams.iter().all(|s| s.is_finite() && *s > 0.0));
    for png in [
        "triptych-1000-dipinv.png",
        "triptych-1000-sr.png",
        "triptych-1000-sr-dipinv.png",
        "seams.png",
    ] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png}");
    }

    // Independent recomputation of the TKD row through the library: same phantom
    // (seed 1000, true-size anatomy), field with B0 along z masked to the brain, TKD
    // δ = 0.1, masked, scored. Same deterministic code path, so it must agree to f64
    // printing precision (1e-9 relative).
    let cfg = PhantomConfig {
        head_scale: Some(1.0),
        ..PhantomConfig::new([32, 32, 32], [1.0; 3], 1000)
    };
    let ph = phantom::generate(&cfg).unwrap();
    let inside = |v: &dmqsm_common::volume::Volume| {
        let mut d = v.data.clone();
        d.zip_mut_with(&ph.mask.data, |x, &m| {
            if m <= 0.5 {
                *x = 0.0
            }
        });
        v.like(d)
    };
    let field = inside(&forward_field(&ph.chi, B0Direction::AXIAL).unwrap());
    let chi = inside(&tkd(&field, B0Direction::AXIAL, 0.1).unwrap());
    let want = metrics::evaluate(&chi, &ph.chi, &ph.mask).unwrap().nrmse;
    let got = rows
        .iter()
        .find(|r| r["case"] == "dipinv" && r["method"] == "TKD")
        .unwrap()["metrics"]["nrmse"]
        .as_f64()
        .unwrap();
    assert!((got - want).abs() <= 1e-9 * want, "{got} vs {want}");
}

#[test]
fn quality_benchmark_refuses_training_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dmqsm()
        .args([
            "benchmark",
            "quality",
            "--analytic-prior",
            "0.05",
            "--phantom-seed",
            "3",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("training seed"), "{err}");
}
