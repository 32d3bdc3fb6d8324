"""Triton kernels for the gated HiRA branch, `out = base + s · g ⊙ (x (W0 ⊙ BA)ᵀ)`, and their autograd function.

Design (the PyTorch reference is `gatera_plugin/ops/hira.py`; same inputs, same outputs, same saved tensors):

Tiling. Every kernel walks tiles of the d_out × d_in weight plane. Wherever a tile of `ΔW = W0 ⊙ BA` is needed it is
built in registers: `BA` for the tile is `tl.dot`s of B[n-tile, r-chunk] (BN × RB) and A[r-chunk, k-tile], then
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

Cost (K = d_in, M = d_out, rank r, T tokens per step, token tile BM, weight tiles BN × BK, b bytes per element of
the compute dtype, w bytes per stored W0 element: 2 for bf16, 0.5625 for NF4 with its fp32 absmax per 64):

    FLOPs per token              forward                     backward                               total
    PyTorch path (ops/hira.py)   2KM + (2r+1)KM/T            4KM + (6r+2)KM/T                       6KM + (8r+3)KM/T
    these kernels                2KM + (2r+1)KM/BM           4KM + (2r+1)KM/BM + (4r+1)KM/T         6KM + 2(2r+1)KM/BM + (4r+1)KM/T

The 6KM are the three T·K·M products (x ΔWᵀ, δ ΔW, δᵀ x), the same on both paths. The PyTorch path builds `ΔW = W0 ⊙
BA` ((2r+1)KM) once in forward and once in backward, and forms dA, dB from dΔW (4rKM), per step: amortised over T.
The kernels rebuild each ΔW tile once per token tile in the forward and dx kernels: (2r+1)/BM per K·M per token,
independent of T; the dA/dB kernel builds none (it reads W0 once per weight tile). Bytes beyond the products' own
operands: the PyTorch path writes and re-reads weight-sized temporaries, about 50·KM bytes per step under bf16
autocast (BA, ΔW, dΔW and its fp32 copy and bf16 casts for dA and dB; W0 read three times), plus 2(w + 2)·KM for
the two NF4 dequantisations to bf16 (0 for dense); the kernels write none, but re-read W0 (2w·KM/BM per token) and the A/B tiles
(2rb·KM·(1/BK + 1/BN)/BM per token) once per token tile, from L2 where it holds them (A and B: r·(K + M)·b bytes).
Gated vs ungated: the gate adds ≈ 9K + 2M FLOPs per token either way (its GEMV σ(x·w + b) and that GEMV's backward,
s·g ⊙ on the output, dx and the narrower of δ or x, and dg = s Σ P ⊙ x); on the PyTorch path these are memory-bound
passes of ≈ (3M + 4K)·b + 12K bytes per token (the ungated residual add rides on the GEMM instead), in the kernels
they live in the epilogues (one extra load of g per token, atomics for dg across d_in tiles).

At K = 4096, M = 14336 (LLaMA's MLP), r = 32, bf16 (BM = 64, BN = 64, BK = 32), per token:

    T       PyTorch path                     these kernels
    4096    356.0 MFLOP (6KM = 352.3 +1.0%)  473.4 MFLOP (1.33x): forward and dx 1.5x, dA/dB 1.0x
    16384   353.2 MFLOP (+0.26%)             472.1 MFLOP (1.34x)
    bytes   0.72 MB at 4k, 0.18 MB at 16k    W0 re-reads 3.67 MB dense / 1.03 MB NF4, A/B tiles 5.5 MB (L2)
            (dense; NF4 0.79 / 0.20 MB)      (x and the output: 36.9 KB per token on either path)

So at 4k+ tokens these kernels do a third more FLOPs than the PyTorch path (the rebuild adds half of the forward's
product at BM = 64 — not "≈ 50% at BM = 128", as this note once said: at BM = 128 it is 25%; the fp32 kernels'
BM = 32 doubles the forward), and trade the PyTorch path's per-step weight-sized traffic for per-token-tile re-reads.
They save memory (no d_out × d_in temporary, even transiently), not time; "auto" therefore keeps the PyTorch path
(`TRITON_WINS` in `kernels/__init__.py`). A fused path that does no more work would build `W0 ⊙ BA` in bounded
chunks once per step (fused with the NF4 dequantisation) and leave the three big products to cuBLAS.

4-bit bases: when the base layer is a bitsandbytes `Linear4bit` (NF4 or FP4), the kernels read W0 tiles straight
from its packed bytes (two 4-bit codes per byte, row-major over (d_out, d_in), high nibble first; value =
code[nibble] · absmax[element // blocksize], computed in fp32 and rounded to the quantised dtype exactly as
`bitsandbytes.functional.dequantize_4bit` does), so no dequantised W0 is materialised either. A nested (double
quantised) absmax is first expanded to fp32 with bitsandbytes' own `dequantize_blockwise` (d_out·d_in / blocksize
values); the tests check the in-kernel values bit for bit against `dequantize_4bit`.

Numerics: the branch computes in x's dtype, or in the autocast dtype under autocast (the host wrapper casts x, A
and B to it, as autocast casts the PyTorch path's matmuls). Every `tl.dot` (the rank chunks of BA, the big products,
dA/dB) takes operands in that dtype (fp32 exactly, "ieee"; fp16/bf16 on tensor cores) and accumulates in fp32; W0 ⊙
BA and the gate multiply happen in fp32. Triton's CPU interpreter (TRITON_INTERPRET=1, used by the tests)
mishandles bf16 `tl.dot`, so the tests run fp32 and fp16; tests/test_kernel_compile.py compiles every launched
specialization, bf16 included, for sm_80 and sm_90.

Launch: the rank is walked in chunks of RB = 16 (r <= 16) or 32, so no tile grows with r (r = 512 uses the shared
memory of r = 32); tile sizes come from `choose_blocks` (dtype, r, the device's opt-in shared memory); all offsets
are int64; launches run under `torch.cuda.device(x.device)`.
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
from . import KernelUnsupported, compute_dtype, device_guard, device_smem, torch_path_grads


# ----------------------------------------------------------------------------------------------- launch configuration
@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch options of one kernel: BM tokens × BN outputs × BK inputs, ranks in chunks of RB."""

    BM: int
    BN: int
    BK: int
    RB: int
    num_warps: int = 4
    num_stages: int = 2

    def smem_bound(self, kernel: str, itemsize: int) -> int:
        """Upper bound (bytes) on the shared memory Triton gives `kernel` with these tiles: every tile loaded in the
        loop, `num_stages` times over, plus an fp32 staging buffer per `tl.dot` operand and result (checked against
        the compiled kernels by tests/test_kernel_compile.py)."""
        BM, BN, BK, RB = self.BM, self.BN, self.BK, self.RB
        rank_tiles = (BN + BK) * RB  # B[n, r-chunk] and A[r-chunk, k]
        loads, dots = {
            "hira_fwd": (BM * BK + BN * BK + rank_tiles, BM * BK + BN * BK + BM * BN),
            "hira_bwd_dx": (BM * BN + BN * BK + rank_tiles, BM * BN + BN * BK + BM * BK),
            "hira_bwd_dw": (BM * BN + BM * BK + rank_tiles, BM * BN + BM * BK + BN * BK),
            "lora_fwd": ((BM + BN) * RB, (BM + BN) * RB + BM * BN),
            "lora_bwd_db": (BM * BN + BM * RB, BM * BN + BM * RB + BN * RB),
        }[kernel]
        return itemsize * self.num_stages * loads + 4 * dots


