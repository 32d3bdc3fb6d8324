"""Forward+backward of one gated HiRA layer: Triton kernels vs GateRA's PyTorch path vs PEFT's HiRA and LoRA layers.

    python bench/kernel_speed.py                 # on a CUDA machine: LLaMA-sized shapes, bf16
    python bench/kernel_speed.py --smoke         # CPU, tiny shapes, Triton interpreter: checks the script, times nothing

LLaMA-sized shapes (d_in x d_out): 4096 x 4096 (attention) and 4096 x 14336 (MLP), r = 32, 4k / 8k / 16k tokens,
bf16. For each: median milliseconds of forward + backward (CUDA events), TFLOP/s counted as the useful work of the
layer (the frozen base's GEMMs 2·N·d_in·d_out forward and 2·N·d_in·d_out backward for dx, plus the branch's own:
HiRA 6·N·d_in·d_out, LoRA 6·N·r·(d_in + d_out)), peak memory above the inputs, and ratios to PEFT's LoRA layer. Writes
bench/results/kernels.json. Without CUDA it says so and exits 0 (kernel speed is only measured on a GPU).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from pathlib import Path

SHAPES = [(4096, 4096), (4096, 14336)]
TOKENS = [4096, 8192, 16384]
RANK = 32


def build(variant: str, d_in: int, d_out: int, dtype, device, fp32_adapters: bool = False, nf4: bool = False):
    """One `d_in -> d_out` linear in `dtype` with `variant`'s adapter (B ~ N(0, 0.01)); adapter weights in `dtype`, or
    fp32 with `fp32_adapters` (PEFT's default for a bf16 model, as under bf16 autocast training). `nf4`: the base is
    a bitsandbytes NF4 `Linear4bit` (compute dtype `dtype`) holding the same weight, as in a QLoRA run."""
    import torch
    from peft import HiraConfig, LoraConfig, get_peft_model

    import gatera_plugin

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d_in, d_out, bias=False)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    gatera = functools.partial(gatera_plugin.GateRAConfig, r=RANK, target_modules=["proj"])
    config = {
        "gatera-triton": lambda: gatera(kernel="triton"),
        "gatera-torch": lambda: gatera(kernel="torch"),
        # the default: the PyTorch path, with the token gate's row kernels on CUDA (`kernels/rows.py`)
        "gatera-auto": lambda: gatera(kernel="auto"),
        # the PyTorch path without the token gate, and with the gate but no penalty (bench/host_ops.py's host time)
        "gatera-torch-none": lambda: gatera(kernel="torch", gate="none"),
        "gatera-torch-no-penalty": lambda: gatera(kernel="torch", entropy_weight=0.0),
        "peft-hira": lambda: HiraConfig(r=RANK, target_modules=["proj"]),
        "peft-lora": lambda: LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["proj"]),
    }[variant]()
    base = One().to(dtype=dtype)
    if nf4:
        import bitsandbytes as bnb

        weight = base.proj.weight.data
        base.proj = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=dtype, quant_type="nf4")
        base.proj.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        base.is_loaded_in_4bit = True  # what transformers sets; PEFT's HiRA picks its 4-bit layer only by this flag
    model = get_peft_model(base.to(device), config, autocast_adapter_dtype=fp32_adapters)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("_B" in name or "lora_B" in name):
                p.normal_(0, 0.01)
    return model.train()


def useful_flops(variant: str, n: int, d_in: int, d_out: int) -> float:
    base = 4 * n * d_in * d_out  # forward and dx: the base weight is frozen (no dW)
    branch = 6 * n * RANK * (d_in + d_out) if variant == "peft-lora" else 6 * n * d_in * d_out
    return base + branch


def time_variant(model, x, repeats: int, autocast_dtype=None) -> tuple[float, float]:
    """Median milliseconds of forward + backward over `repeats` (after 2 warm-up runs) and peak memory above the
    inputs in MiB; under `torch.autocast(autocast_dtype)` if given. On CPU (smoke runs): wall-clock time, no memory."""
    import contextlib
    import time

    import torch

    cuda = x.is_cuda
    amp = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_memory = torch.cuda.memory_allocated()
    for i in range(repeats + 2):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        start = time.perf_counter()
        with amp:
            out = model(x)
        out.backward(torch.ones_like(out))
        if cuda:
            end.record()
            torch.cuda.synchronize()
        if i >= 2:
            times.append(begin.elapsed_time(end) if cuda else (time.perf_counter() - start) * 1e3)
        model.zero_grad(set_to_none=True)
        x.grad = None
    peak = (torch.cuda.max_memory_allocated() - start_memory) / 2**20 if cuda else float("nan")
    return statistics.median(times), peak


def smoke() -> None:
    """Tiny shapes on CPU under Triton's interpreter: the variants build, run and agree; no timing."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    x = torch.randn(2, 9, 40)
    outputs = {}
    for variant in ("gatera-triton", "gatera-torch"):
        model = build(variant, 40, 24, torch.float32, "cpu")
        out = model(x)
        out.sum().backward()
        outputs[variant] = out.detach()
    torch.testing.assert_close(outputs["gatera-triton"], outputs["gatera-torch"], rtol=1e-5, atol=1e-5)
    print("smoke: Triton and PyTorch paths agree on CPU (interpreter); kernel timing needs CUDA")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    from _results import add_output_arguments, output_path, write_json

    add_output_arguments(parser, "bench/results/kernels.json")
    args = parser.parse_args()
    if args.smoke:
        smoke()
        return
    out = output_path(parser, args, Path(__file__).parent / "results" / "kernels.json")
    import torch

    if not torch.cuda.is_available():
        print("bench/kernel_speed.py needs a CUDA GPU: kernel speed has not been measured on this machine.")
        sys.exit(0)
    rows = []
    for d_in, d_out in SHAPES:
        for n in TOKENS:
            x = torch.randn(n, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            measured = {}
            for variant in ("peft-lora", "peft-hira", "gatera-torch", "gatera-triton"):
                model = build(variant, d_in, d_out, torch.bfloat16, "cuda")
                try:
                    ms, peak = time_variant(model, x, args.repeats)
                except torch.OutOfMemoryError:
                    ms, peak = float("nan"), float("nan")
                measured[variant] = (ms, peak)
                del model
                torch.cuda.empty_cache()
            lora_ms, lora_peak = measured["peft-lora"]
            for variant, (ms, peak) in measured.items():
                rows.append({"d_in": d_in, "d_out": d_out, "tokens": n, "variant": variant, "ms": ms,
                             "tflops": useful_flops(variant, n, d_in, d_out) / ms / 1e9, "peak_mb": peak,
                             "time_vs_lora": ms / lora_ms, "memory_vs_lora": peak / lora_peak})
    lines = ["| d_in x d_out | tokens | variant | fwd+bwd (ms) | TFLOP/s | peak (MB) | time / LoRA | memory / LoRA |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['d_in']}x{r['d_out']} | {r['tokens']} | {r['variant']} | {r['ms']:.2f} | "
                     f"{r['tflops']:.1f} | {r['peak_mb']:.0f} | {r['time_vs_lora']:.2f}x | {r['memory_vs_lora']:.2f}x |")
    print("\n".join(lines))
    write_json(out, {"device": torch.cuda.get_device_name(), "rows": rows}, args.overwrite, indent=2)


if __name__ == "__main__":
    main()
