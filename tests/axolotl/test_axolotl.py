"""`adapter: gatera` through the real `axolotl` CLI on CPU, in the Axolotl environment (.venv-axolotl, see README).

Each run trains the tiny offline model of examples/common.py on the bundled data (alpaca format) and a test-only
plugin (probe_plugin.py, listed under `plugins:`) records the trained model's outputs on fixed inputs, so that the
saved adapter can be checked to reproduce them.
"""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("axolotl")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
BIN = Path(sys.executable).parent
PROBE = "tests.axolotl.probe_plugin.ProbePlugin"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny base model folder and the bundled data as an alpaca JSONL."""
    from common import load_rows, tiny_model_and_tokenizer

    root = tmp_path_factory.mktemp("axolotl")
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    with open(root / "data.jsonl", "w") as f:
        for row in load_rows("train"):
            instruction = row["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:")
            f.write(json.dumps({"instruction": instruction, "input": "", "output": row["completion"].strip()}) + "\n")
    return root


@pytest.fixture(scope="module")
def preference_data(workspace):
    """Eight questions of the bundled data, for `rl:` runs: preference pairs (chosen: the row's answer; rejected: the
    answer to one of eight other questions), as DPO's prompt/chosen/rejected rows and as ORPO's chats, KTO's labelled
    answers, and GRPO's prompts; a set small enough to be learnt in a few epochs."""
    from common import load_rows

    rows = [(r["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:"), r["completion"].strip())
            for r in load_rows("train")[:16]]
    paths = {rl: workspace / f"{rl}.jsonl" for rl in ("dpo", "kto", "grpo", "orpo")}
    with open(paths["dpo"], "w") as pairs, open(paths["kto"], "w") as kto, open(paths["grpo"], "w") as prompts, \
            open(paths["orpo"], "w") as chats:
        for (question, answer), (_, wrong) in zip(rows[:8], rows[8:]):
            pairs.write(json.dumps({"prompt": question, "chosen": answer, "rejected": wrong}) + "\n")
            chats.write(json.dumps({side: [{"role": "user", "content": question},
                                           {"role": "assistant", "content": reply}]
                                    for side, reply in (("chosen", answer), ("rejected", wrong))}) + "\n")
            for completion, label in ((answer, True), (wrong, False)):
                kto.write(json.dumps({"instruction": question, "completion": completion, "label": label}) + "\n")
            prompts.write(json.dumps({"prompt": question}) + "\n")
    return paths


EXAMPLES = ROOT / "integrations" / "axolotl"
CPU_TEST_SETTINGS = {  # what every test changes in the shipped YAMLs: local tiny model and data, CPU, short runs
    "sequence_len": 64,
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_steps": 25,
    "learning_rate": 0.01,
    "optimizer": "adamw_torch",
    "lr_scheduler": "constant",
    "warmup_ratio": None,
    "num_epochs": None,
    "bf16": False,
    "fp16": False,
    "tf32": False,
    "logging_steps": 1,
    "save_strategy": "no",
    "save_steps": None,
    "val_set_size": 0,
    "seed": 0,
    "gatera_entropy_weight": 0.05,
}


def _config(workspace, name, example="gatera.yml", **overrides) -> Path:
    """One of integrations/axolotl/*.yml with the local tiny model and data, CPU-test settings and `overrides`."""
    cfg = yaml.safe_load((EXAMPLES / example).read_text())
    cfg.update(CPU_TEST_SETTINGS)
    cfg.update(
        base_model=str(workspace / "base"),
        datasets=[{"path": str(workspace / "data.jsonl"), "type": "alpaca"}],
        dataset_prepared_path=str(workspace / "prepared"),
        output_dir=str(workspace / name),
        plugins=[PROBE],
    )
    if cfg.get("deepspeed"):
        cfg["deepspeed"] = str(ROOT / cfg["deepspeed"])
    cfg.update(overrides)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = workspace / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _env(**extra):
    env = dict(os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               LOG_LEVEL="INFO", PYTHONPATH=str(ROOT), PATH=f"{BIN}:{os.environ['PATH']}", DS_ACCELERATOR="cpu")
    env.pop("TRITON_INTERPRET", None)
    env.update(extra)
    return env


def _axolotl(*args, stdin=None, runner=None, timeout=900, **env) -> subprocess.CompletedProcess:
    command = [str(BIN / "axolotl")] if runner is None else [sys.executable, str(runner)]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=_env(**env), cwd=ROOT,
                          timeout=timeout, input=stdin)


def _logged(output: str, key: str) -> list[float]:
    return [float(v) for v in re.findall(rf"'{re.escape(key)}': '?([-0-9.e]+)'?", output)]


def _logged_once(output: str, key: str, steps: int) -> list[float]:
    """`key`'s values of a run of `steps` logged steps, once each, also where every rank printed each log line (the
    values are the same, reduced across ranks)."""
    values = _logged(output, key)
    if len(values) == 2 * steps:
        assert values[::2] == values[1::2], values
        values = values[::2]
    assert len(values) == steps, (key, values)
    return values


def _assert_resumed_like_uninterrupted(full: str, part: str, full_dir: Path, part_dir: Path, steps: int, resumed: int):
    """The resumed run (log `part`) logs the uninterrupted run's (log `full`) losses and gate statistics for its last
    `resumed` of `steps` steps, and ends with the same adapter."""
    from safetensors.torch import load_file

    for key in ("loss", "gatera/entropy", "gatera/gate_mean"):
        torch.testing.assert_close(torch.tensor(_logged_once(part, key, resumed)),
                                   torch.tensor(_logged_once(full, key, steps)[steps - resumed:]),
                                   rtol=1e-3, atol=1e-5, msg=key)
    a, b = load_file(full_dir / "adapter_model.safetensors"), load_file(part_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def _ok(done):
    assert done.returncode == 0, (done.stdout[-4000:] + done.stderr[-6000:])


def _reload_logits(base_dir, adapter_dir, bits=0, factors_dtype=None, base_dtype=torch.float32, vocabulary=None,
                   trained_dtypes=None):
    """The saved adapter's logits on the probe's inputs; `bits`: on a full-precision (0), 4-bit or 8-bit base, as the
    run's `load_in_4bit` / `load_in_8bit` loaded it (an 8-bit one from fp16 values, as Axolotl does); `factors_dtype`:
    compute the branch factors in that dtype, as the trained model did (TRL casts a quantised model's trainable
    parameters to bf16, see tests/test_bnb.py); `base_dtype`: the dtype the run loaded the base in (`bf16: true`),
    also the 4-bit compute dtype and, other than fp32, the autocast dtype of the forward; `vocabulary`: the rows the
    run resized the embeddings to (new `tokens:`); `trained_dtypes`: the probe's {parameter: dtype} of the trained
    model, whose unquantised base parameters (norms, embeddings, head) are given those dtypes (the k-bit preparation
    and Axolotl's conversion back to `torch_dtype` decided them)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import gatera_plugin  # noqa: F401
    from tests.axolotl.probe_plugin import PROBE_INPUT

    kwargs = {}
    if bits == 4:
        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_use_double_quant=True,
                                                            bnb_4bit_quant_storage=torch.bfloat16,
                                                            bnb_4bit_compute_dtype=base_dtype),
                  "device_map": "cpu"}
    if bits == 8:  # Axolotl's torch_dtype for 8-bit without bf16 is fp16: the int8 weights come from fp16 values
        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": "cpu"}
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float16 if bits == 8 else base_dtype, **kwargs)
    if vocabulary is not None:
        base.resize_token_embeddings(vocabulary)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    for name, param in model.named_parameters():
        if factors_dtype is not None and (".gatera_A." in name or ".gatera_B." in name):
            param.data = param.data.to(factors_dtype)
        elif trained_dtypes and ".gatera_" not in name and type(param).__name__ not in ("Params4bit", "Int8Params"):
            # (the probe sees the base model itself where TRL built the adapter: its names lack PEFT's prefix)
            trained = trained_dtypes.get(name) or trained_dtypes[name.removeprefix("base_model.model.")]
            param.data = param.data.to(getattr(torch, trained.removeprefix("torch.")))
    autocast = torch.autocast("cpu", dtype=base_dtype, enabled=base_dtype != torch.float32)  # as the probe ran
    with torch.no_grad(), autocast:
        return model(input_ids=PROBE_INPUT).logits.float()


def _saved_gatera_adapter_reloads(out: Path, base_dir: Path, bits=0, factors_dtype=None) -> dict:
    """Check that run folder `out` holds a GateRA adapter, that GateRA layers trained, and that the adapter reloads
    to the trained model's logits (the probe's; `bits`, `factors_dtype`: see `_reload_logits`); return the probe."""
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "GATERA"
    probe = torch.load(out / "probe.pt")
    assert any("gatera_plugin" in t for t in probe["layer_types"])
    reloaded = _reload_logits(base_dir, out, bits, factors_dtype, trained_dtypes=probe["dtypes"] if bits else None)
    torch.testing.assert_close(reloaded, probe["logits"], rtol=1e-4, atol=1e-4)
    return probe


def _frozen_dtypes(probe: dict) -> set[str]:
    """Dtypes of the trained model's unquantised base parameters: its norms, embeddings and output head."""
    return {d for n, d in probe["dtypes"].items()
            if ".gatera_" not in n and any(part in n for part in ("norm", "embed_tokens", "lm_head"))}


def _train(workspace, name, example="gatera.yml", **overrides) -> str:
    """Run `axolotl train` once per name (later tests reuse the output folder and the log)."""
    log = workspace / f"{name}.log"
    if not log.exists():
        done = _axolotl("train", str(_config(workspace, name, example, **overrides)), "--launcher", "python")
        _ok(done)
        log.write_text(done.stdout + done.stderr)
    return log.read_text()


