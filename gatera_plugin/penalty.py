"""The gate penalties (entropy on token gates, TS-PEFT's keep ratio, the structure gates' sparsity), applied inside
each gated layer's backward, and the gate statistics.

The entropy penalty (docs/method.md, "Penalties and their normalisation"; the normalisation is ours) is

    P = λ · (1 / (N · L)) · Σ_layers Σ_real tokens H(g) / log 2,      H(g) = −[g log g + (1−g) log(1−g)]

with `N` the number of real (non-padding) tokens of the optimisation step (all micro-batches, all data-parallel
ranks) and `L` the number of gated layers; `P` lies in [0, λ].

Why not `loss = task_loss + P`: TRL's SFTTrainer recomputes the loss from a fused LM head and never reads a loss the
model adds to its outputs, and with reentrant gradient checkpointing (forced by TRL for ZeRO-3) a penalty tensor
stashed during forward has no graph. Instead each gated layer passes its gate through `_PenaltyTap`, an identity in
forward whose backward adds `∂P/∂g` to the incoming gradient (the pattern Megatron uses for MoE auxiliary losses).
Every trainer, every checkpointing mode and every parallelism that runs the layer's backward once per micro-batch
therefore applies the penalty exactly once, with no code outside this package.

Each rank's backward adds `λ · W / (N · L) · ∂H/∂g` per real token, where `W` is the data-parallel world size
(DDP and DeepSpeed average gradients across ranks). `N` and the loss scale of fp16 training are set once per
optimisation step by `trainer_integration` from the micro-batches the Trainer has already prefetched. Where those
cannot be counted (trainers that build the model's inputs after generation: GRPO, RLOO, distillation), `N` is the
real tokens of the current forward × the forwards per step × `W`: the penalty is then the mean over forwards of each
forward's token mean. Outside a Trainer, `N` is the real tokens of the current forward (so `loss.backward()` in a
plain loop gets the gradient of `task_loss + P`).

Gate statistics are recorded in the same backward, which also runs exactly once per micro-batch under gradient
checkpointing (a forward-side record would count recomputed forwards twice).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

LOG2 = math.log(2.0)
# Gates are clamped to [ENTROPY_EPS, 1 − ENTROPY_EPS] before the logs (docs/method.md, "Penalties").
ENTROPY_EPS = 1e-6


class GateValues:
    """Gate values g (any shape) in float32, as one penalty tap's backward reads them: `g`, `clamped` (g clamped to
    [ε, 1 − ε]) and `logit` = log(g_c / (1 − g_c)), computed once and shared by the statistics (H) and the entropy
    term's gradient (−logit / log 2)."""

    def __init__(self, gate: torch.Tensor):
        self.g = gate.float()
        self.clamped = self.g.clamp(ENTROPY_EPS, 1.0 - ENTROPY_EPS)

    @functools.cached_property
    def logit(self) -> torch.Tensor:
        return torch.logit(self.clamped)

    def entropy_nats(self) -> torch.Tensor:
        """`H(g_c)` in nats: `softplus(l) − g l` with l = logit(g_c) (= −log(1−g) − g (log g − log(1−g))). Within
        1e-6 of H in float64 for every g; for g within 1e-5 of 1 (H below 2e-4) that is up to a few % of H (two terms
        near l cancel), which the logged means do not show."""
        return torch.addcmul(F.softplus(self.logit), self.clamped, self.logit, value=-1.0)

    def entropy_grad(self, factor: float = 1.0) -> torch.Tensor:
        """`factor · ∂(H(g) / log 2)/∂g = factor · log((1 − g) / g) / log 2 = −factor · logit(g) / log 2`, and 0
        where the clamp is active (and for NaN)."""
        grad = self.logit.mul(-factor / LOG2)
        return grad.masked_fill_(self.clamped != self.g, 0.0)  # (NaN too: NaN != NaN)


def binary_entropy(gate: torch.Tensor) -> torch.Tensor:
    """`H(g) / log 2` elementwise, in [0, 1], with `g` clamped to [ε, 1 − ε]."""
    return GateValues(gate).entropy_nats().mul_(1.0 / LOG2)


