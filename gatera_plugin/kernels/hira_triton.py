"""Triton kernels for the gated HiRA branch, `out = base + s · g ⊙ (x (W0 ⊙ BA)ᵀ)`, and their autograd function.

Design (the PyTorch reference is `gatera_plugin/ops/hira.py`; same inputs, same outputs, same saved tensors):

Tiling. Every kernel walks tiles of the d_out × d_in weight plane. Wherever a tile of `ΔW = W0 ⊙ BA` is needed it is
built in registers: `BA` for the tile is one `tl.dot` of B[n-tile, :r] (BN × r) and A[:r, k-tile] (r × BK), then
multiplied by the W0 tile loaded from memory. `ΔW` is never written to global memory, forward or backward; nor is
any other d_out × d_in tensor (the gradient `dM` lives in registers too).

- forward, grid (N/BM, d_out/BN): loop over d_in in BK steps, `acc += x_tile @ ΔW_tileᵀ`; epilogue
  `out = base + s · g ⊙ acc` (gate multiply and residual add fused; the gate σ(x·w + b) itself is one GEMV computed
  beforehand by the gate module, so that its entropy tap and statistics stay in one place for every backend).
- backward dx, grid (N/BM, d_in/BK): loop over d_out, `P += δ_tile @ ΔW_tile`; epilogue `dx = s · g ⊙ P` and the
  gate's gradient `dg = s · Σ_k P ⊙ x`, whose per-tile partial sums are atomically added across d_in tiles.
- backward dA/dB, grid (d_out/BN, d_in/BK): loop over tokens, `acc += (s · g ⊙ δ)_tileᵀ @ x_tile` (= dΔW tile),
  `dM = acc ⊙ W0_tile`; then `dB[n] += dM @ A[:, k]ᵀ` and `dA[:, k] += B[n]ᵀ @ dM`, atomically accumulated in fp32
  across the tiles that share a row of dB or a column of dA.

What is recomputed: `BA`/`ΔW` tiles, once per (token tile, weight tile) pair in each of the three kernels; nothing
of size d_out × d_in is kept between forward and backward (autograd saves x, g, A, B, as in the PyTorch path).

Cost per token (d_in = K, d_out = M_out, rank r, token tile BM): FLOPs ≈ 2·K·M_out for the product with ΔW, plus
(2r + 1)·K·M_out / BM to rebuild ΔW tiles (≈ 50% more at r = 32, BM = 128) — versus LoRA's 2·r·(K + M_out). Bytes
per token: x once per d_out tile, W0 once per token tile (K·M_out·bytes / BM), the output once; LoRA reads no W0.
So the fused kernel trades FLOPs for memory: it reads W0 (which the base layer reads anyway) instead of writing
and re-reading a d_out × d_in `ΔW` per layer as PEFT's HiRA does, and it holds no such tensor between passes.

4-bit bases: when the base layer is a bitsandbytes `Linear4bit` (NF4 or FP4), the kernels read W0 tiles straight
from its packed bytes (two 4-bit codes per byte, row-major over (d_out, d_in), high nibble first; value =
code[nibble] · absmax[element // blocksize], computed in fp32 and rounded to the quantised dtype exactly as
`bitsandbytes.functional.dequantize_4bit` does), so no dequantised W0 is materialised either. A nested (double
quantised) absmax is first expanded to fp32 with bitsandbytes' own `dequantize_blockwise` (d_out·d_in / blocksize
values); the tests check the in-kernel values bit for bit against `dequantize_4bit`.

Numerics: tiles are loaded in their storage dtype and upcast to fp32 for the products that build ΔW; the big
`tl.dot`s take operands in the input dtype (fp32 exactly, "ieee"; fp16/bf16 on tensor cores) and accumulate in
fp32. Triton's CPU interpreter (TRITON_INTERPRET=1, used by the tests) mishandles bf16 `tl.dot`, so the tests run
fp32 and fp16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..ops._tokens import apply_to_tokens


def _pad_rank(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


def _block(size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(size)))


@dataclass
class Packed4bit:
    """A bitsandbytes 4-bit weight as the kernels read it: `data` (uint8, two codes per byte, row-major over
    `shape` = (d_out, d_in)), `absmax` (fp32, one per `blocksize` elements), `code` (fp32, the 16 values)."""

    data: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype

    @classmethod
    def from_params(cls, weight) -> Packed4bit:
        """From a `bitsandbytes.nn.Params4bit` (standard layout, not the CPU-inference repacking)."""
        from bitsandbytes.functional import dequantize_blockwise

        state = weight.quant_state
        absmax = state.absmax
        if state.nested:
            absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
        return cls(weight.data.reshape(-1).view(torch.uint8), absmax.float().contiguous(),
                   state.code.float().to(weight.device).contiguous(), state.blocksize, tuple(state.shape), state.dtype)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _round_to_bf16(value):
    """fp32 → nearest bf16 (ties to even), kept in fp32: written with integer ops so that Triton's interpreter,
    whose bf16 conversion does not round this way, gives the same bits as the GPU and as torch."""
    bits = value.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _weight_tile(w_ptr, absmax_ptr, code_ptr, rn, rk, d_out, d_in, stride_wn, stride_wk, blocksize,
                 PACKED: tl.constexpr, W_DTYPE: tl.constexpr):
    """W0[rn, rk] in fp32: (BN, BK), from a dense tensor or from bitsandbytes' packed 4-bit bytes."""
    mask = (rn[:, None] < d_out) & (rk[None, :] < d_in)
    if PACKED:
        element = rn[:, None] * d_in + rk[None, :]  # row-major index into (d_out, d_in), int64
        byte = tl.load(w_ptr + element // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(element % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(code_ptr + nibble, mask=mask, other=0.0) * tl.load(absmax_ptr + element // blocksize,
                                                                           mask=mask, other=0.0)
        # rounded to the quantised dtype, as dequantize_4bit returns it
        if W_DTYPE == tl.bfloat16:
            return _round_to_bf16(value)
        return value.to(W_DTYPE).to(tl.float32)
    return tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _dequantize_kernel(w_ptr, absmax_ptr, code_ptr, out_ptr, d_out, d_in, blocksize, W_DTYPE: tl.constexpr,
                       BN: tl.constexpr, BK: tl.constexpr):
    """Write W0 (d_out, d_in) as `_weight_tile` sees it: for the tests' bit-exactness check against bitsandbytes."""
    rn = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    rk = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    w = _weight_tile(w_ptr, absmax_ptr, code_ptr, rn, rk, d_out, d_in, 0, 0, blocksize, True, W_DTYPE)
    tl.store(out_ptr + rn[:, None] * d_in + rk[None, :], w, mask=(rn[:, None] < d_out) & (rk[None, :] < d_in))


