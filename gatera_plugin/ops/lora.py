"""Gated LoRA branch: `base + s · g ⊙ (x Aᵀ Bᵀ)`, keeping `x`, `g`, `A`, `B` and the rank-r activation `h = x Aᵀ`.

Plain autograd would also keep the branch output (N × d_out) to form the gate's gradient. It is not needed:
`dg_t = s δ_tᵀ B h_t = s (δ_t B) · h_t` is a dot product in the rank-r space, so this function stores only what
PEFT's LoRA stores plus the gate (N × 1).

Backward, with `δ = ∂L/∂out` (N × d_out) and `u = δ B` (N × r):

    dg = s · Σ_k u ⊙ h,   dh = s·g ⊙ u,   dx = dh A,   dA = dhᵀ x,   dB = δᵀ (s·g ⊙ h)

(the token scale of dB goes on h, N × r, rather than on δ, N × d_out).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._autocast import autocast_factors, autocast_state, restore_autocast
from ._tokens import apply_to_tokens, records_graph
from .rows import add_gated, gate_grad


def lora_output(base, x, gate, A, B, scaling, autocast: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(`base + s · g ⊙ (x Aᵀ Bᵀ)` (N, d_out), `h = x Aᵀ` (N, r)); `autocast`: `autocast_state`'s settings now."""
    h = x @ A.t()
    if gate is None and base is not None and base.dtype == h.dtype and not autocast["enabled"]:
        return torch.addmm(base, h, B.t(), alpha=scaling), h
    return add_gated(base, h @ B.t(), gate, scaling, reuse_update=True), h


def rank_r_grads(go, x, gate, A, B, h, s, need_x, need_gate, need_A, A_dtype):
    """The backward's rank-r part: `(dx, dg, dA)`, None where not needed. `go` (N, d_out) is the
    output gradient in x's dtype; A (r, d_in) and B (d_out, r) come in the dtype their products with it take; dA is
    cast to `A_dtype`. dB, the only d_out-wide reduction, is the caller's (`δᵀ (s·g ⊙ h)`)."""
    grad_x = grad_gate = grad_A = None
    u = go @ B  # (N, r)
    if need_gate:
        grad_gate = gate_grad((u * h).sum(dim=-1, keepdim=True), s, gate)
    # (N, r) in u's dtype; s·g times the loss-scaled u in the gate's fp32 first: s·g alone, rounded to fp16, is
    # subnormal for gates nearly closed (below 6e-5) and lost A's gradient
    dh = (u * (gate * s)).to(u.dtype) if gate is not None else u * s
    if need_x:
        grad_x = (dh @ A.to(dh.dtype)).to(x.dtype)
    if need_A:
        grad_A = (dh.t() @ x.to(dh.dtype)).to(A_dtype)
    return grad_x, grad_gate, grad_A


class GatedLoraFunction(torch.autograd.Function):
    """Autograd function for `base + s · g ⊙ (x Aᵀ Bᵀ)`; `g` and `base` may be `None`."""

    @staticmethod
    def forward(ctx, base, x, gate, A, B, scaling):
        """base: (N, d_out) or None, x: (N, d_in), gate: (N, 1) or None, A: (r, d_in), B: (d_out, r). Under autocast
        A and B are cast to its dtype once, and the casts saved for backward (`autocast_factors`)."""
        ctx.autocast = autocast_state(x.device.type)
        ctx.factor_dtypes = (A.dtype, B.dtype)
        A, B = autocast_factors(ctx.autocast, A, B)
        out, h = lora_output(base, x, gate, A, B, scaling, ctx.autocast)
        ctx.save_for_backward(x, gate, A, B, h)
        ctx.scaling = scaling
        ctx.has_base = base is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, gate, A, B, h = ctx.saved_tensors
        need_x, need_gate, need_A, need_B = ctx.needs_input_grad[1:5]
        s = ctx.scaling
        grad_B = None
        grad_base = grad_out if ctx.has_base and ctx.needs_input_grad[0] else None
        A_dtype, B_dtype = ctx.factor_dtypes
        with torch.no_grad(), restore_autocast(ctx.autocast):
            go = grad_out.to(x.dtype)
            if not ctx.autocast["enabled"]:  # (under autocast A and B are the forward's casts, which its products take)
                A, B = A.to(go.dtype), B.to(go.dtype)
            grad_x, grad_gate, grad_A = rank_r_grads(go, x, gate, A, B, h, s, need_x, need_gate, need_A, A_dtype)
            if need_B:
                token_scale = gate * s if gate is not None else s
                grad_B = (go.t() @ (h * token_scale).to(go.dtype)).to(B_dtype)
        return grad_base, grad_x, grad_gate, grad_A, grad_B, None


def gated_lora(
    x: torch.Tensor,
    gate: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float = 1.0,
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`base + s · g ⊙ (x Aᵀ Bᵀ)` for x (..., d_in), gate (..., 1) or None, base (..., d_out) or None."""
    function = GatedLoraFunction if records_graph(x, gate, A, B, base) else _GatedLoraOutput
    return apply_to_tokens(function, x, gate, base, A, B, scaling)


class _GatedLoraOutput:
    """`GatedLoraFunction`'s forward without autograd's bookkeeping: what `gated_lora` runs where autograd records
    nothing (`no_grad`, `generate()`, adapters that do not train), the same operations on the same tensors."""

    @staticmethod
    def apply(base, x, gate, A, B, scaling):
        return lora_output(base, x, gate, A, B, scaling, autocast_state(x.device.type))[0]
