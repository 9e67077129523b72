//! Cohort submission on a generated BIDS tree of phantoms (`dmqsm_coordinator::cohort`,
//! what `dmqsm cohort` runs) through a coordinator and two workers over loopback gRPC:
//!
//! - sub-01 has two sessions and a ground truth (metrics in the sidecar) and a sidecar
//!   `B0_dir`; sub-02 is an oblique acquisition (B0 from the affine) whose field is in
//!   Hz at 3 T; sub-03 is broken (its local field is not a NIfTI) and must be reported
//!   without stopping the others.
//! - Every χ written equals the in-process reference sampler on the same input and
//!   settings bit for bit (tolerance: none; the analytic model is exact and elementwise,
//!   as in e2e_tasks). The affine-derived B0 direction matches the rotation it was built
//!   from to 1e-12 (f64 arithmetic on a unit vector; the NIfTI stores the affine as f32,
//!   so the reference direction is computed from the stored affine).
//! - A re-run submits nothing and skips the finished entries; a changed setting
//!   recomputes only the selected subject (`--subjects`).

use dmqsm_common::geometry::B0Direction;
use dmqsm_common::nifti_io::{read_nifti, read_nifti_bytes, write_nifti_bytes};
use dmqsm_common::phantom::{PhantomConfig, generate};
use dmqsm_coordinator::cohort::{self, CohortOptions, Entry, InputKind, Outcome, Selection};
use dmqsm_proto::v1;
use dmqsm_tests::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const N: usize = 24;
const GAMMA_MHZ_PER_T: f64 = 42.58;

