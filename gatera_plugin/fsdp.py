"""GateRA under PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`, accelerate's `fsdp_version: 2`).

Nothing GateRA-specific is needed for training when FSDP wraps whole transformer blocks (accelerate's
`TRANSFORMER_BASED_WRAP`, the default): a GateRA layer and its base layer are then in one FSDP unit, whose
parameters FSDP gathers before the unit's forward and, through its pre-backward hook, again before the unit's
backward (also when gradient checkpointing recomputes the forward), and frees after each. The HiRA branch reads W0
only inside those windows: in forward, and in its memory-lean backward through `layer.base_weight` (a bound method,
so the autograd function keeps no reference to the gathered weight). Outside them W0 is a sharded `DTensor`;
`unsharded_weight` turns a read of one into a clear error instead of a deep DTensor traceback.

Installed on `import gatera_plugin`, two `transformers.Trainer` wrappers, inert unless the model holds a GateRA
adapter and FSDP is on:

- `create_accelerator_and_postprocess` refuses FSDP1 (see `refuse_fsdp1`) and, for FSDP2, makes GateRA's trainable
  parameters fp32 (`upcast_trainable_to_fp32`);
- `save_model` writes the full adapter, gates included, whatever `fsdp_state_dict_type`: every rank takes part in
  gathering the adapter's parameters (never the frozen base, except the embedding layers that PEFT saves with an
  adapter after new tokens resized them), then only the main process writes the files, through
  PEFT's `save_pretrained` (atomic, `serialization.py`). Without this, `SHARDED_STATE_DICT` runs would save no
  adapter at all, and `FULL_STATE_DICT` runs would gather the whole base model onto rank 0 to keep only the adapter.
  Checkpoints keep the Trainer's own FSDP files (model and optimizer shards) beside the adapter for resuming.

Outside a Trainer, `model.save_pretrained(out, is_main_process=rank == 0)` on a sharded GateRA model gathers the
adapter the same way (`serialization.py` calls `adapter_state_dict`); like any collective, call it on every rank.

Under DeepSpeed ZeRO-3 the same `save_model` wrapper adds to ZeRO-3's consolidated state dict (which leaves frozen
parameters out for a PEFT model) the resized embedding layers that PEFT saves with an adapter
(`zero3_saves_keep_resized_embeddings`).

The penalty needs nothing: `trainer_integration` counts the step's real tokens on all ranks (accelerate's gather),
and FSDP averages gradients over ranks like DDP.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Optional
from unittest import mock

import torch
from peft.utils import get_peft_model_state_dict
from torch import nn

from ._registration import PREFIX

_MARK = "__gatera_fsdp_wrapped__"


@functools.cache
def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


SHARDED_BASE_FIX = (
    "GateRA supports neither tensor parallelism nor adding an adapter to an already sharded model: load the base "
    "without `tp_plan` (or a `distributed_config` with `tp_size` or `fsdp_size`) and shard it with FSDP2 or DeepSpeed "
    "ZeRO-3, which the Trainer applies after `peft_config` has added the adapter (README, 'DeepSpeed ZeRO-2/3 and "
    "FSDP2')."
)


def refuse_tensor_parallel(model: nn.Module) -> None:
    """A clear error for a base model loaded with transformers' tensor parallelism (`tp_plan`, `tp_size`).

    It leaves each rank a slice of a projection's weight (rows or columns) and so a slice of its output or input,
    as DTensors or, for the `local_*` plan styles, as plain tensors; GateRA's branch and gate (full-size A, B and a
    gate over the whole input) would adapt a slice as if it were the layer.
    """
    tp_size = getattr(model, "tp_size", None) or getattr(model, "_tp_size", None)
    if tp_size not in (None, 1):
        raise ValueError(
            f"GateRA cannot adapt {type(model).__name__}: it was loaded with tensor parallelism (tp_size={tp_size}), "
            f"which leaves each rank a slice of its projections' weights. {SHARDED_BASE_FIX}"
        )


def refuse_distributed_weight(target: nn.Module, weight: Optional[torch.Tensor]) -> None:
    """A clear error where the layer to adapt already holds a weight sharded across ranks (a DTensor with a `Shard`
    placement: tensor parallelism, or FSDP2 applied before the adapter was added)."""
    DTensor = _dtensor_type()
    if DTensor is None or not isinstance(weight, DTensor):
        return
    if not any(placement.is_shard() for placement in weight.placements):
        return
    raise ValueError(
        f"GateRA cannot adapt {target}: its weight {tuple(weight.shape)} is sharded across ranks (a DTensor with "
        f"placements {tuple(weight.placements)}), as tensor parallelism or an FSDP2 `fully_shard` applied before the "
        f"adapter leaves it. {SHARDED_BASE_FIX}"
    )


def unsharded_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` itself, or a clear error if it is still an FSDP2 shard where GateRA's branch needs the whole W0."""
    DTensor = _dtensor_type()
    if DTensor is not None and isinstance(weight, DTensor):
        raise RuntimeError(
            f"GateRA's branch needs the whole base weight W0 {tuple(weight.shape)} but finds an FSDP shard of it (a "
            "DTensor): the base layer is an FSDP unit of its own (or no unit around it is gathered), so FSDP gathers "
            "its weight only for the base layer's own forward. "
            "Shard whole transformer blocks instead, so that each GateRA layer and its base layer are in one unit: "
            "`fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP` (accelerate's and the Trainer's default) rather than "
            "SIZE_BASED_WRAP, or, calling `fully_shard` yourself, apply it to the blocks (and the root), not to "
            "the linear layers GateRA adapts."
        )
    return weight


