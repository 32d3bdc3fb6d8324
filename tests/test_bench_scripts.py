"""The benchmark scripts run (tiny settings, no timing asserted): they cannot rot between the runs behind README."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_kernel_speed_smoke_checks_triton_against_torch():
    assert "agree" in _run("bench/kernel_speed.py", "--smoke").stdout


@pytest.mark.slow  # eleven fresh processes, each importing torch, transformers and PEFT (about 75 CPU seconds)
def test_train_step_benchmark_writes_its_ratios(tmp_path):
    out = tmp_path / "train_step.json"
    _run("bench/train_step.py", "--sizes", "tiny", "--rounds", "2", "--warmup", "0", "--memory-steps", "1",
         "--out", str(out))
    result = json.loads(out.read_text())
    assert {row["method"] for row in result["summary"]} == {"peft-lora", "peft-hira", "gatera", "gatera-none",
                                                            "gatera-none-apart"}
    pairs = [("gatera", "gatera-none-apart"), ("gatera", "peft-hira"), ("gatera-none", "peft-hira"),
             ("gatera-none", "gatera-none-apart")]
    assert set(result["round_ratios"]) == {f"tiny: {method} / {baseline}" for method, baseline in pairs}
    assert all(r["q1"] <= r["median"] <= r["q3"] for r in result["round_ratios"].values())
    times = result["raw"]["tiny"]["step_cpu_s"]  # the ratios are of the timed rounds, method over baseline
    for method, baseline in pairs:
        expected = statistics.median(t / b for t, b in zip(times[method], times[baseline]))
        assert result["round_ratios"][f"tiny: {method} / {baseline}"]["median"] == pytest.approx(expected)


@pytest.mark.slow  # nine fresh processes
def test_train_step_benchmark_compares_the_lora_and_dora_branches_with_peft(tmp_path):
    out = tmp_path / "train_step.json"
    _run("bench/train_step.py", "--sizes", "tiny", "--rounds", "2", "--warmup", "0", "--memory-steps", "1",
         "--methods", "peft-dora", "gatera-dora", "gatera-lora", "--out", str(out))
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["summary"]}
    assert set(rows) == {"peft-lora", "peft-dora", "gatera-dora", "gatera-lora"}  # (PEFT's LoRA: every ratio's base)
    assert rows["gatera-dora"]["trainable"] > rows["peft-dora"]["trainable"]  # (the gate's d_in + 1 per layer)
    assert set(result["round_ratios"]) == {"tiny: gatera-lora / peft-lora", "tiny: gatera-dora / peft-dora"}


def test_gate_cost_benchmark_splits_the_gates_ops_from_the_ungated_step(tmp_path):
    out = tmp_path / "gate_cost.json"
    printed = _run("bench/gate_cost.py", "--size", "tiny", "--rounds", "1", "--warmup", "0", "--out", str(out)).stdout
    result = json.loads(out.read_text())
    assert set(result["steps"]) == {"gatera", "gatera-none-apart"}
    rows = {row["op"]: row for row in result["rows"]}
    # only the gated step runs the gate's sigmoid, its GEMV-shaped products and its penalty tap's ops
    assert rows["sigmoid.default per-token"]["gated_calls"] > 0 == rows["sigmoid.default per-token"]["apart_calls"]
    assert rows["mm|addmm vector"]["gated_calls"] > 0 == rows["mm|addmm vector"]["apart_calls"]
    assert rows["mm|addmm large"]["gated_calls"] == rows["mm|addmm large"]["apart_calls"]  # same products
    assert sum(row["diff_ms"] for row in result["rows"]) == pytest.approx(
        sum(row["gated_ms"] - row["apart_ms"] for row in result["rows"]))
    assert [row["diff_ms"] for row in result["rows"]] == sorted((row["diff_ms"] for row in result["rows"]),
                                                                reverse=True)
    assert "all ops" in printed


def test_inference_benchmark_writes_its_table(tmp_path):
    out = tmp_path / "inference.json"
    _run("bench/inference.py", "--tiny", "--fractions", "0.0", "0.9", "--rounds", "1", "--new-tokens", "2",
         "--prompt-length", "8", "--out", str(out))
    variants = [row["variant"] for row in json.loads(out.read_text())["rows"]]
    assert variants == ["base", "gatera-dense@0", "gatera-dense-formed@0", "gatera-sparse-cached@0",
                        "gatera-dense@0.9", "gatera-sparse-cached@0.9"]


def test_quality_table_from_result_files(tmp_path):
    """README's quality tables: mean ± half-range over seeds, step time / LoRA, the λ sweep with its default point."""
    def write(name, **fields):
        row = {"eval_split": "test", "lr": 0.01, "entropy_weight": None, "trainable_params": 10, "step_seconds": 3.0,
               "gold_nll": 0.5, "gate_history": [{"gatera/entropy": 0.7, "gatera/gate_open_frac": 0.9}], **fields}
        (tmp_path / f"{name}.json").write_text(json.dumps(row))

    write("t__lora__seed0__test", task="t", method="lora", accuracy=0.80, step_seconds=2.0)
    write("t__lora__seed1__test", task="t", method="lora", accuracy=0.90, step_seconds=2.0)
    write("t__gatera__seed0__test", task="t", method="gatera", accuracy=0.70, step_seconds=3.0, chance=0.5)
    write("t__gatera__seed0__val__lr0.01", task="t", method="gatera", accuracy=0.60, eval_split="val",
          entropy_weight=0.01)
    write("t__gatera__seed0__val__lr0.003", task="t", method="gatera", accuracy=0.40, eval_split="val", lr=0.003,
          entropy_weight=0.01)
    write("t__gatera__seed0__val__lambda0", task="t", method="gatera", accuracy=0.55, eval_split="val",
          entropy_weight=0.0)
    write("t__gatera-threshold__seed0__test", task="t", method="gatera-threshold", accuracy=0.5,
          gate_history=[{"gatera/kept_frac": 1.0}, {"gatera/kept_frac": 0.25}])
    write("t__gatera-threshold__seed1__test", task="t", method="gatera-threshold", accuracy=0.5,
          gate_history=[{"gatera/kept_frac": 0.75}])
    out = _run("bench/quality_table.py", "--results", str(tmp_path)).stdout
    assert "| LoRA (PEFT) | 10 | 1.00x | 85.0 ± 5.0 |" in out
    assert "| GateRA (sigmoid gate, HiRA, s = 1) | 10 | 1.50x | 70.0 (1 seed) |" in out
    assert "| chance (random option) | | | 50.0 |" in out
    assert "entropy_weight sweep, GateRA, t val split, lr 0.01" in out
    lam = out[out.index("entropy_weight sweep"):out.index("Test accuracy")]
    assert "| 0 | 0.550 |" in lam and "| 0.01 | 0.600 |" in lam and "0.400" not in lam
    assert "| TS-PEFT threshold gate, HiRA | t | 0.01 | 2 | - | - | - | 0.500 | - |" in out


