"""GateRA inside TRL's SFTTrainer and transformers' Trainer, with nothing but the config."""

import logging

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from gatera_plugin import GateRAConfig
from tests.helpers import (
    LLAMA_PROJECTIONS,
    FirstStepCapture,
    backbone,
    explicit_penalty_gradient,
    gate_params,
    multipack_collator,
    plain_trainer,
    rounding_bound,
    texts_of_unequal_length,
    tiny_llama,
    toy_texts,
    word_tokenizer,
)

TARGETS = LLAMA_PROJECTIONS
LAMBDA = 0.5


def _sft_trainer(
    tmp_path, texts, entropy_weight, batch, accum, steps=1, checkpointing=False, reentrant=True, init_std=0.02,
    dtype=torch.float32, eval_texts=None, round_weights_to=None, **extra
):
    """`round_weights_to`: the base's weights are rounded to that dtype first (then cast to `dtype`)."""
    tokenizer = word_tokenizer(toy_texts(64))
    torch.manual_seed(0)
    args = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        max_steps=steps, learning_rate=extra.pop("learning_rate", 1e-2), logging_steps=extra.pop("logging_steps", 1),
        report_to="none",
        use_cpu=True, bf16=extra.pop("bf16", False), save_strategy=extra.pop("save_strategy", "no"), max_grad_norm=0.0,
        seed=0, max_length=32,
        gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        disable_tqdm=True, **extra,
    )
    config = GateRAConfig(
        r=4, target_modules=TARGETS, init_weights=False, gate_bias_init=0.8, entropy_weight=entropy_weight
    )
    return SFTTrainer(
        model=tiny_llama(init_std=init_std).to(round_weights_to or dtype).to(dtype), args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        eval_dataset=Dataset.from_dict({"text": eval_texts}) if eval_texts else None,
        processing_class=tokenizer,
        peft_config=config,
    )


def _first_step(make, tmp_path, texts, weight, batch, accum, **kwargs) -> FirstStepCapture:
    """Train the trainer `make` builds and return what its first optimisation step captured."""
    capture = FirstStepCapture()
    trainer = make(tmp_path, texts, weight, batch, accum, **kwargs)
    trainer.add_callback(capture)
    trainer.train()
    return capture


def _penalty_gradient(make, tmp_path, texts, batch, accum, **kwargs):
    """Gate gradient due to the penalty alone: (run with λ) − (same run with λ = 0)."""
    with_penalty, without = (_first_step(make, tmp_path, texts, weight, batch, accum, **kwargs)
                             for weight in (LAMBDA, 0.0))
    return {n: with_penalty.grads[n] - without.grads[n] for n in with_penalty.grads}, with_penalty


