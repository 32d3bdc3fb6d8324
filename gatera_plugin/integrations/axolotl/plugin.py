"""`GateRAPlugin`: declares the `gatera` adapter to Axolotl and builds it; inert for every other adapter.

Installed with the package, the plugin loads for every Axolotl run through the `axolotl.plugins` entry point, so
`adapter: gatera` is the only key a user adds (listing it under `plugins:` as well is harmless). What it does for
`adapter: gatera`:

- `get_adapter_capabilities`: lets Axolotl's config validator accept the name;
- `register`: makes `load_in_4bit` / `load_in_8bit` really quantise the base (Axolotl builds a bitsandbytes config
  only for its own LoRA adapters and would otherwise load the base unquantised without a word);
- `post_model_build`: on a 4-bit / 8-bit base, PEFT's k-bit preparation where Axolotl runs it for `qlora` (just
  before its post-load setup), so that Axolotl's cast of norms and embeddings back to `torch_dtype` follows it as for
  qlora (not under FSDP or ZeRO-3: there `load_adapter` prepares, as before);
- `load_adapter`: builds the GateRA PEFT model from the usual `lora_*` keys and the `gatera_*` keys (or loads
  `lora_model_dir`), after the gradient checkpointing Axolotl applies to LoRA only; for `rl: dpo`, `ipo`, `kto`,
  where TRL builds the model, only its config;
- `post_trainer_create`: there, loads `lora_model_dir`'s weights into the adapter TRL built (DPO after SFT).

The penalty and the gate statistics need nothing here: `import gatera_plugin` makes every `transformers.Trainer`
(Axolotl's included) apply the penalty with the right scale and add `gatera/*` to its logs.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.utils.logging import get_logger

import gatera_plugin
from gatera_plugin.config import lora_alpha_applies, resolved_hira_scaling

LOG = get_logger(__name__)

ADAPTER = "gatera"
_OPTION_KEYS = {  # GateRAConfig field -> Axolotl key
    "branch": "gatera_branch", "gate": "gatera_gate", "entropy_weight": "gatera_entropy_weight",
    "gate_bias_init": "gatera_gate_bias_init", "per_layer_stats": "gatera_per_layer_stats",
    "threshold_init": "gatera_threshold_init", "threshold_temperature": "gatera_threshold_temperature",
    "keep_ratio": "gatera_keep_ratio", "keep_ratio_weight": "gatera_keep_ratio_weight",
    "structure_gate": "gatera_structure_gate", "structure_init": "gatera_structure_init",
    "structure_weight": "gatera_structure_weight", "kernel": "gatera_kernel",
    "hira_scaling": "gatera_hira_scaling", "gate_lr_ratio": "gatera_gate_lr_ratio",
}


def linear_module_names(model) -> list[str]:
    """Suffixes of every linear layer except the output head (Axolotl's `lora_target_linear` rule)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if module is output or not name:
            continue
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            names.add(name.split(".")[-1])
    return sorted(names)


def gatera_config_from_axolotl(cfg, model, warn: bool = True) -> gatera_plugin.GateRAConfig:
    """The GateRAConfig an Axolotl config describes (`model=None`: a placeholder for `lora_target_linear`'s names, as
    the config check before loading uses; `warn`: log the keys it drops). With a saved GateRA adapter to continue or
    merge (`lora_model_dir`), the keys of its structure that the config leaves out take the saved values."""
    saved = _saved_structure_keys(cfg)
    if not saved:
        return _config_from_keys(cfg, model, warn)
    written = {key: value for key, value in cfg.items() if value is not None}
    try:
        return _config_from_keys({**saved, **written}, model, warn)
    except (ValueError, TypeError) as error:
        # a training option that the saved structure has no use for (an entropy weight for a saved threshold gate) is
        # judged where the adapter loads, naming the saved adapter (`_continued_config`: refused for training, applied
        # for inference): the YAML is read as before, with the saved targets only; where that fails too, the reason
        # judged against the saved structure is the one to give
        targets = {key: saved[key] for key in ("lora_target_modules",) if key in saved}
        try:
            return _config_from_keys({**targets, **written}, model, warn=False)
        except (ValueError, TypeError):
            raise error from None


def _config_from_keys(cfg, model, warn: bool) -> gatera_plugin.GateRAConfig:
    """`gatera_config_from_axolotl` of the keys `cfg` holds."""
    options = {field: cfg.get(key) for field, key in _OPTION_KEYS.items() if cfg.get(key) is not None}
    branch = options.get("branch", "hira")
    # as Axolotl's LoRA: a string is PEFT's regex, matched against full module names; with `lora_target_linear` it
    # joins the linear layers' names as one more name
    targets = cfg.get("lora_target_modules") or []
    if not isinstance(targets, str) and not (isinstance(targets, (list, tuple)) and all(isinstance(t, str)
                                                                                       for t in targets)):
        raise ValueError(f"`lora_target_modules` is a list of module names or one regex string, got {targets!r}.")
    if cfg.get("lora_target_linear"):
        targets = [targets] if isinstance(targets, str) else list(targets)
        targets = sorted(set(targets) | set(linear_module_names(model) if model is not None else ["q_proj"]))
    elif not isinstance(targets, str):
        targets = list(targets)
    if not targets:
        raise ValueError("`adapter: gatera` needs `lora_target_modules` or `lora_target_linear: true`.")
    lora_alpha, alpha_pattern = cfg.get("lora_alpha"), dict(cfg.get("lora_alpha_pattern") or {})
    hira_scaling = resolved_hira_scaling(branch, options.get("hira_scaling"))
    if not lora_alpha_applies(branch, hira_scaling):
        dropped = {key: value for key, value in (("lora_alpha", lora_alpha), ("lora_alpha_pattern", alpha_pattern))
                   if value}
        if dropped and warn:
            LOG.warning("%s not used by GateRA's HiRA branch with gatera_hira_scaling=%r (set gatera_hira_scaling: "
                        "lora to scale it like LoRA; docs/method.md, section 'Branches').",
                        " and ".join(f"{key}={value}" for key, value in dropped.items()), hira_scaling)
        lora_alpha, alpha_pattern = None, {}
    r = cfg.get("lora_r")
    return gatera_plugin.GateRAConfig(
        r=32 if r is None else r,
        lora_alpha=lora_alpha,
        target_modules=targets,
        dropout=cfg.get("lora_dropout") or 0.0,
        modules_to_save=cfg.get("lora_modules_to_save") or None,
        ensure_weight_tying=bool(cfg.get("peft_ensure_weight_tying")),
        layers_to_transform=cfg.get("peft_layers_to_transform"),
        layers_pattern=cfg.get("peft_layers_pattern"),
        rank_pattern=dict(cfg.get("lora_rank_pattern") or {}),
        trainable_token_indices=cfg.get("peft_trainable_token_indices") or None,
        alpha_pattern=alpha_pattern,
        task_type=_task_type_of(model),
        # (with `lora_model_dir` the saved adapter's config governs and this one only describes the YAML: its initial
        # values (`_INITIAL_VALUES`) are not used, and so not refused as a new adapter's would be)
        inference_mode=bool(cfg.get("lora_model_dir")),
        **options,
    )


def _saved_structure_keys(cfg) -> dict:
    """{Axolotl key: value} of the structure of the GateRA adapter that `cfg` continues or merges (`lora_model_dir`),
    for the keys `cfg` leaves out; {} without one. That adapter's structure governs (`_continued_config`), so a config
    that leaves out its targets or `gatera_gate` describes it: it needs no targets of its own, and its training options
    are checked against the saved gate kind (`gatera_keep_ratio` for a saved threshold gate is not refused as a sigmoid
    gate's)."""
    from gatera_plugin.serialization import STRUCTURE_FIELDS

    from .args import _saved_config

    saved = _saved_config(cfg)[1]
    if str(saved.get("peft_type", "")).upper() != "GATERA":
        return {}
    unset = {key for key in _CONFIG_KEYS.values() if cfg.get(key) is None}
    if cfg.get("lora_target_linear"):
        unset.discard("lora_target_modules")
    return {_CONFIG_KEYS[field]: saved[field] for field in STRUCTURE_FIELDS
            if field in _CONFIG_KEYS and saved.get(field) is not None and _CONFIG_KEYS[field] in unset}


def _task_type_of(model) -> str:
    """PEFT's task type for the model Axolotl loaded, as its LoRA adapters get: a reward model (`reward_model: true`,
    a SequenceClassification head) and a process reward model (TokenClassification) train their new head with the
    adapter; everything else (and the config check before loading, `model=None`) is a causal LM."""
    name = type(model).__name__
    if "SequenceClassification" in name:
        return "SEQ_CLS"
    if "TokenClassification" in name:
        return "TOKEN_CLS"
    if getattr(getattr(model, "config", None), "model_type", None) in DIFFUSION_MODEL_TYPES:
        return None  # (Axolotl's diffusion LMs: no causal-LM wrapper, as for its LoRA)
    return "CAUSAL_LM"


DIFFUSION_MODEL_TYPES = ("diffusion_gemma", "Dream", "nemotron_labs_diffusion")


# Options that only steer training (penalties, the gates' rate, dropout, the kernel, logging): a YAML that sets them
# applies them to an adapter loaded from `lora_model_dir` too (e.g. another penalty weight for DPO after SFT). The
# saved adapter's structure governs: YAML keys that would change it are reported and ignored.
_TRAINING_OPTIONS = ("entropy_weight", "gate_lr_ratio", "keep_ratio", "keep_ratio_weight", "structure_weight",
                     "threshold_temperature", "per_layer_stats", "kernel", "dropout")
# GateRAConfig field -> the Axolotl key that sets it, for the options above and the structural fields it can set
_CONFIG_KEYS = {**_OPTION_KEYS, "dropout": "lora_dropout", "r": "lora_r", "lora_alpha": "lora_alpha",
                "ensure_weight_tying": "peft_ensure_weight_tying", "target_modules": "lora_target_modules",
                "modules_to_save": "lora_modules_to_save", "layers_to_transform": "peft_layers_to_transform",
                "layers_pattern": "peft_layers_pattern", "rank_pattern": "lora_rank_pattern",
                "alpha_pattern": "lora_alpha_pattern", "trainable_token_indices": "peft_trainable_token_indices"}
_TARGET_KEYS = ("lora_target_modules", "lora_target_linear")  # (either sets target_modules)
# initial values of a new adapter's parameters, not in the saved structure: a continued adapter's trained ones govern
_INITIAL_VALUES = ("threshold_init",)


def _same(field: str, a, b) -> bool:
    """Whether two values of GateRAConfig field `field` describe the same adapter (name lists as sets)."""
    if field == "target_modules" and "all-linear" in (a, b):  # (PEFT saves the names it expanded it to)
        return True
    if field in ("target_modules", "modules_to_save") and not isinstance(a, str) and not isinstance(b, str):
        return set(a or ()) == set(b or ())
    if field == "layers_to_transform":  # (an index or a list of them)
        a, b = ([v] if isinstance(v, int) else v for v in (a, b))
    return a == b


def _written(cfg, key: str) -> bool:
    """Whether the user's config sets `key` (`lora_target_modules`: or `lora_target_linear`), as the config file and
    CLI overrides were when `register` saw them, before Axolotl's validation filled in defaults (`lora_dropout: 0.0`
    for any adapter). Without that record of this config (the plugin called outside Axolotl's CLI): whether it is set
    at all."""
    if key == "lora_target_modules":
        return any(_written_as(cfg, k) and cfg.get(k) for k in _TARGET_KEYS)
    return _written_as(cfg, key)


def _written_as(cfg, key: str) -> bool:
    record = _CONFIG_AS_WRITTEN.get(cfg.get("axolotl_config_path")) if cfg.get("axolotl_config_path") else None
    return cfg.get(key) is not None and (record is None or key in record)


# config file path -> the keys it and the CLI overrides set (`GateRAPlugin.register`, before validation)
_CONFIG_AS_WRITTEN: dict = {}


def _continued_config(folder, cfg, wanted: gatera_plugin.GateRAConfig,
                      training: bool = True) -> gatera_plugin.GateRAConfig:
    """The config of the GateRA adapter saved in `folder`, with the training options `cfg` sets (`wanted`: the config
    `cfg` describes); for `training`, refused where the saved structure has no use for one of them (for inference
    they apply unchecked, as before: e.g. `gatera_kernel`)."""
    from gatera_plugin.serialization import STRUCTURE_FIELDS

    saved = _saved_gatera_config(folder)
    applied = {field: getattr(wanted, field) for field in _TRAINING_OPTIONS
               if _written(cfg, _CONFIG_KEYS[field]) and getattr(wanted, field) != getattr(saved, field)}
    if applied:
        if training:
            _check_applies(saved, applied, folder)
        for field, value in applied.items():
            setattr(saved, field, value)
        LOG.info("GateRA adapter from %s trains with this config's %s", folder, applied)
    ignored = {key: (getattr(wanted, field), getattr(saved, field)) for field, key in _CONFIG_KEYS.items()
               if (field in STRUCTURE_FIELDS or field in _INITIAL_VALUES) and _written(cfg, key)
               and not _same(field, getattr(wanted, field), getattr(saved, field))}
    if ignored:
        LOG.warning("GateRA: the adapter in %s was saved with other settings than this config's %s (config, saved); "
                    "the saved adapter's govern. Remove `lora_model_dir` to train a new adapter with them.",
                    folder, ignored)
    return saved


def _check_applies(saved: gatera_plugin.GateRAConfig, applied: dict, folder) -> None:
    """Refuse training options `applied` (field -> value) that a new adapter of the saved structure would refuse, e.g.
    a keep_ratio for a sigmoid gate: training would ignore them. A refusal that the saved config earns without them is
    not this config's to report."""
    def refusal(**changes):
        try:
            dataclasses.replace(saved, inference_mode=False, **changes)
        except ValueError as error:
            return error
        return None

    error = refusal(**applied)
    if error is None or refusal() is not None:
        return
    offending = [field for field in applied if refusal(**{field: applied[field]}) is not None] or list(applied)
    error = refusal(**{field: applied[field] for field in offending})
    reason = re.split(r"(?<=\.)\s+(?=[A-Z])", str(error))[0]  # (what is wrong; its remedy names a new adapter's fields)
    keys = ", ".join(f"`{_CONFIG_KEYS[field]}`" for field in offending)
    raise ValueError(
        f"`lora_model_dir` ({folder}): this config's {keys} cannot train the GateRA adapter saved there "
        f"(gate={saved.gate!r}, structure_gate={saved.structure_gate}), whose structure governs: {reason} Remove "
        f"{keys} from the config, or remove `lora_model_dir` to train a new adapter with "
        f"{'it' if len(offending) == 1 else 'them'}."
    )


def _saved_gatera_config(folder) -> gatera_plugin.GateRAConfig:
    """The config of the adapter saved in `folder` (`lora_model_dir`), refused unless it is a GateRA adapter."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(folder))
    if not isinstance(config, gatera_plugin.GateRAConfig):
        raise ValueError(
            f"`lora_model_dir` ({folder}) holds a {getattr(config.peft_type, 'value', config.peft_type)} adapter, "
            "not a GateRA one, and `adapter: gatera` would train that instead. Point it at a GateRA adapter's folder, "
            "or set `adapter` to match."
        )
    return config


def _patch_quantization_config() -> None:
    """Give `adapter: gatera` the bitsandbytes config Axolotl builds for `qlora` (4-bit) and `lora` (8-bit): Axolotl's
    own code runs, as for those adapters, so its per-architecture settings apply too (fp32 quant storage for jamba,
    qwen2_moe and nemotron_h, modules it leaves unquantised for falcon_h1, jamba and others)."""
    from axolotl.loaders.model import ModelLoader

    original = ModelLoader._set_quantization_config
    if getattr(original, "__gatera__", False):
        return

    @functools.wraps(original)
    def _set_quantization_config(self):
        cfg = self.cfg
        if cfg.adapter != ADAPTER or not (cfg.load_in_4bit or cfg.load_in_8bit):
            return original(self)
        cfg.adapter = "qlora" if cfg.load_in_4bit else "lora"  # (read by that method only, and put back at once)
        try:
            return original(self)
        finally:
            cfg.adapter = ADAPTER

    _set_quantization_config.__gatera__ = True
    ModelLoader._set_quantization_config = _set_quantization_config


def _kbit_bits(model) -> int:
    """4 or 8 for a bitsandbytes-quantised model (as transformers marks it), else 0."""
    return 4 if getattr(model, "is_loaded_in_4bit", False) else 8 if getattr(model, "is_loaded_in_8bit", False) else 0


def _sharded(cfg) -> bool:
    """FSDP or DeepSpeed ZeRO-3: Axolotl's qlora keeps one dtype there (no k-bit preparation)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return cfg.fsdp_config is not None or cfg.fsdp is not None or is_deepspeed_zero3_enabled()


def _checkpointing_kwargs(cfg) -> dict:
    """`gradient_checkpointing_kwargs` as given; unset (Axolotl fills it in, except under `rl` or
    `unfrozen_parameters`), the default that Axolotl's Trainer applies when training starts."""
    kwargs = cfg.gradient_checkpointing_kwargs
    return {"use_reentrant": False} if kwargs is None else kwargs


def _prepare_kbit(model, checkpointing: bool, checkpointing_kwargs: dict, as_axolotl_does: bool):
    """PEFT's `prepare_model_for_kbit_training`. `as_axolotl_does`: the one Axolotl calls for qlora, looked up at call
    time in `peft.utils.other`, where Axolotl's `embeddings_skip_upcast` patch may have replaced it (it then leaves
    the embeddings and head in their dtype, for the conversion to `torch_dtype` that follows); else PEFT's own, bound
    in `peft` before any patch, which upcasts every unquantised parameter (nothing is converted back after it)."""
    import peft
    import peft.utils.other

    prepare = peft.utils.other.prepare_model_for_kbit_training if as_axolotl_does else peft.prepare_model_for_kbit_training
    return prepare(model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=checkpointing_kwargs)


def _refuse_gatera_options_on_the_command_line() -> None:
    """`axolotl train x.yml --gatera-entropy-weight=0.2` (also `python -m axolotl.cli.main train ...`): the `axolotl`
    command knows only Axolotl's own config options and hands the others to the launcher (click's extra arguments),
    where `--launcher python` dropped them without a word (the run trained with the YAML's value) and accelerate
    refuses them as unrecognized. Refused, naming the YAML key to set instead. (`python -m axolotl.cli.train x.yml
    --gatera_entropy_weight=0.2`, a fire command line without a click context, reads them into the config.)"""
    import click

    context = click.get_current_context(silent=True)
    given = [arg for arg in (context.args if context is not None else ())
             if isinstance(arg, str) and arg.startswith(("--gatera-", "--gatera_"))]
    if given:
        keys = ", ".join(f"`{arg.split('=', 1)[0][2:].replace('-', '_')}`" for arg in given)
        raise ValueError(f"{' '.join(given)}: the `axolotl` command passes on only Axolotl's own options, not a "
                         f"plugin's (this one would be ignored). Set {keys} in the YAML instead.")


class GateRAPlugin(BasePlugin):
    """Axolotl plugin for `adapter: gatera`."""

    def register(self, cfg: dict):
        _refuse_gatera_options_on_the_command_line()
        _patch_quantization_config()  # inert unless adapter == "gatera"
        if cfg.get("axolotl_config_path"):
            _CONFIG_AS_WRITTEN[cfg["axolotl_config_path"]] = frozenset(k for k, v in cfg.items() if v is not None)

    def _registered_twice(self) -> bool:
        """Whether another instance of this plugin came first (listed under `plugins:` by its module path as well as
        found through the entry point: Axolotl tells them apart by name), so that only one declares the YAML keys."""
        from axolotl.integrations.base import PluginManager

        first = next((p for p in PluginManager.get_instance().plugins.values() if isinstance(p, GateRAPlugin)), self)
        return first is not self

    def get_input_args(self) -> str | None:
        return None if self._registered_twice() else "gatera_plugin.integrations.axolotl.GateRAArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [] if self._registered_twice() else [AdapterCapabilities(name=ADAPTER, lora_like=False, relora=False)]

    def post_model_build(self, cfg, model):
        """A bitsandbytes base: `prepare_model_for_kbit_training` here, where Axolotl prepares a `qlora` base (its
        post-load setup runs next), so that Axolotl's conversion of norms, embeddings and the output head back to
        `torch_dtype` (`should_convert_embedding_dtypes`) comes after it, as for qlora. Prepared in `load_adapter`,
        after that conversion, they stayed fp32: twice their memory, and fp32 activations out of bf16 norms' place.
        Under FSDP or ZeRO-3 `load_adapter` still prepares (Axolotl skips the preparation for qlora there and keeps
        one dtype; GateRA's sharded 4-bit runs are tested as they are)."""
        if cfg.adapter != ADAPTER or not _kbit_bits(model) or _sharded(cfg) or getattr(
                model, "_axolotl_staged_nf4", False) or getattr(model, "_moe_experts_quantized", False):
            return
        checkpointing = bool(cfg.gradient_checkpointing) and not cfg.inference
        _prepare_kbit(model, checkpointing, _checkpointing_kwargs(cfg), as_axolotl_does=True)
        model._gatera_kbit_prepared = True

    def load_adapter(self, model, cfg, inference: bool = False, config_only: bool = False):
        self._load_into_trainer = None  # (set below for this run only)
        if cfg.adapter != ADAPTER:
            return None
        from peft import PeftModel, get_peft_model

        config = gatera_config_from_axolotl(cfg, model)
        if config_only:  # `rl: dpo`, `ipo`, `kto`: TRL builds the adapter inside its trainer from this config
            if cfg.lora_model_dir:  # the saved adapter's own config, and its weights once the trainer exists
                config = _continued_config(cfg.lora_model_dir, cfg, config)
                config.inference_mode = False
                self._load_into_trainer = str(cfg.lora_model_dir)
            return None, config
        inference = inference or bool(cfg.inference)
        checkpointing = bool(cfg.gradient_checkpointing) and not inference
        checkpointing_kwargs = _checkpointing_kwargs(cfg)
        bits = _kbit_bits(model)
        LOG.info("GateRA on a %s base model", f"{bits}-bit (bitsandbytes)" if bits else "full-precision")
        if bits and not getattr(model, "_gatera_kbit_prepared", False):  # (else: post_model_build, checkpointing too)
            model = _prepare_kbit(model, checkpointing, checkpointing_kwargs, as_axolotl_does=False)
        elif checkpointing and not bits:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        # PEFT's default keeps the adapter in fp32 on a half-precision base; `peft_autocast_adapter_dtype: false` keeps
        # it in the base's dtype (GateRA's gates are returned to fp32 for training either way)
        autocast = {} if cfg.peft_autocast_adapter_dtype is None else {
            "autocast_adapter_dtype": bool(cfg.peft_autocast_adapter_dtype)}
        if cfg.lora_model_dir:
            config = _continued_config(cfg.lora_model_dir, cfg, config, training=not inference)
            LOG.info("Loading GateRA adapter from %s", cfg.lora_model_dir)
            # `lora_on_cpu` (e.g. merging a large model's adapter): the adapter's weights load onto the CPU, as
            # Axolotl loads a LoRA adapter's
            on_cpu = {"max_memory": {"cpu": "256GiB"}, "device_map": {"": "cpu"}} if cfg.lora_on_cpu else {}
            peft_model = PeftModel.from_pretrained(model, cfg.lora_model_dir, config=config, is_trainable=not inference,
                                                   **autocast, **on_cpu)
            return peft_model, peft_model.peft_config["default"]
        peft_model = get_peft_model(model, config, **autocast)
        if not inference:
            peft_model.print_trainable_parameters()
        return peft_model, config

    def post_trainer_create(self, cfg, trainer):
        """Load the adapter of `lora_model_dir` into the one TRL built from its config (`rl: dpo`, `ipo`, `kto`;
        e.g. DPO after SFT). Axolotl loads `lora_model_dir` only where it builds the adapter itself, so without this
        a gated adapter, which cannot be merged into the base first, would start from scratch without a word."""
        source = getattr(self, "_load_into_trainer", None)
        if cfg.adapter != ADAPTER or source is None:
            return
        from peft import PeftModel

        model = trainer.model
        if not isinstance(model, PeftModel):
            raise RuntimeError(f"`lora_model_dir` ({source}): the trainer holds no PEFT model to load it into.")
        # into TRL's tensors as they are (TRL may have cast them to bf16: QLoRA's recipe, ZeRO-3's single dtype)
        result = model.load_adapter(source, adapter_name=model.active_adapter, is_trainable=True,
                                    autocast_adapter_dtype=False)
        if result.missing_keys:
            raise ValueError(f"`lora_model_dir` ({source}) lacks adapter tensors: {result.missing_keys[:5]} ...")
        LOG.info("Loading GateRA adapter from %s into the adapter %s built", source, type(trainer).__name__)
        self._load_into_trainer = None
