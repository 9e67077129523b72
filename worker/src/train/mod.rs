//! `dmqsm-worker train`: denoising score matching for the native U-Net (DDPM
//! ε-prediction, Ho et al. 2020): with x₀ a training patch in model units
//! (χ_ppm × chi_scale), t ~ U{0, …, T−1}, ε ~ N(0, I) and
//! x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, minimise the mean of ‖ε_θ(x_t, t) − ε‖² over voxels.
//!
//! Data: patches of NIfTI χ maps or of freshly generated synthetic phantoms
//! ([`data`]), augmented with flips and the B0-respecting axis swap. Optimiser: AdamW
//! with linear learning-rate warm-up, gradient clipping, EMA of the weights
//! ([`optim`]). Periodic checkpoints and exact resume ([`checkpoint`]). Outputs in the
//! output directory:
//! - `model_raw.safetensors`, `model_ema.safetensors`, each with its card;
//! - `model.pt`: TorchScript of the EMA weights, with `model.card.json`;
//! - `loss.csv` (iteration, loss, learning rate) and `loss.png` (the loss curve);
//! - `checkpoint.json` + `checkpoint-<iteration>.safetensors`.

pub mod checkpoint;
pub mod data;
pub mod optim;

use crate::card::{ModelCard, TrainingSummary, card_path_for, sha256_file};
use crate::device::{DeviceSpec, configure_threads};
use crate::error::{Result, WorkerError, catch_torch};
use crate::torch_model::{EvalOptions, TorchModel};
use crate::unet::{UNet3d, UNetConfig, parameter_count, save_safetensors, seeded};
use checkpoint::TrainState;
use data::{Augmentation, PatchSet};
use dmqsm_common::diffusion::noise::fill_standard_normal;
use dmqsm_common::diffusion::schedule::{NoiseSchedule, ScheduleConfig};
use dmqsm_common::splitmix::{random_bits, stream_key};
use optim::{AdamW, AdamWConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Kind, Tensor, nn};

/// Stream offset of the per-iteration noise ε (stream = base + iteration).
const NOISE_STREAM_BASE: u64 = 1 << 62;
/// Stream offset of the per-iteration choices (patch, augmentation, timestep).
const CHOICE_STREAM_BASE: u64 = 1 << 63;

/// Where training patches come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataSource {
    /// `count` synthetic phantoms (`dmqsm_common::phantom`) with seeds
    /// `seed`, `seed + 1`, …
    Phantoms {
        /// Number of phantoms.
        count: usize,
        /// Matrix of each phantom.
        shape: [usize; 3],
        /// Voxel size in mm.
        voxel_size_mm: [f64; 3],
        /// Seed of the first phantom.
        seed: u64,
    },
    /// χ maps (ppm) in NIfTI files, with optional brain masks (same order).
    Nifti {
        /// χ maps.
        chi: Vec<PathBuf>,
        /// Masks (empty: background is χ = 0).
        masks: Vec<PathBuf>,
    },
}

/// Everything that defines a training run (stored in checkpoints; a resume must match
/// it except for `iterations` and `checkpoint_every`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Model id written to the cards.
    pub model_id: String,
    /// Training data.
    pub data: DataSource,
    /// Network.
    pub unet: UNetConfig,
    /// Patch edge P (DM-QSM: 48).
    pub patch_size: usize,
    /// Patch grid stride (DM-QSM: 30).
    pub stride: usize,
    /// Largest background fraction of a kept patch (DM-QSM: 0.8).
    pub max_background: f64,
    /// Noise schedule.
    pub schedule: ScheduleConfig,
    /// χ_model = χ_ppm × chi_scale.
    pub chi_scale: f64,
    /// Voxel axis along B0 (0, 1 or 2).
    pub b0_axis: usize,
    /// Flips and the B0-respecting swap.
    pub augment: bool,
    /// Total iterations.
    pub iterations: u64,
    /// Patches per iteration.
    pub batch_size: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Linear warm-up iterations (lr·k/warmup for k ≤ warmup).
    pub warmup: u64,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Global gradient-norm clip (0: off).
    pub grad_clip: f64,
    /// EMA decay.
    pub ema_decay: f64,
    /// Checkpoint every this many iterations (and at the end).
    pub checkpoint_every: u64,
    /// Seed of weights, patch choice, augmentation, timesteps and noise.
    pub seed: u64,
}

