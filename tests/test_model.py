"""GateRA through PEFT's machinery: save/load, AutoPeftModel, merging rules, adapters, checkpointing, registration."""

import copy
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from torch import nn

import gatera_plugin
from gatera_plugin import GateRAConfig, GateRALayer
from tests.helpers import LLAMA_PROJECTIONS, TwoLinear, eval_logits, randomize_adapters, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("branch", ["hira", "lora"])
def test_save_load_round_trip_is_exact(tmp_path, branch):
    config = GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS, branch=branch)
    model = randomize_adapters(get_peft_model(tiny_llama(), config))
    input_ids = torch.randint(3, 128, (2, 9))
    expected = eval_logits(model, input_ids)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "GATERA" and saved["branch"] == branch and saved["format_version"] == 1
    assert (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(loaded.peft_config["default"], GateRAConfig)
    torch.testing.assert_close(eval_logits(loaded, input_ids), expected, rtol=0, atol=0)
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, GateRAConfig) and config.entropy_weight == 0.01


def test_saved_keys_are_adapter_only_and_prefixed(tmp_path):
    from safetensors.torch import load_file

    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == sorted(
        f"base_model.model.model.layers.{i}.self_attn.q_proj.gatera_{p}"
        for i in range(2)
        for p in ("A", "B", "gate.weight", "gate.bias")
    )


def test_auto_peft_model_loads_base_and_adapter(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = randomize_adapters(get_peft_model(base, GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS)))
    input_ids = torch.randint(3, 128, (2, 9))
    expected = eval_logits(model, input_ids)
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(auto.base_model, gatera_plugin.GateRAModel)
    torch.testing.assert_close(eval_logits(auto, input_ids), expected)


def test_transformers_own_adapter_loading(tmp_path):
    """transformers loads PEFT adapters itself (`PeftAdapterMixin`): `AutoModelForCausalLM.from_pretrained` on an
    adapter folder, and `model.load_adapter(folder)` on a base. Both give the trained logits, and both refuse a config
    edited after the save, as PEFT's own loading does."""
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    model = randomize_adapters(get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS)))
    input_ids = torch.randint(3, 128, (2, 9))
    expected = eval_logits(model, input_ids)
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(eval_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "adapter"), input_ids),
                               expected)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    base.load_adapter(str(tmp_path / "adapter"))
    torch.testing.assert_close(eval_logits(base, input_ids), expected)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 64}))
    with pytest.raises(ValueError, match=r"field\(s\) `lora_alpha` differ"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"field\(s\) `lora_alpha` differ"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "base").load_adapter(str(tmp_path / "adapter"))


def test_loading_onto_a_wrong_base_is_refused_clearly(tmp_path):
    model = get_peft_model(tiny_llama(hidden=32), GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not fit this base model.*differ in shape"):
        PeftModel.from_pretrained(tiny_llama(hidden=64, intermediate=96), tmp_path)
    with pytest.raises(ValueError, match="lacks .* tensors"):
        PeftModel.from_pretrained(tiny_llama(layers=3), tmp_path)


def test_loading_in_a_process_without_the_plugin_needs_the_import(tmp_path):
    """Without `import gatera_plugin` PEFT cannot know the type; with it, loading works (documented in README)."""
    get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    code = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})"
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert bare.returncode != 0 and "GATERA" in bare.stderr
    ok = subprocess.run([sys.executable, "-c", "import gatera_plugin; " + code], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_gated_adapter_refuses_to_merge_and_leaves_model_intact():
    model = randomize_adapters(get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS)))
    input_ids = torch.randint(3, 128, (2, 9))
    before = eval_logits(model, input_ids)
    for call in (model.merge_and_unload, model.merge_adapter, model.base_model.merge_and_unload):
        with pytest.raises(ValueError, match="per-token gate.*no single merged weight"):
            call()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="per-token gate"):
        layer.merge()
    assert not layer.merged
    torch.testing.assert_close(eval_logits(model, input_ids), before, rtol=0, atol=0)


