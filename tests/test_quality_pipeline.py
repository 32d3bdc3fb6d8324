"""The quality benchmark and the gate plots, on tiny inputs, so that the pipeline cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from gatera_plugin import GateRAConfig, GateRALayer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def _model(save_base_to=None):
    from common import tiny_model_and_tokenizer

    model, tokenizer = tiny_model_and_tokenizer()
    if save_base_to is not None:
        model.save_pretrained(save_base_to)
    return get_peft_model(model, GateRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                              init_weights=False)), tokenizer


def test_recorded_gates_equal_a_full_forward_without_cache():
    """Gates recorded token by token with the KV cache are those of one forward over prompt + answer."""
    from gatera_plugin.gates import SigmoidGate
    from gatera_plugin.visualize import record_gates

    model, tokenizer = _model()
    prompt, answer = "Question: Tell me about the element Neon.\nAnswer:", " Neon has the chemical symbol Ne"
    trace = record_gates(model, tokenizer, prompt, answer)
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert trace.gates.shape == (6, len(ids)) and trace.prompt_length == len(prompt_ids)
    values = []
    hooks = [m.register_forward_hook(lambda m, a, out: values.append(out.reshape(-1)))
             for m in model.modules() if isinstance(m, SigmoidGate)]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(trace.gates, torch.stack(values), rtol=1e-5, atol=1e-6)
    layers, prompt_mean, answer_mean = trace.layer_means()
    assert layers == [0, 1]
    torch.testing.assert_close(prompt_mean[0], trace.gates[:3, : len(prompt_ids)].mean())


def test_the_summary_means_are_over_every_gate():
    """The summary's (and `gatera plot`'s printed) mean gate on prompt and on answer is the mean over every gate
    (module × token), as bench/gate_summary.py takes it. It was the mean of the layers' means, which weighs layer 0's
    one gated module like layer 1's seven: on the prompt here it read 0.539 against 0.269."""
    from gatera_plugin.visualize import record_gates
    from tests.helpers import randomize_adapters

    model, tokenizer = _model()
    model = get_peft_model(model.unload(), GateRAConfig(r=4, target_modules=r".*(0\.self_attn\.q_proj|1\..*_proj)",
                                                        init_weights=False, gate_bias_init=-1.0))
    randomize_adapters(model)
    with torch.no_grad():  # (layer 0's one gate wide open, layer 1's seven nearly closed: the two means differ)
        for name, param in model.named_parameters():
            if "gatera_gate" in name and name.endswith("bias"):
                param.fill_(4.0 if ".layers.0." in name else -3.0)
    trace = record_gates(model, tokenizer, "Question: Tell me about Neon", answer=" Neon is a gas")
    assert len({name.split(".")[2] for name in trace.modules}) == 2 and len(trace.modules) > 2
    for key, part in (("prompt_mean", slice(None, trace.prompt_length)), ("answer_mean", slice(trace.prompt_length,
                                                                                                 None))):
        assert trace.summary[key] == pytest.approx(trace.gates[:, part].mean().item(), rel=1e-6)


