"""Make every `transformers.Trainer` (TRL's SFTTrainer, Axolotl's trainers, ...) apply and log GateRA's penalty.

Installed once on `import gatera_plugin`, these wrappers do nothing unless the trainer's model holds a GateRA adapter:

- `get_batch_samples` (the Trainer prefetches the micro-batches of one optimisation step): count the real tokens of
  the whole step across data-parallel ranks and read the fp16 loss scale, and hand both to the model's
  `PenaltyRun`, so that the penalty is the mean over the step's tokens whatever the gradient accumulation;
- `log`: add the gate statistics gathered since the last log (`gatera/...` keys) to training logs, before they
  reach `state.log_history` and every `report_to` backend;
- `train`: first return gate parameters that TRL cast to bf16 to fp32 (`GateRAModel.upcast_gates_to_fp32`), before
  the optimizer is built or restored from a checkpoint; afterwards return the model to per-forward normalisation.

Wrapping the base class keeps working for subclasses that override these methods and call `super()` (TRL does).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Optional

import torch

_MARK = "__gatera_wrapped__"


def find_gatera_model(model) -> Optional[GateRAModel]:  # noqa: F821
    """The `GateRAModel` inside `model` (a PeftModel, a tuner, or either wrapped by DDP/DeepSpeed), else None."""
    from .model import GateRAModel

    for candidate in (model, getattr(model, "module", None)):
        if isinstance(candidate, GateRAModel):
            return candidate
        base = getattr(candidate, "base_model", None) if candidate is not None else None
        if isinstance(base, GateRAModel):
            return base
    return None


def count_real_tokens(batches) -> Optional[torch.Tensor]:
    """Real (non-padding) tokens in a list of model-input dicts: attention-mask ones, else every input position."""
    total = None
    for batch in batches:
        if not isinstance(batch, Mapping):
            return None
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            count = mask.sum()
        elif isinstance(batch.get("input_ids"), torch.Tensor):
            count = torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)
        elif isinstance(batch.get("inputs_embeds"), torch.Tensor):
            count = torch.tensor(batch["inputs_embeds"].shape[:-1].numel(), device=batch["inputs_embeds"].device)
        else:
            return None
        total = count if total is None else total + count.to(total.device)
    return total


def loss_scale_of(trainer) -> float:
    """The factor the trainer multiplies the loss by before backward (fp16 loss scaling), else 1.

    Accelerate's GradScaler for plain fp16 training; under DeepSpeed, the ZeRO optimizer's loss scaler (which
    `engine.backward` applies; bf16 and fp32 runs have none or a static scale of 1).
    """
    if getattr(trainer, "is_deepspeed_enabled", False):
        optimizer = getattr(getattr(trainer, "model_wrapped", None), "optimizer", None)
        if getattr(optimizer, "custom_loss_scaler", False):
            return float(optimizer.external_loss_scale)
        scaler = getattr(optimizer, "loss_scaler", None)
        return float(getattr(scaler, "loss_scale", 1.0)) if scaler is not None else 1.0
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
        return float(scaler.get_scale())
    return 1.0


def begin_step(trainer, batch_samples) -> None:
    """Hand the step's real-token count (all micro-batches, all ranks) and loss scale to the GateRA model."""
    tuner = find_gatera_model(trainer.model)
    if tuner is None:
        return
    tokens = count_real_tokens(batch_samples)
    if tokens is None:
        raise ValueError(
            "GateRA could not count the real tokens of a training batch: batches must be dicts with `input_ids` "
            "(and `attention_mask` if padded) or `inputs_embeds`."
        )
    accelerator = trainer.accelerator
    world_size = accelerator.num_processes
    if world_size > 1:
        tokens = accelerator.gather(tokens.reshape(1).to(accelerator.device)).sum()
    tuner.penalty_run.begin_step(
        float(tokens), world_size=world_size, loss_scale=loss_scale_of(trainer), micro_batches=len(batch_samples)
    )


def install() -> None:
    """Wrap `Trainer.get_batch_samples`, `Trainer.log` and `Trainer.train` once (idempotent)."""
    from transformers import Trainer

    if getattr(Trainer.get_batch_samples, _MARK, False):
        return
    original_get_batch_samples = Trainer.get_batch_samples
    original_log = Trainer.log
    original_train = Trainer.train

    @functools.wraps(original_get_batch_samples)
    def get_batch_samples(self, *args, **kwargs):
        batch_samples, num_items_in_batch = original_get_batch_samples(self, *args, **kwargs)
        begin_step(self, batch_samples)
        return batch_samples, num_items_in_batch

    @functools.wraps(original_log)
    def log(self, logs, *args, **kwargs):
        tuner = find_gatera_model(self.model)
        if tuner is not None and not any(key.startswith("eval_") for key in logs):
            logs.update(tuner.pop_gate_stats())
        return original_log(self, logs, *args, **kwargs)

    @functools.wraps(original_train)
    def train(self, *args, **kwargs):
        tuner = find_gatera_model(self.model)
        if tuner is not None and not self.is_deepspeed_enabled:
            # before the optimizer exists (or loads a checkpoint's state), so its state follows the fp32 params
            tuner.upcast_gates_to_fp32()
        try:
            return original_train(self, *args, **kwargs)
        finally:
            tuner = find_gatera_model(self.model)
            if tuner is not None:
                tuner.penalty_run.end_training()

    for wrapper in (get_batch_samples, log, train):
        setattr(wrapper, _MARK, True)
    Trainer.get_batch_samples = get_batch_samples
    Trainer.log = log
    Trainer.train = train
