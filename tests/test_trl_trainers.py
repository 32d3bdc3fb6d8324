"""Every TRL 1.16 trainer that takes `peft_config`, with a GateRAConfig: it trains, applies the penalty once at the
scale README states for that trainer (the `N` of "How the penalty is applied"), logs the gate statistics, and saves
an adapter that reloads to the same outputs.

The penalty check: the gate gradients of the first optimisation step with λ minus those of the same run with λ = 0
must equal the gradient of the explicit penalty, computed with plain autograd from the inputs that the model's
forwards with gradient really received (captured at the backbone) and the weights at the start of training.
"""

import logging
import math

import pytest
import torch
import trl
from datasets import Dataset
from packaging.version import Version
from peft import PeftModel
from transformers import Trainer

from gatera_plugin import FrozenHeadWarning, GateRAConfig
from gatera_plugin.trainer_integration import check_generation_backend, count_real_tokens
from tests.helpers import (
    BYTE_LEVEL_VOCAB,
    FirstStepCapture,
    backbone,
    byte_level_tokenizer,
    explicit_penalty_gradient,
    plain_trainer,
    texts_of_unequal_length,
    tiny_llama,
    tiny_llama_classifier,
    toy_texts,
    word_tokenizer,
)

LAMBDA = 0.5
BATCH, ACCUM = 2, 2  # two micro-batches per optimisation step
PROMPTS = ["count one two", "count three four five six", "count five", "count two three four five six seven"]
CHOSEN = [" three four", " seven", " six seven eight nine", " eight"]
REJECTED = [" nine ten eleven", " two", " one", " zero ten"]

# trainer -> (what the step-level count reads, so the normaliser mode the test expects)
# N = real tokens of all the step's micro-batches ("sft-packing": SFT's `packing=True`, padding-free, flattens each
# micro-batch into one row without a mask; DPO's `padding_free` is disabled in TRL 1.16, which falls back to padding)
STEP_LEVEL = {"sft", "sft-packing", "sft-neftune", "dpo", "kto", "reward", "orpo", "cpo", "tpo"}
# kinds that run the trainer of the kind before "-" with other settings -> those settings ("sft-packing": rows of at
# most 16 tokens, so that the 8 texts fill both micro-batches of a step)
VARIANTS = {
    "sft-packing": {"packing": True, "max_length": 16},
    # NEFTune (noise added to the embeddings in training forwards): the penalty is that of the noised forwards
    "sft-neftune": {"neftune_noise_alpha": 5.0},
    # GRPO as RL recipes run it: a KL term to the reference model (the base: the adapter disabled, forwards without
    # gradient) and each generation batch reused for two optimisation steps (old log-probabilities, no gradient)
    "grpo-kl": {"beta": 0.04, "num_iterations": 2},
}
PER_FORWARD = {  # N = this forward's tokens × forwards × ranks
    "grpo", "grpo-kl", "rloo", "gmpo", "distillation", "online_dpo", "gkd", "gold", "sdft", "sdpo", "iw_opd",
}
# every TRL trainer that takes `peft_config` (test_every_trl_trainer_with_peft_config_is_tested_here) -> its kind here
TESTED = {
    "SFTTrainer": "sft", "DPOTrainer": "dpo", "KTOTrainer": "kto", "RewardTrainer": "reward", "GRPOTrainer": "grpo",
    "RLOOTrainer": "rloo", "DistillationTrainer": "distillation", "ORPOTrainer": "orpo", "CPOTrainer": "cpo",
    "TPOTrainer": "tpo", "OnlineDPOTrainer": "online_dpo", "GKDTrainer": "gkd", "GOLDTrainer": "gold",
    "SDFTTrainer": "sdft", "SDPOTrainer": "sdpo", "IWOPDTrainer": "iw_opd", "GMPOTrainer": "gmpo",
}
UNTESTED = {  # -> why not here (README, "How the penalty is applied", says the same)
    "AsyncGRPOTrainer": "generates through a vLLM server",
    "AsyncDistillationTrainer": "generates through a vLLM server",
    "ServerDistillationTrainer": "takes its teacher's logits from a server",
}
# experimental trainers of the older TRL releases that pyproject.toml admits (1.14, 1.15: Axolotl 0.21 pins 1.14.1),
# removed in 1.16; the oldest-versions run (scripts/setup_oldest.sh) meets them
UNTESTED_OLDER_TRL = {"MiniLLMTrainer": "TRL 1.14-1.15 only", "SSDTrainer": "TRL 1.14-1.15 only"}


