"""Saving and loading GateRA adapters safely: atomic, locked saves; checksummed and stamped configs; no unpickling.

Installed on `import gatera_plugin`, wrappers around PEFT's functions act on GateRA adapters only:

- `PeftModel.save_pretrained` writes the whole adapter (weights, config, model card) into a staging folder
  `.gatera-save-*/adapter` inside the target, stamps into adapter_config.json the weights' SHA-256 (`weights_sha256`) and a
  stamp of its structure (`structure_stamp`: a digest of each structural field and of the weights' tensor names and
  shapes), then moves each file into place with an atomic rename, weights first and config last. An interrupted save
  leaves either the previous files or the new ones: never a truncated file. Should it stop between the two renames,
  the new weights meet the old config, whose checksum no longer matches: loading refuses that pair instead of mixing
  two saves, and the previous weights are still there as `adapter_model.safetensors.previous`.
- Saves into one folder from several processes (every data-parallel rank saving) are serialised by an exclusive
  `flock` on the folder around the renames; the last one to take the lock wins. Loads through PEFT
  (`PeftModel.from_pretrained`, `load_adapter`) and transformers' `load_adapter` hold a shared lock on the folder, so
  they never see half a save.
  Each save also removes the staging folders of saves that were killed (nobody holds their lock any more).
- On file systems that lack a feature this needs (locks on Lustre without `-o flock`, or where no lock manager runs:
  ENOLCK; hard links, renames or directory fsync on FUSE and bucket mounts), saves go on without it, as PEFT's own
  save would, after one warning per feature that says what is lost; the `.previous` copies are then real copies.
- `save_pretrained(safe_serialization=False)` is refused unless pickles are allowed (below): it would write a file
  this package refuses to load.
- `load_peft_weights` (what `from_pretrained` and `load_adapter` read through) checks a GateRA folder first (a local
  one, or a Hub adapter's copy in the Hugging Face cache, fetched as PEFT fetches it):
  weights present, readable (not truncated), floating-point, matching the config's checksum and structure stamp;
  non-finite values are reported with a warning (as at save time); pickled weights (`adapter_model.bin`) are
  refused unless the user opts in (`GATERA_ALLOW_PICKLE=1` or `with allow_pickle():`), because unpickling can run
  code. Which tensors the config expects is checked when they are loaded (`GateRAModel._remap_adapter_state_dict_for_load`).
- `PeftConfig.from_pretrained` runs the same folder checks for a GateRA folder with weights: transformers' own adapter
  loading (`AutoModelForCausalLM.from_pretrained(adapter_folder)`, `model.load_adapter`) reads the config that way and
  then the weights itself, past PEFT's loading; and its saved fields get `GateRAConfig.check_kwargs` (a field missing
  from an older save means what it meant then), as through `GateRAConfig.from_pretrained`.

Adapters saved before the structure stamp existed (no `structure_stamp` field; the format version is unchanged) still
load, with a warning: their tensor set, shapes and gate kinds are checked against the config, but an edit of a field
that leaves the tensors alike (`branch` hira / lora, `lora_alpha`, ...) cannot be detected. Re-saving stamps them.

Other PEFT methods go through untouched, but for a check that their config names a known method, a refusal of
GateRA weights beside another method's config, and, for a Hub adapter, one extra fetch of its config (to learn
its method).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from ._registration import PREFIX, SPELLINGS
from .fsdp import adapter_state_dict, is_sharded

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: saves are atomic per file but not serialised across processes)
    fcntl = None

WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
CONFIG = "adapter_config.json"
PREVIOUS = ".previous"
STAGING_PREFIX = ".gatera-save-"
STAMP = "structure_stamp"
# The config fields that decide which tensors exist and what they compute: edited after the save, the same weights
# would give another model. Inference-only or training-only options (kernel, cache_delta, dropout, penalty weights)
# are left out. `sparse_threshold` is in: it changes eval outputs (set it on the loaded model's config instead).
STRUCTURE_FIELDS = (
    "branch", "gate", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "structure_gate", "modules_to_save", "trainable_token_indices",
    "sparse_threshold", "hira_scaling", "ensure_weight_tying", "gate_bias_init", "structure_init",
)
# STRUCTURE_FIELDS that existed before saves stamped them (the gates' initial values, which set hira_scaling="lora"'s
# scale): a stamp without them was written before, and holds nothing to compare them with
STAMPED_SINCE_LATER = ("gate_bias_init", "structure_init")
_MARK = "__gatera_wrapped__"
_allow_pickle_depth = 0
_loading = contextvars.ContextVar("gatera_loading", default=None)  # ((model_id, subfolder), folder) of the load under way
# `load_adapter(..., ignore_mismatched_sizes=True)` under way (PEFT hands the flag to its own shape check only)
ignoring_mismatched_sizes = contextvars.ContextVar("gatera_ignoring_mismatched_sizes", default=False)
# a config is being read from a saved folder (`PeftConfig.from_pretrained` and every load through it): GateRAConfig
# then skips the refusals meant for a new adapter's settings (what was saved must load)
reading_saved_config = contextvars.ContextVar("gatera_reading_saved_config", default=False)


@contextlib.contextmanager
def allow_pickle():
    """Within this block, GateRA adapters saved as pickled `adapter_model.bin` may be loaded (trusted files only)."""
    global _allow_pickle_depth
    _allow_pickle_depth += 1
    try:
        yield
    finally:
        _allow_pickle_depth -= 1


def _pickle_allowed() -> bool:
    return _allow_pickle_depth > 0 or os.environ.get("GATERA_ALLOW_PICKLE", "0") == "1"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def is_gatera_type(peft_type) -> bool:
    return str(getattr(peft_type, "value", peft_type)) in SPELLINGS


def _is_gatera(peft_model) -> bool:
    configs = getattr(peft_model, "peft_config", {}) or {}
    return any(is_gatera_type(getattr(c, "peft_type", "")) for c in configs.values())


def loading_source() -> str:
    """The weights file being loaded by `from_pretrained` / `load_adapter` right now (for messages), or its bare name."""
    current = _loading.get()
    return str(current[1] / WEIGHTS) if current else WEIGHTS


# ------------------------------------------------------------------------------------------------- stamps
def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _unset_pattern_as_empty(name: Optional[str], value):
    """`value` of config field `name`, with an unset (None) `rank_pattern` / `alpha_pattern` as {} (PEFT's meaning)."""
    return {} if name in ("rank_pattern", "alpha_pattern") and value is None else value


def _canonical(name: str, value) -> str:
    """One JSON spelling per meaning, for the saved stamps (which must not change): module lists in any order, unset
    patterns as {}."""
    value = _unset_pattern_as_empty(name, value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        value = sorted(value)
    if name in STAMPED_SINCE_LATER and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # (0 and 0.0 build the same gates)
    return json.dumps(value, sort_keys=True)


def tensor_signature(weights: Path) -> str:
    """Digest of the weights file's tensor names and shapes (not values: those are `weights_sha256`'s job)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        rows = sorted(f"{key}:{list(handle.get_slice(key).get_shape())}" for key in handle.keys())
    return _digest("tensors", *rows)


def structure_stamp(config: dict, weights: Path) -> dict[str, str]:
    """{field: digest} over STRUCTURE_FIELDS and "tensors" (names and shapes in `weights`)."""
    stamp = {name: _digest(name, _canonical(name, config.get(name))) for name in STRUCTURE_FIELDS}
    stamp["tensors"] = tensor_signature(weights)
    return stamp


def stamp_config(config_path: Path, weights: Path) -> None:
    """Write `weights_sha256` and `structure_stamp` of `weights` into the adapter_config.json at `config_path`."""
    config = json.loads(config_path.read_text())
    config["weights_sha256"] = file_sha256(weights)
    config[STAMP] = structure_stamp(config, weights)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _added_after_the_save(name: str, stamp: dict, config: dict) -> bool:
    """True when field `name` did not exist when the adapter was saved (its stamp has no entry for it) and the
    config holds nothing for it, or the value it meant then (`BEFORE_FIELD_EXISTED`)."""
    from .config import BEFORE_FIELD_EXISTED

    return name not in stamp and config.get(name, BEFORE_FIELD_EXISTED.get(name)) == BEFORE_FIELD_EXISTED.get(name)


def _check_stamp(config: dict, config_path: Path, weights: Path) -> None:
    stamp = config.get(STAMP)
    if stamp is None:
        warnings.warn(
            f"{config_path} has no {STAMP} (saved by an earlier gatera_plugin): the tensors are checked against it, but "
            "an edit of `branch` or `lora_alpha` cannot be detected. Re-save the adapter (save_pretrained) to stamp it.",
            UserWarning, stacklevel=4,
        )
        return
    if not isinstance(stamp, dict) or not all(isinstance(v, str) for v in stamp.values()):
        raise ValueError(f"{config_path}: field `{STAMP}` is not the stamp save_pretrained writes ({stamp!r}). "
                         "Restore the file from a checkpoint or re-save the adapter.")
    expected = structure_stamp(config, weights)
    edited = [name for name in STRUCTURE_FIELDS if stamp.get(name) != expected[name]
              and not _added_after_the_save(name, stamp, config)
              and not (name in STAMPED_SINCE_LATER and name not in stamp)]
    if edited:
        raise ValueError(
            f"{config_path}: field(s) {', '.join(f'`{n}`' for n in edited)} differ from what the save recorded in "
            f"`{STAMP}`, so the config no longer describes {weights.name} and would build another model. Restore the "
            "saved value(s) (or the file from a checkpoint). To use the weights differently, load them and change "
            "the model, then save_pretrained again."
        )
    if stamp.get("tensors") != expected["tensors"]:
        raise ValueError(
            f"{weights}: its tensor names or shapes differ from those recorded in {config_path.name} (`{STAMP}`): the "
            "weights file was rewritten after the save. Restore it from a checkpoint or save the adapter again."
        )


def check_tensors(state: dict, source) -> None:
    """Refuse non-floating GateRA tensors (`.gatera_` keys; other modules saved along, `modules_to_save`, may hold
    integer buffers such as BatchNorm's `num_batches_tracked`); warn, naming them, about tensors holding NaN or inf."""
    import torch

    not_float = [f"{k} ({v.dtype})" for k, v in state.items() if ".gatera_" in k and not torch.is_floating_point(v)]
    if not_float:
        raise ValueError(f"{source} holds non-floating-point adapter tensors: {', '.join(not_float[:5])}. GateRA "
                         "saves floating-point tensors only: the file was modified. Restore it from a checkpoint.")
    broken = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if broken:
        warnings.warn(
            f"{source}: {len(broken)} adapter tensor(s) hold NaN or inf, e.g. {', '.join(broken[:5])}. The adapter's "
            "outputs will be NaN or inf; training probably diverged (lower the learning rate, use an earlier "
            "checkpoint).", UserWarning, stacklevel=3,
        )


# ------------------------------------------------------------------------------------------------- file systems
@dataclasses.dataclass(frozen=True)
class _Feature:
    """A file-system feature that saves use where it exists: the errors by which a file system says that it lacks it
    (rather than that the call failed), and what is lost without it (None: nothing, so no warning)."""

    name: str
    lacking: frozenset
    without: Optional[str]


# Lustre mounted without `-o flock` (ENOSYS), no lock manager (ENOLCK), FUSE and bucket mounts (the others)
LOCKS = _Feature("file locks (flock)", frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}),
                 "saves and loads there are not serialised across processes")
FSYNC = _Feature("fsync", frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS}),
                 "a save there may not survive a power loss")
