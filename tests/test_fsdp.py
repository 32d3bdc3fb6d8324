"""PyTorch FSDP2 (`fully_shard`) through the Trainer on CPU: 2 processes over gloo, accelerate configs, a killed rank.

As in tests/test_deepspeed.py, every distributed run trains the tiny model with examples/train_sft.py (via
tests/dist_train.py, which lets accelerate run FSDP on CPU processes) and is compared with a single-process run of
the same global batch, with the entropy penalty at 0.5 so that a double-counted penalty would show. The probes of
tests/dist_train.py (FsdpProbe) record what the HiRA branch saw of W0 during the first step on each rank.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from packaging.version import Version

from tests.distributed import (
    ABORT_AT_EXIT,
    COMMON,
    GATE_LR_RATIO,
    LOSS_RTOL,
    ROOT,
    SCRIPT,
    aborted_at_exit,
    adapter,
    assert_gate_lr_ratio_applied,
    assert_same_adapter,
    assert_same_run,
    assert_trained_adapter,
    context_parallel_on_cpu_possible,
    env,
    free_port,
    killed,
    launch,
    losses,
    ok,
    run,
    run_nodes,
    single_process,
    torchrun,
)

ACCELERATE = ROOT / "integrations" / "accelerate"
sys.path.insert(0, str(ROOT / "examples"))


def test_only_a_run_that_finished_and_then_aborted_at_exit_is_run_again():
    finished = "{'train_runtime': '1.669', 'train_loss': '7.365'}"
    assert aborted_at_exit(subprocess.CompletedProcess([], -6, stdout=finished, stderr=ABORT_AT_EXIT))
    assert not aborted_at_exit(subprocess.CompletedProcess([], -6, stdout="{'loss': '7.1'}", stderr=ABORT_AT_EXIT))
    assert not aborted_at_exit(subprocess.CompletedProcess([], 1, stdout=finished, stderr="Traceback (most recent"))
    assert not aborted_at_exit(subprocess.CompletedProcess([], 0, stdout=finished, stderr=ABORT_AT_EXIT))
    # two nodes: rank 0's launcher logged the summary, rank 1's aborted at exit (or both did)
    node_0, node_1 = (subprocess.CompletedProcess([], 0, stdout=finished, stderr=""),
                      subprocess.CompletedProcess([], -6, stdout="", stderr=ABORT_AT_EXIT))
    assert aborted_at_exit(node_0, node_1)
    assert aborted_at_exit(node_1, subprocess.CompletedProcess([], -6, stdout=finished, stderr=ABORT_AT_EXIT))
    assert not aborted_at_exit(node_0, subprocess.CompletedProcess([], 1, stdout="", stderr="Traceback (most recent"))
    assert not aborted_at_exit(node_1, subprocess.CompletedProcess([], 0, stdout="", stderr=""))
    assert not aborted_at_exit(node_0, node_0)


def test_a_launch_that_aborted_at_exit_runs_once_more_on_a_fresh_port_into_an_empty_folder(tmp_path, monkeypatch):
    import tests.distributed as distributed

    finished, out = "{'train_runtime': '1.669'}", tmp_path / "out"
    results = iter([subprocess.CompletedProcess([], -6, stdout=finished, stderr=ABORT_AT_EXIT),
                    subprocess.CompletedProcess([], -6, stdout=finished, stderr=ABORT_AT_EXIT)])
    seen = []

    def fake_run(command, **extra_env):
        seen.append((command, out.exists()))
        return next(results)

    monkeypatch.setattr(distributed, "run", fake_run)
    out.mkdir()
    (out / "checkpoint-2").mkdir()
    done = distributed.launch(lambda port: ["launcher", port], out)
    assert done.returncode == -6  # a second abort is returned, for the test to fail on
    assert [exists for _, exists in seen] == [True, False]  # the first run's output was removed before the second
    assert seen[0][0][1] != seen[1][0][1]  # on another port
    calls = []
    monkeypatch.setattr(distributed, "run", lambda command, **extra_env: calls.append(command) or
                        subprocess.CompletedProcess([], 1, stdout=finished, stderr="Traceback (most recent"))
    assert distributed.launch(lambda port: ["launcher", port], out).returncode == 1
    assert len(calls) == 1  # any other failure is not run again


def test_two_nodes_whose_launcher_aborted_at_exit_run_once_more_both_on_a_fresh_port(tmp_path, monkeypatch):
    import tests.distributed as distributed

    finished, out = "{'train_runtime': '1.669'}", tmp_path / "out"
    returns = iter([(0, finished, ""), (-6, "", ABORT_AT_EXIT), (0, finished, ""), (0, "", "")])
    started = []

    class FakeNode:
        def __init__(self, command, **kwargs):
            started.append((command, out.exists()))
            self.args, (self.returncode, *self.output) = command, next(returns)

        def communicate(self, timeout):
            return tuple(self.output)

    monkeypatch.setattr(distributed.subprocess, "Popen", FakeNode)
    out.mkdir()
    distributed.run_nodes(lambda port: [["node0", port], ["node1", port]], out)
    assert [exists for _, exists in started] == [True, True, False, False]  # both nodes again, from an empty folder
    assert started[0][0][1] == started[1][0][1] != started[2][0][1] == started[3][0][1]  # one port per attempt
    returns = iter([(0, finished, ""), (1, "", "Traceback (most recent")])
    with pytest.raises(AssertionError, match="Traceback"):
        distributed.run_nodes(lambda port: [["node0", port], ["node1", port]], out)
    assert len(started) == 6  # any other failure is not run again


# torch 2.6's FSDP2 does not run on CPU ("'Stream' object has no attribute 'record_event'"; on a GPU it does); 2.7 to
# 2.12 are untested here, 2.13 runs these tests
FSDP2_ON_CPU = pytest.mark.skipif(Version(torch.__version__) < Version("2.7"),
                                  reason="FSDP2 does not run on CPU with torch 2.6")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, 4 sequences per step: the reference."""
    out = tmp_path_factory.mktemp("single")
    ok(single_process(out))
    return out


