"""The `gatera` command line: `gatera prune` (structure pruning of a saved adapter)."""

from __future__ import annotations

import argparse
import sys


def _prune(args) -> int:
    from .pruning import prune_saved_adapter, report

    result = prune_saved_adapter(args.adapter, args.out, args.threshold)
    print(report(result["values"], result["kept"], result["pruned"]))
    print(f"wrote {args.out}: {result['tensors_after']} of {result['tensors_before']} tensors")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatera", description="GateRA adapter tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser("prune", help="drop the modules whose structure gate σ(α) is below a threshold")
    prune.add_argument("adapter", help="saved GateRA adapter folder (trained with structure_gate=True)")
    prune.add_argument("--threshold", type=float, required=True, help="keep modules with σ(α) >= threshold")
    prune.add_argument("--out", required=True, help="new folder for the pruned adapter (must not exist)")
    prune.set_defaults(run=_prune)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"gatera {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
