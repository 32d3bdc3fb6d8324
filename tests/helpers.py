"""Tiny models, tokenizers and naive reference implementations shared by the tests."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from gatera_plugin.penalty import ENTROPY_EPS

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # every Linear of a block


def tiny_llama_config(
    hidden: int = 32, layers: int = 2, vocab: int = 128, intermediate: int = 64, init_std: float = 0.02,
    max_positions: int = 256, tied: bool = False,
):
    """The LlamaConfig of `tiny_llama` (and of `tiny_llama_classifier`); `tied`: the output head is the input
    embedding (`tie_word_embeddings`, as SmolLM2, Llama 3.2 and Qwen2.5's small models)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=init_std,
        tie_word_embeddings=tied,
    )


def tiny_llama(
    hidden: int = 32, layers: int = 2, vocab: int = 128, intermediate: int = 64, seed: int = 0, init_std: float = 0.02,
    max_positions: int = 256, tied: bool = False,
):
    """A randomly initialised LlamaForCausalLM small enough for CPU tests (`tied`: see `tiny_llama_config`).

    `init_std` is the weights' standard deviation; HiRA's update is proportional to W0, so end-to-end training tests
    use a larger one (closer to a pretrained model's scale) to learn in few steps.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(hidden, layers, vocab, intermediate, init_std, max_positions, tied))


def tiny_llama_classifier(num_labels: int = 1, seed: int = 0):
    """`tiny_llama`'s architecture as a LlamaForSequenceClassification (a reward model when num_labels = 1), with a
    newly initialised `score` head."""
    from transformers import LlamaForSequenceClassification

    config = tiny_llama_config()
    config.num_labels = num_labels
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


def tiny_gpt2(hidden: int = 32, layers: int = 2, vocab: int = 128, seed: int = 0):
    """A randomly initialised GPT2LMHeadModel (its projections are transformers' transposed `Conv1D`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


# GateRA's DoRA tensors -> PEFT's `LoraConfig(use_dora=True)` names, for `copy_adapter_weights`
PEFT_DORA_NAMES = {"gatera_A.default": "lora_A.default.weight", "gatera_B.default": "lora_B.default.weight",
                   "gatera_magnitude.default": "lora_magnitude_vector.default.weight"}


def copy_adapter_weights(src_model, dst_model, mapping: dict[str, str]) -> None:
    """Copy adapter tensors between two PEFT models whose parameter names differ by `mapping` substrings."""
    dst = dict(dst_model.named_parameters())
    with torch.no_grad():
        for name, param in src_model.named_parameters():
            target = name
            for old, new in mapping.items():
                target = target.replace(old, new)
            if target != name:
                dst[target].copy_(param.reshape(dst[target].shape))


def randomize_adapters(model, scale: float = 0.2, adapter_name: str | None = None):
    """Give every GateRA tensor (of one adapter, or all) N(0, scale) values, as after training; returns the model."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gatera_" in name and (adapter_name is None or f".{adapter_name}." in name + "."):
                param.normal_(0, scale)
    return model


def eval_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, vocab) logits in eval mode, without autograd."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# Tolerances of the numerics checks (tests/test_ops.py, test_dtype.py, test_kernels.py, bench/gpu_check.py). In fp32
# a result must match the naive fp32 reference within these (gradients sum over more terms, hence the looser rtol)...
FP32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
FP32_GRAD_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def rounding_bound(naive: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, scale=None) -> float:
    """...in bf16 / fp16, its error against the higher-precision `truth` may be at most twice the naive reference's
    error in the same dtype (Liger-Kernel's convention: round no worse than plain autograd does), plus two units of
    the dtype's resolution at truth's scale (a scalar gradient, such as the gate bias, is one rounded number: 1 ulp
    for the reference and 2 for us is luck of the summation order, not a bug). `scale` replaces truth's scale for
    a sum whose terms cancel (its rounding error grows with Σ|terms|, not with the sum)."""
    scale = truth.abs().max().item() if scale is None else scale
    return 2 * max_error(naive, truth) + 2 * torch.finfo(dtype).eps * scale


def within_tolerance(ours: torch.Tensor, naive: torch.Tensor, truth: torch.Tensor, grad: bool = False,
                     scale=None) -> tuple:
    """(passed, error against truth, bound) for a result `ours` in its dtype, by the rules above."""
    error = max_error(ours, truth)
    if ours.dtype in (torch.float16, torch.bfloat16):
        bound = rounding_bound(naive, truth, ours.dtype, scale)
        return error <= bound, error, bound
    tol = FP32_GRAD_TOLERANCE if grad else FP32_TOLERANCE
    passed = torch.allclose(ours.double(), naive.double(), **tol)
    return passed, error, tol["atol"] + tol["rtol"] * truth.abs().max().item()


def naive_gated_hira(x, W0, A, B, gate_w, gate_b, scaling=1.0):
    """Reference: s · σ(x·w + b) ⊙ (x (W0 ⊙ BA)ᵀ), plain autograd."""
    g = torch.sigmoid(x @ gate_w.t() + gate_b) if gate_w is not None else None
    out = x @ (W0 * (B @ A)).t()
    return scaling * (g * out if g is not None else out)


def naive_gated_lora(x, A, B, gate_w, gate_b, scaling=1.0):
    g = torch.sigmoid(x @ gate_w.t() + gate_b) if gate_w is not None else None
    out = (x @ A.t()) @ B.t()
    return scaling * (g * out if g is not None else out)


def naive_entropy(g):
    """H(g)/log 2 with the same clamp as the package, written independently."""
    g = g.clamp(ENTROPY_EPS, 1 - ENTROPY_EPS)
    return -(g * torch.log(g) + (1 - g) * torch.log(1 - g)) / math.log(2)


def collect_gates(model) -> tuple[list, list]:
    """Register hooks recording every GateRA gate output (with graph) during the next forward; returns (gates, handles)."""
    from gatera_plugin.gates import SigmoidGate

    gates, handles = [], []
    for module in model.modules():
        if isinstance(module, SigmoidGate):
            handles.append(module.register_forward_hook(lambda m, i, o: gates.append(o)))
    return gates, handles


def gate_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "gatera_gate" in n}


def gate_group_rates(optimizer, model) -> dict[bool, set[float]]:
    """{is a gate group: its learning rates} over `optimizer`'s param groups; asserts that no group mixes GateRA's
    gate parameters with the rest (a mixed group would train the gates at the wrong rate). Gates are found by name,
    independently of the package's own `gate_parameter_ratios`."""
    gates = {id(p) for n, p in model.named_parameters() if "gatera_gate" in n or "gatera_structure" in n}
    rates = {True: set(), False: set()}
    for group in optimizer.param_groups:
        kinds = {id(p) in gates for p in group["params"]}
        assert len(kinds) == 1, "a param group mixes gate parameters with the rest"
        rates[kinds.pop()].add(round(group["lr"], 12))
    return rates


def backbone(peft_model) -> nn.Module:
    """transformers' backbone (e.g. LlamaModel): every forward of the model, or of the backbone alone, passes here."""
    return peft_model.get_base_model().base_model


class FirstStepCapture(TrainerCallback):
    """Keeps a copy of the model at the start of training, the inputs of the first optimisation step's forwards with
    gradient (recorded at the backbone), and the gate gradients accumulated over that step, just before the optimizer
    uses them: what `explicit_penalty_gradient` needs.

    `record_embeddings`: replace each forward's token ids by the embeddings its layers received (`inputs_embeds`), for
    trainers that change them on the way (NEFTune adds random noise after the embedding layer).
    """

    def __init__(self, record_embeddings: bool = False):
        self.start, self.inputs, self.grads, self._hooks = None, [], None, []
        self.record_embeddings, self._embeddings = record_embeddings, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = copy.deepcopy(model)

        def record(module, a, kw):
            if torch.is_grad_enabled() and module.training:  # the forward's keyword arguments, to replay it
                inputs = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
                if a:
                    inputs["input_ids"] = a[0].detach().clone()
                self.inputs.append(inputs)

        def record_embeddings(module, a, output):  # after hooks registered before this one (NEFTune's)
            if torch.is_grad_enabled() and module.training:
                self._embeddings.append(output.detach().clone())

        self._hooks = [backbone(model).register_forward_pre_hook(record, with_kwargs=True)]
        if self.record_embeddings:
            self._hooks.append(backbone(model).get_input_embeddings().register_forward_hook(record_embeddings))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in gate_params(model).items()}
            for hook in self._hooks:
                hook.remove()
            if self.record_embeddings:  # (`embeddings_changed`: how far they are from the token ids' embeddings)
                assert len(self._embeddings) == len(self.inputs)
                embed = backbone(self.start).get_input_embeddings()
                self.embeddings_changed = 0.0
                for inputs, embeddings in zip(self.inputs, self._embeddings):
                    with torch.no_grad():
                        clean = torch.nn.functional.embedding(inputs.pop("input_ids"), embed.weight)
                    self.embeddings_changed = max(self.embeddings_changed, (embeddings - clean).abs().max().item())
                    inputs["inputs_embeds"] = embeddings


def real_tokens(inputs: dict) -> torch.Tensor:
    """(B, T) bool: the positions of a forward's inputs that the penalty counts, by the package's rule (a 2D
    attention mask's nonzero entries, which Axolotl's packed rows number 1, 2, ...; else every position but the
    position ids 0 that end a padding-free row padded to a multiple)."""
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask != 0
    reference = inputs.get("input_ids")
    if reference is None:
        reference = inputs["inputs_embeds"][..., 0]
    real = torch.ones(reference.shape, dtype=torch.bool)
    positions = inputs.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.shape == reference.shape and positions.dim() == 2:
        for row in range(positions.shape[0]):
            if (positions[row] > 0).any():
                end = positions.shape[1]
                while positions[row, end - 1] == 0:
                    end -= 1
                real[row, end:] = False
    return real


def explicit_penalty_gradient(capture: FirstStepCapture, weight: float, per_forward: bool = False,
                              masks: list | None = None) -> dict:
    """∇ of `weight` · mean over gated layers of the token mean of H(g)/log 2 over the first step's forwards, by plain
    autograd from the weights at the start of training (the naive reference for the injected penalty gradient).

    Step level: one token mean over all the step's forwards. Per forward: the mean over forwards of each forward's
    token mean. `masks`: each forward's real tokens (B, T), where its inputs do not say (default: `real_tokens`).
    """
    model = capture.start
    for config in model.peft_config.values():
        config.entropy_weight = 0.0  # no injected gradient in the reference
    if getattr(model.get_base_model(), "is_gradient_checkpointing", False):
        model.get_base_model().gradient_checkpointing_disable()  # reentrant checkpointing records gates without graph
    model.train()
    params = gate_params(model)
    masks = [real_tokens(inputs) for inputs in capture.inputs] if masks is None else [m != 0 for m in masks]
    counts = [mask.sum() for mask in masks]
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for inputs, mask, count in zip(capture.inputs, masks, counts):  # each forward's term, its backward right after
        gates, handles = collect_gates(model)
        backbone(model)(**inputs)
        for handle in handles:
            handle.remove()
        m = mask.reshape(-1).float()
        sums = torch.stack([(naive_entropy(g.reshape(-1)) * m).sum() for g in gates])  # (layers,)
        normaliser = count * len(counts) if per_forward else sum(counts)
        term = weight * (sums / normaliser).mean()
        for name, grad in zip(params, torch.autograd.grad(term, list(params.values()))):
            total[name] += grad
    return total


class OffloadingCheckpoint(torch.autograd.Function):
    """A checkpoint in the style of Axolotl's `activation_offloading: legacy` (and Unsloth's): runs the layer without
    gradient, keeps only its input, and reruns it inside its own backward."""

    @staticmethod
    def forward(ctx, function, hidden_states, *args):
        with torch.no_grad():
            output = function(hidden_states, *args)
        ctx.save_for_backward(hidden_states)
        ctx.function, ctx.args = function, args
        return output

    @staticmethod
    def backward(ctx, grad):
        (hidden_states,) = ctx.saved_tensors
        hidden_states = hidden_states.detach().requires_grad_()
        with torch.enable_grad():
            output = ctx.function(hidden_states, *ctx.args)
        torch.autograd.backward(output[0] if isinstance(output, tuple) else output, grad)
        return (None, hidden_states.grad) + (None,) * len(ctx.args)


def offloading_checkpoint(function, *args, use_reentrant=None):
    """A `_gradient_checkpointing_func` that, like Axolotl's offloading ones, finds the layer in the partial that
    transformers' checkpointed layers pass: `partial(layer.__call__, **kwargs)` up to transformers 5.2x (Axolotl reads
    `function.func.__self__`), `partial(type(layer).forward, layer, **kwargs)` in later releases."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layer = getattr(function.func, "__self__", None) or function.args[0]
    assert isinstance(layer, GradientCheckpointingLayer)
    return OffloadingCheckpoint.apply(function, *args)


class TwoLinear(nn.Module):
    """A model of two linears (the second on the first's output) for layer-level tests."""

    def __init__(self, d_in=12, d_hidden=20, d_out=8, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(d_in, d_hidden, bias=bias)
        self.lin1 = nn.Linear(d_hidden, d_out, bias=bias)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def word_tokenizer(texts, vocab_size: int = 128):
    """An offline word-level tokenizer (pad=0, bos=1, eos=2, unk=3) over the words of `texts`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words[: vocab_size - len(SPECIAL_TOKENS)]:
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


BYTE_LEVEL_VOCAB = 320  # a model vocabulary that holds `byte_level_tokenizer`'s 300 ids


def byte_level_tokenizer(texts, vocab_size: int = 300):
    """An offline byte-level BPE tokenizer (pad=0, bos=1, eos=2, unk=3; 256 byte ids, merges up to `vocab_size`)
    trained on `texts`: the kind of tokenizer (GPT-2's, Llama 3's, SmolLM's) that TRL's GOLDTrainer requires."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def toy_texts(n: int = 32, seed: int = 0) -> list[str]:
    """Short, learnable sentences of varying length ("count up from k": 'three four five six')."""
    numbers = "zero one two three four five six seven eight nine ten eleven twelve".split()
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        start = int(torch.randint(0, 6, (1,), generator=g))
        length = int(torch.randint(3, 8, (1,), generator=g))
        texts.append("count " + " ".join(numbers[start : start + length]))
    return texts


def one_step_output_change(config, lr: float = 1e-3) -> float:
    """‖Δlogits‖ / ‖logits‖ after one Adam step (lr) from a PEFT config's init, on a fixed batch, with a Llama whose
    weights have a pretrained model's scale (std 0.02): how far one step at a given learning rate moves the model."""
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(hidden=64, intermediate=128, init_std=0.02, seed=0), config)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    return ((after - before).norm() / before.norm()).item()


def load_4bit(path, compute_dtype=torch.float32, bits: int = 4, device: str = "cpu", double_quant: bool = False,
              quant_storage=torch.uint8):
    """The causal LM saved at `path`, quantised by bitsandbytes on load: NF4 (`bits=4`, `double_quant` as QLoRA's
    `bnb_4bit_use_double_quant`) or LLM.int8 (`bits=8`)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_storage=quant_storage,
        )
    kwargs = {"dtype": compute_dtype} if compute_dtype != torch.float32 else {}
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map={"": str(device)},
                                                **kwargs)


def texts_of_unequal_length() -> list[str]:
    """Four toy sequences of 2-8 words: batches of them have padding, so token counts differ from positions."""
    return ["count one two", "count three four five six seven eight nine", "count two three four five", "count six"]


def multipack_collator(tokenizer, rows: int = 2, pad_to_multiple_of: int = 16, positions_of_padding: str = "zeros"):
    """Packs each micro-batch into `rows` rows as Axolotl's `sample_packing` collator does: `attention_mask` numbers
    the sequences of a row 1, 2, ... (0 is padding), `position_ids` restart at each sequence, and the rows are padded
    to a multiple of `pad_to_multiple_of`; the padding's position ids are 0 ("zeros") or 0, 1, ... ("range", as
    Axolotl's `DataCollatorForSeq2Seq` pads them)."""

    def collate(features):
        packed = []
        for row in (features[i::rows] for i in range(rows)):
            ids = [t for f in row for t in f["input_ids"]]
            mask = [k + 1 for k, f in enumerate(row) for _ in f["input_ids"]]
            positions = [p for f in row for p in range(len(f["input_ids"]))]
            packed.append((ids, mask, positions))
        width = -(-max(len(ids) for ids, _, _ in packed) // pad_to_multiple_of) * pad_to_multiple_of

        def padded(index, fill):
            return torch.tensor([p[index] + [fill] * (width - len(p[index])) for p in packed])

        input_ids, attention_mask = padded(0, tokenizer.pad_token_id), padded(1, 0)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        if positions_of_padding == "range":
            position_ids = torch.tensor([p[2] + list(range(width - len(p[2]))) for p in packed])
        else:
            position_ids = padded(2, 0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "labels": labels}

    return collate


def plain_trainer(tmp_path, texts, entropy_weight: float, batch: int, accum: int, collator=None,
                  target_modules=LLAMA_PROJECTIONS):
    """A transformers `Trainer` (not TRL's) for one step of a gated tiny LLaMA on `texts`, logging every step.

    `collator`: a function of the tokenizer that builds the data collator (default: causal LM with padding)."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from gatera_plugin import GateRAConfig

    tokenizer = word_tokenizer(toy_texts(64))
    torch.manual_seed(0)
    config = GateRAConfig(
        r=4, target_modules=target_modules, init_weights=False, gate_bias_init=0.8, entropy_weight=entropy_weight
    )
    model = get_peft_model(tiny_llama(), config)
    dataset = Dataset.from_dict({"text": texts}).map(lambda e: tokenizer(e["text"]), remove_columns=["text"])
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=1,
        learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no", max_grad_norm=0.0, seed=0,
        disable_tqdm=True, logging_steps=1,
    )
    collate = collator(tokenizer) if collator else DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)


MATRIX_PRODUCTS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default})


class RecordOps(TorchDispatchMode):
    """Records (shapes, dtypes) of the tensor operands of every call of `ops` (ATen overloads) run inside it, backward
    included, in `calls`. A dispatch mode, not module hooks (which would keep a GateRA layer from folding)."""

    def __init__(self, ops=MATRIX_PRODUCTS):
        super().__init__()
        self.ops = ops
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.ops:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.calls.append(([tuple(t.shape) for t in tensors], [t.dtype for t in tensors]))
        return func(*args, **(kwargs or {}))