@pytest.mark.parametrize("bits", [0, 4, 8], ids=["full-precision", "4bit", "8bit"])
def test_train_loss_falls_metrics_logged_adapter_reloads(workspace, bits):
    """gatera.yml, gatera-qlora.yml (4-bit, with its own optimizer, bitsandbytes' `paged_adamw_8bit`, as most QLoRA
    recipes have one of bitsandbytes') and gatera.yml with `load_in_8bit: true` (in many of Axolotl's LoRA recipes;
    Axolotl builds no quantisation config for it outside `adapter: lora`, the plugin does)."""
    qlora_optimizer = yaml.safe_load((EXAMPLES / "gatera-qlora.yml").read_text())["optimizer"]
    name, example, overrides = {0: ("run-fp32", "gatera.yml", {}),
                                4: ("run-4bit", "gatera-qlora.yml", {"optimizer": qlora_optimizer}),
                                8: ("run-8bit", "gatera.yml", {"load_in_8bit": True})}[bits]
    output = _train(workspace, name, example=example, **overrides)
    expected_base = f"{bits}-bit (bitsandbytes)" if bits else "full-precision"
    assert f"GateRA on a {expected_base} base model" in output  # load_in_4bit / 8bit really quantise for gatera
    losses = _logged(output, "loss")
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    for key in ("gatera/gate_mean", "gatera/entropy", "gatera/gate_open_frac", "gatera/penalty"):
        assert len(_logged(output, key)) == 25, key
    probe = _saved_gatera_adapter_reloads(workspace / name, workspace / "base", bits)
    assert probe["optimizer"].startswith("bitsandbytes." if bits == 4 else "torch."), probe["optimizer"]
    # norms, embeddings and head end in Axolotl's torch_dtype, as for qlora / lora (fp16 for 8-bit without bf16)
    assert _frozen_dtypes(probe) == {"torch.float16" if bits == 8 else "torch.float32"}


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["full-precision", "4bit"])
def test_bf16_run_trains_and_its_adapter_reloads_on_the_bf16_base(workspace, load_in_4bit):
    """`bf16: true`, what `bf16: auto` means on a GPU (on CPU the probe plugin adds `use_cpu`, which transformers
    needs for bf16 there), on a bf16 base and on a QLoRA base (gatera-qlora.yml: 4-bit, bf16 compute): GateRA's
    adapter stays fp32 (PEFT's default) and the forwards run under bf16 autocast. The loss falls, the penalty is
    logged at every step, and the saved (fp32) adapter on the same base reproduces the trained model's logits (under
    bf16 autocast, as the probe ran)."""
    name = "run-bf16-4bit" if load_in_4bit else "run-bf16"
    output = _train(workspace, name, example="gatera-qlora.yml" if load_in_4bit else "gatera.yml", bf16=True)
    assert f"GateRA on a {'4-bit (bitsandbytes)' if load_in_4bit else 'full-precision'} base model" in output
    if not load_in_4bit:
        assert "Converting modules to torch.bfloat16" in output  # the base really is bf16
    trained = torch.load(workspace / name / "probe.pt")["dtypes"]  # as the model trained:
    assert {d for n, d in trained.items() if ".gatera_" in n} == {"torch.float32"}  # the adapter in fp32,
    assert {d for n, d in trained.items() if n.endswith("base_layer.weight")} == {"torch.bfloat16"}  # the base bf16
    losses = _logged(output, "loss")
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert len(_logged(output, "gatera/penalty")) == 25 and "GateRA:" not in output
    from safetensors.torch import load_file

    saved = load_file(workspace / name / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    if load_in_4bit:  # as Axolotl's qlora leaves them (k-bit preparation, then the conversion back to bf16)
        assert _frozen_dtypes(torch.load(workspace / name / "probe.pt")) == {"torch.bfloat16"}
    reloaded = _reload_logits(workspace / "base", workspace / name, 4 if load_in_4bit else 0,
                              base_dtype=torch.bfloat16, trained_dtypes=trained)
    torch.testing.assert_close(reloaded, torch.load(workspace / name / "probe.pt")["logits"], rtol=1e-4, atol=1e-4)


def test_shipped_yaml_as_is_trains_evaluates_and_checkpoints(workspace):
    """integrations/axolotl/gatera.yml with only the model, the data and the run's length changed: its own settings
    (evaluation on a validation split, `bf16: auto`, `adamw_torch_fused`, a LoRA recipe's rate, gradient
    checkpointing, step checkpoints) train and evaluate, the checkpoints hold the adapter, and only the training logs
    carry the gate statistics."""
    cfg = yaml.safe_load((EXAMPLES / "gatera.yml").read_text())
    del cfg["num_epochs"]
    cfg.update(base_model=str(workspace / "base"), datasets=[{"path": str(workspace / "data.jsonl"), "type": "alpaca"}],
               dataset_prepared_path=str(workspace / "prepared"), output_dir=str(workspace / "shipped"),
               sequence_len=64, max_steps=6, logging_steps=1, val_set_size=0.1, eval_steps=3, save_steps=3)
    path = workspace / "shipped.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    done = _axolotl("train", str(path), "--launcher", "python")
    _ok(done)
    output = done.stdout + done.stderr
    logs = [line for line in output.splitlines() if line.startswith("{'")]
    evals = [line for line in logs if "'eval_loss'" in line]
    trains = [line for line in logs if "'loss'" in line]
    assert len(evals) == 3 and not any("gatera" in line for line in evals), evals
    assert len(trains) == 6 and all("'gatera/entropy'" in line for line in trains), trains
    for step in (3, 6):
        saved = json.loads((workspace / "shipped" / f"checkpoint-{step}" / "adapter_config.json").read_text())
        assert saved["peft_type"] == "GATERA"


def test_sample_packing_is_normalised_at_step_level(workspace):
    """`sample_packing: true`, as in most Axolotl recipes: Axolotl's multipack collator hands the model packed rows
    (position_ids restart per sequence), they train, and the step's real tokens counted from the batches are those
    the model saw (no mismatch warning, no switch to per-forward normalisation). In this run the rows' masks are 0/1
    (the probe records the largest value); rows whose mask numbers the sequences 1, 2, ..., as that collator does
    for a bin of several items, are checked against the explicit penalty in tests/test_trainer.py, with a collator
    that imitates it. As in most packing recipes the run evaluates on a validation split, unpacked
    (`eval_sample_packing: false`, which makes Axolotl keep unused columns in the training batches too)."""
    output = _train(workspace, "packed", sample_packing=True, micro_batch_size=2, max_steps=8, val_set_size=0.2,
                    eval_sample_packing=False, eval_strategy="steps", eval_steps=4)
    assert "Applying multipack dataloader patch for sample packing" in output
    evals = _logged(output, "eval_loss")  # (Axolotl also evaluates before the first step)
    assert len(evals) == 3 and evals[-1] < evals[0] and "GateRA:" not in output, evals
    probe = torch.load(workspace / "packed" / "probe.pt")
    assert probe["collator"] == "V2BatchSamplerDataCollatorForSeq2Seq" and probe["mask_max"] >= 1
    assert "real tokens" not in output and "cannot be counted in advance" not in output
    losses = _logged(output, "loss")
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    assert len(_logged(output, "gatera/entropy")) == 8


def test_selective_checkpointing_trains_with_the_step_level_penalty(workspace):
    """`selective_checkpointing: true` (Axolotl saves attention in each checkpointed layer and recomputes the rest,
    non-reentrant, through its own `context_fn`): the gated layers train with the penalty at its scale, and each
    step's forwards are counted once (no mismatch warning, no switch to per-forward normalisation)."""
    output = _train(workspace, "selective", gradient_checkpointing=True, selective_checkpointing=True, max_steps=8)
    assert "selective_checkpointing enabled" in output
    assert "GateRA:" not in output, output[output.index("GateRA:"):][:500]
    losses = _logged(output, "loss")
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    assert len(_logged(output, "gatera/entropy")) == 8
    assert all(0 < p <= 0.05 for p in _logged(output, "gatera/penalty"))  # λ · entropy, counted once


def test_liger_fused_linear_cross_entropy_trains_like_the_plain_loss(workspace):
    """Axolotl's LigerPlugin with `liger_fused_linear_cross_entropy: true`, as in many of Axolotl's recipes: the
    model's forward becomes Liger's, which computes the loss from the hidden states without materialising logits.
    GateRA's penalty (its taps add the gradient in backward) applies on top of that loss at its scale: the run logs
    the same losses and penalties, step by step, as the same run without Liger (test_train_loss_falls_metrics_logged_adapter_reloads[full-precision]), and its
    adapter reloads to the trained logits. Liger's RMSNorm, SwiGLU and RoPE kernels stay off: they do not run in
    Triton's CPU interpreter (they call `.to` on Python floats). None of them replaces a layer that GateRA adapts
    (Liger's SwiGLU MLP calls the same gate/up/down projections)."""
    pytest.importorskip("liger_kernel")
    reference = _train(workspace, "run-fp32")
    liger = {"liger_fused_linear_cross_entropy": True, "liger_rms_norm": False, "liger_glu_activation": False,
             "liger_rope": False}
    cfg = _config(workspace, "liger", plugins=[PROBE, "axolotl.integrations.liger.LigerPlugin"], **liger)
    done = _axolotl("train", str(cfg), "--launcher", "python", TRITON_INTERPRET="1")
    _ok(done)
    output = done.stdout + done.stderr
    assert "Applying LIGER to llama" in output
    probe = _saved_gatera_adapter_reloads(workspace / "liger", workspace / "base")
    assert probe["causal_lm_forward"].startswith("liger_kernel") and probe["training_logits"] is False
    for key in ("loss", "gatera/penalty", "gatera/gate_mean"):
        ours, plain = _logged(output, key), _logged(reference, key)
        assert len(ours) == len(plain) == 25, key
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(plain), rtol=2e-3, atol=1e-4, msg=key)


def test_lora_run_is_unaffected_by_the_installed_plugin(workspace):
    """The same `adapter: lora` run with and without gatera-plugin's entry point: identical losses, no gatera keys."""
    runs = {}
    for label, runner in (("with", None), ("without", ROOT / "tests" / "axolotl" / "run_without_gatera.py")):
        cfg = _config(workspace, f"lora-{label}", adapter="lora", lora_alpha=16, gatera_entropy_weight=None,
                      gradient_checkpointing=False,
                      lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False, lora_embedding_kernel=False,
                      max_steps=8)
        done = _axolotl("train", str(cfg), "--launcher", "python", runner=runner)
        _ok(done)
        output = done.stdout + done.stderr
        assert "gatera/" not in output
        assert ("GateRAPlugin" in output) == (label == "with")
        runs[label] = _logged(output, "loss")
    assert runs["with"] == runs["without"] and len(runs["with"]) == 8
    assert not any("gatera_plugin" in t for t in torch.load(workspace / "lora-with" / "probe.pt")["layer_types"])


def test_resume_from_lora_model_dir_and_inference(workspace):
    """`lora_model_dir` continues from a saved GateRA adapter; `axolotl inference` loads it through the plugin. Both
    YAMLs leave out the targets, as for LoRA: the saved adapter's govern (they were refused at config read)."""
    first = workspace / "run-fp32"
    fresh_losses = _logged(_train(workspace, "run-fp32"), "loss")
    output = _train(workspace, "resumed", lora_model_dir=str(first), max_steps=3, lora_target_modules=None)
    assert f"Loading GateRA adapter from {first}" in output
    resumed_losses = _logged(output, "loss")
    assert resumed_losses[0] < 0.8 * fresh_losses[0]  # it starts where the first run ended, not from scratch
    inference = _axolotl("inference", str(_config(workspace, "infer", lora_model_dir=str(first),
                                                   lora_target_modules=None)),
                         stdin="Tell me about the element Neon.\n", timeout=600)
    _ok(inference)
    assert f"Loading GateRA adapter from {first}" in inference.stdout + inference.stderr


def test_merge_lora_refused_for_gated_adapter(workspace):
    _train(workspace, "run-fp32")
    cfg = _config(workspace, "run-fp32")
    done = _axolotl("merge-lora", str(cfg), "--lora-model-dir", str(workspace / "run-fp32"))
    assert done.returncode != 0
    assert "`merge_lora` cannot be used with `adapter: gatera`" in done.stdout + done.stderr