# The rank is walked in chunks of RB (16 for r <= 16, else 32), so no tile grows with r: r = 512 needs the shared
# memory of r = 32. Candidates, largest first; the first whose bound fits the device's shared memory is launched.
_CANDIDATES = {  # kernel -> [(blocks for 2-byte dtypes, blocks for fp32)]
    "hira_fwd": [((64, 64, 32, 3), (32, 32, 32, 2)), ((32, 32, 32, 2), (32, 32, 32, 1))],
    "hira_bwd_dx": [((64, 64, 32, 3), (32, 32, 32, 2)), ((32, 32, 32, 2), (32, 32, 32, 1))],
    "hira_bwd_dw": [((64, 64, 32, 3), (32, 32, 32, 2)), ((32, 32, 32, 2), (32, 32, 32, 1))],
    "lora_fwd": [((64, 64, 0, 3), (64, 64, 0, 2)), ((32, 32, 0, 2), (32, 32, 0, 1))],
    "lora_bwd_db": [((64, 64, 0, 3), (32, 32, 0, 2)), ((32, 32, 0, 2), (32, 32, 0, 1))],
}
KERNEL_NAMES = tuple(_CANDIDATES)


def rank_block(r: int) -> int:
    return 16 if r <= 16 else 32


def choose_blocks(kernel: str, dtype: torch.dtype, r: int, smem: int) -> Optional[Blocks]:
    """The tiles `kernel` launches with for compute `dtype`, rank `r` and `smem` bytes of shared memory per block
    (opt-in maximum); None when no candidate fits (the host wrappers then refuse to launch, see `check_blocks`)."""
    for half, single in _CANDIDATES[kernel]:
        BM, BN, BK, stages = half if dtype in (torch.float16, torch.bfloat16) else single
        blocks = Blocks(BM, BN, max(BK, 16), rank_block(r), num_stages=stages)
        if blocks.smem_bound(kernel, dtype.itemsize) <= smem:
            return blocks
    return None


