"""Triton kernels against the PyTorch path, run on CPU by Triton's interpreter (TRITON_INTERPRET=1, set in conftest).

Outputs and every gradient, fp32 and fp16 (the interpreter mishandles bf16 `tl.dot`), odd shapes (not multiples of
the tiles), ranks 8-64, one token and many, gates near 0 and near 1; 4-bit weights read in the kernel bit for bit as
bitsandbytes dequantises them; dispatch rules.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1", "conftest sets TRITON_INTERPRET=1 before triton is imported"

from peft import get_peft_model  # noqa: E402

from gatera_plugin import GateRAConfig  # noqa: E402
from gatera_plugin.kernels.hira_triton import Packed4bit, dequantize_packed, triton_gated_hira  # noqa: E402
from gatera_plugin.kernels.lora_triton import triton_gated_lora  # noqa: E402
from gatera_plugin.ops import gated_hira, gated_lora  # noqa: E402
from tests.helpers import tiny_llama  # noqa: E402

CASES = [  # (tokens, d_in, d_out, r)
    (1, 24, 40, 8),
    (37, 45, 53, 8),
    (70, 33, 17, 16),
    (19, 80, 72, 32),
    (9, 40, 24, 64),
]


def _inputs(n, d_in, d_out, r, dtype, gate_level, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(n, d_in, generator=g),
        "A": torch.randn(r, d_in, generator=g) * 0.3,
        "B": torch.randn(d_out, r, generator=g) * 0.3,
        "base": torch.randn(n, d_out, generator=g),
        "W0": torch.randn(d_out, d_in, generator=g) * 0.5,
    }
    if gate_level == "mixed":
        t["gate"] = torch.rand(n, 1, generator=g)
    elif gate_level == "near0":
        t["gate"] = torch.rand(n, 1, generator=g) * 1e-4
    elif gate_level == "near1":
        t["gate"] = 1 - torch.rand(n, 1, generator=g) * 1e-4
    return {k: v.to(dtype).requires_grad_(k != "W0") for k, v in t.items()}


def _run(kind, t, use_triton, scaling=0.7, with_base=True):
    base = t["base"] if with_base else None
    gate = t.get("gate")
    if kind == "hira":
        fn = triton_gated_hira if use_triton else gated_hira
        out = fn(t["x"], gate, t["A"], t["B"], lambda: t["W0"], scaling, base=base)
    else:
        fn = triton_gated_lora if use_triton else gated_lora
        out = fn(t["x"], gate, t["A"], t["B"], scaling, base=base)
    names = [k for k in ("x", "gate", "A", "B", "base") if k in t and (k != "base" or with_base)]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    grads = torch.autograd.grad(out, [t[k] for k in names], grad_out)
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("kind", ["hira", "lora"])
@pytest.mark.parametrize("case", CASES, ids=[f"n{c[0]}-in{c[1]}-out{c[2]}-r{c[3]}" for c in CASES])
@pytest.mark.parametrize("gate_level", ["mixed", "near0", "near1", "none"])
def test_fp32_equals_torch_path(kind, case, gate_level):
    t = _inputs(*case, torch.float32, gate_level)
    out, grads = _run(kind, t, True, with_base=gate_level != "near1")
    ref, ref_grads = _run(kind, t, False, with_base=gate_level != "near1")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["hira", "lora"])
@pytest.mark.parametrize("case", CASES[1:4], ids=[f"n{c[0]}-in{c[1]}-out{c[2]}-r{c[3]}" for c in CASES[1:4]])
def test_fp16_error_within_2x_of_torch_fp16(kind, case):
    """Against the fp32 truth, the kernel's fp16 error stays within 2x the PyTorch path's own fp16 error (+2 ulp)."""
    truth_out, truth = _run(kind, _inputs(*case, torch.float32, "mixed"), False)
    ours_out, ours = _run(kind, _inputs(*case, torch.float16, "mixed"), True)
    torch_out, torch16 = _run(kind, _inputs(*case, torch.float16, "mixed"), False)
    eps = torch.finfo(torch.float16).eps

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    assert err(ours_out, truth_out) <= 2 * err(torch_out, truth_out) + 2 * eps * truth_out.abs().max().item()
    for name in truth:
        scale = truth[name].abs().max().item()
        assert err(ours[name], truth[name]) <= 2 * err(torch16[name], truth[name]) + 2 * eps * scale, name
        assert ours[name].dtype == torch.float16


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_packed_4bit_weight_is_read_bit_exactly(quant_type, nested, dtype):
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    W = torch.randn(48, 128, dtype=dtype)
    params = bnb.nn.Params4bit(W, requires_grad=False, quant_type=quant_type, compress_statistics=nested).to("cpu")
    expected = dequantize_4bit(params.data, params.quant_state).float()
    assert torch.equal(dequantize_packed(Packed4bit.from_params(params)), expected)


def test_packed_4bit_layout_matches_reference_on_odd_shapes():
    """bitsandbytes' reference (PyTorch) dequantisation on a row length that is not a multiple of the block size.

    (bitsandbytes 0.50's CPU `dequantize_4bit` disagrees with its own reference there: its C kernel indexes blocks
    per row. The kernels follow the reference layout, which quantize_4bit writes.)
    """
    bnb = pytest.importorskip("bitsandbytes")
    reference = pytest.importorskip("bitsandbytes.backends.default.ops")
    from bitsandbytes.backends.utils import _get_4bit_code

    W = torch.randn(48, 80)
    params = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4", compress_statistics=False).to("cpu")
    state = params.quant_state
    expected = reference._dequantize_4bit_compute(params.data.reshape(-1), state.absmax, _get_4bit_code("nf4", "cpu"),
                                                  state.blocksize, tuple(state.shape), torch.float32)
    assert torch.equal(dequantize_packed(Packed4bit.from_params(params)), expected)


def test_hira_kernel_with_packed_weight_equals_dense_weight():
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    params = bnb.nn.Params4bit(torch.randn(48, 128), requires_grad=False, quant_type="nf4").to("cpu")
    dense = dequantize_4bit(params.data, params.quant_state).float()
    t = _inputs(7, 128, 48, 8, torch.float32, "mixed")
    results = []
    for weight_fn in (lambda: Packed4bit.from_params(params), lambda: dense):
        out = triton_gated_hira(t["x"], t["gate"], t["A"], t["B"], weight_fn, 1.0, base=t["base"])
        grads = torch.autograd.grad(out, [t["x"], t["gate"], t["A"], t["B"]], torch.ones_like(out))
        results.append((out, grads))
    (packed_out, packed_grads), (dense_out, dense_grads) = results
    assert torch.equal(packed_out, dense_out)
    assert all(torch.equal(a, b) for a, b in zip(packed_grads, dense_grads))


def _assert_triton_model_equals_torch_model(make_model) -> None:
    """`make_model(kernel)` built with kernel="triton" (interpreted) and "torch": same logits and adapter gradients."""
    input_ids = torch.randint(3, 128, (2, 7))
    results = []
    for kernel in ("triton", "torch"):
        torch.manual_seed(0)
        model = make_model(kernel)
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (logits, grads), (ref_logits, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("branch", ["hira", "lora"])
def test_model_with_triton_kernels_equals_torch_kernels(branch):
    """A whole GateRA model with kernel="triton" (interpreted) gives the torch path's logits and gradients."""
    extra = {"lora_alpha": 8} if branch == "lora" else {}
    _assert_triton_model_equals_torch_model(lambda kernel: get_peft_model(tiny_llama(), GateRAConfig(
        r=8, target_modules=["q_proj", "down_proj"], branch=branch, init_weights=False, kernel=kernel, **extra)))


