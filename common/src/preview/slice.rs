//! Slices of a volume: the three orthogonal views, nearest-neighbour resampling to
//! square pixels of the smallest voxel size (divided by the zoom) and the automatic zoom.
//! Image x runs along the view's horizontal voxel axis, image up along its vertical one.

use super::canvas::{Image, MAX_SIDE, Rgb};
use super::window::Window;
use crate::error::{Error, Result};
use crate::volume::Volume;

/// Colour of NaN/∞ voxels (magenta).
pub(super) const NAN_COLOUR: Rgb = [255, 0, 255];
/// Panels are magnified (automatic zoom) until at least this tall.
pub(super) const MIN_PANEL_PX: usize = 160;

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

/// Checks the volume and the slice position; returns the voxel slices pass through.
pub(super) fn slice_centre(
    vol: &Volume,
    slice: Option<[usize; 3]>,
    name: &str,
) -> Result<[usize; 3]> {
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
pub(super) fn slice_image(
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

/// Pixel size (mm) for volumes at `zoom` (0 = automatic).
pub(super) fn pixel_mm(vols: &[&Volume], views: &[View], zoom: usize) -> f64 {
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