def requested_fsdp_version(args) -> Optional[int]:
    """The FSDP version a Trainer with these TrainingArguments will use, or None: its own `fsdp` / `fsdp_config`,
    else an accelerate config (`accelerate launch` exports ACCELERATE_USE_FSDP and FSDP_VERSION, default 1)."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args:
        return int(plugin_args.get("fsdp_version", 1))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def refuse_fsdp1(trainer) -> None:
    """FSDP1 (`FullyShardedDataParallel`, `fsdp_version: 1`) is refused: it was never run with GateRA.

    FSDP1 cannot run on this project's CPU-only test machines (it requires a GPU-like device), transformers has
    deprecated it, and its flat parameters would need GateRA's trainable and frozen tensors in separate units.
    Checked when the Trainer is built, before accelerate sets FSDP up.
    """
    from .trainer_integration import find_gatera_model

    if requested_fsdp_version(trainer.args) != 1 or find_gatera_model(trainer.model) is None:
        return
    raise ValueError(
        "GateRA does not support FSDP1 (`fsdp_version: 1`, FullyShardedDataParallel): it is untested with GateRA "
        "and deprecated by transformers. Use FSDP2: `fsdp_version: 2` in the accelerate config, "
        "`fsdp_config={\"version\": 2}` in TrainingArguments / SFTConfig, or `fsdp_version: 2` in Axolotl "
        "(integrations/accelerate/fsdp2.yaml, integrations/axolotl/gatera-fsdp2.yml)."
    )


def upcast_trainable_to_fp32(model) -> list[str]:
    """Make GateRA's trainable parameters fp32 (returns the names changed), for FSDP2 with quantised bases.

    FSDP2 needs one dtype for the trainable parameters of a unit. TRL casts adapters on quantised bases to bf16 and
    GateRA returns its gates to fp32 (`GateRAModel.upcast_gates_to_fp32`), so under FSDP all of GateRA's trainable
    parameters are made fp32: the optimizer's master weights; a bf16 mixed-precision policy still runs forward and
    backward in bf16. (Without a quantised base accelerate does the same itself whenever mixed precision is on.)
    """
    changed = []
    for name, param in model.named_parameters():
        if PREFIX in name and param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            changed.append(name)
    return changed


def is_sharded(model) -> bool:
    """Whether any parameter of `model` is an FSDP2 shard (DTensor)."""
    DTensor = _dtensor_type()
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


def _peft_kept_keys(model, state: dict, save_embedding_layers) -> set[str]:
    """The keys of `state` that PEFT's own selection (`get_peft_model_state_dict`) saves under their own names, run on
    shape-only (meta) stand-ins so that nothing is gathered to decide. (ZeRO-3's partitioned parameters keep their
    shape in `ds_shape`.)"""
    stand_ins = {key: torch.empty(getattr(value, "ds_shape", value.shape), dtype=value.dtype, device="meta")
                 for key, value in state.items()}
    kept = set()
    with warnings.catch_warnings():  # PEFT says what it decided when it saves, once: not here as well
        warnings.simplefilter("ignore")
        for name in getattr(model, "peft_config", {}):
            selected = get_peft_model_state_dict(model, state_dict=stand_ins, adapter_name=name,
                                                 save_embedding_layers=save_embedding_layers)
            kept |= selected.keys() & stand_ins.keys()
    return kept


def _kept_base_tensors(model, state: dict, save_embedding_layers) -> set[str]:
    """The keys of `state` that PEFT saves with an adapter under their own names: the embedding layers' base weights
    where the vocabulary was resized (new tokens; `save_embedding_layers="auto"`) or where the caller asks for them.

    In a distributed run rank 0 alone decides and every rank takes its answer, or its error: PEFT's check may ask the
    Hub for the base's config, and ranks that decided each for themselves could gather other keys, or some could
    raise while the others wait in the collective.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return _peft_kept_keys(model, state, save_embedding_layers)
    decided = [None]
    if torch.distributed.get_rank() == 0:
        try:
            decided = [sorted(_peft_kept_keys(model, state, save_embedding_layers))]
        except Exception as error:  # every rank raises it below, instead of rank 0 alone
            decided = [f"{type(error).__name__}: {error}"]
    torch.distributed.broadcast_object_list(decided, src=0)
    if isinstance(decided[0], str):
        raise RuntimeError(f"GateRA: deciding on rank 0 which base tensors PEFT saves with the adapter failed: "
                           f"{decided[0]}")
    return set(decided[0])


