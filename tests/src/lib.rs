//! Shared fixtures for the end-to-end tests in `tests/tests/`: tiny inputs, analytic and
//! simulated-latency workers on loopback ports, an in-process coordinator served over
//! real gRPC, and the in-process reference each distributed result must equal bit for
//! bit.
//!
//! Sizes are chosen for speed: 24³ volumes at 1 mm (12³ at 2 mm for SR inputs) and 16³
//! patches with overlap 8, i.e. 8 patches per round.

use dmqsm_common::Volume;
use dmqsm_common::diffusion::analytic::GaussianPriorModel;
use dmqsm_common::diffusion::model::ScoreModel;
use dmqsm_common::diffusion::schedule::ScheduleConfig;
use dmqsm_common::geometry::B0Direction;
use dmqsm_common::nifti_io::{read_nifti_bytes, write_nifti_bytes};
use dmqsm_coordinator::client::{self, Client};
use dmqsm_coordinator::job::JobSpec;
use dmqsm_coordinator::{Coordinator, CoordinatorConfig};
use dmqsm_proto::v1;
use dmqsm_worker::{ServedModel, ServerConfig, SimulatedModel};
use ndarray::Array3;
use std::sync::Arc;
use std::time::Duration;

/// Patch edge of the test models.
pub const PATCH: usize = 16;
/// Edge of the high-resolution test volumes.
pub const N: usize = 24;

/// The analytic Gaussian-prior model N(mean, std²) in model units, χ scale 10, patch
/// [`PATCH`], default DDPM schedule.
pub fn analytic(mean: f64, std: f64) -> GaussianPriorModel {
    GaussianPriorModel::new(mean, std, PATCH, 10.0, ScheduleConfig::default())
        .expect("valid analytic model")
}

/// The default test model (μ = 0, σ = 0.5 in model units, i.e. 0.05 ppm).
pub fn model() -> GaussianPriorModel {
    analytic(0.0, 0.5)
}

/// A served model with an optional fixed latency per batch (a simulated GPU).
pub fn served(model: &GaussianPriorModel, latency: Duration) -> ServedModel {
    if latency.is_zero() {
        ServedModel::new(Arc::new(model.clone()), "cpu (analytic)", 1, "f32")
    } else {
        ServedModel::simulated(SimulatedModel::new(
            Arc::new(model.clone()),
            latency,
            Duration::ZERO,
        ))
    }
}

/// A worker serving on a loopback port in this process, on its own tokio runtime, so a
/// test can kill it abruptly: shutting the runtime down drops the listener and every
/// connection at once, as a crashed process would.
pub struct TestWorker {
    /// `http://127.0.0.1:port`.
    pub url: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestWorker {
    /// Starts a worker with id `id`.
    pub async fn start(model: ServedModel, id: &str) -> Self {
        Self::start_with(model, id, None).await
    }

    /// Starts a worker with id `id` that registers itself with the coordinator at
    /// `coordinator` (when given) and sends heartbeats.
    pub async fn start_with(model: ServedModel, id: &str, coordinator: Option<&str>) -> Self {
        Self::start_configured(model, id, coordinator, |_| {}).await
    }

    /// [`Self::start_with`], with the server configuration adjusted by `tune` (token,
    /// TLS). The URL is `https://` when `tune` sets TLS.
    pub async fn start_configured(
        model: ServedModel,
        id: &str,
        coordinator: Option<&str>,
        tune: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let mut config = ServerConfig {
            worker_id: Some(id.to_string()),
            ..Default::default()
        };
        tune(&mut config);
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://{}", std_listener.local_addr().unwrap());
        if let Some(c) = coordinator {
            let mut reg = dmqsm_worker::registration::RegistrationConfig::new(c, url.clone());
            if let Some(r) = &config.registration {
                reg.tls = r.tls.clone();
                reg.token = r.token.clone();
            }
            config.registration = Some(reg);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let _ = dmqsm_worker::serve(config, model, listener, std::future::pending()).await;
        });
        Self {
            url,
            runtime: Some(runtime),
        }
    }

