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
//!
//! Layout, one concept per module: `window` (value → grey level), `canvas` (the RGB
//! raster and PNG encoding), `text` (the bitmap font), `ticks` (axis and colour-bar tick
//! placement), `slice` (views and nearest-neighbour slice extraction), `panels` (grids of
//! slices with colour bars: [`orthogonal_slices_png`], [`panel_row_png`]) and `plot`
//! ([`line_plot_png`]).

mod canvas;
mod panels;
mod plot;
mod slice;
mod text;
mod ticks;
mod window;

#[cfg(test)]
mod testutil;

pub use panels::{Panel, PreviewOptions, RowOptions, orthogonal_slices_png, panel_row_png};
pub use plot::{PlotOptions, Series, line_plot_png};
pub use slice::View;
pub use window::Window;
