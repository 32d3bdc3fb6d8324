"""The token gate's operations on rows of activations, shared by every branch kind: `TorchRows` (PyTorch's ops; the
Triton kernels' `kernels.rows.TritonRows` runs the same), and `add_gated`, the gated add of a branch's update to the
base output."""

from __future__ import annotations

from typing import Optional

import torch


class TorchRows:
    """The token gate's operations on rows of activations, with PyTorch ops (every device). a, base, update, p, x:
    (N, d); scale: (N, 1), one number per token, or a Python float (ungated, s ≠ 1). `kernels.rows.TritonRows` runs the same operations as Triton kernels
    on CUDA (`kernels.rows_for` picks one per call)."""

    def scale(self, a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """`a ⊙ scale` (N, d)."""
        return a * scale

    def add_scaled(self, base: torch.Tensor, update: torch.Tensor, scale: torch.Tensor,
                   out: Optional[torch.Tensor] = None, value: float = 1.0) -> torch.Tensor:
        """`base + value · update ⊙ scale` (N, d), into `out` when given (which may be `update`)."""
        return torch.addcmul(base, update, scale, value=value, out=out)

    def scale_and_dot_(self, p: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """`Σ_i p ⊙ x` per row (N,), then p ← p ⊙ scale in place."""
        dot = torch.linalg.vecdot(p, x.to(p.dtype))  # (forms p ⊙ x, one (N, d) temporary; TritonRows fuses it)
        p.mul_(scale)
        return dot


TORCH_ROWS = TorchRows()


def gate_grad(dot: torch.Tensor, scaling: float, gate: torch.Tensor) -> torch.Tensor:
    """The gate's gradient `s · dot` (N, 1) in the gate's dtype, from the per-token dot product `dot` (N, 1), a fresh
    tensor, of the branch's dtype. s multiplies after the cast to the gate's fp32: a half-precision `s · dot`, with
    s ~ 1 / (RMS(W0) · g0) for gates started nearly closed (hira_scaling="lora"), overflowed fp16 under a loss scale
    before σ′ shrank it."""
    return dot.to(torch.promote_types(dot.dtype, gate.dtype)).mul_(scaling).to(gate.dtype)


def add_gated(base: Optional[torch.Tensor], update: torch.Tensor, gate: Optional[torch.Tensor], scaling: float,
              reuse_update: bool = False, row_ops: TorchRows = TORCH_ROWS):
    """`base + s · g ⊙ update` in one pass where dtypes allow (base: (N, d_out) or None, gate: (N, 1) or None).

    `reuse_update=True` (a fresh, contiguous `update` nothing else reads) writes the result into `update`'s memory
    when it has the result's dtype: no new (N, d_out) tensor, which on CPU also saves its page faults. A base of
    another dtype than `update` (a bf16 output, an fp32 update) takes the sum in their promoted dtype, rounded once. `row_ops`:
    what runs the gated add (`TorchRows`, or the Triton kernels' `TritonRows`).
    """
    if reuse_update and base is not None and base.dtype == update.dtype and update.is_contiguous():
        if gate is not None:  # (s rides on the add: no op to form s·g)
            return row_ops.add_scaled(base, update, gate.to(update.dtype), out=update, value=scaling)
        return torch.add(base, update, alpha=scaling, out=update)
    if base is None:
        if gate is not None:
            return update * (gate * scaling)
        return update * scaling if scaling != 1.0 else update
    if base.dtype != update.dtype:  # e.g. a bf16 base output, an fp32 update: summed in fp32, rounded once (PEFT's)
        if reuse_update and update.is_contiguous() and torch.promote_types(base.dtype, update.dtype) == update.dtype:
            if gate is not None:
                update.mul_(gate * scaling)
            elif scaling != 1.0:
                update.mul_(scaling)
            return update.add_(base).to(base.dtype)
        return (add_gated(None, update, gate, scaling) + base).to(base.dtype)
    if gate is not None:
        return row_ops.add_scaled(base, update, gate.to(update.dtype), value=scaling)
    return torch.add(base, update, alpha=scaling)
