"""Property-based tests (hypothesis): random config values and random corruptions of a saved adapter folder.

The property, for every input: it works (a config builds a model whose training step is finite; a folder loads and
gives the logits of the model it was saved from, or of exactly the values the file now holds), or it fails with an
error of ours that names the file or the setting. Never a silent difference, never a bare library traceback.
Deterministic (derandomize=True: the same examples on every run) and bounded (max_examples), so CI cannot flake.
"""

import dataclasses
import functools
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from gatera_plugin import GateRAConfig
from gatera_plugin.serialization import file_sha256
from tests.helpers import TwoLinear, eval_logits, randomize_adapters, tiny_llama

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
NUMBERS = st.one_of(st.none(), st.integers(-2, 40), st.floats(-2.0, 2.0), st.sampled_from(
    [float("nan"), float("inf"), 0.0, 1.0, "0.5", True]))
CONFIG_VALUES = {
    "r": st.one_of(st.integers(-1, 6), st.sampled_from([2.5, "4", True, None])),
    "branch": st.sampled_from(["hira", "lora", "dora", "HiRA", "", None, 3]),
    "gate": st.sampled_from(["sigmoid", "threshold", "none", "Sigmoid", None]),
    "lora_alpha": NUMBERS,
    "dropout": NUMBERS,
    "gate_bias_init": NUMBERS,
    "entropy_weight": NUMBERS,
    "threshold_init": NUMBERS,
    "threshold_temperature": NUMBERS,
    "keep_ratio": NUMBERS,
    "keep_ratio_weight": NUMBERS,
    "structure_gate": st.sampled_from([True, False, 1, None]),
    "structure_init": NUMBERS,
    "structure_weight": NUMBERS,
    "sparse_threshold": NUMBERS,
    "sparse_training": st.sampled_from([True, False, "yes"]),
    "cache_delta": st.sampled_from([True, False, 0]),
    "kernel": st.sampled_from(["auto", "torch", "cuda"]),
    "init_weights": st.sampled_from([True, False, "gaussian"]),
    "target_modules": st.sampled_from([["lin0"], ["lin0", "lin1"], "lin.*", "lin(", [], ["nope"], 5, "all-linear"]),
    "exclude_modules": st.sampled_from([None, ["lin1"], "lin1", "[", ["lin0", "lin1"]]),
    "rank_pattern": st.sampled_from([{}, {"lin0": 2}, {"lin(": 2}, {"lin1": 0}, None, ["lin0"]]),
    "alpha_pattern": st.sampled_from([{}, {"lin0": 4.0}, {"lin0": -1}]),
    "format_version": st.sampled_from([1, 2, 0, "1"]),
}


def _names_a_setting(error: Exception, names) -> bool:
    message = str(error).lower().replace(" ", "_")
    return any(name in message for name in names)


@SETTINGS
@given(st.fixed_dictionaries({}, optional=CONFIG_VALUES))
def test_random_config_values(kwargs):
    """Valid values build a model whose training step is finite; invalid ones raise a ValueError naming a setting."""
    torch.manual_seed(0)
    try:
        config = GateRAConfig(**kwargs)
        model = get_peft_model(TwoLinear(), config)
    except ValueError as error:
        assert _names_a_setting(error, list(kwargs) + ["target_modules"]), (kwargs, error)
        return
    x = torch.randn(3, 5, 12)
    model.train()
    loss = model(x).pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


# ------------------------------------------------------------------------------------------------ saved folders
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
JSON_VALUES = st.sampled_from([None, 0, -1, 1, 4, 8, 2.5, "", "x", "hira", "lora", "dora", "none", "sigmoid",
                               "threshold", "gatera", "GATERA", "LORA", "torch", [], ["q_proj"], ["q_proj", "v_proj"],
                               {}, {"q_proj": 2}, True, False, 1e9])
JSON_KEYS = ["peft_type", "r", "branch", "gate", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform",
             "layers_pattern", "rank_pattern", "alpha_pattern", "modules_to_save", "structure_gate", "sparse_threshold",
             "entropy_weight", "dropout", "kernel", "cache_delta", "task_type", "inference_mode", "format_version",
             "weights_sha256", "structure_stamp", "base_model_name_or_path", "init_weights", "ensure_weight_tying",
             "gate_bias_init", "structure_init",
             "new_field"]


@functools.lru_cache(maxsize=1)
def _source():
    """(folder, logits, model) of one saved adapter, built once for all examples."""
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj", "v_proj"], structure_gate=True))
    torch.manual_seed(1)
    randomize_adapters(model, scale=0.5)
    folder = Path(tempfile.mkdtemp(prefix="gatera-properties-")) / "adapter"
    model.save_pretrained(folder)
    return folder, eval_logits(model, IDS), model


@pytest.fixture(scope="module", autouse=True)
def _remove_source_folder():
    """`_source`'s folder lives across examples (built once); remove it when the module's tests are done."""
    yield
    if _source.cache_info().currsize:
        shutil.rmtree(_source()[0].parent, ignore_errors=True)
        _source.cache_clear()


def _rewrite_weights(folder, state, restamp):
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    if restamp:  # as a tool that rewrites the weights and their checksum (not the structure stamp) would
        config = json.loads((folder / "adapter_config.json").read_text())
        config["weights_sha256"] = file_sha256(folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(config))


