//! PNG previews: orthogonal slices with a ppm colour bar, rows of panels (e.g.
//! truth | TKD | DM-QSM | error) and line plots of loss curves.
//!
//! Everything returns PNG bytes (8-bit RGB, `png` crate); nothing touches the filesystem.
//! Text uses a built-in 5 × 7 bitmap font (ASCII letters, digits, common punctuation, and
//! χ/μ); other characters are drawn as a hollow box.
//!
//! Slice orientation: voxel axes as stored. For RAS-oriented volumes (e.g. the phantom)
//! that is neurological convention: axial and coronal with subject right on the image
//! right, axial with anterior up, coronal and sagittal with superior up, sagittal with
//! anterior on the right. Slices are resampled nearest-neighbour to square pixels of the
//! smallest voxel size (divided by the zoom), so anisotropic voxels keep their aspect.
//! Grey levels are round(255 · (v − lo)/(hi − lo)) clamped to [0, 255]; NaN/∞ voxels are
//! drawn magenta.

use crate::error::{Error, Result};
use crate::volume::Volume;

/// A display window in the image's unit (ppm for χ): `lo` maps to black, `hi` to white.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// Value drawn black (and below).
    pub lo: f32,
    /// Value drawn white (and above).
    pub hi: f32,
}

impl Window {
    /// The default χ window, [−0.15, 0.15] ppm.
    pub const CHI: Window = Window {
        lo: -0.15,
        hi: 0.15,
    };

    /// A window; errors with [`Error::Parameter`] unless both ends are finite and lo < hi.
    pub fn new(lo: f32, hi: f32) -> Result<Self> {
        let w = Self { lo, hi };
        w.validate()?;
        Ok(w)
    }

    /// The window [−half, half], e.g. for error maps.
    pub fn symmetric(half: f32) -> Result<Self> {
        Self::new(-half, half)
    }

    /// Errors with [`Error::Parameter`] unless both ends are finite and lo < hi.
    pub fn validate(&self) -> Result<()> {
        if !(self.lo.is_finite() && self.hi.is_finite() && self.lo < self.hi) {
            return Err(Error::Parameter(format!(
                "display window must be finite with lo < hi, got [{}, {}]",
                self.lo, self.hi
            )));
        }
        Ok(())
    }

    /// The grey level (0–255) of `v`, `None` for NaN/∞.
    pub fn grey(&self, v: f32) -> Option<u8> {
        if !v.is_finite() {
            return None;
        }
        let t = (f64::from(v) - f64::from(self.lo)) / (f64::from(self.hi) - f64::from(self.lo));
        Some((255.0 * t).round().clamp(0.0, 255.0) as u8)
    }
}

impl Default for Window {
    fn default() -> Self {
        Self::CHI
    }
}

/// One of the three orthogonal slice orientations (voxel axes i, j, k).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Fixed k: image x = i, image up = +j.
    Axial,
    /// Fixed j: image x = i, image up = +k.
    Coronal,
    /// Fixed i: image x = j, image up = +k.
    Sagittal,
}

impl View {
    /// (horizontal axis, vertical axis, fixed axis).
    fn axes(self) -> (usize, usize, usize) {
        match self {
            View::Axial => (0, 1, 2),
            View::Coronal => (0, 2, 1),
            View::Sagittal => (1, 2, 0),
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            View::Axial => "axial",
            View::Coronal => "coronal",
            View::Sagittal => "sagittal",
        }
    }
}

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

// ---------------------------------------------------------------------------------------
// Canvas, font and PNG encoding.

type Rgb = [u8; 3];

const MARGIN: usize = 8;
const GAP: usize = 6;
const BAR_W: usize = 12;
const BG: Rgb = [0, 0, 0];
const FG: Rgb = [230, 230, 230];
const NAN_COLOUR: Rgb = [255, 0, 255];
/// Panels are magnified (automatic zoom) until at least this tall.
const MIN_PANEL_PX: usize = 160;
/// Largest accepted image, in pixels per side.
const MAX_SIDE: usize = 8192;

