"""Tables of bench/quality.py results (markdown): the learning-rate sweep, the λ sweep, the main comparison and the
gates' state at the end of training.

    python bench/quality_table.py [--results bench/results/quality]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

ORDER = ["zero-shot", "lora", "peft-hira", "gatera-none", "gatera", "gatera-threshold", "gatera-threshold-keep50",
         "gatera-structure", "gatera-lora"]
NAMES = {
    "zero-shot": "zero-shot (no training)",
    "lora": "LoRA (PEFT)",
    "peft-hira": "HiRA (PEFT)",
    "gatera-none": "HiRA (ours, gate=none)",
    "gatera": "GateRA (sigmoid gate, HiRA)",
    "gatera-threshold": "TS-PEFT threshold gate, HiRA",
    "gatera-threshold-keep50": "threshold gate, keep_ratio 0.5",
    "gatera-structure": "GateRA + structure gates",
    "gatera-lora": "GateRA on LoRA",
}


def load(results: Path) -> list[dict]:
    rows = []
    for path in sorted(results.glob("*.json")):
        row = json.loads(path.read_text())
        row["file"] = path.name
        rows.append(row)
    return rows


def sweep_table(rows: list[dict]) -> str:
    sweeps = [r for r in rows if r["eval_split"] == "val" and "__lr" in r["file"]]
    if not sweeps:
        return ""
    lrs = sorted({r["lr"] for r in sweeps})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for method in [m for m in ORDER if any(r["method"] == m for r in sweeps)]:
        cells = []
        for lr in lrs:
            match = [r for r in sweeps if r["method"] == method and r["lr"] == lr]
            cells.append(f"{match[0]['accuracy']:.3f} ({match[0]['gold_nll']:.3f})" if match else "-")
        lines.append(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
    task = sweeps[0]["task"]
    return f"Learning-rate sweep, {task} val split (accuracy, gold-answer NLL):\n\n" + "\n".join(lines)


def lambda_table(rows: list[dict]) -> str:
    lam = [r for r in rows if "__lambda" in r["file"]]
    if not lam:
        return ""
    # The learning-rate sweep's GateRA run at the same learning rate is the default-λ point of this sweep.
    lam += [r for r in rows if "__lr" in r["file"] and r["method"] == "gatera" and r["task"] == lam[0]["task"]
            and r["lr"] == lam[0]["lr"] and r["entropy_weight"] not in {x["entropy_weight"] for x in lam}]
    lines = ["| entropy_weight | accuracy | gold NLL | final gate entropy | final open fraction |", "|---|---|---|---|---|"]
    for r in sorted(lam, key=lambda r: r["entropy_weight"]):
        gates = r.get("gate_history") or [{}]
        lines.append(f"| {r['entropy_weight']:g} | {r['accuracy']:.3f} | {r['gold_nll']:.3f} | "
                     f"{gates[-1].get('gatera/entropy', float('nan')):.3f} | "
                     f"{gates[-1].get('gatera/gate_open_frac', float('nan')):.3f} |")
    return (f"entropy_weight sweep, GateRA, {lam[0]['task']} val split, lr {lam[0]['lr']:g}:\n\n"
            + "\n".join(lines))


def main_table(rows: list[dict]) -> str:
    tests = [r for r in rows if r["eval_split"] == "test" and "__lr" not in r["file"] and not r["file"].endswith(
        "__tiny.json")]
    if not tests:
        return ""
    groups = defaultdict(list)
    for r in tests:
        groups[(r["task"], r["method"])].append(r)
    tasks = sorted({t for t, _ in groups})
    header = "| method | trainable params | step time / LoRA | " + " | ".join(tasks) + " |"
    lines = [header, "|---|---|---|" + "---|" * len(tasks)]
    # Step time: every run of the method on a task (sweep runs too: the same recipe, only the learning rate differs),
    # each divided by the median LoRA step on that task; then the median. Runs share the machine, so one run's time
    # moves with what else runs; the many runs even that out (bench/train_step.py measures it under control).
    timed = defaultdict(list)
    for r in rows:
        if "step_seconds" in r and not r["file"].endswith("__tiny.json"):
            timed[(r["task"], r["method"])].append(r["step_seconds"])
    lora_step = {t: statistics.median(timed[(t, "lora")]) for t, m in list(timed) if m == "lora"}
    for method in [m for m in ORDER if any(k[1] == m for k in groups)]:
        runs = [r for (t, m), rs in groups.items() if m == method for r in rs]
        params = next((r["trainable_params"] for r in runs if "trainable_params" in r), 0)
        steps = [t / lora_step[task] for (task, m), ts in timed.items() if m == method and task in lora_step for t in ts]
        cells = []
        for task in tasks:
            accs = [r["accuracy"] for r in groups.get((task, method), [])]
            if not accs:
                cells.append("-")
            elif len(accs) == 1:
                cells.append(f"{100 * accs[0]:.1f}" + ("" if method == "zero-shot" else " (1 seed)"))
            else:
                cells.append(f"{100 * statistics.mean(accs):.1f} ± {100 * (max(accs) - min(accs)) / 2:.1f}")
        step = f"{statistics.median(steps):.2f}x" if steps else "-"
        lines.append(f"| {NAMES[method]} | {params:,} | {step} | " + " | ".join(cells) + " |")
    for key, label in (("chance", "chance (random option)"), ("majority", "majority answer")):
        base = {r["task"]: r[key] for r in tests if r.get(key) is not None}
        if base:
            lines.append(f"| {label} | | | " + " | ".join(f"{100 * base[t]:.1f}" if t in base else "-" for t in tasks)
                         + " |")
    return "Test accuracy (%), mean ± half-range over seeds:\n\n" + "\n".join(lines)


GATE_STATS = {"gatera/gate_mean": "gate mean", "gatera/gate_open_frac": "open (g > 0.5)",
              "gatera/entropy": "entropy (bits)", "gatera/kept_frac": "kept tokens (threshold)",
              "gatera/structure_mean": "mean σ(α) (structure)"}


def gate_table(rows: list[dict]) -> str:
    """Last logged gate statistics of each gated method's test runs, per task, averaged over seeds."""
    tests = [r for r in rows if r["eval_split"] == "test" and r.get("gate_history")]
    if not tests:
        return ""
    lines = ["| method | task | seeds | " + " | ".join(GATE_STATS.values()) + " |",
             "|---|---|---|" + "---|" * len(GATE_STATS)]
    for method in [m for m in ORDER if any(r["method"] == m for r in tests)]:
        for task in sorted({r["task"] for r in tests if r["method"] == method}):
            finals = [r["gate_history"][-1] for r in tests if r["method"] == method and r["task"] == task]
            cells = []
            for key in GATE_STATS:
                values = [f[key] for f in finals if key in f]
                cells.append(f"{statistics.mean(values):.3f}" if values else "-")
            lines.append(f"| {NAMES[method]} | {task} | {len(finals)} | " + " | ".join(cells) + " |")
    return "Gates at the end of training (last logged values, mean over seeds):\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "quality"))
    args = parser.parse_args()
    rows = load(Path(args.results))
    print("\n\n".join(t for t in (sweep_table(rows), lambda_table(rows), main_table(rows), gate_table(rows)) if t))


if __name__ == "__main__":
    main()
