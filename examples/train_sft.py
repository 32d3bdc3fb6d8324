"""Fine-tune a causal LM with GateRA through TRL's SFTTrainer: the script the launch recipes in integrations/ run.

Single process (CPU or one GPU):
    python examples/train_sft.py --model PATH_OR_tiny --output-dir out
DeepSpeed on one machine (N GPUs, or N CPU processes with DS_ACCELERATOR=cpu):
    torchrun --nproc_per_node N examples/train_sft.py --deepspeed integrations/deepspeed/zero3.json ...
    deepspeed --num_gpus N examples/train_sft.py --deepspeed integrations/deepspeed/zero2.json ...
Several machines: see integrations/README.md (accelerate config per node, or `deepspeed --hostfile`).

Data: a JSONL file of {"prompt", "completion"} rows (default: examples/data/elements.jsonl, its "train" split);
loss on the completion only. On the main process the run's log history is written to <output-dir>/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

sys.path.insert(0, str(Path(__file__).parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny",
                        help="model folder or Hub id, or 'tiny' (a small random Llama, offline)")
    parser.add_argument("--data", default=None, help="JSONL with prompt/completion (default: the bundled elements)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON (integrations/deepspeed/)")
    parser.add_argument("--fsdp", type=int, choices=(1, 2), default=None,
                        help="shard with PyTorch FSDP of this version (2: fully_shard) through accelerate")
    parser.add_argument("--fsdp-activation-checkpointing", action="store_true",
                        help="FSDP's own activation checkpointing (fsdp_config activation_checkpointing)")
    parser.add_argument("--context-parallel", type=int, default=1,
                        help="split each sequence across this many ranks (torch context parallelism; needs --fsdp 2)")
    parser.add_argument("--sequence-parallel", type=int, default=1,
                        help="split each sequence across this many ranks (DeepSpeed Ulysses; needs --deepspeed)")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=64,
                        help="tokens per example, longer ones cut (64 fits the bundled data; raise it for yours)")
    parser.add_argument("--max-grad-norm", type=float, default=0.0,
                        help="gradient clipping (0: off, as the tests compare runs exactly; 1.0 is the usual)")
    parser.add_argument("--batch", type=int, default=4, help="per-device micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optim", default="adamw_torch", help="the Trainer's `optim` (e.g. sgd)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--gate", default="sigmoid")
    parser.add_argument("--branch", default="hira")
    parser.add_argument("--entropy-weight", type=float, default=None)
    parser.add_argument("--gate-lr-ratio", type=float, default=None, help="the gates' learning rate / --lr")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only the end)")
    parser.add_argument("--resume", default=None, help="checkpoint folder to resume from, or 'last'")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--reentrant", action="store_true", help="reentrant gradient checkpointing (TRL's default: not)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--load-in-4bit", action="store_true", help="quantise the base with bitsandbytes (QLoRA)")
    parser.add_argument("--cpu", action="store_true", help="train on CPU (with DeepSpeed: DS_ACCELERATOR=cpu, gloo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = parser.parse_args(argv)
    if args.model == "tiny":  # (nothing to download; a Hub id in --model downloads as transformers does)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        parser.error(f"--output-dir {out} is a file; pass a folder.")
    # (the folders the Trainer resumes from: checkpoint-<step>, as transformers' get_last_checkpoint finds them)
    checkpoints = [p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)] \
        if out.is_dir() else []
    if args.resume is None and (out / "adapter_config.json").exists():  # (the end of a run saves the adapter there)
        hint = (", or --resume last to continue that run from its last checkpoint" if checkpoints else
                " (it holds no checkpoint-* folder to resume from: --save-steps N saves them)")
        parser.error(f"--output-dir {out} holds a trained adapter (adapter_config.json) that this run would replace; "
                     f"pass a new folder{hint}.")
    if args.resume is None and checkpoints:  # (a run stopped before its end: a crash, a preempted job)
        last = max(checkpoints, key=lambda path: int(path.name.removeprefix("checkpoint-"))).name
        parser.error(f"--output-dir {out} holds {last} of an earlier run that this run would overwrite; pass --resume "
                     "last to continue that run, or a new folder.")
    if args.resume == "last" and not checkpoints:
        parser.error(f"--resume last: --output-dir {out} holds no checkpoint-* folder to resume from (a run saves "
                     "them with --save-steps N); pass a checkpoint folder, or leave --resume out to start anew in a "
                     "new folder.")
    if args.data is not None:
        from common import read_jsonl

        try:
            rows = read_jsonl(Path(args.data))
        except (OSError, ValueError) as error:  # (a missing file, a row that is not a prompt/completion object)
            parser.error(f"--data: {error}")
        if args.model == "tiny" and not isinstance(rows[0]["prompt"], str):
            parser.error("--data holds conversational rows, which need a model whose tokenizer has a chat template; "
                         "--model tiny has none: pass --model PATH.")
    if args.max_grad_norm < 0 or args.max_length < 1:
        parser.error("--max-grad-norm must be >= 0 (0: no clipping) and --max-length >= 1.")
    return args


def build_trainer(args: argparse.Namespace, callbacks=()):
    import torch
    from accelerate.utils import str_to_bool
    from common import DATA, load_rows, tiny_model_and_tokenizer
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    import gatera_plugin
    from gatera_plugin.fsdp import requested_fsdp_version

    if args.deepspeed and args.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        # with use_cpu, transformers would otherwise set up partitioning for a world of one process
        deepspeed.init_distributed(dist_backend="gloo")
    parallelism, pad_to_multiple_of = None, None
    if args.context_parallel > 1 and args.sequence_parallel > 1:
        raise SystemExit("--context-parallel and --sequence-parallel split the sequences two ways: choose one")
    if args.context_parallel > 1:
        if args.fsdp != 2:
            raise SystemExit("--context-parallel needs --fsdp 2 (accelerate runs context parallelism on FSDP2 only)")
        from accelerate import ParallelismConfig

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        parallelism = ParallelismConfig(dp_shard_size=world_size // args.context_parallel,
                                        cp_size=args.context_parallel)
        pad_to_multiple_of = 2 * args.context_parallel  # 2 chunks per rank, for causal load balance
    if args.sequence_parallel > 1:
        if not args.deepspeed:
            raise SystemExit("--sequence-parallel needs --deepspeed (accelerate runs Ulysses on DeepSpeed only)")
        from accelerate import ParallelismConfig
        from accelerate.utils import DeepSpeedSequenceParallelConfig

        parallelism = ParallelismConfig(sp_backend="deepspeed", sp_size=args.sequence_parallel,
                                        sp_handler=DeepSpeedSequenceParallelConfig(
                                            sp_seq_length_is_variable=True, sp_attn_implementation="sdpa"))
        pad_to_multiple_of = args.sequence_parallel  # DeepSpeed's Ulysses needs sp_size | sequence length
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=1, report_to="none", save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500, seed=args.seed, data_seed=args.seed, deepspeed=args.deepspeed,
        fsdp=bool(args.fsdp),
        fsdp_config={"version": args.fsdp, "activation_checkpointing": args.fsdp_activation_checkpointing}
        if args.fsdp else None,
        use_cpu=args.cpu, ddp_backend="gloo" if args.cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        bf16=args.bf16, fp16=False,
        gradient_checkpointing=args.gradient_checkpointing, max_length=args.max_length,
        gradient_checkpointing_kwargs={"use_reentrant": True} if args.reentrant else None, disable_tqdm=True,
        max_grad_norm=args.max_grad_norm,
        # under DDP, transformers turns find_unused_parameters off for checkpointed models, but not for a PEFT model
        # (any adapter: LoRA's too), and reentrant checkpointing then fails ("marked as ready twice")
        ddp_find_unused_parameters=False if args.gradient_checkpointing else None,
        optim=args.optim, save_only_model=False, parallelism_config=parallelism, pad_to_multiple_of=pad_to_multiple_of,
    )
    data = Path(args.data) if args.data else DATA
    model_path = args.model
    if args.model == "tiny":
        model, tokenizer = tiny_model_and_tokenizer(data)
        if args.load_in_4bit:  # quantising needs a checkpoint to load from
            model_path = str(Path(args.output_dir) / "tiny-base")
            if int(os.environ.get("RANK", "0")) == 0:
                model.save_pretrained(model_path)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.model != "tiny" or args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        # FSDP shards only floating-point storage: pack the 4-bit bytes in bf16 under --fsdp or an accelerate config
        sharded = args.fsdp is not None or requested_fsdp_version(config) is not None
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_quant_storage=torch.bfloat16 if sharded else torch.uint8,
        ) if args.load_in_4bit else None
        device_map = "cpu" if args.cpu and args.load_in_4bit and not args.deepspeed else None
        kernels = {}
        if str_to_bool(os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")) and not args.load_in_4bit:
            # FSDP's cpu_ram_efficient_loading: local rank 0 loads, FSDP2 broadcasts rank 0's weights to the others.
            # transformers >= 5.25 swaps in Hub kernels by default, which cannot handle the meta device: off on every
            # rank, so that all run the same layers
            kernels = {"use_kernels": False}
            if int(os.environ.get("LOCAL_RANK", "0")) != 0:
                device_map = "meta"
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.bfloat16 if args.bf16 else torch.float32, quantization_config=quantization,
            device_map=device_map, **kernels,
        )
    options = {"entropy_weight": args.entropy_weight, "gate_lr_ratio": args.gate_lr_ratio}
    extra = {key: value for key, value in options.items() if value is not None}
    peft_config = gatera_plugin.GateRAConfig(r=args.r, target_modules=TARGETS, gate=args.gate, branch=args.branch,
                                             **extra)
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(load_rows("train", data)),
                      processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))


def main(argv=None, callbacks=()) -> None:
    args = parse_args(argv)
    trainer = build_trainer(args, callbacks)
    resume = args.resume
    if resume == "last":
        resume = True
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        metrics = {"log_history": trainer.state.log_history, "world_size": trainer.accelerator.num_processes}
        (Path(args.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    # Every rank waits for rank 0's files, then the process group is torn down before interpreter exit: left to exit,
    # a DeepSpeed ZeRO-3 rank occasionally aborted ("terminate called without an active exception").
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # = `Trainer.end()` of newer transformers (5.0 lacks it)


if __name__ == "__main__":
    main()
