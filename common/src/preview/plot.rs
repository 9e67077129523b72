//! Line plots (e.g. loss curves): axes with "nice" or logarithmic ticks, a light grid,
//! 2 px curves in a fixed palette and a legend, on a white background.

use super::canvas::{Canvas, GAP, MARGIN, Rect, Rgb};
use super::text::text_width;
use super::ticks::{format_tick, log_ticks, nice_ticks};
use crate::error::{Error, Result};

/// One curve of a line plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry (empty = not listed).
    pub label: String,
    /// (x, y) points, drawn joined in order.
    pub points: Vec<(f64, f64)>,
}

/// Settings of [`line_plot_png`].
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOptions {
    /// Image width in pixels (200 … 4096).
    pub width: usize,
    /// Image height in pixels (150 … 4096).
    pub height: usize,
    /// Logarithmic y axis (all y must be > 0).
    pub log_y: bool,
    /// Optional title.
    pub title: Option<String>,
    /// x-axis label, e.g. "iteration".
    pub x_label: String,
    /// y-axis label, e.g. "loss".
    pub y_label: String,
}

impl Default for PlotOptions {
    fn default() -> Self {
        Self {
            width: 640,
            height: 400,
            log_y: false,
            title: None,
            x_label: "iteration".into(),
            y_label: "loss".into(),
        }
    }
}

const PLOT_BG: Rgb = [255, 255, 255];
const PLOT_FG: Rgb = [0, 0, 0];
const PLOT_GRID: Rgb = [225, 225, 225];
const PALETTE: [Rgb; 6] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
];

/// Plot rectangle and data ranges, shared by drawing and tests.
#[derive(Debug, Clone, Copy)]
struct PlotFrame {
    area: Rect,
    x: (f64, f64),
    /// y range, in log10 units when the axis is logarithmic.
    y: (f64, f64),
    log_y: bool,
}

impl PlotFrame {
    fn to_px(self, x: f64, y: f64) -> (i64, i64) {
        let yv = if self.log_y { y.log10() } else { y };
        let a = self.area;
        let fx = (x - self.x.0) / (self.x.1 - self.x.0);
        let fy = (yv - self.y.0) / (self.y.1 - self.y.0);
        (
            (a.x as f64 + fx * (a.w - 1) as f64).round() as i64,
            ((a.y + a.h - 1) as f64 - fy * (a.h - 1) as f64).round() as i64,
        )
    }
}

/// Expands a degenerate range and pads it by `pad` of its span on both sides.
fn padded(lo: f64, hi: f64, pad: f64) -> (f64, f64) {
    if hi > lo {
        let p = (hi - lo) * pad;
        (lo - p, hi + p)
    } else {
        let d = if lo == 0.0 { 1.0 } else { 0.5 * lo.abs() };
        (lo - d, hi + d)
    }
}