def _probes(out):
    return [json.loads((out / f"probe_rank{rank}.json").read_text()) for rank in (0, 1)]


def _assert_branch_saw_whole_weights(out, checkpointing=None):
    """`checkpointing`: None, "non-reentrant" or "reentrant"."""
    for probe in _probes(out):
        assert probe["layers"] == 10 and probe["sharded"]  # FSDP2 really shards the base weights
        assert probe["reads_whole"]  # every read of W0 by the branch got the whole, gathered W0: in forward,
        assert probe["reads_forward"] == 10
        # in the memory-lean backward (one re-read per layer) and in the forward recomputed by checkpointing
        assert probe["reads_backward"] == (20 if checkpointing else 10)
        assert probe["resharded_after_forward"]  # and nothing kept a gathered copy of W0 after the forward:
        if checkpointing != "reentrant":  # (reentrant checkpointing builds the layers' graph in backward only)
            assert probe["graph_nodes_checked"] > 100  # no autograd node holds one
        if not checkpointing:
            assert probe["saved_weights_checked"] > 0  # and the W0s autograd saved are FSDP's, freed at the reshard


def _accelerate(config, out, *args, machine_rank=None):
    """`accelerate launch` of tests/dist_train.py with `config` (integrations/accelerate/): 2 processes on one node
    or, with `machine_rank`, node `machine_rank` of 2. Returns the command for a given port, for `launch`."""

    def command_on(port):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config),
                   "--mixed_precision", "no", "--main_process_port", port]
        if machine_rank is not None:
            command += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1", "--num_machines", "2",
                        "--num_processes", "2"]
        else:
            command += ["--num_processes", "2"]
        return command + [SCRIPT, *COMMON, "--batch", "2", "--output-dir", str(out), *args]

    return command_on


def _load(folder):
    from common import tiny_model_and_tokenizer
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_model_and_tokenizer()[0], folder).eval()


@pytest.mark.slow
@FSDP2_ON_CPU
@pytest.mark.parametrize("extra", [[], ["--gradient-checkpointing"], ["--fsdp-activation-checkpointing"]],
                         ids=["plain", "checkpointing", "fsdp-activation-checkpointing"])
