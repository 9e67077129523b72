//! `dmqsm demo`: phantom → simulated local field → reconstructions → NIfTI, PNG and
//! metrics, in one command.

use super::{metrics_table, write_json, write_volume};
use anyhow::{Context, Result};
use clap::Args;
use dmqsm_common::geometry::B0Direction;
use dmqsm_common::inversion::{l2, tkd, tv};
use dmqsm_common::metrics::{self, Metrics};
use dmqsm_common::nifti_io::read_nifti;
use dmqsm_common::phantom::{self, PhantomConfig};
use dmqsm_common::{Volume, preview, simulate};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// The demo's phantom matrix (1 mm voxels); `dmqsm benchmark quality` scores the same.
pub const DEMO_SHAPE: [usize; 3] = [96, 112, 96];
/// The demo's phantom seed (held out: training uses seeds < 1000).
pub const DEMO_SEED: u64 = 1001;
/// The demo's diffusion steps: `dmqsm run`'s default.
pub const DEMO_STEPS: u32 = crate::cli::DEFAULT_STEPS;
/// The demo's warm-start timestep: `dmqsm run`'s default for its steps (TV with the
/// L-curve α, noised to t₀ = 50).
pub const DEMO_START_TIMESTEP: u32 = crate::cli::DEFAULT_START_TIMESTEP;
/// The demo's DDIM η (1: ancestral, as DPS and the benchmark; η = 0 drifted badly with
/// the bundled model).
pub const DEMO_ETA: f64 = 1.0;

/// The demo's phantom, noise-free or at `snr`, and its masked local field (ppm) for B0
/// along z: the one definition shared by `dmqsm demo` and the benchmark's demo rows.
/// Anatomy at true size (as the bundled model's training phantoms), so a matrix smaller
/// than the head shows its centre.
pub fn demo_subject(
    shape: [usize; 3],
    voxel: [f64; 3],
    seed: u64,
    snr: Option<f64>,
) -> Result<(phantom::Phantom, Volume)> {
    let config = PhantomConfig {
        head_scale: Some(1.0),
        ..PhantomConfig::new(shape, voxel, seed)
    };
    let p = phantom::generate(&config).context("generating the phantom")?;
    let mut field =
        simulate::forward_field(&p.chi, B0Direction::AXIAL).context("simulating the field")?;
    if let Some(snr) = snr {
        field = simulate::add_noise(&field, Some(&p.mask.data), snr, seed)?.0;
    }
    field.data.zip_mut_with(&p.mask.data, |f, m| *f *= *m);
    Ok((p, field))
}

/// The demo's non-learning baselines, in order: TKD (δ = 0.1), closed-form L2
/// (λ = 0.1) and weighted TV-ADMM with α at the L-curve corner (the mask as data weight)
/// of `field`, masked with `mask` (shared with the benchmark's demo rows).
pub const DEMO_BASELINES: [&str; 3] = ["TKD", "L2", "TV"];

/// Baseline `name` of [`DEMO_BASELINES`] for `field` (ppm, B0 along z), masked.
pub fn demo_baseline(name: &str, field: &Volume, mask: &Volume) -> Result<Volume> {
    let b0 = B0Direction::AXIAL;
    let mut chi = match name {
        "TKD" => tkd::tkd(field, b0, 0.1)?,
        "L2" => l2::l2(field, b0, 0.1)?,
        "TV" => {
            let curve = tv::tv_lcurve_default(field, Some(mask.data.view()), b0)?;
            curve.best().chi.clone()
        }
        other => anyhow::bail!("unknown demo baseline {other:?}"),
    };
    chi.data.zip_mut_with(&mask.data, |c, m| *c *= *m);
    Ok(chi)
}