def test_merge_lora_of_ungated_adapter_with_legacy_method(workspace):
    from transformers import AutoModelForCausalLM

    from tests.axolotl.probe_plugin import PROBE_INPUT

    overrides = dict(gatera_gate="none", gatera_entropy_weight=None, max_steps=5, merge_method="legacy")
    _train(workspace, "ungated", **overrides)
    _ok(_axolotl("merge-lora", str(_config(workspace, "ungated", **overrides))))
    merged = AutoModelForCausalLM.from_pretrained(workspace / "ungated" / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = merged(input_ids=PROBE_INPUT).logits
    torch.testing.assert_close(logits, torch.load(workspace / "ungated" / "probe.pt")["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"adapter": "lora", "lora_alpha": 16}, r"gatera_entropy_weight only apply with `adapter: gatera`"),
        ({"relora": True, "jagged_restart_steps": 10}, r"`relora` .* not supported with `adapter: gatera`"),
        ({"lora_mlp_kernel": True}, r"lora_mlp_kernel: Axolotl's LoRA Triton kernels .* cannot run GateRA"),
        ({"peft_use_dora": True}, r"`peft_use_dora` is a LoRA option .* `gatera_branch: dora`"),
        ({"gatera_gate": "softmax"}, r"gatera_gate"),
        ({"gatera_entropy_weight": -1}, r"gatera_entropy_weight"),
        ({"gatera_gate": "none", "gatera_entropy_weight": 0.1}, r"needs sigmoid token gates"),
        ({"gatera_entropy_wieght": 0.1}, r"`gatera_entropy_wieght` is not a GateRA setting: did you mean "
                                          r"`gatera_entropy_weight`\?"),
        # a QLoRA-FSDP recipe's loading (Axolotl's own messages sent the user to `adapter: qlora`)
        *[({"load_in_4bit": True, "fsdp_version": 2, "fsdp_config": {"cpu_ram_efficient_loading": True}, **extra},
           r"`fsdp_config.cpu_ram_efficient_loading: true` with `load_in_4bit`.*set `cpu_ram_efficient_loading: false`")
          for extra in ({}, {"qlora_sharded_model_loading": True})],
    ],
    ids=["keys-without-adapter", "relora", "lora-kernels", "dora-option", "unknown-gate", "negative-weight",
         "conflict", "misspelt-key", "4bit-cpu-ram-efficient-loading", "4bit-qlora-sharded-loading"],
)
def test_bad_configs_are_refused_clearly(workspace, overrides, message):
    done = _axolotl("train", str(_config(workspace, "bad", **overrides)), "--launcher", "python", timeout=300)
    assert done.returncode != 0
    assert re.search(message, done.stdout + done.stderr), (done.stdout + done.stderr)[-3000:]


def test_loraplus_is_refused_because_it_would_raise_the_gate_biases_rate_not_the_b_factors():
    """LoRA+ (PEFT's `create_loraplus_optimizer`, Axolotl's path for `loraplus_lr_ratio`) raises the rate of
    parameters named `lora_B` and of every 1-D parameter: on a GateRA model (checked with PEFT's own function) the B
    factors keep the base rate and the gate biases get the raised one. `loraplus_lr_ratio` with `adapter: gatera` is
    refused rather than silently doing that."""
    from peft import get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    from gatera_plugin import GateRAConfig
    from gatera_plugin.integrations.axolotl.args import GateRAArgs
    from tests.helpers import tiny_llama

    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    rates = {name: group["lr"] for group in optimizer.param_groups for name, param in model.named_parameters()
             if any(param is p for p in group["params"])}
    assert {r for n, r in rates.items() if ".gatera_B." in n} == {1e-3}
    assert {r for n, r in rates.items() if ".gatera_gate." in n and n.endswith(".bias")} == {16e-3}
    with pytest.raises(ValueError, match=r"`loraplus_lr_ratio`: LoRA\+ raises .* `lora_B`.* gate biases.* Remove it"):
        GateRAArgs.model_validate({"adapter": "gatera", "loraplus_lr_ratio": 16})
    GateRAArgs.model_validate({"adapter": "lora", "loraplus_lr_ratio": 16})


def test_one_cycle_with_a_gate_lr_ratio_is_refused_because_it_sets_one_rate_for_every_group():
    """Axolotl's `lr_scheduler: one_cycle` builds `OneCycleLR(optimizer, max_lr=learning_rate)`: one rate for every
    param group (checked with the same call), so the gates' ratio was cancelled silently. Refused with the ratio;
    alone, or with the schedulers that scale each group's own rate, it stays allowed."""
    from peft import get_peft_model
    from torch.optim.lr_scheduler import OneCycleLR

    from gatera_plugin import GateRAConfig, split_gate_groups
    from gatera_plugin.integrations.axolotl.args import GateRAArgs
    from tests.helpers import tiny_llama

    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], gate_lr_ratio=10.0))
    optimizer = split_gate_groups(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4), model)
    scheduler = OneCycleLR(optimizer, max_lr=2e-4, total_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert len({group["lr"] for group in optimizer.param_groups}) == 1  # (the ratio is gone)
    with pytest.raises(ValueError, match=r"`lr_scheduler: one_cycle` with `gatera_gate_lr_ratio: 10`.*one rate .*for "
                                         r"every param group.*Use another `lr_scheduler`.*or remove `gatera_gate_lr_ratio`"):
        GateRAArgs.model_validate({"adapter": "gatera", "lora_target_modules": ["q_proj"], "lr_scheduler": "one_cycle",
                                   "gatera_gate_lr_ratio": 10})
    for allowed in ({"lr_scheduler": "one_cycle"}, {"lr_scheduler": "one_cycle", "gatera_gate_lr_ratio": 1},
                    {"lr_scheduler": "rex", "gatera_gate_lr_ratio": 10}):
        GateRAArgs.model_validate({"adapter": "gatera", "lora_target_modules": ["q_proj"], **allowed})


def test_gate_lr_ratio_reaches_axolotls_own_optimizers_and_param_groups(workspace):
    """`optimizer: adopt_adamw` (one of the optimizers Axolotl builds itself, without `Trainer.create_optimizer`) with
    `lr_groups`: the gates get `gatera_gate_lr_ratio` × the rate of the group Axolotl put them in, the other
    parameters keep theirs. Before, such an optimizer trained the gates at the base rate without a word."""
    output = _train(workspace, "own-optimizer", optimizer="adopt_adamw", max_steps=3, gatera_gate_lr_ratio=4.0,
                    lr_groups=[{"name": "attention", "modules": ["self_attn"], "lr": 0.002}])
    assert "GateRA:" not in output
    groups = torch.load(workspace / "own-optimizer" / "probe.pt")["optimizer_groups"]
    assert not any(g["gates"] and g["others"] for g in groups), groups
    assert {g["lr"] for g in groups if g["gates"]} == {0.008, 0.04}, groups  # 4 × attention's and 4 × the base rate
    assert {g["lr"] for g in groups if g["others"]} == {0.002, 0.01}, groups


def test_axolotls_offloading_checkpointer_recomputes_the_gated_layers_exactly(monkeypatch):
    """`activation_offloading: legacy` makes Axolotl replace transformers' checkpoint function by one that finds the
    layer as `function.func.__self__` (it needs a GPU through the CLI, so its patch is applied here as Axolotl applies
    it). GateRA's checkpointing wrapper passes that partial on unchanged to introspection (before, a closure: an
    AttributeError at the first forward), and the gradients, penalty included, equal those without checkpointing."""
    import transformers.modeling_utils
    from axolotl.monkeypatch.gradient_checkpointing import hf_grad_checkpoint_offload_wrapper
    from peft import get_peft_model

    from gatera_plugin import GateRAConfig
    from tests.helpers import tiny_llama

    input_ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[0, 8:] = 0
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            monkeypatch.setattr(transformers.modeling_utils, "checkpoint", hf_grad_checkpoint_offload_wrapper)
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                          init_weights=False, entropy_weight=0.5))
        if checkpointing:
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable({"use_reentrant": True})
        model.train()
        model(input_ids=input_ids, attention_mask=mask, labels=input_ids.masked_fill(mask == 0, -100)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


DISTRIBUTED_RUNS = {  # name -> (shipped YAML, overrides)
    # plain DDP: 2 processes, no DeepSpeed or FSDP (Axolotl sets `ddp: true`); every linear layer, as the others
    "ddp": ("gatera.yml", {"lora_target_modules": None, "lora_target_linear": True}),
    "zero2": ("gatera-zero2.yml", {}),
    "zero3": ("gatera-zero3.yml", {}),
    "fsdp2": ("gatera-fsdp2.yml", {}),
    # FSDP's own activation checkpointing (torch's checkpoint_wrapper around each decoder layer) instead of the
    # model's gradient checkpointing: PEFT alone would save the adapter with no tensors there
    "fsdp2-activation-checkpointing": ("gatera-fsdp2.yml", {"gradient_checkpointing": False, "fsdp_config": {
        **yaml.safe_load((EXAMPLES / "gatera-fsdp2.yml").read_text())["fsdp_config"], "activation_checkpointing": True}}),
    # QLoRA-FSDP: a 4-bit base (its bytes stored as bf16, which FSDP can shard), sharded by FSDP2
    "fsdp2-4bit": ("gatera-fsdp2.yml", {"load_in_4bit": True}),
    # DPO (TRL builds the adapter inside its trainer, before FSDP2 shards the model), on the preference pairs
    "fsdp2-dpo": ("gatera-fsdp2.yml", {"rl": "dpo"}),
    # `cpu_ram_efficient_loading: true`, as in Axolotl's FSDP2 recipes: the other ranks load the base on the meta
    # device, so GateRA builds their adapters on meta (the scale waits for W0) and FSDP2 broadcasts rank 0's weights
    "fsdp2-cpu-ram-efficient-loading": ("gatera-fsdp2.yml", {"fsdp_config": {
        **yaml.safe_load((EXAMPLES / "gatera-fsdp2.yml").read_text())["fsdp_config"], "cpu_ram_efficient_loading": True}}),
    # the fsdp_config of Axolotl's FSDP recipes, with their `fsdp_`-prefixed keys and whole (not sharded) state
    # dicts (their `fsdp_offload_params: true` needs an accelerator: torch refuses it on a CPU-only machine)
    "fsdp2-full-state-dict": ("gatera-fsdp2.yml", {"fsdp_config": {
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_reshard_after_forward": True,
        "fsdp_cpu_ram_efficient_loading": False}, "save_strategy": "steps", "save_steps": 6}),
}


@pytest.mark.parametrize("name", list(DISTRIBUTED_RUNS))
def test_deepspeed_through_axolotl(workspace, preference_data, name):
    """Plain DDP (gatera.yml), `deepspeed: integrations/deepspeed/<stage>.json` and `fsdp_version: 2`
    (gatera-<stage>.yml), 2 processes on CPU (torchrun launcher): trains with the penalty, logs the gate statistics
    and saves a complete adapter that reproduces the trained model. FSDP2 also with
    `fsdp_config.activation_checkpointing`.

    (Equality with a single-process run is checked in tests/test_deepspeed.py and tests/test_fsdp.py; Axolotl's
    sampler hands each rank other sequences than one process would get, so its losses are not comparable step by
    step.)"""
    from safetensors.torch import load_file

    example, overrides = DISTRIBUTED_RUNS[name]
    if overrides.get("rl") == "dpo":
        overrides = {**overrides, "datasets": [{"path": str(preference_data["dpo"]), "type": "chatml.default",
                                                "split": "train"}]}
    stage = "ddp" if example == "gatera.yml" else example.removeprefix("gatera-").removesuffix(".yml")
    cfg = _config(workspace, f"ds-{name}", example=example, micro_batch_size=2, max_steps=12, **overrides)
    done = _axolotl("train", str(cfg), "--launcher", "torchrun", "--", "--nproc_per_node", "2", "--master_port",
                    str(29600 + list(DISTRIBUTED_RUNS).index(name)))
    _ok(done)
    output = done.stdout + done.stderr
    losses = _logged_once(output, "loss", 12)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    entropies = torch.tensor(_logged_once(output, "gatera/entropy", 12))
    penalties = torch.tensor(_logged_once(output, "gatera/penalty", 12))  # λ · entropy, counted once
    torch.testing.assert_close(penalties, 0.05 * entropies, rtol=2e-3, atol=2e-5)  # (logged to 4 digits)
    if overrides.get("load_in_4bit"):
        assert "GateRA on a 4-bit (bitsandbytes) base model" in output
    if stage == "fsdp2":  # no recount of the checkpointed forwards, no switch to per-forward normalisation
        assert "GateRA:" not in output, output[output.index("GateRA:"):][:500]
    from transformers import AutoModelForCausalLM

    saved = load_file(workspace / f"ds-{name}" / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(workspace / "base")
    linears = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    expected = {f"base_model.model.{n}.gatera_{p}" for n in linears for p in ("A", "B", "gate.weight", "gate.bias")}
    assert set(saved) == expected  # complete: every adapted module's tensors, gathered from the shards
    if overrides.get("save_strategy") == "steps":  # and so is the adapter of the step checkpoint
        checkpoint = load_file(workspace / f"ds-{name}" / "checkpoint-6" / "adapter_model.safetensors")
        assert set(checkpoint) == expected and any((checkpoint[k] != saved[k]).any() for k in expected)
    assert all(saved[k].abs().sum() > 0 for k in saved if k.endswith("gatera_B"))  # trained, not the init
    reloaded = _reload_logits(workspace / "base", workspace / f"ds-{name}")
    if stage == "fsdp2":  # FSDP2 really sharded the base weights (DTensors), not a silent fallback to DDP
        probe = json.loads((workspace / f"ds-{name}" / "fsdp_probe.json").read_text())
        assert probe["sharded_base_weights"] > 0
        # FSDP's activation checkpointing really wrapped the decoder layers (2 here), and only when asked
        assert probe["checkpoint_wrapped_modules"] == (2 if "activation-checkpointing" in name else 0)
    if stage == "fsdp2" and not overrides.get("rl"):  # (for DPO, TRL builds the adapter: no post_lora_load)
        # with cpu_ram_efficient_loading rank 1 built its adapter on a meta base, rank 0 on the loaded one
        loads = [json.loads((workspace / f"ds-{name}" / f"load_probe_rank{r}.json").read_text()) for r in (0, 1)]
        meta = "cpu-ram-efficient-loading" in name
        assert loads[0]["meta_base_weights"] == loads[0]["pending_scales"] == 0
        assert loads[1]["meta_base_weights"] == loads[1]["pending_scales"] == (loads[1]["layers"] if meta else 0)
    if stage == "ddp":  # the Trainer really wrapped the model in DDP (not one process training alone)
        assert torch.load(workspace / f"ds-{name}" / "probe.pt")["wrapped_model"] == "DistributedDataParallel"
    if stage in ("ddp", "zero2"):  # under ZeRO-3 and FSDP the probe cannot run a forward on rank 0 alone
        torch.testing.assert_close(reloaded, torch.load(workspace / f"ds-{name}" / "probe.pt")["logits"],
                                   rtol=1e-4, atol=1e-4)


def test_fsdp2_resume_from_a_full_state_dict_checkpoint_equals_uninterrupted(workspace):
    """FSDP2 with the recipes' `fsdp_state_dict_type: FULL_STATE_DICT` (2 processes): a run resumed from its step-6
    checkpoint (a whole model state dict, `pytorch_model_fsdp.bin`, and the optimizer's) logs the same losses and
    gate statistics for steps 7-12 as the uninterrupted run, and ends with the same adapter."""
    example, overrides = DISTRIBUTED_RUNS["fsdp2-full-state-dict"]
    logs = {}
    for label, resume in (("full", {}), ("part", {"resume_from_checkpoint": str(workspace / "fsdp-resume-full" /
                                                                                "checkpoint-6")})):
        cfg = _config(workspace, f"fsdp-resume-{label}", example=example, micro_batch_size=2, max_steps=12,
                      lr_scheduler="linear", **overrides, **resume)
        done = _axolotl("train", str(cfg), "--launcher", "torchrun", "--", "--nproc_per_node", "2", "--master_port",
                        "29650")
        _ok(done)
        logs[label] = done.stdout + done.stderr
    assert (workspace / "fsdp-resume-full" / "checkpoint-6" / "pytorch_model_fsdp.bin").exists()
    _assert_resumed_like_uninterrupted(logs["full"], logs["part"], workspace / "fsdp-resume-full",
                                       workspace / "fsdp-resume-part", steps=12, resumed=6)


def test_resume_from_checkpoint_equals_uninterrupted(workspace):
    """An Axolotl run resumed from its step-5 checkpoint logs the same losses and gate statistics for steps 6-10 as
    the uninterrupted run, and ends with the same adapter (the checkpoint is what a stopped run leaves behind)."""
    overrides = dict(max_steps=10, save_strategy="steps", save_steps=5, lr_scheduler="linear")
    full = _train(workspace, "resume-full", **overrides)
    checkpoint = workspace / "resume-full" / "checkpoint-5"
    assert (checkpoint / "adapter_model.safetensors").exists()
    resumed = _train(workspace, "resume-part", resume_from_checkpoint=str(checkpoint), **overrides)
    _assert_resumed_like_uninterrupted(full, resumed, workspace / "resume-full", workspace / "resume-part", steps=10,
                                       resumed=5)


@pytest.mark.parametrize("scaling, expected_alpha", [(None, 32), ("lora", 32), ("none", None), ("rms", None)])
def test_lora_alpha_reaches_the_hira_branch_only_where_its_scale_uses_it(scaling, expected_alpha, caplog):
    """A recipe switched from `adapter: lora` keeps its lora_r / lora_alpha: `gatera_hira_scaling: lora` scales the
    HiRA branch by them (and by lora_alpha_pattern); the other scales drop them with a warning."""
    from axolotl.utils.dict import DictDefault

    from gatera_plugin.integrations.axolotl.args import GateRAArgs
    from gatera_plugin.integrations.axolotl.plugin import gatera_config_from_axolotl

    keys = {"adapter": "gatera", "gatera_hira_scaling": scaling} if scaling else {"adapter": "gatera"}
    keys.update(lora_r=16, lora_alpha=32, lora_alpha_pattern={"v_proj": 8}, lora_target_modules=["q_proj", "v_proj"])
    GateRAArgs.model_validate(keys)  # Axolotl's schema accepts every value
    with caplog.at_level(logging.WARNING):
        config = gatera_config_from_axolotl(DictDefault(keys), model=None)
    assert config.hira_scaling == (scaling or "lora") and config.lora_alpha == expected_alpha
    assert config.alpha_pattern == ({"v_proj": 8} if expected_alpha else {})
    dropped = [r.getMessage() for r in caplog.records if "not used by GateRA's HiRA branch" in r.getMessage()]
    assert dropped == ([] if expected_alpha else [f"lora_alpha=32 and lora_alpha_pattern={{'v_proj': 8}} not used by "
                                                  f"GateRA's HiRA branch with gatera_hira_scaling={scaling!r} (set "
                                                  "gatera_hira_scaling: lora to scale it like LoRA; docs/method.md, "
                                                  "section 'Branches')."])


@pytest.mark.parametrize("rl,dataset_type,load_in_4bit", [
    ("dpo", "chatml.default", False), ("dpo", "chatml.default", True), ("kto", "chatml.argilla", False),
    ("orpo", "chat_template.argilla", False), ("ipo", "chatml.default", False), ("simpo", "chatml.default", False),
], ids=["dpo", "dpo-4bit", "kto", "orpo", "ipo", "simpo"])
def test_preference_training_through_axolotl_penalises_and_reloads(workspace, preference_data, rl, dataset_type,
                                                                   load_in_4bit):
    """`rl: dpo` / `ipo` / `kto` with `adapter: gatera` (DPO also on a 4-bit base, gatera-qlora.yml): Axolotl hands
    TRL only the adapter's config (the plugin's `load_adapter(config_only=True)`) and TRL builds the GateRA model
    inside its trainer; `rl: orpo` (chat-formatted pairs) and `rl: simpo` (TRL's CPO trainer), where Axolotl builds
    it. The preference loss falls, each step is
    normalised at step level with no warning (README's table: DPO, KTO and ORPO count their batches' attention
    masks), the penalty is λ · entropy, `gatera_gate_lr_ratio` reaches the optimizer Axolotl's trainer builds, and the
    saved adapter reloads to the trained model's outputs."""
    pairs = preference_data["dpo" if rl in ("ipo", "simpo") else rl]  # (IPO: DPO's trainer; SimPO: TRL's CPO)
    overrides = dict(rl=rl, datasets=[{"path": str(pairs), "type": dataset_type, "split": "train"}],
                     max_steps=12, micro_batch_size=2, gradient_accumulation_steps=2, learning_rate=0.005,
                     gatera_gate_lr_ratio=4.0, remove_unused_columns=False if rl == "kto" else None,
                     chat_template="chatml" if rl == "orpo" else None,
                     simpo_gamma=0.5 if rl == "simpo" else None)  # (Axolotl 0.21 hands TRL None without it)
    name = f"{rl}-4bit" if load_in_4bit else rl
    output = _train(workspace, name, example="gatera-qlora.yml" if load_in_4bit else "gatera.yml", **overrides)
    if load_in_4bit:
        assert "GateRA on a 4-bit (bitsandbytes) base model" not in output  # TRL, not the plugin, builds it here
        assert "Linear4bit" in " ".join(torch.load(workspace / name / "probe.pt")["layer_types"])
    assert "GateRA:" not in output, output[output.index("GateRA:"):][:500]
    losses = _logged(output, "loss")
    assert len(losses) == 12 and sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses
    entropy, penalty = _logged(output, "gatera/entropy"), _logged(output, "gatera/penalty")
    assert len(entropy) == 12
    torch.testing.assert_close(torch.tensor(penalty), 0.05 * torch.tensor(entropy), rtol=1e-3, atol=1e-6)
    out = workspace / name
    if load_in_4bit:  # TRL's QLoRA recipe: factors in bf16 (so saved), gates kept in fp32 by GateRA
        from safetensors.torch import load_file

        saved = {k: v.dtype for k, v in load_file(out / "adapter_model.safetensors").items()}
        assert {d for k, d in saved.items() if ".gatera_A" in k or ".gatera_B" in k} == {torch.bfloat16}
        assert {d for k, d in saved.items() if ".gatera_gate." in k} == {torch.float32}
    probe = _saved_gatera_adapter_reloads(out, workspace / "base", 4 if load_in_4bit else 0,
                                          torch.bfloat16 if load_in_4bit else None)
    groups = probe["optimizer_groups"]
    assert {g["lr"] for g in groups if g["gates"]} == {0.02} and {g["lr"] for g in groups if g["others"]} == {0.005}
    assert not any(g["gates"] and g["others"] for g in groups), groups


def test_grpo_through_axolotl_trains_with_the_per_forward_penalty(workspace, preference_data):
    """`rl: grpo` with `adapter: gatera` (generation by the policy itself, `trl.use_vllm: false`): Axolotl builds the
    GateRA model and its own GRPO trainer; the step's tokens are generated, so the penalty is normalised per forward,
    said once (README's table), the gate statistics are logged, and the saved adapter reloads. Every completion gets
    the same reward, so GRPO's advantages, loss and gradient are 0: the gates start away from 0.5 (where the
    entropy's gradient is 0), and the penalty alone must give every step a gradient."""
    overrides = dict(rl="grpo", datasets=[{"path": str(preference_data["grpo"]), "type": "passthrough",
                                           "split": "train"}],
                     trl={"use_vllm": False, "num_generations": 2, "max_completion_length": 6,
                          "reward_funcs": ["tests.axolotl.probe_plugin.constant_reward"]},
                     max_steps=4, micro_batch_size=2, gradient_accumulation_steps=2, learning_rate=0.005,
                     gatera_gate_bias_init=0.8)
    output = _train(workspace, "grpo", **overrides)
    said = [line for line in output.splitlines() if "GateRA:" in line]
    assert len(said) == 1 and "cannot be counted in advance" in said[0], said
    reward_std, grad_norm = _logged(output, "reward_std"), _logged(output, "grad_norm")
    assert len(_logged(output, "gatera/entropy")) == 4 and len(reward_std) == 4
    assert set(reward_std) == {0.0} and len(grad_norm) == 4 and all(norm > 0 for norm in grad_norm), grad_norm
    _saved_gatera_adapter_reloads(workspace / "grpo", workspace / "base")


@pytest.mark.parametrize("options", [
    {"peft_use_dora": True}, {"peft_use_rslora": True}, {"peft_init_lora_weights": "pissa"},
    {"peft_init_lora_weights": False},
    {"peft_layer_replication": [[0, 2]]},
    {"peft": {"loftq_config": {"loftq_bits": 4}}},
], ids=lambda options: f"{next(iter(options))}={next(iter(options.values()))}")
def test_lora_options_without_a_gatera_counterpart_are_refused(options):
    """A recipe switched from `adapter: lora` may keep LoRA options that GateRA's config has no field for: refused
    with what to use instead, not silently dropped. Their defaults (and the same keys under `adapter: lora`) pass."""
    from gatera_plugin.integrations.axolotl.args import GateRAArgs

    key = next(iter(options)) if "peft" not in options else "peft.loftq_config"
    with pytest.raises(ValueError, match=rf"`{re.escape(key)}` is a LoRA option that `adapter: gatera` would ignore"):
        GateRAArgs.model_validate({"adapter": "gatera", **options})
    GateRAArgs.model_validate({"adapter": "lora", **options})
    GateRAArgs.model_validate({"adapter": "gatera", "peft_init_lora_weights": True, "peft_use_dora": False,
                               "lora_target_modules": ["q_proj"]})


def test_the_kind_names_of_the_yaml_keys_are_the_registries():
    """`gatera_branch` / `gatera_gate` accept exactly the kinds GateRAConfig implements."""
    import typing

    from gatera_plugin.config import BRANCHES, TOKEN_GATES
    from gatera_plugin.integrations.axolotl.args import GateRAArgs

    def names(key):  # Optional[Literal[...]] -> the literal's names
        return {name for arg in typing.get_args(GateRAArgs.model_fields[key].annotation) for name in typing.get_args(arg)}

    assert names("gatera_branch") == set(BRANCHES) and names("gatera_gate") == set(TOKEN_GATES)


def test_a_misspelt_gatera_key_is_refused_with_the_closest_name():
    """Axolotl's schema drops keys it does not know: a misspelt `gatera_*` key would train with the default. Refused,
    with the closest known key (also where `adapter` is not gatera); every known key passes."""
    from gatera_plugin.integrations.axolotl.args import GATERA_KEYS, GateRAArgs

    with pytest.raises(ValueError, match=r"`gatera_gate_lr_raito` is not a GateRA setting: did you mean "
                                         r"`gatera_gate_lr_ratio`\?"):
        GateRAArgs.model_validate({"adapter": "gatera", "gatera_gate_lr_raito": 4.0})
    with pytest.raises(ValueError, match=r"`gatera_xyz` is not a GateRA setting: The GateRA keys are gatera_branch"):
        GateRAArgs.model_validate({"adapter": "lora", "gatera_xyz": 1})
    assert set(GATERA_KEYS) == {k for k in GateRAArgs.model_fields if k.startswith("gatera_")}
    GateRAArgs.model_validate({"adapter": "gatera", "gatera_gate_lr_ratio": 4.0, "gatera_kernel": "torch",
                               "lora_target_linear": True})


def test_vllm_generation_is_refused_in_the_yaml_s_own_words():
    """GRPO with `trl.use_vllm: true` on a gated adapter is refused when the config is read, naming the YAML keys
    (the Trainer's own refusal comes later and names TRL's Python argument); an ungated adapter keeps vLLM."""
    from gatera_plugin.integrations.axolotl.args import GateRAArgs

    keys = {"adapter": "gatera", "rl": "grpo", "trl": {"use_vllm": True}, "lora_target_linear": True}
    with pytest.raises(ValueError, match=r"`trl.use_vllm: true` cannot generate .* `trl.use_vllm: false` .* "
                                         r"`gatera_gate: none`"):
        GateRAArgs.model_validate(keys)
    GateRAArgs.model_validate({**keys, "gatera_gate": "none"})
    GateRAArgs.model_validate({**keys, "trl": {"use_vllm": False}})


def test_a_regex_target_string_adapts_what_it_adapts_for_lora():
    """`lora_target_modules` as one string (a regex, in many of Axolotl's recipes, e.g. to adapt a VLM's language model
    only) is handed to PEFT as a regex, as Axolotl does for LoRA: the same modules as LoRA's. Before, it became a
    one-name list, and PEFT found no module of that name."""
    from axolotl.utils.dict import DictDefault
    from peft import LoraConfig, get_peft_model

    from gatera_plugin.integrations.axolotl.plugin import gatera_config_from_axolotl
    from tests.helpers import tiny_llama

    regex = r".*layers\.1\.(self_attn|mlp)\.(q|v|up)_proj"
    config = gatera_config_from_axolotl(DictDefault({"adapter": "gatera", "lora_target_modules": regex}), model=None)
    assert config.target_modules == regex
    adapted = {n for n, m in get_peft_model(tiny_llama(), config).named_modules() if hasattr(m, "gatera_A")}
    lora = {n for n, m in get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=regex)).named_modules()
            if hasattr(m, "lora_A")}
    assert adapted == lora and len(adapted) == 3, adapted


