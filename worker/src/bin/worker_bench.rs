//! Benchmark: `Denoise` over loopback gRPC against calling the same model in process.
//!
//! ```text
//! cargo run --release -p dmqsm-worker --bin worker-bench [-- --patch-size 48 --seconds 3]
//! ```
//!
//! For two models — the default U-Net (widths 16/32/64, random weights; libtorch-bound)
//! and the analytic Gaussian-prior model (costs almost nothing, so the numbers are the
//! transport's) — and batch sizes 1, 4 and 16 it reports patches/s and MB/s in process,
//! over gRPC with f32 tensors and over gRPC with bf16 tensors both ways, the gRPC/in-process
//! ratio, the bytes per patch on the wire (request + response message bodies), and the
//! accuracy impact of bf16 transport on ε (max and RMS error against in-process f32, and
//! RMS error relative to the RMS of ε). MB/s counts request + response payload bytes
//! (in process: the f32 bytes the same call would have moved). Single client,
//! sequential calls, queue delay 0.

use clap::Parser;
use dmqsm_common::diffusion::analytic::GaussianPriorModel;
use dmqsm_common::diffusion::model::ScoreModel;
use dmqsm_common::diffusion::noise::fill_standard_normal;
use dmqsm_common::diffusion::schedule::ScheduleConfig;
use dmqsm_proto::DEFAULT_MAX_MESSAGE_BYTES;
use dmqsm_proto::tensor::{decode, encode};
use dmqsm_proto::v1::{DenoiseRequest, Dtype};
use dmqsm_worker::batching::BatchConfig;
use dmqsm_worker::card::ModelCard;
use dmqsm_worker::unet::seeded;
use dmqsm_worker::{
    DeviceSpec, EvalOptions, ServedModel, ServerConfig, TorchModel, UNetConfig, connect,
    spawn_local_worker,
};
use ndarray::Array4;
use prost::Message;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Denoise over loopback gRPC vs in process")]
struct Args {
    /// Patch edge P.
    #[arg(long, default_value_t = 48)]
    patch_size: usize,
    /// U-Net widths.
    #[arg(long, value_delimiter = ',', default_values_t = [16usize, 32, 64])]
    widths: Vec<usize>,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16])]
    batches: Vec<usize>,
    /// Minimum seconds per mode and batch size (at least 2 timed rounds after a warm-up).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<usize>,
    /// Fixed micro-batch of the U-Net's evaluation.
    #[arg(long, default_value_t = 1)]
    eval_batch: usize,
    /// Skip the U-Net (transport only).
    #[arg(long)]
    synthetic_only: bool,
}

/// Accumulated time, calls and bytes of one mode.
#[derive(Default, Clone, Copy)]
struct Tally {
    seconds: f64,
    calls: usize,
    bytes: usize,
}

impl Tally {
    fn add(&mut self, started: Instant, bytes: usize) {
        self.seconds += started.elapsed().as_secs_f64();
        self.calls += 1;
        self.bytes += bytes;
    }
    fn per_second(&self) -> (f64, f64) {
        let s = self.seconds.max(1e-12);
        (self.calls as f64 / s, self.bytes as f64 / s)
    }
}

struct Row {
    model: String,
    batch: usize,
    in_process: f64,
    in_process_mbs: f64,
    grpc_f32: f64,
    grpc_f32_mbs: f64,
    grpc_bf16: f64,
    grpc_bf16_mbs: f64,
    bytes_f32: f64,
    bytes_bf16: f64,
    bf16_max_err: f64,
    bf16_rms_err: f64,
    bf16_rel_rms: f64,
}

