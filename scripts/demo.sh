#!/usr/bin/env bash
# The demo, end to end: installs libtorch once (scripts/setup.sh), builds in release mode
# and runs `dmqsm demo`, writing NIfTI, PNG and metrics under out/demo/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
cargo build --release --bin dmqsm --bin dmqsm-worker
# libtorch's OpenMP threads spin at barriers by default; on a small shared machine that
# wastes cores. Passive waiting gives the same bits, several times faster here.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec ./target/release/dmqsm demo --out out/demo "$@"
