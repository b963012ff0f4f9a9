"""Generated token ids to text, never splitting a UTF-8 character across two deltas."""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer


class TokenTextDecoder:
    """Byte-level tokens can end mid-character; the incremental decoder holds those bytes back.

    Special tokens and ids the tokenizer does not know add no text: a model's embedding table may
    be larger than its vocabulary, and a parser must not fail on whatever a model samples.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._special_ids = frozenset(tokenizer.special_tokens.values())
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def text_bytes(self, token_id: int) -> bytes:
        if token_id in self._special_ids:
            return b""
        try:
            return self._tokenizer.token_bytes(token_id)
        except (KeyError, IndexError, ValueError):
            return b""

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self.text_bytes(token_id))

    def flush(self) -> str:
        """End of a text run: bytes still held back are invalid UTF-8 and come out as U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
