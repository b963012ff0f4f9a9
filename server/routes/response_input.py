"""A Responses request's input (and its output, for the store) as chat messages, which the chat format renders.

`instructions` becomes a developer message in front and is not carried over to a follow-up, as OpenAI does;
every input item is one message: a `message` keeps its role, `reasoning` is an assistant turn's reasoning,
`function_call` an assistant turn's call, `function_call_output` a tool message answering `call_id`.
`input_items` keeps the input as items too, each with an id, for `GET /v1/responses/{id}/input_items` and for
conversations, whose stored items `stored_item_messages` reads back.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import TypeAdapter

from server.chat import ChatMessage, ToolCall
from server.protocol import APIError
from server.protocol_responses import FunctionCallItem, FunctionCallOutputItem, InputItem, MessageItem, ReasoningItem
from server.routes.response_output import new_id

MAX_LISTED_ITEMS = 100  # items a page may hold (a response's input items, a conversation's)
ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def input_messages(items: str | list | None) -> list[ChatMessage]:
    if items is None:
        return []
    if isinstance(items, str):
        return [ChatMessage("user", items)]
    return [item_message(item) for item in items]


def input_items(items: str | list | None) -> list[dict]:
    """The input as the items OpenAI lists: a string is one user message; text content becomes parts."""
    if items is None:
        return []
    if isinstance(items, str):
        return [{"id": new_id("msg"), "type": "message", "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": items}]}]
    listed = []
    for item in items:
        fields = item.model_dump(exclude_none=True)
        fields["id"] = fields.get("id") or new_id(ID_PREFIXES[item.type])
        fields.setdefault("status", "completed")
        if isinstance(item, MessageItem) and isinstance(item.content, str):
            part_type = "output_text" if item.role == "assistant" else "input_text"
            fields["content"] = [{"type": part_type, "text": item.content}
                                 | ({"annotations": []} if item.role == "assistant" else {})]
        listed.append(fields)
    return listed


def item_message(item: MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem) -> ChatMessage:
    if isinstance(item, MessageItem):
        text = item.content if isinstance(item.content, str) else "".join(part.text for part in item.content)
        return ChatMessage(item.role, text)
    if isinstance(item, FunctionCallItem):
        return ChatMessage("assistant", "", tool_calls=[ToolCall(item.call_id, item.name, item.arguments)])
    if isinstance(item, FunctionCallOutputItem):
        return ChatMessage("tool", item.output, tool_call_id=item.call_id)
    return ChatMessage("assistant", "", reasoning="".join(part.text for part in item.content or []))


def output_messages(items: list[dict]) -> list[ChatMessage]:
    """A response's output items as the assistant messages a follow-up shows the model."""
    messages = []
    for item in items:
        if item["type"] == "reasoning":
            messages.append(ChatMessage("assistant", "", reasoning=item["content"][0]["text"]))
        elif item["type"] == "message":
            messages.append(ChatMessage("assistant", item["content"][0]["text"]))
        else:
            messages.append(ChatMessage("assistant", "", tool_calls=[
                ToolCall(item["call_id"], item["name"], item["arguments"])]))
    return messages


_INPUT_ITEM: TypeAdapter[Any] = TypeAdapter(InputItem)


def stored_item_messages(items: list[dict]) -> list[ChatMessage]:
    """Items as listed (input items with ids, and output items as a response returned them, which are valid input
    items) as the messages the model is shown."""
    return [item_message(_INPUT_ITEM.validate_python(item)) for item in items]


def item_page(items: list[dict], after: str | None, limit: int, order: Literal["asc", "desc"],
              owner: str) -> tuple[list[dict], bool]:
    """One page of a list of items (oldest first) in ``order``, after the item ``after``; and whether more follow.
    ``owner`` names the list in the 400 for an ``after`` it does not hold."""
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise APIError(400, f"no item {after!r} in {owner}", param="after")
        ordered = ordered[ids.index(after) + 1:]
    return ordered[:limit], len(ordered) > limit
