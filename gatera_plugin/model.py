"""`GateRAModel`: PEFT's tuner for GateRA (injection, merging rules, loading checks, penalty context)."""

from __future__ import annotations

import copy
import inspect
import math
import re
import warnings
from contextlib import contextmanager
from typing import Optional

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
    find_parameter_name_by_module,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from peft.utils.other import get_pattern_key
from torch import nn
from transformers import PreTrainedModel

from ._registration import PREFIX
from .config import GateRAConfig
from .fsdp import refuse_tensor_parallel
from .gates import GATES_BY_STATS_KIND, make_structure_gate, make_token_gate
from .layer import MIXED_BATCHES_REFUSED, SUPPORTED_LAYERS, GateRALayer, _unmergeable_message, dispatch_default
from .ops._autocast import HALF_DTYPES
from .penalty import ForwardBatch, GateStats, PenaltyRun, collective_device, statistics_dtype, warn_of_unread_mask

# torch's checkpoint_wrapper (FSDP's activation checkpointing: `fsdp_config={"activation_checkpointing": True}`,
# Axolotl's `fsdp_activation_checkpointing`) puts a module of this name between a layer and its children. Its state-dict
# hooks leave the name out of the keys; PEFT 0.21's adapter key prefixes keep it, then match no key, and the adapter
# saves empty (LoRA as well).
_WRAPPER_NAMES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def adapter_tensors(model: nn.Module, adapter_name: str) -> list[torch.Tensor]:
    """The tensors (parameters and persistent buffers) that the GateRA layers of `model` hold for `adapter_name`,
    found from the layers themselves, independently of any naming."""
    tensors = []
    for module in model.modules():
        if not isinstance(module, GateRALayer):
            continue
        for attr in module.adapter_layer_names:
            container = getattr(module, attr, None)
            if container is None or adapter_name not in container:
                continue
            entry = container[adapter_name]
            tensors.extend(entry.state_dict(keep_vars=True).values() if isinstance(entry, nn.Module) else [entry])
    return tensors


_FORWARD_SIGNATURES: dict[type, inspect.Signature] = {}  # a module class -> its forward's signature (with self)


def _inputs_by_name(module: nn.Module, args: tuple, kwargs: dict) -> Optional[dict]:
    """A forward's arguments given by position and by name, as one dict by parameter name (its `**kwargs` merged in),
    where the forward names its inputs (`input_ids` / `inputs_embeds`); else None (a `forward(*args)` wrapper)."""
    cls = type(module)
    signature = _FORWARD_SIGNATURES.get(cls)
    try:
        if signature is None or "forward" in vars(module):
            signature = inspect.signature(getattr(module.forward, "__func__", cls.forward))
            if "forward" not in vars(module):
                _FORWARD_SIGNATURES[cls] = signature
        bound = signature.bind_partial(module, *args, **kwargs).arguments
    except (TypeError, ValueError):  # (no signature, or one these arguments do not fit: the forward itself says so)
        return None
    named = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named if "input_ids" in named or "inputs_embeds" in named else None


def _adapter_parameters(model: nn.Module, adapter_name: str) -> list[torch.Tensor]:
    """The parameters of `adapter_tensors(model, adapter_name)`, in its order."""
    return [t for t in adapter_tensors(model, adapter_name) if isinstance(t, nn.Parameter)]


def adapter_key_prefixes(model: nn.Module, adapter_name: Optional[str] = None) -> set[str]:
    """PEFT's state-dict key prefixes of the adapter tensors, named as `model.state_dict()` names them (without the
    names of wrapper modules)."""
    prefixes = set()
    for prefix in _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name):
        for wrapper in _WRAPPER_NAMES:  # whole dotted parts only
            prefix = ("." + prefix).replace("." + wrapper, ".")[1:]
        prefixes.add(prefix)
    return prefixes


class UnreachedExpertsWarning(UserWarning):
    """A model's fused expert weights (3-D parameters) stay frozen: GateRA adapts modules, not bare parameters."""


class FrozenHeadWarning(UserWarning):
    """A sequence-classification head is neither trained in full nor left alone knowingly (see the message)."""


def fused_expert_parameters(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameters of 3 or more dimensions outside convolutions: the fused experts of transformers-5 MoE models.

    transformers 5 holds the experts of e.g. Mixtral, Qwen2/3-MoE, OLMoE and GPT-OSS as one `nn.Parameter` of shape
    (experts, d_out, d_in) per projection (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), applied with
    `F.linear` / `@` inside the experts' forward: no `nn.Linear` exists for a target to reach. Returns
    {parameter name: shape}.
    """
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, GateRALayer)):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param.ndim >= 3:
                found[f"{module_name}.{param_name}" if module_name else param_name] = tuple(param.shape)
    return found


def _group_by_layer(names) -> dict[str, list[str]]:
    """{'model.layers.*.mlp.experts.down_proj': [names]}: layer indices replaced by `*`."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(name)
    return groups


def warn_unreached_parameters(model: nn.Module, config: GateRAConfig) -> None:
    """Warn (naming them) about fused expert parameters no target can reach and about an untrained classifier head.

    Called after injection in training mode (not when an adapter is loaded for inference); docs/method.md, section
    "Mixture-of-experts models and classification heads".
    """
    experts = fused_expert_parameters(model)
    if experts:
        groups = _group_by_layer(experts)
        listed = "; ".join(f"{pattern} ({len(names)}x, shape {experts[names[0]]})" for pattern, names in groups.items())
        leaves = {pattern.rsplit(".", 1)[-1] for pattern in groups}
        suggestion = sorted({pattern.rpartition(".*.")[2] for pattern in groups})
        targets = config.target_modules
        named = sorted(leaves & set(targets)) if isinstance(targets, set) else []
        named_note = (
            f" `target_modules` names {named}, which here are expert parameters, not modules: they matched nothing "
            "inside the experts." if named else ""
        )
        adapted = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, GateRALayer)})
        warnings.warn(
            f"This model holds fused expert weights as {len(experts)} bare 3-D parameters, which GateRA cannot adapt "
            f"(it wraps modules: {SUPPORTED_LAYERS}): {listed}. They stay frozen; GateRA adapts only the modules "
            f"{adapted}.{named_note} Choices: (1) train without the experts knowingly and silence this with "
            "`warnings.filterwarnings('ignore', category=gatera_plugin.UnreachedExpertsWarning)`; (2) to adapt the "
            f"experts, use PEFT's LoRA, e.g. `LoraConfig(target_parameters={suggestion})`; GateRA refuses "
            "`target_parameters`. See docs/method.md, section \"Mixture-of-experts models and "
            "classification heads\".",
            UnreachedExpertsWarning,
            stacklevel=2,
        )
    _warn_untrained_classifier_head(model, config)


