"""A checkpoint's end tokens, as transformers and vLLM read them: the ids after which generation stops.

They are the tokenizer's end of text, tokenizer_config.json's ``eos_token``, and the generation config's
``eos_token_id`` (one id or a list). GPT-OSS's generation_config.json lists <|return|>, <|endoftext|> and <|call|>,
so a harmony prompt's continuation ends where the assistant's turn does. A checkpoint without that file gives
config.json's ``eos_token_id``, as transformers' ``GenerationConfig.from_model_config`` takes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.tokenizer import Tokenizer, special_token_text

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class GenerationConfig:
    path: Path  # the file read: a generation_config.json, else the model's config.json
    fields: dict[str, Any]
    from_file: bool  # whether ``path`` is a generation_config.json (sampling defaults come only from one)


def read_generation_config(model_dir: Path, tokenizer_dir: Path, folder: Path | None = None) -> GenerationConfig:
    """``folder``'s generation_config.json when given (it must be there), else the model's: in its folder, or beside
    its tokenizer (a GPT-OSS ``original/`` folder's parent). A file that is not a JSON object is a ValueError."""
    folders = [model_dir, tokenizer_dir] if folder is None else [folder]
    path = next((f / GENERATION_CONFIG for f in folders if (f / GENERATION_CONFIG).is_file()), None)
    if path is not None:
        return GenerationConfig(path, read_json_object(path), True)
    if folder is not None:
        raise ValueError(f"no {GENERATION_CONFIG} in {folder}")
    config = model_dir / "config.json"
    return GenerationConfig(config, read_json_object(config) if config.is_file() else {}, False)


def end_token_ids(generation: GenerationConfig, tokenizer_dir: Path, tokenizer: Tokenizer) -> frozenset[int]:
    """The ids that end a generation; an eos_token_id this tokenizer does not have is a ValueError naming the file."""
    value = generation.fields.get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    for token in ids:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < tokenizer.vocab_size:
            raise ValueError(f"{generation.path}: eos_token_id {token!r} is not a token id of this tokenizer "
                             f"(0 to {tokenizer.vocab_size - 1})")
    return frozenset((tokenizer.eos_token_id, primary_end_token(tokenizer_dir, tokenizer), *ids))


def primary_end_token(tokenizer_dir: Path, tokenizer: Tokenizer) -> int:
    """The tokenizer's own end token, as transformers' ``eos_token_id`` gives it: tokenizer_config.json's
    ``eos_token`` (GPT-OSS's <|return|>), else the end of text. vLLM's primary one: a choice it ends has no
    stop_reason, while the generation config's other end tokens are named there as stop tokens."""
    tokenizer_config = tokenizer_dir / "tokenizer_config.json"
    named = special_token_text(read_json_object(tokenizer_config).get("eos_token")) \
        if tokenizer_config.is_file() else None
    return tokenizer.special_tokens[named] if named in tokenizer.special_tokens else tokenizer.eos_token_id


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value