def test_a_merged_layer_warns_of_an_active_adapter_it_does_not_run():
    """With an ungated adapter merged and a gated one active beside it (which cannot merge), the merged layers run
    their merged weight only, as PEFT's LoRA layers do: a warning names the skipped adapter (the model differed
    silently); unmerged, both run again."""
    model = randomize_adapters(get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], gate="none"),
                                              adapter_name="plain"), adapter_name="plain")
    model.add_adapter("gated", GateRAConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(model, adapter_name="gated")
    model.base_model.set_adapter(["plain", "gated"])
    input_ids = torch.randint(3, 128, (2, 9))
    both = eval_logits(model, input_ids)
    model.merge_adapter(["plain"])
    with pytest.warns(UserWarning, match=r"Adapter\(s\) \['gated'\] are active, but the layers hold \['plain'\] merged") as caught:
        eval_logits(model, input_ids)
    assert caught[0].filename.endswith(os.path.join("tests", "helpers.py")), caught[0].filename  # (the line that ran it)
    model.unmerge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(eval_logits(model, input_ids), both, rtol=0, atol=0)


@pytest.mark.parametrize("branch", ["hira", "lora"])
@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_ungated_adapter_merges_exactly(branch, builder):
    targets = LLAMA_PROJECTIONS if builder is tiny_llama else ["c_attn", "c_proj", "c_fc"]
    model = randomize_adapters(get_peft_model(builder(), GateRAConfig(r=4, target_modules=targets, gate="none", branch=branch)))
    input_ids = torch.randint(3, 128, (2, 9))
    expected = eval_logits(model, input_ids)
    model.merge_adapter()
    torch.testing.assert_close(eval_logits(model, input_ids), expected, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(eval_logits(model, input_ids), expected, rtol=0, atol=0)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, GateRALayer) for m in merged.modules())
    torch.testing.assert_close(eval_logits(merged, input_ids), expected, rtol=1e-4, atol=1e-5)


def test_merging_into_a_tied_lm_head_is_refused_and_the_untying_it_names_merges_exactly():
    """A tied `lm_head` shares its weight with the input embedding: merging into it changed the embeddings too (the
    merged logits were 13 off here; PEFT only warns, as for LoRA). Refused, before any layer merged, naming the fix,
    which then merges to the adapted model."""
    model = get_peft_model(tiny_llama(tied=True, init_std=0.2), GateRAConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                                             gate="none"))
    randomize_adapters(model, scale=0.3)
    input_ids = torch.randint(3, 128, (2, 9))
    expected = eval_logits(model, input_ids)
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match=r"lm_head's base weight is also 'model.embed_tokens.weight' \(tied "
                                             r"weights.*Untie it first \(on the PeftModel: `layer = model\.base_model"
                                             r"\.model\.lm_head; "):
            call()
    assert not any(m.merged for m in model.modules() if isinstance(m, GateRALayer))
    torch.testing.assert_close(eval_logits(model, input_ids), expected, rtol=0, atol=0)
    layer = model.base_model.model.lm_head
    layer.base_layer.weight = torch.nn.Parameter(layer.base_layer.weight.detach().clone())
    model.config.tie_word_embeddings = False
    torch.testing.assert_close(eval_logits(model.merge_and_unload(), input_ids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("targets,saved", [(["q_proj", "lm_head"], None), (r".*(q_proj|lm_head)", None),
                                           (["q_proj", "lm_head"], ["embed_tokens"])])
def test_ensure_weight_tying_with_a_tied_lm_head_target_is_refused(targets, saved):
    """LoRA ties an lm_head's adapter to one on the embedding; GateRA cannot adapt the embedding, and PEFT only
    warned ("no implementation exists") and built the adapter untied, although the user asked for tying (with the
    embedding in `modules_to_save` too, PEFT failed on the wrapped head: "cannot be applied to modules of type")."""
    base = tiny_llama(tied=True)
    config = GateRAConfig(r=4, target_modules=targets, ensure_weight_tying=True, modules_to_save=saved)
    with pytest.raises(ValueError, match=r"`ensure_weight_tying=True` with the tied 'lm_head' in `target_modules`.*"
                                         r"Leave 'lm_head' out of `target_modules`, or set ensure_weight_tying=False"):
        get_peft_model(base, config)
    assert not any(isinstance(m, GateRALayer) for m in base.modules())


def test_ensure_weight_tying_with_the_embedding_in_target_modules_names_the_embedding():
    """The embedding itself among the targets got the tied-head refusal, naming `lm_head`, which the user had not
    named: it gets the refusal of an `Embedding` target instead."""
    with pytest.raises(ValueError, match=r"Embedding") as refused:
        get_peft_model(tiny_llama(tied=True), GateRAConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                           ensure_weight_tying=True))
    assert "lm_head" not in str(refused.value)


def test_unload_disable_and_delete_adapter():
    base = tiny_llama()
    input_ids = torch.randint(3, 128, (2, 9))
    base_logits = eval_logits(base, input_ids)
    model = randomize_adapters(get_peft_model(base, GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS)))
    adapted = eval_logits(model, input_ids)
    assert not torch.allclose(adapted, base_logits)
    with model.disable_adapter():
        torch.testing.assert_close(eval_logits(model, input_ids), base_logits)
    torch.testing.assert_close(eval_logits(model, input_ids), adapted)

    model.add_adapter("second", GateRAConfig(r=2, target_modules=["q_proj"], branch="lora"))
    randomize_adapters(model, adapter_name="second")
    model.set_adapter("second")
    second = eval_logits(model, input_ids)
    assert not torch.allclose(second, adapted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second" in n for n in trainable)
    assert model.base_model.penalty_run.layer_counts == {("default", "sigmoid"): 14, ("second", "sigmoid"): 2}
    model.set_adapter("default")
    torch.testing.assert_close(eval_logits(model, input_ids), adapted)
    model.delete_adapter("second")
    assert model.base_model.penalty_run.layer_counts == {("default", "sigmoid"): 14}
    assert not any("second" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(eval_logits(model, input_ids), adapted)

    unloaded = model.unload()
    assert not any(isinstance(m, GateRALayer) for m in unloaded.modules())
    torch.testing.assert_close(eval_logits(unloaded, input_ids), base_logits)
    assert not unloaded._forward_pre_hooks  # the batch-recording hook went with the adapter


def test_rank_pattern_layers_to_transform_and_exclude():
    config = GateRAConfig(
        r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, layers_to_transform=[1],
        layers_pattern="layers",
    )
    model = get_peft_model(tiny_llama(layers=3), config)
    names = [n for n, m in model.named_modules() if isinstance(m, GateRALayer)]
    assert names == ["base_model.model.model.layers.1.self_attn.q_proj", "base_model.model.model.layers.1.self_attn.v_proj"]
    assert model.base_model.model.model.layers[1].self_attn.v_proj.r["default"] == 2
    excluded = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules="all-linear", exclude_modules=["down_proj"]))
    kinds = {n.rsplit(".", 1)[-1] for n, m in excluded.named_modules() if isinstance(m, GateRALayer)}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}  # all-linear skips lm_head


