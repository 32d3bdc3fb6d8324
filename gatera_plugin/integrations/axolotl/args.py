"""The `gatera_*` keys an Axolotl config may set, validated with the rest of the config."""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, Field, model_validator

from gatera_plugin.config import DEFAULT_ENTROPY_WEIGHT, GateRAConfig

_DEFAULTS = {field.name: field.default for field in dataclasses.fields(GateRAConfig)}  # (the texts below quote them)

GATERA_KEYS = (
    "gatera_branch", "gatera_gate", "gatera_entropy_weight", "gatera_gate_bias_init", "gatera_per_layer_stats",
    "gatera_threshold_init", "gatera_threshold_temperature", "gatera_keep_ratio", "gatera_keep_ratio_weight",
    "gatera_structure_gate", "gatera_structure_init", "gatera_structure_weight", "gatera_kernel",
    "gatera_hira_scaling", "gatera_gate_lr_ratio",
)
LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
# Axolotl's LoRA options that a GateRA adapter has no counterpart for (they would be ignored) -> what to do instead
LORA_ONLY_OPTIONS = {
    "peft_use_dora": "GateRA's DoRA branch is `gatera_branch: dora`",
    "peft_use_rslora": "rsLoRA's alpha / √r is not one of GateRA's scales; `gatera_hira_scaling` chooses the HiRA "
                       "branch's (lora: alpha / r, rms, none)",
    "peft_init_lora_weights": "LoRA's initialisations (PiSSA, OLoRA, LoftQ, EVA, gaussian, ...) do not apply to "
                              "GateRA's factors",
    "peft_layer_replication": "GateRA does not replicate layers",
    "peft.loftq_config": "LoftQ initialises LoRA factors from a quantised base",
}


def _lora_option_set(data: dict, key: str) -> bool:
    """Whether an Axolotl config sets LoRA option `key` ("a.b": key b of block a) to other than its default."""
    block, _, name = key.rpartition(".")
    value = (data.get(block) or {}).get(name) if block else data.get(key)
    if key == "peft_init_lora_weights":  # true is LoRA's default initialisation; false, PiSSA, ... are not
        return value not in (None, True)
    return value not in (None, False)


# the keys whose values are numbers (GateRAArgs' float fields and Axolotl's LoRA numbers)
NUMBER_KEYS = ("gatera_entropy_weight", "gatera_gate_bias_init", "gatera_threshold_init",
               "gatera_threshold_temperature", "gatera_keep_ratio", "gatera_keep_ratio_weight", "gatera_structure_init",
               "gatera_structure_weight", "gatera_gate_lr_ratio", "lora_r", "lora_alpha", "lora_dropout")


def _as_number(value):
    """A number given as a string (`"1e-3"`, `"16"`) as the number pydantic will make of it; anything else as it is."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value.strip())
        except ValueError:
            continue
    return value


def _saved_config(data: dict) -> tuple[Optional[str], dict]:
    """(folder, its `adapter_config.json`) of the adapter the config continues or merges: `lora_model_dir`, or for
    `merge_lora` the `output_dir` Axolotl's merge reads without one; {} where none is saved or it cannot be read (a
    missing or unreadable config is reported where the adapter loads)."""
    from gatera_plugin.serialization import read_config

    folder = data.get("lora_model_dir") or (data.get("output_dir") if data.get("merge_lora") else None)
    if not folder:
        return None, {}
    try:
        return str(folder), read_config(Path(folder))
    except (OSError, ValueError):
        return str(folder), {}


def _saved_gate(data: dict) -> str:
    """The gate kind of the adapter the config continues or merges (`_saved_config`), which governs over the YAML;
    the YAML's `gatera_gate` (default sigmoid) where no adapter is saved."""
    saved = _saved_config(data)[1]
    if isinstance(saved.get("gate"), str):
        return saved["gate"]
    return data.get("gatera_gate") or _DEFAULTS["gate"]


