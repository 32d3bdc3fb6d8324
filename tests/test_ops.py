"""The memory-lean branch functions against naive autograd references: outputs, all gradients, saved memory."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gatera_plugin.ops import gated_channel_scale, gated_hira, gated_lora
from tests.helpers import (
    FP32_TOLERANCE,
    max_error,
    naive_gated_hira,
    naive_gated_lora,
    rounding_bound,
    within_tolerance,
)

D_IN, D_OUT, R, N = 24, 40, 6, 17


def _inputs(dtype, gated=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g)
    W0 = torch.randn(D_OUT, D_IN, generator=g) * 0.5
    A = torch.randn(R, D_IN, generator=g) * 0.3
    B = torch.randn(D_OUT, R, generator=g) * 0.3
    w = torch.randn(1, D_IN, generator=g) * 0.3 if gated else None
    b = torch.randn(1, generator=g) if gated else None
    tensors = dict(x=x, W0=W0, A=A, B=B, w=w, b=b)
    return {k: (v.to(dtype).requires_grad_(k != "W0") if v is not None else None) for k, v in tensors.items()}


class _RecordNewRowsOfDIn(TorchDispatchMode):
    """Records (op, shape, dtype) of each new (rows, D_IN) tensor that an op makes (ΔW, a block of its rows, or
    N x d_in), except those of `other_rows` rows and those that an op in `ignored` makes; views are not new."""

    def __init__(self, other_rows, ignored=()):
        super().__init__()
        self.other_rows, self.ignored, self.made = other_rows, ignored, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == D_IN \
                and out.shape[0] != self.other_rows and not func.is_view and func not in self.ignored:
            self.made.append((str(func), tuple(out.shape), out.dtype))
        return out


def _run(kind, t, scaling, use_ops):
    base = t.get("base")
    if use_ops:
        gate = torch.sigmoid(t["x"] @ t["w"].t() + t["b"]) if t["w"] is not None else None
        if kind == "hira":
            return gated_hira(t["x"], gate, t["A"], t["B"], lambda: t["W0"], scaling, base=base)
        return gated_lora(t["x"], gate, t["A"], t["B"], scaling, base=base)
    if kind == "hira":
        update = naive_gated_hira(t["x"], t["W0"], t["A"], t["B"], t["w"], t["b"], scaling)
    else:
        update = naive_gated_lora(t["x"], t["A"], t["B"], t["w"], t["b"], scaling)
    return update if base is None else (base + update).to(base.dtype)  # (a bf16 base: summed in fp32, rounded once)


def _grads(kind, t, scaling, use_ops, grad_out):
    out = _run(kind, t, scaling, use_ops)
    names = [k for k, v in t.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(out, [t[k] for k in names], grad_out)
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("kind", ["hira", "lora"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("scaling", [1.0, 0.37])
@pytest.mark.parametrize("base_dtype", [None, torch.float32, torch.bfloat16], ids=["no-base", "base", "bf16-base"])
def test_fp32_matches_naive_reference(kind, gated, scaling, base_dtype, hira_blocks):
    """Outputs and all gradients, with the residual add fused in (`base`) or not, and a bf16 base output."""
    t = _inputs(torch.float32, gated)
    if base_dtype is not None:
        t["base"] = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(4)).to(base_dtype).requires_grad_()
    grad_out = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(1)).to(base_dtype or torch.float32)
    out, grads = _grads(kind, t, scaling, True, grad_out)
    ref_out, ref_grads = _grads(kind, t, scaling, False, grad_out)
    assert out.dtype == (base_dtype or torch.float32)
    torch.testing.assert_close(out, ref_out, **FP32_TOLERANCE)
    assert set(grads) == set(ref_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **FP32_TOLERANCE, msg=f"grad of {name}")


@pytest.mark.parametrize("kind", ["hira", "lora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_2x_of_naive(kind, dtype, hira_blocks):
    """In bf16/fp16 the function's error against the fp32 truth stays within 2x the naive bf16/fp16 error (+2 ulp).

    A fixed absolute tolerance would either hide a real bug or fail on rounding; comparing with the reference run in
    the same precision asks only that we round no worse than plain autograd does (`tests.helpers.rounding_bound`).
    """
    truth_t = _inputs(torch.float32)
    low_t = _inputs(dtype)
    grad_out = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(1))
    truth_out, truth = _grads(kind, truth_t, 1.0, False, grad_out)
    ours_out, ours = _grads(kind, low_t, 1.0, True, grad_out.to(dtype))
    naive_out, naive = _grads(kind, low_t, 1.0, False, grad_out.to(dtype))
    assert within_tolerance(ours_out, naive_out, truth_out)[0]
    for name in truth:
        assert within_tolerance(ours[name], naive[name], truth[name], grad=True)[0], name
        assert ours[name].dtype == dtype


@pytest.mark.parametrize("kind", ["hira", "lora"])
def test_closed_gate_sends_no_gradient_to_factors(kind):
    """docs/method.md, "Gradients" (GateRA's Theorem 1): ∂L/∂(A, B) is linear in g per token, so a token with g = 0
    contributes nothing."""
    t = _inputs(torch.float32)
    x, A, B, W0 = t["x"], t["A"], t["B"], t["W0"]
    gate = torch.rand(N, 1, generator=torch.Generator().manual_seed(2))
    closed = torch.arange(N) % 3 == 0
    gate[closed] = 0.0
    grad_out = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(3))

    def factor_grads(x_, gate_, grad_out_):
        if kind == "hira":
            out = gated_hira(x_, gate_, A, B, lambda: W0)
        else:
            out = gated_lora(x_, gate_, A, B)
        return torch.autograd.grad(out, [A, B], grad_out_)

    all_tokens = factor_grads(x, gate, grad_out)
    open_only = factor_grads(x[~closed], gate[~closed], grad_out[~closed])
    for full, part in zip(all_tokens, open_only):
        torch.testing.assert_close(full, part, rtol=1e-5, atol=1e-6)
    # linear in g: halving every gate halves the factor gradients
    halved = factor_grads(x, gate * 0.5, grad_out)
    for full, half in zip(all_tokens, halved):
        torch.testing.assert_close(half, 0.5 * full, rtol=1e-5, atol=1e-6)
    # and the gate's own gradient is s·δ·(ΔW x) even where g = 0 (a closed gate can reopen)
    gate_leaf = gate.clone().requires_grad_(True)
    out = gated_hira(x, gate_leaf, A, B, lambda: W0) if kind == "hira" else gated_lora(x, gate_leaf, A, B)
    (dg,) = torch.autograd.grad(out, [gate_leaf], grad_out)
    ungated = (x @ (W0 * (B @ A)).t()) if kind == "hira" else (x @ A.t() @ B.t())
    torch.testing.assert_close(dg, (grad_out * ungated).sum(-1, keepdim=True), rtol=1e-5, atol=1e-5)


def _saved_numels(fn):
    """Numel of every tensor autograd saves while running `fn()` (the memory kept between forward and backward)."""
    numels = []

    def pack(tensor):
        numels.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return numels


def test_hira_keeps_no_weight_sized_tensor():
    """Only x, g, A, B are kept for backward: nothing of size d_out × d_in (PEFT's HiRA keeps W0 ⊙ BA)."""
    t = _inputs(torch.float32)
    gate = torch.sigmoid(t["x"] @ t["w"].t() + t["b"])
    ours = _saved_numels(lambda: gated_hira(t["x"], gate, t["A"], t["B"], lambda: t["W0"]))
    assert max(ours) < D_OUT * D_IN
    assert sum(ours) == N * D_IN + N + R * D_IN + D_OUT * R
    naive = _saved_numels(lambda: naive_gated_hira(t["x"], t["W0"], t["A"], t["B"], None, None))
    assert D_OUT * D_IN in naive  # the check above would catch a materialised ΔW


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_input_without_gradient_gets_the_gates_gradient_from_the_kept_update(dtype, hira_blocks):
    """Where x needs no gradient (a first layer's q, k, v) and the gate does, backward makes no product `δ ΔW`
    (N x d_in, of size N·d_in·d_out), which would serve the gate's gradient alone: forward keeps `x ΔWᵀ` (N x d_out)
    instead, and `dg = s Σ_j δ ⊙ x ΔWᵀ`. The gradients of the gate's w and b and of A and B are the naive reference's
    (fp32) or within the rounding rule against fp32 (bf16, fp16)."""
    def inputs(precision):
        t = _inputs(precision)
        t["x"] = t["x"].detach()
        return t

    t, truth_t = inputs(dtype), inputs(torch.float32)
    grad_out = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(1))
    record = _RecordNewRowsOfDIn(other_rows=R)
    out = _run("hira", t, 0.37, use_ops=True)
    names = ["A", "B", "w", "b"]
    with record:
        grads = dict(zip(names, torch.autograd.grad(out, [t[k] for k in names], grad_out.to(dtype))))
    products = [m for m in record.made if m[1] == (N, D_IN) and "mm" in m[0]]
    assert not products, products
    _, naive = _grads("hira", t, 0.37, False, grad_out.to(dtype))
    _, truth = _grads("hira", truth_t, 0.37, False, grad_out)
    for name in names:
        if dtype == torch.float32:
            torch.testing.assert_close(grads[name], naive[name], **FP32_TOLERANCE, msg=name)
        else:
            assert within_tolerance(grads[name], naive[name], truth[name], grad=True)[0], name
    gate = torch.sigmoid(t["x"] @ t["w"].t() + t["b"])
    kept = _saved_numels(lambda: gated_hira(t["x"], gate, t["A"], t["B"], lambda: t["W0"]))
    assert sum(kept) == N * D_IN + N + R * D_IN + D_OUT * R + N * D_OUT  # x, g, A, B and the update


def test_lora_keeps_no_output_sized_tensor():
    """The gated LoRA function keeps x, g, A, B and the rank-r activation, not the branch output (N × d_out)."""
    t = _inputs(torch.float32)
    gate = torch.sigmoid(t["x"] @ t["w"].t() + t["b"])
    ours = _saved_numels(lambda: gated_lora(t["x"], gate, t["A"], t["B"]))
    assert sum(ours) == N * D_IN + N + R * D_IN + D_OUT * R + N * R
    naive = _saved_numels(lambda: naive_gated_lora(t["x"], t["A"], t["B"], t["w"], t["b"]))
    assert N * D_OUT in naive


def _channel_scale_inputs(y_dtype, gated, base_dtype):
    g = torch.Generator().manual_seed(5)
    t = dict(y=torch.randn(N, D_OUT, generator=g).to(y_dtype), k=torch.randn(D_OUT, generator=g) * 0.2,
             gate=torch.rand(N, 1, generator=g) if gated else None,
             base=torch.randn(N, D_OUT, generator=g).to(base_dtype) if base_dtype is not None else None)
    return {name: v.requires_grad_() if v is not None else None for name, v in t.items()}


def _naive_channel_scale(y, gate, k, base):
    update = k * y if gate is None else gate * (k * y)  # (plain autograd keeps k ⊙ y for the gate's gradient)
    return update if base is None else (base + update).to(base.dtype)  # (a bf16 base: summed in fp32, rounded once)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base_dtype", [None, torch.float32, torch.bfloat16], ids=["no-base", "base", "bf16-base"])
def test_channel_scale_matches_plain_autograd(gated, y_dtype, base_dtype):
    """DoRA's gated magnitude term `base + g ⊙ (k ⊙ y)` (k fp32, y the base output, fp32 or bf16): output and the
    gradients of y, g, k and base equal plain autograd's, which computes them in the same dtypes."""
    t = _channel_scale_inputs(y_dtype, gated, base_dtype)
    out_dtype = base_dtype or torch.float32
    grad_out = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(1)).to(out_dtype)
    names = [name for name, v in t.items() if v is not None]
    out = gated_channel_scale(t["y"], t["gate"], t["k"], base=t["base"])
    ref = _naive_channel_scale(t["y"], t["gate"], t["k"], t["base"])
    assert out.dtype == ref.dtype == out_dtype
    grads = torch.autograd.grad(out, [t[n] for n in names], grad_out)
    ref_grads = torch.autograd.grad(ref, [t[n] for n in names], grad_out)
    torch.testing.assert_close(out, ref, **FP32_TOLERANCE)
    for name, a, b in zip(names, grads, ref_grads):
        assert a.dtype == b.dtype == t[name].dtype, name
        torch.testing.assert_close(a, b, **FP32_TOLERANCE, msg=f"grad of {name}")
    with torch.no_grad():  # (no graph: the same values without the function)
        torch.testing.assert_close(gated_channel_scale(t["y"], t["gate"], t["k"], base=t["base"]), out, rtol=0,
                                   atol=0)