def test_trainable_token_indices_and_weight_tying_reach_the_gatera_config():
    """`peft_trainable_token_indices` (new chat tokens' embedding rows) and `peft_ensure_weight_tying` (one trained
    copy for tied embeddings in `lora_modules_to_save`) are GateRA options too (tests/test_model.py trains and reloads
    them; the CLI run with new tokens is `test_new_tokens_on_a_tied_model_train_one_embedding_copy`)."""
    from axolotl.utils.dict import DictDefault

    from gatera_plugin.integrations.axolotl.plugin import gatera_config_from_axolotl

    cfg = DictDefault({"adapter": "gatera", "lora_target_modules": ["q_proj"], "peft_trainable_token_indices": [5, 7],
                       "peft_ensure_weight_tying": True})
    config = gatera_config_from_axolotl(cfg, model=None)
    assert config.trainable_token_indices == [5, 7] and config.ensure_weight_tying is True
    config = gatera_config_from_axolotl(DictDefault({"adapter": "gatera", "lora_target_modules": ["q_proj"]}), None)
    assert config.trainable_token_indices is None and config.ensure_weight_tying is False


@pytest.mark.parametrize("variant", ["full-precision", "4bit", "fsdp2", "zero3"])
def test_new_tokens_on_a_tied_model_train_one_embedding_copy(workspace, variant):
    """New chat tokens (`tokens:`) on a model with tied embeddings (SmolLM2, Llama 3.2, Qwen2.5's small ones), with
    the `lora_modules_to_save: [embed_tokens, lm_head]` Axolotl then requires and `peft_ensure_weight_tying: true`,
    on a full-precision and a 4-bit base (gatera-qlora.yml) and under FSDP2 and ZeRO-3 (2 processes): the
    resized embedding trains as one copy that the head reads (the saved head equals the saved embedding, and both
    moved from the base's), the loss falls, and the adapter reloads onto the resized base, to the trained logits
    (where one process can run the probe's forward)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(workspace / "base")
    if not (workspace / "base-tied").exists():
        base.config.tie_word_embeddings = True
        base.tie_weights()
        base.save_pretrained(workspace / "base-tied")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (workspace / "base" / name).exists():
                (workspace / "base-tied" / name).write_bytes((workspace / "base" / name).read_bytes())
    vocab, name, bits = base.config.vocab_size, f"new-tokens-{variant}", 4 if variant == "4bit" else 0
    example = {"full-precision": "gatera.yml", "4bit": "gatera-qlora.yml", "fsdp2": "gatera-fsdp2.yml",
               "zero3": "gatera-zero3.yml"}[variant]
    overrides = dict(base_model=str(workspace / "base-tied"), tokens=["<|im_start|>", "<|im_end|>"],
                     lora_modules_to_save=["embed_tokens", "lm_head"], peft_ensure_weight_tying=True)
    if variant in ("fsdp2", "zero3"):
        cfg = _config(workspace, name, example=example, micro_batch_size=2, max_steps=12, **overrides)
        done = _axolotl("train", str(cfg), "--launcher", "torchrun", "--", "--nproc_per_node", "2", "--master_port",
                        "29660" if variant == "fsdp2" else "29661")
        _ok(done)
        output, steps = done.stdout + done.stderr, 12
        losses = _logged_once(output, "loss", steps)
    else:
        output, steps = _train(workspace, name, example=example, **overrides), 25
        losses = _logged(output, "loss")
    assert len(losses) == steps and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    out = workspace / name
    saved = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if "gatera_" not in k}
    embedding, head = saved["base_model.model.model.embed_tokens.weight"], saved["base_model.model.lm_head.weight"]
    assert embedding.shape[0] >= vocab + 2 and torch.equal(head, embedding)  # one copy, resized
    assert not torch.equal(embedding[:vocab], base.get_input_embeddings().weight)  # it trained
    reloaded = _reload_logits(workspace / "base-tied", out, bits, vocabulary=embedding.shape[0],
                              trained_dtypes=torch.load(out / "probe.pt")["dtypes"] if bits else None)
    if variant not in ("fsdp2", "zero3"):  # (there the probe cannot run a forward on rank 0 alone)
        torch.testing.assert_close(reloaded, torch.load(out / "probe.pt")["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["one-process", "fsdp2", "zero3"])
def test_resized_frozen_embeddings_are_saved_with_the_adapter(workspace, variant):
    """`resize_token_embeddings_to_32x: true` (vocabulary rows padded for tensor cores, here 489 -> 512) resizes the
    embeddings without `lora_modules_to_save` (which Axolotl asks for only with new `tokens:`): the new rows are drawn
    at random and stay frozen, and PEFT saves both embedding layers with the adapter, so that it reloads onto any
    resized base to the same model. Under FSDP2 and ZeRO-3 (2 processes) the saves gathered only trainable tensors
    and left these out (ZeRO-3's consolidated state dict for a PEFT model excludes frozen parameters): the adapter then
    reloaded onto other random rows. Now every variant saves them whole, with the base's own rows unchanged, and the
    reload takes the saved rows (and, in one process, gives the trained logits)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(workspace / "base")
    name, vocab = f"resized-frozen-{variant}", base.config.vocab_size
    example = {"one-process": "gatera.yml", "fsdp2": "gatera-fsdp2.yml", "zero3": "gatera-zero3.yml"}[variant]
    overrides = dict(resize_token_embeddings_to_32x=True, max_steps=4)
    if variant == "one-process":
        _train(workspace, name, example=example, **overrides)
    else:
        cfg = _config(workspace, name, example=example, micro_batch_size=2, **overrides)
        _ok(_axolotl("train", str(cfg), "--launcher", "torchrun", "--", "--nproc_per_node", "2", "--master_port",
                     "29662" if variant == "fsdp2" else "29663"))
    out = workspace / name
    saved = load_file(out / "adapter_model.safetensors")
    for key, layer in [("base_model.model.model.embed_tokens.weight", base.get_input_embeddings()),
                       ("base_model.model.lm_head.weight", base.get_output_embeddings())]:
        assert key in saved, sorted(k for k in saved if "gatera_" not in k)
        assert saved[key].shape[0] == 512 and torch.equal(saved[key][:vocab].float(), layer.weight), key
    rows = saved["base_model.model.model.embed_tokens.weight"].shape[0]
    reloaded = _reload_logits(workspace / "base", out, vocabulary=rows)
    if variant == "one-process":
        torch.testing.assert_close(reloaded, torch.load(out / "probe.pt")["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["full-precision", "4bit"])
def test_dpo_after_sft_continues_from_the_sft_adapter(workspace, preference_data, load_in_4bit):
    """`rl: dpo` with `lora_model_dir` (DPO after SFT; a gated adapter cannot be merged into the base first): TRL
    builds the adapter from the saved adapter's config and the plugin loads its weights into it once the trainer
    exists. Axolotl itself loads `lora_model_dir` only where it builds the adapter, and before this the DPO run
    started from a new adapter without a word. Seen in the first step: the policy (the SFT adapter) already differs
    from TRL's reference (the adapter disabled), so the rewards are not 0, as they are for a new adapter. The loaded
    adapter then trains, and keeps the dtypes TRL gave it (on a 4-bit base: bf16 factors, fp32 gates)."""
    from safetensors.torch import load_file

    sft_run, example = ("run-4bit", "gatera-qlora.yml") if load_in_4bit else ("run-fp32", "gatera.yml")
    sft = workspace / sft_run
    _train(workspace, sft_run, example=example)
    overrides = dict(rl="dpo", datasets=[{"path": str(preference_data["dpo"]), "type": "chatml.default",
                                          "split": "train"}],
                     max_steps=2, micro_batch_size=2, gradient_accumulation_steps=2, learning_rate=0.005)
    fresh = _train(workspace, "dpo-fresh", **overrides)
    name = f"dpo-after-{sft_run}"
    continued = _train(workspace, name, example=example, lora_model_dir=str(sft), **overrides)
    assert f"Loading GateRA adapter from {sft} into the adapter AxolotlDPOTrainer built" in continued
    assert _logged(fresh, "rewards/chosen")[0] == 0.0
    assert _logged(continued, "rewards/chosen")[0] != 0.0
    assert _logged(continued, "mean_token_accuracy")[0] > _logged(fresh, "mean_token_accuracy")[0] + 0.3
    assert "GateRA:" not in continued
    before = load_file(sft / "adapter_model.safetensors")
    after = load_file(workspace / name / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k].float(), after[k].float()) for k in after if ".gatera_B" in k)  # trained on
    factors = {after[k].dtype for k in after if ".gatera_A" in k or ".gatera_B" in k}
    assert factors == {torch.bfloat16 if load_in_4bit else torch.float32}
    assert {after[k].dtype for k in after if ".gatera_gate." in k} == {torch.float32}


@pytest.mark.parametrize("config_only", [False, True], ids=["axolotl-builds", "trl-builds"])
def test_lora_model_dir_of_another_method_is_refused(tmp_path, config_only):
    """`adapter: gatera` with `lora_model_dir` pointing at a LoRA adapter would train LoRA: refused, by both paths."""
    from axolotl.utils.dict import DictDefault
    from peft import LoraConfig, get_peft_model

    from gatera_plugin.integrations.axolotl import GateRAPlugin
    from tests.helpers import tiny_llama

    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    cfg = DictDefault({"adapter": "gatera", "lora_target_modules": ["q_proj"], "lora_model_dir": str(tmp_path)})
    with pytest.raises(ValueError, match=r"holds a LORA adapter, not a GateRA one.*Point it at a GateRA adapter"):
        GateRAPlugin().load_adapter(tiny_llama(), cfg, config_only=config_only)


@pytest.mark.parametrize("autocast,expected", [(None, torch.float32), (True, torch.float32), (False, torch.bfloat16)])
def test_peft_autocast_adapter_dtype_reaches_the_adapter(tmp_path, autocast, expected):
    """`peft_autocast_adapter_dtype` (PEFT's fp32 adapter on a half-precision base, on by default) is honoured when
    the plugin builds the adapter and when it loads `lora_model_dir`, as Axolotl does for LoRA."""
    from axolotl.utils.dict import DictDefault

    from gatera_plugin.integrations.axolotl import GateRAPlugin
    from tests.helpers import tiny_llama

    keys = {"adapter": "gatera", "lora_target_modules": ["q_proj"], "peft_autocast_adapter_dtype": autocast}
    built, _ = GateRAPlugin().load_adapter(tiny_llama().to(torch.bfloat16), DictDefault(keys))
    built.save_pretrained(tmp_path)
    loaded, _ = GateRAPlugin().load_adapter(tiny_llama().to(torch.bfloat16),
                                            DictDefault({**keys, "lora_model_dir": str(tmp_path)}))
    for model in (built, loaded):
        assert {p.dtype for n, p in model.named_parameters() if ".gatera_A." in n} == {expected}


@pytest.mark.parametrize("on_cpu", [False, True])
def test_lora_on_cpu_loads_the_adapter_onto_the_cpu_as_for_lora(tmp_path, monkeypatch, on_cpu):
    """`lora_on_cpu: true` (Axolotl's way to merge a large model's adapter without a GPU's memory): the plugin hands
    PEFT the device map and memory limit Axolotl hands it for a LoRA adapter; before, the key was ignored."""
    from axolotl.utils.dict import DictDefault
    from peft import PeftModel

    from gatera_plugin.integrations.axolotl import GateRAPlugin
    from tests.helpers import tiny_llama

    keys = {"adapter": "gatera", "lora_target_modules": ["q_proj"]}
    built, _ = GateRAPlugin().load_adapter(tiny_llama(), DictDefault(keys))
    built.save_pretrained(tmp_path)
    seen = {}
    original = PeftModel.from_pretrained.__func__

    def from_pretrained(cls, model, model_id, **kwargs):
        seen.update(kwargs)
        return original(cls, model, model_id, **kwargs)

    monkeypatch.setattr(PeftModel, "from_pretrained", classmethod(from_pretrained))
    loaded, _ = GateRAPlugin().load_adapter(tiny_llama(), DictDefault({**keys, "lora_model_dir": str(tmp_path),
                                                                        "lora_on_cpu": on_cpu}))
    expected = {"device_map": {"": "cpu"}, "max_memory": {"cpu": "256GiB"}} if on_cpu else {}
    assert {k: seen[k] for k in ("device_map", "max_memory") if k in seen} == expected
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}


