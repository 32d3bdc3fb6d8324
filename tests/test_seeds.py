"""Every gate kind x every branch kind x structure gate, on dense and 4-bit bases: formula, gradients, save/load;
then each kind's own behaviour (TS-PEFT threshold, structure pruning, DoRA = PEFT's DoRA, gate-sparse execution)."""

import itertools
import shutil
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from gatera_plugin import GateRAConfig, GateRALayer
from tests.helpers import LLAMA_PROJECTIONS, PEFT_DORA_NAMES, TwoLinear, copy_adapter_weights, tiny_llama

GATES = ["sigmoid", "threshold", "none"]
BRANCHES = ["hira", "lora", "dora"]
MATRIX = list(itertools.product(GATES, BRANCHES, [False, True]))
MATRIX_IDS = [f"{g}-{b}{'-structure' if s else ''}" for g, b, s in MATRIX]
TARGETS = LLAMA_PROJECTIONS


def config_for(gate, branch, structure, **kwargs):
    """A config of the matrix; penalties off (their gradients are tested on their own below)."""
    extra = {"lora_alpha": 6} if branch != "hira" else {}
    if structure:
        extra.update(structure_gate=True, structure_init=0.5, structure_weight=0.0)
    if gate == "sigmoid":
        extra.update(entropy_weight=0.0)
    return GateRAConfig(r=3, gate=gate, branch=branch, init_weights=False, **{**extra, **kwargs})


def naive_layer_output(layer, x, adapter="default"):
    """The formula of docs/method.md ("The adapted layer") written out with plain autograd, for any gate kind, branch
    kind and structure gate."""
    config = layer.options[adapter]
    base = layer.get_base_layer()
    W0 = layer.base_weight().float()
    bias = base.bias
    base_out = base(x)
    base_wx = base_out - bias if bias is not None else base_out
    A, B, s = layer.gatera_A[adapter], layer.gatera_B[adapter], layer.scaling[adapter]
    if config.branch == "hira":
        update = s * x @ (W0 * (B @ A)).t()
    elif config.branch == "lora":
        update = s * (x @ A.t()) @ B.t()
    else:
        m = layer.gatera_magnitude[adapter]
        norm = torch.linalg.norm(W0 + s * (B @ A), dim=1).detach()
        update = (m / norm - 1) * base_wx + (m / norm) * s * ((x @ A.t()) @ B.t())
    multiplier = torch.ones(*x.shape[:-1], 1)
    if config.gate == "sigmoid":
        gate = layer.gatera_gate[adapter]
        multiplier = torch.sigmoid(x @ gate.weight.t() + gate.bias)
    elif config.gate == "threshold":
        gate = layer.gatera_gate[adapter]
        ratio = update.norm(dim=-1, keepdim=True) / base_wx.detach().norm(dim=-1, keepdim=True)
        # straight-through: r gets the slope of σ((r − τ)/T); τ that slope plus a constant leak 0.025/T
        soft = torch.sigmoid((ratio - gate.threshold) / gate.temperature) - 0.025 * gate.threshold / gate.temperature
        multiplier = (ratio >= gate.threshold).float() + soft - soft.detach()
    if adapter in layer.gatera_structure:
        multiplier = multiplier * torch.sigmoid(layer.gatera_structure[adapter].alpha)
    return base_out + multiplier * update


def _median_threshold(layer, x):
    """Put a threshold gate's τ at the median ratio of x's tokens, so that about half are kept."""
    with torch.no_grad():
        config = layer.options["default"]
        if config.gate != "threshold":
            return
        layer.gatera_gate["default"].threshold.fill_(1e9)  # drop all: the forward below shows r
        A, B, s = layer.gatera_A["default"], layer.gatera_B["default"], layer.scaling["default"]
        W0 = layer.base_weight().float()
        base_wx = layer.get_base_layer()(x) - (layer.get_base_layer().bias if layer.get_base_layer().bias is not None else 0)
        if config.branch == "hira":
            update = s * x @ (W0 * (B @ A)).t()
        elif config.branch == "lora":
            update = s * (x @ A.t()) @ B.t()
        else:
            m = layer.gatera_magnitude["default"]
            norm = torch.linalg.norm(W0 + s * (B @ A), dim=1)
            update = (m / norm - 1) * base_wx + (m / norm) * s * ((x @ A.t()) @ B.t())
        ratios = (update.norm(dim=-1) / base_wx.norm(dim=-1)).flatten().sort().values
        middle = len(ratios) // 2  # τ halfway between two tokens' ratios: no token sits on it, so rounding flips none
        layer.gatera_gate["default"].threshold.fill_(((ratios[middle - 1] + ratios[middle]) / 2).item())