@pytest.mark.parametrize("frozen", ["nothing", "y", "y-and-base"])
def test_channel_scale_gradients_pass_gradcheck_with_an_expanded_gate(frozen):
    """fp64 gradcheck with the gate as the structure gate passes it (one value expanded over the tokens, stride 0) and
    some inputs frozen (a frozen base's output needs no gradient)."""
    g = torch.Generator().manual_seed(6)
    y = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=frozen == "nothing")
    base = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=frozen != "y-and-base")
    k = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    structure = torch.rand(1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda y, structure, k, base: gated_channel_scale(y, structure.expand(5, 1), k, base=base),
        (y, structure, k, base))


def test_channel_scale_keeps_no_gated_product():
    """It keeps y (N × d_out, which PEFT's DoRA keeps too), g and k; plain autograd keeps the gated product `k ⊙ y`
    (N × d_out) beside them."""
    t = _channel_scale_inputs(torch.float32, True, torch.float32)
    ours = _saved_numels(lambda: gated_channel_scale(t["y"], t["gate"], t["k"], base=t["base"]))
    assert sorted(ours) == sorted([N * D_OUT, N, D_OUT])
    naive = _saved_numels(lambda: _naive_channel_scale(t["y"], t["gate"], t["k"], t["base"]))
    assert naive.count(N * D_OUT) == 2


