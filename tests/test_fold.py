"""An ungated HiRA adapter folded into its base layer's product: `y = x (W0 + s·W0 ⊙ BA)ᵀ + b`.

`ops.hira.folded_hira` against naive autograd (outputs and every gradient, fp32 and in bf16 / fp16 by the rounding
rule of the other low-precision tests), the layer's folded forward against its separate base + branch path, and the
conditions under which a layer folds (anything that would make the folded map a different function, or skip a call
of the base layer that something else expects, keeps them apart). Where the products run in bf16 / fp16 only backward
folds: the forward is the separate path's, the gradients are within its rounding, and a step takes four products of
size N·d_in·d_out instead of five (three in fp32).
"""

import contextlib

import pytest
import torch
from peft import get_peft_model

from gatera_plugin import GateRAConfig
from gatera_plugin.layer import without_folding
from gatera_plugin.ops import folded_hira
from tests.helpers import (
    FP32_GRAD_TOLERANCE,
    FP32_TOLERANCE,
    LLAMA_PROJECTIONS,
    RecordOps,
    load_4bit,
    max_error,
    rounding_bound,
    tiny_llama,
    within_tolerance,
)

D_IN, D_OUT, R, N = 24, 40, 6, 17


def _tensors(dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = dict(x=torch.randn(N, D_IN, generator=g), W0=torch.randn(D_OUT, D_IN, generator=g) * 0.5,
             A=torch.randn(R, D_IN, generator=g) * 0.3, B=torch.randn(D_OUT, R, generator=g) * 0.3,
             bias=torch.randn(D_OUT, generator=g) if bias else None)
    return {k: (v.to(dtype).requires_grad_(k != "W0") if v is not None else None) for k, v in t.items()}


def _run(t, scaling, folded: bool, grad_out):
    if folded:
        out = folded_hira(t["x"], t["A"], t["B"], lambda: t["W0"], scaling, t["bias"])
    else:
        W = t["W0"] + scaling * t["W0"] * (t["B"] @ t["A"])
        out = t["x"] @ W.t() + (t["bias"] if t["bias"] is not None else 0)
    names = [k for k, v in t.items() if v is not None and v.requires_grad]
    return out, dict(zip(names, torch.autograd.grad(out, [t[k] for k in names], grad_out.to(out.dtype))))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scaling", [1.0, 0.37])
def test_folded_hira_matches_naive_fp32(bias, scaling, hira_blocks):
    t = _tensors(torch.float32, bias)
    grad_out = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(1))
    out, grads = _run(t, scaling, True, grad_out)
    ref, ref_grads = _run(t, scaling, False, grad_out)
    torch.testing.assert_close(out, ref, **FP32_TOLERANCE)
    assert set(grads) == set(ref_grads) == ({"x", "A", "B", "bias"} if bias else {"x", "A", "B"})
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **FP32_GRAD_TOLERANCE, msg=f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_folded_hira_low_precision_within_rounding_of_fp32(dtype, hira_blocks):
    """The folded weight rounds `W0 + s·ΔW` once to `dtype`; output and gradients stay within 2x the error of naive
    autograd run in `dtype` (+2 ulp), like the separate path (`tests.helpers.rounding_bound`)."""
    grad_out = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(1))
    truth_out, truth = _run(_tensors(torch.float32), 0.37, False, grad_out)
    low = _tensors(dtype)
    ours_out, ours = _run(low, 0.37, True, grad_out)
    naive_out, naive = _run(low, 0.37, False, grad_out)
    assert ours_out.dtype == dtype
    passed, error, bound = within_tolerance(ours_out, naive_out, truth_out)
    assert passed, (error, bound)
    for name in truth:
        passed, error, bound = within_tolerance(ours[name], naive[name], truth[name], grad=True)
        assert passed and ours[name].dtype == dtype, (name, error, bound)


def test_folded_hira_under_autocast_computes_in_the_autocast_dtype():
    """fp32 input, weights and bias under bf16 autocast: the product and the bias add run in bf16, as `nn.Linear`'s
    under autocast; the factors' gradients stay fp32."""
    t = _tensors(torch.float32)
    grad_out = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _run(t, 0.37, True, grad_out)
        base = torch.nn.functional.linear(t["x"], t["W0"], t["bias"])
    truth, truth_grads = _run(t, 0.37, False, grad_out)
    assert out.dtype == base.dtype == torch.bfloat16
    assert all(grads[k].dtype == torch.float32 for k in ("A", "B", "bias"))
    bound = 8 * torch.finfo(torch.bfloat16).eps * truth.abs().max().item()
    assert (out.float() - truth).abs().max().item() <= bound


