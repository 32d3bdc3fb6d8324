"""Where the gates open: per-layer x per-token gate heatmaps from a real generation (GateRA's Fig. 1).

`record_gates` runs the prompt once (prefill) and then decodes one token at a time with the KV cache, as generation
does, recording every sigmoid gate (or threshold selection) of every adapted module at every token. `plot_gates`
draws the (module x token) heatmap, with the prompt/answer boundary marked, and per layer the mean gate on prompt
(prefill) tokens against answer (decode) tokens. `load_adapter` loads a saved adapter with its base model and
tokenizer for both. `gatera plot` is the command-line front end.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch


@dataclass
class GateTrace:
    """Gate values of one generation: `gates[i, t]` for module `modules[i]` at token `tokens[t]`."""

    modules: list[str]
    tokens: list[str]
    gates: torch.Tensor  # (modules, tokens)
    prompt_length: int
    summary: dict = field(default_factory=dict)

    def layer_means(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Layer indices and, per layer, the mean gate over prompt tokens and over answer tokens."""
        layers = sorted({_layer_index(m) for m in self.modules})
        prompt, answer = [], []
        for layer in layers:
            rows = [i for i, m in enumerate(self.modules) if _layer_index(m) == layer]
            prompt.append(self.gates[rows, : self.prompt_length].mean())
            answer.append(self.gates[rows, self.prompt_length:].mean())
        return layers, torch.stack(prompt), torch.stack(answer)


def _layer_index(name: str) -> int:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def load_adapter(adapter: str, base_model: Optional[str] = None, dtype: torch.dtype = torch.float32,
                 device_map=None):
    """(model, tokenizer) of a saved GateRA adapter folder on its base model (in `dtype`, eval mode; `device_map` as
    `from_pretrained` takes it, e.g. "cuda" or "auto", default the CPU).

    The base model is `base_model` or else the one named in adapter_config.json; the tokenizer comes from the
    adapter folder when it holds one, else from the base model. An adapter trained with new tokens saved its resized
    embeddings: the base is resized to their rows first.
    """

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import GateRAConfig  # noqa: F401  (registers GateRA with PEFT)
    from .serialization import (
        check_adapter_folder,
        folder_lock,
        is_gatera_type,
        missing_adapter_config,
        read_config,
        saved_vocabulary_size,
    )

    folder = Path(adapter)
    config_path = folder / "adapter_config.json"
    if not config_path.exists():
        raise missing_adapter_config(folder, "pass a saved GateRA adapter folder")
    saved = read_config(folder)
    if not is_gatera_type(saved.get("peft_type")):
        raise ValueError(f"{folder} holds a {saved.get('peft_type')} adapter, not a GateRA one: it has no gates to "
                         "record. Pass a saved GateRA adapter folder.")
    with folder_lock(folder, exclusive=False):  # (its weights, before minutes of loading the base model; a save
        check_adapter_folder(folder)  # under way is waited for, as the load below waits)
    if base_model and (Path(base_model) / "adapter_config.json").exists():
        raise ValueError(f"base_model (CLI: --base-model) {base_model!r} is an adapter folder; pass the base model "
                         "it was trained on.")
    base = base_model or saved.get("base_model_name_or_path")
    if not base:
        raise ValueError("The adapter does not name its base model; pass base_model (CLI: --base-model PATH).")
    source = "base_model (CLI: --base-model)" if base_model else f"base_model_name_or_path in {config_path}"
    fix = "Pass a local model folder with its tokenizer, or a Hub id (CLI: --base-model PATH)."
    if (folder / "tokenizer_config.json").exists():
        what, tokenizer_source = f"the tokenizer saved with the adapter in {str(folder)!r}", folder
        tokenizer_fix = "Save the tokenizer with the adapter again, or remove its files there to use the base model's."
    else:
        what, tokenizer_source, tokenizer_fix = f"the tokenizer of {base!r} (named by {source})", base, fix
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        what, tokenizer_fix = f"the base model {base!r} (named by {source})", fix
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map=device_map)
    except (OSError, ValueError, ImportError) as error:  # not a local folder and not on the Hub, missing files, no
        # network; a folder without a tokenizer or a broken one (transformers then blames a missing library: a
        # ValueError, or in older releases an ImportError naming protobuf)
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise ValueError(f"Cannot load {what}: {reason} {tokenizer_fix}") from None
    rows = saved_vocabulary_size(folder, base_model)
    if rows is not None and rows > base_model.get_input_embeddings().weight.shape[0]:  # trained with new tokens
        base_model.resize_token_embeddings(rows, mean_resizing=False)  # (the adapter's saved rows replace these)
    model = PeftModel.from_pretrained(base_model, folder)
    return model.eval(), tokenizer


