//! Training: a few iterations on tiny phantoms lower the loss; a run stopped at a
//! checkpoint and resumed ends bit-identical to an uninterrupted run.

use dmqsm_common::diffusion::schedule::ScheduleConfig;
use dmqsm_worker::card::sha256_file;
use dmqsm_worker::train::optim::AdamWConfig;
use dmqsm_worker::train::{DataSource, TrainConfig, TrainOptions, train};
use dmqsm_worker::{DeviceSpec, EvalOptions, TorchModel, UNetConfig};
use std::path::Path;
use std::sync::Mutex;

/// libtorch's random generator is process-wide: model initialisation seeds it
/// (`tch::manual_seed`) and then draws from it. Tests that train run one at a time, so a
/// parallel test cannot reseed it between another's seeding and drawing.
static TORCH_RNG: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    TORCH_RNG.lock().unwrap_or_else(|p| p.into_inner())
}

fn tiny_config(iterations: u64) -> TrainConfig {
    TrainConfig {
        model_id: "tiny-train".into(),
        data: DataSource::Phantoms {
            count: 2,
            shape: [32, 32, 32],
            voxel_size_mm: [2.0; 3],
            seed: 4,
        },
        unet: UNetConfig::tiny(),
        patch_size: 16,
        stride: 8,
        max_background: 0.8,
        schedule: ScheduleConfig::default(),
        chi_scale: 5.0,
        b0_axis: 2,
        augment: true,
        iterations,
        batch_size: 2,
        learning_rate: 3e-3,
        warmup: 5,
        adamw: AdamWConfig::default(),
        grad_clip: 1.0,
        ema_decay: 0.99,
        checkpoint_every: 10,
        seed: 3,
    }
}

fn options(dir: &Path) -> TrainOptions {
    TrainOptions {
        out_dir: dir.to_path_buf(),
        resume: false,
        device: DeviceSpec::Cpu,
        threads: Some(1),
        progress: false,
        stop_after: None,
    }
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len() as f32
}

/// 40 iterations on two 32³ phantoms (P = 16, widths 4/8): the mean ε-MSE of the last
/// 10 iterations is below that of the first 10 (the batches are different draws, so the
/// comparison is between window means), and every output file is written and loadable.
#[test]
fn training_lowers_the_loss_and_writes_a_servable_model() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let report = train(&tiny_config(40), &options(dir.path())).unwrap();
    assert_eq!(report.iterations, 40);
    assert!(report.patches > 0);
    let (first, last) = (mean(&report.losses[..10]), mean(&report.losses[30..]));
    println!(
        "loss: first 10 {first:.4}, last 10 {last:.4}; {} patches",
        report.patches
    );
    assert!(last < first, "loss did not decrease: {first} → {last}");
    for f in [
        "model.pt",
        "model.card.json",
        "model_ema.safetensors",
        "model_ema.card.json",
        "model_raw.safetensors",
        "model_raw.card.json",
        "loss.csv",
        "loss.png",
        "checkpoint.json",
    ] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    let csv = std::fs::read_to_string(dir.path().join("loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 41);
    let ts = TorchModel::load(
        &dir.path().join("model.pt"),
        DeviceSpec::Cpu,
        EvalOptions::for_device(DeviceSpec::Cpu),
    )
    .unwrap();
    let ema = TorchModel::load(
        &dir.path().join("model_ema.safetensors"),
        DeviceSpec::Cpu,
        EvalOptions::for_device(DeviceSpec::Cpu),
    )
    .unwrap();
    assert_eq!(
        ts.card().weights_sha256,
        sha256_file(&dir.path().join("model_ema.safetensors")).unwrap()
    );
    assert_eq!(ts.card().weights_sha256, ema.card().weights_sha256);
    let summary = ts.card().training.clone().unwrap();
    assert_eq!((summary.iterations, summary.weights.as_str()), (40, "ema"));
}

/// Stopping after iteration 3 (checkpoint) and resuming to 6 gives exactly the weights,
/// EMA and losses of an uninterrupted 6-iteration run (bitwise: same files). Resuming
/// with a changed configuration is refused.
#[test]
fn resume_continues_exactly_from_the_checkpoint() {
    let _serial = serial();
    let mut config = tiny_config(6);
    config.checkpoint_every = 3;
    let straight = tempfile::tempdir().unwrap();
    let a = train(&config, &options(straight.path())).unwrap();

    let split = tempfile::tempdir().unwrap();
    let mut stop = options(split.path());
    stop.stop_after = Some(3);
    let first = train(&config, &stop).unwrap();
    assert_eq!((first.iterations, first.torchscript.clone()), (3, None));
    let mut resume = options(split.path());
    resume.resume = true;
    let b = train(&config, &resume).unwrap();
    assert_eq!((b.resumed_from, b.iterations), (3, 6));
    assert_eq!(a.losses, b.losses);
    for f in ["model_raw.safetensors", "model_ema.safetensors"] {
        assert_eq!(
            sha256_file(&straight.path().join(f)).unwrap(),
            sha256_file(&split.path().join(f)).unwrap(),
            "{f}"
        );
    }

    let mut changed = config.clone();
    changed.learning_rate *= 2.0;
    let err = train(&changed, &resume).unwrap_err().to_string();
    assert!(err.contains("different configuration"), "{err}");
}

/// Training from NIfTI χ maps and masks sees exactly the data of the phantom source they
/// were written from (NIfTI stores f32 exactly): same patch count and bitwise the same
/// losses.
#[test]
fn nifti_source_matches_phantom_source() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(3);
    config.data = DataSource::Phantoms {
        count: 1,
        shape: [32, 32, 32],
        voxel_size_mm: [2.0; 3],
        seed: 9,
    };
    let from_phantom = train(&config, &options(&dir.path().join("a"))).unwrap();

    let ph = dmqsm_common::phantom::generate(&dmqsm_common::phantom::PhantomConfig::new(
        [32, 32, 32],
        [2.0; 3],
        9,
    ))
    .unwrap();
    let chi = dir.path().join("chi.nii.gz");
    let mask = dir.path().join("mask.nii");
    dmqsm_common::nifti_io::write_nifti(&chi, &ph.chi).unwrap();
    dmqsm_common::nifti_io::write_nifti(&mask, &ph.mask).unwrap();
    config.data = DataSource::Nifti {
        chi: vec![chi],
        masks: vec![mask],
    };
    let from_nifti = train(&config, &options(&dir.path().join("b"))).unwrap();
    assert_eq!(from_phantom.patches, from_nifti.patches);
    assert_eq!(from_phantom.losses, from_nifti.losses);
}
