"""`GateRAConfig`: one config for every token-gate kind over every branch kind (docs/method.md)."""

from __future__ import annotations

import math
import operator
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ._registration import PEFT_TYPE
from .branches import BRANCH_KINDS
from .gates import TOKEN_GATE_KINDS
from .kernels import KERNELS, triton_available, triton_runs_here

# The kinds a user may pick: the registries of `gates.py` / `branches.py`, where adding a kind means adding its class
# (and its name to the `Literal`s of `branch` / `gate` below and of Axolotl's args, which tests/test_config.py compares).
TOKEN_GATES = (*TOKEN_GATE_KINDS, "none")
BRANCHES = tuple(BRANCH_KINDS)
HIRA_SCALINGS = ("none", "rms", "lora")
DEFAULT_HIRA_SCALING = "lora"  # bench/quality_runs.sh; README, "Learning rates"


def resolved_hira_scaling(branch: str, hira_scaling: Optional[str]) -> str:
    """`hira_scaling` as given, or, unset, the default of `branch`: DEFAULT_HIRA_SCALING for HiRA, "none" else."""
    if hira_scaling is not None:
        return hira_scaling
    return DEFAULT_HIRA_SCALING if branch == "hira" else "none"


def lora_alpha_applies(branch: str, hira_scaling: Optional[str]) -> bool:
    """True when `lora_alpha` / `alpha_pattern` enter the branch scale (LoRA / DoRA, or HiRA under "lora")."""
    return branch != "hira" or resolved_hira_scaling(branch, hira_scaling) == "lora"

# What a saved adapter_config.json without these keys meant: it was written before the field existed.
BEFORE_FIELD_EXISTED = {"hira_scaling": "none", "ensure_weight_tying": False}

# Version of the on-disk adapter format written by this package. Bump when a saved adapter would be read wrongly by an
# older release; `GateRAConfig` refuses a newer version instead of guessing.
FORMAT_VERSION = 1

# Defaults of the penalties and gates (our choices where the papers are silent; README, "Gate kinds").
# λ = 0.01 from the sweep on SmolLM2-135M / hyperbaton (bench/quality_runs.sh lambda; README, "Quality"): as
# accurate as λ = 0 within one standard error while lowering the gates' entropy; λ >= 0.1 drives them all open.
DEFAULT_ENTROPY_WEIGHT = 0.01
DEFAULT_THRESHOLD_INIT = 0.0  # τ = 0 keeps every token at step 0 (r ≥ 0), so training starts dense
DEFAULT_THRESHOLD_TEMPERATURE = 0.05
DEFAULT_KEEP_RATIO_WEIGHT = 1.0
DEFAULT_STRUCTURE_INIT = 3.0  # σ(3) = 0.95: every module starts (almost) fully on
DEFAULT_STRUCTURE_WEIGHT = 0.1


