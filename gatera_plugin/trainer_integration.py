"""Make every `transformers.Trainer` (TRL's trainers, Axolotl's trainers, ...) apply and log GateRA's penalty.

Installed once on `import gatera_plugin`, these wrappers do nothing unless the trainer's model holds a GateRA adapter:

- `get_batch_samples` (the Trainer prefetches the micro-batches of one optimisation step): count the real tokens of
  the whole step across data-parallel ranks (once per context-parallel group) and read the fp16 loss scale, and hand
  both to the model's `PenaltyRun`, so that the penalty is the mean over the step's tokens whatever the gradient accumulation. Where the
  prefetched batches are not the model's inputs (GRPO, RLOO, distillation, online DPO and self-distillation build
  them after generation; GKD, GOLD and IW-OPD replace them by generations at some steps), each forward is normalised
  by its own real tokens × forwards per step × ranks instead, with a warning (once per trainer). Each step also
  checks its count against the forwards that really ran with gradient (the `PenaltyRun` tallies them) and, on a
  mismatch, warns with both numbers and switches to per-forward normalisation;
- `__init__`: complete the copy of "default" into the "ref" adapter that TRL's DPO, KTO, GRPO and RLOO add as the
  reference of a pretrained PEFT model (`copy_reference_adapter`); refuse TRL's vLLM generation (`use_vllm=True`)
  for token-gated adapters, which cannot be merged into the weights that TRL hands vLLM, before TRL starts vLLM;
  and make the trainer class's `create_optimizer`, whichever class of its MRO implements it, give the gates their
  `gate_lr_ratio` (`optim.with_gate_groups`);
- `log`: add the gate statistics gathered since the last log (`gatera/...` keys) to training logs, before they
  reach `state.log_history` and every `report_to` backend;
- `train`: first return gate parameters that TRL cast to bf16 to fp32 (`GateRAModel.upcast_gates_to_fp32`), before
  the optimizer is built or restored from a checkpoint; afterwards return the model to per-forward normalisation;
- `call_model_init` (`Trainer(model_init=...)`, hyperparameter search): the same for the model it builds, before
  `train` loads a checkpoint into it;
- `_inner_training_loop` (run again with a smaller batch by `auto_find_batch_size` after an out-of-memory error): a
  loop that raises leaves no unfinished step behind for the next one to check or log.

Wrapping the base class keeps working for subclasses that override these methods and call `super()` (TRL does).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.utils import logging

from .optim import check_deepspeed_optimizer, check_resumed_ratios, with_gate_groups
from .penalty import real_token_mask

logger = logging.get_logger(__name__)

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


# Trainers (and their subclasses) whose batches are the model's inputs only at some steps: at the others they are
# replaced by the trainer's own generations (TRL's GKD, GOLD and IW-OPD, on-policy with probability `lmbda`).
REPLACES_INPUTS = ("GKDTrainer", "GOLDTrainer", "IWOPDTrainer")

# Preference trainers that keep each pair as `chosen_*` / `rejected_*` inputs and run both in one concatenated forward
# (TRL's ORPO and CPO).
PAIRED_PREFIXES = ("chosen_", "rejected_")


def _count_inputs(batch: Mapping, prefix: str = "") -> Optional[torch.Tensor]:
    """Real tokens of one set of model inputs, as the gated layers count them (`penalty.real_token_mask`): nonzero
    `attention_mask` entries, else every `input_ids` / `inputs_embeds` position but a padding-free row's padding.

    Nonzero, not the sum: Axolotl's multipack collator numbers the sequences packed into one row 1, 2, 3, ... in
    `attention_mask` (0 is padding), and the gated layers count a token wherever the mask is nonzero.
    """
    mask = batch.get(f"{prefix}attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.count_nonzero()
    for key, dims in (("input_ids", None), ("inputs_embeds", -1)):
        value = batch.get(f"{prefix}{key}")
        if isinstance(value, torch.Tensor):
            real = real_token_mask(None, batch.get(f"{prefix}position_ids"), value.shape[:dims])
            return real.count_nonzero() if real is not None else torch.tensor(value.shape[:dims].numel(),
                                                                              device=value.device)
    return None


def count_real_tokens(batches) -> Optional[torch.Tensor]:
    """Real (non-padding) tokens of a list of micro-batches as the model's forwards will see them, else None.

    A micro-batch counts when it is a dict of model inputs (`input_ids` / `inputs_embeds`, and `attention_mask` if
    padded) or a dict of paired `chosen_*` and `rejected_*` inputs (both counted); anything else, e.g. the raw rows
    that GRPO turns into model inputs after generation, gives None. No micro-batches hold 0 tokens: transformers 5.0,
    resumed mid-epoch, asks the exhausted epoch iterator for the skipped steps' batches and gets none.
    """
    total = None
    for batch in batches:
        if not isinstance(batch, Mapping):
            return None
        count = _count_inputs(batch)
        if count is None:
            pair = [_count_inputs(batch, prefix) for prefix in PAIRED_PREFIXES]
            if any(c is None for c in pair):
                return None
            count = pair[0] + pair[1].to(pair[0].device)
        total = count if total is None else total + count.to(total.device)
    return total if total is not None else torch.tensor(0)


def loss_scale_of(trainer) -> float:
    """The factor the trainer multiplies the loss by before backward (fp16 loss scaling), else 1.

    Accelerate's GradScaler for plain fp16 training; under DeepSpeed, what `engine.backward` scales the loss by, in
    the order its optimizer's `scale_if_loss` looks: a custom scale, the torch GradScaler of `torch_autocast` with
    fp16 (the ZeRO optimizer's, or without ZeRO the engine's), else the ZeRO optimizer's loss scaler (bf16 and fp32
    runs have none or a static scale of 1).
    """
    if getattr(trainer, "is_deepspeed_enabled", False):
        engine = getattr(trainer, "model_wrapped", None)
        optimizer = getattr(engine, "optimizer", None)
        if getattr(optimizer, "custom_loss_scaler", False):
            return float(optimizer.external_loss_scale)
        for autocast_scaler in (getattr(optimizer, "torch_autocast_gradscaler", None),
                                getattr(engine, "torch_autocast_z0_gradscaler", None)):
            if autocast_scaler is not None and autocast_scaler.is_enabled():
                return float(autocast_scaler.get_scale())
        scaler = getattr(optimizer, "loss_scaler", None)
        return float(getattr(scaler, "loss_scale", 1.0)) if scaler is not None else 1.0
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
        return float(scaler.get_scale())
    return 1.0


def sequence_parallel_scale(trainer) -> float:
    """The scale of each rank's task-loss gradient under DeepSpeed's sequence parallelism (Ulysses / ALST:
    `ParallelismConfig(sp_backend="deepspeed", sp_size=N)`), relative to data parallelism's; 1 without it.

    The penalty's per-rank share assumes data parallelism: each rank backpropagates the mean over its own batch and the
    engine averages the ranks' gradients. Under Ulysses the engine divides their sum by the data-parallel size only
    (world / sp_size), and transformers >= 5.25 has each rank backpropagate its own part of the sequences' loss, so
    that the task loss's gradient is the single process's: each rank's share of the penalty then takes 1 / sp_size.
    Two cases keep 1: ZeRO-3 before deepspeed 0.20.2 averages over all ranks (transformers multiplies the part by
    sp_size for it), and transformers < 5.25 backpropagated the whole sequences' loss on every rank, which makes the
    task loss's gradient sp_size x the single process's wherever the engine sums, and the penalty follows it.
    """
    config = getattr(trainer.accelerator, "parallelism_config", None)
    if config is None or getattr(config, "sp_backend", None) != "deepspeed" or not getattr(config, "sp_enabled", False):
        return 1.0
    if _older_than("transformers", "5.25"):
        return 1.0
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3 and _older_than("deepspeed", "0.20.2"):
        return 1.0
    return 1.0 / int(config.sp_size)


@functools.cache
def _older_than(package: str, release: str) -> bool:
    """Whether the installed `package` is older than `release` (compared as transformers compares them: a dev or rc
    build of a release is older than it)."""
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version(package)) < Version(release)


@dataclass
class _Normaliser:
    """How one trainer's steps are normalised, and what the last step expected its forwards to see (this rank)."""

    per_forward: bool = False  # the step's tokens cannot be counted from the batches (or their count proved wrong)
    forwards_per_batch: float = 1.0  # forwards with gradient per prefetched micro-batch, as observed
    expected_tokens: Optional[int] = None  # real tokens of the last step's batches on this rank (step-level mode)
    expected_forwards: int = 0  # forwards the last step should run with gradient on this rank (0: nothing to check)
    micro_batches: int = 0  # micro-batches of the last step
    # under context parallelism: real tokens of the last step over all ranks, which all ranks' forwards together
    # should have seen (each forward sees its rank's part of the sequences, which no rank can predict alone)
    expected_group_tokens: Optional[float] = None
    checked_untapped: bool = False  # `warn_of_untapped_layers` ran (after the first step whose forwards tapped)
    step_begun_at: int = 0  # the Trainer's `global_step` when the last step began (it is one more once that step ran)


