"""One command validates GateRA on a GPU: correctness, speed and a real training run, as a table and JSON.

    python bench/gpu_check.py            # CUDA: about 3 minutes on one H200 (measured)
    python bench/gpu_check.py --smoke    # CPU smoke mode (the default without CUDA): tiny shapes, under a minute

Writes bench/results/gpu_check.json (`--out`). Five sections; each catches its own failures (a failed case is a row
with status "error" and the message, and the other rows and sections still run). Exit status 1 if anything failed,
or, on CUDA, was skipped (triton or bitsandbytes missing: the section is "incomplete").

(a) correctness: the PyTorch path (`gatera_plugin.ops.gated_hira`), the same with the token gate's row kernels
    (`kernels/rows.py`, as kernel="auto" runs it on CUDA; gated cases only) and the Triton kernels
    (`triton_gated_hira`, as `kernel="triton"` runs them: errors raised, no fallback), and for ungated adapters the
    base layer and the branch folded into one linear map (`ops.hira.folded_hira`, as the layer runs `gate="none"`:
    forward and backward folded in fp32, backward only in bf16 / fp16), against an fp64 reference, in fp32 / bf16 /
    fp16, with a dense and a bitsandbytes NF4 base weight, gated and ungated: the output and every gradient (x, A, B,
    the gate's weight and bias, the base output; folded: the bias's). Every dtype by the CPU tests' rule for half precision
    (`tests.helpers.rounding_bound`): within twice the error of naive autograd in the same dtype against fp64, plus
    2 ulp (for the gate bias, a sum over tokens, 2 ulp of Σ|terms|). fp32 too: at this shape its gradients sum
    hundreds of terms of size ~30, and their rounding (~6e-5, also the PyTorch path's) exceeds the CPU tests' fixed
    atol of 1e-5, which fits their smaller shapes. TF32 is off for this section.
(b) speed: forward + backward of one adapted linear, 4096 x 4096 and 4096 x 14336, r = 32, 4k and 16k tokens, bf16
    base weight (and a bitsandbytes NF4 base at 4096 x 14336), fp32 adapter weights (PEFT's default), bf16 autocast
    (and, at 4096 x 14336 with 4k tokens, without autocast, as a bf16 model runs outside it; with 16k tokens, an
    fp32 model without autocast): GateRA's PyTorch path (kernel="torch"), GateRA's default (kernel="auto": on CUDA
    the PyTorch path with the gate's row kernels), GateRA's Triton kernels, GateRA with `gate="none"` (folded into
    the base product in the fp32 model, its backward only in bf16), PEFT's HiRA and PEFT's LoRA, in one run; median ms, peak memory above the inputs, ratios to PEFT's LoRA and
    PEFT's HiRA (bench/kernel_speed.py's `build` and `time_variant`).
(c) training: 30 SFTTrainer steps of SmolLM2-135M (`gatera_plugin.assets.smollm2_path()`) on a bitsandbytes NF4 base,
    bf16: the loss falls (mean of the last 5 logged losses below the first 5), and the saved adapter, loaded onto a
    fresh 4-bit base, gives the trained model's logits: max difference within 2e-2 (tests/test_bnb.py's tolerance) or
    1% of the adapter's own effect on them (max |logits − logits with the adapter disabled|), whichever is larger.
(d) model step: whole training steps (forward, backward, AdamW) of a 2-layer Llama with Llama-3-8B's layer shapes
    (random weights, bf16, q/k/v/o/gate/up/down at r = 32, fp32 adapter weights, bf16 autocast), 1 x 4096 and
    1 x 16384 tokens: PEFT's LoRA and HiRA, GateRA (its default token gate and kernel="auto"), the same with the
    gate's input gradient added in place (`gatera-pass-input`: `gates.passing_input_on`, the CPU default, not yet a
    GPU's), with kernel="torch" (no row kernels) and GateRA with gate="none", and PEFT's DoRA against GateRA's gated
    DoRA branch (`branch="dora"`, the same lora_alpha); median ms
    (wall clock, so the host's own work per layer counts too), host_ms (until the step's last call returns, before
    waiting for the GPU: close to ms, the step is host-bound), syncs (the host-device synchronisations in one more
    step, counted by torch's sync debug mode, and the Python lines its warnings name: a sync makes host_ms include
    waiting for the GPU) and peak memory above the built model, as ratios to LoRA, HiRA and DoRA.
(e) generation: greedy `generate()` of (d)'s model in bf16, in eval and outside autocast, a 512-token prompt and 64
    new tokens: ms per new token of PEFT's LoRA and HiRA, GateRA, GateRA forming ΔW at every step (`gatera-formed`,
    as before the factored update) and GateRA with `cache_delta=True`.

Smoke mode runs the same code on CPU with tiny shapes; the Triton rows run under Triton's interpreter when
TRITON_INTERPRET=1 is set (except bf16, which the interpreter mishandles) and are skipped otherwise; (c) trains a tiny
random Llama and (d), (e) time a 1-layer one. Its timings mean nothing; it checks that the script works
(tests/test_bench_scripts.py runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.helpers: the tolerance rule and naive references the CPU tests use
sys.path.insert(0, str(Path(__file__).resolve().parent))  # kernel_speed

RANK = 32
SCALING = 0.7
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:600]


def _progress(row: dict) -> None:
    """One finished row on stderr, so that a run cut short still shows how far it got."""
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          file=sys.stderr, flush=True)


def _add_ratios(measured: dict, time_key: str, baselines: tuple = ("peft-lora",), memory: bool = True) -> None:
    """Each measured row's `time_vs_<baseline>` (its `time_key` over the baseline's) and, with `memory`,
    `memory_vs_<baseline>` (peak memory over the baseline's; nan without a measured peak); `measured`: method -> row."""
    for row in measured.values():
        for baseline in baselines:
            if baseline not in measured:
                continue
            name = baseline.removeprefix("peft-")
            row[f"time_vs_{name}"] = row[time_key] / measured[baseline][time_key]
            if memory:
                peak = measured[baseline]["peak_mb"]
                row[f"memory_vs_{name}"] = row["peak_mb"] / peak if peak else float("nan")


def _cuda(device) -> bool:
    return device.type == "cuda"


def _empty_cache(device) -> None:
    import torch

    if _cuda(device):
        torch.cuda.empty_cache()


def _triton_skip(device, dtype) -> str | None:
    """Why the Triton path cannot run here, or None."""
    import torch

    from gatera_plugin.kernels import interpreting, triton_available

    if not triton_available():
        return "triton is not installed"
    if not _cuda(device) and not interpreting():
        return "no CUDA (TRITON_INTERPRET=1 runs the kernels in Triton's CPU interpreter)"
    if not _cuda(device) and dtype == torch.bfloat16:
        return "Triton's interpreter mishandles bf16 tl.dot"
    return None


# ----------------------------------------------------------------------------------------------- (a) correctness
def _nf4(W, device):
    """A bitsandbytes NF4 parameter of W (quantised on its way to `device`) and its dequantised value."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    params = bnb.nn.Params4bit(W.cpu(), requires_grad=False, quant_type="nf4").to(device)
    return params, dequantize_4bit(params.data, params.quant_state)


def check_case(path: str, dtype, weight: str, gated: bool, shape: tuple, device) -> dict:
    """Output and every gradient of one case against naive autograd in `dtype` and in fp64 (the truth). `path`:
    "torch", "rows", "triton" (the branch added to a given base output) or "folded" (ungated: the base layer
    `x W0ᵀ + bias` and the branch as one map)."""
    import torch

    from tests.helpers import max_error, naive_gated_hira, rounding_bound

    n, d_in, d_out, r = shape
    folded = path == "folded"
    if folded and gated:
        raise ValueError("the folded path is ungated only")
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(d_out, d_in, generator=g) * 0.5).to(dtype)
    inputs = {"x": torch.randn(n, d_in, generator=g), "A": torch.randn(r, d_in, generator=g) * 0.3,
              "B": torch.randn(d_out, r, generator=g) * 0.3}
    if folded:
        inputs["bias"] = torch.randn(d_out, generator=g)
    else:
        inputs["base"] = torch.randn(n, d_out, generator=g)
    if gated:
        inputs["gate_weight"] = torch.randn(1, d_in, generator=g) * 0.3
        inputs["gate_bias"] = torch.randn(1, generator=g)
    grad_out = torch.randn(n, d_out, generator=g)
    if weight == "nf4":
        params, W0 = _nf4(W, device)
    else:
        params, W0 = None, W.to(device)
    weight_fn = lambda: W0  # noqa: E731 (the layer's `base_weight` dequantises NF4 the same way)
    if folded:
        from gatera_plugin.ops.hira import folded_hira as function
    elif path == "triton":
        from gatera_plugin.kernels.hira_triton import Packed4bit, triton_gated_hira as function

        if params is not None:
            weight_fn = lambda: Packed4bit.from_params(params)  # noqa: E731
    else:
        from gatera_plugin.ops import gated_hira

        function = gated_hira
        if path == "rows":  # the PyTorch path with the token gate's row kernels, errors raised
            from gatera_plugin.kernels.rows import TRITON_ROWS_RAISING

            function = functools.partial(gated_hira, row_ops=TRITON_ROWS_RAISING)

    def run(precision, ours: bool):
        t = {k: v.to(device=device, dtype=precision).requires_grad_() for k, v in inputs.items()}
        if ours and folded:  # (as the layer folds: forward and backward in fp32, backward only in bf16 / fp16)
            out = function(t["x"], t["A"], t["B"], weight_fn, SCALING, bias=t["bias"],
                           fold_forward=precision not in (torch.float16, torch.bfloat16))
        elif ours:
            # (as the layer: σ of the logits in fp32 at least, and the gate passed in that dtype)
            gate = torch.sigmoid((t["x"] @ t["gate_weight"].t() + t["gate_bias"]).to(
                torch.promote_types(precision, torch.float32))) if gated else None
            out = function(t["x"], gate, t["A"], t["B"], weight_fn, SCALING, base=t["base"])
        else:
            update = naive_gated_hira(t["x"], W0.to(precision), t["A"], t["B"], t.get("gate_weight"),
                                      t.get("gate_bias"), SCALING)
            base = torch.nn.functional.linear(t["x"], W0.to(precision), t["bias"]) if folded else t["base"]
            out = base + update
        grads = torch.autograd.grad(out, list(t.values()), grad_out.to(device=device, dtype=out.dtype))
        return {"out": out, **{f"d{k}": gr for k, gr in zip(t, grads)}}

    truth, naive, ours = run(torch.float64, False), run(dtype, False), run(dtype, True)
    scales = {}
    if gated:  # the bias gradient sums s·g(1−g)·δ·(ΔW x) over tokens, terms that cancel: its ulp is Σ|terms|'s
        t = {k: v.to(device=device, dtype=torch.float64) for k, v in inputs.items()}
        gate = torch.sigmoid(t["x"] @ t["gate_weight"].t() + t["gate_bias"])
        update = t["x"] @ (W0.double() * (t["B"] @ t["A"])).t()
        terms = SCALING * gate * (1 - gate) * (grad_out.to(update) * update).sum(-1, keepdim=True)
        scales["dgate_bias"] = terms.abs().sum().item()
    worst, failed = 0.0, []
    for name in truth:
        error = max_error(ours[name], truth[name])
        bound = rounding_bound(naive[name], truth[name], dtype, scale=scales.get(name))
        worst = max(worst, error / bound if bound > 0 else (0.0 if error == 0 else float("inf")))
        if error > bound:
            failed.append(f"{name} error {error:.3g} > {bound:.3g}")
    return {"status": "ok" if not failed else "failed", "error_over_bound": worst, "detail": "; ".join(failed)}


def correctness(device, smoke: bool) -> list[dict]:
    import torch

    shape = (9, 64, 24, 8) if smoke else (257, 320, 448, RANK)  # tokens, d_in, d_out, r: none a multiple of a tile
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    try:
        import bitsandbytes  # noqa: F401

        nf4_skip = None
    except Exception as exc:  # noqa: BLE001 (any import failure means: no NF4 rows)
        nf4_skip = f"bitsandbytes unavailable ({_error(exc)})"
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    try:
        for path in ("torch", "rows", "folded", "triton"):
            for dtype_name, dtype in dtypes.items():
                for weight in ("dense", "nf4"):
                    for gated in {"rows": (True,), "folded": (False,)}.get(path, (True, False)):
                        row = {"path": path, "dtype": dtype_name, "weight": weight, "gated": gated,
                               "shape": "x".join(map(str, shape))}
                        skip = (_triton_skip(device, dtype) if path in ("rows", "triton") else None) or (
                            nf4_skip if weight == "nf4" else None)
                        if skip:
                            row.update(status="skipped", detail=skip)
                        else:
                            try:
                                row.update(check_case(path, dtype, weight, gated, shape, device))
                            except Exception as exc:  # noqa: BLE001 (reported in the row)
                                row.update(status="error", detail=_error(exc))
                            _empty_cache(device)
                        rows.append(row)
                        _progress(row)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32
    return rows


# ----------------------------------------------------------------------------------------------- (b) speed
def speed(device, smoke: bool, repeats: int) -> list[dict]:
    import torch
    from kernel_speed import build, time_variant, useful_flops

    tokens = [32] if smoke else [4096, 16384]
    # (weight, d_in, d_out, autocast): dense at both shapes; an NF4 base (QLoRA) at the MLP shape; the MLP shape
    # outside autocast, as a bf16 model runs without it (PEFT casts the input to its fp32 adapter weights there); and
    # an fp32 model at the MLP shape and the most tokens, without autocast, where gate="none" folds the adapter into
    # the base product (three products; with bf16 products it folds its backward only, four products: README,
    # "Ungated HiRA folds into the base layer")
    cases = [("dense", 64, 96, True), ("nf4", 64, 96, True), ("dense", 64, 96, False),
             ("dense-fp32", 64, 96, False)] if smoke else [
        ("dense", 4096, 4096, True), ("dense", 4096, 14336, True), ("nf4", 4096, 14336, True),
        ("dense", 4096, 14336, False), ("dense-fp32", 4096, 14336, False)]
    rows = []
    for weight, d_in, d_out, autocast in cases:
        dtype = torch.float32 if weight == "dense-fp32" else torch.bfloat16
        for n in tokens[-1:] if weight == "dense-fp32" else tokens if autocast else tokens[:1]:
            x = torch.randn(n, d_in, device=device, dtype=dtype, requires_grad=True)
            measured = {}
            for variant in ("peft-lora", "peft-hira", "gatera-torch", "gatera-auto", "gatera-triton",
                            "gatera-torch-none"):
                row = {"weight": weight, "autocast": autocast, "d_in": d_in, "d_out": d_out, "tokens": n,
                       "variant": variant}
                skip = _triton_skip(device, dtype) if variant == "gatera-triton" else None
                if skip:
                    row.update(status="skipped", detail=skip)
                else:
                    model = None
                    try:
                        model = build(variant, d_in, d_out, dtype, device, fp32_adapters=True, nf4=weight == "nf4")
                        ms, peak = time_variant(model, x, 2 if smoke else repeats,
                                                autocast_dtype=dtype if autocast else None)
                        row.update(status="ok", ms=ms, peak_mb=peak,
                                   tflops=useful_flops(variant, n, d_in, d_out) / ms / 1e9)
                        measured[variant] = row
                    except Exception as exc:  # noqa: BLE001 (OOM, compile errors: reported in the row)
                        row.update(status="error", detail=_error(exc))
                    del model
                    _empty_cache(device)
                rows.append(row)
                _progress(row)
            _add_ratios(measured, "ms", baselines=("peft-lora", "peft-hira"))
            del x
            _empty_cache(device)
    return rows


# ----------------------------------------------------------------------------------------------- (c) training
def training(device, smoke: bool, steps: int) -> list[dict]:
    """Section (c) in a temporary folder that is removed afterwards (the run's checkpoints and adapter)."""
    with tempfile.TemporaryDirectory(prefix="gatera-gpu-check-") as work:
        return _train_and_reload(Path(work), device, smoke, steps)


def _train_and_reload(work: Path, device, smoke: bool, steps: int) -> list[dict]:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from trl import SFTConfig, SFTTrainer

    from gatera_plugin import GateRAConfig
    from tests.helpers import load_4bit, toy_texts

    texts = toy_texts(256)
    if smoke:
        from tests.helpers import tiny_llama, word_tokenizer

        path = work / "tiny"
        tiny_llama(hidden=64, intermediate=128, init_std=0.2).save_pretrained(path)
        tokenizer = word_tokenizer(toy_texts(64))
        model_name, compute_dtype, batch, rank = "tiny random Llama", torch.float32, 8, 4
    else:
        from transformers import AutoTokenizer

        import gatera_plugin.assets

        path = gatera_plugin.assets.smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model_name, compute_dtype, batch, rank = "SmolLM2-135M", torch.bfloat16, 16, 16
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    row = {"model": model_name, "base": "bitsandbytes NF4", "steps": steps}
    torch.manual_seed(0)
    args = SFTConfig(
        output_dir=str(work / "run"), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-2,
        logging_steps=1, report_to="none", use_cpu=not _cuda(device), bf16=compute_dtype == torch.bfloat16,
        save_strategy="no", seed=0, max_length=64, disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=load_4bit(path, compute_dtype, device=device), args=args, train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer, peft_config=GateRAConfig(r=rank, target_modules=TARGETS),
    )
    start = time.time()
    trainer.train()
    row["train_seconds"] = time.time() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    row.update(first_loss=first, last_loss=last, loss_falls=last < first)

    model = trainer.model.eval()
    model.save_pretrained(work / "adapter")
    input_ids = tokenizer(texts[0], return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        trained = model(input_ids=input_ids).logits.float()
        with model.disable_adapter():
            untrained = model(input_ids=input_ids).logits.float()
    row["adapter_effect"] = (trained - untrained).abs().max().item()
    # TRL casts a quantised model's adapter factors to bf16 (QLoRA's recipe); PEFT loads them in fp32 (the same values):
    # compared in the trained model's dtypes, the reload is checked, not that cast
    dtypes = {name: param.dtype for name, param in model.named_parameters() if param.requires_grad}
    del trainer, model
    _empty_cache(device)
    reloaded = PeftModel.from_pretrained(load_4bit(path, compute_dtype, device=device), work / "adapter").eval()
    for name, param in reloaded.named_parameters():
        if name in dtypes:
            param.data = param.data.to(dtypes[name])
    with torch.no_grad():
        again = reloaded(input_ids=input_ids).logits.float()
    row["reload_max_diff"] = (trained - again).abs().max().item()
    row["reloads_same"] = row["reload_max_diff"] <= max(2e-2, 0.01 * row["adapter_effect"])
    row["status"] = "ok" if row["loss_falls"] and row["reloads_same"] else "failed"
    return [row]


# ----------------------------------------------------------------------------------------------- (d) model step
# A 2-layer Llama with Llama-3-8B's layer shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads); random weights
MODEL_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   num_hidden_layers=2, vocab_size=32000)
SMOKE_MODEL_SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=128)
MODEL_METHODS = ("peft-lora", "peft-hira", "gatera", "gatera-pass-input", "gatera-kernel-torch", "gatera-none",
                 "peft-dora", "gatera-dora")


def _method_config(method: str):
    from peft import HiraConfig, LoraConfig

    from gatera_plugin import GateRAConfig

    return {
        "peft-lora": lambda: LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS),
        "peft-hira": lambda: HiraConfig(r=RANK, target_modules=TARGETS),
        "peft-dora": lambda: LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, use_dora=True),
        "gatera-dora": lambda: GateRAConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, branch="dora"),
        "gatera": lambda: GateRAConfig(r=RANK, target_modules=TARGETS),
        "gatera-kernel-torch": lambda: GateRAConfig(r=RANK, target_modules=TARGETS, kernel="torch"),
        "gatera-none": lambda: GateRAConfig(r=RANK, target_modules=TARGETS, gate="none"),
        "gatera-cache-delta": lambda: GateRAConfig(r=RANK, target_modules=TARGETS, cache_delta=True),
        "gatera-formed": lambda: GateRAConfig(r=RANK, target_modules=TARGETS),  # run under `without_factoring()`
        # run under `gates.passing_input_on(device)`: the gate's input gradient added in place, as on CPU
        "gatera-pass-input": lambda: GateRAConfig(r=RANK, target_modules=TARGETS),
    }[method]()


