"""POST /v1/chat/completions: messages and tools rendered by the model's chat format; the output split into
reasoning, content and tool calls.

Reasoning goes out as `reasoning` (the name vLLM and OpenAI's gpt-oss guidance use) and, with the same
text, as `reasoning_content` for older clients; requests may send either back. vLLM's `include_reasoning:
false` leaves it out (the model still reasons; usage counts those tokens)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastapi import APIRouter, Request

from server.chat import HarmonyChatFormat
from server.engine.sampling_params import GrammarSpec
from server.protocol import (
    APIError,
    ChatChoice as ChatChoiceBody,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDeltaMessage,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionTokensDetails,
    PromptLogprobs,
    PromptTokensDetails,
    Usage,
    sse_responses,
)
from server.protocol_messages import AssistantMessage
from server.protocol_tools import NamedToolChoice
from server.routes.beam_search import check_beam_search, request_outputs
from server.routes.chat_choice import ChatChoice
from server.routes.chat_prompt import (
    assistant_text,
    chat_message,
    check_auto_tool_choice,
    function_tools,
    render_chat_prompt,
)
from server.routes.engine_calls import PromptJob, cancel_on_disconnect
from server.routes.forced_call import choice_parser, forced_call_spec
from server.routes.models import ServedModel, find_model
from server.routes.prompt_logprobs import check_prompt_logprobs, prompt_logprobs_body
from server.routes.response_format import answer_prefix, request_grammar
from server.routes.sampling import sampling_params, stop_strings, truncated
from server.streaming import continuous_usage, includes_usage, prime, sse_response

router = APIRouter()


@dataclass
class ChatRun:
    served: ServedModel
    body: ChatCompletionRequest
    job: PromptJob
    choices: list[ChatChoice]
    id: str
    created: int
    cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None
    echoed: str = ""  # vLLM's echo: the last (assistant) message's text, which every choice's content begins with

    async def run(self) -> AsyncGenerator[int, None]:
        """Feeds engine outputs into the choices; yields the index of each choice that changed."""
        async with request_outputs(self.served.engine, self.id, [self.job], self.body) as outputs:
            async for _, output in outputs:
                self.cached_tokens = max(self.cached_tokens, output.num_cached_tokens)
                if output.prompt_logprobs is not None and self.body.prompt_logprobs is not None \
                        and self.prompt_logprobs is None:  # every choice's first output carries the same
                    self.prompt_logprobs = prompt_logprobs_body(
                        self.served.engine.tokenizer, self.job.prompt_ids, output.prompt_logprobs,
                        self.body.prompt_logprobs, self.served.tokens_as_ids(self.body.return_tokens_as_token_ids))
                choice = self.choices[output.index]
                was_done = choice.done
                choice.add(output)
                if choice.done and not was_done:
                    if choice.stopped_by_string:
                        outputs.stop_choice(0, output.index)
                    else:
                        outputs.choice_finished(0)
                yield output.index

    @property
    def role(self) -> str:
        """vLLM's: the server's --response-role for a new message, else the role of the message continued."""
        if self.body.add_generation_prompt:
            return self.served.frontend.response_role
        return self.body.messages[-1].role

    def usage(self) -> Usage:
        prompt_tokens = len(self.job.prompt_ids)
        completion_tokens = sum(choice.num_tokens for choice in self.choices)
        reasoning_tokens = sum(choice.reasoning_tokens for choice in self.choices)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
                     completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning_tokens))

    async def response(self) -> ChatCompletionResponse:
        async for _ in self.run():
            pass
        shown = self.body.include_reasoning
        choices = [
            ChatChoiceBody(
                index=i,
                message=ChatResponseMessage(role=self.role, content=self.echoed + c.content,
                                            reasoning=c.reasoning if shown and c.reasoning else None,
                                            reasoning_content=c.reasoning if shown and c.reasoning else None,
                                            tool_calls=c.tool_calls or None),
                logprobs=None if c.logprobs is None else ChatLogprobs(content=c.logprobs),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                token_ids=c.token_ids if self.body.return_token_ids else None,
            )
            for i, c in enumerate(self.choices)
        ]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.served.name, choices=choices,
                                      usage=self.usage(), prompt_logprobs=self.prompt_logprobs,
                                      prompt_token_ids=self.job.prompt_ids if self.body.return_token_ids else None)

    async def chunks(self) -> AsyncGenerator[ChatCompletionChunk, None]:
        ids = self.body.return_token_ids
        announced = [False] * len(self.choices)
        async for index in self.run():
            choice = self.choices[index]
            if not announced[index]:  # OpenAI's first delta of each choice carries only the role
                chunk = self._chunk(index, ChatDeltaMessage(role=self.role, content=self.echoed))
                if ids and not any(announced):  # vLLM's return_token_ids: the prompt goes in the first chunk
                    chunk.prompt_token_ids = self.job.prompt_ids
                announced[index] = True
                yield chunk
            new = choice.take_delta()
            if not self.body.include_reasoning:
                new.reasoning = ""
            if not (new.reasoning or new.content or new.tool_calls or new.logprobs or (ids and new.token_ids)
                    or choice.done):
                continue
            delta = ChatDeltaMessage(content=new.content or None, reasoning=new.reasoning or None,
                                     reasoning_content=new.reasoning or None, tool_calls=new.tool_calls or None)
            chunk = self._chunk(index, delta)
            if new.logprobs:
                chunk.choices[0].logprobs = ChatLogprobs(content=new.logprobs)
            if ids:
                chunk.choices[0].token_ids = new.token_ids
            if choice.done:
                chunk.choices[0].finish_reason = choice.finish_reason
                chunk.choices[0].stop_reason = choice.stop_reason
            yield chunk
        if includes_usage(self.body.stream_options, self.served.frontend.enable_force_include_usage):
            yield ChatCompletionChunk(id=self.id, created=self.created, model=self.served.name, choices=[],
                                      usage=self.usage())

    def _chunk(self, index: int, delta: ChatDeltaMessage) -> ChatCompletionChunk:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.served.name,
                                    choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=None)])
        return chunk


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=sse_responses(ChatCompletionChunk))
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    served = find_model(request, body.model)
    engine = served.engine
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    served.check_logprobs(top_logprobs=body.top_logprobs, prompt_logprobs=body.prompt_logprobs)
    check_prompt_logprobs(body)
    check_beam_search(body)
    mode, named = tool_choice_parts(body.tool_choice)
    offered = function_tools(body.tools or [], body.tool_choice)
    check_auto_tool_choice(served, offered, "named" if named else mode)
    grammar = chat_grammar(served, body)
    prompt = truncated(await render_chat_prompt(served, body), body.truncate_prompt_tokens, engine.max_model_len)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = engine.default_max_tokens(len(prompt), body.n)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, engine.tokenizer, max_tokens=served.generation.max_tokens(max_tokens),
                             logprobs=top_logprobs, model_stop_ids=served.chat_stop_ids,
                             defaults=served.generation.sampling,
                             prompt_logprobs=body.prompt_logprobs, grammar=grammar)
    await engine.compile_grammar(params.grammar)
    engine.validate(len(prompt), params, body.n)
    stop = stop_strings(body)
    continued = chat_message(body.messages[-1]) if body.continue_final_message else None
    run = ChatRun(
        served, body, PromptJob(prompt, params),
        choices=[ChatChoice(engine.tokenizer,
                            choice_parser(served.chat_format, mode, named, continued, body.skip_special_tokens,
                                          bool(offered)), stop,
                            top_logprobs, body.include_stop_str_in_output,
                            served.tokens_as_ids(body.return_tokens_as_token_ids),
                            named_stop_ids=served.generation.stop_reason_ids(params.stop_token_ids))
                 for _ in range(body.n)],
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), echoed=echoed_text(body),
    )
    request.state.usage = run.usage  # read by the request log once the answer is out
    request.state.outputs = lambda: [choice.logged() for choice in run.choices]  # and by --enable-log-outputs
    if body.stream:
        usage = continuous_usage(body.stream_options, served.frontend.enable_force_include_usage, run.usage)
        return sse_response(await prime(request, run.chunks()), usage)
    return await cancel_on_disconnect(request, run.response())


def chat_grammar(served: ServedModel, body: ChatCompletionRequest) -> GrammarSpec | None:
    """A forced tool call's constraint, else response_format's or structured_outputs': a forced call's output is
    the call."""
    mode, named = tool_choice_parts(body.tool_choice)
    forced = forced_call_spec(served.chat_format, function_tools(body.tools or [], body.tool_choice), mode, named,
                              parallel=body.parallel_tool_calls is not False)
    grammar = forced or request_grammar(body.response_format, body.structured_outputs,
                                        answer_prefix(served.chat_format))
    if grammar is not None and isinstance(served.chat_format, HarmonyChatFormat) and not body.add_generation_prompt:
        raise APIError(400, "a constraint or forced tool call on GPT-OSS starts the assistant's reply itself: "
                       "it needs add_generation_prompt true (and no continue_final_message)",
                       param="add_generation_prompt")
    return grammar


def tool_choice_parts(tool_choice: str | NamedToolChoice | None) -> tuple[str | None, str | None]:
    """("none" | "auto" | "required" | None, None) or (None, the named function)."""
    if isinstance(tool_choice, NamedToolChoice):
        return None, tool_choice.function.name
    return tool_choice, None


def echoed_text(body: ChatCompletionRequest) -> str:
    """vLLM's echo: the last message's text when it is the assistant's (a reply continues it), else nothing."""
    last = body.messages[-1]
    return assistant_text(last) if body.echo and isinstance(last, AssistantMessage) else ""

