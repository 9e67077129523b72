//! The RGB raster every preview is drawn on: pixels, filled rectangles, 1-px lines, image
//! blits and PNG encoding (8-bit RGB). Text drawing is in `text`.

use crate::error::{Error, Result};

/// An 8-bit RGB colour.
pub(super) type Rgb = [u8; 3];

/// Outer margin of every preview, in pixels.
pub(super) const MARGIN: usize = 8;
/// Gap between panels, labels and blocks, in pixels.
pub(super) const GAP: usize = 6;
/// Background of slice previews (black).
pub(super) const BG: Rgb = [0, 0, 0];
/// Text and tick colour of slice previews (light grey).
pub(super) const FG: Rgb = [230, 230, 230];
/// Largest accepted image, in pixels per side.
pub(super) const MAX_SIDE: usize = 8192;

/// An RGB raster.
#[derive(Debug, Clone)]
pub(super) struct Canvas {
    pub(super) w: usize,
    pub(super) h: usize,
    pub(super) px: Vec<u8>,
}

/// A placed rectangle (x, y, w, h) in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rect {
    pub(super) x: usize,
    pub(super) y: usize,
    pub(super) w: usize,
    pub(super) h: usize,
}

impl Canvas {
    /// A `w` × `h` canvas filled with `bg`; errors with [`Error::Parameter`] unless both
    /// sides are in 1 … [`MAX_SIDE`].
    pub(super) fn new(w: usize, h: usize, bg: Rgb) -> Result<Self> {
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

    /// Sets pixel (x, y) to `c`; pixels outside the canvas are ignored.
    pub(super) fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let o = (y as usize * self.w + x as usize) * 3;
            self.px[o..o + 3].copy_from_slice(&c);
        }
    }

    /// The colour of pixel (x, y) (tests only; panics outside the canvas).
    #[cfg(test)]
    pub(super) fn get(&self, x: usize, y: usize) -> Rgb {
        let o = (y * self.w + x) * 3;
        [self.px[o], self.px[o + 1], self.px[o + 2]]
    }

    /// Fills `r` with `c` (clipped to the canvas).
    pub(super) fn fill(&mut self, r: Rect, c: Rgb) {
        for y in r.y..r.y + r.h {
            for x in r.x..r.x + r.w {
                self.set(x as i64, y as i64, c);
            }
        }
    }

    /// Copies `img` with its top-left corner at (x0, y0) (clipped to the canvas).
    pub(super) fn blit(&mut self, x0: usize, y0: usize, img: &Image) {
        for y in 0..img.h {
            for x in 0..img.w {
                self.set((x0 + x) as i64, (y0 + y) as i64, img.px[y * img.w + x]);
            }
        }
    }

    /// A 1-px line (Bresenham).
    pub(super) fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
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

    /// The canvas as PNG bytes (8-bit RGB).
    pub(super) fn encode(&self) -> Result<Vec<u8>> {
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

/// An RGB image of one slice.
#[derive(Debug, Clone)]
pub(super) struct Image {
    pub(super) w: usize,
    pub(super) h: usize,
    pub(super) px: Vec<Rgb>,
}
