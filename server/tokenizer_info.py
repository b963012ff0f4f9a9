"""GET /tokenizer_info's body, as vLLM serves it: the checkpoint's tokenizer_config.json, made true of this server.

With it and /tokenize, a client finds the model's tokenizer from the server's URL alone: lm-evaluation-harness's
``local-completions`` looks for both and otherwise downloads a tokenizer named after the model from the hub. So
the special tokens are given as their text, and only where this tokenizer holds them as single tokens (a client
takes ``/tokenize(eos_token)[0]`` as the end-of-text id); ``model_max_length`` is the length this server admits;
``chat_template`` is the template the chat endpoint renders with, else the checkpoint's (GPT-OSS's HF template,
which renders harmony as the server does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.tokenizer import ENDOFTEXT, Tokenizer, special_token_text

TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token")
SET_HERE = (*TOKEN_FIELDS, "model_max_length", "chat_template")


def tokenizer_info(
    tokenizer_dir: Path, tokenizer: Tokenizer, max_model_len: int, chat_template: str | None
) -> dict[str, Any]:
    config = _read_json(tokenizer_dir / "tokenizer_config.json")
    info = {key: value for key, value in config.items() if key not in SET_HERE}
    fast = (tokenizer_dir / "tokenizer.json").is_file()
    info.setdefault("tokenizer_class", "PreTrainedTokenizerFast" if fast else "GPT2Tokenizer")
    for field in TOKEN_FIELDS:
        text = special_token_text(config.get(field))
        if text in tokenizer.special_tokens:
            info[field] = text
    info.setdefault("eos_token", ENDOFTEXT)  # the tokenizer's end of text: what completions stop at
    info["model_max_length"] = max_model_len
    template = chat_template if chat_template is not None else _checkpoint_template(tokenizer_dir, config)
    if template is not None:
        info["chat_template"] = template
    return info


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        value = json.load(f)
    return value if isinstance(value, dict) else {}


def _checkpoint_template(tokenizer_dir: Path, config: dict[str, Any]) -> str | None:
    """transformers keeps it in chat_template.jinja now, in tokenizer_config.json before."""
    path = tokenizer_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    return template if isinstance(template, str) else None
