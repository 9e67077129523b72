//! SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
//! OOPSLA 2014): the one home of the 64-bit mixer behind every seeded draw of the project
//! (sampler noise, patch-grid offsets, simulated noise, phantoms, fingerprints).
//!
//! Kept in-crate rather than taken from a random crate: results are part of a job's
//! deterministic definition, so the bits must never change with a dependency's version.

/// The SplitMix64 increment γ = ⌊2⁶⁴/φ⌋ (the golden-ratio constant).
pub const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// The SplitMix64 output function (Stafford's "Mix13" variant): a bijective 64-bit
/// finaliser.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One SplitMix64 step from state `z`: the output for the state `z + γ`.
#[inline]
pub fn splitmix64(z: u64) -> u64 {
    mix64(z.wrapping_add(GAMMA))
}

/// Key of the (seed, stream) pair of a counter-based stream; distinct pairs give
/// unrelated sequences.
pub fn stream_key(seed: u64, stream: u64) -> u64 {
    mix64(mix64(seed.wrapping_add(GAMMA)) ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03))
}

/// The 64 random bits at position `counter` of the keyed stream: SplitMix64 evaluated at
/// an arbitrary position, `mix64(key + (counter + 1)·γ)`, so any voxel's bits can be drawn
/// without drawing the ones before it.
pub fn random_bits(key: u64, counter: u64) -> u64 {
    mix64(key.wrapping_add(counter.wrapping_add(1).wrapping_mul(GAMMA)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference sequence of SplitMix64 from seed 0 (Vigna's `splitmix64.c`, as
    /// printed by its test driver): state += γ, then the mixer.
    #[test]
    fn matches_the_reference_sequence() {
        let mut state = 0u64;
        let mut next = || {
            let out = splitmix64(state);
            state = state.wrapping_add(GAMMA);
            out
        };
        assert_eq!(next(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(next(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(next(), 0x06c4_5d18_8009_454f);
    }
}
