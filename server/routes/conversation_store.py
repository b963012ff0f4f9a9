"""Conversations, for the Conversations API and the responses that name one: in memory, bounded.

A conversation holds its items as the API lists them (each with an id). At most MAX_CONVERSATIONS of them, whose
items hold at most MAX_CONVERSATION_CHARS characters of JSON in all; reading or adding to one makes it the most
recent, and past either bound the least recently used are evicted. Nothing survives a restart, and each server
process has its own store, as with stored responses.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

MAX_CONVERSATIONS = 1024
MAX_CONVERSATION_CHARS = 2**26


@dataclass
class StoredConversation:
    id: str
    created_at: int
    metadata: dict[str, str]
    items: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    chars: int = 0  # of the items' JSON

    def item(self, item_id: str) -> dict[str, Any] | None:
        return next((item for item in self.items if item["id"] == item_id), None)


class ConversationStore:
    def __init__(self, capacity: int = MAX_CONVERSATIONS, max_chars: int = MAX_CONVERSATION_CHARS) -> None:
        self.capacity = capacity
        self.max_chars = max_chars
        self._conversations: OrderedDict[str, StoredConversation] = OrderedDict()
        self._chars = 0

    def create(self, conversation_id: str, created_at: int, metadata: dict[str, str],
               items: list[dict[str, Any]]) -> StoredConversation:
        conversation = StoredConversation(conversation_id, created_at, metadata)
        self._conversations[conversation_id] = conversation
        self.add_items(conversation, items)
        return conversation

    def get(self, conversation_id: str) -> StoredConversation | None:
        conversation = self._conversations.get(conversation_id)
        if conversation is not None:
            self._conversations.move_to_end(conversation_id)
        return conversation

    def add_items(self, conversation: StoredConversation, items: list[dict[str, Any]]) -> None:
        """Appended, if it is still stored (a response may end after its conversation was deleted or evicted)."""
        if self._conversations.get(conversation.id) is not conversation:
            return
        conversation.items.extend(items)
        added = sum(len(json.dumps(item)) for item in items)
        conversation.chars += added
        self._chars += added
        self._conversations.move_to_end(conversation.id)
        self._evict()

    def delete_item(self, conversation: StoredConversation, item_id: str) -> bool:
        item = conversation.item(item_id)
        if item is None:
            return False
        conversation.items.remove(item)
        removed = len(json.dumps(item))
        conversation.chars -= removed
        self._chars -= removed
        return True

    def delete(self, conversation_id: str) -> bool:
        conversation = self._conversations.pop(conversation_id, None)
        if conversation is None:
            return False
        self._chars -= conversation.chars
        return True

    def _evict(self) -> None:
        while len(self._conversations) > self.capacity or (self._chars > self.max_chars and self._conversations):
            _, evicted = self._conversations.popitem(last=False)
            self._chars -= evicted.chars
