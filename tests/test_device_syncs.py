"""On a GPU the host queues a training step's kernels ahead of the device; an op that reads a value back (`.item()`,
`bool(tensor)`, `nonzero`, a tensor built from host data) makes it wait for the GPU. GateRA's layers must not do that
once per layer: a gated step on CUDA stays asynchronous, like PEFT's LoRA and HiRA. Checked here on CPU by recording
the ATen ops that synchronise on CUDA, where they are issued from gatera_plugin's code."""

import collections
import traceback
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

import gatera_plugin
from gatera_plugin import GateRAConfig
from tests.helpers import LLAMA_PROJECTIONS, plain_trainer, tiny_llama, toy_texts

# ATen ops that make the host wait for a CUDA device: reading a value (`item`, `bool`, `int`, `float` →
# `_local_scalar_dense`, `equal`, `is_nonzero`), ops whose output size depends on the data (and indexing with a bool
# mask, `BOOL_INDEXING`), and tensors built from host data (`torch.tensor(...)` → `lift_fresh`; moved to the GPU, a
# blocking copy; also flagged where it stays on the CPU). Not seen by ATen, so not checked: `.tolist()`, `.cpu()`.
SYNCING_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
    "unique_consecutive", "repeat_interleave", "lift_fresh",
})
BOOL_INDEXING = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
PACKAGE = str(Path(gatera_plugin.__file__).parent)
TORCH = str(Path(torch.__file__).parent)


class SyncRecorder(TorchDispatchMode):
    """Records each syncing op that gatera_plugin's code issues (the innermost Python frame outside torch and this
    file is gatera_plugin's, directly or through torch's functions): (op, that frame as "file:line") → count."""

    def __init__(self):
        super().__init__()
        self.hits = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS or (name in BOOL_INDEXING and _bool_index(args)):
            frames = [f for f in traceback.extract_stack() if not f.filename.startswith((TORCH, __file__))]
            if frames and frames[-1].filename.startswith(PACKAGE):
                self.hits[(name, f"{Path(frames[-1].filename).name}:{frames[-1].lineno}")] += 1
        return func(*args, **(kwargs or {}))


def _bool_index(args) -> bool:
    """Whether an `index` / `index_put` call's indices (its second argument) hold a bool mask."""
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


CONFIGS = {
    "sigmoid-hira": dict(),
    "sigmoid-lora": dict(branch="lora"),
    "sigmoid-dora": dict(branch="dora"),
    "threshold-keep-ratio": dict(gate="threshold", keep_ratio=0.5),
    "sigmoid-structure": dict(structure_gate=True, structure_weight=0.1),
}


def _model(options: dict, checkpointing: bool = False):
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS, **options)).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def _inputs(mask: bool) -> dict:
    input_ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": input_ids, "labels": input_ids}
    if mask:
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :3] = 0
        inputs["attention_mask"] = attention_mask
    return inputs


def _recorded_step(model, inputs, step_tokens=None) -> collections.Counter:
    """Syncing ops from gatera_plugin in one training forward + backward, after one unrecorded step (first calls
    create state and run one-time checks, e.g. `hira_scaling`'s weight RMS). `step_tokens`: the step's real tokens,
    handed over as the Trainer integration does."""
    def train_once():
        if step_tokens is not None:
            model.base_model.penalty_run.begin_step(step_tokens)
        model(**inputs).loss.backward()

    train_once()
    with SyncRecorder() as recorder:
        train_once()
    assert any(p.grad is not None for n, p in model.named_parameters() if "gatera_gate" in n or "gatera_A" in n)
    return recorder.hits


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gated_layers_read_nothing_back_from_the_device(name, checkpointing):
    """No attention mask, or a mask with the step's token count known (inside a Trainer): 14 gated layers, their
    penalties and statistics, forward and backward (and the recomputation under checkpointing), issue no syncing op."""
    model = _model(CONFIGS[name], checkpointing)
    assert _recorded_step(model, _inputs(mask=False)) == {}
    inputs = _inputs(mask=True)
    assert _recorded_step(model, inputs, step_tokens=float(inputs["attention_mask"].sum())) == {}


def test_sparse_training_reads_the_gates_back_by_design():
    """`sparse_training=True` runs the branch only on tokens whose gate is at least ε, which it selects by value:
    the one gated configuration that reads back in every layer (README says so); also shows that the recorder sees
    such reads."""
    model = _model(dict(sparse_threshold=0.3, sparse_training=True))  # (every gate starts at 0.5: all run)
    hits = _recorded_step(model, _inputs(mask=False))
    assert sum(n for (op, where), n in hits.items() if op == "_local_scalar_dense" and where.startswith("layer.py:")) \
        == len(LLAMA_PROJECTIONS) * 2, hits  # one `bool(all gates ≥ ε)` per gated layer (2 layers)


def test_bool_indexing_counts_as_a_sync():
    x = torch.randn(4, 3)
    assert _bool_index((x, [x[:, 0] > 0])) and _bool_index((x, [None, x[0] > 0]))
    assert not _bool_index((x, [torch.tensor([0, 2])])) and not _bool_index((x,))


def test_outside_a_trainer_a_masked_forward_reads_its_token_count_once():
    """A plain loop with an attention mask normalises the penalty by the forward's real tokens: one read per forward
    (the first gated layer counts them; the other 13 and the recomputation reuse the count), not one per layer."""
    model = _model({}, checkpointing=True)
    hits = _recorded_step(model, _inputs(mask=True))
    assert sum(hits.values()) == 1, hits
    ((op, where),) = hits
    assert op == "_local_scalar_dense" and where.startswith("penalty.py:"), hits


def test_a_trainer_step_reads_nothing_back_in_forward_and_backward(tmp_path):
    """A Trainer's steps with two micro-batches: inside `training_step` (each micro-batch's forward and backward) the
    layers issue no syncing op. The integration's bookkeeping (the step's token count, when the batches are fetched)
    and the logged statistics read back once per step and once per log, outside it."""
    trainer = plain_trainer(tmp_path, toy_texts(16), entropy_weight=0.1, batch=2, accum=2)
    trainer.args.max_steps = 2
    recorder, training_step = SyncRecorder(), trainer.training_step

    def recorded_training_step(*args, **kwargs):
        with recorder:
            return training_step(*args, **kwargs)

    trainer.training_step = recorded_training_step
    trainer.train()
    assert trainer.state.global_step == 2 and len(trainer.state.log_history) >= 2
    assert "gatera/entropy" in trainer.state.log_history[0]
    assert recorder.hits == {}
