"""PEFT's adapter contract as a test matrix of our own, in the style of PEFT's `tests/testing_common.py`.

Tiny architectures built from configs (Llama; GPT-2, whose projections are transposed `Conv1D`; OPT, whose linears
all carry biases; a custom MLP that is no transformers model) × gate/branch variants (every gate kind, every branch
kind, a structure gate) × generic checks: save/load, several adapters, disable/delete/set, `modules_to_save`,
gradient checkpointing, half-precision forwards, inference mode, what training updates, merging of `gate="none"`
adapters (sequential and batched), unload, AutoPeftModel. Every adapter starts random (`init_weights=False`), so
that an adapter that did nothing would fail the checks. The default run takes a representative diagonal of the
matrix (every architecture, every variant, each at least once); `-m slow` runs the other pairs.

Tolerances: 1e-5 where the two sides compute the same thing in fp32 (up to summation order); 1e-4 after a merge
(the merged weight is rounded to fp32 once); half precision is compared to fp32 with a tolerance per dtype.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import warnings
from dataclasses import dataclass
from operator import attrgetter

import pytest
import torch
from peft import (
    AutoPeftModelForCausalLM,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper, get_base_model_state_dict
from safetensors.torch import load_file
from torch import nn

from gatera_plugin import GateRAConfig, GateRALayer
from tests.helpers import tiny_gpt2, tiny_llama

# ----------------------------------------------------------------------------------------------------- the matrix


class MLP(nn.Module):
    """A custom (non-transformers) model with biased linears, called as `model(X=...)` like PEFT's test MLP."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(12, 24)
        self.lin1 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 6)

    def forward(self, X):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(X)))))


