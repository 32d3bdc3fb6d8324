"""Branch kinds: how a GateRA layer computes its (gated, scaled) update `s · g ⊙ Δy(x)`.

Every branch kind is one function `(layer, adapter_name, x, gate, base) -> base + s · g ⊙ Δy(x)` where `x` is the
(dropped-out) branch input (..., d_in), `gate` the token gate (..., 1) or None and `base` the output so far
(..., d_out). The gate is passed in, not applied after, so that each branch can form the gate's gradient without
storing its own output, and the residual add happens inside the same fused operation (see `ops/`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .ops import gated_hira, gated_lora


def hira_branch(layer, adapter_name: str, x: torch.Tensor, gate: Optional[torch.Tensor], base: torch.Tensor):
    """HiRA: `base + s · g ⊙ (x (W0 ⊙ BA)ᵀ)`, W0 re-read (and dequantised) in backward instead of kept."""
    A, B = layer.gatera_A[adapter_name], layer.gatera_B[adapter_name]
    return gated_hira(x, gate, A, B, layer.base_weight, layer.scaling[adapter_name], base=base)


def lora_branch(layer, adapter_name: str, x: torch.Tensor, gate: Optional[torch.Tensor], base: torch.Tensor):
    """LoRA: `base + s · g ⊙ (x Aᵀ Bᵀ)` with `s = lora_alpha / r`."""
    A, B = layer.gatera_A[adapter_name], layer.gatera_B[adapter_name]
    return gated_lora(x, gate, A, B, layer.scaling[adapter_name], base=base)


BRANCH_FUNCTIONS: dict[str, Callable] = {"hira": hira_branch, "lora": lora_branch}


def delta_weight(kind: str, base_weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float):
    """Additive weight update (d_out × d_in) of an ungated branch: `W' = W0 + delta_weight` (used by merge)."""
    BA = B.float() @ A.float()
    if kind == "hira":
        return scaling * base_weight.float() * BA
    if kind == "lora":
        return scaling * BA
    raise ValueError(f"Unknown branch {kind!r}.")
