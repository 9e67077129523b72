//! dmqsm-coordinator: jobs, patch-batch scheduling and checkpoints.
