"""What a bf16 model's HiRA branch computes in outside autocast (e.g. `generate()`), and how close it stays to fp64.

PEFT keeps adapter weights in fp32 and casts the layer input to them; for HiRA that would run the products with
`W0 ⊙ BA`, as large as the base layer's own, in fp32. GateRA runs them in the input's dtype instead
(`gatera_plugin.branches.Branch.input_dtype`), with `BA` formed in fp32 and A, B and their gradients kept fp32.
"""

import copy
import math

import pytest
import torch
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from gatera_plugin import GateRAConfig
from tests.helpers import RecordOps, max_error, naive_gated_hira, within_tolerance

D_IN, D_OUT, R, N = 48, 80, 8, 33
class _One(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(D_IN, D_OUT, bias=False)

    def forward(self, x):
        return self.proj(x)


def _model(dtype, gate="sigmoid"):
    torch.manual_seed(0)
    base = _One()
    with torch.no_grad():
        base.proj.weight.mul_(20.0)  # a pretrained weight's scale, so that the update is not lost in bf16 rounding
    config = GateRAConfig(r=R, target_modules=["proj"], gate=gate, init_weights=False, entropy_weight=0.0)
    return get_peft_model(base.to(dtype), config).train()


def _costs_n_d_in_d_out(shapes) -> bool:
    """A product of N·d_in·d_out multiply-adds (token by weight sized): its operands span N, d_in and d_out."""
    return {N, D_IN, D_OUT} <= {d for shape in shapes for d in shape}


@pytest.mark.parametrize("gate", ["sigmoid", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_model_outside_autocast_runs_weight_sized_products_in_its_dtype(dtype, gate):
    model = _model(dtype, gate)
    layer = model.base_model.model.proj
    assert layer.gatera_A["default"].dtype == torch.float32  # PEFT's default: fp32 adapter weights
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    recorder = RecordOps()
    with recorder:
        out = model(x)
        out.backward(torch.ones_like(out))
    assert out.dtype == dtype and x.grad.dtype == dtype
    assert layer.gatera_A["default"].grad.dtype == torch.float32 and layer.gatera_B["default"].grad.dtype == torch.float32
    # the base's forward and dx, the branch's x ΔWᵀ, and in backward δ ΔW and δᵀ x: all in `dtype` (ungated, the base's
    # and the branch's dx are one product, δ (W0 + s·ΔW): only backward folds in half precision, tests/test_fold.py)
    big = [dtypes for shapes, dtypes in recorder.calls if _costs_n_d_in_d_out(shapes)]
    assert len(big) == (5 if gate == "sigmoid" else 4), recorder.calls
    assert all(set(dtypes) == {dtype} for dtypes in big), big
    # the rank-r products (B A, and dΔW Aᵀ, Bᵀ dΔW for the factor gradients) stay fp32
    factor = [dtypes for shapes, dtypes in recorder.calls if any(R in shape for shape in shapes)]
    assert len(factor) >= 3 and all(set(dtypes) == {torch.float32} for dtypes in factor), factor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_model_outside_autocast_within_rounding_of_fp64(dtype):
    """Output and every gradient against the fp64 truth: within 2x the error of naive autograd run wholly in `dtype`
    (+2 ulp), the rule of the other low-precision tests (`tests.helpers.rounding_bound`)."""
    model = _model(dtype)
    layer = model.base_model.model.proj
    params = {"A": layer.gatera_A["default"], "B": layer.gatera_B["default"],
              "w": layer.gatera_gate["default"].weight, "b": layer.gatera_gate["default"].bias}
    W0 = layer.base_layer.weight.detach()
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(2))
    s = layer.scaling["default"]

    def reference(precision):
        t = {k: v.detach().to(precision).requires_grad_() for k, v in params.items()}
        xr = x.to(precision).requires_grad_()
        W = W0.to(precision)
        out = xr @ W.t() + naive_gated_hira(xr, W, t["A"], t["B"], t["w"], t["b"], s)
        grads = torch.autograd.grad(out, [xr, *t.values()], grad_out.to(precision))
        return out, dict(zip(["x", *t], grads))

    truth_out, truth = reference(torch.float64)
    naive_out, naive = reference(dtype)
    xo = x.to(dtype).requires_grad_()
    out = model(xo)
    out.backward(grad_out.to(dtype))
    ours = {"x": xo.grad, **{k: v.grad for k, v in params.items()}}
    passed, error, bound = within_tolerance(out, naive_out, truth_out)
    assert passed, f"output: error {error:.3g} > {bound:.3g}"
    for name in truth:
        # fp32 gradients (A, B, gate) are held to the dtype's rule too: their inputs passed through `dtype`
        passed, error, bound = within_tolerance(ours[name].to(dtype), naive[name], truth[name], grad=True)
        assert passed, f"grad of {name}: error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("gate", ["sigmoid", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_decoding_step_takes_the_factored_update_within_rounding_of_fp64(dtype, gate, monkeypatch):
    """A decoding step as `generate()` runs it: eval, `no_grad`, the model outside autocast, one token per sequence
    (2 sequences here). The layer takes `ops.hira.factored_update` (no ΔW formed), the output keeps the model's dtype
    and stays within the rounding rule against fp64, and many tokens (a prefill) still form ΔW, as does a smaller
    weight than `FACTORED_LIMITS` allows (set to this layer's size here)."""
    import gatera_plugin.ops.hira as hira_ops

    monkeypatch.setattr(hira_ops, "FACTORED_LIMITS", ((D_OUT * D_IN, 3.0),))
    model = _model(dtype, gate).eval()
    layer = model.base_model.model.proj
    calls, factored = [], hira_ops.factored_update
    monkeypatch.setattr(hira_ops, "factored_update", lambda *args: calls.append(args[0].shape) or factored(*args))
    W0 = layer.base_layer.weight.detach()
    x = torch.randn(2, 1, D_IN, generator=torch.Generator().manual_seed(1))
    gate_module = layer.gatera_gate["default"] if gate == "sigmoid" else None

    def reference(precision):
        xr, W = x.to(precision), W0.to(precision)
        A, B = (layer.gatera_A["default"].detach().to(precision), layer.gatera_B["default"].detach().to(precision))
        w, b = ((gate_module.weight.detach().to(precision), gate_module.bias.detach().to(precision)) if gate_module
                else (None, None))
        return xr @ W.t() + naive_gated_hira(xr, W, A, B, w, b, layer.scaling["default"])

    with torch.no_grad():
        out = model(x.to(dtype))
        assert calls == [(2, D_IN)] and out.dtype == dtype
        passed, error, bound = within_tolerance(out, reference(dtype), reference(torch.float64))
        assert passed, f"output: error {error:.3g} > {bound:.3g}"
        model(torch.randn(2, N, D_IN).to(dtype))
        assert calls == [(2, D_IN)]  # 66 tokens: ΔW formed
        monkeypatch.setattr(hira_ops, "FACTORED_LIMITS", ((D_OUT * D_IN + 1, 3.0),))
        model(x.to(dtype))
    assert calls == [(2, D_IN)]  # a smaller weight than the threshold: ΔW formed


def test_cache_delta_keeps_the_inference_delta_in_the_input_dtype():
    """`cache_delta` on a bf16 model outside autocast: the cached `s·W0 ⊙ BA` is bf16 like the input (not the fp32
    adapter dtype), gives the uncached branch's output within bf16 rounding, and is rebuilt for an fp32 input."""
    model = _model(torch.bfloat16).eval()
    layer = model.base_model.model.proj
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        uncached = model(x)
        model.peft_config["default"].cache_delta = True  # the layers read this config
        cached = model(x)
        assert layer._delta_cache["default"][3].dtype == torch.bfloat16 and cached.dtype == torch.bfloat16
        bound = 2 * torch.finfo(torch.bfloat16).eps * uncached.float().abs().max().item()  # 2 ulp of the output
        assert max_error(uncached, base) > 1.5 * bound  # the adapter's effect shows above that
        assert max_error(cached, uncached) <= bound
        layer.base_layer.float()
        model(x.float())
        assert layer._delta_cache["default"][3].dtype == torch.float32


class _NoFloat64(TorchDispatchMode):
    """Raises, as Apple's MPS does, on any operation that reads or makes a float64 tensor."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if kwargs.get("dtype") == torch.float64 or any(
                isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_leaves((args, out))):
            raise TypeError(f"{func}: Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't "
                            "support float64. Please use float32 instead.")
        return out


@pytest.mark.parametrize("gates", [{"gate": "sigmoid", "entropy_weight": 0.5}, {"gate": "threshold"},
                                   {"gate": "none", "structure_gate": True}], ids=["sigmoid", "threshold", "structure"])
def test_training_and_gate_statistics_on_a_device_without_float64(monkeypatch, gates):
    """Apple's MPS has no float64. The gate statistics were summed in float64 on the gate's
    device, so the first gated forward in training raised there. On such devices they are now summed in float32: a
    training step and its logged statistics run with no float64 operation, and log what the float64 sums log."""
    from gatera_plugin import penalty
    from tests.helpers import tiny_llama

    ids = torch.randint(3, 128, (2, 9))

    def step_logs():
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                          init_weights=False, **gates)).train()
        model(input_ids=ids, labels=ids).loss.backward()
        return model.base_model.pop_gate_stats(per_layer=True)

    expected = step_logs()
    monkeypatch.setattr(penalty, "DEVICES_WITHOUT_FLOAT64", penalty.DEVICES_WITHOUT_FLOAT64 | {"cpu"})
    with _NoFloat64():
        logs = step_logs()
    assert logs.keys() == expected.keys() and len(logs) > 2
    for key in logs:
        assert logs[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("branch", ["hira", "lora", "dora"])
def test_an_adapter_loaded_for_inference_on_a_half_base_trains_nothing(tmp_path, dtype, branch):
    """PEFT upcasts a half-precision adapter to fp32 by reassigning its ParameterDict entries, which made A and B
    trainable again on a bf16 / fp16 base (`is_trainable=False` loads and `inference_mode=True` configs alike)."""
    from peft import PeftModel

    from tests.helpers import tiny_llama

    config = GateRAConfig(r=4, branch=branch, target_modules=["q_proj", "v_proj"])
    get_peft_model(tiny_llama().to(dtype), config).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == []
    assert {p.dtype for n, p in loaded.named_parameters() if "gatera_" in n} == {torch.float32}
    frozen = get_peft_model(tiny_llama().to(dtype), GateRAConfig(r=4, branch=branch, inference_mode=True))
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == []
    trainable = PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path, is_trainable=True)
    names = {n.split(".")[-2] for n, p in trainable.named_parameters() if p.requires_grad}
    assert {"gatera_A", "gatera_B"} <= names


@pytest.mark.parametrize("branch, gate", [("hira", "sigmoid"), ("hira", "none"), ("lora", "sigmoid")])
def test_autocast_casts_each_factor_once_per_training_step(branch, gate):
    """A bf16 model trained under bf16 autocast, PEFT's fp32 A and B (a user's GPU run): the branch's forward casts A
    and B to bf16 once and saves the casts, so backward casts neither again (`ops._autocast.autocast_factors`), as
    autograd's own linear layers save autocast's cast of their weight; the gradients come back fp32."""
    torch.manual_seed(0)
    config = GateRAConfig(r=R, target_modules=["proj"], gate=gate, branch=branch, init_weights=False)
    model = get_peft_model(_One().to(torch.bfloat16), config).train()
    layer = model.base_model.model.proj
    A, B = layer.gatera_A["default"], layer.gatera_B["default"]
    assert A.dtype == B.dtype == torch.float32
    x = torch.randn(N, D_IN).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), RecordOps({torch.ops.aten._to_copy.default}) as casts:
        out = model(x)
    with RecordOps({torch.ops.aten._to_copy.default}) as backward_casts:
        out.float().pow(2).mean().backward()
    shapes = {tuple(A.shape): "A", tuple(A.t().shape): "A", tuple(B.shape): "B", tuple(B.t().shape): "B"}  # (or a
    # transpose: autocast casts the operand a product gets)
    factor_casts = sorted((shapes[operands[0]], str(dtypes[0])) for operands, dtypes in casts.calls + backward_casts.calls
                          if operands[0] in shapes)
    # fp32 → bf16 once each (forward), bf16 → fp32 once each (the gradients, backward)
    assert factor_casts == [("A", "torch.bfloat16"), ("A", "torch.float32"), ("B", "torch.bfloat16"),
                            ("B", "torch.float32")], factor_casts
    assert A.grad.dtype == B.grad.dtype == torch.float32 and A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0


@pytest.mark.parametrize("branch", ["lora", "dora"])
def test_lora_and_dora_branches_under_autocast_save_the_half_input_not_an_fp32_copy(branch):
    """A bf16 model with `branch="lora"` or `"dora"` trained under bf16 autocast: the layer keeps x bf16
    (`Branch.input_dtype`), so nothing saved for backward is an fp32 copy of x (PEFT's cast to the fp32 factors made
    one, which the branch's function and the gate's node saved: twice the memory of the bf16 x). Autocast runs the
    products in bf16 either way: the output and A's and B's (and DoRA's magnitude's) gradients equal those of the same
    layer given x already cast to fp32, bit for bit; the gate's gradients within bf16 rounding (its weight gradient is
    now a bf16 product, as autocast's linear layers and the HiRA branch, which keeps a bf16 x everywhere, compute
    theirs)."""
    torch.manual_seed(0)
    config = GateRAConfig(r=R, target_modules=["proj"], gate="sigmoid", branch=branch, init_weights=False)
    model = get_peft_model(_One().to(torch.bfloat16), config).train()
    x_bf16 = torch.randn(N, D_IN).to(torch.bfloat16)
    runs = {}
    for name, x in (("bf16 input", x_bf16), ("fp32 input", x_bf16.float())):
        saved = []

        def pack(tensor, saved=saved):
            saved.append((tuple(tensor.shape), tensor.dtype))
            return tensor

        x = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        out.float().pow(2).mean().backward()
        grads = {n.split("proj.")[-1]: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[name] = (out.detach(), grads, {dtype for shape, dtype in saved if shape == (N, D_IN)})
        model.zero_grad()
    (out, grads, saved_x_dtypes), (ref_out, ref_grads, ref_saved) = runs["bf16 input"], runs["fp32 input"]
    assert saved_x_dtypes == {torch.bfloat16} and torch.float32 in ref_saved
    assert torch.equal(out, ref_out)
    factors = ("gatera_A.default", "gatera_B.default") + (("gatera_magnitude.default",) if branch == "dora" else ())
    for name in factors:
        assert grads[name].dtype == torch.float32 and torch.equal(grads[name], ref_grads[name]), name
    for name in ("gatera_gate.default.weight", "gatera_gate.default.bias"):
        scale = ref_grads[name].abs().max()
        assert scale > 0 and (grads[name] - ref_grads[name]).abs().max() <= 2 ** -7 * scale, name


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_gated_dora_keeps_less_per_token_for_backward_than_peft_dora(precision):
    """Gated DoRA (`ops.dora`) keeps, per token, x, the rank-r activation, the base output and the gate; PEFT's
    ungated DoRA keeps the same but its LoRA output (N × d_out) in place of the gate (N × 1). Plain autograd on the
    gated formula kept both (N × d_out) products and, under autocast, fp32 copies of x and of the base output."""
    from peft import LoraConfig

    configs = {"ours": GateRAConfig(r=R, target_modules=["proj"], branch="dora", init_weights=False),
               "peft": LoraConfig(r=R, target_modules=["proj"], use_dora=True, init_lora_weights=False)}
    dtype = torch.bfloat16 if precision == "bf16-autocast" else torch.float32
    token_bytes = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = get_peft_model(_One().to(dtype), config).train()
        saved = {}

        def pack(tensor, saved=saved, name=name):
            if tensor.dim() >= 1 and tensor.shape[0] == N:  # (one entry per storage: a tensor saved twice counts once)
                saved[tensor.untyped_storage().data_ptr()] = tensor.numel() * tensor.element_size()
                # (one (N, 1) fp32 tensor is the gate's: σ runs in fp32 and keeps its output for an exact g(1 − g))
                assert name != "ours" or tensor.dtype == dtype or (tuple(tensor.shape) == (N, 1)
                                                                   and tensor.dtype == torch.float32), (
                    tuple(tensor.shape), tensor.dtype)
            return tensor

        x = torch.randn(N, D_IN).to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        out.float().pow(2).mean().backward()
        token_bytes[name] = sum(saved.values())
    itemsize = torch.finfo(dtype).bits // 8
    fp32_gate = N * 4 if dtype != torch.float32 else 0  # (σ's fp32 output, kept for its backward)
    assert token_bytes["ours"] <= token_bytes["peft"] - N * (D_OUT - 1) * itemsize + fp32_gate, token_bytes


@pytest.mark.parametrize("autocast", [False, True], ids=["outside-autocast", "bf16-autocast"])
def test_dora_on_a_bf16_model_rounds_its_output_as_peft_dora(autocast):
    """A bf16 model, PEFT's fp32 adapter weights, `branch="dora"` ungated: the fp32 update's two terms (magnitude and
    direction) are summed in fp32 and added to the bf16 output with one rounding, as PEFT's DoRA does. Outside autocast
    the outputs equal PEFT's bit for bit; under autocast (where PEFT's LoRA product rounds in another order) the mean
    error against fp64 is PEFT's. Rounding the terms into the output one at a time made it 1.11x PEFT's here."""
    from peft import LoraConfig

    from tests.helpers import PEFT_DORA_NAMES, copy_adapter_weights

    torch.manual_seed(0)
    base = _One()
    with torch.no_grad():
        base.proj.weight.mul_(20.0)
    configs = {"ours": GateRAConfig(r=R, target_modules=["proj"], branch="dora", gate="none", init_weights=False),
               "peft": LoraConfig(r=R, target_modules=["proj"], use_dora=True, init_lora_weights=False)}
    models = {name: get_peft_model(copy.deepcopy(base), config) for name, config in configs.items()}
    with torch.no_grad():
        magnitude = models["ours"].base_model.model.proj.gatera_magnitude["default"]
        magnitude.mul_(torch.rand_like(magnitude) + 0.5)
    copy_adapter_weights(models["ours"], models["peft"], PEFT_DORA_NAMES)
    x = torch.randn(256, D_IN)
    with torch.no_grad():
        truth = copy.deepcopy(models["ours"]).double()(x.double())
        outputs = {}
        for name, model in models.items():
            model.base_model.model.proj.base_layer.to(torch.bfloat16)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                outputs[name] = model(x.to(torch.bfloat16))
    assert outputs["ours"].dtype == outputs["peft"].dtype == torch.bfloat16
    if not autocast:
        assert torch.equal(outputs["ours"], outputs["peft"])
    errors = {name: (out.double() - truth).abs().mean().item() for name, out in outputs.items()}
    assert errors["ours"] <= 1.02 * errors["peft"], errors


@pytest.mark.parametrize("gate", ["none", "sigmoid"])
def test_lora_branch_on_a_bf16_model_outside_autocast_adds_its_fp32_update_with_one_rounding(gate):
    """A bf16 model, PEFT's fp32 adapter weights, `branch="lora"`, no autocast (e.g. `generate()`): the fp32 update
    `s · g ⊙ x Aᵀ Bᵀ` is added to the bf16 base output in fp32 and rounded once, as PEFT's LoRA does
    (`(result + update).to(result.dtype)`); ungated, the output equals PEFT's bit for bit. Rounding the update to
    bf16 before the add (two roundings) differs from both."""
    from peft import LoraConfig

    from tests.helpers import copy_adapter_weights

    torch.manual_seed(0)
    base = _One()
    with torch.no_grad():
        base.proj.weight.mul_(20.0)
    ours = get_peft_model(copy.deepcopy(base), GateRAConfig(r=R, target_modules=["proj"], branch="lora", gate=gate,
                                                            init_weights=False, entropy_weight=0.0))
    peft_lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, target_modules=["proj"], init_lora_weights=False))
    copy_adapter_weights(ours, peft_lora, {"gatera_A.default": "lora_A.default.weight",
                                           "gatera_B.default": "lora_B.default.weight"})
    layer = ours.base_model.model.proj
    A, B, scaling = layer.gatera_A["default"], layer.gatera_B["default"], layer.scaling["default"]
    x = torch.randn(256, D_IN).to(torch.bfloat16)
    with torch.no_grad():
        for model in (ours, peft_lora):
            model.base_model.model.proj.base_layer.to(torch.bfloat16)
        out = ours(x)
        g = layer.gatera_gate["default"](x.float()) if gate == "sigmoid" else torch.ones(len(x), 1)
        gated_update = ((x.float() @ A.t()) @ B.t()) * (g * scaling)  # fp32, (N, d_out)
        base_out = layer.base_layer(x)  # bf16
        one_rounding = (gated_update + base_out).to(torch.bfloat16)
        two_roundings = base_out + gated_update.to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, one_rounding)
    assert not torch.equal(out, two_roundings)
    if gate == "none":
        assert torch.equal(out, peft_lora(x))


@pytest.mark.parametrize("branch", ["lora", "dora"])
def test_sparse_execution_on_a_bf16_model_rounds_each_open_token_as_the_dense_path(branch):
    """`sparse_threshold`: the branch runs on the open tokens only, and their fp32 update meets the bf16 output with
    the dense path's one rounding, so an open token's output does not depend on which other tokens are closed."""
    torch.manual_seed(0)
    base = _One()
    with torch.no_grad():
        base.proj.weight.mul_(20.0)
    models = {threshold: get_peft_model(copy.deepcopy(base), GateRAConfig(
        r=R, target_modules=["proj"], branch=branch, init_weights=False, sparse_threshold=threshold)).eval()
        for threshold in (0.0, 0.5)}
    models[0.5].load_state_dict(models[0.0].state_dict())
    x = torch.randn(256, D_IN).to(torch.bfloat16)
    with torch.no_grad():
        for model in models.values():
            model.base_model.model.proj.base_layer.to(torch.bfloat16)
        layer = models[0.5].base_model.model.proj
        open_ = (layer.gatera_gate["default"](x.float()) >= 0.5).squeeze(1)
        assert 0.2 < open_.float().mean() < 0.8
        dense, sparse = models[0.0](x), models[0.5](x)
    assert sparse.dtype == torch.bfloat16
    assert torch.equal(sparse[~open_], layer.base_layer(x)[~open_])
    assert torch.equal(sparse[open_], dense[open_])


@pytest.mark.parametrize("branch", ["hira", "lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merging_on_a_half_base_rounds_once(dtype, branch):
    """`merge` sums W0 and the fp32 delta and rounds once to the base dtype, as its docstring says: the delta was
    rounded to the base dtype first (4-18% of the merged entries off by one more rounding); unmerge restores W0."""
    from gatera_plugin.branches import delta_weight

    torch.manual_seed(0)
    model = get_peft_model(_One().to(dtype), GateRAConfig(r=R, target_modules=["proj"], gate="none", branch=branch,
                                                          init_weights=False))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.gatera_B["default"].normal_(0, 0.3)
        if branch == "dora":
            layer.gatera_magnitude["default"].mul_(1.3)
    W0 = layer.base_layer.weight.detach().clone()
    delta = delta_weight(branch, W0, layer.gatera_A["default"], layer.gatera_B["default"], layer.scaling["default"],
                         layer.gatera_magnitude.get("default"))
    model.merge_adapter()
    assert torch.equal(layer.base_layer.weight, (W0.float() + delta.float()).to(dtype))
    assert layer.get_delta_weight("default").dtype == dtype  # (PEFT's public delta stays in the weight's dtype)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, W0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_sigmoid_gate_on_a_half_input_takes_its_gradient_from_an_fp32_sigma(dtype):
    """A half-precision x (a bf16 model outside autocast, or autocast's logits): σ runs in fp32, so its backward's
    g(1 − g) is exact where a half g is coarse near 1 (bf16: 2^-8 apart) or exactly 1 (a logit above ~6 in bf16),
    which made gradients up to 8% off per token, or 0; g itself is returned in fp32 too (its penalty tap and the branch
    read it so)."""
    from gatera_plugin.gates import SigmoidGate

    torch.manual_seed(0)
    gate = SigmoidGate(D_IN, bias_init=6.0)
    gate.reset_parameters(random=True)
    x = torch.randn(N, D_IN).to(dtype)
    weights = torch.randn(N, 1, dtype=torch.float64)
    g = gate(x)
    assert g.dtype == torch.float32
    (g.double() * weights).sum().backward()
    logits = torch.nn.functional.linear(x, gate.weight.detach().to(dtype), gate.bias.detach().to(dtype))
    truth_g = torch.sigmoid(logits.double())  # (σ of the same half-precision logits, exactly)
    terms = weights * truth_g * (1 - truth_g)
    assert (truth_g > 1 - 2.0 ** -9).any()  # (some gates that a bf16 σ rounds to 1: a logit above ~6.2)
    # (the gradient of the half logits, and the linear map's backward, round to x's dtype: a few ulp of the terms)
    assert abs(gate.bias.grad.double().item() - terms.sum().item()) <= 2 * torch.finfo(dtype).eps * terms.abs().sum()


@pytest.mark.parametrize("where", ["bf16-model", "fp32-model-bf16-autocast", "fp16-model"])
def test_the_entropy_penalty_reads_the_fp32_gate_not_its_half_precision_copy(where):
    """The entropy penalty's gradient and its logged entropy come from σ in fp32, as the gate's own backward does.
    They used to read the gate after its cast to the logits' dtype: near 1 a bf16 g is 2^-8 apart, or 1 exactly above a logit
    of ~6 (the clamp then gave that token no penalty gradient at all), which put the penalty's gradient on the gate's
    bias 10% and more off at the saturated gates a trained entropy penalty makes."""
    dtype = torch.float16 if where == "fp16-model" else torch.bfloat16
    model = _model(torch.float32 if "autocast" in where else dtype)
    layer = model.base_model.model.proj
    layer.options["default"].entropy_weight = 0.7
    gate = layer.gatera_gate["default"]
    with torch.no_grad():
        gate.weight.normal_(0.0, 2.0 / D_IN ** 0.5)
        gate.bias.fill_(5.0)  # (most gates near 1, as an entropy penalty drives them)
    inputs = []
    handle = gate.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    x = torch.randn(N, D_IN).to(torch.float32 if "autocast" in where else dtype)
    with torch.autocast("cpu", dtype=dtype, enabled="autocast" in where):
        (model(x).float().sum() * 0).backward()  # (the task's gradient is 0: the bias's is the penalty's alone)
    handle.remove()
    with torch.autocast("cpu", dtype=dtype, enabled="autocast" in where):
        logits = torch.nn.functional.linear(inputs[0], gate.weight.detach().to(inputs[0].dtype),
                                            gate.bias.detach().to(inputs[0].dtype))
    z = logits.double().reshape(-1)  # (the logits as the gate computed them)
    g = torch.sigmoid(z)
    truth_grad = 0.7 / N * (-z * g * (1 - g)).sum() / math.log(2)  # ∂/∂b of λ · mean_t H(σ(z_t)) / log 2
    truth_entropy = (-(g * g.log() + (1 - g) * (1 - g).log()) / math.log(2)).mean()
    assert (g > 1 - 2.0 ** -9).any() and (g < 1 - 2.0 ** -6).any()
    # (the bias's gradient: the tokens' penalty gradients, each rounded to the logits' dtype, summed and rounded;
    # read from the cast g, bf16's was 1.7% off here)
    assert gate.bias.grad.item() == pytest.approx(truth_grad.item(), rel=torch.finfo(dtype).eps)
    stats = model.base_model.pop_gate_stats()
    assert stats["gatera/entropy"] == pytest.approx(truth_entropy.item(), rel=1e-4)


def test_threshold_gate_compares_r_and_tau_in_fp32_for_a_bf16_update():
    """r and τ were rounded to the update's bf16 before `r ≥ τ`: a token with r = v (a bf16 value near 0.05, where
    bf16's spacing is 2.4e-4) and τ = v + 1e-4 was kept (both v in bf16), and τ's Adam steps of ~1e-4 moved the
    selection in jumps. Compared in fp32, the selection is the exact one."""
    from gatera_plugin.gates import ThresholdGate

    v = torch.tensor(0.05).bfloat16()
    spacing = 2.0 ** (math.floor(math.log2(v.item())) - 7)
    base = torch.zeros(3, 4, dtype=torch.bfloat16)
    base[:, 0] = 1.0
    update = torch.zeros(3, 4, dtype=torch.bfloat16)
    update[:, 1] = torch.stack([v - spacing, v, v + spacing])  # r: three neighbouring bf16 values
    ratio = update.double().norm(dim=-1, keepdim=True)
    gate = ThresholdGate(threshold_init=0.0)
    for offset in (-1e-4, 1e-4, spacing + 1e-4):
        tau = v.item() + offset
        gate.threshold.data.fill_(tau)
        expected = (ratio >= torch.tensor(tau, dtype=torch.float32).double()).float()
        torch.testing.assert_close(gate(update, base).float(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("gate", ["none", "sigmoid"])
def test_sparse_threshold_compares_the_fp32_gate_on_a_bf16_model(gate):
    """A structure gate of 0.09995 (bf16: 0.1001) against ε = 0.1: the bf16 multiplier was compared, so the module
    ran in eval although its gate is below ε, while the merge, which reads σ(α) in fp32, dropped it (with a token
    gate at 1 beside it too)."""
    from tests.helpers import tiny_llama

    ids = torch.randint(3, 128, (2, 9))
    value = 0.09995
    logit = math.log(value / (1 - value))
    assert torch.tensor(value).bfloat16().item() > 0.1
    base = tiny_llama(init_std=0.2).to(torch.bfloat16)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_peft_model(base, GateRAConfig(r=4, target_modules=["q_proj", "up_proj"], gate=gate, init_weights=False,
                                              structure_gate=True, sparse_threshold=0.1))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("alpha"):
                param.fill_(logit)
            elif name.endswith(".bias") and "gatera_gate" in name:
                param.fill_(20.0)  # every token's gate at σ(20) = 1 in fp32
            elif "gatera_gate" in name:
                param.zero_()
            elif "gatera_B" in name:
                param.normal_(0, 0.3)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["fp32-model", "fp16-base"])
@pytest.mark.parametrize("gates", ["token", "structure", "token+structure"])
@pytest.mark.parametrize("branch", ["hira", "lora", "dora"])
def test_fp16_autocast_gradients_of_gates_started_nearly_closed_match_fp32(branch, gates, where):
    """Under fp16 autocast (an fp32 model, or an fp16 base with PEFT's fp32 adapter: a T4's QLoRA-style run) at a loss
    scale of 2^12, gates started at σ(-10) = 4.5e-5 (HiRA's hira_scaling='lora' makes s 1/g0 times larger): every
    gradient is finite and within 2% of the largest of the fp32 run's. The gates enter the branch in fp32 and their
    gradient `s · dot` is formed there; in fp16 it overflowed at any loss scale (HiRA: inf / nan on the gates)."""
    config = {"token": {"gate_bias_init": -10.0},
              "structure": {"gate": "none", "structure_gate": True, "structure_init": -10.0},
              "token+structure": {"gate_bias_init": -10.0, "structure_gate": True}}[gates]
    if "structure" in gates:
        config["structure_weight"] = 0.0
    scale = 2.0 ** 12

    def gradients(half):
        torch.manual_seed(0)
        base = _One()
        model = get_peft_model(base.half() if half and where == "fp16-base" else base, GateRAConfig(
            r=R, target_modules=["proj"], branch=branch, init_weights=False, entropy_weight=0.0, **config)).train()
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        assert {p.dtype for p in trained.values()} == {torch.float32}
        g = torch.Generator().manual_seed(1)
        x = torch.randn(N, D_IN, generator=g)
        weights = torch.randn(N, D_OUT, generator=g)
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            out = model(x.half() if half and where == "fp16-base" else x)
        ((out.float() * weights).sum() / N * (scale if half else 1.0)).backward()
        return {name: p.grad.double() / (scale if half else 1.0) for name, p in trained.items()}

    half, full = gradients(True), gradients(False)
    for name, reference in full.items():
        assert torch.isfinite(half[name]).all(), name
        torch.testing.assert_close(half[name], reference, rtol=0.0, atol=2e-2 * reference.abs().max().item(),
                                   msg=name)


@pytest.mark.parametrize("gates", ["structure", "token+structure"])
@pytest.mark.parametrize("branch", ["lora", "dora"])
def test_fp16_autocast_gives_lora_and_dora_the_factor_gradient_of_deeply_closed_gates(branch, gates):
    """fp16 autocast, an fp32 layer input, GradScaler's initial 2^16 on a mean loss, gates whose product is 1e-7 (s·g
    = 2e-7): A's gradient is within 2% of the fp32 run's (its relative error in norm). `dh = u ⊙ (s·g)` is formed in
    fp32 from the loss-scaled u and rounded once; with s·g rounded to fp16 first (a subnormal there) it was 10% off,
    and 0 below s·g = 3e-8."""
    level = 1e-7
    logit = math.log(math.sqrt(level) / (1 - math.sqrt(level)))
    config = {"gate": "none", "structure_init": math.log(level / (1 - level))} if gates == "structure" else {
        "gate_bias_init": logit, "structure_init": logit}

    def gradient_of_A(half):
        torch.manual_seed(0)
        model = get_peft_model(_One(), GateRAConfig(
            r=R, lora_alpha=2 * R, target_modules=["proj"], branch=branch, init_weights=False, entropy_weight=0.0,
            structure_gate=True, structure_weight=0.0, **config)).train()
        layer = model.base_model.model.proj
        if gates != "structure":
            with torch.no_grad():
                layer.gatera_gate["default"].weight.zero_()  # (every token's gate at σ(b))
        g = torch.Generator().manual_seed(1)
        x, weights = torch.randn(N, D_IN, generator=g), torch.randn(N, D_OUT, generator=g)
        scale = 2.0 ** 16 if half else 1.0
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            out = model(x)
        ((out.float() * weights).mean() * scale).backward()
        return layer.gatera_A["default"].grad.double() / scale

    half, full = gradient_of_A(True), gradient_of_A(False)
    assert full.norm() > 0 and (half - full).norm() <= 0.02 * full.norm()