def _bench_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_issue14_tables_mark_the_best_rate_and_flag_an_edge_optimum(tmp_path):
    """lr2 / gatelr / main3 / pick tables: best in bold, an optimum on the grid's edge flagged, mean ± s.e. over seeds;
    `--best-lr` (what main3 and gatelr run at) gives the interior best and refuses an edge one."""
    def write(name, **fields):
        row = {"task": "t", "eval_split": "val", "gold_nll": 0.5, "gate_lr_ratio": 1.0, **fields}
        (tmp_path / f"{name}.json").write_text(json.dumps(row))

    for lr, acc in ((1e-4, 0.5), (1e-3, 0.8), (1e-2, 0.6)):  # LoRA: interior optimum at 1e-3
        write(f"t__lora__seed0__val__lr{lr:g}", method="lora", lr=lr, accuracy=acc)
    for lr, acc in ((1e-4, 0.5), (1e-3, 0.6), (1e-2, 0.7)):  # GateRA-rms: best at the grid's largest rate
        write(f"t__gatera-rms__seed0__val__lr{lr:g}", method="gatera-rms", lr=lr, accuracy=acc)
    for k, acc in ((0.3, 0.65), (3.0, 0.75)):  # gate ratios; ratio 1 is the lr2 run at 1e-2 (0.7), no gate log
        write(f"t__gatera-rms__seed0__val__lr0.01__glr{k:g}", method="gatera-rms", lr=0.01, gate_lr_ratio=k,
              accuracy=acc, gate_history=[{"gatera/gate_mean": 0.5}, {"gatera/gate_mean": k / 10}])
    write("t__zero-shot__seed0__val", method="zero-shot", accuracy=0.5)
    for seed, acc in enumerate((0.8, 0.9, 0.7)):
        write(f"t__lora__seed{seed}__test__lr0.001", method="lora", lr=1e-3, accuracy=acc, eval_split="test")
    write("t__gatera-rms__seed1__test__lr0.001", method="gatera-rms", lr=1e-3, accuracy=0.6, eval_split="test")
    out = _run("bench/quality_table.py", "--results", str(tmp_path)).stdout
    assert "| LoRA (PEFT) | 0.500 (0.500) | **0.800 (0.500)** | 0.600 (0.500) | 0.001 | interior |" in out
    assert "| GateRA, hira_scaling=rms | 0.500 (0.500) | 0.600 (0.500) | **0.700 (0.500)** | 0.01 | " \
           "edge: widen the grid |" in out
    # each gate-ratio cell: val accuracy and the final logged gate mean ("?" for a run that logged none)
    assert "| GateRA, hira_scaling=rms | t | 0.01 | 0.650 (g 0.03) | 0.700 (g ?) | **0.750 (g 0.30)** | 3 | " \
           "edge: widen the grid |" in out
    assert "| t | 0.500 | 0.800 (0.001) | +30.0 | yes |" in out
    assert "| t | LoRA (PEFT) | 0.001 | own best, LoRA's best | 3 | 80.0 ± 5.8 | +0.0 ± 0.0 |" in out  # sd 10 / √3
    # the last column pairs seeds: seed 1 of GateRA-rms against LoRA's seed 1 (0.9), not LoRA's mean
    assert "| t | GateRA, hira_scaling=rms | 0.001 | LoRA's best | 1 | 60.0 (1 seed) | -30.0 (1 seed) |" in out
    assert _run("bench/quality_table.py", "--results", str(tmp_path), "--best-lr", "t", "lora").stdout == "0.001\n"
    # a subtask is passed as "task/subtask" (TASK2=multiemo/all_sentence_en); its runs record the subtask's name
    assert _run("bench/quality_table.py", "--results", str(tmp_path), "--best-lr", "parent/t", "lora").stdout \
        == "0.001\n"
    edge = subprocess.run([sys.executable, "bench/quality_table.py", "--results", str(tmp_path), "--best-lr", "t",
                           "gatera-rms"], capture_output=True, text=True, cwd=ROOT)
    assert edge.returncode != 0 and "(0.01) is at the edge of the swept grid: widen the grid" in edge.stderr
    assert _run("bench/quality_table.py", "--results", str(tmp_path), "--best-lr", "t", "gatera-rms",
                "--allow-edge").stdout == "0.01\n"