HARD_LINKS = _Feature("hard links", frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS}), None)
RENAMES = _Feature("renaming files", frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}),
                   "files there are replaced by copying: an interrupted save can leave a partly written file")
_warned_lacking: set[str] = set()


def _without(feature: _Feature, folder: Path, call, fallback=lambda: None):
    """`call()`; where the file system of `folder` lacks `feature`, `fallback()` instead, after one warning per
    feature and process that says what is lost. Any other error is raised."""
    try:
        return call()
    except OSError as error:
        if error.errno not in feature.lacking:
            raise
        if feature.without is not None and feature.name not in _warned_lacking:
            _warned_lacking.add(feature.name)
            warnings.warn(
                f"GateRA: the file system of {folder} does not support {feature.name} ({error.strerror}), so "
                f"{feature.without}. Saving and loading go on all the same; this is said once per process.",
                UserWarning, stacklevel=4,
            )
        return fallback()


# ------------------------------------------------------------------------------------------------- locks
def _open_dir(folder: Path):
    try:
        return os.open(folder, os.O_RDONLY)
    except OSError:
        return None


@contextlib.contextmanager
def folder_lock(folder: Path, exclusive: bool):
    """`flock` on the folder itself: exclusive while a save renames files into it, shared while a load reads it.

    A killed process's lock is released by the kernel. Without `fcntl` (Windows), nothing is locked; on file systems
    that refuse locks (Lustre without `-o flock`, no lock manager: ENOLCK), nothing is locked, after a warning.
    """
    fd = _open_dir(folder) if fcntl is not None else None
    if fd is not None:
        try:
            _without(LOCKS, folder, lambda: fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH))
        except BaseException:
            os.close(fd)
            raise
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def _locks(folders: list[Path]):
    with contextlib.ExitStack() as stack:
        for folder in folders:
            stack.enter_context(folder_lock(folder, exclusive=True))
        yield