def test_channel_scale_keeps_leading_dimensions():
    t = _channel_scale_inputs(torch.float32, True, torch.float32)
    y, gate, base = t["y"][:16].reshape(2, 8, D_OUT), t["gate"][:16].reshape(2, 8, 1), t["base"][:16].reshape(2, 8, -1)
    out = gated_channel_scale(y, gate, t["k"], base=base)
    assert out.shape == (2, 8, D_OUT)
    torch.testing.assert_close(out, _naive_channel_scale(y, gate, t["k"], base), **FP32_TOLERANCE)


class _RecordNewTensors(TorchDispatchMode):
    """Records the numel of every tensor an op makes (views excepted)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and not func.is_view:
            self.numels.append(out.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_rows", [7, D_OUT], ids=["blocks", "whole"])
def test_dora_weight_norm_forms_blocks_of_rows_with_the_same_norms(dtype, block_rows, monkeypatch):
    """DoRA's `‖W0 + s·BA‖` per row, formed `NORM_BLOCK_ELEMENTS` at a time (7 rows: five blocks and a shorter last
    one), equals the norm of the whole fp32 matrix, and makes no temporary larger than a block; W0 is not written."""
    from gatera_plugin import branches

    monkeypatch.setattr(branches, "NORM_BLOCK_ELEMENTS", block_rows * D_IN + 3)
    t = _inputs(torch.float32)
    W0 = t["W0"].detach().to(dtype)
    original = W0.clone()
    with _RecordNewTensors() as made:
        norm = branches.dora_weight_norm(W0, t["A"], t["B"], 0.37)
    expected = torch.linalg.norm(W0.float() + 0.37 * (t["B"] @ t["A"]), dim=1)
    assert norm.dtype == torch.float32 and not norm.requires_grad
    torch.testing.assert_close(norm, expected, **FP32_TOLERANCE)
    assert max(made.numels) <= max(block_rows * D_IN, D_OUT * R), made.numels
    assert torch.equal(W0, original)


def test_weight_fn_called_again_in_backward():
    """The base weight is re-read in backward (so a dequantised copy need not be kept alive)."""
    t = _inputs(torch.float32)
    calls = []

    def weight_fn():
        calls.append(1)
        return t["W0"]

    out = gated_hira(t["x"], None, t["A"], t["B"], weight_fn)
    assert len(calls) == 1
    out.sum().backward()
    assert len(calls) == 2


def test_leading_dimensions_are_preserved():
    t = _inputs(torch.float32)
    x = t["x"].detach()[:16].reshape(2, 8, D_IN)
    gate = torch.rand(2, 8, 1)
    out = gated_hira(x, gate, t["A"], t["B"], lambda: t["W0"])
    assert out.shape == (2, 8, D_OUT)
    flat = gated_hira(x.reshape(16, D_IN), gate.reshape(16, 1), t["A"], t["B"], lambda: t["W0"])
    torch.testing.assert_close(out.reshape(16, D_OUT), flat)


def test_gpu_blocks_keep_llama_sized_layers_whole():
    """On a GPU a 4096 x 14336 layer is one ΔW block (three cuBLAS GEMMs with x, no fp32 sum of partial products);
    on CPU it is split into cache-sized blocks. (Slices only: no GPU is needed to ask.)"""
    from gatera_plugin.ops.hira import _row_blocks

    for d_in, d_out in [(4096, 4096), (4096, 14336), (14336, 4096)]:
        assert list(_row_blocks(d_out, d_in, torch.device("cuda"))) == [slice(0, d_out)]
    assert len(list(_row_blocks(14336, 4096, torch.device("cpu")))) == 28
    assert len(list(_row_blocks(28672, 8192, torch.device("cuda")))) == 4  # a 70B MLP: bounded blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_backward_keeps_large_temporaries_in_the_autocast_dtype(dtype, hira_blocks):
    """Under autocast with PEFT's fp32 A and B, backward's dΔW ⊙ W0 is made in the autocast dtype, which its products
    with A and B use: no d_out x d_in fp32 tensor is built and cast back. With one block, δ ΔW (N x d_in) is used in
    that dtype too (no fp32 copy: a sum over several blocks is kept in fp32). The gradients stay within the rounding
    rule against fp64 (twice the naive autocast run's error, plus 2 ulp)."""
    t = _inputs(torch.float32)
    t["x"] = t["x"].detach().to(dtype).requires_grad_()
    t["W0"] = t["W0"].to(dtype)
    grad_out = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(1))
    record = _RecordNewRowsOfDIn(other_rows=R)  # A's gradient is not a weight-sized block

    def run(tensors, use_ops, precision):
        with torch.autocast("cpu", dtype=precision, enabled=precision != torch.float64):
            out = _run("hira", tensors, 0.7, use_ops)
        names = [k for k, v in tensors.items() if v is not None and v.requires_grad]
        with record if use_ops else contextlib.nullcontext():
            grads = torch.autograd.grad(out, [tensors[k] for k in names], grad_out.to(out.dtype))
        return dict(zip(names, grads))

    ours = run(t, True, dtype)
    fp32_sum = hira_blocks == "many-blocks"  # P = Σ_blocks δ_b ΔW_b, kept in fp32
    wrong = [w for w in record.made if w[-1] != dtype and not (fp32_sum and w[1] == (N, D_IN))]
    assert record.made and not wrong, wrong
    naive = run(t, False, dtype)
    truth = run({k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None)
                 for k, v in t.items()}, False, torch.float64)
    for name in ("A", "B"):
        error = max_error(ours[name], truth[name])
        assert error <= rounding_bound(naive[name], truth[name], dtype), (name, error)


