"""Launch configuration of the branch kernels (`hira_triton`, `lora_triton`): tile sizes per kernel, compute dtype,
rank and the device's shared memory, with the bound on the shared memory they take (tests/test_kernel_compile.py
checks it against the compiled kernels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ..ops._autocast import HALF_DTYPES
from . import KernelUnsupported, device_smem


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
            "hira_delta": (BN * BK + rank_tiles, rank_tiles + BN * BK),
            "hira_mask": (2 * BN * BK, 0),
            "lora_fwd": ((BM + BN) * RB, (BM + BN) * RB + BM * BN),
            "lora_bwd_db": (BM * BN + BM * RB, BM * BN + BM * RB + BN * RB),
        }[kernel]
        return itemsize * self.num_stages * loads + 4 * dots


# The rank is walked in chunks of RB (16 for r <= 16, else 32), so no tile grows with r: r = 512 needs the shared
# memory of r = 32. Candidates, largest first; the first whose bound fits the device's shared memory is launched.
_CANDIDATES = {  # kernel -> [(blocks for 2-byte dtypes, blocks for fp32)]; BM is unused by the HiRA chunk kernels
    "hira_delta": [((0, 64, 64, 2), (0, 32, 32, 2)), ((0, 32, 32, 2), (0, 32, 32, 1))],
    "hira_mask": [((0, 32, 64, 1), (0, 32, 64, 1))],
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
        BM, BN, BK, stages = half if dtype in HALF_DTYPES else single
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


def shrink(size: int, block: int) -> int:
    """A block no larger than needed for `size` (small inputs), at least 16 (tl.dot's minimum)."""
    return max(16, min(block, triton.next_power_of_2(size)))
