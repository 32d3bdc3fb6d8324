"""Learning rate of the gate parameters: `GateRAConfig(gate_lr_ratio=k)` trains them at k × the optimizer's rate.

The gates' parameters (a sigmoid gate's `w`, `b`; a threshold gate's `τ`; a structure gate's `α`) are few and act
on every token, so a rate chosen for the factors `A`, `B` need not suit them. `split_gate_groups` moves them into
param groups of their own, with the same hyperparameters and `lr × gate_lr_ratio`, before the first step (so the
learning-rate scheduler, built after the optimizer, scales every group alike). The Trainer integration applies it
(`with_gate_groups`) to every `transformers.Trainer` (TRL's trainers and Axolotl's included, also where a subclass
builds the optimizer itself) when the model holds a GateRA adapter whose ratio is not 1; for a hand-built optimizer
call `split_gate_groups(optimizer, model)` yourself.
"""

from __future__ import annotations

import functools

import torch

# optimizers whose groups cannot carry another rate for the gates: {class name: why}
UNSPLITTABLE_OPTIMIZERS = {
    "Lomo": "it applies one learning rate to every parameter, whatever its param group says",
    "AdaLomo": "it applies one learning rate to every parameter, whatever its param group says",
    "GrokAdamW": "its update of a parameter depends on the parameter's position in its param group, so splitting the "
                 "groups would change the other parameters' updates too",
}
_MARK = "__gatera_gate_lr__"
_BUILDING = "_gatera_building_optimizer"  # set on a trainer while its create_optimizer runs
_SPLIT = "_gatera_gate_groups_split"  # set on an optimizer whose gate groups are split


def gate_parameter_ratios(model: torch.nn.Module) -> dict[int, float]:
    """{id(parameter): gate_lr_ratio} for every trainable gate parameter of every GateRA adapter in `model`."""
    from .layer import GateRALayer

    ratios: dict[int, float] = {}
    for module in model.modules():
        if not isinstance(module, GateRALayer):
            continue
        for adapter_name, config in module.options.items():
            for gate in module.gates_of(adapter_name):
                for param in gate.parameters():
                    if param.requires_grad:
                        ratios[id(param)] = config.gate_lr_ratio
    return ratios


def _raised_ratios(model: torch.nn.Module) -> dict[int, float]:
    """`gate_parameter_ratios` of the gate parameters whose rate is not the optimizer's (ratio != 1)."""
    return {key: ratio for key, ratio in gate_parameter_ratios(model).items() if ratio != 1.0}


