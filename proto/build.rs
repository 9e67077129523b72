//! Compiles `dmqsm.proto` with a vendored protoc, so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .bytes(".")
        .file_descriptor_set_path(out_dir.join("dmqsm_descriptor.bin"))
        .compile_protos(&["dmqsm.proto"], &["."])?;
    println!("cargo:rerun-if-changed=dmqsm.proto");
    Ok(())
}