def check_blocks(kernel: str, dtype: torch.dtype, r: int, device: torch.device) -> Blocks:
    """`choose_blocks` for `device`; `KernelUnsupported` when nothing fits ("auto" then falls back)."""
    smem = device_smem(device)
    blocks = choose_blocks(kernel, dtype, r, smem)
    if blocks is None:
        raise KernelUnsupported(
            f"the {kernel} kernel needs more shared memory than {device} offers ({smem} bytes per block) even at its "
            "smallest tiles"
        )
    return blocks


def _shrink(size: int, block: int) -> int:
    """A block no larger than needed for `size` (small inputs), at least 16 (tl.dot's minimum)."""
    return max(16, min(block, triton.next_power_of_2(size)))


# ----------------------------------------------------------------------------------------------- 4-bit weights
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
    """W0[rn, rk] in fp32: (BN, BK), from a dense tensor or from bitsandbytes' packed 4-bit bytes (rn, rk: int64)."""
    mask = (rn[:, None] < d_out) & (rk[None, :] < d_in)
    if PACKED:
        element = rn[:, None] * d_in + rk[None, :]  # row-major index into (d_out, d_in), int64
        byte = tl.load(w_ptr + element // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(element % 2 == 0, byte >> 4, byte & 15).to(tl.int64)  # int64 like every offset
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
    with device_guard(out):
        _dequantize_kernel[grid](weight.data, weight.absmax, weight.code, out, d_out, d_in, weight.blocksize,
                                 W_DTYPE=_TL_DTYPES[weight.dtype], BN=32, BK=32)
    return out


# ----------------------------------------------------------------------------------------------- shared tile code
@triton.jit
def _ba_tile(a_ptr, b_ptr, rn, rk, d_out, d_in, r, stride_an, stride_bn, BN: tl.constexpr, BK: tl.constexpr,
             RB: tl.constexpr):
    """B[rn, :r] @ A[:r, rk] in fp32: (BN, BK), over rank chunks of RB (operands in their own dtype)."""
    ba = tl.zeros((BN, BK), dtype=tl.float32)
    for r0 in range(0, r, RB):
        rr = r0 + tl.arange(0, RB).to(tl.int64)
        b, a = _rank_chunk(a_ptr, b_ptr, rn, rk, rr, d_out, d_in, r, stride_an, stride_bn)
        ba += tl.dot(b, a, input_precision="ieee")
    return ba


@triton.jit
def _rank_chunk(a_ptr, b_ptr, rn, rk, rr, d_out, d_in, r, stride_an, stride_bn):
    """The factor tiles of one rank chunk `rr`: B[rn, rr] (BN, RB) and A[rr, rk] (RB, BK), zero outside bounds."""
    b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=(rn[:, None] < d_out) & (rr[None, :] < r),
                other=0.0)
    a = tl.load(a_ptr + rr[:, None] * stride_an + rk[None, :], mask=(rr[:, None] < r) & (rk[None, :] < d_in),
                other=0.0)
    return b, a


