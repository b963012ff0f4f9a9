"""OpenAI's Responses API over the chat formats: create, retrieve (or resume its stream), cancel, delete, and list
a response's input items.

The conversation (a stored previous response's, then `instructions`, then `input`) is rendered by the same
function chat completions uses; `truncation: "auto"` drops its oldest messages until it fits. The one generated
choice is parsed by the same ChatChoice, and its deltas become output items (response_output). `text.format`
constrains the answer as chat's response_format does, and a required or named `tool_choice` forces a call as in
chat completions (a forced call wins). Stored responses: see response_store; background ones:
response_background. A stored response generated on its request's own connection can be retrieved, and its
input items listed, while it is in progress, as OpenAI's can; only background ones can be cancelled.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import AsyncGenerator, Callable
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict

from server.chat import ChatMessage, ChatOutputParser, FunctionTool
from server.engine.sampling_params import GrammarSpec, SamplingParams
from server.protocol import STORED_RESPONSE_ERRORS, APIError, CompletionTokensDetails, Usage, sse_responses
from server.protocol_responses import ItemList, NamedFunctionChoice, ResponsesRequest
from server.routes.chat_choice import ChatChoice
from server.routes.chat_prompt import check_auto_tool_choice, chosen_tools, render_messages, template_variables
from server.routes.conversation_store import ConversationStore, StoredConversation
from server.routes.conversations import conversation_store, stored_conversation
from server.routes.engine_calls import MergedOutputs, PromptJob, cancel_on_disconnect
from server.routes.forced_call import choice_parser, forced_call_spec
from server.routes.models import ServedModel, find_model
from server.routes.response_background import BackgroundRuns, Run
from server.routes.response_format import answer_prefix, text_format_spec
from server.routes.response_input import (
    MAX_LISTED_ITEMS,
    input_items,
    input_messages,
    item_page,
    output_messages,
    stored_item_messages,
)
from server.routes.response_output import ResponseOutput, new_id
from server.routes.response_store import ResponseStore, StoredResponse
from server.streaming import named_sse_response, prime

router = APIRouter()


class ResponseBody(BaseModel):
    """A response object or stream event: fields as OpenAI's reference names them, built by this module."""

    model_config = ConfigDict(extra="allow")


def response_store(request: Request) -> ResponseStore:
    return request.app.state.response_store


def background_runs(request: Request) -> BackgroundRuns:
    return request.app.state.background_responses


def foreground_runs(request: Request) -> dict[str, ResponseRun]:
    return request.app.state.foreground_responses