@pytest.fixture(scope="module")
def base_4bit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny4bit-seeds")
    tiny_llama(hidden=64, intermediate=128, init_std=0.2).save_pretrained(path)
    return path


def _layer(base, gate, branch, structure, base_4bit_dir):
    if base == "dense":
        model = get_peft_model(TwoLinear(d_in=12, d_hidden=20, d_out=8), config_for(gate, branch, structure,
                                                                                    target_modules=["lin1"]))
        return model, model.base_model.model.lin1, torch.randn(4, 5, 20)
    pytest.importorskip("bitsandbytes")
    from tests.helpers import load_4bit

    model = get_peft_model(load_4bit(base_4bit_dir), config_for(gate, branch, structure, target_modules=["down_proj"]))
    return model, model.base_model.model.model.layers[0].mlp.down_proj, torch.randn(4, 5, 128)


@pytest.mark.parametrize("base", ["dense", "4bit"])
@pytest.mark.parametrize("gate,branch,structure", MATRIX, ids=MATRIX_IDS)
def test_matrix_forward_and_gradients_equal_naive(base, gate, branch, structure, base_4bit_dir):
    model, layer, x = _layer(base, gate, branch, structure, base_4bit_dir)
    _median_threshold(layer, x)
    x.requires_grad_(True)
    out = layer(x)
    expected = naive_layer_output(layer, x)
    tol = dict(rtol=1e-5, atol=1e-5) if base == "dense" else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, expected, **tol)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("gatera_gate" in n for n in params) == (gate != "none")
    assert any("gatera_structure" in n for n in params) == structure
    assert any("gatera_magnitude" in n for n in params) == (branch == "dora")
    grad_out = torch.randn_like(out)
    names = list(params)
    ours = torch.autograd.grad(out, [x, *params.values()], grad_out, allow_unused=True)
    ref = torch.autograd.grad(expected, [x, *params.values()], grad_out, allow_unused=True)
    for name, a, b in zip(["x", *names], ours, ref):
        if b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        torch.testing.assert_close(a, b, **tol, msg=name)


@pytest.mark.parametrize("base", ["dense", "4bit"])
@pytest.mark.parametrize("gate,branch,structure", MATRIX, ids=MATRIX_IDS)
def test_matrix_save_load(base, gate, branch, structure, base_4bit_dir, tmp_path):
    model, layer, x = _layer(base, gate, branch, structure, base_4bit_dir)
    _median_threshold(layer, x)
    model.eval()
    x = torch.randn(4, 5, 12)  # the whole model's input
    with torch.no_grad():
        expected = model(x) if base == "dense" else None
    model.save_pretrained(tmp_path)
    if base == "dense":
        fresh = TwoLinear(d_in=12, d_hidden=20, d_out=8)
        fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items()
                               if "gatera_" not in k})
        loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    else:
        from tests.helpers import load_4bit

        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(load_4bit(base_4bit_dir), tmp_path).eval()
        torch.manual_seed(0)
        with torch.no_grad():
            model.eval()
            ids = torch.randint(3, 128, (2, 6))
            torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------ DoRA