def _remove_dead_staging(target: Path) -> None:
    """Remove `.gatera-save-*` folders whose save was killed: nobody holds their lock. Call under the folder's lock."""
    if fcntl is None:
        return
    for path in target.glob(STAGING_PREFIX + "*"):
        fd = _open_dir(path) if path.is_dir() else None
        if fd is None:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a save in progress holds it (or the file system has no locks, and nobody can tell)
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = _open_dir(path)
    if fd is None:  # pragma: no cover (platforms without directory fds)
        return
    try:
        _without(FSYNC, path, lambda: os.fsync(fd))
    finally:
        os.close(fd)


def _keep_previous(destination: Path, backup: Path) -> None:
    """Keep `destination` reachable as `backup`: a hard link, or a copy where the file system has no hard links."""
    backup.unlink(missing_ok=True)
    _without(HARD_LINKS, destination.parent, lambda: os.link(destination, backup),
             lambda: shutil.copy2(destination, backup))


def _replace(source: Path, destination: Path) -> None:
    """`os.replace`, or where the file system cannot rename files, a copy into `destination` in place (its name never
    disappears), after giving a `.previous` hard link to it a copy of its own, so that the backup keeps the old
    content."""

    def copy():
        backup = destination.with_name(destination.name + PREVIOUS)
        if backup.exists() and os.path.samefile(backup, destination):
            backup.unlink()
            shutil.copy2(destination, backup)
        shutil.copyfile(source, destination)

    _without(RENAMES, destination.parent, lambda: os.replace(source, destination), copy)


# ------------------------------------------------------------------------------------------------- saving
def _move_into_place(staging: Path, target: Path) -> None:
    """Rename every staged file to its place in `target`: weights first, configs last, each atomically.

    Until the last rename, each replaced file stays reachable as `<name>.previous` (a hard link, so the file itself
    never disappears); the copies are removed once the new adapter is complete. Call under the folders' locks.
    """
    files = [p for p in staging.rglob("*") if p.is_file()]
    files.sort(key=lambda p: (p.name == CONFIG, str(p)))
    backups = []
    for source in files:
        destination = target / source.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as handle:
            _without(FSYNC, target, lambda: os.fsync(handle.fileno()))
        if destination.exists() and destination.name in (WEIGHTS, CONFIG):
            backup = destination.with_name(destination.name + PREVIOUS)
            _keep_previous(destination, backup)
            backups.append(backup)
        _replace(source, destination)
        _fsync_dir(destination.parent)
        if source.name in (WEIGHTS, PICKLED_WEIGHTS):
            # the previous save's weights in the other format are replaced too: left there, loads (PEFT's and
            # transformers', which prefer safetensors) could read them with this save's config
            other = destination.with_name(PICKLED_WEIGHTS if source.name == WEIGHTS else WEIGHTS)
            if other.exists() and not source.with_name(other.name).exists():
                backup = other.with_name(other.name + PREVIOUS)
                _keep_previous(other, backup)
                backups.append(backup)
                other.unlink()
                _fsync_dir(other.parent)
    for backup in backups:
        backup.unlink(missing_ok=True)