def test_unsupported_layer_type_names_the_supported_ones():
    class WithConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match="cannot adapt target module of type Conv2d.*Supported layer types.*nn.Linear"):
        get_peft_model(WithConv(), GateRAConfig(target_modules=["conv"]))


def test_targets_matching_nothing_are_refused():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(TwoLinear(), GateRAConfig(target_modules=["nope"]))


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant, dropout):
    """Recomputed forwards must not change gradients, nor apply the penalty or record statistics twice; with dropout
    (LoRA recipes' `lora_dropout: 0.05`) the recomputation draws the forward's masks again."""
    input_ids = torch.randint(3, 128, (3, 11))
    mask = torch.ones_like(input_ids)
    mask[0, 7:] = 0
    results = []
    for checkpointing in (False, True):
        config = GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS, entropy_weight=0.5, dropout=dropout)
        model = randomize_adapters(get_peft_model(tiny_llama(), config))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        torch.manual_seed(1)
        out = model(input_ids=input_ids, attention_mask=mask, labels=input_ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((grads, model.base_model.pop_gate_stats(per_layer=True)))
    (grads, stats), (grads_ckpt, stats_ckpt) = results
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert stats.keys() == stats_ckpt.keys() and len(stats) == 4 + 3 * 14
    for key in stats:
        assert stats_ckpt[key] == pytest.approx(stats[key], rel=1e-6), key


def test_registration_is_idempotent():
    import importlib

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    members = list(PeftType)
    importlib.reload(gatera_plugin._registration)
    importlib.reload(gatera_plugin)
    assert list(PeftType) == members and PeftType.GATERA.value == "GATERA"
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.GATERA] == "gatera_"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.GATERA] is gatera_plugin.GateRAConfig
    model = get_peft_model(TwoLinear(), gatera_plugin.GateRAConfig(target_modules=["lin0"]))
    assert isinstance(model.base_model, gatera_plugin.GateRAModel)


@pytest.mark.parametrize("saved", [["embed_tokens", "lm_head"], ["lm_head"], ["embed_tokens"]],
                         ids=["both", "head", "embedding"])