class GateRAArgs(BaseModel):
    """GateRA options for `adapter: gatera`; the usual `lora_r`, `lora_alpha` (the LoRA scale; HiRA uses it too under the default `gatera_hira_scaling: lora`), `lora_dropout`,
    `lora_target_modules`, `lora_target_linear`, `lora_modules_to_save`, `peft_layers_to_transform` apply too."""

    gatera_branch: Optional[Literal["hira", "lora", "dora"]] = Field(
        default=None, json_schema_extra={"description": f"Branch kind (default {_DEFAULTS['branch']})."}
    )
    gatera_gate: Optional[Literal["sigmoid", "threshold", "none"]] = Field(
        default=None, json_schema_extra={"description": f"Token gate kind (default {_DEFAULTS['gate']}, GateRA)."}
    )
    gatera_entropy_weight: Optional[float] = Field(
        default=None, ge=0, json_schema_extra={"description": "Weight of the gate entropy penalty (default "
                                                          f"{DEFAULT_ENTROPY_WEIGHT} for sigmoid gates)."}
    )
    gatera_gate_bias_init: Optional[float] = Field(
        default=None, json_schema_extra={
            "description": f"Initial gate bias (default {_DEFAULTS['gate_bias_init']:g}: gates start at 0.5)."}
    )
    gatera_per_layer_stats: Optional[bool] = Field(
        default=None, json_schema_extra={"description": "Also log gate statistics per adapted module."}
    )
    gatera_threshold_init: Optional[float] = Field(default=None, json_schema_extra={"description": "gate: threshold"})
    gatera_threshold_temperature: Optional[float] = Field(
        default=None, gt=0, json_schema_extra={"description": "gate: threshold"}
    )
    gatera_keep_ratio: Optional[float] = Field(
        default=None, gt=0, le=1, json_schema_extra={"description": "gate: threshold, target kept fraction"}
    )
    gatera_keep_ratio_weight: Optional[float] = Field(default=None, ge=0)
    gatera_structure_gate: Optional[bool] = Field(
        default=None, json_schema_extra={"description": "One learnable gate per adapted module."}
    )
    gatera_structure_init: Optional[float] = Field(default=None)
    gatera_structure_weight: Optional[float] = Field(default=None, ge=0)
    gatera_kernel: Optional[Literal["auto", "triton", "torch"]] = Field(
        default=None,
        json_schema_extra={"description": "auto: the branch's PyTorch path (no Triton branch "
                                         "kernel has measured faster), and on H100/H200 class GPUs Triton kernels for "
                                         "the gated HiRA branch's row operations on large rows."},
    )
    gatera_hira_scaling: Optional[Literal["none", "rms", "lora"]] = Field(
        default=None, json_schema_extra={"description": "HiRA branch scale: lora (default: like LoRA with lora_r / "
                                         "lora_alpha, so LoRA learning rates carry over), none (PEFT's HiRA) or rms "
                                         "(1/RMS(W0))."}
    )
    gatera_gate_lr_ratio: Optional[float] = Field(
        default=None, gt=0, json_schema_extra={"description": "Gate parameters' learning rate / learning_rate."}
    )

    @model_validator(mode="before")
    @classmethod
    def settings_that_do_not_go_together_are_refused_before_loading(cls, data):
        """(Defined first, so it runs after the other checks: pydantic runs "before" validators last-defined first.)
        Builds the GateRAConfig the YAML describes (with a placeholder for `lora_target_linear`'s layer names), so
        that settings it refuses together (`gatera_keep_ratio` without `gatera_gate: threshold`, `lora_r: 0`, ...)
        fail when the config is read, not after the dataset and model have loaded, with the YAML keys named."""
        if not isinstance(data, dict) or data.get("adapter") != "gatera":
            return data
        from .plugin import _CONFIG_KEYS, _TARGET_KEYS, gatera_config_from_axolotl

        # (the raw values, before pydantic converts them: a number YAML reads as a string, `1e-3`, or a CLI override
        # Axolotl leaves as one, as pydantic's lax mode will read it)
        values = {key: _as_number(value) if key in NUMBER_KEYS else value for key, value in data.items()}
        if isinstance(values.get("lora_r"), float) and values["lora_r"].is_integer():  # (Axolotl's int field takes 16.0)
            values["lora_r"] = int(values["lora_r"])
        try:
            gatera_config_from_axolotl(values, model=None, warn=False)
        except (ValueError, TypeError) as error:
            message = str(error)
            named = [f"`{key}` sets {field}" for field, key in _CONFIG_KEYS.items()
                     if key != field and any(values.get(k) is not None for k in (
                         _TARGET_KEYS if key == "lora_target_modules" else (key,)))
                     and re.search(rf"(?<![\w.]){re.escape(field)}(?!\w)", message)]
            keys = f" (In the YAML: {', '.join(named)}.)" if named else ""
            prefix = "" if message.startswith("`adapter: gatera`") else "`adapter: gatera`: "
            raise ValueError(f"{prefix}{message}{keys}") from None
        return data

    @model_validator(mode="before")
    @classmethod
    def unknown_gatera_keys_are_refused(cls, data):
        """A misspelt `gatera_*` key would be dropped by Axolotl's schema without a word (the run then trains with
        the default): refused, with the closest known key."""
        if not isinstance(data, dict):
            return data
        for key in data:
            if isinstance(key, str) and key.startswith("gatera_") and key not in GATERA_KEYS:
                close = difflib.get_close_matches(key.removeprefix("gatera_"),  # (not by the shared prefix)
                                                  [k.removeprefix("gatera_") for k in GATERA_KEYS], n=1)
                hint = f"did you mean `gatera_{close[0]}`? " if close else ""
                raise ValueError(f"`{key}` is not a GateRA setting: {hint}The GateRA keys are {', '.join(GATERA_KEYS)}.")
        return data

    @model_validator(mode="before")
    @classmethod
    def gatera_keys_need_gatera_adapter(cls, data):
        """`gatera_*` keys, or a saved GateRA adapter to continue or merge, under another `adapter:` are refused: with
        `adapter: lora` Axolotl loaded the GateRA folder, then its LoRA kernel patches failed on it, and `merge-lora`
        merged no tensor and wrote the base model unchanged."""
        if not isinstance(data, dict) or data.get("adapter") == "gatera":
            return data
        stray = [key for key in GATERA_KEYS if data.get(key) is not None]
        if stray:
            raise ValueError(
                f"{', '.join(stray)} only apply with `adapter: gatera` (this config has adapter: "
                f"{data.get('adapter')!r}). Set `adapter: gatera` or remove them."
            )
        folder, saved = _saved_config(data)
        if data.get("adapter") and str(saved.get("peft_type", "")).upper() == "GATERA":
            key = "lora_model_dir" if data.get("lora_model_dir") else "output_dir"
            raise ValueError(
                f"`{key}: {folder}` holds a GateRA adapter, but this config has adapter: {data.get('adapter')!r}, "
                "which would load or merge it as a LoRA adapter. Set `adapter: gatera` (with `load_in_4bit: true` "
                "for a 4-bit base, as `qlora` loads)."
            )
        return data

    @model_validator(mode="before")
    @classmethod
    def refuse_what_gatera_cannot_do(cls, data):
        if not isinstance(data, dict) or data.get("adapter") != "gatera":
            return data
        gated = _saved_gate(data) != "none"
        if data.get("merge_lora") and gated:
            raise ValueError(
                "`merge_lora` cannot be used with `adapter: gatera`: a GateRA adapter has a per-token gate, so no "
                "single merged weight exists. Load the adapter for inference instead (`lora_model_dir`, or "
                "`axolotl inference`), or train with `gatera_gate: none` for a mergeable adapter."
            )
        if data.get("merge_lora") and data.get("merge_method") != "legacy":
            raise ValueError(
                "Merging an ungated GateRA adapter (`gatera_gate: none`) needs `merge_method: legacy`: the "
                "memory-efficient merge reads adapter_config.json as a LoRA adapter."
            )
        trl = data.get("trl") if isinstance(data.get("trl"), dict) else {}
        if trl.get("use_vllm") and gated:
            raise ValueError(
                "`trl.use_vllm: true` cannot generate from a gated GateRA adapter: TRL hands vLLM the policy by "
                "merging the adapter into the base weights, and a per-token gate has no merged weight. Set "
                "`trl.use_vllm: false` (generation then uses the model being trained) or train with `gatera_gate: none`."
            )
        if data.get("load_in_4bit") and data.get("load_in_8bit"):
            raise ValueError(
                "`load_in_4bit` and `load_in_8bit` are both set: `adapter: gatera` loads the base in 4-bit with "
                "`load_in_4bit`, in 8-bit with `load_in_8bit`. Keep one."
            )
        if data.get("flash_attn_fuse_mlp"):  # (Axolotl refuses it for lora and qlora alike)
            raise ValueError(
                "`flash_attn_fuse_mlp: true` replaces the MLP's gate_proj / up_proj with one fused module that GateRA "
                "cannot adapt (as LoRA cannot: Axolotl refuses it with `adapter: lora`). Remove it."
            )
        if data.get("use_onebitllms"):
            raise ValueError("`use_onebitllms` (BitNet 1.58-bit training) is not supported with `adapter: gatera`, as "
                             "Axolotl does not support it with LoRA: GateRA would read the latent weights as W0.")
        checkpointing = data.get("gradient_checkpointing_kwargs") or {}
        if (data.get("rl") and data.get("load_in_4bit") and data.get("gradient_checkpointing")
                and checkpointing.get("use_reentrant") and (data.get("capabilities") or {}).get("n_gpu", 1) > 1):
            raise ValueError(  # (Axolotl's own check for qlora: distributed RL with reentrant checkpointing fails)
                "The `use_reentrant: True` implementation of gradient checkpointing is not supported for distributed "
                "RL training on a 4-bit base (as Axolotl says for QLoRA). Set `use_reentrant: False` in "
                "`gradient_checkpointing_kwargs`."
            )
        if data.get("relora"):
            raise ValueError("`relora` is a LoRA restart scheme; it is not supported with `adapter: gatera`.")
        kernels = [key for key in LORA_KERNEL_KEYS if data.get(key)]
        if kernels:
            raise ValueError(
                f"{', '.join(kernels)}: Axolotl's LoRA Triton kernels assume a LoRA adapter and cannot run GateRA "
                "layers. Remove them (GateRA has its own kernels: `gatera_kernel`)."
            )
        if data.get("lora_target_parameters"):
            raise ValueError("`lora_target_parameters` is not supported by GateRA (the gate needs a module's input).")
        for key, instead in LORA_ONLY_OPTIONS.items():
            if _lora_option_set(data, key):
                raise ValueError(
                    f"`{key}` is a LoRA option that `adapter: gatera` would ignore: {instead}. Remove it."
                )
        fsdp = data.get("fsdp_config") if isinstance(data.get("fsdp_config"), dict) else {}
        if data.get("load_in_4bit") and (fsdp.get("cpu_ram_efficient_loading")
                                         or fsdp.get("fsdp_cpu_ram_efficient_loading")):
            raise ValueError(
                "`fsdp_config.cpu_ram_efficient_loading: true` with `load_in_4bit`: Axolotl loads a 4-bit base that way "
                "only through its CPU-staged NF4 loading (`qlora_sharded_model_loading`), which it allows for "
                "`adapter: qlora` only. With `adapter: gatera` set `cpu_ram_efficient_loading: false` (every rank then "
                "loads and quantises the base itself); a full-precision base can keep it."
            )
        if data.get("loraplus_lr_ratio") is not None:
            raise ValueError(
                "`loraplus_lr_ratio`: LoRA+ raises the learning rate of LoRA's B factors, which it finds by the name "
                "`lora_B`, and of every 1-D parameter; in a GateRA adapter it would leave the B factors (`gatera_B`) "
                "alone and raise the rate of the gate biases (and thresholds, structure logits, DoRA magnitudes) "
                "instead. Remove it (`gatera_gate_lr_ratio` sets the gates' rate)."
            )
        ratio = _as_number(data.get("gatera_gate_lr_ratio"))
        if data.get("lr_scheduler") == "one_cycle" and isinstance(ratio, (int, float)) and ratio != 1:
            raise ValueError(
                f"`lr_scheduler: one_cycle` with `gatera_gate_lr_ratio: {data.get('gatera_gate_lr_ratio')}`: Axolotl's "
                "one-cycle scheduler sets one rate (`learning_rate`) for every param group, so the gates would train "
                "at the others' rate. Use another `lr_scheduler` (cosine, linear, rex, ...: they scale each group's "
                "own rate), or remove `gatera_gate_lr_ratio`."
            )
        return data
