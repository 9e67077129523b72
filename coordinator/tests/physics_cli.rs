//! The physics subcommands of the `dmqsm` binary, end to end on a small phantom, and
//! their errors on bad files and parameters.

use std::path::Path;
use std::process::{Command, Output};

fn dmqsm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmqsm"))
        .args(args)
        .output()
        .expect("run dmqsm")
}

fn ok(args: &[&str]) -> String {
    let out = dmqsm(args);
    assert!(
        out.status.success(),
        "dmqsm {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn phantom_simulate_tkd_eval_preview_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ph = d.join("ph");
    ok(&[
        "phantom",
        "--shape",
        "48,56,48",
        "--voxel",
        "3,3,3",
        "--seed",
        "3",
        "--out",
        s(&ph),
    ]);
    for f in ["chi.nii.gz", "mask.nii.gz", "labels.nii.gz", "phantom.json"] {
        assert!(ph.join(f).exists(), "{f} missing");
    }
    let field = d.join("field.nii.gz");
    ok(&[
        "simulate",
        "--chi",
        s(&ph.join("chi.nii.gz")),
        "--mask",
        s(&ph.join("mask.nii.gz")),
        "--snr",
        "100",
        "--out",
        s(&field),
    ]);
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("field.json")).unwrap()).unwrap();
    assert_eq!(side["units"], "ppm");
    assert_eq!(side["snr"], 100.0);
    for method in ["tkd", "l2", "tv"] {
        let chi = d.join(format!("chi_{method}.nii.gz"));
        // `tkd` is the old name of `invert`, kept as an alias.
        ok(&[
            if method == "tkd" { "tkd" } else { "invert" },
            "--method",
            method,
            "--field",
            s(&field),
            "--mask",
            s(&ph.join("mask.nii.gz")),
            "--out",
            s(&chi),
        ]);
        let table = ok(&[
            "eval",
            "--recon",
            s(&chi),
            "--truth",
            s(&ph.join("chi.nii.gz")),
            "--mask",
            s(&ph.join("mask.nii.gz")),
            "--labels",
            s(&ph.join("labels.nii.gz")),
        ]);
        assert!(table.contains("NRMSE"), "{table}");
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.join(format!("chi_{method}_metrics.json"))).unwrap(),
        )
        .unwrap();
        let nrmse = m["metrics"]["nrmse"].as_f64().unwrap();
        assert!(nrmse > 0.0 && nrmse < 100.0, "{method}: NRMSE {nrmse}");
    }
    // TV without --alpha picks it at the L-curve corner and records the curve.
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("chi_tv.json")).unwrap()).unwrap();
    assert_eq!(side["method"], "tv");
    assert_eq!(side["parameters"]["alpha_rule"], "l-curve");
    assert_eq!(
        side["parameters"]["l_curve"].as_array().map(Vec::len),
        Some(10)
    );
    let bad = dmqsm(&[
        "invert",
        "--method",
        "tv",
        "--alpha=-1",
        "--field",
        s(&field),
        "--out",
        s(&d.join("bad.nii.gz")),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("alpha"));
    let png = d.join("p.png");
    ok(&[
        "preview",
        "--input",
        s(&d.join("chi_tkd.nii.gz")),
        "--out",
        s(&png),
    ]);
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
}

#[test]
fn bad_files_and_parameters_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let junk = d.join("junk.nii");
    std::fs::write(&junk, b"this is not a NIfTI file at all").unwrap();
    let out = dmqsm(&["tkd", "--field", s(&junk), "--out", s(&d.join("x.nii"))]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("junk.nii"),
        "error should name the file: {err}"
    );

    let missing = d.join("missing.nii.gz");
    let out = dmqsm(&[
        "simulate",
        "--chi",
        s(&missing),
        "--out",
        s(&d.join("f.nii")),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.nii.gz"));

    let ph = d.join("ph");
    ok(&[
        "phantom",
        "--shape",
        "16,16,16",
        "--voxel",
        "4,4,4",
        "--out",
        s(&ph),
    ]);
    let out = dmqsm(&[
        "tkd",
        "--field",
        s(&ph.join("chi.nii.gz")),
        "--threshold=-1",
        "--out",
        s(&d.join("x.nii")),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("threshold"));

    let out = dmqsm(&["phantom", "--shape", "16,16", "--out", s(&ph)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected 3"));

    // A mask on another grid is refused by name.
    let other = d.join("other");
    ok(&[
        "phantom",
        "--shape",
        "20,16,16",
        "--voxel",
        "4,4,4",
        "--out",
        s(&other),
    ]);
    let out = dmqsm(&[
        "simulate",
        "--chi",
        s(&ph.join("chi.nii.gz")),
        "--mask",
        s(&other.join("mask.nii.gz")),
        "--out",
        s(&d.join("f.nii")),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mask has shape"));
}
