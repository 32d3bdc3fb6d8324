"""Why HiRA needs a larger learning rate than LoRA, and what `hira_scaling` changes (README, "Learning rates").

    python bench/lr_transfer.py            # SmolLM2-135M-Instruct's RMS(W0) + the one-step table (~1 min)
    python bench/lr_transfer.py --tiny     # tiny random model only (seconds; CI smoke test)

(1) RMS of the base weights per projection: HiRA's update `W0 ⊙ BA` is `BA` scaled entry by entry by W0, so one
optimizer step of `BA` moves the output about RMS(W0) times as far as the same step of LoRA's `BA` (s = 1).
(2) Measured: the relative change of the logits after one Adam step (lr 1e-3) from the adapter's no-op init, for
PEFT's LoRA (alpha = r), GateRA's HiRA branch ungated (`gate="none"`) with `hira_scaling` "none" (PEFT's HiRA) and
"rms", and gated (GateRA's sigmoid gate, 0.5 at step 0) with "rms" and "lora" (the default), on a Llama-architecture
model whose weights have a pretrained model's scale (std 0.02). Writes
bench/results/lr_transfer.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def weight_rms(model) -> dict[str, dict[str, float]]:
    """{projection name: median / min / max RMS of its weights over the layers} for every nn.Linear but the head."""
    by_name: dict[str, list[float]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            by_name.setdefault(name.split(".")[-1], []).append(module.weight.float().square().mean().sqrt().item())
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in by_name.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="skip SmolLM2 (smoke test)")
    from _results import add_output_arguments, output_path, write_json

    add_output_arguments(parser, "bench/results/lr_transfer.json")
    args = parser.parse_args()
    out = output_path(parser, args, Path(__file__).parent / "results" / "lr_transfer.json")
    torch.manual_seed(0)
    from peft import LoraConfig

    from gatera_plugin import GateRAConfig
    from tests.helpers import one_step_output_change

    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    result: dict = {}
    if not args.tiny:
        from transformers import AutoModelForCausalLM

        from gatera_plugin.assets import smollm2_path

        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
        result["smollm2_weight_rms"] = weight_rms(model)
        print("| projection | RMS(W0) median | min | max |\n|---|---|---|---|")
        for name, row in result["smollm2_weight_rms"].items():
            print(f"| {name} | {row['median']:.3f} | {row['min']:.3f} | {row['max']:.3f} |")
    lora = one_step_output_change(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    rows = {"peft-lora": lora}
    for name, gate, scaling in (("gatera-hira (gate none)", "none", "none"),
                                ("gatera-hira, hira_scaling=rms", "none", "rms"),
                                ("gatera (sigmoid gate), hira_scaling=rms", "sigmoid", "rms"),
                                ("gatera (sigmoid gate), hira_scaling=lora (default)", "sigmoid", "lora")):
        rows[name] = one_step_output_change(GateRAConfig(r=4, target_modules=targets, gate=gate, hira_scaling=scaling))
    result["one_step_change"] = {name: {"relative_change": v, "ratio_to_lora": v / lora} for name, v in rows.items()}
    print("\n| method | logits change after one step (lr 1e-3) | / LoRA |\n|---|---|---|")
    for name, row in result["one_step_change"].items():
        print(f"| {name} | {row['relative_change']:.2e} | {row['ratio_to_lora']:.3f} |")
    write_json(out, result, args.overwrite, indent=1)


if __name__ == "__main__":
    main()
