//! `dmqsm` binary.

fn main() -> anyhow::Result<()> {
    Ok(())
}