# ----------------------------------------------------------------------------------------------- the layer
class _One(torch.nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.proj = torch.nn.Linear(D_IN, D_OUT, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _layer(**options):
    torch.manual_seed(0)
    config = dict(r=R, target_modules=["proj"], gate="none", init_weights=False)
    return get_peft_model(_One(), GateRAConfig(**{**config, **options})).base_model.model.proj


def _folds(layer, x) -> bool:
    adapters = [name for name in layer.active_adapters if name in layer.gatera_A]
    return layer._folded_forward(adapters, x, (), {}) is not None


@pytest.mark.parametrize("hira_scaling", ["lora", "none"])
def test_ungated_layer_folds_and_equals_the_separate_path(hira_scaling):
    layer = _layer(hira_scaling=hira_scaling)
    x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(1), requires_grad=True)
    params = [x, layer.gatera_A["default"], layer.gatera_B["default"]]
    assert _folds(layer, x)
    out = layer(x)
    grads = torch.autograd.grad(out, params, torch.ones_like(out))
    with without_folding():
        ref = layer(x)
        ref_grads = torch.autograd.grad(ref, params, torch.ones_like(ref))
    assert out.shape == ref.shape == (3, 5, D_OUT)
    torch.testing.assert_close(out, ref, **FP32_TOLERANCE)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, **FP32_GRAD_TOLERANCE)


def test_trainable_bias_gets_its_gradient_when_folded():
    layer = _layer()
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(1))
    assert _folds(layer, x)
    layer(x).square().sum().backward()
    folded = layer.base_layer.bias.grad.clone()
    layer.base_layer.bias.grad = None
    with without_folding():
        layer(x).square().sum().backward()
    torch.testing.assert_close(folded, layer.base_layer.bias.grad, **FP32_GRAD_TOLERANCE)


def _hook(layer):
    return layer.base_layer.register_forward_hook(lambda *args: None)


def _replace_forward(layer):  # (accelerate's add_hook_to_module replaces `forward` on the instance)
    base = layer.base_layer
    base.forward = torch.nn.Linear.forward.__get__(base)


def _global_hook(layer):
    return torch.nn.modules.module.register_module_forward_pre_hook(lambda *args: None)


def _nested(layer):
    """The base layer is another adapter's layer (here a second GateRA layer) around the plain linear."""
    from gatera_plugin.layer import Linear

    inner = Linear(layer.base_layer, "inner", layer.options["default"], R)
    layer.base_layer = inner


def _second_adapter(layer):
    layer.update_layer("other", R, None, layer.options["default"])
    layer.set_adapter(["default", "other"])


@pytest.mark.parametrize("case, options, change", [
    ("token gate", {"gate": "sigmoid"}, None),
    ("structure gate", {"structure_gate": True}, None),
    ("LoRA branch", {"branch": "lora"}, None),
    ("DoRA branch", {"branch": "dora"}, None),
    ("dropout in training", {"dropout": 0.1}, None),
    ("branch kernels asked for", {"kernel": "triton"}, None),
    ("cache_delta in eval", {"cache_delta": True}, lambda layer: layer.eval()),
    ("base layer hooked", {}, _hook),
    ("forward replaced", {}, _replace_forward),
    ("global module hook", {}, _global_hook),
    ("two active adapters", {}, _second_adapter),
    ("trainable base weight (eval)", {}, lambda layer: (layer.eval(), layer.base_layer.weight.requires_grad_(True))),
    ("bf16 base weight, fp32 input", {}, lambda layer: layer.to(torch.bfloat16)),  # (the base layer's own error)
    ("fp16 base weight, fp32 input", {}, lambda layer: layer.base_layer.half()),
    ("another adapter's layer in between", {}, _nested),
])
def test_layer_keeps_base_and_branch_apart_where_folding_would_change_something(case, options, change):
    layer = _layer(**options)
    handle = change(layer) if change is not None else None
    try:
        assert not _folds(layer, torch.randn(N, D_IN)), case
    finally:
        if isinstance(handle, torch.utils.hooks.RemovableHandle):
            handle.remove()


