"""GateRA on 4-bit bitsandbytes bases (QLoRA style), on CPU."""

import math
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

from gatera_plugin import GateRAConfig
from tests.helpers import LLAMA_PROJECTIONS, load_4bit, naive_gated_hira, tiny_llama

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny4bit")
    tiny_llama(hidden=64, intermediate=128, init_std=0.2).save_pretrained(path)
    return path


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_layer_equals_naive_with_dequantised_weight(base_dir, bits):
    """(The layer is called on its own, in training mode: without a penalty, which the naive reference lacks; a call
    outside a model's forward takes the mean over its own positions.)"""
    from peft.utils.integrations import dequantize_bnb_weight

    config = GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS, init_weights=False, entropy_weight=0.0)
    model = get_peft_model(load_4bit(base_dir, bits=bits), config)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    expected_type = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}[bits]
    assert type(layer).__name__ == expected_type.__name__ and isinstance(layer.base_layer, expected_type)
    x = torch.randn(3, 5, 128, requires_grad=True)
    out = layer(x)
    W0 = dequantize_bnb_weight(layer.base_layer.weight, state=getattr(layer.base_layer, "state", None)).float()
    gate = layer.gatera_gate["default"]
    A, B = layer.gatera_A["default"], layer.gatera_B["default"]
    s = 1 / (W0.square().mean().sqrt() * 0.5)  # the default hira_scaling='lora': RMS of the dequantised W0, g0 = 0.5
    expected = layer.base_layer(x) + s * naive_gated_hira(x, W0, A, B, gate.weight, gate.bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    inputs = [x, A, B, gate.weight, gate.bias]
    for ours, ref in zip(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_8bit_base_keeping_dense_weights_trains_on_them(base_dir):
    """`llm_int8_has_fp16_weight=True` keeps an 8-bit layer's weight dense (quantised in each forward, no scales):
    PEFT's dequantisation helper failed on the missing scales inside `get_peft_model`; W0 is that weight."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True)
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization, device_map={"": "cpu"})
    config = GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS, init_weights=False, entropy_weight=0.0)
    layer = get_peft_model(base, config).base_model.model.model.layers[0].mlp.down_proj
    W0 = layer.base_layer.weight.detach().float()
    assert W0.dtype == torch.float32 and layer.base_layer.state.SCB is None
    x = torch.randn(3, 5, 128, requires_grad=True)
    gate, A, B = layer.gatera_gate["default"], layer.gatera_A["default"], layer.gatera_B["default"]
    assert layer.scaling["default"] == pytest.approx(1 / (W0.square().mean().sqrt().item() * 0.5), rel=1e-5)
    out = layer(x)
    expected = layer.base_layer(x) + layer.scaling["default"] * naive_gated_hira(x, W0, A, B, gate.weight, gate.bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad_out, inputs = torch.randn_like(out), [x, A, B, gate.weight, gate.bias]
    for ours, ref in zip(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_rms_scaling_reads_the_dequantised_weight(base_dir, bits):
    """hira_scaling='rms' on a quantised base: s = 1 / RMS of the dequantised W0 (not of the packed bytes)."""
    from peft.utils.integrations import dequantize_bnb_weight

    config = GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS, hira_scaling="rms")
    model = get_peft_model(load_4bit(base_dir, bits=bits), config)
    layers = model.base_model.model.model.layers
    for layer in (layers[0].mlp.down_proj, layers[1].self_attn.q_proj):
        W0 = dequantize_bnb_weight(layer.base_layer.weight, state=getattr(layer.base_layer, "state", None)).float()
        assert layer.scaling["default"] == pytest.approx(1 / W0.square().mean().sqrt().item(), rel=1e-5)
        assert 1 < layer.scaling["default"] < 20  # init_std 0.2: about 1 / 0.2


def test_4bit_eval_forward_equals_training_forward(base_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference on the first eval forward (AVX512-BF16 CPUs), a layout
    its own dequantisation misreads; the adapter must give the same outputs in eval/no-grad as in training mode."""
    model = get_peft_model(load_4bit(base_dir), GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS, init_weights=False))
    input_ids = torch.randint(3, 128, (2, 7))
    model.train()
    with torch.no_grad():
        train_logits = model(input_ids=input_ids).logits
    model.eval()
    with torch.no_grad():
        first = model(input_ids=input_ids).logits
        second = model(input_ids=input_ids).logits
    torch.testing.assert_close(first, train_logits, rtol=1e-3, atol=2e-2)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_cache_delta_reuses_its_update_on_a_4bit_base_stored_as_bf16(base_dir):
    """FSDP-QLoRA's `bnb_4bit_quant_storage=bf16`: the cache's probes of W0 read packed bytes as bf16, often NaN, and
    NaN ≠ NaN made every forward rebuild the update there (outputs right, the option silently doing nothing)."""
    from peft.utils.integrations import dequantize_bnb_weight

    from gatera_plugin.layer import _evenly_spaced

    base = load_4bit(base_dir, quant_storage=torch.bfloat16)
    try:
        dequantize_bnb_weight(base.model.layers[0].mlp.down_proj.weight)
    except RuntimeError as error:  # (bitsandbytes 0.46 on CPU: "only supports uint8 storage")
        pytest.skip(f"this bitsandbytes cannot dequantise bf16-stored 4-bit weights on CPU: {error}")
    config = GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS, init_weights=False, cache_delta=True)
    model = get_peft_model(base, config).eval()
    layers = [m for m in model.modules() if hasattr(m, "_delta_cache")]
    assert any(bool(_evenly_spaced(layer.base_layer.weight, 1024).isnan().any()) for layer in layers)
    input_ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        first = model(input_ids=input_ids).logits
        built = [layer._delta_cache["default"][3] for layer in layers]
        second = model(input_ids=input_ids).logits
    assert all(layer._delta_cache["default"][3] is delta for layer, delta in zip(layers, built))
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("forward_first", [False, True])
def test_8bit_unmerge_puts_back_the_int8_weight_it_merged_into(base_dir, forward_first):
    """While merged, an 8-bit layer kept a dense fp32 copy of W0 (4x its int8 weight) for unmerge; it keeps the int8
    weight and its row scales (which bitsandbytes moves to the layer's state at the first forward), restored exactly."""
    model = get_peft_model(load_4bit(base_dir, bits=8), GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS, gate="none"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gatera_B" in name:
                p.normal_(0, 0.04)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    int8 = layer.base_layer.weight.data.clone()
    model.eval()
    input_ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        if forward_first:  # (the scales have moved from the weight to the layer's state)
            model(input_ids=input_ids)
        expected = model(input_ids=input_ids).logits
        for _ in range(3):
            with pytest.warns(UserWarning, match="re-quantises the merged weight"):
                model.merge_adapter()
            kept = layer._weight_before_merge
            assert kept.weight.dtype == torch.int8 and kept.weight.numel() * kept.weight.element_size() == 64 * 128
            assert not torch.equal(layer.base_layer.weight.data, int8)
            model(input_ids=input_ids)  # (the merged weight's first forward takes its scales into the state)
            model.unmerge_adapter()
            assert torch.equal(layer.base_layer.weight.data, int8)
            torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=0, atol=0)
    x = torch.randn(2, 3, 128, requires_grad=True)
    layer.train()
    layer(x).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_4bit_branch_keeps_no_dequantised_weight(base_dir):
    """Between forward and backward the HiRA branch holds no d_out × d_in tensor (PEFT's HiRA keeps W0 ⊙ BA and the
    dequantised W0)."""
    model = get_peft_model(load_4bit(base_dir), GateRAConfig(r=4, target_modules=["down_proj"]))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 3, 128, requires_grad=True)
    numels = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: numels.append(t.numel()) or t, lambda t: t):
        layer(x)
    assert numels and max(numels) < 64 * 128