def test_ungated_dora_equals_peft_dora():
    input_ids = torch.randint(3, 128, (2, 9))
    ours = get_peft_model(tiny_llama(), GateRAConfig(r=4, lora_alpha=8, branch="dora", gate="none",
                                                     target_modules=TARGETS, init_weights=False))
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS,
                                                     init_lora_weights=False))
    mapping = PEFT_DORA_NAMES
    with torch.no_grad():  # the same random magnitude on both sides
        for name, p in ours.named_parameters():
            if "gatera_magnitude" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    copy_adapter_weights(ours, theirs, mapping)
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    out, ref = ours(input_ids=input_ids, labels=input_ids), theirs(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    grads = torch.autograd.grad(out.loss, [params[n] for n in names])
    their_names = []
    for n in names:
        for old, new in mapping.items():
            n = n.replace(old, new)
        their_names.append(n)
    ref_grads = torch.autograd.grad(ref.loss, [their_params[n] for n in their_names])
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("branch", BRANCHES)
def test_ungated_structure_adapter_merges(branch):
    config = config_for("none", branch, True, target_modules=["lin0", "lin1"])
    model = get_peft_model(TwoLinear(), config).eval()
    x = torch.randn(3, 12)
    with torch.no_grad():
        expected = model(x)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ threshold
def test_threshold_drops_tokens_exactly_and_logs_kept_fraction_per_layer():
    model = get_peft_model(TwoLinear(), config_for("threshold", "hira", False, target_modules=["lin0", "lin1"]))
    layer = model.base_model.model.lin1
    x = torch.randn(4, 5, 20)
    _median_threshold(layer, x)
    with torch.no_grad():
        out = layer(x)
        base = layer.get_base_layer()(x)
    unchanged = (out == base).all(dim=-1)
    assert 0 < unchanged.float().mean() < 1  # some tokens dropped (exactly the base output), some kept
    model.train()
    model(torch.randn(4, 5, 12)).sum().backward()
    logs = model.base_model.pop_gate_stats()
    assert set(logs) == {"gatera/kept_frac", "gatera/kept_frac/lin0", "gatera/kept_frac/lin1"}
    assert logs["gatera/kept_frac"] == pytest.approx((logs["gatera/kept_frac/lin0"] + logs["gatera/kept_frac/lin1"]) / 2)


@pytest.mark.parametrize("ratio", [1.0, 10.0, 100.0, 1e4])
def test_threshold_tau_gradient_does_not_vanish_far_from_tau(ratio):
    """∂S/∂τ = −(σ'(u) + 0.025)/T, u = (r − τ)/T, never 0; r keeps the logistic slope; forward stays hard 0/1."""
    from gatera_plugin.gates import ThresholdGate

    tau, T = 0.5, 0.05
    gate = ThresholdGate(threshold_init=tau, temperature=T)
    base = torch.tensor([[1.0, 0.0]])
    update = torch.tensor([[0.0, ratio * tau]], requires_grad=True)
    selection = gate(update, base)
    assert selection.item() == 1.0
    selection.sum().backward()
    u = torch.tensor((ratio - 1) * tau / T)
    slope = torch.sigmoid(u) * (1 - torch.sigmoid(u)) / T
    torch.testing.assert_close(gate.threshold.grad, -(slope + 0.025 / T).reshape(1))
    assert gate.threshold.grad.item() <= -0.5  # the leak alone: 0.025 / 0.05
    torch.testing.assert_close(update.grad, torch.tensor([[0.0, slope.item()]]))


def test_keep_ratio_penalty_gradient_equals_explicit():
    """λ_k · mean_layers (k − ρ)², k = the kept fraction (straight-through), injected = explicit, padding excluded."""
    torch.manual_seed(1)
    weight, target = 0.8, 0.3
    config = dict(gate="threshold", keep_ratio=target, keep_ratio_weight=weight, threshold_temperature=0.5,
                  hira_scaling="none")  # τ = 0.05 below keeps some tokens of this model's ratios, not all
    input_ids = torch.randint(3, 128, (3, 10))
    mask = torch.ones_like(input_ids)
    mask[0, 6:] = 0

    def run(keep: bool):
        torch.manual_seed(2)
        kwargs = config if keep else {**config, "keep_ratio": None, "keep_ratio_weight": None}
        model = get_peft_model(tiny_llama(seed=3), GateRAConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                init_weights=False, **kwargs))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "threshold" in name:
                    p.fill_(0.05)
        model.train()
        selections = []
        handles = [m.register_forward_hook(lambda mod, args, out: selections.append(out))
                   for m in model.modules() if type(m).__name__ == "ThresholdGate"]
        out = model(input_ids=input_ids, attention_mask=mask)
        for h in handles:
            h.remove()
        return model, out, selections

    injected, out, _ = run(True)
    (out.logits.sum() * 0).backward()
    explicit, out, selections = run(False)
    m = mask.reshape(-1).float()
    kept = torch.stack([(s.reshape(-1) * m).sum() / m.sum() for s in selections])
    assert 0 < kept.mean() < 1
    (out.logits.sum() * 0 + weight * ((kept - target) ** 2).mean()).backward()
    grads = {n: p.grad for n, p in injected.named_parameters() if p.grad is not None}
    ref = {n: p.grad for n, p in explicit.named_parameters() if p.grad is not None}
    assert grads.keys() == ref.keys() and any("threshold" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-8, msg=name)


