"""The sigmoid gate's two paths to x, side by side: through `gates._LogitsAndInput` (x passed on, the gate's input
gradient added into the branch's in place) and through `F.linear` (autograd adds it as a new tensor).

    python bench/gate_node.py                       # table + bench/results/gate_node.json; CPU, about 30 s
    python bench/gate_node.py --device cuda --precision bf16 --out bench/results/gate_node_gpu.json

One training forward + backward of one gated GateRA layer (d -> d, r = 32, the default config) on tokens x d inputs, at
sizes from a layer whose time is the host's (64 x 4 tokens) to one whose time is its products. The two paths take
turns in each of `--rounds` rounds in one process (`gates.passing_input_on`); the table gives each path's median
microseconds, their difference and the ratio node / F.linear. On this project's CPU the node costs its Python
backward's host time on small layers (27-62 µs per layer and step); on large ones the ratios move by 3-5% between runs,
and the whole-model A/B with bench/train_step.py (README) decided the CPU default (`gates.PASS_INPUT_DEVICE_TYPES`).
`--precision bf16`: a bf16 model with PEFT's fp32 adapter weights, under bf16 autocast, as a GPU run trains.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

SIZES = ((64, 4), (64, 256), (256, 64), (256, 1024), (512, 1024), (1024, 1024), (1024, 4096))  # (d, tokens)
GPU_SIZES = ((576, 4096), (2048, 4096), (4096, 4096), (4096, 16384))
TIME_PER_TURN_S = 0.15  # each turn repeats the step for about this long


def _layer(d: int, precision: str, device):
    import torch
    from peft import get_peft_model

    from gatera_plugin import GateRAConfig

    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    base = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False)).to(device=device, dtype=dtype)
    model = get_peft_model(base, GateRAConfig(r=32, target_modules=["0"]), autocast_adapter_dtype=True).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gatera_B" in name or "gatera_gate" in name:
                p.normal_(0, 0.01)
    return model, dtype


def _graph_has(out, node_name: str) -> bool:
    """Whether `out`'s autograd graph holds a node whose name starts with `node_name`."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name().startswith(node_name):
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def measure(d: int, tokens: int, precision: str, rounds: int, device) -> dict:
    """Median µs of one forward + backward with the node (`node_us`) and with `F.linear` (`linear_us`)."""
    import torch

    from gatera_plugin.gates import passing_input_on

    model, dtype = _layer(d, precision, device)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    cuda = device.type == "cuda"

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model(x)

    def step():
        forward().float().pow(2).mean().backward()

    paths = {"node_us": (device.type,), "linear_us": ()}
    for name, devices in paths.items():  # (what each path measures: the node in the graph, or not)
        with passing_input_on(*devices):
            uses_node = _graph_has(forward(), "_LogitsAndInputBackward")
        if uses_node != (name == "node_us"):
            raise RuntimeError(f"{name}: the gate's node is {'' if uses_node else 'not '}in the graph")
    for devices in paths.values():  # warm-up, and the steps per turn from the first path's time
        with passing_input_on(*devices):
            step()
            if cuda:
                torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    repeats = max(1, min(500, int(TIME_PER_TURN_S / (time.perf_counter() - start))))
    times = {name: [] for name in paths}
    for round_index in range(rounds + 1):  # (round 0 untimed: each path's first turn allocates, fills caches)
        for name, devices in paths.items():
            with passing_input_on(*devices):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(repeats):
                    step()
                if cuda:
                    torch.cuda.synchronize()
                if round_index:
                    times[name].append((time.perf_counter() - start) / repeats * 1e6)
    row = {"d": d, "tokens": tokens, "elements": d * tokens, "repeats": repeats}
    row.update({name: round(statistics.median(values), 1) for name, values in times.items()})
    row["node_minus_linear_us"] = round(row["node_us"] - row["linear_us"], 1)
    row["node_over_linear"] = round(row["node_us"] / row["linear_us"], 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--sizes", nargs="*", help="d x tokens pairs as DxT (default: the CPU or GPU grid)")
    from _results import add_output_arguments, output_path, write_json

    add_output_arguments(parser, "bench/results/gate_node.json, gate_node_bf16.json with --precision bf16")
    args = parser.parse_args()
    out = output_path(parser, args,
                      Path(__file__).parent / "results" / f"gate_node{'_bf16' if args.precision == 'bf16' else ''}.json")
    import torch

    device = torch.device(args.device)
    if args.sizes:
        sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes]
    else:
        sizes = GPU_SIZES if device.type == "cuda" else SIZES
    print(f"| d | tokens | tokens x d | node µs | F.linear µs | node - F.linear µs | node / F.linear |  "
          f"({args.device}, {args.precision}, {args.rounds} rounds)\n|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for d, tokens in sizes:
        row = measure(d, tokens, args.precision, args.rounds, device)
        rows.append(row)
        print(f"| {d} | {tokens} | {row['elements']} | {row['node_us']:.1f} | {row['linear_us']:.1f} | "
              f"{row['node_minus_linear_us']:+.1f} | {row['node_over_linear']:.3f} |", flush=True)
    from _machine import recorded

    machine = recorded()
    write_json(out, {
        "rows": rows,
        "meta": {"machine": machine, "device": args.device, "precision": args.precision, "rounds": args.rounds,
                 "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "command": "python bench/gate_node.py " + " ".join(
                     f"--{k} {v}" for k, v in (("device", args.device), ("precision", args.precision),
                                                ("rounds", args.rounds)))},
    }, args.overwrite, indent=2)


if __name__ == "__main__":
    main()
