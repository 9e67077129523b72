//! Grids of slices with colour bars: the orthogonal-slice preview of one volume and rows
//! of captioned panels (e.g. truth | TKD | DM-QSM | error), one colour bar per run of
//! panels sharing a window.

use super::canvas::{BG, Canvas, FG, GAP, Image, MARGIN, Rect};
use super::slice::{View, pixel_mm, slice_centre, slice_image};
use super::text::text_width;
use super::ticks::{format_tick, nice_ticks};
use super::window::Window;
use crate::error::{Error, Result};
use crate::volume::Volume;

/// Width of a colour bar, in pixels.
const BAR_W: usize = 12;

/// Settings of [`orthogonal_slices_png`].
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewOptions {
    /// Display window (default [−0.15, 0.15] ppm).
    pub window: Window,
    /// Optional title drawn above the panels.
    pub title: Option<String>,
    /// Integer magnification; 0 = automatic (panels at least ~160 px tall).
    pub zoom: usize,
    /// Voxel the three slices pass through; `None` = the central voxel.
    pub slice: Option<[usize; 3]>,
    /// Unit written under the colour bar (default "ppm").
    pub unit: String,
}

impl Default for PreviewOptions {
    fn default() -> Self {
        Self {
            window: Window::CHI,
            title: None,
            zoom: 0,
            slice: None,
            unit: "ppm".into(),
        }
    }
}

/// One volume of a panel row, with its caption and window.
#[derive(Debug, Clone)]
pub struct Panel<'a> {
    /// The volume to show.
    pub volume: &'a Volume,
    /// Caption drawn above the panel.
    pub caption: String,
    /// Display window; consecutive panels with equal windows share one colour bar.
    pub window: Window,
}

/// Settings of [`panel_row_png`].
#[derive(Debug, Clone, PartialEq)]
pub struct RowOptions {
    /// Views to show, one image row each (default: axial only).
    pub views: Vec<View>,
    /// Voxel the slices pass through; `None` = the central voxel of each volume.
    pub slice: Option<[usize; 3]>,
    /// Optional title drawn above the panels.
    pub title: Option<String>,
    /// Integer magnification; 0 = automatic.
    pub zoom: usize,
    /// Unit written under each colour bar (default "ppm").
    pub unit: String,
}

impl Default for RowOptions {
    fn default() -> Self {
        Self {
            views: vec![View::Axial],
            slice: None,
            title: None,
            zoom: 0,
            unit: "ppm".into(),
        }
    }
}

/// A colour bar to draw after grid column `col`: its window, tick labels and the width of
/// the bar plus labels (px).
struct BarBlock {
    col: usize,
    window: Window,
    labels: Vec<(f64, String)>,
    width: usize,
}

/// A rendered panel grid: canvas, cell rectangles (row-major) and colour-bar rectangles.
type Layout = (Canvas, Vec<Rect>, Vec<Rect>);

/// A cell of the panel grid: an image with a column header.
struct Cell {
    image: Image,
    header: String,
}

