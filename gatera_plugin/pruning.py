"""Structure pruning: drop the adapters whose structure gate σ(α) ended below a threshold (Structure-Learnable Adapter).

Two entry points share the selection: `GateRAModel.prune_structure(threshold)` on a model in memory, and
`prune_saved_adapter(src, dst, threshold)` (the `gatera prune` command) on a saved adapter folder, without loading
the base model. A pruned module simply has no adapter any more: the pruned adapter's output equals the unpruned one's
minus those modules' contributions, and its `target_modules` lists the modules that stayed.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from .serialization import (
    CONFIG,
    PICKLED_WEIGHTS,
    WEIGHTS,
    check_adapter_folder,
    check_tensors,
    file_in_the_way,
    folder_lock,
    is_gatera_type,
    is_trainer_checkpoint,
    missing_adapter_config,
    read_config,
    stamp_config,
)

STRUCTURE_KEY = ".gatera_structure.alpha"
PEFT_PREFIX = "base_model.model."


def split_by_threshold(values: dict[str, float], threshold: float) -> tuple[list[str], list[str]]:
    """(kept, pruned) module names: a module stays when its σ(α) ≥ threshold."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"`threshold` compares with σ(α) in [0, 1], got {threshold}.")
    broken = sorted(name for name, value in values.items() if not math.isfinite(value))
    if broken:
        raise ValueError(
            f"The structure gates of {len(broken)} module(s) hold NaN, e.g. {broken[0]!r} (training diverged), so they "
            "can be neither kept nor pruned. Prune a checkpoint saved before the loss went NaN."
        )
    kept = sorted(name for name, value in values.items() if value >= threshold)
    pruned = sorted(name for name, value in values.items() if value < threshold)
    if values and not kept:
        raise ValueError(
            f"`threshold`={threshold} would prune all {len(values)} adapted modules (the highest σ(α) is "
            f"{max(values.values()):.4f}), leaving an adapter with no modules, which cannot be loaded. Choose a "
            "threshold at or below the highest σ(α), or use the base model without the adapter."
        )
    return kept, pruned


def report(values: dict[str, float], kept: list[str], pruned: list[str]) -> str:
    lines = [f"kept {len(kept)} of {len(values)} adapted modules (σ(α) per module):"]
    lines += [f"  kept    {values[name]:.4f}  {name}" for name in kept]
    lines += [f"  pruned  {values[name]:.4f}  {name}" for name in pruned]
    return "\n".join(lines)


def prune_saved_adapter(src: str | Path, dst: str | Path, threshold: float) -> dict:
    """Write a pruned copy of the adapter folder `src` to the new folder `dst`; returns what stayed and what went.

    The other adapters a multi-adapter save holds (PEFT puts each in a subfolder named after it) are pruned alike,
    or copied unchanged where they have no structure gates (`result["other_adapters"]`: name -> result or None);
    other subfolders (Trainer checkpoints, ...) are left out (`result["left_out"]`).
    `dst` must not exist yet (nothing saved is overwritten); the copy is written to a temporary folder beside it and
    renamed into place, so an interrupted run leaves no half-written adapter.
    """
    src, dst = Path(src), Path(dst)
    if not (src / CONFIG).exists():
        raise missing_adapter_config(src, "`gatera prune` needs a saved GateRA adapter folder")
    if not (src / WEIGHTS).exists():
        if (src / PICKLED_WEIGHTS).exists():
            raise ValueError(f"{src} holds {PICKLED_WEIGHTS} (pickled weights): `gatera prune` reads and writes "
                             f"{WEIGHTS} only. Load the adapter (with GATERA_ALLOW_PICKLE=1 if you trust the file) and "
                             "save_pretrained it, which writes safetensors, then prune that copy.")
        raise FileNotFoundError(f"{src / WEIGHTS} is missing: `gatera prune` needs a saved GateRA adapter folder.")
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose a new output folder (nothing is overwritten).")
    blocking = file_in_the_way(dst)
    if blocking is not None:
        raise ValueError(f"--out {str(dst)!r}: {blocking} is a file, not a folder; choose an output folder elsewhere.")

    _refuse_unprunable(src, read_config(src))  # (before any folder is made; checked again under the lock)
    others, left_out = _other_adapters(src, dst)  # (listed before this prune's own folder may appear in `src`)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}-"))
    try:
        probe = partial / "mode"  # the mode `mkdir` gives under this umask (mkdtemp's is private to its owner)
        probe.mkdir()
        partial.chmod(probe.stat().st_mode & 0o7777)  # (setgid too, where the parent folder has it)
        probe.rmdir()
        with contextlib.ExitStack() as locks:  # one save's adapters, not two saves' (a save locks them in this order)
            for folder in (src, *others):
                locks.enter_context(folder_lock(folder, exclusive=False))
            result = _write_pruned(src, partial, threshold, required=True)
            result["other_adapters"], result["left_out"] = {}, left_out
            for folder in others:
                (partial / folder.name).mkdir()
                result["other_adapters"][folder.name] = _write_pruned(folder, partial / folder.name, threshold,
                                                                      required=False)
        try:
            partial.rename(dst)
        except OSError as error:
            if not dst.exists():
                raise
            raise FileExistsError(f"{dst} was created by someone else while the pruned copy was written; it is left "
                                  "as it is and nothing was written. Choose a new output folder.") from error
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return result


