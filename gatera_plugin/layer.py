"""GateRA tuner layers: `y = base(x) + Σ_adapters s · g(x) ⊙ Δy(dropout(x))`.

`GateRALayer` follows PEFT's contract (see `peft.tuners.hira.layer`): adapter tensors live in dicts keyed by adapter
name, everything under the layer except `base_layer` is adapter state, and `update_layer` adds one adapter. `Linear`
wraps `nn.Linear` and transformers' `Conv1D` (GPT-2 style, weight stored transposed); `bnb.py` adds bitsandbytes'
quantised linears by overriding `base_weight`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .branches import BRANCH_FUNCTIONS, delta_weight
from .config import GateRAConfig
from .gates import make_token_gate
from .penalty import GateStats, PenaltyRun, entropy_tap

SUPPORTED_LAYERS = "`torch.nn.Linear`, `transformers.pytorch_utils.Conv1D`, `bitsandbytes.nn.Linear4bit`, `bitsandbytes.nn.Linear8bitLt`"


class GateRALayer(BaseTunerLayer):
    # Trainable, saved per-adapter state.
    adapter_layer_names: tuple[str, ...] = ("gatera_A", "gatera_B", "gatera_gate")
    # Other per-adapter state (plain dicts / dropout modules keyed by adapter name).
    other_param_names: tuple[str, ...] = ("r", "scaling", "branch_kind", "gate_kind", "entropy_weight", "gatera_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.branch_kind: dict[str, str] = {}
        self.gate_kind: dict[str, str] = {}
        self.entropy_weight: dict[str, float] = {}
        self.gatera_dropout = nn.ModuleDict({})
        self.gatera_A = nn.ParameterDict({})  # (r, d_in)
        self.gatera_B = nn.ParameterDict({})  # (d_out, r)
        self.gatera_gate = nn.ModuleDict({})  # token gate modules, absent for gate="none"
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.cast_input_dtype_enabled = True
        self.kwargs = kwargs
        # Not adapter state (plain attributes, never saved): statistics and the model-wide penalty context.
        self.gate_stats: dict[str, GateStats] = {}
        self.penalty_run: Optional[PenaltyRun] = None
        self._weight_before_merge: Optional[torch.Tensor] = None

        base = self.get_base_layer()
        if isinstance(base, Conv1D):
            shape = base.weight.ds_shape if hasattr(base.weight, "ds_shape") else base.weight.shape
            self.in_features, self.out_features = shape
            self.weight_is_transposed = True
        elif isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.weight_is_transposed = False
        else:
            raise TypeError(f"GateRA cannot adapt {type(base).__name__}; supported layers: {SUPPORTED_LAYERS}.")

    # ----------------------------------------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str, r: int, lora_alpha: Optional[float], config: GateRAConfig) -> None:
        """Add adapter `adapter_name` with rank `r` (and `lora_alpha` for the LoRA branch) to this layer."""
        if r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {r} for adapter {adapter_name!r}.")
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling_for(r, lora_alpha)
        self.branch_kind[adapter_name] = config.branch
        self.gate_kind[adapter_name] = config.gate
        self.entropy_weight[adapter_name] = float(config.entropy_weight)
        self.gatera_dropout[adapter_name] = nn.Dropout(p=config.dropout) if config.dropout > 0 else nn.Identity()
        self.gatera_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.gatera_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        gate = make_token_gate(config.gate, self.in_features, config)
        if gate is not None:
            self.gatera_gate[adapter_name] = gate
        self.gate_stats[adapter_name] = GateStats()
        self.reset_gatera_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def reset_gatera_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """HiRA's init: `A` Kaiming-uniform (a=√5), `B = 0`, gate weight 0; `init_weights=False` randomises B and w."""
        A, B = self.gatera_A[adapter_name], self.gatera_B[adapter_name]
        if A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(B)
        else:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        if adapter_name in self.gatera_gate:
            self.gatera_gate[adapter_name].reset_parameters(random=not init_weights)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.gate_stats.pop(adapter_name, None)

    # ----------------------------------------------------------------------------------------------- weights
    def base_weight(self) -> torch.Tensor:
        """The frozen base weight `W0` as (d_out, d_in) in its stored dtype (a view, no copy, for dense layers)."""
        weight = self.get_base_layer().weight
        return weight.t() if self.weight_is_transposed else weight

    def _check_base_frozen(self) -> None:
        if self.get_base_layer().weight.requires_grad:
            raise RuntimeError(
                "GateRA's HiRA branch treats the base weight as frozen, but "
                f"{type(self.get_base_layer()).__name__}.weight has requires_grad=True. Freeze it "
                "(`weight.requires_grad_(False)`) or use branch='lora'."
            )

    # ----------------------------------------------------------------------------------------------- forward
    def _add_adapter_update(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result + s · g(x) ⊙ Δy(dropout(x))` for one adapter; x (..., d_in), result (..., d_out)."""
        A = self.gatera_A[adapter_name]
        x = self._cast_input_dtype(x, A.dtype)
        gate = None
        if adapter_name in self.gatera_gate:
            gate = self.gatera_gate[adapter_name](x)  # (..., 1)
            if self.training and gate.requires_grad and self.penalty_run is not None:
                gate = self._tap_gate(adapter_name, x, gate)
        if self.branch_kind[adapter_name] == "hira" and self.training:
            self._check_base_frozen()
        x = self.gatera_dropout[adapter_name](x)
        return BRANCH_FUNCTIONS[self.branch_kind[adapter_name]](self, adapter_name, x, gate, result)

    def _tap_gate(self, adapter_name: str, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Route the gate through the entropy tap: its backward adds the penalty gradient and records statistics."""
        run = self.penalty_run
        mask = run.token_mask(x)
        scale = run.entropy_scale(adapter_name, self.entropy_weight[adapter_name])
        flat = entropy_tap(gate.reshape(-1, 1), mask, scale, self.gate_stats[adapter_name])
        return flat.reshape(gate.shape)

    # ----------------------------------------------------------------------------------------------- merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Additive update of an ungated adapter in the base weight's layout: `W' = W + get_delta_weight(...)`."""
        if self.gate_kind[adapter_name] != "none":
            raise ValueError(_unmergeable_message(adapter_name, self.gate_kind[adapter_name]))
        base = self.base_weight()
        delta = delta_weight(
            self.branch_kind[adapter_name],
            base,
            self.gatera_A[adapter_name],
            self.gatera_B[adapter_name],
            self.scaling[adapter_name],
        ).to(base.dtype)
        return delta.t() if self.weight_is_transposed else delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold ungated adapters into the base weight; gated adapters are refused (no single merged weight)."""
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.gatera_A]
        for name in adapter_names:
            if self.gate_kind[name] != "none":
                raise ValueError(_unmergeable_message(name, self.gate_kind[name]))
        if not adapter_names:
            return
        weight = self.get_base_layer().weight
        if self._weight_before_merge is None:
            # HiRA's update depends on W0, so unmerge restores the original weight instead of subtracting.
            self._weight_before_merge = weight.data.detach().clone()
        merged = weight.data.clone()
        for name in adapter_names:
            merged += self.get_delta_weight(name)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaN or inf in the merged weight: adapter(s) {adapter_names} seem to be broken.")
        weight.data.copy_(merged)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.get_base_layer().weight.data.copy_(self._weight_before_merge)
        self._weight_before_merge = None
        self.merged_adapters.clear()


def _unmergeable_message(adapter_name: str, gate_kind: str) -> str:
    return (
        f"Cannot merge GateRA adapter {adapter_name!r}: it has a per-token gate (gate={gate_kind!r}), so its update "
        "depends on each token and no single merged weight exists (SPEC.md section 1). Keep the adapter unmerged "
        "(load it with PeftModel.from_pretrained for inference), or train with gate='none' for a mergeable adapter."
    )


class Linear(nn.Module, GateRALayer):
    """GateRA on `nn.Linear` or transformers' `Conv1D` (whose weight is stored as (d_in, d_out))."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: GateRAConfig, r: int, lora_alpha=None, **kwargs
    ) -> None:
        super().__init__()
        GateRALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError(
                "GateRA does not support mixed-adapter batches (`adapter_names=`). Use `set_adapter` to switch adapters."
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name in self.active_adapters:
            if adapter_name in self.gatera_A:
                result = self._add_adapter_update(adapter_name, x, result)
        return result

    def __repr__(self) -> str:
        return "gatera." + super().__repr__()


def dispatch_default(target: nn.Module, adapter_name: str, config: GateRAConfig, **kwargs) -> Optional[nn.Module]:
    """Wrap a dense `nn.Linear` / `Conv1D`; None for anything else (quantised subclasses have their own dispatch)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, (nn.Linear, Conv1D)):
        return None
    weight = getattr(base, "weight", None)
    if not (isinstance(weight, torch.Tensor) and type(weight) in (nn.Parameter, torch.Tensor) and weight.is_floating_point()):
        return None  # e.g. a quantised nn.Linear subclass of a backend GateRA does not know
    return Linear(target, adapter_name, config=config, **kwargs)
