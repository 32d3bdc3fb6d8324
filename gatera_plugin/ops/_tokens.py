"""Run a branch autograd function over the tokens of any leading shape."""

from __future__ import annotations

from typing import Optional

import torch


def apply_to_tokens(function, x: torch.Tensor, gate: Optional[torch.Tensor], base: Optional[torch.Tensor], *args):
    """`function.apply(base, x, gate, *args)` on x (..., d_in) flattened to (N, d_in), gate to (N, 1) and base to
    (N, d_out) (a 1-D base, a bias, as it is); the result (N, d_out) is reshaped back to (..., d_out)."""
    if x.dim() == 2 and (gate is None or gate.dim() == 2) and (base is None or base.dim() == 2):
        return function.apply(base, x, gate, *args)  # (the layer passes rows already: no views to make)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    g2 = gate.reshape(-1, 1) if gate is not None else None
    b2 = base.reshape(-1, base.shape[-1]) if base is not None and base.dim() > 1 else base  # (a bias stays 1-D)
    out = function.apply(b2, x2, g2, *args)
    return out.reshape(*lead, out.shape[-1])


def records_graph(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd would record an operation on `tensors` (None entries skipped): grad mode is on and one of
    them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