fn render_plot(series: &[Series], opts: &PlotOptions) -> Result<(Canvas, PlotFrame)> {
    if !(200..=4096).contains(&opts.width) || !(150..=4096).contains(&opts.height) {
        return Err(Error::Parameter(format!(
            "plot size must be 200…4096 × 150…4096 px, got {} × {}",
            opts.width, opts.height
        )));
    }
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    if pts.is_empty() {
        return Err(Error::Parameter("line plot has no points".into()));
    }
    if let Some(p) = pts.iter().find(|p| !(p.0.is_finite() && p.1.is_finite())) {
        return Err(Error::NonFinite(format!("line plot point {p:?}")));
    }
    if opts.log_y
        && let Some(p) = pts.iter().find(|p| p.1 <= 0.0)
    {
        return Err(Error::Parameter(format!(
            "log-scale plot needs y > 0, got point {p:?}"
        )));
    }
    let (xmin, xmax) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let yv = |y: f64| if opts.log_y { y.log10() } else { y };
    let (ymin, ymax) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(yv(p.1)), b.max(yv(p.1)))
        });
    let x = if xmax > xmin {
        (xmin, xmax)
    } else {
        padded(xmin, xmax, 0.0)
    };
    let y = padded(ymin, ymax, 0.05);

    let ts = if opts.height >= 600 { 2 } else { 1 };
    let line_h = 7 * ts;
    // y tick labels.
    let y_ticks: Vec<(f64, String)> = if opts.log_y {
        log_ticks(y.0, y.1)
    } else {
        let (t, d) = nice_ticks(y.0, y.1, 5);
        t.into_iter().map(|v| (v, format_tick(v, d))).collect()
    };
    let (xt, xd) = nice_ticks(x.0, x.1, 6);
    let x_ticks: Vec<(f64, String)> = xt.into_iter().map(|v| (v, format_tick(v, xd))).collect();
    let ylw = y_ticks
        .iter()
        .map(|t| text_width(&t.1, ts))
        .max()
        .unwrap_or(0);
    let title_h = if opts.title.is_some() {
        line_h + GAP
    } else {
        0
    };
    let left = MARGIN + ylw + 6;
    let top = MARGIN + title_h + line_h + GAP;
    let last_x_w = x_ticks.last().map_or(0, |t| text_width(&t.1, ts));
    let right = opts.width - MARGIN - (last_x_w / 2).max(2 * ts);
    let bottom = opts.height - MARGIN - 2 * line_h - 2 * GAP;
    if right <= left + 20 || bottom <= top + 20 {
        return Err(Error::Parameter("plot too small for its labels".into()));
    }
    let frame = PlotFrame {
        area: Rect {
            x: left,
            y: top,
            w: right - left,
            h: bottom - top,
        },
        x,
        y,
        log_y: opts.log_y,
    };
    let mut c = Canvas::new(opts.width, opts.height, PLOT_BG)?;
    let a = frame.area;
    let (ax0, ay0, ax1, ay1) = (
        a.x as i64,
        a.y as i64,
        (a.x + a.w - 1) as i64,
        (a.y + a.h - 1) as i64,
    );
    // Grid, ticks and labels.
    for (v, s) in &y_ticks {
        let py = frame
            .to_px(x.0, if opts.log_y { 10f64.powf(*v) } else { *v })
            .1;
        if py < ay0 || py > ay1 {
            continue;
        }
        c.line(ax0, py, ax1, py, PLOT_GRID);
        c.line(ax0 - 3, py, ax0, py, PLOT_FG);
        let tx = ax0 - 5 - text_width(s, ts) as i64;
        c.text(tx, py - (line_h / 2) as i64, s, ts, PLOT_FG);
    }
    for (v, s) in &x_ticks {
        let px = frame
            .to_px(*v, if opts.log_y { 10f64.powf(y.0) } else { y.0 })
            .0;
        if px < ax0 || px > ax1 {
            continue;
        }
        c.line(px, ay0, px, ay1, PLOT_GRID);
        c.line(px, ay1, px, ay1 + 3, PLOT_FG);
        let tx = px - text_width(s, ts) as i64 / 2;
        c.text(tx, ay1 + 5, s, ts, PLOT_FG);
    }
    // Axes box.
    c.line(ax0, ay0, ax0, ay1, PLOT_FG);
    c.line(ax0, ay1, ax1, ay1, PLOT_FG);
    c.line(ax1, ay0, ax1, ay1, PLOT_FG);
    c.line(ax0, ay0, ax1, ay0, PLOT_FG);
    // Labels and title.
    let xl_w = text_width(&opts.x_label, ts) as i64;
    c.text(
        (ax0 + ax1) / 2 - xl_w / 2,
        ay1 + 5 + line_h as i64 + GAP as i64,
        &opts.x_label,
        ts,
        PLOT_FG,
    );
    let y_label = if opts.log_y {
        format!("{} (log)", opts.y_label)
    } else {
        opts.y_label.clone()
    };
    c.text(
        MARGIN as i64,
        (top - line_h - GAP) as i64,
        &y_label,
        ts,
        PLOT_FG,
    );
    if let Some(t) = &opts.title {
        let tw = text_width(t, ts) as i64;
        c.text(
            opts.width as i64 / 2 - tw / 2,
            MARGIN as i64,
            t,
            ts,
            PLOT_FG,
        );
    }
    // Curves (2 px thick), then the legend.
    for (n, s) in series.iter().enumerate() {
        let col = PALETTE[n % PALETTE.len()];
        let px: Vec<(i64, i64)> = s.points.iter().map(|p| frame.to_px(p.0, p.1)).collect();
        if px.len() == 1 {
            for d in -1..=1 {
                for e in -1..=1 {
                    c.set(px[0].0 + d, px[0].1 + e, col);
                }
            }
        }
        for w in px.windows(2) {
            c.line(w[0].0, w[0].1, w[1].0, w[1].1, col);
            c.line(w[0].0, w[0].1 + 1, w[1].0, w[1].1 + 1, col);
        }
    }
    let mut ly = ay0 + 4;
    for (n, s) in series
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.label.is_empty())
    {
        let col = PALETTE[n % PALETTE.len()];
        let tw = text_width(&s.label, ts) as i64;
        let lx = ax1 - 6 - tw - 16;
        c.fill(
            Rect {
                x: lx as usize,
                y: (ly + line_h as i64 / 2 - 1) as usize,
                w: 12,
                h: 3,
            },
            col,
        );
        c.text(lx + 16, ly, &s.label, ts, PLOT_FG);
        ly += line_h as i64 + 4;
    }
    Ok((c, frame))
}

