// The coordinator's tests and benches run workers in process (libtorch); its `dmqsm`
// binary does not, and must not load libtorch.
include!("../build/libtorch_link.rs");

fn main() {
    link_libtorch_for(&["tests", "benches"]);
}