def _bench_copy_with_lr2_results(tmp_path) -> None:
    """quality_runs.sh and quality_table.py copied under tmp_path, with lr2 val JSONs on hyperbaton and "t2" whose
    best rates are: LoRA, GateRA-rms and the default 1e-3; PEFT HiRA and GateRA (s = 1) 1e-2 (grid 1e-4..1e-1)."""
    import shutil

    (tmp_path / "bench" / "results" / "quality").mkdir(parents=True)
    for name in ("quality_runs.sh", "quality_table.py"):
        shutil.copy(ROOT / "bench" / name, tmp_path / "bench" / name)
    best = {"lora": 1e-3, "peft-hira": 1e-2, "gatera": 1e-2, "gatera-rms": 1e-3, "gatera-lorascale": 1e-3}
    for task in ("hyperbaton", "t2"):
        for method, top in best.items():
            for lr in (1e-4, 1e-3, 1e-2, 1e-1):
                row = {"task": task, "method": method, "eval_split": "val", "lr": lr, "gold_nll": 0.5,
                       "accuracy": 0.9 if lr == top else 0.5}
                (tmp_path / "bench" / "results" / "quality" / f"{task}__{method}__seed0__val__lr{lr:g}.json"
                 ).write_text(json.dumps(row))


def test_quality_runs_gatelr_sweeps_the_defaults_gate_ratio_and_rms_only_when_asked(tmp_path):
    _bench_copy_with_lr2_results(tmp_path)
    env = dict(os.environ, DRY="1", TASK2="t2", PY=sys.executable)
    default = subprocess.run(["bash", str(tmp_path / "bench" / "quality_runs.sh"), "gatelr"], capture_output=True,
                             text=True, env=env)
    assert default.returncode == 0, default.stderr
    runs = default.stdout.splitlines()
    assert len(runs) == 2 * 6 and all("--method gatera-lorascale --lr 0.001" in r for r in runs)
    assert "--task t2 --method gatera-lorascale --lr 0.001 --gate-lr-ratio 0.03 --seed 0 --eval-split val" in runs[6]
    env["GATELR_METHODS"] = "gatera-lorascale gatera-rms"
    both = subprocess.run(["bash", str(tmp_path / "bench" / "quality_runs.sh"), "gatelr"], capture_output=True,
                          text=True, env=env)
    assert both.returncode == 0, both.stderr
    assert len(both.stdout.splitlines()) == 2 * 2 * 6 and "--method gatera-rms --lr 0.001" in both.stdout