@pytest.mark.parametrize("kwargs, reentrant", [(None, False), ({"use_reentrant": True}, True)])
def test_checkpointing_at_load_follows_axolotls_default(kwargs, reentrant):
    """`gradient_checkpointing: true`: the plugin checkpoints the layers it loads as Axolotl's Trainer will
    (`gradient_checkpointing_kwargs`; unset, `use_reentrant: false`). Axolotl's config normalisation fills the key in
    itself, except under `rl` or `unfrozen_parameters`; there the plugin defaulted to reentrant checkpointing before,
    which held until the Trainer re-applied its own, and wherever the Trainer does not (Axolotl's
    `activation_offloading` turns the Trainer's off)."""
    from axolotl.utils.dict import DictDefault

    from gatera_plugin.integrations.axolotl import GateRAPlugin
    from tests.helpers import tiny_llama

    cfg = DictDefault({"adapter": "gatera", "lora_target_modules": ["q_proj"], "gradient_checkpointing": True,
                       "gradient_checkpointing_kwargs": kwargs})
    model, _ = GateRAPlugin().load_adapter(tiny_llama(), cfg)
    functions = [m._gradient_checkpointing_func for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert functions and {f.keywords["use_reentrant"] for f in functions} == {reentrant}


@pytest.mark.parametrize("config_only", [False, True], ids=["axolotl-builds", "trl-builds"])
def test_a_continued_adapter_takes_the_configs_training_options_and_keeps_its_structure(tmp_path, caplog,
                                                                                        config_only):
    """`lora_model_dir` with other `gatera_*` keys than the saved adapter's (e.g. another penalty weight for DPO after
    SFT): the training options (penalty weights, the gates' rate, dropout, ...) are the YAML's; keys that would change
    the saved structure are reported and the saved adapter's govern. Both paths: the plugin builds the model, or TRL
    does from the config the plugin returns."""
    import logging

    from axolotl.utils.dict import DictDefault
    from peft import get_peft_model

    from gatera_plugin import GateRAConfig
    from gatera_plugin.integrations.axolotl import GateRAPlugin
    from tests.helpers import tiny_llama

    get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], entropy_weight=0.01)).save_pretrained(
        tmp_path)
    cfg = DictDefault({"adapter": "gatera", "lora_target_modules": ["q_proj"], "lora_model_dir": str(tmp_path),
                       "lora_r": 8, "gatera_entropy_weight": 0.2, "gatera_gate_lr_ratio": 3.0, "lora_dropout": 0.1,
                       "peft_ensure_weight_tying": True})
    with caplog.at_level(logging.WARNING):
        model, config = GateRAPlugin().load_adapter(tiny_llama(), cfg, config_only=config_only)
    if not config_only:
        config = model.peft_config["default"]
        assert model.base_model.model.model.layers[0].self_attn.q_proj.gatera_A["default"].shape[0] == 4
    assert (config.entropy_weight, config.gate_lr_ratio, config.dropout, config.r) == (0.2, 3.0, 0.1, 4)
    assert config.ensure_weight_tying is False
    assert any("saved with other settings than this config's {'lora_r': (8, 4), 'peft_ensure_weight_tying': (True, "
               "False)}" in r.getMessage()
               for r in caplog.records), caplog.text



