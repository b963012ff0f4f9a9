"""A response's output items, built from one chat choice's deltas, and the stream events that announce them.

Items come in the order the model wrote them: `reasoning` (its text as `reasoning_text` content), `message`
(one `output_text` part; text outside any well-formed harmony message lands here too, as in chat
completions) and `function_call`. A new kind of text, or a new call, closes the item before it. Each item
is announced by `response.output_item.added`, grows by delta events and ends with its `.done` events and
`response.output_item.done`, the sequence the OpenAI SDK's stream accumulator checks.
"""

from __future__ import annotations

import copy
import uuid

from server.routes.chat_choice import StreamDelta

Event = dict


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseOutput:
    def __init__(self, logprobs: bool = False) -> None:
        """``logprobs``: output_text parts and their events carry the content tokens' logprobs (delta.logprobs)."""
        self.items: list[dict] = []
        self._open: dict | None = None
        self._logprobs = logprobs
        self._unsent_logprobs: list[dict] = []  # content tokens whose text has not come out yet

    def add(self, delta: StreamDelta) -> list[Event]:
        events: list[Event] = []
        self._unsent_logprobs += [entry.model_dump() for entry in delta.logprobs or []]
        if delta.reasoning:
            events += self._text("reasoning", delta.reasoning)
        if delta.content:
            events += self._text("message", delta.content)
        for call in delta.tool_calls:
            if call.id is not None:
                events += self._start({"id": new_id("fc"), "type": "function_call", "call_id": call.id,
                                       "name": call.function.name, "arguments": "", "status": "in_progress"})
            if call.function.arguments:
                self._current()["arguments"] += call.function.arguments
                events.append(self._event("response.function_call_arguments.delta", delta=call.function.arguments))
        return events

    def close(self, status: str = "completed") -> list[Event]:
        """End the item being written; `status` is "incomplete" when max_output_tokens cut it."""
        item, self._open = self._open, None
        if item is None:
            return []
        if item["type"] == "message":
            part = item["content"][0]
            if self._logprobs:
                part["logprobs"] += self._unsent_logprobs
                self._unsent_logprobs = []
            events = [self._event("response.output_text.done", content_index=0, text=part["text"],
                                  logprobs=part.get("logprobs", [])),
                      self._event("response.content_part.done", content_index=0, part=part)]
        elif item["type"] == "reasoning":
            events = [self._event("response.reasoning_text.done", content_index=0, text=item["content"][0]["text"])]
        else:
            events = [self._event("response.function_call_arguments.done", arguments=item["arguments"],
                                  name=item["name"])]
        item["status"] = status
        return events + [{"type": "response.output_item.done", "output_index": len(self.items) - 1, "item": item}]

    def _text(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open is None or self._open["type"] != kind:
            if kind == "message":
                events += self._start({"id": new_id("msg"), "type": "message", "role": "assistant",
                                       "status": "in_progress", "content": []})
                part = {"type": "output_text", "text": "", "annotations": []} | ({"logprobs": []} if self._logprobs
                                                                                 else {})
                self._current()["content"].append(part)
                events.append(self._event("response.content_part.added", content_index=0, part=dict(part)))
            else:
                events += self._start({"id": new_id("rs"), "type": "reasoning", "summary": [],
                                       "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"})
        part = self._current()["content"][0]
        part["text"] += text
        if kind == "reasoning":
            return events + [self._event("response.reasoning_text.delta", content_index=0, delta=text)]
        logprobs, self._unsent_logprobs = self._unsent_logprobs, []
        if self._logprobs:
            part["logprobs"] += logprobs
        return events + [self._event("response.output_text.delta", content_index=0, delta=text, logprobs=logprobs)]

    def _start(self, item: dict) -> list[Event]:
        events = self.close()
        self.items.append(item)
        self._open = item
        return events + [{"type": "response.output_item.added", "output_index": len(self.items) - 1,
                          "item": copy.deepcopy(item)}]

    def _current(self) -> dict:
        """The item being written: a delta that extends an item always comes after the one that opened it."""
        if self._open is None:
            raise RuntimeError("no output item is open")
        return self._open

    def _event(self, kind: str, **fields) -> Event:
        """An event about the last item, the one being written or just closed."""
        return {"type": kind, "item_id": self.items[-1]["id"], "output_index": len(self.items) - 1, **fields}