def _normaliser(trainer) -> _Normaliser:
    state = trainer.__dict__.get("_gatera_normaliser")
    if state is None:
        state = trainer._gatera_normaliser = _Normaliser()
    return state


# How both token-count warnings end: what the penalty's normalisation becomes
_PER_FORWARD_FROM_NOW = ("From now on each forward is normalised by its own real tokens × forwards per step × ranks "
                         "(README, 'How the penalty is applied')")


def warn_of_untapped_layers(trainer, tuner) -> None:
    """After the first step that trained gates: warn (once) of gated layers that no backward reached, e.g. a VLM's
    last vision layer, whose output LLaVA does not use (`vision_feature_layer=-2`), under `target_modules="all-linear"`.
    They count in each penalty's `L`, so the others' mean is diluted by (L - their number) / L, and they train nothing.
    """
    from .layer import GateRALayer

    gated = {name: module.trained_gate_stats(tuner.active_adapters)
             for name, module in tuner.model.named_modules() if isinstance(module, GateRALayer)}
    gated = {name: stats for name, stats in gated.items() if stats}
    untapped = [name for name, stats in gated.items() if not any(s.recorded for s in stats)]
    if untapped and len(untapped) < len(gated):  # (none reached: no backward ran yet)
        shown = ", ".join(untapped[:4]) + (f", ... ({len(untapped) - 4} more)" if len(untapped) > 4 else "")
        logger.warning(
            f"GateRA: {len(untapped)} of {len(gated)} gated layers got no gradient in {type(trainer).__name__}'s "
            f"first optimisation step (the model does not run them, or does not use their output): {shown}. Nothing "
            "trains them, and they still count among the L layers that each penalty is the mean over, which scales "
            f"the penalty of the others by {len(gated) - len(untapped)}/{len(gated)}. If that holds for every step "
            "(a vision tower's last layer, an unused head), leave them out of `target_modules` (or list them in "
            "`exclude_modules`)."
        )