def test_ensure_weight_tying_trains_one_copy_for_tied_embeddings(tmp_path, saved):
    """`ensure_weight_tying=True` (as LoRA's; new chat tokens on a tied model need the embeddings trained): whichever
    tied module `modules_to_save` names, one copy is trained, the head reads it before and after a step, and the
    saved adapter reloads tied to the same logits, with no warning. Without it each module trains a copy of its own
    and PEFT's warning names the option."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(tiny_llama(tied=True), GateRAConfig(r=4, target_modules=["q_proj"], modules_to_save=saved,
                                                           ensure_weight_tying=True))
    assert not [w for w in caught if re.search("tying|tied", str(w.message))], [str(w.message) for w in caught]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "gatera_" not in n]
    assert trainable == ["base_model.model.model.embed_tokens.modules_to_save.default.weight"]

    def head_weight():
        head = model.get_output_embeddings()
        return head.modules_to_save["default"].weight if hasattr(head, "modules_to_save") else head.weight

    embedding = model.get_input_embeddings().modules_to_save["default"].weight
    assert head_weight() is embedding
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert head_weight() is embedding
    assert not torch.equal(embedding, model.get_input_embeddings().original_module.weight)  # it trained
    expected = eval_logits(model, ids)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    loaded = PeftModel.from_pretrained(tiny_llama(tied=True), tmp_path)
    torch.testing.assert_close(eval_logits(loaded, ids), expected, rtol=0, atol=0)
    loaded_head = loaded.get_output_embeddings()
    assert loaded_head.modules_to_save["default"].weight is loaded.get_input_embeddings().modules_to_save["default"].weight

    with pytest.warns(UserWarning, match="`ensure_weight_tying` is not set to True"):
        untied = get_peft_model(tiny_llama(tied=True), GateRAConfig(r=4, target_modules=["q_proj"], modules_to_save=saved))
    copies = [n for n, p in untied.named_parameters() if p.requires_grad and "gatera_" not in n]
    assert len(copies) == len(saved)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
@pytest.mark.parametrize("extra", [
    {"modules_to_save": ["embed_tokens", "lm_head"]},
    {"modules_to_save": ["embed_tokens", "lm_head"], "ensure_weight_tying": True},
    {"modules_to_save": ["lm_head"]},
    {"trainable_token_indices": [128, 129]},
], ids=["modules_to_save", "ensure_weight_tying", "head", "trainable_tokens"])
def test_adapter_trained_with_new_tokens_reloads(tmp_path, tied, extra):
    """New tokens resize the embeddings; PEFT then saves the embedding layers' whole wrappers as well
    (`save_embedding_layers="auto"`: `lm_head.modules_to_save.weight`, `original_module.weight`, a tied head's
    `token_adapter.trainable_tokens_delta`), as it does for LoRA. Such an adapter reloads onto the base resized anew
    (whose new rows are drawn again) to the trained logits. Before, GateRA refused those tensors as not described by
    the config, so no adapter trained with new chat tokens could be loaded. Onto the base without the new tokens,
    the error says to resize it."""
    from transformers import AutoModelForCausalLM

    tiny_llama(tied=tied).save_pretrained(tmp_path / "base")

    def resized_base():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        model.resize_token_embeddings(130)  # two new tokens, rows drawn at random
        return model

    model = get_peft_model(resized_base(), GateRAConfig(r=4, target_modules=["q_proj"], init_weights=False, **extra))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([[5, 128, 129, 7, 9]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    expected = eval_logits(model, ids)
    with pytest.warns(UserWarning, match="embedding layer has been resized"):
        model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(resized_base(), tmp_path / "adapter")
    torch.testing.assert_close(eval_logits(loaded, ids), expected, rtol=0, atol=0)
    # onto the base as it was before the new tokens: an error that says to resize it (was torch's size mismatch, or
    # an IndexError inside PEFT for trainable_token_indices)
    message = (r"`trainable_token_indices` holds token 129, but model.embed_tokens has 128 rows.*resize_token_embeddings"
               if "trainable_token_indices" in extra else
               r"trained with 130 tokens and this base model has 128: new tokens.*Resize the base model first "
               r"\(`model.resize_token_embeddings\(130\)`")
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")


def test_ignore_mismatched_sizes_loads_onto_a_base_resized_on_purpose_as_for_lora(tmp_path):
    """`PeftModel.from_pretrained(base, path, ignore_mismatched_sizes=True)` onto a base whose vocabulary grew after the
    save (new tokens added on purpose): the resized `modules_to_save` head keeps the base's values, as PEFT does for
    LoRA; the adapter's own tensors load. Before, GateRA refused, suggesting to shrink the base back. The adapter's own
    tensors (another rank, from a `config` passed that differs from the saved one) are still refused, naming the
    field."""
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                      init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    base = tiny_llama()
    base.resize_token_embeddings(136)
    with pytest.warns(UserWarning):  # (PEFT's, naming the skipped head)
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter", ignore_mismatched_sizes=True)
    saved = model.base_model.model.model.layers[0].self_attn.q_proj.gatera_B["default"]
    assert torch.equal(loaded.base_model.model.model.layers[0].self_attn.q_proj.gatera_B["default"], saved)
    assert eval_logits(loaded, torch.tensor([[5, 130, 7]])).shape[-1] == 136
    other_rank = get_peft_model(tiny_llama(), GateRAConfig(r=8, target_modules=["q_proj"]))
    other_rank.save_pretrained(tmp_path / "rank8")
    with pytest.raises(ValueError, match=r"`config` passed to `PeftModel.from_pretrained`\).* its `r` differs from the "
                                         r"saved adapter's \(e.g. r=4 here, 8 saved\)"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "rank8", ignore_mismatched_sizes=True,
                                  config=GateRAConfig(r=4, target_modules=["q_proj"]))


def test_ensure_weight_tying_whatever_the_embedding_is_called(tmp_path):
    """GPT-2 calls its embedding `transformer.wte`, not `embed_tokens`: PEFT alone would recognise the saved
    `modules_to_save` only at training time, and reload the adapter untied, writing the trained copy into the base's
    shared weight. GateRA recognises the input embedding by module: the reloaded head reads the trained copy and the
    base weight is left as it was."""
    from tests.helpers import tiny_gpt2

    model = get_peft_model(tiny_gpt2(), GateRAConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"],
                                                     ensure_weight_tying=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "gatera_" not in n]
    assert trainable == ["base_model.model.transformer.wte.modules_to_save.default.weight"]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    expected = eval_logits(model, ids)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["transformer.wte"]
    base = tiny_gpt2()
    original = base.transformer.wte.weight.detach().clone()
    loaded = PeftModel.from_pretrained(base, tmp_path)
    copy = loaded.get_input_embeddings().modules_to_save["default"].weight
    assert loaded.get_output_embeddings().modules_to_save["default"].weight is copy
    assert torch.equal(loaded.get_input_embeddings().original_module.weight, original)  # the base is untouched
    torch.testing.assert_close(eval_logits(loaded, ids), expected, rtol=0, atol=0)


def test_a_reused_config_does_not_carry_tying_to_an_untied_model():
    """`get_peft_model` keeps the user's config object, on which tying is recorded: used again on an untied model it
    ties nothing there (each module named in `modules_to_save` gets its own copy)."""
    config = GateRAConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True)
    get_peft_model(tiny_llama(tied=True), config)
    assert config.modules_to_tie == {"lm_head"}
    with pytest.warns(UserWarning, match="no tied modules were found"):
        untied = get_peft_model(tiny_llama(), config)
    head = untied.get_output_embeddings()
    assert not hasattr(head, "modules_to_save") or head.modules_to_save["default"].weight is not \
        untied.get_input_embeddings().modules_to_save["default"].weight
    assert config.modules_to_tie is None


@pytest.mark.parametrize("indices", [[3, 128], {"embed_tokens": [3, 128]}], ids=["list", "dict"])
def test_trainable_token_indices_beyond_the_embedding_are_refused_by_name(indices):
    """Indices past the embedding's rows (an adapter trained with new tokens, on a base not resized) are refused with
    the setting and the fix, also where ZeRO-3 left the weight an empty stub (its `ds_shape` counts), and not for
    indices inside it."""
    with pytest.raises(ValueError, match=r"`trainable_token_indices` holds token 128, but model.embed_tokens has 128 "
                                         r"rows.*resize_token_embeddings"):
        get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices))
    partitioned = tiny_llama()
    weight = partitioned.get_input_embeddings().weight
    weight.ds_shape = weight.shape
    weight.data = torch.empty(0)  # as ZeRO-3 leaves it on each rank
    from gatera_plugin.model import _check_token_indices

    with pytest.raises(ValueError, match="holds token 128, but model.embed_tokens has 128 rows"):
        _check_token_indices(partitioned, GateRAConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices))
    inside = [3, 127] if isinstance(indices, list) else {"embed_tokens": [3, 127]}
    _check_token_indices(partitioned, GateRAConfig(r=4, target_modules=["q_proj"], trainable_token_indices=inside))


def test_a_saved_head_of_another_size_is_left_to_peft(tmp_path):
    """A `modules_to_save` head trained for 3 labels, loaded onto a 5-label model: not GateRA's adapter tensors, so
    PEFT decides (its error, or with `ignore_mismatched_sizes=True` it keeps the model's head and loads the rest)."""
    from tests.helpers import tiny_llama_classifier

    model = get_peft_model(tiny_llama_classifier(num_labels=3), GateRAConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["score"], init_weights=False))
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(tiny_llama_classifier(num_labels=5), tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama_classifier(num_labels=5), tmp_path, ignore_mismatched_sizes=True)
    saved = model.state_dict()
    key = next(k for k in saved if "q_proj.gatera_B" in k)
    torch.testing.assert_close(loaded.state_dict()[key], saved[key])


