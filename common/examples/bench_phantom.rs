//! Timing of phantom generation, metrics and previews (Engineer B's modules).
//!
//! Run: `RAYON_NUM_THREADS=2 cargo run --release -p dmqsm-common --example bench_phantom`
//! (2 threads mimics the CI machine). Prints the median of several runs per case.

use dmqsm_common::metrics::{deep_grey_matter_regions, evaluate_with_labels};
use dmqsm_common::phantom::{PhantomConfig, generate};
use dmqsm_common::preview::{PreviewOptions, orthogonal_slices_png};
use std::time::Instant;

/// Median wall time (s) of `runs` calls of `f`.
fn median(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("rayon threads: {}", rayon::current_num_threads());
    for (shape, voxel, runs) in [
        ([64, 64, 64], [1.0; 3], 7),
        ([96, 112, 96], [2.0; 3], 5),
        ([160, 192, 160], [1.0; 3], 3),
    ] {
        let mut cfg = PhantomConfig::new(shape, voxel, 1);
        cfg.calcifications = 2;
        cfg.haemorrhages = 1;
        let t = median(runs, || {
            generate(&cfg).expect("phantom");
        });
        println!("phantom {shape:?} @ {voxel:?} mm: {t:.3} s");
    }
    let p = generate(&PhantomConfig::default())?;
    let recon = p.chi.like(p.chi.data.mapv(|v| 0.8 * v + 0.001));
    let regions = deep_grey_matter_regions();
    let t = median(3, || {
        evaluate_with_labels(&recon, &p.chi, &p.mask, &p.labels, &regions).expect("metrics");
    });
    println!("metrics 160x192x160 (RMSE … XSIM, deep GM): {t:.3} s");
    let t = median(5, || {
        orthogonal_slices_png(&p.chi, &PreviewOptions::default()).expect("png");
    });
    println!("orthogonal preview 160x192x160: {:.1} ms", t * 1e3);
    Ok(())
}