class ResponseRun:
    def __init__(self, served: ServedModel, body: ResponsesRequest, conversation: list[ChatMessage],
                 prompt: list[int], max_tokens: int, store: ResponseStore, grammar: GrammarSpec | None,
                 parser: ChatOutputParser) -> None:
        self.served, self.body, self.conversation, self.prompt = served, body, conversation, prompt
        self.store = store
        logprobs = body.top_logprobs is not None or "message.output_text.logprobs" in (body.include or [])
        top_logprobs = (body.top_logprobs or 0) if logprobs else None
        sampling = served.generation.sampling.resolve(temperature=body.temperature, top_p=body.top_p)
        self.params = SamplingParams(max_tokens=max_tokens, **sampling, stop_token_ids=served.chat_stop_ids,
                                     grammar=grammar, logprobs=top_logprobs, priority=body.priority,
                                     cache_salt=body.cache_salt)
        self.id = new_id("resp")
        self.created = int(time.time())
        self.input_items = input_items(body.input)
        self.choice = ChatChoice(served.engine.tokenizer, parser, [], top_logprobs,
                                 content_logprobs=True)
        self.output = ResponseOutput(logprobs)
        self.status = "queued" if body.background else "in_progress"
        self.sequence = 0
        self.cached_tokens = 0  # prompt tokens the prefix cache served
        self.in_flight: dict[str, ResponseRun] | None = None  # where a foreground run is found while it runs
        self.joined: tuple[ConversationStore, StoredConversation] | None = None  # the conversation it adds to

    async def events(self) -> AsyncGenerator[dict, None]:
        """Every stream event without its sequence number, ending with response.completed or .incomplete."""
        if self.in_flight is not None:
            self.in_flight[self.id] = self
        try:
            yield {"type": "response.created", "response": self.snapshot(self.status)}
            self.status = "in_progress"
            yield {"type": "response.in_progress", "response": self.snapshot(self.status)}
            async with MergedOutputs(self.served.engine, self.id, [PromptJob(self.prompt, self.params)],
                                     1) as outputs:
                async for _, output in outputs:
                    self.cached_tokens = max(self.cached_tokens, output.num_cached_tokens)
                    self.choice.add(output)
                    for event in self.output.add(self.choice.take_delta()):
                        yield event
            incomplete = self.choice.finish_reason == "length"
            for event in self.output.close("incomplete" if incomplete else "completed"):
                yield event
            final = self._finish("incomplete" if incomplete else "completed")
            yield {"type": f"response.{final['status']}", "response": final}
        finally:
            if self.in_flight is not None:
                self.in_flight.pop(self.id, None)

    def end(self, status: str, error: dict[str, str] | None = None) -> dict[str, Any]:
        """A background run cut short (cancelled, or failed): its open item ends incomplete, and it is stored."""
        self.output.close("incomplete")
        return self._finish(status, error)

    async def response(self) -> ResponseBody:
        async for event in self.events():
            last = event
        return ResponseBody(**last["response"])

    async def stream(self) -> AsyncGenerator[ResponseBody, None]:
        async for event in self.events():
            yield ResponseBody.model_validate(event | {"sequence_number": self.sequence})
            self.sequence += 1

    def _finish(self, status: str, error: dict[str, str] | None = None) -> dict[str, Any]:
        self.status = status
        final = self.snapshot(status, error)
        if self.joined is not None and status in ("completed", "incomplete"):
            conversations, joined = self.joined
            conversations.add_items(joined, self.input_items + [dict(item) for item in self.output.items])
        if self.body.store:
            conversation = self.conversation + output_messages(self.output.items)
            self.store.put(self.id, StoredResponse(final, conversation, self.input_items))
        return final

    def usage(self) -> Usage:
        """The request log's counts, named as the other routes' are."""
        output_tokens = self.choice.num_tokens
        return Usage(prompt_tokens=len(self.prompt), completion_tokens=output_tokens,
                     total_tokens=len(self.prompt) + output_tokens,
                     completion_tokens_details=CompletionTokensDetails(reasoning_tokens=self.choice.reasoning_tokens))

    def snapshot(self, status: str, error: dict[str, str] | None = None) -> dict[str, Any]:
        body = self.body
        usage = None
        ended = status not in ("queued", "in_progress")
        if ended:
            output_tokens = self.choice.num_tokens
            usage = {"input_tokens": len(self.prompt), "input_tokens_details": {"cached_tokens": self.cached_tokens},
                     "output_tokens": output_tokens,
                     "output_tokens_details": {"reasoning_tokens": self.choice.reasoning_tokens},
                     "total_tokens": len(self.prompt) + output_tokens}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": self.served.name,
            "status": status, "output": [dict(item) for item in self.output.items] if ended else [],
            "error": error, "background": body.background,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": body.max_tool_calls,
            "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "conversation": {"id": self.joined[1].id} if self.joined else None,
            "prompt_cache_key": body.prompt_cache_key, "safety_identifier": body.safety_identifier,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "service_tier": "default", "store": body.store, "temperature": body.temperature, "top_p": body.top_p,
            "text": (body.text.model_dump(by_alias=True, exclude_none=True) if body.text
                     else {"format": {"type": "text"}}),
            "tool_choice": (body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedFunctionChoice)
                            else body.tool_choice or "auto"),
            "tools": [tool.model_dump() for tool in body.tools or []], "top_logprobs": body.top_logprobs,
            "truncation": body.truncation or "disabled", "usage": usage, "user": body.user,
        }


