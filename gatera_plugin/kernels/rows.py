"""Triton kernels for the token gate's passes over rows of activations, and the row operations that use them.

A gated HiRA layer (`ops/hira.py`) scales whole rows of activations by one number per token: the residual add
`base + update ⊙ (s·g)` in forward, `δ ⊙ (s·g)` (or `x ⊙ (s·g)`) for `dΔW` and `P ⊙ (s·g)` for dx in backward, and
the gate's gradient is a row dot product `Σ_i P ⊙ x`. Each is memory-bound. PyTorch runs a multiply by an (N, 1)
tensor as a broadcasting elementwise kernel without vector loads (on large rows the kernel below takes 0.50-0.68x
its time on an H200: bench/results/row_ops.json), and the dot product and the scale of P are two passes over P.
Here:

- `_scale_rows_kernel`, grid (N,): `out = a ⊙ s (+ base)`, one program per row, columns in chunks of BLOCK;
- `_scale_rows_dot_kernel`, grid (N,): `dot = Σ_i p ⊙ x` (fp32) and `p ← p ⊙ s` in place, in one pass over p and x.

Values are loaded, multiplied and added in fp32 and rounded once to the output's dtype, as PyTorch's elementwise
ops on half-precision tensors compute them (a bf16 `a * s` is the same number on both); the dot product accumulates
in fp32 (PyTorch's `vecdot` of bf16 rows returns bf16). Offsets are int64; launches run under the input's device.

`TorchRows` (in `ops/rows.py`) is the PyTorch version of the same three operations, for every device and for
kernel="torch"; `TritonRows` here runs the kernels. `kernels.rows_for(kernel, x)` picks one for a call.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import triton
import triton.language as tl

from .._stack import user_stacklevel
from ..ops.rows import TorchRows
from . import KERNEL_DTYPES, MAX_TOKENS, _failure_cause, _raise_clearly, device_guard, is_triton_failure


@triton.jit
def _scale_rows_kernel(A, S, BASE, OUT, n_cols, stride_a, stride_base, stride_out, HAS_BASE: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(S + row).to(tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = (start + tl.arange(0, BLOCK)).to(tl.int64)
        inside = cols < n_cols
        value = tl.load(A + row * stride_a + cols, mask=inside, other=0.0).to(tl.float32) * scale
        if HAS_BASE:
            value += tl.load(BASE + row * stride_base + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(OUT + row * stride_out + cols, value.to(OUT.dtype.element_ty), mask=inside)


@triton.jit
def _scale_rows_dot_kernel(P, X, S, DOT, n_cols, stride_p, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(S + row).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = (start + tl.arange(0, BLOCK)).to(tl.int64)
        inside = cols < n_cols
        p = tl.load(P + row * stride_p + cols, mask=inside, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
        total += p * x
        tl.store(P + row * stride_p + cols, (p * scale).to(P.dtype.element_ty), mask=inside)
    tl.store(DOT + row, tl.sum(total, axis=0))


def _launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps): up to 2048 columns per chunk, 8 warps from 1024 columns."""
    block = min(2048, triton.next_power_of_2(max(n_cols, 16)))
    return block, 8 if block >= 1024 else 4


# Fewest elements (N × d) of an operation's rows for which "auto" runs its kernel. On an H200, counting the host's
# launch (bench/row_ops.py, bench/results/row_ops.json; a Triton launch costs 40-80 µs of host time against 9-38 µs
# for an ATen call): `scale` takes 1.20x PyTorch's time at 4096 x 4096 (2^24 elements) and 0.68x at 4096 x 14336
# (2^25.8), `add_scaled` 1.13x and 0.66x, `scale_and_dot_` 0.72x and 0.46x (1.33x at 2048 x 14336, 2^24.8). 2^25 for
# all three: with the dot product's kernel from 2^24, a one-layer forward + backward at 4096 x 4096 and 4k tokens,
# where the host's work sets the pace, ran 1.06x slower (bench/results/gpu_check_rows_2p24.json, section (b)).
MIN_ELEMENTS = {"scale": 1 << 25, "add_scaled": 1 << 25, "scale_and_dot_": 1 << 25}
# (On which GPUs "auto" takes them: `kernels.ROW_KERNEL_CAPABILITIES`.)


