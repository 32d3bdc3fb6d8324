"""The catalogue of bad inputs: each fails early with its exception type and a message naming the setting and the fix.

Groups: config values; what the config is applied to (targets, layer types); tensors (device, dtype); adapter
folders (missing, corrupted, foreign, mismatched, newer, pickled). Axolotl's config conflicts are in
tests/axolotl/test_axolotl.py (they need the Axolotl environment). README "What can go wrong" lists the classes.
"""

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn

from gatera_plugin import GateRAConfig
from gatera_plugin.config import FORMAT_VERSION
from tests.helpers import TwoLinear, tiny_llama

# ---------------------------------------------------------------------------------------------- config values
CONFIG_CASES = [
    (dict(r=0), r"`r` must be > 0"),
    (dict(r=-4), r"`r` must be > 0"),
    (dict(r=8.5), r"`r` must be an integer"),
    (dict(r="8"), r"`r` must be an integer"),
    (dict(r=True), r"`r` must be an integer"),
    (dict(branch="dora2"), r"`branch` must be one of \['hira', 'lora', 'dora'\], got 'dora2'"),
    (dict(gate="softmax"), r"`gate` must be one of \['sigmoid', 'threshold', 'none'\], got 'softmax'"),
    (dict(kernel="cuda"), r"`kernel` must be one of \['auto', 'triton', 'torch'\], got 'cuda'"),
    (dict(branch="dora", kernel="triton"), r"kernel='triton' has no kernels for branch='dora'.*Use kernel='auto' or "
                                          r"kernel='torch'"),
    (dict(lora_alpha=16, hira_scaling="none"), r"`lora_alpha` only applies to branch='lora' or 'dora'.*Remove "
                                               r"`lora_alpha`.*hira_scaling='lora'"),
    (dict(lora_alpha=16, hira_scaling="rms"), r"`lora_alpha` only applies.*hira_scaling='rms'"),
    (dict(branch="lora", lora_alpha=0), r"`lora_alpha` must be > 0"),
    (dict(branch="lora", lora_alpha=float("nan")), r"`lora_alpha` must be finite"),
    (dict(dropout=1.0), r"`dropout` must be < 1"),
    (dict(dropout=-0.1), r"`dropout` must be >= 0"),
    (dict(gate_bias_init=float("inf")), r"`gate_bias_init` must be finite"),
    (dict(layers_to_transform="0"), r"`layers_to_transform` must be a layer index or a list of them .*got '0' \(str\)"),
    (dict(layers_to_transform=[0, "1"]), r"`layers_to_transform` must be a layer index"),
    (dict(gate_bias_init=-800.0), r"`gate_bias_init`=-800.0 starts a sigmoid gate at σ = .*within ±20"),  # (was
    # a bare OverflowError from math.exp at the first forward)
    (dict(structure_gate=True, structure_init=25), r"`structure_init`=25 starts a sigmoid gate at σ = 1, .*±20"),
    (dict(entropy_weight=-0.1), r"`entropy_weight` must be >= 0"),
    (dict(entropy_weight="high"), r"`entropy_weight` must be a number"),
    (dict(gate="none", entropy_weight=0.1), r"`entropy_weight`=0.1 needs sigmoid token gates.*Set entropy_weight=0"),
    (dict(gate="threshold", entropy_weight=0.1), r"`entropy_weight`=0.1 needs sigmoid token gates"),
    (dict(init_weights="gaussian"), r"`init_weights` must be True or False"),
    (dict(per_layer_stats=1), r"`per_layer_stats` must be True or False"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]` must be > 0"),
    (dict(rank_pattern=["q_proj"]), r"`rank_pattern` must be a dict"),
    (dict(alpha_pattern={"q": 4}, hira_scaling="none"), r"`alpha_pattern` only applies to branch='lora' or 'dora'"),
    (dict(target_parameters=["w"]), r"`target_parameters` is not supported by GateRA.*`target_modules`"),
    (dict(target_modules=[]), r"`target_modules` is an empty list.*'all-linear'"),
    (dict(target_modules=[1, 2]), r"`target_modules` must be a list of module names"),
    (dict(target_modules="q_proj", layers_to_transform=[0]), r"`layers_to_transform` cannot be used"),
    (dict(target_modules=["q"], layers_pattern="layers"), r"`layers_pattern` needs `layers_to_transform`"),
    (dict(format_version=FORMAT_VERSION + 1), r"format version 2.*Upgrade gatera_plugin"),
    (dict(threshold_init=0.1), r"`threshold_init` only applies to gate='threshold'"),
    (dict(keep_ratio=0.5), r"`keep_ratio` only applies to gate='threshold'"),
    (dict(gate="threshold", keep_ratio=0.0), r"`keep_ratio` must be > 0"),
    (dict(gate="threshold", keep_ratio=1.5), r"`keep_ratio` must be <= 1"),
    (dict(gate="threshold", keep_ratio_weight=1.0), r"`keep_ratio_weight` needs a `keep_ratio` target"),
    (dict(gate="threshold", threshold_temperature=0), r"`threshold_temperature` must be > 0"),
    (dict(gate="threshold", gate_bias_init=-2.0), r"`gate_bias_init`=-2.0 sets a sigmoid token gate's initial bias, "
                                                  r"but gate='threshold', which has none.*Remove `gate_bias_init`"),
    (dict(gate="none", gate_bias_init=1), r"`gate_bias_init`=1 sets .*gate='none'"),
    (dict(gate="none", sparse_threshold=0.1), r"`sparse_threshold`=0.1 skips the tokens whose sigmoid or structure "
                                              r"gate is below it, but gate='none' without structure_gate has neither.*"
                                              r"Remove `sparse_threshold`"),
    (dict(gate="threshold", sparse_threshold=0.1), r"`sparse_threshold`=0.1 .*gate='threshold' without structure_gate "
                                                   r"has neither \(a threshold gate reads every token's branch output\)"),
    (dict(gate="none", gate_lr_ratio=10), r"`gate_lr_ratio`=10 sets the rate of the gates' parameters, but gate='none' "
                                          r"without structure_gate has none.*Remove `gate_lr_ratio`, or add gates"),
    (dict(gate="threshold", threshold_init=0.05), r"`threshold_init`=0.05 with init_weights=True and no keep_ratio: "
                                                  r"B = 0 at step 0.*never gets a gradient.*threshold_init <= 0.*"
                                                  r"init_weights=False.*keep_ratio"),
    (dict(structure_weight=0.1), r"`structure_weight` only applies with structure_gate=True"),
    (dict(structure_gate=True, structure_weight=-1.0), r"`structure_weight` must be >= 0"),
    (dict(structure_gate="yes"), r"`structure_gate` must be True or False"),
    (dict(sparse_threshold=1.0), r"`sparse_threshold` must be < 1"),
    (dict(sparse_training=True), r"`sparse_training=True` needs `sparse_threshold` > 0"),
    (dict(cache_delta=True, branch="lora"), r"`cache_delta` .* needs branch='hira'"),
    (dict(target_modules="q_proj("), r"`target_modules` 'q_proj\(' is not a valid regular expression.*Fix the pattern"),
    (dict(exclude_modules="[v_proj"), r"`exclude_modules` '\[v_proj' is not a valid regular expression"),
    (dict(rank_pattern={"*q": 4}), r"`rank_pattern key` '\*q' is not a valid regular expression"),
    # (PEFT's own errors: a ModuleDict TypeError, an AttributeError on int, or at the first forward in `index_copy_`)
    (dict(modules_to_save="lm_head"), r"`modules_to_save` must be a list of module names, e\.g\. \['lm_head'\]"),
    (dict(modules_to_save=[1]), r"`modules_to_save` must be a list of module names"),
    (dict(trainable_token_indices=[-1]), r"`trainable_token_indices` must be a list of token ids \(integers ≥ 0\)"),
    (dict(trainable_token_indices=[1.5]), r"`trainable_token_indices` must be a list of token ids"),
    (dict(trainable_token_indices="5"), r"`trainable_token_indices` must be a list of token ids.*got '5'"),
    (dict(trainable_token_indices={"embed_tokens": 5}), r"`trainable_token_indices`\['embed_tokens'\] must be a list"),
    (dict(trainable_token_indices={0: [5]}), r"`trainable_token_indices` as a dict maps embedding module names"),
]


@pytest.mark.parametrize("kwargs,message", CONFIG_CASES, ids=[str(k) for k, _ in CONFIG_CASES])
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GateRAConfig(target_modules=kwargs.pop("target_modules", ["q_proj"]), **kwargs)


@pytest.mark.parametrize("indices", [[], {"embed_tokens": []}])
def test_empty_trainable_token_indices_train_no_rows(indices):
    """An empty list (new tokens that turned out to be none) means no rows; PEFT failed at the first forward."""
    config = GateRAConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices)
    assert config.trainable_token_indices is None
    get_peft_model(tiny_llama(), config)(torch.randint(0, 64, (1, 5))).logits.sum().backward()


def test_token_indices_from_numpy_and_modules_to_save_as_a_tuple_are_taken_as_peft_takes_them():
    """NumPy's integers (`np.where`, a pandas column) are token ids for PEFT's LoRA; a tuple or set of module names
    becomes a list (PEFT extends it for a classifier's head: a tuple raised AttributeError there)."""
    import numpy as np

    from tests.helpers import tiny_llama_classifier

    config = GateRAConfig(r=4, target_modules=["q_proj"], trainable_token_indices=list(np.array([5, 7])))
    assert config.trainable_token_indices == [5, 7] and all(type(i) is int for i in config.trainable_token_indices)
    get_peft_model(tiny_llama(), config)(torch.randint(0, 64, (1, 5))).logits.sum().backward()
    config = GateRAConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS", modules_to_save=("norm",))
    model = get_peft_model(tiny_llama_classifier(), config)
    assert set(model.peft_config["default"].modules_to_save) >= {"norm", "score"}


NEW_ADAPTER_ONLY = [dict(gate="threshold", gate_bias_init=-2.0), dict(gate="none", gate_lr_ratio=10.0),
                    dict(gate="none", sparse_threshold=0.1), dict(gate="threshold", threshold_init=0.05)]


@pytest.mark.parametrize("kwargs", NEW_ADAPTER_ONLY, ids=[str(k) for k in NEW_ADAPTER_ONLY])
def test_settings_a_new_adapter_would_ignore_are_refused_for_training_only(kwargs, tmp_path):
    """Refused for a new adapter; a config built for inference, or read from a saved folder, still builds (to load
    what was saved), also one saved with inference_mode=False (transformers' `save_pretrained` of a model given an
    adapter with `add_adapter`, `config.save_pretrained`), by every route that reads it."""
    import json

    from peft import PeftConfig

    with pytest.raises(ValueError):
        GateRAConfig(target_modules=["q_proj"], **kwargs)
    assert GateRAConfig(target_modules=["q_proj"], inference_mode=True, **kwargs).gate == kwargs["gate"]
    saved = GateRAConfig(target_modules=["q_proj"], inference_mode=True, **kwargs)
    saved.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "inference_mode": False}))
    for read in (PeftConfig.from_pretrained, GateRAConfig.from_pretrained):
        config = read(tmp_path)
        assert not config.inference_mode and all(getattr(config, k) == v for k, v in kwargs.items())
    assert GateRAConfig(target_modules=["q_proj"], gate="threshold", threshold_init=0.05, keep_ratio=0.5).keep_ratio


def test_a_positive_threshold_init_is_pulled_down_by_a_keep_ratio():
    """With a keep_ratio its penalty gives τ a gradient through the straight-through estimator, also where every
    token is dropped (B = 0): τ falls, so that setting is allowed."""
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], gate="threshold",
                                                      threshold_init=0.05, keep_ratio=0.5, keep_ratio_weight=1.0))
    input_ids = torch.randint(3, 128, (2, 9))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    grads = [m.threshold.grad for m in model.modules() if hasattr(m, "threshold") and isinstance(m.threshold,
                                                                                                   torch.nn.Parameter)]
    assert grads and all(g is not None and g.item() > 0 for g in grads)  # (a step of -lr·grad lowers τ)


def test_a_positive_threshold_init_closes_every_token_of_a_new_adapter_but_a_saved_one_loads(tmp_path):
    """Why `threshold_init` > 0 is refused with B = 0: every token is dropped and no parameter gets a gradient. With a
    random B it trains; a saved config (PEFT saves inference_mode=True) with it still loads."""
    from peft import PeftModel

    def gradient_norm(init_weights):
        model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], gate="threshold",
                                                          threshold_init=0.0, init_weights=init_weights))
        for module in model.modules():
            if hasattr(module, "threshold"):
                module.threshold.data.fill_(0.05)
        input_ids = torch.randint(3, 128, (2, 9))
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        return sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None), model

    dead, _ = gradient_norm(init_weights=True)
    alive, model = gradient_norm(init_weights=False)
    assert dead < 1e-3 < alive  # (only τ's small leak term moves)
    model.peft_config["default"].threshold_init = 0.05  # (as a run that was not refused yet saved it)
    model.save_pretrained(tmp_path)
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path).peft_config["default"].threshold_init == 0.05


# ---------------------------------------------------------------------------------------------- applying a config
class WithConvAndEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 4, 3)
        self.lin = nn.Linear(8, 8)


MODEL_CASES = [
    ("targets-match-nothing", lambda: get_peft_model(TwoLinear(), GateRAConfig(target_modules=["nope"])),
     ValueError, r"Target modules \{'nope'\} not found in the base model.*check the target modules"),
    ("conv2d-target", lambda: get_peft_model(WithConvAndEmbedding(), GateRAConfig(target_modules=["conv"])),
     ValueError, r"cannot adapt target module of type Conv2d.*Supported layer types.*Remove it from `target_modules`"),
    ("embedding-target", lambda: get_peft_model(WithConvAndEmbedding(), GateRAConfig(target_modules=["embed"])),
     ValueError, r"cannot adapt target module of type Embedding.*Supported layer types"),
    ("all-excluded", lambda: get_peft_model(TwoLinear(), GateRAConfig(target_modules=["lin0"], exclude_modules=["lin0"])),
     ValueError, r"No modules were targeted.*check your `target_modules` and `exclude_modules`"),
]


@pytest.mark.parametrize("name,build,error,message", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_targets_and_layers(name, build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_add_weighted_adapter_is_refused_with_the_alternatives():
    """PEFT's `add_weighted_adapter` is LoRA's own: before, the call fell through to the base model
    ("'LlamaForCausalLM' object has no attribute 'add_weighted_adapter'")."""
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4))
    with pytest.raises(NotImplementedError, match=r"LoRA and IA3 only.*set_adapter.*merge_and_unload"):
        model.add_weighted_adapter(["default"], [1.0], "combined")


def test_unfrozen_base_weight_with_hira_branch():
    model = get_peft_model(TwoLinear(), GateRAConfig(target_modules=["lin0"]))
    model.base_model.model.lin0.base_layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"treats the base weight as frozen.*requires_grad_\(False\).*branch='lora'"):
        model(torch.randn(2, 12))


def test_adapter_on_another_device_than_its_input():
    model = get_peft_model(TwoLinear(), GateRAConfig(target_modules=["lin0"]))
    layer = model.base_model.model.lin0
    layer.gatera_A["default"] = nn.Parameter(torch.empty_like(layer.gatera_A["default"], device="meta"))
    with pytest.raises(RuntimeError, match=r"adapter 'default' is on meta \(never loaded.*but this layer's input is on "
                                           r"cpu.*Move the whole PEFT model"):
        model(torch.randn(2, 12))


def test_triton_kernel_with_a_dtype_it_does_not_run():
    pytest.importorskip("triton")
    model = get_peft_model(TwoLinear().double(), GateRAConfig(target_modules=["lin0"], kernel="triton"))
    with pytest.raises(ValueError, match=r"kernel='triton' runs float32, float16 and bfloat16 inputs, got "
                                         r"torch.float64.*Use kernel='torch'"):
        model(torch.randn(2, 12, dtype=torch.float64))


def test_merging_a_gated_adapter():
    model = get_peft_model(TwoLinear(), GateRAConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match=r"Cannot merge GateRA adapter 'default'.*per-token gate.*gate='none'"):
        model.merge_and_unload()


def test_pruning_without_structure_gates():
    model = get_peft_model(TwoLinear(), GateRAConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match=r"no structure gates \(structure_gate=False\)"):
        model.base_model.prune_structure(0.5)


def test_mixed_adapter_batches():
    model = get_peft_model(TwoLinear(), GateRAConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match=r"mixed-adapter batches \(`adapter_names=`\).*Use `set_adapter`"):
        model.base_model.model.lin0(torch.randn(2, 12), adapter_names=["default", "default"])


# ---------------------------------------------------------------------------------------------- adapter folders
@pytest.fixture
def saved(tmp_path):
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _load(folder, base=None):
    return PeftModel.from_pretrained(base or tiny_llama(), folder)


def test_missing_config(saved):
    os.remove(saved / "adapter_config.json")
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config.json'"):
        _load(saved)


def test_missing_weights(saved):
    os.remove(saved / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"has adapter_config.json but no adapter_model.safetensors.*Restore"):
        _load(saved)


def test_truncated_weights(saved):
    data = (saved / "adapter_model.safetensors").read_bytes()
    (saved / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is corrupted or truncated.*Restore the adapter from a checkpoint"):
        _load(saved)


def test_corrupted_weights_header(saved):
    data = bytearray((saved / "adapter_model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32
    (saved / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupted or truncated"):
        _load(saved)


def test_weights_from_another_save(saved, tmp_path):
    other = get_peft_model(tiny_llama(seed=1), GateRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "gatera_" in name:
                p.normal_()
    other.save_pretrained(tmp_path / "other")
    os.replace(tmp_path / "other" / "adapter_model.safetensors", saved / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"does not match the checksum saved in adapter_config.json.*different saves"):
        _load(saved)


def test_invalid_config_json(saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError):
        _load(saved)


def test_config_of_another_peft_method_read_as_gatera(tmp_path):
    LoraConfig(target_modules=["q_proj"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds a LORA adapter config, not a GateRA one.*PeftConfig.from_pretrained"):
        GateRAConfig.from_pretrained(tmp_path)


def test_gatera_weights_beside_another_methods_config(saved):
    LoraConfig(target_modules=["q_proj", "v_proj"]).save_pretrained(saved)  # the config file gets replaced
    with pytest.raises(ValueError, match=r"describes a LORA adapter, but adapter_model.safetensors there holds GateRA "
                                         r"weights.*Restore the GateRA adapter_config.json"):
        _load(saved)


def test_adapter_of_another_rank_or_base_shape(saved):
    with pytest.raises(ValueError, match=r"does not fit this base model.*Load it onto"):
        _load(saved, tiny_llama(hidden=64, intermediate=96))


def test_adapter_for_other_modules(saved):
    with pytest.raises(ValueError, match=r"lacks .* tensors.*Load it onto"):
        _load(saved, tiny_llama(layers=3))


def test_adapter_from_a_newer_release(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"format version 2.*Upgrade gatera_plugin"):
        PeftConfig.from_pretrained(saved)


def test_pickled_weights_need_an_opt_in(tmp_path):
    """Refused at save time (the file would not load) and at load time, unless pickles are allowed."""
    import gatera_plugin

    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], init_weights=False))
    with pytest.raises(ValueError, match=r"save_pretrained\(safe_serialization=False\) would write pickled weights.*"
                                         r"GATERA_ALLOW_PICKLE=1.*allow_pickle\(\).*Save with safe_serialization=True"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    with gatera_plugin.allow_pickle():
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    with pytest.raises(ValueError, match=r"pickled weights.*GATERA_ALLOW_PICKLE=1 or `with gatera_plugin.allow_pickle"):
        _load(tmp_path)
    with gatera_plugin.allow_pickle():
        loaded = _load(tmp_path)
    with pytest.raises(ValueError, match="pickled weights"):  # a check passed under the opt-in does not outlive it
        _load(tmp_path)
    ids = torch.randint(3, 128, (1, 6))
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_catalogue_has_at_least_40_distinct_cases():
    distinct = len(CONFIG_CASES) + len(MODEL_CASES) + sum(
        1 for name in globals() if name.startswith("test_") and name not in (
            "test_bad_config_values", "test_bad_targets_and_layers", "test_catalogue_has_at_least_40_distinct_cases"))
    assert distinct >= 40


# ---------------------------------------------------------------------------------------------- the command line
@pytest.fixture
def plot_setup(tmp_path):
    """A saved adapter with its tokenizer, and its base model saved as a folder."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from common import tiny_model_and_tokenizer

    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path / "base")
    get_peft_model(model, GateRAConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    return tmp_path


CLI_CASES = [
    ("max-new-tokens-0", ["--max-new-tokens", "0"], r"`max_new_tokens` \(CLI: --max-new-tokens\) must be an integer >= 1"),
    ("max-new-tokens-negative", ["--max-new-tokens", "-3"], r"--max-new-tokens\) must be an integer >= 1, got -3"),
    ("empty-answer", ["--answer", ""], r"`answer` is empty \(CLI: --answer\)"),
    ("empty-prompt", ["--prompt", ""], r"`prompt` is empty \(CLI: --prompt\)"),
    ("missing-base-model", ["--base-model", "/no/such"], r"Cannot load the base model '/no/such' \(named by "
                                                         r"base_model \(CLI: --base-model\)\)"),
    ("out-without-extension", ["--out", "gates"], r"--out 'gates': give an image file name ending in one of .*\.png"),
    ("out-unknown-format", ["--out", "gates.xyz"], r"--out 'gates.xyz': give an image file name ending in one of"),
    ("base-model-is-an-adapter", ["--base-model", "ADAPTER"], r"base_model \(CLI: --base-model\) '.*adapter' is an "
                                                              r"adapter folder; pass the base model"),
    # (older transformers build a tokenizer from the config alone: the model's missing weights are said there)
    ("base-model-without-tokenizer", ["--base-model", "NO_TOKENIZER"], r"Cannot load the (tokenizer of|base model) "
                                                                       r"'.*no-tokenizer' \(named by base_model \(CLI: "
                                                                       r"--base-model\)\)"),
    ("out-below-a-file", ["--out", "BELOW_A_FILE"], r"--out '.*a-file/g.png': .*a-file is a file, not a folder"),
    ("truncated-weights", ["TRUNCATE"], r"adapter_model.safetensors"),
    ("broken-tokenizer-in-the-adapter", ["BREAK_TOKENIZER"], r"Cannot load the tokenizer saved with the adapter in "
                                                             r"'.*adapter'.*Save the tokenizer with the adapter again"),
]


@pytest.mark.parametrize("extra,message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_gatera_plot_bad_options(plot_setup, capsys, extra, message):
    """One line on stderr naming the option, exit code 2, nothing written (never NaN statistics or a traceback)."""
    import re

    from gatera_plugin.cli import main

    args = ["plot", str(plot_setup / "adapter"), "--prompt", "Question: Neon?", "--out", str(plot_setup / "g.png")]
    if "--base-model" not in extra:
        args += ["--base-model", str(plot_setup / "base")]
    if "NO_TOKENIZER" in extra:  # (the adapter folder without its tokenizer, the base without one: a model only)
        (plot_setup / "adapter" / "tokenizer_config.json").unlink()
        (plot_setup / "no-tokenizer").mkdir()
        (plot_setup / "base" / "config.json").rename(plot_setup / "no-tokenizer" / "config.json")
    if "BREAK_TOKENIZER" in extra:  # (its config kept, its files gone)
        for file in (plot_setup / "adapter").iterdir():
            if file.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")) and file.name != \
                    "tokenizer_config.json":
                file.unlink()
        extra = []
    if "BELOW_A_FILE" in extra:
        (plot_setup / "a-file").write_text("")
        extra = [str(plot_setup / "a-file" / "g.png") if item == "BELOW_A_FILE" else item for item in extra]
    if "TRUNCATE" in extra:  # (an interrupted copy: a traceback from safetensors, after the base model had loaded)
        weights = plot_setup / "adapter" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        extra = []
    extra = [str(plot_setup / "adapter") if item == "ADAPTER" else str(plot_setup / "no-tokenizer")
             if item == "NO_TOKENIZER" else item for item in extra]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gatera plot: ") and re.search(message, err), err
    assert not (plot_setup / "g.png").exists()


def test_gatera_prune_out_below_a_file_names_the_option(saved, tmp_path, capsys):
    """`--out` inside a path whose parent is a file: one line naming `--out` (it printed `[Errno 17] File exists`)."""
    from gatera_plugin.cli import main

    (tmp_path / "a-file").write_text("")
    assert main(["prune", str(saved), "--threshold", "0.5", "--out", str(tmp_path / "a-file" / "pruned")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out '{tmp_path / 'a-file' / 'pruned'}': {tmp_path / 'a-file'} is a file" in err


def test_gatera_prune_on_invalid_json_names_the_file(saved, tmp_path, capsys):
    from gatera_plugin.cli import main

    (saved / "adapter_config.json").write_text("{not json")
    assert main(["prune", str(saved), "--threshold", "0.5", "--out", str(tmp_path / "pruned")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{saved / 'adapter_config.json'} is not valid JSON" in err, err


def test_gatera_plot_keeps_an_existing_image_unless_told_and_replaces_it_whole(plot_setup, capsys, monkeypatch):
    """An existing `--out` is refused before the model loads, and kept as it was (it was overwritten in place: a
    failure half-way left a stub); a folder is refused; `--overwrite` replaces the file atomically, so a failing
    write leaves the old image whole."""
    from gatera_plugin import serialization
    from gatera_plugin.cli import main

    image = plot_setup / "g.png"
    image.write_bytes(b"an earlier plot")
    image.chmod(0o644)
    args = ["plot", str(plot_setup / "adapter"), "--prompt", "Question: Neon?", "--base-model", str(plot_setup / "base")]
    assert main([*args, "--out", str(image)]) == 2
    assert "exists; give a new file name, or pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(plot_setup)]) == 2 and "is a folder" in capsys.readouterr().err

    def failing(path, data, overwrite):
        raise OSError("disk full")

    with monkeypatch.context() as patched:
        patched.setattr(serialization.os, "replace", lambda *a: failing(None, None, None))
        assert main([*args, "--out", str(image), "--overwrite"]) == 2
    assert image.read_bytes() == b"an earlier plot" and sorted(p.name for p in plot_setup.iterdir()) == [
        "adapter", "base", "g.png"]
    assert main([*args, "--out", str(image), "--overwrite"]) == 0
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.stat().st_mode & 0o777 == 0o644  # (the staged file's 0600 made the replaced image private)


def test_gatera_plot_without_matplotlib_says_how_to_install_it(plot_setup, capsys, monkeypatch):
    """matplotlib is an extra (`plot`): without it `gatera plot` printed a traceback from deep in the import; now one
    line with the install command, exit code 2, before the model loads."""
    import sys

    from gatera_plugin.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # (an import of it raises ImportError)
    assert main(["plot", str(plot_setup / "adapter"), "--prompt", "Question: Neon?", "--base-model",
                 str(plot_setup / "base"), "--out", str(plot_setup / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib, which is not installed here: pip install 'gatera-plugin[plot]'" in err
    assert not (plot_setup / "g.png").exists()


def test_gatera_plot_overwrite_copies_where_the_file_system_cannot_rename(plot_setup, monkeypatch):
    """`--overwrite` on a file system without renames (EXDEV/EOPNOTSUPP) copies the image over the old one with one
    warning, as adapter saves do, instead of failing with the OS's error; no staging file stays behind."""
    import errno

    from gatera_plugin import serialization
    from gatera_plugin.cli import main

    image = plot_setup / "g.png"
    image.write_bytes(b"an earlier plot")
    monkeypatch.setattr(serialization, "_warned_lacking", set())
    monkeypatch.setattr(serialization.os, "replace", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EOPNOTSUPP, "Operation not supported")))
    with pytest.warns(UserWarning, match="does not support renaming files"):
        assert main(["plot", str(plot_setup / "adapter"), "--prompt", "Question: Neon?", "--base-model",
                     str(plot_setup / "base"), "--out", str(image), "--overwrite"]) == 0
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in plot_setup.iterdir()) == ["adapter", "base", "g.png"]


