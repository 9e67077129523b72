//! Integration of the physics core on a synthetic brain: the noise-free field of a
//! phantom, inverted with TKD and closed-form L2, must beat the zero map and recover the
//! signs and the ordering of the deep grey-matter nuclei.

use dmqsm_common::Volume;
use dmqsm_common::geometry::B0Direction;
use dmqsm_common::inversion::{l2, tkd};
use dmqsm_common::metrics;
use dmqsm_common::phantom::{self, Label, Phantom, PhantomConfig};
use dmqsm_common::simulate;

fn phantom() -> Phantom {
    // 1.5 mm keeps the red nucleus and substantia nigra several voxels wide.
    phantom::generate(&PhantomConfig::new([112, 128, 112], [1.5, 1.5, 1.5], 1234)).unwrap()
}

fn region_mean(v: &Volume, p: &Phantom, label: Label) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for (x, l) in v.data.iter().zip(p.labels.iter()) {
        if *l == label as u8 {
            s += *x as f64;
            n += 1;
        }
    }
    assert!(n > 0, "{label:?} missing from the phantom");
    s / n as f64
}

const NUCLEI: [Label; 7] = [
    Label::GlobusPallidus,
    Label::Putamen,
    Label::Caudate,
    Label::Thalamus,
    Label::RedNucleus,
    Label::SubstantiaNigra,
    Label::DentateNucleus,
];

#[test]
fn tkd_and_l2_beat_zero_and_order_the_nuclei() {
    let p = phantom();
    let b0 = B0Direction::new([0.0, 0.0, 1.0]).unwrap();
    let mut field = simulate::forward_field(&p.chi, b0).unwrap();
    field.data.zip_mut_with(&p.mask.data, |f, m| *f *= *m);
    let zero = p.chi.like(p.chi.data.mapv(|_| 0.0));
    let zero_m = metrics::evaluate(&zero, &p.chi, &p.mask).unwrap();
    // The zero map's demeaned NRMSE is exactly 100 %.
    assert!((zero_m.nrmse - 100.0).abs() < 1e-6);

    for (name, mut chi) in [
        ("TKD", tkd::tkd(&field, b0, 0.1).unwrap()),
        ("L2", l2::l2(&field, b0, 0.1).unwrap()),
    ] {
        chi.data.zip_mut_with(&p.mask.data, |c, m| *c *= *m);
        let m = metrics::evaluate(&chi, &p.chi, &p.mask).unwrap();
        // Beat the zero map clearly: both methods land near 40–60 % on this phantom.
        assert!(m.nrmse < 70.0, "{name}: NRMSE {} not below 70 %", m.nrmse);
        assert!(
            m.hfen < zero_m.hfen,
            "{name}: HFEN {} vs zero {}",
            m.hfen,
            zero_m.hfen
        );
        assert!(m.cc > 0.8, "{name}: CC {}", m.cc);

        // Signs, relative to white matter (a local field fixes χ only up to a constant):
        // every nucleus is paramagnetic with respect to white matter.
        let wm = region_mean(&chi, &p, Label::WhiteMatter);
        for l in NUCLEI {
            let r = region_mean(&chi, &p, l);
            assert!(
                r > wm,
                "{name}: {l:?} mean {r:.4} not above white matter {wm:.4}"
            );
        }
        // Ordering: any two nuclei whose true means differ by more than 0.03 ppm keep their
        // order (TKD/L2 underestimate χ, but monotonically; closer pairs may swap from
        // streaking and partial volume).
        for a in NUCLEI {
            for b in NUCLEI {
                let (ta, tb) = (region_mean(&p.chi, &p, a), region_mean(&p.chi, &p, b));
                if ta - tb > 0.03 {
                    let (ra, rb) = (region_mean(&chi, &p, a), region_mean(&chi, &p, b));
                    assert!(
                        ra > rb,
                        "{name}: {a:?} (truth {ta:.3}, recon {ra:.3}) should exceed {b:?} (truth {tb:.3}, recon {rb:.3})"
                    );
                }
            }
        }
    }
}
