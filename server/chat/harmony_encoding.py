"""openai-harmony's encoding, built from the checkpoint's own vocabulary so that nothing is downloaded.

openai-harmony is the format's own implementation; the server renders harmony prompts with it (the tool
namespace above all: JSON schemas become TypeScript-like declarations by rules only it defines exactly).
Its loader wants o200k_base as a `.tiktoken` file, which it would download unless TIKTOKEN_ENCODINGS_BASE
names a folder holding it, and it checks the file's SHA-256. So the file is written from the checkpoint's
tokenizer (ids below the first special token, `base64(bytes) rank` per line) into a private temporary
folder, loaded, and removed: a checkpoint whose vocabulary is not o200k's fails the hash check and is
refused with a clear error instead of being rendered with the wrong ids.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import openai_harmony as oh

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer

VOCAB_FILE = "o200k_base.tiktoken"
ENCODINGS_BASE = "TIKTOKEN_ENCODINGS_BASE"
_environment_lock = threading.Lock()  # the loader reads a process-wide variable
_loaded: dict[str, oh.HarmonyEncoding] = {}


def tiktoken_vocab_file(tokenizer: Tokenizer) -> bytes:
    """The tokenizer's ordinary tokens in tiktoken's file format, which openai-harmony's loader reads."""
    first_special = min(tokenizer.special_tokens.values())
    lines = [base64.b64encode(tokenizer.token_bytes(rank)) + b" %d" % rank for rank in range(first_special)]
    return b"\n".join(lines) + b"\n"


def harmony_encoding(tokenizer: Tokenizer) -> oh.HarmonyEncoding:
    """The HARMONY_GPT_OSS encoding, checked to give every special token the tokenizer's id."""
    vocab = tiktoken_vocab_file(tokenizer)
    key = hashlib.sha256(vocab).hexdigest()
    if key not in _loaded:
        _loaded[key] = _load(vocab)
    encoding = _loaded[key]
    for name, token_id in tokenizer.special_tokens.items():
        if name in encoding.special_tokens_set and encoding.encode(name, allowed_special="all") != [token_id]:
            raise ValueError(f"the tokenizer gives {name} id {token_id}, openai-harmony another: not o200k_harmony")
    return encoding


def _load(vocab: bytes) -> oh.HarmonyEncoding:
    with _environment_lock, tempfile.TemporaryDirectory(prefix="gptserve-harmony-") as folder:
        (Path(folder) / VOCAB_FILE).write_bytes(vocab)
        before = os.environ.get(ENCODINGS_BASE)
        os.environ[ENCODINGS_BASE] = folder
        try:
            return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
        except oh.HarmonyError as error:
            raise ValueError(f"the tokenizer's vocabulary is not o200k_harmony, which harmony needs: {error}") from None
        finally:
            if before is None:
                del os.environ[ENCODINGS_BASE]
            else:
                os.environ[ENCODINGS_BASE] = before
