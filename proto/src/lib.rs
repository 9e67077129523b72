//! The dmqsm gRPC contract, shared by the coordinator and the workers.
//!
//! `proto/dmqsm.proto` is compiled once here (tonic + prost, vendored protoc). Besides the
//! generated types this crate holds the one piece of wire logic both sides need: packing
//! f32 tensors into little-endian bytes and back, in f32, bf16 or f16 ([`tensor`]), and
//! the conversions between wire enums/messages and the domain types of `dmqsm-common`
//! ([`convert`]). Both ends also share how a link is secured: bearer-token
//! authentication ([`auth`]) and TLS ([`transport`]), and the Prometheus `/metrics`
//! endpoint they both expose ([`metrics_http`]; each defines its own metric families),
//! and the same-host shared-memory data plane for patch tensors ([`shm`]).

/// Generated messages and services of package `dmqsm.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("dmqsm.v1");
}

pub mod auth;
pub mod convert;
pub mod metrics_http;
pub mod shm;
pub mod tensor;
pub mod transport;

/// Encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dmqsm_descriptor");

/// Default maximum gRPC message size (bytes) on both ends: 256 MiB, enough for a batch of
/// 64 f32 patches of 48³ with their cotangents. Configurable on both ends.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
