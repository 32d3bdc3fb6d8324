"""The benchmark scripts run (tiny settings, no timing asserted): they cannot rot between the runs behind README."""

import json
import os
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


def test_inference_benchmark_writes_its_table(tmp_path):
    out = tmp_path / "inference.json"
    _run("bench/inference.py", "--tiny", "--fractions", "0.0", "0.9", "--rounds", "1", "--new-tokens", "2",
         "--prompt-length", "8", "--out", str(out))
    assert json.loads(out.read_text())


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
    assert "| GateRA (sigmoid gate, HiRA) | 10 | 1.50x | 70.0 (1 seed) |" in out
    assert "| chance (random option) | | | 50.0 |" in out
    assert "entropy_weight sweep, GateRA, t val split, lr 0.01" in out
    lam = out[out.index("entropy_weight sweep"):out.index("Test accuracy")]
    assert "| 0 | 0.550 |" in lam and "| 0.01 | 0.600 |" in lam and "0.400" not in lam
    assert "| TS-PEFT threshold gate, HiRA | t | 2 | - | - | - | 0.500 | - |" in out


def test_lr_transfer_writes_its_table(tmp_path):
    out = tmp_path / "lr_transfer.json"
    _run("bench/lr_transfer.py", "--tiny", "--out", str(out))
    rows = json.loads(out.read_text())["one_step_change"]
    assert rows["peft-lora"]["ratio_to_lora"] == 1.0 and set(rows) == {
        "peft-lora", "gatera-hira (gate none)", "gatera-hira, hira_scaling=rms"}


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


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_every_section(tmp_path):
    """Without CUDA, bench/gpu_check.py runs its CPU smoke mode: every section runs and passes, the Triton rows in
    Triton's interpreter (bf16 skipped), the tiny 4-bit training run's loss falls and its adapter reloads."""
    out = tmp_path / "gpu_check.json"
    _run("bench/gpu_check.py", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["meta"]["mode"] == "smoke (CPU)"
    sections = result["sections"]
    assert {name: s["status"] for name, s in sections.items()} == {"correctness": "ok", "speed": "ok", "training": "ok"}
    ran = {(r["path"], r["dtype"], r["weight"], r["gated"]) for r in sections["correctness"]["rows"] if r["status"] == "ok"}
    assert len(ran) == 20 and ("triton", "fp16", "nf4", True) in ran and ("torch", "bf16", "nf4", True) in ran
    training = sections["training"]["rows"][0]
    assert training["loss_falls"] and training["reloads_same"]


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


@pytest.mark.parametrize("dtype, factor", [("float32", 1.001), ("bfloat16", 1.1)])
def test_gpu_check_correctness_catches_a_wrong_path(monkeypatch, dtype, factor):
    """(a) passes the PyTorch path and fails one whose output is off by 0.1% in fp32, 10% in bf16 (a few bf16 ulps
    pass: the bf16 rule allows twice naive autograd's own rounding error), gradients untouched."""
    import torch

    import gatera_plugin.ops

    gpu_check = _gpu_check_module()
    case = ("torch", getattr(torch, dtype), "dense", True, (9, 64, 24, 8), torch.device("cpu"))
    assert gpu_check.check_case(*case)["status"] == "ok"
    right = gatera_plugin.ops.gated_hira

    class _Off(torch.autograd.Function):
        @staticmethod
        def forward(ctx, out):
            return out * factor

        @staticmethod
        def backward(ctx, grad):
            return grad

    monkeypatch.setattr(gatera_plugin.ops, "gated_hira", lambda *a, **k: _Off.apply(right(*a, **k)))
    result = gpu_check.check_case(*case)
    assert result["status"] == "failed" and result["detail"].startswith("out error")