def test_fsdp2_matches_single_process(single, tmp_path, extra):
    """`fsdp=True, fsdp_config={"version": 2}` through TRL's SFTConfig; TRL's checkpointing is non-reentrant (the
    reentrant kind is run in the next test), and so is FSDP's own (`fsdp_config={"activation_checkpointing": True}`,
    torch's checkpoint_wrapper around each decoder layer, whose adapters PEFT 0.21 alone would save empty)."""
    ok(torchrun(tmp_path, "--fsdp", "2", *extra))
    assert_same_run(tmp_path, single)
    _assert_branch_saw_whole_weights(tmp_path, checkpointing="non-reentrant" if extra else None)
    assert_same_adapter(adapter(tmp_path / "checkpoint-2"), adapter(single / "checkpoint-2"))
    if not extra:  # the final adapter: one complete file, written once, that loads without FSDP
        assert sorted(p.name for p in tmp_path.glob("adapter_model*")) == ["adapter_model.safetensors"]
        assert_same_adapter(adapter(tmp_path / "direct_save"), adapter(single))  # save_pretrained on every rank
        assert not list(tmp_path.glob(".gatera-staging*"))
        input_ids = torch.randint(4, 60, (2, 9))
        with torch.no_grad():
            logits = [_load(folder)(input_ids=input_ids).logits for folder in (tmp_path, single)]
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@FSDP2_ON_CPU
def test_fsdp2_folds_an_ungated_adapter_and_matches_single_process(tmp_path):
    """`gate="none"`: each layer folds the adapter into the base product (`GateRALayer._folded_forward`) under FSDP2
    as in one process, reading the whole gathered W0 in forward and again in backward, and the runs agree."""
    ungated = ["--gate", "none", "--entropy-weight", "0"]
    ok(single_process(tmp_path / "single", *ungated))
    ok(torchrun(tmp_path / "fsdp", "--fsdp", "2", *ungated))
    assert_same_run(tmp_path / "fsdp", tmp_path / "single")
    for probe in _probes(tmp_path / "fsdp"):
        assert probe["sharded"] and probe["reads_whole"] and probe["reads_forward"] == probe["reads_backward"] == 10
        assert probe["resharded_after_forward"] and probe["graph_nodes_checked"] > 100
        assert probe["saved_weights_checked"] == 0  # folded, nothing saves W0 for backward (no base layer's linear)
    # 10 adapted layers, one forward each in the first step, on each rank and in the single process
    assert [probe["folded_forwards"] for probe in _probes(tmp_path / "fsdp")] == [10, 10]
    assert json.loads((tmp_path / "single" / "probe_rank0.json").read_text())["folded_forwards"] == 10


@pytest.mark.slow
@FSDP2_ON_CPU
def test_fsdp2_trains_the_dora_branch_like_a_single_process(tmp_path):
    """`branch="dora"` under FSDP2: the branch reads the whole gathered W0 once per layer in forward (DoRA's weight
    norm; its backward reads no W0), nothing keeps a gathered copy, and the run agrees with one process, magnitudes
    included."""
    dora = ["--branch", "dora"]
    ok(single_process(tmp_path / "single", *dora))
    ok(torchrun(tmp_path / "fsdp", "--fsdp", "2", *dora))
    assert_same_run(tmp_path / "fsdp", tmp_path / "single")
    assert any(key.endswith("gatera_magnitude") for key in adapter(tmp_path / "fsdp"))
    for probe in _probes(tmp_path / "fsdp"):
        assert probe["layers"] == 10 and probe["sharded"] and probe["reads_whole"]
        assert probe["reads_forward"] == 10 and probe["reads_backward"] == 0
        assert probe["resharded_after_forward"] and probe["graph_nodes_checked"] > 100


@pytest.mark.slow
@FSDP2_ON_CPU
def test_gate_lr_ratio_survives_fsdp2_sharding(single, tmp_path):
    """`gate_lr_ratio` under FSDP2: the optimizer is built over the sharded (DTensor) parameters, whose gate groups
    train at 3 × the rate, as in one process."""
    ok(single_process(tmp_path / "single", "--gate-lr-ratio", GATE_LR_RATIO))
    ok(torchrun(tmp_path / "fsdp", "--fsdp", "2", "--gate-lr-ratio", GATE_LR_RATIO))
    assert_gate_lr_ratio_applied(tmp_path / "fsdp", tmp_path / "single", single)


@pytest.mark.slow
@FSDP2_ON_CPU
@pytest.mark.skipif(not context_parallel_on_cpu_possible(),
                    reason="torch's ring attention internals differ from 2.13's")
@pytest.mark.parametrize("extra,nproc", [([], 2), (["--gradient-checkpointing"], 2), ([], 4)],
                         ids=["plain", "checkpointing", "dp-shard-2"])
