"""`hira_scaling` "rms" / "lora" (HiRA steps as large as LoRA's at one learning rate) and `gate_lr_ratio` (the gates'
own rate)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from gatera_plugin import GateRAConfig, split_gate_groups
from gatera_plugin.layer import GateRALayer
from tests.helpers import gate_group_rates, one_step_output_change, tiny_llama, toy_texts, word_tokenizer

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GateRALayer)]


@pytest.mark.parametrize("scaling, alpha, numerator", [("rms", None, 1.0), ("lora", None, 1.0), ("lora", 8, 2.0)])
def test_scale_follows_its_formula_and_so_does_the_output(scaling, alpha, numerator):
    """rms: s = 1 / RMS(W0); lora: s = (lora_alpha / r) / (RMS(W0) · σ(b0)), σ(b0) = 0.5 by default."""
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, lora_alpha=alpha, target_modules=TARGETS,
                                                      hira_scaling=scaling, init_weights=False))
    level = 0.5 if scaling == "lora" else 1.0
    for _, layer in _layers(model):
        rms = layer.base_weight().float().square().mean().sqrt().item()
        assert layer.scaling["default"] == pytest.approx(numerator / (rms * level), rel=1e-6)
    layer = _layers(model)[0][1]
    x = torch.randn(3, 5, layer.in_features)
    A, B, W0 = layer.gatera_A["default"], layer.gatera_B["default"], layer.base_weight()
    gate = torch.sigmoid(x @ layer.gatera_gate["default"].weight.t() + layer.gatera_gate["default"].bias)
    s = numerator / (W0.square().mean().sqrt() * level)
    expected = x @ W0.t() + gate * (x @ (s * W0 * (B @ A)).t())
    layer.eval()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate_kwargs, level", [
    ({"gate_bias_init": 2.0}, 1 / (1 + math.exp(-2.0))),
    ({"gate": "none"}, 1.0),
    ({"gate": "threshold"}, 1.0),  # a selection: kept tokens get the whole update
    ({"structure_gate": True, "structure_init": 1.0}, 0.5 / (1 + math.exp(-1.0))),
])
def test_lora_scale_divides_by_every_gate_kinds_initial_level_and_reads_alpha_pattern(gate_kwargs, level):
    config = GateRAConfig(r=4, lora_alpha=8, alpha_pattern={"v_proj": 2}, target_modules=TARGETS,
                          hira_scaling="lora", **gate_kwargs)
    for name, layer in _layers(get_peft_model(tiny_llama(), config)):
        alpha = 2 if name.endswith("v_proj") else 8
        rms = layer.base_weight().float().square().mean().sqrt().item()
        assert layer.scaling["default"] == pytest.approx(alpha / 4 / (rms * level), rel=1e-6), name


def test_lora_scale_is_computed_at_first_use_when_base_weights_load_after_wrapping():
    """Meta-device construction (FSDP's cpu_ram_efficient_loading, `init_empty_weights`): W0 is not there when the
    adapter is created, so the scale waits for the first use, and then equals the eagerly built model's."""
    config = GateRAConfig(r=4, target_modules=TARGETS, hira_scaling="lora", init_weights=False)
    eager = get_peft_model(tiny_llama(), config).eval()
    with torch.device("meta"):
        lazy = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, hira_scaling="lora",
                                                         init_weights=False))
    layer = _layers(lazy)[0][1]
    assert layer.scaling["default"] is None
    with pytest.raises(ValueError, match=r"hira_scaling='lora' reads the base weights.*meta device.*before the first"):
        layer.branch_scale("default")
    lazy = lazy.to_empty(device="cpu").eval()
    lazy.load_state_dict(eager.state_dict())
    for name, buffer in eager.named_buffers():  # non-persistent ones (rotary inv_freq) are not in the state dict
        lazy.get_buffer(name).copy_(buffer)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(lazy(input_ids=ids).logits, eager(input_ids=ids).logits)
    for (_, got), (_, want) in zip(_layers(lazy), _layers(eager)):
        assert got.scaling["default"] == pytest.approx(want.scaling["default"], rel=1e-6)