impl Default for TrainConfig {
    /// DM-QSM's data settings (48³ patches, stride 30, ≤ 80 % background) with the
    /// default U-Net, 16 phantoms of 160×192×160 at 1 mm, batch 4, lr 2e-4 with 500
    /// warm-up iterations, EMA 0.999, χ scale 5.
    fn default() -> Self {
        Self {
            model_id: "dmqsm-unet".into(),
            data: DataSource::Phantoms {
                count: 16,
                shape: [160, 192, 160],
                voxel_size_mm: [1.0; 3],
                seed: 0,
            },
            unet: UNetConfig::default(),
            patch_size: 48,
            stride: 30,
            max_background: 0.8,
            schedule: ScheduleConfig::default(),
            chi_scale: 5.0,
            b0_axis: 2,
            augment: true,
            iterations: 10_000,
            batch_size: 4,
            learning_rate: 2e-4,
            warmup: 500,
            adamw: AdamWConfig::default(),
            grad_clip: 1.0,
            ema_decay: 0.999,
            checkpoint_every: 500,
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// Checks the settings, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(WorkerError::Config(m));
        self.unet.validate(self.patch_size)?;
        NoiseSchedule::new(&self.schedule)?;
        if self.stride == 0 {
            return bad("stride must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.max_background) {
            return bad(format!(
                "max_background {} must lie in [0, 1]",
                self.max_background
            ));
        }
        if !(self.chi_scale.is_finite() && self.chi_scale > 0.0) {
            return bad(format!("chi_scale {} must be positive", self.chi_scale));
        }
        if self.b0_axis > 2 {
            return bad(format!("b0_axis {} must be 0, 1 or 2", self.b0_axis));
        }
        if self.batch_size == 0 || self.iterations == 0 || self.checkpoint_every == 0 {
            return bad("batch_size, iterations and checkpoint_every must be positive".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!(
                "learning rate {} must be positive",
                self.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad(format!("ema_decay {} must lie in [0, 1)", self.ema_decay));
        }
        if let DataSource::Nifti { chi, masks } = &self.data {
            if chi.is_empty() {
                return bad("no χ maps given".into());
            }
            if !masks.is_empty() && masks.len() != chi.len() {
                return bad(format!("{} masks for {} χ maps", masks.len(), chi.len()));
            }
        }
        if let DataSource::Phantoms { count, .. } = &self.data
            && *count == 0
        {
            return bad("at least one phantom is needed".into());
        }
        Ok(())
    }

    /// Learning rate at iteration k (1-based): linear warm-up, then constant.
    pub fn learning_rate_at(&self, k: u64) -> f64 {
        if self.warmup > 0 && k < self.warmup {
            self.learning_rate * k as f64 / self.warmup as f64
        } else {
            self.learning_rate
        }
    }

    /// The config with the fields a resume may change normalised away.
    fn resume_key(&self) -> Self {
        Self {
            iterations: 0,
            checkpoint_every: 0,
            ..self.clone()
        }
    }

    /// A one-line description of the training data for the model card.
    fn data_summary(&self, set: &PatchSet) -> String {
        let source = match &self.data {
            DataSource::Phantoms {
                count,
                shape,
                voxel_size_mm,
                seed,
            } => format!(
                "{count} synthetic phantoms {}x{}x{} at {:?} mm (seeds {seed}..{})",
                shape[0],
                shape[1],
                shape[2],
                voxel_size_mm,
                seed + *count as u64 - 1
            ),
            DataSource::Nifti { chi, .. } => format!("{} NIfTI χ maps", chi.len()),
        };
        format!(
            "{source}; {p}³ patches at stride {s} with ≤ {b:.0} % background: {n} of {c} \
             grid positions",
            p = self.patch_size,
            s = self.stride,
            b = self.max_background * 100.0,
            n = set.len(),
            c = set.candidates()
        )
    }
}

/// How to run training (not part of the run's definition).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Output directory (created if missing).
    pub out_dir: PathBuf,
    /// Continue from the checkpoint in `out_dir`.
    pub resume: bool,
    /// Device.
    pub device: DeviceSpec,
    /// libtorch intra-op threads.
    pub threads: Option<usize>,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop (after checkpointing) once this iteration is done, as if interrupted; the
    /// final model files are then not written.
    pub stop_after: Option<u64>,
}

/// What a training run produced.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// Iteration the run started from (0, or the checkpoint's).
    pub resumed_from: u64,
    /// Iterations completed in total.
    pub iterations: u64,
    /// Loss of every completed iteration (including those before a resume).
    pub losses: Vec<f32>,
    /// Training patches in the set.
    pub patches: usize,
    /// The TorchScript model (`None` when stopped early).
    pub torchscript: Option<PathBuf>,
    /// The EMA weights (`None` when stopped early).
    pub ema_weights: Option<PathBuf>,
}

/// A χ map (ppm) with its optional brain mask.
type MaskedMap = (ndarray::Array3<f32>, Option<ndarray::Array3<f32>>);

fn load_volumes(config: &TrainConfig) -> Result<Vec<MaskedMap>> {
    match &config.data {
        DataSource::Phantoms {
            count,
            shape,
            voxel_size_mm,
            seed,
        } => (0..*count as u64)
            .map(|i| {
                let cfg =
                    dmqsm_common::phantom::PhantomConfig::new(*shape, *voxel_size_mm, seed + i);
                let ph = dmqsm_common::phantom::generate(&cfg)?;
                Ok((ph.chi.data, Some(ph.mask.data)))
            })
            .collect(),
        DataSource::Nifti { chi, masks } => chi
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let v = dmqsm_common::nifti_io::read_nifti(path)?;
                let m = match masks.get(i) {
                    Some(mp) => {
                        let m = dmqsm_common::nifti_io::read_nifti(mp)?;
                        if m.shape() != v.shape() {
                            return Err(WorkerError::Config(format!(
                                "mask {} has shape {:?}, χ map {} {:?}",
                                mp.display(),
                                m.shape(),
                                path.display(),
                                v.shape()
                            )));
                        }
                        Some(m.data)
                    }
                    None => None,
                };
                Ok((v.data, m))
            })
            .collect(),
    }
}

