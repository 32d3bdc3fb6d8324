"""Carry the forward pass's autocast state into a custom backward (what `torch.amp.custom_bwd` does, any device)."""

from __future__ import annotations

import torch


def autocast_state(device_type: str) -> dict:
    """The autocast settings active now on `device_type`, as kwargs for `torch.autocast`."""
    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
    }


def restore_autocast(state: dict):
    """Context manager re-entering the autocast state saved by `autocast_state` (a no-op when it was off)."""
    if not state["enabled"]:
        return torch.autocast(device_type=state["device_type"], enabled=False)
    return torch.autocast(**state)

