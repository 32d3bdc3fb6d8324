"""`GateRAConfig` rejects every bad value at construction, naming the field (and the fix where there is one)."""

import json

import pytest

from gatera_plugin import GateRAConfig
from gatera_plugin.config import DEFAULT_ENTROPY_WEIGHT, FORMAT_VERSION

BAD = [
    (dict(r=0), r"`r` must be > 0"),
    (dict(r=-4), r"`r` must be > 0"),
    (dict(r=8.5), r"`r` must be an integer"),
    (dict(r="8"), r"`r` must be an integer"),
    (dict(r=True), r"`r` must be an integer"),
    (dict(branch="dora2"), r"`branch` must be one of \['hira', 'lora', 'dora'\], got 'dora2'"),
    (dict(gate="softmax"), r"`gate` must be one of \['sigmoid', 'threshold', 'none'\], got 'softmax'"),
    (dict(lora_alpha=16), r"`lora_alpha` only applies to branch='lora' or 'dora'.*Remove `lora_alpha`"),
    (dict(branch="lora", lora_alpha=0), r"`lora_alpha` must be > 0"),
    (dict(branch="lora", lora_alpha=float("nan")), r"`lora_alpha` must be finite"),
    (dict(dropout=1.0), r"`dropout` must be < 1"),
    (dict(dropout=-0.1), r"`dropout` must be >= 0"),
    (dict(gate_bias_init=float("inf")), r"`gate_bias_init` must be finite"),
    (dict(entropy_weight=-0.1), r"`entropy_weight` must be >= 0"),
    (dict(entropy_weight="high"), r"`entropy_weight` must be a number"),
    (dict(gate="none", entropy_weight=0.1), r"`entropy_weight`=0.1 needs sigmoid token gates.*Set entropy_weight=0"),
    (dict(gate="threshold", entropy_weight=0.1), r"`entropy_weight`=0.1 needs sigmoid token gates"),
    (dict(threshold_init=0.1), r"`threshold_init` only applies to gate='threshold'"),
    (dict(keep_ratio=0.5), r"`keep_ratio` only applies to gate='threshold'"),
    (dict(gate="threshold", keep_ratio=0.0), r"`keep_ratio` must be > 0"),
    (dict(gate="threshold", keep_ratio=1.5), r"`keep_ratio` must be <= 1"),
    (dict(gate="threshold", keep_ratio_weight=1.0), r"`keep_ratio_weight` needs a `keep_ratio` target"),
    (dict(gate="threshold", threshold_temperature=0), r"`threshold_temperature` must be > 0"),
    (dict(structure_weight=0.1), r"`structure_weight` only applies with structure_gate=True"),
    (dict(structure_gate=True, structure_weight=-1.0), r"`structure_weight` must be >= 0"),
    (dict(structure_gate="yes"), r"`structure_gate` must be True or False"),
    (dict(sparse_threshold=1.0), r"`sparse_threshold` must be < 1"),
    (dict(sparse_training=True), r"`sparse_training=True` needs `sparse_threshold` > 0"),
    (dict(cache_delta=True, branch="lora"), r"`cache_delta` .* needs branch='hira'"),
    (dict(alpha_pattern={"q": 4}, branch="hira"), r"`alpha_pattern` only applies to branch='lora' or 'dora'"),
    (dict(init_weights="gaussian"), r"`init_weights` must be True or False"),
    (dict(per_layer_stats=1), r"`per_layer_stats` must be True or False"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]` must be > 0"),
    (dict(rank_pattern=["q_proj"]), r"`rank_pattern` must be a dict"),
    (dict(target_parameters=["w"]), r"`target_parameters` is not supported by GateRA.*`target_modules`"),
    (dict(target_modules=[]), r"`target_modules` is an empty list"),
    (dict(target_modules=[1, 2]), r"`target_modules` must be a list of module names"),
    (dict(target_modules="q_proj", layers_to_transform=[0]), r"`layers_to_transform` cannot be used"),
    (dict(target_modules=["q"], layers_pattern="layers"), r"`layers_pattern` needs `layers_to_transform`"),
    (dict(format_version=FORMAT_VERSION + 1), r"format version 2.*Upgrade gatera_plugin"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_values_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GateRAConfig(target_modules=kwargs.pop("target_modules", ["q_proj"]), **kwargs)


def test_defaults_and_resolution():
    config = GateRAConfig(target_modules=["q_proj"])
    assert (config.r, config.branch, config.gate, config.gate_bias_init) == (32, "hira", "sigmoid", 0.0)
    assert config.entropy_weight == DEFAULT_ENTROPY_WEIGHT and config.is_gated
    ungated = GateRAConfig(target_modules=["q_proj"], gate="none")
    assert ungated.entropy_weight == 0.0 and not ungated.is_gated
    assert config.scaling_for(32, None) == 1.0  # HiRA: no scaling
    lora = GateRAConfig(target_modules=["q_proj"], branch="lora", r=8, lora_alpha=16)
    assert lora.scaling_for(8, 16) == 2.0 and lora.scaling_for(4, None) == 1.0


def test_config_round_trips_through_json(tmp_path):
    config = GateRAConfig(target_modules=["q_proj", "v_proj"], branch="lora", lora_alpha=8, rank_pattern={"v": 4})
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "GATERA" and data["format_version"] == FORMAT_VERSION
    loaded = GateRAConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
