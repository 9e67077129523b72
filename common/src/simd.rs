//! Run-time choice of the vector extension for the few hot per-voxel loops (the sampler's
//! fused step, the noise generator).
//!
//! The binaries are built for baseline x86-64 (SSE2), so they run on any node. A hot
//! loop is written once as plain Rust and compiled a second time inside a
//! `#[target_feature]` function for AVX-512 or AVX2; [`VectorIsa::detect`] picks the
//! widest the CPU has. The loops use only IEEE-754 basic operations and conversions,
//! which every extension rounds identically, and Rust never contracts a·b + c into a
//! fused multiply-add, so the result is bitwise the same on every path (the tests of
//! each loop compare the paths).

use std::sync::OnceLock;

/// The widest vector extension of this CPU that the hot loops are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorIsa {
    /// AVX-512 F, DQ, VL and BW (64-bit integer multiplies, 8 × f64 lanes, masks).
    Avx512,
    /// AVX2 (4 × f64 lanes).
    Avx2,
    /// The build's baseline (SSE2 on x86-64; any other architecture).
    Baseline,
}

impl VectorIsa {
    /// The extension of this CPU (detected once, then cached).
    pub fn detect() -> Self {
        static ISA: OnceLock<VectorIsa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx512f") && has!("avx512dq") && has!("avx512vl") && has!("avx512bw") {
                    return VectorIsa::Avx512;
                }
                if has!("avx2") {
                    return VectorIsa::Avx2;
                }
            }
            VectorIsa::Baseline
        })
    }

    /// The extensions this CPU can run, widest first (the tests run each).
    pub fn available() -> Vec<Self> {
        [VectorIsa::Avx512, VectorIsa::Avx2, VectorIsa::Baseline]
            .into_iter()
            .filter(|isa| isa.rank() <= Self::detect().rank())
            .collect()
    }

    /// `self`, or this CPU's widest extension where `self` is wider.
    pub fn at_most_cpu(self) -> Self {
        let cpu = Self::detect();
        if self.rank() <= cpu.rank() { self } else { cpu }
    }

    fn rank(self) -> u8 {
        match self {
            VectorIsa::Avx512 => 2,
            VectorIsa::Avx2 => 1,
            VectorIsa::Baseline => 0,
        }
    }
}

/// Defines `$name`, which calls the `#[inline(always)]` function `$body` (same
/// arguments) compiled for the [`VectorIsa`] given as its first argument. An ISA the
/// CPU lacks falls back to the baseline build, so the call is always sound.
#[macro_export]
#[doc(hidden)]
macro_rules! dispatch_isa {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path) => {
        $(#[$meta])*
        $vis fn $name(isa: $crate::simd::VectorIsa, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx512bw")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                // Never more than the CPU has.
                match isa.at_most_cpu() {
                    // SAFETY: `isa` is one this CPU supports (checked above).
                    $crate::simd::VectorIsa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::simd::VectorIsa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::simd::VectorIsa::Baseline => {}
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = isa;
            $body($($arg),*)
        }
    };
}