def _other_adapters(src: Path, dst: Path) -> tuple[list[Path], list[str]]:
    """The subfolders of `src` holding the other adapters of a multi-adapter save, and the names of those left out:
    Trainer checkpoints (`checkpoint-N`, or with a trainer_state.json), folders without an adapter, and `dst` (an
    output inside the source). Hidden folders (a save's staging) are passed over."""
    others, left_out = [], []
    for folder in sorted(path for path in src.iterdir() if path.is_dir() and not path.name.startswith(".")):
        adapter = ((folder / CONFIG).exists() and not is_trainer_checkpoint(folder)
                   and folder.resolve() != dst.resolve())
        (others.append(folder) if adapter else left_out.append(folder.name))
    return others, left_out


def _copy_files(src: Path, out: Path, leave_out: tuple[str, ...] = ()) -> None:
    """Copy the files (not the subfolders) of `src` into `out`, but those named in `leave_out`."""
    for extra in src.iterdir():
        if extra.is_file() and extra.name not in leave_out:
            shutil.copy2(extra, out / extra.name)


def _refuse_unprunable(src: Path, config: dict) -> None:
    """Raise where the adapter saved in `src` (its config `config`) is not a GateRA adapter with structure gates."""
    if not is_gatera_type(config.get("peft_type")):
        raise ValueError(f"{src} holds a {config.get('peft_type')!r} adapter, not a GateRA one.")
    if not config.get("structure_gate"):
        raise ValueError(f"{src} was trained without structure gates (structure_gate=False): nothing to prune by.")


def _write_pruned(src: Path, out: Path, threshold: float, required: bool) -> dict | None:
    """Write the pruned copy of the one adapter saved in `src` (its files, not its subfolders) into the folder `out`;
    an adapter without structure gates is refused where `required`, else copied unchanged (returns None). The
    caller holds `src`'s shared lock: its config and weights are one save's."""
    from safetensors.torch import load_file, save_file

    config = read_config(src)
    if required:
        _refuse_unprunable(src, config)
    gatera = is_gatera_type(config.get("peft_type"))
    if gatera:
        check_adapter_folder(src)  # checksum, structure stamp, readable tensors: prune only what would load
    if not (gatera and config.get("structure_gate")):
        _copy_files(src, out)
        return None
    state = load_file(src / WEIGHTS)
    _copy_files(src, out, leave_out=(CONFIG, WEIGHTS))  # README, tokenizer files, ... travel along
    check_tensors(state, src / WEIGHTS)
    values = {
        key.removesuffix(STRUCTURE_KEY).removeprefix(PEFT_PREFIX): torch.sigmoid(tensor.float()).item()
        for key, tensor in state.items()
        if key.endswith(STRUCTURE_KEY)
    }
    try:
        kept, pruned = split_by_threshold(values, threshold)
    except ValueError as error:
        raise ValueError(f"{src}: {error}") from None
    pruned_prefixes = tuple(PEFT_PREFIX + name + ".gatera_" for name in pruned)
    new_state = {k: v for k, v in state.items() if not k.startswith(pruned_prefixes)}
    config.update(target_modules=kept, layers_to_transform=None, layers_pattern=None)
    save_file(new_state, out / WEIGHTS, metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    stamp_config(out / CONFIG, out / WEIGHTS)
    return {"kept": kept, "pruned": pruned, "values": values,
            "tensors_before": len(state), "tensors_after": len(new_state)}
