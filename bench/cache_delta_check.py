"""Cost of `cache_delta`'s staleness check against the decode product it guards, per layer and call.

    python bench/cache_delta_check.py        # SmolLM2-135M's up_proj shape (576 -> 1536), r = 16, one thread

Times, on one GateRA layer in eval with `cache_delta=True`: `_cached_delta` on a cache hit (the key and the comparison
of the sampled entries of A, B and W0, which catches writes through `.data`), the product `x @ delta.t()` of one
decode step (one token), and the layer's whole forward for that token (base layer, gate, cached branch). Median of 7
rounds of 2000 calls each, microseconds per call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import get_peft_model
from torch import nn

from gatera_plugin import GateRAConfig


def per_call(fn, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-out", type=int, default=1536)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(args.d_in, args.d_out)),
                           GateRAConfig(r=args.r, target_modules=["0"], cache_delta=True, init_weights=False)).eval()
    layer = model.base_model.model[0]
    x = torch.randn(1, args.d_in)
    delta = layer._cached_delta("default", x.dtype)
    rows = {"check (cache hit)": lambda: layer._cached_delta("default", x.dtype), "decode product": lambda: x @ delta.t(),
            "layer forward": lambda: layer(x)}
    with torch.no_grad():
        for name, fn in rows.items():
            times = [per_call(fn, args.calls) for _ in range(args.rounds)]
            print(f"{name:18s} {statistics.median(times):8.1f} us per call")


if __name__ == "__main__":
    main()