def _decoder_of(model: nn.Module) -> Optional[nn.Module]:
    """The decoder stack of an encoder-decoder model (T5, BART: `config.is_encoder_decoder`), else None."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, nn.Module) and decoder is not model else None


# cross-attention modules (T5; BART, Whisper, ...; BERT2BERT, GPT-2; T5Gemma, ProphetNet; NLLB-MoE; Pix2Struct) and
# their key and value projections, which read the encoder's output (its query and output projection read the decoder's)
CROSS_ATTENTION_NAMES = ("EncDecAttention", "encoder_attn", "crossattention", "cross_attn", "cross_attention",
                         "encoder_decoder_attention")
KEY_VALUE_NAMES = ("k", "v", "k_proj", "v_proj", "key", "value", "key_proj", "value_proj", "c_attn")


def _reads_encoder_states(name: str) -> bool:
    """Whether the decoder's module `name` reads the encoder's output: a cross-attention's key and value projections
    (GPT-2's `c_attn` there is the two fused)."""
    parts = name.split(".")
    return parts[-1] in KEY_VALUE_NAMES and any(
        marker.lower() in part.lower() for part in parts[:-1] for marker in CROSS_ATTENTION_NAMES)


def _decoder_batch(kwargs: dict) -> Optional[ForwardBatch]:
    """An encoder-decoder forward's decoder inputs: their real tokens are `decoder_attention_mask`'s nonzero entries,
    else the positions whose `labels` are not -100 (the decoder's position t predicts label t; a seq2seq collator
    pads labels with -100), else all; None without decoder inputs or labels (the model then makes none, or starts
    from its start token alone)."""
    reference = next((kwargs[key] for key in ("decoder_input_ids", "labels") if isinstance(kwargs.get(key), torch.Tensor)),
                     None)
    embeds = kwargs.get("decoder_inputs_embeds")
    shape = reference.shape if reference is not None else embeds.shape[:-1] if isinstance(embeds, torch.Tensor) else None
    if shape is None or len(shape) != 2:
        return None
    mask, labels = kwargs.get("decoder_attention_mask"), kwargs.get("labels")
    if not (isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(shape)):
        mask = labels != -100 if isinstance(labels, torch.Tensor) and tuple(labels.shape) == tuple(shape) else None
    return ForwardBatch(mask.bool() if mask is not None else None, shape.numel())


def _warn_untrained_classifier_head(model: nn.Module, config: GateRAConfig) -> None:
    """A classification model (no output embeddings, a `score` / `classifier` head) whose head is not trained in full.

    PEFT trains the head in full only with `task_type="SEQ_CLS"` or "TOKEN_CLS" (or `modules_to_save`); otherwise it stays as loaded
    (random if the checkpoint had none), or, with "all-linear", gets a GateRA branch over its random weight.
    """
    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is not None:
        return
    head_name = next((name for name in SEQ_CLS_HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)), None)
    if head_name is None:
        return
    if any(name == head_name or name.endswith(f".{head_name}") for name in (config.modules_to_save or ())):
        return
    if config.task_type in ("SEQ_CLS", "TOKEN_CLS"):  # PEFT trains the head in full (TOKEN_CLS names it after this)
        return
    head = getattr(model, head_name)
    state = "gets a GateRA branch over its frozen weight" if isinstance(head, GateRALayer) else "stays frozen"
    warnings.warn(
        f"{type(model).__name__}'s head `{head_name}` is not trained in full: it {state}, so a newly initialised head "
        f"keeps its random weights. Set `task_type=\"SEQ_CLS\"` in GateRAConfig (PEFT then trains `{head_name}` in "
        f"full and excludes it from \"all-linear\") or `modules_to_save=[\"{head_name}\"]`. See docs/method.md, "
        "section \"Mixture-of-experts models and classification heads\".",
        FrozenHeadWarning,
        stacklevel=2,
    )


def _gate_tensor_names(config: GateRAConfig) -> set[str]:
    """The names of the tensors that a layer's gates hold under `config` (`weight` and `bias`, `threshold`, `alpha`)."""
    gates = (make_token_gate(config.gate, 1, config), make_structure_gate(config))
    return {name for gate in gates if gate is not None for name, _ in gate.named_parameters()}


