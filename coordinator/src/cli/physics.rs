//! The physics subcommands of `dmqsm`: `phantom`, `simulate`, `invert` (alias `tkd`),
//! `eval`, `preview` and `demo`. Thin wrappers around `dmqsm_common`; each writes NIfTI plus a JSON sidecar
//! (units, B0, settings; metrics for `eval`).

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use dmqsm_common::geometry::B0Direction;
use dmqsm_common::inversion::{l2, tkd, tv};
use dmqsm_common::metrics::{self, Metrics};
use dmqsm_common::nifti_io::{read_nifti, write_nifti};
use dmqsm_common::phantom::{self, PhantomConfig};
use dmqsm_common::simulate;
use dmqsm_common::units::{FieldScale, FieldUnit};
use dmqsm_common::{Volume, preview};
use serde_json::json;
use std::path::{Path, PathBuf};

pub mod demo;

/// Physics and evaluation commands (no coordinator needed).
#[derive(Debug, Subcommand)]
pub enum PhysicsCommand {
    /// Generate a synthetic brain-like χ phantom (χ, brain mask, label map).
    Phantom(PhantomArgs),
    /// Simulate the local field of a χ map (dipole convolution, optional noise).
    Simulate(SimulateArgs),
    /// Classical dipole inversion: TKD (default), closed-form L2 or total variation (TV-ADMM,
    /// α from --alpha or the L-curve).
    #[command(alias = "tkd")]
    Invert(InvertArgs),
    /// Score a reconstruction against a truth inside a mask (QSM Challenge 2.0 metrics).
    Eval(EvalArgs),
    /// Write a PNG of three orthogonal slices with a colour bar in ppm.
    Preview(PreviewArgs),
    /// The end-to-end demo: phantom → field → reconstructions → NIfTI, PNG and metrics.
    Demo(demo::DemoArgs),
}

/// Runs one physics command.
pub fn run(cmd: PhysicsCommand) -> Result<()> {
    match cmd {
        PhysicsCommand::Phantom(a) => run_phantom(a),
        PhysicsCommand::Simulate(a) => run_simulate(a),
        PhysicsCommand::Invert(a) => run_invert(a),
        PhysicsCommand::Eval(a) => run_eval(a),
        PhysicsCommand::Preview(a) => run_preview(a),
        PhysicsCommand::Demo(a) => demo::run(a),
    }
}

