"""DeepSpeed ZeRO-2/3 on CPU: 2 processes over gloo, multi-node launch recipes on loopback, a killed rank.

Every distributed run trains the same tiny model with examples/train_sft.py (via tests/dist_train.py) and is compared
with a single-process run of the same global batch (4 sequences per step): per-step losses and the final adapter,
gates included, must agree, which they can only if the entropy penalty is applied exactly once per step (it is set
large here, 0.5, so that a per-rank or per-micro-batch double count would show).
"""

import json
import sys

import pytest
import torch
from packaging.version import Version

from tests.distributed import (
    ADAPTER_ATOL,
    COMMON,
    GATE_LR_RATIO,
    LOSS_RTOL,
    ROOT,
    SCRIPT,
    adapter,
    assert_gate_lr_ratio_applied,
    assert_same_adapter,
    assert_same_run,
    assert_trained_adapter,
    killed,
    losses,
    ok,
    run_nodes,
    single_process,
    torchrun,
)

deepspeed = pytest.importorskip("deepspeed")

ZERO = {stage: str(ROOT / "integrations" / "deepspeed" / f"{stage}.json") for stage in ("zero2", "zero3", "zero3_offload")}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, 4 sequences per step: the reference."""
    out = tmp_path_factory.mktemp("single")
    ok(single_process(out))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,extra", [("zero2", []), ("zero3", []), ("zero3", ["--gradient-checkpointing"]),
                                         ("zero3_offload", [])],
                         ids=["zero2", "zero3", "zero3-checkpointing", "zero3-offload"])
def test_zero_matches_single_process(single, tmp_path, stage, extra):
    done = torchrun(tmp_path, "--deepspeed", ZERO[stage], *extra)
    ok(done)
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(losses(single)), rtol=LOSS_RTOL, atol=0)
    assert_same_adapter(adapter(tmp_path), adapter(single))
    probes = [json.loads((tmp_path / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(p["layers"] == 10 for p in probes)
    assert all(p["partitioned"] == stage.startswith("zero3") for p in probes)  # ZeRO-3 really partitions the base
    assert all(p["registered"] == stage.startswith("zero3") for p in probes)  # and gathers W0 for the HiRA branch


@pytest.mark.slow
def test_zero3_trains_the_dora_branch_like_a_single_process(tmp_path):
    """`branch="dora"` under ZeRO-3: the branch gets the gathered W0 for DoRA's weight norm (the base weights are
    partitioned outside forward and registered with the GateRA layers), and the run agrees with one process,
    magnitudes included."""
    dora = ["--branch", "dora"]
    ok(single_process(tmp_path / "single", *dora))
    ok(torchrun(tmp_path / "zero3", "--deepspeed", ZERO["zero3"], *dora))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "zero3")), torch.tensor(losses(tmp_path / "single")),
                               rtol=LOSS_RTOL, atol=0)
    assert_same_adapter(adapter(tmp_path / "zero3"), adapter(tmp_path / "single"))
    assert any(key.endswith("gatera_magnitude") for key in adapter(tmp_path / "zero3"))
    probes = [json.loads((tmp_path / "zero3" / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(p["layers"] == 10 and p["partitioned"] and p["registered"] for p in probes)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_ungated_adapter_folds_under_zero2_not_zero3_and_matches_single_process(tmp_path, stage):
    """`gate="none"`: under ZeRO-2 each layer folds the adapter into the base product, as in one process; under
    ZeRO-3 the base layers carry DeepSpeed's gathering hooks, so they run apart (`GateRALayer._folded_forward`)."""
    ungated = ["--gate", "none", "--entropy-weight", "0"]
    ok(single_process(tmp_path / "single", *ungated))
    ok(torchrun(tmp_path / "zero", "--deepspeed", ZERO[stage], *ungated))
    assert_same_run(tmp_path / "zero", tmp_path / "single")
    probes = [json.loads((tmp_path / "zero" / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert {p["folded_forwards"] for p in probes} == {10 if stage == "zero2" else 0}
    assert json.loads((tmp_path / "single" / "probe_rank0.json").read_text())["folded_forwards"] == 10


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_bf16_zero_trains_like_a_single_bf16_process(tmp_path, stage):
    """`bf16: auto` in the shipped configs with `--bf16`: DeepSpeed casts the whole model, gates included, to bf16 and
    keeps fp32 master weights. The run completes, its losses track a single process's bf16 (autocast) run within 1e-3
    (2e-3 on torch 2.6), and it saves a complete, finite, trained adapter. (Exact agreement is not expected: bf16 rounding, turned into
    element-wise steps of up to the learning rate by AdamW, moves the adapters by ~5e-3 here, as much as going from
    fp32 to bf16 in one process does, which would also hide a penalty applied twice. Losses measured within 4e-4 with
    torch 2.13; with torch 2.6, whose CPU autocast differs, the first loss, before any update, is 1.05e-3 off.)"""
    single_bf16, distributed = tmp_path / "single", tmp_path / stage
    ok(single_process(single_bf16, "--bf16"))
    ok(torchrun(distributed, "--deepspeed", ZERO[stage], "--bf16"))
    rtol = 1e-3 if Version(torch.__version__) >= Version("2.7") else 2e-3
    torch.testing.assert_close(torch.tensor(losses(distributed)), torch.tensor(losses(single_bf16)), rtol=rtol, atol=0)
    assert_trained_adapter(distributed, single_bf16, torch.bfloat16)


@pytest.mark.slow
def test_bf16_ungated_adapter_folds_its_backward_under_zero2(tmp_path):
    """`gate="none"` with `--bf16` under ZeRO-2 (DeepSpeed casts the whole model to bf16): each layer folds its backward
    only (`folded_hira(..., fold_forward=False)`: the forward's bf16 products stay apart), as a single bf16 (autocast)
    process does. The losses track that process's as the gated bf16 runs do, and the saved adapter is complete,
    finite and trained."""
    ungated = ["--gate", "none", "--entropy-weight", "0", "--bf16"]
    ok(single_process(tmp_path / "single", *ungated))
    ok(torchrun(tmp_path / "zero2", "--deepspeed", ZERO["zero2"], *ungated))
    rtol = 1e-3 if Version(torch.__version__) >= Version("2.7") else 2e-3
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "zero2")), torch.tensor(losses(tmp_path / "single")),
                               rtol=rtol, atol=0)
    probes = [json.loads((tmp_path / folder / f"probe_rank{r}.json").read_text())
              for folder, r in (("zero2", 0), ("zero2", 1), ("single", 0))]
    # 10 adapted layers, one forward each in the first step, on each rank and in the single process
    assert all(p["folded_forwards"] == p["backward_only_folds"] == 10 for p in probes)
    assert_trained_adapter(tmp_path / "zero2", tmp_path / "single", torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_gate_lr_ratio_survives_deepspeeds_optimizer_wrapping(single, tmp_path, stage):
    """`gate_lr_ratio`: the Trainer builds the optimizer with the gates' groups and DeepSpeed wraps it; the gates train
    at 3 × the rate, as in one process."""
    ok(single_process(tmp_path / "single", "--gate-lr-ratio", GATE_LR_RATIO))
    ok(torchrun(tmp_path / "zero", "--deepspeed", ZERO[stage], "--gate-lr-ratio", GATE_LR_RATIO))
    assert_gate_lr_ratio_applied(tmp_path / "zero", tmp_path / "single", single)


@pytest.mark.slow
def test_penalty_counted_once_is_what_makes_them_agree(single, tmp_path):
    """The same single-process run without the penalty ends far from it: the agreement above is not vacuous."""
    ok(single_process(tmp_path, "--entropy-weight", "0"))
    with_penalty, without = adapter(single), adapter(tmp_path)
    gate_keys = [k for k in with_penalty if "gatera_gate" in k]
    largest = max((with_penalty[k] - without[k]).abs().max().item() for k in gate_keys)
    assert largest > 100 * ADAPTER_ATOL


def _ulysses_available() -> bool:
    import accelerate.utils

    return hasattr(accelerate.utils, "DeepSpeedSequenceParallelConfig")


def _ulysses_gradient_factor(stage: str) -> int:
    """The task loss's gradient under Ulysses with sp_size=2, relative to the single process's: transformers < 5.25
    backpropagated the whole sequences' loss on every rank, and ZeRO-2 (ZeRO-3 from deepspeed 0.20.2) sums the
    group's gradients (the engine divides by the data-parallel size only), so 2 there; transformers >= 5.25
    backpropagates each rank's part, and ZeRO-3 before deepspeed 0.20.2 averages, so 1."""
    import transformers

    engine_sums = stage == "zero2" or Version(deepspeed.__version__) >= Version("0.20.2")
    return 2 if engine_sums and Version(transformers.__version__) < Version("5.25") else 1


@pytest.mark.slow
@pytest.mark.skipif(not _ulysses_available(), reason="accelerate < 1.12 has no DeepSpeed sequence parallelism")
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_ulysses_sequence_parallel_applies_the_penalty_with_the_task_loss(tmp_path, stage):
    """DeepSpeed's sequence parallelism (Ulysses / ALST: accelerate's `ParallelismConfig(sp_backend="deepspeed",
    sp_size=2)` through examples/train_sft.py --sequence-parallel 2): each rank's prefetched batches are already its
    part of every sequence (the whole 4 sequences of the step between the 2 ranks), so GateRA counts them as they
    come. The task loss's gradient is `_ulysses_gradient_factor` x the single process's, and the penalty's follows it:
    plain SGD at a learning rate equals the single process at that factor times the rate, losses to 1e-4 and adapter to
    2e-5 over 4 steps (measured 7e-7 and 2e-7; half the penalty weight moves the gates by 3e-2), with no warning.
    With transformers 5.25 under ZeRO-2 the penalty's share of each rank was 2x the task loss's before GateRA divided
    it by sp_size (`trainer_integration.sequence_parallel_scale`): the losses then missed by 2.8e-4 at the 4th step.
    """
    gradient_factor = _ulysses_gradient_factor(stage)
    sgd = ["--max-steps", "4", "--save-steps", "0", "--optim", "sgd"]
    ok(single_process(tmp_path / "single", *sgd, "--lr", str(0.5 * gradient_factor)))
    done = torchrun(tmp_path / "sp", "--batch", "4", *sgd, "--lr", "0.5", "--deepspeed", ZERO[stage],
                    "--sequence-parallel", "2")
    ok(done)
    assert "GateRA:" not in done.stdout + done.stderr  # each step's count held for the forwards
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "sp")), torch.tensor(losses(tmp_path / "single")),
                               rtol=LOSS_RTOL, atol=0)
    assert_same_adapter(adapter(tmp_path / "sp"), adapter(tmp_path / "single"))


