"""Exact PyTorch implementations of the gated branches, as memory-lean `autograd.Function`s."""

from .hira import GatedHiraFunction, gated_hira
from .lora import GatedLoraFunction, gated_lora

__all__ = ["GatedHiraFunction", "GatedLoraFunction", "gated_hira", "gated_lora"]