    /// Kills the server abruptly (connections drop; in-flight requests are lost).
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A coordinator served over gRPC on loopback, with its store in a temp dir.
pub struct Cluster {
    /// The coordinator.
    pub coordinator: Coordinator,
    /// Its URL.
    pub url: String,
    /// The workers it was started with.
    pub workers: Vec<TestWorker>,
    /// The store's directory.
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Logs to stderr when `RUST_LOG` is set (e.g. `RUST_LOG=dmqsm_coordinator=debug`).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A coordinator configuration for tests: fast heartbeats, short grace, 4-patch batches.
pub fn test_config(dir: &std::path::Path) -> CoordinatorConfig {
    let mut c = CoordinatorConfig::new(dir);
    c.batch_size = 2;
    c.heartbeat_interval = Duration::from_millis(100);
    c.missed_heartbeats = 3;
    c.no_worker_grace = Duration::from_secs(2);
    c.batch_timeout = Duration::from_secs(10);
    c.checkpoint_every = 2;
    c.max_running_jobs = 8;
    c
}

impl Cluster {
    /// Starts `workers` (model, latency) and a coordinator listing them, configured by
    /// `tune`.
    pub async fn start(
        workers: Vec<ServedModel>,
        tune: impl FnOnce(&mut CoordinatorConfig),
    ) -> Self {
        init_logs();
        let mut ws = Vec::new();
        for (i, m) in workers.into_iter().enumerate() {
            ws.push(TestWorker::start(m, &format!("w{i}")).await);
        }
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        tune(&mut config);
        Self::serve(config, ws, dir).await
    }

