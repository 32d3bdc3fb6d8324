"""Where a trained GateRA adapter opens its gates: prompt (prefill) tokens vs answer (decode) tokens, over many examples.

    python bench/gate_summary.py --adapter bench/results/quality/adapters/strategyqa --task strategyqa --limit 100

For each held-out (test split) example of the task, `gatera_plugin.visualize.record_gates` prefills the prompt and
decodes the gold answer with the KV cache, recording every gate; this script averages the per-example means (over
modules and tokens) of the prompt tokens and of the answer tokens, and the fraction of closed gates (g < 0.5) in each,
and prints them with the per-layer means. `gatera plot` draws the same quantities for one example. Writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from quality import RESULTS, examples, load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="a GateRA adapter saved by bench/quality.py --save-adapter")
    parser.add_argument("--base-model", default=None, help="base model path (default: the one the adapter names)")
    parser.add_argument("--task", required=True)
    parser.add_argument("--limit", type=int, default=100, help="test examples to record")
    from _results import add_output_arguments, output_path, write_json

    add_output_arguments(parser, "bench/results/quality/gates/<task>.json")
    args = parser.parse_args()

    task = load_task(args.task)
    name = task.get("name", Path(args.task).stem)  # (a task file's path names its JSON by the task, as quality.py)
    out = output_path(parser, args, RESULTS / "gates" / f"{name}.json", default_may_move=False)

    from gatera_plugin.visualize import load_adapter, record_gates

    model, tokenizer = load_adapter(args.adapter, args.base_model)
    rows = examples(task, "test", args.limit)
    prompt_means, answer_means, prompt_closed, answer_closed, layer_prompt, layer_answer = [], [], [], [], [], []
    for row in rows:
        trace = record_gates(model, tokenizer, row["prompt"], answer=" " + row["options"][row["answer"]])
        prompt, answer = trace.gates[:, : trace.prompt_length], trace.gates[:, trace.prompt_length:]
        prompt_means.append(prompt.mean().item())
        answer_means.append(answer.mean().item())
        prompt_closed.append((prompt < 0.5).float().mean().item())
        answer_closed.append((answer < 0.5).float().mean().item())
        layers, by_layer_prompt, by_layer_answer = trace.layer_means()
        layer_prompt.append(by_layer_prompt)
        layer_answer.append(by_layer_answer)
    result = {
        "task": name, "task_source": args.task, "adapter": args.adapter, "examples": len(rows),
        "prompt_gate_mean": statistics.mean(prompt_means), "answer_gate_mean": statistics.mean(answer_means),
        "prompt_closed_frac": statistics.mean(prompt_closed), "answer_closed_frac": statistics.mean(answer_closed),
        "answer_above_prompt_frac": statistics.mean(a > p for a, p in zip(answer_means, prompt_means)),
        "layers": layers, "layer_prompt_mean": torch.stack(layer_prompt).mean(0).tolist(),
        "layer_answer_mean": torch.stack(layer_answer).mean(0).tolist(),
    }
    print(f"{args.task}: {len(rows)} test examples; mean gate prompt {result['prompt_gate_mean']:.3f} "
          f"(closed {result['prompt_closed_frac']:.3f}), answer {result['answer_gate_mean']:.3f} "
          f"(closed {result['answer_closed_frac']:.3f}); answer above prompt in "
          f"{100 * result['answer_above_prompt_frac']:.0f}% of examples")
    print("layer  prompt  answer")
    for layer, p, a in zip(layers, result["layer_prompt_mean"], result["layer_answer_mean"]):
        print(f"{layer:5d}  {p:.3f}   {a:.3f}")
    write_json(out, result, args.overwrite, indent=2)


if __name__ == "__main__":
    main()