def test_recorded_gates_are_the_active_adapters_only():
    """A second gated adapter, loaded but inactive, runs no gate: it is left out (it made torch.cat fail); when it
    is the active one, its gates are recorded, named with the adapter."""
    from gatera_plugin.visualize import record_gates

    model, tokenizer = _model()
    model.add_adapter("other", GateRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    trace = record_gates(model, tokenizer, "Question: Tell me about Neon", max_new_tokens=3)
    assert trace.modules[0] == "model.layers.0.self_attn.q_proj" and len(trace.modules) == 6
    model.set_adapter("other")
    trace = record_gates(model, tokenizer, "Question: Tell me about Neon", max_new_tokens=3)
    assert trace.modules[0] == "model.layers.0.self_attn.q_proj [other]" and len(trace.modules) == 4


def test_recorded_gates_feed_the_token_ids_on_the_input_embeddings_device(monkeypatch):
    """On a GPU model the prompt and each decoded token go to the input embedding's device (they stayed on the CPU:
    the embedding lookup failed). Here the embedding reports the meta device and the model's forward, wrapped,
    records the device of each call's ids and runs the ids it was due (the prompt's, then the answer's one by one)
    on the CPU."""
    from gatera_plugin.visualize import record_gates

    model, tokenizer = _model()
    prompt, answer = "Question: Tell me about Neon", " Neon has"
    due = [tokenizer(prompt)["input_ids"]] + [[t] for t in tokenizer(answer, add_special_tokens=False)["input_ids"]]
    devices, forward = [], model.forward

    def recording_forward(input_ids=None, **kwargs):
        devices.append(input_ids.device.type)
        return forward(input_ids=torch.tensor([due[len(devices) - 1]]), **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    monkeypatch.setattr(model, "get_input_embeddings", lambda: torch.nn.Embedding(2, 2, device="meta"))
    trace = record_gates(model, tokenizer, prompt, answer)
    assert devices == ["meta"] * len(due)
    assert trace.gates.device.type == "cpu" and trace.gates.shape[1] == sum(map(len, due))


def test_recording_gates_gives_a_training_model_back_in_training_mode():
    """`record_gates` switches to eval for the recording; a training loop that plots its gates every N steps got its
    model back in eval mode (no dropout, no gate penalty from then on: `Trainer` hides it, a custom loop does not).
    Every module gets its own mode back (a part kept in eval stays so); a refused recording gives the model back as
    well."""
    from gatera_plugin.visualize import record_gates

    model, tokenizer = _model()
    model.train()
    frozen = model.base_model.model.model.layers[0]  # (a part the caller keeps in eval mode stays there)
    frozen.eval()
    record_gates(model, tokenizer, "Question: Tell me about Neon", max_new_tokens=2)
    assert all(m.training == (m not in set(frozen.modules())) for m in model.modules())
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        record_gates(model, tokenizer, "Question: Tell me about Neon", answer=" ")
    assert model.training
    model.eval()
    record_gates(model, tokenizer, "Question: Tell me about Neon", max_new_tokens=2)
    assert not model.training
    # the modules' own train() runs on the way back: GateRA drops the deltas it cached for the eval-mode recording
    from common import tiny_model_and_tokenizer

    cached = get_peft_model(tiny_model_and_tokenizer()[0], GateRAConfig(r=4, target_modules=["q_proj"],
                                                                       cache_delta=True, init_weights=False))
    cached.train()
    layers = [m for m in cached.modules() if isinstance(m, GateRALayer)]
    record_gates(cached, tokenizer, "Question: Tell me about Neon", max_new_tokens=2)
    assert cached.training and layers and not any(layer._delta_cache for layer in layers)
def test_a_greedy_recording_stops_at_the_generation_configs_end_of_turn():
    """An instruct model ends its turn with an id of its generation config (Llama 3's <|eot_id|>), not always the
    tokenizer's end of sequence: the recording went on past it, as `generate` does not."""
    from gatera_plugin.visualize import record_gates

    model, tokenizer = _model()
    prompt = "Question: Tell me about Neon"
    free = record_gates(model, tokenizer, prompt, max_new_tokens=6)
    generated = tokenizer(free.summary["generated"], add_special_tokens=False)["input_ids"]
    assert len(generated) == 6
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, generated[1]]  # (the 2nd answer token ends a turn)
    stopped = record_gates(model, tokenizer, prompt, max_new_tokens=6)
    assert tokenizer(stopped.summary["generated"], add_special_tokens=False)["input_ids"] == generated[:2]


def test_a_chat_recording_prompts_through_the_chat_template_and_a_half_precision_load(tmp_path, capsys):
    """`gatera plot --chat --dtype bfloat16`: an instruct adapter is trained on its chat template, so its gates are
    recorded on the prompt as the template's user turn; a 7B base loads in bf16 (it loaded in fp32 only, on the
    CPU only). A tokenizer without a template, and a --device that is no device or a GPU this machine lacks, are
    refused naming the option (the device before anything loads)."""
    from gatera_plugin.cli import main
    from gatera_plugin.visualize import load_adapter, record_gates

    model, tokenizer = _model(save_base_to=tmp_path / "base")
    prompt = "Tell me about Neon"
    with pytest.raises(ValueError, match=r"`chat` \(CLI: --chat\) needs a tokenizer with a chat template"):
        record_gates(model, tokenizer, prompt, max_new_tokens=2, chat=True)
    tokenizer.chat_template = "{% for m in messages %}Question: {{ m['content'] }}{% endfor %} Answer:"
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    loaded, loaded_tokenizer = load_adapter(str(tmp_path / "adapter"), str(tmp_path / "base"), dtype=torch.bfloat16)
    assert {p.dtype for n, p in loaded.named_parameters() if "gatera" not in n} == {torch.bfloat16}
    trace = record_gates(loaded, loaded_tokenizer, prompt, max_new_tokens=2, chat=True)
    templated = tokenizer("Question: Tell me about Neon Answer:", add_special_tokens=False)["input_ids"]
    assert trace.prompt_length == len(templated) and trace.tokens[: len(templated)] == [
        tokenizer.decode([t]) for t in templated]
    argv = ["plot", str(tmp_path / "adapter"), "--base-model", str(tmp_path / "base"), "--prompt", prompt, "--out",
            str(tmp_path / "gates.png")]
    for device, message in (("gpu", "--device 'gpu' names no device"), ("cuda:1", "has no cuda device"),
                            ("mps", "has no mps device"), ("meta", "has no meta device")):
        if device != "gpu" and torch.accelerator.is_available():
            continue
        assert main([*argv, "--device", device]) == 2
        assert message in capsys.readouterr().err


def test_a_gpu_index_the_machine_lacks_is_refused(monkeypatch):
    """`--device cuda:1` on a one-GPU machine (faked here: no GPU) is refused before loading; cuda:0, cpu and cpu:0
    pass."""
    from gatera_plugin.visualize import check_device

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *args: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"--device 'cuda:1': this machine has 1 cuda device\(s\), numbered from 0"):
        check_device("cuda:1")
    for device in ("cuda:0", "cuda", "cpu", "cpu:0", "auto"):
        check_device(device)