def _full_tensor(value) -> torch.Tensor:
    """The whole tensor of a DTensor, gathered on its mesh's device: a shard that CPU offload keeps on the CPU goes to
    the GPU first, as torch's own `get_model_state_dict` does (an NCCL-only process group cannot gather CPU tensors)."""
    if value.device.type != value.device_mesh.device_type:
        value = value.to(value.device_mesh.device_type)
    return value.full_tensor()


def adapter_state_dict(model, save_embedding_layers="auto", keep: bool = True) -> dict[str, torch.Tensor]:
    """The adapter's tensors (GateRA parameters, `modules_to_save`, anything trainable, and the base embedding layers
    that PEFT saves with an adapter when the vocabulary was resized), gathered whole, on CPU.

    Keys are those of `model.state_dict()`. A collective under FSDP2: every rank must call it (the same keys, in the
    same order); a rank that will not write (`keep=False`) takes part in the gathers and gets shape-only (meta) tensors,
    which PEFT's save on such a rank selects from without writing them. No other frozen
    base weight is gathered. Without the embedding layers, an adapter trained with new tokens reloaded onto a base
    whose new rows were drawn afresh: another model.
    """
    DTensor = _dtensor_type()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    state = model.state_dict()
    kept = _kept_base_tensors(model, state, save_embedding_layers)
    result, gathered = {}, {}  # gathered: id(tensor) -> its whole copy (tied weights: one gather, one copy)
    for key, value in state.items():
        if not (PREFIX in key or ".modules_to_save." in key or key in trainable or key in kept):
            continue
        if id(value) not in gathered:
            whole = _full_tensor(value) if DTensor is not None and isinstance(value, DTensor) else value
            gathered[id(value)] = (whole.detach().cpu() if keep
                                   else torch.empty(whole.shape, dtype=whole.dtype, device="meta"))
        result[key] = gathered[id(value)]
    return result


