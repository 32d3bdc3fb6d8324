"""Learning rate of the gate parameters: `GateRAConfig(gate_lr_ratio=k)` trains them at k × the optimizer's rate.

The gates' parameters (a sigmoid gate's `w`, `b`; a threshold gate's `τ`; a structure gate's `α`) are few and act
on every token, so a rate chosen for the factors `A`, `B` need not suit them. `split_gate_groups` moves them into
param groups of their own, with the same hyperparameters and `lr × gate_lr_ratio`, before the first step (so the
learning-rate scheduler, built after the optimizer, scales every group alike). `install()` applies it to every
`transformers.Trainer` (TRL's trainers and Axolotl included) when the model holds a GateRA adapter whose ratio is
not 1; for a hand-built optimizer call `split_gate_groups(optimizer, model)` yourself.
"""

from __future__ import annotations

import functools

import torch

_MARK = "__gatera_gate_lr__"


def gate_parameter_ratios(model: torch.nn.Module) -> dict[int, float]:
    """{id(parameter): gate_lr_ratio} for every trainable gate parameter of every GateRA adapter in `model`."""
    from .layer import GateRALayer

    ratios: dict[int, float] = {}
    for module in model.modules():
        if not isinstance(module, GateRALayer):
            continue
        for adapter_name, config in module.options.items():
            for container in (module.gatera_gate, module.gatera_structure):
                if adapter_name in container:
                    for param in container[adapter_name].parameters():
                        if param.requires_grad:
                            ratios[id(param)] = config.gate_lr_ratio
    return ratios


def split_gate_groups(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Give the gate parameters of `model` their own param groups at `lr × gate_lr_ratio` (in place; before any step).

    Groups keep their other hyperparameters (weight decay, betas, ...); a no-op when every ratio is 1.
    """
    ratios = {key: ratio for key, ratio in gate_parameter_ratios(model).items() if ratio != 1.0}
    if not ratios:
        return optimizer
    if optimizer.state:
        raise RuntimeError(
            "`gate_lr_ratio` regroups the optimizer's parameters, which must happen before its first step, but this "
            "optimizer has state already. Call `split_gate_groups(optimizer, model)` right after building the "
            "optimizer (the Trainer integration does), or set gate_lr_ratio=1."
        )
    groups = []
    for group in optimizer.param_groups:
        by_ratio: dict[float, list] = {}
        for param in group["params"]:
            by_ratio.setdefault(ratios.get(id(param), 1.0), []).append(param)
        for ratio, params in by_ratio.items():
            extra = {"lr": group["lr"] * ratio} if ratio != 1.0 else {}
            groups.append({**group, "params": params, **extra})
    optimizer.param_groups.clear()
    for group in groups:
        if "initial_lr" in group:
            group["initial_lr"] = group["lr"]
        optimizer.add_param_group(group)
    return optimizer


def install() -> None:
    """Wrap `Trainer.create_optimizer` once (idempotent): GateRA models get their gate param groups split."""
    from transformers import Trainer

    if getattr(Trainer.create_optimizer, _MARK, False):
        return
    original = Trainer.create_optimizer

    @functools.wraps(original)
    def create_optimizer(self, *args, **kwargs):
        optimizer = original(self, *args, **kwargs)
        model = args[0] if args else kwargs.get("model")
        if isinstance(optimizer, torch.optim.Optimizer):
            split_gate_groups(optimizer, model if model is not None else self.model)
        return optimizer

    setattr(create_optimizer, _MARK, True)
    Trainer.create_optimizer = create_optimizer