@pytest.mark.slow
def test_zero3_without_16bit_gather_on_save_saves_the_adapter_and_checkpoints(single, tmp_path):
    """`stage3_gather_16bit_weights_on_model_save: false`, DeepSpeed's default (accelerate: `zero3_save_16bit_model`,
    which `accelerate config` offers as "no"): the Trainer then gathers a PEFT model's trainable parameters only. The
    run is not stopped by GateRA's check for incomplete saves: the final adapter and every checkpoint's are complete
    and equal the single-process run's, beside DeepSpeed's own checkpoint for resuming."""
    config = json.loads((ROOT / "integrations" / "deepspeed" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    ok(torchrun(out, "--deepspeed", str(tmp_path / "zero3.json")))
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(single)), rtol=LOSS_RTOL, atol=0)
    assert_same_adapter(adapter(out), adapter(single))
    for step in (2, 4, 6):
        assert_same_adapter(adapter(out / f"checkpoint-{step}"), adapter(single / f"checkpoint-{step}"))
        assert (out / f"checkpoint-{step}" / f"global_step{step}").is_dir()


@pytest.mark.slow
def test_saved_adapter_reproduces_outputs_without_deepspeed(single, tmp_path):
    from peft import PeftModel

    sys.path.insert(0, str(ROOT / "examples"))
    from common import tiny_model_and_tokenizer

    ok(torchrun(tmp_path, "--deepspeed", ZERO["zero3"]))
    input_ids = torch.randint(4, 60, (2, 9))
    logits = []
    for folder in (tmp_path, single):
        model = PeftModel.from_pretrained(tiny_model_and_tokenizer()[0], folder).eval()
        with torch.no_grad():
            logits.append(model(input_ids=input_ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_killed_rank_fails_loudly_and_last_checkpoint_loads(single, tmp_path):
    from peft import PeftModel

    sys.path.insert(0, str(ROOT / "examples"))
    from common import tiny_model_and_tokenizer

    done = torchrun(tmp_path, "--deepspeed", ZERO["zero3"], GATERA_TEST_KILL_AT_STEP="3", GATERA_TEST_KILL_RANK="1")
    assert done.returncode != 0
    assert killed(done), done.stderr[-3000:]
    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"]  # step 2 saved, killed at the start of step 4 (global_step 3)
    assert_same_adapter(adapter(tmp_path / "checkpoint-2"), adapter(single / "checkpoint-2"))
    PeftModel.from_pretrained(tiny_model_and_tokenizer()[0], tmp_path / "checkpoint-2")


@pytest.mark.slow
def test_two_node_accelerate_recipe_on_loopback(single, tmp_path):
    """Two 'nodes' of one process each, launched with the accelerate config users copy (machine_rank 0 and 1)."""
    out = tmp_path / "out"
    run_nodes(lambda port: [
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "integrations" / "accelerate" / "zero3_multinode.yaml"), "--machine_rank", str(rank),
         "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--num_machines", "2",
         "--num_processes", "2", SCRIPT, *COMMON, "--batch", "2", "--deepspeed", ZERO["zero3"],
         "--output-dir", str(out)]
        for rank in (0, 1)
    ], out)
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(single)), rtol=LOSS_RTOL, atol=0)
    assert_same_adapter(adapter(out), adapter(single))


