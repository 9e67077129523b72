//! The Worker service over real gRPC on loopback: bitwise agreement with in-process
//! evaluation, coalescing, rejection of every kind of bad request, model failures,
//! health and reflection, graceful shutdown, registration with a coordinator.

mod common;

use common::{P, randn, timesteps, tiny_model};
use dmqsm_common::diffusion::analytic::GaussianPriorModel;
use dmqsm_common::diffusion::model::{ModelSpec, ScoreModel};
use dmqsm_common::diffusion::schedule::ScheduleConfig;
use dmqsm_proto::DEFAULT_MAX_MESSAGE_BYTES;
use dmqsm_proto::tensor::{decode, encode};
use dmqsm_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use dmqsm_proto::v1::*;
use dmqsm_worker::batching::BatchConfig;
use dmqsm_worker::registration::RegistrationConfig;
use dmqsm_worker::{ServedModel, ServerConfig, SimulatedModel, connect, spawn_local_worker};
use ndarray::{Array4, ArrayView4};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Code, Request, Response, Status};

fn tensor(a: &Array4<f32>, dtype: Dtype) -> Tensor {
    encode(a.as_standard_layout().as_slice().unwrap(), a.shape(), dtype)
}

fn array(t: &Option<Tensor>) -> Array4<f32> {
    let (v, s) = decode(t.as_ref().unwrap()).unwrap();
    Array4::from_shape_vec((s[0], s[1], s[2], s[3]), v).unwrap()
}

/// A local worker serving `served` with the default settings, and a client of it.
async fn serve(
    served: ServedModel,
) -> (
    dmqsm_worker::LocalWorker,
    worker_client::WorkerClient<dmqsm_proto::transport::AuthChannel>,
) {
    let worker = spawn_local_worker(served, ServerConfig::default())
        .await
        .unwrap();
    let client = connect(&worker.url(), DEFAULT_MAX_MESSAGE_BYTES, None)
        .await
        .unwrap();
    (worker, client)
}

fn denoise_req(x: &Array4<f32>, t: &[f32]) -> DenoiseRequest {
    DenoiseRequest {
        model_hash: String::new(),
        patches: Some(tensor(x, Dtype::F32)),
        timesteps: t.to_vec(),
        response_dtype: Dtype::F32 as i32,
        answer_to: None,
    }
}

