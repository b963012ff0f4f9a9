"""OpenAI's Conversations API: a conversation is a list of items the server keeps (server/routes/conversation_store.py).

A client creates one (with up to 20 first items and metadata), adds items, lists, reads and deletes them, and names
it in a Responses request's `conversation`: the response starts from the conversation's items, and once it has
ended (completed or incomplete) its input and output items are added to it (server/routes/responses.py). Items
are the Responses API's input items (messages, function calls and their outputs, reasoning), each with an id.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Query, Request

from server.protocol import CONVERSATION_ERRORS, APIError
from server.protocol_conversations import (
    Conversation,
    ConversationCreateRequest,
    ConversationUpdateRequest,
    DeletedConversation,
    ItemsCreateRequest,
)
from server.protocol_responses import Includable, ItemList
from server.routes.conversation_store import ConversationStore, StoredConversation
from server.routes.response_input import MAX_LISTED_ITEMS, input_items, item_page
from server.routes.response_output import new_id

router = APIRouter()

INCLUDE = Query(None, max_length=16, description="accepted: every item is returned whole")


def conversation_store(request: Request) -> ConversationStore:
    return request.app.state.conversations


def not_found(what: str, param: str) -> APIError:
    return APIError(404, f"no {what}", param=param, type="not_found_error")


def stored_conversation(request: Request, conversation_id: str, param: str = "conversation_id") -> StoredConversation:
    conversation = conversation_store(request).get(conversation_id)
    if conversation is None:
        raise not_found(f"conversation {conversation_id!r}", param)
    return conversation


def conversation_body(conversation: StoredConversation) -> Conversation:
    return Conversation(id=conversation.id, created_at=conversation.created_at, metadata=conversation.metadata)


@router.post("/v1/conversations", response_model=Conversation, responses=CONVERSATION_ERRORS)
async def create_conversation(request: Request, body: ConversationCreateRequest | None = None) -> Conversation:
    """The body may be left out: an empty conversation."""
    metadata = dict(body.metadata or {}) if body else {}
    items = input_items(body.items or []) if body else []
    conversation = conversation_store(request).create(new_id("conv"), int(time.time()), metadata, items)
    return conversation_body(conversation)


@router.get("/v1/conversations/{conversation_id}", response_model=Conversation, responses=CONVERSATION_ERRORS)
async def retrieve_conversation(conversation_id: str, request: Request) -> Conversation:
    return conversation_body(stored_conversation(request, conversation_id))


@router.post("/v1/conversations/{conversation_id}", response_model=Conversation, responses=CONVERSATION_ERRORS)
async def update_conversation(conversation_id: str, body: ConversationUpdateRequest, request: Request) -> Conversation:
    conversation = stored_conversation(request, conversation_id)
    conversation.metadata = dict(body.metadata)
    return conversation_body(conversation)


@router.delete("/v1/conversations/{conversation_id}", response_model=DeletedConversation,
               responses=CONVERSATION_ERRORS)
async def delete_conversation(conversation_id: str, request: Request) -> DeletedConversation:
    """Its items go with it; a response still running on it adds nothing when it ends."""
    if not conversation_store(request).delete(conversation_id):
        raise not_found(f"conversation {conversation_id!r}", "conversation_id")
    return DeletedConversation(id=conversation_id)


@router.post("/v1/conversations/{conversation_id}/items", response_model=ItemList,
             responses=CONVERSATION_ERRORS)
async def create_items(conversation_id: str, body: ItemsCreateRequest, request: Request,
                       include: list[Includable] | None = INCLUDE) -> ItemList:
    """The items added, with their ids, in the order given."""
    conversation = stored_conversation(request, conversation_id)
    added = input_items(body.items)
    conversation_store(request).add_items(conversation, added)
    return ItemList.of(added, has_more=False)


@router.get("/v1/conversations/{conversation_id}/items", response_model=ItemList,
            responses=CONVERSATION_ERRORS)
async def list_items(conversation_id: str, request: Request,
                     after: str | None = Query(None, max_length=256, description="an item id"),
                     limit: int = Query(20, ge=1, le=MAX_LISTED_ITEMS),
                     order: Literal["asc", "desc"] = "desc",
                     include: list[Includable] | None = INCLUDE) -> ItemList:
    """Newest first by default, as OpenAI lists them."""
    conversation = stored_conversation(request, conversation_id)
    page, has_more = item_page(conversation.items, after, limit, order, f"conversation {conversation_id!r}")
    return ItemList.of(page, has_more)


@router.get("/v1/conversations/{conversation_id}/items/{item_id}", response_model=dict[str, Any],
            responses=CONVERSATION_ERRORS)
async def retrieve_item(conversation_id: str, item_id: str, request: Request,
                        include: list[Includable] | None = INCLUDE) -> dict[str, Any]:
    item = stored_conversation(request, conversation_id).item(item_id)
    if item is None:
        raise not_found(f"item {item_id!r} in conversation {conversation_id!r}", "item_id")
    return item


@router.delete("/v1/conversations/{conversation_id}/items/{item_id}", response_model=Conversation,
               responses=CONVERSATION_ERRORS)
async def delete_item(conversation_id: str, item_id: str, request: Request) -> Conversation:
    """The conversation, as OpenAI answers."""
    conversation = stored_conversation(request, conversation_id)
    if not conversation_store(request).delete_item(conversation, item_id):
        raise not_found(f"item {item_id!r} in conversation {conversation_id!r}", "item_id")
    return conversation_body(conversation)
