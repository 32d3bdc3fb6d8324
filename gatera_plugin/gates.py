"""Gate kinds. Each is an `nn.Module` stored per adapter: token gates in `GateRALayer.gatera_gate`, structure gates
in `GateRALayer.gatera_structure`.

A token gate gives one multiplier per token (..., 1) that scales the branch output: `SigmoidGate` reads the layer
input before the branch runs; `ThresholdGate` reads the branch's output and the base output after it (TS-PEFT).
`gate="none"` stores no module. A structure gate is one multiplier per module, `σ(α)`, composed with any token gate.

Each class also holds what the layer and the logs need to know of its kind: `stats_kind` (the key under which its
statistics are recorded), `per_token` (one value per token, or one per module), `penalty(config)` (the penalty's
weight and per-value gradient for its tap), `log_entries` (what its statistics and penalty are called in the logs,
from the per-layer means that `GateStats` records: (layers, 4) = mean value, mean H/log 2, fraction open, and the
micro-batches' token-weighted mean of their squared mean value) and
`reads_branch_output` (whether it runs after the branch: only TS-PEFT's threshold); `Gate.trains()` and
`Gate.penalty_trains()` they share.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .ops._autocast import autocast_off
from .penalty import constant_term_grad, entropy_term_grad, keep_ratio_term_grad


class Gate(nn.Module):
    """What every gate kind shares."""

    reads_branch_output = False

    def trains(self) -> bool:
        """Whether any of its parameters is trained (requires grad)."""
        return any(param.requires_grad for param in self._parameters.values())  # (its own: a gate has no children)

    def penalty_trains(self, factors_train: bool) -> bool:
        """Whether the penalty on this gate trains anything of its adapter: its own parameters, or, for a gate that
        reads the branch's output (TS-PEFT's threshold), the branch's factors through it (`factors_train`). A frozen
        gate is not penalised."""
        return self.trains() or (self.reads_branch_output and factors_train)


class SigmoidGate(Gate):
    """GateRA's gate `g(x) = σ(w·x + b)`: (..., d_in) → (..., 1); `d_in + 1` parameters.

    `weight` (1, d_in) starts at 0 and `bias` (1,) at `bias_init`, so every token starts with `g = σ(bias_init)`.
    """

    stats_kind = "sigmoid"
    per_token = True

    def __init__(self, in_features: int, bias_init: float = 0.0):
        super().__init__()
        self.bias_init = bias_init
        self.weight = nn.Parameter(torch.zeros(1, in_features))
        self.bias = nn.Parameter(torch.full((1,), float(bias_init)))
        self.passed_input = None  # (x passed on by forward(x, pass_input=True), until the layer takes it)

    @classmethod
    def from_config(cls, in_features: int, config) -> SigmoidGate:
        """The gate of a layer with `in_features` inputs, from a `GateRAConfig`."""
        return cls(in_features, bias_init=config.gate_bias_init)

    def reset_parameters(self, random: bool = False) -> None:
        """Zero weight (default), or a random one (`random=True`, for tests), and the configured bias."""
        with torch.no_grad():
            if random:
                nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.weight.shape[1]))
            else:
                self.weight.zero_()
            self.bias.fill_(self.bias_init)

    def initial_level(self) -> float:
        """The gate's value at step 0, for every token: `σ(bias_init)`."""
        return 1.0 / (1.0 + math.exp(-self.bias_init))

    def forward(self, x: torch.Tensor, pass_input: bool = False) -> torch.Tensor:
        """`g(x)` (..., 1) in fp32 (which the branch takes as it is: its gradient is formed in fp32). With
        `pass_input=True` (the layer's call), where x (N, d_in) needs a gradient on a device of
        `PASS_INPUT_DEVICE_TYPES`, it also leaves in `passed_input` x passed on by `_LogitsAndInput`, for the branch
        to read, so that x's gradients from the gate and from the branch add in one pass; the layer takes it right
        after the call (`take_passed_input`).
        (An attribute, not a second output or an argument to fill: forward hooks that record the gate's output, and
        hooks that rebuild a module's arguments, as DeepSpeed ZeRO-3's do, see the gate alone.)"""
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if (pass_input and torch.is_grad_enabled() and x.requires_grad and x.dim() == 2
                and x.device.type in PASS_INPUT_DEVICE_TYPES):
            self.passed_input, logits = _LogitsAndInput.apply(x, weight, bias)
        else:
            logits = F.linear(x, weight, bias)
        # σ in fp32 (N values), which the penalty tap and the branch read as it is: σ's backward and the
        # tap (entropy and its gradient) read the fp32 g, exact where a half-precision g is coarse near 1 (bf16: 2^-8
        # apart) or is 1 exactly (a logit above ~6), which made the gate's gradient up to 8% off per token, or 0
        return torch.sigmoid(logits.float())

    def take_passed_input(self, x: torch.Tensor) -> torch.Tensor:
        """The x for the branch to read after `forward(x, pass_input=True)`: the x it passed on, which the gate then
        drops, or x itself where it passed none (no gradient: decoding pays no module attribute writes)."""
        passed = self.passed_input
        if passed is None:
            return x
        self.passed_input = None
        return passed

    @staticmethod
    def penalty(config) -> tuple[float, Callable]:
        """(weight, gradient of the penalty's summand per value): λ · H(g)/log 2 per token."""
        return config.entropy_weight, entropy_term_grad

    @staticmethod
    def log_entries(means: torch.Tensor, config) -> tuple[dict[str, torch.Tensor], dict[str, float], bool]:
        """(statistics per layer by name, penalties by name, whether to log per layer always) from `means`."""
        stats = {"gate_mean": means[:, 0], "entropy": means[:, 1], "gate_open_frac": means[:, 2]}
        return stats, {"penalty": config.entropy_weight * means[:, 1].mean().item()}, False

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, bias_init={self.bias_init}"