def test_ensure_weight_tying_edited_after_the_save_is_refused(tmp_path):
    """The option decides which modules the saved copy stands for, so it is part of the adapter's structure stamp; an
    adapter saved before the option existed meant False."""
    model = get_peft_model(tiny_llama(tied=True), GateRAConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                       ensure_weight_tying=True))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "ensure_weight_tying": False}))
    with pytest.raises(ValueError, match="`ensure_weight_tying`"):
        PeftModel.from_pretrained(tiny_llama(tied=True), tmp_path)
    del config["ensure_weight_tying"], config["structure_stamp"]["ensure_weight_tying"]  # as saved before it existed
    path.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(tiny_llama(tied=True), tmp_path)
    assert loaded.peft_config["default"].ensure_weight_tying is False


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_trainable_token_indices_train_only_their_rows_and_reload(tmp_path, tied):
    """`trainable_token_indices` (PEFT's light alternative to saving the whole embedding, e.g. for new chat tokens):
    after a step only those rows of the input embedding differ, the adapter trains alongside, and the saved adapter
    (token rows included) reloads to the same logits. With tied embeddings (SmolLM2, Llama 3.2) the output head
    follows the same rows."""
    rows = [5, 7]
    model = get_peft_model(tiny_llama(tied=tied), GateRAConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_weights=False, trainable_token_indices=rows))
    before = model.get_input_embeddings()(torch.arange(128)).detach()
    head_before = model.get_output_embeddings().weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([[5, 7, 9, 11, 13]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = model.get_input_embeddings()(torch.arange(128)).detach()
    changed = (after != before).any(dim=-1).nonzero().flatten().tolist()
    assert changed == rows
    if tied:  # the head's rows are the embedding's, through PEFT's wrapper of the tied head
        torch.testing.assert_close(model.get_output_embeddings()(torch.eye(32))[:, rows].T, after[rows])
    else:
        torch.testing.assert_close(model.get_output_embeddings().weight, head_before)
    expected = eval_logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(tied=tied), tmp_path)
    torch.testing.assert_close(eval_logits(loaded, ids), expected, rtol=0, atol=0)


def test_a_refused_merge_and_unload_leaves_a_model_that_still_masks_padding():
    """The batch hooks (which hand the gated layers the attention mask) go only once the model is unloaded."""
    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("ungated", GateRAConfig(r=4, target_modules=["q_proj", "v_proj"], gate="none",
                                             init_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gatera_A.ungated" in name:
                param.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(adapter_names=["ungated"], safe_merge=True)
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    model.train()
    model(input_ids=ids, attention_mask=mask)
    assert torch.equal(model.base_model.penalty_run.attention_mask, mask.bool())


def test_unloading_gives_the_base_its_own_gradient_checkpointing_back():
    """Under gradient checkpointing, GateRA wraps each layer's checkpoint function (to replay a region with its own
    batch); after `unload()` / `merge_and_unload()` the base kept the wrapper, and with it GateRA's last batch, into
    whatever ran on it next (a LoRA run on the same base went through it)."""
    for unload in ("unload", "merge_and_unload"):
        base = tiny_llama()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = [m for m in base.modules() if hasattr(m, "gradient_checkpointing")]
        own = [m.__dict__.get("_gradient_checkpointing_func") for m in layers]
        model = get_peft_model(base, GateRAConfig(r=4, target_modules=["q_proj"], gate="none", init_weights=False))
        model.train()
        model(input_ids=torch.randint(3, 128, (1, 6))).logits.sum().backward()
        assert any(hasattr(m._gradient_checkpointing_func, "gatera_penalty_run") for m in layers)
        unloaded = getattr(model, unload)()
        assert [m.__dict__.get("_gradient_checkpointing_func") for m in layers] == own
        unloaded(input_ids=torch.randint(3, 128, (1, 6))).logits.sum().backward()


def test_prune_structure_of_a_merged_adapter_is_refused():
    """Pruning unwraps the pruned modules: a merged update would stay in their base weight for good."""
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj", "v_proj"], gate="none",
                                                      structure_gate=True, init_weights=False))
    with torch.no_grad():
        for i, (_, param) in enumerate(n for n in model.named_parameters() if "gatera_structure" in n[0]):
            param.fill_(-5.0 if i % 2 else 5.0)
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged into the base weights: call `unmerge_adapter\(\)` before"):
        model.base_model.prune_structure(0.5)
    model.unmerge_adapter()
    assert len(model.base_model.prune_structure(0.5)["pruned"]) == 2


def test_prune_structure_of_an_unknown_adapter_names_the_adapters():
    """An adapter name the model does not have: a ValueError naming it and the model's adapters (a bare KeyError)."""
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], structure_gate=True),
                           adapter_name="first")
    for name in ("default", "other"):
        with pytest.raises(ValueError, match=rf"has no adapter {name!r} to prune; it has \['first'\]"):
            model.base_model.prune_structure(0.5, name)


