//! Slurm: `deploy/slurm/dmqsm.sbatch` on a real single-node cluster (slurmctld + slurmd,
//! installed by `deploy/slurm/ci-install.sh`) runs a coordinator and two CPU workers as
//! two Slurm tasks (`srun --ntasks=2`), and the reconstruction it returns equals the
//! embedded run (`dmqsm run --workers 2`) bit for bit. Then `dmqsm cohort --slurm`
//! generates a per-subject script for a one-subject BIDS tree, which is submitted and
//! writes its derivatives.
//!
//! Tolerance: none (bitwise). The workers serve the analytic Gaussian-prior model
//! (`--synthetic`, exact and elementwise) and patches travel as f32, so neither the
//! worker processes nor the batch assignment can change a bit (as in e2e_tasks).
//!
//! Skips, printing why, when `sbatch`/`sinfo` are missing or no node is up (run
//! `deploy/slurm/ci-install.sh` as root first). Network: loopback only. Needs the
//! `dmqsm` and `dmqsm-worker` binaries, which it builds with `cargo build` (a no-op when
//! they are fresh).

use dmqsm_proto::v1;
use dmqsm_tests::binaries;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why Slurm cannot be used here, or `None` when a node is up.
fn slurm_unavailable() -> Option<String> {
    for tool in ["sbatch", "sinfo", "scancel"] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Some(format!("`{tool}` is not available"));
        }
    }
    let out = Command::new("sinfo")
        .args(["-h", "-N", "-o", "%T"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let states = String::from_utf8_lossy(&o.stdout).to_string();
            if states
                .lines()
                .any(|s| s.starts_with("idle") || s.starts_with("mixed"))
            {
                None
            } else {
                Some(format!("no idle Slurm node (sinfo: {:?})", states.trim()))
            }
        }
        Ok(o) => Some(format!(
            "the cluster is not up (sinfo: {})",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("sinfo failed: {e}")),
    }
}

/// A loopback port `p` with `p + 1` free too (a small race with other processes is
/// accepted; the test runs seconds after).
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free loopback port pair");
}

