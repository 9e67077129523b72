include!("../build/libtorch_link.rs");

/// Records the libtorch version the worker is built against (for `dmqsm-worker devices`),
/// read from `$LIBTORCH/version.py` (PyTorch package) or `$LIBTORCH/build-version`.
fn record_libtorch_version() {
    let mut version = String::from("unknown");
    if let Ok(root) = std::env::var("LIBTORCH") {
        let root = std::path::PathBuf::from(root);
        if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("__version__ = ") {
                    version = v.trim().trim_matches('\'').trim_matches('"').to_string();
                }
            }
        } else if let Ok(text) = std::fs::read_to_string(root.join("build-version")) {
            version = text.trim().to_string();
        }
    }
    println!("cargo:rustc-env=DMQSM_LIBTORCH_VERSION={version}");
    let cuda = std::env::var("LIBTORCH").is_ok_and(|root| {
        std::path::Path::new(&root)
            .join("lib")
            .join("libtorch_cuda.so")
            .exists()
    });
    println!("cargo:rustc-env=DMQSM_LIBTORCH_CUDA={cuda}");
}

fn main() {
    link_libtorch();
    record_libtorch_version();
}
