"""Shared by the examples: the bundled data and a tiny offline model for smoke runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data" / "elements.jsonl"


def read_jsonl(path: Path = DATA) -> list[dict]:
    """The rows of a JSONL file of {"prompt", "completion"} objects (blank lines skipped); a ValueError names the file
    and line of a row that is not one."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON object ({error.msg}).") from None
        if not isinstance(row, dict) or not all(_is_text_or_turns(row.get(key)) for key in ("prompt", "completion")):
            raise ValueError(f"{path}:{number}: a row needs the fields \"prompt\" and \"completion\", each a text or "
                             "a list of {\"role\", \"content\"} messages (TRL's conversational form).")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows.")
    forms = {isinstance(row[key], str) for row in rows for key in ("prompt", "completion")}
    if len(forms) > 1:
        raise ValueError(f"{path} mixes texts and message lists; TRL takes one form per dataset.")
    return rows


def _is_text_or_turns(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value) and all(
        isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
        for turn in value))


def _text(value) -> str:
    """A field's text: itself, or its messages' contents."""
    return value if isinstance(value, str) else " ".join(turn["content"] for turn in value)


def load_rows(split: str, path: Path = DATA) -> list[dict]:
    """Prompt/completion pairs of one split ("train" or "test") of a JSONL file with a `split` field."""
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in read_jsonl(path)
            if r.get("split", "train") == split]


def tiny_model_and_tokenizer(path: Path = DATA, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A small random Llama with a word-level tokenizer over the data's words (no download, no pretrained weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = read_jsonl(path)
    words = sorted({w for r in rows for w in (_text(r["prompt"]) + " " + _text(r["completion"])).split()})
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config), tokenizer
