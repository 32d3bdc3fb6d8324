"""Tables of bench/quality.py results (markdown): the second-task candidates, the learning-rate sweeps (best rate in
bold, flagged when it lies at the edge of the grid), the gate learning-rate sweep, the λ sweep, the main comparison,
the 3-seed comparison at each method's best rate and at LoRA's, and the gates' state at the end of training.

    python bench/quality_table.py [--results bench/results/quality]
    python bench/quality_table.py --best-lr hyperbaton gatera-rms     # prints the rate main3/gatelr use
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ORDER = ["zero-shot", "lora", "peft-hira", "gatera-none", "gatera", "gatera-rms", "gatera-lorascale",
         "gatera-threshold", "gatera-threshold-keep50", "gatera-threshold-lorascale", "gatera-threshold-keep50-lorascale",
         "gatera-structure", "gatera-lora"]
NAMES = {
    "zero-shot": "zero-shot (no training)",
    "lora": "LoRA (PEFT)",
    "peft-hira": "HiRA (PEFT)",
    "gatera-none": "HiRA (ours, gate=none)",
    "gatera": "GateRA (sigmoid gate, HiRA, s = 1)",
    "gatera-threshold": "TS-PEFT threshold gate, HiRA",
    "gatera-threshold-keep50": "threshold gate, keep_ratio 0.5",
    "gatera-threshold-lorascale": "threshold gate, hira_scaling=lora (default)",
    "gatera-threshold-keep50-lorascale": "threshold gate, keep_ratio 0.5, hira_scaling=lora (default)",
    "gatera-structure": "GateRA + structure gates",
    "gatera-lora": "GateRA on LoRA",
    "gatera-rms": "GateRA, hira_scaling=rms",
    "gatera-lorascale": "GateRA, hira_scaling=lora (default)",
}
EDGE = "edge: widen the grid"


def load(results: Path) -> list[dict]:
    rows = []
    for path in sorted(results.glob("*.json")):
        first = re.sub(r"-\d+(?=\.json$)", "", path.name)  # (bench/_results.py's name for a second result of one run)
        if first != path.name and (results / first).exists():  # (not `__lr1e-05.json`: a rate's own exponent)
            print(f"skipped {path}: a second result of the run that wrote {first} (two runs of it at once); keep one "
                  "of the two under that name", file=sys.stderr)
            continue
        row = json.loads(path.read_text())
        row["file"] = path.name
        rows.append(row)
    return rows


def lr_sweep_runs(rows: list[dict], task: str | None = None, method: str | None = None) -> list[dict]:
    """The learning-rate sweep's runs: val split, explicit --lr, package defaults otherwise (no --gate-lr-ratio)."""
    return [r for r in rows if r["eval_split"] == "val" and "__lr" in r["file"] and "__glr" not in r["file"]
            and not r["file"].endswith("__tiny.json") and (task is None or r["task"] == task)
            and (method is None or r["method"] == method)]


def best_of(runs: list[dict], key: str) -> tuple[float, bool]:
    """(value of `key` with the best val accuracy, whether it is at the edge of the swept values).

    Ties go to the lower gold-answer NLL. With fewer than 3 values, or the best at the smallest or largest value, the
    optimum is not bracketed: `at_edge` is True.
    """
    grid = sorted({r[key] for r in runs})
    best = max(runs, key=lambda r: (r["accuracy"], -r["gold_nll"]))[key]
    return best, len(grid) < 3 or best in (grid[0], grid[-1])


def best_lr(rows: list[dict], task: str, method: str) -> tuple[float, bool]:
    """(best learning rate of `method` on `task` in the sweep, whether it is at the edge of the grid)."""
    runs = lr_sweep_runs(rows, task, method)
    if not runs:
        raise SystemExit(f"no learning-rate sweep runs of {method} on {task} in the results: run "
                         f"`bash bench/quality_runs.sh lr2` first")
    return best_of(runs, "lr")


def _marked_row(label: str, runs: list[dict], key: str, values: list[float], fmt) -> str:
    """One sweep row: a cell per value, the best in bold, then the best value and whether it is bracketed."""
    best, edge = best_of(runs, key)
    cells = []
    for v in values:
        match = [r for r in runs if r[key] == v]
        cell = fmt(match[0]) if match else "-"
        cells.append(f"**{cell}**" if match and v == best else cell)
    return f"| {label} | " + " | ".join(cells) + f" | {best:g} | {EDGE if edge else 'interior'} |"


def sweep_table(rows: list[dict]) -> str:
    """One table per task: val accuracy (gold-answer NLL) per method and learning rate, the best in bold."""
    tables = []
    for task in sorted({r["task"] for r in lr_sweep_runs(rows)}):
        sweeps = lr_sweep_runs(rows, task)
        lrs = sorted({r["lr"] for r in sweeps})
        lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr | optimum |",
                 "|---|" + "---|" * (len(lrs) + 2)]
        for method in [m for m in ORDER if any(r["method"] == m for r in sweeps)]:
            lines.append(_marked_row(NAMES[method], [r for r in sweeps if r["method"] == method], "lr", lrs,
                                     lambda r: f"{r['accuracy']:.3f} ({r['gold_nll']:.3f})"))
        tables.append(f"Learning-rate sweep, {task} val split (accuracy, gold-answer NLL; best in bold):\n\n"
                      + "\n".join(lines))
    return "\n\n".join(tables)