# ------------------------------------------------------------------------------------------------------ structure
def test_logged_penalties_of_threshold_and_structure_gates_are_their_formulas():
    """`gatera/keep_penalty` = λ_keep · mean over layers of (kept fraction − keep_ratio)², `gatera/structure_penalty`
    = λ_s · mean σ(α), beside the statistics they are made of (the kept fraction always per layer)."""
    torch.manual_seed(0)
    config = GateRAConfig(r=3, target_modules=["lin0", "lin1"], gate="threshold", keep_ratio=0.3, keep_ratio_weight=2.0,
                          structure_gate=True, structure_weight=0.4, init_weights=False)
    model = get_peft_model(TwoLinear(), config)
    _median_threshold(model.base_model.model.lin1, torch.randn(4, 5, 20))
    with torch.no_grad():
        model.base_model.model.lin0.gatera_structure["default"].alpha.fill_(-1.0)
    model.train()
    model(torch.randn(4, 5, 12)).sum().backward()
    logs = model.base_model.pop_gate_stats()
    assert set(logs) == {"gatera/kept_frac", "gatera/kept_frac/lin0", "gatera/kept_frac/lin1", "gatera/keep_penalty",
                         "gatera/structure_mean", "gatera/structure_penalty"}
    kept = [logs["gatera/kept_frac/lin0"], logs["gatera/kept_frac/lin1"]]
    assert kept[1] < 1 and logs["gatera/keep_penalty"] == pytest.approx(2.0 * sum((k - 0.3) ** 2 for k in kept) / 2)
    structure = (torch.sigmoid(torch.tensor(-1.0)).item() + torch.sigmoid(torch.tensor(3.0)).item()) / 2
    assert logs["gatera/structure_mean"] == pytest.approx(structure)
    assert logs["gatera/structure_penalty"] == pytest.approx(0.4 * structure)


def test_logged_keep_penalty_over_several_micro_batches_is_the_applied_one():
    """Over micro-batches m (gradient accumulation, a logging window) the penalty applied is λ · mean over layers of
    Σ_m n_m (k_m − ρ)² / Σ_m n_m; the log gave (k̄ − ρ)² of the pooled fraction k̄ instead, lower wherever the
    micro-batches' kept fractions differ."""
    torch.manual_seed(0)
    config = GateRAConfig(r=3, target_modules=["lin0", "lin1"], gate="threshold", keep_ratio=0.5, keep_ratio_weight=2.0,
                          init_weights=False)
    model = get_peft_model(TwoLinear(), config)
    first = torch.randn(4, 5, 12)
    _median_threshold(model.base_model.model.lin0, first)
    _median_threshold(model.base_model.model.lin1, model.base_model.model.lin0(first))
    model.train()
    kept = {}  # layer -> [(tokens, kept fraction) per micro-batch]
    hooks = [module.register_forward_hook(lambda mod, args, out, name=name: kept.setdefault(name, []).append(
        (out.numel(), out.float().mean().item()))) for name, module in model.named_modules()
        if type(module).__name__ == "ThresholdGate"]
    for x in (first, torch.randn(2, 5, 12) + 4 * torch.randn(12)):  # (shifted inputs: other ratios, other fractions)
        model(x).sum().backward()
    for hook in hooks:
        hook.remove()
    logs = model.base_model.pop_gate_stats()
    per_layer = [sum(n * (k - 0.5) ** 2 for n, k in batches) / sum(n for n, _ in batches) for batches in kept.values()]
    pooled = [(sum(n * k for n, k in batches) / sum(n for n, _ in batches) - 0.5) ** 2 for batches in kept.values()]
    assert len(per_layer) == 2 and sum(pooled) < 0.9 * sum(per_layer)  # (the case tells them apart)
    assert logs["gatera/keep_penalty"] == pytest.approx(2.0 * sum(per_layer) / 2, rel=1e-6)


