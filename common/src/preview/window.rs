//! Display windows: the linear map from an image value (ppm for χ) to a grey level.

use crate::error::{Error, Result};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