@pytest.mark.parametrize("config_only", [False, True], ids=["axolotl-builds", "trl-builds"])
@pytest.mark.parametrize(("saved", "keys"), [
    ({"gate": "none"}, {"gatera_gate_lr_ratio": 3.0}),
    ({"gate": "threshold"}, {"gatera_entropy_weight": 0.1}),
    ({"gate": "sigmoid"}, {"gatera_gate": "threshold", "gatera_keep_ratio": 0.5, "gatera_gate_lr_ratio": 3.0}),
], ids=["gate-rate-without-gates", "entropy-on-a-threshold-gate", "keep-ratio-on-a-sigmoid-gate"])
def test_a_continued_adapter_refuses_training_options_its_structure_ignores(tmp_path, saved, keys, config_only):
    """`lora_model_dir` with a training option that the saved adapter's structure has no use for (the gates' rate for
    an adapter without gates, a keep_ratio for a sigmoid gate, ...): it was applied to the saved config unchecked and
    ignored in training without a word (a new adapter refuses it); now refused, naming that key (not the options the
    adapter can use) and the saved gate. Loaded for inference (or merging) it is not refused: nothing trains."""
    from axolotl.utils.dict import DictDefault
    from peft import get_peft_model

    from gatera_plugin import GateRAConfig
    from gatera_plugin.integrations.axolotl import GateRAPlugin
    from tests.helpers import tiny_llama

    get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], **saved)).save_pretrained(tmp_path)
    cfg = DictDefault({"adapter": "gatera", "lora_target_modules": ["q_proj"], "lora_model_dir": str(tmp_path),
                       "lora_r": 4, **keys})
    offending = next(key for key in keys if key != "gatera_gate")
    with pytest.raises(ValueError, match=f"this config's `{offending}` cannot .*gate={saved['gate']!r}.*Remove "
                                         f"`{offending}` from the config") as refusal:
        GateRAPlugin().load_adapter(tiny_llama(), cfg, config_only=config_only)
    assert len(re.findall("`gatera_", str(refusal.value))) == 2, refusal.value  # (that key alone, twice)
    if not config_only:  # (for inference the options apply unchecked, as they did: e.g. another kernel)
        model, _ = GateRAPlugin().load_adapter(tiny_llama(), cfg, inference=True)
        applied = model.peft_config["default"]
        assert all(getattr(applied, key.removeprefix("gatera_")) == value for key, value in keys.items()
                   if key != "gatera_gate")


