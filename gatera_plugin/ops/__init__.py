"""Exact PyTorch implementations of the gated branches, as memory-lean `autograd.Function`s."""

from .dora import GatedChannelScaleFunction, gated_channel_scale
from .hira import GatedHiraFunction, folded_hira, gated_hira
from .lora import GatedLoraFunction, gated_lora

__all__ = ["GatedChannelScaleFunction", "GatedHiraFunction", "GatedLoraFunction", "folded_hira", "gated_channel_scale",
           "gated_hira", "gated_lora"]
