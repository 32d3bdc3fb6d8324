"""The anchors of the suite (docs/method.md, "Branches"): ungated GateRA equals PEFT's HiRA and LoRA; gated equals the
formula."""

import contextlib
import copy

import pytest
import torch
from peft import HiraConfig, LoraConfig, get_peft_model

from gatera_plugin import GateRAConfig
from tests.helpers import TwoLinear, copy_adapter_weights, naive_gated_hira, naive_gated_lora, tiny_gpt2, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _loss_and_grads(model, input_ids, names):
    torch.manual_seed(1)  # (the same dropout masks for both models, drawn in the same order)
    out = model(input_ids=input_ids, labels=input_ids)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(out.loss, [params[n] for n in names])
    return out.logits.detach(), dict(zip(names, grads))


def _compare(ours, theirs, mapping, input_ids):
    """Same logits and same adapter gradients (theirs' names = ours' names with `mapping` applied)."""
    copy_adapter_weights(ours, theirs, mapping)
    our_names = [n for n, p in ours.named_parameters() if p.requires_grad]
    their_names = []
    for n in our_names:
        for old, new in mapping.items():
            n = n.replace(old, new)
        their_names.append(n)
    assert our_names and len(our_names) == len([p for p in theirs.parameters() if p.requires_grad])
    logits, grads = _loss_and_grads(ours, input_ids, our_names)
    ref_logits, ref_grads = _loss_and_grads(theirs, input_ids, their_names)
    assert not torch.allclose(logits, _base_logits(ours, input_ids), atol=1e-4), "adapter must change the output"
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for ours_name, their_name in zip(our_names, their_names):
        torch.testing.assert_close(grads[ours_name].reshape(ref_grads[their_name].shape), ref_grads[their_name],
                                   rtol=1e-4, atol=1e-6, msg=ours_name)


def _base_logits(model, input_ids):
    with model.disable_adapter(), torch.no_grad():
        return model(input_ids=input_ids).logits


# dropout: in training mode, as a LoRA recipe's `lora_dropout: 0.05` trains (PEFT's `hira_dropout` / `lora_dropout`)
EQUIVALENCE_CASES = pytest.mark.parametrize("builder,targets,dropout", [
    (tiny_llama, LLAMA_TARGETS, 0.0), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], 0.0), (tiny_llama, LLAMA_TARGETS, 0.3),
], ids=["llama", "gpt2", "llama-dropout"])


@EQUIVALENCE_CASES
def test_ungated_hira_equals_peft_hira(builder, targets, dropout):
    input_ids = torch.randint(3, 128, (2, 9))
    ours = get_peft_model(builder(), GateRAConfig(r=4, target_modules=targets, gate="none", hira_scaling="none",
                                                  init_weights=False, dropout=dropout))
    fan_in_fan_out = builder is tiny_gpt2
    theirs = get_peft_model(builder(), HiraConfig(r=4, target_modules=targets, init_weights=False,
                                                  fan_in_fan_out=fan_in_fan_out, hira_dropout=dropout))
    _compare(ours.train(), theirs.train(), {"gatera_A": "hira_A", "gatera_B": "hira_B"}, input_ids)


@EQUIVALENCE_CASES
def test_ungated_lora_equals_peft_lora(builder, targets, dropout):
    input_ids = torch.randint(3, 128, (2, 9))
    ours = get_peft_model(builder(), GateRAConfig(r=4, lora_alpha=12, branch="lora", target_modules=targets,
                                                  gate="none", init_weights=False, dropout=dropout))
    fan_in_fan_out = builder is tiny_gpt2
    theirs = get_peft_model(
        builder(),
        LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False, fan_in_fan_out=fan_in_fan_out,
                   lora_dropout=dropout),
    )
    ours.train(), theirs.train()
    _compare(ours, theirs, {"gatera_A.default": "lora_A.default.weight", "gatera_B.default": "lora_B.default.weight"},
             input_ids)


