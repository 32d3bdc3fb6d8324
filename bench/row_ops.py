"""The token gate's row operations: Triton row kernels (`kernels/rows.py`) vs PyTorch's ops, side by side.

    python bench/row_ops.py            # CUDA: a table and bench/results/row_ops.json, well under a minute
    python bench/row_ops.py --smoke    # no CUDA: tiny shapes under TRITON_INTERPRET=1 (checks the script; no timing)

For each of a gated HiRA layer's row operations (`scale`: δ or x times the token scale; `add_scaled`: the gated
residual add, written into the update; `scale_and_dot_`: dg's row dot product and dx's scale of `δ ΔW`, PyTorch's
`vecdot` then `mul_`), bf16 rows of N tokens × d: device time (CUDA events, median of `--repeats`) and host time per
call (issuing 20 calls in a row, before waiting for the GPU), for PyTorch's ops and for the kernels, in one process.
Device time decides a GPU-bound step; host time a host-bound one (few tokens per layer), where a Triton launch costs
more than an ATen call. `kernels.rows_for` ("auto") uses the kernels only where this table shows them faster.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPS = ("scale", "add_scaled", "scale_and_dot_")


def _call(row_ops, op: str, t: dict):
    if op == "scale":
        return row_ops.scale(t["a"], t["scale"])
    if op == "add_scaled":
        return row_ops.add_scaled(t["base"], t["a"], t["scale"], out=t["a"])
    return row_ops.scale_and_dot_(t["a"], t["b"], t["scale"])


def _device_ms(fn, repeats: int, cuda: bool) -> float:
    import torch

    for _ in range(3):
        fn()
    if not cuda:
        return float("nan")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _host_us(fn, cuda: bool, calls: int = 20) -> float:
    import torch

    times = []
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - begin) / calls * 1e6)
        if cuda:
            torch.cuda.synchronize()
    return statistics.median(times)


def measure(smoke: bool, repeats: int) -> list[dict]:
    import torch

    from gatera_plugin.kernels.rows import TRITON_ROWS_RAISING
    from gatera_plugin.ops.rows import TORCH_ROWS

    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # (the interpreter rounds to bf16 toward zero)
    shapes = [(8, 100)] if smoke else [(n, d) for n in (512, 2048, 4096, 16384) for d in (4096, 14336)]
    rows = []
    for n, d in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        t = {"a": torch.randn(n, d, device=device, dtype=dtype, generator=g),
             "b": torch.randn(n, d, device=device, dtype=dtype, generator=g),
             "base": torch.randn(n, d, device=device, dtype=dtype, generator=g),
             "scale": torch.ones(n, 1, device=device, dtype=dtype)}  # (repeated in-place scaling stays finite)
        for op in OPS:
            row = {"tokens": n, "d": d, "op": op}
            for name, row_ops in (("torch", TORCH_ROWS), ("triton", TRITON_ROWS_RAISING)):
                fn = functools.partial(_call, row_ops, op, t)
                row[f"{name}_ms"] = _device_ms(fn, repeats, cuda)
                row[f"{name}_host_us"] = _host_us(fn, cuda)
            row["triton_vs_torch"] = row["triton_ms"] / row["torch_ms"] if cuda else float("nan")
            rows.append(row)
            print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    from _results import add_output_arguments, output_path_by_mode, write_json

    add_output_arguments(parser, "bench/results/row_ops.json on CUDA, bench/results/row_ops_smoke.json in smoke "
                         "mode, which git ignores and each smoke run replaces")
    args = parser.parse_args()
    import torch

    smoke = args.smoke or not torch.cuda.is_available()
    out, overwrite = output_path_by_mode(parser, args, smoke, ROOT / "bench" / "results", "row_ops")
    print("tokens | d | op | torch ms | torch host us | triton ms | triton host us | triton / torch time")
    rows = measure(smoke, args.repeats)
    from _machine import machine_info

    meta = {"mode": "smoke" if smoke else "cuda", "torch": torch.__version__, "machine": machine_info()}
    if not smoke:
        import triton

        meta.update(device=torch.cuda.get_device_name(), triton=triton.__version__)
    out = write_json(out, {"meta": meta, "rows": rows}, overwrite, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
