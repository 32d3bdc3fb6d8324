"""Where a benchmark's JSON goes. README's tables quote the JSON files committed under bench/results/, so a script
never writes over a file that is already there unless `--overwrite` says so: an existing `--out` stops it before it
measures anything (not after minutes of it); an existing default path gives this run the first free sibling name
(`<stem>-2.json`, ...), so that a script's plain command still runs on a clone; and a file that another run wrote while
this one measured is kept too (this run's result goes to a free sibling name, with a warning).

    add_output_arguments(parser, "bench/results/x.json")   # --out, --overwrite
    out = output_path(parser, args, default)               # after parse_args: refuses an existing --out
    write_json(out, data, args.overwrite)                  # at the end
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)  # (read once: os.umask is the only way, and it is process-wide)


def add_output_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """`--out` (default: `default`, as the help shows it) and `--overwrite`."""
    parser.add_argument("--out", default=None, help=f"JSON path (default {default})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the JSON if it exists (without it an existing file is kept: an existing --out "
                             "stops the script before it runs; an existing default path gives this run a free -N "
                             "sibling name, where the name does not identify the run)")


def output_path(parser: argparse.ArgumentParser, args: argparse.Namespace, default: str | Path,
                default_may_move: bool = True) -> Path:
    """Where this run's JSON goes: `args.out`, refused with `parser.error` when that exists and `args.overwrite` is
    not set; else `default`, or where that exists, its first free sibling (`default_may_move=False`: refused as
    `args.out` is, for names that mean something, as bench/quality.py's)."""
    out = Path(args.out or default)
    folder = next(path for path in out.parents if path.exists())
    if not folder.is_dir():
        parser.error(f"{out}: {folder} is a file, not a folder; pass --out elsewhere")
    if not out.exists() or args.overwrite:
        return out
    if args.out or not default_may_move:
        parser.error(f"{out} exists (README's tables quote the committed results): pass --out with a new path, "
                     f"or --overwrite to replace it")
    free = _free_sibling(out)
    print(f"{out} exists (kept); this run writes {free} (--overwrite replaces {out.name})", file=sys.stderr)
    return free


def output_path_by_mode(parser: argparse.ArgumentParser, args: argparse.Namespace, smoke: bool,
                        results: Path, name: str) -> tuple[Path, bool]:
    """(path, overwrite) of a script with a CPU smoke mode: `results/<name>_smoke.json` for a smoke run without
    `--out` (git ignores it; each smoke run replaces it), else `output_path` of `results/<name>.json`."""
    if smoke and not args.out:
        return results / f"{name}_smoke.json", True
    return output_path(parser, args, results / f"{name}.json"), args.overwrite


def _siblings(out: Path):
    """`<stem>-2.json`, `<stem>-3.json`, ..."""
    return (out.with_name(f"{out.stem}-{n}{out.suffix}") for n in itertools.count(2))


def _free_sibling(out: Path) -> Path:
    return next(path for path in _siblings(out) if not path.exists())


def write_json(out: Path, data, overwrite: bool, **dumps_kwargs) -> Path:
    """Write `data` as JSON to `out` in one step (a reader never sees half a file) and return where it went: `out`, or
    with `overwrite` off and `out` created meanwhile by another run, the first free `<stem>-2.json`, `-3`, ..."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, **dumps_kwargs) + "\n"
    with tempfile.NamedTemporaryFile("w", dir=out.parent, prefix=f".{out.name}.", delete=False) as tmp:
        tmp.write(text)
    os.chmod(tmp.name, 0o666 & ~_UMASK)  # (as a plain write makes it: NamedTemporaryFile's are 0600)
    try:
        if overwrite:
            os.replace(tmp.name, out)
            return out
        for path in itertools.chain([out], _siblings(out)):
            try:
                _create_from(tmp.name, path, text)
            except FileExistsError:
                continue
            if path != out:
                print(f"warning: {out} appeared while this ran (another run?); kept it and wrote this result to {path}",
                      file=sys.stderr)
            return path
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)


def _create_from(tmp: str, path: Path, text: str) -> None:
    """Give the written file `tmp` the name `path`, which must not exist (FileExistsError): a hard link, atomic; on a
    filesystem without them, an exclusive create of `path` written with `text` (not atomic there)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        with open(path, "x") as file:
            file.write(text)
