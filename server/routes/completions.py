"""POST /v1/completions: every prompt × n choices, numbered as OpenAI does (prompt_index * n + choice)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request

from server.engine.outputs import ChoiceOutput
from server.protocol import (
    APIError,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    PromptLogprobs,
    PromptTokensDetails,
    Usage,
    sse_responses,
)
from server.routes.beam_search import check_beam_search, request_outputs
from server.routes.engine_calls import PromptJob, cancel_on_disconnect
from server.routes.models import ServedModel, find_model
from server.routes.prompt_logprobs import check_prompt_logprobs, prompt_logprobs_body
from server.routes.response_format import request_grammar
from server.routes.sampling import count_prompts, sampling_params, stop_strings, tokenize_prompts, truncated
from server.routes.text_choice import TextChoice
from server.streaming import continuous_usage, includes_usage, prime, sse_response

router = APIRouter()


@dataclass
class CompletionRun:
    """One request in flight: its prompts, choices and what the engine said about each prompt's cache use."""

    served: ServedModel
    body: CompletionRequest
    jobs: list[PromptJob]
    choices: list[TextChoice]
    id: str
    created: int
    cached_tokens: list[int]
    scored_prompts: dict[int, PromptLogprobs] = field(default_factory=dict)  # prompt_logprobs, by prompt index

    async def run(self) -> AsyncGenerator[int, None]:
        """Feeds engine outputs into the choices; yields the index of each choice that changed."""
        n = self.body.n
        async with request_outputs(self.served.engine, self.id, self.jobs, self.body) as outputs:
            async for prompt_index, output in outputs:
                index = prompt_index * n + output.index
                choice = self.choices[index]
                if output.num_prompt_tokens:  # only the first output of a choice reports its prompt
                    self._first_output(prompt_index, choice, output)
                was_done = choice.done
                choice.add(output)
                if choice.done and not was_done:
                    if choice.stopped_by_string:
                        outputs.stop_choice(prompt_index, output.index)
                    else:
                        outputs.choice_finished(prompt_index)
                yield index

    def _first_output(self, prompt_index: int, choice: TextChoice, output: ChoiceOutput) -> None:
        self.cached_tokens[prompt_index] = max(self.cached_tokens[prompt_index], output.num_cached_tokens)
        prompt_ids = self.jobs[prompt_index].prompt_ids
        if self.body.echo:
            choice.echo(prompt_ids, output.prompt_logprobs)
        if self.body.prompt_logprobs is not None:
            if prompt_index not in self.scored_prompts:  # built once, shared by the prompt's n choices
                self.scored_prompts[prompt_index] = prompt_logprobs_body(
                    self.served.engine.tokenizer, prompt_ids, output.prompt_logprobs or [],
                    self.body.prompt_logprobs, self.served.tokens_as_ids(self.body.return_tokens_as_token_ids))
            choice.prompt_logprobs = self.scored_prompts[prompt_index]

    def _prompt_ids(self, choice_index: int) -> list[int]:
        return self.jobs[choice_index // self.body.n].prompt_ids

    def usage(self) -> Usage:
        prompt_tokens = sum(len(job.prompt_ids) for job in self.jobs)
        completion_tokens = sum(choice.num_tokens for choice in self.choices)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens)))

    async def response(self) -> CompletionResponse:
        async for _ in self.run():
            pass
        ids = self.body.return_token_ids
        choices = [CompletionChoice(index=i, text=c.text, logprobs=c.logprobs, finish_reason=c.finish_reason,
                                    stop_reason=c.stop_reason, prompt_logprobs=c.prompt_logprobs,
                                    prompt_token_ids=self._prompt_ids(i) if ids else None,
                                    token_ids=c.token_ids if ids else None)
                   for i, c in enumerate(self.choices)]
        return CompletionResponse(id=self.id, created=self.created, model=self.served.name, choices=choices,
                                  usage=self.usage())

    async def chunks(self) -> AsyncGenerator[CompletionResponse, None]:
        ids = self.body.return_token_ids
        started = [False] * len(self.choices)
        async for index in self.run():
            choice = self.choices[index]
            text, token_ids, logprobs = choice.take_delta()
            if not text and not (logprobs and logprobs.tokens) and not (ids and token_ids) and not choice.done:
                continue
            delta = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=choice.finish_reason,
                                     stop_reason=choice.stop_reason, token_ids=token_ids if ids else None,
                                     prompt_token_ids=self._prompt_ids(index) if ids and not started[index] else None)
            started[index] = True
            chunk = CompletionResponse(id=self.id, created=self.created, model=self.served.name, choices=[delta])
            yield chunk
        if includes_usage(self.body.stream_options, self.served.frontend.enable_force_include_usage):
            yield CompletionResponse(id=self.id, created=self.created, model=self.served.name, choices=[],
                                     usage=self.usage())


@router.post("/v1/completions", response_model=CompletionResponse,
             responses=sse_responses(CompletionResponse))
async def create_completion(body: CompletionRequest, request: Request):
    served = find_model(request, body.model)
    _refuse_unsupported(body)
    served.check_logprobs(logprobs=body.logprobs, prompt_logprobs=body.prompt_logprobs)
    check_beam_search(body)
    check_prompt_logprobs(body)
    engine = served.engine
    engine.check_admission(count_prompts(body.prompt) * body.n)  # before tokenizing or building any choice
    prompts = [truncated(prompt, body.truncate_prompt_tokens, engine.max_model_len)
               for prompt in tokenize_prompts(body.prompt, engine.tokenizer)]
    prompt_logprobs = max((k for k in (body.logprobs if body.echo else None, body.prompt_logprobs) if k is not None),
                          default=None)
    grammar = request_grammar(body.response_format, body.structured_outputs)
    await engine.compile_grammar(grammar)
    model_stop_ids = served.generation.eos_token_ids
    jobs = []
    for prompt in prompts:
        max_tokens = served.generation.max_tokens(
            body.max_tokens if body.max_tokens is not None else engine.default_max_tokens(len(prompt), body.n))
        params = sampling_params(body, engine.tokenizer, max_tokens=max_tokens, logprobs=body.logprobs,
                                 model_stop_ids=model_stop_ids, defaults=served.generation.sampling,
                                 prompt_logprobs=prompt_logprobs, grammar=grammar)
        engine.validate(len(prompt), params, body.n)
        jobs.append(PromptJob(prompt, params))
    stop = stop_strings(body)
    run = CompletionRun(
        served, body, jobs,
        choices=[TextChoice(engine.tokenizer, stop, body.logprobs, body.include_stop_str_in_output,
                            served.tokens_as_ids(body.return_tokens_as_token_ids), body.skip_special_tokens,
                            named_stop_ids=served.generation.stop_reason_ids(params.stop_token_ids))
                 for _ in range(len(prompts) * body.n)],
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), cached_tokens=[0] * len(prompts),
    )
    request.state.usage = run.usage  # read by the request log once the answer is out
    request.state.outputs = lambda: [choice.logged() for choice in run.choices]  # and by --enable-log-outputs
    if body.stream:
        usage = continuous_usage(body.stream_options, served.frontend.enable_force_include_usage, run.usage)
        return sse_response(await prime(request, run.chunks()), usage)
    return await cancel_on_disconnect(request, run.response())


def _refuse_unsupported(body: CompletionRequest) -> None:
    if body.suffix is not None:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"best_of ({body.best_of}) other than n ({body.n}) is not supported", param="best_of")
