//! The `dmqsm` binary's client/server commands and their documented exit codes: embedded
//! `run` end to end (analytic model, 2 local workers), a rejected input (3), a bad
//! argument (2) and an unreachable coordinator (6); servers without tokens stay on
//! loopback.

use dmqsm_common::Volume;
use ndarray::Array3;
use std::process::Command;

fn dmqsm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dmqsm"))
}

fn write_inputs(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let n = 20;
    let c = (n as f64 - 1.0) / 2.0;
    let mask = Array3::from_shape_fn((n, n, n), |(i, j, k)| {
        let r = ((i as f64 - c).powi(2) + (j as f64 - c).powi(2) + (k as f64 - c).powi(2)).sqrt();
        if r < 8.0 { 1.0f32 } else { 0.0 }
    });
    let field = Array3::from_shape_fn((n, n, n), |(i, j, k)| {
        0.01 * ((i + 2 * j) as f32 * 0.3).sin() * (k as f32 * 0.2).cos() * mask[[i, j, k]]
    });
    let f = dir.join("field.nii.gz");
    let m = dir.join("mask.nii.gz");
    dmqsm_common::nifti_io::write_nifti(&f, &Volume::new(field, [1.0; 3])).unwrap();
    dmqsm_common::nifti_io::write_nifti(&m, &Volume::new(mask, [1.0; 3])).unwrap();
    (f, m)
}

#[test]
fn run_embedded_writes_results_and_exit_codes_follow_the_documentation() {
    let dir = tempfile::tempdir().unwrap();
    let (field, mask) = write_inputs(dir.path());
    let out = dir.path().join("out");
    let o = dmqsm()
        .arg("run")
        .arg(&field)
        .arg("--mask")
        .arg(&mask)
        .args([
            "--analytic",
            "0,0.5",
            "--analytic-patch",
            "16",
            "--workers",
            "2",
        ])
        .args([
            "--steps",
            "4",
            "--guidance",
            "exact",
            "--samples",
            "2",
            "--eta",
            "1",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("job-"));
    for f in ["chi.nii.gz", "std.nii.gz", "preview.png", "report.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    // The default task (no --task given).
    assert_eq!(report["settings"]["task"], "dipinv-physics");
    assert_eq!(report["settings"]["guidance"], "exact");
    assert_eq!(report["samples"].as_array().unwrap().len(), 2);
    let chi = dmqsm_common::nifti_io::read_nifti(out.join("chi.nii.gz")).unwrap();
    assert_eq!(chi.shape(), [20, 20, 20]);

    // 3: a rejected input names the problem.
    let bad = dir.path().join("bad.nii");
    std::fs::write(&bad, b"not a nifti").unwrap();
    let o = dmqsm()
        .arg("run")
        .arg(&bad)
        .args(["--analytic", "0,0.5", "--analytic-patch", "16"])
        .arg("--data-dir")
        .arg(dir.path().join("data2"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("measurement"), "{stderr}");

    // 2: a bad argument.
    let o = dmqsm()
        .arg("run")
        .arg(&field)
        .args(["--analytic", "0"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // 2 as well: zero or out-of-range values are usage errors naming the flag, never a
    // silent default.
    for (flag, value) in [
        ("--steps", "0"),
        ("--samples", "0"),
        ("--tkd-threshold", "0"),
        ("--xi", "0"),
        ("--memory-budget-gb", "0"),
        ("--steps", "10001"),
    ] {
        let o = dmqsm()
            .arg("run")
            .arg(&field)
            .args(["--analytic", "0,0.5", "--analytic-patch", "16", flag, value])
            .arg("--data-dir")
            .arg(dir.path().join("data-flags"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }

    // 3: an overlap the model's patch size (16) does not allow is refused at submission,
    // naming the setting and the patch size.
    let o = dmqsm()
        .arg("run")
        .arg(&field)
        .args([
            "--analytic",
            "0,0.5",
            "--analytic-patch",
            "16",
            "--overlap",
            "16",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data-overlap"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("settings.overlap 16") && stderr.contains("patch size 16"),
        "{stderr}"
    );

    // 6: nobody listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = dmqsm()
        .args([
            "status",
            "--coordinator",
            &format!("http://127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("cannot reach the coordinator"), "{stderr}");
}

/// The worker binary beside `dmqsm` (cargo builds every workspace binary into the same
/// folder before integration tests run `scripts/test.sh`'s `cargo build --bins`).
fn dmqsm_worker() -> Command {
    let dir = std::path::Path::new(env!("CARGO_BIN_EXE_dmqsm"))
        .parent()
        .unwrap()
        .to_path_buf();
    Command::new(dir.join("dmqsm-worker"))
}

/// Without a token table neither server listens beyond loopback, and bad token files are
/// usage errors that name the problem; a token table lets `serve` bind a wildcard.
#[test]
fn servers_refuse_to_listen_beyond_loopback_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let o = dmqsm()
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("store"))
        .env_remove("DMQSM_TOKENS_FILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("without authentication") && stderr.contains("--tokens"),
        "{stderr}"
    );
    let worker = dmqsm_worker()
        .args(["serve", "--synthetic", "--listen", "0.0.0.0:0"])
        .env_remove("DMQSM_TOKEN")
        .env_remove("DMQSM_TOKEN_FILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&worker.stderr);
    assert!(!worker.status.success(), "{stderr}");
    assert!(stderr.contains("without authentication"), "{stderr}");

    // A malformed table and a short token are named.
    let table = dir.path().join("tokens");
    std::fs::write(&table, "admin ops short\n").unwrap();
    let o = dmqsm()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("store"))
        .arg("--tokens")
        .arg(&table)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("line 1") && stderr.contains("at least 16"),
        "{stderr}"
    );
    let o = dmqsm()
        .args(["status", "--coordinator", "http://127.0.0.1:9"])
        .env("DMQSM_TOKEN_FILE", dir.path().join("missing.token"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("missing.token"), "{stderr}");

    // With a table, a wildcard listen address is accepted (the server starts; we stop it).
    std::fs::write(&table, "admin ops 0123456789abcdef0123\n").unwrap();
    let mut child = dmqsm()
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("store2"))
        .arg("--tokens")
        .arg(&table)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(
        line.starts_with("dmqsm coordinator listening on http://0.0.0.0:"),
        "{line}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