/// An RGB raster.
#[derive(Debug, Clone)]
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

/// A placed rectangle (x, y, w, h) in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rect {
    x: usize,
    y: usize,
    w: usize,
    h: usize,
}

impl Canvas {
    fn new(w: usize, h: usize, bg: Rgb) -> Result<Self> {
        if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
            return Err(Error::Parameter(format!(
                "preview image of {w} × {h} px is outside 1 … {MAX_SIDE} px per side"
            )));
        }
        Ok(Self {
            w,
            h,
            px: bg.iter().copied().cycle().take(w * h * 3).collect(),
        })
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let o = (y as usize * self.w + x as usize) * 3;
            self.px[o..o + 3].copy_from_slice(&c);
        }
    }

    #[cfg(test)]
    fn get(&self, x: usize, y: usize) -> Rgb {
        let o = (y * self.w + x) * 3;
        [self.px[o], self.px[o + 1], self.px[o + 2]]
    }

    fn fill(&mut self, r: Rect, c: Rgb) {
        for y in r.y..r.y + r.h {
            for x in r.x..r.x + r.w {
                self.set(x as i64, y as i64, c);
            }
        }
    }

    fn blit(&mut self, x0: usize, y0: usize, img: &Image) {
        for y in 0..img.h {
            for x in 0..img.w {
                self.set((x0 + x) as i64, (y0 + y) as i64, img.px[y * img.w + x]);
            }
        }
    }

    /// Draws `s` with its top-left corner at (x, y), glyphs magnified by `scale`.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: usize, c: Rgb) {
        let sc = scale as i64;
        for (n, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            let gx = x + n as i64 * 6 * sc;
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        for dy in 0..sc {
                            for dx in 0..sc {
                                self.set(gx + col * sc + dx, y + r as i64 * sc + dy, c);
                            }
                        }
                    }
                }
            }
        }
    }

    /// A 1-px line (Bresenham).
    fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let err = |e: png::EncodingError| Error::Parameter(format!("PNG encoding failed: {e}"));
        {
            let mut enc = png::Encoder::new(&mut out, self.w as u32, self.h as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header().map_err(err)?;
            writer.write_image_data(&self.px).map_err(err)?;
            writer.finish().map_err(err)?;
        }
        Ok(out)
    }
}

/// Width in pixels of `s` at `scale` (6 px advance per glyph, no trailing gap).
fn text_width(s: &str, scale: usize) -> usize {
    let n = s.chars().count();
    if n == 0 { 0 } else { (n * 6 - 1) * scale }
}

/// 5 × 7 glyph rows, bit 4 = leftmost column.
fn glyph(c: char) -> [u8; 7] {
    match c {
        ' ' => [0; 7],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        'χ' => [0x00, 0x00, 0x19, 0x0A, 0x04, 0x0A, 0x13],
        'μ' => [0x00, 0x00, 0x11, 0x11, 0x13, 0x1D, 0x10],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        ';' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x04, 0x08],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '|' => [0x04; 7],
        '*' => [0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        '#' => [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A],
        '\'' => [0x0C, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00],
        '!' => [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04],
        '?' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
        '×' => [0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x00],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

// ---------------------------------------------------------------------------------------
// Ticks.

/// "Nice" tick values (1, 2, 5 × 10ⁿ steps) covering [lo, hi], about `target` of them,
/// and the number of decimals that shows the step exactly.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, usize) {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return (vec![lo], 0);
    }
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    // Relative slack 1e-6 absorbs f32 window ends (0.15f32 = 0.15000000596…).
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * (1.0 - 1e-6))
        .unwrap_or(10.0 * mag);
    let first = (lo / step - 1e-6).ceil() as i64;
    let last = (hi / step + 1e-6).floor() as i64;
    let ticks = (first..=last).map(|k| k as f64 * step).collect();
    let decimals = (-(step.log10() + 1e-9).floor()).max(0.0) as usize;
    (ticks, decimals)
}

fn format_tick(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    // Avoid "-0.00".
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_string()
    } else {
        s
    }
}