@pytest.mark.slow
def test_two_node_deepspeed_hostfile_recipe_on_loopback(single, tmp_path):
    """`deepspeed --hostfile` with `--no_ssh --node_rank` (the recipe for clusters without ssh between nodes)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    run_nodes(lambda port: [
        [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh", "--node_rank",
         str(rank), "--master_addr", "127.0.0.1", "--master_port", port, SCRIPT, *COMMON, "--batch", "2",
         "--deepspeed", ZERO["zero2"], "--output-dir", str(tmp_path / "out")]
        for rank in (0, 1)
    ], tmp_path / "out")
    assert_same_adapter(adapter(tmp_path / "out"), adapter(single))


def test_4bit_base_under_zero3_is_refused_clearly(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import get_peft_model
    from transformers.integrations import HfDeepSpeedConfig

    from gatera_plugin import GateRAConfig
    from tests.helpers import load_4bit, tiny_llama

    tiny_llama(hidden=64, intermediate=128).save_pretrained(tmp_path)
    model = load_4bit(tmp_path)
    keep_alive = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        with pytest.raises(ValueError, match="4-bit .* under DeepSpeed ZeRO-3.*Use ZeRO-2"):
            get_peft_model(model, GateRAConfig(r=4, target_modules=["q_proj"]))
    finally:
        del keep_alive


def test_4bit_adapter_made_before_the_zero3_config_is_refused_by_the_trainer(tmp_path):
    """`get_peft_model` before `TrainingArguments(deepspeed=zero3)`: the layers' own check found no ZeRO-3 config yet,
    so the Trainer's preparation of its model refuses it (what ZeRO-3 does to the packed weights is untested)."""
    pytest.importorskip("bitsandbytes")
    from types import SimpleNamespace

    from peft import get_peft_model
    from transformers.integrations import HfDeepSpeedConfig

    from gatera_plugin import GateRAConfig
    from gatera_plugin.trainer_integration import prepare_model
    from tests.helpers import load_4bit, tiny_llama

    tiny_llama(hidden=64, intermediate=128).save_pretrained(tmp_path)
    model = get_peft_model(load_4bit(tmp_path), GateRAConfig(r=4, target_modules=["q_proj"]))
    keep_alive = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        with pytest.raises(ValueError, match="4-bit .* under DeepSpeed ZeRO-3.*Use ZeRO-2"):
            prepare_model(SimpleNamespace(is_deepspeed_enabled=True), model)
    finally:
        del keep_alive