def dequantize_packed(weight: Packed4bit) -> torch.Tensor:
    """The fp32 W0 the kernels compute from a packed 4-bit weight (test helper; the kernels never store it)."""
    d_out, d_in = weight.shape
    out = torch.empty((d_out, d_in), device=weight.data.device, dtype=torch.float32)
    grid = (triton.cdiv(d_out, 32), triton.cdiv(d_in, 32))
    _dequantize_kernel[grid](weight.data, weight.absmax, weight.code, out, d_out, d_in, weight.blocksize,
                             W_DTYPE=_TL_DTYPES[weight.dtype], BN=32, BK=32)
    return out


@triton.jit
def _delta_tile(w_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, rn, rk, d_out, d_in, r, stride_wn, stride_wk, stride_an,
                stride_bn, blocksize, PACKED: tl.constexpr, W_DTYPE: tl.constexpr, R_PAD: tl.constexpr):
    """ΔW[rn, rk] = W0[rn, rk] ⊙ (B[rn, :r] @ A[:r, rk]) in fp32: (BN, BK)."""
    rr = tl.arange(0, R_PAD)
    b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=(rn[:, None] < d_out) & (rr[None, :] < r),
                other=0.0).to(tl.float32)
    a = tl.load(a_ptr + rr[:, None] * stride_an + rk[None, :], mask=(rr[:, None] < r) & (rk[None, :] < d_in),
                other=0.0).to(tl.float32)
    w = _weight_tile(w_ptr, absmax_ptr, code_ptr, rn, rk, d_out, d_in, stride_wn, stride_wk, blocksize, PACKED,
                     W_DTYPE)
    return w * tl.dot(b, a, input_precision="ieee")


