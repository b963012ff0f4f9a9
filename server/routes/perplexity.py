"""POST /v1/perplexity, as CONTRACT.md defines it: strided windows scored by the engine as prompt logprobs.

Every window of every text is its own max_tokens=0 engine request, all submitted at once, so they batch with
each other and with everyone else's traffic.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request

from server.engine.errors import EngineUnavailable
from server.engine.sampling_params import SamplingParams
from server.protocol import (
    ERROR_RESPONSES,
    APIError,
    PerplexityRequest,
    PerplexityResponse,
    PerplexityResult,
    PromptUsage,
)
from server.routes.engine_calls import MergedOutputs, PromptJob, cancel_on_disconnect
from server.routes.models import find_model
from server.routes.sampling import count_prompts, tokenize_prompts

router = APIRouter()

SCORE_ONLY = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=0)


@dataclass(frozen=True, slots=True)
class Window:
    text_index: int
    start: int  # position of the window's first token in the text
    end: int  # one past its last token
    first_scored: int  # positions first_scored..end-1 are scored by this window


def count_windows(num_tokens: int, max_length: int, stride: int) -> int:
    """At least as many windows as plan_windows makes, without making them (stride 1 over a long text is a
    window per token: refused before any is built)."""
    return 1 + max(-(-(num_tokens - max_length) // stride), 0)


def plan_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) per window: starts 0, S, 2S...; each scores what no earlier window did."""
    windows, scored_until = [], 1  # the first token has no context and is never scored
    for start in range(0, num_tokens, stride):
        end = min(start + max_length, num_tokens)
        first_scored = max(scored_until, start + 1)
        if first_scored < end:
            windows.append((start, end, first_scored))
        scored_until = max(scored_until, end)
        if end == num_tokens:
            break
    return windows


@router.post("/v1/perplexity", response_model=PerplexityResponse, responses=ERROR_RESPONSES)
async def score_perplexity(body: PerplexityRequest, request: Request) -> PerplexityResponse:
    served = find_model(request, body.model)
    engine = served.engine
    max_length = body.max_length or engine.max_model_len
    if max_length > engine.max_model_len:
        raise APIError(400, f"max_length {max_length} exceeds the model's context length {engine.max_model_len}",
                       param="max_length")
    stride = body.stride or max(max_length // 2, 1)
    if stride >= max_length:  # a window has no context for its first token: only an earlier, overlapping one does
        raise APIError(400, f"stride ({stride}) must be less than max_length ({max_length}): windows must overlap "
                       "for every token to be scored", param="stride")
    engine.check_admission(count_prompts(body.input), param="input", what="inputs")
    texts = tokenize_prompts(body.input, engine.tokenizer, param="input")
    if body.prepend_bos:
        texts = [[engine.tokenizer.eos_token_id, *ids] for ids in texts]
    num_windows = sum(count_windows(len(ids), max_length, stride) for ids in texts)
    engine.check_admission(num_windows, param="stride", what=f"windows (stride {stride}, max_length {max_length})")
    windows = []
    for text_index, ids in enumerate(texts):  # a text of fewer than 2 tokens has none: nothing to score
        windows += [Window(text_index, *w) for w in plan_windows(len(ids), max_length, stride)]
    jobs = [PromptJob(texts[w.text_index][w.start : w.end], SCORE_ONLY) for w in windows]
    for job in jobs:
        engine.validate(len(job.prompt_ids), job.params, 1)

    token_logprobs: list[list[float | None]] = [[None] * len(ids) for ids in texts]

    async def score() -> None:
        async with MergedOutputs(engine, f"ppl-{uuid.uuid4().hex}", jobs, 1) as outputs:
            async for window_index, output in outputs:
                if output.finish_reason == "error":
                    raise APIError(500, output.error or "the engine failed this request", type="internal_error")
                if output.finish_reason == "abort":
                    raise EngineUnavailable("the request was aborted: the server is shutting down")
                window = windows[window_index]
                if output.prompt_logprobs is not None:
                    for position in range(window.first_scored, window.end):
                        scored = output.prompt_logprobs[position - window.start]
                        token_logprobs[window.text_index][position] = None if scored is None else scored.logprob

    await cancel_on_disconnect(request, score())
    skip = 1 if body.prepend_bos else 0  # the added token is not the client's: report the input's own tokens
    data = [_result(i, scores[skip:], body.logprobs) for i, scores in enumerate(token_logprobs)]
    prompt_tokens = sum(len(ids) for ids in texts)
    usage = PromptUsage.of(prompt_tokens)
    request.state.usage = lambda: usage  # read by the request log once the answer is out
    return PerplexityResponse(model=served.name, data=data, usage=usage)


def _result(index: int, scores: list[float | None], with_logprobs: bool) -> PerplexityResult:
    """The mean over no scored token is undefined: null, not a number the input does not determine."""
    scored = [s for s in scores if s is not None]
    nll = -math.fsum(scored) / len(scored) if scored else None
    return PerplexityResult(index=index, perplexity=None if nll is None else math.exp(nll), nll=nll,
                            num_tokens=len(scored), token_logprobs=scores if with_logprobs else None)