def test_recording_past_the_models_positions_is_refused_naming_the_option():
    """A model with learned positions (GPT-2: `n_positions`) asked for more tokens than it has positions: an
    `IndexError` from deep in torch's embedding lookup, after the prefill; now a ValueError naming --max-new-tokens
    (or --answer) before any forward."""
    from common import tiny_model_and_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from gatera_plugin.visualize import record_gates

    tokenizer = tiny_model_and_tokenizer()[1]
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=32, n_layer=1, n_head=2))
    model = get_peft_model(base, GateRAConfig(r=2, target_modules=["c_fc"], init_weights=False))
    prompt = "Question: Tell me about Neon"
    with pytest.raises(ValueError, match=r"exceed the 16 positions .* lower --max-new-tokens"):
        record_gates(model, tokenizer, prompt, max_new_tokens=20)
    with pytest.raises(ValueError, match=r"lower --answer"):
        record_gates(model, tokenizer, prompt, answer=" Neon" * 20)
    assert record_gates(model, tokenizer, prompt, max_new_tokens=16 - len(tokenizer(prompt)["input_ids"])).gates.numel()


def test_an_image_format_this_machine_cannot_write_is_refused_naming_out(tmp_path, monkeypatch):
    """`--out gates.pgf` passed the check (matplotlib lists pgf) and, after the model loaded and generated, ended in
    a RuntimeError traceback: pgf needs a TeX program. It is refused up front where that program is missing, and any
    format whose writer fails names --out."""
    pytest.importorskip("matplotlib")
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    from gatera_plugin.visualize import GateTrace, check_image_path, plot_gates

    monkeypatch.setattr("shutil.which", lambda program: None)  # (no TeX program on the PATH)
    with pytest.raises(ValueError, match=rf"--out .*gates\.pgf.*{rcParams['pgf.texsystem']}, which is not installed"):
        check_image_path(str(tmp_path / "gates.pgf"))

    def failing_savefig(*args, **kwargs):
        raise RuntimeError("a program this format needs is missing")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    trace = GateTrace(["model.layers.0.mlp.down_proj"], ["a", "b"], torch.tensor([[0.2, 0.7]]), 1)
    with pytest.raises(ValueError, match=r"--out .*gates\.svg.*could not write this format here .*program"):
        plot_gates(trace, str(tmp_path / "gates.svg"))
    assert not (tmp_path / "gates.svg").exists()