def binary_entropy_grad(gate: torch.Tensor) -> torch.Tensor:
    """`∂(H(g) / log 2)/∂g = log((1 − g) / g) / log 2`, and 0 where the clamp to [ε, 1 − ε] is active."""
    return GateValues(gate).entropy_grad()


# Device types without float64 arithmetic (Apple's MPS): the gate statistics are summed in float32 there.
DEVICES_WITHOUT_FLOAT64 = frozenset({"mps"})


def statistics_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the gate statistics' sums on `device`: float64, or float32 where the device has no float64."""
    return torch.float32 if device.type in DEVICES_WITHOUT_FLOAT64 else torch.float64


def collective_device(device: torch.device) -> torch.device:
    """Where the default process group can all-reduce a tensor that lives on `device`: `device` itself, or the current
    CUDA device for a CPU tensor under a NCCL-only group (FSDP2's CPU offload keeps the adapter on the CPU, and
    `torchrun` with `init_process_group("nccl")` gives no CPU backend; accelerate adds gloo)."""
    backend = str(torch.distributed.get_backend())  # "nccl", "gloo" or "cpu:gloo,cuda:nccl"
    if ":" in backend:
        device_types = {part.split(":")[0] for part in backend.split(",")}
    else:
        device_types = set(torch.distributed.Backend.backend_capability.get(backend, [device.type]))
    if device.type in device_types or "cuda" not in device_types or not torch.cuda.is_available():
        return device
    return torch.device("cuda", torch.cuda.current_device())


class GateStats:
    """Running sums of one gated layer's statistics over real tokens, accumulated on the gate's device.

    `add` takes the gate values (`GateValues` of an (N, 1) gate) and a mask of real tokens (N, 1) or None;
    `pop_tensor` returns and clears the sums: `tokens`, `gate` (Σ g), `entropy` (Σ H(g)/log 2), `open` (count of
    g > 0.5) and `batch_gate_sq` (Σ over backwards of n · (the micro-batch's mean g)²: with `gate` and `tokens`, the
    token-weighted mean of a squared deviation of each micro-batch's mean, which the keep-ratio penalty applies).
    """

    KEYS = ("tokens", "gate", "entropy", "open", "batch_gate_sq")

    def __init__(self):
        self._sums: Optional[torch.Tensor] = None  # (5,) `statistics_dtype`: tokens, Σg, ΣH (nats), Σ[g>0.5], Σ n ḡ²
        self.recorded = False  # a backward reached the gate since the layer was built (never cleared)

    @torch.no_grad()
    def add(self, values: GateValues, mask: Optional[torch.Tensor]) -> None:
        """Add one backward's sums (a few small ops: this runs once per gated layer per micro-batch)."""
        g = values.g  # (N, 1)
        # (N, 4): 1, g, H(g) in nats (scaled to H/log 2 in `pop_tensor`, once), and g rounded half to even, which
        # is 1 exactly where g > 0.5 for g in [0, 1]
        columns = torch.cat([torch.ones_like(g), g, values.entropy_nats(), g.round()], 1)
        sums = columns.sum(0) if mask is None else mask.reshape(1, -1).to(g.dtype).mm(columns).reshape(-1)  # (4,)
        sums = torch.cat([sums, (sums[1] * sums[1] / sums[0].clamp(min=1)).reshape(1)])  # (5,): n ḡ² = (Σg)² / n
        if self._sums is None:
            self._sums = sums.to(statistics_dtype(g.device))
        else:  # float32 sums into the float64 running sums, promoted inside the add
            self._sums.add_(sums.to(self._sums.device))
        self.recorded = True

    def pop_tensor(self) -> Optional[torch.Tensor]:
        """The (5,) sums (tokens, Σg, ΣH/log 2, open count, Σ n ḡ²), then cleared; None if nothing was recorded."""
        sums, self._sums = self._sums, None
        if sums is not None:
            sums[2].mul_(1.0 / LOG2)  # `add` sums H(g) in nats
        return sums


class _ReplayingPartial(functools.partial):
    """A `functools.partial` that runs with `run._replaying` set to `batch`; to introspection (`func`, `args`,
    `keywords`) the same as the partial it copies."""

    def __call__(self, *args, **kwargs):
        outer, self.run._replaying = self.run._replaying, self.batch
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self.run._replaying = outer


