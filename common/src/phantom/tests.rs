//! Tests of the phantom generator. Sizes are small (≤ 1 M voxels) to keep the suite fast.

use super::*;

/// A small phantom: 48 × 56 × 48 at 3.5 mm (true size, 168 × 196 × 168 mm FOV).
fn small(seed: u64) -> PhantomConfig {
    PhantomConfig::new([48, 56, 48], [3.5, 3.5, 3.5], seed)
}

#[test]
fn same_seed_is_bitwise_identical() {
    let mut cfg = small(42);
    cfg.calcifications = 2;
    cfg.haemorrhages = 1;
    let a = generate(&cfg).unwrap();
    let b = generate(&cfg).unwrap();
    assert_eq!(a.labels, b.labels);
    let bits = |p: &Phantom| p.chi.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(a.mask, b.mask);
    // The same on a single-thread pool: no result depends on the work split.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let c = pool.install(|| generate(&cfg).unwrap());
    assert_eq!(bits(&a), bits(&c));
    assert_eq!(a.labels, c.labels);
}

#[test]
fn different_seeds_differ() {
    let a = generate(&small(1)).unwrap();
    let b = generate(&small(2)).unwrap();
    let n = a.labels.len();
    let label_diff = Zip::from(&a.labels)
        .and(&b.labels)
        .fold(0usize, |s, x, y| s + usize::from(x != y));
    let chi_diff = Zip::from(&a.chi.data)
        .and(&b.chi.data)
        .fold(0usize, |s, x, y| s + usize::from(x != y));
    // Shapes move by ~1–2 mm, so a few % of labels change; texture and values change
    // nearly every brain voxel.
    assert!(
        label_diff > n / 100,
        "only {label_diff} of {n} labels differ"
    );
    let brain = a.mask.data.iter().filter(|&&m| m > 0.5).count();
    assert!(chi_diff > brain / 2, "only {chi_diff} χ voxels differ");
    // Nucleus values move with the seed (±20 % jitter).
    let gp_a = a.region_mean(Label::GlobusPallidus).unwrap();
    let gp_b = b.region_mean(Label::GlobusPallidus).unwrap();
    assert_ne!(gp_a, gp_b);
    // The vein paths move too.
    let veins = |p: &Phantom| {
        p.labels
            .indexed_iter()
            .filter(|(_, l)| **l == Label::Vein as u8)
            .map(|(i, _)| i)
            .collect::<std::collections::HashSet<_>>()
    };
    let (va, vb) = (veins(&a), veins(&b));
    let common = va.intersection(&vb).count();
    assert!(common < va.len().min(vb.len()), "vein voxels identical");
}

#[test]
fn labels_mask_and_chi_are_consistent() {
    let mut cfg = small(3);
    cfg.calcifications = 2;
    cfg.haemorrhages = 2;
    let p = generate(&cfg).unwrap();
    assert_eq!(p.chi.shape(), cfg.shape);
    assert_eq!(p.mask.shape(), cfg.shape);
    assert_eq!(p.labels.dim(), (48, 56, 48));
    assert_eq!(p.chi.voxel_size, cfg.voxel_size_mm);
    Zip::from(&p.labels)
        .and(&p.mask.data)
        .and(&p.chi.data)
        .for_each(|&l, &m, &c| {
            let label = Label::from_u8(l).expect("valid label");
            assert_eq!(m == 1.0, label.is_brain());
            assert!(m == 0.0 || m == 1.0);
            assert!(c.is_finite());
            if !label.is_brain() {
                assert_eq!(c, 0.0);
            }
        });
    // The brain sits inside the head, the head inside the field of view: the border of
    // the volume is background or extra-cerebral only.
    let [nx, ny, nz] = cfg.shape;
    for ((i, j, k), &l) in p.labels.indexed_iter() {
        if i == 0 || j == 0 || k == 0 || i == nx - 1 || j == ny - 1 {
            assert!(
                !Label::from_u8(l).unwrap().is_brain(),
                "brain at [{i},{j},{k}]"
            );
        }
        let _ = nz;
    }
    // Every label appears.
    for label in Label::ALL {
        assert!(p.count(label) > 0, "{} missing", label.name());
    }
    // Affine: voxel sizes on the diagonal, the FOV centre at the origin.
    for a in 0..3 {
        assert_eq!(p.chi.affine[a][a], 3.5);
        let centre = p.chi.affine[a][3] + p.chi.affine[a][a] * (cfg.shape[a] as f64 - 1.0) / 2.0;
        assert!(centre.abs() < 1e-12);
    }
}