def check_device(device: str) -> None:
    """Refuse, before minutes of loading, a `--device` that names no device, or one this machine lacks ("cpu" and
    "auto", accelerate's spread over what there is, always pass)."""
    if device == "auto":
        return
    try:
        wanted = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} names no device; pass cpu, cuda, cuda:N or auto.") from None
    if wanted.type == "cpu":
        return
    here = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if here is None or here.type != wanted.type:
        raise ValueError(f"--device {device!r}: this machine has no {wanted.type} device that torch can use "
                         f"({'only the CPU' if here is None else f'it has {here.type}'}); pass --device cpu or auto.")
    if wanted.index is not None and wanted.index >= torch.accelerator.device_count():
        raise ValueError(f"--device {device!r}: this machine has {torch.accelerator.device_count()} {wanted.type} "
                         f"device(s), numbered from 0.")


def check_record_options(prompt: str, answer: Optional[str], max_new_tokens: int) -> None:
    """Refuse, naming the option, what `record_gates` cannot record (the statistics would be NaN)."""
    if not prompt:
        raise ValueError("`prompt` is empty (CLI: --prompt): give the text whose gates to record.")
    if answer is not None and not answer:
        raise ValueError("`answer` is empty (CLI: --answer): give the answer text, or leave it out to generate one.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` (CLI: --max-new-tokens) must be an integer >= 1, got {max_new_tokens!r}.")


def _check_positions(model, prompt_tokens: int, new_tokens: int, option: str) -> None:
    """Refuse prompt + new tokens beyond the model's positions (`max_position_embeddings`, GPT-2's `n_positions`):
    a model with learned position embeddings fails deep in torch's embedding lookup there."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and prompt_tokens + new_tokens > limit:
        raise ValueError(f"The prompt ({prompt_tokens} tokens) and {new_tokens} answer tokens ({option}) exceed the "
                         f"{limit} positions the model takes (config.max_position_embeddings): shorten the prompt or "
                         f"lower {option}.")


def _end_of_sequence_ids(model, tokenizer) -> set[int]:
    """The ids that end a greedy answer: the tokenizer's end of sequence and those of the model's generation config
    (an instruct model's end of turn, e.g. Llama 3's <|eot_id|>), as `generate` stops."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return {i for i in [tokenizer.eos_token_id, *ids] if i is not None}