def _refuse_adapter_name(model: nn.Module, adapter_name: str, configs: dict) -> None:
    """Before `adapter_name` (config in `configs`, {name: config}) is injected: refuse a name that PEFT's save would
    confuse with the model's own keys. PEFT saves each adapter without the keys that hold another adapter's name, so
    refused are: a name that is also a module name (a part of a dotted module path), or the last part of a tensor's
    name (`weight`, `bias`, a gate's `threshold`, ...) of the model or of the adapter's gates; and gates whose tensors
    are named like another adapter. (Entries of per-adapter dicts, GateRA's `gatera_A.<name>` or PEFT's
    `trainable_tokens_delta.<name>`, end in their adapter's name by design.) The modules are walked once."""
    from peft.tuners._buffer_dict import BufferDict

    module_clash = tensor_clash = None
    if adapter_name in (*GateRALayer.adapter_layer_names, "base_layer"):  # (the layers that will hold them)
        module_clash = f"<layer>.{adapter_name}"
    for module_name, module in model.named_modules():
        if module_clash is None and adapter_name in module_name.split("."):
            module_clash = module_name
        if (tensor_clash is None and not isinstance(module, (nn.ParameterDict, BufferDict))
                and (adapter_name in module._parameters or adapter_name in module._buffers)):
            tensor_clash = f"{module_name}.{adapter_name}".lstrip(".")
    if module_clash is not None:
        raise ValueError(
            f"adapter_name {adapter_name!r} is also the name of modules of this model (e.g. {module_clash!r}). "
            "PEFT saves an adapter without every tensor whose key holds another adapter's name, so the other "
            f"adapters would be saved without their tensors under '.{adapter_name}.'. Choose another adapter name."
        )
    gate_names = _gate_tensor_names(configs[adapter_name])
    if tensor_clash is None and adapter_name in gate_names:
        tensor_clash = f"<layer>.{PREFIX}gate.{adapter_name}.{adapter_name}"
    if tensor_clash is not None:
        raise ValueError(
            f"adapter_name {adapter_name!r} is also the name of tensors of this model (e.g. {tensor_clash!r}). PEFT "
            "saves an adapter without every tensor whose key ends in another adapter's name, so the adapters would be "
            f"saved without their tensors named {adapter_name!r}. Choose another adapter name."
        )
    taken = sorted(gate_names & (set(configs) - {adapter_name}))
    if taken:
        raise ValueError(
            f"Adapter {adapter_name!r}'s gates hold tensors named {taken}, and so are adapter(s) {taken} of this model. "
            "PEFT saves an adapter without every tensor whose key ends in another adapter's name, so this adapter "
            f"would be saved without its {taken} tensors. Give the adapter(s) {taken} another name (save them and "
            "load them under it)."
        )