def test_gatera_plot_command_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    base_dir = tmp_path / "base"
    model, tokenizer = _model(save_base_to=base_dir)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    command = [sys.executable, "-m", "gatera_plugin.cli", "plot", str(tmp_path / "adapter"), "--base-model",
               str(base_dir), "--prompt", "Question: Tell me about the element Neon.\nAnswer:", "--out",
               str(tmp_path / "gates.png")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gated modules" in done.stdout


def test_load_adapter_finds_its_base_model_and_refuses_a_folder_without_config(tmp_path):
    """load_adapter (behind `gatera plot` and bench/gate_summary.py) reloads the trained adapter exactly."""
    from gatera_plugin.visualize import load_adapter

    model, tokenizer = _model(save_base_to=tmp_path / "base")
    ids = torch.tensor([tokenizer("Question: Neon?")["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")  # the base the config names
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    loaded, loaded_tokenizer = load_adapter(str(tmp_path / "adapter"))
    assert not loaded.training and loaded_tokenizer("Question: Neon?")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    model.peft_config["default"].base_model_name_or_path = None  # a config that names no base: pass it
    model.save_pretrained(tmp_path / "unnamed")
    tokenizer.save_pretrained(tmp_path / "unnamed")
    with pytest.raises(ValueError, match=r"does not name its base model; pass base_model"):
        load_adapter(str(tmp_path / "unnamed"))
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(str(tmp_path / "unnamed"), str(tmp_path / "base"))[0](
            input_ids=ids).logits, expected)
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json is missing: pass a saved GateRA adapter"):
        load_adapter(str(tmp_path / "base"))


@pytest.mark.parametrize("trains", ["trainable_tokens", "head"])
def test_load_adapter_resizes_the_base_for_an_adapter_trained_with_new_tokens(tmp_path, trains):
    """An adapter trained after new chat tokens resized the embeddings saved them resized: load_adapter gives the
    base their rows before loading (without, the load is refused, saying to resize: tests/test_model.py), and reloads
    exactly."""
    from common import tiny_model_and_tokenizer
    from transformers import AutoModelForCausalLM

    from gatera_plugin.visualize import load_adapter

    base, tokenizer = tiny_model_and_tokenizer()
    base.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # (so that the adapter names it)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"])
    base.resize_token_embeddings(len(tokenizer))
    extra = ({"trainable_token_indices": [len(tokenizer) - 2, len(tokenizer) - 1]} if trains == "trainable_tokens" else
             {"modules_to_save": ["lm_head"]})
    model = get_peft_model(base, GateRAConfig(r=4, target_modules=["q_proj"], init_weights=False, **extra))
    ids = torch.tensor([tokenizer("<|im_start|> Question: Neon? <|im_end|>")["input_ids"]])
    assert ids.max() >= len(tokenizer) - 2
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    loaded, _ = load_adapter(str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_quality_benchmark_smoke(tmp_path):
    """bench/quality.py end to end on a tiny model and a tiny BIG-bench-format task: trains, evaluates, writes JSON."""
    out = tmp_path / "result.json"
    command = [sys.executable, str(ROOT / "bench" / "quality.py"), "--task", str(ROOT / "tests" / "data" /
               "tiny_task.json"), "--method", "gatera", "--tiny", "--steps", "3", "--eval-limit", "5", "--out",
               str(out), "--save-adapter", str(tmp_path / "adapter")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["method"] == "gatera" and result["eval_examples"] == 5 and 0 <= result["accuracy"] <= 1
    assert len(result["losses"]) >= 1 and result["trainable_params"] > 0 and "gold_nll" in result
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    zero = subprocess.run([*command[:4], "--method", "zero-shot", "--tiny", "--eval-limit", "5", "--out",
                           str(tmp_path / "zs.json")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert zero.returncode == 0, zero.stderr[-3000:]


def test_a_bigbench_index_without_the_sdist_names_what_it_lists_and_where_to_put_it(tmp_path, monkeypatch):
    """The quality benchmark's task files come from the bigbench 1.0.0 sdist on PyPI's simple index; where the index
    this network reaches lists only other versions, the error names them, the sha256 and the cache path to copy the
    sdist to (it said only "not listed")."""
    import io
    import urllib.request

    from gatera_plugin import assets

    html = b'<a href="https://files.example/bigbench-0.0.1.tar.gz#sha256=00">bigbench-0.0.1.tar.gz</a>'
    monkeypatch.setenv("GATERA_CACHE", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: io.BytesIO(html))
    target = tmp_path / "downloads" / assets.BIGBENCH_SDIST
    with pytest.raises(FileNotFoundError, match=rf"it lists bigbench-0.0.1.tar.gz\). Copy the sdist \(sha256 "
                                                rf"{assets.BIGBENCH_SHA256}\) .* to {target}"):
        assets.bigbench_sdist()


def test_two_processes_downloading_the_bigbench_sdist_write_separate_files(tmp_path, monkeypatch):
    """Two cold-cache processes downloaded into one fixed `.partial` file, each checking only its own stream's
    sha256: the file that was renamed into place could hold the other's bytes, and the second rename failed. Each
    download has a file of its own (another's is left alone), and only a checked one takes the cache's name; a
    download that fails its check leaves nothing behind."""
    import hashlib
    import io
    import urllib.request

    from gatera_plugin import assets

    sdist = b"the sdist's bytes" * 1000
    html = f'<a href="https://files.example/{assets.BIGBENCH_SDIST}#sha256=00">x</a>'.encode()
    monkeypatch.setenv("GATERA_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "BIGBENCH_SHA256", hashlib.sha256(sdist).hexdigest())
    served = [html, b"corrupted", html, sdist]
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: io.BytesIO(served.pop(0)))
    target = tmp_path / "downloads" / assets.BIGBENCH_SDIST
    target.parent.mkdir(parents=True)
    theirs = target.with_suffix(".partial")  # (where another process's download used to be written too)
    theirs.write_bytes(b"another process's half download")
    with pytest.raises(ValueError, match="does not match"):
        assets.bigbench_sdist()
    assert sorted(p.name for p in target.parent.iterdir()) == [theirs.name]
    assert assets.bigbench_sdist() == target and target.read_bytes() == sdist
    assert theirs.read_bytes() == b"another process's half download"
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([theirs.name, target.name])


def test_a_prepared_model_that_another_process_published_first_is_kept(tmp_path, monkeypatch):
    """Two processes preparing SmolLM2 at once: the later one removed the folder the earlier had published (and was
    loading) and renamed its own into place. A complete folder found at the end is kept, this process's copy
    dropped; an incomplete one (an interrupted older run) is replaced, under a lock on the cache folder (so that two
    processes never both replace it)."""
    import fcntl
    import os

    from gatera_plugin.assets import _publish

    target, ours = tmp_path / "smollm2", tmp_path / ".smollm2-ours"
    for folder in (target, ours):
        folder.mkdir()
        (folder / "config.json").write_text(folder.name)
        (folder / "model.safetensors").write_text(folder.name)
    inode = target.stat().st_ino
    _publish(ours, target)
    assert target.stat().st_ino == inode and (target / "config.json").read_text() == "smollm2"
    (target / "model.safetensors").unlink()  # (incomplete)
    real_rename, locked = Path.rename, []

    def rename(self, new):  # (is the cache folder locked while the folder is replaced? a second lock must fail)
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked.append(False)
        except BlockingIOError:
            locked.append(True)
        finally:
            os.close(fd)
        return real_rename(self, new)

    monkeypatch.setattr(Path, "rename", rename)
    _publish(ours, target)
    assert locked == [True]
    assert (target / "config.json").read_text() == ".smollm2-ours" and not ours.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]


def test_gate_summary_names_its_json_by_the_task_not_by_the_task_files_path(tmp_path, monkeypatch):
    """bench/gate_summary.py with `--task path/to/task.json` wrote `path/to/task.json.json` beside the task file; its
    JSON goes under results/quality/gates/, named by the task (as bench/quality.py names its runs)."""
    import importlib.util

    model, tokenizer = _model(save_base_to=tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    elements = ["Neon", "Lithium", "Helium", "Oxygen", "Carbon", "Nickel", "Cerium", "Erbium"]
    task = {"name": "tinytask", "examples": [
        {"input": f"Tell me about the element {e} number {i}", "target_scores": {"Yes": 1, "No": 0}}
        for i in range(5) for e in elements]}
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mytask.json").write_text(json.dumps(task))
    spec = importlib.util.spec_from_file_location("gate_summary", ROOT / "bench" / "gate_summary.py")
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    gate_summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gate_summary)
    monkeypatch.setattr(gate_summary, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sys, "argv", ["gate_summary.py", "--adapter", str(tmp_path / "adapter"), "--base-model",
                                      str(tmp_path / "base"), "--task", str(tmp_path / "tasks" / "mytask.json"),
                                      "--limit", "2"])
    gate_summary.main()
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == ["mytask.json"]
    written = json.loads((tmp_path / "results" / "gates" / "tinytask.json").read_text())
    assert written["task"] == "tinytask" and written["examples"] == 2
