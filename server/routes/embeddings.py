"""POST /v1/embeddings: each input's last-token final hidden state, scaled to unit length (unless vLLM's
``normalize`` is false).

GPT-2 and GPT-OSS are generative models; as vLLM does when it serves one as an embedding model, an input's
embedding is the final (normed) hidden state at its last token, L2-normalised. Every input is its own engine
request that stops once its prompt is in (``SamplingParams.embed``), so inputs batch with each other and with
everyone else's traffic, and share the prefix cache.
"""

from __future__ import annotations

import base64
import math
import struct
import uuid

from fastapi import APIRouter, Request

from server.engine.core_client import EngineCoreClient
from server.engine.sampling_params import SamplingParams
from server.protocol import (
    ERROR_RESPONSES,
    APIError,
    Embedding,
    EmbeddingChatRequest,
    EmbeddingResponse,
    EmbeddingsBody,
    PromptUsage,
)
from server.routes.chat_prompt import render_chat_fields
from server.routes.engine_calls import MergedOutputs, PromptJob, cancel_on_disconnect, raise_if_failed
from server.routes.models import find_model
from server.routes.sampling import count_prompts, tokenize_prompts, truncated

router = APIRouter()

EMBED = SamplingParams(max_tokens=0, temperature=0.0, embed=True)


def unit_length(vector: list[float]) -> list[float]:
    """The vector over its L2 norm (a zero vector stays zero), summed in float64 as exactly as Python can."""
    norm = math.sqrt(math.fsum(v * v for v in vector))
    return [v / norm for v in vector] if norm > 0 else vector


def encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    """OpenAI's base64 form: the float32 values, little-endian (what its SDK decodes with numpy)."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def check_embeddable(engine: EngineCoreClient, prompts: list[list[int]], param: str) -> None:
    """Refuse, before any is queued, an input the engine could not take whole."""
    for index, ids in enumerate(prompts):
        if len(ids) > engine.max_model_len:  # the engine's own refusal would name completions' `prompt`
            raise APIError(400, f"{param} {index} has {len(ids)} tokens, more than this model's context of "
                           f"{engine.max_model_len}; shorten it or set truncate_prompt_tokens", param=param)
        engine.validate(len(ids), EMBED, 1)


async def embed_prompts(request: Request, engine: EngineCoreClient, prompts: list[list[int]]) -> list[list[float]]:
    """Each prompt's last-token hidden state, as the model gives it; the requests end if the client goes away."""
    vectors: list[list[float]] = [[] for _ in prompts]

    async def embed() -> None:
        jobs = [PromptJob(ids, EMBED) for ids in prompts]
        async with MergedOutputs(engine, f"embd-{uuid.uuid4().hex}", jobs, 1) as outputs:
            async for index, output in outputs:
                raise_if_failed(output)
                if output.embedding is not None:
                    vectors[index] = output.embedding

    await cancel_on_disconnect(request, embed())
    return vectors


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
async def create_embeddings(body: EmbeddingsBody, request: Request) -> EmbeddingResponse:
    served = find_model(request, body.model)
    engine = served.engine
    if body.dimensions is not None and body.dimensions != engine.hidden_size:
        raise APIError(400, f"dimensions: this model's embeddings have {engine.hidden_size} dimensions, and it was "
                       "not trained for shortened (matryoshka) ones; omit dimensions or give its width",
                       param="dimensions")
    if isinstance(body, EmbeddingChatRequest):
        engine.check_admission(1, param="messages", what="inputs")
        param, inputs = "messages", [await render_chat_fields(served, body)]
    else:
        engine.check_admission(count_prompts(body.input), param="input", what="inputs")
        param, inputs = "input", tokenize_prompts(body.input, engine.tokenizer, param="input")
    prompts = [truncated(ids, body.truncate_prompt_tokens, engine.max_model_len) for ids in inputs]
    check_embeddable(engine, prompts, param=param)
    vectors = await embed_prompts(request, engine, prompts)
    prompt_tokens = sum(len(ids) for ids in prompts)
    usage = PromptUsage.of(prompt_tokens)
    request.state.usage = lambda: usage  # read by the request log once the answer is out
    if body.normalize:
        vectors = [unit_length(v) for v in vectors]
    data = [Embedding(index=i, embedding=encoded(v, body.encoding_format)) for i, v in enumerate(vectors)]
    return EmbeddingResponse(model=served.name, data=data, usage=usage)