def tiny_opt():
    """A randomly initialised OPTForCausalLM: every linear (q/k/v/out_proj, fc1, fc2) has a bias."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4, word_embed_proj_dim=32,
        max_position_embeddings=64, tie_word_embeddings=False, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return OPTForCausalLM(config)


# arch: (builder of the base model, target_modules, modules_to_save)
ARCHS = {
    "llama": (lambda: tiny_llama(vocab=64, init_std=0.2), ["q_proj", "v_proj", "down_proj"], ["lm_head"]),
    "gpt2": (lambda: tiny_gpt2(vocab=64), ["c_attn", "c_proj", "c_fc"], ["ln_f"]),
    "opt": (tiny_opt, ["q_proj", "v_proj", "fc1", "fc2"], ["lm_head"]),
    "mlp": (MLP, ["lin0", "lin1"], ["head"]),
}
VARIANTS = {
    "sigmoid-hira": {},
    "sigmoid-lora-structure": {"branch": "lora", "lora_alpha": 8, "structure_gate": True, "structure_init": 0.5},
    "threshold-dora": {"gate": "threshold", "branch": "dora", "lora_alpha": 8},
    "none-hira": {"gate": "none"},
    "none-lora": {"gate": "none", "branch": "lora", "lora_alpha": 8},
    "none-dora": {"gate": "none", "branch": "dora", "lora_alpha": 8},
    "none-hira-structure": {"gate": "none", "structure_gate": True, "structure_init": 0.5},  # merges σ(α)·(W0 ⊙ BA)
}
# The default run: each architecture with two variants (one gated, one not), every variant at least once.
FAST = {
    ("llama", "sigmoid-hira"), ("llama", "none-dora"),
    ("gpt2", "none-hira"), ("gpt2", "sigmoid-lora-structure"),
    ("opt", "threshold-dora"), ("opt", "none-lora"),
    ("mlp", "none-hira-structure"), ("mlp", "sigmoid-lora-structure"),
}


@dataclass(frozen=True)
class Case:
    arch: str
    variant: str

    @property
    def kwargs(self) -> dict:
        return VARIANTS[self.variant]

    @property
    def gated(self) -> bool:
        return self.kwargs.get("gate", "sigmoid") != "none"

    @property
    def is_transformers(self) -> bool:
        return self.arch != "mlp"

    def base(self, dtype=None) -> nn.Module:
        """The base model, identical on every call (fixed seed), in eval mode."""
        torch.manual_seed(0)
        model = ARCHS[self.arch][0]().eval()
        return model.to(dtype) if dtype is not None else model

    def config(self, **overrides) -> GateRAConfig:
        kwargs = {"r": 4, "init_weights": False, "target_modules": ARCHS[self.arch][1], **self.kwargs, **overrides}
        if self.is_transformers:
            kwargs.setdefault("task_type", "CAUSAL_LM")
        return GateRAConfig(**kwargs)

    def peft(self, adapter_name: str = "default", seed: int = 1, dtype=None, **overrides):
        """Base model + one random adapter; eval mode."""
        base = self.base(dtype)
        torch.manual_seed(seed)
        return get_peft_model(base, self.config(**overrides), adapter_name=adapter_name).eval()

    def add(self, model, adapter_name: str, seed: int = 2, **overrides) -> None:
        torch.manual_seed(seed)
        model.add_adapter(adapter_name, self.config(**overrides))

    def inputs(self) -> dict:
        g = torch.Generator().manual_seed(0)
        if not self.is_transformers:
            return {"X": torch.randn(3, 5, 12, generator=g)}
        input_ids = torch.randint(3, 64, (2, 7), generator=g)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def output(self, model, **extra) -> torch.Tensor:
        inputs = self.inputs()
        if not self.is_transformers:  # the input in the base model's dtype, as a transformers model's embedding gives
            inputs["X"] = inputs["X"].to(next(p.dtype for n, p in model.named_parameters() if "head" in n))
        out = model(**inputs, **extra)
        return out if isinstance(out, torch.Tensor) else out.logits

    def loss(self, model) -> torch.Tensor:
        out = self.output(model)
        return (out.float() ** 2).mean()


CASES = [
    pytest.param(Case(arch, variant), id=f"{arch}-{variant}",
                 marks=() if (arch, variant) in FAST else pytest.mark.slow)
    for arch, variant in itertools.product(ARCHS, VARIANTS)
]


@pytest.fixture(params=CASES)
def case(request) -> Case:
    return request.param


def _skip_unless_mergeable(case: Case) -> None:
    if case.gated:
        pytest.skip("a gated adapter cannot be merged (test_merge_gated_is_refused checks the refusal)")


def _skip_unless_transformers(case: Case, what: str) -> None:
    if not case.is_transformers:
        pytest.skip(f"{what} needs a transformers model")


def _no_grad_output(case: Case, model) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model)


def _gatera_layers(model) -> list[GateRALayer]:
    return [m for m in model.modules() if isinstance(m, GateRALayer)]


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def _assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-4, "the adapter did not change the output"


# ----------------------------------------------------------------------------------------------------- attributes
def test_adapter_name_in_parameter_names(case):
    model = case.peft(adapter_name="test-adapter")
    names = [n for n, _ in model.named_parameters() if "gatera_" in n]
    assert names and all("test-adapter" in n for n in names)


def test_in_features_out_features_exposed(case):
    layers = _gatera_layers(case.peft())
    assert layers
    for layer in layers:
        weight = layer.base_weight()
        assert (layer.out_features, layer.in_features) == tuple(weight.shape)


def test_only_adapter_parameters_require_grad(case):
    model = case.peft(modules_to_save=ARCHS[case.arch][2])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("gatera_" in n or "modules_to_save" in n for n in trainable)
    assert any("modules_to_save" in n for n in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def test_prepare_for_training_input_embeddings(case):
    _skip_unless_transformers(case, "get_input_embeddings")
    model = case.peft()
    ids = case.inputs()["input_ids"]
    assert not model.get_input_embeddings()(ids).requires_grad
    model.enable_input_require_grads()
    assert model.get_input_embeddings()(ids).requires_grad


def test_passing_inputs_embeds(case):
    _skip_unless_transformers(case, "inputs_embeds")
    model = case.peft()
    inputs = case.inputs()
    with torch.no_grad():
        by_ids = model(**inputs).logits
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        by_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(by_embeds, by_ids, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- save / load
def test_save_pretrained_roundtrip(case, tmp_path):
    model = case.peft()
    expected = _no_grad_output(case, model)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not files & {"adapter_model.bin", "model.safetensors", "config.json"}
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(case.base(), tmp_path).eval()
    assert not any("missing adapter keys" in str(r.message) for r in records)
    state, state_loaded = model.state_dict(), loaded.state_dict()
    assert state.keys() == state_loaded.keys()
    for key in state:
        torch.testing.assert_close(state_loaded[key], state[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(_no_grad_output(case, loaded), expected, rtol=1e-5, atol=1e-5)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all("gatera_" in k for k in saved)


def test_save_pretrained_selected_adapters(case, tmp_path):
    model = case.peft()
    case.add(model, "new_adapter", r=6)  # another rank
    model.save_pretrained(tmp_path)
    assert (tmp_path / "new_adapter" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(case.base(), tmp_path)
    loaded.load_adapter(tmp_path / "new_adapter", "new_adapter")
    state, state_loaded = model.state_dict(), loaded.state_dict()
    assert state.keys() == state_loaded.keys()
    for key in state:
        torch.testing.assert_close(state_loaded[key], state[key], rtol=0, atol=0, msg=key)

    only = tmp_path / "only_default"
    model.save_pretrained(only, selected_adapters=["default"])
    assert not (only / "new_adapter").exists()
    reloaded = PeftModel.from_pretrained(case.base(), only)
    assert set(reloaded.peft_config) == {"default"}


def test_save_pretrained_adapter_name_substring(case, tmp_path):
    model = case.peft()
    expected = len(get_peft_model_state_dict(model))
    for name in ("default2", "other_default", "foodefault_bar", "efaul"):
        case.add(model, name)
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == expected


def test_from_pretrained_inference_mode_and_config(case, tmp_path):
    model = case.peft()
    model.save_pretrained(tmp_path)
    config = GateRAConfig.from_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.base(), tmp_path, is_trainable=False, config=config)
    assert loaded.peft_config["default"] is config and config.inference_mode
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(case.base(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "gatera_" in n)


def test_load_multiple_adapters(case, tmp_path):
    case.peft().save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(case.base(), tmp_path)
    for name in ("other", "yet-another"):
        assert model.load_adapter(tmp_path, adapter_name=name).missing_keys == []
    model.base_model.set_adapter("other")
    with torch.no_grad():
        other = case.output(model)
    model.base_model.set_adapter("default")
    torch.testing.assert_close(_no_grad_output(case, model), other, rtol=0, atol=0)


def test_low_cpu_mem_usage(case, tmp_path):
    model = case.peft()
    expected = _no_grad_output(case, model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.base(), tmp_path, low_cpu_mem_usage=True).eval()
    loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(_no_grad_output(case, loaded), expected, rtol=1e-5, atol=1e-5)
    injected = inject_adapter_in_model(case.config(), case.base(), low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in injected.parameters()}


def test_adapter_built_on_a_meta_base_takes_rank_0s_weights(case, tmp_path):
    """What the other ranks do under FSDP2's `cpu_ram_efficient_loading`: the base is built on the meta device, the
    adapter is added there (or loaded with `is_trainable`, Axolotl's `lora_model_dir`) without values, and rank 0's
    weights arrive afterwards. DoRA computed its magnitude from the meta W0 at once: a RuntimeError from deep in
    torch on every rank but 0. The model built so gives rank 0's outputs once it holds rank 0's tensors."""
    reference = case.peft()
    reference.save_pretrained(tmp_path)
    expected = _no_grad_output(case, reference)
    for build in ("get_peft_model", "from_pretrained"):
        with torch.device("meta"):
            base = ARCHS[case.arch][0]().eval()
        if build == "get_peft_model":
            model = get_peft_model(base, case.config()).eval()
        else:
            model = PeftModel.from_pretrained(base, tmp_path, is_trainable=True, low_cpu_mem_usage=True).eval()
        assert {p.device.type for p in model.parameters()} == {"meta"}
        model.to_empty(device="cpu")
        model.load_state_dict(reference.state_dict())
        buffers = dict(reference.named_buffers())  # (non-persistent ones, e.g. rotary frequencies, too)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        torch.testing.assert_close(_no_grad_output(case, model), expected, rtol=1e-5, atol=1e-5)


def test_direct_injection_state_dict_roundtrip(case):
    """`inject_adapter_in_model` without a PeftModel: its state dict moves the adapter to another injected model."""
    base = case.base()
    torch.manual_seed(1)
    model = inject_adapter_in_model(case.config(), base).eval()
    expected = _no_grad_output(case, model)
    state = get_peft_model_state_dict(model)
    base = case.base()
    torch.manual_seed(54321)
    other = inject_adapter_in_model(case.config(), base).eval()
    _assert_differs(_no_grad_output(case, other), expected)
    assert not set_peft_model_state_dict(other, state).unexpected_keys
    torch.testing.assert_close(_no_grad_output(case, other), expected, rtol=0, atol=0)


def test_layers_to_transform_adapts_fewer_layers(case, tmp_path):
    _skip_unless_transformers(case, "layers_to_transform")
    model = case.peft(layers_to_transform=[0])
    layers = _gatera_layers(model)
    assert layers and len(layers) * 2 == len(_gatera_layers(case.peft()))  # two decoder layers, one adapted
    expected = _no_grad_output(case, model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.base(), tmp_path).eval()
    torch.testing.assert_close(_no_grad_output(case, loaded), expected, rtol=1e-5, atol=1e-5)


def test_autopeft_model(case, tmp_path):
    _skip_unless_transformers(case, "AutoPeftModelForCausalLM")
    case.base().save_pretrained(tmp_path / "base")
    base = type(case.base()).from_pretrained(tmp_path / "base").eval()
    model = get_peft_model(base, case.config(base_model_name_or_path=str(tmp_path / "base"))).eval()
    expected = _no_grad_output(case, model)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "GATERA" and config["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert isinstance(loaded, PeftModel)
    torch.testing.assert_close(_no_grad_output(case, loaded), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- several adapters
def test_set_adapter_switches_between_adapters(case):
    model = case.peft()
    first = _no_grad_output(case, model)
    case.add(model, "adapter-2")
    torch.testing.assert_close(_no_grad_output(case, model), first, rtol=0, atol=0)  # added, not active
    model.set_adapter("adapter-2")
    assert model.active_adapters == ["adapter-2"]
    second = _no_grad_output(case, model)
    _assert_differs(first, second)
    model.set_adapter("default")
    torch.testing.assert_close(_no_grad_output(case, model), first, rtol=0, atol=0)
    # each adapter layer holding "default" holds "adapter-2" too, in every per-adapter container
    for layer in _gatera_layers(model):
        for attr in layer.adapter_layer_names + layer.other_param_names:
            container = attrgetter(attr)(layer)
            assert ("default" in container) == ("adapter-2" in container), attr


def test_added_adapter_trainable_only_when_active(case):
    model = case.peft()
    case.add(model, "other")
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    model.set_adapter("other")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".other." in n and "gatera_" in n)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".default." in n)


def test_several_active_adapters(case):
    model = case.peft()
    case.add(model, "other")
    first = _no_grad_output(case, model)
    model.set_adapter("other")
    second = _no_grad_output(case, model)
    model.base_model.set_adapter(["default", "other"])
    both = _no_grad_output(case, model)
    _assert_differs(both, first)
    _assert_differs(both, second)
    if not case.gated:  # merging both gives the forward of both
        model.merge_adapter(["default", "other"])
        torch.testing.assert_close(_no_grad_output(case, model), both, rtol=1e-4, atol=1e-4)


def test_mixed_adapter_batches_refused(case):
    model = case.peft()
    case.add(model, "other")
    names = ["default", "other", "__base__"][: len(next(iter(case.inputs().values())))]
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        with torch.no_grad():
            case.output(model, adapter_names=names)
    if case.is_transformers:
        with pytest.raises(ValueError, match="mixed-adapter batches"):
            model.generate(**case.inputs(), adapter_names=names, max_new_tokens=1)


def test_add_adapter_with_existing_name_raises(case):
    model = case.peft()
    before = _adapter_state(model)
    with pytest.raises(ValueError, match="Adapter with name 'default' already exists"):  # PEFT's wording
        model.add_adapter("default", case.config())
    after = _adapter_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_disable_adapter_gives_base_output(case):
    base_out = _no_grad_output(case, case.base())
    model = case.peft()
    adapted = _no_grad_output(case, model)
    _assert_differs(adapted, base_out)
    with model.disable_adapter():
        torch.testing.assert_close(_no_grad_output(case, model), base_out, rtol=0, atol=0)
        with model.disable_adapter():  # re-entrant
            torch.testing.assert_close(_no_grad_output(case, model), base_out, rtol=0, atol=0)
        torch.testing.assert_close(_no_grad_output(case, model), base_out, rtol=0, atol=0)
    torch.testing.assert_close(_no_grad_output(case, model), adapted, rtol=0, atol=0)


def test_delete_adapter_cleans_up(case):
    model = case.peft()
    case.add(model, "delete_me")
    model.set_adapter("delete_me")
    for layer in _gatera_layers(model):  # (a kernel failure sends the adapter to the PyTorch path in that layer)
        layer.triton_failures["delete_me"] = "a failed launch"
    model.delete_adapter("delete_me")
    assert "delete_me" not in model.peft_config and model.active_adapters == ["default"]
    for layer in _gatera_layers(model):
        for attr in layer.adapter_layer_names + layer.other_param_names:
            assert "delete_me" not in attrgetter(attr)(layer), attr
        assert all(key[0] != "delete_me" for key in layer.gate_stats)
        assert "delete_me" not in layer.triton_failures  # (an adapter added again under the name may use Triton)
    assert all(key[0] != "delete_me" for key in model.base_model.penalty_run.layer_counts)
    model.delete_adapter("default")
    assert model.active_adapters == [] and not model.peft_config
    with torch.no_grad():
        model.base_model(**case.inputs())  # the bare base model still runs


def test_delete_inactive_adapter(case):
    model = case.peft()
    expected = _no_grad_output(case, model)
    case.add(model, "delete_me")
    model.delete_adapter("delete_me")
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(_no_grad_output(case, model), expected, rtol=0, atol=0)


def test_delete_unknown_adapter_raises(case):
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        case.peft().delete_adapter("unknown-adapter")


def test_unload_restores_base(case):
    base = case.base()
    n_keys = len(base.state_dict())
    base_out = _no_grad_output(case, base)
    model = case.peft()
    _assert_differs(_no_grad_output(case, model), base_out)
    unloaded = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    assert not [name for name, m in unloaded.named_modules() if "penalty_run" in vars(m)]
    assert len(unloaded.state_dict()) == n_keys
    torch.testing.assert_close(_no_grad_output(case, unloaded), base_out, rtol=0, atol=0)


def test_get_base_model_state_dict(case):
    base = case.base()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = case.peft()
    extracted = get_base_model_state_dict(model)
    assert set(extracted) == set(original)
    for key in original:
        torch.testing.assert_close(extracted[key], original[key], rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------------------------------- modules_to_save
def test_modules_to_save_trained_saved_and_loaded(case, tmp_path):
    saved_module = ARCHS[case.arch][2]
    model = case.peft(modules_to_save=saved_module)
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    assert wrappers
    with torch.no_grad():
        for wrapper in wrappers:
            for p in wrapper.modules_to_save["default"].parameters():
                p.add_(0.1)
    expected = _no_grad_output(case, model)
    with model.disable_adapter():
        base_out = _no_grad_output(case, model)
    torch.testing.assert_close(base_out, _no_grad_output(case, case.base()), rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any("modules_to_save" in k or saved_module[0] in k for k in saved if "gatera_" not in k)
    loaded = PeftModel.from_pretrained(case.base(), tmp_path).eval()
    torch.testing.assert_close(_no_grad_output(case, loaded), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- training
def test_backward_reaches_exactly_the_adapter(case):
    model = case.peft().train()
    case.loss(model).backward()
    for name, param in model.named_parameters():
        if "gatera_" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_training_updates_only_adapter_parameters(case):
    model = case.peft(modules_to_save=ARCHS[case.arch][2]).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        case.loss(model).backward()
        optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == ("gatera_" in name or "modules_to_save" in name), name


def test_train_and_eval_forward_agree(case):
    """Without dropout, the penalty taps of training mode are identities in forward."""
    model = case.peft()
    evaluated = _no_grad_output(case, model)
    model.train()
    torch.testing.assert_close(_no_grad_output(case, model), evaluated, rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(case, use_reentrant):
    _skip_unless_transformers(case, "gradient checkpointing")
    model = case.peft().train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def grads():
        for p in params.values():
            p.grad = None
        case.loss(model).backward()
        return {n: p.grad.clone() for n, p in params.items()}

    reference = grads()
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    model.train()
    checkpointed = grads()
    for name in params:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------- dtypes, inference
# Half precision against fp32 (the same adapter weights): the logits of these tiny models are O(1).
HALF_TOL = {torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=1e-1, atol=1e-1)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_half_precision_forward(case, dtype, autocast):
    reference = _no_grad_output(case, case.peft())
    base = case.base(dtype)
    torch.manual_seed(1)
    model = get_peft_model(base, case.config(), autocast_adapter_dtype=autocast).eval()
    adapter_dtypes = {p.dtype for n, p in model.named_parameters() if "gatera_" in n}
    assert adapter_dtypes == ({torch.float32} if autocast else {dtype})
    out = _no_grad_output(case, model)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, **HALF_TOL[dtype])


def test_inference_mode_equals_no_grad(case):
    model = case.peft()
    expected = _no_grad_output(case, model)
    with torch.inference_mode():
        out = case.output(model)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_generate(case):
    _skip_unless_transformers(case, "generate")
    model = case.peft()
    inputs = case.inputs()
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    half = case.peft(dtype=torch.bfloat16)
    half.generate(**inputs, max_new_tokens=2, do_sample=False)


# ----------------------------------------------------------------------------------------------------- merging
def test_merge_gated_is_refused(case):
    if not case.gated:
        pytest.skip("gate='none' adapters merge")
    model = case.peft()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="per-token gate"):
            call()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.merged for layer in _gatera_layers(model))


def test_merge_unmerge_and_merge_and_unload(case):
    _skip_unless_mergeable(case)
    model = case.peft()
    base_out = _no_grad_output(case, case.base())
    expected = _no_grad_output(case, model)
    _assert_differs(expected, base_out)
    model.merge_adapter()
    assert all(layer.merged for layer in _gatera_layers(model))
    torch.testing.assert_close(_no_grad_output(case, model), expected, rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()
    torch.testing.assert_close(_no_grad_output(case, model), expected, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):  # PEFT's wording
        model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_no_grad_output(case, model), base_out, rtol=0, atol=0)
    unloaded = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    assert not hasattr(unloaded, "peft_config")
    # (a plain model: no GateRA state on the unwrapped layers, which `torch.load` could not read without the plugin)
    assert not [name for name, m in unloaded.named_modules() if "penalty_run" in vars(m)]
    torch.testing.assert_close(_no_grad_output(case, unloaded), expected, rtol=1e-4, atol=1e-4)


def test_merge_inside_autocast_merges_the_fp32_update(case):
    """A merge called inside an autocast region (e.g. a training loop's) adds the update formed in fp32, as outside
    it; autocast would form `BA` in bf16 (about 1% off) and merge that."""
    _skip_unless_mergeable(case)
    model = case.peft()
    in_autocast = copy.deepcopy(model)
    model.merge_adapter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast.merge_adapter()
    merged, merged_in_autocast = model.state_dict(), in_autocast.state_dict()
    assert all(torch.equal(merged[k], merged_in_autocast[k]) for k in merged)


def test_an_adapter_added_while_another_is_merged_reads_the_unmerged_base_weight():
    """hira_scaling="lora" (the default) reads RMS(W0) when an adapter is added: with an ungated adapter merged into
    the stored weight, a second adapter's scale and outputs are those it has on the plain base."""
    from tests.helpers import tiny_llama

    def scales(model, name):
        return [m.scaling[name] for m in model.modules() if isinstance(m, GateRALayer) and name in m.scaling]

    input_ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    second = GateRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    alone = get_peft_model(tiny_llama(init_std=0.2), second, adapter_name="second").eval()
    model = get_peft_model(tiny_llama(init_std=0.2), GateRAConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                 gate="none", init_weights=False)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gatera_B" in name:
                param.mul_(5.0)  # (a merged update large enough to move RMS(W0 + ΔW))
    model.merge_adapter()
    model.add_adapter("second", second)
    assert scales(model, "second") == scales(alone, "second")
    model.unmerge_adapter()
    model.set_adapter("second")
    model.load_state_dict(alone.state_dict(), strict=False)  # the same random factors and gate
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, alone(input_ids=input_ids).logits)


def test_unmerge_restores_the_base_weights_exactly(case):
    _skip_unless_mergeable(case)
    base_state = case.base().state_dict()
    model = case.peft()
    case.add(model, "other")
    model.merge_adapter(["default"])
    model.merge_adapter(["other"])
    model.unmerge_adapter()
    for key, value in get_base_model_state_dict(model).items():
        torch.testing.assert_close(value, base_state[key], rtol=0, atol=0, msg=key)


def test_disable_adapter_after_merge(case):
    _skip_unless_mergeable(case)
    model = case.peft()
    base_out = _no_grad_output(case, case.base())
    expected = _no_grad_output(case, model)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_no_grad_output(case, model), base_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_no_grad_output(case, model), expected, rtol=1e-5, atol=1e-5)


