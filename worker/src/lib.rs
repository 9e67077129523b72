//! dmqsm-worker: the libtorch score model served over gRPC.
