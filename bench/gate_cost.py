"""Where the token gate's cost goes, per operation: gated GateRA against `gate="none"` run apart, one training step.

    python bench/gate_cost.py                          # activation-heavy, fp32; table + bench/results/gate_cost.json
    python bench/gate_cost.py --precision bf16 --out bench/results/gate_cost_bf16.json

`bench/train_step.py` measures the gate's cost as a ratio of whole steps (gated GateRA over `gatera-none-apart`, the
same adapter without the gate, base layer and branch apart). This script splits the difference by operation: both
models (built as there, same size, batch and seed) run training steps (forward, backward, AdamW) under a
`TorchDispatchMode` that times every ATen call it sees with `time.perf_counter`, in forward and backward alike (on
CPU autograd runs backward on the calling thread). Calls are grouped by operator and by the size of what they touch:

- "large": some tensor has more than 4 elements per token (activations, products);
- "vector": large, and some 2-D operand is one column or one row: the gate's values (N, 1) scaling rows of
  activations (the gated add, the token scale of δ or x and of `δ ΔW`), the gate's GEMV `x wᵀ`, its weight gradient
  `dzᵀ x` and its outer product `dz w` (which autograd then adds into dx);
- "per-token": nothing larger than 4 elements per token (the gate's (N, 1) values, the penalty tap's ops).

`mm` and `addmm` count as one operator ("mm|addmm"): the ungated path adds the base output inside its GEMM (`addmm`)
where the gated one runs `mm` and adds apart, so apart they would show as two large differences that cancel.

The rows are each group's milliseconds per step in both runs (mean over `--rounds`) and the difference, largest
first. The timer adds its own host work to every call (a few µs: the small ops' times include it), so the JSON and
the table also give each run's step time untimed, and the timed step over it.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402  (the same models, batch and step as the step-time benchmark)

METHODS = ("gatera", "gatera-none-apart")


def _size_class(args: tuple, out, tokens: int) -> str:
    """"vector", "large" or "per-token" (module docstring) for one call's tensor arguments and output."""
    import torch

    tensors = [t for t in (*args, *(out if isinstance(out, (tuple, list)) else (out,))) if isinstance(t, torch.Tensor)]
    if not any(t.numel() > 4 * tokens for t in tensors):
        return "per-token"
    return "vector" if any(t.dim() == 2 and 1 in t.shape for t in tensors) else "large"


def op_times(method: str, size: dict, precision: str, rounds: int, warmup: int) -> dict:
    """{"ops": {"op class": [seconds per step, calls per step]}, "timed_s", "untimed_s"} for `method`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    tokens = size["batch"] * size["seq"]

    class Timer(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seconds, self.calls = collections.defaultdict(float), collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            name = "mm|addmm" if func.__name__ in ("mm.default", "addmm.default") else func.__name__
            key = f"{name} {_size_class(args, out, tokens)}"
            self.seconds[key] += time.perf_counter() - start
            self.calls[key] += 1
            return out

    model, optimizer = train_step._setup(method, size, precision)
    input_ids = train_step._batch(size)
    for _ in range(warmup):
        train_step._step(model, optimizer, input_ids, method, precision)
    untimed = [train_step._step(model, optimizer, input_ids, method, precision) for _ in range(rounds)]
    seconds, calls, timed = collections.defaultdict(float), collections.Counter(), []
    for _ in range(rounds):
        timer = Timer()
        with timer:
            timed.append(train_step._step(model, optimizer, input_ids, method, precision))
        for key, value in timer.seconds.items():
            seconds[key] += value / rounds
        calls = timer.calls  # (the same calls every step)
    return {"ops": {key: [seconds[key], calls[key]] for key in seconds}, "timed_s": sum(timed) / rounds,
            "untimed_s": sum(untimed) / rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="activation-heavy", choices=list(train_step.SIZES))
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-share", type=float, default=0.001,
                        help="rows whose difference is below this share of the untimed ungated step are summed")
    from _results import add_output_arguments, output_path, write_json

    add_output_arguments(parser, "bench/results/gate_cost.json")
    args = parser.parse_args()
    out = output_path(parser, args, Path(__file__).parent / "results" / "gate_cost.json")

    import torch

    torch.set_num_threads(1)
    runs = {method: op_times(method, train_step.SIZES[args.size], args.precision, args.rounds, args.warmup)
            for method in METHODS}
    gated, apart = (runs[m]["ops"] for m in METHODS)
    step_ms = runs["gatera-none-apart"]["untimed_s"] * 1e3
    rows = []
    for key in set(gated) | set(apart):
        (g_s, g_n), (a_s, a_n) = gated.get(key, [0.0, 0]), apart.get(key, [0.0, 0])
        rows.append({"op": key, "gated_ms": g_s * 1e3, "gated_calls": g_n, "apart_ms": a_s * 1e3, "apart_calls": a_n,
                     "diff_ms": (g_s - a_s) * 1e3})
    rows.sort(key=lambda row: -row["diff_ms"])
    shown = [row for row in rows if abs(row["diff_ms"]) >= args.min_share * step_ms]
    rest = sum(row["diff_ms"] for row in rows if row not in shown)

    print(f"{args.size}, {args.precision}: ms per training step, gated GateRA against gate='none' apart")
    print(f"{'op (size class)':44s} {'gated':>9s} {'calls':>6s} {'apart':>9s} {'calls':>6s} {'diff':>8s} {'% step':>7s}")
    for row in shown:
        print(f"{row['op']:44s} {row['gated_ms']:9.2f} {row['gated_calls']:6d} {row['apart_ms']:9.2f} "
              f"{row['apart_calls']:6d} {row['diff_ms']:8.2f} {100 * row['diff_ms'] / step_ms:6.2f}%")
    total = sum(row["diff_ms"] for row in rows)
    print(f"{'(other rows)':44s} {'':9s} {'':6s} {'':9s} {'':6s} {rest:8.2f} {100 * rest / step_ms:6.2f}%")
    print(f"{'all ops':44s} {'':9s} {'':6s} {'':9s} {'':6s} {total:8.2f} {100 * total / step_ms:6.2f}%")
    for method in METHODS:
        run = runs[method]
        print(f"{method}: step {run['untimed_s'] * 1e3:.1f} ms untimed, {run['timed_s'] * 1e3:.1f} ms under the timer "
              f"({run['timed_s'] / run['untimed_s']:.2f}x)")
    from _machine import recorded

    result = {
        "meta": {"size": args.size, "precision": args.precision, "rounds": args.rounds, "warmup": args.warmup,
                 "torch": torch.__version__, "command": " ".join(["python", "bench/gate_cost.py", *sys.argv[1:]]),
                 "machine": recorded()},
        "steps": {method: {"untimed_s": runs[method]["untimed_s"], "timed_s": runs[method]["timed_s"]}
                  for method in METHODS},
        "rows": rows,
    }
    write_json(out, result, args.overwrite, indent=1)


if __name__ == "__main__":
    main()
