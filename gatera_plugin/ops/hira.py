"""Memory-lean gated HiRA branch: `s · g ⊙ (x (W0 ⊙ BA)ᵀ)` keeping only `x`, `g`, `A`, `B` for backward.

PEFT's HiRA builds `ΔW = W0 ⊙ BA` (d_out × d_in) every forward and lets autograd keep it until backward, one such
matrix per adapted layer (and, on 4-bit bases, a dequantised `W0` too). Here `BA`, `ΔW` and the dequantised `W0` are
rebuilt in backward instead, so between forward and backward a layer holds nothing of size d_out × d_in.

Forward and backward walk over blocks of `rows` output rows, so the largest temporary is `rows × d_in`
(`CHUNK_ELEMENTS` elements on CPU, `GPU_CHUNK_ELEMENTS` on a GPU). W0 is read only through a W0 source
(`DenseWeight` here; the Triton path's `kernels.hira_triton.TritonWeight` builds the same blocks with fused kernels).

Backward (docs/method.md, "Gradients"), with `δ = ∂L/∂out` (N × d_out) and `G = g ⊙ δ`:

    P  = δ ΔW = Σ_blocks δ_b ΔW_b    (N × d_in)   one product serves both:
    dx = s·g ⊙ P                                   dx_t = s g_t ΔWᵀ δ_t
    dg = s · Σ_i P ⊙ x                             dg_t = s δ_tᵀ (ΔW x_t) = s (δ_t ΔW) · x_t
    dM_b = W0_b ⊙ (G_bᵀ x)           (rows × d_in, per block)
    dB_b = s · dM_b Aᵀ,  dA = s · Σ_blocks B_bᵀ dM_b   (s applied last, in the factors' dtype)

so the gate's gradient costs no extra product with `ΔW`: three matmuls of size N·d_in·d_out in all (one forward, two
backward), as many as PEFT's HiRA, plus the cheap rebuild of `BA` (d_out·r·d_in). Where x needs no gradient (a
first layer's q, k, v) and the gate does, `P` would serve dg alone: forward keeps the update `x ΔWᵀ` (N × d_out)
instead and `dg = s Σ_j δ ⊙ x ΔWᵀ`, two products, as PEFT's HiRA takes there.

Where autograd records nothing (`no_grad`, `generate()`), `gated_hira` runs the forward's arithmetic
(`branch_output`) without the autograd function: the same output, less host work per layer and decoding step. For a
decoding step's few tokens it forms no ΔW at all (`factored_update`: `Σ_k B_k ⊙ W0 (A_k ⊙ x)`, W0 read once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._autocast import HALF_DTYPES, autocast_factors, autocast_state, restore_autocast
from ._tokens import apply_to_tokens, records_graph
from .rows import TORCH_ROWS, TorchRows, add_gated, gate_grad

# Largest temporary block of ΔW, in elements. On CPU 2^21 (8 MiB in fp32): cache-sized blocks, little memory.
CHUNK_ELEMENTS = 1 << 21
# On a GPU 2^26 (128 MiB in bf16): a layer up to 4096 x 16384 is one block, so each of the three products with x is
# one cuBLAS GEMM. At 2^21 a 4096 x 14336 layer took 28 narrow products each, and backward summed 28 partial
# (N, d_in) products in fp32: 1.73x PEFT's HiRA at 16k tokens on an H200 (bench/results/gpu_check_before.json).
GPU_CHUNK_ELEMENTS = 1 << 26


def _block_rows(d_out: int, d_in: int, device: torch.device) -> int:
    """Output rows per block: `CHUNK_ELEMENTS // d_in` on CPU (`GPU_CHUNK_ELEMENTS // d_in` elsewhere), 1 to d_out."""
    limit = CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS
    return max(1, min(d_out, limit // max(d_in, 1)))


def _row_blocks(d_out: int, d_in: int, device: torch.device):
    """Slices of output rows, `_block_rows` rows each (the last may be shorter)."""
    rows = _block_rows(d_out, d_in, device)
    for start in range(0, d_out, rows):
        yield slice(start, min(start + rows, d_out))


class DenseWeight:
    """W0 as a dense (d_out, d_in) tensor; builds the row blocks of `ΔW = W0 ⊙ BA` and of `dΔW ⊙ W0` with PyTorch ops.

    The branch function reads W0 only through `delta` and `mask_`, so another source of W0 (the Triton chunk kernels
    in `kernels/hira_triton.py`, which read 4-bit bytes directly) plugs in with the same two methods and `shape`.
    """

    factor_scale = 1.0  # what the gradients of A and B take besides the branch scale (a folded source: its s)

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.shape = tuple(weight.shape)

    def _rows(self, rows: slice) -> torch.Tensor:
        """W0's block of `rows` (W0 itself for a block of all rows: no slice op to issue)."""
        return self.weight if rows.start == 0 and rows.stop == self.shape[0] else self.weight[rows]

    def delta(self, B_rows: torch.Tensor, A: torch.Tensor, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """`ΔW_b = W0_b ⊙ (B_b A)` (rows, d_in) in `dtype`, the dtype of the products with x.

        `B_b A` is formed in the factors' dtype (fp32 for PEFT's fp32 adapter weights; autocast's under autocast) and
        rounded once, so a bf16 / fp16 model run outside autocast (e.g. `generate()`) gets its W0-sized products in
        bf16 / fp16 (fp32 accumulation in cuBLAS / oneDNN), not in fp32.
        """
        return (B_rows @ A).mul_(self._rows(rows)).to(dtype)

    def mask_(self, grad: torch.Tensor, rows: slice) -> torch.Tensor:
        """`grad ⊙ W0_b` in place (grad: (rows, d_in), the gradient of ΔW_b): the gradient of `B_b A`."""
        return grad.mul_(self._rows(rows))


class FoldedWeight(DenseWeight):
    """W0 with an ungated HiRA update folded in, for `folded_hira`: `delta` builds `W0 ⊙ (1 + s·BA)` (the adapted
    weight `W0 + s·ΔW`) and `mask_` gives `W0 ⊙ grad`, with `factor_scale` s for the factors' gradients (applied last,
    as the branch scale is), so the branch function run with this source, no gate and scale 1 computes the base
    layer's product and the branch's as one."""

    def __init__(self, weight: torch.Tensor, scaling: float):
        super().__init__(weight)
        self.factor_scale = scaling  # s: the folded update's scale

    def delta(self, B_rows: torch.Tensor, A: torch.Tensor, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """`W0_b + s · W0_b ⊙ (B_b A)` (rows, d_in) in `dtype`: formed in the factors' dtype, rounded once."""
        weight, update = self._rows(rows), B_rows @ A
        return torch.addcmul(weight, weight, update, value=self.factor_scale, out=update).to(dtype)


def weight_source(weight) -> DenseWeight:
    """What `weight_fn()` returned, as a W0 source: a tensor is wrapped in `DenseWeight`; a source is kept."""
    return DenseWeight(weight) if isinstance(weight, torch.Tensor) else weight


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums over blocks are kept in fp32 when the operands are half precision."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def branch_update(x, A, B, weight, dtype: torch.dtype) -> torch.Tensor:
    """`x (W0 ⊙ BA)ᵀ` (N, d_out) in `dtype`, W0 read from `weight` (a W0 source), ΔW formed block by block."""
    d_out, d_in = weight.shape
    if _block_rows(d_out, d_in, x.device) == d_out:  # one block: ΔW whole
        return x @ weight.delta(B, A, slice(0, d_out), dtype).t()
    update = None  # (N, d_out), filled block by block
    for rows in _row_blocks(d_out, d_in, x.device):
        block = x @ weight.delta(B[rows], A, rows, dtype).t()  # x ΔW_bᵀ: (N, rows)
        if update is None:
            update = block.new_empty((x.shape[0], d_out))
        update[:, rows] = block
    return update


def branch_output(base, x, gate, A, B, weight, scaling, row_ops, autocast: dict) -> torch.Tensor:
    """`base + s · g ⊙ (x (W0 ⊙ BA)ᵀ)` (N, d_out), W0 read from `weight` (a tensor or a W0 source), the products in
    autocast's dtype where `autocast` (`autocast_state`) is on, else x's; shapes as `GatedHiraFunction.forward`."""
    weight = weight_source(weight)
    dtype = _product_dtype(x, autocast)
    d_out, d_in = weight.shape
    if gate is None and base is not None and not autocast["enabled"] and _block_rows(d_out, d_in, x.device) == d_out:
        delta_w = weight.delta(B, A, slice(0, d_out), dtype)  # (d_out, d_in)
        if base.dtype == torch.result_type(x, delta_w):
            return torch.addmm(base, x, delta_w.t(), alpha=scaling)  # the residual add rides on the GEMM
        update = x @ delta_w.t()
    else:
        update = branch_update(x, A, B, weight, dtype)
    return add_gated(base, update, gate, scaling, reuse_update=True, row_ops=row_ops)


class GatedHiraFunction(torch.autograd.Function):
    """Autograd function for `base + s · g ⊙ (x (W0 ⊙ BA)ᵀ)`; `g` and `base` may be `None`."""

    @staticmethod
    def forward(ctx, base, x, gate, A, B, weight_fn, scaling, row_ops=TORCH_ROWS):
        """base: (N, d_out) or None, x: (N, d_in), gate: (N, 1) or None, A: (r, d_in), B: (d_out, r),
        weight_fn() -> W0 (d_out, d_in), or a W0 source with `DenseWeight`'s methods; `row_ops`: what runs the gate's
        row operations (`TorchRows` or `kernels.rows.TritonRows`)."""
        out = GatedHiraFunction.branch_forward(ctx, base, x, gate, A, B, weight_fn(), scaling, row_ops)
        ctx.weight_fn, ctx.scaling = weight_fn, scaling  # backward rebuilds ΔW from the same W0
        return out

    @staticmethod
    def branch_forward(ctx, base, x, gate, A, B, weight, scaling, row_ops=TORCH_ROWS):
        """`base + s · g ⊙ (x (W0 ⊙ BA)ᵀ)` with W0 read from `weight` (a tensor or a W0 source), saving what
        backward needs except the W0 source and the scale that backward uses (`ctx.weight_fn`, `ctx.scaling`), which
        the caller sets. Under autocast A and B are cast to its dtype once here, and the casts saved
        (`autocast_factors`); `ctx.factor_dtypes` keeps their own dtypes, which their gradients take."""
        ctx.autocast = autocast_state(x.device.type)
        ctx.factor_dtypes = (A.dtype, B.dtype)
        A, B = autocast_factors(ctx.autocast, A, B)
        update = None
        if gate is not None and ctx.needs_input_grad[2] and not ctx.needs_input_grad[1]:
            # x needs no gradient (a first layer's q, k, v): backward would form `δ ΔW` for the gate's gradient
            # alone, a product of size N·d_in·d_out; the update `x ΔWᵀ` (N, d_out), kept, gives it by a row dot
            update = branch_update(x, A, B, weight_source(weight), _product_dtype(x, ctx.autocast))
            out = add_gated(base, update, gate, scaling, row_ops=row_ops)
        else:
            out = branch_output(base, x, gate, A, B, weight, scaling, row_ops, ctx.autocast)
        ctx.save_for_backward(x, gate, A, B, update)
        ctx.has_base = base is not None
        ctx.row_ops = row_ops
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return (*GatedHiraFunction.gradients(ctx, grad_out, weight_source(ctx.weight_fn())), None, None, None)

    @staticmethod
    def gradients(ctx, grad_out: torch.Tensor, weight) -> tuple:
        """(d base, dx, dg, dA, dB) from what forward saved, with W0 read from `weight` (a W0 source)."""
        x, gate, A, B, update = ctx.saved_tensors
        grad_base = grad_out if ctx.has_base and ctx.needs_input_grad[0] else None
        return (grad_base, *hira_grads(grad_out, x, gate, A, B, weight, ctx.scaling, ctx.autocast,
                                       ctx.needs_input_grad[1:5], ctx.row_ops, update, ctx.factor_dtypes))


def _product_dtype(x: torch.Tensor, autocast: dict) -> torch.dtype:
    """The dtype of the branch's products with x: autocast's when it is on, else x's."""
    return autocast["dtype"] if autocast["enabled"] else x.dtype


def hira_grads(grad_out, x, gate, A, B, weight, scaling, autocast, need, row_ops: TorchRows = TORCH_ROWS,
               update: Optional[torch.Tensor] = None, factor_dtypes: Optional[tuple] = None) -> tuple:
    """(dx, dg, dA, dB) of `s · g ⊙ (x (W0 ⊙ BA)ᵀ)`, None where `need` (4 flags) says not needed; `weight`: a W0
    source (`DenseWeight` or the Triton one); `row_ops`: what runs the gate's row operations; `update`: the forward's
    `x ΔWᵀ` (N, d_out) where it kept it (x needs no gradient), which gives `dg = s Σ_j δ ⊙ update` without `δ ΔW`;
    `factor_dtypes`: the dtypes of A's and B's parameters where A and B are the forward's autocast casts of them
    (default: A's and B's). The formulas are in this module's docstring."""
    need_x, need_gate, need_A, need_B = need
    s = scaling
    grad_x = grad_gate = grad_A = grad_B = None
    with torch.no_grad(), restore_autocast(autocast):
        go = grad_out.to(x.dtype)  # the branch ran in the adapter's dtype (a no-op unless the base differs)
        dtype = _product_dtype(go, autocast)
        d_out, d_in = weight.shape
        scaled = gate is not None or s != 1.0
        token_scale = (gate * s).to(x.dtype) if gate is not None else s  # (N, 1) or scalar
        # dΔW = s · (g ⊙ δ)ᵀ x = s · δᵀ (g ⊙ x): the gate goes on the narrower of δ (N × d_out) and x (N × d_in), the
        # scale s on dA and dB at the end, in their own dtype (s ≈ 1 / RMS(W0) ~ 100 would make the half-precision
        # products below s times larger than the gradients they give: fp16 overflowed at a loss scale s times lower)
        G = xs = None
        if need_A or need_B:
            G, xs = go, x
            if gate is not None and d_in < d_out:
                xs = row_ops.scale(x, gate.to(x.dtype))
            elif gate is not None:
                G = row_ops.scale(go, gate.to(go.dtype))
        A_dtype, B_dtype = factor_dtypes or (A.dtype, B.dtype)
        factor_dtype = A_dtype if A_dtype == B_dtype else torch.promote_types(B_dtype, A_dtype)  # (no dispatch)
        # the factors cast once, as autocast casts them for each product and slice (a no-op where they are the forward's
        # casts, as saved, or where autocast is off)
        A, B = autocast_factors(autocast, A, B)
        # dM's dtype: under autocast its products with A and B run in `dtype`, so it is rounded to `dtype` once, here
        # (the same values where W0 is half precision: W0 ⊙ (Gᵀx) is exact in fp32), not built in fp32 and cast back
        mask_dtype = dtype if autocast["enabled"] else factor_dtype
        P = None  # δ ΔW: (N, d_in)
        blocks = list(_row_blocks(d_out, d_in, x.device))
        one_block = len(blocks) == 1  # (a GPU layer up to 2^26 elements): dA and dB are each one product, no buffer
        if need_A and not one_block:
            grad_A = torch.zeros_like(A, dtype=_accumulator_dtype(factor_dtype))
        if need_B and not one_block:
            grad_B = torch.empty_like(B, dtype=factor_dtype)
        for rows in blocks:
            # (one block: the whole tensors, not a slice of all rows)
            B_rows, go_rows = (B, go) if one_block else (B[rows], go[:, rows])
            if need_x or (need_gate and update is None):
                part = go_rows @ weight.delta(B_rows, A, rows, dtype)  # (N, d_in)
                if P is None:  # a sum over blocks is kept in fp32; one block's product is used as it is
                    P = part if one_block else part.to(_accumulator_dtype(part.dtype))
                else:
                    P.add_(part)
                del part
            if G is not None:
                G_rows = G if one_block else G[:, rows]
                dM = weight.mask_((G_rows.t() @ xs).to(mask_dtype), rows)  # (rows, d_in)
                if need_B and one_block:
                    grad_B = dM @ A.t()
                elif need_B:
                    grad_B[rows] = dM @ A.t()
                if need_A and one_block:
                    grad_A = B.t() @ dM
                elif need_A:
                    grad_A.add_(B_rows.t() @ dM)
                del dM
        # dg = s Σ_i P ⊙ x (one row-wise dot product per token) and dx = P ⊙ (s·g), in place (P is this function's)
        if need_gate and need_x:
            dot = row_ops.scale_and_dot_(P, x, token_scale)
            grad_x = P.to(x.dtype)
        elif need_gate and update is not None:
            dot = torch.linalg.vecdot(update, go.to(update.dtype))
        elif need_gate:
            dot = torch.linalg.vecdot(P, x.to(P.dtype))
        elif need_x:
            grad_x = (P.mul_(token_scale) if scaled else P).to(x.dtype)
        if need_gate:
            grad_gate = gate_grad(dot.unsqueeze(1), s, gate)
        factor_scale = s * getattr(weight, "factor_scale", 1.0)  # (a folded W0 source's own s)
        if need_A:
            grad_A = _scaled(grad_A.to(A_dtype), factor_scale)
        if need_B:
            grad_B = _scaled(grad_B.to(B_dtype), factor_scale)
    return grad_x, grad_gate, grad_A, grad_B


def _scaled(grad: torch.Tensor, s: float) -> torch.Tensor:
    """`s · grad` (in place where grad is a new tensor of the factor's dtype)."""
    return grad if s == 1.0 else grad.mul_(s)


def gated_hira(
    x: torch.Tensor,
    gate: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    weight_fn: Callable[[], torch.Tensor],
    scaling: float = 1.0,
    base: Optional[torch.Tensor] = None,
    row_ops: TorchRows = TORCH_ROWS,
) -> torch.Tensor:
    """`base + s · g ⊙ (x (W0 ⊙ BA)ᵀ)` for x (..., d_in), gate (..., 1) or None, base (..., d_out) or None.

    `weight_fn` returns the frozen base weight `W0` (d_out × d_in); it is called again in backward, so it may
    dequantise or gather on demand. Passing the base layer's output as `base` lets the residual add share the GEMM
    (ungated) or one fused pass (gated); the result then has `base`'s dtype. `row_ops` runs the gate's passes over
    rows of activations (the gated add, the token scale of δ or x and of `δ ΔW`, and dg's dot product): PyTorch's
    ops (`TORCH_ROWS`), or the Triton kernels (`kernels.rows.TritonRows`).
    """
    function = GatedHiraFunction if records_graph(x, gate, A, B, base) else _GatedHiraOutput
    return apply_to_tokens(function, x, gate, base, A, B, weight_fn, scaling, row_ops)


class _GatedHiraOutput:
    """`GatedHiraFunction`'s forward without autograd's bookkeeping (a context, saved tensors, a graph node): what
    `gated_hira` runs where autograd records nothing (`no_grad`, `generate()`, adapters that do not train). Few
    tokens (a decoding step: `factored_pays`) get `factored_update`, which forms no ΔW; more get the function's own
    operations on the same tensors (`branch_output`)."""

    @staticmethod
    def apply(base, x, gate, A, B, weight_fn, scaling, row_ops=TORCH_ROWS):
        autocast, weight = autocast_state(x.device.type), weight_fn()
        if isinstance(weight, torch.Tensor) and factored_pays(x.shape[0], A.shape[0], weight.numel()):
            update = factored_update(x, A, B, weight, _product_dtype(x, autocast))
            return add_gated(base, update, gate, scaling, reuse_update=True, row_ops=row_ops)
        return branch_output(base, x, gate, A, B, weight, scaling, row_ops, autocast)


# `factored_update` costs N·r / (N + r) times the FLOPs of forming BA and the product x ΔWᵀ (less than 1 for one
# token), and reads W0 once where forming ΔW writes and reads d_out × d_in values three times more (BA in the factors'
# dtype, W0 ⊙ BA, its cast). It is taken up to a FLOP ratio that depends on the weight's size (d_out · d_in):
# (at least this many elements, at most this FLOP ratio), the largest first. bench/decode_branch.py, on this CPU:
# 1.2-5x faster at every taken point (256 x 256 to 4096 x 4096, r = 8 to 128); slower for 4 tokens at r = 128 (FLOP
# ratio 3.9: 1.3-1.5x) even at 4096 x 4096, for 4 tokens at r = 32 at 1024 x 1024 (1.12x), for 2 tokens below that
# (256 x 256, r = 128: 1.18x), and for any token count below 256 x 256 (128 x 128: 1.06-1.09x for one token), where
# the fixed cost of a small half-precision product with N·r rows outweighs the traffic it saves. A GPU, with more
# FLOPs per byte of memory traffic, should cross over later; not measured there (bench/gpu_check.py (e),
# `python bench/decode_branch.py --device cuda`).
FACTORED_LIMITS = ((1 << 20, 3.0), (1 << 16, 1.0))
_factoring = True


@contextlib.contextmanager
def without_factoring():
    """Inside this block every forward forms ΔW, as training does, also for a decoding step's few tokens: to compare
    the two (bench/inference.py, bench/gpu_check.py) or to rule the factored update out. One switch for the whole
    process (not per thread), like `layer.without_folding`."""
    global _factoring
    previous, _factoring = _factoring, False
    try:
        yield
    finally:
        _factoring = previous


def factored_pays(tokens: int, rank: int, weight_elements: int) -> bool:
    """Whether `factored_update` is taken for `tokens` rows at rank `rank` and a W0 of `weight_elements` elements
    (d_out · d_in), by `FACTORED_LIMITS`: one token on a weight that is not tiny, a few on a large one."""
    if not _factoring:
        return False
    flop_ratio = tokens * rank / (tokens + rank)
    for min_elements, max_flop_ratio in FACTORED_LIMITS:
        if weight_elements >= min_elements:
            return flop_ratio <= max_flop_ratio
    return False


def factored_update(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, weight: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """`x (W0 ⊙ BA)ᵀ` (N, d_out) in `dtype` without forming `ΔW = W0 ⊙ BA`: row n is `Σ_k B_k ⊙ W0 (A_k ⊙ x_n)`, one
    product of W0 with the N·r rows `A_k ⊙ x_n` (in `dtype`, as `branch_output`'s products), then the sum over k in
    B's precision (fp32 for PEFT's fp32 factors: rounded to `dtype` once; half factors round each term first). Four operations, as many as forming ΔW and its
    product. x: (N, d_in), A: (r, d_in), B: (d_out, r), weight: W0 (d_out, d_in)."""
    tokens, d_in = x.shape
    rank = A.shape[0]
    rows = torch.mul(x.unsqueeze(1), A, out=x.new_empty((tokens, rank, d_in), dtype=dtype))  # A_k ⊙ x_n, rounded once
    products = rows.view(tokens * rank, d_in) @ weight.to(dtype).t()  # W0 (A_k ⊙ x_n): (N·r, d_out)
    # Σ_k B_k ⊙ ·: (N, d_out) summed in B's promoted precision, then rounded (a half `out=` would round each term)
    return (products.view(tokens, rank, -1) * B.t()).sum(1).to(dtype)


class FoldedHiraFunction(GatedHiraFunction):
    """Autograd function for `x (W0 + s·ΔW)ᵀ + b`: an ungated HiRA adapter and its base layer as one linear map.

    Backward always folds: `dx = δ W` with the adapted weight `W = W0 ⊙ (1 + s·BA)` rebuilt from `W0`, `A`, `B`
    (`FoldedWeight`), and `dΔW = δᵀ x`: two products of size N·d_in·d_out, where the base layer and the branch apart
    take three (`δ W0`, `δ ΔW`, `δᵀ x`). Forward folds too where `forward_weight` is None (one product, `x Wᵀ`), or
    adds the branch's product to the base layer's output computed outside (`folded_hira`: two products, which
    half-precision products need)."""

    @staticmethod
    def forward(ctx, base, x, gate, A, B, weight_fn, scaling, forward_weight):
        """base: where forward folds, the bias (d_out,) in the products' dtype, or None; else the base layer's output
        (N, d_out) computed without x's gradient, and `forward_weight` the W0 (d_out, d_in) it used, which builds ΔW
        here (read once per forward). x: (N, d_in), gate: None, A: (r, d_in), B: (d_out, r), weight_fn() -> W0."""
        def folded():
            return FoldedWeight(weight_fn(), scaling)

        if forward_weight is None:
            out = GatedHiraFunction.branch_forward(ctx, base, x, None, A, B, folded(), 1.0)
        else:
            out = GatedHiraFunction.branch_forward(ctx, base, x, None, A, B, forward_weight, scaling)
        ctx.weight_fn, ctx.scaling = folded, 1.0  # backward: dx = δ (W0 + s·ΔW), which includes the base's part
        return out


def folded_hira(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, weight_fn: Callable[[], torch.Tensor],
                scaling: float, bias: Optional[torch.Tensor] = None, fold_forward: bool = True) -> torch.Tensor:
    """`x (W0 + s · W0 ⊙ BA)ᵀ + bias` for x (..., d_in): an ungated HiRA adapter and its base layer as one linear map.

    The base layer and the ungated branch take five products of size N·d_in·d_out per training step (each one's
    forward and input gradient, and the branch's `dΔW`). Folded, they take three (`x Wᵀ`, `δ W` and `δᵀ x`), with
    the adapted weight `W` rebuilt in backward from `W0`, `A` and `B` like the branch's `ΔW`. `bias` (d_out,) or None
    is added in the products' dtype (autocast's when it is on, else x's), as the base layer adds it.

    `fold_forward=False` keeps the forward's two products apart and folds backward only: four products. The base
    product is `F.linear(x, W0, bias)` on x as given (outside autocast W0 and bias cast to x's dtype, as bitsandbytes'
    4-bit forward casts them; under it, autocast's casts), with x detached: backward's `δ W` carries its input
    gradient, autograd the bias's. In bf16 / fp16, `W` rounded to the products' dtype is `W0` itself wherever
    `|s·BA|` is below half the grid's spacing (2^-9 in bf16), so a folded forward would not show the small updates of
    the first steps; in the input gradient that rounding is an error of the size of the product's own output rounding
    (tests/test_fold.py).
    """
    autocast = autocast_state(x.device.type)
    if fold_forward:
        if bias is not None:
            bias = bias.to(_product_dtype(x, autocast))
        return apply_to_tokens(FoldedHiraFunction, x, None, bias, A, B, weight_fn, scaling, None)
    weight = weight_fn()
    base_weight, base_bias = weight, bias
    if not autocast["enabled"]:  # (under autocast, F.linear casts them as in the base layer)
        base_weight, base_bias = weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None
    base = torch.nn.functional.linear(x.detach(), base_weight, base_bias)
    return apply_to_tokens(FoldedHiraFunction, x, None, base, A, B, weight_fn, scaling, weight)