#[test]
fn region_values_are_within_their_ranges() {
    // Bounds: base · (1 ± j) · (1 ± 2.5 c) for nuclei and veins, base · (1 ± j/2) ·
    // (1 ± 2.5 c) for other tissue (the texture is clipped at ±2.5); lesions per their
    // documented ranges. A 1e-6 slack covers the f32 rounding of χ.
    let mut cfg = small(5);
    cfg.calcifications = 3;
    cfg.haemorrhages = 2;
    let p = generate(&cfg).unwrap();
    let (j, c) = (cfg.value_jitter, cfg.texture_cov);
    for label in Label::ALL {
        let r = label.reference_chi_ppm();
        let (lo, hi) = match label {
            Label::Background | Label::ExtraCerebral => (0.0, 0.0),
            Label::Calcification => (r * 1.5 * (1.0 + 2.5 * c), r * 0.5 * (1.0 - 2.5 * c)),
            Label::Haemorrhage => (r * 0.6 * (1.0 - 2.5 * c), r * 1.6 * (1.0 + 2.5 * c)),
            l if l.is_deep_grey_matter() || l == Label::Vein => {
                let (a, b) = (
                    r * (1.0 - j) * (1.0 - 2.5 * c),
                    r * (1.0 + j) * (1.0 + 2.5 * c),
                );
                (a.min(b), a.max(b))
            }
            _ => {
                let (a, b) = (
                    r * (1.0 - j / 2.0) * (1.0 - 2.5 * c),
                    r * (1.0 + j / 2.0) * (1.0 + 2.5 * c),
                );
                (a.min(b), a.max(b))
            }
        };
        for (&l, &v) in p.labels.iter().zip(p.chi.data.iter()) {
            if l == label as u8 {
                let v = v as f64;
                assert!(
                    v >= lo - 1e-6 && v <= hi + 1e-6,
                    "{}: {v} outside [{lo}, {hi}]",
                    label.name()
                );
            }
        }
    }
    // Region means: white matter negative, grey matter and CSF near their references,
    // every deep nucleus well above grey matter (the contrast QSM is used for).
    let gm = p.region_mean(Label::GreyMatter).unwrap();
    let wm = p.region_mean(Label::WhiteMatter).unwrap();
    assert!(wm < -0.015 && wm > -0.045, "WM mean {wm}");
    assert!(gm > 0.01 && gm < 0.03, "GM mean {gm}");
    for n in Label::DEEP_GREY_MATTER {
        let m = p.region_mean(n).unwrap();
        assert!(m > gm + 0.02, "{} mean {m} vs GM {gm}", n.name());
    }
}

#[test]
fn texture_has_the_requested_variation() {
    // White matter is one big region, so its coefficient of variation is close to the
    // configured 20 % (the low-frequency field is not fully averaged over the brain, and
    // the value jitter is one number per region, so 12–30 % is accepted). With zero
    // texture and jitter, every region is exactly its reference value.
    let p = generate(&small(8)).unwrap();
    let wm: Vec<f64> = p
        .labels
        .iter()
        .zip(p.chi.data.iter())
        .filter(|(l, _)| **l == Label::WhiteMatter as u8)
        .map(|(_, &v)| v as f64)
        .collect();
    let m = wm.iter().sum::<f64>() / wm.len() as f64;
    let sd = (wm.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / wm.len() as f64).sqrt();
    let cov = sd / m.abs();
    assert!(cov > 0.12 && cov < 0.30, "WM CoV {cov}");

    let mut flat = small(8);
    flat.texture_cov = 0.0;
    flat.value_jitter = 0.0;
    let q = generate(&flat).unwrap();
    for (&l, &v) in q.labels.iter().zip(q.chi.data.iter()) {
        let r = Label::from_u8(l).unwrap().reference_chi_ppm() as f32;
        if !matches!(l, 14 | 15) {
            assert_eq!(v, r);
        }
    }
    // Same anatomy: texture and jitter do not move any boundary.
    assert_eq!(p.labels, q.labels);
}

