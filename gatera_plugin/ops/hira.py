"""Memory-lean gated HiRA branch: `s · g ⊙ (x (W0 ⊙ BA)ᵀ)` keeping only `x`, `g`, `A`, `B` for backward.

PEFT's HiRA builds `ΔW = W0 ⊙ BA` (d_out × d_in) every forward and lets autograd keep it until backward, one such
matrix per adapted layer (and, on 4-bit bases, a dequantised `W0` too). Here `BA`, `ΔW` and the dequantised `W0` are
rebuilt in backward instead, so between forward and backward a layer holds nothing of size d_out × d_in.

Backward (SPEC.md section 2), with `δ = ∂L/∂out` (N × d_out) and `G = s·g ⊙ δ`:

    P  = δ ΔW                    (N × d_in)   one product serves both:
    dx = s·g ⊙ P                              dx_t = s g_t ΔWᵀ δ_t
    dg = s · Σ_i P ⊙ x                        dg_t = s δ_tᵀ (ΔW x_t) = s (δ_t ΔW) · x_t
    dM = W0 ⊙ (Gᵀ x)             (d_out × d_in, transient)
    dB = dM Aᵀ,  dA = Bᵀ dM

so the gate's gradient costs no extra product with `ΔW`: three matmuls of size N·d_in·d_out in all (one forward, two
backward), as many as PEFT's HiRA, plus the cheap rebuild of `BA` (d_out·r·d_in).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from ._autocast import autocast_state, restore_autocast


def _delta_weight(weight_fn: Callable[[], torch.Tensor], A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """`ΔW = W0 ⊙ (B A)`, (d_out × d_in), in the dtype of the factors (one d_out × d_in buffer)."""
    return (B @ A).mul_(weight_fn())


class GatedHiraFunction(torch.autograd.Function):
    """Autograd function for `s · g ⊙ (x (W0 ⊙ BA)ᵀ)`; `g` may be `None` (ungated HiRA)."""

    @staticmethod
    def forward(ctx, x, gate, A, B, weight_fn, scaling):
        """x: (N, d_in), gate: (N, 1) or None, A: (r, d_in), B: (d_out, r), weight_fn() -> W0 (d_out, d_in)."""
        ctx.autocast = autocast_state(x.device.type)
        out = x @ _delta_weight(weight_fn, A, B).t()  # (N, d_out)
        if gate is not None:
            out = out * (gate * scaling)
        elif scaling != 1.0:
            out = out * scaling
        ctx.save_for_backward(x, gate, A, B)
        ctx.weight_fn = weight_fn
        ctx.scaling = scaling
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, gate, A, B = ctx.saved_tensors
        need_x, need_gate, need_A, need_B = ctx.needs_input_grad[:4]
        s = ctx.scaling
        grad_x = grad_gate = grad_A = grad_B = None
        # per-token factor multiplying the branch: s·g (N, 1) or the scalar s
        token_scale = gate * s if gate is not None else s
        with torch.no_grad(), restore_autocast(ctx.autocast):
            W0 = ctx.weight_fn()
            if need_x or need_gate:
                P = grad_out @ _delta_weight(lambda: W0, A, B).to(grad_out.dtype)  # (N, d_in)
                if need_gate:
                    grad_gate = (P * x).sum(dim=-1, keepdim=True).mul_(s).to(gate.dtype)
                if need_x:
                    grad_x = (P * token_scale).to(x.dtype)
                del P
            if need_A or need_B:
                G = grad_out * token_scale  # (N, d_out)
                dM = (G.t() @ x.to(G.dtype)).mul_(W0)  # (d_out, d_in)
                del G
                if need_B:
                    grad_B = (dM @ A.to(dM.dtype).t()).to(B.dtype)
                if need_A:
                    grad_A = (B.to(dM.dtype).t() @ dM).to(A.dtype)
        return grad_x, grad_gate, grad_A, grad_B, None, None


def gated_hira(
    x: torch.Tensor,
    gate: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    weight_fn: Callable[[], torch.Tensor],
    scaling: float = 1.0,
) -> torch.Tensor:
    """`s · g ⊙ (x (W0 ⊙ BA)ᵀ)` for x of shape (..., d_in) and gate (..., 1) or None; returns (..., d_out).

    `weight_fn` returns the frozen base weight `W0` (d_out × d_in); it is called again in backward, so it may
    dequantise or gather on demand.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    g2 = gate.reshape(-1, 1) if gate is not None else None
    out = GatedHiraFunction.apply(x2, g2, A, B, weight_fn, scaling)
    return out.reshape(*lead, out.shape[-1])