def test_context_parallel_matches_single_process(single, tmp_path, extra, nproc):
    """torch context parallelism (accelerate's `ParallelismConfig(cp_size=2)` on FSDP2, through
    examples/train_sft.py --context-parallel 2; on CPU with tests.distributed.allow_context_parallel_on_cpu): both
    ranks of a group get the same sequences (all 4 of the step with 2 processes; with 4 processes, `dp_shard_size=2`,
    each of the 2 groups gets 2) and each forward sees half of every sequence. The step's real tokens are counted
    once, not once per rank of the group (each rank's count alone made the penalty half its scale at the first step),
    and no rank mistakes its half for changed inputs (which had switched the run to per-forward normalisation)."""
    done = torchrun(tmp_path, "--fsdp", "2", "--context-parallel", "2", "--batch", str(8 // nproc), *extra,
                    nproc=nproc)
    ok(done)
    assert_same_run(tmp_path, single)
    assert "GateRA:" not in done.stdout + done.stderr  # also: all forwards together saw each step's real tokens
    for rank in range(nproc):  # every attention of the 6 steps ran split in the group (2 layers; again when recomputed)
        assert json.loads((tmp_path / f"ring_attention_rank{rank}.json").read_text()) == [6 * 2 * (1 + len(extra))]


@pytest.mark.slow
@FSDP2_ON_CPU
def test_accelerate_configs_sharded_checkpoint_and_resume(single, tmp_path):
    """Two 'nodes' of one process each with fsdp2_multinode.yaml and reentrant gradient checkpointing reproduce the
    single-process run and write sharded checkpoints (and whole adapters); the one-node fsdp2.yaml, 2 processes,
    resumes from checkpoint-4 and continues exactly as the uninterrupted run."""
    nodes = [_accelerate("fsdp2_multinode.yaml", tmp_path / "full", "--gradient-checkpointing", "--reentrant",
                         machine_rank=rank) for rank in (0, 1)]
    run_nodes(lambda port: [node(port) for node in nodes], tmp_path / "full")
    assert_same_run(tmp_path / "full", single)
    _assert_branch_saw_whole_weights(tmp_path / "full", checkpointing="reentrant")
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()  # sharded
    assert_same_adapter(adapter(checkpoint), adapter(single / "checkpoint-4"))  # and a whole adapter beside them

    ok(launch(_accelerate("fsdp2.yaml", tmp_path / "resumed", "--resume", str(checkpoint)), tmp_path / "resumed"))
    resumed = losses(tmp_path / "resumed")  # the checkpoint's log history, then steps 5 and 6
    assert len(resumed) == 6
    torch.testing.assert_close(torch.tensor(resumed[4:]), torch.tensor(losses(single)[4:]), rtol=LOSS_RTOL, atol=0)
    assert_same_adapter(adapter(tmp_path / "resumed"), adapter(single))


@pytest.mark.slow
@FSDP2_ON_CPU
def test_cpu_ram_efficient_loading_builds_the_other_ranks_adapters_on_meta_and_matches_single_process(tmp_path):
    """`fsdp_cpu_ram_efficient_loading: true` (fsdp2.yaml with that one change) and a base loaded from a checkpoint:
    rank 1 builds the base on the meta device (examples/train_sft.py starts the process group before loading, as
    transformers needs for it), so its GateRA adapter is built there with no values and its branch scales wait for
    W0; accelerate then broadcasts rank 0's weights, adapter included. The run reproduces the single-process run."""
    from common import tiny_model_and_tokenizer

    model, tokenizer = tiny_model_and_tokenizer()
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    shipped = (ACCELERATE / "fsdp2.yaml").read_text()
    config = tmp_path / "fsdp2_cpu_ram_efficient_loading.yaml"
    config.write_text(shipped.replace("fsdp_cpu_ram_efficient_loading: false", "fsdp_cpu_ram_efficient_loading: true"))
    assert config.read_text() != shipped
    ok(single_process(tmp_path / "single", "--model", str(base)))
    ok(launch(_accelerate(config, tmp_path / "fsdp", "--model", str(base)), tmp_path / "fsdp"))
    assert_same_run(tmp_path / "fsdp", tmp_path / "single")
    probes = _probes(tmp_path / "fsdp")
    assert [p["meta_base_weights_at_init"] for p in probes] == [0, 10]  # rank 1 really loaded nothing
    assert [p["pending_scales_at_init"] for p in probes] == [0, 10]
    assert all(p["sharded"] and p["reads_whole"] for p in probes)  # the scale, too, read whole, gathered W0s:
    assert [p["reads_forward"] for p in probes] == [10, 20]  # rank 1 reads each once more, for its RMS


@pytest.mark.slow
@FSDP2_ON_CPU
def test_4bit_base_matches_single_process(tmp_path):
    """QLoRA-style: an NF4 base whose packed bytes are stored as bf16 (`bnb_4bit_quant_storage`), so that FSDP2 can
    shard them, trains as one process does (with fp32 adapters there too: under FSDP2 all of GateRA's parameters are
    fp32, where TRL would otherwise cast the adapter to bf16)."""
    four_steps = ["--load-in-4bit", "--max-steps", "4"]
    ok(single_process(tmp_path / "single", *four_steps, extra_env={"GATERA_TEST_FP32_ADAPTER": "1"}))
    ok(torchrun(tmp_path / "fsdp", "--fsdp", "2", *four_steps))
    assert_same_run(tmp_path / "fsdp", tmp_path / "single")
    for probe in _probes(tmp_path / "fsdp"):
        assert probe["sharded"] and probe["reads_whole"] and probe["resharded_after_forward"]
        assert probe["reads_forward"] == probe["reads_backward"] == 10  # dequantised from the gathered bytes


@pytest.mark.slow
@FSDP2_ON_CPU
def test_bf16_mixed_precision_trains_like_a_single_bf16_process(single, tmp_path):
    """`--bf16` under FSDP2: accelerate's MixedPrecisionPolicy (bf16 parameters for compute and bf16 gradient
    reduction; tests.distributed.allow_fsdp_on_cpu sets it on CPU as accelerate does on GPUs) over GateRA's fp32
    parameters. The run completes, the branch still reads whole, gathered W0s, the losses track a single process's
    bf16 (autocast) run within 1e-3, and the saved adapter is complete, fp32, finite and trained. (Exact agreement is
    not expected: bf16 rounding moves the adapters by ~5e-3 here, as much as going from fp32 to bf16 in one process
    does; the penalty's exactness is the fp32 runs' check.)"""
    ok(single_process(tmp_path / "single", "--bf16"))
    ok(torchrun(tmp_path / "fsdp", "--fsdp", "2", "--bf16"))
    fsdp_losses, single_losses = torch.tensor(losses(tmp_path / "fsdp")), torch.tensor(losses(tmp_path / "single"))
    torch.testing.assert_close(fsdp_losses, single_losses, rtol=1e-3, atol=0)
    fp32_losses = torch.tensor(losses(single))
    assert (fsdp_losses - fp32_losses).abs().max() > 1e-3  # it really computed in bf16 (as FSDP2 on CPU did not)
    for probe in _probes(tmp_path / "fsdp"):
        assert probe["sharded"] and probe["reads_whole"] and probe["resharded_after_forward"]
    assert_trained_adapter(tmp_path / "fsdp", tmp_path / "single", torch.float32)


@pytest.mark.slow
@FSDP2_ON_CPU
def test_bf16_ungated_adapter_folds_its_backward_under_fsdp2(tmp_path):
    """`gate="none"` with `--bf16` under FSDP2 (bf16 parameters for compute, A and B included): each layer folds its
    backward only (`folded_hira(..., fold_forward=False)`: the forward's bf16 products stay apart), reading whole,
    gathered W0s, as a single bf16 (autocast) process does. The losses track that process's within 1e-3, and the
    saved adapter is complete, fp32, finite and trained."""
    ungated = ["--gate", "none", "--entropy-weight", "0", "--bf16"]
    ok(single_process(tmp_path / "single", *ungated))
    ok(torchrun(tmp_path / "fsdp", "--fsdp", "2", *ungated))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "fsdp")), torch.tensor(losses(tmp_path / "single")),
                               rtol=1e-3, atol=0)
    single_probe = json.loads((tmp_path / "single" / "probe_rank0.json").read_text())
    # 10 adapted layers, one forward each in the first step, on each rank and in the single process
    for probe in [*_probes(tmp_path / "fsdp"), single_probe]:
        assert probe["folded_forwards"] == probe["backward_only_folds"] == 10
    for probe in _probes(tmp_path / "fsdp"):
        assert probe["sharded"] and probe["reads_whole"] and probe["resharded_after_forward"]
        assert probe["reads_forward"] == probe["reads_backward"] == 10
    assert_trained_adapter(tmp_path / "fsdp", tmp_path / "single", torch.float32)