def _stopped_inside(trainer, state: _Normaliser) -> bool:
    """Whether no optimizer step took the last step: the loop stopped inside it (a callback's `should_training_stop`
    or `should_epoch_stop` between its micro-batches), after fewer forwards than it prefetched; nothing to judge."""
    return trainer.state.global_step == state.step_begun_at


def _check_last_step(trainer, run) -> bool:
    """Compare the last step's expectations with the forwards that ran; warn on a difference. True: tokens differ."""
    state = _normaliser(trainer)
    forwards, tokens = run.tally_forwards, run.tally_tokens
    expected_forwards, state.expected_forwards = state.expected_forwards, 0
    if expected_forwards == 0 or forwards == 0:  # no step yet, or no live penalty tap (nothing was normalised)
        return False
    if _stopped_inside(trainer, state):
        return False
    if not state.checked_untapped:
        state.checked_untapped = True
        tuner = find_gatera_model(trainer.model)
        if tuner is not None:
            warn_of_untapped_layers(trainer, tuner)
    name = type(trainer).__name__
    if forwards != expected_forwards:
        logger.warning(
            f"GateRA: {name} ran {forwards} forward(s) with gradient in an optimisation step of {state.micro_batches} "
            f"micro-batch(es) on this rank, where {expected_forwards} were expected, so that step's structure penalty "
            f"(and, with per-forward normalisation, its entropy penalty) was {forwards / expected_forwards:.3g}x the "
            f"intended scale. Normalising by {forwards / state.micro_batches:.3g} forward(s) per micro-batch from now "
            "on. See README, 'How the penalty is applied'."
        )
        state.forwards_per_batch = forwards / state.micro_batches
    seen = int(tokens) if tokens is not None else 0
    if state.expected_tokens is not None and seen != state.expected_tokens:
        logger.warning(
            f"GateRA: {name}'s forwards with gradient saw {seen} real tokens in the last optimisation step on this "
            f"rank, but its prefetched batches held {state.expected_tokens}: the trainer changes the inputs between "
            "its dataloader and the model, so that step's entropy penalty was normalised by the wrong token count. "
            f"{_PER_FORWARD_FROM_NOW}."
        )
        return True
    return False