@pytest.mark.parametrize(
    "make,kwargs",
    [
        (_sft_trainer, {}),
        (_sft_trainer, {"checkpointing": True, "reentrant": True}),
        (_sft_trainer, {"checkpointing": True, "reentrant": False}),
        (plain_trainer, {}),
    ],
    ids=["sft", "sft-ckpt-reentrant", "sft-ckpt-nonreentrant", "trainer"],
)
def test_penalty_gradient_is_independent_of_accumulation_and_exact(tmp_path, make, kwargs):
    """GA=2 × batch 2 and GA=1 × batch 4 give the same penalty gradient on the gates, equal to the gradient of
    λ · mean H over the 4 sequences' real tokens (unequal lengths, so padding differs between the two)."""
    texts = texts_of_unequal_length()
    ga2, capture = _penalty_gradient(make, tmp_path, texts, batch=2, accum=2, **kwargs)
    ga1, _ = _penalty_gradient(make, tmp_path, texts, batch=4, accum=1, **kwargs)
    mask_a, mask_b = (inputs["attention_mask"] for inputs in capture.inputs)
    assert mask_a.shape != mask_b.shape and not (mask_a.all() and mask_b.all())  # padding differs between set-ups
    explicit = explicit_penalty_gradient(capture, LAMBDA)
    for name in ga1:
        assert ga1[name].abs().max() > 1e-6, name
        torch.testing.assert_close(ga2[name], ga1[name], rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(ga2[name], explicit[name], rtol=1e-4, atol=1e-7, msg=name)


def test_rows_packed_as_axolotl_numbers_them_get_the_exact_step_level_penalty(tmp_path, caplog):
    """Axolotl's `sample_packing: true` collator numbers the sequences packed into a row 1, 2, ... in the attention
    mask (0 is padding). The step's real tokens are counted right (no mismatch warning, no switch to per-forward
    normalisation) and the penalty gradient is the explicit one. (TRL's padding-free packing: tests/test_trl_trainers.py,
    "sft-packing".)"""
    with caplog.at_level(logging.WARNING, logger="gatera_plugin.trainer_integration"):
        penalty, capture = _penalty_gradient(plain_trainer, tmp_path, toy_texts(32), batch=4, accum=2,
                                             collator=multipack_collator)
    assert not [r.getMessage() for r in caplog.records if r.name == "gatera_plugin.trainer_integration"]
    masks = [inputs["attention_mask"] for inputs in capture.inputs]
    assert len(masks) == 2  # two micro-batches, whose rows hold two numbered sequences, and padding
    assert all(mask.max() == 2 for mask in masks) and any((mask == 0).any() for mask in masks)
    explicit = explicit_penalty_gradient(capture, LAMBDA)
    for name in penalty:
        assert penalty[name].abs().max() > 1e-6, name
        torch.testing.assert_close(penalty[name], explicit[name], rtol=1e-4, atol=1e-7, msg=name)


def test_a_trainer_that_drops_the_collated_mask_before_the_forward_still_counts_only_real_tokens(tmp_path, caplog):
    """Axolotl deletes `attention_mask` from Gemma 3 / 4 `sample_packing` batches before the forward (so that
    transformers builds per-sequence masks from `position_ids`), and its collator pads `position_ids` with 0, 1, ...,
    which from the position ids alone looks like one more packed sequence. The gated layers take the collated mask
    of that micro-batch instead: the same penalty gradient as with the mask, and no count mismatch. Before, the
    padding was counted: the first step was normalised by the wrong count (with a warning), the later ones per
    forward, with padding penalised and in the statistics."""

    def collator(tokenizer):
        return multipack_collator(tokenizer, positions_of_padding="range")

    dropped_masks = []

    def trainer_dropping_the_mask(*args, **kwargs):
        trainer = plain_trainer(*args, collator=collator, **kwargs)

        def compute_loss(self, model, inputs, *rest, **options):
            dropped_masks.append(inputs.pop("attention_mask"))
            return type(trainer).compute_loss(self, model, inputs, *rest, **options)

        trainer.compute_loss = compute_loss.__get__(trainer)
        return trainer

    with caplog.at_level(logging.WARNING, logger="gatera_plugin.trainer_integration"):
        penalty, capture = _penalty_gradient(trainer_dropping_the_mask, tmp_path, toy_texts(32), batch=4, accum=2)
    assert not [r.getMessage() for r in caplog.records if r.name == "gatera_plugin.trainer_integration"]
    assert all(inputs.get("attention_mask") is None for inputs in capture.inputs)
    masks = dropped_masks[:2]  # (the first step of the run with λ; its padding is what the position ids hide)
    assert all((mask == 0).any() for mask in masks)
    explicit = explicit_penalty_gradient(capture, LAMBDA, masks=masks)
    for name in penalty:
        assert penalty[name].abs().max() > 1e-6, name
        torch.testing.assert_close(penalty[name], explicit[name], rtol=1e-4, atol=1e-7, msg=name)


def test_a_step_with_no_micro_batches_changes_no_normalisation(tmp_path, caplog):
    """transformers 5.0, resumed mid-epoch, asks the exhausted epoch iterator for the skipped steps' batches and gets
    none (4 times at the epoch boundary in tests/test_reliability.py's resume test). Such an empty step runs no forward:
    it must not be taken for a trainer that builds its own inputs. Before, it switched the rest of the run to
    per-forward normalisation, and the resumed run's adapter differed from the uninterrupted run's (4.7e-4)."""
    from gatera_plugin.trainer_integration import begin_step

    class EmptyStepBetweenSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            begin_step(trainer, [])

    trainer = plain_trainer(tmp_path, toy_texts(8), LAMBDA, batch=2, accum=2)
    trainer.args.max_steps = 3
    trainer.add_callback(EmptyStepBetweenSteps())
    with caplog.at_level(logging.WARNING, logger="gatera_plugin.trainer_integration"):
        begin_step(trainer, [])  # before the first step, and after each (the last step is still checked)
        trainer.train()  # its steps are still normalised by the step's real tokens, with no warning
    assert not [r.getMessage() for r in caplog.records if r.name == "gatera_plugin.trainer_integration"]
    assert not trainer._gatera_normaliser.per_forward and trainer._gatera_normaliser.expected_tokens is not None


def test_context_parallel_ranks_count_their_shared_batches_once(caplog):
    """Under context parallelism (cp_size = 2, both ranks of one group here) each rank's prefetched micro-batches are
    the group's whole sequences (torch's CP splits them inside the training step): the step's tokens are those of one
    rank. The next step checks what all ranks' forwards saw together (each rank a part): the group's tokens pass, the
    positions of a forward that lost its attention mask are warned about and switch to per-forward normalisation.
    Batches that Axolotl's context parallelism already cut to each rank's part in the collator (marked `_cp_shard`)
    are each rank's own and add up. (tests/test_fsdp.py runs torch's CP end to end.)"""
    from types import SimpleNamespace

    from gatera_plugin.trainer_integration import PRE_SHARDED_KEY, begin_step

    model = get_peft_model(tiny_llama(), GateRAConfig(r=2, target_modules=["q_proj"]))
    run = model.base_model.penalty_run
    batch = {"input_ids": torch.ones(2, 8, dtype=torch.long),
             "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3])}  # 13 real tokens
    accelerator = SimpleNamespace(
        num_processes=2, device=torch.device("cpu"), scaler=None,
        gather=lambda tensor: torch.cat([tensor, tensor]),  # the other rank of the group holds (and saw) the same
        parallelism_config=SimpleNamespace(cp_enabled=True, cp_size=2),
    )

    def step(trainer, batches, seen_last_step, completed=True):
        run.tally_forwards, run.tally_tokens = (1, torch.tensor(seen_last_step)) if seen_last_step else (0, None)
        begin_step(trainer, batches)
        trainer.state.global_step += completed  # (the step's optimizer step)

    def new_trainer():
        return SimpleNamespace(model=model, accelerator=accelerator, state=SimpleNamespace(global_step=0))

    def warnings():
        return [r.getMessage() for r in caplog.records if r.name == "gatera_plugin.trainer_integration"]

    with caplog.at_level(logging.WARNING, logger="gatera_plugin.trainer_integration"):
        for batches, step_tokens, checked in (([batch], 13.0, None), ([{**batch, PRE_SHARDED_KEY: {}}], 26.0, 13)):
            trainer = new_trainer()
            step(trainer, batches, None)
            assert run.step_tokens == step_tokens and run.world_size == 2
            assert trainer._gatera_normaliser.expected_tokens == checked
            assert trainer._gatera_normaliser.expected_forwards == 1
        trainer = new_trainer()
        step(trainer, [batch], None, completed=False)  # a step that training stopped inside: no optimizer step took it
        step(trainer, [batch], 3)  # (its forwards saw part of its tokens: not judged)
        assert not warnings() and not trainer._gatera_normaliser.per_forward
        trainer = new_trainer()
        step(trainer, [batch], None)
        step(trainer, [batch], 6.5)  # each rank's forward saw half of the 13: together, the step's tokens
        assert not warnings() and run.step_tokens == 13.0
        step(trainer, [batch], 8)  # each saw its 8 positions, padding included (no mask where it was split)
        assert len(warnings()) == 1 and "saw 16 real tokens" in warnings()[0] and "batches held 13" in warnings()[0]
        assert trainer._gatera_normaliser.per_forward and run.step_tokens is None
    accelerator.parallelism_config.cp_enabled = False  # plain data parallelism: the ranks' batches add up
    trainer = new_trainer()
    step(trainer, [batch], None)
    assert run.step_tokens == 26.0 and trainer._gatera_normaliser.expected_tokens == 13


def test_a_batch_size_retried_after_out_of_memory_trains_like_a_run_started_at_it(tmp_path, caplog):
    """`auto_find_batch_size=True` (Trainer and Axolotl) runs the training loop again with a 10% smaller batch after an
    out-of-memory error. Here the error comes at the second forward of the first step, after one forward and backward
    with gradient. The retried run must equal a run started at the smaller batch: same losses and grad norms, same
    logged gate statistics, same adapter, and no warning. Before, the retry checked the aborted step against its own
    first step, warned of a forward-count and token mismatch, switched to per-forward normalisation and logged the
    aborted micro-batch's gates (adapter 0.03 off)."""
    def run(batch, oom):
        trainer = _sft_trainer(tmp_path, toy_texts(16), LAMBDA, batch=batch, accum=2, steps=3, auto_find_batch_size=oom)
        forwards = []

        # at the second micro-batch, so that the aborted step has run a forward and backward (at the first, it would
        # leave nothing behind to check)
        def out_of_memory_at_second_forward(module, args, kwargs):
            if torch.is_grad_enabled() and kwargs["input_ids"].shape[0] == 8:
                forwards.append(kwargs["input_ids"].shape)
                if len(forwards) == 2:
                    raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

        backbone(trainer.model).register_forward_pre_hook(out_of_memory_at_second_forward, with_kwargs=True)
        trainer.train()
        assert len(forwards) == (2 if oom else 0)
        return trainer

    with caplog.at_level(logging.WARNING, logger="gatera_plugin.trainer_integration"):
        retried = run(8, oom=True)
    assert not [r.getMessage() for r in caplog.records if r.name == "gatera_plugin.trainer_integration"]
    assert retried._train_batch_size == 7
    fresh = run(7, oom=False)
    # ours and the Trainer's (TRL's own `num_tokens` and `entropy` keep counting the aborted micro-batch)
    logged = [[{k: v for k, v in h.items() if k.startswith("gatera/") or k in ("loss", "grad_norm", "step")}
               for h in t.state.log_history] for t in (retried, fresh)]
    assert logged[0] == logged[1] and "gatera/penalty" in logged[0][0]
    ours, theirs = gate_params(retried.model), gate_params(fresh.model)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)


def _with_loss_scaler(scale: float):
    """`_sft_trainer` with the GradScaler that accelerate creates for fp16 on a GPU (it creates none on CPU)."""

    def make(*args, **kwargs):
        trainer = _sft_trainer(*args, **kwargs)
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        return trainer

    return make


def test_fp16_loss_scaling_scales_the_penalty_with_the_task_loss(tmp_path):
    """fp16 training (T4 and other GPUs without bf16) multiplies the loss by the GradScaler's scale before backward;
    the penalty's gradient must be scaled alike, or the scaler's unscale would shrink it 1/scale-fold. fp32 weights,
    so the comparison is exact: the first step's gate gradients, still scaled when the optimizer step begins, are
    scale × the explicit penalty's."""
    scale = 1024.0
    penalty, capture = _penalty_gradient(_with_loss_scaler(scale), tmp_path, toy_texts(16), batch=4, accum=2)
    explicit = explicit_penalty_gradient(capture, LAMBDA)
    for name in penalty:
        assert explicit[name].abs().max() > 1e-6, name
        torch.testing.assert_close(penalty[name] / scale, explicit[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_training_applies_the_penalty_within_rounding(tmp_path, dtype):
    """What GPU users run: a half-precision base trained with `bf16=True` or `fp16=True` (autocast; fp16 with a
    GradScaler at 1024, as on a GPU) and fp32 adapter weights. The first step's penalty gradient on the gates,
    unscaled, is within 5% of the largest entry of the explicit penalty's gradient computed in fp32; in bf16 also
    within twice the error of the same gradient by plain bf16 autograd, plus 2 ulps (helpers.rounding_bound). (In
    fp16 the largest error measured 2.0% where plain fp16 autograd's was 1.3%, so only the 5% rule applies there.)
    The gate parameters are fp32.

    A gate's gradient is computed in the half-precision dtype with the task loss's part in it, so it is rounded at the
    scale of that sum, and the penalty's part (the with-λ run's gradient minus the λ = 0 run's) inherits that
    rounding: each entry may be off by 2 ulps of its own larger whole gradient of the two runs (seen with the oldest
    supported TRL/transformers, whose data preparation gives other inputs: one gate bias whose task gradient is 10x its
    penalty gradient, 6.6e-3 against 7.7e-4, is 8% off: 6.4e-5, 1.1 × bf16's eps times the 7.3e-3 sum), and by twice
    the task gradient's own rounding error there, measured as the λ = 0 run's difference from the same run in fp32
    (an entry's gradient sums per-token terms that cancel, each rounded at its own scale: with Axolotl's pins, on a CPU
    whose oneDNN computes bf16 with AVX-512/AMX, one gate weight entry was 2.3e-4 off, 3.1x plain bf16 autograd's error
    of the penalty alone and 1.04x the bound without this term; 0.97x on the same CPU limited to AVX2)."""
    scale = 1024.0 if dtype == torch.float16 else 1.0
    make = _with_loss_scaler(scale) if dtype == torch.float16 else _sft_trainer
    flag = {"fp16": True} if dtype == torch.float16 else {"bf16": True}
    penalty, capture = _penalty_gradient(make, tmp_path, toy_texts(16), batch=4, accum=2, dtype=dtype, **flag)
    assert {p.dtype for n, p in capture.start.named_parameters() if "gatera" not in n} == {dtype}
    assert {p.dtype for p in gate_params(capture.start).values()} == {torch.float32}
    naive = explicit_penalty_gradient(capture, LAMBDA)  # plain autograd on the half-precision model
    capture.start = capture.start.float()
    truth = explicit_penalty_gradient(capture, LAMBDA)
    # the λ = 0 run in fp32, from the same (rounded) weights
    task_in_fp32 = _first_step(_sft_trainer, tmp_path, toy_texts(16), 0.0, 4, 2, round_weights_to=dtype)
    for name in penalty:
        assert truth[name].abs().max() > 1e-6, name
        bound = 0.05 * truth[name].abs().max().item()
        if dtype == torch.bfloat16:
            bound = min(bound, rounding_bound(naive[name], truth[name], dtype))
        # each entry may also be off by 2 ulps of its own whole gradient, task loss included, in either run
        with_task = capture.grads[name].double() / scale
        without = with_task - penalty[name].double() / scale
        allowed = (2 * torch.finfo(dtype).eps * torch.maximum(with_task.abs(), without.abs())).clamp(min=bound)
        allowed = allowed + 2 * (without - task_in_fp32.grads[name].double()).abs()
        error = (penalty[name].double() / scale - truth[name].double()).abs()
        assert (error <= allowed).all(), (name, error.max().item(), bound)
        assert (truth[name].double().abs() > allowed).any(), name  # a missing penalty would fail


@pytest.mark.slow  # ~90 s: inductor compiles each region between the graph breaks on a cold cache
def test_torch_compile_trains_exactly_like_eager(tmp_path):
    """`torch_compile=True` (inductor, with gradient checkpointing): the same losses, gate statistics and penalty
    (λ = 0.5, so a penalty applied at another scale, twice or not at all would move the gates) as the eager run."""
    runs = []
    for compiled in (False, True):
        trainer = _sft_trainer(tmp_path / str(compiled), toy_texts(32), LAMBDA, batch=4, accum=2, steps=3,
                               checkpointing=True, reentrant=False, torch_compile=compiled)
        trainer.train()
        assert compiled == (type(trainer.model_wrapped).__name__ == "OptimizedModule")  # it really ran compiled
        logs = [{k: v for k, v in h.items() if k == "loss" or k.startswith("gatera/")}
                for h in trainer.state.log_history if "loss" in h]
        runs.append((logs, {n: p.detach().clone() for n, p in gate_params(trainer.model).items()}))
    (eager_logs, eager_gates), (compiled_logs, compiled_gates) = runs
    assert len(eager_logs) == 3 and all(log["gatera/penalty"] > 0 for log in eager_logs)
    for eager, compiled in zip(eager_logs, compiled_logs):
        assert compiled.keys() == eager.keys()
        assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-7)
    for name in eager_gates:
        torch.testing.assert_close(compiled_gates[name], eager_gates[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_sft_trainer_end_to_end(tmp_path, dtype):
    """Loss falls, gate statistics reach the logs, the saved adapter reloads to the same outputs (bf16: a bf16 base
    trained with `bf16=True`, as on a GPU)."""
    texts = toy_texts(32)
    trainer = _sft_trainer(tmp_path, texts, 0.01, batch=8, accum=1, steps=40, learning_rate=3e-2,
                           checkpointing=True, reentrant=False, init_std=0.2, dtype=dtype,
                           bf16=dtype == torch.bfloat16)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in history]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    for key in ("gatera/gate_mean", "gatera/entropy", "gatera/gate_open_frac", "gatera/penalty"):
        assert all(key in h for h in history), key
        assert all(0.0 <= h[key] <= 1.0 for h in history)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    trained = trainer.model.eval()
    loaded = PeftModel.from_pretrained(tiny_llama(init_std=0.2).to(dtype), tmp_path / "adapter").eval()
    input_ids = torch.randint(3, 17, (2, 8))
    # under bf16, accelerate leaves the trained model's forward wrapped in autocast (fp32 outputs): run both so
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        torch.testing.assert_close(loaded(input_ids=input_ids).logits.float(), trained(input_ids=input_ids).logits)


def test_evaluation_during_training_and_load_best_model_at_end(tmp_path):
    """`eval_strategy="steps"` with `load_best_model_at_end`, checkpoint rotation and gradient checkpointing: every
    training log has the gate statistics and no evaluation log has them; training ends on the best checkpoint's
    adapter (an early one here: `greater_is_better=True` on the eval loss), reloaded through PEFT by the Trainer."""
    trainer = _sft_trainer(tmp_path, toy_texts(32), 0.01, batch=4, accum=2, steps=8, learning_rate=3e-1,
                           init_std=0.2, checkpointing=True, reentrant=False, eval_texts=toy_texts(8, seed=1),
                           eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                           save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                           greater_is_better=True)
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(train_logs) == 8 and all("gatera/entropy" in h for h in train_logs)
    assert len(eval_logs) == 4 and not any("gatera" in k for h in eval_logs for k in h)
    best = max(eval_logs, key=lambda h: h["eval_loss"])["step"]
    assert best < 8 and trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best}")
    input_ids = torch.randint(3, 17, (2, 8))
    with torch.no_grad():
        final = trainer.model.eval()(input_ids=input_ids).logits
        for step, same in ((best, True), (8, False)):
            saved = PeftModel.from_pretrained(tiny_llama(init_std=0.2), tmp_path / f"checkpoint-{step}").eval()
            assert torch.equal(saved(input_ids=input_ids).logits, final) == same, step


def test_per_layer_stats_andplain_trainer_logs(tmp_path):
    """Statistics reach state.log_history and every callback's on_log (which is how report_to backends get them)."""

    class Backend(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    backend = Backend()
    trainer = plain_trainer(tmp_path, texts_of_unequal_length(), LAMBDA, batch=2, accum=2)
    trainer.add_callback(backend)
    trainer.model.peft_config["default"].per_layer_stats = True
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h][0]
    reported = [h for h in backend.seen if "loss" in h][0]
    assert {k: v for k, v in reported.items() if k.startswith("gatera/")} == {
        k: v for k, v in logged.items() if k.startswith("gatera/")
    }
    assert "gatera/gate_mean/model.layers.0.self_attn.q_proj".replace("model.", "", 1) in logged
    assert logged["gatera/penalty"] == pytest.approx(LAMBDA * logged["gatera/entropy"])
    # after training the model is back to per-forward normalisation
    assert trainer.model.base_model.penalty_run.step_tokens is None


def test_one_process_on_several_gpus_is_refused_when_the_trainer_is_built(tmp_path, monkeypatch):
    """The Trainer would wrap the model in nn.DataParallel, whose threaded replicas share each layer's penalty state:
    refused, naming the launchers that run one process per GPU. (The GPU count is faked: no GPU here.)"""
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"sees 2 GPUs in one process.*DataParallel.*torchrun --nproc_per_node 2"):
        plain_trainer(tmp_path, toy_texts(8), entropy_weight=0.1, batch=4, accum=1)
    # a quantised model, which the Trainer does not wrap (it runs spread over the GPUs by its device map), is not refused
    from types import SimpleNamespace

    from gatera_plugin.trainer_integration import refuse_data_parallel

    monkeypatch.undo()
    quantised = plain_trainer(tmp_path, toy_texts(8), entropy_weight=0.1, batch=4, accum=1).model
    quantised.base_model.model.is_loaded_in_4bit = True
    refuse_data_parallel(SimpleNamespace(model=quantised, args=SimpleNamespace(n_gpu=2)))


def test_an_evaluation_with_its_own_metric_prefix_leaves_the_gate_statistics_to_training(tmp_path):
    """`trainer.evaluate(metric_key_prefix="test")` in the middle of training (e.g. from a callback) logs "test_*"
    keys: the pending statistics of the training steps stay for the next training log (they went into the test
    entry before; TRL's SFTTrainer adds "eval_*" keys of its own, which hid this, so here a plain Trainer)."""
    _side_log_leaves_the_statistics_to_training(
        tmp_path, lambda trainer: trainer.evaluate(eval_dataset=trainer.train_dataset, metric_key_prefix="test"),
        "test_loss")


def test_which_logs_take_the_gate_statistics():
    """Training logs ("loss", whatever else they hold: TRL adds its own metrics) and the end-of-training summary
    ("train_runtime" with "total_flos") take the gate statistics; `evaluate()`'s do not, whatever its
    `metric_key_prefix`, "train" included, nor a user's own log."""
    from gatera_plugin.trainer_integration import is_training_log

    assert is_training_log({"loss": 1.0, "grad_norm": 0.1, "learning_rate": 1e-3, "completions/mean_length": 3.0})
    assert is_training_log({"train_runtime": 1.0, "train_loss": 1.0, "total_flos": 5.0})
    for prefix in ("eval", "test", "train"):
        assert not is_training_log({f"{prefix}_loss": 1.0, f"{prefix}_runtime": 0.1})
    assert not is_training_log({"my_metric": 1.0})


def test_a_users_own_log_on_one_rank_makes_no_collective_and_leaves_the_statistics_to_training(tmp_path):
    """`if trainer.is_world_process_zero(): trainer.log({"my_metric": 1.0})`, harmless with any other model, all-
    reduced the gate statistics on rank 0 alone: under torchrun it waited for the other ranks for ever (confirmed on
    2 gloo ranks: a timeout). A log that is not the training loop's gathers nothing, and the statistics stay for
    the next training log."""
    def log_own_metric(trainer):
        tuner = trainer.model.base_model
        real_pop, tuner.pop_gate_stats = tuner.pop_gate_stats, None  # (a call would fail: no collective)
        trainer.log({"my_metric": 1.0})
        tuner.pop_gate_stats = real_pop

    _side_log_leaves_the_statistics_to_training(tmp_path, log_own_metric, "my_metric")


def _side_log_leaves_the_statistics_to_training(tmp_path, side_log, key: str) -> None:
    """Train 2 steps with one training log at the end and `side_log(trainer)` after step 1; check that the side log
    (the history entry holding `key`) took no gate statistics and the training log has them."""
    from transformers import TrainerCallback

    class SideLog(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                side_log(trainer)

    trainer = plain_trainer(tmp_path, toy_texts(16), 0.01, batch=4, accum=1)
    trainer.args.max_steps, trainer.args.logging_steps = 2, 2
    trainer.add_callback(SideLog())
    trainer.train()
    side = [h for h in trainer.state.log_history if key in h]
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(side) == 1 and not any(k.startswith("gatera") for k in side[0])
    assert len(train_logs) == 1 and "gatera/entropy" in train_logs[0]


def test_a_model_from_model_init_gets_its_half_precision_gates_returned_to_fp32(tmp_path):
    """`Trainer(model_init=...)` (hyperparameter search's route): `train` builds the model after the plugin's wrapper
    had looked for half-precision gates on the trainer's previous model, so a bf16 model's gates stayed bf16, where
    an update of ~lr is below the rounding of a bias near 1: they never moved, without a word. Now they are returned
    to fp32 when `model_init` has built the model, as for `model=`, and learn; a resumed run loads the checkpoint's
    fp32 gates into fp32 (not rounded through bf16)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = word_tokenizer(toy_texts(64))
    dataset = Dataset.from_dict({"text": toy_texts(16)}).map(lambda e: tokenizer(e["text"]), remove_columns=["text"])

    def model_init(trial=None):
        torch.manual_seed(0)
        config = GateRAConfig(r=4, target_modules=TARGETS, init_weights=False, gate_bias_init=0.8, entropy_weight=0.3)
        return get_peft_model(tiny_llama(), config).to(torch.bfloat16)

    def trainer():
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                                 learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="steps",
                                 save_steps=2, disable_tqdm=True)
        return Trainer(model_init=model_init, args=args, train_dataset=dataset,
                       data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))

    def biases(model):
        return [p.detach().clone() for name, p in model.named_parameters()
                if "gatera_gate" in name and name.endswith("bias")]

    first = trainer()
    first.train()
    trained = biases(first.model)
    assert trained and all(b.dtype == torch.float32 for b in trained)
    # (bf16 rounds 0.8 to 0.80078, 2^-8 from its neighbours: a bf16 bias stays there; the fp32 ones moved by ~lr)
    start = torch.tensor(0.8).bfloat16().float()
    assert all((b - start).abs().max() > 5e-4 for b in trained)
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))  # (no step left: loads the checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(biases(resumed.model), trained))


def test_a_step_the_trainer_abandons_is_not_judged_as_a_short_one(tmp_path, caplog):
    """A callback that stops training inside an accumulation step (e.g. a wall-clock budget: `should_training_stop`
    in `on_step_begin`) ends the loop after one of the step's micro-batches, with no optimizer step. The check at the
    end of training took that for a trainer running 0.5 forwards per micro-batch and changing its inputs: two false
    warnings, and the normalisation kept on the trainer, so that a second `train()` applied the structure penalty at
    2x. Now a step that no optimizer step took is not judged."""
    class StopInsideStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                control.should_training_stop = True

    trainer = plain_trainer(tmp_path, texts_of_unequal_length(), LAMBDA, batch=2, accum=2)
    trainer.args.max_steps = 3
    trainer.add_callback(StopInsideStep())
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.state.global_step == 1
    assert not [r for r in caplog.records if "GateRA" in r.getMessage()], caplog.text
    state = trainer._gatera_normaliser
    assert (state.forwards_per_batch, state.per_forward) == (1.0, False)


def test_training_gatera_layers_that_no_peft_model_holds_is_refused(tmp_path):
    """transformers' `model.load_adapter(folder, is_trainable=True)` (or PEFT's `inject_adapter_in_model`) attaches
    GateRA layers and drops the GateRA model that the Trainer integration works through: the run trained with each
    forward normalising its own penalty (3.2x the configured strength's gradient under gradient accumulation 4) and
    logged no statistics, without a word. Refused at `train()`, naming the PEFT way; a frozen adapter (inference,
    evaluation; also over base weights being trained) is not refused."""
    from peft import inject_adapter_in_model
    from transformers import Trainer, TrainingArguments

    model = inject_adapter_in_model(GateRAConfig(r=4, target_modules=TARGETS, entropy_weight=0.5, branch="lora",
                                                 lora_alpha=8), tiny_llama())  # (LoRA: its base may be trained)
    data = [{"input_ids": list(range(3, 15)), "labels": list(range(3, 15))}] * 4
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1,
                             per_device_train_batch_size=2, save_strategy="no")
    with pytest.raises(ValueError, match=r"trainable GateRA layers outside a PEFT model .*PeftModel.from_pretrained"):
        Trainer(model=model, args=args, train_dataset=data).train()
    for param in model.parameters():
        param.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)  # (the base under an adapter)
    Trainer(model=model, args=args, train_dataset=data).train()


@pytest.mark.parametrize("gates", [{"gate_bias_init": -10.0}, {"gate": "none", "structure_gate": True,
                                                               "structure_init": -10.0}], ids=["token", "structure"])
def test_an_fp16_run_trains_gates_started_nearly_closed(tmp_path, gates):
    """A T4's run: fp16 base, `fp16=True` (autocast, a GradScaler at its initial 2^16), HiRA with
    hira_scaling='lora', whose scale s is 1/g0 times larger for gates started nearly closed (g0 = σ(-10) = 4.5e-5).
    The gates' gradient `s · Σ P ⊙ x` was formed in fp16 before σ′ shrinks it: it overflowed at every loss scale, so
    the scaler skipped every step after the first (B starts at 0), halving its scale each time, and the gates never
    trained. It is formed in fp32 now: the scaler keeps its scale and the gates move."""
    tokenizer = word_tokenizer(toy_texts(64))
    torch.manual_seed(0)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
                     report_to="none", use_cpu=True, fp16=True, save_strategy="no", seed=0, max_length=32,
                     disable_tqdm=True)
    config = GateRAConfig(r=4, target_modules=TARGETS, entropy_weight=0.0, **gates)
    trainer = SFTTrainer(model=tiny_llama().to(torch.float16), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"text": toy_texts(24)}), peft_config=config)
    trainer.accelerator.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    gates = {name: p for name, p in trainer.model.named_parameters() if "gatera_gate" in name or "structure" in name}
    start = {name: p.detach().clone() for name, p in gates.items()}
    trainer.train()
    assert scaler.get_scale() >= 2.0 ** 14  # (at most two steps skipped; before: every step after the first)
    for name, p in gates.items():
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), start[name]), name