def _stamp_and_check(staging: Path, target: Path) -> None:
    from safetensors.torch import load_file

    for config_path in staging.rglob(CONFIG):
        weights = config_path.parent / WEIGHTS
        if weights.exists():
            stamp_config(config_path, weights)
            check_tensors(load_file(weights), target / weights.relative_to(staging))
        elif (config_path.parent / PICKLED_WEIGHTS).exists():  # (allowed pickles) their checksum, without unpickling
            config = json.loads(config_path.read_text())
            config["weights_sha256"] = file_sha256(config_path.parent / PICKLED_WEIGHTS)
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _check_complete(peft_model, staging: Path, target: Path) -> None:
    """Refuse a save whose weights file lacks some of a trained adapter's tensors, before anything is moved into place.

    The expected tensors are found from the GateRA layers themselves (`model.adapter_tensors`), independently of how
    PEFT selects and names them: a selection that misses tensors (as PEFT 0.21 did under torch's checkpoint wrappers)
    fails here instead of writing an adapter that cannot be loaded. A frozen adapter (e.g. a reference adapter beside
    the trained one) that arrives incomplete gets a warning instead: DeepSpeed ZeRO-3's consolidated state dict, which
    the Trainer saves, leaves frozen parameters out.
    """
    from safetensors import safe_open

    from .model import adapter_tensors

    for name in peft_model.peft_config:
        weights = (staging if name == "default" else staging / name) / WEIGHTS
        if not weights.exists():
            continue
        tensors = adapter_tensors(peft_model, name)
        with safe_open(str(weights), framework="pt") as f:
            saved = sum(PREFIX in key for key in f.keys())
        if saved >= len(tensors):
            continue
        counts = f"the adapter {name!r} to be saved to {target} holds {saved} of its {len(tensors)} tensors"
        if not any(t.requires_grad for t in tensors):
            warnings.warn(
                f"GateRA: {counts}; it is frozen, and it is written without them (DeepSpeed ZeRO-3 leaves frozen "
                "parameters out of the state dict it saves). Save that adapter on its own if you need it.",
                stacklevel=3,
            )
            continue
        raise RuntimeError(
            f"GateRA: {counts}, so nothing was written (an adapter already there is kept). The model's parameter "
            "names and its state dict's keys disagree, e.g. under a wrapper module that this release does not know; "
            "please report it with the model's wrapping (FSDP, activation checkpointing, compile)."
        )


def _holds_whole_tensors(staging: Path, target: Path) -> bool:
    """Whether the weights PEFT wrote into `staging` hold no empty tensor, as those of a model partitioned by DeepSpeed
    ZeRO-3 do when it is saved without gathering them (`model.save_pretrained` instead of `trainer.save_model`).

    Such a save is refused on global rank 0 (or without a process group), before anything is moved into place; on
    another rank it is skipped with a warning: there the rank's parts would overwrite what rank 0 writes.
    """
    from safetensors import safe_open

    empty = []
    for weights in staging.rglob(WEIGHTS):
        with safe_open(str(weights), framework="pt") as f:
            empty += [key for key in f.keys() if 0 in f.get_slice(key).get_shape()]
    if not empty:
        return True
    what = (f"the adapter to be saved to {target} has {len(empty)} empty tensor(s), e.g. {empty[0]}: the model's "
            "parameters are partitioned by DeepSpeed ZeRO-3 and this save did not gather them")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        warnings.warn(f"GateRA: {what}. Rank {dist.get_rank()} writes nothing; rank 0's save (trainer.save_model "
                      "gathers the adapter) is the one kept.", UserWarning, stacklevel=3)
        return False
    raise ValueError(
        f"GateRA: {what}, so nothing was written (an adapter already there is kept). Save with "
        "`trainer.save_model(out)` on every rank, which gathers them, or call save_pretrained inside "
        "`deepspeed.zero.GatheredParameters(list(model.parameters()))`."
    )


def _warn_if_replacing_another_method(folder: Path) -> None:
    if (folder / CONFIG).exists():
        peft_type = _peft_type(folder)
        if not is_gatera_type(peft_type):
            what = peft_type or "unreadable"
            warnings.warn(f"Saving a GateRA adapter over the {what} adapter in {folder}.", UserWarning, stacklevel=3)


def _refuse_pickle(options: dict) -> None:
    if not options.get("safe_serialization", True) and not _pickle_allowed():
        raise ValueError(
            "save_pretrained(safe_serialization=False) would write pickled weights (adapter_model.bin), which GateRA "
            "loads only with GATERA_ALLOW_PICKLE=1 or inside `with gatera_plugin.allow_pickle():` (unpickling can run "
            "code). Save with safe_serialization=True (the default, and what the Trainer does), or opt in to "
            "pickles as above."
        )


def wrap_save_pretrained(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        options = signature.bind_partial(self, save_directory, *args, **kwargs).arguments  # also those given by position
        main = options.get("is_main_process", True)
        if _is_gatera(self) and kwargs.get("state_dict") is None and is_sharded(self):
            # FSDP2: every rank gathers, the main one keeps and writes
            embeddings = options.get("save_embedding_layers", "auto")
            kwargs["state_dict"] = adapter_state_dict(self, embeddings, keep=main)
        if not _is_gatera(self) or not main or os.path.isfile(save_directory):
            return original(self, save_directory, *args, **kwargs)
        _refuse_pickle(options)
        target = Path(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        with folder_lock(target, exclusive=True):  # no window in which another save could take our staging folder
            _remove_dead_staging(target)
            alive = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))
            own = _open_dir(alive)
            if own is not None and fcntl is not None:
                _without(LOCKS, alive, lambda: fcntl.flock(own, fcntl.LOCK_EX))  # held until the save ends: alive
        # PEFT writes one level further down: the leftovers of a killed save then hold no adapter files directly, which
        # the Trainer, resuming from a checkpoint, would take for a second adapter named after the staging folder
        staging = alive / "adapter"
        try:
            staging.mkdir()
            if (target / "README.md").exists():  # PEFT updates an existing model card rather than replacing it
                shutil.copy2(target / "README.md", staging / "README.md")
            original(self, str(staging), *args, **kwargs)
            if not _holds_whole_tensors(staging, target):
                return
            _check_complete(self, staging, target)
            _stamp_and_check(staging, target)
            for config in staging.rglob(CONFIG):  # the folders whose adapter this save replaces
                _warn_if_replacing_another_method(target / config.parent.relative_to(staging))
            subfolders = sorted({target / p.parent.relative_to(staging) for p in staging.rglob("*") if p.is_file()})
            for folder in subfolders:
                folder.mkdir(parents=True, exist_ok=True)
            with _locks([target] + [f for f in subfolders if f != target]):
                _move_into_place(staging, target)
        finally:
            shutil.rmtree(alive, ignore_errors=True)
            if own is not None:
                os.close(own)

    setattr(save_pretrained, _MARK, True)
    return save_pretrained