def test_rms_scaling_makes_a_hira_step_as_large_as_a_lora_step():
    """With the weights' scale of a pretrained model (std 0.02), one step of PEFT's HiRA moves the output far less
    than a LoRA step at the same learning rate; hira_scaling='rms' brings it to LoRA's order of magnitude."""
    lora = one_step_output_change(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    hira = one_step_output_change(GateRAConfig(r=4, target_modules=TARGETS, gate="none", hira_scaling="none"))
    hira_rms = one_step_output_change(GateRAConfig(r=4, target_modules=TARGETS, gate="none",
                                                          hira_scaling="rms"))
    assert hira < 0.1 * lora, (hira, lora)
    assert 0.2 * lora < hira_rms < 5 * lora, (hira_rms, lora)


def test_lora_scaling_makes_a_gated_step_as_large_as_a_step_of_the_same_lora():
    """hira_scaling='lora' reads LoRA's r and lora_alpha and makes up for the gate's 0.5 at step 0: one step of
    gated GateRA moves the output as far as one step of that LoRA (within 1.5x), where 'rms' moves it less."""
    lora = one_step_output_change(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    gated = one_step_output_change(GateRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, hira_scaling="lora"))
    gated_rms = one_step_output_change(GateRAConfig(r=4, target_modules=TARGETS, hira_scaling="rms"))
    assert lora / 1.5 < gated < 1.5 * lora, (gated, lora)
    assert gated_rms < gated / 2.5, (gated_rms, gated)


@pytest.mark.parametrize("scaling", ["rms", "lora"])
def test_scaled_adapter_reloads_merges_and_its_stamp_covers_the_setting(tmp_path, scaling):
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate="none", hira_scaling=scaling,
                                                      init_weights=False)).eval()
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["hira_scaling"] = "none"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hira_scaling"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    ({"hira_scaling": "std"}, "`hira_scaling` must be one of"),
    ({"hira_scaling": "rms", "branch": "lora"}, "`hira_scaling`='rms' scales the HiRA branch"),
    ({"gate_lr_ratio": 0}, "`gate_lr_ratio` must be > 0"),
    ({"gate_lr_ratio": float("nan")}, "`gate_lr_ratio` must be finite"),
])
def test_bad_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GateRAConfig(**kwargs)


def test_split_gate_groups_gives_gates_their_rate_and_keeps_other_hyperparameters():
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=10.0,
                                                      structure_gate=True))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params[::2], "weight_decay": 0.1},
                                   {"params": params[1::2], "weight_decay": 0.0}], lr=1e-4)
    split_gate_groups(optimizer, model)
    assert len(optimizer.param_groups) == 4
    assert gate_group_rates(optimizer, model) == {True: {1e-3}, False: {1e-4}}
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.0, 0.1, 0.1]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)


def test_split_gate_groups_splits_the_names_of_an_optimizer_built_from_named_parameters():
    """torch ≥ 2.6 optimizers take `named_parameters()` and keep `param_names` per group (in their state_dict); each
    split group had the whole group's names, naming A where the gate's weight stood."""
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=3.0))
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(named, lr=1e-4)
    if "param_names" not in optimizer.param_groups[0]:
        pytest.skip("this torch keeps no param_names")
    split_gate_groups(optimizer, model)
    name_of = {id(p): name for name, p in named}
    assert len(optimizer.param_groups) == 2
    for group in optimizer.param_groups:
        assert group["param_names"] == [name_of[id(p)] for p in group["params"]]
    assert sorted(optimizer.state_dict()["param_groups"][1]["param_names"]) == sorted(
        name for name, _ in named if "gatera_gate" in name)


def test_ratio_one_leaves_the_optimizer_alone():
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    split_gate_groups(optimizer, model)
    assert len(optimizer.param_groups) == 1


def test_split_after_a_step_is_refused_naming_the_fix():
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=10.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(input_ids=torch.randint(3, 128, (1, 5)), labels=torch.randint(3, 128, (1, 5))).loss.backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match=r"before its first step.*split_gate_groups\(optimizer, model\)"):
        split_gate_groups(optimizer, model)
    assert len(optimizer.param_groups) == 1


