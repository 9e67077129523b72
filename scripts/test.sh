#!/usr/bin/env bash
# The whole test suite: installs libtorch once (scripts/setup.sh), then runs every test
# of the workspace. Slow checks are #[ignore]d; run them with
#   scripts/test.sh -- --ignored
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# The binaries first: end-to-end tests (Slurm, kill -9 of the coordinator) run them.
cargo build --bins
exec cargo test --workspace "$@"