def test_merge_is_idempotent(case):
    _skip_unless_mergeable(case)
    model = case.peft()
    model.merge_adapter()
    merged = _no_grad_output(case, model)
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    torch.testing.assert_close(_no_grad_output(case, model), merged, rtol=0, atol=0)


def test_sequential_merge_equals_batched_merge_and_forward(case):
    """Merging two adapters one at a time, together, and running both unmerged give the same model."""
    _skip_unless_mergeable(case)
    model = case.peft(adapter_name="adapter_1")
    case.add(model, "adapter_2", r=6)
    model.base_model.set_adapter(["adapter_1", "adapter_2"])
    both = _no_grad_output(case, model)
    sequential = copy.deepcopy(model)
    model.merge_adapter(["adapter_1", "adapter_2"])
    batched = _no_grad_output(case, model)
    sequential.merge_adapter(["adapter_1"])
    sequential.merge_adapter(["adapter_2"])
    torch.testing.assert_close(batched, both, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_no_grad_output(case, sequential), batched, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_selected_adapters(case):
    _skip_unless_mergeable(case)
    model = case.peft()
    first = _no_grad_output(case, model)
    case.add(model, "adapter-2")
    model.set_adapter("adapter-2")
    second = _no_grad_output(case, model)
    only_second = copy.deepcopy(model).merge_and_unload(adapter_names=["adapter-2"])
    torch.testing.assert_close(_no_grad_output(case, only_second), second, rtol=1e-4, atol=1e-4)
    only_first = copy.deepcopy(model).merge_and_unload(adapter_names=["default"])
    torch.testing.assert_close(_no_grad_output(case, only_first), first, rtol=1e-4, atol=1e-4)
    merged_all = model.merge_and_unload(adapter_names=["adapter-2", "default"])
    out = _no_grad_output(case, merged_all)
    _assert_differs(out, first)
    _assert_differs(out, second)


def test_safe_merge(case):
    _skip_unless_mergeable(case)
    model = case.peft()
    expected = _no_grad_output(case, model)
    unloaded = model.merge_and_unload(safe_merge=True)
    torch.testing.assert_close(_no_grad_output(case, unloaded), expected, rtol=1e-4, atol=1e-4)
    assert all(v.is_contiguous() for v in unloaded.state_dict().values())


@pytest.mark.parametrize("merge", ["merge_adapter", "merge_and_unload"])
@pytest.mark.parametrize("broken", ["every-layer", "last-layer"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_of_a_broken_adapter_raises_peft_error(case, bad, broken, merge):
    """Refused before any layer is merged, also where only the last layer is broken (PEFT merges layer by layer:
    the earlier ones were left merged, and merge_and_unload had unwrapped them)."""
    _skip_unless_mergeable(case)
    model = case.peft()
    with torch.no_grad():
        factors = [param for name, param in model.named_parameters() if "gatera_A" in name]
        for param in factors if broken == "every-layer" else factors[-1:]:
            param[0] = bad
    before = get_base_model_state_dict(model)
    before = {k: v.clone() for k, v in before.items()}
    layers = len(_gatera_layers(model))
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        getattr(model, merge)(safe_merge=True)
    after = get_base_model_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.merged for layer in _gatera_layers(model))
    assert len(_gatera_layers(model)) == layers


def test_delete_merged_adapter_raises(case):
    _skip_unless_mergeable(case)
    model = case.peft()
    case.add(model, "other")
    model.merge_adapter(["default"])
    with pytest.raises(ValueError, match="while they are merged"):
        model.delete_adapter("default")
    assert "default" in model.peft_config
    model.delete_adapter("other")  # an unmerged one can go


def test_merge_half_precision(case):
    _skip_unless_mergeable(case)
    base = case.base(torch.float16)
    torch.manual_seed(1)
    model = get_peft_model(base, case.config()).eval()
    expected = _no_grad_output(case, model)
    unloaded = model.merge_and_unload()
    assert all(p.dtype == torch.float16 for p in unloaded.parameters())
    out = _no_grad_output(case, unloaded)
    torch.testing.assert_close(out.float(), expected.float(), **HALF_TOL[torch.float16])
