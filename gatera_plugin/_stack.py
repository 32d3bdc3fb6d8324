"""Where a warning raised while a model runs should point: the user's line, not torch's module code."""

from __future__ import annotations

import os
import sys
import sysconfig


def user_stacklevel() -> int:
    """The `stacklevel` that makes a warning raised by the caller of this function point to the first frame outside
    installed packages (torch, transformers, PEFT, hub kernels, a Trainer, ...), the standard library and this
    package: the user's line that ran the model, whatever the model's depth. Past the outermost frame (a backward
    in autograd's own thread), Python names `sys` as the place."""
    paths = sysconfig.get_paths()
    skipped = tuple({os.path.join(paths[key], "") for key in ("stdlib", "platstdlib", "purelib", "platlib")}
                    | {os.path.join(os.path.dirname(os.path.abspath(__file__)), ""), "<"})
    frame, level = sys._getframe(2), 2  # (level 1: the function that warns)
    while frame is not None and frame.f_code.co_filename.startswith(skipped):
        frame, level = frame.f_back, level + 1
    return level
