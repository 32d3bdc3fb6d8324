"""Shared by the distributed tests (test_ddp.py, test_deepspeed.py, test_fsdp.py): launching tests/dist_train.py on
CPU processes and comparing what the runs wrote (per-step losses in metrics.json, adapters) with a single-process
run."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "dist_train.py")
# lr 1e-3: the tiny model's RMS(W0) is 0.2, so the default HiRA scale 1 / (RMS(W0) · 0.5) = 10 makes it a step as
# large as 1e-2 at s = 1
COMMON = ["--cpu", "--max-steps", "6", "--entropy-weight", "0.5", "--lr", "1e-3", "--save-steps", "2"]
LOSS_RTOL = 1e-4  # same arithmetic, but gradients are summed across ranks in another order
ADAPTER_ATOL = 2e-5  # after 6 AdamW steps at lr 1e-3 (s = 10) on O(0.1) weights: order-of-summation differences only


def env(**extra):
    # PYTHONFAULTHANDLER: a rank that dies of a signal (the abort at exit below) prints where each thread was
    environment = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
                       WANDB_MODE="disabled", PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1")
    environment.pop("TRITON_INTERPRET", None)
    environment.update(extra)
    return environment


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(command, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=env(**extra_env), cwd=ROOT, timeout=900)


# A CPU rank now and then aborts at interpreter exit, after training, saving and the process group's teardown
# (C++ std::terminate from a thread left running, seen with gloo under torchrun and accelerate launch, FSDP2 and
# DeepSpeed ZeRO-3; about one launch in a few hundred).
ABORT_AT_EXIT = "terminate called without an active exception"


def aborted_at_exit(*launches) -> bool:
    """The run finished training (rank 0 logged its summary) and then every launcher that failed (one, or one per
    node) failed because a rank aborted at exit."""
    failed = [done for done in launches if done.returncode != 0]
    return (bool(failed) and all(ABORT_AT_EXIT in done.stderr for done in failed)
            and any("'train_runtime'" in done.stdout for done in launches))


def _once_more_after_abort(start, out, retry=True) -> list:
    """Run `start(port) -> [CompletedProcess, ...]` (one launcher, or one per node) on a fresh free port. A run that
    aborted at exit after finishing (`aborted_at_exit`) is run once more, from an empty output folder `out`, on
    another port, so that the test judges a run that exited cleanly; a second abort is returned for the test to
    fail on."""
    finished = start(free_port())
    if retry and aborted_at_exit(*finished):
        print(f"a rank aborted at exit after training ({ABORT_AT_EXIT!r}); running once more", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        finished = start(free_port())
    return finished


def launch(command_on, out, **extra_env) -> subprocess.CompletedProcess:
    """Run the distributed launch `command_on(port)` (torchrun, accelerate launch), which writes into `out`, once
    more after an abort at exit (`_once_more_after_abort`); a run killed on purpose is not retried."""
    retry = "GATERA_TEST_KILL_AT_STEP" not in extra_env
    [done] = _once_more_after_abort(lambda port: [run(command_on(port), **extra_env)], out, retry)
    return done


def torchrun(out, *args, nproc=2, **extra_env):
    """tests/dist_train.py on `nproc` processes, 2 sequences each per step (the single run takes 4 in one), through
    `launch` (run once more after an abort at exit)."""
    return launch(lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                "--master_port", port, SCRIPT, *COMMON, "--batch", "2", "--output-dir", str(out), *args],
                  out, **extra_env)


def single_process(out, *args, extra_env=None):
    """The reference: one process, 4 sequences per step."""
    return run([sys.executable, SCRIPT, *COMMON, "--batch", "4", "--output-dir", str(out), *args], **(extra_env or {}))


def ok(done):
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def losses(out):
    history = json.loads((Path(out) / "metrics.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def adapter(folder):
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors")


def assert_trained_adapter(out, reference, dtype):
    """The adapter saved in `out` holds the tensors that the `reference` run saved, all of `dtype` and finite, with B
    trained (not its initial zeros)."""
    saved, expected = adapter(out), adapter(reference)
    assert saved.keys() == expected.keys() and len(saved) > 0
    assert all(t.dtype == dtype and torch.isfinite(t).all() for t in saved.values())
    assert all(saved[k].abs().sum() > 0 for k in saved if k.endswith("gatera_B"))


def assert_same_adapter(a, b, atol=ADAPTER_ATOL):
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def assert_same_run(out, reference):
    """Per-step losses to LOSS_RTOL and the final adapter, gates included, to ADAPTER_ATOL."""
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(reference)), rtol=LOSS_RTOL, atol=0)
    assert_same_adapter(adapter(out), adapter(reference))


GATE_LR_RATIO = "3"


def assert_gate_lr_ratio_applied(out, reference, ratio_one_reference):
    """A distributed run with `--gate-lr-ratio 3` reproduces the single process with the same ratio (`reference`),
    its optimizer's groups (after DeepSpeed or FSDP wrapped it) run at the base rate and at 3 × it, and the ratio made
    a difference: the gates differ from a run at ratio 1 far beyond the tolerance."""
    assert_same_run(out, reference)
    for run in (out, reference):
        groups = json.loads((Path(run) / "probe_rank0.json").read_text())["optimizer_groups"]
        assert sorted({g["lr"] for g in groups}) == pytest.approx([1e-3, 3e-3]), groups
        assert all(g["gates"] in (0, g["params"]) for g in groups), groups  # no group mixes gates with the rest
        assert sum(g["gates"] for g in groups) == 20, groups  # the gates' w and b of the 10 layers, found in groups
    single = json.loads((Path(reference) / "probe_rank0.json").read_text())["optimizer_groups"]
    gate_rates = [g["lr"] for g in single if g["gates"]]
    assert gate_rates and gate_rates == pytest.approx([3e-3] * len(gate_rates)), single
    gated, plain = adapter(reference), adapter(ratio_one_reference)
    moved = max((gated[k] - plain[k]).abs().max().item() for k in gated if ".gatera_gate." in k)
    assert moved > 100 * ADAPTER_ATOL, moved


def run_nodes(commands_on, out) -> None:
    """Start the launchers `commands_on(port)`, one per node, at once (they rendezvous with each other at `port`) and
    require every one to succeed, once more after an abort at exit (`_once_more_after_abort`)."""

    def start(port):
        nodes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
                 for c in commands_on(port)]
        outputs = [node.communicate(timeout=900) for node in nodes]
        return [subprocess.CompletedProcess(node.args, node.returncode, *output) for node, output in zip(nodes, outputs)]

    for done in _once_more_after_abort(start, out):
        assert done.returncode == 0, done.stderr[-5000:]


def killed(done) -> bool:
    """The launcher reports a rank that died of SIGKILL."""
    return "SIGKILL" in done.stderr or "Signal 9" in done.stderr or "exitcode  : -9" in done.stderr


def allow_fsdp_on_cpu() -> None:
    """Let accelerate run FSDP on CPU processes (gloo), as the tests do; call before the Trainer builds its Accelerator.

    accelerate enables FSDP only for GPU-like distributed types and otherwise falls back to DDP without a word;
    everything after that choice (its `fully_shard` wrapping, the Trainer's FSDP saving and loading) is the code
    that runs on GPUs.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_allows_fsdp_on_cpu", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if self._mixed_precision != "no":  # as accelerate does for GPUs: bf16 → MixedPrecisionPolicy(bf16)
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    __init__._allows_fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__


RING_ATTENTION_FORWARDS = [0]  # calls of the CPU ring attention below in this process
# what `allow_context_parallel_on_cpu` uses of torch's ring attention (internals, as of torch 2.13)
RING_ATTENTION_INTERNALS = ("custom_ops", "_templated_ring_attention", "_templated_ring_attention_backward")


def context_parallel_on_cpu_possible() -> bool:
    """Whether this torch has the ring-attention internals that `allow_context_parallel_on_cpu` registers with."""
    try:
        from torch.distributed.tensor.experimental._context_parallel import _attention
    except ImportError:
        return False
    return all(hasattr(_attention, name) for name in RING_ATTENTION_INTERNALS)


def allow_context_parallel_on_cpu() -> None:
    """Let torch's context parallelism (ring attention) run on CPU processes, as the tests do.

    torch's ring attention dispatches only the GPU kernels of `scaled_dot_product_attention` (flash, efficient,
    cudnn); on CPU, SDPA takes `_scaled_dot_product_flash_attention_for_cpu`, which it leaves unhandled
    ("... does not have a sharding strategy registered"). This registers that kernel and its backward with torch's
    own ring-attention loops, so that everything around them (accelerate's sharding of the batch, FSDP2 over the
    dp × cp mesh, the Trainer's loss accounting) is the code that runs on GPUs.
    """
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.experimental._context_parallel import _attention

    forward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    seq_dim = 2  # (batch, heads, sequence, head_dim)

    def local(tensor):
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    def sharded(tensor, mesh):
        return DTensor.from_local(tensor.contiguous(), mesh, [Shard(seq_dim)], run_check=False)

    def ring_forward(op_call, args, kwargs):
        query, key, value = args[:3]
        dropout_p = args[3] if len(args) > 3 else kwargs.get("dropout_p", 0.0)
        is_causal = args[4] if len(args) > 4 else kwargs.get("is_causal", False)
        if kwargs.get("attn_mask") is not None:
            raise NotImplementedError("context parallelism on CPU: an explicit attention mask is not supported")
        mesh = query.device_mesh
        RING_ATTENTION_FORWARDS[0] += 1
        out, logsumexp = _attention._templated_ring_attention(
            mesh.get_group(), seq_dim, forward_op, query=local(query), key=local(key), value=local(value),
            is_causal=is_causal, dropout_p=dropout_p, scale=kwargs.get("scale"))
        return sharded(out, mesh), sharded(logsumexp, mesh)

    def ring_backward(op_call, args, kwargs):
        names = ("grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal")
        bound = {**dict(zip(names, args)), **kwargs}
        mesh = bound["query"].device_mesh
        grads = _attention._templated_ring_attention_backward(
            mesh.get_group(), seq_dim, backward_op, grad_out=local(bound["grad_out"]), grad_out_name="grad_out",
            query=local(bound["query"]), key=local(bound["key"]), value=local(bound["value"]),
            out=local(bound["out"]), logsumexp=local(bound["logsumexp"]), is_causal=bound["is_causal"],
            dropout_p=bound["dropout_p"], scale=bound.get("scale"))
        return tuple(sharded(grad, mesh) for grad in grads)

    _attention.custom_ops[forward_op] = ring_forward
    _attention.custom_ops[backward_op] = ring_backward
