"""Tool calls written as JSON: what a forced call looks like on a model whose chat template has no call syntax.

As in vLLM, a named tool_choice makes the whole output that function's arguments, and "required" makes it a
JSON array of calls, `[{"name": ..., "parameters": {...}}, ...]`; constrained decoding guarantees the shape
(server.routes.forced_call writes the schema, with `name` before `parameters`). This parser turns that output
into tool-call deltas as it streams: a call is named once its name string closes, and its arguments are the
`parameters` value's text exactly as the model wrote it, released character by character.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from server.chat.messages import ChatDelta, ToolCallDelta
from server.detokenizer import TokenTextDecoder

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer

CALL_DEPTH = 2  # inside `[` and a call's `{`


class NamedArgumentsParser:
    """A named tool_choice: every character of the output is the one call's arguments."""

    def __init__(self, tokenizer: Tokenizer, name: str) -> None:
        self._text = TokenTextDecoder(tokenizer)  # special tokens are never JSON
        self._name: str | None = name

    def feed(self, token_id: int) -> ChatDelta:
        return self._delta(self._text.feed(token_id), settled=[False])

    def finish(self) -> ChatDelta:
        return self._delta(self._text.flush(), settled=[])

    def _delta(self, text: str, settled: list[bool]) -> ChatDelta:
        calls = [ToolCallDelta(0, name=self._name)] if self._name is not None else []
        self._name = None
        if text:
            calls.append(ToolCallDelta(0, arguments=text))
        return ChatDelta(tool_calls=calls, settled=settled)


class CallArrayParser:
    """tool_choice "required": the output is a JSON array of `{"name": ..., "parameters": ...}` objects.

    A scanner over the characters tracks nesting and strings; inside a call object (depth 2) it reads keys, the
    name's string, and the span of the `parameters` value, whatever its type. Arguments written before the
    name (a schema that put them first) wait for it."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._text = TokenTextDecoder(tokenizer)
        self._depth = 0
        self._in_string = self._escaped = False
        self._string = ""  # a string being read at call depth (a key or the name), quotes included
        self._expects_key = True  # at call depth: the next string is a key (else a value)
        self._key = ""
        self._in_arguments = False
        self._index = 0  # the current call's position
        self._named = False  # the current call's name has gone out
        self._held = ""  # arguments read before the name

    def feed(self, token_id: int) -> ChatDelta:
        return ChatDelta(tool_calls=self._scan(self._text.feed(token_id)), settled=[False])

    def finish(self) -> ChatDelta:
        return ChatDelta(tool_calls=self._scan(self._text.flush()))

    def _scan(self, text: str) -> list[ToolCallDelta]:
        deltas: list[ToolCallDelta] = []
        arguments = ""
        for char in text:
            if self._in_arguments and self._ends_arguments(char):
                self._in_arguments = False
            if self._in_arguments:
                arguments += char
                self._track(char)
                continue
            if arguments:
                deltas += self._arguments(arguments)
                arguments = ""
            deltas += self._structure(char)
        return deltas + self._arguments(arguments)

    def _ends_arguments(self, char: str) -> bool:
        """A `,` or `}` back at call depth, outside any string, follows the parameters value."""
        return not self._in_string and self._depth == CALL_DEPTH and char in ",}"

    def _track(self, char: str) -> None:
        """Strings and nesting inside the arguments, only so that their end is found."""
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
        elif char == '"':
            self._in_string = True
        elif char in "[{":
            self._depth += 1
        elif char in "]}":
            self._depth -= 1

    def _structure(self, char: str) -> list[ToolCallDelta]:
        """One character of the array or of a call object, outside the arguments."""
        if self._in_string:
            self._track(char)
            self._string += char
            return [] if self._in_string else self._string_read()
        if char == '"':
            self._in_string, self._string = True, char
        elif char in "[{":
            self._depth += 1
            self._expects_key = True
        elif char in "]}":
            self._depth -= 1
            if self._depth == CALL_DEPTH - 1 and char == "}":  # a call object closed: the next is a new call
                self._index, self._named, self._held = self._index + 1, False, ""
        elif self._depth == CALL_DEPTH and char == ",":
            self._expects_key = True
        elif self._depth == CALL_DEPTH and char == ":":
            self._expects_key = False
            self._in_arguments = self._key == "parameters"
        return []

    def _string_read(self) -> list[ToolCallDelta]:
        if self._depth != CALL_DEPTH:
            return []
        value = json.loads(self._string)
        if self._expects_key:
            self._key = value
            return []
        if self._key != "name" or self._named:
            return []
        self._named = True
        held, self._held = self._held, ""
        return [ToolCallDelta(self._index, name=value)] + ([ToolCallDelta(self._index, arguments=held)] if held else [])

    def _arguments(self, text: str) -> list[ToolCallDelta]:
        if not text:
            return []
        if not self._named:
            self._held += text
            return []
        return [ToolCallDelta(self._index, arguments=text)]


class TaggedCallsParser:
    """`--tool-call-parser hermes`: a model given tools writes each call as `<tool_call>{"name": ..., "arguments":
    {...}}</tool_call>` (the Hermes format, which vLLM's `hermes` parser reads) among its text. Text outside the
    tags is content; text that could still become an opening tag waits until it cannot. A tagged call goes out
    once its closing tag is read (or the output ends), its arguments as vLLM writes them; one that does not parse as
    a call stays content, tags and all, as written."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._text = TokenTextDecoder(tokenizer, skip_special_tokens)
        self._pending = ""  # read, not yet placed: a possible opening tag's start, or a call's unclosed text
        self._in_call = False
        self._calls = 0

    def feed(self, token_id: int) -> ChatDelta:
        content, calls = self._read(self._text.feed(token_id))
        return ChatDelta(content=content, tool_calls=calls, settled=[bool(content) and not calls])

    def finish(self) -> ChatDelta:
        content, calls = self._read(self._text.flush())
        rest, self._pending = self._pending, ""
        if self._in_call:
            self._in_call = False
            unclosed, call = self._call(rest)
            return ChatDelta(content=content + unclosed, tool_calls=calls + call)
        return ChatDelta(content=content + rest, tool_calls=calls)

    def _read(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._pending += text
        content, calls = "", list[ToolCallDelta]()
        while True:
            if self._in_call:
                end = self._pending.find(self.CLOSE)
                if end < 0:
                    return content, calls
                written, call = self._call(self._pending[:end], closed=True)
                content, calls = content + written, calls + call
                self._pending, self._in_call = self._pending[end + len(self.CLOSE):], False
                continue
            start = self._pending.find(self.OPEN)
            if start < 0:
                held = next((k for k in range(len(self.OPEN) - 1, 0, -1) if self._pending.endswith(self.OPEN[:k])), 0)
                cut = len(self._pending) - held
                content, self._pending = content + self._pending[:cut], self._pending[cut:]
                return content, calls
            content += self._pending[:start]
            self._pending, self._in_call = self._pending[start + len(self.OPEN):], True

    def _call(self, body: str, closed: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """(content, []) for a body that is no call, else ("", the call's deltas)."""
        try:
            call = json.loads(body)
        except (json.JSONDecodeError, RecursionError):  # a model may nest deeper than the reader goes
            call = None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                and isinstance(call.get("arguments"), dict)):
            return self.OPEN + body + (self.CLOSE if closed else ""), []
        index, self._calls = self._calls, self._calls + 1
        arguments = json.dumps(call["arguments"], ensure_ascii=False)  # as vLLM's hermes parser writes them
        return "", [ToolCallDelta(index, name=call["name"]), ToolCallDelta(index, arguments=arguments)]
