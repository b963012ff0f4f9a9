"""The records chat formats exchange with the HTTP layer: messages in, text deltas out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class ChatMessage:
    """One OpenAI chat message, already reduced to text by the HTTP layer."""

    role: str  # "system" | "developer" | "user" | "assistant"
    content: str
    reasoning: str | None = None  # an assistant turn's earlier reasoning, if the client sent it back


@dataclass
class ChatDelta:
    """Text a generated token released, split by where it goes in the response."""

    reasoning: str = ""  # message.reasoning_content
    content: str = ""  # message.content


class ChatOutputParser(Protocol):
    """Turns one choice's generated tokens into text deltas, fed token by token as they stream."""

    def feed(self, token_id: int) -> ChatDelta: ...

    def finish(self) -> ChatDelta:
        """Flush what was held back (incomplete UTF-8, an unfinished header)."""
        ...
