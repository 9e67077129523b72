#!/usr/bin/env bash
# Installs libtorch for tch into a project-local, git-ignored venv, once.
#
# tch 0.26 expects PyTorch 2.13.0 exactly. PyPI's Linux x86-64 wheel is the CUDA build;
# it also runs on machines without a GPU. A stamp file makes a second run a no-op.
# Source this file or run it; afterwards plain `cargo build` / `cargo test` work, because
# .cargo/config.toml points LIBTORCH at the `.libtorch` link made here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_VERSION="2.13.0"
VENV="$ROOT/.venv"
STAMP="$VENV/.dmqsm-torch-$TORCH_VERSION"
PYTHON="${PYTHON:-python3}"

if [ ! -f "$STAMP" ]; then
  echo "dmqsm setup: installing torch==$TORCH_VERSION and numpy into $VENV (first run only, ~5 GB)" >&2
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "torch==$TORCH_VERSION" "numpy>=1.26"
  touch "$STAMP"
fi

TORCH_DIR="$("$VENV/bin/python" -c 'import pathlib, torch; print(pathlib.Path(torch.__file__).parent)')"
if [ "$(readlink "$ROOT/.libtorch" 2>/dev/null || true)" != "$TORCH_DIR" ]; then
  ln -sfn "$TORCH_DIR" "$ROOT/.libtorch"
fi
