"""Incremental parsing of GPT-OSS output in the harmony format into reasoning and content deltas.

The model continues a prompt that ended with `<|start|>assistant`, so it begins inside a message
header (or inside a body the prompt left open, or before a `<|start|>`). A message is
`header <|message|> body` ending at `<|end|>`, `<|return|>` or `<|call|>`; the header names the channel
(`<|channel|>analysis`) and, for a tool call, a recipient (`to=...`).
Where a message body goes:
- a message addressed to a recipient (`to=functions.get_weather`, `to=browser.search`, `to=python`)
  -> a tool call: its arguments are the body, its name the recipient without the `functions.` prefix.
  Built-in tools' calls (browser, python, which gpt-oss writes even on the analysis channel) are
  surfaced the same way, never dropped;
- analysis channel -> reasoning;
- anything else (final, commentary preambles as in vLLM, unknown or missing channel) -> content.
A second message to the same place is separated from the first by a newline, as vLLM joins them;
each message to a recipient is a call of its own.

Why not openai-harmony's StreamableParser: it raises on output that is not well-formed harmony (it
is a validator as much as a parser), while a server must turn whatever a model samples into a
response, keeping text outside any message as content; tests check that both agree on well-formed
output.

A tiny random model emits arbitrary tokens, so nothing here raises: text outside any message is
content, a header that runs past MAX_HEADER_TOKENS or meets a token no header holds was not a
header and its text becomes content, and stray special tokens add no text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.chat.messages import ChatDelta, ToolCallDelta
from server.detokenizer import TokenTextDecoder

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer

# Real headers are a channel, a recipient and a content type: a dozen tokens at most.
MAX_HEADER_TOKENS = 32
CHANNEL = re.compile(r"<\|channel\|>\s*([^\s<]+)")
RECIPIENT = re.compile(r"(?:^|\s)to=([^\s<]+)")


@dataclass(frozen=True, slots=True)
class HarmonySpecialTokens:
    """The ids of the tokens harmony's structure is made of, looked up in the tokenizer by name."""

    start: int
    end: int
    message: int
    channel: int
    return_: int
    call: int
    endoftext: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> HarmonySpecialTokens:
        names = {"start": "<|start|>", "end": "<|end|>", "message": "<|message|>",
                 "channel": "<|channel|>", "return_": "<|return|>", "call": "<|call|>",
                 "endoftext": "<|endoftext|>"}
        missing = [name for name in names.values() if name not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"tokenizer lacks the harmony special tokens {', '.join(missing)}")
        return cls(**{field: tokenizer.special_tokens[name] for field, name in names.items()})


class HarmonyOutputParser:
    """One per generated choice; see the module docstring for where each message's text goes."""

    def __init__(self, tokenizer: Tokenizer, tokens: HarmonySpecialTokens, inside: str | None = None,
                 skip_special_tokens: bool = True) -> None:
        """``inside``: the prompt left a message body open ("reasoning" or "content") instead of ending in
        `<|start|>assistant`, so output starts in that body."""
        self._tokens = tokens
        self._message_ends = frozenset((tokens.end, tokens.return_, tokens.call))
        self._special_names = {token_id: name for name, token_id in tokenizer.special_tokens.items()}
        self._textless = frozenset(self._special_names) if skip_special_tokens else frozenset()
        self._text = TokenTextDecoder(tokenizer, skip_special_tokens)
        self._header: list[int] | None = [] if inside is None else None  # None: in a body or outside any message
        self._target = inside or "content"  # "reasoning", "content" or "tool"
        self._calls = 0  # tool calls opened so far
        self._written = {"reasoning": False, "content": False}
        self._new_run = True  # the next text starts a new message (or stretch of loose text)
        self._delta = ChatDelta()

    def feed(self, token_id: int) -> ChatDelta:
        self._delta = ChatDelta()
        self._consume(token_id)
        return self._delta

    def finish(self) -> ChatDelta:
        self._delta = ChatDelta()
        # A header cut short by max_tokens said nothing yet; one without a channel was loose text.
        if self._header is not None and self._tokens.channel not in self._header:
            self._abandon_header()
        elif self._header is not None:
            self._delta.settled += [False] * len(self._header)
        self._end_run()
        return self._delta

    def _consume(self, token_id: int) -> None:
        """Content tokens: those of a content body or of text outside any message, less the structure."""
        if self._header is not None:
            self._consume_header(self._header, token_id)
            return
        if token_id in self._message_ends:
            self._end_run()
        elif token_id == self._tokens.start:
            self._end_run()
            self._header = []
        else:
            self._delta.settled.append(self._target == "content" and token_id not in self._textless)
            self._delta.reasoning_tokens += self._target == "reasoning"
            self._emit(self._text.feed(token_id))
            return
        self._delta.settled.append(False)

    def _consume_header(self, header: list[int], token_id: int) -> None:
        if token_id == self._tokens.message:
            self._delta.settled += [False] * (len(header) + 1)
            self._open_body()
        elif token_id in self._message_ends or token_id == self._tokens.start or len(header) >= MAX_HEADER_TOKENS:
            self._abandon_header()
            self._consume(token_id)
        else:
            header.append(token_id)

    def _open_body(self) -> None:
        header = self._header_text()
        channel = CHANNEL.search(header)
        recipient = RECIPIENT.search(header)
        if recipient and recipient.group(1) != "assistant":
            self._target = "tool"
            self._calls += 1
            self._delta.tool_calls.append(ToolCallDelta(self._calls - 1, name=tool_name(recipient.group(1))))
        elif channel and channel.group(1) == "analysis":
            self._target = "reasoning"
        else:
            self._target = "content"
        self._header = None
        self._new_run = True

    def _abandon_header(self) -> None:
        """What looked like a header was not one: its text is content outside any message."""
        held, self._header = self._header or [], None
        self._target = "content"
        self._new_run = True
        self._delta.settled += [token_id not in self._textless for token_id in held]
        for token_id in held:
            self._emit(self._text.feed(token_id))

    def _end_run(self) -> None:
        self._emit(self._text.flush())
        self._target = "content"
        self._new_run = True

    def _header_text(self) -> str:
        parts = [self._special_names[t].encode() if t in self._special_names else self._text.text_bytes(t)
                 for t in self._header or []]
        return b"".join(parts).decode("utf-8", errors="replace")

    def _emit(self, text: str) -> None:
        if not text:
            return
        if self._target == "tool":
            self._add_arguments(text)
            return
        if self._new_run and self._written[self._target]:
            text = "\n" + text
        self._new_run = False
        self._written[self._target] = True
        if self._target == "reasoning":
            self._delta.reasoning += text
        else:
            self._delta.content += text

    def _add_arguments(self, text: str) -> None:
        calls = self._delta.tool_calls
        if calls and calls[-1].index == self._calls - 1:
            calls[-1].arguments += text
        else:
            calls.append(ToolCallDelta(self._calls - 1, arguments=text))


def tool_name(recipient: str) -> str:
    """`functions.get_weather` -> `get_weather`; a built-in tool keeps its whole recipient."""
    return recipient.removeprefix("functions.")