def test_a_tensor_learning_rate_is_scaled_too():
    """torch's optimizers take `lr` as a tensor (for capturable / compiled steps): the gates get ratio × it, as a
    tensor (it was refused as "Adafactor's own schedule")."""
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=10.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=torch.tensor(1e-4))
    split_gate_groups(optimizer, model)
    rates = {float(group["lr"]) for group in optimizer.param_groups}
    assert len(optimizer.param_groups) == 2 and all(isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups)
    assert sorted(rates) == pytest.approx([1e-4, 1e-3])
    model(input_ids=torch.randint(3, 128, (1, 5)), labels=torch.randint(3, 128, (1, 5))).loss.backward()
    optimizer.step()


def test_split_after_the_scheduler_is_built_is_refused_naming_the_fix():
    """A scheduler holds one rate per param group: split after it, its next step failed deep in torch (zip() argument
    2 is shorter), and `initial_lr` became the warmup's current rate (0), so a scheduler built again kept every group
    at rate 0 for the whole run."""
    from transformers import get_linear_schedule_with_warmup

    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=10.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    get_linear_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=100)
    with pytest.raises(RuntimeError, match=r"before the learning-rate scheduler is built.*has a scheduler already.*"
                                           r"split_gate_groups\(optimizer, model\)` right after building the optimizer"):
        split_gate_groups(optimizer, model)
    assert len(optimizer.param_groups) == 1


@pytest.mark.slow
def test_sft_trainer_trains_gates_at_their_ratio(tmp_path):
    """Through TRL with nothing but the config: the scheduler keeps the gates' rate at ratio × the rest's."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = toy_texts(16)
    tokenizer = word_tokenizer(texts)
    rows = [{"text": text} for text in texts]
    trainer = SFTTrainer(
        model=tiny_llama(vocab=len(tokenizer)), processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
        peft_config=GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=5.0, hira_scaling="rms"),
        args=SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=2e-4,
                       lr_scheduler_type="constant_with_warmup", warmup_steps=2, report_to="none", use_cpu=True, bf16=False,
                       logging_steps=1, save_strategy="no", disable_tqdm=True),
    )
    trainer.train()
    rates = gate_group_rates(trainer.optimizer, trainer.model)
    (gate_rate,), (rate,) = rates[True], rates[False]
    assert gate_rate == pytest.approx(5.0 * rate) and rate > 0
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)


def _sft_trainer(tmp_path, ratio, max_steps):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = toy_texts(16)
    tokenizer = word_tokenizer(texts)
    torch.manual_seed(0)
    return SFTTrainer(
        model=tiny_llama(vocab=len(tokenizer)), processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"text": text} for text in texts]),
        peft_config=GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=ratio),
        args=SFTConfig(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                       learning_rate=1e-3, lr_scheduler_type="constant", report_to="none", use_cpu=True, bf16=False,
                       save_strategy="steps", save_steps=2, disable_tqdm=True),
    )


@pytest.mark.parametrize("saved,now", [(1.0, 3.0), (3.0, 1.0)])
def test_resuming_with_a_ratio_that_changes_the_param_groups_is_refused_naming_the_setting(tmp_path, saved, now):
    """Between 1 and another ratio the optimizer's groups differ in number; before, torch refused the checkpoint's
    optimizer state with its own message ("a different number of parameter groups")."""
    _sft_trainer(tmp_path, saved, max_steps=2).train()
    with pytest.raises(ValueError, match=rf"trained with gate_lr_ratio={saved:g} and this run sets {now:g}.*Resume "
                                         rf"with gate_lr_ratio={saved:g}, or start a new run from the checkpoint's"):
        _sft_trainer(tmp_path, now, max_steps=3).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_resuming_from_a_checkpoint_without_optimizer_state_takes_the_new_ratio_without_a_word(tmp_path):
    """`save_only_model=True` saves no optimizer state: the resumed run builds a fresh optimizer at the new ratio."""
    first = _sft_trainer(tmp_path, 1.0, max_steps=2)
    first.args.save_only_model = True
    first.train()
    assert not list((tmp_path / "checkpoint-2").glob("optimizer*"))
    resumed = _sft_trainer(tmp_path, 3.0, max_steps=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gate_lr_ratio.*")
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert {round(group["lr"], 12) for group in resumed.optimizer.param_groups} == {1e-3, 3e-3}


def test_resuming_with_another_ratio_warns_that_the_checkpoint_keeps_its_rates(tmp_path):
    _sft_trainer(tmp_path, 2.0, max_steps=2).train()
    resumed = _sft_trainer(tmp_path, 3.0, max_steps=3)
    with pytest.warns(UserWarning, match=r"gate_lr_ratio=2 and this run sets 3, but the checkpoint's optimizer and "
                                         r"scheduler restore its learning rates, so the gates go on at 2x"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    rates = {round(group["lr"], 12) for group in resumed.optimizer.param_groups}
    assert rates == {1e-3, 2e-3}  # as the warning says


class _OwnOptimizer:
    """A Trainer subclass that builds its optimizer itself, without `Trainer.create_optimizer` (as Axolotl's trainers
    do for `optimizer: adopt_adamw`, `muon`, ...)."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=0.1)
        return self.optimizer