# Key of a micro-batch that Axolotl's context parallelism (its `ringmaster` package) already cut down to this rank's
# part of each sequence in the collator, before the Trainer prefetches it
PRE_SHARDED_KEY = "_cp_shard"


def batch_replicas(trainer, batch_samples) -> int:
    """How many ranks receive each prefetched micro-batch whole: the context-parallel group (torch context
    parallelism, accelerate's `ParallelismConfig(cp_size=...)`), whose ranks split its sequences between them only
    inside the training step, so that each rank's forward sees its own part of them. 1 without context parallelism,
    and where each rank's batches are already its own part (`PRE_SHARDED_KEY`).
    """
    config = getattr(trainer.accelerator, "parallelism_config", None)
    if config is None or not getattr(config, "cp_enabled", False):
        return 1
    if any(isinstance(batch, Mapping) and PRE_SHARDED_KEY in batch for batch in batch_samples):
        return 1
    return int(config.cp_size)


def begin_step(trainer, batch_samples) -> None:
    """Hand the step's real-token count (all micro-batches, all ranks) and loss scale to the GateRA model.

    Where the batches cannot be counted (or an earlier step showed that their count is not what the model sees),
    hand over None instead: each forward is then normalised by its own real tokens × forwards per step × ranks.
    Under context parallelism the ranks of a group count the same batches (`batch_replicas`) and each forward sees a
    part of them, which no rank can predict alone: the next step checks the tokens that all ranks' forwards saw
    together, in the same gather.
    """
    tuner = find_gatera_model(trainer.model)
    if tuner is None:
        return
    run, state = tuner.penalty_run, _normaliser(trainer)
    run.collated_masks = [(batch["position_ids"], batch["attention_mask"]) for batch in batch_samples
                          if isinstance(batch, Mapping) and isinstance(batch.get("position_ids"), torch.Tensor)
                          and isinstance(batch.get("attention_mask"), torch.Tensor)]
    accelerator = trainer.accelerator
    world_size, replicas = accelerator.num_processes, batch_replicas(trainer, batch_samples)
    stopped_inside = _stopped_inside(trainer, state)
    mismatch = _check_last_step(trainer, run)
    replaces = any(cls.__name__ in REPLACES_INPUTS for cls in type(trainer).__mro__)
    tokens = None if state.per_forward or mismatch or replaces else count_real_tokens(batch_samples)
    uncountable, step_tokens = tokens is None and not state.per_forward and not mismatch, None
    expected_group, state.expected_group_tokens = state.expected_group_tokens, None
    if world_size > 1 and not state.per_forward:  # every rank takes this branch until all switch together
        seen = float(run.tally_tokens) if run.tally_tokens is not None else 0.0
        local = torch.tensor([float(tokens) if tokens is not None else 0.0, float(tokens is None), seen,
                              float(run.tally_forwards > 0)], device=accelerator.device)
        gathered = accelerator.gather(local.reshape(1, 4)).reshape(-1, 4)
        group_seen = float(gathered[:, 2].sum())
        if (expected_group is not None and not stopped_inside and bool(gathered[:, 3].all())
                and abs(group_seen - expected_group) > 0.5):
            logger.warning(
                f"GateRA: {type(trainer).__name__}'s forwards with gradient saw {group_seen:.0f} real tokens in the "
                f"last optimisation step on all {world_size} ranks together, but its prefetched batches held "
                f"{expected_group:.0f} (counted once per context-parallel group of {replicas}): the forwards do not "
                "see the batches' real tokens, e.g. because the attention mask is dropped where the sequences are split, "
                f"so that step's entropy penalty was normalised by the wrong token count. {_PER_FORWARD_FROM_NOW} (a "
                "forward being a rank's part of the sequences)."
            )
            tokens = None
        elif bool(gathered[:, 1].any()):
            tokens = None
        else:
            step_tokens = float(gathered[:, 0].sum()) / replicas
    elif tokens is not None:
        step_tokens = float(tokens)
    if tokens is None and not state.per_forward:
        state.per_forward = True
        if uncountable:
            name, kind = type(trainer).__name__, type(batch_samples[0]).__name__ if batch_samples else "nothing"
            reason = (f"{name} replaces its batches with its own generations at some steps" if replaces else
                      f"{name}'s dataloader yields {kind}, not the model's inputs (the trainer builds them itself, "
                      "e.g. after generation)")
            logger.warning(
                f"GateRA: {reason}, so the real tokens of a whole optimisation step cannot be counted in advance. "
                "Each forward's penalty is normalised by its own real tokens × forwards per step × ranks instead: "
                "the penalty is the mean over the step's forwards of each forward's token mean (TRL normalises "
                "GRPO's entropy bonus the same way). See README, 'How the penalty is applied'."
            )
    micro_batches = len(batch_samples)
    forwards = max(1, round(micro_batches * state.forwards_per_batch))
    state.micro_batches, state.expected_forwards = micro_batches, forwards
    state.step_begun_at = trainer.state.global_step
    state.expected_tokens = None if state.per_forward or replicas > 1 else int(tokens)
    state.expected_group_tokens = step_tokens if replicas > 1 and not state.per_forward else None
    run.begin_step(
        None if state.per_forward else step_tokens, world_size=world_size,
        loss_scale=loss_scale_of(trainer) * sequence_parallel_scale(trainer),
        micro_batches=forwards,
    )