/// Lays out `rows` of cells (all rows have the same number of columns), a colour bar
/// after each column listed in `bars` (with its window), an optional title and headers
/// over the first row. Returns the canvas, the rectangle of every cell (row-major) and
/// of every colour bar.
fn compose(
    rows: Vec<Vec<Cell>>,
    bars: &[(usize, Window)],
    title: Option<&str>,
    unit: &str,
) -> Result<Layout> {
    let ncol = rows.first().map_or(0, Vec::len);
    if ncol == 0 {
        return Err(Error::Parameter("nothing to draw".into()));
    }
    let max_h = rows
        .iter()
        .flat_map(|r| r.iter().map(|c| c.image.h))
        .max()
        .unwrap_or(0);
    let ts = if max_h >= 320 { 2 } else { 1 };
    let line_h = 7 * ts;
    let col_w: Vec<usize> = (0..ncol)
        .map(|c| {
            rows.iter()
                .map(|r| r[c].image.w)
                .max()
                .unwrap_or(1)
                .max(text_width(&rows[0][c].header, ts))
        })
        .collect();
    let row_h: Vec<usize> = rows
        .iter()
        .map(|r| r.iter().map(|c| c.image.h).max().unwrap_or(1))
        .collect();
    // Colour-bar blocks: bar, tick, gap, labels.
    let title_h = if title.is_some() { line_h + GAP } else { 0 };
    let header_h = line_h + 4;
    let grid_top = MARGIN + title_h + header_h;
    let grid_h: usize = row_h.iter().sum::<usize>() + GAP * (rows.len() - 1);
    let bar_blocks: Vec<BarBlock> = bars
        .iter()
        .map(|&(col, w)| {
            // About one label per 25 px of bar (6 for a 160 px bar: 0.05 ppm steps).
            let target = (grid_h / 25 / ts).clamp(2, 6);
            let (ticks, dec) = nice_ticks(f64::from(w.lo), f64::from(w.hi), target);
            let labels: Vec<(f64, String)> = ticks
                .into_iter()
                .map(|t| (t, format_tick(t, dec)))
                .collect();
            let lw = labels
                .iter()
                .map(|(_, s)| text_width(s, ts))
                .max()
                .unwrap_or(0)
                .max(text_width(unit, ts).saturating_sub(BAR_W));
            BarBlock {
                col,
                window: w,
                labels,
                width: BAR_W + 3 + 3 + lw,
            }
        })
        .collect();
    // Column x positions.
    let mut xs = Vec::with_capacity(ncol);
    let mut bar_x = Vec::new();
    let mut x = MARGIN;
    for (c, w) in col_w.iter().enumerate() {
        xs.push(x);
        x += w + GAP;
        for b in bar_blocks.iter().filter(|b| b.col == c) {
            x += 2;
            bar_x.push((x, b));
            x += b.width + GAP;
        }
    }
    let width = x - GAP + MARGIN;
    let height = grid_top + grid_h + line_h / 2 + MARGIN;
    let width = width.max(title.map_or(0, |t| text_width(t, ts)) + 2 * MARGIN);
    let mut canvas = Canvas::new(width, height, BG)?;
    if let Some(t) = title {
        canvas.text(MARGIN as i64, MARGIN as i64, t, ts, FG);
    }
    let mut rects = Vec::new();
    let mut y = grid_top;
    for (r, row) in rows.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            if r == 0 {
                canvas.text(
                    xs[c] as i64,
                    (grid_top - header_h) as i64,
                    &cell.header,
                    ts,
                    FG,
                );
            }
            canvas.blit(xs[c], y, &cell.image);
            rects.push(Rect {
                x: xs[c],
                y,
                w: cell.image.w,
                h: cell.image.h,
            });
        }
        y += row_h[r] + GAP;
    }
    let mut bar_rects = Vec::new();
    for (bx, b) in bar_x {
        draw_colour_bar(&mut canvas, bx, grid_top, grid_h, b.window, &b.labels, ts);
        canvas.text(bx as i64, (grid_top - header_h) as i64, unit, ts, FG);
        bar_rects.push(Rect {
            x: bx,
            y: grid_top,
            w: BAR_W,
            h: grid_h,
        });
    }
    Ok((canvas, rects, bar_rects))
}

/// A vertical grey ramp from `hi` (top) to `lo` (bottom) with tick marks and labels.
fn draw_colour_bar(
    canvas: &mut Canvas,
    x: usize,
    y: usize,
    h: usize,
    w: Window,
    labels: &[(f64, String)],
    ts: usize,
) {
    let (lo, hi) = (f64::from(w.lo), f64::from(w.hi));
    for r in 0..h {
        let v = hi - (r as f64 + 0.5) / h as f64 * (hi - lo);
        let g = w.grey(v as f32).unwrap_or(0);
        canvas.fill(
            Rect {
                x,
                y: y + r,
                w: BAR_W,
                h: 1,
            },
            [g, g, g],
        );
    }
    for (t, s) in labels {
        let ty = y as f64 + (hi - t) / (hi - lo) * (h.max(1) - 1) as f64;
        let ty = ty.round() as i64;
        canvas.line((x + BAR_W) as i64, ty, (x + BAR_W + 2) as i64, ty, FG);
        canvas.text((x + BAR_W + 6) as i64, ty - (7 * ts / 2) as i64, s, ts, FG);
    }
}

