"""POST /v1/responses and GET /v1/responses/{id}: OpenAI's Responses API over the chat formats.

The conversation (a stored previous response's, then `instructions`, then `input`) is rendered by the same
function chat completions uses; the one generated choice is parsed by the same ChatChoice, and its deltas
become output items (response_output). `text.format` constrains the answer as chat's response_format does, and
a required or named `tool_choice` forces a call as in chat completions (a forced call wins). Stored
responses: see response_store.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from server.chat import ChatMessage, FunctionTool
from server.engine.sampling_params import GrammarSpec, SamplingParams
from server.protocol import GATEWAY_RESPONSES, APIError, ErrorResponse, sse_responses
from server.protocol_responses import NamedFunctionChoice, ResponsesRequest
from server.routes.chat_choice import ChatChoice
from server.routes.chat_prompt import chosen_tools, render_messages
from server.routes.engine_calls import MergedOutputs, PromptJob, cancel_on_disconnect
from server.routes.forced_call import forced_call_spec
from server.routes.models import ServedModel, find_model
from server.routes.response_format import answer_prefix, text_format_spec
from server.routes.response_input import input_messages, output_messages
from server.routes.response_output import ResponseOutput, new_id
from server.routes.response_store import ResponseStore, StoredResponse
from server.streaming import prime, sse_response

router = APIRouter()


class ResponseBody(BaseModel):
    """A response object or stream event: fields as OpenAI's reference names them, built by this module."""

    model_config = ConfigDict(extra="allow")


def response_store(request: Request) -> ResponseStore:
    return request.app.state.response_store


class ResponseRun:
    def __init__(self, served: ServedModel, body: ResponsesRequest, conversation: list[ChatMessage],
                 prompt: list[int], max_tokens: int, store: ResponseStore, grammar: GrammarSpec | None) -> None:
        self.served, self.body, self.conversation, self.prompt = served, body, conversation, prompt
        self.store = store
        self.params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None
                                     else body.temperature, top_p=1.0 if body.top_p is None else body.top_p,
                                     stop_token_ids=served.chat_format.stop_token_ids, grammar=grammar)
        self.id = new_id("resp")
        self.created = int(time.time())
        self.choice = ChatChoice(served.engine.tokenizer, served.chat_format.parser(), [], None)
        self.output = ResponseOutput()
        self.sequence = 0

    async def events(self) -> AsyncGenerator[dict, None]:
        """Every stream event without its sequence number, ending with response.completed or .incomplete."""
        yield {"type": "response.created", "response": self.snapshot("in_progress")}
        yield {"type": "response.in_progress", "response": self.snapshot("in_progress")}
        async with MergedOutputs(self.served.engine, self.id, [PromptJob(self.prompt, self.params)], 1) as outputs:
            async for _, output in outputs:
                self.choice.add(output)
                for event in self.output.add(self.choice.take_delta()):
                    yield event
        incomplete = self.choice.finish_reason == "length"
        for event in self.output.close("incomplete" if incomplete else "completed"):
            yield event
        final = self.snapshot("incomplete" if incomplete else "completed")
        if self.body.store:
            conversation = self.conversation + output_messages(self.output.items)
            self.store.put(self.id, StoredResponse(final, conversation))
        yield {"type": f"response.{final['status']}", "response": final}

    async def response(self) -> ResponseBody:
        async for event in self.events():
            last = event
        return ResponseBody(**last["response"])

    async def stream(self) -> AsyncGenerator[ResponseBody, None]:
        async for event in self.events():
            yield ResponseBody.model_validate(event | {"sequence_number": self.sequence})
            self.sequence += 1

    def snapshot(self, status: str) -> dict[str, Any]:
        body = self.body
        usage = None
        if status != "in_progress":
            output_tokens = self.choice.num_tokens
            usage = {"input_tokens": len(self.prompt), "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": len(self.prompt) + output_tokens}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": self.served.name,
            "status": status, "output": [dict(item) for item in self.output.items] if status != "in_progress" else [],
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "store": body.store, "temperature": body.temperature, "top_p": body.top_p,
            "text": (body.text.model_dump(by_alias=True, exclude_none=True) if body.text
                     else {"format": {"type": "text"}}),
            "tool_choice": (body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedFunctionChoice)
                            else body.tool_choice or "auto"),
            "tools": [tool.model_dump() for tool in body.tools or []], "usage": usage,
        }


@router.post("/v1/responses", response_model=ResponseBody, responses=sse_responses(ResponseBody))
async def create_response(body: ResponsesRequest, request: Request):
    served = find_model(request, body.model)
    store = response_store(request)
    conversation: list[ChatMessage] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise APIError(404, f"no stored response {body.previous_response_id!r}", param="previous_response_id",
                           type="not_found_error")
        conversation = list(previous.conversation)
    conversation += input_messages(body.input)
    head = [ChatMessage("developer", body.instructions)] if body.instructions else []
    choice = body.tool_choice
    named = choice.name if isinstance(choice, NamedFunctionChoice) else None
    mode = None if isinstance(choice, NamedFunctionChoice) else choice  # "none", "auto" or "required"
    tools = chosen_tools([FunctionTool(t.name, t.description or "", t.parameters) for t in body.tools or []],
                         "named" if named else mode, named)
    prompt = render_messages(served.chat_format, head + conversation, tools,
                             body.reasoning.effort if body.reasoning else None, param="input")
    engine = served.engine
    max_tokens = body.max_output_tokens or max(engine.max_model_len - len(prompt), 0)
    forced = forced_call_spec(served.chat_format, tools, None if named else mode, named)
    grammar = forced or text_format_spec(body.text.format if body.text else None, answer_prefix(served.chat_format))
    await engine.compile_grammar(grammar)
    run = ResponseRun(served, body, conversation, prompt, max_tokens, store, grammar)
    engine.validate(len(prompt), run.params, 1)
    if body.stream:
        return sse_response(await prime(request, run.stream()))
    return await cancel_on_disconnect(request, run.response())


@router.get("/v1/responses/{response_id}", response_model=ResponseBody,
            responses=GATEWAY_RESPONSES | {404: {"model": ErrorResponse, "description": "no such stored response"}})
async def retrieve_response(response_id: str, request: Request) -> ResponseBody:
    stored = response_store(request).get(response_id)
    if stored is None:
        raise APIError(404, f"no stored response {response_id!r}", param="response_id", type="not_found_error")
    return ResponseBody(**stored.body)