/// Arguments of `dmqsm demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Output directory.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    /// Phantom matrix size nx,ny,nz (1 mm voxels by default).
    #[arg(long, value_parser = super::parse_usize3, default_value = "96,112,96")]
    pub shape: [usize; 3],
    /// Voxel size in mm.
    #[arg(long, value_parser = super::parse_f64x3, default_value = "1,1,1")]
    pub voxel: [f64; 3],
    /// Phantom seed (seeds ≥ 1000 are never used for training).
    #[arg(long, default_value_t = DEMO_SEED)]
    pub seed: u64,
    /// SNR of the simulated field (omit for a noise-free field).
    #[arg(long)]
    pub snr: Option<f64>,
    /// Score model for the DM-QSM reconstruction (TorchScript with its card beside it).
    #[arg(long, default_value = "models/dmqsm-phantom-s/model.pt")]
    pub model: PathBuf,
    /// Local workers of the embedded coordinator.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// libtorch threads per worker.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// DM-QSM task: `dipinv-physics` (A = mask ∘ dipole on the field) or `dipinv`
    /// (DM-QSM's formulation: A = I on the TKD estimate).
    #[arg(long, default_value = "dipinv-physics")]
    pub task: String,
    /// Diffusion (DDIM) steps.
    #[arg(long, default_value_t = DEMO_STEPS)]
    pub steps: u32,
    /// DDIM η (0 deterministic, 1 ancestral).
    #[arg(long, default_value_t = DEMO_ETA)]
    pub eta: f64,
    /// Guidance: prox (DDS data consistency), approx or exact (DPS).
    #[arg(long, default_value = "prox")]
    pub guidance: String,
    /// ξ (the DPS step or the prox data weight); default: the sampler's default for the
    /// task, guidance and steps (`dmqsm_common::diffusion::sampler::default_xi`).
    #[arg(long)]
    pub xi: Option<f64>,
    /// Warm-start timestep (`none`: from pure noise), as `dmqsm run --start-timestep`.
    #[arg(long, default_value_t = DEMO_START_TIMESTEP.to_string())]
    pub start_timestep: String,
    /// Noise seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub sample_seed: u64,
    /// Skip the DM-QSM reconstruction (physics baselines only).
    #[arg(long)]
    pub no_dmqsm: bool,
}

/// The ξ the demo uses (see [`DemoArgs::xi`]).
fn demo_xi(a: &DemoArgs) -> Result<f64> {
    use clap::ValueEnum;
    use dmqsm_common::diffusion::sampler::{Guidance, default_xi};
    use dmqsm_common::tasks::{ConsistencyTv, Task};
    let task = Task::from_str(&a.task, false).map_err(|e| anyhow::anyhow!("--task: {e}"))?;
    let guidance =
        Guidance::from_str(&a.guidance, false).map_err(|e| anyhow::anyhow!("--guidance: {e}"))?;
    // `dmqsm run` takes its default TV step, so the demo's ξ is that step's default.
    let tv_step = ConsistencyTv::default_for(task, guidance) != ConsistencyTv::None;
    Ok(a.xi.unwrap_or_else(|| default_xi(task, guidance, a.steps as usize, tv_step)))
}

/// Runs DM-QSM dipole inversion of `field` through the embedded coordinator and local
/// workers (`dmqsm run`, the same code path as a cluster) and reads back χ.
fn run_dmqsm(a: &DemoArgs, field: &std::path::Path, mask: &std::path::Path) -> Result<Volume> {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        run: crate::cli::server::RunArgs,
    }
    let data_dir = a.out.join("dmqsm-data");
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)
            .with_context(|| format!("clearing {}", data_dir.display()))?;
    }
    let result_dir = a.out.join("dmqsm");
    let argv: Vec<String> = vec![
        "run".into(),
        field.display().to_string(),
        "--mask".into(),
        mask.display().to_string(),
        "--task".into(),
        a.task.clone(),
        "--steps".into(),
        a.steps.to_string(),
        "--eta".into(),
        a.eta.to_string(),
        "--guidance".into(),
        a.guidance.clone(),
        "--seed".into(),
        a.sample_seed.to_string(),
        "--start-timestep".into(),
        a.start_timestep.clone(),
        "--xi".into(),
        demo_xi(a)?.to_string(),
        "--model".into(),
        a.model.display().to_string(),
        "--workers".into(),
        a.workers.to_string(),
        "--threads".into(),
        a.threads.to_string(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--out".into(),
        result_dir.display().to_string(),
        "--label".into(),
        "demo".into(),
    ];
    let wrap = Wrap::try_parse_from(argv).context("building the embedded run")?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(crate::cli::server::run(wrap.run))?;
    let _ = std::fs::remove_dir_all(&data_dir);
    read_nifti(result_dir.join("chi.nii.gz")).context("reading the DM-QSM result")
}

/// One reconstruction of the demo and its score.
struct Recon {
    name: &'static str,
    chi: Volume,
    metrics: Metrics,
    seconds: f64,
}