@torch.no_grad()
def record_gates(model, tokenizer, prompt: str, answer: Optional[str] = None, max_new_tokens: int = 24,
                 chat: bool = False) -> GateTrace:
    """Prefill `prompt`, then decode with the KV cache: the given `answer`'s tokens, or greedily `max_new_tokens`.
    With `chat`, the prompt is the user turn of the tokenizer's chat template (as an instruct model is trained and
    prompted). The token ids go to the input embedding's device (a model on a GPU, or split over several); the gates
    come back on the CPU."""
    check_record_options(prompt, answer, max_new_tokens)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("`chat` (CLI: --chat) needs a tokenizer with a chat template; this one has none. Leave "
                         "--chat out to record the prompt as plain text.")
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        return _record_gates(model, tokenizer, prompt, answer, max_new_tokens, chat)
    finally:  # (a training loop that plots gates every N steps keeps its dropout and penalty)
        model.train(modes[0][1])  # (the modules' own train(): GateRA drops its cached deltas, transformers its kernels')
        for module, training in modes:  # (a part the caller kept in the other mode)
            module.training = training


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """(1, T) ids of the prompt: as plain text, or with `chat` as the user turn of the chat template, followed by the
    start of the assistant's turn."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def _record_gates(model, tokenizer, prompt: str, answer: Optional[str], max_new_tokens: int, chat: bool) -> GateTrace:
    from .gates import Gate

    gate_modules = [(name, m) for name, m in model.named_modules() if isinstance(m, Gate) and m.per_token]
    if not gate_modules:
        raise ValueError("The model has no token gates to record (gate='none'?).")
    per_module: dict[str, list[torch.Tensor]] = {name: [] for name, _ in gate_modules}
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: per_module[name].append(out.reshape(-1).float()))
        for name, module in gate_modules
    ]
    try:
        device = model.get_input_embeddings().weight.device
        prompt_ids = _prompt_ids(tokenizer, prompt, chat)
        forced = tokenizer(answer, add_special_tokens=False)["input_ids"] if answer is not None else None
        if prompt_ids.shape[1] == 0:
            raise ValueError(f"`prompt` {prompt!r} (CLI: --prompt) tokenizes to no tokens; give a longer prompt.")
        if forced is not None and not forced:
            raise ValueError(f"`answer` {answer!r} (CLI: --answer) tokenizes to no tokens; give a longer answer.")
        _check_positions(model, prompt_ids.shape[1], len(forced) if forced is not None else max_new_tokens,
                         "--answer" if forced is not None else "--max-new-tokens")
        stop_ids = _end_of_sequence_ids(model, tokenizer)
        output = model(input_ids=prompt_ids.to(device), use_cache=True)
        generated: list[int] = []
        steps = len(forced) if forced is not None else max_new_tokens
        for step in range(steps):
            next_id = forced[step] if forced is not None else int(output.logits[0, -1].argmax())
            generated.append(next_id)
            if forced is None and next_id in stop_ids:
                break
            output = model(input_ids=torch.tensor([[next_id]], device=device), past_key_values=output.past_key_values, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    # one gate per token and module: the prompt's tokens from the prefill call, then one per decode step; the last
    # decode step's input is the last generated token, so gates cover prompt + generated tokens minus the final one
    ran = [name for name, _ in gate_modules if per_module[name]]  # (an inactive adapter's gates do not run)
    if not ran:
        raise ValueError("No token gate ran: the model's active adapters have none (gate='none'?). Activate a gated "
                         "adapter with `model.set_adapter(name)`.")
    gates = torch.stack([torch.cat(per_module[name]) for name in ran]).cpu()
    names = []
    for name in ran:
        module, _, adapter = name.removeprefix("base_model.model.").rpartition(".gatera_gate.")
        names.append(module if adapter == "default" else f"{module} [{adapter}]")
    token_ids = prompt_ids[0].tolist() + generated
    tokens = [tokenizer.decode([t]) for t in token_ids][: gates.shape[1]]
    if len(tokens) <= prompt_ids.shape[1]:
        raise ValueError("The model ended its answer at once (end-of-sequence first), so no answer token has gates to "
                         "record. Pass the answer to score with `answer` (CLI: --answer TEXT) or change the prompt.")
    trace = GateTrace(names, tokens, gates[:, : len(tokens)], prompt_ids.shape[1])
    # (the means over every gate, module × token, as bench/gate_summary.py takes them: not the mean of the layers'
    # means, which weighs a layer with one gated module like one with seven)
    trace.summary = {"generated": tokenizer.decode(generated),
                     "prompt_mean": trace.gates[:, : trace.prompt_length].mean().item(),
                     "answer_mean": trace.gates[:, trace.prompt_length:].mean().item(),
                     "closed_frac": (trace.gates < 0.5).float().mean().item()}
    return trace


def plot_gates(trace: GateTrace, path: str, title: Optional[str] = None, overwrite: bool = False) -> None:
    """Heatmap of gates (modules x tokens) and per-layer prompt vs answer means, saved as an image at `path` (its
    suffix names the format). An existing `path` is refused unless `overwrite`, which replaces it atomically; a new
    file is created exclusively (a concurrent writer's file is never replaced) and removed if the write fails."""
    check_image_path(path, overwrite)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_modules, n_tokens = trace.gates.shape
    fig, (heat, means) = plt.subplots(
        1, 2, figsize=(min(4 + 0.22 * n_tokens, 22) + 4, 2 + 0.14 * n_modules),
        gridspec_kw={"width_ratios": [max(n_tokens, 8), 8]},
    )
    image = heat.imshow(trace.gates.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    heat.axvline(trace.prompt_length - 0.5, color="white", linewidth=1.5)
    heat.set_xticks(range(n_tokens))
    heat.set_xticklabels([t.replace("\n", "\\n") for t in trace.tokens], rotation=90, fontsize=6)
    step = max(1, n_modules // 40)
    heat.set_yticks(range(0, n_modules, step))
    heat.set_yticklabels(trace.modules[::step], fontsize=5)
    heat.set_xlabel("token (left of the white line: prompt / prefill; right: answer / decode)")
    fig.colorbar(image, ax=heat, fraction=0.02, label="gate g(x)")
    layers, prompt_mean, answer_mean = trace.layer_means()
    means.plot(prompt_mean.numpy(), layers, "o-", label="prompt (prefill)")
    means.plot(answer_mean.numpy(), layers, "s-", label="answer (decode)")
    means.set_yticks(layers[:: max(1, len(layers) // 15)])
    means.invert_yaxis()
    means.set_xlim(0, 1)
    means.set_xlabel("mean gate")
    means.set_ylabel("layer")
    means.legend(fontsize=7)
    fig.suptitle(title or f"GateRA gates: prompt mean {trace.summary.get('prompt_mean', 0):.2f}, "
                          f"answer mean {trace.summary.get('answer_mean', 0):.2f}")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))  # keep the title clear of the heatmap
    image = io.BytesIO()
    try:
        fig.savefig(image, dpi=110, format=Path(path).suffix.lstrip(".").lower())
    except (RuntimeError, OSError) as error:  # (a format that needs a program this machine lacks)
        raise ValueError(f"--out {path!r}: matplotlib could not write this format here ({error}); choose another "
                         "format, e.g. gates.png.") from error
    finally:
        plt.close(fig)
    _write_image(Path(path), image.getvalue(), overwrite)


def check_image_path(path: str, overwrite: bool = False) -> None:
    """Refuse an image path whose suffix names no format matplotlib writes (without one it would write `path.png`,
    another name than the one printed) or .pgf without its TeX program, one that exists unless `overwrite` (a folder
    always), or whose parent is a file; and, first, a missing matplotlib (with the install command)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("Gate plots are drawn with matplotlib, which is not installed here: pip install "
                          "'gatera-plugin[plot]' (or 'matplotlib>=3.7').") from error

    formats = Figure().canvas.get_supported_filetypes()
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--out {path!r} is a folder; give an image file name inside it (e.g. {target / 'gates.png'}).")
    if target.suffix.lower().lstrip(".") not in formats:
        raise ValueError(f"--out {path!r}: give an image file name ending in one of "
                         f"{', '.join('.' + f for f in sorted(formats))} (e.g. gates.png).")
    if target.suffix.lower() == ".pgf":
        import shutil

        from matplotlib import rcParams

        if shutil.which(rcParams["pgf.texsystem"]) is None:
            raise ValueError(f"--out {path!r}: matplotlib writes .pgf with {rcParams['pgf.texsystem']}, which is not "
                             "installed here; install a TeX distribution, or choose another format (e.g. gates.pdf).")
    if target.exists() and not overwrite:
        raise ValueError(f"--out {path!r} exists; give a new file name, or pass --overwrite (Python: overwrite=True) "
                         "to replace it.")
    from .serialization import file_in_the_way

    blocking = file_in_the_way(target)
    if blocking is not None:
        raise ValueError(f"--out {path!r}: {blocking} is a file, not a folder.")


def _new_file_mode(folder: Path) -> int:
    """The permission bits a file newly created in `folder` gets under the umask (from a probe file, removed)."""
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        probe = Path(scratch) / "mode"
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        return probe.stat().st_mode & 0o777


def _write_image(path: Path, data: bytes, overwrite: bool) -> None:
    """`data` into a new file at `path` (created exclusively), or with `overwrite` a temporary file renamed over it
    (copied over it, with a warning, where the file system cannot rename files, as adapter saves do)."""
    from .serialization import _replace

    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        staged = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)  # noqa: SIM115
        try:
            with staged:
                staged.write(data)
            # (the staged file is private to its owner: the image keeps the mode of the one it replaces, else gets a
            # new file's under this umask)
            with contextlib.suppress(OSError):  # (a file system without permissions: the image is written all the same)
                os.chmod(staged.name, path.stat().st_mode & 0o777 if path.exists() else _new_file_mode(path.parent))
            _replace(Path(staged.name), path)
        finally:
            Path(staged.name).unlink(missing_ok=True)
        return
    try:
        file = open(path, "xb")  # noqa: SIM115  (closed below; the file is ours only once this succeeded)
    except FileExistsError:
        raise ValueError(f"--out {str(path)!r} was created by someone else meanwhile; give a new file name.") from None
    try:
        with file:
            file.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