/// One training batch: x_t, t and the target ε, a pure function of (config, data, k).
struct Batch {
    x: Vec<f32>,
    t: Vec<f32>,
    eps: Vec<f32>,
}

fn make_batch(config: &TrainConfig, data: &PatchSet, alpha_bars: &[f64], k: u64) -> Batch {
    let p = config.patch_size;
    let vox = p * p * p;
    let b = config.batch_size;
    let key = stream_key(config.seed, CHOICE_STREAM_BASE.wrapping_add(k));
    let mut x0 = vec![0f32; b * vox];
    let mut t = vec![0f32; b];
    let mut abar = vec![0f64; b];
    for j in 0..b {
        let idx = (random_bits(key, 3 * j as u64) % data.len() as u64) as usize;
        let aug = if config.augment {
            Augmentation::from_bits(random_bits(key, 3 * j as u64 + 1))
        } else {
            Augmentation::default()
        };
        let tj = (random_bits(key, 3 * j as u64 + 2) % alpha_bars.len() as u64) as usize;
        t[j] = tj as f32;
        abar[j] = alpha_bars[tj];
        data.write_patch(
            idx,
            aug,
            config.b0_axis,
            config.chi_scale as f32,
            &mut x0[j * vox..(j + 1) * vox],
        );
    }
    let mut eps = vec![0f32; b * vox];
    fill_standard_normal(config.seed, NOISE_STREAM_BASE.wrapping_add(k), 0, &mut eps);
    let mut x = x0;
    for j in 0..b {
        let (sa, sn) = (abar[j].sqrt() as f32, (1.0 - abar[j]).sqrt() as f32);
        for (xv, ev) in x[j * vox..(j + 1) * vox]
            .iter_mut()
            .zip(&eps[j * vox..(j + 1) * vox])
        {
            *xv = sa * *xv + sn * *ev;
        }
    }
    Batch { x, t, eps }
}

fn prefixed(prefix: &str, vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (format!("{prefix}.{n}"), t))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn restore(
    prefix: &str,
    vs: &nn::VarStore,
    named: &std::collections::BTreeMap<String, Tensor>,
) -> Result<()> {
    for (n, t) in vs.variables() {
        let key = format!("{prefix}.{n}");
        let src = named
            .get(&key)
            .ok_or_else(|| WorkerError::Card(format!("checkpoint lacks '{key}'")))?;
        tch::no_grad(|| t.shallow_clone().f_copy_(src))
            .map_err(|e| WorkerError::torch(&format!("restoring '{key}'"), e))?;
    }
    Ok(())
}

