"""Run the `axolotl` CLI as if gatera-plugin were not installed (its entry point hidden), for comparison runs."""

import importlib.metadata
import sys

_entry_points = importlib.metadata.entry_points


def _without_gatera(**params):
    points = _entry_points(**params)
    if params.get("group") != "axolotl.plugins":
        return points
    return importlib.metadata.EntryPoints(p for p in points if not p.value.startswith("gatera_plugin"))


importlib.metadata.entry_points = _without_gatera

if __name__ == "__main__":
    from axolotl.cli.main import main

    sys.argv = ["axolotl", *sys.argv[1:]]
    main()
