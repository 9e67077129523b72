//! Tick placement shared by colour bars and plot axes: "nice" linear ticks (1, 2, 5 ×
//! 10ⁿ steps) with their labels, and decade / 1-2-5 ticks on log axes.

/// "Nice" tick values (1, 2, 5 × 10ⁿ steps) covering [lo, hi], about `target` of them,
/// and the number of decimals that shows the step exactly.
pub(super) fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, usize) {
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

/// `v` with `decimals` decimals, never "-0.00".
pub(super) fn format_tick(v: f64, decimals: usize) -> String {
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
pub(super) fn log_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
