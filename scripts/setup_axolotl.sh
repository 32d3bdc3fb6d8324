#!/usr/bin/env bash
# Create .venv-axolotl: Axolotl 0.21 (which pins transformers 5.20.1 / trl 1.14.1, so it cannot share .venv) with
# torch==2.13.0 (CPU), this package, and what its tests need. Axolotl declares Python >= 3.12, but its code runs on
# 3.11 and the CPU torch build on this machine is for 3.11: install axolotl itself with --ignore-requires-python and
# its requirements from a lock file (no resolver, ~1 min instead of ~10). Safe to re-run; quiet unless a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/quietly.sh
use_venv .venv-axolotl
quietly python -m pip install "torch==2.13.0"
quietly python -m pip install --no-deps -r scripts/axolotl-env.lock
quietly python -m pip install --no-deps --ignore-requires-python "axolotl==0.21.0"
quietly python -m pip install --no-deps -e .
stdout_only python -c 'import axolotl, transformers, trl, gatera_plugin; print("axolotl env:", axolotl.__version__, "transformers", transformers.__version__, "trl", trl.__version__)'