class _SuperOptimizer:
    """A Trainer subclass whose `create_optimizer` calls the base one (as TRL's and Axolotl's default paths do)."""

    def create_optimizer(self, *args, **kwargs):  # (transformers 5.0's takes no `model`)
        return super().create_optimizer(*args, **kwargs)


class _SplitsItself:
    """A Trainer subclass that follows `split_gate_groups`'s advice for a hand-built optimizer and splits it itself."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=0.1)
            self.optimizer = split_gate_groups(optimizer, self.model)
        return self.optimizer


@pytest.mark.parametrize("mixin", [_OwnOptimizer, _SuperOptimizer, _SplitsItself], ids=["own", "super", "splits-itself"])
def test_a_trainer_subclass_that_builds_its_own_optimizer_gets_the_gate_groups_once(mixin, tmp_path):
    """Gates at ratio × the rate whichever class builds the optimizer, and regrouped once (3×, not 9×, also when the
    subclass splits the groups itself). Before, a subclass that did not call `Trainer.create_optimizer` trained the
    gates at the base rate without a word."""
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=3.0))
    trainer_cls = type("Subclassed", (mixin, Trainer), {})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", learning_rate=0.1)
    trainer = trainer_cls(model=model, args=args)
    optimizer = trainer.create_optimizer()
    assert trainer.create_optimizer() is optimizer  # (called again, as transformers does: checked, not regrouped)
    assert gate_group_rates(optimizer, model) == {True: {0.3}, False: {0.1}}


def test_split_gate_groups_twice_applies_the_ratio_once():
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=3.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    split_gate_groups(split_gate_groups(optimizer, model), model)
    assert sorted(round(g["lr"], 12) for g in optimizer.param_groups) == [1e-3, 3e-3]


def test_a_trainer_is_freed_when_dropped_and_copies_build_their_own_optimizer(tmp_path):
    """The regrouping lives on the trainer classes, not in a closure on each trainer: `del trainer` frees it (and its
    model) at once, without waiting for the garbage collector, and a deep copy builds the optimizer of its own model."""
    import copy
    import gc
    import weakref

    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=3.0))
    trainer = Trainer(model=model, args=args)
    copied = copy.deepcopy(trainer)
    optimizer = copied.create_optimizer()
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} <= {id(p) for p in copied.model.parameters()}
    assert len(optimizer.param_groups) > 1 and trainer.optimizer is None
    gc.disable()
    try:
        alive = weakref.ref(trainer)
        del trainer
        assert alive() is None
    finally:
        gc.enable()


def test_an_optimizer_without_param_groups_to_split_is_refused(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Unsplittable(Trainer):
        def create_optimizer(self, model=None):
            self.optimizer = object()
            return self.optimizer

    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=3.0))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=r"`gate_lr_ratio`=\[3\.0\] cannot be applied to object: it is not a `torch\.optim\.Optimizer`"):
        Unsplittable(model=model, args=args).create_optimizer()
    plain = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS))
    Unsplittable(model=plain, args=args).create_optimizer()  # ratio 1: nothing to apply


def test_adagrads_state_from_its_constructor_is_no_step():
    """torch's Adagrad fills its state (step 0) when it is built: `optim="adagrad"` with a ratio was refused as an
    optimizer that had stepped, with advice that could not work."""
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=3.0))
    optimizer = torch.optim.Adagrad([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert optimizer.state
    split_gate_groups(optimizer, model)
    assert gate_group_rates(optimizer, model) == {True: {3e-2}, False: {1e-2}}
    model(input_ids=torch.randint(3, 128, (1, 5)), labels=torch.randint(3, 128, (1, 5))).loss.backward()
    optimizer.step()  # (the state keyed by parameter still fits)


@pytest.mark.parametrize("case", ["relative-step", "no-lr", "one-rate", "position-dependent", "layer-wise"])
def test_an_optimizer_that_cannot_give_the_gates_their_rate_is_refused_by_name(case):
    """Adafactor's own schedule (`lr=None, relative_step=True`: the usual T5 recipe) has no rate to scale (it
    crashed with a TypeError); LOMO applies one rate to every parameter and GrokAdamW's update depends on a
    parameter's position in its group (both trained the gates at the base rate, silently); transformers' layer-wise
    optimizers (GaLore / APOLLO `*_layerwise`) hold one dummy tensor in their groups (the gates trained at the base
    rate, silently). Each is refused with the setting and the way out."""
    from transformers.optimization import Adafactor
    from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=3.0))
    params = [p for p in model.parameters() if p.requires_grad]
    if case == "relative-step":
        optimizer, match = Adafactor(params, lr=None, relative_step=True, warmup_init=True), "relative_step=True"
    elif case == "no-lr":
        optimizer, match = torch.optim.SGD(params, lr=1e-2), "lr=None"
        optimizer.param_groups[0]["lr"] = None
    elif case == "layer-wise":
        optimizer = LayerWiseDummyOptimizer(optimizer_dict={p: torch.optim.AdamW([p], lr=1e-3) for p in params})
        match = "do not hold the gate parameters"
    else:
        name = "Lomo" if case == "one-rate" else "GrokAdamW"
        optimizer = type(name, (torch.optim.SGD,), {})(params, lr=1e-2)  # (the packages' classes, by their names)
        match = "one learning rate to every parameter" if case == "one-rate" else "position in its param group"
    with pytest.raises(ValueError, match=rf"gate_lr_ratio.*{match}.*gate_lr_ratio=1"):
        split_gate_groups(optimizer, model)


def test_a_passed_optimizer_whose_gate_groups_miss_the_ratio_is_warned_of():
    """`Trainer(optimizers=(AdamW([{"params": [p]} for p in ...]), None))` with a ratio: the gates sit in groups of
    their own at the base rate, so the ratio silently did not apply; now a warning says so. Groups at the ratio
    (split_gate_groups's) pass without a word."""
    import warnings

    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=3.0))
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    per_parameter = torch.optim.AdamW([{"params": [p]} for p in model.parameters() if p.requires_grad], lr=1e-4)
    with pytest.warns(UserWarning, match=r"`gate_lr_ratio`=\[3\.0\] does not show"):
        Trainer(model=model, args=args, optimizers=(per_parameter, None)).create_optimizer()
    by_hand = torch.optim.AdamW([{"params": [p], "lr": 3e-4 if "gatera_gate" in n else 1e-4}
                                 for n, p in model.named_parameters() if p.requires_grad], lr=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(model=model, args=args, optimizers=(by_hand, None)).create_optimizer()


def test_an_optimizer_built_elsewhere_with_gates_mixed_in_is_refused():
    """Trainer(optimizers=(optimizer, scheduler)): the scheduler already knows the groups, so GateRA does not regroup;
    gates mixed with the rest are refused (the ratio would silently not apply), split ones are accepted."""
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=3.0))
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    mixed = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    trainer = Trainer(model=model, args=args, optimizers=(mixed, None))
    with pytest.raises(ValueError, match="split_gate_groups"):
        trainer.create_optimizer()
    split = split_gate_groups(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), model)
    trainer = Trainer(model=model, args=args, optimizers=(split, None))
    assert trainer.create_optimizer() is split and len(split.param_groups) == 2