@triton.jit
def _delta_tile(w_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, rn, rk, d_out, d_in, r, stride_wn, stride_wk, stride_an,
                stride_bn, blocksize, PACKED: tl.constexpr, W_DTYPE: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, RB: tl.constexpr):
    """ΔW[rn, rk] = W0[rn, rk] ⊙ (B[rn, :r] @ A[:r, rk]) in fp32: (BN, BK)."""
    w = _weight_tile(w_ptr, absmax_ptr, code_ptr, rn, rk, d_out, d_in, stride_wn, stride_wk, blocksize, PACKED,
                     W_DTYPE)
    return w * _ba_tile(a_ptr, b_ptr, rn, rk, d_out, d_in, r, stride_an, stride_bn, BN, BK, RB)


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
    """Prologue shared by the weight-gradient kernels: the (BM, BN) tile `g ⊙ dy[rm, rn]`, in dy's dtype."""
    dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :],
                 mask=(rm[:, None] < n_tokens) & (rn[None, :] < d_out), other=0.0)
    if HAS_GATE:
        g = tl.load(g_ptr + rm, mask=rm < n_tokens, other=0.0).to(tl.float32)
        dy = (dy.to(tl.float32) * g[:, None]).to(dy.dtype)
    return dy


# ----------------------------------------------------------------------------------------------- kernels
# The rank and B's row stride (= r) are not specialised on (a Triton launch otherwise compiles apart r = 8, 16 and 32),
# so one compiled kernel per rank chunk RB serves every rank.
_RANK_ARGS = ["r", "stride_bn"]


# Offsets: every index vector is int64 (program ids and loop starts are cast before `tl.arange` is added), so no
# `index * stride` product overflows on tensors of more than 2^31 elements.
@triton.jit(do_not_specialize=_RANK_ARGS)
def _hira_fwd_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, g_ptr, base_ptr, out_ptr, n_tokens, d_in, d_out,
                     r, scaling, stride_xm, stride_wn, stride_wk, stride_an, stride_bn, stride_om, blocksize,
                     PACKED: tl.constexpr, W_DTYPE: tl.constexpr,
                     HAS_GATE: tl.constexpr, HAS_BASE: tl.constexpr, RB: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, d_in, BK):
        rk = k0 + tl.arange(0, BK).to(tl.int64)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < n_tokens) & (rk[None, :] < d_in),
                    other=0.0)
        delta = _delta_tile(w_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, rn, rk, d_out, d_in, r, stride_wn, stride_wk,
                            stride_an, stride_bn, blocksize, PACKED, W_DTYPE, BN, BK, RB)
        acc += tl.dot(x, tl.trans(delta.to(x.dtype)), input_precision="ieee")
    _store_gated(acc, scaling, g_ptr, base_ptr, out_ptr, rm, rn, n_tokens, d_out, stride_om, HAS_GATE, HAS_BASE)