def test_fp16_backward_applies_the_branch_scale_after_its_half_products(hira_blocks):
    """Under fp16 autocast the products of backward (g ⊙ δ)ᵀ x run in fp16; with s ≈ 1 / (RMS(W0) · g0) ~ 100
    (hira_scaling="lora") applied to δ before them, they overflowed at a loss scale s times lower than where the
    gradients themselves overflow (2^14 here, below GradScaler's initial 2^16). s now goes on dA and dB, in fp32, also
    where an ungated adapter is folded into its base layer (its W0 source held s): at 2^19 the gradients are finite and
    equal the fp32 run's, scaled, within fp16 rounding."""
    g = torch.Generator().manual_seed(0)
    d, r, n = 256, 8, 64
    W0 = (torch.randn(d, d, generator=g) * 0.02).half().float()
    s = 1.0 / (W0.pow(2).mean().sqrt().item() * 0.5)  # (hira_scaling="lora" at r = lora_alpha, g0 = 0.5)
    x = torch.randn(n, d, generator=g)
    A = (torch.rand(r, d, generator=g) * 2 - 1) / d ** 0.5
    B = torch.randn(d, r, generator=g) * 1e-3
    gate = torch.sigmoid(torch.randn(n, 1, generator=g) + 2)
    grad_out = torch.randn(n, d, generator=g) * 1e-3

    from gatera_plugin.ops.hira import folded_hira

    def grads(loss_scale, dtype, folded):
        A_, B_ = A.clone().requires_grad_(), B.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16, enabled=dtype == torch.float16):
            if folded:  # (an ungated adapter folded into its base layer: s rides on the folded W0 source)
                out = folded_hira(x, A_, B_, lambda: W0, s, fold_forward=False)
            else:
                out = gated_hira(x, gate, A_, B_, lambda: W0, s)
        out.backward((grad_out * loss_scale).to(out.dtype))
        return A_.grad, B_.grad

    scale = 2.0 ** 19
    for folded in (False, True):
        half, full = grads(scale, torch.float16, folded), grads(1.0, torch.float32, folded)
        for name, ours, reference in zip("AB", half, full):
            assert torch.isfinite(ours).all(), (name, folded)
            torch.testing.assert_close(ours / scale, reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item(),
                                       msg=f"{name}, folded={folded}")