def test_evaluate_cli_evaluates_the_trained_adapter(workspace):
    """`axolotl evaluate` with `lora_model_dir` (the trained adapter) evaluates that adapter: its loss on the training
    data is the trained model's, far below a new adapter's (the same command without `lora_model_dir`)."""
    _train(workspace, "run-fp32")
    losses = {}
    for label, extra in (("trained", {"lora_model_dir": str(workspace / "run-fp32")}), ("new", {})):
        done = _axolotl("evaluate", str(_config(workspace, f"evaluate-{label}", **extra)), timeout=600)
        _ok(done)
        output = done.stdout + done.stderr
        assert "GateRA:" not in output, output[-3000:]
        assert (f"Loading GateRA adapter from {workspace / 'run-fp32'}" in output) == (label == "trained")
        losses[label] = [float(v) for v in re.findall(r"train_loss: ([-0-9.e]+)", output)]
    assert len(losses["trained"]) == len(losses["new"]) == 1, losses
    assert losses["trained"][0] < 0.5 * losses["new"][0], losses  # measured: 2.09 against 7.49


@pytest.mark.parametrize("keys, message", [
    ({"gatera_keep_ratio": 0.5}, r"keep_ratio` only applies to gate='threshold'.*`gatera_keep_ratio` sets keep_ratio"),
    ({"lora_r": 0}, r"`lora_r` sets r"),
    ({"lora_dropout": 1.0}, r"`lora_dropout` sets dropout"),
    ({"gatera_gate_bias_init": 30.0}, r"`gatera_gate_bias_init` sets gate_bias_init"),
    ({"gatera_gate": "threshold", "gatera_threshold_init": 0.2}, r"B = 0 at step 0.*`gatera_threshold_init` sets "
                                                                  r"threshold_init"),
    ({"lora_target_modules": None}, r"needs `lora_target_modules` or `lora_target_linear: true`"),
    ({"lora_target_modules": 5}, r"`lora_target_modules` is a list of module names or one regex string, got 5"),
    ({"lora_target_modules": r".*\.q_proj", "peft_layers_to_transform": [0]}, r"`peft_layers_to_transform` sets "
                                                                             r"layers_to_transform"),
], ids=["keep-ratio-without-threshold", "rank-0", "dropout-1", "gate-bias-init-30", "threshold-init-without-update",
        "no-targets", "targets-a-number", "regex-and-layers"])
def test_settings_gatera_refuses_together_fail_when_the_config_is_read_naming_the_yaml_keys(keys, message):
    """Settings that GateRAConfig refuses in combination (or out of its ranges) fail at config validation, before the
    dataset and model load, with the YAML keys named (the message had GateRAConfig's field names only). `lora_r: 0`
    is refused, where it had become r = 32."""
    from gatera_plugin.integrations.axolotl.args import GateRAArgs

    with pytest.raises(ValueError, match=r"`adapter: gatera`.*" + message):
        GateRAArgs.model_validate({"adapter": "gatera", "lora_target_modules": ["q_proj"], **keys})


@pytest.mark.parametrize("saved_gate, yaml_gate, refused", [("none", None, False), ("sigmoid", "none", True)])
@pytest.mark.parametrize("where", ["lora_model_dir", "output_dir"])
def test_merge_lora_judges_the_saved_adapters_gate_not_the_yamls(tmp_path, saved_gate, yaml_gate, refused, where):
    """`merge_lora` (Axolotl's `merge-lora` CLI) merges the adapter saved in `lora_model_dir` (else `output_dir`): an
    ungated one passes even where the YAML leaves `gatera_gate` at its default, and a gated one is refused even where
    the YAML says `gatera_gate: none`."""
    from peft import get_peft_model

    from gatera_plugin import GateRAConfig
    from gatera_plugin.integrations.axolotl.args import GateRAArgs
    from tests.helpers import tiny_llama

    get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], gate=saved_gate)).save_pretrained(
        tmp_path)
    keys = {"adapter": "gatera", "lora_target_modules": ["q_proj"], "merge_lora": True, "merge_method": "legacy",
            where: str(tmp_path), **({"gatera_gate": yaml_gate} if yaml_gate else {})}
    if refused:
        with pytest.raises(ValueError, match=r"`merge_lora` cannot be used with `adapter: gatera`"):
            GateRAArgs.model_validate(keys)
    else:
        GateRAArgs.model_validate(keys)


@pytest.mark.parametrize("config_only", [False, True], ids=["axolotl-builds", "trl-builds"])
def test_a_config_continuing_a_saved_adapter_is_read_as_describing_it(tmp_path, config_only):
    """With `lora_model_dir` the saved adapter's structure governs, so a YAML may leave it out: without targets it was
    refused at config read ("needs `lora_target_modules`"; `adapter: lora` takes such a YAML), and a
    `gatera_keep_ratio` for a saved threshold gate was refused as a sigmoid gate's unless the YAML repeated
    `gatera_gate: threshold`. Now both are read against the saved adapter: accepted, loaded with the saved targets and
    the YAML's keep_ratio; the same keep_ratio for a saved sigmoid gate is still refused, naming that gate."""
    from axolotl.utils.dict import DictDefault
    from peft import get_peft_model

    from gatera_plugin import GateRAConfig
    from gatera_plugin.integrations.axolotl import GateRAPlugin
    from gatera_plugin.integrations.axolotl.args import GateRAArgs
    from tests.helpers import tiny_llama

    for gate in ("threshold", "sigmoid"):
        get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj", "v_proj"], gate=gate)
                       ).save_pretrained(tmp_path / gate)
    keys = {"adapter": "gatera", "lora_model_dir": str(tmp_path / "threshold"), "gatera_keep_ratio": 0.3}
    GateRAArgs.model_validate(keys)
    model, config = GateRAPlugin().load_adapter(tiny_llama(), DictDefault(keys), config_only=config_only)
    config = model.peft_config["default"] if not config_only else config
    assert set(config.target_modules) == {"q_proj", "v_proj"} and (config.gate, config.keep_ratio) == ("threshold", 0.3)
    with pytest.raises(ValueError, match=r"`keep_ratio` only applies to gate='threshold', got gate='sigmoid'.*"
                                         r"`gatera_keep_ratio` sets keep_ratio"):
        GateRAArgs.model_validate({**keys, "lora_model_dir": str(tmp_path / "sigmoid")})
    # both an option the saved threshold gate refuses and one it takes: the reason given is the saved gate's
    with pytest.raises(ValueError, match=r"`entropy_weight`=0.1 needs sigmoid token gates, but gate='threshold'"):
        GateRAArgs.model_validate({**keys, "gatera_entropy_weight": 0.1})


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
@pytest.mark.parametrize("where", ["lora_model_dir", "output_dir"])
def test_a_saved_gatera_adapter_under_another_adapter_kind_is_refused(tmp_path, adapter, where):
    """A LoRA YAML pointed at a GateRA adapter: with `adapter: lora` Axolotl loaded the GateRA folder and its LoRA
    kernel patches failed on it (AttributeError), and `merge-lora` merged no tensor and wrote the base model
    unchanged, exit 0. Refused when the config is read, naming `adapter: gatera`; a LoRA folder passes."""
    from peft import LoraConfig, get_peft_model

    from gatera_plugin import GateRAConfig
    from gatera_plugin.integrations.axolotl.args import GateRAArgs
    from tests.helpers import tiny_llama

    get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], gate="none")).save_pretrained(
        tmp_path / "gatera")
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    keys = {"adapter": adapter, "lora_target_modules": ["q_proj"], **({"merge_lora": True} if where == "output_dir"
                                                                      else {})}
    with pytest.raises(ValueError, match=rf"`{where}: .*gatera` holds a GateRA adapter, but this config has adapter: "
                                         rf"'{adapter}'.*Set `adapter: gatera`"):
        GateRAArgs.model_validate({**keys, where: str(tmp_path / "gatera")})
    GateRAArgs.model_validate({**keys, where: str(tmp_path / "lora")})


@pytest.mark.parametrize("keys,message", [
    ({"load_in_4bit": True, "load_in_8bit": True}, r"`load_in_4bit` and `load_in_8bit` are both set.*Keep one"),
    ({"flash_attn_fuse_mlp": True}, r"`flash_attn_fuse_mlp: true` replaces the MLP's gate_proj / up_proj"),
    ({"use_onebitllms": True}, r"`use_onebitllms` .* not supported with `adapter: gatera`"),
    ({"rl": "dpo", "load_in_4bit": True, "gradient_checkpointing": True, "capabilities": {"n_gpu": 2},
      "gradient_checkpointing_kwargs": {"use_reentrant": True}}, r"Set `use_reentrant: False`"),
], ids=["4bit-and-8bit", "fused-mlp", "onebitllms", "distributed-rl-4bit-reentrant"])
def test_what_axolotl_refuses_for_lora_and_qlora_is_refused_for_gatera(keys, message):
    """Axolotl's checks for `adapter: lora` / `qlora` that `adapter: gatera` passed: both bit widths (qlora refuses
    them, lora takes 8-bit; gatera silently loaded 4-bit), fused MLP modules, BitNet training, and distributed RL on
    a 4-bit base with reentrant checkpointing."""
    from gatera_plugin.integrations.axolotl.args import GateRAArgs

    with pytest.raises(ValueError, match=message):
        GateRAArgs.model_validate({"adapter": "gatera", "lora_target_modules": ["q_proj"], **keys})


