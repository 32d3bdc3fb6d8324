"""Host-side work per adapted layer: ATen calls in one forward + backward, GateRA vs PEFT's HiRA and LoRA.

    python bench/host_ops.py        # table + bench/results/host_ops.json; CPU, a few seconds

Where a layer's GPU work is small (few tokens, decoding), each operation the host issues costs its dispatch and
launch whatever the tensor size, so the count of operations sets a floor under the step time (README, "On a GPU").
Counted with torch's profiler on CPU: every `aten::` event (nested calls included, e.g. `aten::to` and the
`aten::_to_copy` / `aten::copy_` inside it) of one training forward + backward of one 256 -> 512 linear, r = 32,
64 tokens, bf16 base under bf16 autocast, fp32 adapter weights (bench/kernel_speed.py's `build`). Counts do not
depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kernel_speed

VARIANTS = ("peft-lora", "peft-hira", "gatera-torch")


def count_aten_calls(variant: str, d_in: int = 256, d_out: int = 512, tokens: int = 64) -> int:
    """ATen calls (profiler events named `aten::...`) in one forward + backward of `variant`'s adapted layer."""
    import torch
    from kernel_speed import build
    from torch.profiler import ProfilerActivity, profile

    model = build(variant, d_in, d_out, torch.bfloat16, torch.device("cpu"), fp32_adapters=True)
    x = torch.randn(tokens, d_in, dtype=torch.bfloat16, requires_grad=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().pow(2).mean().backward()

    for _ in range(2):  # first calls create state (caches, warnings) that later steps do not repeat
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "host_ops.json"))
    args = parser.parse_args()
    counts = {variant: count_aten_calls(variant) for variant in VARIANTS}
    print("| variant | ATen calls per forward + backward | / PEFT HiRA |\n|---|---|---|")
    for variant, count in counts.items():
        print(f"| {variant} | {count} | {count / counts['peft-hira']:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"aten_calls": counts}, indent=2))


if __name__ == "__main__":
    main()