@pytest.mark.parametrize("case, options, change", [
    ("eval", {}, lambda layer: layer.eval()),
    ("dropout in eval", {"dropout": 0.1}, lambda layer: layer.eval()),
    ("no bias", {}, lambda layer: setattr(layer.base_layer, "bias", None)),
])
def test_layer_folds_where_it_is_the_same_function(case, options, change):
    layer = _layer(**options)
    change(layer)
    x = torch.randn(N, D_IN)
    assert _folds(layer, x), case
    with torch.no_grad():
        out = layer(x)
        with without_folding():
            ref = layer(x)
    torch.testing.assert_close(out, ref, **FP32_TOLERANCE)


def _half_products(case):
    """(layer, input, context) for `case`: the products run in bf16 / fp16."""
    layer, x = _layer(), torch.randn(N, D_IN, generator=torch.Generator().manual_seed(1))
    autocast = contextlib.nullcontext
    if case.startswith("bf16 autocast"):
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
        x = x.bfloat16() if case.endswith("bf16 input") else x
    else:
        dtype = torch.bfloat16 if case == "bf16 model" else torch.float16
        layer, x = layer.to(dtype), x.to(dtype)
    return layer, x, autocast


HALF_CASES = ["bf16 autocast, fp32 model", "bf16 autocast, bf16 input", "bf16 model", "fp16 model"]


def _products_per_training_step(layer, x, *contexts) -> int:
    """Matrix products of size N·d_in·d_out (N = x's rows; their m·k·n summed, in that unit, rounded down: the
    rank-sized ones fall below one) in one forward and backward of `layer` on x, run inside `contexts`."""
    with RecordOps({torch.ops.aten.mm.default, torch.ops.aten.addmm.default}) as record:
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            out = layer(x)
        out.backward(torch.ones_like(out))
    size = sum(a[0] * a[1] * b[1] for shapes, _ in record.calls for a, b in [shapes[-2:]])  # (m·k·n of each)
    return int(size / (x.shape[0] * D_IN * D_OUT))


@pytest.mark.parametrize("case, products", [("fp32", 3), ("fp32 apart", 5), *((case, 4) for case in HALF_CASES)])
def test_products_per_training_step(case, products):
    """Products of size N·d_in·d_out in one forward and backward: three folded in fp32, four where only backward
    folds, five apart (the base layer's forward and input gradient, the branch's forward, input gradient and dΔW)."""
    if case.startswith("fp32"):
        layer, x, autocast = _layer(), torch.randn(N, D_IN), contextlib.nullcontext
    else:
        layer, x, autocast = _half_products(case)
    x = torch.cat([x] * 16).requires_grad_(True)  # (many tokens: the rank-sized products fall below one)
    fold = without_folding() if case == "fp32 apart" else contextlib.nullcontext()
    assert _products_per_training_step(layer, x, fold, autocast()) == products


@pytest.mark.parametrize("case, products", [("gated", 3), ("ungated apart", 3), ("ungated folded", 2)])
def test_products_per_training_step_when_the_input_needs_no_gradient(case, products):
    """A layer whose input needs no gradient (a model's first layer: the frozen embeddings' output, unless
    `enable_input_require_grads` is on, as gradient checkpointing sets it) skips the input gradient's products. The
    ungated layer keeps the forward's and dΔW's: two folded, three apart (as PEFT's HiRA). The gated layer takes
    three too: its gate's gradient comes from the update `x ΔWᵀ` that forward keeps there, not from a product δ ΔW
    (four, as it was; in bench/train_step.py's 4-layer models the first layer's q, k and v are three of the 20 adapted
    layers)."""
    layer = _layer(gate="sigmoid") if case == "gated" else _layer()
    x = torch.randn(16 * N, D_IN)  # (many tokens: the rank-sized products fall below one)
    fold = without_folding() if case == "ungated apart" else contextlib.nullcontext()
    assert _products_per_training_step(layer, x, fold) == products
    assert layer.gatera_B["default"].grad is not None


