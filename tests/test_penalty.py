"""The entropy penalty injected in backward equals the gradient of the explicit penalty; statistics are exact."""

import re

import pytest
import torch
from peft import get_peft_model

from gatera_plugin import GateRAConfig
from gatera_plugin.penalty import GateStats, GateValues, binary_entropy, binary_entropy_grad
from tests.helpers import collect_gates, naive_entropy, offloading_checkpoint, randomize_adapters, tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
LAMBDA = 0.7


def _model(entropy_weight, seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_llama(seed=seed), GateRAConfig(r=4, target_modules=TARGETS, init_weights=False, entropy_weight=entropy_weight)
    )
    model.train()
    return model


def _batch():
    input_ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(input_ids)
    mask[0, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    labels = input_ids.masked_fill(mask == 0, -100)
    return input_ids, mask, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _explicit_penalty(gates, mask):
    """λ · mean over real tokens and gated layers of H(g)/log 2, with autograd (the naive reference)."""
    m = mask.reshape(-1).float()
    per_layer = torch.stack([(naive_entropy(g.reshape(-1)) * m).sum() / m.sum() for g in gates])
    return LAMBDA * per_layer.mean()


def test_injected_gradient_equals_explicit_penalty_gradient():
    input_ids, mask, labels = _batch()
    injected = _model(LAMBDA)
    injected(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()

    explicit = _model(0.0)
    gates, handles = collect_gates(explicit)
    out = explicit(input_ids=input_ids, attention_mask=mask, labels=labels)
    assert len(gates) == 2 * len(TARGETS)
    (out.loss + _explicit_penalty(gates, mask)).backward()
    for h in handles:
        h.remove()

    a, b = _grads(injected), _grads(explicit)
    differs = 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)
    # and the penalty really moved the gradients (the test would pass vacuously with λ ignored)
    no_penalty = _model(0.0)
    no_penalty(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    for name, grad in _grads(no_penalty).items():
        differs += not torch.allclose(grad, a[name], atol=1e-6)
    assert differs > 0


@pytest.mark.parametrize("call", ["by-name", "by-position"])
def test_padding_tokens_carry_no_penalty_and_no_statistics(call):
    """Changing what sits under padding changes neither the penalty gradient of the gates nor the statistics; also
    for a mask given by position, `model(input_ids, attention_mask)` (a PeftModel without a task type passes it on so)."""
    input_ids, mask, _ = _batch()
    results = []
    for pad_token in (0, 77):
        model = _model(LAMBDA)
        ids = input_ids.masked_fill(mask == 0, pad_token)
        # no task loss: only the penalty drives gradients, so any dependence on padded positions would show
        gates, handles = collect_gates(model)
        out = model(input_ids=ids, attention_mask=mask) if call == "by-name" else model(ids, mask)
        (out.logits.sum() * 0).backward()
        for h in handles:
            h.remove()
        gate_grads = {n: g for n, g in _grads(model).items() if "gatera_gate" in n}
        results.append((gate_grads, model.base_model.pop_gate_stats()))
    (g0, s0), (g1, s1) = results
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-5, atol=1e-8)
    assert s0 == pytest.approx(s1, rel=1e-6)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_inputs_embeds_without_a_mask_carry_the_penalty(task_type):
    """`model(inputs_embeds=...)`: PEFT's task models pass `input_ids=None` by name beside it; the penalty then read no
    positions and was 0. Same penalty gradient as from input_ids."""
    input_ids, _, _ = _batch()
    grads = []
    for by_embeds in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, init_weights=False,
                                                          entropy_weight=LAMBDA, task_type=task_type)).train()
        inputs = {"inputs_embeds": model.get_input_embeddings()(input_ids).detach()} if by_embeds else {
            "input_ids": input_ids}
        (model(**inputs).logits.sum() * 0).backward()  # only the penalty drives the gates
        grads.append({n: g for n, g in _grads(model).items() if "gatera_gate" in n})
    assert grads[0] and all(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


def test_a_forward_that_takes_only_positional_inputs_still_carries_the_penalty():
    """A wrapper `forward(self, *args)` names no input: its first positional input counts its positions, as before the
    inputs were read by name (binding them gave no `input_ids`, and the penalty was 0)."""

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = tiny_llama()

        def forward(self, *args):
            return self.lm(input_ids=args[0], attention_mask=args[1]).logits

    input_ids, _, _ = _batch()
    torch.manual_seed(0)
    model = get_peft_model(Wrapper(), GateRAConfig(r=4, target_modules=TARGETS, init_weights=False,
                                                   entropy_weight=LAMBDA)).train()
    (model(input_ids, torch.ones_like(input_ids)).sum() * 0).backward()  # only the penalty drives the gates
    grads = {n: g for n, g in _grads(model).items() if "gatera_gate" in n}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())