fn write(p: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

/// Writes one subject/session: phantom χ (truth), mask, local field (ppm or Hz), sidecar.
#[allow(clippy::needless_range_loop)] // a 3×3 matrix product reads clearest with indices
fn subject(anat: &Path, ent: &str, seed: u64, tilt_deg: f64, hz: bool, truth: bool, b0_key: bool) {
    let p = generate(&PhantomConfig::new([N; 3], [1.0; 3], seed)).unwrap();
    let (s, c) = tilt_deg.to_radians().sin_cos();
    let mut chi = p.chi.clone();
    // Rotate the voxel axes about x: scanner = R·voxel (an oblique slab).
    let a = chi.affine;
    let r = [[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]];
    for row in 0..3 {
        for col in 0..3 {
            chi.affine[row][col] = (0..3).map(|k| r[row][k] * a[k][col]).sum();
        }
    }
    let mask = chi.like(p.mask.data.clone());
    // Round-trip through NIfTI so B0 comes from the affine as stored (f32).
    let chi = read_nifti_bytes(&write_nifti_bytes(&chi, true).unwrap()).unwrap();
    let b0 = B0Direction::from_volume(&chi).unwrap();
    let f = dmqsm_common::simulate::forward_field(&chi, b0).unwrap();
    let scale = if hz { GAMMA_MHZ_PER_T * 3.0 } else { 1.0 };
    let field = f.like((&f.data * &mask.data).mapv(|v| (v as f64 * scale) as f32));
    write(
        &anat.join(format!("{ent}_localfield.nii.gz")),
        &write_nifti_bytes(&field, true).unwrap(),
    );
    write(
        &anat.join(format!("{ent}_mask.nii.gz")),
        &write_nifti_bytes(&mask, true).unwrap(),
    );
    if truth {
        write(
            &anat.join(format!("{ent}_desc-truth_Chimap.nii.gz")),
            &write_nifti_bytes(&chi, true).unwrap(),
        );
    }
    let mut side =
        serde_json::json!({"MagneticFieldStrength": 3.0, "Units": if hz { "Hz" } else { "ppm" }});
    if b0_key {
        side["B0_dir"] = serde_json::json!(b0.as_array());
    }
    write(
        &anat.join(format!("{ent}_localfield.json")),
        side.to_string().as_bytes(),
    );
}

fn sidecar(root: &Path, e: &Entry) -> Value {
    serde_json::from_slice(&std::fs::read(e.output_sidecar(root)).unwrap()).unwrap()
}

/// The request the cohort submits for `e`, rebuilt independently for the reference.
fn reference_request(
    e: &Entry,
    settings: &v1::JobSettings,
    b0: [f64; 3],
    units: &str,
) -> v1::SubmitJobRequest {
    let a = e.input.as_ref().unwrap();
    let nifti = |p: &Path| v1::VolumeInput {
        source: Some(v1::volume_input::Source::Nifti(
            std::fs::read(p).unwrap().into(),
        )),
    };
    let mut s = settings.clone();
    s.b0_dir = b0.to_vec();
    s.field_units = units.into();
    s.b0_tesla = 3.0;
    v1::SubmitJobRequest {
        measurement: Some(nifti(&a.measurement)),
        mask: a.mask.as_deref().map(nifti),
        settings: Some(s),
        label: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cohort_runs_every_subject_reports_the_broken_one_and_a_rerun_skips_finished_work() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("bids");
    write(
        &root.join("dataset_description.json"),
        br#"{"Name": "phantoms", "BIDSVersion": "1.9.0"}"#,
    );
    subject(
        &root.join("sub-01/ses-1/anat"),
        "sub-01_ses-1",
        1,
        0.0,
        false,
        true,
        true,
    );
    subject(
        &root.join("sub-01/ses-2/anat"),
        "sub-01_ses-2",
        2,
        0.0,
        false,
        true,
        true,
    );
    subject(
        &root.join("sub-02/anat"),
        "sub-02",
        3,
        15.0,
        true,
        false,
        false,
    );
    let broken = root.join("sub-03/anat");
    write(
        &broken.join("sub-03_localfield.nii.gz"),
        b"this is not a NIfTI file",
    );
    write(
        &broken.join("sub-03_localfield.json"),
        br#"{"B0_dir": [0, 0, 1]}"#,
    );

    let m = model();
    let cluster = Cluster::start(vec![served(&m, Duration::ZERO); 2], |_| {}).await;
    let mut c = cluster.client().await;
    let settings = dmqsm_tests::settings(v1::Task::Dipinv, v1::Guidance::Approx, 3);
    let mut opts = CohortOptions::new(settings.clone());
    opts.poll = Duration::from_millis(50);

    let entries = cohort::discover(&root, &Selection::default(), InputKind::LocalField).unwrap();
    let names: Vec<String> = entries.iter().map(Entry::name).collect();
    assert_eq!(names, ["sub-01/ses-1", "sub-01/ses-2", "sub-02", "sub-03"]);
    let mut events = Vec::new();
    let report = cohort::run_cohort(&mut c, &root, &entries, &opts, |p| events.push(p.clone()))
        .await
        .unwrap();
    assert_eq!(
        (report.done(), report.skipped(), report.failed()),
        (3, 0, 1),
        "{report:?}"
    );
    let last = events.last().unwrap();
    assert_eq!((last.done, last.failed, last.total), (3, 1, 4));
    assert_eq!(last.steps_done, last.steps_total);
    assert_eq!(last.steps_total, 3 * 3);
    match &report.subjects[3].outcome {
        Outcome::Failed { error, .. } => {
            assert!(error.contains("submission rejected"), "{error}")
        }
        o => panic!("sub-03 should fail, got {o:?}"),
    }

    // Outputs, sidecars and exactness against the in-process reference.
    let hash = {
        use dmqsm_common::diffusion::model::ScoreModel;
        m.spec().content_hash.clone()
    };
    for (i, e) in entries.iter().take(3).enumerate() {
        let side = sidecar(&root, e);
        assert_eq!(side["Units"], "ppm");
        assert_eq!(side["MagneticFieldStrength"], 3.0);
        assert_eq!(side["DmqsmModel"]["ContentHash"], hash.as_str());
        assert_eq!(side["DmqsmSettings"]["steps"], 3);
        assert_eq!(side["DmqsmSettings"]["task"], "dipinv");
        let b0: Vec<f64> = side["B0_dir"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let a = e.input.as_ref().unwrap();
        let stored = B0Direction::from_volume(&read_nifti(&a.measurement).unwrap())
            .unwrap()
            .as_array();
        if i == 2 {
            // Oblique sub-02: from the affine, = the tilted z axis (0, sin 15°, cos 15°).
            assert_eq!(side["B0DirSource"], "affine");
            let (s, c) = 15f64.to_radians().sin_cos();
            for (got, want) in b0.iter().zip([0.0, s, c]) {
                assert!((got - want).abs() < 1e-6, "{b0:?}"); // f32 affine storage
            }
            for (got, want) in b0.iter().zip(stored) {
                assert!((got - want).abs() < 1e-12, "{b0:?} vs {stored:?}");
            }
            assert!(side["Metrics"].is_null());
        } else {
            assert_eq!(side["B0DirSource"], "sidecar B0_dir");
            let metrics = &side["Metrics"];
            assert!(metrics["rmse"].as_f64().unwrap().is_finite(), "{metrics}");
            assert!(metrics["voxels"].as_u64().unwrap() > 0);
        }
        let units = if i == 2 { "hz" } else { "ppm" };
        let req = reference_request(e, &settings, stored, units);
        let want = reference(&m, &req, 2).0;
        let got = read_nifti(e.output_chi(&root)).unwrap().data;
        assert_bitwise(&got, &want, &e.name());
    }
    assert!(
        root.join("derivatives/dmqsm/dataset_description.json")
            .is_file()
    );
    let summary: Value = serde_json::from_slice(
        &std::fs::read(root.join("derivatives/dmqsm/cohort_report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["failed"], 1);
    assert_eq!(summary["subjects"][3]["state"], "failed");

    // Re-run: nothing new is submitted, finished entries are skipped untouched.
    let jobs_before = c
        .list_jobs(v1::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs
        .len();
    let mtime = |e: &Entry| {
        std::fs::metadata(e.output_chi(&root))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before: Vec<_> = entries.iter().take(3).map(mtime).collect();
    let again = cohort::discover(&root, &Selection::default(), InputKind::LocalField).unwrap();
    assert_eq!(
        again.len(),
        4,
        "derivatives/dmqsm must not be taken for inputs"
    );
    let report = cohort::run_cohort(&mut c, &root, &again, &opts, |_| {})
        .await
        .unwrap();
    assert_eq!(
        (report.done(), report.skipped(), report.failed()),
        (0, 3, 1),
        "{report:?}"
    );
    let jobs_after = c
        .list_jobs(v1::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs
        .len();
    assert_eq!(jobs_after, jobs_before, "a re-run submitted jobs");
    let after: Vec<_> = entries.iter().take(3).map(mtime).collect();
    assert_eq!(before, after);

    // A changed setting on a selected subject recomputes just that one.
    let sel = Selection {
        subjects: vec!["sub-02".into()],
        sessions: vec![],
    };
    let only = cohort::discover(&root, &sel, InputKind::LocalField).unwrap();
    assert_eq!(only.len(), 1);
    let mut opts4 = opts.clone();
    opts4.settings.steps = Some(4);
    let report = cohort::run_cohort(&mut c, &root, &only, &opts4, |_| {})
        .await
        .unwrap();
    assert_eq!((report.done(), report.skipped()), (1, 0), "{report:?}");
    assert_eq!(sidecar(&root, &only[0])["DmqsmSettings"]["steps"], 4);
    let sel = Selection {
        subjects: vec![],
        sessions: vec!["2".into()],
    };
    let ses2 = cohort::discover(&root, &sel, InputKind::LocalField).unwrap();
    assert_eq!(
        ses2.iter().map(Entry::name).collect::<Vec<_>>(),
        ["sub-01/ses-2"]
    );
}