@triton.jit(do_not_specialize=_RANK_ARGS)
def _hira_bwd_dx_kernel(dy_ptr, x_ptr, w_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, g_ptr, dx_ptr, dg_ptr, n_tokens,
                        d_in, d_out, r, scaling, stride_dym, stride_xm, stride_wn, stride_wk, stride_an, stride_bn,
                        blocksize, PACKED: tl.constexpr, W_DTYPE: tl.constexpr, HAS_GATE: tl.constexpr,
                        NEED_DX: tl.constexpr, NEED_DG: tl.constexpr, RB: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rk = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)  # P = δ ΔW for this (token, input) tile
    for n0 in range(0, d_out, BN):
        rn = n0 + tl.arange(0, BN).to(tl.int64)
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :],
                     mask=(rm[:, None] < n_tokens) & (rn[None, :] < d_out), other=0.0)
        delta = _delta_tile(w_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, rn, rk, d_out, d_in, r, stride_wn, stride_wk,
                            stride_an, stride_bn, blocksize, PACKED, W_DTYPE, BN, BK, RB)
        acc += tl.dot(dy, delta.to(dy.dtype), input_precision="ieee")
    acc = acc * scaling
    tile_mask = (rm[:, None] < n_tokens) & (rk[None, :] < d_in)
    if NEED_DG:  # fp32 atomics across d_in tiles: not deterministic (the dispatch keeps deterministic runs off)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        tl.atomic_add(dg_ptr + rm, tl.sum(acc * x, axis=1), mask=rm < n_tokens)
    if NEED_DX:
        if HAS_GATE:
            g = tl.load(g_ptr + rm, mask=rm < n_tokens, other=0.0).to(tl.float32)
            acc = acc * g[:, None]
        tl.store(dx_ptr + rm[:, None] * stride_xm + rk[None, :], acc.to(dx_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit(do_not_specialize=_RANK_ARGS)
def _hira_bwd_dw_kernel(dy_ptr, x_ptr, w_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, g_ptr, da_ptr, db_ptr, n_tokens,
                        d_in, d_out, r, scaling, stride_dym, stride_xm, stride_wn, stride_wk, stride_an, stride_bn,
                        blocksize, PACKED: tl.constexpr, W_DTYPE: tl.constexpr, HAS_GATE: tl.constexpr,
                        RB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rn = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    rk = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    acc = tl.zeros((BN, BK), dtype=tl.float32)  # dΔW = (g ⊙ δ)ᵀ x for this weight tile
    for m0 in range(0, n_tokens, BM):
        rm = m0 + tl.arange(0, BM).to(tl.int64)
        dy = _load_gated_grad(dy_ptr, g_ptr, rm, rn, n_tokens, d_out, stride_dym, HAS_GATE)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < n_tokens) & (rk[None, :] < d_in),
                    other=0.0)
        acc += tl.dot(tl.trans(dy), x, input_precision="ieee")
    w = _weight_tile(w_ptr, absmax_ptr, code_ptr, rn, rk, d_out, d_in, stride_wn, stride_wk, blocksize, PACKED,
                     W_DTYPE)
    dm = (acc * w * scaling).to(dy_ptr.dtype.element_ty)  # (BN, BK)
    # dB[n, r] += dM A[r, k]ᵀ and dA[r, k] += B[n, r]ᵀ dM, one rank chunk at a time, fp32 atomics (not deterministic)
    for r0 in range(0, r, RB):
        rr = r0 + tl.arange(0, RB).to(tl.int64)
        b, a = _rank_chunk(a_ptr, b_ptr, rn, rk, rr, d_out, d_in, r, stride_an, stride_bn)
        db = tl.dot(dm, tl.trans(a).to(dm.dtype), input_precision="ieee")  # (BN, RB)
        tl.atomic_add(db_ptr + rn[:, None] * r + rr[None, :], db, mask=(rn[:, None] < d_out) & (rr[None, :] < r))
        da = tl.dot(tl.trans(b).to(dm.dtype), dm, input_precision="ieee")  # (RB, BK)
        tl.atomic_add(da_ptr + rr[:, None] * d_in + rk[None, :], da, mask=(rr[:, None] < r) & (rk[None, :] < d_in))


# ----------------------------------------------------------------------------------------------- host side
def _blocks(kernel: str, x: torch.Tensor, r: int, rows: int, cols: int, inner: int) -> dict:
    """Launch keywords for `kernel`: the device's blocks, shrunk to small inputs (rows × cols grid, inner loop)."""
    b = check_blocks(kernel, x.dtype, r, x.device)
    sizes = {"hira_fwd": (rows, cols, inner), "hira_bwd_dx": (rows, inner, cols), "hira_bwd_dw": (inner, rows, cols)}
    n_tokens, d_out, d_in = sizes[kernel]
    return {"BM": _shrink(n_tokens, b.BM), "BN": _shrink(d_out, b.BN), "BK": _shrink(d_in, b.BK), "RB": b.RB,
            "num_warps": b.num_warps, "num_stages": b.num_stages}


def _weight_args(W0) -> tuple[tuple, dict]:
    """Kernel arguments describing W0: (pointer, absmax, code, stride_n, stride_k, blocksize) and constexprs."""
    if isinstance(W0, Packed4bit):
        return (W0.data, W0.absmax, W0.code, 0, 0, W0.blocksize), {"PACKED": True, "W_DTYPE": _TL_DTYPES[W0.dtype]}
    return (W0, W0, W0, W0.stride(0), W0.stride(1), 0), {"PACKED": False, "W_DTYPE": tl.float32}


class TritonGatedHiraFunction(torch.autograd.Function):
    """Triton version of `ops.hira.GatedHiraFunction`: `base + s · g ⊙ (x (W0 ⊙ BA)ᵀ)`, same signature plus
    `on_failure`: None (a Triton error in backward raises) or a callback that takes the error, after which backward
    computes the gradients with the PyTorch path instead (kernel="auto")."""

    @staticmethod
    def forward(ctx, base, x, gate, A, B, weight_fn, scaling, on_failure=None):
        W0 = weight_fn()
        x_c, A_c, B_c = x.contiguous(), A.contiguous(), B.contiguous()
        (n_tokens, d_in), d_out, r = x_c.shape, W0.shape[0], A.shape[0]
        out = torch.empty((n_tokens, d_out), device=x.device, dtype=base.dtype if base is not None else x.dtype)
        base_c = base.contiguous() if base is not None else out
        gate_c = gate.reshape(-1).contiguous() if gate is not None else x_c
        (w_ptr, absmax, code, stride_wn, stride_wk, blocksize), w_const = _weight_args(W0)
        launch = _blocks("hira_fwd", x_c, r, n_tokens, d_out, d_in)
        grid = (triton.cdiv(n_tokens, launch["BM"]), triton.cdiv(d_out, launch["BN"]))
        with device_guard(x):
            _hira_fwd_kernel[grid](
                x_c, w_ptr, absmax, code, A_c, B_c, gate_c, base_c, out, n_tokens, d_in, d_out, r, float(scaling),
                x_c.stride(0), stride_wn, stride_wk, A_c.stride(0), B_c.stride(0), out.stride(0), blocksize,
                **w_const, HAS_GATE=gate is not None, HAS_BASE=base is not None, **launch,
            )
        ctx.save_for_backward(x, gate, A, B)
        ctx.weight_fn, ctx.scaling, ctx.has_base, ctx.on_failure = weight_fn, scaling, base is not None, on_failure
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, gate, A, B = ctx.saved_tensors
        need = ctx.needs_input_grad[1:5]
        grad_base = grad_out if ctx.has_base and ctx.needs_input_grad[0] else None
        try:
            grads = _hira_backward(grad_out, x, gate, A, B, ctx.weight_fn(), ctx.scaling, need)
        except Exception as error:  # noqa: BLE001  (which errors are Triton's is decided by on_failure)
            if ctx.on_failure is None or not ctx.on_failure(error):
                raise
            from ..ops.hira import GatedHiraFunction

            grads = torch_path_grads(GatedHiraFunction, (x, gate, A, B), need, grad_out, ctx.weight_fn, ctx.scaling)
        return (grad_base, *grads, None, None, None)


def _hira_backward(grad_out, x, gate, A, B, W0, scaling, need):
    """(dx, dg, dA, dB), None where not needed, from the two backward kernels."""
    need_x, need_gate, need_A, need_B = need
    dy = grad_out.contiguous().to(x.dtype)
    x_c, A_c, B_c = x.contiguous(), A.contiguous(), B.contiguous()
    (n_tokens, d_in), d_out, r = x_c.shape, W0.shape[0], A.shape[0]
    gate_c = gate.reshape(-1).contiguous() if gate is not None else x_c
    (w_ptr, absmax, code, stride_wn, stride_wk, blocksize), w_const = _weight_args(W0)
    strides = (stride_wn, stride_wk, A_c.stride(0), B_c.stride(0), blocksize)
    grad_x = grad_gate = grad_A = grad_B = None
    with device_guard(x):
        if need_x or need_gate:
            dx = torch.empty_like(x_c) if need_x else x_c
            dg = torch.zeros(n_tokens, device=x.device, dtype=torch.float32)
            launch = _blocks("hira_bwd_dx", x_c, r, n_tokens, d_in, d_out)
            grid = (triton.cdiv(n_tokens, launch["BM"]), triton.cdiv(d_in, launch["BK"]))
            _hira_bwd_dx_kernel[grid](
                dy, x_c, w_ptr, absmax, code, A_c, B_c, gate_c, dx, dg, n_tokens, d_in, d_out, r, float(scaling),
                dy.stride(0), x_c.stride(0), *strides, **w_const,
                HAS_GATE=gate is not None, NEED_DX=need_x, NEED_DG=need_gate, **launch,
            )
            grad_x = dx if need_x else None
            grad_gate = dg.reshape(gate.shape).to(gate.dtype) if need_gate else None
        if need_A or need_B:
            da = torch.zeros((r, d_in), device=x.device, dtype=torch.float32)
            db = torch.zeros((d_out, r), device=x.device, dtype=torch.float32)
            launch = _blocks("hira_bwd_dw", x_c, r, d_out, d_in, n_tokens)
            grid = (triton.cdiv(d_out, launch["BN"]), triton.cdiv(d_in, launch["BK"]))
            _hira_bwd_dw_kernel[grid](
                dy, x_c, w_ptr, absmax, code, A_c, B_c, gate_c, da, db, n_tokens, d_in, d_out, r, float(scaling),
                dy.stride(0), x_c.stride(0), *strides, **w_const, HAS_GATE=gate is not None, **launch,
            )
            grad_A = da.to(A.dtype) if need_A else None
            grad_B = db.to(B.dtype) if need_B else None
    return grad_x, grad_gate, grad_A, grad_B


def triton_gated_hira(
    x: torch.Tensor,
    gate: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    weight_fn: Callable[[], torch.Tensor],
    scaling: float = 1.0,
    base: Optional[torch.Tensor] = None,
    on_failure: Optional[Callable[[BaseException], bool]] = None,
) -> torch.Tensor:
    """Same contract as `ops.hira.gated_hira`, computed by the Triton kernels above; `weight_fn` may also return a
    `Packed4bit` (the kernels then read the 4-bit bytes directly). Under autocast, x, A and B are cast to the autocast
    dtype first (tensor-core products, fp32 accumulation), as the PyTorch path's matmuls are; `on_failure`: see
    `TritonGatedHiraFunction`."""
    dtype = compute_dtype(x)
    x, A, B = x.to(dtype), A.to(dtype), B.to(dtype)
    return apply_to_tokens(TritonGatedHiraFunction, x, gate, base, A, B, weight_fn, scaling, on_failure)
