"""Triton kernels (CUDA) for the gated branches, and the choice between them and the exact PyTorch path.

`GateRAConfig(kernel=...)`: "auto" (default) takes Triton for CUDA tensors when triton imports, the PyTorch path
(`gatera_plugin.ops`) otherwise; "triton" insists (an error off CUDA, except under TRITON_INTERPRET=1, Triton's CPU
interpreter, which the tests use); "torch" always takes the PyTorch path.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

KERNELS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(choice: str, device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether a layer whose input lives on `device` (in `dtype`) runs the Triton kernels for `kernel=choice`."""
    if choice == "torch":
        return False
    if choice == "auto":
        return device.type == "cuda" and triton_available() and dtype in KERNEL_DTYPES
    if dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"kernel='triton' runs float32, float16 and bfloat16 inputs, got {dtype}. Use kernel='torch' (or 'auto', "
            "which falls back to the PyTorch path) for other dtypes."
        )
    if not triton_available():
        raise ImportError("kernel='triton' needs the `triton` package (`pip install gatera-plugin[triton]`).")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"kernel='triton' runs on CUDA tensors, but this layer's input is on {device}. Use kernel='auto' (Triton "
            "on CUDA, the exact PyTorch path elsewhere) or kernel='torch'; to run the kernels on CPU in Triton's "
            "interpreter (slow, for tests) set TRITON_INTERPRET=1 before importing triton."
        )
    return True
