"""Test environment: CPU, one thread, offline, Triton in interpreter mode (must be set before triton is imported)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import gatera_plugin  # noqa: E402,F401  (registers GateRA with PEFT)


@pytest.fixture(params=["one-block", "many-blocks"])
def hira_blocks(request, monkeypatch):
    """Run a HiRA test with ΔW built whole and in blocks of 2 rows (of the test module's `D_IN` columns each)."""
    import gatera_plugin.ops.hira as hira_ops

    if request.param == "many-blocks":
        monkeypatch.setattr(hira_ops, "CHUNK_ELEMENTS", 2 * request.module.D_IN)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
