"""The `gatera` command line: `gatera prune` (structure pruning of a saved adapter), `gatera plot` (gate heatmaps)."""

from __future__ import annotations

import argparse
import sys


def _prune(args) -> int:
    from .pruning import prune_saved_adapter, report

    result = prune_saved_adapter(args.adapter, args.out, args.threshold)
    print(report(result["values"], result["kept"], result["pruned"]))
    print(f"wrote {args.out}: {result['tensors_after']} of {result['tensors_before']} tensors")
    return 0


def _plot(args) -> int:
    from .visualize import check_record_options, load_adapter, plot_gates, record_gates

    check_record_options(args.prompt, args.answer, args.max_new_tokens)  # before the minutes of loading a model
    model, tokenizer = load_adapter(args.adapter, args.base_model)
    trace = record_gates(model, tokenizer, args.prompt, args.answer, args.max_new_tokens)
    plot_gates(trace, args.out, args.title)
    print(f"wrote {args.out}: {len(trace.modules)} gated modules x {len(trace.tokens)} tokens; mean gate on prompt "
          f"{trace.summary['prompt_mean']:.3f}, on answer {trace.summary['answer_mean']:.3f}; "
          f"answer: {trace.summary['generated']!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatera", description="GateRA adapter tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser("prune", help="drop the modules whose structure gate σ(α) is below a threshold")
    prune.add_argument("adapter", help="saved GateRA adapter folder (trained with structure_gate=True)")
    prune.add_argument("--threshold", type=float, required=True, help="keep modules with σ(α) >= threshold")
    prune.add_argument("--out", required=True, help="new folder for the pruned adapter (must not exist)")
    prune.set_defaults(run=_prune)
    plot = commands.add_parser("plot", help="per-layer x per-token gate heatmap of a generation (PNG)")
    plot.add_argument("adapter", help="saved GateRA adapter folder")
    plot.add_argument("--prompt", required=True)
    plot.add_argument("--answer", default=None, help="decode these tokens (default: generate greedily)")
    plot.add_argument("--base-model", default=None, help="base model folder (default: the adapter's base_model_name_or_path)")
    plot.add_argument("--max-new-tokens", type=int, default=24)
    plot.add_argument("--title", default=None)
    plot.add_argument("--out", required=True, help="image path, e.g. gates.png")
    plot.set_defaults(run=_plot)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # ours name the option or file; OSError covers missing / unreadable files
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"gatera {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
