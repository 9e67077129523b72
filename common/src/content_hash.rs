//! SHA-256 content hashes, as lowercase hex: the identity of model weights (jobs pin it)
//! and of cohort inputs (a re-run skips subjects whose inputs and settings hash the same).

use sha2::Sha256;
use std::io::Read;
use std::path::Path;

/// SHA-256 of `bytes`, as 64 lowercase hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SHA-256 of a file's bytes, as 64 lowercase hex digits, read in 1 MiB chunks (memory
/// stays bounded whatever the file's size).
pub fn sha256_file_hex(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// A SHA-256 hasher fed piece by piece, for digests of structured data (e.g. weights in
/// name order); [`hex_digest`] finishes it.
pub type Hasher = Sha256;

/// The trait that feeds a [`Hasher`] (`Hasher::new()`, `update`).
pub use sha2::Digest;

/// Finishes `h` as 64 lowercase hex digits.
pub fn hex_digest(h: Hasher) -> String {
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    /// FIPS 180-2 test vector "abc".
    #[test]
    fn matches_the_fips_test_vector() {
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn file_and_bytes_agree() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        assert_eq!(
            super::sha256_file_hex(&p).unwrap(),
            super::sha256_hex(&data)
        );
    }
}
