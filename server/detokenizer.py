"""Token ids to text for streaming: never split a UTF-8 character, never let a stop string (or its start) out."""

from __future__ import annotations

import codecs
from typing import Protocol


class ByteTokenizer(Protocol):
    special_tokens: dict[str, int]

    def token_bytes(self, token_id: int) -> bytes: ...


class TokenTextDecoder:
    """Byte-level tokens can end mid-character; the incremental decoder holds those bytes back, and only bytes
    that can never form valid UTF-8 become U+FFFD.

    Special tokens (end-of-text and friends) are control, not text, and add none, as with vLLM's
    ``skip_special_tokens`` (its default); with ``skip_special_tokens=False`` they come out as their names.
    Ids the tokenizer does not know add no text: a model's embedding table may be larger than its vocabulary,
    and a parser must not fail on whatever a model samples.
    """

    def __init__(self, tokenizer: ByteTokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._special_names = {token_id: name.encode() for name, token_id in tokenizer.special_tokens.items()}
        self._skip_special = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def text_bytes(self, token_id: int) -> bytes:
        if token_id in self._special_names:
            return b"" if self._skip_special else self._special_names[token_id]
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


class StopStringMatcher:
    """Text in, safe text out: the end of the text that could still grow into a stop string is held back.

    Emitted text never contains the start of a match, so searching only the held-back tail plus the new text
    finds every match, and the earliest one wins. ``keep_match`` (vLLM's include_stop_str_in_output) lets the
    matched string out as the text's end.
    """

    def __init__(self, stop: list[str], keep_match: bool = False) -> None:
        self._stop = [s for s in stop if s]
        self.keep_match = keep_match  # include_stop_str_in_output: a stop token that ends a choice is text too
        self._pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        if self.matched is not None:
            return ""
        pending = self._pending + text
        hits = [(index, s) for s in self._stop if (index := pending.find(s)) >= 0]
        if hits:
            index, self.matched = min(hits)
            self._pending = ""
            return pending[: index + len(self.matched)] if self.keep_match else pending[:index]
        keep = self._longest_stop_prefix_suffix(pending)
        self._pending = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """The held-back tail, once no more text will come."""
        pending, self._pending = self._pending, ""
        return pending

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        longest = 0
        for s in self._stop:
            for size in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:size]):
                    longest = size
                    break
        return longest


def token_id_name(token_id: int) -> str:
    """A token as vLLM's return_tokens_as_token_ids names it in logprobs: exact even where its bytes are not text."""
    return f"token_id:{token_id}"


def token_text(tokenizer: ByteTokenizer, token_id: int) -> str:
    """One token as logprobs show it: its text, or OpenAI's ``bytes:\\xNN`` form when not whole UTF-8."""
    data = tokenizer.token_bytes(token_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)
