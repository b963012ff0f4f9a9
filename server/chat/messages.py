"""The records chat formats exchange with the HTTP layer: messages and tools in, deltas out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class ToolCall:
    """A call an assistant turn made: `arguments` is the JSON text exactly as the model wrote it."""

    id: str
    name: str  # a function's name, or a built-in tool's recipient ("browser.search", "python")
    arguments: str


@dataclass
class FunctionTool:
    """One function the client offers: `parameters` is its JSON schema."""

    name: str
    description: str = ""
    parameters: dict | None = None


@dataclass
class ChatMessage:
    """One OpenAI chat message, already reduced to text by the HTTP layer."""

    role: str  # "system" | "developer" | "user" | "assistant" | "tool"
    content: str
    reasoning: str | None = None  # an assistant turn's earlier reasoning, if the client sent it back
    tool_calls: list[ToolCall] = field(default_factory=list)  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool result: the call it answers
    name: str | None = None  # a tool result named by its function instead (OpenAI's deprecated function message)


@dataclass
class ToolCallDelta:
    """Part of a generated tool call: the first delta of a call names it, later ones add argument text."""

    index: int  # the call's position among this choice's calls
    name: str | None = None
    arguments: str = ""


@dataclass
class ChatDelta:
    """What a generated token released, split by where it goes in the response."""

    reasoning: str = ""  # message.reasoning
    content: str = ""  # message.content
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    # The fed tokens whose part became known with this delta, oldest first: True for a token of the content.
    # Every token fed is settled once, in order; a harmony header's tokens only when the header ends (as a header,
    # or abandoned as loose content text), so that logprobs can follow the content's own tokens exactly.
    settled: list[bool] = field(default_factory=list)
    reasoning_tokens: int = 0  # of the tokens fed, how many were the reasoning's own (usage reports them)


class ChatOutputParser(Protocol):
    """Turns one choice's generated tokens into deltas, fed token by token as they stream."""

    def feed(self, token_id: int) -> ChatDelta: ...

    def finish(self) -> ChatDelta:
        """Flush what was held back (incomplete UTF-8, an unfinished header)."""
        ...