def test_4bit_model_with_triton_kernels_equals_torch_kernels(tmp_path):
    """The same on an NF4 base: the kernel dequantises the packed bytes itself."""
    pytest.importorskip("bitsandbytes")
    from tests.test_bnb import load_4bit

    tiny_llama(hidden=64, intermediate=128, init_std=0.2).save_pretrained(tmp_path)
    _assert_triton_model_equals_torch_model(lambda kernel: get_peft_model(load_4bit(tmp_path), GateRAConfig(
        r=8, target_modules=["down_proj"], init_weights=False, kernel=kernel)))


def test_auto_takes_the_torch_path_off_cuda(monkeypatch):
    import gatera_plugin.kernels.hira_triton as kernels

    def fail(*args, **kwargs):
        raise AssertionError("the Triton kernel must not run for CPU tensors with kernel='auto'")

    monkeypatch.setattr(kernels, "triton_gated_hira", fail)
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], init_weights=False))
    model(input_ids=torch.randint(3, 128, (1, 5))).logits.sum().backward()


def test_triton_off_cuda_without_interpreter_is_refused_clearly():
    code = (
        "import torch, gatera_plugin; from peft import get_peft_model; from tests.helpers import TwoLinear; "
        "m = get_peft_model(TwoLinear(), gatera_plugin.GateRAConfig(target_modules=['lin0'], kernel='triton')); "
        "m(torch.randn(2, 12))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode != 0
    assert "kernel='triton' runs on CUDA tensors" in done.stderr and "TRITON_INTERPRET=1" in done.stderr
