"""What a benchmark ran on, for its JSON's `meta["machine"]`: this project's CPU machine has changed between sessions
(an AVX-512 bf16 CPU, then one with AMX tiles, then an AMD EPYC without them), and the same script's ratios differ
between them (README, "This machine changed between sessions"). Also the commit, so a table names the code it timed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

# CPU features that decide how fast this machine runs bf16 and fp32 products (Linux /proc/cpuinfo flag names).
PRODUCT_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def _cpu() -> tuple[str, list[str]]:
    """(model name, the `PRODUCT_FLAGS` it has) from /proc/cpuinfo; (platform.processor(), []) without one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", platform.machine()), [flag for flag in PRODUCT_FLAGS if flag in flags]


def _commit(repo: Path | None = None) -> str | None:
    """The commit of the checkout `repo` (default: this one), with "+changes" when tracked files differ from it; None
    outside a git checkout."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if dirty else "")


def machine_info(code: Path | None = None) -> dict:
    """{"cpu", "cpu_flags", "cores", "gpu", "torch", "python", "commit"}: the machine and code a result came from
    (`code`: the checkout measured, where not this one)."""
    import torch

    cpu, flags = _cpu()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "commit": _commit(code)}


def describe(info: dict) -> str:
    """One line for a table's header: "AMD EPYC (avx512_bf16, no AMX), torch 2.13.0+cpu, commit ab12cd3"."""
    flags = info["cpu_flags"]
    isa = "AMX" if "amx_bf16" in flags else ("avx512_bf16, no AMX" if "avx512_bf16" in flags else
                                             ", ".join(flags) or "no AVX-512")
    device = info["gpu"] or f"{info['cpu']} ({isa})"
    return f"{device}, torch {info['torch']}, commit {info['commit'] or 'unknown'}"


def recorded(file=None, code: Path | None = None) -> dict:
    """`machine_info(code)`, for a result's `meta["machine"]`, after printing it as one line ("machine: ...",
    `describe`) under the table the script printed (to `file`, default stdout)."""
    info = machine_info(code)
    print(f"\nmachine: {describe(info)}", file=file or sys.stdout)
    return info