def test_quality_runs_main3_runs_each_method_at_its_own_and_at_loras_best_rate(tmp_path):
    """main3's run list (DRY=1) takes the rates from the lr2 JSONs; an edge optimum stops the stage before any run."""
    _bench_copy_with_lr2_results(tmp_path)
    env = dict(os.environ, DRY="1", TASK2="t2", PY=sys.executable, GLR="3")
    default = subprocess.run(["bash", str(tmp_path / "bench" / "quality_runs.sh"), "main3"], capture_output=True,
                             text=True, env=env)
    assert default.returncode == 0, default.stderr
    assert len(default.stdout.splitlines()) == 2 + 3 * 2 * 6 and "gatera-rms" not in default.stdout  # opt-in only
    env["MAIN3_METHODS"] = "lora peft-hira gatera gatera-rms gatera-lorascale"
    done = subprocess.run(["bash", str(tmp_path / "bench" / "quality_runs.sh"), "main3"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    runs = done.stdout.splitlines()
    assert len(runs) == 2 + 3 * 2 * 7 and "--task t2 --method zero-shot --seed 0" in runs
    assert "--task t2 --method peft-hira --seed 2 --lr 0.01" in runs  # own best
    assert "--task t2 --method peft-hira --seed 2 --lr 0.001" in runs  # LoRA's best
    assert "--task hyperbaton --method gatera-rms --seed 1 --lr 0.001 --gate-lr-ratio 3" in runs
    assert sum("--method lora" in r for r in runs) == 6  # own best = LoRA's best: one run per seed and task
    edge = tmp_path / "bench" / "results" / "quality" / "t2__gatera__seed0__val__lr0.1.json"
    edge.write_text(edge.read_text().replace('"accuracy": 0.5', '"accuracy": 0.95'))
    done = subprocess.run(["bash", str(tmp_path / "bench" / "quality_runs.sh"), "main3"], capture_output=True,
                          text=True, env=env)
    assert done.returncode != 0 and "edge of the swept grid" in done.stderr and not done.stdout.strip()


def test_train_step_bf16_trains_a_bf16_model_under_autocast(monkeypatch):
    """`--precision bf16`: the base model in bf16, the adapter weights fp32 (PEFT's), and each step under bf16
    autocast, where `gate="none"` folds only its backward (`folded_hira(..., fold_forward=False)`)."""
    import dataclasses

    import torch

    from gatera_plugin.branches import BRANCH_KINDS

    train_step = _bench_module("train_step")
    model, _ = train_step._setup("gatera-none", train_step.SIZES["tiny"], "bf16")
    dtypes = {name.split(".")[-1]: p.dtype for name, p in model.named_parameters() if "layers.0.self_attn.q_proj" in name}
    assert dtypes == {"weight": torch.bfloat16, "default": torch.float32}, dtypes
    calls, hira = [], BRANCH_KINDS["hira"]
    monkeypatch.setitem(BRANCH_KINDS, "hira", dataclasses.replace(
        hira, folded=lambda *a, **k: (calls.append(k), hira.folded(*a, **k))[1]))
    times = train_step.timing_worker(["gatera-none", "peft-hira"], "tiny", 1, 0, "bf16")
    assert set(times) == {"gatera-none", "peft-hira"} and all(len(t) == 1 for t in times.values())
    assert calls and all(k["fold_forward"] is False for k in calls)


def test_best_rate_picker_breaks_ties_by_gold_nll_and_needs_a_bracket():
    table = _bench_module("quality_table")
    runs = [{"lr": lr, "accuracy": acc, "gold_nll": nll} for lr, acc, nll in
            ((1e-4, 0.5, 0.9), (1e-3, 0.8, 0.6), (3e-3, 0.8, 0.4), (1e-2, 0.6, 0.7))]
    assert table.best_of(runs, "lr") == (3e-3, False)
    assert table.best_of(runs[1:3], "lr") == (3e-3, True)  # two rates cannot bracket an optimum


def test_quality_gatera_rms_and_gate_lr_ratio_build_the_config_and_name_the_file():
    from argparse import Namespace

    quality = _bench_module("quality")
    args = Namespace(out=None, method="gatera-rms", seed=0, eval_split="val", lr=3e-3, gate_lr_ratio=3.0, tiny=False,
                     entropy_weight=None)
    config = quality.adapter_config("gatera-rms", quality.config_overrides(args))
    assert (config.hira_scaling, config.gate_lr_ratio, config.r, config.gate) == ("rms", 3.0, 16, "sigmoid")
    assert quality.result_path("t", args).name == "t__gatera-rms__seed0__val__lr0.003__glr3.json"
    plain = Namespace(**{**vars(args), "method": "gatera", "lr": 1e-2, "gate_lr_ratio": None})
    assert quality.result_path("t", plain).name == "t__gatera__seed0__val__lr0.01.json"  # existing names unchanged
    assert quality.adapter_config("gatera", quality.config_overrides(plain)).hira_scaling == "none"
    done = subprocess.run([sys.executable, "bench/quality.py", "--task", "t", "--method", "lora", "--gate-lr-ratio",
                           "2"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "--gate-lr-ratio and --entropy-weight are GateRA settings" in done.stderr


def test_lr_transfer_writes_its_table(tmp_path):
    out = tmp_path / "lr_transfer.json"
    _run("bench/lr_transfer.py", "--tiny", "--out", str(out))
    rows = json.loads(out.read_text())["one_step_change"]
    assert rows["peft-lora"]["ratio_to_lora"] == 1.0 and set(rows) == {
        "peft-lora", "gatera-hira (gate none)", "gatera-hira, hira_scaling=rms",
        "gatera (sigmoid gate), hira_scaling=rms", "gatera (sigmoid gate), hira_scaling=lora (default)"}


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_section_failure_is_reported_not_raised():
    """A crashing section becomes its own "error" entry (with the message); the script goes on to the next one."""
    gpu_check = _gpu_check_module()

    def broken():
        raise RuntimeError("no such kernel")

    section = gpu_check.run_section("broken", broken)
    assert section["status"] == "error" and "RuntimeError: no such kernel" in section["error"]
    assert gpu_check.run_section("fine", lambda: [{"status": "ok"}, {"status": "skipped"}])["status"] == "ok"
    assert gpu_check.run_section("bad row", lambda: [{"status": "ok"}, {"status": "error"}])["status"] == "failed"
    # on CUDA a skipped case (triton or bitsandbytes missing) leaves the check incomplete, which fails the run
    skipped = gpu_check.run_section("skip", lambda: [{"status": "ok"}, {"status": "skipped"}], skips_fail=True)
    assert skipped["status"] == "incomplete"


def test_gpu_check_counts_the_syncs_of_a_step(monkeypatch):
    """(d)'s `syncs`: on CUDA one more step runs under torch's sync debug mode, whose warnings are counted by the line
    that caused them; the mode is restored, also when the step fails, and a failure keeps the row (faked CUDA here)."""
    import warnings

    import torch

    gpu_check = _gpu_check_module()
    assert gpu_check._syncs(lambda: None, torch.device("cpu")) == {"syncs": None, "sync_sources": None}
    modes = []
    monkeypatch.setattr(gpu_check, "_cuda", lambda device: True)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)  # (what the mode was: restored after)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def step():
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # as torch warns: the line that synced
        warnings.warn("an unrelated warning", stacklevel=1)

    counted = gpu_check._syncs(step, torch.device("cuda"))
    assert counted["syncs"] == 2 and len(counted["sync_sources"]) == 1, counted
    assert counted["sync_sources"][0].startswith("test_bench_scripts.py:") and counted["sync_sources"][0].endswith("x2")
    assert gpu_check._syncs(lambda: None, torch.device("cuda")) == {"syncs": 0, "sync_sources": []}
    assert modes == ["warn", 0, "warn", 0]

    def failing():
        raise RuntimeError("CUDA error: out of memory")

    failed = gpu_check._syncs(failing, torch.device("cuda"))
    assert failed["syncs"] is None and "out of memory" in failed["sync_sources"] and modes[-1] == 0


@pytest.mark.parametrize("gated", [True, False])
def test_gpu_check_passes_fp32_at_its_full_shape(gated):
    """At (a)'s full shape (257 tokens, 320 → 448, r = 32) the PyTorch path's fp32 gradients are ~6e-5 from fp64,
    rounding of sums of hundreds of terms: (a) judges fp32 by the rounding rule, not the small shapes' atol 1e-5."""
    import torch

    gpu_check = _gpu_check_module()
    row = gpu_check.check_case("torch", torch.float32, "dense", gated, (257, 320, 448, 32), torch.device("cpu"))
    assert row["status"] == "ok", row


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_every_section(tmp_path):
    """Without CUDA, bench/gpu_check.py runs its CPU smoke mode: every section runs and passes, the Triton rows in
    Triton's interpreter (bf16 skipped; the row kernels too), the tiny 4-bit training run's loss falls and its adapter reloads, the
    model-step rows carry their ratios to LoRA and HiRA, and every method generates."""
    out = tmp_path / "gpu_check.json"
    _run("bench/gpu_check.py", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["meta"]["mode"] == "smoke (CPU)"
    sections = result["sections"]
    assert {name: s["status"] for name, s in sections.items()} == {
        "correctness": "ok", "speed": "ok", "training": "ok", "model step": "ok", "generation": "ok"}
    ran = {(r["path"], r["dtype"], r["weight"], r["gated"]) for r in sections["correctness"]["rows"] if r["status"] == "ok"}
    # 12 PyTorch path, 6 folded (ungated), 8 branch kernels (no bf16 in the interpreter), 4 with the row kernels
    # (gated; no bf16)
    assert len(ran) == 30 and ("triton", "fp16", "nf4", True) in ran and ("torch", "bf16", "nf4", True) in ran
    assert ("folded", "bf16", "nf4", False) in ran and ("folded", "fp32", "dense", False) in ran
    assert ("rows", "fp16", "nf4", True) in ran and ("rows", "fp32", "dense", True) in ran
    speed = [r for r in sections["speed"]["rows"] if r["status"] == "ok"]
    assert {r["variant"] for r in speed} >= {"peft-hira", "gatera-torch", "gatera-torch-none"}
    assert all("time_vs_hira" in r for r in speed)  # the folded gate="none" layer's ratio to PEFT's HiRA among them
    assert ("dense-fp32", "gatera-torch-none") in {(r["weight"], r["variant"]) for r in speed}
    training = sections["training"]["rows"][0]
    assert training["loss_falls"] and training["reloads_same"]
    steps = {row["method"]: row for row in sections["model step"]["rows"]}
    assert set(steps) == {"peft-lora", "peft-hira", "gatera", "gatera-pass-input", "gatera-kernel-torch",
                          "gatera-none", "peft-dora", "gatera-dora"}
    assert steps["peft-lora"]["time_vs_lora"] == 1.0 and steps["peft-hira"]["time_vs_hira"] == 1.0
    assert steps["peft-dora"]["time_vs_dora"] == 1.0 and "time_vs_dora" in steps["gatera-dora"]
    assert all(row["syncs"] is None for row in steps.values())  # counted on CUDA only
    assert {row["method"] for row in sections["generation"]["rows"]} == {
        "peft-lora", "peft-hira", "gatera", "gatera-formed", "gatera-cache-delta"}


def test_cache_delta_check_benchmark_runs():
    out = _run("bench/cache_delta_check.py", "--rounds", "1", "--calls", "5").stdout
    assert "check (cache hit)" in out and "layer forward" in out


def test_threshold_gradient_table():
    """README's ∂L/∂τ table: the logistic-only column vanishes far from τ, the package's does not."""
    rows = [line.split("|")[1:-1] for line in _run("bench/threshold_gradient.py").stdout.splitlines()
            if line.startswith("| 0.")]
    assert len(rows) == 8
    assert all(float(now) <= -0.5 for _, _, _, now in rows)
    assert float(rows[3][2]) == 0  # τ = 0.05, r/τ = 10⁴: exactly 0 before


@pytest.mark.parametrize("path", ["torch", "folded"])
@pytest.mark.parametrize("dtype, factor", [("float32", 1.001), ("bfloat16", 1.1)])
def test_gpu_check_correctness_catches_a_wrong_path(monkeypatch, path, dtype, factor):
    """(a) passes the PyTorch path (gated) and the folded one (ungated), and fails one whose output is off by 0.1% in
    fp32, 10% in bf16 (a few bf16 ulps pass: the bf16 rule allows twice naive autograd's own rounding error),
    gradients untouched."""
    import torch

    import gatera_plugin.ops
    import gatera_plugin.ops.hira

    gpu_check = _gpu_check_module()
    case = (path, getattr(torch, dtype), "dense", path == "torch", (9, 64, 24, 8), torch.device("cpu"))
    assert gpu_check.check_case(*case)["status"] == "ok"
    module, name = (gatera_plugin.ops, "gated_hira") if path == "torch" else (gatera_plugin.ops.hira, "folded_hira")
    right = getattr(module, name)

    class _Off(torch.autograd.Function):
        @staticmethod
        def forward(ctx, out):
            return out * factor

        @staticmethod
        def backward(ctx, grad):
            return grad

    monkeypatch.setattr(module, name, lambda *a, **k: _Off.apply(right(*a, **k)))
    result = gpu_check.check_case(*case)
    assert result["status"] == "failed" and result["detail"].startswith("out error")


def test_quality_update_norms_are_each_methods_merged_update_relative_to_w0():
    """`update_norms`: per projection, the median over layers of |ΔW| / |W0|, ΔW as a merge would add it (LoRA's
    (alpha / r) BA, HiRA's W0 ⊙ BA, GateRA-rms's W0 ⊙ BA / RMS(W0))."""
    import torch
    from peft import get_peft_model

    from tests.helpers import tiny_llama

    quality = _bench_module("quality")
    for method in ("lora", "peft-hira", "gatera-rms"):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), quality.adapter_config(method, {}))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad and ("lora_B" in name or "hira_B" in name or "gatera_B" in name):
                    param.normal_(0, 0.1)
        norms = quality.update_norms(model)
        assert set(norms) == set(quality.TARGETS), method
        layers = [m for n, m in model.named_modules() if n.endswith("self_attn.q_proj")]
        expected = []
        for layer in layers:
            W0 = layer.get_base_layer().weight.float()
            if method == "lora":
                delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
            elif method == "peft-hira":
                delta = W0 * (layer.hira_B["default"] @ layer.hira_A["default"])
            else:
                delta = W0 * (layer.gatera_B["default"] @ layer.gatera_A["default"]) / W0.square().mean().sqrt()
            expected.append((delta.norm() / W0.norm()).item())
        assert norms["q_proj"] == pytest.approx(statistics.median(expected), rel=1e-5), method


def test_gate_table_keeps_learning_rates_apart():
    """Gate statistics of one method and task at two learning rates are two rows, each averaged over its own seeds."""
    table = _bench_module("quality_table")
    rows = [{"method": "gatera", "task": "t", "eval_split": "test", "lr": lr, "seed": seed,
             "gate_history": [{"gatera/gate_mean": mean}]}
            for lr, seed, mean in ((3e-3, 0, 0.2), (3e-3, 1, 0.4), (1e-2, 0, 0.9))]
    lines = [line for line in table.gate_table(rows).splitlines() if line.startswith("| GateRA")]
    assert len(lines) == 2
    assert "| t | 0.003 | 2 | 0.300 |" in lines[0] and "| t | 0.01 | 1 | 0.900 |" in lines[1]


def test_quality_methods_are_the_configs_their_names_say():
    """Every bench/quality.py method has a rate and a table name; HiRA-family methods run at s = 1 unless their name
    says otherwise, and the `-lorascale` ones get the default scale with the LoRA baseline's r and lora_alpha."""
    quality, table = _bench_module("quality"), _bench_module("quality_table")
    assert set(quality.METHODS) == set(table.ORDER) == set(table.NAMES)
    for method in quality.GATERA_METHODS:
        config = quality.adapter_config(method, {})
        if method.endswith("-lorascale"):
            assert (config.hira_scaling, config.r, config.lora_alpha) == ("lora", quality.RANK, 2 * quality.RANK)
        elif config.branch == "hira":
            assert config.hira_scaling == ("rms" if method == "gatera-rms" else "none"), method
    for method, keep in (("gatera-threshold-lorascale", None), ("gatera-threshold-keep50-lorascale", 0.5)):
        config = quality.adapter_config(method, {})
        assert (config.gate, config.keep_ratio) == ("threshold", keep)
        assert quality.LEARNING_RATES[method] == quality.LEARNING_RATES["lora"]


def test_host_ops_counts_every_variant(tmp_path):
    """bench/host_ops.py (README's ATen-call counts and host times) writes one count per variant and one host time
    per timed variant, and GateRA's gated layer issues more operations than PEFT's HiRA (its gate and the penalty's
    taps), which is what the README explains. (Times are not compared here: timed tests are flaky.)"""
    out = tmp_path / "host_ops.json"
    _run("bench/host_ops.py", "--rounds", "1", "--out", str(out))
    result = json.loads(out.read_text())
    counts = result["aten_calls"]
    assert set(counts) == {"peft-lora", "peft-hira", "gatera-torch"}
    assert counts["gatera-torch"] > counts["peft-hira"] > 0
    assert set(result["host_us"]) == {"peft-lora", "peft-hira", "gatera-torch-none", "gatera-torch-no-penalty",
                                      "gatera-torch"}
    assert all(us > 0 for us in result["host_us"].values()) and result["host_vs_peft_hira"]["peft-hira"] == 1.0
    assert set(result["decode_us"]) == {"peft-lora", "peft-hira", "gatera-torch-none", "gatera-torch"}
    assert all(us > 0 for us in result["decode_us"].values()) and result["decode_vs_peft_hira"]["peft-hira"] == 1.0


def test_row_ops_smoke_runs_both_sides_of_every_operation(tmp_path):
    """bench/row_ops.py (README's row-kernel table, the "auto" thresholds in kernels/rows.py) runs PyTorch's ops and
    the kernels (under the interpreter here) for each operation and writes one row each."""
    out = tmp_path / "row_ops.json"
    _run("bench/row_ops.py", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["meta"]["machine"]["cpu"]  # (what _machine.machine_info gives: test below)
    assert [row["op"] for row in rows] == ["scale", "add_scaled", "scale_and_dot_"]
    assert all(row["torch_host_us"] > 0 and row["triton_host_us"] > 0 for row in rows)


def test_decode_branch_smoke_measures_both_paths_and_says_which_is_taken(tmp_path):
    """bench/decode_branch.py (README's decoding table, `ops.hira.FACTORED_LIMITS`) times the formed and the
    factored update for each size, rank and token count, and says which one `factored_pays` takes; the two outputs
    agree to bf16 rounding."""
    out = tmp_path / "decode_branch.json"
    _run("bench/decode_branch.py", "--smoke", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(row["d_in"], row["tokens"], row["taken"]) for row in rows] == [(64, 1, False), (64, 4, False),
                                                                             (256, 1, True), (256, 4, False)]
    assert all(row["formed_ms"] > 0 and row["factored_ms"] > 0 and row["max_difference"] < 1e-2 for row in rows)


def test_gate_node_benchmark_times_both_paths_of_the_gate(tmp_path):
    """bench/gate_node.py (README's table of the gate's two paths to x, `gates.PASS_INPUT_DEVICE_TYPES`) times one
    gated layer with the gate's node and with `F.linear` (the script checks each path's graph holds the node or not)
    and writes one row per size. (Times are not compared here: timed tests are flaky.)"""
    out = tmp_path / "gate_node.json"
    printed = _run("bench/gate_node.py", "--sizes", "16x4", "32x8", "--rounds", "1", "--out", str(out)).stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["meta"]["machine"]["cpu"] and "machine: " in printed
    assert [(row["d"], row["tokens"]) for row in rows] == [(16, 4), (32, 8)]
    assert all(row["node_us"] > 0 and row["linear_us"] > 0 for row in rows)
    assert printed.count("| 16 | 4 |") == 1 and printed.count("| 32 | 8 |") == 1


def test_benchmarks_record_the_machine_and_the_commit_they_ran_on(monkeypatch):
    """Each benchmark's JSON names the CPU (and its bf16/AMX instructions), GPU, torch and commit it ran on
    (`bench/_machine.py`): this project's CPU machine changed between sessions and the same script's ratios with it."""
    machine = _bench_module("_machine")
    info = machine.machine_info()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # (a git checkout: CI's clone is one)
        assert info["commit"].split("+")[0] == head.stdout.strip()
    assert info["cpu"] and set(info["cpu_flags"]) <= set(machine.PRODUCT_FLAGS) and info["cores"] >= 1
    base = dict(info, gpu=None, torch="2.13.0+cpu", commit="ab12cd3", cpu="Some CPU")
    assert machine.describe(dict(base, cpu_flags=["amx_bf16", "amx_tile", "avx512_bf16", "avx512f"])) == (
        "Some CPU (AMX), torch 2.13.0+cpu, commit ab12cd3")
    assert machine.describe(dict(base, cpu_flags=["avx512_bf16", "avx512f", "avx2"])).startswith(
        "Some CPU (avx512_bf16, no AMX)")
    assert machine.describe(dict(base, cpu_flags=["avx2"])).startswith("Some CPU (avx2)")
    assert machine.describe(dict(base, gpu="NVIDIA H200", commit=None)) == (
        "NVIDIA H200, torch 2.13.0+cpu, commit unknown")
    monkeypatch.setattr(machine.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("git")))
    assert machine.machine_info()["commit"] is None  # no git: no commit, no error


# every script that writes a JSON, with the arguments it needs besides --out
_WRITERS = {
    "decode_branch": [], "gate_cost": [], "gate_node": [], "gpu_check": [], "host_ops": [], "inference": [],
    "kernel_speed": [], "lr_transfer": [], "row_ops": [], "train_step": [],
    "quality": ["--task", str(ROOT / "tests" / "data" / "tiny_task.json"), "--method", "lora", "--tiny"],
    "gate_summary": ["--adapter", "no-adapter-needed", "--task", str(ROOT / "tests" / "data" / "tiny_task.json")],
}


def test_every_bench_script_that_writes_json_goes_through_the_refusing_writer():
    """A new script writing JSON its own way would bypass the refusal below: every `write_text` of bench/ is checked."""
    writers = {path.stem for path in (ROOT / "bench").glob("[!_]*.py") if "write_json(" in path.read_text()}
    raw = {path.stem for path in (ROOT / "bench").glob("*.py") if ".write_text(json.dumps" in path.read_text()}
    assert writers == set(_WRITERS) and raw == {"zero3_repeat"}  # (zero3_repeat appends to its --json list)


@pytest.mark.parametrize("script", sorted(_WRITERS))
def test_a_bench_script_refuses_an_existing_out_before_it_measures(script, tmp_path, monkeypatch, capsys):
    """README's tables quote the JSONs in bench/results/: a script given an existing --out (or whose default exists)
    stops at once with a message naming --overwrite, and leaves the file as it was."""
    out = tmp_path / "quoted.json"
    out.write_text('{"quoted": true}')
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *_WRITERS[script], "--out", str(out)])
    with pytest.raises(SystemExit) as stopped:
        _bench_module(script).main()
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"{out} exists" in error and "--overwrite" in error
    assert out.read_text() == '{"quoted": true}'