def test_a_frozen_adapter_active_beside_the_trained_one_is_neither_penalised_nor_logged():
    """Its gates' values require grad through x (downstream of the trained adapter): penalising them would push the
    trained adapter's parameters upstream, by the frozen adapter's weight."""
    input_ids, mask, labels = _batch()
    results = []
    for frozen_weight in (0.0, 5.0):
        model = _model(LAMBDA)
        model.add_adapter("frozen", GateRAConfig(r=4, target_modules=TARGETS, init_weights=False,
                                                 entropy_weight=frozen_weight, structure_gate=True,
                                                 structure_weight=frozen_weight))
        torch.manual_seed(1)
        randomize_adapters(model, adapter_name="frozen")
        model.base_model.set_adapter(["default", "frozen"])
        for name, param in model.named_parameters():
            param.requires_grad_(".default" in name)
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        results.append((_grads(model), model.base_model.pop_gate_stats()))
    (g0, s0), (g1, s1) = results
    assert g0.keys() == g1.keys() and g0 and all(".default" in name for name in g0)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=0, atol=0)
    assert s0 == s1 and not [key for key in s1 if key.endswith("/frozen")]


def test_a_layer_whose_tokens_all_skip_under_sparse_training_keeps_its_penalty():
    """`sparse_training`: tokens below `sparse_threshold` skip the branch but keep the entropy penalty's gradient,
    also where every token of the batch skips (a whole layer gated shut), and its statistics."""
    input_ids, mask, _ = _batch()
    results = []
    for threshold in (0.0, 0.1):
        torch.manual_seed(0)
        options = dict(sparse_threshold=threshold, sparse_training=True) if threshold else {}
        model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, init_weights=False,
                                                          entropy_weight=LAMBDA, **options)).train()
        gate = model.base_model.model.model.layers[0].self_attn.q_proj.gatera_gate["default"]  # the first gated layer
        with torch.no_grad():  # shut for every token (σ(-2.9) = 0.052)
            gate.weight.zero_()
            gate.bias.fill_(-2.9)
        out = model(input_ids=input_ids, attention_mask=mask)
        (out.logits.sum() * 0).backward()  # only the penalty drives the gates
        stats = model.base_model.pop_gate_stats(per_layer=True)
        results.append((gate.bias.grad, stats["gatera/gate_mean/layers.0.self_attn.q_proj"]))
    (dense_grad, dense_mean), (sparse_grad, sparse_mean) = results
    assert sparse_grad is not None and dense_grad.abs().item() > 0
    torch.testing.assert_close(sparse_grad, dense_grad)  # its input is the same: nothing upstream is adapted
    assert sparse_mean == pytest.approx(dense_mean)


def test_a_structure_gate_below_sparse_threshold_skips_a_threshold_gated_module():
    """gate='threshold' with structure_gate and sparse_threshold: the setting was accepted and then ignored (the
    threshold gate's path returned before the sparse check), so a module whose σ(α) was below ε still ran in eval. It
    is skipped now, in eval and under sparse_training, with the structure penalty's gradient kept."""
    input_ids, mask, _ = _batch()
    outputs, grads = {}, {}
    for sparse in (False, True):
        options = dict(sparse_threshold=0.5, sparse_training=True) if sparse else {}
        model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, gate="threshold", init_weights=False,
                                                          threshold_init=0.0, structure_gate=True, structure_weight=LAMBDA,
                                                          **options))
        randomize_adapters(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("alpha"):
                    param.fill_(-2.0)  # σ(α) = 0.12 < ε = 0.5: every module closed
        for training in (False, True):
            model.train(training)
            out = model(input_ids=input_ids, attention_mask=mask).logits
            outputs[sparse, training] = out.detach()
        (out.sum() * 0).backward()  # only the penalty drives the structure gates
        grads[sparse] = {n: p.grad for n, p in model.named_parameters() if n.endswith("alpha")}
    with torch.no_grad():
        base = tiny_llama()(input_ids=input_ids, attention_mask=mask).logits
    assert not torch.allclose(outputs[False, False], base, atol=1e-3)
    torch.testing.assert_close(outputs[True, False], base, rtol=0, atol=0)  # eval: skipped
    torch.testing.assert_close(outputs[True, True], base, rtol=0, atol=0)  # sparse_training: skipped
    assert grads[True] and all(g is not None and g.abs().item() > 0 for g in grads[True].values())
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad)


