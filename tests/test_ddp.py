"""Plain data parallelism (DDP: `torchrun` or `accelerate launch` without DeepSpeed or FSDP), the most common
multi-GPU run: 2 CPU processes over gloo.

Each run is compared with a single-process run of the same global batch (4 sequences per step, entropy penalty 0.5):
per-step losses and the final adapter, gates included, agree only if every rank's penalty is normalised by the step's
tokens on all ranks and DDP's gradient average is undone by the world size, and if DDP's bucketed all-reduce sees
every gradient once, with gradient checkpointing too (DDP refuses a parameter marked ready twice in one backward).
With checkpointing, examples/train_sft.py sets `ddp_find_unused_parameters=False`, as any PEFT adapter needs (README).
"""

import pytest

from tests.distributed import assert_same_run, ok, single_process, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, 4 sequences per step: the reference."""
    out = tmp_path_factory.mktemp("single")
    ok(single_process(out))
    return out


@pytest.mark.parametrize(
    "extra",
    [[], ["--gradient-checkpointing"], ["--gradient-checkpointing", "--reentrant"]],
    ids=["ddp", "ddp-checkpointing", "ddp-checkpointing-reentrant"],
)
def test_ddp_matches_single_process(single, tmp_path, extra):
    done = torchrun(tmp_path, *extra)
    ok(done)
    assert "GateRA:" not in done.stdout + done.stderr  # no count mismatch, no switch to per-forward normalisation
    assert_same_run(tmp_path, single)