/// Label of m·10^k (m = 1 … 9) on a log axis.
fn log_label(m: u32, k: i32) -> String {
    match k {
        -3..=4 => format_tick(f64::from(m) * 10f64.powi(k), (-k).max(0) as usize),
        _ => format!("{m}e{k}"),
    }
}

/// Log-axis ticks over [lo, hi] (log10 units): decades, or 1-2-5 per decade when fewer
/// than two decades are in range, or 1 … 9 when still fewer than two ticks.
fn log_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let (k0, k1) = (lo.floor() as i32, hi.ceil() as i32);
    for mantissas in [&[1u32][..], &[1, 2, 5], &[1, 2, 3, 4, 5, 6, 7, 8, 9]] {
        let ticks: Vec<(f64, String)> = (k0..=k1)
            .flat_map(|k| mantissas.iter().map(move |&m| (m, k)))
            .map(|(m, k)| ((f64::from(m)).log10() + f64::from(k), log_label(m, k)))
            .filter(|(v, _)| *v >= lo - 1e-9 && *v <= hi + 1e-9)
            .collect();
        if ticks.len() >= 2 {
            return ticks;
        }
    }
    vec![(lo, log_label(1, lo.round() as i32))]
}

// ---------------------------------------------------------------------------------------
// Slices and panel layout.

/// An RGB image of one slice.
#[derive(Debug, Clone)]
struct Image {
    w: usize,
    h: usize,
    px: Vec<Rgb>,
}

/// Checks the volume and the slice position; returns the voxel slices pass through.
fn slice_centre(vol: &Volume, slice: Option<[usize; 3]>, name: &str) -> Result<[usize; 3]> {
    let s = vol.shape();
    if s.contains(&0) {
        return Err(Error::Shape(format!("{name}: empty volume of shape {s:?}")));
    }
    if vol.voxel_size.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(Error::Parameter(format!(
            "{name}: voxel size must be finite and positive, got {:?}",
            vol.voxel_size
        )));
    }
    let c = slice.unwrap_or([s[0] / 2, s[1] / 2, s[2] / 2]);
    if (0..3).any(|a| c[a] >= s[a]) {
        return Err(Error::Parameter(format!(
            "{name}: slice position {c:?} is outside the volume of shape {s:?}"
        )));
    }
    Ok(c)
}

/// Size in pixels of `view` of a volume at pixel size `px_mm`.
fn slice_size(vol: &Volume, view: View, px_mm: f64) -> (usize, usize) {
    let (ha, va, _) = view.axes();
    let s = vol.shape();
    let v = vol.voxel_size;
    let w = ((s[ha] as f64 * v[ha] / px_mm).round() as usize).max(1);
    let h = ((s[va] as f64 * v[va] / px_mm).round() as usize).max(1);
    (w, h)
}

/// The `view` slice through `centre`, nearest-neighbour resampled to `px_mm` pixels.
fn slice_image(
    vol: &Volume,
    view: View,
    centre: [usize; 3],
    window: Window,
    px_mm: f64,
) -> Result<Image> {
    let (ha, va, fixed) = view.axes();
    let (w, h) = slice_size(vol, view, px_mm);
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(Error::Parameter(format!(
            "{} slice of {w} × {h} px exceeds {MAX_SIDE} px; lower the zoom",
            view.name()
        )));
    }
    let s = vol.shape();
    let v = vol.voxel_size;
    let mut px = Vec::with_capacity(w * h);
    for r in 0..h {
        let iv = ((((h - 1 - r) as f64 + 0.5) * px_mm / v[va]) as usize).min(s[va] - 1);
        for c in 0..w {
            let ih = (((c as f64 + 0.5) * px_mm / v[ha]) as usize).min(s[ha] - 1);
            let mut idx = [0usize; 3];
            idx[ha] = ih;
            idx[va] = iv;
            idx[fixed] = centre[fixed];
            px.push(match window.grey(vol.data[idx]) {
                Some(g) => [g, g, g],
                None => NAN_COLOUR,
            });
        }
    }
    Ok(Image { w, h, px })
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