def test_a_module_that_eval_skips_by_its_structure_gate_merges_nothing():
    """gate="none", a structure gate and `sparse_threshold`: in eval a module with σ(α) below the threshold adds
    nothing, so its merged update is nothing too (it was σ(α)·ΔW: the merged model differed from the one evaluated)."""
    torch.manual_seed(1)
    config = GateRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], gate="none", branch="lora",
                          structure_gate=True, init_weights=False, sparse_threshold=0.2)
    model = get_peft_model(tiny_llama(), config).eval()
    with torch.no_grad():
        for i, (_, param) in enumerate(n for n in model.named_parameters() if "gatera_structure" in n[0]):
            param.fill_(-2.0 if i % 2 else 2.0)  # σ = 0.12 (skipped) or 0.88
        for name, param in model.named_parameters():
            if "gatera_B" in name:
                param.normal_(0, 1.0)
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
        merged = copy.deepcopy(model).merge_and_unload()(input_ids=ids).logits
        base = tiny_llama().eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, evaluated, rtol=1e-4, atol=1e-4)
    assert (evaluated - base).abs().max() > 1e-2  # (the open modules do change it)


@pytest.mark.parametrize("architecture", ["t5", "bart"])
def test_the_layers_of_an_encoder_decoder_know_which_stacks_tokens_they_read(architecture):
    """The decoder's self-attention and the cross-attention's query and output projections read the decoder's states
    (they count its tokens: tests/test_penalty.py); the cross-attention's keys and values, like the encoder, read the
    encoder's output. No warning of the encoder's mask any more (there was one while decoder layers took it)."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    from gatera_plugin.layer import GateRALayer

    if architecture == "t5":
        base = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                   num_heads=2, decoder_start_token_id=0))
        targets, cross = ["q", "k", "v", "o"], "EncDecAttention"
    else:
        base = BartForConditionalGeneration(BartConfig(
            vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64))
        targets, cross = ["q_proj", "k_proj", "v_proj", "out_proj"], "encoder_attn"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(base, GateRAConfig(r=2, target_modules=targets, task_type="SEQ_2_SEQ_LM"))
    assert not [w for w in caught if "encoder-decoder" in str(w.message)]
    reads_decoder = {name.rsplit("decoder.", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, GateRALayer) and module.in_decoder}
    layer = "block.0.layer.0.SelfAttention" if architecture == "t5" else "layers.0.self_attn"
    cross_layer = f"block.0.layer.1.{cross}" if architecture == "t5" else f"layers.0.{cross}"
    assert reads_decoder == {f"{layer}.{t}" for t in targets} | {f"{cross_layer}.{t}" for t in (targets[0], targets[3])}