def forget_unfinished_step(trainer) -> None:
    """Drop what a training loop that raised left behind: its last step's expectations and tallies, and the gate
    statistics recorded since the last log (the Trainer zeroes the gradients itself, and a new loop logs afresh).

    `auto_find_batch_size=True` runs the whole training loop again with a smaller batch after an out-of-memory error;
    the retry must not check its first step against the aborted one.
    """
    tuner = find_gatera_model(trainer.model)
    if tuner is None:
        return
    state = _normaliser(trainer)
    state.expected_forwards, state.expected_tokens, state.micro_batches = 0, None, 0
    state.expected_group_tokens = None
    tuner.penalty_run.end_training()
    tuner.discard_gate_stats()


def end_training(trainer) -> None:
    """Check the last step like every other, then return the model to per-forward normalisation."""
    tuner = find_gatera_model(trainer.model)
    if tuner is not None:
        _check_last_step(trainer, tuner.penalty_run)
        tuner.penalty_run.end_training()


def check_generation_backend(trainer) -> None:
    """Refuse vLLM generation (TRL's `use_vllm=True`) for a model with token-gated GateRA adapters.

    TRL hands vLLM the policy by merging the adapter into the base weights before each weight sync; a per-token gate
    has no merged weight, so the first sync would fail after vLLM had started, and no sync could give vLLM the
    policy being trained. Called when the Trainer is built, before TRL starts vLLM.
    """
    tuner = find_gatera_model(trainer.model)
    if tuner is None or not getattr(trainer.args, "use_vllm", False):
        return
    gated = {name: tuner.peft_config[name].gate for name in tuner.active_adapters
             if tuner.peft_config[name].is_gated}
    if gated:
        raise ValueError(
            f"{type(trainer).__name__} with `use_vllm=True` cannot generate from this model: GateRA adapter(s) "
            f"{gated} gate each token, and TRL gives vLLM the policy by merging the adapter into the base weights, "
            "which a per-token gate cannot be (docs/method.md, 'Merging'). Set `use_vllm=False` to generate with the "
            "model being trained (transformers' generate), or train with `gate='none'` (mergeable) to keep vLLM."
        )