def _llama(shape: dict, dtype, device, positions: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=max(positions, 64), pad_token_id=0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def model_step(device, smoke: bool, repeats: int) -> list[dict]:
    """Whole training steps (forward, backward, AdamW) of each method on the same model: ms, host_ms (the time to
    issue the step, before waiting for the GPU) and peak memory above the built model, as ratios to PEFT's LoRA, HiRA
    and DoRA. bf16 weights, fp32 adapter weights, bf16 autocast, 1 x T tokens."""
    import torch
    from peft import get_peft_model

    shape = SMOKE_MODEL_SHAPE if smoke else MODEL_SHAPE
    dtype = torch.float32 if smoke else torch.bfloat16
    rows = []
    for n in [16] if smoke else [4096, 16384]:
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(3, shape["vocab_size"], (1, n), generator=generator).to(device)
        measured = {}
        for method in MODEL_METHODS:
            row = {"tokens": n, "method": method}
            model = optimizer = step = None
            try:
                model = get_peft_model(_llama(shape, dtype, device, n), _method_config(method),
                                       autocast_adapter_dtype=True).train()
                optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
                times, host_times = [], []
                if _cuda(device):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    start_memory = torch.cuda.memory_allocated()
                step = functools.partial(_training_step, model, optimizer, input_ids, autocast=not smoke)
                if method == "gatera-pass-input":
                    step = functools.partial(_passing_input, device, step)
                for i in range(2 + (2 if smoke else repeats)):
                    begin = time.perf_counter()
                    step()
                    issued = time.perf_counter()
                    if _cuda(device):
                        torch.cuda.synchronize()
                    if i >= 2:
                        times.append((time.perf_counter() - begin) * 1e3)
                        host_times.append((issued - begin) * 1e3)
                peak = (torch.cuda.max_memory_allocated() - start_memory) / 2**20 if _cuda(device) else float("nan")
                row.update(status="ok", ms=statistics.median(times), host_ms=statistics.median(host_times),
                           peak_mb=peak)
                row.update(_syncs(step, device))
                measured[method] = row
            except Exception as exc:  # noqa: BLE001 (OOM and the like: reported in the row)
                row.update(status="error", detail=_error(exc))
            del model, optimizer, step
            _empty_cache(device)
            rows.append(row)
            _progress(row)
        _add_ratios(measured, "ms", baselines=("peft-lora", "peft-hira", "peft-dora"))
    return rows


def _passing_input(device, step) -> None:
    """`step()` with the sigmoid gate passing x on through `gates._LogitsAndInput` on `device` (the CPU default; not
    yet on a GPU: this row measures it there)."""
    from gatera_plugin.gates import passing_input_on

    with passing_input_on(device.type):
        step()


def _training_step(model, optimizer, input_ids, autocast: bool) -> None:
    """One training step (forward under bf16 autocast, backward, AdamW) on `input_ids` (1, T) as their own labels."""
    import torch

    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _syncs(step, device) -> dict:
    """The host-device synchronisations in one call of `step` on CUDA (torch's sync debug mode warns at each one):
    `syncs` (count) and `sync_sources` (the Python lines the warnings name, most frequent first: a sync inside
    autograd's C++ backward is named by the `backward()` call, one inside a torch function by torch's file). Off
    CUDA: None. A failure of the count is reported in `sync_sources`, keeping the row's timings."""
    import warnings
    from collections import Counter

    import torch

    if not _cuda(device):
        return {"syncs": None, "sync_sources": None}
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.cuda.set_sync_debug_mode("warn")
            step()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 (reported, not raised: the row keeps its timings)
            return {"syncs": None, "sync_sources": f"count failed: {_error(exc)}"}
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    sources = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"syncs": sum(sources.values()), "sync_sources": [f"{where} x{n}" for where, n in sources.most_common(5)]}