@pytest.mark.slow
@FSDP2_ON_CPU
def test_killed_rank_fails_loudly_and_last_checkpoint_loads(single, tmp_path):
    done = torchrun(tmp_path, "--fsdp", "2", GATERA_TEST_KILL_AT_STEP="3", GATERA_TEST_KILL_RANK="1")
    assert done.returncode != 0
    assert killed(done), done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert_same_adapter(adapter(tmp_path / "checkpoint-2"), adapter(single / "checkpoint-2"))
    _load(tmp_path / "checkpoint-2")


def test_adapter_saves_and_loads_under_activation_checkpointing_wrappers(tmp_path):
    """FSDP's activation checkpointing wraps each decoder layer in torch's checkpoint_wrapper, which adds
    `_checkpoint_wrapped_module` to the module names but not to the state-dict keys. The adapter saved from such a
    model holds every tensor (PEFT 0.21's own selection saved none, LoRA's too), loads into a plain and into a wrapped
    model, and both give the saved model's outputs."""
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from gatera_plugin import GateRAConfig
    from tests.helpers import randomize_adapters, tiny_llama

    def wrapped(model):
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                       check_fn=lambda module: isinstance(module, LlamaDecoderLayer))
        assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
        return model

    config = GateRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)
    model = randomize_adapters(get_peft_model(tiny_llama(), config))
    tensors = len(get_peft_model_state_dict(model))
    model = wrapped(model).eval()
    assert len(get_peft_model_state_dict(model)) == tensors > 0
    model.save_pretrained(tmp_path / "adapter")
    assert len(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == tensors
    input_ids = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
        torch.testing.assert_close(plain(input_ids=input_ids).logits, expected)
        into_wrapped = wrapped(get_peft_model(tiny_llama(), config)).eval()
        into_wrapped.load_adapter(tmp_path / "adapter", adapter_name="default")
        torch.testing.assert_close(into_wrapped(input_ids=input_ids).logits, expected)


def test_fsdp1_is_refused_when_the_trainer_is_built(monkeypatch):
    from types import SimpleNamespace

    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from gatera_plugin import GateRAConfig
    from gatera_plugin.fsdp import refuse_fsdp1
    from tests.helpers import tiny_llama

    assert getattr(Trainer.create_accelerator_and_postprocess, "__gatera_fsdp_wrapped__", False)
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"]))
    trainer = SimpleNamespace(model=model, args=TrainingArguments("unused", fsdp=True, fsdp_config={"version": 1}))
    with pytest.raises(ValueError, match=r"GateRA does not support FSDP1 \(`fsdp_version: 1`.*Use FSDP2"):
        refuse_fsdp1(trainer)
    refuse_fsdp1(SimpleNamespace(model=model, args=TrainingArguments("unused", fsdp=True,
                                                                       fsdp_config={"version": 2})))
    refuse_fsdp1(SimpleNamespace(model=model.get_base_model(), args=trainer.args))  # not GateRA: not ours to judge
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # `accelerate launch` with an FSDP1 config
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="GateRA does not support FSDP1"):
        refuse_fsdp1(SimpleNamespace(model=model, args=TrainingArguments("unused")))