# One process: a base loaded by `from_pretrained` while a ZeRO-3 config is live (what `TrainingArguments(deepspeed=...)`
# sets up) comes partitioned, each weight an empty (0,) shard outside forward; the adapter is added onto that.
ZERO3_LOADED_BASE = """
import sys, deepspeed, torch
deepspeed.init_distributed(dist_backend="gloo")
from peft import get_peft_model
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from gatera_plugin import GateRAConfig
from gatera_plugin.layer import GateRALayer
config = GateRAConfig(r=4, target_modules=["q_proj", "v_proj"], branch=sys.argv[2])
reference = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), config)
keep_alive = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert base.model.layers[0].self_attn.q_proj.weight.shape == (0,), "not partitioned"
model = get_peft_model(base, config)
layers = [[m for m in peft.modules() if isinstance(m, GateRALayer)] for peft in (model, reference)]
assert len(layers[0]) == 4
for ours, single in zip(*layers):
    assert ours.branch_scale("default") == single.branch_scale("default")
    assert ours.gatera_magnitude.keys() == single.gatera_magnitude.keys()
    for key, value in single.gatera_magnitude.items():
        torch.testing.assert_close(ours.gatera_magnitude[key], value)
print("same adapter")
"""


@pytest.mark.parametrize("branch", ["hira", "dora"])
def test_adapter_added_to_a_base_loaded_partitioned_by_zero3(tmp_path, branch):
    """DoRA's magnitude starts at ‖W0‖ per row, read from the gathered W0 (it read the empty shard and failed), as
    the HiRA scale's RMS(W0) does: the same adapter as on an unpartitioned base."""
    from tests.distributed import free_port, run
    from tests.helpers import tiny_llama

    tiny_llama(hidden=64, intermediate=128).save_pretrained(tmp_path)
    done = run([sys.executable, "-c", ZERO3_LOADED_BASE, str(tmp_path), branch], MASTER_ADDR="127.0.0.1",
               MASTER_PORT=free_port(), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    ok(done)
    assert "same adapter" in done.stdout


def test_loss_scale_is_read_from_deepspeed_and_accelerate():
    from types import SimpleNamespace

    from gatera_plugin.trainer_integration import loss_scale_of

    ds = SimpleNamespace(is_deepspeed_enabled=True, model_wrapped=SimpleNamespace(
        optimizer=SimpleNamespace(custom_loss_scaler=False, loss_scaler=SimpleNamespace(loss_scale=2048.0))))
    assert loss_scale_of(ds) == 2048.0
    bf16 = SimpleNamespace(is_deepspeed_enabled=True, model_wrapped=SimpleNamespace(optimizer=SimpleNamespace()))
    assert loss_scale_of(bf16) == 1.0
    scaler = SimpleNamespace(is_enabled=lambda: True, get_scale=lambda: 512.0)
    amp = SimpleNamespace(is_deepspeed_enabled=False, accelerator=SimpleNamespace(scaler=scaler))
    assert loss_scale_of(amp) == 512.0
    autocast = SimpleNamespace(is_deepspeed_enabled=True, model_wrapped=SimpleNamespace(optimizer=SimpleNamespace(
        custom_loss_scaler=False, torch_autocast_gradscaler=scaler, loss_scaler=SimpleNamespace(loss_scale=1.0))))
    assert loss_scale_of(autocast) == 512.0  # DeepSpeed's `torch_autocast` with fp16 scales with a torch GradScaler


# DeepSpeed engines of each precision setting on one process: the scale GateRA gives the penalty is the one the engine
# multiplies the loss by (`torch_autocast` fp16 keeps it in a torch GradScaler, which was missed: scale 1 instead of
# 65536, the penalty effectively off)
DEEPSPEED_LOSS_SCALES = """
import types, deepspeed, torch
deepspeed.init_distributed(dist_backend="gloo")
from gatera_plugin.trainer_integration import loss_scale_of
# (DeepSpeed's own fp16, with its loss scaler, needs an accelerator: test_loss_scale_is_read_from_deepspeed_and_accelerate)
precisions = {"bf16": {"bf16": {"enabled": True}}, "fp32": {},
              "torch_autocast-fp16": {"torch_autocast": {"enabled": True, "dtype": "fp16"}}}
for stage in (0, 2):
    for name, precision in precisions.items():
        model = torch.nn.Linear(8, 8)
        config = dict(train_micro_batch_size_per_gpu=1, zero_optimization={"stage": stage},
                      zero_allow_untested_optimizer=True, **precision)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          config=config)
        probe = model(torch.ones(1, 8, dtype=next(model.parameters()).dtype)).float().sum() * 0 + 1.0
        applied = float(engine.scale(probe).detach())
        read = loss_scale_of(types.SimpleNamespace(is_deepspeed_enabled=True, model_wrapped=engine))
        print(f"stage {stage} {name}: applied {applied} read {read}")
"""


def test_loss_scale_is_what_each_deepspeed_engine_applies(tmp_path):
    from deepspeed.runtime.engine import DeepSpeedEngine

    from tests.distributed import free_port, run

    if not hasattr(DeepSpeedEngine, "scale"):
        pytest.skip("this DeepSpeed has no `engine.scale(loss)` that says what it multiplies the loss by")

    done = run([sys.executable, "-c", DEEPSPEED_LOSS_SCALES], MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    ok(done)
    lines = [line for line in done.stdout.splitlines() if line.startswith("stage ")]
    assert len(lines) == 6, done.stdout
    for line in lines:
        applied, read = (float(v) for v in line.split(" applied ")[1].split(" read "))
        assert applied == read, line
    assert any("torch_autocast-fp16: applied 65536.0" in line for line in lines), lines


@pytest.mark.parametrize("transformers_release,stage,deepspeed_release,expected", [
    ((5, 25), 2, (0, 19, 8), 0.5),  # each rank backpropagates its part, the engine sums: the penalty's share halves
    ((5, 25), 3, (0, 19, 8), 1.0),  # ZeRO-3 before 0.20.2 averages (transformers scales the part by sp_size)
    ((5, 25), 3, (0, 20, 2), 0.5),  # ZeRO-3 from 0.20.2 sums, as ZeRO-2 does
    ((5, 24), 2, (0, 19, 8), 1.0),  # every rank backpropagated the whole loss: the task gradient was sp_size x
    ((5, 25, 0, "dev0"), 2, (0, 19, 8), 1.0),  # a dev build of 5.25 is older than 5.25 (as transformers compares)
    ((5, 25), 3, (0, 20, 2, "rc1"), 1.0),  # and an rc of deepspeed 0.20.2 older than 0.20.2
])
def test_sequence_parallel_scale_follows_how_transformers_and_deepspeed_scale_the_task_loss(
        monkeypatch, transformers_release, stage, deepspeed_release, expected):
    """The factor on each rank's penalty share under Ulysses (sp_size=2), for each way the task loss's gradient comes
    out; 1 without sequence parallelism."""
    from types import SimpleNamespace

    from packaging.version import Version

    from gatera_plugin import trainer_integration

    releases = {"transformers": transformers_release, "deepspeed": deepspeed_release}
    monkeypatch.setattr(trainer_integration, "_older_than",
                        lambda package, release: Version(".".join(map(str, releases[package]))) < Version(release))

    def trainer(**parallelism):  # 4 processes: the scale is 1 / sp_size, not 1 / world size
        state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage))
        config = SimpleNamespace(**parallelism) if parallelism else None
        return SimpleNamespace(accelerator=SimpleNamespace(parallelism_config=config, state=state, num_processes=4))

    scale = trainer_integration.sequence_parallel_scale
    assert scale(trainer(sp_backend="deepspeed", sp_enabled=True, sp_size=2)) == expected
    assert scale(trainer()) == 1.0
    assert scale(trainer(sp_backend="deepspeed", sp_enabled=False, sp_size=1)) == 1.0