# ----------------------------------------------------------------------------------------------- (e) generation
def generation(device, smoke: bool, repeats: int) -> list[dict]:
    """Greedy `generate()` on (d)'s model in bf16, in eval and outside autocast, as an evaluation or a serving loop
    runs it: one 512-token prompt (smoke: 8), 64 new tokens (smoke: 4); median ms per new token over `repeats`
    calls, and the ratio to LoRA. GateRA as it is (a decoding step's token gets the factored update, a prefill forms
    `W0 ⊙ BA`), with ΔW formed at every step too (`gatera-formed`: `ops.hira.without_factoring()`, as before the
    factored update), and with `cache_delta=True`."""
    import contextlib

    import torch
    from peft import get_peft_model

    from gatera_plugin.ops.hira import without_factoring

    shape = SMOKE_MODEL_SHAPE if smoke else MODEL_SHAPE
    dtype = torch.float32 if smoke else torch.bfloat16
    prompt, new = (8, 4) if smoke else (512, 64)
    input_ids = torch.randint(3, shape["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(device)
    rows, measured = [], {}
    for method in ("peft-lora", "peft-hira", "gatera", "gatera-formed", "gatera-cache-delta"):
        row = {"prompt": prompt, "new_tokens": new, "method": method}
        model = None
        try:
            model = get_peft_model(_llama(shape, dtype, device, prompt + new), _method_config(method)).eval()
            times = []
            forming = without_factoring() if method == "gatera-formed" else contextlib.nullcontext()
            with torch.no_grad(), forming:
                for i in range(1 + (2 if smoke else repeats)):
                    if _cuda(device):
                        torch.cuda.synchronize()
                    begin = time.perf_counter()
                    out = model.generate(input_ids=input_ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                         pad_token_id=0)
                    if _cuda(device):
                        torch.cuda.synchronize()
                    if i >= 1:
                        times.append((time.perf_counter() - begin) * 1e3 / new)
            assert out.shape[1] == prompt + new, out.shape
            row.update(status="ok", ms_per_token=statistics.median(times))
            measured[method] = row
        except Exception as exc:  # noqa: BLE001 (reported in the row)
            row.update(status="error", detail=_error(exc))
        del model
        _empty_cache(device)
        rows.append(row)
        _progress(row)
    _add_ratios(measured, "ms_per_token", memory=False)
    return rows


# ----------------------------------------------------------------------------------------------- report
def run_section(name: str, function, *args, skips_fail: bool = False) -> dict:
    """Run one section; a crash outside its own rows becomes the section's error, never the script's.

    `skips_fail` (on CUDA): a skipped row (triton or bitsandbytes missing) makes the section "incomplete", which fails
    the run: a GPU check that left cases out has not validated them."""
    start = time.time()
    try:
        rows = function(*args)
        statuses = {r["status"] for r in rows}
        if statuses <= {"ok", "skipped"}:
            status = "incomplete" if skips_fail and "skipped" in statuses else "ok"
        else:
            status = "failed"
        section = {"status": status, "rows": rows}
    except Exception as exc:  # noqa: BLE001 (reported, the other sections still run)
        section = {"status": "error", "error": _error(exc), "traceback": traceback.format_exc()[-4000:], "rows": []}
    section["seconds"] = time.time() - start
    print(f"[{name}] {section['status']} in {section['seconds']:.0f} s", file=sys.stderr, flush=True)
    return section


def _fmt(value, spec=".3g"):
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def table(title: str, section: dict, columns: list[str]) -> str:
    lines = [f"### {title}: {section['status']} ({section['seconds']:.0f} s)"]
    if section.get("error"):
        lines.append(f"section error: {section['error']}")
    if section["rows"]:
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in section["rows"]:
            lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU smoke mode (the default without CUDA)")
    parser.add_argument("--sections", nargs="+", default=["a", "b", "c", "d", "e"], choices=["a", "b", "c", "d", "e"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant in (b), (d) and (e)")
    parser.add_argument("--steps", type=int, default=30, help="SFTTrainer steps in (c)")
    from _results import add_output_arguments, output_path_by_mode, write_json

    add_output_arguments(parser, "bench/results/gpu_check.json on CUDA, bench/results/gpu_check_smoke.json in "
                         "smoke mode, which git ignores and each smoke run replaces")
    args = parser.parse_args()

    import torch

    smoke = args.smoke or not torch.cuda.is_available()
    out, overwrite = output_path_by_mode(parser, args, smoke, ROOT / "bench" / "results", "gpu_check")
    device = torch.device("cpu" if smoke else "cuda")
    meta = {"mode": "smoke (CPU)" if smoke else "cuda", "torch": torch.__version__, "python": platform.python_version(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    from _machine import machine_info

    meta["machine"] = machine_info()
    if _cuda(device):
        meta["device"] = torch.cuda.get_device_name(device)
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    with contextlib.suppress(Exception):
        import triton

        meta["triton"] = triton.__version__
    print(f"gpu_check: {meta}", file=sys.stderr, flush=True)

    sections, layouts = {}, {
        "a": ("correctness", correctness, (device, smoke),
              ["path", "dtype", "weight", "gated", "status", "error_over_bound", "detail"]),
        "b": ("speed", speed, (device, smoke, args.repeats),
              ["weight", "autocast", "d_in", "d_out", "tokens", "variant", "status", "ms", "tflops", "peak_mb",
               "time_vs_lora", "time_vs_hira", "memory_vs_lora", "detail"]),
        "c": ("training", training, (device, smoke, args.steps),
              ["model", "base", "steps", "status", "first_loss", "last_loss", "loss_falls", "adapter_effect",
               "reload_max_diff", "reloads_same", "train_seconds"]),
        "d": ("model step", model_step, (device, smoke, args.repeats),
              ["tokens", "method", "status", "ms", "host_ms", "syncs", "peak_mb", "time_vs_lora", "time_vs_hira",
               "time_vs_dora", "memory_vs_lora", "memory_vs_dora", "detail"]),
        "e": ("generation", generation, (device, smoke, args.repeats),
              ["prompt", "new_tokens", "method", "status", "ms_per_token", "time_vs_lora", "detail"]),
    }
    report = []
    for key in args.sections:
        name, function, fargs, columns = layouts[key]
        sections[name] = run_section(name, function, *fargs, skips_fail=not smoke)
        report.append(table(f"({key}) {name}", sections[name], columns))
        print(report[-1] + "\n", file=sys.stderr, flush=True)
        # written after every section: a run stopped by a time limit keeps what it measured
        out = write_json(out, {"meta": meta, "sections": sections}, overwrite, indent=2, default=str)
        overwrite = True  # (later sections replace this run's own file)
    print("\n\n".join(report))
    print(f"\nwrote {out}", file=sys.stderr)
    sys.exit(0 if all(s["status"] == "ok" for s in sections.values()) else 1)


if __name__ == "__main__":
    main()
