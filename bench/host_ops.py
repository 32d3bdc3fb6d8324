"""Host-side work per adapted layer: ATen calls and host time of one forward + backward, GateRA vs PEFT's HiRA and LoRA.

    python bench/host_ops.py        # tables + bench/results/host_ops.json; CPU, about a minute
    git worktree add ../old 950a1bb && python bench/host_ops.py --code ../old --out /tmp/old.json   # older code

Where a layer's GPU work is small (few tokens, decoding), each operation the host issues costs its dispatch and
launch whatever the tensor size, so the host's work sets a floor under the step time (README, "On a GPU").

- ATen calls: counted with torch's profiler on CPU, every `aten::` event (nested calls included, e.g. `aten::to` and
  the `aten::_to_copy` / `aten::copy_` inside it) of one training forward + backward of one 256 -> 512 linear,
  r = 32, 1 x 64 tokens (a (batch, sequence, d) input, as a model's layers get it), bf16 base under bf16 autocast,
  fp32 adapter weights (bench/kernel_speed.py's `build`). Counts do not depend on the machine.
- Host time: wall-clock microseconds of one training forward + backward of a 64 -> 64 linear with 1 x 4 tokens (same
  dtypes), where the arithmetic is negligible and the time is the host's: Python, dispatch, autograd. The variants
  run in turn in one process, `--rounds` rounds of `STEPS_PER_ROUND` steps each; the table gives each variant's
  median over rounds and its ratio to PEFT's HiRA. GateRA without the gate (`gate="none"`) and with the gate but no
  penalty (`entropy_weight=0`) split GateRA's extra host time into the branch's, the gate's and the penalty's.
- Decode host time: wall-clock microseconds of one forward of the same 64 -> 64 layer on one token in eval under
  `no_grad`, the bf16 model outside autocast with PEFT's fp32 adapter weights, as `generate()` runs a decoding step
  (the layer alone, not the PEFT model around it), same rounds and turns.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kernel_speed

VARIANTS = ("peft-lora", "peft-hira", "gatera-torch")
TIMED_VARIANTS = ("peft-lora", "peft-hira", "gatera-torch-none", "gatera-torch-no-penalty", "gatera-torch")
DECODE_VARIANTS = ("peft-lora", "peft-hira", "gatera-torch-none", "gatera-torch")
STEPS_PER_ROUND = 200


def _training_step(model, x):
    """One forward + backward of `model` on `x` under bf16 autocast."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().pow(2).mean().backward()


def _layer_and_input(variant: str, d_in: int, d_out: int, tokens: int):
    import torch
    from kernel_speed import build

    model = build(variant, d_in, d_out, torch.bfloat16, torch.device("cpu"), fp32_adapters=True)
    return model, torch.randn(1, tokens, d_in, dtype=torch.bfloat16, requires_grad=True)  # (batch, sequence, d)