def test_structure_penalty_gradient_is_applied_once_per_step():
    """λ_s · mean σ(α): the injected gradient equals the explicit one, and two micro-batches of a step add up to it."""
    weight = 0.4

    def config(structure_weight):
        return GateRAConfig(r=3, target_modules=["lin0", "lin1"], structure_gate=True, gate="none",
                            structure_weight=structure_weight, init_weights=False)

    x = torch.randn(6, 12)

    def alpha_grads(micro_batches):
        torch.manual_seed(0)
        model = get_peft_model(TwoLinear(), config(weight)).train()
        model.base_model.penalty_run.begin_step(step_tokens=6, micro_batches=micro_batches)
        for chunk in x.chunk(micro_batches):
            (model(chunk).sum() * 0).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "gatera_structure" in n}

    torch.manual_seed(0)
    model = get_peft_model(TwoLinear(), config(0.0))
    alphas = [p for n, p in model.named_parameters() if "gatera_structure" in n]
    explicit = torch.autograd.grad(weight * torch.stack([torch.sigmoid(a) for a in alphas]).mean(), alphas)
    one, two = alpha_grads(1), alpha_grads(2)
    for (name, grad), ref in zip(one.items(), explicit):
        torch.testing.assert_close(grad, ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(two[name], ref, rtol=1e-6, atol=0)


def _structure_model():
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, structure_gate=True,
                                                      init_weights=False))
    with torch.no_grad():  # some modules' gates nearly closed, as after training with a structure penalty
        for i, p in enumerate(p for n, p in model.named_parameters() if "gatera_structure" in n):
            p.fill_(-4.0 if i % 3 == 0 else 2.0)
    return model.eval()


def test_prune_structure_in_memory_equals_unpruned_minus_pruned_modules(tmp_path):
    model = _structure_model()
    input_ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        full = model(input_ids=input_ids).logits
    # reference: the unpruned model with the pruned modules' structure gates shut exactly
    reference = _structure_model()
    values = {n: m.gatera_structure["default"]().item() for n, m in reference.base_model.model.named_modules()
              if isinstance(m, GateRALayer)}
    with torch.no_grad():
        for n, m in reference.base_model.model.named_modules():
            if isinstance(m, GateRALayer) and values[n] < 0.5:
                m.gatera_structure["default"].alpha.fill_(-float("inf"))
        expected = reference(input_ids=input_ids).logits
    result = model.base_model.prune_structure(0.5)
    assert len(result["pruned"]) == 5 and len(result["kept"]) == 9
    assert sum(isinstance(m, GateRALayer) for m in model.modules()) == 9
    with torch.no_grad():
        pruned = model(input_ids=input_ids).logits
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pruned, full, atol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert sum(isinstance(m, GateRALayer) for m in loaded.modules()) == 9
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, pruned, rtol=0, atol=0)


def test_gatera_prune_command(tmp_path):
    model = _structure_model()
    model.save_pretrained(tmp_path / "full")
    input_ids = torch.randint(3, 128, (2, 9))
    command = [sys.executable, "-m", "gatera_plugin.cli", "prune", str(tmp_path / "full"), "--threshold", "0.5",
               "--out", str(tmp_path / "pruned")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "kept 9 of 14 adapted modules" in done.stdout and done.stdout.count("pruned  0.0180") == 5
    model.base_model.prune_structure(0.5)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected, rtol=0, atol=0)
    again = subprocess.run(command, capture_output=True, text=True)  # never overwrites
    assert again.returncode == 2 and "already exists" in again.stderr
    no_structure = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"]))
    no_structure.save_pretrained(tmp_path / "plain")
    refused = subprocess.run(command[:4] + [str(tmp_path / "plain"), "--threshold", "0.5", "--out",
                                            str(tmp_path / "new" / "x")], capture_output=True, text=True)
    assert refused.returncode == 2 and "without structure gates" in refused.stderr
    assert not (tmp_path / "new").exists()  # (a refusal makes no folder: it made --out's parents)


