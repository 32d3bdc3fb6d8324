#!/usr/bin/env bash
# Fresh machine -> GateRA fine-tune of SmolLM2-135M on CPU: sets up .venv, then runs examples/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 WANDB_MODE=disabled DO_NOT_TRACK=1
.venv/bin/python examples/demo.py "$@"
