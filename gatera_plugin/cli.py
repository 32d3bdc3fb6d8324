"""The `gatera` command line: `gatera prune` (structure pruning of a saved adapter), `gatera plot` (gate heatmaps),
`gatera eval` (lm-evaluation-harness with GateRA registered)."""

from __future__ import annotations

import argparse
import sys


def _prune(args) -> int:
    from .pruning import prune_saved_adapter, report

    result = prune_saved_adapter(args.adapter, args.out, args.threshold)
    print(report(result["values"], result["kept"], result["pruned"]))
    for name, other in result["other_adapters"].items():  # (the other adapters of a multi-adapter save)
        print(f"adapter {name!r}: " + ("copied unchanged (no structure gates)" if other is None else
                                       report(other["values"], other["kept"], other["pruned"])))
    if result["left_out"]:
        print(f"left out (not adapters of this save): {', '.join(result['left_out'])}")
    print(f"wrote {args.out}: {result['tensors_after']} of {result['tensors_before']} tensors")
    return 0


def _plot(args) -> int:
    from .visualize import (
        check_device,
        check_image_path,
        check_record_options,
        load_adapter,
        plot_gates,
        record_gates,
    )

    check_record_options(args.prompt, args.answer, args.max_new_tokens)  # before the minutes of loading a model
    check_image_path(args.out, args.overwrite)
    check_device(args.device)
    import torch

    model, tokenizer = load_adapter(args.adapter, args.base_model, getattr(torch, args.dtype),
                                    None if args.device == "cpu" else args.device)
    trace = record_gates(model, tokenizer, args.prompt, args.answer, args.max_new_tokens, chat=args.chat)
    plot_gates(trace, args.out, args.title, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(trace.modules)} gated modules x {len(trace.tokens)} tokens; mean gate on prompt "
          f"{trace.summary['prompt_mean']:.3f}, on answer {trace.summary['answer_mean']:.3f}; "
          f"answer: {trace.summary['generated']!r}")
    return 0


LM_EVAL_PIN = "lm-eval==0.4.13"  # the lm-eval version `gatera eval` is tested with


def run_lm_eval(argv: list[str]) -> int:
    """`gatera eval ARGS`: lm-evaluation-harness's own command line, run in this process with GateRA registered.

    lm-eval loads `--model_args pretrained=BASE,peft=ADAPTER` through `PeftModel.from_pretrained`, which knows the
    adapter type `GATERA` only in a process that has imported `gatera_plugin` (plain `lm_eval` fails with
    `KeyError: 'GATERA'`). This process has (it runs this module), so the arguments are handed to lm-eval unchanged.
    """
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as error:
        print(f"gatera eval: needs lm-evaluation-harness ({error}). Install it with `pip install "
              f"'gatera-plugin[eval]'` (or `pip install {LM_EVAL_PIN}`).", file=sys.stderr)
        return 2
    saved_argv = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    except SystemExit as exit_:  # argparse errors, --help, sys.exit("message")
        if isinstance(exit_.code, str):
            print(f"gatera eval: {exit_.code}", file=sys.stderr)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except (ValueError, OSError, KeyError) as error:  # a model / adapter path that does not load, an unknown task
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"gatera eval: {type(error).__name__}: {message}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # everything after `eval` belongs to lm-eval, `--help` included
        return run_lm_eval(argv[1:])
    parser = argparse.ArgumentParser(prog="gatera", description="GateRA adapter tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser("prune", help="drop the modules whose structure gate σ(α) is below a threshold")
    prune.add_argument("adapter", help="saved GateRA adapter folder (trained with structure_gate=True)")
    prune.add_argument("--threshold", type=float, required=True, help="keep modules with σ(α) >= threshold")
    prune.add_argument("--out", required=True, help="new folder for the pruned adapter (must not exist)")
    prune.set_defaults(run=_prune)
    plot = commands.add_parser("plot", help="per-layer x per-token gate heatmap of a generation (an image: PNG, SVG, PDF, ...)")
    plot.add_argument("adapter", help="saved GateRA adapter folder")
    plot.add_argument("--prompt", required=True)
    plot.add_argument("--answer", default=None, help="decode these tokens (default: generate greedily)")
    plot.add_argument("--base-model", default=None, help="base model folder (default: the adapter's base_model_name_or_path)")
    plot.add_argument("--max-new-tokens", type=int, default=24)
    plot.add_argument("--chat", action="store_true",
                      help="the prompt is the user turn of the tokenizer's chat template (for instruct models)")
    plot.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                      help="the base model's dtype")
    plot.add_argument("--device", default="cpu",
                      help="where the model runs: cpu, cuda, cuda:1, or auto (spread over the GPUs with accelerate)")
    plot.add_argument("--title", default=None)
    plot.add_argument("--out", required=True, help="new image file, e.g. gates.png (its suffix names the format)")
    plot.add_argument("--overwrite", action="store_true", help="replace an existing --out file (atomically)")
    plot.set_defaults(run=_plot)
    commands.add_parser(
        "eval", add_help=False,
        help="lm-evaluation-harness with GateRA registered: `gatera eval --model hf --model_args "
        "pretrained=BASE,peft=ADAPTER --tasks ...` (arguments go to lm-eval unchanged)",
    )
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, ImportError) as error:  # ours name the option, file or missing package; OSError
        # covers missing / unreadable files
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"gatera {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