@pytest.mark.parametrize("case", HALF_CASES)
def test_half_products_fold_backward_only(case):
    """bf16 / fp16 products: the layer folds (`fold_forward=False`), its output is the separate path's to the bit, and
    every gradient is within the separate path's rounding of the fp64 truth (`tests.helpers.within_tolerance`)."""
    layer, x, autocast = _half_products(case)
    layer.base_layer.bias.requires_grad_(True)
    x = x.requires_grad_(True)
    params = {"x": x, "A": layer.gatera_A["default"], "B": layer.gatera_B["default"], "bias": layer.base_layer.bias}
    grad_out = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(2))
    runs = {}
    for name, fold in (("folded", contextlib.nullcontext), ("apart", without_folding)):
        with fold(), autocast():
            assert _folds(layer, x) == (name == "folded")
            out = layer(x)
            runs[name] = out, torch.autograd.grad(out, list(params.values()), grad_out.to(out.dtype))
    assert torch.equal(runs["folded"][0], runs["apart"][0])
    W0 = layer.base_layer.weight.detach().double()
    exact = {k: v.detach().double().requires_grad_(True) for k, v in params.items()}
    s = layer.scaling["default"]
    truth = exact["x"] @ (W0 + s * W0 * (exact["B"] @ exact["A"])).t() + exact["bias"]
    truth_grads = torch.autograd.grad(truth, list(exact.values()), grad_out.double())
    dtype = torch.float16 if case == "fp16 model" else torch.bfloat16  # (the products'; fp32 grads carry its error)
    for name, ours, theirs, true in zip(params, runs["folded"][1], runs["apart"][1], truth_grads):
        assert max_error(ours, true) <= rounding_bound(theirs, true, dtype), name


@pytest.mark.parametrize("case", HALF_CASES)
def test_half_products_without_autograd_run_apart(case):
    """No backward, nothing to fold: `no_grad` / `inference_mode` (eval, `generate()`) in half precision run the base
    layer itself (bitsandbytes keeps its own kernels there); fp32 still folds its one forward product."""
    layer, x, autocast = _half_products(case)
    with autocast():
        assert _folds(layer, x)
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                assert not _folds(layer, x), mode
    with torch.no_grad():
        assert _folds(_layer(), torch.randn(N, D_IN))


