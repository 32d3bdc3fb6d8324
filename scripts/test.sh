#!/usr/bin/env bash
# Run the whole test suite: the fast default set, then the slow end-to-end runs (marker `slow`).
# Assumes scripts/setup.sh has run (.ci/run does both).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled DO_NOT_TRACK=1 TRITON_INTERPRET=1
# DeepSpeed compiles its CPU communication op on first use (~1-3 min): once per checkout, then reused.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
.venv/bin/python -m pytest -q -m "not slow" "$@"
.venv/bin/python -m pytest -q -m slow "$@"