def _remove_from_layers(model: nn.Module, adapter_name: str) -> None:
    """Remove `adapter_name`'s entries from the GateRA layers that hold them (an adapter refused half-way), changing
    nothing else: a layer wrapped for it alone is its base layer again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GateRALayer) and adapter_name in module.gatera_A:
            module.delete_adapter(adapter_name)
            if not module.gatera_A:
                _unwrap(model, name, module)


def _unwrap(model: nn.Module, name: str, layer: GateRALayer) -> None:
    """Put the base layer of `layer`, a GateRA layer left without adapters, back in its place `name` in `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer.base_layer)  # (another tuner's layer below stays)


class GateRAModel(BaseTuner):
    """
    Creates a GateRA model from a pretrained transformers model; built by `get_peft_model` / `PeftModel` from a
    `GateRAConfig`.

    Example:

        ```py
        >>> import gatera_plugin  # registers GateRA with PEFT
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, gatera_plugin.GateRAConfig(r=32, target_modules=["q_proj", "v_proj"]))
        ```

    Besides PEFT's tuner duties it owns the `PenaltyRun` its gated layers share: a forward pre-hook on the wrapped
    model (and on its backbone, which some trainers call directly) records each batch's attention mask (padding is
    excluded from the entropy penalty and the statistics).
    """

    prefix: str = PREFIX
    tuner_layer_cls = GateRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        # set before injection: `_create_and_replace` hands it to every new layer
        self.penalty_run = PenaltyRun()
        refuse_tensor_parallel(model)
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._in_forward = False  # inside the wrapped model's forward, whose inputs are already recorded
        self._checkpointing_modules: Optional[list[nn.Module]] = None  # found on the first forward with gradient
        self._checked_gate_dtypes = False  # `_warn_of_half_gates` ran (first training forward outside a Trainer)
        self._batch_hooks = [
            self.model.register_forward_pre_hook(self._record_batch, with_kwargs=True),
            self.model.register_forward_hook(self._leave_forward, always_call=True),
        ]
        backbone = getattr(self.model, "base_model", self.model)  # transformers' backbone (e.g. LlamaModel)
        if isinstance(backbone, nn.Module) and backbone is not self.model:
            # trainers that call the backbone directly (TRL's distillation) bypass the wrapped model's forward
            self._batch_hooks.append(backbone.register_forward_pre_hook(self._record_backbone_batch, with_kwargs=True))

    # ----------------------------------------------------------------------------------------------- injection
    def _create_and_replace(self, config: GateRAConfig, adapter_name, target, target_name, parent, current_key):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), current_key), config.r)
        lora_alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), current_key), config.lora_alpha)
        if isinstance(target, GateRALayer):
            target.update_layer(adapter_name, r, lora_alpha, config)
            return
        new_module = self._create_new_module(config, adapter_name, target, r=r, lora_alpha=lora_alpha)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: GateRAConfig, adapter_name: str, target: nn.Module, **kwargs) -> nn.Module:
        from peft.import_utils import is_bnb_4bit_available, is_bnb_available

        dispatchers = []
        if is_bnb_available():
            from .bnb import dispatch_bnb_8bit

            dispatchers.append(dispatch_bnb_8bit)
        if is_bnb_4bit_available():
            from .bnb import dispatch_bnb_4bit

            dispatchers.append(dispatch_bnb_4bit)
        dispatchers.append(dispatch_default)
        for dispatcher in dispatchers:
            new_module = dispatcher(target, adapter_name, config=config, **kwargs)
            if new_module is not None:
                return new_module
        raise ValueError(
            f"GateRA cannot adapt target module of type {type(target).__name__} ({target}). Supported layer types: "
            f"{SUPPORTED_LAYERS}. Remove it from `target_modules` (or add it to `exclude_modules`)."
        )

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        if isinstance(new_module, GateRALayer):  # (PEFT's unload puts a plain base layer back through here too)
            new_module.penalty_run = self.penalty_run
        device = child.weight.device
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device.type == "meta" for p in module.parameters()):
                module.to(device)

    def inject_adapter(self, model, adapter_name, *args, **kwargs) -> None:
        _refuse_adapter_name(model, adapter_name, self.peft_config)
        _check_token_indices(model, self.peft_config[adapter_name])
        trainable = [(param, param.requires_grad) for param in model.parameters()]
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception as error:
            # (nothing of a refused adapter stays in the layers: PEFT drops its config, this its layers' entries, which
            # would otherwise make the name clash with modules of the model when the adapter is added again, and the
            # other adapters' parameters are as trainable as before (each layer it reached re-activated them))
            try:
                _remove_from_layers(model, adapter_name)
                for param, requires_grad in trainable:
                    param.requires_grad_(requires_grad)
            except Exception as cleanup:  # noqa: BLE001  (the refusal is what the user needs to see)
                error.add_note(f"(Removing {adapter_name!r} from the layers it reached failed too: {cleanup!r}.)")
            raise
        self._count_gated_layers()  # also reached by `PeftModel.add_adapter`
        config = self.peft_config[adapter_name]
        if not config.inference_mode:  # training: say what the targets did not reach
            warn_unreached_parameters(self.model, config)

    def _check_tied_modules(self, model: nn.Module, peft_config: GateRAConfig) -> None:
        """As PEFT's, but with `ensure_weight_tying` a `modules_to_save` entry naming the input embedding or a layer
        tied to it counts whatever the model calls them (PEFT looks for `embed_tokens` / `lm_head` only: a saved
        GPT-2 adapter names `transformer.wte` and would reload untied). Tying state left on a reused config by an
        earlier model is dropped first."""
        peft_config.modules_to_tie = None
        tied = self._get_module_names_tied_with_embedding() if peft_config.ensure_weight_tying else []
        targeted = [name for name in tied if self._check_target_module_exists(peft_config, name)]
        if targeted:
            self._refuse_tied_target(targeted[0])
        embedding = _embedding_name(model)
        if tied and embedding and any(_names_module(entry, module) for entry in peft_config.modules_to_save or []
                                      for module in (embedding, *tied)):
            self._add_modules_to_save_to_tie(peft_config, tied)
            return
        super()._check_tied_modules(model, peft_config)

    def _add_targets_to_tie(self, peft_config: GateRAConfig, tied_weight_keys: list[str]) -> None:
        """PEFT calls this while injecting under `ensure_weight_tying` when `target_modules` names an embedding layer
        (LoRA then ties the adapters of the embedding and the layers tied to it). A tied head among the targets was
        refused before (`_check_tied_modules`); the input embedding itself gets the refusal of an `Embedding` target,
        which GateRA cannot adapt, at injection."""
        return None

    @staticmethod
    def _refuse_tied_target(head: str) -> None:
        """`ensure_weight_tying` with a layer tied to the input embedding (`lm_head`) in `target_modules`: GateRA adapts
        linear layers, not the embedding, so the two cannot share an adapter (PEFT warned and built it untied)."""
        raise ValueError(
            f"`ensure_weight_tying=True` with the tied {head!r} in `target_modules`: GateRA cannot adapt the input "
            f"embedding that {head!r} is tied to (it adapts linear layers), so the two cannot share an adapter. Leave "
            f"{head!r} out of `target_modules`, or set ensure_weight_tying=False to adapt the output head alone (its "
            "adapter then cannot be merged while the weights stay tied)."
        )

    def _add_modules_to_save_to_tie(self, peft_config: GateRAConfig, tied_weight_keys: list[str]) -> None:
        """`ensure_weight_tying` on a tied model whose `modules_to_save` names a tied embedding (PEFT calls this while
        injecting): the input embedding's copy is the one trained and saved, and the layers tied to it
        (`tied_weight_keys`, module names such as `lm_head`) read that copy (PEFT's `modules_to_tie`) instead of
        training copies of their own."""
        embedding = _embedding_name(self.model)
        kept = [entry for entry in peft_config.modules_to_save or []
                if not any(_names_module(entry, key) for key in tied_weight_keys)]
        if not any(_names_module(entry, embedding) for entry in kept):
            kept.append(embedding)
        peft_config.modules_to_save = kept
        peft_config.modules_to_tie = set(tied_weight_keys)

    def _count_gated_layers(self) -> None:
        """Layers per (adapter, gate kind): the `L` each penalty's mean divides by. Also tells the layers in an
        encoder-decoder model's decoder so (`GateRALayer.in_decoder`: they count the decoder's tokens)."""
        counts: dict[tuple[str, str], int] = {}
        decoder = _decoder_of(self.model)
        in_decoder = {id(m) for name, m in decoder.named_modules() if not _reads_encoder_states(name)} if (
            decoder is not None) else set()
        for module in self.model.modules():
            if isinstance(module, GateRALayer):
                module.penalty_run = self.penalty_run
                module.in_decoder = id(module) in in_decoder
                for adapter_name in module.gatera_A:
                    for kind in module._gate_kinds(adapter_name):
                        counts[(adapter_name, kind)] = counts.get((adapter_name, kind), 0) + 1
        self.penalty_run.layer_counts = counts

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._count_gated_layers()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's upcast of a half-precision adapter to fp32, keeping each tensor's `requires_grad`.

        PEFT reassigns a `ParameterDict` entry to upcast it, and `ParameterDict` wraps the new tensor in a fresh,
        trainable `Parameter`: on a bf16 / fp16 base, A and B of an adapter loaded for inference (or added but not
        active) became trainable again.
        """
        tensors = [(t, t.requires_grad) for t in _adapter_parameters(self.model, adapter_name)]
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        for (old, requires_grad), new in zip(tensors, _adapter_parameters(self.model, adapter_name)):
            if new is not old:
                new.requires_grad_(requires_grad)

    # ----------------------------------------------------------------------------------------------- batches
    def _record_batch(self, module, args, kwargs):
        """Forward pre-hook on the wrapped model: remember this batch's attention mask for the gated layers."""
        named = _inputs_by_name(module, args, kwargs) if len(args) > 1 else None
        if named is not None:  # `model(input_ids, attention_mask)`: the inputs by their names
            args, kwargs = (), named
        reference = kwargs.get("input_ids")  # (PEFT's task models pass input_ids=None with inputs_embeds)
        if reference is None:
            reference = kwargs.get("inputs_embeds")
        if reference is None and args and isinstance(args[0], torch.Tensor):
            reference = args[0]
        if reference is None:
            shape = ()
        elif kwargs.get("inputs_embeds") is not None and reference is kwargs["inputs_embeds"]:
            shape = reference.shape[:-1]
        else:
            shape = reference.shape
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:  # (dropped by the trainer after collation: the collated one, if it has it)
            attention_mask = self.penalty_run.collated_mask_for(kwargs.get("position_ids"))
        if reference is None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            reference, shape = attention_mask, attention_mask.shape  # (features, not tokens: Pix2Struct's patches)
        decoder = _decoder_batch(kwargs) if _decoder_of(module) is not None else None
        recorded = self.penalty_run.set_batch(attention_mask, 0 if reference is None else shape.numel(),
                                              kwargs.get("position_ids"), shape, decoder)
        self._in_forward = module is self.model
        if torch.is_grad_enabled():
            if recorded.attention_mask is None and isinstance(attention_mask, torch.Tensor) and self.model.training:
                warn_of_unread_mask(tuple(attention_mask.shape), tuple(shape))
            self._bind_checkpointing()
            if not self._checked_gate_dtypes and self.model.training and not self.penalty_run.in_trainer:
                self._checked_gate_dtypes = True
                self._warn_of_half_gates()

    def _warn_of_half_gates(self) -> None:
        """Outside a Trainer (which upcasts them itself): warn once if trainable gate, structure or magnitude
        parameters are fp16 / bf16 (e.g. `model.to(torch.bfloat16)` after `get_peft_model`), where they stop learning."""
        half = [name for name, param in self._half_gate_parameters() if param.requires_grad]
        if half:
            warnings.warn(
                f"GateRA: {len(half)} trainable gate / structure / magnitude parameters are in half precision (e.g. "
                f"{half[0]}, {self.model.get_parameter(half[0]).dtype}). They sit near 1 and their updates (~ the "
                "learning rate) fall below bf16's resolution there, so they would stop learning. Call "
                "`model.base_model.upcast_gates_to_fp32()` before building the optimizer (transformers' Trainer does "
                "this itself), unless the optimizer keeps fp32 master weights (DeepSpeed bf16, Apex).",
                UserWarning, stacklevel=4,
            )

    def set_loss_scale(self, scale: float) -> None:
        """Tell the penalty the loss scale of a hand-written fp16 loop (`torch.amp.GradScaler`), before each backward.

        The penalty's gradient is added inside backward, where the task loss's gradient is multiplied by the scale;
        without it the scaler's unscale divides the penalty's share by the scale (65536 by default), switching it off.
        `model.base_model.set_loss_scale(scaler.get_scale())`; transformers' Trainer sets it itself.
        """
        number = isinstance(scale, (int, float, torch.Tensor)) and not isinstance(scale, bool)
        value = float(scale) if number and (not isinstance(scale, torch.Tensor) or scale.numel() == 1) else math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"set_loss_scale: the loss scale must be a finite number > 0 (`scaler.get_scale()`), got "
                             f"{scale!r}. Without fp16 loss scaling, do not call it (the scale is 1).")
        self.penalty_run.loss_scale = value

    def _bind_checkpointing(self) -> None:
        """Make transformers' gradient checkpointing replay each region with the forward that ran it.

        `gradient_checkpointing_enable` (called before or after this adapter was added) gives every module with a
        `gradient_checkpointing` attribute a `_gradient_checkpointing_func`; wrapping it once binds the recomputation
        in backward to the batch of its own forward, whatever forwards of this model ran in between.
        """
        if self._checkpointing_modules is None:
            self._checkpointing_modules = [m for m in self.model.modules() if hasattr(m, "gradient_checkpointing")]
        for module in self._checkpointing_modules:
            function = module.__dict__.get("_gradient_checkpointing_func")
            bound_to = getattr(function, "gatera_penalty_run", None)
            if function is not None and bound_to is not self.penalty_run:  # unbound, or bound to a deep copy's source
                unwrapped = function.__wrapped__ if bound_to is not None else function
                module._gradient_checkpointing_func = self.penalty_run.checkpointing(unwrapped)

    def _leave_forward(self, module, args, output):
        self._in_forward = False

    def _record_backbone_batch(self, module, args, kwargs):
        """Forward pre-hook on the backbone: record its batch only when it is called on its own, not by the model."""
        if not self._in_forward:
            self._record_batch(module, args, kwargs)

    FP32_PARAMETERS = ("gatera_gate", "gatera_structure", "gatera_magnitude")

    def upcast_gates_to_fp32(self) -> list[str]:
        """Return half-precision gate, threshold, structure and magnitude parameters to fp32; the names changed.

        TRL casts every trainable parameter of a quantised model to bf16 (QLoRA's recipe for LoRA factors). A gate's
        bias, a threshold, a structure logit or a DoRA magnitude sits at O(1) and its updates are ~lr, below bf16's
        resolution there (2^-8 relative), so in bf16 they would silently stop learning (TRL exempts DoRA's magnitude
        vector for the same reason). Called by the Trainer integration before the first optimizer step, while the
        optimizer holds no state yet.
        """
        changed = []
        for name, param in self._half_gate_parameters():
            param.data = param.data.float()
            changed.append(name)
        return changed

    def _half_gate_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the gate, threshold, structure and magnitude parameters held in fp16 / bf16."""
        return [(name, param) for name, param in self.model.named_parameters()
                if any(part in name for part in self.FP32_PARAMETERS) and param.dtype in HALF_DTYPES]

    # ----------------------------------------------------------------------------------------------- statistics
    def discard_gate_stats(self) -> None:
        """Drop the gate statistics recorded since the last `pop_gate_stats`, on this rank only (no all-reduce)."""
        for module in self.model.modules():
            if isinstance(module, GateRALayer):
                for stats in module.gate_stats.values():
                    stats.pop_tensor()

    def pop_gate_stats(self, per_layer: Optional[bool] = None) -> dict[str, float]:
        """Gate statistics recorded since the last call, as log entries; empty if no gated backward ran.

        Sigmoid gates: `gatera/gate_mean`, `gatera/entropy` (mean `H(g)/log 2` over real tokens and gated layers, in
        [0, 1]), `gatera/gate_open_frac` (fraction > 0.5), `gatera/penalty` (λ · entropy). Threshold gates:
        `gatera/kept_frac` and, always, `gatera/kept_frac/<module>`; `gatera/keep_penalty` with a `keep_ratio`.
        Structure gates: `gatera/structure_mean` (mean σ(α)) and `gatera/structure_penalty` (λ_s · mean σ(α)).
        Per layer (default: the config's `per_layer_stats`) adds `gatera/<stat>/<module>` for every statistic.
        Adapters other than "default" get a `/<adapter>` suffix on the summary keys. Sums are all-reduced across
        data-parallel ranks when torch.distributed is initialised (every rank must call this, as `Trainer.log` does).
        """
        rows = []  # (adapter, kind, module name, GateStats) in a fixed order, so that ranks all-reduce alike
        device = None
        for name, module in self.model.named_modules():
            if isinstance(module, GateRALayer):
                for (adapter_name, kind), stats in module.gate_stats.items():
                    rows.append((adapter_name, kind, name.removeprefix("model."), stats))
                    device = device or module.gatera_A[adapter_name].device
        if not rows:
            return {}
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        device = collective_device(device) if distributed else device
        table = torch.zeros(len(rows), len(GateStats.KEYS), dtype=statistics_dtype(device), device=device)  # (rows, 5)
        for i, row in enumerate(rows):
            sums = row[3].pop_tensor()
            if sums is not None:
                table[i] = sums.to(table.dtype).to(device)  # (a CPU layer's float64 sums, an MPS table)
        if distributed:
            torch.distributed.all_reduce(table)
        table = table.cpu()
        logs: dict[str, float] = {}
        for adapter_name, kind in sorted({(row[0], row[1]) for row in rows}):
            index = [i for i, row in enumerate(rows) if row[:2] == (adapter_name, kind) and table[i, 0] > 0]
            if not index:
                continue
            config = self.peft_config[adapter_name]
            suffix = "" if adapter_name == "default" else f"/{adapter_name}"
            # per-layer means, then their mean: every gated layer weighs the same, as in the penalties
            means = table[index, 1:] / table[index, :1]  # (layers, 4): mean value, mean H/log 2, open fraction, Σ n ḡ² / N
            modules = [rows[i][2] for i in index]
            stats, penalties, always_per_layer = GATES_BY_STATS_KIND[kind].log_entries(means, config)
            show = always_per_layer or (config.per_layer_stats if per_layer is None else per_layer)
            for penalty, value in penalties.items():
                logs[f"gatera/{penalty}{suffix}"] = value
            for stat, values in stats.items():
                logs[f"gatera/{stat}{suffix}"] = values.mean().item()
                if show:
                    for module_name, value in zip(modules, values.tolist()):
                        logs[f"gatera/{stat}{suffix}/{module_name}"] = value
        return logs

    # ----------------------------------------------------------------------------------------------- pruning
    def prune_structure(self, threshold: float, adapter_name: str = "default") -> dict:
        """Remove `adapter_name` from every module whose structure gate σ(α) is below `threshold`.

        Returns `{"kept": [...], "pruned": [...], "values": {module: σ(α)}}`; the adapter's `target_modules` becomes
        the kept modules, so `save_pretrained` then writes the smaller adapter. A module left without adapters is
        unwrapped back to its base layer.
        """
        from .pruning import split_by_threshold

        if adapter_name not in self.peft_config:
            raise ValueError(f"This model has no adapter {adapter_name!r} to prune; it has {list(self.peft_config)}. "
                             "Pass one of them as `adapter_name`.")
        config = copy.copy(self.peft_config[adapter_name])  # the caller's config object may be shared by other models
        if not config.structure_gate:
            raise ValueError(f"Adapter {adapter_name!r} has no structure gates (structure_gate=False): nothing to prune by.")
        layers = {name: module for name, module in self.model.named_modules()
                  if isinstance(module, GateRALayer) and adapter_name in module.gatera_structure}
        if any(adapter_name in module.merged_adapters for module in layers.values()):
            raise ValueError(f"Adapter {adapter_name!r} is merged into the base weights: call `unmerge_adapter()` "
                             "before `prune_structure` (a pruned module would keep its update in the base weight).")
        values = {name: module.gatera_structure[adapter_name]().item() for name, module in layers.items()}
        kept, pruned = split_by_threshold(values, threshold)
        unwrapped = set()  # modules left without adapters (a module another adapter still adapts stays targeted)
        for name in pruned:
            module = layers[name]
            active = [a for a in module.active_adapters if a != adapter_name]
            # (the other adapters stay as trainable as they were: `set_adapter` would make a frozen one trainable here)
            trainable = [(param, param.requires_grad) for param in module.parameters()]
            module.delete_adapter(adapter_name)
            if module.gatera_A:
                module.set_adapter(active)
                for param, requires_grad in trainable:
                    param.requires_grad_(requires_grad)
            else:
                _unwrap(self.model, name, module)
                unwrapped.add(name)
        config.target_modules = set(kept)
        config.layers_to_transform = config.layers_pattern = None
        self.peft_config[adapter_name] = config
        for module in layers.values():
            if adapter_name in module.options:
                module.options[adapter_name] = config
        self.targeted_module_names = [n for n in self.targeted_module_names if n not in unwrapped]
        self._count_gated_layers()
        return {"kept": kept, "pruned": pruned, "values": values}

    # ----------------------------------------------------------------------------------------------- merging
    def _check_mergeable(self, adapter_names: Optional[list[str]], safe_merge: bool) -> None:
        """Refuse, before any layer is merged, a gated adapter (no merged weight exists) and, with `safe_merge`, a
        merged weight holding NaN / inf in any layer (PEFT merges layer by layer, so a NaN in a later layer used to
        leave the earlier ones merged)."""
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            config = self.peft_config.get(name)
            if config is not None and config.is_gated:
                raise ValueError(_unmergeable_message(name, config.gate))
        self._refuse_tied_merge(adapter_names)
        if safe_merge:
            for module in self.model.modules():
                if isinstance(module, GateRALayer):
                    module.refuse_non_finite_merge(_to_merge(module, adapter_names))

    def _refuse_tied_merge(self, adapter_names: Optional[list[str]]) -> None:
        """Refuse to merge into a base weight that another module shares (a tied `lm_head`, whose weight is the input
        embedding's): the merge would change that module too, a silently different model (PEFT only warns)."""
        owners: dict[int, dict[int, str]] = {}  # {id(param): {id(module holding it): its name}}
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            for param_name, param in module._parameters.items():
                if param is not None:
                    owners.setdefault(id(param), {})[id(module)] = f"{module_name}.{param_name}".lstrip(".")
        for name, module in self.model.named_modules():
            if not isinstance(module, GateRALayer) or not _to_merge(module, adapter_names):
                continue
            base = module.get_base_layer()
            shared = [n for holder, n in owners.get(id(base.weight), {}).items() if holder != id(base)]
            if shared:
                raise ValueError(
                    f"{name}'s base weight is also {shared[0]!r} (tied weights, e.g. `tie_word_embeddings`): merging "
                    "the adapter into it would change that module too, so the merged model would not be the adapted "
                    f"one. Untie it first (on the PeftModel: `layer = model.base_model.model.{name}; "
                    "layer.base_layer.weight = torch.nn.Parameter(layer.base_layer.weight.detach().clone()); "
                    "model.config.tie_word_embeddings = False`), or keep the adapter unmerged (load it for inference)."
                )

    def add_weighted_adapter(self, *args, **kwargs):
        """Refused: PEFT's `add_weighted_adapter` is LoRA's (and IA3's) own, not a tuner-wide API."""
        raise NotImplementedError(
            "add_weighted_adapter is not available for GateRA adapters (PEFT implements it for LoRA and IA3 only, by "
            "combining their low-rank factors; a token gate has no such combination). To use several GateRA "
            "adapters, load each with `load_adapter(..., adapter_name=...)` and switch with `set_adapter`; adapters "
            "with gate='none' can be merged into the base with `merge_and_unload(adapter_names=[...])`."
        )

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        self._check_mergeable(adapter_names, safe_merge)
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """PeftModel's forward and generate drop `adapter_names` before the layers see it; refuse it here instead."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(MIXED_BATCHES_REFUSED)
        yield

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        for hook in self._batch_hooks:  # (only once unloaded: a refused merge leaves a model that still trains)
            hook.remove()
        for module in self._checkpointing_modules or ():  # the base's checkpointing as it was (nor our last batch kept)
            function = module.__dict__.get("_gradient_checkpointing_func")
            if getattr(function, "gatera_penalty_run", None) is self.penalty_run:
                module._gradient_checkpointing_func = function.__wrapped__
        return model

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The adapter's entries of `state_dict` (PEFT's selection, with keys named as the state dict names them)."""
        selected = _filter_state_dict_by_key_prefixes(state_dict, adapter_key_prefixes(model))
        selected.update(cls._get_learnable_bias_state_dict(model, state_dict, config))
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Map checkpoint keys to the model and refuse, with a clear message, weights that do not fit this base."""
        expected = _filter_state_dict_by_key_prefixes(model.state_dict(), adapter_key_prefixes(model, adapter_name))
        model_key_of = {}  # checkpoint key (no adapter name) -> model key
        for key in expected:
            saved = cls._remove_adapter_name_from_key(key, adapter_name)
            model_key_of[saved] = key
            if not key.startswith("base_model.model."):  # layers injected without a PeftModel around them
                model_key_of["base_model.model." + saved] = key
        remapped = {model_key_of.get(k, k): v for k, v in state_dict.items()}
        base_name = getattr(config, "base_model_name_or_path", None) or "the model it was trained on"
        model_state = model.state_dict()
        shapes = {}  # checkpoint key -> (its shape, the model's), where they differ (adapter or base tensors)
        for key, value in remapped.items():
            ours = model_state.get(key, model_state.get(key.removeprefix("base_model.model.")))
            if ours is not None and ours.numel() and tuple(value.shape) != tuple(ours.shape):  # (0: ZeRO-3's stub)
                shapes[key] = (tuple(value.shape), tuple(ours.shape))
        from .serialization import ignoring_mismatched_sizes

        ignoring = ignoring_mismatched_sizes.get()
        vocabulary = _resized_vocabulary(model, shapes) if shapes and not ignoring else None
        if vocabulary is not None:
            named = f"; it names {config.base_model_name_or_path}" if getattr(config, "base_model_name_or_path",
                                                                               None) else ""
            raise ValueError(
                f"The GateRA adapter was trained with {vocabulary} tokens and this base model has "
                f"{_embedding_rows(model.get_input_embeddings())}: new tokens resized the embeddings for training (or "
                f"the adapter belongs to another model{named}). Resize the base model first "
                f"(`model.resize_token_embeddings({vocabulary})`, or `len(tokenizer)` with the tokenizer saved beside "
                "the adapter), then load the adapter; if this base was resized on purpose, load with "
                "`ignore_mismatched_sizes=True` (the resized tensors then keep this base's values, as with LoRA)."
            )
        # the adapter's own tensors; other ones (a `modules_to_save` head of another size, ...) are left to PEFT, which
        # skips them under `ignore_mismatched_sizes=True`
        mismatched = [f"{key}: {saved} in the adapter, {ours} in this model" for key, (saved, ours) in shapes.items()
                      if key in expected]
        if mismatched:
            ignored = (" `ignore_mismatched_sizes=True` skips only tensors outside the adapter's own (a resized head "
                       "or embedding): without its own tensors the adapter would not be the trained one.") if ignoring else ""
            raise ValueError(
                f"The GateRA adapter does not fit this base model ({len(mismatched)} tensor(s) differ in shape), so it "
                f"was trained on another model or with another rank. Load it onto {base_name}.{ignored} First "
                "differences:\n  " + "\n  ".join(mismatched[:5])
            )
        model_keys, embeddings = set(model_state), _embedding_names(model)
        unexpected = sorted(k for k in remapped if k not in model_keys and k.removeprefix("base_model.model.") not in model_keys
                            and not _saved_with_resized_embeddings(k, embeddings))
        if unexpected:
            from .serialization import loading_source

            raise ValueError(
                f"{loading_source()} holds {len(unexpected)} tensor(s) that its adapter_config.json does not describe "
                f"(e.g. {unexpected[0]!r}): the config's {_field_of(unexpected[0])} does not match the weights (edited "
                "after the save, or taken from another adapter). Restore the adapter's own adapter_config.json."
            )
        missing = sorted(key for key in expected if key not in remapped)
        if missing:
            raise ValueError(
                f"The GateRA adapter checkpoint lacks {len(missing)} of the {len(expected)} tensors this model expects "
                f"(e.g. {missing[0]!r}; config field {_field_of(missing[0])}): it was saved from another base model or "
                f"configuration, or the file is incomplete. Load it onto {base_name} with its own adapter_config.json."
            )
        return remapped


# What PEFT's wrappers of an embedding layer hold (ModulesToSaveWrapper, TrainableTokensWrapper): with resized
# embeddings (new tokens) PEFT saves their whole state too (`save_embedding_layers="auto"`), adapter name removed.
_EMBEDDING_WRAPPER_PARTS = ("modules_to_save", "original_module", "token_adapter", "base_layer")


def _saved_with_resized_embeddings(key: str, embeddings: set[str]) -> bool:
    """Whether checkpoint `key` is one of the embedding layers' wrapper tensors that PEFT adds to an adapter trained
    with resized embeddings (e.g. `lm_head.modules_to_save.weight`, a copy of the `lm_head.weight` it also saves, or a
    tied head's `token_adapter.trainable_tokens_delta`); `embeddings`: `_embedding_names` of the model. PEFT's own load
    leaves those that the model has no key for unused, as GateRA's does: the tensors the model reads are among the
    adapter's other keys."""
    saved_key = key.removeprefix("base_model.model.")
    return any(saved_key.startswith(name + ".") and saved_key[len(name) + 1:].split(".")[0] in _EMBEDDING_WRAPPER_PARTS
               for name in embeddings)


def _to_merge(layer: GateRALayer, adapter_names: Optional[list[str]]) -> list[str]:
    """The adapters a merge of `adapter_names` (None: the active ones) merges into `layer`: those it holds, unmerged."""
    names = layer.active_adapters if adapter_names is None else adapter_names
    return [name for name in names if name in layer.gatera_A and name not in layer.merged_adapters]


def _names_module(entry: str, module: str) -> bool:
    """Whether a `modules_to_save` entry (a module's name or a suffix of it) names module `module`."""
    return module == entry or module.endswith("." + entry)


def _embedding_layer(model: nn.Module, getter: str = "get_input_embeddings") -> nn.Module | None:
    """`model`'s input embedding layer (its output one with `getter="get_output_embeddings"`); None where it has none."""
    try:
        return getattr(model, getter)()
    except (AttributeError, NotImplementedError):  # (not a transformers model, or one without that layer)
        return None


def _embedding_name(model: nn.Module, getter: str = "get_input_embeddings") -> str:
    """The module name in `model` of the layer `_embedding_layer` returns; "" where it has none."""
    layer = _embedding_layer(model, getter)
    return find_parameter_name_by_module(model, layer) if layer is not None else ""


def _embedding_names(model: nn.Module) -> set[str]:
    """Module names of `model`'s input and output embeddings, without PeftModel's `base_model.model.` prefix."""
    names = {_embedding_name(model, getter) for getter in ("get_input_embeddings", "get_output_embeddings")}
    return {name.removeprefix("base_model.model.") for name in names if name}


def _embedding_rows(layer: nn.Module) -> int | None:
    """Rows of an embedding layer, of the one a PEFT wrapper holds, or of a ZeRO-3-partitioned one (`ds_shape`);
    None where unknown."""
    weight = getattr(getattr(layer, "original_module", layer), "weight", None)
    if weight is None:
        return None
    rows = getattr(weight, "ds_shape", weight.shape)[0]
    return int(rows) if rows else None


def _check_token_indices(model: nn.Module, config: GateRAConfig) -> None:
    """Refuse `trainable_token_indices` beyond an embedding's rows (PEFT would fail deep inside with an IndexError):
    typically an adapter trained with new tokens loaded onto the base model before its embeddings were resized."""
    indices = config.trainable_token_indices
    if not indices:
        return
    if not isinstance(indices, dict):
        layer = _embedding_layer(model)
        layers = {} if layer is None else {find_parameter_name_by_module(model, layer): (layer, indices)}
    else:
        layers = {name: (module, indices[key]) for key in indices for name, module in model.named_modules()
                  if _names_module(key, name)}
    for name, (layer, wanted) in layers.items():
        rows = _embedding_rows(layer)
        if rows is not None and wanted and max(wanted) >= rows:
            raise ValueError(
                f"`trainable_token_indices` holds token {max(wanted)}, but {name or 'the input embedding'} has {rows} "
                "rows. An adapter trained with new tokens needs the base model resized first "
                "(`model.resize_token_embeddings(len(tokenizer))` with the tokenizer that added them, saved beside the "
                f"adapter); otherwise choose indices below {rows}."
            )


def _resized_vocabulary(model: nn.Module, shapes: dict) -> int | None:
    """The adapter's number of embedding rows where every mismatch in `shapes` ({key: (the adapter's shape, this
    model's)}) is one of the vocabulary dimension against this model's input embedding (new tokens resized it for
    training), else None."""
    layer = _embedding_layer(model)
    rows = _embedding_rows(layer) if layer is not None else None
    if rows is None:
        return None
    vocabulary = {saved[0] for saved, _ in shapes.values()}
    if len(vocabulary) == 1 and all(ours[0] == rows and saved[1:] == ours[1:] for saved, ours in shapes.values()):
        return vocabulary.pop()
    return None


def _field_of(key: str) -> str:
    """The config field that decides whether the tensor `key` exists."""
    for part, name in ((".gatera_gate.", "`gate`"), (".gatera_structure.", "`structure_gate`"),
                       (".gatera_magnitude.", "`branch`"), (".gatera_A.", "`target_modules` / `exclude_modules` / "
                       "`layers_to_transform`"), (".gatera_B.", "`target_modules` / `exclude_modules`")):
        if part in key + ".":
            return name
    return "`modules_to_save` / `trainable_token_indices`"
