"""Saves under concurrency, with real processes: several writers into one folder, readers during the saves, and
saves killed with SIGKILL (the staging folders they leave are removed by the next save)."""

import multiprocessing
import os
import signal
import time
import traceback

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

from gatera_plugin import GateRAConfig
from tests.helpers import randomize_adapters, tiny_llama

pytestmark = pytest.mark.skipif(os.name != "posix", reason="fork and SIGKILL")
CTX = multiprocessing.get_context("fork")  # the children share the imports; DataLoader workers fork the same way
TARGETS = ["q_proj", "v_proj"]


def _model(seed):
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS))
    torch.manual_seed(seed)
    return randomize_adapters(model)


def _state(model):
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _report(errors, who):
    errors.put(f"{who}: {traceback.format_exc()}")


def _slow_file_system():
    """Widen the windows between a save's file operations (a busy network file system), so that races show up in a
    few saves instead of 1-10 in 600: each link and rename waits 5 ms first."""
    for name in ("replace", "link"):
        real = getattr(os, name)

        def slow(*args, _real=real, **kwargs):
            time.sleep(0.005)
            return _real(*args, **kwargs)

        setattr(os, name, slow)


def _writer(folder, seed, rounds, errors):
    try:
        _slow_file_system()
        model = _model(seed)
        for _ in range(rounds):
            model.save_pretrained(folder)
    except BaseException:
        _report(errors, f"writer {seed}")


def _reader(folder, states, rounds, errors):
    try:
        for _ in range(rounds):
            loaded = PeftModel.from_pretrained(tiny_llama(), folder)
            state = _state(loaded)
            if not any(_same(state, expected) for expected in states):
                errors.put("reader: loaded an adapter that no single save wrote (a mix of saves)")
    except BaseException:
        _report(errors, "reader")


def _run(processes, timeout=240):
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in processes if p.is_alive()]
    for process in hung:
        process.kill()
    assert not hung, f"{len(hung)} process(es) hung"


def test_concurrent_saves_and_loads_of_one_folder(tmp_path):
    """4 processes save 6 times each into one folder (every data-parallel rank saving) while 2 processes load it
    over and over: no exception anywhere, every load is exactly one writer's adapter, and the folder ends as one
    complete adapter, the last writer's, with no staging folder or backup left."""
    folder = tmp_path / "adapter"
    seeds = [1, 2, 3, 4]
    states = [_state(_model(seed)) for seed in seeds]
    _model(0).save_pretrained(folder)  # readers start on a complete adapter
    states.append(_state(_model(0)))
    errors = CTX.Queue()
    writers = [CTX.Process(target=_writer, args=(folder, seed, 6, errors)) for seed in seeds]
    readers = [CTX.Process(target=_reader, args=(folder, states, 6, errors)) for _ in range(2)]
    _run(writers + readers)
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    assert not reported, "\n".join(reported)
    assert all(p.exitcode == 0 for p in writers + readers)
    final = _state(PeftModel.from_pretrained(tiny_llama(), folder))
    assert any(_same(final, expected) for expected in states[:4])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def _save_and_hang(folder, seed, stage, ready):
    """Save, but stop for good at `stage` ("writing": weights written by PEFT; "staged": the whole adapter staged and
    stamped, before the first rename; "renaming": weights renamed into place, the folder's lock held), after touching
    `ready`; the parent then kills this process with SIGKILL."""
    import peft.peft_model

    import gatera_plugin.serialization

    def hang():
        open(ready, "w").close()
        time.sleep(600)

    if stage == "writing":
        real_save = peft.peft_model.safe_save_file

        def save_then_hang(*args, **kwargs):
            real_save(*args, **kwargs)
            hang()

        peft.peft_model.safe_save_file = save_then_hang
    elif stage == "staged":
        gatera_plugin.serialization._move_into_place = lambda *args: hang()
    else:
        real_replace = os.replace

        def replace(src, dst):
            if str(dst).endswith("adapter_config.json"):
                hang()
            real_replace(src, dst)

        os.replace = replace
    _model(seed).save_pretrained(folder)


def _resume(checkpoint):
    """What the Trainer does with a checkpoint folder when it resumes (it takes a subfolder holding adapter weights
    for a second adapter); returns the model."""
    from transformers import Trainer, TrainingArguments

    model = _model(3)
    args = TrainingArguments(output_dir=str(checkpoint.parent / "run"), use_cpu=True, report_to="none")
    Trainer(model=model, args=args)._load_from_checkpoint(str(checkpoint))
    return model


@pytest.mark.parametrize("stage", ["writing", "staged", "renaming"])
def test_a_save_killed_with_sigkill_is_cleaned_up_by_the_next_save(tmp_path, stage):
    """Until the next save, the folder holds the previous adapter (a Trainer resumes from it, as from a checkpoint, not
    taking the dead staging folder for a second adapter), or, killed between the renames, refuses to load."""
    folder = tmp_path / "adapter"
    _model(0).save_pretrained(folder)
    ready = tmp_path / "ready"
    child = CTX.Process(target=_save_and_hang, args=(folder, 1, stage, ready))
    child.start()
    deadline = time.monotonic() + 120
    while not ready.exists() and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the child never reached the stage"
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    leftovers = [p for p in folder.iterdir() if p.name.startswith(".gatera-save-")]
    assert len(leftovers) == 1 and any(leftovers[0].iterdir())  # what every kill -9 used to leave forever
    if stage == "renaming":  # killed between the renames, holding the lock: the kernel released it
        with pytest.raises(ValueError, match="does not match the checksum"):
            PeftModel.from_pretrained(tiny_llama(), folder)
    else:
        resumed = _resume(folder)
        assert list(resumed.peft_config) == ["default"]
        assert _same(_state(resumed), _state(_model(0)))
    _model(2).save_pretrained(folder)  # must neither hang on the dead save's lock nor keep its staging folder
    assert not [p for p in folder.iterdir() if p.name.startswith(".gatera-save-")]
    assert _same(_state(PeftModel.from_pretrained(tiny_llama(), folder)), _state(_model(2)))