@triton.jit
def _store_gated(acc, scaling, g_ptr, base_ptr, out_ptr, rm, rn, n_tokens, d_out, stride_om, HAS_GATE: tl.constexpr,
                 HAS_BASE: tl.constexpr):
    """Epilogue shared by the forward kernels: `out[rm, rn] = base + s · g ⊙ acc` (acc: (BM, BN) fp32)."""
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
    """Prologue shared by the weight-gradient kernels: the (BM, BN) fp32 tile `g ⊙ dy[rm, rn]`."""
    dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :],
                 mask=(rm[:, None] < n_tokens) & (rn[None, :] < d_out), other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(g_ptr + rm, mask=rm < n_tokens, other=0.0).to(tl.float32)
        dy = dy * g[:, None]
    return dy


@triton.jit
def _hira_fwd_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, g_ptr, base_ptr, out_ptr, n_tokens, d_in, d_out,
                     r, scaling, stride_xm, stride_wn, stride_wk, stride_an, stride_bn, stride_om, blocksize,
                     PACKED: tl.constexpr, W_DTYPE: tl.constexpr,
                     HAS_GATE: tl.constexpr, HAS_BASE: tl.constexpr, R_PAD: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, d_in, BK):
        rk = k0 + tl.arange(0, BK)
        delta = _delta_tile(w_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, rn, rk, d_out, d_in, r, stride_wn, stride_wk,
                            stride_an, stride_bn, blocksize, PACKED, W_DTYPE, R_PAD)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < n_tokens) & (rk[None, :] < d_in),
                    other=0.0)
        acc += tl.dot(x, tl.trans(delta).to(x.dtype), input_precision="ieee")
    _store_gated(acc, scaling, g_ptr, base_ptr, out_ptr, rm, rn, n_tokens, d_out, stride_om, HAS_GATE, HAS_BASE)


