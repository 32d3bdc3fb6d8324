"""Training-step time and memory of GateRA vs PEFT's LoRA and HiRA, same model, rank, targets and batch.

    python bench/train_step.py                      # both sizes, all methods; table + bench/results/train_step.json
    python bench/train_step.py --sizes weight-heavy --rounds 4     # one size, fewer rounds
    python bench/train_step.py --precision bf16 --out bench/results/train_step_bf16.json   # as bf16 GPU runs train

- step time: all methods are built in one process and trained in turn, one step each, round after round, so that the
  machine's drift (it varied by 30% within minutes here) hits them alike; reported are the median CPU seconds per
  step (forward, backward, AdamW step; one thread) and the median over rounds of each step's ratio to LoRA's step
  of the same round;
- memory overhead: each method runs alone in a fresh process (peak RSS belongs to the process): peak RSS during
  training minus RSS after the model was built (activations, gradients, optimizer state and anything a method keeps
  between forward and backward), and its ratio to LoRA's. These processes run with `MALLOC_MMAP_THRESHOLD_=131072`,
  so that glibc returns every freed block of 128 KiB or more to the OS at once: with the default (dynamic)
  threshold, freed blocks below 32 MiB stay in the heap and RSS records the allocator's fragmentation history, which
  varied by 20-50% between identical runs here. The default allocator's figure is reported too.

Sizes: "activation-heavy" (hidden 512, 4 layers, batch 4 x 256 tokens: activations dominate) and "weight-heavy"
(hidden 2048, 2 layers, 1 x 128 tokens: a d_out x d_in tensor kept per adapted layer shows). Targets are the paper's
q, k, v, up, down; rank 32. The JSON's `round_ratios` holds the quartiles over rounds of gated GateRA's step against
`gate="none"` run apart ("gatera-none-apart": the token gate's own cost) and against PEFT's HiRA, and of
`gate="none"` (folded into one linear map per layer) against PEFT's HiRA and against itself run apart.

`--precision bf16` trains as a bf16 run on a GPU does (a bf16 model, adapter weights fp32 as PEFT keeps them, the step
under bf16 autocast): every method's large products run in bf16, and `gate="none"` folds only its backward (four
products of size N·d_in·d_out per step instead of five; three in fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    "activation-heavy": dict(hidden=512, layers=4, intermediate=1376, heads=8, batch=4, seq=256),
    "weight-heavy": dict(hidden=2048, layers=2, intermediate=5504, heads=16, batch=1, seq=128),
    "tiny": dict(hidden=64, layers=1, intermediate=128, heads=4, batch=1, seq=16),  # the tests' smoke run only
}
DEFAULT_SIZES = ["activation-heavy", "weight-heavy"]
METHODS = ["peft-lora", "peft-hira", "gatera", "gatera-none", "gatera-none-apart"]
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
RANK = 32
VOCAB = 1024


def build(method: str, size: dict, precision: str = "fp32"):
    import torch
    from peft import HiraConfig, LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import gatera_plugin

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["heads"],
        max_position_embeddings=size["seq"], tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    if precision == "bf16":  # (get_peft_model keeps the adapter weights fp32)
        model = model.to(torch.bfloat16)
    adapters = {
        "peft-lora": lambda: LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS),
        "peft-hira": lambda: HiraConfig(r=RANK, target_modules=TARGETS),
        "gatera": lambda: gatera_plugin.GateRAConfig(r=RANK, target_modules=TARGETS),
        "gatera-none": lambda: gatera_plugin.GateRAConfig(r=RANK, target_modules=TARGETS, gate="none"),
        "gatera-none-apart": lambda: gatera_plugin.GateRAConfig(r=RANK, target_modules=TARGETS, gate="none"),
        "gatera-lora": lambda: gatera_plugin.GateRAConfig(r=RANK, target_modules=TARGETS, branch="lora"),
        "peft-dora": lambda: LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, use_dora=True),
        "gatera-dora": lambda: gatera_plugin.GateRAConfig(r=RANK, target_modules=TARGETS, branch="dora"),
    }
    model = get_peft_model(model, adapters[method]())
    # non-zero B, as after some training (B = 0 would let autograd skip nothing, but keep it realistic)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and ("_B" in name or "lora_B" in name):
                param.normal_(0, 0.01)
    return model


def _batch(size: dict):
    import torch

    return torch.randint(0, VOCAB, (size["batch"], size["seq"]), generator=torch.Generator().manual_seed(1))


def _step(model, optimizer, input_ids, method: str, precision: str = "fp32") -> float:
    """One training step; its CPU seconds (one thread, so CPU time is the work done). "gatera-none-apart" runs
    `gate="none"` with the base layer and the branch apart (`gatera_plugin.layer.without_folding`), as gated GateRA
    and PEFT's HiRA do: gated over it is the token gate's own cost. `precision="bf16"`: forward and backward under
    bf16 autocast."""
    import torch

    from gatera_plugin.layer import without_folding

    start = time.process_time()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with without_folding() if method == "gatera-none-apart" else contextlib.nullcontext(), autocast:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.process_time() - start


def _setup(method: str, size: dict, precision: str = "fp32"):
    import torch

    model = build(method, size, precision)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def memory_worker(method: str, size_name: str, steps: int, precision: str) -> dict:
    """Peak-RSS overhead of training `method` alone in this process."""
    import gc

    import psutil
    import torch

    torch.set_num_threads(1)
    size = SIZES[size_name]
    model, optimizer = _setup(method, size, precision)
    input_ids = _batch(size)
    gc.collect()
    rss_built = psutil.Process().memory_info().rss
    for _ in range(steps):
        _step(model, optimizer, input_ids, method, precision)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "size": size_name, "overhead_mb": (peak - rss_built) / 2**20, "trainable": trainable}


def timing_worker(methods: list[str], size_name: str, rounds: int, warmup: int, precision: str) -> dict:
    """All methods in this process, one step each per round; CPU seconds per step for each."""
    import torch

    torch.set_num_threads(1)
    size = SIZES[size_name]
    input_ids = _batch(size)
    runs = {m: _setup(m, size, precision) for m in methods}
    for m, (model, optimizer) in runs.items():
        for _ in range(warmup):
            _step(model, optimizer, input_ids, m, precision)
    times = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            times[m].append(_step(*runs[m], input_ids, m, precision))
    return times


def run_worker(args: list[str], eager_free: bool = False):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if eager_free:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: a bf16 model (fp32 adapter weights) trained under bf16 autocast")
    parser.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    from _results import add_output_arguments, output_path, write_json

    add_output_arguments(parser, "bench/results/train_step.json, train_step_bf16.json with --precision bf16")
    args = parser.parse_args()
    if args.worker == "memory":
        print(json.dumps(memory_worker(args.methods[0], args.sizes[0], args.memory_steps, args.precision)))
        return
    if args.worker == "time":
        print(json.dumps(timing_worker(args.methods, args.sizes[0], args.rounds, args.warmup, args.precision)))
        return
    out = output_path(parser, args,
                      Path(__file__).parent / "results" / f"train_step{'_bf16' if args.precision == 'bf16' else ''}.json")
    if "peft-lora" not in args.methods:
        args.methods = ["peft-lora"] + args.methods  # the baseline of every ratio

    summary, raw = [], {}
    for size in args.sizes:
        times = run_worker(["--worker", "time", "--sizes", size, "--methods", *args.methods, "--rounds",
                            str(args.rounds), "--warmup", str(args.warmup), "--precision", args.precision])
        memory = {}
        for method in args.methods:
            common = ["--sizes", size, "--methods", method, "--memory-steps", str(args.memory_steps),
                      "--precision", args.precision]
            memory[method] = run_worker(["--worker", "memory", *common], eager_free=True)
            memory[method]["default_allocator_mb"] = run_worker(["--worker", "memory", *common])["overhead_mb"]
        raw[size] = {"step_cpu_s": times, "memory": memory}
        lora = times["peft-lora"]
        for method in args.methods:
            row = {
                "size": size, "method": method, "trainable": memory[method]["trainable"],
                "step_s": statistics.median(times[method]),
                "time_vs_lora": statistics.median(t / b for t, b in zip(times[method], lora)),
                "overhead_mb": memory[method]["overhead_mb"],
                "memory_vs_lora": memory[method]["overhead_mb"] / memory["peft-lora"]["overhead_mb"],
                "default_allocator_mb": memory[method]["default_allocator_mb"],
            }
            summary.append(row)
            print(f"  {size:17s} {method:12s} {row['step_s']:.3f} s/step ({row['time_vs_lora']:.2f}x LoRA)  "
                  f"+{row['overhead_mb']:.0f} MB ({row['memory_vs_lora']:.2f}x LoRA)", file=sys.stderr, flush=True)

    header = ("| size | method | trainable | step (CPU s) | time / LoRA | train memory (MB) | memory / LoRA "
              "| default-allocator RSS (MB) |")
    lines = [header, "|" + "---|" * 8]
    for s in summary:
        lines.append(f"| {s['size']} | {s['method']} | {s['trainable']:,} | {s['step_s']:.3f} | "
                     f"{s['time_vs_lora']:.2f}x | {s['overhead_mb']:.0f} | {s['memory_vs_lora']:.2f}x "
                     f"| {s['default_allocator_mb']:.0f} |")
    print("\n".join(lines))
    # the token gate's own cost (gated over gate="none" run apart), gated over PEFT's HiRA, what the fold gives
    # (gate="none" folded over PEFT's HiRA and over itself run apart), and the LoRA and DoRA branches gated over PEFT's
    # LoRA and DoRA, round by round
    pairs = {}
    for size, data in raw.items():
        times = data["step_cpu_s"]
        for method, baseline in (("gatera", "gatera-none-apart"), ("gatera", "peft-hira"), ("gatera-none", "peft-hira"),
                                 ("gatera-none", "gatera-none-apart"), ("gatera-lora", "peft-lora"),
                                 ("gatera-dora", "peft-dora")):
            if method in times and baseline in times:
                ratios = [t / b for t, b in zip(times[method], times[baseline])]
                q1, median, q3 = (statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1
                                  else ratios * 3)
                pairs[f"{size}: {method} / {baseline}"] = {"median": median, "q1": q1, "q3": q3}
                print(f"{size}: {method} / {baseline} = {median:.3f} (median over rounds; quartiles {q1:.3f}-"
                      f"{q3:.3f})")
    from _machine import recorded

    meta = {"rank": RANK, "targets": TARGETS, "sizes": {k: SIZES[k] for k in args.sizes}, "threads": 1,
            "precision": args.precision, "machine": recorded(file=sys.stderr),
            "rounds": args.rounds, "warmup": args.warmup, "memory_steps": args.memory_steps}
    out = write_json(out, {"meta": meta, "summary": summary, "round_ratios": pairs, "raw": raw}, args.overwrite,
                     indent=2)
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