def test_4bit_ungated_merge_matches_unmerged(base_dir):
    model = get_peft_model(load_4bit(base_dir), GateRAConfig(r=4, target_modules=["q_proj"], gate="none"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gatera_" in name:
                p.normal_(0, 0.04)  # with s = 1 / (RMS(W0) ≈ 0.2): an update |s·W0 ⊙ BA| about 1% of W0's
    model.eval()
    input_ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        with pytest.warns(UserWarning, match="re-quantises the merged weight"):
            model.merge_adapter()
        merged = model(input_ids=input_ids).logits
        model.unmerge_adapter()
        unmerged = model(input_ids=input_ids).logits
    # re-quantising the merged weight rounds it to NF4 again: close, not equal
    assert (merged - expected).abs().max() < 0.1 * expected.abs().max()
    torch.testing.assert_close(unmerged, expected, rtol=0, atol=1e-2)


@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_unmerge_puts_back_the_packed_weight_it_merged_into(base_dir, tmp_path, double_quant):
    """Unmerge restores W0 bit for bit, cycle after cycle, also under QLoRA's double quant (where quantising a
    dequantised copy again gives the nested absmax other values: W0 moved a little with every merge / unmerge), and
    keeps no dense copy while merged (nor a parameter of the layer's: a save while merged works)."""
    # every 4-bit layer wrapped: bitsandbytes repacks an unwrapped one at its first eval forward on an AVX512-BF16 CPU,
    # and its state_dict (the save) then re-quantises that one's scales (bitsandbytes' behaviour, not the adapter's)
    model = get_peft_model(load_4bit(base_dir, double_quant=double_quant),
                           GateRAConfig(r=4, target_modules=LLAMA_PROJECTIONS, gate="none"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gatera_" in name:
                p.normal_(0, 0.04)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    packed, absmax = layer.base_layer.weight.data.clone(), layer.base_layer.weight.quant_state.absmax.clone()
    model.eval()
    input_ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        kept_sizes = []
        for _ in range(3):
            with pytest.warns(UserWarning, match="re-quantises the merged weight"):
                model.merge_adapter()
            assert layer.merged and layer._original_weight().shape == (64, 128)
            kept_sizes.append(layer._weight_before_merge.weight.numel())
            assert not any("_weight_before_merge" in key for key in model.state_dict())  # (kept out of the module's)
            model.save_pretrained(tmp_path / "merged")  # a save while merged sees only the adapter's tensors
            model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=0, atol=0)
        assert torch.equal(layer.base_layer.weight.data, packed)
        assert torch.equal(layer.base_layer.weight.quant_state.absmax, absmax)
        assert layer.base_layer.quant_state is layer.base_layer.weight.quant_state
        assert "_weight_before_merge" not in layer._parameters
    assert max(kept_sizes) < 64 * 128  # what merge kept: the packed bytes, not a dense W0


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
def test_4bit_weight_repacked_for_cpu_inference_before_wrapping_is_read_back(base_dir, monkeypatch, double_quant,
                                                                             quant_storage):
    """bitsandbytes repacks a 4-bit weight on its first eval forward on an AVX512-BF16 CPU (here forced, on any CPU),
    storing absmax transposed in bf16; GateRA undoes that when it wraps the layer. Its W0 is the loaded one up to
    absmax's bf16 rounding (said in a warning), with the blocks in their places (d_in = 128: two blocks per row, which
    bitsandbytes' own inverse left transposed without double quant)."""
    if not hasattr(bnb.functional, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes has no CPU repacking of 4-bit weights (0.50 has; 0.46 has not)")
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit, dequantize_blockwise

    import gatera_plugin.bnb as gatera_bnb

    monkeypatch.setattr(gatera_bnb, "_WARNED", set(), raising=False)
    base = load_4bit(base_dir, double_quant=double_quant, quant_storage=quant_storage)
    linear = base.model.layers[0].mlp.down_proj
    weight = linear.weight
    state = weight.quant_state
    absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    rounded = type(state)(absmax=absmax.bfloat16().float(), shape=state.shape, code=state.code,
                          blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
    expected = dequantize_4bit(weight.data.view(torch.uint8), rounded)  # W0 with bf16-rounded scales
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, state)  # as bitsandbytes' forward
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        model = get_peft_model(base, GateRAConfig(r=4, target_modules=["down_proj", "q_proj"]))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    W0 = layer.base_weight()
    tolerance = 4e-3 * expected.abs().max().item() if double_quant else 0  # (double quant: absmax nested again)
    torch.testing.assert_close(W0, expected.to(W0.dtype), rtol=0, atol=tolerance)
    assert layer.base_layer.weight.dtype == quant_storage
    assert [w.filename for w in said if "repacked its weight for CPU inference" in str(w.message)] == [__file__]


@pytest.mark.slow
def test_sft_trainer_on_4bit_base(base_dir, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tests.helpers import toy_texts, word_tokenizer

    texts = toy_texts(32)
    args = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=30,
        learning_rate=3e-2, logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
        max_length=32, disable_tqdm=True, seed=0,
    )
    torch.manual_seed(0)
    trainer = SFTTrainer(
        model=load_4bit(base_dir), args=args, train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=word_tokenizer(toy_texts(64)), peft_config=GateRAConfig(r=8, target_modules=LLAMA_PROJECTIONS),
    )
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in history]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert all("gatera/entropy" in h for h in history)
    assert history[-1]["gatera/entropy"] < 0.5 * history[0]["gatera/entropy"]  # gates leave 0.5 as training goes
    # TRL casts trainable parameters of quantised models to bf16; the gates are kept in fp32 (see upcast_gates_to_fp32)
    params = dict(trainer.model.named_parameters())
    assert {p.dtype for n, p in params.items() if "gatera_gate" in n} == {torch.float32}
    assert {p.dtype for n, p in params.items() if "gatera_A" in n} == {torch.bfloat16}
    trainer.save_model(str(tmp_path / "adapter"))
    trained = trainer.model.eval()
    loaded = PeftModel.from_pretrained(load_4bit(base_dir), tmp_path / "adapter").eval()
    for name, param in loaded.named_parameters():  # same dtypes as trained, so outputs must match exactly
        if "gatera_A" in name or "gatera_B" in name:
            param.data = param.data.to(torch.bfloat16)
    input_ids = torch.randint(3, 17, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, trained(input_ids=input_ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["paged_adamw_8bit", "adamw_bnb_8bit", "paged_adamw_32bit"])
def test_qlora_recipes_bitsandbytes_optimizers_train_the_gates_at_their_ratio(base_dir, tmp_path, optim):
    """QLoRA recipes' optimizers (bitsandbytes' 8-bit and paged AdamW, `optim=` in the Trainer, `optimizer:` in
    Axolotl) with `gate_lr_ratio=3`: the optimizer the Trainer builds is bitsandbytes', its groups keep the gates
    apart at 3 x the rate, and the run trains (finite, falling loss; the gates move)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tests.helpers import gate_group_rates, toy_texts, word_tokenizer

    args = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=8, learning_rate=1e-2, logging_steps=1,
        report_to="none", use_cpu=True, bf16=False, save_strategy="no", max_length=32, disable_tqdm=True, seed=0,
        optim=optim, lr_scheduler_type="constant",
    )
    torch.manual_seed(0)
    trainer = SFTTrainer(
        model=load_4bit(base_dir), args=args, train_dataset=Dataset.from_dict({"text": toy_texts(32)}),
        processing_class=word_tokenizer(toy_texts(64)),
        peft_config=GateRAConfig(r=8, target_modules=LLAMA_PROJECTIONS, gate_lr_ratio=3.0),
    )
    gates_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "gatera_gate" in n}
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # (inside accelerate's wrapper)
    assert type(optimizer).__module__.startswith("bitsandbytes"), type(optimizer)
    assert gate_group_rates(optimizer, trainer.model) == {True: {3e-2}, False: {1e-2}}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(map(math.isfinite, losses)) and sum(losses[-3:]) < sum(losses[:3]), losses
    moved = {n: (p.detach() - gates_before[n]).abs().max().item()
             for n, p in trainer.model.named_parameters() if n in gates_before}
    assert min(moved.values()) > 0, moved


@pytest.mark.slow  # ~70 s: dynamo traces the whole model four times
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("branch", ["hira", "dora"])
def test_torch_compile_of_a_quantised_model_trains_like_eager(base_dir, bits, branch):
    """`torch.compile` of a 4-bit model with the HiRA branch hit a RecursionError while dynamo traced bitsandbytes'
    weight; the quantised weight is now read eagerly, and the compiled step equals the eager one."""
    input_ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))

    def step(compiled: bool):
        torch.manual_seed(0)
        config = GateRAConfig(r=4, branch=branch, target_modules=LLAMA_PROJECTIONS, init_weights=False,
                              entropy_weight=0.1)
        model = get_peft_model(load_4bit(base_dir, bits=bits), config).train()
        run = torch.compile(model, backend="aot_eager") if compiled else model
        loss = run(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = step(False), step(True)
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert compiled_grads.keys() == eager_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