def truncated(conversation: list[ChatMessage], render: Callable[[list[ChatMessage]], list[int]],
              budget: int) -> tuple[list[ChatMessage], list[int]]:
    """`truncation: "auto"`: the conversation less as few of its oldest messages as make its prompt fit in
    ``budget`` tokens (found by bisection: a shorter conversation never renders longer). A tool result never
    begins it, since its call would be gone; when nothing fits, the shortest is returned and admission refuses
    it by its length."""
    starts = [i for i, message in enumerate(conversation) if message.role != "tool"] or [0]
    prompts: dict[int, list[int]] = {}

    def fits(k: int) -> bool:
        prompts[k] = render(conversation[starts[k]:])
        return len(prompts[k]) <= budget

    first = min(bisect_left(range(len(starts)), True, key=fits), len(starts) - 1)
    if first not in prompts:
        fits(first)
    return conversation[starts[first]:], prompts[first]


@router.post("/v1/responses", response_model=ResponseBody, responses=sse_responses(ResponseBody, named=True))
async def create_response(body: ResponsesRequest, request: Request):
    served = find_model(request, body.model)
    served.check_logprobs(top_logprobs=body.top_logprobs)
    if body.background and not body.store:
        raise APIError(400, "a background response is stored: background needs store true", param="background")
    store = response_store(request)
    if body.input is None and body.conversation is None and body.previous_response_id is None:
        raise APIError(400, "input is required unless conversation or previous_response_id gives a conversation "
                       "to answer", param="input")
    conversation: list[ChatMessage] = []
    joined = None
    if body.conversation is not None:
        if body.previous_response_id is not None:
            raise APIError(400, "give conversation or previous_response_id, not both", param="conversation")
        conversation_id = body.conversation if isinstance(body.conversation, str) else body.conversation.id
        joined = stored_conversation(request, conversation_id, param="conversation")
        conversation = stored_item_messages(joined.items)
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        running = in_progress(request, body.previous_response_id)
        if previous is None and running is not None:
            raise APIError(400, f"response {body.previous_response_id!r} is still {running.status}: continue it "
                           "once it has ended", param="previous_response_id")
        if previous is None:
            raise not_stored(body.previous_response_id, "previous_response_id")
        conversation = list(previous.conversation)
    conversation += input_messages(body.input)
    head = [ChatMessage("developer", body.instructions)] if body.instructions else []
    choice = body.tool_choice
    named = choice.name if isinstance(choice, NamedFunctionChoice) else None
    mode = None if isinstance(choice, NamedFunctionChoice) else choice  # "none", "auto" or "required"
    tools = chosen_tools([FunctionTool(t.name, t.description or "", t.parameters) for t in body.tools or []],
                         "named" if named else mode, named)
    check_auto_tool_choice(served, tools, "named" if named else mode)
    effort = body.reasoning.effort if body.reasoning else None
    variables = template_variables(served, served.chat_format, None, effort)  # the server's defaults

    def render(messages: list[ChatMessage]) -> list[int]:
        return render_messages(served.chat_format, head + messages, tools, variables, param="input")

    engine = served.engine
    if body.truncation == "auto":
        conversation, prompt = truncated(conversation, render, engine.max_model_len - (body.max_output_tokens or 1))
    else:
        prompt = render(conversation)
    max_tokens = served.generation.max_tokens(body.max_output_tokens or max(engine.max_model_len - len(prompt), 0))
    forced = forced_call_spec(served.chat_format, tools, mode, named,
                              parallel=body.parallel_tool_calls is not False)
    grammar = forced or text_format_spec(body.text.format if body.text else None, answer_prefix(served.chat_format))
    await engine.compile_grammar(grammar)
    run = ResponseRun(served, body, conversation, prompt, max_tokens, store, grammar,
                      choice_parser(served.chat_format, mode, named, tools=bool(tools)))
    if joined is not None:
        run.joined = conversation_store(request), joined
    engine.validate(len(prompt), run.params, 1)
    if body.background:
        runs = background_runs(request)
        background = runs.start(run)
        await asyncio.sleep(0)  # the run's task goes as far as the engine's admission: it awaits nothing before
        if background.refused is not None:  # the queue is full: a 429 now, as for any request
            runs.forget(run.id)
            store.delete(run.id)
            raise background.refused
        if body.stream:
            return named_sse_response(stream_bodies(background.log.follow(-1)))
        return ResponseBody(**background.log.events[0]["response"])  # as response.created had it: queued
    if body.store:
        run.in_flight = foreground_runs(request)
    request.state.usage = run.usage  # read by the request log once the answer is out
    request.state.outputs = lambda: [run.choice.logged()]  # and by --enable-log-outputs
    if body.stream:
        return named_sse_response(await prime(request, run.stream()))
    return await cancel_on_disconnect(request, run.response())


