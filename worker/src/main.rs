//! `dmqsm-worker` binary.

fn main() -> anyhow::Result<()> {
    println!("cuda available: {}", tch::Cuda::is_available());
    Ok(())
}