/// Arguments of `dmqsm phantom`.
#[derive(Debug, Args)]
pub struct PhantomArgs {
    /// Matrix size nx,ny,nz.
    #[arg(long, value_parser = parse_usize3, default_value = "160,192,160")]
    pub shape: [usize; 3],
    /// Voxel size in mm (x,y,z).
    #[arg(long, value_parser = parse_f64x3, default_value = "1,1,1")]
    pub voxel: [f64; 3],
    /// Seed of every random choice; the same seed gives the same phantom bit for bit.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of random veins besides the sinuses.
    #[arg(long, default_value_t = 16)]
    pub veins: usize,
    /// Number of calcifications (χ < 0).
    #[arg(long, default_value_t = 0)]
    pub calcifications: usize,
    /// Number of haemorrhages (χ > 0).
    #[arg(long, default_value_t = 0)]
    pub haemorrhages: usize,
    /// Output directory: chi.nii.gz, mask.nii.gz, labels.nii.gz and phantom.json.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `dmqsm simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// χ map (ppm), NIfTI.
    #[arg(long)]
    pub chi: PathBuf,
    /// B0 direction in voxel axes (x,y,z); default: from the NIfTI affine.
    #[arg(long, value_parser = parse_f64x3)]
    pub b0_dir: Option<[f64; 3]>,
    /// Add Gaussian noise at this SNR (RMS field inside the mask / σ).
    #[arg(long)]
    pub snr: Option<f64>,
    /// Brain mask: defines the SNR region and masks the output field.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Noise seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output units of the field.
    #[arg(long, value_enum, default_value_t = UnitArg::Ppm)]
    pub units: UnitArg,
    /// B0 in T (for Hz and rad).
    #[arg(long, default_value_t = 3.0)]
    pub b0_tesla: f64,
    /// Echo time in s (for rad).
    #[arg(long)]
    pub te: Option<f64>,
    /// Output NIfTI (.nii or .nii.gz); a JSON sidecar is written beside it.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `dmqsm invert` (alias `tkd`).
#[derive(Debug, Args)]
pub struct InvertArgs {
    /// Local field, NIfTI.
    #[arg(long)]
    pub field: PathBuf,
    /// Inversion method.
    #[arg(long, value_enum, default_value_t = Method::Tkd)]
    pub method: Method,
    /// TKD threshold δ on |D| (DM-QSM uses 0.1).
    #[arg(long, default_value_t = 0.1)]
    pub threshold: f64,
    /// L2 regularisation weight λ.
    #[arg(long, default_value_t = 0.1)]
    pub lambda: f64,
    /// TV weight α (field in ppm); default: the corner of the L-curve over 10 values from
    /// 1e-5 to 1e-2 (no ground truth needed).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// TV iteration cap.
    #[arg(long, default_value_t = 300)]
    pub max_iterations: usize,
    /// TV stopping tolerance on the relative change of χ per iteration.
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f64,
    /// B0 direction in voxel axes; default: from the NIfTI affine.
    #[arg(long, value_parser = parse_f64x3)]
    pub b0_dir: Option<[f64; 3]>,
    /// Units of the input field.
    #[arg(long, value_enum, default_value_t = UnitArg::Ppm)]
    pub units: UnitArg,
    /// B0 in T (for Hz and rad input).
    #[arg(long, default_value_t = 3.0)]
    pub b0_tesla: f64,
    /// Echo time in s (for rad input).
    #[arg(long)]
    pub te: Option<f64>,
    /// Brain mask applied to the output χ (and TV's data weight).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Output χ map (ppm), NIfTI; a JSON sidecar is written beside it.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `dmqsm eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Reconstruction (ppm).
    #[arg(long)]
    pub recon: PathBuf,
    /// Ground truth (ppm).
    #[arg(long)]
    pub truth: PathBuf,
    /// Brain mask.
    #[arg(long)]
    pub mask: PathBuf,
    /// Label map (phantom labels) for the deep grey-matter linearity.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Write the metrics as JSON here (default: beside the reconstruction).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Arguments of `dmqsm preview`.
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// Volume to show (ppm).
    #[arg(long)]
    pub input: PathBuf,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// Display window in ppm (lo,hi).
    #[arg(long, value_parser = parse_f64x2, default_value = "-0.15,0.15")]
    pub window: [f64; 2],
    /// Title drawn above the slices (default: the file name).
    #[arg(long)]
    pub title: Option<String>,
}

/// Field units on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UnitArg {
    /// Parts per million of B0.
    Ppm,
    /// Hertz.
    Hz,
    /// Phase in radians at echo time TE.
    Rad,
}

impl From<UnitArg> for FieldUnit {
    fn from(u: UnitArg) -> Self {
        match u {
            UnitArg::Ppm => FieldUnit::Ppm,
            UnitArg::Hz => FieldUnit::Hz,
            UnitArg::Rad => FieldUnit::Rad,
        }
    }
}

/// Dipole inversion method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// Thresholded k-space division (sign-preserving).
    Tkd,
    /// Closed-form L2 with a gradient penalty (SEPIA).
    L2,
    /// Weighted total variation by ADMM (FANSI), the mask as the data weight.
    Tv,
}

fn run_phantom(a: PhantomArgs) -> Result<()> {
    let config = PhantomConfig {
        veins: a.veins,
        calcifications: a.calcifications,
        haemorrhages: a.haemorrhages,
        ..PhantomConfig::new(a.shape, a.voxel, a.seed)
    };
    let p = phantom::generate(&config).context("generating the phantom")?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    write_volume(&a.out.join("chi.nii.gz"), &p.chi)?;
    write_volume(&a.out.join("mask.nii.gz"), &p.mask)?;
    let labels = p.chi.like(p.labels.mapv(f32::from));
    write_volume(&a.out.join("labels.nii.gz"), &labels)?;
    let sidecar = json!({
        "kind": "phantom",
        "units": "ppm",
        "config": config,
        "scale": p.scale,
        "files": {"chi": "chi.nii.gz", "mask": "mask.nii.gz", "labels": "labels.nii.gz"},
    });
    write_json(&a.out.join("phantom.json"), &sidecar)?;
    println!("wrote phantom to {}", a.out.display());
    Ok(())
}

