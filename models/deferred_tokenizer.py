"""A checkpoint's tokenizer whose tiktoken tables are built on first use; its vocabulary size is known at once.

An engine core needs only the vocabulary size (the logits it returns cover the tokenizer's ids) until a request
asks for constrained decoding, whose grammar tables need every token's bytes. The front end, which holds the
same tokenizer, validates the files and refuses bad ones, so the core skips that proof when it builds them
(o200k: 3.5-4.1 s rather than 13.8-14.8 on 2 busy cores). Building o200k's tables in the core as well cost
~120 MB of resident memory (bench/NOTES.md).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from models.tokenizer import Tokenizer, load_tokenizer


def vocabulary_size(model_dir: Path) -> int:
    """One past the largest token id the tokenizer files define: tiktoken's ``n_vocab`` for valid files."""
    if (model_dir / "tokenizer.json").is_file():
        with (model_dir / "tokenizer.json").open(encoding="utf-8") as f:
            spec = json.load(f)
        ids = [*(spec.get("model") or {}).get("vocab", {}).values(), *(t["id"] for t in spec.get("added_tokens", []))]
    elif (model_dir / "vocab.json").is_file():
        with (model_dir / "vocab.json").open(encoding="utf-8") as f:
            ids = list(json.load(f).values())
    else:
        raise FileNotFoundError(f"no tokenizer in {model_dir}: looked for tokenizer.json, or vocab.json + merges.txt")
    return max(ids) + 1


class DeferredTokenizer(Tokenizer):
    """``vocab_size`` from the files; everything else loads the whole tokenizer, once, on any thread."""

    def __init__(self, model_dir: Path) -> None:  # no super().__init__(): that needs the built encoding
        self._model_dir = model_dir
        self._building = threading.Lock()
        self.vocab_size = vocabulary_size(model_dir)

    def __getattr__(self, name: str) -> Any:
        """Only for what is not set yet (the encoding, the special tokens): build it all, then answer."""
        if name.startswith("__") or name in ("_model_dir", "_building"):
            raise AttributeError(name)
        with self._building:
            if "_encoding" not in self.__dict__:
                built = load_tokenizer(self._model_dir, checked=False)  # the front end checks the files
                if built.vocab_size != self.vocab_size:
                    raise ValueError(f"the tokenizer in {self._model_dir} has {built.vocab_size} ids, "
                                     f"not {self.vocab_size}")
                self.__dict__.update(vars(built))
        return object.__getattribute__(self, name)