# The device types where the sigmoid gate passes x on through `_LogitsAndInput`. Its in-place add saves two
# activation-sized passes per layer and step; its Python backward costs more host time than `F.linear`'s C++ one (on
# this project's CPU 27-62 µs per layer and step, bench/gate_node.py). Measured on CPU only: on a GPU a small model's
# step is host-bound and would pay the host time, a large one's would gain the passes; until `bench/gpu_check.py`
# measures it (its "gatera-pass-input" row), a GPU keeps `F.linear`.
PASS_INPUT_DEVICE_TYPES = {"cpu"}


@contextlib.contextmanager
def passing_input_on(*device_types: str):
    """Inside this block the sigmoid gate passes x on through `_LogitsAndInput` on exactly `device_types` (none:
    nowhere), to compare the two paths on a device. With gradient checkpointing put the backward inside it too (the
    recomputed forward must take the same path). One switch for the whole process (not per thread), like
    `layer.without_folding`."""
    previous = set(PASS_INPUT_DEVICE_TYPES)
    PASS_INPUT_DEVICE_TYPES.clear()
    PASS_INPUT_DEVICE_TYPES.update(device_types)
    try:
        yield
    finally:
        PASS_INPUT_DEVICE_TYPES.clear()
        PASS_INPUT_DEVICE_TYPES.update(previous)