BASE_LAYER_ITS_OWN_UNIT = textwrap.dedent("""
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from peft import get_peft_model
    import gatera_plugin
    from tests.helpers import tiny_llama

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
    model = get_peft_model(tiny_llama(), gatera_plugin.GateRAConfig(r=4, target_modules=["q_proj"]))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer.self_attn.q_proj.base_layer)  # the base linear alone: W0 gathered only for its forward
        fully_shard(layer)
    fully_shard(model)
    try:
        model(input_ids=torch.randint(4, 60, (1, 5)))
    finally:
        dist.destroy_process_group()
""")


@pytest.mark.slow
@FSDP2_ON_CPU
def test_base_layer_sharded_on_its_own_is_refused_clearly():
    done = subprocess.run([sys.executable, "-c", BASE_LAYER_ITS_OWN_UNIT.format(port=free_port())],
                          capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert done.returncode != 0
    assert "GateRA's branch needs the whole base weight W0 (32, 32) but finds an FSDP shard" in done.stderr, \
        done.stderr[-3000:]
    assert "TRANSFORMER_BASED_WRAP" in done.stderr


TENSOR_PARALLEL_BASE = textwrap.dedent("""
    import torch, torch.distributed as dist
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    import gatera_plugin

    model = AutoModelForCausalLM.from_pretrained({path!r}, tp_plan="auto")
    try:
        get_peft_model(model, gatera_plugin.GateRAConfig(r=4, target_modules=["q_proj", "down_proj"]))
    finally:
        dist.destroy_process_group()
""")

SHARDED_BEFORE_THE_ADAPTER = textwrap.dedent("""
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from peft import get_peft_model
    import gatera_plugin
    from tests.helpers import tiny_llama

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
    model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    try:
        get_peft_model(model, gatera_plugin.GateRAConfig(r=4, target_modules=["q_proj"]))
    finally:
        dist.destroy_process_group()
""")


@pytest.mark.slow
def test_tensor_parallel_base_is_refused_clearly(tmp_path):
    """transformers' tensor parallelism (`tp_plan="auto"`, 2 processes) leaves each rank a slice of every projection;
    GateRA's layers would need the whole W0 and the whole input and output. Before, `get_peft_model` said that it
    cannot adapt a `Linear`, while listing `nn.Linear` among the layers it supports."""
    from tests.helpers import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "base")
    script = tmp_path / "tp.py"
    script.write_text(TENSOR_PARALLEL_BASE.format(path=str(tmp_path / "base")))
    done = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                str(script)])
    assert done.returncode != 0
    assert "GateRA cannot adapt LlamaForCausalLM: it was loaded with tensor parallelism (tp_size=2)" in done.stderr, \
        done.stderr[-3000:]
    assert "load the base without `tp_plan`" in done.stderr