def test_a_deepspeed_optimizer_block_with_a_gate_ratio_is_refused():
    from types import SimpleNamespace

    from gatera_plugin.optim import check_deepspeed_optimizer

    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate_lr_ratio=3.0))
    trainer = SimpleNamespace(model=model, is_deepspeed_enabled=True, args=SimpleNamespace(
        hf_deepspeed_config=SimpleNamespace(config={"optimizer": {"type": "AdamW"}})))
    with pytest.raises(ValueError, match="`optimizer` block"):
        check_deepspeed_optimizer(trainer)
    trainer.args.hf_deepspeed_config.config = {"zero_optimization": {"stage": 2}}
    check_deepspeed_optimizer(trainer)  # the Trainer builds the optimizer: nothing to refuse


def test_an_adapter_saved_before_hira_scaling_existed_loads_unscaled(tmp_path):
    """Its adapter_config.json and structure stamp have no `hira_scaling` key; it meant s = 1 then, whatever today's
    default, and the stamp is not taken for an edit."""
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, hira_scaling="none",
                                                      init_weights=False)).eval()
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["hira_scaling"], config["structure_stamp"]["hira_scaling"]
    config_path.write_text(json.dumps(config))
    assert GateRAConfig.from_pretrained(tmp_path).hira_scaling == "none"
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert reloaded.peft_config["default"].hira_scaling == "none"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits)
    # the same through the routes that read the config with PeftConfig (they built it with today's default, "lora")
    from peft import AutoPeftModelForCausalLM, PeftConfig

    assert PeftConfig.from_pretrained(tmp_path).hira_scaling == "none"
    tiny_llama().save_pretrained(tmp_path / "base")  # (AutoPeftModel loads the base the adapter config names)
    config["base_model_name_or_path"] = str(tmp_path / "base")
    config_path.write_text(json.dumps(config))
    transformers_loaded, auto_loaded = tiny_llama(), AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    transformers_loaded.load_adapter(str(tmp_path))
    for other in (transformers_loaded.eval(), auto_loaded.eval()):
        with torch.no_grad():
            torch.testing.assert_close(other(input_ids=ids).logits, logits)
    config["hira_scaling"] = "rms"  # but a value that the save did not stamp is an edit
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="`hira_scaling` differ"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("gate", ["sigmoid", "threshold"])
def test_weight_decay_reaches_the_gates_as_readme_says(tmp_path, gate):
    """README ("Weight decay"): the Trainer's own rule (no decay for names with "bias" and for norms) decays a sigmoid
    gate's w, a threshold gate's τ and a structure gate's α, and not a sigmoid gate's b; GateRA's groups keep it."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = toy_texts(8)
    tokenizer = word_tokenizer(texts)
    extra = {"keep_ratio": 0.5, "keep_ratio_weight": 0.1} if gate == "threshold" else {}
    trainer = SFTTrainer(
        model=tiny_llama(vocab=len(tokenizer)), processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"text": text} for text in texts]),
        peft_config=GateRAConfig(r=4, target_modules=TARGETS, gate=gate, structure_gate=True, gate_lr_ratio=3.0,
                                 **extra),
        args=SFTConfig(output_dir=str(tmp_path), max_steps=1, weight_decay=0.1, report_to="none", use_cpu=True,
                       bf16=False, save_strategy="no", disable_tqdm=True),
    )
    optimizer = trainer.create_optimizer()
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    by_kind = {}
    for name, param in trainer.model.named_parameters():
        if "gatera_gate" in name or "gatera_structure" in name:
            by_kind.setdefault(name.rsplit(".", 1)[-1], set()).add(decay[id(param)])
    expected = {"alpha": {0.1}, **({"weight": {0.1}, "bias": {0.0}} if gate == "sigmoid" else {"threshold": {0.1}})}
    assert by_kind == expected
