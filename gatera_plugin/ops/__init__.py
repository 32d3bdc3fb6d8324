"""Exact PyTorch implementations of the gated branches, as memory-lean `autograd.Function`s."""

from .hira import GatedHiraFunction, folded_hira, gated_hira
from .lora import GatedLoraFunction, gated_lora

__all__ = ["GatedHiraFunction", "GatedLoraFunction", "folded_hira", "gated_hira", "gated_lora"]
