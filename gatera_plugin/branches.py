"""Branch kinds: how a GateRA layer adds its (gated, scaled) update `s · g ⊙ Δy(x)` to the output so far.

Each kind is one `Branch` (in `BRANCH_KINDS`, by name) that holds what the layer needs to know of it: its update,
its merged weight update, the dtype its input is computed in, whether it needs the base weight frozen and whether it
learns a magnitude. (HiRA-only options, `hira_scaling` and `cache_delta`, are checked by `GateRAConfig`.)

The update is a function `(layer, adapter_name, x, gate, result, base_out) -> result + s · g ⊙ Δy(x)`: `x` is the
(dropped-out) branch input (..., d_in), `gate` the multiplier per token (..., 1) or None, `result` the output so far
(..., d_out), or None to return the update alone, and `base_out` the base layer's own output. The gate is passed in,
not applied after, so that a branch can form the gate's gradient without storing its own output, and the residual
add happens inside the same fused operation (see `ops/`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .kernels import rows_for, run_branch
from .ops import folded_hira, gated_channel_scale, gated_hira, gated_lora
from .ops._autocast import HALF_DTYPES
from .ops.rows import add_gated


def hira_branch(layer, adapter_name, x, gate, result, base_out=None):
    """HiRA: `Δy = (W0 ⊙ BA) x`; W0 is re-read (and dequantised) in backward instead of kept."""
    A, B, s = layer.gatera_A[adapter_name], layer.gatera_B[adapter_name], layer.branch_scale(adapter_name)
    row_ops = rows_for(layer.options[adapter_name].kernel, x)

    def run_triton(on_failure):
        from .kernels.hira_triton import triton_gated_hira

        return triton_gated_hira(x, gate, A, B, layer.kernel_weight, s, base=result, on_failure=on_failure,
                                 row_ops=row_ops)

    return run_branch(layer, adapter_name, "hira", x, lambda: gated_hira(x, gate, A, B, layer.base_weight, s,
                                                                         base=result, row_ops=row_ops), run_triton)


def lora_branch(layer, adapter_name, x, gate, result, base_out=None):
    """LoRA: `Δy = (lora_alpha / r) · BA x`."""
    A, B, s = layer.gatera_A[adapter_name], layer.gatera_B[adapter_name], layer.branch_scale(adapter_name)

    def run_triton(on_failure):
        from .kernels.lora_triton import triton_gated_lora

        return triton_gated_lora(x, gate, A, B, s, base=result, on_failure=on_failure)

    return run_branch(layer, adapter_name, "lora", x, lambda: gated_lora(x, gate, A, B, s, base=result), run_triton)


# Largest fp32 block of `W0 + s·BA` that `dora_weight_norm` forms at once, in elements (64 MiB): a 4096 x 4096 layer
# is one block, a 14336 x 4096 one four. Formed whole, three d_out x d_in fp32 temporaries were alive at once (W0's
# fp32 copy, s·BA and their sum: 705 MB at 14336 x 4096, in every DoRA layer's forward, on top of a 4-bit base's
# dequantised W0).
NORM_BLOCK_ELEMENTS = 1 << 24


def dora_weight_norm(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """`‖W0 + s·BA‖` per output row (d_out,), fp32, detached (DoRA section 4.3, as PEFT). Formed a block of rows at a
    time, one fp32 temporary of at most `NORM_BLOCK_ELEMENTS` (each row's norm is its own: the blocks change nothing)."""
    d_out, d_in = W0.shape
    rows = max(1, min(d_out, NORM_BLOCK_ELEMENTS // max(d_in, 1)))
    with torch.no_grad():
        A, B = A.float(), B.float()
        norm = torch.empty(d_out, dtype=torch.float32, device=W0.device)
        for start in range(0, d_out, rows):
            block = slice(start, start + rows)
            weight = W0[block].to(torch.float32, copy=True).addmm_(B[block], A, alpha=scaling)  # W0 + s·BA, rows
            norm[block] = torch.linalg.norm(weight, dim=1)
        return norm


def dora_branch(layer, adapter_name, x, gate, result, base_out):
    """DoRA: `Δy = DoRA(x) − base(x) = (c − 1) ⊙ W0 x + c ⊙ s·BA x`, `c = m / ‖W0 + sBA‖` (PEFT's formula).

    A gated channel scale of `W0 x` plus a gated LoRA with B's rows scaled by c (`ops.dora`); `W0 x` is the base
    output minus bias, or recomputed from the dropped-out input when dropout is active. The weight norm (a d_out × d_in
    computation) is detached and not kept (DoRA section 4.3, as PEFT).
    """
    A, B = layer.gatera_A[adapter_name], layer.gatera_B[adapter_name]
    magnitude = layer.gatera_magnitude[adapter_name]  # (d_out,)
    s = layer.branch_scale(adapter_name)
    W0 = layer.base_weight()
    scale = magnitude / dora_weight_norm(W0, A, B, s).to(magnitude.dtype)  # c (d_out,)
    dropout_active = layer.training and not isinstance(layer.gatera_dropout[adapter_name], torch.nn.Identity)
    if dropout_active:
        base_wx = F.linear(x, W0.to(x.dtype))
    else:
        bias = layer.get_base_layer().bias
        base_wx = base_out - bias if bias is not None else base_out
    B_scaled = B * scale.unsqueeze(1).to(B.dtype)  # c ⊙ B (d_out, r)
    # a bf16 / fp16 output of an fp32 update (PEFT's fp32 magnitude): the two terms are summed in fp32 and added to
    # the output with one rounding, as PEFT's DoRA does, not rounded into it one term at a time
    add_after = result is not None and result.dtype != torch.promote_types(base_wx.dtype, scale.dtype)
    so_far = gated_channel_scale(base_wx, gate, scale - 1, base=None if add_after else result)
    out = gated_lora(x, gate, A, B_scaled, s, base=so_far)
    return add_gated(result, out, None, 1.0, reuse_update=True) if add_after else out  # (out: fresh, saved by no backward)


def hira_delta(W0, A, B, scaling, magnitude=None) -> torch.Tensor:
    """`s · W0 ⊙ BA` (d_out × d_in, fp32; one d_out × d_in temporary, W0 is not copied to fp32)."""
    return (B.float() @ A.float()).mul_(W0).mul_(scaling)


def lora_delta(W0, A, B, scaling, magnitude=None) -> torch.Tensor:
    """`s · BA` (d_out × d_in, fp32)."""
    return scaling * (B.float() @ A.float())


def dora_delta(W0, A, B, scaling, magnitude=None) -> torch.Tensor:
    """`m / ‖W0 + s·BA‖ ⊙ (W0 + s·BA) − W0` (d_out × d_in, fp32)."""
    norm = dora_weight_norm(W0, A, B, scaling)
    return (magnitude.float() / norm).unsqueeze(1) * (W0.float() + scaling * (B.float() @ A.float())) - W0.float()


@dataclass(frozen=True)
class Branch:
    """One branch kind.

    `update`: the gated update (see the module docstring). `delta`: `(W0, A, B, scaling, magnitude)` -> the additive
    weight update of an ungated adapter (d_out × d_in, fp32), `W' = W0 + delta`. `keeps_half_input`: the update's
    products with x are as large as the base layer's own (HiRA's `W0 ⊙ BA`), so a bf16 / fp16 input keeps its dtype
    (see `input_dtype`); `keeps_half_input_in_autocast`: it does so under autocast (which runs the products in its own
    dtype whatever x's), so that the branch's function saves x as it came, not a copy in the adapter's dtype.
    `needs_frozen_base`: the update reads W0 in a custom backward that gives W0 no gradient.
    `learns_magnitude`: the adapter has a magnitude vector (d_out,), `gatera_magnitude` (DoRA). `folded`: the layer's
    output with an ungated adapter folded into the base layer's product, `(x, A, B, weight_fn, scaling, bias,
    fold_forward)` -> (N, d_out) (`ops.hira.folded_hira`), or None where the kind does not fold
    (`GateRALayer._folded_forward` decides where it may)."""

    update: Callable
    delta: Callable
    keeps_half_input: bool = False
    keeps_half_input_in_autocast: bool = False
    needs_frozen_base: bool = False
    learns_magnitude: bool = False
    folded: Optional[Callable] = None

    def input_dtype(self, x: torch.Tensor, adapter_dtype: torch.dtype) -> torch.dtype:
        """The dtype the layer input is cast to before the gate and the branch (PEFT casts it to the adapter's).

        For HiRA a bf16 / fp16 input keeps its dtype: outside autocast (e.g. `generate()` on a bf16 model, whose PEFT
        adapter weights are fp32) the branch then runs its W0-sized products in bf16 / fp16 with fp32 accumulation,
        like the base layer and like bf16 autocast, instead of in fp32 (about 15x slower on an H100). `BA` is still
        formed in the adapter's dtype and rounded once, and A, B and their gradients stay fp32. LoRA and DoRA keep
        PEFT's cast outside autocast (their adapter products are rank-r sized). Under autocast they keep the input's
        dtype too: autocast runs their products in autocast's dtype either way, and the cast's fp32 copy of x (N, d_in)
        is what their function would save for backward, twice the memory of the bf16 input that PEFT's LoRA, whose
        linear layers save autocast's casts, keeps.
        """
        if x.dtype in HALF_DTYPES and (self.keeps_half_input or (
                self.keeps_half_input_in_autocast and torch.is_autocast_enabled(x.device.type))):
            return x.dtype
        return adapter_dtype


BRANCH_KINDS: dict[str, Branch] = {
    "hira": Branch(hira_branch, hira_delta, keeps_half_input=True, needs_frozen_base=True, folded=folded_hira),
    "lora": Branch(lora_branch, lora_delta, keeps_half_input_in_autocast=True),
    "dora": Branch(dora_branch, dora_delta, keeps_half_input_in_autocast=True, learns_magnitude=True),
}


def delta_weight(
    kind: str, W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
    magnitude: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Additive weight update (d_out × d_in, fp32) of an ungated branch of `kind`: `W' = W0 + delta_weight`."""
    return BRANCH_KINDS[kind].delta(W0, A, B, scaling, magnitude)
