"""Token-gate kinds. Each kind is an `nn.Module` stored per adapter in `GateRALayer.gatera_gate`.

A token gate maps the layer input x (..., d_in) to one multiplier per token (..., 1) that scales the branch output.
`gate="none"` stores no module; the branch is then used ungated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SigmoidGate(nn.Module):
    """GateRA's gate `g(x) = σ(w·x + b)`: (..., d_in) → (..., 1); `d_in + 1` parameters.

    `weight` (1, d_in) starts at 0 and `bias` (1,) at `bias_init`, so every token starts with `g = σ(bias_init)`.
    """

    def __init__(self, in_features: int, bias_init: float = 0.0):
        super().__init__()
        self.bias_init = bias_init
        self.weight = nn.Parameter(torch.zeros(1, in_features))
        self.bias = nn.Parameter(torch.full((1,), float(bias_init)))

    def reset_parameters(self, random: bool = False) -> None:
        """Zero weight (default), or a random one (`random=True`, for tests), and the configured bias."""
        with torch.no_grad():
            if random:
                nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.weight.shape[1]))
            else:
                self.weight.zero_()
            self.bias.fill_(self.bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype)))

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, bias_init={self.bias_init}"


def make_token_gate(kind: str, in_features: int, config) -> nn.Module | None:
    """Build the gate module of `kind` for a layer with `in_features` inputs; None for `"none"`."""
    if kind == "none":
        return None
    if kind == "sigmoid":
        return SigmoidGate(in_features, bias_init=config.gate_bias_init)
    raise ValueError(f"Unknown token gate {kind!r}.")  # GateRAConfig validates the name first