FILES = st.sampled_from(["adapter_model.safetensors", "adapter_config.json"])
BYTE_CORRUPTIONS = st.one_of(
    st.tuples(st.just("bytes"), FILES, st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                                min_size=1, max_size=4)),
    st.tuples(st.just("truncate"), FILES, st.floats(0, 1, exclude_max=True)),
)
JSON_EDITS = st.tuples(st.just("json"), st.sampled_from(JSON_KEYS), st.one_of(JSON_VALUES, st.just("<delete>")))
TENSOR_CORRUPTIONS = st.one_of(
    st.tuples(st.just("rename"), st.integers(0, 100), st.sampled_from(["q_proj->k_proj", "gatera_A->gatera_C",
                                                                       "default->other", "+.extra"]), st.booleans()),
    st.tuples(st.just("shape"), st.integers(0, 100), st.sampled_from(["drop-row", "transpose", "flatten", "scalar"]),
              st.booleans()),
    st.tuples(st.just("dtype"), st.integers(0, 100), st.sampled_from(
        [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool]), st.booleans()),
    st.tuples(st.just("remove"), st.integers(0, 100), st.booleans()),
)


def _corrupt(folder, corruption, model):
    """Apply one corruption; returns the expected logits if the folder must still load (None: any outcome of ours)."""
    kind = corruption[0]
    weights = folder / "adapter_model.safetensors"
    if kind in ("bytes", "truncate"):
        path = folder / corruption[1]
        data = bytearray(path.read_bytes())
        if kind == "truncate":
            del data[int(corruption[2] * len(data)):]
        else:
            for where, value in corruption[2]:
                data[int(where * len(data))] = value
        path.write_bytes(bytes(data))
        return None
    if kind == "json":
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        _, key, value = corruption
        config.pop(key, None) if value == "<delete>" else config.__setitem__(key, value)
        path.write_text(json.dumps(config))
        return None
    state = load_file(weights)
    keys = sorted(state)
    key = keys[corruption[1] % len(keys)]
    restamp = corruption[-1]
    if kind == "rename":
        old, _, new = corruption[2].partition("->")
        state[key.replace(old, new) if new else key + corruption[2][1:]] = state.pop(key)
    elif kind == "shape":
        tensor = state[key]
        state[key] = {"drop-row": tensor[:-1], "transpose": tensor.t().contiguous() if tensor.ndim == 2 else
                      tensor.reshape(1, -1), "flatten": tensor.reshape(-1), "scalar": tensor.reshape(-1)[0]}[corruption[2]]
    elif kind == "dtype":
        state[key] = state[key].to(corruption[2])
    else:
        del state[key]
    _rewrite_weights(folder, state, restamp)
    if kind == "dtype" and corruption[2].is_floating_point:
        # the file now holds these (rounded) values: loading them must give exactly their model's logits
        params = dict(model.named_parameters())
        name = key.replace(".gatera_A", ".gatera_A.default").replace(".gatera_B", ".gatera_B.default")
        name = name.replace("gatera_gate.", "gatera_gate.default.").replace("gatera_structure.", "gatera_structure.default.")
        saved = params[name].detach().clone()
        with torch.no_grad():
            params[name].copy_(saved.to(corruption[2]).float())
            expected = eval_logits(model, IDS)
            params[name].copy_(saved)
        return expected
    return None


def _check_corrupted_folder(corruption):
    source, logits, model = _source()
    folder = Path(tempfile.mkdtemp(prefix="gatera-corrupt-")) / "adapter"
    shutil.copytree(source, folder)
    try:
        expected = _corrupt(folder, corruption, model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                loaded = PeftModel.from_pretrained(tiny_llama(), folder)
                got = eval_logits(loaded, IDS)
            except (ValueError, FileNotFoundError) as error:
                message = str(error)
                names_file = any(name in message for name in (str(folder), "adapter_config.json",
                                                              "adapter_model.safetensors"))
                names_setting = any(f"`{field.name}`" in message for field in dataclasses.fields(GateRAConfig))
                assert names_file or names_setting, (corruption, error)
                return
        torch.testing.assert_close(got, logits if expected is None else expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{corruption}: loaded with other logits: {m}")
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


@settings(SETTINGS, max_examples=100)
@given(JSON_EDITS)
def test_random_edits_of_the_adapter_config(corruption):
    _check_corrupted_folder(corruption)


@settings(SETTINGS, max_examples=40)
@given(BYTE_CORRUPTIONS)
def test_random_byte_corruptions_of_the_adapter_files(corruption):
    _check_corrupted_folder(corruption)


@settings(SETTINGS, max_examples=60)
@given(TENSOR_CORRUPTIONS)
def test_random_tensor_names_shapes_and_dtypes(corruption):
    """Half of the examples also rewrite `weights_sha256` (a tool re-saving the weights), so the checks behind the
    checksum are exercised: the structure stamp's tensor digest, the tensor-set check, floating-point dtypes."""
    _check_corrupted_folder(corruption)


def teardown_module():
    if _source.cache_info().currsize:
        shutil.rmtree(_source()[0].parent, ignore_errors=True)


@pytest.mark.parametrize("key", ["task_type", "peft_type", "r"])
def test_config_fields_of_the_wrong_type_name_the_file(tmp_path, key):
    """Examples hypothesis found first, kept as plain tests."""
    source, _, model = _source()
    shutil.copytree(source, tmp_path / "a")
    _corrupt(tmp_path / "a", ("json", key, 5 if key != "r" else "x"), model)
    with pytest.raises(ValueError, match=r"adapter_config.json"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