# ------------------------------------------------------------------------------------------------------ sparse
def _saturated_gates(model, closed_every=2):
    """Sigmoid gates that are exactly 0 for about half the tokens and near 1 for the rest."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "SigmoidGate":
                module.weight.normal_(0, 1).mul_(300.0)
                module.bias.zero_()


@pytest.mark.parametrize("branch", BRANCHES)
def test_sparse_execution_equals_dense(branch):
    input_ids = torch.randint(3, 128, (2, 9))
    extra = {"lora_alpha": 8} if branch != "hira" else {}
    dense = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, branch=branch, init_weights=False,
                                                      **extra)).eval()
    _saturated_gates(dense)
    sparse = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, branch=branch, init_weights=False,
                                                       sparse_threshold=1e-3, **extra))
    sparse.load_state_dict(dense.state_dict())
    sparse.eval()
    layer = dense.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        gate = layer.gatera_gate["default"](x)
        assert 0.2 < (gate == 0).float().mean() < 0.8  # exactly-closed gates exist
        sparse_layer = sparse.base_model.model.model.layers[0].self_attn.q_proj
        closed = (gate == 0).squeeze(-1)
        torch.testing.assert_close(sparse_layer(x)[closed], layer(x)[closed], rtol=0, atol=0)
        torch.testing.assert_close(sparse_layer(x), layer(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sparse(input_ids=input_ids).logits, dense(input_ids=input_ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_cached_delta_equals_uncached_and_follows_updates():
    input_ids = torch.randint(3, 128, (2, 9))
    plain = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, init_weights=False)).eval()
    cached = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, init_weights=False,
                                                       cache_delta=True, sparse_threshold=1e-3))
    cached.load_state_dict(plain.state_dict())
    cached.eval()
    with torch.no_grad():
        torch.testing.assert_close(cached(input_ids=input_ids).logits, plain(input_ids=input_ids).logits,
                                   rtol=1e-4, atol=1e-5)
        for model in (plain, cached):  # an update of B must invalidate the cache
            for name, p in model.named_parameters():
                if "gatera_B" in name:
                    p.add_(0.1)
        torch.testing.assert_close(cached(input_ids=input_ids).logits, plain(input_ids=input_ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_cached_delta_built_under_autocast_does_not_serve_an_fp32_forward():
    """The cache holds the delta in the dtype of the products it served: one built inside a bf16 autocast region is
    not reused, rounded to bf16, by a later fp32 forward outside it, and the delta is formed in fp32 either way."""
    x = torch.randn(6, 12)
    torch.manual_seed(0)
    plain = get_peft_model(TwoLinear(), GateRAConfig(r=4, target_modules=["lin1"], init_weights=False)).eval()
    torch.manual_seed(0)
    cached = get_peft_model(TwoLinear(), GateRAConfig(r=4, target_modules=["lin1"], init_weights=False,
                                                      cache_delta=True)).eval()
    layer = cached.base_model.model.lin1
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cached(x)
            in_autocast = layer._cached_delta("default", torch.bfloat16)
        assert in_autocast.dtype == torch.bfloat16
        torch.testing.assert_close(cached(x), plain(x), rtol=1e-5, atol=1e-6)
        delta = layer._cached_delta("default", torch.float32)
    assert torch.equal(in_autocast, delta.to(torch.bfloat16))  # (formed in fp32, rounded once)


@pytest.mark.parametrize("gate", ["sigmoid", "none"])
def test_cached_delta_in_eval_with_autograd_on_trains_the_factors(gate):
    """A forward in eval that records a graph through A and B (grad mode on) takes the branch, not the cached
    delta (built without a graph): A and B get the uncached model's gradients."""
    x = torch.randn(6, 12)
    models = []
    for cache in (False, True):
        torch.manual_seed(0)  # (the same base and adapter: HiRA's scale is read from W0 when the adapter is made)
        models.append(get_peft_model(TwoLinear(), GateRAConfig(r=4, target_modules=["lin1"], gate=gate,
                                                               init_weights=False, cache_delta=cache)))
    grads = []
    for model in models:
        model.eval()
        with torch.no_grad():
            model(x)  # (builds the cache)
        model(x).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert all(grads[1][n] is not None for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_sparse_training_skips_closed_tokens_in_backward():
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], init_weights=False,
                                                      sparse_threshold=0.5, sparse_training=True))
    _saturated_gates(model)
    model.train()
    input_ids = torch.randint(3, 128, (2, 9))
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "gatera_A" in n)


