//! # dmqsm-worker: the DM-QSM score model on one device, served over gRPC
//!
//! A worker owns one device (the CPU or one GPU), loads one score model and evaluates
//! ε = ε_θ(x_t, t) and vector-Jacobian products Jᵀv on batches of cubic patches for the
//! coordinator (the `Worker` service of `proto/dmqsm.proto`). It also trains the model.
//!
//! Layout, one concept per module:
//! - [`device`]: `cpu` / `cuda:N`, thread settings, what libtorch sees.
//! - [`card`]: the model card JSON beside every model (the TorchScript contract).
//! - [`unet`]: the native 3D U-Net in `tch::nn`, safetensors I/O, tracing.
//! - [`torch_model`]: [`TorchModel`], libtorch models implementing
//!   [`ScoreModel`](dmqsm_common::diffusion::model::ScoreModel) with fixed micro-batches
//!   (bitwise batch invariance).
//! - [`simulated`]: a cheap deterministic backend with an optional fixed latency, for
//!   benchmarks and tests that do not need a network.
//! - [`batching`]: the request queue that coalesces requests on a dedicated model thread.
//! - [`service`]: the gRPC `Worker` service (validation, status codes).
//! - [`shared_memory`]: the shared-memory regions of same-host coordinators, through
//!   which patch tensors bypass the socket.
//! - [`server`]: [`serve`], [`spawn_local_worker`], client helpers, HTTP/2 settings.
//! - [`registration`]: registering with a coordinator and heartbeats.
//! - [`metrics`]: the Prometheus metrics (`dmqsm_worker_*`) over the queue's counters.
//! - [`train`]: denoising score matching on patches of χ maps or synthetic phantoms.
//!
//! Units: patches are in model units (χ_model = χ_ppm × chi_scale), timesteps are indices
//! 0 … T−1 of the model's training schedule carried as f32.

#![warn(missing_docs)]

pub mod batching;
pub mod card;
pub mod device;
pub mod error;
pub mod metrics;
pub mod registration;
pub mod server;
pub mod service;
pub mod shared_memory;
pub mod simulated;
pub mod torch_model;
pub mod train;
pub mod unet;

pub use card::{Architecture, ModelCard};
pub use device::DeviceSpec;
pub use error::{Result, WorkerError};
pub use server::{LocalWorker, ServedModel, ServerConfig, connect, serve, spawn_local_worker};
pub use simulated::SimulatedModel;
pub use torch_model::{EvalOptions, TorchModel};
pub use unet::{UNet3d, UNetConfig};