def count_aten_calls(variant: str, d_in: int = 256, d_out: int = 512, tokens: int = 64) -> int:
    """ATen calls (profiler events named `aten::...`) in one forward + backward of `variant`'s adapted layer."""
    from torch.profiler import ProfilerActivity, profile

    model, x = _layer_and_input(variant, d_in, d_out, tokens)
    for _ in range(2):  # first calls create state (caches, warnings) that later steps do not repeat
        _training_step(model, x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _training_step(model, x)
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


def _median_microseconds(steps: dict, rounds: int, warmup: int) -> dict[str, float]:
    """Median over `rounds` of each variant's microseconds per call of its `steps[variant]()`, after `warmup` calls
    each, the variants taking turns within each round (`STEPS_PER_ROUND` calls per turn)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {variant: [] for variant in steps}
    for _ in range(rounds):
        for variant, step in steps.items():
            start = time.perf_counter()
            for _ in range(STEPS_PER_ROUND):
                step()
            times[variant].append((time.perf_counter() - start) / STEPS_PER_ROUND * 1e6)
    return {variant: statistics.median(values) for variant, values in times.items()}


def host_microseconds(variants, rounds: int, d: int = 64, tokens: int = 4) -> dict[str, float]:
    """Median over `rounds` of each variant's microseconds per forward + backward of a d -> d layer on `tokens` tokens,
    the variants taking turns within each round."""
    layers = {variant: _layer_and_input(variant, d, d, tokens) for variant in variants}
    steps = {variant: functools.partial(_training_step, model, x) for variant, (model, x) in layers.items()}
    return _median_microseconds(steps, rounds, warmup=3)


def decode_microseconds(variants, rounds: int, d: int = 64) -> dict[str, float]:
    """Median over `rounds` of each variant's microseconds per eval forward of a d -> d layer on one token under
    `no_grad`, outside autocast (a decoding step of `generate()`), the variants taking turns within each round."""
    import torch

    x = torch.randn(1, 1, d, dtype=torch.bfloat16)
    steps = {}
    for variant in variants:
        model, _ = _layer_and_input(variant, d, d, 1)
        layer = model.eval().base_model.model.proj  # (the adapted layer: what each decoding step runs)
        steps[variant] = functools.partial(layer, x)
    with torch.no_grad():
        return _median_microseconds(steps, rounds, warmup=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="rounds of the host-time measurement")
    parser.add_argument("--code", help="a checkout whose gatera_plugin to measure (e.g. a git worktree of an older "
                                       "commit), with this script's layer and input; default: the installed one")
    from _results import add_output_arguments, output_path, write_json

    add_output_arguments(parser, "bench/results/host_ops.json")
    args = parser.parse_args()
    out = output_path(parser, args, Path(__file__).parent / "results" / "host_ops.json")
    if args.code:
        sys.path.insert(0, str(Path(args.code).resolve()))
    import torch

    import gatera_plugin

    if args.code and not Path(gatera_plugin.__file__).resolve().is_relative_to(Path(args.code).resolve()):
        raise SystemExit(f"--code {args.code}: gatera_plugin was imported from {gatera_plugin.__file__} instead")

    counts = {variant: count_aten_calls(variant) for variant in VARIANTS}
    print("| variant | ATen calls per forward + backward | / PEFT HiRA |\n|---|---|---|")
    for variant, count in counts.items():
        print(f"| {variant} | {count} | {count / counts['peft-hira']:.2f}x |")
    host_us = host_microseconds(TIMED_VARIANTS, args.rounds)
    print("\n| variant | host µs per forward + backward (64 -> 64, 1 x 4 tokens) | / PEFT HiRA |\n|---|---|---|")
    for variant, us in host_us.items():
        print(f"| {variant} | {us:.0f} | {us / host_us['peft-hira']:.2f}x |")
    decode_us = decode_microseconds(DECODE_VARIANTS, args.rounds)
    print("\n| variant | host µs per decoding forward (64 -> 64, 1 token, no_grad, bf16) | / PEFT HiRA |\n|---|---|---|")
    for variant, us in decode_us.items():
        print(f"| {variant} | {us:.0f} | {us / decode_us['peft-hira']:.2f}x |")
    from _machine import recorded

    machine = recorded(code=Path(args.code).resolve() if args.code else None)  # (the commit of the code measured)
    write_json(out, {
        "aten_calls": counts,
        "host_us": {variant: round(us, 1) for variant, us in host_us.items()},
        "host_vs_peft_hira": {variant: round(us / host_us["peft-hira"], 3) for variant, us in host_us.items()},
        "decode_us": {variant: round(us, 1) for variant, us in decode_us.items()},
        "decode_vs_peft_hira": {variant: round(us / decode_us["peft-hira"], 3) for variant, us in decode_us.items()},
        "meta": {"machine": machine, "rounds": args.rounds, "steps_per_round": STEPS_PER_ROUND,
                 "timed_layer": "64 -> 64, 1 x 4 tokens",
                 "counted_layer": "256 -> 512, 1 x 64 tokens", "decode_layer": "64 -> 64, 1 token, eval, no_grad",
                 "threads": torch.get_num_threads(),
                 "code": str(Path(gatera_plugin.__file__).resolve().parent.parent)},
    }, args.overwrite, indent=2)


if __name__ == "__main__":
    main()