@pytest.mark.parametrize("branch", ["hira", "lora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gated_layer_equals_naive_formula(branch, dropout):
    """y = W0 x + b0 + s·σ(w·x + b)·Δy(dropout(x)): output and every gradient against the formula written out, with
    the default scales (HiRA: `1 / (RMS(W0) · σ(0))`, LoRA and DoRA: lora_alpha / r). DoRA's Δy is PEFT's
    `(c − 1) ⊙ W0 x + c ⊙ s·BA x`, `c = m / ‖W0 + sBA‖` (the norm detached), with a magnitude m ≠ ‖W0‖."""
    model = TwoLinear()
    config = GateRAConfig(r=3, target_modules=["lin0", "lin1"], branch=branch, init_weights=False, dropout=dropout,
                          lora_alpha=6 if branch != "hira" else None, entropy_weight=0.0)
    peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model.lin1
    x = torch.randn(5, 7, 20, requires_grad=True)
    torch.manual_seed(11)
    out = layer(x)
    A, B = layer.gatera_A["default"], layer.gatera_B["default"]
    gate = layer.gatera_gate["default"]
    W0, b0 = layer.base_layer.weight, layer.base_layer.bias
    inputs = [x, A, B, gate.weight, gate.bias]
    if branch == "dora":
        magnitude = layer.gatera_magnitude["default"]
        with torch.no_grad():
            magnitude.mul_(torch.rand_like(magnitude) + 0.5)
        torch.manual_seed(11)
        out = layer(x)
        inputs.append(magnitude)
    torch.manual_seed(11)
    x_drop = torch.nn.functional.dropout(x, p=dropout, training=True) if dropout else x
    g = torch.sigmoid(x @ gate.weight.t() + gate.bias)
    if branch == "hira":
        delta = naive_gated_hira(x_drop, W0, A, B, None, None) / (W0.square().mean().sqrt() * 0.5)
    elif branch == "lora":
        delta = naive_gated_lora(x_drop, A, B, None, None, scaling=2.0)
    else:
        c = magnitude / torch.linalg.norm(W0 + 2.0 * (B @ A), dim=1).detach()
        delta = (c - 1) * (x_drop @ W0.t()) + c * naive_gated_lora(x_drop, A, B, None, None, scaling=2.0)
    expected = x @ W0.t() + b0 + g * delta
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, inputs, grad_out)
    ref = torch.autograd.grad(expected, inputs, grad_out)
    for name, a, b in zip(["x", "A", "B", "gate.weight", "gate.bias", "magnitude"], ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp32", "bf16", "fp32-bf16-autocast"])
@pytest.mark.parametrize("branch_reads_x", [True, False], ids=["branch-grad", "gate-grad-only"])
def test_gate_passes_x_on_with_the_gradients_of_its_linear_map(dtype, autocast, branch_reads_x):
    """The x that the sigmoid gate passes on to the branch (`pass_input`) is x itself, and the gradients that reach
    x, w and b are those of plain autograd through `σ(F.linear(x, w, b))` and the branch: x's gradient is the branch's
    with the gate's `dz w` added (in place), in fp32 within the fp32 tolerance, in bf16 (a bf16 model, and fp32 under
    bf16 autocast) within the rounding rule against fp64."""
    from gatera_plugin.gates import SigmoidGate
    from tests.helpers import FP32_GRAD_TOLERANCE, max_error, rounding_bound

    g = torch.Generator().manual_seed(0)
    x0, M = torch.randn(13, 24, generator=g), torch.randn(24, 16, generator=g) / 5
    R1, R2 = torch.randn(13, 16, generator=g), torch.randn(13, 1, generator=g)
    gate = SigmoidGate(24, bias_init=0.5)
    gate.reset_parameters(random=True)
    with torch.no_grad():  # nothing to pass on without autograd: the branch reads x, the gate keeps nothing
        gate(x0, pass_input=True)
        assert gate.passed_input is None and gate.take_passed_input(x0) is x0

    def run(x_dtype, joint):
        """(gate, grad x, grad w, grad b) with the branch `x' M` (a product of the x passed on) and the gate both
        feeding the loss; `joint`: through `pass_input`, else plain autograd."""
        x = x0.to(x_dtype).requires_grad_()
        w, b = gate.weight.detach().double().requires_grad_(), gate.bias.detach().double().requires_grad_()
        if x_dtype != torch.float64:
            w, b = gate.weight, gate.bias
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast and x_dtype != torch.float64 else \
            contextlib.nullcontext()
        with context:
            if joint and x_dtype != torch.float64:
                value = gate(x, pass_input=True)
                passed = gate.take_passed_input(x)
                assert gate.passed_input is None
                assert passed is not x and passed.data_ptr() == x.data_ptr() and passed.shape == x.shape
            else:
                logits = torch.nn.functional.linear(x, w.to(x_dtype), b.to(x_dtype))
                value, passed = torch.sigmoid(logits if x_dtype == torch.float64 else logits.float()), x  # (σ in fp32)
            loss = (value.float() * R2).sum()
            if branch_reads_x:
                loss = loss + ((passed @ M.to(passed.dtype)).float() * R1).sum()
        grads = torch.autograd.grad(loss, [x, w, b])
        return (value, *grads)

    ours, naive, truth = run(dtype, joint=True), run(dtype, joint=False), run(torch.float64, joint=False)
    for name, a, n, t in zip(["gate", "x", "w", "b"], ours, naive, truth):
        assert a.dtype == n.dtype, name
        if dtype == torch.float32 and not autocast:
            torch.testing.assert_close(a, n, **FP32_GRAD_TOLERANCE, msg=name)
        else:  # (bf16 products: ours no further from fp64 than twice plain autograd's error, plus 2 ulp)
            error, bound = max_error(a, t), rounding_bound(n, t, torch.bfloat16)
            assert error <= bound, f"{name}: error {error:.3g} > {bound:.3g}"


def test_gate_passes_x_on_only_on_the_devices_where_that_is_measured():
    """The gate passes x on (`_LogitsAndInput`) on CPU, where bench/gate_node.py measured it, and takes `F.linear` on
    any other device (a GPU until bench/gpu_check.py's "gatera-pass-input" rows measure it there; here a meta
    device stands for one) unless `passing_input_on` names it; the block restores the default."""
    from gatera_plugin.gates import PASS_INPUT_DEVICE_TYPES, SigmoidGate, passing_input_on

    assert PASS_INPUT_DEVICE_TYPES == {"cpu"}
    gate = SigmoidGate(8).to("meta")
    x = torch.empty(5, 8, device="meta", requires_grad=True)
    gate(x, pass_input=True)
    assert gate.take_passed_input(x) is x  # (F.linear: nothing passed on)
    with passing_input_on("meta"):
        gate(x, pass_input=True)
        passed = gate.take_passed_input(x)
        assert passed is not x and passed.grad_fn.name().startswith("_LogitsAndInput")
        with passing_input_on():
            cpu_gate = SigmoidGate(8)
            cpu_gate(torch.randn(5, 8, requires_grad=True), pass_input=True)  # (nowhere: not on CPU either)
            assert cpu_gate.passed_input is None
    assert PASS_INPUT_DEVICE_TYPES == {"cpu"}


def test_gated_layer_adds_the_gates_input_gradient_into_the_branchs_in_place():
    """In a gated layer whose input needs a gradient, backward adds the gate's `dz w` into the branch's dx with one
    `addmm_` (N, d_in): no (N, 1) x (1, d_in) outer product and no more (N, d_in) additions than the same layer
    without the gate (whose only one adds the base layer's dx to the branch's)."""
    from gatera_plugin.layer import without_folding
    from tests.helpers import RecordOps

    aten = torch.ops.aten
    x = torch.randn(11, 20, requires_grad=True)
    counts = {}
    for gate in ("sigmoid", "none"):
        torch.manual_seed(0)
        model = get_peft_model(TwoLinear(), GateRAConfig(r=3, target_modules=["lin1"], gate=gate, init_weights=False))
        layer = model.base_model.model.lin1
        with without_folding(), RecordOps({aten.mm.default, aten.add.Tensor, aten.addmm_.default}) as recorder:
            layer(x).sum().backward()
        counts[gate] = {
            "outer": sum(shapes[:2] == [(11, 1), (1, 20)] for shapes, _ in recorder.calls),
            "in place": sum(shapes == [(11, 20), (11, 1), (1, 20)] for shapes, _ in recorder.calls),
            "adds": sum(shapes == [(11, 20), (11, 20)] for shapes, _ in recorder.calls),
        }
    assert counts["sigmoid"] == {"outer": 0, "in place": 1, "adds": counts["none"]["adds"]}, counts


@pytest.mark.parametrize("branch", ["hira", "lora"])
def test_backward_inside_an_autocast_region_computes_as_the_forward_did(branch):
    """A gated layer run forward in fp32 outside autocast, with its backward called inside a bf16 autocast region (a
    loop that wraps `loss.backward()` in autocast too): the custom backward nodes (the branch's and the gate's) turn
    autocast off, so the adapter's gradients equal those of a backward outside it, bit for bit (a product in bf16
    would move them by ~1e-3). (x's gradient also holds the base layer's `δ W0`, whose built-in backward autocast does
    cast: PyTorch's behaviour, not compared.) Where autocast is off they enter no autocast context
    (`ops._autocast.autocast_off`)."""
    torch.manual_seed(0)
    model = get_peft_model(TwoLinear(), GateRAConfig(r=3, target_modules=["lin1"], branch=branch, init_weights=False,
                                                     lora_alpha=6 if branch == "lora" else None))
    layer = model.base_model.model.lin1
    layer.gatera_gate["default"].reset_parameters(random=True)
    x = torch.randn(9, 20, requires_grad=True)
    inputs = [layer.gatera_A["default"], layer.gatera_B["default"], *layer.gatera_gate["default"].parameters()]
    grad_out = torch.randn(9, layer.out_features)
    outside = torch.autograd.grad(layer(x), inputs, grad_out)
    out = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = torch.autograd.grad(out, inputs, grad_out)
    for name, a, b in zip(["A", "B", "gate.weight", "gate.bias"], inside, outside):
        assert a.dtype == torch.float32 and torch.equal(a, b), name


def test_init_is_identity_and_gate_starts_at_sigmoid_of_bias():
    """Default init: B = 0 so the adapted model equals the base model; every gate starts at σ(gate_bias_init)."""
    base = tiny_llama()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, GateRAConfig(r=4, target_modules=LLAMA_TARGETS, gate_bias_init=1.5))
    input_ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    g = layer.gatera_gate["default"](torch.randn(4, 32))
    torch.testing.assert_close(g, torch.full((4, 1), torch.sigmoid(torch.tensor(1.5)).item()))
    assert layer.gatera_gate["default"].weight.abs().sum() == 0
    assert layer.gatera_B["default"].abs().sum() == 0 and layer.gatera_A["default"].abs().sum() > 0


def test_parameter_count_one_gate_per_projection():
    """d_in + 1 gate parameters per adapted projection, on top of HiRA's r·(d_in + d_out)."""
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj", "down_proj"]))
    trainable, _ = model.get_nb_trainable_parameters()
    layers, hidden, inter = 2, 32, 64
    expected = layers * ((4 * (hidden + hidden) + hidden + 1) + (4 * (inter + hidden) + inter + 1))
    assert trainable == expected


def test_bf16_base_keeps_fp32_adapter_and_output_dtype():
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, GateRAConfig(r=4, target_modules=LLAMA_TARGETS, init_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.gatera_A["default"].dtype == torch.float32
    assert layer.gatera_gate["default"].weight.dtype == torch.float32
    out = model(input_ids=torch.randint(3, 128, (2, 5)), labels=torch.randint(3, 128, (2, 5)))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert layer.gatera_A["default"].grad is not None and torch.isfinite(layer.gatera_A["default"].grad).all()