/// `Denoise` and `DenoiseVjp` over loopback gRPC return exactly the in-process bits
/// (tolerance: none); bf16/f16 responses are the f32 answer rounded to nearest: half an
/// ulp, i.e. relative error ≤ 2⁻⁸ for bf16 (8 significant bits) and ≤ 2⁻¹¹ for f16 (11
/// bits) in the normal range, plus 1e-7 absolute for f16 subnormals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denoise_over_grpc_is_bitwise_equal_to_in_process() {
    let model = Arc::new(tiny_model(P, 2, 3));
    let (worker, mut client) = serve(ServedModel::new(model.clone(), "cpu", 2, "f32")).await;

    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    let m = info.model.as_ref().unwrap();
    assert_eq!(m.content_hash, model.spec().content_hash);
    assert_eq!(m.patch_size as usize, P);
    assert_eq!(m.parameterisation, "eps");
    assert_eq!((info.eval_batch, info.precision.as_str()), (2, "f32"));
    assert!(info.supports_vjp && info.supports_eps);

    let x = randn(5, P, 1);
    let t = timesteps(5);
    let v = randn(5, P, 2);
    let expected = model.eps(x.view(), &t).unwrap();
    let g2 = model.vjp(x.view(), &t, v.view()).unwrap();

    let mut req = denoise_req(&x, &t);
    req.model_hash = m.content_hash.clone();
    let got = client.denoise(req.clone()).await.unwrap().into_inner();
    assert_eq!(array(&got.eps), expected);

    let vjp = client
        .denoise_vjp(DenoiseVjpRequest {
            model_hash: String::new(),
            patches: Some(tensor(&x, Dtype::F32)),
            timesteps: t.clone(),
            cotangents: Some(tensor(&v, Dtype::F32)),
            response_dtype: 0,
            answer_to: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(array(&vjp.vjp), g2);

    for (dtype, rel) in [(Dtype::Bf16, 2f32.powi(-8)), (Dtype::F16, 2f32.powi(-11))] {
        req.response_dtype = dtype as i32;
        let got = client.denoise(req.clone()).await.unwrap().into_inner();
        let eps = got.eps.as_ref().unwrap();
        assert_eq!(eps.dtype, dtype as i32);
        assert_eq!(eps.data.len(), 5 * P * P * P * 2);
        for (a, b) in array(&got.eps).iter().zip(expected.iter()) {
            assert!(
                (a - b).abs() <= rel * b.abs() + 1e-7,
                "{dtype:?}: {a} vs {b}"
            );
        }
    }
    worker.shutdown().await.unwrap();
}

/// Concurrent requests are coalesced into shared model calls (checked on the queue's
/// counters) and every answer is still bitwise the in-process ε of that request alone.
/// Tensors through an attached shared-memory region (the same-host data plane) give the
/// inline answers bit for bit, ε and Jᵀv; a region the worker did not attach, a tensor
/// with bytes both inline and shared, a range outside the region and an answer area too
/// small are refused with the code and a message naming them; a region holding another
/// nonce, or a bad name, is not attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensors_through_shared_memory_match_inline_and_bad_references_are_refused() {
    use dmqsm_proto::shm::{HEADER_BYTES, NONCE_LEN, SharedRegion};
    let model = Arc::new(tiny_model(P, 2, 3));
    let (_worker, mut client) = serve(ServedModel::new(model.clone(), "cpu", 2, "f32")).await;
    let name = format!("dmqsm-test-worker-{}", std::process::id());
    let nonce = [3u8; NONCE_LEN];
    let region = SharedRegion::create(&name, HEADER_BYTES + (1 << 20), &nonce).unwrap();
    let attach = |region: &str, nonce: &[u8]| AttachSharedMemoryRequest {
        region: region.into(),
        nonce: nonce.to_vec().into(),
    };
    let no = client
        .attach_shared_memory(attach(&name, &[4u8; NONCE_LEN]))
        .await
        .unwrap()
        .into_inner();
    assert!(!no.attached && no.reason.contains("nonce"), "{no:?}");
    let no = client
        .attach_shared_memory(attach("dmqsm-../x", &nonce))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !no.attached && no.reason.contains("not a dmqsm region"),
        "{no:?}"
    );
    // Before attaching, a reference to the region is a failed precondition.
    let x = randn(2, P, 1);
    let t = timesteps(2);
    let v = randn(2, P, 2);
    let put = |at: u64, a: &Array4<f32>| {
        let inline = tensor(a, Dtype::F32);
        region.write(at, &inline.data).unwrap();
        Tensor {
            data: Default::default(),
            shared: Some(SharedBytes {
                region: name.clone(),
                offset: at,
                length: inline.data.len() as u64,
            }),
            ..inline
        }
    };
    let base = HEADER_BYTES as u64;
    let bytes = (2 * P * P * P * 4) as u64;
    let answer_to = Some(SharedBytes {
        region: name.clone(),
        offset: base + 2 * bytes,
        length: bytes,
    });
    let shared_req = DenoiseRequest {
        patches: Some(put(base, &x)),
        answer_to: answer_to.clone(),
        ..denoise_req(&x, &t)
    };
    let e = client.denoise(shared_req.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("not attached"), "{e:?}");
    let yes = client
        .attach_shared_memory(attach(&name, &nonce))
        .await
        .unwrap()
        .into_inner();
    assert!(yes.attached, "{yes:?}");
    region.unlink().unwrap();

    let answer = |t: Option<Tensor>| {
        let mut t = t.unwrap();
        let s = t.shared.take().expect("the answer points into the region");
        assert_eq!(
            (s.region.as_str(), s.offset),
            (name.as_str(), base + 2 * bytes)
        );
        t.data = region.read(s.offset, s.length).unwrap();
        array(&Some(t))
    };
    let got = client
        .denoise(shared_req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer(got.eps), model.eps(x.view(), &t).unwrap());
    let vjp = client
        .denoise_vjp(DenoiseVjpRequest {
            model_hash: String::new(),
            patches: Some(put(base, &x)),
            timesteps: t.clone(),
            cotangents: Some(put(base + bytes, &v)),
            response_dtype: 0,
            answer_to: answer_to.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer(vjp.vjp), model.vjp(x.view(), &t, v.view()).unwrap());

    let mut bad: Vec<(&str, DenoiseRequest, Code, &str)> = Vec::new();
    let mut r = shared_req.clone();
    r.patches.as_mut().unwrap().data = vec![0u8; 8].into();
    bad.push((
        "both",
        r,
        Code::InvalidArgument,
        "both inline bytes and shared",
    ));
    let mut r = shared_req.clone();
    r.patches.as_mut().unwrap().shared.as_mut().unwrap().offset = u64::MAX - 4;
    bad.push(("outside", r, Code::InvalidArgument, "lie outside"));
    let mut r = shared_req.clone();
    r.patches.as_mut().unwrap().shared.as_mut().unwrap().region = "dmqsm-other".into();
    bad.push(("unknown", r, Code::FailedPrecondition, "not attached"));
    let mut r = shared_req.clone();
    r.answer_to.as_mut().unwrap().length = 16;
    bad.push((
        "small answer area",
        r,
        Code::InvalidArgument,
        "gives room for 16",
    ));
    for (what, req, code, message) in bad {
        let e = client.denoise(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(e.message().contains(message), "{what}: {}", e.message());
    }
    // Still serving, inline and shared.
    let got = client
        .denoise(denoise_req(&x, &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(array(&got.eps), model.eps(x.view(), &t).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_requests_match_unbatched_evaluation() {
    let model = Arc::new(tiny_model(P, 4, 4));
    let config = ServerConfig {
        batch: BatchConfig {
            max_batch: 16,
            max_queue_delay: Duration::from_millis(300),
        },
        ..ServerConfig::default()
    };
    let stats = config.stats.clone();
    let served = ServedModel::new(model.clone(), "cpu", 4, "f32");
    let worker = spawn_local_worker(served, config).await.unwrap();
    let url = worker.url();
    let mut tasks = Vec::new();
    for r in 0..6u64 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let b = 1 + (r as usize % 3);
            let x = randn(b, P, 50 + r);
            let t = timesteps(b);
            let mut c = connect(&url, DEFAULT_MAX_MESSAGE_BYTES, None)
                .await
                .unwrap();
            let got = c.denoise(denoise_req(&x, &t)).await.unwrap().into_inner();
            (x, t, array(&got.eps))
        }));
    }
    for task in tasks {
        let (x, t, got) = task.await.unwrap();
        assert_eq!(got, model.eps(x.view(), &t).unwrap());
    }
    assert!(stats.coalesced_batches.load(Ordering::Relaxed) >= 1);
    assert_eq!(stats.requests.load(Ordering::Relaxed), 6);
    assert!(stats.batches.load(Ordering::Relaxed) < 6);
    worker.shutdown().await.unwrap();
}

/// Every malformed request answers INVALID_ARGUMENT with a message naming the problem,
/// and the worker answers the next good request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_rejected_and_the_worker_keeps_serving() {
    let model = Arc::new(tiny_model(P, 1, 6));
    let config = ServerConfig {
        batch: BatchConfig {
            max_batch: 4,
            max_queue_delay: Duration::ZERO,
        },
        ..ServerConfig::default()
    };
    let served = ServedModel::new(model.clone(), "cpu", 1, "f32");
    let worker = spawn_local_worker(served, config).await.unwrap();
    let mut client = connect(&worker.url(), DEFAULT_MAX_MESSAGE_BYTES, None)
        .await
        .unwrap();
    let x = randn(1, P, 9);
    let good = denoise_req(&x, &[10.0]);
    let expected = model.eps(x.view(), &[10.0]).unwrap();

    let mut nan = x.clone();
    nan[[0, 1, 2, 3]] = f32::NAN;
    let mut bad: Vec<(&str, DenoiseRequest, &str)> = Vec::new();
    let mut r = good.clone();
    r.patches = None;
    bad.push(("missing patches", r, "the request has no patches"));
    let mut r = good.clone();
    r.patches.as_mut().unwrap().dtype = 0;
    bad.push(("unset dtype", r, "dtype 0 is not supported"));
    let mut r = good.clone();
    r.patches.as_mut().unwrap().dtype = 9;
    bad.push(("unknown dtype", r, "dtype 9 is not supported"));
    let mut r = good.clone();
    r.patches.as_mut().unwrap().data = vec![0u8; 100].into();
    bad.push(("byte length", r, "needs 2048 bytes, got 100"));
    bad.push((
        "patch size",
        denoise_req(&randn(1, 4, 1), &[10.0]),
        "needs [B, 8, 8, 8]",
    ));
    let mut r = good.clone();
    r.patches.as_mut().unwrap().shape = vec![8, 8, 8];
    bad.push(("rank", r, "have shape [8, 8, 8]"));
    let mut r = good.clone();
    r.patches = Some(encode(&[], &[0, P, P, P], Dtype::F32));
    r.timesteps = vec![];
    bad.push(("empty batch", r, "the batch is empty"));
    bad.push((
        "batch over limit",
        denoise_req(&randn(5, P, 2), &timesteps(5)),
        "batch of 5 patches exceeds this worker's max batch 4",
    ));
    bad.push(("NaN", denoise_req(&nan, &[10.0]), "NaN or infinite"));
    let mut inf = x.clone();
    inf[[0, 0, 0, 0]] = f32::INFINITY;
    bad.push((
        "infinity",
        denoise_req(&inf, &[10.0]),
        "first in patch 0 at voxel 0",
    ));
    bad.push((
        "timestep count",
        denoise_req(&x, &[1.0, 2.0]),
        "2 timesteps for 1 patches",
    ));
    bad.push((
        "timestep range",
        denoise_req(&x, &[1000.0]),
        "timestep 1000 at position 0 is outside [0, 999]",
    ));
    bad.push(("timestep NaN", denoise_req(&x, &[f32::NAN]), "timestep NaN"));
    let mut r = good.clone();
    r.model_hash = "deadbeef".into();
    bad.push(("model hash", r, "unknown model hash deadbeef"));
    let mut r = good.clone();
    r.response_dtype = 42;
    bad.push(("response dtype", r, "response_dtype 42"));

    for (what, req, message) in bad {
        let status = client.denoise(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(message),
            "{what}: {}",
            status.message()
        );
        let ok = client.denoise(good.clone()).await.unwrap().into_inner();
        assert_eq!(array(&ok.eps), expected, "after {what}");
    }

    let v = randn(1, P, 3);
    let vjp_req = DenoiseVjpRequest {
        model_hash: String::new(),
        patches: Some(tensor(&x, Dtype::F32)),
        timesteps: vec![10.0],
        cotangents: Some(tensor(&v, Dtype::F32)),
        response_dtype: 0,
        answer_to: None,
    };
    let mut bad_vjp: Vec<(&str, DenoiseVjpRequest, &str)> = Vec::new();
    let mut r = vjp_req.clone();
    r.cotangents = None;
    bad_vjp.push(("missing cotangents", r, "the request has no cotangents"));
    let mut r = vjp_req.clone();
    r.cotangents = Some(tensor(&randn(2, P, 4), Dtype::F32));
    bad_vjp.push((
        "cotangent batch",
        r,
        "cotangents have batch 2, the patches 1",
    ));
    let mut r = vjp_req.clone();
    r.cotangents = Some(tensor(&nan, Dtype::F32));
    bad_vjp.push(("cotangent NaN", r, "cotangents contain 1 NaN"));
    for (what, req, message) in bad_vjp {
        let status = client.denoise_vjp(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(message),
            "{what}: {}",
            status.message()
        );
        client.denoise_vjp(vjp_req.clone()).await.unwrap();
    }
    worker.shutdown().await.unwrap();
}