async def stream_bodies(events: AsyncGenerator[dict, None]) -> AsyncGenerator[ResponseBody, None]:
    async for event in events:
        yield ResponseBody.model_validate(event)


@router.get("/v1/responses/{response_id}", response_model=ResponseBody,
            responses=STORED_RESPONSE_ERRORS | {200: sse_responses(ResponseBody, named=True)[200]})
async def retrieve_response(response_id: str, request: Request, stream: bool = False,
                            starting_after: int = Query(-1, ge=-1, lt=2**31,
                                                        description="with stream: the events after this one"),
                            include_obfuscation: bool | None = Query(None, description="accepted; no padding")):
    """A stored response, or a background one as it stands; with `stream`, a background response's events."""
    background = background_runs(request).get(response_id)
    if stream:
        if background is None:
            stored_body(request, response_id)  # a 404 for an unknown id
            raise APIError(400, "only a background response's events can be streamed, and only those of the last "
                           "runs: GET it without stream", param="stream")
        return named_sse_response(stream_bodies(background.log.follow(starting_after)))
    running = in_progress(request, response_id)
    if running is not None:
        return ResponseBody(**running.snapshot(running.status))
    return ResponseBody(**stored_body(request, response_id))


@router.post("/v1/responses/{response_id}/cancel", response_model=ResponseBody,
             responses=STORED_RESPONSE_ERRORS)
async def cancel_response(response_id: str, request: Request) -> ResponseBody:
    """Only a background response can be cancelled; one that has ended is returned as it ended."""
    background = background_runs(request).get(response_id)
    if background is None:
        foreground = foreground_runs(request).get(response_id)
        body = foreground.snapshot(foreground.status) if foreground else stored_body(request, response_id)
        if not body.get("background"):
            raise APIError(400, "only a background response can be cancelled", param="response_id")
        return ResponseBody(**body)
    await background.cancel()
    assert background.final is not None
    return ResponseBody(**background.final)


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: Literal[True] = True


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse, responses=STORED_RESPONSE_ERRORS)
async def delete_response(response_id: str, request: Request) -> DeletedResponse:
    """A background response still running is cancelled first."""
    if response_id in foreground_runs(request):
        raise APIError(400, f"response {response_id!r} is in progress on its request's connection: delete it once "
                       "it has ended", param="response_id")
    runs = background_runs(request)
    background = runs.get(response_id)
    if background is not None:
        await background.cancel()
        runs.forget(response_id)
    if not response_store(request).delete(response_id):
        raise not_stored(response_id)
    return DeletedResponse(id=response_id)


@router.get("/v1/responses/{response_id}/input_items", response_model=ItemList,
            responses=STORED_RESPONSE_ERRORS)
async def list_input_items(response_id: str, request: Request,
                           after: str | None = Query(None, max_length=256, description="an item id"),
                           limit: int = Query(20, ge=1, le=MAX_LISTED_ITEMS),
                           order: Literal["asc", "desc"] = "desc") -> ItemList:
    """The items of the request's own `input` (a string input is one user message), newest first by default."""
    running = in_progress(request, response_id)
    stored = response_store(request).get(response_id)
    if stored is not None:
        items = stored.input_items
    elif running is not None:
        items = running.input_items
    else:
        raise not_stored(response_id)
    page, has_more = item_page(items, after, limit, order, f"response {response_id!r}'s input")
    return ItemList.of(page, has_more)


def in_progress(request: Request, response_id: str) -> Run | None:
    """The run generating this response, while it has not ended (in the background or on its connection)."""
    background = background_runs(request).get(response_id)
    if background is not None and not background.finished:
        return background.run
    return foreground_runs(request).get(response_id)


def stored_body(request: Request, response_id: str) -> dict[str, Any]:
    stored = response_store(request).get(response_id)
    if stored is None:
        raise not_stored(response_id)
    return stored.body


def not_stored(response_id: str, param: str = "response_id") -> APIError:
    return APIError(404, f"no stored response {response_id!r}", param=param, type="not_found_error")