/// `sbatch --wait` with the loopback configuration; returns the job's output. Cancels
/// the job if it runs past `limit`.
fn sbatch(
    script: &Path,
    args: &[&str],
    bin_dir: &Path,
    run_dir: &Path,
    worker_args: &str,
) -> String {
    let out_file = run_dir.join("slurm.out");
    std::fs::create_dir_all(run_dir).unwrap();
    let coord_port = free_port_pair();
    let worker_port = free_port_pair();
    let mut child = Command::new("sbatch")
        .arg("--wait")
        .arg("--parsable")
        .arg("--time=5")
        .arg("--ntasks=2")
        .arg("--cpus-per-task=1")
        .arg(format!("--output={}", out_file.display()))
        .arg(script)
        .args(args)
        .env("DMQSM_BIN_DIR", bin_dir)
        .env("DMQSM_WORKER_ARGS", worker_args)
        .env("DMQSM_COORD_HOST", "127.0.0.1")
        .env("DMQSM_LISTEN_HOST", "127.0.0.1")
        .env("DMQSM_WORKER_HOST", "127.0.0.1")
        .env("DMQSM_COORD_PORT", coord_port.to_string())
        .env("DMQSM_WORKER_PORT", worker_port.to_string())
        .env("DMQSM_RUN_DIR", run_dir)
        .env("DMQSM_WAIT_WORKERS_S", "120")
        .env_remove("DMQSM_COORDINATOR")
        .stdout(Stdio::piped())
        .spawn()
        .expect("sbatch");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            let _ = Command::new("scancel").args(["--name", "dmqsm"]).status();
            panic!("sbatch --wait ran past 300 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = std::fs::read_to_string(&out_file).unwrap_or_default();
    let mut logs = String::new();
    if let Ok(rd) = std::fs::read_dir(run_dir.join("logs")) {
        for e in rd.flatten() {
            logs.push_str(&format!(
                "--- {}\n{}\n",
                e.path().display(),
                std::fs::read_to_string(e.path()).unwrap_or_default()
            ));
        }
    }
    assert!(
        status.success(),
        "Slurm job failed ({status}):\n{log}\n{logs}"
    );
    log
}

fn read(p: &Path) -> ndarray::Array3<f32> {
    dmqsm_common::nifti_io::read_nifti(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .data
}

#[test]
fn slurm_job_with_two_worker_tasks_equals_the_embedded_run_and_cohort_scripts_run() {
    if let Some(why) = slurm_unavailable() {
        println!(
            "SKIPPED slurm test: {why}. Install a local cluster with `sudo deploy/slurm/ci-install.sh`."
        );
        return;
    }
    let (dmqsm, worker) = binaries();
    let bin_dir = dmqsm.parent().unwrap().to_path_buf();
    assert_eq!(worker.parent().unwrap(), bin_dir, "binaries in one folder");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/slurm/dmqsm.sbatch");
    // The run folder must be visible to slurmd and the tasks (same machine here).
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (meas, mask) = dmqsm_tests::inputs(v1::Task::Dipinv);
    std::fs::write(d.join("field.nii.gz"), &meas).unwrap();
    std::fs::write(d.join("mask.nii.gz"), &mask).unwrap();
    let settings = ["--steps", "4", "--seed", "7", "--eta", "0.5"];
    let analytic = format!(
        "--synthetic --synthetic-mean 0 --synthetic-std 0.5 --synthetic-patch-size {} --synthetic-chi-scale 10",
        dmqsm_tests::PATCH
    );

    // Embedded reference: coordinator + 2 local workers in one process.
    let emb = Command::new(&dmqsm)
        .arg("run")
        .arg(d.join("field.nii.gz"))
        .arg("--mask")
        .arg(d.join("mask.nii.gz"))
        .args(settings)
        .args([
            "--workers",
            "2",
            "--analytic",
            "0,0.5",
            "--analytic-scale",
            "10",
        ])
        .args(["--analytic-patch", &dmqsm_tests::PATCH.to_string()])
        .arg("--out")
        .arg(d.join("embedded"))
        .arg("--data-dir")
        .arg(d.join("embedded-store"))
        .output()
        .unwrap();
    assert!(
        emb.status.success(),
        "dmqsm run: {}",
        String::from_utf8_lossy(&emb.stderr)
    );

    // The same job through Slurm: coordinator in the batch step, 2 worker tasks.
    let field = d.join("field.nii.gz").display().to_string();
    let mask_arg = d.join("mask.nii.gz").display().to_string();
    let out_dir = d.join("slurm-out").display().to_string();
    let mut args = vec![
        "submit", "--wait", "--out", &out_dir, &field, "--mask", &mask_arg,
    ];
    args.extend(settings);
    let log = sbatch(&script, &args, &bin_dir, &d.join("run"), &analytic);
    assert!(log.contains("2 of 2 worker(s) registered"), "{log}");
    let want = read(&d.join("embedded/chi.nii.gz"));
    let got = read(&d.join("slurm-out/chi.nii.gz"));
    dmqsm_tests::assert_bitwise(&got, &want, "Slurm vs embedded χ");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("slurm-out/report.json")).unwrap()).unwrap();
    let used = report["workers_used"].as_object().expect("workers_used");
    assert!(
        !used.is_empty()
            && used
                .keys()
                .all(|k| k.starts_with('w') && k.contains("-slurm-")),
        "{used:?}"
    );
    // The rendezvous file names the coordinator.
    let url = std::fs::read_to_string(d.join("run/coordinator.url")).unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    // `dmqsm cohort --slurm`: one script per subject, submitted as is.
    let bids = d.join("bids");
    let anat = bids.join("sub-01/anat");
    std::fs::create_dir_all(&anat).unwrap();
    std::fs::write(anat.join("sub-01_localfield.nii.gz"), &meas).unwrap();
    std::fs::write(anat.join("sub-01_mask.nii.gz"), &mask).unwrap();
    std::fs::write(
        anat.join("sub-01_localfield.json"),
        r#"{"MagneticFieldStrength": 3, "B0_dir": [0, 0, 1]}"#,
    )
    .unwrap();
    let gen_dir = d.join("cohort-slurm");
    let generated = Command::new(&dmqsm)
        .arg("cohort")
        .arg(&bids)
        .arg("--slurm")
        .arg(&gen_dir)
        .args(["--slurm-workers", "2", "--slurm-gpus-per-worker", "0"])
        .args(["--slurm-cpus-per-worker", "1"])
        .arg(format!("--worker-args={analytic}"))
        .args(settings)
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "cohort --slurm: {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let sub = gen_dir.join("sub-01.sbatch");
    assert!(sub.is_file() && gen_dir.join("submit_all.sh").is_file());
    let log = sbatch(&sub, &[], &bin_dir, &d.join("run-cohort"), &analytic);
    assert!(log.contains("exited with 0"), "{log}");
    let chi = bids.join("derivatives/dmqsm/sub-01/anat/sub-01_Chimap.nii.gz");
    let side = bids.join("derivatives/dmqsm/sub-01/anat/sub-01_Chimap.json");
    assert!(chi.is_file() && side.is_file(), "{log}");
    // Same input, settings and model as above: the same χ.
    dmqsm_tests::assert_bitwise(&read(&chi), &want, "Slurm cohort vs embedded χ");
}
