"""The examples' command lines: what the demo and examples/train_sft.py refuse before loading a model, and the claim
that keeps two demo runs from writing one adapter folder (CI runs the demo itself: `bash examples/demo.sh --steps
10`; the distributed tests run train_sft.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def _refused(monkeypatch, capsys, *argv) -> str:
    import demo

    monkeypatch.setattr(sys, "argv", ["demo.py", "--tiny", *argv])
    with pytest.raises(SystemExit) as exited:
        demo.main()
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_the_demo_refuses_too_few_steps_and_an_out_that_is_a_file_or_not_empty(tmp_path, monkeypatch, capsys):
    """`--steps` below 2 (it trained 60 steps for 0, failed "the loss did not fall" for 1-9 with one logged loss);
    `--out` naming a file (a traceback) or a folder with anything in it: exit code 2, one line naming the option."""
    assert "--steps 1: give at least 2" in _refused(monkeypatch, capsys, "--steps", "1")
    assert "--steps 0: give at least 2" in _refused(monkeypatch, capsys, "--steps", "0")
    (tmp_path / "file").write_text("x")
    assert "is a file; pass a new folder" in _refused(monkeypatch, capsys, "--out", str(tmp_path / "file"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "adapter_config.json").write_text("{}")
    assert "already exists and is not empty" in _refused(monkeypatch, capsys, "--out", str(tmp_path / "full"))
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["adapter_config.json"]


def test_a_second_run_into_the_same_new_folder_is_refused_while_the_first_runs(tmp_path, monkeypatch, capsys):
    """Two runs started with one --out: the first claims the folder at start, the second is refused at once (both
    trained and the second replaced the first's adapter); the claim goes when the first run ends."""
    import demo

    parser = demo.argparse.ArgumentParser()
    claim = demo.claim_folder(parser, tmp_path / "new")
    assert "another demo run is writing there" in _refused(monkeypatch, capsys, "--out", str(tmp_path / "new"))
    assert claim.exists()
    claim.unlink()
    assert demo.claim_folder(parser, tmp_path / "new") == claim


def test_train_sft_refuses_to_replace_a_finished_adapter_unless_resuming(tmp_path, capsys):
    """examples/train_sft.py into an --output-dir that holds a trained adapter (a finished run) replaced its adapter
    and metrics.json; it is refused before anything loads, unless --resume continues that run; a file is refused.
    `--resume last` is offered, and taken, only where the folder holds a checkpoint (a run without --save-steps saves
    none: the advice led to a traceback from the Trainer)."""
    import train_sft

    (tmp_path / "adapter_config.json").write_text("{}")
    for argv, message in ((["--output-dir", str(tmp_path)], "holds no checkpoint-* folder to resume from"),
                          (["--output-dir", str(tmp_path), "--resume", "last"], "--resume last: --output-dir"),
                          (["--output-dir", str(tmp_path / "adapter_config.json")], "is a file; pass a folder")):
        with pytest.raises(SystemExit) as exited:
            train_sft.parse_args(argv)
        assert exited.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "checkpoint-best.tar").write_text("")  # (not a checkpoint the Trainer resumes from)
    with pytest.raises(SystemExit):
        train_sft.parse_args(["--output-dir", str(tmp_path), "--resume", "last"])
    assert "holds no checkpoint-* folder" in capsys.readouterr().err
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(SystemExit):
        train_sft.parse_args(["--output-dir", str(tmp_path)])
    assert "or --resume last to continue that run" in capsys.readouterr().err
    assert train_sft.parse_args(["--output-dir", str(tmp_path), "--resume", "last"]).resume == "last"
    assert train_sft.parse_args(["--output-dir", str(tmp_path / "new")]).output_dir == str(tmp_path / "new")