def _row_major(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the kernels can take these (N, d) tensors: unit stride along rows, a kernel dtype, below the grid's
    row limit."""
    return all(t is None or (t.dim() == 2 and t.stride(1) == 1 and t.dtype in KERNEL_DTYPES
                             and t.shape[0] <= MAX_TOKENS) for t in tensors)


def _per_row(scale: torch.Tensor, n: int) -> torch.Tensor:
    """The (N, 1) scale as a contiguous (N,) tensor."""
    return scale.reshape(n).contiguous()


def scale_rows(a: torch.Tensor, scale: torch.Tensor, base: Optional[torch.Tensor] = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`a ⊙ scale (+ base)` with the kernel: a, base, out (N, d) (out may be a), scale (N, 1); out defaults to a new
    tensor of a's dtype (base's, when given)."""
    n, d = a.shape
    if out is None:
        out = torch.empty_like(a if base is None else base)
    block, warps = _launch_config(d)
    with device_guard(a):
        _scale_rows_kernel[(n,)](a, _per_row(scale, n), base if base is not None else a, out, d, a.stride(0),
                                 base.stride(0) if base is not None else 0, out.stride(0), HAS_BASE=base is not None,
                                 BLOCK=block, num_warps=warps)
    return out


def scale_rows_and_dot_(p: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`Σ_i p ⊙ x` per row (N,) in fp32, and p ← p ⊙ scale in place, in one pass: p, x (N, d), scale (N, 1)."""
    n, d = p.shape
    dot = torch.empty(n, dtype=torch.float32, device=p.device)
    block, warps = _launch_config(d)
    with device_guard(p):
        _scale_rows_dot_kernel[(n,)](p, x, _per_row(scale, n), dot, d, p.stride(0), x.stride(0), BLOCK=block,
                                     num_warps=warps)
    return dot


class TritonRows(TorchRows):
    """`TorchRows`' operations with the kernels where the rows are large enough for them to win (`min_elements`, by
    default `MIN_ELEMENTS`) and laid out for them; PyTorch's ops (the same values) elsewhere.

    `raise_errors=False` (kernel="auto"): a Triton failure warns once, naming its cause, and every later call in
    this process uses PyTorch's ops (`ROW_KERNEL_FAILURE` holds the cause); `True` (kernel="triton") raises it.
    """

    def __init__(self, raise_errors: bool = False, min_elements: Optional[dict] = None):
        self.raise_errors = raise_errors
        self.min_elements = MIN_ELEMENTS if min_elements is None else min_elements

    def _takes(self, op: str, a: torch.Tensor, scale, *others: Optional[torch.Tensor], same_dtype: bool = True) -> bool:
        """Whether `op` on rows `a` (N, d) runs its kernel: not empty, large enough (`min_elements`), laid out for it,
        `others` of a's shape, and `scale` an (N, 1) tensor on a's device (of a's dtype with `same_dtype`, so that
        the result has the dtype PyTorch's type promotion gives). Anything else goes to PyTorch's ops."""
        return (a.numel() >= max(1, self.min_elements[op]) and _row_major(a, *others)
                and all(t is None or t.shape == a.shape for t in others)
                and isinstance(scale, torch.Tensor) and scale.shape == (a.shape[0], 1) and scale.device == a.device
                and (scale.dtype == a.dtype or not same_dtype))

    def _run(self, kernel, fallback):
        global ROW_KERNEL_FAILURE
        if ROW_KERNEL_FAILURE is not None and not self.raise_errors:
            return fallback()
        try:
            return kernel()
        except Exception as error:  # noqa: BLE001  (only Triton's own failures are handled)
            if self.raise_errors:
                _raise_clearly("row", error)  # (returns only for an error that is not Triton's)
            if not is_triton_failure(error):
                raise
            cause = ROW_KERNEL_FAILURE = _failure_cause(error)
            warnings.warn(
                f"GateRA: the Triton row kernel failed ({cause}); every gated layer uses PyTorch's ops for it from "
                "now on (same results). Set kernel='torch' to skip the kernels.", RuntimeWarning, stacklevel=user_stacklevel(),
            )
            return fallback()

    def scale(self, a, scale):
        if not self._takes("scale", a, scale):
            return super().scale(a, scale)
        return self._run(lambda: scale_rows(a, scale), lambda: super(TritonRows, self).scale(a, scale))

    def add_scaled(self, base, update, scale, out=None, value=1.0):
        if not self._takes("add_scaled", update, scale, base, out) or base.dtype != update.dtype:
            return super().add_scaled(base, update, scale, out, value)
        # the kernel takes one scale per row and computes in fp32: s·g is formed in fp32, as `addcmul(value=s)` does
        return self._run(lambda: scale_rows(update, scale if value == 1.0 else scale.float() * value, base=base,
                                            out=out),
                         lambda: super(TritonRows, self).add_scaled(base, update, scale, out, value))

    def scale_and_dot_(self, p, x, scale):
        if not self._takes("scale_and_dot_", p, scale, x, same_dtype=False):  # (p is scaled in place: keeps its dtype)
            return super().scale_and_dot_(p, x, scale)
        return self._run(lambda: scale_rows_and_dot_(p, x, scale),
                         lambda: super(TritonRows, self).scale_and_dot_(p, x, scale))


# The cause of the first row-kernel failure under kernel="auto" (then PyTorch's ops for the rest of the process).
ROW_KERNEL_FAILURE: Optional[str] = None
TRITON_ROWS = TritonRows()  # kernel="auto"
TRITON_ROWS_RAISING = TritonRows(raise_errors=True, min_elements=dict.fromkeys(MIN_ELEMENTS, 0))  # kernel="triton"
