"""Triton kernels for the gated LoRA branch, `out = base + s · g ⊙ (x Aᵀ Bᵀ)`, and their autograd function.

Design (the PyTorch reference is `gatera_plugin/ops/lora.py`; same inputs, outputs and saved tensors):

The rank-r products `h = x Aᵀ` (N × r), `u = δ B` (N × r), `dx = dh A`, `dA = dhᵀ x` are skinny GEMMs that cuBLAS
does well, so they stay in PyTorch. The kernels take the two d_out-wide steps, where the gate and the scale would
otherwise cost extra passes over an N × d_out tensor:

- forward, grid (N/BM, d_out/BN): `out = base + s · g ⊙ (h_tile @ B_tileᵀ)` in one pass (product, gate, residual);
- backward dB, grid (d_out/BN,): loop over tokens, `dB_tile += (s · g ⊙ δ)_tileᵀ @ h_tile`, with `s · g ⊙ δ` formed
  in registers instead of as an N × d_out tensor.

FLOPs per token are LoRA's, 2·r·(d_in + d_out) forward; bytes: h once per d_out tile, B once per token tile.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..ops._tokens import apply_to_tokens
from .hira_triton import _block, _load_gated_grad, _pad_rank, _store_gated


@triton.jit
def _lora_fwd_kernel(h_ptr, b_ptr, g_ptr, base_ptr, out_ptr, n_tokens, d_out, r, scaling, stride_hm, stride_bn,
                     stride_om, HAS_GATE: tl.constexpr, HAS_BASE: tl.constexpr, R_PAD: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, R_PAD)
    h = tl.load(h_ptr + rm[:, None] * stride_hm + rr[None, :], mask=(rm[:, None] < n_tokens) & (rr[None, :] < r),
                other=0.0)
    b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=(rn[:, None] < d_out) & (rr[None, :] < r),
                other=0.0)
    acc = tl.dot(h, tl.trans(b).to(h.dtype), input_precision="ieee")  # (BM, BN)
    _store_gated(acc, scaling, g_ptr, base_ptr, out_ptr, rm, rn, n_tokens, d_out, stride_om, HAS_GATE, HAS_BASE)


@triton.jit
def _lora_bwd_db_kernel(dy_ptr, h_ptr, g_ptr, db_ptr, n_tokens, d_out, r, scaling, stride_dym, stride_hm,
                        HAS_GATE: tl.constexpr, R_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, R_PAD)
    acc = tl.zeros((BN, R_PAD), dtype=tl.float32)
    for m0 in range(0, n_tokens, BM):
        rm = m0 + tl.arange(0, BM)
        dy = _load_gated_grad(dy_ptr, g_ptr, rm, rn, n_tokens, d_out, stride_dym, HAS_GATE)
        h = tl.load(h_ptr + rm[:, None] * stride_hm + rr[None, :], mask=(rm[:, None] < n_tokens) & (rr[None, :] < r),
                    other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(dy), h, input_precision="ieee")
    tl.store(db_ptr + rn[:, None] * R_PAD + rr[None, :], acc * scaling, mask=(rn[:, None] < d_out) & (rr[None, :] < r))


BM, BN = 64, 64


class TritonGatedLoraFunction(torch.autograd.Function):
    """Triton version of `ops.lora.GatedLoraFunction`: `base + s · g ⊙ (x Aᵀ Bᵀ)`, same signature."""

    @staticmethod
    def forward(ctx, base, x, gate, A, B, scaling):
        r = A.shape[0]
        r_pad = _pad_rank(r)
        h = x @ A.t()  # (N, r)
        n_tokens, d_out = x.shape[0], B.shape[0]
        h_pad = torch.nn.functional.pad(h, (0, r_pad - r)) if r_pad != r else h.contiguous()
        B_c = B.contiguous()
        out = torch.empty((n_tokens, d_out), device=x.device, dtype=base.dtype if base is not None else x.dtype)
        base_c = base.contiguous() if base is not None else out
        gate_c = gate.reshape(-1).contiguous() if gate is not None else h_pad
        bm, bn = _block(n_tokens, BM), _block(d_out, BN)
        _lora_fwd_kernel[(triton.cdiv(n_tokens, bm), triton.cdiv(d_out, bn))](
            h_pad, B_c, gate_c, base_c, out, n_tokens, d_out, r, float(scaling), h_pad.stride(0), B_c.stride(0),
            out.stride(0), HAS_GATE=gate is not None, HAS_BASE=base is not None, R_PAD=r_pad, BM=bm, BN=bn,
        )
        ctx.save_for_backward(x, gate, A, B, h)
        ctx.scaling, ctx.has_base = scaling, base is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, gate, A, B, h = ctx.saved_tensors
        need_x, need_gate, need_A, need_B = ctx.needs_input_grad[1:5]
        s = ctx.scaling
        grad_base = grad_out if ctx.has_base and ctx.needs_input_grad[0] else None
        dy = grad_out.contiguous().to(x.dtype)
        grad_x = grad_gate = grad_A = grad_B = None
        u = dy @ B.to(dy.dtype)  # (N, r)
        if need_gate:
            grad_gate = (u * h).sum(dim=-1, keepdim=True).mul_(s).to(gate.dtype)
        dh = u * (gate * s if gate is not None else s)
        if need_x:
            grad_x = (dh @ A.to(dh.dtype)).to(x.dtype)
        if need_A:
            grad_A = (dh.t() @ x.to(dh.dtype)).to(A.dtype)
        if need_B:
            r = A.shape[0]
            r_pad = _pad_rank(r)
            n_tokens, d_out = x.shape[0], B.shape[0]
            h_pad = torch.nn.functional.pad(h, (0, r_pad - r)) if r_pad != r else h.contiguous()
            db = torch.empty((d_out, r_pad), device=x.device, dtype=torch.float32)
            gate_c = gate.reshape(-1).contiguous() if gate is not None else h_pad
            bm, bn = _block(n_tokens, BM), _block(d_out, BN)
            _lora_bwd_db_kernel[(triton.cdiv(d_out, bn),)](
                dy, h_pad, gate_c, db, n_tokens, d_out, r, float(s), dy.stride(0), h_pad.stride(0),
                HAS_GATE=gate is not None, R_PAD=r_pad, BM=bm, BN=bn,
            )
            grad_B = db[:, :r].to(B.dtype)
        return grad_base, grad_x, grad_gate, grad_A, grad_B, None


def triton_gated_lora(
    x: torch.Tensor, gate: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0,
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same contract as `ops.lora.gated_lora`, with the d_out-wide steps in Triton."""
    return apply_to_tokens(TritonGatedLoraFunction, x, gate, base, A, B, scaling)