@pytest.mark.slow
@FSDP2_ON_CPU
def test_adapter_added_to_an_already_sharded_base_is_refused_clearly():
    """A base that FSDP2 sharded before `get_peft_model` (the Trainer shards only after `peft_config` has added the
    adapter) holds each projection's weight as a DTensor shard."""
    done = subprocess.run([sys.executable, "-c", SHARDED_BEFORE_THE_ADAPTER.format(port=free_port())],
                          capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert done.returncode != 0
    assert "GateRA cannot adapt Linear(in_features=32, out_features=32, bias=False): its weight (32, 32) is sharded " \
           "across ranks (a DTensor with placements (Shard(dim=0),))" in done.stderr, done.stderr[-3000:]


SHARDED_SAVE_AFTER_NEW_TOKENS = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    import gatera_plugin
    from tests.helpers import eval_logits, randomize_adapters

    base, out, modules_to_save = sys.argv[1], sys.argv[2], eval(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same model on both ranks
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(model.config.vocab_size + 8)  # new tokens, frozen or in modules_to_save
    config = gatera_plugin.GateRAConfig(r=4, target_modules=["q_proj"], modules_to_save=modules_to_save)
    model = randomize_adapters(get_peft_model(model, config))
    ids = torch.tensor([[3, 128, 5, 135, 7, 130]])  # 128..135 are the new tokens
    if rank == 0:
        model.save_pretrained(out + "/one-process")
        torch.save({"logits": eval_logits(model, ids), "ids": ids}, out + "/trained.pt")
    dist.barrier()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.save_pretrained(out + "/sharded", is_main_process=rank == 0)
    dist.destroy_process_group()
""")


@pytest.mark.slow
@FSDP2_ON_CPU
@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]], ids=["frozen-embeddings", "head-in-modules-to-save"])
def test_sharded_save_after_new_tokens_keeps_the_resized_embeddings(tmp_path, modules_to_save):
    """New tokens resize the embeddings; PEFT then saves the embedding layers (their new rows are drawn at random)
    with the adapter. Under FSDP2 the adapter is gathered by `adapter_state_dict`, which left these frozen base
    tensors out: the adapter reloaded onto a base whose new rows were drawn afresh, another model, and with a head in
    `modules_to_save` its `original_module` (the disabled adapter's head, DPO's reference) was lost. Now the sharded
    save writes what a one-process save writes, and reloads to the trained logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.helpers import eval_logits, tiny_llama

    tiny_llama().save_pretrained(tmp_path / "base")  # a base folder, as PEFT decides by its config.json
    script = tmp_path / "save.py"
    script.write_text(SHARDED_SAVE_AFTER_NEW_TOKENS)
    ok(run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
            str(script), str(tmp_path / "base"), str(tmp_path), repr(modules_to_save)]))
    sharded, one_process = adapter(tmp_path / "sharded"), adapter(tmp_path / "one-process")
    assert sharded.keys() == one_process.keys()
    assert "base_model.model.model.embed_tokens.weight" in sharded
    for key in sharded:
        assert torch.equal(sharded[key], one_process[key]), key
    trained = torch.load(tmp_path / "trained.pt")
    torch.manual_seed(1)  # other new rows than the run's
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    base.resize_token_embeddings(base.config.vocab_size + 8)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "sharded")
    torch.testing.assert_close(eval_logits(reloaded, trained["ids"]), trained["logits"])