def gate_lr_table(rows: list[dict]) -> str:
    """gate_lr_ratio sweep (val split) of each GateRA method at one learning rate; the sweep's run there is ratio 1."""
    glr = [r for r in rows if r["eval_split"] == "val" and "__glr" in r["file"] and not r["file"].endswith("__tiny.json")]
    if not glr:
        return ""
    ratios = sorted({r["gate_lr_ratio"] for r in glr} | {1.0})
    lines = ["| method | task | lr | " + " | ".join(f"ratio {v:g}" for v in ratios) + " | best ratio | optimum |",
             "|---|---|---|" + "---|" * (len(ratios) + 2)]
    for task, method, lr in sorted({(r["task"], r["method"], r["lr"]) for r in glr}):
        runs = [r for r in glr if (r["task"], r["method"], r["lr"]) == (task, method, lr)]
        runs += [{**r, "gate_lr_ratio": 1.0} for r in lr_sweep_runs(rows, task, method) if r["lr"] == lr
                 and r.get("gate_lr_ratio", 1.0) == 1.0 and 1.0 not in {x["gate_lr_ratio"] for x in runs}]
        lines.append(_marked_row(f"{NAMES[method]} | {task} | {lr:g}", runs, "gate_lr_ratio", ratios,
                                 lambda r: f"{r['accuracy']:.3f} (g {_gate_mean_cell(r)})"))
    return "gate_lr_ratio sweep, val split (accuracy (final gate mean); best in bold):\n\n" + "\n".join(lines)


def final_gates(run: dict) -> dict:
    """The run's last logged gate statistics (`gatera/...` -> value); {} when its JSON logged none."""
    return (run.get("gate_history") or [{}])[-1]


def _gate_mean_cell(run: dict) -> str:
    value = final_gates(run).get("gatera/gate_mean")
    return "?" if value is None else f"{value:.2f}"


def candidates_table(rows: list[dict]) -> str:
    """Second-task candidates: zero-shot vs LoRA's best swept rate on the val split (want a gain of >= 10 points)."""
    zero = {r["task"]: r for r in rows if r["eval_split"] == "val" and r["method"] == "zero-shot"
            and not r["file"].endswith("__tiny.json")}
    lines = ["| task | zero-shot | LoRA best (lr) | gain (points) | LoRA gains >= 10 points |", "|---|---|---|---|---|"]
    for task in sorted(zero):
        runs = lr_sweep_runs(rows, task, "lora")
        if not runs:
            continue
        best = max(runs, key=lambda r: (r["accuracy"], -r["gold_nll"]))
        gain = 100 * (best["accuracy"] - zero[task]["accuracy"])
        lines.append(f"| {task} | {zero[task]['accuracy']:.3f} | {best['accuracy']:.3f} ({best['lr']:g}) | "
                     f"{gain:+.1f} | {'yes' if gain >= 10 else 'no'} |")
    if len(lines) == 2:
        return ""
    return "Second-task candidates, val split (`bash bench/quality_runs.sh pick`):\n\n" + "\n".join(lines)


def seeds_table(rows: list[dict]) -> str:
    """Test accuracy over seeds of the runs with an explicit --lr (main3): each method at its own and at LoRA's best
    rate, mean ± standard error (sample standard deviation / sqrt(seeds))."""
    tests = [r for r in rows if r["eval_split"] == "test" and "__lr" in r["file"] and not r["file"].endswith(
        "__tiny.json")]
    if not tests:
        return ""
    groups = defaultdict(list)
    for r in tests:
        groups[(r["task"], r["method"], r["lr"], r.get("gate_lr_ratio"))].append(r)
    lines = ["| task | method | lr | which rate | seeds | test accuracy (%) | vs LoRA at its best (points) |",
             "|---|---|---|---|---|---|---|"]
    for task in sorted({k[0] for k in groups}):
        zero = [r for r in rows if r["task"] == task and r["method"] == "zero-shot" and r["eval_split"] == "test"]
        if zero:
            lines.append(f"| {task} | {NAMES['zero-shot']} | - | - | - | {100 * zero[0]['accuracy']:.1f} | - |")
        lora = best_lr(rows, task, "lora")[0] if lr_sweep_runs(rows, task, "lora") else None
        lora_by_seed = {seed_of(r): 100 * r["accuracy"] for r in tests
                        if (r["task"], r["method"], r["lr"]) == (task, "lora", lora)}
        keys = sorted((k for k in groups if k[0] == task), key=lambda k: (ORDER.index(k[1]), k[2], k[3] or 1.0))
        for _, method, lr, ratio in keys:
            accs = [100 * r["accuracy"] for r in groups[(task, method, lr, ratio)]]
            own = best_lr(rows, task, method)[0] if lr_sweep_runs(rows, task, method) else None
            which = ", ".join(w for w, v in (("own best", own), ("LoRA's best", lora)) if v == lr) or "other"
            se = statistics.stdev(accs) / len(accs) ** 0.5 if len(accs) > 1 else None
            label = NAMES[method] + (f", gate_lr_ratio {ratio:g}" if ratio not in (None, 1.0) else "")
            diffs = [100 * r["accuracy"] - lora_by_seed[seed_of(r)] for r in groups[(task, method, lr, ratio)]
                     if seed_of(r) in lora_by_seed]
            lines.append(f"| {task} | {label} | {lr:g} | {which} | {len(accs)} | {statistics.mean(accs):.1f}"
                         + (f" ± {se:.1f} | " if se is not None else " (1 seed) | ") + _paired(diffs) + " |")
    return ("Test accuracy (%), mean ± standard error over seeds, at each method's best val rate and at LoRA's; the "
            "last column is the mean difference to LoRA at its best rate over the seeds both ran (± its standard "
            "error, seed by seed):\n\n" + "\n".join(lines))