@pytest.mark.parametrize("script, moves", [("gpu_check", True), ("host_ops", True), ("quality", False)])
def test_an_existing_default_path_gives_the_run_a_free_name_where_the_name_means_nothing(script, moves, tmp_path,
                                                                                      monkeypatch, capsys):
    """`python bench/gpu_check.py` (README's one command on a GPU) on a clone, whose gpu_check.json is committed, was
    refused: a default path that exists gives the run the first free `-N` name instead (told on stderr). bench/quality.py
    names a result by its run (task, method, seed, ...), so there it stops as for --out."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from _results import add_output_arguments, output_path

    parser = __import__("argparse").ArgumentParser(prog=script)
    add_output_arguments(parser, "x")
    (tmp_path / "r.json").write_text("{}")
    (tmp_path / "r-2.json").write_text("{}")
    args = parser.parse_args([])
    if moves:
        assert output_path(parser, args, tmp_path / "r.json") == tmp_path / "r-3.json"
        assert "r.json exists (kept); this run writes" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit):
            output_path(parser, args, tmp_path / "r.json", default_may_move=False)
    assert output_path(parser, parser.parse_args(["--overwrite"]), tmp_path / "r.json") == tmp_path / "r.json"
    with pytest.raises(SystemExit):  # (an --out below a file stops before measuring, not at the write)
        output_path(parser, parser.parse_args(["--out", str(tmp_path / "r.json" / "x.json")]), tmp_path / "y.json")
    assert "is a file, not a folder" in capsys.readouterr().err


def test_quality_tables_skip_a_second_result_of_one_run(tmp_path, capsys):
    """Two runs of one bench/quality.py run at once leave `<run>.json` and `<run>-2.json`: the tables counted the copy
    as another seed; now it is skipped, with a note."""
    row = {"task": "t", "method": "lora", "seed": 0, "eval_split": "val", "accuracy": 0.5, "gold_nll": 0.5}
    (tmp_path / "t__lora__seed0__val__lr0.001.json").write_text(json.dumps(row))
    (tmp_path / "t__lora__seed0__val__lr0.001-2.json").write_text(json.dumps({**row, "accuracy": 0.9}))
    (tmp_path / "t__lora__seed0__val__lr1e-05.json").write_text(json.dumps(row))  # (a rate's exponent, not a copy)
    rows = _bench_module("quality_table").load(tmp_path)
    assert [r["file"] for r in rows] == ["t__lora__seed0__val__lr0.001.json", "t__lora__seed0__val__lr1e-05.json"]
    assert "a second result of the run that wrote t__lora__seed0__val__lr0.001.json" in capsys.readouterr().err


def test_write_json_never_replaces_a_file_written_meanwhile_unless_told(tmp_path, monkeypatch, capsys):
    """A file that another run wrote while this one measured is kept: this run's result goes to `<stem>-2.json`;
    `overwrite=True` replaces it; no temporary file is left behind."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from _results import write_json

    out = tmp_path / "sub" / "r.json"
    assert write_json(out, {"run": 1}, False) == out
    assert write_json(out, {"run": 2}, False) == tmp_path / "sub" / "r-2.json"
    assert "appeared while this ran" in capsys.readouterr().err
    assert write_json(out, {"run": 3}, False) == tmp_path / "sub" / "r-3.json"
    assert [json.loads((tmp_path / "sub" / n).read_text())["run"] for n in ("r.json", "r-2.json", "r-3.json")] == [1, 2, 3]
    assert write_json(out, {"run": 4}, True) == out and json.loads(out.read_text()) == {"run": 4}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["r-2.json", "r-3.json", "r.json"]
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "sub").iterdir()} == {oct(0o666 & ~_umask())}

    def no_links(*args):  # a filesystem without hard links (vfat, some network mounts): the result was lost
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr("os.link", no_links)
    assert write_json(out, {"run": 5}, False) == tmp_path / "sub" / "r-4.json"
    assert json.loads((tmp_path / "sub" / "r-4.json").read_text()) == {"run": 5}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_zero3_repeat_refuses_to_empty_a_folder_it_did_not_make(tmp_path, monkeypatch, capsys):
    """bench/zero3_repeat.py empties its scratch --out before the runs: a folder with files it did not make (say,
    bench/results given by mistake) is refused, untouched; so is a file."""
    (tmp_path / "keep.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["zero3_repeat.py", "--out", str(tmp_path / "keep.json")])
    with pytest.raises(SystemExit):
        _bench_module("zero3_repeat").main()
    assert "is a file" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["zero3_repeat.py", "--runs", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as stopped:
        _bench_module("zero3_repeat").main()
    assert stopped.value.code == 2 and "did not make" in capsys.readouterr().err
    assert (tmp_path / "keep.json").read_text() == "{}"