def test_zero3_save_patch_puts_back_what_was_there():
    """`zero3_saves_keep_resized_embeddings` patches the engine's consolidation for the length of a save, then puts
    back what was there: the class's method, or an earlier patch of the instance (before, it deleted the attribute:
    an earlier patch was lost and a nested use raised AttributeError)."""
    from gatera_plugin.fsdp import zero3_saves_keep_resized_embeddings

    class Engine:
        def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters=False):
            return {"whole": exclude_frozen_parameters}

    engine = Engine()
    with zero3_saves_keep_resized_embeddings(engine):
        assert "_zero3_consolidated_16bit_state_dict" in vars(engine)
        assert engine._zero3_consolidated_16bit_state_dict() == {"whole": False}  # all parameters: nothing to add
    assert "_zero3_consolidated_16bit_state_dict" not in vars(engine)

    def earlier(*args, **kwargs):
        return {}

    engine._zero3_consolidated_16bit_state_dict = earlier
    with zero3_saves_keep_resized_embeddings(engine), zero3_saves_keep_resized_embeddings(engine):
        pass
    assert engine._zero3_consolidated_16bit_state_dict is earlier


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("rank_0", ["decides", "fails"])
def test_rank_0_decides_which_base_tensors_are_saved_for_every_rank(monkeypatch, rank, rank_0):
    """PEFT's rule for saving the embedding layers may ask the Hub for the base's config. Only rank 0 asks; every rank
    gathers what it decided, and where asking failed there, every rank raises its error (before, each rank asked for
    itself: a rank that failed raised while the others waited in the collective)."""
    import torch.distributed as dist
    from peft import get_peft_model

    from gatera_plugin import GateRAConfig, fsdp
    from tests.helpers import tiny_llama

    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"]))
    head = "base_model.model.lm_head.weight"
    asked = []

    def peft_rule(*args, **kwargs):
        asked.append(rank)
        if rank_0 == "fails":
            raise OSError("429 Client Error: Too Many Requests")
        return {head: None}

    sent = [[head] if rank_0 == "decides" else "OSError: 429 Client Error: Too Many Requests"]

    def broadcast_object_list(objects, src):
        assert src == 0
        if rank == 0:
            assert objects == sent  # what rank 0 sends
        objects[:] = sent

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(fsdp, "get_peft_model_state_dict", peft_rule)
    if rank_0 == "fails":
        with pytest.raises(RuntimeError, match="deciding on rank 0 .* OSError: 429 Client Error"):
            fsdp.adapter_state_dict(model)
    else:
        state = fsdp.adapter_state_dict(model)
        assert head in state and len(state) == 1 + 2 * 4  # the head; A, B, gate weight and bias of 2 q_proj
    assert asked == ([0] if rank == 0 else [])


@pytest.mark.parametrize(
    "backend, device, expected",
    [("nccl", "cpu", "cuda:0"), ("cpu:gloo,cuda:nccl", "cpu", "cpu"), ("gloo", "cpu", "cpu"), ("nccl", "cuda:1", "cuda:1"),
     ("gloo", "cuda:0", "cuda:0")],
)
def test_gate_statistics_are_reduced_where_the_process_group_can_reduce_them(monkeypatch, backend, device, expected):
    """FSDP2's CPU offload keeps the adapter on the CPU; `torchrun` with `init_process_group("nccl")` has no CPU
    backend, so `pop_gate_stats` must all-reduce its table on the current CUDA device (it raised "No backend type
    associated with device type cpu" at the first log). accelerate's "cpu:gloo,cuda:nccl" groups reduce CPU tensors."""
    import torch

    from gatera_plugin.penalty import collective_device

    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert collective_device(torch.device(device)) == torch.device(expected)


@pytest.mark.parametrize("shard_device, mesh_device, gathered_on", [("cpu", "cuda", "cuda"), ("cuda", "cuda", "cuda"),
                                                                    ("cpu", "cpu", "cpu")])
def test_an_offloaded_shard_is_gathered_on_its_meshs_device(shard_device, mesh_device, gathered_on):
    """FSDP2's CPU offload keeps the adapter's shards on the CPU; under `torchrun` with an NCCL-only process group
    gathering them there fails, so the save moves each to its mesh's device first, as torch's `get_model_state_dict`
    does (faked DTensors: no GPU here)."""
    from types import SimpleNamespace

    from gatera_plugin.fsdp import _full_tensor

    class FakeDTensor:
        def __init__(self, device):
            self.device, self.device_mesh = torch.device(device), SimpleNamespace(device_type=mesh_device)

        def to(self, device):
            return FakeDTensor(device)

        def full_tensor(self):
            return torch.full((2,), float(self.device.type == gathered_on))

    assert _full_tensor(FakeDTensor(shard_device)).tolist() == [1.0, 1.0]