fn write_loss_files(dir: &Path, state: &TrainState) -> Result<()> {
    let mut csv = String::from("iteration,loss,learning_rate\n");
    for (i, (l, lr)) in state.losses.iter().zip(&state.learning_rates).enumerate() {
        csv.push_str(&format!("{},{l},{lr}\n", i + 1));
    }
    crate::card::write_atomic(&dir.join("loss.csv"), csv.as_bytes())?;
    crate::train::plot::write_loss_png(&dir.join("loss.png"), &state.losses)
}

mod plot;

/// Trains (see the module docs). With `options.resume` it continues from the
/// checkpoint in `options.out_dir`, which must have been written with the same config
/// (up to `iterations` and `checkpoint_every`).
pub fn train(config: &TrainConfig, options: &TrainOptions) -> Result<TrainReport> {
    config.validate()?;
    options.device.check_available()?;
    configure_threads(options.threads);
    let dir = &options.out_dir;
    std::fs::create_dir_all(dir).map_err(|e| WorkerError::io(dir, e))?;
    let schedule = NoiseSchedule::new(&config.schedule)?;
    let alpha_bars = schedule.alpha_bars().to_vec();
    let data = PatchSet::new(
        load_volumes(config)?,
        config.patch_size,
        config.stride,
        config.max_background,
    )?;
    if data.is_empty() {
        return Err(WorkerError::Config(format!(
            "no training patch left: all {} grid positions have more than {:.0} % background",
            data.candidates(),
            config.max_background * 100.0
        )));
    }
    let dev = options.device.to_tch();
    let (vs, net, mut ema_vs, ema_net) = catch_torch("building the U-Net", || {
        let (vs, net) = seeded(&config.unet, dev, config.seed);
        let mut ema_vs = nn::VarStore::new(dev);
        let ema_net = UNet3d::new(&ema_vs.root(), &config.unet);
        ema_vs
            .copy(&vs)
            .map_err(|e| WorkerError::torch("initialising the EMA", e))?;
        ema_vs.freeze();
        Ok((vs, net, ema_vs, ema_net))
    })?;
    let mut adam = AdamW::new(&vs, config.adamw);
    let mut state = TrainState {
        iteration: 0,
        config: config.clone(),
        losses: Vec::new(),
        learning_rates: Vec::new(),
        tensors: String::new(),
        tensors_sha256: String::new(),
    };
    if options.resume {
        let (saved, named) = checkpoint::load(dir)?;
        if saved.config.resume_key() != config.resume_key() {
            return Err(WorkerError::Config(format!(
                "the checkpoint in {} was written with a different configuration (only \
                 iterations and checkpoint_every may change on resume)",
                dir.display()
            )));
        }
        restore("model", &vs, &named)?;
        restore("ema", &ema_vs, &named)?;
        adam.load_state(&named)?;
        state.iteration = saved.iteration;
        state.losses = saved.losses;
        state.learning_rates = saved.learning_rates;
        tracing::info!(
            "resuming at iteration {} from {}",
            saved.iteration,
            dir.display()
        );
    }
    let resumed_from = state.iteration;

    let bar = if options.progress {
        let bar = indicatif::ProgressBar::new(config.iterations);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_position(state.iteration);

    let p = config.patch_size as i64;
    let b = config.batch_size as i64;
    let started = Instant::now();
    let first = state.iteration + 1;
    for k in first..=config.iterations {
        let batch = make_batch(config, &data, &alpha_bars, k);
        let lr = config.learning_rate_at(k);
        let loss = catch_torch("training step", || {
            let te = |e: tch::TchError| WorkerError::torch("training step", e);
            let x = Tensor::f_from_slice(&batch.x)
                .and_then(|x| x.f_view([b, 1, p, p, p]))
                .and_then(|x| x.f_to_device(dev))
                .map_err(te)?;
            let t = Tensor::f_from_slice(&batch.t)
                .and_then(|t| t.f_to_device(dev))
                .map_err(te)?;
            let target = Tensor::f_from_slice(&batch.eps)
                .and_then(|e| e.f_view([b, 1, p, p, p]))
                .and_then(|e| e.f_to_device(dev))
                .map_err(te)?;
            optim::zero_grad(&vs);
            let pred = net.forward(&x, &t);
            let loss = pred.f_mse_loss(&target, tch::Reduction::Mean).map_err(te)?;
            loss.f_backward().map_err(te)?;
            optim::clip_grad_norm(&vs, config.grad_clip)?;
            adam.step(&vs, k, lr)?;
            optim::ema_update(&ema_vs, &vs, optim::ema_decay(config.ema_decay, k))?;
            loss.f_to_kind(Kind::Float)
                .and_then(|l| l.f_double_value(&[]))
                .map_err(te)
        })?;
        if !loss.is_finite() {
            return Err(WorkerError::Model(format!(
                "the loss became {loss} at iteration {k}; lower the learning rate"
            )));
        }
        state.iteration = k;
        state.losses.push(loss as f32);
        state.learning_rates.push(lr);
        let done = (k - resumed_from) as f64;
        let recent = &state.losses[state.losses.len().saturating_sub(20)..];
        let mean = recent.iter().map(|&l| f64::from(l)).sum::<f64>() / recent.len() as f64;
        bar.set_message(format!(
            "loss {mean:.4}  {:.2} patches/s",
            done * config.batch_size as f64 / started.elapsed().as_secs_f64().max(1e-9)
        ));
        bar.set_position(k);
        let stop = options.stop_after == Some(k);
        if k % config.checkpoint_every == 0 || k == config.iterations || stop {
            let mut tensors = prefixed("model", &vs);
            tensors.extend(prefixed("ema", &ema_vs));
            tensors.extend(adam.state());
            catch_torch("writing a checkpoint", || {
                checkpoint::save(dir, &state, &tensors)
            })?;
            write_loss_files(dir, &state)?;
        }
        if stop {
            bar.abandon_with_message(format!("stopped after iteration {k}"));
            return Ok(TrainReport {
                resumed_from,
                iterations: k,
                losses: state.losses,
                patches: data.len(),
                torchscript: None,
                ema_weights: None,
            });
        }
    }
    bar.finish();
    if state.iteration == resumed_from {
        // Nothing new was trained (resume at or past `iterations`): keep the files.
        write_loss_files(dir, &state)?;
    }

    // Final outputs.
    let summary = |weights: &str| TrainingSummary {
        data: config.data_summary(&data),
        patches: data.len() as u64,
        iterations: state.iteration,
        batch_size: config.batch_size as u64,
        learning_rate: config.learning_rate,
        ema_decay: config.ema_decay,
        weights: weights.into(),
        final_loss: {
            let recent = &state.losses[state.losses.len().saturating_sub(20)..];
            recent.iter().map(|&l| f64::from(l)).sum::<f64>() / recent.len().max(1) as f64
        },
        augmentation: if config.augment {
            format!(
                "random flips of every axis; random swap of the two axes orthogonal to B0 \
                 (axis {})",
                config.b0_axis
            )
        } else {
            "none".into()
        },
        seed: config.seed,
    };
    let mut outputs = Vec::new();
    for (name, store, weights) in [("model_raw", &vs, "raw"), ("model_ema", &ema_vs, "ema")] {
        let path = dir.join(format!("{name}.safetensors"));
        catch_torch("saving weights", || save_safetensors(store, &path))?;
        let mut card = ModelCard::for_unet(
            config.model_id.clone(),
            &config.unet,
            config.patch_size,
            config.schedule.clone(),
            config.chi_scale,
            parameter_count(&vs),
            sha256_file(&path)?,
        );
        card.training = Some(summary(weights));
        card.save(&card_path_for(&path))?;
        outputs.push((path, card));
    }
    let (ema_path, ema_card) = outputs
        .pop()
        .ok_or_else(|| WorkerError::Model("no EMA output".into()))?;
    let options_eval = EvalOptions {
        threads: options.threads,
        ..EvalOptions::for_device(options.device)
    };
    let traced = TorchModel::from_unet(
        &mut ema_vs,
        &ema_net,
        ema_card,
        options.device,
        options_eval,
    )?;
    let ts_path = dir.join("model.pt");
    traced.save_torchscript(&ts_path)?;
    Ok(TrainReport {
        resumed_from,
        iterations: state.iteration,
        losses: state.losses,
        patches: data.len(),
        torchscript: Some(ts_path),
        ema_weights: Some(ema_path),
    })
}
