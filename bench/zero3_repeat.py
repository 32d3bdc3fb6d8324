"""Repeat the 2-process ZeRO-3 run of tests/test_deepspeed.py and count the runs whose adapter leaves the
single-process run's (a nondeterminism check, e.g. of a DeepSpeed release on CPU processes).

    DS_ACCELERATOR=cpu python bench/zero3_repeat.py --runs 10 --out /tmp/zero3_repeat --json bench/results/zero3_repeat.json

Runs tests/dist_train.py once in one process (4 sequences per step) and `--runs` times on 2 processes over gloo
(2 each) with integrations/deepspeed/zero3.json: 6 steps, entropy penalty 0.5, a checkpoint every 2 steps. Prints,
per run, the largest absolute difference of any adapter tensor, its name, the largest relative loss difference and
the first step whose loss differs by more than 1e-5 relative; writes them with the torch and deepspeed versions to
`--json` (appended to the list already there). A run counts as off when an adapter tensor differs by more than
tests/distributed.py's ADAPTER_ATOL.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.distributed import ADAPTER_ATOL, adapter, losses, ok, single_process, torchrun  # noqa: E402

SCRATCH_MARKER = ".zero3_repeat_scratch"  # (in --out: this script made the folder, and may empty it)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True,
                        help="scratch folder for the runs: new, empty, or one this script made before (then emptied)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    marker = args.out / SCRATCH_MARKER
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give it a new folder")
    if args.out.exists() and any(args.out.iterdir()) and not marker.exists():
        parser.error(f"--out {args.out} holds files this script did not make; it empties --out before its runs, so "
                     f"give it a new folder")
    import deepspeed
    import torch

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    marker.touch()
    ok(single_process(args.out / "single"))
    reference, reference_losses = adapter(args.out / "single"), losses(args.out / "single")
    rows = []
    print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}")
    print(f"{'run':>4} {'adapter max |diff|':>19} {'loss max rel':>13} {'first step off':>15}  tensor")
    for run in range(args.runs):
        out = args.out / f"zero3-{run}"
        ok(torchrun(out, "--deepspeed", str(ROOT / "integrations" / "deepspeed" / "zero3.json")))
        trained = adapter(out)
        worst, name = max(((trained[k] - reference[k]).abs().max().item(), k) for k in trained)
        rel = [abs(a - b) / abs(b) for a, b in zip(losses(out), reference_losses)]
        first = next((step + 1 for step, r in enumerate(rel) if r > 1e-5), None)
        rows.append({"run": run, "adapter_max_abs_diff": worst, "tensor": name, "loss_max_rel_diff": max(rel),
                     "first_step_off": first, "off": worst > ADAPTER_ATOL})
        print(f"{run:>4} {worst:>19.3g} {max(rel):>13.3g} {str(first):>15}  {name}", flush=True)
    off = sum(row["off"] for row in rows)
    print(f"{off} of {len(rows)} runs off (adapter difference > {ADAPTER_ATOL})")
    if args.json:
        results = json.loads(args.json.read_text()) if args.json.exists() else []
        results.append({"torch": torch.__version__, "deepspeed": deepspeed.__version__, "runs": rows, "off": off})
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