@triton.jit
def _hira_bwd_dx_kernel(dy_ptr, x_ptr, w_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, g_ptr, dx_ptr, dg_ptr, n_tokens,
                        d_in, d_out, r, scaling, stride_dym, stride_xm, stride_wn, stride_wk, stride_an, stride_bn,
                        blocksize, PACKED: tl.constexpr, W_DTYPE: tl.constexpr, HAS_GATE: tl.constexpr,
                        NEED_DX: tl.constexpr, NEED_DG: tl.constexpr, R_PAD: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)  # P = δ ΔW for this (token, input) tile
    for n0 in range(0, d_out, BN):
        rn = n0 + tl.arange(0, BN)
        delta = _delta_tile(w_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, rn, rk, d_out, d_in, r, stride_wn, stride_wk,
                            stride_an, stride_bn, blocksize, PACKED, W_DTYPE, R_PAD)
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :],
                     mask=(rm[:, None] < n_tokens) & (rn[None, :] < d_out), other=0.0)
        acc += tl.dot(dy, delta.to(dy.dtype), input_precision="ieee")
    acc = acc * scaling
    tile_mask = (rm[:, None] < n_tokens) & (rk[None, :] < d_in)
    if NEED_DG:
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        tl.atomic_add(dg_ptr + rm, tl.sum(acc * x, axis=1), mask=rm < n_tokens)
    if NEED_DX:
        if HAS_GATE:
            g = tl.load(g_ptr + rm, mask=rm < n_tokens, other=0.0).to(tl.float32)
            acc = acc * g[:, None]
        tl.store(dx_ptr + rm[:, None] * stride_xm + rk[None, :], acc.to(dx_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _hira_bwd_dw_kernel(dy_ptr, x_ptr, w_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, g_ptr, da_ptr, db_ptr, n_tokens,
                        d_in, d_out, r, scaling, stride_dym, stride_xm, stride_wn, stride_wk, stride_an, stride_bn,
                        blocksize, PACKED: tl.constexpr, W_DTYPE: tl.constexpr, HAS_GATE: tl.constexpr, R_PAD: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BN, BK), dtype=tl.float32)  # dΔW = Gᵀ x for this weight tile
    for m0 in range(0, n_tokens, BM):
        rm = m0 + tl.arange(0, BM)
        dy = _load_gated_grad(dy_ptr, g_ptr, rm, rn, n_tokens, d_out, stride_dym, HAS_GATE)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < n_tokens) & (rk[None, :] < d_in),
                    other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(dy), x, input_precision="ieee")
    w = _weight_tile(w_ptr, absmax_ptr, code_ptr, rn, rk, d_out, d_in, stride_wn, stride_wk, blocksize, PACKED,
                     W_DTYPE)
    dm = acc * w * scaling  # (BN, BK)
    rr = tl.arange(0, R_PAD)
    a = tl.load(a_ptr + rr[:, None] * stride_an + rk[None, :], mask=(rr[:, None] < r) & (rk[None, :] < d_in),
                other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=(rn[:, None] < d_out) & (rr[None, :] < r),
                other=0.0).to(tl.float32)
    db = tl.dot(dm, tl.trans(a), input_precision="ieee")  # (BN, R_PAD)
    tl.atomic_add(db_ptr + rn[:, None] * R_PAD + rr[None, :], db, mask=(rn[:, None] < d_out) & (rr[None, :] < r))
    da = tl.dot(tl.trans(b), dm, input_precision="ieee")  # (R_PAD, BK)
    tl.atomic_add(da_ptr + rr[:, None] * d_in + rk[None, :], da, mask=(rr[:, None] < r) & (rk[None, :] < d_in))


BM, BN, BK = 64, 64, 32


def _launch_setup(x, W0, r):
    n_tokens, d_in = x.shape
    d_out = W0.shape[0]
    return n_tokens, d_in, d_out, _block(n_tokens, BM), _block(d_out, BN), _block(d_in, BK), _pad_rank(r)


def _weight_args(W0) -> tuple[tuple, dict]:
    """Kernel arguments describing W0: (pointer, absmax, code, stride_n, stride_k, blocksize) and constexprs."""
    if isinstance(W0, Packed4bit):
        return (W0.data, W0.absmax, W0.code, 0, 0, W0.blocksize), {"PACKED": True, "W_DTYPE": _TL_DTYPES[W0.dtype]}
    return (W0, W0, W0, W0.stride(0), W0.stride(1), 0), {"PACKED": False, "W_DTYPE": tl.float32}


