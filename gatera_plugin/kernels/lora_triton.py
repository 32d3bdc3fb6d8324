"""Triton kernels for the gated LoRA branch, `out = base + s · g ⊙ (x Aᵀ Bᵀ)`, and their autograd function.

Design (the PyTorch reference is `gatera_plugin/ops/lora.py`; same inputs, outputs and saved tensors):

The rank-r products `h = x Aᵀ` (N × r), `u = δ B` (N × r), `dx = dh A`, `dA = dhᵀ x` are skinny GEMMs that cuBLAS
does well, so they stay in PyTorch. The kernels take the two d_out-wide steps, where the gate and the scale would
otherwise cost extra passes over an N × d_out tensor:

- forward, grid (N/BM, d_out/BN): `out = base + s · g ⊙ (h_tile @ B_tileᵀ)` in one pass (product, gate, residual);
- backward dB, grid (d_out/BN, r/RB): loop over tokens, `dB_tile += (s · g ⊙ δ)_tileᵀ @ h_tile`, with `s · g ⊙ δ` formed
  in registers (the PyTorch path scales the rank-r `h` instead); each program owns its dB tile, so no atomics
  (deterministic).

FLOPs per token (K = d_in, M = d_out) are LoRA's on both paths: forward `h = x Aᵀ` 2rK and `h Bᵀ` 2rM; backward
`dB` 2rM, `u = (s·g⊙δ) B` 2rM, `dA` 2rK, `dx` 2rK: 6r(K + M) in all, plus the gate's 9K + 2M (see hira_triton.py).
Bytes per token beyond the rank-r tensors: forward, the PyTorch path writes `h Bᵀ` (M) and `addcmul` reads it with
base and writes out in place (3M), 4M elements; the kernel reads base and writes out, 2M. Backward, both read δ for
`u` and for `dB` (2M; the PyTorch path puts the token scale on the rank-r `h`, so neither forms an N × M `s·g⊙δ`).
The kernels change passes over N × M tensors, not FLOPs: they can only win where those passes dominate (small r,
large N).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..ops._tokens import apply_to_tokens
from ..ops.lora import rank_r_grads
from . import compute_dtype, device_guard, torch_path_grads
from .blocks import check_blocks, shrink


@triton.jit
def _store_gated(acc, scaling, g_ptr, base_ptr, out_ptr, rm, rn, n_tokens, d_out, stride_om, HAS_GATE: tl.constexpr,
                 HAS_BASE: tl.constexpr):
    """Forward epilogue: `out[rm, rn] = base + s · g ⊙ acc` (acc: (BM, BN) fp32)."""
    acc = acc * scaling
    if HAS_GATE:
        g = tl.load(g_ptr + rm, mask=rm < n_tokens, other=0.0).to(tl.float32)
        acc = acc * g[:, None]
    out_mask = (rm[:, None] < n_tokens) & (rn[None, :] < d_out)
    if HAS_BASE:
        acc += tl.load(base_ptr + rm[:, None] * stride_om + rn[None, :], mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _load_gated_grad(dy_ptr, g_ptr, rm, rn, n_tokens, d_out, stride_dym, HAS_GATE: tl.constexpr):
    """Prologue of the dB kernel: the (BM, BN) tile `g ⊙ dy[rm, rn]`, in dy's dtype."""
    dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :],
                 mask=(rm[:, None] < n_tokens) & (rn[None, :] < d_out), other=0.0)
    if HAS_GATE:
        g = tl.load(g_ptr + rm, mask=rm < n_tokens, other=0.0).to(tl.float32)
        dy = (dy.to(tl.float32) * g[:, None]).to(dy.dtype)
    return dy


@triton.jit(do_not_specialize=["r", "stride_hm", "stride_bn"])  # one kernel per RB, as in HiRA's
def _lora_fwd_kernel(h_ptr, b_ptr, g_ptr, base_ptr, out_ptr, n_tokens, d_out, r, scaling, stride_hm, stride_bn,
                     stride_om, HAS_GATE: tl.constexpr, HAS_BASE: tl.constexpr, RB: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # int64 offsets throughout
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, r, RB):
        rr = r0 + tl.arange(0, RB).to(tl.int64)
        h = tl.load(h_ptr + rm[:, None] * stride_hm + rr[None, :], mask=(rm[:, None] < n_tokens) & (rr[None, :] < r),
                    other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=(rn[:, None] < d_out) & (rr[None, :] < r),
                    other=0.0)
        acc += tl.dot(h, tl.trans(b).to(h.dtype), input_precision="ieee")  # (BM, BN)
    _store_gated(acc, scaling, g_ptr, base_ptr, out_ptr, rm, rn, n_tokens, d_out, stride_om, HAS_GATE, HAS_BASE)