def test_statistics_equal_the_explicit_means():
    input_ids, mask, labels = _batch()
    model = _model(LAMBDA)
    gates, handles = collect_gates(model)
    model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    for h in handles:
        h.remove()
    stats = model.base_model.pop_gate_stats()
    m = mask.reshape(-1).bool()
    flat = [g.detach().reshape(-1)[m] for g in gates]
    assert stats["gatera/gate_mean"] == pytest.approx(torch.stack([g.mean() for g in flat]).mean().item(), rel=1e-6)
    assert stats["gatera/entropy"] == pytest.approx(
        torch.stack([naive_entropy(g).mean() for g in flat]).mean().item(), rel=1e-5
    )
    assert stats["gatera/gate_open_frac"] == pytest.approx(
        torch.stack([(g > 0.5).float().mean() for g in flat]).mean().item(), rel=1e-6
    )
    assert stats["gatera/penalty"] == pytest.approx(LAMBDA * stats["gatera/entropy"], rel=1e-9)
    assert model.base_model.pop_gate_stats() == {}  # popped


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant", "offloading"])
@pytest.mark.parametrize("between", ["other-shape", "same-shape-other-mask", "with-gradient"])
def test_another_forward_of_the_model_before_backward_changes_nothing(checkpointing, between):
    """A trainer may run the same model again between a forward and its backward: without gradient (TRL's
    self-distillation teachers, a reference forward with the adapter disabled) or with it (two forwards, one
    backward). Each backward, and gradient checkpointing's recomputation inside it, still uses its own forward's
    tokens: the same gradients and statistics as separate forwards and backwards without checkpointing.
    (Recomputing with the latest forward's mask raised CheckpointError, or silently used the wrong mask.)
    "offloading": a checkpoint function that reads the layer from what it is given, as Axolotl's
    `activation_offloading: legacy` does (it raised AttributeError at the first forward)."""
    input_ids, mask, labels = _batch()
    if between == "other-shape":
        other_ids, other_mask = input_ids[:2, :7], torch.ones(2, 7, dtype=torch.long)
    else:
        other_ids, other_mask = input_ids.flip(0), mask.flip(1)
    other_labels = other_ids.masked_fill(other_mask == 0, -100)
    reference = _model(LAMBDA)
    reference(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    if between == "with-gradient":
        reference(input_ids=other_ids, attention_mask=other_mask, labels=other_labels).loss.backward()
    expected, expected_stats = _grads(reference), reference.base_model.pop_gate_stats()

    model = _model(LAMBDA)
    if checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        if checkpointing == "offloading":
            for module in model.modules():
                if "_gradient_checkpointing_func" in module.__dict__:
                    module._gradient_checkpointing_func = offloading_checkpoint
        model.train()
    loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    if between == "with-gradient":
        loss = loss + model(input_ids=other_ids, attention_mask=other_mask, labels=other_labels).loss
    else:
        with torch.no_grad():
            model(input_ids=other_ids, attention_mask=other_mask)
    loss.backward()

    got = _grads(model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    stats = model.base_model.pop_gate_stats()
    assert stats.keys() == expected_stats.keys()
    for key in stats:
        assert stats[key] == pytest.approx(expected_stats[key], rel=1e-6), key


def test_step_normaliser_world_size_and_loss_scale():
    """Inside a Trainer step the normaliser is the step's tokens; world size and fp16 loss scale multiply the
    injected gradient exactly as they multiply the task gradient."""
    input_ids, mask, _ = _batch()

    def penalty_grads(**step):
        model = _model(LAMBDA)
        if step:
            model.base_model.penalty_run.begin_step(**step)
        out = model(input_ids=input_ids, attention_mask=mask)
        (out.logits.sum() * 0).backward()
        return {n: g for n, g in _grads(model).items() if "gatera_gate" in n}

    real_tokens = int(mask.sum())
    plain = penalty_grads()
    same = penalty_grads(step_tokens=real_tokens)
    double_tokens = penalty_grads(step_tokens=2 * real_tokens)
    scaled = penalty_grads(step_tokens=real_tokens, world_size=2, loss_scale=1024.0)
    for name in plain:
        assert plain[name].abs().sum() > 0
        torch.testing.assert_close(same[name], plain[name], rtol=1e-6, atol=0)
        torch.testing.assert_close(double_tokens[name], plain[name] / 2, rtol=1e-6, atol=0)
        torch.testing.assert_close(scaled[name], plain[name] * 2048, rtol=1e-6, atol=0)


def test_eval_mode_applies_nothing_and_records_nothing():
    input_ids, mask, labels = _batch()
    model = _model(LAMBDA)
    model.eval()
    model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    assert model.base_model.pop_gate_stats() == {}


def test_entropy_and_its_gradient():
    g = torch.tensor([0.0, 1e-9, 1e-3, 0.25, 0.5, 0.9, 1.0 - 1e-9, 1.0], dtype=torch.float64, requires_grad=True)
    h = binary_entropy(g)
    assert h[4].item() == pytest.approx(1.0)
    assert h.min() >= 0 and h.max() <= 1 + 1e-12
    (auto,) = torch.autograd.grad(h.sum(), g)
    torch.testing.assert_close(binary_entropy_grad(g.detach()).double(), auto, rtol=1e-5, atol=1e-9)
    assert torch.isfinite(binary_entropy_grad(g.detach())).all()


def test_float32_entropy_and_gradient_are_within_their_stated_error_of_float64():
    """`GateValues` in float32 (as the taps run it) against float64 on the same clamped values, over [0, 1] and
    log-spaced towards both ends: H within 1e-6 nats (its docstring), the gradient within 2.5e-6 per unit of g."""
    ends = torch.logspace(-8, -1, 2000, dtype=torch.float64)
    g = torch.cat([torch.linspace(0, 1, 100001, dtype=torch.float64), ends, 1 - ends]).float()
    values = GateValues(g)
    c = values.clamped.double()
    entropy = -(c * c.log() + (1 - c) * torch.log1p(-c))
    gradient = torch.where(values.clamped == values.g, torch.log((1 - c) / c) / torch.log(torch.tensor(2.0)), 0.0)
    assert (values.entropy_nats().double() - entropy).abs().max().item() <= 1e-6
    assert (values.entropy_grad().double() - gradient).abs().max().item() <= 2.5e-6


def test_entropy_gradient_is_zero_where_the_clamp_is_active_and_for_nan():
    g = torch.tensor([0.0, 1e-7, 1.0 - 1e-7, 1.0, float("nan"), 0.3], dtype=torch.float32)
    grad = binary_entropy_grad(g)
    assert grad[:5].eq(0).all()
    assert grad[5].item() == pytest.approx(float(torch.log(torch.tensor(0.7 / 0.3)) / torch.log(torch.tensor(2.0))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_stats_sums_over_real_tokens_and_pop_clears(dtype):
    """`GateStats` sums (tokens, Σg, ΣH/log 2, count of g > 0.5, n ḡ²) over the masked tokens, accumulates across
    adds (n ḡ² per add: per micro-batch), and a popped tensor is not changed by later adds."""
    g = torch.tensor([0.0, 0.2, 0.5, 0.51, 0.9, 1.0, 0.7, 0.3], dtype=dtype).reshape(-1, 1)
    mask = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool).reshape(-1, 1)

    def reference(weights):
        g64, w = g.double().reshape(-1), weights.double().reshape(-1)
        h = naive_entropy(g64)
        return torch.stack([w.sum(), (w * g64).sum(), (w * h).sum(), (w * (g64 > 0.5)).sum(),
                            (w * g64).sum() ** 2 / w.sum()])

    stats = GateStats()
    stats.add(GateValues(g), mask)
    first = stats.pop_tensor()
    torch.testing.assert_close(first, reference(mask), rtol=1e-6, atol=1e-6)
    kept = first.clone()
    stats.add(GateValues(g), None)
    stats.add(GateValues(g), mask)
    torch.testing.assert_close(stats.pop_tensor(), reference(torch.ones_like(mask)) + reference(mask), rtol=1e-6,
                               atol=1e-6)
    assert torch.equal(first, kept) and stats.pop_tensor() is None


@pytest.mark.parametrize("layout", ["batch-sequence", "flattened", "sequence-first"])
def test_the_token_mask_follows_the_layer_inputs_own_layout(layout):
    """A gated layer counts the model's real tokens when its input is laid out (batch, sequence, d) or flattened from
    it, and every position of any other layout (here sequence-first), also though the layer runs its gate, tap and
    branch on the tokens flattened to rows."""
    _, mask, _ = _batch()  # (3, 10), 24 real tokens
    model = _model(LAMBDA)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    model.base_model.penalty_run.set_batch(mask, mask.numel(), None, tuple(mask.shape))
    x = torch.randn(*mask.shape, layer.in_features)
    if layout == "flattened":
        x = x.reshape(-1, layer.in_features)
    elif layout == "sequence-first":
        x = x.transpose(0, 1).contiguous()
    out = layer(x.requires_grad_())
    assert out.shape == (*x.shape[:-1], layer.out_features)
    out.sum().backward()
    tokens = layer.gate_stats[("default", "sigmoid")].pop_tensor()[0].item()
    assert tokens == (mask.numel() if layout == "sequence-first" else mask.sum().item())


# ------------------------------------------------------------------------------- layers that do not see the tokens
IMAGE_TOKEN, PATCHES = 100, 64  # a 32 x 32 image in 4 x 4 patches: 64 image tokens in the text


def _tiny_llava(entropy_weight):
    """A LLaVA (CLIP vision tower, 2 layers; tiny Llama) with GateRA on every linear layer, as TRL's VLM recipes
    target it; gates constant at σ(0.8) (zero gate weights) and B = 0, so the gates' gradient is the penalty's alone."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from tests.helpers import tiny_llama_config

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=4)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=tiny_llama_config(),
                                                      image_token_index=IMAGE_TOKEN))
    return get_peft_model(model, GateRAConfig(r=4, target_modules="all-linear", gate_bias_init=0.8,
                                              entropy_weight=entropy_weight))


def _llava_batch(rows=2, text=20):
    ids = torch.cat([torch.full((rows, PATCHES), IMAGE_TOKEN), torch.randint(3, 90, (rows, text))], 1)
    mask = torch.ones_like(ids)
    mask[1, -10:] = 0
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(rows, 3, 32, 32), "labels": ids}


def test_layers_that_do_not_see_the_tokens_are_normalised_by_their_own_positions():
    """A vision tower's layers see patches (here 2 × 65 with CLIP's class token, the projector 2 × 64), not the
    text's N real tokens: each such layer's penalty is the mean over its own positions, so that every layer that ran
    gets the same gradient, λ·H'(g)·σ'/L, and the penalty stays in [0, λ] (before: 130/158 of it for the vision
    layers, and more than 1 per layer where patches outnumber the text)."""
    weight = 0.5
    model = _tiny_llava(weight).train()
    batch = _llava_batch()
    model(**batch).loss.backward()
    g0 = torch.sigmoid(torch.tensor(0.8))
    per_layer = weight * float(binary_entropy_grad(g0)) * float(g0 * (1 - g0))  # a whole layer's mean, times λ
    biases = {n: p.grad for n, p in model.named_parameters() if "gatera_gate" in n and n.endswith("bias")}
    ran = {n: g for n, g in biases.items() if g is not None}
    assert all(any(part in n for n in ran) for part in ("vision_tower", "multi_modal_projector", "language_model"))
    for name, grad in ran.items():
        assert float(grad) == pytest.approx(per_layer / len(biases), rel=1e-4), name


def test_gated_layers_that_never_run_are_reported(tmp_path, caplog):
    """LLaVA reads the second-to-last vision layer: the last one's gated projections get no gradient. After the first
    step a warning names them, says how they dilute the penalty, and how to leave them out."""
    import logging

    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = [{k: v[i] for k, v in _llava_batch().items()} for i in range(2)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to="none",
                             use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=_tiny_llava(0.01), args=args, train_dataset=Dataset.from_list(rows).with_format("torch"))
    with caplog.at_level(logging.WARNING, logger="gatera_plugin.trainer_integration"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "got no gradient" in r.getMessage()]
    assert len(warnings) == 1 and "6 of 28 gated layers" in warnings[0], warnings
    # (transformers 5.0 names the tower's layers `vision_tower.vision_model.encoder...`, later releases without it)
    assert re.search(r"vision_tower\.(vision_model\.)?encoder\.layers\.1\.", warnings[0]), warnings[0]
    assert "exclude_modules" in warnings[0]


def test_a_threshold_gate_with_its_threshold_frozen_still_gives_its_branch_the_keep_ratio_penalty():
    """The keep-ratio penalty reaches the branch's factors through the threshold gate's straight-through estimator: it
    applies while they train, even with τ frozen."""
    input_ids, mask, _ = _batch()
    grads = []
    for keep_ratio_weight in (0.0, 5.0):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), GateRAConfig(
            r=4, target_modules=TARGETS, init_weights=False, gate="threshold", keep_ratio=0.2,
            keep_ratio_weight=keep_ratio_weight, threshold_temperature=5.0)).train()  # (T: a slope where r lies)
        for name, param in model.named_parameters():
            if "gatera_gate" in name:
                param.requires_grad_(False)
        (model(input_ids=input_ids, attention_mask=mask).logits.sum() * 0).backward()
        grads.append(_grads(model))
    assert any((grads[0][name] - grads[1][name]).abs().max() > 0 for name in grads[0])


def test_a_frozen_adapter_on_other_layers_is_not_reported_as_untrained(tmp_path, caplog):
    """Its gates are not penalised and record nothing: they are not layers that "got no gradient"."""
    import logging

    from tests.helpers import plain_trainer, toy_texts

    trainer = plain_trainer(tmp_path, toy_texts(8), entropy_weight=0.1, batch=4, accum=1,
                            target_modules=["q_proj", "v_proj"])
    model = trainer.model
    model.add_adapter("frozen", GateRAConfig(r=4, target_modules=["k_proj", "o_proj"], init_weights=False))
    model.base_model.set_adapter(["default", "frozen"])
    for name, param in model.named_parameters():
        param.requires_grad_(".default" in name)
    with caplog.at_level(logging.WARNING, logger="gatera_plugin.trainer_integration"):
        trainer.train()
    assert not [r.getMessage() for r in caplog.records if "got no gradient" in r.getMessage()]


# ------------------------------------------------------------------------------------------- hand-written loops
def _gate_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "gatera_gate" in n and p.grad is not None}


def test_a_hand_written_fp16_loop_tells_the_penalty_its_loss_scale():
    """With `torch.amp.GradScaler` the task loss's gradient arrives multiplied by the scale, and the scaler divides
    every gradient by it: `set_loss_scale(scale)` scales the penalty's share alike, so that the unscaled gradients are
    the unscaled run's (without it the penalty's share ends up 1/scale of its size)."""
    input_ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))

    def grads(scale, tell):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), GateRAConfig(r=4, init_weights=False, gate_bias_init=0.8,
                                                          entropy_weight=0.5)).train()
        if tell:
            model.base_model.set_loss_scale(scale)
        (model(input_ids=input_ids, labels=input_ids).loss * scale).backward()
        return {n: g / scale for n, g in _gate_grads(model).items()}

    unscaled = grads(1.0, tell=False)
    for name, grad in grads(1024.0, tell=True).items():
        torch.testing.assert_close(grad, unscaled[name], rtol=1e-5, atol=1e-9, msg=name)
    untold = grads(1024.0, tell=False)
    assert any(not torch.allclose(untold[n], unscaled[n], rtol=1e-3) for n in unscaled)


def test_half_precision_gates_in_a_hand_written_loop_are_warned_about():
    """`model.to(torch.bfloat16)` after `get_peft_model` puts the gates in bf16, where they stop learning; outside a
    Trainer (which upcasts them) the first training forward warns once, naming `upcast_gates_to_fp32()`."""
    import warnings

    input_ids = torch.randint(3, 100, (2, 8))
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4)).to(torch.bfloat16).train()
    with pytest.warns(UserWarning, match=r"half precision .*upcast_gates_to_fp32\(\)"):
        model(input_ids=input_ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=input_ids)  # once
        with torch.no_grad():
            model.eval()(input_ids=input_ids)
        upcast = get_peft_model(tiny_llama(), GateRAConfig(r=4)).to(torch.bfloat16).train()
        upcast.base_model.upcast_gates_to_fp32()
        upcast(input_ids=input_ids)
    assert not [w for w in caught if "half precision" in str(w.message)]


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), None, "1024"])
def test_set_loss_scale_refuses_what_no_scaler_gives(scale):
    """A loss scale is a finite number > 0 (`scaler.get_scale()`); anything else is refused naming the call (NaN made
    every gate gradient NaN, 0 switched the penalty off, None failed with a bare TypeError)."""
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4))
    with pytest.raises(ValueError, match=r"set_loss_scale: the loss scale must be a finite number > 0"):
        model.base_model.set_loss_scale(scale)
    assert model.base_model.penalty_run.loss_scale == 1.0


def _tiny_encoder_decoder(architecture):
    """(model, targets: the attention projections, the regex of the decoder's cross-attention keys and values, which
    read the encoder's output), dropout off."""
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    torch.manual_seed(0)
    if architecture == "t5":
        config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                          decoder_start_token_id=0, dropout_rate=0.0)
        return T5ForConditionalGeneration(config), ["q", "k", "v", "o"], r"EncDecAttention\.[kv]$"
    sizes = {"vocab_size": 64, "d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "dropout": 0.0,
             "attention_dropout": 0.0, "activation_dropout": 0.0}
    if architecture == "bart":
        model = BartForConditionalGeneration(BartConfig(max_position_embeddings=64, **sizes))
    else:
        model = WhisperForConditionalGeneration(WhisperConfig(
            num_mel_bins=8, max_source_positions=6, max_target_positions=16, decoder_start_token_id=1,
            pad_token_id=0, eos_token_id=2, bos_token_id=1, **sizes))
    return model, ["q_proj", "k_proj", "v_proj", "out_proj"], r"encoder_attn\.[kv]_proj$"


@pytest.mark.parametrize("architecture, source_length, target_length",
                         [("t5", 7, 4), ("t5", 5, 5), ("bart", 7, 4), ("whisper", 12, 4)],
                         ids=["t5-other-lengths", "t5-same-length", "bart", "whisper-features"])
def test_encoder_decoder_layers_count_the_tokens_of_the_stack_they_read(architecture, source_length, target_length):
    """Encoder layers and the decoder's cross-attention keys and values (which read the encoder's output) mask and
    count by the encoder's `attention_mask`; the decoder's self-attention and the cross-attention's query and output
    projections by the decoder's real tokens (labels not -100, as a seq2seq collator pads them). Whisper's encoder
    reads audio features (no token ids; its 12 frames become 6 positions): each of its layers takes the mean over its
    own positions. The injected gradient equals the explicit penalty's, each layer's term a mean over its own stack's
    real tokens. Before, decoder layers took the encoder's mask where the lengths were equal and counted every position
    otherwise, and Whisper's encoder got no penalty at all."""
    import copy

    from gatera_plugin.layer import GateRALayer

    base, targets, cross_key_value = _tiny_encoder_decoder(architecture)
    model = get_peft_model(base, GateRAConfig(r=2, target_modules=targets, init_weights=False, entropy_weight=0.5))
    model.train()
    labels = torch.randint(3, 60, (2, target_length))
    labels[1, 2:] = -100
    if architecture == "whisper":
        inputs, mask = {"input_features": torch.randn(2, 8, source_length)}, None
    else:
        mask = torch.ones(2, source_length, dtype=torch.long)
        mask[0, 3:] = 0
        inputs = {"input_ids": torch.randint(3, 60, (2, source_length)), "attention_mask": mask}
    reference = copy.deepcopy(model)
    reference.peft_config["default"].entropy_weight = 0.0

    model(**inputs, labels=labels).logits.mul(0).sum().backward()
    injected = {n: p.grad for n, p in model.named_parameters() if "gatera_gate" in n}

    layers = {n: m for n, m in reference.named_modules() if isinstance(m, GateRALayer)}
    reads_decoder = {n for n in layers if ".decoder." in n and not re.search(cross_key_value, n)}
    assert len(layers) == 12 and len(reads_decoder) == 6  # (self-attention's 4, the cross-attention's query and output)
    gates, handles = {}, []
    for name, layer in layers.items():
        handles.append(layer.gatera_gate["default"].register_forward_hook(
            lambda module, args, output, name=name: gates.__setitem__(name, output)))
    reference(**inputs, labels=labels)
    for handle in handles:
        handle.remove()
    terms = []
    for name, gate in gates.items():
        real = (labels != -100) if name in reads_decoder else mask.bool() if mask is not None else None
        entropy = naive_entropy(gate.reshape(-1))
        terms.append(entropy.mean() if real is None else (entropy * real.reshape(-1)).sum() / real.sum())
    penalty = 0.5 * torch.stack(terms).mean()
    params = {n: p for n, p in reference.named_parameters() if "gatera_gate" in n}
    explicit = dict(zip(params, torch.autograd.grad(penalty, list(params.values()))))
    for name in params:
        assert explicit[name].abs().max() > 1e-6, name
        torch.testing.assert_close(injected[name], explicit[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("padding", [False, True], ids=["full-rows", "left-padded-prompt"])
def test_a_forward_with_a_kv_cache_is_normalised_by_its_new_tokens(padding):
    """A training-mode forward with gradient that continues from a KV cache (a cached prompt prefix) gets the mask of
    the prefix and the new tokens, as transformers expects, while the layers see the new tokens only: its penalty was
    divided by the whole mask's real tokens (7 / 1 times too small here). The new tokens' columns (the mask's last)
    count, as for the same tokens run alone."""
    torch.manual_seed(0)
    prompt, new = torch.randint(3, 100, (2, 6)), torch.randint(3, 100, (2, 1))
    prompt_mask = torch.ones(2, 6, dtype=torch.long)
    if padding:
        prompt_mask[0, :3] = 0

    def bias_grad(cached):
        model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], gate_bias_init=1.0,
                                                          entropy_weight=1.0))
        model.train()
        if cached:
            with torch.no_grad():
                past = model(input_ids=prompt, attention_mask=prompt_mask, use_cache=True).past_key_values
            mask = torch.cat([prompt_mask, torch.ones(2, 1, dtype=torch.long)], 1)
            out = model(input_ids=new, attention_mask=mask, past_key_values=past, use_cache=True)
        else:  # (layer 0's q_proj sees the same x, the new tokens' embeddings)
            out = model(input_ids=new, attention_mask=torch.ones(2, 1, dtype=torch.long))
        (out.logits.sum() * 0).backward()  # (the penalty's gradient alone)
        stats = model.base_model.pop_gate_stats()
        return model.base_model.model.model.layers[0].self_attn.q_proj.gatera_gate["default"].bias.grad, stats

    (cached, cached_stats), (alone, alone_stats) = bias_grad(True), bias_grad(False)
    torch.testing.assert_close(cached, alone, rtol=1e-5, atol=0)
    assert cached_stats == pytest.approx(alone_stats, rel=1e-5)


