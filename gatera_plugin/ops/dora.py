"""Gated DoRA branch, as a gated channel scale plus a gated LoRA, keeping what PEFT's DoRA keeps plus the gate.

DoRA's change of output (PEFT's formula) is `Δy = (c − 1) ⊙ y0 + c ⊙ (s · x Aᵀ Bᵀ)`, with `c = m / ‖W0 + sBA‖`
per output channel (d_out,) and `y0 = x W0ᵀ` the base product (N, d_out). Its second term is LoRA with B's rows
scaled by c, `s · x Aᵀ (c ⊙ B)ᵀ`: `gated_lora` on `c ⊙ B` (d_out × r), whose gate gradient is formed in the rank-r
space. Its first term is `gated_channel_scale`,

    out = base + g ⊙ (k ⊙ y)        k (d_out,), y (N, d_out), g (N, 1)

Plain autograd would keep the gated product `k ⊙ y` (N × d_out, fp32 where k is) for the gate's gradient, beside y;
this function keeps only y (which PEFT's DoRA keeps too), k and g. Backward, with `δ = ∂L/∂out` (N × d_out):

    dbase = δ,   dy = g ⊙ k ⊙ δ,   dk = (δ ⊙ y)ᵀ g,   dg = (δ ⊙ y) k

computed in the dtype of `k ⊙ y` (k's, fp32, for a bf16 y: PEFT's DoRA multiplies its fp32 scale with the bf16 base
output alike).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._autocast import autocast_off
from ._tokens import apply_to_tokens, records_graph
from .rows import add_gated


def channel_scale_output(base, y, gate, k) -> torch.Tensor:
    """`base + g ⊙ (k ⊙ y)`; shapes as `GatedChannelScaleFunction.forward`."""
    return add_gated(base, y * k, gate, 1.0, reuse_update=True)


class GatedChannelScaleFunction(torch.autograd.Function):
    """Autograd function for `base + g ⊙ (k ⊙ y)`; `g` and `base` may be `None`."""

    @staticmethod
    def forward(ctx, base, y, gate, k):
        """base: (N, d_out) or None, y: (N, d_out), gate: (N, 1) or None, k: (d_out,)."""
        ctx.save_for_backward(y, gate, k)
        ctx.has_base = base is not None
        return channel_scale_output(base, y, gate, k)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        y, gate, k = ctx.saved_tensors
        need_base, need_y, need_gate, need_k = ctx.needs_input_grad
        grad_base = grad_out if ctx.has_base and need_base else None
        grad_y = grad_gate = grad_k = None
        dtype = torch.promote_types(y.dtype, k.dtype)
        with torch.no_grad(), autocast_off(y.device.type):
            go = grad_out.to(dtype)
            k_cast = k.to(dtype)
            if need_gate or need_k:
                go_y = go * y  # (N, d_out)
                if need_gate:
                    grad_gate = (go_y @ k_cast).unsqueeze(-1).to(gate.dtype)
                if need_k:
                    grad_k = (go_y.t() @ gate.to(dtype)).squeeze(-1) if gate is not None else go_y.sum(dim=0)
                    grad_k = grad_k.to(k.dtype)
                del go_y
            if need_y:
                grad_y = go * k_cast if gate is None else (go * gate.to(dtype)).mul_(k_cast)
                grad_y = grad_y.to(y.dtype)
        return grad_base, grad_y, grad_gate, grad_k


def gated_channel_scale(
    y: torch.Tensor, gate: Optional[torch.Tensor], k: torch.Tensor, base: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`base + g ⊙ (k ⊙ y)` for y (..., d_out), gate (..., 1) or None, k (d_out,), base (..., d_out) or None."""
    if not records_graph(y, gate, k, base):
        return channel_scale_output(base, y, gate, k)
    return apply_to_tokens(GatedChannelScaleFunction, y, gate, base, k)