@triton.jit(do_not_specialize=["r", "stride_hm"])
def _lora_bwd_db_kernel(dy_ptr, h_ptr, g_ptr, db_ptr, n_tokens, d_out, r, scaling, stride_dym, stride_hm,
                        HAS_GATE: tl.constexpr, RB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Grid (d_out/BN, r/RB): each program owns one (BN, RB) tile of dB, so no atomics (deterministic)."""
    rn = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    rr = tl.program_id(1).to(tl.int64) * RB + tl.arange(0, RB)
    acc = tl.zeros((BN, RB), dtype=tl.float32)
    for m0 in range(0, n_tokens, BM):
        rm = m0 + tl.arange(0, BM).to(tl.int64)
        dy = _load_gated_grad(dy_ptr, g_ptr, rm, rn, n_tokens, d_out, stride_dym, HAS_GATE)
        h = tl.load(h_ptr + rm[:, None] * stride_hm + rr[None, :], mask=(rm[:, None] < n_tokens) & (rr[None, :] < r),
                    other=0.0)
        acc += tl.dot(tl.trans(dy), h.to(dy.dtype), input_precision="ieee")
    tl.store(db_ptr + rn[:, None] * r + rr[None, :], acc * scaling, mask=(rn[:, None] < d_out) & (rr[None, :] < r))


def _blocks(kernel: str, x: torch.Tensor, r: int, n_tokens: int, d_out: int) -> dict:
    b = check_blocks(kernel, x.dtype, r, x.device)
    return {"BM": shrink(n_tokens, b.BM), "BN": shrink(d_out, b.BN), "RB": b.RB, "num_warps": b.num_warps,
            "num_stages": b.num_stages}


class TritonGatedLoraFunction(torch.autograd.Function):
    """Triton version of `ops.lora.GatedLoraFunction`: `base + s · g ⊙ (x Aᵀ Bᵀ)`, same signature plus `on_failure`
    (see `hira_triton.TritonGatedHiraFunction`)."""

    @staticmethod
    def forward(ctx, base, x, gate, A, B, scaling, on_failure=None):
        r = A.shape[0]
        h = (x @ A.t()).contiguous()  # (N, r)
        n_tokens, d_out = x.shape[0], B.shape[0]
        B_c = B.contiguous()
        out = torch.empty((n_tokens, d_out), device=x.device, dtype=base.dtype if base is not None else x.dtype)
        base_c = base.contiguous() if base is not None else out
        gate_c = gate.reshape(-1).contiguous() if gate is not None else h
        launch = _blocks("lora_fwd", x, r, n_tokens, d_out)
        with device_guard(x):
            _lora_fwd_kernel[(triton.cdiv(n_tokens, launch["BM"]), triton.cdiv(d_out, launch["BN"]))](
                h, B_c, gate_c, base_c, out, n_tokens, d_out, r, float(scaling), h.stride(0), B_c.stride(0),
                out.stride(0), HAS_GATE=gate is not None, HAS_BASE=base is not None, **launch,
            )
        ctx.save_for_backward(x, gate, A, B, h)
        ctx.scaling, ctx.has_base, ctx.on_failure = scaling, base is not None, on_failure
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, gate, A, B, h = ctx.saved_tensors
        need = ctx.needs_input_grad[1:5]
        grad_base = grad_out if ctx.has_base and ctx.needs_input_grad[0] else None
        try:
            grads = _lora_backward(grad_out, x, gate, A, B, h, ctx.scaling, need)
        except Exception as error:  # noqa: BLE001  (which errors are Triton's is decided by on_failure)
            if ctx.on_failure is None or not ctx.on_failure(error):
                raise
            from ..ops.lora import GatedLoraFunction

            grads = torch_path_grads(GatedLoraFunction, (x, gate, A, B), need, grad_out, ctx.scaling)
        return (grad_base, *grads, None, None)


def _lora_backward(grad_out, x, gate, A, B, h, s, need):
    """(dx, dg, dA, dB), None where not needed: rank-r products in PyTorch, dB in the kernel."""
    need_x, need_gate, need_A, need_B = need
    dy = grad_out.contiguous().to(x.dtype)
    grad_B = None
    grad_x, grad_gate, grad_A = rank_r_grads(dy, x, gate, A.to(dy.dtype), B.to(dy.dtype), h, s, need_x, need_gate,
                                                need_A, A.dtype)
    if need_B:
        r = A.shape[0]
        n_tokens, d_out = x.shape[0], B.shape[0]
        db = torch.empty((d_out, r), device=x.device, dtype=torch.float32)
        gate_c = gate.reshape(-1).contiguous() if gate is not None else h
        launch = _blocks("lora_bwd_db", x, r, n_tokens, d_out)
        with device_guard(x):
            _lora_bwd_db_kernel[(triton.cdiv(d_out, launch["BN"]), triton.cdiv(r, launch["RB"]))](
                dy, h, gate_c, db, n_tokens, d_out, r, float(s), dy.stride(0), h.stride(0),
                HAS_GATE=gate is not None, **launch,
            )
        grad_B = db.to(B.dtype)
    return grad_x, grad_gate, grad_A, grad_B


def triton_gated_lora(
    x: torch.Tensor, gate: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0,
    base: Optional[torch.Tensor] = None, on_failure: Optional[Callable[[BaseException], bool]] = None,
) -> torch.Tensor:
    """Same contract as `ops.lora.gated_lora`, with the d_out-wide steps in Triton; x, A and B are cast to
    `compute_dtype(x)` first (the autocast dtype under autocast, else x's); `on_failure`: see `hira_triton.TritonGatedHiraFunction`."""
    dtype = compute_dtype(x)
    x, A, B = x.to(dtype), A.to(dtype), B.to(dtype)
    return apply_to_tokens(TritonGatedLoraFunction, x, gate, base, A, B, scaling, on_failure)
