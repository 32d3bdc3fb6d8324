"""Triton kernels for the HiRA branch, `out = base + s · g ⊙ (x (W0 ⊙ BA)ᵀ)`: the blocks of `W0 ⊙ BA`, and the
branch's autograd function with W0 read by them.

Design: the same algorithm as the PyTorch path (`gatera_plugin/ops/hira.py`), with its weight-sized elementwise work
fused. That function walks `ΔW = W0 ⊙ BA` in blocks of output rows (`ops.hira._row_blocks`),
once in forward and once in backward, and reads W0 only through a "W0 source" with two methods: `delta` (build the
block `W0_b ⊙ B_b A`) and `mask_` (multiply a gradient block by `W0_b`). `TritonWeight` is that source here:

- `_hira_delta_kernel`, grid (rows/BN, d_in/BK): each (BN, BK) tile of `B_b A` is `tl.dot`s over rank chunks of
  RB (fp32 accumulation), multiplied by the W0 tile in fp32 and stored once in the compute dtype: no `BA` tensor
  and no separate multiply pass; on a 4-bit base the W0 tile is dequantised from the packed bytes in registers.
- `_hira_mask_kernel`, same grid: `dΔW_b ⊙ W0_b` in place (the gradient of `B_b A`), W0 dequantised in registers.

The three big products (`x ΔWᵀ`, `δ ΔW`, `δᵀ x`, each T·K·M) and the rank-r products of dA and dB stay with cuBLAS
(torch.matmul), and the gate, the residual add and dg are the PyTorch path's (`add_gated`, one fused
`addcmul`/`addmm`; `vecdot`; or the row kernels of `rows.py`, as `row_ops` says). So the kernels change what is
built, not how much: every output element is written by one program (no atomics, deterministic), nothing of size
d_out × d_in outlives a block, and autograd saves x, g, A, B as on the PyTorch path.

Cost per token (K = d_in, M = d_out, rank r, T tokens per step):

    FLOPs                        forward                    backward                       total
    PyTorch path and kernels     2KM + (2r+1)KM/T           4KM + (6r+2)KM/T               6KM + (8r+3)KM/T

The 6KM are the three big products; `ΔW` is built ((2r+1)KM) once in forward and once in backward, and dA, dB, the
mask cost (4r+1)KM per step, all amortised over T. At K = 4096, M = 14336 (LLaMA's MLP), r = 32: 356.0 MFLOP per
token at T = 4096 (6KM = 352.3, +1.0%), 353.2 at T = 16384 (+0.26%), on both paths: the kernels do no more work
than the PyTorch path at any T. (The previous kernels built each `BA` tile once per token tile, 1.33x these FLOPs at
BM = 64, and were replaced by this design.)

Gated vs ungated: the token gate adds about 9K + 2M FLOPs per token on both paths (its GEMV `x·w`, the sigmoid, the
multiply inside `addcmul`, `dg`'s `vecdot` over K, the gate's backward `dw`, `dx += dlogit · w`) and no weight-sized
work: 75.8 kFLOP at K = 4096, M = 14336, 0.02% of 6KM. Its cost is in passes over activations (x, δ: K and M elements
per token each), which is why the CPU benchmark sees it at all (README, "Speed and memory"). Dense vs NF4: the same
FLOPs plus dequantisation, about 2 per W0 element (a code lookup and a multiply by its absmax), twice per step on the
PyTorch path (forward and backward's W0) and three times in the kernels (two builds and the mask, in registers):
(4 or 6)·KM/T, under 0.01% of 6KM at T = 4096.

Weight-sized memory traffic per step, bytes per element of W0 (bf16 W0 under bf16 autocast, PEFT's fp32 A and B):

    PyTorch path   ≈ 28: each build writes `BA` (2) and reads it with W0 to write ΔW (6), twice; backward's dΔW (2),
                   the mask in the autocast dtype (6) and dA, dB's reads (4)
    kernels        ≈ 20: each build reads W0 and writes ΔW (4), twice; dΔW (2), the mask (6) and dA, dB's reads (4),
                   A and B being cast to bf16 once per call by the host wrapper (r·(K + M) elements)

that is 0.40 vs 0.29 MB per token at T = 4096 (0.10 vs 0.07 at 16k), beside the products' own operands (the
PyTorch path's figure was ≈ 50 while it built dΔW in fp32 and cast it back). On an NF4 base the PyTorch path also
dequantises all of W0 to bf16 twice per step (reading 0.5625, writing and re-reading 2 bytes per element, and
holding a d_out × d_in bf16 copy, 117 MB at 4096 × 14336, while it runs); the kernels read the 0.5625 packed bytes
per element in each build and mask and never hold a dequantised W0.

Measured on an H200 (`bench/gpu_check.py`, bench/results/gpu_check.json): no faster. With the weight-sized traffic
a few percent of a step at 4k+ tokens, the three cuBLAS products decide the time on both paths: dense bf16 at
4096 × 14336, the kernels took 0.99x the PyTorch path's time at 4k tokens and 1.02x at 16k, at 4096 × 4096 1.28x
(4k) and 0.99x (16k); on an NF4 base they took 1.34x (4k) and 1.11x (16k), with 0.81-0.93x its peak memory. So
"auto" keeps the PyTorch path everywhere (`TRITON_WINS` in `kernels/__init__.py`). Block size: one block per
layer up to `ops.hira.GPU_CHUNK_ELEMENTS` (2^26) on a GPU, as on the PyTorch path, so each product is one GEMM.

4-bit bases: when the base layer is a bitsandbytes `Linear4bit` (NF4 or FP4), the kernels read W0 tiles straight
from its packed bytes (two 4-bit codes per byte, row-major over (d_out, d_in), high nibble first; value =
code[nibble] · absmax[element // blocksize], computed in fp32 and rounded to the quantised dtype exactly as
`bitsandbytes.functional.dequantize_4bit` does), so no dequantised W0 is materialised either. A nested (double
quantised) absmax is first expanded to fp32 with bitsandbytes' own `dequantize_blockwise` (d_out·d_in / blocksize
values); the tests check the in-kernel values bit for bit against `dequantize_4bit`.

Numerics: the branch computes in x's dtype, or in the autocast dtype under autocast (the host wrapper casts x, A
and B to it, as autocast casts the PyTorch path's matmuls). The rank chunks of BA are `tl.dot`s with operands in that
dtype (fp32 exactly, "ieee"; fp16/bf16 on tensor cores) accumulating in fp32; W0 ⊙ BA and the mask are computed in
fp32 and rounded once. Triton's CPU interpreter (TRITON_INTERPRET=1, used by the tests)
mishandles bf16 `tl.dot`, so the tests run fp32 and fp16; tests/test_kernel_compile.py compiles every launched
specialization, bf16 included, for sm_80, sm_86, sm_89 and sm_90.

Launch: the rank is walked in chunks of RB = 16 (r <= 16) or 32, so no tile grows with r (r = 512 uses the shared
memory of r = 32); tile sizes come from `blocks.choose_blocks` (dtype, r, the device's opt-in shared memory); all offsets
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
from ..ops.hira import DenseWeight, GatedHiraFunction
from ..ops.rows import TORCH_ROWS, TorchRows
from . import compute_dtype, device_guard
from .blocks import check_blocks, shrink


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


    def dequantize(self) -> torch.Tensor:
        """W0 (d_out, d_in) in the quantised dtype, with PyTorch ops (the PyTorch path's W0 after a kernel failure;
        the same values as `bitsandbytes.functional.dequantize_4bit`)."""
        count = self.shape[0] * self.shape[1]
        nibbles = torch.stack((self.data >> 4, self.data & 15), dim=1).reshape(-1)[:count].long()
        scale = self.absmax.repeat_interleave(self.blocksize)[:count]
        return (self.code[nibbles] * scale).reshape(self.shape).to(self.dtype)


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


# ----------------------------------------------------------------------------------------------- kernels
# The rank and B's row stride (= r) are not specialised on (a Triton launch otherwise compiles apart r = 8, 16 and 32),
# so one compiled kernel per rank chunk RB serves every rank.
_RANK_ARGS = ["r", "stride_bn"]


# Offsets: every index vector is int64 (program ids are cast before `tl.arange` is added), so no `index * stride`
# product overflows on tensors of more than 2^31 elements. Rows are numbered within the block (`local`) for B and the
# output, and from W0's first row (`row_start + local`) for W0.
@triton.jit(do_not_specialize=_RANK_ARGS)
def _hira_delta_kernel(w_ptr, absmax_ptr, code_ptr, a_ptr, b_ptr, out_ptr, row_start, rows, d_in, r, stride_wn,
                       stride_wk, stride_an, stride_bn, stride_on, blocksize, PACKED: tl.constexpr,
                       W_DTYPE: tl.constexpr, RB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Grid (rows/BN, d_in/BK): `out = W0[row_start:row_start + rows] ⊙ (B_b A)`, B_b the block's rows of B."""
    local = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    rk = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    w = _weight_tile(w_ptr, absmax_ptr, code_ptr, row_start + local, rk, row_start + rows, d_in, stride_wn, stride_wk,
                     blocksize, PACKED, W_DTYPE)
    delta = w * _ba_tile(a_ptr, b_ptr, local, rk, rows, d_in, r, stride_an, stride_bn, BN, BK, RB)
    tl.store(out_ptr + local[:, None] * stride_on + rk[None, :], delta.to(out_ptr.dtype.element_ty),
             mask=(local[:, None] < rows) & (rk[None, :] < d_in))


