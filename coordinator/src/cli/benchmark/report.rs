//! The benchmark's outputs: scored [`Row`]s, the markdown tables of `results.md`, the
//! `results.json` dump and the PNG figures (the per-case triptychs and the overlap
//! ablation's `seams.png`). Metrics in % (NRMSE, dNRMSE, HFEN) as scored by
//! `dmqsm_common::metrics`, times in s, χ in ppm.

use super::cases::Case;
use super::model::Config;
use super::settings::QualitySettings;
use anyhow::Context;
use dmqsm_common::diffusion::model::ScoreModel;
use dmqsm_common::diffusion::sampler::Guidance;
use dmqsm_common::metrics::Metrics;
use dmqsm_common::metrics::calibration::Calibration;
use dmqsm_common::metrics::seams::gradient_magnitude;
use dmqsm_common::preview::{Panel, RowOptions, View, Window, panel_row_png};
use dmqsm_common::volume::Volume;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Half-width (ppm) of the error-map display window.
const ERROR_WINDOW_PPM: f32 = 0.05;

/// One scored reconstruction.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Phantom seed.
    pub phantom: u64,
    /// Case name.
    pub case: &'static str,
    /// Method, e.g. `TKD`, `L2`, `zero-fill`, `DM-QSM`.
    pub method: String,
    /// DM-QSM steps (`None` for baselines).
    pub steps: Option<usize>,
    /// DM-QSM guidance mode.
    pub guidance: Option<&'static str>,
    /// DPS step size ξ.
    pub xi: Option<f64>,
    /// Patch overlap (voxels).
    pub overlap: Option<usize>,
    /// Which part of the benchmark: `main`, `xi-sweep` or `ablation`.
    pub part: &'static str,
    /// Metrics against the truth in the brain mask.
    pub metrics: Metrics,
    /// Wall time of the reconstruction (s).
    pub seconds: f64,
    /// Seam ratio on the overlap-0 grid's boundary planes (ablation rows and truth).
    pub seam_ratio: Option<f64>,
    /// Warm-start timestep t₀ of a DM-QSM run (`None`: from noise).
    pub start: Option<usize>,
    /// Posterior samples averaged (DM-QSM).
    pub samples: Option<usize>,
    /// TV weight α of a TV baseline.
    pub alpha: Option<f64>,
    /// Calibration of the posterior std map (DM-QSM with 2 or more samples).
    pub calibration: Option<Calibration>,
}