def _tokenizer():
    return word_tokenizer(toy_texts(64) + PROMPTS + CHOSEN + REJECTED)


def _length_reward(completions, **kwargs):
    """A tiny reward function: longer completions score higher."""
    return [float(len(c.split())) for c in completions]


def _chat_tokenizer(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def _chats():
    return Dataset.from_dict({"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                                           for p, c in zip(PROMPTS, CHOSEN)] * 2})


def _base(kind, seed=0):
    if kind == "reward":
        return tiny_llama_classifier(seed=seed)
    return tiny_llama(vocab=BYTE_LEVEL_VOCAB, seed=seed) if kind == "gold" else tiny_llama(seed=seed)


def _trainer(kind, tmp_path, entropy_weight, steps):
    """A `kind` trainer over a tiny Llama with `GateRAConfig` (default targets, gates away from 0.5 so H' ≠ 0)."""
    common = dict(
        output_dir=str(tmp_path / kind), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
        max_steps=steps, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
        save_strategy="no", max_grad_norm=0.0, seed=0, disable_tqdm=True,
    )
    config = GateRAConfig(init_weights=False, gate_bias_init=0.8, entropy_weight=entropy_weight,
                          task_type="SEQ_CLS" if kind == "reward" else None)
    preference = Dataset.from_dict({"prompt": PROMPTS * 2, "chosen": CHOSEN * 2, "rejected": REJECTED * 2})
    prompts = Dataset.from_dict({"prompt": PROMPTS * 2})
    shared = dict(processing_class=_tokenizer(), peft_config=config)
    torch.manual_seed(0)
    variant_args = VARIANTS.get(kind, {})
    kind = kind.split("-")[0]
    if kind == "sft":
        texts = [p + c for p, c in zip(PROMPTS, CHOSEN)] * 2
        return trl.SFTTrainer(model=tiny_llama(), args=trl.SFTConfig(**common, **{"max_length": 32, **variant_args}),
                              train_dataset=Dataset.from_dict({"text": texts}), **shared)
    if kind == "dpo":
        return trl.DPOTrainer(model=tiny_llama(), args=trl.DPOConfig(**common), train_dataset=preference, **shared)
    if kind == "kto":
        data = Dataset.from_dict({"prompt": PROMPTS * 2, "completion": CHOSEN + REJECTED, "label": [True, False] * 4})
        return trl.KTOTrainer(model=tiny_llama(), args=trl.KTOConfig(**common), train_dataset=data, **shared)
    if kind == "reward":
        pairs = {"chosen": [p + c for p, c in zip(PROMPTS, CHOSEN)] * 2,
                 "rejected": [p + r for p, r in zip(PROMPTS, REJECTED)] * 2}
        return trl.RewardTrainer(model=tiny_llama_classifier(), args=trl.RewardConfig(**common),
                                 train_dataset=Dataset.from_dict(pairs), **shared)
    if kind in ("grpo", "rloo", "gmpo"):
        if kind == "gmpo":  # GRPO with a geometric-mean loss (trl.experimental since TRL 1.16)
            gmpo = pytest.importorskip("trl.experimental.gmpo")
            config_cls, trainer_cls = gmpo.GMPOConfig, gmpo.GMPOTrainer
        else:
            config_cls, trainer_cls = (trl.GRPOConfig, trl.GRPOTrainer) if kind == "grpo" else (trl.RLOOConfig,
                                                                                                trl.RLOOTrainer)
        args = config_cls(**common, num_generations=2, max_completion_length=4, **variant_args)
        return trainer_cls(model=tiny_llama(), reward_funcs=_length_reward, args=args, train_dataset=prompts, **shared)
    if kind == "distillation":
        data = Dataset.from_dict({"prompt": PROMPTS * 2, "completion": CHOSEN * 2})
        args = trl.DistillationConfig(**common, max_completion_length=4)
        return trl.DistillationTrainer(model=tiny_llama(), teacher_model=tiny_llama(seed=1), args=args,
                                       train_dataset=data, **shared)
    if kind in ("orpo", "cpo"):
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        config_cls, trainer_cls = (ORPOConfig, ORPOTrainer) if kind == "orpo" else (CPOConfig, CPOTrainer)
        return trainer_cls(model=tiny_llama(), args=config_cls(**common, max_length=32), train_dataset=preference,
                           **shared)
    if kind == "tpo":
        from trl.experimental.tpo import TPOConfig, TPOTrainer

        data = preference.add_column("reference", CHOSEN * 2)
        return TPOTrainer(model=tiny_llama(), args=TPOConfig(**common), train_dataset=data, **shared)
    if kind == "online_dpo":
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        return OnlineDPOTrainer(model=tiny_llama(), reward_funcs=_length_reward, train_dataset=prompts,
                                args=OnlineDPOConfig(**common, max_new_tokens=4), **shared)
    if kind == "gkd":  # on-policy with probability lmbda = 0.5: its batches are the model's inputs only sometimes
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        _chat_tokenizer(shared["processing_class"])
        return GKDTrainer(model=tiny_llama(), teacher_model=tiny_llama(seed=1), train_dataset=_chats(),
                          args=GKDConfig(**common, max_new_tokens=4, max_length=32), **shared)
    if kind == "gold":  # GKD's successor; its dataset preparation needs a byte-level BPE tokenizer
        from trl.experimental.gold import GOLDConfig, GOLDTrainer

        shared["processing_class"] = _chat_tokenizer(byte_level_tokenizer(toy_texts(64) + PROMPTS + CHOSEN))
        return GOLDTrainer(model=_base(kind), teacher_model=_base(kind, seed=1), train_dataset=_chats(),
                           args=GOLDConfig(**common, max_completion_length=4, max_length=32), **shared)
    if kind == "sdft":  # self-distillation: the teacher is the same model with its adapter disabled (the default)
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        data = prompts.add_column("privileged_context", CHOSEN * 2)
        return SDFTTrainer(model=tiny_llama(), args=SDFTConfig(**common, max_completion_length=4, num_generations=2),
                           train_dataset=data, **shared)
    if kind == "sdpo":  # self-distillation: the teacher is the current model itself ("ema" needs a pure LoRA model)
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

        args = SDPOConfig(**common, max_completion_length=4, num_generations=2, teacher_model_kind="live")
        return SDPOTrainer(model=tiny_llama(), reward_funcs=_length_reward, args=args, train_dataset=prompts,
                           **shared)
    if kind == "iw_opd":  # its teacher is loaded from a path, to check that the tokenizers match
        from trl.experimental.iw_opd import IWOPDConfig, IWOPDTrainer

        teacher_dir = tmp_path / "teacher"
        tiny_llama(seed=1).save_pretrained(teacher_dir)
        _chat_tokenizer(shared["processing_class"]).save_pretrained(teacher_dir)
        return IWOPDTrainer(model=tiny_llama(), teacher_model=str(teacher_dir), train_dataset=_chats(),
                            args=IWOPDConfig(**common, max_completion_length=4), **shared)
    raise ValueError(kind)


def _run(kind, tmp_path, entropy_weight, steps, record_embeddings=True):
    """`record_embeddings=False`: replay NEFTune's forwards from their token ids (the negative control)."""
    capture = FirstStepCapture(record_embeddings=record_embeddings and kind == "sft-neftune")
    trainer = _trainer(kind, tmp_path, entropy_weight, steps)
    trainer.add_callback(capture)
    trainer.train()
    return trainer, capture


@pytest.mark.slow  # 3-7 s each on one thread, ~1 min for all
@pytest.mark.parametrize("kind", sorted(STEP_LEVEL | PER_FORWARD))
def test_trl_trainer_trains_penalises_logs_and_reloads(kind, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gatera_plugin.trainer_integration"):
        trainer, capture = _run(kind, tmp_path, LAMBDA, steps=2)
    warnings = [r.getMessage() for r in caplog.records if r.name == "gatera_plugin.trainer_integration"]
    per_forward = kind in PER_FORWARD
    # the normaliser README states for this trainer, said once when it is the per-forward one, and no mismatch
    assert trainer._gatera_normaliser.per_forward == per_forward
    assert len(warnings) == per_forward and all("cannot be counted in advance" in w for w in warnings), warnings
    assert len(capture.inputs) == ACCUM  # one forward with gradient per micro-batch
    if kind == "sft-neftune":  # the noise was there, in the forwards the penalty check replays, and is gone after
        from transformers.integrations.neftune import neftune_post_forward_hook

        assert capture.embeddings_changed > 0.05
        assert neftune_post_forward_hook not in trainer.model.get_input_embeddings()._forward_hooks.values()
    if kind == "sft-packing":  # flattened: one row per micro-batch, and no mask
        assert all(inputs.get("attention_mask") is None and len(inputs["input_ids"]) == 1 for inputs in capture.inputs)

    # training ran, the loss is finite, the gate statistics reached the logs
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == 2
    for entry in history:
        assert torch.isfinite(torch.tensor(entry["loss"])), entry
        assert 0.0 <= entry["gatera/entropy"] <= 1.0 and 0.0 <= entry["gatera/gate_mean"] <= 1.0, entry
        assert entry["gatera/penalty"] == pytest.approx(LAMBDA * entry["gatera/entropy"])
    assert trainer.model.base_model.penalty_run.step_tokens is None  # per-forward again after training
    if kind == "grpo-kl":  # the reference forwards ran (the adapter disabled: the KL to it is not 0) and were not counted
        assert trainer.ref_model is None and all(h["kl"] > 0 for h in history), history

    # the penalty was applied once, at the stated scale: (λ run − λ=0 run) gate gradients = explicit penalty's
    _, without = _run(kind, tmp_path, 0.0, steps=1)
    explicit = explicit_penalty_gradient(capture, LAMBDA, per_forward)
    for name, grad in capture.grads.items():
        injected = grad - without.grads[name]
        assert explicit[name].abs().max() > 1e-6, name
        torch.testing.assert_close(injected, explicit[name], rtol=1e-4, atol=1e-7, msg=name)

    # every adapter tensor (and the reward model's score head, trained in full) was trained
    changed = {n for n, p in trainer.model.named_parameters() if p.requires_grad
               and not torch.equal(p.detach(), capture.start.get_parameter(n))}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert changed == trainable, trainable - changed
    if kind == "reward":
        assert any(".score." in n for n in trainable)

    # the saved adapter reloads to the same outputs
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(_base(kind), tmp_path / "adapter").eval()
    trained = trainer.model.eval()
    input_ids = torch.randint(4, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, trained(input_ids=input_ids).logits)


@pytest.mark.slow
def test_the_neftune_check_needs_the_noised_embeddings(tmp_path):
    """Negative control of the `sft-neftune` case: replayed from the token ids instead of the embeddings the layers
    received, the explicit penalty gradient misses the injected one, so that case's check sees the noise."""
    _, capture = _run("sft-neftune", tmp_path, LAMBDA, steps=1, record_embeddings=False)
    _, without = _run("sft-neftune", tmp_path, 0.0, steps=1, record_embeddings=False)
    explicit = explicit_penalty_gradient(capture, LAMBDA)
    errors = [((capture.grads[n] - without.grads[n] - explicit[n]).abs().max() / explicit[n].abs().max()).item()
              for n in capture.grads]
    assert max(errors) > 1e-2, errors


class _Truncating(Trainer):
    """Feeds the model one token fewer than its dataloader gave: the batches' count is not what the model sees."""

    def compute_loss(self, model, inputs, **kwargs):
        return super().compute_loss(model, {k: v[:, :-1] for k, v in inputs.items()}, **kwargs)


class _TwoForwards(Trainer):
    """Runs each micro-batch as two forwards (its even and odd rows): the tokens add up, the forwards do not."""

    def compute_loss(self, model, inputs, **kwargs):
        halves = [{k: v[i::2] for k, v in inputs.items()} for i in (0, 1)]
        return sum(super(_TwoForwards, self).compute_loss(model, half, **kwargs) for half in halves) / 2


@pytest.mark.parametrize("trainer_cls,expected", [
    (_Truncating, "but its prefetched batches held"),
    (_TwoForwards, "ran 4 forward(s) with gradient in an optimisation step of 2 micro-batch(es)"),
], ids=["tokens-differ", "forwards-differ"])
@pytest.mark.parametrize("reentrant", [None, False, True], ids=["no-checkpointing", "checkpointing", "reentrant"])
def test_a_wrong_count_is_said_and_corrected(trainer_cls, expected, reentrant, tmp_path, caplog):
    """When a trainer's forwards do not see what its batches held, a warning gives both numbers and later steps are
    normalised by what the forwards really saw; also under gradient checkpointing, where a reentrant checkpoint runs
    the layers without gradient and their taps first appear in backward's recomputation (the check never ran
    there: the penalty stayed at the wrong scale in every step, unsaid)."""
    trainer = plain_trainer(tmp_path, texts_of_unequal_length(), LAMBDA, batch=2, accum=2)
    trainer.__class__ = trainer_cls
    trainer.args.max_steps = 2
    if reentrant is not None:
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        trainer.model.enable_input_require_grads()  # (what a reentrant checkpoint needs to reach the adapters)
        assert backbone(trainer.model).is_gradient_checkpointing
    with caplog.at_level(logging.WARNING, logger="gatera_plugin.trainer_integration"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.name == "gatera_plugin.trainer_integration"]
    assert any(expected in w for w in warnings), warnings
    state = trainer._gatera_normaliser
    if trainer_cls is _Truncating:
        assert state.per_forward and state.forwards_per_batch == 1.0
    else:
        assert not state.per_forward and state.forwards_per_batch == 2.0
        assert len(warnings) == 1  # said once: the second step ran as corrected


def _padding_free_run(tmp_path, pad_to_multiple_of, caplog):
    """One SFT step, padding-free (sequences flattened into one row, no mask), its row padded to a multiple or not."""
    args = trl.SFTConfig(output_dir=str(tmp_path / str(pad_to_multiple_of)), per_device_train_batch_size=BATCH,
                         gradient_accumulation_steps=ACCUM, max_steps=1, learning_rate=1e-2, logging_steps=1,
                         report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, padding_free=True,
                         pad_to_multiple_of=pad_to_multiple_of, max_length=None, seed=0,
                         bf16=False)  # (fp32: bf16 reductions over 30 or 64 positions round differently)
    torch.manual_seed(0)
    trainer = trl.SFTTrainer(model=tiny_llama(), args=args, processing_class=_tokenizer(),
                             train_dataset=Dataset.from_dict({"text": [p + c for p, c in zip(PROMPTS, CHOSEN)] * 2}),
                             peft_config=GateRAConfig(init_weights=False, gate_bias_init=0.8, entropy_weight=LAMBDA))
    capture = FirstStepCapture()
    trainer.add_callback(capture)
    with caplog.at_level(logging.WARNING, logger="gatera_plugin.trainer_integration"):
        trainer.train()
    return trainer, capture


def test_padding_of_a_padding_free_row_is_not_counted(tmp_path, caplog):
    """TRL pads a padding-free row to `pad_to_multiple_of` with position ids 0 and sends no mask: those positions are
    not tokens. The step's gate gradients (task loss and penalty) and statistics equal those of the unpadded run;
    before, the 64-position rows counted every pad (`N` and the statistics over pads)."""
    plain, plain_capture = _padding_free_run(tmp_path, None, caplog)
    padded, padded_capture = _padding_free_run(tmp_path, 64, caplog)
    assert [tuple(i["input_ids"].shape) for i in padded_capture.inputs] == [(1, 64)] * ACCUM
    assert all(i.get("attention_mask") is None for i in padded_capture.inputs)
    assert not [r for r in caplog.records if r.name == "gatera_plugin.trainer_integration"]  # no count mismatch
    real = sum(i["input_ids"].numel() for i in plain_capture.inputs)
    assert int(count_real_tokens(padded_capture.inputs)) == real < 64 * ACCUM
    for name, grad in plain_capture.grads.items():
        torch.testing.assert_close(padded_capture.grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    logged = [next(h for h in t.state.log_history if "loss" in h) for t in (plain, padded)]
    for key in ("gatera/entropy", "gatera/gate_mean", "gatera/penalty"):
        assert logged[1][key] == pytest.approx(logged[0][key], rel=1e-5), key


def test_count_real_tokens_of_each_batch_layout():
    """Model inputs count their mask (or every position); ORPO/CPO pairs count both sides; raw rows count as unknown."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert int(count_real_tokens([{"input_ids": torch.zeros(2, 3), "attention_mask": mask}] * 2)) == 10
    assert int(count_real_tokens([{"input_ids": torch.zeros(1, 7)}])) == 7  # padding-free: every position is real
    flat = {"input_ids": torch.zeros(1, 9), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0, 0]])}
    assert int(count_real_tokens([flat])) == 5  # padded to a multiple: position ids 0 after the last positive one
    flat["position_ids"] = torch.tensor([[0, 1, 0, 1, 2, 3, 4, 5, 6]])
    assert int(count_real_tokens([flat])) == 9
    assert int(count_real_tokens([{"input_ids": torch.zeros(2, 1), "position_ids": torch.zeros(2, 1)}])) == 2
    assert int(count_real_tokens([{"input_ids": torch.zeros(2, 3), "position_ids": torch.arange(3)[None]}])) == 6
    paired = {"prompt_input_ids": torch.zeros(2, 2), "chosen_input_ids": torch.zeros(2, 3),
              "chosen_attention_mask": mask, "rejected_input_ids": torch.zeros(2, 4),
              "rejected_attention_mask": torch.ones(2, 4)}
    assert int(count_real_tokens([paired])) == 5 + 8
    assert int(count_real_tokens([])) == 0  # a step with no micro-batches (transformers 5.0 after resuming)
    assert count_real_tokens([[{"prompt": "count one"}]]) is None  # GRPO's raw rows
    assert count_real_tokens([{"chosen_input_ids": torch.zeros(2, 3)}]) is None  # half a pair


def test_reward_trainer_says_when_the_score_head_is_not_trained(tmp_path):
    """RewardTrainer with a plain GateRAConfig() keeps the new score head frozen at random: a warning names the fix."""
    tokenizer = _tokenizer()
    pairs = Dataset.from_dict({"chosen": PROMPTS, "rejected": PROMPTS[::-1]})
    args = trl.RewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    with pytest.warns(FrozenHeadWarning, match='task_type="SEQ_CLS"'):
        trainer = trl.RewardTrainer(model=tiny_llama_classifier(), args=args, train_dataset=pairs,
                                    processing_class=tokenizer, peft_config=GateRAConfig())
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if ".score." in n)


def _trainers_taking_peft_config():
    """Names of the trainer classes in `trl` and `trl.experimental` whose `__init__` takes `peft_config`, their own or
    an inherited one (an import-path alias or a deprecated subclass of the same name counts as the class it wraps; a
    subclass of another name, such as GMPO's of GRPO, is a trainer of its own)."""
    import importlib
    import inspect
    import pkgutil
    import warnings

    import trl.experimental

    modules = [trl]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for info in pkgutil.iter_modules(trl.experimental.__path__):
            try:
                modules.append(importlib.import_module(f"trl.experimental.{info.name}"))
            except ImportError:  # needs an optional package (vLLM, ...) that this environment lacks
                continue
    found = set()
    for module in modules:
        for name, cls in vars(module).items():
            if not (name.endswith("Trainer") and isinstance(cls, type) and issubclass(cls, Trainer)):
                continue
            for owner in cls.__mro__:
                init = owner.__dict__.get("__init__")
                if init is not None and "peft_config" in inspect.signature(init).parameters:
                    found.add(owner.__name__)
                    found.add(cls.__name__)
                    break
    return found


def test_every_trl_trainer_with_peft_config_is_tested_here():
    """A TRL release that adds a trainer taking `peft_config` fails here until it is tested above (or listed as
    untestable offline, with the reason), so README's list of supported trainers stays true."""
    found = _trainers_taking_peft_config()
    assert found - TESTED.keys() - UNTESTED.keys() - UNTESTED_OLDER_TRL.keys() == set(), \
        "add these trainers to _trainer() and README"
    assert set(TESTED.values()) == (STEP_LEVEL | PER_FORWARD) - VARIANTS.keys()
    if Version(trl.__version__) >= Version("1.16"):  # the release these lists describe (older ones lack some)
        assert UNTESTED.keys() <= found, "UNTESTED names a trainer TRL no longer has"


@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_vllm_generation_of_a_gated_adapter_is_refused_before_vllm_starts(trainer, tmp_path):
    """TRL syncs the policy to vLLM by merging the adapter: a token-gated one is refused when the trainer is built,
    naming `use_vllm` and both ways out (before this check, TRL would start vLLM and fail at the first sync)."""
    config_cls, trainer_cls = (trl.GRPOConfig, trl.GRPOTrainer) if trainer == "grpo" else (trl.RLOOConfig,
                                                                                           trl.RLOOTrainer)

    def build(gate, use_vllm):
        args = config_cls(output_dir=str(tmp_path), use_vllm=use_vllm, num_generations=2, max_completion_length=4,
                          per_device_train_batch_size=2, use_cpu=True, report_to="none")
        return trainer_cls(model=tiny_llama(), reward_funcs=_length_reward, args=args, processing_class=_tokenizer(),
                           train_dataset=Dataset.from_dict({"prompt": PROMPTS}), peft_config=GateRAConfig(gate=gate))

    with pytest.raises(ValueError, match=r"`use_vllm=True`.*\{'default': 'sigmoid'\}.*`use_vllm=False`.*gate='none'"):
        build("sigmoid", use_vllm=True)
    mergeable = build("none", use_vllm=False)  # (this environment has no vLLM to start)
    mergeable.args.use_vllm = True
    check_generation_backend(mergeable)  # a mergeable adapter reaches vLLM merged, as LoRA does


def _continued(kind, tmp_path, model, **trainer_kwargs):
    """A `kind` trainer that continues a trained PEFT `model` (no `peft_config`), at learning rate 0."""
    common = dict(output_dir=str(tmp_path / kind), per_device_train_batch_size=2, max_steps=1, learning_rate=0.0,
                  logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    preference = Dataset.from_dict({"prompt": PROMPTS * 2, "chosen": CHOSEN * 2, "rejected": REJECTED * 2})
    shared = dict(model=model, processing_class=_tokenizer(), **trainer_kwargs)
    if kind == "dpo":
        return trl.DPOTrainer(args=trl.DPOConfig(**common), train_dataset=preference, **shared)
    if kind == "kto":
        data = Dataset.from_dict({"prompt": PROMPTS * 2, "completion": CHOSEN + REJECTED, "label": [True, False] * 4})
        return trl.KTOTrainer(args=trl.KTOConfig(**common), train_dataset=data, **shared)
    config_cls, trainer_cls = (trl.GRPOConfig, trl.GRPOTrainer) if kind == "grpo" else (trl.RLOOConfig,
                                                                                        trl.RLOOTrainer)
    args = config_cls(**common, num_generations=2, max_completion_length=4, beta=0.04)
    return trainer_cls(reward_funcs=_length_reward, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                       **shared)


def _trained_peft_model(branch="hira"):
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), GateRAConfig(branch=branch, init_weights=False, gate_bias_init=0.8))
    with torch.no_grad():  # a finished SFT run stand-in: every adapter tensor away from its initial value
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("kind", ["dpo", "kto", "grpo", "rloo"])
@pytest.mark.parametrize("branch", ["hira", "dora"])
def test_the_reference_of_a_continued_adapter_is_a_copy_of_it(kind, branch, tmp_path):
    """TRL's DPO, KTO, GRPO and RLOO given a trained PeftModel and no `ref_model` add a frozen "ref" adapter meant
    as a copy of "default"; TRL copies only parameters named `*.default.*`, which missed GateRA's A, B and
    magnitude (the reference was then a fresh adapter: DPO's step-0 margins 0.17 instead of 0)."""
    from gatera_plugin.model import adapter_tensors

    trainer = _continued(kind, tmp_path, _trained_peft_model(branch))
    default, ref = adapter_tensors(trainer.model, "default"), adapter_tensors(trainer.model, "ref")
    assert len(ref) == len(default) > 0
    assert all(torch.equal(a, b) for a, b in zip(default, ref))
    assert not any(t.requires_grad for t in ref)


@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_a_continued_adapter_starts_at_its_reference(kind, tmp_path):
    """At learning rate 0 the policy is the reference: DPO's loss is log 2 with zero margins, GRPO's KL is 0."""
    trainer = _continued(kind, tmp_path, _trained_peft_model())
    trainer.train()
    logs = next(entry for entry in trainer.state.log_history if "loss" in entry)
    if kind == "dpo":
        assert logs["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert logs["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    else:
        assert logs["kl"] == pytest.approx(0.0, abs=1e-6)


def test_a_reference_adapter_of_the_users_own_is_left_alone(tmp_path):
    """With a `ref_model` given, TRL adds no adapter: a "ref" adapter the user loaded is not overwritten."""
    from gatera_plugin.model import adapter_tensors

    model = _trained_peft_model()
    model.add_adapter("ref", GateRAConfig(init_weights=False))
    before = [t.clone() for t in adapter_tensors(model, "ref")]
    trainer = _continued("dpo", tmp_path, model, ref_model=tiny_llama())
    assert all(torch.equal(a, b) for a, b in zip(before, adapter_tensors(trainer.model, "ref")))
