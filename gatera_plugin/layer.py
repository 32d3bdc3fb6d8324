"""GateRA tuner layers: `y = base(x) + Σ_adapters σ(α) · g(x) ⊙ Δy(dropout(x))`.

`GateRALayer` follows PEFT's contract (see `peft.tuners.hira.layer`): adapter tensors live in dicts keyed by adapter
name, everything under the layer except `base_layer` is adapter state, and `update_layer` adds one adapter. `Linear`
wraps `nn.Linear` and transformers' `Conv1D` (GPT-2 style, weight stored transposed); `bnb.py` adds bitsandbytes'
quantised linears by overriding `base_weight`.

One adapter's update composes three independent choices (docs/method.md, "The adapted layer"): the token gate
(`gates.py`: sigmoid, threshold or none), the optional structure gate σ(α), and the branch (`branches.py`: hira, lora,
dora).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._stack import user_stacklevel
from .branches import BRANCH_KINDS, delta_weight, dora_weight_norm
from .config import GateRAConfig
from .fsdp import refuse_distributed_weight, unsharded_weight
from .gates import Gate, make_structure_gate, make_token_gate
from .kernels import compute_dtype
from .ops._autocast import HALF_DTYPES, autocast_off
from .ops._tokens import records_graph
from .ops.hira import factored_pays
from .ops.rows import add_gated
from .penalty import GateStats, PenaltyRun, penalty_tap

_folding = True  # (switched off inside `without_folding`)


@contextlib.contextmanager
def without_folding():
    """Inside this block, ungated HiRA layers run the base layer and the branch apart, five products per training
    step as PEFT's HiRA does, instead of folded into one linear map (`GateRALayer._folded_forward`): to compare the
    two, or to rule the fold out. Put the backward inside it too (with non-reentrant checkpointing the backward runs
    the forward again and must take the same path). It sets one switch for the whole process (not per thread)."""
    global _folding
    previous, _folding = _folding, False
    try:
        yield
    finally:
        _folding = previous


SUPPORTED_LAYERS = (
    "`torch.nn.Linear`, `transformers.pytorch_utils.Conv1D`, `bitsandbytes.nn.Linear4bit`, `bitsandbytes.nn.Linear8bitLt`"
)


class GateRALayer(BaseTunerLayer):
    # Trainable, saved per-adapter state.
    adapter_layer_names: tuple[str, ...] = ("gatera_A", "gatera_B", "gatera_gate", "gatera_structure", "gatera_magnitude")
    # Other per-adapter state (plain dicts / dropout modules keyed by adapter name).
    other_param_names: tuple[str, ...] = ("r", "scaling", "_lora_alpha", "branch_kind", "gatera_dropout",
                                          "options")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, Optional[float]] = {}  # read through branch_scale() (None until computed)
        self._lora_alpha: dict[str, Optional[float]] = {}
        self.branch_kind: dict[str, str] = {}
        self.options: dict[str, GateRAConfig] = {}  # the adapter's config: penalty weights, sparsity, caching
        self.gatera_dropout = nn.ModuleDict({})
        self.gatera_A = nn.ParameterDict({})  # (r, d_in)
        self.gatera_B = nn.ParameterDict({})  # (d_out, r)
        self.gatera_gate = nn.ModuleDict({})  # token gate modules, absent for gate="none"
        self.gatera_structure = nn.ModuleDict({})  # σ(α) per adapter with structure_gate=True
        self.gatera_magnitude = nn.ParameterDict({})  # (d_out,) DoRA magnitude, branch="dora" only
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.cast_input_dtype_enabled = True
        self.kwargs = kwargs
        # Not adapter state (plain attributes, never saved): statistics, the model-wide penalty context, caches.
        self.gate_stats: dict[tuple[str, str], GateStats] = {}  # (adapter, "sigmoid" | "threshold" | "structure")
        self.penalty_run: Optional[PenaltyRun] = None
        self.in_decoder = False  # in an encoder-decoder model's decoder: it counts the decoder's tokens (model.py)
        self._weight_before_merge: Optional[torch.Tensor] = None
        self._delta_cache: dict[str, tuple] = {}  # adapter -> (key, probe views, their values, delta)
        self.triton_failures: dict[str, str] = {}  # adapter -> the Triton error that sent it to the PyTorch path

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
        """Add adapter `adapter_name` with rank `r` (and `lora_alpha` where the scale uses it) to this layer."""
        if r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {r} for adapter {adapter_name!r}.")
        self.r[adapter_name] = r
        self.branch_kind[adapter_name] = config.branch
        self.options[adapter_name] = config
        self.gatera_dropout[adapter_name] = nn.Dropout(p=config.dropout) if config.dropout > 0 else nn.Identity()
        self.gatera_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.gatera_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        for container, gate in ((self.gatera_gate, make_token_gate(config.gate, self.in_features, config)),
                                (self.gatera_structure, make_structure_gate(config))):
            if gate is not None:
                container[adapter_name] = gate
        self._lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = None  # set by branch_scale(), now or (base weights on meta) at the first use
        if not (config.scale_reads_base_weight and self.get_base_layer().weight.device.type == "meta"):
            self.branch_scale(adapter_name)
        if BRANCH_KINDS[config.branch].learns_magnitude:
            self.gatera_magnitude[adapter_name] = nn.Parameter(torch.empty(self.out_features))
        for kind in self._gate_kinds(adapter_name):
            self.gate_stats[(adapter_name, kind)] = GateStats()
        self.reset_gatera_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)
        _register_base_weight_with_zero3(self)

    def gates_of(self, adapter_name: str) -> list[Gate]:
        """The gates `adapter_name` has here: its token gate (absent for gate="none"), then its structure gate."""
        return [gates[adapter_name] for gates in (self.gatera_gate, self.gatera_structure) if adapter_name in gates]

    def _gate_kinds(self, adapter_name: str) -> list[str]:
        """The penalised gate kinds this adapter has here: "sigmoid" / "threshold", and "structure"."""
        return [gate.stats_kind for gate in self.gates_of(adapter_name)]

    def _gate_trains(self, adapter_name: str, gate: Gate) -> bool:
        """Whether the penalty on `gate` trains anything of `adapter_name` here (`Gate.penalty_trains`)."""
        return gate.penalty_trains(self.gatera_A[adapter_name].requires_grad or self.gatera_B[adapter_name].requires_grad)

    def trained_gate_stats(self, adapter_names) -> list[GateStats]:
        """The statistics of the gates of `adapter_names` here that a training backward penalises and records."""
        return [self.gate_stats[(name, gate.stats_kind)] for name in adapter_names for gate in self.gates_of(name)
                if self._gate_trains(name, gate)]

    def reset_gatera_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """HiRA's init: `A` Kaiming-uniform (a=√5), `B = 0`, gates at their initial values; DoRA's magnitude is
        `‖W0 + s·BA‖`. `init_weights=False` randomises `B` and the sigmoid gate's weight (tests, debugging)."""
        A, B = self.gatera_A[adapter_name], self.gatera_B[adapter_name]
        if A.device.type == "meta" or self.get_base_layer().weight.device.type == "meta":
            return  # (the adapter goes to the base's meta device: its values arrive with rank 0's, or a load's)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(B)
        else:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        for gate in self.gates_of(adapter_name):
            gate.reset_parameters(random=not init_weights)
        if adapter_name in self.gatera_magnitude:
            scale = self.branch_scale(adapter_name)  # (first: it may gather W0 itself)
            with self._gathered_base_weight():
                norm = dora_weight_norm(self._original_weight(), A, B, scale)
            with torch.no_grad():
                self.gatera_magnitude[adapter_name].copy_(norm)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for key in [k for k in self.gate_stats if k[0] == adapter_name]:
            del self.gate_stats[key]
        self._delta_cache.pop(adapter_name, None)
        self.triton_failures.pop(adapter_name, None)

    # ----------------------------------------------------------------------------------------------- weights
    def base_weight(self) -> torch.Tensor:
        """The frozen base weight `W0` as (d_out, d_in) in its stored dtype (a view, no copy, for dense layers)."""
        weight = unsharded_weight(self.get_base_layer().weight)
        return weight.t() if self.weight_is_transposed else weight

    def branch_scale(self, adapter_name: str) -> float:
        """The branch scale `s` of `adapter_name` (`GateRAConfig.scaling_for`), computed at the first call: when the
        adapter is created, or at its first use if W0 was still on the meta device then (meta-device loading)."""
        scale = self.scaling[adapter_name]
        if scale is None:
            config = self.options[adapter_name]
            gate_level = math.prod(gate.initial_level() for gate in self.gates_of(adapter_name))
            scale = config.scaling_for(self.r[adapter_name], self._lora_alpha[adapter_name],
                                       weight_rms=lambda: self._base_weight_rms(config.hira_scaling),
                                       gate_level=gate_level)
            self.scaling[adapter_name] = scale
        return scale

    def _base_weight_rms(self, setting: str) -> float:
        """RMS of the frozen base weight W0 (gathered first under DeepSpeed ZeRO-3, dequantised for 4-bit bases; the
        unmerged W0 while other adapters are merged into the stored weight)."""
        weight = self.get_base_layer().weight
        if weight.device.type == "meta":
            raise ValueError(f"hira_scaling={setting!r} reads the base weights, but they are still on the meta device "
                             "(not loaded) when the adapter is first used. Load the base model's weights before "
                             "the first forward, or use hira_scaling='none'.")
        with self._gathered_base_weight(), torch.no_grad():
            rms = self._original_weight().float().square().mean().sqrt().item()
        if not math.isfinite(rms) or rms <= 0:
            raise ValueError(f"hira_scaling={setting!r} needs a nonzero, finite base weight, but its RMS is {rms}. "
                             "Use hira_scaling='none' for this model.")
        return rms

    def _gathered_base_weight(self):
        """A context in which the base weight is whole: gathered under DeepSpeed ZeRO-3 (outside a forward, a rank holds
        an empty (0,) shard of it), else nothing to do."""
        weight = self.get_base_layer().weight
        if not hasattr(weight, "ds_id"):  # (not a ZeRO-3 partitioned parameter)
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([weight])

    def kernel_weight(self):
        """W0 as the Triton kernels read it (a dense (d_out, d_in) view here; packed bytes for 4-bit bases)."""
        return self.base_weight()

    def _check_base_frozen(self) -> None:
        if self.get_base_layer().weight.requires_grad:
            raise RuntimeError(
                "GateRA's HiRA branch treats the base weight as frozen, but "
                f"{type(self.get_base_layer()).__name__}.weight has requires_grad=True. Freeze it "
                "(`weight.requires_grad_(False)`) or use branch='lora'."
            )

    def _without_bias(self, base_out: torch.Tensor) -> torch.Tensor:
        bias = self.get_base_layer().bias
        return base_out - bias if bias is not None else base_out

    def _cached_delta(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        """`s · W0 ⊙ BA` (d_out, d_in) in `dtype` for inference, rebuilt only when A, B, W0 or `dtype` changed; formed
        in fp32 with autocast off (an autocast region around the first forward must not round it for later ones).

        The key reads storage pointers and version counters and, because writes through `.data` (EMA swaps, some
        optimizers and engines) bump no version, compares up to 256 evenly spaced entries of A and of B and 1024 of
        W0 with their values when the update was built: two small ops per layer and forward (one decode step's
        product reads d_in·d_out entries). The cache is also dropped by every `train()` / `eval()` call.
        """
        A, B = self.gatera_A[adapter_name], self.gatera_B[adapter_name]
        weight = self.get_base_layer().weight
        key = (_version_of(A), _version_of(B), A.data_ptr(), B.data_ptr(), weight.data_ptr(), _version_of(weight), dtype)
        cached = self._delta_cache.get(adapter_name)
        if cached is not None and cached[0] == key and torch.equal(_bits(cached[1]), cached[2]):
            return cached[3]
        # (a normal tensor, also when built under inference_mode: a later forward that records a graph through x,
        # e.g. an input attribution in eval, must be able to save it for backward)
        with torch.inference_mode(False), torch.no_grad(), autocast_off(A.device.type):
            probes = [_evenly_spaced(A, 256), _evenly_spaced(B, 256), _evenly_spaced(weight, 1024)]
            branch = BRANCH_KINDS[self.branch_kind[adapter_name]]
            delta = branch.delta(self.base_weight(), A, B, self.branch_scale(adapter_name)).to(dtype)
            self._delta_cache[adapter_name] = (key, probes, _bits(probes), delta)
        return delta

    # ----------------------------------------------------------------------------------------------- forward
    def _penalised(self, adapter_name, gate, value, mask, taps: bool):
        """`gate`'s `value` routed through its penalty tap (backward adds the penalty's gradient and records
        statistics), or as it is where no penalty run taps this forward (`taps` False) or nothing trains the gate
        (its parameters are frozen: a frozen adapter active beside the trained one; its value may still require grad
        through x, and its penalty would reach the trained adapters upstream). `mask`: the tokens' mask for a
        per-token gate, or None (every token; a per-module gate)."""
        if not taps or not value.requires_grad or not self._gate_trains(adapter_name, gate):
            return value
        weight, term_grad = gate.penalty(self.options[adapter_name])
        run, kind = self.penalty_run, gate.stats_kind
        if gate.per_token:
            scale = run.token_scale(adapter_name, kind, weight, run.own_positions(value, self.in_decoder),
                                    self.in_decoder)
        else:
            scale = run.module_scale(adapter_name, kind, weight)
        flat = value if value.dim() == 2 and value.shape[1] == 1 else value.reshape(-1, 1)
        flat = penalty_tap(flat, mask, scale, term_grad, self.gate_stats[(adapter_name, kind)])
        return flat if flat.shape == value.shape else flat.reshape(value.shape)

    def _check_adapter_device(self, adapter_name: str, x: torch.Tensor) -> None:
        A = self.gatera_A[adapter_name]
        if A.device != x.device:
            hint = " (never loaded: e.g. low_cpu_mem_usage without its weights)" if A.device.type == "meta" else ""
            raise RuntimeError(
                f"GateRA adapter {adapter_name!r} is on {A.device}{hint} but this layer's input is on {x.device}. "
                f"Move the whole PEFT model (`model.to({str(x.device)!r})`), not only its base model, or load the "
                "adapter's weights."
            )

    def _base_folds(self, x: torch.Tensor) -> bool:
        """Whether the base layer's forward is the plain product `x W0ᵀ + b` (`F.linear`, with autocast's casts where
        it is on, else in x's dtype), so that `folded_hira` computes what it would (dense `nn.Linear` / `Conv1D`;
        bnb.py for 4-bit)."""
        base = self.get_base_layer()
        return type(base).forward in (nn.Linear.forward, Conv1D.forward) and (
            x.dtype == base.weight.dtype or torch.is_autocast_enabled(x.device.type))

    def _folded_forward(self, adapters: list, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """The layer's output with its one ungated HiRA adapter folded into the base layer's product,
        `x (W0 + s·W0 ⊙ BA)ᵀ + b` (`ops.hira.folded_hira`: three products of size N·d_in·d_out per training step
        instead of five; four where the products run in bf16 / fp16, see below), or None where the layer runs the
        base layer and the branch apart.

        It folds only where that is the same function of the same weights, computed in the same dtype: one active
        adapter, the HiRA branch, no token or structure gate, no active dropout, not `cache_delta` in eval, `kernel`
        not "triton" (which asks for the branch kernels), a frozen base weight, no extra forward arguments, a base
        layer that is the wrapped layer itself (not another adapter's layer), whose forward is the plain product
        (`_base_folds`), and that nobody else calls: no hooks on it or global ones (a profiler's or FLOP counter's
        too) and no replaced `forward` (ZeRO-3's parameter gathering, accelerate's offloading or a user's hooks expect
        the base layer's own call). `without_folding()` turns it off.

        Where the products run in bf16 / fp16 only backward folds (`fold_forward=False`), and without autograd (e.g.
        `generate()`) there is nothing to fold, so the two run apart; so do a decoding step's few tokens in fp32 (the
        factored update reads W0 once and forms no `W0 + s·ΔW`). `W0 + s·ΔW` rounded to that dtype, for a W0
        whose values lie on its grid (a bf16 model, QLoRA's dequantised W0, and an fp32 model loaded from a bf16
        checkpoint alike), comes back as W0 wherever `|s·BA|` is below half the grid's spacing (2^-9 of W0 in bf16).
        A folded forward would drop the small updates of the first steps (B starts at 0), which the separate path,
        adding `Δy` to the base output, partly keeps; in the input gradient the same rounding is an error of the size
        of the product's own output rounding (tests/test_fold.py).
        """
        if not _folding or len(adapters) != 1 or args or kwargs:
            return None
        name, base = adapters[0], self.get_base_layer()
        config, branch = self.options[name], BRANCH_KINDS[self.branch_kind[name]]
        # (the checks that turn the default, gated, adapter away come first: this runs in every layer's forward)
        if (name in self.gatera_gate or branch.folded is None or name in self.gatera_structure
                or self.base_layer is not base  # (another adapter's layer between)
                or config.kernel == "triton" or (not self.training and config.cache_delta)
                or (self.training and not isinstance(self.gatera_dropout[name], nn.Identity))
                or base.weight.requires_grad or _called_by_others(base) or not self._base_folds(x)
                or branch.input_dtype(x, self.gatera_A[name].dtype) != x.dtype):
            return None
        fold_forward = compute_dtype(x) not in HALF_DTYPES
        # without grad mode there is no backward to fold: half precision keeps the base layer's own product
        # (bitsandbytes' kernels on 4-bit), and a decoding step's few tokens the factored update, which forms no ΔW
        if not torch.is_grad_enabled() and (
                not fold_forward or factored_pays(x.numel() // x.shape[-1], self.gatera_A[name].shape[0],
                                                  self.in_features * self.out_features)):
            return None
        self._check_adapter_device(name, x)
        return branch.folded(x, self.gatera_A[name], self.gatera_B[name], self.base_weight, self.branch_scale(name),
                             base.bias, fold_forward=fold_forward)

    def _add_adapter_update(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor,
                            layout: tuple):
        """`result + σ(α) · g(x) ⊙ Δy(dropout(x))` for one adapter; x (N, d_in), result and base_out (N, d_out): the
        tokens as rows, laid out as `layout` (the input's leading shape) in the model."""
        A = self.gatera_A[adapter_name]
        config = self.options[adapter_name]
        self._check_adapter_device(adapter_name, x)
        branch = BRANCH_KINDS[self.branch_kind[adapter_name]]
        x = self._cast_input_dtype(x, branch.input_dtype(x, A.dtype))
        taps = self.training and self.penalty_run is not None
        mask = self.penalty_run.token_mask(layout, x.device, self.in_decoder) if taps else None
        if branch.needs_frozen_base and self.training:
            self._check_base_frozen()

        token_gate = self.gatera_gate[adapter_name] if adapter_name in self.gatera_gate else None
        sparse = config.sparse_threshold > 0 and (not self.training or config.sparse_training)
        multiplier = structure = None  # (..., 1) fp32 or None; the structure gate's σ(α) (1,) fp32 or None
        if token_gate is not None and not token_gate.reads_branch_output:  # (GateRA's σ(w·x + b))
            gate = token_gate(x, pass_input=True)
            x = token_gate.take_passed_input(x)  # (x's gradients from the gate and from the branch add in one pass)
            # (g stays fp32 into the branch: its penalty reads it so, and the branch forms g's gradient in fp32, where
            # a half-precision one times s ~ 1 / (RMS(W0)·g0) overflowed fp16 for gates started nearly closed)
            multiplier = self._penalised(adapter_name, token_gate, gate, mask, taps)
        if adapter_name in self.gatera_structure:
            structure_gate = self.gatera_structure[adapter_name]
            structure = self._penalised(adapter_name, structure_gate, structure_gate(), None, taps)  # (1,) fp32
            expanded = structure.expand(*x.shape[:-1], 1)  # (fp32, as the token gate: its gradient sums N tokens)
            multiplier = expanded if multiplier is None else multiplier * expanded
        x_branch = self.gatera_dropout[adapter_name](x)

        if token_gate is not None and token_gate.reads_branch_output:  # (TS-PEFT's selection by the branch's output)
            if sparse and structure is not None and bool(structure < config.sparse_threshold):
                # the structure gate closes the module: no branch, so the threshold gate, which reads the branch's
                # output, has nothing to select from (σ(α) stays in the graph for its penalty, as for skipped tokens)
                return _without_update(result, multiplier)
            update = self._branch(adapter_name, x_branch, None, None, base_out)
            selection = token_gate(update, self._without_bias(base_out).to(update.dtype))
            selection = self._penalised(adapter_name, token_gate, selection, mask, taps)
            multiplier = selection if multiplier is None else selection * multiplier
            return add_gated(result, update, multiplier, 1.0)

        if multiplier is not None and sparse:
            return self._sparse_update(adapter_name, x_branch, multiplier, result, base_out)
        return self._branch(adapter_name, x_branch, multiplier, result, base_out)

    def _branch(self, adapter_name, x, multiplier, result, base_out):
        if not self.training and self.options[adapter_name].cache_delta and not records_graph(
                self.gatera_A[adapter_name], self.gatera_B[adapter_name], self.gatera_magnitude.get(adapter_name)):
            # (a forward that trains the factors in eval takes the branch: the cached delta has no graph)
            delta = self._cached_delta(adapter_name, compute_dtype(x))  # in the products' dtype: autocast's, or x's
            return add_gated(result, x @ delta.t(), multiplier, 1.0)
        return BRANCH_KINDS[self.branch_kind[adapter_name]].update(self, adapter_name, x, multiplier, result, base_out)

    def _sparse_update(self, adapter_name, x, multiplier, result, base_out):
        """Run the branch only on tokens whose multiplier (fp32, (..., 1)) is at least ε; the others get no update at
        all. (ε is compared with the fp32 gates: rounded to a bf16 model's dtype, a gate within 0.4% of ε was kept or
        dropped by the rounding, and a module the merge drops by its fp32 σ(α) still ran in eval.)"""
        flat = multiplier.reshape(-1)
        active = flat.detach() >= self.options[adapter_name].sparse_threshold
        if bool(active.all()):
            return self._branch(adapter_name, x, multiplier, result, base_out)
        index = active.nonzero().squeeze(1)
        rows = result.reshape(-1, result.shape[-1])
        if index.numel() == 0:
            return _without_update(result, multiplier)
        # the open rows through the branch with their own outputs as its base: each rounds as on the dense path
        open_rows = self._branch(adapter_name, x.reshape(-1, x.shape[-1])[index], flat[index].unsqueeze(1),
                                 rows[index], base_out.reshape(-1, base_out.shape[-1])[index])
        return rows.index_copy(0, index, open_rows).reshape(result.shape)

    # ----------------------------------------------------------------------------------------------- merging
    def _refuse_gated(self, adapter_names) -> None:
        """Raise for the first of `adapter_names` with a token gate: its update depends on each token, so no merged
        weight exists."""
        for name in adapter_names:
            if self.options[name].is_gated:
                raise ValueError(_unmergeable_message(name, self.options[name].gate))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Additive update of an ungated adapter in the base weight's layout: `W' = W + get_delta_weight(...)`.

        HiRA's update `W0 ⊙ BA` and DoRA's norm `‖W0 + s·BA‖` read the original `W0`, also while other adapters
        are merged into the stored weight, so merging adapters one at a time equals merging them together.
        """
        base = self._original_weight()  # (read once: a quantised base dequantises)
        return self._delta_weight_fp32(adapter_name, base).to(base.dtype)

    def _delta_weight_fp32(self, adapter_name: str, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`get_delta_weight` before its cast to the base weight's dtype: fp32 (merging sums these and rounds once);
        `base`: `_original_weight()` where the caller has it."""
        self._refuse_gated([adapter_name])
        base = self._original_weight() if base is None else base
        with autocast_off(base.device.type):  # in fp32, also when merged inside an autocast region
            delta = delta_weight(
                self.branch_kind[adapter_name], base, self.gatera_A[adapter_name], self.gatera_B[adapter_name],
                self.branch_scale(adapter_name), self.gatera_magnitude.get(adapter_name),
            )
            if adapter_name in self.gatera_structure:
                level = self.gatera_structure[adapter_name]().float()
                if level.item() < self.options[adapter_name].sparse_threshold:  # (eval skips this module: merge 0)
                    level = torch.zeros_like(level)
                delta = delta * level
        delta = delta.float()
        return delta.t() if self.weight_is_transposed else delta

    def _original_weight(self) -> torch.Tensor:
        """The unmerged `W0` as (d_out, d_in): the one kept at the first merge, else the base weight itself."""
        if self._weight_before_merge is None:
            return self.base_weight()
        weight = self._read_kept(self._weight_before_merge).to(self.get_base_layer().weight.device)
        return weight.t() if self.weight_is_transposed else weight

    def _stored_weight(self) -> torch.Tensor:
        """`W0` in the base layer's own layout and dtype, as merging reads it (quantised bases: dequantised)."""
        return self.get_base_layer().weight.data

    def _store_weight(self, weight: torch.Tensor) -> None:
        """Write a merged `W0` back in the base layer's layout (quantised bases: re-quantise)."""
        self.get_base_layer().weight.data.copy_(weight)

    def _keep_for_unmerge(self):
        """What the first merge keeps so that unmerge restores `W0` exactly: here a copy of the stored weight."""
        return self._stored_weight().detach().clone()

    def _read_kept(self, kept) -> torch.Tensor:
        """`W0` in the base layer's layout from what `_keep_for_unmerge` kept."""
        return kept

    def _restore_kept(self, kept) -> None:
        """Put back the weight `_keep_for_unmerge` kept."""
        self._store_weight(kept)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold ungated adapters into the base weight; gated adapters are refused (no single merged weight).

        Every delta is computed from the original `W0` (kept at the first merge; unmerge restores it), as PEFT's
        HiRA does, so a later merge adds to the merged weight without reading it. Deltas are summed in fp32 and cast
        once. Quantised bases re-quantise, so their outputs change by rounding. `safe_merge=True` checks the result
        for NaN / inf before anything is written, with PEFT's error wording.
        """
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.gatera_A]
        self._refuse_gated(adapter_names)
        if not adapter_names:
            return
        weight = self._stored_weight()
        first_merge = self._weight_before_merge is None
        if first_merge:
            self._weight_before_merge = self._keep_for_unmerge()
        merged = self._merged_weight(weight, adapter_names)
        if safe_merge and not torch.isfinite(merged).all():
            if first_merge:
                self._weight_before_merge = None
            raise ValueError(_broken_merge_message(adapter_names))
        self._store_weight(merged)
        self.merged_adapters.extend(adapter_names)

    def _merged_weight(self, weight: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """`weight + Σ deltas` of `adapter_names`, summed in fp32 and cast once to `weight`'s dtype."""
        merged = weight.float()
        for name in adapter_names:
            merged = merged + self._delta_weight_fp32(name)
        return merged.to(weight.dtype)

    def refuse_non_finite_merge(self, adapter_names: list[str]) -> None:
        """Raise (PEFT's `safe_merge` wording) if merging `adapter_names` here would give NaN / inf; changes nothing."""
        if adapter_names and not torch.isfinite(self._merged_weight(self._stored_weight(), adapter_names)).all():
            raise ValueError(_broken_merge_message(adapter_names))

    def _warn_unmerged_active(self) -> None:
        """A merged layer runs its merged weight only (PEFT's way): warn where an active adapter is not merged in (a
        gated one beside a merged ungated one), which would otherwise be skipped silently."""
        skipped = [name for name in self.active_adapters if name in self.gatera_A and name not in self.merged_adapters]
        if skipped:
            warnings.warn(
                f"Adapter(s) {skipped} are active, but the layers hold {self.merged_adapters} merged into their weights "
                "and run that weight only (as PEFT's LoRA layers do), so the adapter(s) do not run. Call "
                "`unmerge_adapter()` to run every active adapter, or `set_adapter` to the merged one(s).",
                stacklevel=user_stacklevel(),
            )

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._restore_kept(self._weight_before_merge)
        self._weight_before_merge = None
        self.merged_adapters.clear()


def _called_by_others(module: nn.Module) -> bool:
    """Whether anything hooks `module`'s call: its own or global module hooks, or a `forward` replaced on the instance
    (accelerate's `add_hook_to_module`)."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    global_hooks = (getattr(torch.nn.modules.module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))
    return any(hooks) or any(global_hooks) or "forward" in vars(module)


def _without_update(result: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """`result` for tokens that all skip the branch; the multiplier stays in the graph (a zero task gradient) so that
    its penalty tap still gives the gates their penalty's gradient and records their statistics, as for skipped
    tokens beside open ones."""
    return result + multiplier.sum().mul(0).to(result.dtype) if multiplier.requires_grad else result


def _evenly_spaced(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """A view of at most `count` evenly spaced entries of `tensor`: it sees later in-place writes, `.data` ones too."""
    flat = tensor.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // count)][:count]


_SAME_SIZE_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(probes: list[torch.Tensor]) -> torch.Tensor:
    """The probes' bit patterns as one integer tensor: compared bitwise, so that a NaN equals itself (the packed
    bytes of a 4-bit W0 stored as bf16, FSDP-QLoRA's `bnb_4bit_quant_storage`, read as bf16 are often NaN)."""
    return torch.cat([p.view(_SAME_SIZE_INTEGER[p.element_size()]) if p.is_floating_point() else p for p in probes])


def _version_of(tensor: torch.Tensor) -> int:
    """The version counter of `tensor`; -1 for an inference tensor (made under `torch.inference_mode`), which has
    none and cannot be written in place outside inference mode (the value probes still see what it may be)."""
    return -1 if tensor.is_inference() else tensor._version


def _broken_merge_message(adapter_names: list[str]) -> str:
    return (f"NaNs detected in the merged weights. The adapter {','.join(adapter_names)} seems to be broken (its merged "
            "weight holds NaN or inf; no base weight was changed).")


def _register_base_weight_with_zero3(layer: GateRALayer) -> None:
    """Under DeepSpeed ZeRO-3, declare the base weight an external parameter of the GateRA layer.

    The HiRA branch (and DoRA's norm) read W0 in this layer's forward and, for the memory-lean backward, again in its
    backward; registered, ZeRO-3 gathers W0 for both like one of the layer's own parameters and releases it after,
    so nothing keeps a second, gathered copy.
    """
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return
    if is_deepspeed_zero3_enabled():
        import deepspeed

        deepspeed.zero.register_external_parameter(layer, layer.get_base_layer().weight)


MIXED_BATCHES_REFUSED = (
    "GateRA does not support mixed-adapter batches (`adapter_names=`). Use `set_adapter` to switch adapters."
)


def _unmergeable_message(adapter_name: str, gate_kind: str) -> str:
    return (
        f"Cannot merge GateRA adapter {adapter_name!r}: it has a per-token gate (gate={gate_kind!r}), so its update "
        "depends on each token and no single merged weight exists (docs/method.md, section 'Merging'). Keep the "
        "adapter unmerged (load it with PeftModel.from_pretrained for inference), or train with gate='none' for a "
        "mergeable adapter."
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

    def train(self, mode: bool = True):
        """As nn.Module's (which this MRO resolves `train` to), and drop the cached dense updates of `cache_delta`."""
        self._delta_cache.clear()
        return super().train(mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError(MIXED_BATCHES_REFUSED)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            self._warn_unmerged_active()
            return self.base_layer(x, *args, **kwargs)
        adapters = [name for name in self.active_adapters if name in self.gatera_A]
        folded = self._folded_forward(adapters, x, args, kwargs)
        if folded is not None:
            return folded
        result = base_out = self.base_layer(x, *args, **kwargs)
        if not adapters:
            return result
        # The adapters see the tokens as rows, x (N, d_in) and the outputs (N, d_out), flattened once here rather than
        # in each gate, tap and branch (a view and an autograd node each); the token mask reads x's own layout.
        layout = x.shape[:-1]
        if x.dim() != 2:
            x, result = x.reshape(-1, x.shape[-1]), result.reshape(-1, result.shape[-1])
        base_out = result
        for adapter_name in adapters:
            result = self._add_adapter_update(adapter_name, x, result, base_out, layout)
        return result if len(layout) == 1 else result.reshape(*layout, result.shape[-1])

    def __repr__(self) -> str:
        return "gatera." + super().__repr__()


def dispatch_default(target: nn.Module, adapter_name: str, config: GateRAConfig, **kwargs) -> Optional[nn.Module]:
    """Wrap a dense `nn.Linear` / `Conv1D`; None for anything else (quantised subclasses have their own dispatch)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, (nn.Linear, Conv1D)):
        return None
    weight = getattr(base, "weight", None)
    refuse_distributed_weight(target, weight)
    dense = isinstance(weight, torch.Tensor) and type(weight) in (nn.Parameter, torch.Tensor)
    if not (dense and weight.is_floating_point()):
        return None  # e.g. a quantised nn.Linear subclass of a backend GateRA does not know
    return Linear(target, adapter_name, config=config, **kwargs)