# ------------------------------------------------------------------------------------------------- loading
def saved_vocabulary_size(folder: Path, model) -> int | None:
    """Rows of the input embedding that the adapter in `folder` was trained with, where it saved that embedding (PEFT
    does when new tokens resized it, or `modules_to_save` names it), else None; `model`: the base model it loads onto,
    to name its input embedding."""
    from safetensors import safe_open

    from .model import _embedding_name

    weights = Path(folder) / "adapter_model.safetensors"
    name = _embedding_name(model)
    if not weights.is_file() or not name:
        return None
    with safe_open(str(weights), framework="pt") as handle:
        rows = [handle.get_slice(key).get_shape()[0] for key in handle.keys()
                if key.removeprefix("base_model.model.").startswith(name + ".") and key.endswith(".weight")]
    return max(rows) if rows else None


def file_in_the_way(path: Path) -> Optional[Path]:
    """The file that an output `path` would have to be created below (its nearest existing ancestor, where that is a
    file, not a folder), else None."""
    parent = next((p for p in Path(path).absolute().parents if p.exists()), None)
    return parent if parent is not None and not parent.is_dir() else None


def read_config(folder: Path) -> dict:
    path = folder / CONFIG
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore it from a checkpoint or re-save the adapter.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object; restore it or re-save the adapter.")
    return config