def refuse_data_parallel(trainer) -> None:
    """Refuse the Trainer's `nn.DataParallel` (what it uses when one process sees several GPUs, `args.n_gpu > 1`).

    DataParallel runs shallow replicas of the model in threads: they share each GateRA layer's penalty run, gate
    statistics and cached update, so a replica could read another's attention mask and the statistics and caches would
    mix devices. One process per GPU (DDP) runs each replica apart.
    """
    if find_gatera_model(trainer.model) is None or getattr(trainer.args, "n_gpu", 1) <= 1:
        return
    if getattr(trainer.model, "is_loaded_in_8bit", False) or getattr(trainer.model, "is_loaded_in_4bit", False):
        return  # (the Trainer does not wrap quantised models: they run in one process, spread by their device map)
    raise ValueError(
        f"{type(trainer).__name__} sees {trainer.args.n_gpu} GPUs in one process and would train with "
        "torch.nn.DataParallel, which GateRA does not support (its replicas share each layer's penalty state across "
        "threads). Launch one process per GPU, e.g. `torchrun --nproc_per_node "
        f"{trainer.args.n_gpu} train.py` or `accelerate launch train.py` (distributed data parallel), or use one GPU "
        "(`CUDA_VISIBLE_DEVICES=0`)."
    )


def copy_reference_adapter(trainer) -> None:
    """Make the frozen "ref" adapter that TRL adds for a pretrained PEFT model a real copy of "default".

    DPO, KTO, GRPO and RLOO given a PeftModel and no `ref_model` add an adapter "ref" with the "default" adapter's
    config object and copy the parameters whose names contain ".default.". GateRA keeps A, B and DoRA's magnitude in
    ParameterDicts (names end in ".default"), so only the gates were copied: the reference was a fresh adapter, not the
    model being continued. TRL does this just before it calls `Trainer.__init__`, so the copy is completed here.
    """
    from .model import adapter_tensors

    peft_model = getattr(trainer, "model", None)
    configs = getattr(peft_model, "peft_config", None)
    from_trl = any(cls.__module__.startswith("trl.") for cls in type(trainer).__mro__)
    if (not from_trl or find_gatera_model(peft_model) is None or not isinstance(configs, Mapping)
            or "ref" not in configs or configs["ref"] is not configs.get("default")):
        return
    sources, copies = adapter_tensors(peft_model, "default"), adapter_tensors(peft_model, "ref")
    if [t.shape for t in sources] != [t.shape for t in copies]:  # not TRL's copy of the same config
        return
    with torch.no_grad():
        for source, copy in zip(sources, copies):
            copy.copy_(source)


def prepare_model(trainer, model) -> None:
    """Before the optimizer exists or a checkpoint is loaded into `model` (the trainer's), so that both follow the fp32
    parameters: refuse a DeepSpeed optimizer that cannot give the gates their rate, and return half-precision gate
    parameters to fp32 (`GateRAModel.upcast_gates_to_fp32`; DeepSpeed keeps its own fp32 master copy). Idempotent."""
    tuner = find_gatera_model(model)
    if tuner is None:
        _refuse_layers_without_tuner(model)
        return
    if trainer.is_deepspeed_enabled:
        from .bnb import refuse_4bit_under_zero3

        refuse_4bit_under_zero3(model)
    check_deepspeed_optimizer(trainer, model)
    if not trainer.is_deepspeed_enabled:
        tuner.upcast_gates_to_fp32()