def seed_of(row: dict) -> int:
    """The run's seed, from the result file's name (`..__seed<s>__..`)."""
    return int(re.search(r"__seed(\d+)__", row["file"]).group(1))


def _paired(diffs: list[float]) -> str:
    """Mean ± standard error of per-seed differences; '-' without a shared seed."""
    if not diffs:
        return "-"
    if len(diffs) == 1:
        return f"{diffs[0]:+.1f} (1 seed)"
    return f"{statistics.mean(diffs):+.1f} ± {statistics.stdev(diffs) / len(diffs) ** 0.5:.1f}"


def lambda_table(rows: list[dict]) -> str:
    lam = [r for r in rows if "__lambda" in r["file"]]
    if not lam:
        return ""
    # The learning-rate sweep's GateRA run at the same learning rate is the default-λ point of this sweep.
    lam += [r for r in rows if "__lr" in r["file"] and r["method"] == "gatera" and r["task"] == lam[0]["task"]
            and r["lr"] == lam[0]["lr"] and r["entropy_weight"] not in {x["entropy_weight"] for x in lam}]
    lines = ["| entropy_weight | accuracy | gold NLL | final gate entropy | final open fraction |", "|---|---|---|---|---|"]
    for r in sorted(lam, key=lambda r: r["entropy_weight"]):
        gates = final_gates(r)
        lines.append(f"| {r['entropy_weight']:g} | {r['accuracy']:.3f} | {r['gold_nll']:.3f} | "
                     f"{gates.get('gatera/entropy', float('nan')):.3f} | "
                     f"{gates.get('gatera/gate_open_frac', float('nan')):.3f} |")
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
    """Last logged gate statistics of each gated method's test runs, per task and learning rate, averaged over
    seeds."""
    tests = [r for r in rows if r["eval_split"] == "test" and r.get("gate_history")]
    if not tests:
        return ""
    lines = ["| method | task | lr | seeds | " + " | ".join(GATE_STATS.values()) + " |",
             "|---|---|---|---|" + "---|" * len(GATE_STATS)]
    for method in [m for m in ORDER if any(r["method"] == m for r in tests)]:
        for task in sorted({r["task"] for r in tests if r["method"] == method}):
            same = [r for r in tests if r["method"] == method and r["task"] == task]
            for lr in sorted({r.get("lr") for r in same}, key=lambda v: (v is None, v or 0)):
                finals = [final_gates(r) for r in same if r.get("lr") == lr]
                cells = []
                for key in GATE_STATS:
                    values = [f[key] for f in finals if key in f]
                    cells.append(f"{statistics.mean(values):.3f}" if values else "-")
                rate = f"{lr:g}" if lr is not None else "-"
                lines.append(f"| {NAMES[method]} | {task} | {rate} | {len(finals)} | " + " | ".join(cells) + " |")
    return "Gates at the end of training (last logged values, mean over seeds):\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "quality"))
    parser.add_argument("--best-lr", nargs=2, metavar=("TASK", "METHOD"),
                        help="print the best learning rate of METHOD on TASK in the sweep (refused at the grid's edge)")
    parser.add_argument("--allow-edge", action="store_true", help="with --best-lr: print it even at the grid's edge")
    args = parser.parse_args()
    rows = load(Path(args.results))
    if args.best_lr:
        task, method = args.best_lr
        lr, edge = best_lr(rows, task.rsplit("/", 1)[-1], method)  # "multiemo/all_sentence_en": runs record the subtask
        if edge and not args.allow_edge:
            raise SystemExit(f"the best learning rate of {args.best_lr[1]} on {args.best_lr[0]} ({lr:g}) is at the "
                             "edge of the swept grid: widen the grid (LRS_* in bench/quality_runs.sh) and rerun lr2, "
                             "or pass --allow-edge")
        print(f"{lr:g}")
        return
    tables = (candidates_table(rows), sweep_table(rows), gate_lr_table(rows), lambda_table(rows), main_table(rows),
              seeds_table(rows), gate_table(rows))
    print("\n\n".join(t for t in tables if t))


if __name__ == "__main__":
    main()
