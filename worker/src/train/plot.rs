//! The loss-curve PNG of a training run (drawn with `dmqsm_common::preview`).

use crate::error::Result;
use dmqsm_common::preview::{PlotOptions, Series, line_plot_png};
use std::path::Path;

/// Writes the ε-MSE loss per iteration and its running mean (window of 1/20 of the run,
/// at least 1) as a PNG with a logarithmic y axis. Does nothing for an empty history.
pub fn write_loss_png(path: &Path, losses: &[f32]) -> Result<()> {
    if losses.is_empty() {
        return Ok(());
    }
    let positive = losses.iter().all(|&l| l > 0.0 && l.is_finite());
    let raw: Vec<(f64, f64)> = losses
        .iter()
        .enumerate()
        .map(|(i, &l)| ((i + 1) as f64, f64::from(l)))
        .collect();
    let window = (losses.len() / 20).max(1);
    let mut mean = Vec::with_capacity(losses.len());
    let mut sum = 0.0;
    for (i, &l) in losses.iter().enumerate() {
        sum += f64::from(l);
        if i >= window {
            sum -= f64::from(losses[i - window]);
        }
        mean.push(((i + 1) as f64, sum / (i + 1).min(window) as f64));
    }
    let series = [
        Series {
            label: "loss".into(),
            points: raw,
        },
        Series {
            label: format!("mean of {window}"),
            points: mean,
        },
    ];
    let opts = PlotOptions {
        log_y: positive,
        title: Some("training loss (eps-MSE)".into()),
        ..PlotOptions::default()
    };
    let png = line_plot_png(&series, &opts)?;
    crate::card::write_atomic(path, &png)
}