def test_a_mask_the_penalty_cannot_read_padding_from_is_warned_about_once(monkeypatch):
    """A 4-D (batch, 1, query, key) mask, as custom packing builds it, does not tell padding (a padded row that attends
    to itself looks like a one-token sequence): without position ids the penalty and statistics count every position,
    so a warning says so, once, naming the fixes; with position ids, which tell the padding, none."""
    import warnings

    from gatera_plugin import penalty

    monkeypatch.setattr(penalty, "_UNREAD_MASK_DIMS", set())
    input_ids, mask, _ = _batch()
    causal = torch.tril(torch.ones(10, 10, dtype=torch.bool))
    mask_4d = (causal & mask.bool()[:, None, :] | torch.eye(10, dtype=torch.bool))[:, None]  # (3, 1, 10, 10)
    model = _model(LAMBDA)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model(input_ids=input_ids, attention_mask=mask_4d).logits.sum().backward()
    messages = [str(w.message) for w in caught if "GateRA reads padding" in str(w.message)]
    assert len(messages) == 1 and "(3, 1, 10, 10)" in messages[0]
    assert "position_ids" in messages[0] and "2-D mask" in messages[0]

    monkeypatch.setattr(penalty, "_UNREAD_MASK_DIMS", set())
    positions = torch.arange(10).expand(3, 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=input_ids, attention_mask=mask_4d, position_ids=positions).logits.sum().backward()
        model.eval()  # (nothing is recorded in eval, with or without gradient: nothing to warn of)
        model(input_ids=input_ids, attention_mask=mask_4d).logits.sum().backward()
        with torch.no_grad():
            model.train()
            model(input_ids=input_ids, attention_mask=mask_4d)
    assert not [w for w in caught if "GateRA reads padding" in str(w.message)]
