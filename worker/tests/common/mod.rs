//! Fixtures shared by the worker's integration tests.
#![allow(dead_code)]

use dmqsm_common::diffusion::noise::fill_standard_normal;
use dmqsm_common::diffusion::schedule::ScheduleConfig;
use dmqsm_worker::card::ModelCard;
use dmqsm_worker::unet::{UNetConfig, seeded};
use dmqsm_worker::{DeviceSpec, EvalOptions, TorchModel};
use ndarray::Array4;

/// Patch edge of the tiny test models.
pub const P: usize = 8;

/// `[b, p, p, p]` standard-normal values, a pure function of `seed`.
pub fn randn(b: usize, p: usize, seed: u64) -> Array4<f32> {
    let mut v = vec![0f32; b * p * p * p];
    fill_standard_normal(seed, 7, 0, &mut v);
    Array4::from_shape_vec((b, p, p, p), v).unwrap()
}

/// Timestep indices spread over the schedule.
pub fn timesteps(b: usize) -> Vec<f32> {
    (0..b).map(|i| ((i * 373 + 11) % 1000) as f32).collect()
}

/// A card for a tiny U-Net at patch size `p`.
pub fn tiny_card(p: usize) -> ModelCard {
    ModelCard::for_unet(
        "tiny-test-unet",
        &UNetConfig::tiny(),
        p,
        ScheduleConfig::default(),
        5.0,
        0,
        "",
    )
}

/// A tiny traced U-Net (widths 4/8, attention) on the CPU, weights from `seed`, libtorch's
/// thread setting left alone.
pub fn tiny_model(p: usize, eval_batch: usize, seed: u64) -> TorchModel {
    let (mut vs, net) = seeded(&UNetConfig::tiny(), tch::Device::Cpu, seed);
    let options = EvalOptions {
        eval_batch,
        bf16: false,
        threads: None,
    };
    TorchModel::from_unet(&mut vs, &net, tiny_card(p), DeviceSpec::Cpu, options).unwrap()
}
