"""The head of every harmony prompt -- the system message and the tool namespace -- rendered by openai-harmony.

openai-harmony renders the parts whose rules only it defines: the system message (its defaults, and the
line that sends function calls to the commentary channel when there are tools) and the `functions`
namespace (JSON schemas as TypeScript-like declarations). It renders them for a developer message that
holds the tools alone, cached per (effort, date, tools); the instructions are put in front of that text as
harmony joins them, and the developer message is encoded by tiktoken. Why not all of it by openai-harmony:
its tokenizer is 25 to 100 times slower than tiktoken on the same o200k vocabulary (measured here: a
10k-token, 50-message conversation renders in 43 ms through openai-harmony, in 2-3 ms through harmony.py,
on the event loop), and instructions and conversations can be long, while framing a message is a few fixed
tokens. Tests check whole prompts token for token against openai-harmony rendering the whole conversation.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

import openai_harmony as oh

from server.chat.harmony_parser import HarmonySpecialTokens
from server.chat.messages import FunctionTool

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer

HEADS_CACHED = 64


class HarmonyHead:
    def __init__(self, tokenizer: Tokenizer, tokens: HarmonySpecialTokens, encoding: oh.HarmonyEncoding) -> None:
        self._tokenizer = tokenizer
        self._tokens = tokens
        self._encoding = encoding
        self._rendered = functools.lru_cache(maxsize=HEADS_CACHED)(self._render)

    def ids(self, effort: str, date: str, instructions: str, tools: list[FunctionTool]) -> list[int]:
        """The system message, then the developer message when there are instructions or tools."""
        key = json.dumps([[t.name, t.description, t.parameters] for t in tools])
        system_ids, tools_text = self._rendered(effort, date, key)
        parts = [f"# Instructions\n\n{instructions}" if instructions else "", tools_text]
        developer = "\n\n".join(part for part in parts if part)
        if not developer:
            return list(system_ids)
        return [*system_ids, self._tokens.start, *self._tokenizer.encode_ordinary("developer"), self._tokens.message,
                *self._tokenizer.encode_ordinary(developer), self._tokens.end]

    def _render(self, effort: str, date: str, tools_key: str) -> tuple[tuple[int, ...], str]:
        """System message ids, and the developer text openai-harmony writes for the tools ("" for none)."""
        system = (oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(effort.capitalize()))
                  .with_conversation_start_date(date))
        head = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
        tools = [oh.ToolDescription.new(name, description, parameters=parameters)
                 for name, description, parameters in json.loads(tools_key)]
        if tools:
            developer = oh.DeveloperContent.new().with_function_tools(tools)
            head.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
        ids = self._encoding.render_conversation(oh.Conversation.from_messages(head))
        system_end = ids.index(self._tokens.end) + 1
        if not tools:
            return tuple(ids[:system_end]), ""
        body = ids[ids.index(self._tokens.message, system_end) + 1 : -1]
        return tuple(ids[:system_end]), self._tokenizer.decode_bytes(body).decode("utf-8")