    /// Starts a coordinator with `config` listing `workers` and serves it on a loopback
    /// port (`https://` when the configuration has TLS).
    async fn serve(
        config: CoordinatorConfig,
        workers: Vec<TestWorker>,
        dir: tempfile::TempDir,
    ) -> Self {
        let scheme = if config.security.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let urls: Vec<String> = workers.iter().map(|w| w.url.clone()).collect();
        let coordinator = Coordinator::start(config, &urls).await.unwrap();
        let (addr, stop, _h) =
            dmqsm_coordinator::spawn_server(coordinator.clone(), "127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
        Self {
            coordinator,
            url: format!("{scheme}://{addr}"),
            workers,
            dir,
            stop: Some(stop),
        }
    }

    /// A gRPC client of this coordinator.
    pub async fn client(&self) -> Client {
        client::connect(&self.url).await.unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.coordinator.shutdown_now();
    }
}

/// A spherical brain mask of radius 0.42·n on an n³ grid.
pub fn ball(n: usize) -> Array3<f32> {
    let c = (n as f64 - 1.0) / 2.0;
    Array3::from_shape_fn((n, n, n), |(i, j, k)| {
        let r2 = (i as f64 - c).powi(2) + (j as f64 - c).powi(2) + (k as f64 - c).powi(2);
        if r2.sqrt() <= 0.42 * n as f64 {
            1.0
        } else {
            0.0
        }
    })
}

/// A smooth χ phantom (ppm) on an n³ grid: a few Gaussian blobs of ±0.1 ppm in the ball.
pub fn chi_phantom(n: usize) -> Array3<f32> {
    let mask = ball(n);
    let s = n as f64;
    let blobs = [
        (0.35, 0.40, 0.50, 0.10),
        (0.65, 0.55, 0.45, -0.06),
        (0.50, 0.70, 0.60, 0.08),
    ];
    Array3::from_shape_fn((n, n, n), |(i, j, k)| {
        let p = [i as f64 / s, j as f64 / s, k as f64 / s];
        let v: f64 = blobs
            .iter()
            .map(|&(x, y, z, a)| {
                let d2 = (p[0] - x).powi(2) + (p[1] - y).powi(2) + (p[2] - z).powi(2);
                a * (-d2 / 0.02).exp()
            })
            .sum();
        (v * mask[[i, j, k]] as f64) as f32
    })
}

/// Test inputs of a task: `(measurement NIfTI, mask NIfTI)` bytes. Field tasks get the
/// local field (ppm) of [`chi_phantom`] simulated along z; SR tasks get 2 mm inputs on
/// a 12³ grid.
pub fn inputs(task: v1::Task) -> (Vec<u8>, Vec<u8>) {
    let sr = matches!(
        task,
        v1::Task::Sr | v1::Task::SrDipinv | v1::Task::SrDipinvPhysics
    );
    let (n, vox) = if sr { (N / 2, 2.0) } else { (N, 1.0) };
    inputs_sized(task, n, vox)
}

/// [`inputs`] on an n³ grid of `vox` mm voxels: the low-resolution χ itself for `sr`,
/// else the masked local field of [`chi_phantom`] along z.
pub fn inputs_sized(task: v1::Task, n: usize, vox: f64) -> (Vec<u8>, Vec<u8>) {
    let chi = Volume::new(chi_phantom(n), [vox; 3]);
    let mask = Volume::new(ball(n), [vox; 3]);
    let measurement = if task == v1::Task::Sr {
        chi
    } else {
        let b0 = B0Direction::new([0.0, 0.0, 1.0]).unwrap();
        let f = dmqsm_common::simulate::forward_field(&chi, b0).unwrap();
        let data = &f.data * &mask.data;
        f.like(data)
    };
    (
        write_nifti_bytes(&measurement, true).unwrap(),
        write_nifti_bytes(&mask, true).unwrap(),
    )
}

/// Job settings for the tests: `steps` DDIM steps, overlap 8, seed 7, ξ 1 for DPS.
pub fn settings(task: v1::Task, guidance: v1::Guidance, steps: u32) -> v1::JobSettings {
    v1::JobSettings {
        task: task as i32,
        steps: Some(steps),
        eta: 0.5,
        // DPS at the default ξ·1000/N (125–500 at 4 steps) drives these small inputs to
        // residuals 100–250× a zero map's, which jobs now refuse as divergence; ξ = 1 keeps
        // the runs bounded (prox keeps its default weight: unset).
        xi: if guidance == v1::Guidance::Prox {
            None
        } else {
            Some(1.0)
        },
        guidance: guidance as i32,
        overlap: Some(8),
        seed: 7,
        samples: Some(1),
        ..Default::default()
    }
}

/// A submission uploading `inputs(task)`.
pub fn request(settings: v1::JobSettings, label: &str) -> v1::SubmitJobRequest {
    let task = v1::Task::try_from(settings.task).unwrap();
    let (m, k) = inputs(task);
    v1::SubmitJobRequest {
        measurement: Some(v1::VolumeInput {
            source: Some(v1::volume_input::Source::Nifti(m.into())),
        }),
        mask: Some(v1::VolumeInput {
            source: Some(v1::volume_input::Source::Nifti(k.into())),
        }),
        settings: Some(settings),
        label: label.to_string(),
    }
}

/// The in-process reference for a submission: the same problem, the same sampler
/// settings and batch size, run by `dmqsm_common::driver` with `model` directly. Returns
/// `(χ, std)` (std for samples > 1).
pub fn reference(
    model: &GaussianPriorModel,
    req: &v1::SubmitJobRequest,
    batch_size: usize,
) -> (Array3<f32>, Option<Array3<f32>>) {
    let spec = JobSpec::from_proto(req.settings.as_ref().unwrap(), batch_size).unwrap();
    let bytes = |i: &Option<v1::VolumeInput>| match i.as_ref().and_then(|i| i.source.clone()) {
        Some(v1::volume_input::Source::Nifti(b)) => Some(b.to_vec()),
        _ => None,
    };
    let m = bytes(&req.measurement).unwrap();
    let k = bytes(&req.mask);
    let problem = Arc::new(
        dmqsm_coordinator::problem::build_problem(&spec, model.spec(), &m, k.as_deref()).unwrap(),
    );
    let s = dmqsm_coordinator::runner::sampler_settings(&spec, 0);
    let bs = spec.batch_size as usize;
    if spec.samples > 1 {
        let (_, summary) =
            dmqsm_common::driver::sample_posterior(model, problem, &s, spec.samples as usize, bs)
                .unwrap();
        (summary.mean.data, Some(summary.std.data))
    } else {
        let r = dmqsm_common::driver::sample(model, problem, &s, bs).unwrap();
        (r.chi.data, None)
    }
}

/// Submits, waits for the end, and returns the final status.
pub async fn run_job(c: &mut Client, req: v1::SubmitJobRequest) -> v1::JobStatus {
    let id = c.submit_job(req).await.unwrap().into_inner().job_id;
    client::wait(c, &id, |_| {}).await.unwrap()
}

/// Fetches a finished job's files and decodes `chi.nii.gz` (and `std.nii.gz`).
pub async fn fetch_chi(
    c: &mut Client,
    job_id: &str,
) -> (Array3<f32>, Option<Array3<f32>>, serde_json::Value) {
    let files = client::fetch(c, job_id).await.unwrap();
    let get = |n: &str| files.iter().find(|f| f.0 == n).map(|f| f.1.clone());
    let chi = read_nifti_bytes(&get("chi.nii.gz").expect("chi.nii.gz")).unwrap();
    let std = get("std.nii.gz").map(|b| read_nifti_bytes(&b).unwrap().data);
    let report: serde_json::Value =
        serde_json::from_slice(&get("report.json").expect("report.json")).unwrap();
    (chi.data, std, report)
}

/// Asserts two arrays are bitwise identical, naming the first differing voxel.
pub fn assert_bitwise(a: &Array3<f32>, b: &Array3<f32>, what: &str) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes differ");
    if let Some((i, (x, y))) = a
        .iter()
        .zip(b.iter())
        .enumerate()
        .find(|(_, (x, y))| x.to_bits() != y.to_bits())
    {
        panic!("{what}: first difference at flat index {i}: {x} vs {y}");
    }
}

/// Waits until the job has finished at least `step` steps (or ends).
pub async fn wait_for_step(c: &mut Client, job_id: &str, step: u32) {
    for _ in 0..600 {
        let s = c
            .get_job(v1::GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        if s.step >= step || client::is_terminal(s.state) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {job_id} did not reach step {step}");
}

/// Builds the `dmqsm` and `dmqsm-worker` binaries (a no-op when they are fresh) and
/// returns their paths.
pub fn binaries() -> (std::path::PathBuf, std::path::PathBuf) {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let out = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "-p",
            "dmqsm-coordinator",
            "-p",
            "dmqsm-worker",
            "--bins",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("running cargo build");
    assert!(out.status.success(), "cargo build of the binaries failed");
    let mut found = (None, None);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        match name {
            "dmqsm" => found.0 = Some(PathBuf::from(exe)),
            "dmqsm-worker" => found.1 = Some(PathBuf::from(exe)),
            _ => {}
        }
    }
    (
        found.0.expect("cargo built no dmqsm"),
        found.1.expect("cargo built no dmqsm-worker"),
    )
}

/// Tokens of the secured test cluster (each ≥ 16 characters, as the table requires).
pub mod tokens {
    /// `admin ops`.
    pub const ADMIN: &str = "admin-0123456789abcdef";
    /// `user alice`.
    pub const ALICE: &str = "alice-0123456789abcdef";
    /// `user bob`.
    pub const BOB: &str = "bob-0123456789abcdef00";
    /// `worker pool`: the honest workers.
    pub const WORKER: &str = "worker-0123456789abcdef";
    /// `worker rogue`: a second, valid worker identity.
    pub const ROGUE: &str = "rogue-0123456789abcdef";

    /// The coordinator's token table listing all of them.
    pub fn table_text() -> String {
        format!(
            "# test tokens\nadmin ops {ADMIN}\nuser alice {ALICE}\nuser bob {BOB}\n\
             worker pool {WORKER}\nworker rogue {ROGUE}\n"
        )
    }

    /// The table, parsed.
    pub fn table() -> dmqsm_proto::auth::TokenTable {
        dmqsm_proto::auth::TokenTable::parse(&table_text(), "test tokens").expect("valid table")
    }
}

/// A private CA and certificates for 127.0.0.1 / localhost, written as PEM files into a
/// temp dir: one server certificate (coordinator and workers share it) and one client
/// certificate (mTLS), both signed by the CA.
pub struct TestPki {
    /// Holds the files.
    pub dir: tempfile::TempDir,
    /// CA certificate.
    pub ca: std::path::PathBuf,
    /// Server certificate (SANs 127.0.0.1, localhost).
    pub cert: std::path::PathBuf,
    /// Its key.
    pub key: std::path::PathBuf,
    /// Client certificate (mTLS).
    pub client_cert: std::path::PathBuf,
    /// Its key.
    pub client_key: std::path::PathBuf,
    /// Token table file ([`tokens::table_text`]).
    pub tokens: std::path::PathBuf,
}

impl TestPki {
    /// Generates the CA and the certificates (rcgen, ECDSA P-256).
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "dmqsm test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf = |cn: &str| {
            let mut p =
                CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                    .unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (cert, key) = leaf("dmqsm test server");
        let (ccert, ckey) = leaf("dmqsm test client");
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        Self {
            ca: write("ca.pem", &ca.pem()),
            cert: write("server.pem", &cert),
            key: write("server.key", &key),
            client_cert: write("client.pem", &ccert),
            client_key: write("client.key", &ckey),
            tokens: write("tokens", &tokens::table_text()),
            dir,
        }
    }

    /// TLS of a server that requires client certificates from this CA (mTLS).
    pub fn server_mtls(&self) -> dmqsm_proto::transport::ServerTls {
        dmqsm_proto::transport::ServerTls {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: Some(self.ca.clone()),
        }
    }

    /// TLS of a server without client certificates.
    pub fn server_tls(&self) -> dmqsm_proto::transport::ServerTls {
        dmqsm_proto::transport::ServerTls {
            client_ca: None,
            ..self.server_mtls()
        }
    }

    /// A client trusting the CA and presenting the client certificate.
    pub fn client_tls(&self) -> dmqsm_proto::transport::ClientTls {
        dmqsm_proto::transport::ClientTls {
            ca: Some(self.ca.clone()),
            cert: Some(self.client_cert.clone()),
            key: Some(self.client_key.clone()),
            domain: None,
        }
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// A worker behind TLS with mTLS (only the coordinator's client certificate gets in)
/// that requires `token` of every caller, registering with `coordinator` if given.
pub async fn secure_worker(
    pki: &TestPki,
    model: ServedModel,
    name: &str,
    token: &str,
    coordinator: Option<&str>,
) -> TestWorker {
    let (tls, client_tls, token) = (pki.server_mtls(), pki.client_tls(), token.to_string());
    TestWorker::start_configured(model, name, coordinator, move |c| {
        c.tls = Some(tls);
        c.token = Some(token.clone());
        let mut reg = dmqsm_worker::registration::RegistrationConfig::new("", "");
        reg.tls = client_tls;
        reg.token = Some(token);
        c.registration = Some(reg);
    })
    .await
}

impl Cluster {
    /// A coordinator with authentication ([`tokens::table`]) and TLS, dialling its
    /// `workers` (started by [`secure_worker`] with [`tokens::WORKER`]) over mTLS.
    pub async fn start_secure(
        pki: &TestPki,
        workers: Vec<ServedModel>,
        tune: impl FnOnce(&mut CoordinatorConfig),
    ) -> Self {
        init_logs();
        let mut ws = Vec::new();
        for (i, m) in workers.into_iter().enumerate() {
            ws.push(secure_worker(pki, m, &format!("w{i}"), tokens::WORKER, None).await);
        }
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        config.security = dmqsm_coordinator::config::SecurityConfig {
            auth: dmqsm_proto::auth::Authenticator::new(Some(tokens::table())),
            tls: Some(pki.server_tls()),
            worker_tls: pki.client_tls(),
            static_worker_token: Some(tokens::WORKER.to_string()),
            worker_addresses: Default::default(),
        };
        tune(&mut config);
        Self::serve(config, ws, dir).await
    }

    /// A client of this coordinator presenting `token` (and trusting `pki`'s CA for
    /// `https://`).
    pub async fn client_as(&self, pki: &TestPki, token: Option<&str>) -> Client {
        client::connect_with(
            &self.url,
            &client::ClientOptions {
                token: token.map(str::to_string),
                tls: pki.client_tls(),
            },
        )
        .await
        .unwrap()
    }
}

/// A worker's model that answers wrongly: ε × `scale` of the wrapped model (a rogue or
/// broken worker with a valid token). It reports the wrapped model's spec, so it looks
/// like an honest worker of the same class.
pub struct ScaledModel {
    /// The honest model.
    pub inner: GaussianPriorModel,
    /// Factor applied to every ε and Jᵀv.
    pub scale: f32,
}

impl ScoreModel for ScaledModel {
    fn spec(&self) -> &dmqsm_common::diffusion::model::ModelSpec {
        self.inner.spec()
    }

    fn eps(
        &self,
        patches: ndarray::ArrayView4<'_, f32>,
        t: &[f32],
    ) -> dmqsm_common::Result<ndarray::Array4<f32>> {
        Ok(self.inner.eps(patches, t)? * self.scale)
    }

    fn vjp(
        &self,
        patches: ndarray::ArrayView4<'_, f32>,
        t: &[f32],
        cotangent: ndarray::ArrayView4<'_, f32>,
    ) -> dmqsm_common::Result<ndarray::Array4<f32>> {
        Ok(self.inner.vjp(patches, t, cotangent)? * self.scale)
    }
}

/// A served model that answers ε × `scale` but reports the same device, micro-batch and
/// precision as [`served`] with zero latency.
pub fn rogue(model: &GaussianPriorModel, scale: f32) -> ServedModel {
    ServedModel::new(
        Arc::new(ScaledModel {
            inner: model.clone(),
            scale,
        }),
        "cpu (analytic)",
        1,
        "f32",
    )
}