def real_token_mask(attention_mask, position_ids, shape) -> Optional[torch.Tensor]:
    """(B, T) bool mask of the real tokens of a forward whose inputs have `shape` (B, T), or None: every position is
    real.

    A 2-D `attention_mask` is nonzero at real tokens; one longer than the inputs (a forward continuing from a KV cache:
    transformers takes the mask of the cached positions and the new ones) is read at its last T columns, the inputs'
    own. Without one, a padding-free batch (TRL's `padding_free` /
    `packing=True`: sequences flattened into one row, `position_ids` (B, T) restarting at 0 for each) that was padded
    to a multiple (`pad_to_multiple_of`) ends in padding with `position_ids` 0: the positions after a row's last
    positive position id are padding. (A last sequence of one token is then counted as padding too; a row without a
    positive position id counts in full.) A mask of another shape (a 4-D one of custom packing, from which padding
    cannot be told: padded rows often attend to themselves) is read as no mask (`warn_of_unread_mask`).
    """
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        if len(shape) == 2 and attention_mask.shape[0] == shape[0] and 0 < shape[1] < attention_mask.shape[1]:
            attention_mask = attention_mask[:, -shape[1]:]
        return attention_mask.bool()
    if not isinstance(position_ids, torch.Tensor) or tuple(position_ids.shape) != tuple(shape) or len(shape) != 2:
        return None
    positions = torch.arange(position_ids.shape[1], device=position_ids.device)
    last_positive = torch.where(position_ids > 0, positions, -1).amax(dim=1, keepdim=True)  # (B, 1)
    last_real = torch.where(last_positive >= 0, last_positive, position_ids.shape[1] - 1)
    return positions <= last_real


_UNREAD_MASK_DIMS: set[int] = set()  # numbers of dimensions of attention masks warned about


def warn_of_unread_mask(mask_shape: tuple, input_shape: tuple) -> None:
    """Once per number of mask dimensions: GateRA could not read padding from the `attention_mask` of a training
    forward (`real_token_mask` gave None for it)."""
    if len(mask_shape) in _UNREAD_MASK_DIMS:
        return
    _UNREAD_MASK_DIMS.add(len(mask_shape))
    warnings.warn(f"GateRA reads padding from a 2-D (batch, sequence) attention_mask only: with one of shape "
                  f"{mask_shape} (inputs {input_shape}) and no position_ids, the gate penalty's token mean and the "
                  f"gate statistics count every position as a real token, padding included. To leave padding out, "
                  f"pass position_ids (each packed sequence from 0, padding at a row's end as 0) or the 2-D mask.",
                  stacklevel=2)


@dataclass
class ForwardBatch:
    """What the model's forward pre-hook recorded about one forward's inputs."""

    attention_mask: Optional[torch.Tensor]  # (B, T) bool, or None: every position is a real token
    num_positions: int  # batch × sequence length
    tallied: bool = False  # counted in the step's tally of forwards with gradient
    # an encoder-decoder model's decoder inputs (their own mask and positions), which its decoder's layers read
    decoder: Optional[ForwardBatch] = None
    _tokens: Optional[int] = field(default=None, repr=False)

    @property
    def tokens(self) -> int:
        """Real tokens (counted on first use: it syncs with the device)."""
        if self._tokens is None:
            mask = self.attention_mask
            self._tokens = int(mask.sum()) if mask is not None else self.num_positions
        return self._tokens