fn run_simulate(a: SimulateArgs) -> Result<()> {
    let chi = read_volume(&a.chi)?;
    let b0 = b0_direction(a.b0_dir, &chi)?;
    let mask = a.mask.as_deref().map(read_volume).transpose()?;
    if let Some(m) = &mask {
        same_grid(m, &chi, "mask", "chi")?;
    }
    let mut field = simulate::forward_field(&chi, b0).context("simulating the field")?;
    let mut sigma = None;
    if let Some(snr) = a.snr {
        let (noisy, s) = simulate::add_noise(&field, mask.as_ref().map(|m| &m.data), snr, a.seed)
            .context("adding noise")?;
        field = noisy;
        sigma = Some(s);
    }
    if let Some(m) = &mask {
        field.data.zip_mut_with(&m.data, |f, m| *f *= *m);
    }
    let units: FieldUnit = a.units.into();
    let scale = FieldScale::new(a.b0_tesla, a.te)?;
    let factor = scale.factor(FieldUnit::Ppm, units)? as f32;
    field.data.mapv_inplace(|v| v * factor);
    write_volume(&a.out, &field)?;
    write_json(
        &sidecar_path(&a.out),
        &json!({
            "kind": "local_field",
            "units": units.as_str(),
            "b0_dir": b0.as_array(),
            "b0_tesla": a.b0_tesla,
            "te_seconds": a.te,
            "snr": a.snr,
            "noise_sigma_ppm": sigma,
            "seed": a.seed,
            "source": a.chi,
            "dipole_convention": "D(k) = 1/3 - (k.b)^2/|k|^2, D(0) = 0; padded to 2N",
        }),
    )?;
    println!("wrote field ({}) to {}", units.as_str(), a.out.display());
    Ok(())
}

