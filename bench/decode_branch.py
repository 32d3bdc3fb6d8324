"""A decoding step's HiRA branch without a graph: forming ΔW = W0 ⊙ BA against the factored update, per layer size,
rank and token count; where the factored update stops paying (`ops.hira.factored_pays`: token count and rank,
and the weight's size).

    python bench/decode_branch.py            # CPU, one thread: table + bench/results/decode_branch.json, about a minute
    python bench/decode_branch.py --smoke    # tiny sizes, one round (the test suite runs this)
    python bench/decode_branch.py --device cuda --out bench/results/decode_branch_gpu.json   # on a GPU

Both compute `base + s · g ⊙ (x (W0 ⊙ BA)ᵀ)` for x (N, d_in) as `generate()` runs a layer: eval, `no_grad`, a bf16
model outside autocast, PEFT's fp32 adapter weights, a token gate:
- formed: `ops.hira.branch_output` (BA in fp32, `W0 ⊙ BA`, its cast to bf16, then the product with x), what
  the training forward computes;
- factored: `ops.hira.factored_update` (`Σ_k B_k ⊙ W0 (A_k ⊙ x)`: one product of W0 with N·r rows) and the gated add.
The factored update costs `N·r / (N + r)` times the formed path's FLOPs ("FLOP ratio") and reads W0 once where the
formed path moves d_out × d_in values about 11 times (bytes). Both run in turn in one process, round after round;
the table gives each one's median milliseconds and the median over rounds of factored / formed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

SIZES = ((128, 128), (256, 256), (576, 576), (1024, 1024), (2048, 2048), (4096, 4096))  # (d_in, d_out); 576: SmolLM2-135M
# tokens per rank: up to a FLOP ratio of about 8, beyond the crossover on this CPU
TOKENS = {8: (1, 2, 4, 8, 16, 32), 16: (1, 2, 4, 8, 16), 32: (1, 2, 4, 8, 16), 128: (1, 2, 4, 8)}
SMOKE = {"sizes": ((64, 96), (256, 256)), "tokens": {8: (1, 4)}}
CALLS_PER_TIMING = {"cuda": 50}  # (a GPU call takes microseconds: time many between syncs)


def _paths(d_in: int, d_out: int, rank: int, tokens: int, device: str):
    """(formed, factored): the two ways to run one layer's gated branch and residual add, as calls without arguments."""
    import torch

    from gatera_plugin.ops._autocast import autocast_state
    from gatera_plugin.ops.hira import branch_output, factored_update
    from gatera_plugin.ops.rows import TORCH_ROWS, add_gated

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=g).bfloat16().to(device)
    W0 = (torch.randn(d_out, d_in, generator=g) * 0.02).bfloat16().to(device)
    A = (torch.randn(rank, d_in, generator=g) / d_in ** 0.5).to(device)
    B = (torch.randn(d_out, rank, generator=g) * 0.01).to(device)
    gate = torch.rand(tokens, 1, generator=g).bfloat16().to(device)
    base = (x @ W0.t())  # the base layer's output
    autocast = autocast_state(x.device.type)

    def formed():
        return branch_output(base, x, gate, A, B, W0, 2.0, TORCH_ROWS, autocast)

    def factored():
        return add_gated(base, factored_update(x, A, B, W0, torch.bfloat16), gate, 2.0, reuse_update=True)

    return formed, factored


def measure(d_in: int, d_out: int, rank: int, tokens: int, rounds: int, device: str = "cpu") -> dict:
    """Median ms of each path and the median over rounds of factored / formed; the two outputs' largest difference
    (both round the products to bf16). On a GPU each timing covers `CALLS_PER_TIMING[device]` calls between syncs."""
    import torch

    formed, factored = _paths(d_in, d_out, rank, tokens, device)
    calls = CALLS_PER_TIMING.get(device, 1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        difference = (formed().float() - factored().float()).abs().max().item()
        for path in (formed, factored):  # warm-up
            for _ in range(calls):
                path()
        times = {"formed": [], "factored": []}
        for _ in range(rounds):
            for name, path in (("formed", formed), ("factored", factored)):
                sync()
                start = time.perf_counter()
                for _ in range(calls):
                    path()
                sync()
                times[name].append((time.perf_counter() - start) * 1e3 / calls)
    ratios = [b / a for a, b in zip(times["formed"], times["factored"])]
    return {"d_in": d_in, "d_out": d_out, "rank": rank, "tokens": tokens,
            "flop_ratio": round(tokens * rank / (tokens + rank), 3),
            "formed_ms": round(statistics.median(times["formed"]), 3),
            "factored_ms": round(statistics.median(times["factored"]), 3),
            "factored_vs_formed": round(statistics.median(ratios), 3), "max_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--device", default="cpu", help="cpu (one thread) or cuda")
    from _results import add_output_arguments, output_path, write_json

    add_output_arguments(parser, "bench/results/decode_branch.json")
    args = parser.parse_args()
    out = output_path(parser, args, Path(__file__).parent / "results" / "decode_branch.json")
    import torch

    from gatera_plugin.ops.hira import FACTORED_LIMITS, factored_pays

    if args.device == "cpu":  # (one thread, as the docstring says: torch takes every core unless OMP_NUM_THREADS is set)
        torch.set_num_threads(1)

    sizes, tokens_by_rank = (SMOKE["sizes"], SMOKE["tokens"]) if args.smoke else (SIZES, TOKENS)
    rounds = 1 if args.smoke else args.rounds
    rows = []
    print("| d_in x d_out | r | tokens | FLOP ratio | formed ms | factored ms | factored / formed | taken |")
    print("|---|---|---|---|---|---|---|---|")
    for d_in, d_out in sizes:
        for rank, token_counts in tokens_by_rank.items():
            for tokens in token_counts:
                row = measure(d_in, d_out, rank, tokens, rounds, args.device)
                row["taken"] = factored_pays(tokens, rank, d_in * d_out)
                rows.append(row)
                print(f"| {d_in} x {d_out} | {rank} | {tokens} | {row['flop_ratio']} | {row['formed_ms']} | "
                      f"{row['factored_ms']} | {row['factored_vs_formed']:.2f} | {'yes' if row['taken'] else 'no'} |",
                      flush=True)
    from _machine import recorded

    machine = recorded()
    write_json(out, {
        "rows": rows,
        "meta": {"machine": machine, "rounds": rounds, "threads": torch.get_num_threads(),
                 "dtype": "bf16 x and W0, fp32 A and B",
                 "factored_limits": FACTORED_LIMITS, "device": args.device,
                 "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"},
    }, args.overwrite, indent=2)


if __name__ == "__main__":
    main()