class _LogitsAndInput(torch.autograd.Function):
    """`(x, x wᵀ + b)`: x passed on (a view, for the branch to read) and the gate's logits (N, 1), as one node.

    With the logits apart (`F.linear`), autograd forms the logits' input gradient `dz w` as a new (N, d_in) tensor and
    adds it to the branch's dx as another. Here the branch's dx arrives as the gradient of the x passed on, and
    backward adds `dz w` to it in place (`addmm_`, one pass): two fewer activation-sized tensors per layer and step.
    Only the layer's branch reads the x passed on, so its gradient is a tensor of the branch's own.
    x: (N, d_in), weight: (1, d_in), bias: (1,), in x's dtype (the layer casts them as for `F.linear`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)
        return x.view_as(x), F.linear(x, weight, bias)  # (autocast, where on, casts inside F.linear as it would)

    @staticmethod
    def backward(ctx, grad_x, grad_logits):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        if grad_logits is None:
            return grad_x if need_x else None, None, None
        with autocast_off(x.device.type):
            dz = grad_logits.to(x.dtype)  # (N, 1)
            if need_x and grad_x is not None and grad_x.dtype == x.dtype and grad_x.is_contiguous():
                grad_x = grad_x.addmm_(dz, weight)  # (the branch's own dx: written in place)
            elif need_x and grad_x is not None:
                grad_x = grad_x + dz @ weight
            elif need_x:
                grad_x = dz @ weight
            grad_weight = dz.t() @ x if need_weight else None  # (1, d_in)
            grad_bias = dz.sum(0) if need_bias else None  # (1,)
        return grad_x, grad_weight, grad_bias


# τ's extra slope in the straight-through surrogate, as a fraction of 1/T: a tenth of the logistic's peak slope 1/4.
THRESHOLD_LEAK = 0.025


class _ThresholdSTE(torch.autograd.Function):
    """Hard `1[r ≥ τ]` forward; backward as if it were `σ((r − τ) / T) − c · τ / T` (straight-through estimator).

    The logistic alone gives τ a gradient only from tokens within a few T of it: at T = 0.05 it is exactly 0 in
    fp32 once every r sits ~5 above τ, and τ (with any keep_ratio penalty on it) stops moving. The leak `c =
    THRESHOLD_LEAK` gives τ a bounded slope `(σ'(u) + c) / T` that never falls below `c / T`, so every token's
    ∂L/∂S reaches τ; r (and through it the branch) keeps the logistic's slope `σ'(u) / T`.
    """

    @staticmethod
    def forward(ctx, ratio, threshold, temperature):
        ctx.save_for_backward(ratio, threshold)
        ctx.temperature = temperature
        return (ratio >= threshold).to(ratio.dtype)

    @staticmethod
    def backward(ctx, grad):
        ratio, threshold = ctx.saved_tensors
        soft = torch.sigmoid((ratio.float() - threshold.float()) / ctx.temperature)
        slope = grad.float() * soft * (1.0 - soft) / ctx.temperature  # (N, 1): ∂L/∂r
        grad_ratio = slope.to(ratio.dtype) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            leak = grad.float().sum() * THRESHOLD_LEAK / ctx.temperature
            grad_threshold = (-slope.sum() - leak).reshape(threshold.shape).to(threshold.dtype)
        return grad_ratio, grad_threshold, None


class ThresholdGate(Gate):
    """TS-PEFT's token selector `S(x) = 1[r(x) ≥ τ]`, `r(x) = ‖Δy(x)‖₂ / ‖W0 x‖₂`, with one learnable τ (1,).

    The selection is hard in forward (a dropped token gets exactly no update) and trained by a straight-through
    estimator: backward uses the gradient of `σ((r − τ) / T)` for r (and through it the branch) and of
    `σ((r − τ) / T) − THRESHOLD_LEAK · τ / T` for τ, so that τ still learns when every r is far from it.
    """

    reads_branch_output = True
    stats_kind = "threshold"
    per_token = True

    def __init__(self, threshold_init: float = 0.0, temperature: float = 0.05):
        super().__init__()
        self.threshold_init = threshold_init
        self.temperature = temperature
        self.threshold = nn.Parameter(torch.full((1,), float(threshold_init)))

    @classmethod
    def from_config(cls, in_features: int, config) -> ThresholdGate:
        """As `SigmoidGate.from_config` (one τ whatever the layer's width)."""
        return cls(config.threshold_init, config.threshold_temperature)

    def reset_parameters(self, random: bool = False) -> None:
        with torch.no_grad():
            self.threshold.fill_(self.threshold_init)

    def initial_level(self) -> float:
        """1: a kept token gets the whole update (the fraction kept is a selection, not a scale)."""
        return 1.0

    @staticmethod
    def ratio(update: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """`‖Δy‖ / ‖W0 x‖` per token in fp32: update, base (..., d_out) → (..., 1)."""
        base_norm = base.detach().float().norm(dim=-1, keepdim=True)
        return update.float().norm(dim=-1, keepdim=True) / base_norm.clamp(min=1e-12)

    def forward(self, update: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Selection (..., 1) in {0, 1} (fp32) for the branch output `update` and the base output without bias `base`.

        r and τ are compared in fp32 whatever the update's dtype: rounded to bf16 (2^-8 relative) τ ≈ 0.05 moved
        in steps of 2.4e-4, coarser than an Adam step of 1e-4, and tokens within that of τ were kept or dropped by the
        rounding."""
        return _ThresholdSTE.apply(self.ratio(update, base), self.threshold.float(), self.temperature)

    @staticmethod
    def penalty(config) -> tuple[float, Callable]:
        """As `SigmoidGate.penalty`: λ_keep · (kept fraction − keep_ratio)² with a `keep_ratio`, else no penalty (its
        tap still records the kept fraction)."""
        if config.keep_ratio is None:  # (GateRAConfig then refuses a keep_ratio_weight)
            return 0.0, constant_term_grad
        return config.keep_ratio_weight, keep_ratio_term_grad(config.keep_ratio)

    @staticmethod
    def log_entries(means: torch.Tensor, config) -> tuple[dict[str, torch.Tensor], dict[str, float], bool]:
        """As `SigmoidGate.log_entries`; the kept fraction is always logged per layer: it tells which modules matter
        (TS-PEFT)."""
        penalties = {}
        if config.keep_ratio is not None:
            # the applied penalty's mean over micro-batches m of n_m (k_m − ρ)², per layer: Σ n k² − 2ρ Σ n k + ρ² Σ n
            # over Σ n (not (k̄ − ρ)² of the pooled fraction k̄, which is lower wherever the micro-batches differ)
            rho = config.keep_ratio
            deviation = (means[:, 3] - 2 * rho * means[:, 0] + rho * rho).clamp(min=0).mean().item()
            penalties["keep_penalty"] = config.keep_ratio_weight * deviation
        return {"kept_frac": means[:, 0]}, penalties, True

    def extra_repr(self) -> str:
        return f"threshold_init={self.threshold_init}, temperature={self.temperature}"


class StructureGate(Gate):
    """The Structure-Learnable Adapter's per-module gate `σ(α)`: `alpha` (1,), no input."""

    stats_kind = "structure"
    per_token = False

    def __init__(self, alpha_init: float = 3.0):
        super().__init__()
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))

    def reset_parameters(self, random: bool = False) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)

    def initial_level(self) -> float:
        """The gate's value at step 0: `σ(alpha_init)`."""
        return 1.0 / (1.0 + math.exp(-self.alpha_init))

    def forward(self) -> torch.Tensor:
        """σ(α) in fp32 (1,), also for an adapter cast to half precision: pruning, the sparse skip and merges compare
        and scale by the same value as `gatera prune` reads from the saved α."""
        return torch.sigmoid(self.alpha.float())

    @staticmethod
    def penalty(config) -> tuple[float, Callable]:
        """As `SigmoidGate.penalty`: λ_s · σ(α) per module."""
        return config.structure_weight, constant_term_grad

    @staticmethod
    def log_entries(means: torch.Tensor, config) -> tuple[dict[str, torch.Tensor], dict[str, float], bool]:
        """As `SigmoidGate.log_entries`."""
        penalty = config.structure_weight * means[:, 0].mean().item()
        return {"structure_mean": means[:, 0]}, {"structure_penalty": penalty}, False

    def extra_repr(self) -> str:
        return f"alpha_init={self.alpha_init}"


# The gate classes by the kind under which a layer records their statistics (`GateRALayer.gate_stats`).
GATES_BY_STATS_KIND: dict[str, type[Gate]] = {gate.stats_kind: gate for gate in (SigmoidGate, ThresholdGate,
                                                                                    StructureGate)}

# The token gate classes by the name a user gives as `GateRAConfig(gate=...)`; "none" stores no module.
TOKEN_GATE_KINDS: dict[str, type[Gate]] = {"sigmoid": SigmoidGate, "threshold": ThresholdGate}


def make_token_gate(kind: str, in_features: int, config) -> nn.Module | None:
    """Build the token gate of `kind` for a layer with `in_features` inputs; None for `"none"`."""
    if kind == "none":
        return None
    if kind not in TOKEN_GATE_KINDS:  # (GateRAConfig validates the name first)
        raise ValueError(f"Unknown token gate {kind!r}; one of {[*TOKEN_GATE_KINDS, 'none']}.")
    return TOKEN_GATE_KINDS[kind].from_config(in_features, config)


def make_structure_gate(config) -> nn.Module | None:
    return StructureGate(config.structure_init) if config.structure_gate else None
