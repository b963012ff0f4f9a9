"""Stored responses, for `previous_response_id`, `GET /v1/responses/{id}` and its `input_items`: in memory, bounded.

The store keeps responses created with `store: true` (the default), each with the conversation it continued, so
a follow-up needs only its new input: at most MAX_STORED_RESPONSES of them, whose conversations hold at most
MAX_STORED_CHARS characters in all (a response counts its whole conversation, though a follow-up shares its
earlier messages, so this overstates the memory a chain holds). Reading one (by either route) makes it the most
recent; past either bound the least recently used are evicted, and `DELETE` removes one. Nothing survives a
restart, and each server process has its own store.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from server.chat import ChatMessage

MAX_STORED_RESPONSES = 1024
MAX_STORED_CHARS = 2**26  # ~64 M characters of conversation text, a few hundred MB with its copies in the bodies


@dataclass
class StoredResponse:
    body: dict  # the response object as it was returned
    conversation: list[ChatMessage]  # every message up to and including this response's output
    input_items: list[dict]  # this request's own `input`, as items with ids, for GET .../input_items

    @property
    def chars(self) -> int:
        return sum(len(m.content) + len(m.reasoning or "") + sum(len(c.arguments) for c in m.tool_calls)
                   for m in self.conversation)


class ResponseStore:
    def __init__(self, capacity: int = MAX_STORED_RESPONSES, max_chars: int = MAX_STORED_CHARS) -> None:
        self.capacity = capacity
        self.max_chars = max_chars
        self._responses: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()  # with its chars
        self._chars = 0

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self.delete(response_id)
        chars = stored.chars
        self._responses[response_id] = stored, chars
        self._chars += chars
        while len(self._responses) > self.capacity or self._chars > self.max_chars:
            _, (_, evicted) = self._responses.popitem(last=False)
            self._chars -= evicted

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._responses.get(response_id)
        if entry is None:
            return None
        self._responses.move_to_end(response_id)
        return entry[0]

    def delete(self, response_id: str) -> bool:
        entry = self._responses.pop(response_id, None)
        if entry is None:
            return False
        self._chars -= entry[1]
        return True
