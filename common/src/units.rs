//! Field units: ppm ↔ Hz ↔ rad.
//!
//! The local field is handled in ppm of B0 throughout dmqsm (the unit of χ). Scanners and
//! other tools give it in Hz (frequency offset) or rad (phase accumulated at echo time TE).
//! Conventions (REFERENCE.md §4, qsm-forward):
//! - Hz = ppm · γ̄ · B0, with γ̄ = [`GAMMA_BAR_MHZ_PER_T`] (MHz/T) and B0 in T
//!   (1 ppm = 127.73 Hz at 3 T);
//! - rad = 2π · Hz · TE, with TE in s.

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// Proton gyromagnetic ratio γ/2π in MHz/T (CODATA 2018: 42.577 478 92 MHz/T).
pub const GAMMA_BAR_MHZ_PER_T: f64 = 42.577_478_92;

/// The unit a field map is expressed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldUnit {
    /// Parts per million of B0 (dimensionless × 10⁶); dmqsm's internal unit.
    Ppm,
    /// Frequency offset in Hz.
    Hz,
    /// Phase in radians accumulated at echo time TE.
    Rad,
}

impl FieldUnit {
    /// The canonical lower-case name ("ppm", "hz", "rad").
    pub fn as_str(self) -> &'static str {
        match self {
            FieldUnit::Ppm => "ppm",
            FieldUnit::Hz => "hz",
            FieldUnit::Rad => "rad",
        }
    }
}

impl fmt::Display for FieldUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FieldUnit {
    type Err = Error;

    /// Parses "ppm", "hz" or "rad" (case-insensitive; "radian(s)" also accepted).
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ppm" => Ok(FieldUnit::Ppm),
            "hz" => Ok(FieldUnit::Hz),
            "rad" | "radian" | "radians" => Ok(FieldUnit::Rad),
            other => Err(Error::Parameter(format!(
                "unknown field unit {other:?}: expected one of \"ppm\", \"hz\", \"rad\""
            ))),
        }
    }
}

/// Acquisition parameters needed to convert between field units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FieldScale {
    /// Main field strength B0 in T (must be finite and > 0).
    pub b0_tesla: f64,
    /// Echo time in s; required only for conversions involving [`FieldUnit::Rad`].
    pub te_seconds: Option<f64>,
}

impl FieldScale {
    /// A scale for B0 (T) and an optional echo time (s), validated.
    pub fn new(b0_tesla: f64, te_seconds: Option<f64>) -> Result<Self> {
        if !(b0_tesla.is_finite() && b0_tesla > 0.0) {
            return Err(Error::Parameter(format!(
                "B0 must be a finite positive field strength in T, got {b0_tesla}"
            )));
        }
        if let Some(te) = te_seconds
            && !(te.is_finite() && te > 0.0)
        {
            return Err(Error::Parameter(format!(
                "echo time must be a finite positive time in s, got {te}"
            )));
        }
        Ok(Self {
            b0_tesla,
            te_seconds,
        })
    }

    /// Hz per ppm at this B0: γ̄ · B0 (e.g. 127.73 at 3 T).
    pub fn hz_per_ppm(&self) -> f64 {
        GAMMA_BAR_MHZ_PER_T * self.b0_tesla
    }

    /// How many units of `unit` make 1 ppm. Errors for rad without an echo time.
    pub fn per_ppm(&self, unit: FieldUnit) -> Result<f64> {
        match unit {
            FieldUnit::Ppm => Ok(1.0),
            FieldUnit::Hz => Ok(self.hz_per_ppm()),
            FieldUnit::Rad => {
                let te = self.te_seconds.ok_or_else(|| {
                    Error::Parameter(
                        "converting to or from rad needs the echo time TE (s)".to_string(),
                    )
                })?;
                Ok(2.0 * std::f64::consts::PI * self.hz_per_ppm() * te)
            }
        }
    }