fn write_png(path: &Path, panels: &[Panel<'_>], title: String) -> anyhow::Result<()> {
    let opts = RowOptions {
        views: vec![View::Axial, View::Coronal],
        title: Some(title),
        ..RowOptions::default()
    };
    let png = panel_row_png(panels, &opts)?;
    std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
}

fn diff(a: &Volume, b: &Volume) -> Volume {
    a.like(&a.data - &b.data)
}

/// Writes `triptych-<seed>-<case>.png` into `out`: the truth, the best baseline
/// `(name, volume)`, the best DM-QSM run `(volume, label)` and both errors against the
/// truth (χ window for the maps, ±[`ERROR_WINDOW_PPM`] ppm for the errors).
pub(super) fn write_triptych(
    out: &Path,
    seed: u64,
    case: Case,
    truth: &Volume,
    (base_name, bv): (&str, &Volume),
    (v, label): (&Volume, &str),
) -> anyhow::Result<()> {
    // The PNG font has no Greek letters.
    let bname = &base_name.replace('α', "alpha");
    let path = out.join(format!("triptych-{seed}-{}.png", case.name()));
    let err_w = Window::symmetric(ERROR_WINDOW_PPM)?;
    let (e_base, e_dm) = (diff(bv, truth), diff(v, truth));
    write_png(
        &path,
        &[
            panel(truth, "truth", Window::CHI),
            panel(bv, bname, Window::CHI),
            panel(v, label, Window::CHI),
            panel(&e_base, &format!("{bname} - truth"), err_w),
            panel(&e_dm, "DM-QSM - truth", err_w),
        ],
        format!("phantom {seed}, {}", case.name()),
    )
}

/// Writes `seams.png` into `out` and returns its path: the overlap-0 and overlap-8
/// reconstructions `vols` of the ablation (`min_steps` steps) and their gradient
/// magnitudes (ppm/voxel, window [0, [`ERROR_WINDOW_PPM`]]), on the grid of `like`.
pub(super) fn write_seams_png(
    out: &Path,
    seed: u64,
    case: Case,
    min_steps: usize,
    like: &Volume,
    vols: [&Volume; 2],
) -> anyhow::Result<PathBuf> {
    let g0 = like.like(gradient_magnitude(&vols[0].data));
    let g8 = like.like(gradient_magnitude(&vols[1].data));
    let gw = Window::new(0.0, ERROR_WINDOW_PPM)?;
    let path = out.join("seams.png");
    let opts = RowOptions {
        views: vec![View::Axial, View::Coronal],
        title: Some(format!(
            "overlap ablation, phantom {seed}, {} ({min_steps} steps): seams show as lines in |grad|",
            case.name()
        )),
        ..RowOptions::default()
    };
    let png = panel_row_png(
        &[
            panel(vols[0], "overlap 0", Window::CHI),
            panel(vols[1], "overlap 8", Window::CHI),
            panel(&g0, "|grad| overlap 0", gw),
            panel(&g8, "|grad| overlap 8", gw),
        ],
        &opts,
    )?;
    std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Writes `results.md` (the tables of [`markdown`]) and `results.json` (settings, model
/// id, hash and patch edge, every row) into `out`; returns the markdown and both paths.
pub(super) fn write_results(
    out: &Path,
    settings: &QualitySettings,
    model: &dyn ScoreModel,
    rows: &[Row],
) -> anyhow::Result<(String, PathBuf, PathBuf)> {
    let patch = model.spec().patch_size;
    let md = markdown(settings, model, rows);
    let md_path = out.join("results.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let json = serde_json::json!({
        "settings": settings,
        "model": {
            "id": model.spec().model_id,
            "hash": model.spec().content_hash,
            "patch_size": patch,
        },
        "rows": rows,
    });
    let json_path = out.join("results.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    Ok((md, md_path, json_path))
}

fn panel<'a>(v: &'a Volume, caption: &str, window: Window) -> Panel<'a> {
    Panel {
        volume: v,
        caption: caption.to_string(),
        window,
    }
}

/// A baseline's row (`main` part) of `method` on `case` of phantom `phantom`.
pub(super) fn baseline_row(phantom: u64, case: Case, method: &str, m: Metrics, secs: f64) -> Row {
    Row {
        phantom,
        case: case.name(),
        method: method.into(),
        steps: None,
        guidance: None,
        xi: None,
        overlap: None,
        part: "main",
        metrics: m,
        seconds: secs,
        seam_ratio: None,
        start: None,
        samples: None,
        alpha: None,
        calibration: None,
    }
}

/// A DM-QSM row of configuration `c` in benchmark part `part`.
pub(super) fn dm_row(
    phantom: u64,
    case: Case,
    c: Config,
    part: &'static str,
    m: Metrics,
    secs: f64,
) -> Row {
    Row {
        steps: Some(c.steps),
        guidance: Some(c.guidance.name()),
        xi: Some(c.xi),
        overlap: Some(c.overlap),
        part,
        start: c.start,
        ..baseline_row(phantom, case, "DM-QSM", m, secs)
    }
}

/// Rows of `part` grouped by (case, method, steps, guidance, ξ, overlap), averaged over
/// phantoms, in first-seen order.
fn averaged<'a>(rows: &'a [Row], part: &str) -> Vec<(&'a Row, Vec<&'a Row>)> {
    let mut groups: Vec<(&Row, Vec<&Row>)> = Vec::new();
    for r in rows.iter().filter(|r| r.part == part) {
        let key = |x: &Row| {
            (
                x.case,
                x.method.clone(),
                x.steps,
                x.guidance,
                x.xi.map(f64::to_bits),
                x.overlap,
                x.start,
                x.samples,
            )
        };
        match groups.iter_mut().find(|(k, _)| key(k) == key(r)) {
            Some((_, v)) => v.push(r),
            None => groups.push((r, vec![r])),
        }
    }
    groups
}

fn mean(v: &[&Row], f: impl Fn(&Row) -> Option<f64>) -> String {
    let vals: Vec<f64> = v.iter().filter_map(|r| f(r)).collect();
    if vals.is_empty() {
        return "—".into();
    }
    let m = vals.iter().sum::<f64>() / vals.len() as f64;
    format!("{m:.3}")
}