fn run_invert(a: InvertArgs) -> Result<()> {
    let mut field = read_volume(&a.field)?;
    let b0 = b0_direction(a.b0_dir, &field)?;
    let scale = FieldScale::new(a.b0_tesla, a.te)?;
    let factor = scale.factor(a.units.into(), FieldUnit::Ppm)? as f32;
    field.data.mapv_inplace(|v| v * factor);
    let mask = a
        .mask
        .as_ref()
        .map(|p| -> Result<Volume> {
            let m = read_volume(p)?;
            same_grid(&m, &field, "mask", "field")?;
            Ok(m)
        })
        .transpose()?;
    let (mut chi, method, param) = match a.method {
        Method::Tkd => (
            tkd::tkd(&field, b0, a.threshold).context("TKD")?,
            "tkd",
            json!({"threshold": a.threshold}),
        ),
        Method::L2 => (
            l2::l2(&field, b0, a.lambda).context("closed-form L2")?,
            "l2",
            json!({"lambda": a.lambda}),
        ),
        Method::Tv => {
            let params = tv::TvParams {
                max_iterations: a.max_iterations,
                tolerance: a.tolerance,
                ..tv::TvParams::default()
            };
            let weight = mask.as_ref().map(|m| m.data.view());
            let (chi, report, curve) = match a.alpha {
                Some(alpha) => {
                    let (chi, r) = tv::tv(&field, weight, b0, &tv::TvParams { alpha, ..params })
                        .context("TV")?;
                    (chi, r, None)
                }
                None => {
                    let c =
                        tv::tv_lcurve(&field, weight, b0, &tv::default_lcurve_alphas(), &params)
                            .context("TV L-curve")?;
                    let best = c.best();
                    let points: Vec<_> = c
                        .points
                        .iter()
                        .map(|p| json!({"alpha": p.report.alpha, "data_misfit": p.report.data_misfit, "total_variation": p.report.total_variation, "iterations": p.report.iterations}))
                        .collect();
                    (best.chi.clone(), best.report, Some(points))
                }
            };
            if !report.converged {
                tracing::warn!(
                    iterations = report.iterations,
                    change = report.relative_change,
                    "TV stopped at --max-iterations before reaching --tolerance"
                );
            }
            println!(
                "TV: α {:.3e}{}, {} iterations ({}), relative change {:.2e}",
                report.alpha,
                if curve.is_some() {
                    " (L-curve corner)"
                } else {
                    ""
                },
                report.iterations,
                if report.converged {
                    "converged"
                } else {
                    "iteration cap reached"
                },
                report.relative_change
            );
            (
                chi,
                "tv",
                json!({
                    "alpha": report.alpha,
                    "alpha_rule": if curve.is_some() { "l-curve" } else { "given" },
                    "iterations": report.iterations,
                    "converged": report.converged,
                    "relative_change": report.relative_change,
                    "tolerance": a.tolerance,
                    "l_curve": curve,
                }),
            )
        }
    };
    if let Some(mask) = &mask {
        chi.data.zip_mut_with(&mask.data, |c, m| *c *= *m);
    }
    write_volume(&a.out, &chi)?;
    write_json(
        &sidecar_path(&a.out),
        &json!({
            "kind": "chi",
            "units": "ppm",
            "method": method,
            "parameters": param,
            "b0_dir": b0.as_array(),
            "source": a.field,
            "source_units": FieldUnit::from(a.units).as_str(),
        }),
    )?;
    println!("wrote χ ({method}) to {}", a.out.display());
    Ok(())
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let recon = read_volume(&a.recon)?;
    let truth = read_volume(&a.truth)?;
    let mask = read_volume(&a.mask)?;
    let m = match &a.labels {
        Some(p) => {
            let labels = read_volume(p)?;
            same_grid(&labels, &truth, "labels", "truth")?;
            let labels = labels.data.mapv(|v| v.round().clamp(0.0, 255.0) as u8);
            metrics::evaluate_with_labels(
                &recon,
                &truth,
                &mask,
                &labels,
                &metrics::deep_grey_matter_regions(),
            )
        }
        None => metrics::evaluate(&recon, &truth, &mask),
    }
    .with_context(|| {
        format!(
            "scoring {} against {}",
            a.recon.display(),
            a.truth.display()
        )
    })?;
    print!("{}", metrics_table(&[(a.recon.display().to_string(), &m)]));
    let out = a.json.unwrap_or_else(|| {
        let mut p = sidecar_path(&a.recon);
        p.set_file_name(format!(
            "{}_metrics.json",
            p.file_stem().and_then(|s| s.to_str()).unwrap_or("recon")
        ));
        p
    });
    write_json(
        &out,
        &json!({"recon": a.recon, "truth": a.truth, "mask": a.mask, "metrics": m}),
    )?;
    Ok(())
}