@dataclass
class PenaltyRun:
    """What the gated layers of one GateRA model share while training.

    Set by the model's forward pre-hook (`set_batch`) and, inside a `transformers.Trainer`, once per optimisation
    step by `trainer_integration` (`begin_step`). `layer_counts[(adapter, kind)]` is the number of layers with a gate
    of that kind ("sigmoid", "threshold", "structure"), the `L` of each penalty's mean.
    """

    step_tokens: Optional[float] = None  # real tokens of the whole optimisation step, all ranks (Trainer only)
    step_micro_batches: int = 1  # forwards (micro-batches) per optimisation step on this rank
    world_size: int = 1  # data-parallel ranks whose gradients are averaged
    # the task loss's gradient on each rank relative to data parallelism's mean: fp16 loss scaling (and 1 / sp_size under
    # DeepSpeed's sequence parallelism, `trainer_integration.sequence_parallel_scale`)
    loss_scale: float = 1.0
    layer_counts: dict = field(default_factory=dict)
    # while a Trainer runs: forwards whose taps were live (gradient, training mode) since `begin_step`, and their
    # real tokens (a device tensor, summed without a sync), so that the integration can check its count of the step
    tally_forwards: int = 0
    tally_tokens: Optional[torch.Tensor] = field(default=None, repr=False)
    _tallying: bool = field(default=False, repr=False)
    _latest: ForwardBatch = field(default_factory=lambda: ForwardBatch(None, 0), repr=False)
    _latest_with_grad: ForwardBatch = field(default_factory=lambda: ForwardBatch(None, 0), repr=False)
    _replaying: Optional[ForwardBatch] = field(default=None, repr=False)
    # the step's collated micro-batches' (position_ids, attention_mask), for a trainer that drops the mask before the
    # forward (`collated_mask_for`)
    collated_masks: list = field(default_factory=list, repr=False)

    def collated_mask_for(self, position_ids) -> Optional[torch.Tensor]:
        """The collated `attention_mask` (B, T) of the micro-batch whose `position_ids` tensor (the very object) a
        forward without a mask got, else None. Axolotl deletes the mask of Gemma 3 / 4 `sample_packing` batches
        before the forward, so that transformers builds per-sequence masks from the position ids; those alone cannot
        tell the collator's padding (position ids 0, 1, ...) from one more packed sequence."""
        if not isinstance(position_ids, torch.Tensor):
            return None
        masks = [mask for positions, mask in self.collated_masks if positions is position_ids]
        # (one tensor shared by several micro-batches cannot tell them apart)
        return masks[0] if len(masks) == 1 and masks[0].shape == position_ids.shape else None

    def set_batch(self, attention_mask: Optional[torch.Tensor], num_positions: int, position_ids=None,
                  shape=(), decoder: Optional[ForwardBatch] = None) -> ForwardBatch:
        """Record the token mask of a new forward (`real_token_mask`); `num_positions` = batch × sequence length,
        `shape` the inputs' (batch, sequence); `decoder`: an encoder-decoder model's decoder inputs. Returns the record."""
        self._latest = ForwardBatch(real_token_mask(attention_mask, position_ids, shape), num_positions,
                                    decoder=decoder)
        if torch.is_grad_enabled():
            self._latest_with_grad = self._latest
        return self._latest

    @property
    def batch(self) -> ForwardBatch:
        """The forward the gated layers are running now.

        A layer's forward inside a backward is a gradient-checkpointing recomputation, and a trainer may have run the
        same model since (a self-distillation teacher, a reference model with the adapter disabled, a second forward
        with gradient). A region checkpointed through transformers (`checkpointing`) replays the forward it was
        called in; any other recomputation takes the last forward with gradient.
        """
        if self._replaying is not None:
            return self._replaying
        return self._latest_with_grad if torch._C._current_graph_task_id() != -1 else self._latest

    def checkpointing(self, checkpoint_function):
        """Wrap a checkpointing function (`checkpoint(fn, *args)`, as transformers' layers call it) so that `fn`, in
        its first run and in its recomputation, sees the forward that called it."""

        @functools.wraps(checkpoint_function)
        def checkpoint_in_this_forward(function, *args, **kwargs):
            # transformers' layers pass a partial of the layer's forward, and some checkpoint functions read the layer
            # from it (Axolotl's `activation_offloading: legacy` reads `function.func.__self__`): a plain partial is
            # passed on as a copy of itself; anything else (a subclass may have its own `__call__`) is wrapped
            if type(function) is functools.partial and not function.__dict__:
                replay = _ReplayingPartial(function.func, *function.args, **function.keywords)
            else:
                replay = _ReplayingPartial(function.__call__ if isinstance(function, functools.partial) else function)
            replay.run, replay.batch = self, self.batch
            return checkpoint_function(replay, *args, **kwargs)

        checkpoint_in_this_forward.gatera_penalty_run = self
        return checkpoint_in_this_forward

    @property
    def attention_mask(self) -> Optional[torch.Tensor]:
        """(B, T) bool mask of the current forward's real tokens, or None: every position is real."""
        return self.batch.attention_mask

    def stack_batch(self, in_decoder: bool = False) -> ForwardBatch:
        """The inputs a layer sees: the current forward's, or, for a layer in an encoder-decoder model's decoder
        (`in_decoder`), the decoder's where the forward recorded them."""
        batch = self.batch
        return batch.decoder if in_decoder and batch.decoder is not None else batch

    @property
    def batch_tokens(self) -> int:
        """Real tokens of the current forward (counted on first use: it syncs with the device)."""
        return self.batch.tokens

    @property
    def in_trainer(self) -> bool:
        """Whether a Trainer's step is under way (`begin_step` ran and training has not ended)."""
        return self._tallying

    def begin_step(
        self, step_tokens: Optional[float], world_size: int = 1, loss_scale: float = 1.0, micro_batches: int = 1
    ):
        """Fix the normalisers for one optimisation step and restart the tally of its forwards.

        `step_tokens`: real tokens over all its micro-batches and ranks, or None where they cannot be counted in
        advance (then each forward is normalised by its own real tokens × `micro_batches` × `world_size`).
        `micro_batches`: the forwards with gradient that one step runs on this rank.
        """
        self.step_tokens = None if step_tokens is None else float(step_tokens)
        self.world_size = int(world_size)
        self.loss_scale = float(loss_scale)
        self.step_micro_batches = int(micro_batches)
        self.tally_forwards, self.tally_tokens, self._tallying = 0, None, True

    def end_training(self) -> None:
        """Return to per-forward normalisation (used after a Trainer run)."""
        self.step_tokens = None
        self.world_size = 1
        self.loss_scale = 1.0
        self.step_micro_batches = 1
        self.tally_forwards, self.tally_tokens, self._tallying = 0, None, False
        self.collated_masks = []

    def _tally_forward(self) -> None:
        """Count the current forward (once) in the step's tally; called by the taps, so only forwards with gradient.

        A recomputation inside backward (gradient checkpointing) counts the forward it replays (`batch`) if that
        forward's own run made no tap (reentrant checkpointing runs the layers without gradient), and nothing if it
        did (`tallied`).
        """
        batch = self.batch
        if not self._tallying or batch.tallied:
            return
        batch.tallied = True
        self.tally_forwards += 1
        mask = batch.attention_mask
        tokens = mask.sum() if mask is not None else torch.tensor(batch.num_positions)
        self.tally_tokens = tokens if self.tally_tokens is None else self.tally_tokens + tokens.to(self.tally_tokens)

    def token_mask(self, layout: tuple, device: torch.device, in_decoder: bool = False) -> Optional[torch.Tensor]:
        """Mask (N, 1) of real tokens on `device` for a layer input x laid out as `layout` (x.shape[:-1]); None when
        every position counts. `in_decoder`: the layer is in an encoder-decoder model's decoder (`stack_batch`).

        The mask applies when the input is laid out as (batch, sequence) like the model input, or flattened from it to
        (batch · sequence,) (an MoE block's shared expert); inputs of any other layout (tokens routed to an expert,
        a sequence-first (sequence, batch) layout) count every position.
        """
        mask = self.stack_batch(in_decoder).attention_mask
        if mask is None:
            return None
        positions = tuple(layout)
        if positions != tuple(mask.shape) and positions != (mask.numel(),):
            return None
        return mask.to(device).reshape(-1, 1)

    def own_positions(self, x: torch.Tensor, in_decoder: bool = False) -> Optional[int]:
        """The positions of a layer input x (..., d) whose count is not the model input's (a vision tower's patches,
        tokens routed to an expert), else None: x holds the model's tokens (in their layout, flattened or not), or, in
        an encoder-decoder model's decoder, the decoder's."""
        batch = self.stack_batch(in_decoder)
        positions = x.shape[:-1].numel()
        return positions if positions != batch.num_positions else None  # (0: no tokens recorded, e.g. audio features)

    def token_scale(self, adapter_name: str, kind: str, weight: float, own_positions: Optional[int] = None,
                    in_decoder: bool = False) -> float:
        """Factor on a per-token penalty term's gradient in this rank's backward: λ·W·loss_scale / (N·L).

        `own_positions` (`own_positions(x)`): the layer does not see the model's tokens, so its term is the mean over
        its own positions in each forward (N = own positions × forwards per step × ranks), which keeps it in [0, 1]
        however many positions it sees (a vision tower's patches may outnumber the text's tokens). A layer in an
        encoder-decoder model's decoder (`in_decoder`, with the decoder's inputs recorded) takes the mean over the
        decoder's real tokens of each forward (N = those × forwards per step × ranks): the step's count is the
        encoder's.
        """
        self._tally_forward()
        layers = self.layer_counts.get((adapter_name, kind), 0)
        if weight == 0.0 or layers == 0:
            return 0.0
        decoder = self.batch.decoder if in_decoder else None
        if own_positions is not None:
            tokens = own_positions * self.step_micro_batches * self.world_size
        elif decoder is not None:
            tokens = decoder.tokens * self.step_micro_batches * self.world_size
        elif self.step_tokens is not None:
            tokens = self.step_tokens
        else:  # this forward's tokens stand for each of the step's forwards on each rank
            tokens = self.batch_tokens * self.step_micro_batches * self.world_size
        if tokens <= 0:
            return 0.0
        return weight * self.world_size * self.loss_scale / (tokens * layers)

    def module_scale(self, adapter_name: str, kind: str, weight: float) -> float:
        """Factor on a per-module penalty term's gradient per forward: λ_s·loss_scale / (L_s · micro-batches).

        Every rank adds the whole penalty's gradient (its forwards sum to it), so the data-parallel average keeps it.
        """
        self._tally_forward()
        layers = self.layer_counts.get((adapter_name, kind), 0)
        if weight == 0.0 or layers == 0:
            return 0.0
        return weight * self.loss_scale / (layers * self.step_micro_batches)