fn fmt_mean(v: &[&Row], f: impl Fn(&Row) -> Option<f64>, digits: usize) -> String {
    let vals: Vec<f64> = v.iter().filter_map(|r| f(r)).collect();
    if vals.is_empty() {
        return "—".into();
    }
    let m = vals.iter().sum::<f64>() / vals.len() as f64;
    format!("{m:.digits$}")
}

fn method_label(r: &Row) -> String {
    let mut label = match (r.steps, r.guidance) {
        (Some(s), Some(g)) => format!("{} {s} steps, {g}", r.method),
        _ => r.method.clone(),
    };
    if let Some(t) = r.start {
        let _ = write!(label, ", warm start t₀ {t}");
    }
    if let Some(k) = r.samples.filter(|&k| k > 1) {
        let _ = write!(label, ", mean of {k}");
    }
    label
}

fn metric_cells(g: &[&Row]) -> String {
    format!(
        "{} | {} | {} | {} | {} | {}",
        fmt_mean(g, |r| Some(r.metrics.nrmse), 1),
        fmt_mean(g, |r| r.metrics.nrmse_detrended, 1),
        fmt_mean(g, |r| Some(r.metrics.hfen), 1),
        fmt_mean(g, |r| Some(r.metrics.xsim), 3),
        fmt_mean(g, |r| Some(r.metrics.cc), 3),
        fmt_mean(g, |r| Some(r.seconds), 2),
    )
}

/// One markdown table row per group: case, method, ξ (— for baselines), metrics.
fn write_rows(md: &mut String, groups: &[(&Row, Vec<&Row>)]) {
    for (r, g) in groups {
        let xi = r.xi.map(|x| format!("{x}")).unwrap_or_else(|| "—".into());
        let _ = writeln!(
            md,
            "| {} | {} | {xi} | {} |",
            r.case,
            method_label(r),
            metric_cells(g)
        );
    }
}