def split_gate_groups(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Give the gate parameters of `model` their own param groups at `lr × gate_lr_ratio` (in place; before any step).

    Groups keep their other hyperparameters (weight decay, betas, ...); a no-op when every ratio is 1, and on an
    optimizer it has split already.
    """
    ratios = _raised_ratios(model)
    if not ratios or getattr(optimizer, _SPLIT, False):  # (split already: a second split would apply ratio²)
        return optimizer
    if _has_stepped(optimizer):
        raise RuntimeError(
            "`gate_lr_ratio` regroups the optimizer's parameters, which must happen before its first step, but this "
            "optimizer has state already. Call `split_gate_groups(optimizer, model)` right after building the "
            "optimizer (the Trainer integration does), or set gate_lr_ratio=1."
        )
    if any("initial_lr" in group for group in optimizer.param_groups):  # (set by a scheduler built on it)
        raise RuntimeError(
            "`gate_lr_ratio` regroups the optimizer's parameters, which must happen before the learning-rate "
            "scheduler is built (a scheduler holds one rate per param group), but this optimizer has a scheduler "
            "already (its groups hold `initial_lr`). Call `split_gate_groups(optimizer, model)` right after building "
            "the optimizer and build the scheduler after it, or set gate_lr_ratio=1."
        )
    _refuse_unsplittable(optimizer, ratios)
    groups = []
    for group in optimizer.param_groups:
        by_ratio: dict[float, list] = {}
        names = group.get("param_names")  # (an optimizer built from `named_parameters()`: split with the params)
        for index, param in enumerate(group["params"]):
            by_ratio.setdefault(ratios.get(id(param), 1.0), []).append(index)
        for ratio, indices in by_ratio.items():
            params = [group["params"][i] for i in indices]
            named = {"param_names": [names[i] for i in indices]} if names is not None else {}
            lr = group.get("lr")
            if ratio != 1.0 and (lr is None or group.get("relative_step")):
                raise ValueError(
                    f"`gate_lr_ratio`={ratio:g} needs a fixed learning rate to scale, but this {type(optimizer).__name__} "
                    f"param group has lr={lr!r}" + (" with relative_step=True" if group.get(
                        "relative_step") else "") + " (Adafactor's own schedule). Give it an `lr` with "
                    "relative_step=False, or set gate_lr_ratio=1.")
            if ratio != 1.0 and not (isinstance(lr, (int, float)) or (isinstance(lr, torch.Tensor) and lr.numel() == 1)):
                raise ValueError(
                    f"`gate_lr_ratio`={ratio:g} scales a param group's learning rate, but this {type(optimizer).__name__} "
                    f"param group has lr={lr!r}, not a number. Give it a number (or a one-element tensor), or set "
                    "gate_lr_ratio=1.")
            extra = {"lr": lr * ratio} if ratio != 1.0 else {}  # (a tensor rate stays a tensor, on its device)
            groups.append({**group, "params": params, **named, **extra})
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)
    setattr(optimizer, _SPLIT, True)
    return optimizer


def _has_stepped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer has taken a step: state with a `step` above 0, or state without a step count (SGD's
    momentum). Adagrad fills its state (step 0) when it is built."""
    return any(float(state["step"]) > 0 if "step" in state else True for state in optimizer.state.values())


def _refuse_unsplittable(optimizer, ratios: dict) -> None:
    """Refuse an optimizer that does not hold the gates in param groups whose rate it uses."""
    name = type(optimizer).__name__
    held = {id(p) for group in getattr(optimizer, "param_groups", ()) for p in group["params"]}
    if name in UNSPLITTABLE_OPTIMIZERS:
        why = UNSPLITTABLE_OPTIMIZERS[name]
    elif not isinstance(optimizer, torch.optim.Optimizer):
        why = "it is not a `torch.optim.Optimizer` with param groups to split"
    elif not set(ratios) <= held:  # (transformers' LayerWiseDummyOptimizer: GaLore / APOLLO `*_layerwise`)
        why = ("its param groups do not hold the gate parameters (a layer-wise optimizer steps each parameter in a "
               "gradient hook of its own)")
    else:
        return
    raise ValueError(
        f"`gate_lr_ratio`={sorted(set(ratios.values()))} cannot be applied to {name}: {why}. Use another optimizer "
        "(e.g. optim=\"adamw_torch\"), or set gate_lr_ratio=1."
    )


def check_gate_groups(optimizer, model: torch.nn.Module) -> None:
    """Check an optimizer built elsewhere (passed to the Trainer): refuse one whose param groups mix gate parameters
    that want another rate with the rest, or that ignores its groups' rates (`UNSPLITTABLE_OPTIMIZERS`), and warn
    where the gates sit in groups of their own whose rate is not `gate_lr_ratio` × another group's: the ratio would
    silently not apply."""
    import math
    import warnings

    ratios = _raised_ratios(model)
    groups = getattr(optimizer, "param_groups", None)
    if not ratios or groups is None:
        return
    if type(optimizer).__name__ in UNSPLITTABLE_OPTIMIZERS:
        _refuse_unsplittable(optimizer, ratios)
    mixed = any(len({ratios.get(id(p), 1.0) for p in group["params"]}) > 1 for group in groups)
    if mixed:
        raise ValueError(
            f"`gate_lr_ratio`={sorted(set(ratios.values()))} cannot be applied: the optimizer was built outside "
            "`Trainer.create_optimizer` (passed to the Trainer) and puts gate parameters in one group with the "
            "others. Call `gatera_plugin.split_gate_groups(optimizer, model)` before building the scheduler, let "
            "the Trainer build the optimizer, or set gate_lr_ratio=1."
        )
    if getattr(optimizer, _SPLIT, False):
        return
    other_rates = [group["lr"] for group in groups if group["params"] and id(group["params"][0]) not in ratios]
    unapplied = sorted({group["lr"] for group in groups if group["params"] and id(group["params"][0]) in ratios
                        and not any(math.isclose(group["lr"], ratios[id(group["params"][0])] * rate, rel_tol=1e-6)
                                    for rate in other_rates)})
    if other_rates and unapplied:
        warnings.warn(
            f"`gate_lr_ratio`={sorted(set(ratios.values()))} does not show in the optimizer passed to the Trainer: "
            f"its gate parameters sit in param groups of their own at lr {unapplied}, the others at "
            f"{sorted(set(other_rates))}. GateRA leaves an optimizer built elsewhere as it is: give the gates their "
            "rate yourself, or build the optimizer with the gates in their usual groups and call "
            "`gatera_plugin.split_gate_groups(optimizer, model)` before the scheduler.",
            stacklevel=3,
        )


def check_deepspeed_optimizer(trainer, model=None) -> None:
    """Refuse `gate_lr_ratio` != 1 in `model` (default: the trainer's) when DeepSpeed builds the optimizer from its
    config (the Trainer's `create_optimizer`, where the gate groups are split, is then never called)."""
    config = getattr(getattr(trainer.args, "hf_deepspeed_config", None), "config", None) or {}
    if not trainer.is_deepspeed_enabled or "optimizer" not in config:
        return
    ratios = sorted(set(_raised_ratios(trainer.model if model is None else model).values()))
    if ratios:
        raise ValueError(
            f"`gate_lr_ratio`={ratios} cannot be applied: the DeepSpeed config has an `optimizer` block, so DeepSpeed "
            "builds the optimizer itself with one learning rate. Remove the `optimizer` block (the Trainer then builds "
            "it and GateRA gives the gates their rate; integrations/deepspeed/*.json have none; with ZeRO-Offload also "
            "set `zero_force_ds_cpu_optimizer: false`, as zero3_offload.json does) or set gate_lr_ratio=1."
        )


def check_resumed_ratios(model: torch.nn.Module, configs: dict, checkpoint) -> None:
    """Before a Trainer resumes from `checkpoint`: compare each GateRA adapter's `gate_lr_ratio` ({adapter name:
    GateRAConfig} in `configs`) with the one saved beside the checkpoint's adapter (its adapter_config.json).

    Between 1 and another ratio the optimizer's param groups differ in number, and the checkpoint's optimizer state
    cannot be loaded (torch's message would not name the setting): refused. Between two ratios other than 1 the
    checkpoint's optimizer and scheduler restore its rates, as for any learning-rate change on resume: a warning.
    Nothing to check where `model` has no trainable gate parameters or the checkpoint holds no optimizer state (the
    Trainer then builds a fresh optimizer: `optimizer.pt`, FSDP's `optimizer_*`, DeepSpeed's `global_step*`).
    """
    import json
    import os
    import warnings

    if not gate_parameter_ratios(model) or not any(
            entry.startswith(("optimizer", "global_step")) for entry in os.listdir(checkpoint)):
        return
    for name, config in configs.items():
        saved_config = os.path.join(checkpoint, "" if name == "default" else name, "adapter_config.json")
        if not os.path.isfile(saved_config):
            continue
        with open(saved_config) as file:
            saved = json.load(file).get("gate_lr_ratio", 1.0)
        now = config.gate_lr_ratio
        if saved is None or saved == now:
            continue
        if (saved != 1.0) != (now != 1.0):  # (split_gate_groups's own test of a ratio)
            raise ValueError(
                f"Resuming from {checkpoint}: adapter {name!r} was trained with gate_lr_ratio={saved:g} and this run "
                f"sets {now:g}. A ratio other than 1 gives the gates param groups of their own, so the checkpoint's "
                f"optimizer state does not fit this run's optimizer. Resume with gate_lr_ratio={saved:g}, or start a "
                "new run from the checkpoint's adapter alone (`PeftModel.from_pretrained(model, checkpoint, "
                "is_trainable=True)`; in Axolotl `lora_model_dir` without `resume_from_checkpoint`) to use the new ratio."
            )
        warnings.warn(
            f"Resuming from {checkpoint}: adapter {name!r} was trained with gate_lr_ratio={saved:g} and this run sets "
            f"{now:g}, but the checkpoint's optimizer and scheduler restore its learning rates, so the gates go on at "
            f"{saved:g}x the rate (as for any learning-rate change on resume). To train them at {now:g}x, start a new "
            "run from the checkpoint's adapter alone.",
            stacklevel=2,
        )


def with_gate_groups(trainer_class) -> None:
    """Make `create_optimizer` give GateRA's gates their own param groups, whichever class of `trainer_class`'s MRO
    implements it (idempotent).

    A subclass may build the optimizer without calling `Trainer.create_optimizer` (Axolotl does for its own
    optimizers, `optimizer: adopt_adamw`, `muon`, ...), so every class that defines the method gets the wrapper; a
    per-trainer flag lets only the outermost call regroup, once, after whatever built the optimizer and before the
    scheduler. An optimizer the user passed to the Trainer is checked instead (its scheduler already knows its groups).
    """
    for cls in trainer_class.__mro__:
        build = vars(cls).get("create_optimizer")
        if build is not None and not getattr(build, _MARK, False):
            cls.create_optimizer = _regrouping(build)


def _regrouping(build):
    @functools.wraps(build)
    def create_optimizer(self, *args, **kwargs):
        if getattr(self, _BUILDING, False):  # called by a subclass's create_optimizer: the outer call regroups
            return build(self, *args, **kwargs)
        users_optimizer = self.optimizer is not None  # passed as Trainer(optimizers=(optimizer, scheduler))
        setattr(self, _BUILDING, True)
        try:
            optimizer = build(self, *args, **kwargs)
        finally:
            setattr(self, _BUILDING, False)
        model = args[0] if args else kwargs.get("model")
        model = model if model is not None else self.model
        if users_optimizer:
            check_gate_groups(optimizer, model)
        elif isinstance(optimizer, torch.optim.Optimizer):
            split_gate_groups(optimizer, model)
        elif ratios := _raised_ratios(model):
            _refuse_unsplittable(optimizer, ratios)
        return optimizer

    setattr(create_optimizer, _MARK, True)
    return create_optimizer
