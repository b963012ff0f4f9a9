"""Stored responses, for `previous_response_id`, `GET /v1/responses/{id}` and its `input_items`: in memory, bounded.

The store keeps the last MAX_STORED_RESPONSES responses created with `store: true` (the default), each with
the conversation it continued, so a follow-up needs only its new input. Reading one (by either route) makes
it the most recent; when the store is full the least recently used one is evicted, and `DELETE` removes one.
Nothing survives a restart, and each server process has its own store.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from server.chat import ChatMessage

MAX_STORED_RESPONSES = 1024


@dataclass
class StoredResponse:
    body: dict  # the response object as it was returned
    conversation: list[ChatMessage]  # every message up to and including this response's output
    input_items: list[dict]  # this request's own `input`, as items with ids, for GET .../input_items


class ResponseStore:
    def __init__(self, capacity: int = MAX_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self._responses[response_id] = stored
        self._responses.move_to_end(response_id)
        while len(self._responses) > self.capacity:
            self._responses.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._responses.pop(response_id, None) is not None