    /// The factor f such that value_in_`to` = f · value_in_`from`.
    pub fn factor(&self, from: FieldUnit, to: FieldUnit) -> Result<f64> {
        if from == to {
            return Ok(1.0);
        }
        Ok(self.per_ppm(to)? / self.per_ppm(from)?)
    }

    /// Converts one value from `from` to `to`.
    pub fn convert(&self, value: f64, from: FieldUnit, to: FieldUnit) -> Result<f64> {
        Ok(value * self.factor(from, to)?)
    }
}

/// Converts ppm to Hz at `b0_tesla` (T).
pub fn ppm_to_hz(ppm: f64, b0_tesla: f64) -> f64 {
    ppm * GAMMA_BAR_MHZ_PER_T * b0_tesla
}

/// Converts Hz to ppm at `b0_tesla` (T).
pub fn hz_to_ppm(hz: f64, b0_tesla: f64) -> f64 {
    hz / (GAMMA_BAR_MHZ_PER_T * b0_tesla)
}

/// Converts Hz to phase in rad at echo time `te_seconds` (s).
pub fn hz_to_rad(hz: f64, te_seconds: f64) -> f64 {
    2.0 * std::f64::consts::PI * hz * te_seconds
}

/// Converts phase in rad at echo time `te_seconds` (s) to Hz.
pub fn rad_to_hz(rad: f64, te_seconds: f64) -> f64 {
    rad / (2.0 * std::f64::consts::PI * te_seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// REFERENCE.md §4: 1 ppm = 127.74 Hz at 3 T (with γ̄ rounded to 42.58); to 0.01 Hz
    /// with the exact constant (127.7324).
    #[test]
    fn one_ppm_at_3t() {
        assert!((ppm_to_hz(1.0, 3.0) - 127.7324).abs() < 1e-3);
        let s = FieldScale::new(3.0, None).unwrap();
        assert!((s.convert(127.7324, FieldUnit::Hz, FieldUnit::Ppm).unwrap() - 1.0).abs() < 1e-5);
    }

    /// Round trips through every unit pair are exact to rounding (1e-12 relative).
    #[test]
    fn round_trips() {
        let s = FieldScale::new(7.0, Some(0.02)).unwrap();
        let units = [FieldUnit::Ppm, FieldUnit::Hz, FieldUnit::Rad];
        for &a in &units {
            for &b in &units {
                let v = 0.37;
                let w = s.convert(s.convert(v, a, b).unwrap(), b, a).unwrap();
                assert!((w - v).abs() < 1e-12 * v.abs());
            }
        }
        // rad = 2π · ppm · γ̄ · B0 · TE (qsm-forward).
        let rad = s.convert(1.0, FieldUnit::Ppm, FieldUnit::Rad).unwrap();
        let expect = 2.0 * std::f64::consts::PI * GAMMA_BAR_MHZ_PER_T * 7.0 * 0.02;
        assert!((rad - expect).abs() < 1e-12 * expect);
        assert!((hz_to_rad(rad_to_hz(1.5, 0.01), 0.01) - 1.5).abs() < 1e-12);
        assert!((hz_to_ppm(ppm_to_hz(0.1, 3.0), 3.0) - 0.1).abs() < 1e-15);
    }

    #[test]
    fn parse_and_errors() {
        assert_eq!("PPM".parse::<FieldUnit>().unwrap(), FieldUnit::Ppm);
        assert_eq!(" hz ".parse::<FieldUnit>().unwrap(), FieldUnit::Hz);
        assert_eq!("rad".parse::<FieldUnit>().unwrap(), FieldUnit::Rad);
        let e = "tesla".parse::<FieldUnit>().unwrap_err().to_string();
        assert!(e.contains("tesla") && e.contains("ppm"), "{e}");
        assert!(FieldScale::new(0.0, None).is_err());
        assert!(FieldScale::new(3.0, Some(f64::NAN)).is_err());
        let s = FieldScale::new(3.0, None).unwrap();
        let e = s
            .factor(FieldUnit::Ppm, FieldUnit::Rad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("echo time"), "{e}");
        assert_eq!(FieldUnit::Hz.to_string(), "hz");
    }
}
