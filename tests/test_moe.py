"""Mixture-of-experts models with fused expert weights, and classification heads: what the targets reach, said aloud.

transformers 5 holds each MoE layer's experts as 3-D `nn.Parameter`s (`mlp.experts.gate_up_proj`, `.down_proj`),
which no `target_modules` entry (nor "all-linear") can reach. GateRA refuses `target_parameters` and warns, naming
the unreached parameters and the choices (docs/method.md, "Mixture-of-experts models and classification heads").
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from torch import nn

from gatera_plugin import FrozenHeadWarning, GateRAConfig, GateRALayer, UnreachedExpertsWarning
from gatera_plugin.model import fused_expert_parameters

from .helpers import tiny_llama, tiny_llama_classifier

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0)
MOE_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=16, head_dim=8),
    "gpt_oss": lambda: transformers.GptOssConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                                 layer_types=["sliding_attention", "full_attention"]),
}
EXPERT_PATTERNS = ("model.layers.*.mlp.experts.gate_up_proj", "model.layers.*.mlp.experts.down_proj")


def tiny_moe(kind: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(MOE_CONFIGS[kind]())


def _caught(build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build()
    return result, caught


def _of(caught, category):
    return [str(w.message) for w in caught if issubclass(w.category, category)]


@pytest.mark.parametrize("kind", sorted(MOE_CONFIGS))
def test_all_linear_on_fused_experts_warns_and_names_them(kind):
    """"all-linear" reaches attention only; the warning names every unreached expert parameter and the choices."""
    model = tiny_moe(kind)
    experts = fused_expert_parameters(model)
    assert len(experts) == 4 and all(len(shape) == 3 for shape in experts.values())  # 2 layers x (gate_up, down)
    peft_model, caught = _caught(lambda: get_peft_model(model, GateRAConfig(r=4, target_modules="all-linear")))
    messages = _of(caught, UnreachedExpertsWarning)
    assert len(messages) == 1
    message = messages[0]
    for pattern in EXPERT_PATTERNS:
        assert pattern in message
    assert "LoraConfig(target_parameters=['mlp.experts.down_proj', 'mlp.experts.gate_up_proj'])" in message
    assert "docs/method.md" in message
    assert "UnreachedExpertsWarning" in message  # how to silence it knowingly
    adapted = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if isinstance(m, GateRALayer)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert str(sorted(adapted)) in message
    # the experts really stay frozen, and the adapted model still trains
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and not any("experts" in n for n in trainable)
    out = peft_model(input_ids=torch.randint(1, 64, (2, 6)), labels=torch.randint(1, 64, (2, 6)))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "experts" in n)


def test_listed_expert_names_are_called_out():
    """A transformers-4 habit (`down_proj` in the list) matches no module inside fused experts: the warning says so."""
    model = tiny_moe("qwen3_moe")
    config = GateRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    _, caught = _caught(lambda: get_peft_model(model, config))
    (message,) = _of(caught, UnreachedExpertsWarning)
    assert "names ['down_proj']" in message


def test_dense_model_and_inference_load_do_not_warn(tmp_path):
    """The warning is about experts: none on a dense model, and none when a trained MoE adapter is loaded to use it."""
    _, caught = _caught(lambda: get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules="all-linear")))
    assert not _of(caught, UnreachedExpertsWarning) and not _of(caught, FrozenHeadWarning)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreachedExpertsWarning)
        trained = get_peft_model(tiny_moe("mixtral"), GateRAConfig(r=4, target_modules="all-linear"))
    trained.save_pretrained(tmp_path)
    loaded, caught = _caught(lambda: PeftModel.from_pretrained(tiny_moe("mixtral"), tmp_path))
    assert not _of(caught, UnreachedExpertsWarning)
    ids = torch.randint(1, 64, (1, 5))
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_target_parameters_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"`target_parameters` is not supported by GateRA") as error:
        GateRAConfig(target_parameters=["mlp.experts.down_proj"])
    assert "LoraConfig(target_parameters" in str(error.value) and "docs/method.md" in str(error.value)


# ------------------------------------------------------------------------------------------ classification heads
def test_all_linear_seq_cls_adapts_every_backbone_linear_and_trains_the_head():
    """A reward model (`task_type="SEQ_CLS"`, "all-linear"): every backbone linear gets GateRA, the head trains in
    full, nothing is skipped, and one optimizer step moves both."""
    model = tiny_llama_classifier()
    backbone = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "score"}
    peft_model, caught = _caught(
        lambda: get_peft_model(model, GateRAConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    )
    assert not _of(caught, FrozenHeadWarning)
    assert set(peft_model.base_model.targeted_module_names) == backbone and len(backbone) == 14  # 2 x 7
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("score.modules_to_save" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(1, 64, (4, 6))
    loss = (peft_model(input_ids=ids).logits.squeeze(-1) - torch.tensor([1.0, -1.0, 1.0, -1.0])).pow(2).mean()
    loss.backward()
    optimizer.step()
    moved = {n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])}
    assert any("score.modules_to_save" in n for n in moved)
    for name in backbone:  # every adapted backbone linear learned (its B left zero)
        assert any(n.startswith(f"base_model.model.{name}.gatera_B") for n in moved), name


@pytest.mark.parametrize(("target_modules", "state"), [(None, "stays frozen"), ("all-linear", "gets a GateRA branch")])
def test_classifier_head_not_trained_warns(target_modules, state):
    """Without task_type="SEQ_CLS" (or modules_to_save) the head would keep its random weights: say so, by name."""
    model = tiny_llama_classifier()
    _, caught = _caught(lambda: get_peft_model(model, GateRAConfig(r=4, target_modules=target_modules)))
    (message,) = _of(caught, FrozenHeadWarning)
    assert "`score`" in message and state in message and 'task_type="SEQ_CLS"' in message

    _, caught = _caught(lambda: get_peft_model(
        tiny_llama_classifier(), GateRAConfig(r=4, target_modules=target_modules, modules_to_save=["score"])))
    assert not _of(caught, FrozenHeadWarning)


def test_a_token_classifiers_head_trained_by_peft_is_not_warned_about():
    """task_type="TOKEN_CLS": PEFT trains the head in full (it names it in modules_to_save only after the layers are
    injected, where the warning looked)."""
    from transformers import LlamaForTokenClassification

    from tests.helpers import tiny_llama_config

    config = tiny_llama_config()
    config.num_labels = 3
    model, caught = _caught(lambda: get_peft_model(LlamaForTokenClassification(config),
                                                   GateRAConfig(r=4, target_modules=["q_proj"], task_type="TOKEN_CLS")))
    assert not _of(caught, FrozenHeadWarning)
    assert any(p.requires_grad for n, p in model.named_parameters() if "score.modules_to_save" in n)


def test_a_shared_experts_flattened_tokens_keep_their_padding_mask():
    """Qwen2-MoE runs its shared expert (plain `nn.Linear`s, reached by "all-linear") on the hidden states flattened to
    (batch · sequence, d): its gates count the real tokens only, as every other gated layer does (before: padding
    too, since the mask's (batch, sequence) shape did not match)."""
    config = transformers.Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=32)
    torch.manual_seed(0)
    model = get_peft_model(transformers.AutoModelForCausalLM.from_config(config),
                           GateRAConfig(r=4, target_modules="all-linear")).train()
    input_ids = torch.randint(1, 64, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    model(input_ids=input_ids, attention_mask=mask, labels=input_ids).loss.backward()
    counted = {name: int(module.gate_stats[("default", "sigmoid")].pop_tensor()[0])
               for name, module in model.named_modules() if isinstance(module, GateRALayer)}
    assert any(".shared_expert." in name for name in counted)
    assert counted == {name: 9 for name in counted}