@pytest.mark.parametrize("case", ["bf16 autocast, fp32 model", "bf16 model"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_half_products_forward_is_the_base_layers_own_on_any_input_layout(case, layout):
    """The base product runs on x as the layer gets it: a non-contiguous 3-D input takes `F.linear`'s matmul-then-add
    there (two roundings), as the base layer does, and the output stays the separate path's to the bit."""
    layer, x, autocast = _half_products(case)
    x = x[:16].reshape(4, 4, D_IN)
    x = (x.transpose(0, 1) if layout == "transposed" else x).requires_grad_(True)
    with autocast():
        assert _folds(layer, x)
        out = layer(x)
        with without_folding():
            ref = layer(x)
    assert torch.equal(out, ref)


def _kept_share(layer, x, exact, base):
    """How much of the adapter's exact effect on the output, `exact - base` (fp64), the layer's output shows: the
    least-squares coefficient of its own change on the exact one (1: all of it, 0: none)."""
    change = layer(x).double() - base
    return ((change * (exact - base)).sum() / (exact - base).square().sum()).item()


def _small_update_layer(update: float, on_bf16_grid: bool):
    """A 256 -> 256 ungated layer with mean |s·BA| = `update`; W0 and b fp32, rounded to bf16 values (as loaded in
    fp32 from a bf16 checkpoint) or not (a random fp32 init)."""
    torch.manual_seed(0)
    layer = get_peft_model(torch.nn.Sequential(torch.nn.Linear(256, 256)), GateRAConfig(
        r=8, target_modules=["0"], gate="none", hira_scaling="none")).base_model.model[0]
    A, B = layer.gatera_A["default"], layer.gatera_B["default"]
    with torch.no_grad():
        if on_bf16_grid:
            for p in (layer.base_layer.weight, layer.base_layer.bias):
                p.copy_(p.bfloat16().float())
        B.normal_()
        B.mul_(update / (B @ A).abs().mean())
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    W0, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    exact = x.double() @ (W0 + W0 * (B.double() @ A.double())).t() + b
    return layer, x, exact, x.double() @ W0.t() + b


@pytest.mark.parametrize("update", [3e-4, 1e-3])
def test_rounding_w0_plus_update_to_bf16_would_drop_small_updates(update):
    """Why half-precision products keep the forward apart: with W0's values on the bf16 grid (an fp32 model loaded
    from a bf16 checkpoint) and mean |s·BA| below bf16's resolution (2^-9 ≈ 2e-3), as in the first steps of training
    (B starts at 0), a folded forward (`fold_forward=True`) under bf16 autocast shows less of the update than the
    separate path (measured: at 3e-4 about 0 against 0.15, at 1e-3 0.48 against 0.62); the layer's own forward, which
    folds backward only, shows what the separate path does."""
    layer, x, exact, base = _small_update_layer(update, on_bf16_grid=True)
    A, B, bias = layer.gatera_A["default"], layer.gatera_B["default"], layer.base_layer.bias
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (with autograd: without it nothing folds in bf16)
        assert _folds(layer, x)
        kept = _kept_share(layer, x, exact, base)
        with without_folding():
            apart = _kept_share(layer, x, exact, base)
        forced = folded_hira(x, A, B, layer.base_weight, 1.0, bias).double() - base
    forced = ((forced * (exact - base)).sum() / (exact - base).square().sum()).item()
    assert kept == apart and forced < apart - 0.1, (kept, forced, apart)


@pytest.mark.parametrize("update", [3e-4, 1e-3, 1e-2])
def test_backward_fold_input_gradient_within_rounding_for_small_updates(update):
    """The folded backward's `δ (W0 + s·ΔW)` with `W0 + s·ΔW` rounded to bf16, where that rounding drops updates below
    its resolution (W0 on the bf16 grid): the input gradient stays within the separate path's rounding of the fp64
    truth (measured max |error|: 0.0084 / 0.0097 / 0.0101 folded against 0.0085 apart, |dx| up to 2.2)."""
    layer, x, _, _ = _small_update_layer(update, on_bf16_grid=True)
    x = x.requires_grad_(True)
    grad_out = torch.randn(64, 256, generator=torch.Generator().manual_seed(5))
    W0, A, B = (t.detach().double() for t in (layer.base_layer.weight, layer.gatera_A["default"],
                                               layer.gatera_B["default"]))
    truth = grad_out.double() @ (W0 + W0 * (B @ A))
    grads = {}
    for name, fold in (("folded", contextlib.nullcontext), ("apart", without_folding)):
        with fold(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            grads[name], = torch.autograd.grad(out, [x], grad_out.to(out.dtype))
    error, bound = max_error(grads["folded"], truth), rounding_bound(grads["apart"], truth, torch.bfloat16)
    assert error <= bound, (error, bound)


@pytest.mark.parametrize("on_bf16_grid", [True, False])
def test_fp32_fold_keeps_small_updates(on_bf16_grid):
    """In fp32 products the folded weight keeps updates far below bf16's resolution, like the separate path."""
    layer, x, exact, base = _small_update_layer(3e-4, on_bf16_grid)
    with torch.no_grad():
        assert _folds(layer, x)
        folded = _kept_share(layer, x, exact, base)
        with without_folding():
            apart = _kept_share(layer, x, exact, base)
    assert abs(folded - 1) < 1e-3 and abs(apart - 1) < 1e-3, (folded, apart)


# ----------------------------------------------------------------------------------------------- 4-bit bases
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    path = tmp_path_factory.mktemp("tiny4bit_fold")
    tiny_llama(hidden=64, intermediate=128, init_std=0.2).save_pretrained(path)
    return path


@pytest.mark.parametrize("bits, compute_dtype, input_dtype, folds", [
    (4, torch.bfloat16, torch.bfloat16, True),  # QLoRA: bf16 products, backward folds
    (4, torch.float32, torch.float32, True),
    (4, torch.bfloat16, torch.float32, False),  # bitsandbytes computes in bf16 and returns fp32
    (8, torch.float32, torch.float32, False),  # LLM.int8's forward is not a product with the dequantised W0
])
def test_quantised_base_folds_only_where_its_forward_is_the_same_product(base_dir, bits, compute_dtype, input_dtype,
                                                                         folds):
    model = get_peft_model(load_4bit(base_dir, compute_dtype, bits=bits),
                           GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS, gate="none", init_weights=False))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1)).to(input_dtype)
    assert _folds(layer, x) == folds
    if not folds:
        return
    out = layer(x)
    W0 = layer.base_weight().float()
    s = layer.scaling["default"]
    A, B = layer.gatera_A["default"], layer.gatera_B["default"]
    truth = x.float() @ (W0 + s * W0 * (B.float() @ A.float())).t()
    with without_folding():
        separate = layer(x)
    assert out.dtype == separate.dtype == input_dtype
    passed, error, bound = within_tolerance(out, separate, truth)
    assert passed, (error, bound)


