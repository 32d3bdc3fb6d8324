"""Carry the forward pass's autocast state into a custom backward (what `torch.amp.custom_bwd` does, any device);
which dtypes are half precision."""

from __future__ import annotations

import contextlib

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
"""The half-precision dtypes: sums over their products are kept in fp32, fp32 parameters are kept fp32 beside them."""


def autocast_state(device_type: str) -> dict:
    """The autocast settings active now on `device_type`, as kwargs for `torch.autocast`."""
    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
    }


def autocast_factors(state: dict, *factors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`factors` (the adapter's A and B) in the autocast dtype where `state` (`autocast_state`) has autocast on, as
    autocast casts them for each product (fp64 kept, as autocast keeps it); unchanged where it is off. A branch's
    forward casts them once and saves the casts, so its backward does not cast them again (two casts per layer and
    step fewer, as autograd's own linear layers save the weight autocast cast)."""
    if not state["enabled"]:
        return factors
    return tuple(t if t.dtype in (torch.float64, state["dtype"]) else t.to(state["dtype"]) for t in factors)


def restore_autocast(state: dict):
    """Context manager re-entering the autocast state saved by `autocast_state` (autocast off, as `autocast_off`,
    when it was off)."""
    if not state["enabled"]:
        return autocast_off(state["device_type"])
    return torch.autocast(**state)


def autocast_off(device_type: str):
    """Context manager turning autocast off on `device_type`: `torch.autocast(enabled=False)` where autocast is on
    (a backward called inside an autocast region), and nothing where it is off already, as a backward usually runs:
    entering `torch.autocast` (a Python context manager) costs host time, once per gated layer and backward node."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
