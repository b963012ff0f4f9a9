"""One chat choice as it grows: the chat format's parser splits reasoning, content and tool calls; stop strings
cut content. A choice that made a tool call and ended on a stop token (harmony's `<|call|>`) finishes with
"tool_calls", as OpenAI's do."""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from models.tokenizer import Tokenizer
from server.chat import ChatDelta, ChatOutputParser
from server.detokenizer import StopStringMatcher, token_id_name, token_text
from server.engine.outputs import ChoiceOutput, TokenLogprob
from server.protocol import ChatTokenLogprob, FinishReason, TopLogprob
from server.protocol_tools import FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta
from server.routes.engine_calls import raise_if_failed


@dataclass
class StreamDelta:
    """What a choice added since its last stream chunk."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[ChatTokenLogprob] | None = None
    token_ids: list[int] = field(default_factory=list)


class ChatChoice:
    def __init__(self, tokenizer: Tokenizer, parser: ChatOutputParser, stop: list[str], top_logprobs: int | None,
                 include_stop: bool = False, tokens_as_ids: bool = False, content_logprobs: bool = False,
                 named_stop_ids: frozenset[int] = frozenset()):
        """``content_logprobs``: logprobs only for the content's tokens (the Responses API's output_text), not
        for every token generated (chat completions). ``named_stop_ids``: the stop tokens stop_reason names when
        one ends the choice (GenerationDefaults.stop_reason_ids)."""
        self._tokenizer = tokenizer
        self._content_logprobs = content_logprobs
        self._tokens_as_ids = tokens_as_ids  # logprobs name tokens "token_id:N"
        self._parser = parser
        self._stop = StopStringMatcher(stop, include_stop)
        self._named_stop_ids = named_stop_ids
        self._top_k = top_logprobs  # None: no logprobs asked for
        self.reasoning = ""
        self.content = ""
        self.tool_calls: list[ToolCall] = []
        self._call_deltas: list[ToolCallDelta] = []  # not streamed yet
        self.logprobs: list[ChatTokenLogprob] | None = [] if top_logprobs is not None else None
        self.token_ids: list[int] = []  # every token generated, a stop token included
        self.reasoning_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None  # vLLM's: the stop string or client stop token that ended it
        self._sent = (0, 0, 0, 0)  # reasoning chars, content chars, logprob entries, token ids already streamed
        self._unsettled: deque[tuple[int, TokenLogprob | None]] = deque()  # content_logprobs: fed, part not known

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def stopped_by_string(self) -> bool:
        return self._stop.matched is not None

    def logged(self) -> dict[str, Any]:
        """What --enable-log-outputs writes of it: the parts as parsed, and the tokens they came from."""
        return {"content": self.content, "reasoning": self.reasoning,
                "tool_calls": [{"name": call.function.name, "arguments": call.function.arguments}
                               for call in self.tool_calls],
                "token_ids": self.token_ids, "finish_reason": self.finish_reason}

    def add(self, output: ChoiceOutput) -> None:
        """Take in one engine output. The tokens after the one that completes a stop string are dropped, as if
        never generated; a stop token counts and is scored but the parser never sees it (unless
        include_stop_str_in_output)."""
        if self.done:
            return
        finish_reason = raise_if_failed(output)
        scores = output.logprobs or []
        for position, token_id in enumerate(output.new_token_ids):
            self.token_ids.append(token_id)
            score = scores[position] if position < len(scores) else None
            if self.logprobs is not None and not self._content_logprobs and score is not None:
                self.logprobs.append(self._logprob(token_id, score))
            if token_id == output.stop_token_id and not self._stop.keep_match:
                break
            if self.logprobs is not None and self._content_logprobs:
                self._unsettled.append((token_id, score))
            self._take(self._parser.feed(token_id))
            if self.stopped_by_string:
                break
        if finish_reason is not None and not self.stopped_by_string:
            self._take(self._parser.finish())
            if not self.stopped_by_string:
                self.content += self._stop.flush()
        if self.stopped_by_string:
            self.finish_reason, self.stop_reason = "stop", self._stop.matched
        elif finish_reason is not None:
            self.finish_reason = "tool_calls" if finish_reason == "stop" and self.tool_calls else finish_reason
            if output.stop_token_id in self._named_stop_ids:
                self.stop_reason = output.stop_token_id

    def _take(self, delta: ChatDelta) -> None:
        self._settle(delta.settled)
        self.reasoning_tokens += delta.reasoning_tokens
        self._take_text(delta)

    def _settle(self, settled: list[bool]) -> None:
        """content_logprobs: the tokens the parser has placed get their logprobs if they are content's."""
        if self.logprobs is None or not self._content_logprobs:
            return
        for is_content in settled:
            token_id, score = self._unsettled.popleft()
            if is_content and score is not None:
                self.logprobs.append(self._logprob(token_id, score))

    def take_delta(self) -> StreamDelta:
        """What was added since the last call, for the next stream chunk."""
        reasoning_sent, content_sent, logprobs_sent, tokens_sent = self._sent
        self._sent = (len(self.reasoning), len(self.content), len(self.logprobs or []), len(self.token_ids))
        new_logprobs = None if self.logprobs is None else self.logprobs[logprobs_sent:]
        calls, self._call_deltas = self._call_deltas, []
        return StreamDelta(self.reasoning[reasoning_sent:], self.content[content_sent:], calls, new_logprobs,
                           self.token_ids[tokens_sent:])

    def _take_text(self, delta: ChatDelta) -> None:
        self.reasoning += delta.reasoning
        self.content += self._stop.feed(delta.content)
        for part in delta.tool_calls:
            if part.name is not None:
                call = ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=part.name, arguments=""))
                self.tool_calls.append(call)
                self._call_deltas.append(ToolCallDelta(index=part.index, id=call.id, type="function",
                                                       function=FunctionCallDelta(name=part.name, arguments="")))
            if part.arguments:
                self.tool_calls[part.index].function.arguments += part.arguments
                self._add_argument_delta(part.index, part.arguments)

    def _add_argument_delta(self, index: int, arguments: str) -> None:
        """Argument text joins the previous unsent fragment of the same call; the naming delta stays alone."""
        last = self._call_deltas[-1] if self._call_deltas else None
        if last is not None and last.index == index and last.id is None:
            last.function.arguments = (last.function.arguments or "") + arguments
        else:
            self._call_deltas.append(ToolCallDelta(index=index, function=FunctionCallDelta(arguments=arguments)))

    def _logprob(self, token_id: int, score: TokenLogprob) -> ChatTokenLogprob:
        top = [self._top_logprob(t, value) for t, value in score.top[: self._top_k]]
        return ChatTokenLogprob(**self._top_logprob(token_id, score.logprob).model_dump(), top_logprobs=top)

    def _top_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        name = token_id_name(token_id) if self._tokens_as_ids else token_text(self._tokenizer, token_id)
        return TopLogprob(token=name, logprob=logprob, bytes=list(self._tokenizer.token_bytes(token_id)))
