//! Helpers shared by the coordinator's integration tests.

use dmqsm_worker::{ServedModel, ServerConfig};

/// A worker serving `model` in this process on a loopback port, on a runtime of its own
/// (so a test thread may block on clients); returns its URL and the runtime to keep.
pub fn start_worker(model: ServedModel, id: &str) -> (String, tokio::runtime::Runtime) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let config = ServerConfig {
        worker_id: Some(id.into()),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        let _ = dmqsm_worker::serve(config, model, l, std::future::pending()).await;
    });
    (url, rt)
}