def test_a_continued_adapter_keeps_its_dropout_unless_the_yaml_sets_one_and_reports_every_structural_key(
        tmp_path, caplog):
    """With `lora_model_dir`, Axolotl's validation fills in `lora_dropout: 0.0` for a YAML without the key: the saved
    adapter's dropout stays (it was replaced by 0.0); one the YAML (or a CLI override) sets applies. YAML keys that
    would change the saved structure (targets, modules_to_save, layers, rank / alpha patterns) are reported, not
    ignored without a word."""
    from axolotl.utils.dict import DictDefault
    from peft import get_peft_model

    from gatera_plugin import GateRAConfig
    from gatera_plugin.integrations.axolotl import GateRAPlugin
    from tests.helpers import tiny_llama

    saved_dir = tmp_path / "adapter"
    get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj", "v_proj"], dropout=0.1)).save_pretrained(
        saved_dir)
    written = {"adapter": "gatera", "lora_target_modules": ["o_proj"], "lora_model_dir": str(saved_dir), "lora_r": 4,
               "lora_modules_to_save": ["lm_head"], "peft_layers_to_transform": [1],
               "lora_rank_pattern": {"o_proj": 2}, "axolotl_config_path": str(tmp_path / "run.yml")}
    plugin = GateRAPlugin()
    for yaml_dropout, expected in ((None, 0.1), (0.0, 0.0), (0.2, 0.2)):
        as_written = dict(written, **({} if yaml_dropout is None else {"lora_dropout": yaml_dropout}))
        plugin.register(DictDefault(as_written))
        validated = DictDefault(dict(as_written, lora_dropout=yaml_dropout or 0.0))  # Axolotl's filled-in default
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _, config = plugin.load_adapter(tiny_llama(), validated, config_only=True)
        assert config.dropout == expected, yaml_dropout
        report = next(r.getMessage() for r in caplog.records if "saved with other settings" in r.getMessage())
        for key in ("lora_target_modules", "lora_modules_to_save", "peft_layers_to_transform", "lora_rank_pattern"):
            assert f"'{key}'" in report, report
        assert config.target_modules == {"q_proj", "v_proj"} and not config.modules_to_save


def test_the_plugin_listed_by_its_module_path_too_declares_its_keys_once(monkeypatch):
    """`plugins: [gatera_plugin.integrations.axolotl.plugin.GateRAPlugin]` registers a second instance beside the entry
    point's (Axolotl tells plugins apart by the name given): only the first declares the YAML keys and the adapter
    (two declarations made Axolotl's config class fail with "duplicate base class GateRAArgs")."""
    from axolotl.integrations.base import PluginManager

    from gatera_plugin.integrations.axolotl import GateRAPlugin

    manager = PluginManager.get_instance()
    first, second = GateRAPlugin(), GateRAPlugin()
    monkeypatch.setattr(manager, "plugins", {"gatera_plugin.integrations.axolotl.GateRAPlugin": first,
                                             "gatera_plugin.integrations.axolotl.plugin.GateRAPlugin": second})
    assert first.get_input_args() == "gatera_plugin.integrations.axolotl.GateRAArgs"
    assert second.get_input_args() is None and second.get_adapter_capabilities() == []
    assert [c.name for c in first.get_adapter_capabilities()] == ["gatera"]


def test_the_config_check_reads_numbers_as_pydantic_does_and_names_only_keys_the_yaml_sets():
    """YAML reads `1e-3` as a string and Axolotl leaves some CLI overrides as strings; pydantic converts them, and so
    does the config-time check (it had refused them). Its note names the YAML keys that are set, not every field name
    the message happens to contain; every numeric key is converted."""
    import typing

    from gatera_plugin.integrations.axolotl.args import NUMBER_KEYS, GateRAArgs

    floats = {k for k, f in GateRAArgs.model_fields.items() if float in typing.get_args(f.annotation)}
    assert set(NUMBER_KEYS) == floats | {"lora_r", "lora_alpha", "lora_dropout"}
    GateRAArgs.model_validate({"adapter": "gatera", "lora_target_linear": True, "gatera_entropy_weight": "1e-3",
                               "lora_dropout": "5e-2", "lora_r": "16"})
    GateRAArgs.model_validate({"adapter": "gatera", "lora_target_linear": True, "lora_r": 16.0})  # (int field: 16)
    with pytest.raises(ValueError, match=r"`r` must be an integer"):
        GateRAArgs.model_validate({"adapter": "gatera", "lora_target_linear": True, "lora_r": 16.5})
    with pytest.raises(ValueError) as refused:
        GateRAArgs.model_validate({"adapter": "gatera", "lora_target_linear": True, "gatera_gate_bias_init": 30})
    assert "(In the YAML: `gatera_gate_bias_init` sets gate_bias_init.)" in str(refused.value)
    with pytest.raises(ValueError) as refused:
        GateRAArgs.model_validate({"adapter": "gatera"})
    assert "`adapter: gatera` needs" in str(refused.value) and "`adapter: gatera`: `adapter" not in str(refused.value)


def test_a_continued_all_linear_adapter_is_not_reported_as_other_targets(tmp_path, caplog):
    """PEFT saves `all-linear` as the names it expanded it to: the same YAML continuing the adapter is not reported
    as having other targets."""
    from axolotl.utils.dict import DictDefault
    from peft import get_peft_model

    from gatera_plugin import GateRAConfig
    from gatera_plugin.integrations.axolotl import GateRAPlugin
    from tests.helpers import tiny_llama

    get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules="all-linear")).save_pretrained(tmp_path)
    cfg = DictDefault({"adapter": "gatera", "lora_target_modules": "all-linear", "lora_r": 4,
                       "lora_model_dir": str(tmp_path)})
    with caplog.at_level(logging.WARNING):
        GateRAPlugin().load_adapter(tiny_llama(), cfg, config_only=True)
    assert not [r for r in caplog.records if "saved with other settings" in r.getMessage()], caplog.text


@pytest.mark.parametrize("head, task_type", [("SequenceClassification", "SEQ_CLS"), ("TokenClassification", "TOKEN_CLS")])
def test_reward_models_get_their_task_type_and_train_their_head(head, task_type):
    """`reward_model: true` (Axolotl loads a SequenceClassification model) and `process_reward_model: true`
    (TokenClassification): the adapter is built for that task, as Axolotl's LoRA is, so PEFT trains and saves the new
    `score` head. Before, the plugin always asked for a causal LM, and PEFT's causal-LM wrapper failed with
    "object has no attribute 'prepare_inputs_for_generation'" once the model had loaded."""
    import transformers
    from axolotl.utils.dict import DictDefault

    from gatera_plugin.integrations.axolotl import GateRAPlugin
    from tests.helpers import tiny_llama_config

    torch.manual_seed(0)
    base = getattr(transformers, f"LlamaFor{head}")(tiny_llama_config())
    model, _ = GateRAPlugin().load_adapter(base, DictDefault({"adapter": "gatera", "lora_target_modules": ["q_proj"]}))
    assert model.peft_config["default"].task_type == task_type
    assert any(p.requires_grad for n, p in model.named_parameters() if "score" in n)
    output = model(input_ids=torch.randint(3, 100, (2, 6)), labels=torch.zeros(2, dtype=torch.long)
                   if head == "SequenceClassification" else torch.zeros(2, 6, dtype=torch.long))
    output.loss.backward()


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe", "jamba", "falcon_h1"])
@pytest.mark.parametrize("bits, lora_like", [(4, "qlora"), (8, "lora")])
def test_load_in_kbit_quantises_as_axolotl_does_for_its_own_adapter(model_type, bits, lora_like):
    """`load_in_4bit` / `load_in_8bit` with `adapter: gatera` build the bitsandbytes config Axolotl builds for
    `qlora` / `lora`, with its per-architecture settings: fp32 quant storage for qwen2_moe and jamba (Axolotl: bf16
    storage puts the loss off by an order of magnitude there), modules left unquantised for falcon_h1 and jamba.
    Before, the plugin built a generic config of its own and quantised those differently, silently."""
    import types

    from axolotl.loaders.model import ModelLoader
    from axolotl.utils.dict import DictDefault

    from gatera_plugin.integrations.axolotl.plugin import _patch_quantization_config

    _patch_quantization_config()

    def quantization(adapter):
        loader = ModelLoader.__new__(ModelLoader)
        loader.cfg = DictDefault({"adapter": adapter, f"load_in_{bits}bit": True, "torch_dtype": torch.bfloat16,
                                  "model_config_type": model_type})
        loader.model_kwargs, loader.model_config = {}, types.SimpleNamespace()
        ModelLoader._set_quantization_config(loader)
        assert loader.cfg.adapter == adapter
        return loader.model_kwargs["quantization_config"].to_dict()

    assert quantization("gatera") == quantization(lora_like)
    assert quantization("gatera")[f"load_in_{bits}bit"]


def test_a_continued_threshold_adapter_reports_a_yaml_threshold_init_it_does_not_use(tmp_path, caplog):
    """`gatera_threshold_init` sets a new threshold gate's τ; a continued adapter (`lora_model_dir`) keeps its trained
    τ, and a YAML value other than the saved one is reported with the structural keys (it was dropped silently)."""
    from axolotl.utils.dict import DictDefault
    from peft import get_peft_model

    from gatera_plugin import GateRAConfig
    from gatera_plugin.integrations.axolotl import GateRAPlugin
    from tests.helpers import tiny_llama

    saved_dir = tmp_path / "adapter"
    get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], gate="threshold", threshold_init=0.1,
                                              init_weights=False)).save_pretrained(saved_dir)
    written = {"adapter": "gatera", "lora_target_modules": ["q_proj"], "lora_model_dir": str(saved_dir), "lora_r": 4,
               "gatera_gate": "threshold", "gatera_threshold_init": 0.3,
               "axolotl_config_path": str(tmp_path / "run.yml")}
    plugin = GateRAPlugin()
    plugin.register(DictDefault(written))
    with caplog.at_level(logging.WARNING):
        _, config = plugin.load_adapter(tiny_llama(), DictDefault(written), config_only=True)
    assert config.threshold_init == 0.1
    report = next(r.getMessage() for r in caplog.records if "saved with other settings" in r.getMessage())
    assert "'gatera_threshold_init': (0.3, 0.1)" in report, report


def test_a_gatera_key_on_the_command_line_is_refused_naming_the_yaml_key():
    """`axolotl train x.yml --launcher python --gatera-entropy-weight=0.2` trained with the YAML's weight (the `axolotl`
    command, a click command, hands options it does not know to the launcher as extra arguments, which the python
    launcher drops): refused when the plugin registers inside that command, naming the key to set in the YAML; other
    extra arguments, and registering outside a click command (`python -m axolotl.cli.train`, fire), pass."""
    import click

    from gatera_plugin.integrations.axolotl import GateRAPlugin

    GateRAPlugin().register({})
    with click.Context(click.Command("train")) as context:
        context.args = ["--some-launcher-flag"]
        GateRAPlugin().register({})
        context.args = ["--gatera-entropy-weight=0.2"]
        with pytest.raises(ValueError, match=r"--gatera-entropy-weight=0.2: the `axolotl` command passes on only "
                                             r"Axolotl's own options.*Set `gatera_entropy_weight` in the YAML"):
            GateRAPlugin().register({})