@contextlib.contextmanager
def zero3_saves_keep_resized_embeddings(engine):
    """Within it, DeepSpeed ZeRO-3's consolidated state dict without frozen parameters (what the Trainer saves for a
    PEFT model) also holds the frozen base tensors that PEFT saves with an adapter: the embedding layers after new
    tokens resized them (see `_kept_base_tensors`). Every rank takes part in gathering them; rank 0 gets them.

    Without this an adapter trained under ZeRO-3 with new tokens and frozen embeddings lacked them, and reloaded onto a
    base whose new rows were drawn afresh: another model. (`engine`: the `DeepSpeedEngine` around the PEFT model.)
    """
    import deepspeed

    consolidate = engine._zero3_consolidated_16bit_state_dict

    def with_resized_embeddings(*args, **kwargs):
        state = consolidate(*args, **kwargs)
        if not kwargs.get("exclude_frozen_parameters", args[0] if args else False):
            return state
        model_state = engine.module.state_dict(keep_vars=True)
        kept = sorted(key for key in _kept_base_tensors(engine.module, model_state, "auto")
                      if not model_state[key].requires_grad)
        tensors = list({id(model_state[key]): model_state[key] for key in kept}.values())  # tied: one parameter
        with deepspeed.zero.GatheredParameters(tensors, modifier_rank=None):
            if state is not None:  # rank 0
                state.update({key: model_state[key].detach().cpu().clone() for key in kept})
        return state

    with mock.patch.object(engine, "_zero3_consolidated_16bit_state_dict", with_resized_embeddings):
        yield  # (afterwards the engine's own method, or an earlier patch of it, again)


def _zero3_gatera(trainer) -> bool:
    from .trainer_integration import find_gatera_model

    engine = getattr(trainer, "deepspeed", None)
    return (getattr(engine, "zero_optimization_stage", lambda: 0)() == 3
            and find_gatera_model(trainer.model) is not None)


def _fsdp_gatera(trainer) -> bool:
    from .trainer_integration import find_gatera_model

    return bool(getattr(trainer, "is_fsdp_enabled", False)) and find_gatera_model(trainer.model) is not None


def install() -> None:
    """Wrap `Trainer.create_accelerator_and_postprocess` and `Trainer.save_model` once (idempotent)."""
    from transformers import Trainer

    from .trainer_integration import find_gatera_model

    if getattr(Trainer.save_model, _MARK, False):
        return
    original_create = Trainer.create_accelerator_and_postprocess
    original_save_model = Trainer.save_model

    @functools.wraps(original_create)
    def create_accelerator_and_postprocess(self, *args, **kwargs):
        refuse_fsdp1(self)
        if requested_fsdp_version(self.args) == 2 and find_gatera_model(self.model) is not None:
            upcast_trainable_to_fp32(self.model)
        return original_create(self, *args, **kwargs)

    @functools.wraps(original_save_model)
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        if _zero3_gatera(self):
            with zero3_saves_keep_resized_embeddings(self.deepspeed):
                return original_save_model(self, output_dir, _internal_call)
        if not _fsdp_gatera(self):
            return original_save_model(self, output_dir, _internal_call)
        state_dict = adapter_state_dict(self.model, keep=self.args.should_save)  # every rank: a collective
        if self.args.should_save:  # (some transformers releases' `_save` would have the other ranks write too)
            self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save")

    for wrapper in (create_accelerator_and_postprocess, save_model):
        setattr(wrapper, _MARK, True)
    Trainer.create_accelerator_and_postprocess = create_accelerator_and_postprocess
    Trainer.save_model = save_model
