#!/usr/bin/env bash
# Run every test: lint (ruff), the fast default set, the slow end-to-end runs (marker `slow`), then, in the Axolotl environment
# (.venv-axolotl), the Axolotl CLI tests and the core suite again against Axolotl's pinned transformers/TRL, and
# last the fast set against the oldest releases of the core, TRL, bitsandbytes and DeepSpeed dependencies that
# pyproject.toml admits (.venv-oldest).
# Sets up (or refreshes) the three environments first (scripts/setup.sh, scripts/setup_axolotl.sh,
# scripts/setup_oldest.sh; safe to re-run; skipped with GATERA_SKIP_SETUP=1).
# Extra arguments go to every pytest call (e.g. `-x`, `-k name`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${GATERA_SKIP_SETUP:-0}" != 1 ]; then  # GATERA_SKIP_SETUP=1: reuse the environments as they are
  start=$(date +%s)
  bash scripts/setup.sh
  bash scripts/setup_axolotl.sh
  bash scripts/setup_oldest.sh
  echo "setup took $(( $(date +%s) - start )) s"
fi
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled DO_NOT_TRACK=1 AXOLOTL_DO_NOT_TRACK=1 TRITON_INTERPRET=1
# DeepSpeed compiles its CPU communication op on first use (~1-3 min): once per checkout, then reused.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
.venv/bin/ruff check gatera_plugin bench tests examples
.venv/bin/python -m pytest -q -m "not slow" --ignore=tests/axolotl "$@"
.venv/bin/python -m pytest -q -m slow --ignore=tests/axolotl "$@"
.venv-axolotl/bin/python -m pytest -q tests/axolotl "$@"
.venv-axolotl/bin/python -m pytest -q -m "not slow" tests/test_equivalence.py tests/test_model.py \
    tests/test_penalty.py tests/test_trainer.py tests/test_bnb.py tests/test_seeds.py "$@"
.venv-oldest/bin/python -m pytest -q -m "not slow" --ignore=tests/axolotl "$@"