def test_gatera_prune_prunes_every_adapter_of_a_multi_adapter_save(tmp_path, capsys):
    """PEFT saves the adapters other than "default" in subfolders named after them; `gatera prune` copied only the
    folder's files, so the pruned save silently lost them. Each is pruned by its own σ(α) (or copied unchanged
    without structure gates) and loads into the model that `prune_structure` gives in memory; a Trainer checkpoint
    beside them, and an --out inside the source folder, are not taken for adapters (the checkpoint is named as left
    out)."""
    from gatera_plugin.cli import main

    model = _structure_model()
    model.add_adapter("other", GateRAConfig(r=4, target_modules=TARGETS, structure_gate=True, init_weights=False))
    model.add_adapter("plain", GateRAConfig(r=4, target_modules=["q_proj"], init_weights=False))
    with torch.no_grad():  # (the other adapter closes other modules than the default one)
        for i, p in enumerate(p for n, p in model.named_parameters() if "gatera_structure.other" in n):
            p.fill_(-4.0 if i % 2 == 0 else 2.0)
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "full" / "checkpoint-10")  # (a Trainer's output folder holds its checkpoints)
    (tmp_path / "full" / "checkpoint-10" / "trainer_state.json").write_text("{}")
    assert main(["prune", str(tmp_path / "full"), "--threshold", "0.5", "--out", str(tmp_path / "full" / "pruned")]) == 0
    assert "left out (not adapters of this save): checkpoint-10" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "full" / "pruned").iterdir() if p.is_dir()) == ["other", "plain"]
    (tmp_path / "full" / "pruned").rename(tmp_path / "pruned")
    input_ids = torch.randint(3, 128, (2, 9))
    for name in ("default", "other"):
        model.base_model.prune_structure(0.5, adapter_name=name)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "pruned").eval()
    for name in ("other", "plain"):
        loaded.load_adapter(tmp_path / "pruned" / name, adapter_name=name)
    for name in ("default", "other", "plain"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits,
                                       rtol=0, atol=0)
    assert len(loaded.peft_config["other"].target_modules) == 7


def test_prune_structure_of_a_half_precision_adapter_compares_the_fp32_gate_as_gatera_prune_does(tmp_path):
    """An adapter cast to bf16 computed σ(α) in bf16 in memory (0.1001 for α = -2.1875), in fp32 in `gatera prune`
    (0.1009): a module near the threshold could be kept by one and pruned by the other."""
    model = _structure_model().to(torch.bfloat16)
    with torch.no_grad():
        alphas = [p for n, p in model.named_parameters() if "gatera_structure" in n]
        alphas[0].fill_(-2.1875)
    expected = torch.sigmoid(alphas[0].float()).item()
    assert torch.sigmoid(alphas[0]).item() != expected
    values = model.base_model.prune_structure(0.01)["values"]
    assert next(iter(values.values())) == expected


def test_gatera_prune_and_plot_name_the_subfolder_a_named_adapter_was_saved_in_and_refuse_pickles_clearly(
        tmp_path, capsys):
    """A save under another adapter name than "default" (or with `selected_adapters`) holds the adapter in a
    subfolder named after it: prune and plot said "adapter_config.json is missing: pass a saved GateRA adapter
    folder" of the folder the user had saved, and prune called a .bin save's safetensors "missing" (even with
    GATERA_ALLOW_PICKLE=1). Both now name what to pass."""
    from gatera_plugin.cli import main
    from gatera_plugin.visualize import load_adapter

    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, structure_gate=True),
                           adapter_name="mine")
    model.save_pretrained(tmp_path / "named")
    assert main(["prune", str(tmp_path / "named"), "--threshold", "0.5", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "saved under their names in subfolders (mine): pass one of them, e.g. " in error
    assert str(tmp_path / "named" / "mine") in error
    with pytest.raises(FileNotFoundError, match=r"subfolders \(mine\): pass one of them"):
        load_adapter(str(tmp_path / "named"))
    assert main(["prune", str(tmp_path / "named" / "mine"), "--threshold", "0.5", "--out", str(tmp_path / "out")]) == 0
    for step in (200, 1000):  # a Trainer's output folder: its checkpoints are named, the last one suggested
        model.save_pretrained(tmp_path / "run" / f"checkpoint-{step}", selected_adapters=["mine"])
        (tmp_path / "run" / f"checkpoint-{step}" / "mine").rename(tmp_path / "run" / f"c{step}")
        shutil.rmtree(tmp_path / "run" / f"checkpoint-{step}")
        (tmp_path / "run" / f"c{step}").rename(tmp_path / "run" / f"checkpoint-{step}")
    with pytest.raises(FileNotFoundError, match=r"Trainer checkpoints \(checkpoint-200, checkpoint-1000\): pass one, "
                                                r"e\.g\. the last, .*checkpoint-1000"):
        load_adapter(str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match=r"missing-folder does not exist"):
        load_adapter(str(tmp_path / "missing-folder"))

    import gatera_plugin

    with gatera_plugin.allow_pickle():
        model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert main(["prune", str(tmp_path / "pickled" / "mine"), "--threshold", "0.5", "--out", str(tmp_path / "o2")]) == 2
    assert "holds adapter_model.bin (pickled weights): `gatera prune` reads and writes adapter_model.safetensors " \
           "only" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