def entropy_term_grad(values: GateValues, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """`scale` times the per-token gradient of the entropy penalty's summand `H(g)/log 2` (N, 1) float32."""
    return values.entropy_grad(scale)


def keep_ratio_term_grad(target: float):
    """`scale` times the per-token gradient of `n · (k − ρ)²` with k the micro-batch's kept fraction: `2 (k − ρ)`
    for every token.

    The penalty is `λ_k · (1/L) Σ_layers Σ_micro-batches (n_mb / N) (k_mb − ρ)²`, the token-weighted mean over
    micro-batches of the squared deviation of each micro-batch's kept fraction; its gradient per token is known when
    the micro-batch's own backward runs.
    """

    def grad(values: GateValues, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        s = values.g
        kept = (s * mask).sum() / mask.sum().clamp(min=1) if mask is not None else s.mean()
        return torch.full_like(s, 2.0 * scale).mul_(kept - target)

    return grad


def constant_term_grad(values: GateValues, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """`scale` times the gradient of a penalty linear in the value (the structure penalty λ_s · σ(α))."""
    return torch.full_like(values.g, scale)


class _PenaltyTap(torch.autograd.Function):
    """Identity on a gate value; backward adds `term_grad(values, mask, scale)` (masked) and records statistics."""

    @staticmethod
    def forward(ctx, value, mask, scale, term_grad, stats):
        # The mask stays on ctx, not among the saved tensors: non-reentrant gradient checkpointing recomputes saved
        # tensors, and the recomputation must not depend on which forward the model ran last.
        ctx.save_for_backward(value)
        ctx.mask, ctx.scale, ctx.term_grad, ctx.stats = mask, scale, term_grad, stats
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad_value):
        (value,) = ctx.saved_tensors
        mask = ctx.mask
        if ctx.stats is None and ctx.scale == 0.0:
            return grad_value, None, None, None, None
        values = GateValues(value)  # float32 values and logit, shared by the statistics and the penalty's gradient
        if ctx.stats is not None:
            ctx.stats.add(values, mask)
        if ctx.scale != 0.0:
            extra = ctx.term_grad(values, mask, ctx.scale)
            if mask is not None:
                extra.mul_(mask)
            grad_value = grad_value + extra.to(grad_value.dtype)
        return grad_value, None, None, None, None


def penalty_tap(value: torch.Tensor, mask: Optional[torch.Tensor], scale: float, term_grad, stats=None):
    """Pass `value` (N, 1) through unchanged; its backward adds `term_grad(GateValues(value), mask, scale)`, `scale`
    times the penalty term's gradient per value (N, 1), and records `stats`."""
    return _PenaltyTap.apply(value, mask, scale, term_grad, stats)
