"""A Responses request's input (and its output, for the store) as chat messages, which the chat format renders.

`instructions` becomes a developer message in front and is not carried over to a follow-up, as OpenAI does;
every input item is one message: a `message` keeps its role, `reasoning` is an assistant turn's reasoning,
`function_call` an assistant turn's call, `function_call_output` a tool message answering `call_id`.
`input_items` keeps the input as items too, each with an id, for `GET /v1/responses/{id}/input_items`.
"""

from __future__ import annotations

from server.chat import ChatMessage, ToolCall
from server.protocol_responses import FunctionCallItem, FunctionCallOutputItem, MessageItem, ReasoningItem
from server.routes.response_output import new_id

ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def input_messages(items: str | list) -> list[ChatMessage]:
    if isinstance(items, str):
        return [ChatMessage("user", items)]
    return [item_message(item) for item in items]


def input_items(items: str | list) -> list[dict]:
    """The input as the items OpenAI lists: a string is one user message; text content becomes parts."""
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