/// Pixel size (mm) for volumes at `zoom` (0 = automatic).
fn pixel_mm(vols: &[&Volume], views: &[View], zoom: usize) -> f64 {
    let vmin = vols
        .iter()
        .flat_map(|v| v.voxel_size)
        .fold(f64::INFINITY, f64::min);
    let zoom = if zoom > 0 {
        zoom
    } else {
        let tallest = vols
            .iter()
            .flat_map(|v| views.iter().map(|&view| slice_size(v, view, vmin).1))
            .max()
            .unwrap_or(1);
        MIN_PANEL_PX.div_ceil(tallest.max(1)).clamp(1, 16)
    };
    vmin / zoom as f64
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

// ---------------------------------------------------------------------------------------
// Line plots.

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
    use super::*;
    use ndarray::Array3;

    /// Decodes PNG bytes to (width, height, RGB bytes).
    fn decode(bytes: &[u8]) -> (usize, usize, Vec<u8>) {
        let dec = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width as usize, info.height as usize, buf)
    }

    fn pixel(img: &(usize, usize, Vec<u8>), x: usize, y: usize) -> Rgb {
        let o = (y * img.0 + x) * 3;
        [img.2[o], img.2[o + 1], img.2[o + 2]]
    }

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
    fn window_maps_values_to_grey_levels() {
        // grey = round(255·(v − lo)/(hi − lo)), clamped: −0.15 → 0, 0 → 128 (127.5 rounds
        // half away from zero), 0.075 → round(191.25) = 191, 0.15 → 255, beyond → clamped.
        let w = Window::CHI;
        assert_eq!(w.grey(-0.15), Some(0));
        assert_eq!(w.grey(0.0), Some(128));
        assert_eq!(w.grey(0.075), Some(191));
        assert_eq!(w.grey(0.15), Some(255));
        assert_eq!(w.grey(-1.0), Some(0));
        assert_eq!(w.grey(7.0), Some(255));
        assert_eq!(w.grey(f32::NAN), None);
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

    #[test]
    fn font_covers_tick_labels_and_unknowns_are_boxes() {
        for c in "0123456789-.ppmeE+".chars() {
            assert_ne!(glyph(c), glyph('\u{1}'), "{c} has no glyph");
        }
        assert_eq!(glyph(' '), [0; 7]);
        assert_eq!(text_width("ppm", 1), 17);
        assert_eq!(text_width("", 2), 0);
    }

    #[test]
    fn ticks_are_nice() {
        let (t, d) = nice_ticks(-0.15, 0.15, 6);
        assert_eq!(d, 2);
        let labels: Vec<String> = t.iter().map(|v| format_tick(*v, d)).collect();
        assert_eq!(
            labels,
            ["-0.15", "-0.10", "-0.05", "0.00", "0.05", "0.10", "0.15"]
        );
        let (t, d) = nice_ticks(0.0, 1000.0, 5);
        assert_eq!((t, d), (vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0], 0));
        let (t, d) = nice_ticks(-0.15, 0.15, 5);
        assert_eq!((t, d), (vec![-0.1, 0.0, 0.1], 1));
        assert_eq!(log_label(1, -2), "0.01");
        assert_eq!(log_label(1, 3), "1000");
        assert_eq!(log_label(2, -5), "2e-5");
        // Log ticks: decades over [1e-3, 1e1]; 1-2-5 over [0.015, 0.7].
        let labels = |t: Vec<(f64, String)>| t.into_iter().map(|t| t.1).collect::<Vec<_>>();
        assert_eq!(
            labels(log_ticks(-3.0, 1.0)),
            ["0.001", "0.01", "0.1", "1", "10"]
        );
        let l = labels(log_ticks(0.015f64.log10(), 0.7f64.log10()));
        assert_eq!(l, ["0.02", "0.05", "0.1", "0.2", "0.5"]);
        assert_eq!(format_tick(-0.0001, 2), "0.00");
    }

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