/// Runs the demo.
pub fn run(a: DemoArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let t0 = Instant::now();
    let (p, field) = demo_subject(a.shape, a.voxel, a.seed, a.snr)?;
    eprintln!(
        "phantom {:?} at {:?} mm (seed {}) in {:.1} s",
        a.shape,
        a.voxel,
        a.seed,
        t0.elapsed().as_secs_f64()
    );
    let b0 = B0Direction::AXIAL;
    write_volume(&a.out.join("chi_truth.nii.gz"), &p.chi)?;
    write_volume(&a.out.join("mask.nii.gz"), &p.mask)?;
    write_volume(&a.out.join("field.nii.gz"), &field)?;

    let regions = metrics::deep_grey_matter_regions();
    let score =
        |chi: &Volume| metrics::evaluate_with_labels(chi, &p.chi, &p.mask, &p.labels, &regions);
    let mut recons = Vec::new();
    for name in DEMO_BASELINES {
        let t = Instant::now();
        let chi = demo_baseline(name, &field, &p.mask)?;
        let seconds = t.elapsed().as_secs_f64();
        let metrics = score(&chi)?;
        recons.push(Recon {
            name,
            chi,
            metrics,
            seconds,
        });
    }

    if a.no_dmqsm {
        eprintln!("skipping DM-QSM (--no-dmqsm)");
    } else if !a.model.exists() {
        eprintln!(
            "no score model at {}: skipping DM-QSM (train one with `dmqsm-worker train`)",
            a.model.display()
        );
    } else {
        eprintln!(
            "DM-QSM {}: {} steps, {} guidance, xi {}, {} local workers, model {}",
            a.task,
            a.steps,
            a.guidance,
            demo_xi(&a)?,
            a.workers,
            a.model.display()
        );
        let t = Instant::now();
        let chi = run_dmqsm(&a, &a.out.join("field.nii.gz"), &a.out.join("mask.nii.gz"))?;
        let seconds = t.elapsed().as_secs_f64();
        let metrics = score(&chi)?;
        recons.push(Recon {
            name: "DM-QSM",
            chi,
            metrics,
            seconds,
        });
    }

    for r in &recons {
        write_volume(
            &a.out.join(format!(
                "chi_{}.nii.gz",
                r.name.to_lowercase().replace('-', "")
            )),
            &r.chi,
        )?;
    }
    let rows: Vec<(String, &Metrics)> = recons
        .iter()
        .map(|r| (r.name.to_string(), &r.metrics))
        .collect();
    let table = metrics_table(&rows);
    std::fs::write(a.out.join("metrics.md"), &table)?;
    write_json(
        &a.out.join("metrics.json"),
        &json!({
            "phantom": {"shape": a.shape, "voxel_mm": a.voxel, "seed": a.seed},
            "snr": a.snr,
            "b0_dir": b0.as_array(),
            "dmqsm": if recons.len() > DEMO_BASELINES.len() { json!({
                "model": a.model, "steps": a.steps, "eta": a.eta, "guidance": a.guidance, "xi": demo_xi(&a)?,
                "start_timestep": a.start_timestep,
                "workers": a.workers, "sample_seed": a.sample_seed, "task": a.task,
            }) } else { serde_json::Value::Null },
            "reconstructions": recons.iter().map(|r| json!({
                "name": r.name, "seconds": r.seconds, "metrics": r.metrics,
            })).collect::<Vec<_>>(),
        }),
    )?;
    let mut panels = vec![preview::Panel {
        volume: &p.chi,
        caption: "truth".into(),
        window: preview::Window::CHI,
    }];
    for r in &recons {
        panels.push(preview::Panel {
            volume: &r.chi,
            caption: r.name.into(),
            window: preview::Window::CHI,
        });
    }
    // The error of the last (best-informed) reconstruction, on a symmetric window.
    let last = recons
        .last()
        .map(|r| (r.name, p.chi.like(&r.chi.data - &p.chi.data)));
    if let Some((name, err)) = &last {
        panels.push(preview::Panel {
            volume: err,
            caption: format!("{name} - truth"),
            window: preview::Window::symmetric(0.1)?,
        });
    }
    let opts = preview::RowOptions {
        views: vec![preview::View::Axial, preview::View::Coronal],
        title: Some("dmqsm demo: chi (ppm)".into()),
        ..Default::default()
    };
    let png = preview::panel_row_png(&panels, &opts)?;
    std::fs::write(a.out.join("demo.png"), png)?;
    print!("{table}");
    println!(
        "wrote {} (total {:.1} s)",
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
