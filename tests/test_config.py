"""`GateRAConfig` defaults and serialisation (its refusals of bad values are in test_bad_input.py's catalogue)."""

import json

from gatera_plugin import GateRAConfig
from gatera_plugin.config import DEFAULT_ENTROPY_WEIGHT, FORMAT_VERSION


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


def test_the_kind_names_users_may_give_are_the_registries():
    """`branch` / `gate` are typed with `Literal`s of names, and the implementations are registered by name in
    `BRANCH_KINDS` / `TOKEN_GATE_KINDS`: a kind added to one place only would be refused, or unknown, at runtime."""
    import typing

    from gatera_plugin.branches import BRANCH_KINDS
    from gatera_plugin.config import BRANCHES, TOKEN_GATES
    from gatera_plugin.gates import TOKEN_GATE_KINDS

    hints = typing.get_type_hints(GateRAConfig)
    assert set(typing.get_args(hints["branch"])) == set(BRANCH_KINDS) == set(BRANCHES)
    assert set(typing.get_args(hints["gate"])) == {*TOKEN_GATE_KINDS, "none"} == set(TOKEN_GATES)