fn bench_model(
    args: &Args,
    rt: &tokio::runtime::Runtime,
    name: &str,
    model: Arc<dyn ScoreModel + Send + Sync>,
    eval_batch: usize,
) -> anyhow::Result<Vec<Row>> {
    let p = model.spec().patch_size;
    let vox = p * p * p;
    let max_batch = args.batches.iter().copied().max().unwrap_or(16);
    let config = ServerConfig {
        batch: BatchConfig {
            max_batch,
            max_queue_delay: Duration::ZERO,
        },
        threads: args.threads,
        ..ServerConfig::default()
    };
    let served = ServedModel::new(model.clone(), "cpu", eval_batch, "f32");
    let worker = rt.block_on(spawn_local_worker(served, config))?;
    let mut client = rt.block_on(connect(&worker.url(), DEFAULT_MAX_MESSAGE_BYTES, None))?;
    let mut rows = Vec::new();
    for &b in &args.batches {
        let mut xv = vec![0f32; b * vox];
        fill_standard_normal(1, b as u64, 0, &mut xv);
        let x = Array4::from_shape_vec((b, p, p, p), xv.clone())?;
        let t: Vec<f32> = (0..b).map(|i| ((i * 137 + 500) % 1000) as f32).collect();
        dmqsm_worker::device::configure_threads(args.threads);
        let reference = model.eps(x.view(), &t)?;
        let f32_bytes = 2 * b * vox * 4;
        let request = |dtype: Dtype| DenoiseRequest {
            model_hash: String::new(),
            patches: Some(encode(&xv, &[b, p, p, p], dtype)),
            timesteps: t.clone(),
            response_dtype: dtype as i32,
            answer_to: None,
        };
        let requests = [request(Dtype::F32), request(Dtype::Bf16)];
        // Rounds alternate the three modes (in process, gRPC f32, gRPC bf16) so that
        // load changes on a shared machine hit all of them alike; round 0 is a warm-up.
        let mut tallies = [Tally::default(); 3];
        let mut wire = [0usize; 2];
        let mut answers: [Vec<f32>; 2] = [Vec::new(), Vec::new()];
        let mut round = 0usize;
        let wall = Instant::now();
        while round < 3 || wall.elapsed().as_secs_f64() < 3.0 * args.seconds {
            let started = Instant::now();
            model.eps(x.view(), &t)?;
            if round > 0 {
                tallies[0].add(started, f32_bytes);
            }
            for (m, req) in requests.iter().enumerate() {
                let started = Instant::now();
                let resp = rt
                    .block_on(client.denoise(req.clone()))
                    .map_err(|s| anyhow::anyhow!("Denoise failed: {}", s.message()))?
                    .into_inner();
                wire[m] = req.encoded_len() + resp.encoded_len();
                if round > 0 {
                    tallies[m + 1].add(started, wire[m]);
                }
                if let Some(eps) = resp.eps.as_ref() {
                    answers[m] = decode(eps)?.0;
                }
            }
            round += 1;
        }
        let (ip_calls, ip_bytes) = tallies[0].per_second();
        let (g32, g32_bytes) = tallies[1].per_second();
        let (g16, g16_bytes) = tallies[2].per_second();
        let (wire32, wire16) = (wire[0] as f64 / b as f64, wire[1] as f64 / b as f64);
        let [got32, got16] = answers;
        let exact = reference.as_standard_layout();
        let exact = exact.as_slice().unwrap_or(&[]);
        if got32 != exact {
            anyhow::bail!("{name}: gRPC f32 ε differs from in-process ε");
        }
        let mut max_err = 0f64;
        let mut sq = 0f64;
        let mut ref_sq = 0f64;
        for (a, r) in got16.iter().zip(exact) {
            let e = f64::from(a - r).abs();
            max_err = max_err.max(e);
            sq += e * e;
            ref_sq += f64::from(*r) * f64::from(*r);
        }
        let n = exact.len().max(1) as f64;
        rows.push(Row {
            model: name.to_string(),
            batch: b,
            in_process: ip_calls * b as f64,
            in_process_mbs: ip_bytes / 1e6,
            grpc_f32: g32 * b as f64,
            grpc_f32_mbs: g32_bytes / 1e6,
            grpc_bf16: g16 * b as f64,
            grpc_bf16_mbs: g16_bytes / 1e6,
            bytes_f32: wire32,
            bytes_bf16: wire16,
            bf16_max_err: max_err,
            bf16_rms_err: (sq / n).sqrt(),
            bf16_rel_rms: (sq / ref_sq.max(1e-30)).sqrt(),
        });
    }
    rt.block_on(worker.shutdown())?;
    Ok(rows)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let p = args.patch_size;
    let mut rows = Vec::new();
    if !args.synthetic_only {
        let config = UNetConfig {
            widths: args.widths.clone(),
            ..UNetConfig::default()
        };
        config.validate(p)?;
        let (mut vs, net) = seeded(&config, tch::Device::Cpu, 0);
        let card = ModelCard::for_unet(
            "bench-unet",
            &config,
            p,
            ScheduleConfig::default(),
            5.0,
            0,
            "",
        );
        let options = EvalOptions {
            threads: args.threads,
            eval_batch: args.eval_batch,
            ..EvalOptions::for_device(DeviceSpec::Cpu)
        };
        let model = TorchModel::from_unet(&mut vs, &net, card, DeviceSpec::Cpu, options)?;
        let name = format!(
            "U-Net {:?} ({} params, eval batch {})",
            args.widths,
            model.card().parameter_count,
            args.eval_batch
        );
        rows.extend(bench_model(
            &args,
            &rt,
            &name,
            Arc::new(model),
            args.eval_batch,
        )?);
    }
    let gauss = GaussianPriorModel::new(0.0, 0.5, p, 5.0, ScheduleConfig::default())?;
    rows.extend(bench_model(
        &args,
        &rt,
        "analytic (transport only)",
        Arc::new(gauss),
        1,
    )?);

    println!(
        "Denoise, P = {p} ({} bytes per f32 patch), threads {:?} (libtorch reports {}), \
         single client, sequential calls, modes interleaved\n",
        p * p * p * 4,
        args.threads,
        tch::get_num_threads()
    );
    println!(
        "| model | B | in-process patches/s | gRPC f32 patches/s | ratio | gRPC bf16 patches/s | ratio | in-process MB/s | gRPC f32 MB/s | gRPC bf16 MB/s | wire bytes/patch f32 | wire bytes/patch bf16 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.3} | {:.2} | {:.3} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} |",
            r.model,
            r.batch,
            r.in_process,
            r.grpc_f32,
            r.grpc_f32 / r.in_process,
            r.grpc_bf16,
            r.grpc_bf16 / r.in_process,
            r.in_process_mbs,
            r.grpc_f32_mbs,
            r.grpc_bf16_mbs,
            r.bytes_f32,
            r.bytes_bf16
        );
    }
    println!("\nbf16 transport (patches and ε both rounded to bf16) vs in-process f32 ε:\n");
    println!("| model | B | max abs error | RMS error | RMS error / RMS ε |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3e} | {:.3e} | {:.3e} |",
            r.model, r.batch, r.bf16_max_err, r.bf16_rms_err, r.bf16_rel_rms
        );
    }
    Ok(())
}