def test_quantised_base_under_autocast_of_another_dtype_stays_apart(base_dir):
    """A 4-bit base with an fp32 compute dtype under bf16 autocast: not checked to compute as the folded product does
    on every backend, so it runs apart; with a bf16 compute dtype and bf16 autocast (QLoRA with `bf16=True`) it folds
    its backward."""
    for compute_dtype, input_dtype, folds in ((torch.float32, torch.float32, False),
                                              (torch.bfloat16, torch.bfloat16, True)):
        model = get_peft_model(load_4bit(base_dir, compute_dtype),
                               GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS, gate="none", init_weights=False))
        layer = model.base_model.model.model.layers[0].mlp.down_proj
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _folds(layer, torch.randn(2, 5, 128).to(input_dtype)) == folds, compute_dtype


def test_half_fold_casts_the_weight_no_more_than_the_separate_path():
    """A bf16 base weight and an fp32 input (a LayerNorm's output) under bf16 autocast: autocast casts W0 for the base
    product once, as in the separate path; no round trip through the input's dtype (two weight-sized copies)."""
    layer = _layer()
    layer.base_layer.bfloat16()
    x = torch.randn(N, D_IN, requires_grad=True)
    counts = {}
    for name, fold in (("folded", contextlib.nullcontext), ("apart", without_folding)):
        with fold(), torch.autocast("cpu", dtype=torch.bfloat16), RecordOps({torch.ops.aten._to_copy.default}) as casts:
            assert _folds(layer, x) == (name == "folded")
            layer(x)
        counts[name] = sum(shapes[0] == (D_OUT, D_IN) for shapes, _ in casts.calls)
    assert counts["folded"] <= counts["apart"], counts


@pytest.mark.parametrize("weight_dtype, bias_dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_quantised_base_casts_weight_and_bias_as_bitsandbytes_does(weight_dtype, bias_dtype):
    """A 4-bit layer computing in bf16 whose weight was quantised from fp16 (dequantised W0 in fp16), or with an fp32
    bias (`prepare_model_for_kbit_training`): the folded base product casts both to the input's dtype, as
    bitsandbytes' forward does; the output is within two bf16 units of its scale of the separate path's (which rounds
    an fp16 W0 its own way) and backward runs."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    module = torch.nn.Sequential(bnb.nn.Linear4bit(D_IN, D_OUT, compute_dtype=torch.bfloat16, quant_type="nf4"))
    module[0].weight = bnb.nn.Params4bit((torch.randn(D_OUT, D_IN) * 0.3).to(weight_dtype), requires_grad=False,
                                         quant_type="nf4")
    module[0].bias = torch.nn.Parameter(torch.randn(D_OUT).to(bias_dtype), requires_grad=False)
    module = module.to("cpu")  # (quantises)
    layer = get_peft_model(module, GateRAConfig(r=R, target_modules=["0"], gate="none", init_weights=False)
                           ).base_model.model[0]
    x = torch.randn(3, 5, D_IN, dtype=torch.bfloat16, requires_grad=True)
    assert _folds(layer, x)
    out = layer(x)
    out.float().square().sum().backward()
    with without_folding():
        ref = layer(x)
    assert out.dtype == ref.dtype == torch.bfloat16 and x.grad is not None
    difference = (out.float() - ref.float()).abs().max().item()
    assert difference <= 2 * torch.finfo(torch.bfloat16).eps * ref.abs().max().item(), difference


def test_without_folding_keeps_apart_inside_and_restores_after_an_error():
    layer, x = _layer(), torch.randn(N, D_IN)
    with pytest.raises(KeyError), without_folding():
        assert not _folds(layer, x)
        raise KeyError
    assert _folds(layer, x)


def test_extra_forward_arguments_keep_base_and_branch_apart():
    layer, x = _layer(), torch.randn(N, D_IN)
    assert layer._folded_forward(["default"], x, (), {}) is not None
    assert layer._folded_forward(["default"], x, (None,), {}) is None
    assert layer._folded_forward(["default"], x, (), {"scale": 1.0}) is None
