//! [`ComputePool`]: the CPU threads of the coordinator's own numerics.
//!
//! A step's volume math (reassembly, x̂₀, the DPS gradient and update, the FFTs of the
//! physics tasks), building a job's problem and writing its results run off the async
//! reactor (tokio's blocking pool), with their parallel loops on this pool; file and
//! store I/O runs off the reactor too ([`blocking`]), but never on it. `dmqsm serve
//! --threads N` sizes it, so that on a GPU node the coordinator can be given N cores and
//! the workers the rest; without it, the loops use rayon's global pool (one thread per
//! core). The thread count changes no result: every parallel reduction in the sampler
//! uses fixed chunks (see `dmqsm_common::diffusion::sampler`).

use crate::error::{CoordinatorError, Result};
use std::sync::Arc;

/// The threads the coordinator's numerics run on (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct ComputePool {
    /// A pool of its own; `None`: rayon's global pool.
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl ComputePool {
    /// A pool of `threads` threads, or rayon's global pool for `None`. Errors on 0
    /// threads or when the threads cannot be started.
    pub fn new(threads: Option<usize>) -> Result<Self> {
        let pool = match threads {
            None => None,
            Some(0) => {
                return Err(CoordinatorError::Config(
                    "compute threads must be at least 1 (--threads)".into(),
                ));
            }
            Some(n) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("dmqsm-compute-{i}"))
                    .build()
                    .map_err(|e| {
                        CoordinatorError::Config(format!("cannot start {n} compute threads: {e}"))
                    })?,
            )),
        };
        Ok(Self { pool })
    }

    /// Runs `f` off the async reactor, its parallel loops on this pool; `what` names it
    /// in the error should it panic.
    pub async fn run<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let pool = self.pool.clone();
        blocking(what, move || match pool {
            Some(p) => p.install(f),
            None => f(),
        })
        .await
    }
}

/// Runs `f` on tokio's blocking threads, outside the compute pool: for file and store
/// I/O (reading inputs, writing checkpoints), which must not hold a compute thread
/// while it waits. `what` names it in the error should it panic.
pub async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CoordinatorError::Store(format!("{what} panicked: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loops_run_on_the_pool_of_the_asked_size() {
        let pool = ComputePool::new(Some(3)).unwrap();
        let seen = pool
            .run("probe", || Ok(rayon::current_num_threads()))
            .await
            .unwrap();
        assert_eq!(seen, 3);
        let global = ComputePool::new(None).unwrap();
        let seen = global
            .run("probe", || Ok(rayon::current_num_threads()))
            .await
            .unwrap();
        assert_eq!(seen, rayon::current_num_threads());
        assert!(ComputePool::new(Some(0)).is_err());
        let panicked = pool.run("probe", || -> Result<()> { panic!("boom") }).await;
        assert!(panicked.unwrap_err().to_string().contains("probe panicked"));
    }
}
