"""`gatera eval`: lm-evaluation-harness's command line with GateRA registered, tested offline on a local task file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

from gatera_plugin import GateRAConfig
from gatera_plugin.cli import main

from .helpers import randomize_adapters, tiny_llama, word_tokenizer

lm_eval_main = pytest.importorskip("lm_eval.__main__", reason="`gatera eval` needs the `eval` extra (lm-eval)")

ROWS = [  # a two-choice task over the tokenizer's words: (question, choices, label)
    ("count one two", ["three", "four"], 0),
    ("count two three", ["nine", "four"], 1),
    ("count three four", ["five", "one"], 0),
    ("count five six", ["two", "seven"], 1),
]


def test_eval_hands_its_arguments_to_lm_eval_unchanged(monkeypatch):
    seen = []
    monkeypatch.setattr(lm_eval_main, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    argv_before = list(sys.argv)
    args = ["--model", "hf", "--model_args", "pretrained=BASE,peft=ADAPTER", "--tasks", "t1,t2", "--help"]
    assert main(["eval", *args]) == 0
    assert seen == [["lm-eval", *args]]
    assert sys.argv == argv_before  # restored


def test_eval_returns_lm_eval_exit_code(monkeypatch):
    def fails():
        raise SystemExit(2)  # what argparse does on a bad option

    monkeypatch.setattr(lm_eval_main, "cli_evaluate", fails)
    assert main(["eval", "--no-such-option"]) == 2


@pytest.mark.parametrize("error", [OSError("/no/such is not a folder"), ValueError("The GateRA adapter does not fit"),
                                   KeyError("nosuchtask")], ids=lambda e: type(e).__name__)
def test_eval_reports_a_model_or_task_that_does_not_load_in_one_line(monkeypatch, capsys, error):
    """What lm-eval raises for a `pretrained=` / `peft=` path that does not load (GateRA's own "does not fit this base
    model" included) or an unknown task: one line naming it, exit code 2 (a traceback, exit code 1)."""
    def fails():
        raise error

    monkeypatch.setattr(lm_eval_main, "cli_evaluate", fails)
    assert main(["eval", "--model", "hf", "--tasks", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gatera eval: {type(error).__name__}: ")


def test_eval_without_lm_eval_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)  # import fails as if lm-eval were not installed
    assert main(["eval", "--tasks", "x"]) == 2
    assert "pip install 'gatera-plugin[eval]'" in capsys.readouterr().err


def test_eval_is_listed_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "eval" in capsys.readouterr().out


def _write_fixture(root: Path) -> tuple[Path, Path, Path]:
    """A tiny base model + tokenizer, a GateRA adapter with random (trained-like) weights, and a local task file."""
    texts = [q + " " + " ".join(choices) for q, choices, _ in ROWS]
    tokenizer = word_tokenizer(texts)
    base_dir, adapter_dir = root / "base", root / "adapter"
    vocab = len(tokenizer)  # lm-eval resizes the embeddings to the tokenizer when they differ
    tiny_llama(vocab=vocab, init_std=0.2).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    config = GateRAConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    model = randomize_adapters(get_peft_model(tiny_llama(vocab=vocab, init_std=0.2), config), scale=0.5)
    model.save_pretrained(adapter_dir)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in ROWS))
    (root / "tasks").mkdir()
    (root / "tasks" / "gatera_tiny.yaml").write_text(
        "task: gatera_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    return base_dir, adapter_dir, root / "tasks"


def _loglikelihoods(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-eval's `hf` model computes it (no special tokens added)."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(ids) - len(context_ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0, -n:].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[-n:]).unsqueeze(1)).sum().item()


@pytest.mark.slow
def test_gatera_eval_runs_lm_eval_with_the_adapter_and_plain_lm_eval_cannot(tmp_path):
    """`gatera eval` finishes and reports accuracy, with log-likelihoods that are the adapted model's (not the base
    model's); the same arguments to plain `lm_eval` fail with KeyError 'GATERA' (nothing registers the method)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dir, tasks_dir = _write_fixture(tmp_path)
    out_dir = tmp_path / "out"
    args = ["--model", "hf", "--model_args", f"pretrained={base_dir},peft={adapter_dir}", "--tasks", "gatera_tiny",
            "--include_path", str(tasks_dir), "--device", "cpu", "--batch_size", "2", "--output_path", str(out_dir),
            "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).parent / "gatera"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gatera_plugin.cli"]
    run = subprocess.run([*command, "eval", *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "gatera_tiny" in run.stdout and "acc" in run.stdout  # lm-eval's results table

    (results_file,) = out_dir.rglob("results_*.json")
    accuracy = json.loads(results_file.read_text())["results"]["gatera_tiny"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0
    (samples_file,) = out_dir.rglob("samples_gatera_tiny_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == len(ROWS)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    for sample in samples:
        for request, response in zip(sample["arguments"].values(), sample["filtered_resps"]):
            context, continuation = request["arg_0"], request["arg_1"]
            reported = float(response[0])
            # batch-of-2 padding in lm-eval vs one sequence here: float rounding only
            assert reported == pytest.approx(_loglikelihoods(adapted, tokenizer, context, continuation), abs=1e-4)
            assert abs(reported - _loglikelihoods(base, tokenizer, context, continuation)) > 1e-3

    plain = subprocess.run([sys.executable, "-m", "lm_eval", *args], capture_output=True, text=True, env=env,
                           timeout=600)
    assert plain.returncode != 0 and "KeyError: 'GATERA'" in plain.stderr