/// PNG line plot of loss curves: x = iteration, y = loss (optionally log-scale), axes with
/// tick labels, a legend for labelled series.
///
/// Errors: [`Error::Parameter`] for no points, a size outside 200…4096 × 150…4096 px or
/// y ≤ 0 on a log axis; [`Error::NonFinite`] for NaN/∞ points.
pub fn line_plot_png(series: &[Series], opts: &PlotOptions) -> Result<Vec<u8>> {
    render_plot(series, opts)?.0.encode()
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{decode, pixel};
    use super::*;

    #[test]
    fn line_plot_decodes_and_draws_the_curve() {
        // y = 1/(1 + x/10) over x = 0…100 on a log axis: every point maps inside the plot
        // area and the curve colour appears at the first point's pixel.
        let pts: Vec<(f64, f64)> = (0..=100)
            .map(|i| (i as f64, 1.0 / (1.0 + i as f64 / 10.0)))
            .collect();
        let series = [
            Series {
                label: "train".into(),
                points: pts.clone(),
            },
            Series {
                label: "val".into(),
                points: pts.iter().map(|p| (p.0, 2.0 * p.1)).collect(),
            },
        ];
        for log_y in [false, true] {
            let opts = PlotOptions {
                log_y,
                title: Some("loss".into()),
                ..Default::default()
            };
            let (canvas, frame) = render_plot(&series, &opts).unwrap();
            let png = decode(&line_plot_png(&series, &opts).unwrap());
            assert_eq!((png.0, png.1), (640, 400));
            assert_eq!(png.2, canvas.px);
            let a = frame.area;
            for p in &pts {
                let (x, y) = frame.to_px(p.0, p.1);
                assert!(x >= a.x as i64 && x < (a.x + a.w) as i64);
                assert!(y >= a.y as i64 && y < (a.y + a.h) as i64);
            }
            let (x, y) = frame.to_px(50.0, 1.0 / 6.0);
            assert_eq!(pixel(&png, x as usize, y as usize), PALETTE[0]);
        }
        // Errors: nothing to plot, NaN, y ≤ 0 on a log axis, absurd size.
        let opts = PlotOptions::default();
        assert!(line_plot_png(&[], &opts).is_err());
        let nan = [Series {
            label: String::new(),
            points: vec![(0.0, f64::NAN)],
        }];
        assert!(matches!(
            line_plot_png(&nan, &opts),
            Err(Error::NonFinite(_))
        ));
        let zero = [Series {
            label: String::new(),
            points: vec![(0.0, 0.0), (1.0, 1.0)],
        }];
        let log = PlotOptions {
            log_y: true,
            ..Default::default()
        };
        assert!(matches!(
            line_plot_png(&zero, &log),
            Err(Error::Parameter(_))
        ));
        let tiny = PlotOptions {
            width: 10,
            ..Default::default()
        };
        assert!(line_plot_png(&series, &tiny).is_err());
        // A single point and a flat series still draw.
        let one = [Series {
            label: "one".into(),
            points: vec![(3.0, 0.5)],
        }];
        assert!(line_plot_png(&one, &log).is_ok());
        let flat = [Series {
            label: String::new(),
            points: vec![(0.0, 1.0), (5.0, 1.0)],
        }];
        assert!(line_plot_png(&flat, &log).is_ok());
    }
}
