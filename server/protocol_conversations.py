"""The Conversations API's bodies, as OpenAI's API reference has them: a conversation is a list of the same items a
Responses request takes as input (and a response returns as output), kept by the server for the responses that
name it (server/routes/conversations.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from server.protocol import Metadata
from server.protocol_base import Strict
from server.protocol_responses import InputItem

MAX_ITEMS_ADDED = 20  # OpenAI's: items a create request may add at once


class ConversationCreateRequest(Strict):
    items: Annotated[list[InputItem], Field(max_length=MAX_ITEMS_ADDED)] | None = Field(
        None, description="the conversation's first items")
    metadata: Metadata | None = Field(None, max_length=16)


class ConversationUpdateRequest(Strict):
    metadata: Metadata = Field(max_length=16, description="replaces the conversation's metadata")


class ItemsCreateRequest(Strict):
    items: Annotated[list[InputItem], Field(min_length=1, max_length=MAX_ITEMS_ADDED)]


class Conversation(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, str]


class DeletedConversation(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: Literal[True] = True

