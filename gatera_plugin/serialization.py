"""Saving and loading GateRA adapters safely: atomic saves, checksummed weights, no unpickling by default.

Installed on `import gatera_plugin`, two wrappers around PEFT's functions act on GateRA adapters only:

- `PeftModel.save_pretrained` writes the whole adapter (weights, config, model card) into a staging folder beside
  the target, stamps the weights' SHA-256 into adapter_config.json, then moves each file into place with an atomic
  rename, weights first and config last. An interrupted save leaves either the previous files or the new ones: never
  a truncated file. Should it stop between the two renames, the new weights meet the old config, whose checksum no
  longer matches: loading refuses that pair instead of mixing two saves, and the previous weights are still there
  as `adapter_model.safetensors.previous` (kept until the save completes).
- `load_peft_weights` (what `PeftModel.from_pretrained` and `load_adapter` read through) checks a local GateRA folder
  first: weights present, readable (not truncated), matching the config's checksum; pickled weights
  (`adapter_model.bin`) are refused unless the user opts in (`GATERA_ALLOW_PICKLE=1` or `with allow_pickle():`),
  because unpickling can run code.

Other PEFT methods go through untouched.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
CONFIG = "adapter_config.json"
_MARK = "__gatera_wrapped__"
_allow_pickle_depth = 0


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


def _is_gatera(peft_model) -> bool:
    configs = getattr(peft_model, "peft_config", {}) or {}
    return any(str(getattr(c, "peft_type", "")) in ("GATERA", "PeftType.GATERA") for c in configs.values())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover (platforms without directory fds)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PREVIOUS = ".previous"


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename every staged file to its place in `target`: weights first, configs last, each atomically.

    Until the last rename, each replaced file stays reachable as `<name>.previous` (a hard link, so the file itself
    never disappears); the copies are removed once the new adapter is complete.
    """
    files = [p for p in staging.rglob("*") if p.is_file()]
    files.sort(key=lambda p: (p.name == CONFIG, str(p)))
    backups = []
    for source in files:
        destination = target / source.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as handle:
            os.fsync(handle.fileno())
        if destination.exists() and destination.name in (WEIGHTS, CONFIG):
            backup = destination.with_name(destination.name + PREVIOUS)
            backup.unlink(missing_ok=True)
            os.link(destination, backup)
            backups.append(backup)
        os.replace(source, destination)
        _fsync_dir(destination.parent)
    for backup in backups:
        backup.unlink(missing_ok=True)


def _stamp_checksums(staging: Path) -> None:
    for config_path in staging.rglob(CONFIG):
        weights = config_path.parent / WEIGHTS
        if weights.exists():
            config = json.loads(config_path.read_text())
            config["weights_sha256"] = file_sha256(weights)
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _warn_if_replacing_another_method(target: Path) -> None:
    existing = target / CONFIG
    if existing.exists():
        try:
            peft_type = json.loads(existing.read_text()).get("peft_type")
        except (OSError, ValueError):
            peft_type = "unreadable"
        if peft_type != "GATERA":
            warnings.warn(f"Saving a GateRA adapter over the {peft_type} adapter in {target}.", UserWarning, stacklevel=3)


def wrap_save_pretrained(original):
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not _is_gatera(self) or not kwargs.get("is_main_process", True) or os.path.isfile(save_directory):
            return original(self, save_directory, *args, **kwargs)
        target = Path(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        _warn_if_replacing_another_method(target)
        staging = Path(tempfile.mkdtemp(prefix=".gatera-save-", dir=target))
        try:
            if (target / "README.md").exists():  # PEFT updates an existing model card rather than replacing it
                shutil.copy2(target / "README.md", staging / "README.md")
            original(self, str(staging), *args, **kwargs)
            _stamp_checksums(staging)
            _move_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    setattr(save_pretrained, _MARK, True)
    return save_pretrained


def check_adapter_folder(folder: Path) -> None:
    """Refuse, with the reason and the fix, a local GateRA adapter folder whose weights cannot be trusted."""
    weights, pickled = folder / WEIGHTS, folder / PICKLED_WEIGHTS
    config = json.loads((folder / CONFIG).read_text())
    if not weights.exists():
        if pickled.exists():
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
            f"{weights} is corrupted or truncated ({type(error).__name__}: {error}). Restore it from a checkpoint "
            "(checkpoint-*/) or save the adapter again."
        ) from error
    expected = config.get("weights_sha256")
    if expected and file_sha256(weights) != expected:
        previous = weights.with_name(WEIGHTS + PREVIOUS)
        restore = (
            f" The previous adapter's weights are kept as {previous.name}: rename it to {WEIGHTS} to restore it."
            if previous.exists() else " Restore the adapter from a checkpoint (checkpoint-*/) or save it again."
        )
        raise ValueError(
            f"{weights} does not match the checksum saved in {CONFIG}: the two files come from different saves (an "
            "interrupted save_pretrained) or the weights were modified." + restore
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


def wrap_load_peft_weights(original):
    @functools.wraps(original)
    def load_peft_weights(model_id, *args, **kwargs):
        subfolder = kwargs.get("subfolder")
        folder = Path(model_id) / subfolder if subfolder else Path(model_id)
        if folder.is_dir() and (folder / CONFIG).exists():
            try:
                peft_type = json.loads((folder / CONFIG).read_text()).get("peft_type")
            except ValueError as error:
                raise ValueError(f"{folder / CONFIG} is not valid JSON ({error}); restore or re-save the adapter.") from None
            if peft_type == "GATERA":
                check_adapter_folder(folder)
            elif _holds_gatera_weights(folder):
                raise ValueError(
                    f"{folder / CONFIG} describes a {peft_type} adapter, but {WEIGHTS} there holds GateRA weights "
                    "(gatera_* tensors): the config was replaced. Restore the GateRA adapter_config.json (from a "
                    "checkpoint) before loading."
                )
        return original(model_id, *args, **kwargs)

    setattr(load_peft_weights, _MARK, True)
    return load_peft_weights


def install() -> None:
    """Wrap PeftModel.save_pretrained and every module-level reference to load_peft_weights, once."""
    import peft.peft_model
    import peft.utils
    import peft.utils.save_and_load

    if not getattr(peft.peft_model.PeftModel.save_pretrained, _MARK, False):
        peft.peft_model.PeftModel.save_pretrained = wrap_save_pretrained(peft.peft_model.PeftModel.save_pretrained)
    for module in (peft.peft_model, peft.utils, peft.utils.save_and_load):
        current = getattr(module, "load_peft_weights", None)
        if current is not None and not getattr(current, _MARK, False):
            module.load_peft_weights = wrap_load_peft_weights(current)