def _check_number(name: str, value, *, low=None, high=None, low_open=False, high_open=False, integer=False) -> None:
    """Raise a `ValueError` naming `name` unless `value` is a finite number inside the given bounds."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"`{name}` must be {kind}, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"`{name}` must be {bound}, got {value!r}.")
    if high is not None and (value >= high if high_open else value > high):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise ValueError(f"`{name}` must be {bound}, got {value!r}.")


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_token_indices(indices):
    """`trainable_token_indices` as PEFT takes it: a list of token ids (≥ 0) for the input embedding, or {embedding
    module name: such a list}; empty lists mean no rows (None, or the entry dropped). Anything else is refused, naming
    the setting (PEFT failed at the first forward, deep in `index_copy_`)."""
    def token_id(value) -> Optional[int]:
        """An integer ≥ 0 as a Python int (NumPy's integers too, as PEFT takes them); None for anything else."""
        if isinstance(value, bool):
            return None
        try:
            index = operator.index(value)
        except TypeError:
            return None
        return index if index >= 0 else None

    def token_ids(value, where):
        ids = [token_id(v) for v in value] if isinstance(value, (list, tuple)) else [None]
        if None in ids:
            raise ValueError(f"`trainable_token_indices`{where} must be a list of token ids (integers ≥ 0), e.g. "
                             f"[0, 5], got {value!r}. Use `tokenizer.convert_tokens_to_ids(new_tokens)`.")
        return ids

    if indices is None:
        return None
    if isinstance(indices, dict):
        if not all(isinstance(key, str) for key in indices):
            raise ValueError(f"`trainable_token_indices` as a dict maps embedding module names (e.g. 'embed_tokens') "
                             f"to lists of token ids, got keys {list(indices)!r}.")
        checked = {key: token_ids(value, f"[{key!r}]") for key, value in indices.items()}
        return {key: value for key, value in checked.items() if value} or None
    return token_ids(indices, "") or None


MAX_GATE_INIT = 20.0  # |initial logit| of a sigmoid gate: σ'(±20) = 2e-9, a gate started further out never moves


def _check_gate_init(name: str, value) -> None:
    """A sigmoid gate's initial logit: a finite number within ±MAX_GATE_INIT."""
    _check_number(name, value)
    if abs(value) > MAX_GATE_INIT:
        raise ValueError(
            f"`{name}`={value!r} starts a sigmoid gate at σ = {1 / (1 + math.exp(-max(min(value, 700), -700))):.3g}, "
            f"where its gradient (< 2e-9) can never move it, and hira_scaling='lora' divides the scale by that "
            f"level. Use a value within ±{MAX_GATE_INIT:g} (e.g. -4 for gates starting almost closed, σ = 0.018)."
        )


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


@dataclass
class GateRAConfig(PeftConfig):
    """
    Configuration of a GateRA adapter: a per-token gate on a parameter-efficient branch.

    `y = base(x) + σ(α) · g(x) · Δy(x)`: `g(x)` is one multiplier per token, GateRA's `σ(w·x + b)`
    (`gate="sigmoid"`), TS-PEFT's hard selector `1[‖Δy‖ / ‖W0 x‖ ≥ τ]` (`gate="threshold"`) or 1 (`gate="none"`);
    `σ(α)` is an optional per-module gate (`structure_gate=True`, Structure-Learnable Adapter); `Δy(x)` is HiRA's
    `(W0 ⊙ BA) x` (`branch="hira"`), LoRA's `(lora_alpha / r) · BA x` (`branch="lora"`) or DoRA's change of output
    (`branch="dora"`). The penalties (entropy of sigmoid gates, kept fraction of threshold gates, sparsity of
    structure gates) are applied inside the gated layers' backward pass, so every trainer applies them without extra
    code. The maths: docs/method.md (in the source repository and the sdist).

    Args:
        r: rank of the branch factors `A` (r × d_in) and `B` (d_out × r).
        target_modules: module names (list: exact or suffix match; str: regex) to adapt, or `"all-linear"`.
        exclude_modules: module names (same matching) never to adapt.
        layers_to_transform / layers_pattern: restrict adaptation to these layer indices (PEFT semantics).
        rank_pattern / alpha_pattern: per-module overrides of `r` / `lora_alpha`, keyed by regex.
        modules_to_save: extra modules trained in full and saved with the adapter.
        branch: `"hira"` (default), `"lora"` or `"dora"`.
        gate: `"sigmoid"` (default, GateRA), `"threshold"` (TS-PEFT) or `"none"` (plain branch; can be merged).
        lora_alpha: LoRA scaling numerator (`scaling = lora_alpha / r`); LoRA and DoRA branches, and the HiRA branch
            with hira_scaling='lora'; default `r`.
        hira_scaling: the HiRA branch's scale `s`: `"lora"` (the default with branch='hira':
            `(lora_alpha / r) / (RMS(W0) · g0)`, `g0` the gates' product at step 0, e.g. σ(gate_bias_init): a step
            moves the output as much as a step of LoRA with the same `r` and `lora_alpha`, so LoRA learning rates
            carry over), `"rms"` (`1 / RMS(W0)` per layer) or `"none"` (1, PEFT's HiRA exactly; the value LoRA and
            DoRA branches take). Computed from the base weight when the adapter is created (at the first forward if the base
            weights are still on the meta device), and again when it is loaded.
        gate_lr_ratio: learning rate of the gate parameters (token gates' `w`, `b`, thresholds `τ`, structure `α`)
            relative to the optimizer's, applied by the Trainer integration when it builds the optimizer.
        dropout: dropout probability on the branch input (the gate always reads the undropped input).
        gate_bias_init: initial gate bias `b`; 0 gives `g = 0.5` at step 0.
        entropy_weight: weight λ of the entropy penalty on sigmoid gates; 0 switches it off. Default:
            `DEFAULT_ENTROPY_WEIGHT` for `gate="sigmoid"`, else 0.
        init_weights: `True`: `B = 0` so the adapted model equals the base model at step 0; `False`: random `B`
            (for tests and debugging only).
        per_layer_stats: also log mean gate, entropy and open fraction per adapted module.
        threshold_init / threshold_temperature: initial τ of threshold gates and the temperature T of their
            straight-through estimator (backward uses the gradient of `σ((r − τ) / T)`).
        keep_ratio / keep_ratio_weight: target fraction of tokens a threshold gate keeps, and the weight of the
            penalty `(kept fraction − keep_ratio)²` pulling towards it (none if `keep_ratio` is unset).
        structure_gate / structure_init / structure_weight: one learnable `σ(α)` per adapted module, its initial
            `α`, and the weight λ_s of the sparsity penalty `λ_s · mean σ(α)` (see `prune_structure`).
        sparse_threshold: ε > 0: in eval (and in training with `sparse_training=True`) tokens whose gate is below ε
            skip the branch entirely (gather the rest, compute, scatter); 0 (default): dense. The threshold gate
            reads the branch's output to select, so its branch runs for every token.
        cache_delta: in eval, keep the HiRA branch's dense `s·W0 ⊙ BA` between forwards (fast decoding).
        kernel: "auto" (the branch's PyTorch path, except in cases a GPU measurement lists in
            `kernels.TRITON_WINS`, none so far; on H100 / H200 class GPUs the gated HiRA branch's row operations on large
            rows run as Triton kernels, measured faster: `kernels/rows.py`), "triton" (the Triton kernels of the HiRA and LoRA branches, errors raised;
            off CUDA only under TRITON_INTERPRET=1) or "torch" (PyTorch's ops only).
    """

    r: int = field(default=32, metadata={"help": "Rank of the branch factors A (r x d_in) and B (d_out x r)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Modules to adapt: a list (exact name or suffix match), a regex string, or 'all-linear'. If "
            "unset, the architecture's default projections are chosen (as for PEFT's HiRA)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules never to adapt (list: exact or suffix match; str: regex)."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices (needs a list `target_modules`)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list that `layers_to_transform` indexes, e.g. 'layers'."}
    )
    rank_pattern: Optional[dict] = field(
        default_factory=dict, metadata={"help": "Per-module rank overrides: {regex: rank}."}
    )
    alpha_pattern: Optional[dict] = field(
        default_factory=dict, metadata={"help": "Per-module lora_alpha overrides: {regex: alpha} (the scale lora_alpha / r of every branch kind that uses it)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."}
    )
    ensure_weight_tying: bool = field(
        default=False,
        metadata={"help": "On a model with tied input and output embeddings (`tie_word_embeddings`), train one copy "
                  "for both when `modules_to_save` names either (as LoRA's option): the adapter saves the input "
                  "embedding's copy and the output layer reads it. False: each gets its own copy (PEFT's default)."},
    )
    branch: Literal["hira", "lora", "dora"] = field(
        default="hira", metadata={"help": f"Branch kind, one of {list(BRANCHES)}."}
    )
    gate: Literal["sigmoid", "threshold", "none"] = field(
        default="sigmoid", metadata={"help": f"Token gate kind, one of {list(TOKEN_GATES)}."}
    )
    lora_alpha: Optional[float] = field(
        default=None,
        metadata={"help": "LoRA scaling numerator, scaling = lora_alpha / r (lora / dora branches, or hira with "
                  "hira_scaling='lora'; default r)."},
    )
    hira_scaling: Optional[Literal["none", "rms", "lora"]] = field(
        default=None,
        metadata={"help": "HiRA branch scale: 'lora' (the default for branch='hira': (lora_alpha / r) / (RMS(W0) * "
                  "initial gate), steps as large as LoRA's at the same rate), 'rms' (1 / RMS(W0) per layer) or 'none' "
                  "(1, PEFT's HiRA exactly; the value for LoRA / DoRA branches)."},
    )
    gate_lr_ratio: float = field(
        default=1.0,
        metadata={"help": "Learning rate of the gate parameters relative to the optimizer's (Trainer integration)."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the branch input."})
    gate_bias_init: float = field(default=0.0, metadata={"help": "Initial gate bias b; 0 gives g = 0.5."})
    entropy_weight: Optional[float] = field(
        default=None,
        metadata={
            "help": f"Weight of the entropy penalty on the sigmoid token gates; 0 switches it off. Default "
            f"{DEFAULT_ENTROPY_WEIGHT} for gate='sigmoid', else 0."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: B = 0 (adapter is a no-op at step 0). False: random B, for debugging only."},
        repr=False,
    )
    per_layer_stats: bool = field(
        default=False, metadata={"help": "Also log gate statistics per adapted module."}
    )
    threshold_init: Optional[float] = field(
        default=None, metadata={"help": f"Initial τ of threshold gates (default {DEFAULT_THRESHOLD_INIT})."}
    )
    threshold_temperature: Optional[float] = field(
        default=None,
        metadata={"help": f"Temperature of the threshold gates' straight-through estimator (default "
                  f"{DEFAULT_THRESHOLD_TEMPERATURE})."},
    )
    keep_ratio: Optional[float] = field(
        default=None, metadata={"help": "Target fraction of tokens a threshold gate keeps (unset: no target)."}
    )
    keep_ratio_weight: Optional[float] = field(
        default=None, metadata={"help": f"Weight of the keep-ratio penalty (default {DEFAULT_KEEP_RATIO_WEIGHT})."}
    )
    structure_gate: bool = field(
        default=False, metadata={"help": "Add one learnable gate σ(α) per adapted module (Structure-Learnable Adapter)."}
    )
    structure_init: Optional[float] = field(
        default=None, metadata={"help": f"Initial α of structure gates (default {DEFAULT_STRUCTURE_INIT})."}
    )
    structure_weight: Optional[float] = field(
        default=None,
        metadata={"help": f"Weight of the structure sparsity penalty λ_s · mean σ(α) (default "
                  f"{DEFAULT_STRUCTURE_WEIGHT})."},
    )
    sparse_threshold: float = field(
        default=0.0, metadata={"help": "Tokens whose gate is below this skip the branch (eval, or sparse_training)."}
    )
    sparse_training: bool = field(
        default=False, metadata={"help": "Also skip closed tokens in training (an approximation when > 0)."}
    )
    cache_delta: bool = field(
        default=False, metadata={"help": "In eval, cache the HiRA branch's dense update between forwards."}
    )
    kernel: Literal["auto", "triton", "torch"] = field(
        default="auto",
        metadata={"help": "'auto': PyTorch path, with Triton only where measured faster (the gated HiRA branch's row "
                          "operations on large rows, CUDA); 'triton'; 'torch': PyTorch's ops only."},
    )
    format_version: int = field(
        default=FORMAT_VERSION, metadata={"help": "Version of the saved adapter format (set by the package)."}
    )
    weights_sha256: Optional[str] = field(
        default=None, metadata={"help": "SHA-256 of adapter_model.safetensors, written by save_pretrained, checked on load."}
    )
    structure_stamp: Optional[dict] = field(
        default=None,
        metadata={"help": "Digests of the structural fields and tensor shapes, written by save_pretrained, checked on "
                  "load (a config edited after the save is refused)."},
    )
    # Read by PEFT and TRL on every config; GateRA targets modules, not bare parameters (docs/method.md, MoE section).
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Not supported by GateRA (it wraps modules); must stay unset."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Token rows of embedding layers to train alongside the adapter."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        _check_number("r", self.r, low=0, low_open=True, integer=True)
        _check_choice("branch", self.branch, BRANCHES)
        _check_choice("gate", self.gate, TOKEN_GATES)
        _check_choice("kernel", self.kernel, KERNELS)
        if self.kernel == "triton" and self.branch == "dora":
            raise ValueError(
                "kernel='triton' has no kernels for branch='dora' (DoRA runs PyTorch's ops: `ops/dora.py`), so it would "
                "not run them. Use kernel='auto' or kernel='torch' with branch='dora'."
            )
        if self.kernel == "triton" and not triton_runs_here():
            from .serialization import reading_saved_config

            if reading_saved_config.get():  # (an adapter trained with the kernels, loaded where they cannot run)
                warnings.warn(
                    "This adapter was saved with kernel='triton', whose kernels cannot run here (no `triton` package, "
                    "or no CUDA device); it is loaded with kernel='auto', the PyTorch path (the same results), which "
                    "a later save_pretrained writes. Set `kernel` on the loaded config to keep another.",
                    UserWarning, stacklevel=2,
                )
                self.kernel = "auto"
            elif not triton_available():
                raise ValueError("kernel='triton' needs the `triton` package: `pip install gatera-plugin[triton]`.")
        self.hira_scaling = resolved_hira_scaling(self.branch, self.hira_scaling)
        _check_choice("hira_scaling", self.hira_scaling, HIRA_SCALINGS)
        if self.lora_alpha is not None:
            if not self.uses_lora_alpha:
                raise ValueError(
                    f"`lora_alpha` only applies to branch='lora' or 'dora', or to branch='hira' with "
                    f"hira_scaling='lora' (docs/method.md, section 'Branches'), got lora_alpha={self.lora_alpha!r} "
                    f"with branch={self.branch!r}, hira_scaling={self.hira_scaling!r}. Remove `lora_alpha`, or set "
                    "hira_scaling='lora' to scale the HiRA branch like LoRA."
                )
            _check_number("lora_alpha", self.lora_alpha, low=0, low_open=True)
        if self.hira_scaling != "none" and self.branch != "hira":
            raise ValueError(
                f"`hira_scaling`={self.hira_scaling!r} scales the HiRA branch, but branch={self.branch!r}. Remove "
                "`hira_scaling` (LoRA and DoRA branches scale by lora_alpha / r) or set branch='hira'."
            )
        _check_number("gate_lr_ratio", self.gate_lr_ratio, low=0, low_open=True)
        _check_number("dropout", self.dropout, low=0, high=1, high_open=True)
        _check_gate_init("gate_bias_init", self.gate_bias_init)
        if self.entropy_weight is None:
            self.entropy_weight = DEFAULT_ENTROPY_WEIGHT if self.gate == "sigmoid" else 0.0
        _check_number("entropy_weight", self.entropy_weight, low=0)
        if self.entropy_weight > 0 and self.gate != "sigmoid":
            raise ValueError(
                f"`entropy_weight`={self.entropy_weight} needs sigmoid token gates, but gate={self.gate!r}. Set "
                "entropy_weight=0 or gate='sigmoid'."
            )
        self._check_gate_options()
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"`init_weights` must be True or False, got {self.init_weights!r}.")
        if not isinstance(self.per_layer_stats, bool):
            raise ValueError(f"`per_layer_stats` must be True or False, got {self.per_layer_stats!r}.")
        if not isinstance(self.ensure_weight_tying, bool):
            raise ValueError(f"`ensure_weight_tying` must be True or False, got {self.ensure_weight_tying!r}.")
        self.modules_to_tie = None  # names tied to the input embedding's copy, set by GateRAModel (not saved)
        _check_number("format_version", self.format_version, low=1, integer=True)
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This adapter was saved in GateRA format version {self.format_version}, but this installation of "
                f"gatera_plugin reads versions up to {FORMAT_VERSION}. Upgrade gatera_plugin "
                "(`pip install -U gatera-plugin`) to load it."
            )
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if pattern is None:
                setattr(self, name, {})
                continue
            if not isinstance(pattern, dict):
                raise ValueError(f"`{name}` must be a dict {{module regex: value}}, got {type(pattern).__name__}.")
            for key, value in pattern.items():
                if name == "rank_pattern":
                    _check_number(f"rank_pattern[{key!r}]", value, low=0, low_open=True, integer=True)
                else:
                    _check_number(f"alpha_pattern[{key!r}]", value, low=0, low_open=True)
        if self.alpha_pattern and not self.uses_lora_alpha:
            raise ValueError("`alpha_pattern` only applies to branch='lora' or 'dora', or to branch='hira' with "
                             "hira_scaling='lora' (the HiRA branch's other scales do not use lora_alpha).")
        if self.target_parameters:
            raise ValueError(
                f"`target_parameters` is not supported by GateRA, got {self.target_parameters!r}: GateRA wraps modules "
                "(its gate reads a module's input per token), not bare parameters such as the fused 3-D expert weights "
                "of transformers-5 MoE models. Use `target_modules` for the modules GateRA can adapt (the experts then "
                "stay frozen), or PEFT's `LoraConfig(target_parameters=...)` to adapt the experts. See "
                "docs/method.md, section \"Mixture-of-experts models and classification heads\"."
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, (list, set, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"`{name}` must be a list of module names or a regex string, got {value!r}.")
            setattr(self, name, set(value))
        saved = self.modules_to_save
        if saved is not None:
            if not isinstance(saved, (list, set, tuple)) or not all(isinstance(v, str) for v in saved):
                example = f"[{saved!r}]" if isinstance(saved, str) else "['lm_head']"
                raise ValueError(f"`modules_to_save` must be a list of module names, e.g. {example}, got {saved!r}.")
            self.modules_to_save = list(dict.fromkeys(saved))  # (PEFT extends it: a list, whatever was given)
        self.trainable_token_indices = _checked_token_indices(self.trainable_token_indices)
        patterns = [(name, getattr(self, name)) for name in ("target_modules", "exclude_modules")
                    if isinstance(getattr(self, name), str)]
        patterns += [(f"{name} key", key) for name in ("rank_pattern", "alpha_pattern") for key in getattr(self, name)]
        for name, pattern in patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise ValueError(f"`{name}` {pattern!r} is not a valid regular expression ({error}). Fix the pattern, "
                                 "or pass a list of module names (matched exactly or as a suffix).") from None
        if isinstance(self.target_modules, set) and not self.target_modules:
            raise ValueError("`target_modules` is an empty list; name at least one module or use 'all-linear'.")
        layers = self.layers_to_transform
        if layers is not None and not (_is_index(layers) or (isinstance(layers, list) and all(map(_is_index, layers)))):
            raise ValueError(f"`layers_to_transform` must be a layer index or a list of them (e.g. [0, 1]), got "
                             f"{layers!r} ({type(layers).__name__}).")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regex string.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a regex string.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform` to be set as well.")

    @classmethod
    def check_kwargs(cls, **kwargs):
        """A saved config without a field that changes the model was saved before the field existed, and meant its
        value of that time (`BEFORE_FIELD_EXISTED`), which is not always today's default (PEFT calls this on load)."""
        kwargs = super().check_kwargs(**kwargs)
        return {**BEFORE_FIELD_EXISTED, **kwargs}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """As PEFT's, but refuses a folder whose adapter_config.json is another method's (PEFT would return that
        method's config class instead)."""
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (ValueError, TypeError) as error:
            if "adapter_config.json" in str(error):
                raise
            path = Path(pretrained_model_name_or_path, subfolder or "", "adapter_config.json")
            raise ValueError(f"{path}: {error}") from None
        if not isinstance(config, GateRAConfig):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {getattr(config.peft_type, 'value', config.peft_type)} adapter "
                "config, not a GateRA one. Load it "
                f"with `PeftConfig.from_pretrained` (which returns a {type(config).__name__}), or point to a GateRA "
                "adapter folder."
            )
        return config

    def _check_gate_options(self) -> None:
        """Options of one gate kind may not be set for another; unset ones take their defaults."""
        threshold_options = ("threshold_init", "threshold_temperature", "keep_ratio", "keep_ratio_weight")
        if self.gate != "threshold":
            for name in threshold_options:
                if getattr(self, name) is not None:
                    raise ValueError(f"`{name}` only applies to gate='threshold', got gate={self.gate!r}.")
        else:
            if self.threshold_init is None:
                self.threshold_init = DEFAULT_THRESHOLD_INIT
            if self.threshold_temperature is None:
                self.threshold_temperature = DEFAULT_THRESHOLD_TEMPERATURE
            _check_number("threshold_init", self.threshold_init)
            _check_number("threshold_temperature", self.threshold_temperature, low=0, low_open=True)
            if self.keep_ratio is not None:
                _check_number("keep_ratio", self.keep_ratio, low=0, high=1, low_open=True)
                if self.keep_ratio_weight is None:
                    self.keep_ratio_weight = DEFAULT_KEEP_RATIO_WEIGHT
            elif self.keep_ratio_weight is not None:
                raise ValueError("`keep_ratio_weight` needs a `keep_ratio` target (a fraction in (0, 1]).")
            if self.keep_ratio_weight is not None:
                _check_number("keep_ratio_weight", self.keep_ratio_weight, low=0)
        if not isinstance(self.structure_gate, bool):
            raise ValueError(f"`structure_gate` must be True or False, got {self.structure_gate!r}.")
        if not self.structure_gate:
            for name in ("structure_init", "structure_weight"):
                if getattr(self, name) is not None:
                    raise ValueError(f"`{name}` only applies with structure_gate=True.")
        else:
            if self.structure_init is None:
                self.structure_init = DEFAULT_STRUCTURE_INIT
            if self.structure_weight is None:
                self.structure_weight = DEFAULT_STRUCTURE_WEIGHT
            _check_gate_init("structure_init", self.structure_init)
            _check_number("structure_weight", self.structure_weight, low=0)
        _check_number("sparse_threshold", self.sparse_threshold, low=0, high=1, high_open=True)
        for name in ("sparse_training", "cache_delta"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.sparse_training and self.sparse_threshold == 0:
            raise ValueError("`sparse_training=True` needs `sparse_threshold` > 0 (the gate value below which tokens skip).")
        if self.cache_delta and self.branch != "hira":
            raise ValueError("`cache_delta` caches the HiRA branch's dense update; it needs branch='hira'.")
        self._check_new_adapter_settings()

    def _check_new_adapter_settings(self) -> None:
        """Refuse settings that a new adapter would ignore, or that would train nothing; not for a config read from a
        saved folder (`serialization.reading_saved_config`) or built for inference, which load what was saved."""
        from .serialization import reading_saved_config

        if self.inference_mode or reading_saved_config.get():
            return
        if (self.gate == "threshold" and self.threshold_init > 0 and self.init_weights is True
                and self.keep_ratio is None):
            raise ValueError(
                f"`threshold_init`={self.threshold_init} with init_weights=True and no keep_ratio: B = 0 at step 0, so "
                "every token's r = ‖Δy‖ / ‖W0 x‖ is 0, below τ; every token is dropped and the adapter never gets a "
                "gradient. Use threshold_init <= 0 (the default 0 starts dense and τ learns from there), "
                "init_weights=False (a random B), or a keep_ratio (its penalty pulls τ down)."
            )
        if self.gate != "sigmoid" and self.gate_bias_init != 0:
            raise ValueError(
                f"`gate_bias_init`={self.gate_bias_init} sets a sigmoid token gate's initial bias, but "
                f"gate={self.gate!r}, which has none: it would be ignored. Remove `gate_bias_init`, or set "
                "gate='sigmoid'."
            )
        if self.sparse_threshold > 0 and self.gate != "sigmoid" and not self.structure_gate:
            raise ValueError(
                f"`sparse_threshold`={self.sparse_threshold} skips the tokens whose sigmoid or structure gate is "
                f"below it, but gate={self.gate!r} without structure_gate has neither (a threshold gate reads every "
                "token's branch output): it would be ignored. Remove `sparse_threshold`, or set gate='sigmoid' or "
                "structure_gate=True."
            )
        if self.gate_lr_ratio != 1 and self.gate == "none" and not self.structure_gate:
            raise ValueError(
                f"`gate_lr_ratio`={self.gate_lr_ratio} sets the rate of the gates' parameters, but gate='none' "
                "without structure_gate has none: it would be ignored. Remove `gate_lr_ratio`, or add gates "
                "(gate='sigmoid' / 'threshold', or structure_gate=True)."
            )

    @property
    def is_gated(self) -> bool:
        """True when the adapter has a per-token gate (then it cannot be merged into the base weight)."""
        return self.gate != "none"

    @property
    def uses_lora_alpha(self) -> bool:
        """True when `lora_alpha` / `alpha_pattern` enter the branch scale."""
        return lora_alpha_applies(self.branch, self.hira_scaling)

    @property
    def scale_reads_base_weight(self) -> bool:
        """True when the branch scale depends on W0 (HiRA with hira_scaling 'rms' or 'lora')."""
        return self.branch == "hira" and self.hira_scaling != "none"

    def scaling_for(self, r: int, lora_alpha: Optional[float], weight_rms: Callable[[], float] = lambda: 1.0,
                    gate_level: float = 1.0) -> float:
        """Branch scale `s` (docs/method.md): HiRA 1, `1 / RMS(W0)` (hira_scaling='rms') or
        `(lora_alpha / r) / (RMS(W0) · gate_level)` (hira_scaling='lora'); LoRA / DoRA `lora_alpha / r`. `lora_alpha`
        defaults to r; `weight_rms` is called only when the scale reads W0; `gate_level` is the gates' product at
        step 0."""
        lora_scale = (r if lora_alpha is None else lora_alpha) / r
        if self.branch != "hira":
            return lora_scale
        if self.hira_scaling == "rms":
            return 1.0 / weight_rms()
        if self.hira_scaling == "lora":
            return lora_scale / (weight_rms() * gate_level)
        return 1.0
