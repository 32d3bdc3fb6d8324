"""Where a benchmark's JSON goes. README's tables quote the JSON files committed under bench/results/, so a script
never writes over a file that is already there unless `--overwrite` says so: it stops before measuring anything (not
after minutes of it), and a file that another run wrote while this one measured is kept too (this run's result goes
to a free sibling name, with a warning).

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


def add_output_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """`--out` (default: `default`, as the help shows it) and `--overwrite`."""
    parser.add_argument("--out", default=None, help=f"JSON path (default {default})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists (without it, an existing file stops the script before it runs)")


def output_path(parser: argparse.ArgumentParser, args: argparse.Namespace, default: str | Path) -> Path:
    """`args.out` or `default`; `parser.error` when that file exists and `args.overwrite` is not set."""
    out = Path(args.out or default)
    if out.exists() and not args.overwrite:
        parser.error(f"{out} exists (README's tables quote the committed results): pass --out with a new path, "
                     f"or --overwrite to replace it")
    return out


def write_json(out: Path, data, overwrite: bool, **dumps_kwargs) -> Path:
    """Write `data` as JSON to `out` in one step (a reader never sees half a file) and return where it went: `out`, or
    with `overwrite` off and `out` created meanwhile by another run, the first free `<stem>-2.json`, `-3`, ..."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, prefix=f".{out.name}.", delete=False) as tmp:
        tmp.write(json.dumps(data, **dumps_kwargs) + "\n")
    try:
        if overwrite:
            os.replace(tmp.name, out)
            return out
        for n in itertools.count(1):
            path = out if n == 1 else out.with_name(f"{out.stem}-{n}{out.suffix}")
            try:
                os.link(tmp.name, path)  # fails where the name exists: no run's file is replaced
            except FileExistsError:
                continue
            if path != out:
                print(f"warning: {out} appeared while this ran (another run?); kept it and wrote this result to {path}",
                      file=sys.stderr)
            return path
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
