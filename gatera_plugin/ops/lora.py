"""Gated LoRA branch: `s · g ⊙ (x Aᵀ Bᵀ)`, keeping `x`, `g`, `A`, `B` and the rank-r activation `h = x Aᵀ`.

Plain autograd would also keep the branch output (N × d_out) to form the gate's gradient. It is not needed:
`dg_t = s δ_tᵀ B h_t = s (δ_t B) · h_t` is a dot product in the rank-r space, so this function stores only what
PEFT's LoRA stores plus the gate (N × 1).

Backward, with `δ = ∂L/∂out` (N × d_out) and `u = δ B` (N × r):

    dg = s · Σ_k u ⊙ h,   dh = s·g ⊙ u,   dx = dh A,   dA = dhᵀ x,   dB = (s·g ⊙ δ)ᵀ h
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._autocast import autocast_state, restore_autocast


class GatedLoraFunction(torch.autograd.Function):
    """Autograd function for `s · g ⊙ (x Aᵀ Bᵀ)`; `g` may be `None` (plain LoRA)."""

    @staticmethod
    def forward(ctx, x, gate, A, B, scaling):
        """x: (N, d_in), gate: (N, 1) or None, A: (r, d_in), B: (d_out, r)."""
        ctx.autocast = autocast_state(x.device.type)
        h = x @ A.t()  # (N, r)
        out = h @ B.t()  # (N, d_out)
        if gate is not None:
            out = out * (gate * scaling)
        elif scaling != 1.0:
            out = out * scaling
        ctx.save_for_backward(x, gate, A, B, h)
        ctx.scaling = scaling
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, gate, A, B, h = ctx.saved_tensors
        need_x, need_gate, need_A, need_B = ctx.needs_input_grad[:4]
        s = ctx.scaling
        grad_x = grad_gate = grad_A = grad_B = None
        token_scale = gate * s if gate is not None else s
        with torch.no_grad(), restore_autocast(ctx.autocast):
            u = grad_out @ B.to(grad_out.dtype)  # (N, r)
            if need_gate:
                grad_gate = (u * h).sum(dim=-1, keepdim=True).mul_(s).to(gate.dtype)
            dh = u * token_scale  # (N, r)
            if need_x:
                grad_x = (dh @ A.to(dh.dtype)).to(x.dtype)
            if need_A:
                grad_A = (dh.t() @ x.to(dh.dtype)).to(A.dtype)
            if need_B:
                grad_B = ((grad_out * token_scale).t() @ h.to(grad_out.dtype)).to(B.dtype)
        return grad_x, grad_gate, grad_A, grad_B, None


def gated_lora(
    x: torch.Tensor, gate: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """`s · g ⊙ (x Aᵀ Bᵀ)` for x of shape (..., d_in) and gate (..., 1) or None; returns (..., d_out)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    g2 = gate.reshape(-1, 1) if gate is not None else None
    out = GatedLoraFunction.apply(x2, g2, A, B, scaling)
    return out.reshape(*lead, out.shape[-1])
