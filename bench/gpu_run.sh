#!/usr/bin/env bash
# The GPU measurements in one call on a lent CUDA machine (the `device` tool), results under $OUT (only $OUT comes
# back from that machine; without --out the scripts would write into bench/results/ there, and lose it):
#   bench/gpu_check.py sections a, b, d, e; bench/gate_node.py and bench/decode_branch.py on CUDA in bf16.
# That machine has torch with CUDA and transformers but not peft or bitsandbytes (nor, maybe, accelerate and psutil,
# which peft imports), and no network: first, here,
#   bash bench/gpu_run.sh --fetch     # their wheels into .gpu/wheels (ignored by git; pass it in the call's `carry`)
# then, there:  bash bench/gpu_run.sh   (installs the wheels into a temporary folder, not into the machine's Python).
# A section that fails is reported and the others still run; the exit status is 1 if any did.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu/wheels
PY=${PYTHON:-python}
if [[ "${1:-}" == "--fetch" ]]; then
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"  # (only this fetch's wheels: all of them are installed there)
    exec "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --python-version 3.11 \
        -d "$WHEELS" bitsandbytes==0.50.2 peft==0.21.2 accelerate==1.16.0 psutil==7.2.2
fi
[[ $# -eq 0 ]] || { echo "unknown arguments: $* (only --fetch)" >&2; exit 2; }
: "${OUT:?set OUT to the folder the results go to (the device tool sets it)}"
ls "$WHEELS"/*.whl > /dev/null || { echo "no wheels in $WHEELS: run 'bash bench/gpu_run.sh --fetch' first" >&2; exit 2; }
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
"$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$WHEELS"/*.whl || exit 2
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"  # (gatera_plugin from this checkout, not an install)
"$PY" - <<'PYEOF' || exit 2
import torch, transformers, accelerate, peft, bitsandbytes
assert torch.cuda.is_available(), "no CUDA device: bench/gpu_run.sh is for the lent GPU machine"
print("torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__,
      "| bitsandbytes", bitsandbytes.__version__, "|", torch.cuda.get_device_name())
PYEOF
status=0
"$PY" bench/gpu_check.py --sections a b d e --repeats 10 --out "$OUT/gpu_check.json" || status=1
"$PY" bench/gate_node.py --device cuda --precision bf16 --out "$OUT/gate_node_gpu.json" || status=1
"$PY" bench/decode_branch.py --device cuda --out "$OUT/decode_branch_gpu.json" || status=1
exit $status
