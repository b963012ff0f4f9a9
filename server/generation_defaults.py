"""What a checkpoint's generation_config.json asks of generation, read as vLLM's ``--generation-config`` reads it.

Two things come from it:

- **Its end tokens** (models/end_tokens.py). GPT-OSS lists <|return|>, <|endoftext|> and <|call|>: a completion
  of a harmony prompt ends at the assistant's <|return|> or <|call|>, where it would otherwise run on to
  max_tokens.
- **Sampling defaults** for what a request leaves unset: temperature, top_p, top_k, min_p, repetition_penalty, and
  ``max_new_tokens``, which bounds every choice's output tokens, asked for or not (vLLM's server-wide limit).
  vLLM reads the file through transformers' ``to_diff_dict``, which drops fields at transformers' own defaults,
  so ``"top_k": 50`` in the file is no default here either.

``--generation-config vllm`` keeps the end tokens and drops the file's defaults; ``--generation-config DIR`` reads
DIR/generation_config.json instead; ``--override-generation-config JSON`` sets defaults over either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from models.end_tokens import end_token_ids, primary_end_token, read_generation_config
from models.tokenizer import Tokenizer

AUTO, VLLM = "auto", "vllm"  # --generation-config's two names; anything else is a folder
# transformers' GenerationConfig defaults for the fields read here: to_diff_dict leaves them out
TRANSFORMERS_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


class SamplingDefaults(BaseModel):
    """The fields a default may set, with the bounds a request's own value has (server/protocol.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(default=None, ge=-1, lt=2**63)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    max_new_tokens: StrictInt | None = Field(default=None, ge=1, lt=2**63)

    def resolve(self, *, temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
              min_p: float | None = None, repetition_penalty: float | None = None) -> dict[str, Any]:
        """SamplingParams' fields from a request's values: each one it leaves unset takes this default, else the
        API's (top_k 0, -1 or above the vocabulary is off, as 0)."""
        def given(value: Any, default: Any, fallback: Any) -> Any:
            return value if value is not None else default if default is not None else fallback

        return {"temperature": given(temperature, self.temperature, 1.0), "top_p": given(top_p, self.top_p, 1.0),
                "top_k": max(given(top_k, self.top_k, 0), 0), "min_p": given(min_p, self.min_p, 0.0),
                "repetition_penalty": given(repetition_penalty, self.repetition_penalty, 1.0)}


@dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: frozenset[int]  # the model's end tokens: what ends a choice unless ignore_eos
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    eos_token_id: int | None = None  # the tokenizer's own end token (vLLM's primary one; models.end_tokens)

    def stop_reason_ids(self, stop_token_ids: frozenset[int]) -> frozenset[int]:
        """The stop tokens a choice's stop_reason names when one ends it: all but the tokenizer's own end token,
        as vLLM's check_stop names them."""
        return stop_token_ids - {self.eos_token_id}

    def max_tokens(self, wanted: int) -> int:
        """``wanted`` (asked for, or what the context leaves) within the generation config's max_new_tokens."""
        limit = self.sampling.max_new_tokens
        return wanted if limit is None else min(wanted, limit)


def generation_defaults(model_dir: Path, tokenizer_dir: Path, tokenizer: Tokenizer, source: str = AUTO,
                        overrides: dict[str, Any] | None = None) -> GenerationDefaults:
    """One model's defaults. ``source``: auto, vllm or a folder (--generation-config); ``overrides``: the fields of
    --override-generation-config. A file or override that cannot be honoured is a ValueError naming it."""
    folder = None if source in (AUTO, VLLM) else Path(source)
    if folder is not None and not folder.is_dir():
        raise ValueError(f"--generation-config {source}: no such folder")
    config = read_generation_config(model_dir, tokenizer_dir, folder)
    from_file = {} if source == VLLM or not config.from_file else {
        name: value for name, value in config.fields.items()
        if name in SamplingDefaults.model_fields and value is not None and TRANSFORMERS_DEFAULTS.get(name) != value}
    sampling = _checked(from_file, str(config.path)) | _checked(overrides or {}, "--override-generation-config")
    return GenerationDefaults(end_token_ids(config, tokenizer_dir, tokenizer), SamplingDefaults(**sampling),
                              primary_end_token(tokenizer_dir, tokenizer))


def parse_overrides(text: str) -> dict[str, Any]:
    """--override-generation-config's JSON object, checked field by field."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object such as '{\"temperature\": 0.6}'")
    return _checked(value, "--override-generation-config")


def _checked(values: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return SamplingDefaults(**values).model_dump(include=set(values))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in e.errors())
        raise ValueError(f"{where}: {problems} (fields: {', '.join(SamplingDefaults.model_fields)}; "
                         "--generation-config vllm ignores a checkpoint's file)") from None