class TritonGatedHiraFunction(torch.autograd.Function):
    """Triton version of `ops.hira.GatedHiraFunction`: `base + s · g ⊙ (x (W0 ⊙ BA)ᵀ)`, same signature."""

    @staticmethod
    def forward(ctx, base, x, gate, A, B, weight_fn, scaling):
        W0 = weight_fn()
        x_c, A_c, B_c = x.contiguous(), A.contiguous(), B.contiguous()
        n_tokens, d_in, d_out, bm, bn, bk, r_pad = _launch_setup(x_c, W0, A.shape[0])
        out_dtype = base.dtype if base is not None else x.dtype
        out = torch.empty((n_tokens, d_out), device=x.device, dtype=out_dtype)
        base_c = base.contiguous() if base is not None else out
        gate_c = gate.reshape(-1).contiguous() if gate is not None else x_c
        (w_ptr, absmax, code, stride_wn, stride_wk, blocksize), w_const = _weight_args(W0)
        grid = (triton.cdiv(n_tokens, bm), triton.cdiv(d_out, bn))
        _hira_fwd_kernel[grid](
            x_c, w_ptr, absmax, code, A_c, B_c, gate_c, base_c, out, n_tokens, d_in, d_out, A.shape[0],
            float(scaling), x_c.stride(0), stride_wn, stride_wk, A_c.stride(0), B_c.stride(0), out.stride(0),
            blocksize, **w_const, HAS_GATE=gate is not None, HAS_BASE=base is not None, R_PAD=r_pad,
            BM=bm, BN=bn, BK=bk,
        )
        ctx.save_for_backward(x, gate, A, B)
        ctx.weight_fn, ctx.scaling, ctx.has_base = weight_fn, scaling, base is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, gate, A, B = ctx.saved_tensors
        need_x, need_gate, need_A, need_B = ctx.needs_input_grad[1:5]
        grad_base = grad_out if ctx.has_base and ctx.needs_input_grad[0] else None
        W0 = ctx.weight_fn()
        dy = grad_out.contiguous().to(x.dtype)
        x_c, A_c, B_c = x.contiguous(), A.contiguous(), B.contiguous()
        n_tokens, d_in, d_out, bm, bn, bk, r_pad = _launch_setup(x_c, W0, A.shape[0])
        r = A.shape[0]
        gate_c = gate.reshape(-1).contiguous() if gate is not None else x_c
        (w_ptr, absmax, code, stride_wn, stride_wk, blocksize), w_const = _weight_args(W0)
        strides = (stride_wn, stride_wk, A_c.stride(0), B_c.stride(0), blocksize)
        grad_x = grad_gate = grad_A = grad_B = None
        if need_x or need_gate:
            dx = torch.empty_like(x_c) if need_x else x_c
            dg = torch.zeros(n_tokens, device=x.device, dtype=torch.float32)
            grid = (triton.cdiv(n_tokens, bm), triton.cdiv(d_in, bk))
            _hira_bwd_dx_kernel[grid](
                dy, x_c, w_ptr, absmax, code, A_c, B_c, gate_c, dx, dg, n_tokens, d_in, d_out, r, float(ctx.scaling),
                dy.stride(0), x_c.stride(0), *strides, **w_const,
                HAS_GATE=gate is not None, NEED_DX=need_x, NEED_DG=need_gate, R_PAD=r_pad, BM=bm, BN=bn, BK=bk,
            )
            grad_x = dx if need_x else None
            grad_gate = dg.reshape(gate.shape).to(gate.dtype) if need_gate else None
        if need_A or need_B:
            da = torch.zeros((r_pad, d_in), device=x.device, dtype=torch.float32)
            db = torch.zeros((d_out, r_pad), device=x.device, dtype=torch.float32)
            grid = (triton.cdiv(d_out, bn), triton.cdiv(d_in, bk))
            _hira_bwd_dw_kernel[grid](
                dy, x_c, w_ptr, absmax, code, A_c, B_c, gate_c, da, db, n_tokens, d_in, d_out, r, float(ctx.scaling),
                dy.stride(0), x_c.stride(0), *strides, **w_const,
                HAS_GATE=gate is not None, R_PAD=r_pad, BM=bm, BN=bn, BK=bk,
            )
            grad_A = da[:r].to(A.dtype) if need_A else None
            grad_B = db[:, :r].to(B.dtype) if need_B else None
        return grad_base, grad_x, grad_gate, grad_A, grad_B, None, None


def triton_gated_hira(
    x: torch.Tensor,
    gate: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    weight_fn: Callable[[], torch.Tensor],
    scaling: float = 1.0,
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same contract as `ops.hira.gated_hira`, computed by the Triton kernels above; `weight_fn` may also return a
    `Packed4bit` (the kernels then read the 4-bit bytes directly)."""
    return apply_to_tokens(TritonGatedHiraFunction, x, gate, base, A, B, weight_fn, scaling)