/// Counts `label` voxels in the left (x < centre) and right halves.
fn sides(p: &Phantom, label: Label) -> (usize, usize) {
    let nx = p.labels.dim().0;
    let mut out = (0, 0);
    for ((i, _, _), &l) in p.labels.indexed_iter() {
        if l == label as u8 {
            if 2 * i + 1 < nx {
                out.0 += 1;
            } else {
                out.1 += 1;
            }
        }
    }
    out
}

#[test]
fn nuclei_present_at_any_voxel_size() {
    for (shape, voxel) in [
        ([96, 112, 96], [1.0, 1.0, 1.0]),   // 1 mm, brain shrunk to 0.65
        ([80, 96, 80], [2.0, 2.0, 2.0]),    // 2 mm, true size
        ([96, 112, 40], [1.25, 1.25, 3.0]), // anisotropic, shrunk to 0.76
        ([24, 28, 24], [4.0, 4.0, 4.0]),    // very coarse, shrunk to 0.65
    ] {
        let p = generate(&PhantomConfig::new(shape, voxel, 9)).unwrap();
        for n in Label::DEEP_GREY_MATTER {
            let (l, r) = sides(&p, n);
            assert!(
                l > 0 && r > 0,
                "{} missing at {shape:?} {voxel:?}: {l}/{r}",
                n.name()
            );
        }
        for n in [Label::Ventricle, Label::Vein, Label::GreyMatter, Label::Csf] {
            assert!(
                p.count(n) > 0,
                "{} missing at {shape:?} {voxel:?}",
                n.name()
            );
        }
    }
}

#[test]
fn any_resolution_samples_the_same_anatomy() {
    // Same field of view (192 × 224 × 192 mm, true size) at 4 mm and 2 mm: the brain and
    // putamen volumes (mm³) agree. Boundary voxels are the only difference, so the brain
    // (≈ 1.6 L, surface ≈ 0.1 m²) agrees to a few %, the small putamen to ~25 %.
    let a = generate(&PhantomConfig::new([48, 56, 48], [4.0; 3], 4)).unwrap();
    let b = generate(&PhantomConfig::new([96, 112, 96], [2.0; 3], 4)).unwrap();
    assert_eq!(a.scale, 1.0);
    assert_eq!(b.scale, 1.0);
    let vol = |p: &Phantom, mm3: f64| p.mask.data.iter().filter(|&&m| m > 0.5).count() as f64 * mm3;
    let (va, vb) = (vol(&a, 64.0), vol(&b, 8.0));
    assert!((va / vb - 1.0).abs() < 0.04, "brain {va} vs {vb} mm³");
    assert!(vb > 1.2e6 && vb < 2.2e6, "brain volume {vb} mm³");
    let pa = a.count(Label::Putamen) as f64 * 64.0;
    let pb = b.count(Label::Putamen) as f64 * 8.0;
    assert!((pa / pb - 1.0).abs() < 0.25, "putamen {pa} vs {pb} mm³");
}

#[test]
fn scale_fits_the_field_of_view() {
    // 64³ at 1 mm cannot hold a 148 mm brain box: it is shrunk to 64/184 (the tightest
    // axis, y: 172 + 2·6 mm) and still fits (no brain voxel on the border).
    let p = generate(&PhantomConfig::new([64, 64, 64], [1.0; 3], 0)).unwrap();
    assert!((p.scale - 64.0 / 184.0).abs() < 1e-12);
    for ((i, j, k), &m) in p.mask.data.indexed_iter() {
        if [i, j, k].iter().any(|&x| x == 0 || x == 63) {
            assert_eq!(m, 0.0, "brain on the border at [{i},{j},{k}]");
        }
    }
    // An explicit scale is used as given.
    let mut cfg = PhantomConfig::new([40, 40, 40], [2.0; 3], 0);
    cfg.head_scale = Some(0.4);
    assert_eq!(generate(&cfg).unwrap().scale, 0.4);
}

