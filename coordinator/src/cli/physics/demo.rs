//! `dmqsm demo`: phantom → simulated local field → reconstructions → NIfTI, PNG and
//! metrics, in one command.

use super::{metrics_table, write_json, write_volume};
use anyhow::{Context, Result};
use clap::Args;
use dmqsm_common::geometry::B0Direction;
use dmqsm_common::inversion::{l2, tkd};
use dmqsm_common::metrics::{self, Metrics};
use dmqsm_common::phantom::{self, PhantomConfig};
use dmqsm_common::{Volume, preview, simulate};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

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
    #[arg(long, default_value_t = 1001)]
    pub seed: u64,
    /// SNR of the simulated field (omit for a noise-free field).
    #[arg(long)]
    pub snr: Option<f64>,
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
    let p = phantom::generate(&PhantomConfig::new(a.shape, a.voxel, a.seed))
        .context("generating the phantom")?;
    eprintln!(
        "phantom {:?} at {:?} mm (seed {}) in {:.1} s",
        a.shape,
        a.voxel,
        a.seed,
        t0.elapsed().as_secs_f64()
    );
    let b0 = B0Direction::new([0.0, 0.0, 1.0])?;
    let mut field = simulate::forward_field(&p.chi, b0).context("simulating the field")?;
    if let Some(snr) = a.snr {
        field = simulate::add_noise(&field, Some(&p.mask.data), snr, a.seed)?.0;
    }
    field.data.zip_mut_with(&p.mask.data, |f, m| *f *= *m);
    write_volume(&a.out.join("chi_truth.nii.gz"), &p.chi)?;
    write_volume(&a.out.join("mask.nii.gz"), &p.mask)?;
    write_volume(&a.out.join("field.nii.gz"), &field)?;

    let regions = metrics::deep_grey_matter_regions();
    let score =
        |chi: &Volume| metrics::evaluate_with_labels(chi, &p.chi, &p.mask, &p.labels, &regions);
    let mut recons = Vec::new();
    for name in ["TKD", "L2"] {
        let t = Instant::now();
        let mut chi = match name {
            "TKD" => tkd::tkd(&field, b0, 0.1)?,
            _ => l2::l2(&field, b0, 0.1)?,
        };
        chi.data.zip_mut_with(&p.mask.data, |c, m| *c *= *m);
        let seconds = t.elapsed().as_secs_f64();
        let metrics = score(&chi)?;
        recons.push(Recon {
            name,
            chi,
            metrics,
            seconds,
        });
    }

    for r in &recons {
        write_volume(
            &a.out.join(format!("chi_{}.nii.gz", r.name.to_lowercase())),
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
