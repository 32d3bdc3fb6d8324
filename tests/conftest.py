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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