#[test]
fn lesions_have_their_signs_and_vanish_when_off() {
    let mut cfg = small(12);
    cfg.calcifications = 4;
    cfg.haemorrhages = 2;
    let p = generate(&cfg).unwrap();
    assert!(p.count(Label::Calcification) > 0);
    assert!(p.count(Label::Haemorrhage) > 0);
    assert!(p.region_mean(Label::Calcification).unwrap() < -0.05);
    assert!(p.region_mean(Label::Haemorrhage).unwrap() > 0.15);
    let mut off = small(12);
    off.veins = 0;
    off.sinuses = false;
    let q = generate(&off).unwrap();
    assert_eq!(q.count(Label::Calcification), 0);
    assert_eq!(q.count(Label::Haemorrhage), 0);
    assert_eq!(q.count(Label::Vein), 0);
    // More random veins paint more vein voxels.
    let mut many = small(12);
    many.veins = 60;
    assert!(generate(&many).unwrap().count(Label::Vein) > p.count(Label::Vein));
}

#[test]
fn bad_configs_are_rejected() {
    let ok = small(0);
    let cases: Vec<(PhantomConfig, &str)> = vec![
        (
            PhantomConfig {
                shape: [0, 10, 10],
                ..ok.clone()
            },
            "shape",
        ),
        (
            PhantomConfig {
                shape: [1, 10, 10],
                ..ok.clone()
            },
            "shape",
        ),
        (
            PhantomConfig {
                shape: [100_000, 100_000, 100],
                ..ok.clone()
            },
            "exceeds",
        ),
        (
            PhantomConfig {
                shape: [usize::MAX, 2, 2],
                ..ok.clone()
            },
            "exceeds",
        ),
        (
            PhantomConfig {
                voxel_size_mm: [1.0, -1.0, 1.0],
                ..ok.clone()
            },
            "voxel size",
        ),
        (
            PhantomConfig {
                voxel_size_mm: [1.0, f64::NAN, 1.0],
                ..ok.clone()
            },
            "voxel size",
        ),
        (
            PhantomConfig {
                voxel_size_mm: [0.0, 1.0, 1.0],
                ..ok.clone()
            },
            "voxel size",
        ),
        (
            PhantomConfig {
                texture_cov: 0.5,
                ..ok.clone()
            },
            "texture_cov",
        ),
        (
            PhantomConfig {
                texture_cov: f64::NAN,
                ..ok.clone()
            },
            "texture_cov",
        ),
        (
            PhantomConfig {
                value_jitter: -0.1,
                ..ok.clone()
            },
            "value_jitter",
        ),
        (
            PhantomConfig {
                head_scale: Some(0.0),
                ..ok.clone()
            },
            "head_scale",
        ),
        (
            PhantomConfig {
                head_scale: Some(f64::INFINITY),
                ..ok.clone()
            },
            "head_scale",
        ),
        (
            PhantomConfig {
                veins: 5000,
                ..ok.clone()
            },
            "counts",
        ),
    ];
    for (cfg, needle) in cases {
        let err = generate(&cfg).unwrap_err().to_string();
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    }
}

#[test]
fn labels_round_trip_and_table_is_ordered() {
    for (i, l) in Label::ALL.iter().enumerate() {
        assert_eq!(*l as usize, i);
        assert_eq!(Label::from_u8(i as u8), Some(*l));
        assert_eq!(SUSCEPTIBILITY_TABLE[i].0, *l);
    }
    assert_eq!(Label::from_u8(LABEL_COUNT as u8), None);
    assert_eq!(Label::GlobusPallidus.reference_chi_ppm(), 0.19);
    assert_eq!(Label::WhiteMatter.reference_chi_ppm(), -0.030);
    assert!(Label::Putamen.is_deep_grey_matter() && !Label::Vein.is_deep_grey_matter());
}

#[test]
fn config_serialises_with_defaults() {
    let cfg: PhantomConfig = serde_json::from_str(r#"{"seed": 7, "shape": [32, 32, 32]}"#).unwrap();
    assert_eq!(cfg.seed, 7);
    assert_eq!(cfg.veins, PhantomConfig::default().veins);
    let back: PhantomConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
}
