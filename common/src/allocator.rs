//! The allocator of dmqsm's processes: mimalloc, kept from handing freed pages back to the
//! kernel.
//!
//! A diffusion step allocates volume-sized buffers (x̂₀, ε̂, gradients: tens of MB at
//! 160×192×160) and one buffer per batch of 48³ patches, and frees them again. glibc's
//! malloc returns such blocks to the kernel at once, and mimalloc purges freed pages after
//! a short delay; either way the next step faults them in again, zeroed by the kernel.
//! With [`retain_freed_pages`] the pages stay with the process, so a step's working set is
//! faulted in once per process. The resident size then stays at the high-water mark of
//! the running jobs, which the coordinator's admission control bounds.
//!
//! Each binary names the allocator with
//! `#[global_allocator] static ALLOCATOR: dmqsm_common::allocator::Allocator = dmqsm_common::allocator::Allocator;`
//! and calls [`retain_freed_pages`] first thing in `main`. Only Rust allocations are
//! affected; libtorch keeps its own allocator.

/// The global allocator type of dmqsm's binaries (mimalloc).
pub use mimalloc::MiMalloc as Allocator;

/// `mi_option_purge_delay` in mimalloc's `mi_option_t` (include/mimalloc.h, v2 and v3
/// alike); `libmimalloc-sys` does not name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to purge freed pages (purge delay −1; its default is a few
/// milliseconds to a second). Call it at the start of `main`, before threads start:
/// mimalloc's option setters are not thread safe.
pub fn retain_freed_pages() {
    // SAFETY: sets one integer option of the linked mimalloc; called before other threads
    // exist, as mimalloc asks.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option index is the one mimalloc reads: after setting it, mimalloc reports −1.
    #[test]
    fn purge_delay_option_is_the_one_set() {
        retain_freed_pages();
        // SAFETY: reads one integer option.
        let v = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(v, -1);
        // The neighbouring option (use_numa_nodes) keeps its default of 0.
        // SAFETY: as above.
        let next = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY + 1) };
        assert_eq!(next, 0);
    }
}