/// The markdown report: main table, ξ sweep with the best ξ per case, overlap ablation.
fn markdown(s: &QualitySettings, model: &dyn ScoreModel, rows: &[Row]) -> String {
    let mut md = String::new();
    let seeds: Vec<String> = s.phantom_seeds.iter().map(u64::to_string).collect();
    let _ = writeln!(
        md,
        "Model `{}` (patch {}), phantoms {} ({}×{}×{} at 1 mm, held out), B0 along z, \
         DDIM η {}, overlap {}, x̂0 clamp {}, sampler seed {}. Baselines: TKD δ = 0.1, closed-form L2 \
         λ = 0.1, weighted TV-ADMM (FANSI style, brain-mask weight) with α from 10 values \
         1e-5…1e-2 either chosen against the truth by NRMSE (TV's best case, which a user \
         cannot have) or at the L-curve corner, k-space zero-fill, trilinear. A warm start \
         t₀ begins DM-QSM at training timestep t₀ from the L-curve TV (dipole cases) or the \
         zero-fill (SR). Prox data consistency of the dipinv-physics cases: {}. Metrics in \
         the brain mask, means over phantoms; NRMSE, dNRMSE (detrended) and HFEN in %, time \
         in s (TV: per α).\n",
        model.spec().model_id,
        model.spec().patch_size,
        seeds.join(", "),
        s.shape[0],
        s.shape[1],
        s.shape[2],
        s.eta,
        s.overlap,
        s.clamp_ppm
            .map(|[lo, hi]| format!("[{lo}, {hi}] ppm"))
            .unwrap_or_else(|| "off".into()),
        s.seed,
        match (s.consistency_tv, s.warm_start_alpha) {
            (Some(f), None) => format!("the TV step, α = {f} × the L-curve corner's"),
            (Some(f), Some(a)) => format!("the TV step, α = {f} × {a:e}"),
            (None, _) => "the plain CG step".to_string(),
        }
    );
    let header = "| case | method | ξ | NRMSE | dNRMSE | HFEN | XSIM | CC | time |\n|---|---|---|---|---|---|---|---|---|";
    let _ = writeln!(md, "{header}");
    write_rows(&mut md, &averaged(rows, "main"));
    if s.phantom_seeds.len() > 1 {
        let _ = writeln!(md, "\nPer phantom (main table):\n");
        let _ = writeln!(
            md,
            "| phantom | case | method | ξ / α | NRMSE | dNRMSE | HFEN | XSIM | CC | time |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in rows.iter().filter(|r| r.part == "main") {
            let param =
                r.xi.or(r.alpha)
                    .map(|x| format!("{x:.3}"))
                    .unwrap_or_else(|| "—".into());
            let _ = writeln!(
                md,
                "| {} | {} | {} | {param} | {} |",
                r.phantom,
                r.case,
                method_label(r),
                metric_cells(&[r])
            );
        }
    }
    let cal: Vec<&Row> = rows.iter().filter(|r| r.calibration.is_some()).collect();
    if !cal.is_empty() {
        let _ = writeln!(
            md,
            "\nCalibration of the posterior std map (mean of K samples; Spearman ρ of std \
             with |error| in the mask, and the fraction of voxels with |error| ≤ 2σ):\n"
        );
        let _ = writeln!(
            md,
            "| phantom | case | method | ρ(std, abs error) | within ±2σ |\n|---|---|---|---|---|"
        );
        for r in cal {
            if let Some(c) = r.calibration {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.3} | {:.3} |",
                    r.phantom,
                    r.case,
                    method_label(r),
                    c.spearman,
                    c.coverage_2sigma
                );
            }
        }
    }
    let sweep = averaged(rows, "xi-sweep");
    if !sweep.is_empty() {
        let _ = writeln!(
            md,
            "\nξ sweep ({} steps, one-round guidance modes; ξ = factor × the default of the \
             main table, `dmqsm_common::diffusion::sampler::default_xi`):\n",
            s.steps.iter().min().copied().unwrap_or(0),
        );
        let _ = writeln!(md, "{header}");
        write_rows(&mut md, &sweep);
        let _ = writeln!(md, "\nBest ξ per case by NRMSE (sweep and default):\n");
        for (&case, &g) in s.cases.iter().flat_map(|c| {
            s.guidance
                .iter()
                .filter(|&&g| g != Guidance::Exact)
                .map(move |g| (c, g))
        }) {
            let min_steps = s.steps.iter().min().copied();
            let first_g = Some(g.name());
            let cands: Vec<(f64, f64)> = averaged(rows, "xi-sweep")
                .into_iter()
                .chain(averaged(rows, "main"))
                .filter(|(r, _)| {
                    r.case == case.name()
                        && r.method == "DM-QSM"
                        && r.steps == min_steps
                        && r.guidance == first_g
                })
                .filter_map(|(r, g)| {
                    let n = g.iter().map(|x| x.metrics.nrmse).sum::<f64>() / g.len() as f64;
                    r.xi.map(|x| (x, n))
                })
                .collect();
            if let Some((xi, n)) = cands.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)) {
                let _ = writeln!(
                    md,
                    "- {} ({}): ξ = {xi} (NRMSE {n:.1})",
                    case.name(),
                    g.name()
                );
            }
        }
    }
    let demo = averaged(rows, "demo");
    if !demo.is_empty() {
        let _ = writeln!(
            md,
            "\nDemo phantom (`scripts/demo.sh`, i.e. `dmqsm demo` with its defaults: phantom \
             1001, 96×112×96 at 1 mm, anatomy at true size; noise-free field; DM-QSM \
             dipinv-physics with prox guidance warm-started from the L-curve TV at t₀ 50, \
             η 1, no clamp, sampler seed 0), scored \
             in process; the demo runs the same through the coordinator and two workers and \
             prints these figures:\n"
        );
        let _ = writeln!(md, "{header}");
        write_rows(&mut md, &demo);
    }
    let abl = averaged(rows, "ablation");
    if !abl.is_empty() {
        let _ = writeln!(
            md,
            "\nOverlap ablation (seam number = mean squared difference across the overlap-0 \
             patch-boundary planes / across all other planes, in the mask; 1 = no seams):\n"
        );
        let _ = writeln!(
            md,
            "| case | run | overlap | NRMSE | HFEN | seam number |\n|---|---|---|---|---|---|"
        );
        for (r, g) in abl {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                r.case,
                method_label(r),
                r.overlap
                    .map(|o| o.to_string())
                    .unwrap_or_else(|| "—".into()),
                fmt_mean(&g, |r| Some(r.metrics.nrmse), 1),
                fmt_mean(&g, |r| Some(r.metrics.hfen), 1),
                mean(&g, |r| r.seam_ratio),
            );
        }
    }
    md
}
