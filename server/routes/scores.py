"""vLLM's /score and /rerank (with /v1/ and, for rerank, Jina's /v2/ paths): text pairs scored by the cosine
similarity of their embeddings, which is how vLLM scores with an embedding (bi-encoder) model.

Each text is embedded once, as POST /v1/embeddings would (server/routes/embeddings.py), however many pairs it is in:
a query against N documents costs N + 1 embeddings.
"""

from __future__ import annotations

import math
import time
import uuid

from fastapi import APIRouter, Request

from server.engine.core_client import EngineCoreClient
from server.protocol import (
    ERROR_RESPONSES,
    APIError,
    PromptUsage,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
)
from server.routes.embeddings import check_embeddable, embed_prompts, unit_length
from server.routes.models import find_model
from server.routes.sampling import truncated

router = APIRouter()


async def pair_scores(request: Request, engine: EngineCoreClient, firsts: list[str], seconds: list[str],
                      keep: int | None, params: tuple[str, str]) -> tuple[list[float], PromptUsage]:
    """The cosine similarity of firsts[i] (or of the one first text) and seconds[i], for every i."""
    engine.check_admission(len(firsts) + len(seconds), param=params[1], what="texts")
    sides = [[truncated(engine.tokenizer.encode(text), keep, engine.max_model_len) for text in texts]
             for texts in (firsts, seconds)]
    for prompts, param in zip(sides, params):
        check_embeddable(engine, prompts, param)
    vectors = [unit_length(v) for v in await embed_prompts(request, engine, sides[0] + sides[1])]
    first_vectors, second_vectors = vectors[:len(firsts)], vectors[len(firsts):]
    if len(first_vectors) == 1:
        first_vectors *= len(second_vectors)
    scores = [math.fsum(a * b for a, b in zip(u, v)) for u, v in zip(first_vectors, second_vectors)]
    prompt_tokens = sum(len(ids) for prompts in sides for ids in prompts)
    usage = PromptUsage.of(prompt_tokens)
    request.state.usage = lambda: usage  # read by the request log once the answer is out
    return scores, usage


@router.post("/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
@router.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
async def create_score(body: ScoreRequest, request: Request) -> ScoreResponse:
    served = find_model(request, body.model)
    firsts = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    seconds = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    if len(firsts) not in (1, len(seconds)):
        raise APIError(400, f"text_1: one text, or as many as text_2 ({len(seconds)}), to pair them one by one; "
                       f"got {len(firsts)}", param="text_1")
    scores, usage = await pair_scores(request, served.engine, firsts, seconds, body.truncate_prompt_tokens,
                                      ("text_1", "text_2"))
    return ScoreResponse(id=f"score-{uuid.uuid4().hex}", created=int(time.time()), model=served.name,
                         data=[ScoreData(index=i, score=score) for i, score in enumerate(scores)], usage=usage)


@router.post("/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES)
@router.post("/v1/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES)
@router.post("/v2/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES)
async def rerank(body: RerankRequest, request: Request) -> RerankResponse:
    served = find_model(request, body.model)
    scores, usage = await pair_scores(request, served.engine, [body.query], body.documents,
                                      body.truncate_prompt_tokens, ("query", "documents"))
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: equal scores keep document order
    results = [RerankResult(index=i, relevance_score=scores[i],
                            document=RerankDocument(text=body.documents[i]) if body.return_documents else None)
               for i in ranked[:body.top_n or None]]
    return RerankResponse(id=f"rerank-{uuid.uuid4().hex}", model=served.name, usage=usage, results=results)