def test_gatera_plot_of_another_methods_adapter_says_so(plot_setup, capsys):
    """A LoRA adapter folder: "holds a LORA adapter, not a GateRA one" (it said "no token gates (gate='none'?)")."""
    from peft import LoraConfig

    from gatera_plugin.cli import main
    from tests.helpers import tiny_llama

    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(plot_setup / "lora")
    args = ["plot", str(plot_setup / "lora"), "--prompt", "Question: Neon?", "--base-model", str(plot_setup / "base"),
            "--out", str(plot_setup / "g.png")]
    assert main(args) == 2
    assert "holds a LORA adapter, not a GateRA one" in capsys.readouterr().err


class _LinearNormHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.norm, self.head = nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.norm(self.lin(x)))


def test_modules_to_save_with_integer_buffers_saves_and_loads(tmp_path):
    """BatchNorm's `num_batches_tracked` (int64) saved along by `modules_to_save` was refused as a modified file, so
    the model could not be saved at all; only GateRA's own tensors must be floating point."""
    model = get_peft_model(_LinearNormHead(), GateRAConfig(r=2, target_modules=["lin"], modules_to_save=["norm"]))
    model(torch.randn(4, 16)).sum().backward()  # (training mode: the norm's running statistics and count move)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_LinearNormHead(), tmp_path).eval()
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert loaded.base_model.model.norm.modules_to_save["default"].num_batches_tracked.item() == 1


def test_a_gatera_tensor_that_is_not_floating_point_is_refused():
    from gatera_plugin.serialization import check_tensors

    check_tensors({"base_model.model.norm.num_batches_tracked": torch.tensor(3)}, "x")
    with pytest.raises(ValueError, match=r"x holds non-floating-point adapter tensors: .*lin\.gatera_A\.default "
                                         r"\(torch\.int64\)"):
        check_tensors({"base_model.model.lin.gatera_A.default": torch.zeros(2, 3, dtype=torch.int64)}, "x")