def test_train_sft_refuses_to_overwrite_an_interrupted_runs_checkpoints(tmp_path, capsys):
    """A run that crashed or was preempted leaves checkpoint-* folders but no final adapter: a new run into that
    folder without --resume overwrote its checkpoints (and metrics.json). Refused, naming the last checkpoint (by
    step, not by name: checkpoint-10 after checkpoint-9) and --resume last, which is then taken."""
    import train_sft

    for step in (9, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    with pytest.raises(SystemExit) as exited:
        train_sft.parse_args(["--output-dir", str(tmp_path)])
    assert exited.value.code == 2
    assert "holds checkpoint-10 of an earlier run" in capsys.readouterr().err
    assert train_sft.parse_args(["--output-dir", str(tmp_path), "--resume", "last"]).resume == "last"


def test_train_sft_data_errors_name_the_file_and_line(tmp_path, capsys):
    """--data that is missing, or holds a line that is not a prompt/completion object, ended in a traceback after
    the model loaded (a JSONDecodeError naming neither file nor line); it is refused before anything loads. Blank
    lines (a trailing one, as editors leave) are skipped."""
    import train_sft
    from common import DATA, load_rows

    lines = DATA.read_text().splitlines()[:3]
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n".join(lines) + "\n\n")
    assert train_sft.parse_args(["--output-dir", str(tmp_path / "o"), "--data", str(blank)]).data == str(blank)
    assert len(load_rows("train", blank)) + len(load_rows("test", blank)) == 3
    chat = tmp_path / "chat.jsonl"  # (TRL's conversational rows pass too)
    chat.write_text('{"prompt": [{"role": "user", "content": "Neon?"}], '
                    '"completion": [{"role": "assistant", "content": "A gas."}]}\n')
    assert train_sft.parse_args(["--output-dir", str(tmp_path / "o"), "--data", str(chat), "--model", "m"]).data
    with pytest.raises(SystemExit):  # (the tiny model's tokenizer has no chat template)
        train_sft.parse_args(["--output-dir", str(tmp_path / "o"), "--data", str(chat)])
    assert "--model tiny has none" in capsys.readouterr().err
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(chat.read_text() + lines[0] + "\n")
    with pytest.raises(SystemExit):
        train_sft.parse_args(["--output-dir", str(tmp_path / "o"), "--data", str(mixed), "--model", "m"])
    assert "mixes texts and message lists" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(lines[0] + "\n{not json\n")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(lines[0] + '\n{"question": "?"}\n')
    for data, message in ((tmp_path / "missing.jsonl", "No such file"), (broken, f"{broken}:2: not a JSON object"),
                          (wrong, f"{wrong}:2: a row needs the fields \"prompt\" and \"completion\"")):
        with pytest.raises(SystemExit) as exited:
            train_sft.parse_args(["--output-dir", str(tmp_path / "o"), "--data", str(data)])
        assert exited.value.code == 2
        assert message in capsys.readouterr().err


def test_train_sft_packs_a_4bit_base_for_fsdp2_under_an_accelerate_config(tmp_path, monkeypatch):
    """`accelerate launch --config_file integrations/accelerate/fsdp2.yaml examples/train_sft.py --load-in-4bit`
    (integrations/README.md's QLoRA-FSDP command) stored the 4-bit bytes as uint8, which FSDP2 does not shard: every
    GPU held the whole base. The bytes are packed in bf16 under an accelerate FSDP config as under --fsdp 2."""
    import torch
    import train_sft
    import transformers

    storages = []

    class Stop(Exception):
        pass

    class RecordingConfig(transformers.BitsAndBytesConfig):
        def __init__(self, **kwargs):
            storages.append(kwargs.get("bnb_4bit_quant_storage"))
            raise Stop

    monkeypatch.setattr(transformers, "BitsAndBytesConfig", RecordingConfig)
    argv = ["--output-dir", str(tmp_path / "o"), "--load-in-4bit", "--cpu"]
    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):  # (not launched by accelerate first)
        monkeypatch.delenv(key, raising=False)
    for env, expected in (({}, torch.uint8), ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, torch.bfloat16)):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(Stop):
            train_sft.build_trainer(train_sft.parse_args(argv))
        assert storages[-1] == expected
    assert train_sft.parse_args(argv + ["--max-length", "512", "--max-grad-norm", "1"]).max_length == 512


def test_train_sft_goes_offline_only_for_its_tiny_model(tmp_path):
    """examples/train_sft.py set HF_HUB_OFFLINE=1 for every run, so `--model HuggingFaceTB/SmolLM2-135M-Instruct`
    (a Hub id, as the Axolotl YAMLs name it) failed on a machine with network unless already cached. Only the tiny
    model, which downloads nothing, runs offline now."""
    import os
    import subprocess

    code = ("import os, sys; sys.path.insert(0, 'examples'); import train_sft; "
            "train_sft.parse_args(sys.argv[1:]); print(os.environ.get('HF_HUB_OFFLINE'))")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    root = Path(__file__).resolve().parents[1]
    offline = {}
    for model in ("tiny", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        done = subprocess.run([sys.executable, "-c", code, "--model", model, "--output-dir", str(tmp_path / "out")],
                              capture_output=True, text=True, env=env, cwd=root, timeout=120)
        assert done.returncode == 0, done.stderr
        offline[model] = done.stdout.strip()
    assert offline == {"tiny": "1", "HuggingFaceTB/SmolLM2-135M-Instruct": "None"}
