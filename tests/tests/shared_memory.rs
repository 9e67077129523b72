//! The same-host shared-memory data plane (`dmqsm_proto::shm`) end to end over real gRPC:
//! workers on the coordinator's host attach a region at connect, and their batches'
//! tensors travel through it. Output must equal the in-process reference bit for bit
//! (tolerance: none) with the plane on, off, and on with slots too small to use, in an
//! ε-only mode (approx) and one with VJP rounds (exact: patches plus cotangents).

use dmqsm_proto::v1;
use dmqsm_tests::*;
use std::time::Duration;

async fn run_modes(cluster: &Cluster, m: &dmqsm_common::diffusion::analytic::GaussianPriorModel) {
    let mut c = cluster.client().await;
    for guidance in [v1::Guidance::Approx, v1::Guidance::Exact] {
        let req = request(settings(v1::Task::Dipinv, guidance, 3), "shm");
        let st = run_job(&mut c, req.clone()).await;
        assert_eq!(st.state, v1::JobState::Succeeded as i32, "{}", st.error);
        let (chi, _, _) = fetch_chi(&mut c, &st.job_id).await;
        assert_bitwise(
            &chi,
            &reference(m, &req, 2).0,
            &format!("{guidance:?} guidance"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensors_through_shared_memory_or_the_socket_give_the_reference_bit_for_bit() {
    let m = model();
    for (slot_bytes, attached) in [(8u64 << 20, true), (0, false)] {
        let cluster = Cluster::start(vec![served(&m, Duration::ZERO); 2], |c| {
            c.shared_memory_slot_bytes = slot_bytes
        })
        .await;
        let ws = cluster.coordinator.dispatcher().workers();
        assert!(
            ws.iter().all(|w| w.shared_memory == attached),
            "slot {slot_bytes}: {ws:?}"
        );
        run_modes(&cluster, &m).await;
        // The region's name was unlinked once the workers attached: nothing is left in
        // /dev/shm by this process.
        let prefix = format!("dmqsm-c{}-", std::process::id());
        let left: Vec<_> = std::fs::read_dir(dmqsm_proto::shm::REGION_DIR)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "regions left behind: {left:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_too_large_for_a_slot_travel_inline_with_identical_output() {
    let m = model();
    // Attached, but no batch fits in 1 KiB: every batch falls back to the socket.
    let cluster = Cluster::start(vec![served(&m, Duration::ZERO); 2], |c| {
        c.shared_memory_slot_bytes = 1024
    })
    .await;
    let ws = cluster.coordinator.dispatcher().workers();
    assert!(ws.iter().all(|w| w.shared_memory), "{ws:?}");
    run_modes(&cluster, &m).await;
}