@triton.jit
def _hira_mask_kernel(grad_ptr, w_ptr, absmax_ptr, code_ptr, row_start, rows, d_in, stride_wn, stride_wk, stride_gn,
                      blocksize, PACKED: tl.constexpr, W_DTYPE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Grid (rows/BN, d_in/BK): `grad *= W0[row_start:row_start + rows]` in place (fp32 multiply, one rounding)."""
    local = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    rk = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    w = _weight_tile(w_ptr, absmax_ptr, code_ptr, row_start + local, rk, row_start + rows, d_in, stride_wn, stride_wk,
                     blocksize, PACKED, W_DTYPE)
    mask = (local[:, None] < rows) & (rk[None, :] < d_in)
    pointers = grad_ptr + local[:, None] * stride_gn + rk[None, :]
    grad = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    tl.store(pointers, (grad * w).to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- host side
def _launch(kernel: str, dtype: torch.dtype, device: torch.device, rows: int, d_in: int, r: int = 0) -> dict:
    """Launch keywords for `kernel` on a rows × d_in block: the device's tiles, shrunk to small blocks. `r` is the
    rank; a kernel without rank tiles (hira_mask) leaves it 0, its tiles do not depend on it."""
    b = check_blocks(kernel, dtype, r, device)
    launch = {"BN": shrink(rows, b.BN), "BK": shrink(d_in, b.BK), "num_warps": b.num_warps,
              "num_stages": b.num_stages}
    return {**launch, "RB": b.RB} if kernel == "hira_delta" else launch


def _weight_args(W0) -> tuple[tuple, dict]:
    """Kernel arguments describing W0: (pointer, absmax, code, stride_n, stride_k, blocksize) and constexprs."""
    if isinstance(W0, Packed4bit):
        return (W0.data, W0.absmax, W0.code, 0, 0, W0.blocksize), {"PACKED": True, "W_DTYPE": _TL_DTYPES[W0.dtype]}
    return (W0, W0, W0, W0.stride(0), W0.stride(1), 0), {"PACKED": False, "W_DTYPE": tl.float32}


class TritonWeight:
    """W0 for `ops.hira`'s branch function, read by the chunk kernels above: a dense (d_out, d_in) tensor or a
    `Packed4bit` (dequantised inside the kernels, never stored whole). Same methods as `ops.hira.DenseWeight`."""

    def __init__(self, weight):
        self.weight = weight
        self.shape = tuple(weight.shape)
        self.args, self.constexprs = _weight_args(weight)

    def delta(self, B_rows: torch.Tensor, A: torch.Tensor, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """`ΔW_b = W0_b ⊙ (B_b A)` (rows, d_in) in `dtype`: one kernel, BA in fp32 from A, B in their dtype."""
        A_c, B_c = A.contiguous(), B_rows.contiguous()
        n_rows, d_in, r = B_c.shape[0], A_c.shape[1], A_c.shape[0]
        out = torch.empty((n_rows, d_in), device=A.device, dtype=dtype)
        w_ptr, absmax, code, stride_wn, stride_wk, blocksize = self.args
        launch = _launch("hira_delta", A.dtype, A.device, n_rows, d_in, r)
        grid = (triton.cdiv(n_rows, launch["BN"]), triton.cdiv(d_in, launch["BK"]))
        with device_guard(A):
            _hira_delta_kernel[grid](w_ptr, absmax, code, A_c, B_c, out, rows.start, n_rows, d_in, r, stride_wn,
                                     stride_wk, A_c.stride(0), B_c.stride(0), out.stride(0), blocksize,
                                     **self.constexprs, **launch)
        return out

    def mask_(self, grad: torch.Tensor, rows: slice) -> torch.Tensor:
        """`grad ⊙ W0_b` in place, grad (rows, d_in) contiguous (the function's own temporary)."""
        n_rows, d_in = grad.shape
        w_ptr, absmax, code, stride_wn, stride_wk, blocksize = self.args
        launch = _launch("hira_mask", grad.dtype, grad.device, n_rows, d_in)
        grid = (triton.cdiv(n_rows, launch["BN"]), triton.cdiv(d_in, launch["BK"]))
        with device_guard(grad):
            _hira_mask_kernel[grid](grad, w_ptr, absmax, code, rows.start, n_rows, d_in, stride_wn, stride_wk,
                                    grad.stride(0), blocksize, **self.constexprs, **launch)
        return grad


def torch_weight(weight) -> torch.Tensor:
    """W0 as a dense tensor for the PyTorch path (the fallback after a kernel failure)."""
    return weight.dequantize() if isinstance(weight, Packed4bit) else weight


class TritonGatedHiraFunction(GatedHiraFunction):
    """`ops.hira.GatedHiraFunction` with W0 read by the chunk kernels (`TritonWeight`); same signature plus
    `on_failure`: None (a Triton error in backward raises) or a callback that takes the error, after which backward
    computes the gradients with the PyTorch path instead (kernel="auto")."""

    @staticmethod
    def forward(ctx, base, x, gate, A, B, weight_fn, scaling, on_failure=None, row_ops=TORCH_ROWS):
        ctx.kernel_weight_fn, ctx.on_failure = weight_fn, on_failure
        return GatedHiraFunction.forward(ctx, base, x, gate, A, B, lambda: TritonWeight(weight_fn()), scaling,
                                         row_ops)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        try:
            grads = GatedHiraFunction.gradients(ctx, grad_out, ctx.weight_fn())
        except Exception as error:  # noqa: BLE001  (which errors are Triton's is decided by on_failure)
            if ctx.on_failure is None or not ctx.on_failure(error):
                raise
            grads = GatedHiraFunction.gradients(ctx, grad_out, DenseWeight(torch_weight(ctx.kernel_weight_fn())))
        return (*grads, None, None, None, None)


def triton_gated_hira(
    x: torch.Tensor,
    gate: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    weight_fn: Callable[[], torch.Tensor],
    scaling: float = 1.0,
    base: Optional[torch.Tensor] = None,
    on_failure: Optional[Callable[[BaseException], bool]] = None,
    row_ops: TorchRows = TORCH_ROWS,
) -> torch.Tensor:
    """Same contract as `ops.hira.gated_hira`, with the ΔW blocks built by the chunk kernels; `weight_fn` may also
    return a `Packed4bit` (the kernels then read the 4-bit bytes directly). x, A and B are cast to `compute_dtype(x)`
    first (tensor-core products, fp32 accumulation): the autocast dtype under autocast, as the PyTorch path's matmuls
    are, else x's dtype. Outside autocast a bf16 / fp16 x therefore also rounds fp32 A and B before `BA` is formed,
    where the PyTorch path forms `BA` in the adapter's dtype and rounds once (`kernel="triton"` only: "auto" takes
    the PyTorch path);
    `on_failure`: see `TritonGatedHiraFunction`; `row_ops`: as `gated_hira`'s."""
    dtype = compute_dtype(x)
    x, A, B = x.to(dtype), A.to(dtype), B.to(dtype)
    return apply_to_tokens(TritonGatedHiraFunction, x, gate, base, A, B, weight_fn, scaling, on_failure, row_ops)
