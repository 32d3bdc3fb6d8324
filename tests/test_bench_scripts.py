"""The benchmark scripts run (tiny settings, no timing asserted): they cannot rot between the runs behind README."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