NO_GRAPH_CASES = {  # (input dtype, factor dtype, autocast dtype or None)
    "fp32": (torch.float32, torch.float32, None),
    "bf16 model": (torch.bfloat16, torch.bfloat16, None),
    "bf16 input, fp32 factors": (torch.bfloat16, torch.float32, None),
    "bf16 autocast": (torch.float32, torch.float32, torch.bfloat16),
}


@pytest.mark.parametrize("kind", ["hira", "lora"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("case", list(NO_GRAPH_CASES))
def test_without_a_graph_the_output_is_the_autograd_functions_own(kind, gated, with_base, case, hira_blocks,
                                                                  monkeypatch):
    """Where autograd records nothing (`no_grad`, as `generate()` runs; adapters that do not train), the branch runs
    its forward's operations without the autograd function (no context, no saved tensors: less host work per layer
    and token when decoding). Its output is the function's bit for bit, in every dtype case, and the function is
    called only where a graph is recorded."""
    import gatera_plugin.ops.hira as hira_ops
    import gatera_plugin.ops.lora as lora_ops

    assert not hira_ops.factored_pays(N, R, 1 << 30)  # (N tokens: the function's own operations; few: the next test)
    x_dtype, factor_dtype, autocast = NO_GRAPH_CASES[case]
    if kind == "lora" and x_dtype != factor_dtype:
        pytest.skip("the layer casts x to LoRA's factors (PEFT's cast); only HiRA keeps a bf16 input as it is")
    t = _inputs(torch.float32, gated)
    t = {k: (v.detach().to(x_dtype if k in ("x", "w", "b") else factor_dtype) if v is not None else None)
         for k, v in t.items()}
    if with_base:
        t["base"] = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(3)).to(x_dtype)
    function = hira_ops.GatedHiraFunction if kind == "hira" else lora_ops.GatedLoraFunction
    calls, apply = [], function.apply
    monkeypatch.setattr(function, "apply", staticmethod(lambda *args: calls.append(1) or apply(*args)))
    context = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()

    def run(**requires_grad):
        tensors = {k: v.detach().requires_grad_(requires_grad.get(k, False)) if v is not None else None
                   for k, v in t.items()}
        with context:
            return _run(kind, tensors, 0.37, use_ops=True)

    with torch.no_grad():
        without = run(A=True, B=True)
    assert calls == []
    frozen = run()  # grad mode on, nothing requires grad: no graph either
    assert calls == [] and frozen.grad_fn is None
    recorded = run(A=True, B=True)
    assert calls == [1] and recorded.grad_fn is not None
    assert without.dtype == recorded.dtype and torch.equal(without, recorded.detach())
    assert torch.equal(frozen, recorded.detach())
    run(x=True)  # only the input needs a gradient (frozen adapters inside a trained model): the function runs
    assert calls == [1, 1]


@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("case", list(NO_GRAPH_CASES))
def test_a_decoding_step_forms_no_delta_weight(tokens, gated, with_base, case, hira_blocks, monkeypatch):
    """Without a graph, a decoding step's few tokens get the factored update `Σ_k B_k ⊙ W0 (A_k ⊙ x)`: no d_out x d_in
    tensor is made (forming `W0 ⊙ BA` writes and reads three), its output has the function's dtype and is within the
    rounding rule against fp64 (twice the error of the function's own output in that dtype, plus 2 ulp). (Under
    autocast an fp32 W0 is cast to the autocast dtype, as the base layer's own product casts it. A weight this small
    forms ΔW by default, `FACTORED_LIMITS`: lowered here.)"""
    import gatera_plugin.ops.hira as hira_ops

    monkeypatch.setattr(hira_ops, "FACTORED_LIMITS", ((D_OUT * D_IN, 3.0),))  # (a small weight here)
    assert hira_ops.factored_pays(tokens, R, D_OUT * D_IN)
    with hira_ops.without_factoring():  # (the benchmarks' comparison: ΔW formed at every step)
        assert not hira_ops.factored_pays(tokens, R, D_OUT * D_IN)
    assert hira_ops.factored_pays(tokens, R, D_OUT * D_IN) and not hira_ops.factored_pays(tokens, R, D_OUT * D_IN - 1)
    x_dtype, factor_dtype, autocast = NO_GRAPH_CASES[case]
    t = {k: (v.detach()[:tokens] if k == "x" else v.detach()) if v is not None else None
         for k, v in _inputs(torch.float32, gated).items()}
    if with_base:
        t["base"] = torch.randn(tokens, D_OUT, generator=torch.Generator().manual_seed(3))
    exact = {k: v.double() if v is not None else None for k, v in t.items()}
    t = {k: (v.to(x_dtype if k in ("x", "w", "b", "base", "W0") else factor_dtype) if v is not None else None)
         for k, v in t.items()}
    context = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    # the rows A_k ⊙ x_n are not a weight-sized block; autocast's cast of an fp32 W0 is F.linear's own
    record = _RecordNewRowsOfDIn(other_rows=tokens * R, ignored=(torch.ops.aten._to_copy.default,))

    with torch.no_grad(), context, record:
        factored = _run("hira", t, 0.37, use_ops=True)
    assert not record.made, record.made  # no ΔW, nor a block of its rows
    with context:  # the autograd function's forward (a graph is recorded), which forms ΔW
        A, B = (v.detach().requires_grad_() for v in (t["A"], t["B"]))
        recorded = _run("hira", dict(t, A=A, B=B), 0.37, use_ops=True).detach()
    truth = _run("hira", exact, 0.37, use_ops=False)
    assert factored.dtype == recorded.dtype
    if x_dtype == factor_dtype == torch.float32 and not autocast:
        torch.testing.assert_close(factored, recorded, **FP32_TOLERANCE)
    else:
        assert max_error(factored, truth) <= rounding_bound(recorded, truth, factored.dtype), case


def test_the_factored_update_is_taken_by_token_count_rank_and_weight_size():
    """`factored_pays` by `FACTORED_LIMITS` (bench/decode_branch.py): one token from 2^16 weight elements on (the
    FLOP ratio N·r / (N + r) is below 1), up to a FLOP ratio of 3 from 2^20 on, never below 2^16 or under
    `without_factoring()`."""
    from gatera_plugin.ops.hira import factored_pays, without_factoring

    assert factored_pays(1, 128, 1 << 16) and not factored_pays(1, 8, (1 << 16) - 1)
    assert not factored_pays(2, 8, 576 * 576) and factored_pays(2, 128, 1 << 20)
    assert factored_pays(4, 8, 4096 * 4096) and not factored_pays(4, 16, 4096 * 4096)  # FLOP ratio 2.67, 3.2
    with without_factoring():
        assert not factored_pays(1, 8, 4096 * 4096)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_factored_update_sums_over_the_rank_in_fp32_and_rounds_once(dtype):
    """`factored_update`'s sum over k of `B_k ⊙ W0 (A_k ⊙ x)` (fp32 B) is kept in fp32 and rounded to the half dtype
    once: against the same half-precision products summed in fp64, the rounded results differ only where fp32's own
    summation order tips a rounding (a sum written into a half output tensor rounds every term first: ~40% of
    entries differ)."""
    from gatera_plugin.ops.hira import factored_update

    g = torch.Generator().manual_seed(3)
    tokens, rank, d_in, d_out = 2, 32, 64, 512
    x = torch.randn(tokens, d_in, generator=g).to(dtype)
    A = torch.randn(rank, d_in, generator=g) * torch.linspace(0.5, 2, rank)[:, None]
    B = torch.randn(d_out, rank, generator=g)
    W0 = torch.randn(d_out, d_in, generator=g).to(dtype)
    update = factored_update(x, A, B, W0, dtype)
    rows = torch.mul(x.unsqueeze(1), A).to(dtype)  # (the products in the half dtype, as the update forms them)
    products = (rows.view(tokens * rank, d_in) @ W0.t()).view(tokens, rank, d_out)
    once = (products.double() * B.t().double()).sum(1).to(dtype)
    assert update.dtype == dtype
    assert (update != once).float().mean().item() < 0.02


HALF_AND_FULL = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("reuse_update", [False, True])
@pytest.mark.parametrize("gate_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("update_dtype", HALF_AND_FULL)
@pytest.mark.parametrize("base_dtype", HALF_AND_FULL)
def test_add_gated_sums_in_the_promoted_dtype_and_rounds_once(base_dtype, update_dtype, gate_dtype, reuse_update):
    """`add_gated(base, update, g, s)` has base's dtype, and where the dtypes differ it is `base + s·g ⊙ update`
    summed in their promoted dtype and rounded once (an fp32 base is never rounded to a half update's dtype);
    `reuse_update` changes only where the result is written."""
    from gatera_plugin.ops.rows import add_gated

    g = torch.Generator().manual_seed(7)
    base = (torch.randn(N, D_OUT, generator=g) * 30).to(base_dtype)
    update = torch.randn(N, D_OUT, generator=g).to(update_dtype)
    gate = torch.rand(N, 1, generator=g).to(gate_dtype) if gate_dtype is not None else None
    scaling = 0.37
    gated = update * (gate * scaling) if gate is not None else update * scaling
    promoted = torch.promote_types(base_dtype, update_dtype)
    out = add_gated(base, update.clone(), gate, scaling, reuse_update=reuse_update)
    assert out.dtype == base_dtype
    if base_dtype != update_dtype:
        assert torch.equal(out, (base.to(promoted) + gated.to(promoted)).to(base_dtype))
    else:  # one fused pass in the common dtype: within 2 ulp of the largest output, against fp64
        exact = base.double() + update.double() * (gate.double() if gate is not None else 1.0) * scaling
        assert (out.double() - exact).abs().max() <= 2 * torch.finfo(base_dtype).eps * exact.abs().max()