fn render_orthogonal(volume: &Volume, opts: &PreviewOptions) -> Result<Layout> {
    opts.window.validate()?;
    let centre = slice_centre(volume, opts.slice, "preview volume")?;
    let views = [View::Axial, View::Coronal, View::Sagittal];
    let px_mm = pixel_mm(&[volume], &views, opts.zoom);
    let fixed = [centre[2], centre[1], centre[0]];
    let cells = views
        .iter()
        .zip(fixed)
        .map(|(&view, f)| {
            Ok(Cell {
                image: slice_image(volume, view, centre, opts.window, px_mm)?,
                header: format!("{} {f}", view.name()),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    compose(
        vec![cells],
        &[(2, opts.window)],
        opts.title.as_deref(),
        &opts.unit,
    )
}

/// PNG of the axial, coronal and sagittal slices through the centre of `volume` (or
/// `opts.slice`), side by side, with a colour bar labelled in `opts.unit` (ppm).
///
/// Errors: [`Error::Parameter`] for a bad window, an out-of-range slice or an image that
/// would exceed 8192 px per side; [`Error::Shape`] for an empty volume.
pub fn orthogonal_slices_png(volume: &Volume, opts: &PreviewOptions) -> Result<Vec<u8>> {
    render_orthogonal(volume, opts)?.0.encode()
}

fn render_row(panels: &[Panel<'_>], opts: &RowOptions) -> Result<Layout> {
    if panels.is_empty() {
        return Err(Error::Parameter(
            "panel row needs at least one panel".into(),
        ));
    }
    if opts.views.is_empty() {
        return Err(Error::Parameter("panel row needs at least one view".into()));
    }
    let mut centres = Vec::with_capacity(panels.len());
    for (n, p) in panels.iter().enumerate() {
        p.window.validate()?;
        centres.push(slice_centre(p.volume, opts.slice, &format!("panel {n}"))?);
    }
    let vols: Vec<&Volume> = panels.iter().map(|p| p.volume).collect();
    let px_mm = pixel_mm(&vols, &opts.views, opts.zoom);
    let mut rows = Vec::with_capacity(opts.views.len());
    for &view in &opts.views {
        let mut row = Vec::with_capacity(panels.len());
        for (p, &c) in panels.iter().zip(&centres) {
            row.push(Cell {
                image: slice_image(p.volume, view, c, p.window, px_mm)?,
                header: p.caption.clone(),
            });
        }
        rows.push(row);
    }
    // A bar after each run of panels that share a window.
    let bars: Vec<(usize, Window)> = (0..panels.len())
        .filter(|&i| i + 1 == panels.len() || panels[i + 1].window != panels[i].window)
        .map(|i| (i, panels[i].window))
        .collect();
    compose(rows, &bars, opts.title.as_deref(), &opts.unit)
}

/// PNG of several volumes side by side (one column each, captioned), one image row per
/// view in `opts.views`, with a colour bar after each run of panels sharing a window —
/// e.g. truth | TKD | DM-QSM in [−0.15, 0.15] ppm, then error in [−0.05, 0.05] ppm.
///
/// Errors as [`orthogonal_slices_png`], and [`Error::Parameter`] for no panels or views.
pub fn panel_row_png(panels: &[Panel<'_>], opts: &RowOptions) -> Result<Vec<u8>> {
    render_row(panels, opts)?.0.encode()
}

#[cfg(test)]
mod tests {
    use super::super::canvas::{BG, MARGIN};
    use super::super::slice::{MIN_PANEL_PX, NAN_COLOUR};
    use super::super::testutil::{decode, pixel};
    use super::*;
    use ndarray::Array3;

    /// v(i, j, k) = −0.2 + 0.4·i/(nx − 1) + 0.001·j + 0.0001·k: mostly a ramp along i.
    fn ramp(shape: [usize; 3], voxel: [f64; 3]) -> Volume {
        let nx = shape[0] as f32;
        Volume::new(
            Array3::from_shape_fn(shape, |(i, j, k)| {
                -0.2 + 0.4 * i as f32 / (nx - 1.0) + 0.001 * j as f32 + 0.0001 * k as f32
            }),
            voxel,
        )
    }

    #[test]
    fn bad_windows_and_slices_error() {
        for (lo, hi) in [
            (0.1, 0.1),
            (0.2, -0.2),
            (f32::NAN, 1.0),
            (0.0, f32::INFINITY),
        ] {
            assert!(matches!(Window::new(lo, hi), Err(Error::Parameter(_))));
        }
        assert!(Window::symmetric(0.0).is_err());
        let v = ramp([8, 8, 8], [1.0; 3]);
        let opts = PreviewOptions {
            window: Window { lo: 1.0, hi: 0.0 },
            ..Default::default()
        };
        assert!(matches!(
            orthogonal_slices_png(&v, &opts),
            Err(Error::Parameter(_))
        ));
        let opts = PreviewOptions {
            slice: Some([8, 0, 0]),
            ..Default::default()
        };
        assert!(matches!(
            orthogonal_slices_png(&v, &opts),
            Err(Error::Parameter(_))
        ));
        let opts = PreviewOptions {
            zoom: 2000,
            ..Default::default()
        };
        assert!(orthogonal_slices_png(&v, &opts).is_err());
        assert!(panel_row_png(&[], &RowOptions::default()).is_err());
        let bad = Panel {
            volume: &v,
            caption: "x".into(),
            window: Window {
                lo: 0.0,
                hi: f32::NAN,
            },
        };
        assert!(panel_row_png(&[bad], &RowOptions::default()).is_err());
    }

    #[test]
    fn orthogonal_png_decodes_and_pixels_follow_the_window() {
        // 20 × 24 × 16 at 1 mm, zoom 1: the axial panel is 20 × 24 px, column c shows i = c,
        // and row r shows j = 23 − r (anterior up). Every pixel must equal the window map
        // of its voxel exactly (nearest neighbour, no interpolation).
        let v = ramp([20, 24, 16], [1.0; 3]);
        let opts = PreviewOptions {
            zoom: 1,
            title: Some("ramp".into()),
            ..Default::default()
        };
        let (canvas, rects, bars) = render_orthogonal(&v, &opts).unwrap();
        let png = decode(&orthogonal_slices_png(&v, &opts).unwrap());
        assert_eq!((png.0, png.1), (canvas.w, canvas.h));
        assert_eq!(png.2, canvas.px);
        let ax = rects[0];
        assert_eq!((ax.w, ax.h), (20, 24));
        let (cor, sag) = (rects[1], rects[2]);
        assert_eq!((cor.w, cor.h), (20, 16));
        assert_eq!((sag.w, sag.h), (24, 16));
        let centre = [10, 12, 8];
        for r in 0..24 {
            for c in 0..20 {
                let want = Window::CHI.grey(v.data[[c, 23 - r, centre[2]]]).unwrap();
                assert_eq!(
                    pixel(&png, ax.x + c, ax.y + r),
                    [want; 3],
                    "axial ({c},{r})"
                );
            }
        }
        // Sagittal: column c is j = c, row r is k = 15 − r, at i = 10.
        for r in 0..16 {
            for c in 0..24 {
                let want = Window::CHI.grey(v.data[[centre[0], c, 15 - r]]).unwrap();
                assert_eq!(pixel(&png, sag.x + c, sag.y + r), [want; 3]);
            }
        }
        // One colour bar, right of the last panel, as tall as the panels, running from
        // white at the top to black: row r shows hi − (r + 0.5)/24 · (hi − lo).
        assert_eq!(bars.len(), 1);
        let bar = bars[0];
        assert!(bar.x >= sag.x + sag.w && bar.y == ax.y && bar.h == 24);
        for r in 0..24 {
            let v = 0.15 - (r as f64 + 0.5) / 24.0 * 0.3;
            let want = Window::CHI.grey(v as f32).unwrap();
            assert_eq!(pixel(&png, bar.x + 1, bar.y + r), [want; 3]);
        }
        let bar_x = bar.x;
        // Tick labels and the title drew something (non-background pixels).
        let lit = |x0: usize, x1: usize, y0: usize, y1: usize| {
            (y0..y1).any(|y| (x0..x1).any(|x| pixel(&png, x, y) != BG))
        };
        assert!(lit(bar_x + BAR_W, png.0, ax.y, ax.y + 24));
        assert!(lit(0, png.0, 0, MARGIN + 7));
    }

    #[test]
    fn anisotropic_voxels_keep_their_aspect() {
        // Voxels 1 × 1 × 2 mm: pixels are 1 mm, so the coronal panel is 12 × 2·6 px and
        // each k covers two rows.
        let v = ramp([12, 10, 6], [1.0, 1.0, 2.0]);
        let opts = PreviewOptions {
            zoom: 1,
            window: Window::new(-0.25, 0.25).unwrap(),
            ..Default::default()
        };
        let (canvas, rects, _) = render_orthogonal(&v, &opts).unwrap();
        let cor = rects[1];
        assert_eq!((cor.w, cor.h), (12, 12));
        for r in 0..12 {
            let k = 5 - r / 2;
            let want = opts.window.grey(v.data[[3, 5, k]]).unwrap();
            assert_eq!(canvas.get(cor.x + 3, cor.y + r), [want; 3]);
        }
        // Automatic zoom makes small volumes at least MIN_PANEL_PX tall.
        let (_, rects, _) = render_orthogonal(&v, &PreviewOptions::default()).unwrap();
        assert!(rects.iter().map(|r| r.h).max().unwrap() >= MIN_PANEL_PX);
    }

    #[test]
    fn panel_row_shows_each_volume_and_groups_colour_bars() {
        let shape = (10, 10, 10);
        let truth = Volume::new(Array3::from_elem(shape, 0.075), [1.0; 3]);
        let recon = Volume::new(Array3::from_elem(shape, -0.075), [1.0; 3]);
        let mut err = Volume::new(Array3::from_elem(shape, 0.025), [1.0; 3]);
        err.data[[5, 5, 5]] = f32::NAN;
        let ew = Window::symmetric(0.05).unwrap();
        let panels = [
            Panel {
                volume: &truth,
                caption: "truth".into(),
                window: Window::CHI,
            },
            Panel {
                volume: &recon,
                caption: "TKD".into(),
                window: Window::CHI,
            },
            Panel {
                volume: &err,
                caption: "error".into(),
                window: ew,
            },
        ];
        let opts = RowOptions {
            views: vec![View::Axial, View::Coronal],
            zoom: 2,
            ..Default::default()
        };
        let (canvas, rects, bars) = render_row(&panels, &opts).unwrap();
        let png = decode(&panel_row_png(&panels, &opts).unwrap());
        assert_eq!((png.0, png.1), (canvas.w, canvas.h));
        assert_eq!(rects.len(), 6);
        // 0.075 in [−0.15, 0.15] → 191; −0.075 → 64 (63.75); 0.025 in [−0.05, 0.05] → 191.
        assert_eq!(pixel(&png, rects[0].x + 1, rects[0].y + 1), [191; 3]);
        assert_eq!(pixel(&png, rects[1].x + 1, rects[1].y + 1), [64; 3]);
        assert_eq!(pixel(&png, rects[2].x + 1, rects[2].y + 1), [191; 3]);
        // The NaN voxel at the centre of the error panel's axial slice is magenta: axial
        // row r shows j = 9 − r/2 at zoom 2, so j = 5 is rows 8–9, i = 5 columns 10–11.
        assert_eq!(pixel(&png, rects[2].x + 10, rects[2].y + 8), NAN_COLOUR);
        // Two colour bars: one after TKD (shared χ window) and one after the error panel;
        // each zoomed panel is 20 px wide.
        assert_eq!(rects[0].w, 20);
        assert_eq!(bars.len(), 2);
        assert!(bars[0].x > rects[1].x + rects[1].w && bars[0].x + BAR_W < rects[2].x);
        assert!(bars[1].x > rects[2].x + rects[2].w);
        // Second row is the coronal view, below the first.
        assert!(rects[3].y > rects[0].y + rects[0].h);
    }
}