def _files_signature(folder: Path) -> tuple:
    """(inode, size, mtime) of the config and weights files in `folder`, what changes when either is rewritten, and
    whether pickles are allowed now (a pickled adapter that passed under `allow_pickle` is refused outside it)."""
    signature = [_pickle_allowed()]
    for name in (CONFIG, WEIGHTS, PICKLED_WEIGHTS):
        try:
            stat = (folder / name).stat()
            signature.append((name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        except OSError:
            signature.append((name, None))
    return tuple(signature)


_passed_checks: dict[str, tuple] = {}  # folder -> _files_signature when it last passed check_adapter_folder


def checkpoint_step(folder: Path) -> Optional[int]:
    """N of a Trainer checkpoint folder `checkpoint-N`; None for any other name."""
    match = re.fullmatch(r"checkpoint-(\d+)", Path(folder).name)
    return int(match[1]) if match else None


def is_trainer_checkpoint(folder: Path) -> bool:
    """Whether `folder` is a Trainer checkpoint (`checkpoint-N`, or one holding trainer_state.json), not an adapter
    saved under its name."""
    return checkpoint_step(folder) is not None or (Path(folder) / "trainer_state.json").exists()


def missing_adapter_config(folder: Path, needs: str) -> FileNotFoundError:
    """The error for an adapter folder without adapter_config.json, `needs` saying what the caller takes. A save under
    another adapter name than "default" (or with `selected_adapters`) puts each adapter in a subfolder named after it:
    those are named; so are a Trainer output folder's checkpoints (the last one suggested)."""
    folder = Path(folder)
    if not folder.is_dir():
        return FileNotFoundError(f"{folder} {'is a file' if folder.exists() else 'does not exist'}: {needs}.")
    held = [path.parent for path in folder.glob(f"*/{CONFIG}")]
    checkpoints = sorted((path for path in held if is_trainer_checkpoint(path)),
                         key=lambda path: (checkpoint_step(path) or -1, path.name))
    named = sorted(path.name for path in held if path not in checkpoints)
    hint = ""
    if named:
        hint = (f"; it holds adapters saved under their names in subfolders ({', '.join(named)}): pass one of them, "
                f"e.g. {folder / named[0]}")
    elif checkpoints:
        hint = (f"; it holds Trainer checkpoints ({', '.join(path.name for path in checkpoints)}): pass one, e.g. the "
                f"last, {checkpoints[-1]}")
    return FileNotFoundError(f"{folder / CONFIG} is missing: {needs}{hint}.")


def check_adapter_folder(folder: Path) -> None:
    """Refuse, with the reason and the fix, a local GateRA adapter folder whose weights cannot be trusted.

    A folder whose files are unchanged since they last passed is not read again (AutoPeftModel reads the config, then
    loads the adapter: one check, one checksum of the weights)."""
    signature = _files_signature(folder)
    if _passed_checks.get(str(folder)) == signature:
        return
    _check_adapter_files(folder)
    _passed_checks[str(folder)] = signature


def _check_adapter_files(folder: Path) -> None:
    weights, pickled = folder / WEIGHTS, folder / PICKLED_WEIGHTS
    config = read_config(folder)
    if not weights.exists():
        if pickled.exists():
            _check_checksum(config, pickled)  # (reads bytes, unpickles nothing: an interrupted save is said first)
            if _pickle_allowed():
                return
            raise ValueError(
                f"{pickled} holds pickled weights: GateRA loads safetensors only, because unpickling a file can run "
                "code. If you trust this file, opt in with GATERA_ALLOW_PICKLE=1 or `with gatera_plugin.allow_pickle():`"
                ", then re-save the adapter (save_pretrained writes safetensors)."
            )
        raise FileNotFoundError(
            f"{folder} has {CONFIG} but no {WEIGHTS}: the save was interrupted or the file was removed. Restore the "
            "adapter from a checkpoint (checkpoint-*/) or save it again."
        )
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except Exception as error:  # safetensors raises its own error types for bad headers and short files
        raise ValueError(
            f"{weights} is corrupted or truncated ({type(error).__name__}: {error})." + _how_to_restore(weights)
        ) from error
    expected = config.get("weights_sha256")
    if config.get(STAMP) is not None and not (isinstance(expected, str) and expected):
        raise ValueError(f"{folder / CONFIG}: field `weights_sha256` is {expected!r}, but a stamped save always writes "
                         "the weights' SHA-256 there. Restore the file from a checkpoint or re-save the adapter.")
    _check_checksum(config, weights)
    _check_stamp(config, folder / CONFIG, weights)


def _how_to_restore(weights: Path) -> str:
    """How to get back the adapter that an interrupted save over `weights` replaced: its `.previous` weights (in
    either format: the save may have changed it), else a checkpoint."""
    for name in (weights.name, PICKLED_WEIGHTS if weights.name == WEIGHTS else WEIGHTS):
        previous = weights.with_name(name + PREVIOUS)
        if previous.exists():
            remove = f" and remove {weights.name}" if name != weights.name else ""
            return f" The previous adapter's weights are kept as {previous.name}: rename it to {name}{remove} to restore it."
    return " Restore the adapter from a checkpoint (checkpoint-*/) or save it again."


def _check_checksum(config: dict, weights: Path) -> None:
    expected = config.get("weights_sha256")
    if expected and file_sha256(weights) != expected:
        raise ValueError(
            f"{weights} does not match the checksum saved in {CONFIG}: the two files come from different saves (an "
            "interrupted save_pretrained) or the weights were modified." + _how_to_restore(weights)
        )


def _refuse_a_replaced_config(folder: Path, peft_type) -> None:
    """Another method's config (`peft_type`) beside GateRA weights: the config was replaced or edited."""
    if _holds_gatera_weights(folder):
        raise ValueError(
            f"{folder / CONFIG} describes a {peft_type} adapter, but {WEIGHTS} there holds GateRA weights "
            "(gatera_* tensors): the config was replaced. Restore the GateRA adapter_config.json (from a "
            "checkpoint) before loading."
        )


def _holds_gatera_weights(folder: Path) -> bool:
    weights = folder / WEIGHTS
    if not weights.exists():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            return any(".gatera_" in key for key in handle.keys())
    except Exception:  # unreadable weights: PEFT's own loading reports them
        return False


def _local_folder(model_id, subfolder=None) -> Path | None:
    """The local adapter folder `model_id` (/ `subfolder`) names, if it is one holding adapter_config.json."""
    try:
        folder = Path(model_id) / subfolder if subfolder else Path(model_id)
    except TypeError:
        return None
    return folder if folder.is_dir() and (folder / CONFIG).is_file() else None


def _download_options(options: dict) -> dict:
    """The options of a load that PEFT passes on to `hf_hub_download` (as PEFT selects them: by its signature)."""
    from huggingface_hub import hf_hub_download

    accepted = set(inspect.signature(hf_hub_download).parameters) - {"repo_id", "filename"}
    download = {key: value for key, value in options.items() if key in accepted and value is not None}
    if options.get("use_auth_token") is not None:
        download.setdefault("token", options["use_auth_token"])
    return download


def _hub_folder(model_id, options: dict, fetch_weights: bool) -> Path | None:
    """For a Hub adapter `model_id`: the folder of its local copy (the Hugging Face cache's snapshot), with its config
    fetched there as PEFT fetches it and, for a GateRA adapter when `fetch_weights`, its weights too, so that a Hub
    adapter gets the checks of a local one. None where `model_id` is no Hub adapter that can be fetched, or its weights
    cannot be (PEFT's own load then says why)."""
    if not isinstance(model_id, str) or os.path.exists(model_id):
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    download = _download_options(options)
    try:
        folder = Path(hf_hub_download(model_id, CONFIG, **download)).parent
    except Exception:  # not a repository id, not found, offline and not cached: PEFT's own load says which
        return None
    if fetch_weights and is_gatera_type(_peft_type(folder)):
        for weights in (WEIGHTS, PICKLED_WEIGHTS):
            try:
                hf_hub_download(model_id, weights, **download)
                return folder
            except EntryNotFoundError:  # not this one: the next
                continue
            except Exception:  # network, access: PEFT's own load says which
                return None
        return None
    return folder


def _adapter_folder(model_id, options: dict, fetch_weights: bool = True) -> Path | None:
    """The local folder of adapter `model_id` (/ `subfolder`): the folder itself, or a Hub adapter's local copy."""
    return _local_folder(model_id, options.get("subfolder")) or _hub_folder(model_id, options, fetch_weights)


def _peft_type(folder: Path):
    """The `peft_type` of the adapter config in `folder`, or None where it cannot be read (PEFT reports that)."""
    try:
        return json.loads((folder / CONFIG).read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None


def _load_key(model_id, options: dict) -> tuple:
    return str(model_id), options.get("subfolder")


def _under_way(model_id, options: dict) -> bool:
    """Whether a load of this adapter that has checked its folder is under way (a nested read of the same adapter)."""
    current = _loading.get()
    return current is not None and current[0] == _load_key(model_id, options)


def wrap_load_peft_weights(original):
    @functools.wraps(original)
    def load_peft_weights(model_id, *args, **kwargs):
        checked = _under_way(model_id, kwargs)  # by the load this read is part of
        folder = _loading.get()[1] if checked else _adapter_folder(model_id, kwargs)
        gatera = False
        if folder is not None:
            peft_type = read_config(folder).get("peft_type")
            gatera = is_gatera_type(peft_type)
            if not checked:  # (a load that checked the folder, `_reading`, has made these checks)
                if gatera:
                    check_adapter_folder(folder)
                else:
                    _refuse_a_replaced_config(folder, peft_type)
        state = original(model_id, *args, **kwargs)
        if gatera:
            check_tensors(state, folder / WEIGHTS if (folder / WEIGHTS).exists() else folder / PICKLED_WEIGHTS)
        return state

    setattr(load_peft_weights, _MARK, True)
    return load_peft_weights


@contextlib.contextmanager
def _reading(model_id, kwargs):
    """For the length of a load from a local folder (or a Hub adapter's local copy): a shared lock on it, and its
    checks, before PEFT builds anything from the config (an edited config could otherwise fail deep inside PEFT, or
    build another model).

    Checks that the config parses and names a PEFT method this installation knows (PEFT would fail with a bare
    KeyError; a config given to the load, which PEFT uses instead, may lack the field), then, for GateRA folders,
    `check_adapter_folder`. Reads of the same adapter nested in it (PEFT's own
    config read, `load_peft_weights`) neither look it up nor check it again.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    folder = None if _under_way(model_id, kwargs) else _adapter_folder(model_id, kwargs)
    if folder is None:
        yield
        return
    given = kwargs.get("config") if kwargs.get("config") is not None else kwargs.get("peft_config")
    if given is not None:  # PEFT builds the adapter from this config and does not read the saved one
        gatera = is_gatera_type(getattr(given, "peft_type", None))
    else:
        peft_type = read_config(folder).get("peft_type")
        if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
            import peft

            raise ValueError(
                f"{folder / CONFIG}: field `peft_type` is {peft_type!r}, not a PEFT method peft {peft.__version__} "
                "knows (a GateRA adapter has \"GATERA\"). If the file was edited or damaged, restore it from a "
                "checkpoint or re-save it; if another PEFT release saved it (a method added since), load it with "
                "that release."
            )
        gatera = is_gatera_type(peft_type)
        if not gatera:  # (before PEFT builds that method's model from a GateRA config's fields)
            _refuse_a_replaced_config(folder, peft_type)
    with folder_lock(folder, exclusive=False) if gatera else contextlib.nullcontext():
        if gatera:
            check_adapter_folder(folder)
        token = _loading.set((_load_key(model_id, kwargs), folder))
        try:
            yield
        finally:
            _loading.reset(token)


def wrap_config_from_pretrained(original):
    """`PeftConfig.from_pretrained`, which transformers' own adapter loading (`PeftAdapterMixin`: `from_pretrained` on an
    adapter folder, `model.load_adapter`) calls before reading the weights itself, past PEFT's loading: a GateRA folder
    with weights gets `check_adapter_folder` there, unless a load that checked it is under way. Other methods' configs,
    a config alone (`config.save_pretrained`) and Hub weights not fetched yet are left alone; nothing is downloaded
    beyond the config PEFT reads."""

    @functools.wraps(original.__func__)
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        options = dict(kwargs, subfolder=subfolder)
        if not _under_way(pretrained_model_name_or_path, options):
            folder = _adapter_folder(pretrained_model_name_or_path, options, fetch_weights=False)
            if (folder is not None and is_gatera_type(_peft_type(folder))
                    and ((folder / WEIGHTS).exists() or (folder / PICKLED_WEIGHTS).exists())):
                with folder_lock(folder, exclusive=False):
                    check_adapter_folder(folder)
        token = reading_saved_config.set(True)
        try:
            return original.__get__(None, cls)(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        finally:
            reading_saved_config.reset(token)

    setattr(from_pretrained, _MARK, True)
    return classmethod(from_pretrained)


def wrap_check_kwargs(original):
    """`PeftConfig.check_kwargs`, which PEFT's config loading calls on the saved fields with the class it was called on
    (`PeftConfig.from_pretrained`: transformers' `load_adapter`, AutoPeftModel): saved GateRA fields get
    `GateRAConfig.check_kwargs` whichever class reads them, so that a field missing from an older save means what it
    meant then (`BEFORE_FIELD_EXISTED`), as through `GateRAConfig.from_pretrained`."""

    @functools.wraps(original.__func__)
    def check_kwargs(cls, **kwargs):
        from .config import GateRAConfig

        if is_gatera_type(kwargs.get("peft_type")) and not issubclass(cls, GateRAConfig):
            return GateRAConfig.check_kwargs(**kwargs)
        return original.__get__(None, cls)(**kwargs)

    setattr(check_kwargs, _MARK, True)
    return classmethod(check_kwargs)


def wrap_from_pretrained(original):
    @functools.wraps(original.__func__)
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        with _reading(model_id, kwargs):
            return original.__get__(None, cls)(model, model_id, *args, **kwargs)

    setattr(from_pretrained, _MARK, True)
    return classmethod(from_pretrained)


def wrap_load_adapter(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self, model_id, *args, **kwargs):
        token = ignoring_mismatched_sizes.set(bool(kwargs.get("ignore_mismatched_sizes", False)))
        try:
            with _reading(model_id, kwargs):
                loading = _loading.get()
                if loading is not None:
                    adapter_name = signature.bind(self, model_id, *args, **kwargs).arguments.get("adapter_name")
                    _refuse_another_structure(self, loading[1], adapter_name)
                return original(self, model_id, *args, **kwargs)
        finally:
            ignoring_mismatched_sizes.reset(token)

    setattr(load_adapter, _MARK, True)
    return load_adapter


def _structure_key(name: Optional[str], value):
    """`value` of config field `name` in one spelling per meaning, to compare a config in memory with a saved one:
    numbers as floats, module lists and layer indices as sorted sets (PEFT extends `modules_to_save` in place, so a
    reused config holds duplicates), one layer index or pattern as a list of one, unset patterns as {}. (`name` None:
    an item inside a field's value.)"""
    value = _unset_pattern_as_empty(name, value)
    if name in ("layers_to_transform", "layers_pattern") and isinstance(value, (int, str)):
        value = [value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return tuple(sorted((str(key), _structure_key(None, item)) for key, item in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(sorted({_structure_key(None, item) for item in value}, key=repr))
    return repr(value)


def _refuse_another_structure(peft_model, folder: Path, adapter_name) -> None:
    """`load_adapter` into an adapter the model has already (the Trainer's resume does so) keeps that adapter's
    config, as PEFT does: refuse where the folder's config builds another model (a STRUCTURE_FIELDS value differs:
    another branch, gate, scale, ...), which would otherwise take its weights silently."""
    existing = (getattr(peft_model, "peft_config", None) or {}).get(adapter_name)
    if existing is None or not is_gatera_type(getattr(existing, "peft_type", None)):
        return  # (a load into a new name, the usual case, reads nothing more)
    saved = read_config(folder)
    if not is_gatera_type(saved.get("peft_type")):
        return
    from .config import BEFORE_FIELD_EXISTED, GateRAConfig

    defaults = {field.name: None if field.default is dataclasses.MISSING else field.default
                for field in dataclasses.fields(GateRAConfig)}
    saved, now = {**defaults, **BEFORE_FIELD_EXISTED, **saved}, existing.to_dict()
    differing = [name for name in STRUCTURE_FIELDS
                 if _structure_key(name, saved.get(name)) != _structure_key(name, now.get(name))]
    if differing:
        raise ValueError(
            f"Loading {folder} into this model's adapter {adapter_name!r}, which exists already (built by "
            "`get_peft_model` / `add_adapter`, or from the `config` passed to `PeftModel.from_pretrained`): the "
            f"adapter keeps its own config, and its {', '.join(f'`{n}`' for n in differing)} differ{'s' if len(differing) == 1 else ''} "
            "from the saved adapter's (e.g. "
            f"{differing[0]}={now.get(differing[0])!r} here, {saved.get(differing[0])!r} saved), so the weights would "
            f"build another model than the one saved. Load it under a new `adapter_name`, or call "
            f"`delete_adapter({adapter_name!r})` first; to resume a Trainer from it, run with the saved settings."
        )


def wrap_transformers_load_adapter(original):
    """transformers' own adapter loading (`model.load_adapter`, and `from_pretrained` on an adapter folder through it)
    reads the config through PEFT (checked there) and then the weights itself: a local GateRA folder gets a shared
    lock for the whole load, as PEFT's loads do, so that a save landing in between cannot pair its weights with the
    config read before it."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        options = signature.bind_partial(self, *args, **kwargs).arguments
        model_id = options.get("peft_model_id")
        download = getattr(options.get("load_config"), "download_kwargs", None) or {}
        subfolder = (options.get("adapter_kwargs") or {}).get("subfolder") or download.get("subfolder")
        if _local_folder(model_id, subfolder) is None:  # (a Hub adapter: transformers fetches and reads it itself)
            return original(self, *args, **kwargs)
        with _reading(model_id, {"subfolder": subfolder, "peft_config": options.get("peft_config")}):  # the checks
            # and shared lock of PEFT's loads
            return original(self, *args, **kwargs)

    setattr(load_adapter, _MARK, True)
    return load_adapter


def install() -> None:
    """Wrap PeftModel's save_pretrained, from_pretrained, load_adapter, PeftConfig's from_pretrained and check_kwargs,
    transformers' load_adapter and every reference to load_peft_weights, once."""
    import peft.config
    import peft.peft_model
    import peft.utils
    import peft.utils.save_and_load

    cls = peft.peft_model.PeftModel
    if not getattr(cls.save_pretrained, _MARK, False):
        cls.save_pretrained = wrap_save_pretrained(cls.save_pretrained)
    if not getattr(cls.load_adapter, _MARK, False):
        cls.load_adapter = wrap_load_adapter(cls.load_adapter)
    raw = cls.__dict__["from_pretrained"]
    if not getattr(raw.__func__, _MARK, False):
        cls.from_pretrained = wrap_from_pretrained(raw)
    config_cls = peft.config.PeftConfigMixin
    raw = config_cls.__dict__["from_pretrained"]
    if not getattr(raw.__func__, _MARK, False):
        config_cls.from_pretrained = wrap_config_from_pretrained(raw)
    raw = config_cls.__dict__["check_kwargs"]
    if not getattr(raw.__func__, _MARK, False):
        config_cls.check_kwargs = wrap_check_kwargs(raw)
    from transformers.integrations.peft import PeftAdapterMixin

    if not getattr(PeftAdapterMixin.load_adapter, _MARK, False):
        PeftAdapterMixin.load_adapter = wrap_transformers_load_adapter(PeftAdapterMixin.load_adapter)
    for module in (peft.peft_model, peft.utils, peft.utils.save_and_load):
        current = getattr(module, "load_peft_weights", None)
        if current is not None and not getattr(current, _MARK, False):
            module.load_peft_weights = wrap_load_peft_weights(current)
