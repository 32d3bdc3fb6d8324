"""Where a warning raised while a model runs should point: the user's line, not torch's module code."""

from __future__ import annotations

import os
import site
import sys
import sysconfig


def _installed_places() -> tuple[str, ...]:
    """Folders of the standard library and of installed packages (site-packages, Debian's dist-packages, the user's
    site), this package's own, and Python's frozen modules: code that is not the user's."""
    paths = sysconfig.get_paths()
    folders = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    folders.update(getattr(site, "getsitepackages", list)())
    user_site = getattr(site, "getusersitepackages", lambda: None)()
    if isinstance(user_site, str):
        folders.add(user_site)
    folders.add(os.path.dirname(os.path.abspath(__file__)))
    return (*{os.path.join(folder, "") for folder in folders}, "<frozen ")


def user_stacklevel() -> int:
    """The `stacklevel` that makes a warning raised by the caller of this function point to the first frame outside
    installed packages (torch, transformers, PEFT, hub kernels, a Trainer, ...), the standard library and this
    package: the user's line that ran the model, whatever the model's depth (a REPL's or notebook's input counts as
    the user's). Past the outermost frame (a backward in autograd's own thread), Python names `sys` as the place."""
    skipped = _installed_places()
    frame, level = sys._getframe(2), 2  # (level 1: the function that warns)
    while frame is not None and frame.f_code.co_filename.startswith(skipped):
        frame, level = frame.f_back, level + 1
    return level