def _refuse_layers_without_tuner(model) -> None:
    """Refuse to train GateRA layers that no `GateRAModel` holds (attached with transformers' `load_adapter` /
    `add_adapter`, or PEFT's `inject_adapter_in_model`, which drop it): nothing would scale the penalty to the step's
    tokens (each forward normalised itself: several times the configured strength under gradient accumulation), log
    the statistics or keep half-precision gates in fp32."""
    from .layer import GateRALayer

    if any(isinstance(module, GateRALayer) and any(param.requires_grad for name, param in module.named_parameters()
                                                    if not name.startswith("base_layer."))  # (a trained base is not)
           for module in model.modules()):
        raise ValueError(
            "The model holds trainable GateRA layers outside a PEFT model (attached with transformers' "
            "`model.load_adapter(..., is_trainable=True)` / `add_adapter`, or `inject_adapter_in_model`), so the "
            "Trainer cannot scale the gate penalty to each step's tokens, log the gate statistics or keep the gates in "
            "fp32: the run would train another model than the one configured. Wrap it with PEFT instead: "
            "`PeftModel.from_pretrained(base, path, is_trainable=True)`, or `get_peft_model(base, GateRAConfig(...))`."
        )


def is_training_log(logs: dict) -> bool:
    """Whether `Trainer.log` got a log of the training loop, which every rank makes, so that the gate statistics'
    all-reduce can run in it: a step's log ("loss") or the end of training's summary ("total_flos"). `evaluate()`'s
    metrics (whatever its `metric_key_prefix`, "train" included) and a user's own `trainer.log({...})`, perhaps made
    on rank 0 alone, keep the statistics for the next training log (a collective there would wait for ever)."""
    return "loss" in logs or "total_flos" in logs


def install() -> None:
    """Wrap `Trainer.__init__`, `get_batch_samples`, `log`, `train`, `call_model_init` and `_inner_training_loop` once
    (idempotent)."""
    from transformers import Trainer

    if getattr(Trainer.get_batch_samples, _MARK, False):
        return
    original_init = Trainer.__init__
    original_get_batch_samples = Trainer.get_batch_samples
    original_log = Trainer.log
    original_train = Trainer.train
    original_inner_loop = Trainer._inner_training_loop
    original_call_model_init = Trainer.call_model_init

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        refuse_data_parallel(self)
        copy_reference_adapter(self)
        check_generation_backend(self)
        with_gate_groups(type(self))

    @functools.wraps(original_get_batch_samples)
    def get_batch_samples(self, *args, **kwargs):
        batch_samples, num_items_in_batch = original_get_batch_samples(self, *args, **kwargs)
        begin_step(self, batch_samples)
        return batch_samples, num_items_in_batch

    @functools.wraps(original_log)
    def log(self, logs, *args, **kwargs):
        tuner = find_gatera_model(self.model)
        if tuner is not None and is_training_log(logs):
            logs.update(tuner.pop_gate_stats())
        return original_log(self, logs, *args, **kwargs)

    @functools.wraps(original_train)
    def train(self, *args, **kwargs):
        prepare_model(self, self.model)
        try:
            result = original_train(self, *args, **kwargs)
        except BaseException:  # also where a subclass replaces `_inner_training_loop`
            forget_unfinished_step(self)
            raise
        end_training(self)
        return result

    @functools.wraps(original_call_model_init)
    def call_model_init(self, *args, **kwargs):
        model = original_call_model_init(self, *args, **kwargs)
        prepare_model(self, model)  # (`train` builds the model here with `model_init`, then loads a checkpoint into it)
        return model

    @functools.wraps(original_inner_loop)
    def _inner_training_loop(self, *args, **kwargs):
        tuner = find_gatera_model(self.model)
        if tuner is not None and kwargs.get("resume_from_checkpoint"):
            check_resumed_ratios(self.model, tuner.peft_config, kwargs["resume_from_checkpoint"])
        try:
            return original_inner_loop(self, *args, **kwargs)
        except BaseException:
            forget_unfinished_step(self)
            raise

    for wrapper in (__init__, get_batch_samples, log, train, call_model_init, _inner_training_loop):
        setattr(wrapper, _MARK, True)
    Trainer.__init__ = __init__
    Trainer.get_batch_samples = get_batch_samples
    Trainer.log = log
    Trainer.train = train
    Trainer._inner_training_loop = _inner_training_loop
    Trainer.call_model_init = call_model_init
