"""Inference latency of GateRA: prefill and per-token decode (HF `generate` with KV cache), as ratios to the base model.

    python bench/inference.py            # SmolLM2-135M-Instruct (offline, see gatera_plugin.assets)
    python bench/inference.py --tiny     # a small random Llama (smoke test)

Variants, all in one process and timed in turn, round after round (the machine drifts; ratios are taken per round):
- base: the model without adapter;
- gatera-dense: GateRA (HiRA branch, r=16, q/k/v/up/down) computing the branch for every token: a prefill rebuilds
  `W0 ⊙ BA` as in training, a decoding step's one token gets the factored update (`ops.hira.factored_update`, no
  ΔW formed);
- gatera-dense-formed (closed fraction 0 only): the same adapter with ΔW formed at every decoding step too (as
  before the factored update: `ops.hira.without_factoring()` while it runs);
- gatera-sparse-cached: the same adapter with `sparse_threshold=0.01` (tokens whose gate is below skip the branch)
  and `cache_delta=True` (the dense `s·W0 ⊙ BA` is built once and kept).

Each adapter gets random B (as after training) and saturated gates whose biases are calibrated per layer on the
prompt, so that a chosen fraction of (layer, token) gates is closed (g < 0.01) and the rest open (g > 0.99); the
fractions 0, 0.5 and 0.9 are measured. Prefill: one forward over a 128-token prompt. Decode: (generate 32 tokens
− prefill) / 32. Median CPU seconds, one thread. Writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def load(tiny: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if tiny:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    from gatera_plugin.assets import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)


def adapt(model, closed_fraction: float, prompt: torch.Tensor, **options):
    """GateRA with random B and gates closed for `closed_fraction` of each layer's prompt tokens."""
    from peft import get_peft_model

    from gatera_plugin import GateRAConfig
    from gatera_plugin.gates import SigmoidGate

    torch.manual_seed(1)
    peft_model = get_peft_model(model, GateRAConfig(r=16, target_modules=TARGETS, **options))
    logits = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: logits.__setitem__(name, args[0]))
             for name, m in peft_model.named_modules() if isinstance(m, SigmoidGate)]
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "gatera_B" in name:
                p.normal_(0, 0.02)
            if "gatera_gate" in name and name.endswith("weight"):
                p.normal_(0, 1.0)
        peft_model(input_ids=prompt)
        for h in hooks:
            h.remove()
        for name, module in peft_model.named_modules():
            if isinstance(module, SigmoidGate):
                z = (logits[name] @ module.weight.t()).flatten()
                scale = 50.0 / z.std().clamp(min=1e-6)  # saturate: |logit| large except right at the quantile
                module.weight.mul_(scale)
                cut = torch.quantile(z * scale, closed_fraction) if closed_fraction > 0 else (z * scale).min() - 50
                module.bias.fill_(-cut.item() + (1.0 if closed_fraction > 0 else 0.0))
    return peft_model.eval()


def measure(model, prompt, new_tokens: int) -> tuple[float, float]:
    with torch.no_grad():
        start = time.process_time()
        model(input_ids=prompt)
        prefill = time.process_time() - start
        start = time.process_time()
        model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)
        total = time.process_time() - start
    return prefill, (total - prefill) / new_tokens


def closed_fraction_of(model, prompt) -> float:
    from gatera_plugin.gates import SigmoidGate

    values = []
    hooks = [m.register_forward_hook(lambda mod, args, out: values.append(out.flatten()))
             for m in model.modules() if isinstance(m, SigmoidGate)]
    with torch.no_grad():
        model(input_ids=prompt)
    for h in hooks:
        h.remove()
    return (torch.cat(values) < 0.01).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    from _results import add_output_arguments, output_path, write_json

    add_output_arguments(parser, "bench/results/inference.json")
    args = parser.parse_args()
    out = output_path(parser, args, Path(__file__).parent / "results" / "inference.json")
    torch.set_num_threads(1)

    base = load(args.tiny).eval()
    prompt = torch.randint(100, base.config.vocab_size - 1, (1, args.prompt_length),
                           generator=torch.Generator().manual_seed(0))
    variants = {"base": base}
    for fraction in args.fractions:
        variants[f"gatera-dense@{fraction:g}"] = adapt(load(args.tiny), fraction, prompt)
        if fraction == 0:
            variants["gatera-dense-formed@0"] = variants["gatera-dense@0"]  # (the same model, run forming ΔW)
        variants[f"gatera-sparse-cached@{fraction:g}"] = adapt(load(args.tiny), fraction, prompt,
                                                              sparse_threshold=0.01, cache_delta=True)
    adapted = {id(m): m for name, m in variants.items() if name != "base"}  # (the formed variant shares its model)
    closed_by_model = {key: closed_fraction_of(m, prompt) for key, m in adapted.items()}
    closed = {name: closed_by_model[id(m)] for name, m in variants.items() if name != "base"}

    def run(name, new_tokens):
        from gatera_plugin.ops.hira import without_factoring

        with without_factoring() if name.startswith("gatera-dense-formed") else contextlib.nullcontext():
            return measure(variants[name], prompt, new_tokens)

    for name in variants:
        run(name, 4)  # warm-up
    times = {name: {"prefill": [], "decode": []} for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            prefill, decode = run(name, args.new_tokens)
            times[name]["prefill"].append(prefill)
            times[name]["decode"].append(decode)

    rows = []
    for name in variants:
        row = {"variant": name, "closed_fraction": closed.get(name)}
        for phase in ("prefill", "decode"):
            row[f"{phase}_s"] = statistics.median(times[name][phase])
            row[f"{phase}_vs_base"] = statistics.median(
                t / b for t, b in zip(times[name][phase], times["base"][phase]))
        rows.append(row)
    lines = ["| variant | closed gates | prefill (s) | prefill / base | decode (ms/token) | decode / base |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        closed_text = "-" if r["closed_fraction"] is None else f"{r['closed_fraction']:.2f}"
        lines.append(f"| {r['variant']} | {closed_text} | {r['prefill_s']:.3f} | {r['prefill_vs_base']:.2f}x | "
                     f"{1000 * r['decode_s']:.1f} | {r['decode_vs_base']:.2f}x |")
    print("\n".join(lines))
    from _machine import recorded

    meta = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")}
    meta["machine"] = recorded()
    write_json(out, {"meta": meta, "rows": rows, "raw": times}, args.overwrite, indent=2)


if __name__ == "__main__":
    main()