fn run_preview(a: PreviewArgs) -> Result<()> {
    let v = read_volume(&a.input)?;
    let title = a.title.unwrap_or_else(|| {
        a.input
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let opts = preview::PreviewOptions {
        window: preview::Window::new(a.window[0] as f32, a.window[1] as f32)?,
        title: Some(title),
        ..Default::default()
    };
    let png = preview::orthogonal_slices_png(&v, &opts).context("rendering the preview")?;
    std::fs::write(&a.out, png).with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote {}", a.out.display());
    Ok(())
}

/// A markdown table of metrics, one row per named reconstruction.
pub fn metrics_table(rows: &[(String, &Metrics)]) -> String {
    let mut s = String::from(
        "| reconstruction | NRMSE % | dNRMSE % | HFEN % | XSIM | CC | RMSE ppm |\n|---|---|---|---|---|---|---|\n",
    );
    for (name, m) in rows {
        let d = m
            .nrmse_detrended
            .map(|v| format!("{v:.1}"))
            .unwrap_or_else(|| "n/a".into());
        s.push_str(&format!(
            "| {name} | {:.1} | {d} | {:.1} | {:.3} | {:.3} | {:.4} |\n",
            m.nrmse, m.hfen, m.xsim, m.cc, m.rmse
        ));
    }
    s
}

/// The B0 direction given on the command line, or derived from the volume's affine.
pub fn b0_direction(given: Option<[f64; 3]>, v: &Volume) -> Result<B0Direction> {
    Ok(match given {
        Some(d) => B0Direction::new(d).context("--b0-dir")?,
        None => B0Direction::from_volume(v).context("B0 direction from the NIfTI affine")?,
    })
}

/// Reads a NIfTI volume and rejects NaN/∞, naming the file.
pub fn read_volume(path: &Path) -> Result<Volume> {
    let v = read_nifti(path).with_context(|| format!("reading {}", path.display()))?;
    v.check_finite(&path.display().to_string())?;
    Ok(v)
}

/// Writes a NIfTI volume, creating the parent directory.
pub fn write_volume(path: &Path, v: &Volume) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_nifti(path, v).with_context(|| format!("writing {}", path.display()))
}

/// Writes pretty JSON.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// `x.nii.gz` / `x.nii` → `x.json`.
pub fn sidecar_path(nifti: &Path) -> PathBuf {
    let name = nifti
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
        .unwrap_or(&name);
    nifti.with_file_name(format!("{stem}.json"))
}

/// Errors unless two volumes share their matrix size and (within
/// `dmqsm_coordinator::problem`'s tolerances) their affine.
pub fn same_grid(a: &Volume, b: &Volume, an: &str, bn: &str) -> Result<()> {
    if a.shape() != b.shape() {
        bail!(
            "{an} has shape {:?} but {bn} has shape {:?}; they must be on the same grid",
            a.shape(),
            b.shape()
        );
    }
    dmqsm_coordinator::problem::check_same_affine(bn, &b.affine, an, &a.affine)
        .map_err(anyhow::Error::msg)?;
    Ok(())
}

fn parse_list<T: std::str::FromStr, const N: usize>(
    s: &str,
) -> std::result::Result<[T; N], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() != N {
        return Err(format!("expected {N} comma-separated values, got {:?}", s));
    }
    let mut out = Vec::with_capacity(N);
    for p in parts {
        out.push(
            p.parse::<T>()
                .map_err(|_| format!("{p:?} is not a valid number"))?,
        );
    }
    out.try_into()
        .map_err(|_| "internal: wrong length".to_string())
}

fn parse_usize3(s: &str) -> std::result::Result<[usize; 3], String> {
    parse_list(s)
}

fn parse_f64x3(s: &str) -> std::result::Result<[f64; 3], String> {
    parse_list(s)
}

fn parse_f64x2(s: &str) -> std::result::Result<[f64; 2], String> {
    parse_list(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dmqsm invert` & co. refuse a mask on another grid (origin, voxel size), naming
    /// both volumes and both affines; the same grid passes.
    #[test]
    fn same_grid_compares_affines() {
        let field = Volume::zeros([4, 4, 4], [1.0; 3]);
        same_grid(&field.clone(), &field, "mask", "field").unwrap();
        let mut shifted = field.clone();
        shifted.affine[0][3] = 3.0;
        let e = same_grid(&shifted, &field, "mask", "field")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mask's geometry differs from the field's")
                && e.contains("field affine [[1.0000, 0.0000, 0.0000, 0.0000]")
                && e.contains("mask affine [[1.0000, 0.0000, 0.0000, 3.0000]"),
            "{e}"
        );
        let coarse = Volume::zeros([4, 4, 4], [1.0, 1.0, 2.0]);
        assert!(same_grid(&coarse, &field, "mask", "field").is_err());
    }

    #[test]
    fn sidecar_names() {
        assert_eq!(sidecar_path(Path::new("a/b.nii.gz")), Path::new("a/b.json"));
        assert_eq!(sidecar_path(Path::new("b.nii")), Path::new("b.json"));
    }

    #[test]
    fn list_parsing_names_bad_values() {
        assert_eq!(parse_usize3("1,2,3").unwrap(), [1, 2, 3]);
        assert!(parse_usize3("1,2").unwrap_err().contains("expected 3"));
        assert!(parse_f64x3("1,x,3").unwrap_err().contains("\"x\""));
    }
}