/// A model that fails for t > 500 and panics for t > 900; otherwise the exact Gaussian
/// prior model.
struct Flaky(GaussianPriorModel);

impl ScoreModel for Flaky {
    fn spec(&self) -> &ModelSpec {
        self.0.spec()
    }
    fn eps(&self, x: ArrayView4<'_, f32>, t: &[f32]) -> dmqsm_common::Result<Array4<f32>> {
        if t.iter().any(|&t| t > 900.0) {
            panic!("simulated libtorch abort");
        }
        if t.iter().any(|&t| t > 500.0) {
            return Err(dmqsm_common::Error::Model(
                "CUDA out of memory (simulated)".into(),
            ));
        }
        self.0.eps(x, t)
    }
    fn vjp(
        &self,
        x: ArrayView4<'_, f32>,
        t: &[f32],
        v: ArrayView4<'_, f32>,
    ) -> dmqsm_common::Result<Array4<f32>> {
        self.0.vjp(x, t, v)
    }
}

/// Model failures answer INTERNAL with the model's message (also for a panic inside the
/// model), and the worker keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_failures_answer_internal() {
    let gauss = GaussianPriorModel::new(0.0, 0.5, P, 5.0, ScheduleConfig::default()).unwrap();
    let (worker, mut client) = serve(ServedModel::new(
        Arc::new(Flaky(gauss.clone())),
        "cpu",
        1,
        "f32",
    ))
    .await;
    let x = randn(2, P, 1);
    let status = client
        .denoise(denoise_req(&x, &[600.0, 1.0]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(
        status.message().contains("CUDA out of memory (simulated)"),
        "{}",
        status.message()
    );
    let status = client
        .denoise(denoise_req(&x, &[950.0, 1.0]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(
        status.message().contains("simulated libtorch abort"),
        "{}",
        status.message()
    );
    let ok = client
        .denoise(denoise_req(&x, &[3.0, 4.0]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(array(&ok.eps), gauss.eps(x.view(), &[3.0, 4.0]).unwrap());
    worker.shutdown().await.unwrap();
}

/// Standard health reports SERVING for the Worker service, reflection lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let gauss = GaussianPriorModel::new(0.0, 0.5, P, 5.0, ScheduleConfig::default()).unwrap();
    let sim = SimulatedModel::new(Arc::new(gauss), Duration::ZERO, Duration::ZERO);
    let worker = spawn_local_worker(ServedModel::simulated(sim), ServerConfig::default())
        .await
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(worker.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(HealthCheckRequest {
            service: "dmqsm.v1.Worker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, ServingStatus::Serving as i32);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"dmqsm.v1.Worker".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    worker.shutdown().await.unwrap();
}

/// Graceful shutdown: a request in flight when shutdown starts is answered; afterwards
/// the port refuses connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let gauss = GaussianPriorModel::new(0.0, 0.5, P, 5.0, ScheduleConfig::default()).unwrap();
    let sim = SimulatedModel::new(
        Arc::new(gauss.clone()),
        Duration::from_millis(500),
        Duration::ZERO,
    );
    let worker = spawn_local_worker(ServedModel::simulated(sim), ServerConfig::default())
        .await
        .unwrap();
    let url = worker.url();
    let x = randn(2, P, 5);
    let mut client = connect(&url, DEFAULT_MAX_MESSAGE_BYTES, None)
        .await
        .unwrap();
    let req = denoise_req(&x, &[7.0, 8.0]);
    let in_flight = tokio::spawn(async move { client.denoise(req).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    worker.shutdown().await.unwrap();
    let answer = in_flight.await.unwrap().unwrap().into_inner();
    assert_eq!(
        array(&answer.eps),
        gauss.eps(x.view(), &[7.0, 8.0]).unwrap()
    );
    assert!(
        connect(&url, DEFAULT_MAX_MESSAGE_BYTES, None)
            .await
            .is_err()
    );
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    /// name, offered id, address
    Register(String, String, String),
    Heartbeat(String, bool),
}

/// A coordinator that records registrations and heartbeats; it answers `known: false`
/// to the first heartbeat, to exercise re-registration.
#[derive(Default, Clone)]
struct FakeCoordinator {
    events: Arc<Mutex<Vec<Event>>>,
}

type Stream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for FakeCoordinator {
    type WatchJobStream = Stream<JobProgress>;
    type FetchResultStream = Stream<ResultChunk>;
    async fn submit_job(
        &self,
        _: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_job(&self, _: Request<GetJobRequest>) -> Result<Response<JobStatus>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_jobs(
        &self,
        _: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn cancel_job(
        &self,
        _: Request<CancelJobRequest>,
    ) -> Result<Response<JobStatus>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn watch_job(
        &self,
        _: Request<GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn fetch_result(
        &self,
        _: Request<FetchResultRequest>,
    ) -> Result<Response<Self::FetchResultStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_workers(
        &self,
        _: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn register_worker(
        &self,
        r: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        let r = r.into_inner();
        self.events
            .lock()
            .unwrap()
            .push(Event::Register(r.name, r.worker_id, r.address));
        Ok(Response::new(RegisterWorkerResponse {
            heartbeat_interval_ms: 50,
            worker_id: "c-7".into(),
        }))
    }
    async fn heartbeat(
        &self,
        r: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let r = r.into_inner();
        let mut events = self.events.lock().unwrap();
        let first = !events.iter().any(|e| matches!(e, Event::Heartbeat(..)));
        events.push(Event::Heartbeat(r.worker_id, r.draining));
        Ok(Response::new(HeartbeatResponse { known: !first }))
    }
}

/// Registration: the coordinator is down when the worker starts (the worker retries with
/// backoff), then comes up; the worker registers, heartbeats, registers again when told
/// it is unknown, and its last heartbeat on shutdown says draining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_coordinator_and_heartbeats() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let coord_addr = probe.local_addr().unwrap();
    drop(probe);
    let gauss = GaussianPriorModel::new(0.0, 0.5, P, 5.0, ScheduleConfig::default()).unwrap();
    let sim = SimulatedModel::new(Arc::new(gauss), Duration::ZERO, Duration::ZERO);
    let mut reg = RegistrationConfig::new(format!("http://{coord_addr}"), "");
    reg.initial_backoff = Duration::from_millis(50);
    reg.max_backoff = Duration::from_millis(200);
    let config = ServerConfig {
        worker_id: Some("w-test".into()),
        registration: Some(reg),
        ..ServerConfig::default()
    };
    let worker = spawn_local_worker(ServedModel::simulated(sim), config)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let fake = FakeCoordinator::default();
    let events = fake.events.clone();
    let listener = tokio::net::TcpListener::bind(coord_addr).await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CoordinatorServer::new(fake))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move {
                    let _ = stop_rx.await;
                },
            ),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, Event::Heartbeat(_, false)))
            .count();
        if n >= 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no heartbeats: {:?}",
            events.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = worker.url();
    worker.shutdown().await.unwrap();
    let events = events.lock().unwrap().clone();
    let registrations: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Register(..)))
        .collect();
    assert!(registrations.len() >= 2, "{events:?}");
    // The first registration offers no id; the coordinator assigns one, which every
    // heartbeat carries and the next registration offers back.
    assert_eq!(
        registrations[0],
        &Event::Register("w-test".into(), String::new(), url.clone())
    );
    assert_eq!(
        registrations[1],
        &Event::Register("w-test".into(), "c-7".into(), url)
    );
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, Event::Heartbeat(id, _) if id != "c-7")),
        "{events:?}"
    );
    assert_eq!(
        events.last(),
        Some(&Event::Heartbeat("c-7".into(), true)),
        "{events:?}"
    );
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

/// A worker with a token answers only callers that present it (the coordinator dials
/// back with the token the worker registered with); health stays open for probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_token_refuses_callers_without_it() {
    let gauss = GaussianPriorModel::new(0.0, 0.5, P, 5.0, ScheduleConfig::default()).unwrap();
    let sim = SimulatedModel::new(Arc::new(gauss), Duration::ZERO, Duration::ZERO);
    let token = "worker-token-0123456789";
    let config = ServerConfig {
        token: Some(token.into()),
        ..ServerConfig::default()
    };
    let worker = spawn_local_worker(ServedModel::simulated(sim), config)
        .await
        .unwrap();
    for wrong in [None, Some("another-token-0123456789")] {
        let mut c = connect(&worker.url(), DEFAULT_MAX_MESSAGE_BYTES, wrong)
            .await
            .unwrap();
        let e = c.info(InfoRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{wrong:?}: {e}");
        let x = randn(1, P, 1);
        let e = c.denoise(denoise_req(&x, &timesteps(1))).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let mut c = connect(&worker.url(), DEFAULT_MAX_MESSAGE_BYTES, Some(token))
        .await
        .unwrap();
    assert!(c.info(InfoRequest {}).await.is_ok());
    let channel = tonic::transport::Endpoint::from_shared(worker.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    worker.shutdown().await.unwrap();
}
